//! The prompt products on a CPU without AMX tiles: 8-bit integer GEMMs on AVX-512 VNNI.
//!
//! Without AMX the many-row products (prompt processing) ran as f32 GEMMs, bounded by the two
//! FMA ports: 16 multiply-adds per instruction. `vpdpbusd` does 64 (four u8 x i8 products per
//! 32-bit lane) at the same rate: 740 int8 GOP/s per core against 190 f32 GFLOP/s on the Xeon
//! this was written on (`cargo bench -p attune-models --bench isa`). The weight is quantized
//! once (on the first prompt) to i8 per output column and [`KC`] (32) inputs, the activations
//! per row and 32 inputs (symmetric, the granularity of llama.cpp's Q8 activations and of this
//! crate's decode kernel, which every generated token already goes through). A stretch's
//! integer sums are exact; each is scaled by its two scales and added in f32. Stretches of 128
//! ran ~10% faster but strayed ~3x further from f32 (`models/tests/int8_prompts.rs` holds the
//! products to the decode kernel's distance from f32). [`crate::linear::Linear::int8_weight`]
//! says which weights take it (those a GGUF holds in 8 bits or fewer).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so an activation `q` goes in as `q + 128`
//! and each stretch's accumulator starts at `-128 * sum(w)` for its column (stored with the
//! weight), which takes the offset back out exactly.
//!
//! The register tile is [`MR`] (3) rows by 64 columns: twelve integer accumulators for the
//! stretch and twelve f32 sums across stretches, all in registers. Work is split over the
//! kernels' pool in tiles, the tiles of one 64-column block consecutive so a thread's share
//! reuses the block's weights from its caches.

use std::sync::{Arc, OnceLock};

use super::pool::{self, SharedMut};

/// The input stretch that shares one scale per column (weights) or per row (activations).
pub const KC: usize = 32;
/// Rows per register tile.
const MR: usize = 3;
/// Columns per register tile (and per packed block of the weight).
const NB: usize = 64;

/// Whether the int8 prompt products can run here: AVX-512 (F, BW) with VNNI, and not turned
/// off with `ATTUNE_MATMUL=f32` (the f32 GEMMs then, as on any other CPU). Checked once.
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !super::f32_products_forced() && cpu_has_vnni512())
}

/// Whether the CPU has what the kernel runs on (AVX-512 F and BW, AVX-512 VNNI).
pub fn cpu_has_vnni512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A frozen weight `[out, in]` as i8 for the int8 products: per 64-column block, per stretch,
/// per group of four inputs, the 64 columns' four bytes (the order `vpdpbusd` reads them).
#[derive(Debug)]
pub struct I8Weight {
    out_dim: usize,
    in_dim: usize,
    /// `[block][stretch][in / 4 within the stretch][64 columns][4]`.
    q: Vec<i8>,
    /// `[block][stretch][64]`: each column's scale for the stretch.
    scale: Vec<f32>,
    /// `[block][stretch][64]`: `-128 * sum(q)` over the stretch, each accumulator's start.
    start: Vec<i32>,
}

fn stretches(in_dim: usize) -> usize {
    in_dim.div_ceil(KC)
}

