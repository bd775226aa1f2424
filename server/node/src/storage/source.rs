//! Sources a file can come from, opened at an offset: http(s) with Range and If-Range,
//! file:// on the agent's host, and modeld:// peers through ReadBlob.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{
    CONTENT_RANGE, ETAG, HeaderValue, IF_RANGE, LAST_MODIFIED, RANGE, RETRY_AFTER,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use modeld_engine_core::error_chain as chain;

/// How opening or reading a source went wrong, classified by what to do next. These
/// never reach a client directly: the transfer turns them into retries, a move to the
/// next mirror, or one `Error::SourcesExhausted` naming every attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceFault {
    /// Worth another attempt after a delay: connection errors, 5xx, 408, 429, stalls.
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// This source will not serve the file (4xx other than 408/429, missing file):
    /// move to the next mirror.
    Permanent(String),
    /// The partial bytes cannot be continued (the file changed, or the server's range
    /// answer does not line up): start this file again from byte 0.
    RestartFromZero(String),
}

impl fmt::Display for SourceFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceFault::Retryable { message, .. } => f.write_str(message),
            SourceFault::Permanent(m) | SourceFault::RestartFromZero(m) => f.write_str(m),
        }
    }
}

/// A source URL as traces may show it: no user, password, query or fragment, where
/// signed URLs and tokens travel.
pub fn shown(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(not a URL)".to_owned(),
    }
}

/// A fault worth another attempt, with no advice on when.
pub fn retryable(message: impl Into<String>) -> SourceFault {
    SourceFault::Retryable {
        message: message.into(),
        retry_after: None,
    }
}

/// A header value that is never printed.
#[derive(Clone)]
pub struct Secret(pub HeaderValue);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Extra headers per source host, e.g. an Authorization token for one hub.
#[derive(Debug, Clone, Default)]
pub struct HostHeaders {
    by_host: HashMap<String, Vec<(reqwest::header::HeaderName, Secret)>>,
}

impl HostHeaders {
    pub fn insert(
        &mut self,
        host: &str,
        name: reqwest::header::HeaderName,
        mut value: HeaderValue,
    ) {
        value.set_sensitive(true);
        self.by_host
            .entry(host.to_ascii_lowercase())
            .or_default()
            .push((name, Secret(value)));
    }

    fn for_url(&self, url: &url::Url) -> &[(reqwest::header::HeaderName, Secret)] {
        url.host_str()
            .and_then(|h| self.by_host.get(&h.to_ascii_lowercase()))
            .map_or(&[], Vec::as_slice)
    }
}

/// What every fetch needs.
#[derive(Clone)]
pub struct SourceContext {
    pub http: reqwest::Client,
    pub headers: HostHeaders,
    /// No bytes for this long counts as a stall.
    pub stall_timeout: Duration,
    /// Reads blobs from other agents (`modeld://` sources); `None` refuses them.
    pub peers: Option<Arc<dyn PeerSource>>,
    /// Where `file://` sources may lead, checked again when read: a link may have
    /// changed since the model was registered.
    pub roots: crate::access::LocalRoots,
    /// Which hosts http(s) sources may reach, redirects included.
    pub hosts: crate::http_client::HostPolicy,
    /// What http(s) sources may take of the uplink, every transfer together.
    pub origin_limit: Arc<super::bandwidth::OriginLimit>,
}

impl std::fmt::Debug for SourceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceContext")
            .field("stall_timeout", &self.stall_timeout)
            .field("peers", &self.peers.is_some())
            .finish_non_exhaustive()
    }
}

/// Another agent's blobs, by digest: what a `modeld://host:port` source reads. The
/// protocol is the agent's own API, so the edge that speaks it implements this.
pub trait PeerSource: Send + Sync {
    /// Opens blob `sha256` on the peer at `host:port` from byte `offset`.
    fn open<'a>(
        &'a self,
        host: &'a str,
        port: u16,
        sha256: &'a str,
        offset: u64,
    ) -> BoxFuture<'a, Result<PeerBlob, SourceFault>>;
}

/// A blob being read from a peer.
pub struct PeerBlob {
    /// Where the bytes begin (the peer may only serve from another offset).
    pub start: u64,
    /// The blob's size, when the peer said.
    pub total: Option<u64>,
    pub chunks: Box<dyn PeerChunks>,
}

