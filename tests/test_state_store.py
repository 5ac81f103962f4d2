"""The durable state store on real SQLite files: round trips, atomic groups,
the directory lock, and every kind of bad state, each with its message.

Root ignores file permissions, so when the tests run as root the permission
cases run in a child that ``setpriv`` has stripped of the capabilities that
bypass them (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``): the kernel then
checks the mode bits as for any owner.  (A child under another uid could not
run this interpreter when it lives in root's home.)  A full disk is a
file-size limit (``RLIMIT_FSIZE``; Python ignores SIGXFSZ, so writes fail with
EFBIG) and, where mount namespaces are available, a real small tmpfs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, flip_bit
from otheruids import bare_uid, client_python

from migblockd.paths import default_state_dir
from migblockd.startup import EXIT_NOTCONFIGURED
from migblockd.state import (
    BlockerRow,
    Change,
    Delete,
    Put,
    Setting,
    Snapshot,
    StateError,
    Store,
)
from migblockd.state.directory import check_existing_directory
from migblockd.state.rescue import rescued_copies
from migblockd.state.schema import APPLICATION_ID, MIGRATIONS
from migblockd.state.whose_log import note_for

NOBODY = 65534  # the uid that default_state_dir() is asked about as a user


def row(id: str, seq: int, *, reason: str = "Migration disabled: test",
        modes: tuple[str, ...] | None = ("normal",), internal: bool = False,
        owner: tuple[int, int, int] | None = None, added: float = 1.7e9) -> BlockerRow:
    return BlockerRow(id=id, reason=reason, modes=modes, internal=internal, owner=owner,
                      added=added, seq=seq)


def reopened(directory: Path) -> Snapshot:
    with Store.open(directory) as store:
        return store.load()


def run_python(code: str, *, unprivileged: bool = False) -> dict[str, object]:
    """Run ``code`` in a child Python (subject to file permissions even if we
    are root, when ``unprivileged``); it prints one JSON object, returned here."""
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    if unprivileged and os.geteuid() == 0:
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]
    return _run_json(argv)


def _run_json(argv: list[str]) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


OPEN_AND_REPORT = """
    import json, sys
    from pathlib import Path
    from migblockd.state import Store, StateError
    try:
        Store.open(Path(sys.argv[1])).close()
        print(json.dumps({"error": None}))
    except StateError as e:
        print(json.dumps({"error": str(e)}))
"""


def open_error(directory: Path, *, unprivileged: bool = False) -> str | None:
    """The StateError message of opening ``directory`` in a child process."""
    code = textwrap.dedent(OPEN_AND_REPORT).replace("sys.argv[1]", repr(str(directory)))
    error = run_python(code, unprivileged=unprivileged)["error"]
    assert error is None or isinstance(error, str)
    return error


# ---------------------------------------------------------------- round trips


def test_round_trip_keeps_every_field_and_orders_by_seq(tmp_path: Path) -> None:
    rows = [
        row("b", 7, reason="vhost lacks VHOST_F_LOG_ALL", modes=("normal", "cpr-reboot"),
            owner=(1234, 1000, 100), added=1712345678.25),
        row("#blocker3", 2, reason="Ünïcödé ✓ 🚫\nsecond line\ttab \"quoted\"", internal=True),
        row("a", 11, modes=("cpr-transfer",), owner=(1, 0, 0), added=0.0),
    ]
    settings: dict[str, object] = {"mode": "cpr-reboot", "events": True, "id-floor": 4,
                                   "next-seq": 12, "nested": {"a": [1, 2.5, None, "é"]}}
    with Store.open(tmp_path / "state") as store:
        store.commit([Put(r) for r in rows] + [Setting(k, v) for k, v in settings.items()])
        assert store.load().blockers == sorted(rows, key=lambda r: r.seq)
    snap = reopened(tmp_path / "state")
    assert [r.id for r in snap.blockers] == ["#blocker3", "b", "a"]
    assert snap.blockers == sorted(rows, key=lambda r: r.seq)
    assert snap.settings == settings
    assert all(isinstance(r.modes, tuple) for r in snap.blockers)


def test_new_store_is_empty_and_the_file_says_what_it_is(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "state"
    with Store.open(directory) as store:
        assert store.load() == Snapshot(blockers=[], settings={})
        assert store.path == directory / "state.db"
        # The pid, then which file it opened, for the next start (migblockd.state.whose_log).
        assert (directory / "lock").read_text() == (
            f"{os.getpid()}\n{note_for(directory / 'state.db')}\n")
    assert directory.stat().st_mode & 0o777 == 0o700
    db = sqlite3.connect(directory / "state.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 2
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_changes_in_a_group_apply_in_order(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.commit([Put(row("gone", 1)), Put(row("kept", 2))])
        store.commit([
            Put(row("a", 3, reason="first")), Delete("a"), Put(row("a", 4, reason="last")),
            Put(row("b", 5)), Delete("b"),
            Delete("gone"), Delete("never-existed"),
            Put(row("kept", 2, reason="replaced")),
            Setting("mode", "normal"), Setting("mode", "cpr-exec"),
        ])
        store.commit([])  # an empty group is no transaction at all
    snap = reopened(tmp_path)
    assert [(r.id, r.reason) for r in snap.blockers] == [("kept", "replaced"), ("a", "last")]
    assert snap.settings == {"mode": "cpr-exec"}


def test_a_group_failing_midway_leaves_nothing(tmp_path: Path) -> None:
    before: list[Change] = [Put(row("x", 1)), Setting("mode", "normal")]
    with Store.open(tmp_path) as store:
        store.commit(before)
        bad = row("bad", 9, modes=())  # the schema refuses a blocker of no mode
        group: list[Change] = [Put(row("y", 2)), Delete("x"), Setting("mode", "cpr-reboot"),
                               Put(bad), Put(row("z", 3))]
        with pytest.raises(StateError) as refused:
            store.commit(group)
        assert str(refused.value) == (f"cannot commit to {store.path}: "
                                      "CHECK constraint failed: modes <> '[]'")
        # A value SQLite cannot hold fails in the middle too, outside sqlite3.Error.
        with pytest.raises(OverflowError):
            store.commit([Put(row("y", 2)), Put(row("huge", 2**63))])
        assert store.load() == Snapshot([row("x", 1)], {"mode": "normal"})
        store.commit([Put(row("y", 2))])  # the store still works
    assert [r.id for r in reopened(tmp_path).blockers] == ["x", "y"]


def test_online_backup_of_a_running_store_is_a_state_directory(tmp_path: Path) -> None:
    """What ``sqlite3 state.db ".backup FILE"`` does (docs/state.md), through the same
    SQLite API, while the store is open and its last commits are only in the WAL."""
    (tmp_path / "restored").mkdir()
    with Store.open(tmp_path / "live") as store:
        store.commit([Put(row("a", 1)), Setting("mode", "cpr-reboot")])
        store.commit([Put(row("b", 2))])
        assert (tmp_path / "live" / "state.db-wal").stat().st_size > 0
        source = sqlite3.connect(tmp_path / "live" / "state.db")
        target = sqlite3.connect(tmp_path / "restored" / "state.db")
        source.backup(target)
        target.close()
        source.close()
    assert reopened(tmp_path / "restored") == Snapshot([row("a", 1), row("b", 2)],
                                                       {"mode": "cpr-reboot"})


#: An operator's sqlite3, the database put in rollback-journal mode, killed in a
#: transaction big enough that SQLite wrote some of its pages into the file
#: (once its cache is full) before the commit that never came.
KILLED_IN_A_TRANSACTION = """
    import os, sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA cache_size = 2")
    conn.execute("BEGIN")
    conn.execute("DELETE FROM blocker WHERE id = 'kept'")
    conn.execute("UPDATE setting SET value = '\\"normal\\"' WHERE key = 'mode'")
    for n in range(3000):
        conn.execute("INSERT INTO blocker VALUES (?, ?, ?, '[\\"normal\\"]', 0, NULL, NULL, "
                     "NULL, 1.7e9)", (f"u{n}", 10 + n, "x" * 500))
    os._exit(0)
"""


def test_a_transaction_a_killed_program_left_unfinished_is_rolled_back_before_the_restore(
    tmp_path: Path
) -> None:
    """Before, the restore read the file alone and took the killed transaction's
    pages in it (the blocker it deleted gone, the mode it set), and the opening for
    writing then rolled them back: the daemon served what the disk did not hold."""
    directory = tmp_path / "state"
    committed = Snapshot([row("kept", 0), row("other", 1)], {"mode": "cpr-reboot"})
    with Store.open(directory) as store:
        store.commit([Put(r) for r in committed.blockers] + [Setting("mode", "cpr-reboot")])
    db = directory / "state.db"
    subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_IN_A_TRANSACTION), str(db)],
                   check=True, timeout=60)
    journal = directory / "state.db-journal"
    assert journal.stat().st_size > 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)) as c:
        # What the file alone holds now: part of the transaction.
        assert c.execute("SELECT count(*) FROM blocker WHERE id = 'kept'").fetchone()[0] == 0
    restored: list[Snapshot] = []
    with Store.open(directory, restore=restored.append) as store:
        assert restored == [committed]
        assert store.load() == committed
    assert not journal.exists()
    assert reopened(directory) == committed


def test_a_rollback_journal_without_its_database_is_refused(tmp_path: Path) -> None:
    """state.db moved away (as the refusals advise: "move it away to start from
    scratch", or a backup put in its place) with its journal left hot: the start
    made a new database and SQLite rolled the old journal back into it, writing
    the old file's pages over the new one (or over the backup)."""
    directory = tmp_path / "state"
    with Store.open(directory) as store:
        store.commit([Put(row("kept", 0)), Put(row("other", 1))])
    db = directory / "state.db"
    subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_IN_A_TRANSACTION), str(db)],
                   check=True, timeout=60)
    journal = directory / "state.db-journal"
    before = journal.read_bytes()
    db.rename(tmp_path / "moved-away.db")
    with pytest.raises(StateError) as refused:
        Store.open(directory)
    assert str(refused.value) == (
        f"{journal} exists without state.db, and holds a transaction to roll back; put "
        "back the state.db it is the journal of (the file moved away), not a backup, into "
        "which SQLite would roll it back; or move the whole directory away to restore a "
        "backup or to start from scratch")
    assert not db.exists()
    assert journal.read_bytes() == before


def test_a_rollback_journal_the_start_cannot_open_is_named(tmp_path: Path) -> None:
    """A hot journal SQLite may not open (a link, which it never follows, here; or
    root's, 0600, for a daemon running as its own user) failed the start with "cannot
    write D/state.db (unable to open database file); make it and D writable by this
    user": both were."""
    directory = tmp_path / "state"
    with Store.open(directory) as store:
        store.commit([Put(row("kept", 0))])
    db = directory / "state.db"
    subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_IN_A_TRANSACTION), str(db)],
                   check=True, timeout=60)
    journal = directory / "state.db-journal"
    journal.rename(tmp_path / "journal")
    journal.symlink_to(tmp_path / "journal")
    with pytest.raises(StateError) as refused:
        Store.open(directory)
    assert str(refused.value) == (
        f"{journal} is not a regular file, which SQLite would have to open as state.db's "
        "rollback journal; put the journal itself there (a link is never followed), or "
        "restore the directory from a backup")


def written_over(db: Path, how: str, early: Path) -> None:
    """Another program writing to the database in place (its inode kept); ``early``:
    a copy of it made when it was smaller."""
    if how == "backup copied over it":
        backup = db.with_name("backup.db")
        with contextlib.closing(sqlite3.connect(backup)) as conn:
            conn.execute("CREATE TABLE t (x)")
            conn.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 100)
            conn.commit()
        shutil.copyfile(backup, db)  # as cp does: the same file, written over
    elif how == "an older copy written over it":
        shutil.copyfile(early, db)
    elif how == "a backup of it copied over it":
        # Found by review: a backup of the database itself (as docs/state.md makes
        # one), as large as the file, passed every look at the file, and the
        # commits after it mixed its pages with the log's: the next start found
        # the file corrupt, every blocker acknowledged since the backup lost.
        shutil.copyfile(db.with_name("self-backup.db"), db)
    else:
        os.truncate(db, 0)


