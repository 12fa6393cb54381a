"""Keep-best and early stopping: what a run learns from its evaluations about when to end.

A small book is memorised after a few hundred steps, and from then on the validation loss climbs
again. So the run keeps the weights of its best evaluation on disk (best.safetensors) and ends on
them, and it stops early once the validation loss has clearly risen above its best for `patience`
evaluations in a row.

"Clearly" is STOP_RISE above the best. Counting every evaluation that is not a new best (plain
patience) stops runs that still have far to go: while the learning rate is high, val bits/byte
wanders by a fraction of a percent around a plateau that the schedule's low-lr end still breaks
through — and under a --minutes budget that high-lr stretch is long. A model that memorises its
book rises well above its best instead, and no later step undoes that. This is Prechelt's
"generalization loss" criterion (Early Stopping — But When?, 1998: stop when val is more than
alpha percent above its minimum), required for `patience` evaluations in a row.

With self-play on, the kept weights are not simply the lowest val bits/byte: among evaluations
within STOP_RISE of it, the one whose greedy continuations loop the least (`kept_better`).

The kept weights live in the run's folder: written at each new keeper (`save_kept`), put back at
the end of the run (`end_on_kept`), or at a plateau, where the run goes on with self-play
(`back_to_kept`).
"""

from dataclasses import dataclass

import distributed
from files import load_tensors, load_weights, save_tensors, weights_of

# early stopping counts an evaluation only when val bits/byte is this share above its best
STOP_RISE = 0.01


@dataclass
class Best:
    """A run's evaluations so far, as a checkpoint stores them (its metadata keys)."""
    run_best: list | None = None  # [val_bpb, step] of the run's best evaluation
    kept: list | None = None  # [val_bpb, step, greedy_repeats] of the weights keep-best holds
    stale_evals: int = 0  # evaluations in a row clearly above the best one

    @classmethod
    def from_meta(cls, meta):
        run_best = meta.get("run_best")
        kept = meta.get("kept") or (run_best and [*run_best, None])  # None: written before it was kept
        return cls(run_best, kept, meta.get("stale_evals", 0))

    def track(self, val_bpb, step, repeats=None):
        """Count evaluation `step` -> whether its weights are now the ones to keep."""
        if self.run_best is None or val_bpb < self.run_best[0]:
            self.run_best = [val_bpb, step]
        now = [val_bpb, step, repeats]
        better = kept_better(now, self.kept, self.run_best[0])
        if better:
            self.kept = now
        # an evaluation within STOP_RISE of the best (a plateau) resets the count: only a rise counts
        self.stale_evals = self.stale_evals + 1 if val_bpb > self.run_best[0] * (1 + STOP_RISE) else 0
        return better

    def early_stop(self, patience):
        """The last `patience` evaluations were all more than STOP_RISE above the best (0: never)."""
        return bool(patience) and self.stale_evals >= patience


def kept_better(now, kept, best_val):
    """Should keep-best hold the weights of evaluation `now` = [val_bpb, step, greedy_repeats]
    instead of `kept`? Without self-play (repeats None): when it is the best. With it: when it is
    within STOP_RISE of the best val, and `kept` no longer is or repeats itself more."""
    if kept is None:
        return True
    if now[2] is None:
        return now[0] == best_val and now[0] < kept[0]
    if now[0] > best_val * (1 + STOP_RISE):
        return False
    return kept[0] > best_val * (1 + STOP_RISE) or kept[2] is None or (now[2], now[0]) < (kept[2], kept[0])


# ----------------------------------------------------------------------------- the kept weights on disk


def save_kept(ckpt_dir, model, step):
    """Write the weights keep-best holds: the ones the run trains, and the step they are of."""
    save_tensors(ckpt_dir / "best.safetensors", weights_of(model, trainable_only=True), {"step": step})


def end_on_kept(best, ckpt_dir, model, step):
    """At the end of a run (rank 0): go back to the kept evaluation's weights if the last step's are
    not them. From here run_best names the weights the run ends with (the store records it)."""
    if best.kept and best.kept[1] != step:
        load_weights(model, load_tensors(ckpt_dir / "best.safetensors")[0], trainable_only=True)
    if best.kept:
        best.run_best = best.kept[:2]


def back_to_kept(best, ckpt_dir, model, weights=True):
    """A plateau: go back to the kept weights (with `weights`; DDP: every rank calls it, rank 0
    reads them and sends them) and start early stopping's count again, so that what the run does
    next ends it, as the plateau would have, if it costs likelihood."""
    best.stale_evals = 0
    if weights:
        kept = load_tensors(ckpt_dir / "best.safetensors")[0] if distributed.is_main() else None
        load_weights(model, distributed.broadcast(kept), trainable_only=True)
    best.kept = distributed.broadcast(best.kept)
