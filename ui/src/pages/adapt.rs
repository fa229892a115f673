//! The adaptation wizard. The user states the goal (model, data, one domain or
//! several, API access only, time budget); the advisor reads the machine and
//! recommends full fine-tuning, LoRA, prompt tuning or a prompt template, with the
//! peak memory and time per epoch of each method here. A preset per method fills
//! the settings; the advanced panel exposes every hyper-parameter with a one-line
//! explanation; a "will it fit" verdict is kept current before Start.

use crate::components::{error_note, Field, ModelSelect};
use crate::pages::runs::duration_text;
use crate::{ipc, AppCtx, Page};
use attune_protocol::ErrorCode;
use attune_protocol::{
    Advice, AdvisorGoal, BaseFormSpec, DatasetSummary, DomainCount, IpcError, LossOn, LrSchedule,
    MethodEstimate, MethodSpec, PreferenceLoss, PreferenceObjective, PreferenceSet, PreferenceSpec,
    RunCheck, RunSpec, SplitName,
};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// The projections LoRA can target, in model order.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// "Full fine-tuning", "LoRA", "Soft prompt", "Prompt template".
pub fn method_title(method: &str) -> &'static str {
    match method {
        "full" => "Full fine-tuning",
        "lora" => "LoRA",
        "prompt" => "Soft prompt tuning",
        _ => "Prompt template",
    }
}

/// A plain-words description of each method.
pub fn method_blurb(method: &str) -> &'static str {
    match method {
        "full" => "Trains every weight: the strongest adaptation, and the most memory and time. One model per domain.",
        "lora" => "Trains small low-rank adapters beside the frozen model: most of full fine-tuning's gain for a fraction of the memory; several domains share one base.",
        "prompt" => "Trains a few virtual tokens put before every input: the lightest training, a tiny file per domain, a smaller gain.",
        _ => "No training: a system prompt and a few worked examples before every question. Instant, and works with API-only models.",
    }
}

/// The settings a preset gives, from the advisor's spec (or the defaults).
/// `level` is "quick", "standard" or "thorough".
pub fn preset(base: &RunSpec, method: &str, level: &str) -> RunSpec {
    let mut s = base.clone();
    s.method = match method {
        "full" => MethodSpec::Full,
        "prompt" => match &base.method {
            m @ MethodSpec::Prompt { .. } => m.clone(),
            _ => MethodSpec::Prompt {
                virtual_tokens: 20,
                init_text: None,
            },
        },
        _ => match &base.method {
            m @ MethodSpec::Lora { .. } => m.clone(),
            _ => MethodSpec::lora_default(),
        },
    };
    match level {
        "quick" => {
            s.epochs = 1.0;
            s.steps = Some(s.steps.unwrap_or(40).min(40));
            match &mut s.method {
                MethodSpec::Lora { r, alpha, .. } => {
                    *r = 8;
                    *alpha = 16.0;
                }
                MethodSpec::Prompt { virtual_tokens, .. } => *virtual_tokens = 10,
                MethodSpec::Full => {}
            }
        }
        "thorough" => {
            s.steps = None;
            s.epochs = 3.0;
            match &mut s.method {
                MethodSpec::Lora { r, alpha, .. } => {
                    *r = 32;
                    *alpha = 64.0;
                }
                MethodSpec::Prompt { virtual_tokens, .. } => *virtual_tokens = 50,
                MethodSpec::Full => {}
            }
        }
        _ => {}
    }
    if s.lr.is_none() {
        s.lr = Some(s.method.default_lr());
    }
    s
}

/// Parses a number field; the error names the field.
pub fn parse_num<T: std::str::FromStr>(label: &str, text: &str) -> Result<T, String> {
    text.trim()
        .parse::<T>()
        .map_err(|_| format!("{label}: '{}' is not a valid number", text.trim()))
}

fn fmt_mb(mb: u64) -> String {
    if mb >= 1024 {
        format!("{:.1} GiB", mb as f64 / 1024.0)
    } else {
        format!("{mb} MiB")
    }
}

