//! Products on a frozen weight held compactly: in its GGUF blocks ([`Q41Matrix`]) or as bf16
//! values, expanded one panel at a time inside the product, so no f32 (or packed) copy of the
//! whole weight ever exists. This is how LoRA and prompt tuning train on a quantized or bf16 base
//! ([`crate::linear::BaseForm`]).
//!
//! The forward product `x W^T` walks the weight's rows (the output columns) in panels of
//! [`PANEL`]; the input gradient `dy W` walks its columns in panels of whole blocks. Each panel
//! is expanded to f32 (rows in parallel), then multiplied on the matrix units (packed as bf16,
//! accumulated in f32) where the CPU has them, else with the f32 GEMM. Expanding a panel costs
//! one pass over its weights; the product on it costs `rows` passes, so for training-sized
//! inputs (hundreds of rows) the expansion is a small share of the time.

use std::sync::Arc;

use gemm::Parallelism;
use rayon::prelude::*;

use super::amx::{self, PackedB, RowsBf16};
use super::gemm::matmul;
use super::profile::prof;
use super::quant::Q41Matrix;

/// Output rows (forward) or input columns (input gradient) expanded at a time: a multiple of the
/// matrix units' 32-column pairs and of every block length.
pub const PANEL: usize = 256;

/// A frozen `[out, in]` weight kept compact.
#[derive(Debug)]
pub enum Streamed {
    /// The GGUF blocks (Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), as the decode kernel holds them.
    Quant(Arc<Q41Matrix>),
    /// bf16 values, row-major `[out, in]`.
    Bf16(Bf16Matrix),
}

/// A row-major `[out, in]` matrix of bf16 values.
#[derive(Debug)]
pub struct Bf16Matrix {
    w: Vec<u16>,
    out: usize,
    inp: usize,
}

impl Bf16Matrix {
    /// `w` `[out, in]` rounded to bf16 (to nearest even), in parallel.
    pub fn from_f32(w: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(
            w.len(),
            out * inp,
            "Bf16Matrix: {} values for [{out}, {inp}]",
            w.len()
        );
        let mut v = vec![0u16; w.len()];
        v.par_chunks_mut(4096)
            .zip(w.par_chunks(4096))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = amx::to_bf16(s)));
        Self { w: v, out, inp }
    }
}

