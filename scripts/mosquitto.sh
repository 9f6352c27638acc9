#!/usr/bin/env bash
# A private Mosquitto (MQTT) broker for Warren's MQTT bridge tests.
#
#   scripts/mosquitto.sh start     install mosquitto if missing, start the broker, print its URL
#   scripts/mosquitto.sh stop      stop the broker (only this one)
#   scripts/mosquitto.sh restart   stop, then start (persistent sessions and queued messages kept)
#   scripts/mosquitto.sh url       print the URL
#   scripts/mosquitto.sh tls-url   print the URL of the TLS listener (mqtts://)
#   scripts/mosquitto.sh ca-file   print the path of the CA certificate the TLS listener's is signed by
#   scripts/mosquitto.sh status    exit 0 if the broker is running
#
# Private: port 1889 on 127.0.0.1 (WARREN_MOSQUITTO_PORT), directory target/mosquitto/, with
# `persistence true` so sessions survive a restart. A system Mosquitto is never touched.
# A second listener on port 1890 (WARREN_MOSQUITTO_TLS_PORT) speaks TLS with a throwaway CA and
# server certificate (127.0.0.1, localhost) made by scripts/tls-certs.sh in target/mosquitto/tls/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DIR="$ROOT/target/mosquitto"
PORT=${WARREN_MOSQUITTO_PORT:-1889}
URL="mqtt://127.0.0.1:$PORT"
TLS_PORT=${WARREN_MOSQUITTO_TLS_PORT:-1890}
TLS_URL="mqtts://127.0.0.1:$TLS_PORT"
TLS_DIR="$DIR/tls"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

find_bin() {
    if command -v mosquitto >/dev/null 2>&1; then
        command -v mosquitto
    elif [ -x /usr/sbin/mosquitto ]; then
        echo /usr/sbin/mosquitto
    fi
}

install() {
    [ -n "$(find_bin)" ] && return
    command -v apt-get >/dev/null 2>&1 || die "mosquitto not found and no apt-get to install it"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install mosquitto"
        sudo=sudo
    fi
    log "installing mosquitto with apt-get${sudo:+ (via sudo)}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
}

pid() { [ -f "$DIR/mosquitto.pid" ] && cat "$DIR/mosquitto.pid"; }

running() {
    local p
    p=$(pid) || return 1
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    install
    mkdir -p "$DIR/data"
    "$ROOT/scripts/tls-certs.sh" "$TLS_DIR"
    if running && ! listening "$TLS_PORT"; then
        # Started by an older version of this script, without the TLS listener.
        log "restarting mosquitto to add its TLS listener on port $TLS_PORT"
        stop
    fi
    if ! running; then
        {
            echo "listener $PORT 127.0.0.1"
            echo "allow_anonymous true"
            echo "persistence true"
            echo "persistence_location $DIR/data/"
            echo "pid_file $DIR/mosquitto.pid"
            echo "log_dest file $DIR/mosquitto.log"
            echo "max_queued_messages 100000"
            if [ "$(id -u)" -eq 0 ]; then
                echo "user root"
            fi
            echo "listener $TLS_PORT 127.0.0.1"
            echo "cafile $TLS_DIR/ca.pem"
            echo "certfile $TLS_DIR/server.pem"
            echo "keyfile $TLS_DIR/server.key"
        } >"$DIR/mosquitto.conf"
        "$(find_bin)" -c "$DIR/mosquitto.conf" -d
    fi
    for _ in $(seq 1 100); do
        if listening "$PORT" && listening "$TLS_PORT"; then
            echo "$URL"
            return
        fi
        sleep 0.1
    done
    die "mosquitto did not listen on ports $PORT and $TLS_PORT (log: $DIR/mosquitto.log)"
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
    rm -f "$DIR/mosquitto.pid"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
restart) stop; start ;;
url) echo "$URL" ;;
tls-url) echo "$TLS_URL" ;;
ca-file) echo "$TLS_DIR/ca.pem" ;;
status) running ;;
*) die "usage: $0 start|stop|restart|url|tls-url|ca-file|status" ;;
esac
