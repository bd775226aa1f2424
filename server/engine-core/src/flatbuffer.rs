//! A bounds-checked reader of flatbuffers, for files modeld checks before a runtime
//! sees them (TFLite models, LiteRT-LM bundles). Every offset is checked against the
//! data's length before it is followed, and the data is read with positioned reads of
//! the few bytes each structure needs, so a large file is checked without reading it
//! all.

use std::fs::File;
use std::io;

/// The longest string a checked file may hold (names, keys).
pub(crate) const MAX_STRING_BYTES: u32 = 4096;

#[derive(Debug)]
pub(crate) enum Fault {
    Io(io::Error),
    Malformed(String),
}

pub(crate) type Checked<T> = Result<T, Fault>;

pub(crate) fn malformed<T>(what: impl Into<String>) -> Checked<T> {
    Err(Fault::Malformed(what.into()))
}

/// Prefixes a fault with where it was found.
pub(crate) trait Context<T> {
    fn at(self, place: impl FnOnce() -> String) -> Checked<T>;
}

impl<T> Context<T> for Checked<T> {
    fn at(self, place: impl FnOnce() -> String) -> Checked<T> {
        self.map_err(|e| match e {
            Fault::Malformed(what) => Fault::Malformed(format!("{}: {what}", place())),
            io => io,
        })
    }
}

pub(crate) trait Source {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()>;
}

pub(crate) struct FileSource(pub(crate) File);

impl Source for FileSource {
    #[cfg(unix)]
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, pos)
    }
    #[cfg(not(unix))]
    pub(crate) fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = &self.0;
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(buf)
    }
}

pub(crate) struct SliceSource<'a>(pub(crate) &'a [u8]);

impl Source for SliceSource<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(pos).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

/// A part of another source, as a file of its own: a flatbuffer embedded in a container.
pub(crate) struct Window<'a> {
    pub(crate) inner: &'a dyn Source,
    pub(crate) base: u64,
}

impl Source for Window<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let pos = self
            .base
            .checked_add(pos)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        self.inner.read_at(pos, buf)
    }
}

/// A table: where it starts and which fields its vtable says it has.
#[derive(Clone, Copy)]
pub(crate) struct Table {
    pub(crate) pos: u64,
    vtable: u64,
    /// Bytes of the vtable (4 + 2 per field slot).
    vtable_len: u64,
    /// Bytes of the table's inline part.
    table_len: u64,
}

/// A vector: its first element and its length.
#[derive(Clone, Copy)]
pub(crate) struct Vector {
    pub(crate) start: u64,
    pub(crate) len: u32,
}

pub(crate) struct Reader<'a> {
    pub(crate) src: &'a dyn Source,
    pub(crate) len: u64,
}

