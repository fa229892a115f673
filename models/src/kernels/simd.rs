//! Vectorised `exp` for the softmax and SiLU hot loops.
//!
//! libm's `expf` is scalar: on a 512-token prompt the attention softmax and the SwiGLU activation
//! call it ~95 million times, 7-8% of prompt processing. With AVX-512 the same work runs 16 lanes
//! at a time: `exp(x) = 2^n * e^r` with `n = round(x / ln 2)` and `|r| <= ln 2 / 2`, `e^r` by a
//! degree-6 polynomial (relative error ~1e-7, about 1 ulp) and `2^n` applied by `vscalefps`. Other
//! CPUs take the scalar loop, with the same results to within that error.

/// `xs[i] = exp(xs[i] * scale - shift)`; returns the sum of the new values.
pub fn exp_scaled_sum(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F (checked at run time).
        return unsafe { x86::exp_scaled_sum(xs, scale, shift) };
    }
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = (*x * scale - shift).exp();
        sum += *x;
    }
    sum
}

/// `out[i] = silu(g[i]) * u[i]` with `silu(x) = x / (1 + exp(-x))`. Slices of equal length.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(
        g.len() == u.len() && u.len() == out.len(),
        "silu_mul lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F (checked at run time); lengths checked above.
        return unsafe { x86::silu_mul(g, u, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// The largest element (negative infinity for an empty slice). With NaNs in `xs` the result
/// is unspecified.
pub fn max(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F (checked at run time).
        return unsafe { x86::max(xs) };
    }
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `sum(exp(xs[i] - shift))`, leaving `xs` as it is.
pub fn exp_sum(xs: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F (checked at run time).
        return unsafe { x86::exp_into(xs, shift, 1.0, None) };
    }
    xs.iter().map(|&x| (x - shift).exp()).sum()
}

/// `out[i] = exp(xs[i] - shift) * mul`. Slices of equal length.
pub fn exp_into(xs: &[f32], shift: f32, mul: f32, out: &mut [f32]) {
    assert_eq!(xs.len(), out.len(), "exp_into lengths");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F (checked at run time); lengths checked above.
        unsafe { x86::exp_into(xs, shift, mul, Some(out)) };
        return;
    }
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = (x - shift).exp() * mul;
    }
}

/// `xs[i] = exp(xs[i] - shift) * mul` in place.
pub fn exp_in_place(xs: &mut [f32], shift: f32, mul: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        let p = xs.as_mut_ptr();
        // SAFETY: the CPU supports AVX-512F (checked at run time); the kernel reads each
        // 16-lane block before it writes it, so `out` may be the input itself.
        unsafe { x86::exp_into_raw(p, xs.len(), shift, mul, Some(p)) };
        return;
    }
    for x in xs.iter_mut() {
        *x = (*x - shift).exp() * mul;
    }
}