@pytest.mark.parametrize(("how", "why"), [
    ("backup copied over it", "it is another program's database now: a file copied over it?"),
    ("an older copy written over it", "it is {size} bytes long, smaller than the {largest} "
                                      "the daemon left: truncated, or an older copy written "
                                      "over it?"),
    ("truncated", "it is 0 bytes long, too short for a database: truncated?"),
    ("a backup of it copied over it", "not through SQLite, which leaves a mark in the log's "
                                      "index when it writes there: a copy of a backup "
                                      "written over it?"),
])
def test_a_database_written_over_by_another_program_takes_no_commit(
    tmp_path: Path, how: str, why: str
) -> None:
    """Before, SQLite went on committing into a file copied over or truncated under
    it, every commit succeeded, and the next start found the file corrupt.  The
    store's own writes to the file (the log folded back into it, once long enough)
    do not count, nor do another SQLite connection's (an operator's ``PRAGMA
    wal_checkpoint``, which writes what the store committed, also followed by a
    reader, which rewrites the log's index), nor a chmod (which changes the inode's
    change time)."""
    db = tmp_path / "state.db"
    early = tmp_path / "early.db"
    with Store.open(tmp_path) as store:
        store.commit([Put(row("b", 0))])
        with contextlib.closing(sqlite3.connect(db)) as conn, \
                contextlib.closing(sqlite3.connect(early)) as copy:
            conn.backup(copy)

        def folded_by_others(first: int) -> None:
            for n, (mode, read_after) in enumerate(itertools.product(
                    ("PASSIVE", "TRUNCATE"), (False, True))):
                seq = first + 2 * n
                store.commit([Put(row(f"before {seq}", seq, reason="x" * 3000))])
                with contextlib.closing(sqlite3.connect(db)) as other:
                    assert other.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0] == 0
                if read_after:
                    # Found by review: the sqlite3 shell reading after it (as an
                    # operator does) rewrote the log's index, and every later
                    # commit was refused.
                    subprocess.run(["sqlite3", str(db), ".tables"], check=True,
                                   capture_output=True, timeout=30)
                store.commit([Put(row(f"after {seq}", seq + 1))])

        folded_by_others(1000)
        sizes = set()
        for seq in range(1, 800):  # past SQLite's 1000 pages of log: it is folded back
            store.commit([Put(row(f"b{seq}", seq, reason="x" * 200))])
            sizes.add(db.stat().st_size)
        assert len(sizes) > 1  # the store itself wrote to the database
        folded_by_others(1100)
        db.chmod(0o400)
        db.chmod(0o600)
        with contextlib.closing(sqlite3.connect(db)) as conn, \
                contextlib.closing(sqlite3.connect(db.with_name("self-backup.db"))) as copy:
            conn.backup(copy)  # the whole database as it is: no smaller than the file
        store.commit([Put(row("after chmod", 800))])
        largest = db.stat().st_size
        written_over(db, how, early)
        expected = why.format(size=db.stat().st_size, largest=largest)
        for seq in (801, 802):  # and so on, until a restart
            with pytest.raises(StateError) as refused:
                store.commit([Put(row("refused", seq))])
            assert str(refused.value) == (
                f"cannot commit to {db}: another program wrote to it since the daemon's "
                f"last commit ({expected}), and what the daemon commits now would be mixed "
                "with what that program wrote")
            assert refused.value.remedy == (
                f"stop the daemon, then restore {db} from a backup: the stop folds the "
                "daemon's log into the file, over what that program wrote")


def posix_locks(*files: Path) -> set[str]:
    """The names of ``files`` on which this process holds a POSIX lock (/proc/locks)."""
    inodes = {os.stat(f).st_ino: f.name for f in files}
    held = set()
    with open("/proc/locks", encoding="ascii") as locks:
        for line in locks:
            words = line.split()
            if words[1] == "POSIX" and words[4] == str(os.getpid()):
                inode = int(words[5].split(":")[2])
                if inode in inodes:
                    held.add(inodes[inode])
    return held


def test_cutting_the_log_keeps_sqlites_locks(tmp_path: Path) -> None:
    # Found by review: the index was read with open() and close(), and closing a
    # descriptor drops every POSIX lock the process holds on the file, SQLite's
    # included: an operator's sqlite3 then took itself for the first connection,
    # rebuilt the index under the daemon's mapping of it, and the daemon died of
    # SIGBUS (3 runs in 3).
    db, index = tmp_path / "state.db", tmp_path / "state.db-shm"
    with Store.open(tmp_path) as store:
        store.commit([Put(row("a", 1))])
        assert posix_locks(db, index) == {"state.db", "state.db-shm"}
        assert store._recovery.cut_log()
        assert posix_locks(db, index) == {"state.db", "state.db-shm"}
        store.commit([Put(row("b", 2))])
        assert store._recovery.cut_log()  # the descriptor kept is read again
        assert posix_locks(db, index) == {"state.db", "state.db-shm"}


# ----------------------------------------------------------------- the lock


def test_second_open_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.commit([Put(row("x", 1))])
        with pytest.raises(StateError) as refused:
            Store.open(tmp_path)
        assert str(refused.value) == (f"state directory {tmp_path} is locked by another "
                                      f"migblockd (pid {os.getpid()}); stop it, or use "
                                      "another --state-dir")
        assert store.load().blockers == [row("x", 1)]  # the holder is unharmed
    # It forgot the pid, and kept its note (naming the log SQLite has removed since).
    pid, note = (tmp_path / "lock").read_text().split("\n")[:2]
    assert pid.strip() == ""
    assert json.loads(note) == {**json.loads(note_for(tmp_path / "state.db")),
                                "log": json.loads(note)["log"]}
    reopened(tmp_path)  # closing released it


def test_second_open_from_another_process_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path):
        assert open_error(tmp_path) == (f"state directory {tmp_path} is locked by another "
                                        f"migblockd (pid {os.getpid()}); stop it, or use "
                                        "another --state-dir")
    assert open_error(tmp_path) is None


def test_a_writer_of_a_rollback_journal_database_is_waited_for_in_slices(
    tmp_path: Path,
) -> None:
    """Found by review of in_slices: the switch to WAL reads before it asks to write,
    and SQLite calls no busy handler for a connection that reads and asks to write
    (btree.c, sqlite3BtreeBeginTrans: it could wait on a writer that waits on it).
    Against another program's write transaction on a state.db in rollback-journal
    mode (an operator's sqlite3 shell after BEGIN; INSERT ...) each slice then failed
    at once, and the start tried again in a loop that kept a CPU busy for the whole
    wait (5 s): some 30,000 tries, not one a slice.  The stop is looked at after each
    busy try, so its calls count the tries."""
    with Store.open(tmp_path) as store:
        store.commit([Put(row("kept", 1))])
    db = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as setting:
        assert setting.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    looks = 0

    def stop() -> str | None:
        nonlocal looks
        looks += 1
        return None

    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # the write lock, kept: readers go on
        with pytest.raises(StateError, match="is in use by another program"):
            Store.open(tmp_path, stop=stop)
        other.execute("ROLLBACK")
    # One try a slice of lock.POLL (0.1 s) over the wait (5 s), and the first.
    assert 0 < looks <= 52, looks
    assert reopened(tmp_path).blockers == [row("kept", 1)]


def test_lock_of_a_killed_holder_is_free(tmp_path: Path) -> None:
    code = f"""
        import sys
        from pathlib import Path
        from migblockd.state import Store
        store = Store.open(Path({str(tmp_path)!r}))
        print("held", flush=True)
        sys.stdin.read()
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StateError, match=rf"locked by another migblockd \(pid {holder.pid}\)"):
            Store.open(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    reopened(tmp_path)  # the kernel dropped the lock with the process


def test_a_lock_file_removed_under_its_holder_is_named_when_a_start_is_refused(
    tmp_path: Path,
) -> None:
    """Found by review of the lock file: removed while its daemon ran (a clean-up of
    "stale" lock files), the next start took a new one and was refused only at the
    database's own lock, "whose state directory holds the same file": the operator
    was sent looking for another directory that links to this database."""
    code = f"""
        import sys
        from pathlib import Path
        from migblockd.state import Store
        store = Store.open(Path({str(tmp_path)!r}))
        print("held", flush=True)
        sys.stdin.read()
        store.close()
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lock = tmp_path / "lock"
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        lock.unlink()
        with pytest.raises(StateError) as refused:
            Store.open(tmp_path)
        assert str(refused.value) == (
            f"state database {tmp_path}/state.db is in use by another migblockd (pid "
            f"{holder.pid}), which serves this state directory: its lock file {lock} was "
            f"removed while it ran; stop that daemon, and leave {lock} in place (no daemon "
            "leaves a stale one)")
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    reopened(tmp_path)  # as the refusal says: once it has stopped


def test_a_stopped_holder_leaves_its_note_and_no_line_saying_it_stops(tmp_path: Path) -> None:
    """Found by review of the lock file: the lines a stopping holder writes after its
    note, for a start refused meanwhile, stayed after its stop, below the blanked
    pid: an operator reading the file was told that a daemon was stopping, long
    after it had stopped."""
    lock = tmp_path / "lock"
    code = f"""
        from pathlib import Path
        from migblockd.pidlock import say_stopping
        from migblockd.state import Store
        store = Store.open(Path({str(tmp_path)!r}))
        say_stopping()
        assert Path({str(lock)!r}).read_bytes().endswith(b"\\nstopping\\nbefore serving\\n")
        store.close()
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 0, child.stderr
    pid, note, end = lock.read_bytes().split(b"\n")
    assert pid and pid.strip() == b""  # the pid, blanked
    assert json.loads(note)["database"] == str(tmp_path / "state.db") and end == b""
    reopened(tmp_path)  # and the next start finds the note it reads


# ------------------------------------------------------------- bad files


def test_random_bytes_are_not_a_state_database(tmp_path: Path) -> None:
    garbage = random.Random(13).randbytes(5000)
    (tmp_path / "state.db").write_bytes(garbage)
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/state.db is not a migblockd state database "
                                  "(file is not a database); move it away to start from scratch")
    assert (tmp_path / "state.db").read_bytes() == garbage  # never replaced
    assert not (tmp_path / "state.db-wal").exists()
    Store.open(tmp_path / "other").close()  # the lock was released on the way out


def test_a_one_byte_file_is_not_taken_for_an_empty_database(tmp_path: Path) -> None:
    # SQLite reports a file of one byte as empty, and would have it written over.
    (tmp_path / "state.db").write_bytes(b"x")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/state.db is not a migblockd state database "
                                  "(file is not a database); move it away to start from scratch")
    assert (tmp_path / "state.db").read_bytes() == b"x"  # never replaced


def filled(directory: Path, n: int = 300) -> bytes:
    """A closed state directory holding ``n`` blockers; the database's bytes."""
    with Store.open(directory) as store:
        store.commit([Put(row(f"b{i}", i, reason="r" * 300)) for i in range(n)])
    return (directory / "state.db").read_bytes()


def test_truncated_database_is_corrupt(tmp_path: Path) -> None:
    data = filled(tmp_path)
    (tmp_path / "state.db").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/state.db is corrupt (database disk image is "
                                  "malformed); restore it from a backup, or move it away to "
                                  "start from scratch")


def test_damaged_page_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(filled(tmp_path))
    page = 4096
    data[3 * page: 4 * page] = random.Random(7).randbytes(page)  # a page of the blocker table
    (tmp_path / "state.db").write_bytes(bytes(data))
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path}/state.db is corrupt (")
    assert message.endswith("); restore it from a backup, or move it away to start from scratch")
    assert "\n" not in message


def test_inconsistent_database_is_corrupt(tmp_path: Path) -> None:
    """Damage that SQLite reads past but ``PRAGMA quick_check`` finds."""
    data = bytearray(filled(tmp_path))
    data[39] ^= 0x5A  # the low byte of the header's count of free pages
    (tmp_path / "state.db").write_bytes(bytes(data))
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/state.db is corrupt (Main freelist: size is 0 "
                                  "but should be 90); restore it from a backup, or move it "
                                  "away to start from scratch")
    assert (tmp_path / "state.db").read_bytes() == data  # never "repaired"


def test_log_without_its_database_is_refused(tmp_path: Path) -> None:
    """A state.db moved away without its WAL: SQLite would replay the old log
    into a new, empty database."""
    with Store.open(tmp_path) as store:
        store.commit([Put(row("x", 1))])
        shutil.copy(tmp_path / "state.db-wal", tmp_path / "saved-wal")
    (tmp_path / "state.db").unlink()
    (tmp_path / "saved-wal").rename(tmp_path / "state.db-wal")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path}/state.db-wal exists without state.db; put back the state.db it is the "
        "log of (the file moved away), not a backup, into which SQLite would replay it; "
        "or move the whole directory away to restore a backup or to start from scratch")
    assert not (tmp_path / "state.db").exists()


