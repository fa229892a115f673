//! The arena's judge panel: the rubric editor (versioned), "Let a judge vote" (a model,
//! adapter, template or endpoint model; only prompts without a human vote, or all;
//! optionally both orders; a free-text or a constrained verdict), its progress with Stop, and the results beside the human
//! votes: win rates of both sides with 95% intervals, how many votes are human and how
//! many the judge's, percent agreement and Cohen's kappa with their intervals.

use crate::components::{ErrorSlot, Field};
use crate::ipc;
use crate::pages::targets::{TargetCatalog, TargetSelect};
use attune_protocol::{
    Agreement, ArenaResults, ArenaSummary, ChatTarget, Estimate, IpcError, JudgeEvent, JudgeScope,
    JudgeSpec, VerdictMode, WinRates,
};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// An estimate as "62.5% (95% CI 40.1–80.2%)"; "—" without one.
pub fn estimate_text(e: Option<&Estimate>) -> String {
    match e {
        Some(e) => format!(
            "{:.1}% (95% CI {:.1}–{:.1}%)",
            e.value * 100.0,
            e.low * 100.0,
            e.high * 100.0
        ),
        None => "—".to_string(),
    }
}

/// Both sides' win rates in one line.
pub fn rates_text(w: &WinRates) -> String {
    format!(
        "A {} · B {}",
        estimate_text(w.a.as_ref()),
        estimate_text(w.b.as_ref())
    )
}

/// Agreement in one line: percent and kappa with their intervals.
pub fn agreement_text(g: &Agreement) -> String {
    if g.n == 0 {
        return "No prompt has both a human and a judge vote yet.".to_string();
    }
    let kappa = match (&g.kappa, g.kappa_se) {
        (Some(k), Some(se)) => format!(
            "Cohen's κ {:.2} (95% CI {:.2} to {:.2}, SE {se:.2})",
            k.value, k.low, k.high
        ),
        _ => "Cohen's κ undefined (every vote in one category)".to_string(),
    };
    format!(
        "Agreement on {} prompts: {} ({} agreed) · {kappa}",
        g.n,
        estimate_text(g.percent.as_ref()),
        g.agreed
    )
}

