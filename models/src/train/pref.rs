//! Preference training on chosen/rejected pairs: DPO (Rafailov et al. 2023, "Direct Preference
//! Optimization") with TRL's `sigmoid`, `hinge` and `ipo` losses, and the reference-free ORPO
//! (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model").
//!
//! Follows TRL 1.16's `DPOTrainer` (checked by `models/tests/pref_parity.rs` against figures
//! from `scripts/reference_dpo.py`):
//! - a pair is tokenized as TRL does: the prompt alone (chat: with the generation prompt) and the
//!   prompt followed by each answer; the answer starts where the prompt's tokens and the
//!   prompt+answer's tokens first differ; a plain-text answer gets the EOS token appended;
//! - a sequence's log-probability is the sum over its answer (completion) tokens only;
//! - the reference of a LoRA run is the same base with the adapter switched off (no second copy
//!   of the weights); of a soft-prompt run, the base without the prefix; of full fine-tuning, a
//!   frozen copy the caller loads ([`Reference::Copy`]). Its log-probs are computed once per pair
//!   and kept (the reference never changes);
//! - the reported figures are TRL's: `rewards/chosen` = beta (log pi - log ref) of the chosen
//!   answer, the margin, the accuracy (chosen reward strictly above rejected), the policy's
//!   summed log-probs.
//!
//! ORPO follows TRL's `ORPOTrainer` (`trl.experimental.orpo`): the NLL of the chosen sequences
//! (mean over all their tokens, the prompt's included, as TRL's labels are the input ids) minus
//! beta times the mean log-sigmoid of the log odds ratio of the answers' per-token average
//! log-probs; its rewards are beta times those averages. (TRL's ORPO tokenization also appends an
//! EOS token after the chat template's end of turn; Attune's pairs keep DPO's tokenization.)
//!
//! The loss is a function of the per-token NLLs, which the fused LM-head op gives as a vector:
//! the loss and its derivative by each sequence's log-prob are computed in f64 on the host, and
//! the backward pass runs once through `sum_t g_t nll_t` with those derivatives as the weights.

use std::collections::HashMap;

use candle_core::Tensor;

use super::{
    batch_order, collate, token_nll, Batch, Example, Method, StepMetrics, TrainConfig, Trainable,
    Trainer,
};
use crate::chat_template::{ChatTemplate, Message};
use crate::kernels;
use crate::llama::Llama;
use crate::tokenizer::Tok;
use crate::{Error, Result};

/// DPO's loss on `z = beta * ((log pi_c - log ref_c) - (log pi_r - log ref_r))`, TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// `-log sigmoid(z)` (the paper's loss).
    #[default]
    Sigmoid,
    /// `max(0, 1 - z)` (SLiC).
    Hinge,
    /// IPO (Azar et al. 2023) on per-token averages: `(delta / n - 1 / (2 beta))^2`.
    Ipo,
}

impl DpoLoss {
    pub fn name(&self) -> &'static str {
        match self {
            DpoLoss::Sigmoid => "sigmoid",
            DpoLoss::Hinge => "hinge",
            DpoLoss::Ipo => "ipo",
        }
    }

    pub fn parse(s: &str) -> Option<DpoLoss> {
        match s {
            "sigmoid" => Some(DpoLoss::Sigmoid),
            "hinge" => Some(DpoLoss::Hinge),
            "ipo" => Some(DpoLoss::Ipo),
            _ => None,
        }
    }
}

/// The preference objective.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "objective", rename_all = "snake_case")]
pub enum PrefObjective {
    /// DPO against a reference model; `beta` is the KL strength (TRL's default 0.1).
    Dpo { beta: f64, loss: DpoLoss },
    /// ORPO, reference-free; `beta` is the odds-ratio weight (TRL's default 0.1).
    Orpo { beta: f64 },
}

impl PrefObjective {
    pub fn beta(&self) -> f64 {
        match *self {
            PrefObjective::Dpo { beta, .. } | PrefObjective::Orpo { beta } => beta,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            PrefObjective::Dpo { .. } => "dpo",
            PrefObjective::Orpo { .. } => "orpo",
        }
    }

    pub fn needs_reference(&self) -> bool {
        matches!(self, PrefObjective::Dpo { .. })
    }