def test_a_log_beside_a_database_replaced_under_its_killed_holder_is_refused(
        tmp_path: Path) -> None:
    """A backup put in place of state.db while its holder ran, which was then
    killed before a commit: SQLite would replay the holder's log into the backup."""
    backup = tmp_path / "backup.db"
    directory = tmp_path / "state"
    with Store.open(directory) as store:
        store.commit([Put(row("backed-up", 1))])
        with contextlib.closing(sqlite3.connect(directory / "state.db")) as source, \
                contextlib.closing(sqlite3.connect(backup)) as target:
            source.backup(target)
    killed_after_commits(directory, 3, replaced_by=backup)
    db, wal = directory / "state.db", directory / "state.db-wal"
    before = files_of(directory)
    note = (directory / "lock").read_text().split("\n")[1]
    for _ in range(2):  # and again: the refusal leaves the note as it was
        with pytest.raises(StateError) as refused:
            Store.open(directory)
        assert str(refused.value).startswith(
            f"{db} is not the file that the last daemon here opened (it was replaced while "
            f"that daemon ran, a backup restored under it, say, and the daemon was killed "
            f"before it saw it), and {wal} holds that daemon's changes")
        assert files_of(directory) == before
        assert (directory / "lock").read_text().split("\n")[1] == note
    wal.rename(tmp_path / "state.db-wal")
    (directory / "state.db-shm").rename(tmp_path / "state.db-shm")
    assert [r.id for r in reopened(directory).blockers] == ["backed-up"]


@pytest.mark.parametrize("garbage", [
    b"[" * 100_000,  # nested past what json's decoder recurses
    b'{"database": ' * 50_000,
    b"\xff\xfe not JSON \x00",
    b'["a", "list"]',
    b"x" * 200_000,  # past what is read of the file
], ids=["nested-arrays", "nested-objects", "bytes", "list", "huge"])
def test_a_lock_file_whose_note_is_garbage_keeps_no_start_from_restoring(
        tmp_path: Path, garbage: bytes) -> None:
    """Found by the review of the lock's note: a lock file someone filled with
    garbage that json takes for deeply nested JSON made every start fail with a
    RecursionError traceback, and each start kept the garbage for the next one:
    the service stayed down.  A note that cannot be read tells nothing, as no note
    does; the log of the killed holder is its own file's, and replayed."""
    killed_after_commits(tmp_path, 3)
    lock = tmp_path / "lock"
    lock.write_bytes(lock.read_bytes().split(b"\n", 1)[0] + b"\n" + garbage + b"\n")
    assert [r.id for r in reopened(tmp_path).blockers] == ["b0", "b1", "b2"]
    # The start wrote its own note over the garbage: the next one reads it.
    pid, note = lock.read_text().split("\n")[:2]
    assert pid.strip() == ""
    assert json.loads(note)["database"] == str(tmp_path / "state.db")


def test_a_database_moved_away_and_back_after_a_kill_is_restored_with_its_log(
        tmp_path: Path) -> None:
    killed_after_commits(tmp_path, 3)
    (tmp_path / "state.db").rename(tmp_path / "away.db")
    (tmp_path / "away.db").rename(tmp_path / "state.db")
    assert [r.id for r in reopened(tmp_path).blockers] == ["b0", "b1", "b2"]


def test_a_database_moved_in_with_its_log_where_another_was_is_restored_with_it(
        tmp_path: Path) -> None:
    """As a reload's warning about a changed state-dir says: state.db and its log moved
    into a directory that a daemon used before (its lock noting another file)."""
    old, new, aside = tmp_path / "old", tmp_path / "new", tmp_path / "aside"
    killed_after_commits(new, 1)
    aside.mkdir()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (new / name).rename(aside / name)  # kept: no inode of theirs is handed out again
    killed_after_commits(old, 3)
    for name in ("state.db", "state.db-wal"):
        (old / name).rename(new / name)
    assert [r.id for r in reopened(new).blockers] == ["b0", "b1", "b2"]


def test_a_lock_noted_by_an_older_migblockd_says_nothing_of_the_log(tmp_path: Path) -> None:
    """A lock with the pid alone (as every migblockd before the note wrote it): the
    log beside a replaced database is SQLite's to replay, as before."""
    backup = tmp_path / "backup.db"
    directory = tmp_path / "state"
    with Store.open(directory) as store:
        store.commit([Put(row("backed-up", 1))])
        with contextlib.closing(sqlite3.connect(directory / "state.db")) as source, \
                contextlib.closing(sqlite3.connect(backup)) as target:
            source.backup(target)
    killed_after_commits(directory, 3, replaced_by=backup)
    (directory / "lock").write_text("4242\n")
    assert [r.id for r in reopened(directory).blockers] == ["backed-up", "b0", "b1", "b2"]


def killed_after_commits(directory: Path, groups: int, *,
                         replaced_by: Path | None = None) -> None:
    """``directory`` as a SIGKILL leaves it after ``groups`` commits of a blocker each
    (``b0``, ``b1``...): all in the log (folded back only at about 4 MiB), which
    its index records."""
    code = f"""
        import os, signal
        from pathlib import Path
        from migblockd.state import BlockerRow, Put, Store
        store = Store.open(Path({str(directory)!r}))
        for i in range({groups}):
            store.commit([Put(BlockerRow(f"b{{i}}", "r" * 300, ("normal",), False, None,
                                         1.7e9, i + 10))])
        replaced_by = {str(replaced_by) if replaced_by else None!r}
        if replaced_by:  # a copy put in place whole, as a restore does
            import shutil
            shutil.copy2(replaced_by, store.path.with_name("staged"))
            os.rename(store.path.with_name("staged"), store.path)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


FRAME = 24 + 4096  # a frame of the log: its header, then a page


def cut_log(cut: str, wal: Path, frames: int) -> tuple[int | None, str]:
    """Cut (or damage) ``wal`` as ``cut`` says; how many whole frames it keeps
    (None: no header), and what the refusal says of it."""
    if cut == "removed":
        wal.unlink()
        return None, "it is missing"
    if cut == "empty":
        os.truncate(wal, 0)
        return None, "it is empty"
    if cut == "in its header":
        os.truncate(wal, 20)
        return None, "its header is cut short"
    if cut == "between frames":
        os.truncate(wal, 32 + 5 * FRAME)
        return 5, f"it holds 5 of the {frames} frames"
    if cut == "a page damaged":
        flip_bit(wal, 32 + 5 * FRAME + 24 + 100)  # in the sixth frame's page
        return 5, f"frame 6 of {frames} is damaged"
    offset = random.Random(cut).randrange(32 + FRAME, 32 + frames * FRAME - 1)
    os.truncate(wal, offset)  # "at random" (seeded): in a frame, or one byte short of it
    kept = (offset - 32) // FRAME
    return kept, f"it holds {kept} of the {frames} frames"


@pytest.mark.parametrize("cut", ["removed", "empty", "in its header", "between frames",
                                 "a page damaged", "at random 1", "at random 2",
                                 "at random 3"])
def test_a_log_cut_after_a_crash_is_refused_not_replayed_in_part(
    tmp_path: Path, cut: str
) -> None:
    """After a crash the first connection rebuilds the log's index from the log,
    up to where the log ends or a frame's checksum fails: before, a log cut short
    (or removed, or damaged) after a SIGKILL silently took the blockers committed
    after that point with it."""
    directory, whole = tmp_path / "state", tmp_path / "whole"
    killed_after_commits(directory, 20)
    shutil.copytree(directory, whole)
    assert [r.id for r in reopened(whole).blockers] == [f"b{i}" for i in range(20)]
    wal, shm = directory / "state.db-wal", directory / "state.db-shm"
    frames = (wal.stat().st_size - 32) // FRAME
    assert frames >= 20  # a commit's frames, one at least
    kept, why = cut_log(cut, wal, frames)
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "lock"}
    with pytest.raises(StateError) as refused:
        Store.open(directory)
    assert str(refused.value) == (
        f"{wal} has lost changes that its index {shm} records as committed ({why}), so "
        "starting would drop blockers that were acknowledged; restore the state directory "
        f"from a backup, or remove {shm} to start with what the log still holds (the rest "
        f"is lost){folded(directory) if kept is None and cut in ('removed', 'empty') else ''}")
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "lock"} == before
    # What the message says to do works: without the index, SQLite rebuilds it
    # from what the log still holds, and the blockers of the commits before the
    # cut come back.
    shm.unlink()
    restored = [r.id for r in reopened(directory).blockers]
    assert restored == [f"b{i}" for i in range(len(restored))]
    assert len(restored) < 20
    if kept is None:
        assert restored == []


def folded(directory: Path) -> str:
    """What the refusal adds for a log removed or emptied (see below)."""
    return (f"; if a program opened {directory / 'state.db'} in exclusive locking mode "
            "since the crash, it folded the log into the database and left the index "
            f"behind: then nothing is lost, and removing {directory / 'state.db-shm'} is all "
            "there is to do")


@pytest.mark.parametrize("how", ["closed", "killed after a TRUNCATE checkpoint"])
def test_a_log_folded_in_by_an_exclusive_mode_program_after_a_crash_is_told_apart(
    tmp_path: Path, how: str
) -> None:
    """SQLite in exclusive locking mode keeps the log's index in its own memory:
    opened after a SIGKILL, it folds the log into the database, then removes
    (or, checkpointing with TRUNCATE, empties) it, and leaves the index as the
    daemon left it.  Before, the start was refused as if blockers were lost,
    with "(the rest is lost)", when the database had every one of them."""
    directory = tmp_path / "state"
    killed_after_commits(directory, 20)
    wal, shm = directory / "state.db-wal", directory / "state.db-shm"
    index = shm.read_bytes()
    code = f"""
        import os, signal, sqlite3
        conn = sqlite3.connect({str(directory / "state.db")!r})
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        print(conn.execute("SELECT count(*) FROM blocker").fetchone()[0])
        if {how == "closed"}:
            conn.close()
        else:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            os.kill(os.getpid(), signal.SIGKILL)
    """
    other = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert other.stdout == "20\n", other.stderr
    assert shm.read_bytes() == index  # never touched
    assert not wal.exists() if how == "closed" else wal.stat().st_size == 0
    with pytest.raises(StateError) as refused:
        Store.open(directory)
    assert str(refused.value).endswith(folded(directory))
    shm.unlink()  # as the message says: every blocker is there
    assert [r.id for r in reopened(directory).blockers] == [f"b{i}" for i in range(20)]


def test_a_log_whose_index_is_gone_after_a_crash_is_replayed_whole(tmp_path: Path) -> None:
    """The index tells nothing then: SQLite rebuilds it from the whole log."""
    killed_after_commits(tmp_path, 20)
    (tmp_path / "state.db-shm").unlink()
    assert [r.id for r in reopened(tmp_path).blockers] == [f"b{i}" for i in range(20)]


def files_of(directory: Path) -> dict[str, bytes]:
    """The database's files (not the lock) by name, with their content."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "lock"}


def refuse(snapshot: Snapshot) -> None:
    raise ValueError(f"{len(snapshot.blockers)} blockers, all refused")


@pytest.mark.parametrize("left", ["log and index", "log only", "nothing"])
def test_what_restore_refuses_leaves_the_files_as_they_were(tmp_path: Path, left: str) -> None:
    """Read before the database is opened for writing: such a connection rebuilds
    the index after a crash, and its closing folds the log into state.db."""
    killed_after_commits(tmp_path, 20)
    if left == "log only":
        (tmp_path / "state.db-shm").unlink()
    elif left == "nothing":
        Store.open(tmp_path).close()
    before = files_of(tmp_path)
    assert ("state.db-wal" in before) == (left != "nothing")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path, restore=refuse)
    assert str(refused.value) == f"{tmp_path}/state.db: 20 blockers, all refused"
    after = files_of(tmp_path)
    if left == "log only":
        # Nothing on disk says what the log holds but the log: SQLite reads it
        # whole, making its index (a new file) as it does.
        assert after.pop("state.db-shm")
    assert after == before
    assert [r.id for r in reopened(tmp_path).blockers] == [f"b{i}" for i in range(20)]


def test_database_of_another_program_is_refused(tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "state.db")
    other.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    other.commit()
    other.close()
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/state.db is not a migblockd state database "
                                  "(it belongs to another program); move it away to start "
                                  "from scratch")


def test_newer_format_is_refused_and_left_alone(tmp_path: Path) -> None:
    filled(tmp_path, 3)
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/state.db was written by a newer migblockd "
                                  "(format 7; this one reads up to 2); upgrade migblockd")
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 7
    db.close()


