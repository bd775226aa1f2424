//! The model registry: the catalog of models this node knows about.
//!
//! Writes go through one async lock, so read-modify-write sequences (register, update,
//! import, scan) never interleave, and every write is flushed before it is answered.

pub mod catalog;
pub mod compat;
pub mod discovery;
pub mod filter;
pub mod spec;

use std::path::PathBuf;
use std::time::SystemTime;

use tokio::sync::Mutex;

pub use catalog::{CatalogFormat, CatalogSource};
pub use filter::ListFilter;
pub use spec::{ModelFile, ModelSpec, TokenizerKind, TokenizerSource};

use crate::error::{Error, Result};
use crate::model::ModelState;
use crate::store::{ModelRecord, Store, from_unix_ms, unix_ms};

/// How a model came to be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Builtin,
    Registered,
    Imported,
    Discovered,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Builtin => "builtin",
            Origin::Registered => "registered",
            Origin::Imported => "imported",
            Origin::Discovered => "discovered",
        }
    }

    fn parse(s: &str) -> Option<Origin> {
        Some(match s {
            "builtin" => Origin::Builtin,
            "imported" => Origin::Imported,
            "discovered" => Origin::Discovered,
            "registered" => Origin::Registered,
            _ => return None,
        })
    }
}

/// A registry entry as the rest of the agent sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    pub spec: ModelSpec,
    pub origin: Origin,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
    pub generation: u64,
    /// Where a discovered model lives; the agent never deletes it.
    pub local_path: Option<PathBuf>,
    pub source: String,
    pub state: ModelState,
}

impl ModelEntry {
    fn to_record(&self) -> ModelRecord {
        ModelRecord {
            spec: Some((&self.spec).into()),
            origin: self.origin.as_str().to_owned(),
            create_time_unix_ms: unix_ms(self.create_time),
            update_time_unix_ms: unix_ms(self.update_time),
            generation: self.generation,
            local_path: self
                .local_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            source: self.source.clone(),
        }
    }
}

/// Result of one page of ListModels.
#[derive(Debug)]
pub struct Page {
    pub models: Vec<ModelEntry>,
    pub next_page_token: String,
    pub total_size: usize,
}

/// What an import did, by model id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportOutcome {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
}

/// ModelSpec fields an UpdateModel mask may name.
pub const UPDATABLE_FIELDS: &[&str] = &[
    "display_name",
    "family",
    "format",
    "files",
    "quantization",
    "context_length",
    "parameter_count",
    "estimated_memory_bytes",
    "tokenizer",
    "tokenizer.kind",
    "tokenizer.path",
    "license",
    "tags",
    "architecture",
    "preferred_runtime",
    "chat_template",
    "description",
    "inputs",
    "outputs",
];

pub struct Registry {
    store: Store,
    lifecycle: crate::lifecycle::Lifecycle,
    write_lock: Mutex<()>,
    models_dirs: Vec<PathBuf>,
    /// Where `file://` sources, scans and catalog files may point.
    roots: crate::access::LocalRoots,
    /// Which hosts catalog URLs may reach.
    hosts: crate::http_client::HostPolicy,
    http: reqwest::Client,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("models_dirs", &self.models_dirs)
            .finish()
    }
}

impl Registry {
    pub fn new(
        store: Store,
        models_dirs: Vec<PathBuf>,
        roots: crate::access::LocalRoots,
        http: reqwest::Client,
    ) -> Registry {
        Registry {
            lifecycle: crate::lifecycle::Lifecycle::new(store.clone()),
            store,
            write_lock: Mutex::new(()),
            models_dirs,
            roots,
            hosts: crate::http_client::HostPolicy::default(),
            http,
        }
    }

    /// Limits the hosts catalog URLs may reach.
    pub fn with_hosts(mut self, hosts: crate::http_client::HostPolicy) -> Registry {
        self.hosts = hosts;
        self
    }

    pub fn roots(&self) -> &crate::access::LocalRoots {
        &self.roots
    }

