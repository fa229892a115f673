//! Adapters in the library: what runs produce and what is imported. LoRA and prompt
//! adapters are PEFT folders (`adapter_config.json` + `adapter_model.safetensors`), full
//! fine-tunes are Hugging Face model folders (weights + tokenizer + chat template). Each
//! lives under `<data_dir>/adapters/<name>/`, written to a temporary folder and renamed.
//!
//! Chat with an adapter keeps the base model cache untouched: the adapted model is a
//! clone of the base (tensors are shared, only the LoRA branches differ) kept in its own
//! cache of the [`ADAPTED_CACHE_SIZE`] most recently used adapters, so side-by-side panes
//! and arenas that alternate between adapters do not reload them for every message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use attune_models::chat_template::ChatTemplate;
use attune_models::llama::Llama;
use attune_models::loader::{ComputeMode, LoadOptions, LoadedModel};
use attune_models::tokenizer::Tok;
use attune_models::train::peft::{self, Adapter};
use attune_protocol::{AdapterKind, AdapterMetrics, AdapterSummary, ChatEvent, ModelSummary};

use crate::error::EngineError;
use crate::store::AdapterRow;
use crate::{AddOutcome, Engine};

/// A model ready to generate with an adapter applied.
pub(crate) struct AdaptedModel {
    pub model: Llama,
    pub tokenizer: Tok,
    pub chat_template: ChatTemplate,
    /// The soft prompt of a prompt-tuning adapter, `[n, hidden]`.
    pub prefix: Option<candle_core::Tensor>,
}

/// How many adapted models stay loaded.
pub(crate) const ADAPTED_CACHE_SIZE: usize = 3;

/// The adapted models kept loaded, least recently used first.
#[derive(Default)]
pub(crate) struct AdaptedCache {
    entries: Vec<(i64, Arc<AdaptedModel>)>,
}

impl AdaptedCache {
    /// Adapter `id`'s model, now the most recently used.
    pub fn get(&mut self, id: i64) -> Option<Arc<AdaptedModel>> {
        let pos = self.entries.iter().position(|(k, _)| *k == id)?;
        let entry = self.entries.remove(pos);
        let model = Arc::clone(&entry.1);
        self.entries.push(entry);
        Some(model)
    }

    /// Drops the least recently used models until one more fits (before loading it).
    pub fn make_room(&mut self) {
        while self.entries.len() >= ADAPTED_CACHE_SIZE {
            self.entries.remove(0);
        }
    }

    /// Keeps `model` as adapter `id`'s, the most recently used.
    pub fn insert(&mut self, id: i64, model: Arc<AdaptedModel>) {
        self.remove(id);
        self.make_room();
        self.entries.push((id, model));
    }

    /// Forgets adapter `id` (removed from the library).
    pub fn remove(&mut self, id: i64) {
        self.entries.retain(|(k, _)| *k != id);
    }

    /// The cached adapter ids, least recently used first.
    #[cfg(test)]
    pub fn ids(&self) -> Vec<i64> {
        self.entries.iter().map(|(k, _)| *k).collect()
    }
}

/// Writes `model` as a Hugging Face folder that `loader::load` and transformers read:
/// `config.json`, `model.safetensors`, `tokenizer.json` and `tokenizer_config.json`
/// (with the chat template and the special tokens).
pub(crate) fn save_hf_folder(
    model: &Llama,
    tok: &Tok,
    tmpl: &ChatTemplate,
    dir: &Path,
) -> attune_models::Result<()> {
    attune_models::hf::save(model, dir, None)?;
    let tj = dir.join("tokenizer.json");
    tok.inner()
        .save(&tj, false)
        .map_err(|e| attune_models::Error::io(&tj, std::io::Error::other(e.to_string())))?;
    let cfg = serde_json::json!({
        "chat_template": tmpl.source(),
        "eos_token": tok.eos_token(),
        "bos_token": tok.bos_token(),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
    });
    let cp = dir.join("tokenizer_config.json");
    std::fs::write(&cp, serde_json::to_string_pretty(&cfg).unwrap_or_default())
        .map_err(|e| attune_models::Error::io(&cp, e))
}