@pytest.mark.parametrize("version", [-1, 0])
def test_a_format_below_one_is_corrupt_and_left_alone(tmp_path: Path, version: int) -> None:
    """migblockd sets the application id and the format in one transaction: a
    file with the first and no format was edited (or damaged), not migrated."""
    filled(tmp_path, 2)
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    content = (tmp_path / "state.db").read_bytes()
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/state.db is corrupt (format {version}); restore "
                                  "it from a backup, or move it away to start from scratch")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == [
        n for n in before if n != ".lock"]
    assert (tmp_path / "state.db").read_bytes() == content


def test_an_empty_file_is_refused_not_taken_for_a_first_start(tmp_path: Path) -> None:
    (tmp_path / "state.db").touch()
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/state.db is empty (0 bytes): it was truncated; "
                                  "restore it from a backup, or move it away to start from "
                                  "scratch")
    assert (tmp_path / "state.db").stat().st_size == 0


def test_a_new_database_is_made_whole_then_put_in_place(tmp_path: Path) -> None:
    # What a creation killed half-way left behind is cleared, not used.
    (tmp_path / "state.db.new").write_bytes(b"half")
    (tmp_path / "state.db.new-journal").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        Store.open(tmp_path).close()
    finally:
        os.umask(old)
    assert (tmp_path / "state.db").stat().st_mode & 0o777 == 0o600
    assert not any(p.name.startswith("state.db.new") for p in tmp_path.iterdir())
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    db.close()
    assert reopened(tmp_path) == Snapshot(blockers=[], settings={})


@pytest.mark.parametrize("name", ["state.db.new", "state.db.new-wal"])
def test_what_is_in_the_way_of_a_new_database_is_named(tmp_path: Path, name: str) -> None:
    """A new database is made under another name, and a file of that name is
    taken for an attempt that did not finish; before, a directory there stopped
    the start with a traceback."""
    (tmp_path / name).mkdir()
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"cannot remove {tmp_path}/{name}, left by an earlier "
                                  "start, to make it again: Is a directory; move it away")
    assert (tmp_path / name).is_dir()
    assert not (tmp_path / "state.db").exists()
    (tmp_path / name).rmdir()
    assert reopened(tmp_path) == Snapshot([], {})


def test_a_database_the_directory_links_to_is_used(tmp_path: Path) -> None:
    """Only the directory's owner can put a link there (the directory check): a
    state.db that is a link to the real file opens as before."""
    filled(tmp_path / "real", 2)
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    (directory / "state.db").symlink_to(tmp_path / "real" / "state.db")
    assert [r.id for r in reopened(directory).blockers] == ["b0", "b1"]


def test_a_database_linked_into_a_directory_others_may_write_is_refused(
    tmp_path: Path
) -> None:
    """SQLite keeps the log and its index beside the link's target: whoever may
    write there could replace the database or plant a log, as in the state
    directory itself.  Before, such a link was followed without a check."""
    filled(tmp_path / "volume", 2)
    volume = tmp_path / "volume"
    volume.chmod(0o777)
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    (directory / "state.db").symlink_to(volume / "state.db")
    with pytest.raises(StateError) as refused:
        Store.open(directory)
    assert str(refused.value) == (
        f"refusing to keep state in {directory}: the directory of state.db's target {volume} "
        f"is writable by others (mode 0777), so they could replace the database; chmod go-w "
        f"{volume}, or choose another --state-dir")
    assert not (volume / "state.db-wal").exists()
    volume.chmod(0o700)
    assert [r.id for r in reopened(directory).blockers] == ["b0", "b1"]


def test_a_state_directory_whose_acl_lets_only_trusted_users_write_is_used(
    tmp_path: Path
) -> None:
    """Found by review: under an access ACL the mode's group bits are only its
    mask, and a 0700 state directory that ``setfacl -m u:65534:rx,m::rwx`` made
    0770, where no one but its owner may write, was refused as "writable by
    others (mode 0770)".  Its entries decide, as the kernel reads them: one that
    lets another user or a group write is refused, with the setfacl that stops it."""
    directory = tmp_path / "state"
    filled(directory, 2)
    directory.chmod(0o700)
    subprocess.run(["setfacl", "-m", f"u:65534:rx,u:{os.geteuid()}:rwx,m::rwx",
                    str(directory)], check=True)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o770  # the mask's bits
    assert [r.id for r in reopened(directory).blockers] == ["b0", "b1"]

    subprocess.run(["setfacl", "-m", "u:65534:rwx,g:65534:w", str(directory)], check=True)
    with pytest.raises(StateError) as refused:
        Store.open(directory)
    fix = f"setfacl -n -m u:65534:rx,g:65534:- {directory}"
    assert str(refused.value) == (
        f"refusing to keep state in {directory}: state directory {directory} has an ACL "
        "that lets uid 65534 (nobody), the members of gid 65534 (nogroup) write to it "
        "(mode 0770, whose group bits are the ACL's mask), so they could replace the "
        f"database; {fix}, or choose another --state-dir")
    subprocess.run(fix.split(), check=True)  # what the refusal says to do
    assert [r.id for r in reopened(directory).blockers] == ["b0", "b1"]


def test_a_database_whose_acl_lets_only_trusted_users_write_is_used(tmp_path: Path) -> None:
    """Found by review: as for the directory, a database that ``setfacl -m
    u:65534:r,m::rw`` made 0660, which nobody but its owner may write, was refused
    as "writable by others (mode 0660)": its entries decide, and one that lets
    another user write is refused, with the setfacl that stops it."""
    directory = tmp_path / "state"
    filled(directory, 2)
    database = directory / "state.db"
    subprocess.run(["setfacl", "-m", "u:65534:r,m::rw", str(database)], check=True)
    assert stat.S_IMODE(database.stat().st_mode) == 0o660  # the mask's bits
    assert [r.id for r in reopened(directory).blockers] == ["b0", "b1"]

    subprocess.run(["setfacl", "-m", "u:65534:rw", str(database)], check=True)
    with pytest.raises(StateError) as refused:
        Store.open(directory)
    fix = f"setfacl -n -m u:65534:r {database}"
    assert str(refused.value) == (
        f"refusing to keep state in {directory}: {database} has an ACL that lets uid 65534 "
        "(nobody) write to it (mode 0660, whose group bits are the ACL's mask), so they "
        f"could change the blockers; {fix}, or choose another --state-dir")
    subprocess.run(fix.split(), check=True)  # what the refusal says to do
    assert [r.id for r in reopened(directory).blockers] == ["b0", "b1"]


def test_the_log_beside_a_linked_databases_target_is_held_to_the_same_rules(
    tmp_path: Path
) -> None:
    """SQLite opens the log beside the link's target, not the one beside the link:
    before, the one beside the link was checked, and a log others may write was used."""
    filled(tmp_path / "volume", 2)
    volume = tmp_path / "volume"
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    (directory / "state.db").symlink_to(volume / "state.db")
    log = volume / "state.db-wal"
    log.write_bytes(b"")
    log.chmod(0o666)
    with pytest.raises(StateError) as refused:
        Store.open(directory)
    assert str(refused.value) == (
        f"refusing to keep state in {directory}: {log} is writable by others (mode 0666), "
        f"so they could change the blockers; chmod go-w {log}, or choose another "
        "--state-dir")
    log.chmod(0o600)
    assert [r.id for r in reopened(directory).blockers] == ["b0", "b1"]


