//! AdamW (Loshchilov & Hutter 2019, PyTorch's update order) and the learning-rate schedules.

use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::{Error, Result};

/// AdamW hyper-parameters (the learning rate comes from the [`Schedule`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Decay after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// Linear warm-up to `peak_lr` over `warmup_steps`, then constant, linear or cosine decay to
/// `final_frac * peak_lr` at `total_steps`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub final_frac: f64,
}

impl Schedule {
    /// The learning rate of optimizer step `n` (1-based).
    pub fn lr(&self, n: usize) -> f64 {
        let (w, total) = (self.warmup_steps, self.total_steps.max(1));
        if n <= w && w > 0 {
            return self.peak_lr * n as f64 / w as f64;
        }
        let span = total.saturating_sub(w).max(1) as f64;
        let progress = ((n.saturating_sub(w)) as f64 / span).min(1.0);
        let f = self.final_frac;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => f + (1.0 - f) * (1.0 - progress),
            ScheduleKind::Cosine => {
                f + (1.0 - f) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        };
        self.peak_lr * factor
    }
}

/// sqrt of the sum of squares of every gradient (read in place, summed in f64; on another
/// device, each gradient's sum of squares in f32 there).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut ss = 0f64;
    for g in grads {
        if !g.device().is_cpu() {
            ss += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            continue;
        }
        let g = g.contiguous()?;
        let (st, l) = g.storage_and_layout();
        let v = f32_data(&st, l)?;
        ss += v
            .par_chunks(1 << 14)
            .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .sum::<f64>();
    }
    Ok(ss.sqrt())
}

/// The f32 elements of a contiguous CPU tensor's storage.
fn f32_data<'a>(st: &'a candle_core::Storage, l: &candle_core::Layout) -> Result<&'a [f32]> {
    match st {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) if l.is_contiguous() => {
            Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
        }
        _ => Err(Error::InvalidParams(
            "optimizer: expected a contiguous f32 tensor on the CPU".into(),
        )),
    }
}

/// One AdamW update of a parameter, applied in place to its storage (no copies of the
/// parameter or its gradient).
struct AdamWUpdate<'a> {
    state: std::sync::Mutex<(&'a mut [f32], &'a mut [f32])>,
    b1: f32,
    b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    decay: f32,
    eps: f32,
    grad_scale: f32,
}

impl candle_core::InplaceOp2 for AdamWUpdate<'_> {
    fn name(&self) -> &'static str {
        "attune-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (candle_core::CpuStorage::F32(pv), candle_core::CpuStorage::F32(gv)) = (s1, s2) else {
            candle_core::bail!("adamw: parameters and gradients must be f32")
        };
        if !l1.is_contiguous() || !l2.is_contiguous() {
            candle_core::bail!("adamw: parameters and gradients must be contiguous")
        }
        let n = l1.shape().elem_count();
        let pv = &mut pv[l1.start_offset()..l1.start_offset() + n];
        let gv = &gv[l2.start_offset()..l2.start_offset() + l2.shape().elem_count()];
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *state;
        if gv.len() != n || m.len() != n || v.len() != n {
            candle_core::bail!("adamw: gradient or moments differ in size from the parameter")
        }
        let (b1, b2, step_size, bc2_sqrt) = (self.b1, self.b2, self.step_size, self.bc2_sqrt);
        let (decay, eps, gs) = (self.decay, self.eps, self.grad_scale);
        const CHUNK: usize = 1 << 14;
        pv.par_chunks_mut(CHUNK)
            .zip(gv.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((pc, gc), (mc, vc))| {
                for (((p, &g), m), v) in pc.iter_mut().zip(gc).zip(mc.iter_mut()).zip(vc.iter_mut())
                {
                    let g = g * gs;
                    *p *= decay;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                }
            });
        Ok(())
    }
}

/// AdamW with its moment estimates, which a checkpoint saves and restores.
pub struct AdamW {
    pub config: AdamWConfig,
    /// First and second moments per parameter, flattened (the CPU's in-place update).
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// The moments as tensors on the parameter's device (the tensor-op update: parameters off
    /// the CPU, or [`AdamW::set_tensor_ops`]); made from `m`/`v` at the first such step.
    mt: Vec<Option<(Tensor, Tensor)>>,
    /// Update CPU parameters with tensor ops too (the GPU's update, checkable on the CPU).
    tensor_ops: bool,
    /// Updates applied so far.
    t: usize,
}

