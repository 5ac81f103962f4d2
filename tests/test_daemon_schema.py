"""MigMode is the single source of truth, end to end: a daemon serving an edited copy
of the schema accepts, introspects and enforces a new migration mode with no code change."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess
from qemu_strings import DEFAULT_PARAMETERS, GENERIC

from migblockd.contract import schema_dir

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
    assert daemon.proc.wait(30) == 1
    log = daemon.log()
    assert f"bad schema: {migration}:" in log
    assert "Traceback" not in log
