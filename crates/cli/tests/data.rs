//! `attune data ...` as a subprocess: each test gets its own temporary data directory;
//! real files, the real PubMedQA data and the real default model where present.

use attune_test_support::Cli;
use std::path::Path;

struct Env(Cli);

impl std::ops::Deref for Env {
    type Target = Cli;
    fn deref(&self) -> &Cli {
        &self.0
    }
}

impl Env {
    fn new() -> Env {
        Env(Cli::new(env!("CARGO_BIN_EXE_attune")))
    }

    /// A failure prints nothing on stdout.
    fn fails(&self, args: &[&str]) -> String {
        self.0.fails_quietly(args)
    }

    fn list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["data", "list", "--json"])).expect("list --json")
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn chat_line(i: usize) -> String {
    format!(
        "{{\"id\":\"r{i}\",\"label\":\"yes\",\"messages\":[{{\"role\":\"user\",\"content\":\"question {i}\"}},{{\"role\":\"assistant\",\"content\":\"answer {i}\"}}]}}\n"
    )
}

#[test]
fn data_import_list_show_rm() {
    let env = Env::new();
    let text: String = (0..20).map(chat_line).collect::<String>() + &chat_line(3);
    let p = env.write("qa.jsonl", text);
    let out = env.ok(&[
        "data",
        "import",
        s(&p),
        "--seed",
        "7",
        "--test-fraction",
        "0.1",
    ]);
    assert!(
        out.starts_with("imported dataset 1 'qa': 16 train, 2 valid, 2 test rows (1 duplicates removed, 0 bad rows skipped)"),
        "{out}"
    );
    let list = env.list();
    assert_eq!(list.len(), 1);
    let d = &list[0];
    assert_eq!(
        (d["name"].as_str(), d["format"].as_str()),
        (Some("qa"), Some("chat"))
    );
    assert_eq!(d["split"]["kind"], "seeded");
    assert_eq!(d["split"]["seed"], 7);
    assert_eq!(d["content_hash"].as_str().map(str::len), Some(64));

    let shown: serde_json::Value =
        serde_json::from_str(&env.ok(&["data", "show", "qa", "--json"])).expect("show json");
    assert_eq!(&shown, d);
    let text = env.ok(&["data", "show", "1"]);
    assert!(
        text.contains("16 train, 2 valid, 2 test") && text.contains("seed 7"),
        "{text}"
    );
    let table = env.ok(&["data", "list"]);
    assert!(table.starts_with("ID") && table.contains("qa"), "{table}");

    // Same name again: refused, naming the existing dataset.
    let err = env.fails(&["data", "import", s(&p)]);
    assert!(err.contains("'qa'") && err.contains("id 1"), "{err}");
    // The same file under another name, all rows for training.
    let out = env.ok(&[
        "data",
        "import",
        s(&p),
        "--name",
        "all",
        "--valid-fraction",
        "0",
        "--yes",
    ]);
    assert!(out.contains("'all': 20 train, 0 valid, 0 test"), "{out}");

    let out = env.ok(&["data", "rm", "qa"]);
    assert!(out.contains("removed dataset 1"), "{out}");
    assert_eq!(env.list().len(), 1);
    assert!(p.is_file(), "rm keeps the source file");
    env.fails(&["data", "show", "qa"]);
}

#[test]
fn bad_rows_are_listed_and_nothing_is_imported() {
    let env = Env::new();
    let mut bytes = chat_line(0).into_bytes();
    for _ in 0..25 {
        bytes.extend_from_slice(b"{not json\n");
    }
    bytes.extend_from_slice(b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}\n");
    bytes.extend_from_slice(chat_line(1).as_bytes());
    let p = env.write("bad.jsonl", &bytes);
    let err = env.fails(&["data", "import", s(&p)]);
    assert!(err.contains("  line 2: invalid JSON"), "{err}");
    assert!(err.contains("  line 21: invalid JSON"), "{err}");
    assert!(!err.contains("line 22:"), "at most 20 listed: {err}");
    assert!(err.contains("... and 6 more"), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("26 bad row(s)") && last.contains("bad.jsonl"),
        "{last}"
    );
    assert!(env.list().is_empty());

    let out = env.ok(&[
        "data",
        "import",
        s(&p),
        "--accept-bad-rows",
        "--valid-fraction",
        "0",
    ]);
    assert!(
        out.contains("2 train") && out.contains("26 bad rows skipped"),
        "{out}"
    );
}

#[test]
fn csv_text_and_bad_flags() {
    let env = Env::new();
    let csv = env.write("pairs.csv", "q,a,t\nhello,world,doc\nhi,there,doc2\n");
    let out = env.ok(&[
        "data",
        "import",
        s(&csv),
        "--map",
        "prompt=q,response=a",
        "--valid-fraction",
        "0",
    ]);
    assert!(out.contains("'pairs': 2 train"), "{out}");
    let out = env.ok(&[
        "data",
        "import",
        s(&csv),
        "--name",
        "docs",
        "--map",
        "text=t",
        "--valid-fraction",
        "0",
    ]);
    assert!(out.contains("'docs': 2 train"), "{out}");
    let txt = env.write("notes.txt", "para one\nline two\n\npara two\n");
    let out = env.ok(&[
        "data",
        "import",
        s(&txt),
        "--paragraphs",
        "--valid-fraction",
        "0",
    ]);
    assert!(out.contains("'notes': 2 train"), "{out}");

    let err = env.fails(&["data", "import", s(&csv), "--format", "xml"]);
    assert!(err.contains("xml"), "{err}");
    let err = env.fails(&["data", "import", s(&csv), "--map", "question=q"]);
    assert!(err.contains("question"), "{err}");
    let err = env.fails(&["data", "import", s(&csv), "--valid-fraction", "1.5"]);
    assert!(err.contains("--valid-fraction"), "{err}");
    let err = env.fails(&["data", "import", s(&env.root().join("none.jsonl"))]);
    assert!(err.contains("none.jsonl"), "{err}");
    assert_eq!(env.list().len(), 3);
}

