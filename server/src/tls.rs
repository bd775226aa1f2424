//! TLS for the agent's listeners (gRPC, and the OpenAI-compatible HTTP API), with
//! rustls: the certificate and key come from files and are read again when they
//! change on disk, so a rotated certificate takes effect for new connections without
//! a restart; optionally every client must present a certificate from a CA bundle
//! (mTLS), and its identity is the certificate's subject common name or a SAN URI.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// How often the certificate files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);
/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the listener's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates must chain to; `None` = no client certificates.
    pub client_ca: Option<PathBuf>,
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Config(format!("TLS: {}: {why}", path.display()))
}

fn read_certified_key(files: &TlsFiles) -> Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad(&files.cert, e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(&files.cert, e))?;
    if certs.is_empty() {
        return Err(bad(&files.cert, "holds no PEM certificate"));
    }
    // Never echo the key file's contents, only its path.
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|_| bad(&files.key, "holds no usable PEM private key"))?;
    let key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad(&files.key, e))?;
    Ok(CertifiedKey::new(certs, key))
}

fn modified(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert)?, m(&files.key)?))
}

/// The current certificate, swapped when the files change.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// A listener's TLS: the acceptor and the task that reloads its certificate.
pub struct Tls {
    acceptor: TlsAcceptor,
}

/// ALPN for gRPC listeners.
pub const GRPC: &[&[u8]] = &[b"h2"];
/// ALPN for the plain HTTP listener (the OpenAI-compatible API).
pub const HTTP1: &[&[u8]] = &[b"http/1.1"];

impl Tls {
    /// Reads the files (a bad file is a start-up error) and starts watching them.
    /// `protocols` is what the listener speaks, offered in ALPN ([`GRPC`], [`HTTP1`]).
    pub fn start(
        files: TlsFiles,
        protocols: &[&[u8]],
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Tls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = Arc::new(Reloading {
            current: RwLock::new(Arc::new(read_certified_key(&files)?)),
        });
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(ca, e))? {
                    roots
                        .add(cert.map_err(|e| bad(ca, e))?)
                        .map_err(|e| bad(ca, e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| bad(ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        let watched = files.clone();
        tokio::spawn(async move {
            let mut seen = modified(&watched);
            loop {
                tokio::select! {
                    () = tokio::time::sleep(RELOAD_CHECK) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                let now = modified(&watched);
                if now == seen {
                    continue;
                }
                let files = watched.clone();
                match tokio::task::spawn_blocking(move || read_certified_key(&files)).await {
                    Ok(Ok(key)) => {
                        *resolver
                            .current
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
                        seen = now;
                        info!(cert = %watched.cert.display(), "TLS certificate reloaded");
                    }
                    // Half-written files during a rotation: keep serving the old pair
                    // and try again at the next check.
                    Ok(Err(e)) => {
                        warn!(error = %e, "TLS certificate not reloaded; keeping the current one")
                    }
                    Err(e) => warn!(error = %e, "TLS reload task failed"),
                }
            }
        });
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Accepts connections on `listener` and hands over those whose handshake
    /// succeeds. Each handshake runs in its own task, so a slow client holds up no one.
    pub fn incoming(
        self,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Small answers must not wait for the peer's delayed ACK.
                let _ = tcp.set_nodelay(true);
                let (acceptor, to_server) = (self.acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = to_server.send(Ok(tls)).await;
                        }
                        // A connection closed before any ClientHello is a TCP
                        // probe (a load balancer's, kubelet's): not worth a line.
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(%peer, "connection closed before a TLS handshake");
                        }
                        Ok(Err(e)) => {
                            info!(%peer, error = %e, "TLS handshake refused");
                        }
                        Err(_) => info!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// The identity a verified client certificate names: its subject common name, else
/// its first URI subject alternative name.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
        _ => None,
    })
}