    fn check(&self) -> Result<()> {
        let beta = self.beta();
        if !(beta.is_finite() && beta > 0.0) {
            return Err(Error::InvalidParams(format!(
                "{} beta {beta} must be a positive number",
                self.name()
            )));
        }
        Ok(())
    }
}

/// One tokenized preference pair: prompt + chosen answer and prompt + rejected answer, each with
/// its answer tokens as the targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefPair {
    pub chosen: Example,
    pub rejected: Example,
    /// Prompt tokens (shared by both).
    pub prompt_len: usize,
}

/// One side of a preference row as TRL reads it: a plain string or a list of chat messages.
#[derive(Debug, Clone, PartialEq)]
pub enum PrefText {
    Text(String),
    Chat(Vec<Message>),
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Builds the pair from the token ids of the prompt and of prompt+answer, as TRL's
/// `tokenize_fn` and `DataCollatorForPreference` do: the answer starts where the prompt's ids
/// and both full sequences' ids stop agreeing; sequences are cut to `max_len` from the end
/// (`keep_start`). `None` when the prompt alone fills `max_len` (TRL drops such rows).
fn pair_from_ids(
    prompt: &[u32],
    with_chosen: &[u32],
    with_rejected: &[u32],
    max_len: usize,
) -> Option<PrefPair> {
    let p = common_prefix(prompt, with_chosen).min(common_prefix(prompt, with_rejected));
    if p >= max_len {
        return None;
    }
    let side = |ids: &[u32]| {
        let full_len = ids.len();
        let n = full_len.min(max_len);
        Example {
            ids: ids[..n].to_vec(),
            targets: (0..n).map(|t| t >= p).collect(),
            full_len,
            truncated: full_len > max_len,
        }
    };
    Some(PrefPair {
        chosen: side(with_chosen),
        rejected: side(with_rejected),
        prompt_len: p,
    })
}

/// Tokenizes one preference row as TRL's `DPOTrainer` does. Chat rows: the prompt's messages
/// rendered with the generation prompt, and prompt + answer messages rendered whole, through the
/// model's chat template (no special tokens added: the template writes them). Plain rows: the
/// tokenizer's own special tokens, and the EOS token appended to an answer that lacks it.
/// `Ok(None)` when the prompt alone fills `max_len`.
pub fn render_pair(
    tok: &Tok,
    tmpl: Option<&ChatTemplate>,
    prompt: &PrefText,
    chosen: &PrefText,
    rejected: &PrefText,
    max_len: usize,
) -> Result<Option<PrefPair>> {
    if max_len < 2 {
        return Err(Error::InvalidParams(format!(
            "max length {max_len} is too short for training (at least 2 tokens)"
        )));
    }
    match (prompt, chosen, rejected) {
        (PrefText::Chat(p), PrefText::Chat(c), PrefText::Chat(r)) => {
            let tmpl = tmpl.ok_or_else(|| {
                Error::InvalidParams(
                    "chat-message preference rows need a model with a chat template".into(),
                )
            })?;
            if c.is_empty() || r.is_empty() {
                return Err(Error::InvalidParams(
                    "a preference row's chosen and rejected answers need at least one message"
                        .into(),
                ));
            }
            let full = |answer: &[Message]| -> Result<Vec<u32>> {
                let mut all = p.clone();
                all.extend_from_slice(answer);
                tok.encode(&tmpl.render(&all, false)?, false)
            };
            let prompt_ids = tok.encode(&tmpl.render(p, true)?, false)?;
            Ok(pair_from_ids(&prompt_ids, &full(c)?, &full(r)?, max_len))
        }
        (PrefText::Text(p), PrefText::Text(c), PrefText::Text(r)) => {
            let eos = tok.eos_token().ok_or_else(|| {
                Error::InvalidParams("the tokenizer has no EOS token to end a plain answer".into())
            })?;
            let with_eos = |s: &str| match s.ends_with(eos) {
                true => s.to_string(),
                false => format!("{s}{eos}"),
            };
            let prompt_ids = tok.encode(p, true)?;
            let pc = tok.encode(&format!("{p}{}", with_eos(c)), true)?;
            let pr = tok.encode(&format!("{p}{}", with_eos(r)), true)?;
            Ok(pair_from_ids(&prompt_ids, &pc, &pr, max_len))
        }
        _ => Err(Error::InvalidParams(
            "a preference row's prompt, chosen and rejected must all be strings or all be \
             message lists"
                .into(),
        )),
    }
}

/// What serves as the reference model of DPO.
pub enum Reference {
    /// The model being trained with its adapter switched off (LoRA: the branches detached for
    /// the reference pass; soft prompts: no prefix). No second copy of the weights.
    AdapterOff,
    /// A frozen copy of the starting model (full fine-tuning).
    Copy(Box<Llama>),
    /// None: a reference-free objective (ORPO).
    None,
}

/// What one preference step measured, besides the loss (means over the step's pairs, TRL's
/// metrics).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrefFigures {
    /// beta (log pi - log ref) of the chosen answers (ORPO: beta times the mean token log-prob).
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    /// `rewards_chosen - rewards_rejected`.
    pub margin: f64,
    /// Fraction of pairs whose chosen reward is strictly above the rejected one.
    pub accuracy: f64,
    /// Summed log-prob of the answer tokens under the policy.
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    pub pairs: usize,
}

