//! CPU kernels: the ops the model and the trainer are built from, one file per op, importing
//! neither (`tests/tidy.rs` checks it).
//!
//! candle's autograd builds the backward pass from basic ops, and three places cost too much that
//! way: attention (the `[batch, heads, seq, seq]` scores and probabilities kept for every layer),
//! frozen projections (candle computes a whole weight gradient nobody reads) and RMSNorm (five
//! ops, each keeping its own intermediate). Each op here is a custom op with a hand-written
//! backward pass (or none, for inference), over slice-level functions that the fused decoder layer
//! ([`block`]) shares:
//! - [`attention`]: causal attention (global or sliding-window) for training (FlashAttention-style)
//!   and over the KV cache;
//! - [`rope`] (full or partial rotary), [`swiglu`] (SwiGLU and GeGLU), [`rms_norm`] (`w` or
//!   Gemma's `1 + w`): the element-wise and row-wise ops;
//! - [`linear`]: frozen, trained and LoRA projections for training;
//! - [`loss`]: cross-entropy, and the LM head fused with it;
//! - [`decode`]: ops sized for decoding (a LoRA branch in one op);
//! - [`quant`]: the Q4_1/Q8_0/Q4_K/Q5_K/Q6_K integer matmul (AVX-512 VNNI, AVX2, scalar);
//! - [`amx`]: bf16 GEMM on the CPU's matrix units (Intel AMX tiles), for frozen weights;
//! - [`block`]: a whole decoder layer as one training op;
//! - [`gemm`] (the f32 GEMM wrappers), [`simd`] (AVX-512 `exp`, softmax, SiLU), [`profile`]
//!   (`ATTUNE_PROFILE_OPS`), [`scratch`] (reuse of the per-step buffers over 32 MB).

use candle_core::{CpuStorage, Layout, Shape, Tensor};

pub mod amx;
pub mod attention;
pub mod block;
pub mod decode;
pub(crate) mod gemm;
pub mod int8;
pub mod linear;
pub mod loss;
pub(crate) mod pool;
pub mod profile;
pub mod prompt;
pub mod quant;
pub mod rms_norm;
pub mod rope;
pub mod scratch;
pub mod simd;
pub mod stream;
pub mod swiglu;

pub use attention::{attention, attention_heads, cached_attention, cached_attention_bf16};
pub use decode::{lora_add, lora_add_bf16, LoraBf16};
pub use linear::{frozen_linear, linear, lora_linear};
pub use loss::{cross_entropy, lm_head_nll, lm_head_nll_frozen, HeadProducts};
pub use profile::take_profile;
pub use rms_norm::{rms_norm, rms_norm_offset};
pub use rope::{rope, rope_partial};
pub use swiglu::{gate_up_swiglu, geglu, swiglu, GateAct};

type CResult<T> = candle_core::Result<T>;

/// Whether `ATTUNE_MATMUL=f32` asks for the f32 products everywhere (A/B runs): the AMX bf16
/// and the VNNI int8 products are then off.
pub(crate) fn f32_products_forced() -> bool {
    std::env::var("ATTUNE_MATMUL").is_ok_and(|v| v.eq_ignore_ascii_case("f32"))
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32, got another dtype")
    };
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor")
    }
    Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

/// A `[..., features]` tensor as `(rows, features)`.
fn rows_features(shape: &Shape) -> CResult<(usize, usize)> {
    match shape.dims().split_last() {
        Some((&f, lead)) if !lead.is_empty() => Ok((lead.iter().product(), f)),
        _ => candle_core::bail!("expected a [..., features] tensor, got {:?}", shape.dims()),
    }
}

/// `shape` with its last dim replaced by `features`.
fn with_features(shape: &Shape, features: usize) -> Shape {
    let mut d = shape.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = features;
    }
    Shape::from(d)
}

