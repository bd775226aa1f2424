//! Who may call what: bearer tokens, three roles, and the one table that says which
//! role each RPC needs, enforced by [`AuthLayer`] in front of every service.
//!
//! - `admin`: everything;
//! - `operator`: everything but changing authentication itself (no RPC does that yet,
//!   so today the same as admin);
//! - `inference`: Generate, Tokenize, Detokenize and the read-only calls (ListModels,
//!   GetModel, CheckCompatibility, GetCapabilities, ListLoaded, GetState, Watch).
//!
//! Health is open to all. With no credentials configured (only allowed on loopback,
//! see `serve`) every caller is an anonymous admin. A token is kept only as the
//! SHA-256 of its text, compared in constant time against every entry, and never
//! logged.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};
use tower::{Layer, Service};

use crate::error::{Error, Result};

/// What a caller may do, from least to most. `device` is apart: a fleet agent's
/// credential, good for the fleet controller's device stream and nothing else (an
/// admin may do that too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Device,
    Inference,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Inference => "inference",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    Needs(Role),
}

/// Which role each RPC needs, by its gRPC path: the agent's table is [`access`], the
/// fleet controller has its own.
pub type Rules = fn(&str) -> Access;

/// THE rule table: the role each RPC needs, by its gRPC path. Anything not named
/// (a new service, a typo) needs admin, so a new RPC is closed until placed here.
pub fn access(path: &str) -> Access {
    match path {
        "/grpc.health.v1.Health/Check" | "/grpc.health.v1.Health/Watch" => Access::Open,
        "/modeld.v1.Generate/Generate"
        | "/modeld.v1.Generate/Tokenize"
        | "/modeld.v1.Generate/Detokenize"
        | "/modeld.v1.ModelRegistry/ListModels"
        | "/modeld.v1.ModelRegistry/GetModel"
        | "/modeld.v1.ModelRegistry/CheckCompatibility"
        | "/modeld.v1.Node/GetCapabilities"
        | "/modeld.v1.Lifecycle/ListLoaded"
        | "/modeld.v1.Lifecycle/GetState"
        | "/modeld.v1.Lifecycle/Watch" => Access::Needs(Role::Inference),
        // Describing the API reveals nothing a reader of the protos lacks, but only
        // to callers the agent knows.
        p if p.starts_with("/grpc.reflection.") => Access::Needs(Role::Inference),
        // Who did what is for admins.
        "/modeld.v1.Node/ListAudit" => Access::Needs(Role::Admin),
        p if p.starts_with("/modeld.v1.") => Access::Needs(Role::Operator),
        _ => Access::Needs(Role::Admin),
    }
}

/// The calls that change the node, which the audit log records.
pub fn changes_state(path: &str) -> bool {
    matches!(
        path,
        "/modeld.v1.ModelRegistry/RegisterModel"
            | "/modeld.v1.ModelRegistry/UpdateModel"
            | "/modeld.v1.ModelRegistry/DeleteModel"
            | "/modeld.v1.ModelRegistry/ImportCatalog"
            | "/modeld.v1.ModelRegistry/ScanModels"
            | "/modeld.v1.Storage/Pull"
            | "/modeld.v1.Storage/PauseTransfer"
            | "/modeld.v1.Storage/ResumeTransfer"
            | "/modeld.v1.Storage/CancelTransfer"
            | "/modeld.v1.Storage/Push"
            | "/modeld.v1.Storage/DeleteStored"
            | "/modeld.v1.Lifecycle/Load"
            | "/modeld.v1.Lifecycle/Unload"
            | "/modeld.v1.Node/Benchmark"
    )
}

/// A client certificate identity that an in-process front end (the OpenAI-compatible
/// listener) verified on its own TLS connection, passed on as a request extension.
/// Only code in the agent can set an extension; a remote caller cannot forge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCertificate(pub String);

/// The caller of one RPC, as handlers see it (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone)]
struct TokenEntry {
    name: String,
    role: Role,
    sha256: [u8; 32],
}

