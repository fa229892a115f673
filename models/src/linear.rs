//! Linear layers that carry both weight forms and an optional LoRA branch.
//!
//! A [`Linear`] holds a dense f32 weight `[out, in]`, a quantized [`QTensor`] (GGUF), or both.
//! Decode multiplies a handful of rows and is memory-bound, so it reads the quantized weights;
//! prompt processing multiplies many rows and is compute-bound, so it uses the f32 copy.
//! [`ComputeMode`] picks between them per call. For Q4_1 and Q8_0 weights the few-row product
//! runs on [`Q41Matrix`], Attune's AVX2 decode kernel (candle's Q4_1 kernel is scalar). A LoRA branch `y = Wx + b + scale * B(A x)`
//! can be attached from plain tensors or from `candle_nn::Var`s (their tensors), so a trainer can
//! put PEFT-named variables here and get gradients through them.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Which weight form the matrix products use.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ComputeMode {
    /// Quantized weights for calls with few rows (decode), f32 for many rows (prompts).
    #[default]
    Auto,
    /// f32 everywhere (dequantized once at load). The correctness tests use this.
    F32,
    /// Quantized weights everywhere (no f32 copy kept: smallest memory).
    Quantized,
}

/// In [`ComputeMode::Auto`], calls with at most this many rows use the quantized weights.
pub const AUTO_QUANTIZED_MAX_ROWS: usize = 8;

/// A low-rank adapter on one linear layer: `scale * B (A x)`.
#[derive(Debug, Clone)]
pub struct LoraBranch {
    /// `lora_A` `[r, in]`.
    pub a: Tensor,
    /// `lora_B` `[out, r]`.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
    /// Dropout probability on the branch's input while training (PEFT's `lora_dropout`).
    pub dropout: f32,
    /// Seed of the current training step's dropout mask; `None` (inference, evaluation) means no
    /// dropout. Derived per step by the trainer, so a resumed run draws the same masks.
    pub dropout_seed: Option<u64>,
}

/// A linear layer `y = x W^T (+ bias) (+ LoRA)`.
#[derive(Debug, Clone)]
pub struct Linear {
    in_dim: usize,
    out_dim: usize,
    /// `[out, in]`; a GGUF layer in `Auto` mode stores it transposed (contiguous `[in, out]`).
    weight: Option<Tensor>,
    qweight: Option<Arc<QTensor>>,
    bias: Option<Tensor>,
    lora: Option<LoraBranch>,
    mode: ComputeMode,
    q41: Option<Arc<Q41Matrix>>,
}