/// Copies the regular files of `src` into `dst` (created).
/// Writes a folder at `dst` all or nothing: `fill` writes into a temporary sibling folder, which
/// then replaces `dst`. On any error the temporary folder is removed and `dst` is untouched.
pub(crate) fn publish_dir(
    dst: &Path,
    fill: impl FnOnce(&Path) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    let parent = dst.parent().unwrap_or_else(|| Path::new("."));
    let name = dst.file_name().and_then(|n| n.to_str()).unwrap_or("folder");
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    let res = std::fs::create_dir_all(&tmp)
        .map_err(io(&tmp))
        .and_then(|()| fill(&tmp))
        .and_then(|()| {
            if dst.exists() {
                std::fs::remove_dir_all(dst).map_err(io(dst))?;
            }
            std::fs::rename(&tmp, dst).map_err(io(dst))
        });
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

fn copy_files(src: &Path, dst: &Path) -> Result<(), EngineError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for e in std::fs::read_dir(src).map_err(io(src))? {
        let e = e.map_err(io(src))?;
        let p = e.path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(e.file_name())).map_err(io(&p))?;
        }
    }
    Ok(())
}

fn load_f32(name: &str, path: &Path) -> Result<LoadedModel, EngineError> {
    attune_models::loader::load(
        path,
        &LoadOptions {
            compute: ComputeMode::F32,
        },
    )
    .map_err(|source| EngineError::ModelLoad {
        name: name.to_string(),
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

impl Engine {
    fn adapter_summary(&self, a: &AdapterRow) -> Result<AdapterSummary, EngineError> {
        let db = self.store.path();
        Ok(AdapterSummary {
            id: a.id,
            name: a.name.clone(),
            kind: AdapterKind::parse(&a.kind).ok_or_else(|| {
                EngineError::db(
                    db,
                    format!("adapter id {}: invalid kind '{}'", a.id, a.kind),
                )
            })?,
            base_model_id: a.base_model_id,
            base_model: self
                .store
                .get_model(a.base_model_id)?
                .map(|m| m.name)
                .unwrap_or_default(),
            run_id: a.run_id,
            dataset_id: a.dataset_id,
            path: a.path.clone(),
            created_at: a.created_at.clone(),
            metrics: serde_json::from_str::<AdapterMetrics>(&a.metrics_json).unwrap_or_default(),
        })
    }

    pub(crate) fn adapter_row(&self, id_or_name: &str) -> Result<AdapterRow, EngineError> {
        let key = id_or_name.trim();
        if let Some(a) = self.store.find_adapter_by_name(key)? {
            return Ok(a);
        }
        if let Ok(id) = key.parse::<i64>() {
            if let Some(a) = self.store.get_adapter(id)? {
                return Ok(a);
            }
        }
        Err(EngineError::AdapterNotFound(key.to_string()))
    }

    /// All adapters, oldest first.
    pub fn list_adapters(&self) -> Result<Vec<AdapterSummary>, EngineError> {
        self.store
            .list_adapters()?
            .iter()
            .map(|a| self.adapter_summary(a))
            .collect()
    }

    /// An adapter by name, else by id.
    pub fn find_adapter(&self, id_or_name: &str) -> Result<AdapterSummary, EngineError> {
        self.adapter_summary(&self.adapter_row(id_or_name)?)
    }

    /// Imports a PEFT LoRA or prompt-tuning folder for `base_model`, after checking every
    /// tensor against the base (errors name the key); copied into the library. A file is
    /// taken as llama.cpp's adapter GGUF and converted to PEFT.
    pub fn import_adapter(
        &self,
        dir: &Path,
        base_model: &str,
        name: Option<&str>,
    ) -> Result<AdapterSummary, EngineError> {
        if dir.is_file() {
            // Only a GGUF may stand for an adapter folder; anything else is named for what
            // it is before the base model is loaded.
            let mut magic = [0u8; 4];
            let is_gguf = std::fs::File::open(dir)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok()
                && &magic == b"GGUF";
            if !is_gguf {
                return Err(EngineError::InvalidAdapter {
                    path: dir.to_path_buf(),
                    reason: "it is a file but not a GGUF, and not a folder: an adapter is a PEFT \
                             folder (adapter_config.json and its weights) or a llama.cpp LoRA \
                             GGUF file"
                        .into(),
                });
            }
            return self.import_adapter_gguf(dir, base_model, name);
        }
        let base = self.find_model(base_model)?;
        let name = match name.map(str::trim) {
            Some("") => {
                return Err(EngineError::InvalidInput(
                    "the adapter name is empty".into(),
                ))
            }
            Some(n) => n.to_string(),
            None => dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "adapter".into()),
        };
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(EngineError::InvalidInput(format!(
                "adapter name '{name}' must not contain '/' or '\\' or start with '.'"
            )));
        }
        if self.store.find_adapter_by_name(&name)?.is_some()
            || self.store.find_run_by_name(&name)?.is_some()
        {
            return Err(EngineError::NameTaken {
                what: "an adapter or run",
                name,
            });
        }
        let kind = self.check_peft_adapter(dir, &base)?;
        let dst = self.copy_into_library(dir, &name)?;
        let row = AdapterRow {
            id: 0,
            name: name.clone(),
            kind: kind.to_string(),
            base_model_id: base.id,
            run_id: None,
            dataset_id: None,
            path: dst.to_string_lossy().into_owned(),
            created_at: crate::clock::now_rfc3339(),
            metrics_json: "{}".into(),
        };
        match self.store.insert_adapter(&row) {
            Ok(a) => self.adapter_summary(&a),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dst);
                Err(e)
            }
        }
    }

    /// Loads the PEFT folder `dir` and checks every tensor against `base` (errors name the
    /// key): a LoRA adapter must attach to the base model, a soft prompt must match its
    /// hidden size. Returns the adapter's kind ("lora" or "prompt").
    pub(crate) fn check_peft_adapter(
        &self,
        dir: &Path,
        base: &ModelSummary,
    ) -> Result<&'static str, EngineError> {
        let adapter = peft::load(dir).map_err(|e| EngineError::InvalidAdapter {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let loaded = self.model_for(base.id, &mut |_: ChatEvent| {})?;
        let invalid = |reason: String| EngineError::InvalidAdapter {
            path: dir.to_path_buf(),
            reason: format!("{reason} (base model '{}')", base.name),
        };
        match &adapter {
            Adapter::Lora {
                config, tensors, ..
            } => {
                let mut model = loaded.model.clone();
                peft::apply_lora(&mut model, config, tensors)
                    .map_err(|e| invalid(e.to_string()))?;
            }
            Adapter::Prompt { embeddings, .. } => {
                let hidden = loaded.model.config().hidden_size;
                let dims = embeddings.dims();
                if dims.len() != 2 || dims[1] != hidden {
                    return Err(invalid(format!(
                        "prompt_embeddings has shape {dims:?}, the base model needs [n, {hidden}]"
                    )));
                }
            }
        }
        Ok(adapter.kind())
    }

    /// Copies `src`'s files to `<data_dir>/adapters/<name>` through a temporary folder.
    pub(crate) fn copy_into_library(&self, src: &Path, name: &str) -> Result<PathBuf, EngineError> {
        let dst = self.data_dir.join("adapters").join(name);
        publish_dir(&dst, |tmp| copy_files(src, tmp))?;
        Ok(dst)
    }

    /// Copies the adapter's folder (PEFT layout, or a Hugging Face folder for full
    /// fine-tunes) to `dir`, which must not exist or be empty.
    pub fn export_adapter(&self, id_or_name: &str, dir: &Path) -> Result<PathBuf, EngineError> {
        let a = self.adapter_row(id_or_name)?;
        if dir.exists()
            && std::fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(EngineError::InvalidInput(format!(
                "{} exists and is not empty; choose a new folder",
                dir.display()
            )));
        }
        copy_files(Path::new(&a.path), dir)?;
        Ok(dir.to_path_buf())
    }

    /// Merges a LoRA adapter into its base model and saves the result as a Hugging Face
    /// folder (`out_dir`, default `<data_dir>/models/<name>`), registered as a model.
    /// A full fine-tune is registered as it is.
    pub fn merge_adapter(
        &self,
        id_or_name: &str,
        model_name: Option<&str>,
        out_dir: Option<&Path>,
    ) -> Result<AddOutcome, EngineError> {
        let a = self.adapter_row(id_or_name)?;
        let name = model_name.unwrap_or(&a.name).trim().to_string();
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(EngineError::InvalidInput(format!(
                "model name '{name}' is empty, contains '/' or '\\', or starts with '.'"
            )));
        }
        match a.kind.as_str() {
            "full" => {
                return crate::registry::register(
                    &self.store,
                    Path::new(&a.path),
                    crate::registry::Origin::Local,
                )
            }
            "prompt" => {
                return Err(EngineError::InvalidInput(format!(
                    "adapter '{}' is a soft prompt: it has no weights to merge (chat with it \
                     using --adapter instead)",
                    a.name
                )))
            }
            _ => {}
        }
        let base = self
            .store
            .get_model(a.base_model_id)?
            .ok_or_else(|| EngineError::ModelNotFound(a.base_model_id.to_string()))?;
        let dst = match out_dir {
            Some(d) => d.to_path_buf(),
            None => self.data_dir.join("models").join(&name),
        };
        if dst.exists() {
            return Err(EngineError::InvalidInput(format!(
                "{} exists already; choose another --name or folder",
                dst.display()
            )));
        }
        let loaded = load_f32(&base.name, Path::new(&base.path))?;
        let Adapter::Lora {
            config, tensors, ..
        } = peft::load(Path::new(&a.path)).map_err(|e| EngineError::InvalidAdapter {
            path: PathBuf::from(&a.path),
            reason: e.to_string(),
        })?
        else {
            return Err(EngineError::InvalidAdapter {
                path: PathBuf::from(&a.path),
                reason: "not a LoRA adapter".into(),
            });
        };
        let mut model = loaded.model;
        let merr = |e: attune_models::Error| EngineError::InvalidAdapter {
            path: PathBuf::from(&a.path),
            reason: e.to_string(),
        };
        peft::apply_lora(&mut model, &config, &tensors).map_err(merr)?;
        peft::merge_lora(&mut model).map_err(merr)?;
        let parent = dst.parent().unwrap_or(Path::new("."));
        let tmp = parent.join(format!(
            ".tmp-{}-{}",
            dst.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let res = save_hf_folder(&model, &loaded.tokenizer, &loaded.chat_template, &tmp)
            .map_err(merr)
            .and_then(|()| {
                std::fs::rename(&tmp, &dst).map_err(|source| EngineError::Io {
                    path: dst.clone(),
                    source,
                })
            });
        if let Err(e) = res {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let out = crate::registry::register(&self.store, &dst, crate::registry::Origin::Local);
        if out.is_err() {
            let _ = std::fs::remove_dir_all(&dst);
        }
        out
    }

    /// Removes the adapter from the library and deletes its folder.
    pub fn remove_adapter(&self, id_or_name: &str) -> Result<AdapterSummary, EngineError> {
        let a = self.adapter_row(id_or_name)?;
        let summary = self.adapter_summary(&a)?;
        self.store.delete_adapter(a.id)?;
        self.adapted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(a.id);
        let root = self.data_dir.join("adapters");
        let path = PathBuf::from(&a.path);
        if path.starts_with(&root) {
            let _ = std::fs::remove_dir_all(&path);
        }
        Ok(summary)
    }

    /// The base model (or full fine-tune) with the adapter applied, cached.
    pub(crate) fn adapted_model(
        &self,
        id_or_name: &str,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<(AdapterSummary, Arc<AdaptedModel>), EngineError> {
        let a = self.adapter_row(id_or_name)?;
        let summary = self.adapter_summary(&a)?;
        let model = self.adapted_model_of(&a, on_event)?;
        Ok((summary, model))
    }

    /// [`Engine::adapted_model`] for a stored adapter row. The cache lock is held while
    /// loading so two requests never load the same adapter twice.
    pub(crate) fn adapted_model_of(
        &self,
        a: &AdapterRow,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<Arc<AdaptedModel>, EngineError> {
        let mut cache = self.adapted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = cache.get(a.id) {
            return Ok(m);
        }
        // Free the least recently used one before loading the next.
        cache.make_room();
        let path = PathBuf::from(&a.path);
        let bad = |e: attune_models::Error| EngineError::InvalidAdapter {
            path: path.clone(),
            reason: e.to_string(),
        };
        let adapted = if a.kind == "full" {
            on_event(ChatEvent::Loading);
            let loaded = crate::chat::load(&a.name, &path)?;
            AdaptedModel {
                model: loaded.model,
                tokenizer: loaded.tokenizer,
                chat_template: loaded.chat_template,
                prefix: None,
            }
        } else {
            let base = self.model_for(a.base_model_id, on_event)?;
            let adapter = peft::load(&path).map_err(bad)?;
            let mut model = base.model.clone();
            let prefix = match adapter {
                Adapter::Lora {
                    config, tensors, ..
                } => {
                    peft::apply_lora(&mut model, &config, &tensors).map_err(bad)?;
                    None
                }
                Adapter::Prompt { embeddings, .. } => Some(embeddings),
            };
            AdaptedModel {
                model,
                tokenizer: base.tokenizer.clone(),
                chat_template: base.chat_template.clone(),
                prefix,
            }
        };
        let adapted = Arc::new(adapted);
        cache.insert(a.id, Arc::clone(&adapted));
        Ok(adapted)
    }

    /// The model summary of an adapter's base.
    pub fn adapter_base(&self, id_or_name: &str) -> Result<ModelSummary, EngineError> {
        let a = self.adapter_row(id_or_name)?;
        self.find_model(&a.base_model_id.to_string())
    }
}
