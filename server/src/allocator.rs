//! The C allocator's settings for an agent that lives beside its models on small devices.

/// Arenas the C allocator may keep. glibc gives each thread that meets contention an
/// arena of its own, up to 8 per core, and keeps their freed memory: after a load and
/// one stream's generations the agent held 19–23 MiB of anonymous memory with glibc's
/// limit on 2 cores, 8–11 MiB with two arenas, at the same speed (bench/generate.sh
/// counts the agent's memory against llama-bench's whole process). The agent's
/// threads mostly wait on I/O, so two arenas cost it no measurable contention; its engine processes, the same binary, allocate their runtimes' large
/// buffers by mapping them, outside the arenas.
const MALLOC_ARENAS: i32 = 2;

/// Applies [`MALLOC_ARENAS`] unless the operator chose a count with glibc's own
/// variables; called first in `main`, before any other thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !arenas_set_by_operator(
        std::env::var_os("MALLOC_ARENA_MAX").is_some(),
        std::env::var("GLIBC_TUNABLES").ok().as_deref(),
    ) {
        #[allow(unsafe_code)]
        // SAFETY: mallopt only sets an allocator tunable; no pointer is involved, and
        // no other thread is allocating yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// Whether `MALLOC_ARENA_MAX` or the `glibc.malloc.arena_max` tunable is set: glibc
/// has applied it already, and a `mallopt` would silently override it.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn arenas_set_by_operator(arena_max_variable: bool, tunables: Option<&str>) -> bool {
    arena_max_variable
        || tunables.is_some_and(|t| {
            t.split(':')
                .any(|setting| setting.starts_with("glibc.malloc.arena_max="))
        })
}

#[cfg(test)]
mod tests {
    use super::arenas_set_by_operator;

    #[test]
    fn an_operators_arena_count_is_left_as_glibc_applied_it() {
        assert!(!arenas_set_by_operator(false, None));
        assert!(arenas_set_by_operator(true, None));
        assert!(arenas_set_by_operator(
            false,
            Some("glibc.malloc.trim_threshold=128:glibc.malloc.arena_max=4")
        ));
        assert!(!arenas_set_by_operator(
            false,
            Some("glibc.malloc.arena_test=2:glibc.malloc.tcache_count=0")
        ));
    }
}