def test_a_relative_directory_is_named_absolutely(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: "restored 0 blockers from state/state.db", wherever that was.
    monkeypatch.chdir(tmp_path)
    with Store.open(Path("state")) as store:
        assert store.path == tmp_path / "state" / "state.db"
    (tmp_path / "other" / "state.db").mkdir(parents=True, mode=0o700)
    with pytest.raises(StateError) as refused:
        Store.open(Path("other"))
    assert str(refused.value).startswith(f"{tmp_path}/other/state.db is not a regular file")


@pytest.mark.parametrize("name", ["state.db", "state.db-wal", "state.db-shm"])
def test_a_database_others_may_write_is_refused(tmp_path: Path, name: str) -> None:
    """The directory is held to sshd's StrictModes; before, a state.db (or its log)
    of mode 0666 in a directory of mode 0755 was used: any local user could change
    the blockers that the next start restores.  Left as it was."""
    filled(tmp_path, 1)
    tmp_path.chmod(0o755)
    target = tmp_path / name
    if not target.exists():
        target.write_bytes(b"")
    target.chmod(0o666)
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (
        f"refusing to keep state in {tmp_path}: {target} is writable by others (mode 0666), "
        f"so they could change the blockers; chmod go-w {target}, or choose another "
        "--state-dir")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666
    target.chmod(0o600)
    assert [r.id for r in reopened(tmp_path).blockers] == ["b0"]


def test_a_database_another_user_owns_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    filled(tmp_path, 1)
    os.chown(tmp_path / "state.db", NOBODY, NOBODY)
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (
        f"refusing to keep state in {tmp_path}: {tmp_path}/state.db is owned by uid {NOBODY} "
        "(nobody), not by this user (uid 0) or root, so its owner could change the "
        "blockers; chown it, or choose another --state-dir")


def test_a_lock_that_is_a_link_is_refused_with_the_right_fix(tmp_path: Path) -> None:
    # Before: "Too many levels of symbolic links; make D writable by this user".
    (tmp_path / "lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/lock is a symbolic link, which migblockd never "
                                  "follows; remove it (the daemon makes its lock file itself)")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_a_lock_that_is_not_a_file_is_refused_with_the_right_fix(
    tmp_path: Path, kind: str
) -> None:
    # Before: a directory, "Is a directory; make D writable by this user", which it
    # was; a FIFO or a device (root's mknod) was opened read-write and served as the
    # lock, where --check-config refused it as not a regular file.
    lock = tmp_path / "lock"
    if kind == "directory":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock, 0o600)
    elif os.geteuid() == 0:
        os.mknod(lock, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's
    else:
        pytest.skip("only root makes a device")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/lock is not a regular file; remove it (the "
                                  "daemon makes its lock file itself)")
    assert sorted(os.listdir(tmp_path)) == ["lock"]


def test_a_lock_that_is_the_database_too_is_refused_and_left_alone(tmp_path: Path) -> None:
    # Before, the start emptied it to write its pid: a lock that was a hard link to
    # state.db took every blocker with it, and the start then refused the empty file.
    with Store.open(tmp_path) as store:
        store.commit([Put(row("kept", 0))])
    (tmp_path / "lock").unlink()
    os.link(tmp_path / "state.db", tmp_path / "lock")
    before = (tmp_path / "state.db").read_bytes()
    expected = (f"{tmp_path}/lock is {tmp_path}/state.db too (a hard link), which the daemon "
                f"would empty to write its pid in its lock; remove {tmp_path}/lock (the "
                "daemon makes its lock file itself)")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == expected
    with pytest.raises(StateError) as checked:
        check_existing_directory(tmp_path)  # what --check-config runs
    assert str(checked.value) == expected
    assert (tmp_path / "state.db").read_bytes() == before
    (tmp_path / "lock").unlink()  # as the line says
    assert [r.id for r in reopened(tmp_path).blockers] == ["kept"]
    # A lock of other names (a snapshot of the directory made with cp -al) serves.
    snapshot = tmp_path.with_name(tmp_path.name + "-snapshot")
    subprocess.run(["cp", "-al", str(tmp_path), str(snapshot)], check=True)
    assert (tmp_path / "lock").stat().st_nlink == 2
    assert [r.id for r in reopened(tmp_path).blockers] == ["kept"]


def test_a_link_to_a_database_that_is_not_there_is_never_replaced(tmp_path: Path) -> None:
    # Say, state.db on a volume that is not mounted yet: before, a new empty
    # database was renamed over the link, and the daemon started with nothing.
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    target = tmp_path / "volume" / "state.db"
    (directory / "state.db").symlink_to(target)
    with pytest.raises(StateError) as refused:
        Store.open(directory)
    assert str(refused.value) == (
        f"{directory}/state.db is a symbolic link to {target}, which does not exist; make "
        "it reachable (a file system not mounted?), or remove the link to start from scratch")
    assert (directory / "state.db").is_symlink() and sorted(os.listdir(directory)) == [
        "lock", "state.db"]


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_log_that_is_not_a_file_is_named(tmp_path: Path, suffix: str, kind: str) -> None:
    filled(tmp_path, 1)
    odd = tmp_path / f"state.db{suffix}"
    if kind == "directory":
        odd.mkdir()
    else:
        os.mkfifo(odd)
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (f"{odd} is not a regular file; move it away (it is not "
                                  "state.db's log), or restore the directory from a backup")


def test_hand_edited_row_is_reported_as_corrupt(tmp_path: Path) -> None:
    filled(tmp_path, 2)
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("UPDATE blocker SET modes = 'normal' WHERE id = 'b1'")
    db.commit()
    db.close()
    with Store.open(tmp_path) as store, pytest.raises(StateError) as refused:
        store.load()
    assert str(refused.value) == (f"{tmp_path}/state.db is corrupt (blocker 'b1': modes "
                                  "'normal' is not a list of names); restore it from a "
                                  "backup, or move it away to start from scratch")


# ------------------------------------------------------ permissions (as nobody)


def test_unreadable_database_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    filled(directory, 1)
    (directory / "state.db").chmod(0)
    assert open_error(directory, unprivileged=True) == (
        f"cannot read and write {directory}/state.db: Permission denied; fix its "
        "permissions, or choose another --state-dir")


def open_error_as_nobody(request: pytest.FixtureRequest, prepare: Callable[[Path], None],
                         ) -> tuple[Path, str | None]:
    """The state directory ``prepare`` made (as root), opened as nobody, with the
    package copied where nobody can read it; the directory, and the error."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the daemon's side as another uid")
    shared = Path(tempfile.mkdtemp(prefix="migblockd-restore-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))
    code = shutil.copytree(ROOT / "migblockd", shared / "code" / "migblockd",
                           ignore=shutil.ignore_patterns("__pycache__"))
    for place in (shared, shared / "code", *code.rglob("*")):
        place.chmod(0o755 if place.is_dir() else 0o644)
    directory = shared / "state"
    prepare(directory)
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         client_python(), "-I", "-c",
         f"import sys; sys.path.insert(0, {str(shared / 'code')!r})\n"
         + textwrap.dedent(OPEN_AND_REPORT).replace("sys.argv[1]", repr(str(directory)))],
        capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error is None or isinstance(error, str)
    return directory, error


def test_a_database_copied_as_root_names_its_owner_and_the_chown(
        request: pytest.FixtureRequest) -> None:
    # docs/state.md's restore, done with cp as root: the directory is the daemon's
    # user's, the copy root's (which the ownership rule allows), and the daemon's user
    # cannot open it.
    def restored_with_cp(directory: Path) -> None:
        filled(directory, 1)
        for leftover in directory.iterdir():
            if leftover.name != "state.db":
                leftover.unlink()
        os.chown(directory, NOBODY, NOBODY)

    directory, error = open_error_as_nobody(request, restored_with_cp)
    assert error == (
        f"cannot read and write {directory}/state.db: Permission denied (it belongs to uid 0 "
        f"(root), mode 0600, and this daemon runs as uid {NOBODY} (nobody): a copy made as "
        f"root belongs to root); chown nobody: {directory}/state.db, or choose another "
        "--state-dir")


def test_a_lock_file_of_another_user_names_its_owner_and_the_chown(
        request: pytest.FixtureRequest) -> None:
    """A directory used as root, then given to the daemon's user without ``-R``:
    the lock file is root's.  Before, the message said to make the directory
    writable, which it was."""
    def chowned_without_r(directory: Path) -> None:
        filled(directory, 1)
        os.chown(directory, NOBODY, NOBODY)

    directory, error = open_error_as_nobody(request, chowned_without_r)
    assert error == (
        f"cannot open {directory}/lock: Permission denied (it belongs to uid 0 (root), mode "
        f"0600, and this daemon runs as uid {NOBODY} (nobody)); chown nobody: "
        f"{directory}/lock, or choose another --state-dir")


def test_a_state_directory_to_be_made_in_another_user_s_directory_names_the_owner(
        request: pytest.FixtureRequest) -> None:
    """The default for an account whose home does not exist (nobody's is
    /nonexistent), or a --state-dir under a directory made by root: before, the
    message said only "create it", not whose directory is in the way, nor how
    to make one this user may keep state in."""
    directory, error = open_error_as_nobody(request, lambda directory: None)
    parent = directory.parent  # root's, mode 0755
    assert error == (
        f"cannot create state directory {directory}: Permission denied ({parent} belongs "
        f"to uid 0 (root), mode 0755, and this daemon runs as uid {NOBODY} (nobody)); as "
        f"root, make it for this user: install -d -m 0700 -o nobody {directory}, or choose "
        "another --state-dir")


def test_a_lock_file_this_user_may_not_write_names_the_chmod(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    filled(directory, 1)
    (directory / "lock").chmod(0o400)
    assert open_error(directory, unprivileged=True) == (
        f"cannot open {directory}/lock: Permission denied (mode 0400); chmod u+rw "
        f"{directory}/lock, or choose another --state-dir")


def test_a_log_index_the_daemon_cannot_write_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    filled(directory, 1)
    shm = directory / "state.db-shm"
    shm.write_bytes(bytes(32768))
    shm.chmod(0o444)
    assert open_error(directory, unprivileged=True) == (
        f"cannot read and write {shm}: Permission denied; fix its permissions, or choose "
        "another --state-dir")


def test_read_only_state_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    filled(directory, 1)
    directory.chmod(0o500)  # SQLite cannot create the WAL next to the database
    assert open_error(directory, unprivileged=True) == (
        f"cannot create {directory}/state.db-wal: Permission denied; make {directory} "
        "writable by this user, or choose another --state-dir")
    (directory / "lock").unlink()
    assert open_error(directory, unprivileged=True) == (
        f"cannot open {directory}/lock: Permission denied; make {directory} writable by this "
        "user, or choose another --state-dir")


def test_state_directory_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    assert open_error(tmp_path / "state", unprivileged=True) == (
        f"cannot create state directory {tmp_path}/state: Permission denied (this user may "
        f"not write in {tmp_path}, mode 0500); chmod u+w {tmp_path}, or choose another "
        "--state-dir")
    tmp_path.chmod(0o700)
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match=r"state directory .*/file is not a directory; "):
        Store.open(tmp_path / "file")


def test_a_link_to_nothing_is_named_with_its_target(tmp_path: Path) -> None:
    # Found by review: "is not a directory; move it away" named no link, and the
    # fix is its target.
    (tmp_path / "state").symlink_to(tmp_path / "gone" / "state")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path / "state")
    assert str(refused.value) == (
        f"state directory {tmp_path}/state is a symbolic link to {tmp_path}/gone/state, "
        "which does not exist; create that directory, or choose another --state-dir")
    assert not (tmp_path / "gone").exists()  # nothing made on the way


def test_the_database_given_as_the_directory_is_not_to_be_moved_away(tmp_path: Path) -> None:
    # Before: "is not a directory; move it away", which would have moved the state away.
    filled(tmp_path, 1)
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path / "state.db")
    assert str(refused.value) == (
        f"state directory {tmp_path}/state.db is a file, the database itself; --state-dir "
        f"names the directory that holds it ({tmp_path})")
    assert [r.id for r in reopened(tmp_path).blockers] == ["b0"]


# ------------------------------------------------------------- disk full

# The child commits a baseline, then a group that cannot fit, then (space back)
# another group; it reports each step.  FILL and FREE say how space runs out.
DISK_FULL = """
    import json, os, resource, sys
    from pathlib import Path
    from migblockd.state import BlockerRow, Put, Setting, Store, StateError

    def row(i, reason="r"):
        return BlockerRow(f"b{i}", reason, ("normal",), False, (1, 2, 3), 1.5, i)

    store = Store.open(Path(DIRECTORY))
    store.commit([Put(row(0)), Setting("mode", "normal")])
    FILL
    big = [Put(row(i, "x" * 2000)) for i in range(1, 200)] + [Setting("mode", "cpr-reboot")]
    try:
        store.commit(big)
        error = None
    except StateError as e:
        error = str(e)
    after_failure = store.load()
    FREE
    store.commit([Put(row(1)), Setting("events", True)])
    after_recovery = store.load()
    store.close()
    print(json.dumps({
        "error": error,
        "after_failure": [[r.id for r in after_failure.blockers], after_failure.settings],
        "after_recovery": [[r.id for r in after_recovery.blockers], after_recovery.settings],
    }))
"""

RLIMIT_FILL = """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(DIRECTORY + "/state.db-wal"), hard))
"""
RLIMIT_FREE = "resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))"


def disk_full_child(directory: Path, fill: str, free: str) -> str:
    code = textwrap.dedent(DISK_FULL)
    code = code.replace("FILL\n", textwrap.dedent(fill).strip() + "\n")
    code = code.replace("FREE\n", textwrap.dedent(free).strip() + "\n")
    return code.replace("DIRECTORY", repr(str(directory)))


def check_disk_full_report(report: dict[str, object], error: str | re.Pattern[str]) -> None:
    if isinstance(error, str):
        assert report["error"] == error
    else:
        assert error.fullmatch(str(report["error"])), report["error"]
    # The failed group left nothing, in the store or on disk; the next one worked.
    assert report["after_failure"] == [["b0"], {"mode": "normal"}]
    assert report["after_recovery"] == [["b0", "b1"], {"mode": "normal", "events": True}]


def test_commit_beyond_the_file_size_limit_fails_and_recovers(tmp_path: Path) -> None:
    report = run_python(disk_full_child(tmp_path, RLIMIT_FILL, RLIMIT_FREE))
    # The limit is the log's size: the failed group is cut at it, however it is folded.
    check_disk_full_report(report, re.compile(re.escape(
        f"cannot commit to {tmp_path}/state.db: disk I/O error (the daemon's file size "
        "limit, ") + r"\d+ bytes, is reached\)"))
    snap = reopened(tmp_path)
    assert [r.id for r in snap.blockers] == ["b0", "b1"]
    assert snap.settings == {"mode": "normal", "events": True}


TMPFS_FILL = """
    filler = open(DIRECTORY + "/filler", "wb", buffering=0)
    try:
        while True:
            filler.write(bytes(4096))
    except OSError as e:
        assert e.strerror == "No space left on device", e
    filler.close()
