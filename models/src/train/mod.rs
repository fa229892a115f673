//! Training on the `models` runtime: the three adaptation methods (full fine-tuning, LoRA, soft
//! prompt tuning), the loss on the scored tokens, AdamW with warm-up and decay, gradient
//! accumulation and clipping, evaluation, and checkpoints that resume a run exactly.
//!
//! Knows no SQL or jobs: the engine drives a [`Trainer`] step by step, records what it returns,
//! and decides when to checkpoint, evaluate, pause or stop.

pub mod checkpoint;
pub mod examples;
pub mod optim;
pub mod peft;
pub mod pref;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

pub use examples::{
    end_of_text_id, pack, pack_all, packed_count, render_chat, render_text, Example, LossOn,
    RenderOptions,
};
pub use optim::{AdamW, AdamWConfig, Schedule, ScheduleKind};

use crate::kernels;
use crate::linear::{BaseForm, ComputeMode};
use crate::llama::Llama;
use crate::tokenizer::Tok;
use crate::{Error, Result};

/// The projections LoRA can target in a model with separate q/k/v and gate/up projections, by
/// their Hugging Face names (a model's own list: [`Llama::lora_targets`]; Phi-3's are
/// `qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`).
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA settings (Hu et al. 2021), PEFT's meaning for each field.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Module names (`q_proj`, ..., `down_proj`).
    pub targets: Vec<String>,
    /// rsLoRA (Kalajdzievski 2023): scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
            rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// How soft-prompt embeddings start.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInit {
    /// The embeddings of this text's tokens, repeated or cut to the number of virtual tokens
    /// (PEFT's `TEXT` init).
    Text(String),
    /// Embeddings of tokens drawn at random from the vocabulary.
    RandomVocab,
}

/// Soft prompt tuning settings (Lester et al. 2021), PEFT's layout.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptConfig {
    pub num_virtual_tokens: usize,
    pub init: PromptInit,
}

/// The adaptation method.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Method {
    Full,
    Lora(LoraConfig),
    Prompt(PromptConfig),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora(_) => "lora",
            Method::Prompt(_) => "prompt",
        }
    }
}

/// The tensors a method trains, by name (Hugging Face names for full fine-tuning, PEFT keys for
/// LoRA, `prompt_embeddings` for prompt tuning), and the soft prompt if any.
pub struct Trainable {
    pub method: Method,
    pub params: Vec<(String, Var)>,
    pub prefix: Option<Var>,
}

impl Trainable {
    pub fn n_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// Whether full fine-tuning may run its products in bf16 on the matrix units (see
/// [`prepare`]): yes unless `ATTUNE_FULL_BF16=0` asks for f32 products (A/B runs); read once.
/// Where the CPU has no matrix units, or the model was loaded in [`ComputeMode::F32`], full
/// fine-tuning is f32 whatever this says.
pub fn full_bf16_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| not_switched_off("ATTUNE_FULL_BF16"))
}

/// Whether the environment leaves the switch `name` on: anything but `0` (A/B runs set it to
/// `0` for f32 products).
fn not_switched_off(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v.trim() != "0")
}

/// Whether [`prepare`] runs LoRA's and prompt tuning's frozen base (of a model loaded in
/// `Auto`) as int8 products: a CPU with AVX-512 VNNI and no AMX (`kernels::int8::available`,
/// `ATTUNE_MATMUL=f32` turns both off), unless `ATTUNE_TRAIN_INT8=0`.
pub fn int8_frozen_base() -> bool {
    !kernels::amx::available()
        && kernels::int8::available()
        && not_switched_off("ATTUNE_TRAIN_INT8")
}

/// Whether [`prepare`] runs full fine-tuning (of a model loaded in `Auto`) as int8 products on
/// f32 master weights quantized anew every step: a CPU with AVX-512 VNNI and no AMX, unless
/// `ATTUNE_FULL_INT8=0` (or `ATTUNE_MATMUL=f32`) keeps f32 products.
pub fn int8_full_fine_tuning() -> bool {
    !kernels::amx::available() && kernels::int8::available() && not_switched_off("ATTUNE_FULL_INT8")
}

