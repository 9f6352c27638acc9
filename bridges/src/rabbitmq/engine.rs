//! The engine task: owns the connection and the confirm-mode channel, runs the state machine
//! and pipelines publishes.
//!
//! ```text
//!            ┌────────────┐  connected, channel in confirm mode   ┌─────────┐
//!  start ──▶ │ Connecting │ ────────────────────────────────────▶ │  Ready  │
//!            └────────────┘                                       └─────────┘
//!                 ▲   │ failed (every held message: one attempt)       │ connection or
//!                 │   ▼                                                │ channel failure
//!            ┌────────────┐ ◀──────────────────────────────────────────┘ (unconfirmed
//!            │  Degraded  │   sleeps initial..max backoff, with jitter    messages: one
//!            └────────────┘                                               attempt each)
//! ```
//!
//! `close()` (or dropping the bridge) ends it from any state: unconfirmed publishes get a few
//! seconds to be confirmed, every other message is failed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, Event, ExchangeKind};
use tokio::sync::watch;
use tokio::time::Instant;

use super::publish::{Intake, Pending};
use super::{is_not_found, Shared, State};

/// Connecting (TCP, handshake, channel, confirm.select) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A passive exchange declare may take this long before the connection is deemed dead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// On `close()`, how long unconfirmed publishes may still be confirmed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// After a failure, how long to collect confirms that were already on their way.
const FAILURE_GRACE: Duration = Duration::from_secs(2);
/// How often `Ready` checks that the connection is still open when nothing else happens.
const LINK_CHECK: Duration = Duration::from_secs(1);
/// Publishes written per batch at most (the in-flight window bounds it too).
const MAX_BATCH: usize = 1024;

type ConfirmFuture = Pin<Box<dyn Future<Output = (u64, lapin::Result<Confirmation>)> + Send>>;

/// Why `Ready` ended.
enum End {
    Closed,
    Failed(String),
}

/// The connection and what is open on it.
struct Link {
    conn: Arc<Connection>,
    /// Confirm mode: every publish goes here.
    channel: Channel,
    /// For passive exchange declares; RabbitMQ closes it on a 404, so it is reopened then.
    probe: Option<Channel>,
}

impl Link {
    /// The connection and the publish channel are both open.
    fn usable(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

/// Messages the engine holds outside its in-flight window.
#[derive(Default)]
struct Held {
    /// To (re)send as soon as there is room, oldest first.
    ready: VecDeque<Pending>,
    /// Nacked, or its exchange was missing: resent once due (its own backoff).
    delayed: BTreeMap<(Instant, u64), Pending>,
}

impl Held {
    /// Counts a failed attempt; gives up (`guard.failed`) when the budget is spent.
    fn charge(shared: &Shared, mut p: Pending, reason: &str) -> Option<Pending> {
        if p.owed.spend_attempt(&shared.retry) {
            let attempts = p.owed.attempts;
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                backend = %shared.name, exchange = %p.exchange, attempts, reason,
                "giving up on a message"
            );
            let why = format!(
                "{}: gave up after {attempts} attempts: {reason}",
                shared.name
            );
            p.fail(&why);
            None
        } else {
            Some(p)
        }
    }

    /// Charges `p` and, if it has attempts left, schedules its resend after a backoff.
    fn retry_later(&mut self, shared: &Shared, p: Pending, reason: &str) {
        if let Some(p) = Held::charge(shared, p, reason) {
            let due = Instant::now() + shared.backoff(p.owed.attempts);
            self.delayed.insert((due, p.seq), p);
        }
    }

    /// Charges every held message one attempt (a connection attempt failed while they
    /// waited). Returns how many were given up on.
    fn charge_all(&mut self, shared: &Shared, reason: &str) -> usize {
        let before = self.len();
        for p in std::mem::take(&mut self.ready) {
            if let Some(p) = Held::charge(shared, p, reason) {
                self.ready.push_back(p);
            }
        }
        for (key, p) in std::mem::take(&mut self.delayed) {
            if let Some(p) = Held::charge(shared, p, reason) {
                self.delayed.insert(key, p);
            }
        }
        before - self.len()
    }

    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.delayed.keys().next().map(|(due, _)| *due)
    }

    fn len(&self) -> usize {
        self.ready.len() + self.delayed.len()
    }

    fn drain(&mut self) -> Vec<Pending> {
        let mut all: Vec<Pending> = self.ready.drain(..).collect();
        all.extend(std::mem::take(&mut self.delayed).into_values());
        all
    }
}