impl Linear {
    /// A dense f32 layer; `weight` is `[out, in]`, `bias` `[out]`.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let weight = weight.to_dtype(DType::F32)?;
        let bias = check_bias(bias, out_dim)?;
        Ok(Self {
            in_dim,
            out_dim,
            weight: Some(weight),
            qweight: None,
            bias,
            lora: None,
            mode: ComputeMode::F32,
            q41: None,
        })
    }

    /// A layer over quantized weights `[out, in]`. With `mode` other than `Quantized`, an f32
    /// copy is dequantized now for the many-row path.
    pub fn from_qtensor(q: Arc<QTensor>, bias: Option<Tensor>, mode: ComputeMode) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let bias = check_bias(bias, out_dim)?;
        let weight = match mode {
            ComputeMode::Quantized => None,
            ComputeMode::Auto | ComputeMode::F32 => Some(q.dequantize(&q.device())?),
        };
        let qweight = match mode {
            ComputeMode::F32 => None,
            ComputeMode::Auto | ComputeMode::Quantized => Some(q),
        };
        Ok(Self {
            in_dim,
            out_dim,
            weight,
            qweight,
            bias,
            lora: None,
            mode,
            q41: None,
        })
    }

    /// A layer from already-built parts (e.g. a tied lm_head sharing the embedding's tensors).
    /// At least one of `weight` `[out, in]` and `qweight` must be given; shapes must agree.
    pub fn from_parts(
        weight: Option<Tensor>,
        qweight: Option<Arc<QTensor>>,
        bias: Option<Tensor>,
        mode: ComputeMode,
    ) -> Result<Self> {
        let dims = match (&weight, &qweight) {
            (Some(w), Some(q)) => {
                let (a, b) = (w.dims2()?, q.shape().dims2()?);
                if a != b {
                    return Err(Error::InvalidParams(format!(
                        "dense weight {a:?} and quantized weight {b:?} differ in shape"
                    )));
                }
                a
            }
            (Some(w), None) => w.dims2()?,
            (None, Some(q)) => q.shape().dims2()?,
            (None, None) => return Err(Error::InvalidParams("linear layer needs a weight".into())),
        };
        let (out_dim, in_dim) = dims;
        let bias = check_bias(bias, out_dim)?;
        let weight = match weight {
            Some(w) => Some(w.to_dtype(DType::F32)?),
            None => None,
        };
        Ok(Self {
            in_dim,
            out_dim,
            weight,
            qweight,
            bias,
            lora: None,
            mode,
            q41: None,
        })
    }

    /// Uses Attune's decode kernel for quantized calls when the quantized weight is Q4_1 or Q8_0.
    pub fn with_decode_kernel(mut self) -> Result<Self> {
        if let Some(q) = &self.qweight {
            self.q41 = Q41Matrix::from_qtensor(q)?.map(Arc::new);
        }
        Ok(self)
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    /// The dense f32 weight `[out, in]`, when one is kept.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }
    /// The dense weight, dequantizing the quantized one if no f32 copy is kept.
    pub fn weight_f32(&self) -> Result<Tensor> {
        match (&self.weight, &self.qweight) {
            (Some(w), _) => Ok(w.contiguous()?),
            (None, Some(q)) => Ok(q.dequantize(&q.device())?),
            (None, None) => Err(Error::InvalidParams("linear layer has no weights".into())),
        }
    }
    /// The quantized weight, when the layer was loaded from GGUF and keeps it.
    pub fn qweight(&self) -> Option<&Arc<QTensor>> {
        self.qweight.as_ref()
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    pub fn mode(&self) -> ComputeMode {
        self.mode
    }

    /// Replaces the dense weight (e.g. with a `Var`'s tensor for full fine-tuning); the quantized
    /// copy, if any, is dropped.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        let dims = weight.dims2()?;
        if dims != (self.out_dim, self.in_dim) {
            return Err(Error::InvalidParams(format!(
                "weight shape {dims:?} does not match layer [{}, {}]",
                self.out_dim, self.in_dim
            )));
        }
        self.weight = Some(weight);
        // The quantized copy no longer matches: drop it so no path reads stale weights.
        self.qweight = None;
        self.q41 = None;
        Ok(())
    }

    /// Attaches a LoRA branch: `a` `[r, in]`, `b` `[out, r]`, `scale = alpha / r`. Replaces any
    /// previous branch. Pass `Var::as_tensor().clone()` to train it.
    pub fn attach_lora(&mut self, a: Tensor, b: Tensor, scale: f64) -> Result<()> {
        let (r, a_in) = a.dims2()?;
        let (b_out, b_r) = b.dims2()?;
        if a_in != self.in_dim || b_out != self.out_dim || b_r != r || r == 0 {
            return Err(Error::InvalidParams(format!(
                "LoRA shapes A {:?} B {:?} do not fit a layer [{} out, {} in]",
                a.dims(),
                b.dims(),
                self.out_dim,
                self.in_dim
            )));
        }
        if !scale.is_finite() {
            return Err(Error::InvalidParams(format!(
                "LoRA scale {scale} is not finite"
            )));
        }
        self.lora = Some(LoraBranch {
            a: a.to_dtype(DType::F32)?,
            b: b.to_dtype(DType::F32)?,
            scale,
            dropout: 0.0,
            dropout_seed: None,
        });
        Ok(())
    }

    /// Replaces the bias (`[out]`), e.g. with a `Var`'s tensor for full fine-tuning.
    pub fn set_bias(&mut self, bias: Option<Tensor>) -> Result<()> {
        if let Some(b) = &bias {
            if b.dims() != [self.out_dim] {
                return Err(Error::InvalidParams(format!(
                    "bias shape {:?} does not match {} outputs",
                    b.dims(),
                    self.out_dim
                )));
            }
        }
        self.bias = bias;
        Ok(())
    }

    pub fn lora_mut(&mut self) -> Option<&mut LoraBranch> {
        self.lora.as_mut()
    }

    /// Removes the LoRA branch and returns it.
    pub fn detach_lora(&mut self) -> Option<LoraBranch> {
        self.lora.take()
    }

    /// The f32 weight when this layer is a plain dense product the training ops can take
    /// (contiguous, no bias, no LoRA branch, not in quantized mode).
    pub fn dense_trainable(&self) -> Option<&Tensor> {
        self.weight.as_ref().filter(|w| {
            w.is_contiguous()
                && self.bias.is_none()
                && self.lora.is_none()
                && self.mode != ComputeMode::Quantized
        })
    }

    /// The f32 weight when the layer is a dense product, LoRA branch or not (contiguous, no
    /// bias, not in quantized mode).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        self.weight.as_ref().filter(|w| {
            w.is_contiguous() && self.bias.is_none() && self.mode != ComputeMode::Quantized
        })
    }

    pub fn lora(&self) -> Option<&LoraBranch> {
        self.lora.as_ref()
    }

    /// Changes the compute mode. Going to `F32`/`Auto` from a quantized-only layer dequantizes
    /// now; going to `Quantized` keeps the f32 copy if there is no quantized weight.
    pub fn set_mode(&mut self, mode: ComputeMode) -> Result<()> {
        if mode != ComputeMode::Quantized && self.weight.is_none() {
            self.weight = Some(self.weight_f32()?);
        }
        if mode == ComputeMode::F32 {
            // Training and exact scoring read the weight in its `[out, in]` storage.
            if let Some(w) = &self.weight {
                if !w.is_contiguous() {
                    self.weight = Some(w.contiguous()?);
                }
            }
        }
        self.mode = mode;
        Ok(())
    }

    /// True if any of this layer's tensors is a tracked variable (training).
    pub fn is_trainable(&self) -> bool {
        self.weight.as_ref().is_some_and(|w| w.track_op())
            || self.bias.as_ref().is_some_and(|b| b.track_op())
            || self
                .lora
                .as_ref()
                .is_some_and(|l| l.a.track_op() || l.b.track_op())
    }

    /// `x` `[..., in]` -> `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, lead) = self.flatten_input(x)?;
        // Training: the fused ops take `x` with its leading dims as it is, so the graph gets no
        // reshape nodes (each would cost the backward pass a zero-filled buffer and an add).
        if let Some(w) = &self.weight {
            let trainable_w = w.track_op();
            let usable = w.is_contiguous() && self.mode != ComputeMode::Quantized;
            let y = match &self.lora {
                Some(l) => {
                    let no_dropout = l.dropout == 0.0 || l.dropout_seed.is_none();
                    let training = x.track_op() || l.a.track_op() || l.b.track_op();
                    (training && no_dropout && !trainable_w && usable).then(|| {
                        // A LoRA branch on a frozen base: one fused op, no weight gradient.
                        crate::train::ops::lora_linear(x, w, &l.a, &l.b, l.scale as f32)
                    })
                }
                None if usable && trainable_w => Some(crate::train::ops::linear(x, w)),
                // A frozen weight under a tracked input (LoRA elsewhere, prompt tuning).
                None if usable && x.track_op() => Some(crate::train::ops::frozen_linear(x, w)),
                None => None,
            };
            if let Some(y) = y {
                let y = y?;
                return Ok(match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                });
            }
        }
        let y = self.base_product(&x2)?;
        self.finish(&x2, y, lead)
    }

    /// `x` as `[rows, in]`, and the leading dims to restore.
    fn flatten_input<'a>(&self, x: &'a Tensor) -> Result<(Tensor, &'a [usize])> {
        let dims = x.dims();
        let Some((&last, lead)) = dims.split_last() else {
            return Err(Error::InvalidParams("linear input is a scalar".into()));
        };
        if last != self.in_dim {
            return Err(Error::InvalidParams(format!(
                "linear input has {last} features, the layer expects {}",
                self.in_dim
            )));
        }
        let rows: usize = lead.iter().product();
        Ok((x.reshape((rows, self.in_dim))?, lead))
    }

    /// Whether a call on `x2` `[rows, in]` reads the quantized weights.
    fn uses_quantized(&self, x2: &Tensor) -> Result<bool> {
        let rows = x2.dim(0)?;
        Ok(match (&self.weight, &self.qweight) {
            (None, Some(_)) => true,
            (Some(_), None) => false,
            (None, None) => return Err(Error::InvalidParams("linear layer has no weights".into())),
            (Some(_), Some(_)) => match self.mode {
                ComputeMode::F32 => false,
                ComputeMode::Quantized => !x2.track_op(),
                ComputeMode::Auto => rows <= AUTO_QUANTIZED_MAX_ROWS && !x2.track_op(),
            },
        })
    }

    /// `x2 W^T` `[rows, out]`, without bias or LoRA.
    fn base_product(&self, x2: &Tensor) -> Result<Tensor> {
        let use_q = self.uses_quantized(x2)?;
        Ok(match (use_q, &self.weight, &self.qweight) {
            (true, _, Some(_)) if self.q41.is_some() => match &self.q41 {
                Some(k) => x2.contiguous()?.apply_op1_no_bwd(k.as_ref())?,
                None => return Err(Error::InvalidParams("decode kernel missing".into())),
            },
            (true, _, Some(q)) => x2.contiguous()?.apply_op1_no_bwd(q.as_ref())?,
            // A frozen weight under a tracked input (LoRA, prompt tuning): no weight gradient.
            (_, Some(w), _) if x2.track_op() && !w.track_op() && w.is_contiguous() => {
                crate::train::ops::frozen_linear(x2, w)?
            }
            // A weight being trained (full fine-tuning): dW straight into its layout.
            (_, Some(w), _) if w.track_op() && w.is_contiguous() => {
                crate::train::ops::linear(x2, w)?
            }
            (_, Some(w), _) => x2.matmul(&w.t()?)?,
            _ => return Err(Error::InvalidParams("linear layer has no weights".into())),
        })
    }

    /// Adds bias and LoRA to the base product `y` `[rows, out]` and restores the leading dims.
    fn finish(&self, x2: &Tensor, mut y: Tensor, lead: &[usize]) -> Result<Tensor> {
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let tracked = x2.track_op() || l.a.track_op() || l.b.track_op();
            let dropout_on = l.dropout > 0.0 && l.dropout_seed.is_some();
            if !tracked && !dropout_on && x2.dim(0)? <= AUTO_QUANTIZED_MAX_ROWS {
                // Decode: the branch in one op (dispatch, not arithmetic, is the cost here).
                let y = crate::train::ops::lora_add(&y, x2, &l.a, &l.b, l.scale as f32)?;
                let mut out_dims = lead.to_vec();
                out_dims.push(self.out_dim);
                return Ok(y.reshape(out_dims)?);
            }
            let dropped;
            let x2 = match l.dropout_seed {
                Some(seed) if l.dropout > 0.0 => {
                    dropped = dropout(x2, l.dropout, seed)?;
                    &dropped
                }
                _ => x2,
            };
            let ax = x2.matmul(&l.a.t()?)?;
            let bax = ax.matmul(&l.b.t()?)?;
            y = (y + (bax * l.scale)?)?;
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_dim);
        Ok(y.reshape(out_dims)?)
    }
}