/// The backward pass of [`silu_mul`]: with `s = sigmoid(g)`, `du = dy * g * s` and
/// `dg = dy * u * s * (1 + g * (1 - s))`. Slices of equal length.
pub fn silu_mul_bwd(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g.len();
    assert!(
        u.len() == n && dy.len() == n && dg.len() == n && du.len() == n,
        "silu_mul_bwd lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F (checked at run time); lengths checked above.
        return unsafe { x86::silu_mul_bwd(g, u, dy, dg, du) };
    }
    for i in 0..n {
        let s = 1.0 / (1.0 + (-g[i]).exp());
        du[i] = dy[i] * g[i] * s;
        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
}

/// Softmax of `row * scale` in place; returns `max + ln(sum)` of the scaled row (its
/// log-sum-exp). An empty row returns negative infinity.
pub fn softmax_scaled(row: &mut [f32], scale: f32) -> f32 {
    let m = max(row) * scale;
    if row.is_empty() {
        return m;
    }
    let sum = exp_scaled_sum(row, scale, m);
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
    m + sum.ln()
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `e^x` on 16 lanes. Inputs below -87.3 give ~1e-38 (not 0); NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.336_55));
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.722_83));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // r = x - n ln2 in two steps (Cody-Waite) to keep r exact.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 120.0));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 24.0));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 6.0));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
        _mm512_scalef_ps(p, n)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_scaled_sum(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
        let (vs, vsh) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        let mut acc = _mm512_setzero_ps();
        let n = xs.len();
        let p = xs.as_mut_ptr();
        blocks(n, |i, mask| {
            // SAFETY: the mask keeps every lane inside `xs[i..n]`.
            let v = unsafe { _mm512_maskz_loadu_ps(mask, p.add(i)) };
            let e = exp16(_mm512_fmsub_ps(v, vs, vsh));
            acc = _mm512_mask_add_ps(acc, mask, acc, e);
            // SAFETY: as above.
            unsafe { _mm512_mask_storeu_ps(p.add(i), mask, e) };
        });
        _mm512_reduce_add_ps(acc)
    }

    /// Calls `f(i, mask)` for the 16-lane block at each `i` of `n` elements, `mask` covering
    /// the lanes inside `[i, n)`.
    #[inline(always)]
    fn blocks(n: usize, mut f: impl FnMut(usize, __mmask16)) {
        let mut i = 0;
        while i < n {
            f(i, tail_mask(n, i));
            i += 16;
        }
    }

    /// `1 / (1 + e^-g)` on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sigmoid16(g: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        _mm512_div_ps(
            one,
            _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))),
        )
    }

    /// The lane mask of the 16-lane block at `i` of `n` elements.
    #[inline]
    fn tail_mask(n: usize, i: usize) -> __mmask16 {
        let left = n - i;
        if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max(xs: &[f32]) -> f32 {
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        blocks(xs.len(), |i, mask| {
            // SAFETY: the mask keeps every lane inside `xs`.
            let v = unsafe { _mm512_maskz_loadu_ps(mask, xs.as_ptr().add(i)) };
            acc = _mm512_mask_max_ps(acc, mask, acc, v);
        });
        _mm512_reduce_max_ps(acc)
    }

    /// `out[i] = exp(xs[i] - shift) * mul` when `out` is given; returns the sum of
    /// `exp(xs[i] - shift)`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_into(
        xs: &[f32],
        shift: f32,
        mul: f32,
        out: Option<&mut [f32]>,
    ) -> f32 {
        if let Some(o) = &out {
            assert_eq!(o.len(), xs.len(), "exp_into lengths");
        }
        // SAFETY: `out`, when given, has the length of `xs` (checked above).
        unsafe {
            exp_into_raw(
                xs.as_ptr(),
                xs.len(),
                shift,
                mul,
                out.map(|o| o.as_mut_ptr()),
            )
        }
    }

    /// As [`exp_into`] on raw pointers: `out` may equal `xs` (each block is read before it is
    /// written).
    ///
    /// # Safety
    /// `xs` must be valid for `n` reads and `out`, when given, for `n` writes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_into_raw(
        xs: *const f32,
        n: usize,
        shift: f32,
        mul: f32,
        out: Option<*mut f32>,
    ) -> f32 {
        let (vsh, vm) = (_mm512_set1_ps(shift), _mm512_set1_ps(mul));
        let mut acc = _mm512_setzero_ps();
        blocks(n, |i, mask| {
            // SAFETY: the mask keeps every lane inside `[i, n)`, valid by the caller's contract.
            unsafe {
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, xs.add(i)), vsh));
                acc = _mm512_mask_add_ps(acc, mask, acc, e);
                if let Some(o) = out {
                    _mm512_mask_storeu_ps(o.add(i), mask, _mm512_mul_ps(e, vm));
                }
            }
        });
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul_bwd(
        g: &[f32],
        u: &[f32],
        dy: &[f32],
        dg: &mut [f32],
        du: &mut [f32],
    ) {
        let one = _mm512_set1_ps(1.0);
        blocks(g.len(), |i, mask| {
            // SAFETY: the caller gives five slices of length `n`; the mask keeps every lane
            // inside `[i, n)`.
            unsafe {
                let gv = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
                let uv = _mm512_maskz_loadu_ps(mask, u.as_ptr().add(i));
                let dyv = _mm512_maskz_loadu_ps(mask, dy.as_ptr().add(i));
                let s = sigmoid16(gv);
                let dys = _mm512_mul_ps(dyv, s);
                _mm512_mask_storeu_ps(du.as_mut_ptr().add(i), mask, _mm512_mul_ps(dys, gv));
                // dg = dy s u (1 + g (1 - s))
                let t = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one);
                _mm512_mask_storeu_ps(
                    dg.as_mut_ptr().add(i),
                    mask,
                    _mm512_mul_ps(_mm512_mul_ps(dys, uv), t),
                );
            }
        });
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let one = _mm512_set1_ps(1.0);
        blocks(out.len(), |i, mask| {
            // SAFETY: the caller gives three slices of length `n`; the mask keeps every lane
            // inside `[i, n)`.
            unsafe {
                let gv = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
                let uv = _mm512_maskz_loadu_ps(mask, u.as_ptr().add(i));
                let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
                let y = _mm512_div_ps(_mm512_mul_ps(gv, uv), _mm512_add_ps(one, e));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, y);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_across_the_range() {
        // -87 to 80: below -87.34 results are clamped to ~1e-38 (documented), and the sum of the
        // whole range must stay below f32::MAX.
        let xs: Vec<f32> = (-1990..=1830).map(|i| i as f32 * 0.0437).collect();
        let mut ys = xs.clone();
        let sum = exp_scaled_sum(&mut ys, 1.0, 0.0);
        let mut want_sum = 0f64;
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            want_sum += want;
            let rel = ((y as f64 - want) / want).abs();
            assert!(rel < 4e-7, "exp({x}) = {y}, want {want} (rel {rel:e})");
        }
        assert!(((sum as f64 - want_sum) / want_sum).abs() < 1e-5);
    }

    #[test]
    fn exp_scales_shifts_and_handles_tails_of_every_length() {
        for n in 0..40 {
            let mut ys: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let want: Vec<f32> = ys.iter().map(|x| (x * 0.25 - 1.5).exp()).collect();
            exp_scaled_sum(&mut ys, 0.25, 1.5);
            for (y, w) in ys.iter().zip(&want) {
                assert!((y - w).abs() <= 1e-6 * w, "{y} vs {w}");
            }
        }
        let mut big = [-1.0e30f32, 1.0e30];
        exp_scaled_sum(&mut big, 1.0, 0.0);
        assert!(big[0] >= 0.0 && big[0] < 1e-37, "{}", big[0]);
        assert!(big[1] > 1e38, "{}", big[1]);
    }

    #[test]
    fn silu_mul_matches_the_formula() {
        let g: Vec<f32> = (0..37).map(|i| i as f32 * 0.7 - 12.0).collect();
        let u: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.05).collect();
        let mut out = vec![0f32; 37];
        silu_mul(&g, &u, &mut out);
        for i in 0..37 {
            let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
            assert!((out[i] - want).abs() <= 1e-6 * want.abs().max(1e-3), "{i}");
        }
    }

    #[test]
    fn max_exp_sum_and_exp_into_match_scalar_loops() {
        for n in [0usize, 1, 15, 16, 17, 100] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 23) as f32 * 0.31 - 3.0)
                .collect();
            let want_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&xs), want_max, "n = {n}");
            let want_sum: f32 = xs.iter().map(|&x| (x - 1.5).exp()).sum();
            assert!((exp_sum(&xs, 1.5) - want_sum).abs() <= 1e-5 * want_sum.max(1.0));
            let mut out = vec![0f32; n];
            exp_into(&xs, 1.5, -0.25, &mut out);
            let mut in_place = xs.clone();
            exp_in_place(&mut in_place, 1.5, -0.25);
            for ((o, &x), &p) in out.iter().zip(&xs).zip(&in_place) {
                let w = (x - 1.5).exp() * -0.25;
                assert!((o - w).abs() <= 1e-6 * w.abs().max(1e-3), "{o} vs {w}");
                assert_eq!(*o, p);
            }
        }
    }

    #[test]
    fn silu_mul_bwd_matches_the_derivative() {
        let n = 37;
        let g: Vec<f32> = (0..n).map(|i| i as f32 * 0.7 - 12.0).collect();
        let u: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.05).collect();
        let dy: Vec<f32> = (0..n).map(|i| 0.3 + i as f32 * 0.01).collect();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        silu_mul_bwd(&g, &u, &dy, &mut dg, &mut du);
        for i in 0..n {
            // central differences of silu(g) * u
            let f = |g: f64, u: f64| g / (1.0 + (-g).exp()) * u;
            let (gi, ui, h) = (g[i] as f64, u[i] as f64, 1e-4);
            let want_dg = dy[i] as f64 * (f(gi + h, ui) - f(gi - h, ui)) / (2.0 * h);
            let want_du = dy[i] as f64 * f(gi, 1.0);
            assert!(
                (dg[i] as f64 - want_dg).abs() < 1e-4,
                "dg {i}: {} vs {want_dg}",
                dg[i]
            );
            assert!(
                (du[i] as f64 - want_du).abs() < 1e-5,
                "du {i}: {} vs {want_du}",
                du[i]
            );
        }
    }

    #[test]
    fn softmax_sums_to_one_and_returns_the_log_sum_exp() {
        let mut row = vec![1.0f32, 2.0, 3.0, -1.0];
        let lse = softmax_scaled(&mut row, 0.5);
        let want: f32 = [0.5f32, 1.0, 1.5, -0.5]
            .iter()
            .map(|x| x.exp())
            .sum::<f32>()
            .ln();
        assert!((lse - want).abs() < 1e-6);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((row[2] - (1.5 - want).exp()).abs() < 1e-6);
    }
}
