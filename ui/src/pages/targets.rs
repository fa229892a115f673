//! Who answers: the target picker shared by the playground panes and the arena
//! candidates. It offers every base model, every adapter (LoRA, soft prompt, full
//! fine-tune, named with its base), every model of every remote API endpoint, and every
//! stored template on every model (local or remote), and encodes the choice as a stable
//! key ("base:1", "adapter:4", "template:1:7", "endpoint:2:gpt-4o-mini",
//! "template-endpoint:2:7:gpt-4o-mini") so a native `<select>` can carry it.

use crate::components::error_note;
use crate::{ipc, AppCtx};
use attune_protocol::{
    AdapterKind, AdapterSummary, ChatTarget, EndpointModel, EndpointSummary, IpcError,
    ModelSummary, TemplateRecord,
};
use leptos::prelude::*;
use leptos::task::spawn_local;
use std::collections::BTreeMap;

/// One choice in the picker.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetOption {
    /// The `<option>` value ([`target_key`] of `target`).
    pub key: String,
    pub label: String,
    pub target: ChatTarget,
}

/// A labelled group of choices (`<optgroup>`).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetGroup {
    pub label: &'static str,
    pub options: Vec<TargetOption>,
}

/// The stable key of a target; variable values are not part of it.
pub fn target_key(target: &ChatTarget) -> String {
    match target {
        ChatTarget::Base { model_id } => format!("base:{model_id}"),
        ChatTarget::Adapter { adapter_id } => format!("adapter:{adapter_id}"),
        ChatTarget::Template {
            template_id,
            endpoint: Some(e),
            ..
        } => format!(
            "template-endpoint:{}:{template_id}:{}",
            e.endpoint_id, e.model
        ),
        ChatTarget::Template {
            model_id,
            template_id,
            ..
        } => format!("template:{model_id}:{template_id}"),
        ChatTarget::Endpoint { endpoint_id, model } => format!("endpoint:{endpoint_id}:{model}"),
    }
}

/// The target a key stands for (a template at its newest version), or None when the
/// key is malformed.
pub fn parse_target_key(key: &str) -> Option<ChatTarget> {
    // Remote model ids may hold ':' themselves ("llama3:8b"): they come last.
    if let Some(rest) = key.strip_prefix("endpoint:") {
        let (id, model) = rest.split_once(':')?;
        if model.is_empty() {
            return None;
        }
        return Some(ChatTarget::Endpoint {
            endpoint_id: id.parse().ok()?,
            model: model.to_string(),
        });
    }
    if let Some(rest) = key.strip_prefix("template-endpoint:") {
        let mut p = rest.splitn(3, ':');
        let endpoint_id = p.next()?.parse().ok()?;
        let template_id = p.next()?.parse().ok()?;
        let model = p.next().filter(|m| !m.is_empty())?.to_string();
        return Some(ChatTarget::Template {
            model_id: 0,
            template_id,
            version: None,
            values: BTreeMap::new(),
            endpoint: Some(EndpointModel { endpoint_id, model }),
        });
    }
    let mut parts = key.split(':');
    let kind = parts.next()?;
    let first: i64 = parts.next()?.parse().ok()?;
    let target = match kind {
        "base" => ChatTarget::Base { model_id: first },
        "adapter" => ChatTarget::Adapter { adapter_id: first },
        "template" => ChatTarget::Template {
            model_id: first,
            template_id: parts.next()?.parse().ok()?,
            version: None,
            values: BTreeMap::new(),
            endpoint: None,
        },
        _ => return None,
    };
    parts.next().is_none().then_some(target)
}

/// How an adapter kind reads in the picker.
pub fn kind_label(kind: AdapterKind) -> &'static str {
    match kind {
        AdapterKind::Lora => "LoRA",
        AdapterKind::Prompt => "soft prompt",
        AdapterKind::Full => "full fine-tune",
    }
}