#[test]
fn pubmedqa_import_and_token_stats() {
    let data = attune_test_support::shared("data/pubmedqa");
    attune_test_support::shared("data/pubmedqa/train.jsonl");
    let model = attune_test_support::default_model();
    let env = Env::new();
    env.ok(&["models", "add", s(&model)]);
    let out = env.ok(&[
        "data",
        "import",
        s(&data.join("train.jsonl")),
        "--name",
        "pubmedqa",
        "--valid",
        s(&data.join("valid.jsonl")),
        "--test",
        s(&data.join("test.jsonl")),
    ]);
    assert!(out.contains("800 train, 100 valid, 100 test"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["data", "show", "pubmedqa", "--model", "1", "--json"]))
            .expect("show json");
    let train = &v["stats"]["splits"][0];
    assert_eq!(train["split"], "train");
    assert_eq!(train["rows"], 800);
    assert!(
        train["tokens_max"].as_u64().expect("max") <= 1024,
        "{train}"
    );
    assert_eq!(train["truncated_rows"], 0);
    let text = env.ok(&[
        "data",
        "show",
        "pubmedqa",
        "--model",
        "1",
        "--max-len",
        "256",
    ]);
    assert!(
        text.contains("TRUNCATED") && text.contains("max length 256"),
        "{text}"
    );
}

#[test]
fn documents_become_rows_for_review_then_datasets() {
    let docs = attune_test_support::test_data("docs");
    let env = Env::new();
    env.add_default_model();
    // A teacher that does not exist is refused before anything is read.
    let err = env.fails(&[
        "data",
        "from-docs",
        s(&docs),
        "--name",
        "ic",
        "--teacher",
        "no-such-model",
    ]);
    assert!(err.contains("no model or adapter 'no-such-model'"), "{err}");
    assert!(env.ok(&["data", "docsets"]).contains("no document sets"));

    // The real default model teaches two chunks with a few tokens each.
    let out = env.run(&[
        "data",
        "from-docs",
        s(&docs),
        "--name",
        "ic",
        "--teacher",
        "1",
        "--max-chunks",
        "2",
        "--max-tokens",
        "24",
        "--chunk-chars",
        "300",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for doc in [
        "hand-hygiene.pdf (pdf, 2 pages",
        "sterile-field.docx (docx",
        "gloves.html (html",
        "sharps.md (markdown",
        "cleaning.txt (text",
    ] {
        assert!(stdout.contains(&format!("read {doc}")), "{doc}: {stdout}");
    }
    assert!(
        stderr.contains("skipped scanned/scan.pdf: no text layer (scanned?)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("skipped bad/truncated.pdf: malformed PDF"),
        "{stderr}"
    );
    assert!(
        stderr.contains("skipped bad/not-a-zip.docx: not a DOCX file"),
        "{stderr}"
    );
    assert!(stderr.contains("template 'docs-teacher-qa' v1"), "{stderr}");
    assert!(stdout.contains("2 chunks taught"), "{stdout}");

    let review: serde_json::Value =
        serde_json::from_str(&env.ok(&["data", "review", "ic", "--json"])).expect("review json");
    let rows = review["rows"].as_array().expect("rows");
    assert!(!rows.is_empty());
    for r in rows {
        assert!(
            r["teacher"].as_str().is_some_and(|t| t.contains("SmolLM2")),
            "{r}"
        );
        assert_eq!(r["template"], "docs-teacher-qa");
        assert!(r["passage"].as_str().is_some_and(|p| !p.is_empty()), "{r}");
        let status = r["status"].as_str().expect("status");
        assert!(status == "pending" || status == "failed", "{r}");
        if status == "failed" {
            assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
        }
    }
    let pending: Vec<i64> = rows
        .iter()
        .filter(|r| r["status"] == "pending")
        .filter_map(|r| r["id"].as_i64())
        .collect();

    // The plain-text dataset needs no review; the chat dataset needs accepted rows.
    let out = env.run(&["data", "review", "ic", "--pretrain", "ic-text"]);
    assert!(out.status.success(), "{out:?}");
    let listed = env.list();
    let text = listed
        .iter()
        .find(|d| d["name"] == "ic-text")
        .expect("ic-text listed");
    assert_eq!(text["kind"], "text");
    if pending.is_empty() {
        let err = env.fails(&["data", "review", "ic", "--dataset", "ic-qa"]);
        assert!(err.contains("no accepted rows"), "{err}");
    } else {
        env.ok(&["data", "review", "ic", "--accept-all", "--dataset", "ic-qa"]);
        let listed = env.list();
        let qa = listed
            .iter()
            .find(|d| d["name"] == "ic-qa")
            .expect("ic-qa listed");
        assert_eq!(qa["kind"], "chat");
    }
    let err = env.fails(&["data", "review", "ic", "--accept", "99999"]);
    assert!(err.contains("no row 99999"), "{err}");
}
