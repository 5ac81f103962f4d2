"""Reading a metrics scrape back with prometheus_client's own parser, for exact comparisons."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from migblockd import __version__

Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


@dataclass
class Scrape:
    """Every sample of one scrape: ``(name, sorted labels) -> value``, and the families' types."""

    samples: dict[Key, float]
    types: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[Key, float] = {}
        types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for sample in family.samples:
                k = key(sample.name, **sample.labels)
                assert k not in samples, f"duplicate sample {k}"
                samples[k] = sample.value
        return cls(samples, types)

    def value(self, name: str, **labels: str) -> float:
        return self.samples[key(name, **labels)]

    def plain(self) -> dict[Key, float]:
        """migblockd's counters and gauges, and its histograms' counts (buckets and sums
        are checked by :meth:`histogram`)."""
        return {k: v for k, v in self.samples.items() if k[0].startswith("migblockd_")
                and not k[0].endswith(("_bucket", "_sum"))}

    def histogram(self, name: str, **labels: str) -> tuple[list[tuple[float, float]], float]:
        """(cumulative buckets as (le, count), sum); checks that they agree with _count."""
        buckets = sorted(
            (float(dict(k[1])["le"]), v) for k, v in self.samples.items()
            if k[0] == f"{name}_bucket"
            and {n: x for n, x in k[1] if n != "le"} == labels)
        assert buckets, f"no buckets for {name} {labels}"
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{name} {labels}: buckets are not cumulative"
        assert buckets[-1] == (float("inf"), self.value(f"{name}_count", **labels))
        return buckets, self.value(f"{name}_sum", **labels)


MODES = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")
ADD_REASONS = ("access", "quota", "invalid", "duplicate-id", "only-migratable", "busy", "qemu",
               "qemu-unavailable", "internal")
MIGRATE_REASONS = ("access", "invalid", "blocked", "in-progress", "not-paused", "mode", "qemu",
                   "qemu-unavailable", "internal")


def commands(expected: dict[Key, float], command: str, ok: int = 0, error: int = 0) -> None:
    """Expect ``command`` to have run ``ok`` + ``error`` times."""
    expected[key("migblockd_commands_total", command=command, result="ok")] = ok
    expected[key("migblockd_commands_total", command=command, result="error")] = error
    if ok + error:  # a command's histogram appears once it has run
        expected[key("migblockd_command_duration_seconds_count", command=command)] = ok + error


def baseline(command_names: Iterable[str], *, durable: bool) -> dict[Key, float]:
    """Every plain series of a fresh simulating daemon, at zero (the mode: normal)."""
    expected: dict[Key, float] = {key("migblockd_build_info", version=__version__): 1}
    for mode in MODES:
        expected[key("migblockd_migration_mode", mode=mode)] = 1 if mode == "normal" else 0
        expected[key("migblockd_blockers", source="migblockd", mode=mode)] = 0
    for name in ("blockers_added", "migrations_started", "connections", "clients_dropped",
                 "events_discarded", "protocol_replies"):
        expected[key(f"migblockd_{name}_total")] = 0
    for reason in ("max-clients", "max-clients-per-uid", "descriptors"):
        expected[key("migblockd_connections_refused_total", reason=reason)] = 0
    for cause in ("command", "connection-closed"):
        expected[key("migblockd_blockers_deleted_total", cause=cause)] = 0
    for reason in ADD_REASONS:
        expected[key("migblockd_blockers_refused_total", reason=reason)] = 0
    for reason in MIGRATE_REASONS:
        expected[key("migblockd_migrations_refused_total", reason=reason)] = 0
    for status in ("completed", "failed", "cancelled"):
        expected[key("migblockd_migrations_ended_total", status=status)] = 0
    expected[key("migblockd_clients")] = 0
    if durable:
        expected[key("migblockd_commit_duration_seconds_count")] = 0
        expected[key("migblockd_commit_failures_total")] = 0
    for command in command_names:
        commands(expected, command)
    return expected
