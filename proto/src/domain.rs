//! Conversions between the wire enums and the engine-core domain enums, shared by the
//! agent and the client so both sides agree on one mapping.

use modeld_engine_core::{Accelerator, ArchiveFormat, ModelFormat, Runtime};

use crate::v1 as pb;

macro_rules! enum_map {
    ($domain:ty, $wire:ty, { $($d:ident <=> $w:ident),* $(,)? }) => {
        impl From<$domain> for $wire {
            fn from(v: $domain) -> Self {
                match v { $(<$domain>::$d => <$wire>::$w),* }
            }
        }

        impl TryFrom<$wire> for $domain {
            /// The wire value was `_UNSPECIFIED`.
            type Error = ();

            fn try_from(v: $wire) -> Result<Self, ()> {
                match v {
                    $(<$wire>::$w => Ok(<$domain>::$d),)*
                    <$wire>::Unspecified => Err(()),
                }
            }
        }
    };
}

enum_map!(ModelFormat, pb::ModelFormat, {
    Gguf <=> Gguf,
    Onnx <=> Onnx,
    Safetensors <=> Safetensors,
    CoreMl <=> Coreml,
    Tflite <=> Tflite,
    ExecuTorch <=> Executorch,
    Mlc <=> Mlc,
    PicoLlm <=> Picollm,
    Mlx <=> Mlx,
});

enum_map!(Runtime, pb::Runtime, {
    LlamaCpp <=> LlamaCpp,
    OnnxRuntime <=> OnnxRuntime,
    Candle <=> Candle,
    CoreMl <=> CoreMl,
    Tflite <=> Tflite,
    ExecuTorch <=> Executorch,
    MlcLlm <=> MlcLlm,
    PicoLlm <=> Picollm,
    Mlx <=> Mlx,
});

enum_map!(Accelerator, pb::Accelerator, {
    Cpu <=> Cpu,
    Cuda <=> Cuda,
    Metal <=> Metal,
    Ane <=> Ane,
    Vulkan <=> Vulkan,
    Nnapi <=> Nnapi,
});

enum_map!(ArchiveFormat, pb::ArchiveFormat, {
    Zip <=> Zip,
    TarGz <=> TarGz,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_domain_value_round_trips() {
        for f in ModelFormat::ALL {
            assert_eq!(ModelFormat::try_from(pb::ModelFormat::from(f)), Ok(f));
        }
        for r in Runtime::ALL {
            assert_eq!(Runtime::try_from(pb::Runtime::from(r)), Ok(r));
        }
        for a in Accelerator::ALL {
            assert_eq!(Accelerator::try_from(pb::Accelerator::from(a)), Ok(a));
        }
        assert!(ModelFormat::try_from(pb::ModelFormat::Unspecified).is_err());
    }
}
