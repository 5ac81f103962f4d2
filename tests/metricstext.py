"""Reading a metrics scrape back with prometheus_client's own parser, for exact comparisons."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

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
