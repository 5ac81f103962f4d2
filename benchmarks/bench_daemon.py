"""The daemon benchmark: migblockd against a floor and a ceiling server, in the same run.

``python -m benchmarks.bench_daemon [--duration S] [--rounds N] [--quick] [--json FILE]``

It starts, as subprocesses on temporary Unix sockets:

* the daemon, ``python -m migblockd --socket TMP --state-dir TMP`` (durable, the
  default, and at the default log level, info);
* the same daemon with ``--ephemeral`` (no state on disk);
* the floor, ``python -m benchmarks.floor``: asyncio streams, ``readline()`` +
  ``json.loads()`` per request, reply ``{"return": {}, "id": ID}``, no events;
* the ceiling, ``python -m benchmarks.ceiling``: an asyncio Protocol that also
  fans a small event out to every client on add/del, with one write per client
  per loop turn; and, when the optional ``uvloop`` is installed, the same on uvloop.

then seeds them with the same ten blockers and, for every scenario, runs the
load generator (``benchmarks.loadgen``, a separate process) against each server
the scenario compares, back to back, for ``--rounds`` rounds (the order reverses
every other round).  A ratio such as daemon / ceiling is computed per round, from
runs seconds apart, and the report shows its median over the rounds (see
``benchmarks.report``); the targets are ratios because both servers suffer the
same client and the same machine.

Last, the scale scenario (``benchmarks.scale``): a daemon restored from a state
directory holding 100,000 blockers, ``query-blockers`` after changes, and
``query-version`` clients while one client polls and another adds.

With two or more cores the servers are pinned to one core and the load
generators to another (``--no-pin`` to let the scheduler place them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import scale
from benchmarks.ceiling import uvloop_available
from benchmarks.report import (
    BASELINE_FALL,
    Check,
    Outcome,
    Scenario,
    baseline_checks,
    checks,
    cpu_table,
    fmt_ms,
    fmt_rate,
    latency_table,
    ms_check,
    rate_table,
    read_baseline,
    scenario_json,
    starved,
)
from benchmarks.servers import (
    SEED_BLOCKERS,
    BenchError,
    Server,
    count_blockers,
    file_system,
    pinning,
    run_json,
    seed,
)

#: Most a scale-scenario query-blockers after a change may take, and an observer's p99.
SCALE_QUERY_US, SCALE_OBSERVER_P99_US = 100_000.0, 10_000.0


def scenarios(clients: int, connectors: int, uvloop: bool) -> list[Scenario]:
    simple = ("floor", "daemon")
    fanout = ("floor", "ceiling", *(("ceiling-uvloop",) if uvloop else ()), "daemon",
              "ephemeral")
    return [
        Scenario("query-1", "query-blockers @1", "query", 1, "req/s", simple),
        Scenario(f"query-{clients}", f"query-blockers @{clients}", "query", clients, "req/s",
                 simple, ratio_targets=(("daemon", "floor", 0.6),)),
        Scenario("adddel-1", "add+del-blocker @1", "adddel", 1, "req/s", fanout),
        Scenario(f"adddel-{clients}", f"add+del-blocker @{clients}", "adddel", clients,
                 "req/s", fanout,
                 ratio_targets=(("daemon", "floor", 0.25), ("daemon", "ceiling", 0.35),
                                ("daemon", "ephemeral", 0.7)),
                 p99_targets=(("daemon", 2000.0),)),
        Scenario(f"connect-{connectors}", f"connect cycle @{connectors}", "connect", connectors,
                 "conn/s", simple, ratio_targets=(("daemon", "floor", 0.8),)),
    ]


def run_loadgen(server: Server, scenario: Scenario, warmup: float, duration: float,
                cpus: set[int] | None) -> dict[str, Any]:
    assert server.proc is not None
    argv = ["-m", "benchmarks.loadgen", "--socket", str(server.socket),
            "--scenario", scenario.loadgen, "--clients", str(scenario.clients),
            "--warmup", str(warmup), "--duration", str(duration),
            "--server-pid", str(server.proc.pid)]  # its CPU over the measured window
    result = run_json(argv, cpus, warmup + duration + 60, f"{server.name} {scenario.label}",
                      server)
    rate = float(result["rate"])
    result["server_us"] = result["server_cpu"] * 1e6 / rate if rate > 0 else 0.0
    if result["errors"]:
        raise BenchError(
            f"{server.name} {scenario.label}: {result['errors']} error replies, first: "
            f"{result['first_error']}")
    if result["requests"] == 0:
        raise BenchError(f"{server.name} {scenario.label}: no request completed")
    return result


def commands(args: argparse.Namespace, state: Path) -> dict[str, list[str]]:
    """Each server's command line, without ``--socket``."""
    daemon = (shlex.split(args.daemon_command) if args.daemon_command
              else [sys.executable, "-m", "migblockd"])
    return {
        "floor": [sys.executable, "-m", "benchmarks.floor"],
        "ceiling": [sys.executable, "-m", "benchmarks.ceiling"],
        "ceiling-uvloop": [sys.executable, "-m", "benchmarks.ceiling", "--event-loop", "uvloop"],
        "daemon": [*daemon, "--state-dir", str(state / "daemon"), *args.daemon_arg],
        "ephemeral": [*daemon, "--ephemeral", *args.daemon_arg],
        "scale": [*daemon, "--state-dir", str(state / "scale"),
                  "--max-blockers", str(args.scale_blockers + 1000), *args.daemon_arg],
    }


