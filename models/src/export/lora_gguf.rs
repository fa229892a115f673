//! LoRA adapters as llama.cpp's adapter GGUF (what `llama-cli --lora` and Ollama's `ADAPTER`
//! load over the base GGUF), written and read.
//!
//! The layout of llama.cpp's `convert_lora_to_gguf.py`: `general.type` = `adapter`,
//! `adapter.type` = `lora`, `adapter.lora.alpha`, the base's `general.architecture`; per
//! adapted matrix `blk.N.<name>.weight.lora_a` (`[r, in]`, GGUF ne `[in, r]`) and `.lora_b`
//! (`[out, r]`). `lora_b` rows of `attn_q` / `attn_k` are permuted like the base's Q/K rows.
//! llama.cpp scales by `alpha / r`; an rsLoRA adapter (`alpha / sqrt(r)`) is written with
//! `alpha * sqrt(r)` so the product is the same. The matrices are F32: the file is exact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::gguf_out::{encode, write_gguf, TensorSpec};
use super::{gguf_architecture, gguf_proj_name, hf_proj_name, Job};
use crate::config::Config;
use crate::train::LoraConfig;
use crate::{Error, Result};

/// A PEFT LoRA key's parts: layer, Hugging Face module (`self_attn.q_proj`), A or B.
fn parse_peft_key(key: &str) -> Option<(usize, &str, char)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (module, ab) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, 'A')
    } else {
        (rest.strip_suffix(".lora_B.weight")?, 'B')
    };
    Some((layer, module, ab))
}

/// Metadata of an adapter GGUF.
pub struct AdapterMeta {
    pub name: String,
    /// The base model's name, for `general.base_model.0.name`.
    pub base_name: String,
}

/// The tensors of an adapter GGUF, in llama.cpp's names, ordered by layer and module.
fn planned(
    cfg: &Config,
    tensors: &HashMap<String, Tensor>,
) -> Result<Vec<(TensorSpec, String, Option<usize>)>> {
    let (_, permuted) = gguf_architecture(&cfg.architecture).ok_or_else(|| {
        Error::InvalidParams(format!(
            "architecture '{}' has no GGUF layout in Attune",
            cfg.architecture
        ))
    })?;
    let order = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    let mut keyed: BTreeMap<(usize, usize, char), (TensorSpec, String, Option<usize>)> =
        BTreeMap::new();
    for (key, t) in tensors {
        let (layer, module, ab) = parse_peft_key(key).ok_or_else(|| {
            Error::InvalidParams(format!(
                "adapter tensor '{key}' is not a LoRA matrix of a decoder projection; llama.cpp's \
                 adapter GGUF carries only those"
            ))
        })?;
        let g = gguf_proj_name(module).ok_or_else(|| {
            Error::InvalidParams(format!("adapter tensor '{key}': unknown module '{module}'"))
        })?;
        if layer >= cfg.num_hidden_layers {
            return Err(Error::InvalidParams(format!(
                "adapter tensor '{key}': layer {layer}, the model has {}",
                cfg.num_hidden_layers
            )));
        }
        let dims = t.dims().to_vec();
        if dims.len() != 2 {
            return Err(Error::InvalidParams(format!(
                "adapter tensor '{key}' has shape {dims:?}, expected a matrix"
            )));
        }
        let permute = match (permuted, g, ab) {
            (true, "attn_q", 'B') => Some(cfg.num_attention_heads),
            (true, "attn_k", 'B') => Some(cfg.num_key_value_heads),
            _ => None,
        };
        let name = format!("blk.{layer}.{g}.weight.lora_{}", ab.to_ascii_lowercase());
        let rank = order.iter().position(|o| *o == g).unwrap_or(order.len());
        keyed.insert(
            (layer, rank, ab),
            (
                TensorSpec {
                    name,
                    dims,
                    dtype: GgmlDType::F32,
                },
                key.clone(),
                permute,
            ),
        );
    }
    if keyed.is_empty() {
        return Err(Error::InvalidParams(
            "the adapter has no LoRA matrices".into(),
        ));
    }
    Ok(keyed.into_values().collect())
}

/// The `alpha` llama.cpp must read so that its `alpha / r` equals the adapter's scale.
pub fn gguf_alpha(config: &LoraConfig) -> f64 {
    config.scale() * config.r as f64
}