impl I8Weight {
    /// Quantizes `W[o][i] = w[o * strides.0 + i * strides.1]` (`out_dim x in_dim`), over the
    /// kernels' pool.
    pub fn new(w: &[f32], out_dim: usize, in_dim: usize, strides: (usize, usize)) -> Self {
        let (so, si) = strides;
        assert!(
            out_dim == 0 || in_dim == 0 || (out_dim - 1) * so + (in_dim - 1) * si < w.len(),
            "int8 weight: [{out_dim}, {in_dim}] with strides {strides:?} overruns {} values",
            w.len()
        );
        assert!(cpu_has_vnni512(), "int8 weights need AVX-512 VNNI");
        let blocks = out_dim.div_ceil(NB);
        let ns = stretches(in_dim);
        let block_q = ns * KC * NB;
        let mut q = vec![0i8; blocks * block_q];
        let mut scale = vec![0f32; blocks * ns * NB];
        let mut start = vec![0i32; blocks * ns * NB];
        let (qp, sp, stp) = (
            SharedMut(q.as_mut_ptr()),
            SharedMut(scale.as_mut_ptr()),
            SharedMut(start.as_mut_ptr()),
        );
        pool::for_range(blocks, |range| {
            // One stretch of the block's columns, `[KC][64]`, gathered so that a weight held
            // transposed is read along its rows and one held row-major 64 lines at a time.
            let mut tile = vec![0f32; KC * NB];
            for b in range {
                // SAFETY: block `b`'s parts of the three buffers, disjoint across blocks.
                let (q, scale, start) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qp.get().add(b * block_q), block_q),
                        std::slice::from_raw_parts_mut(sp.get().add(b * ns * NB), ns * NB),
                        std::slice::from_raw_parts_mut(stp.get().add(b * ns * NB), ns * NB),
                    )
                };
                let cols = NB.min(out_dim - b * NB);
                if cols < NB {
                    tile.fill(0.0);
                }
                for s in 0..ns {
                    let k0 = s * KC;
                    let len = KC.min(in_dim - k0);
                    let mut max = [0f32; NB];
                    let base = k0 * si + b * NB * so;
                    // SAFETY: AVX-512 checked above; the stretch's `len` rows of `cols` columns
                    // lie inside `w` (the assert above), the tile holds `KC x NB`.
                    unsafe { gather_stretch(w, base, (so, si), len, cols, &mut tile, &mut max) };
                    let mut sum = [0i32; NB];
                    // SAFETY: AVX-512 checked above; the tile's `len` rows, the stretch's part
                    // of `q`.
                    unsafe {
                        quantize_stretch(
                            &tile,
                            len,
                            &max,
                            &mut q[s * KC * NB..][..KC * NB],
                            &mut sum,
                        )
                    };
                    for j in 0..cols {
                        scale[s * NB + j] = max[j] / 127.0;
                        start[s * NB + j] = -128 * sum[j];
                    }
                }
            }
        });
        Self {
            out_dim,
            in_dim,
            q,
            scale,
            start,
        }
    }

    /// An input `x` `[rows, cols]` (row-major) for [`weight_grad`]: `x^T` `[cols, rows]` as a
    /// weight, each feature quantized per 32 rows.
    pub fn of_columns(x: &[f32], rows: usize, cols: usize) -> Self {
        Self::new(x, cols, rows, (1, cols))
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.q.len() + self.scale.len() * 4 + self.start.len() * 4
    }

    /// A new `[rows, out]` product `x W^T` for the quantized rows `x`.
    pub fn forward_new(&self, x: &I8Rows) -> Vec<f32> {
        let mut y = vec![0f32; x.rows * self.out_dim];
        self.forward_into(x, &mut y, false);
        y
    }

    /// `y[rows, out] (+)= x W^T`: added to `y` with `accumulate`, else overwriting it.
    pub fn forward_into(&self, x: &I8Rows, y: &mut [f32], accumulate: bool) {
        let _g = super::profile::prof("int8.product");
        assert_eq!(
            x.cols, self.in_dim,
            "int8 product: rows of {} inputs against a weight of {}",
            x.cols, self.in_dim
        );
        assert_eq!(y.len(), x.rows * self.out_dim, "int8 product: output size");
        if x.rows == 0 || self.out_dim == 0 {
            return;
        }
        let padded = self.out_dim.div_ceil(NB) * NB;
        if padded == self.out_dim {
            self.run(x, y, padded, accumulate);
        } else {
            let mut full = vec![0f32; x.rows * padded];
            self.run(x, &mut full, padded, false);
            for (d, s) in y
                .chunks_exact_mut(self.out_dim)
                .zip(full.chunks_exact(padded))
            {
                if accumulate {
                    for (d, s) in d.iter_mut().zip(s) {
                        *d += *s;
                    }
                } else {
                    d.copy_from_slice(&s[..self.out_dim]);
                }
            }
        }
    }

    /// The product into (or, with `accumulate`, added to) `y` with `stride` (a multiple of 64)
    /// columns per row.
    fn run(&self, x: &I8Rows, y: &mut [f32], stride: usize, accumulate: bool) {
        let blocks = stride / NB;
        let tiles = x.rows.div_ceil(MR);
        let ns = stretches(self.in_dim);
        let yp = SharedMut(y.as_mut_ptr());
        pool::for_range(blocks * tiles, |range| {
            for unit in range {
                let (b, t) = (unit / tiles, unit % tiles);
                let r0 = t * MR;
                let mr = MR.min(x.rows - r0);
                // SAFETY: `available()` (the callers' check) and the bounds: rows `r0..r0+mr`
                // of `x` and `y`, block `b`'s 64 columns of `y` (within `stride`), block
                // `b`'s weights. Tiles are disjoint blocks of `y`.
                unsafe {
                    let args = TileArgs {
                        x: x.q.as_ptr().add(r0 * x.stride),
                        x_stride: x.stride,
                        xs: x.scale.as_ptr().add(r0 * ns),
                        ns,
                        w: self.q.as_ptr().add(b * ns * KC * NB),
                        ws: self.scale.as_ptr().add(b * ns * NB),
                        start: self.start.as_ptr().add(b * ns * NB),
                        y: yp.get().add(r0 * stride + b * NB),
                        y_stride: stride,
                        accumulate,
                    };
                    match mr {
                        3 => tile::<3>(&args),
                        2 => tile::<2>(&args),
                        _ => tile::<1>(&args),
                    }
                }
            }
        });
    }

    /// The weight's values as the products see them (`scale * q`), `[out, in]` (tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let ns = stretches(self.in_dim);
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        for o in 0..self.out_dim {
            let (b, j) = (o / NB, o % NB);
            for i in 0..self.in_dim {
                let (s, kk) = (i / KC, i % KC);
                let q = self.q[b * ns * KC * NB + s * KC * NB + (kk / 4) * NB * 4 + j * 4 + kk % 4];
                w[o * self.in_dim + i] = self.scale[(b * ns + s) * NB + j] * q as f32;
            }
        }
        w
    }
}

