"""A full disk under the running daemon: the commands fail, nothing else does.

The state directory is on a real 1 MiB tmpfs, mounted in a private mount
namespace that a holder process (``unshare --mount``) keeps alive, so that the
host's mounts are untouched and the file system outlives each daemon: every
daemon joins the namespace with ``nsenter``.  The test fills the tmpfs from
outside through ``/proc/HOLDER/root``, which resolves paths in the holder's
mounts, and frees it the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess, assert_clean_log
from faults import injecting

from migblockd.startup import EXIT_NOTCONFIGURED
from migblockd.state.errors import commit_failed, describe_open_error

Start = Callable[..., DaemonProcess]


class Namespace:
    """A mount namespace with a small tmpfs at ``mountpoint``, kept by a holder."""

    def __init__(self, mountpoint: Path, holder: subprocess.Popen[str], enter: list[str]) -> None:
        self.mountpoint = mountpoint
        self.holder = holder
        self.enter = enter

    def outside(self, path: Path) -> Path:
        """``path`` (under the mountpoint) as this process can reach it."""
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def python(self, directory: Path) -> str:
        """An interpreter path that runs this one inside the namespace."""
        wrapper = directory / "python-in-namespace"
        wrapper.write_text(f"#!/bin/sh\nexec {' '.join(self.enter)} -- "
                           f"{sys.executable} \"$@\"\n")
        wrapper.chmod(0o755)
        return str(wrapper)


@pytest.fixture
def small_tmpfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Namespace]:
    """1 MiB, or the mount options a test gives (``indirect``)."""
    options = getattr(request, "param", "size=1m")
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter (util-linux) for a private tmpfs")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    root = os.geteuid() == 0
    unshare = ["unshare", "--mount"] if root else [
        "unshare", "--user", "--map-root-user", "--mount"]
    script = (f"mount -t tmpfs -o {options},mode=0700 tmpfs {mountpoint} && echo mounted && "
              "exec sleep 600")
    holder = subprocess.Popen([*unshare, "sh", "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stderr is not None
    if holder.stdout.readline() != "mounted\n":
        holder.kill()
        holder.wait()
        pytest.skip(f"no mount namespaces here for a small tmpfs: {holder.stderr.read()}")
    enter = ["nsenter", f"--target={holder.pid}", "--mount"]
    if not root:
        enter[2:2] = ["--user", "--preserve-credentials"]
    try:
        yield Namespace(mountpoint, holder, enter)
    finally:
        holder.kill()
        holder.wait()


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no space left."""
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError as e:
            assert e.strerror == "No space left on device", e


def fill_all(namespace: Namespace, db: Path) -> None:
    """Fill the file system, the space the daemon's log holds included: the
    daemon empties its log when a commit finds the disk full, and tries again,
    so a log left as it was would give the next commit room.  (The log is
    emptied from inside the namespace: SQLite resolves ``/proc/PID/root``.)"""
    empty = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
             "assert c.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0] == 0")
    subprocess.run([*namespace.enter, "--", sys.executable, "-c", empty, str(db)], check=True)
    fill(namespace.outside(namespace.mountpoint / "filler"))


