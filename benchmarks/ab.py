"""A/B: two checkouts' daemons, interleaved, compared by CPU per request.

``python -m benchmarks.ab --a DIR --b DIR [--scenario adddel] [--clients 16]
[--runs 5] [--duration 3] [--ephemeral]``

The ratios of ``benchmarks.bench_daemon`` move by 15-30% between runs on a
shared machine, more than most single changes are worth.  The CPU a daemon
spends per request moves less, and its best over several runs less still.  So
this runs the load generator against the daemon of checkout A, then B, then B,
then A..., each time a fresh daemon (``python -m migblockd`` started in that
directory, so that its own code runs; durable in a new state directory unless
``--ephemeral``), and has the load generator read the daemon's user + system
CPU from /proc over its measurement window (``--server-pid``), the window its
requests are counted in: not the connections' set-up, nor the requests still
in flight when it closes.  It prints every run and, per side, the best, the
median and the worst CPU per request and rate; the best is the figure to
compare.  Last, a verdict: B's best against A's is called a difference only
when it exceeds how far either side's own runs spread (worst over best), the
noise of runs of one unchanged checkout.

Pinned like the main benchmark: the daemon on one core, the load generator on
another.  Both checkouts must accept ``--socket`` and ``--state-dir`` (or
``--ephemeral``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.loadgen import SCENARIOS
from benchmarks.servers import BenchError, Server, pinning, run_json


@dataclass
class Run:
    side: str
    rate: float
    p99_us: float
    cpu_us: float  # the daemon's CPU per request


def measure(side: str, checkout: Path, args: argparse.Namespace, workdir: Path,
            number: int) -> Run:
    server_cpus, client_cpus = pinning(not args.no_pin)
    sock = workdir / f"{side}{number}.sock"
    state = ["--ephemeral"] if args.ephemeral else [
        "--state-dir", str(workdir / f"{side}{number}.state")]
    daemon = Server(side, [sys.executable, "-m", "migblockd", "--socket", str(sock), *state],
                    sock, workdir / f"{side}{number}.log", cwd=checkout)
    daemon.start(server_cpus)
    assert daemon.proc is not None
    try:
        result = run_json(["-m", "benchmarks.loadgen", "--socket", str(sock),
                           "--scenario", args.scenario, "--clients", str(args.clients),
                           "--warmup", "0", "--duration", str(args.duration),
                           "--server-pid", str(daemon.proc.pid)],
                          client_cpus, args.duration + 60, f"{side} run {number}", daemon)
    finally:
        daemon.stop()
    if not result["requests"] or result["errors"]:
        raise BenchError(f"{side} run {number}: {result['requests']} requests, "
                         f"{result['errors']} errors ({result['first_error']})")
    used = result["server_cpu"] * result["seconds"]  # CPU seconds over the window
    return Run(side, result["rate"], result["p99_us"], used / result["requests"] * 1e6)


def cpu_per_request(runs: Sequence[Run], side: str) -> list[float]:
    """The side's CPU per request of every run, best (least) first."""
    return sorted(r.cpu_us for r in runs if r.side == side)


def spread(cpu: Sequence[float]) -> float:
    """How far the worst of a side's runs is above its best: the noise those runs show."""
    return cpu[-1] / cpu[0] - 1 if cpu and cpu[0] > 0 else 0.0


def summary(runs: Sequence[Run], side: str) -> str:
    cpu = cpu_per_request(runs, side)
    rate = sorted((r.rate for r in runs if r.side == side), reverse=True)
    return (f"{side}: CPU per request best {cpu[0]:.1f} us, median {statistics.median(cpu):.1f}"
            f" us, worst {cpu[-1]:.1f} us (spread {spread(cpu):.0%}); rate best "
            f"{rate[0]:,.0f}/s, median {statistics.median(rate):,.0f}/s")


#: Fewest runs per side whose spread says anything of the noise: one run has none.
LEAST_RUNS = 3


def verdict(runs: Sequence[Run]) -> str:
    """What the runs show: B's best CPU per request against A's, called a difference
    only when it is larger than the spread of either side's own runs.  Two runs of
    one checkout differ by that much with no change at all, so a smaller difference
    is not told apart from the machine's noise."""
    a, b = cpu_per_request(runs, "A"), cpu_per_request(runs, "B")
    if min(len(a), len(b)) < LEAST_RUNS:
        return (f"verdict: too few runs to tell a difference from the noise "
                f"(--runs {LEAST_RUNS} or more)")
    change, noise = b[0] / a[0] - 1, max(spread(a), spread(b))
    if abs(change) <= noise:
        return (f"verdict: no difference shown: B's best is {change:+.1%} of A's, inside "
                f"the {noise:.1%} its runs spread")
    return (f"verdict: B spends {abs(change):.1%} {'less' if change < 0 else 'more'} CPU per "
            f"request than A (best against best), beyond the {noise:.1%} its runs spread")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab",
        description="Compare two checkouts' daemons by CPU per request, in interleaved runs.")
    parser.add_argument("--a", type=Path, required=True, metavar="DIR", help="checkout A")
    parser.add_argument("--b", type=Path, required=True, metavar="DIR", help="checkout B")
    parser.add_argument("--scenario", choices=SCENARIOS, default="adddel",
                        help="the load generator's scenario (default adddel)")
    parser.add_argument("--clients", type=int, default=16,
                        help="connections, or parallel connectors for connect (default 16)")
    parser.add_argument("--runs", type=int, default=5, help="runs per side (default 5)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="measured seconds per run (default 3)")
    parser.add_argument("--ephemeral", action="store_true", help="run both with --ephemeral")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also save every run here")
    args = parser.parse_args(argv)
    # The load generator's own bounds, checked here before any daemon starts; a side
    # with no run has no best, median or worst to show.
    if not (1 <= args.runs <= 100 and 0 < args.duration <= 300 and 1 <= args.clients <= 1000):
        parser.error("need 1 <= --runs <= 100, 0 < --duration <= 300 and "
                     "1 <= --clients <= 1000")
    for checkout in (args.a, args.b):
        if not (checkout / "migblockd" / "__main__.py").is_file():
            parser.error(f"{checkout} is not a migblockd checkout")
    runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory(prefix="migblockd-ab-") as tmp:
            for number in range(args.runs):
                # A B, then B A: neither side always runs on a machine just warmed by the other.
                order = [("A", args.a), ("B", args.b)]
                for side, checkout in order if number % 2 == 0 else reversed(order):
                    run = measure(side, checkout.resolve(), args, Path(tmp), number)
                    runs.append(run)
                    print(f"  {side} run {number + 1}: {run.rate:8,.0f}/s  p99 {run.p99_us:7,.0f}"
                          f" us  CPU {run.cpu_us:6.1f} us per request", flush=True)
    except BenchError as exc:
        print(f"ab: {exc}", file=sys.stderr)
        return 1
    print(summary(runs, "A"))
    print(summary(runs, "B"))
    print(verdict(runs))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
