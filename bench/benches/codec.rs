//! The codec's hot paths: decoding what a publisher sends (basic.publish + content header +
//! body) and encoding what a consumer receives (basic.deliver + content header + body).
//!
//! `cargo bench -p warren-bench --bench codec`; under `cargo test` each runs once.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use warren_gateway::codec::protocol::basic;
use warren_gateway::codec::{decode_frame, AMQPClass, Encoder, Frame};

const FRAME_MAX: usize = 131_072;
const MESSAGES: usize = 100;
/// Property flags with delivery-mode set, then delivery-mode 2 (persistent).
const PERSISTENT_PROPS: &[u8] = &[0x10, 0x00, 2];

/// `MESSAGES` publishes of `size`-byte bodies, encoded back to back.
fn publishes(size: usize) -> Vec<u8> {
    let mut enc = Encoder::with_capacity(MESSAGES * (size + 64));
    let body = vec![b'x'; size];
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: "bench-queue".into(),
        mandatory: false,
        immediate: false,
    }));
    for _ in 0..MESSAGES {
        enc.method(1, &publish);
        enc.content(1, PERSISTENT_PROPS, &body, FRAME_MAX);
    }
    enc.take().to_vec()
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode publish+header+body");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    for size in [16usize, 1024, 65536] {
        let wire = publishes(size);
        group.bench_function(format!("{size} B"), |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let mut frames = 0;
                    while let Some(frame) = decode_frame(&mut buf, FRAME_MAX).unwrap() {
                        if let Frame::Header(_, h) = &frame {
                            black_box(h.properties.delivery_mode());
                        }
                        black_box(frame);
                        frames += 1;
                    }
                    assert_eq!(frames, 3 * MESSAGES);
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode deliver+content");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    for size in [16usize, 1024, 65536] {
        let body = vec![b'x'; size];
        let mut enc = Encoder::with_capacity(MESSAGES * (size + 96));
        let mut tag = 0u64;
        group.bench_function(format!("{size} B"), |b| {
            b.iter(|| {
                enc.buffer().clear();
                for _ in 0..MESSAGES {
                    tag += 1;
                    enc.deliver(1, "amq.ctag-bench", tag, false, "", "bench-queue");
                    enc.content(1, PERSISTENT_PROPS, black_box(&body), FRAME_MAX);
                }
                black_box(enc.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
