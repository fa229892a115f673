//! GGUF writer: a streaming GGUF v3 writer (one tensor in memory at a time) and the export of a
//! whole model in llama.cpp's layout.
//!
//! Layout as llama.cpp's `convert_hf_to_gguf.py` writes it: tensor names `token_embd`,
//! `blk.N.attn_q` ..., `output_norm`, `output` (absent when the embeddings are tied); llama's
//! `attn_q` / `attn_k` rows permuted for llama.cpp's interleaved rope (the runtime keeps Hugging
//! Face layout, see `gguf.rs`); norms and biases in F32; `<arch>.*` hyper-parameters;
//! `general.file_type` as llama.cpp's `llama_ftype`.
//!
//! Quantization uses candle's quantizers. Q4_K_M follows llama.cpp's `llama_tensor_get_type`
//! (src/llama-quant.cpp, llama.cpp 0c1e57098) for dense llama models, shape fallbacks included:
//! see [`q4_k_m_type`].

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::files::AtomicFile;
use super::{gguf_architecture, gguf_proj_name, Job, WeightType};
use crate::config::Config;
use crate::linear::Linear;
use crate::llama::Llama;
use crate::{Error, Result};

/// GGUF's default tensor-data alignment.
const ALIGNMENT: u64 = 32;

/// One tensor of a GGUF file: its name, its dims in row-major order (`[rows, cols]`, written
/// reversed as GGUF's `ne`) and its block type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorSpec {
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// Size of the tensor's data in bytes.
    pub fn bytes(&self) -> usize {
        self.elem_count() / self.dtype.block_size() * self.dtype.type_size()
    }
}

fn pad(n: u64) -> u64 {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF's value type code.
fn type_code(v: &Value) -> u32 {
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

fn write_payload(w: &mut impl Write, v: &Value, key: &str) -> Result<()> {
    let io = |e: std::io::Error| Error::InvalidParams(format!("metadata {key}: {e}"));
    match v {
        Value::U8(x) => w.write_all(&[*x]).map_err(io),
        Value::I8(x) => w.write_all(&x.to_le_bytes()).map_err(io),
        Value::U16(x) => w.write_all(&x.to_le_bytes()).map_err(io),
        Value::I16(x) => w.write_all(&x.to_le_bytes()).map_err(io),
        Value::U32(x) => w.write_all(&x.to_le_bytes()).map_err(io),
        Value::I32(x) => w.write_all(&x.to_le_bytes()).map_err(io),
        Value::U64(x) => w.write_all(&x.to_le_bytes()).map_err(io),
        Value::I64(x) => w.write_all(&x.to_le_bytes()).map_err(io),
        Value::F32(x) => w.write_all(&x.to_le_bytes()).map_err(io),
        Value::F64(x) => w.write_all(&x.to_le_bytes()).map_err(io),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]).map_err(io),
        Value::String(s) => write_str(w, s).map_err(io),
        Value::Array(items) => {
            let code = items.first().map(type_code).unwrap_or(4);
            if items.iter().any(|x| type_code(x) != code) {
                return Err(Error::InvalidParams(format!(
                    "metadata {key}: an array mixes value types"
                )));
            }
            if code == 9 {
                return Err(Error::InvalidParams(format!(
                    "metadata {key}: arrays of arrays are not written"
                )));
            }
            w.write_all(&code.to_le_bytes()).map_err(io)?;
            w.write_all(&(items.len() as u64).to_le_bytes())
                .map_err(io)?;
            for x in items {
                write_payload(w, x, key)?;
            }
            Ok(())
        }
    }
}