/// A [`Trainer`]'s preference side: the objective, the pairs, the reference and its
/// log-probs.
pub struct PrefState {
    pub objective: PrefObjective,
    reference: Reference,
    pairs: Vec<PrefPair>,
    /// Reference log-probs (chosen, rejected) by pair index.
    ref_logps: HashMap<usize, (f64, f64)>,
}

impl PrefState {
    pub fn pairs(&self) -> &[PrefPair] {
        &self.pairs
    }
}

/// Per-sequence sums over the scored tokens, in `collate`'s row order.
fn seq_of_rows(examples: &[&Example]) -> Vec<usize> {
    let mut out = Vec::new();
    for (s, e) in examples.iter().enumerate() {
        let n = e
            .targets
            .iter()
            .enumerate()
            .filter(|&(pos, &t)| t && pos > 0)
            .count();
        out.extend(std::iter::repeat_n(s, n));
    }
    out
}

/// For each scored token of `scored` (in [`seq_of_rows`]' order), whether `answers` (the same
/// sequences) score it too.
fn answer_rows(scored: &[&Example], answers: &[&Example]) -> Vec<bool> {
    let mut out = Vec::new();
    for (s, a) in scored.iter().zip(answers) {
        for (pos, (&t, &ta)) in s.targets.iter().zip(&a.targets).enumerate() {
            if t && pos > 0 {
                out.push(ta);
            }
        }
    }
    out
}

/// `values` where `keep`, else 0.
fn masked(values: &[f32], keep: &[bool]) -> Vec<f32> {
    values
        .iter()
        .zip(keep)
        .map(|(&v, &k)| if k { v } else { 0.0 })
        .collect()
}

fn sums(values: &[f32], seq: &[usize], n_seq: usize) -> Vec<f64> {
    let mut s = vec![0f64; n_seq];
    for (&v, &i) in values.iter().zip(seq) {
        s[i] += v as f64;
    }
    s
}