@contextlib.contextmanager
def servers(names: Sequence[str], argvs: dict[str, list[str]], workdir: Path,
            cpus: set[int] | None) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for name in names:
            path = workdir / f"{name}.sock"
            server = Server(name, [*argvs[name], "--socket", str(path)], path,
                            workdir / f"{name}.log")
            started[name] = server
            server.start(cpus)
        yield started
    finally:
        for server in started.values():
            server.stop()


def run_rounds(args: argparse.Namespace, chosen: Sequence[Scenario], argvs: dict[str, list[str]],
               workdir: Path, server_cpus: set[int] | None,
               client_cpus: set[int] | None) -> list[Outcome]:
    names = [n for n in ("floor", "ceiling", "ceiling-uvloop", "daemon", "ephemeral")
             if any(n in s.servers for s in chosen)]
    outcomes = [Outcome(s, {n: [] for n in s.servers}) for s in chosen]
    daemons = [n for n in names if n in ("daemon", "ephemeral")]
    with servers(names, argvs, workdir, server_cpus) as running:
        for server in running.values():
            seed(server, args.blockers)
        for name in daemons:
            if (present := count_blockers(running[name])) != args.blockers:
                raise BenchError(f"{name} has {present} blockers after seeding {args.blockers}")
        for round_number in range(args.rounds):
            for outcome in outcomes:
                # Reverse the order every other round, so no server always follows another.
                order = outcome.scenario.servers
                for name in order if round_number % 2 == 0 else reversed(order):
                    outcome.runs[name].append(run_loadgen(
                        running[name], outcome.scenario, args.warmup, args.duration,
                        client_cpus))
                rates = "  ".join(f"{n} {fmt_rate(float(outcome.runs[n][-1]['rate']))}"
                                  for n in order)
                ratios = "  ".join(f"{a}/{b} {outcome.round_ratio(a, b, -1):.2f}"
                                   for a, b in outcome.scenario.ratios())
                print(f"  round {round_number + 1}: {outcome.scenario.label:<22} {rates} "
                      f"{outcome.scenario.unit}; {ratios}", flush=True)
        for name in daemons:
            if (present := count_blockers(running[name])) != args.blockers:
                raise BenchError(f"{name} has {present} blockers after the run, "
                                 f"expected {args.blockers}: add/del left some behind")
    return outcomes


