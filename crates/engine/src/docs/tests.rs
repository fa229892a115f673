//! Documents to data over the committed fixtures (`tests/data/docs`, written by
//! `scripts/make-doc-fixtures.py`), a real SQLite library in a temporary folder, a scripted
//! OpenAI-compatible endpoint on loopback as a teacher whose answers are known, and the real
//! default model as a teacher.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use attune_protocol::{
    ChatTarget, DocFormat, DocImportOptions, DocRowStatus, EndpointDraft, ReviewAction,
    SamplingParams, Split, SplitName, TeacherMode,
};
use serde_json::json;

use super::extract::{self, BlockKind};
use super::*;
use crate::actor::{Actor, ActorOptions};

fn fixtures() -> PathBuf {
    attune_test_support::test_data("docs")
}

fn read(name: &str) -> Result<extract::Extracted, EngineError> {
    let path = fixtures().join(name);
    let format = extract::format_of(&path).expect("a document extension");
    let bytes = extract::read_document(&path)?;
    extract::extract(&path, format, &bytes)
}

fn engine() -> (tempfile::TempDir, Arc<Engine>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut engine = Engine::open(&dir.path().join("data")).expect("open engine");
    engine.keys = crate::endpoints::keys::Keys::memory_only();
    (dir, Arc::new(engine))
}

fn import(engine: &Engine, dir: &Path, name: &str, max: usize) -> DocsetSummary {
    engine
        .import_docs(
            dir,
            &DocImportOptions {
                name: name.to_string(),
                max_chunk_chars: max,
            },
        )
        .expect("import documents")
}

/// Copies the named fixtures into a fresh folder.
fn folder_with(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for n in names {
        std::fs::copy(
            fixtures().join(n),
            dir.path().join(Path::new(n).file_name().expect("name")),
        )
        .expect("copy fixture");
    }
    dir
}

#[test]
fn pdf_text_is_read_page_by_page() {
    let x = read("hand-hygiene.pdf").expect("pdf");
    assert_eq!(x.format, DocFormat::Pdf);
    assert_eq!(x.pages, Some(2));
    let text: Vec<(Option<u32>, &str)> =
        x.blocks.iter().map(|b| (b.page, b.text.as_str())).collect();
    let all = x
        .blocks
        .iter()
        .map(|b| b.text.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        all.contains("Clean hands are the most effective way to stop"),
        "{text:?}"
    );
    assert!(
        all.contains("alcohol-based hand rub for at least 20 seconds"),
        "{text:?}"
    );
    assert!(
        x.blocks
            .iter()
            .any(|b| b.page == Some(2) && b.text.contains("single-use towel")),
        "{text:?}"
    );
    assert!(
        x.blocks
            .iter()
            .all(|b| b.page == Some(1) || !b.text.contains("Hand hygiene")),
        "{text:?}"
    );
}

#[test]
fn a_pdf_without_a_text_layer_is_refused_by_name() {
    let e = read("scanned/scan.pdf").expect_err("a scan has no text");
    let msg = e.to_string();
    assert!(msg.contains("scan.pdf"), "{msg}");
    assert!(msg.contains("no text layer (scanned?)"), "{msg}");
    assert_eq!(e.code(), "invalid_document");
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    for (name, says) in [
        ("bad/truncated.pdf", "malformed PDF"),
        ("bad/not-a-zip.docx", "not a DOCX file"),
    ] {
        let msg = read(name).expect_err(name).to_string();
        assert!(
            msg.contains(name.rsplit('/').next().unwrap_or(name)),
            "{msg}"
        );
        assert!(msg.contains(says), "{name}: {msg}");
    }
    // Bytes no parser expects, under each extension: an error, never a panic.
    let dir = tempfile::tempdir().expect("tempdir");
    for ext in ["pdf", "docx", "md", "html", "txt"] {
        let p = dir.path().join(format!("junk.{ext}"));
        std::fs::write(&p, [0xff, 0xfe, 0x00, 0x25, 0x50, 0x44, 0x46, 0x80]).expect("write");
        let format = extract::format_of(&p).expect("format");
        let bytes = extract::read_document(&p).expect("read");
        let msg = extract::extract(&p, format, &bytes)
            .expect_err(ext)
            .to_string();
        assert!(msg.contains(&format!("junk.{ext}")), "{msg}");
    }
}