"""
TMPFS_FREE = 'os.unlink(DIRECTORY + "/filler")'


def unshare_mount() -> list[str]:
    """The command prefix that runs a command in a new mount namespace (as root
    in a user namespace when we are not root), or skip when this host has none."""
    argv = ["unshare", "--mount"] if os.geteuid() == 0 else [
        "unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*argv, "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no mount namespaces here for a real small tmpfs: "
                    f"{probe.stderr.strip() if probe else 'no unshare'}")
    return argv


def test_commit_on_a_full_file_system_fails_and_recovers(tmp_path: Path) -> None:
    """A real full disk (a 512 KiB tmpfs), and the same file system read-only at start."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    directory = mnt / "state"
    script = tmp_path / "full.py"
    script.write_text(disk_full_child(directory, TMPFS_FILL, TMPFS_FREE))
    readonly = tmp_path / "readonly.py"
    readonly.write_text(textwrap.dedent(OPEN_AND_REPORT))
    shell = (f"mount -t tmpfs -o size=512k tmpfs {mnt} && {sys.executable} {script} && "
             f"mount -o remount,ro {mnt} && {sys.executable} {readonly} {directory}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([*unshare_mount(), "sh", "-c", shell], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    full, ro = (json.loads(line) for line in proc.stdout.splitlines())
    check_disk_full_report(full, f"cannot commit to {directory}/state.db: "
                                 "database or disk is full")
    assert ro["error"] == (f"cannot open {directory}/lock: Read-only file system; remount "
                           "that file system read-write, or, under systemd, add "
                           f"{directory} to ReadWritePaths= (the units' ProtectSystem=strict "
                           "makes every path outside StateDirectory= read-only), or choose "
                           "another --state-dir")



# The log fills the file system by itself (SQLite folds it back into the
# database only once it holds about 4 MiB), while the database grows too.
# Then a little space comes back, and settings change again and again: the
# log must be emptied each time it fills the disk, or the commits would fail
# as soon as it had taken the space back.
LOG_FILLS_THE_DISK = """
    import json, os
    from pathlib import Path
    from migblockd.state import BlockerRow, Put, Setting, Store, StateError

    directory, mnt = Path(DIRECTORY), Path(MOUNTPOINT)
    if LINKED:  # state.db a link to a file on the small file system
        Store.open(mnt / "volume").close()
        directory.mkdir(mode=0o700)
        (directory / "state.db").symlink_to(mnt / "volume" / "state.db")
    store = Store.open(directory)
    with open(mnt / "spare", "wb") as spare:  # what the operator can delete
        spare.write(bytes(64 * 1024))
    added = 0
    while added < 10000:
        try:
            store.commit([Put(BlockerRow(f"b{added}", "x" * 500, ("normal",), False, None,
                                         1.5, added))])
        except StateError as e:
            error = str(e)
            break
        added += 1
    os.unlink(mnt / "spare")
    failures = []
    for i in range(300):
        try:
            store.commit([Setting("mode", f"m{i}")])
        except StateError as e:
            failures.append(f"{i}: {e}")
    kept = store.load()
    store.close()
    reopened = Store.open(directory)
    again = reopened.load()
    reopened.close()
    print(json.dumps({"error": error, "added": added, "failures": failures[:3],
                      "kept": [len(kept.blockers), kept.settings],
                      "reopened": [len(again.blockers), again.settings]}))
"""


@pytest.mark.parametrize("linked", [False, True], ids=["in-place", "state.db-linked"])
def test_a_log_that_fills_the_file_system_is_emptied(tmp_path: Path, linked: bool) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # A linked state.db keeps its log beside its target: that disk is the one to watch.
    directory = tmp_path / "state" if linked else mnt / "state"
    script = tmp_path / "log.py"
    script.write_text(textwrap.dedent(LOG_FILLS_THE_DISK).replace(
        "DIRECTORY", repr(str(directory))).replace("MOUNTPOINT", repr(str(mnt))).replace(
        "LINKED", repr(linked)))
    shell = f"mount -t tmpfs -o size=256k tmpfs {mnt} && {sys.executable} {script}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([*unshare_mount(), "sh", "-c", shell], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["error"] == f"cannot commit to {directory}/state.db: database or disk is full"
    assert report["failures"] == []
    added = report["added"]
    assert report["kept"] == report["reopened"] == [added, {"mode": "m299"}]



# A reader in a transaction (an operator's sqlite3 shell, read-only, after BEGIN)
# while the store commits on a small file system: the log, which SQLite may not
# write again from its start while the reader's snapshot needs it, fills it.
A_READER_PINS_THE_LOG = """
    import json, sqlite3
    from pathlib import Path
    from migblockd.state import BlockerRow, Put, Store, StateError

    directory = Path(DIRECTORY)
    store = Store.open(directory)
    store.commit([Put(BlockerRow("first", "r", ("normal",), False, None, 1.5, 0))])
    reader = sqlite3.connect(f"file:{directory}/state.db?mode=ro", uri=True,
                             isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM blocker").fetchone()
    error, remedy, added = None, None, 0
    while added < 10000:
        try:
            store.commit([Put(BlockerRow(f"b{added}", "x" * 500, ("normal",), False, None,
                                         1.5, added + 1))])
        except StateError as e:
            error, remedy = str(e), e.remedy
            break
        added += 1
    reader.execute("COMMIT")
    reader.close()
    store.commit([Put(BlockerRow("after", "r", ("normal",), False, None, 1.5, 100000))])
    kept = len(store.load().blockers)
    store.close()
    print(json.dumps({"error": error, "remedy": remedy, "added": added, "kept": kept}))
"""


def test_a_full_disk_that_a_readers_transaction_caused_says_so(tmp_path: Path) -> None:
    """Before, the error and the log's advice were a full disk's (free space on it),
    while the log grew only because a reader kept SQLite from writing it again from
    its start: ending that read is what frees the space."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    directory = mnt / "state"
    script = tmp_path / "reader.py"
    script.write_text(textwrap.dedent(A_READER_PINS_THE_LOG).replace(
        "DIRECTORY", repr(str(directory))))
    shell = f"mount -t tmpfs -o size=256k tmpfs {mnt} && {sys.executable} {script}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([*unshare_mount(), "sh", "-c", shell], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    db = directory / "state.db"
    assert report["error"] == (f"cannot commit to {db}: database or disk is full (another "
                               f"program reading it keeps its log {db}-wal from being "
                               "emptied)")
    assert report["remedy"] == (f"end the read of the program that holds {db} open (an "
                                "sqlite3 shell left in a transaction?): until it does, the "
                                "log cannot be emptied, and grows with every commit")
    # Once the read ended, the next commit found the room.
    assert report["kept"] == report["added"] + 2


@contextlib.contextmanager
def traced(directory: Path, script: str,
           *strace: str) -> Iterator[tuple[subprocess.Popen[str], subprocess.Popen[str]]]:
    """``script`` (DIRECTORY filled in) in a child process, once it said "ready",
    under ``strace -p CHILD *strace`` (the test is skipped when strace cannot
    trace here); the child is killed when done, whatever happened."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace, to make the disk fail")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = textwrap.dedent(script).replace("DIRECTORY", repr(str(directory)))
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        tracer = subprocess.Popen(["strace", "-p", str(child.pid), *strace, "-o", os.devnull],
                                  stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        attached = tracer.stderr.readline()
        if "attached" not in attached:
            pytest.skip(f"strace cannot trace here: {attached.strip()}")
        yield child, tracer
    finally:
        child.kill()
        child.wait()


def tell(child: subprocess.Popen[str]) -> str:
    """Say "go" to ``child``, and return its next line."""
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    return child.stdout.readline()


# Commits a baseline, says so, and once told (a debugger now failing its syncs)
# commits an add and a delete, each of which must fail; then ends without
# closing, as a killed daemon does.
FAILING_SYNC = """
    import json, os, sys
    from pathlib import Path
    from migblockd.state import BlockerRow, Delete, Put, Store, StateError

    def row(id, seq):
        return BlockerRow(id, "r", ("normal",), False, None, 1.5, seq)

    store = Store.open(Path(DIRECTORY))
    store.commit([Put(row("a", 0)), Put(row("d", 1))])
    print("ready", flush=True)
    sys.stdin.readline()
    errors = []
    for group in ([Put(row("b", 2))], [Delete("d")]):
        try:
            store.commit(group)
            errors.append(None)
        except StateError as e:
            errors.append(str(e))
    print(json.dumps(errors), flush=True)
    os._exit(0)
"""


def test_a_commit_whose_sync_failed_is_not_replayed_at_the_next_start(tmp_path: Path) -> None:
    """A failed fsync leaves the group's pages in the log (in the page cache), whole:
    before, the next start replayed the add and the delete that had failed."""
    directory = tmp_path / "state"
    with traced(directory, FAILING_SYNC, "-e", "trace=fsync,fdatasync",
                "-e", "inject=fsync,fdatasync:error=EIO") as (child, tracer):
        errors = json.loads(tell(child))
        assert child.wait(timeout=30) == 0
    tracer.wait(timeout=30)
    failed = f"cannot commit to {directory}/state.db: disk I/O error"
    assert errors == [failed, failed]
    assert [r.id for r in reopened(directory).blockers] == ["a", "d"]


# Commits a baseline, says so, and once told (a debugger now failing its syncs, and
# every write after the next commit's two) commits an add, which must fail; once
# told again (the debugger gone) copies the directory as a kill would leave it,
# commits another add, and ends as a killed daemon.
FAILING_WRITES = """
    import json, os, shutil, sys
    from pathlib import Path
    from migblockd.state import BlockerRow, Put, Store, StateError

    def row(id, seq):
        return BlockerRow(id, "r", ("normal",), False, None, 1.5, seq)

    store = Store.open(Path(DIRECTORY))
    store.commit([Put(row("a", 0))])
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        store.commit([Put(row("b", 1))])
        error = None
    except StateError as e:
        error = str(e)
    print(json.dumps(error), flush=True)
    sys.stdin.readline()
    shutil.copytree(DIRECTORY, DIRECTORY + "-killed")
    store.commit([Put(row("c", 2))])
    print("done", flush=True)
    os._exit(0)
"""


def test_a_failed_commit_is_not_replayed_when_writing_over_it_fails_too(
    tmp_path: Path,
) -> None:
    """The commit that writes over a failed group's frames failed to write too (a
    disk failing writes, not only syncs): before, the next start replayed the add
    that had failed."""
    directory = tmp_path / "state"
    # The add's frame is a header and a page: two writes, then the failing sync.
    with traced(directory, FAILING_WRITES, "-e", "trace=pwrite64,fsync,fdatasync",
                "-e", "inject=fsync,fdatasync:error=EIO",
                "-e", "inject=pwrite64:error=EIO:when=3+") as (child, tracer):
        error = json.loads(tell(child))
        tracer.terminate()
        tracer.wait(timeout=30)
        assert tell(child) == "done\n"
        assert child.wait(timeout=30) == 0
    assert error == f"cannot commit to {directory}/state.db: disk I/O error"
    killed = tmp_path / "state-killed"
    assert [r.id for r in reopened(killed).blockers] == ["a"]
    assert [r.id for r in reopened(directory).blockers] == ["a", "c"]  # the log goes on


# On a file system with room to spare, commits a baseline and a group that the log
# is not folded back after (a log written again from its start, so the next group
# needs no new block); fills the file system; fails its own syncs (strace) and
# commits an add, which must fail; then ends without closing, as a killed daemon.
FAILING_SYNC_ON_A_FULL_DISK = """
    import json, os, sqlite3, subprocess, sys
    from pathlib import Path
    from migblockd.state import BlockerRow, Delete, Put, Store, StateError

    directory, mnt = Path(DIRECTORY), Path(MOUNTPOINT)

    def row(id, seq, size=1):
        return BlockerRow(id, "r" * size, ("normal",), False, None, 1.5, seq)

    store = Store.open(directory)
    store.commit([Put(row(f"big{i}", i, 3000)) for i in range(20)])
    store.commit([Delete(f"big{i}") for i in range(20)])
    with sqlite3.connect(directory / "state.db") as other:
        other.execute("PRAGMA wal_checkpoint(PASSIVE)")
    store.commit([Put(row("a", 100))])
    try:
        with open(mnt / "filler", "wb") as filler:
            while True:
                filler.write(bytes(4096))
                filler.flush()
    except OSError:
        pass
    tracer = subprocess.Popen(
        ["strace", "-p", str(os.getpid()), "-e", "trace=fsync,fdatasync",
         "-e", "inject=fsync,fdatasync:error=EIO", "-o", os.devnull],
        stderr=subprocess.PIPE, text=True)
    attached = tracer.stderr.readline()
    if "attached" not in attached:
        print(json.dumps({"skip": attached.strip()}), flush=True)
        os._exit(0)
    try:
        store.commit([Put(row("b", 101))])
        error = None
    except StateError as e:
        error = str(e)
    print(json.dumps({"error": error}), flush=True)
    os._exit(0)
"""


def test_a_commit_whose_sync_failed_on_a_full_disk_is_not_replayed(tmp_path: Path) -> None:
    """On a full file system too: there the failed group was left in the log, and
    the next start replayed the add that every client was told failed."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace, to make the syncs fail")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    directory = mnt / "state"
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(FAILING_SYNC_ON_A_FULL_DISK).replace(
        "DIRECTORY", repr(str(directory))).replace("MOUNTPOINT", repr(str(mnt))))
    reopen = (f"from migblockd.state import Store; s = Store.open({str(directory)!r}); "
              "print([b.id for b in s.load().blockers]); s.close()")
    shell = (f"mount -t tmpfs -o size=16m tmpfs {mnt} && {sys.executable} {script} && "
             f"rm {mnt}/filler && {sys.executable} -c {shlex.quote(reopen)}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([*unshare_mount(), "sh", "-c", shell], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    report = json.loads(lines[0])
    if "skip" in report:
        pytest.skip(f"strace cannot trace here: {report['skip']}")
    assert report["error"] == (f"cannot commit to {directory}/state.db: disk I/O error "
                               "(its file system is full)")
    assert lines[1] == "['a']"


# -------------------------------------------------------------- migrations


#: The current format, and the next one the tests below play.
NOW, NEXT = len(MIGRATIONS), len(MIGRATIONS) + 1


def add_origin(conn: sqlite3.Connection) -> None:
    """A format that a later migblockd might define: where each blocker came from."""
    conn.execute("ALTER TABLE blocker ADD COLUMN origin TEXT NOT NULL DEFAULT ''")
    conn.execute(f"UPDATE blocker SET origin = 'format-{NOW}:' || id")


def test_older_format_is_migrated_forward_with_a_backup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    filled(tmp_path, 3)
    umask = os.umask(0o022)
    try:
        with caplog.at_level("INFO", "migblockd"):
            Store.open(tmp_path, migrations=(*MIGRATIONS, add_origin)).close()
    finally:
        os.umask(umask)
    assert caplog.messages == [f"migrated {tmp_path}/state.db from format {NOW} to {NEXT}; the "
                               f"file as it was is kept as {tmp_path}/state.db.format-{NOW}"]
    with Store.open(tmp_path, migrations=(*MIGRATIONS, add_origin)) as store:
        assert [r.id for r in store.load().blockers] == ["b0", "b1", "b2"]
        store.commit([Put(row("b3", 3))])
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == NEXT
    assert db.execute("SELECT id, origin FROM blocker ORDER BY seq").fetchall() == [
        (f"b{n}", f"format-{NOW}:b{n}") for n in range(3)] + [("b3", "")]
    db.close()
    # Not the umask's mode (0644 here): it holds the same blockers.
    assert stat.S_IMODE((tmp_path / f"state.db.format-{NOW}").stat().st_mode) == 0o600
    backup = sqlite3.connect(tmp_path / f"state.db.format-{NOW}")
    assert backup.execute("PRAGMA user_version").fetchone()[0] == NOW
    assert backup.execute("SELECT count(*) FROM blocker").fetchone()[0] == 3
    backup.close()
    # This migblockd now refuses the migrated file rather than misread it, and says
    # where the copy is.
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path}/state.db was written by a newer migblockd (format {NEXT}; this one reads "
        f"up to {NOW}); upgrade migblockd, or go back to {tmp_path}/state.db.format-{NOW}, the "
        "copy the upgrade kept (changes made since are lost)")


def test_what_is_in_the_way_of_the_copy_before_a_migration_is_named(tmp_path: Path) -> None:
    filled(tmp_path, 2)
    (tmp_path / f"state.db.format-{NOW}").mkdir()
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path, migrations=(*MIGRATIONS, add_origin))
    assert str(refused.value) == (f"cannot remove {tmp_path}/state.db.format-{NOW}, left by "
                                  "an earlier start, to make it again: Is a directory; move "
                                  "it away")
    assert [r.id for r in reopened(tmp_path).blockers] == ["b0", "b1"]  # still the format


def test_failed_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    filled(tmp_path, 2)

    def broken(conn: sqlite3.Connection) -> None:
        add_origin(conn)
        conn.execute("UPDATE blocker SET no_such_column = 1")

    with pytest.raises(StateError) as refused:
        Store.open(tmp_path, migrations=(*MIGRATIONS, broken))
    assert str(refused.value) == (f"cannot migrate {tmp_path}/state.db from format {NOW} to "
                                  f"{NEXT} (no such column: no_such_column); it is unchanged: "
                                  "report this, and use the migblockd that wrote it")
    assert [r.id for r in reopened(tmp_path).blockers] == ["b0", "b1"]
    db = sqlite3.connect(tmp_path / "state.db")
    columns = [c[1] for c in db.execute("PRAGMA table_info(blocker)")]
    db.close()
    assert "origin" not in columns


# ------------------------------------------- format 2: blockers of every mode

FOUR = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")


def format_1(directory: Path, rows: dict[str, str], *edits: str) -> None:
    """A state directory of format 1 holding a blocker per ``rows`` item (id, the
    ``modes`` column's text), then ``edits`` made as the sqlite3 shell makes them."""
    with Store.open(directory, MIGRATIONS[:1]) as store:
        store.commit([Put(row(id, seq)) for seq, id in enumerate(rows)])
    db = sqlite3.connect(directory / "state.db", isolation_level=None)
    try:
        db.executemany("UPDATE blocker SET modes = ? WHERE id = ?",
                       [(modes, id) for id, modes in rows.items()])
        for edit in edits:
            db.execute(edit)
    finally:
        db.close()


def test_a_blocker_of_every_mode_is_stored_as_such(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.commit([Put(row("all", 0, modes=None)), Put(row("four", 1, modes=FOUR))])
    assert [r.modes for r in reopened(tmp_path).blockers] == [None, FOUR]
    db = sqlite3.connect(tmp_path / "state.db")
    try:
        assert db.execute("SELECT id, modes FROM blocker ORDER BY seq").fetchall() == [
            ("all", None), ("four", json.dumps(list(FOUR)))]
    finally:
        db.close()


def test_format_1_reads_a_list_of_every_mode_of_its_day_as_every_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Format 1 kept "every mode" as the modes of its day, as it kept a list naming
    them all: such a row is read as every mode, which blocks more."""
    four = json.dumps(list(FOUR))
    format_1(tmp_path, {
        "all": four,
        "reordered": json.dumps(list(reversed(FOUR))),
        "custom": json.dumps([*FOUR, "cpr-test"]),  # a --schema with a mode more
        "three": json.dumps(list(FOUR[:3])),
        "twice": json.dumps([*FOUR, "normal"]),  # refused by the restore, as before
        "spaced": '[ "normal","cpr-reboot" ,"cpr-transfer","cpr-exec"]',
    })
    with caplog.at_level("INFO", "migblockd"):
        snapshot = reopened(tmp_path)
    assert caplog.messages == [f"migrated {tmp_path}/state.db from format 1 to 2; the file "
                               f"as it was is kept as {tmp_path}/state.db.format-1"]
    assert [(r.id, r.modes) for r in snapshot.blockers] == [
        ("all", None), ("reordered", None), ("custom", None), ("three", FOUR[:3]),
        ("twice", (*FOUR, "normal")), ("spaced", None)]
    backup = sqlite3.connect(tmp_path / "state.db.format-1")
    try:
        assert backup.execute("SELECT modes FROM blocker WHERE id = 'all'").fetchone() == (four,)
    finally:
        backup.close()
    # Stored as every mode from now on, and NULL still refused where it must be.
    with Store.open(tmp_path) as store:
        store.commit([Put(row("new", 9, modes=None))])
        with pytest.raises(StateError) as refused:
            store.commit([Put(row("none", 10, modes=()))])
        assert str(refused.value) == (f"cannot commit to {store.path}: "
                                      "CHECK constraint failed: modes <> '[]'")


@pytest.mark.parametrize(("modes", "why"), [
    ("'normal'", "modes 'normal' is not a list of names"),
    ("'[\"normal\", 1, \"cpr-reboot\", \"cpr-transfer\", \"cpr-exec\"]'",
     "modes '[\"normal\", 1, \"cpr-reboot\", \"cpr-transfer\", \"cpr-exec\"]' is not a "
     "list of names"),
    ("7", "modes '7' is not a list of names"),  # TEXT affinity: stored as text
    ("x'5b226e6f726d616c225d'", "modes b'[\"normal\"]' is not a list of names"),
])
def test_a_bad_format_1_row_is_migrated_as_it_is_and_refused(
    tmp_path: Path, modes: str, why: str
) -> None:
    """A hand-edited value is copied as it is, and refused as format 1 refused it:
    with the one line that names it, and the copy of the file as it was kept."""
    format_1(tmp_path, {"b0": json.dumps(list(FOUR)), "b1": "[\"normal\"]"},
             f"UPDATE blocker SET modes = {modes} WHERE id = 'b1'")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path, restore=lambda snapshot: None)
    assert str(refused.value) == (f"{tmp_path}/state.db is corrupt (blocker 'b1': {why}); "
                                  "restore it from a backup, or move it away to start from "
                                  "scratch")
    assert (tmp_path / "state.db.format-1").exists()


def test_a_format_1_row_whose_modes_are_not_utf8_is_refused(tmp_path: Path) -> None:
    format_1(tmp_path, {"b0": json.dumps(list(FOUR))},
             "UPDATE blocker SET modes = CAST(x'5b226e6f726dff225d' AS TEXT)")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path, restore=lambda snapshot: None)
    assert str(refused.value) == (f"{tmp_path}/state.db is corrupt (text in column 'modes' is "
                                  "not UTF-8); restore it from a backup, or move it away to "
                                  "start from scratch")


# ---------------------------------------------------------- default directory


def test_default_state_dir_prefers_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/migblockd:/var/lib/other")
    assert default_state_dir() == Path("/var/lib/migblockd")
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg/state")
    expected = "/var/lib/migblockd" if os.geteuid() == 0 else "/xdg/state/migblockd"
    assert default_state_dir() == Path(expected)


DEFAULT_DIR = f"""
    import json, os
    from migblockd.paths import default_state_dir
    if os.geteuid() == 0:
        os.seteuid({NOBODY})  # the effective uid is what the rule looks at
    print(json.dumps({{"dir": str(default_state_dir())}}))
"""


def test_default_state_dir_of_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg/state")
    assert run_python(DEFAULT_DIR) == {"dir": "/xdg/state/migblockd"}
    monkeypatch.setenv("XDG_STATE_HOME", "relative/is/ignored")
    assert run_python(DEFAULT_DIR) == {"dir": "/home/someone/.local/state/migblockd"}
    monkeypatch.delenv("XDG_STATE_HOME")
    assert run_python(DEFAULT_DIR) == {"dir": "/home/someone/.local/state/migblockd"}
    monkeypatch.setenv("STATE_DIRECTORY", "/run/state/migblockd")
    assert run_python(DEFAULT_DIR) == {"dir": "/run/state/migblockd"}


def test_a_user_without_a_home_is_told_to_give_a_state_dir(tmp_path: Path) -> None:
    """A bare uid (no account, no $HOME: a container's --user, env -i): the default
    cannot be formed, which used to stop even --help with a traceback."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as a uid that has no account")
    uid = bare_uid()
    run = [sys.executable, "-m", "migblockd", "--socket", str(tmp_path / "s.sock")]
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    helped = subprocess.run([*setpriv, *run, "--help"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert helped.returncode == 0, helped.stderr
    assert "${XDG_STATE_HOME:-~/.local/state}/migblockd" in " ".join(helped.stdout.split())
    refused = subprocess.run([*setpriv, *run], env=env, capture_output=True, text=True,
                             timeout=30)
    assert (refused.returncode, refused.stderr) == (EXIT_NOTCONFIGURED, (
        f"migblockd: no default --state-dir for uid {uid}: HOME is not set and the user "
        "database has no home directory for it; give --state-dir, or set XDG_STATE_HOME\n"))


DEFAULT_SOCKET = f"""
    import json, os
    from migblockd.paths import default_socket_path
    if os.geteuid() == 0:
        os.seteuid({NOBODY})
    print(json.dumps({{"socket": str(default_socket_path())}}))
"""


def test_default_socket_of_a_user_ignores_a_relative_runtime_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TMPDIR", "/tmpdir")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/65534")
    assert run_python(DEFAULT_SOCKET) == {"socket": "/run/user/65534/migblockd/migblockd.sock"}
    # Reported: used as is, relative to wherever the daemon was started.
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/is/ignored")
    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    assert run_python(DEFAULT_SOCKET) == {"socket": f"/tmpdir/migblockd-{uid}/migblockd.sock"}


def test_a_directory_others_could_change_is_refused(tmp_path: Path) -> None:
    # Whoever may write there could swap the database the next start restores.
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o700)
    open_dir.chmod(0o777)
    with pytest.raises(StateError) as refused:
        Store.open(open_dir)
    assert str(refused.value) == (
        f"refusing to keep state in {open_dir}: state directory {open_dir} is writable by "
        f"others (mode 0777), so they could replace the database; chmod go-w {open_dir}, "
        "or choose another --state-dir")
    assert not (open_dir / "state.db").exists()
    # Missing, under a directory others may write: refused before it is made.
    # (Reproduced first: made 0700, then refused, and left behind.)
    for below in (open_dir / "state", open_dir / "a" / "state"):
        with pytest.raises(StateError) as refused:
            Store.open(below)
        assert str(refused.value) == (
            f"refusing to keep state in {below}: {open_dir}, above state directory {below}, "
            "is writable by others (mode 0777), so they could replace the database; "
            f"chmod go-w {open_dir}, or choose another --state-dir")
    assert sorted(open_dir.iterdir()) == []
    # Sticky, others may add entries but not take ours: made there, and accepted.
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    Store.open(sticky / "state").close()
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(StateError) as refused:
            Store.open(theirs)
        assert str(refused.value) == (
            f"refusing to keep state in {theirs}: state directory {theirs} is owned by uid "
            "65534 (nobody), not by this user (uid 0) or root, so its owner could "
            "replace the database; chown it, or choose another --state-dir")
    open_dir.chmod(0o700)
    Store.open(open_dir).close()  # fixed as the message says: accepted


def test_missing_parents_are_made_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        Store.open(tmp_path / "a" / "b" / "state").close()
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "state"):
        assert d.stat().st_mode & 0o777 == 0o700, d


# A state.db removed under the store, on a file system with no room for its copy.
REMOVED_ON_A_FULL_DISK = """
    import io, json, logging, os
    from pathlib import Path
    from migblockd.state import BlockerRow, Put, Store

    directory, mnt = Path(DIRECTORY), Path(MOUNTPOINT)
    lines = io.StringIO()
    logging.getLogger("migblockd").addHandler(logging.StreamHandler(lines))
    store = Store.open(directory)
    store.commit([Put(BlockerRow(f"b{n}", "x" * 500, ("normal",), False, None, 1.5, n))
                  for n in range(100)])
    (directory / "state.db").unlink()
    with open(mnt / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(bytes(4096))
        except OSError:
            pass
    store.close()
    print(json.dumps({"log": lines.getvalue(), "files": sorted(os.listdir(directory)),
                      "wal": os.path.getsize(directory / "state.db-wal")}))
"""


def test_a_removed_database_that_cannot_be_saved_at_the_close_is_said_to_be_lost(
        tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    directory = mnt / "state"
    script = tmp_path / "removed.py"
    script.write_text(textwrap.dedent(REMOVED_ON_A_FULL_DISK).replace(
        "DIRECTORY", repr(str(directory))).replace("MOUNTPOINT", repr(str(mnt))))
    shell = f"mount -t tmpfs -o size=512k tmpfs {mnt} && {sys.executable} {script}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([*unshare_mount(), "sh", "-c", shell], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    db = directory / "state.db"
    log = report["log"]
    assert log.startswith(f"stopping: {db} was removed while the daemon ran: its log is "
                          "emptied, so that the next start replays nothing into another "
                          f"file; what it kept could not be saved ({db}.rescued-"), log
    assert log.endswith(": database or disk is full) and is lost\n"), log
    # No half copy left behind; the log, emptied, stays for the start to refuse.
    assert report["files"] == ["lock", "state.db-shm", "state.db-wal"], report
    assert report["wal"] == 0


@pytest.mark.parametrize("log", ["with its frames", "emptied since"])
def test_a_log_a_kill_left_without_its_database_names_no_earlier_copy(
        tmp_path: Path, log: str) -> None:
    # Found by review: the start named a copy an earlier stop had saved, as if the
    # daemon just killed had saved it; renamed into place, the killed daemon's log
    # was replayed into that older state, and an acknowledged blocker was lost.
    # Then again for a log emptied after that copy (an operator's checkpoint, or
    # the daemon's own on a full disk) before the kill.
    with Store.open(tmp_path) as store:
        store.commit([Put(row("old", 1))])
    stale = tmp_path / "state.db.rescued-20200101T000000Z"
    shutil.copy(tmp_path / "state.db", stale)
    os.utime(stale, (1.5e9, 1.5e9))
    killed_after_commits(tmp_path, 3)
    (tmp_path / "state.db").unlink()
    wal = tmp_path / "state.db-wal"
    assert wal.stat().st_size > 0
    if log == "emptied since":
        os.truncate(wal, 0)
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    # Named for what it is: a copy of when, which may be older.
    assert str(refused.value) == (
        f"{tmp_path}/state.db-wal exists without state.db; a stop saved what a daemon kept "
        f"as {stale} (2017-07-14 02:40:00 UTC), which may be older than the state.db there "
        "was; put back the state.db it is the log of (the file moved away), not a backup, "
        "into which SQLite would replay it; or move the whole directory away to restore a "
        "backup or to start from scratch")


def test_a_saved_copy_is_never_left_behind_by_a_start(tmp_path: Path) -> None:
    # Found by review: with the emptied log removed, or state.db a link whose
    # target was removed, the next start made an empty database (once the link
    # was removed, as told), never naming the copy that held every blocker.
    with Store.open(tmp_path) as store:
        store.commit([Put(row("kept", 1))])
        (tmp_path / "state.db").unlink()
    [copy] = rescued_copies(tmp_path / "state.db")
    for each in ("state.db-wal", "state.db-shm"):
        (tmp_path / each).unlink()
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(copy.stat().st_mtime))
    saved = (f"a stop saved what a daemon kept as {copy} ({when}), which may be older "
             "than the state.db there was")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path}/state.db does not exist; {saved}: rename that to {tmp_path}/state.db "
        "to use it, or move the copies (state.db.rescued-*) away to start from scratch")
    (tmp_path / "state.db").symlink_to(tmp_path / "gone.db")
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path}/state.db is a symbolic link to {tmp_path}/gone.db, which does not "
        f"exist; {saved}; make it reachable (a file system not mounted?), or remove the "
        "link to start from scratch")
    (tmp_path / "state.db").unlink()
    copy.rename(tmp_path / "state.db")
    with Store.open(tmp_path) as store:
        assert [b.id for b in store.load().blockers] == ["kept"]