/// The engine task. Returns once the bridge is closed and every message it held is settled.
pub(super) async fn run(shared: Arc<Shared>, mut intake: Intake) {
    let mut held = Held::default();
    let mut closed = shared.closed.subscribe();
    let mut failures: u32 = 0;
    'machine: loop {
        if *closed.borrow() {
            break;
        }
        shared.set_state(State::Connecting, None);
        let attempt = tokio::select! {
            r = connect(&shared) => Some(r),
            _ = closed.wait_for(|c| *c) => None,
        };
        let error = match attempt {
            None => break,
            Some(Ok(mut link)) => {
                failures = 0;
                shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                shared.connection.send_replace(Some(link.conn.clone()));
                shared.set_state(State::Ready, None);
                if held.len() > 0 {
                    tracing::info!(
                        backend = %shared.name, messages = held.len(),
                        "resending messages RabbitMQ had not confirmed"
                    );
                }
                let end = ready(&shared, &mut link, &mut intake, &mut held, &mut closed).await;
                shared.connection.send_replace(None);
                // Best effort: the connection may be gone already. Subscriptions on it resume
                // on the next one.
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), link.conn.close(200, "OK".into()))
                        .await;
                match end {
                    End::Closed => break,
                    End::Failed(error) => error,
                }
            }
            Some(Err(error)) => {
                // Messages waiting for a connection share in its failures: with the upstream
                // down for good, publishers get their nack once the budget is spent.
                while let Some(p) = intake.try_next() {
                    held.ready.push_back(p);
                }
                let given_up = held.charge_all(&shared, &format!("cannot connect: {error}"));
                if given_up > 0 {
                    tracing::warn!(
                        backend = %shared.name, messages = given_up, error = %error,
                        "gave up on messages after their last attempt"
                    );
                }
                error
            }
        };
        failures = failures.saturating_add(1);
        let delay = shared.backoff(failures);
        shared.set_state(State::Degraded, Some(error));
        tracing::info!(
            backend = %shared.name, delay_ms = delay.as_millis() as u64, failures,
            held = held.len(), "reconnecting after a backoff"
        );
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = closed.wait_for(|c| *c) => break 'machine,
                p = intake.next() => match p {
                    Some(p) => held.ready.push_back(p),
                    None => break 'machine,
                },
            }
        }
    }
    shared.connection.send_replace(None);
    shared.set_state(State::Closed, None);
    let mut left = held.drain();
    left.extend(intake.close());
    if !left.is_empty() {
        tracing::warn!(
            backend = %shared.name, messages = left.len(),
            "bridge closed: failing messages RabbitMQ had not confirmed"
        );
    }
    let why = format!("{}: the bridge was closed", shared.name);
    for p in left {
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        p.fail(&why);
    }
}

