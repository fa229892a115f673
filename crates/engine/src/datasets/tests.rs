//! Dataset tests: real files in a temporary directory, the library on disk, the real
//! PubMedQA files from `shared/data/pubmedqa` and the real default model.

use std::path::{Path, PathBuf};

use attune_protocol::{
    ChatMessage, ColumnMap, DatasetFormat, ImportOptions, LossOn, Split, SplitName,
};

use super::*;
use crate::{Engine, EngineError};

fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(&dir.path().join("data")).expect("open engine");
    (dir, engine)
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write file");
    p
}

fn all_train() -> ImportOptions {
    ImportOptions {
        split: Split::AllTrain,
        ..ImportOptions::default()
    }
}

fn m(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn chat_line(user: &str, assistant: &str) -> String {
    format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":{}}},{{\"role\":\"assistant\",\"content\":{}}}]}}\n",
        serde_json::to_string(user).expect("json"),
        serde_json::to_string(assistant).expect("json")
    )
}

fn rows(e: &Engine, id: i64, split: SplitName) -> Vec<DatasetRow> {
    e.dataset_rows(id, split).expect("rows")
}

/// `../shared/data/pubmedqa`; fails the test (never skips it) when it is missing.
fn pubmedqa() -> PathBuf {
    let dir = attune_test_support::shared("data/pubmedqa");
    attune_test_support::shared("data/pubmedqa/train.jsonl");
    dir
}

#[test]
fn chat_jsonl_keeps_labels_ids_and_ignores_extra_keys() {
    let (dir, e) = engine();
    let p = write(
        dir.path(),
        "qa.jsonl",
        concat!(
            r#"{"id":"a1","label":"yes","extra":[1,2],"messages":[{"role":"system","content":"Be brief.","name":"x"},{"role":"user","content":"Q1"},{"role":"assistant","content":"A1"}]}"#,
            "\n\n",
            r#"{"id":7,"messages":[{"role":"user","content":"Q2"},{"role":"assistant","content":"A2"},{"role":"user","content":"Q3"},{"role":"assistant","content":"A3"}]}"#,
            "\r\n"
        ),
    );
    let preview = e.inspect_dataset(&p, &all_train()).expect("inspect");
    assert_eq!(preview.format, DatasetFormat::Chat);
    assert!(preview.format_detected);
    assert_eq!(preview.name, "qa");
    assert_eq!((preview.good_rows, preview.bad_row_count), (2, 0));
    assert_eq!(preview.rows.len(), 2);
    assert_eq!(preview.rows[1].line, 3);
    assert!(
        e.list_datasets().expect("list").is_empty(),
        "inspect writes nothing"
    );

    let ds = e.import_dataset(&p, &all_train()).expect("import");
    assert_eq!(ds.name, "qa");
    assert_eq!((ds.train_rows, ds.valid_rows, ds.test_rows), (2, 0, 0));
    assert_eq!(ds.kind, attune_protocol::SampleKind::Chat);
    assert_eq!(ds.content_hash.len(), 64);
    let r = rows(&e, ds.id, SplitName::Train);
    assert_eq!(
        r[0],
        DatasetRow {
            source_id: Some("a1".into()),
            sample: Sample::Chat(vec![
                m("system", "Be brief."),
                m("user", "Q1"),
                m("assistant", "A1")
            ]),
            label: Some("yes".into()),
        }
    );
    assert_eq!(r[1].source_id.as_deref(), Some("7"));
    assert_eq!(r[1].label, None);
    assert!(rows(&e, ds.id, SplitName::Valid).is_empty());
    // The stored rows do not depend on the source file.
    std::fs::remove_file(&p).expect("rm");
    assert_eq!(rows(&e, ds.id, SplitName::Train).len(), 2);
}

