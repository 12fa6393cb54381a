"""Command line: everything the web page does, from a terminal.

    python cli.py create tiny --preset small
    python cli.py train tiny --book books/example_book.txt --steps 1000
    python cli.py generate tiny --prompt "Once upon" --max-new-tokens 200
    python cli.py eval tiny --book books/example_book.txt
    python cli.py finetune tiny --book books/another.txt --nf4 --steps 500 --adapter tiny-ru
    python cli.py generate tiny --adapter tiny-ru --prompt "Once upon"
    python cli.py merge tiny --adapter tiny-ru --out tiny-ru-merged
    python cli.py list

Data lives under --home (default: $AZR_HOME, else this folder).
"""

import argparse
import json
import sys

import torch
from tqdm import tqdm

import azr_trainer
from hardware import pick_device
from lora import LoRAConfig, load_adapter, merge_adapter
from model import PRESETS, ModelConfig, SamplingConfig, param_count, stream
from store import Store
from tokenizer import BookError, prepare_tokens


def main(argv=None):
    args = build_parser().parse_args(argv)
    store = Store(args.home)
    try:
        return args.func(store, args) or 0
    except (ValueError, OSError) as e:  # StoreError, BookError and config errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def cmd_create(store, args):
    base = PRESETS[args.preset].to_dict() if args.preset else ModelConfig().to_dict()
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len", "dropout"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    cfg = ModelConfig.from_dict(base)
    store.create_model(args.name, cfg, seed=args.seed)
    print(f"created {args.name}: {param_count(cfg):,} parameters {json.dumps(cfg.to_dict())}")


def cmd_train(store, args):
    opts = {k: getattr(args, k) for k in ("steps", "batch_size", "learning_rate", "seq_len", "eval_every",
                                          "checkpoint_every", "seed", "device", "precision", "selfplay_every",
                                          "grad_accum", "warmup_steps", "compile") if getattr(args, k) is not None}
    tc = azr_trainer.TrainConfig.from_dict(opts)
    with ProgressBar() as bar:
        summary = azr_trainer.train(store, args.name, args.book, tc, on_event=bar.update)
    print(json.dumps(summary))


def cmd_finetune(store, args):
    opts = {k: getattr(args, k) for k in ("steps", "batch_size", "learning_rate", "seq_len", "eval_every",
                                          "checkpoint_every", "seed", "device", "precision", "warmup_steps")
            if getattr(args, k) is not None}
    tc = azr_trainer.TrainConfig.from_dict(opts)
    lc = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    targets=tuple(args.targets.split(",")), rslora=args.rslora, nf4=args.nf4)
    with ProgressBar() as bar:
        summary = azr_trainer.finetune(store, args.name, args.book, tc, args.adapter, lc, on_event=bar.update)
    p = summary["params"]
    print(f"trained {p['trainable']:,} of {p['total']:,} parameters ({100 * p['trainable'] / p['total']:.2f}%)")
    print(json.dumps(summary))


def cmd_merge(store, args):
    merge_adapter(store, args.name, args.adapter, args.out)
    print(f"created {args.out}: {args.name} with adapter {args.adapter} merged into its weights")


def cmd_resume(store, args):
    with ProgressBar() as bar:
        summary = azr_trainer.resume(store, args.name, on_event=bar.update, adapter=args.adapter)
    print(json.dumps(summary))


def cmd_generate(store, args):
    device = pick_device(args.device)
    model = load_adapter(store, args.name, args.adapter, device) if args.adapter else store.load_model(args.name, device)
    tok = store.tokenizer(args.name)
    if tok is None:
        raise ValueError(f"model {args.name!r} has no tokenizer yet: train it on a book first")
    sc = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        args.repetition_penalty, args.seed, args.stop)
    sys.stdout.write(args.prompt)
    for piece in stream(model, tok, args.prompt, sc, device):
        sys.stdout.write(piece["text"])
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_eval(store, args):
    """Bits/byte of a model on a book's validation split, next to the unigram baseline."""
    device = pick_device(args.device)
    model = load_adapter(store, args.name, args.adapter, device) if args.adapter else store.load_model(args.name, device)
    tok = store.tokenizer(args.name)
    if tok is None:
        raise ValueError(f"model {args.name!r} has no tokenizer yet: train it on a book first")
    name, text, _ = store.resolve_book(args.book)
    data = prepare_tokens(tok, {name: text}, store.home / "cache" / "tokens")
    byte_len = torch.from_numpy(tok.byte_lengths())
    T = model.config.max_seq_len
    result = azr_trainer.evaluate_bpb(model, data["val"], byte_len, T, args.windows, device)
    result["bits_per_byte"] = result.pop("val_bpb")
    result["perplexity"] = result.pop("val_ppl")
    result["unigram_bits_per_byte"] = round(azr_trainer.unigram_bpb(data, byte_len), 5)
    result["val_tokens"] = len(data["val"])
    print(json.dumps(result))


def cmd_list(store, args):
    models = store.list_models()
    if args.json:
        print(json.dumps(models, indent=1))
        return
    if not models:
        print("no models yet: python cli.py create NAME --preset small")
    for m in models:
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
        store.delete_adapter(args.name, args.adapter)
        print(f"deleted adapter {args.adapter} of {args.name}")
        return
    store.delete_model(args.name)
    print(f"deleted {args.name}")


