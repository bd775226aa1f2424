//! The agent's one outbound HTTP client (catalog fetches and downloads). It follows
//! redirects itself ([`get_following`]): a bounded number, to http(s) only, with the
//! headers meant for each hop's host computed afresh, so a header configured for one
//! host never reaches the host a redirect points to.

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
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::Setup(format!("HTTP client: {e}")))
}

/// Redirects one fetch follows.
pub const MAX_REDIRECTS: usize = 5;

/// Why a fetch did not get an answer.
#[derive(Debug)]
pub enum FetchError {
    Http(reqwest::Error),
    /// A redirect the agent will not follow (too many, or to another scheme).
    Redirect(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Http(e) => write!(f, "{}", modeld_engine_core::error_chain(e)),
            FetchError::Redirect(why) => f.write_str(why),
        }
    }
}

/// GETs `url`, following redirects: `prepare` adds the headers for each hop's URL.
pub async fn get_following(
    client: &reqwest::Client,
    url: url::Url,
    prepare: impl Fn(reqwest::RequestBuilder, &url::Url) -> reqwest::RequestBuilder,
) -> std::result::Result<reqwest::Response, FetchError> {
    let mut url = url;
    for _ in 0..=MAX_REDIRECTS {
        let response = prepare(client.get(url.clone()), &url)
            .send()
            .await
            .map_err(FetchError::Http)?;
        if !response.status().is_redirection() {
            return Ok(response);
        }
        let Some(location) = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Ok(response);
        };
        let next = url.join(location).map_err(|e| {
            FetchError::Redirect(format!("{url} redirects to an unusable location: {e}"))
        })?;
        if !matches!(next.scheme(), "http" | "https") {
            return Err(FetchError::Redirect(format!(
                "{url} redirects to a {} URL; only http and https are followed",
                next.scheme()
            )));
        }
        url = next;
    }
    Err(FetchError::Redirect(format!(
        "more than {MAX_REDIRECTS} redirects; the last pointed to {url}"
    )))
}