    /// Refuses a spec whose `file://` sources lead outside the allowed roots, before
    /// anything is stored or read: the caller learns nothing about such a file.
    async fn check_local_sources(&self, specs: &[ModelSpec], prefix: &str) -> Result<()> {
        let urls: Vec<(String, String)> = specs
            .iter()
            .enumerate()
            .flat_map(|(m, spec)| {
                let at = if specs.len() == 1 {
                    prefix.to_owned()
                } else {
                    format!("models[{m}]")
                };
                spec.files.iter().enumerate().flat_map(move |(f, file)| {
                    let at = at.clone();
                    file.urls
                        .iter()
                        .enumerate()
                        .filter(|(_, u)| u.starts_with("file:"))
                        .map(move |(u, url)| (format!("{at}.files[{f}].urls[{u}]"), url.clone()))
                })
            })
            .collect();
        if urls.is_empty() {
            return Ok(());
        }
        let roots = self.roots.clone();
        tokio::task::spawn_blocking(move || {
            urls.iter()
                .try_for_each(|(field, url)| roots.check_url(field, url))
        })
        .await?
    }

    /// Whether any registered model lists a file with this digest.
    pub fn references_blob(&self, sha256: &str) -> Result<bool> {
        for record in self.store.models_after(None) {
            let entry = self.entry_from_record(record?)?;
            if entry
                .spec
                .files
                .iter()
                .any(|f| f.sha256.eq_ignore_ascii_case(sha256))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn models_dirs(&self) -> &[PathBuf] {
        &self.models_dirs
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The lifecycle manager, shared with storage and inference.
    pub fn lifecycle(&self) -> &crate::lifecycle::Lifecycle {
        &self.lifecycle
    }

    fn state_of(&self, id: &str) -> Result<ModelState> {
        self.lifecycle.state(id)
    }

    fn entry_from_record(&self, record: ModelRecord) -> Result<ModelEntry> {
        let spec_record = record.spec.ok_or_else(|| Error::CorruptRecord {
            tree: "models",
            key: String::new(),
            message: "record has no spec".into(),
        })?;
        let spec = ModelSpec::try_from(spec_record)?;
        let state = self.state_of(&spec.id)?;
        let origin = Origin::parse(&record.origin).ok_or_else(|| Error::CorruptRecord {
            tree: "models",
            key: spec.id.clone(),
            message: format!("unknown origin {:?}", record.origin),
        })?;
        Ok(ModelEntry {
            spec,
            origin,
            create_time: from_unix_ms(record.create_time_unix_ms),
            update_time: from_unix_ms(record.update_time_unix_ms),
            generation: record.generation,
            local_path: (!record.local_path.is_empty()).then(|| PathBuf::from(record.local_path)),
            source: record.source,
            state,
        })
    }

    pub fn get(&self, id: &str) -> Result<ModelEntry> {
        spec::validate_id("id", id)?;
        match self.store.get_model(id)? {
            Some(record) => self.entry_from_record(record),
            None => Err(Error::ModelNotFound { id: id.to_owned() }),
        }
    }

    fn find(&self, id: &str) -> Result<Option<ModelEntry>> {
        self.store
            .get_model(id)?
            .map(|r| self.entry_from_record(r))
            .transpose()
    }

    /// Registers a validated spec. An identical spec already registered is not an error:
    /// the existing entry comes back with `created == false`.
    pub async fn register(
        &self,
        spec: ModelSpec,
        origin: Origin,
        source: &str,
    ) -> Result<(ModelEntry, bool)> {
        self.check_local_sources(std::slice::from_ref(&spec), "spec")
            .await?;
        let _guard = self.write_lock.lock().await;
        if let Some(existing) = self.find(&spec.id)? {
            if existing.spec == spec {
                return Ok((existing, false));
            }
            return Err(Error::ModelAlreadyExists { id: spec.id });
        }
        let entry = self.new_entry(spec, origin, source, None);
        self.store.put_model(&entry.to_record())?;
        self.lifecycle.registered(&entry.spec.id, "registered")?;
        self.store.flush().await?;
        Ok((entry, true))
    }

    fn new_entry(
        &self,
        spec: ModelSpec,
        origin: Origin,
        source: &str,
        local_path: Option<PathBuf>,
    ) -> ModelEntry {
        let now = SystemTime::now();
        ModelEntry {
            spec,
            origin,
            create_time: now,
            update_time: now,
            generation: 1,
            local_path,
            source: source.to_owned(),
            state: ModelState::Registered,
        }
    }

    /// One page of models matching `filter`, in id order.
    pub fn list(&self, filter: &ListFilter, page_size: usize, page_token: &str) -> Result<Page> {
        let after = crate::page::decode_token(page_token, &filter.page_scope())?;
        let mut models = Vec::new();
        let mut total_size = 0;
        let mut before_cursor = 0;
        // Scan everything so total_size counts matches on every page, not just this one.
        for record in self.store.models_after(None) {
            let entry = self.entry_from_record(record?)?;
            if !filter.matches(&entry) {
                continue;
            }
            total_size += 1;
            if after
                .as_deref()
                .is_some_and(|a| entry.spec.id.as_str() <= a)
            {
                before_cursor += 1;
            } else if models.len() < page_size {
                models.push(entry);
            }
        }
        let next_page_token = match models.last() {
            Some(last) if before_cursor + models.len() < total_size => {
                crate::page::encode_token(&last.spec.id, &filter.page_scope())
            }
            _ => String::new(),
        };
        Ok(Page {
            models,
            next_page_token,
            total_size,
        })
    }

    /// Applies the fields named in `paths` from `patch` to the model `id`.
    pub async fn update(&self, id: &str, patch: ModelSpec, paths: &[String]) -> Result<ModelEntry> {
        spec::validate_id("spec.id", id)?;
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                format!(
                    "is required; name the fields to change, e.g. \"display_name\" (allowed: {})",
                    UPDATABLE_FIELDS.join(", ")
                ),
            ));
        }
        let _guard = self.write_lock.lock().await;
        let existing = self
            .find(id)?
            .ok_or_else(|| Error::ModelNotFound { id: id.to_owned() })?;
        let mut merged = existing.spec.clone();
        for path in paths {
            apply_path(&mut merged, &patch, path)?;
        }
        let merged = merged.validate("spec")?;
        if merged == existing.spec {
            return Ok(existing);
        }
        self.check_local_sources(std::slice::from_ref(&merged), "spec")
            .await?;
        self.refuse_file_change_in_use(&existing, &merged)?;
        let entry = ModelEntry {
            spec: merged,
            update_time: SystemTime::now(),
            generation: existing.generation + 1,
            ..existing
        };
        self.store.put_model(&entry.to_record())?;
        self.store.flush().await?;
        Ok(entry)
    }

