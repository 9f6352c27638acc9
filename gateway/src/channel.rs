//! One AMQP channel as its connection's reader task sees it: method handling, publish assembly,
//! consumers, acknowledgements and confirms.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use amq_protocol::protocol::{basic, channel, confirm, exchange, queue, tx, AMQPClass};
use amq_protocol::types::{FieldTable, ShortString};
use bytes::{Bytes, BytesMut};
use warren_backends::engine::{
    ConnectionId, Consumer, Exchange, ExchangeOptions, PublishOutcome, Queue, QueueOptions,
    QueuedMessage, VHost, REPLY_TO,
};
use warren_backends::message::encode_properties;
use warren_backends::store::{Completion, Guard};
use warren_backends::Message;

use crate::codec::{ContentHeader, CLASS_BASIC};
use crate::confirm::ConfirmTracker;
use crate::consumer::{AmqpConsumer, ChannelShared, Unacked};
use crate::error::{code, Exception};
use crate::outbox::Outbox;
use crate::routes::{RouteMode, RoutingPlan};

/// What a channel needs from its connection.
pub struct ConnContext {
    pub id: ConnectionId,
    pub vhost: Arc<VHost>,
    pub outbox: Arc<Outbox>,
    pub max_message_size: u64,
    pub cancel_notify: bool,
    /// The authenticated user: a published user_id property must name it.
    pub user: String,
    /// Wakes the reader to send confirms that settled outside its own frame handling.
    pub confirm_wake: Arc<tokio::sync::Notify>,
    /// Configured routes to bridged backends.
    pub plan: Arc<RoutingPlan>,
}

/// A message being assembled from publish, header and body frames.
struct Inbound {
    /// `None` when the exchange exists only as a configured route's source.
    exchange: Option<Arc<Exchange>>,
    exchange_name: ShortString,
    routing_key: ShortString,
    mandatory: bool,
    header: Option<ContentHeader>,
    body: BodyParts,
}

enum BodyParts {
    Empty,
    /// The common case: the whole body in one frame, kept as a slice of the read buffer.
    One(Bytes),
    Many(BytesMut),
}

impl BodyParts {
    fn len(&self) -> usize {
        match self {
            BodyParts::Empty => 0,
            BodyParts::One(b) => b.len(),
            BodyParts::Many(b) => b.len(),
        }
    }

    fn push(&mut self, part: Bytes, capacity: usize) {
        *self = match std::mem::replace(self, BodyParts::Empty) {
            BodyParts::Empty => BodyParts::One(part),
            BodyParts::One(first) => {
                let mut all = BytesMut::with_capacity(capacity);
                all.extend_from_slice(&first);
                all.extend_from_slice(&part);
                BodyParts::Many(all)
            }
            BodyParts::Many(mut all) => {
                all.extend_from_slice(&part);
                BodyParts::Many(all)
            }
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            BodyParts::Empty => Bytes::new(),
            BodyParts::One(b) => b,
            BodyParts::Many(b) => b.freeze(),
        }
    }
}

/// Sends tx.commit-ok once every durable write of the committed transaction is on disk.
struct CommitOk {
    channel: u16,
    outbox: Arc<Outbox>,
    /// The commit failed (the channel is closing): no commit-ok.
    cancelled: AtomicBool,
}

impl Completion for CommitOk {
    fn failed(&self, reason: &str) {
        tracing::warn!(
            channel = self.channel,
            reason,
            "transaction not fully applied"
        );
    }
}

impl Drop for CommitOk {
    fn drop(&mut self) {
        if self.cancelled.load(Ordering::Acquire) {
            return;
        }
        let ok = AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {}));
        let id = self.channel;
        self.outbox.push(|enc, _| enc.method(id, &ok));
    }
}

/// Work of an open transaction (tx.select), applied on tx.commit, dropped on tx.rollback.
#[derive(Default)]
struct Transaction {
    publishes: Vec<(Option<Arc<Exchange>>, Message, bool)>,
    /// Deliveries acknowledged or rejected in the transaction. As in RabbitMQ they leave the
    /// channel's unacked list when the ack arrives (an unknown tag fails then), are settled on
    /// commit, and go back to the unacked list on rollback.
    acks: Vec<TxAck>,
}

enum TxAck {
    Ack(Vec<Unacked>),
    Reject(Vec<Unacked>, bool),
}

struct ConsumerEntry {
    consumer: Arc<AmqpConsumer>,
    queue: Arc<Queue>,
}

