//! List filters and opaque page tokens.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use modeld_engine_core::{Accelerator, ModelFormat, Runtime};
use sha2::{Digest, Sha256};

use super::ModelEntry;
use crate::error::{Error, Result};

pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

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

    /// A digest of the filter, so a page token cannot be replayed with other filters.
    fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("{self:?}").as_bytes());
        hex::encode(&h.finalize()[..8])
    }
}

/// Where a page starts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct PageCursor {
    /// Last id of the previous page.
    a: String,
    /// Fingerprint of the filter the token was issued for.
    f: String,
}

pub fn encode_token(after: &str, filter: &ListFilter) -> String {
    let cursor = PageCursor {
        a: after.to_owned(),
        f: filter.fingerprint(),
    };
    // Serializing two strings to JSON cannot fail.
    let json = serde_json::to_vec(&cursor).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// Decodes a page token; an empty token means the first page.
pub fn decode_token(token: &str, filter: &ListFilter) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| Error::InvalidPageToken("it is not a token this agent issued".into()))?;
    let cursor: PageCursor = serde_json::from_slice(&bytes)
        .map_err(|_| Error::InvalidPageToken("it is not a token this agent issued".into()))?;
    if cursor.f != filter.fingerprint() {
        return Err(Error::InvalidPageToken(
            "it was issued for different filters".into(),
        ));
    }
    Ok(Some(cursor.a))
}

/// Turns a requested page size into a count: 0 means the default, larger than the
/// maximum is capped (AIP-158), negative is an error.
pub fn page_size(requested: i32) -> Result<usize> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Error::invalid("page_size", "must not be negative")),
        n => Ok(usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_is_bound_to_its_filter() {
        let f = ListFilter {
            format: Some(ModelFormat::Gguf),
            ..Default::default()
        };
        let t = encode_token("abc", &f);
        assert_eq!(decode_token(&t, &f).unwrap().as_deref(), Some("abc"));
        let other = ListFilter::default();
        assert!(matches!(
            decode_token(&t, &other),
            Err(Error::InvalidPageToken(_))
        ));
        assert!(matches!(
            decode_token("not a token!", &f),
            Err(Error::InvalidPageToken(_))
        ));
    }

    #[test]
    fn page_size_defaults_and_caps() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5000).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }
}
