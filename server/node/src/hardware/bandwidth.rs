//! How fast this machine reads memory, measured once. Decoding a token reads every
//! weight of the model, so a model's bytes times its tokens per second, against this
//! figure, says how close a device runs to its limit.

use std::sync::OnceLock;

/// Bytes each thread scans per pass: far beyond any cache here, small enough for a
/// phone to spare for a moment.
const BUFFER_BYTES: usize = 64 << 20;
/// A pass takes about 10 ms; the best of many shrugs off a moment another process
/// (or, in a VM, another guest) took the memory bus. Three were not enough: two
/// fresh agents on one VM measured 17.7 and 8.0 GiB/s.
const PASSES: usize = 12;

static MEASURED: OnceLock<f64> = OnceLock::new();

/// Measures the read bandwidth with one thread per logical core, once per process.
/// Blocking: it takes a fraction of a second and `threads × 64 MiB` for that time.
pub fn measure(threads: usize) -> f64 {
    *MEASURED.get_or_init(|| scan(threads.max(1)))
}

/// Every thread scans its own buffer for a byte it does not hold (SIMD, so the scan
/// is bound by memory, not by the core); the best of a few passes counts.
fn scan(threads: usize) -> f64 {
    // Written, not zeroed: untouched zero pages all map to one shared page, which
    // would be read from cache at many times the memory's speed.
    let buffers: Vec<Vec<u8>> = (0..threads).map(|_| vec![2u8; BUFFER_BYTES]).collect();
    super::best_rate(PASSES, || {
        std::thread::scope(|s| {
            for buffer in &buffers {
                s.spawn(|| std::hint::black_box(memchr::memchr(1, std::hint::black_box(buffer))));
            }
        });
        #[allow(clippy::cast_precision_loss)]
        let bytes = (BUFFER_BYTES * threads) as f64;
        bytes
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
}