#[cfg(unix)]
#[test]
fn only_regular_files_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("pipe.txt");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let msg = extract::read_document(&fifo)
        .expect_err("a FIFO")
        .to_string();
    assert!(
        msg.contains("pipe.txt") && msg.contains("not a regular file"),
        "{msg}"
    );
    // A link in a chosen folder is not followed (it could lead anywhere).
    let folder = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        fixtures().join("sharps.md"),
        folder.path().join("sharps.md"),
    )
    .expect("copy");
    std::os::unix::fs::symlink(
        fixtures().join("cleaning.txt"),
        folder.path().join("link.txt"),
    )
    .expect("symlink");
    let (_d, engine) = engine();
    let set = import(&engine, folder.path(), "links", 400);
    assert_eq!(set.documents.len(), 1);
    assert_eq!(set.skipped.len(), 1);
    assert!(
        set.skipped[0].reason.starts_with("a symbolic link"),
        "{:?}",
        set.skipped
    );
    std::fs::create_dir(dir.path().join("folder.pdf")).expect("mkdir");
    let msg = extract::read_document(&dir.path().join("folder.pdf"))
        .expect_err("a folder")
        .to_string();
    assert!(msg.contains("folder.pdf"), "{msg}");
}

#[test]
fn docx_html_markdown_and_text_keep_their_headings() {
    let heads = |x: &extract::Extracted| -> Vec<(u8, String)> {
        x.blocks
            .iter()
            .filter_map(|b| match b.kind {
                BlockKind::Heading(l) => Some((l, b.text.clone())),
                BlockKind::Paragraph => None,
            })
            .collect()
    };
    let paras = |x: &extract::Extracted| -> Vec<String> {
        x.blocks
            .iter()
            .filter(|b| b.kind == BlockKind::Paragraph)
            .map(|b| b.text.clone())
            .collect()
    };
    let d = read("sterile-field.docx").expect("docx");
    assert_eq!(
        heads(&d),
        vec![
            (1, "Sterile Field Guide".to_string()),
            (1, "Preparing the field".to_string()),
            (1, "Keeping it sterile".to_string())
        ]
    );
    assert_eq!(
        paras(&d),
        vec![
            "Open sterile packs away from the body and keep them above waist level.",
            "Anything below the table edge is considered contaminated.",
            "Never turn your back on a sterile field & never reach across it."
        ]
    );
    let h = read("gloves.html").expect("html");
    assert_eq!(
        heads(&h),
        vec![
            (1, "Glove use".to_string()),
            (2, "When to change gloves".to_string())
        ]
    );
    assert_eq!(
        paras(&h),
        vec![
            "Gloves do not replace hand hygiene. Clean hands before putting gloves on and after \
             taking them off.",
            "Between patients.",
            "When moving from a dirty to a clean body site."
        ]
    );
    let m = read("sharps.md").expect("markdown");
    assert_eq!(
        heads(&m),
        vec![
            (1, "Sharps safety".to_string()),
            (2, "Disposal".to_string()),
            (2, "After an injury".to_string())
        ]
    );
    assert_eq!(paras(&m).len(), 5, "{:?}", paras(&m));
    let t = read("cleaning.txt").expect("text");
    assert!(heads(&t).is_empty());
    assert_eq!(paras(&t).len(), 3);
}

