//! One face over rumqttc's two clients: MQTT 5 (`rumqttc::v5`) and MQTT 3.1.1 (`rumqttc`'s
//! root module, "v4" on the wire). The bridge's event loop and subscriptions use only this.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, Publish as Publish5, PublishProperties};
use rumqttc::{Outgoing, QoS, TlsConfiguration, Transport};
use warren_config::file::MqttBackend;

use super::mapping::Props;

/// The protocol of a bridge, from its `protocol` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V5,
    V311,
}

impl Protocol {
    pub fn parse(text: &str) -> Result<Protocol, String> {
        match text {
            "5" => Ok(Protocol::V5),
            "3.1.1" => Ok(Protocol::V311),
            other => Err(format!("protocol `{other}`; expected \"5\" or \"3.1.1\"")),
        }
    }
}

/// The broker's address from an `mqtt://` / `mqtts://` URL.
#[derive(Debug, PartialEq, Eq)]
pub struct Address {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// `user:password@` of the URL, percent-decoded.
    pub credentials: Option<(String, String)>,
}

/// `%XX` escapes decoded; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `mqtt://[user:password@]host[:port]` (1883) or `mqtts://…` (8883).
pub fn parse_url(url: &str) -> Result<Address, String> {
    let (scheme, rest) = url.split_once("://").ok_or("not a URL")?;
    let (default_port, tls) = match scheme {
        "mqtt" => (1883, false),
        "mqtts" => (8883, true),
        other => return Err(format!("scheme `{other}`; expected mqtt:// or mqtts://")),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let credentials = match userinfo {
        None => None,
        Some(u) => {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            let decode = |t: &str| percent_decode(t).ok_or("bad %-escape in the user or password");
            Some((decode(user)?, decode(pass)?))
        }
    };
    let (host, port) = match hostport.rsplit_once(':') {
        // `[::1]` alone: the colon is inside the brackets.
        Some((h, p)) if !h.is_empty() && !p.ends_with(']') => {
            (h, p.parse().map_err(|_| format!("bad port `{p}`"))?)
        }
        _ => (hostport, default_port),
    };
    let host = host.trim_matches(|c| c == '[' || c == ']');
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok(Address {
        host: host.to_string(),
        port,
        tls,
        credentials,
    })
}

/// A received PUBLISH, kept as rumqttc gave it (acknowledging needs it).
#[derive(Debug, Clone)]
pub enum Received {
    V5(Publish5),
    V311(rumqttc::Publish),
}

impl Received {
    pub fn topic(&self) -> String {
        match self {
            Received::V5(p) => String::from_utf8_lossy(&p.topic).into_owned(),
            Received::V311(p) => p.topic.clone(),
        }
    }

    pub fn payload(&self) -> Bytes {
        match self {
            Received::V5(p) => p.payload.clone(),
            Received::V311(p) => p.payload.clone(),
        }
    }

    pub fn dup(&self) -> bool {
        match self {
            Received::V5(p) => p.dup,
            Received::V311(p) => p.dup,
        }
    }

    /// What it carries besides topic and payload (MQTT 3.1.1: only RETAIN).
    pub fn props(&self) -> Props {
        match self {
            Received::V5(p) => match &p.properties {
                Some(pp) => Props {
                    retain: p.retain,
                    content_type: pp.content_type.clone(),
                    correlation_data: pp.correlation_data.clone(),
                    response_topic: pp.response_topic.clone(),
                    message_expiry_interval: pp.message_expiry_interval,
                    user_properties: pp.user_properties.clone(),
                },
                None => Props {
                    retain: p.retain,
                    ..Props::default()
                },
            },
            Received::V311(p) => Props {
                retain: p.retain,
                ..Props::default()
            },
        }
    }
}

/// The events the bridge acts on.
#[derive(Debug)]
pub enum Event {
    ConnAck {
        session_present: bool,
    },
    /// `failure`: the MQTT 5 reason code when it is an error (MQTT 3.1.1 PUBACKs carry none).
    PubAck {
        pkid: u16,
        failure: Option<String>,
    },
    Publish(Received),
    /// rumqttc wrote a PUBLISH with this packet id.
    OutgoingPublish(u16),
    Other,
}

#[derive(Clone)]
pub enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

pub enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

/// The largest packet MQTT allows (the remaining length is at most 268,435,455 bytes).
const MAX_PACKET: usize = 268_435_455;

/// Client and event loop for `config` (the URL already parsed into `address`), with a
/// persistent session: clean start/session off, manual acks.
pub fn connect(
    config: &MqttBackend,
    protocol: Protocol,
    address: &Address,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> (Client, EventLoop) {
    let keep_alive = Duration::from_secs(config.keep_alive_secs.max(5));
    let transport = tls.map(|c| Transport::tls_with_config(TlsConfiguration::Rustls(c)));
    // `username`/`password` win over credentials in the URL.
    let credentials = config
        .username
        .as_ref()
        .map(|user| (user.clone(), config.password.clone().unwrap_or_default()))
        .or_else(|| address.credentials.clone());
    match protocol {
        Protocol::V5 => {
            let mut options = rumqttc::v5::MqttOptions::new(
                config.client_id.clone(),
                address.host.clone(),
                address.port,
            );
            options
                .set_keep_alive(keep_alive)
                .set_clean_start(false)
                .set_session_expiry_interval(Some(7 * 24 * 3600))
                .set_receive_maximum(Some(u16::MAX))
                .set_manual_acks(true);
            if let Some((user, pass)) = credentials {
                options.set_credentials(user, pass);
            }
            if let Some(t) = transport {
                options.set_transport(t);
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, 10_000);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
        Protocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(
                config.client_id.clone(),
                address.host.clone(),
                address.port,
            );
            options
                .set_keep_alive(keep_alive)
                // The session (subscriptions, queued QoS 1 messages) outlives the connection
                // for as long as the broker keeps it: 3.1.1 has no expiry interval.
                .set_clean_session(false)
                .set_max_packet_size(MAX_PACKET, MAX_PACKET)
                .set_inflight(1000)
                .set_manual_acks(true);
            if let Some((user, pass)) = credentials {
                options.set_credentials(user, pass);
            }
            if let Some(t) = transport {
                options.set_transport(t);
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(options, 10_000);
            (Client::V311(client), EventLoop::V311(Box::new(eventloop)))
        }
    }
}

impl EventLoop {
    pub async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V5(e) => match e.poll().await.map_err(|e| e.to_string())? {
                rumqttc::v5::Event::Incoming(Packet5::ConnAck(ack)) => Ok(Event::ConnAck {
                    session_present: ack.session_present,
                }),
                rumqttc::v5::Event::Incoming(Packet5::PubAck(ack)) => Ok(Event::PubAck {
                    pkid: ack.pkid,
                    failure: ((ack.reason as u8) >= 0x80).then(|| format!("{:?}", ack.reason)),
                }),
                rumqttc::v5::Event::Incoming(Packet5::Publish(p)) => {
                    Ok(Event::Publish(Received::V5(p)))
                }
                rumqttc::v5::Event::Outgoing(Outgoing::Publish(pkid)) => {
                    Ok(Event::OutgoingPublish(pkid))
                }
                _ => Ok(Event::Other),
            },
            EventLoop::V311(e) => match e.poll().await.map_err(|e| e.to_string())? {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)) => Ok(Event::ConnAck {
                    session_present: ack.session_present,
                }),
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack)) => Ok(Event::PubAck {
                    pkid: ack.pkid,
                    failure: None,
                }),
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    Ok(Event::Publish(Received::V311(p)))
                }
                rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) => {
                    Ok(Event::OutgoingPublish(pkid))
                }
                _ => Ok(Event::Other),
            },
        }
    }
}

