//! A decoder layer as one training op.
//!
//! Built from one graph node per norm, projection, rotation and residual add, a layer costs
//! candle's backward pass a zero-filled buffer and an add for every node's input, plus a tensor
//! per intermediate. [`fused_layer`] runs the whole layer — RMSNorm, q/k/v, the q/k norms
//! (Qwen3, Gemma 3), rotary embeddings (full or partial, or none in a NoPE layer), causal
//! attention (sliding-window or global, with the layer's score scale), `o_proj` (and Gemma's norm
//! of its output) and its residual, RMSNorm, gate/up, SwiGLU or GeGLU, `down_proj` (and Gemma's
//! norm of its output) and its residual — as one node with a hand-written backward pass. q/k/v
//! and gate/up are separate projections or fused ones (Phi-3's `qkv_proj`, `gate_up_proj`). It
//! keeps just what that pass reads (the rotated q and k, v, the attention output and log-sum-exp,
//! the mid-layer residual, the gate and up products, the inputs of normed outputs and the
//! projections' inputs where a weight or LoRA branch is trained), accumulates the q/k/v input
//! gradients and the residual branches in place, and computes only the gradients something needs.
//!
//! The gradients of the layer's trained tensors (LoRA matrices, weights, norm scales) do not go
//! through candle's graph: a custom op returns gradients for at most three inputs. The backward
//! pass leaves them on its thread, and [`backward`] — which the trainer calls instead of
//! `Tensor::backward` — adds them to the gradient store. The op takes one trained tensor as its
//! second input so that candle's backward pass visits it even when the layer's input carries no
//! gradient (LoRA's first layer). A layer with nothing trained (every layer in prompt tuning) needs
//! none of this, and the model fuses it by default; a layer with trained tensors is fused only
//! when the trainer asks (`LayerFusion::All` in `llama.rs`).

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use gemm::Parallelism;

use std::sync::Arc;

use super::amx::{self, PackedB, PackedWeight, RowsBf16};
use super::attention::{attention_backward, attention_forward, AttnDims};
use super::gemm::product;
use super::int8::{I8Pair, I8Weight};
use super::linear::{lora_branch_backward, lora_branch_forward, Act, Frozen, WRef};
use super::profile::prof;
use super::rms_norm::{rms_backward, rms_forward};
use super::rope::rope_in_place;
use super::stream::Streamed;
use super::swiglu::{gated_backward, gated_forward, GateAct};
use super::{borrow_f32, f32_slice, threads, CResult};

/// One projection `[out, in]` of a layer, with its LoRA branch `(A [r, in], B [out, r], scale)`
/// if it has one. An f32 weight is trained when it is a variable (full fine-tuning); a packed
/// bf16 weight is frozen.
#[derive(Clone, Copy)]
pub struct Proj<'a> {
    pub w: ProjWeight<'a>,
    pub lora: Option<(&'a Tensor, &'a Tensor, f32)>,
}