#[test]
fn a_folder_becomes_a_set_with_provenance_and_the_unreadable_files_are_listed() {
    let (_d, engine) = engine();
    let set = import(&engine, &fixtures(), "infection-control", 400);
    let docs: Vec<&str> = set.documents.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        docs,
        [
            "cleaning.txt",
            "gloves.html",
            "hand-hygiene.pdf",
            "sharps.md",
            "sterile-field.docx"
        ]
    );
    let skipped: Vec<(&str, &str)> = set
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped
        .iter()
        .any(|(p, r)| p.ends_with("scan.pdf") && r.starts_with("no text layer (scanned?)")));
    assert!(skipped.iter().any(|(p, _)| p.ends_with("truncated.pdf")));
    assert!(skipped.iter().any(|(p, _)| p.ends_with("not-a-zip.docx")));
    let pdf = set
        .documents
        .iter()
        .find(|d| d.format == DocFormat::Pdf)
        .expect("pdf");
    assert_eq!(pdf.pages, Some(2));
    assert_eq!(pdf.sha256.len(), 64);

    let chunks = engine.docset_chunks(set.id).expect("chunks");
    assert_eq!(chunks.len() as u64, set.chunks);
    assert!(chunks.iter().all(|c| c.text.chars().count() <= 400));
    // PDF chunks carry pages; the others their section.
    assert!(chunks
        .iter()
        .filter(|c| c.provenance.document == "hand-hygiene.pdf")
        .all(|c| c.provenance.page_start.is_some()));
    let sections: Vec<Option<&str>> = chunks
        .iter()
        .filter(|c| c.provenance.document == "sharps.md")
        .map(|c| c.provenance.section.as_deref())
        .collect();
    assert_eq!(
        sections,
        [
            Some("Sharps safety"),
            Some("Sharps safety > Disposal"),
            Some("Sharps safety > After an injury")
        ]
    );
    // Names are unique; a bad size is refused before anything is read.
    let e = engine
        .import_docs(
            &fixtures(),
            &DocImportOptions {
                name: "infection-control".into(),
                max_chunk_chars: 400,
            },
        )
        .expect_err("name taken");
    assert_eq!(e.code(), "already_exists");
    let e = engine
        .import_docs(
            &fixtures(),
            &DocImportOptions {
                name: "tiny".into(),
                max_chunk_chars: 10,
            },
        )
        .expect_err("too small");
    assert!(e.to_string().contains("chunk size 10"), "{e}");
    // A folder with nothing readable writes nothing and says why, file by file.
    let e = engine
        .import_docs(
            &fixtures().join("bad"),
            &DocImportOptions {
                name: "bad".into(),
                max_chunk_chars: 400,
            },
        )
        .expect_err("nothing readable");
    let msg = e.to_string();
    assert!(
        msg.contains("truncated.pdf") && msg.contains("not-a-zip.docx"),
        "{msg}"
    );
    assert_eq!(engine.list_docsets().expect("list").len(), 1);
}

/// An OpenAI-compatible server on loopback answering each chat request with the next of
/// `answers` (streamed in one piece).
fn teacher_server(answers: Vec<String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for answer in answers {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            read_request(&mut s);
            let mut out = String::from(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
            );
            let delta =
                json!({"choices":[{"index":0,"delta":{"content":answer},"finish_reason":null}]});
            let end = json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]});
            out.push_str(&format!("data: {delta}\n\ndata: {end}\n\ndata: [DONE]\n\n"));
            let _ = s.write_all(out.as_bytes());
        }
    });
    url
}

fn read_request(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_lowercase();
    let len = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0usize);
    let mut body = vec![0u8; len];
    let _ = s.read_exact(&mut body);
}

fn plan(engine: &Engine, target: ChatTarget, max_chunks: usize, max_tokens: usize) -> TeachPlan {
    TeachPlan {
        target,
        template: engine
            .teacher_template(TeacherMode::Qa, None)
            .expect("default template"),
        values: BTreeMap::from([("count".to_string(), "2".to_string())]),
        params: SamplingParams {
            max_tokens,
            temperature: 0.0,
            seed: 7,
            ..SamplingParams::default()
        },
        max_chunks: Some(max_chunks),
    }
}

