//! Dead-lettering (`x-dead-letter-exchange`, `x-dead-letter-routing-key`) on basic.reject and
//! basic.nack, the `x-death` history RabbitMQ writes, and a TTL-based retry topology.

mod ext_common;

use std::time::{Duration, Instant};

use ext_common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

/// work-x (direct) --job--> work --(DLX dlx, key dl-key)--> dlx (direct) --dl-key--> dlq
async fn reject_topology(ch: &lapin::Channel) {
    declare_exchange(ch, "work-x", ExchangeKind::Direct, FieldTable::default()).await;
    declare_exchange(ch, "dlx", ExchangeKind::Direct, FieldTable::default()).await;
    declare(ch, "dlq", FieldTable::default()).await;
    bind(ch, "dlq", "dlx", "dl-key").await;
    declare(
        ch,
        "work",
        table(&[
            ("x-dead-letter-exchange", ls("dlx")),
            ("x-dead-letter-routing-key", ls("dl-key")),
        ]),
    )
    .await;
    bind(ch, "work", "work-x", "job").await;
}

#[tokio::test]
async fn reject_and_nack_without_requeue_dead_letter_with_x_death() {
    let (server, conn, ch) = setup().await;
    reject_topology(&ch).await;
    let mut work = consume(&ch, "work", "worker").await;
    let mut dlq = consume(&ch, "dlq", "dead").await;

    let props = BasicProperties::default()
        .with_headers(table(&[("app-header", ls("kept"))]))
        .with_correlation_id("corr-1".into());
    publish_props(&ch, "work-x", "job", b"rejected", props).await;
    let d = next(&mut work).await;
    assert_eq!(header(&d.properties, "x-death"), None);
    within(d.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("reject");

    let dead = next(&mut dlq).await;
    assert_eq!(body(&dead), "rejected");
    assert_eq!(dead.exchange.as_str(), "dlx");
    assert_eq!(
        dead.routing_key.as_str(),
        "dl-key",
        "x-dead-letter-routing-key replaces the key"
    );
    assert!(!dead.redelivered);
    assert_header(&dead.properties, "app-header", "kept");
    assert_eq!(
        dead.properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("corr-1")
    );
    let deaths = x_death(&dead.properties);
    assert_eq!(deaths.len(), 1, "{deaths:?}");
    assert_death(
        &deaths[0],
        &Death {
            count: 1,
            reason: "rejected",
            queue: "work",
            exchange: "work-x",
            routing_keys: &["job"],
        },
    );
    assert_header(&dead.properties, "x-first-death-reason", "rejected");
    assert_header(&dead.properties, "x-first-death-queue", "work");
    assert_header(&dead.properties, "x-first-death-exchange", "work-x");
    ack(&dead).await;

    // basic.nack with requeue=false does the same, for every message `multiple` covers.
    publish(&ch, "work-x", "job", "n1").await;
    publish(&ch, "work-x", "job", "n2").await;
    let _first = next(&mut work).await;
    let second = next(&mut work).await;
    within(second.nack(BasicNackOptions {
        multiple: true,
        requeue: false,
    }))
    .await
    .expect("nack");
    for want in ["n1", "n2"] {
        let dead = next(&mut dlq).await;
        assert_eq!(body(&dead), want, "dead letters keep their order");
        let deaths = x_death(&dead.properties);
        assert_eq!(deaths.len(), 1);
        assert_eq!(deaths[0].inner().get("reason"), Some(&ls("rejected")));
        assert_eq!(deaths[0].inner().get("queue"), Some(&ls("work")));
        ack(&dead).await;
    }

    // requeue=true does not dead-letter: the message comes back to the same queue.
    publish(&ch, "work-x", "job", "again").await;
    let d = next(&mut work).await;
    within(d.reject(BasicRejectOptions { requeue: true }))
        .await
        .expect("reject requeue");
    let d = next(&mut work).await;
    assert_eq!(body(&d), "again");
    assert!(d.redelivered);
    ack(&d).await;
    assert_no_delivery(&mut dlq).await;
    finish(server, conn).await;
}

#[tokio::test]
async fn default_exchange_as_dlx_and_missing_dlx() {
    let (server, conn, ch) = setup().await;
    // The common pattern: DLX "" with the dead-letter queue's name as routing key.
    declare(&ch, "plain-dlq", FieldTable::default()).await;
    declare(
        &ch,
        "src",
        table(&[
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls("plain-dlq")),
        ]),
    )
    .await;
    publish(&ch, "", "src", "to-default").await;
    let m = get_acked(&ch, "src").await;
    within(m.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("reject");
    let dead = get(&ch, "plain-dlq")
        .await
        .expect("dead-lettered through the default exchange");
    assert_eq!(body(&dead.delivery), "to-default");
    assert_eq!(dead.delivery.exchange.as_str(), "");
    assert_eq!(dead.delivery.routing_key.as_str(), "plain-dlq");
    assert_death(
        &x_death(&dead.delivery.properties)[0],
        &Death {
            count: 1,
            reason: "rejected",
            queue: "src",
            exchange: "",
            routing_keys: &["src"],
        },
    );

    // A DLX that does not exist: RabbitMQ drops the message, the channel carries on.
    declare(
        &ch,
        "orphan",
        table(&[("x-dead-letter-exchange", ls("no-such-x"))]),
    )
    .await;
    publish(&ch, "", "orphan", "lost").await;
    let m = get_acked(&ch, "orphan").await;
    within(m.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("reject");
    assert_eq!(message_count(&ch, "orphan").await, 0);
    assert!(ch.status().connected());

    // x-dead-letter-routing-key without x-dead-letter-exchange is refused at declare.
    let bad = channel(&conn).await;
    let text = expect_code(
        within(bad.queue_declare(
            "dlrk-only".into(),
            QueueDeclareOptions::default(),
            table(&[("x-dead-letter-routing-key", ls("k"))]),
        ))
        .await,
        406,
    );
    assert_eq!(
        text,
        "PRECONDITION_FAILED - invalid arg 'x-dead-letter-routing-key' for queue 'dlrk-only' in \
         vhost '/': routing_key_but_no_dlx_defined"
    );
    finish(server, conn).await;
}

/// basic.get without auto-ack, for reject/nack.
async fn get_acked(ch: &lapin::Channel, queue: &str) -> lapin::message::Delivery {
    within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
        .unwrap_or_else(|| panic!("{queue} is empty"))
        .delivery
}

/// The classic retry pattern: a rejected job goes to a delay queue whose TTL sends it back to
/// the work exchange; each round adds to the x-death counts.
#[tokio::test]
async fn retry_topology_through_a_delay_queue() {
    let (server, conn, ch) = setup().await;
    declare_exchange(
        &ch,
        "retry.work-x",
        ExchangeKind::Direct,
        FieldTable::default(),
    )
    .await;
    declare_exchange(
        &ch,
        "retry.dlx",
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await;
    declare(
        &ch,
        "retry.work",
        table(&[("x-dead-letter-exchange", ls("retry.dlx"))]),
    )
    .await;
    bind(&ch, "retry.work", "retry.work-x", "job").await;
    declare(
        &ch,
        "retry.delay",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(200)),
            ("x-dead-letter-exchange", ls("retry.work-x")),
        ]),
    )
    .await;
    bind(&ch, "retry.delay", "retry.dlx", "").await;
    let mut work = consume(&ch, "retry.work", "worker").await;

    publish(&ch, "retry.work-x", "job", "task").await;
    let first = next(&mut work).await;
    assert_eq!(header(&first.properties, "x-death"), None);

    // Round one.
    let rejected_at = Instant::now();
    within(first.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("reject");
    let back = next(&mut work).await;
    let waited = rejected_at.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "the message should have waited out the delay queue's TTL, came back after {waited:?}"
    );
    assert_eq!(body(&back), "task");
    assert_eq!(back.exchange.as_str(), "retry.work-x");
    assert_eq!(back.routing_key.as_str(), "job");
    assert!(!back.redelivered, "a dead-lettered copy is a new message");
    let deaths = x_death(&back.properties);
    assert_eq!(deaths.len(), 2, "{deaths:?}");
    assert_death(
        &deaths[0],
        &Death {
            count: 1,
            reason: "expired",
            queue: "retry.delay",
            exchange: "retry.dlx",
            routing_keys: &["job"],
        },
    );
    assert_death(
        &deaths[1],
        &Death {
            count: 1,
            reason: "rejected",
            queue: "retry.work",
            exchange: "retry.work-x",
            routing_keys: &["job"],
        },
    );
    assert_header(&back.properties, "x-first-death-reason", "rejected");
    assert_header(&back.properties, "x-first-death-queue", "retry.work");
    assert_header(&back.properties, "x-first-death-exchange", "retry.work-x");

    let first_times: Vec<_> = deaths
        .iter()
        .map(|d| d.inner().get("time").cloned())
        .collect();

    // Round two: the entries for (queue, reason) are merged, their counts incremented.
    within(back.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("reject again");
    let again = next(&mut work).await;
    let deaths = x_death(&again.properties);
    assert_eq!(
        deaths.len(),
        2,
        "entries merge by queue and reason: {deaths:?}"
    );
    assert_death(
        &deaths[0],
        &Death {
            count: 2,
            reason: "expired",
            queue: "retry.delay",
            exchange: "retry.dlx",
            routing_keys: &["job"],
        },
    );
    assert_death(
        &deaths[1],
        &Death {
            count: 2,
            reason: "rejected",
            queue: "retry.work",
            exchange: "retry.work-x",
            routing_keys: &["job"],
        },
    );
    let times: Vec<_> = deaths
        .iter()
        .map(|d| d.inner().get("time").cloned())
        .collect();
    assert_eq!(
        times, first_times,
        "a merged entry keeps the time of its first death"
    );
    // The first death stays the first.
    assert_header(&again.properties, "x-first-death-reason", "rejected");
    assert_header(&again.properties, "x-first-death-queue", "retry.work");
    assert_header(&again.properties, "x-first-death-exchange", "retry.work-x");

    ack(&again).await;
    assert_no_delivery(&mut work).await;
    assert_eq!(message_count(&ch, "retry.delay").await, 0);
    finish(server, conn).await;
}

/// RabbitMQ drops a dead letter that would go round a cycle of queues with no rejection in it
/// (the x-death entries up to the target queue's own); a rejection earlier in the message's
/// history does not make a later TTL ping-pong legitimate.
#[tokio::test]
async fn automatic_dead_letter_cycles_are_dropped() {
    let (server, conn, ch) = setup().await;
    let dl_to = |target: &str, ttl: Option<i32>| {
        let mut pairs = vec![
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls(target)),
        ];
        if let Some(ms) = ttl {
            pairs.push(("x-message-ttl", AMQPValue::LongInt(ms)));
        }
        table(&pairs)
    };
    // A rejects into B; B and C expire into each other.
    declare(&ch, "cy.a", dl_to("cy.b", None)).await;
    declare(&ch, "cy.b", dl_to("cy.c", Some(100))).await;
    declare(&ch, "cy.c", dl_to("cy.b", Some(100))).await;
    publish(&ch, "", "cy.a", "loop").await;
    let m = get_acked(&ch, "cy.a").await;
    within(m.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("reject");
    // B (100 ms) -> C (100 ms) -> back to B is a cycle of expiries: dropped there.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        message_count(&ch, "cy.b").await,
        0,
        "still cycling through cy.b"
    );
    assert_eq!(
        message_count(&ch, "cy.c").await,
        0,
        "still cycling through cy.c"
    );

    // A queue dead-lettering expired messages into itself is the shortest such cycle.
    declare(&ch, "cy.self", dl_to("cy.self", Some(100))).await;
    publish(&ch, "", "cy.self", "self").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(message_count(&ch, "cy.self").await, 0);
    finish(server, conn).await;
}
