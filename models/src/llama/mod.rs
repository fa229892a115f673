//! The decoder Attune runs and adapts: the Llama shape (Llama 2/3, SmolLM2, Mistral, Qwen2) and
//! the families built on it (Qwen3, Gemma 3, Phi-3 / Phi-4-mini, SmolLM3), one model with switches.
//!
//! Architecture: Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" —
//! pre-norm RMSNorm blocks, rotary position embeddings (Su et al. 2021), grouped-query attention
//! (Ainslie et al. 2023), SwiGLU MLP. The switches ([`Config`]): q/k/v biases (Qwen2); q/k
//! RMSNorm per head (Qwen3, Gemma 3); Gemma 3's `(1 + w)` norms, norms on the attention and MLP
//! outputs, embeddings scaled by `sqrt(hidden)`, GELU-tanh gate, `query_pre_attn_scalar`, and
//! sliding-window layers with their own rope base between global ones (Team Gemma 2025); fused
//! `qkv_proj` / `gate_up_proj`, partial rotary and LongRoPE (Phi-3, Abdin et al. 2024); layers
//! without rope (SmolLM3's NoPE layers); Llama 3.1's rope scaling.
//!
//! Weights are always in Hugging Face layout (the GGUF reader un-permutes Q/K and removes Gemma's
//! `+1` from its norms), module names equal the Hugging Face names
//! (`model.layers.{i}.self_attn.q_proj`), every [`Linear`] can carry a LoRA branch, and
//! [`Llama::forward_with_prefix`] takes soft-prompt embeddings (PEFT prompt tuning).
//!
//! On a device other than the CPU, and on the CPU when [`Llama::set_portable`] or
//! `ATTUNE_PORTABLE=1` asks, the model runs the portable path ([`portable`]): candle's own ops,
//! trained through candle's autograd, since Attune's kernels are CPU code.
//!
//! Two kernels per op: for inference, fused ops with no backward pass (candle's `rms_norm` and
//! `rope`, Attune's causal attention over the KV cache and SwiGLU in `kernels`); for training,
//! ops with a backward pass (Attune's fused ones in `kernels`, or compositions of candle's). The differentiable path
//! is taken automatically when any weight, LoRA tensor or the prefix is a tracked variable, or
//! when [`Llama::set_force_differentiable`] asks for it.

mod portable;

use candle_core::{DType, Device, Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::{Activation, Config, RopeScaling};
use crate::linear::{BaseForm, ComputeMode, FusedDecode, Linear};
use crate::{Error, Result};

/// Root-mean-square layer norm with a learned scale: `x / rms(x) * w`, or `* (1 + w)` for
/// Gemma's norms (`offset` 1; the weight is the checkpoint's `w` either way).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub offset: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        Self::with_offset(weight, eps, 0.0)
    }

    /// A norm scaling by `weight + offset`.
    pub fn with_offset(weight: Tensor, eps: f64, offset: f32) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            eps,
            offset,
        })
    }

    pub fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if differentiable || self.weight.track_op() {
            Ok(crate::kernels::rms_norm_offset(
                x,
                &self.weight,
                self.eps as f32,
                self.offset,
            )?)
        } else {
            let w = if self.offset != 0.0 {
                (&self.weight + self.offset as f64)?
            } else {
                self.weight.clone()
            };
            Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &w,
                self.eps as f32,
            )?)
        }
    }
}

/// Token embedding table `[vocab, hidden]`: f32, or quantized rows dequantized on lookup; the
/// looked-up rows are multiplied by `scale` when the model scales its embeddings (Gemma 3).
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Option<Tensor>,
    pub qweight: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub scale: Option<f64>,
}

impl Embedding {
    pub fn from_weight(weight: Tensor) -> Result<Self> {
        let (vocab_size, hidden_size) = weight.dims2()?;
        Ok(Self {
            weight: Some(weight.to_dtype(DType::F32)?),
            qweight: None,
            vocab_size,
            hidden_size,
            scale: None,
        })
    }

    /// The same table with its lookups multiplied by `scale`.
    pub fn scaled(mut self, scale: Option<f64>) -> Self {
        self.scale = scale;
        self
    }

    /// ids `[batch, seq]` u32 -> `[batch, seq, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let e = match (&self.weight, &self.qweight) {
            // An f32 table, or a bf16 one (a compact base) widened row by row.
            (Some(w), _) => w.index_select(&flat, 0)?.to_dtype(DType::F32)?,
            (None, Some(q)) => q.embedding(&flat)?,
            (None, None) => return Err(Error::InvalidParams("embedding has no weights".into())),
        };
        let e = e.reshape((b, l, self.hidden_size))?;
        Ok(match self.scale {
            // In the weights' dtype, as transformers scales them.
            Some(s) => (e * (s as f32) as f64)?,
            None => e,
        })
    }

    /// The dense table, dequantizing if only the quantized one is kept.
    pub fn weight_f32(&self) -> Result<Tensor> {
        match (&self.weight, &self.qweight) {
            (Some(w), _) => Ok(w.to_dtype(DType::F32)?),
            (None, Some(q)) => Ok(q.dequantize(&q.device())?),
            (None, None) => Err(Error::InvalidParams("embedding has no weights".into())),
        }
    }
}

/// The q, k and v projections: three (`q_proj`, `k_proj`, `v_proj`) or one whose rows are theirs
/// stacked (`qkv_proj`, Phi-3).
#[derive(Debug, Clone)]
pub enum QkvProj {
    Split {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused {
        qkv_proj: Linear,
    },
}

/// The gate and up projections: two (`gate_proj`, `up_proj`) or one (`gate_up_proj`, Phi-3:
/// gate rows first).
#[derive(Debug, Clone)]
pub enum GateUpProj {
    Split { gate_proj: Linear, up_proj: Linear },
    Fused { gate_up_proj: Linear },
}

/// Self-attention with grouped-query heads.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: QkvProj,
    pub o_proj: Linear,
    /// Per-head RMSNorms of q and k `[head_dim]` (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The scores' scale (`head_dim^-0.5`, or `query_pre_attn_scalar^-0.5`).
    pub scale: f64,
    /// Keys a query sees in a sliding-window layer, itself included.
    pub window: Option<usize>,
    /// Which of the model's rope tables the layer uses; `None`: no rope (NoPE).
    pub rope: Option<usize>,
}

impl Attention {
    /// The projections by their Hugging Face names, `o_proj` last.
    pub fn projections(&self) -> Vec<(&'static str, &Linear)> {
        let mut v = match &self.qkv {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => vec![("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj)],
            QkvProj::Fused { qkv_proj } => vec![("qkv_proj", qkv_proj)],
        };
        v.push(("o_proj", &self.o_proj));
        v
    }

    fn projections_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut v = match &mut self.qkv {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => vec![("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj)],
            QkvProj::Fused { qkv_proj } => vec![("qkv_proj", qkv_proj)],
        };
        v.push(("o_proj", &mut self.o_proj));
        v
    }

    /// Inference attention of `q` over the cache's `k`/`v` (`[b, heads, rows, hd]`), as every
    /// inference path (op by op, the fused decode and prompt layers) takes it: in f32, or opted in
    /// (`ATTUNE_ATTENTION=bf16`) in bf16 on the matrix units for prompts (more rows than the
    /// quantized path takes) on `ComputeMode::Auto`'s packed or compact weights. Off by default:
    /// greedy decoding of the reference chat prompt then parts from f32 after 13 tokens instead
    /// of 43 (`models/tests/generate.rs`).
    fn cached_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (scale, window) = (self.scale as f32, self.window);
        let bf16 = crate::kernels::attention::bf16_opted_in()
            && self.o_proj.prompts_in_bf16()
            && q.dim(2)? > crate::linear::AUTO_QUANTIZED_MAX_ROWS;
        Ok(if bf16 {
            crate::kernels::cached_attention_bf16(q, k, v, scale, window)?
        } else {
            crate::kernels::cached_attention(q, k, v, scale, window)?
        })
    }

    /// q, k, v `[b, l, heads * hd]` for `x` `[b, l, hidden]`.
    fn qkv_forward(
        &self,
        fused: Option<&FusedDecode>,
        x: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => {
                let qkv = FusedDecode::forward(fused, &[q_proj, k_proj, v_proj], x)?;
                let [q, k, v] = <[Tensor; 3]>::try_from(qkv)
                    .map_err(|_| Error::InvalidParams("q/k/v product count".into()))?;
                Ok((q, k, v))
            }
            QkvProj::Fused { qkv_proj } => {
                let y = qkv_proj.forward(x)?;
                let nq = self.num_heads * self.head_dim;
                let nkv = self.num_kv_heads * self.head_dim;
                Ok((
                    y.narrow(D::Minus1, 0, nq)?.contiguous()?,
                    y.narrow(D::Minus1, nq, nkv)?.contiguous()?,
                    y.narrow(D::Minus1, nq + nkv, nkv)?.contiguous()?,
                ))
            }
        }
    }

    /// `t` `[b, l, heads * hd]` through the per-head norm `norm`, if any.
    fn norm_heads(
        t: Tensor,
        norm: &Option<RmsNorm>,
        heads: usize,
        hd: usize,
        differentiable: bool,
    ) -> Result<Tensor> {
        let Some(n) = norm else {
            return Ok(t);
        };
        let (b, l, _) = t.dims3()?;
        let y = n.forward(&t.reshape((b, l, heads, hd))?, differentiable)?;
        Ok(y.reshape((b, l, heads * hd))?)
    }
}

/// The gated feed-forward: `down(act(gate(x)) * up(x))`, SwiGLU or GeGLU.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_up: GateUpProj,
    pub down_proj: Linear,
    pub act: Activation,
}

