//! The run monitor: every run in the library, the selected one live (loss, eval
//! loss, learning rate, grad norm and throughput charts, ETA, memory), pause,
//! resume, cancel and delete, and finished runs compared on one chart.
//!
//! Live figures arrive as `run-event`s from the shell; a run that was training when
//! the app closed comes back `paused` and is offered for resuming.

use crate::chart::{ChartData, LineChart};
use crate::components::{error_note, ConfirmButton, Progress};
use crate::{ipc, AppCtx, Page};
use attune_protocol::ErrorCode;
use attune_protocol::{
    BundleEngine, ChatTarget, IpcError, MetricKind, RunDetail, RunEvent, RunMetric, RunStatus,
    RunSummary,
};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// Line colours, readable on light and dark backgrounds.
pub const PALETTE: [&str; 6] = [
    "#5b57d6", "#e0803a", "#2e9e6a", "#d2505a", "#3a8fd6", "#a05cc8",
];

/// "running", "paused", ... as a pill class and text.
pub fn status_text(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Queued => "queued",
        RunStatus::Running => "training",
        RunStatus::Paused => "paused",
        RunStatus::Completed => "completed",
        RunStatus::Failed => "failed",
        RunStatus::Cancelled => "cancelled",
    }
}

/// Milliseconds since the epoch of an RFC 3339 time, when it parses.
fn time_ms(at: &str) -> Option<f64> {
    let ms = js_sys::Date::parse(at);
    ms.is_finite().then_some(ms)
}

/// Median of a non-empty slice.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Seconds per optimizer step: the median gap between the last (up to 20) recorded
/// training steps, so a pause in between does not distort it.
pub fn seconds_per_step(steps: &[(u64, f64)]) -> Option<f64> {
    let tail = &steps[steps.len().saturating_sub(21)..];
    let mut gaps: Vec<f64> = tail
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| (w[1].1 - w[0].1) / 1000.0 / (w[1].0 - w[0].0) as f64)
        .filter(|g| g.is_finite() && *g >= 0.0)
        .collect();
    median(&mut gaps)
}

/// "1 h 05 min", "4 min 10 s", "12 s".
pub fn duration_text(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "—".into();
    }
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

fn train_points(metrics: &[RunMetric], f: impl Fn(&RunMetric) -> Option<f64>) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter(|m| m.kind == MetricKind::Train)
        .filter_map(|m| f(m).map(|v| (m.step as f64, v)))
        .collect()
}

fn eval_points(metrics: &[RunMetric]) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter(|m| m.kind == MetricKind::Eval)
        .map(|m| (m.step as f64, m.loss))
        .collect()
}

fn single(label: &str, color: &str, pts: Vec<(f64, f64)>) -> ChartData {
    ChartData::from_points(vec![(label.into(), color.into(), false, pts)])
}