/// The tokens file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenLine>,
    #[serde(default)]
    clients: Vec<ClientLine>,
}

/// A client certificate's identity (subject common name or SAN URI) and its role.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientLine {
    identity: String,
    role: Role,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenLine {
    name: String,
    role: Role,
    /// Hex SHA-256 of the token's text.
    sha256: String,
}

/// The credentials the agent accepts.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    tokens: Vec<TokenEntry>,
    /// Roles of client-certificate identities (mTLS).
    clients: Vec<(String, Role)>,
    /// Clients must present a certificate from the configured CA.
    certificates_required: bool,
}

impl Credentials {
    /// Reads a TOML tokens file:
    ///
    /// ```toml
    /// [[tokens]]
    /// name = "ci"
    /// role = "operator"
    /// sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    /// ```
    pub fn from_file(path: &Path) -> Result<Credentials> {
        let bad = |why: String| Error::Config(format!("tokens file {}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: TokensFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut tokens = Vec::with_capacity(file.tokens.len());
        let mut names = std::collections::HashSet::new();
        for line in file.tokens {
            if line.name.is_empty() || !names.insert(line.name.clone()) {
                return Err(bad(format!(
                    "token names must be unique and non-empty ({:?})",
                    line.name
                )));
            }
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(line.sha256.trim(), &mut sha256).map_err(|_| {
                bad(format!(
                    "token {:?}: sha256 must be 64 hex digits (the SHA-256 of the token, e.g. \
                     `printf %s TOKEN | sha256sum`)",
                    line.name
                ))
            })?;
            tokens.push(TokenEntry {
                name: line.name,
                role: line.role,
                sha256,
            });
        }
        let clients = file
            .clients
            .into_iter()
            .map(|c| (c.identity, c.role))
            .collect();
        Ok(Credentials {
            tokens,
            clients,
            certificates_required: false,
        })
    }

    /// Every connection presents a certificate the TLS layer verified against the
    /// client CA; its identity gets the role `[[clients]]` gives it.
    pub fn require_certificates(mut self) -> Credentials {
        self.certificates_required = true;
        self
    }

    /// No credentials at all: every caller is trusted (loopback only).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && !self.certificates_required
    }

    /// The role a certificate identity has.
    fn client_role(&self, identity: &str) -> Option<Role> {
        self.clients
            .iter()
            .find(|(name, _)| name == identity)
            .map(|(_, role)| *role)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Who `token` belongs to. Every entry is compared, in constant time, so neither
    /// the time taken nor an early exit tells how close a guess came.
    pub fn identify(&self, token: &str) -> Option<Identity> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for entry in &self.tokens {
            if bool::from(entry.sha256.ct_eq(&digest)) {
                found = Some(Identity {
                    name: entry.name.clone(),
                    role: entry.role,
                });
            }
        }
        found
    }
}

/// Why a call was refused, as a status with ErrorInfo.
fn refusal(code: Code, reason: &str, message: String, meta: &[(&str, &str)]) -> Status {
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, super::status::DOMAIN, meta),
    )
}