async def test_full_disk_fails_the_commands_and_the_daemon_recovers(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace
) -> None:
    directory = small_tmpfs.mountpoint / "state"
    db = directory / "state.db"
    python = small_tmpfs.python(tmp_path)
    daemon = start_daemon("--state-dir", str(directory), python=python)
    daemon.wait_for_log(f"restored 0 blockers from {db}")
    filler = small_tmpfs.outside(small_tmpfs.mountpoint / "filler")

    async with daemon.client() as watcher, daemon.client() as c:
        before = await c.ok("add-blocker", {"reason": "before", "id": "before"})
        await watcher.wait_event("BLOCKER_ADDED")
        c.events.clear()  # its own BLOCKER_ADDED
        fill_all(small_tmpfs, db)

        # Three changes in flight: an add, a delete and a setting.
        for n, (command, args) in enumerate([
            ("add-blocker", {"reason": "while full"}),
            ("del-blocker", {"id": "before"}),
            ("migrate-set-parameters", {"mode": "cpr-exec"}),
        ]):
            await c.send({"execute": command, "arguments": args, "id": n})
        desc = f"cannot commit to {db}: database or disk is full; nothing was changed"
        assert await c.read_replies(3) == [
            {"error": {"class": "GenericError", "desc": desc}, "id": n} for n in range(3)]
        daemon.wait_for_log(re.compile(
            re.escape(f"ERROR: cannot commit to {db}: database or disk is full; ")
            + r"[123] command\(s\) failed, their changes undone"))

        # Back to what is on disk, for everyone; nobody heard of the failed changes.
        for client in (watcher, c):
            assert await client.sync() == []
            assert client.events == []
            assert await client.ok("query-blockers") == [before]
            assert (await client.ok("query-migrate-parameters"))["mode"] == "normal"
            assert (await client.ok("query-migrate"))["blocked-reasons"] == ["before"]

        # Still full: the next change fails too; reading never does.
        refused = await c.execute("add-blocker", {"reason": "still full", "id": "x"})
        assert refused["error"]["desc"] == desc
        assert await watcher.ok("query-blockers") == [before]
        # A connection-scoped blocker that takes the id a failing delete frees is
        # never stored, but stands on the delete: it fails with it.  (One write,
        # so that both run before the delete's commit can fail.)
        c.send_raw(json.dumps({"execute": "del-blocker", "arguments": {"id": "before"},
                               "id": "d"}).encode()
                   + json.dumps({"execute": "add-blocker", "id": "a", "arguments": {
                       "reason": "mine", "id": "before", "scope": "connection"}}).encode())
        assert await c.read_replies(2) == [
            {"error": {"class": "GenericError", "desc": desc}, "id": n} for n in "da"]
        assert await watcher.ok("query-blockers") == [before]
        assert watcher.events == []

        # Space again: the next change succeeds, with its event, without a restart.
        filler.unlink()
        after = await c.ok("add-blocker", {"reason": "after", "id": "after"})
        event = await watcher.wait_event("BLOCKER_ADDED")
        assert event["data"] == after
        assert await watcher.sync() == []
        assert await watcher.ok("query-blockers") == [before, after]
    assert daemon.stop() == 0
    assert_clean_log(daemon)

    again = start_daemon("--state-dir", str(directory), python=python)
    again.wait_for_log(f"restored 2 blockers from {db}")
    async with again.client() as c:
        assert await c.ok("query-blockers") == [before, after]
        assert (await c.ok("query-migrate-parameters"))["mode"] == "normal"


async def test_systemd_status_says_while_commits_fail(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace, short_tmp: Path
) -> None:
    # STATUS= (what systemctl status shows) said "1 blocker, 1 client, migration:
    # none" while every change failed on a full disk; the log alone told.
    directory = small_tmpfs.mountpoint / "state"
    db = directory / "state.db"
    notify = short_tmp / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify))
    receiver.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    daemon = start_daemon("--state-dir", str(directory), python=small_tmpfs.python(tmp_path),
                          env=env)

    def status_until(wanted: Callable[[str], bool]) -> str:
        while True:
            for line in receiver.recv(4096).decode().splitlines():
                if line.startswith("STATUS=") and wanted(line):
                    return line

    try:
        async with daemon.client() as c:
            await c.ok("add-blocker", {"reason": "before", "id": "before"})
            fill_all(small_tmpfs, db)
            assert "error" in await c.execute("add-blocker", {"reason": "full", "id": "x"})
            why = f"cannot commit to {db}: database or disk is full"
            assert status_until(lambda line: "state:" in line) == (
                f"STATUS=1 blocker, 1 client, migration: none, state: {why}")
            small_tmpfs.outside(small_tmpfs.mountpoint / "filler").unlink()
            await c.ok("add-blocker", {"reason": "after", "id": "after"})
            assert status_until(lambda line: "state:" not in line) == (
                "STATUS=2 blockers, 1 client, migration: none")
        daemon.wait_for_log(f"INFO: commits succeed again, after 1 failed (the last: {why})")
    finally:
        receiver.close()
    assert daemon.stop() == 0