/// Makes `model` trainable with `method`: full fine-tuning turns every weight into a variable
/// (a tied embedding/lm_head stays one tensor); LoRA attaches `A` (Kaiming-uniform, as PEFT) and
/// `B` (zero) to the target projections of a frozen base; prompt tuning creates the soft prompt.
/// The model switches to dense compute (the quantized decode path has no gradients): a model
/// loaded in [`ComputeMode::F32`] trains in f32 throughout (the correctness tests against
/// PyTorch); otherwise, where the CPU has matrix units ([`kernels::amx::available`]), the frozen
/// base runs in bf16 on them (forward pass and input gradient, accumulated in f32) while the
/// trained tensors, their gradients and AdamW's state stay f32; where it has AVX-512 VNNI but no
/// AMX, LoRA and prompt tuning run the frozen base's products in int8 ([`Llama::pack_int8`]) and
/// full fine-tuning its products in int8 on f32 master weights quantized every step
/// ([`int8_full_fine_tuning`]); elsewhere everything is f32.
pub fn prepare(model: &mut Llama, tok: &Tok, method: &Method, seed: u64) -> Result<Trainable> {
    // The portable path (a GPU, or `Llama::set_portable`) multiplies in f32 with candle's ops.
    let bf16 = model.compute_mode() != ComputeMode::F32
        && kernels::amx::available()
        && !model.is_portable();
    // Full fine-tuning replaces every weight by a variable: start from contiguous f32 weights
    // (nothing packed), and switch the layers to Auto once they hold their variables.
    let full = matches!(method, Method::Full);
    // Full fine-tuning's bf16 products: f32 master weights, every weight packed anew each step,
    // weight gradients on the matrix units too. 1.7x f32's speed on the default model (440 vs
    // 258 tok/s, train bench, 2026-12-05) for ~320 MB more peak RSS; `ATTUNE_FULL_BF16=0` keeps
    // f32 products.
    let full_bf16 = bf16 && full_bf16_enabled();
    // Without AMX but with AVX-512 VNNI, full fine-tuning's products (forward, input and weight
    // gradients) run in int8 on f32 master weights quantized anew every step: 1.6x f32's speed
    // on the default model (407 vs 260 tok/s, train bench, 2026-12-05), the QUALITY recipe's
    // valid NLL drop 13.49% against PEFT's 13.78%.
    let full_int8 = full
        && model.compute_mode() != ComputeMode::F32
        && !model.is_portable()
        && int8_full_fine_tuning();
    // A compact base (quantized or bf16, `Llama::set_base_form`) stays as it is for LoRA and
    // prompt tuning: its products expand it panel by panel, on the matrix units where the CPU
    // has them. Full fine-tuning makes f32 variables of every weight whatever the form.
    let compact = model.base_form() != BaseForm::F32 && !full;
    // Without AMX but with AVX-512 VNNI, LoRA and prompt tuning run the frozen base's forward
    // products and input gradients as int8 products (`kernels::int8`: weights and activations
    // rounded to 8 bits per 32, exact integer sums); `ATTUNE_TRAIN_INT8=0` keeps f32.
    let int8 = !full
        && !compact
        && model.compute_mode() != ComputeMode::F32
        && !model.is_portable()
        && int8_frozen_base();
    if !compact {
        model.set_compute_mode(if bf16 && !full {
            ComputeMode::Auto
        } else {
            ComputeMode::F32
        })?;
    }
    if int8 {
        model.pack_int8()?;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut params = Vec::new();
    let mut prefix = None;
    // LoRA's targets as the model names them (see `Config::resolve_lora_targets`).
    let mut resolved = None;
    match method {
        Method::Full => {
            // With bf16 products, the f32 master copies of the matrices the products read start
            // on bf16 values: a GGUF base's weights come from f16 scales and a tenth of them sit
            // exactly on a bf16 rounding tie, where AdamW's first update (far below bf16's
            // resolution) would flip the rounding and move them half a bf16 step, an unintended
            // extra step. Started on bf16 values, the products see the master copy move only
            // as its updates accumulate (mixed precision as usual).
            let master = |w: Tensor| -> Result<Tensor> {
                Ok(match full_bf16 {
                    true => w.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
                    false => w,
                })
            };
            let tied = model.config().tie_word_embeddings;
            let emb = Var::from_tensor(&master(model.embed_tokens().weight_f32()?)?)?;
            params.push(("model.embed_tokens.weight".to_string(), emb.clone()));
            for (i, block) in model.layers_mut().iter_mut().enumerate() {
                for (name, norm) in block.norms_mut() {
                    let v = Var::from_tensor(&norm.weight)?;
                    norm.weight = v.as_tensor().clone();
                    params.push((format!("model.layers.{i}.{name}.weight"), v));
                }
            }
            let norm = Var::from_tensor(&model.norm().weight)?;
            model.norm_mut().weight = norm.as_tensor().clone();
            params.push(("model.norm.weight".to_string(), norm));
            for (name, lin) in model.linears_mut() {
                let v = Var::from_tensor(&master(lin.weight_f32()?)?)?;
                lin.set_weight(v.as_tensor().clone())?;
                params.push((format!("{name}.weight"), v));
                if let Some(b) = lin.bias().cloned() {
                    let vb = Var::from_tensor(&b)?;
                    lin.set_bias(Some(vb.as_tensor().clone()))?;
                    params.push((format!("{name}.bias"), vb));
                }
            }
            model.set_embedding_weight(emb.as_tensor().clone())?;
            if tied {
                model.lm_head_mut().set_weight(emb.as_tensor().clone())?;
            } else {
                let w = master(model.lm_head().weight_f32()?)?;
                let v = Var::from_tensor(&w)?;
                model.lm_head_mut().set_weight(v.as_tensor().clone())?;
                params.push(("lm_head.weight".to_string(), v));
            }
            if full_bf16 || full_int8 {
                // f32 master weights, bf16 products on the matrix units (packed every step),
                // or int8 products on VNNI (quantized every step).
                for (_, lin) in model.linears_mut() {
                    lin.set_mode(ComputeMode::Auto)?;
                }
                model.lm_head_mut().set_mode(ComputeMode::Auto)?;
            }
        }
        Method::Lora(cfg) => {
            if cfg.r == 0 {
                return Err(Error::InvalidParams("LoRA rank must be at least 1".into()));
            }
            if cfg.targets.is_empty() {
                return Err(Error::InvalidParams(
                    "LoRA needs at least one target module".into(),
                ));
            }
            let targets = model
                .config()
                .resolve_lora_targets(&cfg.targets)
                .map_err(Error::InvalidParams)?;
            resolved = Some(Method::Lora(LoraConfig {
                targets: targets.clone(),
                ..cfg.clone()
            }));
            if !(0.0..1.0).contains(&cfg.dropout) {
                return Err(Error::InvalidParams(format!(
                    "LoRA dropout {} is not in [0, 1)",
                    cfg.dropout
                )));
            }
            let device = model.device().clone();
            for (name, lin) in model.linears_mut() {
                let short = name.rsplit('.').next().unwrap_or("");
                if !targets.iter().any(|t| t == short) {
                    continue;
                }
                let (din, dout) = (lin.in_dim(), lin.out_dim());
                // kaiming_uniform_(a = sqrt(5)): bound = 1 / sqrt(fan_in).
                let bound = 1.0 / (din as f32).sqrt();
                let a: Vec<f32> = (0..cfg.r * din)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, din), &device)?)?;
                let b = Var::zeros((dout, cfg.r), DType::F32, &device)?;
                lin.attach_lora(a.as_tensor().clone(), b.as_tensor().clone(), cfg.scale())?;
                if let Some(l) = lin.lora_mut() {
                    l.dropout = cfg.dropout;
                }
                params.push((format!("base_model.model.{name}.lora_A.weight"), a));
                params.push((format!("base_model.model.{name}.lora_B.weight"), b));
            }
            if params.is_empty() {
                return Err(Error::InvalidParams(
                    "no layer matched the LoRA targets".into(),
                ));
            }
        }
        Method::Prompt(cfg) => {
            let n = cfg.num_virtual_tokens;
            if n == 0 {
                return Err(Error::InvalidParams(
                    "prompt tuning needs at least one virtual token".into(),
                ));
            }
            let vocab = model.config().vocab_size;
            let ids: Vec<u32> = match &cfg.init {
                PromptInit::Text(text) => {
                    // With the tokenizer's special tokens (a BOS where it adds one), as PEFT
                    // tokenizes the init text.
                    let base = tok.encode(text, true)?;
                    if base.is_empty() {
                        return Err(Error::InvalidParams(
                            "the prompt-tuning init text has no tokens".into(),
                        ));
                    }
                    base.iter().cycle().take(n).copied().collect()
                }
                PromptInit::RandomVocab => {
                    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
                }
            };
            let ids = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
            let rows = model.embed_tokens().forward(&ids)?.squeeze(0)?;
            let v = Var::from_tensor(&rows.to_dtype(DType::F32)?)?;
            params.push(("prompt_embeddings".to_string(), v.clone()));
            prefix = Some(v);
        }
    }
    Ok(Trainable {
        method: resolved.unwrap_or_else(|| method.clone()),
        params,
        prefix,
    })
}

