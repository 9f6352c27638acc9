//! The engine task: one buffer per destination queue, SendMessageBatch calls (up to 10 entries
//! and `max_message_size` bytes each), per-entry results, retries with backoff.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use warren_backends::store::Guard;
use warren_backends::Message;

use super::mapping::{self, Outgoing};
use super::{backoff_delay, call_error, is_fifo, CallError, Shared};
use crate::retry::{spend_attempts, Owed};

/// SQS's most entries in one SendMessageBatch.
const BATCH_ENTRIES: usize = 10;
/// How long `close` lets batches already sent finish before failing them.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A message the bridge owes a completion for.
pub(crate) struct Pending {
    pub(crate) queue: String,
    out: Outgoing,
    group_id: Option<String>,
    dedup_id: Option<String>,
    /// Sent at least once (so a further send is a resend).
    sent: bool,
    owed: Owed,
}

impl Pending {
    /// SQS stored it: releasing the guard confirms it.
    fn confirmed(self) {
        self.owed.confirmed();
    }

    pub(crate) fn fail(self, reason: &str) {
        self.owed.fail(reason);
    }

    fn entry(&self, id: usize) -> Option<SendMessageBatchRequestEntry> {
        SendMessageBatchRequestEntry::builder()
            .id(id.to_string())
            .message_body(self.out.body.clone())
            .set_message_attributes(Some(self.out.attributes.clone()))
            .set_message_group_id(self.group_id.clone())
            .set_message_deduplication_id(self.dedup_id.clone())
            .build()
            .ok()
    }
}

impl AsMut<Owed> for Pending {
    fn as_mut(&mut self) -> &mut Owed {
        &mut self.owed
    }
}

/// Maps `message` for `queue`, or says why it can never be sent (handing the guard back).
pub(crate) fn prepare(
    shared: &Shared,
    queue: &str,
    message: &Message,
    guard: Guard,
) -> Result<Pending, (Guard, String)> {
    let cfg = &shared.config;
    let out = mapping::to_sqs(message);
    if out.size as u64 > cfg.max_message_size {
        return Err((
            guard,
            format!(
                "sqs bridge '{}': message of {} bytes (body as sent plus attributes) is over max_message_size ({})",
                shared.name, out.size, cfg.max_message_size
            ),
        ));
    }
    let (mut group_id, mut dedup_id) = (None, None);
    if is_fifo(queue) {
        let group = mapping::header_text(message, &cfg.group_id_header)
            .or_else(|| cfg.default_group_id.clone())
            .unwrap_or_else(|| match message.routing_key() {
                "" => "default".to_string(),
                key => key.to_string(),
            });
        if !mapping::valid_fifo_id(&group) {
            return Err((
                guard,
                format!(
                    "sqs bridge '{}': MessageGroupId '{group}' is not 1-128 letters, digits or punctuation (set header '{}' or default_group_id)",
                    shared.name, cfg.group_id_header
                ),
            ));
        }
        let dedup = mapping::header_text(message, &cfg.deduplication_id_header)
            .or_else(|| {
                message
                    .properties()
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_string())
            })
            .unwrap_or_else(|| shared.generated_id());
        if !mapping::valid_fifo_id(&dedup) {
            return Err((
                guard,
                format!(
                    "sqs bridge '{}': MessageDeduplicationId '{dedup}' is not 1-128 letters, digits or punctuation",
                    shared.name
                ),
            ));
        }
        group_id = Some(group);
        dedup_id = Some(dedup);
    }
    Ok(Pending {
        queue: queue.to_string(),
        out,
        group_id,
        dedup_id,
        sent: false,
        owed: Owed::new(guard),
    })
}

#[derive(Default)]
struct Dest {
    url: Option<String>,
    resolving: bool,
    buffer: VecDeque<Pending>,
    in_flight: usize,
    failures: u32,
    retry_at: Option<Instant>,
}

