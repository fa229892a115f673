//! The decoder from candle's own ops only, for any device candle drives.
//!
//! Attune's fused kernels (`crate::kernels`) are CPU code; on a GPU every forward pass, every
//! KV-cache decode step and every training step goes through here instead. The ops: matmul (and
//! candle's quantized matmul for a quantized-only layer), RMSNorm, rotary embedding and softmax
//! as candle's fused ops (`candle_nn::ops::rms_norm`, `candle_nn::rotary_emb::rope`,
//! `softmax_last_dim`, which have CPU, CUDA and Metal kernels but no backward pass) when nothing
//! needs a gradient, and as compositions of differentiable basic ops when something does (a
//! `Var` in the model or the soft prompt), so candle's autograd (`Tensor::backward`) trains all
//! three methods. Every switch of [`Config`](crate::config::Config) is here: q/k norms, `(1 + w)`
//! norms, sandwich norms, GELU-tanh, fused `qkv_proj`/`gate_up_proj`, partial rotary, LongRoPE's
//! factors (in the tables), NoPE layers, sliding windows, the query scale and the embedding
//! scale (in the shared embedding step).
//!
//! The CPU model takes this path when [`Llama::set_portable`] (or `ATTUNE_PORTABLE=1`) asks,
//! which is how `models/tests/portable.rs` checks it against the fused path.

use candle_core::{Tensor, D};

use super::{causal_mask, Attention, Block, GateUpProj, KvCache, Llama, QkvProj, RmsNorm};
use crate::config::Activation;
use crate::{Error, Result};

/// Whether any of `ts` needs a gradient.
fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

impl RmsNorm {
    /// `x / rms(x) * (w + offset)` from candle's ops.
    pub fn forward_portable(&self, x: &Tensor) -> Result<Tensor> {
        let w = if self.offset != 0.0 {
            (&self.weight + self.offset as f64)?
        } else {
            self.weight.clone()
        };
        let eps = self.eps as f32;
        Ok(if tracked(&[x, &w]) {
            candle_nn::ops::rms_norm_slow(x, &w, eps)?
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &w, eps)?
        })
    }
}

/// Rotate-half rope of `t` `[b, heads, seq, hd]` with `cos`/`sin` `[seq, rd / 2]` on its first
/// `rd` features (all of them unless the model's rotary is partial).
fn rope(t: Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = t.dim(D::Minus1)?;
    let rd = cos.dim(1)? * 2;
    let rotate = |x: &Tensor| -> Result<Tensor> {
        Ok(if tracked(&[x]) {
            candle_nn::rotary_emb::rope_slow(x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?
        })
    };
    if rd == hd {
        return rotate(&t);
    }
    if rd > hd {
        return Err(Error::InvalidParams(format!(
            "rotary dimension {rd} exceeds the head dimension {hd}"
        )));
    }
    let head = rotate(&t.narrow(D::Minus1, 0, rd)?)?;
    let tail = t.narrow(D::Minus1, rd, hd - rd)?;
    Ok(Tensor::cat(&[&head, &tail], D::Minus1)?)
}

impl Attention {
    /// q, k, v `[b, l, heads * hd]`.
    fn qkv_portable(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => Ok((
                q_proj.forward_portable(x)?,
                k_proj.forward_portable(x)?,
                v_proj.forward_portable(x)?,
            )),
            QkvProj::Fused { qkv_proj } => {
                let y = qkv_proj.forward_portable(x)?;
                let nq = self.num_heads * self.head_dim;
                let nkv = self.num_kv_heads * self.head_dim;
                Ok((
                    y.narrow(D::Minus1, 0, nq)?,
                    y.narrow(D::Minus1, nq, nkv)?,
                    y.narrow(D::Minus1, nq + nkv, nkv)?,
                ))
            }
        }
    }

    /// `[b, l, n * hd]` -> `[b, n, l, hd]`, through the per-head norm if there is one.
    fn heads_portable(&self, t: Tensor, n: usize, norm: &Option<RmsNorm>) -> Result<Tensor> {
        let (b, l, _) = t.dims3()?;
        let t = t.reshape((b, l, n, self.head_dim))?;
        let t = match norm {
            Some(nrm) => nrm.forward_portable(&t)?,
            None => t,
        };
        Ok(t.transpose(1, 2)?.contiguous()?)
    }

    /// Grouped-query attention of `x` `[b, l, hidden]` at positions `offset..offset + l`,
    /// through the cache when given; `[b, l, hidden]`.
    fn forward_portable(
        &self,
        x: &Tensor,
        rope_tables: Option<(&Tensor, &Tensor)>,
        cache: Option<(&mut KvCache, usize)>,
        offset: usize,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = self.qkv_portable(x)?;
        let mut q = self.heads_portable(q, nh, &self.q_norm)?;
        let mut k = self.heads_portable(k, nkv, &self.k_norm)?;
        let v = self.heads_portable(v, nkv, &None)?;
        if let Some((cos, sin)) = rope_tables {
            q = rope(q, cos, sin)?;
            k = rope(k, cos, sin)?;
        }
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, &k, &v)?,
            None => (k, v),
        };
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let t = k.dim(2)?;
        let groups = nh / nkv;
        // The query heads sharing a kv head side by side: [b, nkv, groups * l, hd], no kv copies.
        let q = q.reshape((b, nkv, groups * l, hd))?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        // Causal (and windowed) unless one query sees every key anyway.
        let needs_mask = l > 1 || self.window.is_some_and(|w| t > w);
        let scores = if needs_mask {
            let m = causal_mask(l, offset, self.window, x.device())?;
            scores
                .reshape((b, nkv, groups, l, t))?
                .broadcast_add(&m)?
                .reshape((b, nkv, groups * l, t))?
        } else {
            scores
        };
        let probs = if tracked(&[&scores]) {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let out = probs
            .matmul(&v)?
            .reshape((b, nh, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, nh * hd))?;
        self.o_proj.forward_portable(&out)
    }
}

