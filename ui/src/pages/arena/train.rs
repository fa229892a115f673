//! "Train from these votes": the open arena's decisive votes (the human's, one judge's, or
//! combined: the human's where there is one, else the judge's) become a preference set of
//! chosen/rejected pairs; what was left out is counted, and the Adapt page opens with the set
//! focused for a DPO or ORPO run.

use crate::components::{ErrorSlot, Field};
use crate::{ipc, AppCtx, Page};
use attune_protocol::{
    ArenaResults, ArenaSummary, IpcError, JudgeKey, JudgeStats, PreferenceSet, VoteSource,
};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// What a preference set holds and what was left out, in one line.
pub fn pref_counts_text(s: &PreferenceSet) -> String {
    let mut out = format!("{} pair{}", s.pairs, if s.pairs == 1 { "" } else { "s" });
    if s.source == "arena" {
        if s.judge_pairs > 0 {
            out.push_str(&format!(
                " ({} from human votes, {} from the judge's)",
                s.human_pairs, s.judge_pairs
            ));
        }
        out.push_str(&format!(
            " · left out: {} tie{}, {} both bad, {} unvoted, {} unparseable",
            s.ties_skipped,
            if s.ties_skipped == 1 { "" } else { "s" },
            s.both_bad_skipped,
            s.unvoted_skipped,
            s.unparseable_skipped
        ));
    } else {
        out.push_str(" · imported from a preference JSONL");
    }
    out
}

/// A judge's key, as the arena's results group its votes.
pub fn judge_key(j: &JudgeStats) -> JudgeKey {
    JudgeKey {
        judge: j.judge.clone(),
        rubric_version: j.rubric_version,
        both_orders: j.both_orders,
        verdict: j.verdict,
    }
}

/// A judge in one line: who, rubric version, orders, verdict mode, votes.
pub fn judge_choice_label(j: &JudgeStats) -> String {
    format!(
        "{} · rubric v{} · {} · {} verdict · {} votes",
        j.judge_label,
        j.rubric_version,
        if j.both_orders {
            "both orders"
        } else {
            "one order"
        },
        j.verdict.as_str(),
        j.votes
    )
}

/// The vote source for `kind` ("human", "judge" or "combined") with judge `judge` of
/// `judges`; an error sentence when a judge is needed and there is none.
pub fn vote_source(kind: &str, judges: &[JudgeStats], judge: usize) -> Result<VoteSource, String> {
    if kind == "human" {
        return Ok(VoteSource::Human);
    }
    let Some(j) = judges.get(judge) else {
        return Err(
            "No judge has voted on this arena yet: let a judge vote (above), or use your votes."
                .into(),
        );
    };
    let judge = judge_key(j);
    Ok(match kind {
        "judge" => VoteSource::Judge { judge },
        _ => VoteSource::Combined { judge },
    })
}

