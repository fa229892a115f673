//! The quantized matmul for decoding: Q4_1, Q8_0 and the K-quants Q4_K, Q5_K and Q6_K (GGUF)
//! repacked for integer dot products against activations quantized per 32-block (as llama.cpp's
//! Q8_1), with AVX-512 VNNI, AVX2 or scalar kernels chosen at run time, split over candle's thread
//! pool by output row.
//!
//! The K-quants keep their packed codes as the file has them (a 64-weight chunk's 32 code bytes
//! hold its first 32 weights in the low nibbles and the next 32 in the high ones, the order the
//! activations come in), so a chunk is one 512-bit load, shift and mask; their 6-bit scales and
//! mins are unpacked to bytes and the super-block scales to f32 at load: 4.75 bits per weight for
//! Q4_K (4.5 in the file), 5.75 for Q5_K (5.5), 6.6 for Q6_K (6.56), against 6 for the repacked
//! Q4_1 (5 in the file).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};

use crate::{Error, Result};

/// The block formats [`Q41Matrix`] multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `w = d * q + m`, 4-bit `q`, per 32 weights.
    Q41,
    /// `w = d * q`, `q` i8, per 32 weights.
    Q80,
    /// Super-blocks of 256: `w = d * sc_j * q - dmin * m_j`, 4-bit `q`, 6-bit `sc`/`m` per 32.
    Q4K,
    /// As Q4_K with a fifth bit per weight.
    Q5K,
    /// Super-blocks of 256: `w = d * sc_g * (q - 32)`, 6-bit `q`, i8 `sc` per 16.
    Q6K,
}

/// candle multiplies Q4_1 and the K-quants with scalar or AVX2 loops on one thread per row block;
/// this kernel quantizes the activation rows to 8 bits per 32-block (as llama.cpp's Q8_1) and uses
/// AVX-512 VNNI (else AVX2) integer dot products, split over candle's thread pool by output row.
/// Used for calls with few rows (decode).
#[derive(Debug)]
pub struct Q41Matrix {
    /// Q4_1: 16 code bytes per 32 weights; Q8_0: 32; Q4_K/Q5_K: 128 per 256; Q6_K: the 128
    /// low-nibble bytes per 256.
    qs: Vec<u8>,
    /// Per block (Q4_1, Q8_0) or super-block (K-quants): the scale `d`.
    d: Vec<f32>,
    /// Q4_1: the offset `m` per block; Q4_K/Q5_K: `dmin` per super-block.
    m: Vec<f32>,
    /// Q5_K: 32 high-bit bytes per super-block; Q6_K: 64 bytes of 2-bit pairs.
    qh: Vec<u8>,
    /// Q4_K/Q5_K: 8 scales then 8 mins per super-block (6-bit values as bytes); Q6_K: 16 i8
    /// scales.
    sc: Vec<u8>,
    n: usize,
    k: usize,
    kind: Kind,
}