/// A frozen weight `W` `[out, in]` in i8 in both orientations, for training on a frozen base
/// (LoRA, soft prompts) without AMX: the forward product `x W^T` and the input gradient
/// `dy W`, each quantized along its own sums' direction (per 32 inputs, per 32 outputs).
#[derive(Debug)]
pub struct I8Pair {
    fwd: Arc<I8Weight>,
    /// `W^T`, `[in, out]`; `None` in a pair made for forward products only
    /// ([`I8Pair::forward_only`]).
    bwd: Option<I8Weight>,
}

impl I8Pair {
    /// Both orientations of `W[o][i] = w[o * strides.0 + i * strides.1]`.
    pub fn new(w: &[f32], out_dim: usize, in_dim: usize, strides: (usize, usize)) -> Self {
        let _g = super::profile::prof("int8.pair.new");
        Self {
            fwd: Arc::new(I8Weight::new(w, out_dim, in_dim, strides)),
            bwd: Some(I8Weight::new(w, in_dim, out_dim, (strides.1, strides.0))),
        }
    }

    /// A pair whose input gradient is taken elsewhere (a trained weight, whose transposed copy
    /// the fused layer's backward pass makes from its f32 master copy): `input_grad` on it is a
    /// bug and panics.
    pub fn forward_only(fwd: I8Weight) -> Self {
        Self {
            fwd: Arc::new(fwd),
            bwd: None,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.fwd.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.fwd.in_dim
    }

    /// The forward orientation (what a prompt's products take).
    pub fn fwd(&self) -> &Arc<I8Weight> {
        &self.fwd
    }

    /// `y[rows, out] (+)= x W^T`.
    pub fn forward(&self, x: &I8Rows, y: &mut [f32], accumulate: bool) {
        self.fwd.forward_into(x, y, accumulate)
    }

    /// `dx[rows, in] (+)= dy W`.
    pub fn input_grad(&self, dy: &I8Rows, dx: &mut [f32], accumulate: bool) {
        match &self.bwd {
            Some(b) => b.forward_into(dy, dx, accumulate),
            None => panic!("int8 pair: an input gradient on a pair made for forward products"),
        }
    }

    /// Bytes held (both orientations).
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.as_ref().map_or(0, |b| b.bytes())
    }
}

/// The weight gradient `dy^T x` `[dout, din]` of a projection for its output gradient `dy`
/// `[rows, dout]` and its input `x` `[rows, din]` as [`I8Weight::of_columns`] holds it, as an
/// int8 product: both quantized per 32 rows (the sums run over the rows), `dy` per output
/// feature, `x` per input feature.
pub fn weight_grad(dy: &[f32], x: &I8Weight, rows: usize, dout: usize) -> Vec<f32> {
    assert_eq!(
        x.in_dim, rows,
        "int8 weight gradient: input of {} rows, not {rows}",
        x.in_dim
    );
    x.forward_new(&I8Rows::from_columns(dy, rows, dout))
}

impl candle_core::CustomOp1 for I8Weight {
    fn name(&self) -> &'static str {
        "attune-int8-matmul"
    }

    /// `x W^T` for `x` `[..., in]` (contiguous f32): its rows quantized, then the int8 product.
    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = super::f32_slice(storage, layout, "int8 matmul input")?;
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.in_dim) {
            candle_core::bail!(
                "int8 matmul: input {dims:?} does not end in {}",
                self.in_dim
            );
        }
        if !available() {
            candle_core::bail!("int8 matmul: this CPU has no AVX-512 VNNI");
        }
        let rows = x.len() / self.in_dim.max(1);
        let y = self.forward_new(&I8Rows::new(x, rows, self.in_dim));
        let mut od = dims.to_vec();
        if let Some(l) = od.last_mut() {
            *l = self.out_dim;
        }
        Ok((candle_core::CpuStorage::F32(y), od.into()))
    }
}

