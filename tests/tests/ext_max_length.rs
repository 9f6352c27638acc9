//! Queue length limits: `x-max-length`, `x-max-length-bytes` and the `x-overflow` behaviours
//! (drop-head, reject-publish, reject-publish-dlx), end to end with lapin.

mod ext_common;

use ext_common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;

/// A fanout DLX `name` with one queue `name.q` bound to it.
async fn dead_letter_sink(ch: &lapin::Channel, name: &str) -> String {
    declare_exchange(ch, name, ExchangeKind::Fanout, FieldTable::default()).await;
    let q = format!("{name}.q");
    declare(ch, &q, FieldTable::default()).await;
    bind(ch, &q, name, "").await;
    q
}

#[tokio::test]
async fn drop_head_drops_the_oldest() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "len3",
        table(&[("x-max-length", AMQPValue::LongInt(3))]),
    )
    .await;
    for i in 0..5 {
        publish(&ch, "", "len3", &format!("m{i}")).await;
    }
    assert_eq!(message_count(&ch, "len3").await, 3);
    assert_eq!(
        drain(&ch, "len3").await,
        vec!["m2", "m3", "m4"],
        "the newest are kept"
    );

    // x-max-length 0 keeps nothing.
    declare(
        &ch,
        "len0",
        table(&[("x-max-length", AMQPValue::LongInt(0))]),
    )
    .await;
    publish(&ch, "", "len0", "x").await;
    assert_eq!(message_count(&ch, "len0").await, 0);
    finish(server, conn).await;
}

#[tokio::test]
async fn drop_head_dead_letters_with_reason_maxlen() {
    let (server, conn, ch) = setup().await;
    let sink = dead_letter_sink(&ch, "maxlen.dlx").await;
    declare(
        &ch,
        "len2",
        table(&[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", ls("maxlen.dlx")),
        ]),
    )
    .await;
    for i in 0..4 {
        publish(&ch, "", "len2", &format!("m{i}")).await;
    }
    assert_eq!(message_count(&ch, "len2").await, 2);
    for want in ["m0", "m1"] {
        let dead = get(&ch, &sink)
            .await
            .expect("a dropped head is dead-lettered");
        assert_eq!(body(&dead.delivery), want, "dropped in order, oldest first");
        let deaths = x_death(&dead.delivery.properties);
        assert_eq!(deaths.len(), 1);
        assert_death(
            &deaths[0],
            &Death {
                count: 1,
                reason: "maxlen",
                queue: "len2",
                exchange: "",
                routing_keys: &["len2"],
            },
        );
        assert_header(&dead.delivery.properties, "x-first-death-reason", "maxlen");
    }
    assert!(get(&ch, &sink).await.is_none());
    assert_eq!(drain(&ch, "len2").await, vec!["m2", "m3"]);
    finish(server, conn).await;
}

#[tokio::test]
async fn max_length_bytes_counts_body_bytes() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "bytes10",
        table(&[("x-max-length-bytes", AMQPValue::LongInt(10))]),
    )
    .await;
    for b in ["aaaa", "bbbb", "cccc"] {
        publish(&ch, "", "bytes10", b).await;
    }
    // 12 bytes do not fit in 10: the head goes, 8 remain.
    assert_eq!(message_count(&ch, "bytes10").await, 2);
    publish(&ch, "", "bytes10", "dd").await; // exactly 10 bytes: fits
    assert_eq!(message_count(&ch, "bytes10").await, 3);
    assert_eq!(drain(&ch, "bytes10").await, vec!["bbbb", "cccc", "dd"]);

    // A message larger than the limit on its own does not stay either.
    publish(&ch, "", "bytes10", "this body is too long").await;
    assert_eq!(message_count(&ch, "bytes10").await, 0);
    finish(server, conn).await;
}

