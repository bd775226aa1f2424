use std::path::PathBuf;
use std::sync::Arc;

use modeld_proto::v1 as pb;
use modeld_proto::v1::model_registry_server::ModelRegistry;
use tonic::{Request, Response, Status};

use super::Agent;
use super::convert;
use modeld_node::error::Error;
use modeld_node::performance;
use modeld_node::registry::{CatalogFormat, CatalogSource, ListFilter, Origin, compat, spec};

pub struct RegistryApi {
    agent: Arc<Agent>,
}

impl RegistryApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        RegistryApi { agent }
    }
}

fn non_empty(s: String) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

#[tonic::async_trait]
impl ModelRegistry for RegistryApi {
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            let filter = ListFilter {
                runtime: convert::runtime_from_pb("runtime", r.runtime)?,
                format: convert::format_from_pb("format", r.format)?,
                quantization: non_empty(r.quantization).map(|q| q.to_ascii_uppercase()),
                max_size_bytes: (r.max_size_bytes > 0).then_some(r.max_size_bytes),
                min_context_length: (r.min_context_length > 0).then_some(r.min_context_length),
                accelerator: convert::accelerator_from_pb("accelerator", r.accelerator)?,
                query: non_empty(r.query).map(|q| q.to_lowercase()),
            };
            let size = modeld_node::page::page_size(r.page_size)?;
            let page = self
                .agent
                .node
                .registry
                .list(&filter, size, &r.page_token)?;
            Ok(Response::new(pb::ListModelsResponse {
                models: page.models.iter().map(convert::model_to_pb).collect(),
                next_page_token: page.next_page_token,
                total_size: i32::try_from(page.total_size).unwrap_or(i32::MAX),
            }))
        })
        .await
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        super::status::rpc(async move {
            let entry = self.agent.node.registry.get(&request.into_inner().id)?;
            Ok(Response::new(pb::GetModelResponse {
                model: Some(convert::model_to_pb(&entry)),
            }))
        })
        .await
    }

    async fn register_model(
        &self,
        request: Request<pb::RegisterModelRequest>,
    ) -> Result<Response<pb::RegisterModelResponse>, Status> {
        super::status::rpc(async move {
            let spec = request
                .into_inner()
                .spec
                .ok_or_else(|| Error::invalid("spec", "is required"))?;
            let spec = convert::spec_from_pb(spec, "spec")?.validate("spec")?;
            let (entry, created) = self
                .agent
                .node
                .registry
                .register(spec, Origin::Registered, "api")
                .await?;
            Ok(Response::new(pb::RegisterModelResponse {
                model: Some(convert::model_to_pb(&entry)),
                created,
            }))
        })
        .await
    }

    async fn update_model(
        &self,
        request: Request<pb::UpdateModelRequest>,
    ) -> Result<Response<pb::UpdateModelResponse>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            let spec = r
                .spec
                .ok_or_else(|| Error::invalid("spec", "is required"))?;
            let id = spec.id.clone();
            let patch = convert::spec_from_pb(spec, "spec")?;
            let paths: Vec<String> = r
                .update_mask
                .map(|m| m.paths)
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.strip_prefix("spec.").map(str::to_owned).unwrap_or(p))
                .collect();
            let entry = self.agent.node.registry.update(&id, patch, &paths).await?;
            Ok(Response::new(pb::UpdateModelResponse {
                model: Some(convert::model_to_pb(&entry)),
            }))
        })
        .await
    }

    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        super::status::rpc(async move {
            let id = request.into_inner().id;
            self.agent.node.delete_model(&id).await?;
            Ok(Response::new(pb::DeleteModelResponse {}))
        })
        .await
    }

    async fn import_catalog(
        &self,
        request: Request<pb::ImportCatalogRequest>,
    ) -> Result<Response<pb::ImportCatalogResponse>, Status> {
        super::status::rpc(async move {
        let r = request.into_inner();
        use pb::import_catalog_request::Source;
        let source = match r.source {
            Some(Source::Path(p)) if !p.is_empty() => {
                let path = PathBuf::from(&p);
                if !path.is_absolute() {
                    return Err(Error::invalid(
                        "path",
                        format!("{p:?} must be an absolute path on the agent's host"),
                    )
                    .into());
                }
                CatalogSource::Path(path)
            }
            Some(Source::Url(u)) if !u.is_empty() => {
                let parsed = url::Url::parse(&u)
                    .map_err(|e| Error::invalid("url", format!("{u:?} is not a URL: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(Error::invalid("url", format!("scheme {:?} is not supported; use http or https, or `path` for a local file", parsed.scheme())).into());
                }
                CatalogSource::Url(u)
            }
            Some(Source::Content(c)) if !c.trim().is_empty() => CatalogSource::Inline(c),
            _ => {
                return Err(Error::invalid("source", "set one of path, url or content").into());
            }
        };
        let format = match pb::CatalogFormat::try_from(r.format) {
            Ok(pb::CatalogFormat::Unspecified) => None,
            Ok(pb::CatalogFormat::Json) => Some(CatalogFormat::Json),
            Ok(pb::CatalogFormat::Yaml) => Some(CatalogFormat::Yaml),
            Err(_) => {
                return Err(
                    Error::invalid("format", format!("unknown enum value {}", r.format)).into(),
                );
            }
        };
        let outcome = self.agent.node.registry.import(&source, format).await?;
        Ok(Response::new(pb::ImportCatalogResponse {
            created_ids: outcome.created,
            updated_ids: outcome.updated,
            unchanged_ids: outcome.unchanged,
        }))
    })
        .await
    }

    async fn scan_models(
        &self,
        request: Request<pb::ScanModelsRequest>,
    ) -> Result<Response<pb::ScanModelsResponse>, Status> {
        super::status::rpc(async move {
            let dirs = request
                .into_inner()
                .directories
                .into_iter()
                .map(PathBuf::from)
                .collect();
            let outcome = self.agent.node.registry.scan(dirs).await?;
            Ok(Response::new(pb::ScanModelsResponse {
                models: outcome.models.iter().map(convert::model_to_pb).collect(),
                skipped: outcome
                    .skipped
                    .into_iter()
                    .map(|(path, reason)| pb::SkippedPath { path, reason })
                    .collect(),
                directories: outcome
                    .directories
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect(),
            }))
        })
        .await
    }

    async fn check_compatibility(
        &self,
        request: Request<pb::CheckCompatibilityRequest>,
    ) -> Result<Response<pb::CheckCompatibilityResponse>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            use pb::check_compatibility_request::Model;
            let (spec, local) = match r.model {
                Some(Model::Id(id)) => {
                    let entry = self.agent.node.registry.get(&id)?;
                    let local = entry.local_path.is_some()
                        || self.agent.node.storage.is_stored(&entry.spec)?;
                    (entry.spec, local)
                }
                Some(Model::Spec(s)) => {
                    (convert::spec_from_pb(s, "spec")?.validate("spec")?, false)
                }
                None => return Err(Error::invalid("model", "set id or spec").into()),
            };
            spec::validate_id("id", &spec.id)?;
            let runtime = convert::runtime_from_pb("runtime", r.runtime)?;
            let node = self.agent.node.resources();
            let measured = self.agent.node.store.benchmarks()?;
            let rates = {
                let node = self.agent.node.clone();
                tokio::task::spawn_blocking(move || node.rates())
                    .await
                    .map_err(Error::from)?
            };
            let c = compat::check(
                &spec,
                local,
                &node,
                &match spec.format {
                    Some(f) => performance::compiled_ranked(
                        self.agent.node.inference.engines(),
                        f,
                        &measured,
                        rates.as_ref(),
                    ),
                    None => self.agent.node.inference.engines().to_vec(),
                },
                runtime,
                (r.context_length > 0).then_some(r.context_length),
            );
            let estimate = c
                .settings
                .as_ref()
                .and_then(|s| performance::estimate(&spec, s.runtime, rates.as_ref(), &measured));
            Ok(Response::new(pb::CheckCompatibilityResponse {
                performance: estimate.as_ref().map(convert::estimate_to_pb),
                compatible: c.compatible,
                settings: c.settings.map(|s| pb::RuntimeSettings {
                    runtime: convert::runtime_to_pb(s.runtime) as i32,
                    accelerator: convert::accelerator_to_pb(s.accelerator) as i32,
                    context_length: s.context_length,
                    threads: s.threads,
                    gpu_layers: s.gpu_layers,
                    mmap: s.mmap,
                }),
                reasons: c.reasons,
                runtime_available: c.runtime_available,
                fits_memory: c.fits_memory,
                fits_disk: c.fits_disk,
                memory_required_bytes: c.memory_required_bytes,
                memory_available_bytes: c.memory_available_bytes,
                disk_required_bytes: c.disk_required_bytes,
                disk_available_bytes: c.disk_available_bytes,
                candidate_runtimes: c
                    .candidate_runtimes
                    .into_iter()
                    .map(|r| convert::runtime_to_pb(r) as i32)
                    .collect(),
            }))
        })
        .await
    }
}