impl Mlp {
    /// The projections by their Hugging Face names, `down_proj` last.
    pub fn projections(&self) -> Vec<(&'static str, &Linear)> {
        let mut v = match &self.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => {
                vec![("gate_proj", gate_proj), ("up_proj", up_proj)]
            }
            GateUpProj::Fused { gate_up_proj } => vec![("gate_up_proj", gate_up_proj)],
        };
        v.push(("down_proj", &self.down_proj));
        v
    }

    fn projections_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut v = match &mut self.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => {
                vec![("gate_proj", gate_proj), ("up_proj", up_proj)]
            }
            GateUpProj::Fused { gate_up_proj } => vec![("gate_up_proj", gate_up_proj)],
        };
        v.push(("down_proj", &mut self.down_proj));
        v
    }

    fn forward(&self, x: &Tensor, fused: Option<&FusedDecode>) -> Result<Tensor> {
        let (g, u) = match &self.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => {
                if let (Activation::Silu, Some(wg), Some(wu)) = (
                    self.act,
                    gate_proj.dense_trainable(),
                    up_proj.dense_trainable(),
                ) {
                    if x.track_op() || wg.track_op() || wu.track_op() {
                        // Training without LoRA on gate/up (full fine-tuning, prompt tuning):
                        // the gate, up and SwiGLU as one graph node.
                        let h = crate::kernels::gate_up_swiglu(x, wg, wu)?;
                        return self.down_proj.forward(&h);
                    }
                }
                let gu = FusedDecode::forward(fused, &[gate_proj, up_proj], x)?;
                let [g, u] = <[Tensor; 2]>::try_from(gu)
                    .map_err(|_| Error::InvalidParams("gate/up product count".into()))?;
                (g, u)
            }
            GateUpProj::Fused { gate_up_proj } => {
                let y = gate_up_proj.forward(x)?;
                let inter = gate_up_proj.out_dim() / 2;
                (
                    y.narrow(D::Minus1, 0, inter)?,
                    y.narrow(D::Minus1, inter, inter)?,
                )
            }
        };
        // One vectorised pass instead of the activation then `mul`, with its own backward pass.
        let h = match self.act {
            Activation::Silu => crate::kernels::swiglu(&g, &u)?,
            Activation::GeluTanh => crate::kernels::geglu(&g, &u)?,
        };
        self.down_proj.forward(&h)
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// A norm of the attention output before its residual add (Gemma 3's
    /// `post_attention_layernorm`).
    pub post_attention_norm: Option<RmsNorm>,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    pub pre_mlp_norm: RmsNorm,
    /// A norm of the MLP output before its residual add (Gemma 3's `post_feedforward_layernorm`).
    pub post_mlp_norm: Option<RmsNorm>,
    pub mlp: Mlp,
}

/// A layer's projections, as the loaders read them.
#[derive(Debug)]
pub struct BlockProjections {
    pub qkv: QkvProj,
    pub o_proj: Linear,
    pub gate_up: GateUpProj,
    pub down_proj: Linear,
}

/// A layer's norm scales (Hugging Face values: Gemma's `w`, not `1 + w`), as the loaders read
/// them. The optional ones are required exactly when the config turns them on.
#[derive(Debug)]
pub struct BlockNorms {
    pub input: Tensor,
    pub pre_mlp: Tensor,
    pub q: Option<Tensor>,
    pub k: Option<Tensor>,
    pub post_attention: Option<Tensor>,
    pub post_mlp: Option<Tensor>,
}

/// A decoder layer's parts when it is plain enough for the fused inference ops
/// ([`Llama::decode_layer`], [`Llama::prompt_layer`]): separate q/k/v and gate/up projections,
/// SiLU gating, no per-head or extra norms, norms without an offset.
struct PlainLayer<'a> {
    q_proj: &'a Linear,
    k_proj: &'a Linear,
    v_proj: &'a Linear,
    gate_proj: &'a Linear,
    up_proj: &'a Linear,
    n1: &'a RmsNorm,
    n2: &'a RmsNorm,
}

impl Block {
    /// The layer's parts for the fused inference ops, or `None` when it is not plain
    /// ([`PlainLayer`]).
    fn plain(&self) -> Option<PlainLayer<'_>> {
        let a = &self.self_attn;
        let (
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            },
            GateUpProj::Split { gate_proj, up_proj },
        ) = (&a.qkv, &self.mlp.gate_up)
        else {
            return None;
        };
        let (n1, n2) = (&self.input_layernorm, &self.pre_mlp_norm);
        let plain = self.post_attention_norm.is_none()
            && self.post_mlp_norm.is_none()
            && a.q_norm.is_none()
            && a.k_norm.is_none()
            && self.mlp.act == Activation::Silu
            && n1.offset == 0.0
            && n2.offset == 0.0;
        plain.then_some(PlainLayer {
            q_proj,
            k_proj,
            v_proj,
            gate_proj,
            up_proj,
            n1,
            n2,
        })
    }

    /// Layer `layer` from its norms and projections, with head counts, window and rope from
    /// `cfg` (every loader builds layers this way; `Llama::from_parts` checks the shapes).
    pub fn new(cfg: &Config, layer: usize, norms: BlockNorms, p: BlockProjections) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let offset = if cfg.norm_plus_one { 1.0 } else { 0.0 };
        let norm = |w: Tensor| RmsNorm::with_offset(w, eps, offset);
        let want = |name: &str, t: Option<Tensor>, on: bool| -> Result<Option<RmsNorm>> {
            match (t, on) {
                (Some(t), true) => Ok(Some(norm(t)?)),
                (None, false) => Ok(None),
                (Some(_), false) => Err(Error::InvalidParams(format!(
                    "layer {layer}: a {name} norm the {} architecture does not have",
                    cfg.architecture
                ))),
                (None, true) => Err(Error::InvalidParams(format!(
                    "layer {layer}: the {name} norm is missing"
                ))),
            }
        };
        let rope_index = cfg
            .layer_uses_rope(layer)
            .then(|| usize::from(cfg.rope_local_theta.is_some() && cfg.layer_is_sliding(layer)));
        Ok(Block {
            input_layernorm: norm(norms.input)?,
            self_attn: Attention {
                qkv: p.qkv,
                o_proj: p.o_proj,
                q_norm: want("q", norms.q, cfg.qk_norm)?,
                k_norm: want("k", norms.k, cfg.qk_norm)?,
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim(),
                scale: cfg.attention_scale(),
                window: cfg.layer_window(layer),
                rope: rope_index,
            },
            post_attention_norm: want("post-attention", norms.post_attention, cfg.sandwich_norms)?,
            pre_mlp_norm: norm(norms.pre_mlp)?,
            post_mlp_norm: want("post-feedforward", norms.post_mlp, cfg.sandwich_norms)?,
            mlp: Mlp {
                gate_up: p.gate_up,
                down_proj: p.down_proj,
                act: cfg.hidden_act,
            },
        })
    }

    /// The layer's norms by their Hugging Face names (relative to `model.layers.{i}`).
    pub fn norms(&self) -> Vec<(&'static str, &RmsNorm)> {
        let mut v = vec![("input_layernorm", &self.input_layernorm)];
        match (&self.post_attention_norm, &self.post_mlp_norm) {
            (None, None) => v.push(("post_attention_layernorm", &self.pre_mlp_norm)),
            (pa, pm) => {
                if let Some(n) = pa {
                    v.push(("post_attention_layernorm", n));
                }
                v.push(("pre_feedforward_layernorm", &self.pre_mlp_norm));
                if let Some(n) = pm {
                    v.push(("post_feedforward_layernorm", n));
                }
            }
        }
        if let Some(n) = &self.self_attn.q_norm {
            v.push(("self_attn.q_norm", n));
        }
        if let Some(n) = &self.self_attn.k_norm {
            v.push(("self_attn.k_norm", n));
        }
        v
    }

    /// [`Self::norms`], mutable.
    pub fn norms_mut(&mut self) -> Vec<(&'static str, &mut RmsNorm)> {
        let sandwich = self.post_attention_norm.is_some() || self.post_mlp_norm.is_some();
        let mut v = vec![("input_layernorm", &mut self.input_layernorm)];
        if sandwich {
            if let Some(n) = &mut self.post_attention_norm {
                v.push(("post_attention_layernorm", n));
            }
            v.push(("pre_feedforward_layernorm", &mut self.pre_mlp_norm));
            if let Some(n) = &mut self.post_mlp_norm {
                v.push(("post_feedforward_layernorm", n));
            }
        } else {
            v.push(("post_attention_layernorm", &mut self.pre_mlp_norm));
        }
        if let Some(n) = &mut self.self_attn.q_norm {
            v.push(("self_attn.q_norm", n));
        }
        if let Some(n) = &mut self.self_attn.k_norm {
            v.push(("self_attn.k_norm", n));
        }
        v
    }

    /// The layer's projections by their Hugging Face names (relative to `model.layers.{i}`).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let a = self.self_attn.projections().into_iter();
        let m = self.mlp.projections().into_iter();
        a.map(|(n, l)| (format!("self_attn.{n}"), l))
            .chain(m.map(|(n, l)| (format!("mlp.{n}"), l)))
            .collect()
    }

    /// [`Self::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let a = self.self_attn.projections_mut().into_iter();
        let m = self.mlp.projections_mut().into_iter();
        a.map(|(n, l)| (format!("self_attn.{n}"), l))
            .chain(m.map(|(n, l)| (format!("mlp.{n}"), l)))
            .collect()
    }
}

