//! Transactions: tx.select, tx.commit and tx.rollback for publishes and acknowledgements.

mod ext_common;

use ext_common::*;
use lapin::options::*;
use lapin::types::FieldTable;

async fn get_unacked(ch: &lapin::Channel, queue: &str) -> lapin::message::Delivery {
    within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
        .unwrap_or_else(|| panic!("{queue} is empty"))
        .delivery
}

#[tokio::test]
async fn published_messages_are_invisible_until_commit() {
    let (server, conn, tx) = setup().await;
    let observer = channel(&conn).await;
    declare(&observer, "txq", FieldTable::default()).await;
    within(tx.tx_select()).await.expect("tx.select");

    publish(&tx, "", "txq", "one").await;
    publish(&tx, "", "txq", "two").await;
    // Frames of one connection are handled in order: the publishes came first.
    assert_eq!(
        message_count(&observer, "txq").await,
        0,
        "not before commit"
    );
    assert!(get(&observer, "txq").await.is_none());
    within(tx.tx_commit()).await.expect("tx.commit");
    assert_eq!(
        message_count(&observer, "txq").await,
        2,
        "visible after commit"
    );

    // Rolled back: discarded.
    publish(&tx, "", "txq", "rolled back").await;
    within(tx.tx_rollback()).await.expect("tx.rollback");
    assert_eq!(message_count(&observer, "txq").await, 2);

    // The channel stays transactional: the next commit publishes only what came after.
    publish(&tx, "", "txq", "three").await;
    within(tx.tx_commit()).await.expect("tx.commit");
    assert_eq!(drain(&observer, "txq").await, vec!["one", "two", "three"]);

    // Closing with an open transaction discards it.
    publish(&tx, "", "txq", "never").await;
    within(tx.close(200, "bye".into())).await.expect("close");
    assert_eq!(message_count(&observer, "txq").await, 0);
    finish(server, conn).await;
}

#[tokio::test]
async fn acks_take_effect_only_on_commit() {
    let (server, conn, setup_ch) = setup().await;
    declare(&setup_ch, "txa", FieldTable::default()).await;
    for b in ["a", "b"] {
        publish(&setup_ch, "", "txa", b).await;
    }

    // Ack then rollback: the ack is discarded, the message stays unacknowledged and comes back
    // when the channel closes.
    let tx = channel(&conn).await;
    within(tx.tx_select()).await.expect("tx.select");
    let a = get_unacked(&tx, "txa").await;
    assert_eq!(body(&a), "a");
    ack(&a).await;
    within(tx.tx_rollback()).await.expect("tx.rollback");
    assert_eq!(
        message_count(&setup_ch, "txa").await,
        1,
        "a is still unacknowledged"
    );
    within(tx.close(200, "bye".into())).await.expect("close");
    assert_eq!(message_count(&setup_ch, "txa").await, 2, "a came back");
    let back = get(&setup_ch, "txa").await.expect("a");
    assert_eq!(body(&back.delivery), "a");
    assert!(back.delivery.redelivered);
    publish(&setup_ch, "", "txa", "a2").await;

    // Ack, no commit, channel closed: not acknowledged either.
    let tx = channel(&conn).await;
    within(tx.tx_select()).await.expect("tx.select");
    let b = get_unacked(&tx, "txa").await;
    assert_eq!(body(&b), "b");
    ack(&b).await;
    within(tx.close(200, "bye".into())).await.expect("close");
    assert_eq!(message_count(&setup_ch, "txa").await, 2);

    // Ack, rollback, ack again, commit: acknowledged for good.
    let tx = channel(&conn).await;
    within(tx.tx_select()).await.expect("tx.select");
    let b = get_unacked(&tx, "txa").await;
    assert_eq!(body(&b), "b");
    assert!(b.redelivered);
    ack(&b).await;
    within(tx.tx_rollback()).await.expect("tx.rollback");
    // lapin's acker is single-use; the same tag is acknowledged again on the channel.
    within(tx.basic_ack(b.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack again");
    within(tx.tx_commit()).await.expect("tx.commit");
    within(tx.close(200, "bye".into())).await.expect("close");
    assert_eq!(
        drain(&setup_ch, "txa").await,
        vec!["a2"],
        "b was acknowledged by the commit"
    );
    finish(server, conn).await;
}

#[tokio::test]
async fn reject_inside_a_transaction_dead_letters_on_commit() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "tx-dlq", FieldTable::default()).await;
    declare(
        &ch,
        "tx-src",
        table(&[
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls("tx-dlq")),
        ]),
    )
    .await;
    publish(&ch, "", "tx-src", "bad").await;
    let tx = channel(&conn).await;
    within(tx.tx_select()).await.expect("tx.select");
    let m = get_unacked(&tx, "tx-src").await;
    within(m.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("reject");
    assert_eq!(message_count(&ch, "tx-dlq").await, 0, "not before commit");
    within(tx.tx_commit()).await.expect("tx.commit");
    assert_eq!(drain(&ch, "tx-dlq").await, vec!["bad"]);
    assert_eq!(message_count(&ch, "tx-src").await, 0);
    finish(server, conn).await;
}

#[tokio::test]
async fn commit_without_select_and_mixing_with_confirms_are_406() {
    let (server, conn, ch) = setup().await;
    let text = expect_code(within(ch.tx_commit()).await, 406);
    assert!(text.contains("not transactional"), "{text}");

    let ch = channel(&conn).await;
    let text = expect_code(within(ch.tx_rollback()).await, 406);
    assert!(text.contains("not transactional"), "{text}");

    let ch = channel(&conn).await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let text = expect_code(within(ch.tx_select()).await, 406);
    assert!(text.contains("confirm"), "{text}");
    assert!(conn.status().connected());
    finish(server, conn).await;
}

#[tokio::test]
async fn an_unknown_delivery_tag_in_a_transaction_fails_at_once_and_nothing_is_applied() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "txu", FieldTable::default()).await;
    declare(&ch, "txu.out", FieldTable::default()).await;
    publish(&ch, "", "txu", "m").await;

    let tx = channel(&conn).await;
    within(tx.tx_select()).await.expect("tx.select");
    let m = get_unacked(&tx, "txu").await;
    publish(&tx, "", "txu.out", "published in the transaction").await;
    ack(&m).await;
    // The same tag again: RabbitMQ refuses it when the ack arrives, as outside a transaction.
    within(tx.basic_ack(m.delivery_tag, BasicAckOptions::default()))
        .await
        .ok();
    let text = expect_code(within(tx.tx_commit()).await, 406);
    assert!(text.contains("unknown delivery tag"), "{text}");

    // The channel died with its transaction: nothing of it was applied, and the message it had
    // taken is back.
    assert_eq!(
        message_count(&ch, "txu.out").await,
        0,
        "the publish was not committed"
    );
    assert_eq!(drain(&ch, "txu").await, vec!["m"]);
    finish(server, conn).await;
}

#[tokio::test]
async fn an_uncommitted_ack_keeps_the_prefetch_slot() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "txc", FieldTable::default()).await;
    let tx = channel(&conn).await;
    within(tx.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    within(tx.tx_select()).await.expect("tx.select");
    let mut c = consume(&tx, "txc", "c").await;
    publish(&ch, "", "txc", "m0").await;
    publish(&ch, "", "txc", "m1").await;
    let first = next(&mut c).await;
    assert_eq!(body(&first), "m0");
    ack(&first).await;
    assert_no_delivery(&mut c).await;
    within(tx.tx_commit()).await.expect("tx.commit");
    assert_eq!(body(&next(&mut c).await), "m1", "the commit freed the slot");
    finish(server, conn).await;
}
