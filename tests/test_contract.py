"""The runtime contract the daemon and shell build on: ``Contract.load()``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from migblockd.commands import HANDLED, Handlers
from migblockd.contract import CommandSpec, Contract, EventSpec, schema_dir
from migblockd.gate import GateHandlers
from migblockd.qapi.error import QAPIError

ROOT = Path(__file__).resolve().parent.parent
# QAPI's size and uint64: QEMU takes negative numbers too, and wraps them.
UINT64 = {"type": "integer", "format": "uint64", "minimum": -(2**63), "maximum": 2**64 - 1}
GENERATED = ROOT / "schema" / "generated"

COMMANDS = [
    "qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
    "add-blocker", "del-blocker", "query-blockers", "migrate", "migrate_cancel",
    "query-migrate", "migrate-set-parameters", "query-migrate-parameters",
    "migrate-set-capabilities", "query-migrate-capabilities",
]  # fmt: skip
OOB = {"query-version", "query-commands", "query-qmp-schema", "query-blockers",
       "migrate_cancel", "query-migrate", "query-migrate-parameters",
       "query-migrate-capabilities"}  # fmt: skip
NO_RETURNS = {"qmp_capabilities", "del-blocker", "migrate", "migrate_cancel",
              "migrate-set-parameters", "migrate-set-capabilities"}  # fmt: skip


@pytest.fixture(scope="module")
def contract() -> Contract:
    return Contract.load()


def read(rel: str) -> Any:
    return json.loads((GENERATED / rel).read_text(encoding="utf-8"))


def test_commands_in_schema_order_with_oob_flags(contract: Contract) -> None:
    assert list(contract.commands) == COMMANDS
    for name, spec in contract.commands.items():
        assert isinstance(spec, CommandSpec)
        assert spec.name == name
        assert spec.allow_oob == (name in OOB), name
        assert (spec.returns is None) == (name in NO_RETURNS), name
        assert spec.doc.startswith(name + " ")


def test_events(contract: Contract) -> None:
    assert list(contract.events) == ["MIGRATION", "MIGRATION_PASS", "BLOCKER_ADDED",
                                     "BLOCKER_DELETED"]
    assert all(isinstance(e, EventSpec) for e in contract.events.values())
    deleted = contract.events["BLOCKER_DELETED"].data
    assert deleted["properties"]["cause"] == {"$ref": "#/$defs/BlockerDeletedCause"}
    assert deleted["$defs"]["BlockerDeletedCause"]["enum"] == ["command", "connection-closed"]
    added = contract.events["BLOCKER_ADDED"].data
    assert list(added["properties"]) == [
        "id", "reason", "modes", "internal", "scope", "owner", "added", "source"
    ]  # fmt: skip


def test_enums(contract: Contract) -> None:
    assert contract.enums["MigMode"] == ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")
    assert contract.enums["MigrationStatus"] == (
        "none", "setup", "cancelling", "cancelled", "active", "postcopy-device",
        "postcopy-active", "postcopy-paused", "postcopy-recover-setup", "postcopy-recover",
        "completed", "failed", "colo", "pre-switchover", "device", "wait-unplug",
    )  # fmt: skip
    assert contract.enums["BlockerScope"] == ("daemon", "connection")
    assert contract.enums["QMPCapability"] == ("oob",)
    assert contract.enums["MigrationCapability"] == ("events",)


def test_in_memory_documents_equal_the_committed_files(contract: Contract) -> None:
    for name, spec in contract.commands.items():
        assert spec.arguments == read(f"commands/{name}.arguments.json")
        if spec.returns is not None:
            assert spec.returns == read(f"commands/{name}.returns.json")
    for name, ev in contract.events.items():
        assert ev.data == read(f"events/{name}.json")
    assert contract.introspection == read("qmp-schema.json")


def test_argument_documents_follow_the_conventions(contract: Contract) -> None:
    args = contract.commands["add-blocker"].arguments
    assert args["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert list(args["properties"]) == ["reason", "modes", "internal", "id", "scope"]
    assert args["required"] == ["reason"]
    assert args["additionalProperties"] is False
    assert args["properties"]["modes"] == {"type": "array", "items": {"$ref": "#/$defs/MigMode"}}
    assert set(args["$defs"]) == {"MigMode", "BlockerScope"}
    # No arguments: an empty object that takes nothing, without "required".
    empty = contract.commands["query-version"].arguments
    assert empty["properties"] == {} and "required" not in empty
    assert not jsonschema.Draft202012Validator(empty).is_valid({"x": 1})
    # A struct named as 'data' is inlined at top level.
    params = contract.commands["migrate-set-parameters"].arguments
    assert params["type"] == "object"
    assert params["properties"] == {"mode": {"$ref": "#/$defs/MigMode"},
                                    "max-bandwidth": UINT64,
                                    "downtime-limit": UINT64}
    assert "MigrateSetParameters" not in params["$defs"]


def test_introspection_is_qemu_schemainfo(contract: Contract) -> None:
    info = contract.introspection
    by_name = {e["name"]: e for e in info}
    cmd = by_name["add-blocker"]
    assert cmd["meta-type"] == "command"
    assert "allow-oob" not in cmd
    assert by_name["query-blockers"]["allow-oob"] is True
    # Masked names: decimal strings in order of first use, starting at "0".
    masked = [e["name"] for e in info if e["meta-type"] in ("object", "enum")]
    assert sorted(masked, key=int) == [str(i) for i in range(len(masked))]
    args = by_name[cmd["arg-type"]]
    assert args["meta-type"] == "object"
    assert [m["name"] for m in args["members"]] == ["reason", "modes", "internal", "id", "scope"]
    assert args["members"][0] == {"name": "reason", "type": "str"}
    assert args["members"][1]["default"] is None
    modes = by_name[args["members"][1]["type"]]
    assert modes["meta-type"] == "array"
    assert args["members"][1]["type"] == "[" + modes["element-type"] + "]"
    migmode = by_name[modes["element-type"]]
    assert migmode["values"] == ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]
    assert migmode["members"] == [{"name": v} for v in migmode["values"]]
    # Commands without arguments or return value share the empty object type.
    empty = by_name[by_name["migrate_cancel"]["arg-type"]]
    assert empty == {"name": empty["name"], "meta-type": "object", "members": []}
    assert by_name["migrate_cancel"]["ret-type"] == empty["name"]
    assert by_name["str"] == {"name": "str", "meta-type": "builtin", "json-type": "string"}
    # Only reachable types appear, once each; commands and events come first.
    assert len(by_name) == len(info)
    kinds = [e["meta-type"] for e in info]
    assert kinds[: len(COMMANDS) + 3] == ["command"] * len(COMMANDS) + ["event"] * 3


def test_introspection_validates_against_its_own_returns_schema(contract: Contract) -> None:
    returns = contract.commands["query-qmp-schema"].returns
    assert returns is not None
    jsonschema.Draft202012Validator(returns).validate(contract.introspection)


def test_docs_for_the_shell(contract: Contract) -> None:
    docs = contract.docs
    assert list(docs.commands) == COMMANDS
    add = docs.commands["add-blocker"]
    assert add.summary.startswith("Register a migration blocker")
    assert add.returns == "BlockerInfo"
    modes = add.member("modes")
    assert modes is not None and modes.optional and modes.type == "[MigMode]"
    assert [v.name for v in modes.values] == list(contract.enums["MigMode"])
    assert all(v.text for v in modes.values)
    assert docs.values("add-blocker", "scope") == ("daemon", "connection")
    assert docs.values("add-blocker", "reason") == ()
    assert docs.values("no-such-command", "x") == ()
    assert "cpr-transfer" in (docs.help("MigMode") or "")
    assert docs.help("nonexistent") is None
    assert contract.commands["add-blocker"].doc == add.text
    assert "values: normal, cpr-reboot, cpr-transfer, cpr-exec" in add.text
    assert add.text.startswith("add-blocker (command)\n    Register a migration blocker")
    assert add.text.endswith("\n\nSince: 0.1")
    assert add.returns_text == "The new blocker."
    assert [tag for tag, _ in add.sections] == ["Errors", "Since"]  # Returns is above
    # Every definition, member and enum value has its own doc text.
    for table in (docs.commands, docs.events, docs.types):
        for d in table.values():
            assert d.summary, d.name
            assert all(m.text for m in d.members), d.name


def test_load_accepts_a_directory_or_a_file(contract: Contract) -> None:
    from_dir = Contract.load(schema_dir())
    from_file = Contract.load(schema_dir() / "migblockd.json")
    assert from_dir.introspection == from_file.introspection == contract.introspection


def test_load_raises_qapierror_on_a_bad_schema(tmp_path: Path) -> None:
    copy = tmp_path / "schema"
    shutil.copytree(schema_dir(), copy)
    path = copy / "migration.json"
    path.write_text(path.read_text().replace("'modes': [ 'MigMode' ],", "'modes': [ 'Mode' ],"))
    with pytest.raises(QAPIError, match=r"migration\.json:\d+:\d+: struct 'BlockerInfo' uses "
                       r"unknown type 'Mode'"):
        Contract.load(copy)


def test_every_schema_command_has_its_handler(contract: Contract) -> None:
    # HANDLED names what the start accepts; each name must be a method of both
    # handler classes, and the shipped schema must need no other.
    assert set(contract.commands) == HANDLED | {"qmp_capabilities"}
    for cls in (Handlers, GateHandlers):
        for name in HANDLED:
            assert callable(getattr(cls, name.replace("-", "_"), None)), (cls, name)
    assert contract.sources["MigMode"].fname.endswith("migration.json")
    assert contract.root == schema_dir() / "migblockd.json"
