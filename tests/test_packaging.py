"""`pip install .` gives a working `azr`: pyproject.toml names cli.main, every module and package the
commands import and the page's folders; and an installed copy keeps its data out of site-packages."""

import tomllib
from pathlib import Path

import cli
import server
from app import store
from conftest import ROOT
from test_layout import packages, project_imports

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def reached_from(graph, start):
    """`start` and every project module it imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def entry_point(spec):
    module, func = spec.split(":")
    return getattr({"cli": cli, "server": server}[module], func)


def test_the_commands_are_cli_main_and_server_main():
    scripts = PROJECT["project"]["scripts"]
    assert entry_point(scripts["azr"]) is cli.main and entry_point(scripts["azr-server"]) is server.main


def installed_modules(setup):
    """The modules `pip install .` copies: the py-modules, and the .py files of the packages."""
    in_packages = {f"{pkg}.{p.stem}" for pkg in setup["packages"] for p in (ROOT / pkg.replace(".", "/")).glob("*.py")}
    return set(setup["py-modules"]) | (in_packages - {f"{pkg}.__init__" for pkg in setup["packages"]})


def test_every_module_the_commands_import_is_installed():
    setup = PROJECT["tool"]["setuptools"]
    graph, listed = project_imports(), installed_modules(setup)
    assert reached_from(graph, "cli") | reached_from(graph, "server") == listed
    assert set(packages()) <= set(setup["packages"])  # a subpackage is installed only where it is named
    assert "app.web.generation_queue" in reached_from(graph, "server")  # the check follows imports through the layers


def test_the_page_files_are_installed_beside_the_server():
    setup = PROJECT["tool"]["setuptools"]
    for folder in ("templates", "static"):
        files = {p.name for p in (ROOT / folder).iterdir()}
        assert folder in setup["packages"]
        assert files == {f for pattern in setup["package-data"][folder] for f in files if Path(f).match(pattern)}


def test_an_installed_copy_keeps_its_data_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert store.default_home(ROOT) == ROOT  # a checkout: the project folder, as ever
    assert store.default_home(tmp_path / "site-packages") == tmp_path / "user" / ".azr"
