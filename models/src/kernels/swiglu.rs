//! SwiGLU, `silu(gate) * up`, as an op with its backward pass, and gate, up and SwiGLU as one op
//! ([`gate_up_swiglu`]); GeGLU, `gelu_tanh(gate) * up` (Gemma), as an op ([`geglu`]); the
//! slice-level passes ([`gated_forward`], [`gated_backward`]) are shared with the fused layer.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;

use super::gemm::{matmul, product};
use super::profile::prof;
use super::{borrow_f32, f32_slice, rows_features, threads, with_features, CResult};

/// `silu(gate) * up`, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        )
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// `silu(g) * u`, in chunks across the thread pool.
pub(crate) fn swiglu_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let _pg = super::profile::prof("swiglu.fwd");
    let mut out = vec![0f32; g.len()];
    super::pool::chunks_mut(&mut out, SWIGLU_CHUNK, |i, o| {
        let s = i * SWIGLU_CHUNK..i * SWIGLU_CHUNK + o.len();
        super::simd::silu_mul(&g[s.clone()], &u[s], o)
    });
    out
}

/// The gradients `(dg, du)` of [`swiglu_forward`] for the output gradient `dy`.
pub(crate) fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let _pg = super::profile::prof("swiglu.bwd");
    const C: usize = SWIGLU_CHUNK;
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    super::pool::chunks_mut2(&mut dg, C, &mut du, C, |i, dg, du| {
        let s = i * C..i * C + dg.len();
        super::simd::silu_mul_bwd(&g[s.clone()], &u[s.clone()], &dy[s], dg, du)
    });
    (dg, du)
}

/// Elements per task of the SwiGLU passes.
const SWIGLU_CHUNK: usize = 1 << 14;

/// The gate's activation in a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAct {
    /// `silu(g) * u` (SwiGLU).
    Silu,
    /// `gelu_tanh(g) * u` (GeGLU with GELU's tanh approximation, PyTorch's `gelu(approximate="tanh")`).
    GeluTanh,
}

const GELU_K: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_C: f32 = 0.044_715;

/// `act(g) * u`.
pub(crate) fn gated_forward(act: GateAct, g: &[f32], u: &[f32]) -> Vec<f32> {
    match act {
        GateAct::Silu => swiglu_forward(g, u),
        GateAct::GeluTanh => {
            let mut out = vec![0f32; g.len()];
            super::pool::chunks_mut(&mut out, SWIGLU_CHUNK, |i, o| {
                let s = i * SWIGLU_CHUNK..i * SWIGLU_CHUNK + o.len();
                let (g, u) = (&g[s.clone()], &u[s]);
                for ((o, &x), &u) in o.iter_mut().zip(g).zip(u) {
                    let t = (GELU_K * (x + GELU_C * x * x * x)).tanh();
                    *o = 0.5 * x * (1.0 + t) * u;
                }
            });
            out
        }
    }
}

/// The gradients `(dg, du)` of [`gated_forward`] for the output gradient `dy`.
pub(crate) fn gated_backward(
    act: GateAct,
    g: &[f32],
    u: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    match act {
        GateAct::Silu => swiglu_backward(g, u, dy),
        GateAct::GeluTanh => {
            const C: usize = SWIGLU_CHUNK;
            let mut dg = vec![0f32; g.len()];
            let mut du = vec![0f32; g.len()];
            super::pool::chunks_mut2(&mut dg, C, &mut du, C, |i, dg, du| {
                let s = i * C..i * C + dg.len();
                let (g, u, dy) = (&g[s.clone()], &u[s.clone()], &dy[s]);
                for ((((dg, du), &x), &u), &d) in
                    dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy)
                {
                    let t = (GELU_K * (x + GELU_C * x * x * x)).tanh();
                    let gelu = 0.5 * x * (1.0 + t);
                    let dgelu = 0.5 * (1.0 + t)
                        + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x * x);
                    *du = d * gelu;
                    *dg = d * u * dgelu;
                }
            });
            (dg, du)
        }
    }
}

/// `gelu_tanh(gate) * up`, differentiable in both.
pub fn geglu(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "geglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        )
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, GeGlu)
}

struct GeGlu;

