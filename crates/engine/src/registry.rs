//! The model registry: turns a model file or folder into a library row (inspect,
//! hash the weights, insert once) and library rows into protocol summaries.

use std::io::Read;
use std::path::{Path, PathBuf};

use attune_protocol::{ModelFormat, ModelSource, ModelSummary, ModelSupport};
use sha2::{Digest, Sha256};

use crate::error::EngineError;
use crate::store::{ModelRow, NewModel, Store};
use crate::AddOutcome;

/// Where a model being registered came from.
pub(crate) enum Origin<'a> {
    Local,
    Hub { repo: &'a str, revision: &'a str },
}

/// Inspects `path`, hashes its weight files and inserts it (once per sha256).
/// Nothing is written when the file is not a usable model.
pub(crate) fn register(
    store: &Store,
    path: &Path,
    origin: Origin<'_>,
) -> Result<AddOutcome, EngineError> {
    let io = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A local path is canonicalised; a Hub path stays inside the cache's snapshot
    // folder (its files are symlinks to blobs that a newer revision may replace).
    let path = match origin {
        Origin::Local => std::fs::canonicalize(path).map_err(io)?,
        Origin::Hub { .. } => std::path::absolute(path).map_err(io)?,
    };
    let info =
        attune_models::inspect::inspect(&path).map_err(|source| EngineError::InvalidModel {
            path: path.clone(),
            source: Box::new(source),
        })?;
    // Refuse now what would fail at first use: an unsupported architecture, a missing
    // tokenizer, a chat template that does not compile or render.
    attune_models::loader::check(&path).map_err(|source| EngineError::InvalidModel {
        path: path.clone(),
        source: Box::new(source),
    })?;
    if info.files.is_empty() {
        return Err(EngineError::InvalidModel {
            path: path.clone(),
            source: Box::new(attune_models::Error::format(
                &path,
                "model",
                "no weight files found",
            )),
        });
    }
    let sha256 = hash_files(&info.files)?;
    let path_str = path
        .to_str()
        .ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "model path {} is not valid UTF-8; rename it",
                path.display()
            ))
        })?
        .to_string();
    let (source_kind, source_repo, source_revision) = match origin {
        Origin::Local => ("local", None, None),
        Origin::Hub { repo, revision } => {
            ("hub", Some(repo.to_string()), Some(revision.to_string()))
        }
    };
    let new = NewModel {
        name: if info.name.trim().is_empty() {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".to_string())
        } else {
            info.name.trim().to_string()
        },
        architecture: info.architecture,
        format: match info.format {
            attune_models::inspect::ModelFormat::Gguf => "gguf",
            attune_models::inspect::ModelFormat::Safetensors => "safetensors",
        }
        .to_string(),
        parameters: to_i64(info.parameters, "parameters")?,
        quantization: info.quantization,
        context_length: to_i64(info.context_length, "context_length")?,
        file_size: to_i64(info.file_size, "file_size")?,
        sha256,
        path: path_str,
        source_kind: source_kind.to_string(),
        source_repo,
        source_revision,
        added_at: crate::clock::now_rfc3339(),
    };
    let (row, already_present) = store.insert_model(&new)?;
    Ok(AddOutcome {
        model: summary(&row, store.path())?,
        already_present,
    })
}

fn to_i64(v: u64, field: &str) -> Result<i64, EngineError> {
    i64::try_from(v)
        .map_err(|_| EngineError::InvalidInput(format!("{field} = {v} is out of range")))
}

