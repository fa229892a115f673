//! A checked reader for the GGUF header (metadata and tensor directory).
//!
//! candle's `gguf_file::Content::read` trusts parts of the header: `general.alignment = 0`
//! divides by zero, and tensor dimensions are multiplied without overflow checks (the product
//! wraps in release builds, so a tensor could claim fewer bytes than its shape needs). This
//! reader parses the same format with every length, count and product checked against the file
//! size and the type's limits, and builds candle's [`Content`] itself, so candle's header parser
//! never runs on a file the user chose. Tensor data is still read by candle
//! (`Content::tensor`), but only after every tensor's extent was checked here.
//!
//! The rules are llama.cpp's (`gguf.cpp`): versions 1-3, at most 4 dimensions, the alignment a
//! power of two, each tensor's first (innermost) dimension a multiple of its block size and its
//! offset a multiple of the alignment, tensor data inside the file, no duplicate keys or names.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use crate::{Error, Result};

const FORMAT: &str = "GGUF";
/// Same caps as llama.cpp (`GGUF_MAX_*`) where it has them, tighter where a model never needs
/// more: a metadata string (a chat template, a merges entry) is far below 64 MiB.
const MAX_STRING_LEN: u64 = 64 << 20;
const MAX_ARRAY_LEN: u64 = 1 << 26;
const MAX_COUNT: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;
const MAX_DEPTH: usize = 8;
const DEFAULT_ALIGNMENT: u64 = 32;
/// The largest alignment accepted (llama.cpp writes 32; anything above a page is nonsense).
const MAX_ALIGNMENT: u64 = 1 << 16;

struct Cursor<'a, R> {
    r: &'a mut R,
    pos: u64,
    size: u64,
    path: &'a Path,
}

impl<R: Read> Cursor<'_, R> {
    fn bad(&self, reason: impl ToString) -> Error {
        Error::format(self.path, FORMAT, reason)
    }

    fn need(&self, n: u64, what: &str) -> Result<()> {
        let left = self.size.saturating_sub(self.pos);
        if n > left {
            return Err(self.bad(format!(
                "{what} needs {n} bytes at offset {} but only {left} remain (truncated or \
                 malformed header)",
                self.pos
            )));
        }
        Ok(())
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        self.need(n, what)?;
        let len = usize::try_from(n).map_err(|_| self.bad(format!("{what} is too large")))?;
        let mut buf = vec![0u8; len];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

struct Reader<'a, R> {
    c: Cursor<'a, R>,
    v1: bool,
}

impl<R: Read> Reader<'_, R> {
    /// A length or count: u32 in version 1, u64 after.
    fn len(&mut self, what: &str) -> Result<u64> {
        if self.v1 {
            Ok(self.c.u32(what)? as u64)
        } else {
            self.c.u64(what)
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.len(what)?;
        if len > MAX_STRING_LEN {
            return Err(self.c.bad(format!(
                "{what}: string of {len} bytes (limit {MAX_STRING_LEN})"
            )));
        }
        let mut v = self.c.bytes(len, what)?;
        // Writers sometimes NUL-terminate; candle and llama.cpp drop the NULs too.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// Smallest on-disk size of one value of `ty`, to refuse impossible array lengths before
    /// allocating.
    fn min_size(&self, ty: u32) -> u64 {
        let prefix = if self.v1 { 4 } else { 8 };
        match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 => prefix,
            9 => 4 + prefix,
            _ => 8,
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(self.c.bad(format!(
                "metadata '{key}': arrays nested deeper than {MAX_DEPTH}"
            )));
        }
        let c = &mut self.c;
        Ok(match ty {
            0 => Value::U8(c.u8(key)?),
            1 => Value::I8(c.u8(key)? as i8),
            2 => Value::U16(c.u16(key)?),
            3 => Value::I16(c.u16(key)? as i16),
            4 => Value::U32(c.u32(key)?),
            5 => Value::I32(c.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(c.u32(key)?)),
            7 => match c.u8(key)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(c.bad(format!("metadata '{key}': boolean byte {b}"))),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                let elem = self.c.u32(key)?;
                if elem > 12 {
                    return Err(self.c.bad(format!(
                        "metadata '{key}': unknown array element type {elem}"
                    )));
                }
                let n = self.len(key)?;
                let need = n.checked_mul(self.min_size(elem));
                let left = self.c.size.saturating_sub(self.c.pos);
                if n > MAX_ARRAY_LEN || need.is_none_or(|need| need > left) {
                    return Err(self.c.bad(format!(
                        "metadata '{key}': array of {n} elements does not fit in the file"
                    )));
                }
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(c.u64(key)?),
            11 => Value::I64(c.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(c.u64(key)?)),
            other => {
                return Err(c.bad(format!("metadata '{key}': unknown value type {other}")));
            }
        })
    }
}

/// GGML type ids as GGUF stores them (ggml.h), the ones candle can read.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The value of `general.alignment`, checked: an unsigned power of two, at most 64 KiB.
fn alignment(metadata: &HashMap<String, Value>, path: &Path) -> Result<u64> {
    let key = "general.alignment";
    let Some(v) = metadata.get(key) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let a = match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    match a {
        Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => Ok(a),
        _ => Err(Error::field(
            path,
            key,
            format!("{v:?} is not a power of two between 1 and {MAX_ALIGNMENT}"),
        )),
    }
}

