"""What the pika interop scripts in this folder share: failures, the checks runner, the pika
import guard, and the consumer thread and publishing-across-a-broker-restart loop of the bridge
scripts.

The scripts run as `python tests/interop/<script>.py` (tests/src/lib.rs passes the script's
absolute path), so this folder is on sys.path and `import interop_checks` finds this file.
Only the standard library is imported here: the scripts call `require` before importing pika.
"""

import argparse
import importlib
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback

PIKA_HINT = "run scripts/test.sh to create target/pyenv"


class CheckFailed(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise CheckFailed(what)


def expect_eq(actual, expected, what):
    if actual != expected:
        raise CheckFailed(f"{what}: expected {expected!r}, got {actual!r}")


def require(*modules, label="pika", hint=PIKA_HINT):
    """Imports `modules`, or prints why not (an environment problem, not a Warren bug) and exits
    with status 2. The script then imports them as usual."""
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - environment problem, not a Warren bug
        print(f"FAIL: cannot import {label} ({exc}); {hint}", flush=True)
        sys.exit(2)


def warren_arguments(description=None):
    """An argument parser with the --host and --port of Warren, which tests/src/lib.rs passes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser


def run_checks(checks, make_run, *, banner, passed, timeout_secs, timeout_what="the run",
               finish=None):
    """Runs `check_<name>` of the object make_run() returns (made once, when the first check
    starts) for every name in `checks`, all within `timeout_secs` (SIGALRM). Prints `banner`, a
    line per check and `all N <passed> checks passed`; on the first failure prints its traceback
    and `FAIL <name>: ...` and returns 1. `finish(run)` is called after the last check. Returns
    the exit status."""

    def on_alarm(_signum, _frame):
        raise CheckFailed(f"{timeout_what} took longer than {timeout_secs}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout_secs)
    print(banner, flush=True)
    run = None
    for name in checks:
        started = time.monotonic()
        try:
            if run is None:
                run = make_run()
            getattr(run, f"check_{name}")()
        except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
            traceback.print_exc()
            detail = str(exc) if isinstance(exc, CheckFailed) else f"unexpected {exc!r}"
            print(f"FAIL {name}: {detail}", flush=True)
            return 1
        print(f"ok   {name} ({time.monotonic() - started:.2f}s)", flush=True)
    if finish is not None:
        finish(run)
    print(f"all {len(checks)} {passed} checks passed", flush=True)
    return 0


class ConsumerThread(threading.Thread):
    """Consumes `queue` on its own connection (prefetch 50, manual acks), acking each message
    after `check(method, props, body)` returned its sequence number; counts the deliveries of
    each number and the redelivered ones, and records what failed for the main thread."""

    def __init__(self, params, queue, check):
        super().__init__(daemon=True)
        self.params = params
        self.queue = queue
        self.check = check
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.received = {}  # seq -> deliveries
        self.errors = []
        self.redelivered = 0

    def on_message(self, channel, method, props, body):
        try:
            seq = self.check(method, props, body)
            with self.lock:
                self.received[seq] = self.received.get(seq, 0) + 1
                if method.redelivered:
                    self.redelivered += 1
        except Exception as exc:  # noqa: BLE001 - recorded, the main thread fails the run
            with self.lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
        channel.basic_ack(method.delivery_tag)

    def run(self):
        import pika  # the scripts made sure it imports

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

    def start_and_wait(self, secs=20):
        self.start()
        expect(self.ready.wait(secs), f"the consumer did not start within {secs} s")

    def snapshot(self):
        with self.lock:
            return dict(self.received), list(self.errors)

    def finish(self, confirmed_seqs, wait_secs, idle):
        """Waits up to `wait_secs` (calling idle() in between) until every confirmed sequence
        number arrived or a delivery failed, stops the thread and returns what it received."""
        deadline = time.monotonic() + wait_secs
        while True:
            received, errors = self.snapshot()
            missing = sorted(confirmed_seqs - received.keys())
            if errors or not missing or time.monotonic() > deadline:
                break
            idle()
        self.stop.set()
        self.join(10)
        received, errors = self.snapshot()
        return Received(received, errors, sorted(confirmed_seqs - received.keys()), self.redelivered)


class Received:
    def __init__(self, received, errors, missing, redelivered):
        self.received = received
        self.errors = errors
        self.missing = missing
        self.redelivered = redelivered
        self.duplicates = sum(n - 1 for n in received.values())

    def expect_complete(self):
        """Fails on a bad delivery or a confirmed message that never came."""
        if self.errors:
            raise CheckFailed(f"{len(self.errors)} bad deliveries, first: {self.errors[0]}")
        expect(not self.missing,
               f"{len(self.missing)} confirmed messages never received, e.g. {self.missing[:10]}")


class Published:
    """What publish_across_restart did."""

    def __init__(self):
        self.sent = self.confirmed = self.nacked = self.during_restart = 0
        self.confirmed_seqs = set()
        self.slowest_confirm = 0.0
        self.publish_secs = 0.0

    def summary(self, got, indent="", publish_secs=False):
        """The one summary line of a restart run, with what the consumer `got`."""
        secs = f"publish_secs={self.publish_secs:.1f} " if publish_secs else ""
        return (f"{indent}sent={self.sent} confirmed={self.confirmed} nacked={self.nacked} "
                f"received={len(got.received)} duplicates={got.duplicates} "
                f"redelivered={got.redelivered} published_during_restart={self.during_restart} "
                f"{secs}slowest_confirm_ms={self.slowest_confirm * 1000:.0f}")


def publish_across_restart(publish, count, restart_cmd, restart_timeout):
    """Publishes sequence numbers 0.. with publish(seq) (which returns once confirmed), runs
    `restart_cmd` in the background once half of `count` are sent, and goes on publishing until
    both `count` are sent and the restart is over, so some publishes certainly meet a broker that
    is down. A nack is counted; the restart command must succeed within `restart_timeout` once
    publishing is done."""
    import pika.exceptions  # the scripts made sure it imports

    out = Published()
    restart = None
    seq = 0
    started = time.monotonic()
    while seq < count or (restart is not None and restart.poll() is None):
        if seq == count // 2 and restart is None:
            restart = subprocess.Popen(shlex.split(restart_cmd), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
        if restart is not None and restart.poll() is None:
            out.during_restart += 1
        out.sent += 1
        t0 = time.monotonic()
        try:
            publish(seq)
            out.slowest_confirm = max(out.slowest_confirm, time.monotonic() - t0)
            out.confirmed += 1
            out.confirmed_seqs.add(seq)
        except pika.exceptions.NackError:
            out.nacked += 1
        seq += 1
    out.publish_secs = time.monotonic() - started
    _, err = restart.communicate(timeout=restart_timeout)
    expect(restart.returncode == 0, f"{restart_cmd} failed ({restart.returncode}): {err.decode()}")
    return out
