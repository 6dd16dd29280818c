"""Prometheus collectors, in one place (prefix `capibara6_`, meanings as vLLM's).

One process serving three ports has one registry, so one set of metrics. Label values come only
from the model registry and fixed vocabularies (roles, endpoints, states, reasons), never from
request text, so a client cannot blow up cardinality. Pool gauges are read at scrape time from
the pool itself (`PoolCollector`), so they can never drift from the truth.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.platform_collector import PlatformCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
POOL_STATES = ("unloaded", "loading", "ready", "busy", "unloading")

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)


class PoolView(Protocol):
    """What the pool collector reads (implemented by ModelPool)."""

    def metric_snapshot(self) -> Iterable[tuple[str, str, int]]:
        """(model id, state, kv cache bytes) per registry entry."""
        ...


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        p = "capibara6_"
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token.", ["model"], buckets=_LATENCY, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive tokens.", ["model"], buckets=_ITL, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency, arrival to last byte.", ["model"], buckets=_E2E, registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time waiting for a model slot.", ["model"], buckets=_LATENCY, registry=r)
        self.load_time = Histogram(p + "model_load_seconds", "Model load time.", ["model"], buckets=_E2E, registry=r)
        self.requests = Counter(p + "requests", "Finished requests.", ["model", "role", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.loads = Counter(p + "model_loads", "Model loads.", ["model"], registry=r)
        self.unloads = Counter(p + "model_unloads", "Model unloads.", ["model", "reason"], registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests generating now.", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting for a model slot.", registry=r)
        self.expert_latency = Histogram(
            p + "consensus_expert_latency_seconds", "Latency of each consensus expert.", ["expert"], buckets=_E2E, registry=r
        )
        self.agreement = Histogram(
            p + "consensus_agreement_ratio", "Share of experts agreeing with the chosen answer.",
            buckets=(0.0, 0.2, 0.34, 0.5, 0.67, 0.8, 1.0), registry=r,
        )

    def watch_pool(self, pool: PoolView) -> None:
        self.registry.register(PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PoolCollector:
    """models_loaded, model_state{model,state} and kv_cache_bytes{model}, read at scrape time."""

    def __init__(self, pool: PoolView) -> None:
        self._pool = pool

    def collect(self) -> Iterable[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("capibara6_models_loaded", "Models in memory.")
        state = GaugeMetricFamily("capibara6_model_state", "1 for the state each model is in.", labels=["model", "state"])
        kv = GaugeMetricFamily("capibara6_kv_cache_bytes", "KV cache bytes held per model.", labels=["model"])
        n = 0
        for model, current, kv_bytes in self._pool.metric_snapshot():
            for s in POOL_STATES:
                state.add_metric([model, s], 1.0 if s == current else 0.0)
            kv.add_metric([model], float(kv_bytes))
            n += current in ("ready", "busy")
        loaded.add_metric([], float(n))
        yield from (loaded, state, kv)


class RequestTimer:
    """Per-request timing: queue wait, TTFT, inter-token gaps, end-to-end. Monotonic clock injectable."""

    def __init__(self, metrics: Metrics, model: str, clock: Callable[[], float]) -> None:
        self.m = metrics
        self.model = model
        self.clock = clock
        self.t0 = clock()
        self._last: float | None = None

    def admitted(self) -> None:
        self.m.queue_time.labels(self.model).observe(self.clock() - self.t0)

    def token(self) -> None:
        now = self.clock()
        if self._last is None:
            self.m.ttft.labels(self.model).observe(now - self.t0)
        else:
            self.m.itl.labels(self.model).observe(now - self._last)
        self._last = now

    def finished(self) -> None:
        self.m.e2e.labels(self.model).observe(self.clock() - self.t0)
