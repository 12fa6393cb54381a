"""NF4 and LoRA (`python -m bench lora`): NF4 on a random matrix, then a base model trained on
one book and fine-tuned on another three ways (QLoRA, LoRA, full): quality, speed, memory."""

import copy
import json
import tempfile

import torch

import quant
from app import runs
from azr_trainer import TrainConfig
from hardware import pick_device
from model import PRESETS
from app.store import Store
from bench.common import BOOKS, SHAKESPEARE, timed_result


def run_lora(args):
    """NF4 on a random matrix, then a base trained on one book fine-tuned on another three
    ways (QLoRA, LoRA, full): val bits/byte on the new book, speed, memory. JSON on stdout."""
    device = pick_device(args.device)
    print(json.dumps({"matrix": nf4_matrix(device=device)}, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as home:
        result = lora_finetune(Store(home), str(BOOKS / "pride_and_prejudice.txt"), str(SHAKESPEARE), "small",
                               300, 150, str(device))
    print(json.dumps({"finetune": result, "threads": torch.get_num_threads()}, indent=1))


def nf4_matrix(n=4096, device="cpu"):
    """NF4 on a random N(0, 0.02^2) n x n matrix: bits, bytes, error and speed."""
    w = (torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    q, quantize_s = timed_result(lambda: quant.quantize_nf4(w))
    _, dequantize_s = timed_result(lambda: quant.dequantize_nf4(q, w.shape))
    plain = quant.quantize_nf4(w, double_quant=False)
    return {"shape": [n, n], "device": str(device), "bits_per_param": 8 * quant.tensor_bytes(q.values()) / w.numel(),
            "bytes_fp32": quant.tensor_bytes([w]), "bytes_nf4": quant.tensor_bytes(q.values()),
            **quant.quantization_error(w, q), "quantize_s": quantize_s, "dequantize_s": dequantize_s,
            "without_double_quant": {"bits_per_param": 8 * quant.tensor_bytes(plain.values()) / w.numel(),
                                     **quant.quantization_error(w, plain)}}


def lora_finetune(store, base_book, new_book, preset, base_steps, ft_steps, device):
    """Train a base on one book, then fine-tune it on another three ways (QLoRA, LoRA, full),
    with the same steps, batch and learning rate."""
    from lora import LoRAConfig, merge_lora
    store.create_model("base", PRESETS[preset])
    runs.train(store, "base", [base_book], TrainConfig(steps=base_steps, eval_every=base_steps, device=device))
    tok, fp = store.tokenizer("base"), store.load_model("base", device)

    def val_bpb(model):  # the same 128 windows of the new book's validation split every time
        return runs.evaluate_on_book(store, model, tok, new_book, 128, torch.device(device))["val_bpb"]

    nf4 = quant.quantize_model(copy.deepcopy(fp))
    out = {"base_val_bpb": val_bpb(fp), "base_nf4_val_bpb": val_bpb(nf4), "nf4": quant.nf4_report(fp, nf4)}
    store.create_model("full", fp.config, model=fp, tokenizer=tok)
    tc = TrainConfig(steps=ft_steps, eval_every=ft_steps, warmup_steps=20, device=device)
    for label, lc in (("qlora", LoRAConfig(nf4=True)), ("lora", LoRAConfig()), ("full", None)):
        events = []
        if lc:
            runs.finetune(store, "base", [new_book], tc, label, lc, on_event=events.append)
            model = store.adapters.load("base", label, device)
        else:
            runs.train(store, "full", [new_book], tc, on_event=events.append)
            model = store.load_model("full", device)
        steps = [e for e in events if e["type"] == "step"][1:]  # the first step pays for warm-up
        step_s = sum(tc.batch_size * fp.config.max_seq_len / e["tokens_per_s"] for e in steps)
        out[label] = {"val_bpb": val_bpb(model), "steps_per_s": len(steps) / step_s,
                      "params": events[0]["params"], "precision": events[0]["precision"]}
    out["qlora"]["merged_val_bpb"] = val_bpb(merge_lora(store.adapters.load("base", "qlora", device, nf4=False)))
    return out