def run_scale(args: argparse.Namespace, argvs: dict[str, list[str]], workdir: Path,
              state: Path, server_cpus: set[int] | None,
              client_cpus: set[int] | None) -> dict[str, Any]:
    started = time.monotonic()
    scale.preload(state / "scale", args.scale_blockers)  # the directory commands() names
    preload_seconds = time.monotonic() - started
    with servers(["scale"], argvs, workdir, server_cpus) as running:
        daemon = running["scale"]
        print(f"  scale: {args.scale_blockers:,} blockers stored in {preload_seconds:.1f} s, "
              f"restored by the daemon in {daemon.start_seconds:.1f} s", flush=True)
        argv = ["-m", "benchmarks.scale", "--socket", str(daemon.socket),
                "--repeat", str(args.scale_repeat), "--clients", str(args.clients),
                "--warmup", str(args.scale_warmup), "--duration", str(args.scale_duration)]
        result = run_json(argv, client_cpus, args.scale_duration + 600, "the scale scenario",
                          daemon)
        if (present := count_blockers(daemon)) != args.scale_blockers:
            raise BenchError(f"the scale daemon has {present} blockers after the run, "
                             f"expected {args.scale_blockers}")
    result.update(blockers=args.scale_blockers, start_seconds=daemon.start_seconds)
    return result


def scale_lines(r: dict[str, Any]) -> list[str]:
    def lat(d: dict[str, Any]) -> str:
        return (f"p50 {fmt_ms(d['p50_us'])}  p99 {fmt_ms(d['p99_us'])}  "
                f"max {fmt_ms(d['max_us'])}")

    obs, add, poll = r["observers"], r["adder"], r["poller"]
    lines = [
        f"scale: {r['blockers']:,} blockers (restored in {r['start_seconds']:.1f} s); "
        f"query-blockers answers {r['reply_bytes'] / 1e6:.1f} MB",
        f"  query-blockers after a change   {lat(r['after_change'])}  "
        f"({r['after_change']['samples']} samples)",
        f"  query-blockers, nothing changed {lat(r['unchanged'])}  "
        f"({r['unchanged']['samples']} samples)",
        f"  for {r['seconds']:.1f} s, one client polling query-blockers while another adds "
        f"and deletes:",
        f"    {obs['clients']} query-version clients  {fmt_rate(obs['rate']):>7} req/s  "
        f"{lat(obs)}",
        f"    adder                     {fmt_rate(add['rate']):>7} req/s  {lat(add)}",
        f"    poller                    {poll['requests']:>7} polls  {lat(poll)}  "
        f"({poll['sent']} sent, warm-up included)",
        f"    clients dropped: {r['dropped']}",
    ]
    lines += [f"      {count} x {drop}" for drop, count in Counter(r["drops"]).items()]
    return lines


