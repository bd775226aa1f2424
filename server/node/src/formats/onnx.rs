//! Recognizes ONNX `ModelProto` and Core ML `Model` protobufs by walking their
//! top-level fields, and reads their input and output names.
//!
//! Both formats start with field 1 as a varint, so the first bytes cannot tell them
//! apart; the set of top-level field numbers can: ONNX uses 1-8, 14, 20, 25, 26 and
//! always has a graph (7), Core ML puts its model type at 200 and above.

use std::io::{Read, Seek};

use super::protobuf::{self, WireValue};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IoNames {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoModel {
    Onnx {
        ir_version: u64,
        producer: String,
        io: IoNames,
    },
    CoreMl {
        specification_version: u64,
        io: IoNames,
    },
}

/// Names of graph inputs/outputs are short; a larger ValueInfo is not one we trust.
const MAX_VALUE_INFO: u64 = 64 * 1024;
const MAX_IO: usize = 4096;

/// Classifies a protobuf model file of `size` bytes, or returns None when it is neither.
pub fn sniff<R: Read + Seek>(r: &mut R, size: u64) -> Option<ProtoModel> {
    let top = protobuf::fields(r, 0, size).ok()?;
    let first = top.first()?;
    let WireValue::Varint(version) = first.value else {
        return None;
    };
    if first.number != 1 {
        return None;
    }
    let numbers: Vec<u32> = top.iter().map(|f| f.number).collect();
    if numbers.iter().any(|n| *n >= 200) {
        let io = top
            .iter()
            .find(|f| f.number == 2)
            .and_then(|f| match f.value {
                WireValue::Len { start, len } => io_names(r, start, len, 1, 10),
                _ => None,
            })
            .unwrap_or_default();
        return Some(ProtoModel::CoreMl {
            specification_version: version,
            io,
        });
    }
    let onnx_fields = [1, 2, 3, 4, 5, 6, 7, 8, 14, 20, 25, 26];
    if !numbers.iter().all(|n| onnx_fields.contains(n)) || !(1..=20).contains(&version) {
        return None;
    }
    let graph = top.iter().find(|f| f.number == 7)?;
    let WireValue::Len { start, len } = graph.value else {
        return None;
    };
    let io = io_names(r, start, len, 11, 12)?;
    let producer = top
        .iter()
        .find(|f| f.number == 2)
        .and_then(|f| match f.value {
            WireValue::Len { start, len } => protobuf::read_payload(r, start, len, 1024).ok(),
            _ => None,
        })
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    Some(ProtoModel::Onnx {
        ir_version: version,
        producer,
        io,
    })
}

/// Names of the inputs and outputs listed in the message at `[start, start+len)`:
/// ONNX's GraphProto (input = 11, output = 12, ValueInfoProto) and Core ML's
/// ModelDescription (input = 1, output = 10, FeatureDescription) both name each entry
/// in its field 1.
fn io_names<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
    input_field: u32,
    output_field: u32,
) -> Option<IoNames> {
    let fields = protobuf::fields(r, start, start + len).ok()?;
    let mut io = IoNames::default();
    for f in fields {
        let WireValue::Len { start, len } = f.value else {
            continue;
        };
        let target = match f.number {
            n if n == input_field => &mut io.inputs,
            n if n == output_field => &mut io.outputs,
            _ => continue,
        };
        if target.len() >= MAX_IO {
            continue;
        }
        let msg = protobuf::read_payload(r, start, len, MAX_VALUE_INFO).ok()?;
        if let Some(name) = protobuf::string_field(&msg, 1) {
            target.push(name);
        }
    }
    Some(io)
}
