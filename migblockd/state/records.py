"""What the store holds and the changes it applies, as plain values.

The store knows no registry rules: a :class:`BlockerRow` is what a
daemon-scoped blocker looks like on disk, and a group of changes
(:data:`Change`) is applied in order, all or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BlockerRow", "Change", "Delete", "Put", "Setting", "Snapshot"]


@dataclass(frozen=True, slots=True)
class BlockerRow:
    """One daemon-scoped blocker.

    ``modes`` lists the modes it blocks (never empty), or is None for one
    that blocks every mode (QEMU's ``MIG_MODE_ALL``): every mode of the schema
    of the day, including those added after it was stored; ``owner`` is the
    ``(pid, uid, gid)`` of the client that added it, or None; ``added`` is
    the wall time it was added; ``seq`` ranks blockers by age (larger is
    newer), so the registry can rebuild its lists in the same order.
    """

    id: str
    reason: str
    modes: tuple[str, ...] | None
    internal: bool
    owner: tuple[int, int, int] | None
    added: float
    seq: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything on disk: the blockers, oldest first (by ``seq``), and the
    settings (JSON values by key, e.g. ``"mode"``, ``"events"``, ``"id-floor"``)."""

    blockers: list[BlockerRow]
    settings: dict[str, object]


@dataclass(frozen=True, slots=True)
class Put:
    """Insert a blocker, or replace the one with the same id."""

    row: BlockerRow


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove the blocker with this id (nothing happens if there is none)."""

    id: str


@dataclass(frozen=True, slots=True)
class Setting:
    """Set ``key`` to ``value``, any value :func:`json.dumps` accepts."""

    key: str
    value: object


Change = Put | Delete | Setting
