//! Datasets: reading chat / ShareGPT / Alpaca JSON Lines, CSV and plain text into
//! normalized rows, validating every row (bad rows are reported with their 1-based line
//! and a reason, never failing the whole file), dropping exact duplicates, dividing the
//! rows into train / valid / test, and the `Engine` methods that import, list, read
//! and measure datasets. Parsing here is pure; `store` writes the rows.
//!
//! Content hash: SHA-256 over every stored row in order (train, then valid, then test,
//! each by position), one line per row: `{split}\t{data}\t{label}\n`, where `data` is
//! the row's canonical JSON (`{"messages":[{"role":..,"content":..},..]}` or
//! `{"text":..}`) and `label` is the label as a JSON string or `null`. It identifies
//! exactly what a run trained and evaluated on.
//!
//! Seeded split: SplitMix64 (Steele, Lea and Flood 2014) seeded with `seed` drives a
//! Fisher-Yates shuffle of the row positions (from the last position down, each swap
//! partner drawn uniformly by rejection sampling). The first `round(valid_fraction * n)`
//! shuffled positions go to valid, the next `round(test_fraction * n)` to test (at least
//! one each when the fraction is positive), the rest to train; each split keeps file
//! order. The generator is implemented here so the split never changes with a crate
//! version.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use attune_protocol::{
    BadRow, ChatMessage, ColumnMap, DatasetFormat, DatasetPreview, DatasetStats, DatasetSummary,
    ImportOptions, LossOn, PreviewRow, RowSample, SampleKind, Split, SplitName, SplitStats,
};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::EngineError;
use crate::store::{DatasetRecord, InsertDataset, StoredRow};
use crate::Engine;

/// A row longer than this many characters is refused: no sensible max length keeps it.
pub const MAX_ROW_CHARS: usize = 200_000;

/// A preview lists at most this many bad rows (the count has them all).
const MAX_BAD_ROWS_SHOWN: usize = 1000;

/// How many bad rows the refusal error quotes.
const BAD_ROWS_IN_ERROR: usize = 5;

/// One dataset row as training reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRow {
    /// The row's `id` in the source, if it had one.
    pub source_id: Option<String>,
    pub sample: Sample,
    pub label: Option<String>,
}

/// A row's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// Optional system turn, then user / assistant alternating, ending with assistant.
    Chat(Vec<ChatMessage>),
    /// A document for continued pre-training.
    Text(String),
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CanonicalChat {
    messages: Vec<ChatMessage>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CanonicalText {
    text: String,
}

impl Sample {
    pub fn kind(&self) -> SampleKind {
        match self {
            Sample::Chat(_) => SampleKind::Chat,
            Sample::Text(_) => SampleKind::Text,
        }
    }

    /// The stored form: `{"messages":[{"role":..,"content":..}]}` or `{"text":..}`.
    fn canonical_json(&self) -> String {
        // Serializing plain strings into JSON cannot fail.
        match self {
            Sample::Chat(messages) => serde_json::to_string(&CanonicalChat {
                messages: messages.clone(),
            }),
            Sample::Text(text) => serde_json::to_string(&CanonicalText { text: text.clone() }),
        }
        .unwrap_or_default()
    }

    fn from_canonical(kind: &str, data: &str) -> Option<Sample> {
        match kind {
            "chat" => serde_json::from_str::<CanonicalChat>(data)
                .ok()
                .map(|c| Sample::Chat(c.messages)),
            "text" => serde_json::from_str::<CanonicalText>(data)
                .ok()
                .map(|c| Sample::Text(c.text)),
            _ => None,
        }
    }

    fn to_protocol(&self) -> RowSample {
        match self {
            Sample::Chat(messages) => RowSample::Chat {
                messages: messages.clone(),
            },
            Sample::Text(text) => RowSample::Text { text: text.clone() },
        }
    }
}

/// A usable row read from a file.
#[derive(Debug, Clone)]
struct ParsedRow {
    line: u64,
    source_id: Option<String>,
    label: Option<String>,
    sample: Sample,
    /// `sample.canonical_json()`, computed once.
    data: String,
}

impl ParsedRow {
    fn new(line: u64, sample: Sample, source_id: Option<String>, label: Option<String>) -> Self {
        let data = sample.canonical_json();
        ParsedRow {
            line,
            source_id,
            label,
            sample,
            data,
        }
    }
}

/// One file, read and validated.
#[derive(Debug)]
struct ParsedFile {
    path: PathBuf,
    format: DatasetFormat,
    format_detected: bool,
    kind: SampleKind,
    /// CSV/TSV header names (empty for other formats).
    headers: Vec<String>,
    rows: Vec<ParsedRow>,
    /// (line, reason), in file order.
    bad: Vec<(u64, String)>,
}

// ---------------------------------------------------------------------------------------
// Reading lines
// ---------------------------------------------------------------------------------------

/// The file's lines with 1-based numbers, without `\n` / `\r\n`; a UTF-8 BOM is dropped.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes.split(|&b| b == b'\n').enumerate().map(|(i, l)| {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        (i as u64 + 1, l)
    })
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Decodes one line; a bad byte sequence makes only this line bad.
fn decode(line: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(line)
        .map_err(|e| format!("invalid UTF-8 (byte {} of the line)", e.valid_up_to() + 1))
}

