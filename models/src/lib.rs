//! Attune's model runtime: Llama-family decoders written for adaptation.
//!
//! Knows no jobs, SQL or UI. Everything here is plain candle; every linear layer
//! can carry a LoRA branch and the input path accepts soft-prompt embeddings.

pub mod chat_template;
pub mod config;
pub mod device;
pub mod error;
pub mod export;
pub mod fsio;
pub mod fuzz;
pub mod generate;
pub mod gguf;
pub mod gguf_header;
pub mod hf;
pub mod inspect;
pub mod kernels;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod sampling;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};

/// The default model's file name inside `<data dir>/models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch-model.sh` puts the default model: `<data dir>/models/`, with the data
/// directory chosen by the engine's rule (`attune_engine::default_data_dir`, which owns it;
/// repeated here because models sit below the engine, and checked equal by an engine test).
pub fn standard_model_path() -> std::path::PathBuf {
    let data = match std::env::var_os("ATTUNE_DATA_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::env::var_os("XDG_DATA_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/share"))
            })
            .unwrap_or_else(|| std::path::PathBuf::from("."))
            .join("attune"),
    };
    data.join("models").join(DEFAULT_MODEL_FILE)
}

/// Path of the default model for tests and benchmarks: `$ATTUNE_TEST_MODEL`, else
/// [`standard_model_path`].
pub fn default_model_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ATTUNE_TEST_MODEL") {
        return p.into();
    }
    standard_model_path()
}

/// Hands the allocator's free memory back to the system (glibc's `malloc_trim`): after a large
/// set of buffers is dropped for good (a model made compact drops every dense copy and the
/// tensors its blocks were read into), which [`tune_allocator`]'s trim threshold would
/// otherwise keep resident. A no-op off glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the system; it is safe to call any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tunes glibc's allocator for tensor work: training allocates and frees buffers of tens of
/// megabytes per op, which glibc by default hands back to the kernel (mmap/munmap) every time,
/// so every op pays page faults on fresh memory (measured: the LoRA backward pass 3x slower).
/// Keeps buffers up to 32 MB in the heap and trims it only past 512 MB free. Idempotent; a no-op
/// off glibc. See also [`single_arena`].
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
            }
        });
    }
}

/// Fixes the CPU thread count for the whole process, first thing in `main`: when
/// `RAYON_NUM_THREADS` is unset, sets it to the count candle would pick. candle reads that
/// variable in every f32 matmul (and, through `get_num_threads`, for every split of work) and,
/// when it is unset, falls back to counting physical cores by parsing `/proc/cpuinfo` each
/// time, ~20 us per call; the benches set it, so without this the app and the CLI ran slower than
/// the figures they quote. Must run before any other thread starts (it writes the environment).
/// A no-op when the variable is already set.
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads().max(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// One allocator arena for every thread, for a process that trains. With glibc's default (an
/// arena per thread under contention) a buffer freed by one pool's worker cannot serve the next
/// allocation on another, and which thread allocates what varies run to run: the same training
/// run's peak memory varied by up to 18% (prompt tuning at 2 x 256: 1495 or 1761 MiB; full
/// fine-tuning: 2300 or 2700 MiB). With one arena from the process's start, repeated runs lay
/// within 1-2% (`crates/cli/tests/memory.rs`) at the same training speed. `attune train`, the
/// app and the benches call it first thing (it holds for threads that have not allocated yet).
/// The app took glibc's default until 2026-12-05, when on a CPU without AMX its LoRA run in the
/// end-to-end journey peaked at 2376-2386 MiB against an estimate of 1969 (the run's 1,330 MiB
/// on top of the 1,056 the app held, where `attune train` peaks at 969 MiB whole); on one arena
/// 1873 MiB (estimate 1.02x); two arenas were not enough (2112 MiB). Its price, measured there
/// (`MALLOC_ARENA_MAX=1` against the default, interleaved, two runs each): LoRA training 325-329
/// -> 318-320 tok/s (peak 2290 -> 1880 MB), prompt processing at 512 tokens 828 / 882 -> 805 /
/// 849 tok/s, at 41 tokens unchanged (an earlier measurement on AMX saw prompts ~10% slower).
/// A no-op off glibc.
pub fn single_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
