//! Durability end to end: persistent messages and durable definitions survive a clean restart
//! (in-process) and a SIGKILL of the real `warren` binary, and confirms mean "on disk".

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use warren_config::Settings;
use warren_gateway::{Server, ServerHandle};

const STEP: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

fn start_in_process(dir: &Path) -> ServerHandle {
    let settings = Settings {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        data_dir: Some(dir.to_path_buf()),
        ..Settings::default()
    };
    Server::bind(settings).expect("start warren").spawn()
}

async fn open(addr: SocketAddr) -> (Connection, Channel) {
    let conn = within(Connection::connect(
        &format!("amqp://guest:guest@{addr}/%2f"),
        ConnectionProperties::default(),
    ))
    .await
    .expect("connect");
    let ch = within(conn.create_channel()).await.expect("channel");
    (conn, ch)
}

fn queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(3_600_000));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("dlx".into()),
    );
    args
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_durable_state_and_persistent_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_in_process(dir.path());
    let (conn, ch) = open(server.local_addr()).await;
    ch.exchange_declare(
        "dx".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("durable exchange");
    ch.queue_declare(
        "dq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        queue_args(),
    )
    .await
    .expect("durable queue");
    ch.queue_bind(
        "dq".into(),
        "dx".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    ch.queue_declare(
        "tq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("transient queue");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for i in 0..100u32 {
        let confirm = ch
            .basic_publish(
                "dx".into(),
                "k".into(),
                BasicPublishOptions::default(),
                format!("p{i}").as_bytes(),
                persistent(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }
    // Transient messages in the durable queue and anything in the transient queue die with a
    // restart.
    for i in 0..10u32 {
        ch.basic_publish(
            "dx".into(),
            "k".into(),
            BasicPublishOptions::default(),
            format!("t{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        ch.basic_publish(
            "".into(),
            "tq".into(),
            BasicPublishOptions::default(),
            b"gone",
            persistent(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    // Ten consumed and acknowledged for good; five delivered and left unacknowledged.
    for _ in 0..10 {
        let got = ch
            .basic_get("dq".into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("a message");
        got.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    for _ in 0..5 {
        ch.basic_get("dq".into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("a message");
    }
    // Make sure the acks reached the server before it stops.
    ch.queue_declare(
        "dq".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("sync");
    drop(conn);
    server.shutdown().await;

    let server = start_in_process(dir.path());
    let (_conn, ch) = open(server.local_addr()).await;
    let dq = ch
        .queue_declare(
            "dq".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            queue_args(),
        )
        .await
        .expect("same declaration is equivalent after restart");
    assert_eq!(
        dq.message_count(),
        90,
        "100 persistent - 10 acked; transient ones gone"
    );
    let err = ch
        .queue_declare(
            "dq".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("arguments were restored, so different ones are inequivalent");
    assert!(err.to_string().contains("PRECONDITION"), "{err}");
    let (_conn, ch) = open(server.local_addr()).await;
    let err = ch
        .queue_declare(
            "tq".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("the transient queue is gone");
    assert!(
        err.to_string().contains("NOT_FOUND") || err.to_string().contains("NOT-FOUND"),
        "{err}"
    );
    let (_conn, ch) = open(server.local_addr()).await;
    let mut bodies = Vec::new();
    for _ in 0..90 {
        let got = ch
            .basic_get("dq".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a message");
        assert!(
            got.delivery.redelivered,
            "recovered messages are redelivered"
        );
        assert_eq!(got.delivery.properties.delivery_mode(), &Some(2));
        bodies.push(String::from_utf8(got.delivery.data).expect("utf8"));
    }
    let expected: Vec<String> = (10..100).map(|i| format!("p{i}")).collect();
    assert_eq!(
        bodies, expected,
        "in order, the unacked ones back at their place"
    );
    // The binding came back too.
    ch.basic_publish(
        "dx".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"again",
        persistent(),
    )
    .await
    .expect("publish");
    let got = within(async {
        loop {
            if let Some(m) = ch
                .basic_get("dq".into(), BasicGetOptions { no_ack: true })
                .await
                .expect("get")
            {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(got.delivery.data, b"again");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_durable_queue_pages_to_disk_and_drains_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = Settings {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        data_dir: Some(dir.path().to_path_buf()),
        storage: warren_config::Storage {
            segment_bytes: 64 * 1024,
            queue_memory_messages: 100,
            queue_memory_bytes: 1 << 20,
        },
        ..Settings::default()
    };
    let server = Server::bind(settings.clone()).expect("start").spawn();
    let (_conn, ch) = open(server.local_addr()).await;
    ch.queue_declare(
        "deep".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let total = 5_000u32;
    for i in 0..total {
        // Mixed persistent and transient: both page out, only persistent survive a restart.
        let props = if i % 2 == 0 {
            persistent()
        } else {
            BasicProperties::default()
        };
        ch.basic_publish(
            "".into(),
            "deep".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            props,
        )
        .await
        .expect("publish");
    }
    assert!(
        ch.wait_for_confirms().await.expect("confirms").is_empty(),
        "no nacks"
    );
    let q = ch
        .queue_declare(
            "deep".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("count");
    assert_eq!(q.message_count(), total);
    let segments = std::fs::read_dir(dir.path().join("queues"))
        .expect("queues dir")
        .count();
    assert!(segments >= 1);
    // Drain half through a consumer: order holds across the memory/disk boundary.
    ch.basic_qos(500, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            "deep".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..total / 2 {
        let d = within(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        assert_eq!(d.data, i.to_be_bytes(), "message {i} in order");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    ch.basic_cancel("c".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    ch.close(200, "bye".into()).await.expect("close");
    server.shutdown().await;

    // After a restart the remaining persistent ones (even numbers from total/2) come back.
    let server = Server::bind(settings).expect("restart").spawn();
    let (_conn, ch) = open(server.local_addr()).await;
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("deep".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
    {
        let mut b = [0u8; 4];
        b.copy_from_slice(&m.delivery.data);
        got.push(u32::from_be_bytes(b));
    }
    let expected: Vec<u32> = (total / 2..total).filter(|i| i % 2 == 0).collect();
    assert_eq!(got, expected);
    server.shutdown().await;
}

struct Warren {
    child: Child,
    addr: SocketAddr,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn spawn_binary(dir: &Path, port: u16) -> Warren {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the warren binary");
    Warren { child, addr }
}

async fn connect_when_up(addr: SocketAddr) -> (Connection, Channel) {
    for _ in 0..200 {
        if let Ok(Ok(conn)) = tokio::time::timeout(
            Duration::from_secs(2),
            Connection::connect(
                &format!("amqp://guest:guest@{addr}/%2f"),
                ConnectionProperties::default(),
            ),
        )
        .await
        {
            let ch = within(conn.create_channel()).await.expect("channel");
            return (conn, ch);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("warren did not come up on {addr}");
}

/// A publisher with confirms streams persistent messages with unique ids; the server is killed
/// with SIGKILL mid-stream and restarted; every confirmed id must be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_confirmed_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut warren = spawn_binary(dir.path(), port);
    let (_conn, ch) = connect_when_up(warren.addr).await;
    ch.queue_declare(
        "crash".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    let total = 100_000u64;
    let kill_after = 60_000u64;
    let window = 1_000usize;
    let mut confirmed: HashSet<u64> = HashSet::new();
    let mut in_flight = std::collections::VecDeque::new();
    let mut killed = false;
    let mut sent = 0u64;
    'publish: while sent < total {
        while in_flight.len() < window && sent < total {
            let id = sent;
            match ch
                .basic_publish(
                    "".into(),
                    "crash".into(),
                    BasicPublishOptions::default(),
                    &id.to_be_bytes(),
                    persistent(),
                )
                .await
            {
                Ok(confirm) => in_flight.push_back((id, confirm)),
                Err(_) => break 'publish,
            }
            sent += 1;
            if sent == kill_after && !killed {
                warren.child.kill().expect("SIGKILL");
                killed = true;
            }
        }
        let Some((id, confirm)) = in_flight.pop_front() else {
            break;
        };
        match confirm.await {
            Ok(c) if c.is_ack() => {
                confirmed.insert(id);
            }
            _ => break 'publish,
        }
    }
    // Anything still in flight when the connection died is unconfirmed; drain what resolved.
    while let Some((id, confirm)) = in_flight.pop_front() {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(10), confirm).await {
            if c.is_ack() {
                confirmed.insert(id);
            }
        }
    }
    if !killed {
        warren.child.kill().expect("SIGKILL");
    }
    let _ = warren.child.wait();
    assert!(
        confirmed.len() > 1_000,
        "the publisher got going before the kill: {}",
        confirmed.len()
    );

    let mut warren = spawn_binary(dir.path(), port);
    let (_conn, ch) = connect_when_up(warren.addr).await;
    let mut present: HashSet<u64> = HashSet::new();
    let mut duplicates = 0u64;
    while let Some(m) = ch
        .basic_get("crash".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
    {
        let mut b = [0u8; 8];
        b.copy_from_slice(&m.delivery.data);
        if !present.insert(u64::from_be_bytes(b)) {
            duplicates += 1;
        }
    }
    let lost: Vec<u64> = confirmed
        .iter()
        .filter(|id| !present.contains(id))
        .copied()
        .collect();
    let unconfirmed_lost =
        sent - confirmed.len() as u64 - (present.len() as u64 - confirmed.len() as u64);
    println!(
        "sent {sent}, confirmed {}, recovered {}, duplicates {duplicates}, unconfirmed lost {unconfirmed_lost}",
        confirmed.len(),
        present.len()
    );
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(duplicates, 0);
    warren.child.kill().expect("stop");
    let _ = warren.child.wait();
}

/// A record torn in the middle by a crash is cut at restart; everything before it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_write_at_the_tail_is_cut() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_in_process(dir.path());
    let (conn, ch) = open(server.local_addr()).await;
    ch.queue_declare(
        "torn".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for i in 0..20u32 {
        ch.basic_publish(
            "".into(),
            "torn".into(),
            BasicPublishOptions::default(),
            &[i as u8; 100],
            persistent(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    drop(conn);
    server.shutdown().await;
    // Cut the newest segment in the middle of its last record.
    let qdir = std::fs::read_dir(dir.path().join("queues"))
        .expect("queues")
        .next()
        .expect("one queue")
        .expect("entry")
        .path();
    let mut segs: Vec<_> = std::fs::read_dir(&qdir)
        .expect("segments")
        .map(|e| e.expect("entry").path())
        .collect();
    segs.sort();
    let seg = segs
        .iter()
        .rev()
        .find(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        .expect("a segment with data")
        .clone();
    let len = std::fs::metadata(&seg).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .expect("open");
    f.set_len(len - 50).expect("truncate");
    drop(f);

    let server = start_in_process(dir.path());
    let (_conn, ch) = open(server.local_addr()).await;
    let q = ch
        .queue_declare(
            "torn".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    assert_eq!(
        q.message_count(),
        19,
        "the torn last record is cut, the 19 before it stay"
    );
    for i in 0..19u32 {
        let m = ch
            .basic_get("torn".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("message");
        assert_eq!(m.delivery.data, vec![i as u8; 100]);
    }
    server.shutdown().await;
}
