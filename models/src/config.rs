//! Model hyper-parameters shared by every decoder Attune runs.
//!
//! One [`Config`] covers the Llama family and the models built on its shape: SmolLM2 / Llama 2 /
//! Llama 3.x (llama3 rope scaling), Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm per head),
//! Gemma 3 (sliding-window and global layers with their own rope bases, `(1 + w)` RMSNorms, norms
//! before and after the attention and the MLP, embeddings scaled by `sqrt(hidden)`, GELU-tanh,
//! query scaling by `query_pre_attn_scalar`), Phi-3 / Phi-4-mini (fused q/k/v and gate/up
//! projections, partial rotary, LongRoPE) and SmolLM3 (layers without rope). The differences are
//! switches of one model, not separate models ([`Family::switches`] lists them). The GGUF reader
//! fills the config from `<arch>.*` metadata, the Hugging Face reader from `config.json`
//! ([`HfConfig`], old and new transformers spellings).

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::{Error, Result};

/// Architectures this runtime implements (the `general.architecture` / `model_type` strings).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "smollm3",
];

/// A model family: which switches of the decoder a checkpoint turns on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
    Phi3,
    Smollm3,
}

impl Family {
    /// The family of an architecture string (`general.architecture` or `model_type`); Hugging
    /// Face's `gemma3_text` is Gemma 3's text model.
    pub fn from_architecture(arch: &str) -> Option<Family> {
        Some(match arch {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3" | "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "smollm3" => Family::Smollm3,
            _ => return None,
        })
    }

    /// The canonical architecture string (GGUF's `general.architecture`).
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
            Family::Smollm3 => "smollm3",
        }
    }

    /// The name people know the family by.
    pub fn display_name(self) -> &'static str {
        match self {
            Family::Llama => "Llama",
            Family::Mistral => "Mistral",
            Family::Qwen2 => "Qwen2",
            Family::Qwen3 => "Qwen3",
            Family::Gemma3 => "Gemma 3",
            Family::Phi3 => "Phi-3",
            Family::Smollm3 => "SmolLM3",
        }
    }

    /// Q and K rows are stored permuted in llama.cpp's GGUF files (its converter permutes them for
    /// its interleaved rope); the other families use the half-split rope and are stored as is.
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Family::Llama | Family::Mistral | Family::Smollm3)
    }

    /// q/k/v and gate/up are one projection each (`qkv_proj`, `gate_up_proj`).
    pub fn fused_projections(self) -> bool {
        self == Family::Phi3
    }

    /// The projections LoRA can target, by their Hugging Face (and PEFT) names.
    pub fn lora_targets(self) -> &'static [&'static str] {
        if self.fused_projections() {
            &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        } else {
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
        }
    }

    /// The Hugging Face class written to an exported `config.json`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Smollm3 => "SmolLM3ForCausalLM",
        }
    }

    /// The `model_type` of an exported `config.json`.
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3_text",
            other => other.architecture(),
        }
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Qwen, Phi-3, SmolLM3.
    #[default]
    Silu,
    /// GELU, tanh approximation (GeGLU): Gemma 3 (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// Llama 3.1-style frequency-dependent rope scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// How the rotary frequencies are scaled for longer contexts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Llama 3.1's (`rope_type: llama3`).
    Llama3(Llama3RopeScaling),
    /// Every frequency divided by `factor` (`rope_type: linear`; Gemma 3's global layers).
    Linear { factor: f64 },
    /// Per-frequency divisors, as GGUF stores llama3 scaling (`rope_freqs.weight`): frequency `i`
    /// becomes `inv_freq[i] / factors[i]`.
    Factors { factors: Vec<f64> },
    /// LongRoPE (Phi-3 / Phi-4-mini): frequency `i` divided by `short_factor[i]`, or by
    /// `long_factor[i]` once a sequence runs past `original_max_position_embeddings` positions;
    /// cos and sin multiplied by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