/// The monitor page.
#[component]
pub fn RunsPage() -> impl IntoView {
    let ctx = AppCtx::get();
    let runs: RwSignal<Vec<RunSummary>> = RwSignal::new(Vec::new());
    let list_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let detail: RwSignal<Option<RunDetail>> = RwSignal::new(None);
    let action_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let busy = RwSignal::new(false);
    // What the last "Export to a GPU machine" wrote.
    let bundle_note: RwSignal<Option<String>> = RwSignal::new(None);

    // The list follows the library.
    Effect::new(move |_| {
        ctx.library_version.track();
        spawn_local(async move {
            match ipc::runs::list_runs().await {
                Ok(mut list) => {
                    list.reverse(); // newest first
                    if ctx.focus_run.get_untracked().is_none() {
                        ctx.focus_run.set(list.first().map(|r| r.id));
                    }
                    runs.set(list);
                    list_error.set(None);
                }
                Err(e) => list_error.set(Some(e)),
            }
        });
    });

    let load_detail = move |id: i64| {
        spawn_local(async move {
            match ipc::runs::run_detail(id).await {
                Ok(d) => {
                    if ctx.focus_run.get_untracked() == Some(d.run.id) {
                        detail.set(Some(d));
                    }
                }
                Err(e) => action_error.set(Some(e)),
            }
        });
    };

    // The selected run's detail.
    Effect::new(move |_| {
        let id = ctx.focus_run.get();
        ctx.library_version.track();
        action_error.set(None);
        match id {
            Some(id) => load_detail(id),
            None => detail.set(None),
        }
    });

    // Live updates.
    ipc::events::listen_runs(move |u| {
        runs.update(|list| {
            if let Some(r) = list.iter_mut().find(|r| r.id == u.run_id) {
                match &u.event {
                    RunEvent::Started {
                        step, total_steps, ..
                    } => {
                        r.status = RunStatus::Running;
                        r.step = *step;
                        r.total_steps = *total_steps;
                    }
                    RunEvent::Step { metric } => r.step = metric.step,
                    RunEvent::Finished { status, .. } => r.status = *status,
                    _ => {}
                }
            }
        });
        if ctx.focus_run.get_untracked() != Some(u.run_id) {
            return;
        }
        match u.event {
            RunEvent::Started {
                step, total_steps, ..
            } => detail.update(|d| {
                if let Some(d) = d {
                    d.run.status = RunStatus::Running;
                    d.run.step = step;
                    d.run.total_steps = total_steps;
                    d.run.error = None;
                }
            }),
            RunEvent::Step { metric } => detail.update(|d| {
                if let Some(d) = d {
                    d.run.step = metric.step;
                    d.metrics.push(metric);
                }
            }),
            RunEvent::Eval { step, loss } => detail.update(|d| {
                if let Some(d) = d {
                    d.metrics.push(RunMetric {
                        step,
                        kind: MetricKind::Eval,
                        loss,
                        lr: None,
                        grad_norm: None,
                        tokens_per_s: None,
                        memory_mb: None,
                        at: String::new(),
                        pref: None,
                    });
                }
            }),
            RunEvent::Checkpoint { .. } => {}
            RunEvent::Finished { .. } => load_detail(u.run_id),
        }
    });

    let act = move |what: &'static str, id: i64| {
        busy.set(true);
        action_error.set(None);
        spawn_local(async move {
            let result = match what {
                "pause" => ipc::runs::pause_run(id).await,
                "resume" => ipc::runs::resume_run(id).await.map(|_| ()),
                "cancel" => ipc::runs::cancel_run(id).await,
                "remove" => ipc::runs::remove_run(id).await,
                _ => Ok(()),
            };
            busy.set(false);
            match result {
                Ok(()) => {
                    if what == "remove" {
                        ctx.focus_run.set(None);
                    }
                    ctx.library_changed();
                }
                Err(e) => action_error.set(Some(e)),
            }
        });
    };

    // The run as a bundle for TRL + accelerate (and Axolotl), into a new folder inside one
    // the user chooses in the system's folder chooser.
    let export_bundle = move |id: i64| {
        action_error.set(None);
        bundle_note.set(None);
        spawn_local(async move {
            let dir = match ipc::models::pick_path(
                "Write the run's bundle for a GPU machine into this folder",
                true,
                &[],
            )
            .await
            {
                Ok(Some(dir)) => dir,
                Ok(None) => return,
                Err(e) => {
                    action_error.set(Some(e));
                    return;
                }
            };
            busy.set(true);
            let result = ipc::runs::export_run_bundle(id, BundleEngine::Trl, &dir).await;
            busy.set(false);
            match result {
                Ok(b) => bundle_note.set(Some(format!(
                    "Wrote the bundle to {} ({} training rows). On the GPU machine run ./run.sh \
                     there (its README.md has the commands for several GPUs and nodes), then \
                     bring output/ back with `attune runs import-result {} DIR/output`.",
                    b.dir, b.train_rows, b.run_id
                ))),
                Err(e) => action_error.set(Some(e)),
            }
        });
    };

    let chat_with = move |adapter_name: String| {
        spawn_local(async move {
            match ipc::adapters::list_adapters().await {
                Ok(list) => match list.into_iter().find(|a| a.name == adapter_name) {
                    Some(a) => {
                        let target = ChatTarget::Adapter { adapter_id: a.id };
                        if let Ok(json) = serde_json::to_string(&target) {
                            ctx.set_setting("playground.open", json);
                        }
                        ctx.go(Page::Playground);
                    }
                    None => action_error.set(Some(IpcError {
                        code: ErrorCode::NotFound,
                        message: format!("adapter '{adapter_name}' is no longer in the library"),
                    })),
                },
                Err(e) => action_error.set(Some(e)),
            }
        });
    };

    let has_detail = Memo::new(move |_| detail.with(Option::is_some));
    // Chart data of the selected run.
    let metrics = Memo::new(move |_| {
        detail
            .with(|d| d.as_ref().map(|d| d.metrics.clone()))
            .unwrap_or_default()
    });
    let loss_data = Signal::derive(move || {
        metrics.with(|m| {
            ChartData::from_points(vec![
                (
                    "train loss".into(),
                    PALETTE[0].into(),
                    false,
                    train_points(m, |x| Some(x.loss)),
                ),
                ("eval loss".into(), PALETTE[1].into(), true, eval_points(m)),
            ])
        })
    });
    let lr_data = Signal::derive(move || {
        metrics.with(|m| single("learning rate", PALETTE[2], train_points(m, |x| x.lr)))
    });
    let gn_data = Signal::derive(move || {
        metrics.with(|m| single("grad norm", PALETTE[3], train_points(m, |x| x.grad_norm)))
    });
    let tps_data = Signal::derive(move || {
        metrics.with(|m| single("tokens/s", PALETTE[4], train_points(m, |x| x.tokens_per_s)))
    });
    // Preference runs (DPO, ORPO): TRL's rewards, their accuracy and the answers' log-probs.
    let is_pref = Memo::new(move |_| metrics.with(|m| m.iter().any(|x| x.pref.is_some())));
    let rewards_data = Signal::derive(move || {
        metrics.with(|m| {
            ChartData::from_points(vec![
                (
                    "chosen".into(),
                    PALETTE[0].into(),
                    false,
                    train_points(m, |x| x.pref.map(|p| p.rewards_chosen)),
                ),
                (
                    "rejected".into(),
                    PALETTE[1].into(),
                    false,
                    train_points(m, |x| x.pref.map(|p| p.rewards_rejected)),
                ),
                (
                    "margin".into(),
                    PALETTE[2].into(),
                    false,
                    train_points(m, |x| x.pref.map(|p| p.margin)),
                ),
            ])
        })
    });
    let acc_data = Signal::derive(move || {
        metrics.with(|m| {
            single(
                "reward accuracy",
                PALETTE[3],
                train_points(m, |x| x.pref.map(|p| p.accuracy)),
            )
        })
    });
    let logps_data = Signal::derive(move || {
        metrics.with(|m| {
            ChartData::from_points(vec![
                (
                    "chosen".into(),
                    PALETTE[0].into(),
                    false,
                    train_points(m, |x| x.pref.map(|p| p.logps_chosen)),
                ),
                (
                    "rejected".into(),
                    PALETTE[1].into(),
                    false,
                    train_points(m, |x| x.pref.map(|p| p.logps_rejected)),
                ),
            ])
        })
    });

    let run_row = move |r: RunSummary| {
        let id = r.id;
        let status = r.status;
        let fraction = if r.total_steps > 0 {
            r.step as f64 / r.total_steps as f64
        } else {
            0.0
        };
        view! {
            <li
                class="run-item"
                class:selected=move || ctx.focus_run.get() == Some(id)
                data-testid="run-item"
                data-name=r.name.clone()
                on:click=move |_| ctx.focus_run.set(Some(id))
            >
                <div class="run-item-head">
                    <span class="run-name">{r.name.clone()}</span>
                    <span class=format!("status status-{}", status.as_str())>{status_text(status)}</span>
                </div>
                <div class="run-item-sub muted">
                    {format!("{} · {} · step {}/{}", r.method, r.dataset, r.step, r.total_steps)}
                </div>
                <div class="mini-bar"><div style:width=format!("{:.0}%", fraction * 100.0)></div></div>
            </li>
        }
    };

    let detail_view = move || {
        let Some(d) = detail.get() else {
            return view! {
                <div class="card empty" id="run-empty">
                    "No run selected. Start one from the Adapt page."
                </div>
            }
            .into_any();
        };
        let r = d.run.clone();
        let train: Vec<&RunMetric> = d
            .metrics
            .iter()
            .filter(|m| m.kind == MetricKind::Train)
            .collect();
        let last = train.last().copied().cloned();
        let last_eval = d
            .metrics
            .iter()
            .rev()
            .find(|m| m.kind == MetricKind::Eval)
            .cloned();
        let stamps: Vec<(u64, f64)> = train
            .iter()
            .filter_map(|m| time_ms(&m.at).map(|t| (m.step, t)))
            .collect();
        let sps = seconds_per_step(&stamps);
        let remaining = r.total_steps.saturating_sub(r.step);
        let eta = match (r.status, sps) {
            (RunStatus::Running, Some(s)) => duration_text(s * remaining as f64),
            (RunStatus::Completed, _) => "done".into(),
            _ => "—".into(),
        };
        let fraction = if r.total_steps > 0 {
            Some(r.step as f64 / r.total_steps as f64)
        } else {
            None
        };
        let status = r.status;
        let progress_label = format!("step {} of {}", r.step, r.total_steps);
        view! {
            <div class="run-detail" id="run-detail" data-testid="run-detail">
                <div class="run-head">
                    <div>
                        <h2 id="run-title">{r.name.clone()}</h2>
                        <p class="muted">
                            {format!(
                                "{} on {} with {}",
                                attune_protocol::method_label(&d.spec.method),
                                r.model,
                                r.dataset,
                            )}
                        </p>
                    </div>
                    <span class=format!("status big status-{}", status.as_str()) id="run-status">
                        {status_text(status)}
                    </span>
                </div>
                {(status == RunStatus::Paused).then(|| view! {
                    <div class="notice" id="run-resumable">
                        "Paused at step " {r.step} " — it resumes from its last checkpoint. "
                        "A run that was training when Attune closed is paused here too."
                    </div>
                })}
                {r.error.clone().map(|e| view! {
                    <div class="notice error" id="run-error">{format!("The run failed: {e}")}</div>
                })}
                <Progress fraction=Signal::derive(move || fraction) label=Signal::derive(move || progress_label.clone()) />
                <div class="tiles">
                    <div class="tile"><span class="tile-label">"Train loss"</span>
                        <span class="tile-value" id="tile-loss">{last.as_ref().map(|m| format!("{:.4}", m.loss)).unwrap_or("—".into())}</span></div>
                    <div class="tile"><span class="tile-label">"Eval loss"</span>
                        <span class="tile-value" id="tile-eval">{last_eval.as_ref().map(|m| format!("{:.4}", m.loss)).unwrap_or("—".into())}</span></div>
                    <div class="tile"><span class="tile-label">"Tokens/s"</span>
                        <span class="tile-value" id="tile-tps">{last.as_ref().and_then(|m| m.tokens_per_s).map(|t| format!("{t:.0}")).unwrap_or("—".into())}</span></div>
                    <div class="tile"><span class="tile-label">"Time left"</span>
                        <span class="tile-value" id="tile-eta">{eta}</span></div>
                    <div class="tile"><span class="tile-label">"Memory"</span>
                        <span class="tile-value" id="tile-memory">
                            {last.as_ref().and_then(|m| m.memory_mb).map(|v| format!("{v:.0} MiB")).unwrap_or("—".into())}
                        </span>
                        <span class="tile-sub muted">{format!("estimated {} MiB", r.memory_estimate_mb)}</span></div>
                </div>
                {pref_tiles(&d.spec, last.as_ref())}
            </div>
        }
        .into_any()
    };

    // The buttons depend on the run and its status only, so a step arriving does not
    // rebuild them (and disarm a half-confirmed Cancel).
    let actions_key = Memo::new(move |_| {
        detail.with(|d| {
            d.as_ref()
                .map(|d| (d.run.id, d.run.status, d.adapter.clone()))
        })
    });
    let actions_view = move || {
        let (id, status, adapter) = actions_key.get()?;
        let can_pause = status == RunStatus::Running || status == RunStatus::Queued;
        let can_resume = matches!(status, RunStatus::Paused | RunStatus::Failed);
        let can_cancel = matches!(
            status,
            RunStatus::Running | RunStatus::Paused | RunStatus::Queued | RunStatus::Failed
        );
        let can_remove = !matches!(status, RunStatus::Running | RunStatus::Queued);
        Some(view! {
                <div class="row run-actions">
                {can_pause.then(|| view! {
                    <button class="secondary" id="run-pause" disabled=move || busy.get() on:click=move |_| act("pause", id)>"Pause"</button>
                })}
                {can_resume.then(|| view! {
                    <button id="run-resume" disabled=move || busy.get() on:click=move |_| act("resume", id)>"Resume"</button>
                })}
                {can_cancel.then(|| view! {
                    <ConfirmButton label="Cancel run" confirm_label="Really cancel? Its checkpoints go." id="run-cancel".to_string()
                        on_confirm=Callback::new(move |_| act("cancel", id)) />
                })}
                {can_remove.then(|| view! {
                    <ConfirmButton label="Delete run" id="run-remove".to_string()
                        on_confirm=Callback::new(move |_| act("remove", id)) />
                })}
                {adapter.clone().map(|a| {
                    let name = a.clone();
                    view! {
                        <button class="secondary" id="run-chat" on:click=move |_| chat_with(name.clone())>
                            {format!("Chat with {a}")}
                        </button>
                    }
                })}
                {(can_remove && adapter.is_none()).then(|| view! {
                    <button class="secondary" id="run-export-bundle" disabled=move || busy.get()
                        title="TRL + accelerate (and Axolotl) with DeepSpeed and FSDP configs; its result comes back with `attune runs import-result`"
                        on:click=move |_| export_bundle(id)>
                        "Export to a GPU machine"
                    </button>
                })}
            </div>
            {move || bundle_note.get().map(|n| view! { <p class="notice" id="run-bundle-note">{n}</p> })}
            {move || action_error.get().map(|e| error_note(&e))}
        })
    };

    view! {
        <section class="page wide runs-page" id="runs-page">
            <div class="runs-layout">
                <aside class="card runs-list">
                    <h1>"Runs"</h1>
                    {move || list_error.get().map(|e| error_note(&e))}
                    {move || {
                        let list = runs.get();
                        if list.is_empty() {
                            view! { <p class="empty" id="runs-empty">"No runs yet."</p> }.into_any()
                        } else {
                            view! { <ul class="run-items" id="run-list">{list.into_iter().map(run_row).collect_view()}</ul> }.into_any()
                        }
                    }}
                </aside>
                <div class="runs-main">
                    {detail_view}
                    {actions_view}
                    // Built once per shown run (not per step): the charts follow their data.
                    {move || has_detail.get().then(|| view! {
                        <div class="charts">
                            <LineChart title="Loss" data=loss_data id="chart-loss".to_string() />
                            <LineChart title="Learning rate" data=lr_data id="chart-lr".to_string() />
                            <LineChart title="Gradient norm" data=gn_data id="chart-grad".to_string() />
                            <LineChart title="Tokens per second" data=tps_data id="chart-tps".to_string() />
                            {move || is_pref.get().then(|| view! {
                                <LineChart title="Rewards (chosen, rejected, margin)" data=rewards_data id="chart-rewards".to_string() />
                                <LineChart title="Reward accuracy" data=acc_data id="chart-reward-acc".to_string() />
                                <LineChart title="Answer log-probs" data=logps_data id="chart-logps".to_string() />
                            })}
                        </div>
                        <details class="card run-settings">
                            <summary>"Settings of this run"</summary>
                            <pre>{move || detail.with(|d| d.as_ref().map(|d| serde_json::to_string_pretty(&d.spec).unwrap_or_default()))}</pre>
                        </details>
                    })}
                    <Compare runs=runs />
                </div>
            </div>
        </section>
    }
}

