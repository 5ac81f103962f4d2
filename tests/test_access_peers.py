"""Whose a connection is: the uid that called ``connect()``, as ``SO_PEERCRED`` says.

Real uids (``setpriv``), a real daemon on a real socket: a connected socket
passed to a process of another uid (``SCM_RIGHTS``) stays the connector's, both
ways, and a client in a user namespace of its own, root there, is its user on
the host (the kernel maps the uid into the daemon's namespace); and a daemon in a
user namespace of its own that does not map a client's gid gives the gid the kernel
reports then (the overflow gid) no role.  docs/access.md says so; these keep it so.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, assert_clean_log
from otheruids import HERE, NAMELESS_GID, Account, UidClient, client_python

#: Run as another uid: connect to the daemon (argv[1]) and pass the connected socket,
#: unread, over the Unix socket inherited as descriptor argv[2]; or, with argv[3],
#: receive one there and run the request argv[3] on it, printing the reply.
PASSER = """\
import json, socket, sys
chan = socket.socket(fileno=int(sys.argv[2]))
if len(sys.argv) == 3:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    socket.send_fds(chan, [b"x"], [sock.fileno()])
else:
    _, fds, _, _ = socket.recv_fds(chan, 1, 1)
    reader = socket.socket(fileno=fds[0]).makefile("rwb")
    reader.write(sys.argv[3].encode() + b"\\n")
    reader.flush()
    reply = json.loads(reader.readline())
    while "event" in reply:  # its own BLOCKER_DELETED comes first
        reply = json.loads(reader.readline())
    print(json.dumps(reply))
