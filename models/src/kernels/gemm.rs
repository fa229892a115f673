//! The f32 GEMM the kernels share (the `gemm` crate), on slices addressed by (row stride, column
//! stride).

use gemm::Parallelism;

use super::pool::{self, SharedMut};

/// Below this many multiply-adds a product runs on the calling thread alone (the `gemm` crate's
/// own threading threshold).
const THREADING_THRESHOLD: usize = 48 * 48 * 256;

/// Columns per unit when a product is split by columns: whole 64-byte lines of a row-major
/// destination, and the `gemm` crate's AVX-512 microkernel height (it computes the transposed
/// problem, so our columns are its vectorised rows).
const COLUMN_UNIT: usize = 16;

/// A product with at least this many rows per thread is split by rows (each share a whole
/// `gemm` call with full microkernels across the columns); one with fewer, by columns. On the
/// training shapes (1,024 rows) rows made full fine-tuning 4-6% faster and left LoRA, soft
/// prompts and 512-token prompts level; 41-token prompts need the columns (rows would have each
/// thread read every weight).
const ROWS_PER_TASK: usize = 128;

/// The `gemm` crate's single-thread lhs packing threshold (its default 8): it computes our
/// products transposed, so its lhs is the weight, which it reads in place unless the share has
/// more than 6 times this many of our rows (6: its microkernel's width). At 41 rows the weight
/// was read in place, one stride of a weight row per step of the contraction; packed, a
/// 41-token prompt ran 633 -> 699 tok/s (two interleaved runs, no AMX); 512-token prompts,
/// training and decode level. Set once, at the first product (it is a process-wide setting;
/// packing copies values, the sums are the same).
const LHS_PACKING_THRESHOLD: usize = 1;