/// A projection's weight: f32, bf16 packed for the matrix units (frozen), or an f32 weight
/// (trained: full fine-tuning) whose products run in bf16 on the matrix units, packed anew at
/// every forward pass (`Mixed`: f32 master weight, bf16 compute, f32 gradient). A fused
/// projection (`qkv_proj`, `gate_up_proj`) is any of the three, like a separate one.
#[derive(Clone, Copy)]
pub enum ProjWeight<'a> {
    F32(&'a Tensor),
    Bf16(&'a Arc<PackedWeight>),
    Mixed(&'a Tensor),
    /// An f32 weight (trained: full fine-tuning) whose products run in int8 on AVX-512 VNNI
    /// (no AMX), quantized anew at every forward pass (f32 master weight, f32 gradient).
    MixedInt8(&'a Tensor),
    /// Frozen, kept compact (a quantized or bf16 base) and expanded panel by panel.
    Streamed(&'a Arc<Streamed>),
    /// Frozen, in i8 in both orientations (VNNI without AMX, [`super::int8`]).
    Int8(&'a Arc<I8Pair>),
}

impl<'a> ProjWeight<'a> {
    fn dims(&self) -> Vec<usize> {
        match self {
            ProjWeight::F32(w) | ProjWeight::Mixed(w) | ProjWeight::MixedInt8(w) => {
                w.dims().to_vec()
            }
            ProjWeight::Bf16(p) => vec![p.out_dim(), p.in_dim()],
            ProjWeight::Streamed(s) => {
                let (o, i) = s.dims();
                vec![o, i]
            }
            ProjWeight::Int8(q) => vec![q.out_dim(), q.in_dim()],
        }
    }

    /// The weight, when it is a trained variable.
    fn trained(self) -> Option<&'a Tensor> {
        match self {
            ProjWeight::F32(w) | ProjWeight::Mixed(w) | ProjWeight::MixedInt8(w) => {
                w.track_op().then_some(w)
            }
            ProjWeight::Bf16(_) | ProjWeight::Streamed(_) | ProjWeight::Int8(_) => None,
        }
    }
}

/// An RMSNorm: its scale `w`, `eps`, and `offset` (1 for Gemma's `(1 + w)`, else 0). The scale is
/// trained when it is a variable.
#[derive(Clone, Copy)]
pub struct Norm<'a> {
    pub w: &'a Tensor,
    pub eps: f32,
    pub offset: f32,
}

/// Projections that read the same input: separate (`q_proj`, `k_proj`, `v_proj`) or one whose
/// output rows are theirs stacked (`qkv_proj`).
#[derive(Clone, Copy)]
pub enum Stacked<'a, const N: usize> {
    Split([Proj<'a>; N]),
    Fused(Proj<'a>),
}

impl<'a, const N: usize> Stacked<'a, N> {
    fn projs(&self) -> Vec<Proj<'a>> {
        match self {
            Stacked::Split(p) => p.to_vec(),
            Stacked::Fused(p) => vec![*p],
        }
    }
}

/// The parameters of one decoder layer, all dense f32 (no bias, no dropout on a LoRA branch).
#[derive(Clone, Copy)]
pub struct LayerParts<'a> {
    pub input_norm: Norm<'a>,
    /// q, k, v (`[heads * hd, hidden]`, `[kv_heads * hd, hidden]` twice).
    pub qkv: Stacked<'a, 3>,
    /// Per-head norms of q and k (`[hd]`), before rope.
    pub q_norm: Option<Norm<'a>>,
    pub k_norm: Option<Norm<'a>>,
    pub o: Proj<'a>,
    /// A norm of the attention output before its residual add (Gemma 3).
    pub post_attn_norm: Option<Norm<'a>>,
    pub pre_mlp_norm: Norm<'a>,
    /// gate and up (`[inter, hidden]` each).
    pub gate_up: Stacked<'a, 2>,
    pub down: Proj<'a>,
    /// A norm of the MLP output before its residual add (Gemma 3).
    pub post_mlp_norm: Option<Norm<'a>>,
    pub act: GateAct,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The attention scores' scale.
    pub scale: f32,
    /// Sliding window (keys a query sees, itself included).
    pub window: Option<usize>,
}

impl LayerParts<'_> {
    fn projs(&self) -> Vec<Proj<'_>> {
        let mut v = self.qkv.projs();
        v.push(self.o);
        v.extend(self.gate_up.projs());
        v.push(self.down);
        v
    }

    fn norms(&self) -> Vec<Norm<'_>> {
        [
            Some(self.input_norm),
            self.q_norm,
            self.k_norm,
            self.post_attn_norm,
            Some(self.pre_mlp_norm),
            self.post_mlp_norm,
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The first tensor of the layer that is being trained, if any.
    pub fn first_trained(&self) -> Option<&Tensor> {
        let mut all: Vec<&Tensor> = self.norms().iter().map(|n| n.w).collect();
        for p in self.projs() {
            if let Some(w) = p.w.trained() {
                all.push(w);
            }
            if let Some((a, b, _)) = p.lora {
                all.push(a);
                all.push(b);
            }
        }
        all.into_iter().find(|t| t.track_op())
    }
}

thread_local! {
    /// Gradients of trained tensors left by fused layers' backward passes on this thread.
    static SIDE_GRADS: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// `loss.backward()`, plus the gradients fused layers computed for their trained tensors.
pub fn backward(loss: &Tensor) -> CResult<GradStore> {
    SIDE_GRADS.with(|s| s.borrow_mut().clear());
    let grads = loss.backward();
    let side = SIDE_GRADS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut grads = grads?;
    for (param, g) in side {
        let g = match grads.remove(&param) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(&param, g);
    }
    Ok(grads)
}

/// The layer `parts` applied to `x` `[b, seq, hidden]`, with rotary tables `rope` = (cos, sin)
/// `[seq, rd / 2]` (`None`: a layer without rope): differentiable in `x`, and in the layer's
/// trained tensors through [`backward`].
pub fn fused_layer(
    x: &Tensor,
    parts: LayerParts,
    rope: Option<(&Tensor, &Tensor)>,
) -> CResult<Tensor> {
    let (_, l, hidden) = x.dims3()?;
    let hd = parts.head_dim;
    let (nq, nkv) = (parts.heads * hd, parts.kv_heads * hd);
    let inter = match parts.gate_up {
        Stacked::Split([g, _]) => g.w.dims()[0],
        Stacked::Fused(p) => p.w.dims()[0] / 2,
    };
    let rd = match rope {
        None => 0,
        Some((cos, sin)) => {
            let (seq, half) = cos.dims2()?;
            if seq != l || sin.dims() != cos.dims() || half == 0 || 2 * half > hd {
                candle_core::bail!(
                    "fused layer: rope tables {:?} do not fit {l} positions of head size {hd}",
                    cos.dims()
                )
            }
            half * 2
        }
    };
    let lora_fits = |p: &Proj, out: usize, inp: usize| match p.lora {
        None => true,
        Some((a, b, _)) => {
            let r = a.dim(0).unwrap_or(0);
            r > 0 && a.dims() == [r, inp] && b.dims() == [out, r]
        }
    };
    let mut shaped: Vec<(Proj, usize, usize)> = match parts.qkv {
        Stacked::Split([q, k, v]) => vec![(q, nq, hidden), (k, nkv, hidden), (v, nkv, hidden)],
        Stacked::Fused(p) => vec![(p, nq + 2 * nkv, hidden)],
    };
    shaped.push((parts.o, hidden, nq));
    match parts.gate_up {
        Stacked::Split([g, u]) => {
            shaped.push((g, inter, hidden));
            shaped.push((u, inter, hidden));
        }
        Stacked::Fused(p) => shaped.push((p, 2 * inter, hidden)),
    }
    shaped.push((parts.down, hidden, inter));
    let norm_fits = |n: &Option<Norm>, d: usize| n.is_none_or(|n| n.w.dims() == [d]);
    let shapes_fit = parts.heads > 0
        && parts.kv_heads > 0
        && hd > 0
        && parts.heads.is_multiple_of(parts.kv_heads)
        && parts.window != Some(0)
        && norm_fits(&Some(parts.input_norm), hidden)
        && norm_fits(&Some(parts.pre_mlp_norm), hidden)
        && norm_fits(&parts.post_attn_norm, hidden)
        && norm_fits(&parts.post_mlp_norm, hidden)
        && norm_fits(&parts.q_norm, hd)
        && norm_fits(&parts.k_norm, hd)
        && shaped
            .iter()
            .all(|(p, out, inp)| p.w.dims() == [*out, *inp] && lora_fits(p, *out, *inp));
    if !shapes_fit {
        candle_core::bail!(
            "fused layer: input {:?} and projections {:?} do not fit {} heads / {} kv heads of {hd}",
            x.dims(),
            shaped.iter().map(|(p, _, _)| p.w.dims()).collect::<Vec<_>>(),
            parts.heads,
            parts.kv_heads
        )
    }
    let proj = |p: Proj| -> CResult<OwnedProj> {
        let lora = match p.lora {
            None => None,
            Some((a, b, scale)) => Some(LoraParts {
                r: a.dim(0)?,
                a_vals: a.flatten_all()?.to_vec1()?,
                b_vals: b.flatten_all()?.to_vec1()?,
                a: a.track_op().then(|| a.clone()),
                b: b.track_op().then(|| b.clone()),
                scale,
            }),
        };
        let (w, param, on) = match p.w {
            ProjWeight::F32(w) => (
                // Read in place where it is contiguous or held transposed (`f32_strided`).
                Frozen::F32(match super::linear::f32_in_place(w) {
                    true => w.clone(),
                    false => w.contiguous()?,
                }),
                w.track_op().then(|| w.clone()),
                TrainedOn::F32,
            ),
            ProjWeight::Bf16(pw) => (Frozen::Bf16(pw.clone()), None, TrainedOn::F32),
            ProjWeight::Streamed(sw) => (Frozen::Streamed(sw.clone()), None, TrainedOn::F32),
            ProjWeight::Int8(q) => (Frozen::Int8(q.clone()), None, TrainedOn::F32),
            ProjWeight::MixedInt8(w) => {
                let (out, inp) = w.dims2()?;
                borrow_f32!(v = w, "projection weight");
                // The forward orientation only: a trained weight's input-gradient copy is made
                // in the backward pass and dropped at once (`P::bwd`), as the `Mixed` arm's
                // packing is, so an evaluation never makes it and a step never holds both.
                match w.track_op() {
                    true => (
                        Frozen::Int8(Arc::new(I8Pair::forward_only(I8Weight::new(
                            v,
                            out,
                            inp,
                            (inp, 1),
                        )))),
                        Some(w.clone()),
                        TrainedOn::Int8,
                    ),
                    // Untracked (not what `Linear::fused_weight` gives): both orientations.
                    false => (
                        Frozen::Int8(Arc::new(I8Pair::new(v, out, inp, (inp, 1)))),
                        None,
                        TrainedOn::F32,
                    ),
                }
            }
            ProjWeight::Mixed(w) => {
                let (out, inp) = w.dims2()?;
                borrow_f32!(v = w, "projection weight");
                // The forward product's packing only: a trained weight's input-gradient packing
                // is built in the backward pass and dropped at once (`P::bwd`), so a
                // step never holds both packings of every layer (2 bytes per weight of peak).
                let packed = PackedWeight::new(v, out, inp);
                let trained = w.track_op();
                (
                    Frozen::Bf16(Arc::new(packed)),
                    trained.then(|| w.clone()),
                    match trained {
                        true => TrainedOn::Bf16,
                        false => TrainedOn::F32,
                    },
                )
            }
        };
        Ok(OwnedProj { w, param, lora, on })
    };
    let norm = |n: Norm| -> CResult<OwnedNorm> {
        Ok(OwnedNorm {
            vals: n.w.flatten_all()?.to_vec1()?,
            param: n.w.track_op().then(|| n.w.clone()),
            eps: n.eps,
            offset: n.offset,
        })
    };
    let opt_norm = |n: Option<Norm>| n.map(norm).transpose();
    let qkv = match parts.qkv {
        Stacked::Split(p) => p.iter().map(|&p| proj(p)).collect::<CResult<Vec<_>>>()?,
        Stacked::Fused(p) => vec![proj(p)?],
    };
    let gate_up = match parts.gate_up {
        Stacked::Split(p) => p.iter().map(|&p| proj(p)).collect::<CResult<Vec<_>>>()?,
        Stacked::Fused(p) => vec![proj(p)?],
    };
    let tables = match rope {
        None => None,
        Some((cos, sin)) => Some((cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?)),
    };
    let op = FusedLayer {
        input_norm: norm(parts.input_norm)?,
        qkv,
        q_norm: opt_norm(parts.q_norm)?,
        k_norm: opt_norm(parts.k_norm)?,
        o: proj(parts.o)?,
        post_attn_norm: opt_norm(parts.post_attn_norm)?,
        pre_mlp_norm: norm(parts.pre_mlp_norm)?,
        gate_up,
        down: proj(parts.down)?,
        post_mlp_norm: opt_norm(parts.post_mlp_norm)?,
        act: parts.act,
        heads: parts.heads,
        kv_heads: parts.kv_heads,
        hd,
        rd,
        scale: parts.scale,
        window: parts.window,
        rope: tables,
        kept: Mutex::new(None),
    };
    let x = x.contiguous()?;
    match parts.first_trained() {
        None => x.apply_op1(op),
        Some(anchor) => x.apply_op2(anchor, op),
    }
}

struct LoraParts {
    r: usize,
    a_vals: Vec<f32>,
    b_vals: Vec<f32>,
    /// The variables, when trained (their gradients are keyed by them).
    a: Option<Tensor>,
    b: Option<Tensor>,
    scale: f32,
}

struct OwnedProj {
    /// `[out, in]`: a contiguous f32 tensor, or the packed bf16 copy.
    w: Frozen,
    /// The weight variable, when trained (its gradient is keyed by it).
    param: Option<Tensor>,
    lora: Option<LoraParts>,
    /// What a trained weight's products run on (`F32` for a frozen one).
    on: TrainedOn,
}

/// What the products of a trained weight (`OwnedProj::param`) run on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TrainedOn {
    /// f32 (or a frozen weight, whose products `OwnedProj::w` says).
    F32,
    /// bf16 on the matrix units (a `Mixed` weight): its gradient runs there too, its forward
    /// product adds the rounding residual ([`P::residual_add`]) and its input-gradient packing
    /// is built in the backward pass.
    Bf16,
    /// int8 on VNNI (a `MixedInt8` weight): `w` holds its forward orientation only, the input
    /// gradient's is quantized in the backward pass, and the weight gradient runs as an int8
    /// product too (both operands quantized per 32 rows).
    Int8,
}

impl OwnedProj {
    /// Whether the backward pass needs this projection's input (for `dW` or `dA`).
    fn needs_input(&self) -> bool {
        self.param.is_some() || self.lora.as_ref().is_some_and(|l| l.a.is_some())
    }
}

struct OwnedNorm {
    vals: Vec<f32>,
    /// The variable, when trained.
    param: Option<Tensor>,
    eps: f32,
    offset: f32,
}

impl OwnedNorm {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        rms_forward(x, &self.vals, self.eps, self.offset)
    }

    /// The input gradient for the output gradient `dy` (added to `dx` when `accumulate`); the
    /// scale's gradient goes to `sink` when it is trained.
    fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        accumulate: bool,
        sink: &mut Vec<(Tensor, Vec<f32>)>,
    ) {
        let want_dw = self.param.is_some();
        let dw = rms_backward(
            x,
            &self.vals,
            self.eps,
            self.offset,
            dy,
            dx,
            accumulate,
            want_dw,
        );
        if let Some(param) = &self.param {
            sink.push((param.clone(), dw));
        }
    }

    /// [`Self::backward`] into a new buffer.
    fn backward_new(&self, x: &[f32], dy: &[f32], sink: &mut Vec<(Tensor, Vec<f32>)>) -> Vec<f32> {
        let mut dx = vec![0f32; x.len()];
        self.backward(x, dy, &mut dx, false, sink);
        dx
    }
}