/// Hyper-parameters of a decoder. Field names follow Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Config {
    /// The architecture (`llama`, `mistral`, `qwen2`, `qwen3`, `gemma3`, `phi3`, `smollm3`).
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
    /// Rope scaling of the global (or only) rope, if the checkpoint uses it.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Rotated dimensions per head when fewer than `head_dim` (partial rotary: Phi-4-mini).
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    /// q and k RMS-normalised per head before rope (Qwen3, Gemma 3).
    #[serde(default)]
    pub qk_norm: bool,
    /// RMSNorms scale by `1 + w` (Gemma 3), not `w`.
    #[serde(default)]
    pub norm_plus_one: bool,
    /// Norms on the attention and MLP outputs before their residual adds (Gemma 3).
    #[serde(default)]
    pub sandwich_norms: bool,
    #[serde(default)]
    pub hidden_act: Activation,
    /// Token embeddings multiplied by `sqrt(hidden_size)` (Gemma 3).
    #[serde(default)]
    pub scale_embeddings: bool,
    /// Attention scores scaled by `query_pre_attn_scalar^-0.5` instead of `head_dim^-0.5`.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Keys a query in a sliding-window layer sees, itself included.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Per layer: whether it is a sliding-window layer (empty: none is).
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    /// Rope base of the sliding-window layers when it differs from `rope_theta` (Gemma 3's local
    /// base); those layers take no rope scaling.
    #[serde(default)]
    pub rope_local_theta: Option<f64>,
    /// Per layer: whether it applies rope (empty: every layer does; SmolLM3 leaves every 4th out).
    #[serde(default)]
    pub rope_layers: Vec<bool>,
}

impl Default for Config {
    /// A small Llama-shaped config (tests and examples override what they need).
    fn default() -> Self {
        Config {
            architecture: "llama".into(),
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            head_dim: None,
            rope_scaling: None,
            rotary_dim: None,
            qk_norm: false,
            norm_plus_one: false,
            sandwich_norms: false,
            hidden_act: Activation::Silu,
            scale_embeddings: false,
            query_pre_attn_scalar: None,
            sliding_window: None,
            sliding_layers: Vec::new(),
            rope_local_theta: None,
            rope_layers: Vec::new(),
        }
    }
}

impl Config {
    /// The family of `architecture` (`None` for an unsupported one; `validate` refuses it).
    pub fn family(&self) -> Option<Family> {
        Family::from_architecture(&self.architecture)
    }