/// The judge panel for the open arena.
#[component]
pub fn JudgePanel(
    catalog: TargetCatalog,
    current: RwSignal<Option<ArenaSummary>>,
    /// The open arena's results (shared with "Train from these votes").
    results: RwSignal<Option<ArenaResults>>,
) -> impl IntoView {
    let judge: RwSignal<Option<ChatTarget>> = RwSignal::new(None);
    let rubric = RwSignal::new(String::new());
    let rubric_note: RwSignal<Option<String>> = RwSignal::new(None);
    let rubric_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let both_orders = RwSignal::new(true);
    let every_prompt = RwSignal::new(false);
    let verdict = RwSignal::new(VerdictMode::Free);
    let max_tokens = RwSignal::new("128".to_string());
    let running = RwSignal::new(false);
    let progress: RwSignal<Option<String>> = RwSignal::new(None);
    let judge_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let request = StoredValue::new(None::<String>);

    let show_rubric = move |r: attune_protocol::Rubric| {
        rubric.set(r.text);
        rubric_note.set(Some(format!(
            "Rubric version {}{}",
            r.version,
            if r.is_default { " (the default)" } else { "" }
        )));
    };
    Effect::new(move |_| {
        spawn_local(async move {
            match ipc::arena::judge_rubric().await {
                Ok(r) => show_rubric(r),
                Err(e) => rubric_error.set(Some(e)),
            }
        });
    });
    let reload_results = move |arena_id: i64| {
        spawn_local(async move {
            match ipc::arena::arena_results(arena_id).await {
                Ok(r) => results.set(Some(r)),
                Err(e) => judge_error.set(Some(e)),
            }
        });
    };
    // The results follow the open arena (and its votes).
    Effect::new(move |_| match current.get() {
        Some(a) => reload_results(a.id),
        None => results.set(None),
    });

    let save_rubric = move |_| {
        rubric_error.set(None);
        let text = rubric.get_untracked();
        spawn_local(async move {
            match ipc::arena::save_judge_rubric(&text).await {
                Ok(r) => show_rubric(r),
                Err(e) => rubric_error.set(Some(e)),
            }
        });
    };

    let start = move |_| {
        judge_error.set(None);
        let fail = |message: &str| {
            judge_error.set(Some(IpcError {
                code: attune_protocol::ErrorCode::InvalidInput,
                message: message.into(),
            }))
        };
        let Some(arena) = current.get_untracked() else {
            return;
        };
        let Some(target) = judge.get_untracked() else {
            fail("Choose who judges.");
            return;
        };
        let Ok(max) = max_tokens.get_untracked().trim().parse::<usize>() else {
            fail("Verdict length must be a whole number of tokens.");
            return;
        };
        let spec = JudgeSpec {
            arena_id: arena.id,
            judge: target,
            rubric: Some(rubric.get_untracked()),
            both_orders: both_orders.get_untracked(),
            scope: if every_prompt.get_untracked() {
                JudgeScope::All
            } else {
                JudgeScope::Unvoted
            },
            max_tokens: max,
            redo: false,
            verdict: verdict.get_untracked(),
        };
        running.set(true);
        progress.set(Some("Starting…".into()));
        spawn_local(async move {
            let request_id = ipc::chat::new_request_id("judge");
            request.set_value(Some(request_id.clone()));
            let on_event = move |ev: Result<JudgeEvent, IpcError>| match ev {
                Ok(JudgeEvent::Started { total, .. }) => {
                    progress.set(Some(format!("0 of {total} prompts judged")))
                }
                Ok(JudgeEvent::Answering { index }) => progress.set(Some(format!(
                    "Generating the answers to prompt {} first…",
                    index + 1
                ))),
                Ok(JudgeEvent::Voted { done, total, .. }) => {
                    progress.set(Some(format!("{done} of {total} prompts judged")))
                }
                Err(e) => judge_error.set(Some(e)),
            };
            match ipc::arena::judge_arena(&request_id, &spec, on_event).await {
                Ok(r) => {
                    let orders = if r.both_orders {
                        let counted = match r.verdict {
                            VerdictMode::Free => "counted as ties",
                            VerdictMode::Constrained => "the vote balances both orders",
                        };
                        format!(
                            "; both orders, {} disagreed ({counted})",
                            r.order_disagreements
                        )
                    } else {
                        String::new()
                    };
                    progress.set(Some(format!(
                        "Judged {} prompts ({} verdicts unreadable), skipped {}; rubric v{}{orders}.",
                        r.judged, r.unparsed, r.skipped, r.rubric_version
                    )));
                }
                Err(e) => {
                    progress.set(None);
                    judge_error.set(Some(e));
                }
            }
            request.set_value(None);
            running.set(false);
            if let Ok(r) = ipc::arena::judge_rubric().await {
                show_rubric(r);
            }
            reload_results(spec.arena_id);
        });
    };
    let stop = move |_| {
        if let Some(id) = request.get_value() {
            spawn_local(async move {
                if let Err(e) = ipc::chat::cancel_chat(&id).await {
                    judge_error.set(Some(e));
                }
            });
        }
    };

    view! {
        <div class="card arena-judge" id="arena-judge" style:display=move || if current.with(Option::is_some) { "block" } else { "none" }>
            <h2>"A judge beside you"</h2>
            <p class="field-hint">"A model votes on the prompts against the rubric. Its votes are kept apart from yours; the results compare the two."</p>
            <Field label="Rubric" hint="What makes an answer better. Saved as a new version when it changes.">
                <textarea id="judge-rubric" rows="8" prop:value=move || rubric.get() on:input=move |ev| rubric.set(event_target_value(&ev))></textarea>
            </Field>
            <div class="row">
                <button class="secondary" id="judge-rubric-save" on:click=save_rubric>"Save rubric"</button>
                <span class="muted" id="judge-rubric-version">{move || rubric_note.get()}</span>
            </div>
            <ErrorSlot error=rubric_error />
            <div class="grid-2">
                <Field label="Judge">
                    <TargetSelect catalog=catalog selected=judge id="judge-target" />
                </Field>
                <Field label="Verdict length" hint="Tokens.">
                    <input type="number" min="1" id="judge-max-tokens" prop:value=move || max_tokens.get() on:input=move |ev| max_tokens.set(event_target_value(&ev)) />
                </Field>
            </div>
            <div class="row">
                <label><input type="checkbox" id="judge-both-orders" prop:checked=move || both_orders.get() on:change=move |ev| both_orders.set(event_target_checked(&ev)) />" Judge both orders (disagreement counts as a tie)"</label>
                <label>"Verdict "
                    <select id="judge-verdict" on:change=move |ev| verdict.set(VerdictMode::parse(&event_target_value(&ev)).unwrap_or_default())>
                        <option value="free" selected=move || verdict.get() == VerdictMode::Free>"written (any judge)"</option>
                        <option value="constrained" selected=move || verdict.get() == VerdictMode::Constrained>"constrained: the most likely verdict (local judges)"</option>
                    </select>
                </label>
                <label><input type="checkbox" id="judge-all" prop:checked=move || every_prompt.get() on:change=move |ev| every_prompt.set(event_target_checked(&ev)) />" Also prompts you voted on (to measure agreement)"</label>
            </div>
            <div class="row">
                <button id="judge-start" disabled=move || running.get() on:click=start>"Let a judge vote"</button>
                {move || running.get().then(|| view! { <button class="danger" id="judge-stop" on:click=stop>"Stop"</button> })}
                <span class="muted" id="judge-progress">{move || progress.get()}</span>
            </div>
            <ErrorSlot error=judge_error />
            {move || results.get().map(|r| {
                let human = rates_text(&r.human);
                let human_n = r.arena.votes;
                view! {
                    <div class="judge-results" id="judge-results">
                        <h3>"Results"</h3>
                        <p id="judge-human-rates">{format!("Your votes ({human_n}): {human}")}</p>
                        {r.judges.into_iter().enumerate().map(|(i, j)| {
                            let orders = if j.both_orders { "both orders" } else { "one order" };
                            let orders = format!("{orders} · {} verdict", j.verdict.as_str());
                            view! {
                                <div class="judge-stats" id=format!("judge-stats-{i}")>
                                    <h4>{format!("{} · rubric v{} · {orders}", j.judge_label, j.rubric_version)}</h4>
                                    <p>{format!("Judge's votes ({}, {} unreadable): {}", j.votes, j.unparsed, rates_text(&j.rates))}</p>
                                    <p class="judge-combined">{format!("Combined ({} yours + {} the judge's): {}", j.combined_human, j.combined_judge, rates_text(&j.combined))}</p>
                                    <p class="judge-agreement">{agreement_text(&j.agreement)}</p>
                                </div>
                            }
                        }).collect_view()}
                    </div>
                }
            })}
        </div>
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attune_protocol::ArenaTally;

    #[test]
    fn figures_read_with_their_intervals() {
        let e = Estimate {
            value: 0.625,
            low: 0.3,
            high: 0.85,
        };
        assert_eq!(estimate_text(Some(&e)), "62.5% (95% CI 30.0–85.0%)");
        assert_eq!(estimate_text(None), "—");
        let w = WinRates {
            tally: ArenaTally::default(),
            a: Some(e),
            b: None,
        };
        assert_eq!(rates_text(&w), "A 62.5% (95% CI 30.0–85.0%) · B —");
        let mut g = Agreement {
            n: 0,
            agreed: 0,
            percent: None,
            kappa: None,
            kappa_se: None,
            method: String::new(),
            table: [[0; 4]; 4],
        };
        assert!(agreement_text(&g).starts_with("No prompt"));
        g.n = 50;
        g.agreed = 35;
        g.percent = Some(Estimate {
            value: 0.7,
            low: 0.5625,
            high: 0.809,
        });
        g.kappa = Some(Estimate {
            value: 0.4,
            low: 0.151,
            high: 0.649,
        });
        g.kappa_se = Some(0.127);
        assert_eq!(
            agreement_text(&g),
            "Agreement on 50 prompts: 70.0% (95% CI 56.2–80.9%) (35 agreed) · Cohen's κ 0.40 \
             (95% CI 0.15 to 0.65, SE 0.13)"
        );
    }
}
