//! Model hyper-parameters shared by every Llama-family checkpoint Attune runs.
//!
//! One [`Config`] covers SmolLM2 / Llama 2 / Llama 3 (incl. llama3 rope scaling), Mistral and
//! Qwen2 (q/k/v bias): the differences are switches, not separate models. The GGUF reader fills it
//! from `<arch>.*` metadata, the Hugging Face reader from `config.json` ([`HfConfig`]).

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::{Error, Result};

/// Architectures this runtime implements (the `general.architecture` / `model_type` strings).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

/// Llama 3.1-style frequency-dependent rope scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Hyper-parameters of a decoder. Field names follow Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Config {
    /// `llama`, `mistral` or `qwen2`.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Per-head dimension; `hidden_size / num_attention_heads` unless the checkpoint says otherwise.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Llama 3.1 rope scaling, if the checkpoint uses it.
    #[serde(default)]
    pub rope_scaling: Option<Llama3RopeScaling>,
}

impl Config {
    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Number of parameters of the base model (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let hd = self.head_dim();
        let q = self.num_attention_heads * hd;
        let kv = self.num_key_value_heads * hd;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * layer + h
    }

    /// Checks that the numbers fit together; `path` names the source in the error.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if !SUPPORTED_ARCHITECTURES.contains(&self.architecture.as_str()) {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: self.architecture.clone(),
            });
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::field(path, name, "must be greater than 0"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::field(
                path,
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return Err(Error::field(
                path,
                "head_dim",
                format!("{hd} must be even and greater than 0"),
            ));
        }
        if self.head_dim.is_none() && hd * self.num_attention_heads != self.hidden_size {
            return Err(Error::field(
                path,
                "hidden_size",
                format!(
                    "{} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::field(
                path,
                "rms_norm_eps",
                "must be a positive number",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::field(
                path,
                "rope_theta",
                "must be a positive number",
            ));
        }
        if let Some(s) = &self.rope_scaling {
            if !(s.factor > 0.0
                && s.low_freq_factor > 0.0
                && s.high_freq_factor > s.low_freq_factor)
                || s.original_max_position_embeddings == 0
            {
                return Err(Error::field(
                    path,
                    "rope_scaling",
                    "llama3 scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0",
                ));
            }
        }
        Ok(())
    }
}

/// A token id or a list of them (`eos_token_id` is either in `config.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

/// `rope_scaling` as written in `config.json` (only `llama3` is implemented).
#[derive(Debug, Clone, Deserialize)]
struct HfRopeScaling {
    #[serde(default, alias = "type")]
    rope_type: Option<String>,
    #[serde(default)]
    factor: Option<f64>,
    #[serde(default)]
    low_freq_factor: Option<f64>,
    #[serde(default)]
    high_freq_factor: Option<f64>,
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
}

/// The subset of a Hugging Face `config.json` that Attune reads.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    rope_scaling: Option<HfRopeScaling>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

impl HfConfig {
    /// Parses `config.json` text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::format(path, "config.json", e))
    }

    /// The architecture name: `model_type`, else derived from `architectures[0]`.
    pub fn architecture(&self) -> Option<String> {
        if let Some(t) = &self.model_type {
            return Some(t.to_ascii_lowercase());
        }
        let a = self.architectures.first()?;
        let lower = a.to_ascii_lowercase();
        Some(
            lower
                .strip_suffix("forcausallm")
                .unwrap_or(&lower)
                .to_string(),
        )
    }

    /// Converts to the runtime [`Config`] and validates it.
    pub fn into_config(self, path: &Path) -> Result<Config> {
        let architecture = self.architecture().ok_or_else(|| {
            Error::field(
                path,
                "model_type",
                "neither model_type nor architectures is set",
            )
        })?;
        let attention_bias = self.attention_bias.unwrap_or(architecture == "qwen2");
        let rope_scaling = match self.rope_scaling {
            None => None,
            Some(s) => match s.rope_type.as_deref() {
                Some("llama3") => Some(Llama3RopeScaling {
                    factor: s
                        .factor
                        .ok_or_else(|| Error::field(path, "rope_scaling.factor", "missing"))?,
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                }),
                Some("default") | None => None,
                Some(other) => {
                    return Err(Error::field(
                        path,
                        "rope_scaling.rope_type",
                        format!("'{other}' is not supported (supported: llama3)"),
                    ))
                }
            },
        };
        let cfg = Config {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias,
            bos_token_id: self.bos_token_id,
            eos_token_ids: match self.eos_token_id {
                None => Vec::new(),
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
            head_dim: self.head_dim,
            rope_scaling,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

impl Config {
    /// The `config.json` a Hugging Face loader (and [`HfConfig::parse`]) reads back.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let arch_class = match self.architecture.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut v = serde_json::json!({
            "architectures": [arch_class],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "torch_dtype": "float32",
        });
        if let (Some(hd), Some(obj)) = (self.head_dim, v.as_object_mut()) {
            obj.insert("head_dim".into(), serde_json::json!(hd));
        }
        if let (Some(s), Some(obj)) = (&self.rope_scaling, v.as_object_mut()) {
            obj.insert(
                "rope_scaling".into(),
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                }),
            );
        }
        v
    }
}
