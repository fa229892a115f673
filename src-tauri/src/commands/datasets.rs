//! Dataset commands: inspect and import files, list, page through and remove
//! datasets, token statistics under a model, and CSV header names.

use super::{blocking, invalid};
use crate::AppState;
use attune_engine::Sample;
use attune_protocol::{
    DatasetPreview, DatasetStats, DatasetSummary, ImportOptions, IpcError, LossOn, PreviewRow,
    RowSample, SplitName,
};
use std::path::PathBuf;
use tauri::State;

/// Most rows one `dataset_rows` call returns.
pub const MAX_PAGE: usize = 500;

/// The dataset file `path` (and the split files the options name) if the user granted them.
fn file_path(
    state: &AppState,
    path: &str,
    options: Option<&ImportOptions>,
) -> Result<PathBuf, IpcError> {
    let path = path.trim();
    if path.is_empty() {
        return Err(invalid("path: give the path of a dataset file"));
    }
    if let Some(attune_protocol::Split::Files {
        valid_path,
        test_path,
    }) = options.map(|o| &o.split)
    {
        for p in [valid_path, test_path].into_iter().flatten() {
            state.scope.readable(&super::user_path(p))?;
        }
    }
    state.scope.readable(&super::user_path(path))
}

/// What importing `path` with `options` would give; writes nothing.
#[tauri::command]
pub async fn inspect_dataset(
    state: State<'_, AppState>,
    path: String,
    options: ImportOptions,
) -> Result<DatasetPreview, IpcError> {
    let engine = state.engine()?;
    let path = file_path(&state, &path, Some(&options))?;
    blocking(move || {
        engine
            .inspect_dataset(&path, &options)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Imports `path` (skipping bad rows only when `options.accept_bad_rows`).
#[tauri::command]
pub async fn import_dataset(
    state: State<'_, AppState>,
    path: String,
    options: ImportOptions,
) -> Result<DatasetSummary, IpcError> {
    let engine = state.engine()?;
    let path = file_path(&state, &path, Some(&options))?;
    blocking(move || {
        engine
            .import_dataset(&path, &options)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// All datasets, oldest first.
#[tauri::command]
pub async fn list_datasets(state: State<'_, AppState>) -> Result<Vec<DatasetSummary>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_datasets().map_err(|e| IpcError::from(&e))).await
}

/// Removes a dataset (never its source file); refused while runs use it.
#[tauri::command]
pub async fn remove_dataset(state: State<'_, AppState>, id: i64) -> Result<(), IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.remove_dataset(id).map_err(|e| IpcError::from(&e))).await
}

/// Rows `offset..offset+limit` of a split, in stored order (`line` is the row's
/// 1-based position in the split); at most [`MAX_PAGE`] rows.
#[tauri::command]
pub async fn dataset_rows(
    state: State<'_, AppState>,
    id: i64,
    split: SplitName,
    offset: usize,
    limit: usize,
) -> Result<Vec<PreviewRow>, IpcError> {
    let engine = state.engine()?;
    if limit > MAX_PAGE {
        return Err(invalid(format!(
            "limit: at most {MAX_PAGE} rows per page, got {limit}"
        )));
    }
    blocking(move || {
        let rows = engine
            .dataset_rows(id, split)
            .map_err(|e| IpcError::from(&e))?;
        Ok(page(rows, offset, limit))
    })
    .await
}

/// The rows of one page as previews.
fn page(rows: Vec<attune_engine::DatasetRow>, offset: usize, limit: usize) -> Vec<PreviewRow> {
    rows.into_iter()
        .enumerate()
        .skip(offset)
        .take(limit)
        .map(|(i, r)| PreviewRow {
            line: i as u64 + 1,
            source_id: r.source_id,
            label: r.label,
            sample: match r.sample {
                Sample::Chat(messages) => RowSample::Chat { messages },
                Sample::Text(text) => RowSample::Text { text },
            },
        })
        .collect()
}

/// Token statistics of every split under a model (loads the model's tokenizer).
#[tauri::command]
pub async fn dataset_stats(
    state: State<'_, AppState>,
    dataset_id: i64,
    model_id: i64,
    max_len: usize,
    loss_on: LossOn,
) -> Result<DatasetStats, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .dataset_stats(dataset_id, model_id, max_len, loss_on)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// The header names of a CSV/TSV file, to map its columns.
#[tauri::command]
pub async fn csv_headers(
    state: State<'_, AppState>,
    path: String,
) -> Result<Vec<String>, IpcError> {
    let engine = state.engine()?;
    let path = file_path(&state, &path, None)?;
    blocking(move || engine.csv_headers(&path).map_err(|e| IpcError::from(&e))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use attune_engine::DatasetRow;

    #[test]
    fn pages_number_rows_from_one_and_stop_at_the_end() {
        let rows: Vec<DatasetRow> = (0..5)
            .map(|i| DatasetRow {
                source_id: Some(format!("r{i}")),
                sample: Sample::Text(format!("doc {i}")),
                label: None,
            })
            .collect();
        let p = page(rows.clone(), 3, 10);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].line, 4);
        assert_eq!(p[0].source_id.as_deref(), Some("r3"));
        assert!(page(rows, 9, 10).is_empty());
    }
}