const QK: usize = 32;
const QK_K: usize = 256;

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block's 12 scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl Q41Matrix {
    /// `out = x W^T` for `rows` rows of `x` (`[rows, k]`) on the kernels this CPU runs: the
    /// product the op computes, for an op that fuses it with others (a decode layer).
    pub(crate) fn forward_into(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        assert!(
            x.len() == rows * self.k && out.len() == rows * self.n,
            "quantized matmul: {} inputs and {} outputs for {rows} rows of [{}, {}]",
            x.len(),
            out.len(),
            self.n,
            self.k
        );
        self.matmul(x, rows, out, detected_isa());
    }

    /// Repacks a Q4_1, Q8_0, Q4_K, Q5_K or Q6_K `[n, k]` tensor; `None` for other block types.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let (kind, block, block_bytes) = match q.dtype() {
            GgmlDType::Q4_1 => (Kind::Q41, QK, 20usize),
            GgmlDType::Q8_0 => (Kind::Q80, QK, 34),
            GgmlDType::Q4K => (Kind::Q4K, QK_K, 144),
            GgmlDType::Q5K => (Kind::Q5K, QK_K, 176),
            GgmlDType::Q6K => (Kind::Q6K, QK_K, 210),
            _ => return Ok(None),
        };
        let (n, k) = q.shape().dims2()?;
        if k % block != 0 {
            return Ok(None);
        }
        let nb = k / block;
        let data = q.data()?;
        if data.len() != n * nb * block_bytes {
            return Err(Error::InvalidParams(format!(
                "{:?} tensor [{n}, {k}] holds {} bytes, expected {}",
                q.dtype(),
                data.len(),
                n * nb * block_bytes
            )));
        }
        let blocks = n * nb;
        let mut out = Q41Matrix {
            qs: Vec::with_capacity(blocks * block / 2),
            d: Vec::with_capacity(blocks),
            m: Vec::new(),
            qh: Vec::new(),
            sc: Vec::new(),
            n,
            k,
            kind,
        };
        for blk in data.chunks_exact(block_bytes) {
            match kind {
                Kind::Q41 => {
                    out.d.push(f16_at(blk, 0));
                    out.m.push(f16_at(blk, 2));
                    out.qs.extend_from_slice(&blk[4..20]);
                }
                Kind::Q80 => {
                    out.d.push(f16_at(blk, 0));
                    out.qs.extend_from_slice(&blk[2..34]);
                }
                Kind::Q4K | Kind::Q5K => {
                    out.d.push(f16_at(blk, 0));
                    out.m.push(f16_at(blk, 2));
                    let scales = &blk[4..16];
                    let (sc, mn): (Vec<u8>, Vec<u8>) =
                        (0..8).map(|j| scale_min_k4(j, scales)).unzip();
                    out.sc.extend_from_slice(&sc);
                    out.sc.extend_from_slice(&mn);
                    if kind == Kind::Q4K {
                        out.qs.extend_from_slice(&blk[16..144]);
                    } else {
                        out.qh.extend_from_slice(&blk[16..48]);
                        out.qs.extend_from_slice(&blk[48..176]);
                    }
                }
                Kind::Q6K => {
                    out.qs.extend_from_slice(&blk[0..128]);
                    out.qh.extend_from_slice(&blk[128..192]);
                    out.sc.extend_from_slice(&blk[192..208]);
                    out.d.push(f16_at(blk, 208));
                }
            }
        }
        Ok(Some(out))
    }

    /// Bytes the kernel reads per output row (for comparing formats).
    pub fn row_bytes(&self) -> usize {
        let n = self.n.max(1);
        (self.qs.len() + self.qh.len() + self.sc.len() + 4 * (self.d.len() + self.m.len())) / n
    }

    /// The rows of `parts` stacked in order; `None` if they differ in block type or width.
    pub(crate) fn concat(parts: &[Arc<Q41Matrix>]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.k != first.k || p.kind != first.kind) {
            return None;
        }
        let sum = |f: fn(&Q41Matrix) -> usize| parts.iter().map(|p| f(p)).sum::<usize>();
        let mut out = Q41Matrix {
            qs: Vec::with_capacity(sum(|p| p.qs.len())),
            d: Vec::with_capacity(sum(|p| p.d.len())),
            m: Vec::with_capacity(sum(|p| p.m.len())),
            qh: Vec::with_capacity(sum(|p| p.qh.len())),
            sc: Vec::with_capacity(sum(|p| p.sc.len())),
            n: 0,
            k: first.k,
            kind: first.kind,
        };
        for p in parts {
            out.qs.extend_from_slice(&p.qs);
            out.d.extend_from_slice(&p.d);
            out.m.extend_from_slice(&p.m);
            out.qh.extend_from_slice(&p.qh);
            out.sc.extend_from_slice(&p.sc);
            out.n += p.n;
        }
        Some(out)
    }

    /// Output rows `n` and contraction length `k` (the weight is `[n, k]`).
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Weights per block along a row: 32 (Q4_1, Q8_0) or 256 (the K-quants). A column range
    /// [`Self::cols_f32`] expands starts and ends on these boundaries (or at `k`).
    pub fn block_len(&self) -> usize {
        match self.kind {
            Kind::Q41 | Kind::Q80 => QK,
            Kind::Q4K | Kind::Q5K | Kind::Q6K => QK_K,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.qs.len() + self.qh.len() + self.sc.len() + 4 * (self.d.len() + self.m.len())
    }

    /// Block `b` of row `r` as f32 into `out` (`block_len` values), as the GGUF formats define
    /// them (the same values candle's `dequantize` gives).
    fn dequant_block(&self, r: usize, b: usize, out: &mut [f32]) {
        let w = self.row(r);
        match self.kind {
            Kind::Q41 => {
                let (d, m) = (w.d[b], w.m[b]);
                let q = &w.qs[b * 16..(b + 1) * 16];
                for j in 0..16 {
                    out[j] = d * (q[j] & 0x0F) as f32 + m;
                    out[j + 16] = d * (q[j] >> 4) as f32 + m;
                }
            }
            Kind::Q80 => {
                let d = w.d[b];
                for (o, &q) in out[..QK].iter_mut().zip(&w.qs[b * QK..(b + 1) * QK]) {
                    *o = d * (q as i8) as f32;
                }
            }
            Kind::Q4K | Kind::Q5K => {
                let five = self.kind == Kind::Q5K;
                let qs = &w.qs[b * 128..(b + 1) * 128];
                let sc = &w.sc[b * 16..b * 16 + 16];
                for sub in 0..8 {
                    let (j, half) = (sub / 2, sub % 2);
                    let dl = w.d[b] * sc[sub] as f32;
                    let ml = w.m[b] * sc[8 + sub] as f32;
                    for l in 0..32 {
                        let byte = qs[32 * j + l];
                        let mut q = if half == 0 { byte & 0xF } else { byte >> 4 };
                        if five {
                            q |= ((w.qh[b * 32 + l] >> sub) & 1) << 4;
                        }
                        out[32 * sub + l] = dl * q as f32 - ml;
                    }
                }
            }
            Kind::Q6K => {
                for n in 0..2 {
                    let ql = &w.qs[b * 128 + 64 * n..b * 128 + 64 * (n + 1)];
                    let qh = &w.qh[b * 64 + 32 * n..b * 64 + 32 * (n + 1)];
                    for c in 0..2 {
                        for l in 0..64 {
                            let scale = w.sc[b * 16 + 8 * n + 4 * c + l / 16] as i8 as f32;
                            let byte = ql[l];
                            let lo = if c == 0 { byte & 0xF } else { byte >> 4 };
                            let h = (qh[l % 32] >> (4 * c + 2 * (l / 32))) & 3;
                            let q = (lo | (h << 4)) as i32 - 32;
                            out[128 * n + 64 * c + l] = w.d[b] * scale * q as f32;
                        }
                    }
                }
            }
        }
    }

    /// Rows `r0..r1` as f32, row-major `[r1 - r0, k]` into `out`, rows in parallel.
    pub fn rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let (k, bl) = (self.k, self.block_len());
        out[..(r1 - r0) * k]
            .par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(i, row)| {
                for (b, blk) in row.chunks_exact_mut(bl).enumerate() {
                    self.dequant_block(r0 + i, b, blk);
                }
            });
    }

    /// Columns `c0..c1` of every row as f32, row-major `[n, c1 - c0]` into `out`, rows in
    /// parallel. `c0` and `c1` lie on block boundaries (`c1` may be `k`).
    pub fn cols_f32(&self, c0: usize, c1: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let bl = self.block_len();
        assert!(
            c0 % bl == 0 && (c1 % bl == 0 || c1 == self.k) && c0 <= c1 && c1 <= self.k,
            "Q41Matrix::cols_f32: columns {c0}..{c1} are not whole blocks of {bl}"
        );
        let w = c1 - c0;
        out[..self.n * w]
            .par_chunks_mut(w.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                for (i, blk) in row.chunks_exact_mut(bl).enumerate() {
                    self.dequant_block(r, c0 / bl + i, blk);
                }
            });
    }

    /// Row `r`'s share of each array.
    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.k / QK;
        let nsb = self.k / QK_K;
        fn at<T>(v: &[T], r: usize, per: usize) -> &[T] {
            if v.is_empty() {
                v
            } else {
                &v[r * per..(r + 1) * per]
            }
        }
        match self.kind {
            Kind::Q41 => Row {
                qs: at(&self.qs, r, nb * 16),
                d: at(&self.d, r, nb),
                m: at(&self.m, r, nb),
                qh: &[],
                sc: &[],
            },
            Kind::Q80 => Row {
                qs: at(&self.qs, r, nb * QK),
                d: at(&self.d, r, nb),
                m: &[],
                qh: &[],
                sc: &[],
            },
            Kind::Q4K | Kind::Q5K => Row {
                qs: at(&self.qs, r, nsb * 128),
                d: at(&self.d, r, nsb),
                m: at(&self.m, r, nsb),
                qh: at(&self.qh, r, nsb * 32),
                sc: at(&self.sc, r, nsb * 16),
            },
            Kind::Q6K => Row {
                qs: at(&self.qs, r, nsb * 128),
                d: at(&self.d, r, nsb),
                m: &[],
                qh: at(&self.qh, r, nsb * 64),
                sc: at(&self.sc, r, nsb * 16),
            },
        }
    }

    /// Row `r` times one quantized activation row (`xq` codes, `xd` scales and `xs` scaled sums
    /// per 32-block), with the best kernel the CPU has.
    fn dot(&self, r: usize, xq: &[i8], xd: &[f32], xs: &[f32], isa: Isa) -> f32 {
        let w = self.row(r);
        match (self.kind, isa) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY (every arm below): the ISA was detected at run time (`Isa::detect`).
            (Kind::Q80, Isa::Vnni) => unsafe { dot_row_vnni::<false>(&w, xq, xd, xs) },
            #[cfg(target_arch = "x86_64")]
            (Kind::Q80, Isa::Avx2) => unsafe { dot_q80_avx2(w.qs, w.d, xq, xd) },
            (Kind::Q80, _) => dot_q80_scalar(w.qs, w.d, xq, xd),
            #[cfg(target_arch = "x86_64")]
            (Kind::Q41, Isa::Vnni) => unsafe { dot_row_vnni::<true>(&w, xq, xd, xs) },
            #[cfg(target_arch = "x86_64")]
            (Kind::Q41, Isa::Avx2) => unsafe { dot_q41_avx2(w.qs, w.d, w.m, xq, xd, xs) },
            (Kind::Q41, _) => dot_q41_scalar(w.qs, w.d, w.m, xq, xd, xs),
            #[cfg(target_arch = "x86_64")]
            (Kind::Q4K | Kind::Q5K, Isa::Vnni) => unsafe { dot_q45k_vnni(&w, xq, xd, xs) },
            #[cfg(target_arch = "x86_64")]
            (Kind::Q4K | Kind::Q5K, Isa::Avx2) => unsafe { dot_q45k_avx2(&w, xq, xd, xs) },
            (Kind::Q4K | Kind::Q5K, _) => dot_q45k_scalar(&w, xq, xd, xs),
            #[cfg(target_arch = "x86_64")]
            (Kind::Q6K, Isa::Vnni) => unsafe { dot_q6k_vnni(&w, xq, xd) },
            #[cfg(target_arch = "x86_64")]
            (Kind::Q6K, Isa::Avx2) => unsafe { dot_q6k_avx2(&w, xq, xd) },
            (Kind::Q6K, _) => dot_q6k_scalar(&w, xq, xd),
        }
    }

    /// Rows `r..r + step` (`step` 4 or 1) of a Q4_1 or Q8_0 matrix times activation row `i`
    /// into `out[..step]`, by [`dot_rows_vnni`] (the caller checked the CPU has AVX-512 VNNI).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn dot_rows_vnni(
        &self,
        r: usize,
        step: usize,
        qx: &[i8],
        dx: &[f32],
        sx: &[f32],
        i: usize,
        out: &mut [f32; 4],
    ) {
        let nb = self.k / QK;
        let code = if self.kind == Kind::Q41 { 16 } else { QK };
        let qs = &self.qs[r * nb * code..];
        let d = &self.d[r * nb..];
        let m = if self.kind == Kind::Q41 {
            &self.m[r * nb..]
        } else {
            &[]
        };
        let (xq, xd, xs) = (
            &qx[i * self.k..(i + 1) * self.k],
            &dx[i * nb..(i + 1) * nb],
            &sx[i * nb..(i + 1) * nb],
        );
        // SAFETY: the caller detected AVX-512 VNNI (`Isa::Vnni`); the kernel asserts its bounds.
        unsafe {
            match (self.kind == Kind::Q41, step) {
                (true, 4) => dot_rows_vnni::<4, true>(qs, d, m, nb, xq, xd, xs, out),
                (false, 4) => dot_rows_vnni::<4, false>(qs, d, m, nb, xq, xd, xs, out),
                (true, _) => {
                    let mut one = [0f32; 1];
                    dot_rows_vnni::<1, true>(qs, d, m, nb, xq, xd, xs, &mut one);
                    out[0] = one[0];
                }
                (false, _) => {
                    let mut one = [0f32; 1];
                    dot_rows_vnni::<1, false>(qs, d, m, nb, xq, xd, xs, &mut one);
                    out[0] = one[0];
                }
            }
        }
    }

    /// Asks the CPU to bring row `r`'s bytes into cache (nothing past the last row): the
    /// one-row kernels' loads otherwise wait on memory (see [`dot_rows_vnni`]).
    fn prefetch_row(&self, r: usize) {
        if r < self.n {
            let w = self.row(r);
            super::prefetch(w.qs);
            super::prefetch(w.d);
            super::prefetch(w.m);
            super::prefetch(w.qh);
            super::prefetch(w.sc);
        }
    }

    /// `out[i, r] = sum_j x[i, j] * w[r, j]` for `x` `[rows, k]`.
    fn matmul(&self, x: &[f32], rows: usize, out: &mut [f32], isa: Isa) {
        let (n, k) = (self.n, self.k);
        let nb = k / QK;
        let (qx, dx, sx) = quantize_activations(x, rows * nb);
        struct OutPtr(*mut f32);
        // SAFETY: every (row, column) of `out` is written by exactly one work item below.
        unsafe impl Sync for OutPtr {}
        let ptr = OutPtr(out.as_mut_ptr());
        let ptr = &ptr;
        let (qx, dx, sx) = (&qx, &dx, &sx);
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Vnni && matches!(self.kind, Kind::Q41 | Kind::Q80) {
            candle_core::utils::barrier_pool().execute_chunked(n, |range| {
                let mut r = range.start;
                while r < range.end {
                    let step = if r + 4 <= range.end { 4 } else { 1 };
                    for i in 0..rows {
                        let mut v = [0f32; 4];
                        self.dot_rows_vnni(r, step, qx, dx, sx, i, &mut v);
                        for (j, &v) in v[..step].iter().enumerate() {
                            // SAFETY: i < rows, r + j < n: inside `out` (rows * n), written once.
                            unsafe { *ptr.0.add(i * n + r + j) = v };
                        }
                    }
                    r += step;
                }
            });
            return;
        }
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            for r in range {
                self.prefetch_row(r + 2);
                for i in 0..rows {
                    let v = self.dot(
                        r,
                        &qx[i * k..(i + 1) * k],
                        &dx[i * nb..(i + 1) * nb],
                        &sx[i * nb..(i + 1) * nb],
                        isa,
                    );
                    // SAFETY: i < rows, r < n: inside `out` (rows * n), written once.
                    unsafe { *ptr.0.add(i * n + r) = v };
                }
            }
        });
    }
}

