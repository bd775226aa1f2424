use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A model format, as detected from file content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    Gguf,
    Onnx,
    Safetensors,
    #[serde(rename = "coreml")]
    CoreMl,
    Tflite,
    #[serde(rename = "executorch")]
    ExecuTorch,
    Mlc,
    #[serde(rename = "picollm")]
    PicoLlm,
    Mlx,
}

impl ModelFormat {
    pub const ALL: [ModelFormat; 9] = [
        ModelFormat::Gguf,
        ModelFormat::Onnx,
        ModelFormat::Safetensors,
        ModelFormat::CoreMl,
        ModelFormat::Tflite,
        ModelFormat::ExecuTorch,
        ModelFormat::Mlc,
        ModelFormat::PicoLlm,
        ModelFormat::Mlx,
    ];

    /// The lower-case name used in catalogs, the CLI and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Gguf => "gguf",
            ModelFormat::Onnx => "onnx",
            ModelFormat::Safetensors => "safetensors",
            ModelFormat::CoreMl => "coreml",
            ModelFormat::Tflite => "tflite",
            ModelFormat::ExecuTorch => "executorch",
            ModelFormat::Mlc => "mlc",
            ModelFormat::PicoLlm => "picollm",
            ModelFormat::Mlx => "mlx",
        }
    }
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that matches none of the known values; the message lists the accepted ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}; expected one of: {expected}")]
pub struct ParseNameError {
    pub kind: &'static str,
    pub value: String,
    pub expected: String,
}

impl FromStr for ModelFormat {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace(['-', '_', ' '], "");
        ModelFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == wanted)
            .ok_or_else(|| ParseNameError {
                kind: "model format",
                value: s.to_owned(),
                expected: names(ModelFormat::ALL.iter().map(|f| f.as_str())),
            })
    }
}

/// How a source file is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArchiveFormat {
    #[serde(rename = "zip")]
    Zip,
    #[serde(rename = "tar.gz", alias = "tar_gz", alias = "tgz")]
    TarGz,
}

impl ArchiveFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveFormat::Zip => "zip",
            ArchiveFormat::TarGz => "tar.gz",
        }
    }
}

impl fmt::Display for ArchiveFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ArchiveFormat {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "zip" => Ok(ArchiveFormat::Zip),
            "tar.gz" | "tar_gz" | "tgz" => Ok(ArchiveFormat::TarGz),
            _ => Err(ParseNameError {
                kind: "archive format",
                value: s.to_owned(),
                expected: "zip, tar.gz".to_owned(),
            }),
        }
    }
}

pub(crate) fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_round_trip_and_tolerate_case_and_separators() {
        for f in ModelFormat::ALL {
            assert_eq!(f.as_str().parse::<ModelFormat>(), Ok(f));
        }
        assert_eq!("Core-ML".parse::<ModelFormat>(), Ok(ModelFormat::CoreMl));
        assert_eq!("GGUF".parse::<ModelFormat>(), Ok(ModelFormat::Gguf));
    }

    #[test]
    fn unknown_format_lists_accepted_names() {
        let err = "pickle".parse::<ModelFormat>().unwrap_err();
        assert!(err.to_string().contains("gguf, onnx"), "{err}");
    }
}
