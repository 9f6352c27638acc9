//! Exchanges and their bindings. Routing only reads; binding changes take the exchange's own lock.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::types::{FieldTable, ShortString};
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

/// A queue compared by identity, as the topic trie stores it.
#[derive(Clone)]
struct QueueRef(Arc<Queue>);

impl PartialEq for QueueRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

struct Binding {
    queue: Arc<Queue>,
    key: ShortString,
    arguments: FieldTable,
    /// Parsed once at bind time for headers exchanges.
    x_match: XMatch,
}

#[derive(Default)]
struct Bindings {
    all: Vec<Binding>,
    direct: HashMap<ShortString, Vec<Arc<Queue>>>,
    topic: TopicTrie<QueueRef>,
}

pub struct Exchange {
    pub name: ShortString,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
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

fn push_unique(out: &mut Vec<Arc<Queue>>, queue: &Arc<Queue>) {
    if !out.iter().any(|q| Arc::ptr_eq(q, queue)) {
        out.push(queue.clone());
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
        Exchange {
            name,
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            bindings: RwLock::new(Bindings::default()),
        }
    }

    /// Appends the queues bound to this exchange that a message with this routing key and these
    /// headers goes to, each once.
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<Arc<Queue>>,
    ) {
        let b = self.bindings.read();
        match self.kind {
            ExchangeKind::Direct => {
                if let Some(queues) = b.direct.get(routing_key) {
                    queues.iter().for_each(|q| push_unique(out, q));
                }
            }
            ExchangeKind::Fanout => b.all.iter().for_each(|bd| push_unique(out, &bd.queue)),
            ExchangeKind::Topic => b.topic.matches(routing_key, &mut |q| push_unique(out, &q.0)),
            ExchangeKind::Headers => b
                .all
                .iter()
                .filter(|bd| headers_match(bd.x_match, &bd.arguments, headers))
                .for_each(|bd| push_unique(out, &bd.queue)),
        }
    }

    /// Binds `queue`; binding the same queue, key and arguments twice is a no-op, as in RabbitMQ.
    pub fn bind(
        &self,
        queue: &Arc<Queue>,
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
        let exists = b.all.iter().any(|bd| {
            Arc::ptr_eq(&bd.queue, queue) && bd.key == key && bd.arguments == arguments
        });
        if exists {
            return Ok(());
        }
        match self.kind {
            ExchangeKind::Direct => b.direct.entry(key.clone()).or_default().push(queue.clone()),
            ExchangeKind::Topic => {
                b.topic.insert(key.as_str(), QueueRef(queue.clone()));
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
        b.all.push(Binding {
            queue: queue.clone(),
            key,
            arguments,
            x_match,
        });
        Ok(())
    }

    /// Removes one binding; returns whether it existed.
    pub fn unbind(&self, queue: &Arc<Queue>, key: &ShortString, arguments: &FieldTable) -> bool {
        let mut b = self.bindings.write();
        let Some(pos) = b.all.iter().position(|bd| {
            Arc::ptr_eq(&bd.queue, queue) && &bd.key == key && &bd.arguments == arguments
        }) else {
            return false;
        };
        b.all.remove(pos);
        let still_bound_same_key = b
            .all
            .iter()
            .any(|bd| Arc::ptr_eq(&bd.queue, queue) && &bd.key == key);
        if !still_bound_same_key {
            match self.kind {
                ExchangeKind::Direct => {
                    if let Some(list) = b.direct.get_mut(key) {
                        list.retain(|q| !Arc::ptr_eq(q, queue));
                        if list.is_empty() {
                            b.direct.remove(key);
                        }
                    }
                }
                ExchangeKind::Topic => {
                    b.topic.remove(key.as_str(), &QueueRef(queue.clone()));
                }
                ExchangeKind::Fanout | ExchangeKind::Headers => {}
            }
        }
        true
    }

    /// Removes every binding to `queue`; returns whether there were any.
    pub fn unbind_queue(&self, queue: &Arc<Queue>) -> bool {
        let mut b = self.bindings.write();
        let before = b.all.len();
        b.all.retain(|bd| !Arc::ptr_eq(&bd.queue, queue));
        if b.all.len() == before {
            return false;
        }
        b.direct.retain(|_, list| {
            list.retain(|q| !Arc::ptr_eq(q, queue));
            !list.is_empty()
        });
        b.topic.remove_where(&mut |q| Arc::ptr_eq(&q.0, queue));
        true
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
            return differ("auto_delete", bool_str(auto_delete), bool_str(self.auto_delete));
        }
        if internal != self.internal {
            return differ("internal", bool_str(internal), bool_str(self.internal));
        }
        for key in ["alternate-exchange"] {
            let (a, b) = (arguments.inner().get(key), self.arguments.inner().get(key));
            if a != b {
                return differ(key, &format!("{a:?}"), &format!("{b:?}"));
            }
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
