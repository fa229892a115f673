//! Linear layers that carry both weight forms and an optional LoRA branch.
//!
//! A [`Linear`] holds a dense f32 weight `[out, in]`, a quantized [`QTensor`] (GGUF), or both.
//! Decode multiplies a handful of rows and is memory-bound, so it reads the quantized weights;
//! prompt processing multiplies many rows and is compute-bound, so it uses the f32 copy.
//! [`ComputeMode`] picks between them per call. A LoRA branch `y = Wx + b + scale * B(A x)`
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
    /// `alpha / r`.
    pub scale: f64,
}

/// A linear layer `y = x W^T (+ bias) (+ LoRA)`.
#[derive(Debug, Clone)]
pub struct Linear {
    in_dim: usize,
    out_dim: usize,
    weight: Option<Tensor>,
    qweight: Option<Arc<QTensor>>,
    bias: Option<Tensor>,
    lora: Option<LoraBranch>,
    mode: ComputeMode,
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
        })
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
            (Some(w), _) => Ok(w.clone()),
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
        });
        Ok(())
    }

    /// Removes the LoRA branch and returns it.
    pub fn detach_lora(&mut self) -> Option<LoraBranch> {
        self.lora.take()
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
        let x2 = x.reshape((rows, self.in_dim))?;
        let use_q = match (&self.weight, &self.qweight) {
            (None, Some(_)) => true,
            (Some(_), None) => false,
            (None, None) => return Err(Error::InvalidParams("linear layer has no weights".into())),
            (Some(_), Some(_)) => match self.mode {
                ComputeMode::F32 => false,
                ComputeMode::Quantized => !x2.track_op(),
                ComputeMode::Auto => rows <= AUTO_QUANTIZED_MAX_ROWS && !x2.track_op(),
            },
        };
        let mut y = match (use_q, &self.weight, &self.qweight) {
            (true, _, Some(q)) => x2.contiguous()?.apply_op1_no_bwd(q.as_ref())?,
            (_, Some(w), _) => x2.matmul(&w.t()?)?,
            _ => return Err(Error::InvalidParams("linear layer has no weights".into())),
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let ax = x2.matmul(&l.a.t()?)?;
            let bax = ax.matmul(&l.b.t()?)?;
            y = (y + (bax * l.scale)?)?;
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_dim);
        Ok(y.reshape(out_dims)?)
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
