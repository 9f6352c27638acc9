//! Support for Warren's end-to-end tests: a server on an ephemeral loopback port, in-process.

use std::net::SocketAddr;

use warren_config::Settings;
use warren_gateway::{Server, ServerHandle};

/// Starts Warren on 127.0.0.1 with an ephemeral port and default settings.
pub fn start_server() -> ServerHandle {
    start_server_with(Settings::default())
}

/// Starts Warren with `settings`, listening on 127.0.0.1 with an ephemeral port.
pub fn start_server_with(mut settings: Settings) -> ServerHandle {
    settings.listen = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    let server = Server::bind(settings).expect("bind an ephemeral loopback port");
    server.spawn()
}

/// The AMQP URL of a running test server, with the default guest user.
pub fn amqp_url(server: &ServerHandle) -> String {
    format!("amqp://guest:guest@{}/%2f", server.local_addr())
}

/// The workspace root (the directory above this crate).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// The Python for the pika interop scripts: `$WARREN_PYTHON`, or else the virtualenv at
/// `target/pyenv` under the workspace root. Panics with directions when neither exists: the
/// interop tests fail loudly, they never skip.
pub fn interop_python() -> std::path::PathBuf {
    if let Some(python) = std::env::var_os("WARREN_PYTHON").filter(|p| !p.is_empty()) {
        return std::path::PathBuf::from(python);
    }
    let venv = workspace_root().join("target/pyenv/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!(
        "no Python with pika for the pika interop tests: WARREN_PYTHON is not set and {} does \
         not exist. Run scripts/test.sh (it creates that virtualenv with pika), or \
         `python3 -m venv target/pyenv && target/pyenv/bin/pip install pika==1.3.2`, or set \
         WARREN_PYTHON to a python that can `import pika`.",
        venv.display()
    );
}

/// Runs the Python interop script `script` (relative to the workspace root) against `server`
/// with `--host 127.0.0.1 --port N`, killing it after `limit`. Panics unless it exits 0, with
/// its output in the message; returns its stdout.
pub async fn run_interop_script(
    script: &str,
    server: &ServerHandle,
    limit: std::time::Duration,
) -> String {
    run_interop_script_with_args(script, server, &[], limit).await
}

/// [`run_interop_script`] with more arguments after `--host` and `--port`.
pub async fn run_interop_script_with_args(
    script: &str,
    server: &ServerHandle,
    args: &[&str],
    limit: std::time::Duration,
) -> String {
    let python = interop_python();
    let script = workspace_root().join(script);
    assert!(script.exists(), "missing {}", script.display());
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--port")
        .arg(server.local_addr().port().to_string())
        .args(args)
        .current_dir(workspace_root())
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(limit, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => panic!(
            "cannot run {} {}: {err}",
            python.display(),
            script.display()
        ),
        Err(_) => panic!(
            "{} did not finish within {limit:?} (killed)",
            script.display()
        ),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}) using {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        script.display(),
        output.status,
        python.display(),
    );
    stdout
}

/// Starts Warren on an ephemeral loopback port with configured routes and queue mappings.
pub fn start_server_with_plan(plan: warren_gateway::routes::RoutingPlan) -> ServerHandle {
    let settings = Settings {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        ..Settings::default()
    };
    Server::bind_with_plan(settings, plan)
        .expect("bind an ephemeral loopback port")
        .spawn()
}

/// The URL of a real broker the suite started (`var`, set by scripts/test.sh); panics with how
/// to start it (`scripts/<script>.sh`) when unset: such a test fails, it never skips.
pub fn broker_url(var: &str, script: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set: this test needs a real {what}. Run scripts/test.sh, or \
             `scripts/{script}.sh start` and export {var}=$(scripts/{script}.sh url)"
        ),
    }
}

/// The lock on a shared test broker, `target/<dir>/tests.lock`, taken by the bridge tests too:
/// shared while a test uses the broker, exclusive while a test restarts it.
pub fn broker_lock(dir: &str, exclusive: bool) -> std::fs::File {
    let dir = workspace_root().join("target").join(dir);
    std::fs::create_dir_all(&dir).expect("lock dir");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("tests.lock"))
        .expect("lock file");
    if exclusive {
        file.lock().expect("lock");
    } else {
        file.lock_shared().expect("lock");
    }
    file
}
