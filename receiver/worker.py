"""Drains the outbox: refetch, build the event, deliver per sink, retry with backoff, dead-letter.

Each sink has a loop of its own, so a dead or slow sink never delays another; the refetch loop
completes stored records from the Runflow API. Work is claimed through the store with a lease,
so several workers (in-process or `receiver worker` processes) never hold the same row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

import httpx

from .config import Settings
from .errors import ReceiverError, StoreUnavailable
from .events import build_event
from .metrics import Metrics
from .normalize import TERMINAL, normalize
from .retry import backoff
from .runflow import RunflowClient, RunflowError, client_for
from .sinks import Deferred, Event, NotSent, OneByOne, Sink, SinkError, build_sink
from .store import Claim, Delivery, Outcome, Store
from .times import format_time

log = logging.getLogger("receiver.worker")

POLLS_PER_SECOND = 5.0  # reconciliation's bound on Runflow API requests
LIMITED = "limited"  # a poll Runflow answered 429: the pass stops there
STORE_RETRY = 0.05  # seconds before recording a batch is tried again, doubling …
STORE_RETRY_MAX = 5.0  # … up to this
# A sink that sends one request per event claims this many times its concurrency at once
# (8 posts to a chat sink, 64 requests to an http one), not a whole batch: what a batch sent
# is recorded when it ends, so a worker killed mid-batch has all of it sent again, and a chat
# post cannot be taken back (a soak's kill -9 posted 97 Discord messages twice with 200).
ONE_BY_ONE_ROUNDS = 8
FAILING_AGAIN = 60.0  # seconds between the warnings of a sink that goes on failing
SINK_PAUSE_MAX = 60.0  # seconds at most that a sink failing whole batches rests
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Batch:
    """One sink's forwards claimed in one round, and what became of each."""

    sending: list[tuple[Claim, Event]]  # the claims the sink wants, with their events
    lease: str  # until when they are this worker's (renewed while they are sent)
    outcomes: list[Outcome]  # the ones skipped, then how each attempt ended
    sent: dict[int, SinkError | None] = field(default_factory=dict)  # index → result, as done
    lost: bool = False  # a renewal found rows another worker took: send no more of it


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        sinks: Sequence[Sink],
        runflow: RunflowClient | None,
        *,
        poll_interval: float = 0.25,
        batch_size: int = 200,
        lease: float = 300.0,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sinks = list(sinks)
        self.client = runflow  # reconciliation polls with it even when refetch is off
        self.runflow = runflow if settings.refetch else None
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.lease = timedelta(seconds=lease)
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        for sink in self.sinks:  # every sink's counters exist (at zero) from the start
            self.metrics.forward_results(sink.spec.name)
            if isinstance(sink, OneByOne):  # a 429 holds it as long as retries wait
                sink.shortest_hold, sink.longest_hold = settings.retry_base, settings.retry_max
        self._wake = [asyncio.Event() for _ in range(len(self.sinks) + 1)]
        self._started: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._active = False
        self._stopped = asyncio.Event()
        self._runflow_until = 0.0  # loop time before which Runflow asked (a 429) not to call
        self._failing: dict[str, float] = {}  # sink → loop time its failing was last logged
        self._paused: dict[str, tuple[int, float]] = {}  # sink → (batches failed, resume at)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        store: Store,
        http: httpx.AsyncClient,
        *,
        poll_interval: float = 0.25,
        metrics: Metrics | None = None,
    ) -> Worker:
        """The worker for `settings`: its sinks, and a Runflow client when an API key is set."""
        runflow = client_for(settings, http) if settings.runflow_api_key else None
        sinks = [build_sink(spec, http) for spec in settings.sinks]
        return cls(
            settings,
            store,
            sinks,
            runflow,
            poll_interval=poll_interval,
            lease=settings.lease,
            metrics=metrics,
        )

    @property
    def running(self) -> bool:
        """Started, not stopped, and no loop has died (a worker with no sinks is idle, not down)."""
        return self._active and not any(task.done() for task in self._tasks)

    def notify(self) -> None:
        """New work was stored: wake every loop now instead of at the next poll."""
        for event in self._wake:
            event.set()

    async def start(self) -> None:
        self._stopping = False
        self._active = True
        self._tasks = [
            asyncio.create_task(self._loop(self._sink_round, sink, self._wake[i]))
            for i, sink in enumerate(self.sinks)
        ]
        if self.runflow is not None:
            self._tasks.append(
                asyncio.create_task(self._loop(self._refetch_round, None, self._wake[-1]))
            )
        if self.client is not None and self.settings.reconcile_interval > 0:
            self._stopped.clear()
            self._tasks.append(asyncio.create_task(self._reconcile_loop()))

    async def stop(self, timeout: float = 30.0) -> None:
        """Let in-flight deliveries finish (bounded by `timeout`; a batch sent one by one
        sends no more, and gives the rest back), then close the sinks."""
        self._stopping = True
        self._active = False
        self._stopped.set()
        self.notify()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks = []
        for sink in self.sinks:
            if sink.spec.name in self._started:
                await sink.close()
        self._started.clear()

    async def run_once(self) -> int:
        """One round of everything that is due (for tests and one-shot commands)."""
        done = await self._refetch_round(None) if self.runflow is not None else 0
        for sink in self.sinks:
            done += await self._sink_round(sink)
        return done

    async def _loop(
        self,
        round_: Callable[[Sink | None], Awaitable[int]],
        sink: Sink | None,
        wake: asyncio.Event,
    ) -> None:
        try:
            while not self._stopping:
                try:
                    worked = await round_(sink)
                except Exception:
                    log.exception("worker round failed; trying again shortly")
                    worked = 0
                if not worked and not self._stopping:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), self.poll_interval)
                    wake.clear()
        except BaseException as exc:  # a CancelledError from a client library, say
            if not self._stopping:  # /readyz turns 503; this says which loop and why
                what = f"sink {sink.spec.name!r}" if sink else "refetches and polls"
                log.error("worker loop for %s stopped: %r", what, exc)
            raise

    async def _sink_round(self, sink: Sink | None) -> int:
        assert sink is not None
        now = self.clock()
        name = sink.spec.name
        if asyncio.get_running_loop().time() < self._paused.get(name, (0, 0.0))[1]:
            return 0
        if not await self.store.has_due(name, format_time(now)):
            return 0
        lease = format_time(now + self.lease)
        claims = await self.store.claim_forwards(
            name,
            now=format_time(now),
            lease_until=lease,
            refetch_cutoff=format_time(now - timedelta(seconds=self.settings.refetch_budget)),
            limit=min(self.batch_size, sink.concurrency * ONE_BY_ONE_ROUNDS)
            if isinstance(sink, OneByOne)
            else self.batch_size,
        )
        if not claims:
            return 0
        outcomes: list[Outcome] = []
        sending: list[tuple[Claim, Event]] = []
        for claim in claims:
            if claim.superseded:  # no callback of its own left to tell it: never the newer one
                log.info(
                    "forward %s to %s skipped: %s was followed by %s before it was sent,"
                    " and no stored callback describes it",
                    claim.outbox_id,
                    name,
                    claim.event_type,
                    claim.superseded,
                )
                outcomes.append(
                    Outcome(
                        claim.outbox_id,
                        "skipped",
                        format_time(now),
                        f"superseded by {claim.superseded} before it was sent",
                    )
                )
                continue
            event = build_event(
                claim.fields,
                claim.event_type,
                refetched=claim.refetched,
                received_at=claim.received_at,
                dashboard_url=self.settings.public_url,
            )
            data = event["data"]
            if sink.spec.matches(
                claim.event_type,
                data["status"],
                data["passed"],
                data["task_type"],
                data["client_ref"],
            ):
                sending.append((claim, event))
            else:  # known only now, after refetch: the sink does not want it
                outcomes.append(Outcome(claim.outbox_id, "skipped", format_time(now)))
        batch = Batch(sending, lease, outcomes)
        if sending:
            try:
                await self._send(sink, batch)
            except asyncio.CancelledError:  # stopped past its timeout: keep what is known
                await self._finish(sink, batch)
                raise
        await self._finish(sink, batch)
        return len(claims)

    async def _send(self, sink: Sink, batch: Batch) -> None:
        """Deliver the batch, renewing its lease while it is sent: a slow one (a chat sink
        posts one event at a time) must not be claimed and sent again by another worker. A
        renewal the store refuses for a moment does not stop the sending: what went out is
        recorded as always, and the lease has two more renewals before it runs out. The
        skipped claims are renewed too: their outcomes are recorded under the same lease.
        A batch whose lease ran out (the worker stalled: a pause, a stopped process) or whose
        renewal found rows another worker took meanwhile sends no more: the other worker sends
        them, and the rest is given back."""
        ids = [claim.outbox_id for claim, _ in batch.sending]
        ids += [outcome.outbox_id for outcome in batch.outcomes]
        events = [event for _, event in batch.sending]
        delivering = asyncio.create_task(self._deliver(sink, events, batch))
        try:
            while not (await asyncio.wait({delivering}, timeout=self.lease.total_seconds() / 3))[0]:
                renewed = format_time(self.clock() + self.lease)
                try:
                    held = await self.store.lease_forwards(ids, batch.lease, renewed)
                except StoreUnavailable as exc:  # for a moment: the next tick tries again
                    log.warning("renewing the lease of a batch failed: %s", exc)
                else:
                    batch.lease = renewed
                    batch.lost |= len(held) < len(ids)
        finally:
            delivering.cancel()  # done already, unless this round is being cancelled
        delivering.result()  # a sink's own bug: the round fails, and its claims run out

    async def _finish(self, sink: Sink, batch: Batch) -> None:
        """Record how each attempt ended; give back what was not sent (not an attempt) at once,
        and what the destination's rate limit refused or held back (not an attempt either: it
        asked to wait) for when that wait is over (at least RECEIVER_RETRY_BASE, so a 429
        without a Retry-After is not tried again at once, and at most RECEIVER_RETRY_MAX)."""
        finished = self.clock()
        unsent = []
        deferred: list[int] = []
        limited: set[int] = set()  # refused by a 429: counted as a retry once held back
        wait = self.settings.retry_base
        for index, (claim, _) in enumerate(batch.sending):
            error = batch.sent.get(index, NotSent())
            if isinstance(error, Deferred) or (error is not None and error.limited):
                deferred.append(claim.outbox_id)
                if not isinstance(error, Deferred):
                    limited.add(claim.outbox_id)
                wait = max(wait, error.retry_after or 0.0)
            elif isinstance(error, NotSent):
                unsent.append(claim.outbox_id)
            else:
                batch.outcomes.append(self._outcome(sink, claim, error, finished))
        self._report(sink.spec.name, batch)
        stamp = format_time(self.clock())
        deadline = asyncio.get_running_loop().time() + self.lease.total_seconds() / 2
        finish = partial(self.store.finish_forwards, batch.outcomes, stamp, batch.lease)
        recorded = await self._until_stored(finish, deadline)
        given_back = partial(self.store.lease_forwards, unsent, batch.lease, stamp)
        await self._until_stored(given_back, deadline)
        held: set[int] = set()
        if deferred:
            wait = min(wait, self.settings.retry_max)
            log.info("sink %r is rate limited: sending again in %gs", sink.spec.name, wait)
            resume = format_time(finished + timedelta(seconds=wait))
            hold = partial(self.store.lease_forwards, deferred, batch.lease, resume)
            held = await self._until_stored(hold, deadline)
        # Only what was recorded is counted: a row whose lease ran out meanwhile is another
        # worker's now, and that worker counts how its own attempt ends.
        lost = len(batch.outcomes) - len(recorded) + len(limited - held)
        if lost:
            log.info(
                "sink %r: %d forwards not recorded: their lease ran out and another worker"
                " holds them now",
                sink.spec.name,
                lost,
            )
        counters = self.metrics.forward_results(sink.spec.name)
        for outcome in recorded:
            counters[outcome.state].inc()
        counters["pending"].inc(len(limited & held))  # a 429 counts as a retry

    async def _until_stored(self, write: Callable[[], Awaitable[T]], deadline: float) -> T:
        """Record what a batch did, trying again while the store fails for a moment (locked
        past its busy timeout, PostgreSQL restarting, a full disk freed): only the worker knows
        what went out, and a forward left pending would be sent again once its lease ran out.
        Not past `deadline` (loop time: half a lease after the batch ended, when another
        worker may soon take the rows), nor once stopping."""
        loop = asyncio.get_running_loop()
        delay = STORE_RETRY
        while True:
            try:
                return await write()
            except StoreUnavailable as exc:
                if self._stopping or loop.time() + delay > deadline:
                    raise
                log.warning("recording forwards failed, trying again in %gs: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, STORE_RETRY_MAX)

    async def _deliver(self, sink: Sink, events: list[Event], batch: Batch) -> None:
        """Fill `batch.sent` with each event's result: as each is done for a sink that sends
        them one by one (none once stopping or the batch is no longer this worker's), at once
        for one that sends the batch in one go."""
        sent = batch.sent
        if sink.spec.name not in self._started:
            try:
                await sink.start()
            except Exception as exc:
                error = exc if isinstance(exc, SinkError) else SinkError(f"cannot start: {exc}")
                sent.update(dict.fromkeys(range(len(events)), error))
                return
            self._started.add(sink.spec.name)
        if isinstance(sink, OneByOne):
            await sink.deliver(events, sent.__setitem__, partial(self._halted, batch))
        else:
            sent.update(enumerate(await sink.deliver(events)))

    def _report(self, name: str, batch: Batch) -> None:
        """Say when a sink starts failing (its forwards are tried again, so nothing else
        would: only a dead letter is logged), every FAILING_AGAIN seconds while it goes on,
        and when it delivers again. A batch that delivered nothing and failed a retry pauses
        the sink (doubling from RECEIVER_RETRY_BASE to SINK_PAUSE_MAX): each forward backs
        off on its own, but a backlog's next ones were due, and a destination answering 500s
        got every one of them at full speed (275 requests a second)."""
        results = batch.sent.values()
        failed = [  # to be tried again: not a refusal for good (logged as a dead letter)
            error
            for error in results
            if error is not None
            and not isinstance(error, NotSent | Deferred)
            and not error.limited
            and not error.permanent
        ]
        delivered = any(error is None for error in results)
        now = asyncio.get_running_loop().time()
        if delivered:
            self._paused.pop(name, None)
        elif failed:
            times = self._paused.get(name, (0, 0.0))[0] + 1
            wait = min(
                self.settings.retry_max,
                SINK_PAUSE_MAX,
                self.settings.retry_base * 2 ** min(times - 1, 30),
            )
            self._paused[name] = (times, now + wait)
        if failed and now - self._failing.get(name, -FAILING_AGAIN) >= FAILING_AGAIN:
            log.warning(
                "sink %r is failing (%d of %d in a batch): %s; its forwards are tried again",
                name,
                len(failed),
                len(batch.sending),
                str(failed[-1])[:500],
            )
            self._failing[name] = now
        elif not failed and name in self._failing and delivered:
            del self._failing[name]
            log.info("sink %r delivers again", name)

    def _halted(self, batch: Batch) -> bool:
        """Whether a one-by-one sink must send no more of `batch` (times are fixed width)."""
        return self._stopping or batch.lost or format_time(self.clock()) >= batch.lease

    def _outcome(self, sink: Sink, claim: Claim, error: SinkError | None, now: datetime) -> Outcome:
        if error is None:
            return Outcome(claim.outbox_id, "done", format_time(now))
        attempt = claim.attempts + 1
        limit = sink.spec.max_attempts or self.settings.max_attempts
        message = str(error)[:500]
        if error.permanent or attempt >= limit:
            log.warning("forward %s to %s is dead: %s", claim.outbox_id, sink.spec.name, message)
            return Outcome(claim.outbox_id, "dead", format_time(now), message)
        delay = backoff(
            attempt, self.settings.retry_base, self.settings.retry_max, error.retry_after
        )
        return Outcome(
            claim.outbox_id, "pending", format_time(now + timedelta(seconds=delay)), message
        )

    def _runflow_waits(self) -> bool:
        """Whether Runflow's last 429 still holds every refetch and poll back."""
        return asyncio.get_running_loop().time() < self._runflow_until

    def _runflow_limited(self, exc: ReceiverError) -> float | None:
        """For Runflow's 429: the seconds to wait (its Retry-After, at least RECEIVER_RETRY_BASE
        and at most RECEIVER_RETRY_MAX), for which every refetch and poll of this worker is
        held back, not only the one refused: the limit is the API key's."""
        if not (isinstance(exc, RunflowError) and exc.http_status == 429):
            return None
        settings = self.settings
        wait = min(max(exc.retry_after or 0.0, settings.retry_base), settings.retry_max)
        until = asyncio.get_running_loop().time() + wait
        self._runflow_until = max(self._runflow_until, until)
        return wait

    async def _refetch_round(self, _: Sink | None) -> int:
        if self._runflow_waits():
            return 0
        now = self.clock()
        lease = format_time(now + self.lease)
        due = await self.store.claim_refetches(now=format_time(now), lease_until=lease, limit=16)
        if due:
            await asyncio.gather(*(self._refetch(id_, n, lease) for id_, n in due))
            self.notify()
        return len(due)

    async def _refetch(self, evaluation_id: str, attempts: int, lease: str) -> None:
        assert self.runflow is not None
        try:
            found = await self.runflow.get_evaluation(evaluation_id, self.settings.refetch_embeds)
            fields = normalize(found).fields
            status = fields.get("status_code")
            if status not in TERMINAL:  # only verdicts are refetched; Runflow's GET can lag
                raise RunflowError(
                    f"Runflow still answers {status}: no verdict yet", retryable=True
                )
        except (RunflowError, ReceiverError) as exc:
            await self._refetch_failed(evaluation_id, attempts + 1, lease, exc)
            return
        lagging = await self.store.refetched(fields, format_time(self.clock()))
        if lagging:  # nothing stored: the verdict that followed stays, and is asked for again
            await self._refetch_failed(
                evaluation_id, attempts + 1, lease, RunflowError(lagging, retryable=True)
            )
            return
        self.metrics.refetch_results["ok"].inc()

    async def _refetch_failed(
        self, evaluation_id: str, attempt: int, lease: str, exc: ReceiverError
    ) -> None:
        """Try again after a backoff if that can help, up to RECEIVER_MAX_ATTEMPTS; else the
        refetch is `failed`, with its error, and the stored state stays as it is. A 429 is
        no attempt (Runflow asked to wait, as a sink's 429). Nothing is recorded once the
        refetch is no longer this lease's (started over for a verdict that followed, or stored
        by `receiver refetch`)."""
        retry_at = None
        limited = self._runflow_limited(exc)
        if limited is not None:
            retry_at = format_time(self.clock() + timedelta(seconds=limited))
        elif (
            isinstance(exc, RunflowError) and exc.retryable and attempt < self.settings.max_attempts
        ):
            delay = backoff(
                attempt, self.settings.retry_base, self.settings.retry_max, exc.retry_after
            )
            retry_at = format_time(self.clock() + timedelta(seconds=delay))
        if await self.store.refetch_failed(
            evaluation_id,
            str(exc)[:500],
            retry_at,
            format_time(self.clock()),
            held=lease,
            attempt=limited is None,
        ):
            self.metrics.refetch_results["failed" if retry_at is None else "retry"].inc()

    async def _reconcile_loop(self) -> None:
        while not self._stopping:
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconciliation pass failed; next pass as scheduled")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.settings.reconcile_interval)

    async def reconcile(self, limit: int = 100) -> dict[str, int]:
        """One pass: poll evaluations known but not terminal for longer than
        RECEIVER_RECONCILE_AFTER, and ingest what Runflow says through the callback path
        (source `poll`), so a verdict whose callbacks were all lost is stored and forwarded
        exactly once. At most POLLS_PER_SECOND requests."""
        counts = {"polled": 0, "verdicts": 0, "pending": 0, "errors": 0}
        if self.client is None or self._runflow_waits():
            return counts
        now = self.clock()
        if not await self.store.polls_due(format_time(now)):
            return counts
        due = await self.store.claim_polls(
            now=format_time(now), lease_until=format_time(now + self.lease), limit=limit
        )
        for index, (evaluation_id, polls) in enumerate(due):
            if index:
                await asyncio.sleep(1 / POLLS_PER_SECOND)
            counts["polled"] += 1
            outcome = await self._poll(evaluation_id, polls)
            counted = "errors" if outcome == LIMITED else outcome
            counts[counted] += 1
            self.metrics.reconcile_results[counted].inc()
            if outcome == LIMITED:  # the rest of the pass waits out its lease
                break
        if counts["verdicts"]:
            self.notify()
        return counts

    async def _poll(self, evaluation_id: str, polls: int) -> str:
        assert self.client is not None
        embeds = self.settings.refetch_embeds if self.settings.refetch else ()
        after = self.settings.reconcile_after
        try:
            found = await self.client.get_evaluation(evaluation_id, embeds)
            body = json.dumps(found, separators=(",", ":")).encode()
            callback = normalize(found)
        except (RunflowError, ReceiverError) as exc:
            # Polling stops only where asking again cannot help: Runflow does not know the
            # evaluation (404), or answers something that is not it. A refused key (401/403)
            # or a rate limit waits for the next poll (a 429's Retry-After at least).
            runflow = exc if isinstance(exc, RunflowError) else None
            self._runflow_limited(exc)
            gone = (
                runflow is None
                or runflow.http_status == 404
                or (runflow.http_status is None and not runflow.retryable)
            )
            wait = max(after * 2**polls, (runflow and runflow.retry_after) or 0)
            next_at = self.clock() + timedelta(seconds=min(wait, 86400))
            await self.store.polled(
                evaluation_id,
                str(exc)[:500],
                None if gone else format_time(next_at),
                format_time(self.clock()),
            )
            return LIMITED if runflow is not None and runflow.http_status == 429 else "errors"
        lagging = await self.store.poll_answered(
            Delivery(body=body, callback=callback, source="poll", refetched=bool(embeds))
        )
        next_at = self.clock() + timedelta(seconds=min(after * 2 ** (polls + 1), 86400))
        await self.store.polled(
            evaluation_id, lagging, format_time(next_at), format_time(self.clock())
        )
        if lagging:  # nothing stored: the verdict that followed stays (polling ends with it)
            return "errors"
        return "verdicts" if callback.fields.get("status_code") in TERMINAL else "pending"
