"""The daemon benchmark: migblockd against a floor server, in the same run.

``python -m benchmarks.bench_daemon [--duration S] [--rounds N] [--quick] [--json FILE]``

It starts two servers as subprocesses on temporary Unix sockets:

* the daemon, ``python -m migblockd --socket TMP --log-level warning``;
* the floor, ``python -m benchmarks.floor --socket TMP``: asyncio streams,
  ``readline()`` + ``json.loads()`` per request, reply ``{"return": {}, "id": ID}``.

then seeds both with the same ten blockers and, for every scenario, runs the
load generator (``benchmarks.loadgen``, a third process) against the floor and
then against the daemon, back to back, for ``--rounds`` rounds (which server
goes first alternates).  A round's ratio is daemon / floor of that round; the
report shows, per scenario, the round with the median ratio.  Pairing runs that
are seconds apart, and taking the median, keeps the ratio meaningful on a
machine whose other load comes and goes.  Both servers suffer the same client
and the same machine, which is why the targets are ratios.

With two or more cores the servers are pinned to one core and the load
generator to another (``--no-pin`` to let the scheduler place them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

#: The blockers present during the benchmark: reasons real QEMU call sites give.
SEED_BLOCKERS: tuple[tuple[str, list[str] | None], ...] = (
    ("The vmdk format used by node 'disk0' does not support live migration", ["normal"]),
    ("Migration disabled: vhost lacks VHOST_F_LOG_ALL feature.", ["normal"]),
    ("0000:01:00.0: Migration is disabled for VFIO device", ["normal"]),
    ("State blocked by non-migratable CPU device (invtsc flag)", None),
    ("SEV: Migration is not implemented", None),
    ("Migration is disabled when using feature 'peer mode' in device 'ivshmem'", None),
    ("Migration disabled: TPM emulator does not support migration", None),
    ("Memory region pc.ram is not compatible with CPR. share=on is required for "
     "memory-backend objects, and aux-ram-share=on is required.", ["cpr-transfer"]),
    ("CPR does not support vfio mdev 0000:02:00.0", ["cpr-transfer", "cpr-exec"]),
    ("Migration disabled: vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD.", ["normal"]),
)


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    loadgen: str   # the loadgen --scenario
    clients: int
    unit: str      # "req/s" or "conn/s"
    target: float | None = None


def scenarios(clients: int, connectors: int) -> list[Scenario]:
    return [
        Scenario("query-1", "query-blockers @1", "query", 1, "req/s"),
        Scenario(f"query-{clients}", f"query-blockers @{clients}", "query", clients, "req/s", 0.6),
        Scenario("adddel-1", "add+del-blocker @1", "adddel", 1, "req/s"),
        Scenario(f"adddel-{clients}", f"add+del-blocker @{clients}", "adddel", clients, "req/s",
                 0.25),
        Scenario(f"connect-{connectors}", f"connect cycle @{connectors}", "connect", connectors,
                 "conn/s", 0.8),
    ]


@dataclass
class Server:
    name: str
    argv: list[str]
    socket: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, cpus: set[int] | None) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=child_env(),
            )
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)
        wait_for_greeting(self)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} is not running (exit {code}):\n{self.log()[-3000:]}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far (Linux /proc; 0 elsewhere)."""
        if self.proc is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Outcome:
    scenario: Scenario
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def round_ratio(self, index: int) -> float:
        floor = float(self.runs["floor"][index]["rate"])
        return float(self.runs["daemon"][index]["rate"]) / floor if floor > 0 else 0.0

    def median_round(self) -> int:
        """The round whose daemon/floor ratio is the median (the lower one of two)."""
        rounds = sorted(range(len(self.runs["floor"])), key=self.round_ratio)
        return rounds[(len(rounds) - 1) // 2]

    def shown(self, server: str) -> dict[str, Any]:
        """The run of ``server`` in the median round."""
        return self.runs[server][self.median_round()]

    def ratio(self) -> float:
        return self.round_ratio(self.median_round())


class BenchError(Exception):
    """The benchmark cannot go on; ``str()`` says why."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def wait_for_greeting(server: Server) -> None:
    """Ready = a connection gets a greeting line (works at any log level)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(str(server.socket))
                if sock.makefile("rb").readline().startswith(b'{"QMP"'):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{server.name} gave no greeting within {START_TIMEOUT:g} s:\n{server.log()}")


class SyncClient:
    """A blocking QMP client for seeding and checking (not for measuring)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.read()  # greeting
        self.execute("qmp_capabilities")

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise BenchError("server closed the connection")
        value: dict[str, Any] = json.loads(line)
        return value

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self.read()
            if "event" in reply:
                continue
            if "return" not in reply:
                raise BenchError(f"{command} failed: {reply}")
            return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def seed(server: Server, count: int) -> None:
    client = SyncClient(server.socket)
    try:
        for number, (reason, modes) in enumerate(SEED_BLOCKERS[:count]):
            args: dict[str, Any] = {"reason": reason, "id": f"bench-seed-{number}"}
            if modes is not None:
                args["modes"] = modes
            client.execute("add-blocker", args)
    finally:
        client.close()


def count_blockers(server: Server) -> int:
    client = SyncClient(server.socket)
    try:
        blockers = client.execute("query-blockers")
    finally:
        client.close()
    return len(blockers) if isinstance(blockers, list) else -1


def run_loadgen(server: Server, scenario: Scenario, warmup: float, duration: float,
                cpus: set[int] | None) -> dict[str, Any]:
    server.check_alive()
    argv = [
        sys.executable, "-m", "benchmarks.loadgen", "--socket", str(server.socket),
        "--scenario", scenario.loadgen, "--clients", str(scenario.clients),
        "--warmup", str(warmup), "--duration", str(duration),
    ]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=child_env())
    if cpus:
        with contextlib.suppress(OSError):  # it may already be done
            os.sched_setaffinity(proc.pid, cpus)
    cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
    try:
        out, err = proc.communicate(timeout=warmup + duration + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"load generator timed out on {server.name} {scenario.label}") from None
    if proc.returncode != 0:
        raise BenchError(
            f"load generator failed on {server.name} {scenario.label}:\n{err.decode()}\n"
            f"{server.name} log:\n{server.log()[-3000:]}")
    result: dict[str, Any] = json.loads(out)
    # Over the whole load generator run (set-up and warm-up included): a rough
    # "was the server the bottleneck" figure.
    wall = time.monotonic() - wall_before
    result["server_cpu"] = (server.cpu_seconds() - cpu_before) / wall if wall > 0 else 0.0
    if result["errors"]:
        raise BenchError(
            f"{server.name} {scenario.label}: {result['errors']} error replies, first: "
            f"{result['first_error']}")
    if result["requests"] == 0:
        raise BenchError(f"{server.name} {scenario.label}: no request completed")
    return result


def pinning(enabled: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server cpus, client cpus), or Nones when not pinning."""
    if not enabled or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_lat(result: dict[str, Any]) -> str:
    return f"{fmt_us(float(result['p50_us']))} / {fmt_us(float(result['p99_us']))}"


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f}ms" if us >= 10_000 else f"{us:.0f}us"


