"""What ``--metrics`` costs the QMP path: add/del throughput while a scraper hammers it.

``python -m benchmarks.bench_metrics [--rounds N] [--duration S] [--baseline-command CMD]``

One daemon with ``--metrics`` on a Unix socket (durable state, as by default) is
measured with the load generator's ``adddel`` scenario (``benchmarks.loadgen``)
three ways, back to back in each round, the order rotating between rounds:

* ``idle``: nobody scrapes (the counters are still kept: they always are);
* ``1/s``: one scrape a second, already 15 times Prometheus's default interval;
* ``hammer``: scrapes back to back, as fast as the daemon answers them.

``--baseline-command`` adds a fourth: another daemon command without metrics
(say, a checkout from before the counters, ``env PYTHONPATH=DIR python -P -m
migblockd``), to see what the counting itself costs.  With two or more cores
the daemons are pinned to one core, the load generator and the scraper to
another.  The report shows, per way, the median round's requests/s, p50/p99
latency, the daemon's CPU time per request and how many scrapes were served.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"


def env() -> dict[str, str]:
    variables = dict(os.environ)
    variables["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), variables.get("PYTHONPATH", "")]))
    return variables


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_greeting(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
            if sock.recv(4096).startswith(b'{"QMP"'):
                return
        time.sleep(0.05)
    raise SystemExit(f"bench_metrics: no greeting on {path} (daemon exit {proc.poll()})")


@contextlib.contextmanager
def daemon(argv: list[str], workdir: Path, name: str,
           cpus: set[int] | None) -> Iterator[subprocess.Popen[bytes]]:
    sock = workdir / f"{name}.sock"
    argv = [*argv, "--socket", str(sock), "--log-level", "warning",
            "--state-dir", str(workdir / f"{name}-state")]
    with (workdir / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
    try:
        if cpus:
            os.sched_setaffinity(proc.pid, cpus)
        wait_for_greeting(sock, proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape_once(path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(SCRAPE)
        size = 0
        while chunk := sock.recv(1 << 16):
            size += len(chunk)
    return size


class Scraper(threading.Thread):
    """Scrapes ``path`` every ``interval`` seconds (0: back to back) until stopped."""

    def __init__(self, path: Path, interval: float) -> None:
        super().__init__(daemon=True)
        self.path, self.interval = path, interval
        self.done = threading.Event()
        self.scrapes = 0
        self.seconds = 0.0

    def run(self) -> None:
        start = time.monotonic()
        while not self.done.is_set():
            scrape_once(self.path)
            self.scrapes += 1
            if self.interval:
                self.done.wait(self.interval)
        self.seconds = time.monotonic() - start


def measure(sock: Path, pid: int, clients: int, warmup: float, duration: float,
            cpus: set[int] | None, scrape: tuple[Path, float] | None) -> dict[str, Any]:
    scraper = Scraper(*scrape) if scrape is not None else None
    if scraper is not None:
        scraper.start()
    loadgen = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.loadgen", "--socket", str(sock), "--scenario",
         "adddel", "--clients", str(clients), "--warmup", str(warmup), "--duration",
         str(duration)], cwd=REPO, env=env(), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(loadgen.pid, cpus)
    cpu_before = cpu_seconds(pid)
    out, _ = loadgen.communicate(timeout=warmup + duration + 60)
    cpu = cpu_seconds(pid) - cpu_before
    if scraper is not None:
        scraper.done.set()
        scraper.join(15)
    if loadgen.returncode != 0:
        raise SystemExit(f"bench_metrics: the load generator failed ({loadgen.returncode})")
    result: dict[str, Any] = json.loads(out)
    if result["errors"]:
        raise SystemExit(f"bench_metrics: error replies: {result['first_error']}")
    # CPU over the whole load generator run (warm-up included), per measured request.
    result["cpu_us"] = cpu * 1e6 / (result["rate"] * (warmup + duration))
    result["scrapes_per_s"] = scraper.scrapes / scraper.seconds if scraper else 0.0
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_metrics",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each figure is the median of its rounds (default 3)")
    parser.add_argument("--duration", type=float, default=2.5,
                        help="measured seconds per scenario and round (default 2.5)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds before each measurement (default 0.5)")
    parser.add_argument("--clients", type=int, action="append",
                        help="connections of the adddel scenario; repeatable (default 1 and 16)")
    parser.add_argument("--baseline-command", metavar="CMD",
                        help="also measure this daemon command (no --metrics)")
    args = parser.parse_args(argv)
    clients = args.clients or [1, 16]
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({cpus[0]}, {cpus[1]}) if len(cpus) > 1 else (None, None)
    workdir = Path(tempfile.mkdtemp(prefix="migblockd-bench-metrics-"))
    endpoint = workdir / "metrics.http"
    ways: dict[str, tuple[str, tuple[Path, float] | None]] = {
        "idle": ("metrics", None), "1/s": ("metrics", (endpoint, 1.0)),
        "hammer": ("metrics", (endpoint, 0.0))}
    if args.baseline_command:
        ways = {"baseline": ("baseline", None), **ways}
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    try:
        with contextlib.ExitStack() as stack:
            procs = {"metrics": stack.enter_context(daemon(
                [sys.executable, "-m", "migblockd", "--metrics", str(endpoint)], workdir,
                "metrics", server_cpus))}
            if args.baseline_command:
                procs["baseline"] = stack.enter_context(daemon(
                    shlex.split(args.baseline_command), workdir, "baseline", server_cpus))
            size = scrape_once(endpoint)
            print(f"{len(cpus)} cores; one scrape is {size:,} bytes; {args.rounds} rounds of "
                  f"{args.warmup:g} + {args.duration:g} s per way", flush=True)
            names = list(ways)
            for n in clients:
                for r in range(args.rounds):
                    for way in names[r % len(names):] + names[:r % len(names)]:
                        daemon_name, scrape = ways[way]
                        result = measure(workdir / f"{daemon_name}.sock",
                                         procs[daemon_name].pid, n, args.warmup,
                                         args.duration, client_cpus, scrape)
                        results.setdefault((n, way), []).append(result)
                        print(f"  adddel @{n:<3} round {r + 1} {way:<8} "
                              f"{result['rate']:>8,.0f} req/s  "
                              f"{result['scrapes_per_s']:.1f} scrapes/s",
                              flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'scenario':<11} {'way':<9} {'req/s':>8} {'vs idle':>8} {'p50':>7} {'p99':>7} "
          f"{'cpu/req':>8} {'scrapes/s':>9}")
    for n in clients:
        idle = statistics.median(r["rate"] for r in results[(n, "idle")])
        for way in ways:
            runs = sorted(results[(n, way)], key=lambda r: r["rate"])
            mid = runs[(len(runs) - 1) // 2]
            print(f"adddel @{n:<3} {way:<9} {mid['rate']:>8,.0f} {mid['rate'] / idle:>8.2f} "
                  f"{mid['p50_us']:>5.0f}us {mid['p99_us']:>5.0f}us {mid['cpu_us']:>6.1f}us "
                  f"{mid['scrapes_per_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
