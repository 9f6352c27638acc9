//! Warren in front of a real MQTT broker, configured by `deploy/examples/mqtt.yaml`: a client
//! publishing to Warren's exchange `demo` (with confirms) lands on topic
//! `demo/<routing key, dots as slashes>`; a client consuming Warren's queue `demo-in` gets what
//! is published under `demo-in/#`.
//!
//! Needs `WARREN_TEST_MQTT_URL` (scripts/test.sh starts a private Mosquitto and sets it).

use std::fs::File;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use warren_gateway::plan::build_plan;

const STEP: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

fn mqtt_url() -> String {
    warren_tests::broker_url("WARREN_TEST_MQTT_URL", "mosquitto", "MQTT broker")
}

/// Shared with the bridge tests: a restart of the broker needs it alone.
fn broker_lock() -> File {
    warren_tests::broker_lock("mosquitto", false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_carries_messages_both_ways_with_confirms() {
    let _lock = broker_lock();
    let url = mqtt_url();
    let hostport = url.trim_start_matches("mqtt://").trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').expect("host:port");
    let port: u16 = port.parse().expect("port");

    // A plain MQTT client watching `demo/#`.
    let id = format!("warren-e2e-{}", std::process::id());
    let (raw, mut eventloop) = AsyncClient::new(MqttOptions::new(id, host, port), 1000);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    raw.subscribe("demo/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    let example =
        std::fs::read_to_string(warren_tests::workspace_root().join("deploy/examples/mqtt.yaml"))
            .expect("the example file");
    let cfg = warren_config::parse_with_env(&example, "mqtt.yaml", |name| {
        (name == "WARREN_TARGET_URL").then(|| url.clone())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let plan = build_plan(&cfg, warren_bridges::build).expect("backends");
    let warren = warren_tests::start_server_with_plan(plan);
    let conn = within(Connection::connect(
        &warren_tests::amqp_url(&warren),
        ConnectionProperties::default(),
    ))
    .await
    .expect("connect to Warren");
    let ch = within(conn.create_channel()).await.expect("channel");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Client → Warren exchange `demo` → topic `demo/orders/<i>`, confirmed on PUBACK.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    for i in 0..10 {
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(headers.clone());
        let confirm = within(
            ch.basic_publish(
                "demo".into(),
                format!("orders.{i}").into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                props,
            )
            .await
            .expect("publish"),
        )
        .await
        .expect("confirm");
        assert!(confirm.is_ack(), "confirmed after PUBACK");
    }
    for i in 0..10 {
        let p = within(rx.recv()).await.expect("a message on demo/#");
        assert_eq!(&p.topic[..], format!("demo/orders/{i}").as_bytes());
        assert_eq!(&p.payload[..], format!("m{i}").as_bytes());
        let props = p.properties.expect("v5 properties");
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert!(props
            .user_properties
            .contains(&("tenant".to_string(), "acme".to_string())));
    }

    // Topic `demo-in/...` → Warren queue `demo-in` → client.
    let mut consumer = ch
        .basic_consume(
            "demo-in".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..5 {
        raw.publish_with_properties(
            format!("demo-in/sensor/{i}"),
            QoS::AtLeastOnce,
            false,
            format!("in{i}"),
            PublishProperties {
                correlation_data: Some(format!("c{i}").into_bytes().into()),
                ..Default::default()
            },
        )
        .await
        .expect("publish to MQTT");
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        let d = within(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        got.push((
            d.routing_key.to_string(),
            String::from_utf8(d.data.clone()).expect("utf8"),
        ));
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    got.sort();
    assert_eq!(got[0], ("sensor.0".to_string(), "in0".to_string()));
    assert_eq!(got[4], ("sensor.4".to_string(), "in4".to_string()));
    warren.shutdown().await;
}
