//! A bridge's connection state and last error: what `Backend::health` reports, with a log line
//! for every change (a warning when the link degrades).

use parking_lot::Mutex;
use warren_backends::backend::Health;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Connecting,
    Ready,
    /// The target failed; the bridge is backing off and retrying.
    Degraded,
    Closed,
}

#[derive(Debug)]
struct Inner {
    state: State,
    last_error: Option<String>,
}

#[derive(Debug)]
pub(crate) struct LinkStatus {
    /// The bridge kind, for log lines ("kafka", "redis").
    kind: &'static str,
    inner: Mutex<Inner>,
}

impl LinkStatus {
    pub(crate) fn new(kind: &'static str) -> LinkStatus {
        LinkStatus {
            kind,
            inner: Mutex::new(Inner {
                state: State::Connecting,
                last_error: None,
            }),
        }
    }

    /// Moves to `state` (never out of `Closed`), keeping `error` as the last error if given.
    pub(crate) fn set(&self, name: &str, target: &str, state: State, error: Option<String>) {
        let mut inner = self.inner.lock();
        if let Some(err) = error {
            inner.last_error = Some(err);
        }
        let from = inner.state;
        if from == State::Closed || from == state {
            return;
        }
        inner.state = state;
        let kind = self.kind;
        match state {
            State::Degraded => tracing::warn!(
                backend = %name, target = %target, from = ?from, to = ?state,
                error = inner.last_error.as_deref().unwrap_or(""),
                "{kind} bridge state change"
            ),
            _ => tracing::info!(
                backend = %name, target = %target, from = ?from, to = ?state,
                "{kind} bridge state change"
            ),
        }
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.inner.lock().last_error.clone()
    }

    pub(crate) fn health(&self) -> Health {
        let inner = self.inner.lock();
        match inner.state {
            State::Ready => Health::Ready,
            State::Closed => Health::Closed,
            State::Connecting | State::Degraded => Health::Degraded(
                inner
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "connecting".into()),
            ),
        }
    }
}