async def test_a_disk_full_again_is_logged_after_commits_were_said_to_succeed(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace
) -> None:
    # The row of failures before had used up its reason's lines: the failure after
    # "commits succeed again" was not logged, which stayed the log's last word.
    directory = small_tmpfs.mountpoint / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory), python=small_tmpfs.python(tmp_path))
    async with daemon.client() as c:
        await c.ok("add-blocker", {"reason": "before", "id": "before"})
        fill_all(small_tmpfs, db)
        for i in range(12):
            assert "error" in await c.execute("add-blocker", {"reason": "full", "id": f"x{i}"})
        small_tmpfs.outside(small_tmpfs.mountpoint / "filler").unlink()
        await c.ok("add-blocker", {"reason": "after", "id": "after"})
        daemon.wait_for_log("INFO: commits succeed again, after 12 failed")
        fill_all(small_tmpfs, db)
        assert "error" in await c.execute("add-blocker", {"reason": "full", "id": "again"})
    assert daemon.stop() == 0  # every line written
    log = daemon.log()
    after = log[log.index("commits succeed again"):]
    assert (f"ERROR: cannot commit to {db}: database or disk is full; 1 command(s) failed, "
            "their changes undone; every change fails until a commit succeeds") in after, after


async def test_crash_on_a_full_disk_restarts_and_serves(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace
) -> None:
    """Killed while its disk is full (with a failed commit's pages perhaps in the
    log), the daemon starts again on the full disk: it restores what was
    committed, serves reads, fails changes, and recovers when space returns."""
    directory = small_tmpfs.mountpoint / "state"
    db = directory / "state.db"
    python = small_tmpfs.python(tmp_path)
    filler = small_tmpfs.outside(small_tmpfs.mountpoint / "filler")
    daemon = start_daemon("--state-dir", str(directory), "--max-reason-length", "20000",
                          python=python)
    async with daemon.client() as c:
        before = await c.ok("add-blocker", {"reason": "before", "id": "before"})
        fill_all(small_tmpfs, db)
        refused = await c.execute("add-blocker", {"reason": "x" * 20000, "id": "big"})
        assert "database or disk is full" in refused["error"]["desc"]
    daemon.proc.kill()
    daemon.proc.wait()

    again = start_daemon("--state-dir", str(directory), python=python)
    again.wait_for_log(f"restored 1 blocker from {db}")
    async with again.client() as c:
        assert await c.ok("query-blockers") == [before]
        refused = await c.execute("del-blocker", {"id": "before"})
        assert refused == {"error": {"class": "GenericError", "desc": (
            f"cannot commit to {db}: database or disk is full; nothing was changed")}}
        assert await c.ok("query-blockers") == [before]
        filler.unlink()
        assert await c.ok("del-blocker", {"id": "before"}) == {}
        assert await c.ok("query-blockers") == []
    assert again.stop() == 0
    assert_clean_log(again)


