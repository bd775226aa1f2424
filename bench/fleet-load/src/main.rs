//! Simulated devices for the fleet controller: each opens `DeviceService.Connect`,
//! says hello as an edge box of one of N sites, and answers every set of assignments at
//! once with a report that holds every model READY at the assigned revision, with its
//! gates passed. No inference runs, so one machine can stand in for thousands of
//! devices and the controller's own costs show.
//!
//! The run: connect every device, apply a deployment, wait until every device has its
//! assignments and the controller reports it converged; then apply a new revision and
//! measure again. Prints one JSON object with the timings.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use modeld_proto::fleet::v1 as fpb;
use modeld_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
struct Args {
    /// The controller, e.g. http://127.0.0.1:7800.
    #[arg(long)]
    controller: String,
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    #[arg(long, default_value_t = 100)]
    sites: usize,
    /// Devices sharing one HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    per_connection: usize,
    /// Give up after this many seconds per phase.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// What every simulated device has seen, for the measurement.
#[derive(Default)]
struct Seen {
    connected: AtomicUsize,
    /// Devices whose latest assignments carry each deployment revision.
    at_revision: std::sync::Mutex<HashMap<u64, usize>>,
    assignments_received: AtomicU64,
}

fn capabilities(id: &str) -> pb::GetCapabilitiesResponse {
    pb::GetCapabilitiesResponse {
        node_id: id.to_owned(),
        os: "linux".into(),
        device_class: pb::DeviceClass::EdgeBox as i32,
        memory: Some(pb::MemoryInfo {
            total_bytes: 8 << 30,
            ..Default::default()
        }),
        memory_budget_bytes: 2 << 30,
        disk_free_bytes: 100 << 30,
        formats: vec![pb::FormatSupport {
            format: pb::ModelFormat::Gguf as i32,
            runnable: true,
            recognized: true,
            runtimes: vec![pb::Runtime::LlamaCpp as i32],
        }],
        ..Default::default()
    }
}

/// The report of a device that did everything `a` asks at once.
fn report_for(a: &fpb::Assignments) -> fpb::Report {
    fpb::Report {
        models: a
            .assignments
            .iter()
            .map(|x| {
                let stored = x.state == fpb::WantedState::Stored as i32;
                fpb::ModelReport {
                    model_id: x.spec.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
                    state: if stored {
                        pb::ModelState::Downloaded
                    } else {
                        pb::ModelState::Ready
                    } as i32,
                    deployment: x.deployment.clone(),
                    revision: x.revision,
                    gates: x.gates.as_ref().map(|_| fpb::GateReport {
                        revision: x.revision,
                        state: fpb::GateState::Passed as i32,
                        results: Vec::new(),
                    }),
                    ..Default::default()
                }
            })
            .collect(),
        applied_generation: a.generation,
        disk_free_bytes: 100 << 30,
    }
}

async fn device(channel: Channel, id: String, site: String, seen: Arc<Seen>) -> anyhow::Result<()> {
    let mut client = fpb::device_service_client::DeviceServiceClient::new(channel)
        .max_decoding_message_size(modeld_proto::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(4);
    tx.send(fpb::ConnectRequest {
        message: Some(fpb::connect_request::Message::Hello(fpb::Hello {
            capabilities: Some(capabilities(&id)),
            site,
            labels: [("tier".to_owned(), "edge".to_owned())].into(),
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    seen.connected.fetch_add(1, Ordering::SeqCst);
    let mut revision = 0;
    while let Some(message) = inbound.message().await? {
        let Some(fpb::connect_response::Message::Assignments(a)) = message.message else {
            continue;
        };
        seen.assignments_received.fetch_add(1, Ordering::Relaxed);
        let now = a.assignments.iter().map(|x| x.revision).max().unwrap_or(0);
        if now != revision {
            let mut at = seen
                .at_revision
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if revision > 0
                && let Some(n) = at.get_mut(&revision)
            {
                *n -= 1;
            }
            *at.entry(now).or_default() += 1;
            revision = now;
        }
        tx.send(fpb::ConnectRequest {
            message: Some(fpb::connect_request::Message::Report(report_for(&a))),
        })
        .await?;
    }
    Ok(())
}

fn deployment(revision_tag: &str) -> fpb::Deployment {
    fpb::Deployment {
        name: "scale".into(),
        models: vec![fpb::DeploymentModel {
            spec: Some(pb::ModelSpec {
                id: "smol".into(),
                display_name: revision_tag.into(),
                format: pb::ModelFormat::Gguf as i32,
                files: vec![pb::ModelFile {
                    name: "smol.gguf".into(),
                    urls: vec!["http://origin.invalid/smol.gguf".into()],
                    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
                        .into(),
                    size_bytes: 98_362_432,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            state: fpb::WantedState::Loaded as i32,
            load_options: Some(pb::LoadOptions {
                context_length: 512,
                ..Default::default()
            }),
            ..Default::default()
        }],
        selector: Some(fpb::Selector {
            labels: [("tier".to_owned(), "edge".to_owned())].into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Waits until `check` holds, polling; the elapsed time since `from`.
async fn until(
    what: &str,
    from: Instant,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<f64> {
    loop {
        if check().await? {
            return Ok(from.elapsed().as_secs_f64());
        }
        anyhow::ensure!(from.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let seen = Arc::new(Seen::default());
    let timeout = Duration::from_secs(args.timeout);
    let endpoint = Endpoint::from_shared(args.controller.clone())?
        .http2_keep_alive_interval(Duration::from_secs(30))
        .tcp_nodelay(true);
    let connections = args.devices.div_ceil(args.per_connection.max(1));
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(
            endpoint
                .connect()
                .await
                .context("connecting to the controller")?,
        );
    }
    let started = Instant::now();
    for i in 0..args.devices {
        let channel = channels[i / args.per_connection.max(1)].clone();
        let seen = seen.clone();
        let site = format!("site-{}", i % args.sites.max(1));
        tokio::spawn(async move {
            if let Err(e) = device(channel, format!("sim-{i:05}"), site, seen).await {
                eprintln!("sim-{i:05}: {e:#}");
            }
        });
    }
    let n = args.devices;
    let connect_seconds = until("every device connected", started, timeout, async || {
        Ok(seen.connected.load(Ordering::SeqCst) >= n)
    })
    .await?;
    let mut fleet = fpb::fleet_service_client::FleetServiceClient::new(channels[0].clone())
        .max_decoding_message_size(usize::MAX);
    let mut phases = Vec::new();
    let strategy = fpb::RolloutStrategy {
        canary: Some(fpb::Canary {
            devices: 50,
            ..Default::default()
        }),
        max_unavailable: u32::try_from(n / 4).unwrap_or(u32::MAX).max(1),
        growth_factor: 10.0,
        ..Default::default()
    };
    // A new deployment, a change that reaches every device at once, and a change
    // rolled out in waves behind a canary of 50.
    for (tag, rollout) in [("v1", None), ("v2", None), ("v3", Some(strategy))] {
        let mut d = deployment(tag);
        d.rollout = rollout;
        let applied = Instant::now();
        let response = fleet
            .apply_deployment(fpb::ApplyDeploymentRequest {
                deployment: Some(d),
                dry_run: false,
            })
            .await?
            .into_inner();
        let apply_seconds = applied.elapsed().as_secs_f64();
        let revision = response.deployment.map_or(0, |d| d.generation);
        let delivered = until("every device assigned", applied, timeout, async || {
            let at = seen
                .at_revision
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Ok(at.get(&revision).copied().unwrap_or(0) >= n)
        })
        .await?;
        let converged = until("the deployment converged", applied, timeout, async || {
            let status = fleet
                .clone()
                .get_deployment_status(fpb::GetDeploymentStatusRequest {
                    name: "scale".into(),
                })
                .await?
                .into_inner();
            Ok(status
                .deployments
                .first()
                .is_some_and(|s| s.converged && s.devices.len() >= n))
        })
        .await?;
        phases.push(format!(
            "{{\"tag\":\"{tag}\",\"revision\":{revision},\"apply_seconds\":{apply_seconds:.3},\"all_assigned_seconds\":{delivered:.3},\"converged_seconds\":{converged:.3}}}"
        ));
    }
    println!(
        "{{\"devices\":{n},\"sites\":{},\"connections\":{connections},\"all_connected_seconds\":{connect_seconds:.3},\"assignments_received\":{},\"phases\":[{}]}}",
        args.sites,
        seen.assignments_received.load(Ordering::Relaxed),
        phases.join(",")
    );
    Ok(())
}