/// The bytes of a GGUF header: magic, version 3, counts, metadata, tensor infos (offsets
/// aligned to 32), padded to the start of the tensor data.
pub fn header_bytes(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<Vec<u8>> {
    let mut h: Vec<u8> = Vec::new();
    h.extend_from_slice(b"GGUF");
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    let mut seen = std::collections::HashSet::new();
    for (key, value) in metadata {
        if !seen.insert(key.as_str()) {
            return Err(Error::InvalidParams(format!("metadata key {key} twice")));
        }
        write_str(&mut h, key).map_err(|e| Error::InvalidParams(e.to_string()))?;
        h.extend_from_slice(&type_code(value).to_le_bytes());
        write_payload(&mut h, value, key)?;
    }
    let mut offset: u64 = 0;
    for t in tensors {
        if t.elem_count() % t.dtype.block_size() != 0
            || t.dims.last().copied().unwrap_or(0) % t.dtype.block_size() != 0
        {
            return Err(Error::InvalidParams(format!(
                "tensor {}: a row of {:?} does not split into {:?} blocks",
                t.name, t.dims, t.dtype
            )));
        }
        write_str(&mut h, &t.name).map_err(|e| Error::InvalidParams(e.to_string()))?;
        h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            h.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        h.extend_from_slice(&ggml_type_code(t.dtype).to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        let size = t.bytes() as u64;
        offset += size + pad(size);
    }
    let n = h.len() as u64;
    h.resize((n + pad(n)) as usize, 0);
    Ok(h)
}

/// ggml's type id.
pub fn ggml_type_code(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Writes a GGUF file at `dst` (through a temporary name): the header, then each tensor's data
/// as `data(i)` returns it, one at a time. Checks the cancel flag between tensors. Returns the
/// file size.
pub fn write_gguf(
    dst: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    data: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
    job: &mut Job<'_>,
) -> Result<u64> {
    let header = header_bytes(metadata, tensors)?;
    let mut f = AtomicFile::create(dst)?;
    f.write_all(&header)?;
    let total = tensors.len();
    for (i, t) in tensors.iter().enumerate() {
        job.check()?;
        job.report("writing tensors", i, total);
        let bytes = data(i)?;
        if bytes.len() != t.bytes() {
            return Err(Error::InvalidParams(format!(
                "tensor {}: {} bytes of data, its type and shape need {}",
                t.name,
                bytes.len(),
                t.bytes()
            )));
        }
        f.write_all(&bytes)?;
        let p = pad(bytes.len() as u64) as usize;
        f.write_all(&vec![0u8; p])?;
    }
    job.report("writing tensors", total, total);
    let size = f.position()?;
    f.commit()?;
    Ok(size)
}

/// What a tensor is, for the choice of its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    TokenEmbd,
    Output,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    /// Norm weights and biases: always F32.
    Vector,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third
/// in between get the larger type.
fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// llama.cpp's `tensor_type_fallback`: a type whose block does not divide the row length is
/// replaced by a 32-block one (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), else F16.
fn fallback(t: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(t.block_size()) {
        return t;
    }
    let f = match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        other => other,
    };
    if cols.is_multiple_of(f.block_size()) {
        f
    } else {
        GgmlDType::F16
    }
}

/// The type llama.cpp's `llama-quantize ... Q4_K_M` gives a dense llama tensor: Q4_K by default;
/// the output matrix (and the token embeddings when they are tied to it) Q6_K, or Q8_0 when the
/// row length is not a multiple of 256; `attn_v` and `ffn_down` Q6_K in the layers
/// `use_more_bits` picks (the first and last eighth, every third between); then the shape
/// fallbacks (Q4_K -> Q5_0, Q6_K -> Q8_0, else F16). For SmolLM2-135M (rows of 576 except
/// `ffn_down`'s 1536) that is: Q8_0 embeddings, Q5_0 q/k/o/gate/up and plain `attn_v`, Q8_0
/// for the `attn_v` of the larger layers, Q4_K / Q6_K `ffn_down`.
pub fn q4_k_m_type(
    kind: TensorKind,
    layer: usize,
    n_layer: usize,
    cols: usize,
    tied: bool,
) -> GgmlDType {
    let base = GgmlDType::Q4K;
    let t = match kind {
        TensorKind::Vector => return GgmlDType::F32,
        TensorKind::Output => output_type(cols),
        TensorKind::TokenEmbd if tied => output_type(cols),
        TensorKind::AttnV | TensorKind::FfnDown if use_more_bits(layer, n_layer) => GgmlDType::Q6K,
        _ => base,
    };
    fallback(t, cols)
}

fn output_type(cols: usize) -> GgmlDType {
    if cols.is_multiple_of(GgmlDType::Q4K.block_size()) {
        GgmlDType::Q6K
    } else {
        GgmlDType::Q8_0
    }
}

/// The type of one tensor under `ty`.
pub fn tensor_type(
    ty: WeightType,
    kind: TensorKind,
    layer: usize,
    n_layer: usize,
    cols: usize,
    tied: bool,
) -> GgmlDType {
    if kind == TensorKind::Vector {
        return GgmlDType::F32;
    }
    match ty {
        WeightType::F32 => GgmlDType::F32,
        WeightType::F16 => GgmlDType::F16,
        WeightType::Bf16 => GgmlDType::BF16,
        WeightType::Q8_0 => fallback(GgmlDType::Q8_0, cols),
        WeightType::Q4KM => q4_k_m_type(kind, layer, n_layer, cols, tied),
    }
}

/// One tensor of a model export: where its values come from (a Hugging Face name) and how it
/// is written.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub spec: TensorSpec,
    pub hf_name: String,
    /// Apply llama.cpp's Q/K row permutation with this many heads.
    pub permute_heads: Option<usize>,
}

/// Every tensor of `cfg`'s model in llama.cpp's names and `ty`'s types. Errors for what GGUF
/// (as Attune writes it) cannot carry.
pub fn plan(cfg: &Config, ty: WeightType) -> Result<Vec<PlannedTensor>> {
    let bad = |reason: String| Error::InvalidParams(reason);
    let (_, permuted) = gguf_architecture(&cfg.architecture).ok_or_else(|| {
        bad(format!(
            "architecture '{}' has no GGUF layout in Attune (llama, mistral and qwen2 do)",
            cfg.architecture
        ))
    })?;
    if cfg.rope_scaling.is_some() {
        return Err(bad(
            "llama3 rope scaling (rope_freqs) is not written to GGUF by Attune; export as a \
             Hugging Face folder instead"
                .into(),
        ));
    }
    let h = cfg.hidden_size;
    let hd = cfg.head_dim();
    let q = cfg.num_attention_heads * hd;
    let kv = cfg.num_key_value_heads * hd;
    let n_layer = cfg.num_hidden_layers;
    let tied = cfg.tie_word_embeddings;
    let mut out = Vec::new();
    let mut push = |gguf: String,
                    hf: String,
                    dims: Vec<usize>,
                    kind: TensorKind,
                    layer: usize,
                    permute: Option<usize>| {
        let cols = *dims.last().unwrap_or(&1);
        let dtype = tensor_type(ty, kind, layer, n_layer, cols, tied);
        out.push(PlannedTensor {
            spec: TensorSpec {
                name: gguf,
                dims,
                dtype,
            },
            hf_name: hf,
            permute_heads: permute,
        });
    };
    push(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, h],
        TensorKind::TokenEmbd,
        0,
        None,
    );
    push(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![h],
        TensorKind::Vector,
        0,
        None,
    );
    if !tied {
        push(
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![cfg.vocab_size, h],
            TensorKind::Output,
            0,
            None,
        );
    }
    let perm = |n: usize| if permuted { Some(n) } else { None };
    for i in 0..n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        let m = |s: &str| format!("model.layers.{i}.{s}");
        push(
            b("attn_norm.weight"),
            m("input_layernorm.weight"),
            vec![h],
            TensorKind::Vector,
            i,
            None,
        );
        let projs: [(&str, usize, usize, TensorKind, Option<usize>); 7] = [
            (
                "self_attn.q_proj",
                q,
                h,
                TensorKind::AttnQ,
                perm(cfg.num_attention_heads),
            ),
            (
                "self_attn.k_proj",
                kv,
                h,
                TensorKind::AttnK,
                perm(cfg.num_key_value_heads),
            ),
            ("self_attn.v_proj", kv, h, TensorKind::AttnV, None),
            ("self_attn.o_proj", h, q, TensorKind::AttnOutput, None),
            (
                "mlp.gate_proj",
                cfg.intermediate_size,
                h,
                TensorKind::FfnGate,
                None,
            ),
            (
                "mlp.up_proj",
                cfg.intermediate_size,
                h,
                TensorKind::FfnUp,
                None,
            ),
            (
                "mlp.down_proj",
                h,
                cfg.intermediate_size,
                TensorKind::FfnDown,
                None,
            ),
        ];
        for (hf, rows, cols, kind, permute) in projs {
            let g = gguf_proj_name(hf).unwrap_or("?");
            push(
                b(&format!("{g}.weight")),
                m(&format!("{hf}.weight")),
                vec![rows, cols],
                kind,
                i,
                permute,
            );
            if cfg.attention_bias && matches!(g, "attn_q" | "attn_k" | "attn_v") {
                push(
                    b(&format!("{g}.bias")),
                    m(&format!("{hf}.bias")),
                    vec![rows],
                    TensorKind::Vector,
                    i,
                    permute,
                );
            }
        }
        push(
            b("ffn_norm.weight"),
            m("post_attention_layernorm.weight"),
            vec![h],
            TensorKind::Vector,
            i,
            None,
        );
    }
    // Order the block tensors as llama.cpp's converter does: per layer, norm first.
    Ok(out)
}

