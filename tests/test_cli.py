"""The command line, end to end on a tiny model, in-process."""

import argparse
import json

import pytest

import cli
import config
from conftest import ROOT


def run(capsys, home, *args):
    code = cli.main(["--home", str(home), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_create_train_generate_eval_list(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text((ROOT / "books" / "example_book.txt").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    home = tmp_path / "home"
    sizes = ["--vocab-size", "400", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
             "--d-ff", "64", "--max-seq-len", "32"]
    assert run(capsys, home, "create", "tiny", *sizes)[0] == 0
    code, out, _ = run(capsys, home, "train", "tiny", "--book", str(book), "--steps", "30", "--batch-size", "8",
                       "--eval-every", "15", "--precision", "fp32")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["status"] == "done"
    assert "step 15 sample: The Lighthouse Keeper's Almanac | " in out  # the book's first line, continued
    code, out, _ = run(capsys, home, "generate", "tiny", "--prompt", "The keeper", "--max-new-tokens", "20", "--seed", "1")
    assert code == 0 and out.startswith("The keeper") and len(out) > len("The keeper\n")
    code, out, _ = run(capsys, home, "eval", "tiny", "--book", str(book))
    result = json.loads(out)
    assert code == 0 and {"val_loss", "bits_per_byte", "perplexity", "unigram_bits_per_byte"} <= set(result)
    code, out, _ = run(capsys, home, "list")
    assert "tiny" in out and "30 steps" in out


def test_errors_are_one_line_messages_with_exit_code_2(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path, "create", "bad", "--d-model", "130", "--num-heads", "4")
    assert code == 2 and "divisible by num_heads" in err and "Traceback" not in err
    code, _, err = run(capsys, tmp_path, "create", "../up", "--preset", "small")
    assert code == 2 and "invalid model name" in err
    code, _, err = run(capsys, tmp_path, "generate", "ghost", "--prompt", "hi")
    assert code == 2 and "no model named 'ghost'" in err
    code, _, err = run(capsys, tmp_path, "train", "ghost", "--book", "missing.txt")
    assert code == 2 and "ghost" in err


def test_a_seed_past_2_63_is_the_same_error_as_in_the_web_api(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path, "create", "s", "--preset", "small", "--seed", str(2**63))
    assert code == 2 and f"seed must be between 0 and {2**63 - 1}, got {2**63}" in err and "Traceback" not in err


def test_export_writes_a_folder_transformers_reads_and_refuses_to_overwrite(trained, tmp_path, capsys):
    store, name = trained
    out = tmp_path / "exports" / "tiny-hf"
    code, printed, _ = run(capsys, store.home, "export", name, "--format", "hf", "--out", str(out))
    assert code == 0 and str(out) in printed and (out / "config.json").exists()
    code, _, err = run(capsys, store.home, "export", name, "--format", "hf", "--out", str(out))
    assert code == 2 and "--force" in err
    assert run(capsys, store.home, "export", name, "--format", "hf", "--out", str(out), "--force")[0] == 0
    code, _, err = run(capsys, store.home, "export", name, "--format", "peft", "--out", str(tmp_path / "p"))
    assert code == 2 and "--adapter" in err


def test_home_is_accepted_after_the_command_too(tmp_path, capsys):
    assert cli.main(["create", "t", "--d-model", "32", "--num-heads", "2", "--home", str(tmp_path)]) == 0
    assert cli.main(["list", "--home", str(tmp_path)]) == 0
    assert (tmp_path / "models" / "t").is_dir() and "t " in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and config.VERSION in capsys.readouterr().out


def test_every_flag_says_what_it_does_and_its_default():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    vague = [f"{name} {a.dest}" for name, c in commands.items() for a in c._actions
             if not isinstance(a, argparse._HelpAction) and a.option_strings
             and not (a.help and ("default" in a.help or "required" in a.help))]
    unnamed = [f"{name} {a.dest}" for name, c in commands.items() for a in c._actions if not a.option_strings and not a.help]
    assert vague == [] and unnamed == []
