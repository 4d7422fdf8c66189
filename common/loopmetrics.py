"""Histograms for the data path: plain numbers, exposed at scrape time.

prometheus_client's Counter and Histogram take a lock on every update, a
noticeable share of a small request's CPU when every request makes several.
These histograms keep plain Python numbers instead (and the server derives
its page counters from one of them at scrape time). Only the event loop's thread updates them; a scrape runs
in another thread and reads a copy of each series, so a histogram's sum may lag
its count by the one observation in progress, never more.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class Series:
    """One histogram series: a count per bucket (values <= each bound, then the rest) and a sum."""

    __slots__ = ("_bounds", "counts")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0.0] * (len(bounds) + 2)  # the last is the sum

    def observe(self, value: float) -> None:
        counts = self.counts
        counts[bisect.bisect_left(self._bounds, value)] += 1
        counts[-1] += value


class Histogram(Collector):
    """A labelled histogram, like prometheus_client's, without its lock."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        if list(self._bounds) != sorted(set(self._bounds)):
            raise ValueError(f"{name}: buckets must be distinct and in increasing order")
        self._series: dict[tuple[str, ...], Series] = {}
        registry.register(self)

    def labels(self, *values: object) -> Series:
        """The series of these label values (callers on the hot path keep it)."""
        key = tuple(map(str, values))  # as prometheus_client: 1 and "1" are one series
        series = self._series.get(key)
        if series is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self.name} takes labels {self._labelnames}, got {values}")
            series = self._series[key] = Series(self._bounds)
        return series

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self._documentation, labels=self._labelnames)
        bounds = [*map(floatToGoString, self._bounds), "+Inf"]  # as prometheus_client writes them
        for values, series in list(self._series.items()):
            counts = list(series.counts)  # one copy: buckets and count agree
            cumulative, buckets = 0.0, []
            for bound, n in zip(bounds, counts[:-1], strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, counts[-1])
        yield family