/// Reads and checks the GGUF header at the reader's start. `path` names the file in errors.
pub fn read<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<Content> {
    let size = reader
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(path, e))?;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let mut c = Cursor {
        r: reader,
        pos: 0,
        size,
        path,
    };
    let magic = c.array::<4>("the magic bytes")?;
    if &magic != b"GGUF" {
        return Err(c.bad("the file does not start with the GGUF magic bytes"));
    }
    let version = c.u32("the version")?;
    let (v1, magic) = match version {
        1 => (true, VersionedMagic::GgufV1),
        2 => (false, VersionedMagic::GgufV2),
        3 => (false, VersionedMagic::GgufV3),
        v => return Err(c.bad(format!("GGUF version {v} is not supported (1 to 3)"))),
    };
    let mut r = Reader { c, v1 };
    let tensor_count = r.len("the tensor count")?;
    let kv_count = r.len("the metadata count")?;
    for (what, n) in [("tensors", tensor_count), ("metadata entries", kv_count)] {
        if n > MAX_COUNT {
            return Err(r.c.bad(format!(
                "the header declares {n} {what} (limit {MAX_COUNT})"
            )));
        }
    }
    let mut metadata = HashMap::new();
    for _ in 0..kv_count {
        let key = r.string("a metadata key")?;
        let ty = r.c.u32(&key)?;
        let value = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.c.bad(format!("metadata key '{key}' appears twice")));
        }
    }
    let alignment = alignment(&metadata, path)?;

    let mut tensor_infos = HashMap::new();
    for _ in 0..tensor_count {
        let name = r.string("a tensor name")?;
        let n_dims = r.c.u32(&name)?;
        if n_dims > MAX_DIMS {
            return Err(r.c.bad(format!(
                "tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = if v1 {
                r.c.u32(&name)? as u64
            } else {
                r.c.u64(&name)?
            };
            // llama.cpp stores int64 dimensions; anything past i64::MAX is a negative one.
            if d == 0 || d > i64::MAX as u64 {
                return Err(r.c.bad(format!("tensor '{name}' has a dimension of {d}")));
            }
            dims.push(d);
        }
        let ty = r.c.u32(&name)?;
        let dtype = ggml_dtype(ty)
            .ok_or_else(|| r.c.bad(format!("tensor '{name}' has unknown type {ty}")))?;
        let offset = r.c.u64(&name)?;
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| {
                r.c.bad(format!(
                    "tensor '{name}': dimensions {dims:?} multiply past the largest size"
                ))
            })?;
        let block = dtype.block_size() as u64;
        let inner = dims.first().copied().unwrap_or(1);
        if inner % block != 0 {
            return Err(r.c.bad(format!(
                "tensor '{name}': its row of {inner} elements is not a multiple of the \
                 {dtype:?} block size {block}"
            )));
        }
        if offset % alignment != 0 {
            return Err(r.c.bad(format!(
                "tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let bytes = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| r.c.bad(format!("tensor '{name}': its size overflows")))?;
        // GGUF lists the innermost dimension first; candle's shapes are outermost first.
        let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        let info = TensorInfo {
            ggml_dtype: dtype,
            shape: candle_core::Shape::from(shape),
            offset,
        };
        if tensor_infos.insert(name.clone(), (info, bytes)).is_some() {
            return Err(r.c.bad(format!("tensor '{name}' appears twice")));
        }
    }
    let pos = r.c.pos;
    let tensor_data_offset = pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| r.c.bad("the header is too large"))?;
    let mut out = HashMap::with_capacity(tensor_infos.len());
    for (name, (info, bytes)) in tensor_infos {
        let end = tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| s.checked_add(bytes));
        match end {
            Some(end) if end <= size => {}
            _ => {
                return Err(Error::format(
                    path,
                    FORMAT,
                    format!(
                        "tensor '{name}' ({bytes} bytes at data offset {}) ends past the end of \
                         the file ({size} bytes; truncated?)",
                        info.offset
                    ),
                ))
            }
        }
        out.insert(name, info);
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos: out,
        tensor_data_offset,
    })
}

/// Reads and checks the header of the GGUF file at `path` (a regular file).
pub fn read_file(path: &Path) -> Result<(Content, u64)> {
    let file = crate::fsio::open_regular(path)?;
    let mut reader = std::io::BufReader::new(file);
    let content = read(&mut reader, path)?;
    let size = reader
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(path, e))?;
    Ok((content, size))
}

/// Writing GGUF headers for tests and the fuzz seeds: a minimal writer of the same format.
pub mod write {
    use candle_core::quantized::gguf_file::Value;

