//! Loading the YAML configuration file: `${VAR}` substitution, parsing, validation, and the
//! routing table `warren check` prints.
//!
//! Every error is one line, `FILE:LINE:COLUMN: message`, with the line and column in the file as
//! written (before substitution). See docs/configuration.md.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::file::{BackendConfig, ConfigFile, RabbitmqBackend, RouteMode, Unmatched};
use crate::Settings;

/// `data_dir` when the file does not set one.
pub const DEFAULT_DATA_DIR: &str = "warren-data";

/// A 1-based line and column (columns count characters, as editors do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// A configuration problem. Displays as one line: `FILE:LINE:COLUMN: message`, or `FILE: message`
/// when no position is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name given to [`parse`] (the path for [`load`]); empty when there is no file.
    pub origin: String,
    pub position: Option<Position>,
    /// One line, without the origin and position.
    pub message: String,
}

impl ConfigError {
    fn new(origin: &str, position: Option<Position>, message: impl Into<String>) -> Self {
        // One line, whatever a library or a substituted value put in the message.
        let message = message.into().replace(['\r', '\n'], " ");
        ConfigError {
            origin: origin.to_string(),
            position,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.origin.is_empty() {
            f.write_str(&self.origin)?;
            if let Some(p) = self.position {
                write!(f, ":{}:{}", p.line, p.column)?;
            }
            f.write_str(": ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads, substitutes (from the process environment), parses and validates the file at `path`.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    load_with_env(path, |name| std::env::var(name).ok())
}

/// [`load`] with the environment given as a function from a variable's name to its value.
pub fn load_with_env(
    path: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<ConfigFile, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&origin, None, format!("cannot read: {e}")))?;
    parse_with_env(&text, &origin, env)
}

/// Substitutes (from the process environment), parses and validates `text`; `origin` names it
/// in errors.
pub fn parse(text: &str, origin: &str) -> Result<ConfigFile, ConfigError> {
    parse_with_env(text, origin, |name| std::env::var(name).ok())
}

/// [`parse`] with the environment given as a function from a variable's name to its value.
pub fn parse_with_env(
    text: &str,
    origin: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<ConfigFile, ConfigError> {
    let source = Source { text, origin };
    let subst = substitute(text, &env).map_err(|(offset, message)| {
        ConfigError::new(origin, Some(source.position(offset)), message)
    })?;
    let cfg: ConfigFile =
        serde_yaml::from_str(&subst.text).map_err(|e| source.yaml_error(&subst, &e))?;
    check(&cfg).map_err(|problem| {
        let position = locate(&subst.text, &problem.path)
            .map(|offset| source.position(subst.to_source(offset)));
        ConfigError::new(origin, position, problem.message)
    })?;
    Ok(cfg)
}

/// The semantic checks [`parse`] makes, for a `ConfigFile` built some other way. Errors name
/// `origin` and the offending key's path, but no line.
pub fn validate(cfg: &ConfigFile, origin: &str) -> Result<(), ConfigError> {
    check(cfg).map_err(|problem| ConfigError::new(origin, None, problem.message))
}

impl ConfigFile {
    /// The runtime settings this file sets; everything it does not set keeps its default.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let listen = self
            .listen
            .iter()
            .enumerate()
            .map(|(i, addr)| parse_listen(i, addr).map_err(|m| ConfigError::new("", None, m)))
            .collect::<Result<Vec<_>, _>>()?;
        let data_dir = self.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR);
        Ok(Settings {
            listen,
            data_dir: Some(PathBuf::from(data_dir)),
            ..Settings::default()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Substitution.

/// The text after substitution, and how its byte offsets map back to the text as written.
struct Substituted {
    text: String,
    /// Ordered by `out`. A literal span maps byte for byte; a replaced one (`${...}`, `$$`) maps
    /// every byte to the `$` that started it.
    spans: Vec<Span>,
}

struct Span {
    out: usize,
    src: usize,
    literal: bool,
}

impl Substituted {
    fn push_literal(&mut self, src: usize, s: &str) {
        if s.is_empty() {
            return;
        }
        let out = self.text.len();
        let contiguous = matches!(self.spans.last(),
            Some(last) if last.literal && last.src + (out - last.out) == src);
        if !contiguous {
            self.spans.push(Span {
                out,
                src,
                literal: true,
            });
        }
        self.text.push_str(s);
    }

    fn push_replaced(&mut self, src: usize, s: &str) {
        self.spans.push(Span {
            out: self.text.len(),
            src,
            literal: false,
        });
        self.text.push_str(s);
    }

    /// The byte offset in the text as written of byte `out` of the substituted text.
    fn to_source(&self, out: usize) -> usize {
        let i = self.spans.partition_point(|s| s.out <= out);
        match i.checked_sub(1).map(|i| &self.spans[i]) {
            None => out,
            Some(span) if span.literal => span.src + (out - span.out),
            Some(span) => span.src,
        }
    }
}

/// Replaces `${NAME}`, `${NAME:-default}` and `$$` everywhere but in whole-line comments.
/// Errors are `(byte offset of the '$', message)`.
fn substitute(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Substituted, (usize, String)> {
    let mut out = Substituted {
        text: String::with_capacity(text.len()),
        spans: Vec::new(),
    };
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('#') {
            out.push_literal(line_start, line);
            line_start += line.len();
            continue;
        }
        let bytes = line.as_bytes();
        let mut literal_from = 0;
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] != b'$' {
                i += 1;
                continue;
            }
            let at = line_start + i;
            match bytes.get(i + 1) {
                Some(b'$') => {
                    out.push_literal(line_start + literal_from, &line[literal_from..i]);
                    out.push_replaced(at, "$");
                    i += 2;
                    literal_from = i;
                }
                Some(b'{') => {
                    out.push_literal(line_start + literal_from, &line[literal_from..i]);
                    let body_start = i + 2;
                    let close = line[body_start..]
                        .find(['}', '\n'])
                        .filter(|&n| bytes[body_start + n] == b'}')
                        .ok_or_else(|| {
                            (
                                at,
                                "unterminated `${`: `}` missing on the same line".to_string(),
                            )
                        })?;
                    let body = &line[body_start..body_start + close];
                    let value = expand(body, env).map_err(|m| (at, m))?;
                    out.push_replaced(at, &value);
                    i = body_start + close + 1;
                    literal_from = i;
                }
                // A lone `$` is itself.
                _ => i += 1,
            }
        }
        out.push_literal(line_start + literal_from, &line[literal_from..]);
        line_start += line.len();
    }
    Ok(out)
}

/// The value of `${body}`.
fn expand(body: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let name_len = body
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(body.len());
    let (name, rest) = body.split_at(name_len);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!(
            "invalid variable name in `${{{body}}}`: expected letters, digits and `_`, not starting with a digit"
        ));
    }
    if rest.is_empty() {
        return env(name).ok_or_else(|| {
            format!(
                "environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)"
            )
        });
    }
    match rest.strip_prefix(":-") {
        Some(default) => Ok(env(name)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_string())),
        None => Err(format!(
            "invalid substitution `${{{body}}}`: expected `${{NAME}}` or `${{NAME:-default}}`"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Positions.

struct Source<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Source<'_> {
    /// The line and column of a byte offset in the text as written.
    fn position(&self, offset: usize) -> Position {
        let offset = floor_char_boundary(self.text, offset.min(self.text.len()));
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |n| n + 1);
        Position {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    /// A serde_yaml error, its positions moved from the substituted text to the text as written.
    fn yaml_error(&self, subst: &Substituted, err: &serde_yaml::Error) -> ConfigError {
        let mut message = err.to_string();
        let mut position = None;
        if let Some(loc) = err.location() {
            let own = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(at) = message.find(&own) {
                message.replace_range(at..at + own.len(), "");
            }
            position = Some(self.position(subst.to_source(loc.index())));
        }
        // libyaml's messages may name a second position ("while parsing a block mapping at
        // line 1 column 1"): move it too.
        let message = self.remap_positions(subst, &message);
        ConfigError::new(self.origin, position, message)
    }

    /// Rewrites each `line L column C` of the substituted text as the same words for the text as
    /// written.
    fn remap_positions(&self, subst: &Substituted, message: &str) -> String {
        const LINE: &str = "line ";
        const COLUMN: &str = " column ";
        let mut out = String::new();
        let mut rest = message;
        while let Some(at) = rest.find(LINE) {
            out.push_str(&rest[..at]);
            let after = &rest[at + LINE.len()..];
            let parsed = split_number(after).and_then(|(line, after)| {
                let after = after.strip_prefix(COLUMN)?;
                let (column, after) = split_number(after)?;
                Some((line, column, after))
            });
            match parsed {
                Some((line, column, after)) => {
                    let offset = offset_of(&subst.text, line, column);
                    let p = self.position(subst.to_source(offset));
                    out.push_str(&format!("line {} column {}", p.line, p.column));
                    rest = after;
                }
                None => {
                    out.push_str(LINE);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}

fn split_number(s: &str) -> Option<(usize, &str)> {
    let len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    Some((s[..len].parse().ok()?, &s[len..]))
}

/// The byte offset of a 1-based line and character column.
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].find('\n') {
            Some(n) => start += n + 1,
            None => return text.len(),
        }
    }
    text[start..]
        .char_indices()
        .nth(column.saturating_sub(1))
        .map_or(text.len(), |(i, _)| start + i)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

fn key(k: &str) -> Step {
    Step::Key(k.to_string())
}

const FOUND: &str = "\u{0}warren-config-located\u{0}";

/// The byte offset in `text` (which parsed) of the node at `path`, or of its deepest ancestor
/// present when the node is not (a key left to its default).
///
/// serde_yaml gives no spans, but it does give the position of the node whose deserialization
/// raised an error: so this walks to the node and raises one there.
fn locate(text: &str, path: &[Step]) -> Option<usize> {
    let err = Locate(path)
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .err()?;
    if !err.to_string().contains(FOUND) {
        return None;
    }
    err.location().map(|l| l.index())
}

struct Locate<'p>(&'p [Step]);

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.0.first() {
            // Every visit_* method left to its default fails, at this node.
            None => d.deserialize_any(self),
            Some(Step::Key(_)) => d.deserialize_map(self),
            Some(Step::Index(_)) => d.deserialize_seq(self),
        }
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(FOUND)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if let Some(Step::Key(wanted)) = self.0.first() {
            while let Some(k) = map.next_key::<serde_yaml::Value>()? {
                if k.as_str() == Some(wanted) {
                    return map.next_value_seed(Locate(&self.0[1..]));
                }
                map.next_value::<IgnoredAny>()?;
            }
        }
        Err(de::Error::custom(FOUND))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some(Step::Index(wanted)) = self.0.first() {
            for _ in 0..*wanted {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Err(de::Error::custom(FOUND));
                }
            }
            seq.next_element_seed(Locate(&self.0[1..]))?;
        }
        Err(de::Error::custom(FOUND))
    }
}

// ---------------------------------------------------------------------------------------------
// Semantic checks.

/// A semantic error: the path of the offending node and the message (which starts with that
/// path, written as `routes[0].backend`).
struct Problem {
    path: Vec<Step>,
    message: String,
}

fn problem(path: Vec<Step>, message: impl fmt::Display) -> Problem {
    let mut written = String::new();
    for step in &path {
        match step {
            Step::Key(k) if written.is_empty() => written.push_str(k),
            Step::Key(k) => {
                written.push('.');
                written.push_str(k);
            }
            Step::Index(i) => written.push_str(&format!("[{i}]")),
        }
    }
    Problem {
        path,
        message: format!("{written}: {message}"),
    }
}

fn check(cfg: &ConfigFile) -> Result<(), Problem> {
    let mut listen = BTreeSet::new();
    for (i, addr) in cfg.listen.iter().enumerate() {
        let path = vec![key("listen"), Step::Index(i)];
        let parsed = parse_listen(i, addr).map_err(|m| Problem {
            path: path.clone(),
            message: m,
        })?;
        if !listen.insert(parsed) {
            return Err(problem(path, format!("`{addr}` is listed twice")));
        }
    }
    if cfg.data_dir.as_deref() == Some("") {
        return Err(problem(
            vec![key("data_dir")],
            "must not be empty (leave it out for the default, `warren-data`)",
        ));
    }

    for (name, backend) in &cfg.backends {
        let at = |k: &[&str]| {
            let mut path = vec![key("backends"), key(name)];
            path.extend(k.iter().map(|k| key(k)));
            path
        };
        if name.is_empty() {
            return Err(problem(at(&[]), "a backend's name must not be empty"));
        }
        match backend {
            BackendConfig::Rabbitmq(b) => check_rabbitmq(b).map_err(|(k, m)| problem(at(&k), m))?,
            BackendConfig::Amqp10(b) => check_amqp10(b).map_err(|(k, m)| problem(at(&k), m))?,
            BackendConfig::Redis(b) => check_redis(b).map_err(|(k, m)| problem(at(&k), m))?,
            BackendConfig::Mqtt(b) => check_mqtt(b).map_err(|(k, m)| problem(at(&k), m))?,
            BackendConfig::Kafka(b) => check_kafka(b).map_err(|(k, m)| problem(at(&k), m))?,
            BackendConfig::Sqs(b) => check_sqs(b).map_err(|(k, m)| problem(at(&k), m))?,
        }
        let retry = backend.retry();
        if retry.initial_backoff_ms > retry.max_backoff_ms {
            return Err(problem(
                at(&["retry", "initial_backoff_ms"]),
                format!(
                    "{} is more than max_backoff_ms ({})",
                    retry.initial_backoff_ms, retry.max_backoff_ms
                ),
            ));
        }
    }

    let backend_exists = |path: Vec<Step>, name: &str| {
        if cfg.backends.contains_key(name) {
            return Ok(());
        }
        let defined: Vec<&str> = cfg.backends.keys().map(String::as_str).collect();
        let defined = if defined.is_empty() {
            "none is defined".to_string()
        } else {
            format!("defined: {}", defined.join(", "))
        };
        Err(problem(
            path,
            format!("no backend named `{name}` ({defined})"),
        ))
    };

    for (i, route) in cfg.routes.iter().enumerate() {
        let at = |k: &str| vec![key("routes"), Step::Index(i), key(k)];
        backend_exists(at("backend"), &route.backend)?;
    }

    let mut names = BTreeSet::new();
    for (i, queue) in cfg.queues.iter().enumerate() {
        let at = |k: &str| vec![key("queues"), Step::Index(i), key(k)];
        if queue.name.is_empty() {
            return Err(problem(at("name"), "a queue's name must not be empty"));
        }
        if queue.name.len() > 255 {
            return Err(problem(
                at("name"),
                "longer than 255 bytes, the most AMQP 0-9-1 allows",
            ));
        }
        if queue.name.starts_with("amq.") {
            return Err(problem(
                at("name"),
                format!(
                    "`{}`: names starting with `amq.` are reserved to the broker",
                    queue.name
                ),
            ));
        }
        if !names.insert(queue.name.as_str()) {
            return Err(problem(
                at("name"),
                format!("queue `{}` is mapped twice", queue.name),
            ));
        }
        backend_exists(at("backend"), &queue.backend)?;
        if queue.source.is_empty() {
            return Err(problem(at("source"), "must not be empty"));
        }
        if queue.prefetch == 0 {
            return Err(problem(at("prefetch"), "must be at least 1"));
        }
    }
    Ok(())
}

/// An amqp10 backend's own checks: exactly one of `url` / `connection_string`, each valid.
fn check_amqp10(b: &crate::file::Amqp10Backend) -> Result<(), (Vec<&'static str>, String)> {
    match (&b.url, &b.connection_string) {
        (Some(_), Some(_)) => {
            return Err((
                vec!["connection_string"],
                "give either `url` or `connection_string`, not both".into(),
            ))
        }
        (None, None) => {
            return Err((
                vec![],
                "needs `url` (amqp://host:port) or `connection_string` (Service Bus)".into(),
            ))
        }
        (Some(url), None) => {
            let parsed =
                url::Url::parse(url).map_err(|e| (vec!["url"], format!("not a valid URL: {e}")))?;
            if !matches!(parsed.scheme(), "amqp" | "amqps") {
                return Err((
                    vec!["url"],
                    format!(
                        "the scheme is `{}`; expected `amqp://` or `amqps://`",
                        parsed.scheme()
                    ),
                ));
            }
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err((
                    vec!["url"],
                    "the URL has no host (expected amqp://user:pass@host:port)".into(),
                ));
            }
        }
        (None, Some(cs)) => {
            crate::servicebus::ConnectionString::parse(cs)
                .map_err(|m| (vec!["connection_string"], m))?;
        }
    }
    if b.max_in_flight == 0 {
        return Err((vec!["max_in_flight"], "must be at least 1".into()));
    }
    if b.max_message_size == Some(0) {
        return Err((vec!["max_message_size"], "must be at least 1".into()));
    }
    if b.token_lifetime_secs == 0 {
        return Err((vec!["token_lifetime_secs"], "must be at least 1".into()));
    }
    match (&b.client_cert_file, &b.client_key_file) {
        (Some(_), None) => {
            return Err((
                vec!["client_cert_file"],
                "needs `client_key_file` too".into(),
            ))
        }
        (None, Some(_)) => {
            return Err((
                vec!["client_key_file"],
                "needs `client_cert_file` too".into(),
            ))
        }
        (Some(_), Some(_)) => {
            let tls = b.url.as_deref().is_some_and(|u| u.starts_with("amqps://"));
            if !tls {
                return Err((
                    vec!["client_cert_file"],
                    "a client certificate (SASL EXTERNAL) needs an `amqps://` url".into(),
                ));
            }
            if b.url
                .as_deref()
                .and_then(|u| url::Url::parse(u).ok())
                .is_some_and(|u| !u.username().is_empty())
            {
                return Err((
                    vec!["client_cert_file"],
                    "give either a client certificate (SASL EXTERNAL) or a user in the url \
                     (SASL PLAIN), not both"
                        .into(),
                ));
            }
        }
        (None, None) => {}
    }
    if b.receive_session.as_deref() == Some("") {
        return Err((
            vec!["receive_session"],
            "must be a session id or `*`".into(),
        ));
    }
    match b.session_idle_timeout_ms {
        Some(0) => {
            return Err((
                vec!["session_idle_timeout_ms"],
                "must be at least 1 (milliseconds without a message before moving to the next \
                 session)"
                    .into(),
            ))
        }
        Some(_) if b.receive_session.as_deref() != Some("*") => {
            return Err((
                vec!["session_idle_timeout_ms"],
                "only applies with `receive_session: \"*\"` (the next available session); a \
                 named session is kept for good"
                    .into(),
            ))
        }
        _ => {}
    }
    for address in b.address_capabilities.keys() {
        if address.is_empty() {
            return Err((
                vec!["address_capabilities"],
                "an address must not be empty (keys are AMQP 1.0 addresses, as in a route's \
                 `destination` or a queue's `source`)"
                    .into(),
            ));
        }
        // Links attach to the address as written: a stray space would never match a route.
        if address.trim() != address {
            return Err((
                vec!["address_capabilities"],
                format!("the address {address:?} starts or ends with whitespace"),
            ));
        }
    }
    if b.idle_timeout_ms != 0
        && !(MIN_IDLE_TIMEOUT_MS..=u64::from(u32::MAX)).contains(&b.idle_timeout_ms)
    {
        return Err((
            vec!["idle_timeout_ms"],
            format!(
                "{} is out of range: 0 (no idle timeout) or {MIN_IDLE_TIMEOUT_MS} to {} \
                 milliseconds (the peer is asked for traffic at half of it)",
                b.idle_timeout_ms,
                u32::MAX
            ),
        ));
    }
    Ok(())
}

/// The shortest connection idle timeout accepted: below a second, a peer's heartbeats every
/// half of it would be mostly noise, and a scheduling hiccup could drop a healthy connection.
const MIN_IDLE_TIMEOUT_MS: u64 = 1_000;

/// A rabbitmq backend's own checks: `(path below the backend, message)`.
fn check_rabbitmq(b: &RabbitmqBackend) -> Result<(), (Vec<&'static str>, String)> {
    check_amqp_url(&b.url).map_err(|m| (vec!["url"], m))?;
    if b.max_in_flight == 0 {
        return Err((vec!["max_in_flight"], "must be at least 1".into()));
    }
    Ok(())
}

/// A `SCHEME://host[:port]` or `SCHEMEs://…` URL with a host.
fn check_plain_url(text: &str, scheme: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a valid URL: {e}"))?;
    if url.scheme() != scheme && url.scheme() != format!("{scheme}s") {
        return Err(format!(
            "the scheme is `{}`; expected `{scheme}://` or `{scheme}s://`",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "the URL has no host (expected {scheme}://host:port)"
        ));
    }
    Ok(())
}

/// A `ca_file` is only for a TLS URL (`tls_scheme://`), and not empty. Whether it reads is
/// checked when the bridge starts.
fn check_ca_file(
    ca_file: Option<&str>,
    url: &str,
    tls_scheme: &str,
) -> Result<(), (Vec<&'static str>, String)> {
    match ca_file {
        None => Ok(()),
        Some("") => Err((vec!["ca_file"], "must not be empty".into())),
        Some(_) if !url.starts_with(&format!("{tls_scheme}://")) => Err((
            vec!["ca_file"],
            format!("only with a `{tls_scheme}://` URL (TLS)"),
        )),
        Some(_) => Ok(()),
    }
}

/// An mqtt backend's own checks: `(path below the backend, message)`.
fn check_mqtt(b: &crate::file::MqttBackend) -> Result<(), (Vec<&'static str>, String)> {
    check_plain_url(&b.url, "mqtt").map_err(|m| (vec!["url"], m))?;
    if b.protocol != "5" && b.protocol != "3.1.1" {
        return Err((
            vec!["protocol"],
            format!("`{}`; expected \"5\" or \"3.1.1\"", b.protocol),
        ));
    }
    if b.envelope && b.protocol != "3.1.1" {
        return Err((
            vec!["envelope"],
            "only with protocol \"3.1.1\" (MQTT 5 carries the properties itself)".into(),
        ));
    }
    check_ca_file(b.ca_file.as_deref(), &b.url, "mqtts")?;
    if b.client_id.is_empty() {
        return Err((
            vec!["client_id"],
            "must not be empty (a fixed id keeps the session)".into(),
        ));
    }
    if b.topic_prefix.contains(['+', '#']) {
        return Err((
            vec!["topic_prefix"],
            "must not contain the wildcards `+` or `#`".into(),
        ));
    }
    if b.password.is_some() && b.username.is_none() {
        return Err((vec!["password"], "a password needs a username".into()));
    }
    if b.keep_alive_secs > u64::from(u16::MAX) {
        return Err((vec!["keep_alive_secs"], "at most 65535".into()));
    }
    Ok(())
}

/// A kafka backend's own checks: `(path below the backend, message)`. Messages never repeat
/// the password.
fn check_kafka(b: &crate::file::KafkaBackend) -> Result<(), (Vec<&'static str>, String)> {
    if b.bootstrap_servers.trim().is_empty() {
        return Err((
            vec!["bootstrap_servers"],
            "must not be empty (host:port[,host:port...])".into(),
        ));
    }
    for server in b.bootstrap_servers.split(',').map(str::trim) {
        let server = server
            .strip_prefix("PLAINTEXT://")
            .or_else(|| server.strip_prefix("SSL://"))
            .or_else(|| server.strip_prefix("SASL_SSL://"))
            .or_else(|| server.strip_prefix("SASL_PLAINTEXT://"))
            .unwrap_or(server);
        let valid = match server.rsplit_once(':') {
            Some((host, port)) => {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
            }
            None => false,
        };
        if !valid {
            return Err((
                vec!["bootstrap_servers"],
                format!("`{server}` is not host:port (e.g. kafka-1.internal:9092)"),
            ));
        }
    }
    for (key, value) in [
        ("client_id", &b.client_id),
        ("group_prefix", &b.group_prefix),
    ] {
        if value.is_empty() {
            return Err((vec![key], "must not be empty".into()));
        }
    }
    const MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];
    match (&b.sasl_mechanism, b.security_protocol.uses_sasl()) {
        (None, true) => {
            return Err((
                vec!["sasl_mechanism"],
                format!(
                    "required with security_protocol `{}`: one of {}",
                    b.security_protocol.as_librdkafka(),
                    MECHANISMS.join(", ")
                ),
            ))
        }
        (Some(_), false) => {
            return Err((
                vec!["sasl_mechanism"],
                "needs security_protocol `sasl_plaintext` or `sasl_ssl`".into(),
            ))
        }
        (Some(m), true) if !MECHANISMS.contains(&m.as_str()) => {
            return Err((
                vec!["sasl_mechanism"],
                format!("`{m}`; expected one of {}", MECHANISMS.join(", ")),
            ))
        }
        _ => {}
    }
    if b.security_protocol.uses_sasl() {
        if b.sasl_username.as_deref().is_none_or(str::is_empty) {
            return Err((vec!["sasl_username"], "required with SASL".into()));
        }
        if b.sasl_password.is_none() {
            return Err((vec!["sasl_password"], "required with SASL".into()));
        }
    } else if b.sasl_username.is_some() {
        return Err((
            vec!["sasl_username"],
            "needs security_protocol `sasl_plaintext` or `sasl_ssl`".into(),
        ));
    } else if b.sasl_password.is_some() {
        return Err((
            vec!["sasl_password"],
            "needs security_protocol `sasl_plaintext` or `sasl_ssl`".into(),
        ));
    }
    if b.ssl_ca_location.as_deref() == Some("") {
        return Err((vec!["ssl_ca_location"], "must not be empty".into()));
    }
    if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&b.compression.as_str()) {
        return Err((
            vec!["compression"],
            format!(
                "`{}`; expected none, gzip, snappy, lz4 or zstd",
                b.compression
            ),
        ));
    }
    if b.linger_ms > 900_000 {
        return Err((vec!["linger_ms"], "at most 900000".into()));
    }
    if b.delivery_timeout_ms == 0 || b.delivery_timeout_ms > i32::MAX as u64 {
        return Err((
            vec!["delivery_timeout_ms"],
            "must be between 1 and 2147483647".into(),
        ));
    }
    if let Some(h) = &b.key_header {
        if h.is_empty() {
            return Err((vec!["key_header"], "must not be empty".into()));
        }
    }
    if !["earliest", "latest"].contains(&b.auto_offset_reset.as_str()) {
        return Err((
            vec!["auto_offset_reset"],
            format!("`{}`; expected earliest or latest", b.auto_offset_reset),
        ));
    }
    // Settings the bridge's correctness rests on are not overridable: auto-commit would commit
    // offsets of messages no client acknowledged.
    for name in b.options.keys() {
        if matches!(
            name.as_str(),
            "enable.auto.commit" | "enable.auto.offset.store" | "group.id" | "bootstrap.servers"
        ) {
            return Err((
                vec!["options"],
                format!("`{name}` is set by the bridge and cannot be overridden"),
            ));
        }
    }
    Ok(())
}

