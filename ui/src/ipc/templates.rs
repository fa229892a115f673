//! Mirrors `src-tauri/src/commands/templates.rs`: versioned prompt templates.

use super::invoke;
use attune_protocol::{IpcError, TemplateDraft, TemplatePreview, TemplateRecord};
use serde_json::json;
use std::collections::BTreeMap;

/// Every template at its newest version.
pub async fn list_templates() -> Result<Vec<TemplateRecord>, IpcError> {
    invoke("list_templates", &json!({})).await
}

/// Every version of a template, newest first.
pub async fn template_versions(id: i64) -> Result<Vec<TemplateRecord>, IpcError> {
    invoke("template_versions", &json!({ "id": id })).await
}

/// Creates a template or adds a version; returns the version stored.
pub async fn save_template(draft: &TemplateDraft) -> Result<TemplateRecord, IpcError> {
    invoke("save_template", &json!({ "draft": draft })).await
}

pub async fn remove_template(id: i64) -> Result<(), IpcError> {
    invoke("remove_template", &json!({ "id": id })).await
}

/// The exact text `model_id` receives for `draft` and `message`.
pub async fn preview_template(
    model_id: i64,
    draft: &TemplateDraft,
    message: &str,
    values: &BTreeMap<String, String>,
) -> Result<TemplatePreview, IpcError> {
    invoke(
        "preview_template",
        &json!({ "modelId": model_id, "draft": draft, "message": message, "values": values }),
    )
    .await
}

/// The request an API model receives for `draft` and `message`: a JSON body whose
/// `messages` the endpoint runs through its own chat template.
pub async fn preview_template_for_endpoint(
    endpoint: &attune_protocol::EndpointModel,
    draft: &TemplateDraft,
    message: &str,
    values: &BTreeMap<String, String>,
) -> Result<TemplatePreview, IpcError> {
    invoke(
        "preview_template_for_endpoint",
        &json!({ "endpoint": endpoint, "draft": draft, "message": message, "values": values }),
    )
    .await
}
