//! The arena's judge: a model, adapter, template or endpoint model that votes on arena
//! prompts against an editable rubric, its votes kept apart from the human ones, and the
//! statistics that compare the two (agreement, Cohen's kappa, win rates with intervals).

use crate::{ArenaSummary, ArenaTally, ChatTarget};
use serde::{Deserialize, Serialize};

/// The judging rubric at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rubric {
    /// 1 for the first stored rubric; every change adds a version.
    pub version: u32,
    pub text: String,
    /// The text is Attune's default rubric (domain question answering).
    pub is_default: bool,
    pub created_at: String,
}

/// Which prompts a judge votes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JudgeScope {
    /// Only prompts without a human vote: the judge fills the arena.
    Unvoted,
    /// Every prompt (to measure agreement with the human votes).
    All,
}

/// What a judging pass needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeSpec {
    pub arena_id: i64,
    /// Who judges.
    pub judge: ChatTarget,
    /// The rubric text; None uses the stored rubric (the default one if none was saved).
    /// A text that differs from the stored one is saved as a new version first.
    #[serde(default)]
    pub rubric: Option<String>,
    /// Judge each prompt twice, the answers in both orders; when the two verdicts
    /// disagree the vote is a tie (position bias cancels out). With a constrained verdict
    /// the vote is instead the one whose log-prob averaged over both orders is highest
    /// (position-balanced); disagreements are still counted.
    #[serde(default)]
    pub both_orders: bool,
    pub scope: JudgeScope,
    /// The longest verdict, in tokens.
    pub max_tokens: usize,
    /// Judge prompts this judge (same rubric version and order setting) voted on before
    /// again, replacing those votes; otherwise they are skipped.
    #[serde(default)]
    pub redo: bool,
    /// Free text (any target) or a constrained verdict scored by log-probability (local
    /// targets only).
    #[serde(default)]
    pub verdict: VerdictMode,
}

/// Streamed while a judge works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JudgeEvent {
    /// The judging pass has `total` prompts to judge.
    Started { total: u64, rubric_version: u32 },
    /// Prompt `index`'s answers are being generated (they were not stored yet).
    Answering { index: u64 },
    /// The judge voted on prompt `index` (`vote`: "a", "b", "tie", "both_bad", or None
    /// when the verdict could not be parsed); `done` of `total` are finished.
    Voted {
        index: u64,
        vote: Option<String>,
        done: u64,
        total: u64,
    },
}

/// A judge's vote on one prompt, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JudgeVote {
    pub index: u64,
    pub judge_label: String,
    pub rubric_version: u32,
    pub both_orders: bool,
    #[serde(default)]
    pub verdict_mode: VerdictMode,
    /// The judge saw candidate A as "Answer 1" in its first (or only) pass.
    pub first_a_first: bool,
    /// "a", "b", "tie", "both_bad"; None when the verdict could not be parsed.
    pub vote: Option<String>,
    /// The judge's raw replies: the first pass, and the swapped one with both orders.
    pub verdict: String,
    pub verdict_swapped: Option<String>,
    /// Why there is no vote.
    pub error: Option<String>,
    pub created_at: String,
}

/// What a judging pass did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeReport {
    pub arena_id: i64,
    pub judge_label: String,
    pub rubric_version: u32,
    pub both_orders: bool,
    #[serde(default)]
    pub verdict: VerdictMode,
    /// Prompts judged now.
    pub judged: u64,
    /// Prompts skipped: a human vote exists (scope `unvoted`) or this judge voted before.
    pub skipped: u64,
    /// Verdicts judged now that could not be parsed (recorded without a vote).
    pub unparsed: u64,
    /// With both orders: prompts whose two verdicts disagreed (counted as ties).
    pub order_disagreements: u64,
}

/// A proportion with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// Win rates of both sides from one set of votes (a tie counts half a win for each;
/// "both bad" is left out), each with its 95% Wilson score interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WinRates {
    pub tally: ArenaTally,
    /// None before any vote that counts.
    pub a: Option<Estimate>,
    pub b: Option<Estimate>,
}

/// How well a judge agrees with the human votes on the prompts both voted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Prompts with a human vote and a parsed judge vote.
    pub n: u64,
    /// Of them, the same vote.
    pub agreed: u64,
    /// agreed / n with its 95% Wilson interval; None when n = 0.
    pub percent: Option<Estimate>,
    /// Cohen's kappa over the four categories with its 95% interval; None when n = 0
    /// or chance agreement is 1 (both voted one category throughout).
    pub kappa: Option<Estimate>,
    /// The large-sample standard error of kappa behind the interval.
    pub kappa_se: Option<f64>,
    /// How the interval was computed, in words.
    pub method: String,
    /// Counts: rows the human vote, columns the judge's, in the order a, b, tie, both_bad.
    pub table: [[u64; 4]; 4],
}

/// One judge's figures in an arena.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeStats {
    pub judge: ChatTarget,
    pub judge_label: String,
    pub rubric_version: u32,
    pub both_orders: bool,
    #[serde(default)]
    pub verdict: VerdictMode,
    /// Prompts it voted on, parsed or not.
    pub votes: u64,
    /// Of them, verdicts that could not be parsed.
    pub unparsed: u64,
    /// Its parsed votes alone.
    pub rates: WinRates,
    pub agreement: Agreement,
    /// One vote per prompt: the human's where there is one, else this judge's.
    pub combined: WinRates,
    /// How many of the combined votes are human and how many the judge's.
    pub combined_human: u64,
    pub combined_judge: u64,
}

/// An arena's results: the human votes, and each judge beside them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArenaResults {
    pub arena: ArenaSummary,
    pub human: WinRates,
    pub judges: Vec<JudgeStats>,
}

/// How a judge's verdict is obtained.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum VerdictMode {
    /// The judge writes a reply, read for a `Verdict: …` line (any target).
    #[default]
    Free,
    /// No generation: each verdict continuation (`Verdict: 1`, `Verdict: 2`,
    /// `Verdict: tie`, `Verdict: both bad`) is scored after the judge prompt by its summed
    /// log-probability under the judge model (one forward pass), and the most likely one is
    /// the vote. Local models, adapters and templates on a local model only.
    Constrained,
}

impl VerdictMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictMode::Free => "free",
            VerdictMode::Constrained => "constrained",
        }
    }

    pub fn parse(s: &str) -> Option<VerdictMode> {
        match s {
            "free" => Some(VerdictMode::Free),
            "constrained" => Some(VerdictMode::Constrained),
            _ => None,
        }
    }
}

/// One judge of an arena, identified as the arena's results group its votes: the target,
/// the rubric version, the order setting and the verdict mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeKey {
    pub judge: ChatTarget,
    pub rubric_version: u32,
    pub both_orders: bool,
    #[serde(default)]
    pub verdict: VerdictMode,
}

/// Whose votes a preference set is made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VoteSource {
    /// The human votes only.
    Human,
    /// One judge's votes only.
    Judge { judge: JudgeKey },
    /// Per prompt the human's vote where there is one, else the judge's.
    Combined { judge: JudgeKey },
}

impl VoteSource {
    /// "human", "judge" or "combined".
    pub fn kind(&self) -> &'static str {
        match self {
            VoteSource::Human => "human",
            VoteSource::Judge { .. } => "judge",
            VoteSource::Combined { .. } => "combined",
        }
    }

    pub fn judge(&self) -> Option<&JudgeKey> {
        match self {
            VoteSource::Human => None,
            VoteSource::Judge { judge } | VoteSource::Combined { judge } => Some(judge),
        }
    }
}
