//! The engine task: owns the shared connection, appends published messages (pipelined
//! XADDs), reconnects with backoff.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;

use super::{backoff_delay, drain, Pending, Shared, State};
use crate::retry::spend_attempts;

/// XADDs sent in one pipeline at most.
const BATCH: usize = 256;

pub(crate) async fn connect(
    shared: &Shared,
    response_timeout: Duration,
) -> Result<MultiplexedConnection, redis::RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response_timeout));
    shared
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut buffer: VecDeque<Pending> = VecDeque::new();
    let mut closed = shared.closed.subscribe();
    let mut failures: u32 = 0;
    loop {
        if shared.is_closed() {
            break;
        }
        shared.set_state(State::Connecting, None);
        let error = match connect(&shared, Duration::from_secs(10)).await {
            Ok(conn) => {
                failures = 0;
                shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                shared.connection.send_replace(Some(conn.clone()));
                shared.set_state(State::Ready, None);
                match ready(&shared, conn, &mut rx, &mut buffer).await {
                    Ok(()) => break,
                    Err(e) => e,
                }
            }
            Err(e) => {
                // Every waiting message spent one attempt on this failed connection.
                drain(&mut rx, &mut buffer);
                buffer = spend_attempt(&shared, buffer, &e.to_string()).into();
                e.to_string()
            }
        };
        shared.connection.send_replace(None);
        failures += 1;
        shared.set_state(State::Degraded, Some(error));
        let delay = backoff_delay(shared.retry(), failures);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = closed.changed() => {}
        }
    }
    // Closed: whatever is still waiting is failed.
    drain(&mut rx, &mut buffer);
    rx.close();
    drain(&mut rx, &mut buffer);
    let reason = format!("redis bridge '{}' closed", shared.name);
    for p in buffer.drain(..) {
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        p.fail(&reason);
    }
}

/// Counts one failed attempt for every message of `batch`, failing those past the budget;
/// returns the others in order.
fn spend_attempt(
    shared: &Shared,
    batch: impl IntoIterator<Item = Pending>,
    reason: &str,
) -> Vec<Pending> {
    spend_attempts(batch, shared.retry(), |p| {
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        let attempts = p.owed.attempts;
        tracing::warn!(backend = %shared.name, stream = %p.stream, attempts, reason, "redis bridge gives up on a message");
        p.fail(&format!(
            "redis bridge '{}': not appended after {attempts} attempts: {reason}",
            shared.name
        ));
    })
}

/// Sends batches while connected. `Ok` when closed, `Err` with the failure otherwise (the
/// failed batch is back at the front of `buffer`).
async fn ready(
    shared: &Shared,
    mut conn: MultiplexedConnection,
    rx: &mut mpsc::UnboundedReceiver<Pending>,
    buffer: &mut VecDeque<Pending>,
) -> Result<(), String> {
    let mut closed = shared.closed.subscribe();
    let mut lost = shared.connection.subscribe();
    loop {
        if buffer.is_empty() {
            tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => buffer.push_back(p),
                    None => return Ok(()),
                },
                _ = closed.changed() => return Ok(()),
                // A subscription or settlement saw the connection fail.
                _ = lost.changed() => {
                    if lost.borrow_and_update().is_none() {
                        return Err("connection lost".into());
                    }
                }
            }
        }
        if shared.is_closed() {
            return Ok(());
        }
        drain(rx, buffer);
        let n = buffer.len().min(BATCH);
        let batch: Vec<Pending> = buffer.drain(..n).collect();
        let mut pipe = redis::pipe();
        for p in &batch {
            let cmd = pipe.cmd("XADD").arg(&p.stream);
            if let Some(maxlen) = shared.config.maxlen {
                cmd.arg("MAXLEN").arg("~").arg(maxlen);
            }
            cmd.arg("*");
            for (k, v) in &p.fields {
                cmd.arg(k).arg(v.as_slice());
            }
        }
        let resent = batch.iter().filter(|p| p.sent).count() as u64;
        shared.stats.resent.fetch_add(resent, Ordering::Relaxed);
        let result: Result<Vec<String>, redis::RedisError> = pipe.query_async(&mut conn).await;
        match result {
            Ok(_) => {
                shared
                    .stats
                    .confirmed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for p in batch {
                    p.confirmed();
                }
            }
            Err(e) => {
                let reason = e.to_string();
                let mut batch = batch;
                for p in batch.iter_mut() {
                    p.sent = true;
                }
                for p in spend_attempt(shared, batch, &reason).into_iter().rev() {
                    buffer.push_front(p);
                }
                return Err(reason);
            }
        }
    }
}
