//! Azure Service Bus connection strings:
//! `Endpoint=sb://NS.servicebus.windows.net/;SharedAccessKeyName=NAME;SharedAccessKey=KEY`
//! with optional `EntityPath=QUEUE` and `UseDevelopmentEmulator=true`.

/// A parsed connection string. Errors never repeat the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The namespace host, e.g. `ns.servicebus.windows.net` (or `localhost` for the emulator).
    pub host: String,
    /// A port given in the endpoint (`sb://localhost:5673`), if any.
    pub port: Option<u16>,
    pub key_name: String,
    pub key: String,
    pub entity_path: Option<String>,
    /// `UseDevelopmentEmulator=true`: plain AMQP (no TLS) to the endpoint host, port 5672 unless
    /// the endpoint names one.
    pub emulator: bool,
}

impl ConnectionString {
    pub fn parse(text: &str) -> Result<ConnectionString, String> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut entity_path = None;
        let mut emulator = false;
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, value)) = part.split_once('=') else {
                return Err(format!(
                    "`{}` is not a `Name=value` pair",
                    part.chars().take(40).collect::<String>()
                ));
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(value.trim().to_string()),
                "sharedaccesskeyname" => key_name = Some(value.trim().to_string()),
                "sharedaccesskey" => key = Some(value.trim().to_string()),
                "entitypath" => entity_path = Some(value.trim().to_string()),
                "usedevelopmentemulator" => {
                    emulator = match value.trim().to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err("UseDevelopmentEmulator must be `true` or `false`".into()),
                    }
                }
                "sharedaccesssignature" => {
                    return Err(
                        "SharedAccessSignature connection strings are not supported; use \
                         SharedAccessKeyName and SharedAccessKey"
                            .into(),
                    )
                }
                other => return Err(format!("unknown connection string key `{other}`")),
            }
        }
        let endpoint =
            endpoint.ok_or("missing `Endpoint=sb://NAMESPACE.servicebus.windows.net/`")?;
        let rest = endpoint
            .strip_prefix("sb://")
            .ok_or_else(|| format!("Endpoint `{endpoint}` must start with `sb://`"))?;
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("Endpoint `{endpoint}` has an invalid port"))?,
                ),
            ),
            None => (authority.to_string(), None),
        };
        if host.is_empty() {
            return Err(format!("Endpoint `{endpoint}` has no host"));
        }
        let key_name = key_name
            .filter(|k| !k.is_empty())
            .ok_or("missing `SharedAccessKeyName=...`")?;
        let key = key
            .filter(|k| !k.is_empty())
            .ok_or("missing `SharedAccessKey=...`")?;
        Ok(ConnectionString {
            host,
            port,
            key_name,
            key,
            entity_path: entity_path.filter(|e| !e.is_empty()),
            emulator,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_azure_and_emulator_strings() {
        let c = ConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=abc=;EntityPath=q1",
        )
        .unwrap();
        assert_eq!(c.host, "ns.servicebus.windows.net");
        assert_eq!(c.port, None);
        assert_eq!(c.key_name, "RootManageSharedAccessKey");
        assert_eq!(c.key, "abc=");
        assert_eq!(c.entity_path.as_deref(), Some("q1"));
        assert!(!c.emulator);
        let e = ConnectionString::parse(
            "Endpoint=sb://localhost:5673;SharedAccessKeyName=k;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
        )
        .unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.emulator),
            ("localhost", Some(5673), true)
        );
    }

    #[test]
    fn errors_are_clear_and_hide_the_key() {
        let err = |t: &str| ConnectionString::parse(t).unwrap_err();
        assert!(err("SharedAccessKeyName=k;SharedAccessKey=s").contains("missing `Endpoint"));
        assert!(
            err("Endpoint=https://x/;SharedAccessKeyName=k;SharedAccessKey=s").contains("sb://")
        );
        assert!(err("Endpoint=sb://x/;SharedAccessKey=secret").contains("SharedAccessKeyName"));
        assert!(err("Endpoint=sb://x/;SharedAccessKeyName=k").contains("SharedAccessKey=..."));
        assert!(
            err("Endpoint=sb://x/;Bogus=1;SharedAccessKeyName=k;SharedAccessKey=s")
                .contains("bogus")
        );
        assert!(err("Endpoint=sb://x/;junk").contains("not a `Name=value`"));
        assert!(!err("Endpoint=sb://x/;SharedAccessKey=secret").contains("secret"));
    }
}