struct FusedLayer {
    input_norm: OwnedNorm,
    /// `[q, k, v]`, or `[qkv]`.
    qkv: Vec<OwnedProj>,
    q_norm: Option<OwnedNorm>,
    k_norm: Option<OwnedNorm>,
    o: OwnedProj,
    post_attn_norm: Option<OwnedNorm>,
    pre_mlp_norm: OwnedNorm,
    /// `[gate, up]`, or `[gate_up]`.
    gate_up: Vec<OwnedProj>,
    down: OwnedProj,
    post_mlp_norm: Option<OwnedNorm>,
    act: GateAct,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    /// Rotated dims per head (0 without rope).
    rd: usize,
    scale: f32,
    window: Option<usize>,
    /// cos and sin `[seq, rd / 2]`.
    rope: Option<(Vec<f32>, Vec<f32>)>,
    /// What the forward pass leaves for the backward pass.
    kept: Mutex<Option<Kept>>,
}

/// The forward pass's intermediates the backward pass reads.
struct Kept {
    /// Rotated q `[rows, heads * hd]`, rotated k and v `[rows, kv_heads * hd]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// q and k before their per-head norms, when the layer has them.
    q_pre: Option<Vec<f32>>,
    k_pre: Option<Vec<f32>>,
    /// Attention output `[rows, heads * hd]` and log-sum-exp `[b, heads, seq]`.
    att: Vec<f32>,
    lse: Vec<f32>,
    /// `o_proj`'s output, when a norm follows it.
    o_out: Option<Vec<f32>>,
    /// The residual stream after the attention half `[rows, hidden]`.
    x1: Vec<f32>,
    /// Gate and up products `[rows, inter]`.
    g: Vec<f32>,
    u: Vec<f32>,
    /// `down_proj`'s output, when a norm follows it.
    d_out: Option<Vec<f32>>,
    /// The normed inputs of q/k/v and of gate/up, when a trained projection reads them.
    hn1: Option<Vec<f32>>,
    hn2: Option<Vec<f32>>,
    /// `x A^T` `[rows, r]` of each LoRA branch: q/k/v (or qkv), o, gate/up (or gate_up), down.
    xa: Vec<Option<Vec<f32>>>,
}

