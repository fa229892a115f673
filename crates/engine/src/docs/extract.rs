//! Text from documents, as a list of headings and paragraphs with their pages.
//!
//! - PDF: `pdf-extract` (over `lopdf`) page by page; a PDF whose pages give no text has no
//!   text layer (a scan) and is refused with that reason. Paragraphs are the page's
//!   blank-line-separated blocks, their hard-wrapped lines joined by spaces.
//! - DOCX: `word/document.xml` from the zip (`zip`), read with `quick-xml`: each `w:p` is a
//!   paragraph, a `Heading1`..`Heading9` or `Title` style (or an outline level) a heading.
//! - Markdown: `pulldown-cmark` events: headings, paragraphs, list items, code blocks, table rows.
//! - HTML: `scraper` (html5ever): `h1`..`h6` are headings, block elements end a
//!   paragraph, `script`/`style`/`head` are skipped.
//! - Plain text: blank-line-separated paragraphs.
//!
//! Files are opened through `attune_models::fsio` (regular files only) and read up to
//! [`MAX_DOC_BYTES`]; a DOCX's XML is read up to [`MAX_XML_BYTES`] whatever the zip claims.
//! Third-party parsers run under `catch_unwind`: a malformed file is an error naming it,
//! never a crash.

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use attune_protocol::DocFormat;

use crate::error::EngineError;

/// Largest document read, in bytes.
pub const MAX_DOC_BYTES: u64 = 64 * 1024 * 1024;
/// Largest `word/document.xml` read from a DOCX, in bytes (uncompressed).
pub const MAX_XML_BYTES: u64 = 128 * 1024 * 1024;

/// A piece of a document's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub kind: BlockKind,
    /// Trimmed, never empty.
    pub text: String,
    /// 1-based page (PDF only).
    pub page: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// A heading of level 1 (top) to 6 (or 9 in DOCX).
    Heading(u8),
    Paragraph,
}

/// A document's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub format: DocFormat,
    pub blocks: Vec<Block>,
    /// PDF only.
    pub pages: Option<u32>,
}

impl Extracted {
    pub fn chars(&self) -> usize {
        self.blocks.iter().map(|b| b.text.chars().count()).sum()
    }
}

/// The format a file name says, if Attune reads it.
pub fn format_of(path: &Path) -> Option<DocFormat> {
    let ext = path.extension()?.to_string_lossy().to_ascii_lowercase();
    Some(match ext.as_str() {
        "pdf" => DocFormat::Pdf,
        "docx" => DocFormat::Docx,
        "md" | "markdown" => DocFormat::Markdown,
        "html" | "htm" | "xhtml" => DocFormat::Html,
        "txt" | "text" => DocFormat::Text,
        _ => return None,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidDocument {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads `path` (a regular file of at most [`MAX_DOC_BYTES`]).
pub fn read_document(path: &Path) -> Result<Vec<u8>, EngineError> {
    let file = attune_models::fsio::open_regular(path).map_err(|e| invalid(path, e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_DOC_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(path, e.to_string()))?;
    if bytes.len() as u64 > MAX_DOC_BYTES {
        return Err(invalid(
            path,
            format!(
                "larger than {} MiB, the most a document may be",
                MAX_DOC_BYTES / 1024 / 1024
            ),
        ));
    }
    Ok(bytes)
}

/// The text of `bytes`, a `format` document read from `path` (named in errors).
pub fn extract(path: &Path, format: DocFormat, bytes: &[u8]) -> Result<Extracted, EngineError> {
    // The parsers are third-party code reading untrusted bytes: a panic in one is this
    // file's error, not the app's crash.
    let result = catch_unwind(AssertUnwindSafe(|| match format {
        DocFormat::Pdf => pdf(bytes),
        DocFormat::Docx => docx(bytes),
        DocFormat::Markdown => utf8(bytes).map(|t| markdown(&t)),
        DocFormat::Html => utf8(bytes).map(|t| html(&t)),
        DocFormat::Text => utf8(bytes).map(|t| plain(&t)),
    }));
    let (blocks, pages) = match result {
        Ok(Ok(parts)) => parts,
        Ok(Err(reason)) => return Err(invalid(path, reason)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown error".to_string());
            return Err(invalid(
                path,
                format!("malformed {} (the parser failed: {what})", format.as_str()),
            ));
        }
    };
    if blocks.iter().all(|b| b.kind != BlockKind::Paragraph) {
        let reason = match format {
            DocFormat::Pdf => format!(
                "no text layer (scanned?): its {} page(s) hold no extractable text; run OCR \
                 on it first",
                pages.unwrap_or(0)
            ),
            other => format!("no text found in this {} file", other.as_str()),
        };
        return Err(invalid(path, reason));
    }
    Ok(Extracted {
        format,
        blocks,
        pages,
    })
}

type Parts = (Vec<Block>, Option<u32>);

fn utf8(bytes: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text).to_string())
}

/// Whitespace runs (newlines included) as one space, trimmed.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn push(blocks: &mut Vec<Block>, kind: BlockKind, text: &str, page: Option<u32>) {
    let text = match kind {
        BlockKind::Heading(_) => squash(text),
        BlockKind::Paragraph => text.trim().to_string(),
    };
    if !text.is_empty() {
        blocks.push(Block { kind, text, page });
    }
}

/// Blank-line-separated paragraphs, each paragraph's lines joined by spaces.
fn paragraphs(text: &str, page: Option<u32>, blocks: &mut Vec<Block>) {
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            push(blocks, BlockKind::Paragraph, &squash(&cur), page);
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push(' ');
        }
    }
    push(blocks, BlockKind::Paragraph, &squash(&cur), page);
}

