//! Next-token sampling: repetition penalty over the last N tokens, then temperature
//! (0 = greedy argmax), top-k, top-p and min-p filtering (transformers' order), then a draw
//! from a seeded RNG, so the same seed gives the same text.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// Sampling settings. `Default` is greedy decoding with no penalty.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p, in (0, 1].
    pub top_p: Option<f64>,
    /// Drop tokens less likely than `min_p` times the most likely one, in [0, 1].
    pub min_p: Option<f64>,
    /// > 1 discourages tokens seen in the last `repeat_last_n` tokens (1 = off).
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Refuses settings that make no sense, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| Err(Error::InvalidParams(format!("{field}: {why}")));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("{} must be a finite number >= 0", self.temperature),
            );
        }
        if self.top_k == Some(0) {
            return bad("top_k", "0 must be at least 1 (or unset)".to_string());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top_p", format!("{p} must be in (0, 1]"));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return bad("min_p", format!("{p} must be in [0, 1]"));
            }
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                format!("{} must be a finite number > 0", self.repetition_penalty),
            );
        }
        Ok(())
    }
}

/// Picks the next token from logits. Holds the RNG, so one sampler serves one generation.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// Validates `cfg` and seeds the RNG with `cfg.seed`.
    pub fn new(cfg: SamplingConfig) -> Result<Sampler> {
        cfg.validate()?;
        let rng = StdRng::seed_from_u64(cfg.seed);
        Ok(Sampler { cfg, rng })
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.cfg
    }

    /// Samples from logits `[vocab]` or `[1, vocab]`; `history` is all tokens so far
    /// (prompt and generated), of which the last `repeat_last_n` are penalised.
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let logits = logits.flatten_all()?.to_dtype(DType::F32)?;
        let mut v: Vec<f32> = logits.to_vec1()?;
        self.sample_slice(&mut v, history)
    }

    /// As [`Sampler::sample`], on a mutable slice of logits (modified in place).
    pub fn sample_slice(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::InvalidParams("logits are empty".to_string()));
        }
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        apply_repetition_penalty(
            logits,
            history,
            self.cfg.repetition_penalty,
            self.cfg.repeat_last_n,
        );
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(Error::InvalidParams(
                "every logit is -inf or NaN: nothing to sample".to_string(),
            ));
        }
        let t = self.cfg.temperature as f32;
        // Weight of each token: exp((l - max) / t); probabilities are weights / total.
        let weights: Vec<f32> = logits.iter().map(|l| ((*l - max) / t).exp()).collect();
        let (top_k, top_p, min_p) = (self.cfg.top_k, self.cfg.top_p, self.cfg.min_p);
        if top_k.is_none() && top_p.is_none() && min_p.is_none() {
            let total: f64 = weights.iter().map(|w| *w as f64).sum();
            let u = self.rng.random::<f64>() * total;
            return Ok(draw(
                weights.iter().enumerate().map(|(i, w)| (i as u32, *w)),
                u,
            ));
        }
        let cand = candidates(&weights, top_k, top_p, min_p);
        let mut keep = cand.len();
        if let Some(k) = top_k {
            keep = keep.min(k);
        }
        // top-p works on the distribution left by top-k (all tokens when top-k is unset).
        let total: f64 = if top_k.is_some() {
            cand[..keep].iter().map(|c| c.1 as f64).sum()
        } else {
            weights.iter().map(|w| *w as f64).sum()
        };
        if let Some(p) = top_p {
            let mut cum = 0.0;
            for (i, c) in cand[..keep].iter().enumerate() {
                cum += c.1 as f64 / total;
                if cum >= p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if let Some(m) = min_p {
            let threshold = cand[0].1 * m as f32;
            let above = cand[..keep].iter().take_while(|c| c.1 >= threshold).count();
            keep = keep.min(above.max(1));
        }
        let kept = &cand[..keep];
        let kept_total: f64 = kept.iter().map(|c| c.1 as f64).sum();
        let u = self.rng.random::<f64>() * kept_total;
        Ok(draw(kept.iter().copied(), u))
    }
}

/// The token at which the running weight first exceeds `u` (the last one if rounding
/// leaves `u` at the total).
fn draw(items: impl Iterator<Item = (u32, f32)>, u: f64) -> u32 {
    let mut cum = 0.0;
    let mut last = 0;
    for (id, w) in items {
        cum += w as f64;
        last = id;
        if u < cum && w > 0.0 {
            return id;
        }
    }
    last
}

