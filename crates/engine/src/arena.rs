//! The blind A/B arena: two targets answer the same prompts, the user votes on answers
//! shown as "left" and "right" without knowing which is which, and the tally says how
//! often A wins, with a 95% Wilson score interval.
//!
//! Which candidate is shown on the left is fixed per prompt at creation, from
//! SplitMix64 seeded with `seed + index` (the generator the dataset split uses). Answers
//! are generated on first view and stored; votes are stored as "a" / "b" / "tie" /
//! "both_bad", so changing a vote is one update. Labels are stored at creation, so an
//! arena still reads correctly after a model, adapter or template it used is removed.
//! Decisive votes export as preference pairs (JSONL: prompt, chosen, rejected).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Produces one answer: who, the conversation, the settings, the cancel flag and where
/// the streamed events go.
pub(crate) type Answerer<'a> = dyn FnMut(
        &ChatTarget,
        &[ChatMessage],
        &SamplingParams,
        &AtomicBool,
        &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError>
    + 'a;

use attune_protocol::{
    ArenaDetail, ArenaEvent, ArenaItem, ArenaPrompts, ArenaRow, ArenaSpec, ArenaSummary,
    ArenaTally, ChatEvent, ChatMessage, ChatTarget, FinishReason, GenerationStats, SamplingParams,
    Vote,
};

use crate::clock::now_rfc3339;
use crate::datasets::{Sample, SplitMix64};
use crate::error::EngineError;
use crate::store::{ArenaItemRow, ArenaRecord, NewArena};
use crate::Engine;

/// Most prompts in one arena.
pub const MAX_ARENA_PROMPTS: usize = 500;
/// Longest typed prompt, in characters.
const MAX_PROMPT_CHARS: usize = 20_000;
/// Longest arena name, in characters.
const MAX_NAME_CHARS: usize = 200;
/// The 97.5% quantile of the standard normal distribution (two-sided 95%).
const Z95: f64 = 1.959964;

/// Whether candidate A is shown on the left for prompt `index`.
pub(crate) fn left_is_a(seed: u64, index: u64) -> bool {
    SplitMix64(seed.wrapping_add(index)).next_u64() >> 63 == 0
}

/// The Wilson score interval of a proportion `p` observed over `n` trials, at `z`.
pub(crate) fn wilson(p: f64, n: f64, z: f64) -> (f64, f64) {
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// The tally from A's side: a tie counts half a win; "both bad" is left out of the rate.
pub(crate) fn tally(a_wins: u64, b_wins: u64, ties: u64, both_bad: u64) -> ArenaTally {
    let n = a_wins + b_wins + ties;
    let (a_win_rate, ci_low, ci_high) = if n == 0 {
        (None, None, None)
    } else {
        let n = n as f64;
        let p = (a_wins as f64 + ties as f64 / 2.0) / n;
        let (lo, hi) = wilson(p, n, Z95);
        (Some(p), Some(lo), Some(hi))
    };
    ArenaTally {
        a_wins,
        b_wins,
        ties,
        both_bad,
        a_win_rate,
        ci_low,
        ci_high,
    }
}

/// The stored vote ("a", "b", "tie", "both_bad") for a vote about the sides as shown.
fn stored_vote(vote: Vote, left_is_a: bool) -> &'static str {
    match (vote, left_is_a) {
        (Vote::Left, true) | (Vote::Right, false) => "a",
        (Vote::Left, false) | (Vote::Right, true) => "b",
        (Vote::Tie, _) => "tie",
        (Vote::BothBad, _) => "both_bad",
    }
}

/// The vote about the sides as shown, from the stored one.
fn shown_vote(stored: &str, left_is_a: bool) -> Option<Vote> {
    match (stored, left_is_a) {
        ("a", true) | ("b", false) => Some(Vote::Left),
        ("a", false) | ("b", true) => Some(Vote::Right),
        ("tie", _) => Some(Vote::Tie),
        ("both_bad", _) => Some(Vote::BothBad),
        _ => None,
    }
}

fn user(content: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: content.to_string(),
    }
}

/// A dataset row as an arena prompt: (the last user message, the conversation up to and
/// including it). A text row is one user message. None for a chat row with no user turn.
fn row_prompt(sample: &Sample) -> Option<(String, Vec<ChatMessage>)> {
    match sample {
        Sample::Chat(messages) => {
            let last = messages.iter().rposition(|m| m.role == "user")?;
            Some((messages[last].content.clone(), messages[..=last].to_vec()))
        }
        Sample::Text(text) => Some((text.clone(), vec![user(text)])),
    }
}

impl Engine {
    fn arena_not_found(id: i64) -> EngineError {
        EngineError::NotFound {
            what: "arena",
            id: id.to_string(),
        }
    }

