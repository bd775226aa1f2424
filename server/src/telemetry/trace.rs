//! Trace context: a caller's W3C `traceparent` continues into the agent's spans, and
//! log lines carry the trace id whether or not traces are exported. Spans whose
//! times are only known afterwards (a Generate's queue wait, prefill and decode,
//! measured partly inside the engine) are written with explicit timestamps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Set once traces are exported.
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub(super) fn exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

fn is_exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The caller's trace context from the request's headers (`traceparent`,
/// `tracestate`); empty when it sent none or an invalid one.
pub fn caller_context(headers: &tonic::codegen::http::HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&opentelemetry_http::HeaderExtractor(headers))
    })
}

/// Makes `span` continue the caller's trace and records its `trace_id` (and
/// `span_id` when exported) so every log line inside it names the trace.
pub fn adopt(span: &tracing::Span, caller: Context) {
    let caller_trace = caller.span().span_context().clone();
    if is_exporting() {
        if caller_trace.is_valid() {
            let _ = span.set_parent(caller);
        }
        let own = span.context().span().span_context().clone();
        if own.is_valid() {
            span.record("trace_id", own.trace_id().to_string().as_str());
            span.record("span_id", own.span_id().to_string().as_str());
            return;
        }
    }
    if caller_trace.is_valid() {
        span.record("trace_id", caller_trace.trace_id().to_string().as_str());
    }
}

/// When a Generate request's phases began and ended, as the agent saw them.
#[derive(Debug, Clone, Copy)]
pub struct GeneratePhases {
    /// Handed to the model's queue.
    pub submitted: SystemTime,
    /// The first token reached the agent; `None` when none did.
    pub first_token: Option<SystemTime>,
    /// The outcome reached the agent.
    pub done: SystemTime,
    /// The engine's own time from taking the request to its first token.
    pub time_to_first_token: Duration,
}

/// Writes `queue`, `prefill` and `decode` spans under `parent`. The engine measures
/// time to first token from when it took the request, so the queue wait is what
/// remains before it.
pub fn generate_phases(
    parent: &tracing::Span,
    phases: GeneratePhases,
    prompt_tokens: u32,
    generated_tokens: u32,
) {
    if !is_exporting() {
        return;
    }
    let cx = parent.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    let tracer = opentelemetry::global::tracer("modeld");
    let write = |name: &'static str, start: SystemTime, end: SystemTime, attrs: Vec<KeyValue>| {
        let mut span = tracer
            .span_builder(name)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(&tracer, &cx);
        span.end_with_timestamp(end.max(start));
    };
    let first = phases.first_token.unwrap_or(phases.done);
    let prefill_start = first
        .checked_sub(phases.time_to_first_token)
        .unwrap_or(phases.submitted)
        .max(phases.submitted);
    write("queue", phases.submitted, prefill_start, Vec::new());
    write(
        "prefill",
        prefill_start,
        first,
        vec![KeyValue::new(
            "gen_ai.usage.input_tokens",
            i64::from(prompt_tokens),
        )],
    );
    if phases.first_token.is_some() {
        write(
            "decode",
            first,
            phases.done,
            vec![KeyValue::new(
                "gen_ai.usage.output_tokens",
                i64::from(generated_tokens),
            )],
        );
    }
}