/// Activations quantized per 32-block (as llama.cpp's Q8_1): i8 codes, the scale of each block
/// and the scale times the sum of its codes, for `blocks` blocks of `x`. On AVX-512 the same
/// codes, scales and sums as the scalar loop, bit for bit (each decoded token quantizes four
/// activations per layer; the scalar `round` call was ~3% of decode).
fn quantize_activations(x: &[f32], blocks: usize) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    let mut qx = vec![0i8; blocks * QK];
    let mut dx = vec![0f32; blocks];
    let mut sx = vec![0f32; blocks];
    let x = &x[..blocks * QK];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX512F detected; `x` and `qx` hold `blocks` blocks, `dx` and `sx` `blocks`
        // values.
        unsafe { quantize_blocks_avx512(x, &mut qx, &mut dx, &mut sx) };
        return (qx, dx, sx);
    }
    quantize_blocks_scalar(x, &mut qx, &mut dx, &mut sx);
    (qx, dx, sx)
}

/// The scalar form of [`quantize_activations`]: the reference the AVX-512 form equals.
fn quantize_blocks_scalar(x: &[f32], qx: &mut [i8], dx: &mut [f32], sx: &mut [f32]) {
    for (i, (d_out, s_out)) in dx.iter_mut().zip(sx.iter_mut()).enumerate() {
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
        *d_out = d;
        *s_out = d * sum as f32;
    }
}

