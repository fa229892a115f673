//! The arena's judge: any target (a model, an adapter, a template, an endpoint's model)
//! votes on arena prompts against a rubric the user edits.
//!
//! The judge gets one user message (every chat template takes that): the rubric, the
//! conversation, and the two answers as "Answer 1" and "Answer 2", candidate A first or
//! second as [`judge_a_first`] draws it per prompt (seeded from the arena's seed, drawn
//! apart from the sides the human sees). It is asked to start its reply with
//! `Verdict: 1`, `Verdict: 2`, `Verdict: tie` or `Verdict: both bad`; [`parse_verdict`]
//! reads that line however it is decorated, and a reply it cannot read, or one that
//! states two different verdicts, is stored without a vote and with the reason, never
//! guessed. With both orders the prompt is judged twice, the answers swapped; verdicts
//! that disagree count as a tie (a judge that prefers a position cancels itself out),
//! and if either pass cannot be read there is no vote.
//!
//! Judge votes are stored apart from the human votes (migration 0009), with the judge's
//! target and label, the rubric version, the order setting and the raw replies.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use attune_protocol::{
    ArenaResults, ChatMessage, ChatTarget, FinishReason, JudgeEvent, JudgeReport, JudgeScope,
    JudgeSpec, JudgeStats, JudgeVote, Rubric, SamplingParams, VerdictMode,
};

use super::stats::{agreement, category, win_rates_of};
use super::{to_json, user, Answerer};
use crate::clock::now_rfc3339;
use crate::datasets::SplitMix64;
use crate::error::EngineError;
use crate::store::{JudgeVoteRow, RubricRow};
use crate::Engine;

/// The rubric used until the user saves one: pairwise judging of answers to domain
/// questions.
pub const DEFAULT_RUBRIC: &str = "\
Judge the answers as a domain expert would, in this order of importance:
1. Correctness: the facts, figures and conclusions are right for the question's domain; \
an answer with a factual error loses to one without.
2. Answers the question: it addresses what was asked (for a yes/no/maybe question, it \
gives that answer and the reason for it); it does not drift to another topic.
3. Grounding: claims follow from the question's context or from established knowledge; \
no invented studies, numbers or citations.
4. Completeness and precision: the key points are there; caveats are stated where they \
matter.
5. Clarity: concise and readable. Length alone is not quality.
If both answers are equally good, the verdict is a tie. If neither answers the question \
acceptably (wrong, off-topic, empty or incoherent), the verdict is both bad.";

/// Longest rubric, in characters.
pub const MAX_RUBRIC_CHARS: usize = 20_000;
/// Most tokens a verdict may take.
pub const MAX_JUDGE_TOKENS: usize = 4096;
/// Drawn with the arena's seed so the judge's order is not the order the human saw.
const JUDGE_ORDER_SALT: u64 = 0x6a75_6467_655f_6f72; // "judge_or"

/// Whether candidate A is "Answer 1" in the judge's first (or only) pass on prompt `index`.
pub(crate) fn judge_a_first(seed: u64, index: u64) -> bool {
    SplitMix64((seed ^ JUDGE_ORDER_SALT).wrapping_add(index)).next_u64() >> 63 == 0
}

/// A verdict about the answers in the order the judge saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    First,
    Second,
    Tie,
    BothBad,
}

impl Verdict {
    /// The stored vote ("a", "b", "tie", "both_bad") when A was shown first or not.
    pub(crate) fn stored(self, a_first: bool) -> &'static str {
        match (self, a_first) {
            (Verdict::First, true) | (Verdict::Second, false) => "a",
            (Verdict::First, false) | (Verdict::Second, true) => "b",
            (Verdict::Tie, _) => "tie",
            (Verdict::BothBad, _) => "both_bad",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Verdict::First => "1",
            Verdict::Second => "2",
            Verdict::Tie => "tie",
            Verdict::BothBad => "both bad",
        }
    }
}

/// What a verdict may say, and what it means.
const TOKENS: &[(&str, Verdict)] = &[
    ("both bad", Verdict::BothBad),
    ("both_bad", Verdict::BothBad),
    ("both-bad", Verdict::BothBad),
    ("both are bad", Verdict::BothBad),
    ("neither", Verdict::BothBad),
    ("tie", Verdict::Tie),
    ("draw", Verdict::Tie),
    ("answer 1", Verdict::First),
    ("answer 2", Verdict::Second),
    ("1", Verdict::First),
    ("2", Verdict::Second),
];

