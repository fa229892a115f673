//! The blind A/B arena: pick two candidates and a prompt set; each prompt's answers
//! are shown side by side as "Left" and "Right" (which candidate is which is hidden
//! and shuffled per prompt); the user votes left, right, tie or both bad (keys 1–4).
//! Results show A's win rate with its 95% interval and, on request, the per-prompt
//! table with the sides revealed; decisive votes export as preference pairs (JSONL).

use crate::components::{error_note, ConfirmButton, ErrorSlot, Field};
use crate::pages::targets::{TargetCatalog, TargetSelect};
use crate::{ipc, markdown, AppCtx, Page};
use attune_protocol::ErrorCode;
use attune_protocol::{
    ArenaDetail, ArenaEvent, ArenaPrompts, ArenaSpec, ArenaSummary, ArenaTally, ChatTarget,
    DatasetSummary, IpcError, SamplingParams, SplitName, Vote,
};
use leptos::prelude::*;
use leptos::task::spawn_local;
use std::cell::Cell;
use std::rc::Rc;

// The judge beside the human voter (issue 17).
mod judge;
pub use judge::JudgePanel;
// Preference sets from the votes, for DPO/ORPO (issue 17).
mod train;
pub use train::{pref_counts_text, TrainFromVotes};

/// Typed prompts: one per non-blank line, trimmed.
pub fn parse_prompts(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A file-name-safe form of an arena name ("Pubmed vs base!" -> "pubmed-vs-base").
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "arena".to_string()
    } else {
        out
    }
}

/// The default export file for an arena.
pub fn default_export_path(name: &str) -> String {
    format!("~/attune-preferences-{}.jsonl", slug(name))
}

/// The export file inside a chosen folder.
pub fn export_path_in(folder: &str, name: &str) -> String {
    let folder = folder.trim_end_matches(['/', '\\']);
    let sep = if folder.contains('\\') && !folder.contains('/') {
        '\\'
    } else {
        '/'
    };
    format!("{folder}{sep}attune-preferences-{}.jsonl", slug(name))
}

/// The first prompt without a vote after `from` (wrapping round), if any.
pub fn next_unvoted(voted: &[bool], from: usize) -> Option<usize> {
    let n = voted.len();
    (1..=n).map(|k| (from + k) % n).find(|&i| !voted[i])
}

/// A rate as a percentage ("62.5%").
pub fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

/// The tally in one line of counts.
pub fn counts_line(t: &ArenaTally) -> String {
    format!(
        "A wins {} · B wins {} · ties {} · both bad {}",
        t.a_wins, t.b_wins, t.ties, t.both_bad
    )
}

/// Who won a row, by candidate label.
pub fn winner_label(winner: Option<&str>, a: &str, b: &str) -> String {
    match winner {
        Some("a") => format!("A: {a}"),
        Some("b") => format!("B: {b}"),
        Some("tie") => "Tie".to_string(),
        Some("both_bad") => "Both bad".to_string(),
        Some(other) => other.to_string(),
        None => "—".to_string(),
    }
}

fn vote_key(v: Vote) -> &'static str {
    match v {
        Vote::Left => "left",
        Vote::Right => "right",
        Vote::Tie => "tie",
        Vote::BothBad => "both bad",
    }
}

