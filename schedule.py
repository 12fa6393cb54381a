"""The learning-rate schedule and the time budget.

The learning rate warms up linearly from near 0 to its peak (Adam's moment estimates are noisy in
the first steps, and a full-size step on them throws the weights far off), then comes down to a
tenth of its peak by the end of the run: along a cosine (Loshchilov & Hutter 2017, SGDR), or
warmup-stable-decay, flat at the peak until the run's last stretch and then a straight line down
(Hägele et al. 2024). A run with a wall-clock budget (--minutes) measures its progress in time
spent instead of steps taken (`Budget`), so the schedule ends when the time does.

A plateau in warmup-stable-decay's flat phase is not the end of learning: at the peak learning rate
val wanders around a level that only a lower rate gets below (in WSD the loss falls steeply during
the decay, Hägele et al. 2024; BENCHMARKS.md, issue 28, has a run flat for 3,600 steps that the decay
took 7 % lower). So early stopping there starts the decay instead of ending the run (`decay_now`):
the run so far becomes the flat part of a shorter run of the same shape.
"""

import collections
import math
import time
from dataclasses import replace

# warmup-stable-decay spends this share of the steps coming down from the peak (Hägele et al. 2024)
WSD_DECAY = 0.2
PACE_STEPS = 100  # a time budget's steps are re-fitted from the time per step of this many recent steps (Budget)


def lr_at(step, tc):
    """The learning rate of AdamW's groups at `step` (Muon's: muon_lr times the same share)."""
    return tc.learning_rate * lr_share(step, tc)


def lr_share(step, tc, time_share=None):
    """The schedule, as a share of the peak: linear warm-up to 1, then down to min_lr_ratio at the
    end, along a cosine (Loshchilov & Hutter 2017) or warmup-stable-decay: flat at the peak, then a
    straight line over the last WSD_DECAY of the run. The run's progress is its share of the steps,
    or, in a time budget, `time_share`, the share of the budget spent: the schedule then ends when
    the time does however the pace changes (other work on the machine, a laptop's heat), where a
    step count fitted from a pace would end early or late."""
    floor = tc.min_lr_ratio
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "wsd":
        return 1 - (1 - floor) * min(1.0, max(0.0, decay_progress(step, tc, time_share)))
    if time_share is None:
        progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    else:
        progress = time_share
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def decay_progress(step, tc, time_share=None):
    """How far warmup-stable-decay's straight line down has come at `step`: 0 where it starts, 1 at
    the end of the run, below 0 in the flat phase before it."""
    if time_share is None:
        decay_start = max(tc.warmup_steps, tc.steps * (1 - WSD_DECAY))
        return (step - decay_start) / max(1, tc.steps - decay_start)
    return (time_share - (1 - WSD_DECAY)) / WSD_DECAY


def at_peak(step, tc, time_share=None):
    """In warmup-stable-decay's flat phase: warmed up, not yet coming down."""
    return tc.schedule == "wsd" and step >= tc.warmup_steps and decay_progress(step, tc, time_share) < 0


def decay_now(step, tc, time_share=None):
    """`tc` shortened so that the decay starts at `step` (or at `time_share` of a time budget): what
    has run is the flat (1 - WSD_DECAY) of a run planned this long, and the decay its last WSD_DECAY."""
    if time_share is None:
        return replace(tc, steps=min(tc.steps, math.ceil(step / (1 - WSD_DECAY))))
    return replace(tc, minutes=tc.minutes * time_share / (1 - WSD_DECAY))


class Budget:
    """A wall-clock budget: its share spent drives the learning-rate schedule, so the schedule ends
    when the time does, and the run's length in steps is re-fitted from the measured time per step.
    The clock started when the run was created (tokenizer and token arrays count); a resumed run
    continues it from run.json."""

    def __init__(self, minutes, run_info, step):
        self.seconds, self.run_info = minutes * 60, run_info
        self.t0 = run_info.started if run_info.elapsed_s is None else time.time() - run_info.elapsed_s
        self.start_step = step
        # (step, time) every 10 steps from the 10th on, the last PACE_STEPS steps' worth: the pace
        self.marks = collections.deque(maxlen=PACE_STEPS // 10 + 1)

    def elapsed(self):
        return time.time() - self.t0

    def share(self):
        """How much of the budget is spent, 0..1: the schedule's clock (lr_share)."""
        return min(1.0, self.elapsed() / self.seconds)

    def over(self):
        return self.elapsed() >= self.seconds

    def fit(self, step, steps):
        """The run's length after `step` (what the page and the ETA show; the schedule follows the
        clock itself, share()), re-fitted every 10 steps from the time per step of the last
        PACE_STEPS steps (never the first 10: caches, allocations, compilation). The recent pace,
        not the run's average: on a machine that slows down an average promises steps that never come."""
        self.run_info.elapsed_s = round(self.elapsed(), 3)
        if self.over():
            return step
        done = step - self.start_step
        if done < 10 or done % 10:
            return steps
        self.marks.append((step, time.time()))
        if len(self.marks) < 2:
            return steps
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return step + max(1, int((self.seconds - self.elapsed()) / ((t1 - t0) / (s1 - s0))))
