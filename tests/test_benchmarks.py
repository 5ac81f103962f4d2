"""Smoke tests of the daemon benchmark: it runs end to end and reports; no speed is asserted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from benchmarks import ab, ceiling, floor, loadgen, scale
from benchmarks.bench_daemon import scale_checks
from benchmarks.report import Outcome, Scenario, baseline_checks, checks, read_baseline, starved


def benchmarks_env() -> dict[str, str]:
    """This environment, with the checkout first on ``PYTHONPATH``: ``-m benchmarks.X``
    runs this checkout's benchmarks whatever the working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def quick_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``bench_daemon --quick --only query-1`` with ``args``, run to its end: the
    shortest run that makes a report, for the tests of what the command refuses
    and records."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_daemon", "--quick", "--only", "query-1",
         *args], cwd=ROOT, env=benchmarks_env(), capture_output=True, text=True,
        timeout=120, check=False)


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


async def test_loadgen_measures_the_servers_cpu_over_its_window(tmp_path: Path) -> None:
    """With ``--server-pid`` the load generator reads the server's CPU time when the
    window opens and closes.  Here the server is this very process, whose CPU time
    over the window the load generator also measures itself: both agree (to the
    tick of /proc), start-up and warm-up left out of both."""
    path = str(tmp_path / "floor.sock")
    server = await asyncio.start_unix_server(floor.handle, path)
    try:
        result = await loadgen.measure(path, "query", 2, 0.2, 0.5, server_pid=os.getpid())
    finally:
        server.close()
    assert result.server_cpu > 0, result
    assert abs(result.server_cpu - result.client_cpu) < 0.1, result


