//! The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2), written for adaptation.
//!
//! Architecture: Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" —
//! pre-norm RMSNorm blocks, rotary position embeddings (Su et al. 2021), grouped-query attention
//! (Ainslie et al. 2023), SwiGLU MLP. Qwen2 adds q/k/v biases (a [`Config`] switch); Llama 3.1's
//! frequency-dependent rope scaling is another switch.
//!
//! Weights are always in Hugging Face layout (the GGUF reader un-permutes Q/K), module names equal
//! the Hugging Face names (`model.layers.{i}.self_attn.q_proj`), every [`Linear`] can carry a LoRA
//! branch, and [`Llama::forward_with_prefix`] takes soft-prompt embeddings (PEFT prompt tuning).
//!
//! Two kernels per op: for inference, fused ops with no backward pass (candle's `rms_norm` and
//! `rope`, Attune's causal attention over the KV cache and SwiGLU in `kernels`); for training,
//! ops with a backward pass (Attune's fused ones in `kernels`, or compositions of candle's). The differentiable path
//! is taken automatically when any weight, LoRA tensor or the prefix is a tracked variable, or
//! when [`Llama::set_force_differentiable`] asks for it.

use candle_core::{DType, Device, Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::Config;
use crate::linear::{ComputeMode, FusedDecode, Linear};
use crate::{Error, Result};

/// Root-mean-square layer norm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if differentiable || self.weight.track_op() {
            Ok(crate::kernels::rms_norm(x, &self.weight, self.eps as f32)?)
        } else {
            Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?)
        }
    }
}

/// Token embedding table `[vocab, hidden]`: f32, or quantized rows dequantized on lookup.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Option<Tensor>,
    pub qweight: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
}

impl Embedding {
    pub fn from_weight(weight: Tensor) -> Result<Self> {
        let (vocab_size, hidden_size) = weight.dims2()?;
        Ok(Self {
            weight: Some(weight.to_dtype(DType::F32)?),
            qweight: None,
            vocab_size,
            hidden_size,
        })
    }

    /// ids `[batch, seq]` u32 -> `[batch, seq, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let e = match (&self.weight, &self.qweight) {
            (Some(w), _) => w.index_select(&flat, 0)?,
            (None, Some(q)) => q.embedding(&flat)?,
            (None, None) => return Err(Error::InvalidParams("embedding has no weights".into())),
        };
        Ok(e.reshape((b, l, self.hidden_size))?)
    }

    /// The dense table, dequantizing if only the quantized one is kept.
    pub fn weight_f32(&self) -> Result<Tensor> {
        match (&self.weight, &self.qweight) {
            (Some(w), _) => Ok(w.clone()),
            (None, Some(q)) => Ok(q.dequantize(&q.device())?),
            (None, None) => Err(Error::InvalidParams("embedding has no weights".into())),
        }
    }
}