/// The wizard page.
#[component]
pub fn AdaptWizard() -> impl IntoView {
    let ctx = AppCtx::get();
    let model: RwSignal<Option<i64>> = RwSignal::new(None);
    let dataset: RwSignal<Option<i64>> = RwSignal::new(None);
    let datasets: RwSignal<Vec<DatasetSummary>> = RwSignal::new(Vec::new());
    // "Learn from": a dataset of examples (supervised) or a preference set (DPO or ORPO).
    let learn_prefs = RwSignal::new(false);
    let pref_sets: RwSignal<Vec<PreferenceSet>> = RwSignal::new(Vec::new());
    let pref_set: RwSignal<Option<i64>> = RwSignal::new(None);
    // The preference settings, kept across advice (the advisor counts DPO's reference copy).
    let pref_choice = RwSignal::new(PreferenceSpec::default());
    let import_path = RwSignal::new(String::new());
    let import_name = RwSignal::new(String::new());
    let importing = RwSignal::new(false);
    let import_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let domains = RwSignal::new(DomainCount::One);
    let api_only = RwSignal::new(false);
    // The API path: the endpoint model the template is written for ("endpoint_id:model").
    let endpoint_model = RwSignal::new(String::new());
    let endpoints: RwSignal<Vec<attune_protocol::EndpointSummary>> = RwSignal::new(Vec::new());
    Effect::new(move |_| {
        ctx.library_version.track();
        spawn_local(async move {
            if let Ok(list) = crate::ipc::endpoints::list_endpoints().await {
                endpoints.set(list);
            }
        });
    });
    let budget = RwSignal::new("15".to_string());
    let advice: RwSignal<Option<Advice>> = RwSignal::new(None);
    let advising = RwSignal::new(false);
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let method = RwSignal::new(String::new());
    let level = RwSignal::new("standard".to_string());
    let spec: RwSignal<Option<RunSpec>> = RwSignal::new(None);
    let field_error: RwSignal<Option<String>> = RwSignal::new(None);
    let check: RwSignal<Option<Result<RunCheck, IpcError>>> = RwSignal::new(None);
    let checking = RwSignal::new(0u64);
    let starting = RwSignal::new(false);
    let start_error: RwSignal<Option<IpcError>> = RwSignal::new(None);

    // Datasets and preference sets follow the library (a preference set is a dataset of
    // pairs: it is listed under "preferences" only); a freshly imported one is preselected.
    Effect::new(move |_| {
        ctx.library_version.track();
        spawn_local(async move {
            let sets = ipc::prefs::list_preference_sets().await.unwrap_or_default();
            if let Ok(list) = ipc::datasets::list_datasets().await {
                let list: Vec<DatasetSummary> = list
                    .into_iter()
                    .filter(|d| !sets.iter().any(|s| s.dataset.id == d.id))
                    .collect();
                if dataset.get_untracked().is_none() {
                    dataset.set(list.last().map(|d| d.id));
                }
                datasets.set(list);
            }
            if pref_set
                .get_untracked()
                .is_none_or(|p| !sets.iter().any(|s| s.dataset.id == p))
            {
                pref_set.set(sets.first().map(|s| s.dataset.id));
            }
            pref_sets.set(sets);
        });
    });
    // A focused dataset (just imported, or a preference set made from an arena's votes).
    Effect::new(move |_| {
        if let Some(id) = ctx.focus_dataset.get() {
            advice.set(None);
            spawn_local(async move {
                let sets = ipc::prefs::list_preference_sets().await.unwrap_or_default();
                if sets.iter().any(|s| s.dataset.id == id) {
                    pref_sets.set(sets);
                    pref_set.set(Some(id));
                    learn_prefs.set(true);
                } else {
                    dataset.set(Some(id));
                    learn_prefs.set(false);
                }
            });
        }
    });
    // The data the advice was for changed: advise again.
    let goal_data = Memo::new(move |_| {
        if learn_prefs.get() {
            (true, pref_set.get())
        } else {
            (false, dataset.get())
        }
    });
    Effect::new(move |prev: Option<(bool, Option<i64>)>| {
        let now = goal_data.get();
        if prev.is_some_and(|p| p != now) {
            advice.set(None);
        }
        now
    });
    let chosen_set = Memo::new(move |_| {
        let id = pref_set.get();
        pref_sets.with(|l| l.iter().find(|s| Some(s.dataset.id) == id).cloned())
    });
    let import_prefs = move || {
        import_error.set(None);
        let path = import_path.get_untracked();
        let name = import_name.get_untracked();
        if path.trim().is_empty() || name.trim().is_empty() {
            import_error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Give the preference JSONL's path and a name for the set.".into(),
            }));
            return;
        }
        importing.set(true);
        spawn_local(async move {
            match ipc::prefs::import_preferences(&path, &name).await {
                Ok(set) => {
                    let id = set.dataset.id;
                    pref_sets.update(|l| {
                        l.retain(|s| s.dataset.id != id);
                        l.insert(0, set);
                    });
                    pref_set.set(Some(id));
                    import_path.set(String::new());
                    import_name.set(String::new());
                    ctx.library_changed();
                }
                Err(e) => import_error.set(Some(e)),
            }
            importing.set(false);
        });
    };
    let browse_prefs = move |_| {
        spawn_local(async move {
            match ipc::models::pick_path("Choose a preference JSONL", false, &["jsonl", "json"])
                .await
            {
                Ok(Some(p)) => {
                    if import_name.get_untracked().trim().is_empty() {
                        let stem = std::path::Path::new(&p)
                            .file_stem()
                            .and_then(|s| s.to_str())
                            .unwrap_or_default()
                            .to_string();
                        import_name.set(stem);
                    }
                    import_path.set(p);
                }
                Ok(None) => {}
                Err(e) => import_error.set(Some(e)),
            }
        });
    };

    let ask = move || {
        let Some(model_id) = model.get_untracked() else {
            error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Choose a model first (add one in the Library).".into(),
            }));
            return;
        };
        let budget_minutes = match budget.get_untracked().trim() {
            "" => None,
            b => match b.parse::<f64>() {
                Ok(v) if v > 0.0 => Some(v),
                _ => {
                    error.set(Some(IpcError {
                        code: ErrorCode::InvalidInput,
                        message: format!("Time budget: '{b}' is not a number of minutes"),
                    }));
                    return;
                }
            },
        };
        let prefs = learn_prefs.get_untracked();
        if prefs && pref_set.get_untracked().is_none() {
            error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Choose a preference set (import a preference JSONL below, or make one \
                          from an arena's votes on the A/B arena page)."
                    .into(),
            }));
            return;
        }
        let goal = AdvisorGoal {
            model_id,
            dataset_id: if prefs {
                pref_set.get_untracked()
            } else {
                dataset.get_untracked()
            },
            domains: domains.get_untracked(),
            api_only: api_only.get_untracked(),
            budget_minutes,
            preference: prefs.then(|| pref_choice.get_untracked()),
        };
        advising.set(true);
        error.set(None);
        spawn_local(async move {
            match ipc::advisor::advise(&goal).await {
                Ok(a) => {
                    method.set(a.recommended.clone());
                    advice.set(Some(a));
                }
                Err(e) => error.set(Some(e)),
            }
            advising.set(false);
        });
    };

    // The spec follows the chosen method and preset.
    Effect::new(move |_| {
        let m = method.get();
        let lv = level.get();
        let Some(a) = advice.get() else {
            spec.set(None);
            return;
        };
        let base = a
            .estimates
            .iter()
            .find(|e| e.method == m)
            .and_then(|e| e.spec.clone());
        spec.set(base.map(|b| preset(&b, &m, &lv)));
        field_error.set(None);
    });

    // The settings panel is built once per preset, not on every edit (an edit must
    // not close the advanced panel or lose focus).
    let has_spec = Memo::new(move |_| spec.with(Option::is_some));

    // "Will it fit": re-checked 400 ms after the settings stop changing.
    Effect::new(move |_| {
        let Some(s) = spec.get() else {
            check.set(None);
            return;
        };
        let ticket = checking.get_untracked() + 1;
        checking.set(ticket);
        set_timeout(
            move || {
                if checking.get_untracked() != ticket {
                    return;
                }
                spawn_local(async move {
                    let r = ipc::runs::check_run(&s).await;
                    if checking.get_untracked() == ticket {
                        check.set(Some(r));
                    }
                });
            },
            std::time::Duration::from_millis(400),
        );
    });

    let start = move || {
        let Some(s) = spec.get_untracked() else {
            return;
        };
        starting.set(true);
        start_error.set(None);
        spawn_local(async move {
            match ipc::runs::start_run(&s).await {
                Ok(run) => {
                    ctx.focus_run.set(Some(run.id));
                    ctx.library_changed();
                    ctx.go(Page::Runs);
                }
                Err(e) => start_error.set(Some(e)),
            }
            starting.set(false);
        });
    };

    let estimate_row = move |e: MethodEstimate| {
        let m = e.method.clone();
        let m2 = m.clone();
        let recommended =
            advice.with_untracked(|a| a.as_ref().is_some_and(|a| a.recommended == e.method));
        let time = if e.method == "template" {
            "no training".to_string()
        } else if e.seconds_per_epoch > 0.0 {
            duration_text(e.seconds_per_epoch)
        } else {
            "—".to_string()
        };
        view! {
            <tr
                class="estimate"
                class:chosen=move || method.get() == m
                data-testid="estimate-row"
                data-method=e.method.clone()
                on:click=move |_| method.set(m2.clone())
            >
                <td>
                    <label class="check">
                        <input type="radio" name="method" id=format!("method-{}", e.method)
                            prop:checked={let m = e.method.clone(); move || method.get() == m}
                            on:change={let m = e.method.clone(); move |_| method.set(m.clone())} />
                        <strong>{method_title(&e.method)}</strong>
                        {recommended.then(|| view! { <span class="pill">"recommended"</span> })}
                    </label>
                </td>
                <td class="num">{if e.trainable_params > 0 { crate::format::parameters(e.trainable_params) } else { "—".into() }}</td>
                <td class="num">{fmt_mb(e.peak_memory_mb)}</td>
                <td>{if e.fits { view! { <span class="ok">"fits"</span> }.into_any() } else { view! { <span class="bad">"too big"</span> }.into_any() }}</td>
                <td class="num">{if e.tokens_per_s > 0.0 { format!("{:.0}", e.tokens_per_s) } else { "—".into() }}
                    <span class="muted small">{format!(" {}", e.throughput_source)}</span></td>
                <td class="num">{time}</td>
                <td class="num">{e.steps_in_budget.map(|s| s.to_string()).unwrap_or("—".into())}</td>
                <td class="summary">{e.summary.clone()}</td>
            </tr>
        }
    };

    view! {
        <section class="page wide adapt-page" id="adapt-page">
            <h1>"Adapt a model"</h1>
            <div class="card goal" id="adapt-goal">
                <h2>"1 · Your goal"</h2>
                <div class="grid-3">
                    <Field label="Model" hint="The model to adapt.">
                        <ModelSelect selected=model id="adapt-model".to_string() />
                    </Field>
                    <div style:display=move || if learn_prefs.get() { "none" } else { "block" }>
                    <Field label="Your data" hint="The dataset the model learns from (import one on the Import data page).">
                        <select id="adapt-dataset"
                            on:change=move |ev| dataset.set(event_target_value(&ev).parse().ok())
                            prop:value=move || dataset.get().map(|d| d.to_string()).unwrap_or_default()>
                            <option value="">"No dataset yet"</option>
                            {move || datasets.get().into_iter().map(|d| {
                                let id = d.id;
                                view! { <option value=id.to_string() selected=move || dataset.get() == Some(id)>
                                    {format!("{} ({} train rows)", d.name, d.train_rows)}
                                </option> }
                            }).collect_view()}
                        </select>
                    </Field>
                    </div>
                    <div style:display=move || if learn_prefs.get() { "block" } else { "none" }>
                    <Field label="Preference set" hint="Chosen and rejected answers per prompt: made from an arena's votes, or imported from a preference JSONL.">
                        <select id="adapt-prefset"
                            on:change=move |ev| pref_set.set(event_target_value(&ev).parse().ok())
                            prop:value=move || pref_set.get().map(|d| d.to_string()).unwrap_or_default()>
                            <option value="">"No preference set yet"</option>
                            {move || pref_sets.get().into_iter().map(|p| {
                                let id = p.dataset.id;
                                view! { <option value=id.to_string() selected=move || pref_set.get() == Some(id)>
                                    {format!("{} ({} pairs)", p.dataset.name, p.pairs)}
                                </option> }
                            }).collect_view()}
                        </select>
                    </Field>
                    </div>
                    <Field label="Time budget (minutes)" hint="How long you are willing to let it train on this machine.">
                        <input id="adapt-budget" type="number" min="1" prop:value=move || budget.get()
                            on:input=move |ev| budget.set(event_target_value(&ev)) />
                    </Field>
                </div>
                <div class="row learn-from" id="adapt-learn-from">
                    <span class="field-label">"Learn from"</span>
                    <label class="check" title="Supervised fine-tuning: the model learns to write the dataset's answers.">
                        <input type="radio" name="learn-from" id="learn-dataset" prop:checked=move || !learn_prefs.get()
                            on:change=move |_| learn_prefs.set(false) />
                        "Examples: a dataset of questions and answers (supervised)"
                    </label>
                    <label class="check" title="Preference training: the model learns to favour the chosen answer over the rejected one.">
                        <input type="radio" name="learn-from" id="learn-prefs" prop:checked=move || learn_prefs.get()
                            on:change=move |_| learn_prefs.set(true) />
                        "Preferences: chosen vs rejected answers (DPO or ORPO)"
                    </label>
                </div>
                {move || learn_prefs.get().then(|| view! {
                    <div class="pref-source" id="adapt-pref-source">
                        <p class="muted" id="adapt-prefset-info" data-prefset=move || pref_set.get().map(|p| p.to_string()).unwrap_or_default()>
                            {move || match chosen_set.get() {
                                Some(s) => {
                                    let from = match (&s.votes, s.arena_id) {
                                        (Some(v), Some(a)) => format!(" · from arena {a}, {} votes{}", v.kind(), s.judge_label.as_ref().map(|j| format!(" (judge: {j})")).unwrap_or_default()),
                                        _ => String::new(),
                                    };
                                    format!("{}{from}", crate::pages::arena::pref_counts_text(&s))
                                }
                                None => "No preference set chosen. Make one from an arena's votes (A/B arena page, \"Train from these votes\") or import a preference JSONL:".into(),
                            }}
                        </p>
                        <details class="pref-import" id="adapt-pref-import">
                            <summary>"Import a preference JSONL"</summary>
                            <p class="field-hint">"One JSON object a line with \"prompt\", \"chosen\" and \"rejected\": all plain strings, or all lists of chat messages (TRL's DPO formats)."</p>
                            <div class="row">
                                <input type="text" class="grow" id="adapt-pref-path" placeholder="~/preferences.jsonl"
                                    prop:value=move || import_path.get() on:input=move |ev| import_path.set(event_target_value(&ev)) />
                                <button class="secondary" id="adapt-pref-browse" on:click=browse_prefs>"Browse…"</button>
                                <input type="text" id="adapt-pref-import-name" placeholder="name"
                                    prop:value=move || import_name.get() on:input=move |ev| import_name.set(event_target_value(&ev)) />
                                <button class="secondary" id="adapt-pref-import-go" disabled=move || importing.get() on:click=move |_| import_prefs()>
                                    {move || if importing.get() { "Importing…" } else { "Import" }}
                                </button>
                            </div>
                            {move || import_error.get().map(|e| error_note(&e))}
                        </details>
                    </div>
                })}
                <div class="row">
                    <label class="check">
                        <input type="radio" name="domains" id="domains-one" prop:checked=move || domains.get() == DomainCount::One
                            on:change=move |_| domains.set(DomainCount::One) />
                        "One domain"
                    </label>
                    <label class="check">
                        <input type="radio" name="domains" id="domains-several" prop:checked=move || domains.get() == DomainCount::Several
                            on:change=move |_| domains.set(DomainCount::Several) />
                        "Several domains on one model"
                    </label>
                    <label class="check">
                        <input type="checkbox" id="adapt-api-only" prop:checked=move || api_only.get()
                            on:change=move |ev| api_only.set(event_target_checked(&ev)) />
                        "I only have API access to the model (no weights)"
                    </label>
                    <button id="adapt-advise" disabled=move || advising.get() on:click=move |_| ask()>
                        {move || if advising.get() { "Reading your machine…" } else { "Recommend a method" }}
                    </button>
                </div>
                {move || error.get().map(|e| error_note(&e))}
            </div>

            {move || advice.get().map(|a| {
                let m = &a.machine;
                let machine = format!(
                    "{} · {} threads · {} of {} free · {}{}",
                    m.cpu,
                    m.threads,
                    fmt_mb(m.memory_available_mb),
                    fmt_mb(m.memory_total_mb),
                    m.gpu.clone().unwrap_or_else(|| "no GPU".into()),
                    if m.simd.is_empty() { String::new() } else { format!(" · {}", m.simd.join(", ")) },
                );
                let model = a.model.as_ref().map(|m| format!(
                    "{} · {} context · {} · can: {}",
                    m.family,
                    crate::format::context(m.context_length),
                    m.quantization,
                    crate::format::support(&m.support),
                ));
                let limits = a.model.as_ref().map(|m| m.support.limits.clone()).unwrap_or_default();
                view! {
                    <div class="card advice" id="adapt-advice">
                        <h2>"2 · Recommendation"</h2>
                        <p class="muted" id="machine-info">{machine}</p>
                        {model.map(|m| view! { <p class="muted" id="model-info">{m}</p> })}
                        {(!limits.is_empty()).then(|| view! {
                            <ul class="limits" id="model-limits">
                                {limits.iter().map(|l| view! { <li>{l.clone()}</li> }).collect_view()}
                            </ul>
                        })}
                        <p class="recommended" id="recommended-method">
                            "Recommended: " <strong>{method_title(&a.recommended)}</strong>
                            " — " {method_blurb(&a.recommended)}
                        </p>
                        <ul class="reasons" id="advice-reasons">
                            {a.reasons.iter().map(|r| view! { <li>{r.clone()}</li> }).collect_view()}
                        </ul>
                        <div class="table-wrap">
                            <table class="data estimates" id="estimates">
                                <thead><tr>
                                    <th>"Method"</th><th class="num">"Trained"</th><th class="num">"Peak memory"</th>
                                    <th>"Fits?"</th><th class="num">"Tokens/s"</th><th class="num">"Time / epoch"</th>
                                    <th class="num">"Steps in budget"</th><th>"In short"</th>
                                </tr></thead>
                                <tbody>{a.estimates.clone().into_iter().map(estimate_row).collect_view()}</tbody>
                            </table>
                        </div>
                    </div>
                }
            })}

            {move || {
                let m = method.get();
                (advice.with(Option::is_some) && m == "template").then(|| view! {
                    <div class="card" id="adapt-template">
                        <h2>"3 · Write a template"</h2>
                        <p>{method_blurb("template")}</p>
                        {move || api_only.get().then(|| {
                            let models = endpoints.with(|e| super::targets::endpoint_model_choices(e));
                            if models.is_empty() {
                                view! {
                                    <p id="adapt-no-endpoint">"Add the API you use (its address and key) on the Connect page; its models then appear here."</p>
                                    <button class="secondary" id="adapt-add-endpoint" on:click=move |_| ctx.go(Page::Connect)>"Add an API endpoint"</button>
                                }.into_any()
                            } else {
                                if endpoint_model.get_untracked().is_empty() {
                                    endpoint_model.set(models[0].0.clone());
                                }
                                view! {
                                    <Field label="The API model" hint="The template is previewed as the request this model receives, and evaluated by its answers (label accuracy) on your data.">
                                        <select id="adapt-endpoint-model" on:change=move |ev| endpoint_model.set(event_target_value(&ev)) prop:value=move || endpoint_model.get()>
                                            {models.into_iter().map(|(v, label)| {
                                                let vv = v.clone();
                                                view! { <option value=v selected=move || endpoint_model.get() == vv>{label}</option> }
                                            }).collect_view()}
                                        </select>
                                    </Field>
                                }.into_any()
                            }
                        })}
                        <button id="open-templates" on:click=move |_| {
                            if api_only.get_untracked() && !endpoint_model.get_untracked().is_empty() {
                                ctx.template_target.set(Some(endpoint_model.get_untracked()));
                            }
                            if let Some(d) = dataset.get_untracked() {
                                ctx.focus_dataset.set(Some(d));
                            }
                            ctx.go(Page::Templates)
                        }>{move || if api_only.get() { "Write the template and evaluate it on the API model" } else { "Open the template editor" }}</button>
                    </div>
                })
            }}

            {move || has_spec.get().then(|| view! {
                <Settings spec=spec level=level field_error=field_error pref_choice=pref_choice />
                <div class="card verdict-card">
                    {move || match check.get() {
                        None => view! { <p class="muted" id="fit-verdict">"Checking memory…"</p> }.into_any(),
                        Some(Err(e)) => view! { <div id="fit-verdict">{error_note(&e)}</div> }.into_any(),
                        Some(Ok(c)) => {
                            let cls = if c.fits { "verdict fits" } else { "verdict too-big" };
                            view! {
                                <div class=cls id="fit-verdict" data-fits=c.fits.to_string() data-peak-mb=c.peak_memory_mb.to_string()>
                                    <strong>{if c.fits { "✓ It fits." } else { "✗ It will not fit." }}</strong>
                                    {format!(
                                        " Peak memory about {} of {} available; {} steps, about {} at {:.0} tokens/s.",
                                        fmt_mb(c.peak_memory_mb), fmt_mb(c.available_mb), c.total_steps,
                                        duration_text(c.estimated_seconds), c.tokens_per_s,
                                    )}
                                    {(c.base != BaseFormSpec::F32).then(|| format!(
                                        " The base is held {}.",
                                        if c.base == BaseFormSpec::Quantized { "in its quantized blocks" } else { "in bf16" }
                                    ))}
                                    {c.suggestion.clone().map(|s| view! { <p class="suggestion">{s}</p> })}
                                </div>
                            }.into_any()
                        }
                    }}
                    <div class="row">
                        <button id="start-run"
                            disabled=move || starting.get() || field_error.with(Option::is_some)
                                || check.with(|c| matches!(c, Some(Ok(c)) if !c.fits))
                            on:click=move |_| start()>
                            {move || if starting.get() { "Starting…" } else { "Start training" }}
                        </button>
                    </div>
                    {move || start_error.get().map(|e| error_note(&e))}
                </div>
            })}
        </section>
    }
}

