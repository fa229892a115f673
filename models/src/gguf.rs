//! GGUF reader: configuration from `<arch>.*` metadata and weights as quantized tensors.
//!
//! Layout choice: llama.cpp's converter stores llama's `attn_q` / `attn_k` rows permuted for its
//! interleaved rope. This reader **un-permutes** those rows on load (a row permutation, so it works
//! on the quantized blocks directly, at no precision cost), so every model in Attune is in Hugging
//! Face layout: the standard (half-split) rope applies, and PEFT adapters attach and export without
//! any permutation. Qwen2 GGUFs are not permuted by llama.cpp and are taken as they are.
//!
//! Quantized matrices stay [`QTensor`]s; Q4_1 and Q8_0 ones also get Attune's decode kernel
//! (see [`Linear::with_decode_kernel`]), which candle lacks for Q4_1; with [`ComputeMode::Auto`] or
//! [`ComputeMode::F32`] an f32 copy is dequantized for prompt processing. Embeddings and norms are
//! dequantized to f32. SmolLM2 ties its embeddings: without `output.weight` the lm_head shares
//! `token_embd.weight`.

use std::borrow::Cow;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::{Config, SUPPORTED_ARCHITECTURES};
use crate::kernels::amx::{self, PackedWeight};
use crate::linear::{ComputeMode, Linear};
use crate::llama::{Block, BlockProjections, Embedding, Llama, LlamaWeights, RmsNorm};
use crate::{Error, Result};

const FORMAT: &str = "GGUF";

/// Reads the GGUF header (metadata and tensor directory) of `path`, a regular file, checked
/// by [`crate::gguf_header`] (candle's own header parser never runs on a user's file).
pub fn read_content(path: &Path) -> Result<Content> {
    crate::gguf_header::read_file(path).map(|(c, _)| c)
}

/// Typed access to GGUF metadata with errors that name the file and key.
pub struct Metadata<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl<'a> Metadata<'a> {
    pub fn new(content: &'a Content, path: &'a Path) -> Self {
        Self { content, path }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    fn bad(&self, key: &str, e: impl ToString) -> Error {
        Error::field(self.path, key, e)
    }

    pub fn string(&self, key: &str) -> Result<&'a str> {
        let v = self
            .get(key)
            .ok_or_else(|| self.bad(key, "missing metadata key"))?;
        v.to_string()
            .map(|s| s.as_str())
            .map_err(|e| self.bad(key, e))
    }

    /// An unsigned integer of any GGUF width.
    pub fn uint(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)
            .ok_or_else(|| self.bad(key, "missing metadata key"))?;
        value_to_u64(v)
            .ok_or_else(|| self.bad(key, format!("expected an unsigned integer, got {v:?}")))
    }

    pub fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.uint(key).map(Some),
        }
    }

    pub fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(f)) => Ok(Some(*f as f64)),
            Some(Value::F64(f)) => Ok(Some(*f)),
            Some(v) => value_to_u64(v)
                .map(|u| Some(u as f64))
                .ok_or_else(|| self.bad(key, format!("expected a number, got {v:?}"))),
        }
    }
}

fn value_to_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

fn to_usize(v: u64, path: &Path, key: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::field(path, key, format!("{v} is too large")))
}

