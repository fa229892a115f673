//! The quantized matmul for decoding: Q4_1 and Q8_0 weights (GGUF) repacked for integer dot
//! products against activations quantized per 32-block (as llama.cpp's Q8_1), with AVX-512 VNNI,
//! AVX2 or scalar kernels chosen at run time, split over candle's thread pool by output row.

use std::sync::Arc;

use candle_core::quantized::QTensor;

use crate::{Error, Result};

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
    pub(crate) fn concat(parts: &[Arc<Q41Matrix>]) -> Option<Self> {
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
