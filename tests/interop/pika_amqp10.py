#!/usr/bin/env python3
"""pika through Warren's AMQP 1.0 bridge, with the messages stored in RabbitMQ (AMQP 1.0 plugin).

Run by tests/tests/pika_amqp10.rs against an in-process Warren whose configuration routes
exchange EXCHANGE to the AMQP 1.0 address /amq/queue/MAIN and feeds Warren's queue QUEUE from
that same address (and Warren's queue DLQ_QUEUE from /amq/queue/DLQ), so every message goes
pika -> Warren -> AMQP 1.0 -> RabbitMQ queue -> AMQP 1.0 -> Warren -> pika:

    python tests/interop/pika_amqp10.py --port N --exchange E --queue Q --dlq-queue D \
        --rabbitmq-url amqp://... --main-queue MAIN --dlq DLQ --checks properties,requeue,...

The RabbitMQ queues exist already (the Rust test declares them, MAIN dead-lettering to DLQ);
--rabbitmq-url is used only to read their depth. The checks:

- properties: --count messages published with confirms, each with every basic property and
  headers of every type pika can send (str, int, long, bool, Decimal, datetime, nested dict,
  list, bytes, None, an x-opt-* annotation header), come back from QUEUE intact, types included;
- requeue: a message nacked with requeue=True comes back with redelivered=True and is then
  acked; every other message arrives once, not redelivered; MAIN ends empty;
- dead_letter: a message rejected with requeue=False lands in DLQ and comes back through
  DLQ_QUEUE with its properties and headers (RabbitMQ drops the expiration of a dead-lettered
  message, and adds no x-death over AMQP 1.0); MAIN and DLQ end empty;
- restart: --count messages published with confirms while a consumer thread receives them; the
  broker is restarted halfway (--restart-cmd): every confirmed message comes back intact
  (duplicates are counted, not failed).

Prints one line per check; exits non-zero with a clear message on the first failure.
"""

import datetime
import decimal
import json
import sys
import time

from interop_checks import (CheckFailed, ConsumerThread, expect, expect_eq, publish_across_restart, require,
                            run_checks, warren_arguments)

require("pika", "pika.exceptions")
import pika  # noqa: E402 - after the guard

OVERALL_TIMEOUT_SECS = 150
# How long messages may take to come back once published.
RECEIVE_WAIT_SECS = 60.0
# The user Warren logs pika in as: user-id must equal it (Warren and RabbitMQ both check).
USER = "guest"
# Long enough never to expire in the queue during a run.
EXPIRATION = "3600000"


