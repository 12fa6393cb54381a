"""The shape of the code: data flows one way, book -> tokens -> model -> trainer -> store -> edges,
and a module imports only from layers below its own. The product package `app/` sits above the
lesson: the lesson never imports it, the edges do; inside the package its modules may import each
other in any order that makes no circle. No import circles anywhere."""

import ast

from conftest import ROOT

# bottom to top; a module may import modules of lower layers only
LAYERS = [
    {"config", "files", "hardware"},  # settings rules, files that are never half-written, the device
    {"tokenizer", "sizing", "distributed"},  # books -> tokens; how big a config is; several processes
    {"model"},  # the network
    {"generate", "speed", "quant"},  # running it, training it fast, storing it in 4 bits
    {"lora"},  # adapters on top of the network
    {"selfplay"},  # the self-play stage
    {"muon"},  # the optimizer of the hidden matrices
    {"azr_trainer"},  # the loop
    {"records"},  # the schema of every record read from disk
    {"store"},  # models, books, adapters on disk
    {"runs", "inside", "export"},  # a run of a stored model; looking inside a model; a model for other tools
    {"jobs"},  # the web app's background job
    {"app"},  # the product package: app.web is the web app's routers (server.py puts them together)
    {"server", "cli", "bench", "bench_latency"},  # the edges: nothing imports them
]


def module_files():
    """{module name: file} of every .py file at the top level and in the packages (folders with
    an __init__.py) beside them: app/web/books.py is "app.web.books", app/__init__.py is "app"."""
    out = {p.stem: p for p in ROOT.glob("*.py")}
    for init in ROOT.glob("*/__init__.py"):
        for p in init.parent.rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imported(node, modules):
    """The project modules an import statement loads: `from app.web import books` loads app,
    app.web and app.web.books (a package runs its __init__ before its module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    loaded = set()
    for name in names:
        parts = name.split(".")
        loaded |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return loaded & modules


def project_imports():
    """{module: set of project modules it imports}, for every module of module_files()."""
    files = module_files()
    graph = {}
    for m, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import) or isinstance(n, ast.ImportFrom) and n.module]
        graph[m] = set().union(*(imported(n, set(files)) for n in nodes)) - {m}
    return graph


def layer_of(module):
    top = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def upward_imports(graph):
    """Imports of a module's own layer or above; within one package any order is fine (see circles)."""
    return [f"{m} imports {d}" for m, deps in graph.items() for d in deps
            if layer_of(d) >= layer_of(m) and m.split(".")[0] != d.split(".")[0]]


def circles(graph):
    """Modules that reach themselves through their imports."""
    def reaches(start, goal, seen):
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))
    return [m for m in graph if reaches(m, m, {m})]


def test_every_module_has_a_layer():
    unplaced = {m.split(".")[0] for m in project_imports()} - set().union(*LAYERS)
    assert not unplaced, f"give these modules a layer: {unplaced}"


def test_no_module_imports_from_its_own_layer_or_above():
    assert upward_imports(project_imports()) == []


def test_there_is_no_import_circle():
    assert circles(project_imports()) == []


def test_the_package_is_in_the_graph():
    graph = project_imports()
    assert {"app", "app.web", "app.web.common"} <= set(graph) and "app.web.common" in graph["app.web.books"]
    assert "app.web" in graph["server"]  # `from app.web import books` loads the package first


def test_the_checks_catch_a_circle_and_an_upward_import():
    fake = {"model": {"store", "app.web.common"}, "store": {"model"}, "cli": {"model", "app.web.books"},
            "app.web.books": {"app.web.common", "store"}, "app.web.common": {"app.web.books"}}
    assert sorted(upward_imports(fake)) == ["model imports app.web.common", "model imports store"]
    assert sorted(circles(fake)) == ["app.web.books", "app.web.common", "model", "store"]
