//! Model inspection: reads a model's metadata without loading tensor data.
//!
//! Used to register models in the library: a `.gguf` file is read up to the end of its
//! header (metadata and tensor table); a Hugging Face folder through `config.json` and the
//! JSON headers of its safetensors files (8-byte length + JSON, never the tensors). Every
//! tensor's extent is checked against the file size, so truncated copies are refused.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::quantized::GgmlDType;

use crate::{Error, Result};

/// Container format of a model's weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

/// What the library needs to know about a model, read from its headers only.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The file stem (GGUF: the name the user or the Hub gave the file, which, unlike
    /// `general.name`, carries the variant and quantization) or the folder name (Hugging Face).
    pub name: String,
    /// `general.architecture` (GGUF) or `model_type` from `config.json`, e.g. "llama".
    pub architecture: String,
    pub format: ModelFormat,
    /// Sum of the element counts of all tensors.
    pub parameters: u64,
    /// "Q4_1", "F32", "BF16", or "mixed: Q4_1+Q8_0" (largest share first).
    pub quantization: String,
    pub context_length: u64,
    /// Total size in bytes of all weight files.
    pub file_size: u64,
    /// The weight files, for hashing.
    pub files: Vec<PathBuf>,
}

/// Inspects a `.gguf` file or a Hugging Face model folder.
pub fn inspect(path: &Path) -> Result<ModelInfo> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        inspect_hf_dir(path)
    } else {
        inspect_gguf(path)
    }
}

/// Reads the GGUF header of `path` (metadata and tensor table, no tensor data), checked by
/// [`crate::gguf_header`]: every tensor's extent lies inside the file.
pub fn read_gguf_header(path: &Path) -> Result<(gguf_file::Content, u64)> {
    crate::gguf_header::read_file(path)
}

fn inspect_gguf(path: &Path) -> Result<ModelInfo> {
    let (content, file_size) = read_gguf_header(path)?;
    if content.tensor_infos.is_empty() {
        return Err(Error::format(path, "GGUF", "the file holds no tensors"));
    }
    let mut parameters: u64 = 0;
    let mut by_dtype: BTreeMap<&'static str, u64> = BTreeMap::new();
    for info in content.tensor_infos.values() {
        // The header reader checked every tensor's shape, block size and extent.
        let elems = info.shape.elem_count() as u64;
        parameters = parameters.saturating_add(elems);
        if info.shape.rank() >= 2 {
            *by_dtype
                .entry(ggml_dtype_name(info.ggml_dtype))
                .or_default() += elems;
        }
    }
    let architecture = gguf_string(&content, "general.architecture")
        .ok_or_else(|| Error::field(path, "general.architecture", "missing or not a string"))?;
    let context_key = format!("{architecture}.context_length");
    let context_length = content
        .metadata
        .get(&context_key)
        .ok_or_else(|| Error::field(path, &context_key, "missing"))?
        .to_u64()
        .map_err(|e| Error::field(path, &context_key, e))?;
    let name = file_stem(path);
    let quantization = content
        .metadata
        .get("general.file_type")
        .and_then(|v| v.to_u32().ok())
        .and_then(llama_file_type_name)
        .map(str::to_string)
        .unwrap_or_else(|| quantization_label(&by_dtype));
    Ok(ModelInfo {
        name,
        architecture,
        format: ModelFormat::Gguf,
        parameters,
        quantization,
        context_length,
        file_size,
        files: vec![path.to_path_buf()],
    })
}

