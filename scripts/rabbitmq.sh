#!/usr/bin/env bash
# A private RabbitMQ node for Warren's bridge tests.
#
#   scripts/rabbitmq.sh start     install rabbitmq-server if missing, start the node, print its URL
#   scripts/rabbitmq.sh stop      stop the node (only this one)
#   scripts/rabbitmq.sh restart   stop, then start (data kept: durable queues survive)
#   scripts/rabbitmq.sh url       print the AMQP URL
#   scripts/rabbitmq.sh status    exit 0 if the node is running
#
# The node is entirely private: its own name, ports, Erlang cookie, epmd and directories under
# target/rabbitmq/. A system RabbitMQ (say one the Debian package's postinst started on 5672) is
# never touched. Every command is idempotent: `start` on a running node just prints the URL.
#
# Environment: WARREN_RABBITMQ_PORT (AMQP port, default 5699; the distribution port is
# +20000 and the private epmd's +19000), WARREN_RABBITMQ_NODENAME (default
# warren-test@localhost), WARREN_RABBITMQ_START_TIMEOUT (seconds, default 120).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DIR="$ROOT/target/rabbitmq"

PORT=${WARREN_RABBITMQ_PORT:-5699}
NODE=${WARREN_RABBITMQ_NODENAME:-warren-test@localhost}
START_TIMEOUT=${WARREN_RABBITMQ_START_TIMEOUT:-120}
URL="amqp://guest:guest@127.0.0.1:$PORT/%2f"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- the node's private environment ----------------------------------------------------------

export RABBITMQ_NODENAME="$NODE"
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT="$PORT"
export RABBITMQ_DIST_PORT=$((PORT + 20000))
export ERL_EPMD_PORT=$((PORT + 19000))
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export RABBITMQ_MNESIA_BASE="$DIR/mnesia"
export RABBITMQ_LOG_BASE="$DIR/log"
export RABBITMQ_PID_FILE="$DIR/$NODE.pid"
export RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf"
export RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config"
export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"
export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
# The Erlang cookie lives in $HOME/.erlang.cookie for the server and the CLI tools alike.
export HOME="$DIR/home"

# Debian's /usr/sbin wrappers `su` to the rabbitmq user when run as root; the real scripts in
# /usr/lib/rabbitmq/bin run as whoever calls them, with the environment above.
find_bin() {
    if [ -x "/usr/lib/rabbitmq/bin/$1" ]; then
        echo "/usr/lib/rabbitmq/bin/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    elif [ -x "/usr/sbin/$1" ]; then
        echo "/usr/sbin/$1"
    fi
}

install_rabbitmq() {
    if [ -n "$(find_bin rabbitmq-server)" ] && [ -n "$(find_bin rabbitmqctl)" ]; then
        return
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "rabbitmq-server is not installed and apt-get is not available; install RabbitMQ and re-run"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install rabbitmq-server"
        sudo=sudo
    fi
    log "installing rabbitmq-server with apt-get${sudo:+ (via sudo)}"
    # Only the URL goes to stdout (callers capture it); apt's chatter goes to stderr.
    $sudo apt-get update -qq >&2
    # The package's postinst may start the system service (on 5672, as the rabbitmq user): that
    # one is left alone, this script never uses or stops it.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        rabbitmq-server >&2
}

ctl() {
    "$(find_bin rabbitmqctl)" -n "$NODE" "$@"
}

