//! The teacher's prompt and the reading of its answer.
//!
//! The prompt is a stored, versioned template (`templates.rs`), so the user edits it like
//! any other: the default ones are created on first use under [`DEFAULT_QA_TEMPLATE`] and
//! [`DEFAULT_INSTRUCTIONS_TEMPLATE`]. The passage fills `{{input}}`; `{{document}}` and
//! `{{section}}` say where it comes from; `{{count}}` how many rows to write.
//!
//! The answer is read as JSON when it holds a JSON array (or an object with a list) of
//! objects with question/answer (or instruction/response, prompt/completion) fields, and
//! otherwise line by line: `Q:` / `Question:` / `Instruction:` start a question, `A:` /
//! `Answer:` / `Response:` an answer (numbering, bullets and `**bold**` labels allowed), and
//! a line without a label continues the field before it. A question whose answer never
//! comes (cut off by the token limit) is dropped; an answer with no row at all is an error
//! that says what was expected and quotes the start of what came.

use std::collections::BTreeMap;

use attune_protocol::{ChatMessage, TeacherMode, TemplateDraft};
use serde_json::Value;

/// The stored template the question-answer mode uses unless another is named.
pub const DEFAULT_QA_TEMPLATE: &str = "docs-teacher-qa";
/// The stored template the instructions mode uses unless another is named.
pub const DEFAULT_INSTRUCTIONS_TEMPLATE: &str = "docs-teacher-instructions";
/// At most this many rows are kept from one answer.
pub const MAX_ROWS_PER_CHUNK: usize = 20;

/// The default template of `mode` (what is saved on first use).
pub fn default_template(mode: TeacherMode) -> TemplateDraft {
    let (name, system, user) = match mode {
        TeacherMode::Qa => (
            DEFAULT_QA_TEMPLATE,
            "You write training data from documents. Read the passage and write {{count}} \
             question-answer pairs that the passage itself answers. Use only facts stated in \
             the passage. Write each pair as two lines, with nothing else:\nQ: <question>\nA: \
             <answer>",
            "Document: {{document}}\nSection: {{section}}\n\nPassage:\n{{input}}\n\nWrite \
             {{count}} pairs, each as 'Q:' and 'A:' lines.",
        ),
        TeacherMode::Instructions => (
            DEFAULT_INSTRUCTIONS_TEMPLATE,
            "You write training data from documents. Read the passage and write {{count}} \
             instructions a user could give, each with the response an expert would write \
             using only the passage. Write each as two lines, with nothing else:\n\
             Instruction: <instruction>\nResponse: <response>",
            "Document: {{document}}\nSection: {{section}}\n\nPassage:\n{{input}}\n\nWrite \
             {{count}} items, each as 'Instruction:' and 'Response:' lines.",
        ),
    };
    TemplateDraft {
        id: None,
        name: name.to_string(),
        system: Some(system.to_string()),
        examples: Vec::new(),
        user: Some(user.to_string()),
        variables: BTreeMap::from([("count".to_string(), "3".to_string())]),
        note: Some("Attune's default teacher prompt".to_string()),
    }
}

/// One row read from the teacher's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub question: String,
    pub answer: String,
}

impl Pair {
    pub fn messages(&self) -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "user".to_string(),
                content: self.question.clone(),
            },
            ChatMessage {
                role: "assistant".to_string(),
                content: self.answer.clone(),
            },
        ]
    }
}

const QUESTION_KEYS: &[&str] = &["question", "instruction", "prompt", "q", "input", "user"];
const ANSWER_KEYS: &[&str] = &[
    "answer",
    "response",
    "completion",
    "a",
    "output",
    "assistant",
];