/// The verdict a reply starts with, if `s` (lowercase, decoration stripped) does.
fn verdict_token(s: &str) -> Option<Verdict> {
    for (token, v) in TOKENS {
        let Some(rest) = s.strip_prefix(token) else {
            continue;
        };
        // "10", "tied", "2nd" are not verdicts.
        if rest.chars().next().is_some_and(char::is_alphanumeric) {
            continue;
        }
        // "1 or 2", "1/2", "tie | both bad": undecided.
        let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || "*`'\"]).".contains(c));
        if rest.starts_with("or ") || rest.starts_with('/') || rest.starts_with('|') {
            return None;
        }
        return Some(*v);
    }
    None
}

/// Strips what models put around a verdict: markdown emphasis, colons, brackets, quotes,
/// "is", "=".
fn undecorate(s: &str) -> &str {
    let mut s = s;
    loop {
        let t = s.trim_start_matches(|c: char| c.is_whitespace() || ":*_`'\"[(<=-#>".contains(c));
        let t = t.strip_prefix("is ").unwrap_or(t);
        if t.len() == s.len() {
            return t;
        }
        s = t;
    }
}

/// Reads the verdict from a judge's reply: every "verdict" in it followed by one of 1, 2,
/// "answer 1", "answer 2", tie, "both bad" (decoration such as `**Verdict:** [[2]]`
/// allowed); all such must agree. A reply without the word that is nothing but a verdict
/// ("2", "Tie.") counts too. Anything else is an error saying why, never a guess.
pub(crate) fn parse_verdict(reply: &str) -> Result<Verdict, String> {
    let lower = reply.to_lowercase();
    let mut found: Vec<Verdict> = Vec::new();
    let mut from = 0;
    while let Some(at) = lower[from..].find("verdict") {
        let start = from + at + "verdict".len();
        from = start;
        let line = lower[start..].lines().next().unwrap_or("");
        if let Some(v) = verdict_token(undecorate(line)) {
            if !found.contains(&v) {
                found.push(v);
            }
        }
    }
    match found.as_slice() {
        [v] => return Ok(*v),
        [] => {}
        many => {
            let list: Vec<&str> = many.iter().map(|v| v.describe()).collect();
            return Err(format!("conflicting verdicts: {}", list.join(", ")));
        }
    }
    // A reply that is nothing but a verdict ("2", "Tie.", "**Answer 1**").
    let whole = undecorate(lower.trim())
        .trim_end_matches(|c: char| c.is_whitespace() || ".!*`'\"])>".contains(c));
    if let Some((_, v)) = TOKENS.iter().find(|(t, _)| *t == whole) {
        return Ok(*v);
    }
    let shown: String = reply.trim().chars().take(80).collect();
    Err(format!(
        "no verdict found (expected a line 'Verdict: 1', '2', 'tie' or 'both bad'); the reply \
         begins: {shown:?}"
    ))
}

/// The judge's one message: rubric, conversation, the two answers, and the verdict format.
pub(crate) fn judge_message(
    rubric: &str,
    context: &[ChatMessage],
    first: &str,
    second: &str,
) -> ChatMessage {
    let mut text = String::new();
    text.push_str(
        "You are an impartial expert judge. Compare two answers to the same question \
         against the rubric. Do not favour an answer for its position or its length.\n\n",
    );
    text.push_str("<rubric>\n");
    text.push_str(rubric.trim());
    text.push_str("\n</rubric>\n\n");
    let (question, earlier) = context
        .split_last()
        .map_or(("", &[][..]), |(last, rest)| (last.content.as_str(), rest));
    if !earlier.is_empty() {
        text.push_str("<conversation>\n");
        for m in earlier {
            text.push_str(&format!("{}: {}\n", m.role, m.content.trim()));
        }
        text.push_str("</conversation>\n\n");
    }
    text.push_str("<question>\n");
    text.push_str(question.trim());
    text.push_str("\n</question>\n\n<answer_1>\n");
    text.push_str(first.trim());
    text.push_str("\n</answer_1>\n\n<answer_2>\n");
    text.push_str(second.trim());
    text.push_str(
        "\n</answer_2>\n\nWhich answer is better by the rubric? Start your reply with one \
         line, exactly one of: \"Verdict: 1\", \"Verdict: 2\", \"Verdict: tie\", \
         \"Verdict: both bad\". Then give the reason in one sentence.",
    );
    user(&text)
}

