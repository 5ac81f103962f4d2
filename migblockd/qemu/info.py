"""What migblockd learns about the QEMU it is connected to: its version and its commands.

QEMU's commands and their arguments change between releases (``migrate`` lost ``blk`` and
``inc`` in 9.1 and gained ``channels``; ``migrate-set-parameters`` learnt ``mode`` in 8.2),
so the caller forwards only what this QEMU knows.  The facts come from QEMU's greeting and
its ``query-qmp-schema`` (``qapi/introspect.json`` in QEMU), read once per connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["QemuInfo"]


@dataclass(frozen=True)
class QemuInfo:
    """One QEMU process, as its monitor describes itself."""

    #: QEMU's version object exactly as its greeting (and ``query-version``) gives it:
    #: ``{"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "..."}``.
    version: Mapping[str, object]
    #: Every command QEMU knows, with the names of the arguments it accepts.
    commands: Mapping[str, frozenset[str]]
    #: Every event QEMU can send.
    events: frozenset[str]
    #: The arguments each command requires, in the order of QEMU's schema (the order its
    #: input visitor checks them in).  Those of a union's variants are not among them.
    required: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: The arguments each command takes, in the order of QEMU's schema (its input
    #: visitor's order); those of a union's variants are not among them.
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: The QEMU process's id, as the kernel names the peer of the monitor's socket
    #: (``SO_PEERCRED``); None if it cannot say (a QEMU in another PID namespace).
    #: A new QEMU on the same socket is a new process, with a new id.
    pid: int | None = None

    @property
    def version_string(self) -> str:
        """``major.minor.micro``, or ``unknown`` if the greeting did not say."""
        qemu = self.version.get("qemu")
        if isinstance(qemu, Mapping):
            parts = [qemu.get(key) for key in ("major", "minor", "micro")]
            if all(isinstance(p, int) for p in parts):
                return ".".join(str(p) for p in parts)
        return "unknown"

    def knows(self, command: str) -> bool:
        return command in self.commands

    def arguments(self, command: str) -> frozenset[str]:
        """The argument names ``command`` accepts (empty for an unknown command)."""
        return self.commands.get(command, frozenset())

    @classmethod
    def from_schema(cls, version: Mapping[str, object], schema: object) -> QemuInfo:
        """Build from a greeting's version and a ``query-qmp-schema`` return value.

        Raises ValueError when the schema is not the list of SchemaInfo objects QEMU sends.
        """
        if not isinstance(schema, list):
            raise ValueError("query-qmp-schema did not return a list")
        by_name: dict[str, Mapping[str, object]] = {}
        for entry in schema:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
                raise ValueError("query-qmp-schema returned an entry without a name")
            by_name[str(entry["name"])] = entry
        commands: dict[str, frozenset[str]] = {}
        required: dict[str, tuple[str, ...]] = {}
        members: dict[str, tuple[str, ...]] = {}
        events: set[str] = set()
        for name, entry in by_name.items():
            if entry.get("meta-type") == "command":
                commands[name] = _member_names(by_name, entry.get("arg-type"))
                required[name] = _required_names(by_name, entry.get("arg-type"))
                members[name] = _member_order(by_name, entry.get("arg-type"))
            elif entry.get("meta-type") == "event":
                events.add(name)
        return cls(dict(version), commands, frozenset(events), required, members=members)


def _required_names(by_name: Mapping[str, Mapping[str, object]],
                    type_name: object) -> tuple[str, ...]:
    """The members of an object type that must be given: a member with no ``default``
    (``qapi/introspect.json``: present, and null, exactly for an optional one)."""
    entry = by_name.get(type_name) if isinstance(type_name, str) else None
    members = entry.get("members") if entry is not None else None
    if not isinstance(members, list):
        return ()
    return tuple(m["name"] for m in members if isinstance(m, Mapping)
                 and isinstance(m.get("name"), str) and "default" not in m)


def _member_order(by_name: Mapping[str, Mapping[str, object]],
                  type_name: object) -> tuple[str, ...]:
    """The members of an object type, in its schema's order (no variant's)."""
    entry = by_name.get(type_name) if isinstance(type_name, str) else None
    members = entry.get("members") if entry is not None else None
    if not isinstance(members, list):
        return ()
    return tuple(m["name"] for m in members if isinstance(m, Mapping)
                 and isinstance(m.get("name"), str))


def _member_names(by_name: Mapping[str, Mapping[str, object]], type_name: object,
                  seen: frozenset[str] = frozenset()) -> frozenset[str]:
    """The member names of an object type, including those of each variant of a union.

    A union's members depend on its tag (``blockdev-add``'s depend on ``driver``); the set
    here says which names some form of the command accepts, which is what forwarding needs.
    ``seen`` stops a (malformed) schema whose variants refer back to themselves.
    """
    if not isinstance(type_name, str) or type_name in seen or type_name not in by_name:
        return frozenset()
    entry = by_name[type_name]
    seen |= {type_name}
    names: set[str] = set()
    members = entry.get("members")
    if isinstance(members, list):
        names.update(m["name"] for m in members
                     if isinstance(m, Mapping) and isinstance(m.get("name"), str))
    variants = entry.get("variants")
    if isinstance(variants, list):
        for variant in variants:
            if isinstance(variant, Mapping):
                names |= _member_names(by_name, variant.get("type"), seen)
    return frozenset(names)