/// [`quantize_blocks_scalar`] on AVX-512, with the same results: the block maximum ignores NaN
/// as `f32::max` does (a NaN in the first operand of `vmaxps` yields the second), `round` is
/// emulated exactly (truncate, then step away from zero where the dropped fraction is at least
/// one half), NaN codes become 0 and the rest saturate to i8 as `as i8` does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_blocks_avx512(x: &[f32], qx: &mut [i8], dx: &mut [f32], sx: &mut [f32]) {
    use std::arch::x86_64::*;
    let blocks = dx.len();
    assert!(x.len() >= blocks * QK && qx.len() >= blocks * QK && sx.len() >= blocks);
    let half = _mm512_set1_ps(0.5);
    let one = _mm512_set1_ps(1.0);
    for i in 0..blocks {
        // SAFETY: block i's 32 values lie inside `x` and `qx` (asserted above).
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_ps(x.as_ptr().add(i * QK)),
                _mm512_loadu_ps(x.as_ptr().add(i * QK + 16)),
            )
        };
        let m = _mm512_max_ps(
            _mm512_abs_ps(v1),
            _mm512_max_ps(_mm512_abs_ps(v0), _mm512_setzero_ps()),
        );
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let inv_v = _mm512_set1_ps(inv);
        let mut sum = 0i32;
        for (h, v) in [v0, v1].into_iter().enumerate() {
            let y = _mm512_mul_ps(v, inv_v);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let frac = _mm512_abs_ps(_mm512_sub_ps(y, t));
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
            // copysign(1, y): y's sign bit on 1.0.
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(one),
                _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(i32::MIN)),
            ));
            let r = _mm512_mask_add_ps(t, away, t, step);
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y);
            let r = _mm512_maskz_mov_ps(ordered, r);
            // Saturating: at most 127.5 in magnitude by construction, so within i32 first.
            let q32 = _mm512_cvttps_epi32(_mm512_max_ps(
                _mm512_min_ps(r, _mm512_set1_ps(127.0)),
                _mm512_set1_ps(-128.0),
            ));
            sum += _mm512_reduce_add_epi32(q32);
            // SAFETY: 16 codes at block i's half h, inside `qx`.
            unsafe {
                _mm_storeu_si128(
                    qx.as_mut_ptr().add(i * QK + 16 * h).cast(),
                    _mm512_cvtsepi32_epi8(q32),
                )
            };
        }
        dx[i] = d;
        sx[i] = d * sum as f32;
    }
}

/// One output row's share of a [`Q41Matrix`].
struct Row<'a> {
    qs: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
    qh: &'a [u8],
    sc: &'a [u8],
}

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW/VNNI.
    Vnni,
    /// AVX2 + FMA.
    Avx2,
    Scalar,
}

impl Isa {
    /// The best this CPU has.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if vnni512() {
                return Isa::Vnni;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => vnni512(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// `x` `[rows, k]` times `w^T` with the kernels of `isa` (tests and benches compare them).
pub fn matmul_with(w: &Q41Matrix, x: &[f32], rows: usize, isa: Isa) -> Result<Vec<f32>> {
    if x.len() != rows * w.k || !isa.available() {
        return Err(Error::InvalidParams(format!(
            "quantized matmul: {} values for {rows} rows of {}, or {isa:?} not available",
            x.len(),
            w.k
        )));
    }
    let mut out = vec![0f32; rows * w.n];
    w.matmul(x, rows, &mut out, isa);
    Ok(out)
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

/// Two consecutive Q4_1 blocks' 32 code bytes at `p` as 64 unsigned bytes in the activations'
/// order: the 64-bit lanes spread to [0, 1, 0, 1, 2, 3, 2, 3] (block b's codes twice, then block
/// b + 1's twice), the second copy of each shifted right by 4 (its high nibbles), masked to 4 bits.
///
/// # Safety
/// The CPU must have AVX512F/BW; `p` must be valid for reads of 32 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn q41_pair_codes(p: *const u8) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let spread = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0);
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
    // SAFETY: the caller guarantees 32 readable bytes at `p`.
    let raw = unsafe { _mm256_loadu_si256(p as *const __m256i) };
    let dup = _mm512_permutexvar_epi64(spread, _mm512_castsi256_si512(raw));
    _mm512_and_si512(_mm512_srlv_epi16(dup, shifts), _mm512_set1_epi8(0x0F))
}

/// One row of a Q4_1 (`Q4`) or Q8_0 matrix times one quantized activation row: the row-group
/// kernel with one row ([`Q41Matrix::dot`]'s VNNI arm).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VNNI.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_row_vnni<const Q4: bool>(w: &Row<'_>, xq: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
    let mut out = [0f32; 1];
    // SAFETY: the caller guarantees the CPU features; the kernel asserts its bounds.
    unsafe { dot_rows_vnni::<1, Q4>(w.qs, w.d, w.m, w.d.len(), xq, xd, xs, &mut out) };
    out[0]
}

/// `R` consecutive rows of a Q4_1 (`Q4`) or Q8_0 matrix times one quantized activation row, the
/// decode path's kernel: each 64 activation bytes are loaded once for the `R` rows, and the
/// per-block scales are multiplied sixteen blocks at a time in vectors (`wd * xd`, then one lane
/// permute per block pair) rather than as scalars per block. Q8_0's signed activations enter
/// `vpdpbusd` as `x + 128` (unsigned), and a second `vpdpbusd` takes `128 * sum(w)` back out, in
/// integers (exact). Its sums run in the order of the one-row kernel it replaced, so decode's
/// outputs did not move (2026-12-05).
///
/// The next row groups' bytes are prefetched: on this kernel's test machine (a 2-vCPU VM) the
/// hardware prefetchers left the decode loads waiting, and software prefetch took decode from
/// ~116 to ~187 tok/s.
///
/// `qs`, `d`, `m` are the matrix's arrays from row `r0` on (`m` unused for Q8_0); `nb` blocks
/// per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_rows_vnni<const R: usize, const Q4: bool>(
    qs: &[u8],
    d: &[f32],
    m: &[f32],
    nb: usize,
    xq: &[i8],
    xd: &[f32],
    xs: &[f32],
    out: &mut [f32; R],
) {
    use std::arch::x86_64::*;
    let code = if Q4 { 16 } else { QK };
    assert!(
        qs.len() >= R * nb * code
            && d.len() >= R * nb
            && (!Q4 || m.len() >= R * nb)
            && xq.len() >= nb * QK
            && xd.len() >= nb
            && xs.len() >= nb
    );
    let bias = _mm512_set1_epi8(-128i8);
    let zero = _mm512_setzero_si512();
    // Lanes 0-7 take a pair's first block's scale, lanes 8-15 its second's.
    let first_pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let two = _mm512_set1_epi32(2);
    let mut acc = [_mm512_setzero_ps(); R];
    let paired = nb & !1;
    let ahead = 2 * R.max(2);
    let mut c = 0;
    while c < paired {
        let len = (paired - c).min(16);
        let mask: __mmask16 = ((1u32 << len) - 1) as u16;
        // SAFETY (the loads below): blocks c..c + len lie inside every row's arrays and the
        // activation arrays (asserted above; masked lanes are not read).
        let xdc = unsafe { _mm512_maskz_loadu_ps(mask, xd.as_ptr().add(c)) };
        let mut prod = [_mm512_setzero_ps(); R];
        for (j, pj) in prod.iter_mut().enumerate() {
            // Two row groups ahead (a hint: an address past the end is not read).
            _mm_prefetch::<_MM_HINT_T0>(d.as_ptr().wrapping_add((j + ahead) * nb + c) as *const i8);
            if Q4 {
                _mm_prefetch::<_MM_HINT_T0>(
                    m.as_ptr().wrapping_add((j + ahead) * nb + c) as *const i8
                );
            }
            let wd = unsafe { _mm512_maskz_loadu_ps(mask, d.as_ptr().add(j * nb + c)) };
            *pj = _mm512_mul_ps(wd, xdc);
        }
        let mut idx = first_pair;
        let mut b = c;
        while b < c + len {
            let x = unsafe { _mm512_loadu_si512(xq.as_ptr().add(b * QK) as *const _) };
            // Q8_0: x + 128 as unsigned bytes (its sign bit flipped), 128 * sum(w) taken back out.
            let x = if Q4 { x } else { _mm512_xor_si512(x, bias) };
            for j in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(
                    qs.as_ptr().wrapping_add(((j + ahead) * nb + b) * code) as *const i8,
                );
                let w = if Q4 {
                    unsafe { q41_pair_codes(qs.as_ptr().add((j * nb + b) * 16)) }
                } else {
                    unsafe { _mm512_loadu_si512(qs.as_ptr().add((j * nb + b) * QK) as *const _) }
                };
                let dp = if Q4 {
                    _mm512_dpbusd_epi32(zero, w, x)
                } else {
                    _mm512_sub_epi32(
                        _mm512_dpbusd_epi32(zero, x, w),
                        _mm512_dpbusd_epi32(zero, bias, w),
                    )
                };
                let s = _mm512_permutexvar_ps(idx, prod[j]);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), s, acc[j]);
            }
            idx = _mm512_add_epi32(idx, two);
            b += 2;
        }
        c += len;
    }
    for j in 0..R {
        let tail = if paired < nb {
            let (wq, wd) = (&qs[(j * nb + paired) * code..], &d[j * nb + paired..]);
            let (xq, xd, xs) = (&xq[paired * QK..], &xd[paired..], &xs[paired..]);
            if Q4 {
                dot_q41_scalar(
                    &wq[..code],
                    &wd[..1],
                    &m[j * nb + paired..][..1],
                    xq,
                    xd,
                    xs,
                )
            } else {
                dot_q80_scalar(&wq[..code], &wd[..1], xq, xd)
            }
        } else {
            0.0
        };
        // Q4_1's offset term summed in scalars, pairs in order, as the one-row kernel this one
        // replaced did (a vector sum in another order flipped a near-tie of greedy decoding in
        // `models/tests/generate.rs`).
        let mut offsets = 0f32;
        if Q4 {
            let wm = &m[j * nb..j * nb + paired];
            for (w, x) in wm.chunks_exact(2).zip(xs.chunks_exact(2)) {
                offsets += w[0] * x[0] + w[1] * x[1];
            }
        }
        out[j] = _mm512_reduce_add_ps(acc[j]) + offsets + tail;
    }
}