/// Every choice, grouped: base models, adapters, remote endpoints' models, then
/// templates on each model.
pub fn build_groups(
    models: &[ModelSummary],
    adapters: &[AdapterSummary],
    templates: &[TemplateRecord],
    endpoints: &[EndpointSummary],
) -> Vec<TargetGroup> {
    let base = models
        .iter()
        .map(|m| {
            let target = ChatTarget::Base { model_id: m.id };
            TargetOption {
                key: target_key(&target),
                label: format!("{} (base)", m.name),
                target,
            }
        })
        .collect();
    let adapter = adapters
        .iter()
        .map(|a| {
            let target = ChatTarget::Adapter { adapter_id: a.id };
            TargetOption {
                key: target_key(&target),
                label: format!("{} · {} on {}", a.name, kind_label(a.kind), a.base_model),
                target,
            }
        })
        .collect();
    let template = templates
        .iter()
        .flat_map(|t| {
            models.iter().map(move |m| {
                let target = ChatTarget::Template {
                    model_id: m.id,
                    template_id: t.id,
                    version: None,
                    values: BTreeMap::new(),
                    endpoint: None,
                };
                TargetOption {
                    key: target_key(&target),
                    label: format!("{} (template v{}) on {}", t.name, t.version, m.name),
                    target,
                }
            })
        })
        .collect();
    let remote_models: Vec<(&EndpointSummary, &String)> = endpoints
        .iter()
        .flat_map(|e| e.models.iter().map(move |m| (e, m)))
        .collect();
    let remote = remote_models
        .iter()
        .map(|(e, m)| {
            let target = ChatTarget::Endpoint {
                endpoint_id: e.id,
                model: (*m).clone(),
            };
            TargetOption {
                key: target_key(&target),
                label: format!("{m} at {}", e.name),
                target,
            }
        })
        .collect();
    let remote_templates = templates
        .iter()
        .flat_map(|t| {
            remote_models.iter().map(move |(e, m)| {
                let target = ChatTarget::Template {
                    model_id: 0,
                    template_id: t.id,
                    version: None,
                    values: BTreeMap::new(),
                    endpoint: Some(EndpointModel {
                        endpoint_id: e.id,
                        model: (*m).clone(),
                    }),
                };
                TargetOption {
                    key: target_key(&target),
                    label: format!("{} (template v{}) on {m} at {}", t.name, t.version, e.name),
                    target,
                }
            })
        })
        .collect();
    vec![
        TargetGroup {
            label: "Base models",
            options: base,
        },
        TargetGroup {
            label: "Adapters",
            options: adapter,
        },
        TargetGroup {
            label: "API endpoints",
            options: remote,
        },
        TargetGroup {
            label: "Templates",
            options: template,
        },
        TargetGroup {
            label: "Templates on API models",
            options: remote_templates,
        },
    ]
    .into_iter()
    .filter(|g| !g.options.is_empty())
    .collect()
}

/// The label of `target` among `groups`, or a plain description when it is not
/// (or no longer) in the library.
pub fn label_in(groups: &[TargetGroup], target: &ChatTarget) -> String {
    let key = target_key(target);
    groups
        .iter()
        .flat_map(|g| g.options.iter())
        .find(|o| o.key == key)
        .map(|o| o.label.clone())
        .unwrap_or_else(|| match target {
            ChatTarget::Base { model_id } => format!("model #{model_id} (not in the library)"),
            ChatTarget::Adapter { adapter_id } => {
                format!("adapter #{adapter_id} (not in the library)")
            }
            ChatTarget::Template { template_id, .. } => {
                format!("template #{template_id} (not in the library)")
            }
            ChatTarget::Endpoint { endpoint_id, model } => {
                format!("{model} at endpoint #{endpoint_id} (not in the library)")
            }
        })
}

/// The adapters and templates the pickers offer, reloaded whenever the library
/// changes (the models come from [`AppCtx::models`]).
#[derive(Clone, Copy)]
pub struct TargetCatalog {
    pub adapters: RwSignal<Vec<AdapterSummary>>,
    pub templates: RwSignal<Vec<TemplateRecord>>,
    pub endpoints: RwSignal<Vec<EndpointSummary>>,
    pub error: RwSignal<Option<IpcError>>,
}

