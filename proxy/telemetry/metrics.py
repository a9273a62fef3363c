"""Prometheus metrics, one registry per app (so several apps can live in one process, as in tests)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple, object] = {}
        self.requests = Counter(
            "qip_requests_total", "Image requests by model and HTTP status", ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "qip_request_seconds", "Time to answer an image request", ["endpoint", "model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
            registry=self.registry,
        )
        self.route_attempts = Counter(
            "qip_route_attempts_total", "Calls to a route and how they ended", ["model", "route", "outcome"],
            registry=self.registry,
        )
        self.images = Counter(
            "qip_images_total", "Images returned", ["model", "route"], registry=self.registry,
        )
        self.passthrough = Counter(
            "qip_passthrough_requests_total", "Requests forwarded to the passthrough upstream", ["status"],
            registry=self.registry,
        )
        self.local_queue = Gauge(
            "qip_local_queue_depth", "Jobs waiting in a local engine", ["provider"], registry=self.registry,
        )
        self.local_steps = Counter(
            "qip_local_denoise_steps_total",
            "Denoising steps run by a local engine, counted per job (k jobs sharing a batch add k a step)", ["provider"],
            registry=self.registry,
        )

        self.outcomes = Counter(
            "qip_request_outcomes_total",
            "Image requests by how they ended: ok, client_error, rate_limited, failed, timeout, cancelled, shutdown, "
            "error",
            ["model", "outcome"], registry=self.registry,
        )
        # Key names only (a key's value never becomes a label): unnamed keys are key-1, key-2, ...
        self.requests_by_key = Counter(
            "qip_requests_by_key_total", "Requests by client key name, endpoint, model and HTTP status",
            ["key", "endpoint", "model", "status"], registry=self.registry,
        )
        self.key_rejections = Counter(
            "qip_key_rejections_total",
            "Requests refused by a key's policy: rate_limit_exceeded, concurrency_limit_exceeded, "
            "model_not_allowed, insufficient_quota (budget spent)", ["key", "reason"], registry=self.registry,
        )
        self.route_state = Gauge(
            "qip_route_state",
            "1 for each route's current state (ready, loading, circuit_open, half_open, missing_key, "
            "no_gpu, unavailable)", ["model", "route", "state"], registry=self.registry,
        )

        # For the alert rules in deploy/: fallbacks, errors by code (store_unavailable, state_unavailable...),
        # and how long local jobs wait for the GPU.
        self.fallbacks = Counter(
            "qip_fallbacks_total",
            "Requests that moved past a route to the next one, by the route passed over and why: failed, "
            "circuit_open, loading", ["model", "route", "reason"], registry=self.registry,
        )
        self.errors = Counter(
            "qip_errors_total", "Error answers by model and OpenAI error code (e.g. store_unavailable)",
            ["model", "code"], registry=self.registry,
        )
        self.local_queue_wait = Histogram(
            "qip_local_queue_wait_seconds", "Time a local job waited in its engine's queue before the GPU took it",
            ["provider"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
            registry=self.registry,
        )
        self.jobs = Counter("qip_jobs_total", "Background jobs this process ended, by model and status "
                            "(completed, failed, cancelled)", ["model", "status"], registry=self.registry)
        self.webhook_attempts = Counter("qip_webhook_attempts_total", "Webhook delivery attempts by result: "
                                        "delivered, retry, gone, failed", ["result"], registry=self.registry)
        # The usage ledger (proxy/usage/): spend, GPU time, cache hits, records it could not keep.
        self.cost = Counter("qip_cost_usd", "USD spent on image requests (priced routes only)",
                            ["key", "model", "route"], registry=self.registry)
        self.gpu_seconds = Counter("qip_gpu_seconds", "GPU seconds local engines and Ray replicas spent",
                                   ["model", "route"], registry=self.registry)
        self.cache_hits = Counter("qip_cache_hits", "Seeded requests answered from the cache", ["model"],
                                  registry=self.registry)
        self.usage_dropped = Counter("qip_usage_records_dropped",
                                     "Usage records dropped: the ledger's queue was full (database down)",
                                     registry=self.registry)

        self.shared_state_up = Gauge(
            "qip_shared_state_up", "1 while the shared state (Redis at state.redis_url) answers, 0 while it cannot "
            "be reached (always 1 without Redis)", registry=self.registry)

        self.pool_replicas = Gauge("qip_pool_replicas", "Replicas of a Ray pool by state", ["provider", "state"],
                                   registry=self.registry)
        self.pool_queue = Gauge("qip_pool_queue_depth", "Jobs waiting in each replica's engine",
                                ["provider", "replica"], registry=self.registry)

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """metric.labels(*values) (in the metric's label order), remembered: prometheus_client takes a lock
        and builds the key on every labels() call. Only for metrics that are never cleared; their label
        values are few (endpoints, models, routes, statuses, outcomes, key names)."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def refresh(self, gateway: Any) -> None:
        """Gauges read at scrape time: local queue depths, route states, whether the shared state answers."""
        self.shared_state_up.set(1 if gateway.state.reachable else 0)
        for provider in gateway.providers.values():
            if hasattr(provider, "queue_depth"):
                self.local_queue.labels(provider=provider.name).set(provider.queue_depth)
        self.pool_replicas.clear()
        self.pool_queue.clear()
        for p in gateway.providers.values():
            for state, count in getattr(p, "replica_states", {}).items():
                self.pool_replicas.labels(provider=p.name, state=state).set(count)
            for replica, depth in getattr(p, "replica_queue_depths", {}).items():
                self.pool_queue.labels(provider=p.name, replica=replica).set(depth)
        self.route_state.clear()
        for model, routes in gateway.router.routes.items():
            for route in routes:
                self.route_state.labels(model=model, route=route.name, state=route.state).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
