"""Smoke tests of the daemon benchmark: it runs end to end and reports; no speed is asserted."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from benchmarks import floor, loadgen


def test_floor_reply_echoes_the_id() -> None:
    assert floor.reply_for(b'{"execute": "qmp_capabilities"}\n') == b'{"return": {}}\r\n'
    assert floor.reply_for(b'{"execute": "x", "id": {"a": [1]}}') == (
        b'{"return": {}, "id": {"a": [1]}}\r\n')
    assert floor.reply_for(b"{nope").startswith(b'{"error"')


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert loadgen.percentile(values, 0.50) == 50
    assert loadgen.percentile(values, 0.99) == 99
    assert loadgen.percentile([7], 0.99) == 7
    assert loadgen.percentile([], 0.5) == 0


async def test_loadgen_against_the_floor_in_process(tmp_path: Path) -> None:
    """The load generator's three scenarios complete against the floor, without errors."""
    path = str(tmp_path / "floor.sock")
    server = await asyncio.start_unix_server(floor.handle, path)
    try:
        for scenario, clients in (("query", 2), ("adddel", 2), ("connect", 2)):
            result = await loadgen.measure(path, scenario, clients, 0.0, 0.1)
            assert result.requests > 0, result
            assert result.errors == 0, result
            assert result.p50_us <= result.p99_us <= result.max_us
    finally:
        server.close()


def test_quick_benchmark_end_to_end(tmp_path: Path) -> None:
    """``--quick`` starts the daemon and the floor, runs every scenario and prints the report."""
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_daemon", "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"benchmark failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(proc.stdout)  # the report, visible with -s
    assert "Python 3." in proc.stdout
    assert "cores" in proc.stdout
    for label in ("query-blockers @1", "add+del-blocker @1", "connect cycle @"):
        assert label in proc.stdout
    assert "targets (daemon / floor, same run):" in proc.stdout

    report = json.loads(out.read_text())
    assert report["cores"] == os.cpu_count()
    keys = [s["key"] for s in report["scenarios"]]
    assert [k.split("-")[0] for k in keys] == ["query", "query", "adddel", "adddel", "connect"]
    for scenario in report["scenarios"]:
        for server in ("floor", "daemon"):
            run = scenario[server]
            assert run["requests"] > 0 and run["errors"] == 0, (server, run)
        assert scenario["ratio"] > 0
    # Every add-blocker of the daemon run caused an event that the clients read.
    adddel = [s for s in report["scenarios"] if s["key"].startswith("adddel")]
    assert all(s["daemon"]["events"] > 0 for s in adddel)
    assert all(s["floor"]["events"] == 0 for s in adddel)


def test_a_short_soak_end_to_end(tmp_path: Path) -> None:
    """The soak runs every hostile pattern and reports; no speed is asserted."""
    out = tmp_path / "soak.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--duration", "8", "--warmup", "2",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"soak failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(proc.stdout)  # the report, visible with -s
    for label in ("migblockd soak:", "polite (8 clients", "RSS (median of", "hostile cycles:",
                  "SIGHUP:", "log:", "verdict:"):
        assert label in proc.stdout
    report = json.loads(out.read_text())
    # What must hold at any speed: the daemon survived every pattern and stopped
    # cleanly, and no polite request failed or was dropped.
    assert report["exit_status"] == 0 and report["tracebacks"] == 0, report
    assert report["polite"]["requests"] > 0, report
    assert report["polite"]["errors"] == 0 and report["polite"]["disconnected"] == 0, report
    assert set(report["hostile"]["cycles"]) >= {"churn", "fuzz", "silent", "exhaust"}, report
    # (A reload may fail while the exhaustion pattern holds every descriptor: the
    # daemon cannot open its configuration file then, says so and keeps its settings.)
    assert report["sighups"] > 0, report
