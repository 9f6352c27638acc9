use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio_stream_shim::next;

mod tokio_stream_shim {
    pub async fn next(c: &mut lapin::Consumer) -> Option<lapin::message::Delivery> {
        use futures_lite::StreamExt;
        c.next().await.map(|r| r.expect("delivery"))
    }
}

#[tokio::test]
async fn publish_consume_ack_with_confirms() {
    let server = warren_tests::start_server();
    let conn = Connection::connect(
        &warren_tests::amqp_url(&server),
        ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let q = ch
        .queue_declare(
            "smoke".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.name().as_str(), "smoke");
    for i in 0..10 {
        let confirm = ch
            .basic_publish(
                "".into(),
                "smoke".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    let mut consumer = ch
        .basic_consume(
            "smoke".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10 {
        let d = next(&mut consumer).await.unwrap();
        assert_eq!(d.data, format!("m{i}").as_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    conn.close(200, "bye".into()).await.unwrap();
    server.shutdown().await;
}