/// The best tokens, sorted best first (ties: lower id first), enough of them for top-k,
/// top-p and min-p to be applied on the result as on the fully sorted vocabulary. Rather
/// than sorting every token, it lowers a weight threshold until the tokens above it hold
/// at least `top_k` tokens and the `top_p` mass (or reach the min-p threshold, below which
/// nothing is kept anyway), then sorts only those.
fn candidates(
    weights: &[f32],
    top_k: Option<usize>,
    top_p: Option<f64>,
    min_p: Option<f64>,
) -> Vec<(u32, f32)> {
    let w_max = weights.iter().copied().fold(0.0f32, f32::max);
    let total: f64 = weights.iter().map(|w| *w as f64).sum();
    let min_p_floor = min_p.map(|m| w_max * m as f32);
    let mut cand: Vec<(u32, f32)> = Vec::new();
    for factor in [1e-1f32, 1e-2, 1e-3, 1e-4, 1e-6, 1e-9, 0.0] {
        let mut tau = w_max * factor;
        let mut exact = factor == 0.0;
        if let Some(floor) = min_p_floor {
            if floor >= tau {
                // Every token min-p keeps is above its floor: the floor is an exact cut.
                tau = floor;
                exact = true;
            }
        }
        cand.clear();
        cand.extend(
            weights
                .iter()
                .enumerate()
                .filter(|(_, w)| **w >= tau && **w > 0.0)
                .map(|(i, w)| (i as u32, *w)),
        );
        let k_ok = top_k.is_none_or(|k| cand.len() >= k);
        let mass: f64 = cand.iter().map(|c| c.1 as f64).sum();
        // With top-k, top-p only looks inside the top-k set, which the candidates hold.
        let p_ok = top_k.is_some() || top_p.is_none_or(|p| mass >= p * total);
        if exact || (k_ok && p_ok) {
            break;
        }
    }
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if cand.is_empty() {
        // Every weight underflowed except the maximum itself, which is 1.
        if let Some(i) = weights.iter().position(|w| *w == w_max) {
            cand.push((i as u32, w_max));
        }
    }
    cand
}

