//! Subscriptions: long-polling receivers feeding a queue mapping.
//!
//! - **Pollers.** `ceil(prefetch / 10)` tasks (at most 10; one for a FIFO queue, so that its
//!   receives are sequential and a group's order is kept), each looping on ReceiveMessage with
//!   `MaxNumberOfMessages` = the credit it could take (1–10), `WaitTimeSeconds` =
//!   `wait_time_secs` and `VisibilityTimeout` = `visibility_timeout_secs`. Credit is a semaphore
//!   of `prefetch` permits: one per message received and not yet settled, so at most `prefetch`
//!   messages are held (buffered or with the AMQP client) at once.
//! - **Visibility extender.** Every quarter of the visibility timeout, messages held for more
//!   than half of it get ChangeMessageVisibilityBatch(`visibility_timeout_secs`) again, so a
//!   message a client holds for long does not reappear for another consumer. SQS caps a
//!   message's total invisibility at 12 hours.
//! - **Settling task**, batching what the AMQP client decided:
//!
//! | `Settlement` | SQS                                                                     |
//! |--------------|-------------------------------------------------------------------------|
//! | `Ack`        | DeleteMessageBatch                                                      |
//! | `Requeue`    | ChangeMessageVisibilityBatch(0): visible again at once, delivered again with `redelivered` (ApproximateReceiveCount > 1); each receive counts towards the queue's redrive `maxReceiveCount` |
//! | `Reject`     | with a redrive policy on the queue: SendMessage of the same body and attributes to its dead-letter queue (`deadLetterTargetArn`), then DeleteMessage; without one: DeleteMessage (dropped, logged) |
//!
//! A settlement that cannot reach SQS (after 3 tries) is logged and dropped: the message
//! becomes visible again when its visibility timeout runs out and is delivered again (at least
//! once). Messages received but not yet handed out when the subscription ends are made visible
//! again at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use warren_backends::{Incoming, Settle, Settlement, Subscription};

use super::{backoff_delay, call_error, is_fifo, mapping, queue_name, CallError, Shared};

/// SQS's most messages per ReceiveMessage and entries per batch call.
const BATCH: usize = 10;
/// Pollers per subscription at most.
const MAX_POLLERS: usize = 10;
/// Tries of one settling call before it is left to the visibility timeout.
const SETTLE_TRIES: u32 = 3;

/// A message received, with the credit it holds.
struct Received {
    id: u64,
    message: aws_sdk_sqs::types::Message,
    permit: OwnedSemaphorePermit,
}

struct Held {
    receipt: String,
    visible_until: Instant,
}

enum Op {
    Delete,
    Visible,
    Reject(Box<aws_sdk_sqs::types::Message>),
}

struct Job {
    op: Op,
    receipt: String,
    /// Released once SQS has the settlement: prefetch counts until then.
    _permit: Option<OwnedSemaphorePermit>,
}

/// What the subscription's tasks share.
struct Ctx {
    shared: Arc<Shared>,
    source: String,
    held: Mutex<HashMap<u64, Held>>,
    next_id: AtomicU64,
    stop: watch::Sender<bool>,
    /// The dead-letter queue URL from the source's redrive policy, once looked up.
    dead_letter: tokio::sync::Mutex<Option<Option<String>>>,
}

impl Ctx {
    fn stopped(&self) -> bool {
        *self.stop.borrow() || self.shared.is_closed()
    }

    /// Resolves when the subscription or the bridge stops.
    async fn wait_stop(&self) {
        let mut stop = self.stop.subscribe();
        let mut closed = self.shared.closed.subscribe();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            _ = closed.wait_for(|c| *c) => {}
        }
    }

    fn visibility(&self) -> Duration {
        Duration::from_secs(u64::from(self.shared.config.visibility_timeout_secs))
    }

    async fn url(&self) -> Result<String, CallError> {
        self.shared.queue_url(&self.source).await
    }

    fn failed(&self, what: &str, e: &CallError) {
        if e.missing_queue {
            self.shared.forget_url(&self.source);
        }
        self.shared.call_failed(what, e);
    }
}

pub(super) struct SqsSubscription {
    ctx: Arc<Ctx>,
    rx: mpsc::UnboundedReceiver<Received>,
    jobs: mpsc::UnboundedSender<Job>,
}

