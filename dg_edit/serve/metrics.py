"""`GET /metrics`: what one `dg-edit serve` is doing, in Prometheus' text format (prometheus-client).

Why: a team's editors share one service on a GPU box; whoever runs it needs to see load, latency and
failures the way llama.cpp's and vLLM's servers show theirs, scraped by Prometheus (or read with
curl). The route sits behind the same gate as every other (loopback by default, the token when the
service is reachable from elsewhere): the figures name no document, but they show who is busy.

Where the figures come from:
- requests by route and outcome, errors by code, request latency and generated tokens: the service's
  routes (`ws.py`, `http_api.py`), one `RequestMetrics` per request;
- rows per step, requests per step, step latency, queue depth and queue wait: the engine's
  `observer` (this object), told `on_step` after each step's host sync and `on_admit` when a waiting
  request joins the decoder batch;
- cache bytes, documents, in-flight requests: read from the engine and the service at scrape time.

One `CollectorRegistry` per `Metrics` (never prometheus-client's global default): several services
may run in one process (tests do), each with its own figures.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..events import Done

PREFIX = "dg_edit"
# Routes that run the model; every request on them ends in exactly one outcome.
ROUTES = ("/ws", "/v1/completions", "/v1/chat/completions", "/infill", "/next_edit")
OK, ERROR, CANCELLED = "ok", "error", "cancelled"  # cancelled: the client cancelled it or went away
OUTCOMES = (OK, ERROR, CANCELLED)
TOKENS_WINDOW_S = 60.0  # dg_edit_tokens_per_second averages over this much of the recent past
# Seconds: a completion on a GPU takes ~0.1-2 s, on a CPU or under load up to a minute.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The service's Prometheus metrics, and the engine's observer (`on_step`, `on_admit`).

    `cache_info` and `inflight` are read at scrape time: the engine's `cache_info()` (None while the
    model loads) and the number of engine streams running on the service.
    """

    def __init__(self, cache_info: Callable[[], dict[str, Any] | None], inflight: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Model requests by route and outcome (ok, error, cancelled)",
                                ["route", "outcome"], registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Requests answered with an error, by route and error code "
                              "(bad_request, busy, timeout, model_error, ...)", ["route", "code"], registry=r)
        self.request_seconds = Histogram(f"{PREFIX}_request_seconds", "Time from a request's arrival to its "
                                         "answer, for requests answered ok", ["route"], buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens of the answers sent", registry=r)
        self.prefix_tokens = Counter(f"{PREFIX}_prefix_tokens", "Prefix tokens the answers were conditioned on",
                                     registry=r)
        self.prefix_encoded = Counter(f"{PREFIX}_prefix_tokens_encoded", "Prefix tokens the encoder ran for "
                                      "them; the rest came warm from the document's encoder cache", registry=r)
        self.step_seconds = Histogram(f"{PREFIX}_step_seconds", "Time of one denoising step (one decoder forward "
                                      "over every row of the batch, host sync included)", buckets=STEP_BUCKETS,
                                      registry=r)
        self.step_rows = Histogram(f"{PREFIX}_step_rows", "Canvas rows in one decoder forward", buckets=ROW_BUCKETS,
                                   registry=r)
        self.step_requests = Histogram(f"{PREFIX}_step_requests", "Requests sharing one decoder forward",
                                       buckets=ROW_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting to join the decoder batch, at the "
                                 "last step", registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited before joining the "
                                    "decoder batch", buckets=WAIT_BUCKETS, registry=r)
        tokens_per_second = Gauge(f"{PREFIX}_tokens_per_second", f"Tokens sent per second over the last "
                                  f"{TOKENS_WINDOW_S:g} s", registry=r)
        tokens_per_second.set_function(self._tokens_per_second)
        cache_bytes = Gauge(f"{PREFIX}_cache_bytes", "Bytes held by the document encoder caches", registry=r)
        cache_bytes.set_function(lambda: self._cache("bytes"))
        cache_budget = Gauge(f"{PREFIX}_cache_budget_bytes", "Budget of the document encoder caches "
                             "(Settings.cache_budget_mb)", registry=r)
        cache_budget.set_function(lambda: self._cache("budget_bytes"))
        cache_documents = Gauge(f"{PREFIX}_cache_documents", "Documents with an encoder cache", registry=r)
        cache_documents.set_function(lambda: self._cache("documents"))
        inflight_gauge = Gauge(f"{PREFIX}_requests_inflight", "Engine streams running now, every route", registry=r)
        inflight_gauge.set_function(inflight)
        for route in ROUTES:  # every series exists from the start: a rate over it needs no first event
            self.request_seconds.labels(route)
            for outcome in OUTCOMES:
                self.requests.labels(route, outcome)
        self._cache_info = cache_info
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic time, tokens), oldest first
        self._recent_lock = threading.Lock()
        self._started = time.monotonic()

    # ------------------------------------------------------------------ the engine's observer
    def on_step(self, rows: int, requests: int, seconds: float, queue_depth: int) -> None:
        """One decoder forward ran: `rows` canvas rows of `requests` requests in `seconds` (host sync
        included); `queue_depth` requests were waiting. Called from the model thread."""
        self.step_seconds.observe(seconds)
        self.step_rows.observe(rows)
        self.step_requests.observe(requests)
        self.queue_depth.set(queue_depth)

    def on_admit(self, waited_seconds: float) -> None:
        """A request joined the decoder batch after waiting `waited_seconds`."""
        self.queue_wait.observe(waited_seconds)

    # ------------------------------------------------------------------ the routes
    def request(self, route: str) -> "RequestMetrics":
        """Start timing one request on `route` (one of ROUTES)."""
        return RequestMetrics(self, route)

    def answered(self, dones: Sequence[Done]) -> None:
        """Answers were sent: their tokens, and how much of their prefix the encoder had to run."""
        for done in dones:
            self.prefix_tokens.inc(done.prefix_tokens)
            self.prefix_encoded.inc(done.encoded)
        n = sum(len(done.ids) for done in dones)
        if n <= 0:
            return
        self.tokens.inc(n)
        now = time.monotonic()
        with self._recent_lock:
            self._recent.append((now, n))
            self._trim(now)

    # ------------------------------------------------------------------ scrape
    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._recent_lock:
            self._trim(now)
            total = sum(n for _, n in self._recent)
        window = min(TOKENS_WINDOW_S, max(now - self._started, 1e-3))
        return total / window

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - TOKENS_WINDOW_S:
            self._recent.popleft()

    def _cache(self, key: str) -> float:
        info = self._cache_info()
        if info is None:
            return 0.0
        value = info.get(key, 0)
        return float(len(value) if isinstance(value, (list, dict)) else value)


class RequestMetrics:
    """One request's figures: counted once, at its first outcome (later calls do nothing, so a
    `finally:` may call `cancelled()` after the request already ended otherwise)."""

    def __init__(self, metrics: Metrics, route: str):
        self.metrics = metrics
        self.route = route
        self.started = time.monotonic()
        self.ended = False

    def ok(self, dones: Sequence[Done] = ()) -> None:
        """Answered; `dones` are the engine's final events of its answers (one per choice)."""
        if self._end(OK):
            self.metrics.request_seconds.labels(self.route).observe(time.monotonic() - self.started)
            self.metrics.answered(dones)

    def error(self, code: str) -> None:
        if self._end(ERROR):
            self.metrics.errors.labels(self.route, code).inc()

    def cancelled(self) -> None:
        self._end(CANCELLED)

    def _end(self, outcome: str) -> bool:
        if self.ended:
            return False
        self.ended = True
        self.metrics.requests.labels(self.route, outcome).inc()
        return True
