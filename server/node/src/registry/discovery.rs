//! Discovery: scanning local model directories and registering what is found.
//!
//! Formats are recognized from content (see `formats`). Files are hashed so that a
//! discovered model is described exactly like a downloaded one, and a rescan of the
//! same path keeps the model's id.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use modeld_engine_core::ModelFormat;
use sha2::{Digest, Sha256};

use super::spec::{ModelFile, ModelSpec, TokenizerKind, TokenizerSource, limits};
use super::{ModelEntry, Registry};
use crate::error::{Error, Result};
use crate::formats::archive::{self, ModelMember};
use crate::formats::dir::{self, DirModel};
use crate::formats::{Metadata, Sniffed, sniff_file};

/// How deep below a models directory the scan looks.
const MAX_DEPTH: usize = 4;
/// Entries a single scan visits before it stops and says so.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Default)]
pub struct ScanOutcome {
    pub models: Vec<ModelEntry>,
    pub skipped: Vec<(String, String)>,
    pub directories: Vec<PathBuf>,
}

/// A model found on disk, before registration.
#[derive(Debug)]
struct Found {
    spec: ModelSpec,
    /// Unique key of the find: a file, a directory, or `archive!/member`.
    local_path: PathBuf,
}

#[derive(Debug, Default)]
struct Walk {
    found: Vec<Found>,
    skipped: Vec<(String, String)>,
    visited: usize,
    /// Links are followed only where they stay inside these.
    allowed: crate::access::LocalRoots,
}

impl Registry {
    /// Scans `dirs` (or the configured models directories when empty) and registers
    /// every model found. Paths that look like models but cannot be used are reported
    /// in `skipped` with the reason.
    pub async fn scan(&self, dirs: Vec<PathBuf>) -> Result<ScanOutcome> {
        let dirs = if dirs.is_empty() {
            if self.models_dirs().is_empty() {
                return Err(Error::invalid(
                    "directories",
                    "no directories given, and the agent has no --models-dir configured",
                ));
            }
            self.models_dirs().to_vec()
        } else {
            dirs
        };
        let mut canonical = Vec::with_capacity(dirs.len());
        for (i, d) in dirs.iter().enumerate() {
            if !d.is_absolute() {
                return Err(Error::invalid(
                    format!("directories[{i}]"),
                    format!(
                        "{} must be an absolute path on the agent's host",
                        d.display()
                    ),
                ));
            }
            // Before the path is looked at, so one outside the roots reveals nothing.
            self.roots().check(&format!("directories[{i}]"), d)?;
            let c = fs::canonicalize(d).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => Error::PathNotFound { path: d.clone() },
                _ => Error::PathUnusable {
                    path: d.clone(),
                    reason: e.to_string(),
                },
            })?;
            if !c.is_dir() {
                return Err(Error::PathUnusable {
                    path: d.clone(),
                    reason: "is not a directory".into(),
                });
            }
            canonical.push(c);
        }
        let roots = canonical.clone();
        let allowed = self.roots().clone();
        let walk = tokio::task::spawn_blocking(move || {
            let mut walk = Walk {
                allowed,
                ..Walk::default()
            };
            for root in &roots {
                walk_dir(root, 0, &mut walk);
            }
            walk
        })
        .await?;
        let mut outcome = ScanOutcome {
            directories: canonical,
            skipped: walk.skipped,
            ..ScanOutcome::default()
        };
        for found in walk.found {
            let shown = found.local_path.display().to_string();
            match self
                .upsert_discovered(found.spec, found.local_path, "scan")
                .await
            {
                Ok(entry) => outcome.models.push(entry),
                // One model in use must not stop the rest of the scan.
                Err(e @ Error::ModelInUse { .. }) => outcome.skipped.push((shown, e.to_string())),
                Err(e) => return Err(e),
            }
        }
        Ok(outcome)
    }
}