/// A padded batch ready for the model.
pub struct Batch {
    /// `[batch, seq]` u32, right-padded.
    pub ids: Tensor,
    /// Row index into the flattened `[batch * (n_prefix + seq)]` hidden states of each scored
    /// position (the position before the target token).
    pub rows: Tensor,
    pub targets: Vec<u32>,
    /// Real (not padding) tokens in the batch.
    pub n_tokens: usize,
}

/// Right-pads `examples` with `pad_id` (pads are never attended to by real tokens under the causal
/// mask, and never scored) and lists the scored positions, shifted for next-token prediction.
pub fn collate(
    examples: &[&Example],
    pad_id: u32,
    n_prefix: usize,
    device: &Device,
) -> Result<Batch> {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if t == 0 {
        return Err(Error::InvalidParams("an empty batch".into()));
    }
    let width = n_prefix + t;
    let mut ids = Vec::with_capacity(examples.len() * t);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut n_tokens = 0;
    for (b, e) in examples.iter().enumerate() {
        ids.extend_from_slice(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, t - e.ids.len()));
        n_tokens += e.ids.len();
        for (pos, (&id, &scored)) in e.ids.iter().zip(&e.targets).enumerate() {
            if scored && pos > 0 {
                rows.push((b * width + n_prefix + pos - 1) as u32);
                targets.push(id);
            }
        }
    }
    let n_rows = rows.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (examples.len(), t), device)?,
        rows: Tensor::from_vec(rows, n_rows, device)?,
        targets,
        n_tokens,
    })
}

