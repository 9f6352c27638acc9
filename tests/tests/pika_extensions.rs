//! RabbitMQ extensions through Python's pika: runs `tests/interop/pika_extensions.py` (DLX and
//! x-death, TTL, max-length, priorities) against an in-process server on an ephemeral port.
//!
//! The interpreter is `$WARREN_PYTHON`, or else the virtualenv at `target/pyenv` under the
//! workspace root. Without either the test fails: it never skips.

use std::time::Duration;

/// The script runs in a few seconds; this only stops a hang from stalling the suite.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_extensions() {
    let server = warren_tests::start_server();
    let stdout = warren_tests::run_interop_script(
        "tests/interop/pika_extensions.py",
        &server,
        SCRIPT_TIMEOUT,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("server shutdown");
    // Visible with --nocapture: which checks ran.
    print!("{stdout}");
}