fn walk_dir(dir: &Path, depth: usize, walk: &mut Walk) {
    let shown = dir.display().to_string();
    match dir::sniff_dir(dir) {
        Ok(Some(model)) => {
            match dir_spec(dir, model) {
                Ok(found) => walk.found.push(found),
                Err(reason) => walk.skipped.push((shown, reason)),
            }
            return;
        }
        Ok(None) => {}
        Err(reason) => {
            walk.skipped.push((shown, reason));
            return;
        }
    }
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).collect(),
        Err(e) => {
            walk.skipped
                .push((shown, format!("cannot read directory: {e}")));
            return;
        }
    };
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        walk.visited += 1;
        if walk.visited > MAX_ENTRIES {
            walk.skipped
                .push((shown, format!("scan stopped after {MAX_ENTRIES} entries")));
            return;
        }
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follow symlinks to files, never to directories (no loops).
        let Ok(meta) = fs::metadata(&path) else {
            walk.skipped
                .push((path.display().to_string(), "dangling symlink".into()));
            continue;
        };
        let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
        if is_link && walk.allowed.check("", &path).is_err() {
            walk.skipped.push((
                path.display().to_string(),
                "a link leading outside the allowed directories".into(),
            ));
            continue;
        }
        if meta.is_dir() {
            if !is_link && depth < MAX_DEPTH {
                walk_dir(&path, depth + 1, walk);
            }
        } else if meta.is_file() {
            scan_file(&path, meta.len(), walk);
        }
    }
}

fn scan_file(path: &Path, size: u64, walk: &mut Walk) {
    let shown = path.display().to_string();
    match sniff_file(path) {
        Ok(Sniffed::Model { format, metadata }) => match file_spec(path, size, format, metadata) {
            Ok(found) => walk.found.push(found),
            Err(reason) => walk.skipped.push((shown, reason)),
        },
        Ok(Sniffed::Archive(kind)) => match archive::inspect(path, kind) {
            Ok(inspection) => {
                if inspection.models.is_empty() && inspection.skipped.is_empty() {
                    walk.skipped
                        .push((shown.clone(), format!("{kind} archive holds no model file")));
                }
                for (member, reason) in inspection.skipped {
                    walk.skipped.push((format!("{shown}!/{member}"), reason));
                }
                for member in inspection.models {
                    match member_spec(path, kind, member) {
                        Ok(found) => walk.found.push(found),
                        Err(reason) => walk.skipped.push((shown.clone(), reason)),
                    }
                }
            }
            Err(e) => walk
                .skipped
                .push((shown, format!("unreadable {kind} archive: {e}"))),
        },
        Ok(Sniffed::Malformed { format, reason }) => {
            walk.skipped
                .push((shown, format!("malformed {format} file: {reason}")));
        }
        Ok(Sniffed::Unknown) => {
            walk.skipped
                .push((shown, "not a recognized model format".into()));
        }
        Err(e) => walk.skipped.push((shown, format!("cannot read: {e}"))),
    }
}

/// A model id derived from a file name: lower case, with anything outside the id
/// alphabet turned into '-'.
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
            c
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    let trimmed = out
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .trim_end_matches(['-', '.', '_']);
    let mut id: String = trimmed.chars().take(limits::ID_MAX - 20).collect();
    if id.is_empty() {
        id = "model".to_owned();
    }
    id
}