#[test]
fn teacher_rows_are_held_for_review_and_the_accepted_become_a_dataset_with_provenance() {
    let (_d, engine) = engine();
    let folder = folder_with(&["sharps.md"]);
    let set = import(&engine, folder.path(), "sharps", 400);
    assert_eq!(set.chunks, 3);
    let url = teacher_server(vec![
        "Q: What must never be done with a used needle?\nA: It must never be recapped.".into(),
        "Here you go:\n1. **Question:** Where do used sharps go?\n   **Answer:** Into a \
         puncture-proof container.\n2. Q: When is the container closed?\nA: When it is three \
         quarters full.\n3. Q: What colour is it?"
            .into(),
        "I cannot help with that.".into(),
    ]);
    let endpoint_id = engine
        .add_endpoint(&EndpointDraft {
            name: "teacher".into(),
            base_url: url,
            api_key: None,
            connect_timeout_s: Some(5.0),
            idle_timeout_s: Some(10.0),
        })
        .expect("add endpoint")
        .endpoint
        .id;
    let actor = Actor::start(
        Arc::clone(&engine),
        ActorOptions::default(),
        Arc::new(|_| {}),
    );
    let target = ChatTarget::Endpoint {
        endpoint_id,
        model: "teacher-model".into(),
    };
    let p = plan(&engine, target, 10, 64);
    let mut progress = Vec::new();
    let report = teach(&actor, set.id, &p, &CancelToken::new(), &mut |d, t| {
        progress.push((d, t))
    })
    .expect("teach");
    assert_eq!(
        report,
        TeachReport {
            chunks: 3,
            rows: 3,
            failed: 1
        }
    );
    assert_eq!(progress, [(0, 3), (1, 3), (2, 3), (3, 3)]);

    let rows = engine.docset_rows(set.id).expect("rows");
    let summary: Vec<(DocRowStatus, Option<&str>, usize)> = rows
        .iter()
        .map(|r| (r.status, r.provenance.section.as_deref(), r.messages.len()))
        .collect();
    assert_eq!(
        summary,
        [
            (DocRowStatus::Pending, Some("Sharps safety"), 2),
            (DocRowStatus::Pending, Some("Sharps safety > Disposal"), 2),
            (DocRowStatus::Pending, Some("Sharps safety > Disposal"), 2),
            (
                DocRowStatus::Failed,
                Some("Sharps safety > After an injury"),
                0
            ),
        ]
    );
    assert_eq!(rows[1].messages[0].content, "Where do used sharps go?");
    assert_eq!(
        rows[1].messages[1].content,
        "Into a puncture-proof container."
    );
    let failed = &rows[3];
    assert_eq!(failed.raw_output, "I cannot help with that.");
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("no question-answer pair")),
        "{failed:?}"
    );
    assert!(rows.iter().all(|r| r.teacher.contains("teacher-model")
        && r.template == DEFAULT_QA_TEMPLATE
        && r.template_version == 1));
    assert!(rows[0].passage.contains("Never recap a used needle."));

    // Another pass teaches only chunks without rows: none left.
    let again = teach(&actor, set.id, &p, &CancelToken::new(), &mut |_, _| {}).expect("again");
    assert_eq!(again.chunks, 0);

    // Nothing accepted yet: no dataset.
    let e = engine
        .docset_dataset(set.id, "sharps-qa", Split::AllTrain)
        .expect_err("nothing accepted");
    assert!(e.to_string().contains("no accepted rows"), "{e}");

    // Review: accept one, edit one, reject one; a failed row cannot be accepted.
    engine
        .review_doc_row(rows[0].id, &ReviewAction::Accept)
        .expect("accept");
    let edited = vec![
        ChatMessage {
            role: "user".into(),
            content: "Where do used sharps go?".into(),
        },
        ChatMessage {
            role: "assistant".into(),
            content: "Straight into a puncture-proof container at the point of use.".into(),
        },
    ];
    let r = engine
        .review_doc_row(
            rows[1].id,
            &ReviewAction::Edit {
                messages: edited.clone(),
            },
        )
        .expect("edit");
    assert_eq!(r.status, DocRowStatus::Edited);
    assert!(r.reviewed_at.is_some());
    engine
        .review_doc_row(rows[2].id, &ReviewAction::Reject)
        .expect("reject");
    let e = engine
        .review_doc_row(failed.id, &ReviewAction::Accept)
        .expect_err("failed rows are not reviewed");
    assert!(e.to_string().contains("regenerate"), "{e}");
    let e = engine
        .review_doc_row(
            rows[0].id,
            &ReviewAction::Edit {
                messages: edited[..1].to_vec(),
            },
        )
        .expect_err("an edit keeps the shape");
    assert!(
        e.to_string().contains("user turn then an assistant turn"),
        "{e}"
    );

    let ds = engine
        .docset_dataset(set.id, "sharps-qa", Split::AllTrain)
        .expect("dataset");
    assert_eq!(ds.train_rows, 2);
    let stored = engine
        .dataset_rows(ds.id, SplitName::Train)
        .expect("dataset rows");
    let ids: Vec<String> = stored.iter().filter_map(|r| r.source_id.clone()).collect();
    assert_eq!(
        ids,
        [
            format!("doc-row-{}", rows[0].id),
            format!("doc-row-{}", rows[1].id)
        ]
    );
    assert_eq!(stored[1].sample, crate::datasets::Sample::Chat(edited));
    let prov = engine
        .doc_row_provenance(&ids[1])
        .expect("provenance")
        .expect("a doc row");
    assert_eq!(prov.provenance.document, "sharps.md");
    assert_eq!(
        prov.provenance.section.as_deref(),
        Some("Sharps safety > Disposal")
    );
    assert_eq!(prov.template_version, 1);

    // Regenerate the failed chunk: the new answer is read; the failed row stays failed.
    let url2 = teacher_server(vec!["Q: What first?\nA: Let the wound bleed freely.".into()]);
    let endpoint2 = engine
        .add_endpoint(&EndpointDraft {
            name: "teacher2".into(),
            base_url: url2,
            api_key: None,
            connect_timeout_s: Some(5.0),
            idle_timeout_s: Some(10.0),
        })
        .expect("add endpoint")
        .endpoint
        .id;
    let p2 = plan(
        &engine,
        ChatTarget::Endpoint {
            endpoint_id: endpoint2,
            model: "m".into(),
        },
        10,
        64,
    );
    let new = regenerate(&actor, failed.id, &p2, &CancelToken::new()).expect("regenerate");
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].status, DocRowStatus::Pending);
    assert_eq!(new[0].chunk_id, failed.chunk_id);
    assert_eq!(engine.accept_all_doc_rows(set.id).expect("accept all"), 1);
    let s = engine.find_docset("sharps").expect("find");
    assert_eq!(
        (s.pending, s.accepted, s.edited, s.rejected, s.failed),
        (0, 2, 1, 1, 1)
    );

    // The same documents as plain text for continued pre-training: one row per chunk.
    let pt = engine
        .docset_pretrain_dataset(set.id, "sharps-text", Split::AllTrain)
        .expect("pretrain dataset");
    assert_eq!(pt.train_rows, 3);
    let text_rows = engine
        .dataset_rows(pt.id, SplitName::Train)
        .expect("text rows");
    assert_eq!(
        text_rows[0].sample,
        crate::datasets::Sample::Text("Never recap a used needle.".into())
    );
    actor.shutdown(std::time::Duration::from_secs(10));
}

