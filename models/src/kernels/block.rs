//! A decoder layer as one training op.
//!
//! Built from one graph node per norm, projection, rotation and residual add, a layer costs
//! candle's backward pass a zero-filled buffer and an add for every node's input, plus a tensor
//! per intermediate. [`fused_layer`] runs the whole layer — RMSNorm, q/k/v, rotary embeddings,
//! causal attention, `o_proj` and its residual, RMSNorm, gate/up, SwiGLU, `down_proj` and its
//! residual — as one node with a hand-written backward pass. It keeps just what that pass reads
//! (the rotated q and k, v, the attention output and log-sum-exp, the mid-layer residual, the
//! gate and up products, and the projections' inputs where a weight or LoRA branch is trained),
//! accumulates the q/k/v input gradients and the residual branches in place, and computes only
//! the gradients something needs.
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
use super::linear::{lora_branch_backward, lora_branch_forward, Act, Frozen, WRef};
use super::profile::prof;
use super::rms_norm::{rms_backward, rms_forward};
use super::rope::rope_in_place;
use super::swiglu::{swiglu_backward, swiglu_forward};
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
/// every forward pass (`Mixed`: f32 master weight, bf16 compute, f32 gradient).
#[derive(Clone, Copy)]
pub enum ProjWeight<'a> {
    F32(&'a Tensor),
    Bf16(&'a Arc<PackedWeight>),
    Mixed(&'a Tensor),
}

impl<'a> ProjWeight<'a> {
    fn dims(&self) -> Vec<usize> {
        match self {
            ProjWeight::F32(w) | ProjWeight::Mixed(w) => w.dims().to_vec(),
            ProjWeight::Bf16(p) => vec![p.out_dim(), p.in_dim()],
        }
    }

    /// The weight, when it is a trained variable.
    fn trained(self) -> Option<&'a Tensor> {
        match self {
            ProjWeight::F32(w) | ProjWeight::Mixed(w) => w.track_op().then_some(w),
            ProjWeight::Bf16(_) => None,
        }
    }
}

/// The parameters of one decoder layer: the two norms' scales `[hidden]` and the seven
/// projections, all dense f32 (no bias, no dropout on a LoRA branch).
#[derive(Clone, Copy)]
pub struct LayerParts<'a> {
    pub input_norm: &'a Tensor,
    pub input_eps: f32,
    pub q: Proj<'a>,
    pub k: Proj<'a>,
    pub v: Proj<'a>,
    pub o: Proj<'a>,
    pub post_norm: &'a Tensor,
    pub post_eps: f32,
    pub gate: Proj<'a>,
    pub up: Proj<'a>,
    pub down: Proj<'a>,
    pub heads: usize,
    pub kv_heads: usize,
}