/// Self-attention with grouped-query heads.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, fused: Option<&FusedDecode>) -> Result<Tensor> {
        if let (Some(wg), Some(wu)) = (
            self.gate_proj.dense_trainable(),
            self.up_proj.dense_trainable(),
        ) {
            if x.track_op() || wg.track_op() || wu.track_op() {
                // Training without LoRA on gate/up (full fine-tuning, prompt tuning): the gate,
                // up and SwiGLU as one graph node.
                let h = crate::kernels::gate_up_swiglu(x, wg, wu)?;
                return self.down_proj.forward(&h);
            }
        }
        let gu = FusedDecode::forward(fused, &[&self.gate_proj, &self.up_proj], x)?;
        let [g, u] = <[Tensor; 2]>::try_from(gu)
            .map_err(|_| Error::InvalidParams("gate/up product count".into()))?;
        // One vectorised pass instead of `silu` then `mul`, with its own backward pass.
        let h = crate::kernels::swiglu(&g, &u)?;
        self.down_proj.forward(&h)
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// The seven projections of one layer, by their Hugging Face names.
#[derive(Debug)]
pub struct BlockProjections {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Block {
    /// A layer from its norm weights and projections, with head counts from `cfg`
    /// (every loader builds layers this way; `Llama::from_parts` checks the shapes).
    pub fn new(
        cfg: &Config,
        input_norm: Tensor,
        post_attention_norm: Tensor,
        p: BlockProjections,
    ) -> Result<Self> {
        Ok(Block {
            input_layernorm: RmsNorm::new(input_norm, cfg.rms_norm_eps)?,
            self_attn: Attention {
                q_proj: p.q_proj,
                k_proj: p.k_proj,
                v_proj: p.v_proj,
                o_proj: p.o_proj,
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim(),
            },
            post_attention_layernorm: RmsNorm::new(post_attention_norm, cfg.rms_norm_eps)?,
            mlp: Mlp {
                gate_proj: p.gate_proj,
                up_proj: p.up_proj,
                down_proj: p.down_proj,
            },
        })
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
        use crate::kernels::block::{LayerParts, Proj};
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
        let a = &self.self_attn;
        let parts = LayerParts {
            input_norm: &self.input_layernorm.weight,
            input_eps: self.input_layernorm.eps as f32,
            q: proj(&a.q_proj)?,
            k: proj(&a.k_proj)?,
            v: proj(&a.v_proj)?,
            o: proj(&a.o_proj)?,
            post_norm: &self.post_attention_layernorm.weight,
            post_eps: self.post_attention_layernorm.eps as f32,
            gate: proj(&self.mlp.gate_proj)?,
            up: proj(&self.mlp.up_proj)?,
            down: proj(&self.mlp.down_proj)?,
            heads: a.num_heads,
            kv_heads: a.num_kv_heads,
        };
        (trained || parts.first_trained().is_none()).then_some(parts)
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

/// A Llama-family decoder. `Send + Sync`: share it behind an `Arc`; each sequence keeps its own
/// [`KvCache`].
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: Config,
    device: Device,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    force_differentiable: bool,
    /// Which layers training runs as one op.
    layer_fusion: LayerFusion,
    /// Per layer: q/k/v and gate/up fused for the decode kernel (see [`FusedDecode`]).
    fused: Vec<(Option<FusedDecode>, Option<FusedDecode>)>,
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
            let a = &b.self_attn;
            check(format!("{p}.self_attn.q_proj"), &a.q_proj, nh * hd, h)?;
            check(format!("{p}.self_attn.k_proj"), &a.k_proj, nkv * hd, h)?;
            check(format!("{p}.self_attn.v_proj"), &a.v_proj, nkv * hd, h)?;
            check(format!("{p}.self_attn.o_proj"), &a.o_proj, h, nh * hd)?;
            check(format!("{p}.mlp.gate_proj"), &b.mlp.gate_proj, inter, h)?;
            check(format!("{p}.mlp.up_proj"), &b.mlp.up_proj, inter, h)?;
            check(format!("{p}.mlp.down_proj"), &b.mlp.down_proj, h, inter)?;
            for (n, norm) in [
                ("input_layernorm", &b.input_layernorm),
                ("post_attention_layernorm", &b.post_attention_layernorm),
            ] {
                if norm.weight.dims1()? != h {
                    return Err(shape_err(format!("{p}.{n} has {:?}", norm.weight.dims())));
                }
            }
            if a.num_heads != nh || a.num_kv_heads != nkv || a.head_dim != hd {
                return Err(shape_err(format!("{p}.self_attn head counts")));
            }
        }
        check("lm_head".into(), &w.lm_head, cfg.vocab_size, h)?;
        let inv_freq = rope_inv_freq(&cfg);
        let fused = w
            .layers
            .iter()
            .map(|b| {
                let a = &b.self_attn;
                (
                    FusedDecode::new(&[&a.q_proj, &a.k_proj, &a.v_proj]),
                    FusedDecode::new(&[&b.mlp.gate_proj, &b.mlp.up_proj]),
                )
            })
            .collect();
        Ok(Self {
            cfg,
            device,
            embed_tokens: w.embed_tokens,
            layers: w.layers,
            norm: w.norm,
            lm_head: w.lm_head,
            inv_freq,
            force_differentiable: false,
            layer_fusion: LayerFusion::Frozen,
            fused,
        })
    }

