//! Persistence in sled.
//!
//! Each concern has its own tree; records are prost messages (see [`records`]) so fields
//! can be added without a migration. The `meta` tree holds the schema version and the
//! node id. Writers call [`Store::flush`] before they answer, so anything acknowledged
//! survives a kill -9.

pub mod records;

use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Error, Result};

pub use records::{
    AuditRecord, BenchmarkRecord, BlobRecord, FailureRecord, FileRecord, FleetModelRecord,
    GateResultRecord, LifecycleRecord, ModelRecord, NodeRatesRecord, PinnedLoadRecord, PushRecord,
    SpecRecord, StoredFileRecord, StoredModelRecord, TransferFileRecord, TransferRecord,
    TransitionRecord,
};
pub use records::{from_unix_ms, unix_ms};

/// Schema version this agent writes. Bump it when a record changes meaning, not when a
/// field is added.
pub const SCHEMA_VERSION: u32 = 1;

const META_SCHEMA_VERSION: &[u8] = b"schema_version";
const META_NODE_ID: &[u8] = b"node_id";
const META_BUILTIN_DELETED: &str = "builtin_deleted/";
const META_NODE_RATES: &str = "node_rates";

/// Names of the typed trees, as corrupt-record errors report them.
mod tree {
    pub const META: &str = "meta";
    pub const MODELS: &str = "models";
    pub const LIFECYCLE: &str = "lifecycle";
    pub const LIFECYCLE_EVENTS: &str = "lifecycle_events";
    pub const PINNED: &str = "pinned";
    pub const BLOBS: &str = "blobs";
    pub const STORED: &str = "stored";
    pub const TRANSFERS: &str = "transfers";
    pub const PUSHES: &str = "pushes";
    pub const BENCHMARKS: &str = "benchmarks";
    pub const AUDIT: &str = "audit";
    pub const FLEET: &str = "fleet";
}

/// Key of the assignments last received from a fleet controller, in the fleet tree.
const FLEET_ASSIGNMENTS: &[u8] = b"assignments";
/// Prefix of the models the fleet placed on this node, in the fleet tree.
const FLEET_OWNED: &str = "owned/";

