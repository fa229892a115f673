//! The kernels' worker threads: candle's barrier pool, shared with candle's own CPU ops and the
//! quantized decode products. The calling thread takes a share of each op and the pool's workers
//! spin briefly between ops, so a short op starts on both cores at once; rayon's pool, which
//! the kernels used before, parks the caller on a futex and wakes a worker for every op (on two
//! cores: 41-token prompts 1.45x faster with this pool, issue 15). One pool for the whole
//! forward pass also keeps two pools' spinning workers from taking each other's cores.

use std::cell::Cell;
use std::ops::Range;

thread_local! {
    /// Set while this thread runs a share of a pool call: a nested call runs inline (the pool
    /// takes one call at a time, and the caller would wait on itself).
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a pool call until dropped (also when `f` panics).
struct Inside(bool);

impl Inside {
    fn enter() -> Self {
        Inside(INSIDE.with(|c| c.replace(true)))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|c| c.set(self.0));
    }
}

/// Calls `f` on ranges covering `0..n` (each index once), spread over the pool's threads and
/// the caller; inline when `n < 2`, with one thread, or inside another pool call.
pub(crate) fn for_range(n: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 || super::threads() == 1 || INSIDE.with(Cell::get) {
        f(0..n);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n, |r| {
        let _inside = Inside::enter();
        f(r);
    });
}

/// A raw pointer handed to pool tasks that touch disjoint parts of what it points to (the
/// creator's promise: each task its own part).
pub(crate) struct SharedMut<T>(pub(crate) *mut T);

impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedMut<T> {}
// SAFETY: whoever makes one gives each task a disjoint part of what it points to (here: a
// disjoint range of the slice; `gemm::split_gemm`: disjoint blocks of the product; `amx::matmul`:
// disjoint column ranges).
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole wrapper).
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// `data` in chunks of `chunk` (the last may be shorter): `f(i, chunk i)` for each, in parallel
/// as [`for_range`] spreads them (the pool's `par_chunks_mut().enumerate()`).
pub(crate) fn chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let len = data.len();
    let ptr = SharedMut(data.as_mut_ptr());
    for_range(len.div_ceil(chunk), |r| {
        for i in r {
            let start = i * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: chunk `i` is `start..end`, inside `data` (end <= len), and `for_range`
            // hands each index to exactly one task, so no two tasks alias; `data` is borrowed
            // mutably for the whole call.
            let part = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(start), end - start) };
            f(i, part);
        }
    });
}

/// `[f(0), .., f(n - 1)]`, computed in parallel as [`for_range`] spreads the indices.
pub(crate) fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    chunks_mut(&mut out, 1, |i, o| o[0] = Some(f(i)));
    out.into_iter().flatten().collect()
}

/// Two slices in matching chunks (`chunk_a` and `chunk_b` values each, the same count):
/// `f(i, a's chunk i, b's chunk i)`.
pub(crate) fn chunks_mut2<A: Send, B: Send>(
    a: &mut [A],
    chunk_a: usize,
    b: &mut [B],
    chunk_b: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (ca, cb) = (chunk_a.max(1), chunk_b.max(1));
    let (la, lb) = (a.len(), b.len());
    let n = la.div_ceil(ca);
    assert_eq!(n, lb.div_ceil(cb), "pool::chunks_mut2: chunk counts differ");
    let (pa, pb) = (SharedMut(a.as_mut_ptr()), SharedMut(b.as_mut_ptr()));
    for_range(n, |r| {
        for i in r {
            let (sa, sb) = (i * ca, i * cb);
            let (ea, eb) = ((sa + ca).min(la), (sb + cb).min(lb));
            // SAFETY: as in `chunks_mut`, for each slice: disjoint chunks inside bounds.
            let (xa, xb) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pa.get().add(sa), ea - sa),
                    std::slice::from_raw_parts_mut(pb.get().add(sb), eb - sb),
                )
            };
            f(i, xa, xb);
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_index_once_and_nested_calls_run_inline() {
        for n in [0, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_range(n, |r| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                    // A nested call (as a kernel calling another) must not deadlock.
                    for_range(3, |_| {});
                }
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn map_keeps_the_order() {
        assert_eq!(
            map(37, |i| i * i),
            (0..37).map(|i| i * i).collect::<Vec<_>>()
        );
        assert!(map(0, |i| i).is_empty());
    }

    #[test]
    fn chunks_cover_the_slice_in_order() {
        let mut v = vec![0usize; 1001];
        chunks_mut(&mut v, 64, |i, c| {
            c.iter_mut().enumerate().for_each(|(j, x)| *x = i * 64 + j)
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == i));
        let (mut a, mut b) = (vec![0u32; 10], vec![0u8; 20]);
        chunks_mut2(&mut a, 3, &mut b, 6, |i, x, y| {
            x.fill(i as u32);
            y.fill(i as u8);
        });
        assert_eq!(a, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]);
        assert_eq!(&b[18..], &[3, 3]);
    }
}