#[test]
fn sharegpt_and_alpaca_normalize_to_chat() {
    let (dir, e) = engine();
    let sg = write(
        dir.path(),
        "sg.jsonl",
        concat!(
            r#"{"id":"s","conversations":[{"from":"system","value":"S"},{"from":"human","value":"hi"},{"from":"gpt","value":"hello"}]}"#,
            "\n",
            r#"{"conversations":[{"from":"user","value":"u"},{"from":"assistant","value":"a"}]}"#,
            "\n",
            r#"{"conversations":[{"from":"bot","value":"u"}]}"#,
            "\n"
        ),
    );
    let pv = e.inspect_dataset(&sg, &all_train()).expect("inspect sg");
    assert_eq!(pv.format, DatasetFormat::Sharegpt);
    assert_eq!(pv.bad_rows.len(), 1);
    assert_eq!(pv.bad_rows[0].line, 3);
    assert!(
        pv.bad_rows[0].reason.contains("unknown role 'bot'"),
        "{:?}",
        pv.bad_rows
    );
    let o = ImportOptions {
        accept_bad_rows: true,
        ..all_train()
    };
    let ds = e.import_dataset(&sg, &o).expect("import sg");
    assert_eq!(ds.bad_rows_skipped, 1);
    let r = rows(&e, ds.id, SplitName::Train);
    assert_eq!(
        r[0].sample,
        Sample::Chat(vec![
            m("system", "S"),
            m("user", "hi"),
            m("assistant", "hello")
        ])
    );
    assert_eq!(
        r[1].sample,
        Sample::Chat(vec![m("user", "u"), m("assistant", "a")])
    );

    let al = write(
        dir.path(),
        "al.jsonl",
        concat!(
            r#"{"instruction":"Do X","input":"with Y","output":"done"}"#,
            "\n",
            r#"{"instruction":"Do Z","input":"","output":"ok","system":"Sys"}"#,
            "\n",
            r#"{"instruction":"Do W","output":"fine"}"#,
            "\n"
        ),
    );
    let ds = e.import_dataset(&al, &all_train()).expect("import alpaca");
    assert_eq!(ds.format, DatasetFormat::Alpaca);
    let r = rows(&e, ds.id, SplitName::Train);
    assert_eq!(
        r[0].sample,
        Sample::Chat(vec![m("user", "Do X\n\nwith Y"), m("assistant", "done")])
    );
    assert_eq!(
        r[1].sample,
        Sample::Chat(vec![
            m("system", "Sys"),
            m("user", "Do Z"),
            m("assistant", "ok")
        ])
    );
    assert_eq!(
        r[2].sample,
        Sample::Chat(vec![m("user", "Do W"), m("assistant", "fine")])
    );
}

#[test]
fn csv_maps_columns_and_reports_record_lines() {
    let (dir, e) = engine();
    let mut bytes = b"id,question,answer,label\n1,What?,That.,yes\n2,\"Multi\nline\",\"Two\",no\n3,,empty prompt,no\n4,Short\n".to_vec();
    bytes.extend_from_slice(b"5,Bad \xff byte,x,yes\n6,Fine,Good,maybe\n");
    let p = write(dir.path(), "qa.csv", &bytes);
    // Guessed columns: question -> prompt, answer -> response, id and label by name.
    let pv = e.inspect_dataset(&p, &all_train()).expect("inspect");
    assert_eq!(pv.format, DatasetFormat::Csv);
    assert_eq!(pv.headers, ["id", "question", "answer", "label"]);
    assert_eq!(e.csv_headers(&p).expect("headers"), pv.headers);
    let bad: Vec<(u64, &str)> = pv
        .bad_rows
        .iter()
        .map(|b| (b.line, b.reason.as_str()))
        .collect();
    assert_eq!(bad.len(), 3, "{bad:?}");
    assert_eq!(bad[0].0, 5);
    assert!(bad[0].1.contains("empty field 'question'"), "{bad:?}");
    assert_eq!(bad[1].0, 6);
    assert!(bad[1].1.contains("missing field 'answer'"), "{bad:?}");
    assert_eq!(bad[2].0, 7);
    assert!(bad[2].1.contains("invalid UTF-8"), "{bad:?}");

    let o = ImportOptions {
        accept_bad_rows: true,
        ..all_train()
    };
    let ds = e.import_dataset(&p, &o).expect("import");
    let r = rows(&e, ds.id, SplitName::Train);
    assert_eq!(r.len(), 3);
    assert_eq!(
        r[1].sample,
        Sample::Chat(vec![m("user", "Multi\nline"), m("assistant", "Two")])
    );
    assert_eq!(
        (r[1].source_id.as_deref(), r[1].label.as_deref()),
        (Some("2"), Some("no"))
    );

    // Explicit mapping, system column, and a text column.
    let p2 = write(dir.path(), "m.csv", "p,r,s,t\nhi,there,be nice,doc one\n");
    let o = ImportOptions {
        name: Some("mapped".into()),
        columns: ColumnMap {
            prompt: Some("p".into()),
            response: Some("r".into()),
            system: Some("s".into()),
            ..ColumnMap::default()
        },
        ..all_train()
    };
    let ds = e.import_dataset(&p2, &o).expect("mapped");
    assert_eq!(
        rows(&e, ds.id, SplitName::Train)[0].sample,
        Sample::Chat(vec![
            m("system", "be nice"),
            m("user", "hi"),
            m("assistant", "there")
        ])
    );
    let o = ImportOptions {
        name: Some("text".into()),
        columns: ColumnMap {
            text: Some("t".into()),
            ..ColumnMap::default()
        },
        ..all_train()
    };
    let ds = e.import_dataset(&p2, &o).expect("text column");
    assert_eq!(ds.kind, attune_protocol::SampleKind::Text);
    assert_eq!(
        rows(&e, ds.id, SplitName::Train)[0].sample,
        Sample::Text("doc one".into())
    );
    let o = ImportOptions {
        columns: ColumnMap {
            prompt: Some("nope".into()),
            response: Some("r".into()),
            ..ColumnMap::default()
        },
        ..all_train()
    };
    let err = e.inspect_dataset(&p2, &o).expect_err("unknown column");
    assert!(
        err.to_string().contains("'nope'") && err.to_string().contains("m.csv"),
        "{err}"
    );
}