/// Borrows tensors' f32 data in place: `borrow_f32!(xv = x, "what"; ...)` binds each name to
/// the `&[f32]` of the tensor made contiguous, until the end of the enclosing scope (the
/// contiguous tensor and its storage read guard live on in the shadowed bindings). Fails with
/// `what` in the message when the data is not f32 on the CPU.
macro_rules! borrow_f32 {
    ($($v:ident = $t:expr, $what:expr);+ $(;)?) => {
        $(
            let $v = $t.contiguous()?;
            let $v = $v.storage_and_layout();
            let $v = $crate::kernels::cpu_f32(&$v.0, $v.1, $what)?;
        )+
    };
}
pub(crate) use borrow_f32;

/// `src` `[rows, cols]` row-major, transposed: `[cols, rows]` row-major. In 16 x 16 tiles
/// (in registers on AVX-512, through L1 otherwise), where candle's strided copy
/// (`t().contiguous()`) walks an index per element: the GGUF loader's transposed f32 copies took
/// two fifths of a model load that way.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(
        src.len(),
        rows * cols,
        "transpose: {rows} x {cols} from {}",
        src.len()
    );
    let mut out: Vec<f32> = Vec::with_capacity(rows * cols);
    let dst = out.spare_capacity_mut();
    #[cfg(target_arch = "x86_64")]
    let whole = if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; `dst` holds `rows * cols` elements.
        unsafe { transpose_avx512(src, rows, cols, dst) }
    } else {
        (0, 0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let whole = (0, 0);
    transpose_tiles(src, rows, cols, whole, dst);
    // SAFETY: `transpose_avx512` wrote the whole 16 x 16 tiles of its first `whole.0` rows and
    // `whole.1` columns, and `transpose_tiles` every other element, so all `rows * cols` are set.
    unsafe { out.set_len(rows * cols) };
    out
}

/// The elements outside the block of `whole` (rows, columns) already written, tile by tile.
fn transpose_tiles(
    src: &[f32],
    rows: usize,
    cols: usize,
    whole: (usize, usize),
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    const T: usize = 16;
    for r0 in (0..rows).step_by(T) {
        let r1 = (r0 + T).min(rows);
        for c0 in (0..cols).step_by(T) {
            if r1 <= whole.0 && c0 + T <= whole.1 {
                continue;
            }
            for c in c0..(c0 + T).min(cols) {
                let row = &mut dst[c * rows + r0..c * rows + r1];
                for (d, r) in row.iter_mut().zip(r0..r1) {
                    d.write(src[r * cols + c]);
                }
            }
        }
    }
}

/// The whole 16 x 16 tiles, each as 16 row loads, three rounds of shuffles and 16 column stores;
/// returns how many rows and columns that covered.
///
/// # Safety
/// The CPU has AVX-512F; `src` and `dst` hold `rows * cols` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(
    src: &[f32],
    rows: usize,
    cols: usize,
    dst: &mut [std::mem::MaybeUninit<f32>],
) -> (usize, usize) {
    let (wr, wc) = (rows / 16 * 16, cols / 16 * 16);
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr() as *mut f32);
    for r0 in (0..wr).step_by(16) {
        for c0 in (0..wc).step_by(16) {
            // SAFETY: rows r0..r0 + 16 and columns c0..c0 + 16 lie inside `src` `[rows, cols]`,
            // and their transposes inside `dst` `[cols, rows]`.
            unsafe { transpose16(sp.add(r0 * cols + c0), cols, dp.add(c0 * rows + r0), rows) };
        }
    }
    (wr, wc)
}

