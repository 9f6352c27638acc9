//! SASL PLAIN and AMQPLAIN, checked against the configured default user.

use std::net::IpAddr;

use amq_protocol::types::{AMQPValue, FieldTable};
use warren_config::DefaultUser;

/// Why a login was refused; the text goes into connection.close 403.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    UnknownMechanism(String),
    Malformed(&'static str),
    Refused { mechanism: String },
    LoopbackOnly(String),
}

impl AuthError {
    pub fn reply_text(&self) -> String {
        match self {
            AuthError::UnknownMechanism(m) => format!("unknown authentication mechanism '{m}'"),
            AuthError::Malformed(why) => format!("malformed login response: {why}"),
            AuthError::Refused { mechanism } => format!(
                "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
            ),
            AuthError::LoopbackOnly(user) => {
                format!("User '{user}' can only connect via localhost")
            }
        }
    }
}

/// Credentials taken from a start-ok (or secure-ok) response.
pub fn credentials(mechanism: &str, response: &[u8]) -> Result<(String, String), AuthError> {
    match mechanism {
        "PLAIN" => {
            // [authzid] NUL authcid NUL passwd
            let mut parts = response.splitn(3, |b| *b == 0);
            let _authzid = parts.next();
            let user = parts.next().ok_or(AuthError::Malformed("no user name"))?;
            let pass = parts.next().ok_or(AuthError::Malformed("no password"))?;
            Ok((
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(pass).into_owned(),
            ))
        }
        "AMQPLAIN" => {
            // A field table without its length prefix.
            let mut framed = Vec::with_capacity(response.len() + 4);
            framed.extend_from_slice(&(response.len() as u32).to_be_bytes());
            framed.extend_from_slice(response);
            let (_, table): (_, FieldTable) =
                amq_protocol::types::parsing::parse_field_table(&framed[..])
                    .map_err(|_| AuthError::Malformed("AMQPLAIN response is not a field table"))?;
            let get = |key: &str| match table.inner().get(key) {
                Some(AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
                _ => None,
            };
            let user = get("LOGIN").ok_or(AuthError::Malformed("no LOGIN"))?;
            let pass = get("PASSWORD").ok_or(AuthError::Malformed("no PASSWORD"))?;
            Ok((user, pass))
        }
        other => Err(AuthError::UnknownMechanism(other.to_string())),
    }
}

/// Checks a login against the default user and RabbitMQ's loopback rule.
pub fn authenticate(
    user: &DefaultUser,
    mechanism: &str,
    login: &str,
    password: &str,
    peer: IpAddr,
) -> Result<(), AuthError> {
    if login != user.username || password != user.password {
        return Err(AuthError::Refused {
            mechanism: mechanism.to_string(),
        });
    }
    if user.loopback_only && !is_loopback(peer) {
        return Err(AuthError::LoopbackOnly(login.to_string()));
    }
    Ok(())
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_amqplain() {
        assert_eq!(
            credentials("PLAIN", b"\0guest\0guest").unwrap(),
            ("guest".into(), "guest".into())
        );
        let mut t = FieldTable::default();
        t.insert("LOGIN".into(), AMQPValue::LongString("bob".into()));
        t.insert("PASSWORD".into(), AMQPValue::LongString("pw".into()));
        let (encoded, _) = cookie_factory::gen(
            amq_protocol::types::generation::gen_field_table(&t),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            credentials("AMQPLAIN", &encoded[4..]).unwrap(),
            ("bob".into(), "pw".into())
        );
        assert!(matches!(
            credentials("EXTERNAL", b""),
            Err(AuthError::UnknownMechanism(_))
        ));
        assert!(credentials("PLAIN", b"guest").is_err());
    }

    #[test]
    fn guest_only_from_loopback() {
        let user = DefaultUser::default();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(authenticate(&user, "PLAIN", "guest", "guest", lo).is_ok());
        assert!(authenticate(&user, "PLAIN", "guest", "guest", mapped).is_ok());
        assert_eq!(
            authenticate(&user, "PLAIN", "guest", "guest", remote),
            Err(AuthError::LoopbackOnly("guest".into()))
        );
        assert!(authenticate(&user, "PLAIN", "guest", "nope", lo).is_err());
    }
}
