"""The rules of every settings dataclass, written once: range, choices and a line of help per field.

ModelConfig, TrainConfig, SamplingConfig and LoRAConfig are plain dataclasses. Each field is
declared with `setting(default, help, lo, hi, choices)`, which stores those facts in the field's
metadata; `validate` checks any of the dataclasses against them, and the edges derive what they
need from the same fields: the CLI its flags (cli.py), the web API its request bodies and schema
(app/web/), the page its form defaults (templates/index.html). A range or a default is changed
in one place, and every edge follows. A value a rule refuses raises SettingError, which carries
the field's name, so an edge can point at the field without reading the message.
"""

import math
import types
import typing
from dataclasses import MISSING, field, fields

VERSION = "1.1.0"  # the app's: the web API, `cli.py --version`, exported model cards
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes up to a signed 64-bit integer


class SettingError(ValueError):
    """A settings value we cannot use; `field` names it, so a form can mark the field to change."""

    def __init__(self, message, field):
        super().__init__(message)
        self.field = field


def setting(default, help="", lo=None, hi=None, choices=None):
    """A dataclass field with its default and the rules it must follow."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def field_type(cls, f):
    """(base type, may be None) of a field: `int | None` -> (int, True)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typing.get_origin(hint) or hint, False


def validate(cfg):
    """Check every field of a settings dataclass: its type, then its range or choices.
    Raises SettingError naming the field and what it accepts; returns cfg."""
    for f in fields(cfg):
        check_value(type(cfg), f, getattr(cfg, f.name))
    return cfg


def check_value(cls, f, v):
    kind, optional = field_type(cls, f)
    m = f.metadata
    if v is None and optional:
        return
    if not _is(v, kind):
        raise SettingError(f"{f.name} must be {_KIND_WORDS.get(kind, kind.__name__)}, got {echo(v)}", f.name)
    if kind is float and not math.isfinite(v):
        raise SettingError(f"{f.name} must be a finite number, got {v!r}", f.name)
    choices = m.get("choices")
    if choices and any(x not in choices for x in (v if kind is tuple else [v])):
        raise SettingError(f"{f.name} must be {'any' if kind is tuple else 'one'} of {', '.join(map(str, choices))}, "
                           f"got {echo(v)}", f.name)
    lo, hi = m.get("lo"), m.get("hi")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SettingError(f"{f.name} must be {describe_range(lo, hi)}, got {echo(v)}", f.name)


def check_seed(seed):
    """The rule of every seed, also of one that is no settings field (create_model's)."""
    if not (_is(seed, int) and 0 <= seed <= SEED_MAX):
        raise SettingError(f"seed must be {describe_range(0, SEED_MAX)}, got {echo(seed)}", "seed")
    return seed


def echo(value, limit=80):
    """A rejected value as an error message repeats it: cut, so a 20 MB string is not sent back."""
    if isinstance(value, int) and value.bit_length() > 4 * limit:  # repr would be long (or refused)
        return f"a number of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def describe_range(lo, hi):
    if hi is None:
        return f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"between {lo} and {hi}"


def _is(v, kind):
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind is tuple:
        return isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v)
    return isinstance(v, kind)


_KIND_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text", tuple: "a list of names"}


def from_dict(cls, d, what="options"):
    """A validated cls from a dict, refusing names it does not know (a typo is an error)."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d).validate()


def help_text(f):
    """The field's help with its range and default, for a CLI flag or a form field."""
    m, parts = f.metadata, []
    if m.get("lo") is not None or m.get("hi") is not None:
        parts.append(describe_range(m["lo"], m["hi"]))
    default = default_of(f)
    parts.append(f"default {','.join(default) if isinstance(default, tuple) else default}")
    return f"{m.get('help', '')} ({'; '.join(parts)})".strip()


def build(cls, values, prefix=""):
    """from_dict(cls, values), for an edge that calls the fields prefix + name (the web API's and
    the CLI's lora_r): an error message names the field the way the user typed it."""
    try:
        return from_dict(cls, values)
    except SettingError as e:
        if prefix:  # the rules' messages start with the field's name
            raise SettingError(prefix + str(e), prefix + e.field) from None
        raise
