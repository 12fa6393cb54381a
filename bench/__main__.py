"""`python -m bench [mode] ...`: one command for every benchmark (bench/__init__.py lists them)."""

import argparse
import importlib
import json
import sys

import torch

from azr_trainer import TrainConfig
from bench.common import SHAKESPEARE, format_report
from bench.ddp import format_ddp, run_ddp
from bench.lora import run_lora
from bench.profile import run_profile
from bench.quality import run_quality
from bench.speed import FULL, run_speed
from bench.views import run_views


# the benchmarks with options of their own (`python -m bench NAME --help`): their modules, what they measure
OWN_OPTIONS = {"selfplay": ("selfplay_ab", "the self-play A/B"), "llamacpp": ("llamacpp", "llama.cpp on our GGUF export"),
               "latency": ("latency", "first-streamed-token latency of the web API")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in OWN_OPTIONS:
        return importlib.import_module(f"bench.{OWN_OPTIONS[argv[0]][0]}").main(argv[1:])
    if argv[:1] == ["quality"] and "--vs-nanogpt" in argv:  # nanoGPT's split and CPU recipe as the peer
        from bench import vs_nanogpt
        return vs_nanogpt.main([a for a in argv[1:] if a != "--vs-nanogpt"])
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "profile":
        return run_profile(args)
    if args.mode == "lora":
        return run_lora(args)
    if args.mode == "ddp":
        result = run_ddp(args)
        print(json.dumps(result, indent=1) if args.json else format_ddp(result))
        return result
    if args.mode == "quality":
        result = run_quality(args)
    elif args.mode == "views":
        result = run_views(args)
    else:
        result = run_speed(args)
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return result


def parser():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("mode", nargs="?", default="speed",
                   choices=["speed", "quality", "profile", "lora", "ddp", "views", *OWN_OPTIONS],
                   help="; ".join(f"{k}: {v}, see `python -m bench {k} --help`" for k, (_, v) in OWN_OPTIONS.items()))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--quick", action="store_true", help="tiny model, a few seconds: a smoke test")
    p.add_argument("--presets", default="small,medium")
    p.add_argument("--optimizers", default=TrainConfig.optimizer, help="profile: comma list of TrainConfig optimizers")
    p.add_argument("--precisions", default="auto", help="comma list, or auto: fp32 plus bf16 where native")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers even when installed")
    p.add_argument("--generate-only", action="store_true", help="speed: only the generation rows")
    p.add_argument("--rounds", type=int, help="speed: alternating rounds of training and of generation (default "
                                              f"{FULL['rounds']} and {FULL['gen_rounds']}); 1 for a quick look at large")
    p.add_argument("--compile", choices=["on", "off", "auto"],
                   help="our trainer's torch.compile setting; on (default, off with --quick) also times it "
                        "without, as 'eager'")
    p.add_argument("--minutes", type=float, default=5.0, help="quality: training time budget")
    p.add_argument("--book", default=str(SHAKESPEARE), help="quality: the book to train and validate on")
    p.add_argument("--sweep", action="store_true", help="quality: try each candidate in CANDIDATES")
    p.add_argument("--steps", type=int, help="quality: train exactly this many steps instead of filling --minutes; "
                                            "ddp: steps per run (default 20)")
    p.add_argument("--procs", default="1,2", help="ddp: numbers of processes to compare (the first is the baseline)")
    p.add_argument("--global-batch", type=int, help="ddp: windows per optimizer step over all processes "
                                                     "(default: twice the preset's batch of the speed mode)")
    p.add_argument("--calls", type=int, default=10, help="views: warm requests per view")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="quality: a TrainConfig change, e.g. --set learning_rate=3e-3 (repeatable)")
    return p


if __name__ == "__main__":
    main()