/// A projection's slices for one pass.
struct P<'s> {
    w: WRef<'s>,
    proj: &'s OwnedProj,
    din: usize,
    dout: usize,
}

impl P<'_> {
    /// `dst += scale * (x A^T) B^T` when the projection has a LoRA branch; returns `x A^T`.
    fn lora_fwd(
        &self,
        x: &[f32],
        rows: usize,
        dst: &mut [f32],
        par: Parallelism,
    ) -> Option<Vec<f32>> {
        let l = self.proj.lora.as_ref()?;
        let dims = (rows, self.din, self.dout, l.r);
        Some(lora_branch_forward(
            dims, x, &l.a_vals, &l.b_vals, l.scale, dst, par,
        ))
    }

    /// A new `[rows, out]` output `x W^T (+ LoRA)`, and the branch's `x A^T`.
    fn fwd_new(&self, x: &Act, par: Parallelism) -> CResult<(Vec<f32>, Option<Vec<f32>>)> {
        let mut y = self.w.forward_new(x, self.dout, par);
        self.residual_add(x, &mut y)?;
        let xa = self.lora_fwd(x.x, x.rows, &mut y, par);
        Ok((y, xa))
    }

    /// `dst += x W^T (+ LoRA)`; returns the branch's `x A^T`.
    fn fwd_add(&self, x: &Act, dst: &mut [f32], par: Parallelism) -> CResult<Option<Vec<f32>>> {
        self.w.forward_add(x, dst, self.dout, par);
        self.residual_add(x, dst)?;
        Ok(self.lora_fwd(x.x, x.rows, dst, par))
    }

    /// For a trained weight in bf16 products: `dst += x R^T`, `R` what rounding its f32 master
    /// copy to bf16 left out (`PackedB::from_rows_residual`), packed here and dropped at once.
    /// Full fine-tuning's updates (a learning rate of 2e-5 moves a weight by ~1e-3 of itself
    /// per step, a quarter of a bf16 step) would otherwise reach the products only as they add
    /// up to a bf16 step: without it the QUALITY recipe's full fine-tuning lowered the valid NLL
    /// by 12.13%, against 13.78% in f32 and with PEFT. The input gradient takes the rounded
    /// weight alone, as bf16 products do elsewhere.
    fn residual_add(&self, x: &Act, dst: &mut [f32]) -> CResult<()> {
        if let (TrainedOn::Bf16, Some(w)) = (self.proj.on, &self.proj.param) {
            borrow_f32!(v = w, "projection weight");
            let r = PackedB::from_rows_residual(v, self.dout, self.din);
            amx::matmul(x.bf16(), &r, dst, self.dout, true);
        }
        Ok(())
    }

    /// The backward pass for the output gradient `dy`: adds `dy W (+ LoRA)` to `dx` (creating it
    /// when `None`) if `want_dx`, and pushes the gradients of the trained tensors to `sink`. `x` is
    /// the input (needed when [`OwnedProj::needs_input`]), `xa` the branch's `x A^T`.
    #[allow(clippy::too_many_arguments)]
    fn bwd(
        &self,
        x: Option<&Act>,
        xa: Option<&[f32]>,
        dy: &[f32],
        rows: usize,
        dx: &mut Option<Vec<f32>>,
        want_dx: bool,
        sink: &mut Vec<(Tensor, Vec<f32>)>,
        par: Parallelism,
    ) -> CResult<()> {
        let (din, dout) = (self.din, self.dout);
        match (&self.proj.param, self.proj.on) {
            (Some(w), TrainedOn::Bf16) if want_dx => {
                // A trained weight in bf16 products: packed for this product from its f32
                // master copy, dropped when it is done (see the `Mixed` arm where the op is built).
                borrow_f32!(v = w, "projection weight");
                let packed = PackedB::from_cols(v, dout, din);
                let dy = Act::new(dy, rows, dout);
                match dx {
                    Some(d) => amx::matmul(dy.bf16(), &packed, d, din, true),
                    None => *dx = Some(amx::product(dy.bf16(), &packed)),
                }
            }
            (Some(w), TrainedOn::Int8) if want_dx => {
                // A trained weight in int8 products: `W^T` quantized for this product from the
                // f32 master copy (along the outputs, the sums' direction), dropped when done.
                borrow_f32!(v = w, "projection weight");
                let wt = I8Weight::new(v, din, dout, (1, din));
                let dy = Act::new(dy, rows, dout);
                match dx {
                    Some(d) => wt.forward_into(dy.int8(), d, true),
                    None => *dx = Some(wt.forward_new(dy.int8())),
                }
            }
            _ if want_dx => self.w.input_grad(&Act::new(dy, rows, dout), din, dx, par),
            _ => {}
        }
        let input = || -> CResult<&Act> {
            match x {
                Some(x) => Ok(x),
                None => {
                    candle_core::bail!("fused layer: a trained projection's input was not kept")
                }
            }
        };
        if let Some(w) = &self.proj.param {
            // dW = dy^T x
            let x = input()?;
            let dw = match self.proj.on {
                TrainedOn::Bf16 => {
                    let a = RowsBf16::from_f32_transposed(dy, rows, dout);
                    amx::product(&a, &PackedB::from_cols(x.x, rows, din))
                }
                TrainedOn::Int8 => super::int8::weight_grad(dy, x.int8_columns(), rows, dout),
                TrainedOn::F32 => product(dout, din, rows, dy, (1, dout), x.x, (din, 1), par),
            };
            sink.push((w.clone(), dw));
        }
        if let Some(l) = &self.proj.lora {
            let x = l.a.as_ref().map(|_| input().map(|a| a.x)).transpose()?;
            let xa = match (&l.b, xa) {
                (None, _) => None,
                (Some(_), Some(xa)) => Some(xa),
                (Some(_), None) => {
                    candle_core::bail!("fused layer: a LoRA branch's x A^T was not kept")
                }
            };
            let dx = if want_dx { dx.as_deref_mut() } else { None };
            let dims = (rows, din, dout, l.r);
            let (da, db) =
                lora_branch_backward(dims, dy, &l.a_vals, &l.b_vals, l.scale, dx, x, xa, par);
            for (param, g) in [(&l.a, da), (&l.b, db)] {
                if let (Some(param), Some(g)) = (param, g) {
                    sink.push((param.clone(), g));
                }
            }
        }
        Ok(())
    }
}