/// The settings of the chosen method: presets, the usual knobs, and an advanced panel
/// with every hyper-parameter.
#[component]
fn Settings(
    spec: RwSignal<Option<RunSpec>>,
    level: RwSignal<String>,
    field_error: RwSignal<Option<String>>,
    pref_choice: RwSignal<PreferenceSpec>,
) -> impl IntoView {
    // A text input bound to one field of the spec.
    let num = move |id: &'static str,
                    label: &'static str,
                    hint: &'static str,
                    get: fn(&RunSpec) -> String,
                    set: fn(&mut RunSpec, &str) -> Result<(), String>| {
        view! {
            <Field label=label hint=hint>
                <input id=id
                    prop:value=move || spec.with(|s| s.as_ref().map(get).unwrap_or_default())
                    on:change=move |ev| {
                        let text = event_target_value(&ev);
                        let mut next = spec.get_untracked();
                        if let Some(s) = next.as_mut() {
                            match set(s, &text) {
                                Ok(()) => { field_error.set(None); spec.set(next); }
                                Err(e) => field_error.set(Some(e)),
                            }
                        }
                    } />
            </Field>
        }
    };

    let method_name =
        Memo::new(move |_| spec.with(|s| s.as_ref().map(|s| s.method.name()).unwrap_or("")));
    let is_pref =
        Memo::new(move |_| spec.with(|s| s.as_ref().is_some_and(|s| s.preference.is_some())));

    view! {
        <div class="card settings" id="adapt-settings">
            <h2>"3 · Settings"</h2>
            <div class="row presets">
                <span class="field-label">"Preset"</span>
                {["quick", "standard", "thorough"].into_iter().map(|p| view! {
                    <button class="secondary preset" class:active=move || level.get() == p id=format!("preset-{p}")
                        on:click=move |_| level.set(p.to_string())>
                        {match p { "quick" => "Quick look", "thorough" => "Thorough", _ => "Standard" }}
                    </button>
                }).collect_view()}
            </div>
            <div class="grid-3">
                {num("run-name", "Run name", "Also the name of the adapter it produces (blank: automatic).",
                    |s| s.name.clone().unwrap_or_default(),
                    |s, t| { s.name = (!t.trim().is_empty()).then(|| t.trim().to_string()); Ok(()) })}
                {num("run-epochs", "Epochs", "Passes over the training rows (used when steps is blank).",
                    |s| s.epochs.to_string(),
                    |s, t| { let v: f64 = parse_num("Epochs", t)?; if v <= 0.0 { return Err("Epochs must be above 0".into()) } s.epochs = v; Ok(()) })}
                {num("run-steps", "Steps", "Optimizer steps to run; blank to use the epochs.",
                    |s| s.steps.map(|v| v.to_string()).unwrap_or_default(),
                    |s, t| { s.steps = if t.trim().is_empty() { None } else { Some(parse_num("Steps", t)?) }; Ok(()) })}
                {num("run-lr", "Learning rate", "How big each update is; the method's usual value is preset.",
                    |s| s.lr.map(|v| format!("{v:e}")).unwrap_or_default(),
                    |s, t| { let v: f64 = parse_num("Learning rate", t)?; if v <= 0.0 { return Err("Learning rate must be above 0".into()) } s.lr = Some(v); Ok(()) })}
                {num("run-batch", "Batch size", "Rows per step; lower it when memory is short.",
                    |s| s.batch_size.to_string(),
                    |s, t| { let v: usize = parse_num("Batch size", t)?; if v == 0 { return Err("Batch size must be at least 1".into()) } s.batch_size = v; Ok(()) })}
                {num("run-max-len", "Max length (tokens)", "Longer rows are cut; shorter saves memory and time.",
                    |s| s.max_len.to_string(),
                    |s, t| { let v: usize = parse_num("Max length", t)?; if v < 16 { return Err("Max length must be at least 16".into()) } s.max_len = v; Ok(()) })}
            </div>
            {move || match method_name.get() {
                "lora" => view! { <LoraFields spec=spec field_error=field_error /> }.into_any(),
                "prompt" => view! { <PromptFields spec=spec field_error=field_error /> }.into_any(),
                _ => view! { <p class="muted">"Full fine-tuning trains every weight; no method settings."</p> }.into_any(),
            }}
            {move || (method_name.get() != "full" && !method_name.get().is_empty()).then(|| view! {
                <Field label="Base held as" hint="How the frozen model is kept while its adapter trains: f32 is fastest; bf16 takes half its memory; quantized keeps the file's blocks, the least memory, a little slower. The memory check below follows the choice.">
                    <select id="run-base"
                        prop:value=move || spec.with(|s| s.as_ref().and_then(|s| s.base).map(|b| b.as_str()).unwrap_or("auto"))
                        on:change=move |ev| {
                            let v = event_target_value(&ev);
                            spec.update(|s| if let Some(s) = s { s.base = BaseFormSpec::parse(&v); });
                        }>
                        <option value="auto">"automatic (f32 when it fits)"</option>
                        <option value="f32">"f32 (fastest)"</option>
                        <option value="bf16">"bf16 (half the memory)"</option>
                        <option value="quantized">"quantized (least memory)"</option>
                    </select>
                </Field>
            })}
            {move || is_pref.get().then(|| view! { <PrefFields spec=spec field_error=field_error pref_choice=pref_choice /> })}
            <details class="advanced" id="advanced">
                <summary>"Advanced"</summary>
                <div class="grid-3">
                    {num("run-accum", "Gradient accumulation", "Steps of gradients summed before an update: a larger batch without more memory.",
                        |s| s.grad_accum.to_string(),
                        |s, t| { let v: usize = parse_num("Gradient accumulation", t)?; if v == 0 { return Err("Gradient accumulation must be at least 1".into()) } s.grad_accum = v; Ok(()) })}
                    {num("run-warmup", "Warm-up steps", "Steps over which the learning rate ramps up from 0.",
                        |s| s.warmup_steps.to_string(),
                        |s, t| { s.warmup_steps = parse_num("Warm-up steps", t)?; Ok(()) })}
                    <Field label="Schedule" hint="How the learning rate decays after the warm-up.">
                        <select id="run-schedule"
                            prop:value=move || spec.with(|s| s.as_ref().map(|s| format!("{:?}", s.schedule).to_lowercase()).unwrap_or_default())
                            on:change=move |ev| {
                                let v = event_target_value(&ev);
                                spec.update(|s| if let Some(s) = s {
                                    s.schedule = match v.as_str() { "linear" => LrSchedule::Linear, "constant" => LrSchedule::Constant, _ => LrSchedule::Cosine };
                                });
                            }>
                            <option value="cosine">"cosine"</option>
                            <option value="linear">"linear"</option>
                            <option value="constant">"constant"</option>
                        </select>
                    </Field>
                    {num("run-final-lr", "Final learning rate fraction", "Where the decay ends, as a fraction of the peak rate.",
                        |s| s.final_lr_fraction.to_string(),
                        |s, t| { let v: f64 = parse_num("Final fraction", t)?; if !(0.0..=1.0).contains(&v) { return Err("Final fraction must be between 0 and 1".into()) } s.final_lr_fraction = v; Ok(()) })}
                    {num("run-wd", "Weight decay", "Pulls weights toward zero each step (AdamW); 0 turns it off.",
                        |s| s.weight_decay.to_string(),
                        |s, t| { s.weight_decay = parse_num("Weight decay", t)?; Ok(()) })}
                    {num("run-clip", "Max gradient norm", "Clips unusually large updates; 0 turns clipping off.",
                        |s| s.max_grad_norm.to_string(),
                        |s, t| { s.max_grad_norm = parse_num("Max gradient norm", t)?; Ok(()) })}
                    {num("run-seed", "Seed", "Fixes data order and initialisation: the same seed gives the same run.",
                        |s| s.seed.to_string(),
                        |s, t| { s.seed = parse_num("Seed", t)?; Ok(()) })}
                    <Field label="Loss on" hint="Learn only the answers (usual) or every token of each row.">
                        <select id="run-loss-on"
                            prop:value=move || spec.with(|s| s.as_ref().map(|s| if s.loss_on == LossOn::All { "all" } else { "assistant" }).unwrap_or("assistant"))
                            on:change=move |ev| {
                                let v = event_target_value(&ev);
                                spec.update(|s| if let Some(s) = s { s.loss_on = if v == "all" { LossOn::All } else { LossOn::Assistant }; });
                            }>
                            <option value="assistant">"assistant answers"</option>
                            <option value="all">"every token"</option>
                        </select>
                    </Field>
                    <Field label="Packing" hint="Join the training rows end to end into blocks of the max length: no padding, no row cut; rows sharing a block see each other.">
                        <label class="check">
                            <input type="checkbox" id="run-pack"
                                prop:checked=move || spec.with(|s| s.as_ref().is_some_and(|s| s.pack))
                                on:change=move |ev| {
                                    let on = event_target_checked(&ev);
                                    spec.update(|s| if let Some(s) = s { s.pack = on; });
                                }/>
                            " pack rows into blocks"
                        </label>
                    </Field>
                    {num("run-eval-every", "Evaluate every N steps", "How often the held-out loss is measured (0: start and end only).",
                        |s| s.eval_every.to_string(),
                        |s, t| { s.eval_every = parse_num("Evaluate every", t)?; Ok(()) })}
                    {num("run-eval-limit", "Evaluation rows", "Rows of the split scored each evaluation; blank for all.",
                        |s| s.eval_limit.map(|v| v.to_string()).unwrap_or_default(),
                        |s, t| { s.eval_limit = if t.trim().is_empty() { None } else { Some(parse_num("Evaluation rows", t)?) }; Ok(()) })}
                    <Field label="Evaluation split" hint="The held-out rows used for the eval loss.">
                        <select id="run-eval-split"
                            prop:value=move || spec.with(|s| s.as_ref().map(|s| s.eval_split.as_str()).unwrap_or("valid"))
                            on:change=move |ev| {
                                let v = event_target_value(&ev);
                                spec.update(|s| if let Some(s) = s { s.eval_split = SplitName::parse(&v).unwrap_or(SplitName::Valid); });
                            }>
                            <option value="valid">"valid"</option>
                            <option value="test">"test"</option>
                            <option value="train">"train"</option>
                        </select>
                    </Field>
                    {num("run-ckpt", "Checkpoint every N steps", "How often progress is saved so a stopped run can resume.",
                        |s| s.checkpoint_every.to_string(),
                        |s, t| { s.checkpoint_every = parse_num("Checkpoint every", t)?; Ok(()) })}
                    {num("run-forgetting", "Forgetting check rows", "General-domain rows scored before and after, to warn if the model got worse elsewhere (0: off).",
                        |s| s.forgetting_rows.to_string(),
                        |s, t| { s.forgetting_rows = parse_num("Forgetting rows", t)?; Ok(()) })}
                </div>
            </details>
            {move || field_error.get().map(|e| view! { <div class="notice error" id="field-error">{e}</div> })}
        </div>
    }
}

