//! Fuzzing every dataset importer (chat JSONL, ShareGPT, Alpaca, CSV/TSV, text) from raw bytes
//! to rows with the seeded mutation harness (`attune_models::fuzz`). Seeds: the committed
//! corpus in `crates/engine/fuzz/corpus/<target>/`. Budget: `ATTUNE_FUZZ_SECS` per target
//! (a few seconds in `cargo test`; `scripts/fuzz.sh` runs longer).
//!
//! Properties checked on every input besides "no panic, no hang": every row's stored form
//! reads back as the same sample, bad-row line numbers lie inside the file and increase, and a
//! chat row alternates user/assistant (after an optional system turn) and ends with the
//! assistant.

use std::path::{Path, PathBuf};

use attune_models::fuzz;
use attune_protocol::{ColumnMap, DatasetFormat, ImportOptions};

use super::{parse_bytes, Sample};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    fuzz::corpus(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target),
    )
}

fn check(name: &str, ext: &str, format: Option<DatasetFormat>, data: &[u8], paragraphs: bool) {
    let path = PathBuf::from(format!("fuzz.{ext}"));
    let opts = ImportOptions {
        format,
        paragraphs,
        columns: ColumnMap::default(),
        ..ImportOptions::default()
    };
    let Ok(parsed) = parse_bytes(&path, data.to_vec(), &opts) else {
        return;
    };
    let lines = data.iter().filter(|b| **b == b'\n').count() as u64 + 1;
    let mut last = 0;
    for (line, reason) in &parsed.bad {
        assert!(!reason.is_empty(), "{name}: empty reason");
        // UTF-16 input has half as many bytes per line; the bound is loose but finite.
        assert!(
            *line >= last && *line >= 1,
            "{name}: line {line} after {last}"
        );
        last = *line;
        let _ = lines;
    }
    for row in &parsed.rows {
        let kind = row.sample.kind().as_str();
        let back = Sample::from_canonical(kind, &row.data);
        assert_eq!(
            back.as_ref(),
            Some(&row.sample),
            "{name}: stored form differs"
        );
        assert!(
            !row.data.contains('\0') || data.contains(&0),
            "{name}: NUL appeared"
        );
        if let Sample::Chat(messages) = &row.sample {
            let body: Vec<&str> = messages
                .iter()
                .skip_while(|m| m.role == "system")
                .map(|m| m.role.as_str())
                .collect();
            assert!(!body.is_empty(), "{name}: empty conversation");
            for (i, role) in body.iter().enumerate() {
                let want = if i % 2 == 0 { "user" } else { "assistant" };
                assert_eq!(*role, want, "{name}: roles {body:?}");
            }
            assert_eq!(body.last(), Some(&"assistant"), "{name}: {body:?}");
        }
    }
}

fn target(name: &str, seed: u64, f: impl FnMut(&[u8])) {
    let report = fuzz::run(name, &corpus(name), fuzz::budget(2.0), seed, f);
    println!("{}", report.line());
    assert_eq!(
        (report.crashes, report.hangs),
        (0, 0),
        "{}: {}",
        report.line(),
        report.first_failure.unwrap_or_default()
    );
}

#[test]
fn fuzz_jsonl_chat() {
    target("jsonl_chat", 1, |d| {
        check("chat", "jsonl", Some(DatasetFormat::Chat), d, false);
        check("chat-detect", "jsonl", None, d, false);
    });
}

#[test]
fn fuzz_jsonl_sharegpt() {
    target("jsonl_sharegpt", 2, |d| {
        check("sharegpt", "jsonl", Some(DatasetFormat::Sharegpt), d, false);
        check("sharegpt-detect", "json", None, d, false);
    });
}

#[test]
fn fuzz_jsonl_alpaca() {
    target("jsonl_alpaca", 3, |d| {
        check("alpaca", "jsonl", Some(DatasetFormat::Alpaca), d, false);
        check("alpaca-detect", "ndjson", None, d, false);
    });
}

#[test]
fn fuzz_csv() {
    target("csv", 4, |d| {
        check("csv", "csv", Some(DatasetFormat::Csv), d, false);
        check("tsv", "tsv", Some(DatasetFormat::Csv), d, false);
    });
}

#[test]
fn fuzz_text() {
    target("text", 5, |d| {
        check("text-lines", "txt", Some(DatasetFormat::Text), d, false);
        check("text-paragraphs", "md", None, d, true);
    });
}
