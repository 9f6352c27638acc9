#!/usr/bin/env bash
# Benchmarks Warren against RabbitMQ (Debian's rabbitmq-server) on this machine, with the same
# load tool (warren-bench) and the same scenarios, and prints median tables.
#
# RabbitMQ runs as a private node of its own (node warrenbench@localhost, AMQP on RABBIT_PORT,
# its own epmd and distribution ports, data and logs under a temporary directory), so a system
# RabbitMQ on 5672 is never touched. rabbitmq-server is installed with apt-get if missing, with
# service start-up blocked during the install. Warren runs from target/release with a temporary
# data directory. Both are stopped on exit.
#
# Environment (defaults in brackets):
#   BENCH_SECONDS [10]   measured seconds per throughput run (after a 1 s warm-up)
#   BENCH_RUNS    [3]    runs per scenario and broker; the tables show medians
#   BENCH_SCENARIOS ["S1 S2 S3 S4 S5 S6 S7 S8"]   throughput scenarios to run ("" for none)
#   BENCH_MEMORY  [1]    0 skips the memory scenarios (M1 idle connections, M2 queued messages)
#   BENCH_BRIDGES [1]    0 skips the bridge scenarios (B1 Kafka, B2 AMQP 1.0: scripts/bench-bridges.sh,
#                        run against this script's RabbitMQ node, which then has rabbitmq_amqp1_0)
#   BENCH_DEEP    [10000000]  messages in Warren's deep durable queue (W2..W4); 0 skips W1..W4
#   BENCH_RESTART [1000000]   persistent messages queued for Warren's restart test (W1)
#   BENCH_IDLE    [5000]      idle connections (M1)
#   BENCH_QUEUED  [1000000]   transient messages queued (M2)
#   BENCH_S5_MAX  [5000000]   cap on S5's publish-only phase, to bound memory
#   RABBIT_PORT [5799] RABBIT_DIST_PORT [25799] RABBIT_EPMD_PORT [4799] WARREN_PORT [5798]
#   (scripts/rabbitmq.sh, the test suite's RabbitMQ, uses 5699 and 25699: these stay clear of it)
#   BENCH_OUT     [target/bench]  where results-<time>.jsonl / .md are written
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_SCENARIOS=${BENCH_SCENARIOS-"S1 S2 S3 S4 S5 S6 S7 S8"}
BENCH_MEMORY=${BENCH_MEMORY:-1}
BENCH_BRIDGES=${BENCH_BRIDGES:-1}
BENCH_DEEP=${BENCH_DEEP:-10000000}
BENCH_RESTART=${BENCH_RESTART:-1000000}
BENCH_IDLE=${BENCH_IDLE:-5000}
BENCH_QUEUED=${BENCH_QUEUED:-1000000}
BENCH_S5_MAX=${BENCH_S5_MAX:-5000000}
RABBIT_PORT=${RABBIT_PORT:-5799}
RABBIT_DIST_PORT=${RABBIT_DIST_PORT:-25799}
RABBIT_EPMD_PORT=${RABBIT_EPMD_PORT:-4799}
RABBIT_NODE=warrenbench@localhost
WARREN_PORT=${WARREN_PORT:-5798}
BENCH_OUT=${BENCH_OUT:-$ROOT/target/bench}

RABBIT_BIN=/usr/lib/rabbitmq/bin
STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$BENCH_OUT"
RESULTS="$BENCH_OUT/results-$STAMP.jsonl"
TABLE="$BENCH_OUT/results-$STAMP.md"
BRIDGE_RESULTS="$BENCH_OUT/results-$STAMP-bridges.jsonl"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/warren-bench.XXXXXX")
BENCH="$ROOT/target/release/warren-bench"
WARREN="$ROOT/target/release/warren"