def test_copies_saved_in_the_same_second_do_not_collide(tmp_path: Path) -> None:
    # Found by review: the second stop's copy, made exclusively under the same
    # name, failed with "File exists", and what it kept was lost.
    with Store.open(tmp_path) as store:
        store.commit([Put(row("kept", 1))])
        now = time.time()
        taken = {time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + d)) for d in (0, 1, 2)}
        for stamp in taken:  # an earlier stop's copies, this second's and the next ones'
            (tmp_path / f"state.db.rescued-{stamp}").write_text("an earlier copy")
        (tmp_path / "state.db").unlink()
    [copy] = [each for each in rescued_copies(tmp_path / "state.db")
              if each.name.removeprefix("state.db.rescued-") not in taken]
    stamp, _, n = copy.name.removeprefix("state.db.rescued-").partition("-")
    assert stamp in taken and n == "2", copy
    assert all((tmp_path / f"state.db.rescued-{each}").read_text() == "an earlier copy"
               for each in taken)
    copy.rename(tmp_path / "state.db")
    with Store.open(tmp_path) as store:
        assert [b.id for b in store.load().blockers] == ["kept"]


HIDDEN_AND_REMOVED = """
    import io, json, logging, os
    from pathlib import Path
    from migblockd.state import BlockerRow, Put, StateError, Store

    directory = Path(DIRECTORY)
    lines = io.StringIO()
    logging.getLogger("migblockd").addHandler(logging.StreamHandler(lines))
    store = Store.open(directory)
    store.commit([Put(BlockerRow("kept", "r", ("normal",), False, None, 1.5, 1))])
    (directory / "state.db").unlink()
    directory.chmod(0)
    try:
        store.commit([Put(BlockerRow("lost", "r", ("normal",), False, None, 1.5, 2))])
        refused = None
    except StateError as e:
        refused = str(e)
    store.close()
    print(json.dumps({"refused": refused, "log": lines.getvalue()}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the store as another user")
def test_a_database_removed_in_a_directory_that_cannot_be_looked_in_is_refused(
        short_tmp: Path) -> None:
    # Found by review: with the state directory made unsearchable (mode 000), the
    # check could not look at state.db and took it for still there: a blocker was
    # acknowledged into the removed file, and the stop neither saved nor said it.
    directory = short_tmp / "state"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    short_tmp.chmod(0o755)
    script = short_tmp / "hidden.py"
    script.write_text(textwrap.dedent(HIDDEN_AND_REMOVED).replace(
        "DIRECTORY", repr(str(directory))))
    script.chmod(0o644)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=60, cwd="/")
    directory.chmod(0o700)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    db = directory / "state.db"
    assert report["refused"] == (
        f"cannot commit to {db}: it was removed (or moved away) while the daemon ran, and "
        "the next start would not read what is committed now"), report
    assert report["log"].startswith(
        f"stopping: {db} was removed while the daemon ran: its log is emptied, so that the "
        f"next start replays nothing into another file; what it kept could not be saved "
        f"({db}.rescued-"), report
    assert "Permission denied) and is lost" in report["log"], report


def test_the_copy_a_stop_saved_is_named_whatever_the_clock_did(tmp_path: Path) -> None:
    # Found by review: the start named the copy whose name sorted last; one saved
    # while the clock was a day ahead sorted after the one the stop had just saved,
    # and renamed into place, it brought back an older state.
    with Store.open(tmp_path) as store:
        store.commit([Put(row("old", 1))])
        ahead = tmp_path / "state.db.rescued-20991231T000000Z"
        shutil.copy(tmp_path / "state.db", ahead)
        os.utime(ahead, (time.time() + 86400, time.time() + 86400))
        store.commit([Put(row("new", 2))])
        (tmp_path / "state.db").unlink()
    [saved] = [c for c in rescued_copies(tmp_path / "state.db") if c != ahead]
    with pytest.raises(StateError) as refused:
        Store.open(tmp_path)
    assert f"the stop saved what it kept as {saved}: " in str(refused.value), refused.value
    saved.rename(tmp_path / "state.db")
    with Store.open(tmp_path) as store:
        assert [b.id for b in store.load().blockers] == ["old", "new"]


def reading(database: Path) -> sqlite3.Connection:
    """Another program's connection to ``database``, in a read transaction: it holds
    the log back from being emptied until it ends."""
    reader = sqlite3.connect(database, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM blocker").fetchone()
    return reader


def test_a_log_a_reader_keeps_from_being_emptied_is_removed_from_beside_a_restore(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Found by review: a program reading the replaced file kept the stop from
    # emptying its log, which the stop said it had done; the next start replayed
    # it into the restored backup.
    directory = tmp_path / "state"
    db = directory / "state.db"
    store = Store.open(directory)
    store.commit([Put(row("backed-up", 1))])
    backup = tmp_path / "backup.db"
    with contextlib.closing(sqlite3.connect(db)) as source, \
            contextlib.closing(sqlite3.connect(backup)) as target:
        source.backup(target)
    store.commit([Put(row("later", 2))])
    reader = reading(db)
    staged = directory / "staged.db"
    shutil.copy(backup, staged)
    staged.rename(db)
    with caplog.at_level("WARNING", "migblockd"):
        store.close()
    reader.close()
    assert caplog.messages[-1].startswith(
        f"stopping: {db} was replaced while the daemon ran: its log, which could not be "
        "emptied (another program reads the database), is removed from there, so that the "
        "next start replays nothing into another file; what it kept (2 blockers) is saved "
        "as "), caplog.messages
    assert not (directory / "state.db-wal").exists()
    with Store.open(directory) as again:
        assert [b.id for b in again.load().blockers] == ["backed-up"]
    [copy] = rescued_copies(db)
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        if (directory / name).exists():
            (directory / name).rename(tmp_path / name)
    copy.rename(db)
    with Store.open(directory) as again:
        assert [b.id for b in again.load().blockers] == ["backed-up", "later"]


@pytest.mark.parametrize("stays", [False, True], ids=["reader-leaves", "reader-stays"])
def test_a_database_moved_away_while_read_loses_nothing_at_the_stop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, stays: bool) -> None:
    # Found by review: a moved-away state.db still has a name, so the stop made no
    # copy; a reader kept its log from being emptied, and the stop removed the log
    # all the same: moved back, the file held none of the acknowledged blockers.
    directory = tmp_path / "state"
    db, wal = directory / "state.db", directory / "state.db-wal"
    store = Store.open(directory)
    store.commit([Put(row("b0", 1))])
    reader = reading(db)
    for n in (1, 2):
        store.commit([Put(row(f"acked{n}", n + 1))])
    db.rename(tmp_path / "state.db.old")
    sizes = []
    for n in (3, 4):  # refused: each tries to fold the log, which the reader holds back
        with pytest.raises(StateError):
            store.commit([Put(row("no", 9))])
        sizes.append(wal.stat().st_size)
        if n == 3 and not stays:
            reader.execute("COMMIT")  # lets go: the next refusal folds it
    with caplog.at_level("WARNING", "migblockd"):
        store.close()
    reader.close()
    assert caplog.messages[-1].startswith(
        f"stopping: {db} was moved away while the daemon ran: "), caplog.messages
    if stays:
        # Never folded: the file moved away lacks the log's changes, which the copy has,
        # and the log, removed, replays nothing.
        assert sizes[0] > 0 and sizes[1] > 0, sizes
        [copy] = rescued_copies(db)
        assert not wal.exists()
        copy.rename(db)
    else:
        # The first refusal could not fold the log (a reader), the next one did: the
        # file moved away holds every acknowledged change.
        assert sizes[0] > 0 and sizes[1] == 0, sizes
        assert rescued_copies(db) == []
        (tmp_path / "state.db.old").rename(db)
    with Store.open(directory) as again:
        assert [b.id for b in again.load().blockers] == ["b0", "acked1", "acked2"]
