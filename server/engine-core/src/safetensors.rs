//! Reads and checks a safetensors header: an 8-byte little-endian length, then a JSON
//! object of tensors, each with dtype, shape and data offsets inside the file.

use std::collections::BTreeMap;
use std::io::Read;

/// The format's own limit on the header size.
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SafetensorsHeader {
    pub tensor_count: usize,
    /// Weights, not counting MLX's packed words (below) nor their scales and biases.
    pub parameter_count: u64,
    /// `uint32` words of MLX-quantized weights (`X.weight` beside `X.scales`): each
    /// holds 32 / bits weights, and only the model's config.json knows the bits.
    pub packed_words: u64,
    /// The dtype holding the most parameters, e.g. "F16".
    pub dominant_dtype: String,
    pub metadata: BTreeMap<String, String>,
    /// Every tensor's dtype and shape, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TensorInfo {
    /// Upper-case, e.g. "F16".
    pub dtype: String,
    pub shape: Vec<u64>,
}

/// Bytes per element of the dtypes whose size is fixed; others are not size-checked.
fn element_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

#[derive(serde::Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses the header of a safetensors file of `size` bytes. Errors describe what is wrong.
pub fn read_header<R: Read>(mut r: R, size: u64) -> Result<SafetensorsHeader, String> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(len);
    if !(2..=MAX_HEADER).contains(&n) || n > size.saturating_sub(8) {
        return Err(format!("header length {n} does not fit a {size}-byte file"));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header).map_err(|e| e.to_string())?;
    if header.first() != Some(&b'{') {
        return Err("header does not start with '{'".into());
    }
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("header is not a JSON object: {e}"))?;
    let data_size = size - 8 - n;
    let mut out = SafetensorsHeader::default();
    let mut by_dtype: BTreeMap<String, u64> = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            let meta: BTreeMap<String, String> = serde_json::from_value(value)
                .map_err(|e| format!("__metadata__ must map strings to strings: {e}"))?;
            out.metadata = meta;
            continue;
        }
        let t: TensorEntry =
            serde_json::from_value(value).map_err(|e| format!("tensor {name:?}: {e}"))?;
        let [begin, end] = t.data_offsets;
        if begin > end || end > data_size {
            return Err(format!(
                "tensor {name:?}: data offsets [{begin}, {end}] fall outside the {data_size}-byte data section"
            ));
        }
        let elems = t
            .shape
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .ok_or_else(|| format!("tensor {name:?}: shape overflows"))?;
        let dtype = t.dtype.to_ascii_uppercase();
        // A shape must account for exactly the bytes the tensor spans, or a reader
        // sizing buffers from the shape would trust a lie.
        if let Some(size) = element_bytes(&dtype) {
            let bytes = elems.checked_mul(size);
            if bytes != Some(end - begin) {
                return Err(format!(
                    "tensor {name:?}: shape {:?} of {dtype} needs {} bytes but its data spans {}",
                    t.shape,
                    bytes.map_or_else(|| "more than 2^64".to_owned(), |b| b.to_string()),
                    end - begin
                ));
            }
        }
        out.tensor_count += 1;
        out.parameter_count = out.parameter_count.saturating_add(elems);
        *by_dtype.entry(dtype.clone()).or_default() += elems;
        out.tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape: t.shape,
            },
        );
    }
    if out.tensor_count == 0 {
        return Err("header lists no tensors".into());
    }
    let elements = |t: &TensorInfo| t.shape.iter().product::<u64>();
    for (name, t) in &out.tensors {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let scales = out.tensors.get(&format!("{module}.scales"));
        if t.dtype != "U32" || scales.is_none() {
            continue;
        }
        let biases = out.tensors.get(&format!("{module}.biases"));
        out.packed_words = out.packed_words.saturating_add(elements(t));
        let overhead = [Some(t), scales, biases]
            .into_iter()
            .flatten()
            .map(elements)
            .sum::<u64>();
        out.parameter_count = out.parameter_count.saturating_sub(overhead);
    }
    out.dominant_dtype = by_dtype
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(d, _)| d)
        .unwrap_or_default();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        b
    }

    #[test]
    fn reads_tensors_and_metadata() {
        let b = file(
            r#"{"__metadata__":{"format":"mlx"},"w":{"dtype":"F16","shape":[2,4],"data_offsets":[0,16]}}"#,
            16,
        );
        let h = read_header(&b[..], b.len() as u64).unwrap();
        assert_eq!(h.parameter_count, 8);
        assert_eq!(h.dominant_dtype, "F16");
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("mlx"));
    }

    #[test]
    fn mlx_packed_words_are_counted_apart_from_weights() {
        // A 4x64 projection in 4 bits (4x8 words, groups of 32: 4x2 scales and
        // biases) and a norm of 64 floats.
        let b = file(
            r#"{"p.weight":{"dtype":"U32","shape":[4,8],"data_offsets":[0,128]},"p.scales":{"dtype":"F16","shape":[4,2],"data_offsets":[128,144]},"p.biases":{"dtype":"F16","shape":[4,2],"data_offsets":[144,160]},"n.weight":{"dtype":"F32","shape":[64],"data_offsets":[160,416]}}"#,
            416,
        );
        let h = read_header(&b[..], b.len() as u64).unwrap();
        assert_eq!(h.packed_words, 32);
        assert_eq!(h.parameter_count, 64);
    }

    #[test]
    fn offsets_past_the_end_are_rejected() {
        let b = file(
            r#"{"w":{"dtype":"F16","shape":[2,4],"data_offsets":[0,16]}}"#,
            8,
        );
        assert!(
            read_header(&b[..], b.len() as u64)
                .unwrap_err()
                .contains("outside")
        );
    }

    #[test]
    fn shapes_that_do_not_match_the_data_are_rejected() {
        let b = file(
            r#"{"w":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,16]}}"#,
            16,
        );
        let err = read_header(&b[..], b.len() as u64).unwrap_err();
        assert!(err.contains("overflows") || err.contains("needs"), "{err}");
        let b = file(
            r#"{"w":{"dtype":"F32","shape":[2,4],"data_offsets":[0,16]}}"#,
            16,
        );
        assert!(
            read_header(&b[..], b.len() as u64)
                .unwrap_err()
                .contains("needs 32 bytes")
        );
    }

    #[test]
    fn absurd_header_length_is_rejected() {
        let mut b = file(r#"{"w":1}"#, 0);
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_header(&b[..], b.len() as u64).is_err());
    }
}