/// Several layers that read the same input (q/k/v, or gate/up), multiplied by the decode kernel
/// in one pass over their concatenated rows: one thread-pool dispatch instead of one per layer.
/// Each layer's bias and LoRA are added after the split, so the result equals calling each
/// layer's `forward`. It remembers which kernels it was built from and is used only while every
/// layer still has that kernel and would take it for the call (else each layer runs alone), so
/// later changes to the layers (new weights, another compute mode) can never make it stale.
#[derive(Debug, Clone)]
pub struct FusedDecode {
    kernel: Arc<Q41Matrix>,
    parts: Vec<Arc<Q41Matrix>>,
}

impl FusedDecode {
    /// `None` unless every layer has a decode kernel of the same kind and input width.
    pub fn new(layers: &[&Linear]) -> Option<Self> {
        let parts: Vec<Arc<Q41Matrix>> = layers
            .iter()
            .map(|l| l.q41.clone())
            .collect::<Option<_>>()?;
        let kernel = Q41Matrix::concat(&parts)?;
        Some(Self {
            kernel: Arc::new(kernel),
            parts,
        })
    }

    /// `layers[i].forward(x)` for each layer, fused when possible.
    pub fn forward(
        fused: Option<&FusedDecode>,
        layers: &[&Linear],
        x: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let Some(f) = fused else {
            return layers.iter().map(|l| l.forward(x)).collect();
        };
        let Some(first) = layers.first() else {
            return Ok(Vec::new());
        };
        let (x2, lead) = first.flatten_input(x)?;
        let mut usable = layers.len() == f.parts.len();
        for (l, k) in layers.iter().zip(&f.parts) {
            usable &= l.in_dim == first.in_dim
                && l.q41.as_ref().is_some_and(|own| Arc::ptr_eq(own, k))
                && l.uses_quantized(&x2)?;
        }
        if !usable {
            return layers.iter().map(|l| l.forward(x)).collect();
        }
        let y = x2.contiguous()?.apply_op1_no_bwd(f.kernel.as_ref())?;
        let mut out = Vec::with_capacity(layers.len());
        let mut start = 0;
        for l in layers {
            let part = y.narrow(1, start, l.out_dim)?;
            start += l.out_dim;
            out.push(l.finish(&x2, part, lead)?);
        }
        Ok(out)
    }
}