/// Sum of the target tokens' negative log-likelihoods (a scalar tensor, differentiable when the
/// model or the prefix holds variables). The lm_head runs on the scored positions only.
pub fn nll_sum(model: &Llama, batch: &Batch, prefix: Option<&Tensor>) -> Result<Tensor> {
    if batch.targets.is_empty() {
        return Ok(Tensor::zeros((), DType::F32, model.device())?);
    }
    Ok(token_nll(model, batch, prefix)?.sum_all()?)
}

/// The negative log-likelihood of each target token, `[n]` in the batch's row order
/// (differentiable when the model or the prefix holds variables; preference training weighs
/// them per sequence). The lm_head runs on the scored positions only.
pub fn token_nll(model: &Llama, batch: &Batch, prefix: Option<&Tensor>) -> Result<Tensor> {
    let h = model.hidden_states(
        prefix.map(|p| p.unsqueeze(0)).transpose()?.as_ref(),
        &batch.ids,
        None,
    )?;
    let (b, w, hid) = h.dims3()?;
    if batch.targets.is_empty() {
        return Ok(Tensor::zeros(0, DType::F32, model.device())?);
    }
    let h = h.reshape((b * w, hid))?.index_select(&batch.rows, 0)?;
    let head = model.lm_head();
    if model.is_portable() {
        // candle's ops on any device: logits, log-softmax, the targets' entries.
        let logits = head.forward_portable(&h)?;
        let targets = Tensor::new(batch.targets.as_slice(), model.device())?.unsqueeze(1)?;
        let lsm = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        return Ok(lsm.gather(&targets, 1)?.squeeze(1)?.neg()?);
    }
    match head.weight() {
        // A plain dense head (every Llama here): logits and loss in one op.
        Some(w) if head.bias().is_none() && head.lora().is_none() && w.is_contiguous() => {
            let products = match head.packed() {
                Some(p) if !w.track_op() => kernels::HeadProducts::Frozen(p),
                _ if head.bf16_compute() => kernels::HeadProducts::PerCall,
                _ if head.int8_compute() && w.track_op() => kernels::HeadProducts::Int8PerCall,
                _ => kernels::HeadProducts::Off,
            };
            Ok(kernels::lm_head_nll(&h, w, products, &batch.targets)?)
        }
        // A frozen head with no f32 copy (packed bf16, or a compact base): the same one op.
        None if head.bias().is_none() && head.lora().is_none() => match head.frozen() {
            Some(f) => Ok(kernels::lm_head_nll_frozen(&h, &f, &batch.targets)?),
            None => Ok(kernels::cross_entropy(&head.forward(&h)?, &batch.targets)?),
        },
        _ => {
            let logits = head.forward(&h)?;
            Ok(kernels::cross_entropy(&logits, &batch.targets)?)
        }
    }
}