impl Reader<'_> {
    pub(crate) fn bytes<const N: usize>(&self, pos: u64) -> Checked<[u8; N]> {
        match pos.checked_add(N as u64) {
            Some(end) if end <= self.len => {}
            _ => {
                return malformed(format!(
                    "offset {pos} (+{N} bytes) lies past the end of the {}-byte file",
                    self.len
                ));
            }
        }
        let mut buf = [0u8; N];
        self.src.read_at(pos, &mut buf).map_err(Fault::Io)?;
        Ok(buf)
    }
    pub(crate) fn u8(&self, pos: u64) -> Checked<u8> {
        self.bytes::<1>(pos).map(|b| b[0])
    }
    pub(crate) fn u16(&self, pos: u64) -> Checked<u16> {
        self.bytes(pos).map(u16::from_le_bytes)
    }
    pub(crate) fn u32(&self, pos: u64) -> Checked<u32> {
        self.bytes(pos).map(u32::from_le_bytes)
    }
    pub(crate) fn i32(&self, pos: u64) -> Checked<i32> {
        self.bytes(pos).map(i32::from_le_bytes)
    }
    pub(crate) fn u64(&self, pos: u64) -> Checked<u64> {
        self.bytes(pos).map(u64::from_le_bytes)
    }

    /// The position a `uoffset` at `pos` points to.
    pub(crate) fn follow(&self, pos: u64) -> Checked<u64> {
        let target = pos + u64::from(self.u32(pos)?);
        if target >= self.len {
            return malformed(format!(
                "offset at {pos} points to {target}, past the end of the {}-byte file",
                self.len
            ));
        }
        Ok(target)
    }

    pub(crate) fn table(&self, pos: u64) -> Checked<Table> {
        let soffset = i64::from(self.i32(pos)?);
        let vtable = pos as i64 - soffset;
        if vtable < 0 || vtable as u64 >= self.len {
            return malformed(format!(
                "the table at {pos} names its vtable at {vtable}, outside the file"
            ));
        }
        let vtable = vtable as u64;
        let vtable_len = u64::from(self.u16(vtable)?);
        let table_len = u64::from(self.u16(vtable + 2)?);
        if vtable_len < 4 || vtable_len % 2 != 0 {
            return malformed(format!("the vtable at {vtable} is {vtable_len} bytes long"));
        }
        if vtable + vtable_len > self.len || table_len < 4 || pos + table_len > self.len {
            return malformed(format!(
                "the table at {pos} (vtable at {vtable}, {vtable_len} bytes; {table_len} bytes \
                 of fields) runs past the end of the {}-byte file",
                self.len
            ));
        }
        Ok(Table {
            pos,
            vtable,
            vtable_len,
            table_len,
        })
    }

    /// Where field `slot` lies, if present; `size` of its inline value must fit the table.
    pub(crate) fn field(&self, t: Table, slot: u64, size: u64) -> Checked<Option<u64>> {
        let entry = 4 + 2 * slot;
        if entry + 2 > t.vtable_len {
            return Ok(None);
        }
        let offset = u64::from(self.u16(t.vtable + entry)?);
        if offset == 0 {
            return Ok(None);
        }
        if offset < 4 || offset + size > t.table_len {
            return malformed(format!(
                "field {slot} of the table at {} lies outside its {} bytes",
                t.pos, t.table_len
            ));
        }
        Ok(Some(t.pos + offset))
    }

    pub(crate) fn u8_field(&self, t: Table, slot: u64, default: u8) -> Checked<u8> {
        match self.field(t, slot, 1)? {
            Some(p) => self.u8(p),
            None => Ok(default),
        }
    }
    pub(crate) fn u32_field(&self, t: Table, slot: u64, default: u32) -> Checked<u32> {
        match self.field(t, slot, 4)? {
            Some(p) => self.u32(p),
            None => Ok(default),
        }
    }
    pub(crate) fn u64_field(&self, t: Table, slot: u64, default: u64) -> Checked<u64> {
        match self.field(t, slot, 8)? {
            Some(p) => self.u64(p),
            None => Ok(default),
        }
    }

    pub(crate) fn vector_at(&self, pos: u64, element_size: u64, limit: u32) -> Checked<Vector> {
        let len = self.u32(pos)?;
        if len > limit {
            return malformed(format!(
                "a vector at {pos} claims {len} elements; the limit is {limit}"
            ));
        }
        let start = pos + 4;
        let end = start + u64::from(len) * element_size;
        if end > self.len {
            return malformed(format!(
                "a vector at {pos} of {len} elements of {element_size} bytes runs past the end \
                 of the {}-byte file",
                self.len
            ));
        }
        Ok(Vector { start, len })
    }

    pub(crate) fn vector_field(
        &self,
        t: Table,
        slot: u64,
        element_size: u64,
        limit: u32,
    ) -> Checked<Option<Vector>> {
        match self.field(t, slot, 4)? {
            Some(p) => {
                let target = self.follow(p)?;
                self.vector_at(target, element_size, limit).map(Some)
            }
            None => Ok(None),
        }
    }

    pub(crate) fn string_field(&self, t: Table, slot: u64) -> Checked<Option<String>> {
        let Some(v) = self.vector_field(t, slot, 1, MAX_STRING_BYTES)? else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; v.len as usize];
        self.src.read_at(v.start, &mut bytes).map_err(Fault::Io)?;
        match String::from_utf8(bytes) {
            Ok(s) => Ok(Some(s)),
            Err(_) => malformed(format!("the string at {} is not UTF-8", v.start - 4)),
        }
    }

    /// Element `i` of a vector of tables.
    pub(crate) fn table_in(&self, v: Vector, i: u32) -> Checked<Table> {
        let slot = v.start + 4 * u64::from(i);
        let target = self.follow(slot)?;
        self.table(target)
    }

    pub(crate) fn i32s(&self, v: Vector) -> Checked<Vec<i32>> {
        (0..u64::from(v.len))
            .map(|i| self.i32(v.start + 4 * i))
            .collect()
    }
}
