//! Linear layers that carry both weight forms and an optional LoRA branch.
//!
//! A [`Linear`] holds a dense f32 weight `[out, in]`, a quantized [`QTensor`] (GGUF), or both.
//! Decode multiplies a handful of rows and is memory-bound, so it reads the quantized weights;
//! prompt processing multiplies many rows and is compute-bound, so it uses the f32 copy.
//! [`ComputeMode`] picks between them per call. For Q4_1, Q8_0 and K-quant (Q4_K, Q5_K, Q6_K)
//! weights the few-row product
//! runs on [`Q41Matrix`], the integer decode kernel in [`crate::kernels::quant`] (candle's Q4_1
//! kernel is scalar). A LoRA branch `y = Wx + b + scale * B(A x)` can be attached from plain tensors or from `candle_nn::Var`s (their tensors), so a trainer can
//! put PEFT-named variables here and get gradients through them.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor, TensorId};

use crate::kernels::amx::{self, PackedWeight};
use crate::kernels::block::ProjWeight;
use crate::kernels::decode::LoraBf16;
use crate::kernels::int8::{self, I8Pair, I8Weight};
use crate::kernels::linear::Frozen;
use crate::kernels::prompt::PromptWeight;
use crate::kernels::quant::Q41Matrix;
use crate::kernels::stream::{Bf16Matrix, Streamed};
use crate::{Error, Result};

/// Which weight form the matrix products use.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ComputeMode {
    /// Quantized weights for calls with few rows (decode); for many rows (prompts), bf16 on the
    /// CPU's matrix units where it has them ([`Linear::pack_bf16`]), else f32.
    #[default]
    Auto,
    /// As `Auto`, but many-row products stay f32: scoring that must match the f32 figures
    /// exactly while decoding on the quantized weights (evaluation with label accuracy).
    AutoF32,
    /// f32 everywhere (dequantized once at load). The correctness tests use this.
    F32,
    /// Quantized weights everywhere (no f32 copy kept: smallest memory).
    Quantized,
}

/// How the frozen base's projections are held while LoRA or prompt tuning trains on it (and
/// while the adapted model answers): the memory a run takes against its speed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseForm {
    /// Four bytes per weight: an f32 copy, or where the CPU has AMX, bf16 packed for the matrix
    /// units in both orientations (the forward product and the input gradient). The fastest.
    #[default]
    F32,
    /// bf16 values, two bytes per weight, expanded panel by panel inside each product.
    Bf16,
    /// The GGUF blocks themselves (about 0.6 bytes per weight for Q4_K, 0.75 for Q4_1),
    /// expanded panel by panel inside each product; a projection whose block type has no
    /// kernel here (Q4_0, Q5_0, F16, a Hugging Face folder's f32) is held in bf16.
    Quantized,
}

impl BaseForm {
    pub const ALL: [BaseForm; 3] = [BaseForm::F32, BaseForm::Bf16, BaseForm::Quantized];

    /// The name the command line and the window use.
    pub fn as_str(self) -> &'static str {
        match self {
            BaseForm::F32 => "f32",
            BaseForm::Bf16 => "bf16",
            BaseForm::Quantized => "quantized",
        }
    }

    /// Parses [`Self::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// In [`ComputeMode::Auto`] and `AutoF32`, calls with at most this many rows use the quantized
/// weights.
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
    /// The decode op's bf16 copy of `a` and `b` ([`DecodeCopy`]).
    decode: DecodeCopy,
}

/// The bf16 copy of a branch's matrices that decode reads ([`crate::kernels::LoraBf16`]: half
/// the bytes, and decode is bound by memory). Built on the first decode call and used while the
/// branch holds the very tensors it was built from (compared by id: a branch given new `a` or
/// `b` builds a new copy). Only untracked tensors take the decode op, and candle's tensors are
/// immutable unless they are a `Var` (which tracks), so the copy cannot go stale. Clones of the
/// branch share it.
#[derive(Clone, Default)]
struct DecodeCopy(Arc<DecodeSlot>);

type DecodeSlot = std::sync::Mutex<Option<(TensorId, TensorId, Option<Arc<LoraBf16>>)>>;

