//! The f32 GEMM the kernels share (the `gemm` crate), on slices addressed by (row stride, column
//! stride).

use gemm::Parallelism;

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
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
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
    // (`read_dst` false) before the length is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
        out.set_len(len);
    }
    out
}