/// Activation rows quantized for [`I8Weight`]'s products: per row and stretch, i8 values
/// stored as `q + 128` (zero past the row's end: `128`) and the stretch's scale.
pub struct I8Rows {
    rows: usize,
    cols: usize,
    /// Bytes per row (the stretches' whole length).
    stride: usize,
    q: Vec<u8>,
    /// `[rows][stretch]`.
    scale: Vec<f32>,
}

impl I8Rows {
    /// Quantizes `x` `[rows, cols]` (row-major) over the kernels' pool. Needs [`available`].
    pub fn new(x: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            x.len(),
            rows * cols,
            "int8 rows: {rows} x {cols} against {}",
            x.len()
        );
        assert!(cpu_has_vnni512(), "int8 rows need AVX-512 VNNI");
        let _g = super::profile::prof("int8.rows.new");
        let ns = stretches(cols);
        let stride = ns * KC;
        let mut q = vec![128u8; rows * stride];
        let mut scale = vec![0f32; rows * ns];
        const ROWS_PER_TASK: usize = 8;
        let sp = SharedMut(scale.as_mut_ptr());
        pool::chunks_mut(&mut q, stride * ROWS_PER_TASK, |c, dst| {
            for (r, d) in dst.chunks_exact_mut(stride).enumerate() {
                let row = c * ROWS_PER_TASK + r;
                // SAFETY: row `row`'s scales, one task per row; AVX-512 checked above.
                unsafe {
                    let s = std::slice::from_raw_parts_mut(sp.get().add(row * ns), ns);
                    quantize_row(&x[row * cols..][..cols], d, s);
                }
            }
        });
        Self {
            rows,
            cols,
            stride,
            q,
            scale,
        }
    }

    /// The rows of `src^T` for `src` `[rows, cols]` (row-major): `cols` rows of `rows` values,
    /// each quantized per 32 of `src`'s rows, as [`Self::new`] would quantize the transposed
    /// copy, without making it. Over the kernels' pool, 16 columns per task.
    pub fn from_columns(src: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            src.len(),
            rows * cols,
            "int8 rows: {rows} x {cols} against {}",
            src.len()
        );
        assert!(cpu_has_vnni512(), "int8 rows need AVX-512 VNNI");
        let _g = super::profile::prof("int8.rows.columns");
        let ns = stretches(rows);
        let stride = ns * KC;
        let mut q = vec![128u8; cols * stride];
        let mut scale = vec![0f32; cols * ns];
        let sp = SharedMut(scale.as_mut_ptr());
        pool::chunks_mut(&mut q, stride * 16, |c, dst| {
            let c0 = c * 16;
            // SAFETY: columns `c0..c0 + 16`'s scales, one task per 16 columns; AVX-512 checked
            // above; `dst` holds those columns' rows of `stride` bytes.
            unsafe {
                let n = dst.len() / stride;
                let s = std::slice::from_raw_parts_mut(sp.get().add(c0 * ns), n * ns);
                quantize_columns(src, rows, cols, c0, n, dst, s);
            }
        });
        Self {
            rows: cols,
            cols: rows,
            stride,
            q,
            scale,
        }
    }

    /// The rows' values as the products see them (`scale * q`), `[rows, cols]` (tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let ns = stretches(self.cols);
        let mut x = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let q = self.q[r * self.stride + c] as i32 - 128;
                x[r * self.cols + c] = self.scale[r * ns + c / KC] * q as f32;
            }
        }
        x
    }
}

