"""A hostile run against a live server: everything a careless user, a broken disk and another
web page can throw at `python server.py`, at once, then a count of what survived.

    python -m bench.hostile_run              # the full run (several minutes)
    python -m bench.hostile_run --quick      # every phase once, small counts (about half a minute)
    python -m bench.hostile_run --kills 17 --parallel 50

It is a black box test: it starts `python server.py --home TMP --port FREE` on 127.0.0.1, talks
to it only over HTTP, and reads the server's own OpenAPI description to know what to attack, so a
field added tomorrow is attacked tomorrow without an edit here. The phases, each bounded in count
and time:

1. hostile names (path tricks, unicode, huge, empty) in every field that names a stored thing;
2. bad numbers (out of bounds, NaN, infinity, a fraction for a whole number) in every numeric field;
3. another site's page: writes with a foreign Origin/Referer, and DNS-rebinding Host headers;
4. generations whose clients hang up after a second;
5. creates, deletes, uploads, rollbacks and generations of the same names, in parallel;
6. damaged files of every kind written into the home, then a restart;
7. kill -9 of the server mid-training, restart, resume (once after tearing the newest checkpoint),
   with writes in flight at each kill.

Then, with the server stopped, every object in the home is opened with the project's own loaders
(the one import of project code): each model, version, adapter, book, checkpoint, run and job
file must load, nothing acknowledged may be missing, and no temp file may be left. Any 5xx is a
finding; so is an invalid name or number that is accepted, a cross-site write that is not refused,
a resume that does not start at its checkpoint, and a lost or unreadable object. The figures of
the last full run are in RELIABILITY.md.

This file is the run itself: its flags, its state and the table at the end. The attacks are in
hostile_phases.py, what they attack is read from the OpenAPI description by hostile_spec.py, each
request is sent and judged by hostile_http.py, and the server and the check of the store after
the run are in hostile_checks.py.
"""

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

# run as a script from bench/: the project, and this package, live one folder up
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hostile_checks import Server, check_store  # noqa: E402
from bench.hostile_http import Tally, answer, as_segment, send  # noqa: E402
from bench.hostile_phases import (abandoned_generations, bad_numbers, damaged_files, hostile_names,  # noqa: E402
                                  kill_cycles, other_sites, races, setup)
from bench.hostile_spec import fill_request  # noqa: E402


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="azr-hostile-"))
    run = HostileRun(tmp, args)
    try:
        run.all_phases()
    finally:
        run.server.stop()
        report = check_store(run)
        print_table(run, report, time.time() - t0)
        if args.keep:
            print(f"home kept: {run.server.home}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if run.tally.findings or report["lost"] or report["corrupt"] or report["leftovers"] else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every phase once, with small counts")
    p.add_argument("--parallel", type=int, default=None, help="requests in flight at once (10-50; default 32, quick 10)")
    p.add_argument("--kills", type=int, default=None, help="kill -9 of the server mid-training (default 17, quick 1)")
    p.add_argument("--abandoned", type=int, default=None, help="generations whose clients leave (default 40, quick 5)")
    p.add_argument("--race-rounds", type=int, default=None, help="rounds of 50 racing writes (default 10, quick 1)")
    p.add_argument("--names", type=int, default=None, help="hostile names tried per field (default all, quick 8)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting phases after this (default 9, quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temp home (and the server log) for a look")
    a = p.parse_args(argv)
    full = dict(parallel=32, kills=17, abandoned=40, race_rounds=10, names=None, max_minutes=9.0)
    quick = dict(parallel=10, kills=1, abandoned=5, race_rounds=1, names=8, max_minutes=2.0)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.parallel = min(max(a.parallel, 10), 50)
    return a