/// A fresh id for a find whose natural id is taken by another model.
pub fn disambiguate(base: &str, local_path: &Path, attempt: u32) -> String {
    let digest = Sha256::digest(local_path.display().to_string().as_bytes());
    let short = hex::encode(&digest[..4]);
    if attempt <= 1 {
        format!("{base}-{short}")
    } else {
        format!("{base}-{short}-{attempt}")
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn file_url(path: &Path) -> std::result::Result<String, String> {
    url::Url::from_file_path(path)
        .map(|u| u.to_string())
        .map_err(|()| format!("{} cannot be expressed as a file URL", path.display()))
}

fn sha256_file(path: &Path) -> std::result::Result<String, String> {
    let file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn base_spec(id_source: &str, format: ModelFormat, metadata: Metadata) -> ModelSpec {
    let display_name = if metadata.name.is_empty() {
        id_source.to_owned()
    } else {
        metadata.name.clone()
    };
    ModelSpec {
        id: slug(id_source),
        display_name: display_name.chars().take(limits::TEXT_MAX).collect(),
        format: Some(format),
        quantization: metadata.quantization,
        context_length: metadata.context_length,
        parameter_count: metadata.parameter_count,
        architecture: metadata
            .architecture
            .chars()
            .take(limits::TEXT_MAX)
            .collect(),
        // A template over the limit is dropped rather than cut: half a template renders
        // garbage, none falls back to the runtime's default.
        chat_template: if metadata.chat_template.len() <= limits::CHAT_TEMPLATE_MAX {
            metadata.chat_template
        } else {
            String::new()
        },
        tokenizer: TokenizerSource {
            kind: if format == ModelFormat::Gguf {
                TokenizerKind::Embedded
            } else {
                TokenizerKind::Auto
            },
            path: String::new(),
        },
        tags: vec!["discovered".to_owned()],
        inputs: metadata
            .inputs
            .into_iter()
            .take(limits::IO_NAMES_MAX)
            .collect(),
        outputs: metadata
            .outputs
            .into_iter()
            .take(limits::IO_NAMES_MAX)
            .collect(),
        ..ModelSpec::default()
    }
}

fn finish(spec: ModelSpec, local_path: PathBuf) -> std::result::Result<Found, String> {
    let spec = spec.validate("spec").map_err(|e| e.to_string())?;
    Ok(Found { spec, local_path })
}

fn file_spec(
    path: &Path,
    size: u64,
    format: ModelFormat,
    metadata: Metadata,
) -> std::result::Result<Found, String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut spec = base_spec(&stem(path), format, metadata);
    spec.files = vec![ModelFile {
        name,
        urls: vec![file_url(path)?],
        sha256: sha256_file(path)?,
        size_bytes: size,
        member: None,
        archive: None,
    }];
    finish(spec, path.to_path_buf())
}

fn member_spec(
    archive_path: &Path,
    kind: modeld_engine_core::ArchiveFormat,
    member: ModelMember,
) -> std::result::Result<Found, String> {
    let member_path = Path::new(&member.path);
    let mut spec = base_spec(&stem(member_path), member.format, member.metadata);
    let name = member_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| member.path.clone());
    spec.files = vec![ModelFile {
        name,
        urls: vec![file_url(archive_path)?],
        sha256: member.sha256,
        size_bytes: member.size,
        member: Some(member.path.clone()),
        archive: Some(kind),
    }];
    let key = PathBuf::from(format!("{}!/{}", archive_path.display(), member.path));
    finish(spec, key)
}

fn dir_spec(dir: &Path, model: DirModel) -> std::result::Result<Found, String> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id_source = name.strip_suffix(".mlpackage").unwrap_or(&name).to_owned();
    let mut spec = base_spec(&id_source, model.format, model.metadata);
    if let Some(tok) = &model.tokenizer_json {
        spec.tokenizer = TokenizerSource {
            kind: TokenizerKind::File,
            path: tok.display().to_string(),
        };
    }
    if model.files.len() > limits::FILES_MAX {
        return Err(format!(
            "{} files; a model may have at most {}",
            model.files.len(),
            limits::FILES_MAX
        ));
    }
    for rel in &model.files {
        let abs = dir.join(rel);
        let size = fs::metadata(&abs)
            .map_err(|e| format!("{}: {e}", abs.display()))?
            .len();
        if size == 0 {
            continue;
        }
        spec.files.push(ModelFile {
            name: rel.display().to_string(),
            urls: vec![file_url(&abs)?],
            sha256: sha256_file(&abs)?,
            size_bytes: size,
            member: None,
            archive: None,
        });
    }
    finish(spec, dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::super::spec;
    use super::*;

    #[test]
    fn slugs_are_valid_ids() {
        for name in [
            "SmolLM2-135M-Instruct.Q4_1",
            "  weird name (v2) ",
            "___",
            "ÜberModel",
            &"x".repeat(300),
        ] {
            let id = slug(name);
            assert!(spec::is_valid_id(&id), "{name:?} -> {id:?}");
        }
        assert_eq!(
            slug("SmolLM2-135M-Instruct.Q4_1"),
            "smollm2-135m-instruct.q4_1"
        );
    }

    #[test]
    fn disambiguated_ids_are_valid_and_stable() {
        let a = disambiguate("tiny", Path::new("/m/a/tiny.gguf"), 1);
        assert_eq!(a, disambiguate("tiny", Path::new("/m/a/tiny.gguf"), 1));
        assert_ne!(a, disambiguate("tiny", Path::new("/m/b/tiny.gguf"), 1));
        assert!(spec::is_valid_id(&a));
    }
}
