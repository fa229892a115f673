//! Ops sized for decoding, where a call multiplies a handful of rows and per-op dispatch costs
//! more than the arithmetic: a LoRA branch added in one op ([`lora_add`], or [`lora_add_bf16`] on
//! the branch's bf16 copy, [`LoraBf16`]), and a plain decoder layer on the quantized kernels in two
//! ops ([`layer_qkv`], [`layer_mlp`]). (The quantized decode matmul is in [`super::quant`].)
//!
//! Decode reads every adapted matrix once per token: the reference r=8 adapter on all seven
//! projections of the default model is 9.8 MB in f32, read by one thread, and the LoRA op was
//! bound by memory (~6 us per op after vectorising). The bf16 copy halves those bytes; its
//! products accumulate in f32 against the f32 input. The decode path's base product already
//! rounds its input to 8 bits (the Q8 dot kernels), far coarser than bf16 weights on the branch.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::amx::to_bf16;
use super::profile::prof;
use super::quant::Q41Matrix;
use super::rms_norm::rms_row;
use super::rope::rope_head;
use super::{borrow_f32, f32_slice, CResult};

/// A projection's output width and LoRA branch (the bf16 copy and the branch's scale), as the
/// model holds them for a [`DecodeProj`].
pub type DecodePart = (usize, Option<(Arc<LoraBf16>, f32)>);

/// A projection of the fused decode layer: the decode kernel's matrix (one projection's rows,
/// or several projections' concatenated) and, per projection in order, its output width and
/// its LoRA branch on the bf16 copy with the branch's scale, if it has one.
pub struct DecodeProj<'a> {
    pub kernel: &'a Q41Matrix,
    pub parts: Vec<(usize, Option<(&'a LoraBf16, f32)>)>,
}

impl<'a> DecodeProj<'a> {
    /// The projection over `kernel` with `parts` as the model holds them (branches shared).
    pub fn new(kernel: &'a Q41Matrix, parts: &'a [DecodePart]) -> Self {
        Self {
            kernel,
            parts: parts
                .iter()
                .map(|(n, l)| (*n, l.as_ref().map(|(w, s)| (w.as_ref(), *s))))
                .collect(),
        }
    }

    /// Whether the parts fill the kernel's outputs and each branch fits its part and `inp`.
    fn fits(&self, inp: usize) -> bool {
        let (n, k) = self.kernel.dims();
        k == inp
            && self.parts.iter().map(|p| p.0).sum::<usize>() == n
            && self
                .parts
                .iter()
                .all(|(w, l)| l.is_none_or(|(b, _)| b.inp == inp && b.out == *w))
    }

    /// `out = x W^T`, then each part's branch added to its outputs (what the unfused layer's
    /// quantized product and [`lora_add_bf16`] compute).
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        self.kernel.forward_into(x, 1, out);
        let mut start = 0;
        for &(n, lora) in &self.parts {
            if let Some((w, scale)) = lora {
                lora_row_into(w, x, &mut out[start..start + n], scale);
            }
            start += n;
        }
    }
}

/// One token's pass through a plain decoder layer (RMSNorm, q/k/v, rotary embedding; then the
/// output projection, residual, RMSNorm, gate/up, SwiGLU, down, residual) in two ops around the
/// KV cache's append and the cached attention, where the unfused layer dispatches about twenty
/// candle ops a token, each allocating its output and, for the parallel ones, waking the pool:
/// on a 135M model the per-op cost was about a third of decode time. Each step computes what the
/// op it replaces computes, in the same order (candle's `rms_norm` and `rope`, the quantized
/// kernels, candle's add, [`super::simd::silu_mul`]), so the fused layer's outputs equal the
/// unfused one's bit for bit (`models/tests/decode_layer.rs`).
///
/// LoRA branches on the projections are added as the unfused layer adds them on the decode
/// path ([`lora_add_bf16`], the branch's bf16 copy), after each projection's product.
///
/// `x` `[1, 1, hidden]`, `norm` the input norm's weight `[hidden]`, `qkv` the q, k and v
/// projections' rows concatenated (`[(nh + 2 nkv) hd, hidden]`), `cos`/`sin` the rotary tables'
/// row at the token's position (`[1, hd / 2]`). Returns `[1, nh + 2 nkv, 1, hd]`: the rotated
/// query heads, the rotated key heads, the value heads.
pub fn layer_qkv(
    x: &Tensor,
    norm: &Tensor,
    eps: f32,
    qkv: &DecodeProj,
    (nh, nkv, hd): (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
) -> CResult<Tensor> {
    let hidden = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / hidden.max(1);
    let (n, k) = qkv.kernel.dims();
    if rows != 1
        || !qkv.fits(hidden)
        || n != (nh + 2 * nkv) * hd
        || hd % 2 != 0
        || norm.elem_count() != hidden
        || cos.elem_count() != hd / 2
        || sin.elem_count() != hd / 2
    {
        candle_core::bail!(
            "decode layer: x {:?}, norm {:?}, q/k/v [{n}, {k}] for ({nh}, {nkv}, {hd}) heads, \
             rope {:?} do not fit",
            x.dims(),
            norm.dims(),
            cos.dims()
        )
    }
    borrow_f32!(w = norm, "decode layer norm");
    FUSED_LAYERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let op = LayerQkv {
        norm: w,
        eps,
        qkv,
        heads: (nh, nkv, hd),
    };
    x.contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)
}

