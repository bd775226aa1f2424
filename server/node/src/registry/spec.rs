//! The validated domain form of a model spec, and its persisted record form.

use std::collections::HashSet;

use modeld_engine_core::{Accelerator, ArchiveFormat, ModelFormat, Runtime};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{FileRecord, SpecRecord};

/// Explicit limits on what a spec may hold, so a hostile manifest cannot make the agent
/// store or echo unbounded data.
pub mod limits {
    pub const ID_MAX: usize = 128;
    pub const TEXT_MAX: usize = 256;
    pub const DESCRIPTION_MAX: usize = 4096;
    pub const CHAT_TEMPLATE_MAX: usize = 64 * 1024;
    pub const FILES_MAX: usize = 512;
    pub const URLS_PER_FILE_MAX: usize = 16;
    pub const URL_MAX: usize = 2048;
    pub const TAGS_MAX: usize = 64;
    pub const TAG_MAX: usize = 64;
    pub const PATH_MAX: usize = 1024;
    pub const IO_NAMES_MAX: usize = 1024;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    #[default]
    Auto,
    Embedded,
    File,
    Runtime,
}

impl TokenizerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenizerKind::Auto => "auto",
            TokenizerKind::Embedded => "embedded",
            TokenizerKind::File => "file",
            TokenizerKind::Runtime => "runtime",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            TokenizerKind::Auto,
            TokenizerKind::Embedded,
            TokenizerKind::File,
            TokenizerKind::Runtime,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSource {
    #[serde(default)]
    pub kind: TokenizerKind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
}

/// One file of a model and its sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub name: String,
    #[serde(default)]
    pub urls: Vec<String>,
    pub sha256: String,
    #[serde(alias = "size")]
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveFormat>,
}

/// A model spec as clients, catalogs and discovery describe it. Build one, then call
/// [`ModelSpec::validate`] before it goes anywhere near the store.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub display_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub family: String,
    #[serde(default)]
    pub format: Option<ModelFormat>,
    #[serde(default)]
    pub files: Vec<ModelFile>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub quantization: String,
    #[serde(default)]
    pub context_length: u32,
    #[serde(default)]
    pub parameter_count: u64,
    #[serde(default)]
    pub estimated_memory_bytes: u64,
    #[serde(default)]
    pub tokenizer: TokenizerSource,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub license: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_runtime: Option<Runtime>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chat_template: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Graph input names (ONNX, Core ML).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Graph output names (ONNX, Core ML).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
}

/// True for ids of 1-128 chars of `[a-z0-9._-]` starting with a letter or digit.
pub fn is_valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && id.len() <= limits::ID_MAX
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

/// Checks a model id given on its own, e.g. in GetModel.
pub fn validate_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if !is_valid_id(id) {
        return Err(Error::invalid(
            field,
            format!(
                "{id:?} is not a valid model id: use 1-{} characters of a-z, 0-9, '.', '_' \
                 or '-', starting with a letter or digit",
                limits::ID_MAX
            ),
        ));
    }
    Ok(())
}

/// True for a lower-case 64-character hex sha256.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_len(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; the limit is {max}", value.len()),
        ));
    }
    Ok(())
}

/// A relative path that stays inside the model directory.
fn check_relative_path(field: &str, path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    check_len(field, path, limits::PATH_MAX)?;
    let p = std::path::Path::new(path);
    let escapes = p.is_absolute()
        || path.starts_with('/')
        || path.contains('\\')
        || path.contains('\0')
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)));
    if escapes {
        return Err(Error::invalid(
            field,
            format!("{path:?} must be a relative path without '..', '.', or backslashes"),
        ));
    }
    Ok(())
}

