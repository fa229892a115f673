//! A frozen decoder layer as one training op.
//!
//! When nothing inside a layer is trained (prompt tuning; a layer LoRA does not touch), the
//! gradient only has to flow through it to the layer's input. Built from one graph node per
//! norm, projection, rotation and residual add, the layer costs candle's backward pass a
//! zero-filled buffer and an add for every node's input, plus a tensor per intermediate.
//! [`frozen_block`] runs the whole layer — RMSNorm, q/k/v, rotary embeddings, causal attention,
//! `o_proj` and its residual, RMSNorm, gate/up, SwiGLU, `down_proj` and its residual — as one
//! node, keeps just what its backward pass reads (the rotated q and k, v, the attention output
//! and log-sum-exp, the mid-layer residual, the gate and up products), accumulates the three
//! q/k/v input gradients and the two residual branches in place, and computes no weight
//! gradient.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::ops::{
    attention_backward, attention_forward, borrow_f32, f32_slice, matmul, product, prof,
    rms_backward, rms_forward, rope_in_place, threads, AttnDims,
};

type CResult<T> = candle_core::Result<T>;

/// The frozen weights of one decoder layer: the two norms' scales `[hidden]` and the seven
/// projections `[out, in]`, all dense f32 (no bias, no LoRA branch).
#[derive(Clone, Copy)]
pub struct FrozenLayer<'a> {
    pub input_norm: &'a Tensor,
    pub input_eps: f32,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub o: &'a Tensor,
    pub post_norm: &'a Tensor,
    pub post_eps: f32,
    pub gate: &'a Tensor,
    pub up: &'a Tensor,
    pub down: &'a Tensor,
    pub heads: usize,
    pub kv_heads: usize,
}

/// The layer `w` applied to `x` `[b, seq, hidden]` (rotary tables `cos`/`sin` `[seq, hd / 2]`),
/// differentiable in `x` only.
pub fn frozen_block(x: &Tensor, w: FrozenLayer, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let (_, l, hidden) = x.dims3()?;
    let (seq, half) = cos.dims2()?;
    let nq = w.q.dim(0)?;
    let nkv = w.k.dim(0)?;
    let inter = w.gate.dim(0)?;
    let hd = half * 2;
    let shapes_fit = seq == l
        && sin.dims() == cos.dims()
        && w.heads > 0
        && w.kv_heads > 0
        && w.heads.is_multiple_of(w.kv_heads)
        && nq == w.heads * hd
        && nkv == w.kv_heads * hd
        && w.input_norm.dims() == [hidden]
        && w.post_norm.dims() == [hidden]
        && w.q.dims() == [nq, hidden]
        && w.k.dims() == [nkv, hidden]
        && w.v.dims() == [nkv, hidden]
        && w.o.dims() == [hidden, nq]
        && w.gate.dims() == [inter, hidden]
        && w.up.dims() == [inter, hidden]
        && w.down.dims() == [hidden, inter];
    if !shapes_fit {
        candle_core::bail!(
            "frozen layer: input {:?}, rope tables {:?}, q {:?}, k {:?}, gate {:?} do not fit \
             {} heads / {} kv heads",
            x.dims(),
            cos.dims(),
            w.q.dims(),
            w.k.dims(),
            w.gate.dims(),
            w.heads,
            w.kv_heads
        )
    }
    let frozen = |t: &Tensor| -> CResult<Tensor> { Ok(t.contiguous()?.detach()) };
    x.contiguous()?.apply_op1(FrozenBlock {
        input_norm: frozen(w.input_norm)?,
        input_eps: w.input_eps,
        q: frozen(w.q)?,
        k: frozen(w.k)?,
        v: frozen(w.v)?,
        o: frozen(w.o)?,
        post_norm: frozen(w.post_norm)?,
        post_eps: w.post_eps,
        gate: frozen(w.gate)?,
        up: frozen(w.up)?,
        down: frozen(w.down)?,
        heads: w.heads,
        kv_heads: w.kv_heads,
        hd,
        cos: cos.flatten_all()?.to_vec1()?,
        sin: sin.flatten_all()?.to_vec1()?,
        kept: Mutex::new(None),
    })
}

