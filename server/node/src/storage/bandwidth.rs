//! The bandwidth origin downloads may take on this device, all transfers together:
//! an edge uplink is small, and a fleet's sites share theirs. The limit is the lower of
//! the agent's own (`--origin-rate-limit`) and the share of its site's limit the fleet
//! controller last gave it. Peers of the site (`modeld://`) and local files are not
//! limited: they do not cross the uplink. Serving blobs to peers has a limit of its own
//! (`--serve-rate-limit`), so a device seeding its site keeps bandwidth for its own work.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Bytes per cell of the token bucket: rates are kept in KiB/s.
const CELL: u64 = 1024;
/// The bucket holds this share of a second's bytes, so a burst after an idle spell
/// stays short.
const BURST_DIVISOR: u32 = 4;

/// A token bucket of bytes per second.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_second: u64,
    limiter: DefaultDirectRateLimiter,
}

impl Throttle {
    pub fn new(bytes_per_second: u64) -> Throttle {
        let per_second = u32::try_from((bytes_per_second / CELL).max(1)).unwrap_or(u32::MAX);
        let burst = (per_second / BURST_DIVISOR).max(64);
        let quota = Quota::per_second(NonZeroU32::MIN.saturating_add(per_second - 1))
            .allow_burst(NonZeroU32::MIN.saturating_add(burst - 1));
        Throttle {
            bytes_per_second,
            limiter: RateLimiter::direct(quota),
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// Waits until `bytes` more may pass.
    pub async fn take(&self, bytes: u64) {
        let mut cells = bytes.div_ceil(CELL);
        while cells > 0 {
            let mut step = u32::try_from(cells).unwrap_or(u32::MAX);
            loop {
                let Some(n) = NonZeroU32::new(step) else {
                    return;
                };
                match self.limiter.until_n_ready(n).await {
                    Ok(()) => break,
                    // More than the bucket holds at once: take it in smaller steps.
                    Err(_) => step = (step / 2).max(1),
                }
            }
            cells -= u64::from(step);
        }
    }
}

#[derive(Debug, Default)]
struct Limits {
    local: Option<u64>,
    site: Option<u64>,
    /// The bucket for the lower of the two.
    bucket: Option<Arc<Throttle>>,
}

/// Shared by every transfer of the agent.
#[derive(Debug, Default)]
pub struct OriginLimit {
    limits: Mutex<Limits>,
}

impl OriginLimit {
    /// `local` bytes per second; `None` = no limit of the agent's own.
    pub fn new(local: Option<u64>) -> OriginLimit {
        let limit = OriginLimit::default();
        limit.update(|l| l.local = local.filter(|b| *b > 0));
        limit
    }

    fn update(&self, change: impl FnOnce(&mut Limits)) {
        let mut limits = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut limits);
        let wanted = match (limits.local, limits.site) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let current = limits.bucket.as_ref().map(|t| t.bytes_per_second());
        if wanted != current {
            limits.bucket = wanted.map(|rate| Arc::new(Throttle::new(rate)));
        }
    }

    /// The share of its site's limit the controller gave this device; `None` = none.
    pub fn set_site_share(&self, bytes_per_second: Option<u64>) {
        self.update(|l| l.site = bytes_per_second.filter(|b| *b > 0));
    }

    /// Bytes per second origin downloads may take now; `None` = unlimited.
    pub fn bytes_per_second(&self) -> Option<u64> {
        self.limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bucket
            .as_ref()
            .map(|t| t.bytes_per_second())
    }

    /// Waits until `bytes` more may pass.
    pub async fn take(&self, bytes: u64) {
        let bucket = self
            .limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bucket
            .clone();
        if let Some(bucket) = bucket {
            bucket.take(bytes).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lower_of_the_two_limits_applies() {
        let limit = OriginLimit::new(Some(10 << 20));
        assert_eq!(limit.bytes_per_second(), Some(10 << 20));
        limit.set_site_share(Some(4 << 20));
        assert_eq!(limit.bytes_per_second(), Some(4 << 20));
        limit.set_site_share(Some(40 << 20));
        assert_eq!(limit.bytes_per_second(), Some(10 << 20));
        limit.set_site_share(None);
        assert_eq!(limit.bytes_per_second(), Some(10 << 20));
        assert_eq!(OriginLimit::new(None).bytes_per_second(), None);
        assert_eq!(OriginLimit::new(Some(0)).bytes_per_second(), None);
    }
}