def table(outcomes: Sequence[Outcome]) -> list[str]:
    head = ("scenario", "unit", "floor", "daemon", "ratio", "floor p50 / p99",
            "daemon p50 / p99")
    rows = [head]
    for o in outcomes:
        f, d = o.shown("floor"), o.shown("daemon")
        rows.append((o.scenario.label, o.scenario.unit, fmt_rate(float(f["rate"])),
                     fmt_rate(float(d["rate"])), f"{o.ratio():.2f}", fmt_lat(f), fmt_lat(d)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {2, 3, 4}
    lines = []
    for number, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append(" | ".join(cells).rstrip())
        if number == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return lines


def cpu_table(outcomes: Sequence[Outcome]) -> list[str]:
    """Who was busy: CPU use of each server and of the load generator, and the
    server's CPU time per request (utilisation / rate), in the median rounds."""
    lines = ["CPU: share of one core used by the server and by the load generator, and the",
             "server's CPU time per request; 'cpu ratio' = floor / daemon CPU per request",
             "(what the ratio would be if the server alone were the bottleneck):"]
    for o in outcomes:
        cells, per = [], {}
        for name in ("floor", "daemon"):
            r = o.shown(name)
            rate = float(r["rate"])
            per[name] = float(r.get("server_cpu", 0.0)) * 1e6 / rate if rate > 0 else 0.0
            cells.append(f"{name} {float(r.get('server_cpu', 0.0)):4.0%} "
                         f"{float(r['client_cpu']):4.0%} {per[name]:5.0f}us")
        ratio = per["floor"] / per["daemon"] if per["daemon"] > 0 else 0.0
        lines.append(f"  {o.scenario.label:<22} " + "  ".join(cells) + f"  cpu ratio {ratio:.2f}")
    return lines


def target_lines(outcomes: Sequence[Outcome]) -> tuple[list[str], bool]:
    lines, all_met = [], True
    for o in outcomes:
        if o.scenario.target is None:
            continue
        met = o.ratio() >= o.scenario.target
        all_met &= met
        lines.append(f"  {o.scenario.label:<24} ratio {o.ratio():.2f}  target >= "
                     f"{o.scenario.target:.2f}  {'MET' if met else 'NOT MET'}")
    return lines, all_met


@contextlib.contextmanager
def servers(workdir: Path, daemon_command: Sequence[str], daemon_args: Sequence[str],
            cpus: set[int] | None) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for name, argv in (
            ("floor", [sys.executable, "-m", "benchmarks.floor"]),
            ("daemon", [*daemon_command, "--log-level", "warning",
                        "--state-dir", str(workdir / "state"), *daemon_args]),
        ):
            path = workdir / f"{name}.sock"
            server = Server(name, [*argv, "--socket", str(path)], path, workdir / f"{name}.log")
            started[name] = server
            server.start(cpus)
        yield started
    finally:
        for server in started.values():
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_daemon",
        description="Benchmark migblockd against a minimal asyncio floor server, same run; "
                    "reports requests/s, latency p50/p99 and the daemon/floor ratios.",
    )
    parser.add_argument("--duration", type=float, default=2.5,
                        help="measured seconds per scenario, server and round (default 2.5)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds before each measurement (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="floor/daemon rounds; the round with the median ratio is "
                             "reported (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 0.3 s per measurement, 1 round, 4 clients")
    parser.add_argument("--clients", type=int, default=16,
                        help="connections of the many-client scenarios (default 16)")
    parser.add_argument("--connectors", type=int, default=8,
                        help="parallel connectors of the connection scenario (default 8)")
    parser.add_argument("--blockers", type=int, default=10, choices=range(len(SEED_BLOCKERS) + 1),
                        metavar=f"0..{len(SEED_BLOCKERS)}",
                        help="blockers present during the run (default 10)")
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="run only the scenarios whose key starts with PREFIX "
                             "(query, adddel, connect); repeatable")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin servers and load generator to separate cores")
    parser.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the daemon's command line; repeatable")
    parser.add_argument("--daemon-command", metavar="CMD",
                        help="run this instead of 'PYTHON -m migblockd' (e.g. another checkout's "
                             "venv, to compare two versions); --socket and --log-level are "
                             "appended")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also save the results here")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 3 when a target is not met")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds = 0.3, 0.1, 1
        args.clients, args.connectors = min(args.clients, 4), min(args.connectors, 4)
    if not (0 < args.duration <= 60 and 0 <= args.warmup <= 10 and 1 <= args.rounds <= 10):
        parser.error("need 0 < --duration <= 60, 0 <= --warmup <= 10, 1 <= --rounds <= 10")
    if not (1 <= args.clients <= 500 and 1 <= args.connectors <= 100):
        parser.error("need 1 <= --clients <= 500 and 1 <= --connectors <= 100")
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench_daemon: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    chosen = [s for s in scenarios(args.clients, args.connectors)
              if not args.only or any(s.key.startswith(p) for p in args.only)]
    if not chosen:
        raise BenchError(f"no scenario matches {args.only}")
    server_cpus, client_cpus = pinning(args.pin)
    cores = os.cpu_count() or 0
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"Python {platform.python_version()} ({platform.python_implementation()}) on "
          f"{platform.system()} {platform.machine()}, {cores} cores{load}")
    pinned = "off"
    if server_cpus and client_cpus:
        pinned = f"servers on cpu {min(server_cpus)}, load generator on cpu {min(client_cpus)}"
    print(f"pinning: {pinned}")
    print(f"{args.rounds} round(s) x {args.warmup:g} s warm-up + {args.duration:g} s measured "
          f"per scenario and server; median-ratio round shown; {args.blockers} blockers present",
          flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="migblockd-bench-"))
    started = time.monotonic()
    outcomes = [Outcome(s, {"floor": [], "daemon": []}) for s in chosen]
    try:
        daemon_command = (shlex.split(args.daemon_command) if args.daemon_command
                          else [sys.executable, "-m", "migblockd"])
        with servers(workdir, daemon_command, args.daemon_arg, server_cpus) as running:
            for server in running.values():
                seed(server, args.blockers)
            present = count_blockers(running["daemon"])
            if present != args.blockers:
                raise BenchError(f"daemon has {present} blockers after seeding {args.blockers}")
            for round_number in range(args.rounds):
                for outcome in outcomes:
                    # Alternate which server goes first, so neither always follows the other.
                    order = ("floor", "daemon") if round_number % 2 == 0 else ("daemon", "floor")
                    for name in order:
                        result = run_loadgen(running[name], outcome.scenario, args.warmup,
                                             args.duration, client_cpus)
                        outcome.runs[name].append(result)
                    print(f"  round {round_number + 1}: {outcome.scenario.label:<24} "
                          f"floor {fmt_rate(float(outcome.runs['floor'][-1]['rate'])):>8}  "
                          f"daemon {fmt_rate(float(outcome.runs['daemon'][-1]['rate'])):>8} "
                          f"{outcome.scenario.unit:<6} ratio {outcome.round_ratio(-1):.2f}",
                          flush=True)
            present = count_blockers(running["daemon"])
            if present != args.blockers:
                raise BenchError(f"daemon has {present} blockers after the run, "
                                 f"expected {args.blockers}: add/del left some behind")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started

    print()
    for line in table(outcomes):
        print(line)
    print()
    for line in cpu_table(outcomes):
        print(line)
    lines, all_met = target_lines(outcomes)
    if lines:
        print()
        print("targets (daemon / floor, same run):")
        for line in lines:
            print(line)
    print(f"\ntotal {elapsed:.0f} s; daemon add/del events read and discarded: "
          f"{sum(int(r['events']) for o in outcomes for r in o.runs['daemon']):,}")

    if args.json is not None:
        report = {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "cores": cores,
            "pinned": bool(server_cpus),
            "duration": args.duration,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "blockers": args.blockers,
            "scenarios": [
                {
                    "key": o.scenario.key,
                    "label": o.scenario.label,
                    "unit": o.scenario.unit,
                    "clients": o.scenario.clients,
                    "floor": o.shown("floor"),
                    "daemon": o.shown("daemon"),
                    "ratio": o.ratio(),
                    "target": o.scenario.target,
                    "met": None if o.scenario.target is None else o.ratio() >= o.scenario.target,
                    "rounds": o.runs,
                }
                for o in outcomes
            ],
            "all_targets_met": all_met,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results saved to {args.json}")
    return 3 if args.check and not all_met else 0


if __name__ == "__main__":
    sys.exit(main())
