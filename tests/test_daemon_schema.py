"""MigMode is the single source of truth, end to end: a daemon serving an edited copy
of the schema accepts, introspects and enforces a new migration mode with no code change."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, assert_start_refused
from qemu_strings import DEFAULT_PARAMETERS, GENERIC
from qmpclient import RawClient

from migblockd.contract import schema_dir
from migblockd.startup import EXIT_NOTCONFIGURED
from migblockd.state import BlockerRow, Put, Setting, Store
from migblockd.state.schema import MIGRATIONS

OLD = "'data': [ 'normal', 'cpr-reboot', 'cpr-transfer', 'cpr-exec' ] }"
NEW = "'data': [ 'normal', 'cpr-reboot', 'cpr-transfer', 'cpr-exec', 'cpr-test' ] }"
DOC_ANCHOR = "#\n# Since: 0.1\n##\n{ 'enum': 'MigMode',"


def schema_with_new_mode(tmp_path: Path) -> Path:
    copy = tmp_path / "schema"
    shutil.copytree(schema_dir(), copy, ignore=shutil.ignore_patterns("generated"))
    migration = copy / "migration.json"
    text = migration.read_text(encoding="utf-8")
    assert text.count(OLD) == 1 and text.count(DOC_ANCHOR) == 1
    text = text.replace(OLD, NEW)
    text = text.replace(DOC_ANCHOR, "#\n# @cpr-test: A mode added by a test.\n" + DOC_ANCHOR)
    migration.write_text(text, encoding="utf-8")
    return copy / "migblockd.json"


async def test_daemon_serves_a_mode_added_only_to_the_schema(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    daemon = start_daemon("--schema", str(schema_with_new_mode(tmp_path)))
    async with daemon.client() as c:
        # Introspection lists it, in MigMode's place.
        schema = await c.ok("query-qmp-schema")
        enums = [e for e in schema if e["meta-type"] == "enum" and "cpr-test" in e["values"]]
        assert [e["values"] for e in enums] == [
            ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec", "cpr-test"]
        ]
        # add-blocker accepts it; a blocker without modes blocks it too.
        info = await c.ok("add-blocker", {"reason": "only cpr-test", "modes": ["cpr-test"]})
        assert info["modes"] == ["cpr-test"]
        everywhere = await c.ok("add-blocker", {"reason": "everywhere", "id": "all"})
        assert everywhere["modes"][-1] == "cpr-test"
        # The registry keeps a list for it: migrate in that mode quotes its newest blocker.
        await c.ok("migrate-set-parameters", {"mode": "cpr-test"})
        assert await c.ok("query-migrate-parameters") == {"mode": "cpr-test", **DEFAULT_PARAMETERS}
        reply = await c.execute("migrate", {"uri": "unix:/tmp/x"}, id=1)
        assert reply == {"id": 1, "error": {"class": GENERIC, "desc": "everywhere"}}
        await c.ok("del-blocker", {"id": "all"})
        assert await c.ok("query-migrate") == {"blocked-reasons": ["only cpr-test"]}
        # Something that is still not a member is refused in QEMU's words.
        bad = await c.execute("add-blocker", {"reason": "r", "modes": ["cpr-nope"]})
        assert bad["error"]["desc"] == "Parameter 'modes[0]' does not accept value 'cpr-nope'"


async def test_daemon_refuses_a_broken_schema_with_file_line_col(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    path = schema_with_new_mode(tmp_path)
    migration = path.parent / "migration.json"
    migration.write_text(migration.read_text().replace("'cpr-test' ] }", "'cpr-test' ]"))
    daemon = start_daemon("--schema", str(path), wait=False)
    assert daemon.proc.wait(30) == EXIT_NOTCONFIGURED
    log = daemon.log()
    assert f"bad schema: {migration}:" in log
    assert "Traceback" not in log


MIGMODE = "{ 'enum': 'MigMode',\n  'data': [ 'normal', 'cpr-reboot', 'cpr-transfer', 'cpr-exec' ] }"
#: A command for each way a name finds no handler: none at all, a method of the
#: handlers that is no handler, and the dashed twin of migrate_cancel.
UNHANDLED = ("frobnicate", "migration-status", "migrate-cancel")


def schema_edited(tmp_path: Path, edit: Callable[[str], str]) -> tuple[Path, Path]:
    """A copy of the schema with ``edit`` applied to migration.json: (root, migration.json)."""
    copy = tmp_path / "schema"
    shutil.copytree(schema_dir(), copy, ignore=shutil.ignore_patterns("generated"))
    migration = copy / "migration.json"
    text = migration.read_text(encoding="utf-8")
    assert text.count(MIGMODE) == 1
    migration.write_text(edit(text), encoding="utf-8")
    return copy / "migblockd.json", migration


def line_of(path: Path, text: str) -> int:
    source = path.read_text(encoding="utf-8")
    return source[: source.index(text)].count("\n") + 1


def command(name: str) -> str:
    return f"\n##\n# @{name}:\n#\n# Not served.\n##\n{{ 'command': '{name}' }}\n"


def refused_start(tmp_path: Path, start_daemon: Callable[..., DaemonProcess],
                  root: Path) -> str:
    """The one line of a daemon that refused to start with ``root``; it bound and made nothing."""
    state = tmp_path / "state"
    daemon = start_daemon("--schema", str(root), "--state-dir", str(state), wait=False)
    assert daemon.proc.wait(30) == EXIT_NOTCONFIGURED
    log = daemon.log()
    assert "Traceback" not in log
    assert not daemon.socket.exists() and not state.exists()
    (line,) = [line for line in log.splitlines() if " DEBUG: " not in line]
    return line


async def test_daemon_refuses_a_schema_without_migmode(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # Without it there are no modes to block: a KeyError traceback.
    root, _ = schema_edited(tmp_path, lambda t: t.replace("MigMode", "MigModes"))
    line = refused_start(tmp_path, start_daemon, root)
    assert line.endswith(f" ERROR: bad schema: {root}: enum 'MigMode' is not defined; "
                         "migblockd takes the migration modes from it")


async def test_daemon_refuses_migmode_as_a_struct(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    struct = "{ 'struct': 'MigMode',\n  'data': { 'normal': 'str', 'cpr-reboot': 'str', " \
             "'cpr-transfer': 'str', 'cpr-exec': 'str' } }"
    # Its users take strings instead, so that only MigMode's kind is wrong.
    root, migration = schema_edited(tmp_path, lambda t: t.replace(MIGMODE, "STRUCT").replace(
        "'MigMode'", "'str'").replace("STRUCT", struct))
    line = refused_start(tmp_path, start_daemon, root)
    assert line.endswith(f" ERROR: bad schema: {migration}:{line_of(migration, struct)}:1: "
                         "'MigMode' must be an enum (of the migration modes)")


async def test_daemon_refuses_migmode_without_normal(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # The registry's ValueError escaped as a traceback.
    root, migration = schema_edited(tmp_path, lambda t: t.replace(
        "'data': [ 'normal', 'cpr-reboot'", "'data': [ 'cpr-reboot'").replace(
        "# @normal: Classic live migration", "# Classic live migration"))
    line = refused_start(tmp_path, start_daemon, root)
    where = line_of(migration, "{ 'enum': 'MigMode'")
    assert line.endswith(
        f" ERROR: bad schema: {migration}:{where}:1: "
        "enum 'MigMode' lacks value 'normal', the mode of a migration until "
        "migrate-set-parameters sets another")


@pytest.mark.parametrize("name", UNHANDLED)
async def test_daemon_refuses_a_command_it_has_no_handler_for(
    name: str, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # frobnicate was a LookupError traceback once the state was open; the other
    # two started, and each call was an internal error (a TypeError logged) or
    # migrate_cancel's work under another name.
    root, migration = schema_edited(tmp_path, lambda t: t + command(name))
    line = refused_start(tmp_path, start_daemon, root)
    where = line_of(migration, f"{{ 'command': '{name}' }}")
    assert line.endswith(f" ERROR: bad schema: {migration}:{where}:1: "
                         f"migblockd has no handler for command '{name}'")


def test_check_config_says_what_the_start_would(tmp_path: Path) -> None:
    root, migration = schema_edited(tmp_path, lambda t: t + command("frobnicate"))
    result = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral",
         "--socket", str(tmp_path / "s"), "--schema", str(root)],
        capture_output=True, text=True, check=False, timeout=60)
    where = line_of(migration, "{ 'command': 'frobnicate' }")
    assert (result.returncode, result.stdout) == (EXIT_NOTCONFIGURED, "")
    assert result.stderr == (f"migblockd: bad schema: {migration}:{where}:1: "
                             "migblockd has no handler for command 'frobnicate'\n")


#: MigMode with keys QEMU's generator knows and migblockd's subset does not.
MIGMODE_KEYED = MIGMODE.replace("'MigMode',", "'MigMode', 'prefix': 'MIG', 'if': 'X',")


async def test_unknown_keys_stop_the_start_with_one_line(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # QEMU's generator names every unknown key, and the valid ones on a second
    # line; the daemon's start says both on its one line, as --check-config does.
    root, migration = schema_edited(tmp_path, lambda t: t.replace(MIGMODE, MIGMODE_KEYED))
    where = line_of(migration, MIGMODE_KEYED)
    col = MIGMODE_KEYED.index("'prefix'") + 1
    said = (f"bad schema: {migration}:{where}:{col}: enum 'MigMode' has unknown keys 'if', "
            "'prefix'. Valid keys are 'data', 'enum'.")
    assert refused_start(tmp_path, start_daemon, root).endswith(f" ERROR: {said}")
    result = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral",
         "--socket", str(tmp_path / "s"), "--schema", str(root)],
        capture_output=True, text=True, check=False, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (EXIT_NOTCONFIGURED, "",
                                                                 f"migblockd: {said}\n")


INTERNAL_DOC = ("# @internal: Ignore the daemon's only-migratable setting, like QEMU's\n"
                "#     internal blockers.  Needs role operator.  Default: false.\n#\n")
ADD_BLOCKER = "{ 'command': 'add-blocker',\n  'data': { 'reason': 'str',"
#: Each edit of add-blocker or query-blockers the handlers cannot follow, with the
#: command it changes, the part, and where in its JSON Schema the change is.
RESHAPED = [
    pytest.param(lambda t: t.replace(ADD_BLOCKER, ADD_BLOCKER.replace("'str'", "'int'")),
                 "add-blocker", "arguments", "/properties/reason/type", id="argument-type"),
    pytest.param(lambda t: t.replace("'*internal': 'bool',\n            '*id'", "'*id'").replace(
        INTERNAL_DOC, ""), "add-blocker", "arguments", "/properties/internal",
                 id="removed-member"),
    pytest.param(lambda t: t.replace("'returns': [ 'BlockerInfo' ], 'allow-oob': true",
                                     "'returns': [ 'MigrationInfo' ], 'allow-oob': true"),
                 "query-blockers", "returns", "/items/$ref", id="changed-return"),
]


@pytest.mark.parametrize(("edit", "name", "part", "pointer"), RESHAPED)
async def test_daemon_refuses_a_schema_that_reshapes_a_command(
    edit: Callable[[str], str], name: str, part: str, pointer: str,
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # The handler reads the bundled arguments and returns the bundled reply: served,
    # an int reason was an internal error, an internal flag was accepted by a schema
    # that does not offer it, and every listing broke the schema clients were given.
    root, migration = schema_edited(tmp_path, edit)
    assert migration.read_text(encoding="utf-8") != (schema_dir() / "migration.json").read_text(
        encoding="utf-8")
    line = refused_start(tmp_path, start_daemon, root)
    where = line_of(migration, f"{{ 'command': '{name}'")
    assert line.endswith(f" ERROR: bad schema: {migration}:{where}:1: command '{name}' "
                         f"changes its {part} (at {pointer}); migblockd's handler takes "
                         "and returns the bundled schema's")


async def test_daemon_refuses_a_schema_without_qmp_capabilities(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    root, _ = schema_edited(tmp_path, lambda t: t)
    control = root.parent / "control.json"
    text = control.read_text(encoding="utf-8")
    negotiate = "{ 'command': 'qmp_capabilities',\n  'data': { '*enable': [ 'QMPCapability' ] } }"
    assert text.count(negotiate) == 1
    start = text.rindex("##\n# @qmp_capabilities:", 0, text.index(negotiate))
    control.write_text(text[:start] + text[text.index(negotiate) + len(negotiate):],
                       encoding="utf-8")
    line = refused_start(tmp_path, start_daemon, root)
    assert line.endswith(f" ERROR: bad schema: {root}: command 'qmp_capabilities' is not "
                         "defined; without it no client can leave capabilities negotiation")


def test_a_schema_that_reorders_members_or_drops_commands_is_served(tmp_path: Path) -> None:
    # Neither changes what a handler takes or returns.
    root, _ = schema_edited(tmp_path, lambda t: t.replace(
        "'*internal': 'bool',\n            '*id': 'str'",
        "'*id': 'str',\n            '*internal': 'bool'"))
    result = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral",
         "--socket", str(tmp_path / "s"), "--schema", str(root)],
        capture_output=True, text=True, check=False, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


PASS_EVENT = ("##\n# @MIGRATION_PASS:\n#\n# Emitted by QEMU at the start of each pass over guest "
              "memory, when\n# the events migration capability is on; relayed with --qemu only."
              "\n#\n# @pass: The number of the pass, from 1.\n#\n# Since: 0.2\n##\n"
              "{ 'event': 'MIGRATION_PASS',\n  'data': { 'pass': 'int' } }\n\n")
DELETED_DATA = "'data': { 'id': 'str', 'cause': 'BlockerDeletedCause' } }"


async def test_daemon_refuses_a_schema_that_reshapes_an_event(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # Served, every deletion sent a string id that the schema clients were given
    # said is an integer.
    root, migration = schema_edited(tmp_path, lambda t: t.replace(
        DELETED_DATA, DELETED_DATA.replace("'id': 'str'", "'id': 'int'")))
    line = refused_start(tmp_path, start_daemon, root)
    where = line_of(migration, "{ 'event': 'BLOCKER_DELETED'")
    assert line.endswith(f" ERROR: bad schema: {migration}:{where}:1: event 'BLOCKER_DELETED' "
                         "changes its data (at /properties/id/type); migblockd sends the "
                         "bundled schema's")


def test_a_schema_without_an_event_the_daemon_sends_is_refused(tmp_path: Path) -> None:
    # Served, QEMU's passes were relayed as an event that introspection denied.
    def drop(text: str) -> str:
        assert text.count(PASS_EVENT) == 1
        return text.replace(PASS_EVENT, "")

    root, _ = schema_edited(tmp_path, drop)
    result = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral",
         "--socket", str(tmp_path / "s"), "--schema", str(root)],
        capture_output=True, text=True, check=False, timeout=60)
    assert (result.returncode, result.stdout) == (EXIT_NOTCONFIGURED, "")
    assert result.stderr == (f"migblockd: bad schema: {root}: event 'MIGRATION_PASS' is not "
                             "defined, yet migblockd sends it; define it as the bundled "
                             "schema does\n")


def test_a_schema_may_define_events_the_daemon_never_sends(tmp_path: Path) -> None:
    extra = ("\n##\n# @FROBNICATED:\n#\n# Never sent.\n#\n# @how: How.\n#\n# Since: 0.2\n##\n"
             "{ 'event': 'FROBNICATED', 'data': { 'how': 'int' } }\n")
    root, _ = schema_edited(tmp_path, lambda t: t + extra)
    result = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral",
         "--socket", str(tmp_path / "s"), "--schema", str(root)],
        capture_output=True, text=True, check=False, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


def fifo_in_the_schema(tmp_path: Path, where: str) -> tuple[Path, str]:
    """A schema whose root, or a file it includes, is a FIFO nobody writes to:
    (the root, the error that refuses it)."""
    if where == "root":
        root = tmp_path / "migblockd.json"
        os.mkfifo(root, 0o600)
        return root, f"{root} is not a regular file; --schema takes a QAPI schema file"
    root, migration = schema_edited(tmp_path, lambda t: t)
    migration.unlink()
    os.mkfifo(migration, 0o600)
    directive = "{ 'include': 'migration.json' }"
    line = line_of(root, directive)
    column = directive.index("'migration.json'") + 1
    return root, (f"bad schema: {root}:{line}:{column}: include file '{migration}' is not a "
                  "regular file")


@pytest.mark.parametrize("where", ["root", "include"])
def test_a_fifo_in_the_schema_is_refused_at_start_without_waiting_for_a_writer(
    where: str, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # Reproduced first: the start waited for a writer, before READY=1, saying nothing.
    root, message = fifo_in_the_schema(tmp_path, where)
    line = refused_start(tmp_path, start_daemon, root)
    assert line.endswith(f" ERROR: {message}")


@pytest.mark.parametrize("where", ["root", "include"])
def test_check_config_refuses_a_fifo_in_the_schema(where: str, tmp_path: Path) -> None:
    # Reproduced first: --check-config waited for a writer, saying nothing.
    root, message = fifo_in_the_schema(tmp_path, where)
    result = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral",
         "--socket", str(tmp_path / "s"), "--schema", str(root)],
        capture_output=True, text=True, check=False, timeout=60)
    assert (result.returncode, result.stdout) == (EXIT_NOTCONFIGURED, "")
    assert result.stderr == f"migblockd: {message}\n"


NOBODY = 65534
#: Where the schema's file that others could have written is, and how: (where, how).
UNTRUSTED = [
    pytest.param("root", "owner", id="root-owned-by-another-user",
                 marks=pytest.mark.skipif(os.geteuid() != 0,
                                          reason="giving a file to another user takes root")),
    pytest.param("include", "owner", id="include-owned-by-another-user",
                 marks=pytest.mark.skipif(os.geteuid() != 0,
                                          reason="giving a file to another user takes root")),
    pytest.param("root", "mode", id="root-group-writable"),
    pytest.param("include", "mode", id="include-world-writable"),
    # Judged by its entries, not its mask: one lets another user write.
    pytest.param("include", "acl", id="include-acl-lets-another-user-write"),
    # Whoever may write the directory could put any root-owned file in their place.
    pytest.param("root", "directory", id="directory-world-writable"),
]


def untrusted_schema(tmp_path: Path, where: str, how: str) -> tuple[Path, str]:
    """A copy of the schema whose root, or a file it includes, another user owns or
    others may write: (the root, the refusal).  Otherwise a schema the daemon serves."""
    root, migration = schema_edited(tmp_path, lambda t: t)
    target = root if where == "root" else migration
    if how == "owner":
        os.chown(target, NOBODY, NOBODY)
        return root, (f"{target}: refusing a schema file owned by uid 65534 (nobody): only "
                      "root may own it, since its owner sets the commands the daemon serves, "
                      f"their arguments and the migration modes; chown root {target}")
    if how == "directory":
        root.parent.chmod(0o777)
        return root, (f"{root.parent}, above schema file {root}, is writable by others (mode "
                      "0777), so they could replace it and so set the commands the daemon "
                      f"serves, their arguments and the migration modes; chmod go-w "
                      f"{root.parent}, or choose another place for it")
    if how == "acl":
        target.chmod(0o644)
        subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rw", str(target)], check=True)
        return root, (f"{target}: refusing a schema file with an ACL that lets uid {NOBODY} "
                      "(nobody) write to it (mode 0664, whose group bits are the ACL's mask); "
                      f"setfacl -n -m u:{NOBODY}:r {target}")
    mode = 0o664 if where == "root" else 0o646
    target.chmod(mode)
    return root, (f"{target}: refusing a schema file others may write (mode {mode:04o}); "
                  f"chmod go-w {target}")


@pytest.mark.parametrize(("where", "how"), UNTRUSTED)
def test_a_schema_others_could_have_written_is_refused_at_start(
    where: str, how: str, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # Reproduced first: the daemon served it, so whoever could write it chose the
    # commands' arguments and MigMode's values, which the --config file's rule forbids.
    root, message = untrusted_schema(tmp_path, where, how)
    line = refused_start(tmp_path, start_daemon, root)
    assert line.endswith(f" ERROR: {message}")


@pytest.mark.parametrize(("where", "how"), UNTRUSTED)
def test_check_config_refuses_a_schema_others_could_have_written(
    where: str, how: str, tmp_path: Path
) -> None:
    root, message = untrusted_schema(tmp_path, where, how)
    # Given as the directory holding migblockd.json, the files judged are the same.
    result = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral",
         "--socket", str(tmp_path / "s"), "--schema", str(root.parent)],
        capture_output=True, text=True, check=False, timeout=60)
    assert (result.returncode, result.stdout) == (EXIT_NOTCONFIGURED, "")
    assert result.stderr == f"migblockd: {message}\n"


@pytest.mark.parametrize(("where", "how"), UNTRUSTED)
async def test_a_reload_says_a_schema_others_could_have_written_would_stop_the_start(
    where: str, how: str, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    config = tmp_path / "m.toml"
    config.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(config), "--ephemeral")
    root, message = untrusted_schema(tmp_path, where, how)
    config.write_text(f'log-level = "info"\nschema = "{root}"\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"WARNING: reload: {config}:2: schema changed, which only a restart "
                   "applies")
    d.wait_for_log("WARNING: reload: with schema as the file now sets it, the next start "
                   f"would fail: {config}:2: schema: {message}\n")
    async with d.client() as c:  # still serving the schema it started with
        await c.ok("query-version")
    assert d.stop() == 0


async def test_a_schema_whose_acl_lets_only_trusted_users_write_is_served(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Found by review of the directories' ACL rule: a schema file that ``setfacl -m
    u:65534:r,m::rw`` made 0664, which nobody but its owner may write, was refused as
    "others may write (mode 0664)": under an access ACL the mode's group bits are only
    its mask, and the entries decide.  Real setfacl, the daemon as a process."""
    root, migration = schema_edited(tmp_path, lambda t: t)
    for each in (root, migration):
        each.chmod(0o644)
        subprocess.run(["setfacl", "-m", f"u:{NOBODY}:r,m::rw", str(each)], check=True)
        assert stat.S_IMODE(each.stat().st_mode) == 0o664  # the mask's bits
    check = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral",
         "--socket", str(tmp_path / "s"), "--schema", str(root)],
        capture_output=True, text=True, check=False, timeout=60)
    assert check.returncode == 0, check.stderr
    d = start_daemon("--schema", str(root), "--ephemeral")
    async with d.client() as c:
        await c.ok("query-version")
    assert d.stop() == 0