struct FrozenBlock {
    input_norm: Tensor,
    input_eps: f32,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    post_norm: Tensor,
    post_eps: f32,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// What the forward pass leaves for the backward pass.
    kept: Mutex<Option<Kept>>,
}

/// The forward pass's intermediates the backward pass reads.
struct Kept {
    /// Rotated q `[rows, heads * hd]`, rotated k and v `[rows, kv_heads * hd]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output `[rows, heads * hd]` and log-sum-exp `[b, heads, seq]`.
    att: Vec<f32>,
    lse: Vec<f32>,
    /// The residual stream after the attention half `[rows, hidden]`.
    x1: Vec<f32>,
    /// Gate and up products `[rows, inter]`.
    g: Vec<f32>,
    u: Vec<f32>,
}

/// `out = silu(g) * u`, in chunks across the thread pool.
fn silu_mul_into(g: &[f32], u: &[f32], out: &mut [f32]) {
    const C: usize = 1 << 14;
    out.par_chunks_mut(C)
        .zip(g.par_chunks(C).zip(u.par_chunks(C)))
        .for_each(|(h, (g, u))| crate::simd::silu_mul(g, u, h));
}

impl FrozenBlock {
    fn dims(&self, b: usize, l: usize) -> AttnDims {
        AttnDims {
            b,
            nh: self.heads,
            nkv: self.kv_heads,
            l,
            hd: self.hd,
        }
    }

    /// The layer on `x` `[b * l, hidden]`: its output and what the backward pass needs.
    fn forward(&self, x: &[f32], b: usize, l: usize) -> CResult<(Vec<f32>, Kept)> {
        borrow_f32!(
            w_in = self.input_norm, "input norm";
            wq = self.q, "q_proj";
            wk = self.k, "k_proj";
            wv = self.v, "v_proj";
            wo = self.o, "o_proj";
            w_post = self.post_norm, "post-attention norm";
            wg = self.gate, "gate_proj";
            wu = self.up, "up_proj";
            wd = self.down, "down_proj";
        );
        let hidden = w_in.len();
        let rows = b * l;
        let (nq, nkv) = (self.heads * self.hd, self.kv_heads * self.hd);
        let inter = wg.len() / hidden;
        let par = Parallelism::Rayon(threads());
        let hn = rms_forward(x, w_in, self.input_eps);
        let proj = |w: &[f32], out: usize| {
            product(rows, out, hidden, &hn, (hidden, 1), w, (1, hidden), par)
        };
        let mut q = proj(wq, nq);
        let mut k = proj(wk, nkv);
        let v = proj(wv, nkv);
        drop(hn);
        rope_in_place(&mut q, nq, l, self.hd, &self.cos, &self.sin, 1.0);
        rope_in_place(&mut k, nkv, l, self.hd, &self.cos, &self.sin, 1.0);
        let scale = 1.0 / (self.hd as f32).sqrt();
        let (att, lse) = attention_forward(self.dims(b, l), &q, &k, &v, scale);
        // x1 = x + att Wo^T
        let mut x1 = x.to_vec();
        matmul(
            rows,
            hidden,
            nq,
            &mut x1,
            (hidden, 1),
            true,
            &att,
            (nq, 1),
            wo,
            (1, nq),
            par,
        );
        let hn = rms_forward(&x1, w_post, self.post_eps);
        let g = product(rows, inter, hidden, &hn, (hidden, 1), wg, (1, hidden), par);
        let u = product(rows, inter, hidden, &hn, (hidden, 1), wu, (1, hidden), par);
        drop(hn);
        let mut h = vec![0f32; rows * inter];
        silu_mul_into(&g, &u, &mut h);
        // out = x1 + h Wd^T
        let mut out = x1.clone();
        matmul(
            rows,
            hidden,
            inter,
            &mut out,
            (hidden, 1),
            true,
            &h,
            (inter, 1),
            wd,
            (1, inter),
            par,
        );
        Ok((
            out,
            Kept {
                q,
                k,
                v,
                att,
                lse,
                x1,
                g,
                u,
            },
        ))
    }