    /// A randomly initialised model (normal(0, 0.02) weights, unit norms) for tests and
    /// experiments; deterministic for a given `seed`.
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
        let embed = rand_t(&[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            let bias = |n: usize,
                        r: &mut dyn FnMut(&[usize]) -> Result<Tensor>|
             -> Result<Option<Tensor>> {
                if cfg.attention_bias {
                    Ok(Some(r(&[n])?))
                } else {
                    Ok(None)
                }
            };
            let qb = bias(nh * hd, &mut rand_t)?;
            let kb = bias(nkv * hd, &mut rand_t)?;
            let vb = bias(nkv * hd, &mut rand_t)?;
            let projections = BlockProjections {
                q_proj: Linear::from_weights(rand_t(&[nh * hd, h])?, qb)?,
                k_proj: Linear::from_weights(rand_t(&[nkv * hd, h])?, kb)?,
                v_proj: Linear::from_weights(rand_t(&[nkv * hd, h])?, vb)?,
                o_proj: Linear::from_weights(rand_t(&[h, nh * hd])?, None)?,
                gate_proj: Linear::from_weights(rand_t(&[inter, h])?, None)?,
                up_proj: Linear::from_weights(rand_t(&[inter, h])?, None)?,
                down_proj: Linear::from_weights(rand_t(&[h, inter])?, None)?,
            };
            let ones = Tensor::ones(h, DType::F32, device)?;
            layers.push(Block::new(cfg, ones.clone(), ones, projections)?);
        }
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weights(embed.clone(), None)?
        } else {
            Linear::from_weights(rand_t(&[cfg.vocab_size, h])?, None)?
        };
        let weights = LlamaWeights {
            embed_tokens: Embedding::from_weight(embed)?,
            layers,
            norm: RmsNorm::new(Tensor::ones(h, DType::F32, device)?, cfg.rms_norm_eps)?,
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
    /// (`model.layers.{i}.self_attn.q_proj`, ..., `model.layers.{i}.mlp.down_proj`); PEFT's LoRA
    /// keys are `base_model.model.{name}.lora_{A,B}.weight`.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, b) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut b.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut b.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }

    /// Read-only view of [`Self::linears_mut`].
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &b.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &a.o_proj));
            let m = &b.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &m.down_proj));
        }
        out
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

    fn is_trainable(&self) -> bool {
        self.embed_tokens
            .weight
            .as_ref()
            .is_some_and(|w| w.track_op())
            || self.norm.weight.track_op()
            || self.lm_head.is_trainable()
            || self.layers.iter().any(|b| {
                b.input_layernorm.weight.track_op()
                    || b.post_attention_layernorm.weight.track_op()
                    || [
                        &b.self_attn.q_proj,
                        &b.self_attn.k_proj,
                        &b.self_attn.v_proj,
                        &b.self_attn.o_proj,
                        &b.mlp.gate_proj,
                        &b.mlp.up_proj,
                        &b.mlp.down_proj,
                    ]
                    .iter()
                    .any(|l| l.is_trainable())
            })
    }

    /// ids `[batch, seq]` u32; positions start at `cache.len()`; returns f32 logits
    /// `[batch, vocab]` of the last position only.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.hidden_states(None, ids, Some(cache))?;
        let l = h.dim(1)?;
        let last = h.narrow(1, l - 1, 1)?;
        let logits = self.lm_head.forward(&last)?;
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
        Ok(self.lm_head.forward(&last)?.squeeze(1)?)
    }

    /// Logits for every position `[batch, seq, vocab]`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_with_prefix(None, ids, cache)
    }

    /// Soft prompts: `prefix` `[batch or 1, n_virtual, hidden]` is prepended before the token
    /// embeddings; returns logits for all positions including the prefix
    /// `[batch, n_virtual + seq, vocab]`.
    pub fn forward_with_prefix(
        &self,
        prefix: Option<&Tensor>,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.hidden_states(prefix, ids, cache)?;
        self.lm_head.forward(&h)
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
            let p = p.to_dtype(DType::F32)?;
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
        let (cos, sin) = self.rope_tables(offset, seq)?;
        // Only the differentiable path through a cache takes a mask; the others are causal by
        // construction.
        let mask = if seq > 1 && differentiable && cache.is_some() {
            Some(causal_mask(seq, offset, &self.device)?)
        } else {
            None
        };
        for (i, block) in self.layers.iter().enumerate() {
            if differentiable && cache.is_none() && self.layer_fusion != LayerFusion::Off {
                let parts = block.fusable(self.layer_fusion == LayerFusion::All);
                if let Some(parts) = parts {
                    if x.track_op() || parts.first_trained().is_some() {
                        x = crate::kernels::block::fused_layer(&x, parts, &cos, &sin)?;
                        continue;
                    }
                }
            }
            let residual = &x;
            let hn = block.input_layernorm.forward(&x, differentiable)?;
            let a = self.attention(
                &block.self_attn,
                self.fused.get(i).and_then(|f| f.0.as_ref()),
                &hn,
                &cos,
                &sin,
                mask.as_ref(),
                cache.as_deref_mut().map(|c| (c, i)),
                differentiable,
            )?;
            let x1 = (residual + a)?;
            let hn = block
                .post_attention_layernorm
                .forward(&x1, differentiable)?;
            let m = block
                .mlp
                .forward(&hn, self.fused.get(i).and_then(|f| f.1.as_ref()))?;
            x = (x1 + m)?;
        }
        if let Some(c) = cache {
            c.len = offset + seq;
        }
        self.norm.forward(&x, differentiable)
    }

    /// cos/sin `[seq, head_dim/2]` for positions `offset..offset+seq`.
    fn rope_tables(&self, offset: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for t in offset..offset + seq {
            for &f in &self.inv_freq {
                let a = (t as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, half), &self.device)?,
            Tensor::from_vec(sin, (seq, half), &self.device)?,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        a: &Attention,
        fused_qkv: Option<&FusedDecode>,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        differentiable: bool,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let qkv = FusedDecode::forward(fused_qkv, &[&a.q_proj, &a.k_proj, &a.v_proj], x)?;
        let [q, k, v] = <[Tensor; 3]>::try_from(qkv)
            .map_err(|_| Error::InvalidParams("q/k/v product count".into()))?;
        if differentiable && cache.is_none() {
            // Training and scoring: fused rope and causal attention on the projections' own
            // [b, seq, heads * hd] layout (no reshapes, so no reshape nodes in the graph),
            // keeping no [seq, seq] tensors for the backward pass.
            let q = crate::kernels::rope(&q, cos, sin)?;
            let k = crate::kernels::rope(&k, cos, sin)?;
            let scale = 1.0 / (hd as f32).sqrt();
            let out = crate::kernels::attention_heads(&q, &k, &v, nh, nkv, scale)?;
            return a.o_proj.forward(&out);
        }
        let q = q.reshape((b, l, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (q, k) = if differentiable {
            (
                candle_nn::rotary_emb::rope_slow(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_slow(&k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            )
        };
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, &k, &v)?,
            None => (k, v),
        };
        if !differentiable {
            let scale = 1.0 / (hd as f32).sqrt();
            let out = crate::kernels::cached_attention(&q, &k, &v, scale)?;
            return a.o_proj.forward(&out);
        }
        let t = k.dim(2)?;
        let groups = nh / nkv;
        // Group the query heads that share a kv head: [b, nkv, groups * l, hd]; no kv copies.
        let q = q.reshape((b, nkv, groups * l, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
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

/// Additive causal mask `[seq, offset + seq]`: query `i` (at position `offset + i`) sees keys
/// `0..=offset + i`.
fn causal_mask(seq: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let t = offset + seq;
    let mut m = vec![0f32; seq * t];
    for i in 0..seq {
        for j in (offset + i + 1)..t {
            m[i * t + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(m, (seq, t), device)?)
}

/// Rotary inverse frequencies (HF's float32 formula), with llama3 scaling if configured.
fn rope_inv_freq(cfg: &Config) -> Vec<f32> {
    let d = cfg.head_dim();
    let base = cfg.rope_theta as f32;
    let mut inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0f32 / base.powf((2 * i) as f32 / d as f32))
        .collect();
    if let Some(s) = &cfg.rope_scaling {
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
    inv
}