/// The chunks of a peer's blob, in order.
pub trait PeerChunks: Send {
    /// The next chunk; `None` at the end.
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, SourceFault>>;
}

/// An open body, positioned at `start`.
pub struct Opened {
    pub body: Body,
    /// Where the body begins: the requested offset, or 0 when the source restarted.
    pub start: u64,
    /// Total length of the source when it says.
    pub total: Option<u64>,
    /// Validator to send as If-Range next time ("" when the source has none).
    pub validator: String,
}

pub enum Body {
    Http(reqwest::Response),
    File(tokio::fs::File),
    Peer(Box<dyn PeerChunks>),
}

const FILE_CHUNK: usize = 1 << 20;
/// The port of a `modeld://host` source that names none: the agent's default.
const PEER_PORT: u16 = 7700;

impl Body {
    /// The next chunk; `None` at the end.
    pub async fn next_chunk(&mut self, stall: Duration) -> Result<Option<Bytes>, SourceFault> {
        let stalled = || retryable(format!("no bytes arrived for {} s", stall.as_secs_f32()));
        match self {
            Body::Http(resp) => match tokio::time::timeout(stall, resp.chunk()).await {
                Err(_) => Err(stalled()),
                Ok(Ok(chunk)) => Ok(chunk),
                Ok(Err(e)) => Err(retryable(format!("connection lost: {}", chain(&e)))),
            },
            Body::File(file) => {
                let mut buf = vec![0u8; FILE_CHUNK];
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| retryable(format!("read failed: {e}")))?;
                buf.truncate(n);
                Ok((n > 0).then(|| Bytes::from(buf)))
            }
            Body::Peer(chunks) => match tokio::time::timeout(stall, chunks.next()).await {
                Err(_) => Err(stalled()),
                Ok(result) => result,
            },
        }
    }
}

/// Opens `raw_url` at `offset`. `validator` is what the partial bytes came with.
pub async fn open(
    ctx: &SourceContext,
    raw_url: &str,
    sha256: &str,
    offset: u64,
    validator: &str,
) -> Result<Opened, SourceFault> {
    let url =
        url::Url::parse(raw_url).map_err(|e| SourceFault::Permanent(format!("bad URL: {e}")))?;
    match url.scheme() {
        "http" | "https" => open_http(ctx, url, offset, validator).await,
        "file" => open_file(&ctx.roots, &url, offset, validator).await,
        "modeld" => open_peer(ctx, &url, sha256, offset).await,
        other => Err(SourceFault::Permanent(format!(
            "unsupported URL scheme {other:?}"
        ))),
    }
}

async fn open_http(
    ctx: &SourceContext,
    url: url::Url,
    offset: u64,
    validator: &str,
) -> Result<Opened, SourceFault> {
    // Headers are chosen per hop: a redirect to another host gets that host's own.
    let prepare = |mut req: reqwest::RequestBuilder, hop: &url::Url| {
        for (name, value) in ctx.headers.for_url(hop) {
            req = req.header(name, value.0.clone());
        }
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
            if !validator.is_empty() {
                req = req.header(IF_RANGE, validator);
            }
        }
        req
    };
    let resp = tokio::time::timeout(
        ctx.stall_timeout.max(Duration::from_secs(10)),
        crate::http_client::get_following(&ctx.http, &ctx.hosts, url, prepare),
    )
    .await
    .map_err(|_| retryable("no response headers before the stall timeout"))?
    .map_err(|e| match e {
        crate::http_client::FetchError::Http(e) => {
            retryable(format!("request failed: {}", chain(&e)))
        }
        crate::http_client::FetchError::Refused(why) => SourceFault::Permanent(why),
    })?;
    let status = resp.status();
    let headers = resp.headers();
    let new_validator = headers
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        // A weak ETag cannot be used with If-Range.
        .filter(|v| !v.starts_with("W/"))
        .or_else(|| headers.get(LAST_MODIFIED).and_then(|v| v.to_str().ok()))
        .unwrap_or_default()
        .to_owned();
    match status {
        StatusCode::PARTIAL_CONTENT => {
            let range = headers
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            match range {
                Some((start, total)) if start == offset => Ok(Opened {
                    total,
                    body: Body::Http(resp),
                    start,
                    validator: new_validator,
                }),
                _ => Err(SourceFault::RestartFromZero(format!(
                    "206 answer's Content-Range {:?} does not start at byte {offset}",
                    headers.get(CONTENT_RANGE)
                ))),
            }
        }
        StatusCode::OK => Ok(Opened {
            total: resp.content_length(),
            body: Body::Http(resp),
            start: 0,
            validator: new_validator,
        }),
        StatusCode::RANGE_NOT_SATISFIABLE => Err(SourceFault::RestartFromZero(format!(
            "server cannot serve from byte {offset} (416)"
        ))),
        s if s.is_server_error()
            || s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT =>
        {
            Err(SourceFault::Retryable {
                message: format!("server answered {s}"),
                retry_after: headers
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
            })
        }
        s => Err(SourceFault::Permanent(format!("server answered {s}"))),
    }
}