fn gguf_string(content: &gguf_file::Content, key: &str) -> Option<String> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Name of a ggml tensor type as llama.cpp spells it.
pub fn ggml_dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// llama.cpp's `general.file_type` (enum llama_ftype) as its quantization label.
fn llama_file_type_name(ftype: u32) -> Option<&'static str> {
    Some(match ftype {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// One dtype -> its name; several -> "mixed: A+B" with the largest element share first.
fn quantization_label(by_dtype: &BTreeMap<&'static str, u64>) -> String {
    let mut shares: Vec<(&str, u64)> = by_dtype.iter().map(|(k, v)| (*k, *v)).collect();
    shares.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    match shares.as_slice() {
        [] => "unknown".to_string(),
        [(one, _)] => (*one).to_string(),
        many => format!(
            "mixed: {}",
            many.iter().map(|(n, _)| *n).collect::<Vec<_>>().join("+")
        ),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = crate::fsio::read_regular_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, "JSON", e))
}

/// The safetensors files of a Hugging Face folder: the shards named by
/// `model.safetensors.index.json`, else every `*.safetensors` file (sorted).
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::field(&index, "weight_map", "missing or not an object"))?;
        let mut names: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::field(&index, format!("weight_map.{tensor}"), "not a file name")
            })?;
            if file.contains(['/', '\\']) || file.contains("..") {
                return Err(Error::field(
                    &index,
                    format!("weight_map.{tensor}"),
                    format!("'{file}' is not a plain file name"),
                ));
            }
            if !names.contains(&file) {
                names.push(file);
            }
        }
        names.sort_unstable();
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if p.is_file() && p.extension().is_some_and(|e| e == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// One tensor of a safetensors header: (name, element count, dtype).
pub type SafetensorsEntry = (String, u64, String);

/// Bits per element of a safetensors dtype, None for a dtype the format does not define.
fn safetensors_dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 8,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "U16" | "I16" | "F16" | "BF16" => 16,
        "U32" | "I32" | "F32" => 32,
        "U64" | "I64" | "F64" => 64,
        _ => return None,
    })
}

/// The largest safetensors header accepted (the format's own reader allows 100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Tensor table of one safetensors file read from its header: (elements, dtype) per tensor.
///
/// Checks the header the way the `safetensors` crate does, with checked arithmetic, before any
/// of candle's readers see the file: every shape's product and byte size fit in `usize`, each
/// tensor's `data_offsets` match its size, the tensors tile the data without gaps or overlaps,
/// and the data lies inside the file. `path` must be a regular file.
pub fn read_safetensors_header(path: &Path) -> Result<(Vec<SafetensorsEntry>, u64)> {
    let mut file = crate::fsio::open_regular(path)?;
    let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| Error::format(path, "safetensors", "shorter than the 8-byte header length"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_SAFETENSORS_HEADER || header_len.saturating_add(8) > file_size {
        return Err(Error::format(
            path,
            "safetensors",
            format!("header length {header_len} does not fit in a file of {file_size} bytes"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::format(path, "safetensors", e))?;
    let entries = parse_safetensors_header(&header, file_size - 8 - header_len)
        .map_err(|reason| Error::format(path, "safetensors", reason))?;
    Ok((entries, file_size))
}

/// Checks a safetensors JSON header against `data_size` bytes of tensor data (see
/// [`read_safetensors_header`]); the error is the reason.
pub fn parse_safetensors_header(
    header: &[u8],
    data_size: u64,
) -> std::result::Result<Vec<SafetensorsEntry>, String> {
    let json: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("header is not JSON: {e}"))?;
    let obj = json
        .as_object()
        .ok_or_else(|| "header is not a JSON object".to_string())?;
    let mut tensors = Vec::new();
    let mut extents: Vec<(u64, u64, &str)> = Vec::new();
    for (name, t) in obj {
        if name == "__metadata__" {
            if !t.is_object()
                || t.as_object()
                    .is_some_and(|m| m.values().any(|v| !v.is_string()))
            {
                return Err("__metadata__ is not an object of strings".to_string());
            }
            continue;
        }
        let bad = |what: &str| format!("tensor '{name}': {what}");
        let dtype = t
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("missing dtype"))?;
        let bits = safetensors_dtype_bits(dtype)
            .ok_or_else(|| bad(&format!("unknown dtype '{dtype}'")))?;
        let shape = t
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing shape"))?;
        let shape: Vec<u64> = shape
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        let elems = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(&format!("shape {shape:?} multiplies past the largest size")))?;
        let nbits = elems
            .checked_mul(bits)
            .filter(|n| usize::try_from(*n).is_ok())
            .ok_or_else(|| bad(&format!("shape {shape:?} is too large")))?;
        if nbits % 8 != 0 {
            return Err(bad("its data is not a whole number of bytes"));
        }
        let offsets = t
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad("data_offsets is not [begin, end]"))?;
        let (Some(begin), Some(end)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
            return Err(bad("data_offsets is not [begin, end]"));
        };
        if end < begin || end - begin != nbits / 8 {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] do not hold {} bytes of {dtype} {shape:?}",
                nbits / 8
            )));
        }
        if end > data_size {
            return Err(bad(&format!(
                "data ends at {end} but the file holds only {data_size} data bytes (truncated?)"
            )));
        }
        extents.push((begin, end, name));
        tensors.push((name.clone(), elems, dtype.to_string()));
    }
    // The tensors tile the data from 0 with no gap or overlap (as the safetensors crate
    // requires; it would refuse the file later, after allocating).
    extents.sort_unstable();
    let mut at = 0u64;
    for (begin, end, name) in &extents {
        if *begin != at {
            return Err(format!(
                "tensor '{name}': data starts at {begin}, expected {at} (gap or overlap)"
            ));
        }
        at = *end;
    }
    if at != data_size {
        return Err(format!(
            "the tensors hold {at} bytes but the file has {data_size} data bytes"
        ));
    }
    Ok(tensors)
}

