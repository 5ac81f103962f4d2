"""What logging one added blocker costs the event loop: the old setup against migblockd.logs.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_logging              # every setup, ~15 s
    .venv/bin/python -m benchmarks.bench_logging --quick      # smaller counts

Each setup runs in a child process of its own (logging is process-wide
state), with stderr on a temporary file, and logs the daemon's "added blocker"
record ``--count`` times from a coroutine, 32 records per event-loop turn (the
server's BATCH).  Reported per record:

* ``loop``: time on the event loop's thread in the logging call: wall clock,
  and the thread's own CPU time (the wall clock also counts waiting for the
  GIL while the writer thread formats);
* ``cpu``: the whole process's CPU time, the writer thread's formatting and
  writing included (in the new setup they move off the loop, not away);
* ``dropped``: records the writer could not keep up with (counted, reported);
* ``syscalls``: system calls per record on *all* threads, when run with
  ``--strace`` (needs strace(1)), for ``write``, ``getpid`` and ``futex``.

``before`` is the setup the daemon had until the logs package: ``basicConfig``
with ``%(process)d`` in the format, logging's default look-ups, a
StreamHandler writing each record on the calling thread.  ``after`` is
``logger.info`` with :func:`migblockd.logs.setup`'s writer thread, and
``quick`` the same setup through :func:`migblockd.logs.info`, as the daemon
logs its per-request records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from migblockd.logs import about, info, setup, shown
from migblockd.registry import Owner

MODES = "normal,cpr-reboot,cpr-transfer,cpr-exec"
REASON = "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature."
PER_TURN = 32
MODES_RUN = ("before", "after", "quick")


class Conn:
    def __init__(self) -> None:
        self.number = 17
        self.owner = Owner(pid=4242, uid=1000, gid=1000)
        self.label = "client 17 (pid 4242, uid 1000, gid 1000)"


async def log_adds(mode: str, count: int) -> tuple[float, float]:
    """Seconds spent in the logging calls on this (the loop's) thread: wall, CPU."""
    log = logging.getLogger("migblockd")
    conn = Conn()
    spent = cpu = 0.0
    for turn in range(count // PER_TURN):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for i in range(PER_TURN):
            blocker_id = f"b{turn}-{i}"
            if mode == "before":
                log.info("%s: added blocker %s (%s): %s", conn.label, blocker_id, MODES,
                         shown(REASON))
            elif mode == "after":
                log.info("%s: added blocker %s (%s): %s", conn.label,
                         shown(blocker_id, quoted=False), MODES, shown(REASON),
                         extra=about(conn, blocker_id=blocker_id))
            else:
                info(log, "%s: added blocker %s (%s): %s", conn.label,
                     shown(blocker_id, quoted=False), MODES, shown(REASON),
                     extra=about(conn, blocker_id=blocker_id))
        spent += time.perf_counter() - start
        cpu += time.thread_time() - start_cpu
        await asyncio.sleep(0)  # the end of a turn
    return spent, cpu


def child(mode: str, count: int) -> None:
    if mode == "before":
        logging.basicConfig(
            stream=sys.stderr, level=logging.INFO, force=True,
            format="%(asctime)s migblockd[%(process)d] %(levelname)s: %(message)s")
        installed = None
    else:
        installed = setup(logging.INFO)
    cpu = time.process_time()
    spent, loop_cpu = asyncio.run(log_adds(mode, count))
    if installed is not None:
        installed.close(timeout=60)  # everything written: the writer's work counts
    cpu = time.process_time() - cpu
    n = count // PER_TURN * PER_TURN
    print(json.dumps({"loop_us": spent / n * 1e6, "loop_cpu_us": loop_cpu / n * 1e6,
                      "cpu_us": cpu / n * 1e6, "records": n}))


def run(mode: str, count: int, strace: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "stderr.log")
        trace = os.path.join(tmp, "strace.txt")
        argv = [sys.executable, "-m", "benchmarks.bench_logging", "--child", mode,
                "--count", str(count)]
        if strace:
            argv = ["strace", "-f", "-c", "-o", trace, "-e", "trace=write,getpid,futex",
                    *argv]
        with open(log, "wb") as err:
            out = subprocess.run(argv, stderr=err, stdout=subprocess.PIPE, check=True).stdout
        result: dict[str, float] = json.loads(out)
        with open(log, encoding="utf-8") as f:
            text = f.read()
        # A producer that does nothing but log can outrun the writer: what it
        # drops is counted and reported, and must add up.
        written = text.count(": added blocker ")
        dropped = sum(int(n) for n in re.findall(r"WARNING: dropped (\d+) log record", text))
        if written + dropped != result["records"]:
            raise SystemExit(f"{mode}: {written} written + {dropped} dropped "
                             f"!= {result['records']} records")
        result["dropped"] = dropped
        if strace:
            with open(trace) as f:
                for line in f:
                    fields = line.split()
                    if len(fields) >= 5 and re.fullmatch(r"write|getpid|futex", fields[-1]):
                        result[fields[-1]] = int(fields[3]) / result["records"]
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--count", type=int, default=200_000,
                   help="log records written per measurement (default 200,000)")
    p.add_argument("--quick", action="store_true", help="20,000 records")
    p.add_argument("--strace", action="store_true", help="count system calls with strace")
    p.add_argument("--child", choices=MODES_RUN, help=argparse.SUPPRESS)
    args = p.parse_args()
    count = 20_000 if args.quick else args.count
    if args.child:
        child(args.child, count)
        return
    if args.strace and shutil.which("strace") is None:
        raise SystemExit("--strace needs strace(1)")
    print(f"Python {sys.version.split()[0]}, {count} records, {PER_TURN} per loop turn")
    header = f"{'setup':8} {'loop us':>8} {'loop cpu':>8} {'cpu us':>8} {'dropped':>8}"
    if args.strace:
        header += f" {'write':>8} {'getpid':>8} {'futex':>8}   (system calls per record)"
    print(header)
    for mode in MODES_RUN:
        r = run(mode, count, args.strace)
        row = (f"{mode:8} {r['loop_us']:8.2f} {r['loop_cpu_us']:8.2f} {r['cpu_us']:8.2f} "
               f"{r['dropped']:8.0f}")
        if args.strace:
            row += "".join(f" {r.get(k, 0.0):8.4f}" for k in ("write", "getpid", "futex"))
        print(row)


if __name__ == "__main__":
    main()