/// Mean NLL over a split's scored tokens, one example at a time (no padding), as the reference
/// evaluates. Returns (sum of NLLs, number of scored tokens).
pub fn evaluate(
    model: &Llama,
    examples: &[Example],
    prefix: Option<&Tensor>,
    pad_id: u32,
    mut progress: impl FnMut(usize, usize) -> bool,
) -> Result<(f64, usize)> {
    let n_prefix = prefix.map_or(Ok(0), |p| p.dim(0))?;
    let prefix = prefix.map(|p| p.detach());
    let mut sum = 0f64;
    let mut count = 0usize;
    for (i, e) in examples.iter().enumerate() {
        let batch = collate(&[e], pad_id, n_prefix, model.device())?;
        if !batch.targets.is_empty() {
            let s = nll_sum(model, &batch, prefix.as_ref())?.to_scalar::<f32>()?;
            sum += s as f64;
            count += batch.targets.len();
        }
        if !progress(i + 1, examples.len()) {
            break;
        }
    }
    Ok((sum, count))
}

/// Training settings the loop needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Optimizer steps in the run.
    pub steps: usize,
    pub optimizer: AdamWConfig,
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Shuffle the training examples each epoch (seeded); off keeps the given order.
    pub shuffle: bool,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: usize,
    /// Mean NLL per target token over the step's batches.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub target_tokens: usize,
    /// Real tokens processed (forward + backward).
    pub tokens: usize,
    pub seconds: f64,
    /// Preference training's figures (rewards, margin, accuracy, log-probs); `loss` is then
    /// the preference loss.
    #[serde(default)]
    pub pref: Option<pref::PrefFigures>,
}

/// The position in the data: the order is a function of the seed and the epoch, so a step count
/// fixes which examples come next.
fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng =
            StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
    }
    order
}

