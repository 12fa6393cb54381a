"""The README's facts that the code defines agree with the code: the presets paragraph is
written by hand, so this test reads it back and compares it with model.PRESETS."""

import re

from conftest import ROOT
from model import PRESETS
from sizing import param_count

README = (ROOT / "README.md").read_text(encoding="utf-8")
FIELDS = "vocab_size / d_model / num_layers / num_heads / d_ff / max_seq_len"


def numbers(cfg):
    return tuple(getattr(cfg, f) for f in FIELDS.split(" / "))


def presets_paragraph(text):
    """The README's paragraph that starts 'Presets (`vocab_size / ...`):'."""
    start = text.index(f"Presets (`{FIELDS}`):")
    return text[start:text.index("\n\n", start)]


def presets_in(paragraph):
    """{name: (six numbers), ...} and {name: millions of parameters} where the README says them."""
    found = re.findall(r"(\w+)\s+(\d+(?:/\d+){5})", paragraph)
    shapes = {name: tuple(map(int, nums.split("/"))) for name, nums in found}
    sizes = {name: float(m) for name, m in re.findall(r"(\w+)\s+\d+(?:/\d+){5}\s+\((\d+\.\d+) M", paragraph)}
    return shapes, sizes


def test_the_readme_names_every_preset_with_its_numbers():
    shapes, sizes = presets_in(presets_paragraph(README))
    assert shapes == {name: numbers(cfg) for name, cfg in PRESETS.items()}
    assert sizes and all(round(param_count(PRESETS[name]) / 1e6, 2) == m for name, m in sizes.items())


def test_the_check_catches_a_wrong_number():
    wrong = README.replace("tiny\n1024/128/2/4/512/128", "tiny\n1024/128/3/4/512/128")
    assert wrong != README
    shapes, _ = presets_in(presets_paragraph(wrong))
    assert shapes["tiny"] != numbers(PRESETS["tiny"])
