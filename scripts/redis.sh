#!/usr/bin/env bash
# A private Redis server for Warren's Redis Streams bridge tests.
#
#   scripts/redis.sh start     install redis-server if missing, start the server, print its URL
#   scripts/redis.sh stop      stop the server (only this one)
#   scripts/redis.sh restart   stop, then start (data kept: the append-only file survives)
#   scripts/redis.sh url       print the URL
#   scripts/redis.sh status    exit 0 if the server is running
#
# Private: port 6389 on 127.0.0.1 (WARREN_REDIS_PORT), directory target/redis/. A system Redis
# is never touched. Persistence: `appendonly yes` + `appendfsync always`, so a reply to XADD
# comes after the entry is fsynced and a restart keeps every acknowledged write.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DIR="$ROOT/target/redis"
PORT=${WARREN_REDIS_PORT:-6389}
URL="redis://127.0.0.1:$PORT"

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
    if ! running; then
        redis-server --bind 127.0.0.1 --port "$PORT" --daemonize yes --dir "$DIR" \
            --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" \
            --appendonly yes --appendfsync always --save ""
    fi
    for _ in $(seq 1 100); do
        if ping; then
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
status) running ;;
*) die "usage: $0 start|stop|restart|url|status" ;;
esac
