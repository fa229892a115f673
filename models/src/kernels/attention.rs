//! Causal attention: the training op with its own backward pass ([`attention`],
//! [`attention_heads`]; FlashAttention's scheme, Dao et al. 2022: only the output and one
//! log-sum-exp per row are kept, and the probabilities are recomputed head by head in the
//! backward pass, with GEMMs per head) and the inference op over the KV cache
//! ([`cached_attention`]). The slice-level [`attention_forward`] / [`attention_backward`] are what
//! the fused layer ([`super::block`]) calls too.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;

use super::gemm::matmul;
use super::profile::prof;
use super::{borrow_f32, f32_slice, CResult};

/// Causal self-attention without a cache, in the layout the projections produce: `q`
/// `[b, seq, heads, hd]`, `k`/`v` `[b, seq, kv_heads, hd]` (grouped-query: `heads / kv_heads`
/// query heads share one kv head), contiguous f32. Returns `[b, seq, heads, hd]`, so no
/// transposes are needed on either side. Differentiable in all three inputs. With `window`, a
/// query sees only the last `window` keys up to itself (sliding-window attention).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: Option<usize>,
) -> CResult<Tensor> {
    attention_op(q, k, v, scale, None, window)
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
    window: Option<usize>,
) -> CResult<Tensor> {
    attention_op(q, k, v, scale, Some((heads, kv_heads)), window)
}

fn attention_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    heads: Option<(usize, usize)>,
    window: Option<usize>,
) -> CResult<Tensor> {
    if window == Some(0) {
        candle_core::bail!("attention: a sliding window of 0 keys")
    }
    let q = q.contiguous()?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    q.apply_op3(
        &k,
        &v,
        Attention {
            scale,
            heads,
            window,
            lse: Mutex::new(None),
        },
    )
}

struct Attention {
    scale: f32,
    /// Head counts `(heads, kv_heads)` when the inputs are `[b, seq, heads * hd]`.
    heads: Option<(usize, usize)>,
    /// Sliding window: keys a query sees, itself included.
    window: Option<usize>,
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
    /// Sliding window: keys a query sees, itself included (`None`: all earlier keys).
    pub(crate) window: Option<usize>,
}

