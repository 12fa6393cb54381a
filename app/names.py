"""The one pattern every name in the store follows: a model, a book, an adapter.

A name becomes part of a path (models/<name>/, books/<name>.txt), so it is checked before any
path is built from it: letters, digits, '_' and '-' only, so no '/', '..' or NUL can ever reach
the file system, whoever sent the name (the web API, the CLI, a file on disk).
"""

import re

from files import StoreError

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_name(name, what="model"):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError(f"invalid {what} name {name[:80]!r}: use 1-64 letters, digits, '_' or '-'"
                         if isinstance(name, str) else f"invalid {what} name: use 1-64 letters, digits, '_' or '-'")
    return name
