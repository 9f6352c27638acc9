//! Interop with Python's pika: runs `tests/interop/pika_interop.py` against an in-process
//! server on an ephemeral port.
//!
//! The interpreter is `$WARREN_PYTHON`, or else the virtualenv `scripts/test.sh` creates at
//! `target/pyenv` under the workspace root. Without either the test fails: it never skips.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The script runs in a few seconds; this only stops a hang from stalling the suite.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// `$WARREN_PYTHON`, or the virtualenv under `target/pyenv`; panics with directions otherwise.
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("WARREN_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(python);
    }
    let venv = workspace_root().join("target/pyenv/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!(
        "no Python with pika for the pika interop test: WARREN_PYTHON is not set and {} does \
         not exist. Run scripts/test.sh (it creates that virtualenv with pika), or set \
         WARREN_PYTHON to a python that can `import pika`.",
        venv.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_blocking_connection_interop() {
    let python = python();
    let script = workspace_root().join("tests/interop/pika_interop.py");
    assert!(script.exists(), "missing {}", script.display());

    let server = warren_tests::start_server();
    let port = server.local_addr().port();
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--port")
        .arg(port.to_string())
        .current_dir(workspace_root())
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(SCRIPT_TIMEOUT, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => panic!(
            "cannot run {} {}: {err}",
            python.display(),
            script.display()
        ),
        Err(_) => panic!(
            "{} did not finish within {SCRIPT_TIMEOUT:?} (killed)",
            script.display()
        ),
    };
    server.shutdown().await;

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pika interop script failed ({}) using {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status,
        python.display(),
    );
    // Visible with --nocapture: which checks ran.
    print!("{stdout}");
}