impl TargetCatalog {
    /// Creates the catalog and keeps it loaded.
    pub fn load() -> TargetCatalog {
        let ctx = AppCtx::get();
        let catalog = TargetCatalog {
            adapters: RwSignal::new(Vec::new()),
            templates: RwSignal::new(Vec::new()),
            endpoints: RwSignal::new(Vec::new()),
            error: RwSignal::new(None),
        };
        Effect::new(move |_| {
            ctx.library_version.track();
            spawn_local(async move {
                let adapters = ipc::adapters::list_adapters().await;
                let templates = ipc::templates::list_templates().await;
                let endpoints = ipc::endpoints::list_endpoints().await;
                let mut error = None;
                match endpoints {
                    Ok(list) => catalog.endpoints.set(list),
                    Err(e) => error = Some(e),
                }
                match adapters {
                    Ok(list) => catalog.adapters.set(list),
                    Err(e) => error = Some(e),
                }
                match templates {
                    Ok(list) => catalog.templates.set(list),
                    Err(e) => error = error.or(Some(e)),
                }
                catalog.error.set(error);
            });
        });
        catalog
    }

    /// Every choice, grouped (reactive).
    pub fn groups(&self) -> Vec<TargetGroup> {
        let ctx = AppCtx::get();
        let models = match ctx.models.get() {
            Some(Ok(list)) => list,
            _ => Vec::new(),
        };
        self.adapters.with(|a| {
            self.templates
                .with(|t| self.endpoints.with(|e| build_groups(&models, a, t, e)))
        })
    }

    /// The readable label of `target` (reactive).
    pub fn label(&self, target: &ChatTarget) -> String {
        label_in(&self.groups(), target)
    }
}

