//! Configured routes: which published messages go to a bridged backend instead of (forward) or
//! as well as (mirror) the embedded engine, and the queue mappings that feed Warren queues from
//! a backend.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};
use warren_backends::engine::value::as_integer;
use warren_backends::engine::TopicTrie;
use warren_backends::Backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMode {
    Forward,
    Mirror,
}

/// One route, ready to match.
pub struct Route {
    pub exchange: String,
    pub routing_key: String,
    /// The routing-key pattern as a one-entry topic trie: the same rules as a topic binding.
    pattern: TopicTrie<()>,
    pub headers: Vec<(String, String)>,
    pub backend: Arc<dyn Backend>,
    pub destination: String,
    pub mode: RouteMode,
}

impl Route {
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        headers: Vec<(String, String)>,
        backend: Arc<dyn Backend>,
        destination: impl Into<String>,
        mode: RouteMode,
    ) -> Route {
        let routing_key = routing_key.into();
        let mut pattern = TopicTrie::default();
        pattern.insert(&routing_key, ());
        Route {
            exchange: exchange.into(),
            routing_key,
            pattern,
            headers,
            backend,
            destination: destination.into(),
            mode,
        }
    }

    fn matches(&self, exchange: &str, routing_key: &str, headers: Option<&FieldTable>) -> bool {
        if self.exchange != exchange {
            return false;
        }
        let mut hit = false;
        self.pattern.matches(routing_key, &mut |_| hit = true);
        hit && self
            .headers
            .iter()
            .all(|(k, v)| header_equals(headers, k, v))
    }
}

fn header_equals(headers: Option<&FieldTable>, key: &str, expected: &str) -> bool {
    match headers.and_then(|h| h.inner().get(key)) {
        Some(AMQPValue::LongString(s)) => s.as_bytes() == expected.as_bytes(),
        Some(AMQPValue::ShortString(s)) => s.as_str() == expected,
        Some(AMQPValue::Boolean(b)) => expected == if *b { "true" } else { "false" },
        Some(other) => as_integer(other).is_some_and(|n| n.to_string() == expected),
        None => false,
    }
}

/// A Warren queue fed from a backend's source.
pub struct QueueMapping {
    pub name: String,
    pub backend: Arc<dyn Backend>,
    pub source: String,
    pub prefetch: u16,
}

/// Everything configuration adds to the embedded broker. Empty: a plain broker.
#[derive(Default)]
pub struct RoutingPlan {
    pub routes: Vec<Route>,
    pub mappings: Vec<QueueMapping>,
    /// Refuse messages no route matches instead of routing them in the embedded engine.
    pub reject_unmatched: bool,
    /// Every backend, to close on shutdown.
    pub backends: Vec<Arc<dyn Backend>>,
}

impl RoutingPlan {
    /// The first route that matches, in configuration order.
    pub fn find(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matches(exchange, routing_key, headers))
    }

    /// Whether some route takes messages published to `exchange`: such publishes are accepted
    /// even when the exchange does not exist in the embedded engine.
    pub fn routes_exchange(&self, exchange: &str) -> bool {
        self.routes.iter().any(|r| r.exchange == exchange)
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.mappings.is_empty() && !self.reject_unmatched
    }
}