impl SqsSubscription {
    pub(super) fn new(shared: Arc<Shared>, source: &str, prefetch: u16) -> SqsSubscription {
        let prefetch = usize::from(prefetch.max(1));
        let ctx = Arc::new(Ctx {
            shared: shared.clone(),
            source: source.to_string(),
            held: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            stop: watch::channel(false).0,
            dead_letter: tokio::sync::Mutex::new(None),
        });
        let credit = Arc::new(Semaphore::new(prefetch));
        let (tx, rx) = mpsc::unbounded_channel();
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        // A FIFO queue gets one poller: its receives are then sequential, so the order of a
        // message group is the order the messages are handed on. (SQS itself holds back a group
        // while any of its messages is in flight; moto does not, for receives that overlap.)
        let pollers = if is_fifo(source) {
            1
        } else {
            prefetch.div_ceil(BATCH).clamp(1, MAX_POLLERS)
        };
        for _ in 0..pollers {
            shared
                .runtime
                .spawn(poll(ctx.clone(), credit.clone(), tx.clone(), jobs.clone()));
        }
        shared.runtime.spawn(extend(ctx.clone()));
        shared.runtime.spawn(settle_jobs(ctx.clone(), jobs_rx));
        SqsSubscription { ctx, rx, jobs }
    }
}

impl Drop for SqsSubscription {
    /// Stops the pollers and makes what they received but nobody took visible again at once.
    fn drop(&mut self) {
        self.ctx.stop.send_replace(true);
        self.rx.close();
        while let Ok(r) = self.rx.try_recv() {
            self.ctx.held.lock().remove(&r.id);
            if let Some(receipt) = r.message.receipt_handle() {
                let _ = self.jobs.send(Job {
                    op: Op::Visible,
                    receipt: receipt.to_string(),
                    _permit: Some(r.permit),
                });
            }
        }
    }
}

#[async_trait]
impl Subscription for SqsSubscription {
    async fn next(&mut self) -> Option<Incoming> {
        let mut closed = self.ctx.shared.closed.subscribe();
        let received = tokio::select! {
            r = self.rx.recv() => r?,
            _ = closed.wait_for(|c| *c) => return None,
        };
        let Received {
            id,
            message,
            permit,
        } = received;
        self.ctx
            .shared
            .stats
            .received
            .fetch_add(1, Ordering::Relaxed);
        let receive_count = message
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(1);
        let amqp = mapping::from_sqs(
            queue_name(&self.ctx.source),
            message.message_id(),
            message.body().unwrap_or(""),
            message.message_attributes(),
        );
        let settle = SqsSettle {
            ctx: self.ctx.clone(),
            id,
            receipt: message.receipt_handle().unwrap_or_default().to_string(),
            message: Mutex::new(Some(message)),
            permit: Mutex::new(Some(permit)),
            jobs: self.jobs.clone(),
            settled: AtomicBool::new(false),
        };
        Some(Incoming {
            message: amqp,
            redelivered: receive_count > 1,
            settle: Box::new(settle),
        })
    }
}

/// One poller: takes credit, long-polls, hands the messages over.
async fn poll(
    ctx: Arc<Ctx>,
    credit: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Received>,
    jobs: mpsc::UnboundedSender<Job>,
) {
    let mut failures: u32 = 0;
    loop {
        if ctx.stopped() {
            return;
        }
        let mut permit = tokio::select! {
            p = credit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = ctx.wait_stop() => return,
        };
        while permit.num_permits() < BATCH {
            match credit.clone().try_acquire_owned() {
                Ok(more) => permit.merge(more),
                Err(_) => break,
            }
        }
        let wanted = permit.num_permits();
        let result = tokio::select! {
            r = receive(&ctx, wanted) => r,
            _ = ctx.wait_stop() => return,
        };
        match result {
            Ok(messages) => {
                failures = 0;
                ctx.shared.call_ok();
                for message in messages {
                    let Some(receipt) = message.receipt_handle().map(str::to_string) else {
                        continue;
                    };
                    let Some(one) = permit.split(1) else {
                        // More than asked for: give it back at once.
                        let _ = jobs.send(Job {
                            op: Op::Visible,
                            receipt,
                            _permit: None,
                        });
                        continue;
                    };
                    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
                    ctx.held.lock().insert(
                        id,
                        Held {
                            receipt: receipt.clone(),
                            visible_until: Instant::now() + ctx.visibility(),
                        },
                    );
                    if let Err(mpsc::error::SendError(r)) = tx.send(Received {
                        id,
                        message,
                        permit: one,
                    }) {
                        // The subscription is gone: make it visible again.
                        ctx.held.lock().remove(&r.id);
                        let _ = jobs.send(Job {
                            op: Op::Visible,
                            receipt,
                            _permit: None,
                        });
                    }
                }
            }
            Err(e) => {
                ctx.failed("ReceiveMessage", &e);
                failures += 1;
                drop(permit);
                let delay = backoff_delay(ctx.shared.retry(), failures);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.wait_stop() => return,
                }
            }
        }
    }
}