/// Entries the audit log keeps; older ones are dropped as new ones come.
pub const AUDIT_KEEP: usize = 10_000;

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    models: sled::Tree,
    lifecycle: sled::Tree,
    lifecycle_events: sled::Tree,
    pinned: sled::Tree,
    blobs: sled::Tree,
    stored: sled::Tree,
    transfers: sled::Tree,
    pushes: sled::Tree,
    benchmarks: sled::Tree,
    audit: sled::Tree,
    fleet: sled::Tree,
    node_id: String,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) the store under `dir`, checks the schema version and creates
    /// the node id on first start.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let db = sled::Config::new().path(dir).open()?;
        let meta = db.open_tree(tree::META)?;
        match meta.get(META_SCHEMA_VERSION)? {
            None => {
                meta.insert(META_SCHEMA_VERSION, &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| Error::CorruptRecord {
                        tree: tree::META,
                        key: "schema_version".into(),
                        message: format!("expected 4 bytes, found {}", v.len()),
                    })?;
                if found > SCHEMA_VERSION {
                    return Err(Error::SchemaTooNew {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
        }
        let node_id = match meta.get(META_NODE_ID)? {
            Some(v) => String::from_utf8(v.to_vec()).map_err(|e| Error::CorruptRecord {
                tree: tree::META,
                key: "node_id".into(),
                message: e.to_string(),
            })?,
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                meta.insert(META_NODE_ID, id.as_bytes())?;
                id
            }
        };
        let store = Store {
            models: db.open_tree(tree::MODELS)?,
            lifecycle: db.open_tree(tree::LIFECYCLE)?,
            lifecycle_events: db.open_tree(tree::LIFECYCLE_EVENTS)?,
            pinned: db.open_tree(tree::PINNED)?,
            benchmarks: db.open_tree(tree::BENCHMARKS)?,
            audit: db.open_tree(tree::AUDIT)?,
            fleet: db.open_tree(tree::FLEET)?,
            blobs: db.open_tree(tree::BLOBS)?,
            stored: db.open_tree(tree::STORED)?,
            transfers: db.open_tree(tree::TRANSFERS)?,
            pushes: db.open_tree(tree::PUSHES)?,
            meta,
            db,
            node_id,
            path: dir.to_path_buf(),
        };
        store.db.flush()?;
        Ok(store)
    }

    /// Stable id of this node, created on the first start of a data directory.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Makes every write so far durable. Call before acknowledging a state change.
    /// Writes everything to disk, on a blocking thread. Not sled's `flush_async`:
    /// futures of it polled at nearly the same time may never be woken (sled issues
    /// 1241 and 1308), which stalled agents that flushed from two tasks at once.
    pub async fn flush(&self) -> Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| Error::TaskFailed(e.to_string()))??;
        Ok(())
    }

    /// Synchronous flush for shutdown paths outside the runtime.
    pub fn flush_blocking(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    pub fn get_model(&self, id: &str) -> Result<Option<ModelRecord>> {
        self.models
            .get(id.as_bytes())?
            .map(|v| decode(tree::MODELS, id.as_bytes(), &v))
            .transpose()
    }

    pub fn put_model(&self, record: &ModelRecord) -> Result<()> {
        let id = record.spec.as_ref().map(|s| s.id.as_str()).unwrap_or("");
        self.models.insert(id.as_bytes(), record.encode_to_vec())?;
        Ok(())
    }

    /// Writes several records at once: either all land or none do.
    pub fn put_models(&self, records: &[ModelRecord]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for record in records {
            let id = record.spec.as_ref().map(|s| s.id.as_str()).unwrap_or("");
            batch.insert(id.as_bytes(), record.encode_to_vec());
        }
        self.models.apply_batch(batch)?;
        Ok(())
    }

    pub fn delete_model(&self, id: &str) -> Result<bool> {
        Ok(self.models.remove(id.as_bytes())?.is_some())
    }

    /// Models in id order, starting after `after` when given.
    pub fn models_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<ModelRecord>> + '_ {
        let iter = match after {
            Some(a) => {
                let mut start = a.as_bytes().to_vec();
                // The smallest key strictly greater than `a`.
                start.push(0);
                self.models.range(start..)
            }
            None => self.models.iter(),
        };
        iter.map(|kv| {
            let (k, v) = kv?;
            decode(tree::MODELS, &k, &v)
        })
    }

    pub fn lifecycle(&self, id: &str) -> Result<Option<LifecycleRecord>> {
        self.lifecycle
            .get(id.as_bytes())?
            .map(|v| decode(tree::LIFECYCLE, id.as_bytes(), &v))
            .transpose()
    }

    pub fn put_lifecycle(&self, id: &str, record: &LifecycleRecord) -> Result<()> {
        self.lifecycle
            .insert(id.as_bytes(), record.encode_to_vec())?;
        Ok(())
    }

    pub fn lifecycles(&self) -> Result<Vec<(String, LifecycleRecord)>> {
        all(&self.lifecycle, tree::LIFECYCLE)
    }

    /// The newest lifecycle revision, 0 before the first event.
    pub fn last_revision(&self) -> Result<u64> {
        Ok(self
            .lifecycle_events
            .last()?
            .map_or(0, |(k, _)| revision_of(&k)))
    }

    /// The oldest revision still kept, 0 before the first event.
    pub fn first_revision(&self) -> Result<u64> {
        Ok(self
            .lifecycle_events
            .first()?
            .map_or(0, |(k, _)| revision_of(&k)))
    }

    /// Records an event and, when `state` is given, the model's new state, in one
    /// atomic batch across both trees.
    pub fn put_transition(
        &self,
        revision: u64,
        event: &TransitionRecord,
        state: Option<&LifecycleRecord>,
    ) -> Result<()> {
        use sled::Transactional;
        let key = revision.to_be_bytes();
        let value = event.encode_to_vec();
        let id = event.model_id.as_bytes();
        let state = state.map(Message::encode_to_vec);
        let deleted = event.kind == "deleted";
        (&self.lifecycle_events, &self.lifecycle)
            .transaction(|(events, states)| {
                events.insert(&key, value.as_slice())?;
                if let Some(s) = &state {
                    states.insert(id, s.as_slice())?;
                } else if deleted {
                    states.remove(id)?;
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => Error::from(e),
                sled::transaction::TransactionError::Abort(()) => {
                    Error::TaskFailed("lifecycle transaction aborted".into())
                }
            })
    }

    /// Drops events older than `keep` revisions before the newest.
    pub fn prune_transitions(&self, keep: u64) -> Result<()> {
        let last = self.last_revision()?;
        let cutoff = last.saturating_sub(keep);
        while let Some((k, _)) = self.lifecycle_events.first()? {
            if revision_of(&k) > cutoff {
                break;
            }
            self.lifecycle_events.remove(k)?;
        }
        Ok(())
    }

    /// Events after `after`, oldest first, at most `limit`.
    pub fn transitions_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, TransitionRecord)>> {
        let start = after.saturating_add(1).to_be_bytes();
        self.lifecycle_events
            .range(start..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((revision_of(&k), decode(tree::LIFECYCLE_EVENTS, &k, &v)?))
            })
            .collect()
    }

    /// A model's events, newest first, at most `limit`.
    pub fn transitions_of(&self, id: &str, limit: usize) -> Result<Vec<(u64, TransitionRecord)>> {
        let mut out = Vec::new();
        for kv in self.lifecycle_events.iter().rev() {
            let (k, v) = kv?;
            let record: TransitionRecord = decode(tree::LIFECYCLE_EVENTS, &k, &v)?;
            if record.model_id == id {
                out.push((revision_of(&k), record));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The encoded assignments last received from the fleet controller. The store
    /// keeps them as bytes: their wire format belongs to the edge, not to the node.
    pub fn fleet_assignments(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.fleet.get(FLEET_ASSIGNMENTS)?.map(|v| v.to_vec()))
    }

    pub fn put_fleet_assignments(&self, encoded: &[u8]) -> Result<()> {
        self.fleet.insert(FLEET_ASSIGNMENTS, encoded)?;
        Ok(())
    }

    /// Models the fleet placed on this node, by id.
    pub fn fleet_models(&self) -> Result<Vec<(String, FleetModelRecord)>> {
        self.fleet
            .scan_prefix(FLEET_OWNED.as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                let id = String::from_utf8_lossy(&k[FLEET_OWNED.len()..]).into_owned();
                Ok((id, decode(tree::FLEET, &k, &v)?))
            })
            .collect()
    }

    pub fn put_fleet_model(&self, id: &str, record: &FleetModelRecord) -> Result<()> {
        put(&self.fleet, &format!("{FLEET_OWNED}{id}"), record)
    }

    pub fn delete_fleet_model(&self, id: &str) -> Result<()> {
        self.fleet.remove(format!("{FLEET_OWNED}{id}").as_bytes())?;
        Ok(())
    }

    pub fn pinned(&self) -> Result<Vec<(String, PinnedLoadRecord)>> {
        all(&self.pinned, tree::PINNED)
    }

    pub fn put_pinned(&self, id: &str, record: &PinnedLoadRecord) -> Result<()> {
        put(&self.pinned, id, record)
    }

    pub fn delete_pinned(&self, id: &str) -> Result<()> {
        self.pinned.remove(id.as_bytes())?;
        Ok(())
    }

    /// The latest speed measured for each (format, runtime) on this node.
    pub fn benchmarks(&self) -> Result<Vec<BenchmarkRecord>> {
        Ok(all(&self.benchmarks, tree::BENCHMARKS)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// Appends to the audit log, dropping the oldest entries past [`AUDIT_KEEP`].
    pub fn append_audit(&self, record: &AuditRecord) -> Result<()> {
        let id = self.db.generate_id()?;
        self.audit
            .insert(id.to_be_bytes(), record.encode_to_vec())?;
        while self.audit.len() > AUDIT_KEEP {
            if self.audit.pop_min()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Up to `limit` audit entries, newest first, with their sequence numbers.
    pub fn audit(&self, limit: usize) -> Result<Vec<(u64, AuditRecord)>> {
        self.audit
            .iter()
            .rev()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((revision_of(&k), decode(tree::AUDIT, &k, &v)?))
            })
            .collect()
    }

    /// Records a measurement, replacing the previous one for its format and runtime.
    pub fn put_benchmark(&self, record: &BenchmarkRecord) -> Result<()> {
        let key = format!("{}/{}", record.format, record.runtime);
        put(&self.benchmarks, &key, record)
    }

    /// The node's memory and compute rates as last measured.
    pub fn node_rates(&self) -> Result<Option<NodeRatesRecord>> {
        get(&self.meta, tree::META, META_NODE_RATES)
    }

    pub fn put_node_rates(&self, record: &NodeRatesRecord) -> Result<()> {
        put(&self.meta, META_NODE_RATES, record)
    }

    pub fn blob(&self, sha256: &str) -> Result<Option<BlobRecord>> {
        get(&self.blobs, tree::BLOBS, sha256)
    }

    pub fn put_blob(&self, sha256: &str, record: &BlobRecord) -> Result<()> {
        put(&self.blobs, sha256, record)
    }

    pub fn delete_blob(&self, sha256: &str) -> Result<()> {
        self.blobs.remove(sha256.as_bytes())?;
        Ok(())
    }

    pub fn blobs(&self) -> Result<Vec<(String, BlobRecord)>> {
        all(&self.blobs, tree::BLOBS)
    }

    /// Swaps everything two models' ids name (registry record, lifecycle state, stored
    /// files, pin) in one transaction: a crash leaves both pairings whole, never a mix.
    pub fn exchange_models(&self, a: &str, b: &str) -> Result<()> {
        use sled::Transactional as _;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let result = (&self.models, &self.lifecycle, &self.stored, &self.pinned).transaction(
            |(models, lifecycle, stored, pinned)| {
                let corrupt = |tree: &'static str, key: &str, e: prost::DecodeError| {
                    ConflictableTransactionError::Abort(Error::CorruptRecord {
                        tree,
                        key: key.to_owned(),
                        message: e.to_string(),
                    })
                };
                let (ma, mb) = (models.get(a)?, models.get(b)?);
                for (key, value) in [(a, mb), (b, ma)] {
                    match value {
                        Some(v) => {
                            let mut record = ModelRecord::decode(v.as_ref())
                                .map_err(|e| corrupt(tree::MODELS, key, e))?;
                            if let Some(spec) = record.spec.as_mut() {
                                key.clone_into(&mut spec.id);
                            }
                            models.insert(key.as_bytes(), record.encode_to_vec())?;
                        }
                        None => {
                            models.remove(key.as_bytes())?;
                        }
                    }
                }
                let (sa, sb) = (stored.get(a)?, stored.get(b)?);
                for (key, value) in [(a, sb), (b, sa)] {
                    match value {
                        Some(v) => {
                            let mut record = StoredModelRecord::decode(v.as_ref())
                                .map_err(|e| corrupt(tree::STORED, key, e))?;
                            // The unpacked directory is named after the id and is
                            // renamed with it.
                            if !record.extracted_path.is_empty() {
                                record.extracted_path = Path::new(&record.extracted_path)
                                    .with_file_name(key)
                                    .display()
                                    .to_string();
                            }
                            stored.insert(key.as_bytes(), record.encode_to_vec())?;
                        }
                        None => {
                            stored.remove(key.as_bytes())?;
                        }
                    }
                }
                for tree in [lifecycle, pinned] {
                    let (va, vb) = (tree.get(a)?, tree.get(b)?);
                    for (key, value) in [(a, vb), (b, va)] {
                        match value {
                            Some(v) => tree.insert(key.as_bytes(), v)?,
                            None => tree.remove(key.as_bytes())?,
                        };
                    }
                }
                Ok(())
            },
        );
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    pub fn stored_model(&self, id: &str) -> Result<Option<StoredModelRecord>> {
        get(&self.stored, tree::STORED, id)
    }

    pub fn put_stored_model(&self, id: &str, record: &StoredModelRecord) -> Result<()> {
        put(&self.stored, id, record)
    }

    pub fn delete_stored_model(&self, id: &str) -> Result<()> {
        self.stored.remove(id.as_bytes())?;
        Ok(())
    }

    pub fn stored_models(&self) -> Result<Vec<(String, StoredModelRecord)>> {
        all(&self.stored, tree::STORED)
    }

    pub fn transfer(&self, id: &str) -> Result<Option<TransferRecord>> {
        get(&self.transfers, tree::TRANSFERS, id)
    }

    pub fn put_transfer(&self, record: &TransferRecord) -> Result<()> {
        put(&self.transfers, &record.id, record)
    }

    pub fn delete_transfer(&self, id: &str) -> Result<()> {
        self.transfers.remove(id.as_bytes())?;
        Ok(())
    }

    pub fn transfers(&self) -> Result<Vec<(String, TransferRecord)>> {
        all(&self.transfers, tree::TRANSFERS)
    }

    pub fn push(&self, key: &str) -> Result<Option<PushRecord>> {
        get(&self.pushes, tree::PUSHES, key)
    }

    pub fn put_push(&self, key: &str, record: &PushRecord) -> Result<()> {
        put(&self.pushes, key, record)
    }

    pub fn delete_push(&self, key: &str) -> Result<()> {
        self.pushes.remove(key.as_bytes())?;
        Ok(())
    }

    /// Remembers that the operator deleted a built-in catalog model, so a restart does
    /// not bring it back.
    pub fn mark_builtin_deleted(&self, id: &str) -> Result<()> {
        self.meta
            .insert(format!("{META_BUILTIN_DELETED}{id}").as_bytes(), &[])?;
        Ok(())
    }

    pub fn builtin_deleted(&self, id: &str) -> Result<bool> {
        Ok(self
            .meta
            .contains_key(format!("{META_BUILTIN_DELETED}{id}").as_bytes())?)
    }
}

fn get<M: Message + Default>(t: &sled::Tree, name: &'static str, key: &str) -> Result<Option<M>> {
    t.get(key.as_bytes())?
        .map(|v| decode(name, key.as_bytes(), &v))
        .transpose()
}

fn put<M: Message>(t: &sled::Tree, key: &str, record: &M) -> Result<()> {
    t.insert(key.as_bytes(), record.encode_to_vec())?;
    Ok(())
}

fn revision_of(key: &[u8]) -> u64 {
    key.try_into().map_or(0, u64::from_be_bytes)
}

fn all<M: Message + Default>(t: &sled::Tree, name: &'static str) -> Result<Vec<(String, M)>> {
    t.iter()
        .map(|kv| {
            let (k, v) = kv?;
            Ok((
                String::from_utf8_lossy(&k).into_owned(),
                decode(name, &k, &v)?,
            ))
        })
        .collect()
}

fn decode<M: Message + Default>(tree: &'static str, key: &[u8], value: &[u8]) -> Result<M> {
    M::decode(value).map_err(|e| Error::CorruptRecord {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled's own `flush_async` never wakes some of many flushes polled at once (sled
    /// issue 1241); the fleet's reconciler and its stream flushing together hung
    /// agents that way. Every one of many concurrent flushes must finish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_flushes_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut flushes = tokio::task::JoinSet::new();
        for i in 0..64 {
            let store = store.clone();
            flushes.spawn(async move {
                store.put_model(&record(&format!("m{i}")))?;
                store.flush().await
            });
        }
        // A hang detector, not a speed assertion: 64 flushes take milliseconds.
        let all = tokio::time::timeout(std::time::Duration::from_secs(120), async {
            while let Some(done) = flushes.join_next().await {
                done.unwrap().unwrap();
            }
        })
        .await;
        assert!(all.is_ok(), "some flushes never completed");
    }

    fn record(id: &str) -> ModelRecord {
        ModelRecord {
            spec: Some(SpecRecord {
                id: id.into(),
                format: "gguf".into(),
                ..Default::default()
            }),
            generation: 1,
            ..Default::default()
        }
    }

    /// Opens the store again once the previous handle's lock is gone: sled's flusher
    /// thread lets go of the database file a moment after the last handle drops.
    fn reopen(dir: &Path) -> Store {
        for _ in 0..100 {
            match Store::open(dir) {
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other.unwrap(),
            }
        }
        panic!("the store's lock was never released");
    }

    #[test]
    fn node_id_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap().node_id().to_owned();
        let second = reopen(dir.path()).node_id().to_owned();
        assert_eq!(first, second);
        assert_eq!(first.len(), 36);
    }

    #[test]
    fn newer_schema_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .meta
                .insert(META_SCHEMA_VERSION, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::SchemaTooNew { .. }), "{err}");
    }

    #[test]
    fn models_after_skips_the_named_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .put_models(&[record("a"), record("ab"), record("b")])
            .unwrap();
        let ids: Vec<String> = store
            .models_after(Some("a"))
            .map(|r| r.unwrap().spec.unwrap().id)
            .collect();
        assert_eq!(ids, ["ab", "b"]);
    }

    #[test]
    fn corrupt_record_is_reported_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.models.insert(b"bad", &[0xff, 0xff, 0xff]).unwrap();
        let err = store.get_model("bad").unwrap_err();
        assert!(matches!(err, Error::CorruptRecord { .. }), "{err}");
    }
}
