//! What one core's vector units multiply per second: AVX-512 f32 FMA (`vfmadd231ps`) against
//! AVX512-BF16's dot product (`vdpbf16ps`) and AVX-512 VNNI's int8 dot product (`vpdpbusd`, the
//! int8 prompt products of `kernels::int8`), each as 12 independent chains (throughput, not
//! latency), and whether the CPU offers AMX tiles (`kernels::amx::cpu_has_amx_bf16`).
//!
//! Why it exists: the bf16 products (`kernels::amx`) run on AMX tiles only; without them the
//! model takes the f32 GEMMs. A bf16 GEMM on `vdpbf16ps` pays only where that instruction
//! outruns f32 FMA in flops (it does twice the flops per instruction). On the Xeon (Emerald
//! Rapids, AMX hidden by its VM) this bench was first run on, it did not: 86 against 188
//! GFLOP/s per core; `vpdpbusd` did 740 int8 GOP/s (3.9x).
//! Run: `cargo bench -p attune-models --bench isa`.

use std::time::Instant;

/// Independent accumulator chains (registers, not memory: each is its own local).
const CHAINS: usize = 12;
const ITERS: usize = 100_000_000;

/// Runs `ITERS` rounds of `step` on 12 accumulators held in separate locals (an array of them
/// stayed in memory, bounding the loop by store forwarding instead of the instruction), and
/// returns the seconds taken and the accumulators' sum.
macro_rules! chains {
    ($zero:expr, $step:expr, $sum:expr) => {{
        let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) =
            ($zero, $zero, $zero, $zero, $zero, $zero);
        let (mut a6, mut a7, mut a8, mut a9, mut a10, mut a11) =
            ($zero, $zero, $zero, $zero, $zero, $zero);
        let t = Instant::now();
        for _ in 0..ITERS {
            a0 = $step(a0);
            a1 = $step(a1);
            a2 = $step(a2);
            a3 = $step(a3);
            a4 = $step(a4);
            a5 = $step(a5);
            a6 = $step(a6);
            a7 = $step(a7);
            a8 = $step(a8);
            a9 = $step(a9);
            a10 = $step(a10);
            a11 = $step(a11);
        }
        let s = t.elapsed().as_secs_f64();
        let sum: f32 = [a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11]
            .iter()
            .map(|a| $sum(*a))
            .sum();
        (s, sum)
    }};
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_rate() -> (f64, f32) {
    use std::arch::x86_64::*;
    let (x, y) = (_mm512_set1_ps(1.0), _mm512_set1_ps(1e-9));
    let (s, sum) = chains!(_mm512_setzero_ps(), |a| _mm512_fmadd_ps(a, x, y), |a| {
        _mm512_reduce_add_ps(a)
    });
    ((CHAINS * ITERS * 32) as f64 / s / 1e9, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dpbf16_rate() -> (f64, f32) {
    use std::arch::x86_64::*;
    // bf16 pairs (1.0, 0.0).
    // SAFETY: both types are 64 bytes of plain data.
    let x: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x0000_3f80)) };
    let (s, sum) = chains!(_mm512_setzero_ps(), |a| _mm512_dpbf16_ps(a, x, x), |a| {
        _mm512_reduce_add_ps(a)
    });
    ((CHAINS * ITERS * 64) as f64 / s / 1e9, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpbusd_rate() -> (f64, f32) {
    use std::arch::x86_64::*;
    let (u, i) = (_mm512_set1_epi8(1), _mm512_set1_epi8(-1));
    let (s, sum) = chains!(
        _mm512_setzero_si512(),
        |a| _mm512_dpbusd_epi32(a, u, i),
        |a| { _mm512_reduce_add_epi32(a) as f32 }
    );
    ((CHAINS * ITERS * 128) as f64 / s / 1e9, sum)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        println!(
            "AMX tiles: {}",
            if attune_models::kernels::amx::cpu_has_amx_bf16() {
                "yes (bf16 products on the tiles)"
            } else {
                "no (f32 GEMMs)"
            }
        );
        if !is_x86_feature_detected!("avx512f") {
            println!("no AVX-512: nothing to compare");
            return;
        }
        // SAFETY: AVX512F checked above.
        let runs: Vec<(f64, f32)> = (0..3).map(|_| unsafe { fma_rate() }).collect();
        std::hint::black_box(runs.iter().map(|r| r.1).sum::<f32>());
        let fma = median(runs.iter().map(|r| r.0).collect());
        println!("f32 FMA (vfmadd231ps zmm): {fma:.1} GFLOP/s per core (median of 3)");
        if is_x86_feature_detected!("avx512bf16") {
            // SAFETY: AVX512F and AVX512-BF16 checked.
            let runs: Vec<(f64, f32)> = (0..3).map(|_| unsafe { dpbf16_rate() }).collect();
            std::hint::black_box(runs.iter().map(|r| r.1).sum::<f32>());
            let bf = median(runs.iter().map(|r| r.0).collect());
            println!(
                "bf16 dot product (vdpbf16ps zmm): {bf:.1} GFLOP/s per core (median of 3), {:.2}x f32 FMA",
                bf / fma
            );
        } else {
            println!("no AVX512-BF16");
        }
        if is_x86_feature_detected!("avx512vnni") {
            // SAFETY: AVX512F and AVX512-VNNI checked.
            let runs: Vec<(f64, f32)> = (0..3).map(|_| unsafe { dpbusd_rate() }).collect();
            std::hint::black_box(runs.iter().map(|r| r.1).sum::<f32>());
            let q = median(runs.iter().map(|r| r.0).collect());
            println!(
                "int8 dot product (vpdpbusd zmm): {q:.1} GOP/s per core (median of 3), {:.2}x f32 FMA",
                q / fma
            );
        } else {
            println!("no AVX512-VNNI");
        }
    }
}