impl AdamW {
    pub fn new(params: &[(String, Var)], config: AdamWConfig) -> Result<AdamW> {
        if !(0.0..1.0).contains(&config.beta1) || !(0.0..1.0).contains(&config.beta2) {
            return Err(Error::InvalidParams(format!(
                "AdamW betas ({}, {}) must be in [0, 1)",
                config.beta1, config.beta2
            )));
        }
        Ok(AdamW {
            m: params
                .iter()
                .map(|(_, p)| vec![0f32; p.elem_count()])
                .collect(),
            v: params
                .iter()
                .map(|(_, p)| vec![0f32; p.elem_count()])
                .collect(),
            mt: params.iter().map(|_| None).collect(),
            tensor_ops: false,
            config,
            t: 0,
        })
    }

    /// Updates CPU parameters with candle tensor ops, as parameters on any other device always
    /// are (the CPU's default is an in-place update of the storage).
    pub fn set_tensor_ops(&mut self, on: bool) {
        self.tensor_ops = on;
    }

    /// One parameter's update with candle's tensor ops (any device): the same arithmetic as
    /// [`AdamWUpdate`], the moments kept as tensors on the parameter's device.
    #[allow(clippy::too_many_arguments)]
    fn step_tensors(
        p: &Var,
        g: &Tensor,
        slot: &mut Option<(Tensor, Tensor)>,
        host: (&[f32], &[f32]),
        (b1, b2): (f64, f64),
        step_size: f64,
        bc2_sqrt: f64,
        decay: f64,
        eps: f64,
        gs: f64,
    ) -> Result<()> {
        let (m, v) = match slot.take() {
            Some(mv) => mv,
            None => (
                Tensor::from_slice(host.0, p.shape(), p.device())?,
                Tensor::from_slice(host.1, p.shape(), p.device())?,
            ),
        };
        let g = (g.reshape(p.shape())?.to_dtype(candle_core::DType::F32)? * gs)?;
        let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
        let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
        let upd = ((&m / denom)? * step_size)?;
        let next = ((p.as_tensor() * decay)? - upd)?;
        p.set(&next)?;
        *slot = Some((m, v));
        Ok(())
    }

    pub fn steps_done(&self) -> usize {
        self.t
    }

