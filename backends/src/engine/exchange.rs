//! Exchanges and their bindings. Routing only reads; binding changes take the exchange's own lock.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use parking_lot::RwLock;

use super::headers::{headers_match, XMatch};
use super::{EngineError, ErrorCode, Queue, TopicTrie};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(kind: &str) -> Result<ExchangeKind, EngineError> {
        match kind {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            other => Err(EngineError::new(
                ErrorCode::CommandInvalid,
                format!("unknown exchange type '{other}'"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Where a binding leads: a queue, or another exchange (exchange-to-exchange bindings).
#[derive(Clone, Debug)]
pub enum Destination {
    Queue(Arc<Queue>),
    Exchange(Arc<Exchange>),
}

impl PartialEq for Destination {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Destination::Queue(a), Destination::Queue(b)) => Arc::ptr_eq(a, b),
            (Destination::Exchange(a), Destination::Exchange(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Destination {
    fn push_into(&self, queues: &mut Vec<Arc<Queue>>, exchanges: &mut Vec<Arc<Exchange>>) {
        match self {
            Destination::Queue(q) => {
                if !queues.iter().any(|x| Arc::ptr_eq(x, q)) {
                    queues.push(q.clone());
                }
            }
            Destination::Exchange(e) => {
                if !exchanges.iter().any(|x| Arc::ptr_eq(x, e)) {
                    exchanges.push(e.clone());
                }
            }
        }
    }
}

struct Binding {
    destination: Destination,
    key: ShortString,
    arguments: FieldTable,
    /// Parsed once at bind time for headers exchanges.
    x_match: XMatch,
}

#[derive(Default)]
struct Bindings {
    all: Vec<Binding>,
    direct: HashMap<ShortString, Vec<Destination>>,
    topic: TopicTrie<Destination>,
}

pub struct Exchange {
    pub name: ShortString,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// `alternate-exchange` argument: where messages this exchange cannot route go.
    pub alternate: Option<ShortString>,
    bindings: RwLock<Bindings>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Exchange {
    pub fn new(
        name: ShortString,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Exchange {
        let alternate = match arguments.inner().get("alternate-exchange") {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned().into())
            }
            Some(AMQPValue::ShortString(s)) => Some(s.clone()),
            _ => None,
        };
        Exchange {
            name,
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            alternate,
            bindings: RwLock::new(Bindings::default()),
        }
    }

    /// Appends the queues and exchanges bound to this exchange that a message with this routing
    /// key and these headers goes to, each once.
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        queues: &mut Vec<Arc<Queue>>,
        exchanges: &mut Vec<Arc<Exchange>>,
    ) {
        let b = self.bindings.read();
        match self.kind {
            ExchangeKind::Direct => {
                if let Some(dests) = b.direct.get(routing_key) {
                    dests.iter().for_each(|d| d.push_into(queues, exchanges));
                }
            }
            ExchangeKind::Fanout => b
                .all
                .iter()
                .for_each(|bd| bd.destination.push_into(queues, exchanges)),
            ExchangeKind::Topic => b
                .topic
                .matches(routing_key, &mut |d| d.push_into(queues, exchanges)),
            ExchangeKind::Headers => b
                .all
                .iter()
                .filter(|bd| headers_match(bd.x_match, &bd.arguments, headers))
                .for_each(|bd| bd.destination.push_into(queues, exchanges)),
        }
    }

    /// Binds `destination`; the same destination, key and arguments twice is a no-op, as in
    /// RabbitMQ.
    pub fn bind(
        &self,
        destination: Destination,
        key: ShortString,
        arguments: FieldTable,
    ) -> Result<(), EngineError> {
        let x_match = if self.kind == ExchangeKind::Headers {
            XMatch::from_arguments(&arguments).ok_or_else(|| {
                EngineError::precondition(format!(
                    "invalid x-match field value in binding arguments for exchange '{}'",
                    self.name
                ))
            })?
        } else {
            XMatch::All
        };
        let mut b = self.bindings.write();
        let exists = b
            .all
            .iter()
            .any(|bd| bd.destination == destination && bd.key == key && bd.arguments == arguments);
        if exists {
            return Ok(());
        }
        let same_key_bound = b
            .all
            .iter()
            .any(|bd| bd.destination == destination && bd.key == key);
        if !same_key_bound {
            match self.kind {
                ExchangeKind::Direct => b
                    .direct
                    .entry(key.clone())
                    .or_default()
                    .push(destination.clone()),
                ExchangeKind::Topic => {
                    b.topic.insert(key.as_str(), destination.clone());
                }
                ExchangeKind::Fanout | ExchangeKind::Headers => {}
            }
        }
        b.all.push(Binding {
            destination,
            key,
            arguments,
            x_match,
        });
        Ok(())
    }

    /// Removes one binding; returns whether it existed.
    pub fn unbind(
        &self,
        destination: &Destination,
        key: &ShortString,
        arguments: &FieldTable,
    ) -> bool {
        let mut b = self.bindings.write();
        let Some(pos) = b.all.iter().position(|bd| {
            &bd.destination == destination && &bd.key == key && &bd.arguments == arguments
        }) else {
            return false;
        };
        b.all.remove(pos);
        let still_bound_same_key = b
            .all
            .iter()
            .any(|bd| &bd.destination == destination && &bd.key == key);
        if !still_bound_same_key {
            match self.kind {
                ExchangeKind::Direct => {
                    if let Some(list) = b.direct.get_mut(key) {
                        list.retain(|d| d != destination);
                        if list.is_empty() {
                            b.direct.remove(key);
                        }
                    }
                }
                ExchangeKind::Topic => {
                    b.topic.remove(key.as_str(), destination);
                }
                ExchangeKind::Fanout | ExchangeKind::Headers => {}
            }
        }
        true
    }

    /// Removes every binding to `destination`; returns whether there were any.
    pub fn unbind_destination(&self, destination: &Destination) -> bool {
        let mut b = self.bindings.write();
        let before = b.all.len();
        b.all.retain(|bd| &bd.destination != destination);
        if b.all.len() == before {
            return false;
        }
        b.direct.retain(|_, list| {
            list.retain(|d| d != destination);
            !list.is_empty()
        });
        b.topic.remove_where(&mut |d| d == destination);
        true
    }

    /// Drops all of this exchange's own bindings (it is being deleted).
    pub(crate) fn clear_bindings(&self) {
        *self.bindings.write() = Bindings::default();
    }

    /// Every binding of this exchange, for persisting definitions.
    pub fn bindings_snapshot(&self) -> Vec<(Destination, ShortString, FieldTable)> {
        self.bindings
            .read()
            .all
            .iter()
            .map(|b| (b.destination.clone(), b.key.clone(), b.arguments.clone()))
            .collect()
    }

    /// Whether `destination` is bound to this exchange.
    pub fn is_bound(&self, destination: &Destination) -> bool {
        self.bindings
            .read()
            .all
            .iter()
            .any(|bd| &bd.destination == destination)
    }

    pub fn has_bindings(&self) -> bool {
        !self.bindings.read().all.is_empty()
    }

    /// Whether declaring with these settings matches this exchange, with RabbitMQ's message.
    pub fn check_equivalent(
        &self,
        vhost: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: &FieldTable,
    ) -> Result<(), EngineError> {
        let differ = |arg: &str, received: &str, current: &str| {
            Err(EngineError::precondition(format!(
                "inequivalent arg '{arg}' for exchange '{}' in vhost '{vhost}': received '{received}' but current is '{current}'",
                self.name
            )))
        };
        if kind != self.kind {
            return differ("type", kind.as_str(), self.kind.as_str());
        }
        if durable != self.durable {
            return differ("durable", bool_str(durable), bool_str(self.durable));
        }
        if auto_delete != self.auto_delete {
            return differ(
                "auto_delete",
                bool_str(auto_delete),
                bool_str(self.auto_delete),
            );
        }
        if internal != self.internal {
            return differ("internal", bool_str(internal), bool_str(self.internal));
        }
        let key = "alternate-exchange";
        let (a, b) = (arguments.inner().get(key), self.arguments.inner().get(key));
        if a != b {
            return differ(key, &format!("{a:?}"), &format!("{b:?}"));
        }
        Ok(())
    }
}

pub(crate) fn bool_str(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}
