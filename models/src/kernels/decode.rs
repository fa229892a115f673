//! Ops sized for decoding, where a call multiplies a handful of rows and per-op dispatch costs
//! more than the arithmetic: a LoRA branch added in one op ([`lora_add`]). (The quantized
//! decode matmul is in [`super::quant`].)

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::profile::prof;
use super::{borrow_f32, f32_slice, CResult};

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

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
}