/// Which layers training runs as one fused op ([`crate::kernels::block::fused_layer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFusion {
    /// None: every norm, projection and attention is its own graph node.
    Off,
    /// Layers with nothing trained in them (the default: nothing is lost, as their only
    /// gradient is their input's).
    Frozen,
    /// Every layer whose projections are dense and whose LoRA branches have no dropout. The
    /// gradients of trained tensors inside them then come from [`crate::kernels::block::backward`],
    /// not `Tensor::backward`; the trainer asks for this.
    All,
}

impl Block {
    /// This layer's parameters for [`crate::kernels::block::fused_layer`], when every projection
    /// is a dense product (LoRA branches without dropout) and, unless `trained` allows them,
    /// nothing in the layer is trained.
    fn fusable(&self, trained: bool) -> Option<crate::kernels::block::LayerParts<'_>> {
        use crate::kernels::block::{LayerParts, Norm, Proj, Stacked};
        fn proj(l: &Linear) -> Option<Proj<'_>> {
            let w = l.fused_weight()?;
            let lora = match l.lora() {
                None => None,
                Some(b) if b.dropout == 0.0 || b.dropout_seed.is_none() => {
                    Some((&b.a, &b.b, b.scale as f32))
                }
                Some(_) => return None,
            };
            Some(Proj { w, lora })
        }
        fn norm(n: &RmsNorm) -> Norm<'_> {
            Norm {
                w: &n.weight,
                eps: n.eps as f32,
                offset: n.offset,
            }
        }
        let a = &self.self_attn;
        let qkv = match &a.qkv {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => Stacked::Split([proj(q_proj)?, proj(k_proj)?, proj(v_proj)?]),
            QkvProj::Fused { qkv_proj } => Stacked::Fused(proj(qkv_proj)?),
        };
        let gate_up = match &self.mlp.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => {
                Stacked::Split([proj(gate_proj)?, proj(up_proj)?])
            }
            GateUpProj::Fused { gate_up_proj } => Stacked::Fused(proj(gate_up_proj)?),
        };
        let parts = LayerParts {
            input_norm: norm(&self.input_layernorm),
            qkv,
            q_norm: a.q_norm.as_ref().map(norm),
            k_norm: a.k_norm.as_ref().map(norm),
            o: proj(&a.o_proj)?,
            post_attn_norm: self.post_attention_norm.as_ref().map(norm),
            pre_mlp_norm: norm(&self.pre_mlp_norm),
            gate_up,
            down: proj(&self.mlp.down_proj)?,
            post_mlp_norm: self.post_mlp_norm.as_ref().map(norm),
            act: match self.mlp.act {
                Activation::Silu => crate::kernels::GateAct::Silu,
                Activation::GeluTanh => crate::kernels::GateAct::GeluTanh,
            },
            heads: a.num_heads,
            kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            scale: a.scale as f32,
            window: a.window,
        };
        (trained || parts.first_trained().is_none()).then_some(parts)
    }

    fn is_trainable(&self) -> bool {
        self.norms().iter().any(|(_, n)| n.weight.track_op())
            || self.linears().iter().any(|(_, l)| l.is_trainable())
    }
}

/// All weights of a model, as the loaders build them.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    pub embed_tokens: Embedding,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
}

/// Key/value cache of one layer: `[batch, kv_heads, capacity, head_dim]`, first `len` valid.
#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Key/value cache for incremental decoding. Preallocated and grown by doubling; new keys are
/// written in place. `Clone` makes a deep copy (the storage is written in place, so sharing it
/// between two caches would corrupt both).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
    initial_capacity: usize,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().and_then(|c| {
                    // A failed copy (out of memory) leaves that layer empty; `len` then
                    // disagrees and the next forward reports it instead of computing garbage.
                    match (c.k.copy(), c.v.copy()) {
                        (Ok(k), Ok(v)) => Some(LayerCache { k, v }),
                        _ => None,
                    }
                })
            })
            .collect();
        Self {
            layers,
            len: self.len,
            initial_capacity: self.initial_capacity,
        }
    }
}

