#!/usr/bin/env python3
"""pika through one of Warren's bridges (MQTT or Redis Streams), across a restart of the broker.

Run by tests/tests/pika_bridges.rs against an in-process Warren whose configuration routes
exchange EXCHANGE to the bridge and feeds queue QUEUE from the same place (a topic root or a
stream key), so every message goes pika -> Warren -> broker -> Warren -> pika:

    python tests/interop/pika_bridges.py --port N --exchange E --queue Q \
        --restart-cmd "scripts/mosquitto.sh restart" [--typed-headers]

A publisher (BlockingConnection, publisher confirms) sends --count messages, each with
properties and headers; a consumer on its own connection (in a thread, manual acks) receives
them. Once half are published the broker is restarted (--restart-cmd, in the background) while
publishing goes on. At the end every confirmed message must have been received, with its
properties and headers intact; duplicates (at-least-once) are counted, not failed. Prints one
summary line: sent, confirmed, nacked, received, duplicates, publishes started while the
restart command ran, and the slowest confirm (the one that waited for the broker to return).
"""

import json
import sys
import time

from interop_checks import CheckFailed, ConsumerThread, publish_across_restart, require, warren_arguments

require("pika", "pika.exceptions")
import pika  # noqa: E402 - after the guard
import pika.exceptions  # noqa: E402

# How long, after the last confirm, every confirmed message may take to come back.
RECEIVE_WAIT_SECS = 60.0


def text(value):
    """A header value as text: bridges without typed headers give strings (or bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def expected_properties(seq):
    return {
        "content_type": "application/json",
        "correlation_id": f"corr-{seq}",
        "reply_to": "pika-replies",
        "message_id": f"msg-{seq}",
        "delivery_mode": 2,
    }


def expected_headers(seq):
    return {"seq": seq, "tenant": "acme", "note": "héllo wörld"}


def check_delivery(props, body, typed_headers):
    """Checks one delivery against what was published for it; returns its sequence number."""
    doc = json.loads(body)
    seq = doc["seq"]
    for name, want in expected_properties(seq).items():
        got = getattr(props, name)
        if got != want:
            raise CheckFailed(f"message {seq}: {name} {got!r}, expected {want!r}")
    headers = props.headers or {}
    for name, want in expected_headers(seq).items():
        if name not in headers:
            raise CheckFailed(f"message {seq}: header {name} missing (headers: {headers!r})")
        got = headers[name]
        if typed_headers:
            if got != want or type(got) is not type(want):
                raise CheckFailed(f"message {seq}: header {name} {got!r}, expected {want!r}")
        elif text(got) != str(want):
            raise CheckFailed(f"message {seq}: header {name} {got!r}, expected {str(want)!r}")
    return seq


def main():
    ap = warren_arguments()
    ap.add_argument("--exchange", required=True)
    ap.add_argument("--queue", required=True)
    ap.add_argument("--routing-key", default="pika.e2e")
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--restart-cmd", required=True)
    ap.add_argument("--typed-headers", action="store_true",
                    help="headers must keep their AMQP types (else compared as text)")
    args = ap.parse_args()

    params = pika.ConnectionParameters(
        host=args.host, port=args.port, heartbeat=30, blocked_connection_timeout=120,
        credentials=pika.PlainCredentials("guest", "guest"))

    consumer = ConsumerThread(params, args.queue,
                              lambda _method, props, body: check_delivery(props, body, args.typed_headers))
    consumer.start_and_wait(20)

    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()

    def publish(seq):
        props = pika.BasicProperties(headers=expected_headers(seq), **expected_properties(seq))
        body = json.dumps({"seq": seq}).encode()
        try:
            ch.basic_publish(args.exchange, args.routing_key, body, props)
        except pika.exceptions.UnroutableError:
            raise CheckFailed(f"message {seq} was returned unroutable")

    pub = publish_across_restart(publish, args.count, args.restart_cmd, restart_timeout=60)
    conn.close()

    got = consumer.finish(pub.confirmed_seqs, RECEIVE_WAIT_SECS, lambda: time.sleep(0.1))
    print(pub.summary(got, publish_secs=True), flush=True)
    got.expect_complete()
    if pub.nacked:
        raise CheckFailed(f"{pub.nacked} publishes nacked (the bridge retries forever: none expected)")
    if pub.during_restart == 0:
        raise CheckFailed("no publish happened while the broker restarted")
    print("OK: every confirmed message received with its properties and headers", flush=True)


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as exc:
        print(f"FAIL: {exc}", flush=True)
        sys.exit(1)