log() { printf '==> [%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust first"

# --- cleanup ---------------------------------------------------------------------------------

RABBIT_SH_PID=""
RABBIT_PID=""
WARREN_PID=""
IDLE_PID=""
POLICY_RC_CREATED=""

cleanup() {
    local rc=$?
    set +e
    [ -n "$IDLE_PID" ] && kill "$IDLE_PID" 2>/dev/null
    # (An early exit comes before these are defined.)
    declare -F stop_warren >/dev/null && stop_warren
    declare -F stop_rabbit >/dev/null && stop_rabbit
    if [ -n "$POLICY_RC_CREATED" ]; then
        $SUDO rm -f /usr/sbin/policy-rc.d
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- RabbitMQ install ------------------------------------------------------------------------

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
fi

if [ ! -x "$RABBIT_BIN/rabbitmq-server" ]; then
    command -v apt-get >/dev/null 2>&1 || die "rabbitmq-server is not installed and there is no apt-get"
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
        die "need root or sudo to apt-get install rabbitmq-server"
    fi
    log "installing rabbitmq-server with apt-get${SUDO:+ (via sudo)}"
    # Keep the package from starting a system RabbitMQ on 5672: invoke-rc.d asks policy-rc.d.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    if [ -n "$POLICY_RC_CREATED" ]; then
        $SUDO rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=""
    fi
fi
[ -x "$RABBIT_BIN/rabbitmq-server" ] || die "rabbitmq-server missing after install"
RABBIT_VERSION=$(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo unknown)
ERLANG_VERSION=$(dpkg-query -W -f='${Version}' erlang-base 2>/dev/null || echo unknown)

# --- checks ----------------------------------------------------------------------------------

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$RABBIT_PORT" "$RABBIT_DIST_PORT" "$RABBIT_EPMD_PORT" "$WARREN_PORT"; do
    port_busy "$p" && die "port $p is already in use; set RABBIT_PORT/RABBIT_DIST_PORT/RABBIT_EPMD_PORT/WARREN_PORT"
done

# Idle connections need a descriptor each, in the tool and in the broker.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
need=$((BENCH_IDLE + 1024))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
    log "ulimit -n is $(ulimit -n); lowering BENCH_IDLE to $(($(ulimit -n) - 1024))"
    BENCH_IDLE=$(($(ulimit -n) - 1024))
fi

log "building warren and warren-bench (release)"
cargo build --release -q -p warren-gateway --bin warren -p warren-bench
WARREN_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    WARREN_REV+=" with uncommitted changes"
fi

# --- brokers ---------------------------------------------------------------------------------

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# Polls until an AMQP handshake succeeds on $1, or fails after $2 seconds.
wait_amqp() {
    local port=$1 limit=$2 start=$SECONDS
    until "$BENCH" --addr "127.0.0.1:$port" --mode idle --connections 1 --duration 0 -q \
        >/dev/null 2>&1; do
        ((SECONDS - start < limit)) || return 1
        sleep 0.2
    done
}

# The private node's environment: its own name, ports, epmd, directories and config files.
RABBIT_ENV=(
    HOME="$WORK/rabbit"
    RABBITMQ_NODENAME="$RABBIT_NODE"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    RABBITMQ_NODE_PORT="$RABBIT_PORT"
    RABBITMQ_DIST_PORT="$RABBIT_DIST_PORT"
    ERL_EPMD_PORT="$RABBIT_EPMD_PORT"
    ERL_EPMD_ADDRESS=127.0.0.1
    RABBITMQ_MNESIA_BASE="$WORK/rabbit/mnesia"
    RABBITMQ_LOG_BASE="$WORK/rabbit/log"
    RABBITMQ_CONFIG_FILE="$WORK/rabbit/rabbitmq.conf"
    RABBITMQ_ADVANCED_CONFIG_FILE="$WORK/rabbit/advanced.config"
    RABBITMQ_CONF_ENV_FILE="$WORK/rabbit/rabbitmq-env.conf"
    RABBITMQ_ENABLED_PLUGINS_FILE="$WORK/rabbit/enabled_plugins"
    RABBITMQ_PID_FILE="$WORK/rabbit/pid"
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
)

start_rabbit() {
    rm -rf "$WORK/rabbit"
    mkdir -p "$WORK/rabbit/mnesia" "$WORK/rabbit/log"
    # guest may log in from loopback by default, so no loopback_users change is needed.
    cat >"$WORK/rabbit/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$RABBIT_PORT
log.file.level = warning
EOF
    : >"$WORK/rabbit/rabbitmq-env.conf"
    # The bridge scenarios send AMQP 1.0 to this node: rabbitmq_amqp1_0 makes its AMQP listener
    # speak that too (enabled offline, through the plugins file).
    if [ "$BENCH_BRIDGES" = 1 ]; then
        echo '[rabbitmq_amqp1_0].' >"$WORK/rabbit/enabled_plugins"
    else
        echo '[].' >"$WORK/rabbit/enabled_plugins"
    fi
    # Run the server script directly (not /usr/sbin's wrapper, which su's to the rabbitmq user
    # and cannot write our directories).
    env "${RABBIT_ENV[@]}" "$RABBIT_BIN/rabbitmq-server" >"$WORK/rabbit/stdout.log" 2>&1 &
    RABBIT_SH_PID=$!
    if ! wait_amqp "$RABBIT_PORT" 90; then
        tail -n 40 "$WORK/rabbit/stdout.log" "$WORK"/rabbit/log/*.log >&2 || true
        die "RabbitMQ did not answer on port $RABBIT_PORT within 90 s (logs above)"
    fi
    RABBIT_PID=$(pgrep -P "$RABBIT_SH_PID" -x beam.smp || cat "$WORK/rabbit/pid" 2>/dev/null || true)
    [ -n "$RABBIT_PID" ] || die "cannot find RabbitMQ's beam.smp process"
    log "RabbitMQ $RABBIT_VERSION up on 127.0.0.1:$RABBIT_PORT (beam.smp pid $RABBIT_PID)"
}

stop_rabbit() {
    [ -n "$RABBIT_SH_PID" ] || return 0
    env "${RABBIT_ENV[@]}" timeout 60 "$RABBIT_BIN/rabbitmqctl" -n "$RABBIT_NODE" stop \
        >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do
        kill -0 "$RABBIT_SH_PID" 2>/dev/null || break
        sleep 0.2
    done
    if [ -n "$RABBIT_PID" ] && kill -0 "$RABBIT_PID" 2>/dev/null; then
        kill -TERM "$RABBIT_PID" 2>/dev/null || true
        sleep 2
        kill -KILL "$RABBIT_PID" 2>/dev/null || true
    fi
    wait "$RABBIT_SH_PID" 2>/dev/null || true
    # The epmd this node started on its own port.
    ERL_EPMD_PORT="$RABBIT_EPMD_PORT" epmd -kill >/dev/null 2>&1 || true
    RABBIT_SH_PID=""
    RABBIT_PID=""
}

# start_warren DATA_DIR: starts Warren, logging to $WORK/warren.log; sets WARREN_STARTED_MS.
start_warren() {
    local data=$1
    local t0
    t0=$(date +%s%N)
    NO_COLOR=1 RUST_LOG=info "$WARREN" --listen "127.0.0.1:$WARREN_PORT" --data-dir "$data" \
        >>"$WORK/warren.log" 2>&1 &
    WARREN_PID=$!
    if ! wait_amqp "$WARREN_PORT" 600; then
        tail -n 40 "$WORK/warren.log" >&2
        die "Warren did not answer on port $WARREN_PORT"
    fi
    WARREN_STARTED_MS=$((($(date +%s%N) - t0) / 1000000))
    log "Warren up on 127.0.0.1:$WARREN_PORT (pid $WARREN_PID, ${WARREN_STARTED_MS} ms)"
}

stop_warren() {
    [ -n "$WARREN_PID" ] || return 0
    kill -TERM "$WARREN_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do
        kill -0 "$WARREN_PID" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$WARREN_PID" 2>/dev/null || true
    wait "$WARREN_PID" 2>/dev/null || true
    WARREN_PID=""
}

port_of() { if [ "$1" = warren ]; then echo "$WARREN_PORT"; else echo "$RABBIT_PORT"; fi; }
pid_of() { if [ "$1" = warren ]; then echo "$WARREN_PID"; else echo "$RABBIT_PID"; fi; }

# bench BROKER SCENARIO DESC RUN ARGS...: one warren-bench run, its JSON appended to $RESULTS.
bench() {
    local broker=$1 scenario=$2 desc=$3 run=$4
    shift 4
    local out
    if ! out=$("$BENCH" --addr "127.0.0.1:$(port_of "$broker")" --json -q \
        --tag "scenario=$scenario" --tag "broker=$broker" --tag "desc=$desc" --tag "run=$run" \
        "$@" 2>>"$WORK/bench-stderr.log"); then
        tail -n 5 "$WORK/bench-stderr.log" >&2
        die "warren-bench failed: $broker $scenario run $run"
    fi
    echo "$out" >>"$RESULTS"
    echo "$out" | grep -oE '"(publish|consume|confirm)_rate":[0-9.]+|"latency_p99_us":[0-9]+' |
        tr '\n' ' ' | sed "s/^/    $broker $scenario #$run: /" >&2
    echo >&2
}

# record BROKER SCENARIO DESC KEY=NUMBER...: a result measured by this script.
record() {
    local broker=$1 scenario=$2 desc=$3
    shift 3
    local json kv
    json="{\"scenario\":\"$scenario\",\"broker\":\"$broker\",\"desc\":\"$desc\""
    for kv in "$@"; do
        json+=",\"${kv%%=*}\":${kv#*=}"
    done
    echo "$json}" >>"$RESULTS"
    log "$broker $scenario: $*"
}

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# --- throughput and latency ------------------------------------------------------------------

nproc_=$(nproc)
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
log "machine: $nproc_ cores, $cpu; RabbitMQ $RABBIT_VERSION, Erlang $ERLANG_VERSION"
log "results: $RESULTS"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

start_rabbit
start_warren "$WORK/warren-data"

T=(--warmup 1 --duration "$BENCH_SECONDS" --delete-after)
ACKS=(--ack-every 100 --prefetch 1000)
scenario() {
    local broker=$1 s=$2 run=$3
    case $s in
    S1) bench "$broker" S1 "16 B, no-ack, 1 pub → 1 cons" "$run" "${T[@]}" --size 16 --queue-prefix bench-s1 ;;
    S2) bench "$broker" S2 "16 B, ack every 100, prefetch 1000" "$run" "${T[@]}" --size 16 "${ACKS[@]}" --queue-prefix bench-s2 ;;
    S3) bench "$broker" S3 "1 KiB, no-ack" "$run" "${T[@]}" --size 1024 --queue-prefix bench-s3 ;;
    S4) bench "$broker" S4 "16 B persistent, durable queue, confirms (1000 in flight), acks" "$run" \
        "${T[@]}" --size 16 --persistent --confirm 1000 "${ACKS[@]}" --queue-prefix bench-s4 ;;
    S5)
        bench "$broker" S5 "16 B publish-only (≤ ${BENCH_SECONDS} s or $BENCH_S5_MAX msgs)" "$run" \
            --duration "$BENCH_SECONDS" --count "$BENCH_S5_MAX" --size 16 --mode publish-only \
            --queue-prefix bench-s5
        bench "$broker" "S5 drain" "then drain it, acks every 100, prefetch 1000" "$run" \
            --mode consume-only --drain --duration 300 "${ACKS[@]}" --queue-prefix bench-s5 --delete-after
        ;;
    S6) bench "$broker" S6 "64 KiB, ack every 100, prefetch 1000" "$run" "${T[@]}" --size 65536 "${ACKS[@]}" --queue-prefix bench-s6 ;;
    S7) bench "$broker" S7 "16 B, no-ack, 4 pub → 4 queues → 4 cons" "$run" "${T[@]}" --size 16 \
        --publishers 4 --consumers 4 --queues 4 --queue-prefix bench-s7 ;;
    S8) bench "$broker" S8 "16 B at a fixed 10,000 msg/s, no-ack: latency" "$run" "${T[@]}" --size 16 \
        --rate 10000 --queue-prefix bench-s8 ;;
    *) die "unknown scenario $s" ;;
    esac
    sleep 1
}

for run in $(seq 1 "$BENCH_RUNS"); do
    for s in $BENCH_SCENARIOS; do
        # Alternate which broker goes first, so drift in the machine's load hits both alike.
        if ((run % 2)); then order="rabbitmq warren"; else order="warren rabbitmq"; fi
        for broker in $order; do
            log "run $run/$BENCH_RUNS $s $broker"
            scenario "$broker" "$s" "$run"
        done
    done
done

# --- bridges: through Warren to Kafka and to AMQP 1.0, against their client libraries direct --

if [ "$BENCH_BRIDGES" = 1 ]; then
    log "bridge scenarios (scripts/bench-bridges.sh)"
    BENCH_NO_BUILD=1 BENCH_AMQP10_PORT="$RABBIT_PORT" BENCH_BRIDGES_RESULTS="$BRIDGE_RESULTS" \
        BENCH_SECONDS="$BENCH_SECONDS" BENCH_RUNS="$BENCH_RUNS" "$ROOT/scripts/bench-bridges.sh" \
        >/dev/null || die "the bridge scenarios failed"
fi

# --- memory: fresh brokers, idle connections first, then queued messages ---------------------

if [ "$BENCH_MEMORY" = 1 ]; then
    stop_warren
    stop_rabbit
    rm -rf "$WORK/warren-data"
    start_rabbit
    start_warren "$WORK/warren-data"
    sleep 5
    for broker in rabbitmq warren; do
        pid=$(pid_of "$broker")
        base=$(rss_kib "$pid")
        record "$broker" M0 "RSS at start, idle" rss_mib="$(mib "$base")"
        rm -f "$WORK/idle-ready"
        "$BENCH" --addr "127.0.0.1:$(port_of "$broker")" --mode idle --connections "$BENCH_IDLE" \
            --duration 30 --ready-file "$WORK/idle-ready" -q >/dev/null 2>>"$WORK/bench-stderr.log" &
        IDLE_PID=$!
        for _ in $(seq 1 600); do
            [ -f "$WORK/idle-ready" ] && break
            kill -0 "$IDLE_PID" 2>/dev/null || die "idle connections failed (see $WORK/bench-stderr.log)"
            sleep 0.1
        done
        [ -f "$WORK/idle-ready" ] || die "opening $BENCH_IDLE connections took over 60 s"
        sleep 5
        held=$(rss_kib "$pid")
        record "$broker" M1 "$BENCH_IDLE idle connections (1 channel each)" \
            rss_mib="$(mib "$held")" \
            per_connection_kib="$(awk -v a="$held" -v b="$base" -v n="$BENCH_IDLE" 'BEGIN { printf "%.2f", (a - b) / n }')"
        kill "$IDLE_PID" 2>/dev/null || true
        wait "$IDLE_PID" 2>/dev/null || true
        IDLE_PID=""
        sleep 5

        # Filled and deleted BENCH_RUNS times: the later fills show whether memory freed by a
        # deleted queue is reused (an allocator that keeps it per thread grows each time).
        for run in $(seq 1 "$BENCH_RUNS"); do
            before=$(rss_kib "$pid")
            bench "$broker" "M2 fill" "publish $BENCH_QUEUED × 16 B transient, confirms" "$run" \
                --mode publish-only --count "$BENCH_QUEUED" --size 16 --confirm 1000 \
                --queue-prefix bench-m2
            sleep 5
            queued=$(rss_kib "$pid")
            record "$broker" M2 "$BENCH_QUEUED queued 16 B transient messages" \
                rss_mib="$(mib "$queued")" delta_mib="$(mib $((queued - before)))"
            "$BENCH" --addr "127.0.0.1:$(port_of "$broker")" --mode delete \
                --queue-prefix bench-m2 -q >/dev/null
            sleep 5
        done
    done
fi

# --- Warren alone: restart with persistent messages queued, a deep durable queue -------------

# elapsed_ms from Warren's last "recovered durable state" log line (null if absent).
recovered_ms() {
    local ms
    ms=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/warren.log" | grep 'recovered durable state' |
        tail -n 1 | grep -oE 'elapsed_ms=[0-9]+' | cut -d= -f2 || true)
    echo "${ms:-null}"
}

if [ "$BENCH_DEEP" != 0 ]; then
    stop_rabbit # not needed any more: keep its CPU and memory out of Warren's numbers
    stop_warren
    rm -rf "$WORK/warren-deep"
    start_warren "$WORK/warren-deep"
    DEEP=(--queue-prefix bench-deep --persistent --size 16)
    bench warren W1 "fill: $BENCH_RESTART × 16 B persistent, confirms (1000 in flight)" 1 \
        --mode publish-only --count "$BENCH_RESTART" --confirm 1000 "${DEEP[@]}"
    stop_warren
    start_warren "$WORK/warren-deep"
    record warren W1 "restart with $BENCH_RESTART persistent messages queued" \
        recovery_ms="$(recovered_ms)" startup_ms="$WARREN_STARTED_MS"

    rest=$((BENCH_DEEP - BENCH_RESTART))
    if ((rest > 0)); then
        bench warren W2 "fill to $BENCH_DEEP × 16 B persistent, confirms" 1 \
            --mode publish-only --no-purge --count "$rest" --confirm 1000 "${DEEP[@]}"
    fi
    sleep 5
    record warren W2 "$BENCH_DEEP queued 16 B persistent messages, durable queue" \
        rss_mib="$(mib "$(rss_kib "$WARREN_PID")")" \
        data_dir_mib="$(du -sk "$WORK/warren-deep" | awk '{printf "%.1f", $1 / 1024}')"

    stop_warren
    start_warren "$WORK/warren-deep"
    sleep 2
    record warren W3 "restart with $BENCH_DEEP persistent messages queued" \
        recovery_ms="$(recovered_ms)" startup_ms="$WARREN_STARTED_MS" \
        rss_mib="$(mib "$(rss_kib "$WARREN_PID")")"

    bench warren W4 "drain the $BENCH_DEEP-message queue, acks every 100, prefetch 1000" 1 \
        --mode consume-only --drain --duration 900 "${ACKS[@]}" "${DEEP[@]}"
fi

# --- report ----------------------------------------------------------------------------------

{
    echo "Machine: $nproc_ cores, $cpu, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)."
    echo "RabbitMQ $RABBIT_VERSION (Debian) on Erlang $ERLANG_VERSION; Warren $WARREN_REV (as built at the start)."
    echo "BENCH_SECONDS=$BENCH_SECONDS, BENCH_RUNS=$BENCH_RUNS, $(date -u '+%Y-%m-%d %H:%M UTC');" \
        "load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    if [ -s "$RESULTS" ]; then
        "$BENCH" report --targets "$RESULTS"
    fi
    if [ -s "$BRIDGE_RESULTS" ]; then
        echo
        echo "Bridges: through Warren (subject) against the client library publishing directly (baseline)."
        echo
        "$BENCH" report --baseline direct --subject warren --targets "$BRIDGE_RESULTS"
    fi
} | tee "$TABLE"
log "results: $RESULTS and $TABLE"