/// The model configuration from GGUF metadata.
pub fn config_from_content(content: &Content, path: &Path) -> Result<Config> {
    let md = Metadata::new(content, path);
    let arch = md.string("general.architecture")?.to_string();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(Error::UnsupportedArchitecture {
            path: path.to_path_buf(),
            architecture: arch,
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| -> Result<usize> { to_usize(md.uint(&key(k))?, path, &key(k)) };
    let hidden_size = u("embedding_length")?;
    let num_attention_heads = u("attention.head_count")?;
    let num_key_value_heads = match md.opt_uint(&key("attention.head_count_kv"))? {
        Some(v) => to_usize(v, path, &key("attention.head_count_kv"))?,
        None => num_attention_heads,
    };
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::field(path, "token_embd.weight", "tensor missing"))?;
    let vocab_size = match embd.shape.dims() {
        [v, h] if *h == hidden_size => *v,
        d => {
            return Err(Error::field(
                path,
                "token_embd.weight",
                format!("shape {d:?} does not match embedding_length {hidden_size}"),
            ))
        }
    };
    let head_dim = match md.opt_uint(&key("attention.key_length"))? {
        Some(v) => Some(to_usize(v, path, &key("attention.key_length"))?),
        None => None,
    };
    let hd = head_dim.unwrap_or(hidden_size / num_attention_heads.max(1));
    if let Some(rd) = md.opt_uint(&key("rope.dimension_count"))? {
        if rd as usize != hd {
            return Err(Error::field(
                path,
                key("rope.dimension_count"),
                format!("partial rotary ({rd} of {hd} dims) is not supported"),
            ));
        }
    }
    let bos_token_id = md
        .opt_uint("tokenizer.ggml.bos_token_id")?
        .map(|v| v as u32);
    let eos_token_ids = md
        .opt_uint("tokenizer.ggml.eos_token_id")?
        .map(|v| vec![v as u32])
        .unwrap_or_default();
    let cfg = Config {
        architecture: arch.clone(),
        vocab_size,
        hidden_size,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        rms_norm_eps: md
            .opt_float(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta: md.opt_float(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        max_position_embeddings: u("context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id,
        eos_token_ids,
        head_dim,
        rope_scaling: None,
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::field(
            path,
            "rope_freqs.weight",
            "GGUF llama3 rope-frequency factors are not supported; load the Hugging Face folder",
        ));
    }
    cfg.validate(path)?;
    Ok(cfg)
}

/// A model read from a GGUF file, with the header (the tokenizer and template are in it).
pub struct GgufModel {
    pub model: Llama,
    pub config: Config,
    pub content: Content,
    pub path: PathBuf,
}

/// Reads the tensors of `path` and builds the model.
pub fn load(path: &Path, mode: ComputeMode) -> Result<GgufModel> {
    let file = crate::fsio::open_regular(path)?;
    let mut reader = BufReader::new(file);
    let content = crate::gguf_header::read(&mut reader, path)?;
    let config = config_from_content(&content, path)?;
    let device = Device::Cpu;
    let mut t = TensorReader {
        content: &content,
        reader: &mut reader,
        path,
        device: &device,
    };
    let permuted = matches!(config.architecture.as_str(), "llama" | "mistral");
    let nh = config.num_attention_heads;
    let nkv = config.num_key_value_heads;

    let embd_q = Arc::new(t.qtensor("token_embd.weight")?);
    let embd_f32 = match mode {
        ComputeMode::Quantized => None,
        _ => Some(embd_q.dequantize(&device)?),
    };
    let embed_tokens = Embedding {
        weight: embd_f32.clone(),
        qweight: Some(embd_q.clone()),
        vocab_size: config.vocab_size,
        hidden_size: config.hidden_size,
    };
    let lm_head = if config.tie_word_embeddings {
        let q = match mode {
            ComputeMode::F32 => None,
            _ => Some(embd_q.clone()),
        };
        Linear::from_parts(embd_f32.clone(), q, None, mode)?.with_decode_kernel()?
    } else {
        Linear::from_qtensor(Arc::new(t.qtensor("output.weight")?), None, mode)?
            .with_decode_kernel()?
    };
    let embed_tokens = if mode == ComputeMode::F32 {
        Embedding {
            qweight: None,
            ..embed_tokens
        }
    } else {
        embed_tokens
    };

    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("blk.{i}");
        let mut proj = |name: &str, heads: Option<usize>| -> Result<Linear> {
            let wname = format!("{p}.{name}.weight");
            let mut q = t.qtensor(&wname)?;
            let mut bias = t.opt_f32(&format!("{p}.{name}.bias"))?;
            if let (true, Some(n)) = (permuted, heads) {
                q = unpermute_rows(&q, n).map_err(|e| Error::field(path, &wname, e))?;
                if let Some(b) = bias {
                    bias = Some(unpermute_vec(&b, n)?);
                }
            }
            let lin = if mode == ComputeMode::F32 {
                Linear::from_qtensor(Arc::new(q), bias, mode)
            } else {
                // f32 copy from the file's exact values; decode kernel on a fast block type.
                let dense = q.dequantize(&device)?;
                // Auto keeps the copy for many-row products as bf16 packed for the matrix units
                // where the CPU has them (half the bytes; the quantized copy restores f32), else
                // as f32 `[out, in]` stored transposed (contiguous `[in, out]`): GEMM reads W^T
                // row by row, 1.1-1.9x faster on prompt-sized inputs.
                let packed = match mode {
                    ComputeMode::Auto if amx::available() => {
                        let (out, inp) = dense.dims2()?;
                        let vals = dense.flatten_all()?.to_vec1::<f32>()?;
                        Some(Arc::new(PackedWeight::new(&vals, out, inp)))
                    }
                    _ => None,
                };
                let w = match mode {
                    ComputeMode::Auto | ComputeMode::AutoF32 if packed.is_none() => {
                        Some(dense.t()?.contiguous()?.t()?)
                    }
                    _ => None,
                };
                let lin = if q.dtype() == GgmlDType::Q4_1 {
                    Linear::from_parts(w, Some(Arc::new(q)), bias, mode)
                        .and_then(|l| l.with_decode_kernel())
                } else {
                    let fast = Arc::new(decode_form(q, &dense)?);
                    Linear::from_parts(w, Some(fast), bias, mode)
                        .and_then(|l| l.with_decode_kernel())
                };
                match packed {
                    Some(p) => lin.and_then(|l| l.with_packed(p)),
                    None => lin,
                }
            };
            lin.map_err(|e| Error::field(path, &wname, e))
        };
        let projections = BlockProjections {
            q_proj: proj("attn_q", Some(nh))?,
            k_proj: proj("attn_k", Some(nkv))?,
            v_proj: proj("attn_v", None)?,
            o_proj: proj("attn_output", None)?,
            gate_proj: proj("ffn_gate", None)?,
            up_proj: proj("ffn_up", None)?,
            down_proj: proj("ffn_down", None)?,
        };
        layers.push(Block::new(
            &config,
            t.f32(&format!("{p}.attn_norm.weight"))?,
            t.f32(&format!("{p}.ffn_norm.weight"))?,
            projections,
        )?);
    }
    let norm = RmsNorm::new(t.f32("output_norm.weight")?, config.rms_norm_eps)?;
    let weights = LlamaWeights {
        embed_tokens,
        layers,
        norm,
        lm_head,
    };
    let model = Llama::from_parts(config.clone(), device, weights).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        format: FORMAT,
        reason: e.to_string(),
    })?;
    Ok(GgufModel {
        model,
        config,
        content,
        path: path.to_path_buf(),
    })
}