fn check_length(chars_upper_bound: usize, text: impl FnOnce() -> usize) -> Result<(), String> {
    if chars_upper_bound <= MAX_ROW_CHARS {
        return Ok(());
    }
    let n = text();
    if n > MAX_ROW_CHARS {
        return Err(format!(
            "{n} characters, longer than any sensible max length (limit {MAX_ROW_CHARS})"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// JSON fields
// ---------------------------------------------------------------------------------------

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A required, non-blank string field.
fn req_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(format!("missing field '{key}'")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("empty field '{key}'")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "wrong type: '{key}' must be a string, found {}",
            type_name(other)
        )),
    }
}

/// An optional string field (missing, null or blank: `None`).
fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!(
            "wrong type: '{key}' must be a string, found {}",
            type_name(other)
        )),
    }
}

/// `id` / `label`: kept when a non-empty string (numbers and booleans as written).
fn tag(obj: &Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn chat_role(role: &str) -> Option<&'static str> {
    match role {
        "system" => Some("system"),
        "user" => Some("user"),
        "assistant" => Some("assistant"),
        _ => None,
    }
}

fn sharegpt_role(from: &str) -> Option<&'static str> {
    match from {
        "system" => Some("system"),
        "human" | "user" => Some("user"),
        "gpt" | "assistant" => Some("assistant"),
        _ => None,
    }
}

/// Reads a list of turns (`messages` / `conversations`).
fn turns(
    obj: &Map<String, Value>,
    key: &str,
    role_key: &str,
    content_key: &str,
    map_role: fn(&str) -> Option<&'static str>,
) -> Result<Vec<ChatMessage>, String> {
    let list = match obj.get(key) {
        None | Some(Value::Null) => return Err(format!("missing field '{key}'")),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(format!(
                "wrong type: '{key}' must be an array, found {}",
                type_name(other)
            ))
        }
    };
    if list.is_empty() {
        return Err(format!("empty field '{key}'"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let n = i + 1;
        let Value::Object(m) = m else {
            return Err(format!(
                "message {n} is not an object (found {})",
                type_name(m)
            ));
        };
        let role = req_str(m, role_key).map_err(|e| format!("message {n}: {e}"))?;
        let role = map_role(role).ok_or_else(|| format!("message {n}: unknown role '{role}'"))?;
        let content = match m.get(content_key) {
            None | Some(Value::Null) => {
                return Err(format!("message {n}: missing field '{content_key}'"))
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                return Err(format!("message {n}: empty content"))
            }
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(format!(
                    "message {n}: wrong type: '{content_key}' must be a string, found {}",
                    type_name(other)
                ))
            }
        };
        out.push(ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    check_order(&out)?;
    Ok(out)
}

/// Optional system first, then user / assistant alternating from user, ending with assistant.
fn check_order(messages: &[ChatMessage]) -> Result<(), String> {
    let start = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    if start == messages.len() {
        return Err("roles out of order: no user and assistant turns".to_string());
    }
    for (k, m) in messages.iter().enumerate().skip(start) {
        let expected = if (k - start) % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        if m.role != expected {
            return Err(format!(
                "roles out of order: message {} is '{}', expected '{expected}'",
                k + 1,
                m.role
            ));
        }
    }
    if messages.last().is_some_and(|m| m.role != "assistant") {
        return Err(format!(
            "roles out of order: the last message ({}) is 'user', expected 'assistant'",
            messages.len()
        ));
    }
    Ok(())
}

/// One JSON Lines record in `format` (chat, sharegpt or alpaca).
fn json_record(text: &str, format: DatasetFormat) -> Result<ParsedRowParts, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err(format!("not a JSON object (found {})", type_name(&value)));
    };
    let messages = match format {
        DatasetFormat::Chat => turns(&obj, "messages", "role", "content", chat_role)?,
        DatasetFormat::Sharegpt => turns(&obj, "conversations", "from", "value", sharegpt_role)?,
        DatasetFormat::Alpaca => {
            let instruction = req_str(&obj, "instruction")?;
            let input = opt_str(&obj, "input")?;
            let output = req_str(&obj, "output")?;
            let system = opt_str(&obj, "system")?;
            let mut user = instruction.to_string();
            if let Some(input) = input {
                user.push_str("\n\n");
                user.push_str(input);
            }
            let mut m = Vec::with_capacity(3);
            if let Some(system) = system {
                m.push(msg("system", system));
            }
            m.push(msg("user", &user));
            m.push(msg("assistant", output));
            m
        }
        DatasetFormat::Csv | DatasetFormat::Text => {
            return Err(format!("{} is not a JSON Lines format", format.as_str()))
        }
    };
    Ok((Sample::Chat(messages), tag(&obj, "id"), tag(&obj, "label")))
}

type ParsedRowParts = (Sample, Option<String>, Option<String>);

/// (1-based line, reason) of every bad row, in file order.
type BadLines = Vec<(u64, String)>;

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.to_string(),
        content: content.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Formats
// ---------------------------------------------------------------------------------------

fn parse_jsonl(bytes: &[u8], format: DatasetFormat) -> (Vec<ParsedRow>, Vec<(u64, String)>) {
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (line, raw) in lines(bytes) {
        if is_blank(raw) {
            continue;
        }
        let parsed = decode(raw).and_then(|text| {
            check_length(text.len(), || text.chars().count())?;
            json_record(text, format)
        });
        match parsed {
            Ok((sample, id, label)) => rows.push(ParsedRow::new(line, sample, id, label)),
            Err(reason) => bad.push((line, reason)),
        }
    }
    (rows, bad)
}

