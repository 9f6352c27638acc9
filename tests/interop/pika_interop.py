#!/usr/bin/env python3
"""Interop checks for Warren with Python's pika (BlockingConnection).

Run by tests/tests/pika_interop.rs against an in-process server:

    python tests/interop/pika_interop.py --port N [--host 127.0.0.1]

Every check asserts real values against what RabbitMQ does. The script prints one line per
check and exits non-zero with a clear message on the first failure.
"""

import datetime
import decimal
import sys
import time

from interop_checks import CheckFailed, expect, expect_eq, require, run_checks, warren_arguments

require("pika", "pika.exceptions", "pika.spec")
import pika  # noqa: E402 - after the guard
import pika.exceptions  # noqa: E402
import pika.spec  # noqa: E402

# The whole script should take a few seconds; a hang is a failure, not a stuck CI job.
OVERALL_TIMEOUT_SECS = 120
# How long to wait for deliveries that should arrive at once.
DELIVERY_WAIT_SECS = 5.0

EXCHANGE = "pika.direct"
QUEUE = "pika.work"
ROUTING_KEY = "work"


def expect_channel_error(fn, code, text_prefix, what):
    """Runs fn, which must close its channel with `code`; returns the exception."""
    try:
        fn()
    except pika.exceptions.ChannelClosedByBroker as exc:
        expect_eq(exc.reply_code, code, f"{what}: reply code")
        expect(
            exc.reply_text.startswith(text_prefix),
            f"{what}: reply text {exc.reply_text!r} should start with {text_prefix!r}",
        )
        return exc
    raise CheckFailed(f"{what}: expected ChannelClosedByBroker({code}), but no error was raised")