enum Done {
    Resolved {
        queue: String,
        result: Result<String, CallError>,
    },
    Sent {
        queue: String,
        batch: Vec<Pending>,
        result: Result<SendMessageBatchOutput, CallError>,
    },
}

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut dests: HashMap<String, Dest> = HashMap::new();
    let mut tasks: JoinSet<Done> = JoinSet::new();
    let mut closed = shared.closed.subscribe();
    loop {
        if shared.is_closed() {
            break;
        }
        let now = Instant::now();
        for (queue, dest) in dests.iter_mut() {
            dispatch(&shared, queue, dest, &mut tasks, now);
        }
        let wake = dests
            .values()
            .filter(|d| !d.buffer.is_empty())
            .filter_map(|d| d.retry_at)
            .min();
        tokio::select! {
            _ = closed.changed() => {}
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(done) = done {
                    finish(&shared, &mut dests, done);
                }
            }
            p = rx.recv() => match p {
                Some(p) => dests.entry(p.queue.clone()).or_default().buffer.push_back(p),
                None => break,
            },
            _ = sleep_until(wake), if wake.is_some() => {}
        }
        while let Ok(p) = rx.try_recv() {
            dests
                .entry(p.queue.clone())
                .or_default()
                .buffer
                .push_back(p);
        }
    }
    // Closed: let calls already made finish (their messages may be stored), then fail the rest.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(done) = tasks.join_next().await {
            if let Ok(done) = done {
                finish(&shared, &mut dests, done);
            }
        }
    })
    .await;
    tasks.abort_all();
    rx.close();
    let reason = format!("sqs bridge '{}' closed", shared.name);
    let mut left: Vec<Pending> = Vec::new();
    while let Ok(p) = rx.try_recv() {
        left.push(p);
    }
    for dest in dests.values_mut() {
        left.extend(dest.buffer.drain(..));
    }
    for p in left {
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        p.fail(&reason);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts whatever `dest` can send now: a queue URL lookup, or batches up to its in-flight limit.
fn dispatch(
    shared: &Arc<Shared>,
    queue: &str,
    dest: &mut Dest,
    tasks: &mut JoinSet<Done>,
    now: Instant,
) {
    if dest.buffer.is_empty() || dest.retry_at.is_some_and(|t| t > now) {
        return;
    }
    let Some(url) = dest.url.clone() else {
        if !dest.resolving {
            dest.resolving = true;
            let shared = shared.clone();
            let queue = queue.to_string();
            tasks.spawn(async move {
                let result = shared.queue_url(&queue).await;
                Done::Resolved { queue, result }
            });
        }
        return;
    };
    // A FIFO queue keeps its order only with one batch at a time.
    let limit = if is_fifo(queue) {
        1
    } else {
        shared.config.max_batches_in_flight
    };
    while dest.in_flight < limit && !dest.buffer.is_empty() {
        let mut batch = Vec::with_capacity(BATCH_ENTRIES);
        let mut bytes = 0u64;
        while batch.len() < BATCH_ENTRIES {
            let Some(next) = dest.buffer.front() else {
                break;
            };
            let size = next.out.size as u64;
            // The first entry always goes (its size was checked against the limit).
            if !batch.is_empty() && bytes + size > shared.config.max_message_size {
                break;
            }
            bytes += size;
            if let Some(p) = dest.buffer.pop_front() {
                batch.push(p);
            }
        }
        let resent = batch.iter().filter(|p| p.sent).count() as u64;
        shared.stats.resent.fetch_add(resent, Ordering::Relaxed);
        shared.stats.batches.fetch_add(1, Ordering::Relaxed);
        dest.in_flight += 1;
        let shared = shared.clone();
        let queue = queue.to_string();
        let url = url.clone();
        tasks.spawn(async move {
            let entries: Vec<SendMessageBatchRequestEntry> = batch
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.entry(i))
                .collect();
            let result = shared
                .client()
                .await
                .send_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(call_error);
            Done::Sent {
                queue,
                batch,
                result,
            }
        });
    }
}

