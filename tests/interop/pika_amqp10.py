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

import argparse
import datetime
import decimal
import json
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback

try:
    import pika
    import pika.exceptions
except ImportError as exc:  # pragma: no cover - environment problem, not a Warren bug
    print(f"FAIL: cannot import pika ({exc}); run scripts/test.sh to create target/pyenv", flush=True)
    sys.exit(2)

OVERALL_TIMEOUT_SECS = 150
# How long messages may take to come back once published.
RECEIVE_WAIT_SECS = 60.0
# The user Warren logs pika in as: user-id must equal it (Warren and RabbitMQ both check).
USER = "guest"
# Long enough never to expire in the queue during a run.
EXPIRATION = "3600000"


class CheckFailed(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise CheckFailed(what)


def expect_eq(actual, expected, what):
    if actual != expected:
        raise CheckFailed(f"{what}: expected {expected!r}, got {actual!r}")


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
        consumer = RestartConsumer(self.params, self.args.queue)
        consumer.start()
        expect(consumer.ready.wait(20), "the consumer did not start within 20 s")
        count = self.args.count
        sent = confirmed = nacked = during_restart = 0
        confirmed_seqs = set()
        restart = None
        slowest_confirm = 0.0
        seq = 0
        # Publish --count messages, restarting the broker halfway; keep publishing until the
        # restart is over, so some publishes certainly meet a broker that is down.
        while seq < count or (restart is not None and restart.poll() is None):
            if seq == count // 2 and restart is None:
                restart = subprocess.Popen(shlex.split(self.args.restart_cmd),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if restart is not None and restart.poll() is None:
                during_restart += 1
            sent += 1
            t0 = time.monotonic()
            try:
                self.publish("restart", seq)
                slowest_confirm = max(slowest_confirm, time.monotonic() - t0)
                confirmed += 1
                confirmed_seqs.add(seq)
            except pika.exceptions.NackError:
                nacked += 1
            seq += 1
        _, err = restart.communicate(timeout=120)
        expect(restart.returncode == 0,
               f"{self.args.restart_cmd} failed ({restart.returncode}): {err.decode()}")

        deadline = time.monotonic() + RECEIVE_WAIT_SECS
        while True:
            received, errors = consumer.snapshot()
            missing = sorted(confirmed_seqs - received.keys())
            if errors or not missing or time.monotonic() > deadline:
                break
            self.conn.process_data_events(time_limit=0.1)
        consumer.stop.set()
        consumer.join(10)
        received, errors = consumer.snapshot()
        missing = sorted(confirmed_seqs - received.keys())
        duplicates = sum(n - 1 for n in received.values())
        print(f"     sent={sent} confirmed={confirmed} nacked={nacked} received={len(received)} "
              f"duplicates={duplicates} redelivered={consumer.redelivered} "
              f"published_during_restart={during_restart} "
              f"slowest_confirm_ms={slowest_confirm * 1000:.0f}", flush=True)
        if errors:
            raise CheckFailed(f"{len(errors)} bad deliveries, first: {errors[0]}")
        expect(not missing, f"{len(missing)} confirmed messages never received, e.g. {missing[:10]}")
        expect_eq(nacked, 0, "publishes nacked (the bridge retries forever)")
        expect(during_restart > 0, "no publish happened while the broker restarted")


class RestartConsumer(threading.Thread):
    """Consumes Warren's queue on its own connection, acking each message after checking it."""

    def __init__(self, params, queue):
        super().__init__(daemon=True)
        self.params = params
        self.queue = queue
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.received = {}  # seq -> deliveries
        self.errors = []
        self.redelivered = 0

    def on_message(self, channel, method, props, payload):
        try:
            check, seq = check_delivery(method, props, payload)
            expect_eq(check, "restart", "check of the delivery")
            with self.lock:
                self.received[seq] = self.received.get(seq, 0) + 1
                if method.redelivered:
                    self.redelivered += 1
        except Exception as exc:  # noqa: BLE001 - recorded, the main thread fails the run
            with self.lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
        channel.basic_ack(method.delivery_tag)

    def run(self):
        try:
            conn = pika.BlockingConnection(self.params)
            ch = conn.channel()
            ch.basic_qos(prefetch_count=50)
            ch.basic_consume(self.queue, self.on_message, auto_ack=False)
            self.ready.set()
            while not self.stop.is_set():
                conn.process_data_events(time_limit=0.1)
            conn.close()
        except Exception as exc:  # noqa: BLE001 - recorded, the main thread fails the run
            with self.lock:
                self.errors.append(f"consumer: {type(exc).__name__}: {exc}")
            self.ready.set()

    def snapshot(self):
        with self.lock:
            return dict(self.received), list(self.errors)


CHECKS = ["properties", "requeue", "dead_letter", "restart"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
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

    def on_alarm(_signum, _frame):
        raise CheckFailed(f"the run took longer than {OVERALL_TIMEOUT_SECS}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(OVERALL_TIMEOUT_SECS)
    print(f"pika {pika.__version__}, Warren {args.host}:{args.port}, checks {checks}", flush=True)
    run = None
    for name in checks:
        started = time.monotonic()
        try:
            if run is None:
                run = Run(args)
            getattr(run, f"check_{name}")()
        except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
            traceback.print_exc()
            detail = str(exc) if isinstance(exc, CheckFailed) else f"unexpected {exc!r}"
            print(f"FAIL {name}: {detail}", flush=True)
            return 1
        print(f"ok   {name} ({time.monotonic() - started:.2f}s)", flush=True)
    run.conn.close()
    print(f"all {len(checks)} pika AMQP 1.0 checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