fn check_bias(bias: Option<Tensor>, out_dim: usize) -> Result<Option<Tensor>> {
    match bias {
        None => Ok(None),
        Some(b) => {
            let n = b.dims1()?;
            if n != out_dim {
                return Err(Error::InvalidParams(format!(
                    "bias has {n} entries, the layer has {out_dim} outputs"
                )));
            }
            Ok(Some(b.to_dtype(DType::F32)?))
        }
    }
}

/// Q4_1 weights (llama.cpp's 32-weight blocks, `w = d * q + m`, `q` in 0..16) laid out for the
/// decode kernel: 4-bit codes `[n, k/32, 16]` and the f32 scales `d`, `m` `[n, k/32]`.
///
/// candle multiplies Q4_1 with a scalar loop; this kernel quantizes the activation rows to 8 bits
/// per 32-block (as llama.cpp's Q8_1) and uses AVX2 integer dot products, split over candle's
/// thread pool by output row. Used for calls with few rows (decode).
#[derive(Debug)]
pub struct Q41Matrix {
    qs: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
    n: usize,
    k: usize,
    /// Q8_0 blocks (`w = d * q`, `q` i8, no `m`) instead of Q4_1.
    q8: bool,
}

const QK: usize = 32;

impl Q41Matrix {
    /// Repacks a Q4_1 or Q8_0 `[n, k]` tensor; `None` for other block types.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        use candle_core::quantized::GgmlDType;
        let (block_bytes, codes) = match q.dtype() {
            GgmlDType::Q4_1 => (20usize, 16usize),
            GgmlDType::Q8_0 => (34, 32),
            _ => return Ok(None),
        };
        let (n, k) = q.shape().dims2()?;
        if k % QK != 0 {
            return Ok(None);
        }
        let nb = k / QK;
        let data = q.data()?;
        if data.len() != n * nb * block_bytes {
            return Err(Error::InvalidParams(format!(
                "{:?} tensor [{n}, {k}] holds {} bytes, expected {}",
                q.dtype(),
                data.len(),
                n * nb * block_bytes
            )));
        }
        let q8 = codes == 32;
        let mut qs = Vec::with_capacity(n * nb * codes);
        let mut d = Vec::with_capacity(n * nb);
        let mut m = Vec::with_capacity(if q8 { 0 } else { n * nb });
        for blk in data.chunks_exact(block_bytes) {
            d.push(half::f16::from_le_bytes([blk[0], blk[1]]).to_f32());
            if q8 {
                qs.extend_from_slice(&blk[2..34]);
            } else {
                m.push(half::f16::from_le_bytes([blk[2], blk[3]]).to_f32());
                qs.extend_from_slice(&blk[4..20]);
            }
        }
        Ok(Some(Self { qs, d, m, n, k, q8 }))
    }

    /// The rows of `parts` stacked in order; `None` if they differ in block type or width.
    fn concat(parts: &[Arc<Q41Matrix>]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.k != first.k || p.q8 != first.q8) {
            return None;
        }
        let mut out = Q41Matrix {
            qs: Vec::with_capacity(parts.iter().map(|p| p.qs.len()).sum()),
            d: Vec::with_capacity(parts.iter().map(|p| p.d.len()).sum()),
            m: Vec::with_capacity(parts.iter().map(|p| p.m.len()).sum()),
            n: 0,
            k: first.k,
            q8: first.q8,
        };
        for p in parts {
            out.qs.extend_from_slice(&p.qs);
            out.d.extend_from_slice(&p.d);
            out.m.extend_from_slice(&p.m);
            out.n += p.n;
        }
        Some(out)
    }

    /// `out[i, r] = sum_j x[i, j] * w[r, j]` for `x` `[rows, k]`.
    fn matmul(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let nb = k / QK;
        // Quantize the activations: i8 codes, per-block scale and scale * sum of codes.
        let mut qx = vec![0i8; rows * k];
        let mut dx = vec![0f32; rows * nb];
        let mut sx = vec![0f32; rows * nb];
        for i in 0..rows * nb {
            let src = &x[i * QK..(i + 1) * QK];
            let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (dst, &v) in qx[i * QK..(i + 1) * QK].iter_mut().zip(src) {
                let q = (v * inv).round() as i8;
                *dst = q;
                sum += q as i32;
            }
            dx[i] = d;
            sx[i] = d * sum as f32;
        }
        struct OutPtr(*mut f32);
        // SAFETY: every (row, column) of `out` is written by exactly one work item below.
        unsafe impl Sync for OutPtr {}
        let ptr = OutPtr(out.as_mut_ptr());
        let ptr = &ptr;
        let (qx, dx, sx) = (&qx, &dx, &sx);
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        #[cfg(target_arch = "x86_64")]
        let vnni = vnni512();
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            let codes = if self.q8 { QK } else { 16 };
            for r in range {
                let wq = &self.qs[r * nb * codes..(r + 1) * nb * codes];
                let wd = &self.d[r * nb..(r + 1) * nb];
                for i in 0..rows {
                    let xq = &qx[i * k..(i + 1) * k];
                    let xd = &dx[i * nb..(i + 1) * nb];
                    let v = if self.q8 {
                        #[cfg(target_arch = "x86_64")]
                        let v = if vnni {
                            // SAFETY: AVX-512 F/BW/VNNI were detected at run time.
                            unsafe { dot_q80_vnni(wq, wd, xq, xd) }
                        } else if avx2 {
                            // SAFETY: AVX2 and FMA were detected at run time.
                            unsafe { dot_q80_avx2(wq, wd, xq, xd) }
                        } else {
                            dot_q80_scalar(wq, wd, xq, xd)
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let v = dot_q80_scalar(wq, wd, xq, xd);
                        v
                    } else {
                        let wm = &self.m[r * nb..(r + 1) * nb];
                        let xs = &sx[i * nb..(i + 1) * nb];
                        #[cfg(target_arch = "x86_64")]
                        let v = if vnni {
                            // SAFETY: AVX-512 F/BW/VNNI were detected at run time.
                            unsafe { dot_q41_vnni(wq, wd, wm, xq, xd, xs) }
                        } else if avx2 {
                            // SAFETY: AVX2 and FMA were detected at run time.
                            unsafe { dot_q41_avx2(wq, wd, wm, xq, xd, xs) }
                        } else {
                            dot_q41_scalar(wq, wd, wm, xq, xd, xs)
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let v = dot_q41_scalar(wq, wd, wm, xq, xd, xs);
                        v
                    };
                    // SAFETY: i < rows, r < n: inside `out` (rows * n), written once.
                    unsafe { *ptr.0.add(i * n + r) = v };
                }
            }
        });
    }
}