fn finish(shared: &Shared, dests: &mut HashMap<String, Dest>, done: Done) {
    match done {
        Done::Resolved { queue, result } => {
            let dest = dests.entry(queue.clone()).or_default();
            dest.resolving = false;
            match result {
                Ok(url) => {
                    shared.call_ok();
                    dest.url = Some(url);
                }
                Err(e) => {
                    shared.call_failed("GetQueueUrl", &e);
                    let mut waiting: Vec<Pending> = dest.buffer.drain(..).collect();
                    waiting = spend_attempt(shared, waiting, &e.text);
                    dest.buffer.extend(waiting);
                    backoff(shared, dest);
                }
            }
        }
        Done::Sent {
            queue,
            batch,
            result,
        } => {
            let dest = dests.entry(queue.clone()).or_default();
            dest.in_flight = dest.in_flight.saturating_sub(1);
            match result {
                Ok(out) => {
                    shared.call_ok();
                    dest.failures = 0;
                    dest.retry_at = None;
                    let retry = settle_entries(shared, &queue, batch, &out);
                    if !retry.is_empty() {
                        requeue_front(dest, retry);
                        backoff(shared, dest);
                    }
                }
                Err(e) => {
                    shared.call_failed("SendMessageBatch", &e);
                    if e.missing_queue {
                        shared.forget_url(&queue);
                        dest.url = None;
                    }
                    let mut batch = batch;
                    for p in batch.iter_mut() {
                        p.sent = true;
                    }
                    let retry = spend_attempt(shared, batch, &e.text);
                    requeue_front(dest, retry);
                    backoff(shared, dest);
                }
            }
        }
    }
}

/// Puts `retry` back at the front of the buffer, in its order.
fn requeue_front(dest: &mut Dest, retry: Vec<Pending>) {
    for p in retry.into_iter().rev() {
        dest.buffer.push_front(p);
    }
}

fn backoff(shared: &Shared, dest: &mut Dest) {
    dest.failures += 1;
    dest.retry_at = Some(Instant::now() + backoff_delay(shared.retry(), dest.failures));
}

/// Confirms the entries SQS stored and fails those it refused as the sender's fault; returns
/// the rest (server-side failures, or entries the reply does not mention) to be sent again.
fn settle_entries(
    shared: &Shared,
    queue: &str,
    batch: Vec<Pending>,
    out: &SendMessageBatchOutput,
) -> Vec<Pending> {
    let mut slots: Vec<Option<Pending>> = batch.into_iter().map(Some).collect();
    let mut take = |id: &str| {
        id.parse::<usize>()
            .ok()
            .and_then(|i| slots.get_mut(i)?.take())
    };
    for ok in out.successful() {
        if let Some(p) = take(ok.id()) {
            shared.stats.confirmed.fetch_add(1, Ordering::Relaxed);
            p.confirmed();
        }
    }
    let mut retry = Vec::new();
    for failed in out.failed() {
        let Some(mut p) = take(failed.id()) else {
            continue;
        };
        let reason = format!(
            "{}: {}",
            failed.code(),
            failed.message().unwrap_or("no message")
        );
        if failed.sender_fault() {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(backend = %shared.name, queue, reason = %reason, "sqs bridge: SQS refused a message");
            p.fail(&format!(
                "sqs bridge '{}': SQS refused the message: {reason}",
                shared.name
            ));
        } else {
            p.sent = true;
            retry.push(p);
            tracing::debug!(backend = %shared.name, queue, reason = %reason, "sqs bridge: entry failed on the server side; sending it again");
        }
    }
    let mut retry = spend_attempt(shared, retry, "entry failed on the server side");
    let missing: Vec<Pending> = slots.into_iter().flatten().collect();
    if !missing.is_empty() {
        tracing::warn!(backend = %shared.name, queue, entries = missing.len(), "sqs bridge: SendMessageBatch reply did not mention some entries; sending them again");
        retry.extend(spend_attempt(
            shared,
            missing,
            "entry missing from the reply",
        ));
    }
    retry
}

/// Counts one failed attempt for every message, failing those past the budget; returns the
/// others in order.
fn spend_attempt(shared: &Shared, batch: Vec<Pending>, reason: &str) -> Vec<Pending> {
    spend_attempts(batch, shared.retry(), |p| {
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        let attempts = p.owed.attempts;
        tracing::warn!(backend = %shared.name, queue = %p.queue, attempts, reason, "sqs bridge gives up on a message");
        p.fail(&format!(
            "sqs bridge '{}': not stored after {attempts} attempts: {reason}",
            shared.name
        ));
    })
}
