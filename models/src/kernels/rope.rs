//! Rotary position embedding (Hugging Face's rotate-half form), differentiable, and the in-place
//! rotation the fused layer shares. Partial rotary (Phi-4-mini) rotates the first `rd` of each
//! head's `hd` dimensions and passes the rest through.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::profile::prof;
use super::{borrow_f32, f32_slice, tensor_vec, CResult};

/// candle's rotary embedding of one head at one position (`candle_nn::rotary_emb::rope`, the
/// non-interleaved form), in place.
pub(crate) fn rope_head(v: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = v.len() / 2;
    let (a, b) = v.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x1 * sin[i] + x2 * cos[i];
    }
}

/// Rotary position embedding (Hugging Face's rotate-half form) on `x` `[b, seq, heads, hd]`;
/// `cos`/`sin` are `[seq, hd / 2]`. Differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let (_, half) = cos.dims2()?;
    rope_partial(x, cos, sin, half * 2)
}

/// [`rope`] for heads of `hd` dimensions of which the first `2 * cos.dim(1)` rotate (partial
/// rotary); `x` `[b, seq, ...]` holds whole heads in each position's row.
pub fn rope_partial(x: &Tensor, cos: &Tensor, sin: &Tensor, hd: usize) -> CResult<Tensor> {
    let (l, half) = cos.dims2()?;
    let dims = x.dims();
    let rd = half * 2;
    let row: usize = dims.get(2..).map_or(0, |d| d.iter().product());
    if dims.len() < 3
        || dims[1] != l
        || sin.dims() != cos.dims()
        || hd == 0
        || rd == 0
        || rd > hd
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
        rd,
    })
}

/// Rotates, in place, the first `rd` values of every head (`hd` values) of `x`'s position rows
/// (`row` values each, sequences of `l` positions) by its position's angle from `cos`/`sin`
/// `[l, rd / 2]`; `sign` -1 applies the inverse rotation, which is the backward pass (the
/// rotation's transpose).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_in_place(
    x: &mut [f32],
    row: usize,
    l: usize,
    hd: usize,
    rd: usize,
    cos: &[f32],
    sin: &[f32],
    sign: f32,
) {
    let _pg = super::profile::prof("rope");
    let half = rd / 2;
    if row == 0 || half == 0 {
        return;
    }
    super::pool::chunks_mut(x, row, |r, xr| {
        let pos = r % l;
        let (c, s) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for xh in xr.chunks_mut(hd) {
            let (x1, x2) = xh[..rd].split_at_mut(half);
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
    /// Positions per sequence, the head size and the rotated dims per head.
    l: usize,
    hd: usize,
    rd: usize,
}

impl Rope {
    /// Rotates every head of `x` (`[b, l, ...]`, heads of `hd` in each position's row) by the
    /// position's angle (`sign` -1 inverts it, which is the backward pass: the rotation's
    /// transpose).
    fn apply(&self, x: &[f32], row: usize, sign: f32) -> Vec<f32> {
        let mut out = x.to_vec();
        rope_in_place(
            &mut out, row, self.l, self.hd, self.rd, &self.cos, &self.sin, sign,
        );
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kernels::max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn rope_matches_candle() {
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
        // Partial rotary: the first 4 of 8 dims rotate (with a [l, 2] table), the rest pass.
        let (c2, s2) = (cos.narrow(1, 0, 2).unwrap(), sin.narrow(1, 0, 2).unwrap());
        let part = rope_partial(&x, &c2, &s2, hd).unwrap();
        let head = x
            .narrow(3, 0, 4)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let rot = candle_nn::rotary_emb::rope_slow(&head, &c2, &s2)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let want = Tensor::cat(&[&rot, &x.narrow(3, 4, 4).unwrap()], 3).unwrap();
        assert!(max_diff(&part, &want) < 1e-5);
        let gp = (part * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gw = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gp.get(&x).unwrap(), gw.get(&x).unwrap()) < 1e-5);
        assert!(rope_partial(&x, &cos, &sin, 6).is_err());
    }
}