/// Decides one call: the identity it runs as, or the status that refuses it.
pub fn authorize(
    credentials: &Credentials,
    rules: Rules,
    path: &str,
    authorization: Option<&str>,
    certificate: Option<&str>,
) -> std::result::Result<Option<Identity>, Status> {
    let needed = match rules(path) {
        Access::Open => return Ok(None),
        Access::Needs(role) => role,
    };
    if credentials.is_empty() {
        return Ok(Some(Identity {
            name: "anonymous".into(),
            role: Role::Admin,
        }));
    }
    let token = authorization.and_then(|v| v.strip_prefix("Bearer "));
    let identity = match (token, certificate) {
        // A token names the caller more precisely than a shared device certificate.
        (Some(token), _) => credentials.identify(token.trim()),
        (None, Some(subject)) => match credentials.client_role(subject) {
            Some(role) => Some(Identity {
                name: subject.to_owned(),
                role,
            }),
            None => {
                return Err(refusal(
                    Code::PermissionDenied,
                    "ROLE_REQUIRED",
                    format!(
                        "the client certificate {subject:?} has no role here: give it one \
                         in the tokens file's [[clients]]"
                    ),
                    &[("required_role", needed.as_str()), ("identity", subject)],
                ));
            }
        },
        (None, None) => {
            return Err(refusal(
                Code::Unauthenticated,
                "CREDENTIALS_MISSING",
                "this agent needs a token: send `authorization: Bearer TOKEN` (modelctl \
                 --token, or MODELD_TOKEN)"
                    .into(),
                &[],
            ));
        }
    };
    let Some(identity) = identity else {
        return Err(refusal(
            Code::Unauthenticated,
            "CREDENTIALS_INVALID",
            "the token is not one this agent knows".into(),
            &[],
        ));
    };
    // The device role is apart from the others: only it (or an admin) may take a
    // device's place, and it may do nothing else.
    let allowed = match needed {
        Role::Device => matches!(identity.role, Role::Device | Role::Admin),
        _ => identity.role >= needed,
    };
    if !allowed {
        return Err(refusal(
            Code::PermissionDenied,
            "ROLE_REQUIRED",
            format!(
                "{path} needs the {} role; {:?} has {}",
                needed.as_str(),
                identity.name,
                identity.role.as_str()
            ),
            &[
                ("required_role", needed.as_str()),
                ("identity", &identity.name),
            ],
        ));
    }
    Ok(Some(identity))
}

/// The credentials in force, swapped whole when the tokens file changes.
#[derive(Debug, Clone, Default)]
pub struct SharedCredentials(Arc<std::sync::RwLock<Arc<Credentials>>>);

impl SharedCredentials {
    pub fn new(credentials: Credentials) -> SharedCredentials {
        SharedCredentials(Arc::new(std::sync::RwLock::new(Arc::new(credentials))))
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, credentials: Credentials) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(credentials);
    }

    /// Reads `path` again whenever it changes (checked every `every`), so tokens are
    /// added and revoked without a restart. A file that does not parse is reported
    /// and the credentials in force stay.
    pub fn watch(
        &self,
        path: std::path::PathBuf,
        every: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let shared = self.clone();
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        tokio::spawn(async move {
            let mut seen = modified(&path);
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                let now = modified(&path);
                if now == seen {
                    continue;
                }
                let file = path.clone();
                match tokio::task::spawn_blocking(move || Credentials::from_file(&file)).await {
                    Ok(Ok(mut fresh)) => {
                        fresh.certificates_required = shared.current().certificates_required;
                        seen = now;
                        // An emptied file would let every caller in as admin.
                        if fresh.is_empty() && !shared.current().is_empty() {
                            tracing::warn!(
                                "the tokens file now holds no credentials; keeping the ones in \
                                 force (restart the agent to serve without credentials)"
                            );
                            continue;
                        }
                        tracing::info!(tokens = fresh.len(), "tokens file reloaded");
                        shared.replace(fresh);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "tokens file not reloaded; the tokens in force stay");
                    }
                    Err(e) => tracing::warn!(error = %e, "tokens reload task failed"),
                }
            }
        });
    }
}

/// Checks every RPC against a rule table ([`access`] on the agent) before any service
/// sees it.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    credentials: SharedCredentials,
    rules: Rules,
}

impl AuthLayer {
    pub fn new(credentials: SharedCredentials) -> AuthLayer {
        AuthLayer::with_rules(credentials, access)
    }