def cmd_add_book(store, args):
    with open(args.file, "rb") as f:
        print(json.dumps(store.add_book(args.name, f.read(), args.file)))


class ProgressBar:
    """tqdm bar driven by the trainer's events."""

    def __enter__(self):
        self.bar = None
        return self

    def update(self, e):
        if e["type"] == "start":
            self.bar = tqdm(total=e["total"], initial=e["step"], unit="step")
            tqdm.write(f"device {e['device']}, precision {e['precision']}, compiled {e.get('compiled')}, tokens {e['tokens']}")
        elif e["type"] == "step":
            self.bar.update(1)
            post = {"loss": f"{e['loss']:.3f}", "tok/s": f"{e['tokens_per_s']:.0f}"}
            if "val_bpb" in e:
                post["val_bpb"] = f"{e['val_bpb']:.3f}"
                tqdm.write(f"step {e['step']}: val loss {e['val_loss']:.4f}, bits/byte {e['val_bpb']:.4f}")
            if "selfplay" in e:
                post["reward"] = f"{e['selfplay'].get('reward', 0):.3f}"
            self.bar.set_postfix(post)
        elif e["type"] == "warning":
            tqdm.write(f"warning: {e['message']}", file=sys.stderr)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.close()


def build_parser():
    p = argparse.ArgumentParser(description="AZR Model Trainer: create, train and sample small GPTs on books.")
    p.add_argument("--home", help="data folder (default: $AZR_HOME or the project folder)")
    sub = p.add_subparsers(required=True, metavar="command")

    c = sub.add_parser("create", help="create a model")
    c.add_argument("name")
    c.add_argument("--preset", choices=sorted(PRESETS))
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"):
        c.add_argument("--" + key.replace("_", "-"), dest=key, type=int)
    c.add_argument("--dropout", type=float)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_create)

    t = sub.add_parser("train", help="train a model on one or more books")
    t.add_argument("name")
    t.add_argument("--book", action="append", required=True, help="book name or path (repeatable)")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--learning-rate", "--lr", type=float)
    t.add_argument("--seq-len", type=int)
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--selfplay-every", type=int, help="one self-play step after every N supervised steps (0 = off)")
    t.add_argument("--seed", type=int)
    t.add_argument("--device")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    t.add_argument("--compile", choices=["auto", "on", "off"], help="torch.compile the model (auto: long CPU runs)")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("finetune", help="LoRA/QLoRA fine-tuning on a new book: trains an adapter, not the model")
    f.add_argument("name")
    f.add_argument("--book", action="append", required=True, help="book name or path (repeatable)")
    f.add_argument("--adapter", required=True, help="name of the adapter to create")
    lc = LoRAConfig()
    f.add_argument("--lora-r", type=int, default=lc.r)
    f.add_argument("--lora-alpha", type=float, default=lc.alpha)
    f.add_argument("--lora-dropout", type=float, default=lc.dropout)
    f.add_argument("--targets", default=",".join(lc.targets), help="comma-separated layer names")
    f.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    f.add_argument("--nf4", action="store_true", help="keep the frozen base in 4-bit NF4 (QLoRA)")
    for flag, typ in (("--steps", int), ("--batch-size", int), ("--learning-rate", float), ("--seq-len", int),
                      ("--warmup-steps", int), ("--eval-every", int), ("--checkpoint-every", int), ("--seed", int),
                      ("--device", str)):
        f.add_argument(flag, type=typ)
    f.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    f.set_defaults(func=cmd_finetune)

    m = sub.add_parser("merge", help="a new model: the base with an adapter merged into its weights")
    m.add_argument("name")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True, help="name of the new model")
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("resume", help="continue an interrupted or stopped run")
    r.add_argument("name")
    r.add_argument("--adapter", help="resume this adapter's fine-tune instead")
    r.set_defaults(func=cmd_resume)

    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("name")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", help="stop when this string appears")
    g.add_argument("--device", default="auto")
    g.add_argument("--adapter", help="attach this LoRA adapter of the model")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="bits/byte on a book's validation split (JSON)")
    e.add_argument("name")
    e.add_argument("--book", required=True)
    e.add_argument("--windows", type=int, default=256, help="max windows of max_seq_len tokens to score")
    e.add_argument("--device", default="auto")
    e.add_argument("--adapter", help="attach this LoRA adapter of the model")
    e.set_defaults(func=cmd_eval)

    ls = sub.add_parser("list", help="models with params, steps, best val bpb")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    v = sub.add_parser("versions", help="a model's saved versions")
    v.add_argument("name")
    v.set_defaults(func=cmd_versions)

    rb = sub.add_parser("rollback", help="make a saved version current again")
    rb.add_argument("name")
    rb.add_argument("version")
    rb.set_defaults(func=cmd_rollback)

    d = sub.add_parser("delete", help="delete a model and its checkpoints (or only one of its adapters)")
    d.add_argument("name")
    d.add_argument("--adapter", help="delete only this LoRA adapter")
    d.set_defaults(func=cmd_delete)

    b = sub.add_parser("add-book", help="import a book file (any encoding, .txt/.fb2/.epub)")
    b.add_argument("name")
    b.add_argument("file")
    b.set_defaults(func=cmd_add_book)
    return p


if __name__ == "__main__":
    sys.exit(main())
