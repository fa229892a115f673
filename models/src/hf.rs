//! Hugging Face folder reader and writer: `config.json` plus single or sharded safetensors.
//!
//! Weights in f32, bf16 or f16 are converted to f32 (there is no quantized path for these
//! models). Tensor names are the Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`).
//! [`save`] writes the same layout back, so a GGUF model can be exported as a PEFT base.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::{Config, HfConfig};
use crate::linear::Linear;
use crate::llama::{
    embedding_scale, final_norm, Block, BlockNorms, BlockProjections, Embedding, GateUpProj, Llama,
    LlamaWeights, QkvProj,
};
use crate::{Error, Result};

/// Reads and validates `<dir>/config.json`.
pub fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    let text = crate::fsio::read_regular_string(&path)?;
    HfConfig::parse(&text, &path)?.into_config(&path)
}

/// The safetensors files of `dir`: the shards listed in `model.safetensors.index.json`, else
/// `model.safetensors`, else every `*.safetensors` (sorted).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = crate::fsio::read_regular_string(&index)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&index, "JSON", e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::field(&index, "weight_map", "missing or not an object"))?;
        let mut files = BTreeSet::new();
        for (k, f) in map {
            let f = f.as_str().ok_or_else(|| {
                Error::field(&index, format!("weight_map.{k}"), "not a file name")
            })?;
            if f.contains('/') || f.contains('\\') || f.contains("..") {
                return Err(Error::field(
                    &index,
                    format!("weight_map.{k}"),
                    format!("'{f}' is not a plain file name"),
                ));
            }
            files.insert(dir.join(f));
        }
        if files.is_empty() {
            return Err(Error::field(&index, "weight_map", "lists no files"));
        }
        return Ok(files.into_iter().collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::field(
            dir,
            "*.safetensors",
            "no weight files in the folder",
        ));
    }
    Ok(files)
}

/// Loads every tensor of the folder's safetensors files as f32 on the CPU.
pub fn read_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in safetensors_files(dir)? {
        // The header is checked (shapes, sizes, offsets) before candle's reader sees it.
        crate::inspect::read_safetensors_header(&f)?;
        let bytes = crate::fsio::read_regular(&f)?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| Error::format(&f, "safetensors", e))?;
        for (name, t) in tensors {
            let t = match t.dtype() {
                DType::F32 => t,
                DType::BF16 | DType::F16 | DType::F64 => t.to_dtype(DType::F32)?,
                other => {
                    return Err(Error::field(
                        &f,
                        name,
                        format!("dtype {other:?} is not supported (f32, bf16, f16)"),
                    ))
                }
            };
            all.insert(name, t);
        }
    }
    Ok(all)
}

/// A model read from a Hugging Face folder.
pub struct HfModel {
    pub model: Llama,
    pub config: Config,
    pub path: PathBuf,
}