fn parse_text(bytes: &[u8], paragraphs: bool) -> (Vec<ParsedRow>, Vec<(u64, String)>) {
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    fn push(line: u64, text: String, rows: &mut Vec<ParsedRow>, bad: &mut Vec<(u64, String)>) {
        match check_length(text.len(), || text.chars().count()) {
            Ok(()) => rows.push(ParsedRow::new(line, Sample::Text(text), None, None)),
            Err(reason) => bad.push((line, reason)),
        }
    }
    if !paragraphs {
        for (line, raw) in lines(bytes) {
            if is_blank(raw) {
                continue;
            }
            match decode(raw) {
                Ok(text) => push(line, text.to_string(), &mut rows, &mut bad),
                Err(reason) => bad.push((line, reason)),
            }
        }
        return (rows, bad);
    }
    // Paragraphs: consecutive non-blank lines joined by "\n"; the first line numbers it.
    struct Para {
        start: u64,
        text: String,
        error: Option<(u64, String)>,
    }
    let mut cur: Option<Para> = None;
    let mut paras = Vec::new();
    for (line, raw) in lines(bytes) {
        if is_blank(raw) {
            paras.extend(cur.take());
            continue;
        }
        let p = cur.get_or_insert_with(|| Para {
            start: line,
            text: String::new(),
            error: None,
        });
        if p.error.is_some() {
            continue;
        }
        match decode(raw) {
            Ok(text) => {
                if !p.text.is_empty() {
                    p.text.push('\n');
                }
                p.text.push_str(text);
                if p.text.len() > 4 * MAX_ROW_CHARS + 4 {
                    // Certainly over the limit: stop growing it.
                    p.error = Some((
                        p.start,
                        format!(
                            "paragraph longer than any sensible max length (limit {MAX_ROW_CHARS} characters)"
                        ),
                    ));
                }
            }
            Err(reason) => p.error = Some((line, reason)),
        }
    }
    paras.extend(cur.take());
    for p in paras {
        match p.error {
            Some(e) => bad.push(e),
            None => push(p.start, p.text, &mut rows, &mut bad),
        }
    }
    bad.sort_by_key(|(line, _)| *line);
    (rows, bad)
}

/// The resolved CSV columns (indices into the header).
struct CsvColumns {
    prompt: Option<usize>,
    response: Option<usize>,
    system: Option<usize>,
    label: Option<usize>,
    id: Option<usize>,
    text: Option<usize>,
    names: Vec<String>,
}

fn csv_columns(header: &[String], map: &ColumnMap) -> Result<CsvColumns, String> {
    let listing = || header.join(", ");
    let find = |want: &str| -> Result<usize, String> {
        header
            .iter()
            .position(|h| h == want)
            .or_else(|| header.iter().position(|h| h.eq_ignore_ascii_case(want)))
            .ok_or_else(|| format!("no column '{want}' in the header (columns: {})", listing()))
    };
    let guess = |names: &[&str]| -> Option<usize> {
        names
            .iter()
            .find_map(|n| header.iter().position(|h| h.trim().eq_ignore_ascii_case(n)))
    };
    let explicit = |v: &Option<String>| v.as_deref().map(find).transpose();
    let any_main = map.prompt.is_some() || map.response.is_some() || map.text.is_some();
    let (prompt, response, text) = if any_main {
        (
            explicit(&map.prompt)?,
            explicit(&map.response)?,
            explicit(&map.text)?,
        )
    } else {
        let p = guess(&["prompt", "instruction", "question", "input"]);
        let r = guess(&["response", "output", "answer", "completion"]);
        match (p, r, guess(&["text", "content", "document"])) {
            (Some(p), Some(r), _) => (Some(p), Some(r), None),
            (_, _, Some(t)) => (None, None, Some(t)),
            _ => {
                return Err(format!(
                    "cannot tell which columns hold the prompt and the response, or the text \
                     (columns: {}); map them (prompt=COL,response=COL or text=COL)",
                    listing()
                ))
            }
        }
    };
    match (prompt, response, text) {
        (Some(_), Some(_), None) | (None, None, Some(_)) => {}
        (_, _, Some(_)) => {
            return Err("map either a text column or prompt and response columns, not both".into())
        }
        _ => return Err("chat rows need both a prompt and a response column".into()),
    }
    let side = |v: &Option<String>, name: &str| match v {
        Some(_) => explicit(v),
        None => Ok(guess(&[name])),
    };
    Ok(CsvColumns {
        prompt,
        response,
        system: if text.is_some() {
            None
        } else {
            side(&map.system, "system")?
        },
        label: side(&map.label, "label")?,
        id: side(&map.id, "id")?,
        text,
        names: header.to_vec(),
    })
}

/// The header names of a CSV/TSV file's first record, trimmed.
fn csv_header(bytes: &[u8], delimiter: u8) -> Result<Vec<String>, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .has_headers(true)
        .from_reader(bytes);
    read_header(&mut reader)
}

fn read_header(reader: &mut csv::Reader<&[u8]>) -> Result<Vec<String>, String> {
    let header = reader
        .byte_headers()
        .map_err(|e| format!("cannot read the header row: {e}"))?
        .clone();
    let header: Vec<String> = header
        .iter()
        .enumerate()
        .map(|(i, h)| {
            std::str::from_utf8(h)
                .map(|s| s.trim().to_string())
                .map_err(|_| format!("header column {} is not valid UTF-8", i + 1))
        })
        .collect::<Result<_, _>>()?;
    if header.iter().all(String::is_empty) {
        return Err("the header row is empty".into());
    }
    Ok(header)
}

