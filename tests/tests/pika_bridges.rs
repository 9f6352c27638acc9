//! pika through Warren's MQTT and Redis Streams bridges, across a restart of the broker: runs
//! `tests/interop/pika_bridges.py` against an in-process Warren whose configuration routes
//! exchange `pika-e2e` to the bridge and feeds queue `pika-e2e-in` from the same topic root /
//! stream key, so every message goes pika → Warren → broker → Warren → pika. The script
//! publishes with confirms, restarts the broker halfway (`scripts/mosquitto.sh restart`,
//! `scripts/redis.sh restart`) and checks that every confirmed message came back with its
//! properties and headers.
//!
//! Needs `WARREN_TEST_MQTT_URL` / `WARREN_TEST_REDIS_URL` (scripts/test.sh starts the brokers)
//! and the pika virtualenv (`warren_tests::interop_python`); fails loudly without them.

use std::fs::File;
use std::time::Duration;

use warren_gateway::plan::build_plan;

/// The script takes a few seconds; this only stops a hang from stalling the suite.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

fn env_url(var: &str, script: &str) -> String {
    warren_tests::broker_url(var, script, "broker")
}

/// The broker's test lock, exclusive: this test restarts it (shared with the bridge tests).
fn exclusive_lock(dir: &str) -> File {
    warren_tests::broker_lock(dir, true)
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Runs Warren with `backend` (the YAML of one backend named `target`), exchange `pika-e2e`
/// routed to `root` and queue `pika-e2e-in` fed from it, then the pika script.
async fn run(backend: &str, root: &str, script: &str, typed_headers: bool) -> String {
    let yaml = format!(
        "backends:\n  target:\n{backend}\n\
         routes:\n  - match: {{exchange: pika-e2e, routing_key: \"#\"}}\n    backend: target\n    \
         destination: {root}\n    mode: forward\n\
         queues:\n  - name: pika-e2e-in\n    backend: target\n    source: {root}\n    \
         prefetch: 100\n"
    );
    let cfg = warren_config::parse_with_env(&yaml, "pika-bridges.yaml", |_| None)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let plan = build_plan(&cfg, warren_bridges::build).expect("backends");
    let warren = warren_tests::start_server_with_plan(plan);
    // Let the queue mapping subscribe before anything is published.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restart = format!(
        "{} restart",
        warren_tests::workspace_root().join(script).display()
    );
    let mut args = vec![
        "--exchange",
        "pika-e2e",
        "--queue",
        "pika-e2e-in",
        "--count",
        "600",
        "--restart-cmd",
        restart.as_str(),
    ];
    if typed_headers {
        args.push("--typed-headers");
    }
    let stdout = warren_tests::run_interop_script_with_args(
        "tests/interop/pika_bridges.py",
        &warren,
        &args,
        SCRIPT_TIMEOUT,
    )
    .await;
    warren.shutdown().await;
    print!("{stdout}");
    stdout
}

const RETRY: &str = "    retry: {max_attempts: 0, initial_backoff_ms: 50, max_backoff_ms: 500}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_through_mqtt5_survives_a_broker_restart() {
    let _lock = exclusive_lock("mosquitto");
    let url = env_url("WARREN_TEST_MQTT_URL", "mosquitto");
    let backend = format!(
        "    type: mqtt\n    url: {url}\n    client_id: {}\n{RETRY}",
        unique("pika-e2e")
    );
    let out = run(&backend, &unique("pika-e2e"), "scripts/mosquitto.sh", false).await;
    assert!(
        out.contains("OK: every confirmed message received"),
        "{out}"
    );
}

/// MQTT 3.1.1 carries no properties: with `envelope: true` they travel inside the payload,
/// headers with their AMQP types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_through_mqtt311_with_envelope_survives_a_broker_restart() {
    let _lock = exclusive_lock("mosquitto");
    let url = env_url("WARREN_TEST_MQTT_URL", "mosquitto");
    let backend = format!(
        "    type: mqtt\n    url: {url}\n    protocol: \"3.1.1\"\n    envelope: true\n    \
         client_id: {}\n{RETRY}",
        unique("pika-e2e")
    );
    let out = run(&backend, &unique("pika-e2e"), "scripts/mosquitto.sh", true).await;
    assert!(
        out.contains("OK: every confirmed message received"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_through_redis_streams_survives_a_server_restart() {
    let _lock = exclusive_lock("redis");
    let url = env_url("WARREN_TEST_REDIS_URL", "redis");
    let backend = format!(
        "    type: redis\n    url: {url}\n    block_ms: 200\n    consumer: {}\n{RETRY}",
        unique("pika-e2e")
    );
    let out = run(&backend, &unique("pika-e2e"), "scripts/redis.sh", false).await;
    assert!(
        out.contains("OK: every confirmed message received"),
        "{out}"
    );
}
