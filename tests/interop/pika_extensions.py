#!/usr/bin/env python3
"""RabbitMQ extension checks for Warren with Python's pika (BlockingConnection).

Run by tests/tests/pika_extensions.rs against an in-process server:

    python tests/interop/pika_extensions.py --port N [--host 127.0.0.1]

Covers dead-lettering with the x-death header, message TTL, queue length limits and priority
queues, asserting the values and Python types pika decodes from what RabbitMQ 3.x sends. Prints
one line per check and exits non-zero with a clear message on the first failure.
"""

import datetime
import sys
import time

from interop_checks import CheckFailed, expect, expect_eq, require, run_checks, warren_arguments

require("pika", "pika.exceptions", hint="create target/pyenv with pika==1.3.2")
import pika  # noqa: E402 - after the guard
import pika.exceptions  # noqa: E402

# The whole script takes a few seconds; a hang is a failure, not a stuck CI job.
OVERALL_TIMEOUT_SECS = 120


class Extensions:
    def __init__(self, host, port):
        self.params = pika.ConnectionParameters(
            host=host,
            port=port,
            virtual_host="/",
            credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1,
            socket_timeout=5,
            blocked_connection_timeout=30,
        )
        self.conn = None
        self.ch = None

    # ---------------------------------------------------------------- helpers

    def count(self, queue):
        return self.ch.queue_declare(queue, passive=True).method.message_count

    def get(self, queue):
        """basic.get with auto-ack: (properties, body as str) or None."""
        method, props, body = self.ch.basic_get(queue, auto_ack=True)
        if method is None:
            return None
        return props, body.decode()

    def drain(self, queue):
        out = []
        while True:
            got = self.get(queue)
            if got is None:
                return out
            out.append(got[1])

    def sink(self, name):
        """A fanout exchange `name` with one queue `name.q` bound to it."""
        self.ch.exchange_declare(name, exchange_type="fanout")
        q = f"{name}.q"
        self.ch.queue_declare(q)
        self.ch.queue_bind(q, name)
        return q

    def check_death(self, entry, count, reason, queue, exchange, routing_keys):
        expect(isinstance(entry, dict), f"x-death entry should be a table, got {entry!r}")
        expect_eq(entry.get("count"), count, "x-death count")
        expect(isinstance(entry.get("count"), int), "x-death count should be an integer")
        expect_eq(entry.get("reason"), reason, "x-death reason")
        expect_eq(entry.get("queue"), queue, "x-death queue")
        expect_eq(entry.get("exchange"), exchange, "x-death exchange")
        expect_eq(entry.get("routing-keys"), routing_keys, "x-death routing-keys")
        when = entry.get("time")
        expect(isinstance(when, datetime.datetime), f"x-death time should be a timestamp, got {when!r}")
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        expect(abs((now - when).total_seconds()) < 60, f"x-death time {when} should be about now ({now})")

    # ---------------------------------------------------------------- checks

    def check_connect(self):
        self.conn = pika.BlockingConnection(self.params)
        self.ch = self.conn.channel()
        expect(self.ch.is_open, "channel should be open")

    def check_dead_letter_x_death(self):
        ch = self.ch
        ch.exchange_declare("pk.work-x", exchange_type="direct")
        dead = self.sink("pk.dlx")
        ch.queue_declare(
            "pk.work",
            arguments={"x-dead-letter-exchange": "pk.dlx", "x-dead-letter-routing-key": "dead"},
        )
        ch.queue_bind("pk.work", "pk.work-x", routing_key="job")
        ch.basic_publish(
            "pk.work-x",
            "job",
            b"payload",
            pika.BasicProperties(headers={"app": "kept"}, message_id="m-1"),
        )
        method, _props, _body = ch.basic_get("pk.work", auto_ack=False)
        expect(method is not None, "the job should be in pk.work")
        ch.basic_reject(method.delivery_tag, requeue=False)

        method, props, body = ch.basic_get(dead, auto_ack=True)
        expect(method is not None, "the rejected job should be dead-lettered")
        expect_eq(body, b"payload", "dead-lettered body")
        expect_eq(method.exchange, "pk.dlx", "dead letter's exchange")
        expect_eq(method.routing_key, "dead", "x-dead-letter-routing-key replaces the key")
        expect_eq(props.message_id, "m-1", "properties are kept")
        headers = props.headers or {}
        expect_eq(headers.get("app"), "kept", "headers are kept")
        deaths = headers.get("x-death")
        expect(isinstance(deaths, list), f"x-death should be an array, got {deaths!r}")
        expect_eq(len(deaths), 1, "x-death entries")
        self.check_death(deaths[0], 1, "rejected", "pk.work", "pk.work-x", ["job"])
        expect_eq(headers.get("x-first-death-reason"), "rejected", "x-first-death-reason")
        expect_eq(headers.get("x-first-death-queue"), "pk.work", "x-first-death-queue")
        expect_eq(headers.get("x-first-death-exchange"), "pk.work-x", "x-first-death-exchange")

        # basic.nack with requeue=false dead-letters too.
        ch.basic_publish("pk.work-x", "job", b"nacked")
        method, _props, _body = ch.basic_get("pk.work", auto_ack=False)
        ch.basic_nack(method.delivery_tag, multiple=False, requeue=False)
        got = self.get(dead)
        expect(got is not None, "the nacked job should be dead-lettered")
        expect_eq(got[1], "nacked", "nacked body")
        expect_eq(got[0].headers["x-death"][0]["reason"], "rejected", "reason of a nack")

    def check_retry_counts(self):
        """work -> (reject) -> delay queue with a TTL -> back to work; counts add up."""
        ch = self.ch
        ch.exchange_declare("pk.retry-work", exchange_type="direct")
        ch.exchange_declare("pk.retry-dlx", exchange_type="fanout")
        ch.queue_declare("pk.retry.work", arguments={"x-dead-letter-exchange": "pk.retry-dlx"})
        ch.queue_bind("pk.retry.work", "pk.retry-work", routing_key="job")
        ch.queue_declare(
            "pk.retry.delay",
            arguments={"x-message-ttl": 150, "x-dead-letter-exchange": "pk.retry-work"},
        )
        ch.queue_bind("pk.retry.delay", "pk.retry-dlx")
        ch.basic_publish("pk.retry-work", "job", b"task")
        props = None
        for round_ in (1, 2):
            method = None
            deadline = time.monotonic() + 5
            while method is None:
                expect(time.monotonic() < deadline, f"round {round_}: the job never came back")
                method, props, _body = ch.basic_get("pk.retry.work", auto_ack=False)
                if method is None:
                    time.sleep(0.05)
            ch.basic_reject(method.delivery_tag, requeue=False)
        deadline = time.monotonic() + 5
        while True:
            method, props, _body = ch.basic_get("pk.retry.work", auto_ack=True)
            if method is not None:
                break
            expect(time.monotonic() < deadline, "round 3: the job never came back")
            time.sleep(0.05)
        deaths = props.headers["x-death"]
        expect_eq(len(deaths), 2, f"x-death entries merge by queue and reason: {deaths!r}")
        self.check_death(deaths[0], 2, "expired", "pk.retry.delay", "pk.retry-dlx", ["job"])
        self.check_death(deaths[1], 2, "rejected", "pk.retry.work", "pk.retry-work", ["job"])
        expect_eq(props.headers.get("x-first-death-reason"), "rejected", "x-first-death-reason")

    def check_message_ttl(self):
        ch = self.ch
        ch.queue_declare("pk.ttl", arguments={"x-message-ttl": 150})
        for i in range(3):
            ch.basic_publish("", "pk.ttl", f"m{i}".encode())
        expect_eq(self.count("pk.ttl"), 3, "messages before the TTL")
        time.sleep(0.45)
        expect_eq(self.count("pk.ttl"), 0, "messages after the TTL")
        expect(self.get("pk.ttl") is None, "an expired message must not be delivered")

        # Per-message expiration, shorter than a longer-lived head.
        ch.queue_declare("pk.exp")
        ch.basic_publish("", "pk.exp", b"head", pika.BasicProperties(expiration="60000"))
        ch.basic_publish("", "pk.exp", b"short", pika.BasicProperties(expiration="100"))
        time.sleep(0.4)
        expect_eq(self.count("pk.exp"), 1, "the short-lived message expired behind the head")
        expect_eq(self.drain("pk.exp"), ["head"], "what is left")

    def check_ttl_dead_letter(self):
        ch = self.ch
        dead = self.sink("pk.ttl-dlx")
        ch.queue_declare(
            "pk.ttl.work",
            arguments={"x-message-ttl": 100, "x-dead-letter-exchange": "pk.ttl-dlx"},
        )
        ch.basic_publish("", "pk.ttl.work", b"late", pika.BasicProperties(expiration="50"))
        deadline = time.monotonic() + 5
        got = None
        while got is None:
            expect(time.monotonic() < deadline, "the expired message was not dead-lettered")
            got = self.get(dead)
            if got is None:
                time.sleep(0.05)
        props, body = got
        expect_eq(body, "late", "dead-lettered body")
        expect_eq(props.expiration, None, "expiration is removed from the dead letter")
        entry = props.headers["x-death"][0]
        self.check_death(entry, 1, "expired", "pk.ttl.work", "", ["pk.ttl.work"])
        expect_eq(entry.get("original-expiration"), "50", "original-expiration")

    def check_invalid_expiration(self):
        ch = self.conn.channel()
        ch.queue_declare("pk.bad-exp")
        try:
            ch.basic_publish("", "pk.bad-exp", b"x", pika.BasicProperties(expiration="abc"))
            ch.queue_declare("pk.bad-exp", passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            expect_eq(exc.reply_code, 406, "reply code for expiration 'abc'")
        else:
            raise CheckFailed("an invalid expiration should close the channel with 406")

    def check_max_length(self):
        ch = self.ch
        dead = self.sink("pk.len-dlx")
        ch.queue_declare(
            "pk.len",
            arguments={"x-max-length": 2, "x-dead-letter-exchange": "pk.len-dlx"},
        )
        for i in range(4):
            ch.basic_publish("", "pk.len", f"m{i}".encode())
        expect_eq(self.count("pk.len"), 2, "x-max-length keeps 2")
        expect_eq(self.drain("pk.len"), ["m2", "m3"], "drop-head keeps the newest")
        dropped = []
        for _ in range(2):
            props, body = self.get(dead)
            dropped.append(body)
            self.check_death(props.headers["x-death"][0], 1, "maxlen", "pk.len", "", ["pk.len"])
        expect_eq(dropped, ["m0", "m1"], "dropped heads are dead-lettered oldest first")

        ch.queue_declare("pk.bytes", arguments={"x-max-length-bytes": 10})
        for b in ("aaaa", "bbbb", "cccc"):
            ch.basic_publish("", "pk.bytes", b.encode())
        expect_eq(self.drain("pk.bytes"), ["bbbb", "cccc"], "x-max-length-bytes counts bodies")

    def check_reject_publish(self):
        ch = self.conn.channel()
        ch.confirm_delivery()
        ch.queue_declare("pk.rp", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        ch.basic_publish("", "pk.rp", b"first")
        try:
            ch.basic_publish("", "pk.rp", b"second")
        except pika.exceptions.NackError:
            pass
        else:
            raise CheckFailed("a publish refused by reject-publish should be nacked")
        expect(ch.is_open, "a nack does not close the channel")
        expect_eq(self.drain("pk.rp"), ["first"], "the queue keeps the first message")
        ch.basic_publish("", "pk.rp", b"room again")
        expect_eq(self.drain("pk.rp"), ["room again"], "accepted once there is room")
        ch.close()

    def check_priorities(self):
        ch = self.ch
        ch.queue_declare("pk.prio", arguments={"x-max-priority": 10})
        for body, prio in [("none", None), ("p5", 5), ("p1", 1), ("p9", 9), ("p5-b", 5), ("p20", 20)]:
            ch.basic_publish("", "pk.prio", body.encode(), pika.BasicProperties(priority=prio))
        expect_eq(
            self.drain("pk.prio"),
            ["p20", "p9", "p5", "p5-b", "p1", "none"],
            "by priority (above the maximum counts as 10), then FIFO",
        )

        # A consumer sees the same order.
        for body, prio in [("low", 1), ("high", 8), ("mid", 4)]:
            ch.basic_publish("", "pk.prio", body.encode(), pika.BasicProperties(priority=prio))
        got = []
        for method, _props, body in ch.consume("pk.prio", auto_ack=True, inactivity_timeout=5):
            expect(method is not None, f"timed out waiting for priority deliveries, got {got}")
            got.append(body.decode())
            if len(got) == 3:
                break
        ch.cancel()
        expect_eq(got, ["high", "mid", "low"], "consumer order")

    def check_close(self):
        self.conn.close()
        expect(self.conn.is_closed, "connection should be closed")


CHECKS = [
    "connect",
    "dead_letter_x_death",
    "retry_counts",
    "message_ttl",
    "ttl_dead_letter",
    "invalid_expiration",
    "max_length",
    "reject_publish",
    "priorities",
    "close",
]


def main():
    parser = warren_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()

    banner = f"pika {pika.__version__}, Python {sys.version.split()[0]}, broker {args.host}:{args.port}"
    run = Extensions(args.host, args.port)
    return run_checks(CHECKS, lambda: run, banner=banner, passed="pika extension",
                      timeout_secs=OVERALL_TIMEOUT_SECS)


if __name__ == "__main__":
    sys.exit(main())