    fn refuse_file_change_in_use(&self, existing: &ModelEntry, new: &ModelSpec) -> Result<()> {
        let files_change = existing.spec.files != new.files || existing.spec.format != new.format;
        if files_change && existing.state.holds_files() {
            return Err(Error::ModelInUse {
                id: existing.spec.id.clone(),
                state: existing.state,
            });
        }
        Ok(())
    }

    /// Removes a model from the registry. Its discovered files on disk are never touched.
    pub async fn delete(&self, id: &str) -> Result<()> {
        spec::validate_id("id", id)?;
        let _guard = self.write_lock.lock().await;
        let existing = self
            .find(id)?
            .ok_or_else(|| Error::ModelNotFound { id: id.to_owned() })?;
        if existing.state.holds_files() {
            return Err(Error::ModelInUse {
                id: id.to_owned(),
                state: existing.state,
            });
        }
        if existing.origin == Origin::Builtin {
            self.store.mark_builtin_deleted(id)?;
        }
        self.lifecycle.deleted(id)?;
        self.store.delete_model(id)?;
        self.store.flush().await?;
        Ok(())
    }

    /// Swaps two registered models' ids with everything stored under them (see
    /// [`Store::exchange_models`]).
    pub async fn exchange(&self, a: &str, b: &str) -> Result<()> {
        let _guard = self.write_lock.lock().await;
        for id in [a, b] {
            if self.find(id)?.is_none() {
                return Err(Error::ModelNotFound { id: id.to_owned() });
            }
        }
        self.store.exchange_models(a, b)?;
        self.store.flush().await
    }

    /// Imports a catalog manifest. All entries are validated before any is written, and
    /// the writes land in one atomic batch.
    pub async fn import(
        &self,
        source: &CatalogSource,
        format: Option<CatalogFormat>,
    ) -> Result<ImportOutcome> {
        self.check_catalog_source(source).await?;
        let text = catalog::fetch(source, &self.http, &self.hosts).await?;
        let specs = catalog::parse(&text, format)?;
        self.check_local_sources(&specs, "catalog").await?;
        self.import_specs(specs, Origin::Imported, &source.describe())
            .await
    }

