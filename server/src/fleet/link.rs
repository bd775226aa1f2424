//! The stream to the fleet controller. The agent dials out, so a device behind NAT
//! takes part: it sends `hello` (who it is, what it can run, what it holds), then a
//! report whenever its models change, and takes every set of assignments the
//! controller sends. A lost stream is retried with backoff for as long as the agent
//! runs; in the meantime the reconciler keeps converging to what the node holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use modeld_node::Node;
use modeld_node::fleet::Reconciler;
use modeld_proto::fleet::v1 as fpb;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{info, warn};

use super::convert;
use crate::config::FleetSettings;
use crate::error::{Error, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reports are coalesced: many model changes within this window go out as one.
const REPORT_COALESCE: Duration = Duration::from_millis(200);
/// A stream that lasted this long was healthy: the next failure starts the backoff
/// from its beginning again.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// How the agent reaches its controller, checked at start-up.
#[derive(Clone)]
pub struct Link {
    endpoint: Endpoint,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    settings: FleetSettings,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Link {
    pub fn new(settings: FleetSettings) -> Result<Link> {
        let bad = |e: String| Error::Config(format!("fleet: {e}"));
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| bad(format!("{}: {e}", p.display())))
        };
        let mut endpoint = Endpoint::from_shared(settings.url.clone())
            .map_err(|e| bad(format!("{:?}: {e}", settings.url)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if settings.url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &settings.tls_ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        let token = settings
            .token
            .as_ref()
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| bad("the token may hold only visible ASCII".into()))
            })
            .transpose()?;
        Ok(Link {
            endpoint,
            token,
            settings,
        })
    }
}

/// The assignments the node kept from its last controller, if any.
pub fn stored_assignments(node: &Node) -> modeld_node::fleet::Assignments {
    let stored = match node.store.fleet_assignments() {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return modeld_node::fleet::Assignments::default(),
        Err(e) => {
            warn!(error = %e, "fleet: the stored assignments could not be read");
            return modeld_node::fleet::Assignments::default();
        }
    };
    match fpb::Assignments::decode(stored.as_slice())
        .map_err(|e| modeld_node::Error::TaskFailed(e.to_string()))
        .and_then(convert::assignments_from_pb)
    {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "fleet: the stored assignments are unusable; waiting for the controller's");
            modeld_node::fleet::Assignments::default()
        }
    }
}

/// Keeps a stream to the controller open until `shutdown`.
pub fn spawn(
    link: Link,
    node: Arc<Node>,
    reconciler: Reconciler,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let backoff = || {
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_secs(1))
                .with_factor(2.0)
                .with_max_delay(Duration::from_secs(30))
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut delays = backoff();
        loop {
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = session(&link, &node, &reconciler) => outcome,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            if started.elapsed() >= HEALTHY_SESSION {
                delays = backoff();
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(30));
            match outcome {
                Ok(()) => {
                    info!(url = %link.settings.url, retry_ms = delay.as_millis(), "fleet: the controller closed the stream")
                }
                Err(e) => {
                    warn!(url = %link.settings.url, error = %e, retry_ms = delay.as_millis(), "fleet: no stream to the controller")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    })
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// One stream, from hello to its end.
async fn session(link: &Link, node: &Arc<Node>, reconciler: &Reconciler) -> Result<()> {
    let channel = link.endpoint.connect().await.map_err(|e| {
        Error::Fleet(format!(
            "cannot reach {}: {}",
            link.settings.url,
            modeld_engine_core::error_chain(&e)
        ))
    })?;
    let token = link.token.clone();
    let mut client = fpb::device_service_client::DeviceServiceClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            if let Some(token) = &token {
                request
                    .metadata_mut()
                    .insert("authorization", token.clone());
            }
            Ok(request)
        },
    )
    .max_decoding_message_size(modeld_proto::MAX_MESSAGE_BYTES);

    let mut reports = reconciler.reports();
    let report = convert::report_to_pb(&reports.borrow_and_update());
    let hello = fpb::Hello {
        capabilities: Some(crate::api::node::capabilities(node).await?),
        measurements: convert::measurements(node)?,
        site: link.settings.site.clone(),
        labels: link.settings.labels.clone().into_iter().collect(),
        applied_generation: reconciler.generation(),
        report: Some(report),
        peer_address: link.settings.advertise.clone().unwrap_or_default(),
    };
    let (outbound, outbound_rx) = mpsc::channel(8);
    let _ = outbound
        .send(fpb::ConnectRequest {
            message: Some(fpb::connect_request::Message::Hello(hello)),
        })
        .await;
    let mut inbound = client
        .connect(ReceiverStream::new(outbound_rx))
        .await
        .map_err(|s| {
            Error::Fleet(format!(
                "the controller refused the stream: {}",
                describe(&s)
            ))
        })?
        .into_inner();
    info!(url = %link.settings.url, "fleet: connected to the controller");
    loop {
        tokio::select! {
            message = inbound.message() => {
                let message = message.map_err(|s| Error::Fleet(format!("the stream failed: {}", describe(&s))))?;
                let Some(message) = message else { return Ok(()) };
                if let Some(fpb::connect_response::Message::Assignments(assignments)) = message.message {
                    take(node, reconciler, assignments).await;
                }
            }
            changed = reports.changed() => {
                if changed.is_err() {
                    return Err(Error::Fleet("the reconciler stopped".into()));
                }
                tokio::time::sleep(REPORT_COALESCE).await;
                let report = convert::report_to_pb(&reports.borrow_and_update());
                let sent = outbound.send(fpb::ConnectRequest {
                    message: Some(fpb::connect_request::Message::Report(report)),
                }).await;
                if sent.is_err() {
                    return Err(Error::Fleet("the stream to the controller closed".into()));
                }
            }
        }
    }
}

/// Keeps and applies a set of assignments, or refuses it whole.
async fn take(node: &Node, reconciler: &Reconciler, assignments: fpb::Assignments) {
    let generation = assignments.generation;
    let encoded = assignments.encode_to_vec();
    match convert::assignments_from_pb(assignments) {
        Ok(domain) => {
            info!(
                generation,
                models = domain.items.len(),
                "fleet: new assignments"
            );
            // Work starts at once; the copy on disk follows (the controller sends the
            // assignments again on every reconnect, so none is lost meanwhile).
            let kept = node.store.put_fleet_assignments(&encoded);
            reconciler.assign(domain);
            let flushed = match kept {
                Ok(()) => node.store.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = flushed {
                warn!(error = %e, "fleet: the assignments could not be stored; applying them anyway");
            }
        }
        Err(e) => {
            warn!(generation, error = %e, "fleet: refusing the controller's assignments; keeping the ones held");
        }
    }
}