async fn receive(ctx: &Ctx, wanted: usize) -> Result<Vec<aws_sdk_sqs::types::Message>, CallError> {
    let url = ctx.url().await?;
    let cfg = &ctx.shared.config;
    let out = ctx
        .shared
        .client()
        .await
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(wanted.min(BATCH) as i32)
        .wait_time_seconds(cfg.wait_time_secs as i32)
        .visibility_timeout(cfg.visibility_timeout_secs as i32)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
        .send()
        .await
        .map_err(call_error)?;
    Ok(out.messages.unwrap_or_default())
}

/// Extends the visibility of messages held for more than half their timeout.
async fn extend(ctx: Arc<Ctx>) {
    let visibility = ctx.visibility();
    let tick = (visibility / 4).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = ctx.wait_stop() => return,
        }
        let now = Instant::now();
        let due: Vec<(u64, String)> = ctx
            .held
            .lock()
            .iter()
            .filter(|(_, h)| h.visible_until.saturating_duration_since(now) < visibility / 2)
            .map(|(id, h)| (*id, h.receipt.clone()))
            .collect();
        for chunk in due.chunks(BATCH) {
            let result = async {
                let url = ctx.url().await?;
                let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = chunk
                    .iter()
                    .filter_map(|(id, receipt)| {
                        ChangeMessageVisibilityBatchRequestEntry::builder()
                            .id(id.to_string())
                            .receipt_handle(receipt)
                            .visibility_timeout(visibility.as_secs() as i32)
                            .build()
                            .ok()
                    })
                    .collect();
                ctx.shared
                    .client()
                    .await
                    .change_message_visibility_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(call_error)
            }
            .await;
            match result {
                Ok(out) => {
                    let until = Instant::now() + visibility;
                    let mut held = ctx.held.lock();
                    for ok in out.successful() {
                        if let Some(h) =
                            ok.id().parse::<u64>().ok().and_then(|id| held.get_mut(&id))
                        {
                            h.visible_until = until;
                            ctx.shared.stats.extended.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    for failed in out.failed() {
                        tracing::warn!(backend = %ctx.shared.name, queue = %ctx.source, code = failed.code(), message = failed.message().unwrap_or(""), "sqs bridge: could not extend a held message's visibility; it may be delivered to another consumer");
                    }
                }
                Err(e) => ctx.failed("ChangeMessageVisibilityBatch", &e),
            }
        }
    }
}

/// Runs settlements: deletes and visibility resets in batches of up to 10, rejects one by one.
async fn settle_jobs(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < 100 {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut deletes = Vec::new();
        let mut visibles = Vec::new();
        for job in jobs {
            match job.op {
                Op::Delete => deletes.push(job),
                Op::Visible => visibles.push(job),
                Op::Reject(ref message) => {
                    let message = message.clone();
                    reject(&ctx, &job.receipt, *message).await;
                }
            }
        }
        for chunk in deletes.chunks(BATCH) {
            delete_batch(&ctx, chunk).await;
        }
        for chunk in visibles.chunks(BATCH) {
            visible_batch(&ctx, chunk).await;
        }
    }
}

/// Runs `call` up to SETTLE_TRIES times with backoff; `None` when every try failed.
async fn with_tries<T, F, Fut>(ctx: &Ctx, what: &str, mut call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    for attempt in 1..=SETTLE_TRIES {
        match call().await {
            Ok(v) => {
                ctx.shared.call_ok();
                return Some(v);
            }
            Err(e) => {
                ctx.failed(what, &e);
                if attempt < SETTLE_TRIES {
                    tokio::time::sleep(backoff_delay(ctx.shared.retry(), attempt)).await;
                } else {
                    tracing::warn!(backend = %ctx.shared.name, queue = %ctx.source, call = what, error = %e, "sqs bridge: settling failed; the message comes back when its visibility timeout runs out");
                }
            }
        }
    }
    None
}

async fn delete_batch(ctx: &Ctx, jobs: &[Job]) {
    let out = with_tries(ctx, "DeleteMessageBatch", || async {
        let url = ctx.url().await?;
        let entries: Vec<DeleteMessageBatchRequestEntry> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&j.receipt)
                    .build()
                    .ok()
            })
            .collect();
        ctx.shared
            .client()
            .await
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(call_error)
    })
    .await;
    if let Some(out) = out {
        ctx.shared
            .stats
            .deleted
            .fetch_add(out.successful().len() as u64, Ordering::Relaxed);
        for failed in out.failed() {
            tracing::warn!(backend = %ctx.shared.name, queue = %ctx.source, code = failed.code(), message = failed.message().unwrap_or(""), "sqs bridge: a delete failed; the message will be delivered again");
        }
    }
}