class HostileRun:
    """One run's state (the server, the client, the tally, what was planted, torn and killed) and
    the plumbing every phase shares: send a route a request, fire many at once, wait for the job."""

    def __init__(self, tmp, args):
        self.args, self.rng = args, random.Random(args.seed)
        self.server = Server(tmp / "home", tmp / "server.log")
        self.tally = Tally()
        self.kills, self.resumes = 0, []  # (newest intact checkpoint, step resumed at, warned if torn, killed on time)
        self.keep = {"models": {"t"}, "books": {"bk"}}  # acknowledged objects nobody deletes
        self.planted = {}  # path -> bytes of each damaged file we wrote
        self.torn = set()  # checkpoints we cut in half
        self.deadline = time.time() + 60 * args.max_minutes

    def all_phases(self):
        self.server.start()
        self.client = httpx.Client(base_url=self.server.url, timeout=60,
                                   limits=httpx.Limits(max_connections=self.args.parallel + 8))
        self.spec = self.client.get("/openapi.json").json()
        setup(self)
        for phase in (hostile_names, bad_numbers, other_sites, abandoned_generations, races, damaged_files,
                      kill_cycles):
            if time.time() > self.deadline:
                print(f"time is up: skipped {phase.__name__}", flush=True)
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {phase.__name__}", flush=True)
            phase(self)
            self.wait_idle()

    # ------------------------------------------------------------------------- plumbing

    def fire(self, group, jobs):
        """Run callables returning (response, as_expected), `parallel` at a time."""
        with ThreadPoolExecutor(self.args.parallel) as pool:
            for r, ok in pool.map(lambda f: f(), jobs):
                self.tally.add(group, r, ok)

    def send_op(self, method, path, op, override=None, headers=None):
        """One request to a route, every required field filled with a valid value, then `override`."""
        path_args, query, body = fill_request(self.spec, path, op, override or {})
        url = path.format(**{k: as_segment(v) for k, v in path_args.items()})
        return send(self.client, method, url, params=query, body=body, headers=headers)

    def status(self):
        r = send(self.client, "GET", "/training_status")
        return r.json() if answer(r) and r.status_code == 200 else {}

    def wait_idle(self, timeout=120, stop=True):
        if stop:
            send(self.client, "POST", "/stop_training")
        self.wait_until(lambda: self.status().get("state") not in ("queued", "running"), timeout)

    def wait_until(self, condition, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if condition():
                return True
            time.sleep(0.2)
        return False


# ----------------------------------------------------------------------------- the table


def print_table(run, report, wall_s):
    print("\n| case | requests | 2xx | 4xx | 5xx | no answer | checks | as expected |")
    print("|---|---|---|---|---|---|---|---|")
    total = Counter()
    for group, c in run.tally.counts.items():
        total.update(c)
        print(f"| {group} | {c['requests']} | {c['2xx']} | {c['4xx']} | {c['5xx']} | {c['no answer']} | "
              f"{c['checks']} | {c['as expected']}/{c['requests'] + c['no answer'] + c['checks']} |")
    print(f"| **total** | {total['requests']} | {total['2xx']} | {total['4xx']} | {total['5xx']} | "
          f"{total['no answer']} | {total['checks']} | {total['as expected']}/"
          f"{total['requests'] + total['no answer'] + total['checks']} |")
    resumed = sum(1 for e, s, *_ in run.resumes if e == s)
    print(f"\nkill -9 of the server: {run.kills}; resumed at the newest intact checkpoint: {resumed}/{len(run.resumes)} "
          f"(checkpoint steps {[e for e, *_ in run.resumes]}; torn newest checkpoint: "
          f"{sum(1 for r in run.resumes if r[2] is not None)}, warned: {sum(1 for r in run.resumes if r[2])})")
    print(f"damaged files planted: {len(run.planted) + 1} (and one torn checkpoint)")
    print(f"store objects opened: {sum(report['checked'].values())} ({dict(report['checked'])}); "
          f"lost: {len(report['lost'])}; corrupt: {len(report['corrupt'])}; temp files left: {len(report['leftovers'])}")
    print(f"server tracebacks in its log: {report['tracebacks']}; notes: {run.tally.notes}; wall: {wall_s:.0f} s")
    for line in report["lost"] + report["corrupt"] + report["leftovers"]:
        print(f"  store: {line}")
    print(f"odd numbers accepted (the schema allows them; 2xx): {len(run.tally.accepted)}")
    for a in run.tally.accepted:
        print(f"  ~ {a}")
    print(f"findings: {len(run.tally.findings)}")
    for f in run.tally.findings[:40]:
        print(f"  - {f}")


if __name__ == "__main__":
    sys.exit(main())
