//! What the publish paths of the bridges share: the backoff between attempts, and the confirm
//! owed to the publisher of each message with the attempts spent on it so far.

use std::time::Duration;

use warren_backends::store::Guard;
use warren_config::file::RetryConfig;

/// Exponential backoff with jitter: retry `n` (1-based) waits a random time in
/// `[max(initial, d/2), d]` where `d = min(initial * 2^(n-1), max)`.
pub(crate) fn backoff_delay(retry: &RetryConfig, failures: u32) -> Duration {
    let initial = retry.initial_backoff_ms.max(1);
    let max = retry.max_backoff_ms.max(initial);
    let exp = failures.saturating_sub(1).min(40);
    let ceiling = initial.saturating_mul(1u64 << exp).min(max);
    let floor = (ceiling / 2).max(initial).min(ceiling);
    let ms = if floor == ceiling {
        ceiling
    } else {
        rand::Rng::gen_range(&mut rand::thread_rng(), floor..=ceiling)
    };
    Duration::from_millis(ms)
}

/// The confirm a bridge owes the publisher of one message, and the failed attempts spent on
/// it. Released (the publisher's basic.ack) through [`Owed::confirmed`], failed (basic.nack)
/// through [`Owed::fail`]; one dropped without either (a bug, a panic) is failed too, never
/// silently "confirmed" as dropping the bare guard would.
pub(crate) struct Owed {
    guard: Option<Guard>,
    /// Failed attempts so far.
    pub(crate) attempts: u32,
}

impl Owed {
    pub(crate) fn new(guard: Guard) -> Owed {
        Owed {
            guard: Some(guard),
            attempts: 0,
        }
    }

    /// The target has the message.
    pub(crate) fn confirmed(mut self) {
        self.guard.take();
    }

    /// Given up on: the publisher gets basic.nack with `reason`.
    pub(crate) fn fail(mut self, reason: &str) {
        if let Some(guard) = self.guard.take() {
            guard.failed(reason);
        }
    }

    /// Counts one failed attempt; `true` when that spent the budget of `retry.max_attempts`
    /// (0: unlimited) and the message is to be given up on.
    pub(crate) fn spend_attempt(&mut self, retry: &RetryConfig) -> bool {
        self.attempts += 1;
        retry.max_attempts != 0 && self.attempts >= retry.max_attempts
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            guard.failed("the bridge dropped the message without a confirm");
        }
    }
}

/// Charges every message of `batch` one failed attempt: returns those with attempts left, in
/// order, and hands the others to `give_up` (which must fail them).
pub(crate) fn spend_attempts<P: AsMut<Owed>>(
    batch: impl IntoIterator<Item = P>,
    retry: &RetryConfig,
    mut give_up: impl FnMut(P),
) -> Vec<P> {
    let mut kept = Vec::new();
    for mut p in batch {
        if p.as_mut().spend_attempt(retry) {
            give_up(p);
        } else {
            kept.push(p);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Default)]
    struct Probe {
        failed: AtomicUsize,
    }

    impl warren_backends::store::Completion for Probe {
        fn failed(&self, _reason: &str) {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn retry(max_attempts: u32, initial_backoff_ms: u64, max_backoff_ms: u64) -> RetryConfig {
        RetryConfig {
            max_attempts,
            initial_backoff_ms,
            max_backoff_ms,
        }
    }

    #[test]
    fn backoff_grows_with_jitter_within_bounds() {
        let retry = retry(3, 100, 1_000);
        for _ in 0..200 {
            assert_eq!(backoff_delay(&retry, 1), Duration::from_millis(100));
            let d2 = backoff_delay(&retry, 2).as_millis();
            assert!((100..=200).contains(&d2), "{d2}");
            let d4 = backoff_delay(&retry, 4).as_millis();
            assert!((400..=800).contains(&d4), "{d4}");
            let d30 = backoff_delay(&retry, 30).as_millis();
            assert!((500..=1_000).contains(&d30), "{d30}");
            assert!(backoff_delay(&retry, u32::MAX) <= Duration::from_millis(1_000));
        }
    }

    #[test]
    fn odd_backoff_settings_do_not_panic() {
        assert_eq!(backoff_delay(&retry(0, 0, 0), 5), Duration::from_millis(1));
        assert_eq!(
            backoff_delay(&retry(0, 500, 10), 3),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn an_owed_confirm_dropped_without_a_decision_is_failed() {
        let probe = Arc::new(Probe::default());
        drop(Owed::new(probe.clone()));
        assert_eq!(probe.failed.load(Ordering::SeqCst), 1);
        Owed::new(probe.clone()).confirmed();
        assert_eq!(probe.failed.load(Ordering::SeqCst), 1);
        Owed::new(probe.clone()).fail("no");
        assert_eq!(probe.failed.load(Ordering::SeqCst), 2);
    }

    struct Item(Owed);

    impl AsMut<Owed> for Item {
        fn as_mut(&mut self) -> &mut Owed {
            &mut self.0
        }
    }

    #[test]
    fn spending_attempts_gives_up_past_the_budget_and_keeps_order() {
        let probe = Arc::new(Probe::default());
        let mut tired = Owed::new(probe.clone());
        tired.attempts = 2;
        let batch = vec![
            Item(Owed::new(probe.clone())),
            Item(tired),
            Item(Owed::new(probe.clone())),
        ];
        let mut given_up = 0;
        let kept = spend_attempts(batch, &retry(3, 1, 1), |item| {
            given_up += 1;
            item.0.fail("spent");
        });
        assert_eq!(given_up, 1);
        assert_eq!(kept.len(), 2);
        assert!(kept.iter().all(|item| item.0.attempts == 1));
        for item in kept {
            item.0.confirmed();
        }
        assert_eq!(probe.failed.load(Ordering::SeqCst), 1);
        // 0 is an unlimited budget.
        let mut endless = Owed::new(probe);
        assert!((0..1_000).all(|_| !endless.spend_attempt(&retry(0, 1, 1))));
        endless.confirmed();
    }
}
