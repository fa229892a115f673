//! Projections for training: `x W^T` on a frozen weight ([`frozen_linear`]: the input gradient
//! only, where candle's matmul backward would also compute a weight gradient nobody reads), on a
//! trained weight ([`linear`]: `dW` straight into the `[out, in]` layout), and with a LoRA branch
//! ([`lora_linear`]: `dx`, `dA`, `dB`, never `dW`). The LoRA branch's slice-level passes are
//! shared with the fused layer.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;

use super::gemm::{matmul_scaled, product};
use super::profile::prof;
use super::{borrow_f32, f32_slice, rows_features, threads, with_features, CResult};

// ---------------------------------------------------------------------------------------------
// Frozen linear
// ---------------------------------------------------------------------------------------------

/// `x W^T` for a frozen weight `w` `[out, in]`: differentiable in `x` only. `x` is `[rows, in]`.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let x = x.contiguous()?;
    x.apply_op1(FrozenLinear {
        w: w.contiguous()?.detach(),
    })
}

struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "attune-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("FrozenLinear.cpu_fwd");
        let x = f32_slice(s, l, "frozen linear input")?;
        let (rows, din) = rows_features(l.shape())?;
        let (dout, win) = self.w.dims2()?;
        if win != din {
            candle_core::bail!("frozen linear: input has {din} features, weight expects {win}")
        }
        borrow_f32!(w = self.w, "frozen linear weight");
        let out = product(
            rows,
            dout,
            din,
            x,
            (din, 1),
            w,
            (1, din),
            Parallelism::Rayon(threads()),
        );
        Ok((CpuStorage::F32(out), with_features(l.shape(), dout)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let _pg = prof("FrozenLinear.bwd");
        let (dout, din) = self.w.dims2()?;
        let rows = grad.elem_count() / dout.max(1);
        borrow_f32!(dy = grad, "frozen linear grad"; w = self.w, "frozen linear weight");
        let par = Parallelism::Rayon(threads());
        let dx = product(rows, din, dout, dy, (dout, 1), w, (din, 1), par);
        Ok(Some(Tensor::from_vec(dx, x.shape(), grad.device())?))
    }
}

// ---------------------------------------------------------------------------------------------
// Trained linear
// ---------------------------------------------------------------------------------------------

/// `x W^T` for a weight being trained (full fine-tuning): `x` `[rows, in]`, `w` `[out, in]`.
/// The backward pass computes `dx = dy W` (when `x` needs it) and `dW = dy^T x` straight into
/// the weight's `[out, in]` layout.
pub fn linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, TrainedLinear)
}

struct TrainedLinear;

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "attune-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("TrainedLinear.cpu_fwd");
        let x = f32_slice(s1, l1, "linear input")?;
        let w = f32_slice(s2, l2, "linear weight")?;
        let (rows, din) = rows_features(l1.shape())?;
        let (dout, win) = l2.shape().dims2()?;
        if win != din {
            candle_core::bail!("linear: input has {din} features, weight expects {win}")
        }
        let par = Parallelism::Rayon(threads());
        let out = product(rows, dout, din, x, (din, 1), w, (1, din), par);
        Ok((CpuStorage::F32(out), with_features(l1.shape(), dout)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("TrainedLinear.bwd");
        let (rows, din) = rows_features(x.shape())?;
        let (dout, _) = w.dims2()?;
        borrow_f32!(xv = x, "linear input"; wv = w, "linear weight"; dy = grad, "linear grad");
        let par = Parallelism::Rayon(threads());
        let dx = if x.track_op() {
            let dx = product(rows, din, dout, dy, (dout, 1), wv, (din, 1), par);
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = product(dout, din, rows, dy, (1, dout), xv, (din, 1), par);
            Some(Tensor::from_vec(dw, (dout, din), w.device())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA linear
// ---------------------------------------------------------------------------------------------

/// `x W^T + scale * (x A^T) B^T` for a frozen `w` `[out, in]` and LoRA `a` `[r, in]`, `b`
/// `[out, r]`; `x` is `[rows, in]`. One op: the low-rank product is accumulated into the base
/// product by the GEMM itself, and the backward pass computes `dx`, `dA`, `dB` (never `dW`).
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f32) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.contiguous()?.detach(),
            scale,
            xa: Mutex::new(None),
        },
    )
}

struct LoraLinear {
    w: Tensor,
    scale: f32,
    /// `x A^T` `[rows, r]` from the forward pass, which the backward pass needs again.
    xa: Mutex<Option<Vec<f32>>>,
}

/// The LoRA branch of a projection, `dst += scale * (x A^T) B^T` for `x` `[rows, in]`, `A`
/// `[r, in]`, `B` `[out, r]` (`dims` = `(rows, in, out, r)`); returns `x A^T` `[rows, r]`, which
/// the backward pass reads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_branch_forward(
    (rows, din, dout, r): (usize, usize, usize, usize),
    x: &[f32],
    a: &[f32],
    b: &[f32],
    scale: f32,
    dst: &mut [f32],
    par: Parallelism,
) -> Vec<f32> {
    let xa = product(rows, r, din, x, (din, 1), a, (1, din), par);
    matmul_scaled(
        rows,
        dout,
        r,
        dst,
        (dout, 1),
        true,
        &xa,
        (r, 1),
        b,
        (1, r),
        scale,
        par,
    );
    xa
}

