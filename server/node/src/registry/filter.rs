//! ListModels filters.

use modeld_engine_core::{Accelerator, ModelFormat, Runtime};

use super::ModelEntry;

/// Filters of ListModels; all set ones must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub runtime: Option<Runtime>,
    pub format: Option<ModelFormat>,
    /// Upper-cased quantization label.
    pub quantization: Option<String>,
    pub max_size_bytes: Option<u64>,
    pub min_context_length: Option<u32>,
    pub accelerator: Option<Accelerator>,
    /// Lower-cased free text.
    pub query: Option<String>,
}

impl ListFilter {
    pub fn matches(&self, entry: &ModelEntry) -> bool {
        let spec = &entry.spec;
        if let Some(runtime) = self.runtime
            && !spec.format.is_some_and(|f| runtime.formats().contains(&f))
        {
            return false;
        }
        if self.format.is_some() && spec.format != self.format {
            return false;
        }
        if let Some(q) = &self.quantization
            && !spec.quantization.eq_ignore_ascii_case(q)
        {
            return false;
        }
        if let Some(max) = self.max_size_bytes
            && spec.total_size() > max
        {
            return false;
        }
        if let Some(min) = self.min_context_length
            && spec.context_length < min
        {
            return false;
        }
        if let Some(acc) = self.accelerator
            && !spec.accelerators().contains(&acc)
        {
            return false;
        }
        if let Some(q) = &self.query {
            let hay = [&spec.id, &spec.display_name, &spec.family];
            let hit = hay.iter().any(|h| h.to_lowercase().contains(q))
                || spec.tags.iter().any(|t| t.to_lowercase().contains(q));
            if !hit {
                return false;
            }
        }
        true
    }

    /// What a page token is bound to: ListModels with these filters.
    pub fn page_scope(&self) -> String {
        format!("models {self:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::page::{decode_token, encode_token};

    #[test]
    fn a_token_is_bound_to_its_filters() {
        let f = ListFilter {
            format: Some(ModelFormat::Gguf),
            ..Default::default()
        };
        let t = encode_token("abc", &f.page_scope());
        assert_eq!(
            decode_token(&t, &f.page_scope()).unwrap().as_deref(),
            Some("abc")
        );
        assert!(matches!(
            decode_token(&t, &ListFilter::default().page_scope()),
            Err(Error::InvalidPageToken(_))
        ));
    }
}
