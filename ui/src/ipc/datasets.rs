//! Mirrors `src-tauri/src/commands/datasets.rs`: inspect, import, browse datasets.

use super::invoke;
use attune_protocol::{
    DatasetPreview, DatasetStats, DatasetSummary, ImportOptions, IpcError, LossOn, PreviewRow,
    RowSample, SplitName,
};
use serde_json::json;

/// What importing `path` with `options` would give; writes nothing.
pub async fn inspect_dataset(
    path: &str,
    options: &ImportOptions,
) -> Result<DatasetPreview, IpcError> {
    super::invoke_granted(
        "inspect_dataset",
        &json!({ "path": path, "options": options }),
        false,
    )
    .await
}

/// Imports `path` (with bad rows, only when `options.accept_bad_rows`).
pub async fn import_dataset(
    path: &str,
    options: &ImportOptions,
) -> Result<DatasetSummary, IpcError> {
    super::invoke_granted(
        "import_dataset",
        &json!({ "path": path, "options": options }),
        false,
    )
    .await
}

/// The exact text `model_id` receives for a row (chat template applied).
pub async fn render_sample(model_id: i64, sample: &RowSample) -> Result<String, IpcError> {
    invoke(
        "render_sample",
        &json!({ "modelId": model_id, "sample": sample }),
    )
    .await
}

pub async fn list_datasets() -> Result<Vec<DatasetSummary>, IpcError> {
    invoke("list_datasets", &json!({})).await
}

/// Refused while runs use it.
pub async fn remove_dataset(id: i64) -> Result<(), IpcError> {
    invoke("remove_dataset", &json!({ "id": id })).await
}

/// Rows `offset..offset+limit` of a split, in stored order.
pub async fn dataset_rows(
    id: i64,
    split: SplitName,
    offset: usize,
    limit: usize,
) -> Result<Vec<PreviewRow>, IpcError> {
    invoke(
        "dataset_rows",
        &json!({ "id": id, "split": split, "offset": offset, "limit": limit }),
    )
    .await
}

/// Token statistics of every split under a model.
pub async fn dataset_stats(
    dataset_id: i64,
    model_id: i64,
    max_len: usize,
    loss_on: LossOn,
) -> Result<DatasetStats, IpcError> {
    invoke(
        "dataset_stats",
        &json!({ "datasetId": dataset_id, "modelId": model_id, "maxLen": max_len, "lossOn": loss_on }),
    )
    .await
}

/// The header names of a CSV/TSV file, to map its columns when the guess failed.
pub async fn csv_headers(path: &str) -> Result<Vec<String>, IpcError> {
    super::invoke_granted("csv_headers", &json!({ "path": path }), false).await
}
