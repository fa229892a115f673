//! Fused training ops with their own backward pass, for the CPU.
//!
//! candle's autograd builds the backward pass from basic ops. Three places cost too much that way:
//! - **attention**: the `[batch, heads, seq, seq]` scores, masked scores and probabilities would be
//!   kept for every layer (about 150 MB each per layer at batch 4 x 1024 tokens). [`attention`]
//!   keeps only the output and one log-sum-exp per row, and recomputes the probabilities head by
//!   head in the backward pass (the FlashAttention scheme, Dao et al. 2022, with GEMMs per head);
//! - **frozen projections**: for `x W^T` with a constant `W`, candle still computes `x^T dy`, a
//!   whole weight gradient nobody reads. [`frozen_linear`] computes `dy W` only;
//! - **RMSNorm**: one op instead of five, each keeping its own intermediate.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32, got another dtype")
    };
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor")
    }
    Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

fn tensor_vec(t: &Tensor) -> CResult<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]`, every operand addressed by (row stride, column stride).
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The extents the strides reach must lie inside the slices.
    debug_assert!((m - 1) * dst_rs + (n - 1) * dst_cs < dst.len());
    debug_assert!(k == 0 || (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len());
    debug_assert!(k == 0 || (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len());
    assert!((m - 1) * dst_rs + (n - 1) * dst_cs < dst.len(), "matmul dst bounds");
    assert!(k == 0 || (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(), "matmul lhs bounds");
    assert!(k == 0 || (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(), "matmul rhs bounds");
    // SAFETY: the asserts above keep every access the strides describe inside the slices, and
    // `dst` does not alias `lhs` or `rhs` (a `&mut` and two `&`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Causal attention
// ---------------------------------------------------------------------------------------------

/// Causal self-attention without a cache: `q` `[b, heads, seq, hd]`, `k`/`v` `[b, kv_heads, seq,
/// hd]` (grouped-query: `heads / kv_heads` query heads share one kv head), all contiguous f32.
/// Returns `[b, heads, seq, hd]`. Differentiable in all three inputs.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> CResult<Tensor> {
    let q = q.contiguous()?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    q.apply_op3(
        &k,
        &v,
        Attention {
            scale,
            lse: Mutex::new(None),
        },
    )
}

struct Attention {
    scale: f32,
    /// Log-sum-exp of every score row `[b, heads, seq]`, kept by the forward pass for the backward.
    lse: Mutex<Option<Vec<f32>>>,
}

#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    nh: usize,
    nkv: usize,
    l: usize,
    hd: usize,
}

impl AttnDims {
    fn of(q: &Shape, k: &Shape, v: &Shape) -> CResult<AttnDims> {
        let (b, nh, l, hd) = q.dims4()?;
        let (kb, nkv, kl, khd) = k.dims4()?;
        if (kb, kl, khd) != (b, l, hd) || k.dims() != v.dims() || nkv == 0 || nh % nkv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit together",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        Ok(AttnDims { b, nh, nkv, l, hd })
    }
    fn groups(&self) -> usize {
        self.nh / self.nkv
    }
}