def limited_python(directory: Path, limit: int) -> str:
    """An interpreter path that runs this one under a file size limit of ``limit``
    bytes (RLIMIT_FSIZE, as ``ulimit -f`` or systemd's ``LimitFSIZE=`` sets it)."""
    wrapper = directory / "python-limited"
    wrapper.write_text(f"#!/bin/sh\nexec prlimit --fsize={limit}:unlimited -- "
                       f"{sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


async def test_a_file_size_limit_the_log_reaches_fails_no_commit(
    start_daemon: Start, tmp_path: Path
) -> None:
    """SQLite folds its log back into the database once it holds about 4 MiB: under
    a smaller file size limit the log reached it first, and from then on every
    change failed (deletes too, with the disk's advice) until a restart, on a disk
    with room and a database far below the limit.  A database that reaches the
    limit itself fails commits naming it, until the limit is raised."""
    directory = tmp_path / "state"
    db = directory / "state.db"
    limit = 256 << 10
    daemon = start_daemon("--state-dir", str(directory), "--max-reason-length", "4000",
                          log_level="info", python=limited_python(tmp_path, limit))
    async with daemon.client() as watcher, daemon.client() as c:
        # A commit each, of a 4 KiB page at least: the log alone would take
        # more than twice the limit.
        added = [await c.ok("add-blocker", {"reason": f"agent {n}", "id": f"b{n}"})
                 for n in range(150)]
        for n in range(0, 150, 2):
            assert await c.ok("del-blocker", {"id": f"b{n}"}) == {}
        kept = added[1::2]
        assert await c.ok("query-blockers") == kept
        assert os.path.getsize(directory / "state.db-wal") <= limit

        # Blockers of a page each until the database holds all the limit allows.
        desc = (f"cannot commit to {db}: disk I/O error (the daemon's file size limit, "
                f"{limit} bytes, is reached); nothing was changed")
        for n in range(limit // 4096):
            big = await c.execute("add-blocker", {"reason": "x" * 4000, "id": f"big{n}"})
            if "error" in big:
                break
            kept.append(big["return"])
        assert big == {"error": {"class": "GenericError", "desc": desc}}, big
        assert await c.execute("del-blocker", {"id": "b1"}) == big
        await watcher.sync()
        watcher.events.clear()  # the adds that succeeded
        daemon.wait_for_log(
            f"{desc[:-len('; nothing was changed')]}; 1 command(s) failed, their changes "
            "undone; every change fails until a commit succeeds: raise the daemon's file "
            "size limit (LimitFSIZE= under systemd, ulimit -f in the shell that starts it; "
            f"prlimit --pid {daemon.proc.pid} --fsize=unlimited raises it now)\n")
        subprocess.run(["prlimit", "--pid", str(daemon.proc.pid), "--fsize=unlimited"],
                       check=True)
        assert await c.ok("del-blocker", {"id": "b1"}) == {}
        assert (await watcher.wait_event("BLOCKER_DELETED"))["data"]["id"] == "b1"
        assert await watcher.sync() == []
        del kept[0]
        assert await watcher.ok("query-blockers") == kept
    assert daemon.stop() == 0
    assert_clean_log(daemon)

    again = start_daemon("--state-dir", str(directory), log_level="info")
    again.wait_for_log(f"restored {len(kept)} blockers from {db}")
    async with again.client() as c:
        assert await c.ok("query-blockers") == kept
    assert again.stop() == 0


async def test_a_write_a_disk_quota_refused_is_tried_again_once_the_log_is_emptied(
    start_daemon: Start, tmp_path: Path
) -> None:
    """SQLite reports EDQUOT as a plain I/O error, and a quota does not show in the
    file system's free space: the log that filled the quota failed every commit, as
    it did at the file size limit, until a restart.  The kernel here has no quota
    (neither ext4's, nor XFS's, nor tmpfs's), so strace makes the commit's write and
    the quota's probe after it fail with EDQUOT, as a full quota does; the log is
    then emptied, which frees what it held, and the commit tried once more."""
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory), log_level="info")
    async with daemon.client() as watcher, daemon.client() as c:
        await c.ok("add-blocker", {"reason": "before", "id": "before"})
        async with injecting(daemon.proc.pid, "pwrite64", "error=EDQUOT:when=1..2",
                             "the daemon"):
            added = await c.ok("add-blocker", {"reason": "over quota", "id": "quota"})
        assert (await watcher.wait_event("BLOCKER_ADDED"))["data"]["id"] == "before"
        assert (await watcher.wait_event("BLOCKER_ADDED"))["data"]["id"] == "quota"
        listing = await watcher.ok("query-blockers")
        assert [b["id"] for b in listing] == ["before", "quota"] and listing[1] == added
    assert daemon.stop() == 0
    assert "cannot commit" not in daemon.log()
    assert_clean_log(daemon)
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await c.ok("query-blockers") == listing
    assert again.stop() == 0