struct TensorReader<'a, R: Read + Seek> {
    content: &'a Content,
    reader: &'a mut R,
    path: &'a Path,
    device: &'a Device,
}

impl<R: Read + Seek> TensorReader<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(Error::field(self.path, name, "tensor missing"));
        }
        let r = &mut *self.reader;
        let content = self.content;
        let device = self.device;
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            content.tensor(r, name, device)
        }));
        match res {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(Error::Format {
                path: self.path.to_path_buf(),
                format: FORMAT,
                reason: format!("tensor {name}: {e}"),
            }),
            Err(_) => Err(Error::Format {
                path: self.path.to_path_buf(),
                format: FORMAT,
                reason: format!("tensor {name}: malformed data"),
            }),
        }
    }

    fn f32(&mut self, name: &str) -> Result<Tensor> {
        let q = self.qtensor(name)?;
        Ok(q.dequantize(self.device)?.to_dtype(DType::F32)?)
    }

    fn opt_f32(&mut self, name: &str) -> Result<Option<Tensor>> {
        if self.content.tensor_infos.contains_key(name) {
            self.f32(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Block types without a fast decode kernel (neither Attune's Q4_1/Q8_0 kernels in
/// `linear.rs` nor a SIMD one in candle): re-quantized to Q8_0 once at load. The error is below
/// 0.4% of each 32-weight block's largest value; the f32 path keeps the file's exact values.
const SLOW_DECODE_TYPES: &[GgmlDType] = &[GgmlDType::Q5_0, GgmlDType::Q5_1];

fn decode_form(q: QTensor, dense: &Tensor) -> Result<QTensor> {
    let (_, inp) = q.shape().dims2()?;
    if SLOW_DECODE_TYPES.contains(&q.dtype()) && inp % GgmlDType::Q8_0.block_size() == 0 {
        Ok(QTensor::quantize(dense, GgmlDType::Q8_0)?)
    } else {
        Ok(q)
    }
}

/// GGUF row index of Hugging Face row `r` in a `[n_head * head_dim, _]` Q/K matrix.
fn gguf_row_of_hf_row(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (h, within) = (r / head_dim, r % head_dim);
    let (j, i) = (within / half, within % half);
    h * head_dim + 2 * i + j
}

/// Undoes llama.cpp's Q/K row permutation on a (possibly quantized) `[out, in]` matrix.
/// Rows are whole quantization blocks, so this is exact.
pub fn unpermute_rows(q: &QTensor, n_head: usize) -> Result<QTensor> {
    permute_rows_impl(q, n_head, true)
}

/// Applies llama.cpp's Q/K row permutation (Hugging Face layout -> GGUF layout).
pub fn permute_rows(q: &QTensor, n_head: usize) -> Result<QTensor> {
    permute_rows_impl(q, n_head, false)
}

fn permute_rows_impl(q: &QTensor, n_head: usize, to_hf: bool) -> Result<QTensor> {
    let (out, inp) = q.shape().dims2()?;
    if n_head == 0 || !out.is_multiple_of(n_head) || !(out / n_head).is_multiple_of(2) {
        return Err(Error::InvalidParams(format!(
            "cannot split {out} rows into {n_head} heads of even size"
        )));
    }
    let hd = out / n_head;
    let data = q.data()?;
    if data.len() % out != 0 {
        return Err(Error::InvalidParams(
            "quantized rows are not byte-aligned".into(),
        ));
    }
    let row = data.len() / out;
    let mut buf = vec![0u8; data.len()];
    for r in 0..out {
        let g = gguf_row_of_hf_row(r, hd);
        let (dst, src) = if to_hf { (r, g) } else { (g, r) };
        buf[dst * row..(dst + 1) * row].copy_from_slice(&data[src * row..(src + 1) * row]);
    }
    let storage = QStorage::from_data(Cow::Owned(buf), &q.device(), q.dtype())?;
    Ok(QTensor::new(storage, (out, inp))?)
}

/// Un-permutes a Q/K bias vector (GGUF -> Hugging Face layout).
fn unpermute_vec(b: &Tensor, n_head: usize) -> Result<Tensor> {
    let out = b.dims1()?;
    let hd = out / n_head.max(1);
    let idx: Vec<u32> = (0..out).map(|r| gguf_row_of_hf_row(r, hd) as u32).collect();
    let idx = Tensor::from_vec(idx, out, b.device())?;
    Ok(b.index_select(&idx, 0)?)
}

/// Applies llama.cpp's permutation to the rows of a dense `[n_head * head_dim, cols]` tensor
/// (Hugging Face layout -> GGUF layout), e.g. a PEFT `lora_B` of `q_proj` / `k_proj` to apply
/// next to raw GGUF weights.
pub fn permute_dense_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let out = t.dim(0)?;
    let hd = out / n_head.max(1);
    let mut idx = vec![0u32; out];
    for r in 0..out {
        idx[gguf_row_of_hf_row(r, hd)] = r as u32;
    }
    let idx = Tensor::from_vec(idx, out, t.device())?;
    Ok(t.index_select(&idx, 0)?)
}
