"""Prometheus metrics: one `Metrics` per app (its own registry, made in create_app, never at
import), counters bound to their labels up front so the webhook pays a dict lookup and an
increment, and the store's gauges (outbox, apply backlog) read only when /metrics is scraped.

With `receiver serve --workers N` the processes share a PROMETHEUS_MULTIPROC_DIR (prometheus
client's multiprocess mode): every worker process writes its counters there and whichever one
answers a scrape sums them all, so /metrics is the same whichever process Prometheus reaches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .errors import StoreUnavailable

log = logging.getLogger("receiver.metrics")

# `receiver_callbacks_total{outcome}`: the webhook's answers, acknowledged then refused.
ACCEPTED = ("stored", "duplicate", "ignored")
REFUSED = ("bad_signature", "bad_request", "timeout", "too_large", "unavailable", "error")
REFUSAL_BY_STATUS = {
    401: "bad_signature",
    400: "bad_request",
    408: "timeout",
    413: "too_large",
    503: "unavailable",
}
# The outbox state a forward ends a round in → `receiver_forwards_total{result}`.
FORWARD_RESULTS = {"done": "done", "pending": "retry", "dead": "dead", "skipped": "skipped"}
REFETCH_RESULTS = ("ok", "retry", "failed")
RECONCILE_RESULTS = ("verdicts", "pending", "errors")
OUTBOX_STATES = ("pending", "done", "dead", "skipped")
# Verify → commit is a few milliseconds with group commit; seconds mean the disk is struggling.
INGEST_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Metrics:
    """The receiver's counters and histogram, registered in `registry` (a fresh one by default,
    so any number of apps and workers can live in one process, as in the tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No `*_created` series beside every counter: half the lines, nothing Prometheus needs.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        self.exposed = self.registry  # what /metrics renders (differs in multiprocess mode)
        r = self.registry
        self.callbacks = Counter(
            "receiver_callbacks", "Runflow callbacks answered, by outcome", ["outcome"], registry=r
        )
        self.outcomes = {name: self.callbacks.labels(name) for name in (*ACCEPTED, *REFUSED)}
        self.signature_failures = Counter(
            "receiver_signature_failures",
            "Callbacks refused for a missing or wrong Runflow-Signature",
            registry=r,
        )
        self.ingest_seconds = Histogram(
            "receiver_ingest_seconds",
            "Seconds from verifying a callback to its durable commit",
            buckets=INGEST_BUCKETS,
            registry=r,
        )
        self.forwards = Counter(
            "receiver_forwards",
            "Forwards finished by the worker, by sink and result (done, retry, dead, skipped)",
            ["sink", "result"],
            registry=r,
        )
        self.refetches = Counter(
            "receiver_refetch",
            "Refetches of the full evaluation from the Runflow API, by result",
            ["result"],
            registry=r,
        )
        self.refetch_results = {name: self.refetches.labels(name) for name in REFETCH_RESULTS}
        self.reconciles = Counter(
            "receiver_reconcile",
            "Evaluations polled by reconciliation, by result (verdicts, pending, errors)",
            ["result"],
            registry=r,
        )
        self.reconcile_results = {name: self.reconciles.labels(name) for name in RECONCILE_RESULTS}
        self._forward_results: dict[str, dict[str, Counter]] = {}

    # the webhook (hot path: one increment and one observation)

    def accepted(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome].inc()
        self.ingest_seconds.observe(seconds)

    def refused(self, status: int) -> str:
        """Count a refusal with this HTTP status; returns its outcome label."""
        outcome = REFUSAL_BY_STATUS.get(status, "error")
        self.outcomes[outcome].inc()
        if outcome == "bad_signature":
            self.signature_failures.inc()
        return outcome

    # the worker

    def forward_results(self, sink: str) -> dict[str, Counter]:
        """Outbox state → the sink's bound counter (made once per sink)."""
        found = self._forward_results.get(sink)
        if found is None:
            found = {
                state: self.forwards.labels(sink, result)
                for state, result in FORWARD_RESULTS.items()
            }
            self._forward_results[sink] = found
        return found

    # exposition

    def expose(
        self,
        outbox_depth: Callable[[], Mapping[str, Mapping[str, int]]],
        sinks: Sequence[str],
        multiprocess_dir: str | None = None,
        apply_backlog: Callable[[], int] | None = None,
    ) -> None:
        """Make /metrics render these metrics, the store's gauges and the process collectors;
        with `multiprocess_dir`, the sum over every process writing there instead."""
        outbox = StoreCollector(outbox_depth, sinks, apply_backlog)
        if multiprocess_dir:
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            self.exposed.register(outbox)
            PlatformCollector(registry=self.exposed)
            return
        self.registry.register(outbox)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type (OpenMetrics when the scraper asks)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.exposed), content_type


class StoreCollector(Collector):
    """`receiver_outbox{sink,state}` and `receiver_dead_letters{sink}` (one grouped count query
    per scrape), and `receiver_apply_backlog` when the store has one. Configured sinks always
    appear (zeros included), so alerts on them work from the first scrape; a failing read
    drops these gauges from that scrape, not the rest, and sets `receiver_store_up` to 0 (the
    store's reads wait briefly for a connection: a scrape with the database down answers at
    once)."""

    def __init__(
        self,
        depth: Callable[[], Mapping[str, Mapping[str, int]]],
        sinks: Sequence[str],
        backlog: Callable[[], int] | None = None,
    ) -> None:
        self.depth = depth
        self.sinks = tuple(sinks)
        self.backlog = backlog

    def describe(self) -> Iterable[Metric]:
        return self._families()  # registering must not touch the store (it is not open yet)

    def collect(self) -> Iterable[Metric]:
        readable, outbox, dead, *applying = self._families()
        try:
            depth = self.depth()
            backlog = None if self.backlog is None else self.backlog()
        except StoreUnavailable as exc:  # the database is down: one line each scrape
            log.warning("cannot read the outbox depth for /metrics: %s", exc)
            readable.add_metric([], 0)
            return [readable]
        except Exception:
            log.exception("cannot read the outbox depth for /metrics")
            readable.add_metric([], 0)
            return [readable]
        readable.add_metric([], 1)
        for sink in sorted({*self.sinks, *depth}):
            states = depth.get(sink, {})
            for state in sorted({*OUTBOX_STATES, *states}):
                outbox.add_metric([sink, state], states.get(state, 0))
            dead.add_metric([sink], states.get("dead", 0))
        for family in applying:
            family.add_metric([], backlog or 0)
        return [readable, outbox, dead, *applying]

    def _families(self) -> list[GaugeMetricFamily]:
        families = [
            GaugeMetricFamily(
                "receiver_store_up",
                "1 when this scrape read the store's gauges, 0 when it could not (then they are"
                " left out)",
            ),
            GaugeMetricFamily(
                "receiver_outbox",
                "Forwards in the outbox, by sink and state",
                labels=["sink", "state"],
            ),
            GaugeMetricFamily(
                "receiver_dead_letters",
                "Dead forwards (attempts used up or refused for good), by sink",
                labels=["sink"],
            ),
        ]
        if self.backlog is not None:
            families.append(
                GaugeMetricFamily(
                    "receiver_apply_backlog",
                    "Callbacks acknowledged and stored but not yet applied to their evaluation",
                )
            )
        return families