class Interop:
    def __init__(self, host, port):
        self.host = host
        self.port = port
        self.conn = None
        self.ch = None

    def params(self, user="guest", password="guest", **kw):
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host="/",
            credentials=pika.PlainCredentials(user, password),
            connection_attempts=1,
            socket_timeout=5,
            blocked_connection_timeout=30,
            **kw,
        )

    def wait_for(self, conn, cond, what, timeout=DELIVERY_WAIT_SECS):
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise CheckFailed(f"timed out after {timeout}s waiting for {what}")
            conn.process_data_events(time_limit=0.05)

    # ---------------------------------------------------------------- checks

    def check_connect(self):
        self.conn = pika.BlockingConnection(self.params())
        expect(self.conn.is_open, "connection should be open")
        expect(self.conn.publisher_confirms_supported, "server should advertise publisher_confirms")
        expect(self.conn.basic_nack_supported, "server should advertise basic.nack")
        expect(
            self.conn.consumer_cancel_notify_supported,
            "server should advertise consumer_cancel_notify",
        )
        props = self.conn._impl.server_properties
        expect(isinstance(props.get("product"), (str, bytes)), f"server product property: {props!r}")
        caps = props.get("capabilities", {})
        expect_eq(caps.get("authentication_failure_close"), True, "authentication_failure_close capability")
        self.ch = self.conn.channel()
        expect(self.ch.is_open, "channel should be open")

    def check_declare(self):
        ch = self.ch
        ok = ch.exchange_declare(EXCHANGE, exchange_type="direct", durable=False)
        expect(isinstance(ok.method, pika.spec.Exchange.DeclareOk), f"exchange.declare-ok, got {ok.method!r}")
        # Redeclaring with the same properties is fine, and passive finds it.
        ch.exchange_declare(EXCHANGE, exchange_type="direct", durable=False)
        ch.exchange_declare(EXCHANGE, passive=True)

        ok = ch.queue_declare(QUEUE)
        expect_eq(ok.method.queue, QUEUE, "declare-ok queue name")
        expect_eq(ok.method.message_count, 0, "declare-ok message_count")
        expect_eq(ok.method.consumer_count, 0, "declare-ok consumer_count")
        ok = ch.queue_bind(QUEUE, EXCHANGE, routing_key=ROUTING_KEY)
        expect(isinstance(ok.method, pika.spec.Queue.BindOk), f"queue.bind-ok, got {ok.method!r}")

        ok = ch.queue_declare("", exclusive=True)
        expect(
            ok.method.queue.startswith("amq.gen-"),
            f"server-named queue should start with amq.gen-, got {ok.method.queue!r}",
        )
        ok2 = ch.queue_declare(ok.method.queue, passive=True)
        expect_eq(ok2.method.queue, ok.method.queue, "passive declare of the server-named queue")

    def check_publish_with_confirms(self):
        ch = self.ch
        ch.confirm_delivery()
        for i in range(10):
            # Raises NackError / UnroutableError if the broker does not ack.
            ch.basic_publish(EXCHANGE, ROUTING_KEY, f"msg-{i}".encode())
        ok = ch.queue_declare(QUEUE, passive=True)
        expect_eq(ok.method.message_count, 10, "messages in the queue after 10 confirmed publishes")

    def check_consume_and_ack(self):
        ch = self.ch
        got = []

        def on_message(channel, method, properties, body):
            got.append((method, body))
            channel.basic_ack(method.delivery_tag)

        tag = ch.basic_consume(QUEUE, on_message, auto_ack=False, consumer_tag="pika-c1")
        expect_eq(tag, "pika-c1", "consumer tag from consume-ok")
        self.wait_for(self.conn, lambda: len(got) >= 10, "10 deliveries")
        bodies = [b for _, b in got]
        expect_eq(bodies, [f"msg-{i}".encode() for i in range(10)], "delivered bodies, in order")
        for method, _ in got:
            expect_eq(method.consumer_tag, "pika-c1", "delivery consumer tag")
            expect_eq(method.exchange, EXCHANGE, "delivery exchange")
            expect_eq(method.routing_key, ROUTING_KEY, "delivery routing key")
            expect_eq(method.redelivered, False, "first delivery redelivered flag")
        tags = [m.delivery_tag for m, _ in got]
        expect_eq(tags, list(range(1, 11)), "delivery tags")
        ch.basic_cancel("pika-c1")
        ok = ch.queue_declare(QUEUE, passive=True)
        expect_eq(ok.method.message_count, 0, "messages left after acking everything")
        expect_eq(ok.method.consumer_count, 0, "consumers left after basic.cancel")

    def check_nack_requeue(self):
        ch = self.ch
        ch.basic_publish(EXCHANGE, ROUTING_KEY, b"nack-me")
        seen = []

        def on_message(channel, method, properties, body):
            seen.append((method.redelivered, body))
            if len(seen) == 1:
                channel.basic_nack(method.delivery_tag, requeue=True)
            else:
                channel.basic_ack(method.delivery_tag)

        ch.basic_consume(QUEUE, on_message, consumer_tag="pika-nack")
        self.wait_for(self.conn, lambda: len(seen) >= 2, "the nacked message to come back")
        expect_eq(seen[0], (False, b"nack-me"), "first delivery (redelivered, body)")
        expect_eq(seen[1], (True, b"nack-me"), "redelivery after nack(requeue=True)")
        ch.basic_cancel("pika-nack")

        # nack without requeue drops the message.
        ch.basic_publish(EXCHANGE, ROUTING_KEY, b"drop-me")
        method, _, body = ch.basic_get(QUEUE)
        expect(method is not None, "basic.get should return the message to drop")
        expect_eq(body, b"drop-me", "body to drop")
        ch.basic_nack(method.delivery_tag, requeue=False)
        ok = ch.queue_declare(QUEUE, passive=True)
        expect_eq(ok.method.message_count, 0, "messages left after nack(requeue=False)")

    def check_basic_get(self):
        ch = self.ch
        for body in (b"get-1", b"get-2"):
            ch.basic_publish(EXCHANGE, ROUTING_KEY, body)
        method, props, body = ch.basic_get(QUEUE)
        expect(isinstance(method, pika.spec.Basic.GetOk), f"basic.get-ok, got {method!r}")
        expect_eq(body, b"get-1", "first basic.get body")
        expect_eq(method.message_count, 1, "get-ok message_count (messages remaining)")
        expect_eq(method.redelivered, False, "get-ok redelivered")
        expect_eq(method.exchange, EXCHANGE, "get-ok exchange")
        expect_eq(method.routing_key, ROUTING_KEY, "get-ok routing key")
        ch.basic_ack(method.delivery_tag)
        method, _, body = ch.basic_get(QUEUE, auto_ack=True)
        expect_eq(body, b"get-2", "second basic.get body")
        expect_eq(method.message_count, 0, "get-ok message_count of the last message")
        empty = ch.basic_get(QUEUE)
        expect_eq(empty, (None, None, None), "basic.get on an empty queue (get-empty)")

        # An unacked get goes back to the queue, redelivered, when its channel closes.
        ch.basic_publish(EXCHANGE, ROUTING_KEY, b"get-unacked")
        other = self.conn.channel()
        method, _, body = other.basic_get(QUEUE)
        expect_eq(body, b"get-unacked", "unacked basic.get body")
        other.close()
        method, _, body = ch.basic_get(QUEUE, auto_ack=True)
        expect(method is not None, "the unacked message should be back after its channel closed")
        expect_eq(body, b"get-unacked", "requeued body")
        expect_eq(method.redelivered, True, "requeued message redelivered flag")

    def check_properties_round_trip(self):
        ch = self.ch
        headers = {
            "str": "text ünïcode",
            "int": 42,
            "negative": -7,
            "big": 2**40,
            "bool": True,
            "false": False,
            "decimal": decimal.Decimal("3.14"),
            "timestamp": datetime.datetime(2024, 1, 2, 3, 4, 5),
            "list": [1, "two", False, {"three": 3}],
            "table": {"nested": "yes", "deeper": {"n": 1}},
            "bytes": b"\x00\x01\xfe\xff",
            "void": None,
        }
        props = pika.BasicProperties(
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
            delivery_mode=2,
            priority=5,
            correlation_id="corr-1",
            reply_to="reply.queue",
            expiration="60000",
            message_id="msg-id-1",
            timestamp=1700000000,
            type="order.created",
            user_id="guest",
            app_id="pika-interop",
        )
        body = bytes(range(256)) * 4
        ch.basic_publish(EXCHANGE, ROUTING_KEY, body, properties=props)
        method, got, got_body = ch.basic_get(QUEUE, auto_ack=True)
        expect(method is not None, "basic.get should return the message with properties")
        expect_eq(got_body, body, "binary body")
        for name in (
            "content_type",
            "content_encoding",
            "delivery_mode",
            "priority",
            "correlation_id",
            "reply_to",
            "expiration",
            "message_id",
            "timestamp",
            "type",
            "user_id",
            "app_id",
        ):
            expect_eq(getattr(got, name), getattr(props, name), f"property {name}")
        expect_eq(got.headers, headers, "headers table")

        # A body larger than frame_max (131072 by default) is split into several body frames,
        # both ways; an empty body has no body frame at all.
        big = bytes(i % 251 for i in range(300_000))
        ch.basic_publish(EXCHANGE, ROUTING_KEY, big)
        ch.basic_publish(EXCHANGE, ROUTING_KEY, b"", properties=pika.BasicProperties(headers={}))
        _, _, got_big = ch.basic_get(QUEUE, auto_ack=True)
        expect_eq(len(got_big), len(big), "multi-frame body length")
        expect(got_big == big, "multi-frame body content differs")
        _, got_props, got_empty = ch.basic_get(QUEUE, auto_ack=True)
        expect_eq(got_empty, b"", "empty body")
        expect(got_props.headers in ({}, None), f"empty headers table, got {got_props.headers!r}")

    def check_mandatory_unroutable(self):
        ch = self.ch
        try:
            ch.basic_publish(EXCHANGE, "nowhere", b"lost", mandatory=True)
        except pika.exceptions.UnroutableError as exc:
            expect_eq(len(exc.messages), 1, "returned messages")
            returned = exc.messages[0]
            expect_eq(returned.method.reply_code, 312, "basic.return reply code")
            expect_eq(returned.method.reply_text, "NO_ROUTE", "basic.return reply text")
            expect_eq(returned.method.exchange, EXCHANGE, "basic.return exchange")
            expect_eq(returned.method.routing_key, "nowhere", "basic.return routing key")
            expect_eq(returned.body, b"lost", "basic.return body")
        else:
            raise CheckFailed("mandatory unroutable publish did not raise UnroutableError")
        # Without mandatory the broker drops it silently and still confirms.
        ch.basic_publish(EXCHANGE, "nowhere", b"dropped")
        # And a routable mandatory publish is fine.
        ch.basic_publish(EXCHANGE, ROUTING_KEY, b"routable", mandatory=True)
        method, _, body = ch.basic_get(QUEUE, auto_ack=True)
        expect_eq(body, b"routable", "mandatory routable message")
        expect(ch.is_open, "channel should stay open after a basic.return")

    def check_qos_prefetch(self):
        ch = self.conn.channel()
        ch.basic_qos(prefetch_count=2)
        for i in range(5):
            ch.basic_publish(EXCHANGE, ROUTING_KEY, f"q{i}".encode())
        got = []
        ch.basic_consume(QUEUE, lambda c, m, p, b: got.append((m.delivery_tag, b)), consumer_tag="pika-qos")
        self.wait_for(self.conn, lambda: len(got) >= 2, "2 deliveries under prefetch 2")
        self.conn.process_data_events(time_limit=0.3)
        expect_eq(len(got), 2, "deliveries outstanding with prefetch_count=2 before any ack")
        ch.basic_ack(got[1][0], multiple=True)
        self.wait_for(self.conn, lambda: len(got) >= 4, "2 more deliveries after a multiple ack")
        ch.basic_ack(got[3][0], multiple=True)
        self.wait_for(self.conn, lambda: len(got) >= 5, "the last delivery")
        ch.basic_ack(got[4][0])
        expect_eq([b for _, b in got], [f"q{i}".encode() for i in range(5)], "prefetched bodies")
        ch.close()

    def check_error_missing_queue(self):
        ch = self.conn.channel()
        expect_channel_error(
            lambda: ch.queue_declare("pika.does-not-exist", passive=True),
            404,
            "NOT_FOUND - no queue 'pika.does-not-exist' in vhost '/'",
            "passive declare of a missing queue",
        )
        expect(ch.is_closed, "the channel should be closed after a channel error")
        expect(self.conn.is_open, "the connection should stay open after a channel error")

        ch = self.conn.channel()
        expect_channel_error(
            lambda: ch.exchange_declare("pika.no-such-exchange", passive=True),
            404,
            "NOT_FOUND - no exchange 'pika.no-such-exchange' in vhost '/'",
            "passive declare of a missing exchange",
        )

        ch = self.conn.channel()
        ch.confirm_delivery()
        expect_channel_error(
            lambda: ch.basic_publish("pika.no-such-exchange", "k", b"x"),
            404,
            "NOT_FOUND - no exchange 'pika.no-such-exchange' in vhost '/'",
            "publish to a missing exchange",
        )

        ch = self.conn.channel()
        expect_channel_error(
            lambda: ch.basic_consume("pika.does-not-exist", lambda *a: None),
            404,
            "NOT_FOUND - no queue 'pika.does-not-exist' in vhost '/'",
            "consume from a missing queue",
        )

    def check_error_inequivalent(self):
        ch = self.conn.channel()
        expect_channel_error(
            lambda: ch.queue_declare(QUEUE, durable=True),
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{QUEUE}' in vhost '/'",
            "redeclare a queue with a different durable flag",
        )
        ch = self.conn.channel()
        expect_channel_error(
            lambda: ch.queue_declare(QUEUE, arguments={"x-max-length": 10}),
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{QUEUE}' in vhost '/'",
            "redeclare a queue with different arguments",
        )
        ch = self.conn.channel()
        expect_channel_error(
            lambda: ch.exchange_declare(EXCHANGE, exchange_type="fanout"),
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{EXCHANGE}' in vhost '/'",
            "redeclare an exchange with a different type",
        )
        # basic.ack has no reply, so the channel error shows up on the next synchronous call.
        ch = self.conn.channel()
        ch.basic_ack(999)
        expect_channel_error(
            lambda: ch.queue_declare(QUEUE, passive=True),
            406,
            "PRECONDITION_FAILED - unknown delivery tag 999",
            "ack of an unknown delivery tag",
        )

    def check_exclusive_queue_locked(self):
        owner_ch = self.conn.channel()
        name = owner_ch.queue_declare("pika.exclusive", exclusive=True).method.queue
        other = pika.BlockingConnection(self.params())
        try:
            ch = other.channel()
            expect_channel_error(
                lambda: ch.queue_declare(name, passive=True),
                405,
                "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'pika.exclusive'",
                "passive declare of another connection's exclusive queue",
            )
        finally:
            other.close()
        # It goes away with its connection.
        owner = pika.BlockingConnection(self.params())
        owner.channel().queue_declare("pika.exclusive-2", exclusive=True)
        owner.close()
        ch = self.conn.channel()
        expect_channel_error(
            lambda: ch.queue_declare("pika.exclusive-2", passive=True),
            404,
            "NOT_FOUND - no queue 'pika.exclusive-2'",
            "an exclusive queue after its connection closed",
        )
        owner_ch.close()

    def check_consumer_cancel_notify(self):
        ch = self.conn.channel()
        ch.queue_declare("pika.doomed")
        cancelled = []
        ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
        ch.basic_consume("pika.doomed", lambda *a: None, consumer_tag="pika-doomed")
        deleter = self.conn.channel()
        ok = deleter.queue_delete("pika.doomed")
        expect_eq(ok.method.message_count, 0, "delete-ok message_count")
        self.wait_for(self.conn, lambda: cancelled, "basic.cancel from the broker")
        expect_eq(cancelled, ["pika-doomed"], "cancelled consumer tags")
        expect(ch.is_open, "the channel should stay open after a broker cancel")
        deleter.close()
        ch.close()

    def check_connection_still_usable(self):
        expect(self.conn.is_open, "connection should still be open after the channel errors")
        ch = self.conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(EXCHANGE, ROUTING_KEY, b"still-alive")
        method, _, body = ch.basic_get(QUEUE, auto_ack=True)
        expect_eq(body, b"still-alive", "round trip on a fresh channel after errors")
        ok = ch.queue_purge(QUEUE)
        expect_eq(ok.method.message_count, 0, "purge-ok message_count")
        ok = ch.queue_delete(QUEUE)
        expect_eq(ok.method.message_count, 0, "delete-ok message_count")
        ch.exchange_delete(EXCHANGE)
        expect_channel_error(
            lambda: ch.exchange_declare(EXCHANGE, passive=True),
            404,
            f"NOT_FOUND - no exchange '{EXCHANGE}' in vhost '/'",
            "passive declare of the deleted exchange",
        )
        self.ch = None

    def check_heartbeats(self):
        proposed = []

        def negotiate(_conn, server_value):
            proposed.append(server_value)
            return 2

        conn = pika.BlockingConnection(self.params(heartbeat=negotiate))
        try:
            expect_eq(proposed, [60], "heartbeat the server proposes in connection.tune")
            expect_eq(conn._impl.params.heartbeat, 2, "negotiated heartbeat")
            # Idle for 5 s: the server drops a client silent for 2 x 2 s, so staying open means
            # pika's heartbeats arrive; the server's (every 1 s when idle) are counted below.
            conn.sleep(5)
            expect(conn.is_open, "connection should survive an idle period with heartbeats")
            checker = conn._impl._heartbeat_checker
            received = getattr(checker, "_heartbeat_frames_received", None)
            expect(received is not None and received >= 2, f"heartbeats received from the server: {received}")
            ch = conn.channel()
            ok = ch.queue_declare("", exclusive=True)
            expect(ok.method.queue, "queue.declare after the idle period")
        finally:
            if conn.is_open:
                conn.close()

    def check_bad_auth(self):
        try:
            conn = pika.BlockingConnection(self.params(password="wrong-password"))
        except pika.exceptions.ProbableAuthenticationError as exc:
            text = str(exc)
            expect("403" in text and "ACCESS_REFUSED" in text, f"auth failure should carry 403 ACCESS_REFUSED: {text}")
        except pika.exceptions.AMQPConnectionError as exc:
            raise CheckFailed(f"bad password: expected ProbableAuthenticationError, got {exc!r}")
        else:
            conn.close()
            raise CheckFailed("connecting with a wrong password succeeded")

    def check_close(self):
        self.conn.close()
        expect(self.conn.is_closed, "connection should be closed")


CHECKS = [
    "connect",
    "declare",
    "publish_with_confirms",
    "consume_and_ack",
    "nack_requeue",
    "basic_get",
    "properties_round_trip",
    "mandatory_unroutable",
    "qos_prefetch",
    "error_missing_queue",
    "error_inequivalent",
    "exclusive_queue_locked",
    "consumer_cancel_notify",
    "connection_still_usable",
    "heartbeats",
    "bad_auth",
    "close",
]


def main():
    parser = warren_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()

    banner = f"pika {pika.__version__}, Python {sys.version.split()[0]}, broker {args.host}:{args.port}"
    run = Interop(args.host, args.port)
    return run_checks(CHECKS, lambda: run, banner=banner, passed="pika",
                      timeout_secs=OVERALL_TIMEOUT_SECS, timeout_what="the interop run")


if __name__ == "__main__":
    sys.exit(main())
