//! Projections for training: `x W^T` on a frozen weight ([`frozen_linear`]: the input gradient
//! only, where candle's matmul backward would also compute a weight gradient nobody reads), on a
//! trained weight ([`linear`]: `dW` straight into the `[out, in]` layout), and with a LoRA branch
//! ([`lora_linear`]: `dx`, `dA`, `dB`, never `dW`). The LoRA branch's slice-level passes are
//! shared with the fused layer.
//!
//! A frozen weight is a [`Frozen`]: an f32 tensor (the f32 GEMM), a bf16 copy packed for the
//! CPU's matrix units ([`super::amx`]), whose products convert their activations to bf16 and
//! accumulate in f32, or, on a CPU with VNNI but no AMX, i8 copies in both orientations
//! ([`super::int8`]), whose products round their activations to 8 bits per 32. [`WRef`] and [`Act`] are the slice-level forms the fused layer shares.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;

use super::amx::{PackedWeight, RowsBf16};
use super::gemm::{matmul, matmul_scaled, product};
use super::int8::I8Pair;
use super::profile::prof;
use super::stream::Streamed;
use super::{borrow_f32, f32_slice, rows_features, threads, with_features, CResult};

// ---------------------------------------------------------------------------------------------
// Frozen weights, f32 or bf16
// ---------------------------------------------------------------------------------------------

/// A frozen weight `[out, in]`: f32, bf16 packed for the matrix units, or kept compact
/// (quantized blocks or bf16) and expanded a panel at a time ([`super::stream`]).
#[derive(Clone, Debug)]
pub enum Frozen {
    F32(Tensor),
    Bf16(Arc<PackedWeight>),
    Streamed(Arc<Streamed>),
    Int8(Arc<I8Pair>),
}

impl Frozen {
    /// `(out, in)`.
    pub fn dims(&self) -> CResult<(usize, usize)> {
        match self {
            Frozen::F32(w) => w.dims2(),
            Frozen::Bf16(p) => Ok((p.out_dim(), p.in_dim())),
            Frozen::Streamed(s) => Ok(s.dims()),
            Frozen::Int8(q) => Ok((q.out_dim(), q.in_dim())),
        }
    }

    /// The f32 form made contiguous and detached (an op keeps it).
    pub(crate) fn owned(&self) -> CResult<Frozen> {
        Ok(match self {
            Frozen::F32(w) => Frozen::F32(w.contiguous()?.detach()),
            Frozen::Bf16(p) => Frozen::Bf16(p.clone()),
            Frozen::Streamed(s) => Frozen::Streamed(s.clone()),
            Frozen::Int8(q) => Frozen::Int8(q.clone()),
        })
    }

