//! Topic binding matching through a trie of words, so routing costs the depth of the routing key,
//! not one pattern test per binding.
//!
//! `*` matches exactly one word, `#` zero or more. Words are separated by `.`; empty words are
//! words too (`a..b` has three), as in RabbitMQ.

use std::collections::HashMap;

#[derive(Debug)]
struct Node<T> {
    words: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            words: HashMap::new(),
            star: None,
            hash: None,
            values: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }
}

/// Values of type `T` stored under topic patterns.
#[derive(Debug)]
pub struct TopicTrie<T> {
    root: Node<T>,
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
        }
    }
}

impl<T: PartialEq> TopicTrie<T> {
    /// Adds `value` under `pattern`; a value already there is not added twice.
    pub fn insert(&mut self, pattern: &str, value: T) -> bool {
        let mut node = &mut self.root;
        for word in pattern.split('.') {
            node = match word {
                "*" => node.star.get_or_insert_with(Default::default),
                "#" => node.hash.get_or_insert_with(Default::default),
                w => node.words.entry(w.into()).or_default(),
            };
        }
        if node.values.contains(&value) {
            return false;
        }
        node.values.push(value);
        true
    }

    /// Removes `value` from under `pattern`, pruning emptied branches. Returns whether it was there.
    pub fn remove(&mut self, pattern: &str, value: &T) -> bool {
        let words: Vec<&str> = pattern.split('.').collect();
        remove_at(&mut self.root, &words, value)
    }

    /// Removes every value matching `pred`, wherever it is.
    pub fn remove_where(&mut self, pred: &mut dyn FnMut(&T) -> bool) {
        remove_where_at(&mut self.root, pred);
    }

    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Calls `found` for every value whose pattern matches `routing_key`. A value stored under
    /// several matching patterns is reported once per pattern; callers dedupe.
    pub fn matches<'a>(&'a self, routing_key: &str, found: &mut dyn FnMut(&'a T)) {
        // Every publish to a topic exchange (and every bridged route) comes through here:
        // routing keys of up to `INLINE` words are split on the stack, not into a `Vec`.
        const INLINE: usize = 16;
        let word_count = routing_key.bytes().filter(|&b| b == b'.').count() + 1;
        if word_count <= INLINE {
            let mut words = [""; INLINE];
            for (slot, word) in words.iter_mut().zip(routing_key.split('.')) {
                *slot = word;
            }
            match_at(&self.root, &words[..word_count], found);
        } else {
            let words: Vec<&str> = routing_key.split('.').collect();
            match_at(&self.root, &words, found);
        }
    }
}

fn remove_at<T: PartialEq>(node: &mut Node<T>, words: &[&str], value: &T) -> bool {
    let Some((first, rest)) = words.split_first() else {
        let before = node.values.len();
        node.values.retain(|v| v != value);
        return node.values.len() != before;
    };
    let removed;
    match *first {
        "*" | "#" => {
            let slot = if *first == "*" {
                &mut node.star
            } else {
                &mut node.hash
            };
            let Some(child) = slot.as_deref_mut() else {
                return false;
            };
            removed = remove_at(child, rest, value);
            if child.is_empty() {
                *slot = None;
            }
        }
        w => {
            let Some(child) = node.words.get_mut(w) else {
                return false;
            };
            removed = remove_at(child, rest, value);
            if child.is_empty() {
                node.words.remove(w);
            }
        }
    }
    removed
}

fn remove_where_at<T>(node: &mut Node<T>, pred: &mut dyn FnMut(&T) -> bool) {
    node.values.retain(|v| !pred(v));
    node.words.retain(|_, child| {
        remove_where_at(child, pred);
        !child.is_empty()
    });
    for slot in [&mut node.star, &mut node.hash] {
        if let Some(child) = slot.as_deref_mut() {
            remove_where_at(child, pred);
            if child.is_empty() {
                *slot = None;
            }
        }
    }
}