/// Scores `s = scale * q k^T` for one head into `s` `[l, l]`, then turns the causal part of each
/// row into probabilities in place (zeros above the diagonal). With `lse` given, uses it (the
/// backward pass); otherwise computes it into `lse_out`.
fn head_probs(
    d: AttnDims,
    qh: &[f32],
    kg: &[f32],
    scale: f32,
    s: &mut [f32],
    lse_in: Option<&[f32]>,
    lse_out: &mut [f32],
) {
    let (l, hd) = (d.l, d.hd);
    matmul(
        l,
        l,
        hd,
        s,
        (l, 1),
        false,
        qh,
        (hd, 1),
        kg,
        (1, hd),
        Parallelism::None,
    );
    for i in 0..l {
        let row = &mut s[i * l..(i + 1) * l];
        let (live, dead) = row.split_at_mut(i + 1);
        dead.fill(0.0);
        match lse_in {
            Some(lse) => {
                let m = lse[i];
                for x in live.iter_mut() {
                    *x = (*x * scale - m).exp();
                }
            }
            None => {
                let mut m = f32::NEG_INFINITY;
                for x in live.iter_mut() {
                    *x *= scale;
                    m = m.max(*x);
                }
                let mut sum = 0f32;
                for x in live.iter_mut() {
                    *x = (*x - m).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                for x in live.iter_mut() {
                    *x *= inv;
                }
                lse_out[i] = m + sum.ln();
            }
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attune-causal-attention"
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
        let d = AttnDims::of(l1.shape(), l2.shape(), l3.shape())?;
        let q = f32_slice(s1, l1, "attention q")?;
        let k = f32_slice(s2, l2, "attention k")?;
        let v = f32_slice(s3, l3, "attention v")?;
        let (l, hd, g) = (d.l, d.hd, d.groups());
        let head = l * hd;
        let mut out = vec![0f32; d.b * d.nh * head];
        let mut lse = vec![0f32; d.b * d.nh * l];
        // One task per (batch, kv head): its query heads, their outputs and log-sum-exps.
        out.par_chunks_mut(g * head)
            .zip(lse.par_chunks_mut(g * l))
            .enumerate()
            .for_each(|(task, (out_t, lse_t))| {
                let kg = &k[task * head..(task + 1) * head];
                let vg = &v[task * head..(task + 1) * head];
                let mut s = vec![0f32; l * l];
                for j in 0..g {
                    let h = task * g + j;
                    let qh = &q[h * head..(h + 1) * head];
                    head_probs(d, qh, kg, self.scale, &mut s, None, &mut lse_t[j * l..(j + 1) * l]);
                    matmul(
                        l,
                        hd,
                        l,
                        &mut out_t[j * head..(j + 1) * head],
                        (hd, 1),
                        false,
                        &s,
                        (l, 1),
                        vg,
                        (hd, 1),
                        Parallelism::None,
                    );
                }
            });
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = AttnDims::of(q.shape(), k.shape(), v.shape())?;
        let lse_guard = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        let Some(lse) = lse_guard.as_ref() else {
            candle_core::bail!("attention backward before forward")
        };
        let (qv, kv, vv) = (tensor_vec(q)?, tensor_vec(k)?, tensor_vec(v)?);
        let (ov, dov) = (tensor_vec(res)?, tensor_vec(grad_res)?);
        let (l, hd, g) = (d.l, d.hd, d.groups());
        let head = l * hd;
        let mut dq = vec![0f32; d.b * d.nh * head];
        let mut dk = vec![0f32; d.b * d.nkv * head];
        let mut dv = vec![0f32; d.b * d.nkv * head];
        let scale = self.scale;
        dq.par_chunks_mut(g * head)
            .zip(dk.par_chunks_mut(head).zip(dv.par_chunks_mut(head)))
            .enumerate()
            .for_each(|(task, (dq_t, (dk_g, dv_g)))| {
                let kg = &kv[task * head..(task + 1) * head];
                let vg = &vv[task * head..(task + 1) * head];
                let mut p = vec![0f32; l * l];
                let mut dp = vec![0f32; l * l];
                let mut unused = vec![0f32; 0];
                for j in 0..g {
                    let h = task * g + j;
                    let qh = &qv[h * head..(h + 1) * head];
                    let oh = &ov[h * head..(h + 1) * head];
                    let doh = &dov[h * head..(h + 1) * head];
                    head_probs(d, qh, kg, scale, &mut p, Some(&lse[h * l..(h + 1) * l]), &mut unused);
                    // dV += P^T dO
                    matmul(l, hd, l, dv_g, (hd, 1), true, &p, (1, l), doh, (hd, 1), Parallelism::None);
                    // dP = dO V^T
                    matmul(l, l, hd, &mut dp, (l, 1), false, doh, (hd, 1), vg, (1, hd), Parallelism::None);
                    // dS = P * (dP - rowsum(dO * O)) * scale (P is zero above the diagonal)
                    for i in 0..l {
                        let di: f32 = doh[i * hd..(i + 1) * hd]
                            .iter()
                            .zip(&oh[i * hd..(i + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum();
                        let pr = &p[i * l..i * l + i + 1];
                        let dr = &mut dp[i * l..(i + 1) * l];
                        for (x, &pp) in dr[..=i].iter_mut().zip(pr) {
                            *x = pp * (*x - di) * scale;
                        }
                        dr[i + 1..].fill(0.0);
                    }
                    // dQ = dS K ; dK += dS^T Q
                    matmul(
                        l,
                        hd,
                        l,
                        &mut dq_t[j * head..(j + 1) * head],
                        (hd, 1),
                        false,
                        &dp,
                        (l, 1),
                        kg,
                        (hd, 1),
                        Parallelism::None,
                    );
                    matmul(l, hd, l, dk_g, (hd, 1), true, &dp, (1, l), qh, (hd, 1), Parallelism::None);
                }
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

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
        let x = f32_slice(s, l, "frozen linear input")?;
        let (rows, din) = l.shape().dims2()?;
        let (dout, win) = self.w.dims2()?;
        if win != din {
            candle_core::bail!("frozen linear: input has {din} features, weight expects {win}")
        }
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(wc) = &*ws else {
            candle_core::bail!("frozen linear: weight is not on the CPU")
        };
        let w = f32_slice(wc, wl, "frozen linear weight")?;
        let mut out = vec![0f32; rows * dout];
        matmul(
            rows,
            dout,
            din,
            &mut out,
            (dout, 1),
            false,
            x,
            (din, 1),
            w,
            (1, din),
            Parallelism::Rayon(threads()),
        );
        Ok((CpuStorage::F32(out), Shape::from((rows, dout))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

/// `x / sqrt(mean(x^2) + eps) * w` over the last dim; differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> CResult<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2(&w, RmsNormOp { eps })
}

struct RmsNormOp {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
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
        let x = f32_slice(s1, l1, "rms norm input")?;
        let w = f32_slice(s2, l2, "rms norm weight")?;
        let h = w.len();
        if h == 0 || l1.shape().dims().last() != Some(&h) {
            candle_core::bail!("rms norm: input {:?} and weight [{h}] differ", l1.shape())
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h * 64)
            .zip(x.par_chunks(h * 64))
            .for_each(|(o, xi)| {
                for (orow, xrow) in o.chunks_mut(h).zip(xi.chunks(h)) {
                    let r = inv_rms(xrow, self.eps);
                    for ((o, &x), &w) in orow.iter_mut().zip(xrow).zip(w) {
                        *o = x * r * w;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let xv = tensor_vec(x)?;
        let wv = tensor_vec(w)?;
        let gv = tensor_vec(grad)?;
        let h = wv.len();
        let chunk = h * 64;
        let n_chunks = xv.len().div_ceil(chunk);
        let mut dx = vec![0f32; xv.len()];
        let mut dw_parts = vec![0f32; n_chunks * h];
        dx.par_chunks_mut(chunk)
            .zip(xv.par_chunks(chunk).zip(gv.par_chunks(chunk)))
            .zip(dw_parts.par_chunks_mut(h))
            .for_each(|((dxc, (xc, gc)), dwp)| {
                for ((dxr, xr), gr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(gc.chunks(h)) {
                    let r = inv_rms(xr, self.eps);
                    // g' = dy * w; dx = r g' - x r^3 mean(g' x)
                    let mut dot = 0f32;
                    for ((&g, &w), &x) in gr.iter().zip(&wv).zip(xr) {
                        dot += g * w * x;
                    }
                    let c = r * r * r * dot / h as f32;
                    for (((d, &g), &w), &x) in dxr.iter_mut().zip(gr).zip(&wv).zip(xr) {
                        *d = r * g * w - x * c;
                    }
                    for ((dw, &g), &x) in dwp.iter_mut().zip(gr).zip(xr) {
                        *dw += g * x * r;
                    }
                }
            });
        let mut dw = vec![0f32; h];
        for part in dw_parts.chunks(h) {
            for (a, b) in dw.iter_mut().zip(part) {
                *a += b;
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

/// Per-row negative log-likelihood `-log softmax(logits)[target]`: `logits` `[n, vocab]`,
/// `targets` `n` ids; returns `[n]`. Differentiable in `logits`, keeping no `[n, vocab]`
/// intermediate besides the logits themselves.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if n != targets.len() {
        candle_core::bail!("cross entropy: {n} rows but {} targets", targets.len())
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross entropy: target id {t} outside the vocabulary of {vocab}")
    }
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: targets.to_vec(),
    })
}

struct CrossEntropy {
    targets: Vec<u32>,
}

/// (max, log-sum-exp) of a row.
fn row_lse(row: &[f32]) -> (f32, f32) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = row.iter().map(|&x| (x - m).exp()).sum();
    (m, m + s.ln())
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "attune-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "cross entropy logits")?;
        let (n, v) = l.shape().dims2()?;
        let mut out = vec![0f32; n];
        out.par_iter_mut()
            .zip(x.par_chunks(v))
            .zip(self.targets.par_iter())
            .for_each(|((o, row), &t)| {
                let (_, lse) = row_lse(row);
                *o = lse - row[t as usize];
            });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (n, v) = logits.dims2()?;
        let x = tensor_vec(logits)?;
        let g = tensor_vec(grad)?;
        let mut dx = vec![0f32; n * v];
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(g.par_iter().zip(self.targets.par_iter()))
            .for_each(|((d, row), (&gr, &t))| {
                let (_, lse) = row_lse(row);
                for (di, &xi) in d.iter_mut().zip(row) {
                    *di = (xi - lse).exp() * gr;
                }
                d[t as usize] -= gr;
            });
        Ok(Some(Tensor::from_vec(dx, (n, v), logits.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let (b, nh, l, hd) = q.dims4().unwrap();
        let nkv = k.dim(1).unwrap();
        let g = nh / nkv;
        let k = k
            .unsqueeze(2)
            .unwrap()
            .broadcast_as((b, nkv, g, l, hd))
            .unwrap()
            .reshape((b, nh, l, hd))
            .unwrap();
        let v = v
            .unsqueeze(2)
            .unwrap()
            .broadcast_as((b, nkv, g, l, hd))
            .unwrap()
            .reshape((b, nh, l, hd))
            .unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let mut m = vec![0f32; l * l];
        for i in 0..l {
            for j in i + 1..l {
                m[i * l + j] = f32::NEG_INFINITY;
            }
        }
        let m = Tensor::from_vec(m, (l, l), &Device::Cpu).unwrap();
        let s = s.broadcast_add(&m).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn attention_matches_naive_forward_and_backward() {
        let dev = Device::Cpu;
        let (b, nh, nkv, l, hd) = (2, 6, 2, 13, 8);
        let q = Var::randn(0f32, 1., (b, nh, l, hd), &dev).unwrap();
        let k = Var::randn(0f32, 1., (b, nkv, l, hd), &dev).unwrap();
        let v = Var::randn(0f32, 1., (b, nkv, l, hd), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (b, nh, l, hd), &dev).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let fast = attention(&q, &k, &v, scale as f32).unwrap();
        let slow = naive_attention(&q, &k, &v, scale);
        assert!(max_diff(&fast, &slow) < 1e-5);
        let gf = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&q, &k, &v] {
            let d = max_diff(gf.get(t).unwrap(), gs.get(t).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }

    #[test]
    fn cross_entropy_matches_log_softmax() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 3., (6, 11), &dev).unwrap();
        let t = [0u32, 3, 10, 5, 5, 1];
        let w = Tensor::randn(0f32, 1., 6, &dev).unwrap();
        let a = cross_entropy(&x, &t).unwrap();
        let ls = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
        let idx = Tensor::new(&t, &dev).unwrap().unsqueeze(1).unwrap();
        let b = ls.gather(&idx, 1).unwrap().squeeze(1).unwrap().neg().unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
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

        let nw = Var::randn(1f32, 0.1, 5, &dev).unwrap();
        let gy = Tensor::randn(0f32, 1., (7, 5), &dev).unwrap();
        let a = rms_norm(&x, &nw, 1e-5).unwrap();
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let b = x
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&nw)
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4);
        assert!(max_diff(ga.get(&nw).unwrap(), gb.get(&nw).unwrap()) < 1e-4);
    }
}
