//! bf16 matrix products on the CPU's matrix units (Intel AMX).
//!
//! An AMX core multiplies tiles: `tdpbf16ps` adds the product of a 16 x 32 bf16 tile `A` and a
//! 32 x 16 bf16 tile `B` (stored as 16 rows of 16 (k, k+1) pairs, "VNNI" order) to a 16 x 16 f32
//! tile `C`: 16,384 flops per instruction, about 3 TFLOP/s per core measured here (f32 FMA on
//! AVX-512: about 170 GFLOP/s). Operands: a weight that is multiplied many times is packed once
//! into `B` tiles ([`PackedB`], half the bytes of its f32 copy); activations are converted to bf16
//! per call into `A` tiles ([`RowsBf16`], round to nearest even); products accumulate in f32.
//!
//! The micro-kernel holds a 32 x 32 block of `C` in four tiles and, per 32-wide step along `k`,
//! loads two `A` and two `B` tiles for four `tdpbf16ps` (the 8 tile registers allow no more). A
//! tile load costs about as much as a `tdpbf16ps` here, so this 2 x 2 block is load-bound at about
//! 1 TFLOP/s per core; measured on the training shapes (1024 x 576 by 576 x 1536) it runs at
//! 500-700 GFLOP/s per core on this shared VM, 3-4x the f32 GEMM.
//!
//! Linux hands out the tile registers only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`, once per process; threads inherit it). [`available`] checks the CPU
//! (CPUID: AMX-TILE, AMX-BF16, AVX512-BF16 for the conversions), makes the request, and says no
//! when either fails or when `ATTUNE_MATMUL=f32` asks for the f32 path (A/B runs); callers then use
//! the f32 GEMM. AMX instructions are unstable in `std::arch`, so the kernel uses inline assembly.

use std::sync::OnceLock;

use rayon::prelude::*;

/// bf16 values along `k` in one tile row.
pub const TILE_K: usize = 32;
/// Rows of an `A` tile, columns of a `B` or `C` tile.
pub const TILE_MN: usize = 16;
/// u16 values per tile (16 rows of 64 bytes).
const TILE_LEN: usize = TILE_MN * TILE_K;

/// One 1 KB tile, cache-line aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Tile([u16; TILE_LEN]);

const ZERO_TILE: Tile = Tile([0; TILE_LEN]);

/// `n` tiles of uninitialised memory: the packers write every tile whole (`MaybeUninit::write`)
/// instead of zero-filling first.
fn uninit_tiles(n: usize) -> Vec<std::mem::MaybeUninit<Tile>> {
    let mut v = std::mem::ManuallyDrop::new(TILES.take(n));
    let (ptr, cap) = (v.as_mut_ptr(), v.capacity());
    // SAFETY: an empty Vec<Tile> with capacity >= n (`Cache::take`) becomes a Vec of
    // MaybeUninit<Tile> (the same layout) of length n, within the capacity; MaybeUninit needs
    // no initialisation.
    unsafe { Vec::from_raw_parts(ptr.cast::<std::mem::MaybeUninit<Tile>>(), n, cap) }
}

/// Freed large activation tiles ([`RowsBf16`] of the LM head's gradient), for reuse
/// ([`super::scratch`]). Packed weights are never kept: they live as long as their model.
static TILES: super::scratch::Cache<Tile> = super::scratch::Cache::new();

/// Frees the kept activation tiles.
pub(crate) fn release_scratch() {
    TILES.clear();
}

/// The tiles once every one has been written.
fn assume_init(v: Vec<std::mem::MaybeUninit<Tile>>) -> Vec<Tile> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: callers write every element (each packing loop visits every tile and writes it
    // with `MaybeUninit::write` before anything else); MaybeUninit<Tile> has Tile's layout.
    unsafe { Vec::from_raw_parts(ptr.cast::<Tile>(), len, cap) }
}

/// Whether the AMX bf16 kernels can run in this process: the CPU has AMX-TILE, AMX-BF16 and
/// AVX512-BF16, Linux granted the tile data, and `ATTUNE_MATMUL` is not `f32`. Checked once.
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !super::f32_products_forced() && detect())
}

