//! A real HTTP/1.1 server on loopback that serves files with Range, ETag and If-Range
//! support, and injects faults on request: dropped connections, ignored ranges,
//! changing ETags, error statuses with Retry-After, stalls, wrong bytes and throttling.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use axum::routing::get;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// A fault applied to one request (faults queue up per file, one per request).
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (and Retry-After seconds, if given) instead of the file.
    Status(u16, Option<u64>),
    /// Close the connection after sending this many body bytes.
    DropAfter(u64),
    /// Stop sending (but keep the connection open) after this many body bytes.
    StallAfter(u64),
    /// Answer 200 with the whole file even when a range was asked for.
    IgnoreRange,
    /// Flip one byte at this file offset.
    Corrupt(u64),
    /// Like DropAfter, and the file gets this new ETag (it "changed" on the server).
    DropAndChangeEtag(u64, String),
    /// Answer 302 with this Location.
    Redirect(String),
}

#[derive(Debug, Clone, Default)]
struct Served {
    path: PathBuf,
    etag: String,
    faults: VecDeque<Fault>,
    /// Faults applied to every request, after the queue is empty.
    always: Vec<Fault>,
    /// Bytes per second; 0 = unthrottled.
    throttle: u64,
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub authorization: Option<String>,
    /// The `x-api-key` header, for tests of headers scoped to a host.
    pub api_key: Option<String>,
    pub status: u16,
    pub at: std::time::Instant,
}

#[derive(Debug, Default)]
struct ServerState {
    root: PathBuf,
    files: Mutex<HashMap<String, Served>>,
    seen: Mutex<Vec<Seen>>,
}

pub struct FileServer {
    pub addr: SocketAddr,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl FileServer {
    /// Serves every file under `root` by its relative path.
    pub async fn serve(root: PathBuf) -> FileServer {
        let state = Arc::new(ServerState {
            root,
            ..Default::default()
        });
        let app = axum::Router::new()
            .route("/{*path}", get(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FileServer { addr, state, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&mut Served) -> T) -> T {
        let mut files = self.state.files.lock().unwrap();
        let served = files.entry(name.to_owned()).or_insert_with(|| Served {
            path: self.state.root.join(name),
            etag: "\"v1\"".into(),
            ..Default::default()
        });
        f(served)
    }

    /// Queues a fault for the next request of `name` that has none queued before it.
    pub fn fault(&self, name: &str, fault: Fault) {
        self.with(name, |s| s.faults.push_back(fault));
    }

    /// Applies `fault` to every request of `name` once the queue is empty.
    pub fn always(&self, name: &str, fault: Fault) {
        self.with(name, |s| s.always.push(fault));
    }

    pub fn set_etag(&self, name: &str, etag: &str) {
        self.with(name, |s| s.etag = etag.to_owned());
    }

    pub fn throttle(&self, name: &str, bytes_per_second: u64) {
        self.with(name, |s| s.throttle = bytes_per_second);
    }

    pub fn seen(&self, name: &str) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == name)
            .cloned()
            .collect()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse_range(v: &str) -> Option<u64> {
    v.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
}

async fn handle(
    State(state): State<Arc<ServerState>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response<Body> {
    let header = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (served, faults) = {
        let mut files = state.files.lock().unwrap();
        let served = files.entry(path.clone()).or_insert_with(|| Served {
            path: state.root.join(&path),
            etag: "\"v1\"".into(),
            ..Default::default()
        });
        let faults: Vec<Fault> = match served.faults.pop_front() {
            Some(f) => vec![f],
            None => served.always.clone(),
        };
        let snapshot = served.clone();
        for f in &faults {
            if let Fault::DropAndChangeEtag(_, etag) = f {
                served.etag.clone_from(etag);
            }
        }
        (snapshot, faults)
    };
    let record = |status: u16| {
        state.seen.lock().unwrap().push(Seen {
            path: path.clone(),
            range: header(header::RANGE),
            if_range: header(header::IF_RANGE),
            authorization: header(header::AUTHORIZATION),
            api_key: header(header::HeaderName::from_static("x-api-key")),
            status,
            at: std::time::Instant::now(),
        });
    };
    if path.split('/').any(|c| c == "..") {
        record(400);
        return Response::builder().status(400).body(Body::empty()).unwrap();
    }
    for f in &faults {
        if let Fault::Redirect(to) = f {
            record(302);
            return Response::builder()
                .status(302)
                .header(header::LOCATION, to)
                .body(Body::empty())
                .unwrap();
        }
        if let Fault::Status(code, retry_after) = f {
            record(*code);
            let mut b = Response::builder().status(*code);
            if let Some(secs) = retry_after {
                b = b.header(header::RETRY_AFTER, secs.to_string());
            }
            return b.body(Body::from("injected failure")).unwrap();
        }
    }
    let Ok(meta) = tokio::fs::metadata(&served.path).await else {
        record(404);
        return Response::builder()
            .status(404)
            .body(Body::from("not found"))
            .unwrap();
    };
    let len = meta.len();
    let ignore_range = faults.iter().any(|f| matches!(f, Fault::IgnoreRange));
    let range_ok = header(header::IF_RANGE).is_none_or(|v| v == served.etag);
    let start = match header(header::RANGE).and_then(|r| parse_range(&r)) {
        Some(s) if !ignore_range && range_ok => s,
        _ => 0,
    };
    if start > len {
        record(416);
        return Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{len}"))
            .body(Body::empty())
            .unwrap();
    }
    let partial = start > 0;
    let status = if partial { 206 } else { 200 };
    record(status);
    let drop_after = faults.iter().find_map(|f| match f {
        Fault::DropAfter(n) | Fault::DropAndChangeEtag(n, _) => Some(*n),
        _ => None,
    });
    let stall_after = faults.iter().find_map(|f| {
        if let Fault::StallAfter(n) = f {
            Some(*n)
        } else {
            None
        }
    });
    let corrupt = faults.iter().find_map(|f| {
        if let Fault::Corrupt(at) = f {
            Some(*at)
        } else {
            None
        }
    });
    let throttle = served.throttle;
    let file_path = served.path.clone();

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let Ok(mut file) = tokio::fs::File::open(&file_path).await else {
            return;
        };
        if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
            return;
        }
        let mut pos = start;
        let mut sent = 0u64;
        let chunk = 64 * 1024;
        loop {
            let mut buf = vec![0u8; chunk];
            let Ok(n) = file.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buf.truncate(n);
            if let Some(at) = corrupt
                && (pos..pos + n as u64).contains(&at)
            {
                buf[(at - pos) as usize] ^= 0xff;
            }
            let mut out = Bytes::from(buf);
            for (limit, is_drop) in [(drop_after, true), (stall_after, false)] {
                if let Some(limit) = limit
                    && sent + out.len() as u64 >= limit
                {
                    let keep = (limit - sent) as usize;
                    let _ = tx.send(Ok(out.slice(..keep))).await;
                    if is_drop {
                        let _ = tx
                            .send(Err(std::io::Error::other("injected connection drop")))
                            .await;
                    } else {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    return;
                }
            }
            sent += out.len() as u64;
            pos += out.len() as u64;
            if throttle > 0 {
                tokio::time::sleep(Duration::from_secs_f64(out.len() as f64 / throttle as f64))
                    .await;
            }
            if tx.send(Ok(std::mem::take(&mut out))).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut b = Response::builder()
        .status(status)
        .header(header::ETAG, HeaderValue::from_str(&served.etag).unwrap())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, (len - start).to_string());
    if partial {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len - 1),
        );
    }
    b.body(body).unwrap()
}