pub struct Channel {
    pub shared: Arc<ChannelShared>,
    /// The server sent channel.close and waits for close-ok; everything else is dropped.
    pub closing: bool,
    inbound: Option<Inbound>,
    confirm: bool,
    tx: Option<Transaction>,
    /// A queue this channel published to whose consumers are behind: the connection pauses
    /// reading until it drains (flow control).
    pub flow_blocked: Option<Arc<Queue>>,
    /// The hidden queue of this channel's direct reply-to consumer.
    reply_queue: Option<Arc<Queue>>,
    publish_seq: u64,
    /// Publisher confirms (confirm.select): settles each publish once its sinks have it safe.
    confirms: Option<Arc<ConfirmTracker>>,
    consumer_prefetch: u32,
    consumers: HashMap<ShortString, ConsumerEntry>,
    exchange_cache: HashMap<ShortString, Arc<Exchange>>,
    /// Queues the default exchange resolved, so publishing by queue name takes no vhost lock.
    queue_cache: HashMap<String, Arc<Queue>>,
    cache_generation: u64,
    route_buf: Vec<Arc<Queue>>,
    /// The queue last declared on this channel: what an empty queue name refers to.
    last_queue: Option<ShortString>,
}

/// The outcome of a frame for the connection.
pub enum Next {
    Continue,
    /// The client closed the channel and got close-ok; free its number.
    Closed,
}

fn reply(outbox: &Outbox, channel: u16, method: AMQPClass) {
    outbox.push(|enc, _| enc.method(channel, &method));
}

fn random_tag(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::thread_rng();
    let s: String = (0..22)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{s}")
}

impl Channel {
    pub fn new(id: u16, ctx: &ConnContext) -> Channel {
        Channel {
            shared: ChannelShared::new(id, ctx.outbox.clone(), ctx.cancel_notify),
            closing: false,
            inbound: None,
            confirm: false,
            tx: None,
            reply_queue: None,
            flow_blocked: None,
            publish_seq: 0,
            confirms: None,
            consumer_prefetch: 0,
            consumers: HashMap::new(),
            exchange_cache: HashMap::new(),
            queue_cache: HashMap::new(),
            cache_generation: ctx.vhost.generation(),
            route_buf: Vec::new(),
            last_queue: None,
        }
    }

    /// RabbitMQ's shortcut: an empty queue name means the queue last declared on this channel.
    fn expand_queue_name(&self, name: &mut ShortString) -> Result<(), Exception> {
        if name.as_str().is_empty() {
            let Some(last) = &self.last_queue else {
                return Err(Exception::channel(
                    code::NOT_FOUND,
                    "no previously declared queue",
                ));
            };
            *name = last.clone();
        }
        Ok(())
    }

    pub fn id(&self) -> u16 {
        self.shared.id
    }

    fn send(&self, ctx: &ConnContext, method: AMQPClass) {
        reply(&ctx.outbox, self.id(), method);
    }

