//! Fused training ops with their own backward pass, for the CPU.
//!
//! candle's autograd builds the backward pass from basic ops. Three places cost too much that way:
//! - **attention**: the `[batch, heads, seq, seq]` scores, masked scores and probabilities would be
//!   kept for every layer (about 150 MB each per layer at batch 4 x 1024 tokens). [`attention`]
//!   keeps only the output and one log-sum-exp per row, and recomputes the probabilities head by
//!   head in the backward pass (the FlashAttention scheme, Dao et al. 2022, with GEMMs per head);
//! - **frozen projections**: for `x W^T` with a constant `W`, candle still computes `x^T dy`, a
//!   whole weight gradient nobody reads. [`frozen_linear`] computes `dy W` only;
//! - **RMSNorm**: one op instead of five, each keeping its own intermediate.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Wall time per op kind, collected when `ATTUNE_PROFILE_OPS=1` (the training bench prints it):
/// `(op, seconds, calls)` since the last [`take_profile`].
static PROFILE: Mutex<Vec<(&'static str, f64, usize)>> = Mutex::new(Vec::new());

fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ATTUNE_PROFILE_OPS").is_ok_and(|v| v == "1"))
}

/// Adds the time from its creation to its drop to one op kind's total.
pub(crate) struct ProfGuard(&'static str, Option<std::time::Instant>);

impl Drop for ProfGuard {
    fn drop(&mut self) {
        let Some(t) = self.1 else { return };
        let dt = t.elapsed().as_secs_f64();
        let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
        match p.iter_mut().find(|e| e.0 == self.0) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => p.push((self.0, dt, 1)),
        }
    }
}

pub(crate) fn prof(op: &'static str) -> ProfGuard {
    ProfGuard(op, profiling().then(std::time::Instant::now))
}

/// The per-op wall times collected since the last call (empty unless `ATTUNE_PROFILE_OPS=1`).
pub fn take_profile() -> Vec<(&'static str, f64, usize)> {
    std::mem::take(&mut *PROFILE.lock().unwrap_or_else(|e| e.into_inner()))
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
            let $v = $crate::train::ops::cpu_f32(&$v.0, $v.1, $what)?;
        )+
    };
}
pub(crate) use borrow_f32;

fn tensor_vec(t: &Tensor) -> CResult<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

pub(crate) fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
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

// ---------------------------------------------------------------------------------------------
// Causal attention
// ---------------------------------------------------------------------------------------------

/// Causal self-attention without a cache, in the layout the projections produce: `q`
/// `[b, seq, heads, hd]`, `k`/`v` `[b, seq, kv_heads, hd]` (grouped-query: `heads / kv_heads`
/// query heads share one kv head), contiguous f32. Returns `[b, seq, heads, hd]`, so no
/// transposes are needed on either side. Differentiable in all three inputs.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> CResult<Tensor> {
    attention_op(q, k, v, scale, None)
}

/// [`attention`] on the projections' own `[b, seq, heads * hd]` outputs (no reshape, so no
/// reshape node in the graph): `q` holds `heads` heads, `k`/`v` `kv_heads`. Returns
/// `[b, seq, heads * hd]`, the layout `o_proj` takes.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f32,
) -> CResult<Tensor> {
    attention_op(q, k, v, scale, Some((heads, kv_heads)))
}

fn attention_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    heads: Option<(usize, usize)>,
) -> CResult<Tensor> {
    let q = q.contiguous()?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    q.apply_op3(
        &k,
        &v,
        Attention {
            scale,
            heads,
            lse: Mutex::new(None),
        },
    )
}

struct Attention {
    scale: f32,
    /// Head counts `(heads, kv_heads)` when the inputs are `[b, seq, heads * hd]`.
    heads: Option<(usize, usize)>,
    /// Log-sum-exp of every score row `[b, heads, seq]`, kept by the forward pass for the backward.
    lse: Mutex<Option<Vec<f32>>>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnDims {
    pub(crate) b: usize,
    pub(crate) nh: usize,
    pub(crate) nkv: usize,
    pub(crate) l: usize,
    pub(crate) hd: usize,
}

impl AttnDims {
    fn of(q: &Shape, k: &Shape, v: &Shape, heads: Option<(usize, usize)>) -> CResult<AttnDims> {
        let split = |s: &Shape, h: Option<usize>| -> CResult<(usize, usize, usize, usize)> {
            match h {
                None => s.dims4(),
                Some(h) => {
                    let (b, l, w) = s.dims3()?;
                    if h == 0 || !w.is_multiple_of(h) {
                        candle_core::bail!("attention: {w} features do not split into {h} heads")
                    }
                    Ok((b, l, h, w / h))
                }
            }
        };
        let (b, l, nh, hd) = split(q, heads.map(|h| h.0))?;
        let (kb, kl, nkv, khd) = split(k, heads.map(|h| h.1))?;
        if (kb, kl, khd) != (b, l, hd) || k.dims() != v.dims() || nkv == 0 || nh % nkv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit together",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        Ok(AttnDims { b, nh, nkv, l, hd })
    }
    pub(crate) fn groups(&self) -> usize {
        self.nh / self.nkv
    }
    /// Offset of head `h` of batch `b` in a `[b, seq, heads, hd]` tensor with `heads` heads; its
    /// rows are `heads * hd` apart.
    fn at(&self, b: usize, h: usize, heads: usize) -> usize {
        b * self.l * heads * self.hd + h * self.hd
    }
}

/// Query rows per block of the causal attention: a block of rows `r0..r1` needs keys `0..r1`
/// only, so the GEMMs skip the blocks above the diagonal (about 40% of the work at 256 tokens).
const ATTN_BLOCK: usize = 64;

/// The row blocks `(r0, r1)` of a sequence of `l` positions.
fn attn_blocks(l: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..l.div_ceil(ATTN_BLOCK)).map(move |i| (i * ATTN_BLOCK, ((i + 1) * ATTN_BLOCK).min(l)))
}

/// Scores `s = scale * q k^T` of query rows `r0..r1` against keys `0..r1` for one head, into
/// `s` (row stride `l`; `q`, `k` rows `q_rs`/`k_rs` apart), then turns the causal part of each
/// row into probabilities in place (zeros above the diagonal, up to column `r1`). With `lse_in`,
/// uses it (the backward pass); otherwise writes it to `lse_out` (indexed by row).
#[allow(clippy::too_many_arguments)]
fn head_probs(
    d: AttnDims,
    (r0, r1): (usize, usize),
    qh: &[f32],
    q_rs: usize,
    kg: &[f32],
    k_rs: usize,
    scale: f32,
    s: &mut [f32],
    lse_in: Option<&[f32]>,
    lse_out: &mut [f32],
) {
    let (l, hd) = (d.l, d.hd);
    matmul(
        r1 - r0,
        r1,
        hd,
        &mut s[r0 * l..],
        (l, 1),
        false,
        &qh[r0 * q_rs..],
        (q_rs, 1),
        kg,
        (1, k_rs),
        Parallelism::None,
    );
    for i in r0..r1 {
        let row = &mut s[i * l..i * l + r1];
        let (live, dead) = row.split_at_mut(i + 1);
        dead.fill(0.0);
        match lse_in {
            Some(lse) => {
                crate::simd::exp_scaled_sum(live, scale, lse[i]);
            }
            None => lse_out[i] = crate::simd::softmax_scaled(live, scale),
        }
    }
}