    /// `dx` for the output gradient `dy`, from the kept intermediates.
    fn backward(&self, x: &[f32], dy: &[f32], b: usize, l: usize, kept: Kept) -> CResult<Vec<f32>> {
        borrow_f32!(
            w_in = self.input_norm, "input norm";
            wq = self.q, "q_proj";
            wk = self.k, "k_proj";
            wv = self.v, "v_proj";
            wo = self.o, "o_proj";
            w_post = self.post_norm, "post-attention norm";
            wg = self.gate, "gate_proj";
            wu = self.up, "up_proj";
            wd = self.down, "down_proj";
        );
        let Kept {
            q,
            k,
            v,
            att,
            lse,
            x1,
            g,
            u,
        } = kept;
        let hidden = w_in.len();
        let rows = b * l;
        let (nq, nkv) = (self.heads * self.hd, self.kv_heads * self.hd);
        let inter = wg.len() / hidden;
        let par = Parallelism::Rayon(threads());
        // MLP half: dh = dy Wd, then SwiGLU, then dhn = dg Wg + du Wu.
        let dh = product(rows, inter, hidden, dy, (hidden, 1), wd, (inter, 1), par);
        let mut dg = vec![0f32; rows * inter];
        let mut du = vec![0f32; rows * inter];
        const C: usize = 1 << 14;
        dg.par_chunks_mut(C)
            .zip(du.par_chunks_mut(C))
            .zip(g.par_chunks(C).zip(u.par_chunks(C)).zip(dh.par_chunks(C)))
            .for_each(|((dg, du), ((g, u), dy))| crate::simd::silu_mul_bwd(g, u, dy, dg, du));
        drop((g, u, dh));
        let mut dhn = product(rows, hidden, inter, &dg, (inter, 1), wg, (hidden, 1), par);
        matmul(
            rows,
            hidden,
            inter,
            &mut dhn,
            (hidden, 1),
            true,
            &du,
            (inter, 1),
            wu,
            (hidden, 1),
            par,
        );
        drop((dg, du));
        // dx1 = dy + the post-attention norm's backward pass.
        let mut dx1 = dy.to_vec();
        rms_backward(&x1, w_post, self.post_eps, &dhn, &mut dx1, true, false);
        drop((x1, dhn));
        // Attention half: datt = dx1 Wo, the attention's backward pass, the inverse rotations.
        let datt = product(rows, nq, hidden, &dx1, (hidden, 1), wo, (nq, 1), par);
        let scale = 1.0 / (self.hd as f32).sqrt();
        let (mut dq, mut dk, dv) =
            attention_backward(self.dims(b, l), &q, &k, &v, &att, &datt, &lse, scale);
        drop((q, k, v, att, datt, lse));
        rope_in_place(&mut dq, nq, l, self.hd, &self.cos, &self.sin, -1.0);
        rope_in_place(&mut dk, nkv, l, self.hd, &self.cos, &self.sin, -1.0);
        // dhn = dq Wq + dk Wk + dv Wv, then dx = dx1 + the input norm's backward pass.
        let mut dhn = product(rows, hidden, nq, &dq, (nq, 1), wq, (hidden, 1), par);
        matmul(
            rows,
            hidden,
            nkv,
            &mut dhn,
            (hidden, 1),
            true,
            &dk,
            (nkv, 1),
            wk,
            (hidden, 1),
            par,
        );
        matmul(
            rows,
            hidden,
            nkv,
            &mut dhn,
            (hidden, 1),
            true,
            &dv,
            (nkv, 1),
            wv,
            (hidden, 1),
            par,
        );
        drop((dq, dk, dv));
        let mut dx = dx1;
        rms_backward(x, w_in, self.input_eps, &dhn, &mut dx, true, false);
        Ok(dx)
    }
}

impl CustomOp1 for FrozenBlock {
    fn name(&self) -> &'static str {
        "attune-frozen-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("FrozenBlock.cpu_fwd");
        let x = f32_slice(s, l, "frozen layer input")?;
        let (b, seq, _) = l.shape().dims3()?;
        let (out, kept) = self.forward(x, b, seq)?;
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let _pg = prof("FrozenBlock.bwd");
        let (b, seq, _) = x.dims3()?;
        borrow_f32!(xv = x, "frozen layer input"; dy = grad, "frozen layer grad");
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let kept = match kept {
            Some(k) => k,
            // A second backward pass through the same graph: run the forward pass again.
            None => self.forward(xv, b, seq)?.1,
        };
        let dx = self.backward(xv, dy, b, seq, kept)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
