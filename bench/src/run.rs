//! Publishers, consumers and the loop that runs them for a while and counts.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use warren_gateway::codec::{FRAME_BODY, FRAME_HEADER, FRAME_METHOD};

use crate::amqp::{now_ns, put_ack, scan_frames, Conn, PublishBatch, PublishTemplate, Target, CH};
use crate::sink::Sink;
use crate::{Mode, RunArgs};

/// Read buffer growth step for consumers and confirm listeners.
const READ_CHUNK: usize = 256 * 1024;

/// Counters every task adds to; the monitor reads them.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    measuring: AtomicBool,
    published: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    consumed: AtomicU64,
    /// Publishers that sent their --count (and saw it confirmed).
    publishers_done: AtomicU64,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, err: anyhow::Error) {
        let mut slot = self.error.lock().unwrap();
        if slot.is_none() {
            *slot = Some(format!("{err:#}"));
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn queue_names(args: &RunArgs) -> Vec<String> {
    (0..args.queues.max(1))
        .map(|i| format!("{}-{}", args.queue_prefix, i))
        .collect()
}

/// One publish-only / consume-only / end-to-end run; returns the JSON result.
pub async fn throughput(args: &RunArgs, mut target: Target) -> Result<Map<String, Value>> {
    let mut mode = args.mode;
    let sink = if args.sink {
        if args.confirm > 0 {
            bail!("--sink swallows everything and sends no confirms; drop --confirm");
        }
        mode = Mode::PublishOnly;
        let sink = Sink::start()?;
        target.addr = sink.addr.to_string();
        Some(sink)
    } else {
        None
    };
    let publishing = matches!(mode, Mode::EndToEnd | Mode::PublishOnly);
    let consuming = matches!(mode, Mode::EndToEnd | Mode::ConsumeOnly);
    if args.drain && mode != Mode::ConsumeOnly {
        bail!("--drain needs --mode consume-only");
    }
    if args.ack_every > 0 && args.prefetch > 0 && args.ack_every > args.prefetch as u64 {
        bail!("--ack-every must not exceed --prefetch, or the consumer would stall");
    }
    let queues = queue_names(args);

    // Queues first, on a connection of their own: declared (durable with --persistent), and
    // emptied unless we are here to consume what is already there.
    let mut drain_target = 0u64;
    if sink.is_none() {
        let mut admin = Conn::open(&target).await?;
        for q in &queues {
            let depth = admin.declare_queue(q, args.persistent).await?;
            if publishing && !args.no_purge {
                admin.purge_queue(q).await?;
            } else {
                drain_target += depth as u64;
            }
        }
        admin.close().await;
    }

    let shared = Arc::new(Shared::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut consumers = Vec::new();
    if consuming {
        for i in 0..args.consumers {
            let q = &queues[i % queues.len()];
            let mut conn = Conn::open(&target).await?;
            conn.declare_queue(q, args.persistent).await?;
            if args.prefetch > 0 {
                conn.qos(args.prefetch).await?;
            }
            conn.consume(q, &format!("bench-{i}"), args.ack_every == 0)
                .await?;
            let shared = shared.clone();
            let stop = stop_rx.clone();
            let ack_every = args.ack_every;
            consumers.push(tokio::spawn(async move {
                match consume(conn, ack_every, &shared, stop).await {
                    Ok(h) => h,
                    Err(e) => {
                        shared.fail(e);
                        new_histogram()
                    }
                }
            }));
        }
    }

    let mut publishers = Vec::new();
    let mut publisher_conns = Vec::new();
    if publishing {
        for i in 0..args.publishers {
            let q = &queues[i % queues.len()];
            let mut conn = Conn::open(&target).await?;
            if sink.is_none() {
                conn.declare_queue(q, args.persistent).await?;
            }
            if args.confirm > 0 {
                conn.confirm_select().await?;
            }
            let template =
                PublishTemplate::new(CH, "", q, args.size, args.persistent, conn.frame_max);
            publisher_conns.push((conn, template));
        }
    }
    let n_pub = publisher_conns.len().max(1) as u64;
    let started = Instant::now();
    for (i, (conn, template)) in publisher_conns.into_iter().enumerate() {
        let count = args
            .count
            .map(|c| c / n_pub + u64::from((i as u64) < c % n_pub));
        let plan = PublishPlan {
            batch: args.batch_bytes,
            window: args.confirm,
            rate: args.rate / n_pub as f64,
            count,
        };
        let shared = shared.clone();
        let stop = stop_rx.clone();
        publishers.push(tokio::spawn(async move {
            if let Err(e) = publish(conn, template, plan, shared.clone(), stop).await {
                shared.fail(e);
            }
        }));
    }

    // Monitor: warm-up snapshot, progress once a second, end conditions every 5 ms.
    let snapshot = |shared: &Shared| {
        [
            shared.published.load(Ordering::Relaxed),
            shared.confirmed.load(Ordering::Relaxed),
            shared.consumed.load(Ordering::Relaxed),
            sink.as_ref().map_or(0, |s| s.messages()),
        ]
    };
    let warmup = Duration::from_secs_f64(args.warmup.max(0.0));
    let duration = match args.duration {
        Some(d) => Some(Duration::from_secs_f64(d)),
        None if args.count.is_none() && !args.drain => Some(Duration::from_secs(10)),
        None => None,
    };
    let mut warm: Option<(Instant, [u64; 4])> = None;
    if warmup.is_zero() {
        shared.measuring.store(true, Ordering::Relaxed);
        warm = Some((started, [0; 4]));
    }
    let mut last_print = (started, [0u64; 4]);
    let end = loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = Instant::now();
        let snap = snapshot(&shared);
        if let Some(err) = shared.error.lock().unwrap().clone() {
            let _ = stop_tx.send(true);
            bail!("{err}");
        }
        if warm.is_none() && now >= started + warmup {
            shared.measuring.store(true, Ordering::Relaxed);
            warm = Some((now, snap));
        }
        if !args.quiet && now - last_print.0 >= Duration::from_secs(1) {
            let secs = (now - last_print.0).as_secs_f64();
            let rate = |k: usize| (snap[k] - last_print.1[k]) as f64 / secs;
            let mut line = format!("[{:6.1}s]", (now - started).as_secs_f64());
            if publishing {
                line += &format!(" published {:>12}/s", thousands(rate(0)));
            }
            if args.confirm > 0 {
                line += &format!(" confirmed {:>12}/s", thousands(rate(1)));
            }
            if consuming {
                line += &format!(" consumed {:>12}/s", thousands(rate(2)));
            }
            if sink.is_some() {
                line += &format!(" sink received {:>12}/s", thousands(rate(3)));
            }
            eprintln!("{line}");
            last_print = (now, snap);
        }
        let Some((warm_at, _)) = warm else { continue };
        if let Some(d) = duration {
            if now >= warm_at + d {
                break (now, snap);
            }
        }
        let done = if args.drain {
            snap[2] >= drain_target
        } else if let Some(count) = args.count {
            match mode {
                Mode::PublishOnly if sink.is_some() => snap[3] >= count,
                Mode::PublishOnly => shared.publishers_done.load(Ordering::Relaxed) >= n_pub,
                _ => snap[2] >= count,
            }
        } else {
            false
        };
        if done {
            break (now, snap);
        }
    };
    let (warm_at, warm_snap) = warm.expect("measuring has started");
    let elapsed = (end.0 - warm_at).as_secs_f64();
    let delta = |k: usize| end.1[k] - warm_snap[k];

    shared.stop.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let mut histogram = new_histogram();
    for c in consumers {
        match tokio::time::timeout(Duration::from_secs(5), c).await {
            Ok(Ok(h)) => histogram.add(&h).map_err(|e| anyhow!("{e}"))?,
            Ok(Err(e)) => bail!("consumer task failed: {e}"),
            Err(_) => eprintln!("a consumer did not stop within 5 s"),
        }
    }
    for p in publishers {
        if tokio::time::timeout(Duration::from_secs(5), p)
            .await
            .is_err()
        {
            eprintln!("a publisher did not stop within 5 s");
        }
    }
    if args.delete_after && sink.is_none() {
        let mut admin = Conn::open(&target).await?;
        for q in &queues {
            admin.delete_queue(q).await?;
        }
        admin.close().await;
    }

    let mut out = Map::new();
    out.insert("mode".into(), json!(mode.name()));
    out.insert("size".into(), json!(args.size));
    out.insert(
        "publishers".into(),
        json!(if publishing { args.publishers } else { 0 }),
    );
    out.insert(
        "consumers".into(),
        json!(if consuming { args.consumers } else { 0 }),
    );
    out.insert("queues".into(), json!(queues.len()));
    out.insert("persistent".into(), json!(args.persistent));
    out.insert("confirm".into(), json!(args.confirm));
    out.insert("ack_every".into(), json!(args.ack_every));
    out.insert("prefetch".into(), json!(args.prefetch));
    out.insert("rate_limit".into(), json!(args.rate));
    out.insert("elapsed_s".into(), json!(round(elapsed, 3)));
    if publishing {
        out.insert("published".into(), json!(delta(0)));
        out.insert(
            "publish_rate".into(),
            json!(round(delta(0) as f64 / elapsed, 0)),
        );
    }
    if args.confirm > 0 {
        out.insert("confirmed".into(), json!(delta(1)));
        out.insert(
            "confirm_rate".into(),
            json!(round(delta(1) as f64 / elapsed, 0)),
        );
        out.insert(
            "nacked".into(),
            json!(shared.nacked.load(Ordering::Relaxed)),
        );
    }
    if consuming {
        out.insert("consumed".into(), json!(delta(2)));
        out.insert(
            "consume_rate".into(),
            json!(round(delta(2) as f64 / elapsed, 0)),
        );
        if args.drain {
            out.insert("drain_target".into(), json!(drain_target));
        }
    }
    if let Some(sink) = &sink {
        out.insert("sink_received".into(), json!(delta(3)));
        out.insert(
            "sink_rate".into(),
            json!(round(delta(3) as f64 / elapsed, 0)),
        );
        out.insert(
            "sink_mib_per_s".into(),
            json!(round(
                sink.bytes() as f64 / (end.0 - started).as_secs_f64() / 1048576.0,
                1
            )),
        );
    }
    if consuming && args.rate > 0.0 && !histogram.is_empty() {
        out.insert("latency_count".into(), json!(histogram.len()));
        for (key, q) in [
            ("latency_p50_us", 0.5),
            ("latency_p99_us", 0.99),
            ("latency_p999_us", 0.999),
        ] {
            out.insert(key.into(), json!(histogram.value_at_quantile(q)));
        }
        out.insert("latency_max_us".into(), json!(histogram.max()));
    }
    Ok(out)
}

struct PublishPlan {
    batch: usize,
    window: u64,
    /// Messages per second for this publisher; 0 is as fast as possible.
    rate: f64,
    count: Option<u64>,
}

/// What the confirm listener shares with its publisher.
#[derive(Default)]
struct Confirms {
    /// Publishes confirmed (acked or nacked) so far.
    settled: AtomicU64,
    wake: Notify,
}

/// Confirm bookkeeping: everything up to `low` is settled, plus single confirms above it.
#[derive(Default)]
struct ConfirmTracker {
    low: u64,
    above: BTreeSet<u64>,
}

impl ConfirmTracker {
    fn settle(&mut self, tag: u64, multiple: bool) {
        if multiple {
            self.low = self.low.max(tag);
            while self.above.first().is_some_and(|t| *t <= self.low) {
                self.above.pop_first();
            }
        } else if tag > self.low {
            self.above.insert(tag);
        }
        while self.above.first() == Some(&(self.low + 1)) {
            self.above.pop_first();
            self.low += 1;
        }
    }

    fn settled(&self) -> u64 {
        self.low + self.above.len() as u64
    }
}

async fn publish(
    conn: Conn,
    template: PublishTemplate,
    plan: PublishPlan,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let Conn {
        rd, mut wr, buf, ..
    } = conn;
    let confirms = Arc::new(Confirms::default());
    let listener = tokio::spawn(listen_confirms(
        rd,
        buf,
        confirms.clone(),
        shared.clone(),
        stop.clone(),
    ));
    let per_batch = (plan.batch / template.len()).clamp(1, 4096);
    let mut batch = PublishBatch::new(&template, per_batch);
    let started = Instant::now();
    let mut sent = 0u64;
    let result: Result<()> = async {
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let mut n = batch.count as u64;
            if let Some(count) = plan.count {
                if sent >= count {
                    break;
                }
                n = n.min(count - sent);
            }
            if plan.window > 0 {
                let in_flight = sent - confirms.settled.load(Ordering::Acquire);
                if in_flight >= plan.window {
                    tokio::select! {
                        _ = confirms.wake.notified() => {}
                        _ = stop.changed() => break,
                    }
                    continue;
                }
                n = n.min(plan.window - in_flight);
            }
            if plan.rate > 0.0 {
                let due = (started.elapsed().as_secs_f64() * plan.rate) as u64;
                if due <= sent {
                    let next = started + Duration::from_secs_f64((sent + 1) as f64 / plan.rate);
                    tokio::select! {
                        _ = tokio::time::sleep_until(next.into()) => {}
                        _ = stop.changed() => break,
                    }
                    continue;
                }
                n = n.min(due - sent);
            }
            let bytes = batch.stamped(n as usize, now_ns());
            tokio::select! {
                r = wr.write_all(bytes) => r?,
                _ = stop.changed() => break,
            }
            sent += n;
            shared.published.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    // With a count, wait for the last confirms before leaving (the monitor ends the run).
    if result.is_ok() && plan.window > 0 && !shared.stop.load(Ordering::Relaxed) {
        while confirms.settled.load(Ordering::Acquire) < sent && !*stop.borrow() {
            tokio::select! {
                _ = confirms.wake.notified() => {}
                _ = stop.changed() => {}
            }
        }
    }
    shared.publishers_done.fetch_add(1, Ordering::Relaxed);
    let _ = stop.wait_for(|s| *s).await;
    listener.abort();
    drop(wr);
    result
}

async fn listen_confirms(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    confirms: Arc<Confirms>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tracker = ConfirmTracker::default();
    loop {
        let before = tracker.settled();
        let mut nacks = 0u64;
        let scanned = scan_frames(&mut buf, |f| {
            if f.kind == FRAME_METHOD {
                let id = f.method_id();
                if (id == (60, 80) || id == (60, 120)) && f.payload.len() >= 13 {
                    let tag = u64::from_be_bytes(f.payload[4..12].try_into().unwrap());
                    tracker.settle(tag, f.payload[12] & 1 != 0);
                    if id.1 == 120 {
                        nacks += 1;
                    }
                } else {
                    f.check_close()?;
                }
            }
            Ok(())
        });
        if let Err(e) = scanned {
            eprintln!("publisher: {e:#}");
            return;
        }
        let after = tracker.settled();
        if after != before {
            confirms.settled.store(after, Ordering::Release);
            confirms.wake.notify_one();
            shared
                .confirmed
                .fetch_add(after - before, Ordering::Relaxed);
            shared.nacked.fetch_add(nacks, Ordering::Relaxed);
        }
        buf.reserve(READ_CHUNK);
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = stop.changed() => return,
        }
    }
}

/// A consumer's loop; returns its latency histogram (µs, from the body's send timestamp).
async fn consume(
    conn: Conn,
    ack_every: u64,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> Result<Histogram<u64>> {
    let Conn {
        mut rd,
        mut wr,
        mut buf,
        ..
    } = conn;
    let mut hist = new_histogram();
    let mut measuring = false;
    let mut remaining = 0u64;
    let mut stamp_next = false;
    let mut last_tag = 0u64;
    let mut acked_tag = 0u64;
    let mut unacked = 0u64;
    let mut acks = Vec::with_capacity(256);
    loop {
        if !measuring && shared.measuring.load(Ordering::Relaxed) {
            measuring = true;
            hist.reset();
        }
        let mut done = 0u64;
        let now_us = now_ns() / 1000;
        scan_frames(&mut buf, |f| {
            match f.kind {
                FRAME_METHOD => match f.method_id() {
                    (60, 60) => {
                        let p = f.payload;
                        let tag_at = 5 + *p.get(4).unwrap_or(&0) as usize;
                        let tag = p
                            .get(tag_at..tag_at + 8)
                            .ok_or_else(|| anyhow!("short basic.deliver"))?;
                        last_tag = u64::from_be_bytes(tag.try_into().unwrap());
                    }
                    (60, 30) => bail!("the server cancelled the consumer"),
                    _ => f.check_close()?,
                },
                FRAME_HEADER => {
                    let size = f
                        .payload
                        .get(4..12)
                        .ok_or_else(|| anyhow!("short content header"))?;
                    remaining = u64::from_be_bytes(size.try_into().unwrap());
                    stamp_next = true;
                    if remaining == 0 {
                        done += 1;
                        unacked += 1;
                    }
                }
                FRAME_BODY => {
                    if stamp_next && f.payload.len() >= 8 {
                        let sent_ns = u64::from_le_bytes(f.payload[..8].try_into().unwrap());
                        hist.saturating_record(now_us.saturating_sub(sent_ns / 1000).max(1));
                    }
                    stamp_next = false;
                    remaining = remaining.saturating_sub(f.payload.len() as u64);
                    if remaining == 0 {
                        done += 1;
                        unacked += 1;
                    }
                }
                _ => {}
            }
            if ack_every > 0 && unacked >= ack_every {
                put_ack(&mut acks, CH, last_tag, true);
                acked_tag = last_tag;
                unacked = 0;
            }
            Ok(())
        })?;
        if done > 0 {
            shared.consumed.fetch_add(done, Ordering::Relaxed);
        }
        if !acks.is_empty() {
            wr.write_all(&acks).await?;
            acks.clear();
        }
        buf.reserve(READ_CHUNK);
        tokio::select! {
            r = rd.read_buf(&mut buf) => {
                if r? == 0 {
                    if shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    bail!("the server closed the consumer's connection");
                }
            }
            _ = stop.changed() => break,
        }
    }
    // Settle what was received, so a drained queue stays drained.
    if ack_every > 0 && last_tag > acked_tag {
        acks.clear();
        put_ack(&mut acks, CH, last_tag, true);
        let _ = wr.write_all(&acks).await;
    }
    close_halves(rd, wr).await;
    Ok(hist)
}

async fn close_halves(rd: OwnedReadHalf, wr: OwnedWriteHalf) {
    let conn = Conn::from_halves(rd, wr);
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
}

/// Opens `args.connections` connections (channel 1 open on each), holds them idle for
/// `--duration` seconds (default 10), and reports how long opening took.
pub async fn idle(args: &RunArgs, target: Target) -> Result<Map<String, Value>> {
    let n = args.connections;
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(64));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let target = target.clone();
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let conn = Conn::open(&target).await?;
            // Keep only the socket: the read buffer would dwarf what we are measuring.
            Ok::<_, anyhow::Error>((conn.rd, conn.wr))
        });
    }
    let mut held = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        held.push(r??);
    }
    let open_s = started.elapsed().as_secs_f64();
    eprintln!("ready: {n} connections open in {open_s:.1} s");
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{n}\n"))?;
    }
    tokio::time::sleep(Duration::from_secs_f64(args.duration.unwrap_or(10.0))).await;
    drop(held);
    let mut out = Map::new();
    out.insert("mode".into(), json!("idle"));
    out.insert("connections".into(), json!(n));
    out.insert("open_s".into(), json!(round(open_s, 2)));
    Ok(out)
}

/// Purges or deletes the run's queues.
pub async fn admin(args: &RunArgs, target: Target) -> Result<Map<String, Value>> {
    let mut conn = Conn::open(&target).await?;
    let mut removed = 0u64;
    for q in queue_names(args) {
        removed += match args.mode {
            Mode::Purge => {
                conn.declare_queue(&q, args.persistent).await?;
                conn.purge_queue(&q).await?
            }
            _ => conn.delete_queue(&q).await?,
        } as u64;
    }
    conn.close().await;
    let mut out = Map::new();
    out.insert("mode".into(), json!(args.mode.name()));
    out.insert("messages_removed".into(), json!(removed));
    Ok(out)
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// 1234567.8 → "1,234,568".
pub fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirm_tracker_counts_single_and_multiple() {
        let mut t = ConfirmTracker::default();
        t.settle(2, false);
        assert_eq!(t.settled(), 1);
        t.settle(1, false);
        assert_eq!((t.low, t.settled()), (2, 2));
        t.settle(5, false);
        t.settle(4, true);
        assert_eq!((t.low, t.settled()), (5, 5));
        t.settle(10, true);
        assert_eq!(t.settled(), 10);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.4), "1,234,567");
    }
}