/// Bytes of the tensor data of `cfg`'s model under `ty` (alignment padding included).
pub fn tensor_bytes(cfg: &Config, ty: WeightType) -> Result<u64> {
    Ok(plan(cfg, ty)?
        .iter()
        .map(|t| {
            let b = t.spec.bytes() as u64;
            b + pad(b)
        })
        .sum())
}

/// A count of each block type in a plan, largest share first, e.g. "Q5_0 x150, Q8_0 x31".
pub fn type_mix(plan: &[PlannedTensor]) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for t in plan {
        let name = crate::inspect::ggml_dtype_name(t.spec.dtype).to_string();
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name, 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts
        .iter()
        .map(|(n, c)| format!("{n} x{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a model GGUF carries besides the weights.
pub struct ModelMeta {
    /// `general.name`.
    pub name: String,
    /// `tokenizer.*` keys (see [`super::tokenizer_meta`]); `tokenizer.chat_template` is set from
    /// `chat_template`.
    pub tokenizer: Vec<(String, Value)>,
    pub chat_template: String,
    /// More `general.*` keys (license, base model, ...).
    pub general: Vec<(String, Value)>,
}

/// The metadata of a model GGUF: `general.*`, `<arch>.*`, `tokenizer.*`.
pub fn model_metadata(
    cfg: &Config,
    ty: WeightType,
    meta: &ModelMeta,
) -> Result<Vec<(String, Value)>> {
    let (arch, _) = gguf_architecture(&cfg.architecture).ok_or_else(|| {
        Error::InvalidParams(format!(
            "architecture '{}' has no GGUF layout in Attune",
            cfg.architecture
        ))
    })?;
    let u32v = |v: usize, key: &str| -> Result<Value> {
        u32::try_from(v)
            .map(Value::U32)
            .map_err(|_| Error::InvalidParams(format!("{key} = {v} does not fit GGUF's u32")))
    };
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(meta.name.clone())),
    ];
    for (k, v) in &meta.general {
        if !md.iter().any(|(x, _)| x == k) && k.starts_with("general.") {
            md.push((k.clone(), v.clone()));
        }
    }
    md.push(("general.file_type".into(), Value::U32(ty.file_type())));
    md.push(("general.quantization_version".into(), Value::U32(2)));
    let a = |k: &str| format!("{arch}.{k}");
    md.push((a("vocab_size"), u32v(cfg.vocab_size, "vocab_size")?));
    md.push((
        a("context_length"),
        u32v(cfg.max_position_embeddings, "context_length")?,
    ));
    md.push((a("embedding_length"), u32v(cfg.hidden_size, "hidden_size")?));
    md.push((
        a("block_count"),
        u32v(cfg.num_hidden_layers, "block_count")?,
    ));
    md.push((
        a("feed_forward_length"),
        u32v(cfg.intermediate_size, "intermediate_size")?,
    ));
    md.push((a("rope.dimension_count"), u32v(cfg.head_dim(), "head_dim")?));
    md.push((
        a("attention.head_count"),
        u32v(cfg.num_attention_heads, "num_attention_heads")?,
    ));
    md.push((
        a("attention.head_count_kv"),
        u32v(cfg.num_key_value_heads, "num_key_value_heads")?,
    ));
    md.push((a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)));
    md.push((
        a("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    ));
    if cfg.head_dim.is_some() {
        md.push((a("attention.key_length"), u32v(cfg.head_dim(), "head_dim")?));
        md.push((
            a("attention.value_length"),
            u32v(cfg.head_dim(), "head_dim")?,
        ));
    }
    let mut has_template = false;
    for (k, v) in &meta.tokenizer {
        if !k.starts_with("tokenizer.") || md.iter().any(|(x, _)| x == k) {
            continue;
        }
        if k == "tokenizer.chat_template" {
            has_template = true;
            md.push((k.clone(), Value::String(meta.chat_template.clone())));
        } else {
            md.push((k.clone(), v.clone()));
        }
    }
    if !has_template {
        md.push((
            "tokenizer.chat_template".into(),
            Value::String(meta.chat_template.clone()),
        ));
    }
    Ok(md)
}

/// The model's weights by Hugging Face name (f32, Hugging Face layout). A LoRA branch attached
/// to a projection is folded into its weight (`W + scale * B A`), so the app's adapted model is
/// what gets written.
pub struct WeightSource<'a> {
    model: &'a Llama,
    linears: HashMap<String, &'a Linear>,
}

impl<'a> WeightSource<'a> {
    pub fn new(model: &'a Llama) -> Self {
        let mut linears: HashMap<String, &Linear> = model.linears().into_iter().collect();
        linears.insert("lm_head".into(), model.lm_head());
        WeightSource { model, linears }
    }

    /// The f32 tensor of Hugging Face parameter `name`.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let missing = || Error::InvalidParams(format!("the model has no tensor {name}"));
        match name {
            "model.embed_tokens.weight" => return self.model.embed_tokens().weight_f32(),
            "model.norm.weight" => return Ok(self.model.norm().weight.clone()),
            _ => {}
        }
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let (i, tail) = rest.split_once('.').ok_or_else(missing)?;
            let i: usize = i.parse().map_err(|_| missing())?;
            let b = self.model.layers().get(i).ok_or_else(missing)?;
            // Norms by their Hugging Face names (the family's own: Llama's
            // post_attention_layernorm is the norm before the MLP, Gemma's is after attention).
            if let Some(norm) = tail.strip_suffix(".weight") {
                if let Some((_, n)) = b.norms().into_iter().find(|(k, _)| *k == norm) {
                    return Ok(n.weight.clone());
                }
            }
        }
        if let Some(module) = name.strip_suffix(".weight") {
            let lin = self.linears.get(module).ok_or_else(missing)?;
            return effective_weight(lin);
        }
        if let Some(module) = name.strip_suffix(".bias") {
            let lin = self.linears.get(module).ok_or_else(missing)?;
            return lin.bias().cloned().ok_or_else(missing);
        }
        Err(missing())
    }
}