    /// Appends a GGUF v3 string.
    pub fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::String(s) => string(out, s),
            Value::Array(a) => {
                let elem = a.first().map(type_id).unwrap_or(4);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    value(out, x);
                }
            }
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// One tensor of the directory: name, GGUF-order dims (innermost first), type id, offset.
    pub struct Tensor<'a> {
        pub name: &'a str,
        pub dims: Vec<u64>,
        pub ggml_type: u32,
        pub offset: u64,
    }

    /// A GGUF v3 file: header, metadata, directory, padding to 32 bytes, then `data`.
    pub fn file(metadata: &[(&str, Value)], tensors: &[Tensor<'_>], data: &[u8]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            string(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            value(&mut out, v);
        }
        for t in tensors {
            string(&mut out, t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&t.offset.to_le_bytes());
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend_from_slice(data);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::write::{file, Tensor};
    use super::*;

    fn read_bytes(bytes: &[u8]) -> Result<Content> {
        read(&mut std::io::Cursor::new(bytes), Path::new("t.gguf"))
    }

    fn f32_tensor(name: &str, dims: Vec<u64>, offset: u64) -> Tensor<'_> {
        Tensor {
            name,
            dims,
            ggml_type: 0,
            offset,
        }
    }

    #[test]
    fn a_valid_header_reads_as_candle_would() {
        let bytes = file(
            &[
                ("general.architecture", Value::String("llama".into())),
                ("a.list", Value::Array(vec![Value::U32(1), Value::U32(2)])),
            ],
            &[f32_tensor("w", vec![4, 2], 0), f32_tensor("b", vec![4], 32)],
            &[0u8; 64],
        );
        let ours = read_bytes(&bytes).unwrap();
        let theirs = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(ours.tensor_data_offset, theirs.tensor_data_offset);
        assert_eq!(ours.tensor_infos.len(), 2);
        assert_eq!(ours.tensor_infos["w"].shape.dims(), &[2, 4]);
        assert_eq!(
            ours.tensor_infos["w"].shape.dims(),
            theirs.tensor_infos["w"].shape.dims()
        );
        let t = ours
            .tensor(
                &mut std::io::Cursor::new(&bytes),
                "w",
                &candle_core::Device::Cpu,
            )
            .unwrap();
        assert_eq!(t.shape().dims(), &[2, 4]);
    }

    #[test]
    fn alignment_zero_is_an_error_not_a_division_by_zero() {
        for bad in [
            Value::U32(0),
            Value::U32(3),
            Value::I32(-8),
            Value::U64(1 << 40),
        ] {
            let bytes = file(
                &[("general.alignment", bad.clone())],
                &[f32_tensor("w", vec![4], 0)],
                &[0u8; 16],
            );
            let err = read_bytes(&bytes).expect_err("bad alignment");
            assert!(
                err.to_string().contains("general.alignment"),
                "{bad:?}: {err}"
            );
        }
        let ok = file(
            &[("general.alignment", Value::U32(32))],
            &[f32_tensor("w", vec![4], 0)],
            &[0u8; 16],
        );
        read_bytes(&ok).unwrap();
    }

    #[test]
    fn dimensions_multiplying_past_u64_are_refused() {
        let bytes = file(
            &[],
            &[f32_tensor("w", vec![1 << 32, 1 << 32, 16], 0)],
            &[0u8; 16],
        );
        let err = read_bytes(&bytes).expect_err("overflow");
        assert!(err.to_string().contains("multiply past"), "{err}");
        // Fits u64 but not the file.
        let bytes = file(
            &[],
            &[f32_tensor("w", vec![1 << 20, 1 << 20], 0)],
            &[0u8; 16],
        );
        let err = read_bytes(&bytes).expect_err("too large");
        assert!(err.to_string().contains("ends past the end"), "{err}");
        // A zero or negative dimension.
        let bytes = file(&[], &[f32_tensor("w", vec![0, 4], 0)], &[0u8; 16]);
        assert!(read_bytes(&bytes).is_err());
        let bytes = file(&[], &[f32_tensor("w", vec![u64::MAX, 4], 0)], &[0u8; 16]);
        assert!(read_bytes(&bytes).is_err());
    }

    #[test]
    fn every_truncation_of_a_valid_file_is_an_error() {
        let bytes = file(
            &[
                ("general.architecture", Value::String("llama".into())),
                ("x", Value::Array(vec![Value::String("ab".into())])),
            ],
            &[f32_tensor("w", vec![4, 2], 0)],
            &[0u8; 32],
        );
        read_bytes(&bytes).unwrap();
        for n in 0..bytes.len() {
            assert!(read_bytes(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn impossible_counts_and_types_are_refused() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        assert!(read_bytes(&bytes).is_err());
        // A quantized tensor whose rows are not whole blocks.
        let bytes = file(
            &[],
            &[Tensor {
                name: "q",
                dims: vec![48, 2],
                ggml_type: 3,
                offset: 0,
            }],
            &[0u8; 256],
        );
        let err = read_bytes(&bytes).expect_err("partial block");
        assert!(err.to_string().contains("block size"), "{err}");
        let bytes = file(
            &[],
            &[Tensor {
                name: "q",
                dims: vec![4],
                ggml_type: 99,
                offset: 0,
            }],
            &[0u8; 64],
        );
        assert!(read_bytes(&bytes).is_err());
    }
}