async fn connect(shared: &Shared) -> Result<Link, String> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("warren bridge '{}'", shared.name).into());
    let work = async {
        let conn = Connection::connect_uri(shared.uri.clone(), properties).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok::<_, lapin::Error>(Link {
            conn: Arc::new(conn),
            channel,
            probe: None,
        })
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no connection within {}s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// The `Ready` state: pipelines publishes until the connection fails or the bridge closes.
async fn ready(
    shared: &Shared,
    link: &mut Link,
    intake: &mut Intake,
    held: &mut Held,
    closed: &mut watch::Receiver<bool>,
) -> End {
    let mut inflight: HashMap<u64, Pending> = HashMap::new();
    let mut confirms: FuturesUnordered<ConfirmFuture> = FuturesUnordered::new();
    // Exchanges known to exist on this connection.
    let mut verified: HashSet<ShortString> = HashSet::new();
    let mut events = Box::pin(link.conn.events_listener());
    let mut check = tokio::time::interval(LINK_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = loop {
        held.promote_due(Instant::now());
        let room = shared.max_in_flight.saturating_sub(inflight.len());
        if room > 0 {
            let mut batch = Vec::new();
            while batch.len() < room.min(MAX_BATCH) {
                match held.ready.pop_front().or_else(|| intake.try_next()) {
                    Some(p) => batch.push(p),
                    None => break,
                }
            }
            if !batch.is_empty() {
                let sent = send_batch(
                    shared,
                    link,
                    batch,
                    &mut verified,
                    &mut inflight,
                    &mut confirms,
                    held,
                    closed,
                )
                .await;
                match sent {
                    Ok(()) => continue,
                    Err(end) => break end,
                }
            }
        }
        let next_due = held.next_due();
        tokio::select! {
            biased;
            _ = closed.wait_for(|c| *c) => break End::Closed,
            Some(first) = confirms.next(), if !confirms.is_empty() => {
                // RabbitMQ acks in bulk (multiple = true): take every confirm already here, so
                // the window refills with one larger batch.
                let mut next = Some(first);
                let mut failed = None;
                let mut taken = 0;
                while let Some((seq, result)) = next.take() {
                    if let Err(error) = on_confirm(shared, held, &mut inflight, seq, result) {
                        failed = Some(error);
                        break;
                    }
                    taken += 1;
                    if taken < MAX_BATCH {
                        next = confirms.next().now_or_never().flatten();
                    }
                }
                if let Some(error) = failed {
                    break End::Failed(error);
                }
            }
            event = events.next() => match event {
                // lapin reports errors of any channel of the connection here (a 404 on a
                // passive declare too): only the connection or the publish channel matters.
                Some(Event::Error(e)) => {
                    if !link.usable() {
                        break End::Failed(e.to_string());
                    }
                    tracing::debug!(backend = %shared.name, error = %e, "error on another channel of the connection");
                }
                Some(Event::ConnectionBlocked(reason)) => shared.set_blocked(Some(reason)),
                Some(Event::ConnectionUnblocked) => shared.set_blocked(None),
                Some(_) => {}
                None => break End::Failed("the connection went away".into()),
            },
            p = intake.next(), if room > 0 => match p {
                Some(p) => held.ready.push_back(p),
                None => break End::Closed,
            },
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {}
            // A fallback for a connection that died without an event while idle.
            _ = check.tick() => {
                if !link.usable() {
                    break End::Failed("the connection or its channel closed".into());
                }
            }
        }
    };
    settle_unconfirmed(shared, held, inflight, confirms, &end).await;
    end
}

/// One confirm came back. `Err` when it says the channel or connection failed.
fn on_confirm(
    shared: &Shared,
    held: &mut Held,
    inflight: &mut HashMap<u64, Pending>,
    seq: u64,
    result: lapin::Result<Confirmation>,
) -> Result<(), String> {
    let Some(p) = inflight.remove(&seq) else {
        return Ok(());
    };
    match result {
        Ok(Confirmation::Ack(_)) => {
            shared.stats.confirmed.fetch_add(1, Ordering::Relaxed);
            p.confirmed();
            Ok(())
        }
        Ok(Confirmation::Nack(_)) => {
            tracing::warn!(
                backend = %shared.name, exchange = %p.exchange, attempts = p.owed.attempts + 1,
                "RabbitMQ nacked a message; resending it after a backoff"
            );
            held.retry_later(shared, p, "nacked by RabbitMQ");
            Ok(())
        }
        Ok(Confirmation::NotRequested) => {
            inflight.insert(seq, p);
            Err("the channel is not in confirm mode".into())
        }
        Err(e) => {
            inflight.insert(seq, p);
            Err(e.to_string())
        }
    }
}

/// Writes a batch: every basic.publish is queued on the channel before any is awaited, and
/// their confirms join the in-flight set.
#[allow(clippy::too_many_arguments)]
async fn send_batch(
    shared: &Shared,
    link: &mut Link,
    batch: Vec<Pending>,
    verified: &mut HashSet<ShortString>,
    inflight: &mut HashMap<u64, Pending>,
    confirms: &mut FuturesUnordered<ConfirmFuture>,
    held: &mut Held,
    closed: &mut watch::Receiver<bool>,
) -> Result<(), End> {
    // Publishing to a missing exchange makes RabbitMQ close the channel, failing every
    // unconfirmed message on it: check each exchange once per connection first.
    let mut missing: HashSet<ShortString> = HashSet::new();
    let mut unknown: Vec<ShortString> = Vec::new();
    for p in &batch {
        if !p.exchange.as_str().is_empty()
            && !verified.contains(&p.exchange)
            && !unknown.contains(&p.exchange)
        {
            unknown.push(p.exchange.clone());
        }
    }
    for exchange in unknown {
        match probe(link, &exchange).await {
            Ok(true) => {
                verified.insert(exchange);
            }
            Ok(false) => {
                missing.insert(exchange);
            }
            Err(error) => {
                // The connection is in trouble; these were not attempted.
                for p in batch.into_iter().rev() {
                    held.ready.push_front(p);
                }
                return Err(End::Failed(error));
            }
        }
    }
    let (to_send, refused): (Vec<Pending>, Vec<Pending>) = batch
        .into_iter()
        .partition(|p| !missing.contains(&p.exchange));
    for p in refused {
        let reason = format!("exchange '{}' does not exist upstream", p.exchange);
        tracing::warn!(backend = %shared.name, attempts = p.owed.attempts + 1, "{reason}");
        held.retry_later(shared, p, &reason);
    }
    if to_send.is_empty() {
        return Ok(());
    }

    // Polled in order, so frames (and delivery tags) follow publish order.
    let writes = write_in_order(to_send.iter().map(|p| {
        link.channel.basic_publish(
            p.exchange.clone(),
            p.message.routing_key().into(),
            BasicPublishOptions::default(),
            p.message.body(),
            (*p.properties).clone(),
        )
    }));
    let written = tokio::select! {
        r = writes => Some(r),
        _ = closed.wait_for(|c| *c) => None,
    };
    let Some(results) = written else {
        for p in to_send {
            inflight.insert(p.seq, p);
        }
        return Err(End::Closed);
    };
    let mut error = None;
    for (mut p, result) in to_send.into_iter().zip(results) {
        if p.sent {
            shared.stats.resent.fetch_add(1, Ordering::Relaxed);
        }
        p.sent = true;
        match result {
            Ok(confirm) => {
                let seq = p.seq;
                confirms.push(Box::pin(async move { (seq, confirm.await) }));
            }
            Err(e) => {
                error.get_or_insert_with(|| e.to_string());
            }
        }
        // Those whose write failed stay here too: the teardown charges and requeues them.
        inflight.insert(p.seq, p);
    }
    shared
        .stats
        .peak_in_flight
        .fetch_max(inflight.len() as u64, Ordering::Relaxed);
    match error {
        Some(error) => Err(End::Failed(error)),
        None => Ok(()),
    }
}

/// Runs `futures` to completion, polling each in turn: every `basic_publish` queues its frames
/// on its first poll, so the first pass writes the whole batch in order before any is awaited.
async fn write_in_order<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (future, result) in futures.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => *result = Some(r),
                    std::task::Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("every write completed"))
        .collect()
}