fn dot_q80_scalar(wq: &[u8], wd: &[f32], xq: &[i8], xd: &[f32]) -> f32 {
    let mut acc = 0f32;
    for b in 0..wd.len() {
        let w = &wq[b * QK..(b + 1) * QK];
        let x = &xq[b * QK..(b + 1) * QK];
        let isum: i32 = w
            .iter()
            .zip(x)
            .map(|(&w, &x)| (w as i8) as i32 * x as i32)
            .sum();
        acc += wd[b] * xd[b] * isum as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q80_avx2(wq: &[u8], wd: &[f32], xq: &[i8], xd: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = wd.len();
    debug_assert!(wq.len() >= nb * QK && xq.len() >= nb * QK);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        // SAFETY: b < nb and both slices hold nb blocks of 32 bytes.
        let w = unsafe { _mm256_loadu_si256(wq.as_ptr().add(b * QK) as *const __m256i) };
        let x = unsafe { _mm256_loadu_si256(xq.as_ptr().add(b * QK) as *const __m256i) };
        // |w| * (x * sign(w)) = w * x, in the u8 x i8 form maddubs needs.
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(wd[b] * xd[b]), acc);
    }
    let hi = _mm256_extractf128_ps(acc, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

fn dot_q41_scalar(wq: &[u8], wd: &[f32], wm: &[f32], xq: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
    let mut acc = 0f32;
    for b in 0..wd.len() {
        let q = &wq[b * 16..(b + 1) * 16];
        let x = &xq[b * QK..(b + 1) * QK];
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (q[j] & 0x0F) as i32 * x[j] as i32;
            isum += (q[j] >> 4) as i32 * x[j + 16] as i32;
        }
        acc += wd[b] * xd[b] * isum as f32 + wm[b] * xs[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q41_avx2(
    wq: &[u8],
    wd: &[f32],
    wm: &[f32],
    xq: &[i8],
    xd: &[f32],
    xs: &[f32],
) -> f32 {
    use std::arch::x86_64::*;
    let nb = wd.len();
    debug_assert!(wq.len() >= nb * 16 && xq.len() >= nb * QK);
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0f32;
    for b in 0..nb {
        // SAFETY: b < nb and the slices hold nb blocks (checked by the caller's slicing).
        let raw = unsafe { _mm_loadu_si128(wq.as_ptr().add(b * 16) as *const __m128i) };
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let w = _mm256_set_m128i(hi, lo);
        let x = unsafe { _mm256_loadu_si256(xq.as_ptr().add(b * QK) as *const __m256i) };
        let p16 = _mm256_maddubs_epi16(w, x);
        let p32 = _mm256_madd_epi16(p16, ones);
        let scale = _mm256_set1_ps(wd[b] * xd[b]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc);
        acc_m += wm[b] * xs[b];
    }
    let hi = _mm256_extractf128_ps(acc, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s) + acc_m
}

/// Whether the AVX-512 VNNI kernels can run (checked once).
#[cfg(target_arch = "x86_64")]
fn vnni512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// Q8_0 x Q8 dot product, two blocks per step: `vpdpbusd` multiplies unsigned by signed bytes,
/// so `x + 128` (as u8) times `w`, less `128 * sum(w)` (one more `vpdpbusd`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_q80_vnni(wq: &[u8], wd: &[f32], xq: &[i8], xd: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = wd.len();
    assert!(wq.len() >= nb * QK && xq.len() >= nb * QK && xd.len() >= nb);
    let bias = _mm512_set1_epi8(-128i8); // 0x80: flips x's sign bit, i.e. x + 128 as u8
    let zero = _mm512_setzero_si512();
    let mut acc = _mm512_setzero_ps();
    let mut b = 0;
    while b + 1 < nb {
        // SAFETY: blocks b and b + 1 (64 bytes) lie inside both slices (asserted above).
        let (w, x) = unsafe {
            (
                _mm512_loadu_si512(wq.as_ptr().add(b * QK) as *const _),
                _mm512_loadu_si512(xq.as_ptr().add(b * QK) as *const _),
            )
        };
        let xu = _mm512_xor_si512(x, bias);
        let dp = _mm512_sub_epi32(
            _mm512_dpbusd_epi32(zero, xu, w),
            _mm512_dpbusd_epi32(zero, bias, w),
        );
        let s = _mm512_mask_blend_ps(
            0xFF00,
            _mm512_set1_ps(wd[b] * xd[b]),
            _mm512_set1_ps(wd[b + 1] * xd[b + 1]),
        );
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), s, acc);
        b += 2;
    }
    let mut tail = 0f32;
    if b < nb {
        tail = dot_q80_scalar(&wq[b * QK..], &wd[b..], &xq[b * QK..], &xd[b..]);
    }
    _mm512_reduce_add_ps(acc) + tail
}

/// Q4_1 x Q8 dot product, two blocks per step: the 32 code bytes of two blocks are spread to
/// 128-bit lanes (low nibbles, high nibbles, low, high) matching the 64 activation bytes, and one
/// `vpdpbusd` does all 64 products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_q41_vnni(
    wq: &[u8],
    wd: &[f32],
    wm: &[f32],
    xq: &[i8],
    xd: &[f32],
    xs: &[f32],
) -> f32 {
    use std::arch::x86_64::*;
    let nb = wd.len();
    assert!(
        wq.len() >= nb * 16
            && xq.len() >= nb * QK
            && wm.len() >= nb
            && xd.len() >= nb
            && xs.len() >= nb
    );
    let mask = _mm512_set1_epi8(0x0F);
    // 64-bit lanes [0, 1, 0, 1, 2, 3, 2, 3]: block b's codes twice, then block b + 1's twice.
    let spread = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0);
    // Shift the second copy of each block's codes right by 4 (its high nibbles).
    let shifts = _mm512_set_epi64(
        0x0004_0004_0004_0004,
        0x0004_0004_0004_0004,
        0,
        0,
        0x0004_0004_0004_0004,
        0x0004_0004_0004_0004,
        0,
        0,
    );
    let zero = _mm512_setzero_si512();
    let mut acc = _mm512_setzero_ps();
    let mut acc_m = 0f32;
    let mut b = 0;
    while b + 1 < nb {
        // SAFETY: blocks b and b + 1 lie inside both slices (asserted above).
        let (raw, x) = unsafe {
            (
                _mm256_loadu_si256(wq.as_ptr().add(b * 16) as *const __m256i),
                _mm512_loadu_si512(xq.as_ptr().add(b * QK) as *const _),
            )
        };
        let dup = _mm512_permutexvar_epi64(spread, _mm512_castsi256_si512(raw));
        let w = _mm512_and_si512(_mm512_srlv_epi16(dup, shifts), mask);
        let dp = _mm512_dpbusd_epi32(zero, w, x);
        let s = _mm512_mask_blend_ps(
            0xFF00,
            _mm512_set1_ps(wd[b] * xd[b]),
            _mm512_set1_ps(wd[b + 1] * xd[b + 1]),
        );
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), s, acc);
        acc_m += wm[b] * xs[b] + wm[b + 1] * xs[b + 1];
        b += 2;
    }
    let mut tail = 0f32;
    if b < nb {
        tail = dot_q41_scalar(
            &wq[b * 16..],
            &wd[b..],
            &wm[b..],
            &xq[b * QK..],
            &xd[b..],
            &xs[b..],
        );
    }
    _mm512_reduce_add_ps(acc) + acc_m + tail
}