    /// Turns on the switches `family` always has (Gemma 3's norms, activation and embedding
    /// scale, Qwen3's q/k norms); the per-checkpoint ones (windows, rope) come from the file.
    pub fn apply_family_defaults(&mut self, family: Family) {
        self.architecture = family.architecture().to_string();
        match family {
            Family::Qwen3 => self.qk_norm = true,
            Family::Gemma3 => {
                self.qk_norm = true;
                self.norm_plus_one = true;
                self.sandwich_norms = true;
                self.hidden_act = Activation::GeluTanh;
                self.scale_embeddings = true;
            }
            _ => {}
        }
    }

    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Rotated dimensions per head.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim.unwrap_or_else(|| self.head_dim())
    }

    /// The attention scores' scale.
    pub fn attention_scale(&self) -> f64 {
        let s = self
            .query_pre_attn_scalar
            .unwrap_or_else(|| self.head_dim() as f64);
        1.0 / s.sqrt()
    }

    /// Whether layer `i` attends through a sliding window.
    pub fn layer_is_sliding(&self, i: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.get(i).copied().unwrap_or(false)
    }

    /// The window of layer `i`, when it is a sliding-window layer.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        if self.layer_is_sliding(i) {
            self.sliding_window
        } else {
            None
        }
    }

    /// Whether layer `i` applies rope.
    pub fn layer_uses_rope(&self, i: usize) -> bool {
        self.rope_layers.get(i).copied().unwrap_or(true)
    }

    /// The projections LoRA can target in this model.
    pub fn lora_targets(&self) -> &'static [&'static str] {
        self.family().unwrap_or(Family::Llama).lora_targets()
    }

    /// The model's LoRA target modules for `requested` names, in the model's order. Either
    /// spelling works: on Phi-3 any of `q_proj`/`k_proj`/`v_proj` selects its fused `qkv_proj`
    /// and `gate_proj`/`up_proj` its `gate_up_proj`; on the other families `qkv_proj` stands for
    /// `q_proj`, `k_proj` and `v_proj`, `gate_up_proj` for `gate_proj` and `up_proj`. An unknown
    /// name is an error that lists the choices.
    pub fn resolve_lora_targets(
        &self,
        requested: &[String],
    ) -> std::result::Result<Vec<String>, String> {
        let fused = self.family().is_some_and(|f| f.fused_projections());
        let mut want: Vec<&str> = Vec::new();
        for r in requested {
            let modules: &[&str] = match (r.as_str(), fused) {
                ("q_proj" | "k_proj" | "v_proj" | "qkv_proj", true) => &["qkv_proj"],
                ("gate_proj" | "up_proj" | "gate_up_proj", true) => &["gate_up_proj"],
                ("qkv_proj", false) => &["q_proj", "k_proj", "v_proj"],
                ("gate_up_proj", false) => &["gate_proj", "up_proj"],
                ("q_proj", false) => &["q_proj"],
                ("k_proj", false) => &["k_proj"],
                ("v_proj", false) => &["v_proj"],
                ("gate_proj", false) => &["gate_proj"],
                ("up_proj", false) => &["up_proj"],
                ("o_proj", _) => &["o_proj"],
                ("down_proj", _) => &["down_proj"],
                (other, _) => {
                    return Err(format!(
                        "unknown LoRA target '{other}' for a {} model (choose from {})",
                        self.architecture,
                        self.lora_targets().join(", ")
                    ))
                }
            };
            want.extend_from_slice(modules);
        }
        Ok(self
            .lora_targets()
            .iter()
            .filter(|t| want.contains(t))
            .map(|t| t.to_string())
            .collect())
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
        let norms = if self.sandwich_norms { 4 * h } else { 2 * h };
        let qk = if self.qk_norm { 2 * hd } else { 0 };
        let layer = attn + mlp + norms + qk;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * layer + h
    }

    /// Checks that the numbers fit together; `path` names the source in the error.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.family().is_none() {
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
        let rd = self.rotary_dim();
        if rd == 0 || !rd.is_multiple_of(2) || rd > hd {
            return Err(Error::field(
                path,
                "rotary_dim",
                format!(
                    "{rd} rotated dimensions must be even, at least 2 and at most head_dim {hd}"
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
        for (name, theta) in [
            ("rope_theta", Some(self.rope_theta)),
            ("rope_local_theta", self.rope_local_theta),
        ] {
            if let Some(t) = theta {
                if !(t.is_finite() && t > 0.0) {
                    return Err(Error::field(path, name, "must be a positive number"));
                }
            }
        }
        if let Some(s) = self.query_pre_attn_scalar {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::field(
                    path,
                    "query_pre_attn_scalar",
                    "must be a positive number",
                ));
            }
        }
        if self.sliding_window == Some(0) {
            return Err(Error::field(path, "sliding_window", "must be at least 1"));
        }
        for (name, list) in [
            ("sliding_layers", &self.sliding_layers),
            ("rope_layers", &self.rope_layers),
        ] {
            if !list.is_empty() && list.len() != self.num_hidden_layers {
                return Err(Error::field(
                    path,
                    name,
                    format!(
                        "{} entries for {} layers",
                        list.len(),
                        self.num_hidden_layers
                    ),
                ));
            }
        }
        if !self.sliding_layers.is_empty()
            && self.sliding_layers.iter().any(|&s| s)
            && self.sliding_window.is_none()
        {
            return Err(Error::field(
                path,
                "sliding_window",
                "missing, but some layers are sliding-window layers",
            ));
        }
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Llama3(s)) => {
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
            Some(RopeScaling::Linear { factor }) => {
                if !(factor.is_finite() && *factor > 0.0) {
                    return Err(Error::field(
                        path,
                        "rope_scaling.factor",
                        "must be a positive number",
                    ));
                }
            }
            Some(RopeScaling::Factors { factors }) => {
                if factors.len() != rd / 2 || factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                    return Err(Error::field(
                        path,
                        "rope_freqs",
                        format!(
                            "needs {} positive factors (one per rotated pair), got {}",
                            rd / 2,
                            factors.len()
                        ),
                    ));
                }
            }
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            }) => {
                for (name, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                    if f.len() != rd / 2 || f.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                        return Err(Error::field(
                            path,
                            format!("rope_scaling.{name}"),
                            format!(
                                "needs {} positive factors (rotary dim {rd} / 2), got {}",
                                rd / 2,
                                f.len()
                            ),
                        ));
                    }
                }
                if *original_max_position_embeddings == 0
                    || !(attention_factor.is_finite() && *attention_factor > 0.0)
                {
                    return Err(Error::field(
                        path,
                        "rope_scaling",
                        "longrope needs original_max_position_embeddings > 0 and a positive attention factor",
                    ));
                }
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