impl Streamed {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Streamed::Quant(q) => q.dims(),
            Streamed::Bf16(b) => (b.out, b.inp),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Streamed::Quant(q) => q.bytes(),
            Streamed::Bf16(b) => 2 * b.w.len(),
        }
    }

    /// Column panels of the input gradient start on multiples of this.
    fn col_align(&self) -> usize {
        match self {
            Streamed::Quant(q) => q.block_len(),
            Streamed::Bf16(_) => 1,
        }
    }

    /// Rows `r0..r1` as f32 `[r1 - r0, in]`.
    fn rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) {
        match self {
            Streamed::Quant(q) => q.rows_f32(r0, r1, out),
            Streamed::Bf16(b) => {
                let src = &b.w[r0 * b.inp..r1 * b.inp];
                out[..src.len()]
                    .par_chunks_mut(4096)
                    .zip(src.par_chunks(4096))
                    .for_each(|(d, s)| {
                        d.iter_mut()
                            .zip(s)
                            .for_each(|(d, &s)| *d = amx::from_bf16(s))
                    });
            }
        }
    }

    /// Columns `c0..c1` of every row as f32 `[out, c1 - c0]`.
    fn cols_f32(&self, c0: usize, c1: usize, out: &mut [f32]) {
        match self {
            Streamed::Quant(q) => q.cols_f32(c0, c1, out),
            Streamed::Bf16(b) => {
                let w = c1 - c0;
                out[..b.out * w]
                    .par_chunks_mut(w.max(1))
                    .enumerate()
                    .for_each(|(r, d)| {
                        let s = &b.w[r * b.inp + c0..r * b.inp + c1];
                        d.iter_mut()
                            .zip(s)
                            .for_each(|(d, &s)| *d = amx::from_bf16(s));
                    });
            }
        }
    }

    /// The whole weight as f32 `[out, in]` (exports, and leaving the compact form).
    pub fn to_f32(&self) -> Vec<f32> {
        let (out, inp) = self.dims();
        let mut w = vec![0f32; out * inp];
        self.rows_f32(0, out, &mut w);
        w
    }

    /// `dst[rows, out] (+)= x W^T` for `x` `[rows, in]` (f32, and its bf16 tiles when the
    /// matrix units run the products: `xb`, made by the caller once per input).
    pub fn forward(
        &self,
        x: &[f32],
        xb: Option<&RowsBf16>,
        rows: usize,
        dst: &mut [f32],
        accumulate: bool,
    ) {
        let _pg = prof("stream.forward");
        let (dout, din) = self.dims();
        if rows == 0 || dout == 0 {
            return;
        }
        let mut panel = vec![0f32; PANEL.min(dout) * din];
        for r0 in (0..dout).step_by(PANEL) {
            let r1 = (r0 + PANEL).min(dout);
            let buf = &mut panel[..(r1 - r0) * din];
            {
                let _pg = prof("stream.expand_rows");
                self.rows_f32(r0, r1, buf);
            }
            let out = &mut dst[r0..];
            match xb {
                Some(xb) => {
                    let b = {
                        let _pg = prof("stream.pack_rows");
                        PackedB::from_rows(buf, r1 - r0, din)
                    };
                    amx::matmul(xb, &b, out, dout, accumulate);
                }
                None => matmul(
                    rows,
                    r1 - r0,
                    din,
                    out,
                    (dout, 1),
                    accumulate,
                    x,
                    (din, 1),
                    buf,
                    (1, din),
                    Parallelism::Rayon(super::threads()),
                ),
            }
        }
    }

    /// `dx[rows, in] (+)= dy W` for `dy` `[rows, out]` (and its bf16 tiles, as in
    /// [`Self::forward`]).
    pub fn input_grad(
        &self,
        dy: &[f32],
        dyb: Option<&RowsBf16>,
        rows: usize,
        dx: &mut [f32],
        accumulate: bool,
    ) {
        let _pg = prof("stream.input_grad");
        let (dout, din) = self.dims();
        if rows == 0 || din == 0 {
            return;
        }
        let step = PANEL.div_ceil(self.col_align()) * self.col_align();
        let mut panel = vec![0f32; dout * step.min(din)];
        for c0 in (0..din).step_by(step) {
            let c1 = (c0 + step).min(din);
            let w = c1 - c0;
            let buf = &mut panel[..dout * w];
            {
                let _pg = prof("stream.expand_cols");
                self.cols_f32(c0, c1, buf);
            }
            let out = &mut dx[c0..];
            match dyb {
                Some(dyb) => {
                    let b = {
                        let _pg = prof("stream.pack_cols");
                        PackedB::from_cols(buf, dout, w)
                    };
                    amx::matmul(dyb, &b, out, din, accumulate);
                }
                None => matmul(
                    rows,
                    w,
                    dout,
                    out,
                    (din, 1),
                    accumulate,
                    dy,
                    (dout, 1),
                    buf,
                    (w, 1),
                    Parallelism::Rayon(super::threads()),
                ),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use crate::kernels::test_values as values;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, bt: bool) -> Vec<f32> {
        // a [m, k]; b [n, k] when bt (a b^T), else [k, n].
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    let bv = if bt { b[j * k + kk] } else { b[kk * n + j] };
                    s += a[i * k + kk] as f64 * bv as f64;
                }
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Each block type expands to candle's dequantized values exactly, and the panel products
    /// (forward and input gradient, with and without accumulation, on the matrix units where the
    /// CPU has them and with the f32 GEMM) equal the products on the dequantized weight. The
    /// shapes cross panel edges (out 300 = 256 + 44, in 512 = two K-quant blocks).
    #[test]
    fn panels_equal_the_dequantized_products() {
        let (out, inp, rows) = (300usize, 512usize, 37usize);
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(out * inp, 1), (out, inp), &dev).unwrap();
        let x = values(rows * inp, 2);
        let dy = values(rows * out, 3);
        for dt in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let dense = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = Arc::new(Q41Matrix::from_qtensor(&q).unwrap().unwrap());
            let s = Streamed::Quant(m);
            let full = s.to_f32();
            let diff = full
                .iter()
                .zip(&dense)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(diff <= 1e-6, "{dt:?}: expanded values differ by {diff}");
            check_products(&s, &dense, &x, &dy, rows, out, inp, &format!("{dt:?}"));
        }
        // bf16: the product of the bf16-rounded weight.
        let wv = values(out * inp, 4);
        let s = Streamed::Bf16(Bf16Matrix::from_f32(&wv, out, inp));
        let rounded: Vec<f32> = wv
            .iter()
            .map(|&v| amx::from_bf16(amx::to_bf16(v)))
            .collect();
        assert_eq!(s.to_f32(), rounded);
        check_products(&s, &rounded, &x, &dy, rows, out, inp, "bf16");
    }

    #[allow(clippy::too_many_arguments)]
    fn check_products(
        s: &Streamed,
        dense: &[f32],
        x: &[f32],
        dy: &[f32],
        rows: usize,
        out: usize,
        inp: usize,
        what: &str,
    ) {
        let want_y = naive(x, dense, rows, inp, out, true);
        let want_dx = naive(dy, dense, rows, out, inp, false);
        let mut forms = vec![(None, None, 1e-5f32)];
        let bf = amx::available().then(|| {
            (
                RowsBf16::from_f32(x, rows, inp),
                RowsBf16::from_f32(dy, rows, out),
            )
        });
        if let Some((xb, dyb)) = &bf {
            // bf16 activations and weights, f32 accumulation.
            forms.push((Some(xb), Some(dyb), 2e-2));
        }
        for (xb, dyb, tol) in forms {
            let mut y = vec![0f32; rows * out];
            s.forward(x, xb, rows, &mut y, false);
            assert!(
                rel(&y, &want_y) < tol,
                "{what} forward: {}",
                rel(&y, &want_y)
            );
            s.forward(x, xb, rows, &mut y, true);
            let twice: Vec<f32> = want_y.iter().map(|v| 2.0 * v).collect();
            assert!(rel(&y, &twice) < tol, "{what} forward accumulate");
            let mut dx = vec![0f32; rows * inp];
            s.input_grad(dy, dyb, rows, &mut dx, false);
            assert!(
                rel(&dx, &want_dx) < tol,
                "{what} input grad: {}",
                rel(&dx, &want_dx)
            );
            s.input_grad(dy, dyb, rows, &mut dx, true);
            let twice: Vec<f32> = want_dx.iter().map(|v| 2.0 * v).collect();
            assert!(rel(&dx, &twice) < tol, "{what} input grad accumulate");
        }
    }
}
