//! The loss: per-row cross-entropy on logits ([`cross_entropy`]), and the LM head and
//! cross-entropy in one op ([`lm_head_nll`]) that keeps its `[n, vocab]` logits and turns them into
//! their own gradient in place.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::amx::{self, PackedB, PackedWeight, RowsBf16};
use super::gemm::product;
use super::int8::{I8Rows, I8Weight};
use super::linear::{Act, Frozen};
use super::profile::prof;
use super::{borrow_f32, f32_slice, tensor_vec, threads, CResult};

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
    let m = super::simd::max(row);
    m + super::simd::exp_sum(row, m).ln()
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
                super::simd::exp_into(row, lse, gr, d);
                d[t as usize] -= gr;
            });
        Ok(Some(Tensor::from_vec(dx, (n, v), logits.device())?))
    }
}

// ---------------------------------------------------------------------------------------------
// LM head and cross-entropy in one op
// ---------------------------------------------------------------------------------------------

/// The LM head's inputs agree: `n` rows of `hid` features, a `[vocab, w_hid]` weight, one
/// target id inside the vocabulary per row.
fn check_head(n: usize, hid: usize, vocab: usize, w_hid: usize, targets: &[u32]) -> CResult<()> {
    if hid != w_hid {
        candle_core::bail!("lm head: hidden states have {hid} features, the weight {w_hid}")
    }
    if n != targets.len() {
        candle_core::bail!("lm head: {n} rows but {} targets", targets.len())
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("lm head: target id {t} outside the vocabulary of {vocab}")
    }
    Ok(())
}

/// Per-row negative log-likelihood of `targets` under the logits `h W^T`: `h` `[n, hidden]`,
/// `w` `[vocab, hidden]`; returns `[n]`. Differentiable in `h` and, when it is a variable, in
/// `w`. The `[n, vocab]` logits never become a tensor of the graph: the op keeps them from the
/// forward pass and turns them into their own gradient in place in the backward pass, so no
/// second `[n, vocab]` buffer (nor autograd's zero-filled accumulator for it) is ever allocated.
/// `products` says whether the products run in f32, in bf16 on the matrix units or in int8 (see
/// [`HeadProducts`]).
pub fn lm_head_nll(
    h: &Tensor,
    w: &Tensor,
    products: HeadProducts,
    targets: &[u32],
) -> CResult<Tensor> {
    let (n, hid) = h.dims2()?;
    let (vocab, w_hid) = w.dims2()?;
    check_head(n, hid, vocab, w_hid, targets)?;
    let w = w.contiguous()?;
    let mut int8 = None;
    let (packed, bf16_dw) = match products {
        HeadProducts::Off => (None, false),
        HeadProducts::Int8PerCall => {
            if !super::int8::available() {
                candle_core::bail!("lm head: int8 products need AVX-512 VNNI")
            }
            borrow_f32!(wv = w, "lm head weight");
            int8 = Some(I8Weight::new(wv, vocab, hid, (hid, 1)));
            (None, false)
        }
        HeadProducts::Frozen(p) => {
            if (p.out_dim(), p.in_dim()) != (vocab, hid) {
                candle_core::bail!(
                    "lm head: packed weight [{}, {}] differs from [{vocab}, {hid}]",
                    p.out_dim(),
                    p.in_dim()
                )
            }
            (Some(p.clone()), false)
        }
        HeadProducts::PerCall => {
            borrow_f32!(wv = w, "lm head weight");
            (
                Some(Arc::new(PackedWeight::new_both(wv, vocab, hid))),
                w.track_op(),
            )
        }
    };
    h.contiguous()?.apply_op2(
        &w,
        LmHeadNll {
            targets: targets.to_vec(),
            packed,
            bf16_dw,
            int8,
            recycle: matches!(products, HeadProducts::Frozen(_)) && !w.track_op(),
            kept: Mutex::new(None),
        },
    )
}

/// How the LM head's products run: f32, bf16 on the matrix units, or int8 on AVX-512 VNNI
/// (each accumulated in f32).
#[derive(Clone, Copy, Debug)]
pub enum HeadProducts<'a> {
    /// f32 products.
    Off,
    /// On this bf16 copy of the (frozen) weight.
    Frozen(&'a Arc<PackedWeight>),
    /// On a bf16 copy made from the f32 weight for this call (a trained head: its gradient is
    /// computed in bf16 too and stays f32).
    PerCall,
    /// In int8 on AVX-512 VNNI (no AMX), on i8 copies of the f32 weight made for this call (a
    /// trained head: its gradient is an int8 product too, and stays f32).
    Int8PerCall,
}

