//! Between `modeld.fleet.v1` messages and the node's fleet types.

use std::sync::Arc;

use modeld_node::Node;
use std::time::Duration;

use modeld_node::fleet::{
    Assignment, Assignments, GateReport, GateResult, GateState, Gates, ModelReport, Report,
    SmokeTest, SwapPolicy, Wanted,
};
use modeld_proto::fleet::v1 as fpb;

use crate::api::{convert, validate};

/// Most peers one assignment may name.
const MAX_PEERS: usize = 16;

/// Checks the controller's assignments as strictly as the public RPCs check a
/// RegisterModel and a Load: a bad one is refused whole, and the node keeps the
/// assignments it had.
pub fn assignments_from_pb(p: fpb::Assignments) -> modeld_node::Result<Assignments> {
    let mut items = Vec::with_capacity(p.assignments.len());
    for (i, a) in p.assignments.into_iter().enumerate() {
        let field = format!("assignments[{i}]");
        let spec = a
            .spec
            .ok_or_else(|| modeld_node::Error::invalid(format!("{field}.spec"), "is required"))?;
        let spec = convert::spec_from_pb(spec, &format!("{field}.spec"))?
            .validate(&format!("{field}.spec"))?;
        let wanted = match fpb::WantedState::try_from(a.state) {
            Ok(fpb::WantedState::Stored) => Wanted::Stored,
            Ok(fpb::WantedState::Loaded) => Wanted::Loaded,
            Ok(fpb::WantedState::Pinned) => Wanted::Pinned,
            _ => {
                return Err(modeld_node::Error::invalid(
                    format!("{field}.state"),
                    format!("{} is not a wanted state", a.state),
                ));
            }
        };
        let load = validate::load_request(a.load_options)?;
        let retain = a
            .retain
            .map(|r| {
                convert::spec_from_pb(r, &format!("{field}.retain"))?
                    .validate(&format!("{field}.retain"))
            })
            .transpose()?;
        if a.peers.len() > MAX_PEERS {
            return Err(modeld_node::Error::invalid(
                format!("{field}.peers"),
                format!("{} peers; the limit is {MAX_PEERS}", a.peers.len()),
            ));
        }
        for (j, peer) in a.peers.iter().enumerate() {
            let url = format!("modeld://{peer}");
            let parsed = url::Url::parse(&url).ok();
            let plain = parsed.as_ref().is_some_and(|u| {
                u.host_str().is_some() && u.path().is_empty() && u.username().is_empty()
            });
            if !plain {
                return Err(modeld_node::Error::invalid(
                    format!("{field}.peers[{j}]"),
                    format!("{peer:?} is not a host:port"),
                ));
            }
        }
        items.push(Assignment {
            deployment: a.deployment,
            spec,
            wanted,
            load,
            prune: a.prune,
            revision: a.revision,
            gates: a.gates.map(gates_from_pb),
            retain,
            swap: if a.swap == fpb::SwapPolicy::SkipDevice as i32 {
                SwapPolicy::SkipDevice
            } else {
                SwapPolicy::AllowGap
            },
            peers: a.peers,
            wait_for_peer: a.wait_for_peer,
        });
    }
    Ok(Assignments {
        generation: p.generation,
        items,
        origin_bytes_per_second: Some(p.origin_bytes_per_second).filter(|b| *b > 0),
    })
}

/// Defaults as the protocol states them (0 = 600 s to be ready, 32 tokens).
pub fn gates_from_pb(g: fpb::Gates) -> Gates {
    Gates {
        ready_within: Duration::from_secs(match g.ready_within_seconds {
            0 => 600,
            s => u64::from(s),
        }),
        smoke_tests: g
            .smoke_tests
            .into_iter()
            .map(|t| SmokeTest {
                model_id: t.model_id,
                prompt: t.prompt,
                max_tokens: t.max_tokens,
                contains: Some(t.contains).filter(|s| !s.is_empty()),
                equals: Some(t.equals).filter(|s| !s.is_empty()),
                matches: Some(t.matches).filter(|s| !s.is_empty()),
                json: t.json,
            })
            .collect(),
        max_slowdown: g.max_slowdown,
        soak: Duration::from_secs(u64::from(g.soak_seconds)),
        max_error_rate: g.max_error_rate,
    }
}

fn gate_state_to_pb(s: GateState) -> fpb::GateState {
    match s {
        GateState::Running => fpb::GateState::Running,
        GateState::Passed => fpb::GateState::Passed,
        GateState::Failed => fpb::GateState::Failed,
        GateState::Skipped => fpb::GateState::Skipped,
    }
}

fn gate_result_to_pb(r: &GateResult) -> fpb::GateResult {
    fpb::GateResult {
        model_id: r.model_id.clone(),
        gate: r.gate.clone(),
        passed: r.passed,
        detail: r.detail.clone(),
    }
}

fn gate_report_to_pb(r: &GateReport) -> fpb::GateReport {
    fpb::GateReport {
        revision: r.revision,
        state: gate_state_to_pb(r.state) as i32,
        results: r.results.iter().map(gate_result_to_pb).collect(),
    }
}

pub fn report_to_pb(r: &Report) -> fpb::Report {
    fpb::Report {
        models: r.models.iter().map(model_report_to_pb).collect(),
        applied_generation: r.applied_generation,
        disk_free_bytes: r.disk_free_bytes,
    }
}

fn model_report_to_pb(m: &ModelReport) -> fpb::ModelReport {
    fpb::ModelReport {
        model_id: m.model_id.clone(),
        state: convert::state_to_pb(m.state) as i32,
        deployment: m.deployment.clone(),
        bytes_done: m.bytes_done,
        bytes_total: m.bytes_total,
        error: m.error.clone(),
        memory_bytes: m.memory_bytes,
        revision: m.revision,
        gates: m.gates.as_ref().map(gate_report_to_pb),
    }
}

/// The speeds this node measured, with the size of the model each was measured on.
pub fn measurements(node: &Arc<Node>) -> modeld_node::Result<Vec<fpb::Measurement>> {
    Ok(node
        .store
        .benchmarks()?
        .into_iter()
        .map(|b| fpb::Measurement {
            format: b
                .format
                .parse()
                .map_or(0, |f| convert::format_to_pb(f) as i32),
            runtime: b
                .runtime
                .parse()
                .map_or(0, |r| convert::runtime_to_pb(r) as i32),
            model_bytes: node
                .registry
                .get(&b.model_id)
                .map_or(0, |e| e.spec.total_size()),
            model_id: b.model_id,
            prompt_tokens_per_second: b.prompt_tokens_per_second,
            generation_tokens_per_second: b.generation_tokens_per_second,
            peak_memory_bytes: b.peak_memory_bytes,
            time: Some(convert::timestamp(modeld_node::store::from_unix_ms(
                b.time_unix_ms,
            ))),
        })
        .collect())
}
