//! Which blobs a transfer of this process is fetching now. Two models may list the
//! same bytes (a deployment's model and its alias, a revision staged beside the one it
//! replaces): the second transfer waits for the first to store the blob instead of
//! fetching it again, so a device, and through it a site, downloads each blob once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The blobs being fetched, by digest. A waiter holds a receiver; the fetcher's claim
/// holds the sender, and dropping it (done, failed, paused or cancelled) wakes them.
#[derive(Default)]
pub(super) struct BlobClaims {
    fetching: Arc<Mutex<HashMap<String, watch::Sender<()>>>>,
}

/// This transfer fetches the blob; released when dropped.
pub(super) struct BlobClaim {
    fetching: Arc<Mutex<HashMap<String, watch::Sender<()>>>>,
    sha256: String,
}

/// Another transfer fetches the blob; `released` returns when it stops.
pub(super) struct Fetcher {
    rx: watch::Receiver<()>,
}

impl Fetcher {
    pub(super) async fn released(mut self) {
        // Nothing is ever sent: the only event is the sender going away.
        while self.rx.changed().await.is_ok() {}
    }
}

impl BlobClaims {
    fn lock(
        fetching: &Mutex<HashMap<String, watch::Sender<()>>>,
    ) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        // The map holds no invariant a panicking holder could break half-way.
        fetching.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the blob for the caller, or names the transfer already fetching it.
    pub(super) fn claim(&self, sha256: &str) -> Result<BlobClaim, Fetcher> {
        let mut map = Self::lock(&self.fetching);
        if let Some(tx) = map.get(sha256) {
            return Err(Fetcher { rx: tx.subscribe() });
        }
        map.insert(sha256.to_owned(), watch::channel(()).0);
        Ok(BlobClaim {
            fetching: self.fetching.clone(),
            sha256: sha256.to_owned(),
        })
    }
}

impl Drop for BlobClaim {
    fn drop(&mut self) {
        BlobClaims::lock(&self.fetching).remove(&self.sha256);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_waits_for_the_first_to_end() {
        let claims = BlobClaims::default();
        let first = claims.claim("aa").ok().unwrap();
        let Err(fetcher) = claims.claim("aa") else {
            panic!("a blob being fetched was claimed twice");
        };
        assert!(claims.claim("bb").is_ok(), "other blobs stay free");
        let waiting = tokio::spawn(fetcher.released());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        waiting.await.unwrap();
        assert!(claims.claim("aa").is_ok(), "a released blob can be claimed");
    }
}