/// The panel under the arena's results.
#[component]
pub fn TrainFromVotes(
    current: RwSignal<Option<ArenaSummary>>,
    results: RwSignal<Option<ArenaResults>>,
) -> impl IntoView {
    let ctx = AppCtx::get();
    let source = RwSignal::new("human".to_string());
    let judge = RwSignal::new(0usize);
    let name = RwSignal::new(String::new());
    let working = RwSignal::new(false);
    let made: RwSignal<Option<PreferenceSet>> = RwSignal::new(None);
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let judges = Memo::new(move |_| {
        results.with(|r| r.as_ref().map(|r| r.judges.clone()).unwrap_or_default())
    });
    // Another arena: start over (a new vote on this one keeps the note).
    let arena_id = Memo::new(move |_| current.with(|c| c.as_ref().map(|c| c.id)));
    Effect::new(move |_| {
        arena_id.track();
        made.set(None);
        error.set(None);
    });
    // With a judge's votes there, combined votes are the useful default.
    Effect::new(move |prev: Option<bool>| {
        let any = judges.with(|j| !j.is_empty());
        if any && prev == Some(false) && source.get_untracked() == "human" {
            source.set("combined".into());
        }
        if !any {
            source.set("human".into());
        }
        if judge.get_untracked() >= judges.with_untracked(Vec::len) {
            judge.set(0);
        }
        any
    });

    let make = move |_| {
        error.set(None);
        made.set(None);
        let Some(arena) = current.get_untracked() else {
            return;
        };
        let votes = match judges
            .with_untracked(|j| vote_source(&source.get_untracked(), j, judge.get_untracked()))
        {
            Ok(v) => v,
            Err(message) => {
                error.set(Some(IpcError {
                    code: attune_protocol::ErrorCode::InvalidInput,
                    message,
                }));
                return;
            }
        };
        let set_name = name.get_untracked();
        working.set(true);
        spawn_local(async move {
            match ipc::prefs::preferences_from_arena(arena.id, &set_name, &votes).await {
                Ok(set) => {
                    let id = set.dataset.id;
                    made.set(Some(set));
                    ctx.library_changed();
                    ctx.focus_dataset.set(Some(id));
                    ctx.go(Page::Adapt);
                }
                Err(e) => error.set(Some(e)),
            }
            working.set(false);
        });
    };

    view! {
        <div class="card arena-train" id="arena-train" style:display=move || if current.with(Option::is_some) { "block" } else { "none" }>
            <h2>"Train from these votes"</h2>
            <p class="field-hint">
                "Each decisive vote becomes a pair: the preferred answer is \"chosen\", the other \"rejected\". "
                "Preference training (DPO or ORPO, on the Adapt page) then makes the model favour answers like the chosen ones. "
                "Ties, \"both bad\", unvoted prompts and unreadable judge verdicts teach nothing and are left out (counted below)."
            </p>
            <div class="grid-2">
                <Field label="Whose votes" hint="Yours; one judge's; or combined: yours where you voted, else the judge's.">
                    <select id="arena-pref-source" on:change=move |ev| source.set(event_target_value(&ev)) prop:value=move || source.get()>
                        <option value="human" selected=move || source.get() == "human">"Your votes"</option>
                        <option value="judge" disabled=move || judges.with(Vec::is_empty) selected=move || source.get() == "judge">"The judge's votes"</option>
                        <option value="combined" disabled=move || judges.with(Vec::is_empty) selected=move || source.get() == "combined">"Combined: yours, else the judge's"</option>
                    </select>
                </Field>
                <Field label="Preference set name" hint="Blank: a name from the arena and the pairs (the same votes give the same set).">
                    <input type="text" id="arena-pref-name" prop:value=move || name.get() on:input=move |ev| name.set(event_target_value(&ev)) />
                </Field>
            </div>
            {move || {
                let list = judges.get();
                let kind = source.get();
                if kind == "human" {
                    return None;
                }
                Some(match list.len() {
                    0 => view! { <p class="muted" id="arena-pref-judge-none">"No judge has voted on this arena yet."</p> }.into_any(),
                    1 => view! { <p class="muted" id="arena-pref-judge-only">{format!("Judge: {}", judge_choice_label(&list[0]))}</p> }.into_any(),
                    _ => view! {
                        <Field label="Which judge" hint="Each judge (target, rubric version, orders, verdict mode) votes apart.">
                            <select id="arena-pref-judge" on:change=move |ev| judge.set(event_target_value(&ev).parse().unwrap_or(0)) prop:value=move || judge.get().to_string()>
                                {list.iter().enumerate().map(|(i, j)| view! {
                                    <option value=i.to_string() selected=move || judge.get() == i>{judge_choice_label(j)}</option>
                                }).collect_view()}
                            </select>
                        </Field>
                    }.into_any(),
                })
            }}
            <div class="row">
                <button id="arena-train-dpo" disabled=move || working.get() on:click=make>
                    {move || if working.get() { "Making the preference set…" } else { "Make a preference set and train on it" }}
                </button>
            </div>
            {move || made.get().map(|s| view! {
                <p class="notice" id="arena-pref-counts" data-pairs=s.pairs.to_string() data-ties=s.ties_skipped.to_string()
                    data-both-bad=s.both_bad_skipped.to_string() data-unvoted=s.unvoted_skipped.to_string()
                    data-unparseable=s.unparseable_skipped.to_string()>
                    {format!("Preference set '{}': {}. It is selected on the Adapt page.", s.dataset.name, pref_counts_text(&s))}
                </p>
            })}
            <ErrorSlot error=error />
        </div>
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attune_protocol::{
        Agreement, ArenaTally, ChatTarget, DatasetFormat, DatasetSummary, SampleKind, Split,
        VerdictMode, WinRates,
    };

    fn stats(label: &str) -> JudgeStats {
        let rates = WinRates {
            tally: ArenaTally::default(),
            a: None,
            b: None,
        };
        JudgeStats {
            judge: ChatTarget::Base { model_id: 1 },
            judge_label: label.into(),
            rubric_version: 2,
            both_orders: true,
            verdict: VerdictMode::Constrained,
            votes: 5,
            unparsed: 0,
            rates: rates.clone(),
            agreement: Agreement {
                n: 0,
                agreed: 0,
                percent: None,
                kappa: None,
                kappa_se: None,
                method: String::new(),
                table: [[0; 4]; 4],
            },
            combined: rates,
            combined_human: 0,
            combined_judge: 0,
        }
    }

    #[test]
    fn sources_name_their_judge_or_say_none_voted() {
        assert_eq!(vote_source("human", &[], 0), Ok(VoteSource::Human));
        let e = vote_source("combined", &[], 0).unwrap_err();
        assert!(e.contains("No judge"), "{e}");
        let js = [stats("m1"), stats("m2")];
        match vote_source("judge", &js, 1) {
            Ok(VoteSource::Judge { judge }) => {
                assert_eq!(judge.rubric_version, 2);
                assert_eq!(judge.verdict, VerdictMode::Constrained);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            vote_source("combined", &js, 0),
            Ok(VoteSource::Combined { .. })
        ));
        assert_eq!(
            judge_choice_label(&js[0]),
            "m1 · rubric v2 · both orders · constrained verdict · 5 votes"
        );
    }

    #[test]
    fn counts_say_what_was_left_out() {
        let dataset = DatasetSummary {
            id: 3,
            name: "p".into(),
            format: DatasetFormat::Chat,
            kind: SampleKind::Chat,
            source_path: "arena:1".into(),
            content_hash: "x".into(),
            created_at: "t".into(),
            train_rows: 4,
            valid_rows: 0,
            test_rows: 0,
            duplicates_removed: 0,
            bad_rows_skipped: 0,
            split: Split::AllTrain,
        };
        let set = PreferenceSet {
            dataset,
            source: "arena".into(),
            arena_id: Some(1),
            pairs: 4,
            ties_skipped: 1,
            both_bad_skipped: 2,
            unvoted_skipped: 0,
            votes: None,
            judge_label: None,
            unparseable_skipped: 1,
            human_pairs: 3,
            judge_pairs: 1,
        };
        assert_eq!(
            pref_counts_text(&set),
            "4 pairs (3 from human votes, 1 from the judge's) · left out: 1 tie, 2 both bad, 0 \
             unvoted, 1 unparseable"
        );
    }
}
