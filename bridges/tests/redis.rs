//! The Redis Streams bridge against a real Redis.
//!
//! Needs `WARREN_TEST_REDIS_URL`: `scripts/test.sh` starts a private server with
//! `scripts/redis.sh start` (port 6389, `appendonly yes`, `appendfsync always`) and exports it.
//! By hand:
//!
//! ```sh
//! scripts/redis.sh start
//! WARREN_TEST_REDIS_URL=$(scripts/redis.sh url) cargo test -p warren-bridges --test redis
//! scripts/redis.sh stop
//! ```
//!
//! Every test fails (never skips) when the variable is unset or Redis unreachable. The restart
//! test restarts the server with `scripts/redis.sh restart`; a file lock keeps the other tests
//! off it meanwhile.
#![cfg(feature = "redis")]

mod support;

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use warren_backends::{Backend, Health, Settlement};
use warren_bridges::redis::RedisBridge;
use warren_config::file::{RedisBackend, RetryConfig};

fn url() -> String {
    support::env_url("WARREN_TEST_REDIS_URL", "redis", "Redis")
}

fn server_lock(exclusive: bool) -> File {
    support::broker_lock("redis", exclusive)
}

async fn client() -> MultiplexedConnection {
    support::init_logs();
    let url = url();
    let client = redis::Client::open(url.as_str()).unwrap();
    match client.get_multiplexed_async_connection().await {
        Ok(c) => c,
        Err(e) => {
            panic!("Redis at {url} is unreachable: {e} (is `scripts/redis.sh start` running?)")
        }
    }
}

fn config() -> RedisBackend {
    RedisBackend {
        url: url(),
        maxlen: None,
        group: "warren".into(),
        consumer: "warren".into(),
        block_ms: 200,
        dead_letter_stream: None,
        max_deliveries: 10,
        claim_idle_ms: 30_000,
        ca_file: None,
        retry: RetryConfig {
            max_attempts: 0,
            initial_backoff_ms: 50,
            max_backoff_ms: 500,
        },
    }
}

use support::{broker_script, message, missing_bodies, next, unique, wait_until, Outcomes};

fn full_properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    support::full_properties(headers)
}

async fn range(conn: &mut MultiplexedConnection, stream: &str) -> StreamRangeReply {
    redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap()
}

fn field(map: &HashMap<String, redis::Value>, name: &str) -> Option<Vec<u8>> {
    match map.get(name)? {
        redis::Value::BulkString(b) => Some(b.clone()),
        other => panic!("field {name}: {other:?}"),
    }
}

async fn pending(conn: &mut MultiplexedConnection, stream: &str, group: &str) -> usize {
    let reply: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    reply.count()
}

