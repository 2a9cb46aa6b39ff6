"""Prometheus metrics of one server, read from `engine.stats()` when scraped (nothing to keep in step).

Token and request counts are counters (`rate()` gives tokens/s); the hit and acceptance rates are also given
as ratios since start, for a glance without PromQL.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_GAUGES = {"queue_len": ("dsv4_queue_length", "requests waiting for a cache row"),
           "running": ("dsv4_running_requests", "requests holding a cache row")}
_COUNTERS = {"prefill_tokens": ("dsv4_prefill_tokens", "prompt tokens prefilled"),
             "decode_tokens": ("dsv4_decode_tokens", "tokens generated"),
             "prefix_lookup_tokens": ("dsv4_prefix_cache_lookup_tokens", "prompt tokens looked up in the prefix cache"),
             "prefix_hit_tokens": ("dsv4_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache"),
             "spec_drafted": ("dsv4_spec_drafted_tokens", "tokens drafted by speculative decoding"),
             "spec_accepted": ("dsv4_spec_accepted_tokens", "drafted tokens accepted")}
_RATIOS = {"dsv4_prefix_cache_hit_rate": ("prefix_hit_tokens", "prefix_lookup_tokens",
                                          "prefix-cache hit tokens / looked-up tokens since start"),
           "dsv4_spec_acceptance_rate": ("spec_accepted", "spec_drafted",
                                         "accepted / drafted speculative tokens since start")}


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        for key, (name, doc) in _GAUGES.items():
            if key in s:
                yield GaugeMetricFamily(name, doc, value=float(s[key]))
        for key, (name, doc) in _COUNTERS.items():
            if key in s:
                yield CounterMetricFamily(name, doc, value=float(s[key]))
        for name, (num, den, doc) in _RATIOS.items():
            if den in s:
                yield GaugeMetricFamily(name, doc, value=float(s.get(num, 0)) / s[den] if s[den] else 0.0)


class ServerMetrics:
    """A registry per app (two servers in one process do not share metrics)."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.finished = Counter("dsv4_requests_finished", "choices finished, by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.errors = Counter("dsv4_http_errors", "requests answered with an error, by status",
                              ["status"], registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)
