"""The shape of the code: data flows one way, book -> tokens -> model -> trainer -> store -> edges,
and a module imports only from layers below its own. No import circles. The lesson (the flat
files at the top) never imports the product (the app/ package); the product builds on the lesson."""

import ast

from conftest import ROOT

# bottom to top; a module may import modules of lower layers only
LAYERS = [
    {"config", "files", "hardware"},  # settings rules, files that are never half-written, the device
    {"tokenizer", "sizing", "distributed"},  # books -> tokens; how big a config is; several processes
    {"model", "muon"},  # the network; the optimizer of its hidden matrices
    {"generate", "speed", "quant"},  # running it, training it fast, storing it in 4 bits
    {"lora"},  # adapters on top of the network
    {"selfplay"},  # the self-play stage
    {"schedule", "keep_best", "checkpoint", "evaluate"},  # lr over time; when to stop; the resume format; bits/byte
    {"azr_trainer"},  # the loop
    # ---- the product: app/
    # the schema of every record read from disk; reading book files; the one pattern of a stored name
    {"app.records", "app.books", "app.names"},
    {"app.shelf", "app.adapters"},  # the store's books; the LoRA adapters of its models
    {"app.store"},  # models on disk, holding the shelf of books and the adapters
    # a run of a stored model; looking inside a model; a model for other tools
    {"app.runs", "app.inside", "app.export"},
    {"app.jobs"},  # the web app's background job
    # ---- the web app: app/web/, one router per section (server.py puts them together)
    # generation on threads of its own; the models loaded; the site guard
    {"app.web.generation_queue", "app.web.model_cache", "app.web.guard"},
    {"app.web.downloads"},  # zips and exports to download
    {"app.web.common"},  # the app's state and the shapes every router shares
    {"app.web.errors"},  # errors as JSON
    {"app.web.books", "app.web.generation", "app.web.inside", "app.web.models", "app.web.openai", "app.web.training"},
    {"app.web.page"},  # the page itself and /health
    {"server", "cli", "bench"},  # the edges: nothing imports them (bench: the package of benchmarks)
]


PACKAGES = ["app"]  # the product's package; its subpackages are found below it
LESSON = set().union(*LAYERS[:LAYERS.index({"azr_trainer"}) + 1])  # the loop tops the lesson


def module_files():
    """{dotted module name: file} for the .py files at the top and in the packages (not their
    __init__ files, which are maps: see test_a_package_init_is_a_map)."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            if p.name != "__init__.py":
                found[".".join(p.relative_to(ROOT).with_suffix("").parts)] = p
    return found


def imported_names(tree):
    """Every dotted name an import statement may mean: `from app import runs` may be app.runs."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            yield from (a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            yield n.module
            yield from (f"{n.module}.{a.name}" for a in n.names)


def project_imports():
    """{module: set of project modules it imports}, for every module of the project."""
    files = module_files()
    graph = {}
    for m, path in files.items():
        names = set(imported_names(ast.parse(path.read_text(encoding="utf-8"))))
        graph[m] = (names & set(files)) - {m}
    return graph


def packages():
    """Every package of the product: app and the folders with an __init__.py below it."""
    inits = (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py"))
    return sorted(".".join(p.parent.relative_to(ROOT).parts) for p in inits)


def layer_of(module):
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def upward_imports(graph):
    return [f"{m} imports {d}" for m, deps in graph.items() for d in deps if layer_of(d) >= layer_of(m)]


def circles(graph):
    """Modules that reach themselves through their imports."""
    def reaches(start, goal, seen):
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))
    return [m for m in graph if reaches(m, m, {m})]


def test_every_module_has_a_layer():
    unplaced = set(project_imports()) - set().union(*LAYERS)
    assert not unplaced, f"give these modules a layer: {unplaced}"


def test_no_module_imports_from_its_own_layer_or_above():
    assert upward_imports(project_imports()) == []


def product_imports(graph):
    """Imports of the lesson from anything that is not the lesson."""
    return sorted(f"{m} imports {d}" for m in LESSON for d in graph.get(m, ()) if d not in LESSON)


def test_the_lesson_imports_nothing_from_the_product():
    assert product_imports(project_imports()) == []


def test_a_package_init_is_a_map():
    """An __init__.py holds a docstring that maps its package and nothing else: importing a
    package runs no code and pulls in none of its modules."""
    for pkg in packages():
        tree = ast.parse((ROOT / pkg.replace(".", "/") / "__init__.py").read_text(encoding="utf-8"))
        assert ast.get_docstring(tree) and len(tree.body) == 1, f"{pkg}/__init__.py: a docstring only"


def test_there_is_no_import_circle():
    assert circles(project_imports()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    fake = {"model": {"app.store"}, "app.store": {"model"}, "cli": {"model"}}
    assert upward_imports(fake) == ["model imports app.store"]
    assert sorted(circles(fake)) == ["app.store", "model"]
    assert product_imports(fake) == ["model imports app.store"]
