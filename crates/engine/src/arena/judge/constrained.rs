//! Constrained verdicts: instead of letting a local judge write a reply, each verdict
//! continuation ([`VERDICT_OPTIONS`]) is scored after the judge prompt (the chat template
//! with its generation prompt, exactly what free generation would continue) by its summed
//! log-probability under the judge model, and the most likely one is the vote. No sampling:
//! one prefill of the prompt into a KV cache, then each option's tokens on top of it.
//! With both orders the vote is position-balanced ([`balanced_vote`]): the verdict whose
//! log-prob averaged over the two orders is highest (a small judge that always prefers
//! "Answer 1" would otherwise make every vote a tie); each pass's log-probs are stored.
//!
//! The figures are those of one uncached `Llama::forward` over prompt and option: a forward
//! of at most `AUTO_QUANTIZED_MAX_ROWS` rows would run on the quantized weights while
//! longer ones run on the f32 copy, so each option is scored together with the last
//! [`RESCORE`] prompt tokens re-run from the cache (their keys and values are the same),
//! which keeps every forward above that size. The tests compare them with an uncached
//! forward (to 1e-4) and with the engine's NLL path `train::evaluate` (its fused LM-head
//! kernel differs by 0.01-0.02 nats on the default model).

use attune_models::linear::AUTO_QUANTIZED_MAX_ROWS;
use attune_protocol::{ChatMessage, ChatTarget};
use candle_core::Tensor;

use super::Verdict;
use crate::chat::{self, Parts};
use crate::error::EngineError;
use crate::templates::{apply_template, record_template};
use crate::{adapted_parts, Engine};

/// The verdicts a constrained judge chooses between, as the start of its reply.
pub(crate) const VERDICT_OPTIONS: [(&str, Verdict); 4] = [
    ("Verdict: 1", Verdict::First),
    ("Verdict: 2", Verdict::Second),
    ("Verdict: tie", Verdict::Tie),
    ("Verdict: both bad", Verdict::BothBad),
];

/// Prompt tokens re-run with each option so that no forward has few enough rows to take
/// the quantized path.
const RESCORE: usize = AUTO_QUANTIZED_MAX_ROWS + 1;

fn model_err(e: impl Into<attune_models::Error>) -> EngineError {
    chat::generation_error(e.into())
}

/// The summed log-probability of each of `continuations` right after `prompt` (token ids,
/// BOS and template included) under `parts`.
pub(crate) fn continuation_logprobs(
    parts: &Parts<'_>,
    prompt: &[u32],
    continuations: &[&str],
) -> Result<Vec<f64>, EngineError> {
    let model = parts.model;
    let dev = model.device();
    let n_prefix = match parts.prefix {
        Some(p) => p.dim(0).map_err(model_err)?,
        None => 0,
    };
    let encoded: Vec<Vec<u32>> = continuations
        .iter()
        .map(|c| parts.tokenizer.encode(c, false).map_err(model_err))
        .collect::<Result<_, _>>()?;
    let longest = encoded.iter().map(Vec::len).max().unwrap_or(0);
    let context = model.config().max_position_embeddings;
    if prompt.is_empty() || n_prefix + prompt.len() + longest > context {
        return Err(EngineError::InvalidInput(format!(
            "judge: the prompt ({} tokens) and a verdict ({longest} tokens) do not fit the \
             judge's context of {context} tokens",
            prompt.len()
        )));
    }
    // Prefill all but the last RESCORE prompt tokens (none if the prompt is shorter).
    let keep = prompt.len().saturating_sub(RESCORE);
    let mut cache = model.new_cache();
    let tail_from = if keep > 0 {
        let head = Tensor::new(&prompt[..keep], dev)
            .and_then(|t| t.unsqueeze(0))
            .map_err(model_err)?;
        match parts.prefix {
            Some(p) => {
                let p = p.unsqueeze(0).map_err(model_err)?;
                model
                    .forward_last_with_prefix(&p, &head, &mut cache)
                    .map_err(model_err)?;
            }
            None => {
                model.forward_last(&head, &mut cache).map_err(model_err)?;
            }
        }
        keep
    } else {
        0
    };
    let cached = cache.len();
    let mut out = Vec::with_capacity(encoded.len());
    for (text, ids) in continuations.iter().zip(&encoded) {
        if ids.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "judge: the verdict {text:?} has no tokens"
            )));
        }
        cache.truncate(cached);
        // The prompt's tail and the option but its last token: row t predicts token t + 1.
        let mut x: Vec<u32> = prompt[tail_from..].to_vec();
        x.extend_from_slice(&ids[..ids.len() - 1]);
        let t = Tensor::new(x.as_slice(), dev)
            .and_then(|t| t.unsqueeze(0))
            .map_err(model_err)?;
        // Without a prefilled head the soft prompt (if any) goes in front here.
        let logits = match (parts.prefix, cached) {
            (Some(p), 0) => {
                let p = p.unsqueeze(0).map_err(model_err)?;
                model
                    .forward_with_prefix(Some(&p), &t, Some(&mut cache))
                    .and_then(|l| Ok(l.narrow(1, n_prefix, x.len())?))
                    .map_err(model_err)?
            }
            _ => model.forward(&t, Some(&mut cache)).map_err(model_err)?,
        };
        let first = prompt.len() - tail_from - 1;
        let rows: Vec<Vec<f32>> = logits
            .squeeze(0)
            .and_then(|l| l.narrow(0, first, ids.len()))
            .and_then(|r| r.to_vec2::<f32>())
            .map_err(model_err)?;
        // log softmax of each row at the option's token, in f64.
        let sum: f64 = rows
            .iter()
            .zip(ids)
            .map(|(row, &id)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                row[id as usize] as f64 - lse
            })
            .sum();
        out.push(sum);
    }
    Ok(out)
}