/// What the CPU offers, without the `ATTUNE_MATMUL` override (for diagnostics).
pub fn cpu_has_amx_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID leaf 7, sub-leaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
    let max_leaf = __cpuid_count(0, 0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let amx = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
    if !amx || !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("avx512bf16") {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes this process's permission to use
    // the AMX register state; it reads no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// f32 to bf16, rounding to nearest even (NaN stays NaN).
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 to f32 (exact).
#[inline]
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Converts 32 values (fewer at a tail: the rest of `dst` is zeroed) to bf16.
#[inline]
fn convert_32(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if src.len() == TILE_K && available() {
        // SAFETY: available() checked AVX512F and AVX512-BF16; both slices hold 32 values.
        unsafe { convert_32_avx512(src, dst) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if src.len() == TILE_MN && dst.len() >= TILE_K && available() {
        // Half a row (`PackedB::from_cols` converts 16 columns at a time).
        // SAFETY: available() checked AVX512F and AVX512-BF16; `src` holds 16 values and
        // `dst` at least 32.
        unsafe { convert_16_avx512(src, dst) };
        dst[TILE_MN..TILE_K].fill(0);
        return;
    }
    for (d, s) in dst
        .iter_mut()
        .zip(src.iter().chain(std::iter::repeat(&0.0)))
    {
        *d = to_bf16(*s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_16_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 16 && dst.len() >= 16);
    // SAFETY: both slices hold at least 16 values (asserted); unaligned load and store.
    unsafe {
        let v = _mm512_loadu_ps(src.as_ptr());
        let packed: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.as_mut_ptr().cast(), packed);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_32_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 32 && dst.len() >= 32);
    // SAFETY: both slices hold at least 32 values (asserted); unaligned loads and stores.
    unsafe {
        let lo = _mm512_loadu_ps(src.as_ptr());
        let hi = _mm512_loadu_ps(src.as_ptr().add(16));
        let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().cast(), packed);
    }
}

/// One tile of `x^T` in bf16: tile row `r` (of 16) holds `x[t][r]` for `t` in `0..32`, read
/// from `x` rows `t` (`ld` values apart) at columns `0..cols`, rows `t >= rows` and columns
/// `>= cols` zero. Pairs of `x` rows convert to bf16 together and interleave into 32-bit
/// lanes (lane `r` of pair `s` holds `x[2s][r]` then `x[2s + 1][r]`, the tile's pair order);
/// a 16 x 16 transpose of those lanes makes the tile's rows.
///
/// # Safety
/// The CPU must have AVX512F/BW and AVX512-BF16; `x` must be valid for reads of `rows` rows of
/// `cols` values at stride `ld` (`rows <= 32`, `cols <= 16`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn transposed_tile_avx512(
    x: *const f32,
    ld: usize,
    rows: usize,
    cols: usize,
    out: &mut Tile,
) {
    use std::arch::x86_64::*;
    debug_assert!(rows <= TILE_K && cols <= TILE_MN);
    let mask: __mmask16 = ((1u32 << cols) - 1) as u16;
    // u16 lane 2r takes lane r (the even row), lane 2r + 1 lane 16 + r (the odd row).
    let mut order = [0u16; 32];
    for r in 0..16 {
        order[2 * r] = r as u16;
        order[2 * r + 1] = 16 + r as u16;
    }
    // SAFETY: `order` holds 32 u16 (one vector); row loads are masked to `cols` values of rows
    // below `rows` (the caller's bounds); the stores write the tile's 16 rows of 64 bytes.
    unsafe {
        let order = _mm512_loadu_si512(order.as_ptr().cast());
        let load = |t: usize| {
            if t < rows {
                _mm512_maskz_loadu_ps(mask, x.add(t * ld))
            } else {
                _mm512_setzero_ps()
            }
        };
        let mut w = [_mm512_setzero_si512(); 16];
        for (s, ws) in w.iter_mut().enumerate() {
            let bf: __m512i =
                std::mem::transmute(_mm512_cvtne2ps_pbh(load(2 * s + 1), load(2 * s)));
            *ws = _mm512_permutexvar_epi16(order, bf);
        }
        transpose_16x16_epi32(&mut w);
        for (r, wr) in w.iter().enumerate() {
            _mm512_storeu_si512(out.0.as_mut_ptr().add(r * TILE_K).cast(), *wr);
        }
    }
}

/// Transposes 16 vectors of 16 32-bit lanes in place (`w[i]` lane `j` ends in `w[j]` lane `i`):
/// 32-bit then 64-bit interleaves within 128-bit lanes, then two rounds of 128-bit shuffles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose_16x16_epi32(w: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(w[2 * i], w[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(w[2 * i], w[2 * i + 1]);
    }
    for i in 0..4 {
        let b = 4 * i;
        w[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        w[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        w[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        w[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    // w[4i + j] holds rows 4i..4i+4, column j of every 128-bit lane (columns j, 4 + j, ...).
    for i in 0..2 {
        let b = 8 * i;
        for j in 0..4 {
            t[b + j] = _mm512_shuffle_i32x4::<0x88>(w[b + j], w[b + 4 + j]);
            t[b + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(w[b + j], w[b + 4 + j]);
        }
    }
    for j in 0..8 {
        w[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[8 + j]);
        w[8 + j] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[8 + j]);
    }
}

/// `dst[i] = bf16(src[i] - bf16(src[i]))`: what rounding `src` to bf16 left out, itself in
/// bf16, zero past `src` (at most 32 values). `bf16(x) + residual` holds `x` to ~16 bits.
fn convert_residual_32(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if src.len() == TILE_K && available() {
        // SAFETY: available() checked AVX512F and AVX512-BF16; both slices hold 32 values.
        unsafe { convert_residual_32_avx512(src, dst) };
        return;
    }
    for (d, s) in dst
        .iter_mut()
        .zip(src.iter().chain(std::iter::repeat(&0.0)))
    {
        *d = to_bf16(*s - from_bf16(to_bf16(*s)));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_residual_32_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 32 && dst.len() >= 32);
    // SAFETY: both slices hold at least 32 values (asserted); unaligned loads and stores.
    unsafe {
        let lo = _mm512_loadu_ps(src.as_ptr());
        let hi = _mm512_loadu_ps(src.as_ptr().add(16));
        let rounded: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        // The rounded values back in f32 (bf16 bits in the top half of each lane).
        let widen = |half: __m256i| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        };
        let lo_r = widen(_mm512_castsi512_si256(rounded));
        let hi_r = widen(_mm512_extracti64x4_epi64::<1>(rounded));
        let rest: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
            _mm512_sub_ps(hi, hi_r),
            _mm512_sub_ps(lo, lo_r),
        ));
        _mm512_storeu_si512(dst.as_mut_ptr().cast(), rest);
    }
}

/// A weight packed as the `B` operand of `out = a · B`: `B` is `[k, n]` (contraction `k`), stored
/// as tiles of 32 (k) x 16 (n) in VNNI pair order, `n` padded to a multiple of 32 and `k` to a
/// multiple of 32 with zeros. Tile `(j, c)` (columns `16 j..`, rows `32 c..`) holds, at row `r`,
/// column `jj`, pair member `p`, the value `B[32 c + 2 r + p][16 j + jj]`.
#[derive(Clone)]
pub struct PackedB {
    tiles: Vec<Tile>,
    /// Output columns and contraction length, unpadded.
    n: usize,
    k: usize,
    /// 16-column tiles (even) and 32-deep tiles.
    nt: usize,
    kt: usize,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB {{ n: {}, k: {} }}", self.n, self.k)
    }
}

/// `len` values hold `rows` rows of `cols` values starting `rs` apart.
fn assert_strided(len: usize, rows: usize, cols: usize, rs: usize, what: &str) {
    assert!(
        rs >= cols && (rows == 0 || len >= (rows - 1) * rs + cols),
        "{what}: {len} values for {rows} rows of {cols} at stride {rs}"
    );
}

/// Fills a packed `B`'s tiles one column tile (`kt` tiles) at a time with `fill(j, tiles)`: on
/// rayon's pool (load-time packing) or on the calling thread (inside a kernel's own task).
fn fill_column_tiles(
    tiles: &mut [std::mem::MaybeUninit<Tile>],
    kt: usize,
    parallel: bool,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<Tile>]) + Sync,
) {
    if parallel {
        tiles
            .par_chunks_mut(kt.max(1))
            .enumerate()
            .for_each(|(j, col)| fill(j, col));
    } else {
        tiles
            .chunks_mut(kt.max(1))
            .enumerate()
            .for_each(|(j, col)| fill(j, col));
    }
}

