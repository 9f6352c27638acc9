//! A virtual host: the namespace of exchanges and queues, and the operations that change it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use amq_protocol::types::{FieldTable, ShortString};
use parking_lot::RwLock;
use rand::Rng;

use super::exchange::bool_str;
use super::exchange::Destination;
use super::queue::DurableLog;
use super::{ConnectionId, EngineError, Exchange, ExchangeKind, Queue, QueueOptions};
use crate::store::{BindingDef, Definitions, ExchangeDef, QueueDef, Store};

/// Arguments of exchange.declare other than the name.
#[derive(Debug, Clone, Default)]
pub struct ExchangeOptions {
    pub kind: String,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// The answer to queue.declare.
#[derive(Debug, Clone)]
pub struct DeclaredQueue {
    pub queue: Arc<Queue>,
    pub message_count: u32,
    pub consumer_count: u32,
    pub created: bool,
}

pub struct VHost {
    name: ShortString,
    /// Handed to queues so they can dead-letter through exchanges and delete themselves.
    me: std::sync::Weak<VHost>,
    exchanges: RwLock<HashMap<ShortString, Arc<Exchange>>>,
    queues: RwLock<HashMap<ShortString, Arc<Queue>>>,
    /// Bumped whenever an exchange or queue is deleted, so callers that cache lookups know
    /// their cache may hold a deleted entity.
    generation: AtomicU64,
    /// Where durable entities and persistent messages are kept; `None`: memory only.
    store: Option<Arc<Store>>,
    next_queue_id: AtomicU64,
}

impl std::fmt::Debug for VHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VHost").field("name", &self.name).finish()
    }
}

/// The pseudo-queue name RPC clients consume from for direct reply-to.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

const DEFAULT_EXCHANGES: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

impl VHost {
    pub fn new(name: &str) -> Arc<VHost> {
        let exchanges = DEFAULT_EXCHANGES
            .iter()
            .map(|(name, kind)| {
                let ex = Exchange::new(
                    (*name).into(),
                    *kind,
                    true,
                    false,
                    false,
                    FieldTable::default(),
                );
                (ShortString::from(*name), Arc::new(ex))
            })
            .collect();
        Arc::new_cyclic(|me| VHost {
            name: name.into(),
            me: me.clone(),
            exchanges: RwLock::new(exchanges),
            queues: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            store: None,
            next_queue_id: AtomicU64::new(1),
        })
    }

    /// A vhost backed by `store`: durable exchanges, queues (with their messages) and bindings
    /// are recovered from it, and every durable change is written to it.
    pub fn with_store(name: &str, store: Arc<Store>) -> std::io::Result<Arc<VHost>> {
        let started = std::time::Instant::now();
        let defs = store.load_definitions()?;
        let fresh = Self::new(name);
        let vhost = Arc::new_cyclic(|me| VHost {
            name: name.into(),
            me: me.clone(),
            exchanges: RwLock::new(std::mem::take(&mut *fresh.exchanges.write())),
            queues: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            next_queue_id: AtomicU64::new(defs.queues.iter().map(|q| q.id + 1).max().unwrap_or(1)),
            store: Some(store.clone()),
        });
        for ex in &defs.exchanges {
            let kind = ExchangeKind::parse(&ex.kind)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            let exchange = Exchange::new(
                ex.name.as_str().into(),
                kind,
                true,
                ex.auto_delete,
                ex.internal,
                ex.arguments.clone(),
            );
            vhost
                .exchanges
                .write()
                .insert(ex.name.as_str().into(), Arc::new(exchange));
        }
        let mut messages = 0usize;
        let mut paged = 0u64;
        for q in &defs.queues {
            let (log, recovered) = store.open_queue_log(q.id)?;
            for damage in &recovered.damage {
                tracing::error!(queue = %q.name, "damaged record skipped during recovery: {damage}");
            }
            messages += recovered.messages.len();
            paged += recovered.paged;
            let options = QueueOptions {
                durable: true,
                exclusive: None,
                auto_delete: q.auto_delete,
                arguments: q.arguments.clone(),
            };
            let args =
                super::QueueArgs::parse(&options.arguments, &q.name, name).unwrap_or_default();
            let queue = Queue::with_log(
                q.name.as_str().into(),
                vhost.name.clone(),
                vhost.me.clone(),
                options,
                args,
                DurableLog {
                    id: q.id,
                    log,
                    recovered,
                    memory_messages: store.options.queue_memory_messages,
                    memory_bytes: store.options.queue_memory_bytes,
                },
            );
            vhost.queues.write().insert(q.name.as_str().into(), queue);
        }
        for b in &defs.bindings {
            let Ok(source) = vhost.exchange(&b.source) else {
                continue;
            };
            let destination = if b.destination_is_queue {
                match vhost.queue_by_name(&b.destination) {
                    Some(q) => Destination::Queue(q),
                    None => continue,
                }
            } else {
                match vhost.exchange(&b.destination) {
                    Ok(e) => Destination::Exchange(e),
                    Err(_) => continue,
                }
            };
            let _ = source.bind(
                destination,
                b.routing_key.as_str().into(),
                b.arguments.clone(),
            );
        }
        tracing::info!(
            vhost = name,
            exchanges = defs.exchanges.len(),
            queues = defs.queues.len(),
            bindings = defs.bindings.len(),
            messages = messages as u64 + paged,
            paged,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered durable state"
        );
        Ok(vhost)
    }