/// The rows in `answer` (see the module docs), or why there are none.
pub fn parse_answer(answer: &str) -> Result<Vec<Pair>, String> {
    let trimmed = answer.trim();
    if trimmed.is_empty() {
        return Err("the teacher wrote nothing".to_string());
    }
    if let Some(pairs) = json_pairs(trimmed) {
        if !pairs.is_empty() {
            return Ok(cap(pairs));
        }
    }
    let (pairs, dangling) = line_pairs(trimmed);
    if !pairs.is_empty() {
        return Ok(cap(pairs));
    }
    if dangling {
        return Err(format!(
            "a question without an answer (cut off by the token limit?): \"{}\"",
            quote(trimmed)
        ));
    }
    Err(format!(
        "no question-answer pair found (expected 'Q:' and 'A:' lines, or JSON with question \
         and answer fields): \"{}\"",
        quote(trimmed)
    ))
}

fn cap(mut pairs: Vec<Pair>) -> Vec<Pair> {
    pairs.truncate(MAX_ROWS_PER_CHUNK);
    pairs
}

/// The first 120 characters, on one line.
fn quote(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut q: String = one_line.chars().take(120).collect();
    if one_line.chars().count() > 120 {
        q.push_str("...");
    }
    q
}

fn json_pairs(text: &str) -> Option<Vec<Pair>> {
    // The outermost JSON value: from the first '[' or '{' to the last matching bracket.
    let start = text.find(['[', '{'])?;
    let close = if text[start..].starts_with('[') {
        ']'
    } else {
        '}'
    };
    let end = text.rfind(close)?;
    if end <= start {
        return None;
    }
    let value: Value = serde_json::from_str(&text[start..=end]).ok()?;
    let items = match value {
        Value::Array(items) => items,
        Value::Object(map) => {
            // {"pairs": [...]} or {"question": .., "answer": ..}.
            if let Some(Value::Array(items)) = map.values().find(|v| v.is_array()) {
                items.clone()
            } else {
                vec![Value::Object(map)]
            }
        }
        _ => return None,
    };
    let field = |obj: &serde_json::Map<String, Value>, keys: &[&str]| {
        obj.iter()
            .find(|(k, _)| keys.contains(&k.to_ascii_lowercase().as_str()))
            .and_then(|(_, v)| v.as_str())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    Some(
        items
            .iter()
            .filter_map(|item| {
                let obj = item.as_object()?;
                Some(Pair {
                    question: field(obj, QUESTION_KEYS)?,
                    answer: field(obj, ANSWER_KEYS)?,
                })
            })
            .collect(),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Question,
    Answer,
}

/// The label a line starts with, and the rest of the line.
fn label(line: &str) -> Option<(Field, &str)> {
    // Bullets, numbering and markdown emphasis before the label: "1. ", "- ", "**".
    let mut s = line.trim_start();
    s = s.trim_start_matches(['-', '*', '#', '>', ' ']);
    let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits > 0 {
        let after = &s[digits..];
        if let Some(r) = after.strip_prefix(['.', ')']) {
            s = r.trim_start();
        }
    }
    s = s.trim_start_matches(['*', '_', ' ']);
    let colon = s.find(':')?;
    let name = s[..colon]
        .trim()
        .trim_end_matches(['*', '_'])
        .trim()
        .to_ascii_lowercase();
    // "Q1", "Question 2": a label and a number.
    let word = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == ' ');
    let field = match word {
        "q" | "question" | "instruction" | "prompt" | "user" => Field::Question,
        "a" | "answer" | "response" | "output" | "assistant" => Field::Answer,
        _ => return None,
    };
    let rest = s[colon + 1..].trim_start_matches(['*', '_']).trim();
    Some((field, rest))
}

/// Pairs from labelled lines, and whether a question was left without an answer.
fn line_pairs(text: &str) -> (Vec<Pair>, bool) {
    let mut pairs = Vec::new();
    let mut question: Option<String> = None;
    let mut answer: Option<String> = None;
    let mut current: Option<Field> = None;
    let finish = |q: &mut Option<String>, a: &mut Option<String>, pairs: &mut Vec<Pair>| {
        if let (Some(qq), Some(aa)) = (q.as_ref(), a.as_ref()) {
            let (qq, aa) = (qq.trim(), aa.trim());
            if !qq.is_empty() && !aa.is_empty() {
                pairs.push(Pair {
                    question: qq.to_string(),
                    answer: aa.to_string(),
                });
            }
            *q = None;
            *a = None;
        }
    };
    for line in text.lines() {
        match label(line) {
            Some((Field::Question, rest)) => {
                finish(&mut question, &mut answer, &mut pairs);
                question = Some(rest.to_string());
                answer = None;
                current = Some(Field::Question);
            }
            Some((Field::Answer, rest)) => {
                if question.is_none() {
                    // An answer with no question before it is not a row.
                    current = None;
                    continue;
                }
                if answer.is_some() {
                    // A second answer to one question: keep the first.
                    current = None;
                    continue;
                }
                answer = Some(rest.to_string());
                current = Some(Field::Answer);
            }
            None => {
                let line = line.trim();
                let target = match current {
                    Some(Field::Question) => question.as_mut(),
                    Some(Field::Answer) => answer.as_mut(),
                    None => None,
                };
                if let Some(t) = target {
                    if line.is_empty() {
                        // A blank line ends the field.
                        current = None;
                    } else {
                        if !t.is_empty() {
                            t.push('\n');
                        }
                        t.push_str(line);
                    }
                }
            }
        }
    }
    finish(&mut question, &mut answer, &mut pairs);
    let dangling = question.is_some_and(|q| !q.trim().is_empty());
    (pairs, dangling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(answer: &str) -> Vec<(String, String)> {
        parse_answer(answer)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|p| (p.question, p.answer))
            .collect()
    }

    fn p(q: &str, a: &str) -> (String, String) {
        (q.to_string(), a.to_string())
    }

    #[test]
    fn labelled_lines() {
        assert_eq!(
            pairs("Q: What is X?\nA: A thing.\n\nQ: Why?\nA: Because.\nIt is so."),
            vec![
                p("What is X?", "A thing."),
                p("Why?", "Because.\nIt is so.")
            ]
        );
        assert_eq!(
            pairs("Here are pairs:\n1. **Question:** Who?\n   **Answer:** Her.\n2. Q2: When? \nA2: Now"),
            vec![p("Who?", "Her."), p("When?", "Now")]
        );
        assert_eq!(
            pairs("Instruction: Summarize the rule.\nResponse: Wash hands."),
            vec![p("Summarize the rule.", "Wash hands.")]
        );
    }

    #[test]
    fn json_answers() {
        assert_eq!(
            pairs("Sure!\n[{\"question\": \"Q1?\", \"answer\": \"A1\"}, {\"Q\": \"Q2?\", \"A\": \"A2\"}]"),
            vec![p("Q1?", "A1"), p("Q2?", "A2")]
        );
        assert_eq!(
            pairs("{\"pairs\": [{\"instruction\": \"Do\", \"response\": \"Done\"}]}"),
            vec![p("Do", "Done")]
        );
    }

    #[test]
    fn bad_answers_say_why() {
        assert_eq!(
            parse_answer("  \n").expect_err("an error"),
            "the teacher wrote nothing"
        );
        let e = parse_answer("The passage talks about hands.").expect_err("an error");
        assert!(e.starts_with("no question-answer pair found"), "{e}");
        assert!(e.contains("The passage talks about hands."), "{e}");
        let e = parse_answer("Q: What is cut").expect_err("an error");
        assert!(e.starts_with("a question without an answer"), "{e}");
        // An answer without a question, and an empty answer, give no row.
        assert!(parse_answer("A: orphan").is_err());
        assert!(parse_answer("Q: Who?\nA:").is_err());
        // A complete pair and a cut-off one: the complete one is kept.
        assert_eq!(pairs("Q: a?\nA: b\nQ: c?"), vec![p("a?", "b")]);
    }

    #[test]
    fn rows_are_capped() {
        let many: String = (0..30).map(|i| format!("Q: q{i}?\nA: a{i}\n")).collect();
        assert_eq!(pairs(&many).len(), MAX_ROWS_PER_CHUNK);
    }
}