/// A teacher on loopback that answers the first chat request in full with `first`, then
/// streams `partial` for the second and stalls (never finishing) until the client goes.
fn stalling_teacher_server(first: String, partial: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let head =
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
        let delta = |text: &str| json!({"choices":[{"index":0,"delta":{"content":text},"finish_reason":null}]});
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        read_request(&mut s);
        let end = json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]});
        let _ = s.write_all(
            format!(
                "{head}data: {}\n\ndata: {end}\n\ndata: [DONE]\n\n",
                delta(&first)
            )
            .as_bytes(),
        );
        drop(s);
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        read_request(&mut s);
        let _ = s.write_all(format!("{head}data: {}\n\n", delta(&partial)).as_bytes());
        let _ = s.flush();
        // Stall: the answer never finishes; the client cancels.
        std::thread::sleep(std::time::Duration::from_secs(30));
    });
    url
}

#[test]
fn an_answer_cut_off_by_cancel_is_not_stored_and_the_rows_before_it_stay() {
    let (_d, engine) = engine();
    let folder = folder_with(&["sharps.md"]);
    let set = import(&engine, folder.path(), "sharps", 400);
    assert_eq!(set.chunks, 3);
    // The second answer is cut off where it still reads as a whole pair.
    let url = stalling_teacher_server(
        "Q: What must never be done with a used needle?\nA: It must never be recapped.".into(),
        "Q: Where do used sharps go?\nA: Into a".into(),
    );
    let endpoint_id = engine
        .add_endpoint(&EndpointDraft {
            name: "teacher".into(),
            base_url: url,
            api_key: None,
            connect_timeout_s: Some(5.0),
            idle_timeout_s: Some(60.0),
        })
        .expect("add endpoint")
        .endpoint
        .id;
    let actor = Actor::start(
        Arc::clone(&engine),
        ActorOptions::default(),
        Arc::new(|_| {}),
    );
    let target = ChatTarget::Endpoint {
        endpoint_id,
        model: "teacher-model".into(),
    };
    let p = plan(&engine, target, 10, 64);
    let cancel = CancelToken::new();
    let canceller = cancel.clone();
    let mut progress = Vec::new();
    let started = std::time::Instant::now();
    let result = teach(&actor, set.id, &p, &cancel, &mut |d, t| {
        progress.push((d, t));
        if d == 1 {
            // Cancel while the second chunk's answer is streaming.
            let c = canceller.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(700));
                c.cancel();
            });
        }
    });
    assert!(
        matches!(result, Err(EngineError::Cancelled)),
        "a cancelled pass ends cancelled: {result:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "cancel stops the stalled answer at once"
    );
    assert_eq!(progress, [(0, 3), (1, 3)]);
    let rows = engine.docset_rows(set.id).expect("rows");
    assert_eq!(
        rows.iter()
            .map(|r| (r.status, r.messages.len()))
            .collect::<Vec<_>>(),
        [(DocRowStatus::Pending, 2)],
        "only the first chunk's row is kept; the cut-off answer is not a row: {rows:?}"
    );
    assert_eq!(rows[0].messages[1].content, "It must never be recapped.");
    actor.shutdown(std::time::Duration::from_secs(10));
}

