//! GGUF reader: configuration from `<arch>.*` metadata and weights as quantized tensors.
//!
//! Layout choice: llama.cpp's converter stores llama's `attn_q` / `attn_k` rows permuted for its
//! interleaved rope. This reader **un-permutes** those rows on load (a row permutation, so it works
//! on the quantized blocks directly, at no precision cost), so every model in Attune is in Hugging
//! Face layout: the standard (half-split) rope applies, and PEFT adapters attach and export without
//! any permutation. Qwen2/3, Gemma 3 and Phi-3 GGUFs are not permuted by llama.cpp (their rope is
//! the half-split one) and are taken as they are. Gemma 3's norm scales are stored as `1 + w`;
//! the reader subtracts the 1, so the model holds the Hugging Face values. Phi-3's `attn_qkv` and
//! `ffn_up` (gate and up stacked) stay fused, as Hugging Face's `qkv_proj` and `gate_up_proj`.
//!
//! Quantized matrices stay [`QTensor`]s; Q4_1, Q8_0, Q4_K, Q5_K and Q6_K ones also get Attune's
//! decode kernel (see [`Linear::with_decode_kernel`]; candle's are scalar or single-threaded
//! AVX2); with [`ComputeMode::Auto`] or
//! [`ComputeMode::F32`] an f32 copy is dequantized for prompt processing. Embeddings and norms are
//! dequantized to f32. SmolLM2 ties its embeddings: without `output.weight` the lm_head shares
//! `token_embd.weight`.
//!
//! [`load`] runs in two passes: the file is read serially (every projection's blocks, its bias
//! and the norms), then each projection's compute forms are built in parallel on rayon's pool,
//! beside the embedding's f32 copy and the head (0.49 -> 0.19-0.22 s for the default model);
//! an F32 load (full fine-tuning) builds them serially, for its memory (see `load`).

use std::borrow::Cow;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::{Config, Family, RopeScaling, SUPPORTED_ARCHITECTURES};
use crate::kernels;
use crate::kernels::amx::{self, PackedWeight};
use crate::linear::{ComputeMode, Linear};
use crate::llama::{
    embedding_scale, final_norm, Block, BlockNorms, BlockProjections, Embedding, GateUpProj, Llama,
    LlamaWeights, QkvProj,
};
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

