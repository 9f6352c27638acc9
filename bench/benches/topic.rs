//! Topic routing through `TopicTrie` with 10,000 bindings: exact patterns, `*` and `#`.
//!
//! `cargo bench -p warren-bench --bench topic`; under `cargo test` each runs once.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use warren_backends::engine::TopicTrie;

/// 9,000 three-word patterns, 500 with a `*` in the middle, 500 ending in `#`.
fn trie() -> TopicTrie<u32> {
    let mut trie = TopicTrie::default();
    let mut id = 0u32;
    let mut add = |trie: &mut TopicTrie<u32>, pattern: String| {
        assert!(trie.insert(&pattern, id));
        id += 1;
    };
    for region in 0..10 {
        for service in 0..30 {
            for event in 0..30 {
                add(
                    &mut trie,
                    format!("region{region}.service{service}.event{event}"),
                );
            }
        }
        for event in 0..50 {
            add(&mut trie, format!("region{region}.*.event{event}"));
        }
        for service in 0..50 {
            add(&mut trie, format!("region{region}.service{service}.#"));
        }
    }
    assert_eq!(id, 10_000);
    trie
}

fn matching(c: &mut Criterion) {
    let trie = trie();
    let mut group = c.benchmark_group("topic match, 10k bindings");
    for (name, key, expected) in [
        // exact + `*` + `#`
        ("3 matches", "region3.service7.event12", 3),
        // only `#` (service40 has no exact or `*`-matching event99 pattern)
        ("1 match", "region3.service40.event99", 1),
        ("no match", "orders.eu.created", 0),
        // `#` matches the deeper key too
        ("deep key", "region1.service2.event3.extra.words", 1),
    ] {
        let mut found = 0;
        trie.matches(key, &mut |_| found += 1);
        assert_eq!(found, expected, "{key}");
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut n = 0u32;
                trie.matches(black_box(key), &mut |v| n = n.wrapping_add(*v));
                n
            })
        });
    }
    group.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