/// The A/B arena page.
#[component]
pub fn ArenaPage() -> impl IntoView {
    let ctx = AppCtx::get();
    let catalog = TargetCatalog::load();
    // Setup.
    let a: RwSignal<Option<ChatTarget>> = RwSignal::new(None);
    let b: RwSignal<Option<ChatTarget>> = RwSignal::new(None);
    let from_dataset = RwSignal::new(false);
    let typed = RwSignal::new(String::new());
    let datasets: RwSignal<Vec<DatasetSummary>> = RwSignal::new(Vec::new());
    let dataset: RwSignal<Option<i64>> = RwSignal::new(None);
    let split = RwSignal::new(SplitName::Test);
    let limit = RwSignal::new("20".to_string());
    let name = RwSignal::new(String::new());
    let temperature = RwSignal::new("0".to_string());
    let max_tokens = RwSignal::new("256".to_string());
    let creating = RwSignal::new(false);
    let setup_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let arenas: RwSignal<Vec<ArenaSummary>> = RwSignal::new(Vec::new());
    let list_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    // Voting.
    let current: RwSignal<Option<ArenaSummary>> = RwSignal::new(None);
    // The open arena's results with every judge (loaded by the judge panel).
    let judge_results: RwSignal<Option<attune_protocol::ArenaResults>> = RwSignal::new(None);
    let prompts: RwSignal<Vec<String>> = RwSignal::new(Vec::new());
    let voted: RwSignal<Vec<bool>> = RwSignal::new(Vec::new());
    let index = RwSignal::new(0usize);
    let left = RwSignal::new(String::new());
    let right = RwSignal::new(String::new());
    let loading_side: RwSignal<Option<String>> = RwSignal::new(None);
    let vote: RwSignal<Option<Vote>> = RwSignal::new(None);
    let generating = RwSignal::new(false);
    let item_ticket = StoredValue::new(0u64);
    // The item being generated, so Stop ends exactly it.
    let current_request = StoredValue::new(None::<String>);
    let vote_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let detail: RwSignal<Option<ArenaDetail>> = RwSignal::new(None);
    let export_path = RwSignal::new(String::new());
    let export_note: RwSignal<Option<String>> = RwSignal::new(None);
    let export_error: RwSignal<Option<IpcError>> = RwSignal::new(None);

    let reload_arenas = move || {
        spawn_local(async move {
            match ipc::arena::list_arenas().await {
                Ok(list) => {
                    arenas.set(list);
                    list_error.set(None);
                }
                Err(e) => list_error.set(Some(e)),
            }
        });
    };
    Effect::new(move |_| {
        ctx.library_version.track();
        reload_arenas();
        spawn_local(async move {
            if let Ok(list) = ipc::datasets::list_datasets().await {
                if dataset
                    .get_untracked()
                    .is_none_or(|d| !list.iter().any(|x| x.id == d))
                {
                    dataset.set(list.first().map(|d| d.id));
                }
                datasets.set(list);
            }
        });
    });

    // Loads (generating on first view) prompt `i` of the open arena.
    let show_item = move |i: usize| {
        let Some(arena) = current.get_untracked() else {
            return;
        };
        let ticket = item_ticket.get_value() + 1;
        item_ticket.set_value(ticket);
        index.set(i);
        left.set(String::new());
        right.set(String::new());
        vote.set(None);
        vote_error.set(None);
        loading_side.set(None);
        generating.set(true);
        let finished = Rc::new(Cell::new(false));
        let finished_in_events = finished.clone();
        spawn_local(async move {
            let on_event = move |event: Result<ArenaEvent, IpcError>| {
                if finished_in_events.get() || item_ticket.get_value() != ticket {
                    return;
                }
                match event {
                    Ok(ArenaEvent::Loading { side }) => loading_side.set(Some(side)),
                    Ok(ArenaEvent::Token { side, text }) => {
                        loading_side.set(None);
                        let target = if side == "left" { left } else { right };
                        target.update(|t| t.push_str(&text));
                    }
                    Err(e) => vote_error.set(Some(e)),
                }
            };
            let request_id = ipc::chat::new_request_id("arena");
            current_request.set_value(Some(request_id.clone()));
            let result = ipc::arena::arena_item(&request_id, arena.id, i as u64, on_event).await;
            finished.set(true);
            if current_request.get_value().as_deref() == Some(request_id.as_str()) {
                current_request.set_value(None);
            }
            if item_ticket.get_value() != ticket {
                return;
            }
            match result {
                Ok(item) => {
                    left.set(item.left);
                    right.set(item.right);
                    vote.set(item.vote);
                    prompts.update(|p| {
                        if let Some(slot) = p.get_mut(i) {
                            *slot = item.prompt;
                        }
                    });
                }
                Err(e) => vote_error.set(Some(e)),
            }
            loading_side.set(None);
            generating.set(false);
        });
    };

    let open_arena = move |arena: ArenaSummary| {
        let arena_id = arena.id;
        export_path.set(default_export_path(&arena.name));
        export_note.set(None);
        export_error.set(None);
        detail.set(None);
        // Whatever the previous arena was generating no longer concerns this view.
        item_ticket.set_value(item_ticket.get_value() + 1);
        generating.set(false);
        prompts.set(Vec::new());
        voted.set(Vec::new());
        index.set(0);
        left.set(String::new());
        right.set(String::new());
        vote.set(None);
        vote_error.set(None);
        current.set(Some(arena));
        spawn_local(async move {
            match ipc::arena::arena_detail(arena_id).await {
                Ok(d) => {
                    let marks: Vec<bool> = d.rows.iter().map(|r| r.winner.is_some()).collect();
                    prompts.set(d.rows.iter().map(|r| r.prompt.clone()).collect());
                    let start = if marks.first() == Some(&false) {
                        Some(0)
                    } else {
                        next_unvoted(&marks, 0)
                    };
                    voted.set(marks);
                    current.set(Some(d.arena));
                    if !prompts.with_untracked(Vec::is_empty) {
                        show_item(start.unwrap_or(0));
                    }
                }
                Err(e) => vote_error.set(Some(e)),
            }
        });
    };

    let create = move |_| {
        setup_error.set(None);
        let fail = |message: String| {
            setup_error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message,
            }))
        };
        let (Some(ta), Some(tb)) = (a.get_untracked(), b.get_untracked()) else {
            fail("Choose both candidates, A and B.".into());
            return;
        };
        if ta == tb {
            fail("Candidates A and B are the same: choose two different ones.".into());
            return;
        }
        let source = if from_dataset.get_untracked() {
            let Some(dataset_id) = dataset.get_untracked() else {
                fail("Choose a dataset (import one on the Import data page).".into());
                return;
            };
            let lim = match limit.get_untracked().trim() {
                "" => None,
                t => match t.parse::<usize>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => {
                        fail(format!("Prompt limit \"{t}\" must be a whole number above 0, or empty for every row."));
                        return;
                    }
                },
            };
            ArenaPrompts::Dataset {
                dataset_id,
                split: split.get_untracked(),
                limit: lim,
            }
        } else {
            let list = parse_prompts(&typed.get_untracked());
            if list.is_empty() {
                fail("Type at least one prompt (one per line).".into());
                return;
            }
            ArenaPrompts::Typed { prompts: list }
        };
        let temp = match temperature.get_untracked().trim().parse::<f64>() {
            Ok(t) if t.is_finite() && t >= 0.0 => t,
            _ => {
                fail("Temperature must be a number of 0 or more (0 is greedy).".into());
                return;
            }
        };
        let max = match max_tokens.get_untracked().trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                fail("Max tokens must be a whole number above 0.".into());
                return;
            }
        };
        let typed_name = name.get_untracked().trim().to_string();
        let spec = ArenaSpec {
            name: (!typed_name.is_empty()).then_some(typed_name),
            a: ta,
            b: tb,
            prompts: source,
            params: SamplingParams {
                temperature: temp,
                max_tokens: max,
                ..SamplingParams::default()
            },
            seed: (js_sys::Math::random() * 9_007_199_254_740_991.0) as u64,
        };
        creating.set(true);
        spawn_local(async move {
            match ipc::arena::create_arena(&spec).await {
                Ok(arena) => {
                    reload_arenas();
                    open_arena(arena);
                }
                Err(e) => setup_error.set(Some(e)),
            }
            creating.set(false);
        });
    };

    let cast = move |v: Vote| {
        let Some(arena) = current.get_untracked() else {
            return;
        };
        if generating.get_untracked() {
            return;
        }
        let i = index.get_untracked();
        spawn_local(async move {
            match ipc::arena::arena_vote(arena.id, i as u64, v).await {
                Ok(summary) => {
                    current.set(Some(summary));
                    vote.set(Some(v));
                    voted.update(|m| {
                        if let Some(slot) = m.get_mut(i) {
                            *slot = true;
                        }
                    });
                    if detail.get_untracked().is_some() {
                        if let Ok(d) = ipc::arena::arena_detail(arena.id).await {
                            detail.set(Some(d));
                        }
                    }
                    if let Some(next) = voted.with_untracked(|m| next_unvoted(m, i)) {
                        show_item(next);
                    }
                }
                Err(e) => vote_error.set(Some(e)),
            }
        });
    };

    let stop = move || {
        let Some(request_id) = current_request.get_value() else {
            return;
        };
        spawn_local(async move {
            if let Err(e) = ipc::chat::cancel_chat(&request_id).await {
                vote_error.set(Some(e));
            }
        });
    };

    // Keys 1–4 vote while the arena page is shown and no text field has focus.
    let _keys = window_event_listener(leptos::ev::keydown, move |ev| {
        if ctx.page.get_untracked() != Page::Arena || current.with_untracked(Option::is_none) {
            return;
        }
        if ev.ctrl_key() || ev.alt_key() || ev.meta_key() {
            return;
        }
        let typing = web_sys::window()
            .and_then(|w| w.document())
            .and_then(|d| d.active_element())
            .is_some_and(|el| matches!(el.tag_name().as_str(), "INPUT" | "TEXTAREA" | "SELECT"));
        if typing {
            return;
        }
        let v = match ev.key().as_str() {
            "1" => Vote::Left,
            "2" => Vote::Right,
            "3" => Vote::Tie,
            "4" => Vote::BothBad,
            _ => return,
        };
        ev.prevent_default();
        cast(v);
    });

    let reveal = move |_| {
        let Some(arena) = current.get_untracked() else {
            return;
        };
        spawn_local(async move {
            match ipc::arena::arena_detail(arena.id).await {
                Ok(d) => detail.set(Some(d)),
                Err(e) => vote_error.set(Some(e)),
            }
        });
    };

    let browse = move |_| {
        spawn_local(async move {
            match ipc::models::pick_path("Choose a folder for the preference pairs", true, &[])
                .await
            {
                Ok(Some(folder)) => {
                    let arena_name = current.get_untracked().map(|a| a.name).unwrap_or_default();
                    export_path.set(export_path_in(&folder, &arena_name));
                }
                Ok(None) => {}
                Err(e) => export_error.set(Some(e)),
            }
        });
    };
    let export = move |_| {
        let Some(arena) = current.get_untracked() else {
            return;
        };
        let path = export_path.get_untracked().trim().to_string();
        if path.is_empty() {
            export_error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Type the file to write the preference pairs to.".into(),
            }));
            return;
        }
        spawn_local(async move {
            match ipc::arena::export_preferences(arena.id, &path).await {
                Ok(n) => {
                    export_error.set(None);
                    export_note.set(Some(format!(
                        "Wrote {n} pair{} to {path}",
                        if n == 1 { "" } else { "s" }
                    )));
                }
                Err(e) => {
                    export_note.set(None);
                    export_error.set(Some(e));
                }
            }
        });
    };

    let delete_arena = move |arena_id: i64| {
        spawn_local(async move {
            match ipc::arena::remove_arena(arena_id).await {
                Ok(()) => {
                    if current.with_untracked(|c| c.as_ref().is_some_and(|c| c.id == arena_id)) {
                        current.set(None);
                        detail.set(None);
                    }
                    reload_arenas();
                }
                Err(e) => list_error.set(Some(e)),
            }
        });
    };

    let answer_column = move |title: &'static str,
                              id: &'static str,
                              text: RwSignal<String>,
                              side: &'static str| {
        view! {
            <div class="card arena-answer" id=id data-testid=id>
                <h3>{title}</h3>
                {move || {
                    let t = text.get();
                    if t.is_empty() && generating.get() {
                        let note = if loading_side.get().as_deref() == Some(side) { "loading model…" } else { "…" };
                        view! { <p class="muted">{note}</p> }.into_any()
                    } else {
                        view! { <div class="markdown" data-testid="answer" inner_html=markdown::to_html(&t)></div> }.into_any()
                    }
                }}
            </div>
        }
    };

    let vote_button = move |label: &'static str, key: &'static str, id: &'static str, v: Vote| {
        view! {
            <button
                class="secondary vote"
                id=id
                class:chosen=move || vote.get() == Some(v)
                disabled=move || generating.get()
                on:click=move |_| cast(v)
            >
                {label}
                " "
                <kbd>{key}</kbd>
            </button>
        }
    };

    let results = move || {
        current.get().map(|arena| {
            let t = arena.tally.clone();
            let rate = t.a_win_rate;
            let lo = t.ci_low.unwrap_or(0.0).clamp(0.0, 1.0);
            let hi = t.ci_high.unwrap_or(1.0).clamp(0.0, 1.0);
            view! {
                <div class="card arena-results">
                    <h2>"Results"</h2>
                    <p class="arena-rate">
                        "A's win rate "
                        <strong id="arena-win-rate" data-testid="arena-win-rate">{rate.map(percent).unwrap_or_else(|| "—".into())}</strong>
                        {rate.map(|_| format!(" (95% interval {}–{})", percent(lo), percent(hi)))}
                        " · ties count half, both-bad votes are left out"
                    </p>
                    <div class="ci-track" id="arena-ci" data-testid="arena-ci" title="95% confidence interval of A's win rate">
                        <div class="ci-half"></div>
                        {rate.map(|r| view! {
                            <div class="ci-range" style:left=format!("{:.2}%", lo * 100.0) style:width=format!("{:.2}%", (hi - lo).max(0.0) * 100.0)></div>
                            <div class="ci-point" style:left=format!("{:.2}%", r.clamp(0.0, 1.0) * 100.0)></div>
                        })}
                    </div>
                    <div class="ci-scale muted"><span>"B better"</span><span>"50%"</span><span>"A better"</span></div>
                    <p class="muted" id="arena-counts">{counts_line(&t)}</p>
                    <div class="row">
                        <button class="secondary" id="arena-reveal" on:click=reveal>
                            {move || if detail.get().is_some() { "Refresh table" } else { "Reveal per-prompt table" }}
                        </button>
                    </div>
                    {move || detail.get().map(|d| {
                        let a_label = d.arena.a_label.clone();
                        let b_label = d.arena.b_label.clone();
                        view! {
                            <table class="data arena-table" id="arena-table">
                                <thead>
                                    <tr>
                                        <th class="num">"#"</th>
                                        <th>"Prompt"</th>
                                        <th>{format!("A: {a_label}")}</th>
                                        <th>{format!("B: {b_label}")}</th>
                                        <th>"Winner"</th>
                                    </tr>
                                </thead>
                                <tbody>
                                    {d.rows.into_iter().map(|r| view! {
                                        <tr>
                                            <td class="num">{r.index + 1}</td>
                                            <td class="cell-text">{r.prompt}</td>
                                            <td><div class="markdown cell-text" inner_html=markdown::to_html(r.a_answer.as_deref().unwrap_or("—"))></div></td>
                                            <td><div class="markdown cell-text" inner_html=markdown::to_html(r.b_answer.as_deref().unwrap_or("—"))></div></td>
                                            <td>{winner_label(r.winner.as_deref(), &a_label, &b_label)}</td>
                                        </tr>
                                    }).collect_view()}
                                </tbody>
                            </table>
                        }
                    })}
                    <h3>"Export preference pairs"</h3>
                    <p class="field-hint">"Decisive votes (left or right) as JSONL lines: prompt, chosen, rejected."</p>
                    <div class="row">
                        <input type="text" class="grow" id="arena-export-path" prop:value=move || export_path.get() on:input=move |ev| export_path.set(event_target_value(&ev)) />
                        <button class="secondary" id="arena-export-browse" on:click=browse>"Browse…"</button>
                        <button id="arena-export" on:click=export>"Export"</button>
                    </div>
                    {move || export_note.get().map(|n| view! { <p class="notice" id="arena-export-note">{n}</p> })}
                    <ErrorSlot error=export_error />
                </div>
            }
        })
    };

    view! {
        <section class="page wide arena-page" id="arena-page">
            <h1>"A/B arena"</h1>
            <div class="arena-layout">
                <div class="arena-side">
                    <div class="card arena-setup">
                        <h2>"New comparison"</h2>
                        <Field label="Candidate A">
                            <TargetSelect catalog=catalog selected=a id="arena-a" />
                        </Field>
                        <Field label="Candidate B">
                            <TargetSelect catalog=catalog selected=b id="arena-b" />
                        </Field>
                        <div class="row">
                            <label><input type="radio" name="arena-source" id="arena-source-typed" prop:checked=move || !from_dataset.get() on:change=move |_| from_dataset.set(false) />" Typed prompts"</label>
                            <label><input type="radio" name="arena-source" id="arena-source-dataset" prop:checked=move || from_dataset.get() on:change=move |_| from_dataset.set(true) />" A dataset split"</label>
                        </div>
                        <div style:display=move || if from_dataset.get() { "none" } else { "block" }>
                            <Field label="Prompts" hint="One prompt per line.">
                                <textarea id="arena-prompts" rows="5" prop:value=move || typed.get() on:input=move |ev| typed.set(event_target_value(&ev))></textarea>
                            </Field>
                        </div>
                        <div class="grid-3" style:display=move || if from_dataset.get() { "grid" } else { "none" }>
                            <Field label="Dataset">
                                <select id="arena-dataset" on:change=move |ev| dataset.set(event_target_value(&ev).parse().ok()) prop:value=move || dataset.get().map(|d| d.to_string()).unwrap_or_default()>
                                    {move || {
                                        let list = datasets.get();
                                        if list.is_empty() {
                                            return view! { <option value="">"No datasets"</option> }.into_any();
                                        }
                                        list.into_iter().map(|d| {
                                            let did = d.id;
                                            view! { <option value=did.to_string() selected=move || dataset.get() == Some(did)>{d.name}</option> }
                                        }).collect_view().into_any()
                                    }}
                                </select>
                            </Field>
                            <Field label="Split">
                                <select id="arena-split" on:change=move |ev| { if let Some(s) = SplitName::parse(&event_target_value(&ev)) { split.set(s) } } prop:value=move || split.get().as_str()>
                                    {SplitName::ALL.into_iter().map(|s| view! { <option value=s.as_str() selected=move || split.get() == s>{s.as_str()}</option> }).collect_view()}
                                </select>
                            </Field>
                            <Field label="Limit" hint="Empty: every row.">
                                <input type="number" min="1" id="arena-limit" prop:value=move || limit.get() on:input=move |ev| limit.set(event_target_value(&ev)) />
                            </Field>
                        </div>
                        <div class="grid-3">
                            <Field label="Name" hint="Optional.">
                                <input type="text" id="arena-name" prop:value=move || name.get() on:input=move |ev| name.set(event_target_value(&ev)) />
                            </Field>
                            <Field label="Temperature" hint="0 is greedy.">
                                <input type="number" min="0" step="0.05" id="arena-temperature" prop:value=move || temperature.get() on:input=move |ev| temperature.set(event_target_value(&ev)) />
                            </Field>
                            <Field label="Max tokens">
                                <input type="number" min="1" id="arena-max-tokens" prop:value=move || max_tokens.get() on:input=move |ev| max_tokens.set(event_target_value(&ev)) />
                            </Field>
                        </div>
                        <button id="arena-create" disabled=move || creating.get() on:click=create>"Create and start voting"</button>
                        <ErrorSlot error=setup_error />
                    </div>
                    <div class="card">
                        <h2>"Comparisons"</h2>
                        <ErrorSlot error=list_error />
                        <ul class="arena-list" id="arena-list">
                            {move || {
                                let list = arenas.get();
                                if list.is_empty() {
                                    return view! { <li class="muted">"No comparisons yet."</li> }.into_any();
                                }
                                list.into_iter().map(|s| {
                                    let sid = s.id;
                                    let rate = s.tally.a_win_rate.map(|r| format!(" · A wins {}", percent(r))).unwrap_or_default();
                                    let meta = format!("{} vs {} · {}/{} voted{}", s.a_label, s.b_label, s.votes, s.prompts, rate);
                                    let sname = s.name.clone();
                                    view! {
                                        <li class:current=move || current.with(|c| c.as_ref().is_some_and(|c| c.id == sid))>
                                            <button class="link" id=format!("open-arena-{sid}") on:click=move |_| open_arena(s.clone())>
                                                <span class="arena-name">{sname}</span>
                                                <span class="muted">{meta}</span>
                                            </button>
                                            <ConfirmButton label="Delete" id=format!("delete-arena-{sid}") on_confirm=Callback::new(move |_| delete_arena(sid)) />
                                        </li>
                                    }
                                }).collect_view().into_any()
                            }}
                        </ul>
                    </div>
                </div>
                <div class="arena-main">
                    {move || match current.get() {
                        None => view! { <p class="empty card">"Create a comparison or open one to start voting."</p> }.into_any(),
                        Some(arena) => {
                            let n = prompts.with(Vec::len);
                            view! {
                                <div class="card arena-voting">
                                    <div class="row">
                                        <h2>{arena.name.clone()}</h2>
                                        <span class="spacer"></span>
                                        <span class="muted" id="arena-progress" data-testid="arena-progress">
                                            {move || format!("Prompt {} of {} · {} voted", index.get() + 1, n, voted.with(|v| v.iter().filter(|x| **x).count()))}
                                        </span>
                                    </div>
                                    <div class="arena-prompt" id="arena-prompt" data-testid="arena-prompt">
                                        {move || prompts.with(|p| p.get(index.get()).cloned().unwrap_or_default())}
                                    </div>
                                    <div class="grid-2 arena-answers">
                                        {answer_column("Left", "arena-left", left, "left")}
                                        {answer_column("Right", "arena-right", right, "right")}
                                    </div>
                                    <div class="row arena-votes">
                                        {vote_button("Left is better", "1", "vote-left", Vote::Left)}
                                        {vote_button("Right is better", "2", "vote-right", Vote::Right)}
                                        {vote_button("Tie", "3", "vote-tie", Vote::Tie)}
                                        {vote_button("Both bad", "4", "vote-both-bad", Vote::BothBad)}
                                        <span class="spacer"></span>
                                        {move || generating.get().then(|| view! { <button class="danger" id="arena-stop" on:click=move |_| stop()>"Stop"</button> })}
                                        <button class="secondary" id="arena-prev" disabled={move || generating.get() || index.get() == 0} on:click=move |_| show_item(index.get_untracked().saturating_sub(1))>"← Previous"</button>
                                        <button class="secondary" id="arena-next" disabled={move || generating.get() || index.get() + 1 >= n} on:click=move |_| show_item(index.get_untracked() + 1)>"Next →"</button>
                                    </div>
                                    <p class="muted" id="arena-vote-state">
                                        {move || vote.get().map(|v| format!("Your vote: {} (vote again to change it)", vote_key(v))).unwrap_or_else(|| "Not voted yet.".into())}
                                        {move || (voted.with(|v| !v.is_empty() && v.iter().all(|x| *x))).then_some(" Every prompt has a vote.")}
                                    </p>
                                    {move || vote_error.get().map(|e| error_note(&e))}
                                </div>
                            }.into_any()
                        }
                    }}
                    {results}
                    <JudgePanel catalog=catalog current=current results=judge_results />
                    <TrainFromVotes current=current results=judge_results />
                </div>
            </div>
        </section>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_one_per_line() {
        assert_eq!(
            parse_prompts("  first \n\n second\n   \n"),
            vec!["first", "second"]
        );
        assert!(parse_prompts("\n \n").is_empty());
    }

    #[test]
    fn slugs_and_paths_are_file_safe() {
        assert_eq!(slug("Pubmed vs base!"), "pubmed-vs-base");
        assert_eq!(slug("  ??  "), "arena");
        assert_eq!(
            default_export_path("A/B 1"),
            "~/attune-preferences-a-b-1.jsonl"
        );
        assert_eq!(
            export_path_in("/home/u/out/", "x"),
            "/home/u/out/attune-preferences-x.jsonl"
        );
        assert_eq!(
            export_path_in("C:\\Users\\u", "x"),
            "C:\\Users\\u\\attune-preferences-x.jsonl"
        );
    }

    #[test]
    fn next_unvoted_wraps_and_ends() {
        assert_eq!(next_unvoted(&[true, false, true, false], 1), Some(3));
        assert_eq!(next_unvoted(&[false, true, true], 2), Some(0));
        assert_eq!(next_unvoted(&[true, true], 0), None);
        assert_eq!(next_unvoted(&[], 0), None);
    }

    #[test]
    fn labels_read_naturally() {
        assert_eq!(percent(0.625), "62.5%");
        assert_eq!(winner_label(Some("a"), "base", "lora"), "A: base");
        assert_eq!(winner_label(Some("both_bad"), "x", "y"), "Both bad");
        assert_eq!(winner_label(None, "x", "y"), "—");
        let t = ArenaTally {
            a_wins: 3,
            b_wins: 1,
            ties: 2,
            both_bad: 0,
            ..Default::default()
        };
        assert_eq!(counts_line(&t), "A wins 3 · B wins 1 · ties 2 · both bad 0");
    }
}
