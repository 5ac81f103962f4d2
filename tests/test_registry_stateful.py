"""The registry against a tiny reference model of QEMU's per-mode blocker lists.

The model keeps, like migration.c, one plain list per mode with the newest
blocker at the front (``g_slist_prepend``), and a hand-written status machine for
the simulated migration.  Hypothesis drives both with random sequences of add,
del, release, mode and capability changes, migrate, cancel, query-migrate and
clock ticks (with or without the server's timer firing), comparing every answer,
error desc and queued event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from migblockd.registry import SETUP_SHARE, BlockerError, FakeClock, Owner, Registry
from migblockd.render import blocker_info, event_data
from migblockd.resolver import user_name

MODES = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")
REASONS = ("vmdk", "vfio", "sev", "vmdk")  # a repeated reason makes two blockers
CLIENT_IDS = ("a", "b", "c.d-e_f", "9x", "", "#blocker0", "a b")
ALL_IDS = (*CLIENT_IDS, "#blocker0", "#blocker1", "#blocker2", "#blocker3", "nope")
URIS = ("tcp:h:1", "unix:/s", "exec:cat", "fd:3", "file:/f", "rdma:h:1", "vsock:3:4", "ftp:x", "")
SCHEMES = ("tcp:", "unix:", "exec:", "fd:", "file:", "rdma:", "vsock:")
_ADDR = {"transport": "socket", "type": "unix", "path": "/run/dest.sock"}
MAIN, CPR = ({"channel-type": t, "addr": _ADDR} for t in ("main", "cpr"))
FILE_MAIN = {"channel-type": "main",
             "addr": {"transport": "file", "filename": "/f", "offset": 0}}
# Where a migrate goes: a URI, or channels (QEMU 8.2+), or both, or neither.
DESTINATIONS: tuple[tuple[str | None, list[dict[str, Any]] | None], ...] = (
    *((uri, None) for uri in URIS),
    (None, [MAIN]), (None, [MAIN, CPR]), (None, [CPR, MAIN]), (None, [CPR]), (None, []),
    (None, [MAIN, MAIN]), (None, None), ("tcp:h:1", [MAIN]), (None, [FILE_MAIN, CPR]),
    (None, [FILE_MAIN]), (None, [CPR, CPR, MAIN, MAIN]),
)
RUNNING = {"setup", "active", "cancelling"}  # the statuses the simulation reaches
CONNECTIONS = ("c1", "c2")


@dataclass
class ModelBlocker:
    id: str
    reason: str
    modes: tuple[str, ...]
    internal: bool
    scope: str
    connection: str | None
    owner: Owner | None


class Model:
    """QEMU's data structures and rules, written as plainly as possible."""

    def __init__(self, only_migratable: bool, migration_time: float, now: float) -> None:
        self.only_migratable = only_migratable
        self.migration_time = migration_time
        self.lists: dict[str, list[str]] = {m: [] for m in MODES}  # newest first
        self.blockers: dict[str, ModelBlocker] = {}  # insertion order = oldest first
        self.serial = 0
        self.mode = "normal"
        self.events_on = False
        self.status: str | None = None
        self.now = now
        self.start = self.setup_end = self.complete_at = self.cancel_at = 0.0
        self.setup_ms = self.total_ms = 0
        self.events: list[tuple[str, dict[str, Any]]] = []

    def set_status(self, status: str) -> None:
        self.status = status
        if self.events_on:
            self.events.append(("MIGRATION", {"status": status}))

    def catch_up(self) -> None:
        """Apply the transitions whose time has come, each at its own time."""
        while True:
            if self.status == "setup" and self.setup_end <= self.now:
                self.setup_ms = round((self.setup_end - self.start) * 1000)
                self.set_status("active")
            elif self.status == "active" and self.complete_at <= self.now:
                self.total_ms = round((self.complete_at - self.start) * 1000)
                self.set_status("completed")
            elif self.status == "cancelling" and self.cancel_at <= self.now:
                self.set_status("cancelled")
            else:
                return

    def info(self, b: ModelBlocker) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": b.id, "reason": b.reason, "modes": list(b.modes),
            "internal": b.internal, "scope": b.scope,
        }
        if b.owner is not None:
            out["owner"] = {"pid": b.owner.pid, "uid": b.owner.uid, "gid": b.owner.gid}
            if (name := user_name(b.owner.uid)) is not None:
                out["owner"]["user"] = name
        out["source"] = "migblockd"
        return out

    def add(self, reason: str, modes: list[str] | None, internal: bool, id: str | None,
            scope: str, connection: str | None, owner: Owner | None) -> dict[str, Any] | str:
        """The new blocker's info (without 'added'), or the error desc."""
        self.catch_up()
        if modes is not None and not modes:
            return "Parameter 'modes' expects a non-empty list"
        if id is not None:
            ok = (id[:1].isascii() and id[:1].isalpha()
                  and all(c.isascii() and (c.isalnum() or c in "-._") for c in id))
            if not ok:
                return "Parameter 'id' expects an identifier"
            if id in self.blockers:
                return f"Duplicate blocker ID '{id}'"
        wanted = MODES if modes is None else tuple(m for m in MODES if m in modes)
        if self.only_migratable and not internal and "normal" in wanted:
            return f"disallowing migration blocker (--only-migratable) for: {reason}"
        if self.status in RUNNING:
            return f"disallowing migration blocker (migration/snapshot in progress) for: {reason}"
        if id is None:
            id = f"#blocker{self.serial}"
            self.serial += 1
        b = ModelBlocker(id, reason, wanted, internal, scope, connection, owner)
        self.blockers[id] = b
        for m in wanted:
            self.lists[m].insert(0, id)
        self.events.append(("BLOCKER_ADDED", self.info(b)))  # 'added' checked separately
        return self.info(b)

    def remove(self, id: str, cause: str) -> None:
        del self.blockers[id]
        for m in MODES:  # migrate_del_blocker(): every mode, whatever it was added with
            if id in self.lists[m]:
                self.lists[m].remove(id)
        self.events.append(("BLOCKER_DELETED", {"id": id, "cause": cause}))

    def delete(self, id: str) -> str | None:
        self.catch_up()
        if id not in self.blockers:
            return f"Blocker '{id}' not found"
        self.remove(id, "command")
        return None

    def release(self, connection: str) -> list[str]:
        self.catch_up()
        gone = [b.id for b in self.blockers.values()
                if b.scope == "connection" and b.connection == connection]
        for id in gone:
            self.remove(id, "connection-closed")
        return gone

    def migrate(self, uri: str | None, channels: list[dict[str, Any]] | None) -> str | None:
        self.catch_up()
        if (uri is None) == (not channels):
            return "need either 'uri' or 'channels' argument"
        # QEMU master's migration_channel_parse_input(), then
        # migration_transport_compatible(); a URI in cpr-transfer mode as 10.x says.
        types = [c["channel-type"] for c in channels or []]
        for index, kind in enumerate(types):
            if kind in types[:index]:
                return f"Channel list has more than one {kind} entry"
        cpr_transfer = self.mode == "cpr-transfer"
        if channels and cpr_transfer and "cpr" not in types:
            return "missing 'cpr' migration channel"
        if channels and "main" not in types:
            return "Channel list has no main entry"
        if uri is not None and not any(uri.startswith(s) for s in SCHEMES):
            return f"unknown migration protocol: {uri}"
        to_file = (uri or "").startswith("file:") or any(
            c["channel-type"] == "main" and c["addr"].get("transport") == "file"
            for c in channels or [])
        if cpr_transfer and to_file:
            return "Migration requires streamable transport (eg unix)"
        if cpr_transfer and uri is not None:
            return "missing 'cpr' migration channel"
        if self.status in RUNNING:
            return "There's a migration process in progress"
        if self.lists[self.mode]:
            return self.blockers[self.lists[self.mode][0]].reason
        self.start = self.now
        self.setup_end = self.now + self.migration_time * SETUP_SHARE
        self.complete_at = self.now + self.migration_time
        self.setup_ms = self.total_ms = 0
        self.set_status("setup")
        return None

    def cancel(self) -> None:
        self.catch_up()
        if self.status in RUNNING:
            self.cancel_at = self.now
            self.set_status("cancelling")

    def set_events(self, on: bool) -> str | None:
        self.catch_up()
        if self.status in RUNNING:
            return "There's a migration process in progress"
        self.events_on = on
        return None

    def set_mode(self, mode: str) -> None:
        self.catch_up()
        self.mode = mode

    def query(self) -> dict[str, Any]:
        self.catch_up()
        out: dict[str, Any] = {}
        if self.status is not None:
            out["status"] = self.status
            if self.status == "active":
                out["total-time"] = round((self.now - self.start) * 1000)
                out["setup-time"] = self.setup_ms
            elif self.status == "completed":
                out["total-time"] = self.total_ms
                out["setup-time"] = self.setup_ms
        if self.lists[self.mode]:
            newest_first = self.lists[self.mode]
            out["blocked-reasons"] = [self.blockers[i].reason for i in reversed(newest_first)]
        return out


