//! Checking an export against the model in the app.
//!
//! The reference is the app's model (base weights in f32, an adapter's LoRA branches
//! attached as in chat). For each prompt of a fixed set, rendered through the chat template
//! with the generation prompt, it answers greedily for up to [`STEPS`] tokens (ending at an
//! end-of-sequence token, which is compared too). Then both the reference and the reloaded
//! export read the same sequence (prompt + answer) in one forward pass, and are compared:
//!
//! - the chat template renders the same text and the tokenizer gives the same ids;
//! - greedy tokens: at every answer position, the export's most likely next token equals the
//!   reference's (teacher forcing; all equal is the same as generating the same answer);
//! - mean NLL over every predicted token of the sequences, relative difference;
//! - logits: the largest absolute difference over the reference's 20 most likely tokens at
//!   every answer position.
//!
//! The tolerance depends on the export's numeric type ([`Tolerance::for_type`]).

use candle_core::{DType, Device, Tensor, D};

use super::WeightType;
use crate::chat_template::{ChatTemplate, Message};
use crate::llama::Llama;
use crate::tokenizer::Tok;
use crate::{Error, Result};

/// Most answer tokens compared per prompt.
pub const STEPS: usize = 64;
/// Reference tokens whose logits are compared at each answer position.
const TOP: usize = 20;

/// The fixed prompt set.
pub fn prompt_set() -> Vec<Vec<Message>> {
    let m = |v: &[(&str, &str)]| -> Vec<Message> {
        v.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    };
    vec![
        m(&[("user", "Why is the sky blue?")]),
        m(&[(
            "user",
            "Explain in a few sentences how vaccines train the immune system.",
        )]),
        m(&[
            ("system", "You are a careful assistant who answers briefly."),
            ("user", "What are three uses of copper?"),
        ]),
        m(&[
            ("user", "What is 12 times 7?"),
            ("assistant", "12 times 7 is 84."),
            ("user", "And what is that divided by 4?"),
        ]),
        m(&[("user", "Write a short poem about autumn leaves.")]),
    ]
}

/// What the model makes of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub messages: Vec<Message>,
    /// The rendered prompt.
    pub text: String,
    pub prompt_ids: Vec<u32>,
    /// The greedy answer (its end token included when it came within [`STEPS`]).
    pub answer: Vec<u32>,
    /// Per predicted position (all but the last token of prompt + answer): the token's NLL.
    nll: Vec<f64>,
    /// Per answer position: the argmax, and the top logits `(id, value)`.
    argmax: Vec<u32>,
    top: Vec<Vec<(u32, f32)>>,
}

impl Run {
    pub fn mean_nll(&self) -> f64 {
        self.nll.iter().sum::<f64>() / self.nll.len().max(1) as f64
    }
}

fn err(m: impl std::fmt::Display) -> Error {
    Error::InvalidParams(m.to_string())
}

/// What one forward pass over prompt + answer gives.
struct Scored {
    /// NLL of every predicted token.
    nll: Vec<f64>,
    /// At answer positions: the logits row.
    rows: Vec<Vec<f32>>,
}

/// Reads `ids` in one forward pass.
fn score(model: &Llama, ids: &[u32], n_prompt: usize) -> Result<Scored> {
    let dev = Device::Cpu;
    let input = Tensor::new(ids, &dev)?.unsqueeze(0)?;
    let logits = model
        .forward(&input, None)?
        .squeeze(0)?
        .to_dtype(DType::F32)?; // [L, V]
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let l = ids.len();
    let mut nll = Vec::with_capacity(l.saturating_sub(1));
    let lp: Vec<Vec<f32>> = logp.to_vec2()?;
    for t in 0..l.saturating_sub(1) {
        nll.push(-(lp[t][ids[t + 1] as usize] as f64));
    }
    let start = n_prompt.saturating_sub(1);
    let rows: Vec<Vec<f32>> = logits
        .narrow(0, start, l.saturating_sub(1) - start)?
        .to_vec2()?;
    Ok(Scored { nll, rows })
}

fn top_of(row: &[f32]) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let k = TOP.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |a, b| row[*b as usize].total_cmp(&row[*a as usize]));
    let mut t: Vec<(u32, f32)> = idx[..k].iter().map(|&i| (i, row[i as usize])).collect();
    t.sort_by(|a, b| b.1.total_cmp(&a.1));
    t
}

