//! Request/response over an AMQP 1.0 node (`$cbs`, `ENTITY/$management`), as Service Bus
//! documents it: a sender link to the node, a receiver link from it whose target is the
//! client's reply address, requests carrying `message-id` and `reply-to`, and responses
//! matched by `correlation-id` with `status-code` / `status-description` application
//! properties.
//!
//! Written out here rather than taken from `fe2o3-amqp-cbs`/`-management` because those accept
//! only one success code (CBS answers 200 or 202), drop the status description, and do not
//! match responses to requests.

use std::time::Duration;

use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Receiver, Sender};
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Message as AmqpMessage, MessageId, Outcome, Properties,
};
use fe2o3_amqp_types::primitives::SimpleValue;
use serde_amqp::Value;
use tokio::time::timeout;

/// Errors of one request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MgmtError {
    #[error("cannot attach to '{node}': {reason}")]
    Attach { node: String, reason: String },
    #[error("request to '{node}' failed: {reason}")]
    Link { node: String, reason: String },
    #[error("no answer from '{node}' within {timeout:?}")]
    Timeout { node: String, timeout: Duration },
    #[error("'{node}' answered {code}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Status {
        node: String,
        code: i64,
        description: Option<String>,
    },
}

/// A response with a success status.
pub(crate) struct Response {
    pub status: i64,
    pub body: Value,
}

/// One request/response link pair to a node.
pub(crate) struct MgmtLink {
    node: String,
    reply_to: String,
    sender: Sender,
    receiver: Receiver,
    next_id: u64,
}

impl MgmtLink {
    /// Attaches the link pair to `node` on `session`.
    pub(crate) async fn attach(
        session: &mut SessionHandle<()>,
        node: &str,
        link_prefix: &str,
    ) -> Result<MgmtLink, MgmtError> {
        let suffix = format!("{:08x}", rand::random::<u32>());
        let reply_to = format!("{link_prefix}-reply-{suffix}");
        let attach_err = |reason: String| MgmtError::Attach {
            node: node.to_string(),
            reason,
        };
        let sender = Sender::builder()
            .name(format!("{link_prefix}-req-{suffix}"))
            .target(node)
            .attach(session)
            .await
            .map_err(|e| attach_err(e.to_string()))?;
        let receiver = Receiver::builder()
            .name(format!("{link_prefix}-resp-{suffix}"))
            .source(node)
            .target(reply_to.as_str())
            .attach(session)
            .await
            .map_err(|e| attach_err(e.to_string()))?;
        Ok(MgmtLink {
            node: node.to_string(),
            reply_to,
            sender,
            receiver,
            next_id: 1,
        })
    }

    /// Sends one request (`operation` plus `properties` as application properties, `body` as
    /// an amqp-value) and waits up to `wait` for its response. Statuses 200–299 are success.
    pub(crate) async fn call(
        &mut self,
        operation: &str,
        properties: Vec<(&str, SimpleValue)>,
        body: Value,
        wait: Duration,
    ) -> Result<Response, MgmtError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut app = ApplicationProperties::builder().insert("operation", operation);
        for (k, v) in properties {
            app = app.insert(k, v);
        }
        let request = AmqpMessage::builder()
            .properties(Properties {
                message_id: Some(MessageId::Ulong(id)),
                reply_to: Some(self.reply_to.clone()),
                ..Default::default()
            })
            .application_properties(app.build())
            .value(body)
            .build();
        let node = self.node.clone();
        let link_err = |reason: String| MgmtError::Link {
            node: node.clone(),
            reason,
        };
        let exchange = async {
            match self.sender.send(request).await {
                Ok(Outcome::Accepted(_)) => {}
                Ok(other) => return Err(link_err(format!("request not accepted: {other:?}"))),
                Err(e) => return Err(link_err(e.to_string())),
            }
            loop {
                let delivery = self
                    .receiver
                    .recv::<Body<Value>>()
                    .await
                    .map_err(|e| link_err(e.to_string()))?;
                let _ = self.receiver.accept(&delivery).await;
                let message = delivery.message();
                let correlation = message
                    .properties
                    .as_ref()
                    .and_then(|p| p.correlation_id.clone());
                if correlation != Some(MessageId::Ulong(id)) {
                    tracing::debug!(node = %self.node, ?correlation, expected = id, "amqp10: response to another request dropped");
                    continue;
                }
                let app = message.application_properties.as_ref();
                let status = app
                    .and_then(|a| a.get("status-code").or_else(|| a.get("statusCode")))
                    .and_then(simple_int);
                let description = app
                    .and_then(|a| {
                        a.get("status-description")
                            .or_else(|| a.get("statusDescription"))
                    })
                    .and_then(|v| match v {
                        SimpleValue::String(s) => Some(s.clone()),
                        _ => None,
                    });
                let body = match message.body.clone() {
                    Body::Value(v) => v.0,
                    _ => Value::Null,
                };
                return match status {
                    Some(code) if (200..300).contains(&code) => Ok(Response { status: code, body }),
                    Some(code) => Err(MgmtError::Status {
                        node: self.node.clone(),
                        code,
                        description,
                    }),
                    None => Err(MgmtError::Status {
                        node: self.node.clone(),
                        code: 0,
                        description: Some("response without a status-code".into()),
                    }),
                };
            }
        };
        match timeout(wait, exchange).await {
            Ok(r) => r,
            Err(_) => Err(MgmtError::Timeout {
                node: self.node.clone(),
                timeout: wait,
            }),
        }
    }

    pub(crate) async fn close(self) {
        let _ = timeout(Duration::from_secs(1), self.sender.close()).await;
        let _ = timeout(Duration::from_secs(1), self.receiver.close()).await;
    }
}

fn simple_int(v: &SimpleValue) -> Option<i64> {
    match v {
        SimpleValue::Int(i) => Some(*i as i64),
        SimpleValue::Uint(i) => Some(*i as i64),
        SimpleValue::Long(i) => Some(*i),
        SimpleValue::Ulong(i) => i64::try_from(*i).ok(),
        SimpleValue::Short(i) => Some(*i as i64),
        SimpleValue::Ushort(i) => Some(*i as i64),
        SimpleValue::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The lock token of a Service Bus delivery: the `x-opt-lock-token` message annotation when
/// present, else the 16-byte delivery tag, which Service Bus fills with the token's .NET `Guid`
/// bytes (first three fields little-endian, as Python's `uuid.UUID(bytes_le=...)` reads them).
/// Returned in the RFC 4122 byte order an AMQP `uuid` travels in.
pub(crate) fn lock_token(annotation: Option<&Value>, delivery_tag: &[u8]) -> Option<[u8; 16]> {
    if let Some(Value::Uuid(u)) = annotation {
        return Some(*u.as_inner());
    }
    let tag: [u8; 16] = delivery_tag.try_into().ok()?;
    let mut out = tag;
    out[0..4].copy_from_slice(&[tag[3], tag[2], tag[1], tag[0]]);
    out[4..6].copy_from_slice(&[tag[5], tag[4]]);
    out[6..8].copy_from_slice(&[tag[7], tag[6]]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_token_from_a_dotnet_guid_delivery_tag() {
        // Guid 00112233-4455-6677-8899-aabbccddeeff as .NET's Guid.ToByteArray() lays it out.
        let tag = [
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        assert_eq!(
            lock_token(None, &tag),
            Some([
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ])
        );
        assert_eq!(lock_token(None, &[1, 2, 3, 4]), None);
        let annotated = Value::Uuid([7u8; 16].into());
        assert_eq!(lock_token(Some(&annotated), &[1, 2, 3, 4]), Some([7u8; 16]));
    }
}
