//! Adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors` (metadata
//! `{"format": "pt"}`), LoRA keys `base_model.model.<module>.lora_{A,B}.weight`, prompt tuning's
//! one tensor `prompt_embeddings` `[num_virtual_tokens, hidden]`.
//!
//! The model is in Hugging Face layout whatever file it came from (the GGUF loader un-permutes
//! Q/K), so adapters are written and read with no `lora_B` permutation, and PEFT loads them onto
//! the Hugging Face checkpoint directly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::llama::Llama;
use crate::train::{LoraConfig, PromptConfig, PromptInit};
use crate::{Error, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// An adapter read from disk.
#[derive(Debug, Clone)]
pub enum Adapter {
    Lora {
        config: LoraConfig,
        /// PEFT key -> tensor.
        tensors: HashMap<String, Tensor>,
        base_model: Option<String>,
    },
    Prompt {
        config: PromptConfig,
        /// `[num_virtual_tokens, hidden]`.
        embeddings: Tensor,
        base_model: Option<String>,
    },
}

impl Adapter {
    pub fn kind(&self) -> &'static str {
        match self {
            Adapter::Lora { .. } => "lora",
            Adapter::Prompt { .. } => "prompt",
        }
    }
}

fn adapter_err(path: &Path, reason: impl ToString) -> Error {
    Error::Adapter {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Writes `tensors` as safetensors with PEFT's metadata, through a temporary file renamed into
/// place, so a crash never leaves a half-written adapter under the final name.
fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let tmp = tmp_name(path);
    let data: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(data.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), &tmp)
        .map_err(|e| adapter_err(path, format!("cannot write: {e}")))?;
    sync_and_rename(&tmp, path)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = tmp_name(path);
    let text = serde_json::to_string_pretty(value).map_err(|e| adapter_err(path, e))?;
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    sync_and_rename(&tmp, path)
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// fsyncs `tmp`, renames it to `dst`. On failure the temporary file is removed.
pub(crate) fn sync_and_rename(tmp: &Path, dst: &Path) -> Result<()> {
    let res = std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(tmp, dst));
    if let Err(e) = res {
        let _ = std::fs::remove_file(tmp);
        return Err(Error::io(dst, e));
    }
    Ok(())
}

/// Saves the LoRA branches attached to `model` as a PEFT adapter in `dir`.
pub fn save_lora(model: &Llama, config: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = Vec::new();
    for (name, lin) in model.linears() {
        if let Some(l) = lin.lora() {
            tensors.push((
                format!("base_model.model.{name}.lora_A.weight"),
                l.a.detach(),
            ));
            tensors.push((
                format!("base_model.model.{name}.lora_B.weight"),
                l.b.detach(),
            ));
        }
    }
    if tensors.is_empty() {
        return Err(adapter_err(dir, "the model carries no LoRA branch to save"));
    }
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "use_rslora": config.rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_dora": false,
        "revision": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "peft_version": "0.21.2",
        "attune_version": env!("CARGO_PKG_VERSION"),
    });
    write_json(&dir.join(CONFIG_FILE), &cfg)
}

/// Saves a soft prompt `[n, hidden]` as a PEFT prompt-tuning adapter in `dir`.
pub fn save_prompt(
    embeddings: &Tensor,
    config: &PromptConfig,
    model: &Llama,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (n, h) = embeddings.dims2()?;
    write_safetensors(
        &dir.join(WEIGHTS_FILE),
        &[("prompt_embeddings".to_string(), embeddings.detach())],
    )?;
    let (init, text) = match &config.init {
        PromptInit::Text(t) => ("TEXT", serde_json::Value::String(t.clone())),
        PromptInit::RandomVocab => ("SAMPLE_VOCAB", serde_json::Value::Null),
    };
    let cfg = serde_json::json!({
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "tokenizer_name_or_path": base_model,
        "num_virtual_tokens": n,
        "token_dim": h,
        "num_transformer_submodules": 1,
        "num_attention_heads": model.config().num_attention_heads,
        "num_layers": model.config().num_hidden_layers,
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": text,
        "inference_mode": true,
        "modules_to_save": null,
        "revision": null,
        "peft_version": "0.21.2",
        "attune_version": env!("CARGO_PKG_VERSION"),
    });
    write_json(&dir.join(CONFIG_FILE), &cfg)
}