    async fn check_catalog_source(&self, source: &CatalogSource) -> Result<()> {
        let roots = self.roots.clone();
        match source {
            CatalogSource::Path(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || roots.check("path", &path).map(drop)).await?
            }
            CatalogSource::Url(url) => {
                let url = url.clone();
                tokio::task::spawn_blocking(move || roots.check_url("url", &url)).await?
            }
            CatalogSource::Inline(_) => Ok(()),
        }
    }

    async fn import_specs(
        &self,
        specs: Vec<ModelSpec>,
        origin: Origin,
        source: &str,
    ) -> Result<ImportOutcome> {
        let _guard = self.write_lock.lock().await;
        let mut outcome = ImportOutcome::default();
        let mut writes = Vec::new();
        for spec in specs {
            match self.find(&spec.id)? {
                None => {
                    outcome.created.push(spec.id.clone());
                    writes.push(self.new_entry(spec, origin, source, None).to_record());
                }
                Some(existing) if existing.spec == spec => {
                    outcome.unchanged.push(spec.id.clone());
                }
                Some(existing) => {
                    self.refuse_file_change_in_use(&existing, &spec)?;
                    outcome.updated.push(spec.id.clone());
                    let entry = ModelEntry {
                        spec,
                        origin,
                        update_time: SystemTime::now(),
                        generation: existing.generation + 1,
                        source: source.to_owned(),
                        ..existing
                    };
                    writes.push(entry.to_record());
                }
            }
        }
        if !writes.is_empty() {
            self.store.put_models(&writes)?;
            for id in &outcome.created {
                self.lifecycle.registered(id, source)?;
            }
            self.store.flush().await?;
        }
        Ok(outcome)
    }

    /// Registers the built-in catalog: entries an operator deleted stay deleted, and
    /// entries an operator changed through UpdateModel keep their changes only until
    /// a newer agent ships a different spec.
    pub async fn load_builtin(&self) -> Result<ImportOutcome> {
        let specs = catalog::parse(catalog::BUILTIN, Some(CatalogFormat::Yaml))?;
        let mut wanted = Vec::new();
        for spec in specs {
            if self.store.builtin_deleted(&spec.id)? {
                continue;
            }
            match self.find(&spec.id)? {
                Some(existing) if existing.origin != Origin::Builtin => continue,
                _ => wanted.push(spec),
            }
        }
        self.import_specs(wanted, Origin::Builtin, "builtin").await
    }

    /// Registers or refreshes a discovered model, keyed by its local path: rescanning
    /// the same path keeps its id.
    async fn upsert_discovered(
        &self,
        mut spec: ModelSpec,
        local_path: PathBuf,
        source: &str,
    ) -> Result<ModelEntry> {
        let _guard = self.write_lock.lock().await;
        let base = spec.id.clone();
        let mut attempt = 0u32;
        loop {
            match self.find(&spec.id)? {
                Some(existing) if existing.local_path.as_ref() == Some(&local_path) => {
                    if existing.spec == spec {
                        return Ok(existing);
                    }
                    self.refuse_file_change_in_use(&existing, &spec)?;
                    let entry = ModelEntry {
                        spec,
                        update_time: SystemTime::now(),
                        generation: existing.generation + 1,
                        ..existing
                    };
                    self.store.put_model(&entry.to_record())?;
                    self.store.flush().await?;
                    return Ok(entry);
                }
                Some(_) => {
                    // The id belongs to another model: derive a new one from the path.
                    attempt += 1;
                    spec.id = discovery::disambiguate(&base, &local_path, attempt);
                }
                None => {
                    let entry = self.new_entry(spec, Origin::Discovered, source, Some(local_path));
                    self.store.put_model(&entry.to_record())?;
                    self.lifecycle.registered(&entry.spec.id, source)?;
                    self.store.flush().await?;
                    return Ok(entry);
                }
            }
        }
    }
}