/// The model configuration from GGUF metadata, read as llama.cpp reads each architecture
/// (`src/models/<arch>.cpp`): Gemma 3's sliding-window pattern defaults to every 6th layer
/// global and its local rope base to 10000, its query scale to `head_dim^-0.5` (the 27B model's
/// to `(hidden / heads)^-0.5`); SmolLM3 leaves rope out of every 4th layer; Phi-3's partial rotary
/// and LongRoPE come from `rope.dimension_count` and `rope_factors_{long,short}.weight`; llama3
/// rope scaling from `rope_freqs.weight`.
pub fn config_from_content(content: &Content, path: &Path) -> Result<Config> {
    let md = Metadata::new(content, path);
    let arch = md.string("general.architecture")?.to_string();
    let Some(family) = Family::from_architecture(&arch)
        .filter(|_| SUPPORTED_ARCHITECTURES.contains(&arch.as_str()))
    else {
        return Err(Error::UnsupportedArchitecture {
            path: path.to_path_buf(),
            architecture: arch,
        });
    };
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| -> Result<usize> { to_usize(md.uint(&key(k))?, path, &key(k)) };
    let opt_u = |k: &str| -> Result<Option<usize>> {
        md.opt_uint(&key(k))?
            .map(|v| to_usize(v, path, &key(k)))
            .transpose()
    };
    let hidden_size = u("embedding_length")?;
    let num_attention_heads = u("attention.head_count")?;
    let num_key_value_heads = opt_u("attention.head_count_kv")?.unwrap_or(num_attention_heads);
    let num_hidden_layers = u("block_count")?;
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
    let head_dim = opt_u("attention.key_length")?;
    let hd = head_dim.unwrap_or(hidden_size / num_attention_heads.max(1));
    let rotary_dim = match opt_u("rope.dimension_count")? {
        Some(rd) if rd != hd => Some(rd),
        _ => None,
    };
    let bos_token_id = md
        .opt_uint("tokenizer.ggml.bos_token_id")?
        .map(|v| v as u32);
    let eos_token_ids = md
        .opt_uint("tokenizer.ggml.eos_token_id")?
        .map(|v| vec![v as u32])
        .unwrap_or_default();
    let mut cfg = Config {
        architecture: arch.clone(),
        vocab_size,
        hidden_size,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers,
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
        rotary_dim,
        ..Config::default()
    };
    cfg.apply_family_defaults(family);
    let rd = cfg.rotary_dim();
    // Rope scaling.
    let scaling_type = match md.get(&key("rope.scaling.type")) {
        Some(_) => Some(md.string(&key("rope.scaling.type"))?.to_string()),
        None => None,
    };
    let factor = md
        .opt_float(&key("rope.scaling.factor"))?
        .or(md.opt_float(&key("rope.scale_linear"))?);
    let mut t = ContentTensors { content, path };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        let f = t.vector("rope_freqs.weight", rd / 2)?;
        cfg.rope_scaling = Some(match llama3_from_factors(&f, cfg.rope_theta, rd) {
            Some(s) => RopeScaling::Llama3(s),
            None => RopeScaling::Factors { factors: f },
        });
    } else if content
        .tensor_infos
        .contains_key("rope_factors_long.weight")
    {
        let long_factor = t.vector("rope_factors_long.weight", rd / 2)?;
        let short_factor = t.vector("rope_factors_short.weight", rd / 2)?;
        let original = opt_u("rope.scaling.original_context_length")?.ok_or_else(|| {
            Error::field(
                path,
                key("rope.scaling.original_context_length"),
                "missing beside the LongRoPE factors",
            )
        })?;
        let scale = cfg.max_position_embeddings as f64 / original.max(1) as f64;
        let attention_factor =
            md.opt_float(&key("rope.scaling.attn_factor"))?
                .unwrap_or(if scale > 1.0 {
                    (1.0 + scale.ln() / (original as f64).ln()).sqrt()
                } else {
                    1.0
                });
        cfg.rope_scaling = Some(RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings: original,
            attention_factor,
        });
    } else {
        match (scaling_type.as_deref(), factor) {
            (None | Some("none"), _) => {}
            (Some("linear"), Some(f)) if f != 1.0 => {
                cfg.rope_scaling = Some(RopeScaling::Linear { factor: f })
            }
            (Some("linear"), _) => {}
            (Some(other), _) => {
                return Err(Error::field(
                    path,
                    key("rope.scaling.type"),
                    format!("'{other}' rope scaling is not supported (linear, llama3, longrope)"),
                ))
            }
        }
    }
    if md
        .opt_float(&key("final_logit_softcapping"))?
        .is_some_and(|c| c != 0.0)
        || md
            .opt_float(&key("attn_logit_softcapping"))?
            .is_some_and(|c| c != 0.0)
    {
        return Err(Error::field(
            path,
            key("final_logit_softcapping"),
            "logit soft-capping is not supported",
        ));
    }
    // Sliding windows.
    let window = opt_u("attention.sliding_window")?.filter(|&w| w > 0);
    match family {
        Family::Gemma3 => {
            if let Some(w) = window {
                let pattern_key = key("attention.sliding_window_pattern");
                let sliding: Vec<bool> = match md.get(&pattern_key) {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| v.to_bool().map_err(|e| Error::field(path, &pattern_key, e)))
                        .collect::<Result<_>>()?,
                    Some(_) => {
                        let p = to_usize(md.uint(&pattern_key)?, path, &pattern_key)?.max(1);
                        (0..num_hidden_layers).map(|i| i % p < p - 1).collect()
                    }
                    // llama.cpp: every 6th layer is global.
                    None => (0..num_hidden_layers).map(|i| i % 6 < 5).collect(),
                };
                cfg.sliding_window = Some(w);
                cfg.sliding_layers = sliding;
            }
            cfg.rope_local_theta = Some(
                md.opt_float(&key("rope.freq_base_swa"))?
                    .unwrap_or(10_000.0),
            );
            // llama.cpp's rule (gemma_pytorch's config): the 27B model scales queries by
            // (hidden / heads)^-0.5, the others by head_dim^-0.5.
            cfg.query_pre_attn_scalar = Some(if num_hidden_layers == 62 {
                (hidden_size / num_attention_heads) as f64
            } else {
                hd as f64
            });
        }
        // llama.cpp turns Phi-3's window off; transformers keeps it: Attune follows
        // transformers (the PyTorch reference) where the file states one.
        Family::Mistral | Family::Phi3 | Family::Qwen2 | Family::Qwen3 => {
            if let Some(w) = window {
                cfg.sliding_window = Some(w);
                cfg.sliding_layers = vec![true; num_hidden_layers];
            }
        }
        Family::Smollm3 => {
            cfg.rope_layers = (0..num_hidden_layers).map(|i| (i + 1) % 4 != 0).collect();
        }
        Family::Llama => {}
    }
    cfg.validate(path)?;
    Ok(cfg)
}