impl CustomOp2 for GeGlu {
    fn name(&self) -> &'static str {
        "attune-geglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("GeGlu.cpu_fwd");
        let g = f32_slice(s1, l1, "geglu gate")?;
        let u = f32_slice(s2, l2, "geglu up")?;
        Ok((
            CpuStorage::F32(gated_forward(GateAct::GeluTanh, g, u)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("GeGlu.bwd");
        borrow_f32!(g = gate, "geglu gate"; u = up, "geglu up"; dy = grad, "geglu grad");
        if u.len() != g.len() || dy.len() != g.len() {
            candle_core::bail!("geglu backward: gate, up and grad sizes differ")
        }
        let (dg, du) = gated_backward(GateAct::GeluTanh, g, u, dy);
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), dev)?),
            Some(Tensor::from_vec(du, up.shape(), dev)?),
        ))
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "attune-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("SwiGlu.cpu_fwd");
        let g = f32_slice(s1, l1, "swiglu gate")?;
        let u = f32_slice(s2, l2, "swiglu up")?;
        Ok((CpuStorage::F32(swiglu_forward(g, u)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("SwiGlu.bwd");
        borrow_f32!(g = gate, "swiglu gate"; u = up, "swiglu up"; dy = grad, "swiglu grad");
        if u.len() != g.len() || dy.len() != g.len() {
            candle_core::bail!("swiglu backward: gate, up and grad sizes differ")
        }
        let (dg, du) = swiglu_backward(g, u, dy);
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), dev)?),
            Some(Tensor::from_vec(du, up.shape(), dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Gate, up and SwiGLU in one op
// ---------------------------------------------------------------------------------------------

/// `silu(x Wg^T) * (x Wu^T)`, the first half of a SwiGLU MLP, for dense weights `wg`, `wu`
/// `[inter, in]` (trained or frozen); `x` `[..., in]`. One graph node instead of three: the gate
/// and up products stay inside the op (kept for the backward pass), so the backward pass
/// allocates no gradient buffers for them. Differentiable in `x` and in whichever weight is a
/// variable.
pub fn gate_up_swiglu(x: &Tensor, wg: &Tensor, wu: &Tensor) -> CResult<Tensor> {
    if wg.dims() != wu.dims() {
        candle_core::bail!(
            "gate/up: weights {:?} and {:?} differ",
            wg.dims(),
            wu.dims()
        )
    }
    x.contiguous()?.apply_op3(
        &wg.contiguous()?,
        &wu.contiguous()?,
        GateUpSwiglu {
            kept: Mutex::new(None),
        },
    )
}

struct GateUpSwiglu {
    /// The gate and up products `[rows, inter]` from the forward pass.
    kept: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl GateUpSwiglu {
    fn products(
        x: &[f32],
        wg: &[f32],
        wu: &[f32],
        rows: usize,
        din: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let inter = wg.len() / din.max(1);
        let par = Parallelism::Rayon(threads());
        let g = product(rows, inter, din, x, (din, 1), wg, (1, din), par);
        let u = product(rows, inter, din, x, (din, 1), wu, (1, din), par);
        (g, u)
    }
}

impl CustomOp3 for GateUpSwiglu {
    fn name(&self) -> &'static str {
        "attune-gate-up-swiglu"
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
        let _pg = prof("GateUpSwiglu.cpu_fwd");
        let x = f32_slice(s1, l1, "gate/up input")?;
        let wg = f32_slice(s2, l2, "gate weight")?;
        let wu = f32_slice(s3, l3, "up weight")?;
        let (rows, din) = rows_features(l1.shape())?;
        let (inter, w_in) = l2.shape().dims2()?;
        if w_in != din {
            candle_core::bail!("gate/up: input has {din} features, the weights expect {w_in}")
        }
        let (g, u) = Self::products(x, wg, wu, rows, din);
        let h = swiglu_forward(&g, &u);
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some((g, u));
        Ok((CpuStorage::F32(h), with_features(l1.shape(), inter)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wg: &Tensor,
        wu: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("GateUpSwiglu.bwd");
        let (rows, din) = rows_features(x.shape())?;
        let (inter, _) = wg.dims2()?;
        borrow_f32!(
            xv = x, "gate/up input";
            wgv = wg, "gate weight";
            wuv = wu, "up weight";
            dh = grad, "gate/up grad";
        );
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (g, u) = match kept {
            Some(k) => k,
            // A second backward through the same graph: recompute the products.
            None => Self::products(xv, wgv, wuv, rows, din),
        };
        if dh.len() != g.len() {
            candle_core::bail!(
                "gate/up backward: grad has {} values, expected {}",
                dh.len(),
                g.len()
            )
        }
        let (dg, du) = swiglu_backward(&g, &u, dh);
        drop((g, u));
        let par = Parallelism::Rayon(threads());
        let dx = if x.track_op() {
            // dx = dg Wg + du Wu
            let mut dx = product(rows, din, inter, &dg, (inter, 1), wgv, (din, 1), par);
            matmul(
                rows,
                din,
                inter,
                &mut dx,
                (din, 1),
                true,
                &du,
                (inter, 1),
                wuv,
                (din, 1),
                par,
            );
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        // dW = d^T x for a trained weight
        let dw = |d: &[f32], w: &Tensor| -> CResult<Option<Tensor>> {
            if !w.track_op() {
                return Ok(None);
            }
            let dw = product(inter, din, rows, d, (1, inter), xv, (din, 1), par);
            Ok(Some(Tensor::from_vec(dw, (inter, din), w.device())?))
        };
        Ok((dx, dw(&dg, wg)?, dw(&du, wu)?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kernels::max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn swiglu_matches_candle() {
        let dev = Device::Cpu;
        let g = Var::randn(0f32, 2., (7, 9), &dev).unwrap();
        let u = Var::randn(0f32, 1., (7, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (7, 9), &dev).unwrap();
        let fast = swiglu(&g, &u).unwrap();
        let slow = (g.silu().unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&fast, &slow) < 1e-5);
        let gf = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&g).unwrap(), gs.get(&g).unwrap()) < 1e-5);
        assert!(max_diff(gf.get(&u).unwrap(), gs.get(&u).unwrap()) < 1e-5);
    }

    #[test]
    fn geglu_matches_candle_gelu_tanh() {
        let dev = Device::Cpu;
        let g = Var::randn(0f32, 2., (7, 9), &dev).unwrap();
        let u = Var::randn(0f32, 1., (7, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (7, 9), &dev).unwrap();
        let fast = geglu(&g, &u).unwrap();
        // candle's `gelu` is the tanh approximation, with its own backward pass.
        let slow = (g.gelu().unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&fast, &slow) < 1e-5);
        let gf = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&g).unwrap(), gs.get(&g).unwrap()) < 1e-4);
        assert!(max_diff(gf.get(&u).unwrap(), gs.get(&u).unwrap()) < 1e-5);
    }

    #[test]
    fn gate_up_swiglu_matches_the_separate_ops() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 5), &dev).unwrap();
        let wg = Var::randn(0f32, 1., (17, 5), &dev).unwrap();
        let wu = Var::randn(0f32, 1., (17, 5), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (2, 3, 17), &dev).unwrap();
        let a = gate_up_swiglu(&x, &wg, &wu).unwrap();
        assert_eq!(a.dims(), &[2, 3, 17]);
        let g = x.broadcast_matmul(&wg.t().unwrap()).unwrap();
        let u = x.broadcast_matmul(&wu.t().unwrap()).unwrap();
        let b = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let la = (&a * &r).unwrap().sum_all().unwrap();
        let ga = la.backward().unwrap();
        let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &wg, &wu] {
            let d = max_diff(ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        // A second backward recomputes the products it gave away.
        let again = la.backward().unwrap();
        assert!(max_diff(again.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4);
        // Frozen weights get no gradient.
        let (fg, fu) = (wg.as_tensor().detach(), wu.as_tensor().detach());
        let gf = gate_up_swiglu(&x, &fg, &fu)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(gf.get(&fg).is_none() && gf.get(&fu).is_none() && gf.get(&x).is_some());
        assert!(gate_up_swiglu(&x, &wg, &wu.as_tensor().narrow(0, 0, 3).unwrap()).is_err());
    }
}
