//! The node: the domain parts every service and background task shares, wired together.
//! It knows nothing of gRPC or of the command line; the agent builds it from settings
//! and hands it to the services.

use crate::hardware::Hardware;
use crate::inference::Inference;
use crate::registry::Registry;
use crate::registry::compat::NodeResources;
use crate::storage::Storage;
use crate::store::Store;

#[derive(Debug)]
pub struct Node {
    pub store: Store,
    pub registry: Registry,
    pub storage: Storage,
    pub inference: std::sync::Arc<Inference>,
    pub hardware: Hardware,
    /// The memory budget resolved against this machine's physical memory.
    pub memory_budget_bytes: u64,
    /// Bytes the store may hold; `None` = the disk's free space.
    pub disk_quota: Option<u64>,
}

impl Node {
    /// Opens a stored blob for a reader (a peer's fetch, an operator): only blobs that
    /// belong to a registered model are served. Any other digest reads as not stored,
    /// whether the file is there or not.
    pub async fn open_model_blob(
        &self,
        sha256: &str,
        offset: u64,
    ) -> crate::error::Result<(tokio::fs::File, u64)> {
        crate::storage::blobs::check_digest("sha256", sha256)?;
        if !self.registry.references_blob(sha256)? {
            return Err(crate::error::Error::BlobNotFound {
                sha256: sha256.to_owned(),
            });
        }
        self.storage.open_blob(sha256, offset).await
    }

    /// Removes a model from the registry and then its stored files, except blobs
    /// another model uses. A model in memory or being downloaded is refused.
    pub async fn delete_model(&self, id: &str) -> crate::error::Result<()> {
        self.registry.delete(id).await?;
        if let Err(e) = self.storage.forget(id).await {
            tracing::warn!(model = %id, error = %e, "stored files of a deleted model could not be removed");
        }
        Ok(())
    }

    /// Swaps two models' ids, loaded workers included: what was `b` serves as `a`
    /// from the next request on, and `a`'s former model stays reachable as `b`
    /// (requests already running on either finish where they started). A fleet
    /// rollout stages a new revision under a second id and swaps it in this way, so
    /// the model never stops answering. Refused while either is downloading.
    pub async fn exchange(&self, a: &str, b: &str) -> crate::error::Result<()> {
        let _steady = self.inference.hold_loads_and_unloads().await;
        let dirs = self.storage.exchange_dirs(a, b)?;
        self.registry.exchange(a, b).await?;
        self.inference.exchange(a, b);
        dirs.keep();
        tracing::info!(a, b, "models exchanged");
        Ok(())
    }

    /// The node's memory bandwidth and compute rate: kept in the store for a week per
    /// CPU, else measured now (a third of a second of every core). Blocking. `None`,
    /// logged, when the store cannot keep them.
    pub fn rates(&self) -> Option<crate::performance::Rates> {
        let (id, threads) = self.cpu_identity();
        crate::performance::load_or_measure(&self.store, &id, threads)
            .inspect_err(|e| tracing::warn!(error = %e, "the node's rates could not be kept"))
            .ok()
    }

    /// The rates the store keeps for this CPU, without measuring. Blocking (a read).
    pub fn kept_rates(&self) -> Option<crate::performance::Rates> {
        let (id, _) = self.cpu_identity();
        crate::performance::load_kept(&self.store, &id)
            .inspect_err(|e| tracing::warn!(error = %e, "the node's rates could not be read"))
            .ok()
            .flatten()
    }

    /// What the rates are kept under (another CPU measures again), and its threads.
    fn cpu_identity(&self) -> (String, usize) {
        let cpu = &self.hardware.host().cpu;
        (
            format!("{} × {}", cpu.model, cpu.logical_cores),
            usize::try_from(cpu.logical_cores).unwrap_or(1),
        )
    }

    /// Current resources for compatibility checks.
    pub fn resources(&self) -> NodeResources {
        let memory = self.hardware.memory();
        let disk = self.hardware.disk();
        let mut accelerators: Vec<_> = self
            .hardware
            .host()
            .accelerators
            .iter()
            .map(|a| a.kind)
            .collect();
        accelerators.push(modeld_engine_core::Accelerator::Cpu);
        NodeResources {
            memory_budget_bytes: self.memory_budget_bytes,
            memory_available_bytes: memory.available_bytes,
            disk_free_bytes: disk.free_bytes,
            disk_quota_bytes: self.disk_quota,
            disk_used_bytes: self.storage.used_bytes().unwrap_or(0),
            physical_cores: self.hardware.host().cpu.physical_cores,
            accelerators,
        }
    }
}
