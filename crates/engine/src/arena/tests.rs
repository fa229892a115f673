//! Arena tests: the tally's arithmetic by hand, the side assignment, and a whole arena
//! on the real default model (SQLite on disk, 3-token greedy answers).

use attune_test_support::default_model;
use std::collections::BTreeMap;

use attune_protocol::{ImportOptions, Split, SplitName, TemplateDraft};

use super::*;

fn close(x: Option<f64>, want: f64) {
    let x = x.expect("a value");
    assert!((x - want).abs() < 1e-4, "{x} vs {want}");
}

#[test]
fn arena_wilson_interval_matches_hand_computed_values() {
    // 7 of 10: p = 0.7, z = 1.959964 -> [0.3968, 0.8922].
    let t = tally(7, 3, 0, 4);
    close(t.a_win_rate, 0.7);
    close(t.ci_low, 0.3968);
    close(t.ci_high, 0.8922);
    assert_eq!((t.a_wins, t.b_wins, t.ties, t.both_bad), (7, 3, 0, 4));
    // 3 wins, 1 loss, 2 ties: p = 4/6; Wilson over n = 6 -> [0.2999, 0.9032].
    let t = tally(3, 1, 2, 0);
    close(t.a_win_rate, 4.0 / 6.0);
    close(t.ci_low, 0.2999);
    close(t.ci_high, 0.9032);
    // All wins: the interval stays inside [0, 1]; 5 of 5 -> [0.5655, 1].
    let t = tally(5, 0, 0, 0);
    close(t.ci_low, 0.5655);
    close(t.ci_high, 1.0);
    // Only "both bad" votes: no rate.
    let t = tally(0, 0, 0, 3);
    assert_eq!((t.a_win_rate, t.ci_low, t.ci_high), (None, None, None));
}