/// A preference run's last step: its objective, the reward margin, the implicit reward's
/// accuracy and the answers' log-probs (tiles under the usual ones; `None` for supervised runs).
fn pref_tiles(spec: &attune_protocol::RunSpec, last: Option<&RunMetric>) -> Option<AnyView> {
    let p = spec.preference?;
    let m = last.and_then(|m| m.pref);
    let fig = |f: fn(&attune_protocol::PrefMetric) -> f64, digits: usize| {
        m.as_ref()
            .map(|m| format!("{:.*}", digits, f(m)))
            .unwrap_or_else(|| "—".into())
    };
    let objective = match p.objective {
        attune_protocol::PreferenceObjective::Dpo => {
            format!("DPO ({} loss), beta {}", p.loss.as_str(), p.beta)
        }
        attune_protocol::PreferenceObjective::Orpo => format!("ORPO, beta {}", p.beta),
    };
    Some(
        view! {
            <div class="tiles pref-tiles" id="pref-tiles" data-testid="pref-tiles">
                <div class="tile"><span class="tile-label">"Objective"</span>
                    <span class="tile-value small" id="tile-objective">{objective}</span></div>
                <div class="tile" title="Reward of the chosen answers minus that of the rejected ones, averaged over the batch: grows as the model prefers the chosen answers more than the reference does.">
                    <span class="tile-label">"Reward margin"</span>
                    <span class="tile-value" id="tile-margin">{fig(|m| m.margin, 4)}</span>
                    <span class="tile-sub muted">{format!("chosen {} · rejected {}", fig(|m| m.rewards_chosen, 4), fig(|m| m.rewards_rejected, 4))}</span></div>
                <div class="tile" title="Share of the batch's pairs whose chosen answer has the higher implicit reward.">
                    <span class="tile-label">"Reward accuracy"</span>
                    <span class="tile-value" id="tile-accuracy">{m.map(|m| format!("{:.0}%", m.accuracy * 100.0)).unwrap_or_else(|| "—".into())}</span></div>
                <div class="tile" title="Summed log-probabilities of the answers under the model being trained.">
                    <span class="tile-label">"Log-prob chosen"</span>
                    <span class="tile-value" id="tile-logp-chosen">{fig(|m| m.logps_chosen, 2)}</span></div>
                <div class="tile"><span class="tile-label">"Log-prob rejected"</span>
                    <span class="tile-value" id="tile-logp-rejected">{fig(|m| m.logps_rejected, 2)}</span></div>
            </div>
        }
        .into_any(),
    )
}