    /// Runs `f` on the weight's slice-level form.
    pub(crate) fn with_ref<R>(&self, f: impl FnOnce(WRef<'_>) -> CResult<R>) -> CResult<R> {
        match self {
            Frozen::F32(w) => {
                let (w, strides) = f32_strided(w)?;
                borrow_f32!(w = w, "frozen weight");
                f(WRef::F32(w, strides))
            }
            Frozen::Bf16(p) => f(WRef::Bf16(p)),
            Frozen::Streamed(s) => f(WRef::Streamed(s)),
            Frozen::Int8(q) => f(WRef::Int8(q)),
        }
    }
}

/// A weight `[out, in]` as a contiguous tensor of its values and their strides for
/// [`WRef::F32`]: itself, `(in, 1)`; a weight held transposed (`[in, out]` contiguous, as the
/// GGUF loader keeps its f32 copies) read in place, `(1, out)`; anything else copied.
pub(crate) fn f32_strided(w: &Tensor) -> CResult<(Tensor, (usize, usize))> {
    let (out, din) = w.dims2()?;
    Ok(if w.is_contiguous() {
        (w.clone(), (din, 1))
    } else if held_transposed(w) {
        (w.t()?, (1, out))
    } else {
        (w.contiguous()?, (din, 1))
    })
}

/// Whether [`f32_strided`] reads `w` in place.
pub(crate) fn f32_in_place(w: &Tensor) -> bool {
    w.rank() == 2 && (w.is_contiguous() || held_transposed(w))
}

/// A `[out, in]` view of `[in, out]` contiguous values.
fn held_transposed(w: &Tensor) -> bool {
    w.t().is_ok_and(|t| t.is_contiguous())
}

/// A weight `[dout, din]` for one pass: f32 values, the packed bf16 copy, or a compact form
/// expanded panel by panel.
#[derive(Clone, Copy)]
pub(crate) enum WRef<'a> {
    /// f32 values with their strides (output, input): `W[o][i] = w[o * s.0 + i * s.1]`,
    /// `(din, 1)` row-major, `(1, dout)` held transposed.
    F32(&'a [f32], (usize, usize)),
    Bf16(&'a PackedWeight),
    Streamed(&'a Streamed),
    Int8(&'a I8Pair),
}

/// An activation `[rows, features]` in f32, with its bf16 tiles (or int8 rows) made on first
/// use, so the products that read one input (q, k and v; gate and up) convert it once.
pub(crate) struct Act<'a> {
    pub x: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    bf16: OnceLock<RowsBf16>,
    int8: OnceLock<super::int8::I8Rows>,
    int8_columns: OnceLock<super::int8::I8Weight>,
}

impl<'a> Act<'a> {
    pub fn new(x: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), rows * cols);
        Self {
            x,
            rows,
            cols,
            bf16: OnceLock::new(),
            int8: OnceLock::new(),
            int8_columns: OnceLock::new(),
        }
    }

    /// The input quantized along its rows for int8 weight gradients
    /// ([`super::int8::weight_grad`]), once, on first use (q, k and v share it).
    pub(super) fn int8_columns(&self) -> &super::int8::I8Weight {
        self.int8_columns
            .get_or_init(|| super::int8::I8Weight::of_columns(self.x, self.rows, self.cols))
    }

    /// The rows quantized for the int8 products (once, on first use).
    pub(super) fn int8(&self) -> &super::int8::I8Rows {
        self.int8
            .get_or_init(|| super::int8::I8Rows::new(self.x, self.rows, self.cols))
    }

    /// The rows as bf16 tiles (converted once, on first use).
    pub(super) fn bf16(&self) -> &RowsBf16 {
        self.bf16
            .get_or_init(|| RowsBf16::from_f32(self.x, self.rows, self.cols))
    }

    /// The bf16 tiles when a streamed weight's products run on the matrix units.
    fn streamed_bf16(&self) -> Option<&RowsBf16> {
        super::amx::available().then(|| self.bf16())
    }
}

impl WRef<'_> {
    /// A new `[rows, dout]` product `x W^T`.
    pub fn forward_new(self, x: &Act, dout: usize, par: Parallelism) -> Vec<f32> {
        let (rows, din) = (x.rows, x.cols);
        match self {
            WRef::F32(w, (so, si)) => product(rows, dout, din, x.x, (din, 1), w, (si, so), par),
            WRef::Bf16(p) => p.forward_new(x.bf16()),
            WRef::Streamed(s) => {
                let mut y = vec![0f32; rows * dout];
                s.forward(x.x, x.streamed_bf16(), rows, &mut y, false);
                y
            }
            WRef::Int8(q) => q.fwd().forward_new(x.int8()),
        }
    }

    /// `dst[rows, dout] += x W^T`.
    pub fn forward_add(self, x: &Act, dst: &mut [f32], dout: usize, par: Parallelism) {
        let (rows, din) = (x.rows, x.cols);
        match self {
            WRef::F32(w, (so, si)) => matmul(
                rows,
                dout,
                din,
                dst,
                (dout, 1),
                true,
                x.x,
                (din, 1),
                w,
                (si, so),
                par,
            ),
            WRef::Bf16(p) => p.forward(x.bf16(), dst, true),
            WRef::Streamed(s) => s.forward(x.x, x.streamed_bf16(), rows, dst, true),
            WRef::Int8(q) => q.forward(x.int8(), dst, true),
        }
    }

