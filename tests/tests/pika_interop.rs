//! Interop with Python's pika: runs `tests/interop/pika_interop.py` against an in-process
//! server on an ephemeral port.
//!
//! The interpreter is `$WARREN_PYTHON`, or else the virtualenv `scripts/test.sh` creates at
//! `target/pyenv` under the workspace root (see `warren_tests::interop_python`). Without either
//! the test fails: it never skips.

use std::time::Duration;

/// The script runs in a few seconds; this only stops a hang from stalling the suite.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_blocking_connection_interop() {
    let server = warren_tests::start_server();
    let stdout =
        warren_tests::run_interop_script("tests/interop/pika_interop.py", &server, SCRIPT_TIMEOUT)
            .await;
    server.shutdown().await;
    // Visible with --nocapture: which checks ran.
    print!("{stdout}");
}