/// The second half of [`layer_qkv`]'s layer: `x1 = x + attn W_o^T`, then
/// `x1 + down(silu(gate(h)) * up(h))` with `h = rms_norm(x1)`. `attn` `[1, 1, nh hd]` (the
/// cached attention's output), `x` `[1, 1, hidden]` (the layer's input, the residual),
/// `gate_up` the gate and up projections' rows concatenated (`[2 inter, hidden]`).
pub fn layer_mlp(
    attn: &Tensor,
    x: &Tensor,
    o: &DecodeProj,
    norm: &Tensor,
    eps: f32,
    gate_up: &DecodeProj,
    down: &DecodeProj,
) -> CResult<Tensor> {
    let hidden = x.dim(candle_core::D::Minus1)?;
    let (on, ok) = o.kernel.dims();
    let (gn, gk) = gate_up.kernel.dims();
    let (dn, dk) = down.kernel.dims();
    if x.elem_count() != hidden
        || !o.fits(ok)
        || !gate_up.fits(hidden)
        || !down.fits(dk)
        || attn.elem_count() != ok
        || on != hidden
        || gn % 2 != 0
        || dk != gn / 2
        || dn != hidden
        || norm.elem_count() != hidden
    {
        candle_core::bail!(
            "decode layer: attention {:?}, x {:?}, o [{on}, {ok}], gate/up [{gn}, {gk}], \
             down [{dn}, {dk}] do not fit",
            attn.dims(),
            x.dims()
        )
    }
    borrow_f32!(w = norm, "decode layer norm");
    let op = LayerMlp {
        o,
        norm: w,
        eps,
        gate_up,
        down,
    };
    attn.contiguous()?.apply_op2_no_bwd(&x.contiguous()?, &op)
}

static FUSED_LAYERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many layer steps [`layer_qkv`] has run in this process (tests check that a decode took
/// the fused ops).
pub fn fused_layer_calls() -> usize {
    FUSED_LAYERS.load(std::sync::atomic::Ordering::Relaxed)
}

struct LayerQkv<'a> {
    norm: &'a [f32],
    eps: f32,
    qkv: &'a DecodeProj<'a>,
    heads: (usize, usize, usize),
}

impl candle_core::CustomOp3 for LayerQkv<'_> {
    fn name(&self) -> &'static str {
        "attune-decode-layer-qkv"
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
        let _pg = prof("LayerQkv.cpu_fwd");
        let x = f32_slice(s1, l1, "decode layer x")?;
        let cos = f32_slice(s2, l2, "decode layer cos")?;
        let sin = f32_slice(s3, l3, "decode layer sin")?;
        let (nh, nkv, hd) = self.heads;
        let mut h = vec![0f32; x.len()];
        rms_row(x, self.norm, self.eps, &mut h);
        let mut out = vec![0f32; (nh + 2 * nkv) * hd];
        self.qkv.apply(&h, &mut out);
        for head in out[..(nh + nkv) * hd].chunks_exact_mut(hd) {
            rope_head(head, cos, sin);
        }
        Ok((CpuStorage::F32(out), Shape::from((1, nh + 2 * nkv, 1, hd))))
    }
}

struct LayerMlp<'a> {
    o: &'a DecodeProj<'a>,
    norm: &'a [f32],
    eps: f32,
    gate_up: &'a DecodeProj<'a>,
    down: &'a DecodeProj<'a>,
}

