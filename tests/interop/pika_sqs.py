#!/usr/bin/env python3
"""pika through Warren to SQS and back (deploy/examples/sqs.yaml against moto).

Run by tests/tests/sqs.rs against an in-process Warren whose backend `queues` points at the
moto server in $WARREN_TEST_SQS_URL:

    python tests/interop/pika_sqs.py --port N [--host 127.0.0.1]

Checks, with boto3 (installed with moto in the same virtualenv) looking at SQS itself:
- publish with confirms and headers to exchange `demo`: every confirmed message is in the SQS
  queue `demo` with its headers as message attributes;
- the moto server is killed (SIGKILL) and restarted while pika keeps publishing with confirms
  (scripts/moto.sh kill-restart, which replays moto's request recording): every confirmed
  message is there afterwards;
- consume Warren's queue `demo-in` (fed from the SQS queue `demo-in`): headers intact, a
  requeued message comes back redelivered, acks delete the messages from SQS.

Prints one line per check; exits non-zero with a clear message on the first failure.
"""

import os
import subprocess
import sys
import time

from interop_checks import CheckFailed, expect, expect_eq, require, run_checks, warren_arguments

require("boto3", "pika", "pika.exceptions", label="pika/boto3",
        hint="run scripts/test.sh (pika) and scripts/moto.sh start (moto, boto3)")
import boto3  # noqa: E402 - after the guard
import pika  # noqa: E402
import pika.exceptions  # noqa: E402

OVERALL_TIMEOUT_SECS = 150
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def moto(arg):
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts/moto.sh"), arg], capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckFailed(f"scripts/moto.sh {arg} failed: {out.stdout} {out.stderr}")


class Run:
    def __init__(self, host, port, sqs_url):
        self.params = pika.ConnectionParameters(
            host=host,
            port=port,
            credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1,
            socket_timeout=5,
            heartbeat=60,
        )
        self.sqs = boto3.client(
            "sqs",
            endpoint_url=sqs_url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        self.demo = self.sqs.get_queue_url(QueueName="demo")["QueueUrl"]
        self.demo_in = self.sqs.get_queue_url(QueueName="demo-in")["QueueUrl"]
        self.conn = pika.BlockingConnection(self.params)
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.published = []

    def publish(self, i):
        body = f"p{i}"
        props = pika.BasicProperties(
            content_type="text/plain",
            correlation_id=f"c{i}",
            delivery_mode=2,
            headers={"tenant": "acme", "n": i},
        )
        # With confirms on, basic_publish returns once Warren acked (SQS stored it) and raises
        # on a nack.
        self.ch.basic_publish("demo", f"orders.{i}", body.encode(), props)
        self.published.append(body)

    def drain(self, url):
        out = []
        while True:
            got = self.sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=300,
                WaitTimeSeconds=0,
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            if not got:
                return out
            out.extend(got)

    def counts(self, url):
        a = self.sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])

    # ---------------------------------------------------------------- checks

    def check_publish_with_confirms(self):
        for i in range(20):
            self.publish(i)
        stored = self.drain(self.demo)
        expect_eq(sorted(m["Body"] for m in stored), sorted(self.published), "bodies in SQS")
        first = next(m for m in stored if m["Body"] == "p0")
        attrs = first["MessageAttributes"]
        expect_eq(attrs["tenant"]["StringValue"], "acme", "header tenant as an attribute")
        expect_eq(attrs["n"]["StringValue"], "0", "header n as an attribute")
        expect("warren.amqp" in attrs, "warren.amqp attribute present")
        self.stored = stored

    def check_server_killed_and_restarted_under_confirms(self):
        self.published = []
        moto("record")
        # Recorded from here: creating the (existing) queues again makes the replay recreate them.
        for name in ("demo", "demo-in"):
            self.sqs.create_queue(QueueName=name)
        for i in range(100, 130):
            self.publish(i)
        restart = subprocess.Popen(["bash", os.path.join(ROOT, "scripts/moto.sh"), "kill-restart"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        i = 130
        while restart.poll() is None and i < 400:
            self.publish(i)
            i += 1
        _, err = restart.communicate(timeout=120)
        expect_eq(restart.returncode, 0, f"kill-restart ({err!r})")
        during = i - 130
        expect(during >= 1, "no publish was confirmed while the server restarted")
        for j in range(i, i + 30):
            self.publish(j)
        moto("record-stop")
        stored = {m["Body"] for m in self.drain(self.demo)}
        missing = [b for b in self.published if b not in stored]
        expect_eq(missing, [], "confirmed but missing after the restart")
        print(f"     {len(self.published)} published and confirmed across the restart ({during} while it restarted), {len(stored)} distinct in SQS", flush=True)

    def check_consume_with_requeue(self):
        # What Warren wrote to `demo` goes into `demo-in` as it was (body and attributes).
        for m in self.stored:
            self.sqs.send_message(QueueUrl=self.demo_in, MessageBody=m["Body"],
                                  MessageAttributes=m["MessageAttributes"])
        self.ch.basic_qos(prefetch_count=5)
        got = {}
        requeued = []

        def on_message(ch, method, props, body):
            body = body.decode()
            if not requeued:
                expect(not method.redelivered, "first delivery not redelivered")
                requeued.append(body)
                ch.basic_nack(method.delivery_tag, requeue=True)
                return
            if body == requeued[0]:
                expect(method.redelivered, "a requeued message comes back redelivered")
            i = int(body[1:])
            expect_eq(method.routing_key, f"orders.{i}", "routing key")
            expect_eq(props.correlation_id, f"c{i}", "correlation-id")
            expect_eq(props.headers, {"tenant": "acme", "n": i}, "headers")
            got[body] = True
            ch.basic_ack(method.delivery_tag)

        self.ch.basic_consume("demo-in", on_message)
        deadline = time.monotonic() + 60
        while len(got) < 20:
            expect(time.monotonic() < deadline, f"only {len(got)} of 20 messages consumed")
            self.conn.process_data_events(time_limit=0.1)
        expect(requeued[0] in got, "the requeued message came back")
        deadline = time.monotonic() + 30
        while self.counts(self.demo_in) != (0, 0):
            expect(time.monotonic() < deadline, f"demo-in still holds {self.counts(self.demo_in)}")
            self.conn.process_data_events(time_limit=0.1)
        self.conn.close()


CHECKS = ["publish_with_confirms", "server_killed_and_restarted_under_confirms", "consume_with_requeue"]


def main():
    parser = warren_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()
    sqs_url = os.environ.get("WARREN_TEST_SQS_URL")
    if not sqs_url:
        print("FAIL: WARREN_TEST_SQS_URL is not set (scripts/moto.sh start)", flush=True)
        return 2

    banner = f"pika {pika.__version__}, boto3 {boto3.__version__}, broker {args.host}:{args.port}, SQS {sqs_url}"
    return run_checks(CHECKS, lambda: Run(args.host, args.port, sqs_url), banner=banner,
                      passed="pika SQS", timeout_secs=OVERALL_TIMEOUT_SECS)


if __name__ == "__main__":
    sys.exit(main())
