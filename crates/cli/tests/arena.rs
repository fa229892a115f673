//! `attune arena ...` as a subprocess with the real default model as candidates and as
//! the judge (3-token answers, 8-token verdicts), each test in its own data directory.

use attune_test_support::Cli;

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn a_judge_fills_an_arena_and_the_results_compare_it_with_the_human() {
    let env = Cli::new(env!("CARGO_BIN_EXE_attune"));
    env.add_default_model();
    let list = env.json(&["models", "list", "--json"]);
    let model = list[0]["name"].as_str().expect("model name").to_string();
    env.ok(&[
        "templates",
        "add",
        "Brief",
        "--system",
        "Answer in one word.",
    ]);
    let prompts = env.write(
        "prompts.txt",
        "What is 2 + 2?\n\nName a primary color.\nIs ice cold?\n",
    );
    let arena = env.json(&[
        "arena",
        "create",
        "--a",
        &model,
        "--b",
        &model,
        "--b-template",
        "Brief",
        "--prompts",
        path(&prompts),
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--json",
    ]);
    assert_eq!(arena["prompts"], 3);
    let id = arena["id"].as_i64().expect("id").to_string();

    // A human votes on prompt 0 after seeing it blind.
    let item = env.json(&["arena", "show", &id, "0", "--json"]);
    assert!(
        item["left"].is_string() && item["right"].is_string(),
        "{item}"
    );
    let voted = env.ok(&["arena", "vote", &id, "0", "left"]);
    assert!(voted.contains("1 human votes"), "{voted}");

    // The default rubric, then an edited one from a file.
    let rubric = env.ok(&["arena", "rubric"]);
    assert!(rubric.contains("Correctness"), "{rubric}");
    let edited = env.write(
        "rubric.txt",
        "Prefer the correct answer; shorter is better.\n",
    );

    // The judge fills the two prompts without a human vote, in both orders.
    let report = env.json(&[
        "arena",
        "judge",
        &id,
        "--judge-model",
        &model,
        "--rubric",
        path(&edited),
        "--both-orders",
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert_eq!(
        (report["judged"].as_u64(), report["skipped"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(report["rubric_version"], 2);
    let unparsed = report["unparsed"].as_u64().expect("unparsed");
    let shown = env.ok(&["arena", "rubric"]);
    assert!(shown.starts_with("Prefer the correct answer"), "{shown}");

    let results = env.json(&["arena", "results", &id, "--json"]);
    assert_eq!(
        results["human"]["tally"]["a_wins"].as_u64().unwrap_or(0)
            + results["human"]["tally"]["b_wins"].as_u64().unwrap_or(0),
        1
    );
    let j = &results["judges"][0];
    assert_eq!(j["votes"], 2);
    assert_eq!(j["unparsed"].as_u64(), Some(unparsed));
    assert_eq!(j["combined_human"], 1);
    assert_eq!(j["combined_judge"].as_u64(), Some(2 - unparsed));
    assert_eq!(j["agreement"]["n"], 0);
    let text = env.ok(&["arena", "results", &id]);
    assert!(
        text.contains(&format!("combined (1 human + {} judge)", 2 - unparsed)),
        "{text}"
    );
    assert!(text.contains("rubric v2, both orders"), "{text}");
    assert!(text.contains("Fleiss, Cohen and Everitt"), "{text}");

    // The judge also votes where the human did: agreement is measured on that prompt
    // when its verdict parsed.
    let more = env.json(&[
        "arena",
        "judge",
        &id,
        "--judge-model",
        &model,
        "--both-orders",
        "--all",
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert_eq!(
        (more["judged"].as_u64(), more["skipped"].as_u64()),
        (Some(1), Some(2))
    );
    let results = env.json(&["arena", "results", &id, "--json"]);
    let j = &results["judges"][0];
    let parsed_on_0 = more["unparsed"] == 0;
    assert_eq!(j["agreement"]["n"].as_u64(), Some(u64::from(parsed_on_0)));
    let verdicts = env.json(&["arena", "verdicts", &id, "--json"]);
    assert_eq!(verdicts.as_array().map(Vec::len), Some(3));
    assert!(verdicts[0]["verdict_swapped"].is_string(), "{verdicts}");
    let listed = env.ok(&["arena", "verdicts", &id]);
    assert!(
        listed.contains("A first") && listed.contains("B first"),
        "{listed}"
    );

    // A constrained judge (each verdict scored by its log-prob, no generation) is another
    // judge beside the free-text one; it never leaves a verdict unread.
    let c = env.json(&[
        "arena",
        "judge",
        &id,
        "--judge-model",
        &model,
        "--verdict",
        "constrained",
        "--both-orders",
        "--all",
        "--json",
    ]);
    assert_eq!(
        (c["judged"].as_u64(), c["unparsed"].as_u64()),
        (Some(3), Some(0))
    );
    assert_eq!(c["verdict"], "constrained");
    let text = env.ok(&["arena", "results", &id]);
    assert!(
        text.contains("judge 2:") && text.contains("constrained verdict"),
        "{text}"
    );
    let listed = env.ok(&["arena", "verdicts", &id]);
    assert!(listed.contains("summed log-probs"), "{listed}");
    // Preference pairs from a judge's votes: with two judges, --judge names one.
    let err = env.fails(&[
        "train",
        "--model",
        "1",
        "--method",
        "dpo",
        "--arena",
        &id,
        "--votes",
        "judge",
        "--create-only",
    ]);
    assert!(
        err.contains("several judges") && err.contains("2: "),
        "{err}"
    );
    let err = env.fails(&[
        "train",
        "--model",
        "1",
        "--method",
        "dpo",
        "--arena",
        &id,
        "--votes",
        "judge",
        "--judge",
        "7",
        "--create-only",
    ]);
    assert!(err.contains("judges 1 to 2"), "{err}");
    let judges = env.json(&["arena", "results", &id, "--json"]);
    let constrained_n = judges["judges"]
        .as_array()
        .expect("judges")
        .iter()
        .position(|j| j["verdict"] == "constrained")
        .expect("the constrained judge")
        + 1;
    let out = env.run(&[
        "train",
        "--model",
        "1",
        "--method",
        "dpo",
        "--arena",
        &id,
        "--votes",
        "combined",
        "--judge",
        &constrained_n.to_string(),
        "--steps",
        "1",
        "--create-only",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        assert!(
            stderr.contains("combined votes, judge") && stderr.contains("unparseable"),
            "{stderr}"
        );
    } else {
        // Every vote was a tie or both bad: refused, naming the counts.
        assert!(stderr.contains("no decisive combined votes"), "{stderr}");
    }
    // Refusals are one line naming the problem.
    env.ok(&[
        "endpoints",
        "add",
        "remote",
        "--url",
        &attune_test_support::closed_port_endpoint(),
    ]);
    let empty = env.write("empty.txt", " \n");
    let (id, model, empty) = (id.as_str(), model.as_str(), path(&empty));
    #[rustfmt::skip]
    let refusals: &[(&[&str], &[&str])] = &[
        (&["train", "--model", "1", "--method", "dpo", "--arena", id, "--judge", "1"], &["--votes judge or combined"]),
        // An endpoint cannot give a constrained verdict.
        (&["arena", "judge", id, "--endpoint", "remote", "--model", "gpt-x", "--verdict", "constrained"], &["free text"]),
        (&["arena", "judge", "999", "--judge-model", model], &["arena", "999"]),
        (&["arena", "judge", id], &["--judge-model"]),
        (&["arena", "judge", id, "--judge-model", model, "--max-tokens", "0"], &["--max-tokens"]),
        (&["arena", "judge", id, "--judge-model", "no-such-model"], &["no-such-model"]),
        (&["arena", "judge", id, "--judge-model", model, "--rubric", empty], &["rubric"]),
        (&["arena", "results", "999"], &["999"]),
    ];
    for (args, wanted) in refusals {
        let err = env.fails_in_one_line(args);
        assert!(wanted.iter().all(|w| err.contains(w)), "{args:?}: {err}");
    }
}