impl CustomOp2 for LayerMlp<'_> {
    fn name(&self) -> &'static str {
        "attune-decode-layer-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("LayerMlp.cpu_fwd");
        let attn = f32_slice(s1, l1, "decode layer attention")?;
        let x = f32_slice(s2, l2, "decode layer x")?;
        let hidden = x.len();
        let mut x1 = vec![0f32; hidden];
        self.o.apply(attn, &mut x1);
        for (a, r) in x1.iter_mut().zip(x) {
            *a += *r;
        }
        let mut h = vec![0f32; hidden];
        rms_row(&x1, self.norm, self.eps, &mut h);
        let inter = self.gate_up.kernel.dims().0 / 2;
        let mut gu = vec![0f32; 2 * inter];
        self.gate_up.apply(&h, &mut gu);
        let (g, u) = gu.split_at(inter);
        let mut act = vec![0f32; inter];
        super::simd::silu_mul(g, u, &mut act);
        let mut y = vec![0f32; hidden];
        self.down.apply(&act, &mut y);
        for (a, r) in y.iter_mut().zip(&x1) {
            *a += *r;
        }
        Ok((CpuStorage::F32(y), l2.shape().clone()))
    }
}

fn check(y: &Tensor, x: &Tensor, r: usize, ain: usize, b: (usize, usize)) -> CResult<()> {
    let (rows, out) = y.dims2()?;
    let (xr, inp) = x.dims2()?;
    if xr != rows || ain != inp || b != (out, r) || r == 0 {
        candle_core::bail!(
            "lora_add: y {:?}, x {:?}, A [{r}, {ain}], B {b:?} do not fit",
            y.dims(),
            x.dims(),
        )
    }
    Ok(())
}

/// `y + scale * (x A^T) B^T` for inference on a few rows (decode): `y` `[rows, out]`, `x`
/// `[rows, in]`, LoRA `a` `[r, in]` and `b` `[out, r]`. One op in place of candle's two matmuls, a
/// scale and an add: with seven adapted projections per layer, per-op dispatch cost more than the
/// arithmetic and halved decode speed.
pub fn lora_add(y: &Tensor, x: &Tensor, a: &Tensor, b: &Tensor, scale: f32) -> CResult<Tensor> {
    let (r, ain) = a.dims2()?;
    check(y, x, r, ain, b.dims2()?)?;
    let op = LoraAdd {
        weights: Branch::F32 {
            a: a.contiguous()?,
            b: b.contiguous()?,
        },
        scale,
    };
    y.contiguous()?.apply_op2_no_bwd(&x.contiguous()?, &op)
}

/// A LoRA branch's `A` `[r, in]` and `B` `[out, r]` rounded to bf16 (nearest even), for
/// [`lora_add_bf16`]. Built once per attached branch; the branch's f32 tensors stay the truth.
#[derive(Debug)]
pub struct LoraBf16 {
    a: Vec<u16>,
    b: Vec<u16>,
    r: usize,
    inp: usize,
    out: usize,
}

impl LoraBf16 {
    /// The bf16 copy of `a` and `b`, or `None` where the CPU has no vector path for it
    /// (AVX-512 F/BW/VL): there the f32 op ([`lora_add`]) is as fast.
    pub fn new(a: &Tensor, b: &Tensor) -> CResult<Option<Self>> {
        if !bf16_vectors() {
            return Ok(None);
        }
        let (r, inp) = a.dims2()?;
        let (out, br) = b.dims2()?;
        if br != r || r == 0 {
            candle_core::bail!("LoraBf16: A {:?} and B {:?} do not fit", a.dims(), b.dims())
        }
        borrow_f32!(av = a, "LoraBf16 A"; bv = b, "LoraBf16 B");
        Ok(Some(Self {
            a: av.iter().map(|&v| to_bf16(v)).collect(),
            b: bv.iter().map(|&v| to_bf16(v)).collect(),
            r,
            inp,
            out,
        }))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        2 * (self.a.len() + self.b.len())
    }
}

/// [`lora_add`] on the branch's bf16 copy.
pub fn lora_add_bf16(y: &Tensor, x: &Tensor, w: &Arc<LoraBf16>, scale: f32) -> CResult<Tensor> {
    check(y, x, w.r, w.inp, (w.out, w.r))?;
    let op = LoraAdd {
        weights: Branch::Bf16(Arc::clone(w)),
        scale,
    };
    y.contiguous()?.apply_op2_no_bwd(&x.contiguous()?, &op)
}