/// `bytes START-END/TOTAL` → (START, TOTAL if known).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Retry-After is seconds or an HTTP date. Capped so a hostile server cannot park a
/// download for days.
fn parse_retry_after(v: &str) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(300);
    let d = if let Ok(secs) = v.trim().parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let when = httpdate::parse_http_date(v.trim()).ok()?;
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    };
    Some(d.min(CAP))
}

async fn open_file(
    roots: &crate::access::LocalRoots,
    url: &url::Url,
    offset: u64,
    validator: &str,
) -> Result<Opened, SourceFault> {
    let path = url
        .to_file_path()
        .map_err(|()| SourceFault::Permanent(format!("{url} is not a local file path")))?;
    let path = {
        let (roots, path) = (roots.clone(), path.clone());
        tokio::task::spawn_blocking(move || roots.check("url", &path))
            .await
            .map_err(|e| SourceFault::Permanent(e.to_string()))?
            .map_err(|e| SourceFault::Permanent(e.to_string()))?
    };
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|e| SourceFault::Permanent(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(SourceFault::Permanent(format!(
            "{} is not a file",
            path.display()
        )));
    }
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let this_validator = format!("file:{}:{mtime}", meta.len());
    let mut start = offset;
    if offset > 0 && (validator != this_validator || offset > meta.len()) {
        start = 0;
    }
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| SourceFault::Permanent(format!("{}: {e}", path.display())))?;
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| retryable(format!("seek failed: {e}")))?;
    Ok(Opened {
        body: Body::File(file),
        start,
        total: Some(meta.len()),
        validator: this_validator,
    })
}

async fn open_peer(
    ctx: &SourceContext,
    url: &url::Url,
    sha256: &str,
    offset: u64,
) -> Result<Opened, SourceFault> {
    let peers = ctx
        .peers
        .as_ref()
        .ok_or_else(|| SourceFault::Permanent("this agent does not read from peers".to_owned()))?;
    let host = url
        .host_str()
        .ok_or_else(|| SourceFault::Permanent(format!("{url} has no host")))?;
    let port = url.port().unwrap_or(PEER_PORT);
    let blob = peers.open(host, port, sha256, offset).await?;
    if blob.start != offset {
        return Err(SourceFault::RestartFromZero(format!(
            "peer answered from byte {}, not {offset}",
            blob.start
        )));
    }
    Ok(Opened {
        body: Body::Peer(blob.chunks),
        start: blob.start,
        total: blob.total,
        validator: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_carry_no_credentials() {
        assert_eq!(
            shown("https://user:pw@host.example/m.gguf?X-Amz-Signature=abc#f"),
            "https://host.example/m.gguf"
        );
        assert_eq!(shown("modeld://peer:7700/blob"), "modeld://peer:7700/blob");
        assert_eq!(shown("::"), "(not a URL)");
    }

    #[test]
    fn content_range_and_retry_after_parse() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("999999"), Some(Duration::from_secs(300)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn secrets_never_print() {
        let mut h = HostHeaders::default();
        h.insert(
            "Hub.Example",
            reqwest::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer hf_secret"),
        );
        let shown = format!("{h:?}");
        assert!(!shown.contains("hf_secret"), "{shown}");
    }
}