/// The request channel to the event loop is full.
#[derive(Debug)]
pub struct Full;

impl Client {
    /// Queues a QoS 1 PUBLISH. MQTT 3.1.1 sends only RETAIN of `props`.
    pub fn try_publish(&self, topic: &str, payload: &Bytes, props: &Props) -> Result<(), Full> {
        match self {
            Client::V5(c) => {
                let properties = PublishProperties {
                    content_type: props.content_type.clone(),
                    correlation_data: props.correlation_data.clone(),
                    response_topic: props.response_topic.clone(),
                    message_expiry_interval: props.message_expiry_interval,
                    user_properties: props.user_properties.clone(),
                    ..PublishProperties::default()
                };
                c.try_publish_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    props.retain,
                    payload.clone(),
                    properties,
                )
                .map_err(|_| Full)
            }
            Client::V311(c) => c
                .try_publish(topic, QoS::AtLeastOnce, props.retain, payload.to_vec())
                .map_err(|_| Full),
        }
    }

    pub fn try_subscribe(&self, filter: String) -> Result<(), Full> {
        match self {
            Client::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|_| Full),
            Client::V311(c) => c.try_subscribe(filter, QoS::AtLeastOnce).map_err(|_| Full),
        }
    }

    /// PUBACK for `publish`, now if the request channel has room, else from a task.
    pub fn ack(&self, publish: Received) {
        let queued = match (self, &publish) {
            (Client::V5(c), Received::V5(p)) => c.try_ack(p).is_ok(),
            (Client::V311(c), Received::V311(p)) => c.try_ack(p).is_ok(),
            // A client only ever receives its own protocol's packets.
            _ => true,
        };
        if !queued {
            let client = self.clone();
            tokio::spawn(async move {
                match (&client, &publish) {
                    (Client::V5(c), Received::V5(p)) => {
                        let _ = c.ack(p).await;
                    }
                    (Client::V311(c), Received::V311(p)) => {
                        let _ = c.ack(p).await;
                    }
                    _ => {}
                }
            });
        }
    }

    pub async fn disconnect(&self) {
        match self {
            Client::V5(c) => {
                let _ = c.disconnect().await;
            }
            Client::V311(c) => {
                let _ = c.disconnect().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let a = |host: &str, port, tls| Address {
            host: host.into(),
            port,
            tls,
            credentials: None,
        };
        assert_eq!(parse_url("mqtt://h:1889").unwrap(), a("h", 1889, false));
        assert_eq!(
            parse_url("mqtt://u:p%40ss@h").unwrap(),
            Address {
                credentials: Some(("u".into(), "p@ss".into())),
                ..a("h", 1883, false)
            }
        );
        assert!(parse_url("mqtt://u:%zz@h").is_err());
        assert_eq!(parse_url("mqtts://h").unwrap(), a("h", 8883, true));
        assert_eq!(
            parse_url("mqtts://127.0.0.1:1890/").unwrap(),
            a("127.0.0.1", 1890, true)
        );
        assert_eq!(parse_url("mqtt://[::1]:1").unwrap(), a("::1", 1, false));
        assert_eq!(parse_url("mqtt://[::1]").unwrap(), a("::1", 1883, false));
        assert!(parse_url("http://h").is_err());
        assert!(parse_url("mqtt://").is_err());
        assert!(parse_url("mqtt://h:x").is_err());
    }
}
