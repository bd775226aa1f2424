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
    /// A URL the agent will not fetch: too many redirects, another scheme, or a host
    /// the source rules exclude.
    Refused(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Http(e) => write!(f, "{}", modeld_engine_core::error_chain(e)),
            FetchError::Refused(why) => f.write_str(why),
        }
    }
}

/// Which hosts remote sources may reach (`--source-allow-host`,
/// `--source-deny-host`). A rule is a host name, or `.example.com` for that domain and
/// every name under it. Deny wins; with no allow rule, every host not denied is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    allow: Vec<String>,
    deny: Vec<String>,
}

impl HostPolicy {
    pub fn new(allow: Vec<String>, deny: Vec<String>) -> HostPolicy {
        let lower = |v: Vec<String>| v.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        HostPolicy {
            allow: lower(allow),
            deny: lower(deny),
        }
    }

    fn matches(rule: &str, host: &str) -> bool {
        match rule.strip_prefix('.') {
            Some(domain) => host == domain || host.ends_with(rule),
            None => host == rule,
        }
    }

    /// Why `url` may not be fetched, if it may not.
    pub fn check(&self, url: &url::Url) -> std::result::Result<(), String> {
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        if self.deny.iter().any(|r| Self::matches(r, &host)) {
            return Err(format!("{host} is excluded by --source-deny-host"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|r| Self::matches(r, &host)) {
            return Err(format!("{host} is not among the --source-allow-host hosts"));
        }
        Ok(())
    }
}

/// GETs `url`, following redirects: `prepare` adds the headers for each hop's URL.
/// Every hop must pass `hosts`.
pub async fn get_following(
    client: &reqwest::Client,
    hosts: &HostPolicy,
    url: url::Url,
    prepare: impl Fn(reqwest::RequestBuilder, &url::Url) -> reqwest::RequestBuilder,
) -> std::result::Result<reqwest::Response, FetchError> {
    let mut url = url;
    for _ in 0..=MAX_REDIRECTS {
        hosts.check(&url).map_err(FetchError::Refused)?;
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
            FetchError::Refused(format!("{url} redirects to an unusable location: {e}"))
        })?;
        if !matches!(next.scheme(), "http" | "https") {
            return Err(FetchError::Refused(format!(
                "{url} redirects to a {} URL; only http and https are followed",
                next.scheme()
            )));
        }
        url = next;
    }
    Err(FetchError::Refused(format!(
        "more than {MAX_REDIRECTS} redirects; the last pointed to {url}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_and_domains_cover_their_subdomains() {
        let url = |s: &str| url::Url::parse(s).unwrap();
        let p = HostPolicy::new(
            vec![".mirror.lan".into(), "huggingface.co".into()],
            vec!["bad.mirror.lan".into()],
        );
        assert!(p.check(&url("https://huggingface.co/x")).is_ok());
        assert!(p.check(&url("https://HuggingFace.co/x")).is_ok());
        assert!(p.check(&url("http://mirror.lan/x")).is_ok());
        assert!(p.check(&url("http://a.mirror.lan/x")).is_ok());
        assert!(p.check(&url("http://bad.mirror.lan/x")).is_err());
        assert!(p.check(&url("http://evilmirror.lan/x")).is_err());
        assert!(p.check(&url("https://cdn.huggingface.co/x")).is_err());
        assert!(
            HostPolicy::default()
                .check(&url("http://any.where/x"))
                .is_ok()
        );
    }
}
