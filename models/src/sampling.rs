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
        // Candidates sorted by logit, best first (ties: lower id first).
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, l)| (i as u32, *l / t))
            .collect();
        if let Some(k) = self.cfg.top_k {
            if k < cand.len() {
                cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                cand.truncate(k);
            }
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|(_, l)| ((l - top) as f64).exp()).collect();
        normalise(&mut probs);
        if let Some(p) = self.cfg.top_p {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            normalise(&mut probs);
        }
        if let Some(m) = self.cfg.min_p {
            let threshold = probs[0] * m;
            let keep = probs.iter().take_while(|q| **q >= threshold).count().max(1);
            probs.truncate(keep);
            normalise(&mut probs);
        }
        let u: f64 = self.rng.random::<f64>();
        let mut cum = 0.0;
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if u < cum {
                return Ok(cand[i].0);
            }
        }
        // Rounding left u just above the total: take the last kept token.
        Ok(cand[probs.len() - 1].0)
    }
}

fn normalise(p: &mut [f64]) {
    let s: f64 = p.iter().sum();
    if s > 0.0 {
        for q in p.iter_mut() {
            *q /= s;
        }
    }
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
