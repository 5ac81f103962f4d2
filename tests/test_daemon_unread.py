"""--max-output with real uids: one user's traffic must not lift another's blocker.

Every client gets every event, and one that leaves more than ``--max-output`` of
them unread is dropped, which releases its connection-scoped blockers.  So a client
holding such blockers is kept instead, and events to it are discarded until it
reads; a client holding none is dropped as before.  Each client is a separate
process under ``setpriv`` (its own uid); bob's 1 KiB reasons make the events.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, assert_clean_log
from metricstext import Scrape
from otheruids import Account, UidClient

REASON = "r" * 1024
BOUND = 100_000  # --max-output: a few hundred events, past what the pipes hold


@pytest.fixture
def clients(uid_client_script: Path) -> Iterator[Callable[[DaemonProcess, Account], UidClient]]:
    made: list[UidClient] = []

    def make(daemon: DaemonProcess, who: Account) -> UidClient:
        client = UidClient(uid_client_script, daemon.socket, who.uid, who.gid)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def churn(bob: UidClient, prefix: str, pairs: int) -> None:
    """``pairs`` add-blocker/del-blocker pairs, pipelined; every reply must be a success."""
    assert bob.proc.stdin is not None
    for n in range(pairs):
        for request in ({"execute": "add-blocker",
                         "arguments": {"id": f"{prefix}{n}", "reason": REASON}},
                        {"execute": "del-blocker", "arguments": {"id": f"{prefix}{n}"}}):
            bob.proc.stdin.write(json.dumps(request).encode() + b"\n")
    bob.proc.stdin.flush()
    for _ in range(2 * pairs):
        while "event" in (message := bob.read()):
            pass
        assert "return" in message, message


def scrape(endpoint: Path) -> Scrape:
    """One scrape of the metrics endpoint, a Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(endpoint))
        conn = http.client.HTTPConnection("localhost", timeout=10)
        conn.sock = sock
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return Scrape.parse(response.read().decode())


def line(account: Account, what: str) -> re.Pattern[str]:
    return re.compile(rf"client \d+ \(pid \d+, uid {account.uid}, gid {account.gid}\): {what}")


def test_a_reader_holding_a_connection_blocker_is_kept_and_one_holding_none_dropped(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
        accounts: dict[str, Account],
        clients: Callable[[DaemonProcess, Account], UidClient]) -> None:
    short_tmp.chmod(0o755)  # every test uid must reach the socket
    endpoint = short_tmp / "metrics.sock"
    d = start_daemon("--socket-mode", "0666", "--max-output", str(BOUND),
                     "--metrics", str(endpoint),
                     "--max-reason-length", "2048", "--log-level", "info",
                     socket=short_tmp / "s.sock")
    alice_account, bob_account = accounts["mbt-alice"], accounts["mbt-bob"]
    dave_account = accounts["mbt-dave"]
    alice = clients(d, alice_account)
    alice.ok("add-blocker", {"id": "agentA", "reason": "agent A at work",
                             "scope": "connection"})
    alice.events.clear()  # its own BLOCKER_ADDED
    dave = clients(d, dave_account)  # holds nothing; reads nothing from now on
    bob = clients(d, bob_account)
    kept = line(alice_account, re.escape(
        f"more than max-output={BOUND} bytes of unread events; kept, as it holds "
        "connection-scoped blockers (agentA): events to it are discarded until it reads"))
    dropped = line(dave_account,
                   re.escape(f"dropped: more than max-output={BOUND} bytes of unread events"))
    rounds = 0
    while not (kept.search(d.log()) and dropped.search(d.log())):
        assert rounds < 60, d.log()[-3000:]  # 6,000 pairs: 12 MB of events
        churn(bob, f"b{rounds}-", 100)
        rounds += 1
    churn(bob, "late", 50)  # alice still reads nothing: 100 events she misses
    log = d.log()
    assert len(kept.findall(log)) == 1, log[-3000:]  # once for the episode
    assert "released" not in log, log[-3000:]
    assert "agentA" in [b["id"] for b in bob.ok("query-blockers")]

    # Alice reads again: all that was queued for her, then her reply (agentA's still hers).
    listing = alice.ok("query-blockers")
    assert [(b["id"], b["scope"]) for b in listing] == [("agentA", "connection")]
    seen = [e["data"]["id"] for e in alice.events]
    assert seen[:2] == ["b0-0", "b0-0"], seen[:4]  # the start of the churn came to her ...
    assert not [i for i in seen if i.startswith("late")], seen[-4:]  # ... the late part not
    alice.events.clear()
    missed = d.wait_for_log(line(alice_account, rf"back within max-output={BOUND} bytes of "
                                                r"unread events: events go to it again; "
                                                r"it missed (\d+)"))
    assert int(missed.group(1)) >= 100
    # Later events come to her again, and her commands work.
    bob.ok("add-blocker", {"id": "after", "reason": "after"})
    event: dict[str, Any] = alice.read()
    assert (event["event"], event["data"]["id"]) == ("BLOCKER_ADDED", "after"), event
    assert alice.ok("del-blocker", {"id": "agentA"}) == {}
    assert [b["id"] for b in bob.ok("query-blockers")] == ["after"]
    # Dave, holding nothing, was dropped: what was buffered for him, then the end.
    assert dave.proc.stdin is not None
    dave.proc.stdin.close()  # his relay exits once its connection has ended
    assert dave.proc.stdout is not None
    # Up to its end (the drop cuts the line being written: the last may be a piece).
    rest = (dave._buffer + dave.proc.stdout.read()).decode()
    got = re.findall(r'"id": "([^"]*)"', rest)
    assert got[0] == "b0-0" and "late0" not in got and "after" not in got, got[-4:]
    # Each event alice missed is counted; dave's drop is the only one.
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_events_discarded_total") == int(missed.group(1))
    assert metrics.value("migblockd_clients_dropped_total") == 1
    assert d.proc.poll() is None
    assert_clean_log(d)