/// A number or a list of numbers (Phi-3's `sliding_window` is sometimes written oddly).
fn f64_list(v: Option<&serde_json::Value>) -> Option<Vec<f64>> {
    v?.as_array()?.iter().map(|x| x.as_f64()).collect()
}

/// The subset of a Hugging Face `config.json` that Attune reads. Rope settings are read from
/// either spelling: transformers 4's `rope_theta` / `rope_scaling` / `rope_local_base_freq` /
/// `sliding_window_pattern`, or transformers 5's `rope_parameters` (per layer type for Gemma 3)
/// and `layer_types`.
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
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    sliding_window: Option<serde_json::Value>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    max_window_layers: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default)]
    sliding_window_pattern: Option<usize>,
    #[serde(default)]
    rope_local_base_freq: Option<f64>,
    #[serde(default)]
    query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    hidden_activation: Option<String>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    no_rope_layers: Option<Vec<u8>>,
    #[serde(default)]
    no_rope_layer_interval: Option<usize>,
    #[serde(default)]
    text_config: Option<serde_json::Value>,
    /// Rope scaling with no transformers spelling (GGUF's per-frequency factors), as Attune
    /// exports it.
    #[serde(default)]
    attune_rope_scaling: Option<RopeScaling>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

impl HfConfig {
    /// Parses `config.json` text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::format(path, "config.json", e))?;
        if v.get("text_config").is_some() && v.get("hidden_size").is_none() {
            let arch = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("?");
            return Err(Error::field(
                path,
                "text_config",
                format!(
                    "'{arch}' is a multimodal checkpoint; Attune runs text-only models (for Gemma 3 4B and larger, use its GGUF, which holds the text model)"
                ),
            ));
        }
        serde_json::from_value(v).map_err(|e| Error::format(path, "config.json", e))
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

