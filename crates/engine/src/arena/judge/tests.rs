//! Judge tests: verdict parsing and combining by hand, the judge's order draw, a whole
//! judging pass with a scripted judge (SQLite on disk, every branch of storage and
//! statistics), and the real default model as the judge.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use attune_protocol::{
    ArenaEvent, ArenaPrompts, ArenaSpec, ChatEvent, GenerationStats, TemplateDraft, Vote,
};

use super::*;
use crate::arena::left_is_a;

fn real_model() -> PathBuf {
    attune_test_support::default_model()
}

#[test]
fn verdicts_parse_however_they_are_decorated() {
    use Verdict::*;
    let ok = [
        ("Verdict: 1\nAnswer 1 is correct.", First),
        ("verdict: 2", Second),
        ("**Verdict:** [[2]]\nbecause", Second),
        ("Verdict - Answer 1. It cites the trial.", First),
        ("My verdict is tie.", Tie),
        ("VERDICT: Both bad (neither answers)", BothBad),
        ("Verdict: both_bad", BothBad),
        ("Verdict: neither", BothBad),
        ("Reasoning first.\nVerdict: 2\nVerdict: 2", Second),
        ("Verdict: \"1\"", First),
        ("2", Second),
        ("  Tie. ", Tie),
        ("**Answer 1**", First),
    ];
    for (reply, want) in ok {
        assert_eq!(parse_verdict(reply), Ok(want), "{reply:?}");
    }
    let bad = [
        ("", "no verdict"),
        ("Answer 1 is better because it is right.", "no verdict"),
        ("Verdict: 1 or 2", "no verdict"),
        ("Verdict: 1/2", "no verdict"),
        ("Verdict: 10", "no verdict"),
        ("Verdict: tied", "no verdict"),
        (
            "Verdict: 1\nOn reflection, verdict: 2",
            "conflicting verdicts: 1, 2",
        ),
        (
            "Verdict: 1\", \"Verdict: 2\", \"Verdict: tie\"",
            "conflicting verdicts: 1, 2, tie",
        ),
        ("The verdicts differ", "no verdict"),
    ];
    for (reply, want) in bad {
        let err = parse_verdict(reply).expect_err(reply);
        assert!(err.contains(want), "{reply:?}: {err}");
    }
    // The error quotes the start of the reply so the user sees what the judge wrote.
    let err = parse_verdict("I cannot decide.").expect_err("undecided");
    assert!(err.contains("I cannot decide."), "{err}");
}

#[test]
fn verdicts_map_to_candidates_and_both_orders_combine() {
    assert_eq!(Verdict::First.stored(true), "a");
    assert_eq!(Verdict::First.stored(false), "b");
    assert_eq!(Verdict::Second.stored(true), "b");
    assert_eq!(Verdict::Second.stored(false), "a");
    assert_eq!(Verdict::Tie.stored(false), "tie");
    assert_eq!(Verdict::BothBad.stored(true), "both_bad");
    let a: Result<&'static str, String> = Ok("a");
    let b: Result<&'static str, String> = Ok("b");
    let bad: Result<&'static str, String> = Err("no verdict found".into());
    assert_eq!(combine(&a, None), (Ok("a"), false));
    assert_eq!(combine(&a, Some(&a)), (Ok("a"), false));
    // Disagreement between the orders is a tie.
    assert_eq!(combine(&a, Some(&b)), (Ok("tie"), true));
    assert_eq!(combine(&Ok("both_bad"), Some(&a)), (Ok("tie"), true));
    let (v, _) = combine(&a, Some(&bad));
    assert_eq!(v, Err("swapped order: no verdict found".to_string()));
    let (v, _) = combine(&bad, Some(&bad));
    assert_eq!(
        v,
        Err("first order: no verdict found; swapped order: no verdict found".to_string())
    );
    assert_eq!(combine(&bad, None).0, Err("no verdict found".to_string()));
}