#[test]
fn a_teach_spec_is_checked_and_names_the_default_template() {
    let (_d, engine) = engine();
    let spec = TeachSpec {
        target: ChatTarget::Base { model_id: 1 },
        mode: TeacherMode::Instructions,
        template: None,
        count: 4,
        max_tokens: 100,
        temperature: 0.0,
        seed: 1,
        max_chunks: Some(2),
    };
    let p = engine.teach_plan(&spec).expect("plan");
    assert_eq!(p.template.name, DEFAULT_INSTRUCTIONS_TEMPLATE);
    assert_eq!(p.values.get("count").map(String::as_str), Some("4"));
    assert_eq!((p.params.max_tokens, p.max_chunks), (100, Some(2)));
    for (bad, field) in [
        (
            TeachSpec {
                count: 0,
                ..spec.clone()
            },
            "rows per chunk",
        ),
        (
            TeachSpec {
                count: 21,
                ..spec.clone()
            },
            "rows per chunk",
        ),
        (
            TeachSpec {
                max_tokens: 0,
                ..spec.clone()
            },
            "most tokens",
        ),
        (
            TeachSpec {
                temperature: -1.0,
                ..spec.clone()
            },
            "temperature",
        ),
        (
            TeachSpec {
                max_chunks: Some(0),
                ..spec.clone()
            },
            "how many chunks",
        ),
    ] {
        let e = engine.teach_plan(&bad).expect_err("refused");
        assert!(e.to_string().contains(field), "{e}");
    }
    let e = engine
        .teach_plan(&TeachSpec {
            template: Some("no-such-template".into()),
            ..spec
        })
        .expect_err("unknown template");
    assert!(e.to_string().contains("no-such-template"), "{e}");
}

#[test]
fn the_default_model_teaches_a_few_chunks() {
    let model = attune_test_support::default_model();
    let (_d, engine) = engine();
    let model_id = engine.add_local_model(&model).expect("add model").model.id;
    let folder = folder_with(&["hand-hygiene.pdf"]);
    let set = import(&engine, folder.path(), "hygiene", 300);
    assert!(set.chunks >= 2, "{set:?}");
    let actor = Actor::start(
        Arc::clone(&engine),
        ActorOptions::default(),
        Arc::new(|_| {}),
    );
    let p = plan(&engine, ChatTarget::Base { model_id }, 2, 40);
    let report = teach(&actor, set.id, &p, &CancelToken::new(), &mut |_, _| {}).expect("teach");
    assert_eq!(report.chunks, 2);
    let rows = engine.docset_rows(set.id).expect("rows");
    assert_eq!(report.rows + report.failed, rows.len() as u64);
    let chunks: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.chunk_id).collect();
    assert_eq!(chunks.len(), 2);
    for r in &rows {
        assert!(!r.raw_output.is_empty(), "{r:?}");
        assert!(r.teacher.contains("SmolLM2"), "{}", r.teacher);
        assert!(r.provenance.page_start.is_some());
        match r.status {
            DocRowStatus::Pending => {
                assert_eq!(r.messages.len(), 2);
                assert!(r.raw_output.contains(&r.messages[1].content));
            }
            DocRowStatus::Failed => assert!(r.error.as_deref().is_some_and(|e| !e.is_empty())),
            other => panic!("a new row is pending or failed, not {other:?}"),
        }
    }
    actor.shutdown(std::time::Duration::from_secs(10));
}