/// The items (examples, preference pairs) of optimizer step `step` (0-based) out of `n`, as
/// index lists per micro-batch: a function of the seed and the step only.
pub fn batch_order(
    n: usize,
    step: usize,
    batch_size: usize,
    grad_accum: usize,
    seed: u64,
    shuffle: bool,
) -> Vec<Vec<usize>> {
    let per = batch_size * grad_accum;
    let mut out = Vec::with_capacity(grad_accum);
    let mut cur = Vec::with_capacity(batch_size);
    let mut cached: Option<(usize, Vec<usize>)> = None;
    if n == 0 {
        return out;
    }
    for k in 0..per {
        let global = step * per + k;
        let epoch = global / n;
        let order = match cached.take() {
            Some((e, o)) if e == epoch => o,
            _ => epoch_order(n, seed, epoch, shuffle),
        };
        cur.push(order[global % n]);
        cached = Some((epoch, order));
        if cur.len() == batch_size {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

/// Drives training one optimizer step at a time.
pub struct Trainer {
    pub model: Llama,
    pub trainable: Trainable,
    pub config: TrainConfig,
    pub optimizer: AdamW,
    examples: Vec<Example>,
    pad_id: u32,
    /// Optimizer steps done.
    step: usize,
    /// Set when training on preference pairs ([`Trainer::new_preference`]).
    pref: Option<Box<pref::PrefState>>,
}

/// A finished (or abandoned) run frees the large step buffers the kernels kept for its next
/// step ([`crate::kernels::scratch`]).
impl Drop for Trainer {
    fn drop(&mut self) {
        crate::kernels::scratch::release();
    }
}

impl Trainer {
    /// `model` must already be [`prepare`]d into `trainable`.
    pub fn new(
        mut model: Llama,
        trainable: Trainable,
        config: TrainConfig,
        examples: Vec<Example>,
        pad_id: u32,
    ) -> Result<Trainer> {
        if config.batch_size == 0 || config.grad_accum == 0 {
            return Err(Error::InvalidParams(
                "batch size and gradient accumulation must be at least 1".into(),
            ));
        }
        if examples.is_empty() {
            return Err(Error::InvalidParams("no training examples".into()));
        }
        if examples.iter().all(|e| e.n_targets() == 0) {
            return Err(Error::InvalidParams(
                "no training example has a token to learn (check the loss masking)".into(),
            ));
        }
        crate::tune_allocator();
        // Every layer it can as one op; `train_step` collects the gradients that leaves.
        model.set_layer_fusion(crate::llama::LayerFusion::All);
        let mut optimizer = AdamW::new(&trainable.params, config.optimizer.clone())?;
        // The portable path's update: tensor ops, as on a GPU (also for a CPU model set portable,
        // so the CPU checks the GPU's arithmetic).
        optimizer.set_tensor_ops(model.is_portable());
        Ok(Trainer {
            model,
            trainable,
            config,
            optimizer,
            examples,
            pad_id,
            step: 0,
            pref: None,
        })
    }

    /// Optimizer steps done so far.
    pub fn step(&self) -> usize {
        self.step
    }

    pub fn examples_per_step(&self) -> usize {
        self.config.batch_size * self.config.grad_accum
    }

    /// The examples of optimizer step `step` (0-based), as index lists per micro-batch.
    pub fn batch_indices(&self, step: usize) -> Vec<Vec<usize>> {
        batch_order(
            self.examples.len(),
            step,
            self.config.batch_size,
            self.config.grad_accum,
            self.config.seed,
            self.config.shuffle,
        )
    }

    /// Epochs completed (fractional).
    pub fn epoch(&self) -> f64 {
        (self.step * self.examples_per_step()) as f64 / self.examples.len() as f64
    }

    fn prefix_tensor(&self) -> Option<Tensor> {
        self.trainable
            .prefix
            .as_ref()
            .map(|v| v.as_tensor().clone())
    }

    /// One optimizer step on the accumulated gradients (a parameter that got none counts as
    /// zero): the global norm, clipping to `max_grad_norm`, the schedule's rate for the next
    /// step, AdamW. Returns (gradient norm before clipping, learning rate).
    pub(crate) fn apply_step(&mut self, grads: Vec<Option<Tensor>>) -> Result<(f64, f64)> {
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.trainable.params)
            .map(|(g, (_, v))| match g {
                Some(g) => Ok(g),
                None => Ok(v.zeros_like()?),
            })
            .collect::<Result<_>>()?;
        let grad_norm = optim::global_norm(&grads)?;
        let clip = if self.config.max_grad_norm > 0.0 && grad_norm > self.config.max_grad_norm {
            self.config.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr = self.config.schedule.lr(self.step + 1);
        self.optimizer
            .step(&self.trainable.params, &grads, lr, clip)?;
        self.step += 1;
        Ok((grad_norm, lr))
    }

    fn set_dropout_seed(&mut self, seed: Option<u64>) {
        for (i, (_, lin)) in self.model.linears_mut().into_iter().enumerate() {
            if let Some(l) = lin.lora_mut() {
                l.dropout_seed =
                    seed.map(|s| s ^ ((i as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93)));
            }
        }
    }

    /// One optimizer step: forward and backward over `grad_accum` micro-batches, clip, AdamW.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        if let Some(mut st) = self.pref.take() {
            let r = self.pref_step(&mut st);
            self.pref = Some(st);
            return r;
        }
        let started = std::time::Instant::now();
        let micro = self.batch_indices(self.step);
        let n_prefix = self.trainable.prefix.as_ref().map_or(Ok(0), |p| p.dim(0))?;
        let device = self.model.device().clone();
        let batches: Vec<Batch> = micro
            .iter()
            .map(|idx| {
                let ex: Vec<&Example> = idx.iter().map(|&i| &self.examples[i]).collect();
                collate(&ex, self.pad_id, n_prefix, &device)
            })
            .collect::<Result<_>>()?;
        let total_targets: usize = batches.iter().map(|b| b.targets.len()).sum();
        let tokens: usize = batches.iter().map(|b| b.n_tokens).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.trainable.params.len()];
        let mut loss_sum = 0f64;
        for (m, batch) in batches.iter().enumerate() {
            if batch.targets.is_empty() {
                continue;
            }
            let step_seed = self.config.seed
                ^ ((self.step * self.config.grad_accum + m) as u64 + 1)
                    .wrapping_mul(0xA24B_AED4_963E_E407);
            self.set_dropout_seed(Some(step_seed));
            let prefix = self.prefix_tensor();
            let sum = nll_sum(&self.model, batch, prefix.as_ref())?;
            loss_sum += sum.to_scalar::<f32>()? as f64;
            let scaled = (sum / total_targets.max(1) as f64)?;
            let g = kernels::block::backward(&scaled)?;
            for (slot, (_, v)) in grads.iter_mut().zip(&self.trainable.params) {
                if let Some(gv) = g.get(v.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + gv)?,
                        None => gv.clone(),
                    });
                }
            }
        }
        self.set_dropout_seed(None);
        let (grad_norm, lr) = self.apply_step(grads)?;
        Ok(StepMetrics {
            step: self.step,
            loss: loss_sum / total_targets.max(1) as f64,
            lr,
            grad_norm,
            target_tokens: total_targets,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
            pref: None,
        })
    }

    /// Mean NLL of `examples` under the model being trained.
    pub fn evaluate(
        &self,
        examples: &[Example],
        progress: impl FnMut(usize, usize) -> bool,
    ) -> Result<(f64, usize)> {
        let prefix = self.prefix_tensor();
        evaluate(
            &self.model,
            examples,
            prefix.as_ref(),
            self.pad_id,
            progress,
        )
    }

    pub(crate) fn set_step(&mut self, step: usize) {
        self.step = step;
    }
}