    /// The input gradient `dy W` `[rows, din]` for `dy` `[rows, dout]`: added to `dx`, or a new
    /// buffer when `dx` is `None`.
    pub fn input_grad(self, dy: &Act, din: usize, dx: &mut Option<Vec<f32>>, par: Parallelism) {
        let (rows, dout) = (dy.rows, dy.cols);
        match (self, dx) {
            (WRef::F32(w, st), Some(d)) => matmul(
                rows,
                din,
                dout,
                d,
                (din, 1),
                true,
                dy.x,
                (dout, 1),
                w,
                st,
                par,
            ),
            (WRef::F32(w, st), dx) => {
                *dx = Some(product(rows, din, dout, dy.x, (dout, 1), w, st, par))
            }
            (WRef::Bf16(p), Some(d)) => p.input_grad(dy.bf16(), d, true),
            (WRef::Bf16(p), dx) => *dx = Some(p.input_grad_new(dy.bf16())),
            (WRef::Streamed(s), Some(d)) => s.input_grad(dy.x, dy.streamed_bf16(), rows, d, true),
            (WRef::Streamed(s), dx) => {
                let mut d = vec![0f32; rows * din];
                s.input_grad(dy.x, dy.streamed_bf16(), rows, &mut d, false);
                *dx = Some(d);
            }
            (WRef::Int8(q), Some(d)) => q.input_grad(dy.int8(), d, true),
            (WRef::Int8(q), dx) => {
                let mut d = vec![0f32; rows * din];
                q.input_grad(dy.int8(), &mut d, false);
                *dx = Some(d);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen linear
// ---------------------------------------------------------------------------------------------

/// `x W^T` for a frozen weight `w` `[out, in]`: differentiable in `x` only. `x` is `[..., in]`.
pub fn frozen_linear(x: &Tensor, w: &Frozen) -> CResult<Tensor> {
    let x = x.contiguous()?;
    x.apply_op1(FrozenLinear { w: w.owned()? })
}

struct FrozenLinear {
    w: Frozen,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "attune-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("FrozenLinear.cpu_fwd");
        let x = f32_slice(s, l, "frozen linear input")?;
        let (rows, din) = rows_features(l.shape())?;
        let (dout, win) = self.w.dims()?;
        if win != din {
            candle_core::bail!("frozen linear: input has {din} features, weight expects {win}")
        }
        let par = Parallelism::Rayon(threads());
        let out = self
            .w
            .with_ref(|w| Ok(w.forward_new(&Act::new(x, rows, din), dout, par)))?;
        Ok((CpuStorage::F32(out), with_features(l.shape(), dout)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let _pg = prof("FrozenLinear.bwd");
        let (dout, din) = self.w.dims()?;
        let rows = grad.elem_count() / dout.max(1);
        borrow_f32!(dy = grad, "frozen linear grad");
        let par = Parallelism::Rayon(threads());
        let mut dx = None;
        self.w.with_ref(|w| {
            w.input_grad(&Act::new(dy, rows, dout), din, &mut dx, par);
            Ok(())
        })?;
        let dx = dx.unwrap_or_default();
        Ok(Some(Tensor::from_vec(dx, x.shape(), grad.device())?))
    }
}

// ---------------------------------------------------------------------------------------------
// Trained linear
// ---------------------------------------------------------------------------------------------

/// `x W^T` for a weight being trained (full fine-tuning): `x` `[rows, in]`, `w` `[out, in]`.
/// The backward pass computes `dx = dy W` (when `x` needs it) and `dW = dy^T x` straight into
/// the weight's `[out, in]` layout.
pub fn linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, TrainedLinear)
}

struct TrainedLinear;

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "attune-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("TrainedLinear.cpu_fwd");
        let x = f32_slice(s1, l1, "linear input")?;
        let w = f32_slice(s2, l2, "linear weight")?;
        let (rows, din) = rows_features(l1.shape())?;
        let (dout, win) = l2.shape().dims2()?;
        if win != din {
            candle_core::bail!("linear: input has {din} features, weight expects {win}")
        }
        let par = Parallelism::Rayon(threads());
        let out = product(rows, dout, din, x, (din, 1), w, (1, din), par);
        Ok((CpuStorage::F32(out), with_features(l1.shape(), dout)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("TrainedLinear.bwd");
        let (rows, din) = rows_features(x.shape())?;
        let (dout, _) = w.dims2()?;
        borrow_f32!(xv = x, "linear input"; wv = w, "linear weight"; dy = grad, "linear grad");
        let par = Parallelism::Rayon(threads());
        let dx = if x.track_op() {
            let dx = product(rows, din, dout, dy, (dout, 1), wv, (din, 1), par);
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = product(dout, din, rows, dy, (1, dout), xv, (din, 1), par);
            Some(Tensor::from_vec(dw, (dout, din), w.device())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA linear
// ---------------------------------------------------------------------------------------------

/// `x W^T + scale * (x A^T) B^T` for a frozen `w` `[out, in]` and LoRA `a` `[r, in]`, `b`
/// `[out, r]`; `x` is `[rows, in]`. One op: the low-rank product is accumulated into the base
/// product by the GEMM itself, and the backward pass computes `dx`, `dA`, `dB` (never `dW`).
pub fn lora_linear(x: &Tensor, w: &Frozen, a: &Tensor, b: &Tensor, scale: f32) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.owned()?,
            scale,
            xa: Mutex::new(None),
        },
    )
}

struct LoraLinear {
    w: Frozen,
    scale: f32,
    /// `x A^T` `[rows, r]` from the forward pass, which the backward pass needs again.
    xa: Mutex<Option<Vec<f32>>>,
}

/// Rows per task of the LoRA branch's passes: a task runs all of the branch's thin products on
/// its rows while they are in cache (one pass over `x`, `dy` and `dst` instead of one per product),
/// and the tasks share the kernels' pool ([`super::pool`]).
const LORA_ROWS: usize = 128;

/// Rows per task: [`LORA_ROWS`], or all of them in one task under `Parallelism::None`.
fn lora_block(rows: usize, par: Parallelism) -> usize {
    match par {
        Parallelism::None => rows.max(1),
        _ => LORA_ROWS,
    }
}

/// The LoRA branch of a projection, `dst += scale * (x A^T) B^T` for `x` `[rows, in]`, `A`
/// `[r, in]`, `B` `[out, r]` (`dims` = `(rows, in, out, r)`); returns `x A^T` `[rows, r]`, which
/// the backward pass reads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_branch_forward(
    (rows, din, dout, r): (usize, usize, usize, usize),
    x: &[f32],
    a: &[f32],
    b: &[f32],
    scale: f32,
    dst: &mut [f32],
    par: Parallelism,
) -> Vec<f32> {
    let _pg = super::profile::prof("lora_branch.fwd");
    let mut xa = vec![0f32; rows * r];
    if rows == 0 || din == 0 || dout == 0 || r == 0 {
        return xa;
    }
    assert!(
        x.len() >= rows * din && dst.len() >= rows * dout,
        "lora branch: x holds {} values and dst {}, for [{rows}, {din}] -> [{rows}, {dout}]",
        x.len(),
        dst.len()
    );
    let blk = lora_block(rows, par);
    let dst = &mut dst[..rows * dout];
    super::pool::chunks_mut2(&mut xa, blk * r, dst, blk * dout, |i, xa, dst| {
        let (r0, n) = (i * blk, dst.len() / dout);
        let x = &x[r0 * din..(r0 + n) * din];
        matmul(
            n,
            r,
            din,
            xa,
            (r, 1),
            false,
            x,
            (din, 1),
            a,
            (1, din),
            Parallelism::None,
        );
        matmul_scaled(
            n,
            dout,
            r,
            dst,
            (dout, 1),
            true,
            xa,
            (r, 1),
            b,
            (1, r),
            scale,
            Parallelism::None,
        );
    });
    xa
}

/// The backward pass of [`lora_branch_forward`] for the output gradient `dy` `[rows, out]`: adds
/// `scale * (dy B) A` to `dx` when given, and returns `dA = scale * (dy B)^T x` when `x` is given
/// and `dB = scale * dy^T (x A^T)` when `xa` is. Each task takes a block of rows, computes its
/// `dy B`, its share of `dx`, and its partial `dA`/`dB`, summed after.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_branch_backward(
    (rows, din, dout, r): (usize, usize, usize, usize),
    dy: &[f32],
    a: &[f32],
    b: &[f32],
    scale: f32,
    dx: Option<&mut [f32]>,
    x: Option<&[f32]>,
    xa: Option<&[f32]>,
    par: Parallelism,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let _pg = super::profile::prof("lora_branch.bwd");
    let (n_da, n_db) = (x.map_or(0, |_| r * din), xa.map_or(0, |_| dout * r));
    if rows == 0 || din == 0 || dout == 0 || r == 0 {
        return (x.map(|_| vec![0f32; n_da]), xa.map(|_| vec![0f32; n_db]));
    }
    assert!(
        dy.len() >= rows * dout
            && x.is_none_or(|x| x.len() >= rows * din)
            && xa.is_none_or(|t| t.len() >= rows * r)
            && dx.as_ref().is_none_or(|d| d.len() >= rows * din),
        "lora branch backward: operands too short for [{rows}, {din}] -> [{rows}, {dout}], r {r}"
    );
    let blk = lora_block(rows, par);
    let nb = rows.div_ceil(blk);
    // Per block: its partial dA then dB (one slot at least, so the chunks line up).
    let part = (n_da + n_db).max(1);
    let mut parts = vec![0f32; nb * part];
    let body = |i: usize, p: &mut [f32], dx: Option<&mut [f32]>| {
        let r0 = i * blk;
        let n = blk.min(rows - r0);
        let dy = &dy[r0 * dout..(r0 + n) * dout];
        // u = dy B [n, r]
        let mut u = vec![0f32; n * r];
        matmul(
            n,
            r,
            dout,
            &mut u,
            (r, 1),
            false,
            dy,
            (dout, 1),
            b,
            (r, 1),
            Parallelism::None,
        );
        if let Some(dx) = dx {
            let dx = &mut dx[..n * din];
            matmul_scaled(
                n,
                din,
                r,
                dx,
                (din, 1),
                true,
                &u,
                (r, 1),
                a,
                (din, 1),
                scale,
                Parallelism::None,
            );
        }
        let (da, db) = p.split_at_mut(n_da);
        if let Some(x) = x {
            let x = &x[r0 * din..(r0 + n) * din];
            matmul_scaled(
                r,
                din,
                n,
                da,
                (din, 1),
                false,
                &u,
                (1, r),
                x,
                (din, 1),
                scale,
                Parallelism::None,
            );
        }
        if let Some(xa) = xa {
            let xa = &xa[r0 * r..(r0 + n) * r];
            matmul_scaled(
                dout,
                r,
                n,
                &mut db[..n_db],
                (r, 1),
                false,
                dy,
                (1, dout),
                xa,
                (r, 1),
                scale,
                Parallelism::None,
            );
        }
    };
    match dx {
        Some(dx) => super::pool::chunks_mut2(
            &mut parts,
            part,
            &mut dx[..rows * din],
            blk * din,
            |i, p, d| body(i, p, Some(d)),
        ),
        None => super::pool::chunks_mut(&mut parts, part, |i, p| body(i, p, None)),
    }
    let sum = |off: usize, len: usize| {
        let mut acc = vec![0f32; len];
        for p in parts.chunks(part) {
            for (a, v) in acc.iter_mut().zip(&p[off..off + len]) {
                *a += v;
            }
        }
        acc
    };
    (x.map(|_| sum(0, n_da)), xa.map(|_| sum(n_da, n_db)))
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "attune-lora-linear"
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
        let _pg = prof("LoraLinear.cpu_fwd");
        let x = f32_slice(s1, l1, "lora input")?;
        let a = f32_slice(s2, l2, "lora A")?;
        let b = f32_slice(s3, l3, "lora B")?;
        let (rows, din) = rows_features(l1.shape())?;
        let (r, a_in) = l2.shape().dims2()?;
        let (dout, b_r) = l3.shape().dims2()?;
        let (w_out, w_in) = self.w.dims()?;
        if a_in != din || b_r != r || (w_out, w_in) != (dout, din) {
            candle_core::bail!("lora linear: shapes do not fit (x {rows}x{din}, A {r}x{a_in}, B {dout}x{b_r}, W {w_out}x{w_in})")
        }
        let par = Parallelism::Rayon(threads());
        let mut y = self
            .w
            .with_ref(|w| Ok(w.forward_new(&Act::new(x, rows, din), dout, par)))?;
        let t = lora_branch_forward((rows, din, dout, r), x, a, b, self.scale, &mut y, par);
        *self.xa.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok((CpuStorage::F32(y), with_features(l1.shape(), dout)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("LoraLinear.bwd");
        let (rows, din) = rows_features(x.shape())?;
        let (r, _) = a.dims2()?;
        let (dout, _) = b.dims2()?;
        borrow_f32!(
            xv = x, "lora input";
            av = a, "lora A";
            bv = b, "lora B";
            dy = grad, "lora grad";
        );
        let par = Parallelism::Rayon(threads());
        let kept = self.xa.lock().unwrap_or_else(|e| e.into_inner()).take();
        let t = match kept {
            Some(t) if t.len() == rows * r => t,
            // A second backward through the same graph: recompute it.
            _ => product(rows, r, din, xv, (din, 1), av, (1, din), par),
        };
        let mut dx = None;
        self.w.with_ref(|w| {
            w.input_grad(&Act::new(dy, rows, dout), din, &mut dx, par);
            Ok(())
        })?;
        let mut dx = dx.unwrap_or_default();
        let (da, db) = lora_branch_backward(
            (rows, din, dout, r),
            dy,
            av,
            bv,
            self.scale,
            Some(&mut dx),
            Some(xv),
            Some(&t),
            par,
        );
        let (Some(da), Some(db)) = (da, db) else {
            candle_core::bail!("lora linear: the branch's gradients were not computed")
        };
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(da, (r, din), dev)?),
            Some(Tensor::from_vec(db, (dout, r), dev)?),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kernels::max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn lora_linear_matches_basic_ops() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (9, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (5, 6), &dev).unwrap();
        let a = Var::randn(0f32, 1., (3, 6), &dev).unwrap();
        let b = Var::randn(0f32, 1., (5, 3), &dev).unwrap();
        let gy = Tensor::randn(0f32, 1., (9, 5), &dev).unwrap();
        let fast = lora_linear(&x, &Frozen::F32(w.clone()), &a, &b, 2.0).unwrap();
        let slow = (x.matmul(&w.t().unwrap()).unwrap()
            + (x.matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * 2.0)
                .unwrap())
        .unwrap();
        assert!(max_diff(&fast, &slow) < 1e-4);
        let gf = (fast * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&x, &a, &b] {
            assert!(max_diff(gf.get(t).unwrap(), gs.get(t).unwrap()) < 1e-4);
        }
    }

    #[test]
    fn trained_linear_matches_matmul_in_both_gradients() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (7, 5), &dev).unwrap();
        let w = Var::randn(0f32, 1., (3, 5), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (7, 3), &dev).unwrap();
        let a = linear(&x, &w).unwrap();
        let b = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
        assert!(max_diff(ga.get(&w).unwrap(), gb.get(&w).unwrap()) < 1e-5);
        // An input that is not tracked gets no gradient, the weight still does.
        let x0 = x.as_tensor().detach();
        let g = linear(&x0, &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x0).is_none() && g.get(&w).is_some());
    }

    #[test]
    fn frozen_linear_and_rms_norm_match_basic_ops() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (7, 5), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 5), &dev).unwrap();
        let gy = Tensor::randn(0f32, 1., (7, 3), &dev).unwrap();
        let a = frozen_linear(&x, &Frozen::F32(w.clone())).unwrap();
        let b = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
    }

    /// The bf16 weight against the f32 one, forward and both gradients, on the layer shapes of
    /// the default model. bf16 rounds each operand by at most 2^-9 relative, so each term of a
    /// `k`-term sum of unit-variance products moves by up to 2^-8 of itself, and the sum by a
    /// random error of standard deviation about 2^-8 / sqrt(3) * sqrt(k) = 0.0023 sqrt(k)
    /// (measured maximum over 13,000 outputs at k = 576: 4.3 of those). Tolerance: 7 of them.
    #[test]
    fn bf16_weights_match_f32_within_rounding() {
        if !crate::kernels::amx::available() {
            eprintln!("note: no AMX-BF16 here (or ATTUNE_MATMUL=f32): the bf16 path is not tested, the f32 one is (above)");
            return;
        }
        let dev = Device::Cpu;
        for (rows, din, dout) in [(70, 576, 192), (33, 96, 1536)] {
            let x = Var::randn(0f32, 1., (rows, din), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (dout, din), &dev).unwrap();
            let a = Var::randn(0f32, 1., (4, din), &dev).unwrap();
            let b = Var::randn(0f32, 1., (dout, 4), &dev).unwrap();
            let gy = Tensor::randn(0f32, 1., (rows, dout), &dev).unwrap();
            let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let packed = Frozen::Bf16(std::sync::Arc::new(crate::kernels::amx::PackedWeight::new(
                &wv, dout, din,
            )));
            let f32w = Frozen::F32(w.clone());
            let tol = |k: usize| 7.0 * 0.0023 * (k as f32).sqrt();
            let y16 = frozen_linear(&x, &packed).unwrap();
            let y32 = frozen_linear(&x, &f32w).unwrap();
            assert!(
                max_diff(&y16, &y32) < tol(din),
                "forward {}",
                max_diff(&y16, &y32)
            );
            let g16 = (y16 * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let g32 = (y32 * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(g16.get(&x).unwrap(), g32.get(&x).unwrap());
            assert!(d < tol(dout), "dx {d}");
            let l16 = lora_linear(&x, &packed, &a, &b, 0.5).unwrap();
            let l32 = lora_linear(&x, &f32w, &a, &b, 0.5).unwrap();
            assert!(max_diff(&l16, &l32) < tol(din));
            let g16 = (l16 * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let g32 = (l32 * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(g16.get(&x).unwrap(), g32.get(&x).unwrap()) < tol(dout));
            // The LoRA gradients do not involve the base weight: equal up to f32 rounding.
            assert!(max_diff(g16.get(&a).unwrap(), g32.get(&a).unwrap()) < 1e-3);
            assert!(max_diff(g16.get(&b).unwrap(), g32.get(&b).unwrap()) < 1e-3);
        }
    }
}
