//! Printing: tables for people, proto3 JSON for scripts.
//!
//! Everything bound for stdout goes through `out!`/`outln!` rather than `print!`,
//! which panics when the reader has gone: `modelctl ... | head` must end as quietly
//! as any Unix tool does.

use std::io::Write as _;

use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use modeld_engine_core::{Accelerator, ModelFormat, Runtime};
use modeld_proto::v1 as pb;
use serde::Serialize;

/// `print!` that ends the command quietly when stdout's reader has gone.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::stdout(format_args!($($arg)*))
    };
}

/// `println!` that ends the command quietly when stdout's reader has gone.
macro_rules! outln {
    () => {
        $crate::cli::output::stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub fn stdout(args: std::fmt::Arguments<'_>) {
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(&e)
    }
}

/// Shows what was written so far (a token stream has no newline to flush it).
pub fn flush_stdout() {
    if let Err(e) = std::io::stdout().lock().flush() {
        stdout_failed(&e)
    }
}

/// A failed write to stdout ends the command: with success when the reader closed the
/// pipe (it has read what it wanted, as `head` does), with the error otherwise (a full
/// disk under a redirect).
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0)
    }
    eprintln!("error: writing to standard output: {e}");
    std::process::exit(1)
}

pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
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
