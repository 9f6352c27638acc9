#!/usr/bin/env bash
# A private Redis server for Warren's Redis Streams bridge tests.
#
#   scripts/redis.sh start     install redis-server if missing, start the server, print its URL
#   scripts/redis.sh stop      stop the server (only this one)
#   scripts/redis.sh restart   stop, then start (data kept: the append-only file survives)
#   scripts/redis.sh url       print the URL
#   scripts/redis.sh tls-url   print the URL of the TLS port (rediss://)
#   scripts/redis.sh ca-file   print the path of the CA certificate the TLS port's is signed by
#   scripts/redis.sh status    exit 0 if the server is running
#
# Private: port 6389 on 127.0.0.1 (WARREN_REDIS_PORT), directory target/redis/. A system Redis
# is never touched. Persistence: `appendonly yes` + `appendfsync always`, so a reply to XADD
# comes after the entry is fsynced and a restart keeps every acknowledged write.
# A TLS port 6390 (WARREN_REDIS_TLS_PORT) serves the same data with a throwaway CA and server
# certificate (127.0.0.1, localhost) made by scripts/tls-certs.sh in target/redis/tls/; clients
# need no certificate of their own (`--tls-auth-clients no`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DIR="$ROOT/target/redis"
PORT=${WARREN_REDIS_PORT:-6389}
URL="redis://127.0.0.1:$PORT"
TLS_PORT=${WARREN_REDIS_TLS_PORT:-6390}
TLS_URL="rediss://127.0.0.1:$TLS_PORT"
TLS_DIR="$DIR/tls"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

install() {
    command -v redis-server >/dev/null 2>&1 && return
    command -v apt-get >/dev/null 2>&1 || die "redis-server not found and no apt-get to install it"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install redis-server"
        sudo=sudo
    fi
    log "installing redis-server with apt-get${sudo:+ (via sudo)}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}

pid() { [ -f "$DIR/redis.pid" ] && cat "$DIR/redis.pid"; }

running() {
    local p
    p=$(pid) || return 1
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null
}

ping() { redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; }

start() {
    install
    mkdir -p "$DIR"
    "$ROOT/scripts/tls-certs.sh" "$TLS_DIR"
    if running && ! (exec 3<>"/dev/tcp/127.0.0.1/$TLS_PORT") 2>/dev/null; then
        # Started by an older version of this script, without the TLS port.
        log "restarting redis-server to add its TLS port $TLS_PORT"
        stop
    fi
    if ! running; then
        redis-server --bind 127.0.0.1 --port "$PORT" --daemonize yes --dir "$DIR" \
            --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" \
            --appendonly yes --appendfsync always --save "" \
            --tls-port "$TLS_PORT" --tls-cert-file "$TLS_DIR/server.pem" \
            --tls-key-file "$TLS_DIR/server.key" --tls-ca-cert-file "$TLS_DIR/ca.pem" \
            --tls-auth-clients no
    fi
    for _ in $(seq 1 100); do
        if ping && (exec 3<>"/dev/tcp/127.0.0.1/$TLS_PORT") 2>/dev/null; then
            echo "$URL"
            return
        fi
        sleep 0.1
    done
    die "redis did not answer on port $PORT (log: $DIR/redis.log)"
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
    rm -f "$DIR/redis.pid"
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