fn plain(text: &str) -> Parts {
    let mut blocks = Vec::new();
    paragraphs(text, None, &mut blocks);
    (blocks, None)
}

// --- PDF -------------------------------------------------------------------------------

fn pdf(bytes: &[u8]) -> Result<Parts, String> {
    let mut doc =
        pdf_extract::Document::load_mem(bytes).map_err(|e| format!("malformed PDF: {e}"))?;
    if doc.is_encrypted() && doc.decrypt("").is_err() {
        return Err("the PDF is encrypted with a password; save an unprotected copy".to_string());
    }
    let pages: Vec<u32> = doc.get_pages().keys().copied().collect();
    if pages.is_empty() {
        return Err("malformed PDF: it has no pages".to_string());
    }
    let mut blocks = Vec::new();
    for &n in &pages {
        let mut text = String::new();
        {
            let mut out = pdf_extract::PlainTextOutput::new(&mut text);
            pdf_extract::output_doc_page(&doc, &mut out, n)
                .map_err(|e| format!("malformed PDF: page {n}: {e}"))?;
        }
        paragraphs(&text, Some(n), &mut blocks);
    }
    Ok((blocks, Some(pages.len() as u32)))
}

// --- DOCX ------------------------------------------------------------------------------

fn docx(bytes: &[u8]) -> Result<Parts, String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("not a DOCX file (not a readable zip archive: {e})"))?;
    let mut entry = archive
        .by_name("word/document.xml")
        .map_err(|_| "not a DOCX file (no word/document.xml inside)".to_string())?;
    let mut xml = Vec::new();
    (&mut entry)
        .take(MAX_XML_BYTES + 1)
        .read_to_end(&mut xml)
        .map_err(|e| format!("malformed DOCX: word/document.xml: {e}"))?;
    if xml.len() as u64 > MAX_XML_BYTES {
        return Err(format!(
            "malformed DOCX: word/document.xml is larger than {} MiB",
            MAX_XML_BYTES / 1024 / 1024
        ));
    }
    docx_xml(&xml).map(|b| (b, None))
}

/// The heading level a paragraph style id names ("Heading2" -> 2, "Title" -> 1).
fn docx_heading(style: &str) -> Option<u8> {
    let s = style.to_ascii_lowercase();
    if s == "title" {
        return Some(1);
    }
    let n = s.strip_prefix("heading")?;
    n.parse::<u8>().ok().filter(|l| (1..=9).contains(l))
}