running() {
    [ -n "$(find_bin rabbitmqctl)" ] || return 1
    [ -f "$HOME/.erlang.cookie" ] || return 1
    timeout 30 "$(find_bin rabbitmqctl)" -n "$NODE" -q status >/dev/null 2>&1
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

prepare_dir() {
    mkdir -p "$DIR" "$RABBITMQ_MNESIA_BASE" "$RABBITMQ_LOG_BASE" "$HOME"
    chmod 700 "$HOME"
    if [ ! -s "$HOME/.erlang.cookie" ]; then
        # 40 random hex digits (read through od: no pipe that could die of SIGPIPE).
        od -An -tx1 -N20 /dev/urandom | tr -d ' \n' | tr 'a-f' 'A-F' >"$HOME/.erlang.cookie"
        chmod 400 "$HOME/.erlang.cookie"
    fi
    # One plugin: rabbitmq_amqp1_0 makes the AMQP listener speak AMQP 1.0 too (the amqp10
    # bridge's tests); the 0-9-1 tests need none.
    echo '[rabbitmq_amqp1_0].' >"$RABBITMQ_ENABLED_PLUGINS_FILE"
    # Keeps /etc/rabbitmq/rabbitmq-env.conf from applying to this node.
    : >"$RABBITMQ_CONF_ENV_FILE"
    cat >"$RABBITMQ_CONFIG_FILE" <<EOF
# Written by scripts/rabbitmq.sh; rewritten on every start.
listeners.tcp.default = 127.0.0.1:$PORT
# Test machines may have little free disk: do not block publishers over it.
disk_free_limit.absolute = 10MB
log.console = false
log.file.level = info
EOF
    echo '[].' >"$RABBITMQ_ADVANCED_CONFIG_FILE"
}

start() {
    install_rabbitmq
    prepare_dir
    if running; then
        log "RabbitMQ node $NODE is already running"
        # A node started before the plugin was listed gets it now (a no-op when enabled).
        "$(find_bin rabbitmq-plugins)" -n "$NODE" -q enable rabbitmq_amqp1_0 >/dev/null 2>&1 || true
        echo "$URL"
        return
    fi
    if port_in_use "$PORT"; then
        die "port $PORT is in use by something other than the node $NODE; set WARREN_RABBITMQ_PORT"
    fi
    log "starting RabbitMQ node $NODE on 127.0.0.1:$PORT (data and logs in $DIR)"
    (cd "$DIR" && "$(find_bin rabbitmq-server)" -detached) >"$DIR/startup.log" 2>&1 || {
        cat "$DIR/startup.log" >&2
        die "rabbitmq-server -detached failed"
    }
    # await_startup needs the node to be reachable first; keep asking until the deadline.
    local deadline=$((SECONDS + START_TIMEOUT))
    until timeout 60 "$(find_bin rabbitmqctl)" -n "$NODE" -q await_startup --timeout 60 \
        >"$DIR/await.log" 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            cat "$DIR/await.log" >&2
            tail -n 40 "$RABBITMQ_LOG_BASE"/*.log >&2 2>/dev/null || true
            die "RabbitMQ node $NODE did not start within ${START_TIMEOUT}s (logs in $RABBITMQ_LOG_BASE)"
        fi
        sleep 1
    done
    log "RabbitMQ node $NODE is up"
    echo "$URL"
}

stop() {
    if running; then
        log "stopping RabbitMQ node $NODE"
        # `shutdown` returns once the Erlang VM has exited.
        timeout 120 "$(find_bin rabbitmqctl)" -n "$NODE" -q shutdown >/dev/null ||
            die "could not stop RabbitMQ node $NODE"
    else
        log "RabbitMQ node $NODE is not running"
    fi
    # The private epmd (its own port) goes too once no node is registered with it (the stopped
    # node's name can linger for a moment).
    if command -v epmd >/dev/null 2>&1 && epmd -port "$ERL_EPMD_PORT" -names >/dev/null 2>&1; then
        local tries
        for tries in $(seq 50); do
            if ! epmd -port "$ERL_EPMD_PORT" -names 2>/dev/null | grep -q '^name '; then
                epmd -port "$ERL_EPMD_PORT" -kill >/dev/null 2>&1 || true
                break
            fi
            sleep 0.1
        done
    fi
}

case "${1:-}" in
start) start ;;
stop) stop ;;
restart)
    stop
    start
    ;;
url) echo "$URL" ;;
status) running ;;
*)
    echo "usage: $0 start|stop|restart|url|status" >&2
    exit 2
    ;;
esac
