"""``--metrics``: the real daemon scraped over HTTP after a scripted session, parsed by
prometheus_client's own parser, every counter and gauge checked exactly.

Clients of other uids run under ``setpriv`` (access and quota refusals), a client that
stops reading is dropped for ``--max-output``, and the simulated migration is cancelled
once and completes once.  The endpoint is a Unix socket (mode 0600), or TCP on a port
the kernel picks.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, DaemonProcess, assert_clean_log
from fakeqmp import Line, serving
from metricstext import Scrape, baseline, commands, key
from otheruids import NAMELESS_GID, NAMELESS_UID, NAMELESS_UID2, UidClient
from qmpclient import RawClient, blocking_client, encode, qmp_client
from realqemu import Qemu, wait_until

from migblockd.scrape import gzip_wanted
from migblockd.startup import EXIT_FAILURE, EXIT_NOTCONFIGURED

SCHEMA_REQUESTS = 32  # one turn's worth: they all run before the daemon stops for the writer


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket, as a local scraper (or curl --unix-socket) speaks it."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(self.unix_path))
        self.sock = sock


def get(conn: http.client.HTTPConnection, path: str = "/metrics",
        method: str = "GET") -> tuple[int, str, str]:
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", \
            response.read().decode()
    finally:
        conn.close()


def scrape(where: Path | tuple[str, int]) -> Scrape:
    conn = (UnixHTTPConnection(where) if isinstance(where, Path)
            else http.client.HTTPConnection(*where, timeout=10))
    status, content_type, body = get(conn)
    assert status == 200, body
    assert content_type.startswith("text/plain; version="), content_type
    return Scrape.parse(body)


async def scrape_until(where: Path, predicate: Callable[[Scrape], bool], what: str) -> Scrape:
    result: list[Scrape] = []

    def check() -> bool:
        result[:] = [scrape(where)]
        return predicate(result[0])

    await wait_until(check, what)
    return result[0]


def uid_client(script: Path, daemon: DaemonProcess, uid: int) -> UidClient:
    return UidClient(script, daemon.socket, uid, NAMELESS_GID)


async def poll_status(client: RawClient, status: str) -> int:
    """query-migrate until the migration's status is ``status``; how many it took."""
    polls = 0
    while True:
        polls += 1
        if (await client.ok("query-migrate")).get("status") == status:
            return polls
        await asyncio.sleep(0.02)