fn docx_xml(xml: &[u8]) -> Result<Vec<Block>, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut blocks = Vec::new();
    let mut in_para = false;
    let mut in_text = false;
    let mut text = String::new();
    let mut level: Option<u8> = None;
    loop {
        let event = reader.read_event_into(&mut buf).map_err(|e| {
            format!(
                "malformed DOCX: word/document.xml at byte {}: {e}",
                reader.error_position()
            )
        })?;
        match &event {
            Event::Start(e) | Event::Empty(e) => {
                let name = e.name();
                match name.as_ref() {
                    "w:p" => {
                        in_para = true;
                        text.clear();
                        level = None;
                    }
                    "w:tab" if in_para => text.push('\t'),
                    "w:br" | "w:cr" if in_para => text.push('\n'),
                    "w:pStyle" | "w:outlineLvl" => {
                        for a in e.attributes().flatten() {
                            if a.key.as_ref() == "w:val" {
                                let v = a.value.to_string();
                                let l = if name.as_ref() == "w:pStyle" {
                                    docx_heading(&v)
                                } else {
                                    v.parse::<u8>().ok().filter(|l| *l < 9).map(|l| l + 1)
                                };
                                level = level.or(l);
                            }
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        // A second match: `Start` of `w:t` (an empty `<w:t/>` holds no text).
        match event {
            Event::Start(e) if e.name().as_ref() == "w:t" => in_text = true,
            Event::Text(t) if in_text => text.push_str(&t.xml10_content()),
            Event::GeneralRef(r) if in_text => match &*r {
                "amp" => text.push('&'),
                "lt" => text.push('<'),
                "gt" => text.push('>'),
                "quot" => text.push('"'),
                "apos" => text.push('\''),
                other => match r.resolve_char_ref() {
                    Ok(Some(c)) => text.push(c),
                    _ => {
                        text.push('&');
                        text.push_str(other);
                        text.push(';');
                    }
                },
            },
            Event::End(e) => match e.name().as_ref() {
                "w:t" => in_text = false,
                "w:p" => {
                    let kind = level.map_or(BlockKind::Paragraph, BlockKind::Heading);
                    push(&mut blocks, kind, &text, None);
                    in_para = false;
                    text.clear();
                }
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    Ok(blocks)
}

// --- Markdown --------------------------------------------------------------------------

fn markdown(text: &str) -> Parts {
    use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd};
    let mut blocks = Vec::new();
    let mut cur = String::new();
    let mut heading: Option<u8> = None;
    let flush = |blocks: &mut Vec<Block>, cur: &mut String, kind: BlockKind| {
        push(blocks, kind, cur, None);
        cur.clear();
    };
    let opts = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH;
    for event in Parser::new_ext(text, opts) {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                flush(&mut blocks, &mut cur, BlockKind::Paragraph);
                heading = Some(match level {
                    HeadingLevel::H1 => 1,
                    HeadingLevel::H2 => 2,
                    HeadingLevel::H3 => 3,
                    HeadingLevel::H4 => 4,
                    HeadingLevel::H5 => 5,
                    HeadingLevel::H6 => 6,
                });
            }
            Event::End(TagEnd::Heading(_)) => {
                let l = heading.take().unwrap_or(1);
                flush(&mut blocks, &mut cur, BlockKind::Heading(l));
            }
            Event::Start(Tag::Paragraph | Tag::Item | Tag::CodeBlock(_) | Tag::TableRow)
            | Event::End(
                TagEnd::Paragraph
                | TagEnd::Item
                | TagEnd::CodeBlock
                | TagEnd::TableRow
                | TagEnd::TableHead,
            ) if heading.is_none() => flush(&mut blocks, &mut cur, BlockKind::Paragraph),
            Event::End(TagEnd::TableCell) => cur.push_str(" | "),
            Event::Text(t) | Event::Code(t) | Event::InlineMath(t) | Event::DisplayMath(t) => {
                cur.push_str(&t)
            }
            Event::SoftBreak => cur.push(' '),
            Event::HardBreak => cur.push('\n'),
            _ => {}
        }
    }
    flush(&mut blocks, &mut cur, BlockKind::Paragraph);
    (blocks, None)
}

// --- HTML ------------------------------------------------------------------------------

fn html(text: &str) -> Parts {
    let doc = scraper::Html::parse_document(text);
    let mut blocks = Vec::new();
    let mut cur = String::new();
    walk_html(doc.tree.root(), &mut blocks, &mut cur);
    push(&mut blocks, BlockKind::Paragraph, &squash(&cur), None);
    (blocks, None)
}

const HTML_SKIP: &[&str] = &[
    "head", "script", "style", "noscript", "template", "svg", "nav", "iframe", "object",
];
const HTML_BLOCK: &[&str] = &[
    "p",
    "div",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "pre",
    "blockquote",
    "section",
    "article",
    "main",
    "header",
    "footer",
    "aside",
    "table",
    "tr",
    "td",
    "th",
    "br",
    "hr",
    "figure",
    "figcaption",
    "body",
    "form",
    "address",
];

fn walk_html(
    node: ego_tree::NodeRef<'_, scraper::Node>,
    blocks: &mut Vec<Block>,
    cur: &mut String,
) {
    for child in node.children() {
        match child.value() {
            scraper::Node::Text(t) => cur.push_str(t),
            scraper::Node::Element(e) => {
                let name = e.name();
                if HTML_SKIP.contains(&name) {
                    continue;
                }
                let heading = name
                    .strip_prefix('h')
                    .and_then(|n| n.parse::<u8>().ok())
                    .filter(|l| (1..=6).contains(l) && name.len() == 2);
                if let Some(level) = heading {
                    push(blocks, BlockKind::Paragraph, &squash(cur), None);
                    cur.clear();
                    let mut h = String::new();
                    walk_html(child, &mut Vec::new(), &mut h);
                    push(blocks, BlockKind::Heading(level), &h, None);
                    continue;
                }
                let block = HTML_BLOCK.contains(&name);
                if block {
                    push(blocks, BlockKind::Paragraph, &squash(cur), None);
                    cur.clear();
                }
                walk_html(child, blocks, cur);
                if block {
                    push(blocks, BlockKind::Paragraph, &squash(cur), None);
                    cur.clear();
                } else if name == "td" || name == "th" {
                    cur.push(' ');
                }
            }
            _ => {}
        }
    }
}