/// The layer's projections for one pass, and the q and k/v widths.
struct Projs<'s> {
    /// `[q, k, v]`, or `[qkv]`.
    qkv: Vec<P<'s>>,
    o: P<'s>,
    /// `[gate, up]`, or `[gate_up]`.
    gate_up: Vec<P<'s>>,
    down: P<'s>,
    nq: usize,
    nkv: usize,
    inter: usize,
}

impl Projs<'_> {
    /// Whether the layer's attention runs in bf16 on the matrix units: opted in with
    /// `ATTUNE_ATTENTION=bf16` (as prompts' attention is), and only where the layer's products
    /// already run in bf16 (packed or compact frozen weights, with AMX). Off by default: the
    /// fused layer then differs from the same layer as separate ops by 1.6e-2 in its gradients
    /// (`runtime_tiny`'s 1e-2), and phi3's step-1 loss through `attune train` by 2.0e-3 from
    /// PyTorch's (its test's 2e-3).
    fn bf16(&self) -> bool {
        matches!(self.o.w, WRef::Bf16(_) | WRef::Streamed(_))
            && amx::available()
            && super::attention::bf16_opted_in()
    }
}

/// A kept input `[rows, features]` as the backward pass's products take it.
fn kept_act(x: Option<&[f32]>, rows: usize) -> Option<Act<'_>> {
    x.map(|x| Act::new(x, rows, x.len() / rows.max(1)))
}

