//! A minimal streaming walker over protobuf wire format, used to recognize ONNX and
//! Core ML files and read their inputs and outputs without loading multi-gigabyte
//! weights into memory. Only field boundaries are trusted after they were checked
//! against the enclosing length.

use std::io::{self, Read, Seek, SeekFrom};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireValue {
    Varint(u64),
    Fixed64,
    Fixed32,
    /// A length-delimited field: its payload starts at `start` and is `len` bytes long.
    Len {
        start: u64,
        len: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub number: u32,
    pub value: WireValue,
}

/// Reads the fields of the message occupying `[start, end)`, skipping over payloads.
/// Fails on anything that is not well-formed protobuf within those bounds.
pub fn fields<R: Read + Seek>(r: &mut R, start: u64, end: u64) -> io::Result<Vec<Field>> {
    fields_limited(r, start, end, usize::MAX)
}

/// Like [`fields`], giving up after `max_fields` (large graphs have millions of nodes).
pub fn fields_limited<R: Read + Seek>(
    r: &mut R,
    start: u64,
    end: u64,
    max_fields: usize,
) -> io::Result<Vec<Field>> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    r.seek(SeekFrom::Start(start))?;
    let mut pos = start;
    let mut out = Vec::new();
    while pos < end && out.len() < max_fields {
        let (key, n) = varint(r)?;
        pos += n;
        let number = u32::try_from(key >> 3)
            .map_err(|_| invalid(format!("field number {} too large", key >> 3)))?;
        if number == 0 {
            return Err(invalid(format!("field number 0 at byte {}", pos - n)));
        }
        let value = match key & 7 {
            0 => {
                let (v, n) = varint(r)?;
                pos += n;
                WireValue::Varint(v)
            }
            1 => {
                pos += 8;
                r.seek(SeekFrom::Start(pos))?;
                WireValue::Fixed64
            }
            5 => {
                pos += 4;
                r.seek(SeekFrom::Start(pos))?;
                WireValue::Fixed32
            }
            2 => {
                let (len, n) = varint(r)?;
                pos += n;
                let value = WireValue::Len { start: pos, len };
                pos = pos
                    .checked_add(len)
                    .ok_or_else(|| invalid("length overflows".into()))?;
                if pos > end {
                    return Err(invalid(format!(
                        "field {number} runs past the end of its message ({pos} > {end})"
                    )));
                }
                r.seek(SeekFrom::Start(pos))?;
                value
            }
            wt => {
                return Err(invalid(format!(
                    "unsupported wire type {wt} in field {number}"
                )));
            }
        };
        if pos > end {
            return Err(invalid(format!(
                "field {number} runs past the end of its message"
            )));
        }
        out.push(Field { number, value });
    }
    Ok(out)
}

/// One varint, and how many bytes it took.
pub fn varint<R: Read>(r: &mut R) -> io::Result<(u64, u64)> {
    let mut value = 0u64;
    for i in 0..10u32 {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        value |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok((value, u64::from(i) + 1));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "varint longer than 10 bytes",
    ))
}

/// Reads a length-delimited payload, refusing ones larger than `max`.
pub fn read_payload<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
    max: u64,
) -> io::Result<Vec<u8>> {
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("payload of {len} bytes exceeds {max}"),
        ));
    }
    r.seek(SeekFrom::Start(start))?;
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// The first string field `number` of a small message held in memory.
pub fn string_field(msg: &[u8], number: u32) -> Option<String> {
    let mut cur = io::Cursor::new(msg);
    let fields = fields(&mut cur, 0, msg.len() as u64).ok()?;
    fields.iter().find_map(|f| match f.value {
        WireValue::Len { start, len } if f.number == number => {
            let bytes = msg.get(start as usize..(start + len) as usize)?;
            String::from_utf8(bytes.to_vec()).ok()
        }
        _ => None,
    })
}