"""


@pytest.fixture
def sockdir(short_tmp: Path) -> Path:
    short_tmp.chmod(0o755)  # every test uid must reach the socket and the script
    (short_tmp / "passer.py").write_text(PASSER)
    (short_tmp / "passer.py").chmod(0o644)
    return short_tmp


def _as(account: Account, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["setpriv", f"--reuid={account.uid}", f"--regid={account.gid}",
                             "--clear-groups", *argv], cwd="/", **kw)


def _request(reader: Any, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
    reader.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
    reader.flush()
    while True:
        reply: dict[str, Any] = json.loads(reader.readline())
        if "event" not in reply:
            return reply


def test_a_connection_passed_to_another_uids_process_stays_the_connectors(
        start_daemon: Callable[..., DaemonProcess], sockdir: Path,
        accounts: dict[str, Account]) -> None:
    daemon = start_daemon("--socket-mode", "0666", "--ephemeral", socket=sockdir / "s.sock")
    alice = accounts["mbt-alice"]
    root = socket.socket(socket.AF_UNIX)
    root.connect(str(daemon.socket))
    mine = root.makefile("rwb")
    json.loads(mine.readline())
    assert _request(mine, "qmp_capabilities", {}) == {"return": {}}
    assert "return" in _request(mine, "add-blocker", {"reason": "root's", "id": "vfio0"})

    # Alice's connection, handed to root's process: still alice's.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        passer = _as(alice, client_python(), "-I", str(sockdir / "passer.py"),
                     str(daemon.socket), str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        assert passer.wait(10) == 0
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    passed = socket.socket(fileno=fds[0]).makefile("rwb")
    json.loads(passed.readline())
    assert _request(passed, "qmp_capabilities", {}) == {"return": {}}
    assert _request(passed, "del-blocker", {"id": "vfio0"})["error"]["desc"] == (
        f"Permission denied: del-blocker of blocker 'vfio0', which belongs to uid 0 (root), "
        f"needs role admin, but uid {alice.uid} (mbt-alice) has role client")

    # Root's connection, handed to alice's process: still root's (an admin's).
    ours, theirs = socket.socketpair()
    with ours, theirs:
        passer = _as(alice, client_python(), "-I", str(sockdir / "passer.py"),
                     str(daemon.socket), str(theirs.fileno()),
                     json.dumps({"execute": "del-blocker", "arguments": {"id": "vfio0"}}),
                     pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE)
        socket.send_fds(ours, [b"x"], [root.fileno()])
        out, _ = passer.communicate(timeout=10)
    assert json.loads(out) == {"return": {}}
    daemon.wait_for_log(re.compile(r"\(pid \d+, uid 0, gid 0\): deleted blocker vfio0\n"))
    assert_clean_log(daemon)


def _user_namespaces() -> bool:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "unshare", "--user", "--map-root-user", "true"],
                          capture_output=True, cwd="/").returncode == 0


@pytest.mark.skipif(not _user_namespaces(), reason="no unprivileged user namespaces here")
def test_root_of_a_user_namespace_of_its_own_is_its_user_on_the_host(
        start_daemon: Callable[..., DaemonProcess], sockdir: Path,
        accounts: dict[str, Account], uid_client_script: Path) -> None:
    daemon = start_daemon("--socket-mode", "0666", "--ephemeral", socket=sockdir / "s.sock")
    alice = accounts["mbt-alice"]
    root = UidClient(uid_client_script, daemon.socket, 0, 0)
    root.ok("add-blocker", {"reason": "root's", "id": "vfio0"})
    namespace = ("unshare", "--user", "--map-root-user")
    inside = _as(alice, *namespace, client_python(), "-I", "-c",
                 "import os; print(os.getuid(), os.getgid())", stdout=subprocess.PIPE)
    assert inside.communicate(timeout=10)[0].split() == [b"0", b"0"]  # root in there
    client = UidClient(uid_client_script, daemon.socket, alice.uid, alice.gid,
                       through=namespace)
    try:
        added = client.ok("add-blocker", {"reason": "alice's", "id": "vfio1"})
        assert (added["owner"]["uid"], added["owner"]["gid"]) == (alice.uid, alice.gid)
        assert added["owner"]["user"] == "mbt-alice"
        assert client.error("del-blocker", {"id": "vfio0"}) == (
            f"Permission denied: del-blocker of blocker 'vfio0', which belongs to uid 0 "
            f"(root), needs role admin, but uid {alice.uid} (mbt-alice) has role client")
        assert client.error("migrate", {"uri": "tcp:h:1"}) == (
            f"Permission denied: migrate needs role operator, but uid {alice.uid} "
            "(mbt-alice) has role client")
    finally:
        client.close()
        root.close()
    assert [b["id"] for b in UidClient(uid_client_script, daemon.socket, 0, 0)
            .ok("query-blockers")] == ["vfio0", "vfio1"]
    assert_clean_log(daemon)


def _python_in(sockdir: Path, uid_map: str, gid_map: str) -> str:
    """What runs the daemon's Python in a user namespace of these maps (userns_exec.py)."""
    wrapper = sockdir / "python-in-userns"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "userns_exec.py"} '
                       f'"{uid_map}" "{gid_map}" {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_a_gid_the_daemons_namespace_does_not_map_gets_no_groups_role(
        start_daemon: Callable[..., DaemonProcess], sockdir: Path,
        accounts: dict[str, Account], uid_client_script: Path) -> None:
    # Reproduced first: in a user namespace that maps the host's uids but not alice's
    # gid, the kernel reports gid 65534 (the overflow gid) for her, and she got the
    # role of the group that has that number there (nogroup): operator.
    config = sockdir / "migblockd.toml"
    config.write_text(f'[access]\ngroups = {{ nogroup = "operator", {NAMELESS_GID} = '
                      '"operator" }\n')
    python = _python_in(sockdir, "0 0 65536", f"0 0 1,{NAMELESS_GID} {NAMELESS_GID} 1")
    daemon = start_daemon("--socket-mode", "0666", "--ephemeral", "--config", str(config),
                          socket=sockdir / "s.sock", python=python)
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    unmapped = UidClient(uid_client_script, daemon.socket, alice.uid, alice.gid)
    mapped = UidClient(uid_client_script, daemon.socket, bob.uid, NAMELESS_GID)
    try:
        added = unmapped.ok("add-blocker", {"reason": "alice's", "id": "vfio0"})
        assert added["owner"]["gid"] == 65534  # as the kernel reported it
        assert unmapped.error("migrate_cancel") == (
            f"Permission denied: migrate_cancel needs role operator, but uid {alice.uid} "
            "(mbt-alice) has role client")
        assert mapped.ok("migrate_cancel") == {}  # a reported gid the namespace maps counts
    finally:
        unmapped.close()
        mapped.close()
    daemon.wait_for_log(
        f"WARNING: {config}:2: access: the policy gives group 'nogroup' role operator, but "
        "this daemon's user namespace does not map every gid, and the kernel reports gid "
        "65534 for each it does not map: a client whose reported gid it is gets the role "
        "only if the group database puts its user in the group\n")
    assert daemon.log().count("does not map every gid") == 1  # not for the mapped gid
    assert_clean_log(daemon)