/// Copies the column blocks `widths` of `[rows, sum(widths)]` `y` into one buffer each.
fn split_columns(y: &[f32], rows: usize, widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum();
    let mut out: Vec<Vec<f32>> = widths
        .iter()
        .map(|w| Vec::with_capacity(rows * w))
        .collect();
    for r in 0..rows {
        let mut start = r * total;
        for (o, &w) in out.iter_mut().zip(widths) {
            o.extend_from_slice(&y[start..start + w]);
            start += w;
        }
    }
    out
}

/// The inverse of [`split_columns`].
fn join_columns(parts: &[&[f32]], rows: usize) -> Vec<f32> {
    let widths: Vec<usize> = parts.iter().map(|p| p.len() / rows.max(1)).collect();
    let total: usize = widths.iter().sum();
    let mut out = Vec::with_capacity(rows * total);
    for r in 0..rows {
        for (p, &w) in parts.iter().zip(&widths) {
            out.extend_from_slice(&p[r * w..(r + 1) * w]);
        }
    }
    out
}

impl FusedLayer {
    /// Runs `f` on the layer's projections, their weights borrowed in place for the call.
    fn with_projs<R>(&self, f: impl FnOnce(&Projs) -> CResult<R>) -> CResult<R> {
        let hidden = self.input_norm.vals.len();
        let (nq, nkv) = (self.heads * self.hd, self.kv_heads * self.hd);
        let inter = self.down.w.dims()?.1;
        let all: Vec<&OwnedProj> = self
            .qkv
            .iter()
            .chain([&self.o])
            .chain(self.gate_up.iter())
            .chain([&self.down])
            .collect();
        // Each weight's `WRef`: an f32 weight's slice borrowed in place (its storage guard lives
        // in `guards` until the end of the function), or the packed bf16 copy.
        let f32w: Vec<Option<(Tensor, (usize, usize))>> = all
            .iter()
            .map(|p| match &p.w {
                Frozen::F32(t) => super::linear::f32_strided(t).map(Some),
                Frozen::Bf16(_) | Frozen::Streamed(_) | Frozen::Int8(_) => Ok(None),
            })
            .collect::<CResult<_>>()?;
        let guards: Vec<_> = f32w
            .iter()
            .map(|w| w.as_ref().map(|(t, st)| (t.storage_and_layout(), *st)))
            .collect();
        let mut slices = Vec::with_capacity(guards.len());
        for (p, g) in all.iter().zip(&guards) {
            slices.push(match (&p.w, g) {
                (Frozen::F32(_), Some((g, st))) => {
                    WRef::F32(super::cpu_f32(&g.0, g.1, "a projection weight")?, *st)
                }
                (Frozen::Bf16(pw), _) => WRef::Bf16(pw),
                (Frozen::Streamed(sw), _) => WRef::Streamed(sw),
                (Frozen::Int8(q), _) => WRef::Int8(q),
                (Frozen::F32(_), None) => candle_core::bail!("fused layer: weight not borrowed"),
            });
        }
        let p = |w, proj, din, dout| P { w, proj, din, dout };
        let nqkv = self.qkv.len();
        let qkv_out: Vec<usize> = if nqkv == 1 {
            vec![nq + 2 * nkv]
        } else {
            vec![nq, nkv, nkv]
        };
        let gu_out: Vec<usize> = if self.gate_up.len() == 1 {
            vec![2 * inter]
        } else {
            vec![inter, inter]
        };
        let qkv = self
            .qkv
            .iter()
            .zip(&slices)
            .zip(&qkv_out)
            .map(|((pr, w), &out)| p(*w, pr, hidden, out))
            .collect();
        let o = p(slices[nqkv], &self.o, nq, hidden);
        let gate_up = self
            .gate_up
            .iter()
            .zip(&slices[nqkv + 1..])
            .zip(&gu_out)
            .map(|((pr, w), &out)| p(*w, pr, hidden, out))
            .collect();
        let down = p(slices[slices.len() - 1], &self.down, inter, hidden);
        f(&Projs {
            qkv,
            o,
            gate_up,
            down,
            nq,
            nkv,
            inter,
        })
    }

    fn dims(&self, b: usize, l: usize) -> AttnDims {
        AttnDims {
            b,
            nh: self.heads,
            nkv: self.kv_heads,
            l,
            hd: self.hd,
            window: self.window,
        }
    }

    fn rotate(&self, x: &mut [f32], width: usize, l: usize, sign: f32) {
        if let Some((cos, sin)) = &self.rope {
            rope_in_place(x, width, l, self.hd, self.rd, cos, sin, sign);
        }
    }

