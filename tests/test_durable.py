"""The durable registry end to end: real daemon processes on real SQLite files.

A restart (SIGTERM, SIGKILL) restores exactly what was acknowledged; one daemon
owns a state directory; bad state stops the daemon at start with one line and
is left as it was; ``--ephemeral`` forgets.  The random-crash test is in
test_durable_crash.py, a full disk while running in test_durable_diskfull.py.

Root ignores file permissions, so the permission cases run the daemon through
``setpriv``, which drops the capabilities that bypass them
(``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``): the kernel then checks the
mode bits as for any owner, as in test_state_store.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, DaemonProcess, assert_clean_log, flip_bit, owner_info, wait_ready
from faults import delayed, injecting
from otheruids import Account, bare_uid
from qmpclient import RawClient

from migblockd.startup import EXIT_NOTCONFIGURED
from migblockd.state import BlockerRow, Put, Store
from migblockd.state.schema import MIGRATIONS

MODES = ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]
READY = " ready on "
Start = Callable[..., DaemonProcess]


def restored_line(directory: Path, count: int) -> str:
    return (f"restored {count} {'blocker' if count == 1 else 'blockers'} from "
            f"{directory}/state.db")


async def blockers(client: RawClient) -> list[dict[str, Any]]:
    listing: list[dict[str, Any]] = await client.ok("query-blockers")
    return listing


async def ids(client: RawClient) -> list[str]:
    return [b["id"] for b in await blockers(client)]


async def add(client: RawClient, reason: str, **args: Any) -> dict[str, Any]:
    info: dict[str, Any] = await client.ok("add-blocker", {"reason": reason, **args})
    return info


async def state_of(client: RawClient) -> dict[str, Any]:
    """Everything a restart must bring back, as clients see it: the blockers, the
    mode, the events capability, and each mode's ``blocked-reasons``.

    Going through the modes changes the mode, so it is set back afterwards.
    """
    mode = (await client.ok("query-migrate-parameters"))["mode"]
    reasons: dict[str, list[str]] = {}
    for each in MODES:
        await client.ok("migrate-set-parameters", {"mode": each})
        reasons[each] = (await client.ok("query-migrate")).get("blocked-reasons", [])
    await client.ok("migrate-set-parameters", {"mode": mode})
    return {
        "blockers": await blockers(client),
        "mode": mode,
        "query-migrate": await client.ok("query-migrate"),
        "capabilities": await client.ok("query-migrate-capabilities"),
        "blocked-reasons": reasons,
    }


def holder(lock: Path) -> str:
    """The pid in the state directory's lock file (its first line; then comes the
    note of which file the daemon opened), or "" once it has let go."""
    return lock.read_text().split("\n", 1)[0].strip()


def kill(daemon: DaemonProcess) -> None:
    daemon.proc.kill()
    daemon.proc.wait()


# ----------------------------------------------------------------- restart restores


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_restart_restores_exactly(start_daemon: Start, tmp_path: Path, how: str) -> None:
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c, first.client() as held:
        await add(c, "SEV: Migration is not implemented")  # #blocker0, every mode
        await add(c, "vfio 0000:01:00.0", id="vfio0", modes=["normal", "cpr-transfer"])
        await add(c, "dump in progress", internal=True, modes=["cpr-reboot"])  # #blocker1
        await add(c, "gone soon", id="gone")
        await add(c, "vhost lacks VHOST_F_LOG_ALL", modes=["normal"])  # #blocker2
        await c.ok("del-blocker", {"id": "gone"})
        await c.ok("del-blocker", {"id": "#blocker0"})
        await add(c, "ünïcödé\nreason \"quoted\"", id="late", modes=["cpr-exec", "normal"])
        # Not stored: it ends with its connection, which ends with the daemon.
        await add(held, "held by a connection", scope="connection", id="held")
        await c.ok("migrate-set-parameters", {"mode": "cpr-transfer"})
        await c.ok("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
        before = await state_of(c)
        assert [b["id"] for b in before["blockers"]] == [
            "vfio0", "#blocker1", "#blocker2", "late", "held"]
        if how == "SIGTERM":
            assert first.stop() == 0
        else:
            kill(first)

    second = start_daemon("--state-dir", str(directory))
    second.wait_for_log(restored_line(directory, 4))
    async with second.client() as c:
        after = await state_of(c)
    # The connection-scoped blocker is the only difference.
    expected = dict(before, blockers=before["blockers"][:-1])
    expected["blocked-reasons"] = {
        mode: [r for r in reasons if r != "held by a connection"]
        for mode, reasons in before["blocked-reasons"].items()}
    expected["query-migrate"] = {
        "blocked-reasons": expected["blocked-reasons"]["cpr-transfer"]}
    assert after == expected
    # Spelled out: order (oldest first), modes, and the settings.
    assert [b["id"] for b in after["blockers"]] == ["vfio0", "#blocker1", "#blocker2", "late"]
    assert after["blocked-reasons"] == {
        "normal": ["vfio 0000:01:00.0", "vhost lacks VHOST_F_LOG_ALL",
                   "ünïcödé\nreason \"quoted\""],
        "cpr-reboot": ["dump in progress"],
        "cpr-transfer": ["vfio 0000:01:00.0"],
        "cpr-exec": ["ünïcödé\nreason \"quoted\""],
    }
    assert after["mode"] == "cpr-transfer"
    assert after["capabilities"] == [{"capability": "events", "state": True}]
    assert second.stop() == 0
    assert_clean_log(second)


async def test_settings_alone_are_restored(start_daemon: Start, tmp_path: Path) -> None:
    """A mode and the events capability set to their defaults and back are kept
    like any change, also when there are no blockers at all."""
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c:
        await c.ok("migrate-set-parameters", {"mode": "cpr-exec"})
        await c.ok("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
        await c.ok("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": False}]})
    kill(first)
    # Nothing was restored by the first start: it made the database, and says so
    # (a --state-dir that is not where the state is shows); the second restored it.
    created = f"INFO: created {directory}/state.db: there was no state database"
    assert created in first.log()
    second = start_daemon("--state-dir", str(directory))
    second.wait_for_log(restored_line(directory, 0))
    assert "created" not in second.log()
    async with second.client() as c:
        assert (await c.ok("query-migrate-parameters"))["mode"] == "cpr-exec"
        assert await c.ok("query-migrate-capabilities") == [
            {"capability": "events", "state": False}]
        assert await blockers(c) == []


async def test_a_state_directory_whose_name_is_not_utf8(start_daemon: Start,
                                                        tmp_path: Path) -> None:
    """Found by review: Linux names are bytes, and a --state-dir (or
    $STATE_DIRECTORY) that is not UTF-8 stopped the start with a traceback
    (UnicodeEncodeError, from the read-only look at the database before it is
    opened), after it had created the database."""
    directory = tmp_path / os.fsdecode(b"st\xffate")
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c:
        await c.ok("add-blocker", {"reason": "kept", "id": "kept"})
    assert first.stop() == 0
    second = start_daemon("--state-dir", str(directory))
    second.wait_for_log(re.compile(r"restored 1 blocker from "))
    async with second.client() as c:
        assert [b["id"] for b in await blockers(c)] == ["kept"]
    assert second.stop() == 0
    for daemon in (first, second):
        assert "Traceback" not in daemon.log(), daemon.log()


async def test_connection_scoped_blockers_are_not_restored(
    start_daemon: Start, tmp_path: Path
) -> None:
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as holder, first.client() as c:
        await add(holder, "agent dump", scope="connection", id="dump")
        await add(holder, "agent snapshot", scope="connection")  # #blocker0
        await add(c, "kept")  # #blocker1
        assert await ids(c) == ["dump", "#blocker0", "#blocker1"]
        kill(first)  # the holder's connection dies with the daemon, unreleased
    second = start_daemon("--state-dir", str(directory))
    second.wait_for_log(restored_line(directory, 1))
    async with second.client() as c:
        assert await ids(c) == ["#blocker1"]
        # The ids are free again: a connection-scoped id was never stored.
        await add(c, "again", id="dump")
        fresh = await add(c, "fresh")
        assert fresh["id"] not in {"#blocker0", "#blocker1"}


async def test_generated_ids_are_never_reused(start_daemon: Start, tmp_path: Path) -> None:
    """Not after a delete, not after a SIGKILL, not after a SIGKILL with every
    blocker deleted (so that no stored blocker shows the highest id)."""
    directory = tmp_path / "state"
    handed_out: list[str] = []

    async def add_and_delete(daemon: DaemonProcess, count: int) -> None:
        async with daemon.client() as c:
            for _ in range(count):
                handed_out.append((await add(c, "generated"))["id"])
                await c.ok("del-blocker", {"id": handed_out[-1]})
            held = await add(c, "generated, connection-scoped", scope="connection")
            handed_out.append(held["id"])

    daemon = start_daemon("--state-dir", str(directory))
    await add_and_delete(daemon, 3)
    assert handed_out == ["#blocker0", "#blocker1", "#blocker2", "#blocker3"]
    for _ in range(3):
        kill(daemon)
        daemon = start_daemon("--state-dir", str(directory))
        daemon.wait_for_log(restored_line(directory, 0))
        await add_and_delete(daemon, 2)
    assert len(set(handed_out)) == len(handed_out) == 13, handed_out
    assert all(re.fullmatch(r"#blocker\d+", id) for id in handed_out)
    # SIGTERM too, with one kept.
    async with daemon.client() as c:
        kept = (await add(c, "kept"))["id"]
    assert daemon.stop() == 0
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        assert await ids(c) == [kept]
        assert (await add(c, "after"))["id"] not in {*handed_out, kept}


async def test_restored_blockers_keep_their_owner_and_time(
    start_daemon: Start, tmp_path: Path
) -> None:
    """``owner`` and ``added`` describe the original add, not the restart."""
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c:
        original = await add(c, "with an owner", id="owned")
    assert original["owner"] == owner_info(os.getpid())
    kill(first)
    second = start_daemon("--state-dir", str(directory))
    async with second.client() as c:
        assert await blockers(c) == [original]


async def test_a_state_past_the_quotas_is_restored_and_said_to_be(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Restored whole, and the log says at once that adds are refused (an operator
    learnt it only from a refused add); a reload that lowers a quota below what is
    held says so too."""
    directory = tmp_path / "state"
    alice, bob = 3_999_001, 3_999_002  # no admins: the daemon's policy is the default
    with Store.open(directory) as store:
        store.commit([Put(BlockerRow(f"b{n}", "r", ("normal",), False,
                                     (100, alice if n < 7 else bob, 100), 1.5e9, n))
                      for n in range(10)])
    config = tmp_path / "migblockd.toml"
    config.write_text("max-blockers = 5\nmax-blockers-per-uid = 4\n")
    daemon = start_daemon("--state-dir", str(directory), "--config", str(config))
    log = daemon.log()
    assert restored_line(directory, 10) in log
    assert ("WARNING: 10 blockers registered, more than max-blockers=5: adds are refused "
            "until 6 are deleted") in log, log
    assert (f"WARNING: uid {alice} holds 7 blockers, more than max-blockers-per-uid=4: its "
            "adds are refused until 4 are deleted") in log, log
    async with daemon.client() as c:
        assert len(await ids(c)) == 10
        refused = await c.execute("add-blocker", {"reason": "one more"})
        assert "max-blockers is 5" in refused["error"]["desc"]
        await c.ok("del-blocker", {"id": "b0"})
    config.write_text("max-blockers = 20\nmax-blockers-per-uid = 1\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("reloaded configuration: max-blockers=20, max-blockers-per-uid=1")
    daemon.wait_for_log(f"WARNING: 2 uids hold more than max-blockers-per-uid=1 blockers "
                        f"(uid {alice} 6, uid {bob} 3): their adds are refused until they "
                        "delete enough")
    assert daemon.log().count("more than max-blockers=5") == 1  # not over it now
    assert daemon.stop() == 0
    assert_clean_log(daemon)


#: Shifts the daemon's wall clock (``time.time``, which it reads its clock through)
#: by $MIGBLOCKD_TEST_CLOCK_SHIFT seconds: loaded from PYTHONPATH at interpreter start.
SHIFTED_CLOCK = """
import os, time
_real, _shift = time.time, float(os.environ["MIGBLOCKD_TEST_CLOCK_SHIFT"])
time.time = lambda: _real() + _shift
"""


@pytest.mark.parametrize(("to", "stamp"),
                         [(-10 * 86400.0, 0), (253402300800.0 + 86400, 253402300799)],
                         ids=["before-1970", "after-9999"])
async def test_a_wall_clock_out_of_range_stamps_what_the_restore_takes(
    start_daemon: Start, tmp_path: Path, to: float, stamp: int
) -> None:
    """A clock set before 1970 stamped blockers with a negative ``added``, which the
    next start refused as an edited file: now the stamp is the range's end, said
    once in the log, and the restart restores them."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SHIFTED_CLOCK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        MIGBLOCKD_TEST_CLOCK_SHIFT=str(to - time.time()))
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory), env=env)
    async with first.client() as c:
        added = [await add(c, "early", id="early"), await add(c, "generated")]
        assert [b["added"] for b in added] == [{"seconds": stamp, "microseconds": 0}] * 2
        await c.ok("del-blocker", {"id": "early"})
        added = [added[1], await add(c, "again", id="again")]
    first.wait_for_log("not a time from 1970 to 9999: blockers and events are stamped "
                       f"{'1970-01-01 00:00:00' if stamp == 0 else '9999-12-31 23:59:59'} "
                       "UTC instead, until it is set right")
    assert first.stop() == 0  # the log is whole once the daemon has exited
    assert first.log().count("the wall clock reads") == 1, first.log()
    second = start_daemon("--state-dir", str(directory))
    second.wait_for_log(restored_line(directory, 2))
    async with second.client() as c:
        assert await blockers(c) == added


# ----------------------------------------------------------------- signals


async def test_sigterm_loses_nothing_acknowledged(start_daemon: Start, tmp_path: Path) -> None:
    """SIGTERM while two clients have many adds in flight: each one answered is
    restored, and nothing that was not sent appears."""
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info")
    sent = {f"c{k}-{n}" for k in range(2) for n in range(300)}
    acknowledged: set[str] = set()

    async def pipeline(c: RawClient, k: int) -> None:
        for n in range(300):
            c.send_raw(b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "c%d-%d"},'
                       b' "id": "c%d-%d"}' % (k, n, k, n))
        await c.writer.drain()
        while True:
            try:
                msg = await c.read()
            except (EOFError, ConnectionError):
                return
            if "return" in msg:
                acknowledged.add(msg["id"])

    async with daemon.clients(2) as (a, b):
        tasks = [asyncio.create_task(pipeline(a, 0)), asyncio.create_task(pipeline(b, 1))]
        while not acknowledged:
            await asyncio.sleep(0.001)
        daemon.signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
    assert daemon.wait_exit() == 0
    assert_clean_log(daemon)
    assert acknowledged

    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        restored = set(await ids(c))
    assert acknowledged <= restored <= sent


async def test_sighup_loses_nothing_acknowledged(start_daemon: Start, tmp_path: Path) -> None:
    """Reloads in the middle of a stream of adds and deletes; then a SIGKILL:
    every acknowledged change is on disk."""
    directory = tmp_path / "state"
    config = tmp_path / "migblockd.toml"
    config.write_text("max-clients = 100\n")
    daemon = start_daemon("--state-dir", str(directory), "--config", str(config))
    expected: list[str] = []
    async with daemon.client() as c:
        for n in range(60):
            if n in (10, 30):
                if n == 30:
                    daemon.wait_for_log("reloaded configuration: max-clients=200")
                config.write_text(f"max-clients = {n * 10 + 100}\n")
                daemon.signal(signal.SIGHUP)  # reloads while the adds go on
            expected.append((await add(c, f"r{n}"))["id"])
            if n % 3 == 0:
                await c.ok("del-blocker", {"id": expected.pop(0)})
        daemon.wait_for_log("reloaded configuration: max-clients=400")
        assert await ids(c) == expected
    kill(daemon)
    again = start_daemon("--state-dir", str(directory))
    again.wait_for_log(restored_line(directory, len(expected)))
    async with again.client() as c:
        assert await ids(c) == expected


async def test_sighup_while_restoring_a_large_state_reloads_once_serving(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Before, SIGHUP's default action ended the daemon, without a log line, when
    it came before the handler: while a large state was being restored, say."""
    directory = tmp_path / "state"
    with Store.open(directory) as store:
        store.commit([Put(BlockerRow(f"b{n}", "r", ("normal",), False, None, 1.5e9, n))
                      for n in range(100_000)])
    config = tmp_path / "migblockd.toml"
    config.write_text("max-clients = 100\n")
    daemon = start_daemon("--state-dir", str(directory), "--config", str(config),
                          "--max-blockers", "200000", wait=False)
    lock = directory / "lock"
    while not (lock.exists() and holder(lock) == str(daemon.proc.pid)):
        assert daemon.proc.poll() is None, daemon.log()
        await asyncio.sleep(0.001)
    assert restored_line(directory, 100_000) not in daemon.log()
    config.write_text("max-clients = 200\n")
    daemon.signal(signal.SIGHUP)  # the lock is taken: the restore has not ended
    daemon.wait_for_log("reloading: SIGHUP received while starting", timeout=60)
    daemon.wait_for_log("reloaded configuration: max-clients=200")
    daemon.wait_for_log(restored_line(directory, 100_000))
    async with daemon.client() as c:
        await add(c, "after the reload", id="after")
    assert daemon.stop() == 0
    assert_clean_log(daemon)
    with Store.open(directory) as store:
        assert len(store.load().blockers) == 100_001


def start_restoring(start_daemon: Start, tmp_path: Path, count: int = 100_000,
                    ) -> tuple[DaemonProcess, Path]:
    """A daemon started on a state of ``count`` blockers, returned once it holds the
    state's lock and has not yet said it restored them (a few seconds' restore)."""
    directory = tmp_path / "state"
    with Store.open(directory) as store:
        store.commit([Put(BlockerRow(f"b{n}", "r", ("normal",), False, None, 1.5e9, n))
                      for n in range(count)])
    daemon = start_daemon("--state-dir", str(directory), "--max-blockers", str(2 * count),
                          wait=False)
    lock = directory / "lock"
    while not (lock.exists() and holder(lock) == str(daemon.proc.pid)):
        assert daemon.proc.poll() is None, daemon.log()
        time.sleep(0.001)
    assert restored_line(directory, count) not in daemon.log()
    return daemon, directory


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_while_restoring_ends_the_start_after_the_restore(
    start_daemon: Start, tmp_path: Path, sig: signal.Signals
) -> None:
    """Before, SIGTERM ended the daemon without a log line (its default action,
    the handler not yet installed), SIGINT with status 130 and none either."""
    daemon, directory = start_restoring(start_daemon, tmp_path)
    daemon.signal(sig)
    assert daemon.wait_exit(60) == 0, daemon.log()
    log = daemon.log()
    restored = log.index(restored_line(directory, 100_000))
    assert log.index(f"received {sig.name} while starting: stopping before serving") > restored
    assert "ready on" not in log
    assert not daemon.socket.exists()
    assert_clean_log(daemon)
    # Released as at any clean exit (no pid in the lock file), the state as it was.
    assert holder(directory / "lock") == ""
    with Store.open(directory) as store:
        assert len(store.load().blockers) == 100_000


def start_waiting_for_writer(start_daemon: Start, directory: Path) -> DaemonProcess:
    """A daemon started on ``directory``'s state while another program holds its
    database's write lock, returned once it opens the database for writing (its log's
    index open: the restore's view of the file opens none), where it waits for it."""
    daemon = start_daemon("--state-dir", str(directory), wait=False)
    while not has_open(daemon.proc.pid, "/state.db-shm"):
        assert daemon.proc.poll() is None, daemon.log()
        time.sleep(0.001)
    return daemon


def has_open(pid: int, suffix: str) -> bool:
    """Whether process ``pid`` has a file open whose path ends with ``suffix``."""
    with contextlib.suppress(FileNotFoundError):  # the process, or a descriptor, gone
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(fd).endswith(suffix):
                    return True
    return False


def held(db: Path) -> sqlite3.Connection:
    """A connection of this process, another program to the daemon, in a write
    transaction on ``db``: an operator's sqlite3 shell after ``BEGIN IMMEDIATE;``."""
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_while_the_start_waits_for_another_programs_write_lock_is_a_stop(
    start_daemon: Start, tmp_path: Path, sig: signal.Signals
) -> None:
    """Before, the start waited SQLite's busy timeout (5 s) out with the stop kept,
    then ended as refused: exit status 1, "in use by another program"."""
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c:
        await add(c, "kept", id="kept")
    assert first.stop() == 0
    other = held(directory / "state.db")
    try:
        daemon = start_waiting_for_writer(start_daemon, directory)
        daemon.signal(sig)
        # While the other program still holds the lock.
        assert daemon.wait_exit() == 0, daemon.log()
    finally:
        other.execute("ROLLBACK")
        other.close()
    log = daemon.log()
    assert f"received {sig.name} while starting: stopping before serving" in log, log
    assert "in use by another program" not in log and "ready on" not in log, log
    assert not daemon.socket.exists()
    assert_clean_log(daemon)
    assert holder(directory / "lock") == ""
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["kept"]


async def test_a_start_waits_for_another_programs_write_lock_then_serves_or_is_refused(
    start_daemon: Start, tmp_path: Path
) -> None:
    """The start's wait for the write lock is SQLite's busy timeout still: a program
    that lets go within it is waited for, one that does not refuses the start."""
    directory = tmp_path / "state"
    assert start_daemon("--state-dir", str(directory)).stop() == 0
    db = directory / "state.db"
    other = held(db)
    daemon = start_waiting_for_writer(start_daemon, directory)
    other.execute("ROLLBACK")
    wait_ready(daemon)
    assert daemon.stop() == 0
    assert_clean_log(daemon)
    other.execute("BEGIN IMMEDIATE")
    try:
        refused = start_waiting_for_writer(start_daemon, directory)
        assert refused.wait_exit(30) == 1, refused.log()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert refused.log().rstrip("\n").endswith(
        f"ERROR: {db} is in use by another program (database is locked); close it "
        "(a sqlite3 shell?) and start again"), refused.log()
    assert_clean_log(refused)


def holds_write_lock(pid: int, index: Path) -> bool:
    """Whether process ``pid`` holds the write lock of the database whose log's index
    is ``index``: SQLite's fcntl lock on its byte 120 (os_unix.c: UNIX_SHM_BASE, then
    WAL_WRITE_LOCK, slot 0), as the kernel lists it (``/proc/locks``)."""
    with contextlib.suppress(FileNotFoundError):
        st = index.stat()
        wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            # "1: POSIX  ADVISORY  WRITE 4242 fd:01:1234 120 120" (a waiter's has "->").
            fields = line.split()
            if fields[1:6] == ["POSIX", "ADVISORY", "WRITE", str(pid), wanted] and (
                    fields[6] == "120"):
                return True
    return False


async def test_a_stop_while_another_program_retakes_the_write_lock_after_the_wait_is_a_stop(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Found by review of the start's wait for another program's write lock: the wait,
    in slices a stop ends, lets the lock go once it has it, and the start's next step
    that takes it (the proof of writing, BEGIN IMMEDIATE) waited SQLite's own busy
    timeout, 5 s in one C call with the SIGTERM kept.  A program that takes the lock
    again in between (one that writes in a loop) had a stop then end the start as
    refused: exit 1, "in use by another program".  strace holds each of the daemon's
    fcntl calls on the log's index back (50 ms), so that the other program is the
    first to take the lock the daemon let go, as it is now and then without it."""
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c:
        await add(c, "kept", id="kept")
    assert first.stop() == 0
    db = directory / "state.db"
    index = directory / "state.db-shm"
    python = delayed("fcntl", 50_000, tmp_path, "the daemon's locks", paths=[index])
    other = sqlite3.connect(db, isolation_level=None, timeout=0, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        daemon = start_daemon("--state-dir", str(directory), wait=False, python=python)
        while not has_open(daemon.proc.pid, "/state.db-shm"):
            assert daemon.proc.poll() is None, daemon.log()
            time.sleep(0.001)
        other.execute("ROLLBACK")
        # Once the daemon has the lock (its wait is over), taken again as soon as it
        # lets it go, before its next step asks for it.
        while not holds_write_lock(daemon.proc.pid, index):
            assert daemon.proc.poll() is None, daemon.log()
        while True:
            with contextlib.suppress(sqlite3.OperationalError):
                other.execute("BEGIN IMMEDIATE")
                break
        assert daemon.proc.poll() is None, daemon.log()
        daemon.signal(signal.SIGTERM)
        # While the other program still holds the lock: a stop, whichever step of
        # the start it finds (a start whose steps all had the lock may serve by then).
        assert daemon.wait_exit(30) == 0, daemon.log()
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
    log = daemon.log()
    assert "received SIGTERM" in log, log
    assert "in use by another program" not in log, log
    assert_clean_log(daemon)
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["kept"]

async def test_a_stop_while_a_reader_holds_a_rollback_journal_database_is_a_stop(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Found by review: the wait that a stop ends took the write lock only, and came
    after the switch to WAL.  A state.db in rollback-journal mode (journal_mode set
    back by an operator, a copy made by another tool) that another program only reads
    in a transaction (a sqlite3 shell after BEGIN; SELECT ...): PRAGMA journal_mode =
    WAL waited SQLite's busy timeout (5 s) with the SIGTERM kept, then the start ended
    as refused, exit status 1, "in use by another program"."""
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c:
        await add(c, "kept", id="kept")
    assert first.stop() == 0
    db = directory / "state.db"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as setting:
        assert setting.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN")
    other.execute("SELECT count(*) FROM blocker").fetchone()  # a shared lock, kept
    try:
        daemon = start_daemon("--state-dir", str(directory), wait=False)
        # Once it reads the file (its stop is looked at from before then on); the
        # restore's view or the wait: a stop in either is to end the start at once.
        while not has_open(daemon.proc.pid, "/state.db"):
            assert daemon.proc.poll() is None, daemon.log()
            time.sleep(0.001)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0, daemon.log()
    finally:
        other.execute("ROLLBACK")
        other.close()
    log = daemon.log()
    assert "received SIGTERM while starting: stopping before serving" in log, log
    assert "in use by another program" not in log and "ready on" not in log, log
    assert_clean_log(daemon)
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["kept"]


# ----------------------------------------------------------------- backup, start over


#: docs/state.md's step after restoring a backup, word for word.
RAISE_ID_FLOOR = ("INSERT INTO setting (key, value) VALUES ('id-floor', '1000000') "
                  "ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) "
                  "+ 1000000 AS TEXT)")


@pytest.mark.skipif(shutil.which("sqlite3") is None,
                    reason="needs the sqlite3 shell (apt install sqlite3)")
async def test_backup_while_running_restore_and_start_from_scratch(
    start_daemon: Start, tmp_path: Path
) -> None:
    """What README.md and docs/state.md say to do, with the real sqlite3 shell."""
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await add(c, "backed up", id="b1")
        await add(c, "backed up too")
        await c.ok("migrate-set-parameters", {"mode": "cpr-reboot"})
        # Recent commits are in the log, not yet in state.db: the backup has them.
        assert (directory / "state.db-wal").stat().st_size > 0
        backup = tmp_path / "migblockd-backup.db"
        # As the docs write it: the umask keeps the copy private (the shell's own
        # mode for it follows the umask, 0644 as a rule).
        subprocess.run(f"(umask 077 && sqlite3 {shlex.quote(str(directory / 'state.db'))} "
                       f"{shlex.quote(f'.backup {backup}')})", shell=True, check=True,
                       timeout=60)
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
        listing = await blockers(c)
        await add(c, "after the backup", id="later")
        # More generated ids than one reservation holds, handed out after the backup.
        handed_out = set()
        for _ in range(1100):
            handed_out.add((await add(c, "short-lived"))["id"])
            await c.ok("del-blocker", {"id": (await ids(c))[-1]})
    assert daemon.stop() == 0
    # Restore: the daemon stopped, the directory moved away, a new one with the backup,
    # its counter of generated ids raised past those handed out since the backup.
    directory.rename(tmp_path / "state.before-restore")
    me = [f"--owner={os.getuid()}", f"--group={os.getgid()}"]
    subprocess.run(["install", "-d", "-m", "0700", *me, str(directory)], check=True)
    subprocess.run(["install", "-m", "0600", *me, str(backup), str(directory / "state.db")],
                   check=True)
    subprocess.run(["sqlite3", str(directory / "state.db"), RAISE_ID_FLOOR], check=True,
                   timeout=60)
    restored = start_daemon("--state-dir", str(directory))
    restored.wait_for_log(restored_line(directory, 2))
    async with restored.client() as c:
        assert await blockers(c) == listing
        assert (await c.ok("query-migrate-parameters"))["mode"] == "cpr-reboot"
        assert (await add(c, "after the restore"))["id"] not in handed_out
    assert restored.stop() == 0
    # From scratch: stopped, the directory moved away.
    directory.rename(tmp_path / "state.old")
    fresh = start_daemon("--state-dir", str(directory))
    fresh.wait_for_log(restored_line(directory, 0))
    async with fresh.client() as c:
        assert await blockers(c) == []
        assert (await c.ok("query-migrate-parameters"))["mode"] == "normal"


def test_every_backup_command_the_docs_and_units_give_keeps_the_copy_private() -> None:
    """The sqlite3 shell makes the copy with the umask's mode (0644 as a rule), and the
    state holds every blocker's reason and owner: each place that gives the command
    gives it under ``umask 077``, as the test above runs it.  (The units' comments and
    service.md once gave it bare, and the copy came out 0644.)"""
    places = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
              *sorted((ROOT / "systemd").glob("*.service"))]
    found = 0
    for path in places:
        # The units' comments wrap the command over lines starting with "#".
        text = re.sub(r"\n#?\s*", " ", path.read_text())
        for command in re.finditer(r"sqlite3 [^`]*?\.backup", text):
            found += 1
            before = text[max(0, command.start() - 20):command.start()]
            shown = text[max(0, command.start() - 40):command.end() + 20]
            assert "umask 077 && " in before, f"{path.name}: {shown!r}"
    assert found >= 5


#: docs/state.md's way to start from scratch that keeps the counter, word for word.
EMPTY_KEEPING_THE_COUNTER = "DELETE FROM blocker; DELETE FROM setting WHERE key <> 'id-floor'"


@pytest.mark.skipif(shutil.which("sqlite3") is None,
                    reason="needs the sqlite3 shell (apt install sqlite3)")
async def test_start_from_scratch_keeping_the_counter(start_daemon: Start,
                                                      tmp_path: Path) -> None:
    """Moved away, the state starts its generated ids over at #blocker0; emptied as
    docs/state.md says, it starts with nothing but hands out no id a second time."""
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        handed_out = {(await add(c, "before"))["id"] for _ in range(3)}
        await c.ok("migrate-set-parameters", {"mode": "cpr-exec"})
        await c.ok("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
    assert daemon.stop() == 0
    subprocess.run(["sqlite3", str(directory / "state.db"), EMPTY_KEEPING_THE_COUNTER],
                   check=True, timeout=60)
    emptied = start_daemon("--state-dir", str(directory))
    emptied.wait_for_log(restored_line(directory, 0))
    async with emptied.client() as c:
        assert await blockers(c) == []
        assert (await c.ok("query-migrate-parameters"))["mode"] == "normal"
        assert await c.ok("query-migrate-capabilities") == [
            {"capability": "events", "state": False}]
        assert (await add(c, "after"))["id"] not in handed_out | {"#blocker0"}
    assert emptied.stop() == 0


# ----------------------------------------------------------------- one owner


def only_line(daemon: DaemonProcess) -> str:
    """The one line a daemon that refused to start logged (at the default
    ``--log-level info``), without its prefix."""
    log = daemon.log()
    lines = log.splitlines()
    assert len(lines) == 1, log
    assert_clean_log(daemon)
    prefix = re.match(r"\S+ \S+ migblockd\[\d+\] ERROR: ", lines[0])
    assert prefix, lines[0]
    return lines[0][prefix.end():]


async def test_second_daemon_on_the_same_directory_is_refused(
    start_daemon: Start, tmp_path: Path
) -> None:
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c:
        await add(c, "first's", id="mine")
    other_socket = tmp_path / "other.sock"
    second = start_daemon("--state-dir", str(directory), "--log-level", "info",
                          socket=other_socket, wait=False)
    assert second.wait_exit() == 1
    assert only_line(second) == (
        f"state directory {directory} is locked by another migblockd (pid {first.proc.pid}); "
        "stop it, or use another --state-dir")
    assert not other_socket.exists()
    # The first is undisturbed, and still writes its state.
    async with first.client() as c:
        assert await ids(c) == ["mine"]
        await add(c, "still serving", id="more")
    # A crash leaves no stale lock: the next daemon takes the directory over.
    kill(first)
    third = start_daemon("--state-dir", str(directory), socket=other_socket)
    async with third.client() as c:
        assert await ids(c) == ["mine", "more"]


async def test_a_daemon_whose_database_links_to_another_daemons_is_refused(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Directories of their own, one database: each daemon handed out #blocker0,
    and the second's overwrote the first's acknowledged blocker on disk.  The
    database file itself is locked too, so a link (or a hard link) to the
    database another daemon uses is refused, as the same directory is."""
    owner = tmp_path / "owner"
    first = start_daemon("--state-dir", str(owner))
    async with first.client() as c:
        mine = await add(c, "first's")
    assert mine["id"] == "#blocker0"
    # A link to it, as state.md describes for a database on another volume; and
    # a hard link to it.
    linked, hard = tmp_path / "linked", tmp_path / "hard"
    linked.mkdir(mode=0o700)
    hard.mkdir(mode=0o700)
    (linked / "state.db").symlink_to(owner / "state.db")
    os.link(owner / "state.db", hard / "state.db")
    for directory, shown in [(linked, f"{linked}/state.db (which is {owner}/state.db)"),
                             (hard, f"{hard}/state.db")]:
        other_socket = tmp_path / f"{directory.name}.sock"
        second = start_daemon("--state-dir", str(directory), "--log-level", "info",
                              socket=other_socket, wait=False)
        assert second.wait_exit() == 1
        assert only_line(second) == (
            f"state database {shown} is in use by another migblockd (pid {first.proc.pid}), "
            "whose state directory holds the same file; stop it, or give each daemon a "
            "database of its own")
        assert not other_socket.exists()
    async with first.client() as c:
        assert await blockers(c) == [mine]
        await add(c, "still serving", id="more")
    # Its lock goes with it, however it ends: the link's daemon starts then, and
    # finds what the first acknowledged.
    kill(first)
    third = start_daemon("--state-dir", str(linked))
    async with third.client() as c:
        assert await ids(c) == ["#blocker0", "more"]
        assert (await add(c, "third's"))["id"] == "#blocker1024"


# ----------------------------------------------------------------- bad state


def digest(directory: Path) -> dict[str, str]:
    """Every file of the directory (but the lock) by name, with its content's hash."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.name != "lock"}


def unprivileged_python(tmp_path: Path) -> str:
    """An interpreter path that runs this one without the capabilities that let
    root ignore file permissions (itself when we are not root)."""
    if os.geteuid() != 0:
        return sys.executable
    wrapper = tmp_path / "python-without-dac-override"
    wrapper.write_text("#!/bin/sh\nexec setpriv --bounding-set=-dac_override,-dac_read_search "
                       f"{sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


async def stored_state(start_daemon: Start, directory: Path) -> None:
    """A state directory that a daemon filled and left (cleanly)."""
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        for n in range(200):
            await add(c, f"blocker number {n} " + "x" * 100, id=f"b{n}")
    assert daemon.stop() == 0


def garbage(db: Path) -> None:
    db.write_bytes(random.Random(13).randbytes(8192))


def damage_a_page(db: Path) -> None:
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 5 * page
    data[3 * page: 4 * page] = random.Random(7).randbytes(page)
    db.write_bytes(bytes(data))


def newer_format(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    finally:
        conn.close()


def another_programs(db: Path) -> None:
    db.unlink()
    conn = sqlite3.connect(db)
    try:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
    finally:
        conn.close()


def edited(*statements: str) -> Callable[[Path], None]:
    """A hand edit with the sqlite3 shell's equivalent."""
    def edit(db: Path) -> None:
        conn = sqlite3.connect(db)
        try:
            for sql in statements:
                conn.execute(sql)
            conn.commit()
        finally:
            conn.close()
    return edit


EDITED = "restore the file from a backup, or move it away to start from scratch"
BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "text not UTF-8": (edited("UPDATE blocker SET reason = CAST(x'ff41' AS TEXT) "
                              "WHERE id = 'b3'"),
                       "{db} is corrupt (text in column 'reason' is not UTF-8); restore it "
                       "from a backup, or move it away to start from scratch"),
    "id-floor not a number": (edited("INSERT OR REPLACE INTO setting VALUES "
                                     "('id-floor', '\"abc\"')"),
                              "{db}: stored id-floor \"abc\" is not a count of ids; " + EDITED),
    # Before, served: every generated id then failed with Python's "Exceeds the limit
    # (4300 digits) for integer string conversion", and the log said to free space.
    "id-floor past any count": (edited("INSERT OR REPLACE INTO setting VALUES "
                                       "('id-floor', '" + "9" * 4300 + "')"),
                                "{db}: stored id-floor of 4300 digits is past any count of "
                                "ids a daemon hands out (0 to 4611686018427387903); "
                                + EDITED),
    # Shown as the file holds them (JSON), not as Python writes them.
    "events not true or false": (edited("INSERT OR REPLACE INTO setting VALUES "
                                        "('events', '\"yes\"')"),
                                 "{db}: stored events \"yes\" is not true or false; " + EDITED),
    "same seq twice": (edited("UPDATE blocker SET seq = 0 WHERE id = 'b1'",
                              "UPDATE blocker SET seq = 0 WHERE id = 'b0'"),
                       "{db}: stored blockers 'b0' and 'b1' have the same seq 0, so their "
                       "order is lost; " + EDITED),
    # A table rebuilt without its primary key: before, both rows were served, and
    # del-blocker deleted both from the disk but left one listed, not to be deleted.
    "same id twice": (edited("CREATE TABLE copy AS SELECT * FROM blocker",
                             "DROP TABLE blocker",
                             "CREATE TABLE blocker (id, seq, reason, modes, internal, "
                             "owner_pid, owner_uid, owner_gid, added)",
                             "INSERT INTO blocker SELECT * FROM copy",
                             "DROP TABLE copy",
                             "INSERT INTO blocker SELECT id, 1000, 'again', modes, internal, "
                             "owner_pid, owner_uid, owner_gid, added FROM blocker "
                             "WHERE id = 'b1'"),
                      "{db}: stored blockers at seq 1 and 1000 have the same id 'b1', which "
                      "names one blocker; " + EDITED),
    "unknown mode": (edited("INSERT OR REPLACE INTO setting VALUES ('mode', '\"warp\"')"),
                     "{db}: stored mode \"warp\" is not one the schema defines; use a --schema "
                     "that defines it, or move the state directory away to start from "
                     "scratch"),
    # Before, a TypeError with a traceback (a list is not hashable).
    "mode a list": (edited("INSERT OR REPLACE INTO setting VALUES ('mode', '[\"normal\"]')"),
                    "{db}: stored mode [\"normal\"] is not the name of a mode; " + EDITED),
    "mode an object": (edited("INSERT OR REPLACE INTO setting VALUES ('mode', '{\"a\": 1}')"),
                       "{db}: stored mode {{\"a\": 1}} is not the name of a mode; " + EDITED),
    # Out of range, each served as it was before (an add after the huge seq failed
    # to commit, an add-time past year 9999 broke clients' dates).
    "added after 9999": (edited("UPDATE blocker SET added = 1e300 WHERE id = 'b3'"),
                         "{db}: stored blocker 'b3' was added at 1e+300, which is not a time "
                         "from 1970 to 9999 (seconds since the epoch); " + EDITED),
    "added before 1970": (edited("UPDATE blocker SET added = -1.5 WHERE id = 'b3'"),
                          "{db}: stored blocker 'b3' was added at -1.5, which is not a time "
                          "from 1970 to 9999 (seconds since the epoch); " + EDITED),
    "negative seq": (edited("UPDATE blocker SET seq = -5 WHERE id = 'b7'"),
                     "{db}: stored blocker 'b7' has seq -5, outside the order's range (0 to "
                     "4611686018427387903); " + EDITED),
    "huge seq": (edited("UPDATE blocker SET seq = 9223372036854775807 WHERE id = 'b7'"),
                 "{db}: stored blocker 'b7' has seq 9223372036854775807, outside the order's "
                 "range (0 to 4611686018427387903); " + EDITED),
    "mode twice": (edited("UPDATE blocker SET modes = '[\"normal\", \"normal\"]' "
                          "WHERE id = 'b1'"),
                   "{db}: stored blocker 'b1' lists a mode twice (normal, normal); " + EDITED),
    "owner no process has": (edited("UPDATE blocker SET owner_pid = -1, owner_uid = "
                                    "4294967296, owner_gid = 0 WHERE id = 'b1'"),
                             "{db}: stored blocker 'b1' has owner pid -1, uid 4294967296, gid "
                             "0, which no process has; " + EDITED),
    "empty reason": (edited("UPDATE blocker SET reason = '' WHERE id = 'b1'"),
                     "{db}: stored blocker 'b1' has an empty reason; " + EDITED),
    "id not an id": (edited("UPDATE blocker SET id = 'b 1' WHERE id = 'b1'"),
                     "{db}: stored blocker 'b 1' has an id that no client may choose and the "
                     "daemon does not generate; " + EDITED),
    "generated id past the floor": (edited("INSERT OR REPLACE INTO setting VALUES "
                                           "('id-floor', '5')",
                                           "UPDATE blocker SET id = '#blocker5' "
                                           "WHERE id = 'b1'"),
                                    "{db}: stored blocker '#blocker5' has a generated id at "
                                    "or past the stored id-floor 5, so the daemon would "
                                    "generate it again; " + EDITED),
    # Before, "the stored id-floor 0", which the file did not hold.
    "generated id, no floor": (edited("DELETE FROM setting WHERE key = 'id-floor'",
                                      "UPDATE blocker SET id = '#blocker5' WHERE id = 'b1'"),
                               "{db}: stored blocker '#blocker5' has a generated id but no "
                               "id-floor is stored, so the daemon would generate it again; "
                               + EDITED),
    "garbage": (garbage, "{db} is not a migblockd state database (file is not a database); "
                         "move it away to start from scratch"),
    "damaged page": (damage_a_page, "{db} is corrupt ("),
    "newer format": (newer_format, f"{{db}} was written by a newer migblockd (format "
                                   f"{len(MIGRATIONS) + 1}; this one reads up to "
                                   f"{len(MIGRATIONS)}); upgrade migblockd"),
    "another program's": (another_programs, "{db} is not a migblockd state database (it "
                                            "belongs to another program); move it away to "
                                            "start from scratch"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
async def test_bad_database_stops_the_daemon_and_is_left_alone(
    start_daemon: Start, tmp_path: Path, case: str
) -> None:
    directory = tmp_path / "state"
    await stored_state(start_daemon, directory)
    db = directory / "state.db"
    spoil, message = BAD_FILES[case]
    spoil(db)
    before = digest(directory)
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info", wait=False)
    assert daemon.wait_exit() == EXIT_NOTCONFIGURED
    line = only_line(daemon)
    expected = message.format(db=db)
    if case == "damaged page":
        assert line.startswith(expected), line
        assert line.endswith("); restore it from a backup, or move it away to start "
                             "from scratch"), line
    else:
        assert line == expected
    assert digest(directory) == before
    assert not daemon.socket.exists()
    # What the message says to do works: moved away, a fresh start.
    directory.rename(tmp_path / "state.old")
    fresh = start_daemon("--state-dir", str(directory))
    fresh.wait_for_log(restored_line(directory, 0))


async def test_stored_modes_are_served_in_the_schemas_order(
    start_daemon: Start, tmp_path: Path
) -> None:
    """BlockerInfo lists modes in MigMode order; a stored row in another order (a
    --schema that orders MigMode differently, or an edit) is put in it."""
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await add(c, "two modes", id="two", modes=["normal", "cpr-exec"])
    assert daemon.stop() == 0
    edited("UPDATE blocker SET modes = '[\"cpr-exec\", \"normal\"]'")(directory / "state.db")
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert [b["modes"] for b in await blockers(c)] == [["normal", "cpr-exec"]]


@pytest.mark.parametrize("case", ["unreadable file", "read-only directory",
                                  "unsearchable directory", "link into an unsearchable one"])
async def test_unwritable_state_stops_the_daemon(
    start_daemon: Start, tmp_path: Path, case: str
) -> None:
    """Each with one line naming the file: before, the last two stopped it with a
    traceback (PermissionError from looking for state.db)."""
    directory = tmp_path / "state"
    await stored_state(start_daemon, directory)
    db = directory / "state.db"
    volume = tmp_path / "volume"
    if case == "link into an unsearchable one":
        volume.mkdir(mode=0o700)
        db.rename(volume / "state.db")
        db.symlink_to(volume / "state.db")
    before = digest(directory)
    if case == "unreadable file":
        db.chmod(0)
        expected = (f"cannot read and write {db}: Permission denied; fix its permissions, "
                    "or choose another --state-dir")
    elif case == "read-only directory":
        directory.chmod(0o500)  # SQLite cannot create its log next to the database
        expected = (f"cannot create {db}-wal: Permission denied; make {directory} "
                    "writable by this user, or choose another --state-dir")
    elif case == "unsearchable directory":
        directory.chmod(0)
        expected = (f"cannot look in state directory {directory}: Permission denied; "
                    f"chmod u+rwx {directory}, or choose another --state-dir")
    else:
        volume.chmod(0)
        expected = (f"cannot reach {db}, a symbolic link to {volume}/state.db: Permission "
                    "denied; make where it leads reachable by this user, or choose another "
                    "--state-dir")
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info", wait=False,
                          python=unprivileged_python(tmp_path))
    assert daemon.wait_exit() == EXIT_NOTCONFIGURED
    assert only_line(daemon) == expected
    directory.chmod(0o700)
    if volume.exists():
        volume.chmod(0o700)
    assert digest(directory) == before
    # Fixed as the message says, the same daemon starts with everything there.
    db.chmod(0o600)
    fixed = start_daemon("--state-dir", str(directory), python=unprivileged_python(tmp_path))
    fixed.wait_for_log(restored_line(directory, 200))


def python_as(tmp_path: Path, account: Account) -> str:
    """An interpreter path that runs this one as ``account`` (its uid and primary
    group, no other groups): the daemon of a user other than root."""
    wrapper = tmp_path / f"python-as-{account.name}"
    wrapper.write_text(f"#!/bin/sh\nexec setpriv --reuid={account.uid} --regid={account.gid} "
                       f"--clear-groups {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


#: What a daemon run through :func:`python_as` is given: no $HOME of root's.
AS_USER_ENV = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}


def refused_as_user(start_daemon: Start, python: str, socket: Path, args: list[str],
                    expected: str) -> None:
    """The daemon run by ``python`` (another user's) refuses to start with ``args`` on
    one line, ``expected``, and its --check-config says the same."""
    daemon = start_daemon(*args, socket=socket, wait=False, env=AS_USER_ENV, python=python)
    assert daemon.wait_exit() == EXIT_NOTCONFIGURED
    assert only_line(daemon) == expected
    checked = subprocess.run([python, "-m", "migblockd", "--check-config", "--socket",
                              str(socket), *args], env=AS_USER_ENV,
                             capture_output=True, text=True, timeout=30)
    assert (checked.returncode, checked.stdout, checked.stderr) == (
        EXIT_NOTCONFIGURED, "", f"migblockd: {expected}\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as another user")
def test_a_state_directory_of_root_the_daemon_may_not_search_names_the_chown(
    start_daemon: Start, tmp_path: Path, short_tmp: Path, accounts: dict[str, Account]
) -> None:
    """Root's and 0700: trusted (root may change anything anyway), but closed to
    the daemon's user.  Before, the advice was `chmod u+rwx`, which the owner's
    bits already allowed; the start and --check-config give the same line."""
    olga = accounts["mbt-olga"]
    short_tmp.chmod(0o755)
    state, run = short_tmp / "state", short_tmp / "run"
    state.mkdir(mode=0o700)
    run.mkdir(mode=0o700)
    os.chown(run, olga.uid, olga.gid)
    python = python_as(tmp_path, olga)
    args = ["--state-dir", str(state), "--log-level", "info"]
    expected = (f"cannot look in state directory {state}: Permission denied (it belongs to "
                f"uid 0 (root), mode 0700, and this daemon runs as uid {olga.uid} (mbt-olga)); "
                f"chown mbt-olga: {state}, or choose another --state-dir")
    refused_as_user(start_daemon, python, run / "s.sock", args, expected)
    # Done as it says, the same daemon starts there.
    os.chown(state, olga.uid, olga.gid)
    fixed = start_daemon(*args, socket=run / "s.sock", env=AS_USER_ENV, python=python)
    fixed.wait_for_log(f"created {state}/state.db")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as another user")
def test_a_directory_on_the_way_the_daemon_may_not_search_is_named_with_the_fix(
    start_daemon: Start, tmp_path: Path, short_tmp: Path, accounts: dict[str, Account]
) -> None:
    """Before, `cannot check state directory D: P: Permission denied`, and nothing
    to do; the start and --check-config give the same line."""
    olga = accounts["mbt-olga"]
    short_tmp.chmod(0o755)
    closed, run = short_tmp / "closed", short_tmp / "run"
    closed.mkdir(mode=0o700)
    run.mkdir(mode=0o700)
    os.chown(run, olga.uid, olga.gid)
    state = closed / "sub" / "state"
    python = python_as(tmp_path, olga)
    args = ["--state-dir", str(state), "--log-level", "info"]
    expected = (f"cannot check state directory {state}: {closed}/sub: Permission denied; "
                f"this daemon, running as uid {olga.uid} (mbt-olga), may not search {closed} "
                f"(uid 0 (root)'s, mode 0700): let it (chmod o+x {closed}, say), or choose "
                "another --state-dir")
    refused_as_user(start_daemon, python, run / "s.sock", args, expected)
    # Done as it says (and the rest made as that user may), the daemon starts there.
    closed.chmod(0o701)
    (closed / "sub").mkdir(mode=0o700)
    os.chown(closed / "sub", olga.uid, olga.gid)
    fixed = start_daemon(*args, socket=run / "s.sock", env=AS_USER_ENV, python=python)
    fixed.wait_for_log(f"created {state}/state.db")


async def add_refused_at_commit(c: RawClient, daemon: DaemonProcess, why: str, advice: str) -> None:
    """An add whose commit fails with ``why``: its error, the log's first line of
    the failure with ``advice``, and nothing changed but the blocker "before"."""
    reply = await c.execute("add-blocker", {"reason": "refused at commit", "id": "refused"})
    assert reply["error"] == {"class": "GenericError",
                              "desc": f"{why}; nothing was changed"}, reply
    daemon.wait_for_log(f"ERROR: {why}; 1 command(s) failed, their changes undone; every "
                        f"change fails until a commit succeeds: {advice}")
    assert await ids(c) == ["before"]


async def test_a_program_holding_the_write_lock_fails_commits_until_it_lets_go(
    start_daemon: Start, tmp_path: Path
) -> None:
    """An operator's sqlite3 shell left in a write transaction (``BEGIN IMMEDIATE;``)
    makes every commit wait out SQLite's busy timeout and fail.  Before, the client
    heard only "database is locked", and the log told the operator to free disk
    space or read the kernel's log: nothing said another program held the file."""
    directory = tmp_path / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info")
    async with daemon.client() as c:
        await add(c, "acknowledged before", id="before")
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            why = f"cannot commit to {db}: database is locked (another program is writing to it)"
            await add_refused_at_commit(c, daemon, why, (
                f"close the program that holds {db} open for writing (an sqlite3 shell in a "
                "transaction?)"))
        finally:
            if other.in_transaction:
                other.execute("ROLLBACK")
            other.close()
        # Let go: the next change succeeds, without a restart.
        await add(c, "acknowledged after", id="after")
        daemon.wait_for_log(f"commits succeed again, after 1 failed (the last: {why})")
    assert daemon.stop() == 0
    assert_clean_log(daemon)
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["before", "after"]


async def test_a_trigger_added_by_hand_fails_commits_with_its_own_advice(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A trigger that refuses the daemon's writes, added with a shell while it runs:
    each change fails, is undone, and the log says to undo the edit.  Before, it
    told the operator to free disk space or read the kernel's log."""
    directory = tmp_path / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info")
    async with daemon.client() as c:
        await add(c, "acknowledged before", id="before")
        edited("CREATE TRIGGER no_adds BEFORE INSERT ON blocker "
               "BEGIN SELECT RAISE(ABORT, 'no more blockers'); END")(db)
        await add_refused_at_commit(c, daemon, f"cannot commit to {db}: no more blockers", (
            f"{db} refuses what the daemon writes, so it was changed by hand? undo the "
            "change (a trigger or constraint added with an sqlite3 shell?), or stop the "
            "daemon and restore it from a backup"))
        edited("DROP TRIGGER no_adds")(db)
        await add(c, "acknowledged after", id="after")
    assert daemon.stop() == 0
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["before", "after"]


@pytest.mark.skipif(shutil.which("sqlite3") is None,
                    reason="needs the sqlite3 shell (apt install sqlite3)")
async def test_a_stop_while_a_shell_reads_the_database_leaves_the_state_in_its_log(
    start_daemon: Start, tmp_path: Path
) -> None:
    """What docs/state.md says of backing up: SQLite folds the log back into
    state.db only at the last connection's close, so a stop while a read-only
    shell has the file open leaves the state in state.db and state.db-wal, and
    state.db alone would be a backup without it.  The next start reads both."""
    directory = tmp_path / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await add(c, "only in the log", id="logged")
    shell = subprocess.Popen(["sqlite3", "-readonly", str(db)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert shell.stdin is not None and shell.stdout is not None
    try:
        shell.stdin.write("SELECT id FROM blocker;\n")
        shell.stdin.flush()
        assert shell.stdout.readline() == "logged\n"
        assert daemon.stop() == 0
        assert (directory / "state.db-wal").stat().st_size > 0
        alone = tmp_path / "alone.db"
        shutil.copy(db, alone)
        with contextlib.closing(sqlite3.connect(alone)) as copy:
            assert copy.execute("SELECT id FROM blocker").fetchall() == []
    finally:
        shell.stdin.close()
        shell.wait()
    assert (directory / "state.db-wal").exists()  # a read-only shell cannot fold it back
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["logged"]
    assert again.stop() == 0
    assert not (directory / "state.db-wal").exists()


@pytest.mark.parametrize("case", ["log removed", "database replaced"])
async def test_files_taken_away_under_the_running_daemon_are_not_written_to(
    start_daemon: Start, tmp_path: Path, case: str
) -> None:
    """SQLite writes on to the files it has open, whatever happens to their names:
    before, with state.db-wal removed ("cleaning up") or state.db replaced while
    the daemon ran, every change from then on was acknowledged, and the next
    start did not find it."""
    directory = tmp_path / "state"
    db, wal = directory / "state.db", directory / "state.db-wal"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await add(c, "acknowledged before", id="before")
        if case == "log removed":
            wal.unlink()
            expected = (f"cannot commit to {db}: its log {wal} was removed or replaced while "
                        "the daemon ran, and SQLite writes on to the one it has open, which "
                        "the next start would not find; stop the daemon (not with SIGKILL: a "
                        "clean stop folds that log into the database) and start it again")
        else:
            shutil.copy(db, tmp_path / "copy.db")
            (tmp_path / "copy.db").replace(db)
            expected = (f"cannot commit to {db}: it is not the file the daemon opened (it was "
                        "replaced, moved or removed), and the next start would not read what "
                        "is committed now; put that file back, or restart the daemon to use "
                        "this one")
        for _ in range(2):  # and so on, until the daemon is restarted
            reply = await c.execute("add-blocker", {"reason": "not acknowledged", "id": "no"})
            assert reply["error"]["desc"].startswith(expected), reply
        assert await ids(c) == ["before"]
        # The log's advice is the case's, not the disk's.
        advice = (f"put the file the daemon opened back as {db}, or restart the daemon to "
                  "use the one there now" if case == "database replaced" else
                  "stop the daemon (not with SIGKILL: a clean stop folds that log into the "
                  "database) and start it again")
        daemon.wait_for_log(f"ERROR: {expected}; 1 command(s) failed, their changes undone; "
                            f"every change fails until a commit succeeds: {advice}\n")
    assert daemon.stop() == 0
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        restored = await ids(c)
        assert "no" not in restored
        if case == "log removed":  # a clean stop folded the log it had open into state.db
            assert restored == ["before"]
        await add(c, "after the restart", id="after")


@pytest.mark.parametrize(("how", "what"), [
    ("backup copied over it", "it is another program's database now: a file copied over it?"),
    ("truncated", "it is 0 bytes long, too short for a database: truncated?"),
    ("its own backup copied over it", "not through SQLite, which leaves a mark in the log's "
                                      "index when it writes there: a copy of a backup "
                                      "written over it?"),
])
async def test_a_database_written_over_under_the_running_daemon_is_not_written_to(
    start_daemon: Start, tmp_path: Path, how: str, what: str
) -> None:
    """The same file (its inode kept) written by another program: ``cp backup.db
    state.db``, ``truncate -s 0 state.db``.  Before, later changes were acknowledged
    into it, the log said nothing, and the next start found the file corrupt.  Now
    every commit fails, the log saying what to do (not the disk's advice)."""
    directory = tmp_path / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info")
    async with daemon.client() as c:
        await add(c, "acknowledged before", id="before")
        db.chmod(0o600)  # no write: commits go on
        if how == "truncated":
            os.truncate(db, 0)
        elif how == "its own backup copied over it":
            # Restored the wrong way (docs/state.md: stop the daemon first): the backup,
            # made as the docs make it, is as large as the file.  Before, the commits
            # after it were acknowledged, and the next start found the file corrupt.
            await add(c, "deleted after the backup", id="gone")
            backup = tmp_path / "backup.db"
            subprocess.run(["sqlite3", str(db), f".backup {backup}"], check=True, timeout=30)
            await c.ok("del-blocker", {"id": "gone"})
            shutil.copyfile(backup, db)  # as cp does: the same file, written over
        else:
            backup = tmp_path / "backup.db"
            with contextlib.closing(sqlite3.connect(backup)) as conn:
                conn.execute("CREATE TABLE t (x)")
                conn.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 100)
                conn.commit()
            shutil.copyfile(backup, db)  # as cp does: the same file, written over
        why = (f"cannot commit to {db}: another program wrote to it since the daemon's last "
               f"commit ({what}), and what the daemon commits now would be mixed with what "
               "that program wrote")
        await add_refused_at_commit(c, daemon, why, (
            f"stop the daemon, then restore {db} from a backup: the stop folds the daemon's "
            "log into the file, over what that program wrote"))
        reply = await c.execute("add-blocker", {"reason": "not acknowledged", "id": "no"})
        assert reply["error"]["desc"] == f"{why}; nothing was changed", reply


async def test_a_database_removed_under_the_running_daemon_is_saved_by_the_stop(
    start_daemon: Start, tmp_path: Path
) -> None:
    """``rm state.db`` while the daemon runs.  Before, clients were told to put the
    file back (it has no name left to be put back by) or restart, and a restart
    refused the log left without its database: the blockers were gone with the
    file unless the operator had copied it out of /proc first.  Now commits fail,
    and the stop saves the file the daemon still holds: renamed as the next start
    says, it restores every acknowledged blocker."""
    directory = tmp_path / "state"
    db, wal = directory / "state.db", directory / "state.db-wal"
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info")
    async with daemon.client() as c:
        for n in range(600):  # past SQLite's 1000 pages of log: some in state.db, some not
            await add(c, "x" * 1000, id=f"b{n}")
        assert db.stat().st_size > 100 * 4096 and wal.stat().st_size > 0
        db.unlink()
        why = (f"cannot commit to {db}: it was removed (or moved away) while the daemon ran, "
               "and the next start would not read what is committed now")
        reply = await c.execute("add-blocker", {"reason": "not acknowledged", "id": "no"})
        assert reply["error"]["desc"] == f"{why}; nothing was changed", reply
        daemon.wait_for_log(
            f"ERROR: {why}; 1 command(s) failed, their changes undone; every change fails "
            "until a commit succeeds: move it back if it was moved; else stop the daemon, "
            "which saves its blockers from the file it holds open as "
            f"{db}.rescued-TIME, and rename that to {db} before starting it again; if its "
            "file system is full, copy them out before the stop instead (cp -p /proc/")
        assert len(await ids(c)) == 600
    assert daemon.stop() == 0
    [copy] = directory.glob("state.db.rescued-*")
    assert re.fullmatch(r"state\.db\.rescued-\d{8}T\d{6}Z", copy.name), copy
    assert copy.stat().st_mode & 0o777 == 0o600
    warning = (f"WARNING: stopping: {db} was removed while the daemon ran: its log is "
               "emptied, so that the next start replays nothing into another file; what it "
               f"kept (600 blockers) is saved as {copy}, which the next start names; rename "
               f"that to {db} to use it\n")
    # Said before "stopped", which ends the stop's lines.
    assert daemon.log().endswith(warning + daemon.log().rsplit("\n", 2)[-2] + "\n")
    assert daemon.log().rstrip("\n").endswith("INFO: stopped")
    # The log is left (SQLite does not remove it), empty: the start refuses it.
    assert not db.exists() and wal.stat().st_size == 0
    assert_start_refused(
        start_daemon, directory,
        f"{wal} exists without state.db, which was removed while the daemon "
        f"ran; the stop saved what it kept as {copy}: rename that to {db} to use it, or "
        "move the whole directory away to restore a backup or to start from scratch")
    copy.rename(db)
    again = start_daemon("--state-dir", str(directory))
    again.wait_for_log(restored_line(directory, 600))
    async with again.client() as c:
        assert await ids(c) == [f"b{n}" for n in range(600)]


async def test_a_state_directory_removed_under_the_running_daemon_is_saved_by_the_stop(
    start_daemon: Start, tmp_path: Path
) -> None:
    """``rm -rf`` of the whole state directory while the daemon runs (starting from
    scratch without stopping it first).  The commits refused said "stop the
    daemon, which saves its blockers ... as D/state.db.rescued-TIME", but the
    stop could not make the copy in a directory that was gone, and every
    acknowledged blocker was lost, the next start beginning empty.  Now the stop
    makes the directory again (0700) for the copy, and the next start names it."""
    directory = tmp_path / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info")
    async with daemon.client() as c:
        for n in range(3):
            await add(c, "kept", id=f"b{n}")
        shutil.rmtree(directory)
        reply = await c.execute("add-blocker", {"reason": "not acknowledged", "id": "no"})
        assert reply["error"]["desc"].startswith(f"cannot commit to {db}: it was removed"), reply
        daemon.wait_for_log(f"which saves its blockers from the file it holds open as "
                            f"{db}.rescued-TIME")
    assert daemon.stop() == 0
    [copy] = directory.glob("state.db.rescued-*")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == [copy.name]
    assert copy.stat().st_mode & 0o777 == 0o600
    daemon.wait_for_log(
        f"WARNING: stopping: {db} was removed while the daemon ran: its log is emptied, so "
        "that the next start replays nothing into another file; what it kept (3 blockers) "
        f"is saved as {copy}, in {directory}, which was removed too and is made again for "
        f"it; the next start names it; rename that to {db} to use it\n")
    assert daemon.log().rstrip("\n").endswith("INFO: stopped")
    refused = start_daemon("--state-dir", str(directory), wait=False)
    assert refused.wait_exit() == EXIT_NOTCONFIGURED
    assert f"ERROR: {db} does not exist; a stop saved what a daemon kept as {copy}" in (
        refused.log())
    copy.rename(db)
    again = start_daemon("--state-dir", str(directory))
    again.wait_for_log(restored_line(directory, 3))
    async with again.client() as c:
        assert await ids(c) == ["b0", "b1", "b2"]


async def test_a_database_replaced_under_the_running_daemon_gets_no_replay_of_its_log(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A backup restored under the running daemon (as the refusal of commits to a
    replaced state.db says: restart to use it).  Before, the clean stop left the
    daemon's log beside the restored file, and the next start replayed it into
    that file: the backup's blockers were gone, replaced by the old daemon's, and
    no line said so."""
    directory = tmp_path / "state"
    db = directory / "state.db"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c:
        await add(c, "in the backup", id="backed-up")
    assert first.stop() == 0
    backup = tmp_path / "backup.db"
    shutil.copy2(db, backup)
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info")
    async with daemon.client() as c:
        for n in range(3):
            await add(c, "after the backup", id=f"later{n}")
        staged = directory / "staged.db"
        shutil.copy2(backup, staged)
        staged.rename(db)  # as a restore does: the file replaced whole
        reply = await c.execute("add-blocker", {"reason": "not acknowledged", "id": "no"})
        assert "it is not the file the daemon opened" in reply["error"]["desc"], reply
    assert daemon.stop() == 0
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["backed-up"]
        await add(c, "after the restore", id="new")
    assert again.stop() == 0
    [copy] = directory.glob("state.db.rescued-*")
    assert f"WARNING: stopping: {db} was replaced while the daemon ran: its log is " \
        "emptied, so that the next start replays nothing into another file; what it kept " \
        f"(4 blockers) is saved as {copy}; the next start uses the file there now; to use " \
        "the copy instead, stop the daemon, move state.db, state.db-wal and state.db-shm " \
        f"away, and rename the copy to {db}\n" in daemon.log()
    # The saved copy is whole: what the replaced file held, its log's changes included;
    # used as the line says (the restored file's log moved away with it).
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        if (directory / name).exists():
            (directory / name).rename(tmp_path / name)
    copy.rename(db)
    last = start_daemon("--state-dir", str(directory))
    async with last.client() as c:
        assert await ids(c) == ["backed-up", "later0", "later1", "later2"]


async def test_a_restore_under_the_daemon_is_not_undone_by_a_kill_after_it_is_seen(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Found by review: the daemon's log stayed beside a backup restored under it
    until its stop; killed before (a watchdog, the OOM killer), the next start
    replayed that log into the restored file.  The first commit refused for the
    replacement now folds the log into the file the daemon opened."""
    directory = tmp_path / "state"
    db, wal = directory / "state.db", directory / "state.db-wal"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await add(c, "in the backup", id="backed-up")
        backup = tmp_path / "backup.db"
        with contextlib.closing(sqlite3.connect(db)) as source, \
                contextlib.closing(sqlite3.connect(backup)) as target:
            source.backup(target)
        for n in range(20):
            await add(c, "x" * 1000, id=f"later{n}")
        assert wal.stat().st_size > 0
        staged = directory / "staged.db"
        shutil.copy2(backup, staged)
        staged.rename(db)
        reply = await c.execute("add-blocker", {"reason": "not acknowledged", "id": "no"})
        assert "it is not the file the daemon opened" in reply["error"]["desc"], reply
        assert wal.stat().st_size == 0
    kill(daemon)
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["backed-up"]


@pytest.mark.parametrize("how", ["install", "mv"])
async def test_a_restore_under_the_daemon_killed_before_it_is_seen_is_not_undone(
    start_daemon: Start, tmp_path: Path, how: str
) -> None:
    """Found by the cross-feature review: the restore of docs/state.md done while the
    daemon runs (its stop skipped), and the daemon killed before its next commit,
    which is when it sees the restore.  The next start replayed the killed daemon's
    log into the restored backup and served the old blockers as if the restore had
    never been made, with no line saying so.  It is refused now, the files left as
    they were; done as the line says, the restored file is served."""
    directory = tmp_path / "state"
    db, wal, index = directory / "state.db", directory / "state.db-wal", directory / "state.db-shm"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await add(c, "in the backup", id="backed-up")
        backup = tmp_path / "backup.db"
        subprocess.run(["sqlite3", str(db), f".backup {backup}"], check=True, timeout=30)
        for n in range(5):
            await add(c, "after the backup", id=f"later{n}")
        assert wal.stat().st_size > 0
        # The restore's own commands, as a shell runs them; nothing commits meanwhile.
        if how == "install":
            subprocess.run(["install", "-m", "0600", str(backup), str(db)], check=True)
        else:
            shutil.copy2(backup, tmp_path / "staged.db")
            subprocess.run(["mv", str(tmp_path / "staged.db"), str(db)], check=True)
    kill(daemon)
    assert_start_refused(
        start_daemon, directory,
        f"{db} is not the file that the last daemon here opened (it was replaced while "
        "that daemon ran, a backup restored under it, say, and the daemon was killed "
        f"before it saw it), and {wal} holds that daemon's changes to the file it opened, "
        f"which SQLite would replay into this one; to use {db} as it is, move {wal} and "
        f"{index} away; to go on with what the daemon kept, put the file it opened back as "
        f"{db}, if it was moved away rather than removed")
    for each in (wal, index):
        each.rename(tmp_path / each.name)
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["backed-up"]
        await add(c, "after the restore", id="new")
    kill(again)  # its own log is its file's: replayed, as after any kill
    last = start_daemon("--state-dir", str(directory))
    async with last.client() as c:
        assert await ids(c) == ["backed-up", "new"]


async def test_a_state_directory_copied_whole_with_its_log_is_restored_from_it(
    start_daemon: Start, tmp_path: Path
) -> None:
    """The other side of the test above: a copy of the whole directory (lock, database
    and a killed daemon's log, cp -a) is another directory, whose log is its
    database's: replayed, not refused."""
    directory, copy = tmp_path / "state", tmp_path / "copy"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        for n in range(3):
            await add(c, "acknowledged", id=f"b{n}")
    kill(daemon)
    assert (directory / "state.db-wal").stat().st_size > 0
    subprocess.run(["cp", "-a", str(directory), str(copy)], check=True)
    again = start_daemon("--state-dir", str(copy))
    async with again.client() as c:
        assert await ids(c) == ["b0", "b1", "b2"]


async def test_a_log_left_beside_a_link_to_the_database_stops_the_daemon(
    start_daemon: Start, tmp_path: Path
) -> None:
    """state.db moved to another volume after a crash, and linked to: SQLite reads
    the log beside the link's target, so the one left beside the link, holding
    every change since the last checkpoint, was ignored: before, the daemon
    started with none of the acknowledged blockers."""
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await add(c, "acknowledged", id="kept")
    kill(daemon)
    volume = tmp_path / "volume"
    volume.mkdir(mode=0o700)
    db, wal = directory / "state.db", directory / "state.db-wal"
    db.rename(volume / "state.db")
    db.symlink_to(volume / "state.db")
    refused = start_daemon("--state-dir", str(directory), "--log-level", "info", wait=False)
    assert refused.wait_exit() == EXIT_NOTCONFIGURED
    assert only_line(refused) == (
        f"{wal} holds changes that SQLite would not read: {db} links to {volume}/state.db, "
        f"whose log is {volume}/state.db-wal; move {wal} there, or put the database back "
        "in place of the link")
    assert wal.stat().st_size > 0
    # Done as the message says, the change is there.
    wal.rename(volume / "state.db-wal")
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await ids(c) == ["kept"]


@pytest.mark.parametrize("cut", ["at random", "removed", "a page damaged"])
async def test_a_log_cut_after_a_kill_stops_the_daemon_rather_than_drop_blockers(
    start_daemon: Start, tmp_path: Path, cut: str
) -> None:
    """After a SIGKILL the next start rebuilds the log's index from the log, up
    to where the log ends or a frame's checksum fails: before, a log cut short
    (or removed, or damaged) meanwhile gave a start that restored fewer blockers
    than were acknowledged, and said nothing."""
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        for n in range(20):
            await add(c, f"acknowledged {n}", id=f"b{n}")
    kill(daemon)
    wal, shm = directory / "state.db-wal", directory / "state.db-shm"
    frame = 24 + 4096
    frames = (wal.stat().st_size - 32) // frame
    if cut == "removed":
        wal.unlink()
        why = "it is missing"
    elif cut == "a page damaged":
        flip_bit(wal, 32 + 5 * frame + 24 + 100)  # in the sixth frame's page
        why = f"frame 6 of {frames} is damaged"
    else:
        offset = random.Random(5).randrange(32 + frame, 32 + frames * frame)
        os.truncate(wal, offset)
        why = f"it holds {(offset - 32) // frame} of the {frames} frames"
    before = digest(directory)
    refused = start_daemon("--state-dir", str(directory), "--log-level", "info", wait=False)
    assert refused.wait_exit() == EXIT_NOTCONFIGURED
    assert only_line(refused) == (
        f"{wal} has lost changes that its index {shm} records as committed ({why}), so "
        "starting would drop blockers that were acknowledged; restore the state directory "
        f"from a backup, or remove {shm} to start with what the log still holds (the rest "
        "is lost)" + (f"; if a program opened {directory / 'state.db'} in exclusive locking "
                      "mode since the crash, it folded the log into the database and left "
                      f"the index behind: then nothing is lost, and removing {shm} is all "
                      "there is to do" if cut == "removed" else ""))
    assert digest(directory) == before
    # Done as the message says: the blockers of the commits before the cut.
    shm.unlink()
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        kept = await ids(c)
    assert kept == [f"b{n}" for n in range(len(kept))]
    assert len(kept) < 20


async def test_a_kill_after_the_log_header_before_its_first_frame_restores(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A daemon killed in its first commit after a clean stop, once SQLite has
    written the log's 32-byte header and before its first frame (a real SIGKILL,
    which strace sends as that frame's write begins), leaves a log that is a
    header and nothing else.  Before, the start's read-only look at it
    (``readonly_shm``) never settled: SQLite's recovery takes a log of exactly
    its header's size for an empty one and skips its salts, so every try to
    read found the log "changed"; after about 10 s the start failed with
    ``SQLITE_PROTOCOL: locking protocol; move it away to start from scratch``,
    advice that throws every acknowledged blocker away."""
    directory = tmp_path / "state"
    first = start_daemon("--state-dir", str(directory))
    async with first.client() as c:
        for n in range(5):
            await add(c, f"acknowledged {n}", id=f"b{n}")
    assert first.stop() == 0  # a clean stop removes the log: the next commit begins it
    wal = directory / "state.db-wal"
    second = start_daemon("--state-dir", str(directory))
    async with injecting(second.proc.pid, "pwrite64", "signal=SIGKILL:when=2", "the daemon",
                         paths=[wal]):
        async with second.client() as c:
            await c.send({"execute": "add-blocker",
                          "arguments": {"reason": "never answered", "id": "unsure"}})
            with pytest.raises((EOFError, ConnectionError)):
                await c.read_reply()
        assert second.wait_exit() == -signal.SIGKILL
    assert wal.stat().st_size == 32
    third = start_daemon("--state-dir", str(directory))
    async with third.client() as c:
        assert await ids(c) == [f"b{n}" for n in range(5)]
    assert third.stop() == 0


async def test_a_state_dir_through_a_symlink_and_dot_dot_is_judged_where_it_leads(
    start_daemon: Start, tmp_path: Path
) -> None:
    """``link/..`` is the directory above the link's target, as the kernel opens
    it.  Before, the check folded it lexically (to the directory holding the
    link): it judged a directory the daemon never used, and named it as the
    state directory ("cannot check", or "writable by others" for the wrong one)."""
    there = tmp_path / "there"
    (there / "dir").mkdir(parents=True)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "link").symlink_to(there / "dir")
    (tmp_path / "w" / "state").mkdir()
    (tmp_path / "w" / "state").chmod(0o777)  # where the folded path pointed
    given = tmp_path / "w" / "link" / ".." / "state"
    daemon = start_daemon("--state-dir", str(given))
    async with daemon.client() as c:
        await add(c, "kept where the kernel put it", id="k")
    assert daemon.stop() == 0
    assert (there / "state" / "state.db").exists()
    assert not any((tmp_path / "w" / "state").iterdir())
    (there / "state").chmod(0o777)
    refused = start_daemon("--state-dir", str(given), "--log-level", "info", wait=False)
    assert refused.wait_exit() == EXIT_NOTCONFIGURED
    assert only_line(refused) == (
        f"refusing to keep state in {given}: state directory {given} (which is {there}/state) "
        f"is writable by others (mode 0777), so they could replace the database; chmod go-w "
        f"{there}/state, or choose another --state-dir")


def schema_without_cpr_exec(directory: Path) -> Path:
    """A copy of the schema whose MigMode lacks ``cpr-exec`` (its main file)."""
    shutil.copytree(ROOT / "schema", directory)
    migration = directory / "migration.json"
    text = migration.read_text()
    text = text.replace("'cpr-transfer', 'cpr-exec' ]", "'cpr-transfer' ]")
    text, found = re.subn(r"# @cpr-exec:.*?(?=# Since: )", "", text, count=1, flags=re.S)
    assert found == 1
    migration.write_text(text)
    return directory / "migblockd.json"


def end(daemon: DaemonProcess, how: str) -> None:
    """Stop ``daemon`` (SIGTERM: its log folded into state.db and removed) or kill
    it (SIGKILL: the log and its index left for the next start to read)."""
    if how == "SIGTERM":
        assert daemon.stop() == 0
    else:
        kill(daemon)


def assert_start_refused(start_daemon: Start, directory: Path, line: str, *args: str) -> None:
    """A daemon on ``directory`` with ``args`` stops at start with ``line`` alone, and
    leaves the state files as they were: state.db, and the log and its index
    that a killed daemon left (the refusal comes after the database was read,
    and a connection that may write would rebuild the index, and fold the log
    into state.db when it closes)."""
    before = digest(directory)
    refused = start_daemon("--state-dir", str(directory), *args, "--log-level", "info",
                           wait=False)
    assert refused.wait_exit() == EXIT_NOTCONFIGURED
    assert only_line(refused) == line
    assert digest(directory) == before


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_blocker_of_a_mode_the_schema_dropped_stops_the_daemon(
    start_daemon: Start, tmp_path: Path, how: str
) -> None:
    """Dropping it could let through a migration it was there to stop."""
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await add(c, "exec only", id="x", modes=["cpr-exec", "normal"])
    end(daemon, how)
    schema = schema_without_cpr_exec(tmp_path / "schema")
    assert_start_refused(
        start_daemon, directory,
        f"{directory}/state.db: stored blocker 'x' blocks modes the schema does not define "
        "(cpr-exec); use a --schema that defines them, or move the state directory away to "
        "start from scratch", "--schema", str(schema))


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_a_blocker_only_migratable_refuses_stops_the_daemon_it_was_turned_on_for(
    start_daemon: Start, tmp_path: Path, how: str
) -> None:
    """QEMU never holds one under -only-migratable; dropping it could let a migration
    through.  Those it accepts (internal, or not of the normal mode) come back.
    Killed, the daemon leaves its blockers in the log: the refused start reads them
    there and leaves the log, its index and state.db byte for byte as they were."""
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await add(c, "dump in progress", id="dump", internal=True)
        await add(c, "reboot only", id="reboot", modes=["cpr-reboot"])
        await add(c, "VFIO device", id="vfio")
    end(daemon, how)
    if how == "SIGKILL":
        assert (directory / "state.db-wal").stat().st_size > 0
        assert (directory / "state.db-shm").exists()
    assert_start_refused(
        start_daemon, directory,
        f"{directory}/state.db: stored blocker 'vfio' blocks the normal mode and is not "
        "internal, which --only-migratable refuses; start without --only-migratable and "
        "delete it, or move the state directory away to start from scratch",
        "--only-migratable")
    # As the line says: without the option, delete it; then the option starts.
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        assert await c.ok("del-blocker", {"id": "vfio"}) == {}
    assert daemon.stop() == 0
    daemon = start_daemon("--state-dir", str(directory), "--only-migratable")
    async with daemon.client() as c:
        assert [b["id"] for b in await c.ok("query-blockers")] == ["dump", "reboot"]


# ----------------------------------------------------------------- --ephemeral


def check_config(config: Path, socket: Path) -> str:
    checked = subprocess.run([sys.executable, "-m", "migblockd", "--check-config", "--config",
                              str(config), "--socket", str(socket)],
                             capture_output=True, text=True, timeout=30)
    assert (checked.returncode, checked.stderr) == (0, ""), checked.stderr
    return checked.stdout


async def test_a_state_dir_moved_by_a_reload_is_said_to_leave_the_blockers_behind(
        start_daemon: Start, tmp_path: Path) -> None:
    # Found by review: with state-dir edited (or ephemeral turned on) the check
    # said only "valid", the reload only "state-dir changed, which only a restart
    # applies", and the restart created an empty database: migration no longer
    # blocked by the blockers kept in the old one.
    old, new = tmp_path / "old", tmp_path / "new"
    config = tmp_path / "m.toml"
    config.write_text(f'state-dir = "{old}"\n')
    config.chmod(0o600)
    d = start_daemon("--config", str(config), own_state=False)
    d.wait_for_log(restored_line(old, 0))
    kept = f"the 2 blockers kept in {old}/state.db"
    async with d.client() as c:
        await add(c, "kept", id="a")
        await add(c, "kept too", id="b")
        await add(c, "not stored", id="c", scope="connection")  # not counted
        config.write_text(f'# moved\nstate-dir = "{new}"\n')
        assert check_config(config, d.socket) == (
            f"migblockd: {config} and the command line: valid; socket {d.socket}, state in "
            f"{new}, which does not exist yet: a start makes it, with an empty state "
            "database\n")
        d.signal(signal.SIGHUP)
        # At the line the operator edited (reproduced first: the bare key).
        d.wait_for_log(f"WARNING: reload: {config}:2: state-dir changed, which only a restart "
                       "applies\n")
        # And where it tells what the next start does with them (reproduced first too).
        d.wait_for_log(
            f"WARNING: reload: {config}:2: with state-dir as the file now sets it, the next "
            f"start finds no database in {new}, which does not exist yet, and will not "
            f"restore {kept} (it makes the directory, with an empty database); to keep them, "
            f"stop the daemon, make {new} as a start would (mode 0700, owned by uid "
            f"{os.geteuid()} ({pwd.getpwuid(os.geteuid()).pw_name}), the user the daemon runs "
            "as; any directory made above it writable by no one else), move state.db and its "
            f"state.db-wal, if there, from {old} into {new}, then start it\n")
        new.mkdir(mode=0o700)
        assert check_config(config, d.socket).endswith(
            f"state in {new}, which holds no state database yet: a start creates an empty "
            "one\n")
        # Made, and still empty: moving the files "to" it is moving them into it.
        d.signal(signal.SIGHUP)
        d.wait_for_log(
            f"WARNING: reload: {config}:2: with state-dir as the file now sets it, the next "
            f"start finds no database in {new} and will not restore {kept} (it creates an "
            "empty one); to keep them, stop the daemon, move state.db and its state.db-wal, "
            f"if there, from {old} to {new}, then start it\n")
        config.write_text(f'state-dir = "{old}"\nephemeral = true\n')
        d.signal(signal.SIGHUP)
        d.wait_for_log(f"WARNING: reload: {config}:2: with ephemeral as the file now sets it, "
                       f"the next start keeps nothing and ignores {kept}\n")
    # Done as the warning says, the next start in the new directory restores them.
    config.write_text(f'state-dir = "{new}"\n')
    assert d.stop() == 0
    for name in ("state.db", "state.db-wal"):
        if (old / name).exists():
            (old / name).rename(new / name)
    assert check_config(config, d.socket).endswith(f"state in {new}\n")
    again = start_daemon("--config", str(config), own_state=False)
    again.wait_for_log(restored_line(new, 2))
    async with again.client() as c:
        assert await ids(c) == ["a", "b"]
    assert_clean_log(d)


async def test_ephemeral_forgets_on_restart(start_daemon: Start, tmp_path: Path) -> None:
    unused = tmp_path / "unused"
    first = start_daemon("--ephemeral", "--state-dir", str(unused))
    first.wait_for_log("state: ephemeral: blockers live in memory only, a restart forgets them")
    # Given, yet unused: the log says so (a reviewer found it silently ignored).
    first.wait_for_log(f"WARNING: state: state-dir {unused} is not used: the state is "
                       "ephemeral\n")
    async with first.client() as c:
        await add(c, "in memory", id="mem")
        await c.ok("migrate-set-parameters", {"mode": "cpr-reboot"})
    assert first.stop() == 0
    assert "restored" not in first.log()
    assert not unused.exists()  # nothing was written anywhere
    second = start_daemon("--ephemeral", "--state-dir", str(unused))
    async with second.client() as c:
        assert await blockers(c) == []
        assert (await c.ok("query-migrate-parameters"))["mode"] == "normal"
        assert (await add(c, "again"))["id"] == "#blocker0"


async def test_a_state_dir_the_file_gives_an_ephemeral_daemon_is_named_at_its_line(
        start_daemon: Start, tmp_path: Path) -> None:
    # Reproduced first: "state: ephemeral, so state-dir DIR is not used", no file, no
    # line, though only the file gave it.
    unused = tmp_path / "unused"
    config = tmp_path / "m.toml"
    config.write_text(f'# memory only\nephemeral = true\n\nstate-dir = "{unused}"\n')
    d = start_daemon("--config", str(config), own_state=False)
    d.wait_for_log(f"WARNING: state: {config}:4: state-dir {unused} is not used: the state is "
                   "ephemeral\n")
    assert d.stop() == 0
    assert not unused.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as a uid that has no account")
async def test_ephemeral_starts_for_a_user_without_a_home(
    start_daemon: Start, tmp_path: Path, short_tmp: Path
) -> None:
    """A bare uid (a container's --user, no $HOME) has no default --state-dir;
    an ephemeral daemon needs none, yet it was told to give one and stopped."""
    uid = bare_uid()
    as_uid = tmp_path / "python-as-a-bare-uid"
    as_uid.write_text(f"#!/bin/sh\nexec setpriv --reuid={uid} --regid={uid} --clear-groups "
                      f"{sys.executable} \"$@\"\n")
    as_uid.chmod(0o755)
    short_tmp.chmod(0o755)
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    os.chown(run, uid, uid)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    daemon = start_daemon("--ephemeral", "--log-level", "info", socket=run / "s.sock",
                          env=env, python=str(as_uid))
    async with daemon.client() as c:
        await add(c, "in memory", id="mem")
        assert await ids(c) == ["mem"]
    assert daemon.stop() == 0
    assert "WARNING" not in daemon.log()  # no state-dir was given, so none is "not used"
    # Durable, it still needs one and says so: test_state_store.py's
    # test_a_user_without_a_home_is_told_to_give_a_state_dir.
