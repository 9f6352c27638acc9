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

import argparse
import json
import shlex
import subprocess
import sys
import threading
import time

try:
    import pika
    import pika.exceptions
except ImportError as exc:  # pragma: no cover - environment problem, not a Warren bug
    print(f"FAIL: cannot import pika ({exc}); run scripts/test.sh to create target/pyenv", flush=True)
    sys.exit(2)

# How long, after the last confirm, every confirmed message may take to come back.
RECEIVE_WAIT_SECS = 60.0


class CheckFailed(Exception):
    pass


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


class Consumer(threading.Thread):
    """Consumes the queue on its own connection, acking each message after checking it."""

    def __init__(self, params, queue, typed_headers):
        super().__init__(daemon=True)
        self.params = params
        self.queue = queue
        self.typed_headers = typed_headers
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.received = {}  # seq -> deliveries
        self.errors = []
        self.redelivered = 0

    def check(self, props, body):
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
            if self.typed_headers:
                if got != want or type(got) is not type(want):
                    raise CheckFailed(f"message {seq}: header {name} {got!r}, expected {want!r}")
            elif text(got) != str(want):
                raise CheckFailed(f"message {seq}: header {name} {got!r}, expected {str(want)!r}")
        return seq

    def on_message(self, channel, method, props, body):
        try:
            seq = self.check(props, body)
            with self.lock:
                self.received[seq] = self.received.get(seq, 0) + 1
                if method.redelivered:
                    self.redelivered += 1
        except Exception as exc:  # recorded, the main thread fails the run
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
        except Exception as exc:
            with self.lock:
                self.errors.append(f"consumer: {type(exc).__name__}: {exc}")
            self.ready.set()

    def snapshot(self):
        with self.lock:
            return dict(self.received), list(self.errors)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
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

    consumer = Consumer(params, args.queue, args.typed_headers)
    consumer.start()
    if not consumer.ready.wait(20):
        raise CheckFailed("the consumer did not start within 20 s")

    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()

    sent = confirmed = nacked = 0
    confirmed_seqs = set()
    restart = None
    during_restart = 0
    slowest_confirm = 0.0
    seq = 0
    started = time.monotonic()
    # Publish --count messages, restarting the broker halfway; keep publishing until the
    # restart is over, so some publishes certainly meet a broker that is down.
    while seq < args.count or (restart is not None and restart.poll() is None):
        if seq == args.count // 2 and restart is None:
            restart = subprocess.Popen(shlex.split(args.restart_cmd), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
        if restart is not None and restart.poll() is None:
            during_restart += 1
        props = pika.BasicProperties(headers=expected_headers(seq), **expected_properties(seq))
        body = json.dumps({"seq": seq}).encode()
        sent += 1
        t0 = time.monotonic()
        try:
            ch.basic_publish(args.exchange, args.routing_key, body, props)
            slowest_confirm = max(slowest_confirm, time.monotonic() - t0)
            confirmed += 1
            confirmed_seqs.add(seq)
        except pika.exceptions.NackError:
            nacked += 1
        except pika.exceptions.UnroutableError:
            raise CheckFailed(f"message {seq} was returned unroutable")
        seq += 1
    publish_secs = time.monotonic() - started
    out, err = restart.communicate(timeout=60)
    if restart.returncode != 0:
        raise CheckFailed(f"{args.restart_cmd} failed ({restart.returncode}): {err.decode()}")
    conn.close()

    deadline = time.monotonic() + RECEIVE_WAIT_SECS
    while True:
        received, errors = consumer.snapshot()
        if errors:
            break
        missing = sorted(confirmed_seqs - received.keys())
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    consumer.stop.set()
    consumer.join(10)
    received, errors = consumer.snapshot()
    missing = sorted(confirmed_seqs - received.keys())
    duplicates = sum(n - 1 for n in received.values())
    print(f"sent={sent} confirmed={confirmed} nacked={nacked} received={len(received)} "
          f"duplicates={duplicates} redelivered={consumer.redelivered} "
          f"published_during_restart={during_restart} publish_secs={publish_secs:.1f} "
          f"slowest_confirm_ms={slowest_confirm * 1000:.0f}",
          flush=True)
    if errors:
        raise CheckFailed(f"{len(errors)} bad deliveries, first: {errors[0]}")
    if missing:
        raise CheckFailed(f"{len(missing)} confirmed messages never received, e.g. {missing[:10]}")
    if nacked:
        raise CheckFailed(f"{nacked} publishes nacked (the bridge retries forever: none expected)")
    if during_restart == 0:
        raise CheckFailed("no publish happened while the broker restarted")
    print("OK: every confirmed message received with its properties and headers", flush=True)


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as exc:
        print(f"FAIL: {exc}", flush=True)
        sys.exit(1)