/// A weight stretch `tile` (`[len][64]`, the block's columns side by side; columns past the
/// weight's last are zero) quantized with each column's largest magnitude `max`: four rows at a
/// time, each column's four values rounded (nearest, ties to even) and laid side by side in one
/// 32-bit lane, the order `vpdpbusd` reads. Rows past `len` stay zero. Adds each column's
/// values to `sum`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_stretch(
    tile: &[f32],
    len: usize,
    max: &[f32; NB],
    q: &mut [i8],
    sum: &mut [i32; NB],
) {
    use std::arch::x86_64::*;
    let inv: [f32; NB] = std::array::from_fn(|j| if max[j] > 0.0 { 127.0 / max[j] } else { 0.0 });
    let byte = _mm512_set1_epi32(0xff);
    for v in 0..NB / 16 {
        // SAFETY (block): `inv`, `sum`, `tile` rows `< len` and `q` (`KC / 4` groups of 256
        // bytes) are indexed within their lengths.
        unsafe {
            let iv = _mm512_loadu_ps(inv.as_ptr().add(v * 16));
            let mut total = _mm512_setzero_si512();
            for t in 0..len.div_ceil(4) {
                let mut lane = _mm512_setzero_si512();
                for kk in 0..4.min(len - t * 4) {
                    let x = _mm512_loadu_ps(tile.as_ptr().add((t * 4 + kk) * NB + v * 16));
                    let qv = _mm512_cvtps_epi32(_mm512_mul_ps(x, iv));
                    total = _mm512_add_epi32(total, qv);
                    let shifted = _mm512_sllv_epi32(
                        _mm512_and_si512(qv, byte),
                        _mm512_set1_epi32(8 * kk as i32),
                    );
                    lane = _mm512_or_si512(lane, shifted);
                }
                _mm512_storeu_si512(q.as_mut_ptr().add(t * NB * 4 + v * 64) as *mut _, lane);
            }
            let prev = _mm512_loadu_si512(sum.as_ptr().add(v * 16) as *const _);
            _mm512_storeu_si512(
                sum.as_mut_ptr().add(v * 16) as *mut _,
                _mm512_add_epi32(prev, total),
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_stretch(_: &[f32], _: usize, _: &[f32; NB], _: &mut [i8], _: &mut [i32; NB]) {
    unreachable!("int8 products need x86-64 AVX-512 VNNI")
}

/// A stretch of a weight, `W[o][k] = w[base + (o - o0) * so + (k - k0) * si]` for its `len`
/// inputs and `cols` outputs, into `tile` (`[KC][NB]`, inputs by rows; columns past `cols` are
/// left as they are), with each column's largest magnitude in `max`. A weight held transposed
/// (`so == 1`) is copied row by row; a row-major one (`si == 1`) whole is transposed in 16 x 16
/// register tiles; anything else element by element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_stretch(
    w: &[f32],
    base: usize,
    (so, si): (usize, usize),
    len: usize,
    cols: usize,
    tile: &mut [f32],
    max: &mut [f32; NB],
) {
    use std::arch::x86_64::*;
    if so == 1 {
        let mask = |c: usize| -> __mmask16 {
            let n = 16.min(cols.saturating_sub(c));
            if n == 16 {
                !0
            } else {
                (1u16 << n) - 1
            }
        };
        let mut m = [_mm512_setzero_ps(); NB / 16];
        for kk in 0..len {
            for (v, mv) in m.iter_mut().enumerate() {
                let k = mask(16 * v);
                // SAFETY: the caller's bounds; the mask keeps the load within `cols`.
                unsafe {
                    let x = _mm512_maskz_loadu_ps(k, w.as_ptr().add(base + kk * si + 16 * v));
                    _mm512_mask_storeu_ps(tile.as_mut_ptr().add(kk * NB + 16 * v), k, x);
                    *mv = _mm512_max_ps(*mv, _mm512_abs_ps(x));
                }
            }
        }
        for (v, mv) in m.iter().enumerate() {
            // SAFETY: 16 floats of `max`.
            unsafe { _mm512_storeu_ps(max.as_mut_ptr().add(16 * v), *mv) };
        }
        return;
    }
    if si == 1 && len == KC && cols == NB {
        for j0 in (0..NB).step_by(16) {
            for k0 in (0..KC).step_by(16) {
                // SAFETY: rows `j0..j0 + 16` of the block (`so` apart), inputs `k0..k0 + 16`,
                // all inside `w`; their transposes inside the tile.
                unsafe {
                    super::transpose16(
                        w.as_ptr().add(base + j0 * so + k0),
                        so,
                        tile.as_mut_ptr().add(k0 * NB + j0),
                        NB,
                    )
                };
            }
        }
        let mut m = [_mm512_setzero_ps(); NB / 16];
        for kk in 0..KC {
            for (v, mv) in m.iter_mut().enumerate() {
                // SAFETY: inside the tile.
                let x = unsafe { _mm512_loadu_ps(tile.as_ptr().add(kk * NB + 16 * v)) };
                *mv = _mm512_max_ps(*mv, _mm512_abs_ps(x));
            }
        }
        for (v, mv) in m.iter().enumerate() {
            // SAFETY: 16 floats of `max`.
            unsafe { _mm512_storeu_ps(max.as_mut_ptr().add(16 * v), *mv) };
        }
        return;
    }
    for kk in 0..len {
        let row = &mut tile[kk * NB..][..cols];
        let at = base + kk * si;
        for (j, (v, m)) in row.iter_mut().zip(max.iter_mut()).enumerate() {
            *v = w[at + j * so];
            *m = m.max(v.abs());
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gather_stretch(
    _: &[f32],
    _: usize,
    _: (usize, usize),
    _: usize,
    _: usize,
    _: &mut [f32],
    _: &mut [f32; NB],
) {
    unreachable!("int8 products need x86-64 AVX-512 VNNI")
}

/// One row: per stretch, the largest magnitude sets the scale (`max / 127`), each value is
/// rounded to the nearest step (ties to even) and stored plus 128.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row(x: &[f32], dst: &mut [u8], scales: &mut [f32]) {
    use std::arch::x86_64::*;
    let cols = x.len();
    for (s, sc) in scales.iter_mut().enumerate() {
        let k0 = s * KC;
        let len = KC.min(cols - k0);
        let src = &x[k0..k0 + len];
        let mut m = _mm512_setzero_ps();
        for c in (0..len).step_by(16) {
            let n = 16.min(len - c);
            let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
            // SAFETY: the mask keeps the load within `src`.
            let v = unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr().add(c)) };
            m = _mm512_max_ps(m, _mm512_abs_ps(v));
        }
        let max = _mm512_reduce_max_ps(m);
        *sc = max / 127.0;
        let inv = _mm512_set1_ps(if max > 0.0 { 127.0 / max } else { 0.0 });
        let off = _mm512_set1_epi32(128);
        for c in (0..len).step_by(16) {
            let n = 16.min(len - c);
            let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
            // SAFETY: as above; the store's mask keeps it within `dst` (`k0 + c + n <= stride`).
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(c));
                // Round to nearest even (the default mode), as the weight's quantization.
                let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), off);
                _mm512_mask_cvtepi32_storeu_epi8(dst.as_mut_ptr().add(k0 + c) as *mut _, mask, q);
            }
        }
    }
}

