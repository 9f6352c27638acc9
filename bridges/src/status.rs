//! A bridge's link state and last error: what `Backend::health` reports, with a log line for
//! every change (a warning when the link degrades).

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
    /// While `Ready`: why the target accepts no publishes for now although the link is up
    /// (RabbitMQ's connection.blocked). Cleared when the link leaves `Ready`.
    blocked: Option<String>,
}

#[derive(Debug)]
pub(crate) struct LinkStatus {
    /// The bridge kind, for log lines ("kafka", "redis").
    kind: &'static str,
    inner: Mutex<Inner>,
}

impl LinkStatus {
    /// A link that starts `Connecting`: health is degraded until the first connection.
    pub(crate) fn new(kind: &'static str) -> LinkStatus {
        LinkStatus::starting_in(kind, State::Connecting)
    }

    /// A link that starts `Ready`, for a bridge with no connection to set up before its first
    /// call (SQS: every call is its own HTTPS request).
    pub(crate) fn starting_ready(kind: &'static str) -> LinkStatus {
        LinkStatus::starting_in(kind, State::Ready)
    }

    fn starting_in(kind: &'static str, state: State) -> LinkStatus {
        LinkStatus {
            kind,
            inner: Mutex::new(Inner {
                state,
                last_error: None,
                blocked: None,
            }),
        }
    }

    /// Moves to `state` (never out of `Closed`), keeping `error` as the last error if given,
    /// and logs the change.
    pub(crate) fn set(&self, name: &str, target: &str, state: State, error: Option<String>) {
        let mut inner = self.inner.lock();
        let Some(from) = Self::apply(&mut inner, state, error) else {
            return;
        };
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

    /// Moves to `state` as [`LinkStatus::set`] does but logs nothing, for a bridge that words
    /// its own log lines: returns the state it left, `None` when nothing changed.
    pub(crate) fn change(&self, state: State, error: Option<String>) -> Option<State> {
        Self::apply(&mut self.inner.lock(), state, error)
    }

    fn apply(inner: &mut Inner, state: State, error: Option<String>) -> Option<State> {
        if let Some(err) = error {
            inner.last_error = Some(err);
        }
        let from = inner.state;
        if from == State::Closed || from == state {
            return None;
        }
        inner.state = state;
        if state != State::Ready {
            inner.blocked = None;
        }
        Some(from)
    }

    /// The target accepts no publishes for now (`Some(why)`, shown as the health's reason), or
    /// does again (`None`). Only meaningful while `Ready`.
    pub(crate) fn set_blocked(&self, why: Option<String>) {
        self.inner.lock().blocked = why;
    }

    pub(crate) fn state(&self) -> State {
        self.inner.lock().state
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.inner.lock().last_error.clone()
    }

    pub(crate) fn health(&self) -> Health {
        let inner = self.inner.lock();
        match inner.state {
            State::Ready => match &inner.blocked {
                Some(why) => Health::Degraded(why.clone()),
                None => Health::Ready,
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_state_and_keeps_the_last_error() {
        let status = LinkStatus::new("test");
        assert_eq!(status.health(), Health::Degraded("connecting".into()));
        status.set("b", "t", State::Ready, None);
        assert_eq!(status.health(), Health::Ready);
        status.set("b", "t", State::Degraded, Some("refused".into()));
        assert_eq!(status.health(), Health::Degraded("refused".into()));
        status.set("b", "t", State::Connecting, None);
        assert_eq!(status.health(), Health::Degraded("refused".into()));
        status.set("b", "t", State::Closed, None);
        status.set("b", "t", State::Ready, None);
        assert_eq!(status.health(), Health::Closed, "never out of Closed");
    }

    #[test]
    fn change_reports_the_state_left_only_when_it_changed() {
        let status = LinkStatus::starting_ready("test");
        assert_eq!(status.health(), Health::Ready);
        assert_eq!(status.change(State::Ready, None), None);
        assert_eq!(
            status.change(State::Degraded, Some("a".into())),
            Some(State::Ready)
        );
        assert_eq!(status.change(State::Degraded, Some("b".into())), None);
        assert_eq!(status.health(), Health::Degraded("b".into()));
        assert_eq!(status.change(State::Closed, None), Some(State::Degraded));
        assert_eq!(status.change(State::Closed, None), None);
    }

    #[test]
    fn a_block_degrades_a_ready_link_until_lifted_or_the_link_drops() {
        let status = LinkStatus::new("test");
        status.set("b", "t", State::Ready, None);
        status.set_blocked(Some("blocked: low on memory".into()));
        assert_eq!(
            status.health(),
            Health::Degraded("blocked: low on memory".into())
        );
        status.set_blocked(None);
        assert_eq!(status.health(), Health::Ready);
        status.set_blocked(Some("blocked".into()));
        status.set("b", "t", State::Degraded, Some("gone".into()));
        status.set("b", "t", State::Ready, None);
        assert_eq!(status.health(), Health::Ready);
    }
}