// ---------------------------------------------------------------------------------------------
// K-quants
// ---------------------------------------------------------------------------------------------

/// Q4_K / Q5_K row times quantized activations: per 32-weight sub-block
/// `d * sc * xd * sum(q x) - dmin * m * xs`.
fn dot_q45k_scalar(w: &Row, xq: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
    let five = !w.qh.is_empty();
    let mut acc = 0f32;
    for s in 0..w.d.len() {
        let qs = &w.qs[s * 128..(s + 1) * 128];
        let sc = &w.sc[s * 16..s * 16 + 16];
        for sub in 0..8 {
            let (j, half) = (sub / 2, sub % 2);
            let b = s * 8 + sub;
            let mut isum = 0i32;
            for l in 0..32 {
                let byte = qs[32 * j + l];
                let mut q = if half == 0 { byte & 0xF } else { byte >> 4 } as i32;
                if five {
                    q |= (((w.qh[s * 32 + l] >> sub) & 1) as i32) << 4;
                }
                isum += q * xq[b * QK + l] as i32;
            }
            acc +=
                w.d[s] * sc[sub] as f32 * xd[b] * isum as f32 - w.m[s] * sc[8 + sub] as f32 * xs[b];
        }
    }
    acc
}

/// Q6_K row times quantized activations: per 16 weights `d * sc * xd * sum((q - 32) x)`.
fn dot_q6k_scalar(w: &Row, xq: &[i8], xd: &[f32]) -> f32 {
    let mut acc = 0f32;
    for s in 0..w.d.len() {
        for n in 0..2 {
            let ql = &w.qs[s * 128 + 64 * n..s * 128 + 64 * (n + 1)];
            let qh = &w.qh[s * 64 + 32 * n..s * 64 + 32 * (n + 1)];
            for c in 0..2 {
                for g in 0..4 {
                    let scale = w.sc[s * 16 + 8 * n + 4 * c + g] as i8 as f32;
                    let mut isum = 0i32;
                    for l in 16 * g..16 * (g + 1) {
                        let byte = ql[l];
                        let lo = if c == 0 { byte & 0xF } else { byte >> 4 };
                        let h = (qh[l % 32] >> (4 * c + 2 * (l / 32))) & 3;
                        let q = (lo | (h << 4)) as i32 - 32;
                        let e = s * QK_K + 128 * n + 64 * c + l;
                        isum += q * xq[e] as i32;
                    }
                    let b = (s * QK_K + 128 * n + 64 * c + 16 * g) / QK;
                    acc += w.d[s] * scale * xd[b] * isum as f32;
                }
            }
        }
    }
    acc
}

