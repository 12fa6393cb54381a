"""Training jobs for the web app: one at a time, in a worker thread, with their state on disk.

Training takes minutes to hours, far longer than a web request, so the server runs it in a
background thread and the page only *watches*: it polls `status()` and reads metrics.jsonl.
Closing or refreshing the tab changes nothing, because the job lives here, not in the browser.

Each job is a small JSON file, <home>/jobs/<id>.json, rewritten atomically as the job moves
queued -> running -> done | stopped | failed. A server that dies mid-run leaves the file saying
"running"; the next server to start reads it, knows no thread is running it any more, and marks
it *interrupted*. Resume then continues from the trainer's last checkpoint (runs.resume),
which restores weights, AdamW moments and RNGs, so nothing but the steps since it is lost.

A job is any function `fn(on_event, should_stop)`: the runner does not care whether it trains,
resumes or fine-tunes. Stop is cooperative: should_stop() turns True, the trainer notices before
its next micro-batch (or evaluation batch), saves a checkpoint and returns.
"""

import logging
import threading
import time
import uuid
from collections import deque

from app import records
from files import StoreError, hide_paths, write_json

LOG_EVENTS = 200  # events kept for the page's log panel (and saved in the job file)
SAVE_EVERY_S = 1.0  # progress is written to disk at most this often (state changes: always)
ACTIVE = ("queued", "running")
RESUMABLE = ("stopped", "interrupted", "failed")

log = logging.getLogger("azr.jobs")


class Busy(RuntimeError):
    """A job is already running: the server answers 409 with this message."""


