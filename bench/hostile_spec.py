"""What the hostile run (bench/hostile_run.py) attacks, read from the server's own OpenAPI
description: every route, every field that names a stored thing, every numeric field and the
bounds its schema sets, and a valid, cheap request to carry one bad value. A field added to the
API tomorrow is attacked tomorrow without an edit here."""

import re

# what a request body needs to be cheap: only fields the schema has are set
CHEAP = dict(max_new_tokens=2, max_tokens=2, steps=2, windows=1, bars=2, compile="off", n=1)

NAME_KINDS = {"name", "out", "model", "book", "adapter", "version"}  # the things the store keeps by name


def operations(spec):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield method.upper(), path, op


def name_kind(field):
    """"model_a" -> "model", "books" -> "book": a field names a stored thing if its stem is one."""
    stem = re.sub(r"_[ab]$", "", field)
    stem = stem[:-1] if stem.endswith("s") else stem
    return stem if stem in NAME_KINDS else None


def fields_of(spec, op):
    """(field, schema, where) of every parameter and JSON body field of a route."""
    for p in op.get("parameters", []):
        yield p["name"], p.get("schema", {}), p["in"]
    for f, prop in body_props(spec, op).items():
        yield f, prop, "body"


def body_props(spec, op):
    content = (op or {}).get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")
    schema = resolve(spec, schema) if schema else {}
    return schema.get("properties", {})


def resolve(spec, schema):
    """Follow $ref, and take the non-null branch of anyOf."""
    if "anyOf" in schema:
        schema = {**schema, **next(s for s in schema["anyOf"] if s.get("type") != "null")}
        schema.pop("anyOf")
    if "$ref" in schema:
        return resolve(spec, spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
    return schema


def name_slots(spec, path, op):
    return [(f, where) for f, prop, where in fields_of(spec, op)
            if name_kind(f) and resolve(spec, prop).get("type") in ("string", "array")]


def numeric_fields(spec, op):
    return [(f, resolve(spec, prop), where) for f, prop, where in fields_of(spec, op)
            if resolve(spec, prop).get("type") in ("integer", "number") and where in ("body", "query")]


def bad_values(prop):
    """Values this field's schema forbids: past each bound, not finite, a fraction for a whole number."""
    whole = prop.get("type") == "integer"
    lo, hi = prop.get("minimum"), prop.get("maximum")
    values = [float("nan"), float("inf"), float("-inf")]
    values += [int(lo) - 1 if whole else lo - 1] if lo is not None else []
    values += [int(hi) + 1 if whole else hi * 2 + 1] if hi is not None else []
    return values + ([1.5] if whole else [])


def odd_values(prop):
    """Values the schema leaves open but few fields mean: negative, and past any 64-bit number."""
    return ([-1] if prop.get("minimum") is None else []) + ([10**30, 2**63] if prop.get("maximum") is None else [])


def fill_request(spec, path, op, override):
    """(path args, query, body) of a valid, cheap request: required fields filled, CHEAP settings
    where the route has them, then `override`."""
    path_args, query, body = {}, {}, {}
    needed = required_fields(spec, op)
    for field, prop, where in fields_of(spec, op):
        if field in override:
            value = override[field]
        elif field in needed or field in CHEAP or where == "path":
            value = valid_value(spec, field, resolve(spec, prop), where, path)
        else:
            continue
        {"path": path_args, "query": query, "body": body}[where][field] = value
    return path_args, query, (body if body_props(spec, op) else None)


def required_fields(spec, op):
    content = (op or {}).get("requestBody", {}).get("content", {}).get("application/json")
    schema = resolve(spec, content["schema"]) if content else {}
    return set(schema.get("required", [])) | {q["name"] for q in op.get("parameters", []) if q.get("required")}


def valid_value(spec, field, prop, where, path):
    """The tiny model "t", its book "bk", adapter "ad" and version "v001" for the names; a new
    name where one is to be made; CHEAP or the schema's own default for the rest."""
    kind = name_kind(field)
    if kind:
        in_path = {"name": "bk" if path.startswith("/books") else "t"}
        value = (in_path if where == "path" else {}).get(kind) or {
            "model": "t", "book": "bk", "adapter": "ad", "version": "v001", "name": "fresh",
            "out": "fresh"}[kind]
        return [value] if prop.get("type") == "array" else value
    return CHEAP[field] if field in CHEAP else sample_value(spec, prop)


def sample_value(spec, prop):
    prop = resolve(spec, prop)
    if "enum" in prop:
        return prop["enum"][0]
    if "default" in prop:
        return prop["default"]
    t = prop.get("type")
    if t == "object":
        return {f: sample_value(spec, p) for f, p in prop.get("properties", {}).items() if f in prop.get("required", [])}
    if t == "array":
        return [sample_value(spec, prop.get("items", {}))]
    return {"string": "hi", "integer": 1, "number": 1.0, "boolean": False}.get(t, "hi")


def tricky_names():
    """Names that try to become a path, hide in unicode, or break a parser. Some are valid by the
    store's rule ("-", "con"): those may succeed; the rest must be refused."""
    return ["..", ".", "../../etc/passwd", "..\\..\\windows", "/etc/passwd", "a/b", "a\\b", "%2e%2e%2f", "a\x00b",
            "\x00", "", " ", "t ", " t", "t\n", "t\r\nX-Injected: 1", "x" * 65, "x" * 5000, "x" * 100_000,
            "Модель", "名前", "ｆｕｌｌｗｉｄｔｈ", "a\u202eb", "a\u200bb", "😀", "e\u0301", ".hidden", "~root",
            "$HOME", "name.json", "t.safetensors", "<script>", "'; drop table", "-", "--help", "con", "NUL"]