/// SHA-256 over the weight files, in the given order, streamed with a 1 MiB buffer.
/// For a single file this equals `sha256sum <file>`.
pub(crate) fn hash_files(files: &[PathBuf]) -> Result<String, EngineError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for file in files {
        let io = |source| EngineError::Io {
            path: file.clone(),
            source,
        };
        let mut f = attune_models::fsio::open_regular(file).map_err(|e| match e {
            attune_models::Error::Io { source, .. } => io(source),
            other => io(std::io::Error::other(other.to_string())),
        })?;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            };
            hasher.update(&buf[..n]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The protocol view of a stored row. A row that violates the schema's invariants
/// (edited by hand) is reported as a database error naming the field.
pub(crate) fn summary(row: &ModelRow, db: &Path) -> Result<ModelSummary, EngineError> {
    let bad = |field: &str, value: &str| {
        EngineError::db(
            db,
            format!("model id {}: invalid {field} '{value}'", row.id),
        )
    };
    let format = match row.format.as_str() {
        "gguf" => ModelFormat::Gguf,
        "safetensors" => ModelFormat::Safetensors,
        other => return Err(bad("format", other)),
    };
    let source = match (
        row.source_kind.as_str(),
        &row.source_repo,
        &row.source_revision,
    ) {
        ("local", _, _) => ModelSource::Local {
            path: row.path.clone(),
        },
        ("hub", Some(repo), Some(revision)) => ModelSource::Hub {
            repo: repo.clone(),
            revision: revision.clone(),
            path: row.path.clone(),
        },
        (other, _, _) => return Err(bad("source_kind", other)),
    };
    let unsigned = |field: &str, v: i64| u64::try_from(v).map_err(|_| bad(field, &v.to_string()));
    let parameters = unsigned("parameters", row.parameters)?;
    let file_size = unsigned("file_size", row.file_size)?;
    let memory_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| crate::runs::meminfo_field(&t, "MemTotal:"));
    let (family, support) = support(
        &row.architecture,
        parameters,
        file_size,
        format,
        memory_total,
    );
    Ok(ModelSummary {
        id: row.id,
        name: row.name.clone(),
        architecture: row.architecture.clone(),
        format,
        parameters,
        quantization: row.quantization.clone(),
        context_length: unsigned("context_length", row.context_length)?,
        file_size,
        sha256: row.sha256.clone(),
        source,
        added_at: row.added_at.clone(),
        family,
        support,
    })
}