fn log_sigmoid(x: f64) -> f64 {
    // -softplus(-x), stable both ways.
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(1 - e^x)` for `x < 0`.
fn log1mexp(x: f64) -> f64 {
    (-x.exp_m1()).ln()
}

/// One pair's loss and its derivatives by the chosen and rejected summed log-probs, with the
/// reward figures: (loss, dL/dlogp_c, dL/dlogp_r, reward_c, reward_r).
#[allow(clippy::too_many_arguments)]
fn pair_loss(
    obj: &PrefObjective,
    pc: f64,
    pr: f64,
    rc: f64,
    rr: f64,
    nc: usize,
    nr: usize,
) -> (f64, f64, f64, f64, f64) {
    let (nc, nr) = (nc.max(1) as f64, nr.max(1) as f64);
    match *obj {
        PrefObjective::Dpo { beta, loss } => {
            let (lc, lr) = (pc - rc, pr - rr);
            let z = beta * (lc - lr);
            let (l, dc, dr) = match loss {
                DpoLoss::Sigmoid => {
                    let d = -sigmoid(-z) * beta;
                    (-log_sigmoid(z), d, -d)
                }
                DpoLoss::Hinge => {
                    let d = if z < 1.0 { -beta } else { 0.0 };
                    ((1.0 - z).max(0.0), d, -d)
                }
                DpoLoss::Ipo => {
                    let u = lc / nc - lr / nr - 1.0 / (2.0 * beta);
                    (u * u, 2.0 * u / nc, -2.0 * u / nr)
                }
            };
            (l, dc, dr, beta * lc, beta * lr)
        }
        PrefObjective::Orpo { beta } => {
            // Per-token averages; the odds-ratio part only (the chosen NLL is added per token).
            let (ac, ar) = (pc / nc, pr / nr);
            let lo = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
            let l = -beta * log_sigmoid(lo);
            let dlo = -beta * sigmoid(-lo);
            let dac = dlo / (-ac.exp_m1());
            let dar = -dlo / (-ar.exp_m1());
            (l, dac / nc, dar / nr, beta * ac, beta * ar)
        }
    }
}

impl Trainer {
    /// A trainer of `objective` on preference `pairs` (`model` already [`super::prepare`]d into
    /// `trainable`), with the same data order, AdamW, schedule, clipping and checkpoints as
    /// supervised training; [`Trainer::train_step`] then returns [`PrefFigures`] with each step.
    /// DPO needs `reference`: [`Reference::AdapterOff`] for LoRA and soft prompts,
    /// [`Reference::Copy`] for full fine-tuning. Evaluation scores the chosen answers.
    #[allow(clippy::too_many_arguments)]
    pub fn new_preference(
        model: Llama,
        trainable: Trainable,
        config: TrainConfig,
        objective: PrefObjective,
        reference: Reference,
        pairs: Vec<PrefPair>,
        pad_id: u32,
    ) -> Result<Trainer> {
        objective.check()?;
        if pairs.is_empty() {
            return Err(Error::InvalidParams("no preference pairs".into()));
        }
        if let Some(i) = pairs
            .iter()
            .position(|p| p.chosen.n_targets() == 0 || p.rejected.n_targets() == 0)
        {
            return Err(Error::InvalidParams(format!(
                "preference pair {} has an empty chosen or rejected answer after truncation",
                i + 1
            )));
        }
        match (&objective, &reference, &trainable.method) {
            (PrefObjective::Orpo { .. }, _, _) => {}
            (PrefObjective::Dpo { .. }, Reference::None, _) => {
                return Err(Error::InvalidParams(
                    "DPO needs a reference model (ORPO does not)".into(),
                ))
            }
            (PrefObjective::Dpo { .. }, Reference::AdapterOff, Method::Full) => {
                return Err(Error::InvalidParams(
                    "full fine-tuning has no adapter to switch off: DPO needs a reference copy \
                     of the model"
                        .into(),
                ))
            }
            _ => {}
        }
        let chosen = pairs.iter().map(|p| p.chosen.clone()).collect();
        let mut t = Trainer::new(model, trainable, config, chosen, pad_id)?;
        t.pref = Some(Box::new(PrefState {
            objective,
            reference,
            pairs,
            ref_logps: HashMap::new(),
        }));
        Ok(t)
    }

    /// The preference side, when this trainer trains on pairs.
    pub fn preference(&self) -> Option<&PrefState> {
        self.pref.as_deref()
    }

    /// The reference's summed answer log-probs of the sequences of `batch`.
    fn reference_sums(
        &mut self,
        st: &PrefState,
        batch: &Batch,
        seq: &[usize],
        n_seq: usize,
    ) -> Result<Vec<f64>> {
        let nll = match &st.reference {
            Reference::Copy(m) => token_nll(m, batch, None)?,
            Reference::AdapterOff => {
                // The LoRA branches with scale 0: the base's own product plus an exact zero,
                // through the very kernels the policy runs (detaching the branches would switch
                // the model to its inference kernels, which round differently). Soft prompts: no
                // prefix. The graph this builds is dropped unused.
                let mut saved = Vec::new();
                for (_, l) in self.model.linears_mut() {
                    if let Some(b) = l.lora_mut() {
                        saved.push(b.scale);
                        b.scale = 0.0;
                    }
                }
                let out = token_nll(&self.model, batch, None);
                let mut it = saved.into_iter();
                for (_, l) in self.model.linears_mut() {
                    if let (Some(b), Some(s)) = (l.lora_mut(), it.next()) {
                        b.scale = s;
                    }
                }
                out?
            }
            Reference::None => {
                return Err(Error::InvalidParams("no reference model".into()));
            }
        };
        let v = nll.detach().to_vec1::<f32>()?;
        Ok(sums(&v, seq, n_seq).into_iter().map(|s| -s).collect())
    }

    pub(super) fn pref_step(&mut self, st: &mut PrefState) -> Result<StepMetrics> {
        let started = std::time::Instant::now();
        let micro = batch_order(
            st.pairs.len(),
            self.step,
            self.config.batch_size,
            self.config.grad_accum,
            self.config.seed,
            self.config.shuffle,
        );
        let n_prefix = self.trainable.prefix.as_ref().map_or(Ok(0), |p| p.dim(0))?;
        let device = self.model.device().clone();
        let total_pairs: usize = micro.iter().map(|m| m.len()).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.trainable.params.len()];
        let (mut loss, mut rw_c, mut rw_r, mut acc, mut lp_c, mut lp_r) =
            (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
        let (mut tokens, mut target_tokens) = (0usize, 0usize);
        for (m, idx) in micro.iter().enumerate() {
            let b = idx.len();
            // TRL's batch layout: every chosen sequence, then every rejected one.
            let answers: Vec<&Example> = idx
                .iter()
                .map(|&i| &st.pairs[i].chosen)
                .chain(idx.iter().map(|&i| &st.pairs[i].rejected))
                .collect();
            // ORPO's NLL term scores every token of the chosen sequences, the prompt's too (TRL's
            // `ORPOTrainer` takes the input ids where the attention mask is 1 as its labels);
            // log-probs and odds ratios stay on the answer tokens.
            let orpo = matches!(st.objective, PrefObjective::Orpo { .. });
            let owned: Vec<Example> = answers
                .iter()
                .enumerate()
                .map(|(s, e)| {
                    let mut e = (*e).clone();
                    if orpo && s < b {
                        e.targets.iter_mut().for_each(|t| *t = true);
                    }
                    e
                })
                .collect();
            let ex: Vec<&Example> = owned.iter().collect();
            let batch = collate(&ex, self.pad_id, 0, &device)?;
            let seq = seq_of_rows(&ex);
            let answer = answer_rows(&ex, &answers);
            let counts: Vec<usize> = (0..2 * b)
                .map(|s| {
                    seq.iter()
                        .zip(&answer)
                        .filter(|&(&x, &a)| x == s && a)
                        .count()
                })
                .collect();
            tokens += batch.n_tokens;
            target_tokens += batch.targets.len();
            let refs: Vec<(f64, f64)> = if st.objective.needs_reference() {
                if idx.iter().any(|i| !st.ref_logps.contains_key(i)) {
                    let r = self.reference_sums(st, &batch, &seq, 2 * b)?;
                    for (k, &i) in idx.iter().enumerate() {
                        st.ref_logps.insert(i, (r[k], r[b + k]));
                    }
                }
                idx.iter().map(|i| st.ref_logps[i]).collect()
            } else {
                vec![(0.0, 0.0); b]
            };
            let step_seed = self.config.seed
                ^ ((self.step * self.config.grad_accum + m) as u64 + 1)
                    .wrapping_mul(0xA24B_AED4_963E_E407);
            self.set_dropout_seed(Some(step_seed));
            let prefix = self.prefix_tensor();
            let policy_batch = if n_prefix > 0 {
                collate(&ex, self.pad_id, n_prefix, &device)?
            } else {
                batch
            };
            let nll = token_nll(&self.model, &policy_batch, prefix.as_ref())?;
            let nll_v = nll.detach().to_vec1::<f32>()?;
            let lp: Vec<f64> = sums(&masked(&nll_v, &answer), &seq, 2 * b)
                .into_iter()
                .map(|s| -s)
                .collect();
            // dL/dlogp per sequence (the loss is the mean over the step's pairs).
            let mut dlogp = vec![0f64; 2 * b];
            for k in 0..b {
                let (l, dc, dr, rc_, rr_) = pair_loss(
                    &st.objective,
                    lp[k],
                    lp[b + k],
                    refs[k].0,
                    refs[k].1,
                    counts[k],
                    counts[b + k],
                );
                loss += l / total_pairs as f64;
                dlogp[k] = dc / total_pairs as f64;
                dlogp[b + k] = dr / total_pairs as f64;
                rw_c += rc_ / total_pairs as f64;
                rw_r += rr_ / total_pairs as f64;
                acc += f64::from(u8::from(rc_ > rr_)) / total_pairs as f64;
                lp_c += lp[k] / total_pairs as f64;
                lp_r += lp[b + k] / total_pairs as f64;
            }
            // logp = -sum nll: the weight of each token's NLL is -dL/dlogp of its sequence.
            let mut g: Vec<f32> = seq
                .iter()
                .zip(&answer)
                .map(|(&s, &a)| if a { (-dlogp[s]) as f32 } else { 0.0 })
                .collect();
            if orpo {
                // The chosen sequences' mean token NLL (over the micro-batch, as TRL), averaged
                // over the micro-batches.
                let chosen_tokens = seq.iter().filter(|&&s| s < b).count();
                let w = 1.0 / (chosen_tokens.max(1) as f64 * micro.len() as f64);
                let mut nll_c = 0f64;
                for (t, &s) in seq.iter().enumerate() {
                    if s < b {
                        g[t] += w as f32;
                        nll_c += nll_v[t] as f64;
                    }
                }
                loss += nll_c * w;
            }
            let weights = Tensor::from_vec(g, nll_v.len(), &device)?;
            let obj = (nll * weights)?.sum_all()?;
            let gr = kernels::block::backward(&obj)?;
            for (slot, (_, v)) in grads.iter_mut().zip(&self.trainable.params) {
                if let Some(gv) = gr.get(v.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + gv)?,
                        None => gv.clone(),
                    });
                }
            }
        }
        self.set_dropout_seed(None);
        let (grad_norm, lr) = self.apply_step(grads)?;
        Ok(StepMetrics {
            step: self.step,
            loss,
            lr,
            grad_norm,
            target_tokens,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
            pref: Some(PrefFigures {
                rewards_chosen: rw_c,
                rewards_rejected: rw_r,
                margin: rw_c - rw_r,
                accuracy: acc,
                logps_chosen: lp_c,
                logps_rejected: lp_r,
                pairs: total_pairs,
            }),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn answers_start_where_the_token_ids_diverge() {
        // The prompt's last token merges with the answer's first: the answer starts there.
        let p = pair_from_ids(&[1, 2, 3], &[1, 2, 9, 4], &[1, 2, 3, 5, 6], 100).unwrap();
        assert_eq!(p.prompt_len, 2);
        assert_eq!(p.chosen.targets, vec![false, false, true, true]);
        assert_eq!(p.rejected.targets, vec![false, false, true, true, true]);
        // keep_start truncation, and a prompt that fills max_len drops the row.
        let t = pair_from_ids(&[1, 2], &[1, 2, 3, 4, 5], &[1, 2, 6], 4).unwrap();
        assert_eq!(t.chosen.ids, vec![1, 2, 3, 4]);
        assert!(t.chosen.truncated && !t.rejected.truncated);
        assert!(pair_from_ids(&[1, 2, 3], &[1, 2, 3, 4], &[1, 2, 3, 5], 3).is_none());
    }

    /// Each loss's derivatives against central differences.
    #[test]
    fn loss_derivatives_match_finite_differences() {
        let objs = [
            PrefObjective::Dpo {
                beta: 0.1,
                loss: DpoLoss::Sigmoid,
            },
            PrefObjective::Dpo {
                beta: 0.2,
                loss: DpoLoss::Hinge,
            },
            PrefObjective::Dpo {
                beta: 0.1,
                loss: DpoLoss::Ipo,
            },
            PrefObjective::Orpo { beta: 0.2 },
        ];
        // Away from the hinge's kink (z = 0.5).
        let (pc, pr, rc, rr) = (-30.0, -25.0, -31.5, -24.0);
        for o in objs {
            let f = |a: f64, b: f64| pair_loss(&o, a, b, rc, rr, 12, 9).0;
            let (_, dc, dr, _, _) = pair_loss(&o, pc, pr, rc, rr, 12, 9);
            let h = 1e-4;
            let nc = (f(pc + h, pr) - f(pc - h, pr)) / (2.0 * h);
            let nr = (f(pc, pr + h) - f(pc, pr - h)) / (2.0 * h);
            assert!((nc - dc).abs() < 1e-6, "{o:?}: {nc} vs {dc}");
            assert!((nr - dr).abs() < 1e-6, "{o:?}: {nr} vs {dr}");
        }
        // At the start (policy = reference) DPO's sigmoid loss is ln 2.
        let s = PrefObjective::Dpo {
            beta: 0.1,
            loss: DpoLoss::Sigmoid,
        };
        let (l, ..) = pair_loss(&s, -3.0, -4.0, -3.0, -4.0, 2, 2);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-12);
    }
}
