//! Dead-lettering: the copy of a message that goes to a queue's dead-letter exchange, with the
//! `x-death` history RabbitMQ writes.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use super::value::as_text;
use crate::Message;

/// Why a message left its queue for the dead-letter exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    Rejected,
    Expired,
    Maxlen,
}

impl DeathReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::Maxlen => "maxlen",
        }
    }
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn entry_field<'a>(entry: &'a AMQPValue, key: &str) -> Option<&'a AMQPValue> {
    match entry {
        AMQPValue::FieldTable(t) => t.inner().get(key),
        _ => None,
    }
}

/// The message as it is republished to the dead-letter exchange `dlx`.
///
/// As RabbitMQ does: the `x-death` entry for (queue, reason) is created or has its count
/// incremented and moves to the front; `x-first-death-*` are set once, `x-last-death-*` every
/// time; a per-message `expiration` is removed (kept as `original-expiration`) so the copy does
/// not expire again; the routing key is `x-dead-letter-routing-key` if the queue has one.
pub fn dead_letter(
    msg: &Message,
    queue: &str,
    reason: DeathReason,
    dlx: &ShortString,
    dl_routing_key: Option<&ShortString>,
    now_unix_secs: u64,
) -> Message {
    let props = msg.properties();
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let existing = deaths.iter().position(|e| {
        entry_field(e, "queue").and_then(as_text).as_deref() == Some(queue)
            && entry_field(e, "reason").and_then(as_text).as_deref() == Some(reason.as_str())
    });
    let entry = match existing {
        Some(pos) => {
            let mut entry = match deaths.remove(pos) {
                AMQPValue::FieldTable(t) => t,
                _ => FieldTable::default(),
            };
            let count = match entry.inner().get("count") {
                Some(AMQPValue::LongLongInt(n)) => *n,
                Some(AMQPValue::LongInt(n)) => *n as i64,
                _ => 0,
            };
            // Only the count changes: `time`, `exchange` and `routing-keys` stay those of the
            // first death for this (queue, reason), as in RabbitMQ.
            entry.insert("count".into(), AMQPValue::LongLongInt(count + 1));
            entry
        }
        None => {
            let mut entry = FieldTable::default();
            entry.insert("count".into(), AMQPValue::LongLongInt(1));
            entry.insert("reason".into(), long_str(reason.as_str()));
            entry.insert("queue".into(), long_str(queue));
            entry.insert("time".into(), AMQPValue::Timestamp(now_unix_secs));
            entry.insert("exchange".into(), long_str(msg.exchange()));
            let keys = FieldArray::from(vec![long_str(msg.routing_key())]);
            entry.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
            if let Some(exp) = props.expiration() {
                entry.insert("original-expiration".into(), long_str(exp.as_str()));
            }
            entry
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    for (key, value) in [
        ("reason", reason.as_str()),
        ("queue", queue),
        ("exchange", msg.exchange()),
    ] {
        let first: ShortString = format!("x-first-death-{key}").into();
        if !headers.inner().contains_key(&first) {
            headers.insert(first, long_str(value));
        }
        headers.insert(format!("x-last-death-{key}").into(), long_str(value));
    }

    let mut new_props = AMQPProperties::default().with_headers(headers);
    if let Some(v) = props.content_type() {
        new_props = new_props.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        new_props = new_props.with_content_encoding(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        new_props = new_props.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        new_props = new_props.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        new_props = new_props.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        new_props = new_props.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        new_props = new_props.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        new_props = new_props.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        new_props = new_props.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        new_props = new_props.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        new_props = new_props.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        new_props = new_props.with_cluster_id(v.clone());
    }
    let routing_key = dl_routing_key
        .cloned()
        .unwrap_or_else(|| msg.routing_key().into());
    Message::new(dlx.clone(), routing_key, new_props, msg.body_bytes())
}

/// Whether dead-lettering a message into `target` would close a loop with no rejection in it;
/// RabbitMQ drops such messages instead of cycling them forever. As in RabbitMQ, the loop is the
/// x-death entries (most recent first) up to and including `target`'s: a rejection older than
/// that does not make the loop legitimate, and an entry that is not a table (a client wrote it)
/// means it is not fully automatic.
pub fn is_cycle(msg: &Message, target: &str) -> bool {
    let headers = msg.headers();
    let Some(AMQPValue::FieldArray(deaths)) =
        headers.as_ref().and_then(|h| h.inner().get("x-death"))
    else {
        return false;
    };
    for e in deaths.as_slice() {
        if !matches!(e, AMQPValue::FieldTable(_))
            || entry_field(e, "reason").and_then(as_text).as_deref() == Some("rejected")
        {
            return false;
        }
        if entry_field(e, "queue").and_then(as_text).as_deref() == Some(target) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn original() -> Message {
        Message::new(
            "work-x".into(),
            "job".into(),
            AMQPProperties::default()
                .with_expiration("5000".into())
                .with_message_id("m1".into()),
            Bytes::from_static(b"payload"),
        )
    }

    fn deaths(m: &Message) -> Vec<FieldTable> {
        match m.headers().unwrap().inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .map(|v| match v {
                    AMQPValue::FieldTable(t) => t.clone(),
                    _ => panic!("x-death entry is not a table"),
                })
                .collect(),
            _ => panic!("no x-death"),
        }
    }

    #[test]
    fn first_death_writes_rabbitmq_headers() {
        let dl = dead_letter(
            &original(),
            "work",
            DeathReason::Rejected,
            &"dlx".into(),
            None,
            1700,
        );
        assert_eq!(dl.exchange(), "dlx");
        assert_eq!(dl.routing_key(), "job");
        assert_eq!(dl.properties().expiration(), &None);
        assert_eq!(
            dl.properties().message_id().as_ref().map(|s| s.as_str()),
            Some("m1")
        );
        assert_eq!(&dl.body(), b"payload");
        let d = deaths(&dl);
        assert_eq!(d.len(), 1);
        let e = d[0].inner();
        assert_eq!(e.get("count"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(e.get("reason"), Some(&long_str("rejected")));
        assert_eq!(e.get("queue"), Some(&long_str("work")));
        assert_eq!(e.get("exchange"), Some(&long_str("work-x")));
        assert_eq!(e.get("time"), Some(&AMQPValue::Timestamp(1700)));
        assert_eq!(e.get("original-expiration"), Some(&long_str("5000")));
        assert_eq!(
            e.get("routing-keys"),
            Some(&AMQPValue::FieldArray(vec![long_str("job")].into()))
        );
        let headers = dl.headers().unwrap();
        let h = headers.inner();
        assert_eq!(h.get("x-first-death-reason"), Some(&long_str("rejected")));
        assert_eq!(h.get("x-first-death-queue"), Some(&long_str("work")));
        assert_eq!(h.get("x-first-death-exchange"), Some(&long_str("work-x")));
    }

    #[test]
    fn entries_merge_by_queue_and_reason() {
        let once = dead_letter(
            &original(),
            "work",
            DeathReason::Rejected,
            &"dlx".into(),
            None,
            1,
        );
        // Back from the delay queue, then expired there, then rejected again from work.
        let delayed = dead_letter(
            &once,
            "delay",
            DeathReason::Expired,
            &"".into(),
            Some(&"work".into()),
            2,
        );
        let twice = dead_letter(
            &delayed,
            "work",
            DeathReason::Rejected,
            &"dlx".into(),
            None,
            3,
        );
        let d = deaths(&twice);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].inner().get("queue"), Some(&long_str("work")));
        assert_eq!(d[0].inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
        // The merged entry keeps the time of its first death.
        assert_eq!(d[0].inner().get("time"), Some(&AMQPValue::Timestamp(1)));
        assert_eq!(d[1].inner().get("queue"), Some(&long_str("delay")));
        let headers = twice.headers().unwrap();
        let h = headers.inner();
        assert_eq!(h.get("x-first-death-reason"), Some(&long_str("rejected")));
        assert_eq!(h.get("x-last-death-queue"), Some(&long_str("work")));
        assert!(!is_cycle(&twice, "work"));
    }

    #[test]
    fn automatic_loops_are_cycles() {
        let a = dead_letter(
            &original(),
            "a",
            DeathReason::Expired,
            &"".into(),
            Some(&"b".into()),
            1,
        );
        let b = dead_letter(
            &a,
            "b",
            DeathReason::Expired,
            &"".into(),
            Some(&"a".into()),
            2,
        );
        assert!(is_cycle(&b, "a"));
        assert!(!is_cycle(&b, "c"));
    }

    #[test]
    fn an_older_rejection_does_not_excuse_a_later_loop() {
        // Rejected from "work", then expiring back and forth between "b" and "c".
        let rejected = dead_letter(
            &original(),
            "work",
            DeathReason::Rejected,
            &"".into(),
            None,
            1,
        );
        let b = dead_letter(&rejected, "b", DeathReason::Expired, &"".into(), None, 2);
        let c = dead_letter(&b, "c", DeathReason::Expired, &"".into(), None, 3);
        assert!(is_cycle(&c, "b"), "c -> b loops with expiries only");
        assert!(
            !is_cycle(&c, "work"),
            "the loop back to work includes the rejection"
        );
    }
}
