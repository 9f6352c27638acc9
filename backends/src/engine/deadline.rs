//! A point in time in eight bytes, for the per-message expiry a queue keeps next to each of
//! its messages: `Option<Instant>` takes sixteen, and a queue holds millions of them.

use std::num::NonZeroU64;
use std::sync::OnceLock;

use tokio::time::Instant;

/// Nanoseconds after a process-wide origin, plus one so that `Option<Deadline>` needs no tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(NonZeroU64);

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    // Far enough back that deadlines restored from the log (which may lie in the past) still
    // fit; `checked_sub` fails only right after boot, where the origin is now.
    *ORIGIN.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(std::time::Duration::from_secs(365 * 24 * 3600))
            .unwrap_or(now)
    })
}

impl Deadline {
    pub fn at(instant: Instant) -> Deadline {
        let nanos = instant.saturating_duration_since(origin()).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1);
        Deadline(NonZeroU64::MIN.saturating_add(nanos))
    }

    pub fn instant(self) -> Instant {
        origin() + std::time::Duration::from_nanos(self.0.get() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trips_to_the_nanosecond() {
        let now = Instant::now();
        for later in [
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        ] {
            assert_eq!(Deadline::at(now + later).instant(), now + later);
        }
        assert!(Deadline::at(now) < Deadline::at(now + Duration::from_nanos(1)));
    }

    #[test]
    fn fits_an_option_in_eight_bytes() {
        assert_eq!(std::mem::size_of::<Option<Deadline>>(), 8);
    }
}
