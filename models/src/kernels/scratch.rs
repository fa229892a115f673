//! Reuse of the few very large buffers a training step allocates and frees (the LM head's
//! `[rows, vocab]` logits and their bf16 gradient: 200 and 100 MB at 1,020 rows of SmolLM2's
//! 49,152-word vocabulary). glibc serves every allocation over 32 MB (its largest mmap threshold)
//! with fresh pages from the OS and unmaps them on free, so such a buffer costs a page fault and
//! a zero-fill per 4 KiB page every step: 45 ms of a 1.3 s soft-prompt step for the logits alone
//! (`ATTUNE_PROFILE_OPS=1`). A freed buffer of that size is kept here instead, and the next one
//! of a similar size takes it.
//!
//! At most [`KEEP`] buffers per element type are kept, the largest first; [`release`] frees them
//! (the trainer calls it when it is dropped, so a finished run leaves nothing behind).

use std::sync::Mutex;

/// Buffers smaller than this are left to the allocator (its arenas reuse them already).
pub(crate) const MIN_BYTES: usize = 32 << 20;

/// Buffers kept per element type.
const KEEP: usize = 2;

/// Freed large buffers of one element type.
pub(crate) struct Cache<T>(Mutex<Vec<Vec<T>>>);

impl<T: Copy> Cache<T> {
    pub(crate) const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    fn large(len: usize) -> bool {
        len.saturating_mul(std::mem::size_of::<T>()) >= MIN_BYTES
    }

    /// An empty vector with room for `len` values: a kept buffer whose capacity is at least
    /// `len` and at most twice it, or a new allocation. Its contents are the caller's to write.
    pub(crate) fn take(&self, len: usize) -> Vec<T> {
        if Self::large(len) {
            let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let fit = (0..kept.len())
                .filter(|&i| (len..=len.saturating_mul(2)).contains(&kept[i].capacity()))
                .min_by_key(|&i| kept[i].capacity());
            if let Some(i) = fit {
                let mut v = kept.swap_remove(i);
                v.clear();
                return v;
            }
        }
        Vec::with_capacity(len)
    }

    /// Keeps `v` for a later [`Cache::take`] when it is large; drops it otherwise (or when a
    /// smaller one must make room for it, the smallest goes).
    pub(crate) fn give(&self, v: Vec<T>) {
        if !Self::large(v.capacity()) {
            return;
        }
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.push(v);
        kept.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
        kept.truncate(KEEP);
    }

    pub(crate) fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// f32 buffers (the LM head's logits).
pub(crate) static F32: Cache<f32> = Cache::new();

/// Frees every kept buffer (of every element type).
pub fn release() {
    F32.clear();
    super::amx::release_scratch();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_small_ones_are_not() {
        let cache: Cache<u8> = Cache::new();
        let big = MIN_BYTES + 10;
        let v = cache.take(big);
        let ptr = v.as_ptr();
        assert!(v.is_empty() && v.capacity() >= big);
        cache.give(v);
        // A request of the same size or a bit smaller takes the kept buffer, emptied.
        let again = cache.take(big - 5);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
        cache.give(again);
        // Far smaller (under half its size) or larger requests do not.
        let small = cache.take(MIN_BYTES / 2);
        assert_ne!(small.as_ptr(), ptr);
        let larger = cache.take(3 * big);
        assert_ne!(larger.as_ptr(), ptr);
        // Small buffers are never kept; at most KEEP large ones, the largest.
        cache.give(vec![0u8; 16]);
        cache.give(larger);
        cache.give(Vec::with_capacity(2 * big));
        assert_eq!(cache.0.lock().unwrap().len(), KEEP);
        assert!(cache
            .0
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.capacity() >= 2 * big));
        cache.clear();
        assert!(cache.0.lock().unwrap().is_empty());
    }
}