fn inspect_hf_dir(dir: &Path) -> Result<ModelInfo> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::format(
            dir,
            "Hugging Face model folder",
            "no config.json in the folder",
        ));
    }
    let config = read_json(&config_path)?;
    let architecture = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or_else(|| {
            config
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .ok_or_else(|| Error::field(&config_path, "model_type", "missing"))?;
    let context_length = [
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
    ]
    .iter()
    .find_map(|k| config.get(*k).and_then(|v| v.as_u64()))
    .ok_or_else(|| Error::field(&config_path, "max_position_embeddings", "missing"))?;
    let files = safetensors_files(dir)?;
    if files.is_empty() {
        return Err(Error::format(
            dir,
            "Hugging Face model folder",
            "no .safetensors weight files in the folder",
        ));
    }
    let mut parameters = 0u64;
    let mut file_size = 0u64;
    let mut by_dtype: BTreeMap<&'static str, u64> = BTreeMap::new();
    for f in &files {
        let (tensors, size) = read_safetensors_header(f)?;
        file_size = file_size.saturating_add(size);
        for (_, elems, dtype) in tensors {
            parameters = parameters.saturating_add(elems);
            *by_dtype.entry(safetensors_dtype_name(&dtype)).or_default() += elems;
        }
    }
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    Ok(ModelInfo {
        name,
        architecture,
        format: ModelFormat::Safetensors,
        parameters,
        quantization: quantization_label(&by_dtype),
        context_length,
        file_size,
        files,
    })
}

fn safetensors_dtype_name(dtype: &str) -> &'static str {
    match dtype {
        "F64" => "F64",
        "F32" => "F32",
        "F16" => "F16",
        "BF16" => "BF16",
        "I64" => "I64",
        "I32" => "I32",
        "I16" => "I16",
        "I8" => "I8",
        "U8" => "U8",
        "BOOL" => "BOOL",
        "F8_E4M3" => "F8_E4M3",
        "F8_E5M2" => "F8_E5M2",
        _ => "other",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn label_single_and_mixed() {
        let mut m = BTreeMap::new();
        m.insert("Q4_1", 100);
        assert_eq!(quantization_label(&m), "Q4_1");
        m.insert("Q8_0", 300);
        assert_eq!(quantization_label(&m), "mixed: Q8_0+Q4_1");
    }
}
