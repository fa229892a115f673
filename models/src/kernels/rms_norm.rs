//! RMSNorm, `x / sqrt(mean(x^2) + eps) * (w + offset)`, as one op with its backward pass (instead
//! of five, each keeping its own intermediate); the slice-level passes are shared with the fused
//! layer. `offset` is 0, or 1 for Gemma's `(1 + w)` norms (the weight stays the checkpoint's `w`,
//! so its gradient and its decay are the checkpoint's).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::profile::prof;
use super::{borrow_f32, f32_slice, CResult};

/// `x / sqrt(mean(x^2) + eps) * w` over the last dim; differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> CResult<Tensor> {
    rms_norm_offset(x, w, eps, 0.0)
}

/// `x / sqrt(mean(x^2) + eps) * (w + offset)` over the last dim; differentiable in `x` and `w`.
pub fn rms_norm_offset(x: &Tensor, w: &Tensor, eps: f32, offset: f32) -> CResult<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2(&w, RmsNormOp { eps, offset })
}

struct RmsNormOp {
    eps: f32,
    offset: f32,
}

/// candle's `rms_norm` of one row, step for step (`candle_nn::ops::RmsNorm`): the sum of squares
/// in order, `sqrt(sum / n + eps)`, then `x / m * w`.
pub(crate) fn rms_row(src: &[f32], w: &[f32], eps: f32, dst: &mut [f32]) {
    let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / src.len() as f32 + eps).sqrt();
    for ((d, s), w) in dst.iter_mut().zip(src).zip(w) {
        *d = *s / m * *w
    }
}

pub(crate) fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

/// `x * (w + offset) / rms(x)` row by row (`w.len()` features per row).
pub(crate) fn rms_forward(x: &[f32], w: &[f32], eps: f32, offset: f32) -> Vec<f32> {
    let _pg = super::profile::prof("rms.fwd");
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    super::pool::chunks_mut(&mut out, h * 64, |i, o| {
        let xi = &x[i * h * 64..i * h * 64 + o.len()];
        for (orow, xrow) in o.chunks_mut(h).zip(xi.chunks(h)) {
            let r = inv_rms(xrow, eps);
            for ((o, &x), &w) in orow.iter_mut().zip(xrow).zip(w) {
                *o = x * r * (w + offset);
            }
        }
    });
    out
}

/// The backward pass of [`rms_forward`] for the output gradient `dy`: writes `dx` (adds to it
/// when `accumulate`) and returns `dw` when `want_dw` (empty otherwise).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_backward(
    x: &[f32],
    w: &[f32],
    eps: f32,
    offset: f32,
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    want_dw: bool,
) -> Vec<f32> {
    let _pg = super::profile::prof("rms.bwd");
    let h = w.len();
    let chunk = h * 64;
    let n_chunks = x.len().div_ceil(chunk);
    let mut dw_parts = vec![0f32; if want_dw { n_chunks * h } else { 0 }];
    let mut dw_chunks: Vec<Option<&mut [f32]>> = if want_dw {
        dw_parts.chunks_mut(h).map(Some).collect()
    } else {
        (0..n_chunks).map(|_| None).collect()
    };
    super::pool::chunks_mut2(dx, chunk, &mut dw_chunks, 1, |i, dxc, dwp| {
        let s = i * chunk..i * chunk + dxc.len();
        let (xc, gc, dwp) = (&x[s.clone()], &dy[s], &mut dwp[0]);
        for ((dxr, xr), gr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(gc.chunks(h)) {
            let r = inv_rms(xr, eps);
            // g' = dy * w; dx = r g' - x r^3 mean(g' x)
            let mut dot = 0f32;
            for ((&g, &w), &x) in gr.iter().zip(w).zip(xr) {
                dot += g * (w + offset) * x;
            }
            let c = r * r * r * dot / h as f32;
            if accumulate {
                for (((d, &g), &w), &x) in dxr.iter_mut().zip(gr).zip(w).zip(xr) {
                    *d += r * g * (w + offset) - x * c;
                }
            } else {
                for (((d, &g), &w), &x) in dxr.iter_mut().zip(gr).zip(w).zip(xr) {
                    *d = r * g * (w + offset) - x * c;
                }
            }
            if let Some(dwp) = dwp {
                for ((dw, &g), &x) in dwp.iter_mut().zip(gr).zip(xr) {
                    *dw += g * x * r;
                }
            }
        }
    });
    let mut dw = vec![0f32; if want_dw { h } else { 0 }];
    for part in dw_parts.chunks(h.max(1)) {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    dw
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "attune-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("RmsNormOp.cpu_fwd");
        let x = f32_slice(s1, l1, "rms norm input")?;
        let w = f32_slice(s2, l2, "rms norm weight")?;
        let h = w.len();
        if h == 0 || l1.shape().dims().last() != Some(&h) {
            candle_core::bail!("rms norm: input {:?} and weight [{h}] differ", l1.shape())
        }
        let out = rms_forward(x, w, self.eps, self.offset);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("RmsNormOp.bwd");
        borrow_f32!(
            xv = x, "rms norm input";
            wv = w, "rms norm weight";
            gv = grad, "rms norm grad";
        );
        let mut dx = vec![0f32; xv.len()];
        let dw = rms_backward(xv, wv, self.eps, self.offset, gv, &mut dx, false, true);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kernels::max_diff;
    use candle_core::{Device, Var, D};

    #[test]
    fn rms_norm_matches_basic_ops() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (7, 5), &dev).unwrap();
        let nw = Var::randn(1f32, 0.1, 5, &dev).unwrap();
        let gy = Tensor::randn(0f32, 1., (7, 5), &dev).unwrap();
        let a = rms_norm(&x, &nw, 1e-5).unwrap();
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let b = x
            .broadcast_div(&(&var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&nw)
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4);
        assert!(max_diff(ga.get(&nw).unwrap(), gb.get(&nw).unwrap()) < 1e-4);
        // Gemma's (1 + w): the same as a plain norm of w + 1, gradients included.
        let a = rms_norm_offset(&x, &nw, 1e-5, 1.0).unwrap();
        let b = x
            .broadcast_div(&(&var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&(nw.as_tensor() + 1.0).unwrap())
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4);
        assert!(max_diff(ga.get(&nw).unwrap(), gb.get(&nw).unwrap()) < 1e-4);
    }
}
