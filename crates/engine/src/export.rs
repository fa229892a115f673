//! Exports of models and adapters to GGUF, LoRA GGUF, Ollama and Hugging Face folders, each
//! verified after it is written and recorded in the library (`exports`, migration 0006).
//!
//! The job: plan (subject, format, type, destination: every refusal before any work), load
//! the app's model in f32 (an adapter's LoRA attached as in chat), answer the fixed check
//! prompts with it, write the files into a hidden staging folder inside the destination,
//! reload each with Attune's own loaders and compare (`attune_models::export::verify`), then
//! move the files to their final names and record the result. A cancel or an error removes the
//! staging folder: nothing half-written ever carries a final name. A failed check keeps the
//! files and records why.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use attune_models::chat_template::{ChatTemplate, Message};
use attune_models::config::Config;
use attune_models::export::{self as mexport, gguf_out, hf_out, lora_gguf, ollama, verify};
use attune_models::export::{Job, WeightType};
use attune_models::llama::Llama;
use attune_models::loader::{ComputeMode, LoadOptions, LoadedModel, SourceKind};
use attune_models::tokenizer::Tok;
use attune_models::train::peft::{self, Adapter};
use attune_models::train::LoraConfig;
use attune_protocol::{
    AdapterMetrics, ExportFile, ExportFormat, ExportOptions, ExportProgress, ExportQuant,
    ExportRecord, ExportRequest, ExportSubject, FormatOption, ReferenceAnswer, RunSpec,
    SamplingParams, Verification, VerifyCheck,
};

use crate::error::EngineError;
use crate::store::{AdapterRow, ExportRow, ModelRow};
use crate::Engine;

#[cfg(test)]
mod tests;

/// Attune's version, written into model cards and Modelfiles.
pub const ATTUNE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What is exported.
enum Subject {
    Model(ModelRow),
    Adapter { adapter: AdapterRow, base: ModelRow },
}

impl Subject {
    fn name(&self) -> &str {
        match self {
            Subject::Model(m) => &m.name,
            Subject::Adapter { adapter, .. } => &adapter.name,
        }
    }

    /// "model", "lora", "prompt" or "full".
    fn kind(&self) -> &str {
        match self {
            Subject::Model(_) => "model",
            Subject::Adapter { adapter, .. } => &adapter.kind,
        }
    }

    /// The model file or folder the weights come from (a full fine-tune's own folder).
    fn weights_path(&self) -> PathBuf {
        match self {
            Subject::Model(m) => PathBuf::from(&m.path),
            Subject::Adapter { adapter, base } => {
                if adapter.kind == "full" {
                    PathBuf::from(&adapter.path)
                } else {
                    PathBuf::from(&base.path)
                }
            }
        }
    }

    fn base(&self) -> &ModelRow {
        match self {
            Subject::Model(m) => m,
            Subject::Adapter { base, .. } => base,
        }
    }
}

fn to_weight(q: ExportQuant) -> WeightType {
    match q {
        ExportQuant::F32 => WeightType::F32,
        ExportQuant::F16 => WeightType::F16,
        ExportQuant::Bf16 => WeightType::Bf16,
        ExportQuant::Q8_0 => WeightType::Q8_0,
        ExportQuant::Q4KM => WeightType::Q4KM,
    }
}

fn unsupported(what: &str, reason: impl Into<String>) -> EngineError {
    EngineError::ExportUnsupported {
        what: what.to_string(),
        reason: reason.into(),
    }
}

fn model_err(path: &Path) -> impl Fn(attune_models::Error) -> EngineError + '_ {
    move |e| match e {
        attune_models::Error::Cancelled => EngineError::Cancelled,
        other => EngineError::InvalidModel {
            path: path.to_path_buf(),
            source: Box::new(other),
        },
    }
}

fn export_err(e: attune_models::Error) -> EngineError {
    match e {
        attune_models::Error::Cancelled => EngineError::Cancelled,
        attune_models::Error::Io { path, source } => EngineError::Write { path, source },
        other => EngineError::InvalidInput(other.to_string()),
    }
}

/// A model's configuration from its header or `config.json`, without loading weights.
fn read_config(path: &Path) -> Result<Config, EngineError> {
    let bad = model_err(path);
    match attune_models::loader::source_kind(path).map_err(&bad)? {
        SourceKind::Gguf => {
            let c = attune_models::gguf::read_content(path).map_err(&bad)?;
            attune_models::gguf::config_from_content(&c, path).map_err(bad)
        }
        SourceKind::HfFolder => attune_models::hf::read_config(path).map_err(bad),
    }
}

/// A file-name stem from a library name.
fn stem(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches(['-', '.']).to_string();
    if s.is_empty() {
        "model".into()
    } else {
        s
    }
}

/// Why `format` cannot carry `subject`, if it cannot.
fn refusal(subject: &Subject, cfg: &Config, format: ExportFormat) -> Option<String> {
    let name = subject.name();
    if subject.kind() == "prompt" {
        return Some(format!(
            "adapter '{name}' is a soft prompt (prompt tuning): only PEFT's format carries it \
             (`attune adapters export {name} DIR`, loaded with PEFT's PeftModel). GGUF, \
             llama.cpp and Ollama have no input for learned prompt embeddings, and a Hugging \
             Face model folder has no place for them"
        ));
    }
    match (format, subject.kind()) {
        (ExportFormat::GgufLora, "model") => {
            return Some(format!(
                "'{name}' is a model, not a LoRA adapter: there is no adapter to write; choose gguf"
            ))
        }
        (ExportFormat::GgufLora, "full") => {
            return Some(format!(
                "'{name}' is a full fine-tune: it has no LoRA matrices; export it as gguf or hf"
            ))
        }
        _ => {}
    }
    if matches!(
        format,
        ExportFormat::Gguf | ExportFormat::GgufLora | ExportFormat::Ollama
    ) {
        if let Err(e) = gguf_out::plan(cfg, WeightType::F16) {
            return Some(e.to_string().replace("invalid generation settings: ", ""));
        }
    }
    None
}