    pub fn with_rules(credentials: SharedCredentials, rules: Rules) -> AuthLayer {
        AuthLayer { credentials, rules }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = WithAuth<S>;

    fn layer(&self, inner: S) -> WithAuth<S> {
        WithAuth {
            inner,
            credentials: self.credentials.clone(),
            rules: self.rules,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WithAuth<S> {
    inner: S,
    credentials: SharedCredentials,
    rules: Rules,
}

impl<S, B, R> Service<http::Request<B>> for WithAuth<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, std::result::Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        // Present only when the TLS layer verified the client's certificate.
        let certificate = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|chain| {
                chain
                    .first()
                    .and_then(|leaf| crate::tls::certificate_identity(leaf))
            })
            .or_else(|| {
                request
                    .extensions()
                    .get::<VerifiedCertificate>()
                    .map(|c| c.0.clone())
            });
        match authorize(
            &self.credentials.current(),
            self.rules,
            request.uri().path(),
            authorization,
            certificate.as_deref(),
        ) {
            Ok(identity) => {
                if let Some(identity) = &identity {
                    // The credential's name, never the credential: traces and logs
                    // of this RPC say who called.
                    tracing::Span::current().record("enduser.id", identity.name.as_str());
                    request.extensions_mut().insert(identity.clone());
                }
                let response = self.inner.call(request);
                Box::pin(async move {
                    let mut response = response.await?;
                    // For the audit layer outside this one.
                    if let Some(identity) = identity {
                        response.extensions_mut().insert(identity);
                    }
                    Ok(response)
                })
            }
            Err(status) => {
                tracing::warn!(
                    method = request.uri().path(),
                    code = ?status.code(),
                    reason = status.get_error_details().error_info().map(|i| i.reason.as_str()).unwrap_or(""),
                    "call refused"
                );
                let response = status.into_http::<R>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        let entry = |name: &str, role, token: &str| TokenEntry {
            name: name.into(),
            role,
            sha256: Sha256::digest(token.as_bytes()).into(),
        };
        Credentials {
            tokens: vec![
                entry("app", Role::Inference, "inference-token"),
                entry("ci", Role::Operator, "operator-token"),
                entry("root", Role::Admin, "admin-token"),
            ],
            clients: vec![("fleet-controller".into(), Role::Operator)],
            certificates_required: false,
        }
    }

    #[test]
    fn the_table_gives_each_rpc_its_role() {
        use Access::{Needs, Open};
        use Role::{Admin, Inference, Operator};
        for (path, want) in [
            ("/grpc.health.v1.Health/Check", Open),
            ("/modeld.v1.Generate/Generate", Needs(Inference)),
            ("/modeld.v1.Generate/Tokenize", Needs(Inference)),
            ("/modeld.v1.ModelRegistry/ListModels", Needs(Inference)),
            ("/modeld.v1.Lifecycle/Watch", Needs(Inference)),
            ("/modeld.v1.Node/GetCapabilities", Needs(Inference)),
            ("/modeld.v1.ModelRegistry/RegisterModel", Needs(Operator)),
            ("/modeld.v1.Storage/ReadBlob", Needs(Operator)),
            ("/modeld.v1.Storage/Push", Needs(Operator)),
            ("/modeld.v1.Lifecycle/Load", Needs(Operator)),
            ("/modeld.v1.Node/Benchmark", Needs(Operator)),
            ("/modeld.v1.Node/ListAudit", Needs(Admin)),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Needs(Inference),
            ),
            ("/modeld.v2.Whatever/Call", Needs(Admin)),
            ("/", Needs(Admin)),
        ] {
            assert_eq!(access(path), want, "{path}");
        }
    }

    #[test]
    fn tokens_grant_their_role_and_no_more() {
        let c = creds();
        let call = |path: &str, auth: Option<&str>| authorize(&c, access, path, auth, None);
        let generate = "/modeld.v1.Generate/Generate";
        let register = "/modeld.v1.ModelRegistry/RegisterModel";

        assert_eq!(
            call(generate, None).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            call(generate, Some("Bearer wrong")).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            call(generate, Some("inference-token")).unwrap_err().code(),
            Code::Unauthenticated,
            "the scheme is required"
        );
        let app = call(generate, Some("Bearer inference-token"))
            .unwrap()
            .unwrap();
        assert_eq!((app.name.as_str(), app.role), ("app", Role::Inference));
        let denied = call(register, Some("Bearer inference-token")).unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(
            denied.message().contains("operator"),
            "{}",
            denied.message()
        );
        assert!(call(register, Some("Bearer operator-token")).is_ok());
        assert!(call("/modeld.v2.New/Call", Some("Bearer operator-token")).is_err());
        assert!(call("/modeld.v2.New/Call", Some("Bearer admin-token")).is_ok());
        // Health needs nothing.
        assert_eq!(call("/grpc.health.v1.Health/Check", None).unwrap(), None);
    }

    #[test]
    fn without_credentials_every_caller_is_an_anonymous_admin() {
        let c = Credentials::default();
        let id = authorize(&c, access, "/modeld.v1.Storage/Push", None, None)
            .unwrap()
            .unwrap();
        assert_eq!(id.role, Role::Admin);
    }

    #[test]
    fn a_verified_certificate_gets_the_role_its_identity_has() {
        let c = creds();
        let register = "/modeld.v1.ModelRegistry/RegisterModel";
        let id = authorize(&c, access, register, None, Some("fleet-controller"))
            .unwrap()
            .unwrap();
        assert_eq!(id.role, Role::Operator);
        let unknown = authorize(&c, access, register, None, Some("laptop")).unwrap_err();
        assert_eq!(unknown.code(), Code::PermissionDenied);
        // A token beside the certificate decides.
        let app = authorize(
            &c,
            access,
            register,
            Some("Bearer inference-token"),
            Some("fleet-controller"),
        );
        assert_eq!(app.unwrap_err().code(), Code::PermissionDenied);
    }

    #[test]
    fn the_device_role_opens_only_what_a_table_gives_it() {
        let mut c = creds();
        c.tokens.push(TokenEntry {
            name: "edge-7".into(),
            role: Role::Device,
            sha256: Sha256::digest(b"device-token").into(),
        });
        let device_only = |path: &str| {
            if path == "/fleet/Connect" {
                Access::Needs(Role::Device)
            } else {
                Access::Needs(Role::Operator)
            }
        };
        let call = |path: &str, token: &str| {
            authorize(
                &c,
                device_only,
                path,
                Some(&format!("Bearer {token}")),
                None,
            )
        };
        assert!(call("/fleet/Connect", "device-token").is_ok());
        assert!(call("/fleet/Connect", "admin-token").is_ok());
        for token in ["operator-token", "inference-token"] {
            let refused = call("/fleet/Connect", token).unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{token}");
            assert!(
                refused.message().contains("device"),
                "{}",
                refused.message()
            );
        }
        assert_eq!(
            call("/fleet/Apply", "device-token").unwrap_err().code(),
            Code::PermissionDenied
        );
        // On the agent a device credential opens nothing.
        let agent = authorize(
            &c,
            access,
            "/modeld.v1.Generate/Generate",
            Some("Bearer device-token"),
            None,
        );
        assert_eq!(agent.unwrap_err().code(), Code::PermissionDenied);
    }

    #[test]
    fn the_tokens_file_is_checked_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let good = hex::encode(Sha256::digest(b"secret"));
        std::fs::write(
            &path,
            format!("[[tokens]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"{good}\"\n"),
        )
        .unwrap();
        let c = Credentials::from_file(&path).unwrap();
        assert_eq!(c.identify("secret").unwrap().role, Role::Operator);
        assert!(c.identify("Secret").is_none());
        for bad in [
            "[[tokens]]\nname = \"ci\"\nrole = \"root\"\nsha256 = \"00\"\n".to_owned(),
            "[[tokens]]\nname = \"ci\"\nrole = \"admin\"\nsha256 = \"xyz\"\n".to_owned(),
            format!(
                "[[tokens]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{good}\"\n\
                 [[tokens]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{good}\"\n"
            ),
            "[[tokens]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"x\"\nextra = 1\n".to_owned(),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = Credentials::from_file(&path).unwrap_err().to_string();
            // The file's path is named; no hash or token is echoed back.
            assert!(e.contains("tokens file"), "{e}");
            assert!(!e.contains(&good), "{e}");
        }
    }
}