    /// The layer on `x` `[b * l, hidden]`: its output and what the backward pass needs.
    fn forward(&self, ps: &Projs, x: &[f32], b: usize, l: usize) -> CResult<(Vec<f32>, Kept)> {
        let (nq, nkv, inter) = (ps.nq, ps.nkv, ps.inter);
        let rows = b * l;
        let par = Parallelism::Rayon(threads());
        let mut xa = Vec::with_capacity(ps.qkv.len() + ps.gate_up.len() + 2);

        let hidden = self.input_norm.vals.len();
        let hn = self.input_norm.forward(x);
        // One activation for q, k and v: its bf16 copy (for packed weights) is made once.
        let hn_act = Act::new(&hn, rows, hidden);
        let (mut q, mut k, v) = if ps.qkv.len() == 1 {
            let (y, a) = ps.qkv[0].fwd_new(&hn_act, par)?;
            xa.push(a);
            let mut parts = split_columns(&y, rows, &[nq, nkv, nkv]).into_iter();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(q), Some(k), Some(v)) => (q, k, v),
                _ => candle_core::bail!("fused layer: qkv split"),
            }
        } else {
            let mut outs = Vec::with_capacity(3);
            for p in &ps.qkv {
                let (y, a) = p.fwd_new(&hn_act, par)?;
                outs.push(y);
                xa.push(a);
            }
            let v = outs.pop().unwrap_or_default();
            let k = outs.pop().unwrap_or_default();
            let q = outs.pop().unwrap_or_default();
            (q, k, v)
        };
        drop(hn_act);
        let hn1 = self.qkv.iter().any(|p| p.needs_input()).then_some(hn);
        let q_pre = self.q_norm.as_ref().map(|n| {
            let normed = n.forward(&q);
            std::mem::replace(&mut q, normed)
        });
        let k_pre = self.k_norm.as_ref().map(|n| {
            let normed = n.forward(&k);
            std::mem::replace(&mut k, normed)
        });
        self.rotate(&mut q, nq, l, 1.0);
        self.rotate(&mut k, nkv, l, 1.0);
        let (att, lse) = attention_forward(self.dims(b, l), &q, &k, &v, self.scale, ps.bf16());
        // x1 = x + att Wo^T, or x + norm(att Wo^T)
        let att_act = Act::new(&att, rows, nq);
        let (x1, o_out) = match &self.post_attn_norm {
            None => {
                let mut x1 = x.to_vec();
                xa.push(ps.o.fwd_add(&att_act, &mut x1, par)?);
                (x1, None)
            }
            Some(n) => {
                let (o_out, a) = ps.o.fwd_new(&att_act, par)?;
                xa.push(a);
                let mut x1 = n.forward(&o_out);
                for (y, &r) in x1.iter_mut().zip(x) {
                    *y += r;
                }
                (x1, Some(o_out))
            }
        };
        drop(att_act);
        let hn = self.pre_mlp_norm.forward(&x1);
        // One activation for gate and up.
        let hn_act = Act::new(&hn, rows, hidden);
        let (g, u) = if ps.gate_up.len() == 1 {
            let (y, a) = ps.gate_up[0].fwd_new(&hn_act, par)?;
            xa.push(a);
            let mut parts = split_columns(&y, rows, &[inter, inter]).into_iter();
            match (parts.next(), parts.next()) {
                (Some(g), Some(u)) => (g, u),
                _ => candle_core::bail!("fused layer: gate/up split"),
            }
        } else {
            let (g, ag) = ps.gate_up[0].fwd_new(&hn_act, par)?;
            let (u, au) = ps.gate_up[1].fwd_new(&hn_act, par)?;
            xa.push(ag);
            xa.push(au);
            (g, u)
        };
        drop(hn_act);
        let hn2 = self.gate_up.iter().any(|p| p.needs_input()).then_some(hn);
        let h = gated_forward(self.act, &g, &u);
        // out = x1 + h Wd^T, or x1 + norm(h Wd^T)
        let h_act = Act::new(&h, rows, inter);
        let (out, d_out) = match &self.post_mlp_norm {
            None => {
                let mut out = x1.clone();
                xa.push(ps.down.fwd_add(&h_act, &mut out, par)?);
                (out, None)
            }
            Some(n) => {
                let (d_out, a) = ps.down.fwd_new(&h_act, par)?;
                xa.push(a);
                let mut out = n.forward(&d_out);
                for (y, &r) in out.iter_mut().zip(&x1) {
                    *y += r;
                }
                (out, Some(d_out))
            }
        };
        Ok((
            out,
            Kept {
                q,
                k,
                v,
                q_pre,
                k_pre,
                att,
                lse,
                o_out,
                x1,
                g,
                u,
                d_out,
                hn1,
                hn2,
                xa,
            },
        ))
    }

    /// `dx` (when `want_dx`) for the output gradient `dy`, from the kept intermediates; the
    /// trained tensors' gradients go to `sink`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        ps: &Projs,
        x: &[f32],
        dy: &[f32],
        b: usize,
        l: usize,
        kept: Kept,
        want_dx: bool,
        sink: &mut Vec<(Tensor, Vec<f32>)>,
    ) -> CResult<Option<Vec<f32>>> {
        let Kept {
            q,
            k,
            v,
            q_pre,
            k_pre,
            att,
            lse,
            o_out,
            x1,
            g,
            u,
            d_out,
            hn1,
            hn2,
            xa,
        } = kept;
        let (nq, nkv) = (ps.nq, ps.nkv);
        let rows = b * l;
        let par = Parallelism::Rayon(threads());
        let nqkv = ps.qkv.len();
        let ngu = ps.gate_up.len();
        let xa_at = |i: usize| xa.get(i).and_then(|a| a.as_deref());
        let (i_o, i_gu, i_d) = (nqkv, nqkv + 1, nqkv + 1 + ngu);

        // MLP half: through the output norm, dh = dy Wd (+ LoRA), the gated activation, then
        // dhn = dg Wg + du Wu (+ LoRA).
        let d_down = match (&self.post_mlp_norm, &d_out) {
            (Some(n), Some(d_out)) => Some(n.backward_new(d_out, dy, sink)),
            _ => None,
        };
        drop(d_out);
        let d_down_ref: &[f32] = d_down.as_deref().unwrap_or(dy);
        let h = self
            .down
            .needs_input()
            .then(|| gated_forward(self.act, &g, &u));
        let mut dh = None;
        let h_act = kept_act(h.as_deref(), rows);
        ps.down.bwd(
            h_act.as_ref(),
            xa_at(i_d),
            d_down_ref,
            rows,
            &mut dh,
            true,
            sink,
            par,
        )?;
        drop(h_act);
        drop((h, d_down));
        let dh = dh.unwrap_or_default();
        let (dg, du) = gated_backward(self.act, &g, &u, &dh);
        drop((g, u, dh));
        let mut dhn = None;
        let hn2_act = kept_act(hn2.as_deref(), rows);
        if ngu == 1 {
            let dgu = join_columns(&[&dg, &du], rows);
            ps.gate_up[0].bwd(
                hn2_act.as_ref(),
                xa_at(i_gu),
                &dgu,
                rows,
                &mut dhn,
                true,
                sink,
                par,
            )?;
        } else {
            for (j, d) in [&dg, &du].into_iter().enumerate() {
                ps.gate_up[j].bwd(
                    hn2_act.as_ref(),
                    xa_at(i_gu + j),
                    d,
                    rows,
                    &mut dhn,
                    true,
                    sink,
                    par,
                )?;
            }
        }
        drop(hn2_act);
        drop((dg, du, hn2));
        let dhn = dhn.unwrap_or_default();
        // dx1 = dy + the pre-MLP norm's backward pass.
        let mut dx1 = dy.to_vec();
        self.pre_mlp_norm.backward(&x1, &dhn, &mut dx1, true, sink);
        drop((x1, dhn));
        // Attention half: through the output norm, datt = dx1 Wo (+ LoRA), the attention's
        // backward pass, the inverse rotations, the q/k norms.
        let d_o = match (&self.post_attn_norm, &o_out) {
            (Some(n), Some(o_out)) => Some(n.backward_new(o_out, &dx1, sink)),
            _ => None,
        };
        drop(o_out);
        let mut datt = None;
        ps.o.bwd(
            Some(&Act::new(&att, rows, nq)),
            xa_at(i_o),
            d_o.as_deref().unwrap_or(&dx1),
            rows,
            &mut datt,
            true,
            sink,
            par,
        )?;
        drop(d_o);
        let datt = datt.unwrap_or_default();
        let (mut dq, mut dk, dv) = attention_backward(
            self.dims(b, l),
            &q,
            &k,
            &v,
            &att,
            &datt,
            &lse,
            self.scale,
            ps.bf16(),
        );
        drop((q, k, v, att, datt, lse));
        self.rotate(&mut dq, nq, l, -1.0);
        self.rotate(&mut dk, nkv, l, -1.0);
        if let (Some(n), Some(pre)) = (&self.q_norm, &q_pre) {
            dq = n.backward_new(pre, &dq, sink);
        }
        if let (Some(n), Some(pre)) = (&self.k_norm, &k_pre) {
            dk = n.backward_new(pre, &dk, sink);
        }
        drop((q_pre, k_pre));
        // dhn = dq Wq + dk Wk + dv Wv (+ LoRA), then dx = dx1 + the input norm's backward pass;
        // skipped when neither the input nor the norm needs it.
        let need_dhn = want_dx || self.input_norm.param.is_some();
        let mut dhn = None;
        let hn1_act = kept_act(hn1.as_deref(), rows);
        if nqkv == 1 {
            let dqkv = join_columns(&[&dq, &dk, &dv], rows);
            ps.qkv[0].bwd(
                hn1_act.as_ref(),
                xa_at(0),
                &dqkv,
                rows,
                &mut dhn,
                need_dhn,
                sink,
                par,
            )?;
        } else {
            for (j, d) in [&dq, &dk, &dv].into_iter().enumerate() {
                ps.qkv[j].bwd(
                    hn1_act.as_ref(),
                    xa_at(j),
                    d,
                    rows,
                    &mut dhn,
                    need_dhn,
                    sink,
                    par,
                )?;
            }
        }
        drop(hn1_act);
        drop((dq, dk, dv, hn1));
        let Some(dhn) = dhn else {
            return Ok(None);
        };
        let mut dx = dx1;
        self.input_norm.backward(x, &dhn, &mut dx, true, sink);
        Ok(want_dx.then_some(dx))
    }

    fn run_forward(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("FusedLayer.cpu_fwd");
        let x = f32_slice(s, l, "layer input")?;
        let (b, seq, _) = l.shape().dims3()?;
        let (out, kept) = self.with_projs(|ps| self.forward(ps, x, b, seq))?;
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn run_backward(&self, x: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let _pg = prof("FusedLayer.bwd");
        let (b, seq, _) = x.dims3()?;
        borrow_f32!(xv = x, "layer input"; dy = grad, "layer grad");
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut sink = Vec::new();
        let dx = self.with_projs(|ps| {
            let kept = match kept {
                Some(k) => k,
                // A second backward pass through the same graph: run the forward pass again.
                None => self.forward(ps, xv, b, seq)?.1,
            };
            self.backward(ps, xv, dy, b, seq, kept, x.track_op(), &mut sink)
        })?;
        let dev = x.device();
        let mut side = Vec::with_capacity(sink.len());
        for (param, g) in sink {
            let shape = param.shape().clone();
            side.push((param, Tensor::from_vec(g, shape, dev)?));
        }
        SIDE_GRADS.with(|s| s.borrow_mut().extend(side));
        dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()
    }
}

impl CustomOp1 for FusedLayer {
    fn name(&self) -> &'static str {
        "attune-fused-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.run_forward(s, l)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        self.run_backward(x, grad)
    }
}

/// The second input is one of the layer's trained tensors, there only to put the op in the
/// backward graph; the layer's trained tensors all get their gradients through [`backward`].
impl CustomOp2 for FusedLayer {
    fn name(&self) -> &'static str {
        "attune-fused-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        self.run_forward(s1, l1)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.run_backward(x, grad)?, None))
    }
}