/// The weight types a format offers.
fn quants_of(format: ExportFormat) -> Vec<ExportQuant> {
    match format {
        ExportFormat::Gguf | ExportFormat::Ollama => vec![
            ExportQuant::F16,
            ExportQuant::Bf16,
            ExportQuant::Q8_0,
            ExportQuant::Q4KM,
            ExportQuant::F32,
        ],
        ExportFormat::GgufLora | ExportFormat::Hf => vec![ExportQuant::F32],
    }
}

/// Checks `dest`: a folder that is missing, empty, or (with `overwrite`) anything.
fn check_dest(dest: &Path, overwrite: bool) -> Result<(), EngineError> {
    if dest.as_os_str().is_empty() {
        return Err(EngineError::InvalidInput(
            "destination: choose a folder to export into".into(),
        ));
    }
    if dest.is_file() {
        return Err(EngineError::InvalidInput(format!(
            "destination {} is a file; choose a folder",
            dest.display()
        )));
    }
    if dest.is_dir() && !overwrite {
        let entries: Vec<String> = std::fs::read_dir(dest)
            .map_err(|source| EngineError::Io {
                path: dest.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !entries.is_empty() {
            let mut shown: Vec<String> = entries.iter().take(3).cloned().collect();
            if entries.len() > 3 {
                shown.push(format!("and {} more", entries.len() - 3));
            }
            return Err(EngineError::DestinationNotEmpty {
                path: dest.to_path_buf(),
                entries: shown.join(", "),
            });
        }
    }
    Ok(())
}

/// The hidden folder the files are written into before they get their final names.
struct Staging {
    dir: PathBuf,
    dest: PathBuf,
    created_dest: bool,
    published: bool,
}

impl Staging {
    fn new(dest: &Path) -> Result<Staging, EngineError> {
        let created_dest = !dest.exists();
        std::fs::create_dir_all(dest).map_err(|source| EngineError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = dest.join(format!(
            ".attune-export-{}-{nanos:09}.partial",
            std::process::id()
        ));
        std::fs::create_dir(&dir).map_err(|source| EngineError::Write {
            path: dir.clone(),
            source,
        })?;
        Ok(Staging {
            dir,
            dest: dest.to_path_buf(),
            created_dest,
            published: false,
        })
    }

    /// Moves every staged file to its final name (replacing one of the same name).
    fn publish(&mut self) -> Result<Vec<ExportFile>, EngineError> {
        let mut files = Vec::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(|source| EngineError::Io {
                path: self.dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().unwrap_or_default().to_os_string();
            let dst = self.dest.join(&name);
            let bytes = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            std::fs::rename(&p, &dst).map_err(|source| EngineError::Write {
                path: dst.clone(),
                source,
            })?;
            files.push(ExportFile {
                name: name.to_string_lossy().into_owned(),
                bytes,
            });
        }
        let _ = std::fs::remove_dir(&self.dir);
        self.published = true;
        Ok(files)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.dir);
            if self.created_dest {
                // Only if nothing else appeared there meanwhile.
                let _ = std::fs::remove_dir(&self.dest);
            }
        }
    }
}

/// Rendered turns of a saved prompt template, for Ollama's SYSTEM and MESSAGE lines.
struct OllamaPrompt {
    system: Option<String>,
    messages: Vec<(String, String)>,
    note: Option<String>,
}

/// The app's model as chat uses it, with what writing and checking need.
struct AppModel {
    model: Llama,
    tok: Tok,
    tmpl: ChatTemplate,
    config: Config,
    /// The LoRA adapter (PEFT keys), when the subject is one.
    lora: Option<(
        LoraConfig,
        std::collections::HashMap<String, candle_core::Tensor>,
    )>,
}

fn load_f32(path: &Path) -> Result<LoadedModel, EngineError> {
    attune_models::loader::load(
        path,
        &LoadOptions {
            compute: ComputeMode::F32,
        },
    )
    .map_err(model_err(path))
}

fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

impl Engine {
    fn export_subject(&self, s: &ExportSubject) -> Result<Subject, EngineError> {
        match s {
            ExportSubject::Model { model } => {
                let m = self.find_model(model)?;
                let row = self
                    .store
                    .get_model(m.id)?
                    .ok_or_else(|| EngineError::ModelNotFound(model.clone()))?;
                Ok(Subject::Model(row))
            }
            ExportSubject::Adapter { adapter } => {
                let a = self.adapter_row(adapter)?;
                let base = self
                    .store
                    .get_model(a.base_model_id)?
                    .ok_or_else(|| EngineError::ModelNotFound(a.base_model_id.to_string()))?;
                Ok(Subject::Adapter { adapter: a, base })
            }
        }
    }

    /// What the export dialog offers for `subject`: each format, why it is unavailable if it
    /// is, and the estimated size of each weight type.
    pub fn export_options(&self, subject: &ExportSubject) -> Result<ExportOptions, EngineError> {
        let s = self.export_subject(subject)?;
        let path = s.weights_path();
        let cfg = read_config(&path)?;
        // The tokenizer and template ride along: the base GGUF's header size, or ~the folder's
        // tokenizer.json.
        let meta_bytes = match attune_models::gguf::read_content(Path::new(&s.base().path)) {
            Ok(c) => c.tensor_data_offset,
            Err(_) => 4 << 20,
        };
        let lora_bytes = match &s {
            Subject::Adapter { adapter, .. } if adapter.kind == "lora" => {
                std::fs::metadata(Path::new(&adapter.path).join(peft::WEIGHTS_FILE))
                    .map(|m| m.len())
                    .unwrap_or(0)
            }
            _ => 0,
        };
        let mut formats = Vec::new();
        for f in ExportFormat::ALL {
            let unavailable = refusal(&s, &cfg, f);
            let mut sizes = Vec::new();
            if unavailable.is_none() {
                for q in quants_of(f) {
                    let bytes = match f {
                        ExportFormat::Gguf | ExportFormat::Ollama => {
                            gguf_out::tensor_bytes(&cfg, to_weight(q)).unwrap_or(0) + meta_bytes
                        }
                        ExportFormat::GgufLora => lora_bytes + 4096,
                        ExportFormat::Hf => cfg.num_parameters() as u64 * 4 + meta_bytes,
                    };
                    sizes.push((q, bytes));
                }
            }
            formats.push(FormatOption {
                format: f,
                unavailable,
                sizes,
            });
        }
        Ok(ExportOptions {
            subject: s.name().to_string(),
            kind: s.kind().to_string(),
            formats,
        })
    }

    /// All exports, newest first.
    pub fn list_exports(&self) -> Result<Vec<ExportRecord>, EngineError> {
        self.store
            .list_exports()?
            .iter()
            .map(|r| self.export_record(r))
            .collect()
    }

    fn export_record(&self, r: &ExportRow) -> Result<ExportRecord, EngineError> {
        let db = self.store.path();
        let bad = |field: &str| EngineError::db(db, format!("export id {}: invalid {field}", r.id));
        Ok(ExportRecord {
            id: r.id,
            subject_kind: if r.model_id.is_some() {
                "model".into()
            } else {
                "adapter".into()
            },
            subject: r.subject_name.clone(),
            format: ExportFormat::parse(&r.format).ok_or_else(|| bad("format"))?,
            quant: ExportQuant::parse(&r.quant).ok_or_else(|| bad("quant"))?,
            path: r.path.clone(),
            files: serde_json::from_str(&r.files_json).map_err(|_| bad("files_json"))?,
            bytes: u64::try_from(r.bytes).map_err(|_| bad("bytes"))?,
            verification: serde_json::from_str(&r.verification_json)
                .map_err(|_| bad("verification_json"))?,
            attune_version: r.attune_version.clone(),
            created_at: r.created_at.clone(),
        })
    }

    /// Loads the subject as chat runs it (f32 weights; an adapter's LoRA attached).
    fn app_model(&self, s: &Subject) -> Result<AppModel, EngineError> {
        let path = s.weights_path();
        let loaded = load_f32(&path)?;
        let mut model = loaded.model;
        let mut lora = None;
        if let Subject::Adapter { adapter, .. } = s {
            if adapter.kind == "lora" {
                let apath = PathBuf::from(&adapter.path);
                let bad = |e: attune_models::Error| EngineError::InvalidAdapter {
                    path: apath.clone(),
                    reason: e.to_string(),
                };
                match peft::load(&apath).map_err(bad)? {
                    Adapter::Lora {
                        config, tensors, ..
                    } => {
                        peft::apply_lora(&mut model, &config, &tensors).map_err(bad)?;
                        lora = Some((config, tensors));
                    }
                    Adapter::Prompt { .. } => {
                        return Err(unsupported(&adapter.name, "a soft prompt is not a LoRA"))
                    }
                }
            }
        }
        Ok(AppModel {
            model,
            tok: loaded.tokenizer,
            tmpl: loaded.chat_template,
            config: loaded.config,
            lora,
        })
    }

    /// The `tokenizer.*` GGUF keys: the base GGUF's, else built from `tokenizer.json`.
    fn tokenizer_keys(
        &self,
        s: &Subject,
        app: &AppModel,
    ) -> Result<Vec<(String, candle_core::quantized::gguf_file::Value)>, EngineError> {
        let base = PathBuf::from(&s.base().path);
        if base.is_file() {
            let c = attune_models::gguf::read_content(&base).map_err(model_err(&base))?;
            return Ok(mexport::tokenizer_meta::from_gguf(&c));
        }
        let dir = s.weights_path();
        mexport::tokenizer_meta::from_hf_dir(&dir, &app.tok, app.config.vocab_size)
            .map_err(|e| unsupported(s.name(), format!("GGUF cannot carry its tokenizer: {e}")))
    }

    fn ollama_prompt(&self, name: &str) -> Result<OllamaPrompt, EngineError> {
        let rec = self
            .list_templates()?
            .into_iter()
            .find(|t| t.name == name.trim())
            .ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "template '{name}': no saved prompt template of that name"
                ))
            })?;
        let t = attune_protocol::PromptTemplate {
            name: rec.name.clone(),
            system: rec.system.clone(),
            examples: rec.examples.clone(),
            user: rec.user.clone(),
            values: rec.variables.clone(),
        };
        let e = crate::templates::expand(&t, &[]);
        if !e.missing.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "template '{name}': variables without a value: {}",
                e.missing.join(", ")
            )));
        }
        let mut system = None;
        let mut messages = Vec::new();
        for m in e.messages {
            if m.role == "system" && system.is_none() && messages.is_empty() {
                system = Some(m.content);
            } else {
                messages.push((m.role, m.content));
            }
        }
        Ok(OllamaPrompt {
            system,
            messages,
            note: rec.user.as_ref().map(|_| {
                format!(
                    "template '{}' wraps each user message; Ollama has no per-message wrapper, \
                     so only its system prompt and examples are carried",
                    rec.name
                )
            }),
        })
    }

    /// Runs an export: plans, writes, verifies, publishes and records it. `on_progress`
    /// receives each stage; `cancel` stops it (nothing is left under a final name).
    pub fn export(
        &self,
        req: &ExportRequest,
        on_progress: &mut dyn FnMut(ExportProgress),
        cancel: &AtomicBool,
    ) -> Result<ExportRecord, EngineError> {
        // ---- plan: every refusal before any work
        let s = self.export_subject(&req.subject)?;
        let cfg = read_config(&s.weights_path())?;
        if let Some(why) = refusal(&s, &cfg, req.format) {
            return Err(unsupported(s.name(), why));
        }
        let quant = req.quant.unwrap_or(match req.format {
            ExportFormat::Gguf | ExportFormat::Ollama => ExportQuant::F16,
            _ => ExportQuant::F32,
        });
        if !quants_of(req.format).contains(&quant) {
            return Err(EngineError::InvalidInput(format!(
                "quant: {} files are written in f32 (the app's exact values); {} applies to \
                 gguf and ollama exports",
                req.format.as_str(),
                quant.as_str()
            )));
        }
        if req.ollama_adapter && !(req.format == ExportFormat::Ollama && s.kind() == "lora") {
            return Err(EngineError::InvalidInput(
                "ollama_adapter: only a LoRA adapter exported for Ollama can be kept as ADAPTER"
                    .into(),
            ));
        }
        let prompt = match (&req.template, req.format) {
            (Some(t), ExportFormat::Ollama) if !t.trim().is_empty() => Some(self.ollama_prompt(t)?),
            (Some(t), _) if !t.trim().is_empty() => {
                return Err(EngineError::InvalidInput(
                    "template: a prompt template is carried only by Ollama exports (SYSTEM)".into(),
                ))
            }
            _ => None,
        };
        let dest =
            std::path::absolute(Path::new(req.dest.trim())).map_err(|source| EngineError::Io {
                path: PathBuf::from(req.dest.trim()),
                source,
            })?;
        check_dest(&dest, req.overwrite)?;
        let ty = to_weight(quant);

        let mut progress = |stage: &str, done: usize, total: usize| {
            on_progress(ExportProgress {
                stage: stage.to_string(),
                done: done as u64,
                total: total as u64,
            })
        };
        let mut job = Job {
            progress: &mut progress,
            cancel,
        };
        job.report("loading the model", 0, 1);
        job.check().map_err(export_err)?;
        let app = self.app_model(&s)?;
        job.report("loading the model", 1, 1);
        let refs = verify::reference(
            &app.model,
            &app.tok,
            &app.tmpl,
            &verify::prompt_set(),
            &mut job,
        )
        .map_err(export_err)?;

        let mut staging = Staging::new(&dest)?;
        let stage_dir = staging.dir.clone();
        let name = s.name().to_string();
        let st = stem(&name);
        let mut checks: Vec<VerifyCheck> = Vec::new();
        let mut tolerances: Vec<String> = Vec::new();
        let tol = verify::Tolerance::for_type(ty);
        let f32_tol = verify::Tolerance::for_type(WeightType::F32);

        let model_meta = |s: &Subject| -> Result<gguf_out::ModelMeta, EngineError> {
            let mut general = vec![
                (
                    "general.base_model.count".to_string(),
                    candle_core::quantized::gguf_file::Value::U32(1),
                ),
                (
                    "general.base_model.0.name".to_string(),
                    candle_core::quantized::gguf_file::Value::String(s.base().name.clone()),
                ),
            ];
            if let Some(repo) = &s.base().source_repo {
                general.push((
                    "general.base_model.0.repo_url".to_string(),
                    candle_core::quantized::gguf_file::Value::String(format!(
                        "https://huggingface.co/{repo}"
                    )),
                ));
            }
            if let Ok(c) = attune_models::gguf::read_content(Path::new(&s.base().path)) {
                for k in [
                    "general.license",
                    "general.languages",
                    "general.organization",
                ] {
                    if let Some(v) = c.metadata.get(k) {
                        general.push((k.to_string(), v.clone()));
                    }
                }
            }
            Ok(gguf_out::ModelMeta {
                name: s.name().to_string(),
                tokenizer: self.tokenizer_keys(s, &app)?,
                chat_template: app.tmpl.source().to_string(),
                general,
            })
        };

        match req.format {
            ExportFormat::Gguf => {
                let file = format!("{st}-{}.gguf", quant.as_str());
                let meta = model_meta(&s)?;
                gguf_out::write_model(&app.model, &meta, ty, &stage_dir.join(&file), &mut job)
                    .map_err(export_err)?;
                checks.extend(self.check_gguf(
                    &stage_dir.join(&file),
                    &file,
                    &refs,
                    &tol,
                    &mut job,
                )?);
                tolerances.push(format!("{file}: {}", tol.describe()));
            }
            ExportFormat::GgufLora => {
                let file = format!("{st}-lora.gguf");
                let (lcfg, tensors) = app
                    .lora
                    .as_ref()
                    .ok_or_else(|| unsupported(&name, "no LoRA matrices"))?;
                let meta = lora_gguf::AdapterMeta {
                    name: name.clone(),
                    base_name: s.base().name.clone(),
                };
                lora_gguf::write(
                    &app.config,
                    lcfg,
                    tensors,
                    &meta,
                    &stage_dir.join(&file),
                    &mut job,
                )
                .map_err(export_err)?;
                checks.extend(self.check_lora_gguf(
                    &s,
                    &stage_dir.join(&file),
                    &file,
                    &refs,
                    &f32_tol,
                    &mut job,
                )?);
                tolerances.push(format!("{file} over its base: {}", f32_tol.describe()));
            }
            ExportFormat::Ollama => {
                let (from, adapter) = if req.ollama_adapter {
                    let base_file = format!("{}-{}.gguf", stem(&s.base().name), quant.as_str());
                    let lora_file = format!("{st}-lora.gguf");
                    let base_sub = Subject::Model(s.base().clone());
                    let meta = model_meta(&base_sub)?;
                    let mut base_model = app.model.clone();
                    base_model.clear_lora();
                    gguf_out::write_model(
                        &base_model,
                        &meta,
                        ty,
                        &stage_dir.join(&base_file),
                        &mut job,
                    )
                    .map_err(export_err)?;
                    let (lcfg, tensors) = app
                        .lora
                        .as_ref()
                        .ok_or_else(|| unsupported(&name, "no LoRA matrices"))?;
                    let lmeta = lora_gguf::AdapterMeta {
                        name: name.clone(),
                        base_name: s.base().name.clone(),
                    };
                    lora_gguf::write(
                        &app.config,
                        lcfg,
                        tensors,
                        &lmeta,
                        &stage_dir.join(&lora_file),
                        &mut job,
                    )
                    .map_err(export_err)?;
                    checks.extend(self.check_gguf_pair(
                        &stage_dir.join(&base_file),
                        &stage_dir.join(&lora_file),
                        &format!("{base_file} + {lora_file}"),
                        &refs,
                        &tol,
                        &mut job,
                    )?);
                    tolerances.push(format!("{base_file} + {lora_file}: {}", tol.describe()));
                    (base_file, Some(lora_file))
                } else {
                    let file = format!("{st}-{}.gguf", quant.as_str());
                    let meta = model_meta(&s)?;
                    gguf_out::write_model(&app.model, &meta, ty, &stage_dir.join(&file), &mut job)
                        .map_err(export_err)?;
                    checks.extend(self.check_gguf(
                        &stage_dir.join(&file),
                        &file,
                        &refs,
                        &tol,
                        &mut job,
                    )?);
                    tolerances.push(format!("{file}: {}", tol.describe()));
                    (file, None)
                };
                checks.extend(self.write_modelfile(
                    &app,
                    &name,
                    &from,
                    adapter.as_deref(),
                    prompt.as_ref(),
                    &stage_dir,
                )?);
            }
            ExportFormat::Hf => {
                let mut merged = app.model.clone();
                peft::merge_lora(&mut merged).map_err(export_err)?;
                let card = self.model_card(&s, None)?;
                let sampling = sampling_defaults();
                job.report("writing the folder", 0, 1);
                hf_out::write(
                    &merged,
                    &app.tok,
                    &app.tmpl,
                    Some(&sampling),
                    &card,
                    &stage_dir,
                )
                .map_err(export_err)?;
                job.report("writing the folder", 1, 1);
                drop(merged);
                let hf_checks = self.check_hf(&stage_dir, &app, &refs, &f32_tol, &mut job)?;
                let passed = hf_checks.iter().all(|c| c.passed);
                let card = self.model_card(
                    &s,
                    Some(format!(
                        "Attune reloaded this folder after writing it and compared it with the model \
                         in the app on {} fixed chat prompts: {} ({}).",
                        refs.len(),
                        if passed { "passed" } else { "FAILED" },
                        f32_tol.describe()
                    )),
                )?;
                mexport::files::write_atomic(
                    &stage_dir.join("README.md"),
                    card.render().as_bytes(),
                )
                .map_err(export_err)?;
                checks.extend(hf_checks);
                tolerances.push(format!("folder: {}", f32_tol.describe()));
            }
        }
        job.check().map_err(export_err)?;

        // ---- publish, record
        if req.overwrite && req.format == ExportFormat::Hf {
            // Shards of an earlier export would be read with the new index (or instead of the
            // new single file): remove them.
            if let Ok(rd) = std::fs::read_dir(&dest) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with("model") && n.ends_with(".safetensors")
                        || n == "model.safetensors.index.json"
                    {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        let files = staging.publish()?;
        let bytes: u64 = files.iter().map(|f| f.bytes).sum();
        let passed = checks.iter().all(|c| c.passed);
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{} ({}): {}", c.name, c.file, c.detail))
            .collect();
        let summary = if passed {
            format!(
                "passed: {} checks on {} prompts ({})",
                checks.len(),
                refs.len(),
                fmt_bytes(bytes)
            )
        } else {
            format!(
                "FAILED ({} of {} checks); the files are kept: {}",
                failed.len(),
                checks.len(),
                failed.join("; ")
            )
        };
        let verification = Verification {
            passed,
            summary,
            tolerance: tolerances.join("; "),
            checks,
            reference: refs
                .iter()
                .map(|r| ReferenceAnswer {
                    text: r.text.clone(),
                    prompt_ids: r.prompt_ids.clone(),
                    answer_ids: r.answer.clone(),
                })
                .collect(),
        };
        let (model_id, adapter_id) = match &s {
            Subject::Model(m) => (Some(m.id), None),
            Subject::Adapter { adapter, .. } => (None, Some(adapter.id)),
        };
        let row = ExportRow {
            id: 0,
            model_id,
            adapter_id,
            subject_name: name,
            format: req.format.as_str().into(),
            quant: quant.as_str().into(),
            path: dest.to_string_lossy().into_owned(),
            files_json: serde_json::to_string(&files).unwrap_or_else(|_| "[]".into()),
            bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
            verification: if passed { "passed" } else { "failed" }.into(),
            verification_json: serde_json::to_string(&verification)
                .map_err(|e| EngineError::InvalidInput(e.to_string()))?,
            attune_version: ATTUNE_VERSION.into(),
            created_at: crate::clock::now_rfc3339(),
        };
        let row = self.store.insert_export(&row)?;
        self.export_record(&row)
    }

    fn compare_checks(
        &self,
        file: &str,
        loaded: &LoadedModel,
        model: &Llama,
        refs: &[verify::Run],
        tol: &verify::Tolerance,
        job: &mut Job<'_>,
    ) -> Result<Vec<VerifyCheck>, EngineError> {
        let c = verify::compare(
            model,
            &loaded.tokenizer,
            &loaded.chat_template,
            refs,
            tol,
            job,
        )
        .map_err(export_err)?;
        Ok(c.checks
            .into_iter()
            .map(|k| VerifyCheck {
                file: file.to_string(),
                name: k.name,
                passed: k.passed,
                detail: k.detail,
            })
            .collect())
    }

    /// Reloads a model GGUF with Attune's loader and compares it.
    fn check_gguf(
        &self,
        path: &Path,
        file: &str,
        refs: &[verify::Run],
        tol: &verify::Tolerance,
        job: &mut Job<'_>,
    ) -> Result<Vec<VerifyCheck>, EngineError> {
        job.report("verifying", 0, 1);
        match attune_models::loader::load(
            path,
            &LoadOptions {
                compute: ComputeMode::F32,
            },
        ) {
            Ok(loaded) => self.compare_checks(file, &loaded, &loaded.model, refs, tol, job),
            Err(e) => Ok(vec![VerifyCheck {
                file: file.into(),
                name: "reload".into(),
                passed: false,
                detail: format!("Attune cannot load what it wrote: {e}"),
            }]),
        }
    }

    /// Reloads the subject's base from the library, applies the adapter GGUF read back, and
    /// compares.
    fn check_lora_gguf(
        &self,
        s: &Subject,
        path: &Path,
        file: &str,
        refs: &[verify::Run],
        tol: &verify::Tolerance,
        job: &mut Job<'_>,
    ) -> Result<Vec<VerifyCheck>, EngineError> {
        job.report("verifying", 0, 1);
        let base = load_f32(Path::new(&s.base().path))?;
        self.check_adapter_over(&base, path, file, refs, tol, job)
    }

    fn check_adapter_over(
        &self,
        base: &LoadedModel,
        adapter: &Path,
        file: &str,
        refs: &[verify::Run],
        tol: &verify::Tolerance,
        job: &mut Job<'_>,
    ) -> Result<Vec<VerifyCheck>, EngineError> {
        let fail = |detail: String| {
            Ok(vec![VerifyCheck {
                file: file.into(),
                name: "reload".into(),
                passed: false,
                detail,
            }])
        };
        let read = match lora_gguf::read(adapter, &base.config) {
            Ok(r) => r,
            Err(e) => return fail(format!("Attune cannot read the adapter it wrote: {e}")),
        };
        let mut model = base.model.clone();
        if let Err(e) = peft::apply_lora(&mut model, &read.config, &read.tensors) {
            return fail(format!("the adapter does not fit its base: {e}"));
        }
        self.compare_checks(file, base, &model, refs, tol, job)
    }

    /// A base GGUF with an adapter GGUF over it (Ollama's FROM + ADAPTER).
    fn check_gguf_pair(
        &self,
        base: &Path,
        adapter: &Path,
        file: &str,
        refs: &[verify::Run],
        tol: &verify::Tolerance,
        job: &mut Job<'_>,
    ) -> Result<Vec<VerifyCheck>, EngineError> {
        job.report("verifying", 0, 1);
        match attune_models::loader::load(
            base,
            &LoadOptions {
                compute: ComputeMode::F32,
            },
        ) {
            Ok(loaded) => self.check_adapter_over(&loaded, adapter, file, refs, tol, job),
            Err(e) => Ok(vec![VerifyCheck {
                file: file.into(),
                name: "reload".into(),
                passed: false,
                detail: format!("Attune cannot load what it wrote: {e}"),
            }]),
        }
    }

    /// Reloads a Hugging Face folder and compares it; checks its generation config too.
    fn check_hf(
        &self,
        dir: &Path,
        app: &AppModel,
        refs: &[verify::Run],
        tol: &verify::Tolerance,
        job: &mut Job<'_>,
    ) -> Result<Vec<VerifyCheck>, EngineError> {
        job.report("verifying", 0, 1);
        let mut checks = match attune_models::loader::load(dir, &LoadOptions::default()) {
            Ok(loaded) => {
                self.compare_checks("(folder)", &loaded, &loaded.model, refs, tol, job)?
            }
            Err(e) => vec![VerifyCheck {
                file: "(folder)".into(),
                name: "reload".into(),
                passed: false,
                detail: format!("Attune cannot load what it wrote: {e}"),
            }],
        };
        let gen = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let ids: Vec<u32> = gen
            .as_ref()
            .and_then(|g| g["eos_token_id"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_u64().map(|x| x as u32))
            .collect();
        let want = app.tok.eos_token_ids();
        let ok = want.iter().all(|i| ids.contains(i)) && !ids.is_empty();
        checks.push(VerifyCheck {
            file: "generation_config.json".into(),
            name: "EOS ids".into(),
            passed: ok,
            detail: format!("eos_token_id {ids:?}; the app stops on {want:?}"),
        });
        Ok(checks)
    }

    /// Writes the Modelfile into `dir` and checks it: Ollama's parser rules, and its TEMPLATE
    /// rendering the same text as the Jinja template.
    fn write_modelfile(
        &self,
        app: &AppModel,
        name: &str,
        from: &str,
        adapter: Option<&str>,
        prompt: Option<&OllamaPrompt>,
        dir: &Path,
    ) -> Result<Vec<VerifyCheck>, EngineError> {
        let eos: Vec<String> = app
            .tok
            .eos_token_ids()
            .iter()
            .filter_map(|i| app.tok.inner().id_to_token(*i))
            .collect();
        let specials: Vec<String> = app
            .tok
            .inner()
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        let go = ollama::translate(&app.tmpl, &eos, &specials)
            .map_err(|e| unsupported(name, format!("Ollama: {e}")))?;
        let sp = sampling_defaults();
        let mut parameters: Vec<(String, String)> = go
            .stops
            .iter()
            .map(|s| ("stop".to_string(), s.clone()))
            .collect();
        parameters.push(("temperature".into(), format!("{}", sp.temperature)));
        if let Some(k) = sp.top_k {
            parameters.push(("top_k".into(), k.to_string()));
        }
        if let Some(p) = sp.top_p {
            parameters.push(("top_p".into(), format!("{p}")));
        }
        if let Some(p) = sp.min_p {
            parameters.push(("min_p".into(), format!("{p}")));
        }
        parameters.push((
            "repeat_penalty".into(),
            format!("{}", sp.repetition_penalty),
        ));
        parameters.push(("repeat_last_n".into(), sp.repeat_last_n.to_string()));
        parameters.push((
            "num_ctx".into(),
            app.config.max_position_embeddings.min(8192).to_string(),
        ));
        let mut comment = format!(
            "Written by Attune {ATTUNE_VERSION} for '{name}'.\nollama create {} -f Modelfile",
            stem(name).to_ascii_lowercase()
        );
        if let Some(n) = prompt.and_then(|p| p.note.as_ref()) {
            comment.push('\n');
            comment.push_str(n);
        }
        let mf = ollama::Modelfile {
            from: format!("./{from}"),
            adapter: adapter.map(|a| format!("./{a}")),
            template: go.template.clone(),
            system: prompt.and_then(|p| p.system.clone()),
            messages: prompt.map(|p| p.messages.clone()).unwrap_or_default(),
            parameters,
            comment,
        };
        let text = mf
            .render()
            .map_err(|e| unsupported(name, format!("Ollama: {e}")))?;
        let path = dir.join("Modelfile");
        mexport::files::write_atomic(&path, text.as_bytes()).map_err(export_err)?;
        let mut checks = Vec::new();
        let back = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        match ollama::check(&back, dir) {
            Ok(info) => {
                let same = info.template.as_deref() == Some(mf.template.as_str())
                    && info.system == mf.system
                    && info.messages == mf.messages
                    && info.parameters == mf.parameters
                    && info.from_path.is_some()
                    && (adapter.is_none() || info.adapter.is_some());
                checks.push(VerifyCheck {
                    file: "Modelfile".into(),
                    name: "Modelfile syntax".into(),
                    passed: same,
                    detail: if same {
                        format!(
                            "Ollama's parser rules read back FROM{}, TEMPLATE, {} PARAMETER lines{} \
                             exactly as written (`ollama create` itself was not run)",
                            if adapter.is_some() { ", ADAPTER" } else { "" },
                            mf.parameters.len(),
                            if mf.system.is_some() { ", SYSTEM" } else { "" }
                        )
                    } else {
                        "Ollama's parser rules read back something else than was written".into()
                    },
                });
                let go_t = attune_models::export::gotmpl::Template::parse(&mf.template)
                    .map_err(|e| unsupported(name, e.to_string()))?;
                let diff = ollama::compare_templates(&app.tmpl, &go_t).map_err(export_err)?;
                checks.push(VerifyCheck {
                    file: "Modelfile".into(),
                    name: "TEMPLATE".into(),
                    passed: diff.is_none(),
                    detail: diff.unwrap_or_else(|| {
                        format!(
                            "renders the same text as the Jinja chat template on {} conversations",
                            ollama::probe_conversations().len()
                        )
                    }),
                });
                let missing: Vec<&String> = eos.iter().filter(|e| !go.stops.contains(e)).collect();
                checks.push(VerifyCheck {
                    file: "Modelfile".into(),
                    name: "stop".into(),
                    passed: missing.is_empty() && !go.stops.is_empty(),
                    detail: format!("PARAMETER stop {:?}", go.stops),
                });
            }
            Err(e) => checks.push(VerifyCheck {
                file: "Modelfile".into(),
                name: "Modelfile syntax".into(),
                passed: false,
                detail: e.to_string(),
            }),
        }
        Ok(checks)
    }

    /// The model card of a Hugging Face export: base, data, method, evaluations, forgetting.
    fn model_card(
        &self,
        s: &Subject,
        verification: Option<String>,
    ) -> Result<hf_out::ModelCard, EngineError> {
        let base = s.base();
        let mut card = hf_out::ModelCard {
            title: s.name().to_string(),
            base_model: base.name.clone(),
            base_model_repo: base.source_repo.clone(),
            method: "base model (no adaptation)".into(),
            verification,
            attune_version: ATTUNE_VERSION.into(),
            ..Default::default()
        };
        let Subject::Adapter { adapter, .. } = s else {
            return Ok(card);
        };
        card.method = match adapter.kind.as_str() {
            "lora" => "LoRA, merged into the base weights".into(),
            "full" => "full fine-tuning".into(),
            other => other.to_string(),
        };
        if let Some(ds) = adapter
            .dataset_id
            .and_then(|id| self.store.get_dataset(id).ok().flatten())
        {
            card.dataset = Some((
                ds.name.clone(),
                ds.content_hash.clone(),
                format!(
                    "{} train / {} valid / {} test rows",
                    ds.train_rows, ds.valid_rows, ds.test_rows
                ),
            ));
        }
        if let Some(run) = adapter
            .run_id
            .and_then(|id| self.store.get_run(id).ok().flatten())
        {
            if let Ok(spec) = serde_json::from_str::<RunSpec>(&run.config_json) {
                card.hyperparameters = hyperparameters(&spec, run.step);
            }
        } else if adapter.kind == "lora" {
            if let Ok(Adapter::Lora { config, .. }) = peft::load(Path::new(&adapter.path)) {
                card.hyperparameters = vec![
                    ("LoRA r".into(), config.r.to_string()),
                    ("LoRA alpha".into(), config.alpha.to_string()),
                    ("targets".into(), config.targets.join(", ")),
                ];
            }
        }
        let m: AdapterMetrics = serde_json::from_str(&adapter.metrics_json).unwrap_or_default();
        if let (Some(b), Some(a)) = (m.eval_nll_before, m.eval_nll_after) {
            card.evaluations.push((
                "eval NLL before -> after training (the run's eval split)".into(),
                format!("{b:.4} -> {a:.4}"),
            ));
        }
        for (_, e) in self.store.list_evaluations()? {
            if e.subject_kind == "adapter" && e.subject_id == adapter.id.to_string() {
                let ds = self
                    .store
                    .get_dataset(e.dataset_id)?
                    .map(|d| d.name)
                    .unwrap_or_else(|| format!("dataset {}", e.dataset_id));
                let mut v = format!(
                    "mean NLL {:.4} (ppl {:.2}) over {} tokens",
                    e.mean_nll, e.ppl, e.n_tokens
                );
                if let Some(acc) = e.accuracy {
                    v.push_str(&format!(
                        ", label accuracy {:.1}% of {}",
                        acc * 100.0,
                        e.n_labeled
                    ));
                }
                card.evaluations.push((
                    format!("{ds} / {} ({} rows, {})", e.split, e.n_rows, e.created_at),
                    v,
                ));
            }
        }
        card.forgetting = match (m.general_nll_before, m.general_nll_after) {
            (Some(b), Some(a)) => Some(format!(
                "Mean NLL on Attune's general-domain sample: {b:.4} before, {a:.4} after training \
                 ({:+.1}%). {}",
                (a / b - 1.0) * 100.0,
                m.forgetting_warning
                    .clone()
                    .unwrap_or_else(|| "No forgetting warning (threshold: 5% worse).".into())
            )),
            _ => None,
        };
        Ok(card)
    }
}

/// The app's default sampling, for generation_config.json and the Modelfile.
fn sampling_defaults() -> hf_out::SamplingDefaults {
    let p = SamplingParams::default();
    hf_out::SamplingDefaults {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        repeat_last_n: p.repeat_last_n,
    }
}

/// A run's settings as (name, value) rows for the model card.
fn hyperparameters(spec: &RunSpec, steps: i64) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    match &spec.method {
        attune_protocol::MethodSpec::Lora {
            r,
            alpha,
            dropout,
            targets,
            rslora,
        } => {
            v.push(("method".into(), "LoRA".into()));
            v.push(("r".into(), r.to_string()));
            v.push(("alpha".into(), alpha.to_string()));
            v.push(("dropout".into(), dropout.to_string()));
            v.push(("targets".into(), targets.join(", ")));
            v.push(("rsLoRA".into(), rslora.to_string()));
        }
        attune_protocol::MethodSpec::Full => v.push(("method".into(), "full fine-tuning".into())),
        attune_protocol::MethodSpec::Prompt { virtual_tokens, .. } => {
            v.push(("method".into(), "prompt tuning".into()));
            v.push(("virtual tokens".into(), virtual_tokens.to_string()));
        }
    }
    v.push(("steps".into(), steps.to_string()));
    v.push(("batch size".into(), spec.batch_size.to_string()));
    v.push(("gradient accumulation".into(), spec.grad_accum.to_string()));
    v.push((
        "peak learning rate".into(),
        format!("{}", spec.lr.unwrap_or_else(|| spec.method.default_lr())),
    ));
    v.push(("warm-up steps".into(), spec.warmup_steps.to_string()));
    v.push((
        "schedule".into(),
        format!("{:?}", spec.schedule).to_lowercase(),
    ));
    v.push(("weight decay".into(), spec.weight_decay.to_string()));
    v.push(("max grad norm".into(), spec.max_grad_norm.to_string()));
    v.push(("max length".into(), spec.max_len.to_string()));
    v.push((
        "loss on".into(),
        format!("{:?}", spec.loss_on).to_lowercase(),
    ));
    v.push(("packing".into(), spec.pack.to_string()));
    v.push(("seed".into(), spec.seed.to_string()));
    v
}

/// What a Modelfile names, for import: the weights, an adapter, the template, the system
/// prompt and the parameters, with how its TEMPLATE compares with the weights' own template.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelfileImport {
    pub model: crate::AddOutcome,
    pub adapter: Option<attune_protocol::AdapterSummary>,
    pub system: Option<String>,
    pub parameters: Vec<(String, String)>,
    /// The TEMPLATE against the model's own chat template, in words.
    pub template_note: Option<String>,
}