async def test_a_disk_quota_that_stays_exceeded_fails_commits_naming_it(
    start_daemon: Start, tmp_path: Path
) -> None:
    """While every write that needs a block is refused (EDQUOT, from strace), commits
    fail naming the quota, not the disk's free space; once it is not, the next commit
    succeeds, without a restart."""
    directory = tmp_path / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory), log_level="info")
    async with daemon.client() as c:
        kept = await c.ok("add-blocker", {"reason": "kept", "id": "kept"})
        desc = (f"cannot commit to {db}: disk I/O error (a disk quota on its file system is "
                "exceeded); nothing was changed")
        async with injecting(daemon.proc.pid, "pwrite64", "error=EDQUOT", "the daemon"):
            refused = await c.execute("add-blocker", {"reason": "refused", "id": "refused"})
            assert refused == {"error": {"class": "GenericError", "desc": desc}}, refused
            assert await c.execute("del-blocker", {"id": "kept"}) == refused
        daemon.wait_for_log(
            f"{desc[:-len('; nothing was changed')]}; 1 command(s) failed, their changes "
            "undone; every change fails until a commit succeeds: free space under the disk "
            f"quota that {directory} is under (of {pwd.getpwuid(os.geteuid()).pw_name}, the "
            "user the daemon runs as, of its group, or of the directory's project), or raise "
            "that quota\n")
        assert await c.ok("query-blockers") == [kept]
        after = await c.ok("add-blocker", {"reason": "after", "id": "after"})
        assert await c.ok("query-blockers") == [kept, after]
    assert daemon.stop() == 0
    assert "commits succeed again, after 2 failed" in daemon.log()
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        assert await c.ok("query-blockers") == [kept, after]
    assert again.stop() == 0


async def test_full_disk_at_start_stops_the_daemon(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace
) -> None:
    """No room for a new database: one line saying so, and nothing left behind."""
    directory = small_tmpfs.mountpoint / "state"
    fill(small_tmpfs.outside(small_tmpfs.mountpoint / "filler"))
    daemon = start_daemon("--state-dir", str(directory), "--log-level", "info",
                          python=small_tmpfs.python(tmp_path), wait=False)
    assert daemon.wait_exit() == 1
    lines = daemon.log().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(f"ERROR: cannot write {directory}/state.db (database or disk is "
                             "full); free some space on its file system"), lines[0]
    assert_clean_log(daemon)


async def test_a_read_only_file_system_at_start_says_how_to_make_it_writable(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace
) -> None:
    """As the units' ProtectSystem=strict leaves every path outside
    StateDirectory=: before, "fix its permissions" for a state.db linked there,
    "create it" for a directory to be made there, "make D writable by this user"
    for one that is there, when no permission was wrong."""
    python = small_tmpfs.python(tmp_path)
    volume = small_tmpfs.mountpoint / "volume"
    first = start_daemon("--state-dir", str(volume), python=python)
    async with first.client() as c:
        await c.ok("add-blocker", {"reason": "kept", "id": "kept"})
    assert first.stop() == 0
    linked = tmp_path / "linked"
    linked.mkdir(mode=0o700)
    (linked / "state.db").symlink_to(volume / "state.db")
    subprocess.run([*small_tmpfs.enter, "--", "mount", "-o", "remount,ro",
                    str(small_tmpfs.mountpoint)], check=True)
    strict = ("(the units' ProtectSystem=strict makes every path outside StateDirectory= "
              "read-only), or choose another --state-dir")
    new = small_tmpfs.mountpoint / "new"
    for directory, line in [
        (linked, f"cannot read and write {linked}/state.db: Read-only file system; remount "
                 f"that file system read-write, or, under systemd, add {volume} to "
                 f"ReadWritePaths= {strict}"),
        (volume, f"cannot open {volume}/lock: Read-only file system; remount that file "
                 f"system read-write, or, under systemd, add {volume} to ReadWritePaths= "
                 f"{strict}"),
        (new, f"cannot create state directory {new}: Read-only file system; remount that "
              f"file system read-write, or, under systemd, make {new} and add it to "
              f"ReadWritePaths= {strict}"),
    ]:
        refused = start_daemon("--state-dir", str(directory), "--log-level", "info",
                               python=python, wait=False)
        assert refused.wait_exit() == EXIT_NOTCONFIGURED
        lines = refused.log().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].endswith(f"ERROR: {line}"), lines[0]
        assert_clean_log(refused)
    # Remounted read-write, as the line says: the link's daemon finds what was kept.
    subprocess.run([*small_tmpfs.enter, "--", "mount", "-o", "remount,rw",
                    str(small_tmpfs.mountpoint)], check=True)
    again = start_daemon("--state-dir", str(linked), python=python)
    async with again.client() as c:
        assert [b["id"] for b in await c.ok("query-blockers")] == ["kept"]
    assert again.stop() == 0