/// [`dot_q45k_scalar`] with AVX-512 VNNI: a 64-weight chunk's 32 code bytes twice in one
/// register, the second copy shifted to its high nibbles (and Q5_K's fifth bits or'ed in), one
/// `vpdpbusd` for all 64 products; lanes 0-7 are the first sub-block, 8-15 the second.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_q45k_vnni(w: &Row, xq: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nsb = w.d.len();
    let five = !w.qh.is_empty();
    assert!(
        w.qs.len() >= nsb * 128
            && w.sc.len() >= nsb * 16
            && w.m.len() >= nsb
            && xq.len() >= nsb * QK_K
            && xd.len() >= nsb * 8
            && xs.len() >= nsb * 8
            && (!five || w.qh.len() >= nsb * 32)
    );
    let mask = _mm512_set1_epi8(0x0F);
    let one = _mm512_set1_epi8(1);
    // Shift the upper copy right by 4 (its high nibbles).
    let nib = _mm512_set_epi64(
        4 * 0x0001_0001_0001_0001,
        4 * 0x0001_0001_0001_0001,
        4 * 0x0001_0001_0001_0001,
        4 * 0x0001_0001_0001_0001,
        0,
        0,
        0,
        0,
    );
    let zero = _mm512_setzero_si512();
    let mut acc = _mm512_setzero_ps();
    let mut acc_m = 0f32;
    for s in 0..nsb {
        let qh = if five {
            // SAFETY: super-block s's 32 high-bit bytes lie inside `qh` (asserted).
            let h = unsafe { _mm256_loadu_si256(w.qh.as_ptr().add(s * 32) as *const __m256i) };
            _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1)
        } else {
            zero
        };
        let (d, dmin) = (w.d[s], w.m[s]);
        let sc = &w.sc[s * 16..s * 16 + 16];
        for j in 0..4 {
            // SAFETY: chunk j of super-block s: 32 code bytes and 64 activation bytes inside the
            // slices (asserted above).
            let (raw, x) = unsafe {
                (
                    _mm256_loadu_si256(w.qs.as_ptr().add(s * 128 + 32 * j) as *const __m256i),
                    _mm512_loadu_si512(xq.as_ptr().add(s * QK_K + 64 * j) as *const _),
                )
            };
            let dup = _mm512_inserti64x4(_mm512_castsi256_si512(raw), raw, 1);
            let mut wv = _mm512_and_si512(_mm512_srlv_epi16(dup, nib), mask);
            if five {
                let (lo, hi) = (2 * j as i64, 2 * j as i64 + 1);
                let rep = |c: i64| c * 0x0001_0001_0001_0001;
                let shifts = _mm512_set_epi64(
                    rep(hi),
                    rep(hi),
                    rep(hi),
                    rep(hi),
                    rep(lo),
                    rep(lo),
                    rep(lo),
                    rep(lo),
                );
                let bits = _mm512_and_si512(_mm512_srlv_epi16(qh, shifts), one);
                wv = _mm512_or_si512(wv, _mm512_slli_epi16(bits, 4));
            }
            let dp = _mm512_dpbusd_epi32(zero, wv, x);
            let b = s * 8 + 2 * j;
            let scale = _mm512_mask_blend_ps(
                0xFF00,
                _mm512_set1_ps(d * sc[2 * j] as f32 * xd[b]),
                _mm512_set1_ps(d * sc[2 * j + 1] as f32 * xd[b + 1]),
            );
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, acc);
            acc_m += dmin * (sc[8 + 2 * j] as f32 * xs[b] + sc[9 + 2 * j] as f32 * xs[b + 1]);
        }
    }
    _mm512_reduce_add_ps(acc) - acc_m
}

/// [`dot_q6k_scalar`] with AVX-512 VNNI: 64 weights per `vpdpbusd` (codes 0..63 as unsigned
/// bytes), less `32 * sum(x)` from a second `vpdpbusd`; each 4-lane group (16 weights) takes its
/// own scale.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_q6k_vnni(w: &Row, xq: &[i8], xd: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nsb = w.d.len();
    assert!(
        w.qs.len() >= nsb * 128
            && w.qh.len() >= nsb * 64
            && w.sc.len() >= nsb * 16
            && xq.len() >= nsb * QK_K
            && xd.len() >= nsb * 8
    );
    let low4 = _mm512_set1_epi8(0x0F);
    let low2 = _mm512_set1_epi8(0x03);
    let c32 = _mm512_set1_epi8(32);
    let zero = _mm512_setzero_si512();
    let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let rep = |c: i64| c * 0x0001_0001_0001_0001;
    let mut acc = _mm512_setzero_ps();
    for s in 0..nsb {
        let d = w.d[s];
        for n in 0..2 {
            // SAFETY: half n of super-block s: 64 low-nibble bytes and 32 high-bit bytes inside
            // the slices (asserted above).
            let (l, h) = unsafe {
                (
                    _mm512_loadu_si512(w.qs.as_ptr().add(s * 128 + 64 * n) as *const _),
                    _mm256_loadu_si256(w.qh.as_ptr().add(s * 64 + 32 * n) as *const __m256i),
                )
            };
            let hd = _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
            for c in 0..2 {
                let lo = if c == 0 {
                    _mm512_and_si512(l, low4)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16(l, 4), low4)
                };
                let (a, b) = (4 * c as i64, 4 * c as i64 + 2);
                let shifts = _mm512_set_epi64(
                    rep(b),
                    rep(b),
                    rep(b),
                    rep(b),
                    rep(a),
                    rep(a),
                    rep(a),
                    rep(a),
                );
                let hb = _mm512_and_si512(_mm512_srlv_epi16(hd, shifts), low2);
                let wv = _mm512_or_si512(lo, _mm512_slli_epi16(hb, 4));
                let e = s * QK_K + 128 * n + 64 * c;
                // SAFETY: 64 activation bytes at e inside `xq` (asserted).
                let x = unsafe { _mm512_loadu_si512(xq.as_ptr().add(e) as *const _) };
                let dp = _mm512_sub_epi32(
                    _mm512_dpbusd_epi32(zero, wv, x),
                    _mm512_dpbusd_epi32(zero, c32, x),
                );
                let at = s * 16 + 8 * n + 4 * c;
                let four = i32::from_le_bytes([w.sc[at], w.sc[at + 1], w.sc[at + 2], w.sc[at + 3]]);
                let scales = _mm512_cvtepi32_ps(_mm512_permutexvar_epi32(
                    spread,
                    _mm512_cvtepi8_epi32(_mm_cvtsi32_si128(four)),
                ));
                let blk = e / QK;
                let dx = _mm512_mask_blend_ps(
                    0xFF00,
                    _mm512_set1_ps(d * xd[blk]),
                    _mm512_set1_ps(d * xd[blk + 1]),
                );
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_mul_ps(scales, dx), acc);
            }
        }
    }
    _mm512_reduce_add_ps(acc)
}

/// Horizontal sum of 8 f32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// [`dot_q45k_scalar`] with AVX2: one 32-weight sub-block per `maddubs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q45k_avx2(w: &Row, xq: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nsb = w.d.len();
    let five = !w.qh.is_empty();
    assert!(
        w.qs.len() >= nsb * 128
            && w.sc.len() >= nsb * 16
            && w.m.len() >= nsb
            && xq.len() >= nsb * QK_K
            && xd.len() >= nsb * 8
            && xs.len() >= nsb * 8
            && (!five || w.qh.len() >= nsb * 32)
    );
    let mask = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0f32;
    for s in 0..nsb {
        // SAFETY: super-block s's high-bit bytes lie inside `qh` (asserted).
        let qh = if five {
            unsafe { _mm256_loadu_si256(w.qh.as_ptr().add(s * 32) as *const __m256i) }
        } else {
            _mm256_setzero_si256()
        };
        let (d, dmin) = (w.d[s], w.m[s]);
        let sc = &w.sc[s * 16..s * 16 + 16];
        for j in 0..4 {
            // SAFETY: chunk j's 32 code bytes inside `qs` (asserted).
            let raw = unsafe {
                _mm256_loadu_si256(w.qs.as_ptr().add(s * 128 + 32 * j) as *const __m256i)
            };
            for half in 0..2 {
                let sub = 2 * j + half;
                let mut wv = if half == 0 {
                    _mm256_and_si256(raw, mask)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask)
                };
                if five {
                    let bits =
                        _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(sub as i32)), one);
                    wv = _mm256_or_si256(wv, _mm256_slli_epi16(bits, 4));
                }
                let b = s * 8 + sub;
                // SAFETY: activation block b inside `xq` (asserted).
                let x = unsafe { _mm256_loadu_si256(xq.as_ptr().add(b * QK) as *const __m256i) };
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x), ones);
                acc = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(p),
                    _mm256_set1_ps(d * sc[sub] as f32 * xd[b]),
                    acc,
                );
                acc_m += dmin * sc[8 + sub] as f32 * xs[b];
            }
        }
    }
    // SAFETY: AVX2 is enabled for this function.
    unsafe { hsum256(acc) - acc_m }
}