fn refuse_endpoint() -> EngineError {
    EngineError::InvalidInput(
        "judge: a constrained verdict scores each verdict by the judge model's own \
         log-probabilities, which only a local model, an adapter or a template on a local \
         model gives; an endpoint judges in free text (verdict: free)"
            .to_string(),
    )
}

impl Engine {
    /// The summed log-probability of each of `continuations` as the start of `target`'s
    /// reply to `messages` (the chat template with its generation prompt, a template
    /// target's system prompt, few-shot turns and wrapping applied, as free generation
    /// would see them). Local targets only: an endpoint gives no log-probabilities here.
    pub(crate) fn target_continuation_logprobs(
        &self,
        target: &ChatTarget,
        messages: &[ChatMessage],
        continuations: &[&str],
    ) -> Result<Vec<f64>, EngineError> {
        match target {
            ChatTarget::Base { model_id } => {
                let m = self.model_for(*model_id, &mut |_| {})?;
                let parts = Parts::of(&m);
                let (_, ids) = chat::render_prompt(parts.chat_template, parts.tokenizer, messages)?;
                continuation_logprobs(&parts, &ids, continuations)
            }
            ChatTarget::Adapter { adapter_id } => {
                let row = self
                    .store
                    .get_adapter(*adapter_id)?
                    .ok_or_else(|| EngineError::AdapterNotFound(adapter_id.to_string()))?;
                let m = self.adapted_model_of(&row, &mut |_| {})?;
                let parts = adapted_parts(&m);
                let (_, ids) = chat::render_prompt(parts.chat_template, parts.tokenizer, messages)?;
                continuation_logprobs(&parts, &ids, continuations)
            }
            ChatTarget::Template {
                model_id,
                template_id,
                version,
                values,
                endpoint: None,
            } => {
                let record = self.get_template(*template_id, *version)?;
                let (turns, _) = apply_template(&record_template(&record, values), messages);
                let m = self.model_for(*model_id, &mut |_| {})?;
                let parts = Parts::of(&m);
                let (_, ids) = chat::render_prompt(parts.chat_template, parts.tokenizer, &turns)?;
                continuation_logprobs(&parts, &ids, continuations)
            }
            ChatTarget::Template {
                endpoint: Some(_), ..
            }
            | ChatTarget::Endpoint { .. } => Err(refuse_endpoint()),
        }
    }

    /// Whether `target` can give a constrained verdict; the refusal otherwise.
    pub(crate) fn check_constrained_judge(&self, target: &ChatTarget) -> Result<(), EngineError> {
        match target {
            ChatTarget::Template {
                endpoint: Some(_), ..
            }
            | ChatTarget::Endpoint { .. } => Err(refuse_endpoint()),
            _ => Ok(()),
        }
    }
}

/// The constrained verdict from the options' log-probs (the most likely; the first of
/// equals), and the auditable raw reply: the chosen verdict line, then every option's
/// summed log-prob.
pub(crate) fn constrained_reply(logprobs: &[f64]) -> (Verdict, String) {
    let mut best = 0;
    for (i, lp) in logprobs.iter().enumerate() {
        if *lp > logprobs[best] {
            best = i;
        }
    }
    let listed: Vec<String> = VERDICT_OPTIONS
        .iter()
        .zip(logprobs)
        .map(|((text, _), lp)| format!("{:?} {lp:.4}", text.trim_start_matches("Verdict: ")))
        .collect();
    let (text, verdict) = VERDICT_OPTIONS[best];
    (
        verdict,
        format!(
            "{text}\n(constrained: summed log-probs under the judge: {})",
            listed.join(", ")
        ),
    )
}

/// One pass's option log-probs (in [`VERDICT_OPTIONS`] order: 1, 2, tie, both bad) as the
/// stored votes' scores, in the order a, b, tie, both bad.
pub(crate) fn by_stored_vote(logprobs: &[f64], a_first: bool) -> [f64; 4] {
    let (a, b) = if a_first {
        (logprobs[0], logprobs[1])
    } else {
        (logprobs[1], logprobs[0])
    };
    [a, b, logprobs[2], logprobs[3]]
}

/// The position-balanced vote of two passes in opposite orders: the stored vote whose
/// log-prob, averaged over both orders, is highest. A judge that prefers a position adds the
/// same amount to A and to B, so it cancels out; what remains is its preference between the
/// answers. A and B exactly level (identical answers) is a tie.
pub(crate) fn balanced_vote(x: &[f64; 4], y: &[f64; 4]) -> &'static str {
    let avg: Vec<f64> = x.iter().zip(y).map(|(p, q)| (p + q) / 2.0).collect();
    let mut best = 0;
    for i in 1..4 {
        if avg[i] > avg[best] {
            best = i;
        }
    }
    if best < 2 && (avg[0] - avg[1]).abs() < 1e-9 {
        return "tie";
    }
    crate::arena::stats::CATEGORIES[best]
}