    /// The rope settings of one layer type: `rope_parameters[layer_type]` (Gemma 3 in
    /// transformers 5), else `rope_parameters`, else `rope_scaling` (transformers 4).
    fn rope_dict(&self, layer_type: &str) -> Option<&serde_json::Value> {
        if let Some(p) = &self.rope_parameters {
            if let Some(per) = p.get(layer_type) {
                if per.is_object() {
                    return Some(per);
                }
            }
            if p.get("rope_type").is_some()
                || p.get("rope_theta").is_some()
                || p.get("type").is_some()
            {
                return Some(p);
            }
        }
        self.rope_scaling.as_ref().filter(|v| v.is_object())
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
        let family = Family::from_architecture(&architecture).ok_or_else(|| {
            Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: architecture.clone(),
            }
        })?;
        if self.text_config.is_some() && family == Family::Gemma3 && architecture == "gemma3" {
            return Err(Error::field(
                path,
                "text_config",
                "a multimodal Gemma 3 checkpoint; Attune runs its text model from the GGUF file",
            ));
        }
        for (name, v) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if v.is_some_and(|c| c != 0.0) {
                return Err(Error::field(
                    path,
                    name,
                    "logit soft-capping (Gemma 2) is not supported",
                ));
            }
        }
        let n_layers = self.num_hidden_layers;
        let num_heads = self.num_attention_heads;
        let head_dim = self.head_dim;
        let hd = head_dim.unwrap_or(self.hidden_size / num_heads.max(1));
        // Partial rotary (Phi-4-mini): top level or inside rope_parameters.
        let global = self.rope_dict("full_attention").cloned();
        let partial = self.partial_rotary_factor.or_else(|| {
            global
                .as_ref()
                .and_then(|g| g.get("partial_rotary_factor"))
                .and_then(|v| v.as_f64())
        });
        let rotary_dim = match partial {
            Some(f) if (f - 1.0).abs() > 1e-9 => {
                if !(f > 0.0 && f < 1.0) {
                    return Err(Error::field(
                        path,
                        "partial_rotary_factor",
                        format!("{f} is not in (0, 1]"),
                    ));
                }
                Some((hd as f64 * f) as usize)
            }
            _ => None,
        };
        let rd = rotary_dim.unwrap_or(hd);
        let theta_of = |d: Option<&serde_json::Value>| {
            d.and_then(|g| g.get("rope_theta")).and_then(|v| v.as_f64())
        };
        let rope_theta = theta_of(global.as_ref())
            .or(self.rope_theta)
            .unwrap_or(match family {
                Family::Gemma3 | Family::Qwen3 => 1_000_000.0,
                _ => 10_000.0,
            });
        // Gemma 3's sliding-window layers: transformers 5's `rope_parameters.sliding_attention`,
        // else transformers 4's `rope_local_base_freq`.
        let local_theta = theta_of(
            self.rope_parameters
                .as_ref()
                .and_then(|p| p.get("sliding_attention")),
        )
        .or(self.rope_local_base_freq);
        let rope_scaling = match &global {
            None => None,
            Some(s) => parse_rope_scaling(
                s,
                path,
                rd,
                self.max_position_embeddings,
                self.original_max_position_embeddings,
            )?,
        }
        .or(self.attune_rope_scaling.clone());
        let mut cfg = Config {
            architecture: family.architecture().to_string(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: n_layers,
            num_attention_heads: num_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(num_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self
                .tie_word_embeddings
                .unwrap_or(matches!(family, Family::Gemma3 | Family::Smollm3)),
            attention_bias: self.attention_bias.unwrap_or(family == Family::Qwen2),
            bos_token_id: self.bos_token_id,
            eos_token_ids: match self.eos_token_id {
                None => Vec::new(),
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
            head_dim,
            rope_scaling,
            rotary_dim,
            ..Config::default()
        };
        cfg.apply_family_defaults(family);
        if let Some(act) = self.hidden_activation.as_ref().or(self.hidden_act.as_ref()) {
            cfg.hidden_act = match act.as_str() {
                "silu" | "swish" => Activation::Silu,
                "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => Activation::GeluTanh,
                other => {
                    return Err(Error::field(
                        path,
                        "hidden_act",
                        format!("'{other}' is not supported (silu, gelu_pytorch_tanh)"),
                    ))
                }
            };
        }
        if family == Family::Gemma3 {
            cfg.query_pre_attn_scalar = Some(self.query_pre_attn_scalar.unwrap_or(hd as f64));
            cfg.rope_local_theta = Some(local_theta.unwrap_or(10_000.0));
        }
        // Sliding-window layers.
        let window = match &self.sliding_window {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|w| w as usize),
            _ => None,
        };
        let sliding: Vec<bool> = match (&self.layer_types, family) {
            (Some(types), _) => {
                if types.len() != n_layers {
                    return Err(Error::field(
                        path,
                        "layer_types",
                        format!("{} entries for {n_layers} layers", types.len()),
                    ));
                }
                types.iter().map(|t| t == "sliding_attention").collect()
            }
            (None, Family::Gemma3) => {
                let p = self.sliding_window_pattern.unwrap_or(6).max(1);
                (0..n_layers).map(|i| (i + 1) % p != 0).collect()
            }
            (None, Family::Qwen2 | Family::Qwen3) => {
                let on = self.use_sliding_window.unwrap_or(false) && window.is_some();
                let first = self.max_window_layers.unwrap_or(n_layers);
                (0..n_layers).map(|i| on && i >= first).collect()
            }
            (None, Family::Mistral | Family::Phi3) => vec![window.is_some(); n_layers],
            (None, _) => vec![false; n_layers],
        };
        if sliding.iter().any(|&s| s) {
            cfg.sliding_window = window;
            cfg.sliding_layers = sliding;
        }
        // Layers without rope (SmolLM3: `no_rope_layers[i] == 0`).
        if family == Family::Smollm3 {
            let flags: Vec<bool> = match &self.no_rope_layers {
                Some(v) => v.iter().map(|&x| x != 0).collect(),
                None => {
                    let k = self.no_rope_layer_interval.unwrap_or(4).max(1);
                    (0..n_layers).map(|i| (i + 1) % k != 0).collect()
                }
            };
            cfg.rope_layers = flags;
        }
        cfg.validate(path)?;
        Ok(cfg)
    }
}