/// The backward pass of [`lora_branch_forward`] for the output gradient `dy` `[rows, out]`: adds
/// `scale * (dy B) A` to `dx` when given, and returns `dA = scale * (dy B)^T x` when `x` is given
/// and `dB = scale * dy^T (x A^T)` when `xa` is.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_branch_backward(
    (rows, din, dout, r): (usize, usize, usize, usize),
    dy: &[f32],
    a: &[f32],
    b: &[f32],
    scale: f32,
    dx: Option<&mut [f32]>,
    x: Option<&[f32]>,
    xa: Option<&[f32]>,
    par: Parallelism,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    // u = dy B [rows, r]
    let u = product(rows, r, dout, dy, (dout, 1), b, (r, 1), par);
    if let Some(dx) = dx {
        matmul_scaled(
            rows,
            din,
            r,
            dx,
            (din, 1),
            true,
            &u,
            (r, 1),
            a,
            (din, 1),
            scale,
            par,
        );
    }
    let da = x.map(|x| {
        let mut da = vec![0f32; r * din];
        matmul_scaled(
            r,
            din,
            rows,
            &mut da,
            (din, 1),
            false,
            &u,
            (1, r),
            x,
            (din, 1),
            scale,
            par,
        );
        da
    });
    let db = xa.map(|xa| {
        let mut db = vec![0f32; dout * r];
        matmul_scaled(
            dout,
            r,
            rows,
            &mut db,
            (r, 1),
            false,
            dy,
            (1, dout),
            xa,
            (r, 1),
            scale,
            par,
        );
        db
    });
    (da, db)
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "attune-lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("LoraLinear.cpu_fwd");
        let x = f32_slice(s1, l1, "lora input")?;
        let a = f32_slice(s2, l2, "lora A")?;
        let b = f32_slice(s3, l3, "lora B")?;
        let (rows, din) = rows_features(l1.shape())?;
        let (r, a_in) = l2.shape().dims2()?;
        let (dout, b_r) = l3.shape().dims2()?;
        let (w_out, w_in) = self.w.dims2()?;
        if a_in != din || b_r != r || (w_out, w_in) != (dout, din) {
            candle_core::bail!("lora linear: shapes do not fit (x {rows}x{din}, A {r}x{a_in}, B {dout}x{b_r}, W {w_out}x{w_in})")
        }
        borrow_f32!(w = self.w, "lora base weight");
        let par = Parallelism::Rayon(threads());
        let mut y = product(rows, dout, din, x, (din, 1), w, (1, din), par);
        let t = lora_branch_forward((rows, din, dout, r), x, a, b, self.scale, &mut y, par);
        *self.xa.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok((CpuStorage::F32(y), with_features(l1.shape(), dout)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("LoraLinear.bwd");
        let (rows, din) = rows_features(x.shape())?;
        let (r, _) = a.dims2()?;
        let (dout, _) = b.dims2()?;
        borrow_f32!(
            xv = x, "lora input";
            av = a, "lora A";
            bv = b, "lora B";
            dy = grad, "lora grad";
            w = self.w, "lora base weight";
        );
        let par = Parallelism::Rayon(threads());
        let kept = self.xa.lock().unwrap_or_else(|e| e.into_inner()).take();
        let t = match kept {
            Some(t) if t.len() == rows * r => t,
            // A second backward through the same graph: recompute it.
            _ => product(rows, r, din, xv, (din, 1), av, (1, din), par),
        };
        let mut dx = product(rows, din, dout, dy, (dout, 1), w, (din, 1), par);
        let (da, db) = lora_branch_backward(
            (rows, din, dout, r),
            dy,
            av,
            bv,
            self.scale,
            Some(&mut dx),
            Some(xv),
            Some(&t),
            par,
        );
        let (Some(da), Some(db)) = (da, db) else {
            candle_core::bail!("lora linear: the branch's gradients were not computed")
        };
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(da, (r, din), dev)?),
            Some(Tensor::from_vec(db, (dout, r), dev)?),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kernels::max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn lora_linear_matches_basic_ops() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (9, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (5, 6), &dev).unwrap();
        let a = Var::randn(0f32, 1., (3, 6), &dev).unwrap();
        let b = Var::randn(0f32, 1., (5, 3), &dev).unwrap();
        let gy = Tensor::randn(0f32, 1., (9, 5), &dev).unwrap();
        let fast = lora_linear(&x, &w, &a, &b, 2.0).unwrap();
        let slow = (x.matmul(&w.t().unwrap()).unwrap()
            + (x.matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * 2.0)
                .unwrap())
        .unwrap();
        assert!(max_diff(&fast, &slow) < 1e-4);
        let gf = (fast * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&x, &a, &b] {
            assert!(max_diff(gf.get(t).unwrap(), gs.get(t).unwrap()) < 1e-4);
        }
    }

    #[test]
    fn trained_linear_matches_matmul_in_both_gradients() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (7, 5), &dev).unwrap();
        let w = Var::randn(0f32, 1., (3, 5), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (7, 3), &dev).unwrap();
        let a = linear(&x, &w).unwrap();
        let b = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
        assert!(max_diff(ga.get(&w).unwrap(), gb.get(&w).unwrap()) < 1e-5);
        // An input that is not tracked gets no gradient, the weight still does.
        let x0 = x.as_tensor().detach();
        let g = linear(&x0, &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x0).is_none() && g.get(&w).is_some());
    }

    #[test]
    fn frozen_linear_and_rms_norm_match_basic_ops() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (7, 5), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 5), &dev).unwrap();
        let gy = Tensor::randn(0f32, 1., (7, 3), &dev).unwrap();
        let a = frozen_linear(&x, &w).unwrap();
        let b = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
    }
}
