//! A plain decoder layer over a prompt's many rows in two ops, as [`super::decode`]'s layer ops
//! do for one token: the norm, the q/k/v products on one bf16 conversion of their input, the
//! rotary embedding written straight into the heads' layout; then, after the cache append and the
//! cached attention, o, residual, norm, gate/up on one conversion, SwiGLU, down and residual.
//! Op by op the layer converted the same input to bf16 for q, k and v (and for gate and up),
//! copied q, k and v into the heads' layout before rotating them into new buffers, and ran its
//! norms, rotations and adds on rayon's pool while the kernels' pool spun beside it.
//!
//! Every step computes what the op it replaces computes (candle's `rms_norm` and `rope` loops per
//! row, the same frozen products [`super::linear::frozen_linear`] runs, candle's add,
//! [`super::swiglu`]'s forward), so the outputs equal the unfused layer's bit for bit
//! (`models/tests/decode_layer.rs`).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;

use super::int8::I8Weight;
use super::linear::{Act, Frozen};
use super::profile::prof;
use super::rms_norm::rms_row;
use super::rope::rope_head;
use super::{borrow_f32, f32_slice, threads, CResult};

/// A projection's weight as the prompt layer multiplies it: a frozen weight as the training
/// kernels take it, or the i8 copy of the int8 products (a CPU with VNNI but no AMX).
pub enum PromptWeight {
    Frozen(Frozen),
    Int8(Arc<I8Weight>),
}

impl PromptWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> CResult<(usize, usize)> {
        match self {
            PromptWeight::Frozen(w) => w.dims(),
            PromptWeight::Int8(q) => Ok((q.out_dim(), q.in_dim())),
        }
    }
}

/// `x` `[1, l, hidden]` through the input norm (`norm`, `eps`), the q, k and v products on the
/// frozen weights `qkv`, and the rotary embedding at the rows' positions (`cos`/`sin`
/// `[l, hd / 2]`). Returns `[1, nh + 2 nkv, l, hd]`: the rotated query heads, the rotated key
/// heads, the value heads.
pub fn layer_qkv(
    x: &Tensor,
    norm: &Tensor,
    eps: f32,
    qkv: [&PromptWeight; 3],
    (nh, nkv, hd): (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
) -> CResult<Tensor> {
    let (b, l, hidden) = x.dims3()?;
    let dims: Vec<(usize, usize)> = qkv.iter().map(|w| w.dims()).collect::<CResult<_>>()?;
    if b != 1
        || hd % 2 != 0
        || dims != [(nh * hd, hidden), (nkv * hd, hidden), (nkv * hd, hidden)]
        || norm.elem_count() != hidden
        || cos.dims() != [l, hd / 2]
        || sin.dims() != [l, hd / 2]
    {
        candle_core::bail!(
            "prompt layer: x {:?}, norm {:?}, q/k/v {dims:?} for ({nh}, {nkv}, {hd}) heads, \
             rope {:?} do not fit",
            x.dims(),
            norm.dims(),
            cos.dims()
        )
    }
    borrow_f32!(w = norm, "prompt layer norm");
    FUSED_LAYERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let op = LayerQkv {
        norm: w,
        eps,
        qkv,
        heads: (nh, nkv, hd),
    };
    x.contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)
}

/// The second half of [`layer_qkv`]'s layer: `x1 = x + attn W_o^T`, then
/// `x1 + down(silu(gate(h)) * up(h))` with `h = rms_norm(x1)`. `attn` `[1, l, nh hd]` (the
/// cached attention's output), `x` `[1, l, hidden]` (the layer's input).
pub fn layer_mlp(
    attn: &Tensor,
    x: &Tensor,
    o: &PromptWeight,
    norm: &Tensor,
    eps: f32,
    [gate, up, down]: [&PromptWeight; 3],
) -> CResult<Tensor> {
    let (b, l, hidden) = x.dims3()?;
    let (od, oi) = o.dims()?;
    let (gd, gi) = gate.dims()?;
    let (ud, ui) = up.dims()?;
    let (dd, di) = down.dims()?;
    if b != 1
        || attn.dims() != [1, l, oi]
        || od != hidden
        || (gi, ui) != (hidden, hidden)
        || gd != ud
        || (dd, di) != (hidden, gd)
        || norm.elem_count() != hidden
    {
        candle_core::bail!(
            "prompt layer: attention {:?}, x {:?}, o [{od}, {oi}], gate [{gd}, {gi}], up [{ud}, \
             {ui}], down [{dd}, {di}] do not fit",
            attn.dims(),
            x.dims()
        )
    }
    borrow_f32!(w = norm, "prompt layer norm");
    let op = LayerMlp {
        o,
        norm: w,
        eps,
        gate_up_down: [gate, up, down],
    };
    attn.contiguous()?.apply_op2_no_bwd(&x.contiguous()?, &op)
}