async fn visible_batch(ctx: &Ctx, jobs: &[Job]) {
    let out = with_tries(ctx, "ChangeMessageVisibilityBatch", || async {
        let url = ctx.url().await?;
        let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&j.receipt)
                    .visibility_timeout(0)
                    .build()
                    .ok()
            })
            .collect();
        ctx.shared
            .client()
            .await
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(call_error)
    })
    .await;
    if let Some(out) = out {
        ctx.shared
            .stats
            .requeued
            .fetch_add(out.successful().len() as u64, Ordering::Relaxed);
        for failed in out.failed() {
            tracing::debug!(backend = %ctx.shared.name, queue = %ctx.source, code = failed.code(), "sqs bridge: making a message visible again failed; it comes back when its visibility timeout runs out");
        }
    }
}

/// The source queue's redrive dead-letter queue URL, looked up once per subscription.
async fn dead_letter_url(ctx: &Ctx) -> Result<Option<String>, CallError> {
    let mut cached = ctx.dead_letter.lock().await;
    if let Some(known) = cached.as_ref() {
        return Ok(known.clone());
    }
    let url = ctx.url().await?;
    let client = ctx.shared.client().await;
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(call_error)?;
    let policy = out
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        .cloned();
    let target = match policy {
        None => None,
        Some(text) => {
            let arn = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("deadLetterTargetArn")?.as_str().map(str::to_string));
            match arn {
                None => {
                    tracing::warn!(backend = %ctx.shared.name, queue = %ctx.source, policy = %text, "sqs bridge: redrive policy without a deadLetterTargetArn");
                    None
                }
                Some(arn) => {
                    // arn:aws:sqs:<region>:<account>:<name>
                    let parts: Vec<&str> = arn.split(':').collect();
                    let (account, name) = match parts.as_slice() {
                        [.., account, name] => (account.to_string(), name.to_string()),
                        _ => (String::new(), arn.clone()),
                    };
                    let mut call = client.get_queue_url().queue_name(&name);
                    if !account.is_empty() {
                        call = call.queue_owner_aws_account_id(account);
                    }
                    let out = call.send().await.map_err(call_error)?;
                    out.queue_url().map(str::to_string)
                }
            }
        }
    };
    *cached = Some(target.clone());
    Ok(target)
}

/// Dead-letters a rejected message through the queue's redrive policy, or drops it.
async fn reject(ctx: &Ctx, receipt: &str, message: aws_sdk_sqs::types::Message) {
    let target = with_tries(ctx, "GetQueueAttributes(RedrivePolicy)", || {
        dead_letter_url(ctx)
    })
    .await;
    let Some(target) = target else {
        return;
    };
    if let Some(dlq) = target {
        let sent = with_tries(ctx, "SendMessage(dead-letter)", || async {
            let mut call = ctx
                .shared
                .client()
                .await
                .send_message()
                .queue_url(&dlq)
                .message_body(message.body().unwrap_or(""))
                .set_message_attributes(message.message_attributes().cloned());
            if is_fifo(&dlq) {
                let group = message
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                    .cloned()
                    .unwrap_or_else(|| "default".to_string());
                call = call
                    .message_group_id(group)
                    .set_message_deduplication_id(message.message_id().map(str::to_string));
            }
            call.send().await.map_err(call_error)
        })
        .await;
        if sent.is_none() {
            return;
        }
        ctx.shared
            .stats
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
    } else {
        tracing::warn!(backend = %ctx.shared.name, queue = %ctx.source, "sqs bridge: rejected message dropped (the queue has no redrive policy)");
    }
    let deleted = with_tries(ctx, "DeleteMessage", || async {
        let url = ctx.url().await?;
        ctx.shared
            .client()
            .await
            .delete_message()
            .queue_url(url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(call_error)
    })
    .await;
    if deleted.is_some() {
        ctx.shared.stats.deleted.fetch_add(1, Ordering::Relaxed);
    }
}

struct SqsSettle {
    ctx: Arc<Ctx>,
    id: u64,
    receipt: String,
    message: Mutex<Option<aws_sdk_sqs::types::Message>>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    jobs: mpsc::UnboundedSender<Job>,
    settled: AtomicBool,
}

impl SqsSettle {
    fn finish(&self, outcome: Settlement) {
        // No more extensions: from here SQS decides when it is visible again.
        self.ctx.held.lock().remove(&self.id);
        let permit = self.permit.lock().take();
        let op = match outcome {
            Settlement::Ack => Op::Delete,
            Settlement::Requeue => Op::Visible,
            Settlement::Reject => match self.message.lock().take() {
                Some(m) => Op::Reject(Box::new(m)),
                None => Op::Delete,
            },
        };
        if self.receipt.is_empty() {
            return;
        }
        let _ = self.jobs.send(Job {
            op,
            receipt: self.receipt.clone(),
            _permit: permit,
        });
    }
}

impl Settle for SqsSettle {
    fn settle(&self, outcome: Settlement) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.finish(outcome);
        }
    }
}

impl Drop for SqsSettle {
    fn drop(&mut self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.finish(Settlement::Requeue);
        }
    }
}
