"""Requests and answers of the hostile run (bench/hostile_run.py): one request that returns a
transport error instead of raising it (a killed server is expected), the rules that judge an
answer, and the tally that counts them per group; each answer that is not as expected is a finding."""

import json
import threading
from collections import Counter, defaultdict
from urllib.parse import quote

import httpx

from app.names import NAME_RE  # the store's own rule of a valid name


def send(client, method, url, params=None, body=None, headers=None, files=None, data=None, timeout=60):
    """One request; a transport error is returned, not raised (a killed server is expected).
    The body is encoded here so that NaN and Infinity can be sent, as a careless client would."""
    content, headers = None, dict(headers or {})
    if body is not None:
        content = json.dumps(body)
        headers.setdefault("Content-Type", "application/json")
    try:
        return client.request(method, url, params=params, content=content, headers=headers, files=files, data=data,
                              timeout=timeout)
    except httpx.HTTPError as e:
        return e


def as_segment(name):
    """A name as one path segment on the wire: every reserved byte escaped, dots too (a client
    would otherwise resolve "/models/t/adapters/.." to "/models/t" before sending it)."""
    return quote(str(name), safe="").replace(".", "%2E")


def answer(r):
    return isinstance(r, httpx.Response)


def expect(r, status):
    if r.status_code != status:
        raise RuntimeError(f"setup: {r.request.method} {r.request.url.path} answered {r.status_code}: {r.text[:300]}")
    return r


def no_5xx(r):
    return r, not answer(r) or r.status_code < 500


def judge_name(r, bad):
    """An invalid name must be refused (4xx); a valid odd one may succeed; neither may be a 5xx."""
    if not answer(r):
        return False
    if bad == "" and r.status_code in (307, 404, 405):  # no segment at all: the URL names another route
        return True
    return 400 <= r.status_code < 500 if not valid_name(bad) else r.status_code < 500


def valid_name(name):
    return bool(NAME_RE.fullmatch(name))


class Tally:
    """Answers counted per group; each answer that is not as expected is a finding."""

    def __init__(self):
        self.counts = defaultdict(Counter)
        self.findings, self.notes, self.accepted = [], {}, []
        self.lock = threading.Lock()

    def add(self, group, r, ok, what=None):
        with self.lock:
            c = self.counts[group]
            if r is None:
                c["checks"] += 1
            elif not answer(r):
                c["no answer"] += 1
            else:
                c["requests"] += 1
                c[f"{r.status_code // 100}xx"] += 1
            c["as expected"] += bool(ok)
            if not ok:
                self.finding(f"{group}: {what or describe(r)}")

    def finding(self, text):
        self.findings.append(text)

    def note(self, key, value):
        self.notes[key] = value


def describe(r):
    if not answer(r):
        return f"no answer: {type(r).__name__} {str(r)[:200]}"
    return f"{r.request.method} {str(r.request.url)[:160]} -> {r.status_code} {r.text[:200]}"