async def test_every_counter_and_gauge_after_a_scripted_session(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
        uid_client_script: Path) -> None:
    short_tmp.chmod(0o755)  # the other uids must reach the QMP socket
    config = short_tmp / "migblockd.toml"
    config.write_text(f'[access]\nusers = {{ {NAMELESS_UID2} = "observer" }}\n')
    endpoint = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint), "--config", str(config), "--socket-mode",
                     "0666", "--only-migratable", "--migration-time", "0.2",
                     "--max-blockers-per-uid", "1", "--max-clients", "4", "--max-output", "1",
                     socket=short_tmp / "qmp.sock")
    d.wait_for_log(f"metrics: serving Prometheus metrics on http+unix://{endpoint}")
    assert stat.S_IMODE(os.stat(endpoint).st_mode) == 0o600
    fresh = scrape(endpoint)
    names = sorted(dict(k[1])["command"] for k in fresh.samples
                   if k[0] == "migblockd_commands_total")
    assert "add-blocker" in names and "qmp_capabilities" not in names
    assert fresh.plain() == baseline(names, durable=True)

    async with d.client() as a:  # root: admin
        vfio = await a.ok("add-blocker", {"reason": "vfio", "id": "vfio", "modes": ["cpr-reboot"]})
        await a.ok("add-blocker", {"reason": "dump", "id": "dump", "internal": True})
        for args, why in (({"reason": "again", "id": "vfio", "modes": ["cpr-reboot"]},
                           "Duplicate blocker ID"),
                          ({"reason": "tpm"}, "disallowing migration blocker (--only-migratable)"),
                          ({"reason": "r", "id": "1bad", "modes": ["cpr-exec"]}, "Parameter 'id'"),
                          ({}, "Parameter 'reason' is missing")):  # the last: the schema's
            reply = await a.execute("add-blocker", args)
            assert reply["error"]["desc"].startswith(why), reply

        u = uid_client(uid_client_script, d, NAMELESS_UID)  # default role: client
        u.ok("add-blocker", {"reason": "u1", "id": "u1", "modes": ["cpr-transfer"]})
        assert u.error("add-blocker", {"reason": "u2", "modes": ["cpr-transfer"]}).startswith(
            "Too many migration blockers for uid")
        assert u.error("migrate", {"uri": "tcp:h:1"}).startswith("Permission denied")
        o = uid_client(uid_client_script, d, NAMELESS_UID2)  # observer
        assert o.error("add-blocker", {"reason": "o"}).startswith("Permission denied")

        async with d.client() as c:
            await c.ok("add-blocker", {"reason": "held", "id": "held", "modes": ["cpr-exec"],
                                       "scope": "connection"})
            async with qmp_client(d.socket, negotiate=False, read_greeting=False) as e:
                assert "max-clients=4" in (await e.read())["error"]["desc"]
        assert (await a.wait_event("BLOCKER_DELETED"))["data"] == {
            "id": "held", "cause": "connection-closed"}

        assert (await a.execute("migrate", {"uri": "tcp:h:1"}))["error"]["desc"] == "dump"
        reply = await a.execute("migrate", {"uri": "nowhere"})
        assert reply["error"]["desc"] == "unknown migration protocol: nowhere"
        await a.ok("del-blocker", {"id": "dump"})
        assert "error" in await a.execute("del-blocker", {"id": "dump"})
        # In one write, so the migration cannot end between them.
        a.send_raw(encode({"execute": "migrate", "arguments": {"uri": "tcp:h:1"}})
                   + encode({"execute": "add-blocker",
                             "arguments": {"reason": "late", "internal": True}})
                   + encode({"execute": "migrate", "arguments": {"uri": "tcp:h:2"}})
                   + encode({"execute": "migrate_cancel"}))
        assert [next(iter(r)) for r in await a.read_replies(4)] == [
            "return", "error", "error", "return"]
        polls = await poll_status(a, "cancelled")
        await a.ok("migrate", {"uri": "tcp:h:3"})
        polls += await poll_status(a, "completed")

        # A client that stops reading: its replies fill the socket, then an event stays
        # unread and the next one is one too many (--max-output 1).
        d_sock = await asyncio.to_thread(blocking_client, d.socket)
        try:
            d_sock.sendall(encode({"execute": "query-qmp-schema"}) * SCHEMA_REQUESTS)
            await scrape_until(endpoint, lambda s: s.value(
                "migblockd_commands_total", command="query-qmp-schema", result="ok")
                == SCHEMA_REQUESTS, "the non-reader's requests ran")
            for wake in ("wake", "wake2"):
                await a.ok("add-blocker", {"reason": "wake", "id": wake, "modes": ["cpr-reboot"]})
            d.wait_for_log("dropped: more than max-output=1 bytes of unread events")
        finally:
            d_sock.close()
        await a.ok("migrate-set-parameters", {"mode": "cpr-reboot"})
        metrics = await scrape_until(endpoint, lambda s: s.value("migblockd_clients") == 3,
                                     "the dropped client is gone")

        expected = baseline(names, durable=True)
        added = vfio["added"]["seconds"] + vfio["added"]["microseconds"] / 1e6
        assert metrics.value("migblockd_blocked_since_seconds") == pytest.approx(added, abs=1e-6)
        expected.update({
            key("migblockd_blocked_since_seconds"): metrics.value(
                "migblockd_blocked_since_seconds"),
            key("migblockd_migration_mode", mode="normal"): 0,
            key("migblockd_migration_mode", mode="cpr-reboot"): 1,
            key("migblockd_blockers", source="migblockd", mode="cpr-reboot"): 3,  # vfio, wake*
            key("migblockd_blockers", source="migblockd", mode="cpr-transfer"): 1,  # u1
            key("migblockd_blockers_added_total"): 6,  # vfio, dump, u1, held, wake, wake2
            key("migblockd_blockers_deleted_total", cause="command"): 1,
            key("migblockd_blockers_deleted_total", cause="connection-closed"): 1,
            key("migblockd_blockers_refused_total", reason="duplicate-id"): 1,
            key("migblockd_blockers_refused_total", reason="only-migratable"): 1,
            key("migblockd_blockers_refused_total", reason="invalid"): 1,
            key("migblockd_blockers_refused_total", reason="quota"): 1,
            key("migblockd_blockers_refused_total", reason="access"): 1,
            key("migblockd_blockers_refused_total", reason="busy"): 1,
            key("migblockd_migrations_started_total"): 2,
            key("migblockd_migrations_refused_total", reason="access"): 1,
            key("migblockd_migrations_refused_total", reason="blocked"): 1,
            key("migblockd_migrations_refused_total", reason="invalid"): 1,
            key("migblockd_migrations_refused_total", reason="in-progress"): 1,
            key("migblockd_migrations_ended_total", status="completed"): 1,
            key("migblockd_migrations_ended_total", status="cancelled"): 1,
            key("migblockd_clients"): 3,  # a, u, o
            key("migblockd_connections_total"): 6,  # a, u, o, c, e, the non-reader
            key("migblockd_connections_refused_total", reason="max-clients"): 1,  # e
            key("migblockd_clients_dropped_total"): 1,
            # Five negotiations and one add-blocker without its reason.
            key("migblockd_protocol_replies_total"): 6,
            # One per durable change, each awaited: vfio, dump, u1, -dump, wake, wake2,
            # the mode.
            key("migblockd_commit_duration_seconds_count"): 7,
        })
        commands(expected, "add-blocker", ok=6, error=6)
        commands(expected, "migrate", ok=2, error=4)
        commands(expected, "del-blocker", ok=1, error=1)
        commands(expected, "migrate_cancel", ok=1)
        commands(expected, "query-migrate", ok=polls)
        commands(expected, "query-qmp-schema", ok=SCHEMA_REQUESTS)
        commands(expected, "migrate-set-parameters", ok=1)
        assert metrics.plain() == expected
        for name in ("add-blocker", "migrate", "del-blocker", "migrate_cancel", "query-migrate",
                     "query-qmp-schema", "migrate-set-parameters"):
            metrics.histogram("migblockd_command_duration_seconds", command=name)
        _, seconds = metrics.histogram("migblockd_commit_duration_seconds")
        assert seconds > 0
        assert metrics.value("process_open_fds") > 0
        u.close()
        o.close()
    assert d.stop() == 0
    assert not endpoint.exists()  # removed at exit, like the QMP socket
    assert_clean_log(d)