fn check_url(field: &str, raw: &str) -> Result<()> {
    check_len(field, raw, limits::URL_MAX)?;
    let url = url::Url::parse(raw)
        .map_err(|e| Error::invalid(field, format!("{raw:?} is not a URL: {e}")))?;
    match url.scheme() {
        "http" | "https" | "modeld" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err(Error::invalid(field, format!("{raw:?} has no host")));
            }
        }
        "file" => {
            if url.to_file_path().is_err() {
                return Err(Error::invalid(
                    field,
                    format!("{raw:?} is not an absolute local file URL"),
                ));
            }
        }
        other => {
            return Err(Error::invalid(
                field,
                format!("URL scheme {other:?} is not supported; use http, https, file or modeld"),
            ));
        }
    }
    Ok(())
}

impl ModelSpec {
    /// Checks every field against its limits and normalizes case, returning the spec the
    /// store may hold. Field paths in errors are prefixed with `prefix` (e.g. `spec`).
    pub fn validate(mut self, prefix: &str) -> Result<ModelSpec> {
        let f = |name: &str| format!("{prefix}.{name}");
        validate_id(&f("id"), &self.id)?;
        if self.format.is_none() {
            return Err(Error::invalid(
                f("format"),
                format!(
                    "is required; one of: {}",
                    ModelFormat::ALL.map(|m| m.as_str()).join(", ")
                ),
            ));
        }
        check_len(&f("display_name"), &self.display_name, limits::TEXT_MAX)?;
        check_len(&f("family"), &self.family, limits::TEXT_MAX)?;
        check_len(&f("license"), &self.license, limits::TEXT_MAX)?;
        check_len(&f("architecture"), &self.architecture, limits::TEXT_MAX)?;
        check_len(
            &f("description"),
            &self.description,
            limits::DESCRIPTION_MAX,
        )?;
        check_len(
            &f("chat_template"),
            &self.chat_template,
            limits::CHAT_TEMPLATE_MAX,
        )?;
        self.quantization = self.quantization.trim().to_ascii_uppercase();
        check_len(&f("quantization"), &self.quantization, limits::TEXT_MAX)?;

        if self.files.is_empty() {
            return Err(Error::invalid(f("files"), "needs at least one file"));
        }
        if self.files.len() > limits::FILES_MAX {
            return Err(Error::invalid(
                f("files"),
                format!(
                    "has {} files; the limit is {}",
                    self.files.len(),
                    limits::FILES_MAX
                ),
            ));
        }
        let mut names = HashSet::new();
        for (i, file) in self.files.iter_mut().enumerate() {
            let ff = |name: &str| format!("{prefix}.files[{i}].{name}");
            check_relative_path(&ff("name"), &file.name)?;
            if !names.insert(file.name.clone()) {
                return Err(Error::invalid(
                    ff("name"),
                    format!("{:?} appears twice", file.name),
                ));
            }
            if file.urls.is_empty() {
                return Err(Error::invalid(ff("urls"), "needs at least one source URL"));
            }
            if file.urls.len() > limits::URLS_PER_FILE_MAX {
                return Err(Error::invalid(
                    ff("urls"),
                    format!(
                        "has {} URLs; the limit is {}",
                        file.urls.len(),
                        limits::URLS_PER_FILE_MAX
                    ),
                ));
            }
            for (j, url) in file.urls.iter().enumerate() {
                check_url(&format!("{prefix}.files[{i}].urls[{j}]"), url)?;
            }
            file.sha256 = file.sha256.trim().to_ascii_lowercase();
            if !is_sha256_hex(&file.sha256) {
                return Err(Error::invalid(
                    ff("sha256"),
                    format!("{:?} is not a 64-character hex sha256", file.sha256),
                ));
            }
            if file.size_bytes == 0 {
                return Err(Error::invalid(ff("size_bytes"), "must be greater than 0"));
            }
            if let Some(member) = &file.member {
                check_relative_path(&ff("member"), member)?;
                if file.archive.is_none() {
                    return Err(Error::invalid(
                        ff("archive"),
                        "is required when member is set (zip or tar.gz)",
                    ));
                }
            }
        }

        for (name, list) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            if list.len() > limits::IO_NAMES_MAX {
                return Err(Error::invalid(
                    f(name),
                    format!(
                        "has {} names; the limit is {}",
                        list.len(),
                        limits::IO_NAMES_MAX
                    ),
                ));
            }
            for (i, n) in list.iter().enumerate() {
                check_len(&format!("{prefix}.{name}[{i}]"), n, limits::TEXT_MAX)?;
            }
        }
        if self.tags.len() > limits::TAGS_MAX {
            return Err(Error::invalid(
                f("tags"),
                format!(
                    "has {} tags; the limit is {}",
                    self.tags.len(),
                    limits::TAGS_MAX
                ),
            ));
        }
        for (i, tag) in self.tags.iter_mut().enumerate() {
            *tag = tag.trim().to_owned();
            if tag.is_empty() {
                return Err(Error::invalid(format!("{prefix}.tags[{i}]"), "is empty"));
            }
            check_len(&format!("{prefix}.tags[{i}]"), tag, limits::TAG_MAX)?;
        }
        if self.tokenizer.kind == TokenizerKind::File {
            check_relative_path(&f("tokenizer.path"), &self.tokenizer.path)?;
        }
        if let (Some(runtime), Some(format)) = (self.preferred_runtime, self.format)
            && !runtime.formats().contains(&format)
        {
            return Err(Error::invalid(
                f("preferred_runtime"),
                format!("{runtime} cannot run {format} models"),
            ));
        }
        Ok(self)
    }

    /// The format; validated specs always have one.
    pub fn format_or_err(&self) -> Result<ModelFormat> {
        self.format
            .ok_or_else(|| Error::invalid("spec.format", "is required"))
    }

    /// Sum of the declared file sizes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }

    /// Runtimes that can execute this model's format, whether compiled in or not.
    pub fn runtimes(&self) -> Vec<Runtime> {
        match self.format {
            Some(f) => Runtime::for_format(f).collect(),
            None => Vec::new(),
        }
    }

    /// Accelerators reachable through any runtime for this model's format.
    pub fn accelerators(&self) -> Vec<Accelerator> {
        let mut out: Vec<Accelerator> = self
            .runtimes()
            .into_iter()
            .flat_map(|r| r.accelerators().iter().copied())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

impl From<&ModelSpec> for SpecRecord {
    fn from(s: &ModelSpec) -> Self {
        SpecRecord {
            id: s.id.clone(),
            display_name: s.display_name.clone(),
            family: s.family.clone(),
            format: s.format.map(|f| f.as_str().to_owned()).unwrap_or_default(),
            files: s
                .files
                .iter()
                .map(|f| FileRecord {
                    name: f.name.clone(),
                    urls: f.urls.clone(),
                    sha256: f.sha256.clone(),
                    size_bytes: f.size_bytes,
                    member: f.member.clone().unwrap_or_default(),
                    archive: f.archive.map(|a| a.as_str().to_owned()).unwrap_or_default(),
                })
                .collect(),
            quantization: s.quantization.clone(),
            context_length: s.context_length,
            parameter_count: s.parameter_count,
            estimated_memory_bytes: s.estimated_memory_bytes,
            tokenizer_kind: s.tokenizer.kind.as_str().to_owned(),
            tokenizer_path: s.tokenizer.path.clone(),
            license: s.license.clone(),
            tags: s.tags.clone(),
            architecture: s.architecture.clone(),
            preferred_runtime: s
                .preferred_runtime
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default(),
            chat_template: s.chat_template.clone(),
            description: s.description.clone(),
            inputs: s.inputs.clone(),
            outputs: s.outputs.clone(),
        }
    }
}

impl TryFrom<SpecRecord> for ModelSpec {
    type Error = Error;

    fn try_from(r: SpecRecord) -> Result<Self> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| Error::CorruptRecord {
            tree: "models",
            key: r.id.clone(),
            message: format!("{what}: {e}"),
        };
        let format = (!r.format.is_empty())
            .then(|| r.format.parse::<ModelFormat>())
            .transpose()
            .map_err(|e| corrupt("format", &e))?;
        let preferred_runtime = (!r.preferred_runtime.is_empty())
            .then(|| r.preferred_runtime.parse::<Runtime>())
            .transpose()
            .map_err(|e| corrupt("preferred_runtime", &e))?;
        let mut files = Vec::with_capacity(r.files.len());
        for f in &r.files {
            let archive = (!f.archive.is_empty())
                .then(|| f.archive.parse::<ArchiveFormat>())
                .transpose()
                .map_err(|e| corrupt("archive", &e))?;
            files.push(ModelFile {
                name: f.name.clone(),
                urls: f.urls.clone(),
                sha256: f.sha256.clone(),
                size_bytes: f.size_bytes,
                member: (!f.member.is_empty()).then(|| f.member.clone()),
                archive,
            });
        }
        let kind = TokenizerKind::parse(&r.tokenizer_kind).unwrap_or_default();
        Ok(ModelSpec {
            format,
            preferred_runtime,
            files,
            tokenizer: TokenizerSource {
                kind,
                path: r.tokenizer_path,
            },
            id: r.id,
            display_name: r.display_name,
            family: r.family,
            quantization: r.quantization,
            context_length: r.context_length,
            parameter_count: r.parameter_count,
            estimated_memory_bytes: r.estimated_memory_bytes,
            license: r.license,
            tags: r.tags,
            architecture: r.architecture,
            chat_template: r.chat_template,
            description: r.description,
            inputs: r.inputs,
            outputs: r.outputs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ModelSpec {
        ModelSpec {
            id: "tiny".into(),
            format: Some(ModelFormat::Gguf),
            files: vec![ModelFile {
                name: "tiny.gguf".into(),
                urls: vec!["http://mirror.example/tiny.gguf".into()],
                sha256: "A".repeat(64),
                size_bytes: 10,
                member: None,
                archive: None,
            }],
            quantization: "q4_1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn validate_normalizes_case() {
        let spec = sample().validate("spec").unwrap();
        assert_eq!(spec.quantization, "Q4_1");
        assert_eq!(spec.files[0].sha256, "a".repeat(64));
    }

    #[test]
    fn validate_names_the_offending_field() {
        let mut spec = sample();
        spec.files[0].name = "../escape.gguf".into();
        let err = spec.validate("spec").unwrap_err().to_string();
        assert!(err.starts_with("spec.files[0].name:"), "{err}");

        let mut spec = sample();
        spec.files[0].urls = vec!["ftp://x/y".into()];
        let err = spec.validate("spec").unwrap_err().to_string();
        assert!(
            err.contains("spec.files[0].urls[0]") && err.contains("ftp"),
            "{err}"
        );

        let mut spec = sample();
        spec.id = "Has Space".into();
        assert!(
            spec.validate("spec")
                .unwrap_err()
                .to_string()
                .starts_with("spec.id")
        );

        let mut spec = sample();
        spec.files[0].member = Some("inner.gguf".into());
        assert!(
            spec.validate("spec")
                .unwrap_err()
                .to_string()
                .contains("archive")
        );
    }

    #[test]
    fn record_round_trip_preserves_the_spec() {
        let mut spec = sample().validate("spec").unwrap();
        spec.preferred_runtime = Some(Runtime::LlamaCpp);
        spec.files[0].archive = Some(ArchiveFormat::Zip);
        spec.files[0].member = Some("m/tiny.gguf".into());
        spec.tokenizer.kind = TokenizerKind::Embedded;
        let back = ModelSpec::try_from(SpecRecord::from(&spec)).unwrap();
        assert_eq!(back, spec);
    }
}