impl Block {
    /// The layer on `x` `[b, l, hidden]`.
    fn forward_portable(
        &self,
        x: &Tensor,
        rope_tables: Option<(&Tensor, &Tensor)>,
        cache: Option<(&mut KvCache, usize)>,
        offset: usize,
    ) -> Result<Tensor> {
        let hn = self.input_layernorm.forward_portable(x)?;
        let mut a = self
            .self_attn
            .forward_portable(&hn, rope_tables, cache, offset)?;
        if let Some(n) = &self.post_attention_norm {
            a = n.forward_portable(&a)?;
        }
        let x1 = (x + a)?;
        let hn = self.pre_mlp_norm.forward_portable(&x1)?;
        let (g, u) = match &self.mlp.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => (
                gate_proj.forward_portable(&hn)?,
                up_proj.forward_portable(&hn)?,
            ),
            GateUpProj::Fused { gate_up_proj } => {
                let y = gate_up_proj.forward_portable(&hn)?;
                let inter = gate_up_proj.out_dim() / 2;
                (
                    y.narrow(D::Minus1, 0, inter)?,
                    y.narrow(D::Minus1, inter, inter)?,
                )
            }
        };
        let act = match self.mlp.act {
            Activation::Silu => g.silu()?,
            // candle's `gelu` is the tanh approximation (PyTorch's `gelu_pytorch_tanh`).
            Activation::GeluTanh => g.gelu()?,
        };
        let mut m = self.mlp.down_proj.forward_portable(&(act * u)?)?;
        if let Some(n) = &self.post_mlp_norm {
            m = n.forward_portable(&m)?;
        }
        Ok((x1 + m)?)
    }
}

impl Llama {
    /// Every layer and the final norm on the embedded input `x` `[b, seq, hidden]` at positions
    /// `offset..`, with the rope `tables` of [`Llama::hidden_states`]; the cache (if any) is
    /// appended to but its length is left to the caller.
    pub(super) fn layers_portable(
        &self,
        mut x: Tensor,
        tables: &[(Tensor, Tensor)],
        mut cache: Option<&mut KvCache>,
        offset: usize,
    ) -> Result<Tensor> {
        for (i, block) in self.layers.iter().enumerate() {
            let rope_tables = match block.self_attn.rope {
                Some(r) => {
                    let (c, s) = tables.get(r).ok_or_else(|| {
                        Error::InvalidParams(format!("layer {i} names rope table {r}"))
                    })?;
                    Some((c, s))
                }
                None => None,
            };
            x = block.forward_portable(
                &x,
                rope_tables,
                cache.as_deref_mut().map(|c| (c, i)),
                offset,
            )?;
        }
        self.norm.forward_portable(&x)
    }
}