/// A `rope_scaling` / `rope_parameters` object as a [`RopeScaling`] (`None` for the default rope).
fn parse_rope_scaling(
    s: &serde_json::Value,
    path: &Path,
    rotary_dim: usize,
    max_position_embeddings: usize,
    top_original: Option<usize>,
) -> Result<Option<RopeScaling>> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |k: &str| s.get(k).and_then(|v| v.as_f64());
    let original = s
        .get("original_max_position_embeddings")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .or(top_original);
    Ok(match kind {
        "default" => None,
        "llama3" => Some(RopeScaling::Llama3(Llama3RopeScaling {
            factor: num("factor")
                .ok_or_else(|| Error::field(path, "rope_scaling.factor", "missing"))?,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: original.unwrap_or(8192),
        })),
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")
                .ok_or_else(|| Error::field(path, "rope_scaling.factor", "missing"))?,
        }),
        "longrope" | "su" => {
            let short = f64_list(s.get("short_factor"))
                .ok_or_else(|| Error::field(path, "rope_scaling.short_factor", "missing"))?;
            let long = f64_list(s.get("long_factor"))
                .ok_or_else(|| Error::field(path, "rope_scaling.long_factor", "missing"))?;
            let original = original.ok_or_else(|| {
                Error::field(
                    path,
                    "original_max_position_embeddings",
                    "missing for longrope",
                )
            })?;
            let factor =
                num("factor").unwrap_or(max_position_embeddings as f64 / original.max(1) as f64);
            let attention_factor = num("attention_factor").unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / (original as f64).ln()).sqrt()
            });
            if short.len() != rotary_dim / 2 {
                return Err(Error::field(
                    path,
                    "rope_scaling.short_factor",
                    format!("{} factors for a rotary dim of {rotary_dim}", short.len()),
                ));
            }
            Some(RopeScaling::LongRope {
                short_factor: short,
                long_factor: long,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        other => {
            return Err(Error::field(
                path,
                "rope_scaling.rope_type",
                format!("'{other}' is not supported (supported: llama3, linear, longrope)"),
            ))
        }
    })
}

