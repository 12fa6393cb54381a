"""Does llama.cpp run our GGUF export the way we run the model? A check by the real consumer.

    pip install llama-cpp-python        # builds llama.cpp from source (cmake, a C++ compiler)
    python -m bench llamacpp [--steps 300] [--prompt "The keeper"] [--json]

Trains a small model on the example book (in a temp AZR_HOME), exports it as GGUF in f32, f16
and q8_0, loads each with llama-cpp-python and compares with our own model, on the same token
ids: the last position's logits after the prompt (max |difference|) and 20 greedy tokens. Also
whether llama.cpp's tokenizer (the "gpt-2" pre-tokenizer in the file) cuts the prompt into our
ids. Not part of the test suite: llama.cpp takes many minutes to build on 2 cores.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from app import export
from azr_trainer import TrainConfig
from generate import SamplingConfig, generate_ids
from model import ModelConfig
from app.runs import train
from app.store import Store

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(vocab_size=2000, d_model=128, num_layers=4, num_heads=4, d_ff=512, max_seq_len=128)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench llamacpp", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps of the model to export (default 300)")
    p.add_argument("--prompt", default="The keeper of the lighthouse", help="the prompt (default: a line of the book)")
    p.add_argument("--new-tokens", type=int, default=20, help="greedy tokens to compare (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    args = p.parse_args(argv)
    from llama_cpp import Llama  # here, so that --help works without it

    with tempfile.TemporaryDirectory() as home:
        store = Store(home)
        store.books.add("book", (ROOT / "books" / "example_book.txt").read_bytes(), "example_book.txt")
        store.create_model("m", CONFIG)
        train(store, "m", ["book"], TrainConfig(steps=args.steps, batch_size=16, precision="fp32", compile="off"))
        model, tok = store.load_model("m").eval(), store.tokenizer("m")
        ids = tok.encode(args.prompt)
        with torch.no_grad():
            ours_logits = model(torch.tensor([ids]))[0][0, -1].numpy()
        sc = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0)
        ours = [t for t, _ in generate_ids(model, torch.tensor([ids]), sc)]
        rows = []
        for dtype in ("f32", "f16", "q8_0"):
            path = export.export(store, "m", "gguf", Path(home) / f"m-{dtype}.gguf", dtype=dtype)
            llm = Llama(str(path), n_ctx=CONFIG.max_seq_len, logits_all=True, verbose=False, seed=0)
            llm.eval(ids)
            theirs_logits = np.asarray(llm.scores[len(ids) - 1])
            theirs = greedy(llm, ids, args.new_tokens)
            rows.append({"dtype": dtype, "max_logit_diff": float(np.abs(theirs_logits - ours_logits).max()),
                         "greedy_equal": theirs == ours, "tokens_matching": next_mismatch(theirs, ours),
                         "tokenizer_equal": llm.tokenize(args.prompt.encode(), add_bos=False) == ids})
    report = {"prompt": args.prompt, "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rows": rows}
    print(json.dumps(report, indent=1) if args.json else table(report))
    return report


def greedy(llm, ids, n):
    """n tokens, each the argmax of llama.cpp's logits after the ones before it."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def next_mismatch(a, b):
    """How many leading tokens agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def table(report):
    lines = [f"prompt {report['prompt']!r} ({report['prompt_tokens']} tokens), {report['new_tokens']} greedy tokens",
             f"{'dtype':6s} {'max |Δ logit|':>14s} {'greedy equal':>13s} {'leading equal':>14s} {'tokenizer equal':>16s}"]
    for r in report["rows"]:
        lines.append(f"{r['dtype']:6s} {r['max_logit_diff']:14.2e} {str(r['greedy_equal']):>13s} "
                     f"{r['tokens_matching']:>14d} {str(r['tokenizer_equal']):>16s}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