#[test]
fn arena_sides_are_seeded_and_balanced() {
    let first: Vec<bool> = (0..200).map(|i| left_is_a(42, i)).collect();
    let again: Vec<bool> = (0..200).map(|i| left_is_a(42, i)).collect();
    assert_eq!(first, again);
    let left = first.iter().filter(|&&l| l).count();
    assert!((70..=130).contains(&left), "{left} of 200 on the left");
    let other: Vec<bool> = (0..200).map(|i| left_is_a(7, i)).collect();
    assert_ne!(first, other);
    for l in [true, false] {
        for v in [Vote::Left, Vote::Right, Vote::Tie, Vote::BothBad] {
            assert_eq!(shown_vote(stored_vote(v, l), l), Some(v));
        }
    }
    assert_eq!(stored_vote(Vote::Left, false), "b");
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
fn arena_generates_stores_votes_tallies_and_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Engine::open(&dir.path().join("data")).expect("open");
    let model = e.add_local_model(&default_model()).expect("add").model;
    let template = e
        .save_template(&TemplateDraft {
            name: "Pirate".into(),
            system: Some("Talk like a pirate.".into()),
            ..Default::default()
        })
        .expect("template");
    let a = ChatTarget::Base { model_id: model.id };
    let b = ChatTarget::Template {
        model_id: model.id,
        template_id: template.id,
        version: None,
        values: BTreeMap::new(),
        endpoint: None,
    };
    let spec = ArenaSpec {
        name: None,
        a: a.clone(),
        b: b.clone(),
        prompts: ArenaPrompts::Typed {
            prompts: vec!["  Say hi. ".into(), "   ".into(), "Name a color.".into()],
        },
        params: greedy(3),
        seed: 3,
    };
    let arena = e.create_arena(&spec).expect("create");
    assert_eq!(arena.prompts, 2);
    assert_eq!(arena.a_label, model.name);
    assert_eq!(
        arena.b_label,
        format!("Template 'Pirate' v1 on {}", model.name)
    );
    assert!(
        arena
            .name
            .starts_with(&format!("{} vs Template 'Pirate'", model.name)),
        "{}",
        arena.name
    );
    assert_eq!(arena.tally.a_win_rate, None);

    // Voting before the answers exist is refused.
    let err = e
        .arena_vote(arena.id, 0, Vote::Left)
        .expect_err("no answers");
    assert!(err.to_string().contains("before voting"), "{err}");

    // First view generates both sides, streaming each; the second reads them back.
    let no = AtomicBool::new(false);
    let mut events = Vec::new();
    let item = e
        .arena_item(arena.id, 0, &no, &mut |ev| events.push(ev))
        .expect("generate");
    assert_eq!(item.prompt, "Say hi.");
    assert!(!item.left.is_empty() && !item.right.is_empty());
    let streamed = |side: &str| -> String {
        events
            .iter()
            .filter_map(|ev| match ev {
                ArenaEvent::Token { side: s, text } if s == side => Some(text.as_str()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(streamed("left"), item.left);
    assert_eq!(streamed("right"), item.right);
    // The answers are the targets' own greedy answers, on the side the seed chose.
    let hi = [user("Say hi.")];
    let a_text = e
        .chat_target(&a, &hi, &greedy(3), &no, &mut |_| {})
        .expect("a")
        .text;
    let b_text = e
        .chat_target(&b, &hi, &greedy(3), &no, &mut |_| {})
        .expect("b")
        .text;
    let (left, right) = if left_is_a(3, 0) {
        (&a_text, &b_text)
    } else {
        (&b_text, &a_text)
    };
    assert_eq!((&item.left, &item.right), (left, right));
    let mut again = Vec::new();
    let stored = e
        .arena_item(arena.id, 0, &no, &mut |ev| again.push(ev))
        .expect("stored");
    assert!(again.is_empty(), "nothing is generated twice: {again:?}");
    assert_eq!(stored, item);

    // A cancelled generation stores nothing.
    let stop = AtomicBool::new(true);
    let err = e
        .arena_item(arena.id, 1, &stop, &mut |_| {})
        .expect_err("cancelled");
    assert_eq!(err.code(), "cancelled");
    let detail = e.arena_detail(arena.id).expect("detail");
    assert_eq!(
        (&detail.rows[1].a_answer, &detail.rows[1].b_answer),
        (&None, &None)
    );
    e.arena_item(arena.id, 1, &no, &mut |_| {}).expect("item 1");
    let err = e
        .arena_item(arena.id, 2, &no, &mut |_| {})
        .expect_err("no prompt 2");
    assert!(err.to_string().contains("no prompt 2"), "{err}");

    // Votes are about the sides as shown and tallied from A's side; a vote can change.
    let a_on_left_0 = left_is_a(3, 0);
    let s = e
        .arena_vote(
            arena.id,
            0,
            if a_on_left_0 { Vote::Left } else { Vote::Right },
        )
        .expect("vote A");
    assert_eq!((s.tally.a_wins, s.votes), (1, 1));
    let s = e
        .arena_vote(arena.id, 1, Vote::BothBad)
        .expect("vote both bad");
    assert_eq!((s.tally.both_bad, s.votes), (1, 2));
    close(s.tally.a_win_rate, 1.0);
    let s = e.arena_vote(arena.id, 1, Vote::Tie).expect("change vote");
    assert_eq!((s.tally.a_wins, s.tally.ties, s.tally.both_bad), (1, 1, 0));
    close(s.tally.a_win_rate, 0.75);
    let shown = e.arena_item(arena.id, 1, &no, &mut |_| {}).expect("item");
    assert_eq!(shown.vote, Some(Vote::Tie));
    let detail = e.arena_detail(arena.id).expect("detail");
    assert_eq!(detail.rows[0].winner.as_deref(), Some("a"));
    assert_eq!(detail.rows[0].a_answer.as_deref(), Some(a_text.as_str()));
    assert_eq!(detail.rows[1].winner.as_deref(), Some("tie"));

    // Export: the decisive vote only, as a preference pair.
    let out = dir.path().join("prefs.jsonl");
    assert_eq!(e.export_preferences(arena.id, &out).expect("export"), 1);
    let text = std::fs::read_to_string(&out).expect("read export");
    assert_eq!(text.lines().count(), 1);
    let pair: serde_json::Value = serde_json::from_str(text.trim()).expect("json line");
    assert_eq!(
        pair["prompt"],
        serde_json::json!([{"role": "user", "content": "Say hi."}])
    );
    assert_eq!(pair["chosen"], serde_json::json!(a_text));
    assert_eq!(pair["rejected"], serde_json::json!(b_text));
    assert_eq!(pair["chosen_model"], serde_json::json!(model.name));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|d| d.ok())
        .filter(|d| d.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
    // Exporting again never overwrites the first export.
    let err = e.export_preferences(arena.id, &out).expect_err("exists");
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).expect("read"), text);
    let bad = dir.path().join("missing-dir").join("prefs.jsonl");
    let err = e.export_preferences(arena.id, &bad).expect_err("bad path");
    assert!(err.to_string().contains("missing-dir"), "{err}");
    assert_eq!(err.code(), "io");

    // Removing the template keeps the arena's answers and labels.
    e.remove_template(template.id).expect("remove template");
    let detail = e.arena_detail(arena.id).expect("detail after removal");
    assert_eq!(detail.arena.b_label, arena.b_label);
    assert_eq!(detail.rows[0].b_answer.as_deref(), Some(b_text.as_str()));
    assert_eq!(e.list_arenas().expect("list").len(), 1);
    e.remove_arena(arena.id).expect("remove");
    assert_eq!(
        e.arena_detail(arena.id).expect_err("gone").code(),
        "not_found"
    );
    assert!(e.list_arenas().expect("list").is_empty());
}

#[test]
fn arena_prompts_from_a_dataset_and_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Engine::open(&dir.path().join("data")).expect("open");
    let model = e.add_local_model(&default_model()).expect("add").model;
    let rows = [
        serde_json::json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "First?"},
            {"role": "assistant", "content": "One."},
            {"role": "user", "content": "Second?"},
            {"role": "assistant", "content": "Two."}
        ]}),
        serde_json::json!({"messages": [
            {"role": "user", "content": "Alone?"},
            {"role": "assistant", "content": "Yes."}
        ]}),
        serde_json::json!({"messages": [
            {"role": "user", "content": "Third?"},
            {"role": "assistant", "content": "Three."}
        ]}),
    ];
    let path = dir.path().join("chat.jsonl");
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).expect("write dataset");
    let ds = e
        .import_dataset(
            &path,
            &ImportOptions {
                split: Split::AllTrain,
                ..Default::default()
            },
        )
        .expect("import");
    let template = e
        .save_template(&TemplateDraft {
            name: "T".into(),
            user: Some("Q: {{input}}".into()),
            ..Default::default()
        })
        .expect("template");
    let base = ChatTarget::Base { model_id: model.id };
    let tmpl = ChatTarget::Template {
        model_id: model.id,
        template_id: template.id,
        version: None,
        values: BTreeMap::new(),
        endpoint: None,
    };
    let spec = ArenaSpec {
        name: Some(" Mine ".into()),
        a: base.clone(),
        b: tmpl.clone(),
        prompts: ArenaPrompts::Dataset {
            dataset_id: ds.id,
            split: SplitName::Train,
            limit: Some(2),
        },
        params: greedy(2),
        seed: 9,
    };
    let arena = e.create_arena(&spec).expect("create");
    assert_eq!((arena.name.as_str(), arena.prompts), ("Mine", 2));
    let items = e.store.arena_items(arena.id).expect("items");
    assert_eq!(items[0].prompt, "Second?");
    let context: Vec<ChatMessage> = serde_json::from_str(&items[0].context_json).expect("json");
    assert_eq!(context.len(), 4);
    assert_eq!(context[3].content, "Second?");
    assert_eq!(items[1].prompt, "Alone?");
    assert_eq!(items[1].left_is_a, left_is_a(9, 1));

    // Refusals.
    let same = ArenaSpec {
        b: base.clone(),
        ..spec.clone()
    };
    assert!(e
        .create_arena(&same)
        .expect_err("same")
        .to_string()
        .contains("same"));
    let ghost = ArenaSpec {
        b: ChatTarget::Base { model_id: 404 },
        ..spec.clone()
    };
    assert_eq!(
        e.create_arena(&ghost).expect_err("missing").code(),
        "not_found"
    );
    let blank = ArenaSpec {
        prompts: ArenaPrompts::Typed {
            prompts: vec![" ".into()],
        },
        ..spec.clone()
    };
    assert_eq!(
        e.create_arena(&blank).expect_err("blank").code(),
        "invalid_input"
    );
    let many = ArenaSpec {
        prompts: ArenaPrompts::Typed {
            prompts: vec!["p".into(); MAX_ARENA_PROMPTS + 1],
        },
        ..spec.clone()
    };
    assert!(e
        .create_arena(&many)
        .expect_err("many")
        .to_string()
        .contains("at most 500"));
    let no_ds = ArenaSpec {
        prompts: ArenaPrompts::Dataset {
            dataset_id: 77,
            split: SplitName::Train,
            limit: None,
        },
        ..spec.clone()
    };
    assert_eq!(
        e.create_arena(&no_ds).expect_err("no dataset").code(),
        "not_found"
    );
    let empty_split = ArenaSpec {
        prompts: ArenaPrompts::Dataset {
            dataset_id: ds.id,
            split: SplitName::Test,
            limit: None,
        },
        ..spec
    };
    let err = e.create_arena(&empty_split).expect_err("empty split");
    assert!(err.to_string().contains("test split"), "{err}");
    assert_eq!(e.list_arenas().expect("list").len(), 1);
}