/// The reference runs: greedy answers of `model` to every prompt, then their scores.
pub fn reference(
    model: &Llama,
    tok: &Tok,
    tmpl: &ChatTemplate,
    prompts: &[Vec<Message>],
    job: &mut super::Job<'_>,
) -> Result<Vec<Run>> {
    let dev = Device::Cpu;
    let mut eos: Vec<u32> = tok.eos_token_ids().to_vec();
    for e in &model.config().eos_token_ids {
        if !eos.contains(e) {
            eos.push(*e);
        }
    }
    let mut runs = Vec::new();
    for (p, messages) in prompts.iter().enumerate() {
        job.check()?;
        job.report("answering the check prompts", p, prompts.len());
        let text = tmpl.render(messages, true)?;
        let prompt_ids = tok.encode(&text, false)?;
        if prompt_ids.is_empty() {
            return Err(err("a check prompt encodes to no tokens"));
        }
        let mut cache = model.new_cache();
        let mut logits = model.forward_last(
            &Tensor::new(prompt_ids.as_slice(), &dev)?.unsqueeze(0)?,
            &mut cache,
        )?;
        let mut answer = Vec::new();
        for _ in 0..STEPS {
            let row: Vec<f32> = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?;
            let next = crate::sampling::argmax(&row)?;
            answer.push(next);
            if eos.contains(&next) {
                break;
            }
            logits = model.forward_last(&Tensor::new(&[next], &dev)?.unsqueeze(0)?, &mut cache)?;
        }
        let mut ids = prompt_ids.clone();
        ids.extend_from_slice(&answer);
        let sc = score(model, &ids, prompt_ids.len())?;
        let argmax = sc
            .rows
            .iter()
            .map(|r| crate::sampling::argmax(r))
            .collect::<Result<Vec<u32>>>()?;
        let top = sc.rows.iter().map(|r| top_of(r)).collect();
        let nll = sc.nll;
        runs.push(Run {
            messages: messages.clone(),
            text,
            prompt_ids,
            answer,
            nll,
            argmax,
            top,
        });
    }
    job.report("answering the check prompts", prompts.len(), prompts.len());
    Ok(runs)
}

/// How close an export must come to the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Tolerance {
    /// Every answer position's greedy token must match.
    pub same_greedy: bool,
    /// Largest allowed `|NLL_export / NLL_ref - 1|` of the mean NLL.
    pub max_nll_rel: f64,
    /// Largest allowed absolute logit difference over the reference's top tokens.
    pub max_logit_abs: Option<f64>,
}

impl Tolerance {
    /// The tolerance of each numeric type. F32 files hold the app's values (a LoRA folded into
    /// the weights differs only by rounding); F16 rounds each weight to 11 significant bits;
    /// BF16 to 8; Q8_0 to 8-bit blocks; Q4_K_M to 4-6-bit blocks re-quantized from the app's
    /// weights. Measured on the default model with the reference LoRA (2026-12-03): F16 all
    /// 271 answer tokens the same, NLL -0.02%, largest top-20 logit difference 0.03; BF16 all
    /// the same, +0.10%; Q8_0 269 of 271, -0.55%; Q4_K_M 244 of 271, +2.1%; F32 5e-5.
    pub fn for_type(ty: WeightType) -> Tolerance {
        match ty {
            WeightType::F32 => Tolerance {
                same_greedy: true,
                max_nll_rel: 1e-4,
                max_logit_abs: Some(1e-2),
            },
            WeightType::F16 => Tolerance {
                same_greedy: true,
                max_nll_rel: 2e-3,
                max_logit_abs: Some(0.1),
            },
            WeightType::Bf16 => Tolerance {
                same_greedy: false,
                max_nll_rel: 1e-2,
                max_logit_abs: None,
            },
            WeightType::Q8_0 => Tolerance {
                same_greedy: false,
                max_nll_rel: 1e-2,
                max_logit_abs: None,
            },
            WeightType::Q4KM => Tolerance {
                same_greedy: false,
                max_nll_rel: 5e-2,
                max_logit_abs: None,
            },
        }
    }

    /// In words, for the record.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.same_greedy {
            parts.push(format!("the same greedy tokens (up to {STEPS} per prompt)"));
        }
        parts.push(format!("mean NLL within {}%", fmt_pct(self.max_nll_rel)));
        if let Some(l) = self.max_logit_abs {
            parts.push(format!("top-{TOP} logits within {l}"));
        }
        parts.join("; ")
    }
}

fn fmt_pct(x: f64) -> String {
    let p = x * 100.0;
    if p >= 1.0 {
        format!("{p:.0}")
    } else {
        format!("{p}")
    }
}

