//! The MQTT bridge against a real broker (Mosquitto).
//!
//! Needs `WARREN_TEST_MQTT_URL`: `scripts/test.sh` starts a private broker with
//! `scripts/mosquitto.sh start` (port 1889, `persistence true`) and exports it. Every test fails
//! (never skips) without it. The restart test restarts the broker; a file lock keeps the other
//! tests off it meanwhile.
#![cfg(feature = "mqtt")]

mod support;

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use warren_backends::{Backend, Settlement};
use warren_bridges::mqtt::MqttBridge;
use warren_config::file::{MqttBackend, RetryConfig};

fn url() -> String {
    support::env_url("WARREN_TEST_MQTT_URL", "mosquitto", "MQTT broker")
}

fn host_port() -> (String, u16) {
    let u = url();
    let rest = u.strip_prefix("mqtt://").expect("mqtt:// URL");
    let (h, p) = rest.rsplit_once(':').expect("host:port");
    (
        h.to_string(),
        p.trim_end_matches('/').parse().expect("port"),
    )
}

fn broker_lock(exclusive: bool) -> File {
    support::broker_lock("mosquitto", exclusive)
}

fn config(client_id: &str) -> MqttBackend {
    MqttBackend {
        url: url(),
        protocol: "5".into(),
        client_id: client_id.into(),
        topic_prefix: String::new(),
        username: None,
        password: None,
        keep_alive_secs: 30,
        ca_file: None,
        envelope: false,
        retry: RetryConfig {
            max_attempts: 0,
            initial_backoff_ms: 50,
            max_backoff_ms: 500,
        },
    }
}

/// The bridge speaking MQTT 3.1.1, without envelope.
fn config_311(client_id: &str) -> MqttBackend {
    MqttBackend {
        protocol: "3.1.1".into(),
        ..config(client_id)
    }
}

/// A plain MQTT 3.1.1 client, as [`raw_client`].
async fn raw_client_311(
    id: &str,
    subscribe: Option<&str>,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
) {
    let (host, port) = host_port();
    let opts = rumqttc::MqttOptions::new(id, host, port);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1000);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let subscribing = subscribe.is_some();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) if !subscribing => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    if let Some(filter) = subscribe {
        client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .unwrap_or_else(|_| panic!("MQTT broker at {} did not answer (3.1.1)", url()))
        .unwrap();
    (client, rx)
}

