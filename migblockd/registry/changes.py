"""What the registry tells the core: events for clients, changes for the disk."""

from __future__ import annotations

from dataclasses import dataclass

from migblockd.registry.blockers import Blocker

__all__ = ["Change", "Event"]


@dataclass(frozen=True, slots=True)
class Event:
    """Something clients hear about, as domain facts (the core words them).

    ``name`` is the QMP event: ``BLOCKER_ADDED`` and ``BLOCKER_DELETED`` carry
    the ``blocker`` (and, deleted, the ``detail`` cause: ``command`` or
    ``connection-closed``); ``MIGRATION`` carries the new status in
    ``detail``.  ``when`` is the wall time it happened.
    """

    name: str
    when: float
    blocker: Blocker | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    """One mutation, recorded for the core: to persist it, or to undo it.

    ``kind`` is ``add`` or ``delete`` (of ``blocker``), ``mode``, ``events``,
    ``parameters`` (never stored) or ``id-floor`` (from ``old`` to ``new``).
    ``durable`` changes are the ones that outlive the daemon: daemon-scoped
    blockers and the settings.  A setting set to the value it had is a change
    too, not durable (nothing to store): while that value waits for its
    commit, the command stands on it.
    """

    kind: str
    durable: bool
    blocker: Blocker | None = None
    old: object = None
    new: object = None
