//! How fast this machine multiplies matrices, measured once. A prompt is processed
//! as matrix products over every weight, so its tokens per second follow this rate
//! the way decoding follows the memory's bandwidth.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ndarray::Array2;

/// Side of the square f32 matrices each thread multiplies: three of them fit in a
/// core's L2 cache, so the product is bound by arithmetic, not by memory.
const SIDE: usize = 256;
/// How long each thread multiplies per pass; the best of a few passes counts.
const PASS: Duration = Duration::from_millis(30);
const PASSES: usize = 6;

static MEASURED: OnceLock<f64> = OnceLock::new();

/// Measures the rate with one thread per logical core, once per process. Blocking:
/// it keeps every core busy for about a fifth of a second.
pub fn measure(threads: usize) -> f64 {
    *MEASURED.get_or_init(|| multiply(threads.max(1)))
}

/// Every thread multiplies its own pair of matrices as often as a pass allows
/// (ndarray's kernels pick the CPU's vector instructions at run time).
fn multiply(threads: usize) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let lhs = Array2::from_shape_fn((SIDE, SIDE), |(i, j)| ((i * 7 + j) % 13) as f32 * 0.01);
    let rhs = lhs.t().to_owned();
    #[allow(clippy::cast_precision_loss)]
    let per_product = 2.0 * (SIDE * SIDE * SIDE) as f64;
    super::best_rate(PASSES, || {
        let started = Instant::now();
        let products: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut done = 0usize;
                        while started.elapsed() < PASS {
                            std::hint::black_box(lhs.dot(std::hint::black_box(&rhs)));
                            done += 1;
                        }
                        done
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
        });
        #[allow(clippy::cast_precision_loss)]
        let flops = products as f64 * per_product;
        flops
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_measurement_is_a_plausible_rate_and_is_kept() {
        let rate = super::measure(2);
        // Below 100 MFLOP/s or above 100 TFLOP/s is no CPU.
        assert!((1e8..1e14).contains(&rate), "{rate}");
        assert_eq!(super::measure(1), rate, "measured once per process");
    }
}
