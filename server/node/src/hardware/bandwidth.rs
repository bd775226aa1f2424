//! How fast this machine reads memory, measured once. Decoding a token reads every
//! weight of the model, so a model's bytes times its tokens per second, against this
//! figure, says how close a device runs to its limit.

use std::sync::OnceLock;

/// The scanned buffer, shared by the threads: twice the last-level cache, so every
/// pass reads memory rather than cache, within these bounds. One buffer for all
/// threads keeps the moment's memory the same on 2 cores and on 16 (it was 64 MiB
/// per thread, 128 MiB of the agent's peak here).
const MIN_BUFFER_BYTES: usize = 16 << 20;
const MAX_BUFFER_BYTES: usize = 64 << 20;
/// A pass takes a few ms; the best of many shrugs off a moment another process
/// (or, in a VM, another guest) took the memory bus. Three were not enough: two
/// fresh agents on one VM measured 17.7 and 8.0 GiB/s.
const PASSES: usize = 12;

static MEASURED: OnceLock<f64> = OnceLock::new();

/// Measures the read bandwidth with one thread per logical core, once per process.
/// Blocking: it takes a fraction of a second and at most 64 MiB for that time.
pub fn measure(threads: usize) -> f64 {
    *MEASURED.get_or_init(|| {
        let cache =
            last_level_cache_bytes(std::path::Path::new("/sys/devices/system/cpu/cpu0/cache"));
        scan(threads.max(1), buffer_bytes(cache))
    })
}

fn buffer_bytes(last_level_cache: Option<usize>) -> usize {
    last_level_cache
        .map_or(MAX_BUFFER_BYTES, |c| c.saturating_mul(2))
        .clamp(MIN_BUFFER_BYTES, MAX_BUFFER_BYTES)
}

/// The largest cache sysfs lists for the first CPU (`index*/size`, as "32768K").
/// `None` where there is no such directory (macOS, some containers).
fn last_level_cache_bytes(dir: &std::path::Path) -> Option<usize> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("size")).ok())
        .filter_map(|size| parse_cache_size(size.trim()))
        .max()
}

fn parse_cache_size(size: &str) -> Option<usize> {
    let (digits, unit) = match size.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => size.split_at(at),
        None => (size, ""),
    };
    let n: usize = digits.parse().ok()?;
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// Every thread scans its own slice of the buffer for a byte it does not hold (SIMD,
/// so the scan is bound by memory, not by the core); the best of a few passes counts.
fn scan(threads: usize, bytes: usize) -> f64 {
    // Written, not zeroed: untouched zero pages all map to one shared page, which
    // would be read from cache at many times the memory's speed.
    let buffer = vec![2u8; bytes];
    let slice = bytes.div_ceil(threads);
    super::best_rate(PASSES, || {
        std::thread::scope(|s| {
            for part in buffer.chunks(slice) {
                s.spawn(|| std::hint::black_box(memchr::memchr(1, std::hint::black_box(part))));
            }
        });
        #[allow(clippy::cast_precision_loss)]
        let scanned = bytes as f64;
        scanned
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_measurement_is_a_plausible_rate_and_is_kept() {
        let rate = super::measure(2);
        // Slower than 100 MB/s or faster than 10 TB/s is no real memory.
        assert!((1e8..1e13).contains(&rate), "{rate}");
        assert_eq!(super::measure(1), rate, "measured once per process");
    }

    #[test]
    fn the_buffer_is_twice_the_last_level_cache_within_bounds() {
        assert_eq!(super::parse_cache_size("32768K"), Some(32 << 20));
        assert_eq!(super::parse_cache_size("512K"), Some(512 << 10));
        assert_eq!(super::parse_cache_size("8M"), Some(8 << 20));
        assert_eq!(super::parse_cache_size("64"), Some(64));
        assert_eq!(super::parse_cache_size("lots"), None);
        assert_eq!(super::buffer_bytes(Some(12 << 20)), 24 << 20);
        assert_eq!(
            super::buffer_bytes(Some(512 << 10)),
            16 << 20,
            "at least 16 MiB"
        );
        assert_eq!(
            super::buffer_bytes(Some(256 << 20)),
            64 << 20,
            "at most 64 MiB"
        );
        assert_eq!(super::buffer_bytes(None), 64 << 20);
    }

    #[test]
    fn the_largest_cache_in_sysfs_is_the_last_level() {
        let dir = tempfile::tempdir().unwrap();
        for (index, size) in [("index0", "32K"), ("index2", "1024K"), ("index3", "32768K")] {
            std::fs::create_dir(dir.path().join(index)).unwrap();
            std::fs::write(dir.path().join(index).join("size"), format!("{size}\n")).unwrap();
        }
        assert_eq!(super::last_level_cache_bytes(dir.path()), Some(32 << 20));
        assert_eq!(
            super::last_level_cache_bytes(&dir.path().join("absent")),
            None
        );
    }
}
