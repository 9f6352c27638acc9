//! Queue arguments RabbitMQ understands, parsed and checked once at declare time.

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

use super::value::{as_integer, as_text};
use super::EngineError;

/// What a queue does when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArgs {
    /// x-message-ttl, milliseconds.
    pub message_ttl: Option<u64>,
    /// x-expires, milliseconds.
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<ShortString>,
    pub dead_letter_routing_key: Option<ShortString>,
    /// x-max-priority; 0 means a plain FIFO queue.
    pub max_priority: u8,
    pub single_active_consumer: bool,
}

fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Void => "void",
        _ => "unknown",
    }
}

impl QueueArgs {
    /// Reads the arguments RabbitMQ gives meaning to; others are kept on the queue untouched.
    pub fn parse(args: &FieldTable, queue: &str, vhost: &str) -> Result<QueueArgs, EngineError> {
        let invalid = |key: &str, why: String| {
            EngineError::precondition(format!(
                "invalid arg '{key}' for queue '{queue}' in vhost '{vhost}': {why}"
            ))
        };
        let non_negative = |key: &str, v: &AMQPValue| -> Result<u64, EngineError> {
            let n = as_integer(v)
                .ok_or_else(|| invalid(key, format!("{{unacceptable_type,{}}}", type_name(v))))?;
            if n < 0 {
                return Err(invalid(key, format!("{{value_negative,{n}}}")));
            }
            Ok(n.min(u64::MAX as i128) as u64)
        };
        let mut out = QueueArgs::default();
        for (key, value) in args.inner() {
            match key.as_str() {
                "x-message-ttl" => out.message_ttl = Some(non_negative(key.as_str(), value)?),
                "x-expires" => {
                    let ms = non_negative(key.as_str(), value)?;
                    if ms == 0 {
                        return Err(invalid(key.as_str(), "{value_zero,0}".into()));
                    }
                    out.expires = Some(ms);
                }
                "x-max-length" => out.max_length = Some(non_negative(key.as_str(), value)?),
                "x-max-length-bytes" => {
                    out.max_length_bytes = Some(non_negative(key.as_str(), value)?)
                }
                "x-max-priority" => {
                    let p = non_negative(key.as_str(), value)?;
                    if p > 255 {
                        return Err(invalid(
                            key.as_str(),
                            format!("{{value_too_large,{p},255}}"),
                        ));
                    }
                    out.max_priority = p as u8;
                }
                "x-overflow" => {
                    out.overflow = match as_text(value).as_deref() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                        _ => {
                            return Err(invalid(
                                key.as_str(),
                                format!("{{unknown_overflow_value,{value:?}}}"),
                            ))
                        }
                    }
                }
                "x-dead-letter-exchange" => {
                    let name = as_text(value).ok_or_else(|| {
                        invalid(
                            key.as_str(),
                            format!("{{unacceptable_type,{}}}", type_name(value)),
                        )
                    })?;
                    out.dead_letter_exchange = Some(name.into());
                }
                "x-dead-letter-routing-key" => {
                    let rk = as_text(value).ok_or_else(|| {
                        invalid(
                            key.as_str(),
                            format!("{{unacceptable_type,{}}}", type_name(value)),
                        )
                    })?;
                    out.dead_letter_routing_key = Some(rk.into());
                }
                "x-single-active-consumer" => match value {
                    AMQPValue::Boolean(b) => out.single_active_consumer = *b,
                    other => {
                        return Err(invalid(
                            key.as_str(),
                            format!("{{unacceptable_type,{}}}", type_name(other)),
                        ))
                    }
                },
                _ => {}
            }
        }
        if out.dead_letter_routing_key.is_some() && out.dead_letter_exchange.is_none() {
            return Err(EngineError::precondition(format!(
                "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '{vhost}': routing_key_but_no_dlx_defined"
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn parses_known_arguments() {
        let args = QueueArgs::parse(
            &table(&[
                ("x-message-ttl", AMQPValue::LongInt(500)),
                ("x-expires", AMQPValue::LongLongInt(10_000)),
                ("x-max-length", AMQPValue::ShortInt(3)),
                ("x-overflow", AMQPValue::LongString("reject-publish".into())),
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString("dlx".into()),
                ),
                ("x-max-priority", AMQPValue::ShortShortUInt(10)),
                ("x-single-active-consumer", AMQPValue::Boolean(true)),
                ("x-custom", AMQPValue::Boolean(true)),
            ]),
            "q",
            "/",
        )
        .unwrap();
        assert_eq!(args.message_ttl, Some(500));
        assert_eq!(args.expires, Some(10_000));
        assert_eq!(args.max_length, Some(3));
        assert_eq!(args.overflow, Overflow::RejectPublish);
        assert_eq!(
            args.dead_letter_exchange.as_ref().map(|s| s.as_str()),
            Some("dlx")
        );
        assert_eq!(args.max_priority, 10);
        assert!(args.single_active_consumer);
    }

    #[test]
    fn rejects_bad_values_with_rabbitmq_wording() {
        let err = QueueArgs::parse(
            &table(&[("x-message-ttl", AMQPValue::LongInt(-1))]),
            "q",
            "/",
        )
        .unwrap_err();
        assert_eq!(
            err.text,
            "invalid arg 'x-message-ttl' for queue 'q' in vhost '/': {value_negative,-1}"
        );
        assert!(QueueArgs::parse(
            &table(&[("x-max-priority", AMQPValue::LongInt(256))]),
            "q",
            "/"
        )
        .is_err());
        assert!(
            QueueArgs::parse(&table(&[("x-expires", AMQPValue::LongInt(0))]), "q", "/").is_err()
        );
        assert!(QueueArgs::parse(
            &table(&[("x-overflow", AMQPValue::LongString("nope".into()))]),
            "q",
            "/"
        )
        .is_err());
        assert!(QueueArgs::parse(
            &table(&[("x-message-ttl", AMQPValue::LongString("5".into()))]),
            "q",
            "/"
        )
        .is_err());
    }
}
