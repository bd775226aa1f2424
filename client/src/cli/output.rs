//! Printing: tables for people, proto3 JSON for scripts.

use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use modeld_engine_core::{Accelerator, ModelFormat, Runtime};
use modeld_proto::v1 as pb;
use serde::Serialize;

pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

/// A two-column key/value table without a header row.
pub fn details() -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic);
    t
}

pub fn bytes(n: u64) -> String {
    if n == 0 {
        "-".to_owned()
    } else {
        bytesize::ByteSize::b(n).to_string()
    }
}

pub fn format_name(v: i32) -> String {
    pb::ModelFormat::try_from(v)
        .ok()
        .and_then(|f| ModelFormat::try_from(f).ok())
        .map_or_else(|| "-".to_owned(), |f| f.as_str().to_owned())
}

pub fn runtime_name(v: i32) -> String {
    pb::Runtime::try_from(v)
        .ok()
        .and_then(|r| Runtime::try_from(r).ok())
        .map_or_else(|| "-".to_owned(), |r| r.as_str().to_owned())
}

pub fn accelerator_name(v: i32) -> String {
    pb::Accelerator::try_from(v)
        .ok()
        .and_then(|a| Accelerator::try_from(a).ok())
        .map_or_else(|| "-".to_owned(), |a| a.as_str().to_owned())
}

/// Lower-case enum name without its prefix, e.g. MODEL_STATE_READY -> ready.
pub fn short_enum(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
        .replace('_', "-")
}

pub fn count(n: u64) -> String {
    match n {
        0 => "-".to_owned(),
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.0}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.0}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