#[test]
fn text_per_line_and_per_paragraph() {
    let (dir, e) = engine();
    let mut bytes =
        b"First doc.\n\nSecond doc\nstill second.\n  \nThird \xfe bad\nfourth\n".to_vec();
    bytes.extend_from_slice(b"\n");
    let p = write(dir.path(), "corpus.txt", &bytes);
    let pv = e.inspect_dataset(&p, &all_train()).expect("lines");
    assert_eq!(pv.format, DatasetFormat::Text);
    assert_eq!(pv.good_rows, 4);
    assert_eq!(pv.bad_rows.len(), 1);
    assert_eq!(pv.bad_rows[0].line, 6);
    assert!(pv.bad_rows[0].reason.contains("invalid UTF-8"));

    let o = ImportOptions {
        paragraphs: true,
        accept_bad_rows: true,
        ..all_train()
    };
    let pv = e.inspect_dataset(&p, &o).expect("paragraphs");
    assert_eq!(pv.good_rows, 2);
    assert_eq!((pv.bad_rows[0].line, pv.bad_row_count), (6, 1));
    let ds = e.import_dataset(&p, &o).expect("import");
    let r = rows(&e, ds.id, SplitName::Train);
    assert_eq!(r[0].sample, Sample::Text("First doc.".into()));
    assert_eq!(
        r[1].sample,
        Sample::Text("Second doc\nstill second.".into())
    );
}

