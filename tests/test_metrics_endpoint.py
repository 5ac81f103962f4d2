"""The metrics endpoint's HTTP side under abuse, and its process metrics under the units'
sandbox: real sockets, a real daemon where it takes one, ``unshare`` for a ``/proc``
mounted as systemd's ``ProcSubset=pid`` mounts it, ``prlimit`` for a real shortage of
file descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import http.client
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVarTuple

import pytest
from conftest import DaemonProcess, assert_clean_log
from faults import injecting
from metricstext import Scrape
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_parse
from prometheus_client.registry import Collector, CollectorRegistry
from qmpclient import blocking_client, encode
from test_core import make
from test_daemon_exhaustion import limited_python
from test_metrics import UnixHTTPConnection, get, scrape

from migblockd import exposition
from migblockd import scrape_connections as connections
from migblockd import scrape_limits as limits
from migblockd.config import Config
from migblockd.scrape import MetricsServer
from migblockd.scrape_connections import MAX_SCRAPES
from migblockd.scrape_request import MAX_HEADER_BYTES, MAX_REQUEST_LINE
from migblockd.serving import open_metrics
from migblockd.startup import StartupError


@pytest.fixture
def server(short_tmp: Path) -> Iterator[Path]:
    """A metrics endpoint in this process (nothing here needs an answer built)."""
    loop = asyncio.new_event_loop()
    path = short_tmp / "m.sock"
    metrics = MetricsServer.open(path, CollectorRegistry(), short_tmp / "q.sock", loop)
    metrics.start()
    try:
        yield path
    finally:
        metrics.close()
        loop.close()


def trickler(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(b"GET /metrics HTTP/1.1\r\n")  # the rest never comes
    return s


def read_all(s: socket.socket) -> bytes:
    answer = b""
    while chunk := s.recv(4096):
        answer += chunk
    return answer


def assert_busy(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 503 "), answer
    assert b"\r\nRetry-After: 1" in head
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)


def test_a_connection_past_the_limit_is_told_to_retry(server: Path) -> None:
    # Each of these has sent its request and waits for an answer (the loop of
    # the fixture never runs): none can make room for another.
    held = []
    for _ in range(MAX_SCRAPES):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(server))
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        held.append(s)
    try:
        time.sleep(0.3)  # the server has read them all
        # Under load the server is often quicker than the client's send: retried
        # until one sends first, which is the case where a reset could discard
        # the answer.
        for _ in range(200):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
                late.settimeout(10)
                late.connect(str(server))
                try:
                    late.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                except BrokenPipeError:
                    # Turned away before it could send: told to retry all the same.
                    assert_busy(read_all(late))
                    continue
                # The answer, not a reset: the request was read before the close.
                assert_busy(read_all(late))
                break
        else:
            pytest.fail("every late client was turned away before it could send its request")
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("part", [b"GET /metr", b"GET /metrics HTT", b"\r\n"])
def test_a_connection_closed_to_make_room_mid_request_is_told_to_retry(
        server: Path, part: bytes) -> None:
    # Closed to make room with part of its request line read: what was read was
    # judged as a request, and the client told its HTTP version was invalid
    # (0.9, for two words), its version bad, or that it sent no request line.
    oldest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    oldest.settimeout(10)
    oldest.connect(str(server))
    oldest.sendall(part)
    held = [oldest]
    try:
        time.sleep(0.1)  # the oldest
        for _ in range(MAX_SCRAPES - 1):
            held.append(trickler(server))
        time.sleep(0.3)  # the server has taken them all
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.append(late)
        late.connect(str(server))
        assert_busy(read_all(oldest))
    finally:
        for s in held:
            s.close()


def test_a_trickling_client_is_cut_at_the_deadline(
        server: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "REQUEST_DEADLINE", 1.0)
    with trickler(server) as s:
        s.settimeout(0.2)
        closed = False
        for _ in range(100):  # 20 s, each line well within REQUEST_TIMEOUT
            try:
                s.sendall(b"X-Slow: 1\r\n")
                closed = s.recv(4096) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
        assert closed, "a client that keeps trickling holds its slot for ever"


def test_request_lines_are_logged_escaped(
        server: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="migblockd")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server))
        s.sendall(b"GET /x\rINFO: forged line\x1b[2J HTTP/1.0\r\n\r\n")
        while s.recv(4096):
            pass
    time.sleep(0.2)  # the handler logs after its answer
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("metrics: ")]
    assert lines, caplog.text
    assert all("\r" not in line and "\x1b" not in line for line in lines), lines
    assert any("\\r" in line and "\\x1b" in line for line in lines), lines


def test_process_metrics_under_proc_subset_pid(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path) -> None:
    # The units' ProcSubset=pid hides /proc/stat, whose boot time prometheus_client
    # wanted before it would report any process_* metric.
    wrapper = tmp_path / "python-proc-subset"
    wrapper.write_text(
        "#!/bin/sh\nexec unshare --mount sh -c "
        "'mount -t proc -o subset=pid proc /proc && test ! -e /proc/stat && "
        f'exec {sys.executable} "$@"\' sh "$@"\n')
    wrapper.chmod(0o755)
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock",
                     python=str(wrapper))
    found = scrape(endpoint_path)
    assert found.value("process_resident_memory_bytes") > 0
    assert found.value("process_open_fds") > 0
    started = found.value("process_start_time_seconds")
    assert abs(started - time.time()) < 600, started  # a date, not seconds since boot
    assert d.stop() == 0
    assert_clean_log(d)


def two_address_localhost(tmp_path: Path) -> str:
    """A python that runs with an /etc/hosts giving localhost both 127.0.0.1 and ::1
    (Debian's does; this machine's gives it one)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    wrapper = tmp_path / "python-hosts"
    wrapper.write_text(
        "#!/bin/sh\nexec unshare --mount sh -c "
        f"'mount --bind {hosts} /etc/hosts && "
        f'exec {sys.executable} "$@"\' sh "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_a_host_name_of_several_addresses_names_those_not_served(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path) -> None:
    # Reported: --metrics localhost:9715, where /etc/hosts gives localhost both ::1 and
    # 127.0.0.1 (Debian's does), listened on [::1] alone: a scraper told 127.0.0.1:9715
    # was refused, and the log named only the address served.
    d = start_daemon("--metrics", "localhost:0", "--ephemeral", socket=short_tmp / "q.sock",
                     python=two_address_localhost(tmp_path))
    served = d.wait_for_log(
        re.compile(r"serving Prometheus metrics on http://(\S+):(\d+)/metrics"))
    host, port = served.group(1), int(served.group(2))
    assert host in ("[::1]", "127.0.0.1"), host
    other = "127.0.0.1" if host == "[::1]" else "[::1]"
    d.wait_for_log(f"metrics: nothing is served on {other}:{port}, which the host name "
                   "also resolves to: a name is served on its first address only (give "
                   "the address itself to choose)")
    # As said: the first answers, the other refuses the connection.
    assert get(http.client.HTTPConnection(host.strip("[]"), port, timeout=10))[0] == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other.strip("[]"), port), timeout=10).close()
    assert d.stop() == 0
    assert_clean_log(d)