@pytest.mark.parametrize("small_tmpfs", ["size=1m,nr_inodes=16"], indirect=True)
async def test_no_free_inode_at_start_says_so(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace
) -> None:
    """A clean stop removes the log; with no inode left for a new one, the next
    start failed with "make it and D writable by this user", which it was."""
    directory = small_tmpfs.mountpoint / "state"
    python = small_tmpfs.python(tmp_path)
    daemon = start_daemon("--state-dir", str(directory), python=python)
    async with daemon.client() as c:
        await c.ok("add-blocker", {"reason": "kept", "id": "kept"})
    assert daemon.stop() == 0
    files = small_tmpfs.outside(small_tmpfs.mountpoint / "files")
    files.mkdir()
    made = 0
    with contextlib.suppress(OSError):
        while True:
            (files / str(made)).touch()
            made += 1
    refused = start_daemon("--state-dir", str(directory), "--log-level", "info",
                           python=python, wait=False)
    assert refused.wait_exit() == 1
    lines = refused.log().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        f"ERROR: cannot write {directory}/state.db (unable to open database file); its file "
        "system has no free inodes: delete some files on it"), lines[0]
    assert_clean_log(refused)
    shutil.rmtree(files)
    again = start_daemon("--state-dir", str(directory), python=python)
    async with again.client() as c:
        assert [b["id"] for b in await c.ok("query-blockers")] == ["kept"]
    assert again.stop() == 0


@pytest.mark.parametrize("full", [True, False])
def test_an_io_error_on_a_full_disk_says_the_disk_is_full(
    small_tmpfs: Namespace, full: bool
) -> None:
    """SQLite reports some writes to a full disk as I/O errors (which write fails
    first decides): the operator is told what the file system says."""
    directory = small_tmpfs.outside(small_tmpfs.mountpoint)
    if full:
        fill(directory / "filler")
    db = directory / "state.db"
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = 10 | (3 << 8)  # SQLITE_IOERR_WRITE
    opened, committed = describe_open_error(db, error), str(commit_failed(db, error))
    if full:
        assert opened == (f"cannot write {db} (disk I/O error); its file system is full: "
                          "free some space on it")
        assert committed == f"cannot commit to {db}: disk I/O error (its file system is full)"
    else:
        assert opened.startswith(f"cannot read or write {db} (disk I/O error); check its disk")
        assert committed == f"cannot commit to {db}: disk I/O error"



@pytest.mark.parametrize(("command", "arguments", "query", "before"), [
    ("migrate-set-parameters", {"mode": "cpr-exec"}, "query-migrate-parameters",
     {"mode": "normal"}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]},
     "query-migrate-capabilities", [{"capability": "events", "state": False}]),
])
async def test_a_setting_repeated_before_its_commit_fails_with_it(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace, command: str,
    arguments: dict[str, object], query: str, before: object
) -> None:
    """A command that sets the value an uncommitted one set changes nothing
    itself, yet its success stands on that change: when the commit fails, both
    fail, or the client would be told of a setting that neither the daemon nor
    its disk has."""
    directory = small_tmpfs.mountpoint / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory), python=small_tmpfs.python(tmp_path))
    async with daemon.client() as c:
        fill_all(small_tmpfs, db)
        # One write: both run in one turn, before the first one's commit fails.
        c.send_raw(b"".join(json.dumps({"execute": command, "arguments": arguments,
                                        "id": n}).encode() for n in range(2)))
        desc = f"cannot commit to {db}: database or disk is full; nothing was changed"
        assert await c.read_replies(2) == [
            {"error": {"class": "GenericError", "desc": desc}, "id": n} for n in range(2)]
        result = await c.ok(query)
        if isinstance(before, dict):
            result = {key: result[key] for key in before}
        assert result == before
    assert daemon.stop() == 0
    assert_clean_log(daemon)