/// Loads `config.json` and the weights of `dir` (f32).
pub fn load(dir: &Path) -> Result<HfModel> {
    let config = read_config(dir)?;
    let mut tensors = read_tensors(dir)?;
    let mut take = |name: &str| -> Result<Tensor> {
        tensors
            .remove(name)
            .ok_or_else(|| Error::field(dir, name, "tensor missing from the safetensors files"))
    };
    let h = config.hidden_size;
    let embed = take("model.embed_tokens.weight")?;
    let fused = config.family().is_some_and(|f| f.fused_projections());
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, bias: bool| -> Result<Linear> {
            let w = take(&format!("{p}.{name}.weight"))?;
            let b = if bias {
                Some(take(&format!("{p}.{name}.bias"))?)
            } else {
                None
            };
            Linear::from_weights(w, b).map_err(|e| Error::field(dir, format!("{p}.{name}"), e))
        };
        let bias = config.attention_bias;
        let qkv = if fused {
            QkvProj::Fused {
                qkv_proj: lin("self_attn.qkv_proj", false)?,
            }
        } else {
            QkvProj::Split {
                q_proj: lin("self_attn.q_proj", bias)?,
                k_proj: lin("self_attn.k_proj", bias)?,
                v_proj: lin("self_attn.v_proj", bias)?,
            }
        };
        let o_proj = lin("self_attn.o_proj", false)?;
        let gate_up = if fused {
            GateUpProj::Fused {
                gate_up_proj: lin("mlp.gate_up_proj", false)?,
            }
        } else {
            GateUpProj::Split {
                gate_proj: lin("mlp.gate_proj", false)?,
                up_proj: lin("mlp.up_proj", false)?,
            }
        };
        let projections = BlockProjections {
            qkv,
            o_proj,
            gate_up,
            down_proj: lin("mlp.down_proj", false)?,
        };
        let mut opt = |name: &str, on: bool| -> Result<Option<Tensor>> {
            if on {
                take(&format!("{p}.{name}.weight")).map(Some)
            } else {
                Ok(None)
            }
        };
        let sandwich = config.sandwich_norms;
        let required = |w: Option<Tensor>| {
            w.ok_or_else(|| Error::InvalidParams("a required norm was not read".into()))
        };
        let pre_mlp = if sandwich {
            "pre_feedforward_layernorm"
        } else {
            "post_attention_layernorm"
        };
        let norms = BlockNorms {
            input: required(opt("input_layernorm", true)?)?,
            pre_mlp: required(opt(pre_mlp, true)?)?,
            q: opt("self_attn.q_norm", config.qk_norm)?,
            k: opt("self_attn.k_norm", config.qk_norm)?,
            post_attention: opt("post_attention_layernorm", sandwich)?,
            post_mlp: opt("post_feedforward_layernorm", sandwich)?,
        };
        layers.push(
            Block::new(&config, i, norms, projections)
                .map_err(|e| Error::format(dir, "Hugging Face model", e))?,
        );
    }
    let norm = final_norm(&config, take("model.norm.weight")?)?;
    let lm_head = if config.tie_word_embeddings {
        Linear::from_weights(embed.clone(), None)?
    } else {
        Linear::from_weights(take("lm_head.weight")?, None)?
    };
    if embed.dims2()? != (config.vocab_size, h) {
        return Err(Error::field(
            dir,
            "model.embed_tokens.weight",
            format!(
                "shape {:?}, config says [{}, {h}]",
                embed.dims(),
                config.vocab_size
            ),
        ));
    }
    let weights = LlamaWeights {
        embed_tokens: Embedding::from_weight(embed)?.scaled(embedding_scale(&config)),
        layers,
        norm,
        lm_head,
    };
    let model = Llama::from_parts(config.clone(), Device::Cpu, weights)
        .map_err(|e| Error::format(dir, "Hugging Face model", e))?;
    Ok(HfModel {
        model,
        config,
        path: dir.to_path_buf(),
    })
}

/// The model's base weights (f32, Hugging Face names and layout; LoRA branches not merged).
pub fn state_dict(model: &Llama) -> Result<Vec<(String, Tensor)>> {
    let cfg = model.config();
    let mut out = Vec::new();
    out.push((
        "model.embed_tokens.weight".to_string(),
        model.embed_tokens().weight_f32()?,
    ));
    for (i, b) in model.layers().iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (name, n) in b.norms() {
            out.push((format!("{p}.{name}.weight"), n.weight.clone()));
        }
    }
    for (name, l) in model.linears() {
        out.push((format!("{name}.weight"), l.weight_f32()?));
        if let Some(b) = l.bias() {
            out.push((format!("{name}.bias"), b.clone()));
        }
    }
    out.push(("model.norm.weight".to_string(), model.norm().weight.clone()));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), model.lm_head().weight_f32()?));
    }
    Ok(out)
}

/// Writes `config.json` and the weights as safetensors into `dir` (created if needed). With
/// `max_shard_bytes`, the weights are split into `model-0000i-of-0000n.safetensors` shards plus
/// `model.safetensors.index.json`, as transformers does.
pub fn save(model: &Llama, dir: &Path, max_shard_bytes: Option<usize>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    let cfg_text = serde_json::to_string_pretty(&model.config().to_hf_json())
        .map_err(|e| Error::format(&cfg_path, "JSON", e))?;
    std::fs::write(&cfg_path, cfg_text).map_err(|e| Error::io(&cfg_path, e))?;
    let tensors = state_dict(model)?;
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0usize;
    for (name, t) in tensors {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if let Some(max) = max_shard_bytes {
            if size > 0 && size + bytes > max {
                shards.push(Vec::new());
                size = 0;
            }
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push((name, t.contiguous()?));
        }
    }
    let write = |file: &Path, part: Vec<(String, Tensor)>| -> Result<()> {
        let map: HashMap<String, Tensor> = part.into_iter().collect();
        candle_core::safetensors::save(&map, file)
            .map_err(|e| Error::format(file, "safetensors", e))
    };
    if shards.len() == 1 {
        let file = dir.join("model.safetensors");
        return write(&file, shards.remove(0));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in shards.into_iter().enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        for (name, _) in &part {
            weight_map.insert(name.clone(), serde_json::Value::String(fname.clone()));
        }
        write(&dir.join(&fname), part)?;
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    let index_path = dir.join("model.safetensors.index.json");
    std::fs::write(&index_path, index.to_string()).map_err(|e| Error::io(&index_path, e))
}