impl PackedB {
    /// Packs `B[kk][nn] = get(nn, kk)` for `nn < n`, `kk < k` (bf16 values).
    fn from_fn(n: usize, k: usize, get: impl Fn(usize, usize) -> u16 + Sync) -> Self {
        let nt = n.div_ceil(2 * TILE_MN) * 2;
        let kt = k.div_ceil(TILE_K);
        let mut tiles = vec![ZERO_TILE; nt * kt];
        tiles
            .par_chunks_mut(kt.max(1))
            .enumerate()
            .for_each(|(j, col)| {
                for (c, tile) in col.iter_mut().enumerate() {
                    for jj in 0..TILE_MN {
                        let nn = j * TILE_MN + jj;
                        if nn >= n {
                            break;
                        }
                        for r in 0..TILE_K / 2 {
                            for p in 0..2 {
                                let kk = c * TILE_K + 2 * r + p;
                                if kk < k {
                                    tile.0[r * TILE_K + 2 * jj + p] = get(nn, kk);
                                }
                            }
                        }
                    }
                }
            });
        Self {
            tiles,
            n,
            k,
            nt,
            kt,
        }
    }

    /// The `B` of `x · W^T` for a weight `w` `[n, k]` (row-major; a linear layer's `[out, in]`).
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "PackedB::from_rows: {} values for [{n}, {k}]",
            w.len()
        );
        Self::rows_packed(w, n, k, k, true, false)
    }

    /// [`PackedB::from_rows`] of what rounding `w` to bf16 leaves out (`w - bf16(w)`, in bf16):
    /// `x · (bf16(w) + residual)` sees `w` to ~16 bits of mantissa, so a trained weight's small
    /// updates reach the forward product before they add up to a bf16 step.
    pub fn from_rows_residual(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "PackedB::from_rows_residual: {} values for [{n}, {k}]",
            w.len()
        );
        Self::rows_packed(w, n, k, k, true, true)
    }

    /// [`PackedB::from_rows`] on the calling thread alone (inside a kernel's own task).
    pub fn from_rows_serial(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "PackedB::from_rows: {} values for [{n}, {k}]",
            w.len()
        );
        Self::rows_packed(w, n, k, k, false, false)
    }

    /// [`PackedB::from_rows_serial`] of `n` rows of `k` values that start `rs` apart in `w` (one
    /// head of a `[seq, heads * hd]` activation).
    pub fn from_rows_strided_serial(w: &[f32], n: usize, k: usize, rs: usize) -> Self {
        assert_strided(w.len(), n, k, rs, "PackedB::from_rows_strided_serial");
        Self::rows_packed(w, n, k, rs, false, false)
    }

    fn rows_packed(
        w: &[f32],
        n: usize,
        k: usize,
        rs: usize,
        parallel: bool,
        residual: bool,
    ) -> Self {
        let convert = if residual {
            convert_residual_32
        } else {
            convert_32
        };
        let nt = n.div_ceil(2 * TILE_MN) * 2;
        let kt = k.div_ceil(TILE_K);
        let mut tiles = uninit_tiles(nt * kt);
        let fill = |j: usize, col: &mut [std::mem::MaybeUninit<Tile>]| {
            // 16 weight rows (output columns) x 32 values, converted, then transposed by
            // (k, k + 1) pairs: tile row r, column jj = rows[jj][2r..2r + 2].
            let mut rows = [[0u16; TILE_K]; TILE_MN];
            for (c, tile) in col.iter_mut().enumerate() {
                let (k0, k1) = (c * TILE_K, ((c + 1) * TILE_K).min(k));
                for (jj, row) in rows.iter_mut().enumerate() {
                    let nn = j * TILE_MN + jj;
                    if nn < n {
                        convert(&w[nn * rs + k0..nn * rs + k1], row);
                    } else {
                        *row = [0; TILE_K];
                    }
                }
                let out = tile.write(ZERO_TILE);
                for r in 0..TILE_K / 2 {
                    for (jj, row) in rows.iter().enumerate() {
                        out.0[r * TILE_K + 2 * jj] = row[2 * r];
                        out.0[r * TILE_K + 2 * jj + 1] = row[2 * r + 1];
                    }
                }
            }
        };
        fill_column_tiles(&mut tiles, kt, parallel, fill);
        Self {
            tiles: assume_init(tiles),
            n,
            k,
            nt,
            kt,
        }
    }

    /// The `B` of `dy · W` for a weight `w` `[n, k]`: contraction over `n`, `k` output columns.
    pub fn from_cols(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "PackedB::from_cols: {} values for [{n}, {k}]",
            w.len()
        );
        Self::cols_packed(w, n, k, k, true)
    }

    /// [`PackedB::from_cols`] on the calling thread alone (inside a kernel's own task).
    pub fn from_cols_serial(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "PackedB::from_cols: {} values for [{n}, {k}]",
            w.len()
        );
        Self::cols_packed(w, n, k, k, false)
    }

    /// [`PackedB::from_cols_serial`] of `n` rows of `k` values that start `rs` apart in `w`.
    pub fn from_cols_strided_serial(w: &[f32], n: usize, k: usize, rs: usize) -> Self {
        assert_strided(w.len(), n, k, rs, "PackedB::from_cols_strided_serial");
        Self::cols_packed(w, n, k, rs, false)
    }

    fn cols_packed(w: &[f32], n: usize, k: usize, rs: usize, parallel: bool) -> Self {
        // B[nn][kk] = w[nn][kk]: output columns are w's columns, contraction its rows.
        let nt = k.div_ceil(2 * TILE_MN) * 2;
        let kt = n.div_ceil(TILE_K);
        let mut tiles = uninit_tiles(nt * kt);
        let fill = |j: usize, col: &mut [std::mem::MaybeUninit<Tile>]| {
            let (c0, c1) = (j * TILE_MN, ((j + 1) * TILE_MN).min(k));
            let mut a = [0u16; TILE_K];
            let mut b = [0u16; TILE_K];
            for (c, tile) in col.iter_mut().enumerate() {
                let out = tile.write(ZERO_TILE);
                if c0 >= k {
                    continue;
                }
                for r in 0..TILE_K / 2 {
                    // Tile row r pairs w's rows 32c + 2r and 32c + 2r + 1, column by column.
                    let n0 = c * TILE_K + 2 * r;
                    for (buf, nn) in [(&mut a, n0), (&mut b, n0 + 1)] {
                        if nn < n {
                            convert_32(&w[nn * rs + c0..nn * rs + c1], buf);
                        } else {
                            *buf = [0; TILE_K];
                        }
                    }
                    for jj in 0..TILE_MN {
                        out.0[r * TILE_K + 2 * jj] = a[jj];
                        out.0[r * TILE_K + 2 * jj + 1] = b[jj];
                    }
                }
            }
        };
        fill_column_tiles(&mut tiles, kt, parallel, fill);
        Self {
            tiles: assume_init(tiles),
            n: k,
            k: n,
            nt,
            kt,
        }
    }

    /// The packing of this `B`'s transpose (`B^T` as the `B` of another product): for a weight
    /// packed by [`PackedB::from_rows`], the packing [`PackedB::from_cols`] would give, built from
    /// the bf16 values themselves.
    pub fn transposed(&self) -> Self {
        Self::from_fn(self.k, self.n, |kk, nn| self.get(nn, kk))
    }

    /// `B[kk][nn]` as bf16 bits.
    fn get(&self, nn: usize, kk: usize) -> u16 {
        let (j, jj) = (nn / TILE_MN, nn % TILE_MN);
        let (c, r, p) = (kk / TILE_K, (kk % TILE_K) / 2, kk % 2);
        self.tiles[j * self.kt + c].0[r * TILE_K + 2 * jj + p]
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Contraction length.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<Tile>()
    }

    /// The bf16 values as f32, row-major `[k, n]` (tests, and exporting a packed-only weight).
    pub fn to_f32_kn(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.k * self.n];
        for kk in 0..self.k {
            for nn in 0..self.n {
                out[kk * self.n + nn] = from_bf16(self.get(nn, kk));
            }
        }
        out
    }
}