static FUSED_LAYERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many layer passes [`layer_qkv`] has run in this process (tests check that a prompt took
/// the fused ops).
pub fn fused_layer_calls() -> usize {
    FUSED_LAYERS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `rms_norm` of each `hidden`-wide row of `x`, rows spread over the kernels' pool.
fn rms_rows(x: &[f32], w: &[f32], eps: f32, hidden: usize) -> Vec<f32> {
    let mut h = vec![0f32; x.len()];
    super::pool::chunks_mut(&mut h, hidden * ROWS_PER_TASK, |c, dst| {
        let src = &x[c * hidden * ROWS_PER_TASK..][..dst.len()];
        for (s, d) in src.chunks_exact(hidden).zip(dst.chunks_exact_mut(hidden)) {
            rms_row(s, w, eps, d);
        }
    });
    h
}

/// `dst[i] += src[i]`, over the kernels' pool.
fn add_into(dst: &mut [f32], src: &[f32]) {
    const CHUNK: usize = 1 << 14;
    super::pool::chunks_mut(dst, CHUNK, |c, d| {
        for (a, b) in d.iter_mut().zip(&src[c * CHUNK..]) {
            *a += *b;
        }
    });
}

/// Rows per pool task in the row-wise steps.
const ROWS_PER_TASK: usize = 16;

/// `x W^T` on a frozen weight, as [`super::linear::frozen_linear`] computes it, or on the i8
/// copy as the layer's int8 op does.
fn product(w: &PromptWeight, x: &Act, dout: usize) -> CResult<Vec<f32>> {
    match w {
        PromptWeight::Frozen(w) => {
            w.with_ref(|w| Ok(w.forward_new(x, dout, Parallelism::Rayon(threads()))))
        }
        PromptWeight::Int8(q) => Ok(q.forward_new(x.int8())),
    }
}

struct LayerQkv<'a> {
    norm: &'a [f32],
    eps: f32,
    qkv: [&'a PromptWeight; 3],
    heads: (usize, usize, usize),
}

impl CustomOp3 for LayerQkv<'_> {
    fn name(&self) -> &'static str {
        "attune-prompt-layer-qkv"
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
        let _pg = prof("PromptQkv.cpu_fwd");
        let x = f32_slice(s1, l1, "prompt layer x")?;
        let cos = f32_slice(s2, l2, "prompt layer cos")?;
        let sin = f32_slice(s3, l3, "prompt layer sin")?;
        let (_, l, hidden) = l1.shape().dims3()?;
        let (nh, nkv, hd) = self.heads;
        let half = hd / 2;
        let h = rms_rows(x, self.norm, self.eps, hidden);
        let act = Act::new(&h, l, hidden);
        let [wq, wk, wv] = self.qkv;
        let q = product(wq, &act, nh * hd)?;
        let k = product(wk, &act, nkv * hd)?;
        let v = product(wv, &act, nkv * hd)?;
        // Head by head: each head's rows gathered from the row-major products, rotated where
        // it is a query or key head.
        let mut out = vec![0f32; (nh + 2 * nkv) * l * hd];
        super::pool::chunks_mut(&mut out, l * hd, |head, dst| {
            let (src, n, j, rotate) = if head < nh {
                (&q, nh, head, true)
            } else if head < nh + nkv {
                (&k, nkv, head - nh, true)
            } else {
                (&v, nkv, head - nh - nkv, false)
            };
            for (r, d) in dst.chunks_exact_mut(hd).enumerate() {
                d.copy_from_slice(&src[(r * n + j) * hd..][..hd]);
                if rotate {
                    rope_head(d, &cos[r * half..][..half], &sin[r * half..][..half]);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((1, nh + 2 * nkv, l, hd))))
    }
}

struct LayerMlp<'a> {
    o: &'a PromptWeight,
    norm: &'a [f32],
    eps: f32,
    gate_up_down: [&'a PromptWeight; 3],
}

impl CustomOp2 for LayerMlp<'_> {
    fn name(&self) -> &'static str {
        "attune-prompt-layer-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("PromptMlp.cpu_fwd");
        let attn = f32_slice(s1, l1, "prompt layer attention")?;
        let x = f32_slice(s2, l2, "prompt layer x")?;
        let (_, l, hidden) = l2.shape().dims3()?;
        let width = attn.len() / l.max(1);
        let mut x1 = product(self.o, &Act::new(attn, l, width), hidden)?;
        add_into(&mut x1, x);
        let h = rms_rows(&x1, self.norm, self.eps, hidden);
        let act = Act::new(&h, l, hidden);
        let [wg, wu, wd] = self.gate_up_down;
        let inter = wg.dims()?.0;
        let g = product(wg, &act, inter)?;
        let u = product(wu, &act, inter)?;
        let a = super::swiglu::swiglu_forward(&g, &u);
        let mut y = product(wd, &Act::new(&a, l, inter), hidden)?;
        add_into(&mut y, &x1);
        Ok((CpuStorage::F32(y), l2.shape().clone()))
    }
}