/// One line on what each preference objective does.
pub fn objective_blurb(o: PreferenceObjective) -> &'static str {
    match o {
        PreferenceObjective::Dpo => "DPO raises the chosen answers' probability relative to the rejected ones, measured against a frozen reference model so the model does not drift far from where it started.",
        PreferenceObjective::Orpo => "ORPO learns the chosen answers (their usual loss) plus an odds-ratio term that pushes the rejected ones down; it needs no reference model, so it is cheaper.",
    }
}

/// What serves as DPO's reference for a method.
pub fn reference_text(method: &MethodSpec, o: PreferenceObjective) -> &'static str {
    match (o, method) {
        (PreferenceObjective::Orpo, _) => "No reference model: ORPO is reference-free.",
        (_, MethodSpec::Full) => "Reference: a frozen copy of the starting model, held beside the one that trains (its memory is in the estimate below).",
        _ => "Reference: the base model itself with the adapter switched off; no second copy of the weights.",
    }
}

/// The preference objective's settings: DPO or ORPO, beta, DPO's loss type.
#[component]
fn PrefFields(
    spec: RwSignal<Option<RunSpec>>,
    field_error: RwSignal<Option<String>>,
    pref_choice: RwSignal<PreferenceSpec>,
) -> impl IntoView {
    let pref = move || spec.with(|s| s.as_ref().and_then(|s| s.preference).unwrap_or_default());
    let set = move |f: &dyn Fn(&mut PreferenceSpec)| {
        spec.update(|s| {
            if let Some(p) = s.as_mut().and_then(|s| s.preference.as_mut()) {
                f(p);
                pref_choice.set(*p);
            }
        });
    };
    view! {
        <div class="method-fields pref-fields" id="pref-fields">
            <h3>"Preference training"</h3>
            <div class="grid-3">
                <Field label="Objective" hint="DPO compares against a reference model; ORPO needs none.">
                    <select id="run-objective"
                        prop:value=move || pref().objective.as_str()
                        on:change=move |ev| {
                            let o = if event_target_value(&ev) == "orpo" { PreferenceObjective::Orpo } else { PreferenceObjective::Dpo };
                            set(&|p| p.objective = o);
                        }>
                        <option value="dpo" selected=move || pref().objective == PreferenceObjective::Dpo>"DPO (direct preference optimization)"</option>
                        <option value="orpo" selected=move || pref().objective == PreferenceObjective::Orpo>"ORPO (odds-ratio, no reference)"</option>
                    </select>
                </Field>
                <Field label="Beta" hint="DPO: how far the model may move from the reference (lower lets it move more); ORPO: the weight of the preference term. TRL's default is 0.1.">
                    <input id="run-beta"
                        prop:value=move || pref().beta.to_string()
                        on:change=move |ev| {
                            match parse_num::<f64>("Beta", &event_target_value(&ev)) {
                                Ok(b) if b.is_finite() && b > 0.0 => { field_error.set(None); set(&|p| p.beta = b); }
                                Ok(_) => field_error.set(Some("Beta must be a positive number".into())),
                                Err(e) => field_error.set(Some(e)),
                            }
                        } />
                </Field>
                <Field label="DPO loss" hint="sigmoid: the original DPO loss; hinge: a margin loss (SLiC); IPO: a squared loss that overfits less on few, decisive pairs.">
                    <select id="run-loss"
                        disabled=move || pref().objective == PreferenceObjective::Orpo
                        prop:value=move || pref().loss.as_str()
                        on:change=move |ev| {
                            let l = match event_target_value(&ev).as_str() { "hinge" => PreferenceLoss::Hinge, "ipo" => PreferenceLoss::Ipo, _ => PreferenceLoss::Sigmoid };
                            set(&|p| p.loss = l);
                        }>
                        <option value="sigmoid" selected=move || pref().loss == PreferenceLoss::Sigmoid>"sigmoid"</option>
                        <option value="hinge" selected=move || pref().loss == PreferenceLoss::Hinge>"hinge"</option>
                        <option value="ipo" selected=move || pref().loss == PreferenceLoss::Ipo>"IPO"</option>
                    </select>
                </Field>
            </div>
            <p class="muted" id="pref-objective-blurb">{move || objective_blurb(pref().objective)}</p>
            <p class="muted" id="pref-reference">{move || { let o = pref().objective; spec.with(|s| s.as_ref().map(|s| reference_text(&s.method, o)).unwrap_or_default()) }}</p>
            <p class="field-hint">"A step trains on a batch of pairs: two sequences each (prompt + chosen, prompt + rejected). The evaluation scores the prompts with their chosen answers."</p>
        </div>
    }
}