struct LmHeadNll {
    targets: Vec<u32>,
    /// The weight in bf16, when the products run on the matrix units.
    packed: Option<Arc<PackedWeight>>,
    /// The weight is trained (its f32 master copy packed per call): the weight gradient runs on
    /// the matrix units too, and the logits add the weight's bf16 rounding residual, as the
    /// fused layer's products do (`P::residual_add` in `super::block`).
    bf16_dw: bool,
    /// The weight in i8 for the logits, when the products run in int8
    /// ([`HeadProducts::Int8PerCall`]); the input gradient's transposed copy is made in the
    /// backward pass (so an evaluation never makes it).
    int8: Option<I8Weight>,
    /// A frozen head on its packed bf16 copy (LoRA and prompt tuning on a dense base, where the
    /// step's peak is the head's): its backward pass hands the logits and their bf16 gradient,
    /// made afresh every step, to [`super::scratch`] for the next step's. (A forward pass alone,
    /// an evaluation, frees them.) A trained head's step holds the optimizer's state at its
    /// peak, which kept buffers would only raise: full fine-tuning peaked 380 MB higher with
    /// them, at the same speed. Nor does [`lm_head_nll_frozen`], the compact bases' head: their
    /// peak comes in the layers' backward pass, after the head's, and LoRA on the GGUF blocks
    /// peaked 1077 MiB with them against its 1008 MiB estimate.
    recycle: bool,
    /// The logits `[n, vocab]` and each row's log-sum-exp, from the forward pass.
    kept: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl LmHeadNll {
    /// Logits `h W^T` and the log-sum-exp of every row.
    fn logits(&self, h: &[f32], w: &[f32], n: usize, hid: usize) -> (Vec<f32>, Vec<f32>) {
        let logits = match (&self.packed, &self.int8) {
            (_, Some(q)) => q.forward_new(&I8Rows::new(h, n, hid)),
            (Some(p), _) => {
                let x = RowsBf16::from_f32(h, n, hid);
                let mut logits = p.forward_new(&x);
                if self.bf16_dw {
                    // Packed from the master copy for this product and dropped.
                    let r = PackedB::from_rows_residual(w, p.out_dim(), hid);
                    amx::matmul(&x, &r, &mut logits, p.out_dim(), true);
                }
                logits
            }
            (None, None) => product(
                n,
                w.len() / hid.max(1),
                hid,
                h,
                (hid, 1),
                w,
                (1, hid),
                Parallelism::Rayon(threads()),
            ),
        };
        let lse = rows_lse(&logits, n);
        (logits, lse)
    }
}

/// The log-sum-exp of each of the `n` rows of `logits`.
fn rows_lse(logits: &[f32], n: usize) -> Vec<f32> {
    let vocab = logits.len() / n.max(1);
    let mut lse = vec![0f32; n];
    if vocab > 0 {
        super::pool::chunks_mut(&mut lse, 1, |i, o| {
            o[0] = row_lse(&logits[i * vocab..(i + 1) * vocab])
        });
    }
    lse
}

/// Each row's NLL of its target, from its logits and log-sum-exp.
fn rows_nll(logits: &[f32], lse: &[f32], targets: &[u32], vocab: usize) -> Vec<f32> {
    lse.iter()
        .zip(logits.chunks(vocab.max(1)))
        .zip(targets)
        .map(|((&lse, row), &t)| lse - row[t as usize])
        .collect()
}

/// d logits = (softmax - onehot(target)) * grad, in place over the logits.
fn logits_to_grad(d: &mut [f32], g: &[f32], targets: &[u32], lse: &[f32], vocab: usize) {
    super::pool::chunks_mut(d, vocab.max(1), |i, row| {
        let (gr, t) = (g[i], targets[i]);
        super::simd::exp_in_place(row, lse[i], gr);
        row[t as usize] -= gr;
    });
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
        let out = rows_nll(&logits, &lse, &self.targets, vocab);
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
        logits_to_grad(&mut d, &g, &self.targets, &lse, vocab);
        let par = Parallelism::Rayon(threads());
        let dh = match (&self.packed, &self.int8) {
            (_, Some(_)) => {
                I8Weight::new(wv, hid, vocab, (1, hid)).forward_new(&I8Rows::new(&d, n, vocab))
            }
            (Some(p), _) => {
                let a = RowsBf16::from_f32(&d, n, vocab);
                let dh = p.input_grad_new(&a);
                if self.recycle {
                    a.recycle();
                }
                dh
            }
            (None, None) => product(n, hid, vocab, &d, (vocab, 1), wv, (hid, 1), par),
        };
        let dw = if w.track_op() {
            let dw = if self.bf16_dw {
                let a = RowsBf16::from_f32_transposed(&d, n, vocab);
                amx::product(&a, &PackedB::from_cols(hv, n, hid))
            } else if self.int8.is_some() {
                super::int8::weight_grad(&d, &I8Weight::of_columns(hv, n, hid), n, vocab)
            } else {
                product(vocab, hid, n, &d, (1, vocab), hv, (hid, 1), par)
            };
            Some(Tensor::from_vec(dw, (vocab, hid), w.device())?)
        } else {
            None
        };
        if self.recycle {
            super::scratch::F32.give(d);
        }
        Ok((Some(Tensor::from_vec(dh, (n, hid), h.device())?), dw))
    }
}

