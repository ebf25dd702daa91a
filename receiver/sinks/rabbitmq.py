"""RabbitMQ sink: a durable topic exchange, routing key = event type, persistent messages in
the structured mode of the CloudEvents AMQP binding (content type application/cloudevents+json)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import DeliveryError, PublishError

from ..events import CONTENT_TYPE
from ..sinkspec import SinkSpec
from ._queues import body, option, reason, where
from .base import Event, SinkError


class RabbitMQSink:
    """Publisher confirms and `mandatory` make a delivery mean "stored in a queue": a nack, an
    unroutable return (no queue bound yet) or a missing confirm is a failure the outbox retries.
    The robust connection reconnects and re-declares the exchange by itself after an outage."""

    timeout = 10.0

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.exchange_name = str(option(spec, "exchange"))
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None

    async def start(self) -> None:
        try:
            connection = await aio_pika.connect_robust(self.spec.url, timeout=self.timeout)
        except Exception as exc:
            raise SinkError(
                f"rabbitmq at {where(self.spec.url)} is unreachable: {reason(exc, self.spec.url)}"
            ) from None
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange = await channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
        except Exception as exc:  # e.g. the exchange exists with another type
            await connection.close()
            raise SinkError(
                f"rabbitmq exchange {self.exchange_name!r}: {reason(exc, self.spec.url)}"
            ) from None
        self._connection = connection

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        if self._connection is None or self._exchange is None:
            return [SinkError("rabbitmq sink is not started") for _ in events]
        if not self._connection.connected.is_set():
            # Publishing now would wait for the reconnect; fail fast and let the outbox retry.
            text = f"rabbitmq at {where(self.spec.url)}: not connected (reconnecting)"
            return [SinkError(text) for _ in events]
        if not events:
            return []
        exchange = self._exchange
        tasks = [asyncio.ensure_future(self._publish(exchange, event)) for event in events]
        try:  # one deadline for the whole batch: cheaper than a timer per message
            _, late = await asyncio.wait(tasks, timeout=self.timeout)
        finally:  # also when the caller is cancelled: no publish outlives its batch
            for task in tasks:
                task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        timed_out = f"rabbitmq: no publisher confirm within {self.timeout:g}s"
        return [SinkError(timed_out) if task in late else task.result() for task in tasks]

    async def _publish(self, exchange: AbstractExchange, event: Event) -> SinkError | None:
        message = aio_pika.Message(
            body(event),
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event["id"],
        )
        try:
            await exchange.publish(message, routing_key=event["type"], mandatory=True)
        except PublishError:
            return SinkError(f"rabbitmq: no queue bound for routing key {event['type']!r}")
        except DeliveryError:
            return SinkError("rabbitmq: the broker refused the message (nack)")
        except Exception as exc:  # channel or connection lost mid-publish
            return SinkError(f"rabbitmq: {reason(exc, self.spec.url)}")
        return None

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._exchange = None