async def first_request_fails(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
    """The floor, except that each connection's first request after negotiating
    (but a ``query-blockers``, which the scale poller would fail on by itself)
    gets an error reply: in the warm-up, as the load generators start at once."""
    writer.write(floor.GREETING)
    failed = False
    try:
        while line := await reader.readline():
            request = json.loads(line)
            if not failed and request["execute"] not in ("qmp_capabilities", "query-blockers"):
                failed = True
                writer.write(b'{"error": {"class": "GenericError", "desc": "no"}, "id": %s}\r\n'
                             % json.dumps(request.get("id")).encode())
            else:
                writer.write(floor.reply_for(line))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_an_error_reply_outside_the_window_still_counts(tmp_path: Path) -> None:
    """Replies outside the measurement window count for no rate or latency, but an
    error among them must fail the run all the same."""
    path = str(tmp_path / "failing.sock")
    server = await asyncio.start_unix_server(first_request_fails, path)
    try:
        result = await loadgen.measure(path, "adddel", 2, 0.3, 0.1)
        assert result.errors == 2, result
        assert result.first_error.startswith('{"error"'), result
        with pytest.raises(RuntimeError, match="observer: 2 error replies"):
            await scale.under_load(path, 2, 0.3, 0.1)
    finally:
        server.close()


async def test_ceiling_fans_add_del_events_out_to_every_client(tmp_path: Path) -> None:
    """An add/del reaches every connected client as an event, ahead of the requester's reply;
    other commands get only their reply."""
    path = str(tmp_path / "ceiling.sock")
    loop = asyncio.get_running_loop()
    hub = ceiling.Hub(loop)
    server = await loop.create_unix_server(lambda: ceiling.Client(hub), path)
    streams = [await asyncio.open_unix_connection(path) for _ in range(3)]
    try:
        for reader, _ in streams:
            assert (await reader.readline()).startswith(b'{"QMP"')
        (first, writer), others = streams[0], streams[1:]
        writer.write(b'{"execute": "query-version", "id": 1}\n'
                     b'{"execute": "add-blocker", "arguments": {"id": "b1"}, "id": 2}\n')
        assert await first.readline() == b'{"return": {}, "id": 1}\r\n'
        event = json.loads(await first.readline())
        assert event["event"] == "BLOCKER_ADDED" and event["data"] == {"id": "b1"}
        assert await first.readline() == b'{"return": {}, "id": 2}\r\n'
        for reader, _ in others:
            assert json.loads(await reader.readline())["data"] == {"id": "b1"}
        writer.write(b'{"execute": "del-blocker", "arguments": {"id": "b1"}}\n')
        for reader, _ in streams:
            assert json.loads(await reader.readline())["event"] == "BLOCKER_DELETED"
        assert await first.readline() == b'{"return": {}}\r\n'
    finally:
        for _, w in streams:
            w.close()
        server.close()


async def test_loadgen_against_the_ceiling_reads_its_events(tmp_path: Path) -> None:
    path = str(tmp_path / "ceiling.sock")
    loop = asyncio.get_running_loop()
    hub = ceiling.Hub(loop)
    server = await loop.create_unix_server(lambda: ceiling.Client(hub), path)
    try:
        result = await loadgen.measure(path, "adddel", 2, 0.0, 0.1)
        assert result.requests > 0 and result.errors == 0, result
        assert result.events >= result.requests  # each add/del went to both clients
    finally:
        server.close()


def test_ratios_are_medians_of_per_round_ratios() -> None:
    scenario = Scenario("adddel-16", "add+del @16", "adddel", 16, "req/s",
                        ("ceiling", "daemon"))
    rates = {"ceiling": [100, 100, 1000], "daemon": [50, 10, 900]}
    outcome = Outcome(scenario, {name: [{"rate": r} for r in values]
                                 for name, values in rates.items()})
    assert outcome.ratio("daemon", "ceiling") == 0.5  # of 0.5, 0.1 and 0.9
    assert outcome.median("daemon", "rate") == 50


def test_a_ratio_that_fell_beyond_the_noise_is_a_target_not_met() -> None:
    """Against an earlier run, each ratio in common must keep 70 % of its value there."""
    scenario = Scenario("adddel-16", "add+del @16", "adddel", 16, "req/s",
                        ("floor", "ceiling", "daemon"))
    outcome = Outcome(scenario, {"floor": [{"rate": 1000}], "ceiling": [{"rate": 500}],
                                 "daemon": [{"rate": 200}]})
    earlier = {"scenarios": [
        {"key": "adddel-16", "ratios": {"daemon/floor": 0.25, "daemon/ceiling": 0.6}},
        {"key": "query-16", "ratios": {"daemon/floor": 0.9}},  # not run this time
    ]}
    found = {c.what: c for c in baseline_checks([outcome], read_baseline(json.dumps(earlier)))}
    assert set(found) == {"add+del @16: daemon / floor (was 0.25, -20%)",
                          "add+del @16: daemon / ceiling (was 0.60, -33%)"}
    fell_a_little = found["add+del @16: daemon / floor (was 0.25, -20%)"]
    assert (fell_a_little.value, fell_a_little.goal, fell_a_little.met) == ("0.20", ">= 0.17",
                                                                            True)
    fell_a_lot = found["add+del @16: daemon / ceiling (was 0.60, -33%)"]
    assert (fell_a_lot.value, fell_a_lot.goal, fell_a_lot.met) == ("0.40", ">= 0.42", False)


def test_a_baseline_that_shares_no_ratio_is_a_target_not_met() -> None:
    """A baseline of other scenarios (another ``--clients``: ``adddel-4`` is not
    ``adddel-16``) holds the run to nothing; ``--check`` must not pass it as met."""
    scenario = Scenario("adddel-16", "add+del @16", "adddel", 16, "req/s", ("floor", "daemon"))
    outcome = Outcome(scenario, {"floor": [{"rate": 1000}], "daemon": [{"rate": 200}]})
    other = read_baseline(json.dumps({"scenarios": [
        {"key": "adddel-4", "ratios": {"daemon/floor": 0.2}}]}))
    found = baseline_checks([outcome], other)
    assert [(c.what, c.value, c.goal, c.met) for c in found] == [
        ("ratios in common with the baseline", "0", ">= 1", False)]
    same = read_baseline(json.dumps({"scenarios": [
        {"key": "adddel-16", "ratios": {"daemon/floor": 0.2}}]}))
    assert [c.met for c in baseline_checks([outcome], same)] == [True]


def test_check_fails_on_a_ratio_far_below_the_baseline(tmp_path: Path) -> None:
    """``--baseline`` with ``--check`` exits 3 when a ratio fell beyond the margin."""
    first, earlier = tmp_path / "first.json", tmp_path / "earlier.json"
    proc = quick_bench("--json", str(first))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(first.read_text())
    report["scenarios"][0]["ratios"]["daemon/floor"] *= 10  # a run ten times better
    earlier.write_text(json.dumps(report))
    proc = quick_bench("--baseline", str(earlier), "--check")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"targets against {earlier}" in proc.stdout
    assert "query-blockers @1: daemon / floor (was" in proc.stdout
    assert "NOT MET" in proc.stdout


def test_a_target_near_its_goal_is_shown_with_the_digits_that_tell() -> None:
    """Rounded to the usual digits, a value near its goal would look equal to it:
    "2.0ms < 2.0ms MET" (or NOT MET).  More digits are shown then."""
    scenario = Scenario("adddel-16", "add+del @16", "adddel", 16, "req/s",
                        ("floor", "daemon"), ratio_targets=(("daemon", "floor", 0.8),),
                        p99_targets=(("daemon", 2000.0),))

    def shown(rate: float, p99_us: float) -> list[tuple[str, str, bool]]:
        runs: dict[str, list[dict[str, Any]]] = {
            "floor": [{"rate": 1000, "p99_us": 0}], "daemon": [{"rate": rate, "p99_us": p99_us}]}
        return [(c.value, c.goal, c.met) for c in checks([Outcome(scenario, runs)])]

    assert shown(900, 1500) == [("0.90", ">= 0.80", True), ("1.5ms", "< 2.0ms", True)]
    assert shown(801, 1960) == [("0.801", ">= 0.800", True), ("1.96ms", "< 2.00ms", True)]
    assert shown(799, 2040) == [("0.799", ">= 0.800", False), ("2.04ms", "< 2.00ms", False)]
    assert shown(800, 2000) == [("0.80", ">= 0.80", True), ("2.0ms", "< 2.0ms", False)]
    scaled = scale_checks({"after_change": {"p99_us": 99_960.0},
                           "observers": {"clients": 16, "p99_us": 10_030.0}, "dropped": 0})
    assert [(c.value, c.goal, c.met) for c in scaled] == [
        ("99.96ms", "< 100.00ms", True), ("10.03ms", "< 10.00ms", False), ("0", "= 0", True)]


@pytest.mark.parametrize("text", [
    "[]", "{}", '{"scenarios": {}}', '{"scenarios": [[]]}', '{"scenarios": [{"key": 1}]}',
    '{"scenarios": [{"key": "q", "ratios": {"daemon/floor": "0.5"}}]}', "{nope",
])
def test_a_baseline_that_is_no_report_is_refused(text: str) -> None:
    with pytest.raises(ValueError) as refused:
        read_baseline(text)
    assert "\n" not in str(refused.value)


def test_a_bad_baseline_is_refused_before_the_run(tmp_path: Path) -> None:
    """Valid JSON that is no report of this benchmark: one line, and nothing run."""
    bad, out = tmp_path / "bad.json", tmp_path / "out.json"
    bad.write_text("[]\n")
    proc = quick_bench("--baseline", str(bad), "--json", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"bench_daemon: cannot read --baseline {bad}: not a --json "
                                  "file of this benchmark"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "round 1" not in proc.stdout and not out.exists()


def test_a_baseline_measured_otherwise_is_refused() -> None:
    """The 30 % margin is the noise between runs measured alike: a baseline whose
    pinning, blockers, warm-up or window differ from this run's measured other
    ratios (a ``--quick`` run's @1 scenarios share the full run's keys), so
    comparing them would call a change of settings a regression or a gain."""
    settings = {"pinned": True, "blockers": 10, "warmup": 0.5, "duration": 2.5}
    scenarios = [{"key": "query-1", "ratios": {"daemon/floor": 0.9}}]
    alike = {**settings, "rounds": 1, "scenarios": scenarios}
    assert read_baseline(json.dumps(alike), settings) == {("query-1", "daemon/floor"): 0.9}
    for name, other in (("pinned", False), ("blockers", 0), ("warmup", 0.1),
                        ("duration", 0.3)):
        with pytest.raises(ValueError) as refused:
            read_baseline(json.dumps({**alike, name: other}), settings)
        assert str(refused.value) == (
            f"measured with {name} {json.dumps(other)}, this run with "
            f"{json.dumps(settings[name])}: its ratios are not comparable")


def test_a_baseline_measured_otherwise_is_refused_before_the_run(tmp_path: Path) -> None:
    """A report of a run with other blockers present: refused in one line, nothing run."""
    other, out = tmp_path / "other.json", tmp_path / "out.json"
    other.write_text(json.dumps({"blockers": 3, "scenarios": [
        {"key": "query-1", "ratios": {"daemon/floor": 0.9}}]}))
    proc = quick_bench("--baseline", str(other), "--json", str(out), "--check")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr == (f"bench_daemon: cannot read --baseline {other}: measured with "
                           "blockers 3, this run with 10: its ratios are not comparable\n")
    assert "round 1" not in proc.stdout and not out.exists()


def test_the_report_names_the_state_file_system_and_extra_arguments(tmp_path: Path) -> None:
    """A durable daemon on tmpfs and one on a disk, or one run with ``--daemon-arg``,
    measure other ratios; the ``--json`` report records both, as the printed report
    does, and a baseline that differs in either is refused before the run."""
    first, other = tmp_path / "first.json", tmp_path / "other.json"
    state = ("--state-parent", str(tmp_path))
    proc = quick_bench(*state, "--json", str(first))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(first.read_text())
    assert report["daemon_args"] == []
    assert f"durable state on {report['state_file_system']}\n" in proc.stdout
    for name, value in (("state_file_system", "tmpfs (tmpfs on /elsewhere)"),
                        ("daemon_args", ["--log-level", "warning"])):
        other.write_text(json.dumps({**report, name: value}))
        proc = quick_bench(*state, "--baseline", str(other))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"bench_daemon: cannot read --baseline {other}: "
                                      f"measured with {name} {json.dumps(value)}"), proc.stderr
        assert "round 1" not in proc.stdout


BENCHMARK_COMMANDS = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py")
                            if path.stem != "__init__" and "__main__" in path.read_text())


