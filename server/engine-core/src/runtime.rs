use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::format::{ModelFormat, ParseNameError, names};

/// An inference runtime (framework). Whether it is compiled into a build is the agent's
/// business; this type only knows what each runtime can read and use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    #[serde(rename = "llama.cpp", alias = "llama_cpp", alias = "llama")]
    LlamaCpp,
    #[serde(rename = "onnxruntime", alias = "onnx_runtime", alias = "ort")]
    OnnxRuntime,
    Candle,
    #[serde(rename = "coreml")]
    CoreMl,
    /// TensorFlow Lite models, run by LiteRT (TFLite's runtime since 2024).
    #[serde(alias = "litert")]
    Tflite,
    #[serde(rename = "executorch")]
    ExecuTorch,
    #[serde(rename = "mlc-llm", alias = "mlc_llm", alias = "mlc")]
    MlcLlm,
    #[serde(rename = "picollm")]
    PicoLlm,
    Mlx,
}

impl Runtime {
    pub const ALL: [Runtime; 9] = [
        Runtime::LlamaCpp,
        Runtime::OnnxRuntime,
        Runtime::Candle,
        Runtime::CoreMl,
        Runtime::Tflite,
        Runtime::ExecuTorch,
        Runtime::MlcLlm,
        Runtime::PicoLlm,
        Runtime::Mlx,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::LlamaCpp => "llama.cpp",
            Runtime::OnnxRuntime => "onnxruntime",
            Runtime::Candle => "candle",
            Runtime::CoreMl => "coreml",
            Runtime::Tflite => "tflite",
            Runtime::ExecuTorch => "executorch",
            Runtime::MlcLlm => "mlc-llm",
            Runtime::PicoLlm => "picollm",
            Runtime::Mlx => "mlx",
        }
    }

    /// Formats this runtime can execute, in the order it prefers them.
    pub fn formats(self) -> &'static [ModelFormat] {
        match self {
            Runtime::LlamaCpp => &[ModelFormat::Gguf],
            Runtime::OnnxRuntime => &[ModelFormat::Onnx],
            Runtime::Candle => &[
                ModelFormat::Safetensors,
                ModelFormat::Mlx,
                ModelFormat::Gguf,
            ],
            Runtime::CoreMl => &[ModelFormat::CoreMl],
            Runtime::Tflite => &[ModelFormat::Tflite],
            Runtime::ExecuTorch => &[ModelFormat::ExecuTorch],
            Runtime::MlcLlm => &[ModelFormat::Mlc],
            Runtime::PicoLlm => &[ModelFormat::PicoLlm],
            Runtime::Mlx => &[ModelFormat::Mlx, ModelFormat::Safetensors],
        }
    }

    /// Accelerators the runtime can drive on some platform (not necessarily this one).
    pub fn accelerators(self) -> &'static [Accelerator] {
        use Accelerator::*;
        match self {
            Runtime::LlamaCpp => &[Cpu, Cuda, Metal, Vulkan],
            Runtime::OnnxRuntime => &[Cpu, Cuda, Ane, Nnapi],
            Runtime::Candle => &[Cpu, Cuda, Metal],
            Runtime::CoreMl => &[Cpu, Metal, Ane],
            Runtime::Tflite => &[Cpu, Metal, Nnapi],
            Runtime::ExecuTorch => &[Cpu, Metal, Ane, Vulkan],
            Runtime::MlcLlm => &[Cuda, Metal, Vulkan],
            Runtime::PicoLlm => &[Cpu],
            Runtime::Mlx => &[Metal],
        }
    }

    /// Every runtime that can execute `format`, compiled in or not.
    pub fn for_format(format: ModelFormat) -> impl Iterator<Item = Runtime> {
        Runtime::ALL
            .into_iter()
            .filter(move |r| r.formats().contains(&format))
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Runtime {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = |v: &str| v.to_ascii_lowercase().replace(['-', '_', '.', ' '], "");
        let wanted = key(s.trim());
        let alias = match wanted.as_str() {
            "llama" | "llamacpp" => Some(Runtime::LlamaCpp),
            "ort" | "onnx" => Some(Runtime::OnnxRuntime),
            "mlc" => Some(Runtime::MlcLlm),
            "litert" => Some(Runtime::Tflite),
            _ => None,
        };
        alias
            .or_else(|| Runtime::ALL.into_iter().find(|r| key(r.as_str()) == wanted))
            .ok_or_else(|| ParseNameError {
                kind: "runtime",
                value: s.to_owned(),
                expected: names(Runtime::ALL.iter().map(|r| r.as_str())),
            })
    }
}

/// A compute device.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Accelerator {
    #[default]
    Cpu,
    Cuda,
    Metal,
    Ane,
    Vulkan,
    Nnapi,
}

impl Accelerator {
    pub const ALL: [Accelerator; 6] = [
        Accelerator::Cpu,
        Accelerator::Cuda,
        Accelerator::Metal,
        Accelerator::Ane,
        Accelerator::Vulkan,
        Accelerator::Nnapi,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Cpu => "cpu",
            Accelerator::Cuda => "cuda",
            Accelerator::Metal => "metal",
            Accelerator::Ane => "ane",
            Accelerator::Vulkan => "vulkan",
            Accelerator::Nnapi => "nnapi",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Accelerator {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Accelerator::ALL
            .into_iter()
            .find(|a| a.as_str() == wanted)
            .ok_or_else(|| ParseNameError {
                kind: "accelerator",
                value: s.to_owned(),
                expected: names(Accelerator::ALL.iter().map(|a| a.as_str())),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_has_at_least_one_runtime() {
        for f in ModelFormat::ALL {
            assert!(
                Runtime::for_format(f).next().is_some(),
                "{f} has no runtime"
            );
        }
    }

    #[test]
    fn runtime_aliases_parse() {
        assert_eq!("llama".parse::<Runtime>(), Ok(Runtime::LlamaCpp));
        assert_eq!("llama.cpp".parse::<Runtime>(), Ok(Runtime::LlamaCpp));
        assert_eq!("ONNX-Runtime".parse::<Runtime>(), Ok(Runtime::OnnxRuntime));
        assert_eq!("LiteRT".parse::<Runtime>(), Ok(Runtime::Tflite));
        assert!("tensorrt".parse::<Runtime>().is_err());
    }
}