impl AttnDims {
    fn of(
        q: &Shape,
        k: &Shape,
        v: &Shape,
        heads: Option<(usize, usize)>,
        window: Option<usize>,
    ) -> CResult<AttnDims> {
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
        Ok(AttnDims {
            b,
            nh,
            nkv,
            l,
            hd,
            window,
        })
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
/// row into probabilities in place (zeros above the diagonal, up to column `r1`, and left of a
/// sliding window). With `lse_in`,
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
    let lse_rows: &mut [f32] = match lse_in {
        Some(_) => &mut [],
        None => &mut lse_out[r0..r1],
    };
    probs_rows(
        d,
        r0,
        r1 - r0,
        r1,
        &mut s[r0 * l..],
        l,
        scale,
        lse_in,
        lse_rows,
    );
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
///
/// With `bf16` (and AMX present), the products run in bf16 on the matrix units
/// ([`attention_forward_bf16`]); the backward pass must then take the same `bf16`.
pub(crate) fn attention_forward(
    d: AttnDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    bf16: bool,
) -> (Vec<f32>, Vec<f32>) {
    let _pg = super::profile::prof("attention.fwd");
    if bf16 && super::amx::available() {
        return attention_forward_bf16(d, q, k, v, scale);
    }
    let (l, hd, g) = (d.l, d.hd, d.groups());
    let (q_rs, kv_rs) = (d.nh * hd, d.nkv * hd);
    // One task per (batch, kv head): its query heads' outputs `[g, l, hd]` and lse `[g, l]`.
    let results: Vec<(Vec<f32>, Vec<f32>)> = super::pool::map(d.b * d.nkv, |task| {
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
    });
    gather_forward(d, &results)
}

/// The forward pass's per-(batch, kv head) outputs `[g, l, hd]` and lse `[g, l]` in place: the
/// output in `q`'s layout and the lse `[b, heads, l]`.
fn gather_forward(d: AttnDims, results: &[(Vec<f32>, Vec<f32>)]) -> (Vec<f32>, Vec<f32>) {
    let (l, hd, g) = (d.l, d.hd, d.groups());
    let mut out = vec![0f32; d.b * l * d.nh * hd];
    let mut lse = vec![0f32; d.b * d.nh * l];
    for (task, (o, ls)) in results.iter().enumerate() {
        let (bi, kh) = (task / d.nkv, task % d.nkv);
        for j in 0..g {
            let h = kh * g + j;
            scatter_head(
                &mut out,
                d.at(bi, h, d.nh),
                d.nh * hd,
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

/// Query rows per block of the bf16 attention (two tile rows).
const BF16_BLOCK: usize = 32;

/// The row blocks `(r0, r1)` of `l` positions, `n` rows each.
fn row_blocks(l: usize, n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..l.div_ceil(n)).map(move |i| (i * n, ((i + 1) * n).min(l)))
}

/// Rows `r0..r0 + rows` of one head's scores, `s` (row stride `rs`, the keys `0..live` each)
/// into probabilities in place: zero above the diagonal and left of a sliding window; with `lse_in` (the backward pass) from the kept log-sum-exp, otherwise
/// writing each row's to `lse_out[row - r0]`.
#[allow(clippy::too_many_arguments)]
fn probs_rows(
    d: AttnDims,
    r0: usize,
    rows: usize,
    live: usize,
    s: &mut [f32],
    rs: usize,
    scale: f32,
    lse_in: Option<&[f32]>,
    lse_out: &mut [f32],
) {
    for r in 0..rows {
        let i = r0 + r;
        let row = &mut s[r * rs..r * rs + live];
        let (seen, dead) = row.split_at_mut(i + 1);
        dead.fill(0.0);
        let lo = d.window.map_or(0, |w| (i + 1).saturating_sub(w));
        let (left, p) = seen.split_at_mut(lo);
        left.fill(0.0);
        match lse_in {
            Some(lse) => {
                super::simd::exp_scaled_sum(p, scale, lse[i]);
            }
            None => lse_out[r] = super::simd::softmax_scaled(p, scale),
        }
    }
}

/// [`attention_forward`] with its products on the matrix units: per (batch, kv head), the keys
/// and values packed once, then per query head and block of 32 queries `s = q k^T` over the
/// keys the block sees, the softmax in f32 (its lse kept), `o = p v` with `p` in bf16. f32
/// accumulation throughout; only the products' operands are rounded to bf16, as PyTorch's
/// autocast does.
fn attention_forward_bf16(
    d: AttnDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    use super::amx::{matmul_prefix, PackedB, RowsBf16};
    let (l, hd, g) = (d.l, d.hd, d.groups());
    let (q_rs, kv_rs) = (d.nh * hd, d.nkv * hd);
    let results: Vec<(Vec<f32>, Vec<f32>)> = super::pool::map(d.b * d.nkv, |task| {
        let (bi, kh) = (task / d.nkv, task % d.nkv);
        let kg = &k[d.at(bi, kh, d.nkv)..];
        let vg = &v[d.at(bi, kh, d.nkv)..];
        // The B of q k^T (keys as columns) and of p v (contraction over the keys).
        let kp = PackedB::from_rows_strided_serial(kg, l, hd, kv_rs);
        let vp = PackedB::from_cols_strided_serial(vg, l, hd, kv_rs);
        let mut s = vec![0f32; BF16_BLOCK * l];
        let mut out = vec![0f32; g * l * hd];
        let mut lse = vec![0f32; g * l];
        for j in 0..g {
            let qh = &q[d.at(bi, kh * g + j, d.nh)..];
            for (r0, r1) in row_blocks(l, BF16_BLOCK) {
                let (rows, live) = (r1 - r0, r1);
                let qa = RowsBf16::from_f32_strided(&qh[r0 * q_rs..], rows, hd, q_rs);
                matmul_prefix(&qa, &kp, live, &mut s, live, false);
                let lse_rows = &mut lse[j * l + r0..j * l + r1];
                probs_rows(d, r0, rows, live, &mut s, live, scale, None, lse_rows);
                let pa = RowsBf16::from_f32(&s[..rows * live], rows, live);
                matmul_prefix(&pa, &vp, hd, &mut out[(j * l + r0) * hd..], hd, false);
            }
        }
        (out, lse)
    });
    gather_forward(d, &results)
}

/// [`attention_backward`] with its products on the matrix units, the counterpart of
/// [`attention_forward_bf16`] (whose lse it takes): per (batch, kv head) and query head, block by
/// block of 32 queries `p` (recomputed), `dp = dO v^T`, `ds = p (dp - rowsum(dO o)) scale` and
/// `dq = ds k`; then over the whole head `dv += p^T dO` and `dk += ds^T q`.
#[allow(clippy::too_many_arguments)]
fn attention_backward_bf16(
    d: AttnDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use super::amx::{matmul_prefix, PackedB, RowsBf16};
    let (l, hd, g) = (d.l, d.hd, d.groups());
    let (q_rs, kv_rs) = (d.nh * hd, d.nkv * hd);
    let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = super::pool::map(d.b * d.nkv, |task| {
        let (bi, kh) = (task / d.nkv, task % d.nkv);
        let kg = &k[d.at(bi, kh, d.nkv)..];
        let vg = &v[d.at(bi, kh, d.nkv)..];
        // The B of q k^T and of dO v^T (keys/values as columns), and of ds k (contraction over
        // the keys).
        let kp = PackedB::from_rows_strided_serial(kg, l, hd, kv_rs);
        let vtp = PackedB::from_rows_strided_serial(vg, l, hd, kv_rs);
        let kc = PackedB::from_cols_strided_serial(kg, l, hd, kv_rs);
        // A head's p and ds, `[l, l]` (each block writes its rows, keys `0..r1`).
        let mut p = vec![0f32; l * l];
        let mut ds = vec![0f32; l * l];
        let mut dq = vec![0f32; g * l * hd];
        let mut dk = vec![0f32; l * hd];
        let mut dv = vec![0f32; l * hd];
        for j in 0..g {
            let h = kh * g + j;
            let off = d.at(bi, h, d.nh);
            let (qh, oh, doh) = (&q[off..], &o[off..], &dout[off..]);
            let lse_h = &lse[(bi * d.nh + h) * l..(bi * d.nh + h + 1) * l];
            for (r0, r1) in row_blocks(l, BF16_BLOCK) {
                let (rows, live) = (r1 - r0, r1);
                let qa = RowsBf16::from_f32_strided(&qh[r0 * q_rs..], rows, hd, q_rs);
                matmul_prefix(&qa, &kp, live, &mut p[r0 * l..], l, false);
                probs_rows(
                    d,
                    r0,
                    rows,
                    live,
                    &mut p[r0 * l..],
                    l,
                    scale,
                    Some(lse_h),
                    &mut [],
                );
                let da = RowsBf16::from_f32_strided(&doh[r0 * q_rs..], rows, hd, q_rs);
                matmul_prefix(&da, &vtp, live, &mut ds[r0 * l..], l, false);
                scores_grad(&p, &mut ds, l, (r0, r1), (doh, oh, q_rs, hd), scale);
                let sa = RowsBf16::from_f32_strided(&ds[r0 * l..], rows, live, l);
                matmul_prefix(&sa, &kc, hd, &mut dq[(j * l + r0) * hd..], hd, false);
                // In f32, where the transposes are free (in bf16 each would need a transposed
                // copy of p and ds).
                accumulate_dv_dk(&mut dv, &mut dk, &p, &ds, l, (r0, r1), (doh, qh, q_rs, hd));
            }
        }
        (dq, dk, dv)
    });
    gather_backward(d, q.len(), k.len(), &results)
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
    bf16: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let _pg = super::profile::prof("attention.bwd");
    if bf16 && super::amx::available() {
        return attention_backward_bf16(d, q, k, v, o, dout, lse, scale);
    }
    let (l, hd, g) = (d.l, d.hd, d.groups());
    let (q_rs, kv_rs) = (d.nh * hd, d.nkv * hd);
    // Per (batch, kv head): dq of its query heads `[g, l, hd]`, dk and dv `[l, hd]`.
    let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = super::pool::map(d.b * d.nkv, |task| {
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
                scores_grad(&p, &mut dp, l, (r0, r1), (doh, oh, q_rs, hd), scale);
                // dQ_blk = dS_blk K[0..r1]
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
                accumulate_dv_dk(&mut dv, &mut dk, &p, &dp, l, (r0, r1), (doh, qh, q_rs, hd));
            }
        }
        (dq, dk, dv)
    });
    gather_backward(d, q.len(), k.len(), &results)
}

/// `ds = p * (dp - rowsum(dO * O)) * scale` for query rows `r0..r1`, in place over `dp` (`p`
/// and `dp` rows `l` apart, keys `0..r1`; zero above the diagonal). `rows` is the head's `dO`
/// and `O` (rows `q_rs` apart) and its width `hd`.
fn scores_grad(
    p: &[f32],
    dp: &mut [f32],
    l: usize,
    (r0, r1): (usize, usize),
    (doh, oh, q_rs, hd): (&[f32], &[f32], usize, usize),
    scale: f32,
) {
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
}

/// `dV[0..r1] += P_blk^T dO_blk` and `dK[0..r1] += dS_blk^T Q_blk` for the query block `r0..r1`
/// (f32 GEMMs that read `p` and `ds`, rows `l` apart, transposed in place; the head's `dO` and
/// `Q` rows `q_rs` apart, `hd` wide).
#[allow(clippy::too_many_arguments)]
fn accumulate_dv_dk(
    dv: &mut [f32],
    dk: &mut [f32],
    p: &[f32],
    ds: &[f32],
    l: usize,
    (r0, r1): (usize, usize),
    (doh, qh, q_rs, hd): (&[f32], &[f32], usize, usize),
) {
    for (dst, a, b) in [(dv, p, doh), (dk, ds, qh)] {
        matmul(
            r1,
            hd,
            r1 - r0,
            dst,
            (hd, 1),
            true,
            &a[r0 * l..],
            (1, l),
            &b[r0 * q_rs..],
            (q_rs, 1),
            Parallelism::None,
        );
    }
}

/// The backward pass's per-(batch, kv head) `dq` `[g, l, hd]`, `dk` and `dv` `[l, hd]` in place
/// in the inputs' layouts (`nq` and `nkv` values).
fn gather_backward(
    d: AttnDims,
    nq: usize,
    nkv: usize,
    results: &[(Vec<f32>, Vec<f32>, Vec<f32>)],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (l, hd, g) = (d.l, d.hd, d.groups());
    let (q_rs, kv_rs) = (d.nh * hd, d.nkv * hd);
    let mut dq = vec![0f32; nq];
    let mut dk = vec![0f32; nkv];
    let mut dv = vec![0f32; nkv];
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
        let d = AttnDims::of(l1.shape(), l2.shape(), l3.shape(), self.heads, self.window)?;
        let q = f32_slice(s1, l1, "attention q")?;
        let k = f32_slice(s2, l2, "attention k")?;
        let v = f32_slice(s3, l3, "attention v")?;
        let (out, lse) = attention_forward(d, q, k, v, self.scale, false);
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
        let d = AttnDims::of(q.shape(), k.shape(), v.shape(), self.heads, self.window)?;
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
        let (dq, dk, dv) = attention_backward(d, qv, kv, vv, ov, dov, lse, self.scale, false);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Causal attention for inference over a KV cache (no gradient): `q` `[b, heads, l, hd]`,
/// `k`/`v` `[b, kv_heads, t, hd]` with `t >= l` (query `i` sits at position `t - l + i` and sees
/// keys `0..=t - l + i`; the last dim contiguous, other strides free, so a narrowed cache view is
/// read in place). Returns `[b, l, heads * hd]`, the layout `o_proj` takes: no transposes, no
/// `[l, t]` mask, and only the causal part of the scores is exponentiated. With `window`, a
/// query sees only the last `window` keys up to itself.
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: Option<usize>,
) -> CResult<Tensor> {
    check_cached(q, k, v, window)?;
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &CachedAttention {
            scale,
            window,
            bf16: false,
        },
    )
}

/// Whether prompts take [`cached_attention_bf16`], and training layers on bf16 projections
/// [`attention_forward_bf16`]: `ATTUNE_ATTENTION=bf16` (read once).
pub fn bf16_opted_in() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ATTUNE_ATTENTION").is_ok_and(|v| v == "bf16"))
}

/// [`cached_attention`] with its two products on the CPU's matrix units where it has them
/// (AMX): queries, keys, values and probabilities rounded to bf16, scores, softmax and sums in
/// f32, as PyTorch's bf16 autocast runs attention; the f32 op on a CPU without them. The model
/// takes it, when opted in ([`bf16_opted_in`]), where the projections beside it run in bf16
/// (prompts on `ComputeMode::Auto`), so a query row's figures do not depend on how the prompt
/// was split between calls. Each row's
/// result is its own (no row reads another's), as in the f32 op.
pub fn cached_attention_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: Option<usize>,
) -> CResult<Tensor> {
    if !super::amx::available() {
        return cached_attention(q, k, v, scale, window);
    }
    check_cached(q, k, v, window)?;
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &CachedAttention {
            scale,
            window,
            bf16: true,
        },
    )
}