class JobRunner:
    def __init__(self, store):
        self.store = store
        self.dir = store.home / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.stop_requested = threading.Event()
        self.thread = None
        self.damaged = []  # [{name, damaged}]: job files that could not be read, skipped
        for torn in self.dir.glob(".*.tmp"):  # a job file a kill -9 cut off mid-write; one server per home
            torn.unlink(missing_ok=True)  # writes here (as _load_latest assumes): no live writer's
        self.job = self._load_latest()
        self.events = deque(self.job["events"] if self.job else [], maxlen=LOG_EVENTS)
        self.seq = self.events[-1]["seq"] if self.events else 0
        self.saved_at = 0.0

    # ------------------------------------------------------------------ what the server calls
    def status(self, since=0):
        """A copy of the current job (or {"state": "idle"}) with the log events after `since`."""
        with self.lock:
            if self.job is None:
                return {"state": "idle", "seq": self.seq, "events": []}
            job = {k: v for k, v in self.job.items() if k != "events"}
            job["seq"] = self.seq  # the newest event's number: a page that saw more missed a restart
            job["events"] = [e for e in self.events if e["seq"] > since]
        return job

    def start(self, fields, fn):
        """Run fn(on_event, should_stop) as a new job described by `fields` (model, kind, ...)."""
        with self.lock:
            self._refuse_if_busy()
            self.job = {"id": uuid.uuid4().hex[:8], "created": time.time(), **fields}
            self.events.clear()
            self._launch(fn)
        return self.status()

    def resume(self, fn):
        """Run fn for the current job again (it was stopped, interrupted or failed)."""
        with self.lock:
            self._refuse_if_busy()
            if self.job is None or self.job["state"] not in RESUMABLE:
                state = self.job["state"] if self.job else "idle"
                raise Busy(f"there is no stopped or interrupted job to resume (the last job is {state})")
            self._launch(fn)
        return self.status()

    def stop(self):
        with self.lock:
            if not self.is_active():
                raise Busy("no training job is running")
            self.stop_requested.set()
            self._log({"type": "stop_requested"})
        return self.status()

    def is_active(self, model=None):
        active = self.job is not None and self.job["state"] in ACTIVE
        return active and (model is None or self.job["model"] == model)

    def join(self, timeout=None):
        """Wait for the worker thread (tests and shutdown)."""
        if self.thread:
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _launch(self, fn):
        self.stop_requested.clear()
        self.job.update(state="queued", error=None, finished=None, end_reason=None, started=time.time())
        self._save(force=True)
        self.thread = threading.Thread(target=self._work, args=(fn,), name=f"job-{self.job['id']}", daemon=True)
        self.thread.start()

    def _work(self, fn):
        try:
            result = fn(self._on_event, self.stop_requested.is_set)
            state, error = result.get("status", "done"), None
        except Exception as e:  # the job fails; the server goes on
            log.exception("training job failed")
            state, error = "failed", self._said(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        with self.lock:
            self.job.update(state=state, error=error, finished=time.time())
            if error and not (self.events and self.events[-1]["type"] == "failed"):
                self._log({"type": "failed", "error": error})  # the trainer logs its own failures
            self._save(force=True)

    def _on_event(self, e):
        """Trainer event -> job fields (what the progress bar shows) and, if notable, the log."""
        with self.lock:
            job = self.job
            if e["type"] == "start":
                job.update(state="running", run_id=e["run_id"], step=e["step"], total=e["total"])
            elif e["type"] == "step":
                self._progress(job, e)
            elif "end_reason" in e:  # done or stopped: steps done, budget spent, early stop, stopped by you
                job["end_reason"] = e["end_reason"]
            if self._notable(e):
                self._log(e)
            self._save(force=e["type"] != "step" or "val_bpb" in e)

    @staticmethod
    def _progress(job, e):
        # a self-play step after a plateau has no supervised loss
        job.update(step=e["step"], total=e["total"], loss=e.get("loss"), lr=e["lr"],
                   tokens_per_s=e["tokens_per_s"], eta_s=e["eta_s"])
        for key in ("val_loss", "val_bpb", "val_ppl", "elapsed_s", "budget_s"):  # the last two: budget runs
            if key in e:
                job[key] = e[key]
        if "selfplay" in e:
            job["repeat_rate"] = e["selfplay"]["repeat_rate"]
            job["reward"] = e["selfplay"].get("reward")  # where self-play reports one

    def _notable(self, e):
        """Every event but plain steps; of those, evaluations and one per 2 seconds. A self-play
        step is no reason: it comes every few steps and would flood the log (its numbers are in
        the status and the metrics)."""
        if e["type"] != "step" or "val_bpb" in e:
            return True
        last = self.events[-1] if self.events else None
        return last is None or last["type"] != "step" or time.time() - last["time"] >= 2.0

    def _log(self, e):
        self.seq += 1
        if "selfplay" in e:  # its example rollout is for the teaching view (metrics.jsonl), not the log
            e = {**e, "selfplay": {k: v for k, v in e["selfplay"].items() if k != "example"}}
        said = {k: self._said(v) for k, v in e.items() if k in ("error", "message")}
        self.events.append({"seq": self.seq, "time": round(time.time(), 3), **e, **said})

    def _said(self, message):
        """A message as the page may see it: no absolute path on the server in it."""
        return hide_paths(message, self.store.home)

    # ------------------------------------------------------------------ disk
    def _save(self, force=False):
        """Write the job file (atomically); plain progress at most every SAVE_EVERY_S seconds."""
        now = time.time()
        if force or now - self.saved_at >= SAVE_EVERY_S:
            self.job["updated"] = now
            write_json(self.dir / f"{self.job['id']}.json", {**self.job, "events": list(self.events)})
            self.saved_at = now

    def _load_latest(self):
        """The newest job file. One still marked queued/running was cut off by a server restart:
        no thread of ours runs it, so it is interrupted (and resumable)."""
        jobs = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                jobs.append(records.load(p, records.Job))
            except StoreError as e:  # damaged: the server starts without it, and /health lists it
                log.warning("ignoring job file %s: %s", p, e)
                self.damaged.append({"name": p.name, "damaged": f"{e}; the server skips it: delete the file"})
        if not jobs:
            return None
        job = max(jobs, key=lambda j: j.get("created", 0))
        job.setdefault("events", [])
        if job.get("state") in ACTIVE:
            job.update(state="interrupted", error="the server stopped while this job was running; "
                                                  "Resume continues from its last checkpoint")
            write_json(self.dir / f"{job['id']}.json", job)
        return job

    def _refuse_if_busy(self):
        if self.is_active():
            j = self.job
            raise Busy(f"a training job is already {j['state']} (model {j['model']!r}, step "
                       f"{j.get('step', 0)}/{j.get('total', '?')}); stop it or wait for it to finish")