@pytest.mark.parametrize("module", BENCHMARK_COMMANDS)
def test_every_benchmark_explains_its_options(module: str) -> None:
    """``--help`` is how the documented commands are learnt: it must print, not
    fail on a help text that argparse reads as a format (a bare ``%``)."""
    env = benchmarks_env()
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and proc.stderr == "", proc.stdout + proc.stderr


def test_a_busy_machine_is_told_apart() -> None:
    """With many closed-loop clients, the floor or its load generator should keep a core
    busy; when neither does, other processes had the cores, and the report says so."""
    scenario = Scenario("query-16", "query-blockers @16", "query", 16, "req/s",
                        ("floor", "daemon"))

    def outcome(server: float, client: float) -> Outcome:
        run = {"rate": 1000, "server_cpu": server, "client_cpu": client}
        return Outcome(scenario, {"floor": [run], "daemon": [run]})

    assert starved([outcome(0.9, 0.5)]) == []
    assert starved([outcome(0.4, 0.95)]) == []
    assert starved([outcome(0.2, 0.15)]) == ["query-blockers @16 (floor 20%)"]


def test_blocking_lines_counts_a_big_line_without_keeping_it() -> None:
    left, right = socket.socketpair()
    with left, right:
        big = b'{"return": [' + b"x" * 3_000_000 + b"]}\r\n"
        event = b'{"timestamp": {}, "event": "E"}\n'
        sender = threading.Thread(target=right.sendall,
                                  args=(event + big + b'{"return": {}}\n',))
        sender.start()
        lines = scale.BlockingLines(left)
        assert lines.reply() == (big[:scale.HEAD], len(big))
        assert lines.reply() == (b'{"return": {}}\n', 15)
        sender.join()