/// [`dot_q6k_scalar`] with AVX2: one 32-weight half-chunk per `maddubs`, less `32 * sum(x)`;
/// lanes 0-3 and 4-7 take the scales of their 16 weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q6k_avx2(w: &Row, xq: &[i8], xd: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nsb = w.d.len();
    assert!(
        w.qs.len() >= nsb * 128
            && w.qh.len() >= nsb * 64
            && w.sc.len() >= nsb * 16
            && xq.len() >= nsb * QK_K
            && xd.len() >= nsb * 8
    );
    let low4 = _mm256_set1_epi8(0x0F);
    let low2 = _mm256_set1_epi8(0x03);
    let c32 = _mm256_set1_epi8(32);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for s in 0..nsb {
        let d = w.d[s];
        for n in 0..2 {
            // SAFETY: half n's 32 high-bit bytes inside `qh` (asserted).
            let h =
                unsafe { _mm256_loadu_si256(w.qh.as_ptr().add(s * 64 + 32 * n) as *const __m256i) };
            for c in 0..2 {
                for t in 0..2 {
                    // SAFETY: 32 low-nibble bytes inside `qs` (asserted).
                    let l = unsafe {
                        _mm256_loadu_si256(
                            w.qs.as_ptr().add(s * 128 + 64 * n + 32 * t) as *const __m256i
                        )
                    };
                    let lo = if c == 0 {
                        _mm256_and_si256(l, low4)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(l, 4), low4)
                    };
                    let shift = _mm_cvtsi32_si128((4 * c + 2 * t) as i32);
                    let hb = _mm256_and_si256(_mm256_srl_epi16(h, shift), low2);
                    let wv = _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4));
                    let e = s * QK_K + 128 * n + 64 * c + 32 * t;
                    // SAFETY: 32 activation bytes at e inside `xq` (asserted).
                    let x = unsafe { _mm256_loadu_si256(xq.as_ptr().add(e) as *const __m256i) };
                    let p = _mm256_sub_epi32(
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x), ones),
                        _mm256_madd_epi16(_mm256_maddubs_epi16(c32, x), ones),
                    );
                    let g = s * 16 + 8 * n + 4 * c + 2 * t;
                    let scale = _mm256_blend_ps(
                        _mm256_set1_ps(w.sc[g] as i8 as f32),
                        _mm256_set1_ps(w.sc[g + 1] as i8 as f32),
                        0xF0,
                    );
                    let dx = _mm256_set1_ps(d * xd[e / QK]);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(scale, dx), acc);
                }
            }
        }
    }
    // SAFETY: AVX2 is enabled for this function.
    unsafe { hsum256(acc) }
}