#[tokio::test]
async fn reject_publish_nacks_refused_messages() {
    let (server, conn, ch) = setup().await;
    let sink = dead_letter_sink(&ch, "rp.dlx").await;
    declare(
        &ch,
        "rp",
        table(&[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-overflow", ls("reject-publish")),
            ("x-dead-letter-exchange", ls("rp.dlx")),
        ]),
    )
    .await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let mut acks = Vec::new();
    for i in 0..4 {
        acks.push(publish(&ch, "", "rp", &format!("m{i}")).await);
    }
    let outcome: Vec<bool> = acks.iter().map(|c| c.is_ack()).collect();
    assert_eq!(outcome, vec![true, true, false, false], "{acks:?}");
    assert!(acks[2].is_nack() && acks[3].is_nack());
    assert_eq!(message_count(&ch, "rp").await, 2);
    // reject-publish does not dead-letter what it refuses (reject-publish-dlx does).
    assert_eq!(message_count(&ch, &sink).await, 0);
    assert_eq!(
        drain(&ch, "rp").await,
        vec!["m0", "m1"],
        "the queue keeps the oldest"
    );

    // Room again: publishes are accepted.
    assert!(publish(&ch, "", "rp", "m4").await.is_ack());
    assert_eq!(drain(&ch, "rp").await, vec!["m4"]);

    // Confirms stay in order when ack and nack interleave in one burst.
    let mut pending = Vec::new();
    for i in 0..5 {
        pending.push(
            within(ch.basic_publish(
                "".into(),
                "rp".into(),
                BasicPublishOptions::default(),
                format!("b{i}").as_bytes(),
                Default::default(),
            ))
            .await
            .expect("publish"),
        );
    }
    let mut outcome = Vec::new();
    for p in pending {
        outcome.push(within(p).await.expect("confirm").is_ack());
    }
    assert_eq!(outcome, vec![true, true, false, false, false]);
    finish(server, conn).await;
}

#[tokio::test]
async fn reject_publish_dlx_nacks_and_dead_letters() {
    let (server, conn, ch) = setup().await;
    let sink = dead_letter_sink(&ch, "rpd.dlx").await;
    declare(
        &ch,
        "rpd",
        table(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", ls("reject-publish-dlx")),
            ("x-dead-letter-exchange", ls("rpd.dlx")),
        ]),
    )
    .await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    assert!(publish(&ch, "", "rpd", "kept").await.is_ack());
    assert!(publish(&ch, "", "rpd", "refused").await.is_nack());
    assert_eq!(drain(&ch, "rpd").await, vec!["kept"]);
    let dead = get(&ch, &sink)
        .await
        .expect("the refused message is dead-lettered");
    assert_eq!(body(&dead.delivery), "refused");
    assert_death(
        &x_death(&dead.delivery.properties)[0],
        &Death {
            count: 1,
            reason: "maxlen",
            queue: "rpd",
            exchange: "",
            routing_keys: &["rpd"],
        },
    );
    finish(server, conn).await;
}

#[tokio::test]
async fn a_refused_publish_is_nacked_even_when_another_queue_took_it() {
    let (server, conn, ch) = setup().await;
    declare_exchange(&ch, "fan", ExchangeKind::Fanout, FieldTable::default()).await;
    declare(
        &ch,
        "full",
        table(&[
            ("x-max-length", AMQPValue::LongInt(0)),
            ("x-overflow", ls("reject-publish")),
        ]),
    )
    .await;
    declare(&ch, "open", FieldTable::default()).await;
    bind(&ch, "full", "fan", "").await;
    bind(&ch, "open", "fan", "").await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    assert!(publish(&ch, "fan", "", "both").await.is_nack());
    assert_eq!(
        message_count(&ch, "open").await,
        1,
        "the queue with room took it"
    );
    assert_eq!(message_count(&ch, "full").await, 0);
    finish(server, conn).await;
}

#[tokio::test]
async fn unacknowledged_messages_do_not_count_towards_the_limit() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "len-unacked",
        table(&[("x-max-length", AMQPValue::LongInt(2))]),
    )
    .await;
    publish(&ch, "", "len-unacked", "u0").await;
    publish(&ch, "", "len-unacked", "u1").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let m = within(ch.basic_get("len-unacked".into(), BasicGetOptions { no_ack: false }))
            .await
            .expect("basic.get")
            .expect("a message");
        held.push(m);
    }
    // Two delivered and unacknowledged, two ready: nothing dropped.
    publish(&ch, "", "len-unacked", "r0").await;
    publish(&ch, "", "len-unacked", "r1").await;
    assert_eq!(message_count(&ch, "len-unacked").await, 2);
    for m in &held {
        ack(&m.delivery).await;
    }
    assert_eq!(drain(&ch, "len-unacked").await, vec!["r0", "r1"]);
    finish(server, conn).await;
}