async def test_tcp_on_a_port_the_kernel_picks(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("--metrics", "127.0.0.1:0", "--ephemeral")
    port = int(d.wait_for_log(re.compile(
        r"metrics: serving Prometheus metrics on http://127\.0\.0\.1:(\d+)/metrics")).group(1))
    assert port > 0
    metrics = scrape(("127.0.0.1", port))
    assert metrics.value("migblockd_clients") == 0
    assert "migblockd_commit_duration_seconds" not in metrics.types  # nothing is committed
    async with d.client() as c:
        await c.ok("query-version")  # a command's latency, for the filter below
        assert scrape(("127.0.0.1", port)).value("migblockd_clients") == 1
    # What Prometheus asks for: OpenMetrics, gzip; and a filter by name.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics?name[]=migblockd_clients", headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        "Accept-Encoding": "gzip"})
    response = conn.getresponse()
    assert response.getheader("Content-Type", "").startswith(
        "application/openmetrics-text; version=1.0.0")
    assert response.getheader("Content-Encoding") == "gzip"
    body = gzip.decompress(response.read()).decode()
    conn.close()
    assert body == ("# HELP migblockd_clients Clients connected now\n"
                    "# TYPE migblockd_clients gauge\nmigblockd_clients 0.0\n# EOF\n")
    # The filter names samples, as prometheus_client's does: a histogram's _count
    # without its buckets, and a counter by its _total, not by its family's name.
    _, _, only = get(http.client.HTTPConnection("127.0.0.1", port, timeout=10),
                     "/metrics?name[]=migblockd_command_duration_seconds_count"
                     "&name[]=migblockd_blockers_added&name[]=migblockd_connections_total")
    samples = [line.split("{")[0].split(" ")[0] for line in only.splitlines()
               if not line.startswith("#")]
    assert set(samples) == {"migblockd_command_duration_seconds_count",
                            "migblockd_connections_total"}, only
    # gzip refused by its weight (RFC 9110, 12.5.3): the plain text.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics?name[]=migblockd_clients",
                 headers={"Accept-Encoding": "gzip;q=0, identity"})
    response = conn.getresponse()
    assert response.getheader("Content-Encoding") is None
    assert response.read().startswith(b"# HELP migblockd_clients ")
    conn.close()
    # What else an HTTP client may send: an answer, no traceback.
    status, _, _ = get(http.client.HTTPConnection("127.0.0.1", port, timeout=10), method="POST")
    assert status == 405
    # The Server header names no interpreter version, in an answer or an error.
    for request in (b"GET /metrics HTTP/1.0\r\n\r\n", b"GET /metrics HTTP/1.0 x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(request)
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        servers = [line for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n")
                   if line.lower().startswith(b"server:")]
        assert servers == [b"Server: migblockd"], answer[:300]

    def head(headers: bytes = b"") -> tuple[bytes, bytes, bytes]:
        """A HEAD request's answer: (it all, its header block, what follows)."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        block, _, rest = answer.partition(b"\r\n\r\n")
        return answer, block, rest

    # An uptime probe's HEAD: the GET's status and type, no body.
    answer, head_block, rest = head()
    assert head_block.startswith(b"HTTP/1.0 200 OK\r\n"), answer
    assert b"\r\nContent-Type: text/plain; version=0.0.4" in head_block, answer
    # No length rather than a wrong one (RFC 9110, 8.6: the GET's, or none).
    assert b"Content-Length" not in head_block, answer
    assert rest == b"", answer
    assert b"Content-Encoding" not in head_block, answer
    # Asked for gzip, HEAD says what the GET would (RFC 9110, 9.3.2): a cache or a
    # probe that compares the two must not see the encoding change.
    answer, head_block, rest = head(b"Accept-Encoding: gzip\r\n")
    assert head_block.startswith(b"HTTP/1.0 200 OK\r\n"), answer
    assert b"\r\nContent-Encoding: gzip" in head_block and rest == b"", answer
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET / what HTTP/1.1\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.0 400")
    assert d.stop() == 0
    assert_clean_log(d)


def test_the_endpoint_never_takes_the_qmp_socket_nor_a_live_one(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    qmp = short_tmp / "qmp.sock"
    d = start_daemon("--metrics", str(qmp), "--ephemeral", socket=qmp, wait=False)
    assert d.wait_exit() != 0
    d.wait_for_log(f"--metrics {qmp}: that is the QMP socket")
    first = start_daemon("--metrics", str(short_tmp / "m.sock"), "--ephemeral",
                         socket=short_tmp / "one.sock")
    second = start_daemon("--metrics", str(short_tmp / "m.sock"), "--ephemeral",
                          socket=short_tmp / "two.sock", wait=False)
    assert second.wait_exit() != 0
    second.wait_for_log(f"another migblockd (pid {first.proc.pid}) is already serving "
                        f"{short_tmp}/m.sock; refusing to start a second one (stop it first, "
                        "or choose another --metrics)")
    assert not (short_tmp / "two.sock").exists()  # the QMP socket was not left behind
    assert scrape(short_tmp / "m.sock").value("migblockd_clients") == 0  # still first's
    assert first.stop() == 0


def test_a_port_in_use_says_who_to_ask_and_what_to_do(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # Before: "cannot listen: Address already in use", and nothing about what to do.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = start_daemon("--metrics", f"127.0.0.1:{port}", "--ephemeral",
                         socket=short_tmp / "q.sock", wait=False)
        assert d.wait_exit() == EXIT_FAILURE  # the port may be free at the next start
    d.wait_for_log(f"ERROR: --metrics 127.0.0.1:{port}: cannot listen: Address already in "
                   "use; another program (another migblockd, say) listens on that port (`ss "
                   f"-ltnp 'sport = :{port}'` names it): stop it, or choose another port\n")
    assert not (short_tmp / "q.sock").exists()


@pytest.mark.parametrize(("address", "loopback"), [
    ("192.0.2.1:9715", "127.0.0.1"),  # TEST-NET-1 (RFC 5737)
    ("[2001:db8::1]:9715", "[::1]"),  # documentation prefix (RFC 3849): not IPv4's loopback
])
def test_an_address_of_no_interface_here_is_named_so(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, address: str,
        loopback: str) -> None:
    d = start_daemon("--metrics", address, "--ephemeral", socket=short_tmp / "q.sock",
                     wait=False)
    # An interface may have it at the next start (one not up yet, at boot).
    assert d.wait_exit() == EXIT_FAILURE
    message = (f"--metrics {address}: cannot listen: Cannot assign requested address; no "
               "interface of this machine has that address (`ip -brief address` lists "
               f"theirs): choose one of them, or {loopback}")
    d.wait_for_log(f"ERROR: {message}\n")
    # The check says it too (before, "valid"), without listening there, and exits as
    # the start does (before, 6: an operator's to mend, which it may not be).
    check = [sys.executable, "-m", "migblockd", "--check-config", "--metrics", address,
             "--ephemeral", "--socket", str(short_tmp / "q.sock")]
    checked = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (checked.returncode, checked.stderr) == (EXIT_FAILURE, f"migblockd: {message}\n")
    # With a mistake no later start gets past as well, it is the operator's: 6.
    both = subprocess.run([*check, "--socket-group", "migblockd-no-such-group"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (both.returncode, both.stderr) == (
        EXIT_NOTCONFIGURED, f"migblockd: --socket-group: there is no group named "
        f"'migblockd-no-such-group'\nmigblockd: {message}\n")


def assert_check_and_start_refuse(daemon: list[str], args: list[str], message: str,
                                  status: int = EXIT_NOTCONFIGURED) -> None:
    """``DAEMON --check-config ARGS`` and ``DAEMON ARGS`` refuse in the same words, and
    exit ``status``."""
    checked = subprocess.run([*daemon, "--check-config", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert (checked.returncode, checked.stdout, checked.stderr) == (
        status, "", f"migblockd: {message}\n")
    started = subprocess.run([*daemon, *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert started.returncode == status
    assert f"ERROR: {message}\n" in started.stderr, started.stderr


#: A network namespace of its own with two interfaces, v0 and v1 (a veth pair),
#: and a link-local address on v0 alone; ``NONLOCAL=1``: with
#: net.ipv6.ip_nonlocal_bind, under which a bind no longer tells who has it.
LINK_LOCAL_NETNS = ["unshare", "--net", "sh", "-c",
                    "ip link set lo up && ip link add v0 type veth peer name v1 && "
                    "ip link set v0 up && ip link set v1 up && "
                    "ip address add fe80::1/64 dev v0 nodad && "
                    '{ [ -z "$NONLOCAL" ] || sysctl -qw net.ipv6.ip_nonlocal_bind=1; } && '
                    'exec "$@"', "sh", sys.executable, "-m", "migblockd"]


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a network namespace")
@pytest.mark.parametrize("nonlocal_bind", ["", "1"])
def test_a_link_local_address_is_asked_for_its_interface(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch, nonlocal_bind: str) -> None:
    # Found by review: without its interface the check said valid and the start
    # said only "cannot listen: Invalid argument"; then that the advice named
    # the wrong interface, or none, for the cases below.
    monkeypatch.setenv("NONLOCAL", nonlocal_bind)
    args = ["--socket", str(short_tmp / "q.sock"), "--ephemeral", "--metrics"]
    for address, advice in [
        ("[fe80::1]:9715", "Invalid argument; fe80::1 is a link-local address, which every "
                           "interface may have: name the interface, as [fe80::1%v0]:9715"),
        ("[fe80::1%0]:9715", "Invalid argument; fe80::1 is a link-local address, which "
                             "every interface may have: name the interface, as "
                             "[fe80::1%v0]:9715"),
        ("[fe80::99]:9715", "Invalid argument; fe80::99 is a link-local address, which no "
                            "interface of this machine has (`ip -brief address` lists "
                            "theirs): choose one of them with its interface "
                            "([fe80::...%eth0]), or [::1]"),
        ("[fe80::1%99]:9715", "No such device; interface 99 is none of this machine's: "
                              "fe80::1 is on v0, as [fe80::1%v0]:9715"),
        ("[fe80::1%v1]:9715", "Cannot assign requested address; fe80::1 is not on "
                              "interface v1 but on v0: name that one, as [fe80::1%v0]:9715"),
    ]:
        if nonlocal_bind and "%v1" in address:
            continue  # binds: the kernel is told not to check
        # EADDRNOTAVAIL: an address an interface may have at the next start (one not
        # up yet, at boot); the other two name none that could ever listen.
        assert_check_and_start_refuse(LINK_LOCAL_NETNS, [*args, address],
                                      f"--metrics {address}: cannot listen: {advice}",
                                      EXIT_FAILURE if "%v1" in address else EXIT_NOTCONFIGURED)
    named = subprocess.run([*LINK_LOCAL_NETNS, "--check-config", *args, "[fe80::1%v0]:9715"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert named.returncode == 0, named.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a network namespace")
def test_a_link_local_address_is_logged_with_its_interface(short_tmp: Path) -> None:
    daemon = subprocess.Popen([*LINK_LOCAL_NETNS, "--socket", str(short_tmp / "q.sock"),
                               "--ephemeral", "--metrics", "[fe80::1%v0]:0"],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert daemon.stderr is not None
    try:
        for line in daemon.stderr:
            if "metrics: serving" in line or "ERROR" in line:
                break
    finally:
        daemon.terminate()
        daemon.communicate(timeout=30)
    # The kernel's answer carries the interface as a number: the log names it, as
    # a client must (before, http://[fe80::1]:PORT/metrics, which none can reach).
    assert re.search(r"metrics: serving Prometheus metrics on "
                     r"http://\[fe80::1%v0\]:\d+/metrics$", line.rstrip()), line


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as nobody")
def test_a_port_below_1024_is_refused_to_a_daemon_that_may_not_bind_it(
        short_tmp: Path) -> None:
    # Reproduced first: --check-config said "valid", and the start said only
    # "cannot listen: Permission denied".
    short_tmp.chmod(0o755)
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    assert start > 80, "this host lets every user bind port 80: nothing to refuse here"
    args = ["--socket", str(run / "q.sock"), "--ephemeral", "--metrics", "127.0.0.1:80"]
    message = (f"--metrics 127.0.0.1:80: cannot listen: Permission denied; a port below "
               f"{start} takes the CAP_NET_BIND_SERVICE capability, which this daemon, "
               f"running as uid 65534 (nobody), does not have: choose a port of {start} or "
               "more, or grant it (under systemd, AmbientCapabilities=CAP_NET_BIND_SERVICE)")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                 sys.executable, "-m", "migblockd"]
    assert_check_and_start_refuse(as_nobody, args, message)
    # An IPv6 address of no interface here: the kernel looks at the port first, and
    # so does the check (found by review: it said "no interface").
    v6 = [*args[:-1], "[2001:db8::1]:80"]
    assert_check_and_start_refuse(as_nobody, v6, message.replace(
        "127.0.0.1:80", "[2001:db8::1]:80"))
    # Root has the capability: valid.
    root = subprocess.run([sys.executable, "-m", "migblockd", "--check-config", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert root.returncode == 0, root.stderr
    # Where /proc/sys is hidden (the units' ProcSubset=pid) the limit cannot be
    # read: the check does not refuse what it cannot tell (the sysctl may be 0).
    hidden = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         'mount -t proc -o subset=pid proc /proc && exec "$@"', "sh",
         *as_nobody, "--check-config", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (hidden.returncode, hidden.stderr) == (0, ""), hidden.stderr


def test_a_socket_in_proc_is_refused_by_the_check_as_by_the_start(short_tmp: Path) -> None:
    # Reproduced first: --check-config called --metrics /proc/m.sock valid (root may
    # write /proc by its mode, on a read-write mount), and the start exited 6.
    daemon = [sys.executable, "-m", "migblockd"]
    args = ["--socket", str(short_tmp / "q.sock"), "--ephemeral", "--metrics"]
    for where in ("/proc", "/proc/sys"):  # /proc/sys: the check said "Permission denied"
        assert_check_and_start_refuse(daemon, [*args, f"{where}/m.sock"], (
            f"cannot open the socket's lock file {where}/m.sock.lock: No such file or "
            "directory; choose another --metrics"))
    assert_check_and_start_refuse(daemon, [*args, "/proc/new/m.sock"],
                                  "cannot create /proc/new: No such file or directory")
    # The QMP socket's path is judged by the same check.
    assert_check_and_start_refuse(daemon, ["--socket", "/proc/q.sock", "--ephemeral"], (
        "cannot open the socket's lock file /proc/q.sock.lock: No such file or directory; "
        "choose another --socket"))


def test_a_low_port_in_a_network_another_user_namespace_owns_is_refused(
        short_tmp: Path) -> None:
    # Reproduced first: under `unshare --user --map-root-user` (a rootless
    # container sharing the host's network) CapEff is full, so --check-config said
    # "valid", and the start said the daemon lacked the capability it has.
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    assert start > 80, "this host lets every user bind port 80: nothing to refuse here"
    args = ["--socket", str(short_tmp / "q.sock"), "--ephemeral", "--metrics", "127.0.0.1:80"]
    message = (f"--metrics 127.0.0.1:80: cannot listen: Permission denied; a port below "
               f"{start} takes the CAP_NET_BIND_SERVICE capability in the user namespace "
               "that owns the network namespace, and this daemon has it only in a user "
               "namespace of its own (unshare --user without --net?): choose a port of "
               f"{start} or more, or start it outside that user namespace")
    inside = ["unshare", "--user", "--map-root-user", sys.executable, "-m", "migblockd"]
    assert_check_and_start_refuse(inside, args, message)
    # Root's own capability counts in a network a child user namespace owns
    # (found by review: the check refused it, the start served it).
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net", "sleep", "60"])
    try:
        for _ in range(100):  # until unshare has made the namespaces
            if os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            time.sleep(0.05)
        child = subprocess.run(
            ["nsenter", "-t", str(holder.pid), "--net", "sh", "-c",
             'ip link set lo up && exec "$@"', "sh", sys.executable, "-m", "migblockd",
             "--check-config", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (child.returncode, child.stderr) == (0, ""), child.stderr
    finally:
        holder.kill()
        holder.wait()
    # With a network of its own user namespace, the capability counts: it serves.
    own = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "sh", "-c",
         'ip link set lo up && exec "$@"', "sh", sys.executable, "-m", "migblockd",
         "--check-config", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (own.returncode, own.stderr) == (0, ""), own.stderr


def test_a_bad_address_is_refused_before_anything_starts() -> None:
    proc = subprocess.run([sys.executable, "-m", "migblockd", "--metrics", "9715"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert ("argument --metrics: must be host:port (TCP, such as 127.0.0.1:9715, or "
            "[::1]:9715 with an IPv6 address in brackets) or an absolute path (a Unix "
            "socket), not '9715'") in proc.stderr


@pytest.mark.parametrize("address", ["::9715", "::1:9715", "fe80::1", "http://127.0.0.1:9715"])
def test_an_ipv6_address_without_brackets_is_refused(address: str, tmp_path: Path) -> None:
    # Taken apart at its last colon: "::1:9715" served on [::1]:9715, but "::9715"
    # (every address, port 9715) was "--metrics [:]:9715: Name or service not known",
    # an IPv6 address without a port a port of its last group, and a URL's scheme part
    # of its host ("[http://127.0.0.1]:9715").
    proc = subprocess.run([sys.executable, "-m", "migblockd", "--check-config", "--ephemeral",
                           "--socket", str(tmp_path / "q.sock"), "--metrics", address],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert ("argument --metrics: must be host:port (TCP, such as 127.0.0.1:9715, or "
            "[::1]:9715 with an IPv6 address in brackets) or an absolute path (a Unix "
            f"socket), not {address!r}") in proc.stderr


async def test_gate_qemus_blockers_link_and_migration_outcomes(
        start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path) -> None:
    endpoint = short_tmp / "metrics.sock"
    d = start_daemon("--qemu", str(qemu.gate_socket), "--metrics", str(endpoint),
                     "--ephemeral")
    d.wait_for_log("connected to QEMU 7.")
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_qemu_connected") == 1
    lost = "migblockd_qemu_connections_lost_total"
    assert metrics.types["migblockd_qemu_connections_lost"] == "counter"
    assert (metrics.value(lost, reason="closed"), metrics.value(lost, reason="dropped")) == (
        0, 0)
    async with qemu.monitor() as mon, d.client() as c:
        await mon.add_blocker("vdi1")
        assert [b["source"] for b in await c.ok("query-blockers")] == ["qemu"]
        assert scrape(endpoint).value("migblockd_blockers", source="qemu", mode="normal") == 1
        reply = await c.execute("migrate", {"uri": "exec:cat > /dev/null"})
        assert reply["error"]["desc"] == mon.blocker_text("vdi1")  # QEMU refused it
        await mon.remove_blocker("vdi1")
        await c.ok("migrate", {"uri": "exec:cat > /dev/null"})
        await poll_status(c, "completed")  # no MIGRATION events: query-migrate tells
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_blockers", source="qemu", mode="normal") == 0
    assert metrics.value("migblockd_migrations_refused_total", reason="qemu") == 1
    assert metrics.value("migblockd_migrations_started_total") == 1
    assert metrics.value("migblockd_migrations_ended_total", status="completed") == 1
    qemu.kill()
    await wait_until(lambda: scrape(endpoint).value("migblockd_qemu_connected") == 0,
                     "the link is down")
    metrics = scrape(endpoint)
    assert key("migblockd_blockers", source="qemu", mode="normal") not in metrics.samples
    # Counted once, by who ended it (QEMU), before the gauge fell.
    assert (metrics.value(lost, reason="closed"), metrics.value(lost, reason="dropped")) == (
        1, 0)
    qemu.start()
    await wait_until(lambda: scrape(endpoint).value("migblockd_qemu_connected") == 1,
                     "the link is up again")
    qemu.kill()
    await wait_until(lambda: scrape(endpoint).value(lost, reason="closed") == 2,
                     "the second loss counted")
    assert d.stop() == 0


async def test_connections_the_gate_dropped_over_garbage_are_counted_as_dropped(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # A real QEMU sends no garbage: a fake peer answers query-migrate (the link's own
    # question on connecting) with a line that is not JSON, on each connection.
    endpoint, peer = short_tmp / "metrics.sock", short_tmp / "peer.sock"
    with serving(peer, returns={"query-migrate": Line("not JSON")}):
        d = start_daemon("--qemu", str(peer), "--metrics", str(endpoint), "--ephemeral")
        lost = "migblockd_qemu_connections_lost_total"
        metrics = await scrape_until(endpoint, lambda m: m.value(lost, reason="dropped") >= 2,
                                     "two connections dropped")
        assert metrics.value(lost, reason="closed") == 0
    d.wait_for_log(f"lost the connection to QEMU at {peer}: QEMU sent a message that is "
                   "not JSON, b'not JSON\\r\\n'; migblockd dropped the connection")
    assert d.stop() == 0


async def test_a_qemu_killed_mid_reply_is_counted_as_closed_not_dropped(
        start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path) -> None:
    # Found by review: the part of a reply QEMU wrote before it was killed, a line with
    # no end, was parsed as a message: "QEMU sent a message that is not JSON ...;
    # migblockd dropped the connection", counted as dropped, as if QEMU ran on.
    config, endpoint = short_tmp / "migblockd.toml", short_tmp / "metrics.sock"
    config.write_text('qemu-passthrough = ["qom-get"]\n')
    async with qemu.monitor() as mon:  # a property whose value the socket cannot hold
        await mon.ok("object-add", {"qom-type": "authz-simple", "id": "big",
                                    "identity": "x" * 500_000})
    d = start_daemon("--config", str(config), "--qemu", str(qemu.gate_socket),
                     "--metrics", str(endpoint), "--ephemeral")
    d.wait_for_log("connected to QEMU 7.")
    assert qemu.proc is not None
    async with d.client() as c:
        qemu.stop()  # it reads the request once migblockd no longer reads
        await c.send({"execute": "qom-get", "id": 1,
                      "arguments": {"path": "/objects/big", "property": "identity"}})
        d.wait_for_log('-> b\'{"execute":"qom-get"')
        d.signal(signal.SIGSTOP)
        try:
            qemu.proc.send_signal(signal.SIGCONT)
            async with qemu.monitor() as mon:  # answered after the gate's request
                await mon.ok("query-status")
            qemu.kill()  # the rest of its answer waits for room in the socket
        finally:
            d.signal(signal.SIGCONT)
        assert "error" in await c.read_reply()
    lost = "migblockd_qemu_connections_lost_total"
    metrics = await scrape_until(
        endpoint, lambda m: m.value(lost, reason="closed") + m.value(lost, reason="dropped") > 0,
        "the loss counted")
    assert (metrics.value(lost, reason="closed"), metrics.value(lost, reason="dropped")) == (
        1, 0)
    assert "migblockd dropped the connection" not in d.log()
    assert d.stop() == 0


async def test_a_qemu_there_that_never_greets_is_unresponsive(
        start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path) -> None:
    """Reported: a QEMU that accepts migblockd's connection and never greets (another
    client holds its monitor, which QEMU serves one at a time; or it is stopped) gets
    every add-blocker refused as busy, yet its metrics read as those of a QEMU that is
    not running, where blockers are added: connected 0 and unresponsive 0."""
    endpoint = short_tmp / "metrics.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.settimeout(10)
        holder.connect(str(qemu.gate_socket))
        assert holder.recv(4096).startswith(b'{"QMP"')  # greeted: it holds the monitor
        d = start_daemon("--qemu", str(qemu.gate_socket), "--metrics", str(endpoint),
                         "--ephemeral")
        d.wait_for_log("accepted the connection but has not greeted after")
        metrics = scrape(endpoint)
        assert metrics.value("migblockd_qemu_connected") == 0
        assert metrics.value("migblockd_qemu_unresponsive") == 1
        async with d.client() as c:
            reply = await c.execute("add-blocker", {"reason": "r"})
        assert reply["error"]["desc"] == (
            "disallowing migration blocker (migration/snapshot in progress) for: r")
    # Let go: QEMU greets migblockd's connection, waiting in its backlog.
    await wait_until(lambda: scrape(endpoint).value("migblockd_qemu_connected") == 1,
                     "migblockd connected to QEMU")
    assert scrape(endpoint).value("migblockd_qemu_unresponsive") == 0
    assert d.stop() == 0


def test_stopping_is_not_held_up_by_an_idle_scraper(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    endpoint = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint), "--ephemeral", socket=short_tmp / "q.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(endpoint))  # connected, sends nothing
        assert d.stop() == 0  # its thread does not hold up the exit
    assert_clean_log(d)


@pytest.mark.parametrize(("header", "wanted"), [
    ("gzip", True), ("GZip, deflate", True), ("deflate, gzip;q=0.5", True), ("x-gzip", True),
    ("", False), ("identity", False), ("*", False), ("gzip;q=0", False),
    ("gzip; q=0.000", False), ("gzip;q=zero", False), ("br, gzip ; Q=0", False),
    ("gzipped", False),
])
def test_gzip_only_when_asked_with_a_weight(header: str, wanted: bool) -> None:
    assert gzip_wanted(header) is wanted


async def test_only_drops_for_max_output_are_counted_as_dropped(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    # Every drop was counted: a client that never negotiated nor read its greeting,
    # closed by --negotiation-timeout and then dropped for not taking its last
    # replies, counted as one disconnected past --max-output.
    endpoint = short_tmp / "metrics.sock"
    d = start_daemon("--metrics", str(endpoint), "--negotiation-timeout", "0.5",
                     "--max-output", "1", "--ephemeral", socket=short_tmp / "qmp.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(d.socket))  # reads nothing, sends nothing
        d.wait_for_log("dropped: took none of its last replies", timeout=30)
    assert scrape(endpoint).value("migblockd_clients_dropped_total") == 0
    # A drop for --max-output still counts: replies fill the non-reader's socket,
    # then an event stays unread and the next one is one too many.
    async with d.client() as a:
        non_reader = await asyncio.to_thread(blocking_client, d.socket)
        try:
            non_reader.sendall(encode({"execute": "query-qmp-schema"}) * SCHEMA_REQUESTS)
            await scrape_until(endpoint, lambda s: s.value(
                "migblockd_commands_total", command="query-qmp-schema", result="ok")
                == SCHEMA_REQUESTS, "the non-reader's requests ran")
            for wake in ("wake", "wake2"):
                await a.ok("add-blocker", {"reason": "wake", "id": wake})
            d.wait_for_log("dropped: more than max-output=1 bytes of unread events")
        finally:
            non_reader.close()
    assert scrape(endpoint).value("migblockd_clients_dropped_total") == 1
    assert d.stop() == 0
    assert_clean_log(d)