async def test_the_other_parameters_of_a_failed_mode_change_are_taken_back(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace
) -> None:
    """max-bandwidth and downtime-limit are not stored, but set in the same
    command as a mode whose commit fails, they go back with it: the error says
    nothing was changed."""
    directory = small_tmpfs.mountpoint / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory), python=small_tmpfs.python(tmp_path))
    async with daemon.client() as c:
        before = await c.ok("query-migrate-parameters")
        fill_all(small_tmpfs, db)
        reply = await c.execute("migrate-set-parameters", {
            "mode": "cpr-exec", "max-bandwidth": 5, "downtime-limit": 7}, id=1)
        assert reply["error"]["desc"] == (
            f"cannot commit to {db}: database or disk is full; nothing was changed")
        assert await c.ok("query-migrate-parameters") == before
        # Alone they need no commit, and stay.
        await c.ok("migrate-set-parameters", {"max-bandwidth": 5})
        assert (await c.ok("query-migrate-parameters"))["max-bandwidth"] == 5
    assert daemon.stop() == 0
    assert_clean_log(daemon)


async def test_a_failed_commit_undoes_a_command_naming_events_twice_in_one_line(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace
) -> None:
    """Found reviewing the events capability's lines: a command that names it more
    than once gets one line for the list, but a failed commit logged each entry
    undone, the last one saying it was back on while it was off."""
    directory = small_tmpfs.mountpoint / "state"
    db = directory / "state.db"
    daemon = start_daemon("--state-dir", str(directory), python=small_tmpfs.python(tmp_path))
    async with daemon.client() as c:
        fill_all(small_tmpfs, db)
        for states in ([True, False], [True, False, True]):
            reply = await c.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": state} for state in states]}, id=1)
            assert reply["error"]["desc"].endswith("nothing was changed"), reply
        assert await c.ok("query-migrate-capabilities") == [
            {"capability": "events", "state": False}]
    assert daemon.stop() == 0
    said = [line.split(": ", 1)[1] for line in daemon.log().splitlines()
            if "capability events" in line]
    label = said[0].split(":")[0] if said else ""
    assert said == [
        f"{label}: migration capability events on (was off)",  # the second command's
        f"{label}: undone, the commit failed: migration capability events on (back to off)",
    ], said
    assert_clean_log(daemon)


async def test_a_state_path_that_is_not_utf8_in_the_status_stops_cleanly(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace, short_tmp: Path
) -> None:
    # Found by review: a state directory whose name is not UTF-8 (Linux allows any
    # bytes; Python keeps them as surrogates) put them in STATUS= once a commit
    # failed, and sd_notify raised UnicodeEncodeError: every later STATUS= was
    # lost, and at SIGTERM the STOPPING=1 raised before the drain, so the daemon
    # exited 1 with a traceback and without answering what it had read.
    directory = small_tmpfs.mountpoint / os.fsdecode(b"st\xffate")
    db = directory / "state.db"
    notify = short_tmp / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify))
    receiver.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    daemon = start_daemon("--state-dir", str(directory), python=small_tmpfs.python(tmp_path),
                          env=env)
    shown = os.fsencode(db).decode(errors="backslashreplace")  # as systemd is sent it

    def status_until(wanted: Callable[[str], bool]) -> str:
        while True:
            for line in receiver.recv(4096).decode().splitlines():
                if line.startswith(("STATUS=", "STOPPING=")) and wanted(line):
                    return line

    try:
        async with daemon.client() as c:
            await c.ok("add-blocker", {"reason": "before", "id": "before"})
            fill_all(small_tmpfs, db)
            assert "error" in await c.execute("add-blocker", {"reason": "full", "id": "x"})
            assert status_until(lambda line: "state:" in line) == (
                "STATUS=1 blocker, 1 client, migration: none, state: cannot commit to "
                f"{shown}: database or disk is full")
            assert daemon.stop() == 0
            assert status_until(lambda line: line == "STOPPING=1") == "STOPPING=1"
    finally:
        receiver.close()
    assert "Traceback" not in daemon.log(), daemon.log()
