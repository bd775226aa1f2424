//! One pagination scheme for every List (AIP-158): opaque keyset tokens. A token holds
//! the key of the last item served and a fingerprint of the list it belongs to (its
//! name and filters), so the next page starts after that key even when items were
//! added or removed in between, and a token cannot be replayed on another list.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// Where a page starts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Cursor {
    /// Key of the last item of the previous page.
    a: String,
    /// Fingerprint of the list the token was issued for.
    f: String,
}

/// A short digest of whatever identifies a list (its name, its filters).
pub fn fingerprint(scope: &str) -> String {
    let digest = Sha256::digest(scope.as_bytes());
    hex::encode(&digest[..8])
}

pub fn encode_token(after: &str, scope: &str) -> String {
    let cursor = Cursor {
        a: after.to_owned(),
        f: fingerprint(scope),
    };
    // Serializing two strings to JSON cannot fail.
    let json = serde_json::to_vec(&cursor).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// The key a page starts after; an empty token means the first page.
pub fn decode_token(token: &str, scope: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let foreign = || Error::InvalidPageToken("it is not a token this agent issued".into());
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| foreign())?;
    let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| foreign())?;
    if cursor.f != fingerprint(scope) {
        return Err(Error::InvalidPageToken(
            "it was issued for a different list or different filters".into(),
        ));
    }
    Ok(Some(cursor.a))
}

/// Turns a requested page size into a count: 0 means the default, larger than the
/// maximum is capped, negative is an error.
pub fn page_size(requested: i32) -> Result<usize> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Error::invalid("page_size", "must not be negative")),
        n => Ok(usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE)),
    }
}

/// One page of `items` in the order of `key`, after `token`'s key, with the token of
/// the next page (empty on the last).
pub fn paginate<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> String,
    page_size: i32,
    token: &str,
    scope: &str,
) -> Result<(Vec<T>, String)> {
    let size = self::page_size(page_size)?;
    let after = decode_token(token, scope)?;
    items.sort_by_key(|i| key(i));
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|i| after.as_deref().is_none_or(|a| key(i).as_str() > a))
        .collect();
    let more = rest.len() > size;
    rest.truncate(size);
    let next = match rest.last() {
        Some(last) if more => encode_token(&key(last), scope),
        _ => String::new(),
    };
    Ok((rest, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_list() {
        let t = encode_token("abc", "models format=gguf");
        assert_eq!(
            decode_token(&t, "models format=gguf").unwrap().as_deref(),
            Some("abc")
        );
        assert!(matches!(
            decode_token(&t, "transfers"),
            Err(Error::InvalidPageToken(_))
        ));
        assert!(matches!(
            decode_token("not a token!", "transfers"),
            Err(Error::InvalidPageToken(_))
        ));
    }

    #[test]
    fn page_size_defaults_and_caps() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5).unwrap(), 5);
        assert_eq!(page_size(1_000_000).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn pages_follow_keys_even_when_the_list_changes_between_them() {
        let key = |s: &&str| (*s).to_owned();
        let (first, token) = paginate(vec!["d", "a", "c", "b"], key, 2, "", "l").unwrap();
        assert_eq!(first, ["a", "b"]);
        // "b" went away and "aa" came in before the next call: the page still starts
        // after "b", skipping nothing and repeating nothing.
        let (second, token) = paginate(vec!["a", "aa", "c", "d"], key, 2, &token, "l").unwrap();
        assert_eq!(second, ["c", "d"]);
        assert!(token.is_empty(), "the last page has no next token");
        let (all, token) = paginate(vec!["x", "y"], key, 0, "", "l").unwrap();
        assert_eq!((all.len(), token.as_str()), (2, ""));
    }
}
