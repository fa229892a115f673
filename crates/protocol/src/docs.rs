//! Documents to data: a folder of documents (PDF, DOCX, Markdown, HTML, plain text) read
//! into chunks, a teacher's question-answer pairs (or instructions) per chunk held for
//! review, and the datasets made from the accepted rows.

use serde::{Deserialize, Serialize};

use crate::{ChatMessage, ChatTarget};

/// A document's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocFormat {
    Pdf,
    Docx,
    Markdown,
    Html,
    Text,
}

impl DocFormat {
    pub const ALL: [DocFormat; 5] = [
        DocFormat::Pdf,
        DocFormat::Docx,
        DocFormat::Markdown,
        DocFormat::Html,
        DocFormat::Text,
    ];

    /// The stored name: pdf, docx, markdown, html, text.
    pub fn as_str(self) -> &'static str {
        match self {
            DocFormat::Pdf => "pdf",
            DocFormat::Docx => "docx",
            DocFormat::Markdown => "markdown",
            DocFormat::Html => "html",
            DocFormat::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Option<DocFormat> {
        DocFormat::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// What the teacher writes per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TeacherMode {
    /// Question-answer pairs (`Q:` / `A:`).
    #[default]
    Qa,
    /// Instructions and responses (`Instruction:` / `Response:`).
    Instructions,
}

impl TeacherMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TeacherMode::Qa => "qa",
            TeacherMode::Instructions => "instructions",
        }
    }
}

/// A generated row's review state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocRowStatus {
    /// Written by the teacher, not reviewed yet.
    Pending,
    Accepted,
    Rejected,
    /// Accepted with the reviewer's own text.
    Edited,
    /// The teacher's answer could not be read as rows (`error` says why).
    Failed,
}

impl DocRowStatus {
    pub const ALL: [DocRowStatus; 5] = [
        DocRowStatus::Pending,
        DocRowStatus::Accepted,
        DocRowStatus::Rejected,
        DocRowStatus::Edited,
        DocRowStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DocRowStatus::Pending => "pending",
            DocRowStatus::Accepted => "accepted",
            DocRowStatus::Rejected => "rejected",
            DocRowStatus::Edited => "edited",
            DocRowStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<DocRowStatus> {
        DocRowStatus::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// Whether the row goes into the dataset.
    pub fn is_kept(self) -> bool {
        matches!(self, DocRowStatus::Accepted | DocRowStatus::Edited)
    }
}

/// How documents become chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocImportOptions {
    /// The document set's name.
    pub name: String,
    /// Longest chunk, in characters (a paragraph longer than this is cut at sentence ends).
    pub max_chunk_chars: usize,
}

/// A file of the folder that was not read, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedDoc {
    pub path: String,
    pub reason: String,
}

/// One document of a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSummary {
    pub id: i64,
    /// Relative to the set's folder.
    pub path: String,
    pub format: DocFormat,
    pub sha256: String,
    pub bytes: u64,
    /// PDF only.
    pub pages: Option<u32>,
    pub chars: u64,
    pub chunks: u64,
}

/// A document set: the documents of one folder, their chunks and the rows made from them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocsetSummary {
    pub id: i64,
    pub name: String,
    pub source_dir: String,
    pub max_chunk_chars: u64,
    pub created_at: String,
    pub documents: Vec<DocSummary>,
    pub skipped: Vec<SkippedDoc>,
    pub chunks: u64,
    /// Rows by status.
    pub pending: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub edited: u64,
    pub failed: u64,
}

/// Where a chunk comes from: the document and its page range or section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub document: String,
    pub page_start: Option<u32>,
    pub page_end: Option<u32>,
    /// The heading path ("Title > Section"), when the document has headings.
    pub section: Option<String>,
}

impl Provenance {
    /// "report.pdf, pages 2-3" or "guide.md, Setup > Install".
    pub fn describe(&self) -> String {
        let mut s = self.document.clone();
        match (self.page_start, self.page_end) {
            (Some(a), Some(b)) if a != b => s.push_str(&format!(", pages {a}-{b}")),
            (Some(a), _) => s.push_str(&format!(", page {a}")),
            _ => {}
        }
        if let Some(sec) = &self.section {
            s.push_str(", ");
            s.push_str(sec);
        }
        s
    }
}

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocChunk {
    pub id: i64,
    pub document_id: i64,
    /// 0-based position in its document.
    pub index: u32,
    pub provenance: Provenance,
    pub text: String,
}

/// One generated row with the passage it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocRow {
    pub id: i64,
    pub chunk_id: i64,
    pub status: DocRowStatus,
    /// User / assistant turns (empty when failed).
    pub messages: Vec<ChatMessage>,
    /// Why the teacher's answer gave no row (failed rows).
    pub error: Option<String>,
    /// The teacher's text as written.
    pub raw_output: String,
    /// Who wrote it ("model SmolLM2-135M-Instruct (id 1)", "endpoint E: gpt-4o-mini").
    pub teacher: String,
    pub template: String,
    pub template_version: u32,
    pub provenance: Provenance,
    /// The source passage.
    pub passage: String,
    pub created_at: String,
    pub reviewed_at: Option<String>,
}

/// What a teacher pass over a set did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TeachReport {
    pub chunks: u64,
    /// Rows held for review.
    pub rows: u64,
    /// Chunks whose answer gave no row.
    pub failed: u64,
}

/// A review decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum ReviewAction {
    Accept,
    Reject,
    /// Replace the row's turns (kept as `edited`).
    Edit {
        messages: Vec<ChatMessage>,
    },
}

/// How a teacher pass runs: who teaches, with which prompt, how much (the window's form;
/// the engine checks it and turns it into a plan).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeachSpec {
    pub target: ChatTarget,
    pub mode: TeacherMode,
    /// A stored template (id or name); None = the mode's default template.
    pub template: Option<String>,
    /// Rows asked for per chunk (the template's `{{count}}`), 1 to 20.
    pub count: u32,
    /// Most tokens the teacher writes per chunk.
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
    /// Only the first this many chunks without rows (None: all of them).
    pub max_chunks: Option<u64>,
}

/// Progress of a teacher pass, streamed to the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TeachEvent {
    /// `total` chunks will be taught.
    Started { total: u64 },
    /// `done` of `total` chunks taught; their rows are stored.
    Chunk { done: u64, total: u64 },
}
