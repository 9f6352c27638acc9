#!/usr/bin/env bash
# The qpid-proton example broker: a second AMQP 1.0 peer for the amqp10 bridge's wire, link and
# credit tests (bridges/tests/amqp10_proton.rs).
#
#   scripts/qpid-broker.sh start     install it if missing, start it, print its URL
#   scripts/qpid-broker.sh stop      stop it (only this one)
#   scripts/qpid-broker.sh url       print the URL
#   scripts/qpid-broker.sh status    exit 0 if it is running
#
# Private: port 5698 on 127.0.0.1 (WARREN_QPID_PORT), directory target/qpid-broker/. Installed
# from Debian: python3-qpid-proton and libqpid-proton11-dev-examples (which ships broker.py).
# The broker takes any address, offers SASL ANONYMOUS only, and forgets a message once it is
# sent (no redelivery, no persistence): fit for wire and link behaviour, not for guarantees.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DIR="$ROOT/target/qpid-broker"
PORT=${WARREN_QPID_PORT:-5698}
URL="amqp://127.0.0.1:$PORT"
BROKER=/usr/share/proton/examples/python/broker.py

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

install() {
    [ -f "$BROKER" ] && /usr/bin/python3 -c 'import proton' 2>/dev/null && return
    command -v apt-get >/dev/null 2>&1 || die "qpid-proton not found and no apt-get to install it"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install qpid-proton"
        sudo=sudo
    fi
    log "installing python3-qpid-proton and libqpid-proton11-dev-examples with apt-get${sudo:+ (via sudo)}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        python3-qpid-proton libqpid-proton11-dev-examples >/dev/null
    [ -f "$BROKER" ] || die "$BROKER missing after the install"
}

pid() { [ -f "$DIR/broker.pid" ] && cat "$DIR/broker.pid"; }

running() {
    local p
    p=$(pid) || return 1
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

start() {
    install
    mkdir -p "$DIR"
    if ! running; then
        # The system python3: Debian's python3-qpid-proton lives there, not in a venv.
        nohup /usr/bin/python3 "$BROKER" -a "127.0.0.1:$PORT" >"$DIR/broker.log" 2>&1 &
        echo $! >"$DIR/broker.pid"
    fi
    for _ in $(seq 1 100); do
        if listening; then
            echo "$URL"
            return
        fi
        running || die "the broker exited (log: $DIR/broker.log)"
        sleep 0.1
    done
    die "the broker did not listen on port $PORT (log: $DIR/broker.log)"
}

stop() {
    local p
    p=$(pid) || return 0
    [ -n "$p" ] || return 0
    if kill -0 "$p" 2>/dev/null; then
        kill "$p"
        for _ in $(seq 1 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.05
        done
    fi
    rm -f "$DIR/broker.pid"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
url) echo "$URL" ;;
status) running ;;
*) die "usage: $0 start|stop|url|status" ;;
esac