/// Writes the PEFT LoRA `tensors` (keys `base_model.model.<module>.lora_{A,B}.weight`, Hugging
/// Face layout) for a base of configuration `cfg` as an adapter GGUF at `dst`.
pub fn write(
    cfg: &Config,
    lora: &LoraConfig,
    tensors: &HashMap<String, Tensor>,
    meta: &AdapterMeta,
    dst: &Path,
    job: &mut Job<'_>,
) -> Result<u64> {
    let (arch, _) = gguf_architecture(&cfg.architecture).ok_or_else(|| {
        Error::InvalidParams(format!(
            "architecture '{}' has no GGUF layout in Attune",
            cfg.architecture
        ))
    })?;
    let plan = planned(cfg, tensors)?;
    for (spec, key, _) in &plan {
        let r_dim = if spec.name.ends_with("lora_a") {
            spec.dims[0]
        } else {
            spec.dims[1]
        };
        if r_dim != lora.r {
            return Err(Error::InvalidParams(format!(
                "adapter tensor '{key}' has rank {r_dim}, the adapter's r is {}",
                lora.r
            )));
        }
    }
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("adapter".into())),
        ("general.name".into(), Value::String(meta.name.clone())),
        ("general.base_model.count".into(), Value::U32(1)),
        (
            "general.base_model.0.name".into(),
            Value::String(meta.base_name.clone()),
        ),
        ("adapter.type".into(), Value::String("lora".into())),
        (
            "adapter.lora.alpha".into(),
            Value::F32(gguf_alpha(lora) as f32),
        ),
    ];
    let specs: Vec<TensorSpec> = plan.iter().map(|p| p.0.clone()).collect();
    let mut data = |i: usize| -> Result<Vec<u8>> {
        let (spec, key, permute) = &plan[i];
        let mut t = tensors
            .get(key)
            .ok_or_else(|| Error::InvalidParams(format!("adapter tensor '{key}' missing")))?
            .to_dtype(DType::F32)?;
        if let Some(n) = permute {
            t = crate::gguf::permute_dense_rows(&t, *n)?;
        }
        encode(&t, spec.dtype)
    };
    write_gguf(dst, &metadata, &specs, &mut data, job)
}

/// An adapter read back from an adapter GGUF: PEFT keys, Hugging Face layout.
#[derive(Debug, Clone)]
pub struct ReadAdapter {
    pub config: LoraConfig,
    pub tensors: HashMap<String, Tensor>,
    pub name: Option<String>,
}

/// Reads an adapter GGUF made for a base of configuration `cfg` (llama.cpp's checks: the
/// general and adapter types, the architecture), un-permuting `lora_b` of Q/K.
pub fn read(path: &Path, cfg: &Config) -> Result<ReadAdapter> {
    let (content, _) = crate::inspect::read_gguf_header(path)?;
    let md = crate::gguf::Metadata::new(&content, path);
    let gtype = md.string("general.type")?;
    if gtype != "adapter" {
        return Err(Error::field(
            path,
            "general.type",
            format!("'{gtype}': not an adapter GGUF"),
        ));
    }
    let atype = md.string("adapter.type")?;
    if atype != "lora" {
        return Err(Error::field(
            path,
            "adapter.type",
            format!("'{atype}' adapters are not supported (lora is)"),
        ));
    }
    let arch = md.string("general.architecture")?;
    let (want, permuted) = gguf_architecture(&cfg.architecture).ok_or_else(|| {
        Error::InvalidParams(format!(
            "architecture '{}' has no GGUF layout in Attune",
            cfg.architecture
        ))
    })?;
    if arch != want {
        return Err(Error::field(
            path,
            "general.architecture",
            format!("the adapter is for '{arch}', the base model is '{want}'"),
        ));
    }
    let alpha = md.opt_float("adapter.lora.alpha")?.unwrap_or(0.0);
    let name = md.string("general.name").ok().map(str::to_string);
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut tensors = HashMap::new();
    let mut rank: Option<usize> = None;
    let mut targets: Vec<String> = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let bad = |reason: String| Error::field(path, name.as_str(), reason);
        let (base, ab) = if let Some(b) = name.strip_suffix(".weight.lora_a") {
            (b, 'A')
        } else if let Some(b) = name.strip_suffix(".weight.lora_b") {
            (b, 'B')
        } else {
            return Err(bad(
                "not a lora_a / lora_b tensor (Attune applies LoRA matrices only)".into(),
            ));
        };
        let rest = base
            .strip_prefix("blk.")
            .ok_or_else(|| bad("not a decoder-layer tensor".into()))?;
        let (layer, g) = rest
            .split_once('.')
            .ok_or_else(|| bad("not blk.N.<name>".into()))?;
        let layer: usize = layer.parse().map_err(|_| bad("bad layer number".into()))?;
        let module = hf_proj_name(g).ok_or_else(|| bad(format!("unknown tensor '{g}'")))?;
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let mut t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        if t.rank() != 2 {
            return Err(bad(format!("shape {:?}, expected a matrix", t.dims())));
        }
        let r = if ab == 'A' { t.dim(0)? } else { t.dim(1)? };
        match rank {
            None => rank = Some(r),
            Some(r0) if r0 != r => {
                return Err(bad(format!("rank {r}, other matrices have rank {r0}")));
            }
            _ => {}
        }
        if ab == 'B' && permuted {
            let heads = match g {
                "attn_q" => Some(cfg.num_attention_heads),
                "attn_k" => Some(cfg.num_key_value_heads),
                _ => None,
            };
            if let Some(n) = heads {
                t = crate::gguf::unpermute_dense_rows(&t, n)?;
            }
        }
        let short = module.rsplit('.').next().unwrap_or(module).to_string();
        if !targets.contains(&short) {
            targets.push(short);
        }
        tensors.insert(
            format!("base_model.model.model.layers.{layer}.{module}.lora_{ab}.weight"),
            t,
        );
    }
    let r = rank.ok_or_else(|| Error::field(path, "tensors", "the adapter holds no tensors"))?;
    // llama.cpp: a zero alpha means a scale of 1.
    let alpha = if alpha == 0.0 { r as f64 } else { alpha };
    Ok(ReadAdapter {
        config: LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            targets,
            rslora: false,
        },
        tensors,
        name,
    })
}
