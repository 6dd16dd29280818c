"""Prometheus collectors, in one place (prefix `capibara6_`, meanings as vLLM's).

One process serving three ports has one registry, so one set of metrics. Label values come only
from the model registry and fixed vocabularies (roles, endpoints, states, reasons), never from
request text, so a client cannot blow up cardinality. Pool gauges are read at scrape time from
the pool itself (`PoolCollector`), so they can never drift from the truth.

Cardinality is enforced, not just promised: once `watch_pool` has seen the registry, a model (or
expert) label that is not a registry model/ensemble id is recorded as `_unknown`, and vocabulary labels (unload
reason, rejection reason, role, endpoint) outside their fixed sets as `_other`.

`render()` runs on the event loop on purpose: it takes no lock shared with inference (pool gauges
read plain attributes), while a thread pool hop could queue a scrape behind busy worker threads.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # no `*_created` gauge per series: it doubles the series count for nothing
POOL_STATES = ("unloaded", "loading", "ready", "busy", "unloading")
ROLES = frozenset({"standard", "streaming", "consensus"})
ENDPOINTS = frozenset({"chat", "completions", "consensus", "embeddings", "responses"})
UNLOAD_REASONS = frozenset({"idle", "evicted", "memory", "shutdown", "error", "admin", "crashed"})
REJECT_REASONS = frozenset({"unauthorized", "too_large", "shutting_down"})
UNKNOWN = "_unknown"
CUSTOM = "_custom"  # consensus over an explicit expert list rather than a named ensemble
OTHER = "_other"

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
        self.ttft: Any = Histogram(p + "time_to_first_token_seconds", "Time to first token.", ["model"], buckets=_LATENCY, registry=r)
        self.itl: Any = Histogram(p + "inter_token_latency_seconds", "Time between consecutive tokens.", ["model"], buckets=_ITL, registry=r)
        self.e2e: Any = Histogram(p + "e2e_request_latency_seconds", "Request latency, arrival to last byte.", ["model"], buckets=_E2E, registry=r)
        self.queue_time: Any = Histogram(p + "request_queue_time_seconds", "Time waiting for a model slot.", ["model"], buckets=_LATENCY, registry=r)
        self.load_time: Any = Histogram(p + "model_load_seconds", "Model load time.", ["model"], buckets=_E2E, registry=r)
        self.requests: Any = Counter(p + "requests", "Finished requests.", ["model", "role", "endpoint", "status"], registry=r)
        self.prompt_tokens: Any = Counter(p + "prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens: Any = Counter(p + "generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.loads: Any = Counter(p + "model_loads", "Model loads.", ["model"], registry=r)
        self.crashes: Any = Counter(p + "model_crashes", "Model worker processes that died (signal, OOM kill, load crash).", ["model"], registry=r)
        self.unloads: Any = Counter(p + "model_unloads", "Model unloads.", ["model", "reason"], registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests generating now.", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting for a model slot.", registry=r)
        self.expert_latency: Any = Histogram(
            p + "consensus_expert_latency_seconds", "Latency of each consensus expert.", ["expert"], buckets=_E2E, registry=r
        )
        self.agreement = Histogram(
            p + "consensus_agreement_ratio", "Share of experts agreeing with the chosen answer.",
            buckets=(0.0, 0.2, 0.34, 0.5, 0.67, 0.8, 1.0), registry=r,
        )
        self.rejected: Any = Counter(
            p + "rejected_requests", "Requests refused before reaching a model (auth, body size, shutdown).",
            ["role", "reason"], registry=r,
        )
        # counted by the service from each choice's outcome (cached_tokens), never by a global
        self.prefix_cache_hits: Any = Counter(p + "prefix_cache_hits", "Requests that reused a cached prompt prefix.", ["model"], registry=r)
        self.prefix_cache_tokens: Any = Counter(p + "prefix_cache_tokens", "Prompt tokens reused from the prefix cache.", ["model"], registry=r)
        # POST /v1/embeddings: requests served and the tokens of their inputs (usage.prompt_tokens)
        self.embedding_requests: Any = Counter(p + "embedding_requests", "Embedding requests served.", ["model"], registry=r)
        self.embedding_tokens: Any = Counter(p + "embedding_tokens", "Input tokens embedded.", ["model"], registry=r)
        self._models: frozenset[str] | None = None  # registry ids, known once watch_pool ran
        self._guard()

    def _guard(self) -> None:
        """Swap each labelled metric for a view whose labels() keeps values in their vocabulary."""
        model = self.model_label
        (self.ttft, self.itl, self.e2e, self.queue_time, self.load_time, self.prompt_tokens, self.generation_tokens,
         self.loads, self.crashes, self.prefix_cache_hits, self.prefix_cache_tokens, self.embedding_requests, self.embedding_tokens) = (
            _Vocab(m, model=model) for m in (
                self.ttft, self.itl, self.e2e, self.queue_time, self.load_time,
                self.prompt_tokens, self.generation_tokens, self.loads, self.crashes, self.prefix_cache_hits, self.prefix_cache_tokens,
                self.embedding_requests, self.embedding_tokens,
            )
        )
        self.requests = _Vocab(self.requests, model=model, role=_within(ROLES), endpoint=_within(ENDPOINTS), status=_status)
        self.unloads = _Vocab(self.unloads, model=model, reason=_within(UNLOAD_REASONS))
        self.expert_latency = _Vocab(self.expert_latency, expert=model)
        self.rejected = _Vocab(self.rejected, role=_within(ROLES), reason=_within(REJECT_REASONS))

    def model_label(self, model: str) -> str:
        """A registry model or ensemble id (or `_custom`, an ad-hoc expert list) as is; anything
        else (an unknown id from a request) as `_unknown`."""
        if self._models is None:
            return model if isinstance(model, str) and len(model) <= 128 else UNKNOWN
        return model if model in self._models else UNKNOWN

    def watch_pool(self, pool: PoolView) -> None:
        registry = getattr(pool, "registry", None)
        models = getattr(registry, "models", None)
        if isinstance(models, Mapping):
            ensembles = getattr(registry, "ensembles", None) or {}
            self._models = frozenset(models) | frozenset(ensembles) | {CUSTOM}
        self.registry.register(PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _within(vocab: frozenset[str]) -> Callable[[str], str]:
    return lambda v: v if v in vocab else OTHER


def _status(v: str) -> str:
    s = str(v)
    return s if len(s) == 3 and s.isdigit() else OTHER


class _Vocab:
    """A labelled metric whose `labels()` maps each value through its label's check."""

    def __init__(self, metric: Any, **checks: Callable[[str], str]) -> None:
        self._metric = metric
        self._checks = [checks.get(name) for name in metric._labelnames]

    def labels(self, *values: str, **named: str) -> Any:
        if named:
            values = tuple(named[name] for name in self._metric._labelnames)
        fixed = [check(str(v)) if check else str(v) for check, v in zip(self._checks, values)]
        return self._metric.labels(*fixed)

    def __getattr__(self, name: str) -> Any:  # collect(), describe(), _name ... of the real metric
        return getattr(self._metric, name)


class PoolCollector:
    """models_loaded, model_state{model,state} and kv_cache_bytes{model}, read at scrape time."""

    def __init__(self, pool: PoolView) -> None:
        self._pool = pool

    def collect(self) -> Iterable[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("capibara6_models_loaded", "Models in memory.")
        state = GaugeMetricFamily("capibara6_model_state", "1 for the state each model is in.", labels=["model", "state"])
        kv = GaugeMetricFamily("capibara6_kv_cache_bytes", "KV cache bytes held per model.", labels=["model"])
        rss = GaugeMetricFamily("capibara6_model_rss_bytes", "Resident bytes of each model's worker processes.", labels=["model"])
        rss_of = getattr(self._pool, "rss_snapshot", None)
        for model, b in (rss_of() if rss_of is not None else []):
            rss.add_metric([model], float(b))
        n = 0
        for model, current, kv_bytes in self._pool.metric_snapshot():
            for s in POOL_STATES:
                state.add_metric([model, s], 1.0 if s == current else 0.0)
            kv.add_metric([model], float(kv_bytes))
            n += current in ("ready", "busy")
        loaded.add_metric([], float(n))
        yield from (loaded, state, kv, rss)


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