/// Activations as the `A` operand: `m` rows of `k` values in bf16, as tiles of 16 rows x 32
/// values (1 KB each, row-major in the tile), `[m / 16][k / 32]`, `m` padded to a multiple of 32
/// and `k` to a multiple of 32 with zeros.
pub struct RowsBf16 {
    tiles: Vec<Tile>,
    m: usize,
    k: usize,
    /// 16-row tiles (even) and 32-deep tiles.
    mt: usize,
    kt: usize,
}

impl RowsBf16 {
    /// Converts `x` `[m, k]` (row-major) to bf16 tiles.
    pub fn from_f32(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(
            x.len(),
            m * k,
            "RowsBf16::from_f32: {} values for [{m}, {k}]",
            x.len()
        );
        Self::from_f32_strided(x, m, k, k)
    }

    /// Converts `m` rows of `k` values that start `rs` apart in `x` (one head of a
    /// `[seq, heads * hd]` activation, or a block of a wider score matrix).
    pub fn from_f32_strided(x: &[f32], m: usize, k: usize, rs: usize) -> Self {
        let _pg = super::profile::prof("amx.to_bf16");
        assert_strided(x.len(), m, k, rs, "RowsBf16::from_f32_strided");
        let mt = m.div_ceil(2 * TILE_MN) * 2;
        let kt = k.div_ceil(TILE_K);
        let mut tiles = uninit_tiles(mt * kt);
        super::pool::chunks_mut(&mut tiles, kt.max(1), |i, row_tiles| {
            for (c, tile) in row_tiles.iter_mut().enumerate() {
                let out = tile.write(ZERO_TILE);
                let (k0, k1) = (c * TILE_K, ((c + 1) * TILE_K).min(k));
                for r in 0..TILE_MN {
                    let row = i * TILE_MN + r;
                    if row >= m {
                        break;
                    }
                    let dst = &mut out.0[r * TILE_K..(r + 1) * TILE_K];
                    convert_32(&x[row * rs + k0..row * rs + k1], dst);
                }
            }
        });
        Self {
            tiles: assume_init(tiles),
            m,
            k,
            mt,
            kt,
        }
    }

