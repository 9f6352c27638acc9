//! The headers exchange's matching rule, as RabbitMQ implements it.

use amq_protocol::types::{AMQPValue, FieldTable};

use super::value::as_integer;

/// How a headers binding combines its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

impl XMatch {
    /// Reads `x-match` from binding arguments; `None` when it names no known mode.
    pub fn from_arguments(arguments: &FieldTable) -> Option<XMatch> {
        match arguments.inner().get("x-match") {
            None => Some(XMatch::All),
            Some(AMQPValue::LongString(s)) => Self::parse(&String::from_utf8_lossy(s.as_bytes())),
            Some(AMQPValue::ShortString(s)) => Self::parse(s.as_str()),
            Some(_) => None,
        }
    }

    fn parse(s: &str) -> Option<XMatch> {
        match s {
            "all" => Some(XMatch::All),
            "any" => Some(XMatch::Any),
            "all-with-x" => Some(XMatch::AllWithX),
            "any-with-x" => Some(XMatch::AnyWithX),
            _ => None,
        }
    }
}

/// Whether a message with `headers` matches a binding with `arguments`. Arguments whose key
/// starts with `x-` take part only in the `-with-x` modes; a `void` argument matches on the key's
/// presence alone.
pub fn headers_match(mode: XMatch, arguments: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
    let any = matches!(mode, XMatch::Any | XMatch::AnyWithX);
    for (key, expected) in arguments.inner() {
        if key.as_str() == "x-match" || (!with_x && key.as_str().starts_with("x-")) {
            continue;
        }
        let found = headers.and_then(|h| h.inner().get(key));
        let hit = match (expected, found) {
            (_, None) => false,
            (AMQPValue::Void, Some(_)) => true,
            (expected, Some(actual)) => values_equal(expected, actual),
        };
        if any && hit {
            return true;
        }
        if !any && !hit {
            return false;
        }
    }
    // `all` with nothing to compare matches everything; `any` with nothing matches nothing.
    !any
}

/// Header values compare by value across the string encodings clients pick for the same text.
fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (a, b) {
        (AMQPValue::LongString(x), AMQPValue::ShortString(y))
        | (AMQPValue::ShortString(y), AMQPValue::LongString(x)) => {
            x.as_bytes() == y.as_str().as_bytes()
        }
        _ => {
            if let (Some(x), Some(y)) = (as_integer(a), as_integer(b)) {
                return x == y;
            }
            a == b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    #[test]
    fn all_any_and_with_x() {
        let msg = table(&[("a", s("1")), ("b", s("2")), ("x-k", s("v"))]);
        let all = table(&[("x-match", s("all")), ("a", s("1")), ("b", s("2"))]);
        assert!(headers_match(XMatch::All, &all, Some(&msg)));
        let all_miss = table(&[("a", s("1")), ("c", s("3"))]);
        assert!(!headers_match(XMatch::All, &all_miss, Some(&msg)));
        assert!(headers_match(XMatch::Any, &all_miss, Some(&msg)));
        let none = table(&[("c", s("3"))]);
        assert!(!headers_match(XMatch::Any, &none, Some(&msg)));
        let with_x = table(&[("x-k", s("v"))]);
        assert!(headers_match(XMatch::AllWithX, &with_x, Some(&msg)));
        assert!(headers_match(XMatch::AnyWithX, &with_x, Some(&msg)));
        // Plain `all` ignores x- arguments, leaving nothing to compare: matches.
        assert!(headers_match(XMatch::All, &with_x, Some(&msg)));
        assert!(!headers_match(XMatch::Any, &with_x, Some(&msg)));
        let wrong_x = table(&[("x-k", s("other"))]);
        assert!(!headers_match(XMatch::AllWithX, &wrong_x, Some(&msg)));
    }

    #[test]
    fn void_matches_presence_and_integers_compare_by_value() {
        let msg = table(&[("n", AMQPValue::LongLongInt(5)), ("p", s("x"))]);
        let presence = table(&[("p", AMQPValue::Void)]);
        assert!(headers_match(XMatch::All, &presence, Some(&msg)));
        let num = table(&[("n", AMQPValue::LongInt(5))]);
        assert!(headers_match(XMatch::All, &num, Some(&msg)));
        assert!(!headers_match(XMatch::All, &num, None));
        assert!(headers_match(XMatch::All, &FieldTable::default(), None));
        assert_eq!(
            XMatch::from_arguments(&table(&[("x-match", s("bogus"))])),
            None
        );
    }
}