class RegistryMachine(RuleBasedStateMachine):
    registry: Registry
    model: Model
    clock: FakeClock
    conns: dict[str, object]

    def __init__(self) -> None:
        super().__init__()
        self.ready = False

    @initialize(only_migratable=st.booleans(), migration_time=st.sampled_from([0.0, 0.2, 1.0]))
    def start(self, only_migratable: bool, migration_time: float) -> None:
        self.clock = FakeClock()
        self.registry = Registry(MODES, only_migratable=only_migratable,
                                 migration_time=migration_time, clock=self.clock)
        self.model = Model(only_migratable, migration_time, self.clock.monotonic())
        self.conns = {name: object() for name in CONNECTIONS}
        self.ready = True

    def check_events(self) -> None:
        got = [(e.name, event_data(e)) for e in self.registry.take_events()]
        # 'added' is the clock's wall time; the model leaves it out.
        for name, data in got:
            if name == "BLOCKER_ADDED":
                assert data.pop("added") == _split(self.clock.time())
        assert got == self.model.events
        self.model.events = []

    @rule(
        reason=st.sampled_from(REASONS),
        modes=st.none() | st.lists(st.sampled_from(MODES), max_size=5),
        internal=st.booleans(),
        id=st.none() | st.sampled_from(CLIENT_IDS),
        where=st.sampled_from([("daemon", None), ("daemon", "c1"), ("connection", "c1"),
                               ("connection", "c2")]),
        owner=st.none() | st.just(Owner(42, 1000, 1000)),
    )
    def add(self, reason: str, modes: list[str] | None, internal: bool, id: str | None,
            where: tuple[str, str | None], owner: Owner | None) -> None:
        self.registry.advance()  # as the core does before every command
        scope, conn = where
        expected = self.model.add(reason, modes, internal, id, scope, conn, owner)
        try:
            blocker = self.registry.add(
                reason, modes=modes, internal=internal, id=id, scope=scope, owner=owner,
                connection=None if conn is None else self.conns[conn],
            )
        except BlockerError as exc:
            assert str(exc) == expected
        else:
            info = blocker_info(blocker)
            assert info.pop("added") == _split(self.clock.time())
            assert info == expected
        self.check_events()

    @rule(id=st.sampled_from(ALL_IDS))
    def delete(self, id: str) -> None:
        self.registry.advance()  # as the core does before every command
        expected = self.model.delete(id)
        try:
            assert self.registry.delete(id).id == id
        except BlockerError as exc:
            assert str(exc) == expected
        else:
            assert expected is None
        self.check_events()

    @rule(conn=st.sampled_from(CONNECTIONS))
    def release(self, conn: str) -> None:
        self.registry.advance()  # as the core does before every command
        expected = self.model.release(conn)
        assert [b.id for b in self.registry.release(self.conns[conn])] == expected
        self.check_events()

    @rule(mode=st.sampled_from(MODES))
    def set_mode(self, mode: str) -> None:
        self.registry.advance()  # as the core does before every command
        self.model.set_mode(mode)
        self.registry.set_mode(mode)
        assert self.registry.mode == mode
        self.check_events()

    @rule(on=st.booleans())
    def set_events(self, on: bool) -> None:
        self.registry.advance()  # as the core does before every command
        expected = self.model.set_events(on)
        try:
            self.registry.set_events(on)
        except BlockerError as exc:
            assert str(exc) == expected
        else:
            assert expected is None
        assert self.registry.events_enabled == self.model.events_on
        self.check_events()

    @rule(destination=st.sampled_from(DESTINATIONS))
    def migrate(self, destination: tuple[str | None, list[dict[str, Any]] | None]) -> None:
        uri, channels = destination
        self.registry.advance()  # as the core does before every command
        expected = self.model.migrate(uri, channels)
        try:
            self.registry.migrate(uri, channels=channels)
        except BlockerError as exc:
            assert str(exc) == expected
        else:
            assert expected is None
        self.check_events()

    @rule()
    def cancel(self) -> None:
        self.registry.advance()  # as the core does before every command
        self.model.cancel()
        self.registry.cancel()
        self.check_events()

    @rule()
    def query_migrate(self) -> None:
        self.registry.advance()  # as the core does before every command
        assert self.registry.query_migrate() == self.model.query()
        self.check_events()

    @rule(seconds=st.sampled_from([0.0, 0.01, 0.02, 0.1, 0.3, 1.0]), fire=st.booleans())
    def tick(self, seconds: float, fire: bool) -> None:
        self.clock.advance(seconds)
        self.model.now = self.clock.monotonic()
        if fire:
            # What the server's timer does once next_deadline() has passed.
            deadline = self.registry.next_deadline()
            self.registry.advance()
            self.model.catch_up()
            if deadline is not None and deadline > self.clock.monotonic():
                assert self.registry.next_deadline() == deadline
            self.check_events()

    @precondition(lambda self: self.ready)
    @invariant()
    def lists_match(self) -> None:
        # Plain reads: they must not apply transitions, so the model is not caught up.
        registry, model = self.registry, self.model
        assert [b.id for b in registry.blockers()] == list(model.blockers)
        assert len(registry) == len(model.blockers)
        for m in MODES:
            assert [b.id for b in registry.blockers(m)] == list(reversed(model.lists[m]))
            newest = registry.newest(m)
            head = model.lists[m][0] if model.lists[m] else None
            assert (newest.id if newest else None) == head
        assert registry.take_events() == []


def _split(wall: float) -> dict[str, int]:
    micro = round(wall * 1_000_000)
    return {"seconds": micro // 1_000_000, "microseconds": micro % 1_000_000}


RegistryMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRegistryAgainstModel = RegistryMachine.TestCase