/// Reads a PEFT LoRA or prompt-tuning adapter from `dir`.
pub fn load(dir: &Path) -> Result<Adapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    crate::fsio::require_dir(dir)?;
    let text = crate::fsio::read_regular_string(&cfg_path)?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, "JSON", e))?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() {
        let bin = dir.join("adapter_model.bin");
        return Err(if bin.is_file() {
            adapter_err(
                &bin,
                "PyTorch pickle adapters are not supported; save it with safe_serialization=True",
            )
        } else {
            adapter_err(&weights, "file missing")
        });
    }
    // The header is checked (shapes, sizes, offsets) before candle's reader sees it.
    let (entries, _) = crate::inspect::read_safetensors_header(&weights)?;
    if entries.is_empty() {
        return Err(adapter_err(&weights, "the file holds no tensors"));
    }
    let bytes = crate::fsio::read_regular(&weights)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::format(&weights, "safetensors", e))?;
    let base_model = cfg["base_model_name_or_path"].as_str().map(str::to_string);
    let field = |k: &str| {
        adapter_err(
            &cfg_path,
            format!("field '{k}' is missing or has the wrong type"),
        )
    };
    match cfg["peft_type"].as_str() {
        Some("LORA") => {
            let r = cfg["r"].as_u64().ok_or_else(|| field("r"))? as usize;
            let alpha = cfg["lora_alpha"]
                .as_f64()
                .ok_or_else(|| field("lora_alpha"))?;
            if cfg["use_dora"].as_bool() == Some(true) {
                return Err(adapter_err(&cfg_path, "DoRA adapters are not supported"));
            }
            if cfg["bias"].as_str().is_some_and(|b| b != "none") {
                return Err(adapter_err(
                    &cfg_path,
                    "LoRA adapters with trained biases are not supported",
                ));
            }
            let targets = match &cfg["target_modules"] {
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                serde_json::Value::String(s) => vec![s.clone()],
                _ => return Err(field("target_modules")),
            };
            if r == 0 {
                return Err(adapter_err(&cfg_path, "r is 0"));
            }
            for key in ["rank_pattern", "alpha_pattern"] {
                if cfg[key].as_object().is_some_and(|m| !m.is_empty()) {
                    return Err(adapter_err(
                        &cfg_path,
                        format!("per-module ranks ({key}) are not supported"),
                    ));
                }
            }
            if !alpha.is_finite() {
                return Err(adapter_err(&cfg_path, "lora_alpha is not a finite number"));
            }
            let mut lora = HashMap::new();
            for (k, t) in tensors {
                if k.contains(".lora_A.") || k.contains(".lora_B.") {
                    let t = t.to_dtype(DType::F32)?;
                    let rank_dim = if k.contains(".lora_A.") { 0 } else { 1 };
                    match t.dims() {
                        [_, _] if t.dims()[rank_dim] == r => {}
                        d => {
                            return Err(adapter_err(
                                &weights,
                                format!(
                                    "tensor '{k}' has shape {d:?}, expected rank r = {r} as its \
                                     {} dimension",
                                    if rank_dim == 0 { "first" } else { "second" }
                                ),
                            ))
                        }
                    }
                    check_finite(&t, &k, &weights)?;
                    lora.insert(k, t);
                } else {
                    return Err(adapter_err(
                        &weights,
                        format!("unexpected tensor '{k}' (only lora_A/lora_B are supported)"),
                    ));
                }
            }
            Ok(Adapter::Lora {
                config: LoraConfig {
                    r,
                    alpha,
                    dropout: cfg["lora_dropout"].as_f64().unwrap_or(0.0) as f32,
                    targets,
                    rslora: cfg["use_rslora"].as_bool().unwrap_or(false),
                },
                tensors: lora,
                base_model,
            })
        }
        Some("PROMPT_TUNING") => {
            let emb = tensors
                .get("prompt_embeddings")
                .ok_or_else(|| adapter_err(&weights, "tensor 'prompt_embeddings' missing"))?
                .to_dtype(DType::F32)?;
            check_finite(&emb, "prompt_embeddings", &weights)?;
            let (n, _) = emb.dims2().map_err(|_| {
                adapter_err(
                    &weights,
                    format!(
                        "prompt_embeddings has shape {:?}, expected [n, hidden]",
                        emb.dims()
                    ),
                )
            })?;
            let init = match (
                cfg["prompt_tuning_init"].as_str(),
                cfg["prompt_tuning_init_text"].as_str(),
            ) {
                (Some("TEXT"), Some(t)) => PromptInit::Text(t.to_string()),
                _ => PromptInit::RandomVocab,
            };
            Ok(Adapter::Prompt {
                config: PromptConfig {
                    num_virtual_tokens: n,
                    init,
                },
                embeddings: emb,
                base_model,
            })
        }
        Some(other) => Err(adapter_err(
            &cfg_path,
            format!("PEFT type '{other}' is not supported (LORA and PROMPT_TUNING are)"),
        )),
        None => Err(field("peft_type")),
    }
}