    /// Converts the transpose of `x` `[k, m]` (row-major), i.e. `A = x^T` `[m, k]`.
    pub fn from_f32_transposed(x: &[f32], k: usize, m: usize) -> Self {
        let _pg = super::profile::prof("amx.to_bf16_t");
        assert_eq!(
            x.len(),
            m * k,
            "RowsBf16::from_f32_transposed: {} values for [{k}, {m}]",
            x.len()
        );
        let mt = m.div_ceil(2 * TILE_MN) * 2;
        let kt = k.div_ceil(TILE_K);
        let mut tiles = uninit_tiles(mt * kt);
        #[cfg(target_arch = "x86_64")]
        let vector = available() && is_x86_feature_detected!("avx512bw");
        #[cfg(not(target_arch = "x86_64"))]
        let vector = false;
        super::pool::chunks_mut(&mut tiles, kt.max(1), |i, row_tiles| {
            let (m0, m1) = (i * TILE_MN, ((i + 1) * TILE_MN).min(m));
            // 32 rows of x (k) x 16 values (m), converted, then transposed into the tile.
            let mut blk = [[0u16; TILE_K]; TILE_K];
            for (c, tile) in row_tiles.iter_mut().enumerate() {
                let out = tile.write(ZERO_TILE);
                if m0 >= m {
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if vector {
                    let k0 = c * TILE_K;
                    // SAFETY: AMX (with AVX512F/BF16) and AVX512BW checked above; rows
                    // k0..k0 + rows of x hold columns m0..m1 (x is [k, m], length asserted).
                    unsafe {
                        transposed_tile_avx512(
                            x.as_ptr().add(k0 * m + m0),
                            m,
                            (k - k0).min(TILE_K),
                            m1 - m0,
                            out,
                        )
                    };
                    continue;
                }
                for (t, b) in blk.iter_mut().enumerate() {
                    let kk = c * TILE_K + t;
                    if kk < k {
                        convert_32(&x[kk * m + m0..kk * m + m1], b);
                    } else {
                        *b = [0; TILE_K];
                    }
                }
                for r in 0..TILE_MN {
                    for (t, b) in blk.iter().enumerate() {
                        out.0[r * TILE_K + t] = b[r];
                    }
                }
            }
        });
        Self {
            tiles: assume_init(tiles),
            m,
            k,
            mt,
            kt,
        }
    }

    /// Hands a large buffer of tiles on to the next conversion of a similar size instead of
    /// freeing it ([`super::scratch`]): for activations made afresh every training step (the
    /// LM head's gradient).
    pub fn recycle(self) {
        TILES.give(self.tiles);
    }

    pub fn m(&self) -> usize {
        self.m
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// A frozen linear weight `[out, in]` in bf16, packed for the matrix units: the `B` of the
/// forward product `x W^T`, and (built on first use, from the same bf16 values) the `B` of the
/// input gradient `dy W`. Inference never builds the second, so it holds half the bytes of an f32
/// copy; training holds both, as many bytes as the f32 copy it replaces.
pub struct PackedWeight {
    fwd: PackedB,
    bwd: OnceLock<PackedB>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight [{}, {}]", self.out_dim(), self.in_dim())
    }
}

impl PackedWeight {
    /// Packs `w` `[out, in]` (row-major f32).
    pub fn new(w: &[f32], out: usize, inp: usize) -> Self {
        Self {
            fwd: PackedB::from_rows(w, out, inp),
            bwd: OnceLock::new(),
        }
    }

    /// Packs `w` `[out, in]` for both products at once (a trained weight, packed anew at every
    /// forward pass: both packings straight from f32).
    pub fn new_both(w: &[f32], out: usize, inp: usize) -> Self {
        let _pg = super::profile::prof("amx.pack");
        let (fwd, bwd) = rayon::join(
            || PackedB::from_rows(w, out, inp),
            || PackedB::from_cols(w, out, inp),
        );
        Self {
            fwd,
            bwd: OnceLock::from(bwd),
        }
    }

    pub fn out_dim(&self) -> usize {
        self.fwd.n()
    }

    pub fn in_dim(&self) -> usize {
        self.fwd.k()
    }

    /// `dst[rows, out] (+)= x W^T` (`dst` row-major with `out` columns).
    pub fn forward(&self, x: &RowsBf16, dst: &mut [f32], accumulate: bool) {
        matmul(x, &self.fwd, dst, self.out_dim(), accumulate);
    }

    /// A new `[rows, out]` output `x W^T`.
    pub fn forward_new(&self, x: &RowsBf16) -> Vec<f32> {
        product(x, &self.fwd)
    }

    /// `dx[rows, in] (+)= dy W` (`dx` row-major with `in` columns).
    pub fn input_grad(&self, dy: &RowsBf16, dx: &mut [f32], accumulate: bool) {
        matmul(dy, self.bwd(), dx, self.in_dim(), accumulate);
    }

    /// A new `[rows, in]` input gradient `dy W`.
    pub fn input_grad_new(&self, dy: &RowsBf16) -> Vec<f32> {
        product(dy, self.bwd())
    }

    fn bwd(&self) -> &PackedB {
        self.bwd.get_or_init(|| self.fwd.transposed())
    }

    /// The weight as f32 `[out, in]` (its bf16 values, exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        // to_f32_kn gives B = W^T as [in, out]; transpose back.
        let (out, inp) = (self.out_dim(), self.in_dim());
        let kn = self.fwd.to_f32_kn();
        let mut w = vec![0f32; out * inp];
        for i in 0..inp {
            for o in 0..out {
                w[o * inp + i] = kn[i * out + o];
            }
        }
        w
    }

    /// Bytes held (both packings when the second was built).
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.get().map_or(0, PackedB::bytes)
    }
}

/// `out[m, n] (+)= a · b` with `out` row-major, rows `out_rs` apart. Panics unless
/// [`available`] (callers check it) and the shapes agree.
pub fn matmul(a: &RowsBf16, b: &PackedB, out: &mut [f32], out_rs: usize, accumulate: bool) {
    assert_eq!(a.k, b.k, "amx::matmul: contraction {} vs {}", a.k, b.k);
    matmul_prefix(a, b, b.n, out, out_rs, accumulate)
}

