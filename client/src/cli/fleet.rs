//! `modelctl fleet …`: the fleet controller's view: devices, deployments, placement and
//! where each model stands on each device.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use modelctl::Client;
use modelctl::fleet::v1 as fpb;
use modelctl::v1 as pb;

use super::Output;
use super::output::{bytes, json, short_enum, table};

#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Fleet controller address.
    #[arg(long, env = "MODELD_FLEET_ADDR", default_value = modelctl::DEFAULT_FLEET_ADDR)]
    pub fleet_addr: String,

    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Devices that have connected: class, site, labels, memory, runtimes, models.
    Devices,
    /// Create or replace a deployment from a YAML (or JSON) file, and print where it
    /// lands and which devices it cannot use, with the reason.
    Apply {
        file: PathBuf,
        /// Print the placement only; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Per device and model: pending, downloading (bytes), loading, ready, failed (why),
    /// unreachable (since when).
    Status { deployment: Option<String> },
    /// A deployment as stored, with its placement.
    Get { deployment: String },
    /// Delete a deployment: its models leave the devices (deleted there with prune).
    Delete { deployment: String },
    /// A deployment's rollout: status (wave, each device's gates, why it stopped),
    /// pause, resume, abort, rollback.
    Rollout {
        #[arg(value_enum)]
        action: RolloutAction,
        deployment: String,
    },
    /// Follow changes to deployments, devices and models; resumable by revision.
    Watch {
        /// Replay events after this revision first.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RolloutAction {
    Status,
    Pause,
    Resume,
    Abort,
    Rollback,
}

fn print_rollout(r: &fpb::Rollout) {
    let state = enum_name(
        fpb::RolloutState::try_from(r.state)
            .ok()
            .map(|s| s.as_str_name()),
        "ROLLOUT_STATE_",
    );
    outln!(
        "rollout of {}: revision {} → {}, {state}, wave {} of {}, {} failed",
        r.deployment,
        r.from_revision,
        r.to_revision,
        (r.wave + 1).min(r.waves),
        r.waves,
        r.failed_devices
    );
    if !r.reason.is_empty() {
        outln!("  {}", r.reason);
    }
    let mut t = table(&["DEVICE", "WAVE", "PHASE", "GATES", "SINCE"]);
    for d in &r.devices {
        let phase = enum_name(
            fpb::DeviceRolloutPhase::try_from(d.phase)
                .ok()
                .map(|p| p.as_str_name()),
            "DEVICE_ROLLOUT_PHASE_",
        );
        let mut gates: Vec<String> = d
            .gates
            .iter()
            .map(|g| {
                format!(
                    "{} {} {}: {}",
                    g.model_id,
                    g.gate,
                    if g.passed { "passed" } else { "FAILED" },
                    g.detail
                )
            })
            .collect();
        if !d.reason.is_empty() && gates.is_empty() {
            gates.push(d.reason.clone());
        }
        t.add_row(vec![
            d.device_id.clone(),
            if d.wave == 0 {
                "canary".to_owned()
            } else {
                d.wave.to_string()
            },
            phase,
            gates.join("\n"),
            time(d.since.as_ref()),
        ]);
    }
    outln!("{t}");
}

fn enum_name(name: Option<&str>, prefix: &str) -> String {
    name.map_or_else(|| "-".to_owned(), |n| short_enum(n, prefix))
}

fn phase_name(v: i32) -> String {
    enum_name(
        fpb::ModelPhase::try_from(v).ok().map(|p| p.as_str_name()),
        "MODEL_PHASE_",
    )
}

fn wanted_name(v: i32) -> String {
    enum_name(
        fpb::WantedState::try_from(v).ok().map(|p| p.as_str_name()),
        "WANTED_STATE_",
    )
}

fn state_name(v: i32) -> String {
    enum_name(
        pb::ModelState::try_from(v).ok().map(|p| p.as_str_name()),
        "MODEL_STATE_",
    )
}

fn time(t: Option<&modeld_proto::pbjson_types::Timestamp>) -> String {
    t.and_then(|t| u64::try_from(t.seconds).ok()).map_or_else(
        || "-".to_owned(),
        |secs| {
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        },
    )
}

pub async fn run(
    args: FleetArgs,
    tls: &modelctl::Tls,
    token: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let mut client = Client::connect_with_tls(&args.fleet_addr, tls)
        .await
        .context("the fleet controller (--fleet-addr, MODELD_FLEET_ADDR)")?;
    if let Some(token) = token {
        client = client.with_token(token)?;
    }
    let mut fleet = client.fleet();
    match args.command {
        FleetCommand::Devices => {
            let devices = fleet
                .list_devices(fpb::ListDevicesRequest {})
                .await?
                .into_inner();
            if output == Output::Json {
                return json(&devices);
            }
            let mut t = table(&[
                "DEVICE", "CLASS", "OS", "SITE", "LABELS", "BUDGET", "RUNTIMES", "MODELS", "SEEN",
            ]);
            for d in devices.devices {
                let caps = d.capabilities.clone().unwrap_or_default();
                let runtimes: Vec<String> = caps
                    .runtimes
                    .iter()
                    .filter(|r| r.unavailable_reason.is_empty())
                    .map(|r| super::output::runtime_name(r.runtime))
                    .collect();
                let models: Vec<String> = d
                    .models
                    .iter()
                    .map(|m| format!("{}:{}", m.model_id, state_name(m.state)))
                    .collect();
                let labels: Vec<String> =
                    d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let seen = if d.connected {
                    "connected".to_owned()
                } else {
                    format!("away since {}", time(d.disconnected_since.as_ref()))
                };
                t.add_row(vec![
                    d.id.clone(),
                    enum_name(
                        pb::DeviceClass::try_from(caps.device_class)
                            .ok()
                            .map(|c| c.as_str_name()),
                        "DEVICE_CLASS_",
                    ),
                    caps.os.clone(),
                    d.site.clone(),
                    labels.join(","),
                    format!(
                        "{} / {}",
                        bytes(caps.memory_budget_bytes),
                        bytes(caps.memory.map_or(0, |m| m.total_bytes))
                    ),
                    runtimes.join(","),
                    models.join(" "),
                    seen,
                ]);
            }
            outln!("{t}");
        }
        FleetCommand::Apply { file, dry_run } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let deployment = modelctl::deployment::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let response = fleet
                .apply_deployment(fpb::ApplyDeploymentRequest {
                    deployment: Some(deployment),
                    dry_run,
                })
                .await?
                .into_inner();
            if output == Output::Json {
                return json(&response);
            }
            let d = response.deployment.unwrap_or_default();
            let verb = match (dry_run, response.changed) {
                (true, _) => "would place",
                (false, true) => "applied",
                (false, false) => "unchanged",
            };
            outln!("deployment {} {verb} (generation {})", d.name, d.generation);
            print_placement(&response.placement.unwrap_or_default());
        }
        FleetCommand::Status { deployment } => {
            let response = fleet
                .get_deployment_status(fpb::GetDeploymentStatusRequest {
                    name: deployment.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if output == Output::Json {
                return json(&response);
            }
            for s in response.deployments {
                outln!(
                    "deployment {} (generation {}): {}",
                    s.name,
                    s.generation,
                    if s.converged {
                        "converged"
                    } else {
                        "converging"
                    }
                );
                if !s.warning.is_empty() {
                    outln!("  {}", s.warning);
                }
                let mut t = table(&["DEVICE", "MODEL", "WANTED", "PHASE", "DETAIL"]);
                for d in &s.devices {
                    let phase = fpb::ModelPhase::try_from(d.phase).unwrap_or_default();
                    let detail = match phase {
                        fpb::ModelPhase::Downloading => {
                            format!("{} of {}", bytes(d.bytes_done), bytes(d.bytes_total))
                        }
                        fpb::ModelPhase::Unreachable => {
                            format!("since {}", time(d.since.as_ref()))
                        }
                        _ => d.error.clone(),
                    };
                    t.add_row(vec![
                        d.device_id.clone(),
                        d.model_id.clone(),
                        wanted_name(d.wanted),
                        phase_name(d.phase),
                        detail,
                    ]);
                }
                for u in &s.unplaced {
                    t.add_row(vec![
                        u.device_id.clone(),
                        u.model_id.clone(),
                        "-".into(),
                        "not placed".into(),
                        u.reason.clone(),
                    ]);
                }
                outln!("{t}");
            }
        }
        FleetCommand::Get { deployment } => {
            let response = fleet
                .get_deployment(fpb::GetDeploymentRequest { name: deployment })
                .await?
                .into_inner();
            if output == Output::Json {
                return json(&response);
            }
            let d = response.deployment.clone().unwrap_or_default();
            out!("{}", serde_yaml_ng::to_string(&d)?);
            print_placement(&response.placement.unwrap_or_default());
        }
        FleetCommand::Delete { deployment } => {
            fleet
                .delete_deployment(fpb::DeleteDeploymentRequest {
                    name: deployment.clone(),
                })
                .await?;
            if output == Output::Json {
                return json(&serde_json::json!({}));
            }
            outln!("deployment {deployment} deleted");
        }
        FleetCommand::Rollout { action, deployment } => {
            let rollout = match action {
                RolloutAction::Status => {
                    fleet
                        .get_rollout(fpb::GetRolloutRequest { deployment })
                        .await?
                        .into_inner()
                        .rollout
                }
                RolloutAction::Pause => {
                    fleet
                        .pause_rollout(fpb::PauseRolloutRequest { deployment })
                        .await?
                        .into_inner()
                        .rollout
                }
                RolloutAction::Resume => {
                    fleet
                        .resume_rollout(fpb::ResumeRolloutRequest { deployment })
                        .await?
                        .into_inner()
                        .rollout
                }
                RolloutAction::Abort => {
                    fleet
                        .abort_rollout(fpb::AbortRolloutRequest { deployment })
                        .await?
                        .into_inner()
                        .rollout
                }
                RolloutAction::Rollback => {
                    fleet
                        .rollback_rollout(fpb::RollbackRolloutRequest { deployment })
                        .await?
                        .into_inner()
                        .rollout
                }
            }
            .unwrap_or_default();
            if output == Output::Json {
                return json(&rollout);
            }
            print_rollout(&rollout);
        }
        FleetCommand::Watch { since } => {
            let mut stream = fleet
                .watch(fpb::WatchRequest {
                    since_revision: since,
                })
                .await?
                .into_inner();
            while let Some(event) = stream.message().await? {
                if output == Output::Json {
                    outln!("{}", serde_json::to_string(&event)?);
                    continue;
                }
                let kind = enum_name(
                    fpb::EventKind::try_from(event.kind)
                        .ok()
                        .map(|k| k.as_str_name()),
                    "EVENT_KIND_",
                );
                let detail = event.status.as_ref().map_or_else(String::new, |s| {
                    format!("{} {}", s.model_id, phase_name(s.phase))
                });
                outln!(
                    "{:>6} {} {kind} {} {} {detail}",
                    event.revision,
                    time(event.time.as_ref()),
                    event.deployment,
                    event.device_id
                );
            }
        }
    }
    Ok(())
}

fn print_placement(p: &fpb::PlacementResult) {
    outln!(
        "{} of {} matching device(s) placed: {}",
        p.device_ids.len(),
        p.matching_devices,
        if p.device_ids.is_empty() {
            "-".to_owned()
        } else {
            p.device_ids.join(", ")
        }
    );
    if !p.warning.is_empty() {
        outln!("warning: {}", p.warning);
    }
    for u in &p.unplaced {
        let model = if u.model_id.is_empty() {
            String::new()
        } else {
            format!(" ({})", u.model_id)
        };
        outln!("not placed on {}{model}: {}", u.device_id, u.reason);
    }
}