/// Copies a contiguous `[l, hd]` head into its place in a `[b, l, heads, hd]` buffer.
fn scatter_head(dst: &mut [f32], off: usize, rs: usize, src: &[f32], l: usize, hd: usize) {
    for i in 0..l {
        dst[off + i * rs..off + i * rs + hd].copy_from_slice(&src[i * hd..(i + 1) * hd]);
    }
}

/// The causal attention of `q`, `k`, `v` (the projections' `[b, l, heads * hd]` layout, or
/// `[b, l, heads, hd]`, the same memory): the output in `q`'s layout and the log-sum-exp of
/// every score row `[b, heads, l]`.
pub(crate) fn attention_forward(
    d: AttnDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (l, hd, g) = (d.l, d.hd, d.groups());
    let (q_rs, kv_rs) = (d.nh * hd, d.nkv * hd);
    // One task per (batch, kv head): its query heads' outputs `[g, l, hd]` and lse `[g, l]`.
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..d.b * d.nkv)
        .into_par_iter()
        .map(|task| {
            let (bi, kh) = (task / d.nkv, task % d.nkv);
            let kg = &k[d.at(bi, kh, d.nkv)..];
            let vg = &v[d.at(bi, kh, d.nkv)..];
            let mut s = vec![0f32; l * l];
            let mut out = vec![0f32; g * l * hd];
            let mut lse = vec![0f32; g * l];
            for j in 0..g {
                let qh = &q[d.at(bi, kh * g + j, d.nh)..];
                for (r0, r1) in attn_blocks(l) {
                    head_probs(
                        d,
                        (r0, r1),
                        qh,
                        q_rs,
                        kg,
                        kv_rs,
                        scale,
                        &mut s,
                        None,
                        &mut lse[j * l..(j + 1) * l],
                    );
                    // out[r0..r1] = P[r0..r1, 0..r1] V[0..r1]
                    matmul(
                        r1 - r0,
                        hd,
                        r1,
                        &mut out[(j * l + r0) * hd..(j + 1) * l * hd],
                        (hd, 1),
                        false,
                        &s[r0 * l..],
                        (l, 1),
                        vg,
                        (kv_rs, 1),
                        Parallelism::None,
                    );
                }
            }
            (out, lse)
        })
        .collect();
    let mut out = vec![0f32; d.b * l * d.nh * hd];
    let mut lse = vec![0f32; d.b * d.nh * l];
    for (task, (o, ls)) in results.iter().enumerate() {
        let (bi, kh) = (task / d.nkv, task % d.nkv);
        for j in 0..g {
            let h = kh * g + j;
            scatter_head(
                &mut out,
                d.at(bi, h, d.nh),
                q_rs,
                &o[j * l * hd..(j + 1) * l * hd],
                l,
                hd,
            );
            let at = (bi * d.nh + h) * l;
            lse[at..at + l].copy_from_slice(&ls[j * l..(j + 1) * l]);
        }
    }
    (out, lse)
}