def python_type(value):
    """The value's type, pika's `long` marker (how it decodes 64-bit integers) being an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int
    return type(value)


def same_typed(a, b):
    """Equal, and of the same Python types all the way down (True is not 1, b'' is not '')."""
    if python_type(a) is not python_type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_typed(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_typed(x, y) for x, y in zip(a, b))
    return a == b


def expected_headers(check, seq, received=False):
    """One header of every type pika encodes (it refuses float), all kept by the mapping; as
    published, or (`received`) as pika decodes them on the way back."""
    return {
        "check": check,
        "seq": seq,
        "text": "héllo wörld ✓",
        "negative": -7,
        "big": 2 ** 40 + seq,
        # pika sends a negative 64-bit integer as 'L' (signed) but reads 'l', the tag Warren
        # and RabbitMQ send every 64-bit integer with, as unsigned: it comes back as its two's
        # complement, exactly as it would from RabbitMQ itself.
        "negative-big": 2 ** 64 - 2 ** 40 if received else -(2 ** 40),
        "yes": True,
        "no": False,
        "price": decimal.Decimal("123.45"),
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "nested": {"tenant": "acme", "deep": {"level": 2, "tags": ["a", 1, False]}},
        "list": ["x", 2, True, {"k": "v"}, [None]],
        "bytes": b"\x00\xff binary",
        "none": None,
        # x-opt-* headers travel as message annotations of the same name.
        "x-opt-warren-test": f"annotation-{seq}",
    }


def expected_properties(check, seq):
    return {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": seq % 10,
        "correlation_id": f"corr-{check}-{seq}",
        "reply_to": "pika-amqp10-replies",
        "expiration": EXPIRATION,
        "message_id": f"msg-{check}-{seq}",
        "timestamp": 1_700_000_000 + seq,
        "type": "order.created",
        "user_id": USER,
        "app_id": "pika-amqp10-e2e",
    }


def properties(check, seq):
    return pika.BasicProperties(headers=expected_headers(check, seq), **expected_properties(check, seq))


def body(check, seq):
    return json.dumps({"check": check, "seq": seq}).encode()


def routing_key(check, seq):
    return f"{check}.{seq}"


def check_delivery(method, props, payload, dead_lettered=False):
    """Checks one delivery against what was published for it; returns (check, seq)."""
    doc = json.loads(payload)
    check, seq = doc["check"], doc["seq"]
    what = f"{check} message {seq}"
    expect_eq(method.routing_key, routing_key(check, seq), f"{what}: routing key (subject)")
    for name, want in expected_properties(check, seq).items():
        if dead_lettered and name == "expiration":
            # RabbitMQ removes the expiration of a dead-lettered message (so it cannot expire
            # again in the dead-letter queue): the AMQP 1.0 header comes without a ttl.
            want = None
        expect_eq(getattr(props, name), want, f"{what}: property {name}")
    # Dead-lettered ones too: RabbitMQ 3.10 adds x-death to its 0-9-1 headers only; over AMQP
    # 1.0 it sends the application-properties as they were published.
    headers = dict(props.headers or {})
    want = expected_headers(check, seq, received=True)
    if not same_typed(headers, want):
        diff = {k: (headers.get(k, "<missing>"), want.get(k, "<absent>"))
                for k in set(headers) | set(want) if not same_typed(headers.get(k), want.get(k))}
        raise CheckFailed(f"{what}: headers differ (got, expected): {diff!r}")
    return check, seq


class Run:
    def __init__(self, args):
        self.args = args
        self.params = pika.ConnectionParameters(
            host=args.host, port=args.port, heartbeat=30, blocked_connection_timeout=120,
            credentials=pika.PlainCredentials(USER, "guest"))
        self.conn = pika.BlockingConnection(self.params)
        self.publisher = self.conn.channel()
        self.publisher.confirm_delivery()

    def publish(self, check, seq):
        """Publishes with confirms: returns once Warren confirmed (RabbitMQ accepted it)."""
        self.publisher.basic_publish(self.args.exchange, routing_key(check, seq), body(check, seq),
                                     properties(check, seq), mandatory=True)

    def depth(self, queue):
        """Ready messages in a RabbitMQ queue, asked of RabbitMQ directly."""
        conn = pika.BlockingConnection(pika.URLParameters(self.args.rabbitmq_url))
        try:
            return conn.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            conn.close()

    def wait_empty(self, queue):
        deadline = time.monotonic() + 20
        while (n := self.depth(queue)) != 0:
            expect(time.monotonic() < deadline, f"RabbitMQ queue {queue} still holds {n} messages")
            self.conn.process_data_events(time_limit=0.1)

    def consume(self, queue, on_message, done, what, prefetch=50):
        """Consumes Warren's `queue` on a channel of its own until done() or the deadline; what()
        describes the progress for the failure message."""
        ch = self.conn.channel()
        ch.basic_qos(prefetch_count=prefetch)
        errors = []

        def handler(channel, method, props, payload):
            try:
                on_message(channel, method, props, payload)
            except Exception as exc:  # noqa: BLE001 - reported by the loop below
                errors.append(exc)

        tag = ch.basic_consume(queue, handler)
        deadline = time.monotonic() + RECEIVE_WAIT_SECS
        while not done() and not errors:
            expect(time.monotonic() < deadline, f"{what()}: timed out")
            self.conn.process_data_events(time_limit=0.1)
        if errors:
            raise errors[0]
        # Anything more arriving would be a duplicate or a stray: give it a moment to show.
        settle_until = time.monotonic() + 1.0
        while time.monotonic() < settle_until and not errors:
            self.conn.process_data_events(time_limit=0.1)
        if errors:
            raise errors[0]
        ch.basic_cancel(tag)
        ch.close()

    # ---------------------------------------------------------------- checks

    def check_properties(self):
        count = self.args.count
        started = time.monotonic()
        for seq in range(count):
            self.publish("properties", seq)
        publish_secs = time.monotonic() - started
        got = {}

        def on_message(ch, method, props, payload):
            check, seq = check_delivery(method, props, payload)
            expect_eq(check, "properties", "check of the delivery")
            expect(not method.redelivered, f"message {seq} redelivered on its first delivery")
            expect(seq not in got, f"message {seq} delivered twice")
            got[seq] = True
            ch.basic_ack(method.delivery_tag)

        self.consume(self.args.queue, on_message, lambda: len(got) == count,
                     lambda: f"properties: {len(got)} of {count} received")
        expect_eq(sorted(got), list(range(count)), "messages received")
        self.wait_empty(self.args.main_queue)
        print(f"     {count} published with confirms in {publish_secs:.1f}s, all received intact",
              flush=True)

    def check_requeue(self):
        count = 5
        for seq in range(count):
            self.publish("requeue", seq)
        deliveries = {}  # seq -> [redelivered flags]

        def on_message(ch, method, props, payload):
            check, seq = check_delivery(method, props, payload)
            expect_eq(check, "requeue", "check of the delivery")
            flags = deliveries.setdefault(seq, [])
            flags.append(method.redelivered)
            if seq == 0 and len(flags) == 1:
                expect(not method.redelivered, "the first delivery of message 0 is not redelivered")
                ch.basic_nack(method.delivery_tag, requeue=True)
                return
            ch.basic_ack(method.delivery_tag)

        self.consume(self.args.queue, on_message,
                     lambda: len(deliveries) == count and len(deliveries[0]) == 2,
                     lambda: f"requeue: deliveries {deliveries}")
        expect_eq(deliveries[0], [False, True], "message 0: redelivered flags (nacked, then back)")
        for seq in range(1, count):
            expect_eq(deliveries[seq], [False], f"message {seq}: deliveries")
        self.wait_empty(self.args.main_queue)

    def check_dead_letter(self):
        for seq in range(3):
            self.publish("dead_letter", seq)
        seen = {}

        def on_main(ch, method, props, payload):
            check, seq = check_delivery(method, props, payload)
            expect_eq(check, "dead_letter", "check of the delivery")
            expect(seq not in seen, f"message {seq} delivered twice")
            seen[seq] = True
            if seq == 0:
                ch.basic_reject(method.delivery_tag, requeue=False)
            else:
                ch.basic_ack(method.delivery_tag)

        self.consume(self.args.queue, on_main, lambda: len(seen) == 3, lambda: f"dead_letter: seen {seen}")
        self.wait_empty(self.args.main_queue)
        dead = []

        def on_dlq(ch, method, props, payload):
            dead.append(check_delivery(method, props, payload, dead_lettered=True))
            ch.basic_ack(method.delivery_tag)

        self.consume(self.args.dlq_queue, on_dlq, lambda: len(dead) >= 1,
                     lambda: "dead_letter: nothing arrived from the dead-letter queue")
        expect_eq(dead, [("dead_letter", 0)], "dead-lettered messages")
        self.wait_empty(self.args.dlq)

    def check_restart(self):
        consumer = ConsumerThread(self.params, self.args.queue, restart_delivery)
        consumer.start_and_wait(20)
        pub = publish_across_restart(lambda seq: self.publish("restart", seq), self.args.count,
                                     self.args.restart_cmd, restart_timeout=120)
        got = consumer.finish(pub.confirmed_seqs, RECEIVE_WAIT_SECS,
                              lambda: self.conn.process_data_events(time_limit=0.1))
        print(pub.summary(got, indent="     "), flush=True)
        got.expect_complete()
        expect_eq(pub.nacked, 0, "publishes nacked (the bridge retries forever)")
        expect(pub.during_restart > 0, "no publish happened while the broker restarted")


def restart_delivery(method, props, payload):
    """Checks a delivery of the restart check; returns its sequence number."""
    check, seq = check_delivery(method, props, payload)
    expect_eq(check, "restart", "check of the delivery")
    return seq


CHECKS = ["properties", "requeue", "dead_letter", "restart"]


def main():
    ap = warren_arguments(__doc__.splitlines()[0])
    ap.add_argument("--exchange", required=True)
    ap.add_argument("--queue", required=True, help="Warren's queue fed from /amq/queue/MAIN")
    ap.add_argument("--dlq-queue", help="Warren's queue fed from /amq/queue/DLQ")
    ap.add_argument("--rabbitmq-url", required=True)
    ap.add_argument("--main-queue", required=True, help="the RabbitMQ queue MAIN")
    ap.add_argument("--dlq", help="the RabbitMQ queue DLQ")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--restart-cmd")
    ap.add_argument("--checks", default=",".join(CHECKS))
    args = ap.parse_args()
    checks = [c for c in args.checks.split(",") if c]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        ap.error(f"unknown checks {unknown}; known: {CHECKS}")
    if "dead_letter" in checks and not (args.dlq_queue and args.dlq):
        ap.error("dead_letter needs --dlq-queue and --dlq")
    if "restart" in checks and not args.restart_cmd:
        ap.error("restart needs --restart-cmd")

    banner = f"pika {pika.__version__}, Warren {args.host}:{args.port}, checks {checks}"
    return run_checks(checks, lambda: Run(args), banner=banner, passed="pika AMQP 1.0",
                      timeout_secs=OVERALL_TIMEOUT_SECS, finish=lambda run: run.conn.close())


if __name__ == "__main__":
    sys.exit(main())