/// Finished (or any) runs on one chart: eval loss and training loss per run.
#[component]
fn Compare(runs: RwSignal<Vec<RunSummary>>) -> impl IntoView {
    let chosen: RwSignal<Vec<i64>> = RwSignal::new(Vec::new());
    let curves: RwSignal<Vec<(String, Vec<RunMetric>)>> = RwSignal::new(Vec::new());
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);

    Effect::new(move |_| {
        let ids = chosen.get();
        spawn_local(async move {
            let mut out = Vec::new();
            for id in ids {
                match ipc::runs::run_detail(id).await {
                    Ok(d) => out.push((d.run.name, d.metrics)),
                    Err(e) => error.set(Some(e)),
                }
            }
            curves.set(out);
        });
    });

    let eval_data = Signal::derive(move || {
        curves.with(|c| {
            ChartData::from_points(
                c.iter()
                    .enumerate()
                    .map(|(i, (name, m))| {
                        (
                            name.clone(),
                            PALETTE[i % PALETTE.len()].to_string(),
                            true,
                            eval_points(m),
                        )
                    })
                    .collect(),
            )
        })
    });
    let train_data = Signal::derive(move || {
        curves.with(|c| {
            ChartData::from_points(
                c.iter()
                    .enumerate()
                    .map(|(i, (name, m))| {
                        (
                            name.clone(),
                            PALETTE[i % PALETTE.len()].to_string(),
                            false,
                            train_points(m, |x| Some(x.loss)),
                        )
                    })
                    .collect(),
            )
        })
    });

    view! {
        <details class="card compare" id="compare">
            <summary>"Compare runs"</summary>
            <p class="muted">"Tick runs to draw their curves together (up to six)."</p>
            <div class="compare-picks">
                {move || runs.get().into_iter().map(|r| {
                    let id = r.id;
                    view! {
                        <label class="check">
                            <input
                                type="checkbox"
                                data-testid="compare-pick"
                                prop:checked=move || chosen.with(|c| c.contains(&id))
                                on:change=move |ev| {
                                    let on = event_target_checked(&ev);
                                    chosen.update(|c| {
                                        c.retain(|x| *x != id);
                                        if on && c.len() < PALETTE.len() {
                                            c.push(id);
                                        }
                                    });
                                }
                            />
                            {format!("{} ({})", r.name, status_text(r.status))}
                        </label>
                    }
                }).collect_view()}
            </div>
            {move || error.get().map(|e| error_note(&e))}
            <div class="charts">
                <LineChart title="Eval loss" data=eval_data id="compare-eval".to_string() />
                <LineChart title="Training loss" data=train_data id="compare-train".to_string() />
            </div>
        </details>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_time_is_the_median_gap_so_a_pause_does_not_count() {
        // 2 s per step, with a 10-minute pause between steps 3 and 4.
        let pts = vec![
            (1, 0.0),
            (2, 2000.0),
            (3, 4000.0),
            (4, 604_000.0),
            (5, 606_000.0),
            (6, 608_000.0),
        ];
        assert_eq!(seconds_per_step(&pts), Some(2.0));
        assert_eq!(seconds_per_step(&pts[..1]), None);
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_text(12.4), "12 s");
        assert_eq!(duration_text(250.0), "4 min 10 s");
        assert_eq!(duration_text(3900.0), "1 h 05 min");
        assert_eq!(duration_text(f64::NAN), "—");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}