/// One compared property.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// The comparison of one reloaded export with the reference.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    pub checks: Vec<Check>,
    pub greedy_agree: usize,
    pub greedy_total: usize,
    pub nll_ref: f64,
    pub nll_export: f64,
    pub max_logit_diff: f64,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

/// Compares a reloaded export (`model`, its tokenizer and template) with the reference runs.
pub fn compare(
    model: &Llama,
    tok: &Tok,
    tmpl: &ChatTemplate,
    refs: &[Run],
    tol: &Tolerance,
    job: &mut super::Job<'_>,
) -> Result<Comparison> {
    let mut checks = Vec::new();
    let mut template_diff = None;
    let mut token_diff = None;
    let (mut agree, mut total) = (0usize, 0usize);
    let mut first_divergence: Option<(usize, usize, u32, u32)> = None;
    let (mut nll_ref, mut nll_exp, mut n) = (0f64, 0f64, 0usize);
    let mut max_logit = 0f64;
    for (p, r) in refs.iter().enumerate() {
        job.check()?;
        job.report("comparing with the app's model", p, refs.len());
        let text = tmpl.render(&r.messages, true)?;
        if text != r.text && template_diff.is_none() {
            template_diff = Some(p);
        }
        let ids = tok.encode(&r.text, false)?;
        if ids != r.prompt_ids && token_diff.is_none() {
            token_diff = Some(p);
        }
        let mut seq = r.prompt_ids.clone();
        seq.extend_from_slice(&r.answer);
        let sc = score(model, &seq, r.prompt_ids.len())?;
        nll_ref += r.nll.iter().sum::<f64>();
        nll_exp += sc.nll.iter().sum::<f64>();
        n += sc.nll.len();
        for (step, (row, want)) in sc.rows.iter().zip(&r.argmax).enumerate() {
            let a = crate::sampling::argmax(row)?;
            total += 1;
            if a == *want {
                agree += 1;
            } else if first_divergence.is_none() {
                first_divergence = Some((p, step, *want, a));
            }
        }
        for (row, reftop) in sc.rows.iter().zip(&r.top) {
            for (id, v) in reftop {
                max_logit = max_logit.max((row[*id as usize] as f64 - *v as f64).abs());
            }
        }
    }
    job.report("comparing with the app's model", refs.len(), refs.len());
    checks.push(Check {
        name: "chat template".into(),
        passed: template_diff.is_none(),
        detail: match template_diff {
            None => format!("renders the same text for all {} prompts", refs.len()),
            Some(p) => format!("renders prompt {} differently", p + 1),
        },
    });
    checks.push(Check {
        name: "tokenizer".into(),
        passed: token_diff.is_none(),
        detail: match token_diff {
            None => "the same token ids for every rendered prompt".into(),
            Some(p) => format!("different token ids for prompt {}", p + 1),
        },
    });
    let greedy_detail = match first_divergence {
        None => format!("{agree} of {total} answer tokens the same"),
        Some((p, s, want, got)) => format!(
            "{agree} of {total} answer tokens the same; first difference: prompt {}, step {} \
             (app {want}, export {got})",
            p + 1,
            s + 1
        ),
    };
    checks.push(Check {
        name: "greedy tokens".into(),
        passed: !tol.same_greedy || agree == total,
        detail: if tol.same_greedy {
            greedy_detail
        } else {
            format!("{greedy_detail} (reported; not required for this type)")
        },
    });
    let (nr, ne) = (nll_ref / n.max(1) as f64, nll_exp / n.max(1) as f64);
    let rel = (ne / nr - 1.0).abs();
    checks.push(Check {
        name: "mean NLL".into(),
        passed: rel <= tol.max_nll_rel,
        detail: format!(
            "{ne:.5} vs the app's {nr:.5} over {n} tokens ({:+.3}%, allowed ±{}%)",
            (ne / nr - 1.0) * 100.0,
            fmt_pct(tol.max_nll_rel)
        ),
    });
    if let Some(limit) = tol.max_logit_abs {
        checks.push(Check {
            name: "logits".into(),
            passed: max_logit <= limit,
            detail: format!(
                "largest difference over the app's top-{TOP} tokens {max_logit:.2e} (allowed {limit})"
            ),
        });
    }
    Ok(Comparison {
        checks,
        greedy_agree: agree,
        greedy_total: total,
        nll_ref: nr,
        nll_export: ne,
        max_logit_diff: max_logit,
    })
}