    /// Handles one method on this channel. Connection-class methods never reach here.
    pub fn handle_method(
        &mut self,
        ctx: &ConnContext,
        method: AMQPClass,
    ) -> Result<Next, Exception> {
        if let Some(inbound) = &self.inbound {
            // Named after the publish being assembled, as RabbitMQ does.
            let text = if inbound.header.is_some() {
                "expected content body, got non content body frame instead".to_string()
            } else {
                format!(
                    "expected content header for class {CLASS_BASIC}, got non content header frame instead"
                )
            };
            return Err(Exception::connection(code::UNEXPECTED_FRAME, text).on(60, 40));
        }
        let (class_id, method_id) = method_ids(&method);
        let result = match method {
            AMQPClass::Channel(m) => self.channel_method(ctx, m),
            AMQPClass::Exchange(m) => self.exchange_method(ctx, m).map(|_| Next::Continue),
            AMQPClass::Queue(m) => self.queue_method(ctx, m).map(|_| Next::Continue),
            AMQPClass::Basic(m) => self.basic_method(ctx, m).map(|_| Next::Continue),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(_)) if self.tx.is_some() => {
                Err(Exception::channel(
                    code::PRECONDITION_FAILED,
                    "cannot switch from tx to confirm mode",
                ))
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(sel)) => {
                self.confirm = true;
                let id = self.id();
                self.confirms
                    .get_or_insert_with(|| ConfirmTracker::new(id, ctx.confirm_wake.clone()));
                if !sel.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(Next::Continue)
            }
            AMQPClass::Tx(m) => self.tx_method(ctx, m).map(|_| Next::Continue),
            AMQPClass::Access(_) => {
                self.send(
                    ctx,
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    )),
                );
                Ok(Next::Continue)
            }
            other => Err(Exception::connection(
                code::COMMAND_INVALID,
                format!("method {:?} is not valid from a client", method_ids(&other)),
            )),
        };
        result.map_err(|e| e.on(class_id, method_id))
    }

    fn channel_method(
        &mut self,
        ctx: &ConnContext,
        m: channel::AMQPMethod,
    ) -> Result<Next, Exception> {
        match m {
            channel::AMQPMethod::Open(_) => Err(Exception::connection(
                code::CHANNEL_ERROR,
                "second 'channel.open' seen",
            )),
            channel::AMQPMethod::Flow(flow) => {
                self.shared.state.lock().flow_active = flow.active;
                self.send(
                    ctx,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: flow.active,
                    })),
                );
                if flow.active {
                    self.dispatch_consumed_queues();
                }
                Ok(Next::Continue)
            }
            channel::AMQPMethod::FlowOk(_) => Ok(Next::Continue),
            channel::AMQPMethod::Close(_) => {
                self.release(ctx);
                self.send(
                    ctx,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(Next::Closed)
            }
            channel::AMQPMethod::CloseOk(_) => Ok(Next::Closed),
            channel::AMQPMethod::OpenOk(_) => Err(Exception::connection(
                code::COMMAND_INVALID,
                "channel.open-ok is not valid from a client",
            )),
        }
    }

    fn exchange_method(
        &mut self,
        ctx: &ConnContext,
        m: exchange::AMQPMethod,
    ) -> Result<(), Exception> {
        match m {
            exchange::AMQPMethod::Declare(d) => {
                ctx.vhost.declare_exchange(
                    d.exchange.as_str(),
                    ExchangeOptions {
                        kind: d.kind.to_string(),
                        passive: d.passive,
                        durable: d.durable,
                        auto_delete: d.auto_delete,
                        internal: d.internal,
                        arguments: d.arguments,
                    },
                )?;
                if !d.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
            }
            exchange::AMQPMethod::Delete(d) => {
                ctx.vhost
                    .delete_exchange(d.exchange.as_str(), d.if_unused)?;
                if !d.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                }
            }
            exchange::AMQPMethod::Bind(b) => {
                ctx.vhost.bind_exchange(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                if !b.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                    );
                }
            }
            exchange::AMQPMethod::Unbind(u) => {
                ctx.vhost.unbind_exchange(
                    u.destination.as_str(),
                    u.source.as_str(),
                    u.routing_key.as_str(),
                    &u.arguments,
                )?;
                if !u.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                    );
                }
            }
            _ => {
                return Err(Exception::connection(
                    code::COMMAND_INVALID,
                    "exchange reply methods are not valid from a client",
                ))
            }
        }
        Ok(())
    }

    fn queue_method(
        &mut self,
        ctx: &ConnContext,
        mut m: queue::AMQPMethod,
    ) -> Result<(), Exception> {
        match &mut m {
            queue::AMQPMethod::Bind(queue::Bind {
                queue, routing_key, ..
            })
            | queue::AMQPMethod::Unbind(queue::Unbind {
                queue, routing_key, ..
            }) => {
                if queue.as_str().is_empty() && routing_key.as_str().is_empty() {
                    self.expand_queue_name(routing_key)?;
                }
                self.expand_queue_name(queue)?;
            }
            queue::AMQPMethod::Purge(queue::Purge { queue, .. })
            | queue::AMQPMethod::Delete(queue::Delete { queue, .. }) => {
                self.expand_queue_name(queue)?;
            }
            _ => {}
        }
        match m {
            queue::AMQPMethod::Declare(d) if d.passive && d.queue.as_str() == REPLY_TO => {
                // RabbitMQ lets clients check that direct reply-to exists.
                if !d.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: d.queue,
                            message_count: 0,
                            consumer_count: 0,
                        })),
                    );
                }
            }
            queue::AMQPMethod::Declare(d) => {
                let declared = ctx.vhost.declare_queue(
                    d.queue.as_str(),
                    d.passive,
                    QueueOptions {
                        durable: d.durable,
                        exclusive: d.exclusive.then_some(ctx.id),
                        auto_delete: d.auto_delete,
                        arguments: d.arguments,
                    },
                    ctx.id,
                )?;
                self.last_queue = Some(declared.queue.name().clone());
                if !d.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: declared.queue.name().clone(),
                            message_count: declared.message_count,
                            consumer_count: declared.consumer_count,
                        })),
                    );
                }
            }
            queue::AMQPMethod::Bind(b) => {
                ctx.vhost.bind_queue(
                    b.queue.as_str(),
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                    ctx.id,
                )?;
                if !b.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
            }
            queue::AMQPMethod::Unbind(u) => {
                ctx.vhost.unbind_queue(
                    u.queue.as_str(),
                    u.exchange.as_str(),
                    u.routing_key.as_str(),
                    &u.arguments,
                    ctx.id,
                )?;
                self.send(
                    ctx,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
            }
            queue::AMQPMethod::Purge(p) => {
                let q = ctx.vhost.queue(p.queue.as_str(), ctx.id)?;
                let message_count = q.purge();
                if !p.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count,
                        })),
                    );
                }
            }
            queue::AMQPMethod::Delete(d) => {
                let message_count =
                    ctx.vhost
                        .delete_queue(d.queue.as_str(), d.if_unused, d.if_empty, ctx.id)?;
                self.forget_consumers_of_deleted_queues();
                if !d.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count,
                        })),
                    );
                }
            }
            _ => {
                return Err(Exception::connection(
                    code::COMMAND_INVALID,
                    "queue reply methods are not valid from a client",
                ))
            }
        }
        Ok(())
    }

    fn basic_method(&mut self, ctx: &ConnContext, m: basic::AMQPMethod) -> Result<(), Exception> {
        match m {
            basic::AMQPMethod::Publish(p) => self.start_publish(ctx, p),
            basic::AMQPMethod::Ack(a) => self.ack(a.delivery_tag, a.multiple),
            basic::AMQPMethod::Nack(n) => self.reject(n.delivery_tag, n.multiple, n.requeue),
            basic::AMQPMethod::Reject(r) => self.reject(r.delivery_tag, false, r.requeue),
            basic::AMQPMethod::Qos(q) => {
                if q.global {
                    self.shared.state.lock().global_prefetch = q.prefetch_count as u32;
                    self.dispatch_consumed_queues();
                } else {
                    self.consumer_prefetch = q.prefetch_count as u32;
                }
                self.send(
                    ctx,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::Consume(c) => self.consume(ctx, c),
            basic::AMQPMethod::Cancel(c) => {
                self.cancel(ctx, &c.consumer_tag);
                if !c.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Get(g) => self.get(ctx, g),
            basic::AMQPMethod::Recover(r) => {
                // recover-ok precedes the redeliveries, as in RabbitMQ (its queues redeliver
                // after the channel answered): clients such as lapin drop deliveries that
                // arrive before it as stale. requeue=false fails in `recover`, with no reply.
                if r.requeue {
                    self.send(
                        ctx,
                        AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                    );
                }
                self.recover(r.requeue)
            }
            basic::AMQPMethod::RecoverAsync(r) => self.recover(r.requeue),
            _ => Err(Exception::connection(
                code::COMMAND_INVALID,
                "this basic method is not valid from a client",
            )),
        }
    }

    fn exchange(
        &mut self,
        ctx: &ConnContext,
        name: &ShortString,
    ) -> Result<Arc<Exchange>, Exception> {
        self.check_cache_generation(ctx);
        if let Some(ex) = self.exchange_cache.get(name) {
            return Ok(ex.clone());
        }
        let ex = ctx.vhost.exchange(name.as_str())?;
        self.exchange_cache.insert(name.clone(), ex.clone());
        Ok(ex)
    }

    /// Drops cached lookups once anything in the vhost was deleted.
    fn check_cache_generation(&mut self, ctx: &ConnContext) {
        let generation = ctx.vhost.generation();
        if generation != self.cache_generation {
            self.exchange_cache.clear();
            self.queue_cache.clear();
            self.cache_generation = generation;
        }
    }

    /// The default exchange's routing: the queue named by the routing key, if it exists.
    fn route_default(&mut self, ctx: &ConnContext, name: &str, out: &mut Vec<Arc<Queue>>) {
        self.check_cache_generation(ctx);
        if let Some(q) = self.queue_cache.get(name) {
            out.push(q.clone());
            return;
        }
        if let Some(q) = ctx.vhost.queue_by_name(name) {
            self.queue_cache.insert(name.to_string(), q.clone());
            out.push(q);
        }
    }

    fn start_publish(&mut self, ctx: &ConnContext, p: basic::Publish) -> Result<(), Exception> {
        let exchange = match self.exchange(ctx, &p.exchange) {
            Ok(ex) => Some(ex),
            Err(_) if ctx.plan.routes_exchange(p.exchange.as_str()) => None,
            Err(e) => return Err(e),
        };
        if let Some(exchange) = exchange.as_ref().filter(|ex| ex.internal) {
            return Err(Exception::channel(
                code::ACCESS_REFUSED,
                format!(
                    "cannot publish to internal exchange '{}' in vhost '{}'",
                    exchange.name,
                    ctx.vhost.name()
                ),
            ));
        }
        if p.immediate {
            return Err(Exception::connection(
                code::NOT_IMPLEMENTED,
                "immediate=true",
            ));
        }
        if self.confirm {
            self.publish_seq += 1;
        }
        self.inbound = Some(Inbound {
            exchange,
            exchange_name: p.exchange,
            routing_key: p.routing_key,
            mandatory: p.mandatory,
            header: None,
            body: BodyParts::Empty,
        });
        Ok(())
    }

    /// A content header frame arrived for this channel.
    pub fn handle_header(
        &mut self,
        ctx: &ConnContext,
        header: ContentHeader,
    ) -> Result<(), Exception> {
        if self.inbound.as_ref().is_none_or(|i| i.header.is_some()) {
            return Err(Exception::connection(
                code::UNEXPECTED_FRAME,
                "content header frame without basic.publish",
            ));
        }
        if header.class_id != CLASS_BASIC {
            return Err(Exception::connection(
                code::UNEXPECTED_FRAME,
                format!(
                    "expected content header for class {CLASS_BASIC}, got one for class {} instead",
                    header.class_id
                ),
            )
            .on(60, 40));
        }
        if header.body_size > ctx.max_message_size {
            let size = header.body_size;
            self.inbound = None;
            return Err(Exception::channel(
                code::PRECONDITION_FAILED,
                format!(
                    "message size {size} is larger than configured max size {}",
                    ctx.max_message_size
                ),
            )
            .on(60, 40));
        }
        if let Some(exp) = header.properties.expiration() {
            if exp.as_str().parse::<u64>().is_err() {
                self.inbound = None;
                return Err(Exception::channel(
                    code::PRECONDITION_FAILED,
                    format!("invalid expiration '{exp}'"),
                )
                .on(60, 40));
            }
        }
        if let Some(claimed) = header.properties.user_id() {
            if claimed.as_str() != ctx.user {
                self.inbound = None;
                return Err(Exception::channel(
                    code::PRECONDITION_FAILED,
                    format!(
                        "user_id property set to '{claimed}' but authenticated user was '{}'",
                        ctx.user
                    ),
                )
                .on(60, 40));
            }
        }
        let mut header = header;
        if let Err(e) = self.rewrite_reply_to(&mut header) {
            self.inbound = None;
            return Err(e.on(60, 40));
        }
        let Some(inbound) = self.inbound.as_mut() else {
            return Ok(());
        };
        let done = header.body_size == 0;
        inbound.header = Some(header);
        if done {
            self.finish_publish(ctx)?;
        }
        Ok(())
    }

    /// A body frame arrived for this channel.
    pub fn handle_body(&mut self, ctx: &ConnContext, part: Bytes) -> Result<(), Exception> {
        let Some(inbound) = self.inbound.as_mut() else {
            return Err(Exception::connection(
                code::UNEXPECTED_FRAME,
                "content body frame without basic.publish",
            ));
        };
        let Some(header) = inbound.header.as_ref() else {
            return Err(Exception::connection(
                code::UNEXPECTED_FRAME,
                "content body frame before its content header",
            )
            .on(60, 40));
        };
        let expected = header.body_size as usize;
        if inbound.body.len() + part.len() > expected {
            return Err(Exception::connection(
                code::FRAME_ERROR,
                format!(
                    "content body of {} bytes exceeds the {expected} bytes its header announced",
                    inbound.body.len() + part.len()
                ),
            )
            .on(60, 40));
        }
        inbound.body.push(part, expected);
        if inbound.body.len() == expected {
            self.finish_publish(ctx)?;
        }
        Ok(())
    }

    fn finish_publish(&mut self, ctx: &ConnContext) -> Result<(), Exception> {
        let Some(inbound) = self.inbound.take() else {
            return Ok(());
        };
        let Some(header) = inbound.header else {
            return Ok(());
        };
        let body = inbound.body.freeze();
        let message = Message::from_parts(
            inbound.exchange_name.as_str(),
            inbound.routing_key.as_str(),
            &header.properties,
            &header.raw_properties,
            &body,
        );
        if let Some(tx) = self.tx.as_mut() {
            tx.publishes
                .push((inbound.exchange, message, inbound.mandatory));
            return Ok(());
        }
        let guard = self
            .confirms
            .as_ref()
            .map(|t| -> Guard { t.pending(self.publish_seq) });
        self.route_message(
            ctx,
            inbound.exchange.as_ref(),
            message,
            inbound.mandatory,
            guard,
        )
    }

    /// Routes a complete message to its queues and returns it if unroutable and mandatory.
    /// `guard` (a pending confirm or transaction) is held by every sink until the message is
    /// safe there, and marked failed if a queue refuses the message.
    fn route_message(
        &mut self,
        ctx: &ConnContext,
        exchange: Option<&Arc<Exchange>>,
        message: Message,
        mandatory: bool,
        guard: Option<Guard>,
    ) -> Result<(), Exception> {
        // Decoded once, and only for a message that has headers.
        let headers = message.headers();
        let route = ctx
            .plan
            .find(message.exchange(), message.routing_key(), headers.as_ref());
        if route.is_none() && exchange.is_none() {
            // Accepted only for the routes that name this exchange; this key matched none.
            return Err(Exception::channel(
                code::NOT_FOUND,
                format!(
                    "no exchange '{}' in vhost '{}'",
                    message.exchange(),
                    ctx.vhost.name()
                ),
            )
            .on(60, 40));
        }
        let mut routed_to_backend = false;
        if let Some(route) = route {
            // The backend holds the guard until the target has the message; a publisher
            // without confirms still gets the bridge's retries.
            let hold = guard
                .clone()
                .unwrap_or_else(warren_backends::backend::no_wait);
            route
                .backend
                .publish(&route.destination, message.clone(), hold);
            routed_to_backend = true;
            if route.mode == RouteMode::Forward {
                return Ok(());
            }
        }
        let mut targets = std::mem::take(&mut self.route_buf);
        let engine_routes = route.is_some() || !ctx.plan.reject_unmatched;
        match exchange {
            Some(ex) if engine_routes && ex.name.as_str().is_empty() => {
                self.route_default(ctx, message.routing_key(), &mut targets)
            }
            Some(ex) if engine_routes => {
                ctx.vhost
                    .route(ex, message.routing_key(), headers.as_ref(), &mut targets)
            }
            _ => {}
        }
        if !routed_to_backend && !engine_routes {
            // `unmatched: reject`: refused like an unroutable mandatory message, and nacked.
            if let Some(g) = &guard {
                g.failed("no configured route matches");
            }
        }
        if targets.is_empty() && !routed_to_backend && mandatory {
            let ret = AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: code::NO_ROUTE,
                reply_text: "NO_ROUTE".into(),
                exchange: message.exchange().into(),
                routing_key: message.routing_key().into(),
            }));
            let id = self.id();
            ctx.outbox.push(|enc, frame_max| {
                enc.method(id, &ret);
                enc.content(id, message.raw_properties(), message.body(), frame_max);
            });
        }
        let mut rejected = false;
        for queue in targets.drain(..) {
            rejected |=
                queue.publish_with(message.clone(), guard.as_ref()) == PublishOutcome::Rejected;
            if queue.is_backlogged() {
                self.flow_blocked = Some(queue);
            }
        }
        self.route_buf = targets;
        if rejected {
            if let Some(g) = &guard {
                g.failed("a queue refused the message (x-overflow)");
            }
        }
        Ok(())
    }

    fn tx_method(&mut self, ctx: &ConnContext, m: tx::AMQPMethod) -> Result<(), Exception> {
        let not_transactional =
            || Exception::channel(code::PRECONDITION_FAILED, "channel is not transactional");
        match m {
            tx::AMQPMethod::Select(_) => {
                if self.confirm {
                    return Err(Exception::channel(
                        code::PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                self.tx.get_or_insert_with(Transaction::default);
                self.send(
                    ctx,
                    AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
                );
            }
            tx::AMQPMethod::Commit(_) => {
                let work = std::mem::take(self.tx.as_mut().ok_or_else(not_transactional)?);
                // commit-ok goes out when the commit guard's last holder (a durable queue's
                // fsync) lets go.
                let commit = Arc::new(CommitOk {
                    channel: self.id(),
                    outbox: ctx.outbox.clone(),
                    cancelled: AtomicBool::new(false),
                });
                for (exchange, message, mandatory) in work.publishes {
                    let guard: Guard = commit.clone();
                    if let Err(e) =
                        self.route_message(ctx, exchange.as_ref(), message, mandatory, Some(guard))
                    {
                        commit.cancelled.store(true, Ordering::Release);
                        // The acks of a failed commit go back to the unacked list, which the
                        // closing channel requeues.
                        self.restore_unacked(work.acks);
                        return Err(e);
                    }
                }
                for op in work.acks {
                    match op {
                        TxAck::Ack(acked) => self.settle_ack(acked),
                        TxAck::Reject(rejected, requeue) => self.settle_reject(rejected, requeue),
                    }
                }
                drop(commit);
            }
            tx::AMQPMethod::Rollback(_) => {
                let tx = self.tx.as_mut().ok_or_else(not_transactional)?;
                let work = std::mem::take(tx);
                self.restore_unacked(work.acks);
                self.send(
                    ctx,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
            }
            _ => {
                return Err(Exception::connection(
                    code::COMMAND_INVALID,
                    "tx reply methods are not valid from a client",
                ))
            }
        }
        Ok(())
    }

    /// Publishes routed but not yet confirmed.
    pub fn unconfirmed(&self) -> u64 {
        self.confirms
            .as_ref()
            .map_or(0, |t| self.publish_seq.saturating_sub(t.answered()))
    }

    /// Sends the confirms that settled since the last call, coalesced.
    pub fn flush_confirms(&self, outbox: &Outbox) -> bool {
        self.confirms.as_ref().is_some_and(|t| t.flush(outbox))
    }

    fn ack(&mut self, tag: u64, multiple: bool) -> Result<(), Exception> {
        let acked = self
            .shared
            .take_unacked(tag, multiple)
            .ok_or_else(|| unknown_tag(tag))?;
        if let Some(tx) = self.tx.as_mut() {
            tx.acks.push(TxAck::Ack(acked));
            return Ok(());
        }
        self.settle_ack(acked);
        Ok(())
    }

    fn settle_ack(&mut self, acked: Vec<Unacked>) {
        for u in &acked {
            u.release();
        }
        for_each_queue(acked, |queue, messages| queue.ack(messages));
        self.dispatch_consumed_queues();
    }

    fn reject(&mut self, tag: u64, multiple: bool, requeue: bool) -> Result<(), Exception> {
        let rejected = self
            .shared
            .take_unacked(tag, multiple)
            .ok_or_else(|| unknown_tag(tag))?;
        if let Some(tx) = self.tx.as_mut() {
            tx.acks.push(TxAck::Reject(rejected, requeue));
            return Ok(());
        }
        self.settle_reject(rejected, requeue);
        Ok(())
    }

    /// tx.rollback: deliveries acknowledged in the transaction are unacknowledged again.
    fn restore_unacked(&self, acks: Vec<TxAck>) {
        let mut st = self.shared.state.lock();
        for op in acks {
            let (TxAck::Ack(list) | TxAck::Reject(list, _)) = op;
            for u in list {
                let at = st.unacked.partition_point(|x| x.tag < u.tag);
                st.unacked.insert(at, u);
            }
        }
    }

    fn settle_reject(&mut self, rejected: Vec<Unacked>, requeue: bool) {
        for u in &rejected {
            u.release();
        }
        if requeue {
            requeue_all(rejected);
        } else {
            for_each_queue(rejected, |queue, messages| queue.reject(messages));
        }
        self.dispatch_consumed_queues();
    }

    fn recover(&mut self, requeue: bool) -> Result<(), Exception> {
        if !requeue {
            return Err(Exception::connection(
                code::NOT_IMPLEMENTED,
                "requeue=false",
            ));
        }
        let all = self.shared.take_all_unacked();
        for u in &all {
            u.release();
        }
        requeue_all(all);
        self.dispatch_consumed_queues();
        Ok(())
    }

    fn consume(&mut self, ctx: &ConnContext, mut c: basic::Consume) -> Result<(), Exception> {
        self.expand_queue_name(&mut c.queue)?;
        let queue = if c.queue.as_str() == REPLY_TO {
            self.reply_queue(ctx, &c)?
        } else {
            ctx.vhost.queue(c.queue.as_str(), ctx.id)?
        };
        let tag: ShortString = if c.consumer_tag.as_str().is_empty() {
            random_tag("amq.ctag-").into()
        } else {
            c.consumer_tag.clone()
        };
        self.forget_consumers_of_deleted_queues();
        if self.consumers.contains_key(&tag) {
            return Err(Exception::connection(
                code::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let consumer = Arc::new(AmqpConsumer {
            tag: Arc::from(tag.as_str()),
            channel: self.shared.clone(),
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            prefetch: self.consumer_prefetch,
            priority: consumer_priority(&c.arguments)?,
            unacked: Arc::new(AtomicU32::new(0)),
            cancelled: AtomicBool::new(false),
        });
        // consume-ok goes into the outbox once the queue accepted the consumer (not before a
        // refusal such as exclusive use) and before the queue can deliver anything.
        let as_dyn: Arc<dyn Consumer> = consumer.clone();
        let (outbox, id, nowait) = (&ctx.outbox, self.id(), c.nowait);
        queue.add_consumer_then(as_dyn, || {
            if !nowait {
                let ok = AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.clone(),
                }));
                reply(outbox, id, ok);
            }
        })?;
        self.consumers
            .insert(tag, ConsumerEntry { consumer, queue });
        Ok(())
    }

    /// Direct reply-to: basic.consume on `amq.rabbitmq.reply-to` creates this channel's hidden
    /// reply queue; publishes from this channel with that reply-to name it instead.
    fn reply_queue(
        &mut self,
        ctx: &ConnContext,
        c: &basic::Consume,
    ) -> Result<Arc<Queue>, Exception> {
        if !c.no_ack {
            return Err(Exception::channel(
                code::PRECONDITION_FAILED,
                "reply consumer cannot acknowledge",
            ));
        }
        if self.reply_queue.as_ref().is_some_and(|q| !q.is_deleted()) {
            return Err(Exception::channel(
                code::PRECONDITION_FAILED,
                "reply consumer already set",
            ));
        }
        let queue = ctx.vhost.declare_reply_queue(ctx.id);
        self.reply_queue = Some(queue.clone());
        Ok(queue)
    }

    /// Rewrites `reply-to: amq.rabbitmq.reply-to` into this channel's reply queue name.
    fn rewrite_reply_to(&self, header: &mut ContentHeader) -> Result<(), Exception> {
        if header.properties.reply_to().as_ref().map(|r| r.as_str()) != Some(REPLY_TO) {
            return Ok(());
        }
        let Some(queue) = self.reply_queue.as_ref().filter(|q| !q.is_deleted()) else {
            return Err(Exception::channel(
                code::PRECONDITION_FAILED,
                "fast reply consumer does not exist",
            ));
        };
        header.properties = header
            .properties
            .clone()
            .with_reply_to(queue.name().clone());
        header.raw_properties = encode_properties(&header.properties);
        Ok(())
    }

    fn cancel(&mut self, ctx: &ConnContext, tag: &ShortString) {
        if let Some(entry) = self.consumers.remove(tag) {
            detach(ctx, entry);
        }
    }

    fn get(&mut self, ctx: &ConnContext, mut g: basic::Get) -> Result<(), Exception> {
        self.expand_queue_name(&mut g.queue)?;
        let queue = ctx.vhost.queue(g.queue.as_str(), ctx.id)?;
        let id = self.id();
        let Some((message, remaining)) = queue.get() else {
            self.send(
                ctx,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let mut st = self.shared.state.lock();
        st.next_tag += 1;
        let tag = st.next_tag;
        let m = message.message.clone();
        ctx.outbox.push(|enc, frame_max| {
            enc.get_ok(
                id,
                tag,
                message.redelivered,
                m.exchange(),
                m.routing_key(),
                remaining,
            );
            enc.content(id, m.raw_properties(), m.body(), frame_max);
        });
        if g.no_ack {
            drop(st);
            queue.ack([message]);
        } else {
            st.unacked.push_back(Unacked {
                tag,
                queue,
                message,
                credit: None,
            });
        }
        Ok(())
    }

    fn dispatch_consumed_queues(&self) {
        match self.consumers.len() {
            0 => {}
            1 => {
                if let Some(entry) = self.consumers.values().next() {
                    entry.queue.dispatch();
                }
            }
            _ => {
                let mut seen: Vec<&Arc<Queue>> = Vec::new();
                for entry in self.consumers.values() {
                    if !seen.iter().any(|q| Arc::ptr_eq(q, &entry.queue)) {
                        seen.push(&entry.queue);
                        entry.queue.dispatch();
                    }
                }
            }
        }
    }

    /// Drops consumers whose queue was deleted under them (they were already cancelled).
    fn forget_consumers_of_deleted_queues(&mut self) {
        self.consumers
            .retain(|_, e| !e.consumer.cancelled.load(Ordering::Acquire));
    }

    /// Releases everything the channel holds: unacked messages back to their queues, consumers
    /// off their queues. Called on channel close, on a channel error and when the connection ends.
    pub fn release(&mut self, ctx: &ConnContext) {
        self.inbound = None;
        self.shared.state.lock().closed = true;
        for (_, entry) in self.consumers.drain() {
            detach(ctx, entry);
        }
        // Deliveries acknowledged in an uncommitted transaction were never acknowledged.
        if let Some(tx) = self.tx.take() {
            self.restore_unacked(tx.acks);
        }
        let all = self.shared.take_all_unacked();
        for u in &all {
            u.release();
        }
        requeue_all(all);
    }
}

fn detach(ctx: &ConnContext, entry: ConsumerEntry) {
    entry.consumer.cancelled.store(true, Ordering::Release);
    let as_dyn: Arc<dyn Consumer> = entry.consumer;
    let removed = entry.queue.remove_consumer(&as_dyn);
    if removed.auto_delete_now {
        ctx.vhost.remove_queue(&entry.queue);
    }
}

/// Returns messages to their queues, each queue getting its own in one call.
fn requeue_all(messages: Vec<Unacked>) {
    for_each_queue(messages, |queue, messages| queue.requeue(messages));
}

/// Groups deliveries by the queue they came from, keeping their order within each queue.
fn for_each_queue(
    mut messages: Vec<Unacked>,
    mut apply: impl FnMut(&Arc<Queue>, Vec<QueuedMessage>),
) {
    while !messages.is_empty() {
        let queue = messages[0].queue.clone();
        let (mine, rest): (Vec<Unacked>, Vec<Unacked>) = messages
            .into_iter()
            .partition(|u| Arc::ptr_eq(&u.queue, &queue));
        apply(&queue, mine.into_iter().map(|u| u.message).collect());
        messages = rest;
    }
}

/// `x-priority` of basic.consume: any integer type, as RabbitMQ accepts.
fn consumer_priority(arguments: &FieldTable) -> Result<i32, Exception> {
    let Some(value) = arguments.inner().get("x-priority") else {
        return Ok(0);
    };
    let p = warren_backends::engine::value::as_integer(value).ok_or_else(|| {
        Exception::channel(
            code::PRECONDITION_FAILED,
            format!("invalid arg 'x-priority' for consumer: {value:?} is not an integer"),
        )
    })?;
    Ok(p.clamp(i32::MIN as i128, i32::MAX as i128) as i32)
}

fn unknown_tag(tag: u64) -> Exception {
    Exception::channel(
        code::PRECONDITION_FAILED,
        format!("unknown delivery tag {tag}"),
    )
}

/// Class and method ids of a method, for close frames.
pub fn method_ids(method: &AMQPClass) -> (u16, u16) {
    (method.get_amqp_class_id(), method.get_amqp_method_id())
}