    fn arena_record(&self, id: i64) -> Result<ArenaRecord, EngineError> {
        self.store
            .get_arena(id)?
            .ok_or_else(|| Self::arena_not_found(id))
    }

    fn arena_item_row(&self, a: &ArenaRecord, index: u64) -> Result<ArenaItemRow, EngineError> {
        let idx = i64::try_from(index).unwrap_or(i64::MAX);
        self.store.arena_item(a.id, idx)?.ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "arena '{}' has no prompt {index} (it has {}, numbered from 0)",
                a.name, a.prompts
            ))
        })
    }

    fn corrupt_arena(&self, a: &ArenaRecord, what: &str, e: serde_json::Error) -> EngineError {
        EngineError::db(
            self.store.path(),
            format!("arena '{}' (id {}): unreadable {what}: {e}", a.name, a.id),
        )
    }

    fn arena_summary(&self, a: &ArenaRecord) -> Result<ArenaSummary, EngineError> {
        let target = |json: &str, side: &str| {
            serde_json::from_str::<ChatTarget>(json)
                .map_err(|e| self.corrupt_arena(a, &format!("candidate {side}"), e))
        };
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let t = tally(
            count(a.a_wins),
            count(a.b_wins),
            count(a.ties),
            count(a.both_bad),
        );
        Ok(ArenaSummary {
            id: a.id,
            name: a.name.clone(),
            a: target(&a.a_json, "A")?,
            b: target(&a.b_json, "B")?,
            a_label: a.a_label.clone(),
            b_label: a.b_label.clone(),
            prompts: count(a.prompts),
            votes: t.a_wins + t.b_wins + t.ties + t.both_bad,
            tally: t,
            created_at: a.created_at.clone(),
        })
    }

    fn shown_item(a: &ArenaRecord, item: &ArenaItemRow) -> ArenaItem {
        let (left, right) = if item.left_is_a {
            (&item.a_answer, &item.b_answer)
        } else {
            (&item.b_answer, &item.a_answer)
        };
        ArenaItem {
            arena_id: a.id,
            index: u64::try_from(item.idx).unwrap_or(0),
            prompt: item.prompt.clone(),
            left: left.clone().unwrap_or_default(),
            right: right.clone().unwrap_or_default(),
            vote: item
                .vote
                .as_deref()
                .and_then(|v| shown_vote(v, item.left_is_a)),
        }
    }

    /// The prompts of an arena spec: (prompt shown, context), validated.
    fn arena_prompts(
        &self,
        prompts: &ArenaPrompts,
    ) -> Result<Vec<(String, Vec<ChatMessage>)>, EngineError> {
        match prompts {
            ArenaPrompts::Dataset {
                dataset_id,
                split,
                limit,
            } => {
                let want = limit.unwrap_or(MAX_ARENA_PROMPTS);
                if want == 0 || want > MAX_ARENA_PROMPTS {
                    return Err(EngineError::InvalidInput(format!(
                        "arena prompts: the limit must be 1 to {MAX_ARENA_PROMPTS}, got {want}"
                    )));
                }
                let out: Vec<_> = self
                    .dataset_rows(*dataset_id, *split)?
                    .iter()
                    .filter_map(|r| row_prompt(&r.sample))
                    .take(want)
                    .collect();
                if out.is_empty() {
                    return Err(EngineError::InvalidInput(format!(
                        "arena prompts: dataset id {dataset_id} has no rows with a user turn in \
                         its {} split",
                        split.as_str()
                    )));
                }
                Ok(out)
            }
            ArenaPrompts::Typed { prompts } => {
                let out: Vec<_> = prompts
                    .iter()
                    .map(|p| p.trim())
                    .filter(|p| !p.is_empty())
                    .map(|p| (p.to_string(), vec![user(p)]))
                    .collect();
                if out.is_empty() {
                    return Err(EngineError::InvalidInput(
                        "arena prompts: type at least one prompt".to_string(),
                    ));
                }
                if out.len() > MAX_ARENA_PROMPTS {
                    return Err(EngineError::InvalidInput(format!(
                        "arena prompts: {} prompts, at most {MAX_ARENA_PROMPTS}",
                        out.len()
                    )));
                }
                if let Some((i, _)) = out
                    .iter()
                    .enumerate()
                    .find(|(_, (p, _))| p.chars().count() > MAX_PROMPT_CHARS)
                {
                    return Err(EngineError::InvalidInput(format!(
                        "arena prompt {}: longer than {MAX_PROMPT_CHARS} characters",
                        i + 1
                    )));
                }
                Ok(out)
            }
        }
    }

    /// Creates an arena: both targets must exist and differ; prompts come from a dataset
    /// split (each row's conversation up to its last user turn) or are typed (blank ones
    /// are dropped), 1 to 500 of them. The default name is "<A> vs <B> <date>".
    pub fn create_arena(&self, spec: &ArenaSpec) -> Result<ArenaSummary, EngineError> {
        if spec.a == spec.b {
            return Err(EngineError::InvalidInput(
                "arena: candidates A and B are the same; choose two different targets".to_string(),
            ));
        }
        let a_label = self.target_label(&spec.a)?;
        let b_label = self.target_label(&spec.b)?;
        let prompts = self.arena_prompts(&spec.prompts)?;
        let now = now_rfc3339();
        let name = match spec.name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("{a_label} vs {b_label} {}", &now[..10.min(now.len())]),
        };
        if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(EngineError::InvalidInput(format!(
                "arena name '{name}': at most {MAX_NAME_CHARS} characters, no control characters"
            )));
        }
        let mut items = Vec::with_capacity(prompts.len());
        for (i, (prompt, context)) in prompts.into_iter().enumerate() {
            items.push((prompt, to_json(&context)?, left_is_a(spec.seed, i as u64)));
        }
        let record = self.store.insert_arena(&NewArena {
            name,
            a_json: to_json(&spec.a)?,
            b_json: to_json(&spec.b)?,
            a_label,
            b_label,
            params_json: to_json(&spec.params)?,
            seed: spec.seed,
            created_at: now,
            items,
        })?;
        self.arena_summary(&record)
    }

    /// Every arena, newest first.
    pub fn list_arenas(&self) -> Result<Vec<ArenaSummary>, EngineError> {
        self.store
            .list_arenas()?
            .iter()
            .map(|a| self.arena_summary(a))
            .collect()
    }

    /// Prompt `index` of an arena with both answers, sides as shown. Answers not stored
    /// yet are generated (left side first, streamed as [`ArenaEvent`]s) with the arena's
    /// sampling settings and stored together; a cancelled generation stores nothing and
    /// is an error with code "cancelled".
    pub fn arena_item(
        &self,
        arena_id: i64,
        index: u64,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ArenaEvent),
    ) -> Result<ArenaItem, EngineError> {
        self.arena_item_via(
            arena_id,
            index,
            cancel,
            on_event,
            &mut |t, ctx, p, c, ev| self.chat_target(t, ctx, p, c, ev),
        )
    }

    /// [`Engine::arena_item`], with each side's answer produced by `answer` (the actor
    /// queues each side as its own generation, so a remote side never holds the local
    /// model's turn).
    pub(crate) fn arena_item_via(
        &self,
        arena_id: i64,
        index: u64,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ArenaEvent),
        generate: &mut Answerer<'_>,
    ) -> Result<ArenaItem, EngineError> {
        let a = self.arena_record(arena_id)?;
        let mut item = self.arena_item_row(&a, index)?;
        if item.a_answer.is_some() && item.b_answer.is_some() {
            return Ok(Self::shown_item(&a, &item));
        }
        let summary = self.arena_summary(&a)?;
        let params: SamplingParams = serde_json::from_str(&a.params_json)
            .map_err(|e| self.corrupt_arena(&a, "sampling settings", e))?;
        let context: Vec<ChatMessage> = serde_json::from_str(&item.context_json)
            .map_err(|e| self.corrupt_arena(&a, &format!("prompt {index}"), e))?;
        let sides = if item.left_is_a {
            [("left", true), ("right", false)]
        } else {
            [("left", false), ("right", true)]
        };
        for (side, is_a) in sides {
            let (target, answer) = if is_a {
                (&summary.a, &mut item.a_answer)
            } else {
                (&summary.b, &mut item.b_answer)
            };
            if answer.is_some() {
                continue;
            }
            if cancel.load(Ordering::SeqCst) {
                return Err(EngineError::Cancelled);
            }
            let mut forward = |ev: ChatEvent| match ev {
                ChatEvent::Loading => on_event(ArenaEvent::Loading {
                    side: side.to_string(),
                }),
                ChatEvent::Token { text } => on_event(ArenaEvent::Token {
                    side: side.to_string(),
                    text,
                }),
                ChatEvent::Queued { .. } | ChatEvent::Retrying { .. } | ChatEvent::Done { .. } => {}
            };
            // Errors keep their code (a removed target is "not_found") and name the target.
            let stats = generate(target, &context, &params, cancel, &mut forward)?;
            if stats.finish_reason == FinishReason::Cancelled {
                return Err(EngineError::Cancelled);
            }
            *answer = Some(stats.text);
        }
        let (Some(a_answer), Some(b_answer)) = (&item.a_answer, &item.b_answer) else {
            return Err(EngineError::Cancelled);
        };
        self.store
            .set_arena_answers(a.id, item.idx, a_answer, b_answer)?;
        Ok(Self::shown_item(&a, &item))
    }

    /// Records (or changes) the vote on prompt `index`, about the sides as shown; only
    /// once both answers exist. Returns the arena with its new tally.
    pub fn arena_vote(
        &self,
        arena_id: i64,
        index: u64,
        vote: Vote,
    ) -> Result<ArenaSummary, EngineError> {
        let a = self.arena_record(arena_id)?;
        let item = self.arena_item_row(&a, index)?;
        let stored = stored_vote(vote, item.left_is_a);
        if !self
            .store
            .set_arena_vote(a.id, item.idx, stored, &now_rfc3339())?
        {
            return Err(EngineError::InvalidInput(format!(
                "arena '{}', prompt {index}: both answers must be generated before voting",
                a.name
            )));
        }
        self.arena_summary(&self.arena_record(arena_id)?)
    }

    /// The arena with every prompt's outcome, sides revealed.
    pub fn arena_detail(&self, arena_id: i64) -> Result<ArenaDetail, EngineError> {
        let a = self.arena_record(arena_id)?;
        let rows = self
            .store
            .arena_items(a.id)?
            .into_iter()
            .map(|i| ArenaRow {
                index: u64::try_from(i.idx).unwrap_or(0),
                prompt: i.prompt,
                a_answer: i.a_answer,
                b_answer: i.b_answer,
                winner: i.vote,
            })
            .collect();
        Ok(ArenaDetail {
            arena: self.arena_summary(&a)?,
            rows,
        })
    }

    /// Removes an arena and its answers and votes.
    pub fn remove_arena(&self, arena_id: i64) -> Result<(), EngineError> {
        if !self.store.delete_arena(arena_id)? {
            return Err(Self::arena_not_found(arena_id));
        }
        Ok(())
    }

    /// Writes every decisive vote (A or B won) as a preference pair, one JSON object a
    /// line: `{"prompt": [messages], "chosen", "rejected", "chosen_model",
    /// "rejected_model"}`; ties and "both bad" are skipped. Written to a temporary file
    /// beside `path` and renamed, so `path` is never half-written. Returns the pair count.
    pub fn export_preferences(&self, arena_id: i64, path: &Path) -> Result<u64, EngineError> {
        let a = self.arena_record(arena_id)?;
        let mut out = String::new();
        let mut pairs = 0u64;
        for item in self.store.arena_items(a.id)? {
            let (Some(a_answer), Some(b_answer)) = (&item.a_answer, &item.b_answer) else {
                continue;
            };
            let (chosen, rejected, chosen_model, rejected_model) = match item.vote.as_deref() {
                Some("a") => (a_answer, b_answer, &a.a_label, &a.b_label),
                Some("b") => (b_answer, a_answer, &a.b_label, &a.a_label),
                _ => continue,
            };
            let context: Vec<ChatMessage> = serde_json::from_str(&item.context_json)
                .map_err(|e| self.corrupt_arena(&a, &format!("prompt {}", item.idx), e))?;
            let line = serde_json::json!({
                "prompt": context,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_model": chosen_model,
                "rejected_model": rejected_model,
            });
            out.push_str(&line.to_string());
            out.push('\n');
            pairs += 1;
        }
        if pairs == 0 {
            return Err(EngineError::InvalidInput(format!(
                "arena '{}' has no decisive votes to export yet (ties and 'both bad' are \
                 skipped); nothing was written to {}",
                a.name,
                path.display()
            )));
        }
        write_atomically(path, out.as_bytes())?;
        Ok(pairs)
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and links it in as `path`. Never
/// replaces an existing file: the link fails if `path` exists (checked atomically by the file
/// system, so a file created meanwhile is not clobbered either).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    let fail = |source: std::io::Error| EngineError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(EngineError::InvalidInput(format!(
                "{} already exists; Attune never replaces a file: choose another name",
                path.display()
            )))
        }
        Err(e) => Err(fail(e)),
    }
}

/// JSON for the arena's stored columns.
fn to_json<T: serde::Serialize>(v: &T) -> Result<String, EngineError> {
    serde_json::to_string(v)
        .map_err(|e| EngineError::InvalidInput(format!("arena: cannot store a value: {e}")))
}

// The judge beside the human voter, and the statistics comparing them (issue 17).
mod judge;
mod stats;
pub use judge::{DEFAULT_RUBRIC, MAX_JUDGE_TOKENS, MAX_RUBRIC_CHARS};

#[cfg(test)]
mod tests;