/// Columns `c0..c0 + n` (`n <= 16`) of `src` `[rows, cols]` quantized along the rows: per
/// stretch of 32 rows, each column's largest magnitude sets its scale (`max / 127`), its values
/// rounded to the nearest step (ties to even) and stored plus 128 in its row of `dst`
/// (`stride` bytes per column), the scales in `scales` (`[column][stretch]`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_columns(
    src: &[f32],
    rows: usize,
    cols: usize,
    c0: usize,
    n: usize,
    dst: &mut [u8],
    scales: &mut [f32],
) {
    use std::arch::x86_64::*;
    let ns = stretches(rows);
    let stride = ns * KC;
    let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
    let off = _mm512_set1_epi32(128);
    // One stretch's quantized bytes, `[32 rows][16 columns]`, then written column by column.
    let mut tile = [[128u8; 16]; KC];
    // A whole stretch of 16 columns, transposed: `[16 columns][32 rows]`.
    let mut cols_f32 = [0f32; 16 * KC];
    for s in 0..ns {
        let r0 = s * KC;
        let len = KC.min(rows - r0);
        if n == 16 && len == KC {
            let cp = cols_f32.as_mut_ptr();
            // SAFETY: rows `r0..r0 + 32` and columns `c0..c0 + 16` lie inside `src`; their
            // transposes fill `cols_f32`; each column's 32 bytes lie inside its row of `dst`.
            unsafe {
                let at = src.as_ptr().add(r0 * cols + c0);
                super::transpose16(at, cols, cp, KC);
                super::transpose16(at.add(16 * cols), cols, cp.add(16), KC);
                for j in 0..16 {
                    let (lo, hi) = (
                        _mm512_loadu_ps(cp.add(j * KC)),
                        _mm512_loadu_ps(cp.add(j * KC + 16)),
                    );
                    let max =
                        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
                    scales[j * ns + s] = max / 127.0;
                    let inv = _mm512_set1_ps(if max > 0.0 { 127.0 / max } else { 0.0 });
                    let out = dst.as_mut_ptr().add(j * stride + r0);
                    for (h, v) in [lo, hi].into_iter().enumerate() {
                        let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), off);
                        _mm_storeu_si128(out.add(16 * h) as *mut _, _mm512_cvtepi32_epi8(q));
                    }
                }
            }
            continue;
        }
        let mut m = _mm512_setzero_ps();
        for kk in 0..len {
            // SAFETY: row `r0 + kk < rows`, columns `c0..c0 + n` within `cols` (the mask).
            let v = unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr().add((r0 + kk) * cols + c0)) };
            m = _mm512_max_ps(m, _mm512_abs_ps(v));
        }
        let mut max = [0f32; 16];
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(max.as_mut_ptr(), m) };
        for j in 0..n {
            scales[j * ns + s] = max[j] / 127.0;
        }
        let nonzero = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, _mm512_setzero_ps());
        let inv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(127.0), m);
        for (kk, t) in tile.iter_mut().enumerate().take(len) {
            // SAFETY: as above; `t` is 16 bytes.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add((r0 + kk) * cols + c0));
                let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), off);
                _mm_storeu_si128(t.as_mut_ptr() as *mut _, _mm512_cvtepi32_epi8(q));
            }
        }
        for (j, row) in dst.chunks_exact_mut(stride).take(n).enumerate() {
            for (kk, d) in row[r0..r0 + len].iter_mut().enumerate() {
                *d = tile[kk][j];
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_columns(
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: &mut [u8],
    _: &mut [f32],
) {
    unreachable!("int8 products need x86-64 AVX-512 VNNI")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_row(_: &[f32], _: &mut [u8], _: &mut [f32]) {
    unreachable!("int8 products need x86-64 AVX-512 VNNI")
}

/// One register tile's pointers (see [`I8Weight::run`]).
struct TileArgs {
    x: *const u8,
    x_stride: usize,
    xs: *const f32,
    ns: usize,
    w: *const i8,
    ws: *const f32,
    start: *const i32,
    y: *mut f32,
    y_stride: usize,
    /// Add the tile to `y` rather than store it.
    accumulate: bool,
}

/// `y[R rows, 64 columns] = x W^T` for one tile: per stretch, the integer accumulators (`R` x 4
/// registers of 16 columns) start at the stretch's `-128 * sum(w)`, take `KC / 4` rounds of
/// `vpdpbusd` (four weight registers, one broadcast of four activation bytes per row), and are
/// scaled into the f32 sums, which are stored at the end.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize>(a: &TileArgs) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller's bounds (see `run`).
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        let mut sum = [[_mm512_setzero_ps(); 4]; R];
        for s in 0..a.ns {
            let st = a.start.add(s * NB);
            let starts = [
                _mm512_loadu_si512(st as *const _),
                _mm512_loadu_si512(st.add(16) as *const _),
                _mm512_loadu_si512(st.add(32) as *const _),
                _mm512_loadu_si512(st.add(48) as *const _),
            ];
            for row in acc.iter_mut() {
                *row = starts;
            }
            let w = a.w.add(s * KC * NB);
            let x = a.x.add(s * KC);
            for t in 0..KC / 4 {
                let wt = w.add(t * NB * 4);
                let wv = [
                    _mm512_loadu_si512(wt as *const _),
                    _mm512_loadu_si512(wt.add(64) as *const _),
                    _mm512_loadu_si512(wt.add(128) as *const _),
                    _mm512_loadu_si512(wt.add(192) as *const _),
                ];
                for (r, row) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_epi32(
                        (x.add(r * a.x_stride + t * 4) as *const i32).read_unaligned(),
                    );
                    row[0] = _mm512_dpbusd_epi32(row[0], xb, wv[0]);
                    row[1] = _mm512_dpbusd_epi32(row[1], xb, wv[1]);
                    row[2] = _mm512_dpbusd_epi32(row[2], xb, wv[2]);
                    row[3] = _mm512_dpbusd_epi32(row[3], xb, wv[3]);
                }
            }
            let ws = a.ws.add(s * NB);
            let wsv = [
                _mm512_loadu_ps(ws),
                _mm512_loadu_ps(ws.add(16)),
                _mm512_loadu_ps(ws.add(32)),
                _mm512_loadu_ps(ws.add(48)),
            ];
            for r in 0..R {
                let xs = _mm512_set1_ps(*a.xs.add(r * a.ns + s));
                for v in 0..4 {
                    sum[r][v] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(acc[r][v]),
                        _mm512_mul_ps(wsv[v], xs),
                        sum[r][v],
                    );
                }
            }
        }
        for (r, row) in sum.iter().enumerate() {
            let y = a.y.add(r * a.y_stride);
            for (v, f) in row.iter().enumerate() {
                let yv = y.add(v * 16);
                if a.accumulate {
                    _mm512_storeu_ps(yv, _mm512_add_ps(_mm512_loadu_ps(yv), *f));
                } else {
                    _mm512_storeu_ps(yv, *f);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const R: usize>(_: &TileArgs) {
    unreachable!("int8 products need x86-64 AVX-512 VNNI")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values;

    /// `got` `[m, n]` equals `a b^T` for `a` `[m, k]` and `b` `[n, k]` (the quantized values)
    /// summed in f64, within 1e-5 of the terms' magnitudes (the integer sums are exact; only
    /// the f32 scaling rounds).
    fn assert_product_of(a: &[f32], b: &[f32], k: usize, got: &[f32], what: &str) {
        let (m, n) = (a.len() / k, b.len() / k);
        assert_eq!(got.len(), m * n, "{what}: output size");
        for r in 0..m {
            for c in 0..n {
                let terms = (0..k).map(|t| a[r * k + t] as f64 * b[c * k + t] as f64);
                let exact: f64 = terms.clone().sum();
                let mag: f64 = terms.map(f64::abs).sum();
                let v = got[r * n + c] as f64;
                assert!(
                    (v - exact).abs() <= 1e-5 * mag + 1e-30,
                    "{what} ({r}, {c}): {v} vs {exact}"
                );
            }
        }
    }

    /// The products equal an f64 product of the quantized values the kernel holds (the integer
    /// sums are exact; only the f32 scaling rounds), for every tile height, a column count that
    /// is not a multiple of 64, input widths with and without a partial stretch, and weights
    /// held row-major and transposed; and the quantization stays within half a step of each
    /// value.
    #[test]
    fn int8_products_equal_the_product_of_their_quantized_values() {
        if !cpu_has_vnni512() {
            eprintln!("note: no AVX-512 VNNI here: the int8 products are not tested");
            return;
        }
        for &(rows, out, inp) in &[
            (1, 64, 128),
            (5, 64, 576),
            (6, 192, 576),
            (7, 100, 200),
            (41, 576, 576),
            (13, 64, 1536),
            (130, 128, 72),
        ] {
            let x = test_values(rows * inp, 3);
            let w = test_values(out * inp, 7);
            let wt: Vec<f32> = (0..inp * out)
                .map(|t| w[(t % out) * inp + t / out])
                .collect();
            let xq = I8Rows::new(&x, rows, inp);
            let xv = xq.to_f32();
            for (held, strides) in [(&w, (inp, 1)), (&wt, (1, out))] {
                let wq = I8Weight::new(held, out, inp, strides);
                let wv = wq.to_f32();
                let y = wq.forward_new(&xq);
                let what = format!("[{rows}, {out}, {inp}] {strides:?}");
                assert_product_of(&xv, &wv, inp, &y, &what);
                // Half a step of the column's stretch scale (the largest magnitude / 127).
                for o in 0..out {
                    for s in 0..inp.div_ceil(KC) {
                        let range = s * KC..(s * KC + KC).min(inp);
                        let max = range
                            .clone()
                            .map(|i| w[o * inp + i].abs())
                            .fold(0f32, f32::max);
                        for i in range {
                            let err = (wv[o * inp + i] - w[o * inp + i]).abs();
                            assert!(err <= max / 254.0 * 1.0001, "weight ({o}, {i}): {err}");
                        }
                    }
                }
            }
            for r in 0..rows {
                for s in 0..inp.div_ceil(KC) {
                    let range = s * KC..(s * KC + KC).min(inp);
                    let max = range
                        .clone()
                        .map(|i| x[r * inp + i].abs())
                        .fold(0f32, f32::max);
                    for i in range {
                        let err = (xv[r * inp + i] - x[r * inp + i]).abs();
                        assert!(err <= max / 254.0 * 1.0001, "activation ({r}, {i}): {err}");
                    }
                }
            }
        }
    }

    /// `I8Rows::from_columns` holds exactly what `I8Rows::new` makes of the transposed copy
    /// (bytes and scales), for column counts below, at and past 16 and row counts with partial
    /// stretches, a zero column included; and `weight_grad` equals the f64 product of those
    /// quantized values.
    #[test]
    fn column_quantization_equals_the_transposed_rows() {
        if !cpu_has_vnni512() {
            return;
        }
        for &(rows, cols) in &[(32, 16), (70, 5), (64, 37), (1, 40), (100, 576)] {
            let mut src = test_values(rows * cols, 11);
            for r in 0..rows {
                src[r * cols + cols / 2] = 0.0;
            }
            let t = crate::kernels::transpose(&src, rows, cols);
            let (a, b) = (
                I8Rows::from_columns(&src, rows, cols),
                I8Rows::new(&t, cols, rows),
            );
            assert_eq!((a.rows, a.cols, a.stride), (b.rows, b.cols, b.stride));
            assert!(a.q == b.q, "[{rows}, {cols}]: bytes differ");
            assert!(a.scale == b.scale, "[{rows}, {cols}]: scales differ");
        }
        let (rows, dout, din) = (70, 40, 24);
        let dy = test_values(rows * dout, 5);
        let x = test_values(rows * din, 6);
        let dw = weight_grad(&dy, &I8Weight::of_columns(&x, rows, din), rows, dout);
        let a = I8Rows::from_columns(&dy, rows, dout).to_f32(); // [dout, rows]
        let b = I8Weight::new(&x, din, rows, (1, din)).to_f32(); // [din, rows]
        assert_product_of(&a, &b, rows, &dw, "dW");
    }

    /// Zero rows and zero stretches quantize to zero (no division by a zero scale).
    #[test]
    fn zero_inputs_give_zero_products() {
        if !cpu_has_vnni512() {
            return;
        }
        let x = vec![0f32; 3 * 130];
        let w = test_values(64 * 130, 1);
        let y = I8Weight::new(&w, 64, 130, (130, 1)).forward_new(&I8Rows::new(&x, 3, 130));
        assert!(y.iter().all(|v| *v == 0.0));
    }
}