/// `W + scale * B A` when a LoRA branch is attached, else `W` (f32).
pub fn effective_weight(lin: &Linear) -> Result<Tensor> {
    let w = lin.weight_f32()?.to_dtype(DType::F32)?;
    match lin.lora() {
        None => Ok(w),
        Some(l) => {
            let delta = (l.b.detach().matmul(&l.a.detach())? * l.scale)?;
            Ok((w + delta)?)
        }
    }
}

/// The bytes of `t` (f32, `[rows, cols]` or `[n]`) in block type `dtype`.
pub fn encode(t: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    if dtype == GgmlDType::F32 {
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let mut out = Vec::with_capacity(v.len() * 4);
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
        return Ok(out);
    }
    let q = QTensor::quantize(&t, dtype)?;
    Ok(q.data()?.into_owned())
}

/// Writes `model` (its LoRA branches folded in) as a GGUF file of type `ty` at `dst`.
/// Returns the file size.
pub fn write_model(
    model: &Llama,
    meta: &ModelMeta,
    ty: WeightType,
    dst: &Path,
    job: &mut Job<'_>,
) -> Result<u64> {
    let cfg = model.config();
    let planned = plan(cfg, ty)?;
    let metadata = model_metadata(cfg, ty, meta)?;
    let specs: Vec<TensorSpec> = planned.iter().map(|p| p.spec.clone()).collect();
    let source = WeightSource::new(model);
    let mut data = |i: usize| -> Result<Vec<u8>> {
        let p = &planned[i];
        let mut t = source.tensor(&p.hf_name)?;
        if t.dims() != p.spec.dims.as_slice() {
            return Err(Error::InvalidParams(format!(
                "{}: shape {:?}, the config says {:?}",
                p.hf_name,
                t.dims(),
                p.spec.dims
            )));
        }
        if let Some(n) = p.permute_heads {
            t = crate::gguf::permute_dense_rows(&t, n)?;
        }
        encode(&t, p.spec.dtype).map_err(|e| Error::InvalidParams(format!("{}: {e}", p.spec.name)))
    };
    write_gguf(dst, &metadata, &specs, &mut data, job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm_cfg() -> Config {
        Config {
            architecture: "llama".into(),
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            head_dim: None,
            rope_scaling: None,
            ..Config::default()
        }
    }

    #[test]
    fn q4_k_m_mix_follows_llama_cpp_for_smollm2() {
        let p = plan(&smollm_cfg(), WeightType::Q4KM).expect("plan");
        let ty = |name: &str| {
            p.iter()
                .find(|t| t.spec.name == name)
                .map(|t| t.spec.dtype)
                .expect(name)
        };
        // Tied embeddings take the output rule; 576 is not a multiple of 256 -> Q8_0.
        assert_eq!(ty("token_embd.weight"), GgmlDType::Q8_0);
        assert_eq!(ty("output_norm.weight"), GgmlDType::F32);
        // Rows of 576: Q4_K falls back to Q5_0, Q6_K to Q8_0.
        assert_eq!(ty("blk.5.attn_q.weight"), GgmlDType::Q5_0);
        assert_eq!(ty("blk.0.attn_v.weight"), GgmlDType::Q8_0); // first eighth
        assert_eq!(ty("blk.4.attn_v.weight"), GgmlDType::Q5_0); // (4-3)%3 != 2
        assert_eq!(ty("blk.5.attn_v.weight"), GgmlDType::Q8_0); // (5-3)%3 == 2
        assert_eq!(ty("blk.29.attn_v.weight"), GgmlDType::Q8_0); // last eighth
                                                                 // ffn_down has rows of 1536: the K-quants fit.
        assert_eq!(ty("blk.5.ffn_down.weight"), GgmlDType::Q6K);
        assert_eq!(ty("blk.6.ffn_down.weight"), GgmlDType::Q4K);
        assert_eq!(ty("blk.6.ffn_norm.weight"), GgmlDType::F32);
        // 1 embedding + 1 norm + 30 layers x 9 tensors.
        assert_eq!(p.len(), 2 + 30 * 9);
    }

    #[test]
    fn q4_k_m_with_k_quant_friendly_rows() {
        let mut cfg = smollm_cfg();
        cfg.hidden_size = 512;
        cfg.num_attention_heads = 8;
        cfg.num_key_value_heads = 2;
        cfg.tie_word_embeddings = false;
        let p = plan(&cfg, WeightType::Q4KM).expect("plan");
        let ty = |name: &str| p.iter().find(|t| t.spec.name == name).map(|t| t.spec.dtype);
        assert_eq!(ty("output.weight"), Some(GgmlDType::Q6K));
        assert_eq!(ty("token_embd.weight"), Some(GgmlDType::Q4K));
        assert_eq!(ty("blk.10.attn_q.weight"), Some(GgmlDType::Q4K));
        assert_eq!(ty("blk.0.attn_v.weight"), Some(GgmlDType::Q6K));
    }

    #[test]
    fn header_round_trips_through_candles_reader() {
        let md = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
            ("x.f".to_string(), Value::F32(1.5)),
        ];
        let specs = vec![
            TensorSpec {
                name: "w".into(),
                dims: vec![2, 32],
                dtype: GgmlDType::Q8_0,
            },
            TensorSpec {
                name: "v".into(),
                dims: vec![3],
                dtype: GgmlDType::F32,
            },
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.gguf");
        let w = Tensor::arange(0f32, 64f32, &candle_core::Device::Cpu)
            .and_then(|t| t.reshape((2, 32)))
            .expect("tensor");
        let v = Tensor::new(&[1f32, 2., 3.], &candle_core::Device::Cpu).expect("tensor");
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let mut progress = |_: &str, _: usize, _: usize| {};
        let mut job = Job {
            progress: &mut progress,
            cancel: &cancel,
        };
        let mut data = |i: usize| {
            if i == 0 {
                encode(&w, GgmlDType::Q8_0)
            } else {
                encode(&v, GgmlDType::F32)
            }
        };
        write_gguf(&path, &md, &specs, &mut data, &mut job).expect("write");
        let mut f = std::fs::File::open(&path).expect("open");
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).expect("read");
        assert_eq!(
            c.metadata["general.architecture"].to_string().expect("s"),
            "llama"
        );
        let back = c
            .tensor(&mut f, "v", &candle_core::Device::Cpu)
            .and_then(|q| q.dequantize(&candle_core::Device::Cpu))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("v");
        assert_eq!(back, vec![1., 2., 3.]);
        let wq = c
            .tensor(&mut f, "w", &candle_core::Device::Cpu)
            .and_then(|q| q.dequantize(&candle_core::Device::Cpu))
            .expect("w");
        let diff = (wq - &w)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        // Q8_0 rounds to steps of max|x| / 127 per block of 32: at most 63 / 254 here.
        assert!(diff <= 63.0 / 254.0 + 1e-4, "Q8_0 round trip off by {diff}");
    }

    #[test]
    fn cancel_leaves_no_file() {
        let specs = vec![TensorSpec {
            name: "v".into(),
            dims: vec![3],
            dtype: GgmlDType::F32,
        }];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.gguf");
        let cancel = std::sync::atomic::AtomicBool::new(true);
        let mut progress = |_: &str, _: usize, _: usize| {};
        let mut job = Job {
            progress: &mut progress,
            cancel: &cancel,
        };
        let mut data = |_: usize| Ok(vec![0u8; 12]);
        let err = write_gguf(&path, &[], &specs, &mut data, &mut job).expect_err("cancelled");
        assert!(matches!(err, Error::Cancelled), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }
}
