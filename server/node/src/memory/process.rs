//! What an engine process really holds, read from the operating system rather than
//! estimated: resident memory, and proportional memory where pages (mapped weights)
//! are shared with other processes, so two loads of one file are not counted twice.

/// One process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub resident_bytes: u64,
    /// Resident memory with each shared page split among its sharers (Linux PSS).
    pub proportional_bytes: Option<u64>,
    /// False when the figure is the engine's own report, not a measurement.
    pub measured: bool,
}

impl Measured {
    /// The figure the memory manager counts: proportional where known.
    pub fn charged_bytes(&self) -> u64 {
        self.proportional_bytes.unwrap_or(self.resident_bytes)
    }
}

/// `None` when the process is gone or the platform has no way to ask.
pub fn measure(pid: u32) -> Option<Measured> {
    #[cfg(target_os = "linux")]
    {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        parse_rollup(&rollup)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
}

/// Reads `Rss:` and `Pss:` (in kB) from `/proc/PID/smaps_rollup`.
pub fn parse_rollup(text: &str) -> Option<Measured> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.trim();
            let kb: u64 = rest.strip_suffix("kB")?.trim().parse().ok()?;
            Some(kb.saturating_mul(1024))
        })
    };
    Some(Measured {
        resident_bytes: field("Rss:")?,
        proportional_bytes: field("Pss:"),
        measured: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_fields_are_read_in_bytes() {
        let text = "55d0c0a5e000-7ffd4b7f4000 ---p 00000000 00:00 0  [rollup]\n\
                    Rss:              204800 kB\n\
                    Pss:              150000 kB\n\
                    Pss_Anon:          50000 kB\n";
        let m = parse_rollup(text).unwrap();
        assert_eq!(m.resident_bytes, 204_800 * 1024);
        assert_eq!(m.proportional_bytes, Some(150_000 * 1024));
        assert_eq!(m.charged_bytes(), 150_000 * 1024);
        assert!(parse_rollup("nothing here").is_none());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_measures_something() {
        let m = measure(std::process::id()).unwrap();
        assert!(m.resident_bytes > 0 && m.proportional_bytes.is_some());
    }
}
