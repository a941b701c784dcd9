"""/metrics: the scheduler's counters in Prometheus' text format, through prometheus_client.

One collector reads one consistent `SchedulerStats` snapshot per scrape (no per-event instrumentation on the engine
thread); names and meanings are listed in docs/serving.md.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..device_runners.batch import BatchScheduler
from ..device_runners.engine import FINISH_REASONS

# (name, kind, help, SchedulerStats field); counters are exposed with the _total suffix
ROWS = [
    ("edgellm_prefill_tokens_per_second", "gauge", "prefill throughput over the last 10 s of prefill work",
     "prefill_tps_recent"),
    ("edgellm_decode_tokens_per_second", "gauge", "decode throughput (all sequences) over the last 10 s of decode "
     "work", "decode_tps_recent"),
    ("edgellm_prefill_tokens", "counter", "prompt tokens prefilled", "prefill_tokens_total"),
    ("edgellm_prefill_seconds", "counter", "seconds spent in prefill", "prefill_seconds_total"),
    ("edgellm_decode_tokens", "counter", "tokens produced by decode steps", "decode_tokens_total"),
    ("edgellm_decode_seconds", "counter", "seconds spent in decode steps", "decode_seconds_total"),
    ("edgellm_decode_steps", "counter", "decode steps (one token for every active sequence)", "decode_steps_total"),
    ("edgellm_batch_decode_calls", "counter", "decode steps run as one batch_decode call", "batch_decode_calls_total"),
    ("edgellm_batch_decode_min", "gauge", "smallest batch run with batch_decode (smaller: per-sequence decode)",
     "batch_min"),
    ("edgellm_queue_length", "gauge", "requests waiting for a sequence slot or KV pages", "queue_length"),
    ("edgellm_active_sequences", "gauge", "sequences in the KV cache", "active_sequences"),
    ("edgellm_kv_pages_in_use", "gauge", "KV cache pages holding tokens", "kv_pages_in_use"),
    ("edgellm_kv_pages_reserved", "gauge", "KV cache pages reserved by admitted requests", "kv_pages_reserved"),
    ("edgellm_kv_pages_reserved_active", "gauge", "KV cache pages the active sequences reserved (differs from "
     "edgellm_kv_pages_reserved only on a leak)", "kv_pages_reserved_active"),
    ("edgellm_kv_pages_total", "gauge", "KV cache pages", "kv_pages_total"),
    ("edgellm_requests_rejected", "counter", "requests refused with 503 (queue full or timed out)", "rejected_total"),
]


class SchedulerCollector:
    """A prometheus_client collector over `scheduler.stats()`."""

    def __init__(self, scheduler: BatchScheduler):
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler.stats()
        for name, kind, help_, attr in ROWS:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_, value=getattr(s, attr))
        finished = CounterMetricFamily("edgellm_requests_finished", "generations finished, by reason",
                                       labels=["reason"])
        for reason in sorted(set(s.finished) | set(FINISH_REASONS)):
            finished.add_metric([str(reason)], s.finished.get(reason, 0))
        yield finished


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler: BatchScheduler):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SchedulerCollector(scheduler))

    def text(self) -> str:
        return generate_latest(self.registry).decode()
