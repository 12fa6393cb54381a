"""Benchmarks: scripts that measure the library, never imported by it (`python -m bench MODE`).

A speed number alone says little: CPUs differ, and so does the load on a shared machine from one
minute to the next. So every row here is a *ratio* against a peer run in the same process, in
alternating rounds (A B, B A, A B ...), and we report the median of the per-round ratios: slow
drifts in load hit both sides. The peer of the speed rows is Hugging Face's `GPT2LMHeadModel`
with the identical configuration (sdpa attention, dropout 0, tied embeddings, torch AdamW with the
same hyperparameters, the same autocast). Results, with their date, machine and command, go in
BENCHMARKS.md.

    python -m bench [speed]     speed.py: train tokens/s, MFU, matmul-only ceiling, peak memory
                                (memory.py), generation (generation.py), NF4; --json, --quick
    python -m bench profile     profile.py: where the time of a step goes
    python -m bench lora        lora.py: NF4, and QLoRA / LoRA / full fine-tuning side by side
    python -m bench quality     quality.py: val bits/byte after a time budget (--sweep, --set)
    python -m bench quality --vs-nanogpt   vs_nanogpt.py: against nanoGPT's CPU recipe, its split
    python -m bench ddp         ddp.py: one process against N, the same global batch
    python -m bench views       views.py: each look-inside view through HTTP
    python -m bench latency     latency.py: the first streamed token of the web API
    python -m bench selfplay    selfplay_ab.py: the self-play A/B and its metrics
    python -m bench llamacpp    llamacpp.py: llama.cpp on our GGUF export against our model
    python -m bench.hostile_run hostile_run.py: everything a hostile client can throw at a live
                                server, at once, then a count of what survived (RELIABILITY.md);
                                the attacks in hostile_phases.py, their targets read from the
                                API by hostile_spec.py, requests and the tally in hostile_http.py,
                                the server and the store check after in hostile_checks.py

common.py holds what they share: the books (../shared/books beside the repository, never
committed), the peer, timing in rounds, the machine's description and the report tables.
"""