impl LayerParts<'_> {
    fn projs(&self) -> [Proj<'_>; 7] {
        [
            self.q, self.k, self.v, self.o, self.gate, self.up, self.down,
        ]
    }

    /// The first tensor of the layer that is being trained, if any.
    pub fn first_trained(&self) -> Option<&Tensor> {
        let mut all = vec![self.input_norm, self.post_norm];
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

/// The layer `parts` applied to `x` `[b, seq, hidden]` (rotary tables `cos`/`sin`
/// `[seq, hd / 2]`): differentiable in `x`, and in the layer's trained tensors through
/// [`backward`].
pub fn fused_layer(x: &Tensor, parts: LayerParts, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let (_, l, hidden) = x.dims3()?;
    let (seq, half) = cos.dims2()?;
    let nq = parts.q.w.dims()[0];
    let nkv = parts.k.w.dims()[0];
    let inter = parts.gate.w.dims()[0];
    let hd = half * 2;
    let lora_fits = |p: &Proj, out: usize, inp: usize| match p.lora {
        None => true,
        Some((a, b, _)) => {
            let r = a.dim(0).unwrap_or(0);
            r > 0 && a.dims() == [r, inp] && b.dims() == [out, r]
        }
    };
    let shapes_fit = seq == l
        && sin.dims() == cos.dims()
        && parts.heads > 0
        && parts.kv_heads > 0
        && parts.heads.is_multiple_of(parts.kv_heads)
        && nq == parts.heads * hd
        && nkv == parts.kv_heads * hd
        && parts.input_norm.dims() == [hidden]
        && parts.post_norm.dims() == [hidden]
        && [
            (&parts.q, nq, hidden),
            (&parts.k, nkv, hidden),
            (&parts.v, nkv, hidden),
            (&parts.o, hidden, nq),
            (&parts.gate, inter, hidden),
            (&parts.up, inter, hidden),
            (&parts.down, hidden, inter),
        ]
        .iter()
        .all(|(p, out, inp)| p.w.dims() == [*out, *inp] && lora_fits(p, *out, *inp));
    if !shapes_fit {
        candle_core::bail!(
            "fused layer: input {:?}, rope tables {:?}, q {:?}, k {:?}, gate {:?} do not fit \
             {} heads / {} kv heads",
            x.dims(),
            cos.dims(),
            parts.q.w.dims(),
            parts.k.w.dims(),
            parts.gate.w.dims(),
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
        let (w, param, bf16_dw) = match p.w {
            ProjWeight::F32(w) => (
                Frozen::F32(w.contiguous()?),
                w.track_op().then(|| w.clone()),
                false,
            ),
            ProjWeight::Bf16(pw) => (Frozen::Bf16(pw.clone()), None, false),
            ProjWeight::Mixed(w) => {
                let (out, inp) = w.dims2()?;
                borrow_f32!(v = w, "projection weight");
                let packed = PackedWeight::new_both(v, out, inp);
                let trained = w.track_op();
                (
                    Frozen::Bf16(Arc::new(packed)),
                    trained.then(|| w.clone()),
                    trained,
                )
            }
        };
        Ok(OwnedProj {
            w,
            param,
            lora,
            bf16_dw,
        })
    };
    let norm = |w: &Tensor, eps: f32| -> CResult<OwnedNorm> {
        Ok(OwnedNorm {
            vals: w.flatten_all()?.to_vec1()?,
            param: w.track_op().then(|| w.clone()),
            eps,
        })
    };
    let op = FusedLayer {
        input_norm: norm(parts.input_norm, parts.input_eps)?,
        q: proj(parts.q)?,
        k: proj(parts.k)?,
        v: proj(parts.v)?,
        o: proj(parts.o)?,
        post_norm: norm(parts.post_norm, parts.post_eps)?,
        gate: proj(parts.gate)?,
        up: proj(parts.up)?,
        down: proj(parts.down)?,
        heads: parts.heads,
        kv_heads: parts.kv_heads,
        hd,
        cos: cos.flatten_all()?.to_vec1()?,
        sin: sin.flatten_all()?.to_vec1()?,
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
    /// The weight gradient runs in bf16 on the matrix units (a `Mixed` weight).
    bf16_dw: bool,
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
}

struct FusedLayer {
    input_norm: OwnedNorm,
    q: OwnedProj,
    k: OwnedProj,
    v: OwnedProj,
    o: OwnedProj,
    post_norm: OwnedNorm,
    gate: OwnedProj,
    up: OwnedProj,
    down: OwnedProj,
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
    /// The normed inputs of q/k/v and of gate/up, when a trained projection reads them.
    hn1: Option<Vec<f32>>,
    hn2: Option<Vec<f32>>,
    /// `x A^T` `[rows, r]` of each LoRA branch, in [q, k, v, o, gate, up, down] order.
    xa: [Option<Vec<f32>>; 7],
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
    fn fwd_new(&self, x: &Act, par: Parallelism) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut y = self.w.forward_new(x, self.dout, par);
        let xa = self.lora_fwd(x.x, x.rows, &mut y, par);
        (y, xa)
    }

    /// `dst += x W^T (+ LoRA)`; returns the branch's `x A^T`.
    fn fwd_add(&self, x: &Act, dst: &mut [f32], par: Parallelism) -> Option<Vec<f32>> {
        self.w.forward_add(x, dst, self.dout, par);
        self.lora_fwd(x.x, x.rows, dst, par)
    }

    /// The backward pass for the output gradient `dy`: adds `dy W (+ LoRA)` to `dx` (creating it
    /// when `None`) if `want_dx`, and pushes the gradients of the trained tensors to `sink`. `x` is
    /// the input (needed when [`OwnedProj::needs_input`]), `xa` the branch's `x A^T`.
    #[allow(clippy::too_many_arguments)]
    fn bwd(
        &self,
        x: Option<&[f32]>,
        xa: Option<&[f32]>,
        dy: &[f32],
        rows: usize,
        dx: &mut Option<Vec<f32>>,
        want_dx: bool,
        sink: &mut Vec<(Tensor, Vec<f32>)>,
        par: Parallelism,
    ) -> CResult<()> {
        let (din, dout) = (self.din, self.dout);
        if want_dx {
            self.w.input_grad(&Act::new(dy, rows, dout), din, dx, par);
        }
        let input = || -> CResult<&[f32]> {
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
            let dw = if self.proj.bf16_dw {
                let a = RowsBf16::from_f32_transposed(dy, rows, dout);
                amx::product(&a, &PackedB::from_cols(x, rows, din))
            } else {
                product(dout, din, rows, dy, (1, dout), x, (din, 1), par)
            };
            sink.push((w.clone(), dw));
        }
        if let Some(l) = &self.proj.lora {
            let x = l.a.as_ref().map(|_| input()).transpose()?;
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

/// The layer's seven projections for one pass, and the q and k/v widths.
struct Projs<'s> {
    q: P<'s>,
    k: P<'s>,
    v: P<'s>,
    o: P<'s>,
    gate: P<'s>,
    up: P<'s>,
    down: P<'s>,
    nq: usize,
    nkv: usize,
}

impl FusedLayer {
    /// Runs `f` on the seven projections, their weights borrowed in place for the call.
    fn with_projs<R>(&self, f: impl FnOnce(&Projs) -> CResult<R>) -> CResult<R> {
        // Binds each name to the projection's `WRef`: an f32 weight's slice borrowed in place (its
        // storage guard lives on in the shadowed binding until the end of the function), or the
        // packed bf16 copy.
        macro_rules! borrow_w {
            ($($v:ident = $w:expr, $what:expr);+ $(;)?) => {
                $(
                    let $v = match &$w {
                        Frozen::F32(t) => Some(t.storage_and_layout()),
                        Frozen::Bf16(_) => None,
                    };
                    let $v = match (&$w, &$v) {
                        (Frozen::F32(_), Some((s, l))) => WRef::F32(super::cpu_f32(s, l, $what)?),
                        (Frozen::Bf16(p), _) => WRef::Bf16(p),
                        (Frozen::F32(_), None) => candle_core::bail!("{}: weight not borrowed", $what),
                    };
                )+
            };
        }
        borrow_w!(
            wq = self.q.w, "q_proj";
            wk = self.k.w, "k_proj";
            wv = self.v.w, "v_proj";
            wo = self.o.w, "o_proj";
            wg = self.gate.w, "gate_proj";
            wu = self.up.w, "up_proj";
            wd = self.down.w, "down_proj";
        );
        let hidden = self.input_norm.vals.len();
        let (nq, nkv) = (self.heads * self.hd, self.kv_heads * self.hd);
        let inter = self.gate.w.dims()?.0;
        let p = |w, proj, din, dout| P { w, proj, din, dout };
        f(&Projs {
            q: p(wq, &self.q, hidden, nq),
            k: p(wk, &self.k, hidden, nkv),
            v: p(wv, &self.v, hidden, nkv),
            o: p(wo, &self.o, nq, hidden),
            gate: p(wg, &self.gate, hidden, inter),
            up: p(wu, &self.up, hidden, inter),
            down: p(wd, &self.down, inter, hidden),
            nq,
            nkv,
        })
    }

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
    fn forward(&self, ps: &Projs, x: &[f32], b: usize, l: usize) -> CResult<(Vec<f32>, Kept)> {
        let (nq, nkv) = (ps.nq, ps.nkv);
        let rows = b * l;
        let par = Parallelism::Rayon(threads());

        let hidden = self.input_norm.vals.len();
        let hn = rms_forward(x, &self.input_norm.vals, self.input_norm.eps);
        let hn_act = Act::new(&hn, rows, hidden);
        let (mut q, xa_q) = ps.q.fwd_new(&hn_act, par);
        let (mut k, xa_k) = ps.k.fwd_new(&hn_act, par);
        let (v, xa_v) = ps.v.fwd_new(&hn_act, par);
        drop(hn_act);
        let hn1 = [&self.q, &self.k, &self.v]
            .iter()
            .any(|p| p.needs_input())
            .then_some(hn);
        rope_in_place(&mut q, nq, l, self.hd, &self.cos, &self.sin, 1.0);
        rope_in_place(&mut k, nkv, l, self.hd, &self.cos, &self.sin, 1.0);
        let scale = 1.0 / (self.hd as f32).sqrt();
        let (att, lse) = attention_forward(self.dims(b, l), &q, &k, &v, scale);
        // x1 = x + att Wo^T
        let mut x1 = x.to_vec();
        let xa_o = ps.o.fwd_add(&Act::new(&att, rows, nq), &mut x1, par);
        let hn = rms_forward(&x1, &self.post_norm.vals, self.post_norm.eps);
        let hn_act = Act::new(&hn, rows, hidden);
        let (g, xa_g) = ps.gate.fwd_new(&hn_act, par);
        let (u, xa_u) = ps.up.fwd_new(&hn_act, par);
        drop(hn_act);
        let hn2 = [&self.gate, &self.up]
            .iter()
            .any(|p| p.needs_input())
            .then_some(hn);
        let h = swiglu_forward(&g, &u);
        // out = x1 + h Wd^T
        let mut out = x1.clone();
        let inter = g.len() / rows.max(1);
        let xa_d = ps.down.fwd_add(&Act::new(&h, rows, inter), &mut out, par);
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
                hn1,
                hn2,
                xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
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
            att,
            lse,
            x1,
            g,
            u,
            hn1,
            hn2,
            xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
        } = kept;
        let (nq, nkv) = (ps.nq, ps.nkv);
        let rows = b * l;
        let par = Parallelism::Rayon(threads());

        // MLP half: dh = dy Wd (+ LoRA), then SwiGLU, then dhn = dg Wg + du Wu (+ LoRA).
        let h = self.down.needs_input().then(|| swiglu_forward(&g, &u));
        let mut dh = None;
        ps.down.bwd(
            h.as_deref(),
            xa_d.as_deref(),
            dy,
            rows,
            &mut dh,
            true,
            sink,
            par,
        )?;
        drop(h);
        let dh = dh.unwrap_or_default();
        let (dg, du) = swiglu_backward(&g, &u, &dh);
        drop((g, u, dh));
        let mut dhn = None;
        ps.gate.bwd(
            hn2.as_deref(),
            xa_g.as_deref(),
            &dg,
            rows,
            &mut dhn,
            true,
            sink,
            par,
        )?;
        ps.up.bwd(
            hn2.as_deref(),
            xa_u.as_deref(),
            &du,
            rows,
            &mut dhn,
            true,
            sink,
            par,
        )?;
        drop((dg, du, hn2));
        let dhn = dhn.unwrap_or_default();
        // dx1 = dy + the post-attention norm's backward pass.
        let mut dx1 = dy.to_vec();
        let dw = rms_backward(
            &x1,
            &self.post_norm.vals,
            self.post_norm.eps,
            &dhn,
            &mut dx1,
            true,
            self.post_norm.param.is_some(),
        );
        if let Some(param) = &self.post_norm.param {
            sink.push((param.clone(), dw));
        }
        drop((x1, dhn));
        // Attention half: datt = dx1 Wo (+ LoRA), the attention's backward pass, the inverse
        // rotations.
        let mut datt = None;
        ps.o.bwd(
            Some(&att),
            xa_o.as_deref(),
            &dx1,
            rows,
            &mut datt,
            true,
            sink,
            par,
        )?;
        let datt = datt.unwrap_or_default();
        let scale = 1.0 / (self.hd as f32).sqrt();
        let (mut dq, mut dk, dv) =
            attention_backward(self.dims(b, l), &q, &k, &v, &att, &datt, &lse, scale);
        drop((q, k, v, att, datt, lse));
        rope_in_place(&mut dq, nq, l, self.hd, &self.cos, &self.sin, -1.0);
        rope_in_place(&mut dk, nkv, l, self.hd, &self.cos, &self.sin, -1.0);
        // dhn = dq Wq + dk Wk + dv Wv (+ LoRA), then dx = dx1 + the input norm's backward pass;
        // skipped when neither the input nor the norm needs it.
        let need_dhn = want_dx || self.input_norm.param.is_some();
        let mut dhn = None;
        ps.q.bwd(
            hn1.as_deref(),
            xa_q.as_deref(),
            &dq,
            rows,
            &mut dhn,
            need_dhn,
            sink,
            par,
        )?;
        ps.k.bwd(
            hn1.as_deref(),
            xa_k.as_deref(),
            &dk,
            rows,
            &mut dhn,
            need_dhn,
            sink,
            par,
        )?;
        ps.v.bwd(
            hn1.as_deref(),
            xa_v.as_deref(),
            &dv,
            rows,
            &mut dhn,
            need_dhn,
            sink,
            par,
        )?;
        drop((dq, dk, dv, hn1));
        let Some(dhn) = dhn else {
            return Ok(None);
        };
        let mut dx = dx1;
        let dw = rms_backward(
            x,
            &self.input_norm.vals,
            self.input_norm.eps,
            &dhn,
            &mut dx,
            true,
            self.input_norm.param.is_some(),
        );
        if let Some(param) = &self.input_norm.param {
            sink.push((param.clone(), dw));
        }
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