#[test]
fn the_judges_order_is_seeded_balanced_and_not_the_humans() {
    let first: Vec<bool> = (0..400).map(|i| judge_a_first(9, i)).collect();
    assert_eq!(
        first,
        (0..400).map(|i| judge_a_first(9, i)).collect::<Vec<_>>()
    );
    let n = first.iter().filter(|&&f| f).count();
    assert!((160..=240).contains(&n), "{n} of 400 with A first");
    let human: Vec<bool> = (0..400).map(|i| left_is_a(9, i)).collect();
    let same = first.iter().zip(&human).filter(|(a, b)| a == b).count();
    assert!(
        (160..=240).contains(&same),
        "{same} of 400 equal to the human's sides"
    );
}

#[test]
fn the_judges_message_holds_rubric_question_and_answers_in_order() {
    let context = vec![
        user("Earlier question"),
        ChatMessage {
            role: "assistant".into(),
            content: "Earlier answer".into(),
        },
        user("Does aspirin thin blood?"),
    ];
    let m = judge_message("Be right.", &context, "Yes, it does.", "No.");
    assert_eq!(m.role, "user");
    let t = &m.content;
    let pos = |s: &str| t.find(s).unwrap_or_else(|| panic!("{s:?} missing in {t}"));
    assert!(pos("<rubric>\nBe right.\n</rubric>") < pos("<conversation>"));
    assert!(pos("user: Earlier question") < pos("assistant: Earlier answer"));
    assert!(pos("<question>\nDoes aspirin thin blood?") < pos("<answer_1>\nYes, it does."));
    assert!(pos("<answer_1>\nYes, it does.") < pos("<answer_2>\nNo.\n</answer_2>"));
    assert!(t.contains("\"Verdict: both bad\""));
    // A single-turn prompt has no conversation block.
    let m = judge_message("R", &[user("Q?")], "x", "y");
    assert!(!m.content.contains("<conversation>"), "{}", m.content);
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        repetition_penalty: 1.0,
        ..SamplingParams::default()
    }
}

/// An engine on disk with the default model registered, and an arena of `prompts`
/// between the model and the model with a template.
fn arena_fixture(prompts: &[&str]) -> (tempfile::TempDir, Engine, i64, ChatTarget) {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Engine::open(&dir.path().join("data")).expect("open");
    let model = e.add_local_model(&real_model()).expect("add").model;
    let template = e
        .save_template(&TemplateDraft {
            name: "Brief".into(),
            system: Some("Answer in one word.".into()),
            ..Default::default()
        })
        .expect("template");
    let base = ChatTarget::Base { model_id: model.id };
    let spec = ArenaSpec {
        name: Some("judged".into()),
        a: base.clone(),
        b: ChatTarget::Template {
            model_id: model.id,
            template_id: template.id,
            version: None,
            values: BTreeMap::new(),
            endpoint: None,
        },
        prompts: ArenaPrompts::Typed {
            prompts: prompts.iter().map(|p| p.to_string()).collect(),
        },
        params: greedy(3),
        seed: 11,
    };
    let id = e.create_arena(&spec).expect("create").id;
    (dir, e, id, base)
}

/// A scripted answerer: candidates answer "A<i>" / "B<i>" by their target kind; the judge
/// (recognised by its message) replies with what `judge` says for (prompt index, the
/// text shown as Answer 1).
fn scripted<'a>(
    judge: &'a dyn Fn(u64, &str) -> String,
    calls: &'a std::cell::RefCell<Vec<String>>,
) -> Box<Answerer<'a>> {
    Box::new(
        move |target: &ChatTarget,
              messages: &[ChatMessage],
              _params: &SamplingParams,
              _cancel: &AtomicBool,
              _events: &mut dyn FnMut(ChatEvent)| {
            let last = &messages.last().expect("a message").content;
            let text = if let Some(q) = last.strip_prefix("You are an impartial expert judge") {
                let q_idx: u64 = q
                    .split("<question>\nQ")
                    .nth(1)
                    .and_then(|r| r.split('\n').next())
                    .and_then(|n| n.parse().ok())
                    .expect("question number");
                let first = q
                    .split("<answer_1>\n")
                    .nth(1)
                    .and_then(|r| r.split('\n').next())
                    .expect("answer 1");
                calls.borrow_mut().push(format!("judge {q_idx} {first}"));
                judge(q_idx, first)
            } else {
                let side = match target {
                    ChatTarget::Base { .. } => "A",
                    _ => "B",
                };
                calls.borrow_mut().push(format!("answer {side} {last}"));
                format!("{side}{}", last.trim_start_matches('Q'))
            };
            Ok(GenerationStats {
                text,
                finish_reason: FinishReason::Length,
                prompt_tokens: 0,
                generated_tokens: 0,
                prompt_ms: 0.0,
                generate_ms: 0.0,
                prompt_tok_per_s: 0.0,
                generate_tok_per_s: 0.0,
            })
        },
    )
}

