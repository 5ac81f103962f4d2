"""Clients that really are other users: accounts in the host's databases, and ``setpriv``.

The test suite runs as root.  :func:`ensure_accounts` creates the users and
groups the access tests name (idempotent: they are left in place for the next
run, and a concurrent run that creates them first is fine), and
:class:`UidClient` runs ``tests/uidclient.py`` under ``setpriv --reuid --regid
--clear-groups`` (or ``--groups``), so that the daemon's ``SO_PEERCRED`` sees
that uid and gid, and only the group database can add supplementary groups.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import json
import os
import pwd
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT = 10.0

#: Groups, then users with the supplementary groups the group database gives them.
GROUPS = ("mbt-admins", "mbt-operators", "mbt-sock")
USERS: dict[str, tuple[str, ...]] = {
    "mbt-alice": (),
    "mbt-bob": (),
    "mbt-carol": ("mbt-admins",),
    "mbt-dave": (),
    "mbt-olga": (),
}
#: A group whose name is a number that is not its gid (groupadd allows it).
NUMBER_NAMED_GROUP = "3999996"
#: Subordinate uids (/etc/subuid) of mbt-olga: hers to setuid() to in a user namespace.
OLGA_SUBUIDS = range(3_800_000, 3_800_100)
#: And her subordinate gids (/etc/subgid), hers to setgid() to there.
OLGA_SUBGIDS = range(3_800_000, 3_800_100)
#: An account whose uid is one of mbt-olga's subordinate uids: an overlap useradd never
#: makes and an administrator may (useradd --uid), so she can become that user.
OVERLAPPED = "mbt-sam"
OVERLAPPED_UID = OLGA_SUBUIDS[50]
#: uids and a gid that no database names (a uid the policy only knows by number).
NAMELESS_UID = 3_999_998
NAMELESS_UID2 = 3_999_997
NAMELESS_GID = 3_999_998


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int  # the primary group


def _run_until(exists: Any, argv: list[str]) -> None:
    """Run a useradd/groupadd/usermod command until ``exists()`` (its files may be locked
    by a concurrent run for a moment)."""
    for _ in range(50):
        if exists():
            return
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if exists():
            return
        time.sleep(0.1)
    raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr}")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def bare_uid() -> int:
    """A uid no account has (no name, no home): a container's ``--user``."""
    for uid in range(23456, 24000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("every uid from 23456 to 23999 has an account")


def _has_subordinates(path: str, user: str, start: int) -> bool:
    try:
        with open(path, encoding="utf-8") as lines:
            return any(line.split(":")[:2] == [user, str(start)] for line in lines)
    except FileNotFoundError:
        return False


def _member(user: str, group: str) -> bool:
    return user in grp.getgrnam(group).gr_mem


def ensure_accounts() -> dict[str, Account]:
    """The test users and groups, created when missing."""
    shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    for group in (*GROUPS, NUMBER_NAMED_GROUP):
        _run_until(functools.partial(_group_exists, group), ["groupadd", "--system", group])
    for user, groups in USERS.items():
        _run_until(functools.partial(_user_exists, user),
                   ["useradd", "--system", "--no-create-home", "--user-group",
                    "--shell", shell, user])
        for group in groups:
            _run_until(functools.partial(_member, user, group),
                       ["usermod", "--append", "--groups", group, user])
    _run_until(functools.partial(_user_exists, OVERLAPPED),
               ["useradd", "--system", "--no-create-home", "--user-group", "--uid",
                str(OVERLAPPED_UID), "--shell", shell, OVERLAPPED])
    for path, ids, option in (("/etc/subuid", OLGA_SUBUIDS, "--add-subuids"),
                              ("/etc/subgid", OLGA_SUBGIDS, "--add-subgids")):
        # usermod grants ranges only in a file that exists (a container may have none).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        _run_until(functools.partial(_has_subordinates, path, "mbt-olga", ids[0]),
                   ["usermod", option, f"{ids[0]}-{ids[-1]}", "mbt-olga"])
    accounts = {}
    for user in (*USERS, OVERLAPPED):
        entry = pwd.getpwnam(user)
        accounts[user] = Account(user, entry.pw_uid, entry.pw_gid)
    for group in GROUPS:
        accounts[group] = Account(group, -1, grp.getgrnam(group).gr_gid)
    return accounts


@functools.cache
def client_python() -> str:
    """A Python that other uids may run (the project's venv may sit in root's home)."""
    for candidate in ("/usr/bin/python3", getattr(sys, "_base_executable", None),
                      sys.executable, shutil.which("python3")):
        if not candidate:
            continue
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", candidate, "-I",
             "-c", "import errno, json, socket, threading"],
            capture_output=True, timeout=30, cwd="/")
        if proc.returncode == 0:
            return candidate
    raise AssertionError("no Python interpreter here can be run by uid 65534")


class UidClient:
    """``tests/uidclient.py`` as ``uid``/``gid``: one QMP connection, driven line by line.

    ``groups`` are its supplementary groups (none by default: ``--clear-groups``).
    After connecting, ``greeting`` is the greeting, or ``connect_error`` says why
    the connection failed (``{"connect-error": "EACCES", "desc": ...}``).
    """

    def __init__(self, script: Path, socket: Path, uid: int, gid: int,
                 groups: Sequence[int] = (), *, negotiate: bool = True,
                 through: Sequence[str] = ()) -> None:
        drop = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
        self.uid, self.gid = uid, gid
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        # through: what runs the client's Python (unshare, to connect from a namespace).
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={gid}", drop, *through, client_python(),
             "-I", str(script), str(socket)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd="/")
        self.pid = self.proc.pid  # setpriv execs the client: the pid SO_PEERCRED reports
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        first = self.read()
        self.connect_error: dict[str, Any] | None = first if "connect-error" in first else None
        self.greeting = first if self.connect_error is None else {}
        if negotiate and self.connect_error is None:
            reply = self.execute("qmp_capabilities")
            assert reply == {"return": {}}, reply

    def read(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"uid {self.uid}: nothing within {timeout} s; "
                                     f"stderr: {self._stderr()}")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError(f"uid {self.uid}: the client exited; stderr: {self._stderr()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; its reply (events that come first go to ``events``)."""
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        while True:
            message = self.read()
            if "event" not in message:
                return message
            self.events.append(message)

    def ok(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        reply = self.execute(command, arguments)
        assert "return" in reply, reply
        return reply["return"]

    def error(self, command: str, arguments: dict[str, Any] | None = None) -> str:
        """Run a command that must fail with GenericError; its desc."""
        reply = self.execute(command, arguments)
        assert reply.get("error", {}).get("class") == "GenericError", reply
        desc: str = reply["error"]["desc"]
        return desc

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()

    def _stderr(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]


@pytest.fixture(scope="session")
def accounts() -> dict[str, Account]:
    return ensure_accounts()


@pytest.fixture(scope="session")
def uid_client_script() -> Iterator[Path]:
    """``uidclient.py`` copied where every uid can read it."""
    where = Path(tempfile.mkdtemp(prefix="migblockd-uidclient-", dir="/tmp"))
    where.chmod(0o755)
    script = where / "uidclient.py"
    shutil.copyfile(HERE / "uidclient.py", script)
    script.chmod(0o644)
    yield script
    shutil.rmtree(where, ignore_errors=True)
