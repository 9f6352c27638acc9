//! pika through Warren's AMQP 1.0 bridge with the messages stored in RabbitMQ (the private test
//! node of `scripts/rabbitmq.sh`, whose `rabbitmq_amqp1_0` plugin speaks AMQP 1.0 on the same
//! port): runs `tests/interop/pika_amqp10.py` against an in-process Warren that routes exchange
//! `pika-amqp10` to the address `/amq/queue/MAIN` and feeds its queue `pika-amqp10-in` from that
//! same address (and `pika-amqp10-dlq` from `/amq/queue/DLQ`, MAIN's dead-letter queue), so every
//! message goes pika → Warren → AMQP 1.0 → RabbitMQ → AMQP 1.0 → Warren → pika.
//!
//! Checked: publisher confirms and every basic property and header type intact both ways;
//! requeue (the message comes back redelivered); reject → RabbitMQ's dead-letter queue, read
//! back through Warren with its properties; RabbitMQ restarted mid-stream under confirms with
//! no confirmed message lost.
//!
//! Needs `WARREN_TEST_RABBITMQ_URL` (scripts/test.sh starts the node and sets it) and the pika
//! virtualenv (`warren_tests::interop_python`); fails loudly without them.

use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};
use warren_gateway::plan::build_plan;

/// The script takes a few seconds (the restart about twenty); this only stops a hang from
/// stalling the suite.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(200);

const EXCHANGE: &str = "pika-amqp10";
const QUEUE: &str = "pika-amqp10-in";
const DLQ_QUEUE: &str = "pika-amqp10-dlq";

fn rabbit_url() -> String {
    warren_tests::broker_url(
        "WARREN_TEST_RABBITMQ_URL",
        "rabbitmq",
        "RabbitMQ with the rabbitmq_amqp1_0 plugin",
    )
}

/// The AMQP 1.0 URL of the same listener: the 0-9-1 URL without its vhost path.
fn amqp10_url(rabbit: &str) -> String {
    let rest = rabbit.split_once("://").map_or(rabbit, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("amqp://{authority}")
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{prefix}.{}.{nanos}", std::process::id())
}

async fn rabbit_channel(url: &str) -> (Connection, Channel) {
    let conn = tokio::time::timeout(
        Duration::from_secs(20),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connecting to RabbitMQ timed out")
    .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ at {url}: {e}"));
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Declares the durable RabbitMQ queues: `main`, dead-lettering to `dlq` when there is one.
async fn declare_queues(ch: &Channel, main: &str, dlq: Option<&str>) {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = FieldTable::default();
    if let Some(dlq) = dlq {
        ch.queue_declare(dlq.into(), durable, FieldTable::default())
            .await
            .expect("declare the dead-letter queue");
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(dlq)),
        );
    }
    ch.queue_declare(main.into(), durable, args)
        .await
        .expect("declare the main queue");
}

/// Deletes the queues on a fresh connection (the node may have restarted since declaring).
async fn delete_queues(rabbit: &str, queues: &[&str]) {
    let (_conn, ch) = rabbit_channel(rabbit).await;
    for q in queues {
        ch.queue_delete((*q).into(), QueueDeleteOptions::default())
            .await
            .unwrap_or_else(|e| panic!("delete {q}: {e}"));
    }
}

/// Runs Warren with the AMQP 1.0 bridge on `main` (and `dlq`), then the pika script with `args`.
async fn run(rabbit: &str, main: &str, dlq: Option<&str>, args: &[&str]) -> String {
    let mut yaml = format!(
        "backends:\n  rabbit:\n    type: amqp10\n    url: {url}\n    target: rabbitmq\n    \
         retry: {{max_attempts: 0, initial_backoff_ms: 50, max_backoff_ms: 500}}\n\
         routes:\n  - match: {{exchange: {EXCHANGE}, routing_key: \"#\"}}\n    backend: rabbit\n    \
         destination: /amq/queue/{main}\n    mode: forward\n\
         queues:\n  - name: {QUEUE}\n    backend: rabbit\n    source: /amq/queue/{main}\n    \
         prefetch: 100\n",
        url = amqp10_url(rabbit),
    );
    if let Some(dlq) = dlq {
        yaml.push_str(&format!(
            "  - name: {DLQ_QUEUE}\n    backend: rabbit\n    source: /amq/queue/{dlq}\n    \
             prefetch: 10\n"
        ));
    }
    let cfg = warren_config::parse_with_env(&yaml, "pika-amqp10.yaml", |_| None)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let plan = build_plan(&cfg, warren_bridges::build).expect("backends");
    let warren = warren_tests::start_server_with_plan(plan);
    let mut all = vec![
        "--exchange",
        EXCHANGE,
        "--queue",
        QUEUE,
        "--rabbitmq-url",
        rabbit,
        "--main-queue",
        main,
    ];
    if let Some(dlq) = dlq {
        all.extend(["--dlq-queue", DLQ_QUEUE, "--dlq", dlq]);
    }
    all.extend(args);
    let stdout = warren_tests::run_interop_script_with_args(
        "tests/interop/pika_amqp10.py",
        &warren,
        &all,
        SCRIPT_TIMEOUT,
    )
    .await;
    warren.shutdown().await;
    print!("{stdout}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_confirms_properties_requeue_and_dead_letters_through_amqp10() {
    let _lock = warren_tests::broker_lock("rabbitmq", false);
    let rabbit = rabbit_url();
    let (main, dlq) = (unique("pika-amqp10"), unique("pika-amqp10.dlq"));
    {
        let (_conn, ch) = rabbit_channel(&rabbit).await;
        declare_queues(&ch, &main, Some(&dlq)).await;
    }
    let out = run(
        &rabbit,
        &main,
        Some(&dlq),
        &[
            "--checks",
            "properties,requeue,dead_letter",
            "--count",
            "300",
        ],
    )
    .await;
    assert!(out.contains("all 3 pika AMQP 1.0 checks passed"), "{out}");
    delete_queues(&rabbit, &[&main, &dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_through_amqp10_survives_a_rabbitmq_restart() {
    // Exclusive: this test restarts the node the other RabbitMQ tests use.
    let _lock = warren_tests::broker_lock("rabbitmq", true);
    let rabbit = rabbit_url();
    let main = unique("pika-amqp10.restart");
    {
        let (_conn, ch) = rabbit_channel(&rabbit).await;
        declare_queues(&ch, &main, None).await;
    }
    let restart = format!(
        "{} restart",
        warren_tests::workspace_root()
            .join("scripts/rabbitmq.sh")
            .display()
    );
    let out = run(
        &rabbit,
        &main,
        None,
        &[
            "--checks",
            "restart",
            "--count",
            "400",
            "--restart-cmd",
            restart.as_str(),
        ],
    )
    .await;
    assert!(out.contains("all 1 pika AMQP 1.0 checks passed"), "{out}");
    delete_queues(&rabbit, &[&main]).await;
}