/// An sqs backend's own checks: `(path below the backend, message)`. Messages never repeat a
/// credential.
fn check_sqs(b: &crate::file::SqsBackend) -> Result<(), (Vec<&'static str>, String)> {
    if let Some(endpoint) = &b.endpoint_url {
        let url = url::Url::parse(endpoint)
            .map_err(|e| (vec!["endpoint_url"], format!("not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err((
                vec!["endpoint_url"],
                format!(
                    "the scheme is `{}`; expected `http://` or `https://`",
                    url.scheme()
                ),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err((
                vec!["endpoint_url"],
                "the URL has no host (expected http://host:port)".into(),
            ));
        }
    }
    if b.region.as_deref() == Some("") {
        return Err((
            vec!["region"],
            "must not be empty (leave it out for the standard AWS chain)".into(),
        ));
    }
    match (&b.access_key_id, &b.secret_access_key) {
        (Some(_), None) => {
            return Err((
                vec!["access_key_id"],
                "needs `secret_access_key` too (or leave both out for the standard AWS chain)"
                    .into(),
            ))
        }
        (None, Some(_)) => {
            return Err((
                vec!["secret_access_key"],
                "needs `access_key_id` too (or leave both out for the standard AWS chain)".into(),
            ))
        }
        (Some(id), Some(_)) if id.is_empty() => {
            return Err((vec!["access_key_id"], "must not be empty".into()))
        }
        _ => {}
    }
    if b.session_token.is_some() && b.access_key_id.is_none() {
        return Err((
            vec!["session_token"],
            "only goes with `access_key_id` and `secret_access_key`".into(),
        ));
    }
    if !(1024..=1024 * 1024).contains(&b.max_message_size) {
        return Err((
            vec!["max_message_size"],
            "must be between 1024 and 1048576 (SQS's largest message)".into(),
        ));
    }
    if b.max_batches_in_flight == 0 {
        return Err((vec!["max_batches_in_flight"], "must be at least 1".into()));
    }
    if b.wait_time_secs > 20 {
        return Err((
            vec!["wait_time_secs"],
            "at most 20 (SQS's longest poll)".into(),
        ));
    }
    if !(1..=43_200).contains(&b.visibility_timeout_secs) {
        return Err((
            vec!["visibility_timeout_secs"],
            "must be between 1 and 43200 (12 hours, SQS's limit)".into(),
        ));
    }
    for (key, value) in [
        ("group_id_header", &b.group_id_header),
        ("deduplication_id_header", &b.deduplication_id_header),
    ] {
        if value.is_empty() {
            return Err((vec![key], "must not be empty".into()));
        }
    }
    if let Some(group) = &b.default_group_id {
        if group.is_empty() || group.len() > 128 || !group.chars().all(|c| c.is_ascii_graphic()) {
            return Err((
                vec!["default_group_id"],
                "must be 1 to 128 characters, letters, digits and punctuation (SQS's MessageGroupId)"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// A redis backend's own checks: `(path below the backend, message)`.
fn check_redis(b: &crate::file::RedisBackend) -> Result<(), (Vec<&'static str>, String)> {
    check_plain_url(&b.url, "redis").map_err(|m| (vec!["url"], m))?;
    check_ca_file(b.ca_file.as_deref(), &b.url, "rediss")?;
    if b.maxlen == Some(0) {
        return Err((
            vec!["maxlen"],
            "must be at least 1 (leave it out for no cap)".into(),
        ));
    }
    for (key, value) in [("group", &b.group), ("consumer", &b.consumer)] {
        if value.is_empty() {
            return Err((vec![key], "must not be empty".into()));
        }
    }
    if b.dead_letter_stream.as_deref() == Some("") {
        return Err((vec!["dead_letter_stream"], "must not be empty".into()));
    }
    if b.max_deliveries == 0 {
        return Err((vec!["max_deliveries"], "must be at least 1".into()));
    }
    if b.claim_idle_ms == 0 {
        return Err((vec!["claim_idle_ms"], "must be at least 1".into()));
    }
    Ok(())
}

/// An `amqp://` or `amqps://` URL with a host. Messages never repeat the URL: it may hold a
/// password.
fn check_amqp_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "amqp" | "amqps") {
        return Err(format!(
            "the scheme is `{}`; expected `amqp://` or `amqps://`",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host (expected amqp://user:pass@host:port/vhost)".into());
    }
    if url.path().trim_start_matches('/').contains('/') {
        return Err(
            "the path must be one vhost segment (write `/` inside a vhost name as `%2f`)".into(),
        );
    }
    if url.fragment().is_some() {
        return Err("an AMQP URL has no `#fragment`".into());
    }
    Ok(())
}

fn parse_listen(i: usize, addr: &str) -> Result<SocketAddr, String> {
    addr.parse().map_err(|_| {
        format!(
            "listen[{i}]: `{addr}` is not an IP address and port (e.g. `0.0.0.0:5672` or `[::]:5672`)"
        )
    })
}

// ---------------------------------------------------------------------------------------------
// The routing table.

/// What `warren check --config FILE` prints: the routes in order, the queue mappings, and what
/// happens to unmatched messages. Columns are aligned.
pub fn routing_table(cfg: &ConfigFile) -> String {
    let backend = |name: &str| match cfg.backends.get(name) {
        Some(b) => format!("{name}({})", b.kind()),
        None => format!("{name}(undefined)"),
    };
    let shown = |s: &str| {
        if s.is_empty() {
            "\"\"".to_string()
        } else {
            s.to_string()
        }
    };

    let mut out = String::new();
    out.push_str("Routes (the first match decides):\n");
    if cfg.routes.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows = cfg
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let headers = if r.matcher.headers.is_empty() {
                    "-".to_string()
                } else {
                    r.matcher
                        .headers
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                vec![
                    i.to_string(),
                    shown(&r.matcher.exchange),
                    shown(&r.matcher.routing_key),
                    headers,
                    match r.mode {
                        RouteMode::Forward => "forward",
                        RouteMode::Mirror => "mirror",
                    }
                    .to_string(),
                    backend(&r.backend),
                    shown(&r.destination),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "#",
                "EXCHANGE",
                "ROUTING KEY",
                "HEADERS",
                "MODE",
                "BACKEND",
                "DESTINATION",
            ],
            rows,
        ));
    }

    out.push_str("\nQueue mappings:\n");
    if cfg.queues.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows = cfg
            .queues
            .iter()
            .map(|q| {
                vec![
                    shown(&q.name),
                    backend(&q.backend),
                    shown(&q.source),
                    q.prefetch.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(&["NAME", "BACKEND", "SOURCE", "PREFETCH"], rows));
    }

    out.push_str("\nUnmatched messages: ");
    out.push_str(match cfg.unmatched {
        Unmatched::Embedded => {
            "embedded (routed by the embedded engine's exchanges and bindings)\n"
        }
        Unmatched::Reject => "reject (returned to a mandatory publisher, nacked under confirms)\n",
    });
    out
}

/// Rows under a header, each column as wide as its widest cell, indented by two spaces.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header = header.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::from(" ");
        for (cell, w) in row.iter().zip(&widths) {
            line.push(' ');
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w + 1 - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::file::{QueueMappingConfig, RetryConfig, RouteConfig, RouteMatch};

    /// An environment of fixed variables.
    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<ConfigFile, ConfigError> {
        parse_with_env(text, "warren.yaml", env(vars))
    }

    /// The deploy examples' shape: exchange `demo` routed to `demo`, queue `demo-in` from
    /// `demo-in`, and valid settings.
    fn assert_demo_routes(cfg: &ConfigFile) {
        assert_eq!(cfg.routes[0].destination, "demo");
        assert_eq!(cfg.routes[0].matcher.exchange, "demo");
        assert_eq!(cfg.queues[0].name, "demo-in");
        assert_eq!(cfg.queues[0].source, "demo-in");
        cfg.settings().unwrap();
    }

    /// Each case's keys, in a backend `b` of `kind` (e.g. `type: redis`), fail to load
    /// with an error that contains the expected text, names its line, and repeats no secret.
    fn assert_backend_errors(kind: &str, cases: &[(&str, &str)]) {
        for (keys, expected) in cases {
            let text = format!("backends:\n  b: {{{kind}, {keys}}}\n");
            let err = error(&text, &[]);
            assert!(err.contains(expected), "{keys}: {err}");
            assert!(
                err.starts_with("warren.yaml:"),
                "{keys}: no position in {err}"
            );
            assert!(!err.contains("secret"), "{keys}: {err}");
        }
    }

    /// The one-line error for `text`, which must fail.
    fn error(text: &str, vars: &[(&str, &str)]) -> String {
        match parse_env(text, vars) {
            Ok(cfg) => panic!("parsed: {cfg:?}"),
            Err(e) => {
                let line = e.to_string();
                assert!(!line.contains('\n'), "not one line: {line:?}");
                line
            }
        }
    }

    const FULL: &str = r#"# Every key, most of them away from their defaults.
listen:
  - "0.0.0.0:5672"
  - "[::1]:5673"
data_dir: /var/lib/warren
backends:
  upstream:
    type: rabbitmq
    url: ${UPSTREAM_URL}
    max_in_flight: 500
    retry:
      max_attempts: 0
      initial_backoff_ms: 50
      max_backoff_ms: 5000
  audit:
    url: amqps://audit.example:5671/audit
    type: rabbitmq
routes:
  - match:
      exchange: orders
      routing_key: "orders.*.created"
      headers:
        region: eu
        tier: gold
    backend: upstream
    destination: orders
  - match: {exchange: ""}
    backend: audit
    destination: audit-log
    mode: mirror
queues:
  - name: demo-in
    backend: upstream
    source: demo-in
  - name: audit-in
    backend: audit
    source: audit.q
    prefetch: 10
unmatched: reject
"#;

    #[test]
    fn full_example() {
        let cfg = parse_env(
            FULL,
            &[("UPSTREAM_URL", "amqp://guest:guest@localhost:5672/%2f")],
        )
        .unwrap();
        let upstream = BackendConfig::Rabbitmq(RabbitmqBackend {
            url: "amqp://guest:guest@localhost:5672/%2f".into(),
            max_in_flight: 500,
            retry: RetryConfig {
                max_attempts: 0,
                initial_backoff_ms: 50,
                max_backoff_ms: 5000,
            },
        });
        let audit = BackendConfig::Rabbitmq(RabbitmqBackend {
            url: "amqps://audit.example:5671/audit".into(),
            max_in_flight: 1000,
            retry: RetryConfig::default(),
        });
        let expected = ConfigFile {
            listen: vec!["0.0.0.0:5672".into(), "[::1]:5673".into()],
            data_dir: Some("/var/lib/warren".into()),
            backends: BTreeMap::from([("upstream".into(), upstream), ("audit".into(), audit)]),
            routes: vec![
                RouteConfig {
                    matcher: RouteMatch {
                        exchange: "orders".into(),
                        routing_key: "orders.*.created".into(),
                        headers: BTreeMap::from([
                            ("region".into(), "eu".into()),
                            ("tier".into(), "gold".into()),
                        ]),
                    },
                    backend: "upstream".into(),
                    destination: "orders".into(),
                    mode: RouteMode::Forward,
                },
                RouteConfig {
                    matcher: RouteMatch {
                        exchange: "".into(),
                        routing_key: "#".into(),
                        headers: BTreeMap::new(),
                    },
                    backend: "audit".into(),
                    destination: "audit-log".into(),
                    mode: RouteMode::Mirror,
                },
            ],
            queues: vec![
                QueueMappingConfig {
                    name: "demo-in".into(),
                    backend: "upstream".into(),
                    source: "demo-in".into(),
                    prefetch: 100,
                },
                QueueMappingConfig {
                    name: "audit-in".into(),
                    backend: "audit".into(),
                    source: "audit.q".into(),
                    prefetch: 10,
                },
            ],
            unmatched: Unmatched::Reject,
        };
        assert_eq!(cfg, expected);

        let settings = cfg.settings().unwrap();
        assert_eq!(
            settings.listen,
            vec![
                "0.0.0.0:5672".parse::<SocketAddr>().unwrap(),
                "[::1]:5673".parse().unwrap()
            ]
        );
        assert_eq!(settings.data_dir, Some(PathBuf::from("/var/lib/warren")));

        assert_eq!(
            routing_table(&cfg),
            "\
Routes (the first match decides):
  #  EXCHANGE  ROUTING KEY       HEADERS              MODE     BACKEND             DESTINATION
  0  orders    orders.*.created  region=eu,tier=gold  forward  upstream(rabbitmq)  orders
  1  \"\"        #                 -                    mirror   audit(rabbitmq)     audit-log

Queue mappings:
  NAME      BACKEND             SOURCE   PREFETCH
  demo-in   upstream(rabbitmq)  demo-in  100
  audit-in  audit(rabbitmq)     audit.q  10

Unmatched messages: reject (returned to a mandatory publisher, nacked under confirms)
"
        );
    }

    #[test]
    fn empty_sections() {
        let cfg = parse_env("backends:\nroutes:\nqueues: []\n", &[]).unwrap();
        assert_eq!(cfg, ConfigFile::default());
        assert_eq!(
            error("backends:\n  upstream:\n", &[]),
            "warren.yaml:2:12: backends.upstream: missing field `type`"
        );
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let cfg = parse_env("# nothing yet\n", &[]).unwrap();
        assert_eq!(cfg, ConfigFile::default());
        let settings = cfg.settings().unwrap();
        assert!(settings.listen.is_empty());
        assert_eq!(settings.data_dir, Some(PathBuf::from(DEFAULT_DATA_DIR)));
        assert_eq!(
            routing_table(&cfg),
            "Routes (the first match decides):\n  (none)\n\nQueue mappings:\n  (none)\n\n\
             Unmatched messages: embedded (routed by the embedded engine's exchanges and bindings)\n"
        );
    }

    #[test]
    fn substitution() {
        let vars = [("HOST", "rabbit"), ("EMPTY", ""), ("DIR", "/srv")];
        let text = "data_dir: ${DIR}/${SUB:-warren}\n\
                    listen: [\"${ADDR:-127.0.0.1}:${PORT:-5672}\"]\n";
        let cfg = parse_env(text, &vars).unwrap();
        assert_eq!(cfg.data_dir.as_deref(), Some("/srv/warren"));
        assert_eq!(cfg.listen, vec!["127.0.0.1:5672"]);

        let sub = |text: &str| substitute(text, &env(&vars)).map(|s| s.text);
        assert_eq!(sub("a: ${HOST}").unwrap(), "a: rabbit");
        // A set variable wins over the default; an empty or unset one takes it.
        assert_eq!(sub("a: ${HOST:-x}").unwrap(), "a: rabbit");
        assert_eq!(sub("a: ${EMPTY:-x}").unwrap(), "a: x");
        assert_eq!(sub("a: ${UNSET:-x y:z}").unwrap(), "a: x y:z");
        assert_eq!(sub("a: ${UNSET:-}").unwrap(), "a: ");
        assert_eq!(sub("a: ${EMPTY}").unwrap(), "a: ");
        // `$$` is a `$`, and is not the start of a substitution.
        assert_eq!(sub("a: p$$w0rd").unwrap(), "a: p$w0rd");
        assert_eq!(sub("a: $${HOST}").unwrap(), "a: ${HOST}");
        assert_eq!(sub("a: $$$${HOST}").unwrap(), "a: $${HOST}");
        // A `$` before anything else is itself.
        assert_eq!(sub("a: $HOST $ 5$").unwrap(), "a: $HOST $ 5$");
        // Whole-line comments are left alone; trailing ones are not.
        assert_eq!(sub("  # ${UNSET}\na: 1").unwrap(), "  # ${UNSET}\na: 1");
        assert!(sub("a: 1 # ${UNSET}").is_err());

        let cfg = parse_env("data_dir: \"p$$w\"\n", &[]).unwrap();
        assert_eq!(cfg.data_dir.as_deref(), Some("p$w"));
    }

    #[test]
    fn missing_variable_names_it_with_line_and_column() {
        let text = "backends:\n  upstream:\n    type: rabbitmq\n    url: ${TARGET_URL}\n";
        assert_eq!(
            error(text, &[]),
            "warren.yaml:4:10: environment variable `TARGET_URL` is not set \
             (write `${TARGET_URL:-default}` to give a default)"
        );
        // Columns count characters, after earlier substitutions on the same line.
        assert_eq!(
            error("data_dir: \"é${A}/${B}\"\n", &[("A", "long value")]),
            "warren.yaml:1:18: environment variable `B` is not set \
             (write `${B:-default}` to give a default)"
        );
    }

    #[test]
    fn bad_substitution_syntax() {
        assert_eq!(
            error("data_dir: ${DIR\nlisten: []\n", &[]),
            "warren.yaml:1:11: unterminated `${`: `}` missing on the same line"
        );
        assert_eq!(
            error("\ndata_dir: ${1DIR}\n", &[]),
            "warren.yaml:2:11: invalid variable name in `${1DIR}`: \
             expected letters, digits and `_`, not starting with a digit"
        );
        assert_eq!(
            error("data_dir: ${DIR-x}\n", &[]),
            "warren.yaml:1:11: invalid substitution `${DIR-x}`: \
             expected `${NAME}` or `${NAME:-default}`"
        );
    }

    #[test]
    fn unknown_top_level_key() {
        let text = "listen: []\nbackend:\n  upstream: {}\n";
        assert_eq!(
            error(text, &[]),
            "warren.yaml:2:1: unknown field `backend`, expected one of \
             `listen`, `data_dir`, `backends`, `routes`, `queues`, `unmatched`"
        );
    }

    #[test]
    fn unknown_key_inside_a_backend() {
        // `type` first: the key's own line and column.
        let text =
            "backends:\n  upstream:\n    type: rabbitmq\n    url: amqp://h\n    max_inflight: 5\n";
        assert_eq!(
            error(text, &[]),
            "warren.yaml:5:5: backends.upstream: unknown field `max_inflight`, \
             expected one of `url`, `max_in_flight`, `retry`"
        );
        // Deeper down, and past a substitution that lengthened the line.
        let text = "backends:\n  up: {type: rabbitmq, url: \"${U}\", retry: {max_tries: 3}}\n";
        assert_eq!(
            error(text, &[("U", "amqp://a-rather-long-host-name.example")]),
            "warren.yaml:2:45: backends.up.retry: unknown field `max_tries`, \
             expected one of `max_attempts`, `initial_backoff_ms`, `max_backoff_ms`"
        );
        // `type` after the unknown key: the backend's own position.
        let text = "backends:\n  upstream:\n    url: amqp://h\n    bogus: 1\n    type: rabbitmq\n";
        assert_eq!(
            error(text, &[]),
            "warren.yaml:3:5: backends.upstream: unknown field `bogus`, \
             expected one of `url`, `max_in_flight`, `retry`"
        );
        // `type` twice.
        let text =
            "backends:\n  upstream:\n    type: rabbitmq\n    url: amqp://h\n    type: rabbitmq\n";
        assert_eq!(
            error(text, &[]),
            "warren.yaml:5:5: backends.upstream: duplicate field `type`"
        );
        // No `type`, no `url`.
        assert_eq!(
            error("backends:\n  upstream:\n    url: amqp://h\n", &[]),
            "warren.yaml:3:5: backends.upstream: missing field `type`"
        );
        assert_eq!(
            error("backends:\n  upstream:\n    type: rabbitmq\n", &[]),
            "warren.yaml:3:5: backends.upstream: missing field `url`"
        );
    }

    #[test]
    fn unknown_backend_type() {
        let text = "backends:\n  upstream:\n    type: nats\n    url: amqp://h\n";
        // The list of expected kinds grows with the bridges; check its start and members.
        let err = error(text, &[]);
        assert!(
            err.starts_with(
                "warren.yaml:3:11: backends.upstream.type: unknown variant `nats`, expected "
            ),
            "{err}"
        );
        for kind in ["`rabbitmq`", "`redis`", "`kafka`"] {
            assert!(err.contains(kind), "{err}");
        }
    }

    #[test]
    fn duplicate_backend_name() {
        let text = "backends:\n  a: {type: rabbitmq, url: amqp://h}\n  a: {type: rabbitmq, url: amqp://i}\n";
        assert_eq!(
            error(text, &[]),
            "warren.yaml:3:3: backends: duplicate key `a`"
        );
    }

    const ONE_BACKEND: &str = "backends:\n  upstream:\n    type: rabbitmq\n    url: amqp://h\n";

    #[test]
    fn route_naming_an_undefined_backend() {
        let text = format!(
            "{ONE_BACKEND}routes:\n  - match: {{exchange: a}}\n    backend: upstream\n    destination: a\n\
             \x20 - match: {{exchange: b}}\n    backend: upstreem\n    destination: b\n"
        );
        assert_eq!(
            error(&text, &[]),
            "warren.yaml:10:14: routes[1].backend: no backend named `upstreem` (defined: upstream)"
        );
        let text = "queues:\n  - {name: q, backend: nowhere, source: q}\n";
        assert_eq!(
            error(text, &[]),
            "warren.yaml:2:24: queues[0].backend: no backend named `nowhere` (none is defined)"
        );
    }

    #[test]
    fn bad_url() {
        let with_url = |url: &str| {
            error(
                "backends:\n  upstream:\n    type: rabbitmq\n    url: ${URL}\n",
                &[("URL", url)],
            )
        };
        assert_eq!(
            with_url("localhost:5672"),
            "warren.yaml:4:10: backends.upstream.url: the scheme is `localhost`; \
             expected `amqp://` or `amqps://`"
        );
        assert_eq!(
            with_url("http://guest:secret@h/"),
            "warren.yaml:4:10: backends.upstream.url: the scheme is `http`; \
             expected `amqp://` or `amqps://`"
        );
        assert_eq!(
            with_url("amqp:///vhost"),
            "warren.yaml:4:10: backends.upstream.url: the URL has no host \
             (expected amqp://user:pass@host:port/vhost)"
        );
        assert_eq!(
            with_url("amqp://h:99999/"),
            "warren.yaml:4:10: backends.upstream.url: not a valid URL: invalid port number"
        );
        assert_eq!(
            with_url("not a url"),
            "warren.yaml:4:10: backends.upstream.url: not a valid URL: \
             relative URL without a base"
        );
        assert_eq!(
            with_url("amqp://h/a/b"),
            "warren.yaml:4:10: backends.upstream.url: the path must be one vhost segment \
             (write `/` inside a vhost name as `%2f`)"
        );
        // The password never shows.
        assert!(!with_url("http://guest:secret@h/").contains("secret"));
        for good in ["amqp://h", "amqps://u:p@h:5671/%2f", "amqp://[::1]:5672/v"] {
            let text = format!("backends:\n  b: {{type: rabbitmq, url: \"{good}\"}}\n");
            parse_env(&text, &[]).unwrap();
        }
    }

    #[test]
    fn duplicate_mapping() {
        let text = format!(
            "{ONE_BACKEND}queues:\n  - name: in\n    backend: upstream\n    source: a\n\
             \x20 - name: in\n    backend: upstream\n    source: b\n"
        );
        assert_eq!(
            error(&text, &[]),
            "warren.yaml:9:11: queues[1].name: queue `in` is mapped twice"
        );
    }

    #[test]
    fn other_semantic_errors() {
        let queue = |q: &str| error(&format!("{ONE_BACKEND}queues:\n  - {q}\n"), &[]);
        assert_eq!(
            queue("{name: amq.in, backend: upstream, source: a}"),
            "warren.yaml:6:12: queues[0].name: `amq.in`: names starting with `amq.` \
             are reserved to the broker"
        );
        assert_eq!(
            queue("{name: in, backend: upstream, source: a, prefetch: 0}"),
            "warren.yaml:6:56: queues[0].prefetch: must be at least 1"
        );
        assert_eq!(
            queue("{name: in, backend: upstream, source: a, prefetch: 70000}"),
            "warren.yaml:6:56: queues[0].prefetch: invalid value: integer `70000`, \
             expected u16"
        );
        assert_eq!(
            error("listen:\n  - 0.0.0.0:5672\n  - localhost:5672\n", &[]),
            "warren.yaml:3:5: listen[1]: `localhost:5672` is not an IP address and port \
             (e.g. `0.0.0.0:5672` or `[::]:5672`)"
        );
        let backoff = "backends:\n  b:\n    type: rabbitmq\n    url: amqp://h\n    retry:\n      initial_backoff_ms: 20000\n";
        assert_eq!(
            error(backoff, &[]),
            "warren.yaml:6:27: backends.b.retry.initial_backoff_ms: 20000 is more than \
             max_backoff_ms (10000)"
        );
        assert_eq!(
            error("routes:\n  - match: {exchange: a}\n    backend: b\n    destination: a\n    mode: copy\n", &[]),
            "warren.yaml:5:11: routes[0].mode: unknown variant `copy`, expected `forward` or `mirror`"
        );
        assert_eq!(
            error(
                "routes:\n  - match: {routing_key: a}\n    backend: b\n    destination: a\n",
                &[]
            ),
            "warren.yaml:2:12: routes[0].match: missing field `exchange`"
        );
    }

    #[test]
    fn yaml_syntax_error() {
        // After a substitution that added a line: both positions are the file's.
        let text = "data_dir: ${D}\nbackends:\n  a: {b: c\nqueues: []\n";
        assert_eq!(
            error(text, &[("D", "x\n  y")]),
            "warren.yaml:4:7: did not find expected ',' or '}', \
             while parsing a flow mapping at line 3 column 6"
        );
        assert_eq!(
            error("listen:\n  - a\n   b: c\n", &[]),
            "warren.yaml:3:5: mapping values are not allowed in this context"
        );
        assert_eq!(
            error("listen: a\n\tb: c\n", &[]),
            "warren.yaml:2:1: found a tab character that violates indentation, \
             while scanning a plain scalar at line 1 column 9"
        );
        assert_eq!(
            error("listen: [a]\n---\nlisten: []\n", &[]),
            "warren.yaml: deserializing from YAML containing more than one document \
             is not supported"
        );
    }

    #[test]
    fn positions_map_back_through_multi_line_values() {
        let mut s = substitute("a: ${X}\nb: ${Y} c\n", &env(&[("X", "1\n2"), ("Y", "")])).unwrap();
        assert_eq!(s.text, "a: 1\n2\nb:  c\n");
        let src = Source {
            text: "a: ${X}\nb: ${Y} c\n",
            origin: "f",
        };
        let at = |s: &Substituted, out: usize| src.position(s.to_source(out));
        assert_eq!(at(&s, 3), Position { line: 1, column: 4 });
        assert_eq!(at(&s, 5), Position { line: 1, column: 4 });
        assert_eq!(at(&s, 7), Position { line: 2, column: 1 });
        assert_eq!(at(&s, 11), Position { line: 2, column: 9 });
        s.spans.clear();
        assert_eq!(s.to_source(11), 11);
    }

    #[test]
    fn rabbitmq_upstream_example() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/rabbitmq-upstream.yaml");
        let cfg = load_with_env(
            &path,
            env(&[("WARREN_TARGET_URL", "amqp://guest:guest@rabbit:5672/%2f")]),
        )
        .unwrap();
        assert_eq!(
            cfg.backends["upstream"],
            BackendConfig::Rabbitmq(RabbitmqBackend {
                url: "amqp://guest:guest@rabbit:5672/%2f".into(),
                max_in_flight: 1000,
                retry: RetryConfig::default(),
            })
        );
        assert_eq!(
            cfg.routes,
            vec![RouteConfig {
                matcher: RouteMatch {
                    exchange: "demo".into(),
                    routing_key: "#".into(),
                    headers: BTreeMap::new(),
                },
                backend: "upstream".into(),
                destination: "demo".into(),
                mode: RouteMode::Forward,
            }]
        );
        assert_eq!(
            cfg.queues,
            vec![QueueMappingConfig {
                name: "demo-in".into(),
                backend: "upstream".into(),
                source: "demo-in".into(),
                prefetch: 100,
            }]
        );
        assert_eq!(cfg.unmatched, Unmatched::Embedded);
        cfg.settings().unwrap();

        // Without the variable, the error points at it.
        let err = load_with_env(&path, env(&[])).unwrap_err();
        assert!(
            err.message.contains("`WARREN_TARGET_URL` is not set"),
            "{err}"
        );
        assert!(err.position.is_some(), "{err}");
    }

    #[test]
    fn mqtt_example() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/mqtt.yaml");
        let cfg =
            load_with_env(&path, env(&[("WARREN_TARGET_URL", "mqtt://broker:1883")])).unwrap();
        assert_eq!(
            cfg.backends["broker"],
            BackendConfig::Mqtt(crate::file::MqttBackend {
                url: "mqtt://broker:1883".into(),
                protocol: "5".into(),
                client_id: "warren-gateway".into(),
                topic_prefix: String::new(),
                username: None,
                password: None,
                keep_alive_secs: 30,
                ca_file: None,
                envelope: false,
                retry: RetryConfig::default(),
            })
        );
        assert_demo_routes(&cfg);

        let good = "backends:\n  m: {type: mqtt, url: \"mqtts://h\", client_id: w, protocol: \"3.1.1\", envelope: true, ca_file: ca.pem}\n";
        parse_with_env(good, "t.yaml", |_| None).unwrap();
        assert_backend_errors(
            "type: mqtt",
            &[
                (
                    "url: \"tcp://h\", client_id: w",
                    "expected `mqtt://` or `mqtts://`",
                ),
                (
                    "url: \"mqtt://h\", client_id: w, protocol: \"4\"",
                    "protocol",
                ),
                ("url: \"mqtt://h\"", "missing field `client_id`"),
                (
                    "url: \"mqtt://h\", client_id: w, envelope: true",
                    "envelope: only with protocol \"3.1.1\"",
                ),
                (
                    "url: \"mqtt://h\", client_id: w, ca_file: ca.pem",
                    "ca_file: only with a `mqtts://` URL",
                ),
            ],
        );
    }

    #[test]
    fn redis_streams_example() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/redis-streams.yaml");
        let cfg =
            load_with_env(&path, env(&[("WARREN_TARGET_URL", "redis://cache:6379")])).unwrap();
        assert_eq!(
            cfg.backends["streams"],
            BackendConfig::Redis(crate::file::RedisBackend {
                url: "redis://cache:6379".into(),
                maxlen: None,
                group: "warren".into(),
                consumer: "warren".into(),
                block_ms: 1000,
                dead_letter_stream: None,
                max_deliveries: 10,
                claim_idle_ms: 30_000,
                ca_file: None,
                retry: RetryConfig::default(),
            })
        );
        assert_demo_routes(&cfg);

        let good = "backends:\n  s: {type: redis, url: \"rediss://h:6380\", ca_file: ca.pem}\n";
        parse_with_env(good, "t.yaml", |_| None).unwrap();
        assert_backend_errors(
            "type: redis",
            &[
                ("url: \"http://h\"", "expected `redis://` or `rediss://`"),
                (
                    "url: \"redis://h\", ca_file: ca.pem",
                    "ca_file: only with a `rediss://` URL",
                ),
                (
                    "url: \"redis://h\", max_deliveries: 0",
                    "max_deliveries: must be at least 1",
                ),
            ],
        );
    }

    #[test]
    fn sqs_example() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/sqs.yaml");
        let cfg = load_with_env(
            &path,
            env(&[("WARREN_TARGET_URL", "http://localhost:4566")]),
        )
        .unwrap();
        assert_eq!(
            cfg.backends["queues"],
            BackendConfig::Sqs(crate::file::SqsBackend {
                endpoint_url: Some("http://localhost:4566".into()),
                region: Some("us-east-1".into()),
                access_key_id: None,
                secret_access_key: None,
                session_token: None,
                max_message_size: 262_144,
                max_batches_in_flight: 10,
                wait_time_secs: 20,
                visibility_timeout_secs: 30,
                group_id_header: "x-message-group-id".into(),
                default_group_id: None,
                deduplication_id_header: "x-deduplication-id".into(),
                retry: RetryConfig::default(),
            })
        );
        assert_eq!(cfg.routes[0].destination, "demo");
        assert_eq!(cfg.queues[0].source, "demo-in");
        cfg.settings().unwrap();

        for (bad, expected) in [
            (
                "backends:\n  q: {type: sqs, endpoint_url: \"ftp://h\"}\n",
                "backends.q.endpoint_url: the scheme is `ftp`; expected `http://` or `https://`",
            ),
            (
                "backends:\n  q: {type: sqs, access_key_id: a}\n",
                "backends.q.access_key_id: needs `secret_access_key` too",
            ),
            (
                "backends:\n  q: {type: sqs, session_token: t}\n",
                "backends.q.session_token: only goes with",
            ),
            (
                "backends:\n  q: {type: sqs, wait_time_secs: 21}\n",
                "backends.q.wait_time_secs: at most 20",
            ),
            (
                "backends:\n  q: {type: sqs, visibility_timeout_secs: 0}\n",
                "backends.q.visibility_timeout_secs: must be between 1 and 43200",
            ),
            (
                "backends:\n  q: {type: sqs, max_message_size: 2000000}\n",
                "backends.q.max_message_size: must be between 1024 and 1048576",
            ),
            (
                "backends:\n  q: {type: sqs, default_group_id: \"a b\"}\n",
                "backends.q.default_group_id: must be 1 to 128 characters",
            ),
            (
                "backends:\n  q: {type: sqs, queue_url: x}\n",
                "unknown field `queue_url`",
            ),
        ] {
            let err = error(bad, &[]);
            assert!(err.contains(expected), "{err}");
            assert!(err.starts_with("warren.yaml:2:"), "{err}");
        }
    }

    #[test]
    fn kafka_example_and_checks() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/kafka.yaml");
        let cfg = load_with_env(&path, env(&[("WARREN_TARGET_URL", "kafka-1:9092")])).unwrap();
        let BackendConfig::Kafka(k) = &cfg.backends["kafka"] else {
            panic!("{:?}", cfg.backends["kafka"]);
        };
        assert_eq!(k.bootstrap_servers, "kafka-1:9092");
        assert_eq!(k.group_prefix, "warren.");
        assert_eq!(k.compression, "none");
        assert!(k.idempotence);
        assert_eq!(
            k.security_protocol,
            crate::file::KafkaSecurityProtocol::Plaintext
        );
        assert_eq!(cfg.routes[0].destination, "demo");
        assert_eq!(cfg.queues[0].source, "demo-in");
        cfg.settings().unwrap();

        let event_hubs = "backends:\n  eh:\n    type: kafka\n    bootstrap_servers: ns.servicebus.windows.net:9093\n    security_protocol: sasl_ssl\n    sasl_mechanism: PLAIN\n    sasl_username: $ConnectionString\n    sasl_password: \"Endpoint=sb://ns/;SharedAccessKeyName=k;SharedAccessKey=s\"\n    compression: gzip\n";
        parse_env(event_hubs, &[]).unwrap();

        for (yaml, want) in [
            ("bootstrap_servers: \"\"", "bootstrap_servers: must not be empty"),
            ("bootstrap_servers: kafka", "`kafka` is not host:port"),
            ("bootstrap_servers: \"k:9092\", compression: brotli", "compression: `brotli`"),
            ("bootstrap_servers: \"k:9092\", security_protocol: sasl_ssl", "sasl_mechanism: required"),
            ("bootstrap_servers: \"k:9092\", security_protocol: sasl_ssl, sasl_mechanism: GSSAPI", "sasl_mechanism: `GSSAPI`"),
            ("bootstrap_servers: \"k:9092\", security_protocol: sasl_plaintext, sasl_mechanism: SCRAM-SHA-256, sasl_username: u", "sasl_password: required"),
            ("bootstrap_servers: \"k:9092\", sasl_username: u", "sasl_username: needs security_protocol"),
            ("bootstrap_servers: \"k:9092\", options: {enable.auto.commit: \"true\"}", "cannot be overridden"),
            ("bootstrap_servers: \"k:9092\", auto_offset_reset: none", "auto_offset_reset: `none`"),
            ("bootstrap_servers: \"k:9092\", linger: 5", "unknown field `linger`"),
        ] {
            let text = format!("backends:\n  k: {{type: kafka, {yaml}}}\n");
            let err = error(&text, &[]);
            assert!(err.contains(want), "{yaml}: {err}");
            assert!(err.contains(":2:"), "{yaml}: no line in {err}");
        }
    }

    #[test]
    fn unreadable_file() {
        let err = load_with_env(Path::new("/nonexistent/warren.yaml"), env(&[])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/warren.yaml: cannot read: "),
            "{err}"
        );
    }

    #[test]
    fn validate_without_text() {
        let mut cfg = ConfigFile::default();
        cfg.queues.push(QueueMappingConfig {
            name: "q".into(),
            backend: "b".into(),
            source: "q".into(),
            prefetch: 1,
        });
        assert_eq!(
            validate(&cfg, "built").unwrap_err().to_string(),
            "built: queues[0].backend: no backend named `b` (none is defined)"
        );

        let cfg = ConfigFile {
            listen: vec!["localhost:5672".into()],
            ..ConfigFile::default()
        };
        assert_eq!(
            cfg.settings().unwrap_err().to_string(),
            "listen[0]: `localhost:5672` is not an IP address and port \
             (e.g. `0.0.0.0:5672` or `[::]:5672`)"
        );
    }

    #[test]
    fn amqp10_examples() {
        use crate::file::{Amqp10Backend, Amqp10Target};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let cfg = load_with_env(
            &dir.join("amqp10.yaml"),
            env(&[("WARREN_TARGET_URL", "amqp://guest:guest@artemis:5672")]),
        )
        .unwrap();
        assert_eq!(
            cfg.backends["target"],
            BackendConfig::Amqp10(Amqp10Backend {
                url: Some("amqp://guest:guest@artemis:5672".into()),
                connection_string: None,
                target: Some(Amqp10Target::Generic),
                max_message_size: None,
                max_in_flight: 1000,
                token_lifetime_secs: 3600,
                ca_file: None,
                client_cert_file: None,
                client_key_file: None,
                session_id_header: None,
                receive_session: None,
                session_idle_timeout_ms: None,
                idle_timeout_ms: 60_000,
                address_capabilities: Default::default(),
                retry: RetryConfig::default(),
            })
        );
        assert_eq!(cfg.routes[0].destination, "demo");
        assert_eq!(cfg.queues[0].source, "demo-in");
        cfg.settings().unwrap();
        let cfg = load_with_env(
            &dir.join("amqp10.yaml"),
            env(&[
                ("WARREN_TARGET_URL", "amqp://h:5672"),
                ("WARREN_TARGET_OUT", "/exchange/demo/k"),
                ("WARREN_TARGET_IN", "/amq/queue/demo-in"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.routes[0].destination, "/exchange/demo/k");
        assert_eq!(cfg.queues[0].source, "/amq/queue/demo-in");

        let cs =
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=k=";
        let cfg = load_with_env(
            &dir.join("azure-service-bus.yaml"),
            env(&[("SERVICEBUS_CONNECTION_STRING", cs)]),
        )
        .unwrap();
        let BackendConfig::Amqp10(b) = &cfg.backends["servicebus"] else {
            panic!("{:?}", cfg.backends)
        };
        assert_eq!(b.connection_string.as_deref(), Some(cs));
        assert_eq!(b.effective_target(), Amqp10Target::Servicebus);
        assert_eq!(b.effective_max_message_size(), Some(262_144));
        assert_eq!(b.idle_timeout_ms, 60_000);
        assert_eq!(cfg.routes[0].destination, "demo");
        assert_eq!(cfg.queues[0].source, "demo-in");
        cfg.settings().unwrap();
        let err = load_with_env(&dir.join("azure-service-bus.yaml"), env(&[])).unwrap_err();
        assert!(
            err.message
                .contains("`SERVICEBUS_CONNECTION_STRING` is not set"),
            "{err}"
        );
    }

    #[test]
    fn amqp10_validation() {
        for ok in [
            "url: \"amqps://u:p@h:5671\", target: rabbitmq, max_message_size: 1000",
            "url: \"amqps://h\", ca_file: ca.pem, client_cert_file: c.pem, client_key_file: k.pem, session_id_header: x-session-id, receive_session: \"*\"",
        ] {
            parse_env(&format!("backends:\n  b: {{type: amqp10, {ok}}}\n"), &[]).unwrap();
        }
        let none = "backends:\n  b:\n    type: amqp10\n";
        assert!(
            error(none, &[]).contains("backends.b: needs `url`"),
            "{}",
            error(none, &[])
        );
        assert_backend_errors(
            "type: amqp10",
            &[
                ("url: amqp://h, connection_string: x", "backends.b.connection_string: give either `url` or `connection_string`, not both"),
                ("url: \"http://h\"", "backends.b.url: the scheme is `http`; expected `amqp://`"),
                // The key is never repeated (`assert_backend_errors` checks "secret").
                ("connection_string: \"Endpoint=sb://x/;SharedAccessKey=secret\"", "backends.b.connection_string: missing `SharedAccessKeyName=...`"),
                ("url: \"amqp://h\", target: kafka", "unknown variant `kafka`"),
                ("url: \"amqps://h\", client_cert_file: c.pem", "backends.b.client_cert_file: needs `client_key_file` too"),
                ("url: \"amqp://h\", client_cert_file: c.pem, client_key_file: k.pem", "needs an `amqps://` url"),
                ("url: \"amqps://u:p@h\", client_cert_file: c.pem, client_key_file: k.pem", "not both"),
                ("url: \"amqp://h\", token_lifetime_secs: 0", "backends.b.token_lifetime_secs: must be at least 1"),
                ("url: \"amqp://h\", address_capabilities: {orders: anycast}", "unknown variant `anycast`, expected `queue` or `topic`"),
                ("url: \"amqp://h\", address_capabilities: {orders: Queue}", "unknown variant `Queue`, expected `queue` or `topic`"),
                ("url: \"amqp://h\", address_capabilities: {\"\": queue}", "backends.b.address_capabilities: an address must not be empty"),
                ("url: \"amqp://h\", address_capabilities: {\" orders\": queue}", "backends.b.address_capabilities: the address \" orders\" starts or ends with whitespace"),
                ("url: \"amqp://h\", address_capabilities: {orders: queue, orders: topic}", "duplicate key `orders`"),
                ("url: \"amqp://h\", address_capabilities: [orders]", "invalid type: sequence, expected a map"),
            ],
        );
    }

    #[test]
    fn amqp10_address_capabilities() {
        use crate::file::AddressCapability;
        let text = "backends:\n  b: {type: amqp10, url: \"amqp://h\", address_capabilities: \
                    {orders: queue, events: topic, \"events::audit\": topic}}\n";
        let Some(BackendConfig::Amqp10(b)) = parse_env(text, &[]).unwrap().backends.remove("b")
        else {
            panic!("not an amqp10 backend")
        };
        assert_eq!(b.address_capabilities["orders"], AddressCapability::Queue);
        assert_eq!(b.address_capabilities["events"], AddressCapability::Topic);
        assert_eq!(b.address_capabilities["events::audit"].symbol(), "topic");
        assert_eq!(AddressCapability::Queue.symbol(), "queue");
        let text = "backends:\n  b: {type: amqp10, url: \"amqp://h\"}\n";
        let Some(BackendConfig::Amqp10(b)) = parse_env(text, &[]).unwrap().backends.remove("b")
        else {
            panic!("not an amqp10 backend")
        };
        assert!(b.address_capabilities.is_empty());
    }

    #[test]
    fn amqp10_idle_timeouts() {
        use crate::file::Amqp10Backend;
        let backend = |keys: &str| -> Amqp10Backend {
            let text = format!("backends:\n  b: {{type: amqp10, url: \"amqp://h\"{keys}}}\n");
            match parse_env(&text, &[]).unwrap().backends.remove("b") {
                Some(BackendConfig::Amqp10(b)) => b,
                other => panic!("{other:?}"),
            }
        };
        let defaults = backend("");
        assert_eq!(defaults.idle_timeout_ms, 60_000);
        assert_eq!(defaults.effective_session_idle_timeout_ms(), None);
        assert_eq!(backend(", idle_timeout_ms: 0").idle_timeout_ms, 0);
        assert_eq!(backend(", idle_timeout_ms: 1000").idle_timeout_ms, 1000);
        let any = backend(", receive_session: \"*\"");
        assert_eq!(any.effective_session_idle_timeout_ms(), Some(5_000));
        let any = backend(", receive_session: \"*\", session_idle_timeout_ms: 250");
        assert_eq!(any.effective_session_idle_timeout_ms(), Some(250));
        assert_eq!(
            backend(", receive_session: abc").effective_session_idle_timeout_ms(),
            None
        );

        let cases: &[(&str, &str)] = &[
            (
                ", idle_timeout_ms: 999",
                "backends.b.idle_timeout_ms: 999 is out of range: 0 (no idle \
                 timeout) or 1000 to 4294967295 milliseconds (the peer is asked for traffic at \
                 half of it)",
            ),
            (
                ", idle_timeout_ms: 4294967296",
                "backends.b.idle_timeout_ms: 4294967296 is out of range",
            ),
            (
                ", idle_timeout_ms: -1",
                "backends.b.idle_timeout_ms: invalid type: integer `-1`, expected u64",
            ),
            (
                ", idle_timeout_ms: 1s",
                "invalid type: string \"1s\", expected u64",
            ),
            (
                ", receive_session: \"*\", session_idle_timeout_ms: 0",
                "backends.b.session_idle_timeout_ms: must be at least 1",
            ),
            (
                ", receive_session: abc, session_idle_timeout_ms: 100",
                "backends.b.session_idle_timeout_ms: only applies with \
                 `receive_session: \"*\"`",
            ),
            (
                ", session_idle_timeout_ms: 100",
                "backends.b.session_idle_timeout_ms: only applies with `receive_session: \"*\"`",
            ),
            (
                ", idle_timeout: 1000",
                "unknown field `idle_timeout`, expected one of",
            ),
            (
                ", idle_timeout_secs: 60",
                "unknown field `idle_timeout_secs`",
            ),
            (
                ", session_idle_timeout: 5",
                "unknown field `session_idle_timeout`",
            ),
        ];
        let cases: Vec<(String, &str)> = cases
            .iter()
            .map(|(keys, expected)| (format!("url: \"amqp://h\"{keys}"), *expected))
            .collect();
        let cases: Vec<(&str, &str)> = cases.iter().map(|(k, e)| (k.as_str(), *e)).collect();
        assert_backend_errors("type: amqp10", &cases);
        let e = error(
            "backends:\n  b: {type: amqp10, url: \"amqp://h\", idle_timeout: 1000}\n",
            &[],
        );
        assert!(
            e.contains("`idle_timeout_ms`") && e.contains("`session_idle_timeout_ms`"),
            "the unknown-key error lists the real keys: {e}"
        );
    }
}
