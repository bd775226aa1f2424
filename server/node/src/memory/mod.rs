//! The memory manager: admits a load only within the budget, evicting idle models in
//! least-recently-used order to make room; a pinned model, or one with requests in
//! flight, is never evicted. Keep-alive and OS memory pressure unload idle models in
//! the background (`inference::reaper`, which drives the unloads).

pub mod process;

use std::time::{Duration, SystemTime};

/// What the manager needs to know about one loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct Resident {
    pub model_id: String,
    pub bytes: u64,
    pub in_flight: usize,
    pub pinned: bool,
    pub last_used: SystemTime,
}

impl Resident {
    fn evictable(&self) -> bool {
        !self.pinned && self.in_flight == 0
    }
}

/// Why a load cannot fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    pub needed: u64,
    /// What the load could have: the budget minus what cannot be evicted.
    pub available: u64,
    pub budget: u64,
}

/// The models to evict (least recently used first) so `needed` more bytes fit the
/// budget, or the shortfall when even evicting every idle, unpinned model is not
/// enough.
pub fn make_room(
    needed: u64,
    budget: u64,
    resident: &[Resident],
) -> Result<Vec<String>, Shortfall> {
    let used: u64 = resident.iter().map(|r| r.bytes).sum();
    let kept: u64 = resident
        .iter()
        .filter(|r| !r.evictable())
        .map(|r| r.bytes)
        .sum();
    let available = budget.saturating_sub(kept);
    if needed > available {
        return Err(Shortfall {
            needed,
            available,
            budget,
        });
    }
    let mut candidates: Vec<&Resident> = resident.iter().filter(|r| r.evictable()).collect();
    candidates.sort_by_key(|r| r.last_used);
    let mut free = budget.saturating_sub(used);
    let mut evict = Vec::new();
    for r in candidates {
        if free >= needed {
            break;
        }
        free += r.bytes;
        evict.push(r.model_id.clone());
    }
    Ok(evict)
}

/// How long a model may sit idle before it unloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Unload as soon as nothing runs on it.
    UntilIdle,
    For(Duration),
    Forever,
}

impl KeepAlive {
    /// 0 = until idle, negative = forever, else that many seconds.
    pub fn from_secs(secs: i64) -> KeepAlive {
        match secs {
            0 => KeepAlive::UntilIdle,
            s if s < 0 => KeepAlive::Forever,
            s => KeepAlive::For(Duration::from_secs(s.unsigned_abs())),
        }
    }

    /// The moment an idle model expires, `None` for never.
    pub fn expires(self, last_used: SystemTime) -> Option<SystemTime> {
        match self {
            KeepAlive::UntilIdle => Some(last_used),
            KeepAlive::For(d) => last_used.checked_add(d),
            KeepAlive::Forever => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, mb: u64, age_s: u64, in_flight: usize, pinned: bool) -> Resident {
        Resident {
            model_id: id.into(),
            bytes: mb << 20,
            in_flight,
            pinned,
            last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(1000 - age_s),
        }
    }

    #[test]
    fn evicts_least_recently_used_idle_models_until_the_load_fits() {
        let resident = [
            r("new", 100, 1, 0, false),
            r("old", 100, 50, 0, false),
            r("older", 100, 90, 0, false),
        ];
        // 400 MB budget, 300 used: 150 needs one eviction, the oldest.
        assert_eq!(
            make_room(150 << 20, 400 << 20, &resident),
            Ok(vec!["older".into()])
        );
        assert_eq!(
            make_room(250 << 20, 400 << 20, &resident),
            Ok(vec!["older".into(), "old".into()])
        );
        assert_eq!(make_room(100 << 20, 400 << 20, &resident), Ok(vec![]));
    }

    #[test]
    fn pinned_and_busy_models_stay_and_the_shortfall_names_the_numbers() {
        let resident = [r("pinned", 100, 90, 0, true), r("busy", 100, 80, 2, false)];
        let err = make_room(250 << 20, 400 << 20, &resident).unwrap_err();
        assert_eq!(
            err,
            Shortfall {
                needed: 250 << 20,
                available: 200 << 20,
                budget: 400 << 20
            }
        );
        assert_eq!(make_room(200 << 20, 400 << 20, &resident), Ok(vec![]));
    }

    #[test]
    fn keep_alive_expiry() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(KeepAlive::UntilIdle.expires(t), Some(t));
        assert_eq!(
            KeepAlive::For(Duration::from_secs(5)).expires(t),
            Some(t + Duration::from_secs(5))
        );
        assert_eq!(KeepAlive::Forever.expires(t), None);
    }
}