def test_ab_calls_no_difference_inside_its_own_noise_a_win() -> None:
    """Runs of one side spread by a few percent with nothing changed: a difference
    between the sides' best that is no larger than that spread is no difference;
    a larger one is, in its direction; with too few runs there is no spread to
    judge by."""
    def runs(a: list[float], b: list[float]) -> list[ab.Run]:
        return ([ab.Run("A", 1000.0, 1.0, cpu) for cpu in a]
                + [ab.Run("B", 1000.0, 1.0, cpu) for cpu in b])

    # 118 against 124 us, but A's own runs went from 124 to 131 us: inside the noise.
    inside = ab.verdict(runs([124.0, 126.0, 131.0], [118.0, 120.0, 122.0]))
    assert inside.startswith("verdict: no difference shown: B's best is -4.8% of A's"), inside
    beyond = ab.verdict(runs([135.0, 136.0, 137.0], [118.0, 119.0, 121.0]))
    assert beyond.startswith("verdict: B spends 12.6% less CPU per request than A"), beyond
    worse = ab.verdict(runs([100.0, 101.0, 102.0], [110.0, 111.0, 112.0]))
    assert "B spends 10.0% more CPU" in worse, worse
    assert ab.verdict(runs([124.0], [100.0])).startswith("verdict: too few runs"), "one run"
    assert "spread 6%" in ab.summary(runs([124.0, 126.0, 131.0], [1.0]), "A")