/// The branch's matrices as the op reads them.
enum Branch {
    F32 { a: Tensor, b: Tensor },
    Bf16(Arc<LoraBf16>),
}

struct LoraAdd {
    weights: Branch,
    scale: f32,
}

/// Whether the CPU runs the vector forms below (AVX-512 F, BW and VL).
fn bf16_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Dot product in 16 independent lanes, so the compiler vectorises it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The branch on each of `x`'s rows (`[rows, inp]`) added to a copy of `y` (`[rows, out]`):
/// `t = scale * A x_m`, then `y_m += B t`, with the vector forms where the CPU has them.
fn branch_rows<W: Weight>(
    a: &[W],
    b: &[W],
    y: &[f32],
    x: &[f32],
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let mut res = y.to_vec();
    branch_rows_into(a, b, &mut res, x, dims, scale);
    res
}

/// A LoRA branch on its bf16 copy for one row: `y += scale * B (A x)`, as [`lora_add_bf16`]
/// adds it (the fused decode layer's projections).
fn lora_row_into(w: &LoraBf16, x: &[f32], y: &mut [f32], scale: f32) {
    branch_rows_into(&w.a, &w.b, y, x, (1, w.inp, w.out, w.r), scale);
}

/// [`branch_rows`] added to `res` in place.
fn branch_rows_into<W: Weight>(
    a: &[W],
    b: &[W],
    res: &mut [f32],
    x: &[f32],
    (rows, inp, out, r): (usize, usize, usize, usize),
    scale: f32,
) {
    let mut t = vec![0f32; r];
    for m in 0..rows {
        let xm = &x[m * inp..(m + 1) * inp];
        let ym = &mut res[m * out..(m + 1) * out];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if bf16_vectors() {
            // SAFETY: AVX-512 F/BW/VL checked at run time; `a` holds `r` rows of `inp` values and
            // `b` `out` rows of `r` (the ops check the shapes).
            unsafe {
                x86::down(a, xm, scale, &mut t);
                if r.is_multiple_of(8) {
                    done = x86::up_add(b, &t, ym);
                }
            }
        } else {
            down_scalar(a, xm, scale, &mut t);
        }
        #[cfg(not(target_arch = "x86_64"))]
        down_scalar(a, xm, scale, &mut t);
        for (n, yn) in ym.iter_mut().enumerate().skip(done) {
            let row = &b[n * r..(n + 1) * r];
            *yn += row.iter().zip(&t).map(|(w, t)| w.f32() * t).sum::<f32>();
        }
    }
}

fn down_scalar<W: Weight>(a: &[W], x: &[f32], scale: f32, t: &mut [f32]) {
    let inp = x.len();
    for (j, tj) in t.iter_mut().enumerate() {
        let row = &a[j * inp..(j + 1) * inp];
        *tj = scale * W::dot(row, x);
    }
}

/// A stored weight value: f32, or bf16 as its bits.
trait Weight: Copy {
    fn f32(self) -> f32;
    fn dot(row: &[Self], x: &[f32]) -> f32;
    /// Sixteen weights from `p` (lanes `>= rem` zero), as f32.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self, rem: usize) -> std::arch::x86_64::__m512;
    /// Eight weights from `lo` then eight from `hi`, as f32.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8x2(lo: *const Self, hi: *const Self) -> std::arch::x86_64::__m512;
}

impl Weight for f32 {
    fn f32(self) -> f32 {
        self
    }
    fn dot(row: &[f32], x: &[f32]) -> f32 {
        dot(row, x)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const f32, rem: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller keeps lanes below `rem` inside its slice.
        unsafe { _mm512_maskz_loadu_ps(x86::mask(rem), p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load8x2(lo: *const f32, hi: *const f32) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller keeps both eight-value runs inside its slice.
        unsafe {
            let (lo, hi) = (_mm256_loadu_ps(lo), _mm256_loadu_ps(hi));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                _mm256_castps_pd(hi),
            ))
        }
    }
}

