"""`python -m bench.hostile_run --quick` runs end to end: every phase once against a live `python server.py`
(hostile names, bad numbers, other sites, abandoned generations, races, damaged files, a kill -9
and resume), no finding, every store object opened after, and its temp home gone."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT

PHASES = ["hostile names", "bad numbers", "cross-site writes", "rebinding Hosts", "abandoned generations",
          "create/delete/generate races", "damaged files (after restart)", "resume after kill -9"]


@pytest.mark.slow
def test_the_quick_hostile_run_finds_nothing_and_leaves_nothing():
    before = set(Path(tempfile.gettempdir()).glob("azr-hostile-*"))
    out = subprocess.run([sys.executable, "-m", "bench.hostile_run", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "findings: 0" in out.stdout and "lost: 0; corrupt: 0; temp files left: 0" in out.stdout
    assert [p for p in PHASES if f"| {p} |" not in out.stdout] == []
    assert "kill -9 of the server: 1; resumed at the newest intact checkpoint: 1/1" in out.stdout
    assert set(Path(tempfile.gettempdir()).glob("azr-hostile-*")) <= before
