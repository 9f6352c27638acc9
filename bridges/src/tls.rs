//! TLS for the `mqtt` (`mqtts://`) and `redis` (`rediss://`) bridges: rustls with the aws-lc-rs
//! provider. The server's certificate must chain to the CA certificates of the backend's
//! `ca_file` (PEM), or without one to the system's trust store, and name the URL's host.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Makes aws-lc-rs the process's default rustls provider, unless one is installed already.
/// The redis crate builds its own `ClientConfig` with `ClientConfig::builder()`, which needs a
/// default provider when more than one is compiled into the binary.
pub(crate) fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The contents of the PEM file `path`, checked to hold at least one certificate.
pub(crate) fn read_ca_file(path: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("ca_file `{path}`: {e}"))?;
    let certs = ca_certs(&pem).map_err(|e| format!("ca_file `{path}`: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "ca_file `{path}`: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
        ));
    }
    Ok(pem)
}

/// Every certificate in `pem`.
fn ca_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))
}

/// A rustls client configuration trusting `ca_pem`'s certificates, or without it the system's
/// trust store.
#[cfg(feature = "mqtt")]
pub(crate) fn client_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in ca_certs(pem)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file: unusable CA certificate: {e}"))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::warn!(%error, "reading the system's trust store");
            }
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(
                    "no CA certificate in the system's trust store: set ca_file".to_string()
                );
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_files_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("warren-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = read_ca_file(empty.to_str().unwrap()).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = read_ca_file("/nonexistent/ca.pem").unwrap_err();
        assert!(err.starts_with("ca_file `/nonexistent/ca.pem`: "), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