/// The gradients `(dq, dk, dv)` of [`attention_forward`] given the output `o`, its gradient
/// `dout` and the forward pass's log-sum-exp `lse`; the probabilities are recomputed head by head.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    d: AttnDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (l, hd, g) = (d.l, d.hd, d.groups());
    let (q_rs, kv_rs) = (d.nh * hd, d.nkv * hd);
    // Per (batch, kv head): dq of its query heads `[g, l, hd]`, dk and dv `[l, hd]`.
    let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..d.b * d.nkv)
        .into_par_iter()
        .map(|task| {
            let (bi, kh) = (task / d.nkv, task % d.nkv);
            let kg = &k[d.at(bi, kh, d.nkv)..];
            let vg = &v[d.at(bi, kh, d.nkv)..];
            let mut p = vec![0f32; l * l];
            let mut dp = vec![0f32; l * l];
            let mut dq = vec![0f32; g * l * hd];
            let mut dk = vec![0f32; l * hd];
            let mut dv = vec![0f32; l * hd];
            let mut unused = vec![0f32; 0];
            for j in 0..g {
                let h = kh * g + j;
                let off = d.at(bi, h, d.nh);
                let (qh, oh, doh) = (&q[off..], &o[off..], &dout[off..]);
                let lse_h = &lse[(bi * d.nh + h) * l..(bi * d.nh + h + 1) * l];
                for (r0, r1) in attn_blocks(l) {
                    let rb = r1 - r0;
                    head_probs(
                        d,
                        (r0, r1),
                        qh,
                        q_rs,
                        kg,
                        kv_rs,
                        scale,
                        &mut p,
                        Some(lse_h),
                        &mut unused,
                    );
                    // dV[0..r1] += P_blk^T dO_blk
                    matmul(
                        r1,
                        hd,
                        rb,
                        &mut dv,
                        (hd, 1),
                        true,
                        &p[r0 * l..],
                        (1, l),
                        &doh[r0 * q_rs..],
                        (q_rs, 1),
                        Parallelism::None,
                    );
                    // dP_blk = dO_blk V[0..r1]^T
                    matmul(
                        rb,
                        r1,
                        hd,
                        &mut dp[r0 * l..],
                        (l, 1),
                        false,
                        &doh[r0 * q_rs..],
                        (q_rs, 1),
                        vg,
                        (1, kv_rs),
                        Parallelism::None,
                    );
                    // dS = P * (dP - rowsum(dO * O)) * scale (P is zero above the diagonal)
                    for i in r0..r1 {
                        let di: f32 = doh[i * q_rs..i * q_rs + hd]
                            .iter()
                            .zip(&oh[i * q_rs..i * q_rs + hd])
                            .map(|(a, b)| a * b)
                            .sum();
                        let pr = &p[i * l..i * l + i + 1];
                        let dr = &mut dp[i * l..i * l + r1];
                        for (x, &pp) in dr[..=i].iter_mut().zip(pr) {
                            *x = pp * (*x - di) * scale;
                        }
                        dr[i + 1..].fill(0.0);
                    }
                    // dQ_blk = dS_blk K[0..r1] ; dK[0..r1] += dS_blk^T Q_blk
                    matmul(
                        rb,
                        hd,
                        r1,
                        &mut dq[(j * l + r0) * hd..(j + 1) * l * hd],
                        (hd, 1),
                        false,
                        &dp[r0 * l..],
                        (l, 1),
                        kg,
                        (kv_rs, 1),
                        Parallelism::None,
                    );
                    matmul(
                        r1,
                        hd,
                        rb,
                        &mut dk,
                        (hd, 1),
                        true,
                        &dp[r0 * l..],
                        (1, l),
                        &qh[r0 * q_rs..],
                        (q_rs, 1),
                        Parallelism::None,
                    );
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    for (task, (tq, tk, tv)) in results.iter().enumerate() {
        let (bi, kh) = (task / d.nkv, task % d.nkv);
        for j in 0..g {
            scatter_head(
                &mut dq,
                d.at(bi, kh * g + j, d.nh),
                q_rs,
                &tq[j * l * hd..(j + 1) * l * hd],
                l,
                hd,
            );
        }
        scatter_head(&mut dk, d.at(bi, kh, d.nkv), kv_rs, tk, l, hd);
        scatter_head(&mut dv, d.at(bi, kh, d.nkv), kv_rs, tv, l, hd);
    }
    (dq, dk, dv)
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attune-causal-attention"
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
        let _pg = prof("Attention.cpu_fwd");
        let d = AttnDims::of(l1.shape(), l2.shape(), l3.shape(), self.heads)?;
        let q = f32_slice(s1, l1, "attention q")?;
        let k = f32_slice(s2, l2, "attention k")?;
        let v = f32_slice(s3, l3, "attention v")?;
        let (out, lse) = attention_forward(d, q, k, v, self.scale);
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("Attention.bwd");
        let d = AttnDims::of(q.shape(), k.shape(), v.shape(), self.heads)?;
        let lse_guard = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        let Some(lse) = lse_guard.as_ref() else {
            candle_core::bail!("attention backward before forward")
        };
        borrow_f32!(
            qv = q, "attention q";
            kv = k, "attention k";
            vv = v, "attention v";
            ov = res, "attention output";
            dov = grad_res, "attention grad";
        );
        let (dq, dk, dv) = attention_backward(d, qv, kv, vv, ov, dov, lse, self.scale);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embeddings
// ---------------------------------------------------------------------------------------------

/// Causal attention for inference over a KV cache (no gradient): `q` `[b, heads, l, hd]`,
/// `k`/`v` `[b, kv_heads, t, hd]` with `t >= l` (query `i` sits at position `t - l + i` and sees
/// keys `0..=t - l + i`; the last dim contiguous, other strides free, so a narrowed cache view is
/// read in place). Returns `[b, l, heads * hd]`, the layout `o_proj` takes: no transposes, no
/// `[l, t]` mask, and only the causal part of the scores is exponentiated.
pub fn cached_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> CResult<Tensor> {
    let (b, nh, l, hd) = q.dims4()?;
    let (kb, nkv, t, khd) = k.dims4()?;
    if v.dims() != k.dims() || kb != b || khd != hd || nkv == 0 || nh % nkv != 0 || t < l {
        candle_core::bail!(
            "cached attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    q.contiguous()?
        .apply_op3_no_bwd(k, v, &CachedAttention { scale })
}

struct CachedAttention {
    scale: f32,
}

/// A `[b, heads, t, hd]` tensor's f32 data and its (batch, head, row) strides; the last dim must
/// be contiguous.
fn strided_4d<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<(&'a [f32], [usize; 3])> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32, got another dtype")
    };
    let st = l.stride();
    if st.len() != 4 || (st[3] != 1 && l.dims()[3] > 1) {
        candle_core::bail!("{what}: the last dim must be contiguous")
    }
    Ok((&v[l.start_offset()..], [st[0], st[1], st[2]]))
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "attune-cached-attention"
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
        let _pg = prof("CachedAttention.cpu_fwd");
        let (b, nh, l, hd) = l1.shape().dims4()?;
        let (_, nkv, t, _) = l2.shape().dims4()?;
        let q = f32_slice(s1, l1, "attention q")?;
        let (k, ks) = strided_4d(s2, l2, "attention k")?;
        let (v, vs) = strided_4d(s3, l3, "attention v")?;
        let (g, off, row) = (nh / nkv, t - l, nh * hd);
        let scale = self.scale;
        let mut out = vec![0f32; b * l * row];
        // Tasks of `chunk` query rows (all heads): rows later in the prompt see more keys, so
        // small chunks keep both threads busy to the end.
        let chunk = if l >= 64 { 16 } else { l.max(1) };
        for bi in 0..b {
            out[bi * l * row..(bi + 1) * l * row]
                .par_chunks_mut(chunk * row)
                .enumerate()
                .for_each(|(c, dst)| {
                    let i0 = c * chunk;
                    let rows = dst.len() / row;
                    let live = off + i0 + rows; // keys the chunk's last row sees
                    let mut s = vec![0f32; rows * live];
                    for h in 0..nh {
                        let kh = h / g;
                        let qh = &q[((bi * nh + h) * l + i0) * hd..];
                        let kg = &k[bi * ks[0] + kh * ks[1]..];
                        let vg = &v[bi * vs[0] + kh * vs[1]..];
                        matmul(
                            rows,
                            live,
                            hd,
                            &mut s,
                            (live, 1),
                            false,
                            qh,
                            (hd, 1),
                            kg,
                            (1, ks[2]),
                            Parallelism::None,
                        );
                        for r in 0..rows {
                            let seen = off + i0 + r + 1;
                            let srow = &mut s[r * live..(r + 1) * live];
                            let (p, dead) = srow.split_at_mut(seen);
                            crate::simd::softmax_scaled(p, scale);
                            dead.fill(0.0);
                        }
                        matmul(
                            rows,
                            hd,
                            live,
                            &mut dst[h * hd..],
                            (row, 1),
                            false,
                            &s,
                            (live, 1),
                            vg,
                            (vs[2], 1),
                            Parallelism::None,
                        );
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, l, row))))
    }
}

/// `y + scale * (x A^T) B^T` for inference on a few rows (decode): `y` `[rows, out]`, `x`
/// `[rows, in]`, LoRA `a` `[r, in]` and `b` `[out, r]`. One op in place of candle's two matmuls, a
/// scale and an add: with seven adapted projections per layer, per-op dispatch cost more than the
/// arithmetic and halved decode speed.
pub fn lora_add(y: &Tensor, x: &Tensor, a: &Tensor, b: &Tensor, scale: f32) -> CResult<Tensor> {
    let (rows, out) = y.dims2()?;
    let (xr, inp) = x.dims2()?;
    let (r, ain) = a.dims2()?;
    if xr != rows || ain != inp || b.dims2()? != (out, r) {
        candle_core::bail!(
            "lora_add: y {:?}, x {:?}, A {:?}, B {:?} do not fit",
            y.dims(),
            x.dims(),
            a.dims(),
            b.dims()
        )
    }
    y.contiguous()?.apply_op2_no_bwd(
        &x.contiguous()?,
        &LoraAdd {
            a: a.contiguous()?,
            b: b.contiguous()?,
            scale,
        },
    )
}

struct LoraAdd {
    a: Tensor,
    b: Tensor,
    scale: f32,
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
        borrow_f32!(a = self.a, "lora_add A"; b = self.b, "lora_add B");
        let (rows, out) = l1.shape().dims2()?;
        let inp = l2.shape().dims2()?.1;
        let r = a.len() / inp.max(1);
        let mut res = y.to_vec();
        let mut t = vec![0f32; r];
        for m in 0..rows {
            let xm = &x[m * inp..(m + 1) * inp];
            for (j, tj) in t.iter_mut().enumerate() {
                *tj = self.scale * dot(&a[j * inp..(j + 1) * inp], xm);
            }
            for (n, yn) in res[m * out..(m + 1) * out].iter_mut().enumerate() {
                *yn += dot(&b[n * r..(n + 1) * r], &t);
            }
        }
        Ok((CpuStorage::F32(res), l1.shape().clone()))
    }
}

/// Rotary position embedding (Hugging Face's rotate-half form) on `x` `[b, seq, heads, hd]`;
/// `cos`/`sin` are `[seq, hd / 2]`. Differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let (l, half) = cos.dims2()?;
    let dims = x.dims();
    let hd = half * 2;
    let row: usize = dims.get(2..).map_or(0, |d| d.iter().product());
    if dims.len() < 3
        || dims[1] != l
        || sin.dims() != cos.dims()
        || hd == 0
        || !row.is_multiple_of(hd)
    {
        candle_core::bail!(
            "rope: x {:?} does not fit cos {:?} / sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    x.contiguous()?.apply_op1(Rope {
        cos: tensor_vec(cos)?,
        sin: tensor_vec(sin)?,
        l,
        hd,
    })
}

/// Rotates, in place, every head (`hd` values) of `x`'s position rows (`row` values each,
/// sequences of `l` positions) by its position's angle from `cos`/`sin` `[l, hd / 2]`; `sign`
/// -1 applies the inverse rotation, which is the backward pass (the rotation's transpose).
pub(crate) fn rope_in_place(
    x: &mut [f32],
    row: usize,
    l: usize,
    hd: usize,
    cos: &[f32],
    sin: &[f32],
    sign: f32,
) {
    let half = hd / 2;
    if row == 0 || half == 0 {
        return;
    }
    x.par_chunks_mut(row).enumerate().for_each(|(r, xr)| {
        let pos = r % l;
        let (c, s) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for xh in xr.chunks_mut(hd) {
            let (x1, x2) = xh.split_at_mut(half);
            for i in 0..half {
                let sn = s[i] * sign;
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * sn;
                x2[i] = b * c[i] + a * sn;
            }
        }
    });
}

struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Positions per sequence and the head size.
    l: usize,
    hd: usize,
}

impl Rope {
    /// Rotates every head of `x` (`[b, l, ...]`, heads of `hd` in each position's row) by the
    /// position's angle (`sign` -1 inverts it, which is the backward pass: the rotation's
    /// transpose).
    fn apply(&self, x: &[f32], row: usize, sign: f32) -> Vec<f32> {
        let mut out = x.to_vec();
        rope_in_place(&mut out, row, self.l, self.hd, &self.cos, &self.sin, sign);
        out
    }

    /// Elements per position row of a tensor of this shape.
    fn row(shape: &Shape) -> usize {
        shape.dims().get(2..).map_or(0, |d| d.iter().product())
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "attune-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("Rope.cpu_fwd");
        let x = f32_slice(s, l, "rope input")?;
        Ok((
            CpuStorage::F32(self.apply(x, Self::row(l.shape()), 1.0)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let _pg = prof("Rope.bwd");
        borrow_f32!(g = grad, "rope grad");
        let dx = self.apply(g, Self::row(x.shape()), -1.0);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

/// `silu(gate) * up`, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        )
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// `silu(g) * u`, in chunks across the thread pool.
pub(crate) fn swiglu_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(SWIGLU_CHUNK)
        .zip(g.par_chunks(SWIGLU_CHUNK).zip(u.par_chunks(SWIGLU_CHUNK)))
        .for_each(|(o, (g, u))| crate::simd::silu_mul(g, u, o));
    out
}

/// The gradients `(dg, du)` of [`swiglu_forward`] for the output gradient `dy`.
pub(crate) fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    const C: usize = SWIGLU_CHUNK;
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(C)
        .zip(du.par_chunks_mut(C))
        .zip(g.par_chunks(C).zip(u.par_chunks(C)).zip(dy.par_chunks(C)))
        .for_each(|((dg, du), ((g, u), dy))| crate::simd::silu_mul_bwd(g, u, dy, dg, du));
    (dg, du)
}

/// Elements per task of the SwiGLU passes.
const SWIGLU_CHUNK: usize = 1 << 14;

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "attune-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("SwiGlu.cpu_fwd");
        let g = f32_slice(s1, l1, "swiglu gate")?;
        let u = f32_slice(s2, l2, "swiglu up")?;
        Ok((CpuStorage::F32(swiglu_forward(g, u)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("SwiGlu.bwd");
        borrow_f32!(g = gate, "swiglu gate"; u = up, "swiglu up"; dy = grad, "swiglu grad");
        if u.len() != g.len() || dy.len() != g.len() {
            candle_core::bail!("swiglu backward: gate, up and grad sizes differ")
        }
        let (dg, du) = swiglu_backward(g, u, dy);
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), dev)?),
            Some(Tensor::from_vec(du, up.shape(), dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Gate, up and SwiGLU in one op
// ---------------------------------------------------------------------------------------------

/// `silu(x Wg^T) * (x Wu^T)`, the first half of a SwiGLU MLP, for dense weights `wg`, `wu`
/// `[inter, in]` (trained or frozen); `x` `[..., in]`. One graph node instead of three: the gate
/// and up products stay inside the op (kept for the backward pass), so the backward pass
/// allocates no gradient buffers for them. Differentiable in `x` and in whichever weight is a
/// variable.
pub fn gate_up_swiglu(x: &Tensor, wg: &Tensor, wu: &Tensor) -> CResult<Tensor> {
    if wg.dims() != wu.dims() {
        candle_core::bail!(
            "gate/up: weights {:?} and {:?} differ",
            wg.dims(),
            wu.dims()
        )
    }
    x.contiguous()?.apply_op3(
        &wg.contiguous()?,
        &wu.contiguous()?,
        GateUpSwiglu {
            kept: Mutex::new(None),
        },
    )
}

struct GateUpSwiglu {
    /// The gate and up products `[rows, inter]` from the forward pass.
    kept: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl GateUpSwiglu {
    fn products(
        x: &[f32],
        wg: &[f32],
        wu: &[f32],
        rows: usize,
        din: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let inter = wg.len() / din.max(1);
        let par = Parallelism::Rayon(threads());
        let g = product(rows, inter, din, x, (din, 1), wg, (1, din), par);
        let u = product(rows, inter, din, x, (din, 1), wu, (1, din), par);
        (g, u)
    }
}

impl CustomOp3 for GateUpSwiglu {
    fn name(&self) -> &'static str {
        "attune-gate-up-swiglu"
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
        let _pg = prof("GateUpSwiglu.cpu_fwd");
        let x = f32_slice(s1, l1, "gate/up input")?;
        let wg = f32_slice(s2, l2, "gate weight")?;
        let wu = f32_slice(s3, l3, "up weight")?;
        let (rows, din) = rows_features(l1.shape())?;
        let (inter, w_in) = l2.shape().dims2()?;
        if w_in != din {
            candle_core::bail!("gate/up: input has {din} features, the weights expect {w_in}")
        }
        let (g, u) = Self::products(x, wg, wu, rows, din);
        let h = swiglu_forward(&g, &u);
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some((g, u));
        Ok((CpuStorage::F32(h), with_features(l1.shape(), inter)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wg: &Tensor,
        wu: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("GateUpSwiglu.bwd");
        let (rows, din) = rows_features(x.shape())?;
        let (inter, _) = wg.dims2()?;
        borrow_f32!(
            xv = x, "gate/up input";
            wgv = wg, "gate weight";
            wuv = wu, "up weight";
            dh = grad, "gate/up grad";
        );
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (g, u) = match kept {
            Some(k) => k,
            // A second backward through the same graph: recompute the products.
            None => Self::products(xv, wgv, wuv, rows, din),
        };
        if dh.len() != g.len() {
            candle_core::bail!(
                "gate/up backward: grad has {} values, expected {}",
                dh.len(),
                g.len()
            )
        }
        let (dg, du) = swiglu_backward(&g, &u, dh);
        drop((g, u));
        let par = Parallelism::Rayon(threads());
        let dx = if x.track_op() {
            // dx = dg Wg + du Wu
            let mut dx = product(rows, din, inter, &dg, (inter, 1), wgv, (din, 1), par);
            matmul(
                rows,
                din,
                inter,
                &mut dx,
                (din, 1),
                true,
                &du,
                (inter, 1),
                wuv,
                (din, 1),
                par,
            );
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        // dW = d^T x for a trained weight
        let dw = |d: &[f32], w: &Tensor| -> CResult<Option<Tensor>> {
            if !w.track_op() {
                return Ok(None);
            }
            let dw = product(inter, din, rows, d, (1, inter), xv, (din, 1), par);
            Ok(Some(Tensor::from_vec(dw, (inter, din), w.device())?))
        };
        Ok((dx, dw(&dg, wg)?, dw(&du, wu)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen linear
// ---------------------------------------------------------------------------------------------

/// `x W^T` for a frozen weight `w` `[out, in]`: differentiable in `x` only. `x` is `[rows, in]`.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let x = x.contiguous()?;
    x.apply_op1(FrozenLinear {
        w: w.contiguous()?.detach(),
    })
}

struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "attune-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("FrozenLinear.cpu_fwd");
        let x = f32_slice(s, l, "frozen linear input")?;
        let (rows, din) = rows_features(l.shape())?;
        let (dout, win) = self.w.dims2()?;
        if win != din {
            candle_core::bail!("frozen linear: input has {din} features, weight expects {win}")
        }
        borrow_f32!(w = self.w, "frozen linear weight");
        let out = product(
            rows,
            dout,
            din,
            x,
            (din, 1),
            w,
            (1, din),
            Parallelism::Rayon(threads()),
        );
        Ok((CpuStorage::F32(out), with_features(l.shape(), dout)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let _pg = prof("FrozenLinear.bwd");
        let (dout, din) = self.w.dims2()?;
        let rows = grad.elem_count() / dout.max(1);
        borrow_f32!(dy = grad, "frozen linear grad"; w = self.w, "frozen linear weight");
        let par = Parallelism::Rayon(threads());
        let dx = product(rows, din, dout, dy, (dout, 1), w, (din, 1), par);
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
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f32) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.contiguous()?.detach(),
            scale,
            xa: Mutex::new(None),
        },
    )
}

struct LoraLinear {
    w: Tensor,
    scale: f32,
    /// `x A^T` `[rows, r]` from the forward pass, which the backward pass needs again.
    xa: Mutex<Option<Vec<f32>>>,
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
    let xa = product(rows, r, din, x, (din, 1), a, (1, din), par);
    matmul_scaled(
        rows,
        dout,
        r,
        dst,
        (dout, 1),
        true,
        &xa,
        (r, 1),
        b,
        (1, r),
        scale,
        par,
    );
    xa
}

/// The backward pass of [`lora_branch_forward`] for the output gradient `dy` `[rows, out]`: adds
/// `scale * (dy B) A` to `dx` when given, and returns `dA = scale * (dy B)^T x` when `x` is given
/// and `dB = scale * dy^T (x A^T)` when `xa` is.
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
    // u = dy B [rows, r]
    let u = product(rows, r, dout, dy, (dout, 1), b, (r, 1), par);
    if let Some(dx) = dx {
        matmul_scaled(
            rows,
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
            par,
        );
    }
    let da = x.map(|x| {
        let mut da = vec![0f32; r * din];
        matmul_scaled(
            r,
            din,
            rows,
            &mut da,
            (din, 1),
            false,
            &u,
            (1, r),
            x,
            (din, 1),
            scale,
            par,
        );
        da
    });
    let db = xa.map(|xa| {
        let mut db = vec![0f32; dout * r];
        matmul_scaled(
            dout,
            r,
            rows,
            &mut db,
            (r, 1),
            false,
            dy,
            (1, dout),
            xa,
            (r, 1),
            scale,
            par,
        );
        db
    });
    (da, db)
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
        let (w_out, w_in) = self.w.dims2()?;
        if a_in != din || b_r != r || (w_out, w_in) != (dout, din) {
            candle_core::bail!("lora linear: shapes do not fit (x {rows}x{din}, A {r}x{a_in}, B {dout}x{b_r}, W {w_out}x{w_in})")
        }
        borrow_f32!(w = self.w, "lora base weight");
        let par = Parallelism::Rayon(threads());
        let mut y = product(rows, dout, din, x, (din, 1), w, (1, din), par);
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
            w = self.w, "lora base weight";
        );
        let par = Parallelism::Rayon(threads());
        let kept = self.xa.lock().unwrap_or_else(|e| e.into_inner()).take();
        let t = match kept {
            Some(t) if t.len() == rows * r => t,
            // A second backward through the same graph: recompute it.
            _ => product(rows, r, din, xv, (din, 1), av, (1, din), par),
        };
        let mut dx = product(rows, din, dout, dy, (dout, 1), w, (din, 1), par);
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

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

/// `x / sqrt(mean(x^2) + eps) * w` over the last dim; differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> CResult<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2(&w, RmsNormOp { eps })
}

struct RmsNormOp {
    eps: f32,
}

pub(crate) fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

/// `x * w / rms(x)` row by row (`w.len()` features per row).
pub(crate) fn rms_forward(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(h * 64)
        .zip(x.par_chunks(h * 64))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_mut(h).zip(xi.chunks(h)) {
                let r = inv_rms(xrow, eps);
                for ((o, &x), &w) in orow.iter_mut().zip(xrow).zip(w) {
                    *o = x * r * w;
                }
            }
        });
    out
}

/// The backward pass of [`rms_forward`] for the output gradient `dy`: writes `dx` (adds to it
/// when `accumulate`) and returns `dw` when `want_dw` (empty otherwise).
pub(crate) fn rms_backward(
    x: &[f32],
    w: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    want_dw: bool,
) -> Vec<f32> {
    let h = w.len();
    let chunk = h * 64;
    let n_chunks = x.len().div_ceil(chunk);
    let mut dw_parts = vec![0f32; if want_dw { n_chunks * h } else { 0 }];
    let mut dw_chunks: Vec<Option<&mut [f32]>> = if want_dw {
        dw_parts.chunks_mut(h).map(Some).collect()
    } else {
        (0..n_chunks).map(|_| None).collect()
    };
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .zip(dw_chunks.par_iter_mut())
        .for_each(|((dxc, (xc, gc)), dwp)| {
            for ((dxr, xr), gr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(gc.chunks(h)) {
                let r = inv_rms(xr, eps);
                // g' = dy * w; dx = r g' - x r^3 mean(g' x)
                let mut dot = 0f32;
                for ((&g, &w), &x) in gr.iter().zip(w).zip(xr) {
                    dot += g * w * x;
                }
                let c = r * r * r * dot / h as f32;
                if accumulate {
                    for (((d, &g), &w), &x) in dxr.iter_mut().zip(gr).zip(w).zip(xr) {
                        *d += r * g * w - x * c;
                    }
                } else {
                    for (((d, &g), &w), &x) in dxr.iter_mut().zip(gr).zip(w).zip(xr) {
                        *d = r * g * w - x * c;
                    }
                }
                if let Some(dwp) = dwp {
                    for ((dw, &g), &x) in dwp.iter_mut().zip(gr).zip(xr) {
                        *dw += g * x * r;
                    }
                }
            }
        });
    let mut dw = vec![0f32; if want_dw { h } else { 0 }];
    for part in dw_parts.chunks(h.max(1)) {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    dw
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "attune-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("RmsNormOp.cpu_fwd");
        let x = f32_slice(s1, l1, "rms norm input")?;
        let w = f32_slice(s2, l2, "rms norm weight")?;
        let h = w.len();
        if h == 0 || l1.shape().dims().last() != Some(&h) {
            candle_core::bail!("rms norm: input {:?} and weight [{h}] differ", l1.shape())
        }
        let out = rms_forward(x, w, self.eps);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("RmsNormOp.bwd");
        borrow_f32!(
            xv = x, "rms norm input";
            wv = w, "rms norm weight";
            gv = grad, "rms norm grad";
        );
        let mut dx = vec![0f32; xv.len()];
        let dw = rms_backward(xv, wv, self.eps, gv, &mut dx, false, true);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

/// Per-row negative log-likelihood `-log softmax(logits)[target]`: `logits` `[n, vocab]`,
/// `targets` `n` ids; returns `[n]`. Differentiable in `logits`, keeping no `[n, vocab]`
/// intermediate besides the logits themselves.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if n != targets.len() {
        candle_core::bail!("cross entropy: {n} rows but {} targets", targets.len())
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross entropy: target id {t} outside the vocabulary of {vocab}")
    }
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: targets.to_vec(),
        lse: Mutex::new(None),
    })
}

struct CrossEntropy {
    targets: Vec<u32>,
    /// Log-sum-exp of every row, kept by the forward pass for the backward.
    lse: Mutex<Option<Vec<f32>>>,
}

/// Log-sum-exp of a row.
fn row_lse(row: &[f32]) -> f32 {
    let m = crate::simd::max(row);
    m + crate::simd::exp_sum(row, m).ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "attune-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("CrossEntropy.cpu_fwd");
        let x = f32_slice(s, l, "cross entropy logits")?;
        let (n, v) = l.shape().dims2()?;
        let mut lse = vec![0f32; n];
        lse.par_iter_mut()
            .zip(x.par_chunks(v))
            .for_each(|(o, row)| *o = row_lse(row));
        let out = lse
            .iter()
            .zip(x.chunks(v))
            .zip(&self.targets)
            .map(|((&lse, row), &t)| lse - row[t as usize])
            .collect();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let _pg = prof("CrossEntropy.bwd");
        let (n, v) = logits.dims2()?;
        borrow_f32!(x = logits, "cross entropy logits");
        let g = tensor_vec(grad)?;
        let kept = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        let recomputed;
        let lse = match kept.as_ref() {
            Some(lse) if lse.len() == n => lse,
            _ => {
                recomputed = x.par_chunks(v).map(row_lse).collect::<Vec<f32>>();
                &recomputed
            }
        };
        // d logits = (softmax - onehot(target)) * grad, row by row.
        let mut dx = vec![0f32; n * v];
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(
                g.par_iter()
                    .zip(self.targets.par_iter())
                    .zip(lse.par_iter()),
            )
            .for_each(|((d, row), ((&gr, &t), &lse))| {
                crate::simd::exp_into(row, lse, gr, d);
                d[t as usize] -= gr;
            });
        Ok(Some(Tensor::from_vec(dx, (n, v), logits.device())?))
    }
}

// ---------------------------------------------------------------------------------------------
// LM head and cross-entropy in one op
// ---------------------------------------------------------------------------------------------

/// Per-row negative log-likelihood of `targets` under the logits `h W^T`: `h` `[n, hidden]`,
/// `w` `[vocab, hidden]`; returns `[n]`. Differentiable in `h` and, when it is a variable, in
/// `w`. The `[n, vocab]` logits never become a tensor of the graph: the op keeps them from the
/// forward pass and turns them into their own gradient in place in the backward pass, so no
/// second `[n, vocab]` buffer (nor autograd's zero-filled accumulator for it) is ever allocated.
pub fn lm_head_nll(h: &Tensor, w: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let (n, hid) = h.dims2()?;
    let (vocab, w_hid) = w.dims2()?;
    if hid != w_hid {
        candle_core::bail!("lm head: hidden states have {hid} features, the weight {w_hid}")
    }
    if n != targets.len() {
        candle_core::bail!("lm head: {n} rows but {} targets", targets.len())
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("lm head: target id {t} outside the vocabulary of {vocab}")
    }
    h.contiguous()?.apply_op2(
        &w.contiguous()?,
        LmHeadNll {
            targets: targets.to_vec(),
            kept: Mutex::new(None),
        },
    )
}

struct LmHeadNll {
    targets: Vec<u32>,
    /// The logits `[n, vocab]` and each row's log-sum-exp, from the forward pass.
    kept: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl LmHeadNll {
    /// Logits `h W^T` and the log-sum-exp of every row.
    fn logits(&self, h: &[f32], w: &[f32], n: usize, hid: usize) -> (Vec<f32>, Vec<f32>) {
        let vocab = w.len() / hid.max(1);
        let logits = product(
            n,
            vocab,
            hid,
            h,
            (hid, 1),
            w,
            (1, hid),
            Parallelism::Rayon(threads()),
        );
        let mut lse = vec![0f32; n];
        if vocab > 0 {
            lse.par_iter_mut()
                .zip(logits.par_chunks(vocab))
                .for_each(|(o, row)| *o = row_lse(row));
        }
        (logits, lse)
    }
}

impl CustomOp2 for LmHeadNll {
    fn name(&self) -> &'static str {
        "attune-lm-head-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("LmHeadNll.cpu_fwd");
        let h = f32_slice(s1, l1, "lm head hidden states")?;
        let w = f32_slice(s2, l2, "lm head weight")?;
        let (n, hid) = l1.shape().dims2()?;
        let (vocab, _) = l2.shape().dims2()?;
        let (logits, lse) = self.logits(h, w, n, hid);
        let out = lse
            .iter()
            .zip(logits.chunks(vocab.max(1)))
            .zip(&self.targets)
            .map(|((&lse, row), &t)| lse - row[t as usize])
            .collect();
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some((logits, lse));
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let _pg = prof("LmHeadNll.bwd");
        let (n, hid) = h.dims2()?;
        let (vocab, _) = w.dims2()?;
        borrow_f32!(hv = h, "lm head hidden states"; wv = w, "lm head weight");
        let g = tensor_vec(grad)?;
        // A second backward through the same graph finds the logits gone: recompute them.
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (mut d, lse) = match kept {
            Some(k) => k,
            None => self.logits(hv, wv, n, hid),
        };
        // d logits = (softmax - onehot(target)) * grad, in place over the logits.
        d.par_chunks_mut(vocab.max(1))
            .zip(
                g.par_iter()
                    .zip(self.targets.par_iter())
                    .zip(lse.par_iter()),
            )
            .for_each(|(row, ((&gr, &t), &lse))| {
                crate::simd::exp_in_place(row, lse, gr);
                row[t as usize] -= gr;
            });
        let par = Parallelism::Rayon(threads());
        let dh = product(n, hid, vocab, &d, (vocab, 1), wv, (hid, 1), par);
        let dw = if w.track_op() {
            let dw = product(vocab, hid, n, &d, (1, vocab), hv, (hid, 1), par);
            Some(Tensor::from_vec(dw, (vocab, hid), w.device())?)
        } else {
            None
        };
        Ok((Some(Tensor::from_vec(dh, (n, hid), h.device())?), dw))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn lora_add_equals_the_two_matmuls() {
        let dev = Device::Cpu;
        let (rows, inp, out, r) = (3, 37, 21, 5);
        let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (rows, out), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (r, inp), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (out, r), &dev).unwrap();
        let got = lora_add(&y, &x, &a, &b, 0.7).unwrap();
        let want = (&y
            + (x.matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * 0.7)
                .unwrap())
        .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
        assert!(lora_add(&y, &x, &b, &a, 1.0).is_err());
    }

    #[test]
    fn cached_attention_equals_masked_softmax_over_the_whole_cache() {
        let dev = Device::Cpu;
        // Grouped heads, a cache holding 7 earlier positions, read through a narrowed view of a
        // larger buffer (as the KV cache hands it over), and a batch of 2.
        let (b, nh, nkv, l, hd, off) = (2, 6, 2, 5, 8, 7);
        let t = off + l;
        let q = Tensor::randn(0f32, 1.0, (b, nh, l, hd), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (b, nkv, 32, hd), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, nkv, 32, hd), &dev).unwrap();
        let (k, v) = (kbuf.narrow(2, 0, t).unwrap(), vbuf.narrow(2, 0, t).unwrap());
        assert!(!k.is_contiguous());
        let got = cached_attention(&q, &k, &v, 0.35).unwrap();
        assert_eq!(got.dims(), &[b, l, nh * hd]);
        let g = nh / nkv;
        for bi in 0..b {
            for h in 0..nh {
                let qh = q.get(bi).unwrap().get(h).unwrap();
                let kh = k.get(bi).unwrap().get(h / g).unwrap().contiguous().unwrap();
                let vh = v.get(bi).unwrap().get(h / g).unwrap().contiguous().unwrap();
                let s = (qh.matmul(&kh.t().unwrap()).unwrap() * 0.35).unwrap();
                let mut m = vec![0f32; l * t];
                for i in 0..l {
                    for j in off + i + 1..t {
                        m[i * t + j] = f32::NEG_INFINITY;
                    }
                }
                let m = Tensor::from_vec(m, (l, t), &dev).unwrap();
                let p = candle_nn::ops::softmax(&(s + m).unwrap(), D::Minus1).unwrap();
                let want = p.matmul(&vh).unwrap();
                let have = got.get(bi).unwrap().narrow(1, h * hd, hd).unwrap();
                let diff = (want - have)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-5, "batch {bi} head {h}: {diff}");
            }
        }
        // Shapes that do not fit are an error, not a panic.
        let bad = Tensor::zeros((b, nkv, l - 1, hd), candle_core::DType::F32, &dev).unwrap();
        assert!(cached_attention(&q, &bad, &bad, 1.0).is_err());
    }

    fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let (b, nh, l, hd) = q.dims4().unwrap();
        let nkv = k.dim(1).unwrap();
        let g = nh / nkv;
        let k = k
            .unsqueeze(2)
            .unwrap()
            .broadcast_as((b, nkv, g, l, hd))
            .unwrap()
            .reshape((b, nh, l, hd))
            .unwrap();
        let v = v
            .unsqueeze(2)
            .unwrap()
            .broadcast_as((b, nkv, g, l, hd))
            .unwrap()
            .reshape((b, nh, l, hd))
            .unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let mut m = vec![0f32; l * l];
        for i in 0..l {
            for j in i + 1..l {
                m[i * l + j] = f32::NEG_INFINITY;
            }
        }
        let m = Tensor::from_vec(m, (l, l), &Device::Cpu).unwrap();
        let s = s.broadcast_add(&m).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

    #[test]
    fn attention_matches_naive_forward_and_backward() {
        // One block, and three causal blocks with a short last one.
        for dims in [(2, 6, 2, 13, 8), (1, 4, 2, 150, 8)] {
            attention_case(dims);
        }
    }

    fn attention_case((b, nh, nkv, l, hd): (usize, usize, usize, usize, usize)) {
        let dev = Device::Cpu;
        let q = Var::randn(0f32, 1., (b, l, nh, hd), &dev).unwrap();
        let k = Var::randn(0f32, 1., (b, l, nkv, hd), &dev).unwrap();
        let v = Var::randn(0f32, 1., (b, l, nkv, hd), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (b, l, nh, hd), &dev).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let fast = attention(&q, &k, &v, scale as f32).unwrap();
        let t = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        let slow = t(&naive_attention(&t(&q), &t(&k), &t(&v), scale));
        assert!(max_diff(&fast, &slow) < 1e-5);
        let gf = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&q, &k, &v] {
            let d = max_diff(gf.get(t).unwrap(), gs.get(t).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        // The same on the projections' [b, l, heads * hd] layout, with rope applied there.
        let flat = |x: &Var| x.as_tensor().flatten_from(2).unwrap();
        let half = hd / 2;
        let cos = Tensor::randn(0f32, 1., (l, half), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1., (l, half), &dev).unwrap();
        let q4 = rope(&q, &cos, &sin).unwrap();
        let q3 = rope(&flat(&q), &cos, &sin).unwrap();
        assert!(max_diff(&q4.flatten_from(2).unwrap(), &q3) < 1e-6);
        let heads = attention_heads(&q3, &flat(&k), &flat(&v), nh, nkv, scale as f32).unwrap();
        let four = attention(&q4, &k, &v, scale as f32).unwrap();
        assert_eq!(heads.dims(), &[b, l, nh * hd]);
        assert!(max_diff(&heads, &four.flatten_from(2).unwrap()) < 1e-6);
        let w3 = w.flatten_from(2).unwrap();
        let gh = (heads * &w3)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g4 = (four * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&q, &k, &v] {
            let d = max_diff(gh.get(t).unwrap(), g4.get(t).unwrap());
            assert!(d < 1e-5, "gradient on the flat layout differs by {d}");
        }
        assert!(attention_heads(&q3, &flat(&k), &flat(&v), 5, nkv, 1.0).is_err());
    }

    #[test]
    fn lora_linear_matches_basic_ops() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (9, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (5, 6), &dev).unwrap();
        let a = Var::randn(0f32, 1., (3, 6), &dev).unwrap();
        let b = Var::randn(0f32, 1., (5, 3), &dev).unwrap();
        let gy = Tensor::randn(0f32, 1., (9, 5), &dev).unwrap();
        let fast = lora_linear(&x, &w, &a, &b, 2.0).unwrap();
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
    fn rope_and_swiglu_match_candle() {
        let dev = Device::Cpu;
        let (b, l, h, hd) = (2, 5, 3, 8);
        let x = Var::randn(0f32, 1., (b, l, h, hd), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1., (l, hd / 2), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1., (l, hd / 2), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (b, l, h, hd), &dev).unwrap();
        let fast = rope(&x, &cos, &sin).unwrap();
        let xt = x.transpose(1, 2).unwrap().contiguous().unwrap();
        let slow = candle_nn::rotary_emb::rope_slow(&xt, &cos, &sin)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        assert!(max_diff(&fast, &slow) < 1e-5);
        let gf = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gs.get(&x).unwrap()) < 1e-5);

        let g = Var::randn(0f32, 2., (7, 9), &dev).unwrap();
        let u = Var::randn(0f32, 1., (7, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (7, 9), &dev).unwrap();
        let fast = swiglu(&g, &u).unwrap();
        let slow = (g.silu().unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&fast, &slow) < 1e-5);
        let gf = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&g).unwrap(), gs.get(&g).unwrap()) < 1e-5);
        assert!(max_diff(gf.get(&u).unwrap(), gs.get(&u).unwrap()) < 1e-5);
    }

    #[test]
    fn cross_entropy_matches_log_softmax() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 3., (6, 11), &dev).unwrap();
        let t = [0u32, 3, 10, 5, 5, 1];
        let w = Tensor::randn(0f32, 1., 6, &dev).unwrap();
        let a = cross_entropy(&x, &t).unwrap();
        let ls = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
        let idx = Tensor::new(&t, &dev).unwrap().unsqueeze(1).unwrap();
        let b = ls
            .gather(&idx, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
    }

    #[test]
    fn lm_head_nll_matches_the_head_then_cross_entropy() {
        let dev = Device::Cpu;
        // 37 vocabulary entries: two full 16-lane blocks and a tail in the exp kernels.
        let h = Var::randn(0f32, 1., (5, 9), &dev).unwrap();
        let w = Var::randn(0f32, 1., (37, 9), &dev).unwrap();
        let t = [0u32, 36, 17, 17, 4];
        let rw = Tensor::randn(0f32, 1., 5, &dev).unwrap();
        let a = lm_head_nll(&h, &w, &t).unwrap();
        let logits = h.matmul(&w.t().unwrap()).unwrap();
        let ls = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let idx = Tensor::new(&t, &dev).unwrap().unsqueeze(1).unwrap();
        let b = ls
            .gather(&idx, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let la = (&a * &rw).unwrap().sum_all().unwrap();
        let ga = la.backward().unwrap();
        let gb = (b * &rw).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&h).unwrap(), gb.get(&h).unwrap()) < 1e-5);
        assert!(max_diff(ga.get(&w).unwrap(), gb.get(&w).unwrap()) < 1e-5);
        // A second backward through the same graph recomputes the logits it gave away.
        let again = la.backward().unwrap();
        assert!(max_diff(again.get(&h).unwrap(), gb.get(&h).unwrap()) < 1e-5);
        // A frozen weight gets no gradient.
        let frozen = lm_head_nll(&h, w.as_tensor(), &t).unwrap();
        let w_plain = w.as_tensor().detach();
        let g = lm_head_nll(&h, &w_plain, &t)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&w_plain).is_none() && g.get(&h).is_some());
        assert!(max_diff(&frozen, &a) < 1e-6);
        assert!(lm_head_nll(&h, &w, &[37, 0, 0, 0, 0]).is_err());
        assert!(lm_head_nll(&h, &w, &[0, 0]).is_err());
    }

    #[test]
    fn gate_up_swiglu_matches_the_separate_ops() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 5), &dev).unwrap();
        let wg = Var::randn(0f32, 1., (17, 5), &dev).unwrap();
        let wu = Var::randn(0f32, 1., (17, 5), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (2, 3, 17), &dev).unwrap();
        let a = gate_up_swiglu(&x, &wg, &wu).unwrap();
        assert_eq!(a.dims(), &[2, 3, 17]);
        let g = x.broadcast_matmul(&wg.t().unwrap()).unwrap();
        let u = x.broadcast_matmul(&wu.t().unwrap()).unwrap();
        let b = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let la = (&a * &r).unwrap().sum_all().unwrap();
        let ga = la.backward().unwrap();
        let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &wg, &wu] {
            let d = max_diff(ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        // A second backward recomputes the products it gave away.
        let again = la.backward().unwrap();
        assert!(max_diff(again.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4);
        // Frozen weights get no gradient.
        let (fg, fu) = (wg.as_tensor().detach(), wu.as_tensor().detach());
        let gf = gate_up_swiglu(&x, &fg, &fu)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(gf.get(&fg).is_none() && gf.get(&fu).is_none() && gf.get(&x).is_some());
        assert!(gate_up_swiglu(&x, &wg, &wu.as_tensor().narrow(0, 0, 3).unwrap()).is_err());
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
        let a = frozen_linear(&x, &w).unwrap();
        let b = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);

        let nw = Var::randn(1f32, 0.1, 5, &dev).unwrap();
        let gy = Tensor::randn(0f32, 1., (7, 5), &dev).unwrap();
        let a = rms_norm(&x, &nw, 1e-5).unwrap();
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let b = x
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&nw)
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4);
        assert!(max_diff(ga.get(&nw).unwrap(), gb.get(&nw).unwrap()) < 1e-4);
    }
}