/// [`Isa::detect`], once.
fn detected_isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(Isa::detect)
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
        self.matmul(x, rows, &mut out, detected_isa());
        let mut od = dims.to_vec();
        if let Some(l) = od.last_mut() {
            *l = self.n;
        }
        Ok((candle_core::CpuStorage::F32(out), od.into()))
    }
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
    fn vector_activation_quantization_equals_the_scalar_one() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 on this CPU: nothing to compare");
            return;
        }
        // Random blocks at several magnitudes, then blocks built to land on rounding ties
        // (values whose code is exactly k + 0.5, both signs), all zeros, a lone NaN, an
        // infinity, negative zeros and denormals.
        let mut x: Vec<f32> = bytes(64 * QK * 4, 11)
            .chunks_exact(4)
            .enumerate()
            .map(|(i, b)| {
                let u = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let v = (u >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                v * [1e-3f32, 1.0, 37.0, 1e4][i / (16 * QK)]
            })
            .collect();
        let mut tie = vec![127.0f32];
        tie.extend((0..31).map(|j| (j as f32 - 15.0) + 0.5));
        x.extend(&tie);
        x.extend(tie.iter().map(|v| -v));
        x.extend([0.0f32; QK]);
        let mut odd = vec![0.25f32; QK];
        odd[3] = f32::NAN;
        odd[7] = -0.0;
        odd[9] = 1e-40;
        x.extend(&odd);
        odd[3] = f32::INFINITY;
        x.extend(&odd);
        let blocks = x.len() / QK;
        let (mut q0, mut d0, mut s0) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0f32; blocks]);
        quantize_blocks_scalar(&x, &mut q0, &mut d0, &mut s0);
        let (q1, d1, s1) = quantize_activations(&x, blocks);
        assert_eq!(q0, q1, "codes");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d0), bits(&d1), "scales");
        assert_eq!(bits(&s0), bits(&s1), "scaled sums");
        // The tie blocks do hold ties: codes of +-k.5 round away from zero.
        let t = 64 * QK;
        assert_eq!(q0[t + 1], -15, "-14.5 rounds to -15");
        assert_eq!(q0[t + 16], 1, "0.5 rounds to 1");
        assert_eq!(q0[t + QK + 16], -1, "-0.5 rounds to -1");
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
            let (mut a4, mut a8) = ([0f32; 1], [0f32; 1]);
            unsafe {
                dot_rows_vnni::<1, true>(&w4, &wd, &wm, nb, &xq, &xd, &xs, &mut a4);
                dot_rows_vnni::<1, false>(&w8, &wd, &[], nb, &xq, &xd, &xs, &mut a8);
            }
            let (a4, a8) = (a4[0], a8[0]);
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

    /// The decode kernel on four rows at once and on one: every row equals the scalar kernel, and
    /// each row of a group equals that row alone bit for bit, for rows shorter than one 16-block
    /// chunk, longer than one, and with an odd tail block.
    #[test]
    fn row_group_kernel_equals_the_scalar_one_per_row() {
        if !vnni512() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        for nb in [1usize, 2, 5, 18, 33, 48] {
            let xq: Vec<i8> = bytes(nb * QK, 3).into_iter().map(|b| b as i8).collect();
            let xd: Vec<f32> = (0..nb).map(|i| 0.01 + i as f32 * 0.003).collect();
            // As `quantize_activations` makes them: each block's scale times its codes' sum (the
            // Q8_0 kernel takes its unsigned codes' excess back out with them).
            let xs: Vec<f32> = (0..nb)
                .map(|i| {
                    xd[i]
                        * xq[i * QK..(i + 1) * QK]
                            .iter()
                            .map(|&q| q as f32)
                            .sum::<f32>()
                })
                .collect();
            let wd: Vec<f32> = (0..4 * nb).map(|i| 0.02 + (i % 7) as f32 * 0.001).collect();
            let wm: Vec<f32> = (0..4 * nb).map(|i| -0.1 + (i % 5) as f32 * 0.01).collect();
            let w4 = bytes(4 * nb * 16, 17);
            let w8 = bytes(4 * nb * QK, 19);
            let (mut a4, mut a8) = ([0f32; 4], [0f32; 4]);
            let (mut o4, mut o8) = ([0f32; 1], [0f32; 1]);
            // SAFETY: vnni512() checked the CPU features.
            unsafe {
                dot_rows_vnni::<4, true>(&w4, &wd, &wm, nb, &xq, &xd, &xs, &mut a4);
                dot_rows_vnni::<4, false>(&w8, &wd, &[], nb, &xq, &xd, &xs, &mut a8);
                dot_rows_vnni::<1, true>(
                    &w4[3 * nb * 16..],
                    &wd[3 * nb..],
                    &wm[3 * nb..],
                    nb,
                    &xq,
                    &xd,
                    &xs,
                    &mut o4,
                );
                dot_rows_vnni::<1, false>(
                    &w8[3 * nb * QK..],
                    &wd[3 * nb..],
                    &[],
                    nb,
                    &xq,
                    &xd,
                    &xs,
                    &mut o8,
                );
            }
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
            for j in 0..4 {
                let r = j * nb..(j + 1) * nb;
                let b4 = dot_q41_scalar(
                    &w4[j * nb * 16..(j + 1) * nb * 16],
                    &wd[r.clone()],
                    &wm[r.clone()],
                    &xq,
                    &xd,
                    &xs,
                );
                let b8 = dot_q80_scalar(&w8[j * nb * QK..(j + 1) * nb * QK], &wd[r], &xq, &xd);
                assert!(close(a4[j], b4), "q4_1 nb {nb} row {j}: {} vs {b4}", a4[j]);
                assert!(close(a8[j], b8), "q8_0 nb {nb} row {j}: {} vs {b8}", a8[j]);
                // And bit for bit the same row taken alone (the same sums in the same order, so
                // how rows fall into groups never changes a result).
                let (mut v4, mut v8) = ([0f32; 1], [0f32; 1]);
                // SAFETY: vnni512() checked the CPU features.
                unsafe {
                    dot_rows_vnni::<1, true>(
                        &w4[j * nb * 16..],
                        &wd[j * nb..],
                        &wm[j * nb..],
                        nb,
                        &xq,
                        &xd,
                        &xs,
                        &mut v4,
                    );
                    dot_rows_vnni::<1, false>(
                        &w8[j * nb * QK..],
                        &wd[j * nb..],
                        &[],
                        nb,
                        &xq,
                        &xd,
                        &xs,
                        &mut v8,
                    );
                }
                assert_eq!(a4[j].to_bits(), v4[0].to_bits(), "q4_1 nb {nb} row {j}");
                assert_eq!(a8[j].to_bits(), v8[0].to_bits(), "q8_0 nb {nb} row {j}");
                if j == 3 {
                    assert!(close(o4[0], b4), "q4_1 nb {nb} one row: {} vs {b4}", o4[0]);
                    assert!(close(o8[0], b8), "q8_0 nb {nb} one row: {} vs {b8}", o8[0]);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod format_tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Every format against candle's own dequantization: the scalar kernel equals the dot product
    /// of the dequantized weights with the dequantized activations (so the unpacking is right),
    /// and the AVX2 and AVX-512 VNNI kernels equal the scalar one.
    #[test]
    fn kernels_equal_the_dequantized_product() {
        let dev = Device::Cpu;
        let (n, k, rows) = (200, 768, 3);
        let w = (Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap()
            + Tensor::randn(0.3f32, 0.05, (n, k), &dev).unwrap())
        .unwrap();
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, k), &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let deq: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let m = Q41Matrix::from_qtensor(&q).unwrap().unwrap();
            let (qx, dx, _) = quantize_activations(&x, rows * k / QK);
            let xdeq: Vec<f32> = qx
                .iter()
                .enumerate()
                .map(|(i, &c)| c as f32 * dx[i / QK])
                .collect();
            let scalar = matmul_with(&m, &x, rows, Isa::Scalar).unwrap();
            for i in 0..rows {
                for r in 0..n {
                    let want: f64 = (0..k)
                        .map(|j| deq[r * k + j] as f64 * xdeq[i * k + j] as f64)
                        .sum();
                    let got = scalar[i * n + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-3 * want.abs().max(1.0),
                        "{dtype:?} row {r}: scalar {got} vs dequantized {want}"
                    );
                }
            }
            for isa in [Isa::Avx2, Isa::Vnni] {
                if !isa.available() {
                    eprintln!("{isa:?} not available on this CPU: not compared");
                    continue;
                }
                let fast = matmul_with(&m, &x, rows, isa).unwrap();
                for (a, b) in fast.iter().zip(&scalar) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{dtype:?} {isa:?}: {a} vs scalar {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn k_quant_rows_are_compact_and_concatenate() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 512), &dev).unwrap();
        for (dtype, file_bits, max_bits) in [
            (GgmlDType::Q4K, 4.5, 4.8),
            (GgmlDType::Q5K, 5.5, 5.8),
            (GgmlDType::Q6K, 6.5625, 6.7),
            (GgmlDType::Q4_1, 5.0, 6.0),
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let m = Arc::new(Q41Matrix::from_qtensor(&q).unwrap().unwrap());
            let bits = m.row_bytes() as f64 * 8.0 / 512.0;
            assert!(
                bits >= file_bits && bits <= max_bits,
                "{dtype:?}: {bits} bits per weight"
            );
            let both = Q41Matrix::concat(&[m.clone(), m.clone()]).unwrap();
            let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
            let one = matmul_with(&m, &x, 1, Isa::Scalar).unwrap();
            let two = matmul_with(&both, &x, 1, Isa::Scalar).unwrap();
            assert_eq!(&two[..8], &one[..]);
            assert_eq!(&two[8..], &one[..]);
        }
        // Formats do not mix, and widths that are not whole super-blocks are left to candle.
        let a = Arc::new(
            Q41Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4K).unwrap())
                .unwrap()
                .unwrap(),
        );
        let b = Arc::new(
            Q41Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q6K).unwrap())
                .unwrap()
                .unwrap(),
        );
        assert!(Q41Matrix::concat(&[a, b]).is_none());
        let narrow = Tensor::randn(0f32, 1.0, (4, 256 + 32), &dev).unwrap();
        let q = QTensor::quantize(&narrow, GgmlDType::Q8_0).unwrap();
        assert!(Q41Matrix::from_qtensor(&q).unwrap().is_some());
    }
}