impl std::fmt::Debug for DecodeCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DecodeCopy")
    }
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
    /// The weight in bf16, packed for the CPU's matrix units (see [`Linear::pack_bf16`]).
    packed: Option<Arc<PackedWeight>>,
    /// The frozen weight kept compact (a quantized or bf16 base, [`Linear::set_base_form`]),
    /// expanded panel by panel by the many-row products.
    streamed: Option<Arc<Streamed>>,
    /// `Auto`'s dense weight in i8 for the int8 prompt products on a CPU without AMX (see
    /// [`Linear::int8_weight`]), made on the first prompt.
    int8: Int8Slot,
    /// The frozen weight in i8 in both orientations for training on it without AMX
    /// ([`Linear::pack_int8`]); its forward orientation also fills `int8`.
    int8_pair: Option<Arc<I8Pair>>,
}

/// The i8 copy of a layer's dense weight, made once and shared by the layer's clones. A layer
/// given another weight or mode takes a fresh slot.
#[derive(Clone, Default)]
struct Int8Slot(Arc<std::sync::OnceLock<Arc<I8Weight>>>);

impl std::fmt::Debug for Int8Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Int8Slot(made)"
        } else {
            "Int8Slot"
        })
    }
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
            packed: None,
            streamed: None,
            int8: Int8Slot::default(),
            int8_pair: None,
        })
    }

    /// A layer over quantized weights `[out, in]`. With `mode` other than `Quantized`, an f32
    /// copy is dequantized now for the many-row path.
    pub fn from_qtensor(q: Arc<QTensor>, bias: Option<Tensor>, mode: ComputeMode) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let bias = check_bias(bias, out_dim)?;
        let weight = match mode {
            ComputeMode::Quantized => None,
            ComputeMode::Auto | ComputeMode::AutoF32 | ComputeMode::F32 => {
                Some(q.dequantize(&q.device())?)
            }
        };
        let qweight = match mode {
            ComputeMode::F32 => None,
            ComputeMode::Auto | ComputeMode::AutoF32 | ComputeMode::Quantized => Some(q),
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
            packed: None,
            streamed: None,
            int8: Int8Slot::default(),
            int8_pair: None,
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
            packed: None,
            streamed: None,
            int8: Int8Slot::default(),
            int8_pair: None,
        })
    }

    /// Uses Attune's decode kernel for quantized calls when the quantized weight is Q4_1, Q8_0,
    /// Q4_K, Q5_K or Q6_K.
    pub fn with_decode_kernel(mut self) -> Result<Self> {
        if let Some(q) = &self.qweight {
            self.q41 = Q41Matrix::from_qtensor(q)?.map(Arc::new);
        }
        Ok(self)
    }

    /// Whether few-row calls on the quantized weights run on Attune's decode kernel.
    pub fn has_decode_kernel(&self) -> bool {
        self.q41.is_some()
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
        let dims = (self.out_dim, self.in_dim);
        let cpu = &candle_core::Device::Cpu;
        match (&self.weight, &self.qweight, &self.packed, &self.streamed) {
            (Some(w), _, _, _) => Ok(w.contiguous()?),
            (None, Some(q), _, _) => Ok(q.dequantize(&q.device())?),
            (None, None, Some(p), _) => Ok(Tensor::from_vec(p.to_f32(), dims, cpu)?),
            (None, None, None, Some(s)) => Ok(Tensor::from_vec(s.to_f32(), dims, cpu)?),
            (None, None, None, None) => {
                Err(Error::InvalidParams("linear layer has no weights".into()))
            }
        }
    }

    /// Holds the frozen weight in `form` (see [`BaseForm`]): `Quantized` keeps only the decode
    /// kernel's blocks, or bf16 values where there is no kernel; `Bf16` bf16 values beside the
    /// decode kernel's blocks (few-row products still read them); both drop every dense copy
    /// and the quantized tensor the kernel's blocks were made from. `F32` goes back to the dense
    /// copy of the layer's mode. A layer being trained (full fine-tuning) or off the CPU is left
    /// as it is.
    pub fn set_base_form(&mut self, form: BaseForm) -> Result<()> {
        if self.weight.as_ref().is_some_and(|w| w.track_op()) || !self.device().is_cpu() {
            return Ok(());
        }
        if form == BaseForm::F32 {
            if self.streamed.is_some() {
                if self.weight.is_none() && self.qweight.is_none() {
                    self.weight = Some(self.weight_f32()?);
                }
                self.streamed = None;
                let mode = self.mode;
                self.mode = ComputeMode::F32;
                self.set_mode(mode)?;
                if mode == ComputeMode::Auto {
                    self.pack_bf16(true)?;
                }
            }
            return Ok(());
        }
        let streamed = match (&self.q41, form) {
            (Some(k), BaseForm::Quantized) => Arc::new(Streamed::Quant(k.clone())),
            // bf16 values: kept if the layer holds them already, else from its exact values.
            _ => match &self.streamed {
                Some(s) if matches!(s.as_ref(), Streamed::Bf16(_)) => s.clone(),
                _ => {
                    let w = self.weight_f32()?.flatten_all()?.to_vec1::<f32>()?;
                    Arc::new(Streamed::Bf16(Bf16Matrix::from_f32(
                        &w,
                        self.out_dim,
                        self.in_dim,
                    )))
                }
            },
        };
        self.streamed = Some(streamed);
        self.finish_base_form()
    }

    /// Drops every copy the compact form replaces.
    fn finish_base_form(&mut self) -> Result<()> {
        self.weight = None;
        self.packed = None;
        self.int8 = Int8Slot::default();
        self.int8_pair = None;
        // The decode kernel's blocks serve few-row products; the tensor they came from is not
        // needed beside them.
        if self.q41.is_some() {
            self.qweight = None;
        }
        // Few rows decode on the blocks; many rows expand the compact form.
        if matches!(self.mode, ComputeMode::F32 | ComputeMode::Quantized) {
            self.mode = ComputeMode::Auto;
        }
        Ok(())
    }

    /// How the weight is held: `Quantized`/`Bf16` when it is kept compact, else `F32`.
    pub fn base_form(&self) -> BaseForm {
        match self.streamed.as_deref() {
            Some(Streamed::Quant(_)) => BaseForm::Quantized,
            Some(Streamed::Bf16(_)) => BaseForm::Bf16,
            None => BaseForm::F32,
        }
    }

    /// Bytes the layer's weights hold in memory (every form it keeps).
    pub fn held_bytes(&self) -> usize {
        self.weight.as_ref().map_or(0, |w| w.elem_count() * 4)
            + self
                .qweight
                .as_ref()
                .map_or(0, |q| q.storage_size_in_bytes())
            + self.q41.as_ref().map_or(0, |k| k.bytes())
            + self.packed.as_ref().map_or(0, |p| p.bytes())
            + match &self.int8_pair {
                Some(p) => p.bytes(),
                None => self.int8.0.get().map_or(0, |w| w.bytes()),
            }
            + self.streamed.as_ref().map_or(0, |s| match s.as_ref() {
                // The blocks are the decode kernel's own, counted above.
                Streamed::Quant(_) => 0,
                Streamed::Bf16(_) => s.bytes(),
            })
    }
    /// The bf16 copy packed for the matrix units, when one is kept.
    pub fn packed(&self) -> Option<&Arc<PackedWeight>> {
        self.packed.as_ref()
    }

    /// Keeps the weight as bf16 packed for the CPU's matrix units (AMX), which then serves every
    /// many-row product of a frozen weight: prompt processing, and the forward pass and input
    /// gradient of training's frozen base. With `drop_f32`, the f32 copy is dropped when a
    /// quantized copy can restore it (a GGUF layer: half the memory); a weight being trained is
    /// never packed. A no-op returning `false` where the matrix units are missing or
    /// `ATTUNE_MATMUL=f32`, in `F32` and `Quantized` modes, or for a trained weight.
    pub fn pack_bf16(&mut self, drop_f32: bool) -> Result<bool> {
        if self.packed.is_some() {
            return Ok(true);
        }
        if self.streamed.is_some() {
            return Ok(false);
        }
        let trained = self.weight.as_ref().is_some_and(|w| w.track_op());
        if self.mode != ComputeMode::Auto || trained || !amx::available() || !self.device().is_cpu()
        {
            return Ok(false);
        }
        let w = self.weight_f32()?.flatten_all()?.to_vec1::<f32>()?;
        self.packed = Some(Arc::new(PackedWeight::new(&w, self.out_dim, self.in_dim)));
        if drop_f32 && self.qweight.is_some() {
            self.weight = None;
        }
        Ok(true)
    }

    /// A layer built with its packed bf16 weight (the loader packs from its own f32 values).
    pub fn with_packed(mut self, packed: Arc<PackedWeight>) -> Result<Self> {
        if (packed.out_dim(), packed.in_dim()) != (self.out_dim, self.in_dim) {
            return Err(Error::InvalidParams(format!(
                "packed weight [{}, {}] does not match layer [{}, {}]",
                packed.out_dim(),
                packed.in_dim(),
                self.out_dim,
                self.in_dim
            )));
        }
        self.packed = Some(packed);
        Ok(self)
    }

    /// Whether this layer's frozen products may run in int8 (see [`Linear::int8_weight`]): never
    /// where the CPU has AMX (bf16 on the tiles is the faster and closer path there).
    fn int8_eligible(&self) -> bool {
        self.mode == ComputeMode::Auto
            && self.packed.is_none()
            && self.streamed.is_none()
            && self.q41.is_some()
            && int8::available()
            && !amx::available()
    }

    /// Runs `make` on the dense weight an i8 copy is made from (untracked, on the CPU, read in
    /// place): its values, `out`, `in` and strides. `None` without such a weight.
    fn make_from_int8_source<T>(
        &self,
        make: impl FnOnce(&[f32], usize, usize, (usize, usize)) -> T,
    ) -> Option<T> {
        let w = self.weight.as_ref().filter(|w| {
            !w.track_op() && w.device().is_cpu() && crate::kernels::linear::f32_in_place(w)
        })?;
        let (out, inp) = (self.out_dim, self.in_dim);
        Frozen::F32(w.clone())
            .with_ref(|r| match r {
                crate::kernels::linear::WRef::F32(v, strides) => {
                    Ok(Some(make(v, out, inp, strides)))
                }
                _ => Ok(None),
            })
            .ok()
            .flatten()
    }

    /// Keeps the frozen weight in i8 in both orientations ([`I8Pair`]) for training on it (LoRA,
    /// soft prompts) on a CPU with VNNI and no AMX: the forward product and the input gradient
    /// then run as int8 products, and so do prompts. Where the layer keeps its quantized blocks
    /// the f32 copy is dropped (`weight_f32` dequantizes them again). `false`, a no-op, unless
    /// [`Linear::int8_weight`] would give a weight here (`Auto` mode, a GGUF-quantized weight,
    /// not trained, nothing packed or compact).
    pub fn pack_int8(&mut self) -> Result<bool> {
        if self.int8_pair.is_some() {
            return Ok(true);
        }
        if !self.int8_eligible() {
            return Ok(false);
        }
        let Some(pair) =
            self.make_from_int8_source(|v, o, i, st| Arc::new(I8Pair::new(v, o, i, st)))
        else {
            return Ok(false);
        };
        let slot = Int8Slot::default();
        let _ = slot.0.set(pair.fwd().clone());
        self.int8 = slot;
        self.int8_pair = Some(pair);
        if self.qweight.is_some() {
            self.weight = None;
        }
        Ok(true)
    }

    /// The frozen weight the training kernels take: the packed bf16 copy, the compact base, the
    /// i8 pair, else a contiguous f32 weight that is not being trained.
    pub(crate) fn frozen(&self) -> Option<Frozen> {
        if let Some(p) = &self.packed {
            return Some(Frozen::Bf16(p.clone()));
        }
        if let Some(q) = &self.int8_pair {
            return Some(Frozen::Int8(q.clone()));
        }
        if let Some(s) = &self.streamed {
            return Some(Frozen::Streamed(s.clone()));
        }
        self.weight
            .as_ref()
            .filter(|w| !w.track_op() && w.is_contiguous())
            .map(|w| Frozen::F32(w.clone()))
    }

    /// The weight as the fused layer takes it: packed bf16 (frozen), else a contiguous f32
    /// weight (frozen or trained) or a frozen one held transposed (`Auto`'s f32 copy on a CPU
    /// without matrix units, read in place); `None` with a bias or in quantized mode.
    pub fn fused_weight(&self) -> Option<ProjWeight<'_>> {
        if self.bias.is_some() || self.mode == ComputeMode::Quantized {
            return None;
        }
        if let Some(p) = &self.packed {
            return Some(ProjWeight::Bf16(p));
        }
        if let Some(s) = &self.streamed {
            return Some(ProjWeight::Streamed(s));
        }
        if let Some(q) = &self.int8_pair {
            return Some(ProjWeight::Int8(q));
        }
        let mixed = self.bf16_compute();
        let int8 = self.int8_compute();
        self.weight
            .as_ref()
            .filter(|w| {
                w.is_contiguous() || (!w.track_op() && crate::kernels::linear::f32_in_place(w))
            })
            .map(|w| match (mixed, int8, w.track_op()) {
                (true, _, true) => ProjWeight::Mixed(w),
                (_, true, true) => ProjWeight::MixedInt8(w),
                _ => ProjWeight::F32(w),
            })
    }

    /// Whether products on this layer's f32 weight run in bf16 on the matrix units: `Auto`
    /// mode on a CPU that has them (a trained weight then keeps its f32 master copy).
    pub fn bf16_compute(&self) -> bool {
        self.mode == ComputeMode::Auto && amx::available()
    }

    /// Whether products on this layer's trained f32 weight run in int8 (full fine-tuning on a
    /// CPU with AVX-512 VNNI and no AMX, [`crate::kernels::int8`]): `Auto` mode there (the
    /// trained weight keeps its f32 master copy and its f32 gradient).
    pub fn int8_compute(&self) -> bool {
        self.mode == ComputeMode::Auto && !amx::available() && int8::available()
    }

    /// Whether a prompt's (many-row) products on this frozen layer run in bf16: `Auto` mode
    /// with a bf16 copy packed for the matrix units or a compact base expanded panel by panel.
    /// The attention beside it then runs in bf16 too ([`crate::kernels::cached_attention_bf16`]).
    pub fn prompts_in_bf16(&self) -> bool {
        self.mode == ComputeMode::Auto && (self.packed.is_some() || self.streamed.is_some())
    }

    /// The i8 copy the many-row products of a frozen weight take on a CPU with AVX-512 VNNI and
    /// no AMX ([`crate::kernels::int8`]): `Auto` mode with only the dense f32 copy for them (no
    /// packed bf16, no compact base), on the CPU, not being trained, for a weight the file holds
    /// in 8 bits or fewer (GGUF blocks the decode kernel reads: Q4_1, Q8_0, Q4_K, Q5_K, Q6_K),
    /// where rounding to 8 bits per 32 adds little to the file's own rounding; a bf16, f16 or
    /// f32 weight keeps its f32 products. Made from the f32 weight on the first call (about
    /// 1 ms per million weights on two cores); `None` otherwise, or with `ATTUNE_MATMUL=f32`.
    /// `AutoF32` keeps f32 (its scores must match f32's).
    pub fn int8_weight(&self) -> Option<Arc<I8Weight>> {
        if !self.int8_eligible() {
            return None;
        }
        if let Some(q) = self.int8.0.get() {
            return Some(q.clone());
        }
        let built =
            self.make_from_int8_source(|v, o, i, st| Arc::new(I8Weight::new(v, o, i, st)))?;
        Some(self.int8.0.get_or_init(|| built).clone())
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
        // The quantized and bf16 copies no longer match: drop them so no path reads stale weights.
        self.qweight = None;
        self.q41 = None;
        self.packed = None;
        self.streamed = None;
        self.int8 = Int8Slot::default();
        self.int8_pair = None;
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
        // Onto the layer's device (a no-op, sharing the tensor, when it is there already, so a
        // `Var`'s tensor stays the variable).
        let device = self.device();
        self.lora = Some(LoraBranch {
            a: a.to_dtype(DType::F32)?.to_device(&device)?,
            b: b.to_dtype(DType::F32)?.to_device(&device)?,
            scale,
            dropout: 0.0,
            dropout_seed: None,
            decode: DecodeCopy::default(),
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
        if mode == ComputeMode::Auto
            && self.mode == ComputeMode::Auto
            && (self.packed.is_some() || self.int8_pair.is_some())
        {
            return Ok(());
        }
        // A compact base serves every mode but `F32` as it is (its products expand it).
        if self.streamed.is_some() && mode != ComputeMode::F32 {
            self.mode = mode;
            return Ok(());
        }
        if mode != ComputeMode::Quantized && self.weight.is_none() {
            self.weight = Some(self.weight_f32()?);
        }
        self.streamed = None;
        // The bf16 copy serves `Auto` only; [`Linear::pack_bf16`] makes it again. So does the
        // i8 copy ([`Linear::int8_weight`]).
        self.packed = None;
        self.int8 = Int8Slot::default();
        self.int8_pair = None;
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
        if self.mode != ComputeMode::Quantized {
            let trained = self
                .weight
                .as_ref()
                .filter(|w| w.track_op() && w.is_contiguous());
            let frozen = self.frozen();
            let y = match (&self.lora, trained, &frozen) {
                (Some(l), None, Some(fw)) => {
                    let no_dropout = l.dropout == 0.0 || l.dropout_seed.is_none();
                    let training = x.track_op() || l.a.track_op() || l.b.track_op();
                    (training && no_dropout).then(|| {
                        // A LoRA branch on a frozen base: one fused op, no weight gradient.
                        crate::kernels::lora_linear(x, fw, &l.a, &l.b, l.scale as f32)
                    })
                }
                (None, Some(w), _) => Some(crate::kernels::linear(x, w)),
                // A frozen weight under a tracked input (LoRA elsewhere, prompt tuning).
                (None, None, Some(fw)) if x.track_op() => {
                    Some(crate::kernels::frozen_linear(x, fw))
                }
                _ => None,
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

    /// What a one-row decode call on `x2` (`[rows, any]`) computes when it is the decode
    /// kernel's product plus, if the layer has a LoRA branch, the branch on its bf16 copy
    /// (`finish`'s decode path): the kernel's matrix and the branch with its scale. `None` for
    /// any other call (a bias, a tracked or dropped-out branch, no bf16 copy, the f32 path): a
    /// fused decode layer then leaves the layer to run op by op (it checks the widths).
    pub(crate) fn decode_parts(&self, x2: &Tensor) -> Result<Option<DecodeParts<'_>>> {
        // A trained weight (tracked) takes `forward`'s f32 path, not the kernel.
        if self.bias.is_some() || self.weight.as_ref().is_some_and(|w| w.track_op()) {
            return Ok(None);
        }
        let Some(k) = &self.q41 else {
            return Ok(None);
        };
        if !self.uses_quantized(x2)? || x2.dim(0)? > AUTO_QUANTIZED_MAX_ROWS {
            return Ok(None);
        }
        let Some(l) = &self.lora else {
            return Ok(Some((k, None)));
        };
        let tracked = x2.track_op() || l.a.track_op() || l.b.track_op();
        let dropout_on = l.dropout > 0.0 && l.dropout_seed.is_some();
        if tracked || dropout_on {
            return Ok(None);
        }
        Ok(l.decode_copy()?.map(|w| (k, Some((w, l.scale as f32)))))
    }

    /// The frozen weight a prompt's call on `x2` (`[rows, any]`) multiplies when that call is
    /// [`crate::kernels::frozen_linear`] on the packed bf16 copy or the compact base alone, or,
    /// on a CPU without matrix units, the int8 product on `Auto`'s i8 copy (VNNI) or the f32
    /// GEMM on its dense copy (no bias, no LoRA, not the quantized or the f32-expanded path, an
    /// untracked input and weight): what a fused prompt layer may run in its place. `None`
    /// otherwise.
    pub(crate) fn prompt_weight(&self, x2: &Tensor) -> Result<Option<PromptWeight>> {
        if self.bias.is_some()
            || self.lora.is_some()
            || x2.track_op()
            || self.mode == ComputeMode::Quantized
            || self.weight.as_ref().is_some_and(|w| w.track_op())
            || self.uses_quantized(x2)?
        {
            return Ok(None);
        }
        if let Some(q) = self.int8_weight() {
            // `base_product`'s int8 op.
            return Ok(Some(PromptWeight::Int8(q)));
        }
        if self.packed.is_none() && self.streamed.is_none() {
            // No matrix units: `Auto`'s dense f32 copy (held transposed), which the unfused
            // layer multiplies with the same GEMM call (`x2.matmul(&w.t())`).
            return Ok(match (&self.weight, self.mode) {
                (Some(w), ComputeMode::Auto | ComputeMode::AutoF32) if w.rank() == 2 => {
                    Some(PromptWeight::Frozen(Frozen::F32(w.clone())))
                }
                _ => None,
            });
        }
        if self.mode == ComputeMode::AutoF32 && self.packed.is_none() {
            return Ok(None);
        }
        Ok(self.frozen().map(PromptWeight::Frozen))
    }

    /// Whether a call on `x2` `[rows, in]` reads the quantized weights.
    fn uses_quantized(&self, x2: &Tensor) -> Result<bool> {
        let rows = x2.dim(0)?;
        let dense = self.weight.is_some()
            || self.packed.is_some()
            || self.streamed.is_some()
            || self.int8_pair.is_some();
        let quant = self.qweight.is_some() || self.q41.is_some();
        Ok(match (dense, quant) {
            (false, true) => true,
            (true, false) => false,
            (false, false) => {
                return Err(Error::InvalidParams("linear layer has no weights".into()))
            }
            (true, true) => match self.mode {
                ComputeMode::F32 => false,
                ComputeMode::Quantized => !x2.track_op(),
                ComputeMode::Auto | ComputeMode::AutoF32 => {
                    rows <= AUTO_QUANTIZED_MAX_ROWS && !x2.track_op()
                }
            },
        })
    }

    /// `x2 W^T` `[rows, out]`, without bias or LoRA.
    fn base_product(&self, x2: &Tensor) -> Result<Tensor> {
        let use_q = self.uses_quantized(x2)?;
        // A prompt on `Auto`'s dense copy without matrix units: the int8 product where the CPU
        // has VNNI.
        if !use_q && !x2.track_op() {
            if let Some(q) = self.int8_weight() {
                return Ok(x2.contiguous()?.apply_op1_no_bwd(q.as_ref())?);
            }
        }
        Ok(match (use_q, &self.weight, &self.qweight) {
            (true, _, _) if self.q41.is_some() => match &self.q41 {
                Some(k) => x2.contiguous()?.apply_op1_no_bwd(k.as_ref())?,
                None => return Err(Error::InvalidParams("decode kernel missing".into())),
            },
            (true, _, Some(q)) => x2.contiguous()?.apply_op1_no_bwd(q.as_ref())?,
            // Scoring that must match f32 (`AutoF32`, and a compact LM head, which the dense
            // model multiplies in f32 outside training): the compact base expanded to f32.
            (false, _, _)
                if self.mode == ComputeMode::AutoF32
                    && self.packed.is_none()
                    && !x2.track_op()
                    && self.streamed.is_some() =>
            {
                match &self.streamed {
                    Some(s) => {
                        let rows = x2.dim(0)?;
                        let x = x2.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                        let mut y = vec![0f32; rows * self.out_dim];
                        s.forward(&x, None, rows, &mut y, false);
                        Tensor::from_vec(y, (rows, self.out_dim), x2.device())?
                    }
                    None => return Err(Error::InvalidParams("compact weight missing".into())),
                }
            }
            // The bf16 copy on the matrix units, or the compact base expanded panel by panel
            // (prompts; a frozen base under a tracked input).
            (false, _, _)
                if self.packed.is_some() || self.streamed.is_some() || self.int8_pair.is_some() =>
            {
                match self.frozen() {
                    Some(fw) => crate::kernels::frozen_linear(x2, &fw)?,
                    None => return Err(Error::InvalidParams("packed weight missing".into())),
                }
            }
            // A frozen weight under a tracked input (LoRA, prompt tuning): no weight gradient.
            (_, Some(w), _) if x2.track_op() && !w.track_op() && w.is_contiguous() => {
                crate::kernels::frozen_linear(x2, &Frozen::F32(w.clone()))?
            }
            // A weight being trained (full fine-tuning): dW straight into its layout.
            (_, Some(w), _) if w.track_op() && w.is_contiguous() => crate::kernels::linear(x2, w)?,
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
                // Decode: the branch in one op (dispatch, not arithmetic, is the cost here). On
                // the branch's bf16 copy where the base product took the quantized kernel, whose
                // 8-bit activations round far more than bf16 weights on the branch do; an f32
                // base keeps the f32 branch, so its decode still equals the full forward.
                let bf16 = if self.uses_quantized(x2)? {
                    l.decode_copy()?
                } else {
                    None
                };
                let y = match bf16 {
                    Some(w) => crate::kernels::lora_add_bf16(&y, x2, &w, l.scale as f32)?,
                    None => crate::kernels::lora_add(&y, x2, &l.a, &l.b, l.scale as f32)?,
                };
                let mut out_dims = lead.to_vec();
                out_dims.push(self.out_dim);
                return Ok(y.reshape(out_dims)?);
            }
            y = (y + l.branch(x2)?)?;
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_dim);
        Ok(y.reshape(out_dims)?)
    }

    /// The device the layer's weights live on.
    pub fn device(&self) -> candle_core::Device {
        match (&self.weight, &self.qweight) {
            (Some(w), _) => w.device().clone(),
            (None, Some(q)) => q.device(),
            // Only the packed bf16 copy: a CPU structure.
            (None, None) => candle_core::Device::Cpu,
        }
    }

    /// `x` `[..., in]` -> `[..., out]` through candle's own ops only (matmul, add; candle's
    /// quantized matmul for a quantized-only layer under an untracked input), on whatever device
    /// the weights are: the path of a model that is not on the CPU, and of the CPU model when
    /// [`crate::llama::Llama::set_portable`] asks for it. Differentiable in every tracked tensor.
    pub fn forward_portable(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, lead) = self.flatten_input(x)?;
        let mut y = match (&self.weight, &self.qweight) {
            (Some(w), _) => x2.matmul(&w.t()?)?,
            (None, Some(q)) if !x2.track_op() => x2.contiguous()?.apply_op1_no_bwd(q.as_ref())?,
            _ => x2.matmul(&self.weight_f32()?.t()?)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            y = (y + l.branch(&x2)?)?;
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_dim);
        Ok(y.reshape(out_dims)?)
    }

    /// This layer on `device` for the portable path: the dense weight in f32 (a quantized
    /// weight dequantized; no packed or decode-kernel copies, which are CPU structures), bias
    /// and LoRA branch moved, [`ComputeMode::F32`]. Tensors already on `device` are shared.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        let w = self.weight_f32()?.to_device(device)?;
        let bias = match &self.bias {
            Some(b) => Some(b.to_device(device)?),
            None => None,
        };
        let mut out = Linear::from_parts(Some(w), None, bias, ComputeMode::F32)?;
        if let Some(l) = &self.lora {
            out.lora = Some(LoraBranch {
                a: l.a.to_device(device)?,
                b: l.b.to_device(device)?,
                decode: DecodeCopy::default(),
                ..l.clone()
            });
        }
        Ok(out)
    }
}

impl LoraBranch {
    /// The bf16 copy decode reads ([`DecodeCopy`]), built on first use; `None` off the CPU or
    /// where the CPU has no vector path for it.
    fn decode_copy(&self) -> Result<Option<Arc<LoraBf16>>> {
        if !self.a.device().is_cpu() {
            return Ok(None);
        }
        let ids = (self.a.id(), self.b.id());
        let mut slot = self.decode.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some((a, b, w)) if (*a, *b) == ids => Ok(w.clone()),
            _ => {
                let w = LoraBf16::new(&self.a, &self.b)?.map(Arc::new);
                *slot = Some((ids.0, ids.1, w.clone()));
                Ok(w)
            }
        }
    }

    /// `scale * B (A x)` for `x2` `[rows, in]` (with the step's dropout on `x2` while training),
    /// from candle's own ops.
    pub fn branch(&self, x2: &Tensor) -> Result<Tensor> {
        let dropped;
        let x2 = match self.dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                dropped = dropout(x2, self.dropout, seed)?;
                &dropped
            }
            _ => x2,
        };
        let ax = x2.matmul(&self.a.t()?)?;
        let bax = ax.matmul(&self.b.t()?)?;
        Ok((bax * self.scale)?)
    }
}

/// A layer's decode kernel and its LoRA branch on the bf16 copy with the branch's scale
/// ([`Linear::decode_parts`]).
pub(crate) type DecodeParts<'a> = (&'a Arc<Q41Matrix>, Option<(Arc<LoraBf16>, f32)>);

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

    /// The fused matrix and, per layer, its output width and LoRA branch, when `layers` (the
    /// ones it was built from) each compute their decode kernel's product on `x2` `[rows, in]`,
    /// with or without a branch ([`Linear::decode_parts`]).
    pub(crate) fn decode_parts(
        &self,
        layers: &[&Linear],
        x2: &Tensor,
    ) -> Result<Option<(&Q41Matrix, Vec<crate::kernels::decode::DecodePart>)>> {
        if layers.len() != self.parts.len() {
            return Ok(None);
        }
        let mut parts = Vec::with_capacity(layers.len());
        for (l, k) in layers.iter().zip(&self.parts) {
            match l.decode_parts(x2)? {
                Some((own, lora)) if Arc::ptr_eq(own, k) => parts.push((l.out_dim, lora)),
                _ => return Ok(None),
            }
        }
        Ok(Some((self.kernel.as_ref(), parts)))
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