    /// Writes the durable definitions after a change. A failure is reported to the client that
    /// made the change: its entity exists now but would not survive a restart.
    fn persist_definitions(&self) -> Result<(), EngineError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let exchanges: Vec<Arc<Exchange>> = self.exchanges.read().values().cloned().collect();
        let queues: Vec<Arc<Queue>> = self.queues.read().values().cloned().collect();
        let mut defs = Definitions::default();
        for ex in &exchanges {
            let builtin = ex.name.as_str().is_empty() || ex.name.as_str().starts_with("amq.");
            if ex.durable && !builtin {
                defs.exchanges.push(ExchangeDef {
                    name: ex.name.to_string(),
                    kind: ex.kind.as_str().into(),
                    auto_delete: ex.auto_delete,
                    internal: ex.internal,
                    arguments: ex.arguments.clone(),
                });
            }
            if !ex.durable {
                continue;
            }
            for (dest, key, arguments) in ex.bindings_snapshot() {
                let (destination, destination_is_queue) = match &dest {
                    Destination::Queue(q) if q.is_durable() => (q.name().to_string(), true),
                    Destination::Exchange(e) if e.durable => (e.name.to_string(), false),
                    _ => continue,
                };
                defs.bindings.push(BindingDef {
                    source: ex.name.to_string(),
                    destination,
                    destination_is_queue,
                    routing_key: key.to_string(),
                    arguments,
                });
            }
        }
        for q in &queues {
            if let Some(id) = q.store_id() {
                defs.queues.push(QueueDef {
                    name: q.name().to_string(),
                    id,
                    auto_delete: q.options().auto_delete,
                    arguments: q.options().arguments.clone(),
                });
            }
        }
        store.save_definitions(&defs).map_err(|e| {
            tracing::error!(error = %e, "cannot write durable definitions");
            EngineError::new(
                super::ErrorCode::InternalError,
                format!("cannot persist definitions: {e}"),
            )
        })
    }

    /// Whether a change to this exchange or queue must be written to the store.
    fn touches_store(&self, durable: bool) -> bool {
        durable && self.store.is_some()
    }

    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn exchange(&self, name: &str) -> Result<Arc<Exchange>, EngineError> {
        self.exchanges
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::not_found("exchange", name, self.name()))
    }

    pub fn declare_exchange(
        &self,
        name: &str,
        opts: ExchangeOptions,
    ) -> Result<Arc<Exchange>, EngineError> {
        // RabbitMQ's order: the type (a connection error), the default exchange, then an
        // existing exchange's equivalence; the reserved prefix only matters on creation.
        if opts.passive {
            if name.is_empty() {
                return Err(default_exchange_refused());
            }
            return self.exchange(name);
        }
        let kind = ExchangeKind::parse(&opts.kind)?;
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        let mut exchanges = self.exchanges.write();
        if let Some(existing) = exchanges.get(name) {
            existing.check_equivalent(
                self.name(),
                kind,
                opts.durable,
                opts.auto_delete,
                opts.internal,
                &opts.arguments,
            )?;
            return Ok(existing.clone());
        }
        if name.starts_with("amq.") {
            return Err(EngineError::access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let ex = Arc::new(Exchange::new(
            name.into(),
            kind,
            opts.durable,
            opts.auto_delete,
            opts.internal,
            opts.arguments,
        ));
        exchanges.insert(name.into(), ex.clone());
        drop(exchanges);
        if self.touches_store(ex.durable) {
            self.persist_definitions()?;
        }
        Ok(ex)
    }

    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), EngineError> {
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if name.starts_with("amq.") {
            return Err(EngineError::access_refused(format!(
                "deletion of system exchange '{name}' in vhost '{}' not allowed",
                self.name()
            )));
        }
        let ex = {
            let mut exchanges = self.exchanges.write();
            let Some(ex) = exchanges.get(name) else {
                // RabbitMQ answers delete-ok for an exchange that does not exist.
                return Ok(());
            };
            if if_unused && ex.has_bindings() {
                return Err(EngineError::precondition(format!(
                    "exchange '{name}' in vhost '{}' in use",
                    self.name()
                )));
            }
            let ex = ex.clone();
            exchanges.remove(name);
            ex
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        ex.clear_bindings();
        let durable = ex.durable;
        self.unbind_everywhere(&Destination::Exchange(ex));
        if self.touches_store(durable) {
            self.persist_definitions()?;
        }
        Ok(())
    }

    /// Removes every binding that leads to `destination`, deleting auto-delete exchanges that
    /// lose their last binding.
    fn unbind_everywhere(&self, destination: &Destination) {
        let exchanges: Vec<Arc<Exchange>> = self.exchanges.read().values().cloned().collect();
        for ex in exchanges {
            if ex.unbind_destination(destination) && ex.auto_delete && !ex.has_bindings() {
                self.remove_auto_deleted_exchange(&ex);
            }
        }
    }

    /// Finds a queue the connection `owner` may use: 404 if absent, 405 if another connection's
    /// exclusive queue.
    pub fn queue(&self, name: &str, owner: ConnectionId) -> Result<Arc<Queue>, EngineError> {
        let queue = self
            .queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::not_found("queue", name, self.name()))?;
        self.check_exclusive(&queue, owner)?;
        Ok(queue)
    }

    /// The queue the default exchange routes `routing_key` to, if any.
    pub fn queue_by_name(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues.read().get(name).cloned()
    }

    fn check_exclusive(&self, queue: &Queue, owner: ConnectionId) -> Result<(), EngineError> {
        match queue.options().exclusive {
            Some(o) if o != owner => Err(EngineError::new(
                super::ErrorCode::ResourceLocked,
                format!(
                    "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                    queue.name(),
                    self.name()
                ),
            )),
            _ => Ok(()),
        }
    }

    pub fn declare_queue(
        &self,
        name: &str,
        passive: bool,
        options: QueueOptions,
        owner: ConnectionId,
    ) -> Result<DeclaredQueue, EngineError> {
        if passive {
            let queue = self.queue(name, owner)?;
            let (message_count, consumer_count) = queue.counts();
            return Ok(DeclaredQueue {
                queue,
                message_count,
                consumer_count,
                created: false,
            });
        }
        if name.starts_with("amq.") {
            return Err(EngineError::access_refused(format!(
                "queue name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let name: ShortString = if name.is_empty() {
            generate_queue_name().into()
        } else {
            name.into()
        };
        let mut queues = self.queues.write();
        if let Some(existing) = queues.get(&name) {
            let existing = existing.clone();
            drop(queues);
            self.check_exclusive(&existing, owner)?;
            if !existing.is_mapped() {
                self.check_queue_equivalent(&existing, &options)?;
            }
            existing.touch();
            let (message_count, consumer_count) = existing.counts();
            return Ok(DeclaredQueue {
                queue: existing,
                message_count,
                consumer_count,
                created: false,
            });
        }
        let args = super::QueueArgs::parse(&options.arguments, name.as_str(), self.name())?;
        let durable = options.durable && options.exclusive.is_none();
        let queue = match self.store.as_ref().filter(|_| durable) {
            Some(store) => {
                let id = self.next_queue_id.fetch_add(1, Ordering::AcqRel);
                let (log, recovered) = store.open_queue_log(id).map_err(|e| {
                    EngineError::new(
                        super::ErrorCode::InternalError,
                        format!("cannot create the log of queue '{name}': {e}"),
                    )
                })?;
                Queue::with_log(
                    name.clone(),
                    self.name.clone(),
                    self.me.clone(),
                    options,
                    args,
                    DurableLog {
                        id,
                        log,
                        recovered,
                        memory_messages: store.options.queue_memory_messages,
                        memory_bytes: store.options.queue_memory_bytes,
                    },
                )
            }
            None => Queue::with_args(
                name.clone(),
                self.name.clone(),
                self.me.clone(),
                options,
                args,
            ),
        };
        queues.insert(name, queue.clone());
        drop(queues);
        if queue.is_durable() {
            self.persist_definitions()?;
        }
        Ok(DeclaredQueue {
            queue,
            message_count: 0,
            consumer_count: 0,
            created: true,
        })
    }

    /// The Warren side of a queue mapping: a queue fed from a bridged backend. Clients may
    /// declare it with any flags; it is not theirs to shape.
    pub fn declare_mapped_queue(&self, name: &str) -> Arc<Queue> {
        let options = QueueOptions::default();
        let queue = Queue::with_args(
            name.into(),
            self.name.clone(),
            self.me.clone(),
            options,
            super::QueueArgs::default(),
        );
        queue.set_mapped();
        self.queues.write().insert(name.into(), queue.clone());
        queue
    }

    /// The pseudo-queue behind direct reply-to: `amq.rabbitmq.reply-to.<random>`, exclusive to
    /// the consuming connection and deleted with its consumer.
    pub fn declare_reply_queue(&self, owner: ConnectionId) -> Arc<Queue> {
        let name: ShortString = format!("{REPLY_TO}.{}", &generate_queue_name()[8..]).into();
        let options = QueueOptions {
            durable: false,
            exclusive: Some(owner),
            auto_delete: true,
            arguments: FieldTable::default(),
        };
        let queue = Queue::with_args(
            name.clone(),
            self.name.clone(),
            self.me.clone(),
            options,
            super::QueueArgs::default(),
        );
        self.queues.write().insert(name, queue.clone());
        queue
    }

    fn check_queue_equivalent(&self, q: &Queue, new: &QueueOptions) -> Result<(), EngineError> {
        let cur = q.options();
        let differ = |arg: &str, received: &str, current: &str| {
            Err(EngineError::precondition(format!(
                "inequivalent arg '{arg}' for queue '{}' in vhost '{}': received '{received}' but current is '{current}'",
                q.name(),
                self.name()
            )))
        };
        if new.durable != cur.durable {
            return differ("durable", bool_str(new.durable), bool_str(cur.durable));
        }
        if new.exclusive.is_some() != cur.exclusive.is_some() {
            return Err(EngineError::new(
                super::ErrorCode::ResourceLocked,
                format!(
                    "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                    q.name(),
                    self.name()
                ),
            ));
        }
        if new.auto_delete != cur.auto_delete {
            return differ(
                "auto_delete",
                bool_str(new.auto_delete),
                bool_str(cur.auto_delete),
            );
        }
        // RabbitMQ compares the x- arguments it knows; both sides must agree on each.
        for (key, value) in cur.arguments.inner().iter().chain(new.arguments.inner()) {
            if !key.as_str().starts_with("x-") {
                continue;
            }
            let (a, b) = (
                new.arguments.inner().get(key),
                cur.arguments.inner().get(key),
            );
            if a != b && !integers_equal(a, b) {
                let _ = value;
                return differ(key.as_str(), &show(a), &show(b));
            }
        }
        Ok(())
    }

    pub fn delete_queue(
        &self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        owner: ConnectionId,
    ) -> Result<u32, EngineError> {
        // RabbitMQ answers delete-ok (message count 0) for a queue that does not exist.
        let Some(queue) = self.queue_by_name(name) else {
            return Ok(0);
        };
        self.check_exclusive(&queue, owner)?;
        let (messages, consumers) = queue.counts();
        if if_unused && consumers > 0 {
            return Err(EngineError::precondition(format!(
                "queue '{name}' in vhost '{}' in use",
                self.name()
            )));
        }
        if if_empty && messages > 0 {
            return Err(EngineError::precondition(format!(
                "queue '{name}' in vhost '{}' not empty",
                self.name()
            )));
        }
        Ok(self.remove_queue(&queue).unwrap_or(0))
    }

    /// Deletes a queue: out of the namespace, out of every binding, consumers told. Returns the
    /// number of ready messages dropped, or `None` if it was already gone.
    pub fn remove_queue(&self, queue: &Arc<Queue>) -> Option<u32> {
        {
            let mut queues = self.queues.write();
            match queues.get(queue.name()) {
                Some(q) if Arc::ptr_eq(q, queue) => {
                    queues.remove(queue.name());
                }
                _ => return None,
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        let dropped = queue.mark_deleted();
        self.unbind_everywhere(&Destination::Queue(queue.clone()));
        if queue.is_durable() {
            // The queue is gone either way; a failure is logged by persist_definitions.
            let _ = self.persist_definitions();
        }
        dropped
    }

    fn remove_auto_deleted_exchange(&self, ex: &Arc<Exchange>) {
        let mut exchanges = self.exchanges.write();
        if let Some(current) = exchanges.get(&ex.name) {
            if Arc::ptr_eq(current, ex) && !ex.has_bindings() {
                exchanges.remove(&ex.name);
                self.generation.fetch_add(1, Ordering::AcqRel);
            } else {
                return;
            }
        }
        drop(exchanges);
        // An auto-deleted exchange may itself have been bound to other exchanges.
        self.unbind_everywhere(&Destination::Exchange(ex.clone()));
        if self.touches_store(ex.durable) {
            let _ = self.persist_definitions();
        }
    }

    /// Deletes the exclusive queues of a connection that has closed.
    pub fn remove_exclusive_queues(&self, owner: ConnectionId) {
        let owned: Vec<Arc<Queue>> = self
            .queues
            .read()
            .values()
            .filter(|q| q.options().exclusive == Some(owner))
            .cloned()
            .collect();
        for q in owned {
            self.remove_queue(&q);
        }
    }

    pub fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
        owner: ConnectionId,
    ) -> Result<(), EngineError> {
        // RabbitMQ checks the default exchange, then the exchange, then the queue.
        if exchange.is_empty() {
            return Err(default_exchange_refused());
        }
        let ex = self.exchange(exchange)?;
        let queue = self.queue(queue, owner)?;
        let durable = ex.durable && queue.is_durable();
        ex.bind(Destination::Queue(queue), routing_key.into(), arguments)?;
        if self.touches_store(durable) {
            self.persist_definitions()?;
        }
        Ok(())
    }

    /// exchange.bind: messages routed by `source` also go through `destination`.
    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), EngineError> {
        let (dest, src) = self.exchange_pair(destination, source)?;
        let durable = src.durable && dest.durable;
        src.bind(Destination::Exchange(dest), routing_key.into(), arguments)?;
        if self.touches_store(durable) {
            self.persist_definitions()?;
        }
        Ok(())
    }

    pub fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), EngineError> {
        let (dest, src) = self.exchange_pair(destination, source)?;
        let durable = src.durable && dest.durable;
        if src.unbind(&Destination::Exchange(dest), &routing_key.into(), arguments)
            && src.auto_delete
            && !src.has_bindings()
        {
            self.remove_auto_deleted_exchange(&src);
        }
        if self.touches_store(durable) {
            self.persist_definitions()?;
        }
        Ok(())
    }

    fn exchange_pair(
        &self,
        destination: &str,
        source: &str,
    ) -> Result<(Arc<Exchange>, Arc<Exchange>), EngineError> {
        if destination.is_empty() || source.is_empty() {
            return Err(default_exchange_refused());
        }
        Ok((self.exchange(destination)?, self.exchange(source)?))
    }

    pub fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
        owner: ConnectionId,
    ) -> Result<(), EngineError> {
        if exchange.is_empty() {
            return Err(default_exchange_refused());
        }
        // RabbitMQ answers unbind-ok when the exchange, the queue or the binding does not exist.
        let (Ok(ex), Some(queue)) = (self.exchange(exchange), self.queue_by_name(queue)) else {
            return Ok(());
        };
        self.check_exclusive(&queue, owner)?;
        let durable = ex.durable && queue.is_durable();
        if ex.unbind(&Destination::Queue(queue), &routing_key.into(), arguments)
            && ex.auto_delete
            && !ex.has_bindings()
        {
            self.remove_auto_deleted_exchange(&ex);
        }
        if self.touches_store(durable) {
            self.persist_definitions()?;
        }
        Ok(())
    }

    /// Appends the queues a message published to `exchange` goes to: through its bindings,
    /// through exchange-to-exchange bindings (each exchange visited once, so binding loops end),
    /// and to the alternate exchange of any exchange that could route it nowhere.
    pub fn route(
        &self,
        exchange: &Exchange,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<Arc<Queue>>,
    ) {
        if exchange.name.as_str().is_empty() {
            if let Some(q) = self.queue_by_name(routing_key) {
                out.push(q);
            }
            return;
        }
        let mut visited: Vec<*const Exchange> = Vec::new();
        self.route_through(exchange, routing_key, headers, out, &mut visited);
    }

    fn route_through(
        &self,
        exchange: &Exchange,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<Arc<Queue>>,
        visited: &mut Vec<*const Exchange>,
    ) {
        let me = exchange as *const Exchange;
        if visited.contains(&me) {
            return;
        }
        visited.push(me);
        let before = out.len();
        let mut next = Vec::new();
        exchange.route(routing_key, headers, out, &mut next);
        // As in RabbitMQ, the alternate exchange is for a message this exchange's own bindings
        // match nothing for; one that reaches a bound exchange (even one that routes it
        // nowhere) is not handed to it.
        let matched = out.len() != before || !next.is_empty();
        for ex in next {
            self.route_through(&ex, routing_key, headers, out, visited);
        }
        if !matched {
            if let Some(alt) = exchange.alternate.as_ref() {
                if let Ok(alt) = self.exchange(alt.as_str()) {
                    self.route_through(&alt, routing_key, headers, out, visited);
                }
            }
        }
    }
}

fn integers_equal(
    a: Option<&amq_protocol::types::AMQPValue>,
    b: Option<&amq_protocol::types::AMQPValue>,
) -> bool {
    use super::value::as_integer;
    match (a.and_then(as_integer), b.and_then(as_integer)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn show(v: Option<&amq_protocol::types::AMQPValue>) -> String {
    use amq_protocol::types::AMQPValue as V;
    match v {
        None => "none".into(),
        Some(V::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(V::ShortString(s)) => s.to_string(),
        Some(V::LongLongInt(x)) => x.to_string(),
        Some(V::LongInt(x)) => x.to_string(),
        Some(V::ShortInt(x)) => x.to_string(),
        Some(other) => format!("{other:?}"),
    }
}

fn default_exchange_refused() -> EngineError {
    EngineError::access_refused("operation not permitted on the default exchange")
}

/// A server-named queue, as RabbitMQ makes them: `amq.gen-` and 22 URL-safe base64 characters.
fn generate_queue_name() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..22)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("amq.gen-{suffix}")
}