/// `out[m, n] (+)= a · b[..a.k, ..n]`: the product with the first `n` columns of `b` and its
/// first `a.k` rows (`a.k <= b.k`; `a`'s padding past `a.k` is zero, so `b`'s rows there only
/// meet zeros). What attention over a KV cache needs: the keys a block of queries sees are a
/// prefix of the packed cache. Panics unless [`available`] and the shapes agree.
pub fn matmul_prefix(
    a: &RowsBf16,
    b: &PackedB,
    n: usize,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
) {
    let _pg = super::profile::prof("amx.matmul");
    assert!(available(), "amx::matmul called without AMX");
    assert!(
        a.k <= b.k && a.kt <= b.kt && n <= b.n,
        "amx::matmul: a [{}, {}] by the first {n} columns of b [{}, {}]",
        a.m,
        a.k,
        b.k,
        b.n
    );
    let m = a.m;
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        out_rs >= n,
        "amx::matmul: row stride {out_rs} < {n} columns"
    );
    assert!(
        out.len() >= (m - 1) * out_rs + n,
        "amx::matmul: output holds {} values, needs {}",
        out.len(),
        (m - 1) * out_rs + n
    );
    if a.kt == 0 {
        if !accumulate {
            for row in out.chunks_mut(out_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    let pairs = n.div_ceil(2 * TILE_MN);
    assert!(
        2 * pairs <= b.nt,
        "amx::matmul: {pairs} column pairs of {}",
        b.nt
    );
    let ptr = super::pool::SharedMut(out.as_mut_ptr());
    let kt = a.kt;
    super::pool::for_range(pairs, |r| {
        // SAFETY: available() holds (asserted), so the tile permission was granted and the CPU
        // has AMX; the task writes only columns 32 * r.start .. 32 * r.end of `out`, inside its
        // bounds (asserted above), and reads `a` and `b` within their tiles (row tile pairs
        // below a.mt, which is even; contraction tiles below a.kt <= b.kt).
        unsafe {
            if kt <= K_BLOCK {
                kernel(
                    a,
                    b,
                    ptr.get(),
                    out_rs,
                    m,
                    n,
                    r.clone(),
                    0..a.mt,
                    0..kt,
                    accumulate,
                )
            } else {
                // A long contraction (the LM head's input gradient: 1,536 tiles): a row pair's
                // 2 x 64 A tiles and the task's B tiles for 64 contraction tiles stay in L2
                // while every row pair and column pair passes over them, where one pass over
                // the whole contraction per block of 32 x 32 outputs streamed both from L3.
                for k0 in (0..kt).step_by(K_BLOCK) {
                    let ks = k0..(k0 + K_BLOCK).min(kt);
                    let acc = accumulate || k0 > 0;
                    for i in (0..a.mt).step_by(2) {
                        kernel(
                            a,
                            b,
                            ptr.get(),
                            out_rs,
                            m,
                            n,
                            r.clone(),
                            i..i + 2,
                            ks.clone(),
                            acc,
                        )
                    }
                }
            }
        }
    });
}

/// A new row-major `[a.m, b.n]` product `a · b`, written without a zero-fill first.
pub fn product(a: &RowsBf16, b: &PackedB) -> Vec<f32> {
    let len = a.m * b.n;
    // A large output (the LM head's logits) reuses a kept buffer: see `scratch`.
    let mut out: Vec<f32> = super::scratch::F32.take(len);
    // SAFETY: with `accumulate` false, `matmul` writes every element of rows 0..m, columns 0..n
    // (full blocks by tile stores, edge blocks by copies from the scratch block) and reads none
    // of them, so the spare capacity is fully initialised before the length is set.
    unsafe {
        let spare = std::slice::from_raw_parts_mut(out.as_mut_ptr(), len);
        matmul(a, b, spare, b.n, false);
        out.set_len(len);
    }
    out
}

/// The tile configuration: palette 1, tiles 0-7 all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Contraction tiles per pass of [`kernel`] when the contraction is longer (see `matmul_prefix`).
/// Shorter passes cost more than they save (a soft-prompt step: 0.54 s in products at 64 or 32,
/// 0.66 at 16, 0.78 at 8: each pass loads and stores its outputs again).
const K_BLOCK: usize = 64;

/// Computes output column pairs `pairs` (32 columns each) for the 16-row tiles `rows` (an even
/// start and end), over contraction tiles `ks`: into `out`, or added to it with `accumulate`.
///
/// # Safety
/// The CPU must have AMX-BF16 with the tile permission granted; `ks.end <= a.kt <= b.kt`,
/// `rows.end <= a.mt` and `2 * pairs.end <= b.nt`; `out` must be valid for writes of rows < m,
/// columns < n at row stride `out_rs`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    a: &RowsBf16,
    b: &PackedB,
    out: *mut f32,
    out_rs: usize,
    m: usize,
    n: usize,
    pairs: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    ks: std::ops::Range<usize>,
    accumulate: bool,
) {
    use std::arch::asm;
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    // A's contraction tiles, and B's per column tile (B may hold more rows than A reads).
    let (kt, bkt) = (a.kt, b.kt);
    let stride = 64usize;
    // A 32 x 32 f32 block for edge blocks (rows past `m` or columns past `n`).
    let mut scratch = [0f32; 32 * 32];
    // SAFETY (whole body): the caller guarantees AMX and the permission; tile loads read whole
    // tiles of `a.tiles`/`b.tiles` (indices below their lengths: i < a.mt, j < b.nt,
    // c < kt <= bkt);
    // C loads and stores touch `out` rows < m and columns < n only (full blocks), or `scratch`.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig, options(nostack));
        for p in pairs {
            let n0 = p * 32;
            let b0 = b.tiles.as_ptr().add(2 * p * bkt);
            let b1 = b.tiles.as_ptr().add((2 * p + 1) * bkt);
            for i in rows.clone().step_by(2) {
                let m0 = i * TILE_MN;
                let a0 = a.tiles.as_ptr().add(i * kt);
                let a1 = a.tiles.as_ptr().add((i + 1) * kt);
                let full = m0 + 32 <= m && n0 + 32 <= n;
                let (c, c_rs) = if full {
                    (out.add(m0 * out_rs + n0), out_rs)
                } else {
                    let sp = scratch.as_mut_ptr();
                    for r in 0..32 {
                        for j in 0..32 {
                            let v = if accumulate && m0 + r < m && n0 + j < n {
                                *out.add((m0 + r) * out_rs + n0 + j)
                            } else {
                                0.0
                            };
                            *sp.add(r * 32 + j) = v;
                        }
                    }
                    (sp, 32)
                };
                let c_stride = c_rs * 4;
                if accumulate || !full {
                    asm!(
                        "tileloadd tmm0, [{c} + {s}]",
                        "tileloadd tmm1, [{c} + {s} + 64]",
                        "tileloadd tmm2, [{c2} + {s}]",
                        "tileloadd tmm3, [{c2} + {s} + 64]",
                        c = in(reg) c,
                        c2 = in(reg) c.add(16 * c_rs),
                        s = in(reg) c_stride,
                        options(nostack),
                    );
                } else {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                }
                for kc in ks.clone() {
                    asm!(
                        "tileloadd tmm4, [{a0} + {s}]",
                        "tileloadd tmm6, [{b0} + {s}]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {s}]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a1} + {s}]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(kc),
                        a1 = in(reg) a1.add(kc),
                        b0 = in(reg) b0.add(kc),
                        b1 = in(reg) b1.add(kc),
                        s = in(reg) stride,
                        options(nostack, readonly),
                    );
                }
                asm!(
                    "tilestored [{c} + {s}], tmm0",
                    "tilestored [{c} + {s} + 64], tmm1",
                    "tilestored [{c2} + {s}], tmm2",
                    "tilestored [{c2} + {s} + 64], tmm3",
                    c = in(reg) c,
                    c2 = in(reg) c.add(16 * c_rs),
                    s = in(reg) c_stride,
                    options(nostack),
                );
                if !full {
                    for r in 0..32 {
                        for j in 0..32 {
                            if m0 + r < m && n0 + j < n {
                                *out.add((m0 + r) * out_rs + n0 + j) = scratch[r * 32 + j];
                            }
                        }
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    _a: &RowsBf16,
    _b: &PackedB,
    _out: *mut f32,
    _out_rs: usize,
    _m: usize,
    _n: usize,
    _pairs: std::ops::Range<usize>,
    _rows: std::ops::Range<usize>,
    _ks: std::ops::Range<usize>,
    _accumulate: bool,
) {
    unreachable!("available() is false off x86_64")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// `x · w^T` in f64 on the given values.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        out
    }

    fn round(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| from_bf16(to_bf16(x))).collect()
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn lane_transpose_is_a_transpose() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        use std::arch::x86_64::*;
        let mut w = [unsafe { _mm512_setzero_si512() }; 16];
        for (i, wi) in w.iter_mut().enumerate() {
            let v: Vec<i32> = (0..16).map(|j| (i * 16 + j) as i32).collect();
            // SAFETY: 16 i32 values.
            *wi = unsafe { _mm512_loadu_si512(v.as_ptr().cast()) };
        }
        // SAFETY: AVX512F checked above.
        unsafe { transpose_16x16_epi32(&mut w) };
        for (j, wj) in w.iter().enumerate() {
            let mut v = [0i32; 16];
            // SAFETY: 16 i32 values.
            unsafe { _mm512_storeu_si512(v.as_mut_ptr().cast(), *wj) };
            let want: Vec<i32> = (0..16).map(|i| (i * 16 + j) as i32).collect();
            assert_eq!(v.to_vec(), want, "row {j}");
        }
    }

    /// The transposed packing holds `bf16(x[t][r])` at tile row `r`, position `t`, and zeros past
    /// the edges, bit for bit, for shapes with and without partial tiles in both directions.
    #[test]
    fn transposed_packing_holds_every_value_in_place() {
        for (k, m) in [(64, 32), (45, 20), (576, 48), (7, 3), (33, 17)] {
            let x = values(k * m, 5);
            let a = RowsBf16::from_f32_transposed(&x, k, m);
            for i in 0..a.mt {
                for c in 0..a.kt {
                    let tile = &a.tiles[i * a.kt + c].0;
                    for r in 0..TILE_MN {
                        for t in 0..TILE_K {
                            let (row, col) = (c * TILE_K + t, i * TILE_MN + r);
                            let want = if row < k && col < m {
                                to_bf16(x[row * m + col])
                            } else {
                                0
                            };
                            assert_eq!(
                                tile[r * TILE_K + t],
                                want,
                                "[{k}, {m}] tile ({i}, {c}) row {r} pos {t}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        let mut out = [0u16; 32];
        let src: Vec<f32> = values(32, 3);
        convert_32(&src, &mut out);
        for (o, s) in out.iter().zip(&src) {
            assert_eq!(*o, to_bf16(*s));
        }
    }

    /// Every shape class: full blocks, row and column edges, a `k` that is not a multiple of 32,
    /// a contraction longer than one pass, accumulation, and the transposed packing (`dy · W`).
    #[test]
    fn amx_products_match_f32_within_bf16_rounding() {
        if !available() {
            eprintln!(
                "note: no AMX-BF16 here (or ATTUNE_MATMUL=f32): the bf16 kernel is not tested; \
                 the f32 fallback is tested by the kernels that call it"
            );
            return;
        }
        for &(m, n, k) in &[
            (64, 64, 64),
            (1, 16, 32),
            (17, 40, 50),
            (100, 96, 576),
            (33, 1536, 96),
            // A contraction of 66 tiles: passes of K_BLOCK tiles, the last one partial.
            (40, 50, 2100),
        ] {
            let x = values(m * k, 1 + m as u32);
            let w = values(n * k, 7 + n as u32);
            let pb = PackedB::from_rows(&w, n, k);
            let a = RowsBf16::from_f32(&x, m, k);
            let mut out = vec![f32::NAN; m * n];
            matmul(&a, &pb, &mut out, n, false);
            // Exact products of the bf16-rounded operands, summed in f32: tight.
            let want_r = reference(&round(&x), &round(&w), m, n, k);
            // Against the f32 operands: each operand rounds by at most 2^-9 relative, so a term
            // moves by at most about 2^-8 of |x w|; bounded by 2^-8 * sum |x w|.
            let want = reference(&x, &w, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let got = out[i * n + j] as f64;
                    let mag: f64 = (0..k)
                        .map(|t| (x[i * k + t] * w[j * k + t]).abs() as f64)
                        .sum();
                    let r = want_r[i * n + j];
                    assert!(
                        (got - r).abs() <= 1e-5 * mag + 1e-6,
                        "[{m},{n},{k}] ({i},{j}): {got} vs bf16-exact {r}"
                    );
                    assert!(
                        (got - want[i * n + j]).abs() <= mag / 256.0 + 1e-6,
                        "[{m},{n},{k}] ({i},{j}): {got} vs f32 {}",
                        want[i * n + j]
                    );
                }
            }
            // Accumulate into a strided output.
            let rs = n + 3;
            let mut acc = vec![1.5f32; m * rs];
            matmul(&a, &pb, &mut acc, rs, true);
            for i in 0..m {
                for j in 0..n {
                    assert!(
                        (acc[i * rs + j] - 1.5 - out[i * n + j]).abs()
                            <= 1e-4 * (1.0 + out[i * n + j].abs())
                    );
                }
                for j in n..rs {
                    assert_eq!(acc[i * rs + j], 1.5, "padding column written");
                }
            }
            // dy · W with W [n, k]: dy [m, n], contraction over n.
            let dy = values(m * n, 11);
            let pt = PackedB::from_cols(&w, n, k);
            let pt2 = pb.transposed();
            let ad = RowsBf16::from_f32(&dy, m, n);
            let mut dx = vec![0f32; m * k];
            let mut dx2 = vec![0f32; m * k];
            matmul(&ad, &pt, &mut dx, k, false);
            matmul(&ad, &pt2, &mut dx2, k, false);
            assert_eq!(dx, dx2, "transposed() differs from from_cols()");
            for i in 0..m {
                for t in 0..k {
                    let e: f64 = (0..n)
                        .map(|j| dy[i * n + j] as f64 * w[j * k + t] as f64)
                        .sum();
                    let mag: f64 = (0..n)
                        .map(|j| (dy[i * n + j] * w[j * k + t]).abs() as f64)
                        .sum();
                    assert!((dx[i * k + t] as f64 - e).abs() <= mag / 256.0 + 1e-6);
                }
            }
            // A = x^T from its [k, m] storage.
            let xt: Vec<f32> = (0..k * m).map(|idx| x[(idx % m) * k + idx / m]).collect();
            let at = RowsBf16::from_f32_transposed(&xt, k, m);
            let mut out_t = vec![0f32; m * n];
            matmul(&at, &pb, &mut out_t, n, false);
            assert_eq!(out, out_t, "from_f32_transposed differs from from_f32");
        }
    }

    /// The rounding residual's packing: bf16(w) + residual holds w to ~16 bits (every value of
    /// it, vectorised rows of 32 and the scalar tail of a `k` off the 32 grid), and a product on
    /// both sees w's small changes that the rounded weight alone misses.
    #[test]
    fn rounding_residual_holds_what_bf16_leaves_out() {
        let (n, k) = (40, 75);
        let w = values(n * k, 9);
        let hi = PackedB::from_rows(&w, n, k).to_f32_kn();
        let lo = PackedB::from_rows_residual(&w, n, k).to_f32_kn();
        let mut nonzero = 0;
        for nn in 0..n {
            for kk in 0..k {
                let (x, i) = (w[nn * k + kk], kk * n + nn);
                assert_eq!(hi[i], from_bf16(to_bf16(x)));
                assert_eq!(lo[i], from_bf16(to_bf16(x - hi[i])), "({nn}, {kk})");
                // Within 2^-16 of x relative (bf16's 8 bits twice, and ties).
                assert!(((hi[i] + lo[i]) - x).abs() <= x.abs() / 65536.0 + 1e-30);
                nonzero += usize::from(lo[i] != 0.0);
            }
        }
        assert!(nonzero > n * k / 2, "residual mostly zero: {nonzero}");
        // A weight already on bf16 values has no residual.
        let exact = round(&w);
        let r = PackedB::from_rows_residual(&exact, n, k).to_f32_kn();
        assert!(r.iter().all(|&v| v == 0.0));
        if !available() {
            return;
        }
        // An update a tenth of a bf16 step: invisible to the rounded weight, seen with the
        // residual. x on bf16 values, so the activations' rounding does not blur it.
        let (m, k) = (32, 64);
        let x = round(&values(m * k, 4));
        let w0 = round(&values(n * k, 6));
        let w1: Vec<f32> = w0.iter().map(|&v| v + v.abs() / 2560.0).collect();
        let a = RowsBf16::from_f32(&x, m, k);
        let product_of = |w: &[f32], residual: bool| {
            let mut out = vec![0f32; m * n];
            matmul(&a, &PackedB::from_rows(w, n, k), &mut out, n, false);
            if residual {
                matmul(&a, &PackedB::from_rows_residual(w, n, k), &mut out, n, true);
            }
            out
        };
        let (y0, y1, y1r) = (
            product_of(&w0, false),
            product_of(&w1, false),
            product_of(&w1, true),
        );
        assert_eq!(y0, y1, "the update moved the rounded weight");
        let want = reference(&x, &w1, m, n, k);
        let delta = reference(&x, &w1, m, n, k)
            .iter()
            .zip(reference(&x, &w0, m, n, k))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let err = y1r
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        assert!(
            delta > 0.0 && err < delta / 10.0,
            "residual product off by {err}, update {delta}"
        );
    }

    #[test]
    fn packed_values_round_trip() {
        let (n, k) = (20, 45);
        let w = values(n * k, 5);
        let pb = PackedB::from_rows(&w, n, k);
        let kn = pb.to_f32_kn();
        for nn in 0..n {
            for kk in 0..k {
                assert_eq!(kn[kk * n + nn], from_bf16(to_bf16(w[nn * k + kk])));
            }
        }
        assert_eq!(
            pb.bytes(),
            2 * 2 * 1024,
            "two 16-column tiles by two 32-deep tiles"
        );
    }
}
