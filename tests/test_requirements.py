"""The install is reproducible: requirements.txt is a lock file, every package at one exact version,
made from the short hand-kept list in requirements.in (its header says how)."""

import re

from conftest import ROOT

PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==[0-9][A-Za-z0-9.+!-]*$")


def requirement_lines(path):
    """The requirement part of every line that holds one (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def unpinned(lines):
    return [line for line in lines if not PINNED.match(line)]


def name(requirement):
    return re.split(r"[=<>!~;\[ ]", requirement, 1)[0].lower().replace("_", "-")


def test_every_package_in_the_lock_file_has_an_exact_version():
    assert unpinned(requirement_lines(ROOT / "requirements.txt")) == []


def test_the_check_catches_an_unpinned_line():
    assert unpinned(["numpy==2.4.6", "numpy", "torch>=2.13", "peft==0.21.2 ; python_version>'3'"]) == \
        ["numpy", "torch>=2.13", "peft==0.21.2 ; python_version>'3'"]


def test_the_lock_file_holds_every_direct_dependency():
    locked = {name(r) for r in requirement_lines(ROOT / "requirements.txt")}
    assert {name(r) for r in requirement_lines(ROOT / "requirements.in")} - locked == set()


def test_install_and_ci_read_the_lock_file():
    assert "pip install -r requirements.txt" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "-r requirements.txt" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
