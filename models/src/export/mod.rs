//! Exports to the formats other tools run, and the checks that prove them.
//!
//! - [`gguf_out`]: a whole model as GGUF (F32, F16, BF16, Q8_0, or llama.cpp's Q4_K_M mix), Q/K
//!   rows re-permuted for llama.cpp, tokenizer metadata and the chat template included;
//! - [`lora_gguf`]: a LoRA adapter as llama.cpp's adapter GGUF (`--lora`, Ollama `ADAPTER`), and
//!   its reader;
//! - [`tokenizer_meta`]: the `tokenizer.ggml.*` keys, copied from a GGUF base or built from
//!   `tokenizer.json`;
//! - [`hf_out`]: a complete Hugging Face folder (weights, tokenizer, chat template, generation
//!   config, model card);
//! - [`ollama`]: the Modelfile (writer and a port of Ollama's parser) and the translation of a
//!   Jinja chat template into Ollama's Go template, checked by [`gotmpl`], a Go `text/template`
//!   subset;
//! - [`verify`]: greedy tokens and logits of a fixed prompt set, compared within per-type
//!   tolerances.
//!
//! Pure functions of tensors and files: no jobs, SQL or UI. Every file is written under a
//! temporary name and renamed ([`files`]).

pub mod files;
pub mod gguf_out;
pub mod gotmpl;
pub mod hf_out;
pub mod lora_gguf;
pub mod ollama;
pub mod tokenizer_meta;
pub mod verify;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Error, Result};

/// The numeric type of an exported model's weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    /// 32-bit floats: the exact values the app computes with.
    F32,
    F16,
    Bf16,
    /// 8-bit blocks of 32 (llama.cpp's Q8_0).
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K for most matrices, Q6_K for the output matrix and half of
    /// `attn_v` / `ffn_down` (see [`gguf_out::q4_k_m_type`]).
    Q4KM,
}

impl WeightType {
    pub const ALL: [WeightType; 5] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::Bf16,
        WeightType::Q8_0,
        WeightType::Q4KM,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::F16 => "f16",
            WeightType::Bf16 => "bf16",
            WeightType::Q8_0 => "q8_0",
            WeightType::Q4KM => "q4_k_m",
        }
    }

    pub fn parse(s: &str) -> Option<WeightType> {
        let s = s.trim().to_ascii_lowercase();
        WeightType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            WeightType::F32 => 0,
            WeightType::F16 => 1,
            WeightType::Q8_0 => 7,
            WeightType::Q4KM => 15,
            WeightType::Bf16 => 32,
        }
    }
}

/// What a long export reports and how it is stopped: `progress(stage, done, total)` and a
/// cancel flag checked between tensors.
pub struct Job<'a> {
    pub progress: &'a mut dyn FnMut(&str, usize, usize),
    pub cancel: &'a AtomicBool,
}

impl Job<'_> {
    /// `Err(Error::Cancelled)` once the cancel flag is set.
    pub fn check(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    pub fn report(&mut self, stage: &str, done: usize, total: usize) {
        (self.progress)(stage, done, total);
    }
}

/// Module name of a Hugging Face projection -> llama.cpp tensor name part.
pub(crate) fn gguf_proj_name(hf: &str) -> Option<&'static str> {
    Some(match hf {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    })
}

/// llama.cpp tensor name part -> Hugging Face projection module name.
pub(crate) fn hf_proj_name(gguf: &str) -> Option<&'static str> {
    Some(match gguf {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    })
}

/// The GGUF architecture name llama.cpp uses for a runtime architecture, and whether its Q/K
/// rows are stored permuted. Mistral (v0.1 layout) is written as llama, as llama.cpp's
/// converter does.
pub fn gguf_architecture(arch: &str) -> Option<(&'static str, bool)> {
    match arch {
        "llama" | "mistral" => Some(("llama", true)),
        "qwen2" => Some(("qwen2", false)),
        _ => None,
    }
}