/// Passive exchange declare: `Ok(false)` if RabbitMQ says it does not exist.
async fn probe(link: &mut Link, exchange: &ShortString) -> Result<bool, String> {
    let work = async {
        if link.probe.is_none() {
            link.probe = Some(link.conn.create_channel().await?);
        }
        let channel = link.probe.as_ref().expect("just opened");
        channel
            .exchange_declare(
                exchange.clone(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, work).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) if is_not_found(&e) => {
            // RabbitMQ closed that channel.
            link.probe = None;
            Ok(false)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer to exchange.declare within {}s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// After `Ready` ended: collects the confirms still arriving, then requeues (on a failure,
/// charging an attempt) or fails (on close) what stays unconfirmed.
async fn settle_unconfirmed(
    shared: &Shared,
    held: &mut Held,
    mut inflight: HashMap<u64, Pending>,
    mut confirms: FuturesUnordered<ConfirmFuture>,
    end: &End,
) {
    let grace = match end {
        End::Closed => CLOSE_GRACE,
        // lapin rejects every pending confirm as soon as it sees the failure.
        End::Failed(_) => FAILURE_GRACE,
    };
    let deadline = Instant::now() + grace;
    while !confirms.is_empty() {
        match tokio::time::timeout_at(deadline, confirms.next()).await {
            Ok(Some((seq, Ok(Confirmation::Ack(_))))) => {
                if let Some(p) = inflight.remove(&seq) {
                    shared.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                    p.confirmed();
                }
            }
            // Nacked or failed: stays in `inflight`, dealt with below.
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    drop(confirms);
    let mut left: Vec<Pending> = inflight.into_values().collect();
    left.sort_by_key(|p| p.seq);
    match end {
        End::Closed => {
            let why = format!("{}: closed before RabbitMQ confirmed it", shared.name);
            for p in left {
                shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                p.fail(&why);
            }
        }
        End::Failed(error) => {
            let count = left.len();
            let reason = format!("unconfirmed when the connection failed: {error}");
            for p in left.into_iter().rev() {
                if let Some(p) = Held::charge(shared, p, &reason) {
                    held.ready.push_front(p);
                }
            }
            if count > 0 {
                tracing::warn!(
                    backend = %shared.name, messages = count, error = %error,
                    "connection lost with messages unconfirmed; they will be resent (RabbitMQ may then hold duplicates)"
                );
            }
        }
    }
}