/// The vote of one or two passes (stored votes, or why a pass could not be read):
/// (vote or the reason there is none, the two passes disagreed).
fn combine(
    first: &Result<&'static str, String>,
    swapped: Option<&Result<&'static str, String>>,
) -> (Result<&'static str, String>, bool) {
    match (first, swapped) {
        (Ok(v), None) => (Ok(v), false),
        (Err(e), None) => (Err(e.clone()), false),
        (Ok(a), Some(Ok(b))) if a == b => (Ok(a), false),
        (Ok(_), Some(Ok(_))) => (Ok("tie"), true),
        (first, Some(swapped)) => {
            let mut why = Vec::new();
            if let Err(e) = first {
                why.push(format!("first order: {e}"));
            }
            if let Err(e) = swapped {
                why.push(format!("swapped order: {e}"));
            }
            (Err(why.join("; ")), false)
        }
    }
}

fn rubric_of(row: RubricRow) -> Rubric {
    Rubric {
        version: u32::try_from(row.version).unwrap_or(0),
        is_default: row.text == DEFAULT_RUBRIC,
        text: row.text,
        created_at: row.created_at,
    }
}

fn index_of(idx: i64) -> u64 {
    u64::try_from(idx).unwrap_or(0)
}

impl Engine {
    /// The rubric judges use now: the newest saved one; on first use the default rubric
    /// is saved as version 1.
    pub fn judge_rubric(&self) -> Result<Rubric, EngineError> {
        match self.store.current_rubric()? {
            Some(row) => Ok(rubric_of(row)),
            None => Ok(rubric_of(
                self.store.save_rubric(DEFAULT_RUBRIC, &now_rfc3339())?,
            )),
        }
    }

    /// Rubric `version` as it was saved.
    pub fn judge_rubric_version(&self, version: u32) -> Result<Rubric, EngineError> {
        self.store
            .rubric(i64::from(version))?
            .map(rubric_of)
            .ok_or_else(|| EngineError::NotFound {
                what: "rubric version",
                id: version.to_string(),
            })
    }