fn parse_csv(
    bytes: &[u8],
    delimiter: u8,
    map: &ColumnMap,
) -> Result<(SampleKind, Vec<ParsedRow>, BadLines), String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .has_headers(true)
        .from_reader(bytes);
    let header = read_header(&mut reader)?;
    let cols = csv_columns(&header, map)?;
    let kind = if cols.text.is_some() {
        SampleKind::Text
    } else {
        SampleKind::Chat
    };
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        let line_before = reader.position().line();
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(line_before, |p| p.line());
                bad.push((line, format!("malformed CSV record: {e}")));
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    break;
                }
                continue;
            }
        }
        let line = record.position().map_or(line_before, |p| p.line());
        match csv_record(&record, &cols) {
            Ok((sample, id, label)) => rows.push(ParsedRow::new(line, sample, id, label)),
            Err(reason) => bad.push((line, reason)),
        }
    }
    Ok((kind, rows, bad))
}

fn csv_record(record: &csv::ByteRecord, cols: &CsvColumns) -> Result<ParsedRowParts, String> {
    let total: usize = record.iter().map(<[u8]>::len).sum();
    let field = |idx: Option<usize>, required: bool| -> Result<Option<String>, String> {
        let Some(i) = idx else { return Ok(None) };
        let name = &cols.names[i];
        let Some(raw) = record.get(i) else {
            return if required {
                Err(format!(
                    "missing field '{name}' (the record has {} fields, the header {})",
                    record.len(),
                    cols.names.len()
                ))
            } else {
                Ok(None)
            };
        };
        let s = std::str::from_utf8(raw).map_err(|e| {
            format!(
                "invalid UTF-8 in column '{name}' (byte {})",
                e.valid_up_to() + 1
            )
        })?;
        if s.trim().is_empty() {
            return if required {
                Err(format!("empty field '{name}'"))
            } else {
                Ok(None)
            };
        }
        Ok(Some(s.to_string()))
    };
    // Decode every mapped field first so an invalid byte anywhere is reported.
    let prompt = field(cols.prompt, true)?;
    let response = field(cols.response, true)?;
    let text = field(cols.text, true)?;
    let system = field(cols.system, false)?;
    let label = field(cols.label, false)?;
    let id = field(cols.id, false)?;
    check_length(total, || {
        [&prompt, &response, &text, &system]
            .iter()
            .map(|f| f.as_deref().map_or(0, |s| s.chars().count()))
            .sum()
    })?;
    let sample = match (prompt, response, text) {
        (_, _, Some(text)) => Sample::Text(text),
        (Some(p), Some(r), None) => {
            let mut m = Vec::with_capacity(3);
            if let Some(s) = system {
                m.push(msg("system", &s));
            }
            m.push(msg("user", &p));
            m.push(msg("assistant", &r));
            Sample::Chat(m)
        }
        _ => return Err("no prompt and response".into()),
    };
    Ok((sample, id, label))
}

// ---------------------------------------------------------------------------------------
// Detection and files
// ---------------------------------------------------------------------------------------

fn invalid(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidDataset {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// The format from the extension and the first record that parses.
fn detect(path: &Path, bytes: &[u8]) -> Result<DatasetFormat, EngineError> {
    let ext = extension(path);
    match ext.as_str() {
        "csv" | "tsv" => return Ok(DatasetFormat::Csv),
        "txt" | "text" | "md" => return Ok(DatasetFormat::Text),
        _ => {}
    }
    let json_ext = matches!(ext.as_str(), "jsonl" | "json" | "ndjson");
    let first = lines(bytes).find(|(_, l)| !is_blank(l));
    if let Some((_, l)) = first {
        let t = String::from_utf8_lossy(l);
        let t = t.trim();
        if t.starts_with('[') && serde_json::from_str::<Value>(t).is_err() {
            return Err(invalid(
                path,
                "is one JSON array, not JSON Lines: write one JSON object per line",
            ));
        }
    }
    let first_object = lines(bytes).find_map(|(_, l)| {
        let text = std::str::from_utf8(l).ok()?;
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(obj)) => Some(obj),
            _ => None,
        }
    });
    match first_object {
        Some(obj) => {
            if obj.contains_key("messages") {
                Ok(DatasetFormat::Chat)
            } else if obj.contains_key("conversations") {
                Ok(DatasetFormat::Sharegpt)
            } else if obj.contains_key("instruction") {
                Ok(DatasetFormat::Alpaca)
            } else {
                let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
                Err(invalid(
                    path,
                    format!(
                        "cannot tell the format: the first record has none of the keys \
                         'messages' (chat), 'conversations' (sharegpt) or 'instruction' \
                         (alpaca); its keys are [{}]",
                        keys.join(", ")
                    ),
                ))
            }
        }
        None if json_ext => Err(invalid(path, "no line is a JSON object")),
        None => Err(invalid(
            path,
            format!(
                "cannot tell the format from the extension '{}': choose one of chat, \
                 sharegpt, alpaca, csv, text",
                if ext.is_empty() { "(none)" } else { &ext }
            ),
        )),
    }
}

/// Reads a dataset file's bytes: a regular file only (a FIFO would block, a device never end).
fn read_raw(path: &Path) -> Result<Vec<u8>, EngineError> {
    attune_models::fsio::read_regular(path).map_err(|e| match e {
        attune_models::Error::Io { source, .. } => EngineError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => invalid(path, other.to_string()),
    })
}

/// Reads a dataset file as UTF-8 text (see [`decode_text`]).
fn read_dataset(path: &Path) -> Result<Vec<u8>, EngineError> {
    decode_text(path, read_raw(path)?)
}

