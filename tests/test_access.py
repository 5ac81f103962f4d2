"""The access policy as pure logic: roles per command, the [access] table, uid -> role.

Resolution through the user and group databases uses the test accounts
(``otheruids.ensure_accounts``), which are real entries of this host's databases.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from otheruids import NAMELESS_GID, NAMELESS_UID, Account

from migblockd.access import AccessTable, GroupName, Policy, Role, needed_role
from migblockd.config import Config, ConfigError, read_file
from migblockd.contract import Contract
from migblockd.peer import peer_owner
from migblockd.resolver import CACHE_SIZE, Resolver, group_id

OBSERVER, CLIENT, OPERATOR, ADMIN = Role.OBSERVER, Role.CLIENT, Role.OPERATOR, Role.ADMIN
DAEMON_UID = 4_000_000  # a daemon uid no test client has


def test_every_command_of_the_schema_needs_the_role_the_issue_gives_it() -> None:
    roles = {name: str(needed_role(name)) for name in Contract.load().commands}
    assert roles == {
        "qmp_capabilities": "observer", "query-version": "observer",
        "query-commands": "observer", "query-qmp-schema": "observer",
        "add-blocker": "client", "del-blocker": "client", "query-blockers": "observer",
        "migrate": "operator", "migrate_cancel": "operator", "query-migrate": "observer",
        "migrate-set-parameters": "operator", "query-migrate-parameters": "observer",
        "migrate-set-capabilities": "operator", "query-migrate-capabilities": "observer",
    }


@pytest.mark.parametrize(("command", "role"), [
    ("query-anything-new", OBSERVER),       # a new query is readable at once
    ("human-monitor-command", ADMIN),       # anything else is closed until decided
    ("quit", ADMIN),
    ("stop", ADMIN),
    ("queryblockers", ADMIN),               # the prefix includes its dash
])
def test_commands_not_in_the_table_are_derived(command: str, role: Role) -> None:
    assert needed_role(command) == role


def test_roles_are_ordered_and_named() -> None:
    assert OBSERVER < CLIENT < OPERATOR < ADMIN
    assert [str(r) for r in Role] == ["observer", "client", "operator", "admin"]


# -- the [access] table ---------------------------------------------------------------


def test_the_access_table_is_read_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[access]\ndefault-role = "observer"\n'
                    '[access.users]\nalice = "operator"\n0100 = "admin"\n'
                    '[access.groups]\nwheel = "admin"\n"qemu.users" = "client"\n')
    policy = read_file(path)["access"]
    assert policy == Policy.of(OBSERVER, {"alice": OPERATOR, 100: ADMIN},
                               {"wheel": ADMIN, "qemu.users": CLIENT})
    assert Config(access=policy).access.default_role is OBSERVER


def test_an_empty_access_table_is_the_default_policy() -> None:
    assert AccessTable()({}) == Policy() == Policy.of(CLIENT)


def test_the_policy_is_shown_as_an_inline_table_that_reads_back() -> None:
    policy = Policy.of(OPERATOR, {"a.b": CLIENT, 7: ADMIN, "o'x": OBSERVER}, {"g": ADMIN})
    assert str(policy) == ("{default-role = 'operator', users = {7 = 'admin', 'a.b' = "
                           "'client', \"o'x\" = 'observer'}, groups = {g = 'admin'}}")
    assert AccessTable()(str(policy)) == policy


# Each named with its own line, not its table's header (found by review).
@pytest.mark.parametrize(("text", "message"), [
    ('access = 1\n', "1: access must be a table \\(\\[access\\]\\), not 1"),
    ('[access]\nroles = {}\n',
     "2: access has an unknown key 'roles' \\(it takes default-role, users, groups\\)"),
    ('[access]\ndefault-role = "root"\n',
     "2: access default-role must be one of observer, client, operator, admin, not 'root'"),
    ('[access]\nusers = ["alice"]\n',
     "2: access users must be a table of names or numbers to roles, not an array"),
    ('[access.users]\nalice = "boss"\n',
     "2: access users.alice must be one of observer, client, operator, admin, not 'boss'"),
    ('[access.groups]\nwheel = 3\n', "2: access groups.wheel must be one of .*, not 3"),
    ('[access.users]\n"" = "admin"\n', "2: access users has an invalid name ''"),
    ('[access.users]\n" bob" = "admin"\n', "2: access users has an invalid name ' bob'"),
    # One uid, two roles: which would win was down to how the entries sorted.
    ('[access.users]\n0100 = "admin"\n100 = "client"\n',
     "3: access users.100 is users.0100 again \\(both are uid 100\\); give it once"),
    ('[access.groups]\n7 = "admin"\n007 = "observer"\n',
     "3: access groups.007 is groups.7 again \\(both are gid 7\\); give it once"),
    ('[access]\ndefault_role = "observer"\ndefault-role = "admin"\n',
     "3: access default-role is default_role again \\(an underscore stands for a dash\\); "
     "give it once"),
    ('[access.users]\n4294967295 = "admin"\n',
     "2: access users.4294967295 must be a uid of at most 4294967294"),
    ('[access.groups]\n99999999999999999999 = "admin"\n',
     "2: access groups.99999999999999999999 must be a gid of at most 4294967294"),
])
def test_a_bad_access_table_names_what_is_wrong(tmp_path: Path, text: str,
                                                message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}:{message}$"):
        read_file(path)


@pytest.mark.parametrize(("value", "result"), [("wheel", "wheel"), ("100", "100"), (100, "100")])
def test_socket_group_takes_a_name_or_a_number(value: object, result: str) -> None:
    assert GroupName()(value) == result


@pytest.mark.parametrize("value", ["", " wheel", "a:b", "a\nb", -1, True, 1.5])
def test_socket_group_refuses_what_cannot_be_a_group(value: object) -> None:
    with pytest.raises(ValueError, match="must be a group name or number"):
        GroupName()(value)


# -- resolution -------------------------------------------------------------------------


def test_root_and_the_daemons_uid_are_admin_whatever_the_policy_says() -> None:
    r = Resolver(Policy.of(OBSERVER, {0: OBSERVER, DAEMON_UID: OBSERVER}), DAEMON_UID)
    assert r.role(0, 0) is ADMIN
    assert r.role(DAEMON_UID, 5) is ADMIN
    assert r.role(NAMELESS_UID, NAMELESS_GID) is OBSERVER


def test_unknown_credentials_get_the_default_role() -> None:
    assert Resolver(Policy.of(OPERATOR), DAEMON_UID).role(None) is OPERATOR


def test_users_by_number_and_by_name(accounts: dict[str, Account]) -> None:
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    r = Resolver(Policy.of(users={"mbt-alice": OPERATOR, bob.uid: OBSERVER}), DAEMON_UID)
    assert r.role(alice.uid, alice.gid) is OPERATOR
    assert r.role(bob.uid, bob.gid) is OBSERVER
    assert r.role(accounts["mbt-dave"].uid, 0) is CLIENT

    # The number's entry hides the name's: said at start and reload (the guard warns).
    twice = Resolver(Policy.of(users={"mbt-alice": OPERATOR, alice.uid: CLIENT,
                                      "mbt-bob": OBSERVER, bob.uid: OBSERVER}), DAEMON_UID)
    assert twice.role(alice.uid, alice.gid) is CLIENT
    assert twice.shadowed() == [(
        ("users", "mbt-alice"), f"user 'mbt-alice' role operator and its uid {alice.uid} "
        "role client")]


def test_a_subordinate_uid_gets_at_most_its_owners_role(
        accounts: dict[str, Account], tmp_path: Path) -> None:
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    subuid = tmp_path / "subuid"
    # By name and by number, as subuid(5) allows; a broken line is skipped.
    subuid.write_text(f"mbt-alice:5000000:10\n{bob.uid}:5000100:10\nbroken\nx:y:z\n")
    r = Resolver(Policy.of(CLIENT, users={"mbt-alice": OBSERVER, bob.uid: ADMIN,
                                          5000001: OPERATOR}), DAEMON_UID, str(subuid))
    assert r.role(5000000, 5000000) is OBSERVER       # alice's: not more than hers
    assert r.role(5000001, 5000001) is OPERATOR       # an entry of its own decides
    assert r.role(5000105, 5000105) is CLIENT         # bob's: not more than the default
    assert r.role(5000010, 5000010) is CLIENT         # past alice's range
    assert r.owner_of(5000009) == alice.uid
    assert Resolver(Policy.of(CLIENT, users={"mbt-alice": OBSERVER}), DAEMON_UID,
                    str(tmp_path / "none")).role(5000000, 5000000) is CLIENT


def test_subordinate_ranges_are_read_as_newuidmap_reads_them(
        accounts: dict[str, Account], tmp_path: Path) -> None:
    # Found by review: shadow-utils reads a range's start and count with strtoul()
    # in base 0 (lib/subordinateio.c, getulong()/str2ul()), so hexadecimal and
    # octal ranges are granted by newuidmap; read as decimal only, a hexadecimal
    # range was nobody's here, and its uids escaped the owner's role and quotas.
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    subuid = tmp_path / "subuid"
    subuid.write_text(f"mbt-alice:0x4C4B40:0xA\n"       # 5000000, 10 uids
                      f"{bob.uid}:023047400:012\n"      # octal: 5000960, 10 uids
                      "mbt-carol: +5000200:10\n"        # strtoul skips blanks, takes +
                      "mbt-dave:0x:10\nmbt-dave:5000300:-1\nmbt-dave:08:1\n"  # refused
                      "mbt-dave:5000400:18446744073709551616\n")  # past ULONG_MAX
    r = Resolver(Policy.of(CLIENT, users={"mbt-alice": OBSERVER, "mbt-carol": OBSERVER,
                                          "mbt-dave": OBSERVER}),
                 DAEMON_UID, str(subuid))
    assert r.owner_of(5000009) == alice.uid
    assert r.role(5000000, 5000000) is OBSERVER and r.role(5000009, 5000009) is OBSERVER
    assert r.owner_of(5000010) is None
    assert r.owner_of(5000960) == bob.uid and r.owner_of(5000969) == bob.uid
    assert r.owner_of(23047400) is None and r.owner_of(5000970) is None
    assert r.owner_of(5000200) == accounts["mbt-carol"].uid
    assert r.role(5000200, 5000200) is OBSERVER
    for uid in (0, 8, 5000300, 5000400):
        assert r.owner_of(uid) is None


def test_a_subordinate_gid_reported_for_a_connection_gives_at_most_its_owners_role(
        accounts: dict[str, Account], tmp_path: Path) -> None:
    # Found by review: a user can make the gid the kernel reports any gid of their
    # /etc/subgid range (newgidmap), and a groups entry for such a gid gave its role.
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    subgid = tmp_path / "subgid"
    subgid.write_text(f"mbt-alice:5000000:10\n{bob.uid}:5000100:10\n")
    policy = Policy.of(CLIENT, users={"mbt-alice": OBSERVER},
                       groups={5000005: ADMIN, 5000105: OPERATOR, 5000200: OPERATOR,
                               alice.gid: OPERATOR})
    r = Resolver(policy, DAEMON_UID, str(tmp_path / "none"), str(subgid))
    assert r.role(alice.uid, 5000005) is OBSERVER  # her entry decides (step 2)
    assert r.role(bob.uid, 5000105) is CLIENT      # his own gid: no more than his role
    assert r.role(bob.uid, 5000005) is OBSERVER    # alice's: no more than hers
    assert r.role(bob.uid, 5000200) is OPERATOR    # nobody's: the gid's entry
    # A group the user is a member of in the database gives its role whatever the
    # gid reported (here bob reports one of alice's subordinate gids).
    assert Resolver(Policy.of(CLIENT, groups={bob.gid: OPERATOR, 5000005: ADMIN}),
                    DAEMON_UID, str(tmp_path / "none"), str(subgid)
                    ).role(bob.uid, 5000005) is OPERATOR
    # Without the file, the reported gid's entry, as before.
    assert Resolver(policy, DAEMON_UID, str(tmp_path / "none"), str(tmp_path / "none")
                    ).role(bob.uid, 5000005) is ADMIN


def test_an_id_in_overlapping_ranges_gets_at_most_the_least_of_its_owners_roles(
        accounts: dict[str, Account], tmp_path: Path) -> None:
    # Found by review: only the range that starts last was looked at, so a gid (or
    # uid) also in an admin's range took the admin's cap, whoever else could use it.
    alice, carol = accounts["mbt-alice"], accounts["mbt-carol"]
    ranges = tmp_path / "ranges"
    ranges.write_text("mbt-alice:5000000:100\nmbt-carol:5000050:100\n")
    policy = Policy.of(CLIENT, users={"mbt-carol": ADMIN, 5000060: ADMIN},
                       groups={5000060: ADMIN, 5000120: ADMIN})
    r = Resolver(policy, DAEMON_UID, str(ranges), str(ranges))
    assert r.role(alice.uid, 5000060) is CLIENT   # alice's and carol's: the least
    assert r.role(alice.uid, 5000120) is ADMIN    # carol's only
    assert r.role(5000070, 5000070) is CLIENT     # a uid of both, named by nobody
    assert r.role(5000060, 5000060) is ADMIN      # named: its entry decides (step 2)
    assert r.owner_of(5000070) == carol.uid       # the count: the last range's user


EXHAUSTED = """
import json, os, resource, sys
from migblockd.access import Policy, Role
from migblockd.resolver import Resolver
uid = int(sys.argv[1])
r = Resolver(Policy.of(Role.OPERATOR, users={sys.argv[2]: Role.OBSERVER}), 0x7fffffff)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
during = r.role(uid, uid)  # getpwuid() cannot open /etc/passwd: "no such user"
for fd in held:
    os.close(fd)