/// The llama3 rope-scaling parameters behind llama.cpp's per-frequency `rope_freqs` (its
/// converter's formula), when they can be recovered: `low_freq_factor` is taken as 1 (Llama
/// 3.x's; only the ratios of the three lengths matter), the original context and
/// `high_freq_factor` follow from two frequencies in the smooth band, and every factor must come
/// back within 1e-4. `None` otherwise (the factors are then used as they are).
pub fn llama3_from_factors(
    factors: &[f64],
    theta: f64,
    rd: usize,
) -> Option<crate::config::Llama3RopeScaling> {
    let factor = factors.iter().copied().fold(1.0, f64::max);
    if factor <= 1.0 {
        return None;
    }
    let wl = |i: usize| {
        let inv = 1.0 / (theta as f32).powf((2 * i) as f32 / rd as f32);
        2.0 * std::f64::consts::PI / inv as f64
    };
    let smooth: Vec<(f64, f64)> = factors
        .iter()
        .enumerate()
        .filter(|(_, &f)| f > 1.0 + 1e-6 && f < factor - 1e-6)
        .map(|(i, &f)| (wl(i), (1.0 / f - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .collect();
    let [(w1, s1), (w2, s2), ..] = smooth.as_slice() else {
        return None;
    };
    // s = (old / wl - 1) / (high - 1): with b = high - 1, s b - old / wl = -1.
    let det = s1 * (-1.0 / w2) - s2 * (-1.0 / w1);
    if det.abs() < 1e-12 {
        return None;
    }
    let b = (-(-1.0 / w2) + (-1.0 / w1)) / det;
    let old = (s1 * -1.0 - s2 * -1.0) / det;
    let old = old.round();
    let high = ((1.0 + b) * 1000.0).round() / 1000.0;
    if !(old >= 1.0 && high > 1.0) {
        return None;
    }
    let s = crate::config::Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: high,
        original_max_position_embeddings: old as usize,
    };
    let (lo_wl, hi_wl) = (old / s.low_freq_factor, old / high);
    for (i, &f) in factors.iter().enumerate() {
        let w = wl(i);
        let want = if w < hi_wl {
            1.0
        } else if w > lo_wl {
            factor
        } else {
            let sm = (old / w - 1.0) / (high - 1.0);
            1.0 / ((1.0 - sm) / factor + sm)
        };
        if (want - f).abs() > 1e-4 * f {
            return None;
        }
    }
    Some(s)
}

/// Reads small f32 tensors (rope factors) straight from the file's header directory.
struct ContentTensors<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl ContentTensors<'_> {
    /// The `n` values of 1-D tensor `name` (read from the file).
    fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f64>> {
        let file = crate::fsio::open_regular(self.path)?;
        let mut reader = BufReader::new(file);
        let mut t = TensorReader {
            content: self.content,
            reader: &mut reader,
            path: self.path,
            device: &Device::Cpu,
        };
        let v = t.f32(name)?.flatten_all()?.to_vec1::<f32>()?;
        if v.len() != n {
            return Err(Error::field(
                self.path,
                name,
                format!("{} values, expected {n}", v.len()),
            ));
        }
        Ok(v.into_iter().map(f64::from).collect())
    }
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
    let family = config.family().unwrap_or(Family::Llama);
    let device = Device::Cpu;
    let mut t = TensorReader {
        content: &content,
        reader: &mut reader,
        path,
        device: &device,
    };
    let permuted = family.gguf_permutes_qk();
    let nh = config.num_attention_heads;
    let nkv = config.num_key_value_heads;
    // llama.cpp's converter stores Gemma's `(1 + w)` norm scales as `1 + w`.
    let shift = if config.norm_plus_one { 1.0 } else { 0.0 };

    let embd_q = Arc::new(t.qtensor("token_embd.weight")?);
    let head_q = if config.tie_word_embeddings {
        None
    } else {
        Some(Arc::new(t.qtensor("output.weight")?))
    };

    // Pass 1 (serial, the file): each layer's projections as stored, and its norms.
    let mut plans = Vec::with_capacity(config.num_hidden_layers);
    let mut raws = Vec::new();
    for i in 0..config.num_hidden_layers {
        let p = format!("blk.{i}");
        let has = |n: &str| {
            content
                .tensor_infos
                .contains_key(&format!("{p}.{n}.weight"))
        };
        let fused_qkv = has("attn_qkv");
        // Phi-3 stores gate and up stacked in `ffn_up` (and no `ffn_gate`).
        let fused_gate_up = family.fused_projections() && !has("ffn_gate");
        let mut read = |name: &str, heads: Option<usize>| -> Result<()> {
            raws.push(read_projection(
                &mut t,
                &p,
                name,
                heads.filter(|_| permuted),
            )?);
            Ok(())
        };
        if fused_qkv {
            read("attn_qkv", None)?;
        } else {
            read("attn_q", Some(nh))?;
            read("attn_k", Some(nkv))?;
            read("attn_v", None)?;
        }
        read("attn_output", None)?;
        if fused_gate_up {
            read("ffn_up", None)?;
        } else {
            read("ffn_gate", None)?;
            read("ffn_up", None)?;
        }
        read("ffn_down", None)?;
        let mut norm = |n: &str, on: bool| -> Result<Option<Tensor>> {
            if !on {
                return Ok(None);
            }
            let w = t.f32(&format!("{p}.{n}.weight"))?;
            Ok(Some(if shift != 0.0 { (w - shift)? } else { w }))
        };
        let required = |w: Option<Tensor>| {
            w.ok_or_else(|| Error::InvalidParams("a required norm was not read".into()))
        };
        let norms = BlockNorms {
            input: required(norm("attn_norm", true)?)?,
            pre_mlp: required(norm("ffn_norm", true)?)?,
            q: norm("attn_q_norm", config.qk_norm)?,
            k: norm("attn_k_norm", config.qk_norm)?,
            post_attention: norm("post_attention_norm", config.sandwich_norms)?,
            post_mlp: norm("post_ffw_norm", config.sandwich_norms)?,
        };
        plans.push((norms, fused_qkv, fused_gate_up));
    }
    let out_norm = t.f32("output_norm.weight")?;
    // Pass 2 (parallel, the CPU): every projection's compute forms (dequantized, packed for the
    // matrix units, decode kernel) at once, beside the embedding's f32 copy and the head.
    let head = || -> Result<(Embedding, Linear)> {
        let embd_f32 = match mode {
            ComputeMode::Quantized => None,
            _ => Some(embd_q.dequantize(&device)?),
        };
        let lm_head = match head_q {
            None => {
                let q = match mode {
                    ComputeMode::F32 => None,
                    _ => Some(embd_q.clone()),
                };
                Linear::from_parts(embd_f32.clone(), q, None, mode)?.with_decode_kernel()?
            }
            Some(q) => Linear::from_qtensor(q, None, mode)?.with_decode_kernel()?,
        };
        let embed_tokens = Embedding {
            weight: embd_f32,
            qweight: (mode != ComputeMode::F32).then(|| embd_q.clone()),
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            scale: embedding_scale(&config),
        };
        Ok((embed_tokens, lm_head))
    };
    let build = |raw| build_projection(raw, mode, &device, path);
    let (head, built): (Result<_>, Result<Vec<Linear>>) = if mode == ComputeMode::F32 {
        // Serially, on this thread: F32 builds little worth spreading (a dequantized copy each),
        // and full fine-tuning copies these weights into its variables and drops them; kept on
        // the loading thread, their memory stays in the malloc arena those copies come from.
        // (Whether the parallel build raised full fine-tuning's peak was not settled: the peak
        // varies by 300 MiB between runs; see `FULL_SPREAD_BYTES_PER_PARAM` in the engine.)
        (head(), raws.into_iter().map(build).collect())
    } else {
        use rayon::prelude::*;
        rayon::join(head, || raws.into_par_iter().map(build).collect())
    };
    let (embed_tokens, lm_head) = head?;
    let mut built = built?.into_iter();
    let mut next = || {
        built
            .next()
            .ok_or_else(|| Error::InvalidParams("a projection was not built".into()))
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for (i, (norms, fused_qkv, fused_gate_up)) in plans.into_iter().enumerate() {
        let qkv = if fused_qkv {
            QkvProj::Fused { qkv_proj: next()? }
        } else {
            QkvProj::Split {
                q_proj: next()?,
                k_proj: next()?,
                v_proj: next()?,
            }
        };
        let o_proj = next()?;
        let gate_up = if fused_gate_up {
            GateUpProj::Fused {
                gate_up_proj: next()?,
            }
        } else {
            GateUpProj::Split {
                gate_proj: next()?,
                up_proj: next()?,
            }
        };
        let projections = BlockProjections {
            qkv,
            o_proj,
            gate_up,
            down_proj: next()?,
        };
        layers.push(
            Block::new(&config, i, norms, projections).map_err(|e| Error::Format {
                path: path.to_path_buf(),
                format: FORMAT,
                reason: e.to_string(),
            })?,
        );
    }
    let out_norm = if shift != 0.0 {
        (out_norm - shift)?
    } else {
        out_norm
    };
    let norm = final_norm(&config, out_norm)?;
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

/// A projection as the file stores it (rows un-permuted where llama.cpp permuted them).
struct RawProjection {
    name: String,
    q: QTensor,
    bias: Option<Tensor>,
}

/// Reads `{prefix}.{name}.weight` and its optional bias; `heads` un-permutes Q/K rows.
fn read_projection<R: Read + Seek>(
    t: &mut TensorReader<'_, R>,
    prefix: &str,
    name: &str,
    heads: Option<usize>,
) -> Result<RawProjection> {
    let wname = format!("{prefix}.{name}.weight");
    let mut q = t.qtensor(&wname)?;
    let mut bias = t.opt_f32(&format!("{prefix}.{name}.bias"))?;
    if let Some(n) = heads {
        q = unpermute_rows(&q, n).map_err(|e| Error::field(t.path, &wname, e))?;
        if let Some(b) = bias {
            bias = Some(unpermute_vec(&b, n)?);
        }
    }
    Ok(RawProjection {
        name: wname,
        q,
        bias,
    })
}

/// A projection's compute forms for `mode`: the quantized blocks with a decode kernel, and for
/// many-row products an f32 copy from the file's exact values or, where the CPU has matrix
/// units, that copy packed as bf16 (half the bytes; the quantized copy restores f32). The f32
/// copy is stored transposed (contiguous `[in, out]`): GEMM reads W^T row by row, 1.1-1.9x
/// faster on prompt-sized inputs.
fn build_projection(
    raw: RawProjection,
    mode: ComputeMode,
    device: &Device,
    path: &Path,
) -> Result<Linear> {
    let RawProjection { name, q, bias } = raw;
    let lin = if mode == ComputeMode::F32 {
        Linear::from_qtensor(Arc::new(q), bias, mode)
    } else {
        let dense = q.dequantize(device)?;
        let (out, inp) = dense.dims2()?;
        let packed = match mode {
            ComputeMode::Auto if amx::available() => Some(Arc::new(with_host_f32(&dense, |v| {
                PackedWeight::new(v, out, inp)
            })?)),
            _ => None,
        };
        let w = match mode {
            ComputeMode::Auto | ComputeMode::AutoF32 if packed.is_none() => {
                let t = with_host_f32(&dense, |v| kernels::transpose(v, out, inp))?;
                Some(Tensor::from_vec(t, (inp, out), device)?.t()?)
            }
            _ => None,
        };
        let q = if q.dtype() == GgmlDType::Q4_1 {
            q
        } else {
            decode_form(q, &dense)?
        };
        let lin = Linear::from_parts(w, Some(Arc::new(q)), bias, mode)
            .and_then(|l| l.with_decode_kernel());
        match packed {
            Some(p) => lin.and_then(|l| l.with_packed(p)),
            None => lin,
        }
    };
    lin.map_err(|e| Error::field(path, &name, e))
}

/// Runs `f` on the values of `t`, a contiguous f32 tensor: borrowed where it lies on the CPU
/// (a weight's dequantized copy is not copied again), fetched to the host elsewhere.
fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.device().is_cpu() {
        let (st, layout) = t.storage_and_layout();
        Ok(f(kernels::cpu_f32(&st, layout, "dequantized weight")?))
    } else {
        Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
    }
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

/// Block types without a fast decode kernel (neither Attune's Q4_1/Q8_0/K-quant kernels in
/// `kernels::quant` nor a SIMD one in candle): re-quantized to Q8_0 once at load. The error is below
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

/// Undoes llama.cpp's permutation on the rows of a dense `[n_head * head_dim, cols]` tensor
/// (GGUF layout -> Hugging Face layout), e.g. a GGUF LoRA's `lora_b` of `attn_q` / `attn_k`.
pub fn unpermute_dense_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let out = t.dim(0)?;
    if n_head == 0 || !out.is_multiple_of(n_head) || !(out / n_head).is_multiple_of(2) {
        return Err(Error::InvalidParams(format!(
            "cannot split {out} rows into {n_head} heads of even size"
        )));
    }
    let hd = out / n_head;
    let idx: Vec<u32> = (0..out).map(|r| gguf_row_of_hf_row(r, hd) as u32).collect();
    let idx = Tensor::from_vec(idx, out, t.device())?;
    Ok(t.index_select(&idx, 0)?)
}