/// The text of a dataset file as UTF-8 bytes. UTF-16 with a byte-order mark, or without one
/// when its NUL bytes fall on every other byte (ASCII-range text saved as UTF-16 by Windows
/// tools), is decoded; any other file holding NUL bytes (binary data, UTF-32, a wrongly
/// guessed encoding) is refused, so rows full of NULs are never imported.
pub(crate) fn decode_text(path: &Path, bytes: Vec<u8>) -> Result<Vec<u8>, EngineError> {
    let utf16 = |body: &[u8], little: bool| -> Result<Vec<u8>, EngineError> {
        if !body.len().is_multiple_of(2) {
            return Err(invalid(
                path,
                "looks like UTF-16 text but has an odd number of bytes (truncated?)",
            ));
        }
        let units = body.chunks_exact(2).map(|c| {
            if little {
                u16::from_le_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], c[1]])
            }
        });
        let text: String = char::decode_utf16(units)
            .enumerate()
            .map(|(i, c)| {
                c.map_err(|_| {
                    invalid(
                        path,
                        format!("invalid UTF-16 (an unpaired surrogate at byte {})", i * 2),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(text.into_bytes())
    };
    let decoded = if let Some(body) = bytes.strip_prefix(b"\xFF\xFE") {
        utf16(body, true)?
    } else if let Some(body) = bytes.strip_prefix(b"\xFE\xFF") {
        utf16(body, false)?
    } else if bytes.contains(&0) {
        // Without a BOM: which byte of each pair is NUL, over the first 64 KiB.
        let head = &bytes[..bytes.len().min(64 * 1024)];
        let (mut even, mut odd) = (0usize, 0usize);
        for (i, b) in head.iter().enumerate() {
            if *b == 0 {
                if i % 2 == 0 {
                    even += 1
                } else {
                    odd += 1
                }
            }
        }
        let pairs = head.len() / 2;
        if pairs > 0 && odd * 10 >= pairs * 3 && even * 20 < odd {
            utf16(&bytes, true)?
        } else if pairs > 0 && even * 10 >= pairs * 3 && odd * 20 < even {
            utf16(&bytes, false)?
        } else {
            bytes
        }
    } else {
        return Ok(bytes);
    };
    if let Some(at) = decoded.iter().position(|&b| b == 0) {
        return Err(invalid(
            path,
            format!(
                "holds a NUL byte (at byte {at}): it is binary data or text in an encoding \
                 Attune does not read; save it as UTF-8 (or UTF-16)"
            ),
        ));
    }
    Ok(decoded)
}

fn parse_file(path: &Path, opts: &ImportOptions) -> Result<ParsedFile, EngineError> {
    parse_bytes(path, read_raw(path)?, opts)
}

/// [`parse_file`] on bytes already read (`path` gives the extension and the name in errors):
/// every importer's whole path from raw bytes to rows, which the fuzz tests drive.
fn parse_bytes(path: &Path, raw: Vec<u8>, opts: &ImportOptions) -> Result<ParsedFile, EngineError> {
    let bytes = decode_text(path, raw)?;
    let (format, format_detected) = match opts.format {
        Some(f) => (f, false),
        None => (detect(path, &bytes)?, true),
    };
    let mut headers = Vec::new();
    let (kind, rows, bad) = match format {
        DatasetFormat::Chat | DatasetFormat::Sharegpt | DatasetFormat::Alpaca => {
            let (rows, bad) = parse_jsonl(&bytes, format);
            (SampleKind::Chat, rows, bad)
        }
        DatasetFormat::Text => {
            let (rows, bad) = parse_text(&bytes, opts.paragraphs);
            (SampleKind::Text, rows, bad)
        }
        DatasetFormat::Csv => {
            let delimiter = if extension(path) == "tsv" {
                b'\t'
            } else {
                b','
            };
            headers = csv_header(&bytes, delimiter).map_err(|r| invalid(path, r))?;
            parse_csv(&bytes, delimiter, &opts.columns).map_err(|r| invalid(path, r))?
        }
    };
    Ok(ParsedFile {
        path: path.to_path_buf(),
        format,
        format_detected,
        kind,
        headers,
        rows,
        bad,
    })
}

// ---------------------------------------------------------------------------------------
// Splitting
// ---------------------------------------------------------------------------------------

/// SplitMix64: a tiny, well-mixed 64-bit generator with a fixed definition.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`), by rejection so there is no modulo bias.
    fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % bound;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }
}

/// `0..n` in the seeded order.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

fn part_size(fraction: f64, n: usize) -> usize {
    if fraction <= 0.0 || n == 0 {
        0
    } else {
        ((fraction * n as f64).round() as usize).max(1)
    }
}

fn check_split(split: &Split) -> Result<(), EngineError> {
    match split {
        Split::Seeded {
            valid_fraction,
            test_fraction,
            ..
        } => {
            for (name, f) in [("valid", valid_fraction), ("test", test_fraction)] {
                if !f.is_finite() || !(0.0..1.0).contains(f) {
                    return Err(EngineError::InvalidInput(format!(
                        "the {name} fraction must be in [0, 1), got {f}"
                    )));
                }
            }
            if valid_fraction + test_fraction >= 1.0 {
                return Err(EngineError::InvalidInput(format!(
                    "valid fraction {valid_fraction} + test fraction {test_fraction} leave no \
                     training rows"
                )));
            }
            Ok(())
        }
        Split::AllTrain => Ok(()),
        Split::Files {
            valid_path,
            test_path,
        } => {
            if valid_path.is_none() && test_path.is_none() {
                return Err(EngineError::InvalidInput(
                    "a split from files needs a validation file or a test file".into(),
                ));
            }
            Ok(())
        }
    }
}

/// Everything an import would write, worked out without touching the library.
struct Plan {
    main: ParsedFile,
    /// Bad rows of every file, main file first.
    bad: Vec<BadRow>,
    duplicates: u64,
    good_rows: u64,
    /// Train, valid, test.
    parts: [Vec<ParsedRow>; 3],
    name: String,
    split: Split,
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn plan(path: &Path, opts: &ImportOptions) -> Result<Plan, EngineError> {
    check_split(&opts.split)?;
    let main = parse_file(path, opts)?;
    let mut extra: Vec<(SplitName, ParsedFile)> = Vec::new();
    let mut split = opts.split.clone();
    if let Split::Files {
        valid_path,
        test_path,
    } = &mut split
    {
        for (name, p) in [(SplitName::Valid, valid_path), (SplitName::Test, test_path)] {
            let Some(p) = p else { continue };
            let file = parse_file(Path::new(p), opts)?;
            if file.kind != main.kind {
                return Err(invalid(
                    &file.path,
                    format!(
                        "holds {} rows but {} holds {} rows",
                        file.kind.as_str(),
                        main.path.display(),
                        main.kind.as_str()
                    ),
                ));
            }
            *p = absolute(&file.path);
            extra.push((name, file));
        }
    }
    let mut bad = Vec::new();
    for f in std::iter::once(&main).chain(extra.iter().map(|(_, f)| f)) {
        bad.extend(f.bad.iter().map(|(line, reason)| BadRow {
            file: display(&f.path),
            line: *line,
            reason: reason.clone(),
        }));
    }
    let good_rows =
        (main.rows.len() + extra.iter().map(|(_, f)| f.rows.len()).sum::<usize>()) as u64;

    // Exact duplicates (same content, whatever the id or label) are dropped across all
    // files, the first kept: a valid row equal to a training row would leak.
    let mut seen: HashSet<String> = HashSet::new();
    let mut duplicates = 0u64;
    let mut keep = |rows: &[ParsedRow]| -> Vec<ParsedRow> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            if seen.insert(r.data.clone()) {
                out.push(r.clone());
            } else {
                duplicates += 1;
            }
        }
        out
    };
    let main_rows = keep(&main.rows);
    let mut parts: [Vec<ParsedRow>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    match &split {
        Split::AllTrain => parts[0] = main_rows,
        Split::Files { .. } => {
            parts[0] = main_rows;
            for (name, f) in &extra {
                parts[*name as usize] = keep(&f.rows);
            }
        }
        Split::Seeded {
            valid_fraction,
            test_fraction,
            seed,
        } => {
            let n = main_rows.len();
            let n_valid = part_size(*valid_fraction, n);
            let n_test = part_size(*test_fraction, n);
            if n > 0 && n_valid + n_test >= n {
                return Err(invalid(
                    path,
                    format!(
                        "only {n} usable row(s): too few for {n_valid} validation and \
                         {n_test} test row(s) and at least one training row"
                    ),
                ));
            }
            let mut which = vec![SplitName::Train; n];
            let order = shuffled(n, *seed);
            for &i in &order[..n_valid] {
                which[i] = SplitName::Valid;
            }
            for &i in &order[n_valid..n_valid + n_test] {
                which[i] = SplitName::Test;
            }
            for (row, part) in main_rows.into_iter().zip(which) {
                parts[part as usize].push(row);
            }
        }
    }
    let name = match opts.name.as_deref().map(str::trim) {
        Some("") => {
            return Err(EngineError::InvalidInput(
                "the dataset name is empty".into(),
            ))
        }
        Some(n) => n.to_string(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "dataset".to_string()),
    };
    Ok(Plan {
        main,
        bad,
        duplicates,
        good_rows,
        parts,
        name,
        split,
    })
}

pub(crate) fn absolute(path: &Path) -> String {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// SHA-256 over `{split}\t{data}\t{label as JSON}\n` for every row, in order.
pub(crate) fn content_hash<'a>(
    rows: impl Iterator<Item = (&'a str, &'a str, Option<&'a str>)>,
) -> String {
    let mut h = Sha256::new();
    for (split, data, label) in rows {
        h.update(split.as_bytes());
        h.update(b"\t");
        h.update(data.as_bytes());
        h.update(b"\t");
        h.update(serde_json::to_string(&label).unwrap_or_default().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

pub(crate) fn summary(rec: &DatasetRecord, db: &Path) -> Result<DatasetSummary, EngineError> {
    let bad = |field: &str, value: &str| {
        EngineError::db(
            db,
            format!("dataset id {}: invalid {field} '{value}'", rec.id),
        )
    };
    let count = |field: &str, v: i64| u64::try_from(v).map_err(|_| bad(field, &v.to_string()));
    Ok(DatasetSummary {
        id: rec.id,
        name: rec.name.clone(),
        format: DatasetFormat::parse(&rec.format).ok_or_else(|| bad("format", &rec.format))?,
        kind: match rec.kind.as_str() {
            "chat" => SampleKind::Chat,
            "text" => SampleKind::Text,
            other => return Err(bad("kind", other)),
        },
        source_path: rec.source_path.clone(),
        content_hash: rec.content_hash.clone(),
        created_at: rec.created_at.clone(),
        train_rows: count("train_rows", rec.train_rows)?,
        valid_rows: count("valid_rows", rec.valid_rows)?,
        test_rows: count("test_rows", rec.test_rows)?,
        duplicates_removed: count("duplicates_removed", rec.duplicates_removed)?,
        bad_rows_skipped: count("bad_rows_skipped", rec.bad_rows_skipped)?,
        split: serde_json::from_str(&rec.split_spec)
            .map_err(|_| bad("split_spec", &rec.split_spec))?,
    })
}

fn to_models_loss(l: LossOn) -> attune_models::train::LossOn {
    match l {
        LossOn::Assistant => attune_models::train::LossOn::Assistant,
        LossOn::All => attune_models::train::LossOn::All,
    }
}

// ---------------------------------------------------------------------------------------
// Engine
// ---------------------------------------------------------------------------------------

impl Engine {
    /// Reads and validates `path` (and the split files the options name) and reports
    /// what importing would give: the format, the counts, every bad row (line and
    /// reason), the duplicates and the first rows normalized. Writes nothing.
    pub fn inspect_dataset(
        &self,
        path: &Path,
        options: &ImportOptions,
    ) -> Result<DatasetPreview, EngineError> {
        let plan = plan(path, options)?;
        let bad_row_count = plan.bad.len() as u64;
        let mut bad_rows = plan.bad;
        bad_rows.truncate(MAX_BAD_ROWS_SHOWN);
        Ok(DatasetPreview {
            path: display(path),
            format: plan.main.format,
            format_detected: plan.main.format_detected,
            kind: plan.main.kind,
            headers: plan.main.headers.clone(),
            name: plan.name,
            good_rows: plan.good_rows,
            duplicates: plan.duplicates,
            bad_row_count,
            bad_rows,
            train_rows: plan.parts[0].len() as u64,
            valid_rows: plan.parts[1].len() as u64,
            test_rows: plan.parts[2].len() as u64,
            rows: plan
                .main
                .rows
                .iter()
                .take(options.preview_rows)
                .map(|r| PreviewRow {
                    line: r.line,
                    source_id: r.source_id.clone(),
                    label: r.label.clone(),
                    sample: r.sample.to_protocol(),
                })
                .collect(),
        })
    }

    /// The header names of a CSV or TSV file (for mapping its columns before an
    /// import whose guessed mapping failed).
    pub fn csv_headers(&self, path: &Path) -> Result<Vec<String>, EngineError> {
        let bytes = read_dataset(path)?;
        let delimiter = if extension(path) == "tsv" {
            b'\t'
        } else {
            b','
        };
        csv_header(&bytes, delimiter).map_err(|r| invalid(path, r))
    }

    /// Imports `path` into the library in one transaction. With bad rows and
    /// `accept_bad_rows` false, nothing is written and the error names the file, the
    /// count and the first bad lines. A taken name is an error naming the dataset.
    pub fn import_dataset(
        &self,
        path: &Path,
        options: &ImportOptions,
    ) -> Result<DatasetSummary, EngineError> {
        let plan = plan(path, options)?;
        if !plan.bad.is_empty() && !options.accept_bad_rows {
            let main = display(path);
            let first = plan
                .bad
                .iter()
                .take(BAD_ROWS_IN_ERROR)
                .map(|b| {
                    if b.file == main {
                        format!("line {}: {}", b.line, b.reason)
                    } else {
                        format!("{} line {}: {}", b.file, b.line, b.reason)
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(EngineError::BadRows {
                path: path.to_path_buf(),
                count: plan.bad.len() as u64,
                first,
            });
        }
        if plan.parts.iter().all(Vec::is_empty) {
            return Err(invalid(path, "no usable rows"));
        }
        if let Some(existing) = self.store.find_dataset_by_name(&plan.name)? {
            return Err(EngineError::DatasetExists {
                name: existing.name,
                id: existing.id,
            });
        }
        let kind = plan.main.kind.as_str();
        let mut rows = Vec::with_capacity(plan.parts.iter().map(Vec::len).sum());
        for (split, part) in SplitName::ALL.iter().zip(&plan.parts) {
            for (idx, r) in part.iter().enumerate() {
                rows.push(StoredRow {
                    split: split.as_str().to_string(),
                    idx: idx as i64,
                    kind: kind.to_string(),
                    data: r.data.clone(),
                    label: r.label.clone(),
                    source_id: r.source_id.clone(),
                    source_line: i64::try_from(r.line).ok(),
                });
            }
        }
        let content_hash = content_hash(
            rows.iter()
                .map(|r| (r.split.as_str(), r.data.as_str(), r.label.as_deref())),
        );
        let new = DatasetRecord {
            id: 0,
            name: plan.name.clone(),
            format: plan.main.format.as_str().to_string(),
            kind: kind.to_string(),
            source_path: absolute(path),
            content_hash,
            created_at: crate::clock::now_rfc3339(),
            train_rows: plan.parts[0].len() as i64,
            valid_rows: plan.parts[1].len() as i64,
            test_rows: plan.parts[2].len() as i64,
            duplicates_removed: plan.duplicates as i64,
            bad_rows_skipped: plan.bad.len() as i64,
            split_spec: serde_json::to_string(&plan.split)
                .map_err(|e| EngineError::InvalidInput(format!("split: {e}")))?,
        };
        match self.store.insert_dataset(&new, &rows)? {
            InsertDataset::Inserted(rec) => summary(&rec, self.store.path()),
            InsertDataset::NameTaken(rec) => Err(EngineError::DatasetExists {
                name: rec.name,
                id: rec.id,
            }),
        }
    }

    /// All datasets, oldest first.
    pub fn list_datasets(&self) -> Result<Vec<DatasetSummary>, EngineError> {
        self.store
            .list_datasets()?
            .iter()
            .map(|r| summary(r, self.store.path()))
            .collect()
    }

    /// A dataset by id, else by exact name.
    pub fn find_dataset(&self, id_or_name: &str) -> Result<DatasetSummary, EngineError> {
        let key = id_or_name.trim();
        if key.is_empty() {
            return Err(EngineError::InvalidInput(
                "dataset id or name is empty".to_string(),
            ));
        }
        if let Ok(id) = key.parse::<i64>() {
            if let Some(rec) = self.store.get_dataset(id)? {
                return summary(&rec, self.store.path());
            }
        }
        match self.store.find_dataset_by_name(key)? {
            Some(rec) => summary(&rec, self.store.path()),
            None => Err(EngineError::DatasetNotFound(key.to_string())),
        }
    }

    /// Removes a dataset and its stored rows (never the source file). Refused while a
    /// run uses it (the error names the runs).
    pub fn remove_dataset(&self, id: i64) -> Result<(), EngineError> {
        let users = self.store.dataset_users(id)?;
        if !users.is_empty() {
            let name = self
                .store
                .get_dataset(id)?
                .map(|d| d.name)
                .unwrap_or_default();
            return Err(EngineError::InUse {
                what: format!("dataset '{name}' (id {id})"),
                users: crate::users_text(&users),
            });
        }
        if !self.store.delete_dataset(id)? {
            return Err(EngineError::DatasetNotFound(id.to_string()));
        }
        Ok(())
    }

    /// The rows of one split, in their stored order.
    pub fn dataset_rows(&self, id: i64, split: SplitName) -> Result<Vec<DatasetRow>, EngineError> {
        if self.store.get_dataset(id)?.is_none() {
            return Err(EngineError::DatasetNotFound(id.to_string()));
        }
        self.store
            .dataset_rows(id, split.as_str())?
            .into_iter()
            .map(|r| {
                let sample = Sample::from_canonical(&r.kind, &r.data).ok_or_else(|| {
                    EngineError::db(
                        self.store.path(),
                        format!(
                            "dataset id {id}, {} row {}: unreadable {} data",
                            r.split, r.idx, r.kind
                        ),
                    )
                })?;
                Ok(DatasetRow {
                    source_id: r.source_id,
                    sample,
                    label: r.label,
                })
            })
            .collect()
    }

    /// Token statistics of every split under `model_id`'s tokenizer and chat template,
    /// rendered exactly as training renders them (`max_len` truncation, `loss_on` mask).
    pub fn dataset_stats(
        &self,
        dataset_id: i64,
        model_id: i64,
        max_len: usize,
        loss_on: LossOn,
    ) -> Result<DatasetStats, EngineError> {
        let ds = self.find_dataset(&dataset_id.to_string())?;
        if max_len < 2 {
            return Err(EngineError::InvalidInput(format!(
                "max length must be at least 2 tokens, got {max_len}"
            )));
        }
        let model_row = self
            .store
            .get_model(model_id)?
            .ok_or_else(|| EngineError::ModelNotFound(model_id.to_string()))?;
        let model = self.model_for(model_id, &mut |_| {})?;
        let opts = attune_models::train::RenderOptions {
            loss_on: to_models_loss(loss_on),
            max_len,
        };
        let mut splits = Vec::with_capacity(3);
        for split in SplitName::ALL {
            let rows = self.dataset_rows(ds.id, split)?;
            let mut s = SplitStats {
                split,
                rows: rows.len() as u64,
                tokens_min: 0,
                tokens_mean: 0.0,
                tokens_max: 0,
                tokens_total: 0,
                target_tokens: 0,
                truncated_rows: 0,
            };
            let mut min = u64::MAX;
            for (idx, row) in rows.iter().enumerate() {
                let example = match &row.sample {
                    Sample::Chat(messages) => {
                        let msgs: Vec<attune_models::chat_template::Message> = messages
                            .iter()
                            .map(|m| {
                                attune_models::chat_template::Message::new(
                                    m.role.clone(),
                                    m.content.clone(),
                                )
                            })
                            .collect();
                        attune_models::train::render_chat(
                            &model.tokenizer,
                            &model.chat_template,
                            &msgs,
                            &opts,
                        )
                    }
                    Sample::Text(text) => {
                        attune_models::train::render_text(&model.tokenizer, text, &opts)
                    }
                }
                .map_err(|e| EngineError::InvalidDataset {
                    path: PathBuf::from(&ds.source_path),
                    reason: format!(
                        "'{}' {} row {idx} cannot be rendered for model '{}': {e}",
                        ds.name,
                        split.as_str(),
                        model_row.name
                    ),
                })?;
                let full = example.full_len as u64;
                min = min.min(full);
                s.tokens_max = s.tokens_max.max(full);
                s.tokens_total += full;
                s.target_tokens += example.n_targets() as u64;
                s.truncated_rows += u64::from(example.truncated);
            }
            if s.rows > 0 {
                s.tokens_min = min;
                s.tokens_mean = s.tokens_total as f64 / s.rows as f64;
            }
            splits.push(s);
        }
        Ok(DatasetStats {
            dataset_id: ds.id,
            model_id,
            model: model_row.name,
            max_len: max_len as u64,
            loss_on,
            splits,
        })
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