impl KvCache {
    fn new(num_layers: usize, initial_capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            initial_capacity: initial_capacity.max(1),
        }
    }

    /// Number of positions (tokens and virtual tokens) already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything (keeps the allocation for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops positions from `len` on (e.g. to rewind to a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends `k`, `v` `[batch, kv_heads, seq, head_dim]` of layer `idx` at position `self.len`
    /// and returns the keys/values of all positions so far.
    fn append(&mut self, idx: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, l, d) = k.dims4()?;
        let old = self.len;
        let total = old + l;
        let slot = self
            .layers
            .get_mut(idx)
            .ok_or_else(|| Error::InvalidParams(format!("cache has no layer {idx}")))?;
        if old > 0 {
            match slot {
                Some(c) if c.k.dims4()?.0 == b && c.k.dims4()?.1 == h => {}
                Some(c) => {
                    return Err(Error::InvalidParams(format!(
                        "cache holds batch {} but the input has batch {b}",
                        c.k.dim(0)?
                    )))
                }
                None => {
                    return Err(Error::InvalidParams(
                        "cache lost its contents (a copy failed); clear it".into(),
                    ))
                }
            }
        }
        if k.track_op() || v.track_op() {
            // Training through a cache: concatenate so gradients flow.
            let (k_all, v_all) = match (old, slot.as_ref()) {
                (0, _) | (_, None) => (k.clone(), v.clone()),
                (_, Some(c)) => (
                    Tensor::cat(&[&c.k.narrow(2, 0, old)?, k], 2)?,
                    Tensor::cat(&[&c.v.narrow(2, 0, old)?, v], 2)?,
                ),
            };
            *slot = Some(LayerCache {
                k: k_all.clone(),
                v: v_all.clone(),
            });
            return Ok((k_all, v_all));
        }
        let needs_new = match slot.as_ref() {
            None => true,
            Some(c) => {
                let (cb, ch, cap, cd) = c.k.dims4()?;
                cb != b || ch != h || cd != d || cap < total || c.k.track_op()
            }
        };
        if needs_new {
            let mut cap = self.initial_capacity.max(1);
            while cap < total {
                cap *= 2;
            }
            let nk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
            if old > 0 {
                if let Some(c) = slot.as_ref() {
                    nk.slice_set(&c.k.narrow(2, 0, old)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&c.v.narrow(2, 0, old)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some(LayerCache { k: nk, v: nv });
        }
        let c = slot
            .as_ref()
            .ok_or_else(|| Error::InvalidParams("cache slot missing".into()))?;
        c.k.slice_set(&k.contiguous()?, 2, old)?;
        c.v.slice_set(&v.contiguous()?, 2, old)?;
        Ok((c.k.narrow(2, 0, total)?, c.v.narrow(2, 0, total)?))
    }
}

/// The rotary frequencies of one kind of layer (the model has one, or two for Gemma 3's global
/// and sliding-window layers).
#[derive(Debug, Clone)]
struct RopeFreqs {
    inv_freq: Vec<f32>,
    /// LongRoPE's long frequencies and the length past which they replace `inv_freq`.
    long: Option<(Vec<f32>, usize)>,
    /// cos and sin are multiplied by this (LongRoPE's attention factor; else 1).
    attention_factor: f32,
}

impl RopeFreqs {
    /// Frequencies for rotary dimension `rd`, base `theta` and `scaling` (transformers' float32
    /// formulas).
    fn new(rd: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        let base = theta as f32;
        let mut inv: Vec<f32> = (0..rd / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / rd as f32))
            .collect();
        let divided = |inv: &[f32], f: &[f64]| -> Vec<f32> {
            inv.iter().zip(f).map(|(&x, &d)| x / d as f32).collect()
        };
        let mut long = None;
        let mut attention_factor = 1.0;
        match scaling {
            None => {}
            Some(RopeScaling::Llama3(s)) => {
                let old = s.original_max_position_embeddings as f32;
                let low_wl = old / s.low_freq_factor as f32;
                let high_wl = old / s.high_freq_factor as f32;
                let factor = s.factor as f32;
                for f in inv.iter_mut() {
                    let wl = 2.0 * std::f32::consts::PI / *f;
                    if wl < high_wl {
                        continue;
                    }
                    if wl > low_wl {
                        *f /= factor;
                    } else {
                        let smooth = (old / wl - s.low_freq_factor as f32)
                            / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            Some(RopeScaling::Linear { factor }) => {
                for f in inv.iter_mut() {
                    *f /= *factor as f32;
                }
            }
            Some(RopeScaling::Factors { factors }) => inv = divided(&inv, factors),
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor: af,
            }) => {
                long = Some((
                    divided(&inv, long_factor),
                    *original_max_position_embeddings,
                ));
                inv = divided(&inv, short_factor);
                attention_factor = *af as f32;
            }
        }
        RopeFreqs {
            inv_freq: inv,
            long,
            attention_factor,
        }
    }

    /// cos/sin `[seq, rd / 2]` for positions `offset..offset + seq`. LongRoPE takes its long
    /// frequencies when the sequence reaches past the original context (as transformers decides
    /// per forward pass).
    fn tables(&self, offset: usize, seq: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let inv = match &self.long {
            Some((long, orig)) if offset + seq > *orig => long,
            _ => &self.inv_freq,
        };
        let half = inv.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        let af = self.attention_factor;
        for t in offset..offset + seq {
            for &f in inv {
                let a = (t as f32 * f) as f64;
                cos.push(a.cos() as f32 * af);
                sin.push(a.sin() as f32 * af);
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, half), device)?,
            Tensor::from_vec(sin, (seq, half), device)?,
        ))
    }
}

/// The rope frequencies of a config: `[global]`, or `[global, local]` when sliding-window layers
/// have their own base (Gemma 3; those take no scaling).
fn rope_freqs(cfg: &Config) -> Vec<RopeFreqs> {
    let rd = cfg.rotary_dim();
    let mut v = vec![RopeFreqs::new(
        rd,
        cfg.rope_theta,
        cfg.rope_scaling.as_ref(),
    )];
    if let Some(local) = cfg.rope_local_theta {
        v.push(RopeFreqs::new(rd, local, None));
    }
    v
}

/// A decoder. `Send + Sync`: share it behind an `Arc`; each sequence keeps its own [`KvCache`].
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: Config,
    device: Device,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    ropes: Vec<RopeFreqs>,
    force_differentiable: bool,
    /// Which layers training runs as one op.
    layer_fusion: LayerFusion,
    /// Per layer: q/k/v and gate/up fused for the decode kernel (see [`FusedDecode`]).
    fused: Vec<(Option<FusedDecode>, Option<FusedDecode>)>,
    /// Run the portable path on the CPU too (see [`Llama::set_portable`]).
    portable: bool,
    /// Decode plain layers in the fused ops (see [`Llama::set_decode_fusion`]).
    decode_fusion: bool,
}

/// `ATTUNE_DECODE_FUSION=off`: models start with the fused decode layer off (A/B runs; read
/// once).
fn decode_fusion_by_default() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ATTUNE_DECODE_FUSION").map_or(true, |v| v != "off"))
}

/// `ATTUNE_PORTABLE=1`: CPU models start on the portable path (read once).
fn portable_by_default() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ATTUNE_PORTABLE").is_ok_and(|v| v == "1"))
}

/// Initial KV-cache capacity in positions (grown by doubling).
const KV_INITIAL_CAPACITY: usize = 256;