/// A plain MQTT 5 client, its event loop polled in the background; received publishes come
/// out of the returned channel.
async fn raw_client(
    id: &str,
    subscribe: Option<&str>,
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
) {
    let (host, port) = host_port();
    let opts = MqttOptions::new(id, host, port);
    let (client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(opts, 1000);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(Event::Incoming(Packet::SubAck(_)))
                | Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    if let Some(filter) = subscribe {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .unwrap_or_else(|_| panic!("MQTT broker at {} did not answer", url()))
        .unwrap();
    // Let the SUBACK arrive after the CONNACK.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (client, rx)
}

use support::{broker_script, message, next, unique_dashed as unique, Outcomes};

#[tokio::test]
async fn publishes_arrive_as_topics_with_properties() {
    let _lock = broker_lock(false);
    let root = unique("out");
    let (_raw, mut rx) = raw_client(&unique("raw"), Some(&format!("{root}/#"))).await;
    let bridge = MqttBridge::start("mqtt", &config(&unique("bridge"))).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies/1".into())
        .with_headers(headers);
    bridge.publish(&root, message("a.b", props, &b"{}"[..]), outcomes.guard(0));
    bridge.publish(
        &root,
        message("c", BasicProperties::default(), &b"plain"[..]),
        outcomes.guard(1),
    );
    outcomes.wait_done(2, Duration::from_secs(10)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    let p = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&p.topic[..], format!("{root}/a/b").as_bytes());
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(&p.payload[..], b"{}");
    let pp = p.properties.clone().expect("v5 properties");
    assert_eq!(pp.content_type.as_deref(), Some("application/json"));
    assert_eq!(pp.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(pp.response_topic.as_deref(), Some("replies/1"));
    assert!(pp
        .user_properties
        .contains(&("tenant".to_string(), "acme".to_string())));
    let p = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&p.topic[..], format!("{root}/c").as_bytes());
    bridge.close().await;
}

#[tokio::test]
async fn subscriptions_receive_settle_and_requeue() {
    let _lock = broker_lock(false);
    let source = unique("in");
    let bridge = MqttBridge::start("mqtt", &config(&unique("bridge"))).unwrap();
    let mut sub = bridge.subscribe(&source, 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (raw, _rx) = raw_client(&unique("raw"), None).await;
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        correlation_data: Some(Bytes::from_static(b"c9")),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    raw.publish_with_properties(
        format!("{source}/x/y"),
        QoS::AtLeastOnce,
        false,
        "hello",
        props,
    )
    .await
    .unwrap();
    let m = next(&mut sub).await;
    assert!(!m.redelivered);
    assert_eq!(m.message.body(), b"hello");
    assert_eq!(m.message.routing_key(), "x.y");
    let p = m.message.properties();
    assert_eq!(p.content_type().as_ref().unwrap().as_str(), "text/plain");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c9");
    assert_eq!(
        p.headers().as_ref().unwrap().inner().get("k"),
        Some(&AMQPValue::LongString(LongString::from("v")))
    );
    m.settle.settle(Settlement::Requeue);
    let again = next(&mut sub).await;
    assert!(again.redelivered);
    assert_eq!(again.message.body(), b"hello");
    again.settle.settle(Settlement::Ack);
    bridge.close().await;
}

#[tokio::test]
async fn unacked_messages_come_back_after_the_bridge_restarts() {
    unacked_messages_come_back(config).await;
}

#[tokio::test]
async fn mqtt311_unacked_messages_come_back_after_the_bridge_restarts() {
    unacked_messages_come_back(config_311).await;
}

async fn unacked_messages_come_back(config: fn(&str) -> MqttBackend) {
    let _lock = broker_lock(false);
    let source = unique("session");
    let id = unique("bridge");
    let first = MqttBridge::start("mqtt", &config(&id)).unwrap();
    let mut sub = first.subscribe(&source, 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (raw, _rx) = raw_client(&unique("raw"), None).await;
    raw.publish(format!("{source}/k"), QoS::AtLeastOnce, false, "kept")
        .await
        .unwrap();
    let m = next(&mut sub).await;
    assert_eq!(m.message.body(), b"kept");
    // Gone without acknowledging.
    std::mem::forget(m);
    drop(sub);
    first.close().await;
    // Published while the bridge is away: queued in its persistent session.
    raw.publish(format!("{source}/k"), QoS::AtLeastOnce, false, "queued")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let second = MqttBridge::start("mqtt", &config(&id)).unwrap();
    // Subscribe only after the session resumed: the broker sends the session's messages
    // right after CONNACK, before the queue mapping subscribes; they must be kept.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sub = second.subscribe(&source, 10).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let m = next(&mut sub).await;
        bodies.push(String::from_utf8(m.message.body().to_vec()).unwrap());
        m.settle.settle(Settlement::Ack);
    }
    bodies.sort();
    assert_eq!(bodies, vec!["kept", "queued"]);
    second.close().await;
}

#[tokio::test]
async fn a_broker_restart_loses_no_confirmed_message() {
    broker_restart_loses_no_confirmed_message(config).await;
}

#[tokio::test]
async fn mqtt311_a_broker_restart_loses_no_confirmed_message() {
    broker_restart_loses_no_confirmed_message(config_311).await;
}

async fn broker_restart_loses_no_confirmed_message(config: fn(&str) -> MqttBackend) {
    let _lock = broker_lock(true);
    let root = unique("restart");
    let bridge = MqttBridge::start("mqtt", &config(&unique("bridge"))).unwrap();
    // The receiver has a persistent session too, so messages published while it reconnects
    // are queued for it.
    let (host, port) = host_port();
    let mut opts = MqttOptions::new(unique("receiver"), host, port);
    opts.set_clean_start(false)
        .set_session_expiry_interval(Some(3600));
    let (recv_client, mut recv_loop) = AsyncClient::new(opts, 1000);
    let received = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let got = received.clone();
    tokio::spawn(async move {
        loop {
            match recv_loop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    got.lock()
                        .unwrap()
                        .insert(String::from_utf8_lossy(&p.payload).into_owned());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    recv_client
        .subscribe(format!("{root}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let outcomes = Arc::new(Outcomes::default());
    let mut sent = 0usize;
    let mut burst = |n: usize| {
        for _ in 0..n {
            bridge.publish(
                &root,
                message("k", BasicProperties::default(), format!("{sent}")),
                outcomes.guard(sent),
            );
            sent += 1;
        }
    };
    for _ in 0..5 {
        burst(50);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let restart = tokio::task::spawn_blocking(|| broker_script("mosquitto", &["restart"]));
    while !restart.is_finished() {
        burst(20);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    restart.await.unwrap();
    for _ in 0..5 {
        burst(20);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    outcomes.wait_done(sent, Duration::from_secs(30)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "failed: {failed:?}");
    let confirmed = outcomes.confirmed.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let missing: Vec<usize> = {
            let got = received.lock().unwrap();
            confirmed
                .iter()
                .copied()
                .filter(|i| !got.contains(&i.to_string()))
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} confirmed messages never arrived, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bridge.stats().connections.load(Ordering::Relaxed) >= 2);
    println!(
        "restart (MQTT {}): {sent} published, all confirmed and received",
        config("x").protocol
    );
    bridge.close().await;
}

/// MQTT 3.1.1 without envelope: the payload is the body, byte for byte, and nothing else
/// travels (no properties, no headers) except RETAIN.
#[tokio::test]
async fn mqtt311_carries_topic_payload_and_retain_only() {
    let _lock = broker_lock(false);
    let root = unique("v311-out");
    let (raw, mut rx) = raw_client_311(&unique("raw"), Some(&format!("{root}/#"))).await;
    let bridge = MqttBridge::start("mqtt", &config_311(&unique("bridge"))).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to("replies".into())
        .with_headers(headers);
    bridge.publish(
        &root,
        message("a.b", props.clone(), &b"{\"v\":3}"[..]),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(10)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    let p = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.topic, format!("{root}/a/b"));
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    assert_eq!(&p.payload[..], b"{\"v\":3}", "the body as it is");

    // In: a retained message published before the bridge subscribes, then a live one.
    let source = unique("v311-in");
    raw.publish(
        format!("{source}/r"),
        rumqttc::QoS::AtLeastOnce,
        true,
        "retained",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sub = bridge.subscribe(&source, 10).await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(m.message.body(), b"retained");
    assert_eq!(m.message.routing_key(), "r");
    let mut only_retain = FieldTable::default();
    only_retain.insert(
        "x-mqtt-retain".into(),
        AMQPValue::LongString(LongString::from("true")),
    );
    assert_eq!(
        m.message.properties(),
        BasicProperties::default().with_headers(only_retain)
    );
    m.settle.settle(Settlement::Ack);
    raw.publish(
        format!("{source}/x/y"),
        rumqttc::QoS::AtLeastOnce,
        false,
        "live",
    )
    .await
    .unwrap();
    let m = next(&mut sub).await;
    assert!(!m.redelivered);
    assert_eq!(m.message.body(), b"live");
    assert_eq!(m.message.routing_key(), "x.y");
    assert_eq!(m.message.properties(), BasicProperties::default());
    m.settle.settle(Settlement::Requeue);
    let again = next(&mut sub).await;
    assert!(again.redelivered);
    assert_eq!(again.message.body(), b"live");
    again.settle.settle(Settlement::Ack);
    // Clear the retained message.
    raw.publish(format!("{source}/r"), rumqttc::QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    bridge.close().await;
}

/// MQTT 3.1.1 with `envelope: true` on both ends: every property and header (with its type)
/// crosses; a plain payload from another client is a body without properties.
#[tokio::test]
async fn mqtt311_envelope_carries_every_property_between_bridges() {
    let _lock = broker_lock(false);
    let root = unique("v311-env");
    let enveloped = |id: &str| MqttBackend {
        envelope: true,
        ..config_311(id)
    };
    let (raw, mut rx) = raw_client_311(&unique("raw"), Some(&format!("{root}/#"))).await;
    let receiver = MqttBridge::start("mqtt-in", &enveloped(&unique("in"))).unwrap();
    let mut sub = receiver.subscribe(&root, 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sender = MqttBridge::start("mqtt-out", &enveloped(&unique("out"))).unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    headers.insert("n".into(), AMQPValue::LongLongInt(-42));
    headers.insert("ok".into(), AMQPValue::Boolean(true));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_message_id("m-1".into())
        .with_delivery_mode(2)
        .with_priority(4)
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    let outcomes = Arc::new(Outcomes::default());
    sender.publish(
        &root,
        message("a.b", props.clone(), &b"{}"[..]),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(10)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    let m = next(&mut sub).await;
    assert_eq!(m.message.body(), b"{}");
    assert_eq!(m.message.routing_key(), "a.b");
    assert_eq!(
        m.message.properties(),
        props,
        "every property, headers typed"
    );
    m.settle.settle(Settlement::Ack);
    // What other 3.1.1 clients see: the envelope.
    let p = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(p
        .payload
        .starts_with(warren_bridges::mqtt::mapping::ENVELOPE_MAGIC));
    assert!(p.payload.ends_with(b"{}"));
    // A plain payload is a body as it is.
    raw.publish(
        format!("{root}/c"),
        rumqttc::QoS::AtLeastOnce,
        false,
        "plain",
    )
    .await
    .unwrap();
    let m = next(&mut sub).await;
    assert_eq!(m.message.body(), b"plain");
    assert_eq!(m.message.properties(), BasicProperties::default());
    m.settle.settle(Settlement::Ack);
    sender.close().await;
    receiver.close().await;
}

/// `mqtts://` to the broker's TLS listener, trusting the test CA, in MQTT 5 and 3.1.1:
/// published through TLS (seen by a plain subscriber on the TCP listener) and consumed through
/// TLS. Trusting an unrelated CA, the bridge never connects: the certificate is verified.
#[tokio::test]
async fn mqtts_with_a_ca_file_both_protocols_and_the_certificate_checked() {
    let _lock = broker_lock(false);
    let (tls_url, ca_file) =
        support::tls_env("WARREN_TEST_MQTTS_URL", "WARREN_TEST_MQTT_CA", "mosquitto");
    for protocol in ["5", "3.1.1"] {
        let root = unique("tls");
        let (raw, mut rx) = raw_client(&unique("raw"), Some(&format!("{root}/out/#"))).await;
        let cfg = MqttBackend {
            url: tls_url.clone(),
            ca_file: Some(ca_file.clone()),
            protocol: protocol.into(),
            ..config(&unique("bridge"))
        };
        let bridge = MqttBridge::start("mqtt-tls", &cfg).unwrap();
        let mut sub = bridge.subscribe(&format!("{root}/in"), 10).await.unwrap();
        let outcomes = Arc::new(Outcomes::default());
        for i in 0..10 {
            bridge.publish(
                &format!("{root}/out"),
                message("k", BasicProperties::default(), format!("tls-{i}")),
                outcomes.guard(i),
            );
        }
        outcomes.wait_done(10, Duration::from_secs(10)).await;
        let failed = outcomes.failed.lock().unwrap().clone();
        assert!(failed.is_empty(), "MQTT {protocol} over TLS: {failed:?}");
        for i in 0..10 {
            let p = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&p.payload[..], format!("tls-{i}").as_bytes());
        }
        raw.publish(format!("{root}/in/x"), QoS::AtLeastOnce, false, "to-warren")
            .await
            .unwrap();
        let m = next(&mut sub).await;
        assert_eq!(m.message.body(), b"to-warren");
        m.settle.settle(Settlement::Ack);
        assert_eq!(bridge.health(), warren_backends::Health::Ready);
        bridge.close().await;

        let other_ca = std::path::Path::new(&ca_file).with_file_name("other-ca.pem");
        let cfg = MqttBackend {
            url: tls_url.clone(),
            ca_file: Some(other_ca.to_string_lossy().into_owned()),
            protocol: protocol.into(),
            retry: RetryConfig {
                max_attempts: 2,
                initial_backoff_ms: 50,
                max_backoff_ms: 100,
            },
            ..config(&unique("untrusting"))
        };
        let bridge = MqttBridge::start("mqtt-tls-untrusted", &cfg).unwrap();
        let outcomes = Arc::new(Outcomes::default());
        bridge.publish(
            &format!("{root}/out"),
            message("k", BasicProperties::default(), "never"),
            outcomes.guard(0),
        );
        outcomes.wait_done(1, Duration::from_secs(20)).await;
        assert!(outcomes.confirmed.lock().unwrap().is_empty());
        match bridge.health() {
            warren_backends::Health::Degraded(reason) => assert!(
                reason.to_lowercase().contains("certificate")
                    || reason.to_lowercase().contains("tls"),
                "not a TLS error: {reason}"
            ),
            other => panic!("an untrusted broker must not be Ready: {other:?}"),
        }
        bridge.close().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "the untrusting bridge must not have published"
        );
    }
    let cfg = MqttBackend {
        url: "mqtts://127.0.0.1:1".into(),
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..config("x")
    };
    let err = MqttBridge::start("mqtt-tls-missing", &cfg)
        .err()
        .expect("a missing ca_file is a configuration error");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}
