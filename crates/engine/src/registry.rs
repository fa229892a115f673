//! The model registry: turns a model file or folder into a library row (inspect,
//! hash the weights, insert once) and library rows into protocol summaries.

use std::io::Read;
use std::path::{Path, PathBuf};

use attune_protocol::{ModelFormat, ModelSource, ModelSummary};
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
    Ok(ModelSummary {
        id: row.id,
        name: row.name.clone(),
        architecture: row.architecture.clone(),
        format,
        parameters: unsigned("parameters", row.parameters)?,
        quantization: row.quantization.clone(),
        context_length: unsigned("context_length", row.context_length)?,
        file_size: unsigned("file_size", row.file_size)?,
        sha256: row.sha256.clone(),
        source,
        added_at: row.added_at.clone(),
    })
}
