"""The soak: minutes of every hostile pattern at once, while polite clients measure.

``python -m benchmarks.soak [--duration S] [--warmup S] [--quick] [--json FILE]``

It starts the daemon (durable state in a temporary directory, ``--log-level
warning``, short timeouts, and a descriptor limit of ``--nofile`` so that
descriptor exhaustion really happens), then for ``--duration`` seconds:

* a hostile process (``benchmarks.hostile --role hostile``) runs every hostile
  pattern the test suite knows, at once: fuzzed bytes, slowloris, silent and
  never-reading clients, connect/close churn, big listings, oversized messages,
  descriptor exhaustion;
* this process sends SIGHUP storms (20 reloads 10 ms apart, every 20 s),
  alternating a setting in the configuration file so that reloads change something;
* a polite process (``--role polite``) runs well-behaved agents that add, list and
  delete their own blockers, and reports their latencies after the warm-up.

The daemon's RSS is sampled every few seconds; the report compares the minute
after the warm-up with the last minute (the median of each), and gives the polite
clients' p50/p99/p99.9/max, what the hostile patterns did, the log's size, and how
the daemon stopped.  With two or more cores the daemon is pinned to one and the
hostile process to another (``--no-pin``).  It passes when the daemon never died,
stopped with status 0 and no traceback, no polite request failed or was dropped,
p99 is under 10 ms and the last minute's RSS is within 10% of the first's
(``--check`` makes failing exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.hostile import HOSTILE
from benchmarks.servers import REPO, BenchError, Server, child_env, wait_for_greeting

P99_TARGET_MS = 10.0
RSS_GROWTH_LIMIT = 0.10
STORM_EVERY = 20.0
STORM_SIGNALS = 20
RSS_EVERY = 5.0
#: RSS is compared between the minute after the warm-up and the last minute (the
#: median of each): the hostile patterns come in cycles (a thousand blockers come and
#: go, megabyte messages are buffered and freed), so two single samples would
#: compare two phases of those cycles rather than the start and the end.
RSS_WINDOW = 60.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def state_dir(args: argparse.Namespace, tmp: Path) -> Path:
    """Where the daemon keeps its state: tmpfs unless ``--state-on-disk``.

    Every polite request changes the state or reads it, so each waits for a
    commit, whose ``fdatasync`` is the disk's latency, not the daemon's (here
    1 ms at p50 and 8-9 ms at p99 on its own, more under other I/O):
    ``benchmarks.bench_state`` measures that.  On tmpfs the soak's figures are
    the daemon's.
    """
    shm = Path("/dev/shm")
    if args.state_on_disk or not shm.is_dir():
        return tmp / "state"
    return Path(tempfile.mkdtemp(prefix="migblockd-soak-state-", dir=shm))


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    sock, config = tmp / "soak.sock", tmp / "soak.toml"
    config.write_text(f"log-level = \"{args.log_level}\"\n")
    nofile = args.nofile
    state = state_dir(args, tmp)
    # prlimit(1) execs the daemon: the pid is the daemon's.
    argv = ["prlimit", f"--nofile={nofile}:{nofile}", sys.executable, "-m", "migblockd",
            "--socket", str(sock), "--config", str(config),
            "--state-dir", str(state), "--negotiation-timeout", "5",
            "--idle-timeout", "5", "--migration-time", "1"]
    daemon = Server("daemon", argv, sock, tmp / "daemon.log")
    cores = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cores) >= 2
    with daemon.log_path.open("wb") as log:
        daemon.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=log, env=child_env())
    if pin:
        os.sched_setaffinity(daemon.proc.pid, {cores[0]})
    children: list[subprocess.Popen[Any]] = [daemon.proc]
    try:
        report = soak(args, daemon, config, pin, cores, children)
        report["state"] = "disk" if state.is_relative_to(tmp) else "tmpfs"
        return report
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        if not state.is_relative_to(tmp):
            shutil.rmtree(state, ignore_errors=True)


def soak(args: argparse.Namespace, daemon: Server, config: Path, pin: bool, cores: list[int],
         children: list[subprocess.Popen[Any]]) -> dict[str, Any]:
    assert daemon.proc is not None
    sock, nofile = daemon.socket, args.nofile
    wait_for_greeting(daemon)
    pid = daemon.proc.pid

    def client(role: str, *extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.hostile", "--socket", str(sock), "--role", role,
             "--seconds", str(args.duration), *extra],
            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        children.append(proc)
        if pin and role == "hostile":
            os.sched_setaffinity(proc.pid, {cores[1]})
        return proc

    polite = client("polite", "--warmup", str(args.warmup), "--clients", str(args.clients))
    hostile = client("hostile", "--patterns", args.patterns)
    started = time.monotonic()
    samples: list[tuple[float, int]] = []
    storms = 0
    next_storm = started + min(STORM_EVERY / 2, args.duration / 4)
    while time.monotonic() - started < args.duration:
        daemon.check_alive()
        now = time.monotonic()
        samples.append((now - started, rss_kib(pid)))
        if now >= next_storm:
            for i in range(STORM_SIGNALS):
                # Replaced, not rewritten in place: a reload never reads half a file.
                fresh = config.with_suffix(".new")
                fresh.write_text(f"log-level = \"{args.log_level}\"\n"
                                 f"max-output = {(4 + i % 2) << 20}\n")
                fresh.replace(config)
                os.kill(pid, signal.SIGHUP)
                time.sleep(0.01)
            storms += 1
            next_storm += STORM_EVERY
        time.sleep(min(RSS_EVERY, max(0.1, args.duration - (time.monotonic() - started))))
    daemon.check_alive()
    samples.append((time.monotonic() - started, rss_kib(pid)))
    window = min(RSS_WINDOW, max(RSS_EVERY, (args.duration - args.warmup) / 2))
    warm = [kib for t, kib in samples if args.warmup <= t < args.warmup + window]
    end = [kib for t, kib in samples if t >= args.duration - window]
    results = {}
    for role, proc in (("polite", polite), ("hostile", hostile)):
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise BenchError(f"the {role} clients failed ({proc.returncode}):\n{err[-3000:]}")
        results[role] = json.loads(out.strip().splitlines()[-1])
    stop_started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(60)
    log_text = daemon.log()
    return {
        "python": platform.python_version(), "cores": os.cpu_count(), "pinned": pin,
        "duration_s": args.duration, "warmup_s": args.warmup, "nofile": nofile,
        "sighup_storms": storms, "sighups": storms * STORM_SIGNALS,
        "rss_window_s": window,
        "rss_warm_kib": statistics.median(warm or [samples[-1][1]]),
        "rss_end_kib": statistics.median(end), "rss_max_kib": max(kib for _, kib in samples),
        "rss_samples": [(round(t, 1), kib) for t, kib in samples],
        "polite": results["polite"], "hostile": results["hostile"],
        "exit_status": code, "stop_s": round(time.monotonic() - stop_started, 2),
        "log_bytes": len(log_text.encode()), "log_lines": log_text.count("\n"),
        "tracebacks": log_text.count("Traceback"),
        "out_of_descriptors_episodes": log_text.count("out of file descriptors ("),
        "reload_failures": log_text.count("reload failed"),
        "reload_failure_reasons": sorted({line.split("configuration: ", 1)[-1]
                                          for line in log_text.splitlines()
                                          if "reload failed" in line})[:3],
    }


def verdict(report: dict[str, Any]) -> list[str]:
    """What failed (nothing: the soak passed)."""
    polite = report["polite"]
    growth = report["rss_end_kib"] / report["rss_warm_kib"] - 1
    checks = {
        "the daemon stopped with status 0": report["exit_status"] == 0,
        "no traceback in the log": report["tracebacks"] == 0,
        "no polite request failed": polite["errors"] == 0,
        "no polite client was disconnected": polite["disconnected"] == 0,
        f"polite p99 under {P99_TARGET_MS:g} ms": polite["p99_ms"] < P99_TARGET_MS,
        f"RSS at the end within {RSS_GROWTH_LIMIT:.0%} of the warm-up's":
            abs(growth) <= RSS_GROWTH_LIMIT,
    }
    return [name for name, ok in checks.items() if not ok]


def show(report: dict[str, Any]) -> str:
    polite, hostile = report["polite"], report["hostile"]
    growth = report["rss_end_kib"] / report["rss_warm_kib"] - 1
    lines = [
        f"migblockd soak: {report['duration_s']:g} s (warm-up {report['warmup_s']:g} s), "
        f"Python {report['python']}, {report['cores']} cores"
        f"{', daemon and hostile clients pinned' if report['pinned'] else ''}, "
        f"RLIMIT_NOFILE {report['nofile']}, state on {report['state']}",
        f"polite ({polite['clients']} clients, {polite['requests']} requests after warm-up): "
        f"p50 {polite['p50_ms']:.2f} ms, p99 {polite['p99_ms']:.2f} ms, "
        f"p99.9 {polite['p999_ms']:.2f} ms, max {polite['max_ms']:.1f} ms; "
        f"{polite['errors']} errors, {polite['disconnected']} disconnected; p99 by command: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in polite["p99_ms_by_command"].items()),
        f"RSS (median of {report['rss_window_s']:g} s): "
        f"{report['rss_warm_kib'] / 1024:.1f} MiB after warm-up, "
        f"{report['rss_end_kib'] / 1024:.1f} MiB at the end ({growth:+.1%}); "
        f"peak {report['rss_max_kib'] / 1024:.1f} MiB",
        "hostile cycles: " + ", ".join(f"{k} {v}" for k, v in sorted(hostile["cycles"].items())),
        "hostile surprises: " + (", ".join(f"{k} {v} ({hostile['last_failure'][k]})"
                                           for k, v in sorted(hostile["failures"].items()))
                                 or "none"),
        f"SIGHUP: {report['sighups']} in {report['sighup_storms']} storms, "
        f"{report['reload_failures']} reload failures "
        f"{report['reload_failure_reasons'] or ''}; out-of-descriptor episodes: "
        f"{report['out_of_descriptors_episodes']}",
        f"log: {report['log_lines']} lines, {report['log_bytes'] / 1024:.0f} KiB, "
        f"{report['tracebacks']} tracebacks; stopped with status {report['exit_status']} "
        f"in {report['stop_s']:g} s",
    ]
    failed = verdict(report)
    lines.append("verdict: " + ("pass" if not failed else "FAIL: " + "; ".join(failed)))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default: 600)")
    p.add_argument("--warmup", type=float, default=60.0,
                   help="seconds before latencies count and the first RSS figure (default: 60)")
    p.add_argument("--quick", action="store_true", help="20 s with 5 s of warm-up: a smoke run")
    p.add_argument("--clients", type=int, default=8, help="polite clients (default: 8)")
    p.add_argument("--nofile", type=int, default=512,
                   help="the daemon's RLIMIT_NOFILE (default: 512, below what --max-clients "
                   "needs, so that the exhaustion pattern runs it out)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="let the scheduler place the processes")
    p.add_argument("--log-level", default="warning", help="the daemon's (default: warning)")
    p.add_argument("--patterns", default=",".join(HOSTILE), metavar="NAMES",
                   help="the hostile patterns, comma-separated (default: all of them; an "
                   "empty string for none, to measure the polite clients alone)")
    p.add_argument("--state-on-disk", action="store_true",
                   help="keep the daemon's state beside the socket, on disk, instead of on "
                   "tmpfs (/dev/shm): the figures then include the disk's sync latency")
    p.add_argument("--json", type=Path, metavar="FILE", help="also save the report here")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="work in DIR (a short path: it holds the socket) and keep the "
                   "daemon's log and state there")
    p.add_argument("--check", action="store_true", help="exit 1 unless the verdict is pass")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 20.0, 5.0
    with tempfile.TemporaryDirectory(prefix="migblockd-soak-", dir="/tmp") as tmp:
        workdir = args.keep if args.keep is not None else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            report = run(args, workdir)
        except BenchError as exc:
            sys.stderr.write(f"soak failed: {exc}\n")
            return 2
    sys.stdout.write(show(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if args.check and verdict(report) else 0


if __name__ == "__main__":
    sys.exit(main())