/// Refuses a tensor holding NaN or infinity: it would turn every answer into NaN logits.
fn check_finite(t: &Tensor, name: &str, path: &Path) -> Result<()> {
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(adapter_err(
            path,
            format!(
                "tensor '{name}' holds a non-finite value ({}) at element {i}",
                values[i]
            ),
        ));
    }
    Ok(())
}

/// Attaches a LoRA adapter's branches to `model` (replacing any). Every tensor must find its
/// layer and fit its shape; errors name the key.
pub fn apply_lora(
    model: &mut Llama,
    config: &LoraConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<usize> {
    let scale = config.scale();
    let mut used = 0;
    for (name, lin) in model.linears_mut() {
        let ka = format!("base_model.model.{name}.lora_A.weight");
        let kb = format!("base_model.model.{name}.lora_B.weight");
        match (tensors.get(&ka), tensors.get(&kb)) {
            (Some(a), Some(b)) => {
                lin.attach_lora(a.clone(), b.clone(), scale)
                    .map_err(|e| Error::InvalidParams(format!("{ka}: {e}")))?;
                used += 2;
            }
            (None, None) => {}
            _ => {
                return Err(Error::InvalidParams(format!(
                    "adapter has only one of {ka} / {kb}"
                )))
            }
        }
    }
    if used != tensors.len() {
        let known: std::collections::HashSet<String> = model
            .linears()
            .iter()
            .flat_map(|(n, _)| ["A", "B"].map(|x| format!("base_model.model.{n}.lora_{x}.weight")))
            .collect();
        let stray = tensors
            .keys()
            .find(|k| !known.contains(*k))
            .cloned()
            .unwrap_or_default();
        return Err(Error::InvalidParams(format!(
            "adapter tensor '{stray}' matches no layer of this model (is it for another base model?)"
        )));
    }
    Ok(used / 2)
}

/// Folds every LoRA branch into its base weight (`W + scale * B A`) and removes the branches.
pub fn merge_lora(model: &mut Llama) -> Result<usize> {
    let mut merged = 0;
    for (_, lin) in model.linears_mut() {
        if let Some(l) = lin.detach_lora() {
            let w = lin.weight_f32()?;
            let delta = (l.b.matmul(&l.a)? * l.scale)?;
            lin.set_weight((w + delta)?.detach())?;
            merged += 1;
        }
    }
    Ok(merged)
}