impl Config {
    /// The `config.json` a Hugging Face loader (and [`HfConfig::parse`]) reads back. Rope settings
    /// are written in transformers 4's spelling, which transformers 5 reads too.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let family = self.family().unwrap_or(Family::Llama);
        let mut v = serde_json::json!({
            "architectures": [family.hf_class()],
            "model_type": family.hf_model_type(),
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
        let Some(obj) = v.as_object_mut() else {
            return v;
        };
        let mut put = |k: &str, x: serde_json::Value| {
            obj.insert(k.to_string(), x);
        };
        if let Some(hd) = self.head_dim {
            put("head_dim", serde_json::json!(hd));
        }
        let act = match self.hidden_act {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        };
        put(
            if family == Family::Gemma3 {
                "hidden_activation"
            } else {
                "hidden_act"
            },
            serde_json::json!(act),
        );
        if let Some(rd) = self.rotary_dim {
            put(
                "partial_rotary_factor",
                serde_json::json!(rd as f64 / self.head_dim() as f64),
            );
        }
        if let Some(s) = self.query_pre_attn_scalar {
            put("query_pre_attn_scalar", serde_json::json!(s));
        }
        if let Some(t) = self.rope_local_theta {
            put("rope_local_base_freq", serde_json::json!(t));
        }
        if let Some(w) = self.sliding_window {
            put("sliding_window", serde_json::json!(w));
            put(
                "layer_types",
                serde_json::json!((0..self.num_hidden_layers)
                    .map(|i| if self.layer_is_sliding(i) {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    })
                    .collect::<Vec<_>>()),
            );
            if matches!(family, Family::Qwen2 | Family::Qwen3) {
                put("use_sliding_window", serde_json::json!(true));
            }
        } else if family == Family::Phi3 {
            put("sliding_window", serde_json::Value::Null);
        }
        if !self.rope_layers.is_empty() {
            put(
                "no_rope_layers",
                serde_json::json!(self
                    .rope_layers
                    .iter()
                    .map(|&r| u8::from(r))
                    .collect::<Vec<_>>()),
            );
        }
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Llama3(s)) => put(
                "rope_scaling",
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                }),
            ),
            Some(RopeScaling::Linear { factor }) => put(
                "rope_scaling",
                serde_json::json!({ "rope_type": "linear", "factor": factor }),
            ),
            Some(RopeScaling::Factors { .. }) => {
                // GGUF's per-frequency form has no config.json spelling: the exported config
                // keeps the factors in Attune's own key, which transformers ignores.
                if let Ok(x) = serde_json::to_value(&self.rope_scaling) {
                    put("attune_rope_scaling", x);
                }
            }
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            }) => {
                put(
                    "original_max_position_embeddings",
                    serde_json::json!(original_max_position_embeddings),
                );
                put(
                    "rope_scaling",
                    serde_json::json!({
                        "type": "longrope",
                        "rope_type": "longrope",
                        "short_factor": short_factor,
                        "long_factor": long_factor,
                        "original_max_position_embeddings": original_max_position_embeddings,
                        "attention_factor": attention_factor,
                    }),
                );
            }
        }
        v
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config> {
        let p = Path::new("config.json");
        HfConfig::parse(json, p)?.into_config(p)
    }

    #[test]
    fn lora_targets_resolve_to_the_models_own_modules() {
        let tiny = |t: &str| {
            parse(&format!(
                r#"{{"model_type":"{t}","vocab_size":8,"hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":2}}"#
            ))
            .unwrap()
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let phi = tiny("phi3");
        // Either spelling selects Phi-3's fused projections, in the model's order, once.
        assert_eq!(
            phi.resolve_lora_targets(&s(&["down_proj", "q_proj", "v_proj", "up_proj"]))
                .unwrap(),
            ["qkv_proj", "gate_up_proj", "down_proj"]
        );
        let qwen = tiny("qwen3");
        assert_eq!(
            qwen.resolve_lora_targets(&s(&["gate_up_proj", "qkv_proj"]))
                .unwrap(),
            ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
        );
        assert_eq!(
            qwen.resolve_lora_targets(&s(&["o_proj"])).unwrap(),
            ["o_proj"]
        );
        let err = qwen.resolve_lora_targets(&s(&["lm_head"])).unwrap_err();
        assert!(err.contains("'lm_head'") && err.contains("qwen3"), "{err}");
    }

    #[test]
    fn transformers_4_spellings_are_read() {
        // Gemma 3 1B's config.json as published (transformers 4).
        let g = parse(
            r#"{"architectures":["Gemma3ForCausalLM"],"model_type":"gemma3_text","vocab_size":262144,
            "hidden_size":1152,"intermediate_size":6912,"num_hidden_layers":26,"num_attention_heads":4,
            "num_key_value_heads":1,"head_dim":256,"query_pre_attn_scalar":256,"rope_theta":1000000,
            "rope_local_base_freq":10000,"rope_scaling":null,"sliding_window":512,
            "sliding_window_pattern":6,"hidden_activation":"gelu_pytorch_tanh",
            "max_position_embeddings":32768,"rms_norm_eps":1e-6,"final_logit_softcapping":null}"#,
        )
        .unwrap();
        assert_eq!(g.family(), Some(Family::Gemma3));
        assert!(g.qk_norm && g.norm_plus_one && g.sandwich_norms && g.scale_embeddings);
        assert!(g.tie_word_embeddings);
        assert_eq!(g.rope_local_theta, Some(10_000.0));
        assert_eq!(g.rope_theta, 1_000_000.0);
        assert!(g.layer_is_sliding(0) && !g.layer_is_sliding(5) && g.layer_is_sliding(6));
        assert_eq!(g.layer_window(0), Some(512));
        assert!((g.attention_scale() - 1.0 / 16.0).abs() < 1e-12);
        // Gemma 3 4B's text config: linear scaling of the global layers.
        let g4 = parse(
            r#"{"model_type":"gemma3_text","vocab_size":262208,"hidden_size":2560,
            "intermediate_size":10240,"num_hidden_layers":34,"num_attention_heads":8,
            "num_key_value_heads":4,"head_dim":256,"rope_scaling":{"factor":8.0,"rope_type":"linear"},
            "sliding_window":1024}"#,
        )
        .unwrap();
        assert_eq!(g4.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        // Phi-3-mini-128k: longrope as "su" (its old name), original context at the top level.
        let short: Vec<f64> = (0..48).map(|i| 1.0 + i as f64 * 0.01).collect();
        let p = parse(&format!(
            r#"{{"model_type":"phi3","vocab_size":32064,"hidden_size":3072,"intermediate_size":8192,
            "num_hidden_layers":32,"num_attention_heads":32,"max_position_embeddings":131072,
            "original_max_position_embeddings":4096,"sliding_window":262144,
            "rope_scaling":{{"type":"su","short_factor":{s},"long_factor":{s}}}}}"#,
            s = serde_json::to_string(&short).unwrap()
        ))
        .unwrap();
        match &p.rope_scaling {
            Some(RopeScaling::LongRope {
                original_max_position_embeddings,
                attention_factor,
                ..
            }) => {
                assert_eq!(*original_max_position_embeddings, 4096);
                let want = (1.0 + (32.0f64).ln() / (4096.0f64).ln()).sqrt();
                assert!((attention_factor - want).abs() < 1e-12);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.layer_window(3), Some(262_144));
        // SmolLM3: every 4th layer without rope when only the interval is given.
        let s = parse(
            r#"{"model_type":"smollm3","vocab_size":128256,"hidden_size":2048,"intermediate_size":11008,
            "num_hidden_layers":8,"num_attention_heads":16,"num_key_value_heads":4,"rope_theta":5000000,
            "no_rope_layer_interval":4}"#,
        )
        .unwrap();
        assert_eq!(
            s.rope_layers,
            vec![true, true, true, false, true, true, true, false]
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let err = parse(
            r#"{"model_type":"gemma2","vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gemma2"), "{err}");
        let err = parse(
            r#"{"model_type":"gemma3_text","vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"final_logit_softcapping":30.0}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("final_logit_softcapping"), "{err}");
        let err = parse(
            r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_scaling":{"rope_type":"yarn","factor":4}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("yarn"), "{err}");
        let err = parse(r#"{"model_type":"gemma3","text_config":{"hidden_size":8}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("multimodal"), "{err}");
    }

    #[test]
    fn exported_config_reads_back_the_same() {
        let mut c = Config {
            num_hidden_layers: 6,
            head_dim: Some(16),
            sliding_window: Some(4),
            sliding_layers: vec![true, true, true, true, true, false],
            rope_local_theta: Some(10_000.0),
            query_pre_attn_scalar: Some(16.0),
            rope_scaling: Some(RopeScaling::Linear { factor: 8.0 }),
            ..Config::default()
        };
        c.apply_family_defaults(Family::Gemma3);
        c.validate(Path::new("x")).unwrap();
        let back = parse(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(back, c);
        let mut p = Config {
            rotary_dim: Some(6),
            rope_scaling: Some(RopeScaling::LongRope {
                short_factor: vec![1.0, 1.1, 1.2],
                long_factor: vec![2.0, 3.0, 4.0],
                original_max_position_embeddings: 32,
                attention_factor: 1.2,
            }),
            head_dim: Some(8),
            tie_word_embeddings: false,
            ..Config::default()
        };
        p.apply_family_defaults(Family::Phi3);
        let back = parse(&p.to_hf_json().to_string()).unwrap();
        assert_eq!(back, p);
    }
}
