"""Command line: everything the web page does, from a terminal.

    python cli.py create tiny --preset small
    python cli.py train tiny --book books/example_book.txt --steps 1000
    python cli.py generate tiny --prompt "Once upon" --max-new-tokens 200
    python cli.py eval tiny --book books/example_book.txt
    python cli.py finetune tiny --book books/another.txt --lora-nf4 --steps 500 --adapter tiny-ru
    python cli.py generate tiny --adapter tiny-ru --prompt "Once upon"
    python cli.py merge tiny --adapter tiny-ru --out tiny-ru-merged
    python cli.py export tiny --format hf --out exports/tiny-hf       # also gguf, or peft with --adapter
    python cli.py list
    torchrun --standalone --nproc_per_node 2 cli.py train tiny --book books/example_book.txt --steps 1000

Data lives under --home (default: $AZR_HOME, else this folder; ~/.azr when installed). The flags of create, train,
finetune and generate are the fields of ModelConfig, TrainConfig, LoRAConfig and SamplingConfig,
with their help, ranges and defaults taken from those dataclasses. Under torchrun, train,
finetune and resume run as one rank each (distributed.py); rank 0 alone prints.
"""

import argparse
import json
import os
import sys
from dataclasses import fields

from tqdm import tqdm

import config
import distributed
from app import export
from app import runs
from azr_trainer import TrainConfig
from generate import SamplingConfig, stream
from hardware import pick_device
from lora import LoRAConfig
from model import PRESETS, ModelConfig
from sizing import param_count
from app.store import HOME_HELP, Store


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        store = Store(args.home)
        with distributed.started(allowed=args.func in (cmd_train, cmd_finetune, cmd_resume)):
            return args.func(store, args) or 0
    except (ValueError, OSError) as e:  # StoreError, BookError and settings errors are ValueErrors
        where = f" (rank {os.environ['RANK']})" if distributed.launched() else ""
        print(f"error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- commands


def cmd_create(store, args):
    base = PRESETS[args.preset].to_dict() if args.preset else ModelConfig().to_dict()
    cfg = ModelConfig.from_dict({**base, **given(args, ModelConfig)})
    store.create_model(args.name, cfg, seed=args.seed)
    print(f"created {args.name}: {param_count(cfg):,} parameters {json.dumps(cfg.to_dict())}")


def cmd_train(store, args):
    tc = TrainConfig.from_dict(given(args, TrainConfig))
    with ProgressBar() as bar:
        summary = runs.train(store, args.name, args.book, tc, on_event=bar.update, allow_paths=True)
    show(json.dumps(summary))


def cmd_finetune(store, args):
    tc = TrainConfig.from_dict(given(args, TrainConfig))
    lc = config.build(LoRAConfig, given(args, LoRAConfig, "lora_"), "lora_")
    with ProgressBar() as bar:
        summary = runs.finetune(store, args.name, args.book, tc, args.adapter, lc, on_event=bar.update, allow_paths=True)
    p = summary["params"]
    show(f"trained {p['trainable']:,} of {p['total']:,} parameters ({100 * p['trainable'] / p['total']:.2f}%)")
    show(json.dumps(summary))


def cmd_merge(store, args):
    store.adapters.merge(args.name, args.adapter, args.out)
    print(f"created {args.out}: {args.name} with adapter {args.adapter} merged into its weights")


def cmd_export(store, args):
    out = export.export(store, args.name, args.format, args.out, args.adapter, args.dtype, args.force)
    print(f"wrote {out}")
    if args.format == "gguf":
        print(f"wrote {export.modelfile_of(out)} (for Ollama: ollama create {args.name} -f {export.modelfile_of(out)})")


def cmd_resume(store, args):
    with ProgressBar() as bar:
        summary = runs.resume(store, args.name, on_event=bar.update, adapter=args.adapter, changed_data=args.changed_data)
    show(json.dumps(summary))


def show(line):
    """Print a result; on several processes, once (rank 0)."""
    if distributed.is_main():
        print(line)


def cmd_generate(store, args):
    device = pick_device(args.device)
    model, tok = load_for_generation(store, args.name, args.adapter, device)
    sc = config.build(SamplingConfig, given(args, SamplingConfig))
    sys.stdout.write(args.prompt)
    for text, _, _ in stream(model, tok, args.prompt, sc, device):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_eval(store, args):
    """Bits/byte of a model on a book's validation split, next to the unigram baseline."""
    device = pick_device(args.device)
    model, tok = load_for_generation(store, args.name, args.adapter, device)
    r = runs.evaluate_on_book(store, model, tok, args.book, args.windows, device, allow_path=True)
    print(json.dumps({"val_loss": r["val_loss"], "bits_per_byte": r["val_bpb"], "perplexity": r["val_ppl"],
                      "unigram_bits_per_byte": r["unigram_bpb"], "val_tokens": r["val_tokens"]}))


def load_for_generation(store, name, adapter, device):
    model = store.adapters.load(name, adapter, device) if adapter else store.load_model(name, device).eval()
    tok = store.tokenizer(name)
    if tok is None:
        raise ValueError(f"model {name!r} has no tokenizer yet: train it on a book first")
    return model, tok


def cmd_list(store, args):
    models = store.list_models()
    if args.json:
        print(json.dumps(models, indent=1))
        return
    if not models:
        print("no models yet: python cli.py create NAME --preset small")
    for m in models:
        if "damaged" in m:
            print(f"{m['name']:24s} damaged: {m['damaged']}")
            continue
        bpb = f"{m['best_val_bpb']:.4f}" if m["best_val_bpb"] is not None else "-"
        print(f"{m['name']:24s} {m['params']:>12,} params  {m['steps']:>7} steps  best val bpb {bpb}")


def cmd_versions(store, args):
    for v in store.lineage(args.name).get("versions", []):
        print(json.dumps(v))


def cmd_rollback(store, args):
    store.rollback(args.name, args.version)
    print(f"{args.name} is now at {args.version}")


def cmd_delete(store, args):
    if args.adapter:
        store.adapters.delete(args.name, args.adapter)
        print(f"deleted adapter {args.adapter} of {args.name}")
        return
    store.delete_model(args.name)
    print(f"deleted {args.name}")


def cmd_add_book(store, args):
    with open(args.file, "rb") as f:
        print(json.dumps(store.books.add(args.name, f.read(), args.file)))


class ProgressBar:
    """tqdm bar driven by the trainer's events."""

    def __enter__(self):
        self.bar = None
        return self

    def update(self, e):
        if not distributed.is_main():  # on several processes, rank 0's progress alone
            return
        if e["type"] == "start":
            self.bar = tqdm(total=e["total"], initial=e["step"], unit="step")
            tqdm.write(f"device {e['device']}, precision {e['precision']}, tokens {e['tokens']}; "
                       f"torch.compile {'on' if e.get('compiled') else 'off'}: {e.get('compile_reason')}")
        elif e["type"] == "step":
            self.bar.total = e["total"]  # a time budget re-fits it; a plateau brings the end in
            self.bar.update(1)
            # after a plateau a step is self-play alone: no supervised loss (its repeat rate is below)
            post = {"loss": f"{e['loss']:.3f}"} if "loss" in e else {}
            post["tok/s"] = f"{e['tokens_per_s']:.0f}"
            if "val_bpb" in e:
                post["val_bpb"] = f"{e['val_bpb']:.3f}"
                tqdm.write(f"step {e['step']}: val loss {e['val_loss']:.4f}, bits/byte {e['val_bpb']:.4f}")
            if "sample" in e:
                one_line = (e["sample"]["prompt"] + " | " + e["sample"]["text"]).replace("\n", "\\n")
                tqdm.write(f"step {e['step']} sample: {one_line}")
            if "selfplay" in e:
                post["repeats"] = f"{e['selfplay']['repeat_rate']:.3f}"
            self.bar.set_postfix(post)
        elif e["type"] == "warning":
            tqdm.write(f"warning: {e['message']}", file=sys.stderr)
        elif e["type"] == "info":
            tqdm.write(e["message"])

    def __exit__(self, *exc):
        if self.bar:
            self.bar.close()


# ----------------------------------------------------------------------------- flags


def add_settings(parser, cls, prefix="", skip=()):
    """One flag per field of a settings dataclass, --<prefix><field>, with the field's help,
    range and default; a flag left out keeps the dataclass default."""
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, _ = config.field_type(cls, f)
        flag = "--" + (prefix + f.name).replace("_", "-")
        opts = {"dest": prefix + f.name, "default": None, "help": config.help_text(f)}
        if kind is bool:
            opts["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            opts.update(type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()), metavar="A,B")
        else:
            opts.update(type=kind, choices=f.metadata["choices"], metavar=None if f.metadata["choices"] else kind.__name__.upper())
        parser.add_argument(flag, **opts)


def given(args, cls, prefix=""):
    """The fields of `cls` that were given on the command line."""
    return {f.name: getattr(args, prefix + f.name) for f in fields(cls) if getattr(args, prefix + f.name, None) is not None}


def build_parser():
    p = argparse.ArgumentParser(description="AZR Model Trainer: create, train and sample small GPTs on books.")
    p.add_argument("--version", action="version", version=f"AZR Model Trainer {config.VERSION}")
    home = argparse.ArgumentParser(add_help=False)  # --home before or after the command
    home.add_argument("--home", default=argparse.SUPPRESS, help=HOME_HELP)
    p.add_argument("--home", default=None, help=HOME_HELP)
    sub = p.add_subparsers(required=True, metavar="command")

    def command(name, func, help_):
        c = sub.add_parser(name, help=help_, parents=[home])
        c.set_defaults(func=func)
        return c

    c = command("create", cmd_create, "create a model")
    c.add_argument("name", help=NAME_HELP)
    c.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset; the flags below change it (default: the defaults below)")
    add_settings(c, ModelConfig)
    c.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")

    t = command("train", cmd_train, "train a model on one or more books")
    t.add_argument("name", help=NAME_HELP)
    t.add_argument("--book", action="append", required=True, help="book name or path (repeatable; required)")
    add_settings(t, TrainConfig)

    f = command("finetune", cmd_finetune, "LoRA/QLoRA fine-tuning on a new book: trains an adapter, not the model")
    f.add_argument("name", help=NAME_HELP)
    f.add_argument("--book", action="append", required=True, help="book name or path (repeatable; required)")
    f.add_argument("--adapter", required=True, help="name of the adapter to create (required)")
    add_settings(f, LoRAConfig, prefix="lora_")
    add_settings(f, TrainConfig, skip={"selfplay_every"})

    m = command("merge", cmd_merge, "a new model: the base with an adapter merged into its weights")
    m.add_argument("name", help=NAME_HELP)
    m.add_argument("--adapter", required=True, help="the adapter to merge (required)")
    m.add_argument("--out", required=True, help="name of the new model (required)")

    r = command("resume", cmd_resume, "continue an interrupted or stopped run")
    r.add_argument("name", help=NAME_HELP)
    r.add_argument("--adapter", help="resume this adapter's fine-tune instead (default: the model's own run)")
    r.add_argument("--changed-data", action="store_true",
                   help="resume although a book's text changed since the run started (the lineage records it; default off)")

    g = command("generate", cmd_generate, "continue a prompt")
    g.add_argument("name", help=NAME_HELP)
    g.add_argument("--prompt", default="", help="text to continue (default: empty)")
    add_settings(g, SamplingConfig)
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--adapter", help=ADAPTER_HELP)

    e = command("eval", cmd_eval, "bits/byte on a book's validation split (JSON)")
    e.add_argument("name", help=NAME_HELP)
    e.add_argument("--book", required=True, help="book name or path (required)")
    e.add_argument("--windows", type=int, default=256, help="max windows of max_seq_len tokens to score (default 256)")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--adapter", help=ADAPTER_HELP)

    ls = command("list", cmd_list, "models with params, steps, best val bpb")
    ls.add_argument("--json", action="store_true", help="print JSON (default: a table)")

    v = command("versions", cmd_versions, "a model's saved versions")
    v.add_argument("name", help=NAME_HELP)

    rb = command("rollback", cmd_rollback, "make a saved version current again")
    rb.add_argument("name", help=NAME_HELP)
    rb.add_argument("version", help="a saved version, e.g. v001 (see `versions`)")

    d = command("delete", cmd_delete, "delete a model and its checkpoints (or only one of its adapters)")
    d.add_argument("name", help=NAME_HELP)
    d.add_argument("--adapter", help="delete only this LoRA adapter (default: the whole model)")

    b = command("add-book", cmd_add_book, "import a book file (any encoding, .txt/.fb2/.epub)")
    b.add_argument("name", help="name of the book in the data folder")
    b.add_argument("file", help="the book file to read")

    x = command("export", cmd_export, "write a model for transformers (hf), llama.cpp (gguf), or an adapter for PEFT")
    x.add_argument("name", help=NAME_HELP)
    x.add_argument("--format", required=True, choices=export.FORMATS, help="hf: a save_pretrained folder; gguf: one "
                   "file for llama.cpp, and a .Modelfile beside it for Ollama; peft: the --adapter as a PEFT folder (required)")
    x.add_argument("--out", required=True, help="the folder (hf, peft) or .gguf file to write (required)")
    x.add_argument("--adapter", help="the LoRA adapter to export, with --format peft (default: none)")
    x.add_argument("--dtype", default="f32", choices=list(export.DTYPES), help="f32, f16, or q8_0 for gguf (default f32)")
    x.add_argument("--force", action="store_true", help="replace an earlier export at --out (default: refuse)")
    return p


NAME_HELP = "the model's name"
DEVICE_HELP = "auto, cpu, cuda or mps (default auto: the fastest there is)"
ADAPTER_HELP = "attach this LoRA adapter of the model (default: none)"


if __name__ == "__main__":
    sys.exit(main())