def schema_without_cpr_exec(tmp_path: Path) -> Path:
    """A copy of the schema whose MigMode has no cpr-exec (nor its doc)."""
    def edit(text: str) -> str:
        start = text.index("# @cpr-exec:")
        text = text[:start] + text[text.index(DOC_ANCHOR, start) + 1:]
        return text.replace(OLD, "'data': [ 'normal', 'cpr-reboot', 'cpr-transfer' ] }")
    root, _ = schema_edited(tmp_path, edit)
    return root


@pytest.mark.parametrize("kept", ["blocker", "mode"])
async def test_a_reload_says_a_schema_without_a_stored_mode_would_stop_the_start(
    kept: str, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # Found by review: a schema, set in the file, that drops a mode the state still
    # names was said to apply at a restart only; the restart then refused the
    # state database, and the daemon did not start.
    config = tmp_path / "m.toml"
    config.write_text('log-level = "info"\n')
    state = tmp_path / "kept"
    d = start_daemon("--config", str(config), "--state-dir", str(state))
    root = schema_without_cpr_exec(tmp_path)
    async with d.client() as c:
        # Older than the one named below, and no start refuses them: one not kept
        # (the connection's), one of a mode the schema keeps.
        await c.ok("add-blocker", {"reason": "held", "id": "h", "modes": ["cpr-exec"],
                                   "scope": "connection"})
        await c.ok("add-blocker", {"reason": "other", "id": "o", "modes": ["cpr-reboot"]})
        config.write_text(f'log-level = "info"\nschema = "{root}"\n')
        d.signal(signal.SIGHUP)
        d.wait_for_log(f"WARNING: reload: {config}:2: schema changed, which only a restart "
                       "applies")
        if kept == "blocker":
            await c.ok("add-blocker", {"reason": "exec", "id": "x", "modes": ["cpr-exec"]})
            why = ("stored blocker 'x' blocks modes the schema does not define (cpr-exec); "
                   "use a --schema that defines them")
        else:
            await c.ok("migrate-set-parameters", {"mode": "cpr-exec"})
            why = ('stored mode "cpr-exec" is not one the schema defines; use a --schema '
                   "that defines it")
        # The file unchanged, a reload says it again (the running schema is the old one).
        d.signal(signal.SIGHUP)
        refusal = (f"{state.absolute() / 'state.db'}: {why}, or move the state directory "
                   "away to start from scratch")
        d.wait_for_log("WARNING: reload: with schema as the file now sets it, the next start "
                       f"would fail: {refusal}\n")
    assert d.log().count("the next start would fail") == 1
    assert d.stop() == 0
    assert_start_refused(config, state, tmp_path / "2.sock", refusal)


async def test_a_reload_says_a_schema_edited_in_place_would_stop_the_start(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # Found by review: with the schema's files edited in place (no setting changed),
    # a reload said "nothing changed", and the restart refused the state database.
    root, migration = schema_edited(tmp_path, lambda text: text)
    config = tmp_path / "m.toml"
    config.write_text(f'log-level = "debug"\nschema = "{root}"\n')
    state = tmp_path / "kept"
    d = start_daemon("--config", str(config), "--state-dir", str(state))
    async with d.client() as c:
        await c.ok("add-blocker", {"reason": "exec", "id": "x", "modes": ["cpr-exec"]})
        d.signal(signal.SIGHUP)  # nothing changed, and nothing to say
        d.wait_for_log("reloaded configuration: nothing changed")
        # Its look ahead reads the schema's files on a thread: edited before it
        # ends, they would be said by this reload too.
        d.wait_for_log("DEBUG: reload: the next start would refuse nothing of schema as "
                       "the file now sets it\n")
        (tmp_path / "edited").mkdir()
        without = schema_without_cpr_exec(tmp_path / "edited").with_name("migration.json")
        migration.write_text(without.read_text(encoding="utf-8"), encoding="utf-8")
        d.signal(signal.SIGHUP)
        refusal = (f"{state.absolute() / 'state.db'}: stored blocker 'x' blocks modes the "
                   "schema does not define (cpr-exec); use a --schema that defines them, or "
                   "move the state directory away to start from scratch")
        d.wait_for_log("WARNING: reload: with the schema as its files are now, the next start "
                       f"would fail: {refusal}\n")
        await c.ok("query-version")  # still serving the schema it started with
    assert d.log().count("the next start would fail") == 1
    assert d.stop() == 0
    assert_start_refused(config, state, tmp_path / "2.sock", refusal)


async def test_a_reload_that_changed_another_restart_only_setting_says_a_broken_schema(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # Found by review: with a restart-only setting changed (not the schema) and the
    # schema's files broken in place, the look ahead loaded the schema outside its
    # checks: a traceback ("checking whether the next start would fail ... failed")
    # instead of the warning.
    root, migration = schema_edited(tmp_path, lambda text: text)
    config = tmp_path / "m.toml"
    config.write_text(f'log-level = "info"\nschema = "{root}"\nsocket-mode = "0600"\n')
    d = start_daemon("--config", str(config), "--state-dir", str(tmp_path / "kept"))
    migration.write_text(migration.read_text(encoding="utf-8") + "{ garbage\n",
                         encoding="utf-8")
    config.write_text(config.read_text().replace('"0600"', '"0660"'))
    d.signal(signal.SIGHUP)
    d.wait_for_log("WARNING: reload: with the schema as its files are now, the next start "
                   f"would fail: {config}:2: schema: bad schema: {migration}:")
    assert "Traceback" not in d.log()
    assert "checking whether the next start would fail" not in d.log()
    assert d.stop() == 0


# ------------------------------------------ stored blockers of every mode (MIG_MODE_ALL)

MODES = ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]


async def migrate_refused_by(c: RawClient, mode: str) -> str | None:
    """The reason a migrate in ``mode`` is refused with; None: nothing blocks it (the
    migration that then starts is cancelled)."""
    await c.ok("migrate-set-parameters", {"mode": mode})
    reply = await c.execute("migrate", {"uri": "unix:/tmp/x"})
    if "return" in reply:
        await c.ok("migrate_cancel")
        return None
    assert reply["error"]["class"] == GENERIC, reply
    desc: str = reply["error"]["desc"]
    return desc


def end(daemon: DaemonProcess, how: str) -> None:
    if how == "SIGTERM":
        assert daemon.stop() == 0
    else:
        daemon.proc.kill()
        daemon.proc.wait()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_a_stored_blocker_of_every_mode_blocks_a_mode_a_later_schema_adds(
    how: str, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # Found by review: the disk kept the modes of the schema of the day, so after
    # a restart with a MigMode that gained one, a migration in it went through.
    # QEMU's migrate_add_blocker() blocks MIG_MODE_ALL, whatever modes there are.
    state = tmp_path / "state"
    d = start_daemon("--state-dir", str(state))
    async with d.client() as c:
        await c.ok("add-blocker", {"id": "all", "reason": "never"})
        await c.ok("add-blocker", {"id": "dump", "reason": "dumping", "internal": True})
    end(d, how)
    d = start_daemon("--state-dir", str(state), "--schema", str(schema_with_new_mode(tmp_path)))
    async with d.client() as c:
        assert [(b["id"], b["modes"]) for b in await c.ok("query-blockers")] == [
            ("all", [*MODES, "cpr-test"]), ("dump", [*MODES, "cpr-test"])]
        assert await migrate_refused_by(c, "cpr-test") == "dumping"
        await c.ok("del-blocker", {"id": "dump"})
        assert await migrate_refused_by(c, "cpr-test") == "never"
        assert await c.ok("query-migrate") == {"blocked-reasons": ["never"]}
        await c.ok("migrate-set-parameters", {"mode": "normal"})
    end(d, how)
    # Back to the schema without that mode: still every mode, and no refusal for a
    # mode the blocker never named.
    d = start_daemon("--state-dir", str(state))
    async with d.client() as c:
        assert [(b["id"], b["modes"]) for b in await c.ok("query-blockers")] == [
            ("all", MODES)]
        for mode in MODES:
            await c.ok("migrate-set-parameters", {"mode": mode})
            assert await c.ok("query-migrate") == {"blocked-reasons": ["never"]}
    assert d.stop() == 0


async def test_a_stored_list_of_every_mode_stays_that_list(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """As in QEMU, where migrate_add_blocker_modes() naming each mode is another call
    than migrate_add_blocker(): the same modes at the time, not those added after."""
    state = tmp_path / "state"
    d = start_daemon("--state-dir", str(state))
    async with d.client() as c:
        await c.ok("add-blocker", {"id": "listed", "reason": "these four",
                                   "modes": list(reversed(MODES))})
    assert d.stop() == 0
    d = start_daemon("--state-dir", str(state), "--schema", str(schema_with_new_mode(tmp_path)))
    async with d.client() as c:
        assert [b["modes"] for b in await c.ok("query-blockers")] == [MODES]
        assert await migrate_refused_by(c, "cpr-test") is None
        assert await migrate_refused_by(c, "cpr-exec") == "these four"
        await c.ok("migrate-set-parameters", {"mode": "normal"})
    assert d.stop() == 0
    # And a schema without one of them still refuses it, as for any list.
    (tmp_path / "without").mkdir()
    config = tmp_path / "m.toml"
    config.write_text(f'schema = "{schema_without_cpr_exec(tmp_path / "without")}"\n')
    assert_start_refused(
        config, state, tmp_path / "2.sock",
        f"{state}/state.db: stored blocker 'listed' blocks modes the schema does not define "
        "(cpr-exec); use a --schema that defines them, or move the state directory away to "
        "start from scratch")


def format_1_database(state: Path, rows: dict[str, list[str]]) -> None:
    """A state directory as a migblockd of format 1 left it: ``rows`` are the blockers'
    ids and stored modes, oldest first (played, as the store's migration tests play
    formats, by opening it with the format's steps alone)."""
    with Store.open(state, MIGRATIONS[:1]) as store:
        store.commit([Put(BlockerRow(id, f"reason of {id}", tuple(modes), False, None,
                                     1.7e9 + seq, seq)) for seq, (id, modes) in
                      enumerate(rows.items())])
        store.commit([Setting("id-floor", 0)])


async def test_a_format_1_database_reads_a_list_of_every_mode_as_every_mode(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Format 1 stored a blocker of every mode as the list of the modes of its day,
    as it stored a list naming each: which one a row was cannot be told, and the
    reading that blocks more is the one for a gate."""
    state = tmp_path / "state"
    format_1_database(state, {
        "all": MODES,
        "shuffled": [MODES[2], MODES[0], MODES[3], MODES[1]],
        # Under a --schema that had added a mode, "every mode" named it too.
        "more": [*MODES, "cpr-test"],
        "three": MODES[:3],
        "one": ["normal"],
    })
    db = state / "state.db"
    d = start_daemon("--state-dir", str(state), "--schema", str(schema_with_new_mode(tmp_path)))
    d.wait_for_log(f"migrated {db} from format 1 to 2; the file as it was is kept as "
                   f"{db}.format-1")
    every = [*MODES, "cpr-test"]
    async with d.client() as c:
        assert [(b["id"], b["modes"]) for b in await c.ok("query-blockers")] == [
            ("all", every), ("shuffled", every), ("more", every), ("three", MODES[:3]),
            ("one", ["normal"])]
        assert await migrate_refused_by(c, "cpr-test") == "reason of more"
        await c.ok("migrate-set-parameters", {"mode": "normal"})
    assert d.stop() == 0
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT id, modes FROM blocker ORDER BY seq").fetchall() == [
            ("all", None), ("shuffled", None), ("more", None),
            ("three", '["normal", "cpr-reboot", "cpr-transfer"]'), ("one", '["normal"]')]
    finally:
        conn.close()
    kept = sqlite3.connect(f"{db}.format-1")
    try:
        assert kept.execute("PRAGMA user_version").fetchone()[0] == 1
        assert kept.execute("SELECT count(*) FROM blocker WHERE modes IS NULL").fetchone() == (0,)
    finally:
        kept.close()


def syscalls_recorded(workdir: Path, syscalls: str) -> str:
    """A ``python`` for ``start_daemon`` that runs the daemon under strace, which
    writes each thread's ``syscalls`` to ``workdir/syscalls.TID``."""
    strace = shutil.which("strace")
    assert strace is not None, "needs strace (tools/check.py installs it)"
    prefix = workdir / "syscalls"
    wrapper = workdir / "python-recorded"
    # -D: strace runs as a grandchild, so that the daemon keeps the pid spawned;
    # -ff: a file per thread, so that no call is cut in two by another thread's.
    wrapper.write_text(f"#!/bin/sh\nexec {strace} -D -ff -qq -o {prefix} -e trace={syscalls} "
                       f'{sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def calls_on_files(trace: str) -> list[tuple[str, str, str]]:
    """The calls of one thread's strace output as (call, the path its descriptor or
    its first argument names, result), descriptors followed from openat to close."""
    paths: dict[str, str] = {}
    calls: list[tuple[str, str, str]] = []
    for line in trace.splitlines():
        match = re.fullmatch(r'(\w+)\((?:AT_FDCWD, )?"?([^",)]*)"?(.*)\) += (-?\d+).*', line)
        if match is None:
            continue
        call, first, _, result = match.groups()
        path = first if call in ("openat", "unlink") else paths.get(first, first)
        if call == "openat" and result != "-1":
            paths[result] = first
        elif call == "close":
            paths.pop(first, None)
        calls.append((call, path, result))
    return calls


async def test_the_copy_kept_before_a_migration_is_on_disk_before_the_migration(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """The migration's commit survives a power cut, so the copy of the file as it was
    must too: its pages, its name, and the removal of the journal SQLite filled it
    through (its commit into the copy, which SQLite does not sync: back after a cut,
    that journal would empty the copy at its first opening).  All of them are synced
    before the migration writes anything to the log."""
    state = tmp_path / "state"
    format_1_database(state, {"all": MODES, "one": ["normal"]})
    db = state / "state.db"
    python = syscalls_recorded(tmp_path, "openat,close,unlink,pwrite64,fsync,fdatasync")
    d = start_daemon("--state-dir", str(state), python=python)
    d.wait_for_log(f"migrated {db} from format 1 to 2; the file as it was is kept as "
                   f"{db}.format-1")
    assert d.stop() == 0
    copy, journal, log = f"{db}.format-1", f"{db}.format-1-journal", f"{db}-wal"
    threads = [calls_on_files(trace.read_text()) for trace in tmp_path.glob("syscalls.*")]
    calls = next(calls for calls in threads if ("unlink", journal, "0") in calls)
    made = next(n for n, (call, path, result) in enumerate(calls)
                if call == "openat" and path == copy and result != "-1")
    committed = calls.index(("unlink", journal, "0"))
    migrating = next(n for n, (call, path, _) in enumerate(calls)
                     if n > made and call == "pwrite64" and path == log)
    last_write = max(n for n, (call, path, _) in enumerate(calls)
                     if call == "pwrite64" and path == copy)
    synced = {(path, n) for n, (call, path, result) in enumerate(calls)
              if call in ("fsync", "fdatasync") and result == "0"}
    assert any(path == copy and last_write < n < migrating for path, n in synced), calls
    assert any(path == str(state) and committed < n < migrating for path, n in synced), calls
    kept = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        assert kept.execute("PRAGMA user_version").fetchone()[0] == 1
        assert kept.execute("SELECT id, modes FROM blocker ORDER BY seq").fetchall() == [
            ("all", json.dumps(MODES)), ("one", '["normal"]')]
    finally:
        kept.close()
    assert not os.path.exists(journal)


async def reload(d: DaemonProcess, c: RawClient, notify: socket.socket) -> None:
    """SIGHUP, and wait for the reload's end as systemd hears it (READY=1 after
    RELOADING=1, sent once the reload has said all it has to say, its look ahead
    at the next start included), then for its lines in the log, which a thread
    writes: up to a request of ``c`` made after it."""
    d.signal(signal.SIGHUP)
    notify.settimeout(20)
    seen: list[str] = []
    while seen[-2:] != ["RELOADING=1", "READY=1"]:
        first = notify.recv(4096).decode().split("\n")[0]
        if first.startswith(("RELOADING=", "READY=")):
            seen.append(first)
    mark = f"after-reload-{time.monotonic_ns()}"
    await c.execute("query-version", id=mark)
    d.wait_for_log(mark)


async def test_a_reload_with_a_schema_that_adds_or_drops_a_mode_keeps_every_mode(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A schema that adds a mode is no reason to warn, and the restart blocks it; one
    that drops a mode is no reason for a blocker of every mode to stop the start
    (before, it named that blocker), but still is for a list that names the mode."""
    config = tmp_path / "m.toml"
    config.write_text('log-level = "info"\n')
    state = tmp_path / "kept"
    added = schema_with_new_mode(tmp_path)
    (tmp_path / "without").mkdir()
    dropped = schema_without_cpr_exec(tmp_path / "without")
    refusal = (f"{state.absolute() / 'state.db'}: stored blocker 'listed' blocks modes the "
               "schema does not define (cpr-exec); use a --schema that defines them, or move "
               "the state directory away to start from scratch")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        d = start_daemon("--config", str(config), "--state-dir", str(state),
                         env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
        async with d.client() as c:
            await c.ok("add-blocker", {"reason": "never", "id": "all"})
            config.write_text(f'log-level = "info"\nschema = "{added}"\n')
            await reload(d, c, notify)
            config.write_text(f'log-level = "info"\nschema = "{dropped}"\n')
            await reload(d, c, notify)
            assert "the next start would fail" not in d.log()
            await c.ok("add-blocker", {"reason": "these four", "id": "listed", "modes": MODES})
            await reload(d, c, notify)
            assert d.log().count("the next start would fail") == 1
            d.wait_for_log("WARNING: reload: with schema as the file now sets it, the next "
                           f"start would fail: {refusal}\n")
            await c.ok("del-blocker", {"id": "listed"})
            config.write_text(f'log-level = "info"\nschema = "{added}"\n')
            await reload(d, c, notify)
        assert d.stop() == 0
    assert d.log().count("the next start would fail") == 1
    assert d.log().count(f"WARNING: reload: {config}:2: schema changed, which only a restart "
                         "applies") == 4
    d = start_daemon("--config", str(config), "--state-dir", str(state))
    async with d.client() as c:
        assert [b["modes"] for b in await c.ok("query-blockers")] == [[*MODES, "cpr-test"]]
        assert await migrate_refused_by(c, "cpr-test") == "never"
        await c.ok("migrate-set-parameters", {"mode": "normal"})
    assert d.stop() == 0
    config.write_text(f'log-level = "info"\nschema = "{dropped}"\n')
    d = start_daemon("--config", str(config), "--state-dir", str(state))
    async with d.client() as c:
        assert [b["modes"] for b in await c.ok("query-blockers")] == [MODES[:3]]
    assert d.stop() == 0