#[tokio::test]
async fn publishes_become_entries_and_entries_come_back_as_messages() {
    let _lock = server_lock(false);
    let mut conn = client().await;
    let stream = unique("roundtrip");
    let bridge = RedisBridge::start("redis", &config()).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let props = full_properties();
    bridge.publish(
        &stream,
        message("a.b", props.clone(), &b"{\"n\":1}"[..]),
        outcomes.guard(0),
    );
    bridge.publish(
        &stream,
        message("a.c", BasicProperties::default(), &b"plain"[..]),
        outcomes.guard(1),
    );
    outcomes.wait_done(2, Duration::from_secs(10)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    assert_eq!(bridge.depth(&stream).await.unwrap(), Some(2));
    bridge.declare(&stream).await.unwrap();

    // The entries as Redis holds them.
    let entries = range(&mut conn, &stream).await.ids;
    assert_eq!(entries.len(), 2);
    let e = &entries[0].map;
    assert_eq!(field(e, "body").unwrap(), b"{\"n\":1}");
    assert_eq!(field(e, "routing_key").unwrap(), b"a.b");
    assert_eq!(field(e, "content_type").unwrap(), b"application/json");
    assert_eq!(field(e, "correlation_id").unwrap(), b"corr-1");
    assert_eq!(field(e, "delivery_mode").unwrap(), b"2");
    assert_eq!(field(e, "h.tenant").unwrap(), b"acme");
    assert_eq!(entries[1].map.len(), 2, "only body and routing_key");

    // A foreign entry with only a body.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("body")
        .arg("foreign")
        .query_async(&mut conn)
        .await
        .unwrap();

    // And back through a subscription.
    let mut sub = bridge.subscribe(&stream, 10).await.unwrap();
    let first = next(&mut sub).await;
    assert!(!first.redelivered);
    assert_eq!(first.message.body(), b"{\"n\":1}");
    assert_eq!(first.message.routing_key(), "a.b");
    assert_eq!(first.message.properties(), props);
    let second = next(&mut sub).await;
    assert_eq!(second.message.body(), b"plain");
    assert_eq!(second.message.properties(), BasicProperties::default());
    let third = next(&mut sub).await;
    assert_eq!(third.message.body(), b"foreign");
    assert_eq!(third.message.routing_key(), stream.as_str());
    assert_eq!(pending(&mut conn, &stream, "warren").await, 3);
    for m in [first, second, third] {
        m.settle.settle(Settlement::Ack);
    }
    wait_until(
        "acks never reached Redis",
        Duration::from_secs(5),
        async || pending(&mut conn, &stream, "warren").await == 0,
    )
    .await;
    assert_eq!(bridge.health(), Health::Ready);
    bridge.close().await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn maxlen_trims_approximately() {
    let _lock = server_lock(false);
    let mut conn = client().await;
    let stream = unique("maxlen");
    let mut cfg = config();
    cfg.maxlen = Some(10);
    let bridge = RedisBridge::start("redis", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    for i in 0..1000 {
        bridge.publish(
            &stream,
            message("k", BasicProperties::default(), format!("{i}")),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(1000, Duration::from_secs(10)).await;
    let len: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((10..1000).contains(&len), "length {len}");
    bridge.close().await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn requeue_redelivers_reject_and_too_many_deliveries_dead_letter() {
    let _lock = server_lock(false);
    let mut conn = client().await;
    let stream = unique("settle");
    let dlq = format!("{stream}.dlq");
    let mut cfg = config();
    cfg.dead_letter_stream = Some(dlq.clone());
    cfg.max_deliveries = 2;
    let bridge = RedisBridge::start("redis", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    for (i, body) in ["requeued", "rejected"].iter().enumerate() {
        bridge.publish(
            &stream,
            message("k", BasicProperties::default(), body.as_bytes().to_vec()),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(2, Duration::from_secs(10)).await;
    let mut sub = bridge.subscribe(&stream, 10).await.unwrap();
    let a = next(&mut sub).await;
    let b = next(&mut sub).await;
    assert_eq!(a.message.body(), b"requeued");
    assert_eq!(b.message.body(), b"rejected");
    b.settle.settle(Settlement::Reject);
    a.settle.settle(Settlement::Requeue);
    // Second delivery (count 2 = max_deliveries): delivered again.
    let again = next(&mut sub).await;
    assert!(again.redelivered);
    assert_eq!(again.message.body(), b"requeued");
    // Requeued once more: a third delivery would exceed 2, so it is dead-lettered.
    again.settle.settle(Settlement::Requeue);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let len: usize = redis::cmd("XLEN")
            .arg(&dlq)
            .query_async(&mut conn)
            .await
            .unwrap();
        if len == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead-letter stream has {len} entries"
        );
        // Drive the subscription (it claims requeued entries when asked for more).
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
            panic!("unexpected delivery: {:?}", m.message.body());
        }
    }
    let dead = range(&mut conn, &dlq).await.ids;
    assert_eq!(field(&dead[0].map, "body").unwrap(), b"rejected");
    assert_eq!(
        field(&dead[0].map, "h.x-dead-letter-reason").unwrap(),
        b"rejected"
    );
    assert_eq!(
        field(&dead[0].map, "h.x-dead-letter-stream").unwrap(),
        stream.as_bytes()
    );
    assert_eq!(field(&dead[1].map, "body").unwrap(), b"requeued");
    assert_eq!(
        field(&dead[1].map, "h.x-dead-letter-reason").unwrap(),
        b"max_deliveries"
    );
    assert_eq!(pending(&mut conn, &stream, "warren").await, 0);
    bridge.close().await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .arg(&dlq)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn pending_entries_are_delivered_again_after_a_restart_and_reclaimed_from_dead_consumers() {
    let _lock = server_lock(false);
    let mut conn = client().await;
    let stream = unique("pending");
    let outcomes = Arc::new(Outcomes::default());
    // A first Warren takes two entries and dies without settling them.
    let first = RedisBridge::start("redis", &config()).unwrap();
    for i in 0..2 {
        first.publish(
            &stream,
            message("k", BasicProperties::default(), format!("m{i}")),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(2, Duration::from_secs(10)).await;
    let mut sub = first.subscribe(&stream, 10).await.unwrap();
    let a = next(&mut sub).await;
    let b = next(&mut sub).await;
    first.close().await;
    // Settling after close cannot reach Redis: both stay pending.
    std::mem::forget(a);
    std::mem::forget(b);
    drop(sub);
    assert_eq!(pending(&mut conn, &stream, "warren").await, 2);

    // Restarted with the same consumer name: its own pending entries come first.
    let second = RedisBridge::start("redis", &config()).unwrap();
    let mut sub = second.subscribe(&stream, 10).await.unwrap();
    let a = next(&mut sub).await;
    assert!(a.redelivered);
    assert_eq!(a.message.body(), b"m0");
    a.settle.settle(Settlement::Ack);
    let b = next(&mut sub).await;
    assert_eq!(b.message.body(), b"m1");
    // The ack is sent in the background; a close before it lands would leave m0 pending
    // (delivered again later: at least once).
    wait_until(
        "ack never reached Redis",
        Duration::from_secs(5),
        async || pending(&mut conn, &stream, "warren").await == 1,
    )
    .await;
    second.close().await;
    std::mem::forget(b);
    drop(sub);

    // Another consumer name reclaims the entry left idle at the dead one (XAUTOCLAIM).
    let mut cfg = config();
    cfg.consumer = "other".into();
    cfg.claim_idle_ms = 200;
    let third = RedisBridge::start("redis", &cfg).unwrap();
    let mut sub = third.subscribe(&stream, 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let b = next(&mut sub).await;
    assert!(b.redelivered);
    assert_eq!(b.message.body(), b"m1");
    b.settle.settle(Settlement::Ack);
    wait_until(
        "ack never reached Redis",
        Duration::from_secs(5),
        async || pending(&mut conn, &stream, "warren").await == 0,
    )
    .await;
    third.close().await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Redis runs with `appendonly yes` + `appendfsync always` (scripts/redis.sh): a reply to XADD
/// means the entry is on disk, so no confirmed message may be missing after the restart.
#[tokio::test]
async fn a_redis_restart_loses_no_confirmed_message() {
    let _lock = server_lock(true);
    let conn = client().await;
    let stream = unique("restart");
    let bridge = RedisBridge::start("redis", &config()).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let mut sent = 0usize;
    let mut burst = |n: usize| {
        for _ in 0..n {
            bridge.publish(
                &stream,
                message("k", BasicProperties::default(), format!("{sent}")),
                outcomes.guard(sent),
            );
            sent += 1;
        }
    };
    for _ in 0..10 {
        burst(100);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let restart = tokio::task::spawn_blocking(|| broker_script("redis", &["restart"]));
    while !restart.is_finished() {
        burst(50);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    restart.await.unwrap();
    for _ in 0..10 {
        burst(50);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let confirmed = outcomes.all_confirmed(sent, Duration::from_secs(30)).await;

    let mut conn2 = client().await;
    drop(conn);
    let entries = range(&mut conn2, &stream).await.ids;
    let bodies: std::collections::HashSet<String> = entries
        .iter()
        .map(|e| String::from_utf8(field(&e.map, "body").unwrap()).unwrap())
        .collect();
    let missing = missing_bodies(&confirmed, &bodies);
    assert!(missing.is_empty(), "confirmed but missing: {missing:?}");
    let stats = bridge.stats();
    assert!(
        stats.connections.load(Ordering::Relaxed) >= 2,
        "never reconnected"
    );
    println!(
        "restart: {sent} published, {} entries (duplicates from resends: {}), {} resent",
        entries.len(),
        entries.len() - bodies.len(),
        stats.resent.load(Ordering::Relaxed)
    );
    bridge.close().await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn2)
        .await
        .unwrap();
}

/// `rediss://` to the server's TLS port, trusting the test CA: publish and consume through
/// TLS, the entries checked over the plain port. The same bridge trusting an unrelated CA
/// never connects: the server's certificate is verified.
#[tokio::test]
async fn rediss_with_a_ca_file_publishes_and_consumes_and_checks_the_certificate() {
    let _lock = server_lock(false);
    let mut conn = client().await;
    let (tls_url, ca_file) =
        support::tls_env("WARREN_TEST_REDISS_URL", "WARREN_TEST_REDIS_CA", "redis");
    let stream = unique("tls");
    let cfg = RedisBackend {
        url: tls_url.clone(),
        ca_file: Some(ca_file.clone()),
        ..config()
    };
    let bridge = RedisBridge::start("redis-tls", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    for i in 0..20 {
        bridge.publish(
            &stream,
            message("k", full_properties(), format!("tls-{i}")),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(20, Duration::from_secs(10)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "failed over TLS: {failed:?}");
    let entries = range(&mut conn, &stream).await.ids;
    assert_eq!(entries.len(), 20);
    assert_eq!(field(&entries[3].map, "body").unwrap(), b"tls-3");
    assert_eq!(field(&entries[3].map, "h.tenant").unwrap(), b"acme");

    let mut sub = bridge.subscribe(&stream, 10).await.unwrap();
    for i in 0..20 {
        let m = next(&mut sub).await;
        assert_eq!(m.message.body(), format!("tls-{i}").as_bytes());
        assert_eq!(m.message.properties(), full_properties());
        m.settle.settle(Settlement::Ack);
    }
    wait_until(
        "acks never reached Redis over TLS",
        Duration::from_secs(5),
        async || pending(&mut conn, &stream, "warren").await == 0,
    )
    .await;
    assert_eq!(bridge.health(), Health::Ready);
    bridge.close().await;

    // Trusting another CA: the handshake fails, every attempt, and the message is nacked.
    let other_ca = std::path::Path::new(&ca_file).with_file_name("other-ca.pem");
    let cfg = RedisBackend {
        url: tls_url,
        ca_file: Some(other_ca.to_string_lossy().into_owned()),
        retry: RetryConfig {
            max_attempts: 2,
            initial_backoff_ms: 50,
            max_backoff_ms: 100,
        },
        ..config()
    };
    let bridge = RedisBridge::start("redis-tls-untrusted", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        &stream,
        message("k", BasicProperties::default(), "never"),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(20)).await;
    assert!(outcomes.confirmed.lock().unwrap().is_empty());
    match bridge.health() {
        Health::Degraded(reason) => assert!(
            reason.to_lowercase().contains("certificate"),
            "not a certificate error: {reason}"
        ),
        other => panic!("an untrusted server must not be Ready: {other:?}"),
    }
    bridge.close().await;
    assert_eq!(range(&mut conn, &stream).await.ids.len(), 20);

    // A CA file that does not exist is refused at start.
    let cfg = RedisBackend {
        url: "rediss://127.0.0.1:1".into(),
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..config()
    };
    let err = RedisBridge::start("redis-tls-missing", &cfg)
        .err()
        .expect("a missing ca_file is a configuration error");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
}
