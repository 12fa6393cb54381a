"""The shape of the code: data flows one way, book -> tokens -> model -> trainer -> store -> edges,
and a module imports only from layers below its own. No import circles."""

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
    {"records"},  # the schema of every record read from disk
    {"store"},  # models, books, adapters on disk
    {"runs", "inside", "export"},  # a run of a stored model; looking inside a model; a model for other tools
    {"jobs"},  # the web app's background job
    {"openai_api"},  # OpenAI's API over the web app's models (server.py includes it)
    {"server", "cli", "bench"},  # the edges: nothing imports them (bench: the package of benchmarks)
]


def project_imports():
    """{module: set of project modules it imports}, for every .py file at the top level."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for m in modules:
        tree = ast.parse((ROOT / f"{m}.py").read_text(encoding="utf-8"))
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = (names & modules) - {m}
    return graph


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


def test_there_is_no_import_circle():
    assert circles(project_imports()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    fake = {"model": {"store"}, "store": {"model"}, "cli": {"model"}}
    assert upward_imports(fake) == ["model imports store"]
    assert sorted(circles(fake)) == ["model", "store"]