def scale_checks(r: dict[str, Any]) -> list[Check]:
    changed, observers = r["after_change"], r["observers"]
    return [
        ms_check("scale: query-blockers after a change, p99", changed["p99_us"],
                 SCALE_QUERY_US),
        ms_check(f"scale: {observers['clients']} query-version clients, p99",
                 observers["p99_us"], SCALE_OBSERVER_P99_US),
        Check("scale: clients dropped", str(r["dropped"]), "= 0", r["dropped"] == 0),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_daemon",
        description="Benchmark migblockd against a minimal floor and a fan-out ceiling server, "
                    "same run; reports requests/s, latency p50/p99, the ratios and the scale "
                    "scenario.",
    )
    parser.add_argument("--duration", type=float, default=2.5,
                        help="measured seconds per scenario, server and round (default 2.5)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds before each measurement (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each ratio is the median of its per-round values "
                             "(default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 0.3 s per measurement, 1 round, 4 clients, "
                             "2,000 blockers in the scale scenario")
    parser.add_argument("--clients", type=int, default=16,
                        help="connections of the many-client scenarios (default 16)")
    parser.add_argument("--connectors", type=int, default=8,
                        help="parallel connectors of the connection scenario (default 8)")
    parser.add_argument("--blockers", type=int, default=10, choices=range(len(SEED_BLOCKERS) + 1),
                        metavar=f"0..{len(SEED_BLOCKERS)}",
                        help="blockers present during the run (default 10)")
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="run only the scenarios whose key starts with PREFIX "
                             "(query, adddel, connect, scale); repeatable")
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false",
                        help="leave out the ceiling on uvloop (left out anyway when uvloop "
                             "is not installed)")
    parser.add_argument("--scale-blockers", type=int, default=100_000, metavar="N",
                        help="blockers of the scale scenario (default 100000)")
    parser.add_argument("--scale-repeat", type=int, default=5, metavar="N",
                        help="add/query/query/delete/query cycles of the scale scenario "
                             "(default 5)")
    parser.add_argument("--scale-duration", type=float, default=8.0, metavar="S",
                        help="measured seconds of the scale scenario under load (default 8)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin servers and load generator to separate cores")
    parser.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the daemons' command lines; repeatable")
    parser.add_argument("--daemon-command", metavar="CMD",
                        help="run this instead of 'PYTHON -m migblockd' (e.g. another checkout's "
                             "venv, to compare two versions); --socket and --state-dir or "
                             "--ephemeral are appended")
    parser.add_argument("--state-parent", type=Path, metavar="DIR",
                        help="where the durable daemons' state directories go (default: a new "
                             "temporary directory); its file system decides what a commit costs")
    parser.add_argument("--baseline", type=Path, metavar="FILE",
                        help="an earlier run's --json file: each ratio of this run is a target, "
                             f"not met if it fell by more than {BASELINE_FALL:.0%}% of its value "
                             "there")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also save the results here")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 3 when a target is not met")
    args = parser.parse_args(argv)
    args.scale_warmup = 1.0
    if args.quick:
        args.duration, args.warmup, args.rounds = 0.3, 0.1, 1
        args.clients, args.connectors = min(args.clients, 4), min(args.connectors, 4)
        args.scale_blockers, args.scale_repeat = min(args.scale_blockers, 2000), 1
        args.scale_duration, args.scale_warmup = 0.5, 0.1
    if not (0 < args.duration <= 60 and 0 <= args.warmup <= 10 and 1 <= args.rounds <= 10):
        parser.error("need 0 < --duration <= 60, 0 <= --warmup <= 10, 1 <= --rounds <= 10")
    if not (1 <= args.clients <= 500 and 1 <= args.connectors <= 100):
        parser.error("need 1 <= --clients <= 500 and 1 <= --connectors <= 100")
    if not (1 <= args.scale_blockers <= 1_000_000 and 1 <= args.scale_repeat <= 100
            and 0 < args.scale_duration <= 300):
        parser.error("need 1 <= --scale-blockers <= 1000000, 1 <= --scale-repeat <= 100 and "
                     "0 < --scale-duration <= 300")
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench_daemon: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    def wanted(key: str) -> bool:
        return not args.only or any(key.startswith(p) for p in args.only)

    uvloop = args.uvloop and uvloop_available()
    chosen = [s for s in scenarios(args.clients, args.connectors, uvloop) if wanted(s.key)]
    with_scale = wanted("scale")
    if not chosen and not with_scale:
        raise BenchError(f"no scenario matches {args.only}")
    server_cpus, client_cpus = pinning(args.pin)
    # What changes the ratios themselves, so a baseline must have been measured alike:
    # pinning decides whether a server shares its core with its client (unpinned, the
    # ratios come out far higher), the blockers present the size of every query-blockers
    # answer, and the warm-up and window whether start-up costs fall into the figures
    # (--quick takes 0.1 s and 0.3 s), the file system the durable daemon commits to
    # (tmpfs or a disk: what its every change waits for) and the daemons' extra
    # arguments (another log level, another event loop).  A scenario's key already
    # names its clients.  The state directory is made below, in the same parent.
    parent = args.state_parent if args.state_parent is not None else Path(tempfile.gettempdir())
    settings = {"pinned": bool(server_cpus), "blockers": args.blockers,
                "warmup": args.warmup, "duration": args.duration,
                "state_file_system": file_system(parent), "daemon_args": args.daemon_arg}
    baseline = None
    if args.baseline is not None:  # before the run, which a bad file would waste
        try:
            baseline = read_baseline(args.baseline.read_text(), settings)
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot read --baseline {args.baseline}: {exc}") from exc
    workdir = Path(tempfile.mkdtemp(prefix="migblockd-bench-"))
    state = Path(tempfile.mkdtemp(prefix="migblockd-bench-state-", dir=args.state_parent))
    cores = os.cpu_count() or 0
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"Python {platform.python_version()} ({platform.python_implementation()}) on "
          f"{platform.system()} {platform.machine()}, {cores} cores{load}")
    pinned = "off"
    if server_cpus and client_cpus:
        pinned = f"servers on cpu {min(server_cpus)}, load generators on cpu {min(client_cpus)}"
    print(f"pinning: {pinned}; ceiling on uvloop: "
          f"{'yes' if uvloop else 'no (not installed, or --no-uvloop)'}")
    extra = f"; extra arguments {shlex.join(args.daemon_arg)}" if args.daemon_arg else ""
    print(f"daemon: default log level; durable state on {settings['state_file_system']}"
          f"{extra}")
    print(f"{args.rounds} round(s) x {args.warmup:g} s warm-up + {args.duration:g} s measured "
          f"per scenario and server; medians over rounds; {args.blockers} blockers present",
          flush=True)

    started = time.monotonic()
    outcomes: list[Outcome] = []
    scaled: dict[str, Any] | None = None
    try:
        argvs = commands(args, state)
        if chosen:
            outcomes = run_rounds(args, chosen, argvs, workdir, server_cpus, client_cpus)
        if with_scale:
            scaled = run_scale(args, argvs, workdir, state, server_cpus, client_cpus)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    elapsed = time.monotonic() - started

    found = checks(outcomes)
    if outcomes:
        for lines in (rate_table(outcomes), latency_table(outcomes), cpu_table(outcomes)):
            print()
            print("\n".join(lines))
    if scaled is not None:
        print()
        print("\n".join(scale_lines(scaled)))
        found += scale_checks(scaled)
    against = baseline_checks(outcomes, baseline) if baseline is not None else []
    all_met = all(c.met for c in (*found, *against))
    width = max((len(c.what) for c in (*found, *against)), default=0)
    if found:
        print("\ntargets (same run):")
        print("\n".join(c.line(width) for c in found))
    if baseline is not None:
        print(f"\ntargets against {args.baseline} (each ratio at least "
              f"{1 - BASELINE_FALL:.0%} of its value there):")
        print("\n".join(c.line(width) for c in against))
    busy = starved(outcomes)
    if busy:
        print(f"\nwarning: the machine was busy: neither server nor load generator kept its "
              f"core busy in {', '.join(busy)}; throughput ratios then measure the scheduler "
              f"more than the servers: compare the CPU ratios, or run again on a quiet machine")
    print(f"\ntotal {elapsed:.0f} s")

    if args.json is not None:
        report = {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "cores": cores,
            **settings,
            "rounds": args.rounds,
            "scenarios": [scenario_json(o) for o in outcomes],
            "scale": scaled,
            "targets": [{"what": c.what, "value": c.value, "goal": c.goal, "met": c.met}
                        for c in found],
            "baseline_targets": [{"what": c.what, "value": c.value, "goal": c.goal,
                                  "met": c.met} for c in against],
            "all_targets_met": all_met,
            "machine_busy": busy,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results saved to {args.json}")
    return 3 if args.check and not all_met else 0


if __name__ == "__main__":
    sys.exit(main())
