//! Preference sets and DPO/ORPO runs on the real default model (SQLite on disk, tiny budgets).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use attune_protocol::{
    ArenaPrompts, ArenaSpec, ChatTarget, JudgeKey, MethodSpec, MetricKind, PreferenceLoss,
    PreferenceObjective, PreferenceSpec, RunSpec, RunStatus, SamplingParams, TemplateDraft,
    VerdictMode, Vote,
};

use super::*;
use crate::runs::RunControl;

fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(&dir.path().join("data")).expect("open engine");
    (dir, engine)
}

fn sample() -> PathBuf {
    attune_test_support::test_data("prefs-sample.jsonl")
}

fn stored(e: &Engine, set: &PreferenceSet) -> Vec<Value> {
    e.store
        .dataset_rows(set.dataset.id, "train")
        .expect("rows")
        .iter()
        .map(|r| serde_json::from_str(&r.data).expect("json"))
        .collect()
}

#[test]
fn prefs_import_trl_formats_and_refuse_bad_lines() {
    let (dir, e) = engine();
    let set = e.import_preferences(&sample(), "prefs").expect("import");
    assert_eq!((set.pairs, set.source.as_str()), (6, "jsonl"));
    assert_eq!(set.dataset.train_rows, 6);
    let rows = stored(&e, &set);
    assert_eq!(rows[1]["chosen"][0]["role"], "assistant");
    assert!(rows[1]["chosen"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .contains("vitamin C"));
    // The same file again under the same name: the same set, nothing added.
    let again = e.import_preferences(&sample(), "prefs").expect("again");
    assert_eq!(again.dataset.id, set.dataset.id);
    assert_eq!(e.list_datasets().expect("list").len(), 1);
    // Plain strings are TRL's other format.
    let plain = dir.path().join("plain.jsonl");
    std::fs::write(
        &plain,
        "{\"prompt\": \"2+2=\", \"chosen\": \"4\", \"rejected\": \"5\"}\n\n",
    )
    .expect("write");
    let p = e.import_preferences(&plain, "plain").expect("plain");
    assert_eq!(p.pairs, 1);
    // Bad lines name the line and the field; nothing is written.
    for (text, want) in [
        (
            "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": [{\"role\": \"assistant\", \"content\": \"b\"}], \"rejected\": \"c\"}\n",
            "line 2",
        ),
        ("{\"prompt\": \"a\", \"chosen\": \"b\"}\n", "\"rejected\" is missing"),
        ("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"b\"}\n", "same answer"),
        ("not json\n", "line 1: not JSON"),
        ("\n", "no preference rows"),
        (
            "{\"prompt\": [{\"role\": \"robot\", \"content\": \"x\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"b\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"c\"}]}\n",
            "role 'robot'",
        ),
    ] {
        let f = dir.path().join("bad.jsonl");
        std::fs::write(&f, text).expect("write");
        let err = e.import_preferences(&f, "bad").expect_err(want);
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    assert_eq!(e.list_datasets().expect("list").len(), 2);
    // A name taken by other pairs is refused.
    let err = e.import_preferences(&plain, "prefs").expect_err("taken");
    assert!(err.to_string().contains("prefs"), "{err}");
}

#[test]
fn prefs_list_shows_only_preference_sets_newest_first() {
    let (dir, e) = engine();
    assert!(e.list_preference_sets().expect("empty").is_empty());
    // An ordinary dataset is not a preference set.
    let plain = dir.path().join("chat.jsonl");
    std::fs::write(
        &plain,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    )
    .expect("write");
    let ordinary = e
        .import_dataset(
            &plain,
            &attune_protocol::ImportOptions {
                name: Some("ordinary".into()),
                split: attune_protocol::Split::AllTrain,
                ..Default::default()
            },
        )
        .expect("ordinary dataset");
    let first = e.import_preferences(&sample(), "first").expect("import");
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\": \"2+2=\", \"chosen\": \"4\", \"rejected\": \"5\"}\n",
    )
    .expect("write");
    let second = e.import_preferences(&pairs, "second").expect("import");
    let listed = e.list_preference_sets().expect("list");
    let names: Vec<&str> = listed.iter().map(|s| s.dataset.name.as_str()).collect();
    assert_eq!(names, ["second", "first"]);
    assert_eq!(listed[0], second);
    assert_eq!(listed[1], first);
    assert!(listed.iter().all(|s| s.dataset.id != ordinary.id));
    // A removed set leaves the list.
    e.remove_dataset(first.dataset.id).expect("remove");
    let names: Vec<String> = e
        .list_preference_sets()
        .expect("list")
        .into_iter()
        .map(|s| s.dataset.name)
        .collect();
    assert_eq!(names, ["second"]);
}

fn pref_spec(model: i64, dataset: i64, name: &str, objective: PreferenceObjective) -> RunSpec {
    RunSpec {
        name: Some(name.to_string()),
        model: model.to_string(),
        dataset: dataset.to_string(),
        method: MethodSpec::Lora {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            rslora: false,
        },
        preference: Some(PreferenceSpec {
            objective,
            beta: 0.1,
            loss: PreferenceLoss::Sigmoid,
        }),
        batch_size: 2,
        steps: Some(2),
        lr: Some(1e-3),
        max_len: 128,
        checkpoint_every: 0,
        forgetting_rows: 0,
        ..Default::default()
    }
}

/// The advisor on a preference set: presets train DPO (or the goal's objective), evaluate the
/// chosen answers, and full fine-tuning's DPO estimate holds the reference copy.
#[test]
fn prefs_advisor_presets_train_preferences_and_count_the_reference() {
    let (_dir, e) = engine();
    let model = e
        .add_local_model(&attune_test_support::default_model())
        .expect("model")
        .model;
    let set = e.import_preferences(&sample(), "prefs").expect("import");
    let goal = |objective: Option<PreferenceObjective>| attune_protocol::AdvisorGoal {
        model_id: model.id,
        dataset_id: Some(set.dataset.id),
        preference: objective.map(|objective| PreferenceSpec {
            objective,
            ..PreferenceSpec::default()
        }),
        ..Default::default()
    };
    let dpo = e.advise(&goal(None)).expect("advise dpo");
    let orpo = e
        .advise(&goal(Some(PreferenceObjective::Orpo)))
        .expect("advise orpo");
    let est = |a: &attune_protocol::Advice, m: &str| {
        a.estimates
            .iter()
            .find(|x| x.method == m)
            .cloned()
            .expect("estimate")
    };
    assert!(dpo.estimates.iter().all(|x| x.method != "template"));
    assert_ne!(dpo.recommended, "template");
    // Six pairs: the set is said to be small, in pairs, without the advice to put worked
    // examples into a template (which cannot learn from pairs).
    assert!(
        dpo.reasons
            .iter()
            .any(|r| r.starts_with("The preference set has only 6 pairs")),
        "{:?}",
        dpo.reasons
    );
    assert!(
        dpo.reasons
            .iter()
            .all(|r| !r.starts_with("The dataset has only")),
        "{:?}",
        dpo.reasons
    );
    let lora = est(&dpo, "lora");
    let spec = lora.spec.expect("lora preset");
    assert_eq!(
        spec.preference.map(|p| p.objective),
        Some(PreferenceObjective::Dpo)
    );
    assert_eq!(spec.eval_split, attune_protocol::SplitName::Train);
    assert!(lora.tokens_per_epoch > 0);
    assert_eq!(
        est(&orpo, "lora")
            .spec
            .and_then(|s| s.preference)
            .map(|p| p.objective),
        Some(PreferenceObjective::Orpo)
    );
    // DPO on full fine-tuning holds a frozen copy, which the estimate names; ORPO and LoRA
    // hold none. (The peaks themselves include this test process's resident memory, which
    // the other tests running beside it move, so they are not compared here.)
    let copy_mb =
        (4 * e.model_shape(&model).expect("shape").num_parameters() as u64).div_ceil(1 << 20);
    let dpo_full = est(&dpo, "full");
    assert!(
        dpo_full
            .summary
            .contains(&format!("reference copy, {copy_mb} MB")),
        "{}",
        dpo_full.summary
    );
    assert!(!est(&orpo, "full").summary.contains("reference copy"));
    assert!(!est(&dpo, "lora").summary.contains("reference copy"));
    let full_spec = dpo_full.spec.expect("full preset");
    assert_eq!(
        e.plan_run(&full_spec)
            .expect("plan full")
            .memory
            .reference
            .div_ceil(1 << 20),
        copy_mb
    );
    // The preset is accepted as it is by the run's own pre-flight.
    let mut run = spec.clone();
    run.steps = Some(1);
    e.plan_run(&run)
        .expect("the advisor's preference preset plans");
}

/// A preference run evaluated on "train" scores the prompts with their chosen answers (it
/// used to fail: a pair is not a sample).
#[test]
fn prefs_run_evaluated_on_train_scores_the_chosen_answers() {
    let (_dir, e) = engine();
    let model = e
        .add_local_model(&attune_test_support::default_model())
        .expect("model")
        .model;
    let set = e.import_preferences(&sample(), "prefs").expect("import");
    let mut spec = pref_spec(
        model.id,
        set.dataset.id,
        "dpo-eval",
        PreferenceObjective::Dpo,
    );
    spec.steps = Some(1);
    spec.eval_split = attune_protocol::SplitName::Train;
    spec.eval_limit = Some(2);
    let run = e.create_run(&spec).expect("create");
    let done = e
        .execute_run(run.id, &mut |_| {}, &RunControl::new())
        .expect("execute");
    assert_eq!(done.status, RunStatus::Completed, "{done:?}");
    let evals: Vec<f64> = e
        .run_detail("dpo-eval")
        .expect("detail")
        .metrics
        .iter()
        .filter(|m| m.kind == MetricKind::Eval)
        .map(|m| m.loss)
        .collect();
    assert!(!evals.is_empty(), "no evaluation recorded");
    assert!(evals.iter().all(|l| l.is_finite() && *l > 0.0), "{evals:?}");
    // The chosen answers of the two rows, as chat samples: prompt then chosen.
    let rows = e.store.dataset_rows(set.dataset.id, "train").expect("rows");
    let samples = chosen_samples(&rows[..2], "prefs").expect("samples");
    match &samples[1] {
        crate::datasets::Sample::Chat(m) => {
            assert_eq!(m.last().map(|m| m.role.as_str()), Some("assistant"));
            assert!(m.last().is_some_and(|m| m.content.contains("vitamin C")));
        }
        other => panic!("expected a chat sample, got {other:?}"),
    }
}

#[test]
fn prefs_dpo_and_orpo_runs_record_rewards_and_register_adapters() {
    let (dir, e) = engine();
    let model = e
        .add_local_model(&attune_test_support::default_model())
        .expect("model")
        .model;
    let set = e.import_preferences(&sample(), "prefs").expect("import");
    let run = e
        .create_run(&pref_spec(
            model.id,
            set.dataset.id,
            "dpo-run",
            PreferenceObjective::Dpo,
        ))
        .expect("create");
    assert_eq!(run.total_steps, 2);
    let done = e
        .execute_run(run.id, &mut |_| {}, &RunControl::new())
        .expect("execute");
    assert_eq!(done.status, RunStatus::Completed, "{done:?}");
    let detail = e.run_detail("dpo-run").expect("detail");
    assert_eq!(
        detail.spec.preference.map(|p| p.objective),
        Some(PreferenceObjective::Dpo)
    );
    let train: Vec<_> = detail
        .metrics
        .iter()
        .filter(|m| m.kind == MetricKind::Train)
        .collect();
    assert_eq!(train.len(), 2);
    // Step 1: LoRA's B is zero, so the policy is its reference: loss ln 2, no margin.
    let p1 = train[0].pref.expect("step 1 figures");
    assert!(
        (train[0].loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        train[0].loss
    );
    assert!(p1.margin.abs() < 1e-6 && p1.accuracy == 0.0, "{p1:?}");
    assert!(p1.logps_chosen < 0.0 && p1.logps_rejected < 0.0, "{p1:?}");
    // Step 2 ran on updated weights: the rewards moved off zero.
    let p2 = train[1].pref.expect("step 2 figures");
    assert!(
        p2.rewards_chosen != 0.0 && p2.rewards_rejected != 0.0,
        "{p2:?}"
    );
    assert!((p2.margin - (p2.rewards_chosen - p2.rewards_rejected)).abs() < 1e-9);
    assert_eq!(detail.adapter.as_deref(), Some("dpo-run"));
    // ORPO: reference-free; its loss includes the chosen answers' NLL, so it is far above ln 2.
    let run = e
        .create_run(&pref_spec(
            model.id,
            set.dataset.id,
            "orpo-run",
            PreferenceObjective::Orpo,
        ))
        .expect("create orpo");
    let done = e
        .execute_run(run.id, &mut |_| {}, &RunControl::new())
        .expect("execute orpo");
    assert_eq!(done.status, RunStatus::Completed, "{done:?}");
    let m = e.run_detail("orpo-run").expect("detail").metrics;
    let first = m
        .iter()
        .find(|m| m.kind == MetricKind::Train)
        .expect("step");
    assert!(first.loss > 1.0 && first.pref.is_some(), "{first:?}");

    // Supervised training on a preference set, and DPO on single answers, are refused.
    let mut sft = pref_spec(model.id, set.dataset.id, "sft", PreferenceObjective::Dpo);
    sft.preference = None;
    let err = e.create_run(&sft).expect_err("sft on pairs");
    assert!(err.to_string().contains("preference set"), "{err}");
    let chat = dir.path().join("chat.jsonl");
    let lines: String = (0..4)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("hi {i}")},
                {"role": "assistant", "content": format!("hello {i}")},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&chat, lines).expect("write");
    let ds = e
        .import_dataset(&chat, &attune_protocol::ImportOptions::default())
        .expect("chat dataset");
    let err = e
        .create_run(&pref_spec(
            model.id,
            ds.id,
            "dpo-chat",
            PreferenceObjective::Dpo,
        ))
        .expect_err("dpo on chat");
    assert!(err.to_string().contains("single answers"), "{err}");
    let mut bad_beta = pref_spec(model.id, set.dataset.id, "beta", PreferenceObjective::Dpo);
    bad_beta.preference = Some(PreferenceSpec {
        beta: 0.0,
        ..PreferenceSpec::default()
    });
    let err = e.create_run(&bad_beta).expect_err("beta 0");
    assert!(err.to_string().contains("beta"), "{err}");

    // DPO on full fine-tuning holds a reference copy: the estimate counts it.
    let mut full = pref_spec(model.id, set.dataset.id, "full", PreferenceObjective::Dpo);
    full.method = MethodSpec::Full;
    let dpo_full = e.plan_run(&full).expect("plan").memory;
    let mut orpo_full = full.clone();
    orpo_full.preference = Some(PreferenceSpec {
        objective: PreferenceObjective::Orpo,
        ..PreferenceSpec::default()
    });
    let orpo_full = e.plan_run(&orpo_full).expect("plan orpo").memory;
    let copy = 4 * e.model_shape(&model).expect("shape").num_parameters() as u64;
    assert_eq!((dpo_full.reference, orpo_full.reference), (copy, 0));
    // Without what this test process held at each plan (`held`: other tests train in it at
    // the same time, and it moved by 62 MB between the two plans in one CI run).
    assert!(
        dpo_full.total - dpo_full.held > orpo_full.total - orpo_full.held + copy,
        "{dpo_full:?} vs {orpo_full:?}"
    );
    // And it trains: at step 1 the copy and the model agree (the copy runs the inference
    // kernels, so to rounding, not exactly), so the loss is ln 2.
    full.steps = Some(1);
    full.lr = Some(1e-5);
    let run = e.create_run(&full).expect("create full dpo");
    let done = e
        .execute_run(run.id, &mut |_| {}, &RunControl::new())
        .expect("execute full dpo");
    assert_eq!(done.status, RunStatus::Completed, "{done:?}");
    let m = e.run_detail("full").expect("detail").metrics;
    let first = m
        .iter()
        .find(|m| m.kind == MetricKind::Train)
        .expect("step");
    let p = first.pref.expect("figures");
    assert!(
        (first.loss - std::f64::consts::LN_2).abs() < 1e-4,
        "{first:?}"
    );
    assert!(p.margin.abs() < 1e-3, "{p:?}");
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        repetition_penalty: 1.0,
        ..SamplingParams::default()
    }
}

#[test]
fn prefs_from_arena_votes_leave_out_ties_both_bad_and_unvoted() {
    let (_dir, e) = engine();
    let model = e
        .add_local_model(&attune_test_support::default_model())
        .expect("add")
        .model;
    let template = e
        .save_template(&TemplateDraft {
            name: "Pirate".into(),
            system: Some("Talk like a pirate.".into()),
            ..Default::default()
        })
        .expect("template");
    let arena = e
        .create_arena(&ArenaSpec {
            name: None,
            a: ChatTarget::Base { model_id: model.id },
            b: ChatTarget::Template {
                model_id: model.id,
                template_id: template.id,
                version: None,
                values: BTreeMap::new(),
                endpoint: None,
            },
            prompts: ArenaPrompts::Typed {
                prompts: vec![
                    "Say hi.".into(),
                    "Name a color.".into(),
                    "Name a fruit.".into(),
                    "Name a number.".into(),
                    "Name a planet.".into(),
                ],
            },
            params: greedy(4),
            seed: 3,
        })
        .expect("arena");
    let err = e
        .preferences_from_arena(arena.id, None, &VoteSource::Human)
        .expect_err("no votes");
    assert!(err.to_string().contains("no decisive human votes"), "{err}");
    let no = AtomicBool::new(false);
    let mut items = Vec::new();
    for i in 0..4 {
        items.push(
            e.arena_item(arena.id, i, &no, &mut |_| {})
                .expect("generate"),
        );
    }
    // Two items whose answers differ get the decisive votes (two identical answers count as a
    // tie whatever the vote, and which greedy answers coincide depends on the products' rounding:
    // f32, bf16 or int8), the other two a tie and "both bad".
    let differ: Vec<usize> = (0..4)
        .filter(|&i| items[i].left != items[i].right)
        .collect();
    assert!(
        differ.len() >= 2,
        "fewer than two items with different answers: {items:?}"
    );
    let (l, r) = (differ[0], differ[1]);
    let rest: Vec<usize> = (0..4).filter(|&i| i != l && i != r).collect();
    e.arena_vote(arena.id, l as u64, Vote::Left).expect("vote");
    e.arena_vote(arena.id, r as u64, Vote::Right).expect("vote");
    e.arena_vote(arena.id, rest[0] as u64, Vote::Tie)
        .expect("vote");
    e.arena_vote(arena.id, rest[1] as u64, Vote::BothBad)
        .expect("vote");
    // Prompt 4 is never shown nor voted on.
    let set = e
        .preferences_from_arena(arena.id, None, &VoteSource::Human)
        .expect("pairs");
    assert_eq!(
        (
            set.pairs,
            set.ties_skipped,
            set.both_bad_skipped,
            set.unvoted_skipped
        ),
        (2, 1, 1, 1)
    );
    assert_eq!(
        (set.source.as_str(), set.arena_id),
        ("arena", Some(arena.id))
    );
    let rows = stored(&e, &set);
    assert_eq!(rows[0]["chosen"][0]["content"], items[l].left.as_str());
    assert_eq!(rows[0]["rejected"][0]["content"], items[l].right.as_str());
    assert_eq!(rows[1]["chosen"][0]["content"], items[r].right.as_str());
    assert_eq!(rows[0]["prompt"].as_array().map(|a| a.len()), Some(1));
    let prompts = [
        "Say hi.",
        "Name a color.",
        "Name a fruit.",
        "Name a number.",
    ];
    assert_eq!(rows[0]["prompt"][0]["content"], prompts[l]);
    // The same votes give the same set; its name says where it came from.
    let again = e
        .preferences_from_arena(arena.id, None, &VoteSource::Human)
        .expect("again");
    assert_eq!(again.dataset.id, set.dataset.id);
    assert!(set
        .dataset
        .name
        .starts_with(&format!("arena-{}-", arena.id)));
    let shown = e
        .preference_set(set.dataset.id)
        .expect("read")
        .expect("a set");
    assert_eq!(shown, set);
    assert_eq!(e.preference_set(999).expect("read"), None);
    assert_eq!(set.votes, Some(VoteSource::Human));
    assert_eq!((set.human_pairs, set.judge_pairs), (2, 0));
}

/// A judge vote written as the judge pass writes it.
fn judge_vote(
    arena_id: i64,
    idx: i64,
    judge: &JudgeKey,
    vote: Option<&str>,
) -> crate::store::JudgeVoteRow {
    crate::store::JudgeVoteRow {
        arena_id,
        idx,
        judge_json: serde_json::to_string(&judge.judge).expect("json"),
        judge_label: "the judge".into(),
        rubric_version: i64::from(judge.rubric_version),
        both_orders: judge.both_orders,
        verdict_mode: judge.verdict.as_str().into(),
        first_a_first: true,
        vote: vote.map(str::to_string),
        verdict: "Verdict: …".into(),
        verdict_swapped: judge.both_orders.then(|| "Verdict: …".into()),
        error: vote.is_none().then(|| "no verdict found".into()),
        created_at: "2026-12-03T00:00:00Z".into(),
    }
}

#[test]
fn prefs_from_arena_take_one_judges_votes_or_the_human_ones_first() {
    let (_dir, e) = engine();
    let model = e
        .add_local_model(&attune_test_support::default_model())
        .expect("add")
        .model;
    let template = e
        .save_template(&TemplateDraft {
            name: "Terse".into(),
            system: Some("Answer in one word.".into()),
            ..Default::default()
        })
        .expect("template");
    let arena = e
        .create_arena(&ArenaSpec {
            name: None,
            a: ChatTarget::Base { model_id: model.id },
            b: ChatTarget::Template {
                model_id: model.id,
                template_id: template.id,
                version: None,
                values: BTreeMap::new(),
                endpoint: None,
            },
            prompts: ArenaPrompts::Typed {
                prompts: vec![
                    "Say hi.".into(),
                    "Name a color.".into(),
                    "Name a fruit.".into(),
                    "Name a number.".into(),
                    "Name a planet.".into(),
                ],
            },
            params: greedy(4),
            seed: 5,
        })
        .expect("arena");
    let no = AtomicBool::new(false);
    for i in 0..4 {
        e.arena_item(arena.id, i, &no, &mut |_| {})
            .expect("generate");
    }
    let items = e.store.arena_items(arena.id).expect("items");
    let answer = |idx: usize, side: &str| -> String {
        let it = &items[idx];
        match side {
            "a" => it.a_answer.clone().expect("a"),
            _ => it.b_answer.clone().expect("b"),
        }
    };
    // Humans voted on prompts 0 and 3 only.
    e.arena_vote(arena.id, 0, Vote::Left).expect("vote");
    e.arena_vote(arena.id, 3, Vote::BothBad).expect("vote");
    let human0 = e.store.arena_items(arena.id).expect("items")[0]
        .vote
        .clone()
        .expect("voted");
    let version = e.judge_rubric().expect("rubric").version;
    let constrained = JudgeKey {
        judge: ChatTarget::Base { model_id: model.id },
        rubric_version: version,
        both_orders: true,
        verdict: VerdictMode::Constrained,
    };
    // The same model judging in free text is another judge, with other votes.
    let free = JudgeKey {
        verdict: VerdictMode::Free,
        both_orders: false,
        ..constrained.clone()
    };
    let flip = if human0 == "a" { "b" } else { "a" };
    for (idx, vote) in [(0, Some(flip)), (1, None), (2, Some("a")), (3, Some("tie"))] {
        e.store
            .put_judge_vote(&judge_vote(arena.id, idx, &constrained, vote))
            .expect("judge vote");
    }
    for (idx, vote) in [(0, Some(human0.as_str())), (2, Some("b"))] {
        e.store
            .put_judge_vote(&judge_vote(arena.id, idx, &free, vote))
            .expect("judge vote");
    }
    let counts = |s: &PreferenceSet| {
        (
            s.pairs,
            s.ties_skipped,
            s.both_bad_skipped,
            s.unvoted_skipped,
            s.unparseable_skipped,
            s.human_pairs,
            s.judge_pairs,
        )
    };

    // The constrained judge alone: 0 (its vote, against the human's) and 2 are pairs; 1 is
    // unparseable, 3 a tie, 4 never answered.
    let by_judge = VoteSource::Judge {
        judge: constrained.clone(),
    };
    let set = e
        .preferences_from_arena(arena.id, None, &by_judge)
        .expect("judge pairs");
    assert_eq!(counts(&set), (2, 1, 0, 1, 1, 0, 2));
    assert_eq!(set.votes.as_ref(), Some(&by_judge));
    assert_eq!(set.judge_label.as_deref(), Some("the judge"));
    assert!(
        set.dataset
            .name
            .starts_with(&format!("arena-{}-judge-", arena.id)),
        "{}",
        set.dataset.name
    );
    let rows = stored(&e, &set);
    assert_eq!(rows[0]["chosen"][0]["content"], answer(0, flip).as_str());
    assert_eq!(
        rows[0]["rejected"][0]["content"],
        answer(0, &human0).as_str()
    );
    assert_eq!(rows[1]["chosen"][0]["content"], answer(2, "a").as_str());
    assert_eq!(
        e.preference_set(set.dataset.id).expect("read"),
        Some(set.clone())
    );

    // Combined: the human's vote on 0 and 3, the judge's elsewhere.
    let combined = VoteSource::Combined {
        judge: constrained.clone(),
    };
    let set = e
        .preferences_from_arena(arena.id, None, &combined)
        .expect("combined pairs");
    assert_eq!(counts(&set), (2, 0, 1, 1, 1, 1, 1));
    let rows = stored(&e, &set);
    assert_eq!(rows[0]["chosen"][0]["content"], answer(0, &human0).as_str());
    assert_eq!(rows[1]["chosen"][0]["content"], answer(2, "a").as_str());
    assert!(set
        .dataset
        .name
        .starts_with(&format!("arena-{}-combined-", arena.id)));

    // The free-text judge is told apart by its verdict mode and order setting.
    let set = e
        .preferences_from_arena(
            arena.id,
            Some("free-judge"),
            &VoteSource::Judge { judge: free },
        )
        .expect("free judge pairs");
    assert_eq!(counts(&set), (2, 0, 0, 3, 0, 0, 2));
    let rows = stored(&e, &set);
    assert_eq!(rows[0]["chosen"][0]["content"], answer(0, &human0).as_str());
    assert_eq!(rows[1]["chosen"][0]["content"], answer(2, "b").as_str());

    // Human votes only: one pair (prompt 0).
    let set = e
        .preferences_from_arena(arena.id, None, &VoteSource::Human)
        .expect("human pairs");
    assert_eq!(counts(&set), (1, 0, 1, 3, 0, 1, 0));

    // A judge that never voted here is refused, naming what is missing.
    let err = e
        .preferences_from_arena(
            arena.id,
            None,
            &VoteSource::Judge {
                judge: JudgeKey {
                    rubric_version: version + 7,
                    ..constrained.clone()
                },
            },
        )
        .expect_err("no such judge");
    assert!(err.to_string().contains("no votes from judge"), "{err}");
    assert!(
        err.to_string().contains(&format!("v{}", version + 7)),
        "{err}"
    );
    // The same name for other provenance is refused, not silently reused.
    let err = e
        .preferences_from_arena(arena.id, Some("free-judge"), &by_judge)
        .expect_err("name taken");
    assert!(err.to_string().contains("free-judge"), "{err}");
}
