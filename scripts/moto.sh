#!/usr/bin/env bash
# A private moto server (a local SQS-compatible endpoint) for Warren's SQS bridge tests.
#
#   scripts/moto.sh start          install moto[server] if missing, start the server, print its URL
#   scripts/moto.sh stop           stop the server (only this one)
#   scripts/moto.sh kill-restart   kill -9 the server, start it again and replay its request
#                                  recording (see below), so it comes back with what it had
#   scripts/moto.sh record         start recording requests from now on (the old recording is erased)
#   scripts/moto.sh record-stop    stop recording
#   scripts/moto.sh url            print the URL
#   scripts/moto.sh status         exit 0 if the server is running
#
# Private: port 4576 on 127.0.0.1 (WARREN_MOTO_PORT), directory target/moto/. moto is installed
# with pip into the virtualenv target/pyenv (the one scripts/test.sh makes for pika; created here
# if missing). Any credentials are accepted; use region us-east-1.
#
# moto keeps its state in memory only. Its request recorder is what lets a restart keep state:
# after `record`, every request (except the recorder's own) is appended to
# target/moto/recording.jsonl *before* moto handles it, and `kill-restart` replays that file into
# the new process. So every request moto answered (e.g. a SendMessageBatch whose entries it
# confirmed) is applied again. Requests that arrive while the replay runs are not recorded:
# a second kill-restart would lose them (the tests restart once). Replayed ReceiveMessage and
# DeleteMessage calls do not reproduce the original receipts, so only record a publishing run.
set -euo pipefail

MOTO_VERSION=5.2.5

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DIR="$ROOT/target/moto"
VENV="$ROOT/target/pyenv"
PORT=${WARREN_MOTO_PORT:-4576}
URL="http://127.0.0.1:$PORT"

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
    if ! "$VENV/bin/python" -c '
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    import flask, flask_cors  # moto[server] extras
    sys.exit(version("moto") != sys.argv[1])
except (PackageNotFoundError, ImportError):
    sys.exit(1)
' "$MOTO_VERSION" 2>/dev/null; then
        log "installing moto[server]==$MOTO_VERSION into $VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            "moto[server]==$MOTO_VERSION" >&2
    fi
}

pid() { [ -f "$DIR/moto.pid" ] && cat "$DIR/moto.pid"; }

running() {
    local p
    p=$(pid) || return 1
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null
}

# moto answers its own API once it is up.
ready() { curl -fsS -o /dev/null "$URL/moto-api/data.json" 2>/dev/null; }

api() { curl -fsS -X POST -o /dev/null "$URL/moto-api/recorder/$1"; }

start() {
    install
    mkdir -p "$DIR"
    if ! running; then
        # Recording off at start; `record` turns it on (through moto's API) for a test. Its own
        # session (setsid), like a daemon: it outlives the shell that started it; `stop` ends it.
        MOTO_RECORDER_FILEPATH="$DIR/recording.jsonl" \
            setsid nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >>"$DIR/moto.log" 2>&1 </dev/null &
        echo $! >"$DIR/moto.pid"
    fi
    for _ in $(seq 1 200); do
        if ready; then
            echo "$URL"
            return
        fi
        running || die "moto_server exited (log: $DIR/moto.log)"
        sleep 0.1
    done
    die "moto_server did not answer on port $PORT (log: $DIR/moto.log)"
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
        kill -9 "$p" 2>/dev/null || true
    fi
    rm -f "$DIR/moto.pid"
}

kill_restart() {
    local p
    p=$(pid) || true
    if [ -n "${p:-}" ] && kill -0 "$p" 2>/dev/null; then
        kill -9 "$p"
        for _ in $(seq 1 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.05
        done
    fi
    rm -f "$DIR/moto.pid"
    start >/dev/null
    if [ -s "$DIR/recording.jsonl" ]; then
        api replay-recording
        api start-recording
    fi
    echo "$URL"
}

record() {
    running || die "moto_server is not running (scripts/moto.sh start)"
    api reset-recording
    api start-recording
}

case "${1:-}" in
start) start ;;
stop) stop ;;
kill-restart) kill_restart ;;
record) record ;;
record-stop) running && api stop-recording ;;
url) echo "$URL" ;;
status) running ;;
*) die "usage: $0 start|stop|kill-restart|record|record-stop|url|status" ;;
esac
