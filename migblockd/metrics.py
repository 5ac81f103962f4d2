"""Prometheus metrics: the families, built when scraped, from the core's counters and live state.

The core counts with plain integers (:mod:`migblockd.stats`) and touches no
Prometheus object per request; :class:`DaemonCollector` turns those counters,
and what is true right now (the registry's per-mode lists, the connections,
the QEMU link), into metric families on each scrape.  It runs on the event
loop, between two turns (:mod:`migblockd.scrape`), and only reads.

Every metric, its labels and what it means for an alert are in
``docs/metrics.md``; the names are here only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from migblockd import __version__
from migblockd.core import Core
from migblockd.gate import GateHandlers
from migblockd.qemu_facts import ENDINGS
from migblockd.registry import Blocker
from migblockd.stats import Histogram

__all__ = ["DaemonCollector", "metrics_registry"]


class _ProcessCollector(ProcessCollector):
    """prometheus_client's, when /proc/stat is hidden too (systemd's ``ProcSubset=pid``,
    as the units set it): it needs the boot time only to date the process's start,
    and without it reports no ``process_*`` metric at all."""

    def _boot_time(self) -> float:
        with contextlib.suppress(OSError, ValueError, IndexError):
            found = super()._boot_time()  # type: ignore[no-untyped-call]
            if found:
                return float(found)
        # The clocks give it: /proc/PID/stat counts from boot on CLOCK_BOOTTIME.
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def metrics_registry(core: Core) -> CollectorRegistry:
    """A private registry (not prometheus_client's global one): the daemon's metrics and
    prometheus_client's usual ``process_*`` ones (CPU, memory, file descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(core))
    _ProcessCollector(registry=registry)
    return registry


class _Committed:
    """The blockers and the migration mode as committed: the registry with the changes
    whose commit is under way (or not begun) taken back, as a crash would take them.

    With durable state a change is acknowledged only once it is on disk: its
    reply, its events and every later command's waits for it, and a failed
    commit undoes it.  A scrape that showed it sooner would report a blocker
    no client has been told of, which a crash or a full disk then takes back
    (a gauge up and down, an alert on nothing).  Counters already count at
    the commit (the core's stats); these are the gauges' view.
    """

    def __init__(self, core: Core) -> None:
        self.registry = registry = core.registry
        self.mode = registry.mode
        #: The blockers the changes touched, as on disk (None: not there).
        self.touched: dict[str, Blocker | None] = {}
        # Newest first, as Registry.undo takes them back (and skips what it skips).
        for change in reversed(core.ledger.unsettled() if core.durable else []):
            blocker = change.blocker
            if change.kind == "mode":
                self.mode = str(change.old)
            elif change.kind == "add" and blocker is not None:
                self.touched[blocker.id] = None
            elif change.kind == "delete" and blocker is not None and (
                    blocker.connection is None or blocker.connection in core.connections):
                self.touched[blocker.id] = blocker

    def count(self, mode: str) -> int:
        """How many committed blockers block ``mode``."""
        count = self.registry.count(mode)
        for id, then in self.touched.items():
            now = self.registry.get(id)
            count += (then is not None and mode in then.modes) - (
                now is not None and mode in now.modes)
        return count

    def oldest(self, mode: str) -> Blocker | None:
        """The longest-registered committed blocker of ``mode``."""
        if not self.touched:
            return self.registry.oldest(mode)
        kept = next((b for b in self.registry.blockers(mode) if b.id not in self.touched), None)
        back = [b for b in self.touched.values() if b is not None and mode in b.modes]
        return min((b for b in (kept, *back) if b is not None), key=lambda b: b.seq,
                   default=None)


def _buckets(histogram: Histogram) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets (``+Inf`` last) and the sum in seconds, from one copy of the counts."""
    counts = list(histogram.counts)  # one read of each bucket: count == +Inf bucket
    total_ns = histogram.total_ns
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*map(repr, histogram.bounds), "+Inf"), counts, strict=True):
        running += count
        buckets.append((bound, running))
    return buckets, total_ns / 1e9


class DaemonCollector(Collector):
    """migblockd's own metrics, for one core."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def describe(self) -> list[Metric]:
        # Registering must not scrape (the registry would call collect() instead).
        return []

    def collect(self) -> Iterator[Metric]:
        committed = _Committed(self.core)
        yield from self._state(committed)
        yield from self._blockers(committed)
        yield from self._migrations()
        yield from self._clients()
        yield from self._commands()
        if self.core.durable:
            yield from self._commits()
        if isinstance(self.core.handlers, GateHandlers):
            yield GaugeMetricFamily(
                "migblockd_qemu_connected",
                "1 while migblockd is connected to the gated QEMU's monitor, else 0",
                value=1 if self.core.handlers.qemu.connected else 0)
            # Connected says nothing of a stopped QEMU, whose commands all time out;
            # nor does not connected of one that accepted the connection and is silent
            # (another client holds its monitor), whose adds are refused as busy.
            yield GaugeMetricFamily(
                "migblockd_qemu_unresponsive",
                "1 while the gated QEMU has answered no command since one timed out "
                "(qemu-timeout), or has not greeted or answered within 5 s of accepting "
                "migblockd's connection, else 0",
                value=1 if self.core.handlers.qemu.unresponsive else 0)
            # A link lost and made again between two scrapes shows in neither gauge.
            yield _by_reason(
                "migblockd_qemu_connections_lost",
                "Connections to the gated QEMU's monitor that were up and were lost, by "
                "who ended them: closed (QEMU: it exited, was restarted, or closed the "
                "connection) or dropped (migblockd, over a message it could not take)",
                dict(self.core.handlers.qemu.lost))

    # -- what is true now ------------------------------------------------------------
    def _state(self, committed: _Committed) -> Iterator[Metric]:
        info = GaugeMetricFamily("migblockd_build_info", "The running migblockd's version",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        registry = self.core.registry
        current = committed.mode
        mode = GaugeMetricFamily(
            "migblockd_migration_mode",
            "The migration mode migrate uses (1) among the modes (0); set with "
            "migrate-set-parameters", labels=["mode"])
        for name in registry.modes:
            mode.add_metric([name], 1 if name == current else 0)
        yield mode

    def _blockers(self, committed: _Committed) -> Iterator[Metric]:
        core, registry = self.core, self.core.registry
        current = committed.mode
        blockers = GaugeMetricFamily(
            "migblockd_blockers",
            "Blockers registered now, per mode they block; source=\"qemu\": QEMU's own "
            "(gate only), as of the latest query-migrate answer", labels=["source", "mode"])
        for mode in registry.modes:
            blockers.add_metric(["migblockd", mode], committed.count(mode))
        handlers = core.handlers
        if isinstance(handlers, GateHandlers):
            seen = handlers.qemu.blockers
            if handlers.qemu.connected and seen is not None:
                # As query-blockers lists them: QEMU's current mode's (normal before 8.2).
                blockers.add_metric(["qemu", handlers.qemu_mode(current)], seen)
        yield blockers
        oldest = committed.oldest(current)
        if oldest is not None:
            yield GaugeMetricFamily(
                "migblockd_blocked_since_seconds",
                "When the oldest of migblockd's blockers of the current mode was added "
                "(Unix time); absent while none blocks it", value=oldest.added)
        stats = core.stats
        yield CounterMetricFamily("migblockd_blockers_added",
                                  "Blockers added (add-blocker accepted)",
                                  value=stats.blockers_added)
        deleted = CounterMetricFamily(
            "migblockd_blockers_deleted",
            "Blockers deleted, by cause: del-blocker (command) or their connection closed",
            labels=["cause"])
        for cause, count in stats.blockers_deleted.items():
            deleted.add_metric([cause], count)
        yield deleted
        yield _by_reason("migblockd_blockers_refused", "add-blocker refusals, by reason",
                         stats.blockers_refused)

    def _migrations(self) -> Iterator[Metric]:
        core = self.core
        stats = core.stats
        handlers = core.handlers
        yield CounterMetricFamily("migblockd_migrations_started",
                                  "Migrations started (migrate accepted)",
                                  value=stats.migrations_started)
        yield _by_reason("migblockd_migrations_refused", "migrate refusals, by reason",
                         stats.migrations_refused)
        if isinstance(handlers, GateHandlers):
            ended = dict(handlers.qemu.ended)
        else:
            entered = core.registry.entered
            ended = {status: entered[status] for status in ENDINGS}
        family = CounterMetricFamily(
            "migblockd_migrations_ended",
            "Migrations started through migblockd that ended, by final status",
            labels=["status"])
        for status in ENDINGS:
            family.add_metric([status], ended[status])
        yield family

    def _clients(self) -> Iterator[Metric]:
        core, stats = self.core, self.core.stats
        yield GaugeMetricFamily("migblockd_clients", "Clients connected now",
                                value=len(core.connections))
        yield CounterMetricFamily(
            "migblockd_connections",
            "Connections accepted (those turned away included)",
            value=stats.connections)
        yield _by_reason("migblockd_connections_refused",
                         "Connections turned away, by reason: max-clients, "
                         "max-clients-per-uid, or no file descriptor to serve them with",
                         stats.connections_refused)
        yield CounterMetricFamily("migblockd_clients_dropped",
                                  "Clients disconnected for unread events past max-output",
                                  value=stats.dropped)
        yield CounterMetricFamily("migblockd_events_discarded",
                                  "Events not sent to a client kept past max-output, as it "
                                  "holds connection-scoped blockers (one per event and client)",
                                  value=stats.events_discarded)

    def _commands(self) -> Iterator[Metric]:
        stats = self.core.stats
        total = CounterMetricFamily("migblockd_commands", "Commands answered, by result",
                                    labels=["command", "result"])
        latency = HistogramMetricFamily(
            "migblockd_command_duration_seconds",
            "From a command's start to its reply (waits for the disk or QEMU included)",
            labels=["command"])
        for name, command in stats.commands.items():
            total.add_metric([name, "ok"], command.ok)
            total.add_metric([name, "error"], command.errors)
            # Most of a scrape's size and time: only for the commands that have run.
            if command.ok or command.errors:
                buckets, seconds = _buckets(command.latency)
                latency.add_metric([name], buckets, seconds)
        yield total
        yield latency
        yield CounterMetricFamily(
            "migblockd_protocol_replies",
            "Requests the QMP layer answered without running a command: qmp_capabilities, "
            "and those refused for their JSON, envelope, command name or arguments",
            value=stats.protocol_replies)

    def _commits(self) -> Iterator[Metric]:
        stats = self.core.stats
        family = HistogramMetricFamily(
            "migblockd_commit_duration_seconds",
            "Group commits of durable changes to the state directory, from hand-over to done")
        buckets, seconds = _buckets(stats.commits)
        family.add_metric([], buckets, seconds)
        yield family
        yield CounterMetricFamily("migblockd_commit_failures",
                                  "Group commits that failed (their commands were undone)",
                                  value=stats.commit_failures)


def _by_reason(name: str, documentation: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in counts.items():
        family.add_metric([reason], count)
    return family