/// Copies one masked field from `patch` into `target`.
fn apply_path(target: &mut ModelSpec, patch: &ModelSpec, path: &str) -> Result<()> {
    match path {
        "id" | "spec.id" => {
            return Err(Error::invalid(
                "update_mask",
                "id cannot be changed; register the model under the new id and delete the old one",
            ));
        }
        "*" => {
            let id = target.id.clone();
            *target = patch.clone();
            target.id = id;
        }
        "display_name" => target.display_name = patch.display_name.clone(),
        "family" => target.family = patch.family.clone(),
        "format" => target.format = patch.format,
        "files" => target.files = patch.files.clone(),
        "quantization" => target.quantization = patch.quantization.clone(),
        "context_length" => target.context_length = patch.context_length,
        "parameter_count" => target.parameter_count = patch.parameter_count,
        "estimated_memory_bytes" => target.estimated_memory_bytes = patch.estimated_memory_bytes,
        "tokenizer" => target.tokenizer = patch.tokenizer.clone(),
        "tokenizer.kind" => target.tokenizer.kind = patch.tokenizer.kind,
        "tokenizer.path" => target.tokenizer.path = patch.tokenizer.path.clone(),
        "license" => target.license = patch.license.clone(),
        "tags" => target.tags = patch.tags.clone(),
        "architecture" => target.architecture = patch.architecture.clone(),
        "preferred_runtime" => target.preferred_runtime = patch.preferred_runtime,
        "chat_template" => target.chat_template = patch.chat_template.clone(),
        "description" => target.description = patch.description.clone(),
        "inputs" => target.inputs = patch.inputs.clone(),
        "outputs" => target.outputs = patch.outputs.clone(),
        other => {
            return Err(Error::invalid(
                "update_mask",
                format!(
                    "unknown field {other:?}; allowed: {}",
                    UPDATABLE_FIELDS.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use modeld_engine_core::ModelFormat;

    use super::*;
    use crate::store::LifecycleRecord;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (
            dir,
            Registry::new(
                store,
                Vec::new(),
                crate::access::LocalRoots::default(),
                crate::http_client::build().unwrap(),
            ),
        )
    }

    fn spec(id: &str) -> ModelSpec {
        ModelSpec {
            id: id.into(),
            format: Some(ModelFormat::Gguf),
            files: vec![ModelFile {
                name: "m.gguf".into(),
                urls: vec!["http://mirror.example/m.gguf".into()],
                sha256: "a".repeat(64),
                size_bytes: 1,
                member: None,
                archive: None,
            }],
            ..Default::default()
        }
        .validate("spec")
        .unwrap()
    }

    #[tokio::test]
    async fn delete_refuses_a_model_whose_files_are_in_use() {
        let (_dir, reg) = registry();
        reg.register(spec("busy"), Origin::Registered, "test")
            .await
            .unwrap();
        for (state, refused) in [
            ("downloading", true),
            ("loading", true),
            ("ready", true),
            ("failed", false),
        ] {
            reg.store()
                .put_lifecycle(
                    "busy",
                    &LifecycleRecord {
                        state: state.into(),
                        revision: 1,
                        update_time_unix_ms: 0,
                        failure: None,
                    },
                )
                .unwrap();
            if refused {
                let err = reg.delete("busy").await.unwrap_err();
                assert!(matches!(err, Error::ModelInUse { .. }), "{state}: {err}");
                assert!(err.to_string().contains(state), "{err}");
                assert!(
                    reg.get("busy").is_ok(),
                    "refused delete must keep the model"
                );
            }
        }
        reg.delete("busy").await.unwrap();
        assert!(matches!(reg.get("busy"), Err(Error::ModelNotFound { .. })));
    }

    #[tokio::test]
    async fn file_changes_are_refused_while_in_use_but_labels_are_not() {
        let (_dir, reg) = registry();
        reg.register(spec("m"), Origin::Registered, "test")
            .await
            .unwrap();
        reg.store()
            .put_lifecycle(
                "m",
                &LifecycleRecord {
                    state: "ready".into(),
                    revision: 1,
                    update_time_unix_ms: 0,
                    failure: None,
                },
            )
            .unwrap();
        let mut patch = spec("m");
        patch.display_name = "renamed".into();
        patch.files[0].sha256 = "b".repeat(64);
        let renamed = reg
            .update("m", patch.clone(), &["display_name".into()])
            .await
            .unwrap();
        assert_eq!(renamed.spec.display_name, "renamed");
        assert_eq!(renamed.generation, 2);
        let err = reg.update("m", patch, &["files".into()]).await.unwrap_err();
        assert!(matches!(err, Error::ModelInUse { .. }), "{err}");
    }

    #[tokio::test]
    async fn deleted_builtin_stays_deleted() {
        let (_dir, reg) = registry();
        let first = reg.load_builtin().await.unwrap();
        assert_eq!(first.created, ["smollm2-135m-instruct"]);
        let again = reg.load_builtin().await.unwrap();
        assert!(again.created.is_empty() && again.updated.is_empty());
        reg.delete("smollm2-135m-instruct").await.unwrap();
        let after = reg.load_builtin().await.unwrap();
        assert!(after.created.is_empty(), "deleted built-in came back");
    }
}