impl candle_core::CustomOp1 for Q41Matrix {
    fn name(&self) -> &'static str {
        "attune-decode-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("q4_1 matmul: input is not contiguous");
        };
        let x = match storage {
            candle_core::CpuStorage::F32(v) => &v[start..end],
            _ => candle_core::bail!("q4_1 matmul: input must be f32"),
        };
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("q4_1 matmul: input {dims:?} does not end in {}", self.k);
        }
        let rows = x.len() / self.k;
        let mut out = vec![0f32; rows * self.n];
        self.matmul(x, rows, &mut out);
        let mut od = dims.to_vec();
        if let Some(l) = od.last_mut() {
            *l = self.n;
        }
        Ok((candle_core::CpuStorage::F32(out), od.into()))
    }
}

/// Inverted dropout with a mask drawn from `seed` (SplitMix64), so the same seed gives the same
/// mask on every run.
fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::InvalidParams(format!(
            "dropout {p} is not in [0, 1)"
        )));
    }
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p);
    let mut state = seed;
    let mask: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32;
            if u < p {
                0.0
            } else {
                keep
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    Ok((x * mask)?)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod kernel_tests {
    use super::*;

    /// Deterministic bytes, so the kernels see every code and sign.
    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn vnni_kernels_equal_the_scalar_ones_with_and_without_a_tail_block() {
        if !vnni512() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        for nb in [1usize, 2, 5, 18] {
            let xq: Vec<i8> = bytes(nb * QK, 7).into_iter().map(|b| b as i8).collect();
            let xd: Vec<f32> = (0..nb).map(|i| 0.01 + i as f32 * 0.003).collect();
            let xs: Vec<f32> = (0..nb).map(|i| 0.5 - i as f32 * 0.07).collect();
            let wd: Vec<f32> = (0..nb).map(|i| 0.02 + i as f32 * 0.001).collect();
            let wm: Vec<f32> = (0..nb).map(|i| -0.1 + i as f32 * 0.01).collect();
            let w4 = bytes(nb * 16, 11);
            let w8 = bytes(nb * QK, 13);
            // SAFETY: vnni512() checked the CPU features.
            let (a4, a8) = unsafe {
                (
                    dot_q41_vnni(&w4, &wd, &wm, &xq, &xd, &xs),
                    dot_q80_vnni(&w8, &wd, &xq, &xd),
                )
            };
            let b4 = dot_q41_scalar(&w4, &wd, &wm, &xq, &xd, &xs);
            let b8 = dot_q80_scalar(&w8, &wd, &xq, &xd);
            assert!(
                (a4 - b4).abs() <= 1e-4 * b4.abs().max(1.0),
                "q4_1 nb {nb}: {a4} vs {b4}"
            );
            assert!(
                (a8 - b8).abs() <= 1e-4 * b8.abs().max(1.0),
                "q8_0 nb {nb}: {a8} vs {b8}"
            );
        }
    }
}