@pytest.mark.parametrize("bad", [["--runs", "0"], ["--duration", "0"], ["--clients", "0"]])
def test_ab_refuses_a_run_it_cannot_measure(bad: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """No runs left each side with no best to print (a traceback after the run), and a
    window or client count the load generator refuses failed only once a daemon had
    started: a usage error, before anything runs."""
    with pytest.raises(SystemExit) as usage:
        ab.main(["--a", str(ROOT), "--b", str(ROOT), *bad])
    assert usage.value.code == 2
    assert "need 1 <= --runs <= 100" in capsys.readouterr().err


def test_ab_compares_the_daemons_cpu_over_the_measured_window(tmp_path: Path) -> None:
    """``benchmarks.ab`` runs both sides and reports each run's CPU per request,
    which the load generator reads over its window (``--server-pid``): a run
    without it would read no CPU at all."""
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", "--a", str(ROOT), "--b", str(ROOT), "--runs",
         "1", "--duration", "0.5", "--ephemeral", "--scenario", "query", "--clients", "2",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = json.loads(out.read_text())
    assert sorted(r["side"] for r in runs) == ["A", "B"]
    for run in runs:
        assert run["rate"] > 0 and run["cpu_us"] > 0, run
    assert "A: CPU per request best" in proc.stdout


def test_quick_benchmark_end_to_end(tmp_path: Path) -> None:
    """``--quick`` starts the daemon and the floor, runs every scenario and prints the report."""
    out = tmp_path / "bench.json"
    env = benchmarks_env()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_daemon", "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"benchmark failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(proc.stdout)  # the report, visible with -s
    assert "Python 3." in proc.stdout
    assert "cores" in proc.stdout
    for label in ("query-blockers @1", "add+del-blocker @1", "connect cycle @", "scale: "):
        assert label in proc.stdout
    assert "targets (same run):" in proc.stdout

    report = json.loads(out.read_text())
    assert report["cores"] == os.cpu_count()
    keys = [s["key"] for s in report["scenarios"]]
    assert [k.split("-")[0] for k in keys] == ["query", "query", "adddel", "adddel", "connect"]
    for scenario in report["scenarios"]:
        assert "floor" in scenario["servers"] and "daemon" in scenario["servers"]
        for server, run in scenario["servers"].items():
            assert run["requests"] > 0 and run["errors"] == 0, (server, run)
        assert scenario["ratios"]["daemon/floor"] > 0
    # Every add/del of the daemons and the ceilings caused events that the clients read;
    # the floor sends none.  The uvloop ceiling runs because the test extra installs uvloop.
    adddel = [s for s in report["scenarios"] if s["key"].startswith("adddel")]
    for scenario in adddel:
        servers = scenario["servers"]
        assert set(servers) == {"floor", "ceiling", "ceiling-uvloop", "daemon", "ephemeral"}
        assert servers["floor"]["events"] == 0
        assert all(servers[s]["events"] > 0 for s in servers if s != "floor")
        assert set(scenario["ratios"]) == {"daemon/floor", "daemon/ceiling",
                                           "daemon/ceiling-uvloop", "daemon/ephemeral"}
    targets = {t["what"] for t in report["targets"]}
    assert {"add+del-blocker @4: daemon / ceiling", "add+del-blocker @4: daemon / ephemeral",
            "add+del-blocker @4: daemon p99", "scale: clients dropped"} <= targets

    # The scale scenario ran against a daemon restored with its blockers, and measured.
    scaled = report["scale"]
    assert scaled["blockers"] == 2000
    assert scaled["reply_bytes"] > 2000 * 100  # every blocker was in the answer
    assert scaled["after_change"]["samples"] == 2 and scaled["unchanged"]["samples"] == 1
    assert scaled["observers"]["requests"] > 0 and scaled["adder"]["requests"] > 0
    assert scaled["dropped"] == len(scaled["drops"])


def test_a_short_soak_end_to_end(tmp_path: Path) -> None:
    """The soak runs every hostile pattern and reports; no speed is asserted."""
    out = tmp_path / "soak.json"
    env = benchmarks_env()
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


def test_ab_runs_both_checkouts_interleaved(tmp_path: Path) -> None:
    """``benchmarks.ab`` starts each side's own daemon, in A B / B A order, and
    reports the CPU each spent per request."""
    other = tmp_path / "other"
    for part in ("migblockd", "schema"):
        shutil.copytree(ROOT / part, other / part, ignore=shutil.ignore_patterns("__pycache__"))
    # Side B is a copy that leaves a mark each time it starts: the runs must reach
    # B's own code, not the checkout the benchmark runs from.
    marks = tmp_path / "b-started"
    main = other / "migblockd" / "__main__.py"
    main.write_text(f"open({str(marks)!r}, 'a').write('B\\n')\n" + main.read_text())
    out = tmp_path / "ab.json"
    env = benchmarks_env()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", "--a", str(ROOT), "--b", str(other),
         "--scenario", "query", "--clients", "2", "--runs", "2", "--duration", "0.3",
         "--ephemeral", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"ab failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    runs = json.loads(out.read_text())
    assert [r["side"] for r in runs] == ["A", "B", "B", "A"]
    assert all(r["rate"] > 0 and r["cpu_us"] > 0 for r in runs)
    assert proc.stdout.count("CPU per request best") == 2
    assert "verdict: too few runs to tell a difference from the noise" in proc.stdout
    assert marks.read_text() == "B\nB\n"