def test_a_host_name_the_file_gives_is_named_at_its_line_with_those_not_served(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path) -> None:
    # Reproduced first: with metrics in the file, the warning began "metrics: nothing
    # is served on ...", naming neither the file nor the line to change.
    config = tmp_path / "m.toml"
    config.write_text('# scraped by Prometheus\n\nmetrics = "localhost:0"\n')
    d = start_daemon("--config", str(config), "--ephemeral", socket=short_tmp / "q.sock",
                     python=two_address_localhost(tmp_path))
    served = d.wait_for_log(
        re.compile(r"serving Prometheus metrics on http://(\S+):(\d+)/metrics"))
    host, port = served.group(1), int(served.group(2))
    other = "127.0.0.1" if host == "[::1]" else "[::1]"
    d.wait_for_log(f"WARNING: {config}:3: metrics: nothing is served on {other}:{port}, which "
                   "the host name also resolves to: a name is served on its first address "
                   "only (give the address itself to choose)\n")
    assert d.stop() == 0
    assert_clean_log(d)


#: A uid no process here runs as (its RLIMIT_NPROC counts its threads alone).
THREADLESS_UID = 3_999_989


def threadless_daemon(start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
                      tmp_path: Path) -> tuple[DaemonProcess, Path, Callable[[str], None], str]:
    """A daemon with a metrics endpoint, run as THREADLESS_UID; its endpoint, a function
    that sets its soft RLIMIT_NPROC, and the soft limit it started with."""
    if os.geteuid() != 0:
        pytest.skip("runs the daemon as another uid, and lowers its limit")
    if shutil.which("prlimit") is None or shutil.which("setpriv") is None:
        pytest.skip("needs prlimit and setpriv (util-linux)")
    short_tmp.chmod(0o755)
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    os.chown(run, THREADLESS_UID, THREADLESS_UID)
    wrapper = tmp_path / "python-other-uid"
    wrapper.write_text(f"#!/bin/sh\nexec setpriv --reuid={THREADLESS_UID} "
                       f'--regid={THREADLESS_UID} --clear-groups {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    endpoint_path = run / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=run / "q.sock",
                     python=str(wrapper))
    pid = d.proc.pid

    def limit(threads: str) -> None:
        # As its uid: root may lack CAP_SYS_RESOURCE (a container).  The soft limit
        # only, which it may raise again.
        subprocess.run(["setpriv", f"--reuid={THREADLESS_UID}", f"--regid={THREADLESS_UID}",
                        "--clear-groups", "prlimit", f"--pid={pid}", f"--nproc={threads}:"],
                       check=True)

    soft = next(line.split()[3] for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max processes"))
    return d, endpoint_path, limit, soft


def test_out_of_threads_a_connection_costs_no_slot(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path) -> None:
    # Reproduced first: a connection whose thread started, but not the timer of
    # its deadline (RLIMIT_NPROC, a cgroup's pids.max), printed a bare traceback,
    # was never answered nor closed, and kept its slot: after 16 such, every
    # scrape got a 503 until a restart.  Served by a pool now, with no timer: a
    # connection no worker could be started for must not keep its slot either.
    d, endpoint_path, limit, soft = threadless_daemon(start_daemon, short_tmp, tmp_path)
    pid = d.proc.pid
    # No thread more than it has: none for a worker to serve a connection (the
    # endpoint has none before its first connection).
    limit(str(len(os.listdir(f"/proc/{pid}/task"))))
    try:
        for _ in range(MAX_SCRAPES):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(connections.REQUEST_TIMEOUT / 2)  # unanswered, it failed here
                s.connect(str(endpoint_path))
                answer = b""
                # Turned away at once, perhaps before its request is sent, or read:
                # told to retry all the same.
                with contextlib.suppress(BrokenPipeError):
                    s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):
                    while chunk := s.recv(4096):
                        answer += chunk
                assert_busy(answer)
    finally:
        limit(soft)
    # Every slot is free: as many silent connections as there are slots close none
    # to make room.
    held = []
    try:
        for _ in range(MAX_SCRAPES):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(endpoint_path))
            held.append(s)
        status, _, _ = get(UnixHTTPConnection(endpoint_path))
    finally:
        for s in held:
            s.close()
    assert status == 200
    assert d.log().count("metrics: closing a connection") == 1  # the scrape's, past 16
    d.wait_for_log("WARNING: metrics: no thread to serve a connection (can't "
                   "start new thread): told to retry [more like it within 60 s are counted")
    assert d.stop() == 0
    assert_clean_log(d)


def test_out_of_descriptors_a_waiting_scrape_does_not_spin(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path) -> None:
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock",
                     python=limited_python(tmp_path, 64))
    clients = []
    for _ in range(80):  # past what 64 descriptors hold
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(d.socket))
        clients.append(c)
    d.wait_for_log("out of file descriptors (")
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting.connect(str(endpoint_path))  # queued: the server cannot accept it
    try:
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        before = cpu()
        time.sleep(2)
        used = cpu() - before
        # Spinning on accept() burns a core (2 s here); waiting between attempts, nothing.
        assert used < 1.0, f"{used:.2f} s of CPU in 2 s while out of descriptors"
        turned_away = 0
        for c in clients:  # each got its greeting, or the one line of a refusal
            c.settimeout(10)
            turned_away += b'"error"' in c.recv(4096)
        assert turned_away >= 1
    finally:
        waiting.close()
        for c in clients:
            c.close()
    status, _, _ = get(UnixHTTPConnection(endpoint_path))
    assert status == 200
    # Those turned away meanwhile are counted, among the connections too (accepted
    # and told why, as at max-clients): every client, served or not.
    found = scrape(endpoint_path)
    assert found.value("migblockd_connections_refused_total",
                       reason="descriptors") == turned_away
    assert found.value("migblockd_connections_total") == len(clients)
    assert d.stop() == 0
    assert_clean_log(d)