#[test]
fn every_bad_row_is_reported_with_its_line_and_a_refused_import_changes_nothing() {
    let (dir, e) = engine();
    let good = chat_line("q", "a");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(good.as_bytes()); // 1
    bytes.extend_from_slice(b"{\"messages\": [\n"); // 2: malformed JSON
    bytes.extend_from_slice(b"{\"messages\":[{\"role\":\"user\",\"content\":\"caf\xe9\"}]}\n"); // 3: invalid UTF-8
    bytes.extend_from_slice(chat_line("q2", "  ").as_bytes()); // 4: empty content
    bytes.extend_from_slice(
        b"{\"messages\":[{\"role\":\"user\"},{\"role\":\"assistant\",\"content\":\"a\"}]}\n",
    ); // 5: missing field
    bytes.extend_from_slice(b"{\"messages\":[{\"role\":\"assistant\",\"content\":\"a\"},{\"role\":\"user\",\"content\":\"q\"}]}\n"); // 6: order
    bytes.extend_from_slice(chat_line(&"x".repeat(MAX_ROW_CHARS + 1), "a").as_bytes()); // 7: too long
    bytes.extend_from_slice(b"[1, 2]\n"); // 8: not an object
    bytes.extend_from_slice(b"{\"messages\":\"hello\"}\n"); // 9: wrong type
    bytes.extend_from_slice(b"{\"messages\":[{\"role\":\"user\",\"content\":\"q\"}]}\n"); // 10: ends with user
    bytes.extend_from_slice(b"\n"); // 11: blank, skipped
    bytes.extend_from_slice(chat_line("q3", "a3").as_bytes()); // 12
    let p = write(dir.path(), "bad.jsonl", &bytes);

    let pv = e.inspect_dataset(&p, &all_train()).expect("inspect");
    let got: Vec<(u64, String)> = pv
        .bad_rows
        .iter()
        .map(|b| (b.line, b.reason.clone()))
        .collect();
    let want: [(u64, &str); 9] = [
        (2, "invalid JSON"),
        (3, "invalid UTF-8"),
        (4, "message 2: empty content"),
        (5, "message 1: missing field 'content'"),
        (6, "roles out of order"),
        (7, "longer than any sensible max length"),
        (8, "not a JSON object"),
        (9, "wrong type: 'messages' must be an array"),
        (10, "roles out of order"),
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for ((line, reason), (wl, wr)) in got.iter().zip(want) {
        assert_eq!(*line, wl, "{got:#?}");
        assert!(reason.contains(wr), "line {line}: '{reason}' lacks '{wr}'");
    }
    assert!(pv.bad_rows.iter().all(|b| b.file.ends_with("bad.jsonl")));
    assert_eq!(pv.good_rows, 2);

    let err = e.import_dataset(&p, &all_train()).expect_err("refused");
    assert_eq!(err.code(), "bad_rows");
    let msg = err.to_string();
    assert!(
        msg.contains("bad.jsonl") && msg.contains("9 bad") && msg.contains("line 2: invalid JSON"),
        "{msg}"
    );
    assert!(e.list_datasets().expect("list").is_empty());
    assert_eq!(e.store.count_dataset_rows().expect("count"), 0);
    assert_eq!(e.store.integrity_check().expect("check"), "ok");

    let o = ImportOptions {
        accept_bad_rows: true,
        ..all_train()
    };
    let ds = e.import_dataset(&p, &o).expect("accepted");
    assert_eq!((ds.train_rows, ds.bad_rows_skipped), (2, 9));
    let lines: Vec<i64> = e
        .store
        .dataset_rows(ds.id, "train")
        .expect("stored")
        .iter()
        .filter_map(|r| r.source_line)
        .collect();
    assert_eq!(lines, [1, 12]);
}

#[test]
fn duplicates_are_counted_and_the_first_kept() {
    let (dir, e) = engine();
    let text = [
        chat_line("a", "1"),
        chat_line("b", "2"),
        chat_line("a", "1"),
        r#"{"id":"x","messages":[{"role":"user","content":"b"},{"role":"assistant","content":"2"}]}"#.to_string() + "\n",
        chat_line("c", "3"),
    ]
    .concat();
    let p = write(dir.path(), "d.jsonl", text);
    let pv = e.inspect_dataset(&p, &all_train()).expect("inspect");
    assert_eq!((pv.good_rows, pv.duplicates, pv.train_rows), (5, 2, 3));
    let ds = e.import_dataset(&p, &all_train()).expect("import");
    assert_eq!((ds.train_rows, ds.duplicates_removed), (3, 2));
    let lines: Vec<i64> = e
        .store
        .dataset_rows(ds.id, "train")
        .expect("stored")
        .iter()
        .filter_map(|r| r.source_line)
        .collect();
    assert_eq!(lines, [1, 2, 5]);
}

fn numbered(dir: &Path, name: &str, n: usize, changed: Option<usize>) -> PathBuf {
    let text: String = (0..n)
        .map(|i| {
            let answer = if Some(i) == changed {
                "changed".to_string()
            } else {
                format!("answer {i}")
            };
            chat_line(&format!("question {i}"), &answer)
        })
        .collect();
    write(dir, name, text)
}

fn seeded(name: &str, seed: u64) -> ImportOptions {
    ImportOptions {
        name: Some(name.into()),
        split: Split::Seeded {
            valid_fraction: 0.1,
            test_fraction: 0.05,
            seed,
        },
        ..ImportOptions::default()
    }
}

fn valid_ids(e: &Engine, id: i64) -> Vec<DatasetRow> {
    rows(e, id, SplitName::Valid)
}

#[test]
fn seeded_split_is_deterministic_and_depends_on_the_seed() {
    let (dir, e) = engine();
    let p = numbered(dir.path(), "n.jsonl", 100, None);
    let a = e.import_dataset(&p, &seeded("a", 1)).expect("a");
    let b = e.import_dataset(&p, &seeded("b", 1)).expect("b");
    let c = e.import_dataset(&p, &seeded("c", 2)).expect("c");
    assert_eq!((a.train_rows, a.valid_rows, a.test_rows), (85, 10, 5));
    assert_eq!(valid_ids(&e, a.id), valid_ids(&e, b.id));
    assert_eq!(
        rows(&e, a.id, SplitName::Test),
        rows(&e, b.id, SplitName::Test)
    );
    assert_eq!(a.content_hash, b.content_hash);
    assert_ne!(valid_ids(&e, a.id), valid_ids(&e, c.id));
    assert_ne!(a.content_hash, c.content_hash);
    // Every row lands in exactly one split; each split keeps file order.
    let mut all: Vec<DatasetRow> = SplitName::ALL
        .iter()
        .flat_map(|&s| rows(&e, a.id, s))
        .collect();
    let train = rows(&e, a.id, SplitName::Train);
    let pos = |r: &DatasetRow| match &r.sample {
        Sample::Chat(m) => m[0].content["question ".len()..]
            .parse::<usize>()
            .expect("n"),
        Sample::Text(_) => unreachable!(),
    };
    assert!(train.windows(2).all(|w| pos(&w[0]) < pos(&w[1])));
    all.sort_by_key(pos);
    all.dedup();
    assert_eq!(all.len(), 100);
    assert_eq!(
        a.split,
        Split::Seeded {
            valid_fraction: 0.1,
            test_fraction: 0.05,
            seed: 1
        }
    );
    // Bad fractions are refused before anything is read.
    let o = ImportOptions {
        split: Split::Seeded {
            valid_fraction: 0.6,
            test_fraction: 0.5,
            seed: 1,
        },
        ..ImportOptions::default()
    };
    assert_eq!(
        e.inspect_dataset(&p, &o).expect_err("fractions").code(),
        "invalid_input"
    );
}

#[test]
fn splitmix64_matches_the_reference_sequence() {
    // Reference outputs of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
    let mut r = SplitMix64(0);
    assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    assert_eq!(shuffled(5, 9), shuffled(5, 9));
    let mut s = shuffled(50, 3);
    s.sort_unstable();
    assert_eq!(s, (0..50).collect::<Vec<_>>());
}

#[test]
fn content_hash_is_stable_and_sees_one_changed_row() {
    let (dir, e) = engine();
    let p = numbered(dir.path(), "h.jsonl", 20, None);
    let a = e.import_dataset(&p, &seeded("one", 5)).expect("one");
    e.remove_dataset(a.id).expect("rm");
    let again = e.import_dataset(&p, &seeded("one", 5)).expect("again");
    assert_eq!(a.content_hash, again.content_hash);
    let q = numbered(dir.path(), "h2.jsonl", 20, Some(13));
    let changed = e.import_dataset(&q, &seeded("two", 5)).expect("changed");
    assert_ne!(a.content_hash, changed.content_hash);
    // The hash is SHA-256 over the rows as stored, which the test recomputes.
    let stored: Vec<StoredRow> = ["train", "valid", "test"]
        .iter()
        .flat_map(|s| e.store.dataset_rows(again.id, s).expect("rows"))
        .collect();
    let h = content_hash(
        stored
            .iter()
            .map(|r| (r.split.as_str(), r.data.as_str(), r.label.as_deref())),
    );
    assert_eq!(h, again.content_hash);
}

#[test]
fn names_default_to_the_stem_and_a_clash_names_the_existing_dataset() {
    let (dir, e) = engine();
    let p = numbered(dir.path(), "my-data.jsonl", 3, None);
    let ds = e.import_dataset(&p, &all_train()).expect("import");
    assert_eq!(ds.name, "my-data");
    let err = e.import_dataset(&p, &all_train()).expect_err("clash");
    assert_eq!(err.code(), "already_exists");
    assert!(
        err.to_string().contains("'my-data'") && err.to_string().contains(&format!("id {}", ds.id)),
        "{err}"
    );
    assert_eq!(e.list_datasets().expect("list").len(), 1);
    assert_eq!(e.find_dataset("my-data").expect("by name"), ds);
    assert_eq!(e.find_dataset(&ds.id.to_string()).expect("by id"), ds);
    assert_eq!(
        e.find_dataset("nope").expect_err("missing").code(),
        "not_found"
    );
    e.remove_dataset(ds.id).expect("rm");
    assert_eq!(
        e.store.count_dataset_rows().expect("count"),
        0,
        "rows cascade"
    );
    assert_eq!(
        e.remove_dataset(ds.id).expect_err("gone").code(),
        "not_found"
    );
    assert_eq!(
        e.dataset_rows(ds.id, SplitName::Train)
            .expect_err("gone")
            .code(),
        "not_found"
    );
}

#[test]
fn user_split_files_become_their_own_splits() {
    let (dir, e) = engine();
    let train = write(
        dir.path(),
        "train.jsonl",
        [chat_line("a", "1"), chat_line("b", "2")].concat(),
    );
    let valid = write(
        dir.path(),
        "valid.jsonl",
        [chat_line("v", "1"), chat_line("a", "1")].concat(),
    );
    let test = write(dir.path(), "test.jsonl", chat_line("t", "1"));
    let o = ImportOptions {
        split: Split::Files {
            valid_path: Some(valid.to_string_lossy().into_owned()),
            test_path: Some(test.to_string_lossy().into_owned()),
        },
        ..ImportOptions::default()
    };
    let ds = e.import_dataset(&train, &o).expect("import");
    // The valid copy of a training row is a duplicate (it would leak).
    assert_eq!(
        (
            ds.train_rows,
            ds.valid_rows,
            ds.test_rows,
            ds.duplicates_removed
        ),
        (2, 1, 1, 1)
    );
    assert_eq!(
        rows(&e, ds.id, SplitName::Valid)[0].sample,
        Sample::Chat(vec![m("user", "v"), m("assistant", "1")])
    );
    let txt = write(dir.path(), "t.txt", "plain\n");
    let o = ImportOptions {
        name: Some("mixed".into()),
        split: Split::Files {
            valid_path: Some(txt.to_string_lossy().into_owned()),
            test_path: None,
        },
        ..ImportOptions::default()
    };
    let err = e.import_dataset(&train, &o).expect_err("kinds differ");
    assert!(err.to_string().contains("t.txt"), "{err}");
}

#[test]
fn format_detection_and_override() {
    let (dir, e) = engine();
    let p = write(dir.path(), "noext", chat_line("q", "a"));
    assert_eq!(
        e.inspect_dataset(&p, &all_train()).expect("sniffed").format,
        DatasetFormat::Chat
    );
    let arr = write(
        dir.path(),
        "arr.json",
        "[\n  {\"instruction\": \"x\", \"output\": \"y\"}\n]\n",
    );
    let err = e.inspect_dataset(&arr, &all_train()).expect_err("array");
    assert!(
        err.to_string().contains("JSON Lines") && err.to_string().contains("arr.json"),
        "{err}"
    );
    let odd = write(dir.path(), "odd.jsonl", "{\"prompt\":\"x\"}\n");
    let err = e
        .inspect_dataset(&odd, &all_train())
        .expect_err("unknown keys");
    assert!(err.to_string().contains("prompt"), "{err}");
    // Override: a .log file read as text.
    let log = write(dir.path(), "x.log", "line one\nline two\n");
    assert!(e.inspect_dataset(&log, &all_train()).is_err());
    let o = ImportOptions {
        format: Some(DatasetFormat::Text),
        ..all_train()
    };
    let pv = e.inspect_dataset(&log, &o).expect("override");
    assert_eq!(
        (pv.format, pv.format_detected, pv.good_rows),
        (DatasetFormat::Text, false, 2)
    );
    let missing = dir.path().join("missing.jsonl");
    let err = e
        .inspect_dataset(&missing, &all_train())
        .expect_err("missing");
    assert!(err.to_string().contains("missing.jsonl"), "{err}");
}

#[test]
fn pubmedqa_files_import() {
    let dir = pubmedqa();
    let (_tmp, e) = engine();
    let chat = e
        .import_dataset(&dir.join("train.jsonl"), &all_train())
        .expect("train.jsonl");
    assert_eq!(
        (chat.format, chat.train_rows, chat.bad_rows_skipped),
        (DatasetFormat::Chat, 800, 0)
    );
    let chat_rows = rows(&e, chat.id, SplitName::Train);
    assert!(chat_rows
        .iter()
        .all(|r| matches!(r.label.as_deref(), Some("yes" | "no" | "maybe"))));
    assert!(chat_rows.iter().all(|r| r.source_id.is_some()));

    let alpaca = e
        .import_dataset(&dir.join("alpaca.jsonl"), &all_train())
        .expect("alpaca");
    assert_eq!(
        (alpaca.format, alpaca.train_rows),
        (DatasetFormat::Alpaca, 800)
    );
    // By construction the Alpaca file gives the same training pairs as the chat file.
    let pairs = |rs: &[DatasetRow]| rs.iter().map(|r| r.sample.clone()).collect::<Vec<_>>();
    assert_eq!(
        pairs(&rows(&e, alpaca.id, SplitName::Train)),
        pairs(&chat_rows)
    );

    let corpus = e
        .import_dataset(&dir.join("corpus.txt"), &all_train())
        .expect("corpus");
    assert_eq!(
        (corpus.format, corpus.train_rows),
        (DatasetFormat::Text, 800)
    );

    let o = ImportOptions {
        name: Some("pubmedqa".into()),
        split: Split::Files {
            valid_path: Some(dir.join("valid.jsonl").to_string_lossy().into_owned()),
            test_path: Some(dir.join("test.jsonl").to_string_lossy().into_owned()),
        },
        ..ImportOptions::default()
    };
    let ds = e
        .import_dataset(&dir.join("train.jsonl"), &o)
        .expect("with splits");
    assert_eq!(
        (ds.train_rows, ds.valid_rows, ds.test_rows),
        (800, 100, 100)
    );
    assert_eq!(e.store.integrity_check().expect("check"), "ok");
}

#[test]
fn token_stats_on_the_real_model() {
    let dir = pubmedqa();
    let model = attune_models::default_model_path();
    assert!(
        model.is_file(),
        "the default model is missing at {}: run scripts/fetch-model.sh",
        model.display()
    );
    let (_tmp, e) = engine();
    let model_id = e.add_local_model(&model).expect("add model").model.id;
    let o = ImportOptions {
        split: Split::Files {
            valid_path: Some(dir.join("valid.jsonl").to_string_lossy().into_owned()),
            test_path: None,
        },
        ..ImportOptions::default()
    };
    let ds = e
        .import_dataset(&dir.join("train.jsonl"), &o)
        .expect("import");
    let stats = e
        .dataset_stats(ds.id, model_id, 1024, LossOn::Assistant)
        .expect("stats");
    eprintln!("{stats:#?}");
    let train = &stats.splits[0];
    assert_eq!((train.split, train.rows), (SplitName::Train, 800));
    assert!(train.tokens_max <= 1024, "{train:?}");
    assert_eq!(train.truncated_rows, 0);
    assert!(
        train.tokens_min >= 50 && train.tokens_min <= train.tokens_max,
        "{train:?}"
    );
    assert!(
        train.tokens_mean > 150.0 && train.tokens_mean < 900.0,
        "{train:?}"
    );
    assert_eq!(
        train.tokens_total as f64,
        (train.tokens_mean * 800.0).round()
    );
    assert!(
        train.target_tokens > 800 * 5 && train.target_tokens < train.tokens_total / 2,
        "{train:?}"
    );
    assert_eq!(stats.splits[1].rows, 100);
    assert_eq!(stats.splits[2].rows, 0);

    // A short max length truncates, and loss on everything counts more targets.
    let short = e
        .dataset_stats(ds.id, model_id, 128, LossOn::All)
        .expect("short");
    assert_eq!(short.splits[0].truncated_rows, 800);
    assert_eq!(short.splits[0].target_tokens, 800 * 127);

    let corpus = e
        .import_dataset(&dir.join("corpus.txt"), &all_train())
        .expect("corpus");
    let t = e
        .dataset_stats(corpus.id, model_id, 1024, LossOn::Assistant)
        .expect("text stats");
    assert_eq!(t.splits[0].rows, 800);
    assert!(t.splits[0].tokens_mean > 100.0, "{t:?}");
    assert_eq!(
        e.dataset_stats(ds.id, model_id, 1, LossOn::All)
            .expect_err("max len")
            .code(),
        "invalid_input"
    );
    assert!(matches!(
        e.dataset_stats(ds.id, model_id + 100, 1024, LossOn::All),
        Err(EngineError::ModelNotFound(_))
    ));
}

fn utf16(text: &str, little: bool, bom: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if bom {
        out.extend_from_slice(if little { b"\xFF\xFE" } else { b"\xFE\xFF" });
    }
    for u in text.encode_utf16() {
        out.extend_from_slice(&if little {
            u.to_le_bytes()
        } else {
            u.to_be_bytes()
        });
    }
    out
}

#[test]
fn utf16_text_is_decoded_with_or_without_a_bom_and_nuls_are_refused() {
    let (dir, e) = engine();
    let text = "Première ligne.\nSecond line, ünïcödé.\nThird: 日本語.\n";
    let jsonl = format!(
        "{}{}",
        chat_line("Quelle est la réponse ?", "Oui."),
        chat_line("Second?", "Non.")
    );
    for (i, (little, bom)) in [(true, false), (false, false), (true, true), (false, true)]
        .into_iter()
        .enumerate()
    {
        let p = write(
            dir.path(),
            &format!("notes{i}.txt"),
            utf16(text, little, bom),
        );
        let ds = e
            .import_dataset(
                &p,
                &ImportOptions {
                    name: Some(format!("notes{i}")),
                    ..all_train()
                },
            )
            .unwrap_or_else(|err| panic!("utf-16 little={little} bom={bom}: {err}"));
        let r = rows(&e, ds.id, SplitName::Train);
        let got: Vec<Sample> = r.into_iter().map(|r| r.sample).collect();
        assert_eq!(
            got,
            [
                Sample::Text("Première ligne.".into()),
                Sample::Text("Second line, ünïcödé.".into()),
                Sample::Text("Third: 日本語.".into())
            ],
            "little={little} bom={bom}"
        );
        let p = write(
            dir.path(),
            &format!("chat{i}.jsonl"),
            utf16(&jsonl, little, bom),
        );
        let pv = e.inspect_dataset(&p, &all_train()).expect("utf-16 jsonl");
        assert_eq!((pv.format, pv.good_rows), (DatasetFormat::Chat, 2));
    }
    // Binary data, or UTF-32, is refused as a whole: never rows full of NULs.
    let mut utf32 = Vec::new();
    for c in "abc\ndef\n".chars() {
        utf32.extend_from_slice(&(c as u32).to_le_bytes());
    }
    for (name, bytes) in [
        ("u32.txt", utf32),
        ("bin.txt", b"GGUF\x03\x00\x00\x00\x00\x00junk\n".to_vec()),
    ] {
        let p = write(dir.path(), name, bytes);
        let err = e.inspect_dataset(&p, &all_train()).expect_err(name);
        assert!(
            err.to_string().contains("NUL byte") && err.to_string().contains(name),
            "{err}"
        );
    }
    // Odd-length UTF-16 is a clear error too.
    let mut odd = utf16("hello\n", true, true);
    odd.push(b'x');
    let p = write(dir.path(), "odd.txt", odd);
    let err = e.inspect_dataset(&p, &all_train()).expect_err("odd");
    assert!(err.to_string().contains("odd number of bytes"), "{err}");
}

#[cfg(unix)]
#[test]
fn a_fifo_or_a_folder_as_a_dataset_is_refused_at_once() {
    use std::os::unix::ffi::OsStrExt;
    let (dir, e) = engine();
    let fifo = dir.path().join("pipe.jsonl");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let started = std::time::Instant::now();
    let err = e.inspect_dataset(&fifo, &all_train()).expect_err("fifo");
    assert!(err.to_string().contains("named pipe (FIFO)"), "{err}");
    let err = e.import_dataset(&fifo, &all_train()).expect_err("fifo");
    assert!(err.to_string().contains("named pipe (FIFO)"), "{err}");
    let err = e.csv_headers(&fifo).expect_err("fifo");
    assert!(err.to_string().contains("named pipe (FIFO)"), "{err}");
    match crate::classify_path(&fifo) {
        attune_protocol::DroppedFile::Unsupported { reason, .. } => {
            assert!(reason.contains("named pipe (FIFO)"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let err = e
        .inspect_dataset(dir.path(), &all_train())
        .expect_err("folder");
    assert!(
        err.to_string().contains("a folder, not a regular file"),
        "{err}"
    );
}