/// Runtime overhead beside the weights (tokenizer, buffers, the app), as the run estimate.
const OVERHEAD: u64 = 300 << 20;

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// The family of a model of `architecture` and what Attune can do with it on a machine with
/// `memory_total` bytes (`None`: unknown, everything is taken to fit). Chatting keeps the stored
/// weights and an f32 copy for prompts; LoRA and soft prompts train on an f32 copy (the
/// gradients of a few extra weights aside); full fine-tuning also keeps a gradient and AdamW's
/// two moments per weight, 16 bytes in all. These are floors: a run's own estimate (batch,
/// length) is checked again when it starts.
pub(crate) fn support(
    architecture: &str,
    parameters: u64,
    file_size: u64,
    format: ModelFormat,
    memory_total: Option<u64>,
) -> (String, ModelSupport) {
    use attune_models::config::{Family, SUPPORTED_ARCHITECTURES};
    let Some(family) = Family::from_architecture(architecture) else {
        return (
            architecture.to_string(),
            ModelSupport {
                chat: false,
                methods: Vec::new(),
                lora_targets: Vec::new(),
                limits: vec![format!(
                    "Attune does not run the '{architecture}' architecture (it runs {}): it can \
                     stay in the library but cannot be loaded.",
                    SUPPORTED_ARCHITECTURES.join(", ")
                )],
            },
        );
    };
    let f32_weights = 4 * parameters;
    let stored = match format {
        ModelFormat::Gguf => file_size,
        ModelFormat::Safetensors => 0,
    };
    let here = |need: u64| memory_total.is_none_or(|m| need <= m);
    let total = memory_total.map(gb).unwrap_or_default();
    let mut limits = Vec::new();
    let chat_need = stored + f32_weights + OVERHEAD;
    let chat = here(chat_need);
    if !chat {
        limits.push(format!(
            "Answering keeps an f32 copy of the weights for prompts beside the file: about {}, \
             more than this machine's {total} of memory.",
            gb(chat_need)
        ));
    }
    let mut methods = Vec::new();
    let adapter_need = f32_weights + OVERHEAD;
    // LoRA and soft prompts on the base held compact: the file's blocks (GGUF), else bf16.
    let compact_need = match format {
        ModelFormat::Gguf => {
            (stored as f64 * crate::runs::QUANTIZED_BASE_BYTES_PER_FILE_BYTE) as u64 + OVERHEAD
        }
        ModelFormat::Safetensors => 2 * parameters + OVERHEAD,
    };
    let compact_words = match format {
        ModelFormat::Gguf => "in its quantized blocks",
        ModelFormat::Safetensors => "in bf16",
    };
    if here(adapter_need) {
        methods.push("lora".to_string());
        methods.push("prompt".to_string());
    } else if here(compact_need) {
        methods.push("lora".to_string());
        methods.push("prompt".to_string());
        limits.push(format!(
            "LoRA and soft prompts fit with the base held {compact_words} (about {}), not on an \
             f32 copy ({}, more than this machine's {total}).",
            gb(compact_need),
            gb(adapter_need)
        ));
    } else {
        limits.push(format!(
            "LoRA and soft prompts need at least {} even with the base held {compact_words}, \
             more than this machine's {total} of memory.",
            gb(compact_need)
        ));
    }
    let full_need = 16 * parameters + OVERHEAD;
    if here(full_need) {
        methods.push("full".to_string());
    } else {
        limits.push(format!(
            "Full fine-tuning keeps the weights, their gradients and AdamW's two moments in f32: \
             at least {}, more than this machine's {total} of memory.",
            gb(full_need)
        ));
    }
    (
        family.display_name().to_string(),
        ModelSupport {
            chat,
            methods,
            lora_targets: family
                .lora_targets()
                .iter()
                .map(|t| t.to_string())
                .collect(),
            limits,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn support_names_the_family_and_why_a_method_does_not_fit() {
        let gib = 1u64 << 30;
        // Qwen3-1.7B as Q4_K_M on a 16 GB laptop: chat, LoRA and soft prompts, not full
        // fine-tuning (16 bytes per weight).
        let (family, s) = support(
            "qwen3",
            1_700_000_000,
            1_100_000_000,
            ModelFormat::Gguf,
            Some(16 * gib),
        );
        assert_eq!(family, "Qwen3");
        assert!(s.chat);
        assert_eq!(s.methods, ["lora", "prompt"]);
        assert_eq!(s.limits.len(), 1);
        assert!(
            s.limits[0].contains("Full fine-tuning") && s.limits[0].contains("27.5 GB"),
            "{:?}",
            s.limits
        );
        // Phi-3's LoRA targets are its fused projections; Phi-3.5-mini on 48 GiB: full
        // fine-tuning needs 16 x 3.8e9 bytes.
        let (family, s) = support(
            "phi3",
            3_800_000_000,
            2_400_000_000,
            ModelFormat::Gguf,
            Some(48 * gib),
        );
        assert_eq!(family, "Phi-3");
        assert_eq!(
            s.lora_targets,
            ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        );
        assert_eq!(s.methods, ["lora", "prompt"]);
        // Too small for anything: it says so for chat and training.
        let (_, s) = support(
            "gemma3",
            1_000_000_000,
            800_000_000,
            ModelFormat::Gguf,
            Some(gib),
        );
        assert!(!s.chat && s.methods.is_empty());
        assert_eq!(s.limits.len(), 3);
        // Llama-3.2-3B as Q4_K_M (2.0 GB) on an 8 GiB laptop: an f32 copy (12.8 GB) does not
        // fit, the base in its quantized blocks does.
        let (_, s) = support(
            "llama",
            3_200_000_000,
            2_000_000_000,
            ModelFormat::Gguf,
            Some(8 * gib),
        );
        assert_eq!(s.methods, ["lora", "prompt"]);
        assert!(
            s.limits
                .iter()
                .any(|l| l.contains("held in its quantized blocks")),
            "{:?}",
            s.limits
        );
        // Unknown memory: everything is taken to fit.
        let (_, s) = support("llama", 135_000_000, 92_000_000, ModelFormat::Gguf, None);
        assert!(s.chat && s.methods.len() == 3 && s.limits.is_empty());
        // An architecture Attune does not run.
        let (family, s) = support(
            "gemma2",
            2_000_000_000,
            1,
            ModelFormat::Gguf,
            Some(64 * gib),
        );
        assert_eq!(family, "gemma2");
        assert!(!s.chat && s.methods.is_empty());
        assert!(
            s.limits[0].contains("does not run the 'gemma2' architecture"),
            "{:?}",
            s.limits
        );
    }
}