impl Weight for u16 {
    fn f32(self) -> f32 {
        super::amx::from_bf16(self)
    }
    fn dot(row: &[u16], x: &[f32]) -> f32 {
        row.iter().zip(x).map(|(w, x)| w.f32() * x).sum()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const u16, rem: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller keeps lanes below `rem` inside its slice.
        let h = unsafe { _mm256_maskz_loadu_epi16(x86::mask(rem), p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load8x2(lo: *const u16, hi: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller keeps both eight-value runs inside its slice.
        let h = unsafe {
            _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(lo.cast())),
                _mm_loadu_si128(hi.cast()),
            )
        };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// AVX-512 forms of the two halves of the branch. With `r = 8` the up projection's rows are
/// eight values each: a dot product per row left the vector unit idle (~10 us per op, 2.2 ms per
/// token over the 210 adapted projections of the default model).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Weight;
    use std::arch::x86_64::*;

    /// Lanes `0..rem` set (all sixteen when `rem >= 16`).
    #[inline]
    pub(super) fn mask(rem: usize) -> __mmask16 {
        if rem >= 16 {
            0xffff
        } else {
            ((1u32 << rem) - 1) as __mmask16
        }
    }

    /// `t[j] = scale * (a[j, :] . x)`: four rows of `a` at a time against one load of `x`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn down<W: Weight>(a: &[W], x: &[f32], scale: f32, t: &mut [f32]) {
        let inp = x.len();
        let r = t.len();
        assert!(a.len() >= r * inp, "lora down: A too short");
        let (xp, ap) = (x.as_ptr(), a.as_ptr());
        let mut j = 0;
        while j < r {
            let rows = (r - j).min(4);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i < inp {
                let rem = inp - i;
                // SAFETY: the mask keeps every lane inside row `j + k` of `a` and inside `x`.
                unsafe {
                    let xv = _mm512_maskz_loadu_ps(mask(rem), xp.add(i));
                    for (k, acc) in acc.iter_mut().enumerate().take(rows) {
                        let av = W::load16(ap.add((j + k) * inp + i), rem);
                        *acc = _mm512_fmadd_ps(av, xv, *acc);
                    }
                }
                i += 16;
            }
            for (k, acc) in acc.iter().enumerate().take(rows) {
                t[j + k] = scale * _mm512_reduce_add_ps(*acc);
            }
            j += rows;
        }
    }

    /// Pairwise sums of neighbouring lanes of `a` then `b`: lane `i < 8` is `a[2i] + a[2i+1]`,
    /// lane `8 + i` is `b[2i] + b[2i+1]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn pair_sums(a: __m512, b: __m512) -> __m512 {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        _mm512_add_ps(
            _mm512_permutex2var_ps(a, even, b),
            _mm512_permutex2var_ps(a, odd, b),
        )
    }

    /// `y[n] += b[n, :] . t` sixteen rows at a time, for `r = t.len()` a multiple of 8: each
    /// vector holds eight products of two neighbouring rows; three rounds of pairwise sums turn
    /// eight such vectors into the sixteen rows' dot products, in order. Returns the rows done
    /// (`y.len()` rounded down to 16).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn up_add<W: Weight>(b: &[W], t: &[f32], y: &mut [f32]) -> usize {
        let r = t.len();
        assert!(
            r.is_multiple_of(8) && r > 0,
            "lora up: rank {r} is not a multiple of 8"
        );
        let out = y.len();
        assert!(b.len() >= out * r, "lora up: B too short");
        let full = out / 16 * 16;
        // t's runs of eight, each in both halves of a vector.
        let td: Vec<__m512> = t
            .chunks_exact(8)
            // SAFETY: `c` holds eight values.
            .map(|c| unsafe { f32::load8x2(c.as_ptr(), c.as_ptr()) })
            .collect();
        let bp = b.as_ptr();
        let mut n0 = 0;
        while n0 < full {
            let mut p = [_mm512_setzero_ps(); 8];
            for (k, pk) in p.iter_mut().enumerate() {
                let row = n0 + 2 * k;
                for (c, tc) in td.iter().enumerate() {
                    // SAFETY: rows `row` and `row + 1` are below `out`, each `r` values long.
                    let v = unsafe {
                        W::load8x2(bp.add(row * r + c * 8), bp.add((row + 1) * r + c * 8))
                    };
                    *pk = _mm512_fmadd_ps(v, *tc, *pk);
                }
            }
            let q = [
                pair_sums(p[0], p[1]),
                pair_sums(p[2], p[3]),
                pair_sums(p[4], p[5]),
                pair_sums(p[6], p[7]),
            ];
            let s = [pair_sums(q[0], q[1]), pair_sums(q[2], q[3])];
            let sums = pair_sums(s[0], s[1]);
            // SAFETY: `n0 + 16 <= out`.
            unsafe {
                let yp = y.as_mut_ptr().add(n0);
                _mm512_storeu_ps(yp, _mm512_add_ps(_mm512_loadu_ps(yp), sums));
            }
            n0 += 16;
        }
        full
    }
}