/// transformers' rule: a seen token's logit is divided by the penalty when positive,
/// multiplied when negative. Each distinct token is penalised once.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32, last_n: usize) {
    if penalty == 1.0 || last_n == 0 {
        return;
    }
    let start = history.len().saturating_sub(last_n);
    let mut seen = std::collections::HashSet::new();
    for &id in &history[start..] {
        if !seen.insert(id) {
            continue;
        }
        if let Some(l) = logits.get_mut(id as usize) {
            if *l > 0.0 {
                *l /= penalty;
            } else {
                *l *= penalty;
            }
        }
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
        .ok_or_else(|| Error::InvalidParams("every logit is NaN: nothing to pick".to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(temperature: f64) -> SamplingConfig {
        SamplingConfig {
            temperature,
            ..SamplingConfig::default()
        }
    }

    fn counts(cfg: SamplingConfig, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(cfg).unwrap();
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            let mut l = logits.to_vec();
            c[s.sample_slice(&mut l, &[]).unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(cfg(0.0)).unwrap();
        assert_eq!(s.sample_slice(&mut [0.1, 3.0, -1.0, 3.0], &[]).unwrap(), 1);
        assert_eq!(
            s.sample_slice(&mut [f32::NAN, -5.0, f32::NEG_INFINITY], &[])
                .unwrap(),
            1
        );
        let t = Tensor::new(&[[1.0f32, 2.0, 9.0, 3.0]], &candle_core::Device::Cpu).unwrap();
        assert_eq!(s.sample(&t, &[]).unwrap(), 2);
    }

    #[test]
    fn repetition_penalty_rule() {
        let mut l = vec![2.0, -2.0, 1.0, 4.0];
        // Token 0 and 1 are in the window, token 3 only before it.
        apply_repetition_penalty(&mut l, &[3, 0, 1, 0], 2.0, 3);
        assert_eq!(l, vec![1.0, -4.0, 1.0, 4.0]);
        // With greedy decoding the penalty changes the pick.
        let mut s = Sampler::new(SamplingConfig {
            repetition_penalty: 3.0,
            ..cfg(0.0)
        })
        .unwrap();
        assert_eq!(s.sample_slice(&mut [2.0, 1.0], &[0]).unwrap(), 1);
    }

    #[test]
    fn temperature_follows_softmax() {
        // p = softmax([0, ln 3]) = [0.25, 0.75].
        let c = counts(cfg(1.0), &[0.0, 3f32.ln()], 20_000);
        let frac = c[1] as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
        // Temperature 0.5 squares the odds: [1, 9] / 10.
        let c = counts(cfg(0.5), &[0.0, 3f32.ln()], 20_000);
        let frac = c[1] as f64 / 20_000.0;
        assert!((frac - 0.9).abs() < 0.015, "{frac}");
    }

    #[test]
    fn top_k_top_p_min_p_filter() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let c = counts(
            SamplingConfig {
                top_k: Some(2),
                ..cfg(1.0)
            },
            &logits,
            2000,
        );
        assert_eq!(c[0] + c[3], 0, "{c:?}");
        assert!(c[1] > 0 && c[2] > 0);
        // probs (T=1) ~ [0.086, 0.636, 0.234, 0.052]: top_p 0.8 keeps tokens 1 and 2.
        let c = counts(
            SamplingConfig {
                top_p: Some(0.8),
                ..cfg(1.0)
            },
            &logits,
            2000,
        );
        assert_eq!(c[0] + c[3], 0, "{c:?}");
        // top_p 0.5: only the best token.
        let c = counts(
            SamplingConfig {
                top_p: Some(0.5),
                ..cfg(1.0)
            },
            &logits,
            200,
        );
        assert_eq!(c[1], 200);
        // min_p 0.3: keeps tokens at least 0.3 * 0.636 = 0.19 -> tokens 1 and 2.
        let c = counts(
            SamplingConfig {
                min_p: Some(0.3),
                ..cfg(1.0)
            },
            &logits,
            2000,
        );
        assert_eq!(c[0] + c[3], 0, "{c:?}");
        assert!(c[2] > 0);
    }

    #[test]
    fn large_vocab_filters_match_a_full_sort() {
        // 5000 logits: top-p needs more than the 1024-candidate head, min-p less.
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 997) as f32 / 400.0)
            .collect();
        let naive_keep = |top_p: Option<f64>, min_p: Option<f64>| -> Vec<u32> {
            let mut v: Vec<(u32, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, l)| (i as u32, (*l as f64).exp()))
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let total: f64 = v.iter().map(|x| x.1).sum();
            let mut keep = v.len();
            if let Some(p) = top_p {
                let mut cum = 0.0;
                keep = v
                    .iter()
                    .position(|x| {
                        cum += x.1 / total;
                        cum >= p
                    })
                    .map_or(v.len(), |i| i + 1);
            }
            if let Some(m) = min_p {
                keep = keep.min(v.iter().take_while(|x| x.1 >= v[0].1 * m).count());
            }
            v[..keep].iter().map(|x| x.0).collect()
        };
        for (top_p, min_p) in [(Some(0.9), None), (None, Some(0.9)), (Some(0.3), Some(0.5))] {
            let allowed: std::collections::HashSet<u32> =
                naive_keep(top_p, min_p).into_iter().collect();
            let c = counts(
                SamplingConfig {
                    top_p,
                    min_p,
                    ..cfg(1.0)
                },
                &logits,
                600,
            );
            let drawn: Vec<usize> = (0..c.len()).filter(|&i| c[i] > 0).collect();
            assert!(
                drawn.iter().all(|i| allowed.contains(&(*i as u32))),
                "top_p {top_p:?} min_p {min_p:?}: drew outside the kept set"
            );
            assert!(
                drawn.len() >= allowed.len().min(100) / 2,
                "{} of {}",
                drawn.len(),
                allowed.len()
            );
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingConfig { seed, ..cfg(1.0) }).unwrap();
            (0..40)
                .map(|_| s.sample_slice(&mut logits.clone(), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let check = |c: SamplingConfig, field: &str| {
            let err = Sampler::new(c).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        };
        check(cfg(-0.1), "temperature");
        check(cfg(f64::NAN), "temperature");
        check(
            SamplingConfig {
                top_p: Some(0.0),
                ..cfg(1.0)
            },
            "top_p",
        );
        check(
            SamplingConfig {
                top_p: Some(1.5),
                ..cfg(1.0)
            },
            "top_p",
        );
        check(
            SamplingConfig {
                top_k: Some(0),
                ..cfg(1.0)
            },
            "top_k",
        );
        check(
            SamplingConfig {
                min_p: Some(2.0),
                ..cfg(1.0)
            },
            "min_p",
        );
        check(
            SamplingConfig {
                repetition_penalty: 0.0,
                ..cfg(1.0)
            },
            "repetition_penalty",
        );
        let mut s = Sampler::new(cfg(1.0)).unwrap();
        assert!(s
            .sample_slice(&mut [f32::NEG_INFINITY, f32::NAN], &[])
            .is_err());
    }
}