#[component]
fn LoraFields(
    spec: RwSignal<Option<RunSpec>>,
    field_error: RwSignal<Option<String>>,
) -> impl IntoView {
    let get = move |f: fn(&MethodSpec) -> String| {
        spec.with(|s| s.as_ref().map(|s| f(&s.method)).unwrap_or_default())
    };
    let set = move |text: String, f: fn(&mut MethodSpec, &str) -> Result<(), String>| {
        let mut next = spec.get_untracked();
        if let Some(s) = next.as_mut() {
            match f(&mut s.method, &text) {
                Ok(()) => {
                    field_error.set(None);
                    spec.set(next);
                }
                Err(e) => field_error.set(Some(e)),
            }
        }
    };
    view! {
        <div class="grid-3 method-fields" id="lora-fields">
            <Field label="Rank (r)" hint="Size of each adapter: higher learns more and costs more.">
                <input id="lora-r" prop:value=move || get(|m| if let MethodSpec::Lora { r, .. } = m { r.to_string() } else { String::new() })
                    on:change=move |ev| set(event_target_value(&ev), |m, t| { if let MethodSpec::Lora { r, .. } = m { let v: usize = parse_num("Rank", t)?; if v == 0 { return Err("Rank must be at least 1".into()) } *r = v; } Ok(()) }) />
            </Field>
            <Field label="Alpha" hint="Scales the adapters' effect (often twice the rank).">
                <input id="lora-alpha" prop:value=move || get(|m| if let MethodSpec::Lora { alpha, .. } = m { alpha.to_string() } else { String::new() })
                    on:change=move |ev| set(event_target_value(&ev), |m, t| { if let MethodSpec::Lora { alpha, .. } = m { *alpha = parse_num("Alpha", t)?; } Ok(()) }) />
            </Field>
            <Field label="Dropout" hint="Randomly drops adapter inputs while training, against overfitting (0 to 0.5).">
                <input id="lora-dropout" prop:value=move || get(|m| if let MethodSpec::Lora { dropout, .. } = m { dropout.to_string() } else { String::new() })
                    on:change=move |ev| set(event_target_value(&ev), |m, t| { if let MethodSpec::Lora { dropout, .. } = m { let v: f32 = parse_num("Dropout", t)?; if !(0.0..1.0).contains(&v) { return Err("Dropout must be in [0, 1)".into()) } *dropout = v; } Ok(()) }) />
            </Field>
            <div class="field targets">
                <span class="field-label">"Adapted projections"</span>
                <div class="row">
                    {LORA_TARGETS.into_iter().map(|t| view! {
                        <label class="check">
                            <input type="checkbox" id=format!("lora-target-{t}")
                                prop:checked=move || spec.with(|s| matches!(s.as_ref().map(|s| &s.method), Some(MethodSpec::Lora { targets, .. }) if targets.iter().any(|x| x == t)))
                                on:change=move |ev| {
                                    let on = event_target_checked(&ev);
                                    let mut next = spec.get_untracked();
                                    if let Some(RunSpec { method: MethodSpec::Lora { targets, .. }, .. }) = next.as_mut() {
                                        targets.retain(|x| x != t);
                                        if on { targets.push(t.to_string()); }
                                        if targets.is_empty() {
                                            field_error.set(Some("LoRA needs at least one projection".into()));
                                        } else {
                                            field_error.set(None);
                                        }
                                    }
                                    spec.set(next);
                                } />
                            {t}
                        </label>
                    }).collect_view()}
                </div>
                <span class="field-hint">"Attention (q, k, v, o) and MLP (gate, up, down) layers that get adapters."</span>
            </div>
            <label class="check">
                <input type="checkbox" id="lora-rslora"
                    prop:checked=move || spec.with(|s| matches!(s.as_ref().map(|s| &s.method), Some(MethodSpec::Lora { rslora: true, .. })))
                    on:change=move |ev| {
                        let on = event_target_checked(&ev);
                        spec.update(|s| if let Some(RunSpec { method: MethodSpec::Lora { rslora, .. }, .. }) = s { *rslora = on; });
                    } />
                "rsLoRA scaling (alpha / √r): steadier at high ranks"
            </label>
        </div>
    }
}

