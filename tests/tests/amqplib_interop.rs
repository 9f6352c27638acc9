//! Interop with Node.js amqplib: tests/interop/amqplib_interop.js against Warren in-process.
//! scripts/test.sh installs amqplib into target/node; without it this test fails, never skips.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqplib_interop() {
    let root = warren_tests::workspace_root();
    let modules = root.join("target/node/node_modules");
    assert!(
        modules.join("amqplib").exists(),
        "amqplib is not installed in {}: run scripts/test.sh, or `npm install --prefix target/node amqplib@0.10`",
        modules.display()
    );
    let server = warren_tests::start_server();
    let run = tokio::process::Command::new("node")
        .arg(root.join("tests/interop/amqplib_interop.js"))
        .arg("--port")
        .arg(server.local_addr().port().to_string())
        .env("NODE_PATH", &modules)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the amqplib script finished in time")
        .expect("node runs (scripts/test.sh installs Node.js if missing)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all amqplib checks passed"),
        "amqplib interop failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    server.shutdown().await;
}