print(json.dumps([str(during), str(r.role(uid, uid))]))
"""


def test_a_lookup_that_failed_for_want_of_descriptors_is_not_kept(
    accounts: dict[str, Account],
) -> None:
    # Reported: out of file descriptors, a user named in the policy got the
    # default role, and kept it once descriptors were free again, until a reload.
    bob = accounts["mbt-bob"]
    proc = subprocess.run([sys.executable, "-c", EXHAUSTED, str(bob.uid), bob.name],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    during, after = json.loads(proc.stdout)
    assert after == "observer"
    # While it lasts, the C library cannot tell us: noted in docs/access.md.
    assert during in ("observer", "operator")


def test_groups_by_database_membership_primary_group_and_the_connections_gid(
        accounts: dict[str, Account]) -> None:
    carol, alice = accounts["mbt-carol"], accounts["mbt-alice"]
    admins = accounts["mbt-admins"].gid
    r = Resolver(Policy.of(OBSERVER, groups={"mbt-admins": ADMIN, "mbt-alice": OPERATOR}),
                 DAEMON_UID)
    assert r.role(carol.uid, carol.gid) is ADMIN         # supplementary, from /etc/group
    assert r.role(alice.uid, NAMELESS_GID) is OPERATOR   # its primary group, by name
    assert r.role(NAMELESS_UID, admins) is ADMIN         # the gid SO_PEERCRED reported
    assert r.role(NAMELESS_UID, NAMELESS_GID) is OBSERVER
    by_number = Resolver(Policy.of(OBSERVER, groups={admins: OPERATOR}), DAEMON_UID)
    assert by_number.role(carol.uid, carol.gid) is OPERATOR


def test_a_user_entry_wins_over_groups_and_the_highest_group_wins(
        accounts: dict[str, Account]) -> None:
    carol = accounts["mbt-carol"]
    policy = Policy.of(groups={"mbt-admins": ADMIN, "mbt-carol": OBSERVER})
    assert Resolver(policy, DAEMON_UID).role(carol.uid, carol.gid) is ADMIN
    demoted = Policy.of(users={"mbt-carol": OBSERVER}, groups={"mbt-admins": ADMIN})
    assert Resolver(demoted, DAEMON_UID).role(carol.uid, carol.gid) is OBSERVER


def test_a_group_named_by_number_and_by_name_has_the_higher_of_its_roles(
        accounts: dict[str, Account]) -> None:
    # The number's entry used to hide the name's: mbt-carol, in mbt-admins, was an observer.
    carol, admins = accounts["mbt-carol"], accounts["mbt-admins"].gid
    for policy in (Policy.of(groups={"mbt-admins": ADMIN, admins: OBSERVER}),
                   Policy.of(groups={"mbt-admins": OBSERVER, admins: ADMIN})):
        assert Resolver(policy, DAEMON_UID).role(carol.uid, carol.gid) is ADMIN


def test_the_cache_is_bounded() -> None:
    r = Resolver(Policy.of(OBSERVER, {NAMELESS_UID: ADMIN}), DAEMON_UID)
    for uid in range(5_000_000, 5_000_000 + CACHE_SIZE + 10):
        r.role(uid, uid)
    assert len(r._cache) <= CACHE_SIZE
    assert r.role(NAMELESS_UID, NAMELESS_GID) is ADMIN


def test_names_the_databases_do_not_know_are_reported(accounts: dict[str, Account]) -> None:
    r = Resolver(Policy.of(users={"mbt-alice": ADMIN, "mbt-ghost": ADMIN, 5: ADMIN},
                           groups={"mbt-admins": ADMIN, "mbt-nogroup": ADMIN}), DAEMON_UID)
    assert r.unknown_names() == [(("users", "mbt-ghost"), "user 'mbt-ghost'"),
                                 (("groups", "mbt-nogroup"), "group 'mbt-nogroup'")]
    assert group_id("mbt-admins") == accounts["mbt-admins"].gid
    assert group_id("12345") == 12345
    assert group_id("mbt-nogroup") is None


@pytest.mark.parametrize("doc", ["README.md", "docs/access.md"])
def test_the_documented_access_tables_are_valid(tmp_path: Path, doc: str) -> None:
    text = (Path(__file__).resolve().parent.parent / doc).read_text(encoding="utf-8")
    examples = re.findall(r"```toml\n(\[access\].*?)```", text, re.S)
    assert examples
    for example in examples:
        path = tmp_path / "m.toml"
        path.write_text(example)
        policy = read_file(path)["access"]
        assert isinstance(policy, Policy) and policy != Policy()


class _PeerSocket:
    """A socket whose SO_PEERCRED is a peer with uid and gid 4294967294."""

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return struct.pack("=iII", 4242, 4294967294, 4294967294)


class _Transport:
    def get_extra_info(self, name: str) -> object:
        return _PeerSocket() if name == "socket" else None


def test_a_uid_past_2_to_the_31_is_read_unsigned() -> None:
    # uid_t is unsigned: read signed, nfsnobody's 4294967294 was -2, an owner the
    # next start refused to restore ("which no process has").
    owner = peer_owner(_Transport())  # type: ignore[arg-type]
    assert owner is not None
    assert (owner.pid, owner.uid, owner.gid) == (4242, 4294967294, 4294967294)
