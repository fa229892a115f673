//! A complete Hugging Face model folder, as transformers' `save_pretrained` leaves it:
//! `config.json`, safetensors (sharded above 2 GB, with `model.safetensors.index.json`),
//! `tokenizer.json`, `tokenizer_config.json` (special tokens and `chat_template`),
//! `special_tokens_map.json`, `generation_config.json` (BOS, every EOS id, sampling defaults)
//! and a model card `README.md`.

use std::path::{Path, PathBuf};

use super::files::write_atomic;
use crate::chat_template::ChatTemplate;
use crate::llama::Llama;
use crate::tokenizer::Tok;
use crate::{Error, Result};

/// transformers' "2GB": shards hold at most this many bytes.
pub const MAX_SHARD_BYTES: usize = 2_000_000_000;

/// Sampling defaults written to `generation_config.json` (and the Modelfile).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
}

/// What the model card says about where the model comes from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelCard {
    pub title: String,
    /// The base model's name in the library, and its Hub repository when it came from there.
    pub base_model: String,
    pub base_model_repo: Option<String>,
    /// "LoRA", "full fine-tuning", or "base model (no adaptation)".
    pub method: String,
    /// Dataset name, content hash, and rows per split.
    pub dataset: Option<(String, String, String)>,
    /// (setting, value) pairs, in order.
    pub hyperparameters: Vec<(String, String)>,
    /// (measure, value) pairs: evaluation results.
    pub evaluations: Vec<(String, String)>,
    /// The forgetting check's outcome, in words.
    pub forgetting: Option<String>,
    /// Attune's check of this very folder, in words.
    pub verification: Option<String>,
    pub attune_version: String,
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl ModelCard {
    /// The card as Markdown with the Hub's YAML front matter.
    pub fn render(&self) -> String {
        let mut s = String::from("---\n");
        s.push_str(&format!(
            "base_model: {}\n",
            yaml_str(self.base_model_repo.as_deref().unwrap_or(&self.base_model))
        ));
        s.push_str("library_name: transformers\npipeline_tag: text-generation\ntags:\n- attune\n");
        s.push_str(&format!("- {}\n", yaml_str(&self.method)));
        s.push_str("---\n\n");
        s.push_str(&format!("# {}\n\n", self.title));
        s.push_str(&format!(
            "Made with Attune {} ({}).\n\n",
            self.attune_version, self.method
        ));
        s.push_str("## Base model\n\n");
        match &self.base_model_repo {
            Some(r) => s.push_str(&format!("`{}` (Hugging Face: `{r}`)\n\n", self.base_model)),
            None => s.push_str(&format!("`{}`\n\n", self.base_model)),
        }
        s.push_str("## Training data\n\n");
        match &self.dataset {
            Some((name, hash, rows)) => s.push_str(&format!(
                "Dataset `{name}`, content hash (sha256) `{hash}`; {rows}.\n\n"
            )),
            None => s.push_str("None recorded (this model was not trained by Attune).\n\n"),
        }
        if !self.hyperparameters.is_empty() {
            s.push_str("## Method and hyper-parameters\n\n| setting | value |\n|---|---|\n");
            for (k, v) in &self.hyperparameters {
                s.push_str(&format!("| {} | {} |\n", md_escape(k), md_escape(v)));
            }
            s.push('\n');
        }
        s.push_str("## Evaluation\n\n");
        if self.evaluations.is_empty() {
            s.push_str("No evaluation recorded.\n\n");
        } else {
            s.push_str("| measure | value |\n|---|---|\n");
            for (k, v) in &self.evaluations {
                s.push_str(&format!("| {} | {} |\n", md_escape(k), md_escape(v)));
            }
            s.push('\n');
        }
        s.push_str("## Forgetting check\n\n");
        s.push_str(
            self.forgetting
                .as_deref()
                .unwrap_or("Not run for this model."),
        );
        s.push_str("\n\n");
        if let Some(v) = &self.verification {
            s.push_str("## Export check\n\n");
            s.push_str(v);
            s.push_str("\n\n");
        }
        s.push_str(
            "## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\
             tok = AutoTokenizer.from_pretrained(\"path/to/this/folder\")\n\
             model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n\
             ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello\"}], \
             add_generation_prompt=True, return_tensors=\"pt\")\n\
             print(tok.decode(model.generate(ids, max_new_tokens=64)[0]))\n```\n",
        );
        s
    }
}

fn json_text(v: &serde_json::Value, path: &Path) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::format(path, "JSON", e))
}

/// Writes `model` (no LoRA branch attached: merge first) with its tokenizer, chat template,
/// generation defaults and `card` into `dir` (created). Returns the files written.
pub fn write(
    model: &Llama,
    tok: &Tok,
    tmpl: &ChatTemplate,
    sampling: Option<&SamplingDefaults>,
    card: &ModelCard,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    if model.linears().iter().any(|(_, l)| l.lora().is_some()) {
        return Err(Error::InvalidParams(
            "the model still carries LoRA branches; merge them before writing a folder".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::hf::save(model, dir, Some(MAX_SHARD_BYTES))?;
    let tj = dir.join("tokenizer.json");
    let text = tok.inner().to_string(false).map_err(|e| Error::Tokenizer {
        path: tj.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&tj, text.as_bytes())?;
    let cfg = model.config();
    let tc = dir.join("tokenizer_config.json");
    let tcv = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token(),
        "eos_token": tok.eos_token(),
        "pad_token": tok.eos_token(),
        "chat_template": tmpl.source(),
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_position_embeddings,
    });
    write_atomic(&tc, json_text(&tcv, &tc)?.as_bytes())?;
    let sm = dir.join("special_tokens_map.json");
    let smv = serde_json::json!({
        "bos_token": tok.bos_token(),
        "eos_token": tok.eos_token(),
        "pad_token": tok.eos_token(),
    });
    write_atomic(&sm, json_text(&smv, &sm)?.as_bytes())?;
    let gc = dir.join("generation_config.json");
    let eos: Vec<u32> = if tok.eos_token_ids().is_empty() {
        cfg.eos_token_ids.clone()
    } else {
        tok.eos_token_ids().to_vec()
    };
    let bos = tok
        .bos_token()
        .and_then(|t| tok.token_to_id(t))
        .or(cfg.bos_token_id);
    let mut gcv = serde_json::json!({
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos.first(),
    });
    if let (Some(s), Some(obj)) = (sampling, gcv.as_object_mut()) {
        obj.insert("do_sample".into(), serde_json::json!(s.temperature > 0.0));
        obj.insert("temperature".into(), serde_json::json!(s.temperature));
        if let Some(k) = s.top_k {
            obj.insert("top_k".into(), serde_json::json!(k));
        }
        if let Some(p) = s.top_p {
            obj.insert("top_p".into(), serde_json::json!(p));
        }
        if let Some(p) = s.min_p {
            obj.insert("min_p".into(), serde_json::json!(p));
        }
        obj.insert(
            "repetition_penalty".into(),
            serde_json::json!(s.repetition_penalty),
        );
    }
    write_atomic(&gc, json_text(&gcv, &gc)?.as_bytes())?;
    let readme = dir.join("README.md");
    write_atomic(&readme, card.render().as_bytes())?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}
