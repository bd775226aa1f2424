//! How an engine process ended, in words an operator can act on.

use std::process::ExitStatus;

/// "was killed by signal 9 (SIGKILL: out of memory, or killed by hand)".
pub fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(signal) = status.signal() {
            let dumped = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            return format!(
                "was killed by signal {signal} ({}{dumped})",
                signal_meaning(signal)
            );
        }
    }
    match status.code() {
        Some(0) => "exited".into(),
        // Rust's exit status after a panic; the message is in the agent's log.
        Some(101) => "exited with status 101 (a panic in the engine; see the log)".into(),
        Some(code) => format!("exited with status {code}"),
        None => "ended".into(),
    }
}

/// The signal's name and its usual cause for an engine.
fn signal_meaning(signal: i32) -> String {
    let (name, cause) = match signal {
        4 => ("SIGILL", "an instruction this CPU lacks"),
        6 => ("SIGABRT", "the runtime aborted"),
        7 => (
            "SIGBUS",
            "a bad memory access, or a model file cut short under it",
        ),
        8 => ("SIGFPE", "an arithmetic fault in the runtime"),
        9 => ("SIGKILL", "out of memory, or killed by hand"),
        11 => ("SIGSEGV", "a memory fault in the runtime"),
        15 => ("SIGTERM", "asked to stop from outside the agent"),
        24 => ("SIGXCPU", "over its CPU limit"),
        _ => return format!("signal {signal}"),
    };
    format!("{name}: {cause}")
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use modeld_engine_core::signal_name;

    use super::*;

    #[test]
    fn signals_and_codes_read_as_causes() {
        let killed = describe(ExitStatus::from_raw(9));
        assert_eq!(
            killed,
            "was killed by signal 9 (SIGKILL: out of memory, or killed by hand)"
        );
        assert_eq!(signal_name(&killed), Some("SIGKILL"));
        assert!(describe(ExitStatus::from_raw(11)).contains("SIGSEGV"));
        // A wait status of code 3 is 3 << 8.
        assert_eq!(
            describe(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(signal_name("exited with status 3"), None);
    }
}
