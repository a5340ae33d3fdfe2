"""Prometheus metrics of a running server (issue 18): an HTTP endpoint (`/metrics`) whose every scrape reads
`HierarchicalParameterServer.stats()` - nothing is counted twice, nothing is kept here.

    >>> exporter = MetricsExporter(hps, port=9464)     # or deployment config `metrics_port: 9464`
    >>> # curl http://127.0.0.1:9464/metrics
    >>> exporter.close()

Exported, labelled model / table / device (device "uncached": GPU keys of a table without a cache):
- counters `hps_lookups_total`, `hps_keys_total`, `hps_cache_hits_total`, `hps_cache_misses_total`,
  `hps_defaults_served_total`, `hps_cache_inserts_total`, `hps_cache_evictions_total`,
  `hps_cache_refused_inserts_total`, `hps_updates_total`, `hps_second_level_hits_total`, and
  `hps_tier_hits_total` (+ label tier: keys each tier answered for the table);
- gauges `hps_hit_rate`, `hps_cache_size_rows`, `hps_cache_memory_bytes`, and `hps_lookup_latency_seconds`
  (+ labels stage, quantile: 0.5 / 0.9 / 0.99 of the last 8,192 lookups per stage - a window, not since start);
- per tier and table tag: counters `hps_tier_fetches_total`, `hps_tier_keys_requested_total`,
  `hps_tier_keys_found_total`, `hps_tier_keys_inserted_total`, `hps_tier_keys_evicted_total`,
  `hps_tier_errors_total`;
- with a streamed update source: counters `hps_update_applied_messages_total`, `hps_update_applied_rows_total`,
  `hps_update_failed_messages_total`, `hps_update_retries_total`, gauge `hps_update_lag_entries`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

__all__ = ["MetricsExporter", "ServerCollector"]

_TABLE_LABELS = ["model", "table", "device"]
# stats() key -> (metric name without _total, help)
_COUNTERS = {
    "lookups": ("hps_lookups", "lookup calls"),
    "keys": ("hps_keys", "keys looked up"),
    "cache_hits": ("hps_cache_hits", "keys the device's cache (or resident table) answered"),
    "cache_misses": ("hps_cache_misses", "keys the cache did not hold"),
    "defaults_served": ("hps_defaults_served", "keys no tier held: the table's default vector"),
    "inserts": ("hps_cache_inserts", "rows inserted into the cache"),
    "evictions": ("hps_cache_evictions", "rows evicted from the cache"),
    "refused_inserts": ("hps_cache_refused_inserts", "inserts refused (full bucket, or not admitted)"),
    "updates": ("hps_updates", "update() calls that reached the cache"),
    "second_level_hits": ("hps_second_level_hits", "misses answered by the host-mapped second level"),
}
_GAUGES = {
    "hit_rate": ("hps_hit_rate", "cache hits / keys since start"),
    "cache_size": ("hps_cache_size_rows", "rows held by the cache"),
    "cache_memory_bytes": ("hps_cache_memory_bytes", "device memory of the cache or resident table"),
}
_TIER_COUNTERS = ("fetches", "keys_requested", "keys_found", "keys_inserted", "keys_evicted", "errors")
_QUANTILES = {"0.5": "p50_ms", "0.9": "p90_ms", "0.99": "p99_ms"}


class ServerCollector:
    """A prometheus_client collector reading one server's stats() at each scrape."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        try:
            stats = self.server.stats()
        except RuntimeError:  # the server was closed: nothing to report
            return
        counters = {k: CounterMetricFamily(name, help_, labels=_TABLE_LABELS) for k, (name, help_) in _COUNTERS.items()}
        gauges = {k: GaugeMetricFamily(name, help_, labels=_TABLE_LABELS) for k, (name, help_) in _GAUGES.items()}
        tier_hits = CounterMetricFamily("hps_tier_hits", "keys each tier answered for the table",
                                        labels=_TABLE_LABELS + ["tier"])
        latency = GaugeMetricFamily("hps_lookup_latency_seconds", "lookup latency quantiles over the recent window",
                                    labels=_TABLE_LABELS + ["stage", "quantile"])
        for model, tables in stats["models"].items():
            for table, devices in tables.items():
                for device, s in devices.items():
                    labels = [model, table, device]
                    for key, family in counters.items():
                        if key in s:
                            family.add_metric(labels, float(s[key]))
                    for key, family in gauges.items():
                        if key in s:
                            family.add_metric(labels, float(s[key]))
                    for tier, hits in s.get("tier_hits", {}).items():
                        tier_hits.add_metric(labels + [tier], float(hits))
                    for stage, summary in s.get("latency", {}).items():
                        if not isinstance(summary, dict) or not summary.get("count"):
                            continue
                        for quantile, key in _QUANTILES.items():
                            if key in summary:
                                latency.add_metric(labels + [stage, quantile], summary[key] / 1e3)
        yield from counters.values()
        yield from gauges.values()
        yield tier_hits
        yield latency
        tier_families = {k: CounterMetricFamily(f"hps_tier_{k}", f"tier {k.replace('_', ' ')}",
                                                labels=["tier", "table_tag"]) for k in _TIER_COUNTERS}
        for tier, tags in stats["tiers"].items():
            for tag, s in tags.items():
                for key, family in tier_families.items():
                    family.add_metric([tier, tag], float(s.get(key, 0)))
        yield from tier_families.values()
        updates = stats.get("update_source")
        if updates is not None:  # a streamed update source (hps_core.update_stream)
            for key, help_ in (("applied_messages", "update messages applied"), ("applied_rows", "rows applied"),
                               ("failed_messages", "update messages dropped (they can never apply)"),
                               ("retries", "update reads retried after an error")):
                family = CounterMetricFamily(f"hps_update_{key}", help_)
                family.add_metric([], float(updates[key]))
                yield family
            lag = GaugeMetricFamily("hps_update_lag_entries", "stream entries not yet applied (undelivered + pending)")
            lag.add_metric([], float(updates["lag"]))
            yield lag


class MetricsExporter:
    """`/metrics` over HTTP for one server, on its own registry (two servers in one process do not collide).

    Args:
        server: a HierarchicalParameterServer. port: TCP port (0: any free one; `self.port` says which).
        addr: the address to listen on (default the loopback interface: expose it on purpose).
    """

    def __init__(self, server: Any, port: int, addr: str = "127.0.0.1") -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be an int in 0..65535, found {port!r}")
        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(server))
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = int(self._httpd.server_address[1])
        self.addr = addr
        log.info("metrics on http://%s:%d/metrics", addr, self.port)

    def close(self) -> None:
        """Stop serving. Idempotent."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None
