//! `address_capabilities` of an amqp10 backend, against a tiny in-process AMQP 1.0 acceptor
//! (fe2o3's `acceptor` feature) that records the terminus capabilities of every link the bridge
//! attaches. ActiveMQ Artemis reads `queue` / `topic` there as the routing type (anycast /
//! multicast); no Artemis broker runs in this environment, so the wire is what is checked.

mod support;

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SaslAnonymousMechanism, SessionAcceptor,
};
use fe2o3_amqp_types::definitions::Role;
use fe2o3_amqp_types::messaging::{Body, Message as AmqpMessage, Target};
use fe2o3_amqp_types::performatives::Attach;
use fe2o3_amqp_types::primitives::{Array, Binary, Symbol};
use lapin::BasicProperties;
use serde_amqp::Value;
use tokio::sync::mpsc;
use warren_backends::{Backend, Health, Settlement};
use warren_bridges::amqp10::Amqp10Bridge;
use warren_config::file::{AddressCapability, Amqp10Backend, Amqp10Target, RetryConfig};

use support::Outcomes;

/// A link the bridge attached, as the acceptor saw it.
#[derive(Debug, Clone, PartialEq)]
struct Attached {
    address: String,
    /// The bridge sends on it (the capabilities are its target's), else receives (its source's).
    bridge_sends: bool,
    capabilities: Vec<String>,
}

fn symbols(capabilities: &Option<Array<Symbol>>) -> Vec<String> {
    capabilities
        .as_ref()
        .map(|c| c.0.iter().map(|s| s.as_str().to_string()).collect())
        .unwrap_or_default()
}

/// Accepts every connection, session and link; reports each link attach on `seen`. A link the
/// bridge receives on gets one message, so the subscription is seen working end to end.
async fn serve(listener: tokio::net::TcpListener, seen: mpsc::UnboundedSender<Attached>) {
    while let Ok((stream, _)) = listener.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let acceptor = ConnectionAcceptor::builder()
                .container_id("fake-artemis")
                .sasl_acceptor(SaslAnonymousMechanism::new())
                .build();
            let Ok(mut conn) = acceptor.accept(stream).await else {
                return;
            };
            while let Some(incoming) = conn.next_incoming_session().await {
                let Ok(mut session) = SessionAcceptor::new()
                    .accept_incoming_session(incoming, &mut conn)
                    .await
                else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let links = LinkAcceptor::new();
                    // The attach is read as the bridge sent it: the accepted link's own target
                    // carries the acceptor's capabilities, not the peer's.
                    while let Some(attach) = session.next_incoming_attach().await {
                        let _ = seen.send(attached(&attach));
                        match links.accept_incoming_attach(attach, &mut session).await {
                            Ok(LinkEndpoint::Receiver(mut r)) => {
                                tokio::spawn(async move {
                                    while let Ok(d) = r.recv::<Body<Value>>().await {
                                        if r.accept(&d).await.is_err() {
                                            return;
                                        }
                                    }
                                });
                            }
                            Ok(LinkEndpoint::Sender(mut s)) => {
                                tokio::spawn(async move {
                                    let message = AmqpMessage::builder()
                                        .data(Binary::from(b"hello".to_vec()))
                                        .build();
                                    let _ = s.send(message).await;
                                    // Held open until the bridge detaches it.
                                    std::future::pending::<()>().await;
                                });
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        });
    }
}

/// What a link attach from the bridge asks for: its role, address and terminus capabilities.
fn attached(attach: &Attach) -> Attached {
    match attach.role {
        // The bridge sends: the capabilities are its target's.
        Role::Sender => {
            let target = attach
                .target
                .as_ref()
                .and_then(|t| Target::try_from((**t).clone()).ok());
            Attached {
                address: target
                    .as_ref()
                    .and_then(|t| t.address.clone())
                    .unwrap_or_default(),
                bridge_sends: true,
                capabilities: symbols(&target.and_then(|t| t.capabilities)),
            }
        }
        Role::Receiver => {
            let source = attach.source.as_deref();
            Attached {
                address: source.and_then(|s| s.address.clone()).unwrap_or_default(),
                bridge_sends: false,
                capabilities: symbols(&source.and_then(|s| s.capabilities.clone())),
            }
        }
    }
}

fn config(port: u16) -> Amqp10Backend {
    Amqp10Backend {
        url: Some(format!("amqp://127.0.0.1:{port}")),
        target: Some(Amqp10Target::Generic),
        max_in_flight: 10,
        address_capabilities: [
            ("orders".to_string(), AddressCapability::Queue),
            ("events".to_string(), AddressCapability::Topic),
        ]
        .into_iter()
        .collect(),
        retry: RetryConfig {
            max_attempts: 3,
            initial_backoff_ms: 50,
            max_backoff_ms: 200,
        },
        ..Default::default()
    }
}

/// The next attach the acceptor saw, failing the test after 10 s.
async fn next_attach(seen: &mut mpsc::UnboundedReceiver<Attached>) -> Attached {
    tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("no link attached within 10s")
        .expect("the acceptor stopped")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_addresses_carry_their_capability_and_others_none() {
    support::init_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(serve(listener, seen_tx));

    let bridge = Amqp10Bridge::start("capabilities", &config(port)).unwrap();
    support::wait_health(bridge.as_ref(), Health::Ready, Duration::from_secs(10)).await;

    // One at a time, so each attach is the one just caused.
    let outcomes = Arc::new(Outcomes::default());
    let sends = [("orders", vec!["queue"]), ("plain", vec![])];
    for (i, (address, expected)) in sends.iter().enumerate() {
        let body = format!("m{i}").into_bytes();
        let message = support::message("k", BasicProperties::default(), body);
        bridge.publish(address, message, outcomes.guard(i));
        let attached = next_attach(&mut seen).await;
        assert_eq!(
            attached,
            Attached {
                address: address.to_string(),
                bridge_sends: true,
                capabilities: expected.iter().map(|s| s.to_string()).collect(),
            }
        );
        outcomes.wait_done(i + 1, Duration::from_secs(10)).await;
    }
    assert!(
        outcomes.failed.lock().unwrap().is_empty(),
        "{:?}",
        outcomes.failed
    );

    // `events::audit` is Artemis's fully qualified queue name: an address like any other, sent
    // as written, with no capability unless it is listed itself.
    let receives = [("events", vec!["topic"]), ("events::audit", vec![])];
    for (address, expected) in receives {
        let mut sub = bridge.subscribe(address, 5).await.unwrap();
        let attached = next_attach(&mut seen).await;
        assert_eq!(
            attached,
            Attached {
                address: address.to_string(),
                bridge_sends: false,
                capabilities: expected.iter().map(|s| s.to_string()).collect(),
            }
        );
        let got = support::next(&mut sub).await;
        assert_eq!(got.message.body(), &b"hello"[..]);
        got.settle.settle(Settlement::Ack);
        drop(sub);
    }
    bridge.close().await;
}