/// `dst (+)= beta * lhs * rhs` on raw operands, spread over the kernels' pool: the rows where
/// there are many ([`ROWS_PER_TASK`]) or too few columns, otherwise the columns in blocks of
/// [`COLUMN_UNIT`] (each task reads its share of `rhs`, the weight in every projection). Each
/// block is one serial `gemm` call. The `gemm` crate's own threading runs on rayon's pool,
/// whose workers a product wakes through a futex while this pool's workers spin between the
/// kernels' ops: on two cores the two pools took each other's cores (a fifth of a prompt's
/// samples spent spinning).
///
/// # Safety
/// Every element the strides reach lies inside the allocations behind `dst`, `lhs` and `rhs`,
/// and `dst` aliases neither operand.
#[allow(clippy::too_many_arguments)]
unsafe fn split_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: SharedMut<f32>,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    par: Parallelism,
) {
    static PACKING: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    PACKING.get_or_init(|| gemm::set_lhs_packing_threshold_single_thread(LHS_PACKING_THRESHOLD));
    let threads = match par {
        Parallelism::None => 1,
        Parallelism::Rayon(0) => super::threads(),
        Parallelism::Rayon(t) => t,
    };
    let (lhs, rhs) = (lhs as usize, rhs as usize);
    // One block: rows `r`, columns `c`.
    let block = |r: std::ops::Range<usize>, c: std::ops::Range<usize>| {
        let d = dst.get().wrapping_add(r.start * dst_rs + c.start * dst_cs);
        let l = (lhs as *const f32).wrapping_add(r.start * lhs_rs);
        let w = (rhs as *const f32).wrapping_add(c.start * rhs_cs);
        // SAFETY: the block lies inside the whole product, which the caller vouches for; blocks
        // of one call do not overlap.
        unsafe {
            gemm::gemm(
                r.len(),
                c.len(),
                k,
                d,
                dst_cs as isize,
                dst_rs as isize,
                accumulate,
                l,
                lhs_cs as isize,
                lhs_rs as isize,
                w,
                rhs_cs as isize,
                rhs_rs as isize,
                1.0,
                beta,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    };
    let units = n.div_ceil(COLUMN_UNIT);
    if threads <= 1 || m.saturating_mul(n).saturating_mul(k) < THREADING_THRESHOLD {
        block(0..m, 0..n);
    } else if units >= 2 * threads && m < ROWS_PER_TASK * threads {
        // Contiguous column ranges, as even as whole units allow.
        let tasks = threads.min(units);
        pool::for_range(tasks, |t| {
            for t in t {
                let c0 = (units * t / tasks * COLUMN_UNIT).min(n);
                let c1 = (units * (t + 1) / tasks * COLUMN_UNIT).min(n);
                block(0..m, c0..c1);
            }
        });
    } else {
        let tasks = threads.min(m);
        pool::for_range(tasks, |t| {
            for t in t {
                block(m * t / tasks..m * (t + 1) / tasks, 0..n);
            }
        });
    }
}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]`, every operand addressed by (row stride, column stride).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    par: Parallelism,
) {
    matmul_scaled(
        m,
        n,
        k,
        dst,
        (dst_rs, dst_cs),
        accumulate,
        lhs,
        (lhs_rs, lhs_cs),
        rhs,
        (rhs_rs, rhs_cs),
        1.0,
        par,
    )
}

/// `dst[m, n] (+)= beta * lhs[m, k] * rhs[k, n]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_scaled(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The extents the strides reach must lie inside the slices.
    debug_assert!((m - 1) * dst_rs + (n - 1) * dst_cs < dst.len());
    debug_assert!(k == 0 || (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len());
    debug_assert!(k == 0 || (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len());
    assert!(
        (m - 1) * dst_rs + (n - 1) * dst_cs < dst.len(),
        "matmul dst bounds"
    );
    assert!(
        k == 0 || (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
        "matmul lhs bounds"
    );
    assert!(
        k == 0 || (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
        "matmul rhs bounds"
    );
    // SAFETY: the asserts above keep every access the strides describe inside the slices, and
    // `dst` does not alias `lhs` or `rhs` (a `&mut` and two `&`).
    unsafe {
        split_gemm(
            m,
            n,
            k,
            SharedMut(dst.as_mut_ptr()),
            (dst_rs, dst_cs),
            accumulate,
            lhs.as_ptr(),
            (lhs_rs, lhs_cs),
            rhs.as_ptr(),
            (rhs_rs, rhs_cs),
            beta,
            par,
        )
    }
}

/// A new row-major `[m, n]` product `lhs[m, k] * rhs[k, n]` (operands addressed by (row stride,
/// column stride)), written by the GEMM straight into fresh memory: no zero-fill first, which
/// on these sizes costs a tenth of the product itself.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    par: Parallelism,
) -> Vec<f32> {
    let len = m * n;
    if k == 0 || len == 0 {
        return vec![0f32; len];
    }
    assert!(
        (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
        "product lhs bounds"
    );
    assert!(
        (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
        "product rhs bounds"
    );
    let mut out: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the asserts keep every read inside `lhs` and `rhs`; `out` has room for the `m * n`
    // elements of a row-major `[m, n]` destination, which the GEMM writes without reading
    // (`accumulate` false) before the length is set.
    unsafe {
        split_gemm(
            m,
            n,
            k,
            SharedMut(out.as_mut_ptr()),
            (n, 1),
            false,
            lhs.as_ptr(),
            (lhs_rs, lhs_cs),
            rhs.as_ptr(),
            (rhs_rs, rhs_cs),
            1.0,
            par,
        );
        out.set_len(len);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::test_values as fill;

    /// The product element by element in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        m: usize,
        n: usize,
        k: usize,
        lhs: &[f32],
        (lrs, lcs): (usize, usize),
        rhs: &[f32],
        (rrs, rcs): (usize, usize),
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| lhs[i * lrs + p * lcs] as f64 * rhs[p * rrs + j * rcs] as f64)
                    .sum();
            }
        }
        out
    }

    fn close(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        // Each term is below 1 in magnitude: f32 sums of k of them stay within k * 2^-22.
        let tol = k as f64 * 2f64.powi(-22) + 1e-6;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= tol,
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    /// Split by columns (few rows, many columns), by rows (many rows, or few columns), and on one
    /// thread (small), with operands row-major and transposed, fresh and accumulated, each
    /// against the f64 product.
    #[test]
    fn split_products_equal_the_whole_product() {
        let shapes = [
            (41, 576, 576),
            (7, 1536, 96),
            (300, 24, 2000),
            (3, 5, 7),
            (1, 40, 64),
            (129, 33, 577),
            (260, 160, 96),
        ];
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            let lhs = fill(m * k, si as u32 + 1);
            let rhs = fill(k * n, si as u32 + 100);
            for (ls, rs) in [((k, 1), (n, 1)), ((1, m), (1, k)), ((k, 1), (1, k))] {
                let want = naive(m, n, k, &lhs, ls, &rhs, rs);
                let what = format!("{m}x{n}x{k} lhs {ls:?} rhs {rs:?}");
                for par in [
                    Parallelism::None,
                    Parallelism::Rayon(2),
                    Parallelism::Rayon(3),
                ] {
                    let got = product(m, n, k, &lhs, ls, &rhs, rs, par);
                    close(&got, &want, k, &format!("product {what} {par:?}"));
                    // dst (+)= beta * product on a destination with a wider row stride.
                    let stride = n + 3;
                    let base = fill(m * stride, 7);
                    let mut dst = base.clone();
                    matmul_scaled(
                        m,
                        n,
                        k,
                        &mut dst,
                        (stride, 1),
                        true,
                        &lhs,
                        ls,
                        &rhs,
                        rs,
                        0.5,
                        par,
                    );
                    for i in 0..m {
                        let row: Vec<f64> = (0..n)
                            .map(|j| base[i * stride + j] as f64 + 0.5 * want[i * n + j])
                            .collect();
                        close(
                            &dst[i * stride..i * stride + n],
                            &row,
                            k,
                            &format!("{what} row {i}"),
                        );
                        // The padding past each row is untouched.
                        assert_eq!(
                            &dst[i * stride + n..(i + 1) * stride],
                            &base[i * stride + n..(i + 1) * stride]
                        );
                    }
                }
            }
        }
    }
}