#[test]
fn a_judge_fills_the_arena_stores_apart_and_is_compared_with_the_humans() {
    let (_dir, e, id, judge) = arena_fixture(&["Q0", "Q1", "Q2", "Q3", "Q4", "Q5"]);
    let no_events = &mut |_: ArenaEvent| {};
    let calls = std::cell::RefCell::new(Vec::new());
    // Humans vote on prompts 0-3 (B, A, tie, B); answers are generated for them.
    let never = &|_: u64, _: &str| -> String { unreachable!("no judge yet") };
    for (i, want) in [(0u64, "b"), (1, "a"), (2, "tie"), (3, "b")] {
        let item = e
            .arena_item_via(
                id,
                i,
                &AtomicBool::new(false),
                no_events,
                &mut *scripted(never, &calls),
            )
            .expect("answers");
        let a_left = item.left == format!("A{i}");
        let vote = match (want, a_left) {
            ("a", true) | ("b", false) => Vote::Left,
            ("a", false) | ("b", true) => Vote::Right,
            _ => Vote::Tie,
        };
        e.arena_vote(id, i, vote).expect("vote");
    }

    // The judge prefers the answer of candidate B on even prompts, A on odd ones, except
    // prompt 5, where it writes no verdict.
    let judge_says = |i: u64, first: &str| -> String {
        if i == 5 {
            return "I would rather not say.".into();
        }
        let want_b = i.is_multiple_of(2);
        let first_is_b = first.starts_with('B');
        format!(
            "Verdict: {}\nIt is better.",
            if want_b == first_is_b { 1 } else { 2 }
        )
    };
    let mut events = Vec::new();
    let spec = JudgeSpec {
        arena_id: id,
        judge: judge.clone(),
        rubric: None,
        both_orders: false,
        scope: JudgeScope::Unvoted,
        max_tokens: 16,
        redo: false,
        verdict: Default::default(),
    };
    calls.borrow_mut().clear();
    let report = e
        .judge_arena_via(
            &spec,
            &AtomicBool::new(false),
            &mut |ev| events.push(ev),
            &mut *scripted(&judge_says, &calls),
        )
        .expect("judge");
    // Only the prompts without a human vote: 4 and 5 (their answers generated first).
    assert_eq!((report.judged, report.skipped, report.unparsed), (2, 4, 1));
    assert_eq!(report.rubric_version, 1);
    assert!(
        report.judge_label.contains("SmolLM2"),
        "{}",
        report.judge_label
    );
    assert_eq!(
        events.first(),
        Some(&JudgeEvent::Started {
            total: 2,
            rubric_version: 1
        })
    );
    assert!(events.contains(&JudgeEvent::Answering { index: 4 }));
    assert!(events.contains(&JudgeEvent::Voted {
        index: 5,
        vote: None,
        done: 2,
        total: 2
    }));
    let c = calls.borrow();
    assert_eq!(
        c.iter().filter(|c| c.starts_with("judge")).count(),
        2,
        "{c:?}"
    );
    drop(c);

    // The human votes are untouched; the judge's are stored apart with their raw text.
    let detail = e.arena_detail(id).expect("detail");
    let winners: Vec<Option<&str>> = detail.rows.iter().map(|r| r.winner.as_deref()).collect();
    assert_eq!(
        winners,
        [Some("b"), Some("a"), Some("tie"), Some("b"), None, None]
    );
    let votes = e.arena_judge_votes(id).expect("votes");
    assert_eq!(votes.len(), 2);
    assert_eq!((votes[0].index, votes[0].vote.as_deref()), (4, Some("b")));
    assert!(
        votes[0].verdict.starts_with("Verdict: "),
        "{}",
        votes[0].verdict
    );
    assert_eq!(votes[0].first_a_first, judge_a_first(11, 4));
    assert_eq!((votes[1].index, votes[1].vote.as_deref()), (5, None));
    assert_eq!(votes[1].verdict, "I would rather not say.");
    assert!(votes[1]
        .error
        .as_deref()
        .unwrap_or("")
        .contains("no verdict"));

    // Filled: 4 human votes + 1 judge vote (prompt 5's verdict did not parse).
    let r = e.arena_results(id).expect("results");
    assert_eq!(r.human.tally.b_wins, 2);
    assert_eq!(r.judges.len(), 1);
    let j = &r.judges[0];
    assert_eq!((j.votes, j.unparsed), (2, 1));
    assert_eq!((j.combined_human, j.combined_judge), (4, 1));
    assert_eq!(
        (
            j.combined.tally.a_wins,
            j.combined.tally.b_wins,
            j.combined.tally.ties
        ),
        (1, 3, 1)
    );
    // No prompt has both kinds of vote yet.
    assert_eq!(j.agreement.n, 0);
    assert_eq!(j.agreement.kappa, None);

    // Judging again skips what this judge did; scope "all" judges the human-voted ones.
    let again = e
        .judge_arena_via(
            &JudgeSpec {
                scope: JudgeScope::All,
                ..spec.clone()
            },
            &AtomicBool::new(false),
            &mut |_| {},
            &mut *scripted(&judge_says, &calls),
        )
        .expect("judge all");
    assert_eq!((again.judged, again.skipped), (4, 2));
    let r = e.arena_results(id).expect("results");
    let j = &r.judges[0];
    // Human 0..3: b, a, tie, b; judge: b, a, b, a. Agree on 0 and 1.
    assert_eq!((j.agreement.n, j.agreement.agreed), (4, 2));
    assert_eq!(j.agreement.table[0], [1, 0, 0, 0]);
    assert_eq!(j.agreement.table[1], [1, 1, 0, 0]);
    assert_eq!(j.agreement.table[2], [0, 1, 0, 0]);
    assert_eq!(j.agreement.table[3], [0, 0, 0, 0]);
    // Human: rows a 1, b 2, tie 1; judge: a 2, b 3 (of 4: a 2, b 2). Po = 0.5,
    // Pe = (1*2 + 2*2 + 1*0) / 16 = 0.375, kappa = 0.125 / 0.625 = 0.2.
    let k = j.agreement.kappa.expect("kappa");
    assert!((k.value - 0.2).abs() < 1e-12, "{}", k.value);
    // statsmodels 0.15 `cohens_kappa` on this table: std_kappa 0.329848, 95% interval
    // [-0.446491, 0.846491].
    assert!((j.agreement.kappa_se.expect("se") - 0.329848).abs() < 1e-6);
    assert!(
        (k.low + 0.446491).abs() < 1e-6 && (k.high - 0.846491).abs() < 1e-6,
        "{k:?}"
    );
    assert!(j.agreement.method.contains("Fleiss, Cohen and Everitt"));

    // Both orders with a judge that always says "1": position bias, so every vote is a
    // tie. A new rubric is a new version and a separate judge in the results.
    let always_first = |_: u64, _: &str| "Verdict: 1".to_string();
    let both = e
        .judge_arena_via(
            &JudgeSpec {
                both_orders: true,
                rubric: Some("  Prefer the shorter answer.\n".into()),
                scope: JudgeScope::All,
                ..spec.clone()
            },
            &AtomicBool::new(false),
            &mut |_| {},
            &mut *scripted(&always_first, &calls),
        )
        .expect("both orders");
    assert_eq!(
        (both.judged, both.order_disagreements, both.rubric_version),
        (6, 6, 2)
    );
    assert_eq!(
        e.judge_rubric().expect("rubric").text,
        "Prefer the shorter answer."
    );
    let r = e.arena_results(id).expect("results");
    assert_eq!(r.judges.len(), 2);
    let j2 = r
        .judges
        .iter()
        .find(|j| j.both_orders)
        .expect("the both-orders judge");
    assert_eq!((j2.rubric_version, j2.rates.tally.ties), (2, 6));
    let v = e.arena_judge_votes(id).expect("votes");
    let swapped: Vec<_> = v.iter().filter(|v| v.both_orders).collect();
    assert_eq!(swapped.len(), 6);
    assert!(swapped
        .iter()
        .all(|v| v.verdict_swapped.as_deref() == Some("Verdict: 1")));

    // Refusals name what is wrong; removing the arena removes its judge votes.
    let err = e
        .judge_arena(
            &JudgeSpec {
                max_tokens: 0,
                ..spec.clone()
            },
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect_err("zero tokens");
    assert!(err.to_string().contains("max tokens"), "{err}");
    let err = e
        .judge_arena(
            &JudgeSpec {
                judge: ChatTarget::Base { model_id: 999 },
                ..spec.clone()
            },
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect_err("no such judge");
    assert_eq!(err.code(), "not_found", "{err}");
    assert!(err.to_string().contains("999"), "{err}");
    let err = e
        .judge_arena(
            &JudgeSpec {
                arena_id: 12345,
                ..spec.clone()
            },
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect_err("no such arena");
    assert_eq!(err.code(), "not_found");
    e.remove_arena(id).expect("remove");
    assert_eq!(
        e.arena_judge_votes(id).expect_err("gone").code(),
        "not_found"
    );
    assert!(e.store.judge_votes(id).expect("rows").is_empty());
}

#[test]
fn the_rubric_is_versioned_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Engine::open(&dir.path().join("data")).expect("open");
    let r = e.judge_rubric().expect("default");
    assert_eq!((r.version, r.is_default), (1, true));
    assert_eq!(r.text, DEFAULT_RUBRIC);
    // Saving the same text adds nothing; a change adds a version; old ones stay readable.
    assert_eq!(
        e.save_judge_rubric(DEFAULT_RUBRIC).expect("same").version,
        1
    );
    let r2 = e.save_judge_rubric("Correct beats fluent.").expect("edit");
    assert_eq!((r2.version, r2.is_default), (2, false));
    assert_eq!(e.judge_rubric().expect("now").version, 2);
    assert_eq!(e.judge_rubric_version(1).expect("v1").text, DEFAULT_RUBRIC);
    assert_eq!(
        e.judge_rubric_version(7).expect_err("no v7").code(),
        "not_found"
    );
    for (bad, why) in [
        ("   \n", "empty"),
        ("a\u{7}b", "U+0007"),
        (&"x".repeat(MAX_RUBRIC_CHARS + 1), "at most"),
    ] {
        let err = e.save_judge_rubric(bad).expect_err(why);
        assert!(err.to_string().contains(why), "{err}");
        assert_eq!(err.code(), "invalid_input");
    }
    // Survives a reopen.
    drop(e);
    let e = Engine::open(&dir.path().join("data")).expect("reopen");
    assert_eq!(
        e.judge_rubric().expect("kept").text,
        "Correct beats fluent."
    );
}

#[test]
fn the_default_model_judges_an_arena_in_both_orders() {
    // The real default model as the judge, 12-token verdicts: whatever it writes is stored
    // verbatim, and the vote is either parsed from it or recorded as unparseable.
    let (_dir, e, id, judge) = arena_fixture(&["What is 2 + 2?", "Name a primary color."]);
    let report = e
        .judge_arena(
            &JudgeSpec {
                arena_id: id,
                judge,
                rubric: None,
                both_orders: true,
                scope: JudgeScope::Unvoted,
                max_tokens: 12,
                redo: false,
                verdict: Default::default(),
            },
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect("judge");
    assert_eq!((report.judged, report.skipped), (2, 0));
    let votes = e.arena_judge_votes(id).expect("votes");
    assert_eq!(votes.len(), 2);
    for v in &votes {
        assert!(
            !v.verdict.is_empty() && v.verdict_swapped.is_some(),
            "{v:?}"
        );
        match (&v.vote, &v.error) {
            (Some(vote), None) => {
                assert!(category(vote).is_some(), "{vote}");
                // A parsed vote is what the raw texts say.
                let first = parse_verdict(&v.verdict)
                    .expect("parses")
                    .stored(v.first_a_first);
                let second = parse_verdict(v.verdict_swapped.as_deref().unwrap_or(""))
                    .expect("parses")
                    .stored(!v.first_a_first);
                let want = if first == second { first } else { "tie" };
                assert_eq!(vote, want);
            }
            (None, Some(why)) => assert!(why.contains("order"), "{why}"),
            other => panic!("a vote and an error together: {other:?}"),
        }
    }
    // The answers were generated and stored for the human voter too.
    let detail = e.arena_detail(id).expect("detail");
    assert!(detail
        .rows
        .iter()
        .all(|r| r.a_answer.is_some() && r.b_answer.is_some()));
    let r = e.arena_results(id).expect("results");
    let j = &r.judges[0];
    assert_eq!(j.votes, 2);
    assert_eq!(j.combined_human, 0);
    assert_eq!(j.combined_judge, 2 - j.unparsed);
}

/// The summed log-prob of `option` after `prompt` from one uncached forward over both
/// (`Llama::forward`'s logits through candle's own `log_softmax`, an oracle independent of the
/// hand-written one in `constrained.rs`).
fn forward_logprob(parts: &crate::chat::Parts<'_>, prompt: &[u32], option: &str) -> f64 {
    let opt = parts.tokenizer.encode(option, false).expect("encode");
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&opt[..opt.len() - 1]);
    let t = candle_core::Tensor::new(ids.as_slice(), parts.model.device())
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    let rows: Vec<Vec<f32>> = parts
        .model
        .forward(&t, None)
        .and_then(|l| Ok(l.squeeze(0)?.narrow(0, prompt.len() - 1, opt.len())?))
        .and_then(|l| Ok(candle_nn::ops::log_softmax(&l, candle_core::D::Minus1)?))
        .and_then(|l| Ok(l.to_vec2()?))
        .expect("forward");
    rows.iter()
        .zip(&opt)
        .map(|(row, &id)| f64::from(row[id as usize]))
        .sum()
}

/// The summed log-prob of `option` after `prompt` by the engine's own NLL path
/// (`train::evaluate`, no cache, the option's tokens the targets).
fn nll_path_logprob(parts: &crate::chat::Parts<'_>, prompt: &[u32], option: &str) -> f64 {
    let ids_opt = parts.tokenizer.encode(option, false).expect("encode");
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&ids_opt);
    let mut targets = vec![false; prompt.len()];
    targets.extend(std::iter::repeat_n(true, ids_opt.len()));
    let full_len = ids.len();
    let e = attune_models::train::Example {
        ids,
        targets,
        full_len,
        truncated: false,
    };
    let (sum, n) =
        attune_models::train::evaluate(parts.model, &[e], None, 0, |_, _| true).expect("evaluate");
    assert_eq!(n, ids_opt.len());
    -sum
}

#[test]
fn constrained_verdict_scores_are_the_models_own_log_probs() {
    let (_dir, e, _id, judge) = arena_fixture(&["What is 2 + 2?"]);
    let ChatTarget::Base { model_id } = judge else {
        unreachable!()
    };
    let m = e.model_for(model_id, &mut |_| {}).expect("model");
    let parts = crate::chat::Parts::of(&m);
    let context = [user("What is 2 + 2?")];
    let options: Vec<&str> = constrained::VERDICT_OPTIONS
        .iter()
        .map(|(t, _)| *t)
        .collect();
    for (first, second) in [("4", "Five, I think."), ("Five, I think.", "4")] {
        let message = judge_message(DEFAULT_RUBRIC, &context, first, second);
        let (_, prompt) = crate::chat::render_prompt(
            parts.chat_template,
            parts.tokenizer,
            std::slice::from_ref(&message),
        )
        .expect("render");
        let lps = constrained::continuation_logprobs(&parts, &prompt, &options).expect("score");
        let via_target = e
            .target_continuation_logprobs(&judge, &[message], &options)
            .expect("score via target");
        assert_eq!(lps, via_target);
        // The same figures as one uncached forward over prompt and option, and as the
        // engine's NLL path (whose fused LM-head kernel differs in the last digits: 0.01-0.02
        // nats measured on this model; the fused training layers it runs take f32 products
        // where a prompt takes int8 ones on a CPU with VNNI and no AMX: 0.05 nats measured
        // there, 2026-12-05).
        let int8 =
            attune_models::kernels::int8::available() && !attune_models::kernels::amx::available();
        let nll_tol = if int8 { 0.1 } else { 0.05 };
        for (option, lp) in options.iter().zip(&lps) {
            let forward = forward_logprob(&parts, &prompt, option);
            let nll = nll_path_logprob(&parts, &prompt, option);
            assert!(
                lp.is_finite() && *lp < 0.0 && (lp - forward).abs() < 1e-4,
                "{option}: cached scoring {lp}, uncached forward {forward}"
            );
            assert!(
                (lp - nll).abs() < nll_tol,
                "{option}: cached scoring {lp}, NLL path {nll}"
            );
        }
        // The options differ: the scores are not a constant.
        assert!(lps.iter().any(|l| (l - lps[0]).abs() > 1e-3), "{lps:?}");
        // A short prompt (no prefilled head) is scored the same way.
        let short = &prompt[..5];
        let lps = constrained::continuation_logprobs(&parts, short, &options[..2]).expect("short");
        for (option, lp) in options.iter().zip(&lps) {
            let want = forward_logprob(&parts, short, option);
            assert!((lp - want).abs() < 1e-4, "{option}: {lp} vs {want}");
        }
    }
    // The raw reply names the most likely option first, then every option's log-prob.
    let (v, reply) = constrained::constrained_reply(&[-3.0, -1.5, -2.0, -9.0]);
    assert_eq!(v, Verdict::Second);
    assert!(reply.starts_with("Verdict: 2\n"), "{reply}");
    assert!(reply.contains("\"both bad\" -9.0000"), "{reply}");
    assert_eq!(parse_verdict(&reply), Ok(Verdict::Second));
}

#[test]
fn a_constrained_judge_votes_in_both_orders_from_its_log_probs() {
    let (_dir, e, id, judge) = arena_fixture(&["What is 2 + 2?", "Name a primary color."]);
    let spec = JudgeSpec {
        arena_id: id,
        judge: judge.clone(),
        rubric: None,
        both_orders: true,
        scope: JudgeScope::Unvoted,
        max_tokens: 12,
        redo: false,
        verdict: VerdictMode::Constrained,
    };
    let report = e
        .judge_arena(&spec, &AtomicBool::new(false), &mut |_| {})
        .expect("judge");
    assert_eq!((report.judged, report.unparsed), (2, 0));
    assert_eq!(report.verdict, VerdictMode::Constrained);
    let rubric = e.judge_rubric().expect("rubric");
    let arena = e.arena_record(id).expect("arena");
    let options: Vec<&str> = constrained::VERDICT_OPTIONS
        .iter()
        .map(|(t, _)| *t)
        .collect();
    let votes = e.arena_judge_votes(id).expect("votes");
    assert_eq!(votes.len(), 2);
    let mut disagreed = 0;
    for v in &votes {
        assert_eq!(v.verdict_mode, VerdictMode::Constrained);
        let item = e.arena_item_row(&arena, v.index).expect("item");
        let (a, b) = (item.a_answer.expect("a"), item.b_answer.expect("b"));
        let context: Vec<ChatMessage> = serde_json::from_str(&item.context_json).expect("ctx");
        // Each pass's stored reply is the verdict its own order's log-probs give; the vote
        // is the option with the highest log-prob averaged over both orders.
        let mut stored = Vec::new();
        let mut sum = [0f64; 4];
        for (reply, a_first) in [
            (&v.verdict, v.first_a_first),
            (
                v.verdict_swapped.as_ref().expect("swapped"),
                !v.first_a_first,
            ),
        ] {
            let (first, second) = if a_first { (&a, &b) } else { (&b, &a) };
            let lps = e
                .target_continuation_logprobs(
                    &judge,
                    &[judge_message(&rubric.text, &context, first, second)],
                    &options,
                )
                .expect("score");
            let (verdict, expected) = constrained::constrained_reply(&lps);
            assert_eq!(reply, &expected);
            stored.push(verdict.stored(a_first));
            // 1 and 2 mapped to A and B by this pass's order.
            let (a_lp, b_lp) = if a_first {
                (lps[0], lps[1])
            } else {
                (lps[1], lps[0])
            };
            for (s, lp) in sum.iter_mut().zip([a_lp, b_lp, lps[2], lps[3]]) {
                *s += lp;
            }
        }
        let best = (0..4)
            .max_by(|&i, &j| sum[i].total_cmp(&sum[j]).then(j.cmp(&i)))
            .expect("four");
        let want = if best < 2 && sum[0] == sum[1] {
            "tie"
        } else {
            ["a", "b", "tie", "both_bad"][best]
        };
        assert_eq!(v.vote.as_deref(), Some(want), "{v:?} {sum:?}");
        disagreed += u64::from(stored[0] != stored[1]);
    }
    assert_eq!(report.order_disagreements, disagreed);
    let r = e.arena_results(id).expect("results");
    assert_eq!(r.judges.len(), 1);
    assert_eq!(r.judges[0].verdict, VerdictMode::Constrained);
    // Position balance by hand: a judge that prefers "1" in both orders (by 2.5 and 3 nats)
    // but B by 0.25 on average votes B; exactly level A and B is a tie; a clear "both bad"
    // stays.
    let a_first = constrained::by_stored_vote(&[-1.0, -3.5, -9.0, -9.0], true);
    let b_first = constrained::by_stored_vote(&[-0.5, -3.5, -9.0, -9.0], false);
    assert_eq!(a_first, [-1.0, -3.5, -9.0, -9.0]);
    assert_eq!(b_first, [-3.5, -0.5, -9.0, -9.0]);
    assert_eq!(constrained::balanced_vote(&a_first, &b_first), "b");
    assert_eq!(
        constrained::balanced_vote(&[-1.0, -2.0, -5.0, -5.0], &[-2.0, -1.0, -5.0, -5.0]),
        "tie"
    );
    assert_eq!(
        constrained::balanced_vote(&[-4.0, -5.0, -6.0, -1.0], &[-5.0, -4.0, -6.0, -1.5]),
        "both_bad"
    );

    // The same judge in free text is another judge: its votes do not replace these.
    let free = e
        .judge_arena_via(
            &JudgeSpec {
                verdict: VerdictMode::Free,
                ..spec.clone()
            },
            &AtomicBool::new(false),
            &mut |_| {},
            &mut |_, _, _, _, _| {
                Ok(GenerationStats {
                    text: "Verdict: tie".into(),
                    finish_reason: FinishReason::Length,
                    prompt_tokens: 0,
                    generated_tokens: 0,
                    prompt_ms: 0.0,
                    generate_ms: 0.0,
                    prompt_tok_per_s: 0.0,
                    generate_tok_per_s: 0.0,
                })
            },
        )
        .expect("free judge");
    assert_eq!(free.judged, 2);
    assert_eq!(e.arena_judge_votes(id).expect("votes").len(), 4);
    assert_eq!(e.arena_results(id).expect("results").judges.len(), 2);

    // An endpoint cannot give log-probs: refused before anything is judged.
    let ep = e
        .add_endpoint(&attune_protocol::EndpointDraft {
            name: "remote".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key: None,
            connect_timeout_s: None,
            idle_timeout_s: None,
        })
        .expect("endpoint")
        .endpoint;
    let err = e
        .judge_arena(
            &JudgeSpec {
                judge: ChatTarget::Endpoint {
                    endpoint_id: ep.id,
                    model: "gpt-x".into(),
                },
                redo: true,
                ..spec.clone()
            },
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect_err("endpoint refused");
    assert_eq!(err.code(), "invalid_input", "{err}");
    assert!(err.to_string().contains("free text"), "{err}");
    assert_eq!(e.arena_judge_votes(id).expect("votes").len(), 4);
}
