//! The binary's configuration commands: `warren check` prints the routing table of a good file
//! and one clear `FILE:LINE:COLUMN: message` line for a bad one.

use std::process::Command;

fn check(yaml: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("warren.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.arg("check")
        .arg("--config")
        .arg(&path)
        .env_remove("WARREN_TARGET_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run warren check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "warren.yaml"),
    )
}

const GOOD: &str = "backends:\n  upstream:\n    type: rabbitmq\n    url: ${WARREN_TARGET_URL}\nroutes:\n  - match: { exchange: demo, routing_key: \"#\" }\n    backend: upstream\n    destination: demo\nqueues:\n  - { name: demo-in, backend: upstream, source: demo-in }\n";

#[test]
fn check_prints_the_routing_table() {
    let (code, out, err) = check(
        GOOD,
        &[("WARREN_TARGET_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("demo") && out.contains("upstream(rabbitmq)") && out.contains("demo-in"),
        "{out}"
    );
}

#[test]
fn config_errors_are_one_line_with_line_and_column() {
    let (code, _, err) = check(GOOD, &[]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("warren.yaml:4:10: environment variable `WARREN_TARGET_URL` is not set"),
        "{err}"
    );

    let unknown = GOOD.replace(
        "    destination: demo\n",
        "    destination: demo\n    destinaton: typo\n",
    );
    let (code, _, err) = check(&unknown, &[("WARREN_TARGET_URL", "amqp://h/")]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("warren.yaml:9:5: ") && err.contains("unknown field `destinaton`"),
        "{err}"
    );

    let (code, _, err) = check(GOOD, &[("WARREN_TARGET_URL", "http://not-amqp")]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("warren.yaml:4:10: "), "{err}");
}
