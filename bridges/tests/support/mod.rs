//! Shared by the bridge tests: guards that record what became of each publish, the messages
//! the tests publish, and waiting for what a bridge does in the background.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use warren_backends::store::Completion;
use warren_backends::{Backend, Health, Incoming, Message, Subscription};

#[derive(Default)]
pub struct Outcomes {
    pub confirmed: Mutex<Vec<usize>>,
    pub failed: Mutex<Vec<(usize, String)>>,
    pub done: AtomicUsize,
}

pub struct TestGuard {
    id: usize,
    failed: AtomicBool,
    outcomes: Arc<Outcomes>,
}

impl Completion for TestGuard {
    fn failed(&self, reason: &str) {
        self.failed.store(true, Ordering::SeqCst);
        self.outcomes
            .failed
            .lock()
            .unwrap()
            .push((self.id, reason.to_string()));
    }
}

impl Drop for TestGuard {
    fn drop(&mut self) {
        if !self.failed.load(Ordering::SeqCst) {
            self.outcomes.confirmed.lock().unwrap().push(self.id);
        }
        self.outcomes.done.fetch_add(1, Ordering::SeqCst);
    }
}

impl Outcomes {
    pub fn guard(self: &Arc<Self>, id: usize) -> Arc<TestGuard> {
        Arc::new(TestGuard {
            id,
            failed: AtomicBool::new(false),
            outcomes: self.clone(),
        })
    }

    pub async fn wait_done(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.done.load(Ordering::SeqCst) < n {
            if Instant::now() >= deadline {
                // Counted before panicking: a panic while `failed` is locked would poison it
                // for the rest of the test.
                let failed = self.failed.lock().unwrap().len();
                panic!(
                    "only {} of {n} publishes completed within {within:?} ({failed} failed)",
                    self.done.load(Ordering::SeqCst),
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Outcomes {
    /// Waits for `sent` publishes (ids `0..sent`) and asserts each was confirmed; returns their
    /// ids in completion order.
    pub async fn all_confirmed(&self, sent: usize, within: Duration) -> Vec<usize> {
        self.wait_done(sent, within).await;
        let failed = self.failed.lock().unwrap().clone();
        assert!(failed.is_empty(), "failed: {failed:?}");
        let confirmed = self.confirmed.lock().unwrap().clone();
        assert_eq!(confirmed.len(), sent);
        confirmed
    }
}

/// The ids in `confirmed` whose message (its body is the id in decimal) is not in `bodies`.
pub fn missing_bodies(confirmed: &[usize], bodies: &HashSet<String>) -> Vec<usize> {
    confirmed
        .iter()
        .copied()
        .filter(|i| !bodies.contains(&i.to_string()))
        .collect()
}

/// Runs `scripts/<script>.sh <args>` (a test broker's start, restart, ...), failing the test
/// with the script's output when it fails.
pub fn broker_script(script: &str, args: &[&str]) {
    let path = repo_root().join("scripts").join(format!("{script}.sh"));
    let out = std::process::Command::new("bash")
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "scripts/{script}.sh {} failed (is `scripts/{script}.sh start` running?):\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Logs to the test's output, only with RUST_LOG set (e.g. RUST_LOG=warren_bridges=debug).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}

/// A name no other test (or earlier run) uses: `warren.test.<prefix>.<pid>.<nanos>`.
pub fn unique(prefix: &str) -> String {
    unique_joined(prefix, '.')
}

/// [`unique`] with dashes, for names that cannot hold dots (SQS queues).
pub fn unique_dashed(prefix: &str) -> String {
    unique_joined(prefix, '-')
}

fn unique_joined(prefix: &str, sep: char) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let pid = std::process::id();
    format!("warren{sep}test{sep}{prefix}{sep}{pid}{sep}{nanos}")
}

/// A message as the gateway hands it to a bridge, published to exchange `demo`.
pub fn message(routing_key: &str, properties: BasicProperties, body: impl Into<Bytes>) -> Message {
    Message::new("demo".into(), routing_key.into(), properties, body.into())
}

/// Every AMQP basic property set, with `headers`.
pub fn full_properties(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(3)
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_expiration("60000".into())
        .with_message_id("m-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("tests".into())
}

/// The subscription's next message, failing the test after 30 s or if it ended.
pub async fn next(sub: &mut Box<dyn Subscription>) -> Incoming {
    tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("no message within 30s")
        .expect("subscription ended")
}

/// Polls `done` every 20 ms until it holds, failing the test with `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} (waited {within:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the bridge reports `want`.
pub async fn wait_health(bridge: &dyn Backend, want: Health, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let health = bridge.health();
        if health == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health is {health:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The workspace root, for the broker scripts and their directories.
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The test broker's URL from `var`; without it the tests fail loudly, they never skip.
pub fn env_url(var: &str, script: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "\n\n{var} is not set: these tests need a real {what}.\n\
             Start the private test broker and point the tests at it:\n\n    \
             scripts/{script}.sh start\n    \
             export {var}=$(scripts/{script}.sh url)\n\n\
             (scripts/test.sh does both.)\n"
        ),
    }
}

/// Tests share a broker; one that restarts it must have it alone. Shared lock for the former,
/// exclusive for the latter: a file lock under target/<dir>/, so it holds across nextest's
/// processes too.
pub fn broker_lock(dir: &str, exclusive: bool) -> std::fs::File {
    let dir = repo_root().join("target").join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("tests.lock"))
        .unwrap();
    if exclusive {
        file.lock().unwrap();
    } else {
        file.lock_shared().unwrap();
    }
    file
}

/// The test broker's TLS URL and CA file from `url_var` and `ca_var` (scripts/test.sh sets
/// both from `scripts/<script>.sh tls-url` and `ca-file`); the tests fail loudly without them.
pub fn tls_env(url_var: &str, ca_var: &str, script: &str) -> (String, String) {
    match (std::env::var(url_var), std::env::var(ca_var)) {
        (Ok(url), Ok(ca)) if !url.is_empty() && !ca.is_empty() => (url, ca),
        _ => panic!(
            "\n\n{url_var} and {ca_var} must be set: these tests need the test broker's TLS \
             listener.\n\n    scripts/{script}.sh start\n    \
             export {url_var}=$(scripts/{script}.sh tls-url) {ca_var}=$(scripts/{script}.sh ca-file)\n\n\
             (scripts/test.sh does both.)\n"
        ),
    }
}