/// The shapes [`cached_attention`] takes.
fn check_cached(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> CResult<()> {
    let (b, nh, l, hd) = q.dims4()?;
    let (kb, nkv, t, khd) = k.dims4()?;
    if v.dims() != k.dims()
        || kb != b
        || khd != hd
        || nkv == 0
        || nh % nkv != 0
        || t < l
        || window == Some(0)
    {
        candle_core::bail!(
            "cached attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    Ok(())
}

struct CachedAttention {
    scale: f32,
    window: Option<usize>,
    /// The products on AMX tiles ([`cached_attention_bf16`]).
    bf16: bool,
}

/// Softmax of each of the `rows` score rows in `s` (`live` columns each; the block's first row
/// is query position `pos0`) over the keys it sees, with `scale`; zero elsewhere.
fn block_softmax(
    s: &mut [f32],
    rows: usize,
    live: usize,
    pos0: usize,
    scale: f32,
    window: Option<usize>,
) {
    for r in 0..rows {
        let seen = pos0 + r + 1;
        let srow = &mut s[r * live..(r + 1) * live];
        let (p, dead) = srow.split_at_mut(seen);
        let lo = window.map_or(0, |w| seen.saturating_sub(w));
        let (left, p) = p.split_at_mut(lo);
        super::simd::softmax_scaled(p, scale);
        left.fill(0.0);
        dead.fill(0.0);
    }
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
        let (scale, window) = (self.scale, self.window);
        let mut out = vec![0f32; b * l * row];
        if self.bf16 && ks[2] == hd && vs[2] == hd && super::amx::available() {
            use super::amx::{matmul_prefix, PackedB, RowsBf16};
            // Blocks of 32 queries (two tile rows) per task.
            let chunk = 32;
            for bi in 0..b {
                // Each kv head's keys (the B of q k^T) and values (the B of p v), packed once.
                let packs = super::pool::map(nkv, |kh| {
                    let kg = &k[bi * ks[0] + kh * ks[1]..][..t * hd];
                    let vg = &v[bi * vs[0] + kh * vs[1]..][..t * hd];
                    (
                        PackedB::from_rows_serial(kg, t, hd),
                        PackedB::from_cols_serial(vg, t, hd),
                    )
                });
                super::pool::chunks_mut(
                    &mut out[bi * l * row..(bi + 1) * l * row],
                    chunk * row,
                    |c, dst| {
                        let i0 = c * chunk;
                        let rows = dst.len() / row;
                        let live = off + i0 + rows; // keys the block's last row sees
                        let mut s = vec![0f32; rows * live];
                        for h in 0..nh {
                            let (kp, vp) = &packs[h / g];
                            let qh = &q[((bi * nh + h) * l + i0) * hd..][..rows * hd];
                            let qa = RowsBf16::from_f32(qh, rows, hd);
                            matmul_prefix(&qa, kp, live, &mut s, live, false);
                            block_softmax(&mut s, rows, live, off + i0, scale, window);
                            let pa = RowsBf16::from_f32(&s, rows, live);
                            matmul_prefix(&pa, vp, hd, &mut dst[h * hd..], row, false);
                        }
                    },
                );
            }
            return Ok((CpuStorage::F32(out), Shape::from((b, l, row))));
        }
        // The `g` query heads that share a kv head as one product each way: their rows stacked
        // (`[g * rows, hd]`), so each key and value is read once per group, not once per query
        // head. `group` computes kv head `kh`'s group for query rows `i0..i0 + rows` of batch
        // `bi` into `og` (`[g * rows, hd]`, head by head).
        let group = |bi: usize, kh: usize, i0: usize, rows: usize, og: &mut [f32]| {
            let live = off + i0 + rows; // keys the block's last row sees
            let gr = g * rows;
            let mut s = vec![0f32; gr * live];
            let mut qg = vec![0f32; gr * hd];
            for j in 0..g {
                let h = kh * g + j;
                let qh = &q[((bi * nh + h) * l + i0) * hd..][..rows * hd];
                qg[j * rows * hd..(j + 1) * rows * hd].copy_from_slice(qh);
            }
            let kg = &k[bi * ks[0] + kh * ks[1]..];
            let vg = &v[bi * vs[0] + kh * vs[1]..];
            matmul(
                gr,
                live,
                hd,
                &mut s,
                (live, 1),
                false,
                &qg,
                (hd, 1),
                kg,
                (1, ks[2]),
                Parallelism::None,
            );
            for sj in s.chunks_exact_mut(rows * live) {
                block_softmax(sj, rows, live, off + i0, scale, window);
            }
            matmul(
                gr,
                hd,
                live,
                og,
                (hd, 1),
                false,
                &s,
                (live, 1),
                vg,
                (vs[2], 1),
                Parallelism::None,
            );
        };
        // `og`'s rows into `dst` (`rows` rows of `row` values), at kv head `kh`'s query heads.
        let scatter = |kh: usize, rows: usize, og: &[f32], dst: &mut [f32]| {
            for j in 0..g {
                let h = kh * g + j;
                for r in 0..rows {
                    dst[r * row + h * hd..][..hd].copy_from_slice(&og[(j * rows + r) * hd..][..hd]);
                }
            }
        };
        // Tasks of `chunk` query rows (all heads): rows later in the prompt see more keys, so
        // small chunks keep both threads busy to the end. A short prompt stays one block of
        // rows: split in quarters, its products' shapes (and so their rounding) changed, and the
        // judge's cached and uncached scores of the same rows parted by 6.6e-4 against its
        // test's 1e-4. Its kv-head groups are the tasks instead (each group's products as
        // before): a decoded token's attention was one thread's work while the other waited.
        let chunk = if l >= 64 { 16 } else { l.max(1) };
        for bi in 0..b {
            let dst_b = &mut out[bi * l * row..(bi + 1) * l * row];
            if chunk == l && nkv > 1 {
                let groups = super::pool::map(nkv, |kh| {
                    let mut og = vec![0f32; g * l * hd];
                    group(bi, kh, 0, l, &mut og);
                    og
                });
                for (kh, og) in groups.iter().enumerate() {
                    scatter(kh, l, og, dst_b);
                }
                continue;
            }
            super::pool::chunks_mut(dst_b, chunk * row, |c, dst| {
                let rows = dst.len() / row;
                let mut og = vec![0f32; g * rows * hd];
                for kh in 0..nkv {
                    group(bi, kh, c * chunk, rows, &mut og);
                    scatter(kh, rows, &og, dst);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, l, row))))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kernels::max_diff;
    use crate::kernels::rope::rope;
    use candle_core::{Device, Var, D};

    #[test]
    fn bf16_cached_attention_is_within_bf16_rounding_of_f32() {
        if !crate::kernels::amx::available() {
            eprintln!("no AMX here: the bf16 attention falls back to f32, nothing to compare");
            return;
        }
        let dev = Device::Cpu;
        // A 77-token prompt after 40 cached positions (blocks of 32 queries, a partial one,
        // key counts off the 32 grid), grouped heads, a narrowed cache, a batch of 2; and a
        // prompt without a cache, with and without a sliding window.
        for (b, nh, nkv, l, off, window) in [
            (2, 6, 2, 77, 40, None),
            (1, 4, 4, 64, 0, None),
            (1, 6, 3, 100, 10, Some(24)),
        ] {
            let hd = 64;
            let t = off + l;
            let q = Tensor::randn(0f32, 1.0, (b, nh, l, hd), &dev).unwrap();
            let kbuf = Tensor::randn(0f32, 1.0, (b, nkv, 160, hd), &dev).unwrap();
            let vbuf = Tensor::randn(0f32, 1.0, (b, nkv, 160, hd), &dev).unwrap();
            let (k, v) = (kbuf.narrow(2, 0, t).unwrap(), vbuf.narrow(2, 0, t).unwrap());
            let scale = 1.0 / (hd as f32).sqrt();
            let f = cached_attention(&q, &k, &v, scale, window).unwrap();
            let h = cached_attention_bf16(&q, &k, &v, scale, window).unwrap();
            assert_eq!(f.dims(), h.dims());
            // Outputs are averages of unit-normal values: bf16's 8 bits of mantissa on q, k, p
            // and v leave them within ~1e-2 (a wrong mask or block would be off by ~0.5).
            let d = max_diff(&f, &h);
            eprintln!("bf16 attention: max diff {d}");
            assert!(d < 3e-2, "b {b} heads {nh}/{nkv} l {l} off {off}: {d}");
            assert!(d > 0.0, "the bf16 path was not taken");
        }
    }

    /// The training attention's bf16 forward and backward passes against the f32 ones on
    /// unit-normal inputs: blocks of 32 queries with a partial last one, grouped heads, a batch
    /// of 2, a sliding window shorter than a block and one spanning blocks.
    #[test]
    fn bf16_training_attention_is_within_bf16_rounding_of_f32() {
        if !crate::kernels::amx::available() {
            eprintln!("no AMX here: the bf16 attention falls back to f32, nothing to compare");
            return;
        }
        let vals = |n: usize| -> Vec<f32> {
            let t = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
            t.to_vec1().unwrap()
        };
        for (b, nh, nkv, l, window) in [
            (2, 6, 2, 77, None),
            (1, 3, 3, 64, Some(20)),
            (1, 4, 2, 100, Some(45)),
        ] {
            let hd = 64;
            let d = AttnDims {
                b,
                nh,
                nkv,
                l,
                hd,
                window,
            };
            let (q, k, v) = (
                vals(b * l * nh * hd),
                vals(b * l * nkv * hd),
                vals(b * l * nkv * hd),
            );
            let dout = vals(b * l * nh * hd);
            let scale = 1.0 / (hd as f32).sqrt();
            let (of, lf) = attention_forward(d, &q, &k, &v, scale, false);
            let (oh, lh) = attention_forward(d, &q, &k, &v, scale, true);
            let diff = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            };
            // As the cached op: averages of unit-normal values, bf16 operands: ~1e-2.
            let (d_o, d_l) = (diff(&of, &oh), diff(&lf, &lh));
            let gf = attention_backward(d, &q, &k, &v, &of, &dout, &lf, scale, false);
            let gh = attention_backward(d, &q, &k, &v, &oh, &dout, &lh, scale, true);
            let (dq, dk, dv) = (diff(&gf.0, &gh.0), diff(&gf.1, &gh.1), diff(&gf.2, &gh.2));
            eprintln!("bf16 training attention: out {d_o}, lse {d_l}, dq {dq}, dk {dk}, dv {dv}");
            assert!(d_o < 3e-2 && d_l < 3e-2, "{d:?}: out {d_o}, lse {d_l}");
            assert!(d_o > 0.0, "the bf16 path was not taken");
            // Gradients are sums over up to l positions (dv, dk) of unit-sized terms: within
            // a few hundredths (a wrong mask, block or head would be off by ~1).
            assert!(
                dq < 6e-2 && dk < 6e-2 && dv < 6e-2,
                "{d:?}: dq {dq}, dk {dk}, dv {dv}"
            );
        }
    }

    #[test]
    fn cached_attention_equals_masked_softmax_over_the_whole_cache() {
        let dev = Device::Cpu;
        // Grouped heads, a cache holding earlier positions, read through a narrowed view of a
        // larger buffer (as the KV cache hands it over), and a batch of 2; a short call (one
        // block of queries) and a long one (blocks of 16 query rows, the last one partial).
        for (l, off) in [(5, 7), (70, 3)] {
            let (b, nh, nkv, hd) = (2, 6, 2, 8);
            let t = off + l;
            let q = Tensor::randn(0f32, 1.0, (b, nh, l, hd), &dev).unwrap();
            let kbuf = Tensor::randn(0f32, 1.0, (b, nkv, t + 8, hd), &dev).unwrap();
            let vbuf = Tensor::randn(0f32, 1.0, (b, nkv, t + 8, hd), &dev).unwrap();
            let (k, v) = (kbuf.narrow(2, 0, t).unwrap(), vbuf.narrow(2, 0, t).unwrap());
            assert!(!k.is_contiguous());
            // Without a window, and with a sliding window of 4 keys (shorter than the cache).
            for window in [None, Some(4)] {
                let got = cached_attention(&q, &k, &v, 0.35, window).unwrap();
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
                            for j in 0..t {
                                let too_old = window.is_some_and(|w| j + w <= off + i);
                                if j > off + i || too_old {
                                    m[i * t + j] = f32::NEG_INFINITY;
                                }
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
                        assert!(
                            diff < 1e-5,
                            "l {l} window {window:?} batch {bi} head {h}: {diff}"
                        );
                    }
                }
            }
            // Shapes that do not fit are an error, not a panic.
            let bad = Tensor::zeros((b, nkv, l - 1, hd), candle_core::DType::F32, &dev).unwrap();
            assert!(cached_attention(&q, &bad, &bad, 1.0, None).is_err());
            assert!(cached_attention(&q, &k, &v, 1.0, Some(0)).is_err());
        }
    }

    fn naive_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        window: Option<usize>,
    ) -> Tensor {
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
            for j in 0..l {
                if j > i || window.is_some_and(|w| j + w <= i) {
                    m[i * l + j] = f32::NEG_INFINITY;
                }
            }
        }
        let m = Tensor::from_vec(m, (l, l), &Device::Cpu).unwrap();
        let s = s.broadcast_add(&m).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v).unwrap()
    }

    #[test]
    fn attention_matches_naive_forward_and_backward() {
        // One block, and three causal blocks with a short last one; with sliding windows
        // shorter than a block and spanning blocks.
        for dims in [(2, 6, 2, 13, 8), (1, 4, 2, 150, 8)] {
            for window in [None, Some(5), Some(70)] {
                attention_case(dims, window);
            }
        }
    }

    fn attention_case(
        (b, nh, nkv, l, hd): (usize, usize, usize, usize, usize),
        window: Option<usize>,
    ) {
        let dev = Device::Cpu;
        let q = Var::randn(0f32, 1., (b, l, nh, hd), &dev).unwrap();
        let k = Var::randn(0f32, 1., (b, l, nkv, hd), &dev).unwrap();
        let v = Var::randn(0f32, 1., (b, l, nkv, hd), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (b, l, nh, hd), &dev).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let fast = attention(&q, &k, &v, scale as f32, window).unwrap();
        let t = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        let slow = t(&naive_attention(&t(&q), &t(&k), &t(&v), scale, window));
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
        let heads =
            attention_heads(&q3, &flat(&k), &flat(&v), nh, nkv, scale as f32, window).unwrap();
        let four = attention(&q4, &k, &v, scale as f32, window).unwrap();
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
        assert!(attention_heads(&q3, &flat(&k), &flat(&v), 5, nkv, 1.0, None).is_err());
    }
}