    /// One update with learning rate `lr`; every gradient is multiplied by `grad_scale` first
    /// (gradient clipping).
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        if params.len() != grads.len() || params.len() != self.m.len() {
            return Err(Error::InvalidParams(
                "optimizer: parameter/gradient count mismatch".into(),
            ));
        }
        self.t += 1;
        let c = &self.config;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let eps = c.eps as f32;
        let gs = grad_scale as f32;
        for ((((_, p), g), (m, v)), mt) in params
            .iter()
            .zip(grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .zip(self.mt.iter_mut())
        {
            if g.elem_count() != p.elem_count() {
                return Err(Error::InvalidParams(
                    "optimizer: gradient shape differs from its parameter".into(),
                ));
            }
            if self.tensor_ops || !p.device().is_cpu() {
                let f = |x: f32| x as f64;
                Self::step_tensors(
                    p,
                    g,
                    mt,
                    (m.as_slice(), v.as_slice()),
                    (c.beta1, c.beta2),
                    f(step_size),
                    f(bc2_sqrt),
                    f(decay),
                    c.eps,
                    grad_scale,
                )?;
                continue;
            }
            let g = g.contiguous()?;
            let update = AdamWUpdate {
                state: std::sync::Mutex::new((m.as_mut_slice(), v.as_mut_slice())),
                b1,
                b2,
                step_size,
                bc2_sqrt,
                decay,
                eps,
                grad_scale: gs,
            };
            p.as_tensor().inplace_op2(&g, &update)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<i>`, `v.<i>`) and the update count, for a checkpoint.
    pub fn state(&self, params: &[(String, Var)]) -> Result<(Vec<(String, Tensor)>, usize)> {
        let mut out = Vec::new();
        for (i, (_, p)) in params.iter().enumerate() {
            let (m, v) = match self.mt.get(i) {
                Some(Some((m, v))) => (m.copy()?, v.copy()?),
                _ => (
                    Tensor::from_slice(&self.m[i], p.shape(), p.device())?,
                    Tensor::from_slice(&self.v[i], p.shape(), p.device())?,
                ),
            };
            out.push((format!("m.{i}"), m));
            out.push((format!("v.{i}"), v));
        }
        Ok((out, self.t))
    }

    /// Restores what [`AdamW::state`] saved.
    pub fn load_state(
        &mut self,
        params: &[(String, Var)],
        tensors: &std::collections::HashMap<String, Tensor>,
        t: usize,
    ) -> Result<()> {
        for (i, (name, p)) in params.iter().enumerate() {
            for (key, dst) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let k = format!("{key}.{i}");
                let src = tensors.get(&k).ok_or_else(|| {
                    Error::InvalidParams(format!("checkpoint lacks optimizer state {k} ({name})"))
                })?;
                if src.elem_count() != p.elem_count() {
                    return Err(Error::InvalidParams(format!(
                        "checkpoint optimizer state {k} has {} values, {name} has {}",
                        src.elem_count(),
                        p.elem_count()
                    )));
                }
                *dst = src.flatten_all()?.to_vec1::<f32>()?;
            }
            // The tensor-op update starts again from the restored host moments.
            if let Some(slot) = self.mt.get_mut(i) {
                *slot = None;
            }
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_the_reference_recipe() {
        let s = Schedule {
            kind: ScheduleKind::Cosine,
            peak_lr: 2e-4,
            warmup_steps: 4,
            total_steps: 40,
            final_frac: 0.1,
        };
        assert!((s.lr(1) - 5e-5).abs() < 1e-12);
        assert!((s.lr(4) - 2e-4).abs() < 1e-12);
        assert!((s.lr(40) - 2e-5).abs() < 1e-12);
        let mid = 2e-4 * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * 18.0 / 36.0).cos()));
        assert!((s.lr(22) - mid).abs() < 1e-12);
        let lin = Schedule {
            kind: ScheduleKind::Linear,
            ..s.clone()
        };
        assert!((lin.lr(40) - 2e-5).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr() {
        let dev = candle_core::Device::Cpu;
        let p = Var::from_vec(vec![1f32, -2.0, 3.0], 3, &dev).unwrap();
        let params = vec![("p".to_string(), p.clone())];
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -1.0, 0.0], &dev).unwrap();
        opt.step(&params, &[g], 0.1, 1.0).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        // Bias-corrected first step: -lr * sign(g) (0 where g = 0).
        assert!((got[0] - 0.9).abs() < 1e-5 && (got[1] + 1.9).abs() < 1e-5 && got[2] == 3.0);
    }

    /// The tensor-op update (a GPU's, `set_tensor_ops` on the CPU) follows the in-place one over
    /// several steps with weight decay and clipping, and its moments checkpoint and restore.
    #[test]
    fn adamw_tensor_ops_match_the_in_place_update() {
        let dev = candle_core::Device::Cpu;
        let init: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin()).collect();
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let run = |tensor_ops: bool| {
            let p = Var::from_vec(init.clone(), (5, 8), &dev).expect("adamw");
            let params = vec![("p".to_string(), p.clone())];
            let mut opt = AdamW::new(&params, cfg.clone()).expect("adamw");
            opt.set_tensor_ops(tensor_ops);
            for k in 0..4 {
                let g: Vec<f32> = (0..40).map(|i| ((i * 7 + k) as f32 * 0.11).cos()).collect();
                let g = Tensor::from_vec(g, (5, 8), &dev).expect("adamw");
                opt.step(&params, &[g], 1e-2, 0.5).expect("adamw");
            }
            let (state, t) = opt.state(&params).expect("adamw");
            let m = state[0]
                .1
                .flatten_all()
                .expect("adamw")
                .to_vec1::<f32>()
                .expect("adamw");
            (
                p.flatten_all()
                    .expect("adamw")
                    .to_vec1::<f32>()
                    .expect("adamw"),
                m,
                t,
            )
        };
        let (a, ma, ta) = run(false);
        let (b, mb, tb) = run(true);
        assert_eq!(ta, tb);
        assert_ne!(a, init, "the parameters moved");
        for (x, y) in a.iter().zip(&b).chain(ma.iter().zip(&mb)) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }
}
