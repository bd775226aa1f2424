//! Transfer progress as the agent tracks it, and the rate/ETA estimate.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Queued,
    Connecting,
    Downloading,
    Verifying,
    Extracting,
    Done,
    Paused,
    Failed,
    Cancelled,
}

impl Stage {
    pub fn is_final(self) -> bool {
        matches!(self, Stage::Done | Stage::Failed | Stage::Cancelled)
    }
}

#[derive(Debug, Clone)]
pub struct FileProgress {
    pub name: String,
    pub sha256: String,
    pub stage: Stage,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub attempt: u32,
    pub source_url: String,
    pub error: String,
}

#[derive(Debug, Clone)]
pub struct TransferProgress {
    pub id: String,
    pub model_id: String,
    pub stage: Stage,
    pub files: Vec<FileProgress>,
    pub start_time: SystemTime,
    /// Set when the transfer failed or was cancelled; shared by every watcher.
    pub error: Option<Arc<Error>>,
}

impl TransferProgress {
    pub fn bytes_done(&self) -> u64 {
        self.files.iter().map(|f| f.bytes_done).sum()
    }

    pub fn bytes_total(&self) -> u64 {
        self.files.iter().map(|f| f.bytes_total).sum()
    }

    pub fn bytes_per_second(&self) -> f64 {
        self.files.iter().map(|f| f.bytes_per_second).sum()
    }

    pub fn eta_seconds(&self) -> Option<f64> {
        let rate = self.bytes_per_second();
        let left = self.bytes_total().saturating_sub(self.bytes_done());
        if left == 0 {
            Some(0.0)
        } else if rate > 0.0 {
            #[allow(clippy::cast_precision_loss)]
            Some(left as f64 / rate)
        } else {
            None
        }
    }
}

/// A smoothed transfer rate: an exponentially weighted average of per-window rates, so
/// one slow chunk does not swing the ETA.
#[derive(Debug)]
pub struct RateMeter {
    window_start: Instant,
    window_bytes: u64,
    rate: f64,
}

impl Default for RateMeter {
    fn default() -> Self {
        RateMeter {
            window_start: Instant::now(),
            window_bytes: 0,
            rate: 0.0,
        }
    }
}

impl RateMeter {
    /// Adds `n` bytes; returns true when a window closed and the rate changed.
    pub fn add(&mut self, n: u64) -> bool {
        self.window_bytes += n;
        let elapsed = self.window_start.elapsed().as_secs_f64();
        if elapsed < 0.25 {
            return false;
        }
        #[allow(clippy::cast_precision_loss)]
        let current = self.window_bytes as f64 / elapsed;
        self.rate = if self.rate == 0.0 {
            current
        } else {
            0.7 * self.rate + 0.3 * current
        };
        self.window_start = Instant::now();
        self.window_bytes = 0;
        true
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }
}
