//! The agent's one outbound HTTP client (catalog fetches now, downloads later).

use std::time::Duration;

use crate::error::{Error, Result};

/// Builds the shared client. reqwest is compiled without a bundled crypto provider;
/// ring is installed here, once per process (a second install is harmless, which
/// matters when tests start several agents in one process).
pub fn build() -> Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("modeld/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Error::Setup(format!("HTTP client: {e}")))
}