impl CustomOp2 for LoraAdd {
    fn name(&self) -> &'static str {
        "attune-lora-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("LoraAdd.cpu_fwd");
        let y = f32_slice(s1, l1, "lora_add y")?;
        let x = f32_slice(s2, l2, "lora_add x")?;
        let (rows, out) = l1.shape().dims2()?;
        let inp = l2.shape().dims2()?.1;
        let res = match &self.weights {
            Branch::F32 { a, b } => {
                borrow_f32!(a = a, "lora_add A"; b = b, "lora_add B");
                let r = a.len() / inp.max(1);
                branch_rows(a, b, y, x, (rows, inp, out, r), self.scale)
            }
            Branch::Bf16(w) => branch_rows(&w.a, &w.b, y, x, (rows, w.inp, w.out, w.r), self.scale),
        };
        Ok((CpuStorage::F32(res), l1.shape().clone()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kernels::max_diff;
    use candle_core::Device;

    /// `y + scale * (x A^T) B^T` from candle's matmuls.
    fn reference(y: &Tensor, x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Tensor {
        let t = x.matmul(&a.t().unwrap()).unwrap();
        (y + (t.matmul(&b.t().unwrap()).unwrap() * scale).unwrap()).unwrap()
    }

    #[test]
    fn lora_add_equals_the_two_matmuls() {
        // Ranks with and without the vector path (multiples of 8), widths with partial vectors,
        // outputs with and without a tail beyond the sixteen-row blocks.
        for (rows, inp, out, r) in [
            (3, 37, 21, 5),
            (1, 576, 1536, 8),
            (2, 37, 40, 8),
            (1, 100, 7, 16),
            (1, 33, 35, 24),
            (1, 16, 16, 4),
        ] {
            check_lora_add(rows, inp, out, r);
        }
    }

    /// The bf16 form equals the two matmuls on the bf16-rounded matrices (f32 arithmetic) to
    /// rounding, where the CPU has its vector path; elsewhere it is not offered.
    #[test]
    fn lora_add_bf16_equals_the_matmuls_on_rounded_weights() {
        let dev = Device::Cpu;
        for (rows, inp, out, r) in [
            (1, 576, 1536, 8),
            (3, 37, 21, 5),
            (2, 37, 40, 8),
            (1, 100, 7, 16),
        ] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
            let y = Tensor::randn(0f32, 1.0, (rows, out), &dev).unwrap();
            let a = Tensor::randn(0f32, 1.0, (r, inp), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, (out, r), &dev).unwrap();
            let Some(w) = LoraBf16::new(&a, &b).unwrap() else {
                assert!(!bf16_vectors());
                return;
            };
            assert_eq!(w.bytes(), 2 * (r * inp + out * r));
            let round = |t: &Tensor| {
                t.to_dtype(candle_core::DType::BF16)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
            };
            let got = lora_add_bf16(&y, &x, &Arc::new(w), 0.7).unwrap();
            let diff = max_diff(&got, &reference(&y, &x, &round(&a), &round(&b), 0.7));
            assert!(
                diff < 1e-4 * (inp as f32).sqrt(),
                "{rows}x{inp} -> {out}, r {r}: {diff}"
            );
        }
        let a = Tensor::zeros((8, 16), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros((16, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(LoraBf16::new(&a, &b).is_err() || !bf16_vectors());
    }

    fn check_lora_add(rows: usize, inp: usize, out: usize, r: usize) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (rows, out), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (r, inp), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (out, r), &dev).unwrap();
        let got = lora_add(&y, &x, &a, &b, 0.7).unwrap();
        let diff = max_diff(&got, &reference(&y, &x, &a, &b, 0.7));
        assert!(
            diff < 1e-4 * (inp as f32).sqrt(),
            "{rows}x{inp} -> {out}, r {r}: {diff}"
        );
        if out != r {
            assert!(lora_add(&y, &x, &b, &a, 1.0).is_err());
        }
    }
}