/// A `<select>` over every target; `selected` None shows a "choose" entry.
#[component]
pub fn TargetSelect(
    catalog: TargetCatalog,
    selected: RwSignal<Option<ChatTarget>>,
    #[prop(into)] id: String,
    /// Called after the user picks a target (to persist the choice).
    #[prop(optional)]
    on_pick: Option<Callback<()>>,
    #[prop(into, optional)] disabled: Option<Signal<bool>>,
) -> impl IntoView {
    let current_key = move || selected.get().map(|t| target_key(&t)).unwrap_or_default();
    let change = move |ev: leptos::ev::Event| {
        let key = event_target_value(&ev);
        selected.set(parse_target_key(&key));
        if let Some(cb) = on_pick {
            cb.run(());
        }
    };
    view! {
        <select
            class="target-select"
            id=id.clone()
            data-testid=id
            on:change=change
            prop:value=current_key
            disabled=move || disabled.map(|d| d.get()).unwrap_or(false)
        >
            <option value="" selected=move || selected.get().is_none()>
                "Choose who answers…"
            </option>
            {move || {
                let key = current_key();
                catalog
                    .groups()
                    .into_iter()
                    .map(|g| {
                        let options = g
                            .options
                            .into_iter()
                            .map(|o| {
                                let is_selected = o.key == key;
                                view! {
                                    <option value=o.key selected=is_selected>
                                        {o.label}
                                    </option>
                                }
                            })
                            .collect_view();
                        view! { <optgroup label=g.label>{options}</optgroup> }
                    })
                    .collect_view()
            }}
        </select>
        {move || catalog.error.get().map(|e| error_note(&e))}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attune_protocol::{AdapterMetrics, ModelFormat, ModelSource};

    fn model(id: i64, name: &str) -> ModelSummary {
        ModelSummary {
            id,
            name: name.into(),
            architecture: "llama".into(),
            format: ModelFormat::Gguf,
            parameters: 135_000_000,
            quantization: "Q4_1".into(),
            context_length: 8192,
            file_size: 1,
            sha256: String::new(),
            source: ModelSource::Local {
                path: "m.gguf".into(),
            },
            added_at: String::new(),
            family: "Llama".into(),
            support: Default::default(),
        }
    }

    #[test]
    fn keys_round_trip_and_reject_garbage() {
        for t in [
            ChatTarget::Base { model_id: 3 },
            ChatTarget::Adapter { adapter_id: 9 },
            ChatTarget::Template {
                model_id: 1,
                template_id: 7,
                version: None,
                values: BTreeMap::new(),
                endpoint: None,
            },
            ChatTarget::Endpoint {
                endpoint_id: 2,
                model: "llama3:8b".into(),
            },
            ChatTarget::Template {
                model_id: 0,
                template_id: 7,
                version: None,
                values: BTreeMap::new(),
                endpoint: Some(EndpointModel {
                    endpoint_id: 2,
                    model: "org/model:q4".into(),
                }),
            },
        ] {
            assert_eq!(parse_target_key(&target_key(&t)), Some(t));
        }
        for bad in [
            "",
            "base",
            "base:x",
            "adapter:1:2",
            "template:1",
            "other:1",
            "endpoint:1",
            "endpoint:x:m",
            "endpoint:1:",
            "template-endpoint:1:2",
        ] {
            assert_eq!(parse_target_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn groups_name_kinds_and_put_templates_on_every_model() {
        let models = [model(1, "SmolLM2"), model(2, "Qwen")];
        let adapters = [AdapterSummary {
            id: 5,
            name: "pubmed".into(),
            kind: AdapterKind::Prompt,
            base_model_id: 1,
            base_model: "SmolLM2".into(),
            run_id: None,
            dataset_id: None,
            path: String::new(),
            created_at: String::new(),
            metrics: AdapterMetrics::default(),
        }];
        let templates = [TemplateRecord {
            id: 7,
            name: "terse".into(),
            version: 2,
            ..Default::default()
        }];
        let groups = build_groups(&models, &adapters, &templates, &[]);
        assert_eq!(groups.len(), 3);
        assert_eq!(
            groups[1].options[0].label,
            "pubmed · soft prompt on SmolLM2"
        );
        assert_eq!(groups[2].options.len(), 2);
        assert_eq!(groups[2].options[1].key, "template:2:7");
        assert_eq!(
            label_in(&groups, &ChatTarget::Base { model_id: 2 }),
            "Qwen (base)"
        );
        assert!(label_in(&groups, &ChatTarget::Adapter { adapter_id: 99 }).contains("not in"));
        assert!(build_groups(&[], &[], &[], &[]).is_empty());
        let endpoint = EndpointSummary {
            id: 4,
            name: "ollama".into(),
            base_url: "http://localhost:11434/v1".into(),
            key: attune_protocol::KeyStorage::None,
            connect_timeout_s: 10.0,
            idle_timeout_s: 60.0,
            models: vec!["qwen3:0.6b".into()],
            models_at: None,
            created_at: String::new(),
        };
        let groups = build_groups(
            &models,
            &adapters,
            &templates,
            std::slice::from_ref(&endpoint),
        );
        let remote = groups
            .iter()
            .find(|g| g.label == "API endpoints")
            .expect("remote group");
        assert_eq!(remote.options[0].label, "qwen3:0.6b at ollama");
        assert_eq!(remote.options[0].key, "endpoint:4:qwen3:0.6b");
        let on_api = groups
            .iter()
            .find(|g| g.label == "Templates on API models")
            .expect("templates on API models");
        assert_eq!(
            on_api.options[0].label,
            "terse (template v2) on qwen3:0.6b at ollama"
        );
    }
}

/// Every model of every API endpoint, as a select's `(value, label)`: the value is
/// "endpoint_id:model" ([`endpoint_choice`] reads it back), the label "model at endpoint".
pub fn endpoint_model_choices(endpoints: &[EndpointSummary]) -> Vec<(String, String)> {
    endpoints
        .iter()
        .flat_map(|e| {
            e.models
                .iter()
                .map(move |m| (format!("{}:{m}", e.id), format!("{m} at {}", e.name)))
        })
        .collect()
}

/// The API model of an [`endpoint_model_choices`] value, or None (the empty value: a local
/// model).
pub fn endpoint_choice(value: &str) -> Option<EndpointModel> {
    let (e, m) = value.split_once(':')?;
    Some(EndpointModel {
        endpoint_id: e.parse().ok()?,
        model: m.to_string(),
    })
}

/// The `<option>`s of [`endpoint_model_choices`], `selected` marking the chosen one.
#[component]
pub fn EndpointModelOptions(
    endpoints: RwSignal<Vec<EndpointSummary>>,
    selected: RwSignal<String>,
) -> impl IntoView {
    move || {
        endpoints
            .with(|e| endpoint_model_choices(e))
            .into_iter()
            .map(|(value, label)| {
                let v = value.clone();
                view! { <option value=value selected=move || selected.get() == v>{label}</option> }
            })
            .collect_view()
    }
}