impl Engine {
    /// Imports what an Ollama Modelfile describes: FROM (a GGUF file or model folder) is
    /// registered as a model; ADAPTER (an adapter GGUF) is converted to PEFT and imported as
    /// an adapter of that model; TEMPLATE is parsed and compared with the model's own chat
    /// template (which Attune keeps using); SYSTEM and PARAMETERs are returned.
    pub fn import_modelfile(
        &self,
        path: &Path,
        adapter_name: Option<&str>,
    ) -> Result<ModelfileImport, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let info = ollama::check(&text, dir).map_err(|e| {
            EngineError::InvalidInput(format!(
                "{}: {}",
                path.display(),
                e.to_string().replace("invalid generation settings: ", "")
            ))
        })?;
        let from = info.from_path.clone().ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "{}: FROM {} is not a file or folder on this machine (Ollama would pull a model \
                 of that name; Attune imports local weights only)",
                path.display(),
                info.from
            ))
        })?;
        let model = self.add_local_model(&from)?;
        let loaded = load_f32(Path::new(match &model.model.source {
            attune_protocol::ModelSource::Local { path } => path,
            attune_protocol::ModelSource::Hub { path, .. } => path,
        }))?;
        let template_note = match &info.template {
            None => None,
            Some(t) => Some(match attune_models::export::gotmpl::Template::parse(t) {
                Err(e) => format!("TEMPLATE does not parse: {e}"),
                Ok(go) => match ollama::compare_templates(&loaded.chat_template, &go) {
                    Ok(None) => "TEMPLATE renders the same text as the model's own chat template".into(),
                    Ok(Some(d)) => format!(
                        "TEMPLATE differs from the model's own chat template, which Attune uses: {d}"
                    ),
                    Err(e) => format!("TEMPLATE cannot be rendered: {e}"),
                },
            }),
        };
        let adapter = match &info.adapter {
            None => None,
            Some(a) => Some(self.import_lora_gguf(
                a,
                &model.model.id.to_string(),
                &loaded,
                adapter_name,
            )?),
        };
        Ok(ModelfileImport {
            model,
            adapter,
            system: info.system,
            parameters: info.parameters,
            template_note,
        })
    }

    /// Imports an adapter GGUF (llama.cpp's LoRA format) as a PEFT adapter of `base`.
    pub fn import_adapter_gguf(
        &self,
        file: &Path,
        base: &str,
        name: Option<&str>,
    ) -> Result<attune_protocol::AdapterSummary, EngineError> {
        let m = self.find_model(base)?;
        let row = self
            .store
            .get_model(m.id)?
            .ok_or_else(|| EngineError::ModelNotFound(base.to_string()))?;
        let loaded = load_f32(Path::new(&row.path))?;
        self.import_lora_gguf(file, &m.id.to_string(), &loaded, name)
    }

    fn import_lora_gguf(
        &self,
        file: &Path,
        base_id: &str,
        base: &LoadedModel,
        name: Option<&str>,
    ) -> Result<attune_protocol::AdapterSummary, EngineError> {
        let bad = |e: attune_models::Error| EngineError::InvalidAdapter {
            path: file.to_path_buf(),
            reason: e.to_string(),
        };
        let read = lora_gguf::read(file, &base.config).map_err(bad)?;
        // PEFT's writer takes the branches attached to a model (and checks every shape).
        let mut probe = base.model.clone();
        peft::apply_lora(&mut probe, &read.config, &read.tensors).map_err(bad)?;
        let tmp = std::env::temp_dir().join(format!(
            "attune-lora-gguf-{}-{}",
            std::process::id(),
            crate::clock::now_rfc3339().replace(':', "")
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let res = peft::save_lora(&probe, &read.config, base_id, &tmp)
            .map_err(bad)
            .and_then(|()| {
                let default_name = file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "adapter".into());
                let n = name
                    .map(str::to_string)
                    .or(read.name.clone())
                    .unwrap_or(default_name);
                self.import_adapter(&tmp, base_id, Some(&n))
            });
        let _ = std::fs::remove_dir_all(&tmp);
        res
    }
}

/// Messages of the fixed check prompt set, for outside checks (the Python and llama.cpp
/// scripts render and compare the same prompts).
pub fn check_prompts() -> Vec<Vec<Message>> {
    verify::prompt_set()
}