def test_the_endpoint_never_takes_a_passed_qmp_socket(short_tmp: Path) -> None:
    # Under socket activation the QMP socket is systemd's, wherever --socket points.
    path = short_tmp / "passed.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as passed:
        passed.bind(str(path))
        passed.listen()
        core, _ = make()
        config = Config().replace(metrics=path)
        assert config.socket != path

        async def attempt() -> None:
            open_metrics(config, core, passed)

        with pytest.raises(StartupError, match="that is the QMP socket"):
            asyncio.run(attempt())
    assert sorted(p.name for p in short_tmp.iterdir()) == ["passed.sock"]  # no lock left


def test_the_endpoint_never_takes_a_passed_qmp_socket_through_a_symlink(
        short_tmp: Path) -> None:
    # Its own passed socket was "another daemon already listening", and the
    # metrics' lock file was left behind.
    real, link = short_tmp / "real", short_tmp / "link"
    real.mkdir(mode=0o700)
    link.symlink_to(real.name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as passed:
        passed.bind(str(real / "passed.sock"))
        passed.listen()
        core, _ = make()
        config = Config().replace(metrics=link / "passed.sock")

        async def attempt() -> None:
            open_metrics(config, core, passed)

        with pytest.raises(StartupError, match="that is the QMP socket"):
            asyncio.run(attempt())
    assert sorted(p.name for p in real.iterdir()) == ["passed.sock"]  # no lock left


def test_silent_clients_do_not_lock_a_scraper_out(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # As many connections as the endpoint serves, silent or trickling, and
    # reconnecting as they are cut, used to fail every scrape for as long as
    # they were kept up: now a scraper takes the place of the oldest.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    held = []
    for _ in range(MAX_SCRAPES // 2):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(endpoint_path))
        held.append(s)
        time.sleep(0.05)  # oldest first
    held += [trickler(endpoint_path) for _ in range(MAX_SCRAPES - len(held))]
    try:
        time.sleep(0.3)  # the server has taken them all
        for _ in range(3):
            assert scrape(endpoint_path).types["migblockd_build_info"] == "gauge"
        d.wait_for_log("metrics: closing a connection that has not sent its request in ")
        # At the default level too, once for all three (at most once a minute):
        # counted whole, not as the first of them (reported: "1 closed", then the
        # rest only at a crowding a minute later, or never).
        warned = d.wait_for_log(re.compile(
            f"WARNING: metrics: all {MAX_SCRAPES} connections were busy: ([0-9]+) closed to "
            "make room before their request was read, 0 refused"))
        assert int(warned.group(1)) == d.log().count("metrics: closing a connection")
        # The oldest made room (the slot of the first scrape then served the
        # others), closed long before its timeout.
        held[0].settimeout(connections.REQUEST_TIMEOUT / 2)
        assert read_all(held[0]) == b""
    finally:
        for s in held:
            s.close()
    assert d.stop() == 0
    assert d.log().count("connections were busy") == 1
    assert_clean_log(d)


def test_scrapers_connecting_at_once_each_get_an_answer(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # More at once than are served, each with its request sent before the daemon
    # takes the connection: each gets its metrics or a 503 to retry, never a
    # closed or reset connection.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    clients = []
    d.signal(signal.SIGSTOP)
    try:
        for _ in range(3 * MAX_SCRAPES):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(str(endpoint_path))  # queued: the daemon is stopped
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            clients.append(s)
    finally:
        d.signal(signal.SIGCONT)
    try:
        answers = [read_all(s) for s in clients]
    finally:
        for s in clients:
            s.close()
    for answer in answers:
        if not answer.startswith(b"HTTP/1.0 200 "):
            assert_busy(answer)
    assert any(a.startswith(b"HTTP/1.0 200 ") for a in answers)
    # The log counts the burst whole, a second after it: every 503 (reported: "0
    # refused" at its first, and the rest only at a crowding a minute later).
    busy = sum(not a.startswith(b"HTTP/1.0 200 ") for a in answers)
    warned = d.wait_for_log(re.compile(
        f"WARNING: metrics: all {MAX_SCRAPES} connections were busy: ([0-9]+) closed to "
        "make room before their request was read, ([0-9]+) refused"))
    assert int(warned.group(1)) + int(warned.group(2)) == busy > 0, (warned.group(0), busy)
    assert d.stop() == 0
    assert d.log().count("connections were busy") == 1
    assert_clean_log(d)


def test_at_exit_a_link_put_in_place_of_the_socket_is_left(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # Moved away and replaced by a link to it: the link is not the daemon's to remove.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    moved = short_tmp / "moved.sock"
    endpoint_path.rename(moved)
    endpoint_path.symlink_to(moved.name)
    assert scrape(endpoint_path).types["migblockd_build_info"] == "gauge"  # the daemon's
    assert d.stop() == 0
    assert endpoint_path.is_symlink()
    assert_clean_log(d)


def exchange(path: Path, request: bytes) -> bytes:
    """``request`` sent whole on a new connection, and all that comes back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(request)
        return read_all(s)


def test_requests_it_cannot_parse_get_a_status_line(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # wsgiref took them for HTTP/0.9 and sent its error page alone: a client saw a
    # malformed answer, not a 400 or a 505.  One that said HTTP/0.9 got its answer
    # so: the metrics, or the 405's text, alone, and nothing at all for a HEAD.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    for request, status in ((b"garbage\r\n\r\n", 400),
                            (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
                            (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
                            (b"GET /metrics HTTP/0.9\r\n\r\n", 505),
                            (b"HEAD /metrics HTTP/0.9\r\n\r\n", 505),
                            (b"POST /metrics HTTP/0.9\r\n\r\n", 505),
                            (b"GET /metrics HTTP/0.5\r\n\r\n", 505),
                            # HTTP/0.9's simple request: once a 200, though 0.9 gets 505.
                            (b"GET /metrics\r\n\r\n", 505),
                            (b"GET /metrics HTTP/\xb2.0\r\n\r\n", 400),  # a digit to isdigit()
                            (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414)):
        answer = exchange(endpoint_path, request)
        assert answer.startswith(b"HTTP/1.0 %d " % status), (request[:40], answer[:200])
    assert exchange(endpoint_path, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 200 ")
    # Found by review: the 400 repeated the line twice, as repr(): 65 KB of NULs
    # came back as 520 KB, which a client that does not read left blocking the
    # thread, and its slot, for the socket's timeout.
    answer = exchange(endpoint_path, b"\x00" * 65000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400 Bad request syntax ("), answer[:100]
    assert len(answer) < 2000, len(answer)
    assert d.stop() == 0
    assert_clean_log(d)


def test_reconnecting_clients_do_not_fill_the_tcp_endpoints_queue(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # Found by review: the TCP endpoint listened with a backlog of 16 (the Unix
    # one and the QMP socket, 1024): clients reconnecting as fast as they were
    # cut filled it, and a scraper's connection waited seconds for a SYN retry.
    # With the daemon stopped nothing is accepted: what the queue holds shows.
    d = start_daemon("--metrics", "127.0.0.1:0", "--ephemeral", socket=short_tmp / "q.sock")
    port = int(d.wait_for_log(re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/")).group(1))
    queued = []
    d.proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(64):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(("127.0.0.1", port))  # timed out once past the 17th
            queued.append(s)
    finally:
        d.proc.send_signal(signal.SIGCONT)
        for s in queued:
            s.close()
    assert len(queued) == 64
    assert d.stop() == 0


def test_scrapes_waiting_when_the_daemon_stops_get_an_answer(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # Found by review: of 10 scrapes sent together, SIGTERM 0.25 s later, 3 got
    # their metrics and 7 the end of the connection, nothing said: the process
    # ended with the threads that waited for their turn (answers are spaced).
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    statuses: list[bytes] = []

    def one() -> None:
        statuses.append(exchange(endpoint_path, b"GET /metrics HTTP/1.0\r\n\r\n")[:12])

    scrapers = [threading.Thread(target=one) for _ in range(10)]
    for t in scrapers:
        t.start()
    time.sleep(0.25)  # a few answered: spaced by MIN_INTERVAL
    assert d.stop() == 0
    for t in scrapers:
        t.join()
    assert b"" not in statuses, statuses
    assert set(statuses) <= {b"HTTP/1.0 200", b"HTTP/1.0 503"}, statuses
    assert b"HTTP/1.0 503" in statuses, statuses  # those still waiting


def test_a_request_still_being_sent_when_the_daemon_stops_is_answered_at_once(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # Found by review: the stop waited for a connection still sending its request (a
    # silent one, which any local user may hold on TCP, or one trickling it) as for a
    # scrape under way, STOP_WAIT (2 s) each stop, then ended the process with it
    # unanswered.  It is cut at once, and told why if it sent anything.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as trickler:
        for s in (silent, trickler):
            s.settimeout(10)
            s.connect(str(endpoint_path))
        trickler.sendall(b"GET /metrics HTTP/1.1\r\n")  # the rest never comes
        scrape(endpoint_path)  # accepted after them: both are being served
        assert d.stop() == 0
        answer = read_all(trickler)
        assert answer.startswith(b"HTTP/1.0 503 "), answer
        assert answer.endswith(b"\r\n\r\nmigblockd is stopping\n"), answer
        assert read_all(silent) == b""  # nothing asked: nothing to answer
    assert_clean_log(d)


def test_empty_lines_before_the_request_line_are_skipped(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # RFC 9112 (2.2): a server SHOULD ignore at least one empty line before the
    # request line.  wsgiref took it for the request line, and closed the
    # connection without a word.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    request = b"GET /metrics HTTP/1.0\r\n\r\n"
    for before in (b"\r\n", b"\r\n\n\r\n"):
        answer = exchange(endpoint_path, before + request)
        assert answer.startswith(b"HTTP/1.0 200 "), (before, answer[:200])
    # Empty lines, then the end of what the client sends: an answer, not silence.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(endpoint_path))
        s.sendall(b"\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.0 400 "), answer[:200]
    # They count towards the request line's bound: a client cannot keep the thread
    # reading them.
    answer = exchange(endpoint_path, b"\r\n" * (MAX_REQUEST_LINE // 2 + 1) + request)
    assert answer.startswith(b"HTTP/1.0 414 "), answer[:200]
    assert d.stop() == 0
    assert_clean_log(d)


def test_a_header_block_past_the_limit_is_refused(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # wsgiref bounds each header line (64 KiB) and their number (100), not what they
    # add up to: 6.4 MB a connection, parsed on a thread that holds the interpreter
    # lock while the event loop waits for it.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    line = b"GET /metrics HTTP/1.1\r\n"

    def headers(size: int) -> bytes:
        """Header lines of ``size`` bytes in all, the empty line that ends them included."""
        each = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        count, rest = divmod(size - 2 - len(b"X-Last: \r\n"), len(each))
        return each * count + b"X-Last: " + b"a" * rest + b"\r\n\r\n"

    assert len(headers(MAX_HEADER_BYTES)) == MAX_HEADER_BYTES
    answer = exchange(endpoint_path, line + headers(MAX_HEADER_BYTES))
    assert answer.startswith(b"HTTP/1.0 200 "), answer[:200]
    answer = exchange(endpoint_path, line + headers(MAX_HEADER_BYTES + 1))
    assert answer.startswith(b"HTTP/1.0 431 "), answer[:200]
    # One line past the limit too, under wsgiref's own bound on a line.
    answer = exchange(endpoint_path, line + b"X-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 431 "), answer[:200]
    # And their number, as docs/metrics.md says: 99 lines pass, 100 do not.
    for count, status in ((99, b"200"), (100, b"431")):
        many = b"".join(b"X-%d: y\r\n" % n for n in range(count)) + b"\r\n"
        answer = exchange(endpoint_path, line + many)
        assert answer.startswith(b"HTTP/1.0 " + status + b" "), (count, answer[:200])
    assert d.stop() == 0
    assert_clean_log(d)


def test_a_scraper_that_stops_reading_is_a_line_of_the_log(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path) -> None:
    # An answer larger than the socket's buffers, to a client that reads none of
    # it: the write times out, and wsgiref printed a bare traceback on stderr.
    # A network namespace of its own, with small TCP buffers, makes the answer
    # larger than them, as a scraper across a network with a small window would.
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace whose TCP settings it changes")
    if any(shutil.which(tool) is None for tool in ("unshare", "nsenter", "ip")):
        pytest.skip("needs unshare and nsenter (util-linux), ip (iproute2) for a private network")
    small = "4096 4096 4096"
    wrapper = tmp_path / "python-small-tcp"
    wrapper.write_text(
        "#!/bin/sh\nexec unshare --net sh -c "
        f"'ip link set lo up && echo {small} > /proc/sys/net/ipv4/tcp_wmem && "
        f"echo {small} > /proc/sys/net/ipv4/tcp_rmem && "
        f'exec {sys.executable} "$@"\' sh "$@"\n')
    wrapper.chmod(0o755)
    d = start_daemon("--metrics", "127.0.0.1:0", "--ephemeral", socket=short_tmp / "q.sock",
                     python=str(wrapper))
    port = d.wait_for_log(re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/")).group(1)
    # Each command that has run adds its histogram to the answer: tens of kilobytes.
    with blocking_client(d.socket) as qmp:
        for command in ("query-version", "query-commands", "query-blockers", "query-migrate",
                        "query-migrate-parameters", "query-migrate-capabilities"):
            qmp.sendall(encode({"execute": command}))
            assert b'"return"' in qmp.recv(1 << 20)
    # Sends its request and reads nothing until its standard input closes.
    silent = ("import socket, sys\n"
              "s = socket.socket()\n"
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)\n"
              f"s.connect(('127.0.0.1', {port}))\n"
              "s.sendall(b'GET /metrics HTTP/1.1\\r\\n\\r\\n')\n"
              "sys.stdin.read()\n")
    client = subprocess.Popen(
        ["nsenter", f"--net=/proc/{d.proc.pid}/ns/net", sys.executable, "-c", silent],
        stdin=subprocess.PIPE)
    try:
        d.wait_for_log("metrics: answer not sent: TimeoutError",
                       timeout=connections.REQUEST_TIMEOUT + 10)
    finally:
        assert client.stdin is not None
        client.stdin.close()
        client.wait(10)
    assert scrape_tcp(d, int(port)) == 200  # the endpoint serves on
    assert d.stop() == 0
    assert_clean_log(d)


def scrape_tcp(d: DaemonProcess, port: int) -> int:
    """The status of a GET from inside the daemon's network namespace."""
    fetch = ("import http.client\n"
             f"c = http.client.HTTPConnection('127.0.0.1', {port}, timeout=10)\n"
             "c.request('GET', '/metrics')\n"
             "print(c.getresponse().status)\n")
    out = subprocess.run(["nsenter", f"--net=/proc/{d.proc.pid}/ns/net", sys.executable, "-c",
                          fetch], capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout)


def head_of(answer: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """An answer's status line, header fields (Date and Server left out), and body."""
    block, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = block.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines)
    return status, {k: v for k, v in fields.items() if k not in (b"Date", b"Server")}, body


async def test_head_on_a_wedged_loop_says_what_the_get_would(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # HEAD said 200 without asking the loop: an uptime probe saw a wedged daemon
    # as healthy.  Every return of the loop's epoll_wait held past RENDER_TIMEOUT
    # wedges it (the endpoint's thread polls, with poll()).
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    head = b"HEAD /metrics HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n"
    status, fields, body = head_of(exchange(endpoint_path, head))
    assert (status, body) == (b"HTTP/1.0 200 OK", b""), fields
    assert fields[b"Content-Encoding"] == b"gzip" and b"Content-Length" not in fields
    held = int((exposition.RENDER_TIMEOUT + 2) * 1_000_000)
    async with injecting(d.proc.pid, "epoll_wait", f"delay_exit={held}", "the daemon"):
        answer = await asyncio.to_thread(exchange, endpoint_path, head)
    why = b"migblockd's event loop did not answer in time\n"
    assert head_of(answer) == (b"HTTP/1.0 503 Service Unavailable",
                               {b"Content-Type": b"text/plain; charset=utf-8",
                                b"Content-Length": b"%d" % len(why)}, b""), answer
    # The loop turns again: so does the probe.
    assert head_of(exchange(endpoint_path, head))[0] == b"HTTP/1.0 200 OK"
    assert d.stop() == 0
    assert_clean_log(d)


def test_head_while_stopping_says_what_the_get_would(short_tmp: Path) -> None:
    # The daemon's loop closed, its endpoint not yet (a connection whose request
    # was read meanwhile): the GET's 503, for the probe too.
    loop = asyncio.new_event_loop()
    path = short_tmp / "m.sock"
    metrics = MetricsServer.open(path, CollectorRegistry(), short_tmp / "q.sock", loop)
    metrics.start()
    loop.close()
    try:
        get = head_of(exchange(path, b"GET /metrics HTTP/1.0\r\n\r\n"))
        head = head_of(exchange(path, b"HEAD /metrics HTTP/1.0\r\n\r\n"))
    finally:
        metrics.close()
    assert get[0] == b"HTTP/1.0 503 Service Unavailable" and get[2] == b"migblockd is stopping\n"
    assert head == (get[0], get[1], b"")


def test_an_accept_header_it_cannot_use_gets_the_text_format(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # prometheus_client's choose_encoder raised TypeError for a version it could
    # not compare: a 500, and an error with its traceback in the log, per request.
    # A folded version line went into the answer's Content-Type as it came.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    for accept in (b"text/plain; version=x", b"application/openmetrics-text; version=abc",
                   b"text/plain; version=1.x.0",
                   b"application/openmetrics-text; version=1.0.1\r\n .2"):
        for method in (b"GET", b"HEAD"):
            answer = exchange(endpoint_path,
                              method + b" /metrics HTTP/1.1\r\nAccept: " + accept + b"\r\n\r\n")
            status, fields, body = head_of(answer)
            assert status == b"HTTP/1.0 200 OK", (accept, answer[:300])
            assert fields[b"Content-Type"] == b"text/plain; version=0.0.4; charset=utf-8", (
                accept, fields)
            if method == b"GET":
                assert Scrape.parse(body.decode()).types["migblockd_build_info"] == "gauge"
    assert d.stop() == 0
    assert not [line for line in d.log().splitlines()
                if "metrics: " in line and " DEBUG: " not in line
                and "serving Prometheus metrics" not in line], d.log()[-3000:]
    assert_clean_log(d)


def test_a_failure_to_build_the_answer_is_logged_once_a_window(
        short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A failure that any request sets off (a bug) logged a traceback per request.
    class Broken(Collector):
        def collect(self) -> Iterable[Metric]:
            raise RuntimeError("a collector's bug")

    caplog.set_level(logging.DEBUG, logger="migblockd")
    registry = CollectorRegistry()
    registry.register(Broken())
    loop = asyncio.new_event_loop()
    turning = threading.Thread(target=loop.run_forever, daemon=True)
    turning.start()
    path = short_tmp / "m.sock"
    metrics = MetricsServer.open(path, registry, short_tmp / "q.sock", loop)
    metrics.start()
    try:
        for _ in range(5):
            answer = exchange(path, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.0 500 "), answer[:200]
    finally:
        metrics.close()
        loop.call_soon_threadsafe(loop.stop)
        turning.join(10)
        loop.close()
    errors = [r for r in caplog.records if r.levelno > logging.INFO]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is not None and "a collector's bug" in caplog.text
    assert errors[0].getMessage().startswith("metrics: cannot build the answer [more like it ")
    failed = [r for r in caplog.records if "cannot build the answer" in r.getMessage()]
    assert len(failed) == 5, [r.getMessage() for r in failed]


_Ts = TypeVarTuple("_Ts")


class _CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts what other threads hand it."""

    handed = 0

    def call_soon_threadsafe(self, callback: Callable[[*_Ts], object], *args: *_Ts,
                             context: contextvars.Context | None = None) -> asyncio.Handle:
        self.handed += 1
        return super().call_soon_threadsafe(callback, *args, context=context)


def test_scrapes_of_a_wedged_loop_each_get_their_503_in_time(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each scrape waited for the one before it to give up, then queued its own
    # render behind it for a whole RENDER_TIMEOUT: scrapes that came together got
    # their 503s one RENDER_TIMEOUT apart, and the loop had one render more to
    # skip per scrape once it turned.  Now a scrape waits behind a render given up
    # on for its own time only, and queues nothing behind it.
    monkeypatch.setattr(exposition, "RENDER_TIMEOUT", 1.0)
    loop = _CountingLoop()
    turning = threading.Thread(target=loop.run_forever, daemon=True)
    turning.start()
    wedged, release = threading.Event(), threading.Event()

    def wedge() -> None:
        wedged.set()
        release.wait(60)

    loop.call_soon_threadsafe(wedge)
    path = short_tmp / "m.sock"
    metrics = MetricsServer.open(path, CollectorRegistry(), short_tmp / "q.sock", loop)
    metrics.start()
    answers: list[bytes] = []
    try:
        assert wedged.wait(10)
        handed = loop.handed
        scrapers = [threading.Thread(target=lambda: answers.append(
            exchange(path, b"GET /metrics HTTP/1.0\r\n\r\n"))) for _ in range(4)]
        for t in scrapers:
            t.start()
        for t in scrapers:
            t.join(30)
        renders = loop.handed - handed
        release.set()
        # The loop turns again: so do the scrapes.
        assert exchange(path, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")
    finally:
        release.set()
        metrics.close()
        loop.call_soon_threadsafe(loop.stop)
        turning.join(10)
        loop.close()
    assert len(answers) == 4
    for answer in answers:
        status, _, body = head_of(answer)
        assert (status, body) == (b"HTTP/1.0 503 Service Unavailable",
                                  b"migblockd's event loop did not answer in time\n"), answer
    assert renders == 1


_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
_OPENMETRICS = b"application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"


@pytest.mark.parametrize(("accept", "content_type"), [
    # Found by review: the version the client sent was copied into the answer's
    # Content-Type, whatever it was, and the answer claimed to be in it.
    (b"application/openmetrics-text; version=99.0.0", _TEXT),
    (b"application/openmetrics-text; version=1.0.0" + b"1" * 3000, _TEXT),
    (b"application/openmetrics-text; version=1.0.0.0.0.0", _TEXT),
    # Found by review: the weights were not read: the first format named won, also
    # one said to be "not acceptable" (q=0; RFC 9110, 12.4.2), and one the client
    # likes least (a Prometheus whose scrape_protocols lists the text format first).
    (b"text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0;q=0.4",
     _TEXT),
    (b"application/openmetrics-text;q=0, text/plain", _TEXT),
    (b"application/openmetrics-text;q=0.1, */*;q=0.9", _TEXT),
    # Media types and parameter names are case-insensitive (RFC 9110, 8.3.1);
    # a parameter's value may be quoted (5.6.6).
    (b"Application/OpenMetrics-Text; Version=1.0.0", _OPENMETRICS),
    (b'application/openmetrics-text; version="1.0.0"', _OPENMETRICS),
    (b"application/openmetrics-text ; q=0.3 , text/plain ; q=0.2", _OPENMETRICS),
    # Unchanged: what Prometheus 2 and 3 send by default, and no Accept at all.
    (b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
     b"version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", _OPENMETRICS),
    (b"application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
     b"application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
     b"escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
     b"application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8"),
    (b"text/plain; version=1.0.0",
     b"text/plain; version=1.0.0; charset=utf-8; escaping=underscores"),
    (b"*/*", _TEXT),
    (None, _TEXT),
    # Read up to its first 1 KiB: 64 KiB of commas took 80 ms of the interpreter lock.
    (b"," * 1022 + b"application/openmetrics-text", _TEXT),
    (b"," * 900 + b"application/openmetrics-text," + b"," * 60000, _OPENMETRICS),
])
def test_the_format_is_the_one_the_accept_header_weighs_most(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
        accept: bytes | None, content_type: bytes) -> None:
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", socket=short_tmp / "q.sock")
    field = b"" if accept is None else b"Accept: " + accept + b"\r\n"
    for method in (b"GET", b"HEAD"):
        answer = exchange(endpoint_path, method + b" /metrics HTTP/1.1\r\n" + field + b"\r\n")
        status, fields, body = head_of(answer)
        assert status == b"HTTP/1.0 200 OK", answer[:300]
        assert fields[b"Content-Type"] == content_type, (accept, fields)
        if method == b"GET":
            # The body is in the format the header names, as its own parser reads it.
            assert body.endswith(b"\n# EOF\n") == content_type.startswith(
                b"application/openmetrics-text;"), body[-100:]
            if content_type.startswith(b"application/"):
                families = openmetrics_families(body.decode())
            else:
                families = Scrape.parse(body.decode()).types
            assert families["migblockd_build_info"] == "gauge"
    assert d.stop() == 0
    assert_clean_log(d)


def openmetrics_families(text: str) -> dict[str, str]:
    """The families of an OpenMetrics answer and their types, by its strict parser."""
    families = openmetrics_parse(text)  # type: ignore[no-untyped-call]
    return {family.name: family.type for family in families}


@pytest.mark.parametrize("by", ["a new connection", "the stop"])
def test_a_head_cut_before_its_request_was_read_gets_no_body(
        short_tmp: Path, by: str) -> None:
    # Found by review: a HEAD cut to make room, or by the stop, while its header
    # lines trickled in (read whole once cut: the end of them) got the 503's
    # text after its head, which a HEAD's answer never has (RFC 9110, 9.3.2): a
    # client reads it as the start of a next answer.
    loop = asyncio.new_event_loop()
    path = short_tmp / "m.sock"
    metrics = MetricsServer.open(path, CollectorRegistry(), short_tmp / "q.sock", loop)
    metrics.start()
    held: list[socket.socket] = []
    try:
        head = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.append(head)
        head.settimeout(10)
        head.connect(str(path))
        head.sendall(b"HEAD /metrics HTTP/1.1\r\nAccept: */*\r\n")  # the end never comes
        time.sleep(0.1)  # the oldest
        if by == "a new connection":
            held += [trickler(path) for _ in range(MAX_SCRAPES - 1)]
            time.sleep(0.3)  # the server has taken them all
            late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(late)
            late.connect(str(path))
        else:
            time.sleep(0.3)  # its thread is reading its header lines
            metrics.close()
        status, fields, body = head_of(read_all(head))
    finally:
        for s in held:
            s.close()
        if by != "the stop":
            metrics.close()
        loop.close()
    assert status == b"HTTP/1.0 503 Service Unavailable", (status, fields, body)
    assert fields[b"Retry-After"] == b"1"
    assert body == b"", body


def test_requests_are_parsed_at_most_max_scrapes_a_window(
        server: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by review: requests answered at once (a 400, a 405, a 431 for 100
    # header lines) were parsed as fast as a client sent them, each up to a
    # millisecond under the interpreter lock: a local user's four connections
    # took 85% of a core and cut QMP throughput by 4 to 5.  At most MAX_SCRAPES
    # are parsed in each PARSE_WINDOW (here: the whole test); the next waits,
    # still sending as far as the server knows, and is closed to make room
    # with nothing of it parsed.
    monkeypatch.setattr(limits, "PARSE_WINDOW", 60.0, raising=False)
    flood = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n"
    for _ in range(MAX_SCRAPES):
        answer = exchange(server, flood)
        assert answer.startswith(b"HTTP/1.0 431 "), answer[:100]
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held = [waiting]
    try:
        waiting.settimeout(10)
        waiting.connect(str(server))
        waiting.sendall(flood)
        time.sleep(0.1)  # the oldest
        held += [trickler(server) for _ in range(MAX_SCRAPES - 1)]
        time.sleep(0.3)  # the server has taken them all
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.append(late)
        late.connect(str(server))
        assert_busy(read_all(waiting))  # not its 431
    finally:
        for s in held:
            s.close()
    # The fixture's stop cuts those still waiting for their turn at once.


def test_connections_churning_start_no_thread_each(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # Found by review: a thread started and ended for each connection, and a
    # timer thread for its deadline: 32 clients that only connected and closed
    # took 60 to 70% of a core, the event loop's.  Served by a pool, the daemon
    # starts at most MAX_SCRAPES threads for the endpoint, however many
    # connections come and go: the threads seen in /proc/PID/task while 64
    # clients churn are those it had before, and at most MAX_SCRAPES more.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral",
                     socket=short_tmp / "q.sock")
    tasks = Path(f"/proc/{d.proc.pid}/task")
    before = set(os.listdir(tasks))
    seen = set(before)
    stop = threading.Event()
    done = [0] * 64

    def churn(n: int) -> None:
        while not stop.is_set() and done[n] < 20:
            # Turned away (an OSError) when crowded.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, \
                    contextlib.suppress(OSError):
                s.connect(str(endpoint_path))
                if n % 2:  # half of them ask (answered at once), and read it
                    s.settimeout(10)
                    s.sendall(b"POST /metrics HTTP/1.1\r\n\r\n")
                    read_all(s)
            done[n] += 1

    clients = [threading.Thread(target=churn, args=(n,)) for n in range(64)]
    for client in clients:
        client.start()
    try:
        while any(client.is_alive() for client in clients):
            seen |= set(os.listdir(tasks))
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert sum(done) == 64 * 20
    started = seen - before
    assert len(started) <= MAX_SCRAPES, f"{len(started)} threads started for 1,280 connections"
    status, _, _ = get(UnixHTTPConnection(endpoint_path))
    assert status == 200
    assert d.stop() == 0
    assert_clean_log(d)


def test_a_head_turned_away_unread_gets_no_body(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path) -> None:
    # Found by review: a connection turned away by the accepting thread, never
    # read by a worker (none could be started; or every slot awaited its
    # answer), got the 503's text after its head whatever it had sent: a HEAD's
    # answer has no body (RFC 9110, 9.3.2), and a client that keeps the
    # connection reads it as the start of the next answer.  A HEAD sent before
    # the daemon accepts it (stopped meanwhile) is there to be seen.
    d, endpoint_path, limit, soft = threadless_daemon(start_daemon, short_tmp, tmp_path)
    pid = d.proc.pid
    limit(str(len(os.listdir(f"/proc/{pid}/task"))))  # no worker can be started
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            os.kill(pid, signal.SIGSTOP)
            try:
                s.connect(str(endpoint_path))
                s.sendall(b"HEAD /metrics HTTP/1.1\r\nAccept: */*\r\n\r\n")
            finally:
                os.kill(pid, signal.SIGCONT)
            status, fields, body = head_of(read_all(s))
    finally:
        limit(soft)
    assert status == b"HTTP/1.0 503 Service Unavailable", (status, fields, body)
    assert fields[b"Retry-After"] == b"1"
    assert body == b"", body
    # A GET turned away so still gets the text, which says why.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        limit(str(len(os.listdir(f"/proc/{pid}/task"))))
        try:
            os.kill(pid, signal.SIGSTOP)
            try:
                s.connect(str(endpoint_path))
                s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            finally:
                os.kill(pid, signal.SIGCONT)
            assert_busy(read_all(s))
        finally:
            limit(soft)
    d.wait_for_log("WARNING: metrics: no thread to serve a connection")
    assert d.stop() == 0
    assert_clean_log(d)


def patched_daemon(start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
                   tmp_path: Path, code: str) -> tuple[DaemonProcess, Path]:
    """An in-memory daemon serving metrics at ``short_tmp``/metrics.sock, ``code`` run
    in it first (a ``sitecustomize``: a constant of the daemon's set for the test)."""
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(custom), os.environ.get("PYTHONPATH")])))
    endpoint_path = short_tmp / "metrics.sock"
    return start_daemon("--metrics", str(endpoint_path), "--ephemeral",
                        socket=short_tmp / "q.sock", env=env), endpoint_path


def test_a_connection_handed_as_a_worker_ends_its_last_starts_no_worker_more(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path) -> None:
    # Found by review of the pool: a worker freed its connection's slot before it
    # counted itself free again, and a connection handed to the pool in between
    # (the accepting thread woken by that slot) found every worker taken and
    # started one more, kept for good: 17 and more, where MAX_SCRAPES is promised.
    # The gap is a few bytecodes long; the daemon's interpreter switches threads
    # every microsecond here (a sitecustomize), so that the accepting thread runs
    # in it often: 17 workers within 3 seconds of churn, each time, before.
    # The accept budget is lifted: the race is the pool's, and 6,000 connections
    # accepted 16 a window would take 40 s.
    d, endpoint_path = patched_daemon(
        start_daemon, short_tmp, tmp_path,
        "import sys\nsys.setswitchinterval(1e-6)\nimport migblockd.scrape_limits\n"
        "migblockd.scrape_limits.ACCEPT_BUDGET = 1 << 20\n")
    tasks = Path(f"/proc/{d.proc.pid}/task")
    before = set(os.listdir(tasks))
    seen = set(before)
    done = [0] * 40

    def churn(n: int) -> None:
        while done[n] < 150:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, \
                    contextlib.suppress(OSError):
                s.connect(str(endpoint_path))
                s.settimeout(10)
                s.sendall(b"POST /metrics HTTP/1.0\r\n\r\n")  # answered at once (405)
                read_all(s)
            done[n] += 1

    clients = [threading.Thread(target=churn, args=(n,)) for n in range(40)]
    for client in clients:
        client.start()
    while any(client.is_alive() for client in clients):
        seen |= set(os.listdir(tasks))
    for client in clients:
        client.join()
    started = seen - before
    assert len(started) <= MAX_SCRAPES, f"{len(started)} threads started for the endpoint"
    assert d.stop() == 0
    assert_clean_log(d)


CONNECT_CLOSE = """
import socket, sys, threading
def flood():
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            try:
                s.connect(sys.argv[1])
            except OSError:  # the queue is full: the daemon takes no more for now
                pass
for _ in range(3):
    threading.Thread(target=flood, daemon=True).start()
print("flooding", flush=True)
sys.stdin.read()  # until the test is done
"""


async def test_a_connect_close_flood_waits_in_the_queue_and_qmp_is_served(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # Found by review: the endpoint accepted connections as fast as they came, and
    # each cost some 100 us of Python on two threads, which the event loop waits
    # for (the interpreter lock): a client connecting and closing in a loop cut
    # QMP throughput by half to three quarters.  At most ACCEPT_BUDGET are
    # accepted a window, the log says so, and the rest wait in the listen queue.
    endpoint_path = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint_path), "--ephemeral", "--log-level", "info",
                     socket=short_tmp / "q.sock")
    flood = subprocess.Popen([sys.executable, "-c", CONNECT_CLOSE, str(endpoint_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout is not None and flood.stdout.readline() == "flooding\n"
        d.wait_for_log("WARNING: metrics: more than 16 connections within 0.1 s: the rest "
                       "wait in the listen queue (a client connecting in a loop?)")
        async with d.client() as c:  # served all along
            for n in range(100):
                await c.ok("add-blocker", {"reason": "during a flood", "id": f"f{n}"})
                await c.ok("del-blocker", {"id": f"f{n}"})
    finally:
        flood.communicate("", timeout=30)
    # Once over, a scraper is served: once the flood's connections still queued
    # (1,024, accepted ACCEPT_BUDGET a window) leave it room to connect.
    deadline = time.monotonic() + 60
    while True:
        try:
            status, _, _ = get(UnixHTTPConnection(endpoint_path))
            break
        except BlockingIOError:  # the queue is still full
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert status == 200
    assert d.stop() == 0
    assert_clean_log(d)


def test_workers_idle_for_long_end(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path) -> None:
    # Found by review: the workers started for a burst of connections were kept for
    # the daemon's life, 16 threads asleep after one burst.  One idle for
    # IDLE_WORKER seconds ends (0.5 s here, through a sitecustomize).
    d, endpoint_path = patched_daemon(
        start_daemon, short_tmp, tmp_path,
        "import migblockd.scrape_pool\nmigblockd.scrape_pool.IDLE_WORKER = 0.5\n")
    tasks = Path(f"/proc/{d.proc.pid}/task")
    before = set(os.listdir(tasks))
    held = []
    try:
        for _ in range(MAX_SCRAPES):  # silent: each holds a worker
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            s.connect(str(endpoint_path))
        deadline = time.monotonic() + 10
        while len(set(os.listdir(tasks)) - before) < MAX_SCRAPES:
            assert time.monotonic() < deadline, set(os.listdir(tasks)) - before
            time.sleep(0.05)
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 20
    while set(os.listdir(tasks)) - before:
        assert time.monotonic() < deadline, f"{len(set(os.listdir(tasks)) - before)} kept"
        time.sleep(0.05)
    # A scraper's next connection starts one again.
    status, _, _ = get(UnixHTTPConnection(endpoint_path))
    assert status == 200
    assert d.stop() == 0
    assert_clean_log(d)