    /// Saves `text` as the rubric (a new version when it differs from the newest; ends
    /// trimmed). Empty, over-long or control-character text is refused.
    pub fn save_judge_rubric(&self, text: &str) -> Result<Rubric, EngineError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(EngineError::InvalidInput(
                "rubric: the text is empty; write what makes an answer better".to_string(),
            ));
        }
        let chars = text.chars().count();
        if chars > MAX_RUBRIC_CHARS {
            return Err(EngineError::InvalidInput(format!(
                "rubric: {chars} characters, at most {MAX_RUBRIC_CHARS}"
            )));
        }
        if let Some(c) = text
            .chars()
            .find(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
        {
            return Err(EngineError::InvalidInput(format!(
                "rubric: control character U+{:04X} is not allowed",
                u32::from(c)
            )));
        }
        Ok(rubric_of(self.store.save_rubric(text, &now_rfc3339())?))
    }

    /// Lets a judge vote on an arena's prompts (see the module docs), each answer
    /// generated by [`Engine::chat_target`]. Votes are stored one by one, so a cancel
    /// keeps those made (and is an error with code "cancelled").
    pub fn judge_arena(
        &self,
        spec: &JudgeSpec,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(JudgeEvent),
    ) -> Result<JudgeReport, EngineError> {
        self.judge_arena_via(spec, cancel, on_event, &mut |t, ctx, p, c, ev| {
            self.chat_target(t, ctx, p, c, ev)
        })
    }

    /// [`Engine::judge_arena`], every answer (the candidates' missing ones and the
    /// judge's verdicts) produced by `generate` (the actor queues each as its own
    /// generation).
    pub(crate) fn judge_arena_via(
        &self,
        spec: &JudgeSpec,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(JudgeEvent),
        generate: &mut Answerer<'_>,
    ) -> Result<JudgeReport, EngineError> {
        let arena = self.arena_record(spec.arena_id)?;
        if spec.max_tokens == 0 || spec.max_tokens > MAX_JUDGE_TOKENS {
            return Err(EngineError::InvalidInput(format!(
                "judge: max tokens must be 1 to {MAX_JUDGE_TOKENS}, got {}",
                spec.max_tokens
            )));
        }
        let judge_label = self.target_label(&spec.judge)?;
        if spec.verdict == VerdictMode::Constrained {
            self.check_constrained_judge(&spec.judge)?;
        }
        let judge_json = to_json(&spec.judge)?;
        let rubric = match &spec.rubric {
            Some(text) => self.save_judge_rubric(text)?,
            None => self.judge_rubric()?,
        };
        let rubric_version = i64::from(rubric.version);
        let done_before: HashSet<i64> = self
            .store
            .judge_votes(arena.id)?
            .into_iter()
            .filter(|v| {
                v.judge_json == judge_json
                    && v.rubric_version == rubric_version
                    && v.both_orders == spec.both_orders
                    && v.verdict_mode == spec.verdict.as_str()
            })
            .map(|v| v.idx)
            .collect();
        let items = self.store.arena_items(arena.id)?;
        let todo: Vec<i64> = items
            .iter()
            .filter(|i| spec.scope == JudgeScope::All || i.vote.is_none())
            .filter(|i| spec.redo || !done_before.contains(&i.idx))
            .map(|i| i.idx)
            .collect();
        let mut report = JudgeReport {
            arena_id: arena.id,
            judge_label: judge_label.clone(),
            rubric_version: rubric.version,
            both_orders: spec.both_orders,
            verdict: spec.verdict,
            judged: 0,
            skipped: (items.len() - todo.len()) as u64,
            unparsed: 0,
            order_disagreements: 0,
        };
        let total = todo.len() as u64;
        on_event(JudgeEvent::Started {
            total,
            rubric_version: rubric.version,
        });
        let params = SamplingParams {
            max_tokens: spec.max_tokens,
            temperature: 0.0,
            repetition_penalty: 1.0,
            ..SamplingParams::default()
        };
        for idx in todo {
            if cancel.load(Ordering::SeqCst) {
                return Err(EngineError::Cancelled);
            }
            let index = index_of(idx);
            let mut item = self.arena_item_row(&arena, index)?;
            if item.a_answer.is_none() || item.b_answer.is_none() {
                on_event(JudgeEvent::Answering { index });
                self.arena_item_via(arena.id, index, cancel, &mut |_| {}, generate)?;
                item = self.arena_item_row(&arena, index)?;
            }
            let (Some(a_answer), Some(b_answer)) = (&item.a_answer, &item.b_answer) else {
                return Err(EngineError::Cancelled);
            };
            let context: Vec<ChatMessage> = serde_json::from_str(&item.context_json)
                .map_err(|e| self.corrupt_arena(&arena, &format!("prompt {index}"), e))?;
            let a_first = judge_a_first(arena.seed, index);
            type Pass = (String, Result<&'static str, String>, Option<[f64; 4]>);
            let mut ask = |a_first: bool| -> Result<Pass, EngineError> {
                let (first, second) = if a_first {
                    (a_answer, b_answer)
                } else {
                    (b_answer, a_answer)
                };
                let message = judge_message(&rubric.text, &context, first, second);
                if spec.verdict == VerdictMode::Constrained {
                    let options: Vec<&str> = constrained::VERDICT_OPTIONS
                        .iter()
                        .map(|(t, _)| *t)
                        .collect();
                    let lps =
                        self.target_continuation_logprobs(&spec.judge, &[message], &options)?;
                    let (v, reply) = constrained::constrained_reply(&lps);
                    let by_vote = constrained::by_stored_vote(&lps, a_first);
                    return Ok((reply, Ok(v.stored(a_first)), Some(by_vote)));
                }
                let stats = generate(&spec.judge, &[message], &params, cancel, &mut |_| {})?;
                if stats.finish_reason == FinishReason::Cancelled {
                    return Err(EngineError::Cancelled);
                }
                let vote = parse_verdict(&stats.text).map(|v| v.stored(a_first));
                Ok((stats.text, vote, None))
            };
            let (verdict, first_vote, first_scores) = ask(a_first)?;
            let swapped = if spec.both_orders {
                Some(ask(!a_first)?)
            } else {
                None
            };
            let (mut vote, disagreed) = combine(&first_vote, swapped.as_ref().map(|(_, v, _)| v));
            // A constrained judge in both orders: the vote with the highest log-prob averaged
            // over the two orders (position-balanced), not a tie whenever the orders disagree.
            if let (Some(x), Some((_, _, Some(y)))) = (first_scores, swapped.as_ref()) {
                vote = Ok(constrained::balanced_vote(&x, y));
            }
            let swapped = swapped.map(|(text, _, _)| text);
            report.judged += 1;
            report.order_disagreements += u64::from(disagreed);
            report.unparsed += u64::from(vote.is_err());
            let stored = vote.as_ref().ok().map(|v| v.to_string());
            self.store.put_judge_vote(&JudgeVoteRow {
                arena_id: arena.id,
                idx,
                judge_json: judge_json.clone(),
                judge_label: judge_label.clone(),
                rubric_version,
                both_orders: spec.both_orders,
                verdict_mode: spec.verdict.as_str().to_string(),
                first_a_first: a_first,
                vote: stored.clone(),
                verdict,
                verdict_swapped: swapped,
                error: vote.err(),
                created_at: now_rfc3339(),
            })?;
            on_event(JudgeEvent::Voted {
                index,
                vote: stored,
                done: report.judged,
                total,
            });
        }
        Ok(report)
    }

    /// Every judge vote of an arena, by prompt.
    pub fn arena_judge_votes(&self, arena_id: i64) -> Result<Vec<JudgeVote>, EngineError> {
        let arena = self.arena_record(arena_id)?;
        Ok(self
            .store
            .judge_votes(arena.id)?
            .into_iter()
            .map(|v| JudgeVote {
                index: index_of(v.idx),
                judge_label: v.judge_label,
                rubric_version: u32::try_from(v.rubric_version).unwrap_or(0),
                both_orders: v.both_orders,
                verdict_mode: VerdictMode::parse(&v.verdict_mode).unwrap_or_default(),
                first_a_first: v.first_a_first,
                vote: v.vote,
                verdict: v.verdict,
                verdict_swapped: v.verdict_swapped,
                error: v.error,
                created_at: v.created_at,
            })
            .collect())
    }

    /// The arena's results: win rates of both sides from the human votes, and for each
    /// judge (target, rubric version, order setting) its win rates, its agreement with
    /// the human votes (percent and Cohen's kappa, with intervals) and the combined win
    /// rates (the human vote where there is one, else the judge's) with how many votes
    /// of each kind they hold.
    pub fn arena_results(&self, arena_id: i64) -> Result<ArenaResults, EngineError> {
        let arena = self.arena_record(arena_id)?;
        let items = self.store.arena_items(arena.id)?;
        let human: BTreeMap<i64, &str> = items
            .iter()
            .filter_map(|i| i.vote.as_deref().map(|v| (i.idx, v)))
            .collect();
        type Group = (String, String, i64, bool, String);
        let mut groups: BTreeMap<Group, Vec<JudgeVoteRow>> = BTreeMap::new();
        for v in self.store.judge_votes(arena.id)? {
            groups
                .entry((
                    v.judge_label.clone(),
                    v.judge_json.clone(),
                    v.rubric_version,
                    v.both_orders,
                    v.verdict_mode.clone(),
                ))
                .or_default()
                .push(v);
        }
        let mut judges = Vec::with_capacity(groups.len());
        for ((label, json, rubric_version, both_orders, mode), votes) in groups {
            let judge: ChatTarget = serde_json::from_str(&json)
                .map_err(|e| self.corrupt_arena(&arena, &format!("judge '{label}'"), e))?;
            let parsed: BTreeMap<i64, &str> = votes
                .iter()
                .filter_map(|v| v.vote.as_deref().map(|s| (v.idx, s)))
                .collect();
            let pairs: Vec<(usize, usize)> = human
                .iter()
                .filter_map(|(idx, h)| Some((category(h)?, category(parsed.get(idx)?)?)))
                .collect();
            let mut combined = Vec::new();
            let (mut from_human, mut from_judge) = (0u64, 0u64);
            for item in &items {
                if let Some(h) = human.get(&item.idx) {
                    combined.push(*h);
                    from_human += 1;
                } else if let Some(j) = parsed.get(&item.idx) {
                    combined.push(*j);
                    from_judge += 1;
                }
            }
            judges.push(JudgeStats {
                judge,
                judge_label: label,
                rubric_version: u32::try_from(rubric_version).unwrap_or(0),
                both_orders,
                verdict: VerdictMode::parse(&mode).unwrap_or_default(),
                votes: votes.len() as u64,
                unparsed: (votes.len() - parsed.len()) as u64,
                rates: win_rates_of(parsed.values().copied()),
                agreement: agreement(&pairs),
                combined: win_rates_of(combined),
                combined_human: from_human,
                combined_judge: from_judge,
            });
        }
        Ok(ArenaResults {
            arena: self.arena_summary(&arena)?,
            human: win_rates_of(human.values().copied()),
            judges,
        })
    }
}

// Verdicts scored by log-probability instead of generated (local judges).
mod constrained;

#[cfg(test)]
mod tests;