#[component]
fn PromptFields(
    spec: RwSignal<Option<RunSpec>>,
    field_error: RwSignal<Option<String>>,
) -> impl IntoView {
    view! {
        <div class="grid-3 method-fields" id="prompt-fields">
            <Field label="Virtual tokens" hint="Length of the trained soft prompt; more tokens learn more.">
                <input id="prompt-tokens"
                    prop:value=move || spec.with(|s| match s.as_ref().map(|s| &s.method) { Some(MethodSpec::Prompt { virtual_tokens, .. }) => virtual_tokens.to_string(), _ => String::new() })
                    on:change=move |ev| {
                        let t = event_target_value(&ev);
                        match parse_num::<usize>("Virtual tokens", &t) {
                            Ok(v) if v > 0 => {
                                field_error.set(None);
                                spec.update(|s| if let Some(RunSpec { method: MethodSpec::Prompt { virtual_tokens, .. }, .. }) = s { *virtual_tokens = v; });
                            }
                            Ok(_) => field_error.set(Some("Virtual tokens must be at least 1".into())),
                            Err(e) => field_error.set(Some(e)),
                        }
                    } />
            </Field>
            <Field label="Start from text" hint="Initialise the soft prompt from this text's tokens (blank: random vocabulary).">
                <input id="prompt-init"
                    prop:value=move || spec.with(|s| match s.as_ref().map(|s| &s.method) { Some(MethodSpec::Prompt { init_text, .. }) => init_text.clone().unwrap_or_default(), _ => String::new() })
                    on:change=move |ev| {
                        let t = event_target_value(&ev);
                        spec.update(|s| if let Some(RunSpec { method: MethodSpec::Prompt { init_text, .. }, .. }) = s {
                            *init_text = (!t.trim().is_empty()).then(|| t.trim().to_string());
                        });
                    } />
            </Field>
        </div>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RunSpec {
        RunSpec {
            model: "1".into(),
            dataset: "2".into(),
            ..RunSpec::default()
        }
    }

    #[test]
    fn presets_scale_the_method() {
        let q = preset(&base(), "lora", "quick");
        assert!(matches!(q.method, MethodSpec::Lora { r: 8, .. }));
        assert_eq!(q.steps, Some(40));
        let t = preset(&base(), "lora", "thorough");
        assert!(matches!(t.method, MethodSpec::Lora { r: 32, .. }));
        assert_eq!((t.steps, t.epochs), (None, 3.0));
        let p = preset(&base(), "prompt", "standard");
        assert!(matches!(
            p.method,
            MethodSpec::Prompt {
                virtual_tokens: 20,
                ..
            }
        ));
        assert_eq!(p.lr, Some(3e-2));
        let f = preset(&base(), "full", "standard");
        assert_eq!(f.method, MethodSpec::Full);
        assert_eq!(f.lr, Some(2e-5));
    }

    #[test]
    fn numbers_parse_or_name_the_field() {
        assert_eq!(parse_num::<usize>("Rank", " 16 "), Ok(16));
        let e = parse_num::<usize>("Rank", "sixteen").unwrap_err();
        assert!(e.contains("Rank") && e.contains("sixteen"), "{e}");
    }
}