/// One 16 x 16 tile transposed in registers: 16 row loads from `src` (`src_stride` floats
/// apart), three rounds of shuffles, 16 row stores to `dst` (`dst_stride` apart).
///
/// # Safety
/// The CPU has AVX-512F; the 16 rows of 16 floats at `src` and at `dst` lie inside their
/// buffers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(
    src: *const f32,
    src_stride: usize,
    dst: *mut f32,
    dst_stride: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY (the loads and stores below): the caller's bounds.
    let r: [__m512; 16] =
        std::array::from_fn(|i| unsafe { _mm512_loadu_ps(src.add(i * src_stride)) });
    // a[2p], a[2p + 1]: rows 2p and 2p + 1 interleaved, columns 4l + {0, 1} and
    // 4l + {2, 3} of each 128-bit lane l.
    let a: [__m512; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(x, y)
        } else {
            _mm512_unpackhi_ps(x, y)
        }
    });
    // b[4g + m], lane l: column 4l + m of rows 4g..4g + 4.
    let b: [__m512; 16] = std::array::from_fn(|i| {
        let (g, m) = (i / 4, i % 4);
        let (x, y) = (
            _mm512_castps_pd(a[4 * g + m / 2]),
            _mm512_castps_pd(a[4 * g + 2 + m / 2]),
        );
        _mm512_castpd_ps(if m % 2 == 0 {
            _mm512_unpacklo_pd(x, y)
        } else {
            _mm512_unpackhi_pd(x, y)
        })
    });
    for m in 0..4 {
        let c0_ = _mm512_shuffle_f32x4::<0x44>(b[m], b[4 + m]);
        let c1_ = _mm512_shuffle_f32x4::<0xEE>(b[m], b[4 + m]);
        let c2_ = _mm512_shuffle_f32x4::<0x44>(b[8 + m], b[12 + m]);
        let c3_ = _mm512_shuffle_f32x4::<0xEE>(b[8 + m], b[12 + m]);
        // Column 4l + m of the tile, rows 0..16: output row 4l + m.
        let outs = [
            _mm512_shuffle_f32x4::<0x88>(c0_, c2_),
            _mm512_shuffle_f32x4::<0xDD>(c0_, c2_),
            _mm512_shuffle_f32x4::<0x88>(c1_, c3_),
            _mm512_shuffle_f32x4::<0xDD>(c1_, c3_),
        ];
        for (l, v) in outs.into_iter().enumerate() {
            unsafe { _mm512_storeu_ps(dst.add((4 * l + m) * dst_stride), v) };
        }
    }
}

fn tensor_vec(t: &Tensor) -> CResult<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Asks the CPU to bring every cache line of `v` into L1 (a hint: nothing is read, nothing can
/// fault). The decode kernels read small matrices once per token, each in a short run the
/// hardware prefetchers did not pick up on the machines measured (see `quant::dot_rows_vnni`).
#[inline]
pub(crate) fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = v.as_ptr() as *const i8;
        for at in (0..std::mem::size_of_val(v)).step_by(64) {
            // SAFETY: `at` lies inside the slice, and a prefetch reads nothing either way.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// The kernels' thread count, read once: candle's `get_num_threads` reads `RAYON_NUM_THREADS`
/// and, when it is unset (the app, `attune train`), parses `/proc/cpuinfo` on every call, ~20 us
/// that every pool call paid (a bf16 attention pass making ~20,000 small products per step spent
/// most of its time there). The pools it sizes are built once too.
pub(crate) fn threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

pub(crate) fn cpu_f32<'a>(
    t: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> CResult<&'a [f32]> {
    match t {
        candle_core::Storage::Cpu(c) => f32_slice(c, l, what),
        _ => candle_core::bail!("{what}: not on the CPU"),
    }
}

/// Values in [-1, 1) from a fixed sequence (tests).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The largest absolute difference of two tensors (tests).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[cfg(test)]
mod transpose_tests {
    #[test]
    fn transposes_every_shape_exactly() {
        for (rows, cols) in [
            (0, 5),
            (1, 1),
            (16, 16),
            (32, 48),
            (576, 192),
            (17, 33),
            (5, 40),
            (40, 3),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 7.0).collect();
            let t = super::transpose(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t[c * rows + r],
                        src[r * cols + c],
                        "{rows} x {cols} at ({r}, {c})"
                    );
                }
            }
        }
    }
}