impl Llama {
    /// Assembles a model from loaded weights, checking every shape against `cfg`.
    pub fn from_parts(cfg: Config, device: Device, w: LlamaWeights) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let nh = cfg.num_attention_heads;
        let nkv = cfg.num_key_value_heads;
        let inter = cfg.intermediate_size;
        let shape_err =
            |what: String| Error::InvalidParams(format!("weight shape mismatch: {what}"));
        if w.embed_tokens.hidden_size != h || w.embed_tokens.vocab_size != cfg.vocab_size {
            return Err(shape_err(format!(
                "embed_tokens is [{}, {}], config says [{}, {h}]",
                w.embed_tokens.vocab_size, w.embed_tokens.hidden_size, cfg.vocab_size
            )));
        }
        if w.layers.len() != cfg.num_hidden_layers {
            return Err(shape_err(format!(
                "{} layers, config says {}",
                w.layers.len(),
                cfg.num_hidden_layers
            )));
        }
        let check = |name: String, l: &Linear, out: usize, inp: usize| -> Result<()> {
            if l.out_dim() != out || l.in_dim() != inp {
                return Err(shape_err(format!(
                    "{name} is [{}, {}], expected [{out}, {inp}]",
                    l.out_dim(),
                    l.in_dim()
                )));
            }
            Ok(())
        };
        for (i, b) in w.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, l) in b.linears() {
                let (out, inp) = match name.rsplit('.').next().unwrap_or("") {
                    "q_proj" => (nh * hd, h),
                    "k_proj" | "v_proj" => (nkv * hd, h),
                    "qkv_proj" => (nh * hd + 2 * nkv * hd, h),
                    "o_proj" => (h, nh * hd),
                    "gate_proj" | "up_proj" => (inter, h),
                    "gate_up_proj" => (2 * inter, h),
                    _ => (h, inter),
                };
                check(format!("{p}.{name}"), l, out, inp)?;
            }
            for (n, norm) in b.norms() {
                let want = if n.starts_with("self_attn.") { hd } else { h };
                if norm.weight.dims1()? != want {
                    return Err(shape_err(format!(
                        "{p}.{n} has {:?}, expected [{want}]",
                        norm.weight.dims()
                    )));
                }
            }
            let a = &b.self_attn;
            if a.num_heads != nh || a.num_kv_heads != nkv || a.head_dim != hd {
                return Err(shape_err(format!("{p}.self_attn head counts")));
            }
        }
        check("lm_head".into(), &w.lm_head, cfg.vocab_size, h)?;
        let ropes = rope_freqs(&cfg);
        let fused = w
            .layers
            .iter()
            .map(|b| {
                let qkv = match &b.self_attn.qkv {
                    QkvProj::Split {
                        q_proj,
                        k_proj,
                        v_proj,
                    } => FusedDecode::new(&[q_proj, k_proj, v_proj]),
                    QkvProj::Fused { .. } => None,
                };
                let gu = match &b.mlp.gate_up {
                    GateUpProj::Split { gate_proj, up_proj } => {
                        FusedDecode::new(&[gate_proj, up_proj])
                    }
                    GateUpProj::Fused { .. } => None,
                };
                (qkv, gu)
            })
            .collect();
        Ok(Self {
            cfg,
            device,
            embed_tokens: w.embed_tokens,
            layers: w.layers,
            norm: w.norm,
            lm_head: w.lm_head,
            ropes,
            force_differentiable: false,
            layer_fusion: LayerFusion::Frozen,
            fused,
            portable: portable_by_default(),
            decode_fusion: decode_fusion_by_default(),
        })
    }

    /// Whether the model runs the portable path (candle's ops, [`portable`]): always off the
    /// CPU, and on the CPU when [`Llama::set_portable`] asked.
    pub fn is_portable(&self) -> bool {
        self.portable || !self.device.is_cpu()
    }

    /// Runs the CPU model on the portable path (`true`) or on Attune's fused CPU kernels
    /// (`false`, the default unless `ATTUNE_PORTABLE=1`). A model on another device always runs
    /// the portable path.
    pub fn set_portable(&mut self, on: bool) {
        self.portable = on;
    }

    /// The model on `device` for the portable path ([`Llama::dense_on`]); on its own device the
    /// model is returned as it is (a cheap clone: tensors are shared). Call it before
    /// [`crate::train::prepare`]: variables made before the move would not follow it.
    pub fn to_device(&self, device: &Device) -> Result<Llama> {
        if device.same_device(&self.device) {
            return Ok(self.clone());
        }
        self.dense_on(device)
    }

    /// A copy on `device` (its own device included) with every weight dense f32 there:
    /// quantized weights dequantized, the CPU's packed bf16 and decode-kernel copies dropped,
    /// LoRA branches moved along, every projection in [`ComputeMode::F32`]. What
    /// [`Llama::to_device`] builds for a GPU; on the CPU, the same conversion the tests check.
    pub fn dense_on(&self, device: &Device) -> Result<Llama> {
        let mv = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?) };
        let norm = |n: &RmsNorm| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: mv(&n.weight)?,
                ..n.clone()
            })
        };
        let opt_norm =
            |n: &Option<RmsNorm>| -> Result<Option<RmsNorm>> { n.as_ref().map(norm).transpose() };
        let mut layers = Vec::with_capacity(self.layers.len());
        for b in &self.layers {
            let a = &b.self_attn;
            let qkv = match &a.qkv {
                QkvProj::Split {
                    q_proj,
                    k_proj,
                    v_proj,
                } => QkvProj::Split {
                    q_proj: q_proj.to_device(device)?,
                    k_proj: k_proj.to_device(device)?,
                    v_proj: v_proj.to_device(device)?,
                },
                QkvProj::Fused { qkv_proj } => QkvProj::Fused {
                    qkv_proj: qkv_proj.to_device(device)?,
                },
            };
            let gate_up = match &b.mlp.gate_up {
                GateUpProj::Split { gate_proj, up_proj } => GateUpProj::Split {
                    gate_proj: gate_proj.to_device(device)?,
                    up_proj: up_proj.to_device(device)?,
                },
                GateUpProj::Fused { gate_up_proj } => GateUpProj::Fused {
                    gate_up_proj: gate_up_proj.to_device(device)?,
                },
            };
            layers.push(Block {
                input_layernorm: norm(&b.input_layernorm)?,
                self_attn: Attention {
                    qkv,
                    o_proj: a.o_proj.to_device(device)?,
                    q_norm: opt_norm(&a.q_norm)?,
                    k_norm: opt_norm(&a.k_norm)?,
                    ..a.clone()
                },
                post_attention_norm: opt_norm(&b.post_attention_norm)?,
                pre_mlp_norm: norm(&b.pre_mlp_norm)?,
                post_mlp_norm: opt_norm(&b.post_mlp_norm)?,
                mlp: Mlp {
                    gate_up,
                    down_proj: b.mlp.down_proj.to_device(device)?,
                    act: b.mlp.act,
                },
            });
        }
        let embed_tokens = Embedding {
            weight: Some(mv(&self.embed_tokens.weight_f32()?)?),
            qweight: None,
            ..self.embed_tokens.clone()
        };
        Ok(Llama {
            cfg: self.cfg.clone(),
            device: device.clone(),
            embed_tokens,
            fused: layers.iter().map(|_| (None, None)).collect(),
            layers,
            norm: norm(&self.norm)?,
            lm_head: self.lm_head.to_device(device)?,
            ropes: self.ropes.clone(),
            force_differentiable: self.force_differentiable,
            layer_fusion: self.layer_fusion,
            portable: self.portable,
            decode_fusion: self.decode_fusion,
        })
    }

    /// The lm_head on `h` `[..., hidden]`, on the model's path.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        if self.is_portable() {
            self.lm_head.forward_portable(h)
        } else {
            self.lm_head.forward(h)
        }
    }

    /// A randomly initialised model (normal(0, 0.02) weights, unit norms: `w = 1`, or `w = 0`
    /// for `(1 + w)` norms) for tests and experiments; deterministic for a given `seed`.
    pub fn new_random(cfg: &Config, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate(std::path::Path::new("<random config>"))?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut rand_t = |dims: &[usize]| -> Result<Tensor> {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    // Box-Muller normal sample, std 0.02.
                    let u1: f32 = rng.random::<f32>().max(1e-7);
                    let u2: f32 = rng.random::<f32>();
                    0.02 * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect();
            Ok(Tensor::from_vec(v, dims, device)?)
        };
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let nh = cfg.num_attention_heads;
        let nkv = cfg.num_key_value_heads;
        let inter = cfg.intermediate_size;
        let fused = cfg.family().is_some_and(|f| f.fused_projections());
        let unit = |n: usize| -> Result<Tensor> {
            Ok(if cfg.norm_plus_one {
                Tensor::zeros(n, DType::F32, device)?
            } else {
                Tensor::ones(n, DType::F32, device)?
            })
        };
        let embed = rand_t(&[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let bias = |n: usize,
                        r: &mut dyn FnMut(&[usize]) -> Result<Tensor>|
             -> Result<Option<Tensor>> {
                if cfg.attention_bias {
                    Ok(Some(r(&[n])?))
                } else {
                    Ok(None)
                }
            };
            let qkv = if fused {
                QkvProj::Fused {
                    qkv_proj: Linear::from_weights(rand_t(&[nh * hd + 2 * nkv * hd, h])?, None)?,
                }
            } else {
                let qb = bias(nh * hd, &mut rand_t)?;
                let kb = bias(nkv * hd, &mut rand_t)?;
                let vb = bias(nkv * hd, &mut rand_t)?;
                QkvProj::Split {
                    q_proj: Linear::from_weights(rand_t(&[nh * hd, h])?, qb)?,
                    k_proj: Linear::from_weights(rand_t(&[nkv * hd, h])?, kb)?,
                    v_proj: Linear::from_weights(rand_t(&[nkv * hd, h])?, vb)?,
                }
            };
            let o_proj = Linear::from_weights(rand_t(&[h, nh * hd])?, None)?;
            let gate_up = if fused {
                GateUpProj::Fused {
                    gate_up_proj: Linear::from_weights(rand_t(&[2 * inter, h])?, None)?,
                }
            } else {
                GateUpProj::Split {
                    gate_proj: Linear::from_weights(rand_t(&[inter, h])?, None)?,
                    up_proj: Linear::from_weights(rand_t(&[inter, h])?, None)?,
                }
            };
            let projections = BlockProjections {
                qkv,
                o_proj,
                gate_up,
                down_proj: Linear::from_weights(rand_t(&[h, inter])?, None)?,
            };
            let opt = |on: bool, n: usize| -> Result<Option<Tensor>> {
                if on {
                    Ok(Some(unit(n)?))
                } else {
                    Ok(None)
                }
            };
            let norms = BlockNorms {
                input: unit(h)?,
                pre_mlp: unit(h)?,
                q: opt(cfg.qk_norm, hd)?,
                k: opt(cfg.qk_norm, hd)?,
                post_attention: opt(cfg.sandwich_norms, h)?,
                post_mlp: opt(cfg.sandwich_norms, h)?,
            };
            layers.push(Block::new(cfg, i, norms, projections)?);
        }
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weights(embed.clone(), None)?
        } else {
            Linear::from_weights(rand_t(&[cfg.vocab_size, h])?, None)?
        };
        let weights = LlamaWeights {
            embed_tokens: Embedding::from_weight(embed)?.scaled(embedding_scale(cfg)),
            layers,
            norm: RmsNorm::with_offset(
                unit(h)?,
                cfg.rms_norm_eps,
                if cfg.norm_plus_one { 1.0 } else { 0.0 },
            )?,
            lm_head,
        };
        Self::from_parts(cfg.clone(), device.clone(), weights)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), KV_INITIAL_CAPACITY)
    }

    pub fn embed_tokens(&self) -> &Embedding {
        &self.embed_tokens
    }
    pub fn layers(&self) -> &[Block] {
        &self.layers
    }
    pub fn layers_mut(&mut self) -> &mut [Block] {
        &mut self.layers
    }
    pub fn norm(&self) -> &RmsNorm {
        &self.norm
    }
    pub fn norm_mut(&mut self) -> &mut RmsNorm {
        &mut self.norm
    }
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }
    /// Replaces the token embedding table (e.g. with a `Var`'s tensor for full fine-tuning); the
    /// quantized table, if any, is dropped.
    pub fn set_embedding_weight(&mut self, weight: Tensor) -> Result<()> {
        let dims = weight.dims2()?;
        if dims != (self.embed_tokens.vocab_size, self.embed_tokens.hidden_size) {
            return Err(Error::InvalidParams(format!(
                "embedding shape {dims:?} does not match [{}, {}]",
                self.embed_tokens.vocab_size, self.embed_tokens.hidden_size
            )));
        }
        self.embed_tokens.weight = Some(weight);
        self.embed_tokens.qweight = None;
        Ok(())
    }

    pub fn lm_head_mut(&mut self) -> &mut Linear {
        &mut self.lm_head
    }

    /// Every adaptable projection with its Hugging Face module name
    /// (`model.layers.{i}.self_attn.q_proj`, ..., `model.layers.{i}.mlp.down_proj`; Phi-3's
    /// `self_attn.qkv_proj` and `mlp.gate_up_proj`); PEFT's LoRA keys are
    /// `base_model.model.{name}.lora_{A,B}.weight`.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, b) in self.layers.iter_mut().enumerate() {
            for (n, l) in b.linears_mut() {
                out.push((format!("model.layers.{i}.{n}"), l));
            }
        }
        out
    }

    /// Read-only view of [`Self::linears_mut`].
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, b) in self.layers.iter().enumerate() {
            for (n, l) in b.linears() {
                out.push((format!("model.layers.{i}.{n}"), l));
            }
        }
        out
    }

    /// The projections LoRA can target (short Hugging Face names).
    pub fn lora_targets(&self) -> &'static [&'static str] {
        self.cfg.lora_targets()
    }

    /// Detaches every LoRA branch.
    pub fn clear_lora(&mut self) {
        for (_, l) in self.linears_mut() {
            l.detach_lora();
        }
    }

    /// Switches every layer's compute mode (see [`ComputeMode`]).
    pub fn set_compute_mode(&mut self, mode: ComputeMode) -> Result<()> {
        for (_, l) in self.linears_mut() {
            l.set_mode(mode)?;
            // `Auto` keeps the projections in bf16 for the matrix units where the CPU has them.
            l.pack_bf16(true)?;
        }
        self.lm_head.set_mode(mode)?;
        // The head keeps its f32 weight too: a tied head shares it with the embedding anyway.
        self.lm_head.pack_bf16(false)?;
        Ok(())
    }

    /// Keeps every projection in `Auto` mode with i8 copies in both orientations for training on
    /// the frozen base without AMX ([`Linear::pack_int8`]); the head stays as it is. Returns
    /// whether any projection took them.
    pub fn pack_int8(&mut self) -> Result<bool> {
        let mut any = false;
        for (_, l) in self.linears_mut() {
            l.set_mode(ComputeMode::Auto)?;
            any |= l.pack_int8()?;
        }
        Ok(any)
    }

    /// Holds the frozen base in `form` (see [`BaseForm`]): every projection and the LM head
    /// (through [`Linear::set_base_form`]), and for either compact form the embedding table
    /// too: its GGUF blocks only (rows are expanded as they are looked up), or bf16 values where
    /// it has none. Going back to `F32` restores dense copies. LoRA and prompt tuning train on any
    /// form; full fine-tuning replaces the weights with f32 variables whatever the form.
    pub fn set_base_form(&mut self, form: BaseForm) -> Result<()> {
        for (_, l) in self.linears_mut() {
            l.set_base_form(form)?;
        }
        self.lm_head.set_base_form(form)?;
        if form == BaseForm::F32 && self.lm_head.mode() == ComputeMode::AutoF32 {
            self.lm_head.set_mode(ComputeMode::Auto)?;
        } else if form != BaseForm::F32 {
            // The dense model multiplies its head in f32 outside training (the bf16 packing is
            // made for training only): so does the compact one (training runs the head's loss
            // on the matrix units either way, `kernels::lm_head_nll_frozen`).
            self.lm_head.set_mode(ComputeMode::AutoF32)?;
        }
        let e = &mut self.embed_tokens;
        if e.weight.as_ref().is_some_and(|w| w.track_op()) || !self.device.is_cpu() {
            return Ok(());
        }
        match form {
            BaseForm::F32 => {
                if e.weight.is_none() || e.weight.as_ref().is_some_and(|w| w.dtype() != DType::F32)
                {
                    e.weight = Some(e.weight_f32()?);
                }
            }
            // The table's blocks give exact rows (rounding the table to bf16 moved a decode
            // step's logits by up to 0.8 on the default model: the residual stream carries the
            // embedding unnormalized); a table without blocks (a Hugging Face folder, most often
            // stored in bf16 already) is kept in bf16.
            BaseForm::Quantized | BaseForm::Bf16 if e.qweight.is_some() => e.weight = None,
            BaseForm::Quantized | BaseForm::Bf16 => {
                let w = e.weight_f32()?.to_dtype(DType::BF16)?;
                e.weight = Some(w);
                e.qweight = None;
            }
        }
        if form != BaseForm::F32 {
            // The dropped copies would otherwise stay resident under the allocator's trim
            // threshold (`tune_allocator`).
            crate::release_free_memory();
        }
        Ok(())
    }

    /// How the frozen base is held (the LM head's form, which [`Self::set_base_form`] sets with
    /// the projections').
    pub fn base_form(&self) -> BaseForm {
        self.lm_head.base_form()
    }

    /// Bytes the model's weights hold in memory: every projection's and the head's forms, the
    /// embedding table's, and the norms.
    pub fn held_bytes(&self) -> usize {
        let e = &self.embed_tokens;
        // A tied head built from the table shares its f32 tensor.
        let shared = self.cfg.tie_word_embeddings
            && e.weight.as_ref().is_some_and(|w| w.dtype() == DType::F32)
            && self.lm_head.weight().is_some();
        let head = if shared {
            self.lm_head.held_bytes() - self.lm_head.weight().map_or(0, |w| w.elem_count() * 4)
        } else {
            self.lm_head.held_bytes()
        };
        self.linears()
            .iter()
            .map(|(_, l)| l.held_bytes())
            .sum::<usize>()
            + head
            + e.weight
                .as_ref()
                .map_or(0, |w| w.elem_count() * w.dtype().size_in_bytes())
            + e.qweight.as_ref().map_or(0, |q| q.storage_size_in_bytes())
    }

    /// The compute mode the model was set to (its lm_head's, which every call sets).
    pub fn compute_mode(&self) -> ComputeMode {
        self.lm_head.mode()
    }

    /// Always use the differentiable (basic-op) kernels, even without tracked variables.
    pub fn set_force_differentiable(&mut self, on: bool) {
        self.force_differentiable = on;
    }

    /// Which layers training runs as one fused op (see [`LayerFusion`]).
    pub fn set_layer_fusion(&mut self, fusion: LayerFusion) {
        self.layer_fusion = fusion;
    }

    /// Whether one-token steps through a KV cache run plain layers in two fused ops
    /// ([`crate::kernels::decode::layer_qkv`] and [`crate::kernels::decode::layer_mlp`]) instead
    /// of op by op; on by default. Both compute the same values; the switch is for comparisons.
    pub fn set_decode_fusion(&mut self, on: bool) {
        self.decode_fusion = on;
    }

    fn is_trainable(&self) -> bool {
        self.embed_tokens
            .weight
            .as_ref()
            .is_some_and(|w| w.track_op())
            || self.norm.weight.track_op()
            || self.lm_head.is_trainable()
            || self.layers.iter().any(|b| b.is_trainable())
    }

    /// Whether a forward of `seq` positions after `cached` ones in the KV cache must start over
    /// from an empty cache: LongRoPE rotates with its long factors once a sequence runs past the
    /// original context, and the keys cached before were rotated with the short ones
    /// (transformers regenerates Phi-3's cache at that point; Attune's generation does too).
    pub fn needs_recompute(&self, cached: usize, seq: usize) -> bool {
        self.ropes.iter().any(|r| {
            r.long
                .as_ref()
                .is_some_and(|(_, orig)| cached > 0 && cached <= *orig && cached + seq > *orig)
        })
    }

    /// ids `[batch, seq]` u32; positions start at `cache.len()`; returns f32 logits
    /// `[batch, vocab]` of the last position only.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.hidden_states(None, ids, Some(cache))?;
        let l = h.dim(1)?;
        let last = h.narrow(1, l - 1, 1)?;
        let logits = self.head(&last)?;
        Ok(logits.squeeze(1)?)
    }

    /// [`Llama::forward_last`] with a soft prompt `prefix` `[batch or 1, n_virtual, hidden]`
    /// before the tokens (the first call of a generation; later tokens go through
    /// `forward_last`, the prefix being in the cache).
    pub fn forward_last_with_prefix(
        &self,
        prefix: &Tensor,
        ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h = self.hidden_states(Some(prefix), ids, Some(cache))?;
        let l = h.dim(1)?;
        let last = h.narrow(1, l - 1, 1)?;
        Ok(self.head(&last)?.squeeze(1)?)
    }

    /// Logits for every position `[batch, seq, vocab]`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_with_prefix(None, ids, cache)
    }

    /// Soft prompts: `prefix` `[batch or 1, n_virtual, hidden]` is prepended before the token
    /// embeddings (after Gemma's embedding scale, as PEFT prepends them); returns logits for all
    /// positions including the prefix `[batch, n_virtual + seq, vocab]`.
    pub fn forward_with_prefix(
        &self,
        prefix: Option<&Tensor>,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.hidden_states(prefix, ids, cache)?;
        self.head(&h)
    }

    /// Final-norm hidden states `[batch, n_virtual + seq, hidden]` (before the lm_head), so a
    /// trainer can apply the head to the positions it scores only.
    pub fn hidden_states(
        &self,
        prefix: Option<&Tensor>,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2().map_err(|_| {
            Error::InvalidParams(format!(
                "token ids must be [batch, seq], got {:?}",
                ids.dims()
            ))
        })?;
        if ids.dtype() != DType::U32 {
            return Err(Error::InvalidParams(format!(
                "token ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        let mut x = if l > 0 {
            Some(self.embed_tokens.forward(ids)?)
        } else {
            None
        };
        let differentiable = self.force_differentiable
            || prefix.is_some_and(|p| p.track_op())
            || self.is_trainable();
        if let Some(p) = prefix {
            let (pb, _pn, ph) = p.dims3().map_err(|_| {
                Error::InvalidParams(format!(
                    "prefix must be [batch or 1, n_virtual, hidden], got {:?}",
                    p.dims()
                ))
            })?;
            if ph != self.cfg.hidden_size || (pb != b && pb != 1) {
                return Err(Error::InvalidParams(format!(
                    "prefix {:?} does not fit batch {b} and hidden {}",
                    p.dims(),
                    self.cfg.hidden_size
                )));
            }
            // Onto the model's device (a no-op keeping a variable tracked when it is there).
            let p = p.to_dtype(DType::F32)?.to_device(&self.device)?;
            let p = if pb == 1 && b != 1 {
                p.broadcast_as((b, p.dim(1)?, ph))?.contiguous()?
            } else {
                p
            };
            x = Some(match x {
                Some(t) => Tensor::cat(&[&p, &t], 1)?,
                None => p,
            });
        }
        let Some(mut x) = x else {
            return Err(Error::InvalidParams(
                "no tokens and no prefix to run".into(),
            ));
        };
        let seq = x.dim(1)?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + seq > self.cfg.max_position_embeddings {
            return Err(Error::InvalidParams(format!(
                "sequence of {} positions exceeds the model's context of {}",
                offset + seq,
                self.cfg.max_position_embeddings
            )));
        }
        let tables = self
            .ropes
            .iter()
            .map(|r| r.tables(offset, seq, &self.device))
            .collect::<Result<Vec<_>>>()?;
        if self.is_portable() {
            let out = self.layers_portable(x, &tables, cache.as_deref_mut(), offset)?;
            if let Some(c) = cache {
                c.len = offset + seq;
            }
            return Ok(out);
        }
        for (i, block) in self.layers.iter().enumerate() {
            let rope = match block.self_attn.rope {
                Some(r) => Some(tables.get(r).ok_or_else(|| {
                    Error::InvalidParams(format!("layer {i} names rope table {r}"))
                })?),
                None => None,
            };
            let rope = rope.map(|(c, s)| (c, s));
            if differentiable && cache.is_none() && self.layer_fusion != LayerFusion::Off {
                let parts = block.fusable(self.layer_fusion == LayerFusion::All);
                if let Some(parts) = parts {
                    if x.track_op() || parts.first_trained().is_some() {
                        x = crate::kernels::block::fused_layer(&x, parts, rope)?;
                        continue;
                    }
                }
            }
            // Only the differentiable path through a cache takes a mask; the others are causal
            // by construction.
            let mask = if seq > 1 && differentiable && cache.is_some() {
                Some(causal_mask(
                    seq,
                    offset,
                    block.self_attn.window,
                    &self.device,
                )?)
            } else {
                None
            };
            if self.decode_fusion && !differentiable && seq > crate::linear::AUTO_QUANTIZED_MAX_ROWS
            {
                if let Some(y) = self.prompt_layer(i, block, &x, rope, cache.as_deref_mut())? {
                    x = y;
                    continue;
                }
            }
            if self.decode_fusion && !differentiable && seq == 1 {
                if let Some(c) = cache.as_deref_mut() {
                    if let Some(y) = self.decode_layer(i, block, &x, rope, c)? {
                        x = y;
                        continue;
                    }
                }
            }
            let residual = &x;
            let hn = block.input_layernorm.forward(&x, differentiable)?;
            let mut a = self.attention(
                &block.self_attn,
                self.fused.get(i).and_then(|f| f.0.as_ref()),
                &hn,
                rope,
                mask.as_ref(),
                cache.as_deref_mut().map(|c| (c, i)),
                differentiable,
            )?;
            if let Some(n) = &block.post_attention_norm {
                a = n.forward(&a, differentiable)?;
            }
            let x1 = (residual + a)?;
            let hn = block.pre_mlp_norm.forward(&x1, differentiable)?;
            let mut m = block
                .mlp
                .forward(&hn, self.fused.get(i).and_then(|f| f.1.as_ref()))?;
            if let Some(n) = &block.post_mlp_norm {
                m = n.forward(&m, differentiable)?;
            }
            x = (x1 + m)?;
        }
        if let Some(c) = cache {
            c.len = offset + seq;
        }
        self.norm.forward(&x, differentiable)
    }

    /// One token through layer `i` in the fused decode ops ([`crate::kernels::decode::layer_qkv`],
    /// the cache append, the cached attention, [`crate::kernels::decode::layer_mlp`]) when the
    /// layer is a plain one on the quantized decode kernels, LoRA branches included (on their
    /// bf16 copies, as the unfused decode adds them): no biases, per-head or extra norms, norm
    /// offsets or partial rotary, SiLU gating, separate q/k/v and gate/up with their fused
    /// kernels. `None` (nothing done) otherwise; the caller then runs the layer op by op,
    /// which computes the same values.
    fn decode_layer(
        &self,
        i: usize,
        block: &Block,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        let a = &block.self_attn;
        let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let (Some((Some(fqkv), Some(fgu))), Some((cos, sin)), Some(p)) =
            (self.fused.get(i), rope, block.plain())
        else {
            return Ok(None);
        };
        let hidden = self.cfg.hidden_size;
        if x.dims() != [1, 1, hidden] || cos.dims() != [1, hd / 2] {
            return Ok(None);
        }
        let x2 = x.reshape((1, hidden))?;
        let (Some(qkv), Some(gu), Some(o), Some(down)) = (
            fqkv.decode_parts(&[p.q_proj, p.k_proj, p.v_proj], &x2)?,
            fgu.decode_parts(&[p.gate_proj, p.up_proj], &x2)?,
            a.o_proj.decode_parts(&x2)?,
            block.mlp.down_proj.decode_parts(&x2)?,
        ) else {
            return Ok(None);
        };
        use crate::kernels::decode::DecodeProj;
        let (ok, oparts) = (o.0.clone(), vec![(a.o_proj.out_dim(), o.1)]);
        let (dk, dparts) = (
            down.0.clone(),
            vec![(block.mlp.down_proj.out_dim(), down.1)],
        );
        let (qkv, gu) = (DecodeProj::new(qkv.0, &qkv.1), DecodeProj::new(gu.0, &gu.1));
        let (o, down) = (DecodeProj::new(&ok, &oparts), DecodeProj::new(&dk, &dparts));
        let qkv_out = crate::kernels::decode::layer_qkv(
            x,
            &p.n1.weight,
            p.n1.eps as f32,
            &qkv,
            (nh, nkv, hd),
            cos,
            sin,
        )?;
        let q = qkv_out.narrow(1, 0, nh)?;
        let (k, v) = cache.append(
            i,
            &qkv_out.narrow(1, nh, nkv)?,
            &qkv_out.narrow(1, nh + nkv, nkv)?,
        )?;
        let out = a.cached_attention(&q, &k, &v)?;
        let y = crate::kernels::decode::layer_mlp(
            &out,
            x,
            &o,
            &p.n2.weight,
            p.n2.eps as f32,
            &gu,
            &down,
        )?;
        Ok(Some(y))
    }

    /// A prompt's rows through layer `i` in the fused prompt ops ([`crate::kernels::prompt`]),
    /// when the layer is a plain one whose projections all run [`crate::kernels::frozen_linear`]
    /// on their packed bf16 copies or compact bases (no LoRA, no biases; the structural
    /// conditions of [`Llama::decode_layer`]); `None` (nothing done) otherwise.
    fn prompt_layer(
        &self,
        i: usize,
        block: &Block,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        cache: Option<&mut KvCache>,
    ) -> Result<Option<Tensor>> {
        let a = &block.self_attn;
        let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let (Some((cos, sin)), Some(p)) = (rope, block.plain()) else {
            return Ok(None);
        };
        let (b, l, hidden) = x.dims3()?;
        if b != 1 || hidden != self.cfg.hidden_size || cos.dims() != [l, hd / 2] {
            return Ok(None);
        }
        let x2 = x.reshape((l, hidden))?;
        let mut w = Vec::with_capacity(7);
        for proj in [
            p.q_proj,
            p.k_proj,
            p.v_proj,
            &a.o_proj,
            p.gate_proj,
            p.up_proj,
            &block.mlp.down_proj,
        ] {
            match proj.prompt_weight(&x2)? {
                Some(f) => w.push(f),
                None => return Ok(None),
            }
        }
        let qkv = crate::kernels::prompt::layer_qkv(
            x,
            &p.n1.weight,
            p.n1.eps as f32,
            [&w[0], &w[1], &w[2]],
            (nh, nkv, hd),
            cos,
            sin,
        )?;
        let q = qkv.narrow(1, 0, nh)?;
        let (k, v) = (qkv.narrow(1, nh, nkv)?, qkv.narrow(1, nh + nkv, nkv)?);
        let (k, v) = match cache {
            Some(c) => c.append(i, &k, &v)?,
            None => (k, v),
        };
        let out = a.cached_attention(&q, &k, &v)?;
        let y = crate::kernels::prompt::layer_mlp(
            &out,
            x,
            &w[3],
            &p.n2.weight,
            p.n2.eps as f32,
            [&w[4], &w[5], &w[6]],
        )?;
        Ok(Some(y))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        a: &Attention,
        fused_qkv: Option<&FusedDecode>,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        differentiable: bool,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let (q, k, v) = a.qkv_forward(fused_qkv, x)?;
        let q = Attention::norm_heads(q, &a.q_norm, nh, hd, differentiable)?;
        let k = Attention::norm_heads(k, &a.k_norm, nkv, hd, differentiable)?;
        let scale = a.scale as f32;
        if differentiable && cache.is_none() {
            // Training and scoring: fused rope and causal attention on the projections' own
            // [b, seq, heads * hd] layout (no reshapes, so no reshape nodes in the graph),
            // keeping no [seq, seq] tensors for the backward pass.
            let (q, k) = match rope {
                Some((cos, sin)) => (
                    crate::kernels::rope_partial(&q, cos, sin, hd)?,
                    crate::kernels::rope_partial(&k, cos, sin, hd)?,
                ),
                None => (q, k),
            };
            let out = crate::kernels::attention_heads(&q, &k, &v, nh, nkv, scale, a.window)?;
            return a.o_proj.forward(&out);
        }
        // [b, l, n * hd] -> [b, n, l, hd], rotated.
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            let full = rope.is_some_and(|(c, _)| c.dim(1).ok() == Some(hd / 2));
            let t = match rope {
                Some((cos, sin)) if !full => crate::kernels::rope_partial(&t, cos, sin, hd)?,
                _ => t,
            };
            let t = t.reshape((b, l, n, hd))?.transpose(1, 2)?.contiguous()?;
            Ok(match rope {
                Some((cos, sin)) if full && differentiable => {
                    candle_nn::rotary_emb::rope_slow(&t, cos, sin)?
                }
                Some((cos, sin)) if full => candle_nn::rotary_emb::rope(&t, cos, sin)?,
                _ => t,
            })
        };
        let q = heads(q, nh)?;
        let k = heads(k, nkv)?;
        let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, &k, &v)?,
            None => (k, v),
        };
        if !differentiable {
            let out = a.cached_attention(&q, &k, &v)?;
            return a.o_proj.forward(&out);
        }
        let t = k.dim(2)?;
        let groups = nh / nkv;
        // Group the query heads that share a kv head: [b, nkv, groups * l, hd]; no kv copies.
        let q = q.reshape((b, nkv, groups * l, hd))?;
        let scores = (q.matmul(&k.t()?)? * a.scale)?;
        let scores = match mask {
            Some(m) => scores
                .reshape((b, nkv, groups, l, t))?
                .broadcast_add(m)?
                .reshape((b, nkv, groups * l, t))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs.matmul(&v)?; // [b, nkv, groups*l, hd]
        let out = out
            .reshape((b, nh, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, nh * hd))?;
        a.o_proj.forward(&out)
    }
}

/// The factor the model multiplies its token embeddings by (Gemma 3: `sqrt(hidden_size)`).
pub fn embedding_scale(cfg: &Config) -> Option<f64> {
    cfg.scale_embeddings
        .then(|| (cfg.hidden_size as f64).sqrt())
}

/// The final norm of a model with `cfg` (the `(1 + w)` kind for Gemma 3).
pub fn final_norm(cfg: &Config, weight: Tensor) -> Result<RmsNorm> {
    RmsNorm::with_offset(
        weight,
        cfg.rms_norm_eps,
        if cfg.norm_plus_one { 1.0 } else { 0.0 },
    )
}

/// Additive causal mask `[seq, offset + seq]`: query `i` (at position `offset + i`) sees keys
/// `0..=offset + i`, or only the last `window` of them.
fn causal_mask(
    seq: usize,
    offset: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let t = offset + seq;
    let mut m = vec![0f32; seq * t];
    for i in 0..seq {
        let pos = offset + i;
        for j in 0..t {
            if j > pos || window.is_some_and(|w| j + w <= pos) {
                m[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (seq, t), device)?)
}