fn match_at<'a, T>(node: &'a Node<T>, words: &[&str], found: &mut dyn FnMut(&'a T)) {
    if let Some(hash) = node.hash.as_deref() {
        // `#` swallows zero, one, ... or all remaining words.
        for skip in 0..=words.len() {
            match_at(hash, &words[skip..], found);
        }
    }
    let Some((first, rest)) = words.split_first() else {
        node.values.iter().for_each(&mut *found);
        return;
    };
    if let Some(child) = node.words.get(*first) {
        match_at(child, rest, found);
    }
    if let Some(star) = node.star.as_deref() {
        match_at(star, rest, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(trie: &TopicTrie<u32>, key: &str) -> Vec<u32> {
        let mut out = Vec::new();
        trie.matches(key, &mut |v| {
            if !out.contains(v) {
                out.push(*v)
            }
        });
        out.sort();
        out
    }

    #[test]
    fn keys_longer_than_the_inline_split_match_the_same() {
        let long: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
        let key = long.join(".");
        let mut trie = TopicTrie::default();
        trie.insert(&key, 1);
        trie.insert("#.w19", 2);
        trie.insert("w0.*.#", 3);
        trie.insert(&long[..16].join("."), 4);
        assert_eq!(routes(&trie, &key), vec![1, 2, 3]);
        assert_eq!(routes(&trie, &long[..16].join(".")), vec![3, 4]);
        assert_eq!(routes(&trie, &long[..17].join(".")), vec![3]);
    }

    #[test]
    fn rabbitmq_topic_semantics() {
        let cases: &[(&str, &str, bool)] = &[
            ("a.b.c", "a.b.c", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("#", "", true),
            ("#", "anything.at.all", true),
            ("*", "", true),
            ("*", "a.b", false),
            ("#.c", "c", true),
            ("#.c", "a.b.c", true),
            ("#.c", "a.b.d", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.x.y.c", true),
            ("a.#.#.c", "a.c", true),
            ("*.*", "a.b", true),
            ("*.*", "a", false),
            ("a..b", "a..b", true),
            ("a.*.b", "a..b", true),
            ("#.#", "", true),
            ("", "", true),
            ("", "a", false),
        ];
        for (pattern, key, expect) in cases {
            let mut trie = TopicTrie::default();
            trie.insert(pattern, 1u32);
            assert_eq!(
                !routes(&trie, key).is_empty(),
                *expect,
                "pattern {pattern:?} key {key:?}"
            );
        }
    }

    #[test]
    fn remove_prunes_and_keeps_others() {
        let mut trie = TopicTrie::default();
        trie.insert("a.*", 1u32);
        trie.insert("a.#", 2);
        trie.insert("a.b", 3);
        assert_eq!(routes(&trie, "a.b"), vec![1, 2, 3]);
        assert!(trie.remove("a.*", &1));
        assert!(!trie.remove("a.*", &1));
        assert_eq!(routes(&trie, "a.b"), vec![2, 3]);
        trie.remove_where(&mut |v| *v == 2);
        assert_eq!(routes(&trie, "a.b"), vec![3]);
        assert!(trie.remove("a.b", &3));
        assert!(trie.is_empty());
    }

    /// The trie agrees with a naive matcher on generated patterns and keys.
    #[test]
    fn agrees_with_naive_matcher() {
        use proptest::prelude::*;
        fn naive(p: &[&str], k: &[&str]) -> bool {
            match (p.split_first(), k.split_first()) {
                (None, None) => true,
                (Some((&"#", pr)), _) => (0..=k.len()).any(|i| naive(pr, &k[i..])),
                (Some((&"*", pr)), Some((_, kr))) => naive(pr, kr),
                (Some((w, pr)), Some((kw, kr))) => w == kw && naive(pr, kr),
                _ => false,
            }
        }
        let word = prop_oneof![Just("a"), Just("b"), Just("*"), Just("#"), Just("")];
        let key_word = prop_oneof![Just("a"), Just("b"), Just("")];
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(
                &(
                    proptest::collection::vec(word, 1..5),
                    proptest::collection::vec(key_word, 1..5),
                ),
                |(p, k)| {
                    let pattern = p.join(".");
                    let key = k.join(".");
                    let mut trie = TopicTrie::default();
                    trie.insert(&pattern, 0u8);
                    let mut hit = false;
                    trie.matches(&key, &mut |_| hit = true);
                    let p2: Vec<&str> = pattern.split('.').collect();
                    let k2: Vec<&str> = key.split('.').collect();
                    prop_assert_eq!(hit, naive(&p2, &k2), "{} vs {}", pattern, key);
                    Ok(())
                },
            )
            .unwrap();
    }
}