/// As [`lm_head_nll`] for a frozen head in any [`Frozen`] form (a packed bf16 copy, or a
/// compact quantized or bf16 base expanded panel by panel): differentiable in `h` only, and no
/// f32 copy of the head is needed.
pub fn lm_head_nll_frozen(h: &Tensor, w: &Frozen, targets: &[u32]) -> CResult<Tensor> {
    let (n, hid) = h.dims2()?;
    let (vocab, w_hid) = w.dims()?;
    check_head(n, hid, vocab, w_hid, targets)?;
    h.contiguous()?.apply_op1(LmHeadNllFrozen {
        w: w.owned()?,
        targets: targets.to_vec(),
        kept: Mutex::new(None),
    })
}

struct LmHeadNllFrozen {
    w: Frozen,
    targets: Vec<u32>,
    /// The logits `[n, vocab]` and each row's log-sum-exp, from the forward pass.
    kept: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl LmHeadNllFrozen {
    fn logits(&self, h: &[f32], n: usize, hid: usize) -> CResult<(Vec<f32>, Vec<f32>)> {
        let (vocab, _) = self.w.dims()?;
        let par = Parallelism::Rayon(threads());
        let logits = self
            .w
            .with_ref(|w| Ok(w.forward_new(&Act::new(h, n, hid), vocab, par)))?;
        let lse = rows_lse(&logits, n);
        Ok((logits, lse))
    }
}

impl CustomOp1 for LmHeadNllFrozen {
    fn name(&self) -> &'static str {
        "attune-lm-head-nll-frozen"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let _pg = prof("LmHeadNllFrozen.cpu_fwd");
        let h = f32_slice(s, l, "lm head hidden states")?;
        let (n, hid) = l.shape().dims2()?;
        let (vocab, _) = self.w.dims()?;
        let (logits, lse) = self.logits(h, n, hid)?;
        let out = rows_nll(&logits, &lse, &self.targets, vocab);
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some((logits, lse));
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let _pg = prof("LmHeadNllFrozen.bwd");
        let (n, hid) = h.dims2()?;
        let (vocab, _) = self.w.dims()?;
        let g = tensor_vec(grad)?;
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (mut d, lse) = match kept {
            Some(k) => k,
            None => {
                borrow_f32!(hv = h, "lm head hidden states");
                self.logits(hv, n, hid)?
            }
        };
        logits_to_grad(&mut d, &g, &self.targets, &lse, vocab);
        let par = Parallelism::Rayon(threads());
        let mut dh = None;
        self.w.with_ref(|w| {
            w.input_grad(&Act::new(&d, n, vocab), hid, &mut dh, par);
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(
            dh.unwrap_or_default(),
            (n, hid),
            h.device(),
        )?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kernels::max_diff;
    use candle_core::{Device, Var, D};

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
        let a = lm_head_nll(&h, &w, HeadProducts::Off, &t).unwrap();
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
        let frozen = lm_head_nll(&h, w.as_tensor(), HeadProducts::Off, &t).unwrap();
        let w_plain = w.as_tensor().detach();
        let g = lm_head_nll(&h, &w_plain, HeadProducts::Off, &t)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&w_plain).is_none() && g.get(&h).is_some());
        assert!(max_diff(&frozen, &a) < 1e-6);
        assert!(lm_head_nll(&h, &w, HeadProducts::Off, &[37, 0, 0, 0, 0]).is_err());
        assert!(lm_head_nll(&h, &w, HeadProducts::Off, &[0, 0]).is_err());
    }

    /// The frozen-head op on an f32 weight and on a compact bf16 copy gives the f32 op's NLL and
    /// input gradient (the bf16 copy within bf16's rounding).
    #[test]
    fn lm_head_nll_frozen_matches_the_f32_op() {
        use crate::kernels::stream::{Bf16Matrix, Streamed};
        let dev = Device::Cpu;
        let h = Var::randn(0f32, 1., (7, 64), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.5, (300, 64), &dev).unwrap();
        let t = [0u32, 299, 17, 17, 4, 256, 100];
        let want = lm_head_nll(&h, &w, HeadProducts::Off, &t).unwrap();
        let gw = want.sum_all().unwrap().backward().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let compact =
            Frozen::Streamed(Arc::new(Streamed::Bf16(Bf16Matrix::from_f32(&wv, 300, 64))));
        for (form, tol) in [(Frozen::F32(w.clone()), 1e-5), (compact, 0.1)] {
            let got = lm_head_nll_frozen(&h, &form, &t).unwrap();
            assert!(max_diff(&got, &want) < tol, "nll {}", max_diff(&got, &want));
            let g = got.sum_all().unwrap().backward().unwrap();
            let d = max_diff(g.get(&h).unwrap(), gw.get(&h).unwrap());
            assert!(d < tol, "dh {d}");
        }
        let f = Frozen::F32(w);
        assert!(lm_head_nll_frozen(&h, &f, &[300, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(lm_head_nll_frozen(&h, &f, &[0, 0]).is_err());
    }
}
