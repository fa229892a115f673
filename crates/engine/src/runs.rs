//! Fine-tuning runs: a checked [`RunSpec`] becomes a `runs` row (after a memory
//! estimate), and [`Engine::execute_run`] drives `attune_models::train` on the caller's
//! thread: load, render, prepare the method, resume from the newest checkpoint, then
//! step / record / evaluate / checkpoint until done, paused or cancelled, and finally
//! write the adapter under `<data_dir>/adapters/<run name>/` and register it.
//!
//! Run directory: `<data_dir>/runs/<id>/`, checkpoints in `checkpoints/step-NNNNNNN`
//! (written to a temporary directory and renamed by the trainer; temporary directories
//! left by a crash are removed before resuming), `baseline.json` holds the
//! general-domain NLL measured before training.
//!
//! Memory estimate (bytes), documented in [`estimate_memory`]: the f32 weights (for LoRA and
//! prompt tuning also the quantized copies the `Auto` load keeps and, where the frozen base runs
//! in bf16 on the CPU's matrix units, its packed copies, or where it runs on int8 products
//! (VNNI, no AMX) its i8 copies in place of the projections' f32 ones; for full fine-tuning in
//! bf16 its per-step packings), the optimizer's state per trained
//! parameter, what every decoder layer keeps per position for the backward pass (counted from
//! the fused training layer's saved tensors), the logits, one layer's backward buffers and the
//! runtime, times a margin of 8%; [`Engine::run_memory`] adds what the process already holds (a
//! desktop window, chat models kept loaded), since the run trains in it. It is an upper bound
//! for batches of full-length rows. Checked by `crates/cli/tests/memory.rs`: `attune train` of
//! the default model (SmolLM2-135M Q4_1) on packed PubMedQA blocks, its peak RSS from `wait4`,
//! release build, shared 2-core machine (2026-12-03, after the AMX merge): with AMX (LoRA and
//! prompt tuning's base in bf16) LoRA r 16 on every projection at 2 x 256 peaked at 1575 MiB
//! against an estimate of 1753 MiB (1.11x), prompt tuning at 2 x 256 at 1470 MiB against 1631
//! MiB (1.11x), full fine-tuning (f32) at 1 x 256 at 2289 MiB against 2613 MiB (1.14x); with
//! `ATTUNE_MATMUL=f32` 1409 / 1476 (1.05x), 1294 / 1354 (1.05x), 2281 / 2613 MiB (1.15x). Full
//! fine-tuning in bf16 (the default with AMX since 2026-12-05): 2812 MiB at 1 x 256, 3385 at
//! 4 x 256, against 3168 / 4149 MiB (1.13x / 1.23x). Without AMX, with VNNI (LoRA's and prompt
//! tuning's base on int8 products, 2026-12-05): LoRA peaked at 1249 MiB, prompt tuning at 1130
//! (see [`INT8_SAVED_BYTES_PER_PROJ_PARAM`] for the estimate's share). The test fails
//! below 1.0x or above 1.25x; `ATTUNE_MEMORY_SWEEP=BxS,...` there measures other shapes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use attune_models::chat_template::{ChatTemplate, Message};
use attune_models::config::Config;
use attune_models::loader::{ComputeMode, LoadOptions, LoadedModel};
use attune_models::tokenizer::Tok;
use attune_models::train::{self, Example, RenderOptions};
use attune_protocol::{
    AdapterMetrics, BaseFormSpec, ChatMessage, LossOn, LrSchedule, MethodSpec, MetricKind,
    RunDetail, RunEvent, RunMetric, RunSpec, RunStatus, RunSummary, SplitName,
};

use crate::datasets::Sample;
use crate::error::EngineError;
use crate::store::{AdapterRow, DatasetRecord, MetricRow, ModelRow, RunRow};
use crate::Engine;

/// How many checkpoints a run keeps.
const KEEP_CHECKPOINTS: usize = 2;

/// Relative worsening of the general-domain NLL that counts as forgetting.
pub const FORGETTING_THRESHOLD: f64 = 0.05;

/// What the caller sets to stop a run between steps.
#[derive(Debug, Default)]
pub struct RunControl {
    pause: AtomicBool,
    cancel: AtomicBool,
}

impl RunControl {
    pub const fn new() -> RunControl {
        RunControl {
            pause: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
        }
    }

    /// Checkpoint and stop after the current step; the run becomes `paused`.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
    }

    /// Stop after the current step and discard the checkpoints; the run becomes `cancelled`.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn reset(&self) {
        self.pause.store(false, Ordering::SeqCst);
        self.cancel.store(false, Ordering::SeqCst);
    }

    /// A pause was asked for.
    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// A cancel was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// Runs executing in this process: (database path, run id).
static ACTIVE: Mutex<Vec<(PathBuf, i64)>> = Mutex::new(Vec::new());

/// Marks a run active in this process until dropped (also when unwinding).
struct ActiveGuard(PathBuf, i64);

impl ActiveGuard {
    fn claim(db: &Path, id: i64) -> Option<ActiveGuard> {
        let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
        if active.iter().any(|(p, i)| p == db && *i == id) {
            return None;
        }
        active.push((db.to_path_buf(), id));
        Some(ActiveGuard(db.to_path_buf(), id))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
        active.retain(|(p, i)| !(p == &self.0 && *i == self.1));
    }
}

fn is_active_here(db: &Path, id: i64) -> bool {
    let active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
    active.iter().any(|(p, i)| p == db && *i == id)
}

/// Whether process `pid` exists.
fn pid_alive(pid: i64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

// ---------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------

/// The parts of a run's estimated peak resident memory, in bytes (see [`estimate_memory`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// The weights training holds: f32 (or their bf16 packings) and, for LoRA and prompt
    /// tuning, the copies the model keeps beside them (see [`estimate_memory`]).
    pub weights: u64,
    pub trainable_params: u64,
    /// Per trained parameter: its gradient and AdamW's two moments (and the parameter
    /// itself where it is not a weight: LoRA matrices, the soft prompt).
    pub optimizer: u64,
    /// What a step keeps for its backward pass, the logits included.
    pub activations: u64,
    /// The program, the tokenizer, the library, thread stacks and the allocator's slack.
    pub runtime: u64,
    /// What this process already held beyond a bare runtime when the estimate was made (a
    /// desktop window, chat models kept loaded): the run trains in this process, so its peak
    /// includes it. 0 from [`estimate_memory`]; [`Engine::run_memory`] fills it in.
    pub held: u64,
    /// This process's resident memory when the estimate was made (0 when unknown).
    pub resident: u64,
    /// DPO on full fine-tuning: the frozen f32 reference copy of the model (0 otherwise;
    /// LoRA's and soft prompts' reference is the base itself). Set by
    /// [`MemoryEstimate::with_reference_copy`].
    pub reference: u64,
    /// The peak: every part above but `resident`, times [`MEMORY_MARGIN`].
    pub total: u64,
}

impl MemoryEstimate {
    /// Adds a frozen f32 copy of a model shaped like `cfg` (DPO's reference on full
    /// fine-tuning) to the peak.
    pub fn with_reference_copy(mut self, cfg: &Config) -> MemoryEstimate {
        let bytes = (cfg.num_parameters() as u64).saturating_mul(4);
        self.reference = bytes;
        self.total = self
            .total
            .saturating_add((bytes as f64 * MEMORY_MARGIN).ceil() as u64);
        self
    }

    pub fn total_mb(&self) -> u64 {
        self.total.div_ceil(1 << 20)
    }

    /// Memory the run still has to get from the system: the peak less what this process
    /// already holds (compared with `MemAvailable`).
    pub fn needed(&self) -> u64 {
        self.total.saturating_sub(self.resident)
    }
}

/// Parameters `method` trains on a model shaped like `cfg`.
pub fn trainable_params(cfg: &Config, method: &MethodSpec) -> u64 {
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let hd = cfg.head_dim() as u64;
    let q = cfg.num_attention_heads as u64 * hd;
    let kv = cfg.num_key_value_heads as u64 * hd;
    match method {
        MethodSpec::Full => cfg.num_parameters() as u64,
        MethodSpec::Prompt { virtual_tokens, .. } => (*virtual_tokens as u64).saturating_mul(h),
        MethodSpec::Lora { r, targets, .. } => {
            let per_layer: u64 = cfg
                .resolve_lora_targets(targets)
                .unwrap_or_default()
                .iter()
                .map(|t| match t.as_str() {
                    "q_proj" => h + q,
                    "k_proj" | "v_proj" => h + kv,
                    "qkv_proj" => h + q + 2 * kv,
                    "o_proj" => q + h,
                    "gate_proj" | "up_proj" => h + i,
                    "gate_up_proj" => h + 2 * i,
                    "down_proj" => i + h,
                    _ => 0,
                })
                .sum();
            (*r as u64)
                .saturating_mul(per_layer)
                .saturating_mul(cfg.num_hidden_layers as u64)
        }
    }
}

/// The runtime's own footprint in a training process (see [`MemoryEstimate::runtime`]).
pub const TRAINING_RUNTIME: u64 = 64 << 20;

/// Bytes per parameter that LoRA and prompt tuning hold beyond the f32 weights: the run loads
/// the model in `Auto`, which keeps the file's quantized copy of every weight (for decoding;
/// at most 1.0625 bytes per weight for 8-bit and smaller types) beside the dense one, and the
/// allocator's slack around it. Measured with `ATTUNE_MATMUL=f32` on the default model: LoRA and
/// prompt tuning peaked 135-175 MiB (1.05-1.36 bytes per parameter) above the f32-only sum.
/// Full fine-tuning replaces every weight by its variable, which drops the copy.
pub const KEPT_COPY_BYTES_PER_PARAM: f64 = 1.5;

/// Bytes per parameter full fine-tuning's peak may hold beyond its parts (weights, gradients,
/// AdamW's moments, activations). Its peak at 1 x 256 on the default model measured 2305-2385
/// MiB in a test run alone but 2633-2702 MiB when the whole test suite ran before it (2026-12-04,
/// twice each; the cause of the spread was not found: not CPU load, not the loader's threads):
/// one byte per parameter (146 MiB with the margin) keeps the estimate above both.
pub const FULL_SPREAD_BYTES_PER_PARAM: u64 = 1;

/// Bytes per parameter of the bf16 copies packed for the CPU's matrix units when LoRA's and
/// prompt tuning's frozen base runs on them ([`bf16_frozen_base`]): the projections' f32 copies
/// give way to their two packings (forward and input gradient, 4 bytes together), while the LM
/// head keeps its f32 weight (tied to the embedding) beside its packings. Measured on the
/// default model: 110-185 MiB above the same runs with `ATTUNE_MATMUL=f32` (the head's packings
/// are 108 MiB of it); 2 bytes per parameter (256 MiB there) bounds it.
pub const PACKED_BF16_BYTES_PER_PARAM: u64 = 2;

/// Bytes per parameter full fine-tuning's bf16 products hold beyond its f32 parts: every
/// projection's forward packing (2 bytes) from its forward pass to the end of the step, the LM
/// head's two packings (4 bytes per head weight; the rounding residuals and the projections'
/// input-gradient packings are built and dropped one product at a time). Measured on the
/// default model (2026-12-05): 1 x 256 peaked 2812 MiB and 4 x 256 3385 MiB (2305-2702 MiB at
/// 1 x 256 with f32 products); 3 bytes per parameter, one more than measured, leaves room for
/// the spread the f32 runs showed between a test alone and after the whole suite (see
/// [`FULL_SPREAD_BYTES_PER_PARAM`]).
pub const FULL_BF16_PACKED_BYTES_PER_PARAM: u64 = 3;

/// Bytes per parameter full fine-tuning's int8 products ([`int8_full_fine_tuning`]) hold
/// beyond its f32 parts: every weight's forward i8 copy (1 byte, plus a scale and an
/// accumulator start per 32 weights) from its forward pass to the end of the step (the
/// input-gradient copies are made and dropped one product at a time). Measured on the default
/// model (2026-12-05): 1 x 256 peaked 2423 MiB against 2260 with f32 products, 1.27 bytes per
/// parameter more.
pub const FULL_INT8_BYTES_PER_PARAM: f64 = 1.25;

/// Bytes per projection weight that LoRA's and prompt tuning's frozen base saves where it trains
/// on int8 products ([`int8_frozen_base`]): each projection's f32 copy (4 bytes) gives way to
/// its two i8 orientations (1 byte each, plus a scale and an accumulator start per 32 weights:
/// 2.5 bytes together); the quantized copy stays (decode), the head keeps its f32 weight. The
/// full 1.5 bytes showed in `attune train`'s peaks (2026-12-05: LoRA 2 x 256 and prompt tuning
/// 150-175 MiB lower than with f32 products) but not in the app's: the end-to-end journey's
/// LoRA run peaked at 1898 MiB against 1873 with f32 products (cause not found), above an
/// estimate that took the whole saving (1860). Half a byte is taken, which keeps the estimate an
/// upper bound of both.
pub const INT8_SAVED_BYTES_PER_PROJ_PARAM: f64 = 0.5;

/// Whether a run of `method` trains a frozen base on int8 products (`train::prepare`: LoRA and
/// prompt tuning on a CPU with AVX-512 VNNI and no AMX, `attune_models::train::int8_frozen_base`).
pub fn int8_frozen_base(method: &MethodSpec) -> bool {
    !matches!(method, MethodSpec::Full) && attune_models::train::int8_frozen_base()
}

/// The weights of the decoder layers' projections (what a frozen base's products read).
fn projection_params(cfg: &Config) -> u64 {
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let hd = cfg.head_dim() as u64;
    let q = cfg.num_attention_heads as u64 * hd;
    let kv = cfg.num_key_value_heads as u64 * hd;
    (h * (q + 2 * kv) + q * h + 3 * h * i).saturating_mul(cfg.num_hidden_layers as u64)
}

/// Whether a run of `method` multiplies a frozen base in bf16 on the CPU's matrix units, as
/// `attune_models::train::prepare` decides: LoRA and prompt tuning where the CPU has AMX and
/// `ATTUNE_MATMUL=f32` is not set.
pub fn bf16_frozen_base(method: &MethodSpec) -> bool {
    !matches!(method, MethodSpec::Full) && attune_models::kernels::amx::available()
}

/// Whether a run of `method` multiplies in bf16 on the CPU's matrix units: a frozen base
/// ([`bf16_frozen_base`]), or full fine-tuning's f32 master weights packed every step, unless
/// `ATTUNE_FULL_BF16=0` (`attune_models::train::full_bf16_enabled`).
pub fn bf16_products(method: &MethodSpec) -> bool {
    match method {
        MethodSpec::Full => {
            attune_models::kernels::amx::available() && attune_models::train::full_bf16_enabled()
        }
        _ => bf16_frozen_base(method),
    }
}

/// Whether a run of `method` is full fine-tuning on int8 products (f32 master weights quantized
/// every step: a CPU with AVX-512 VNNI and no AMX, `attune_models::train::int8_full_fine_tuning`).
pub fn int8_full_fine_tuning(method: &MethodSpec) -> bool {
    matches!(method, MethodSpec::Full) && attune_models::train::int8_full_fine_tuning()
}

/// The estimate's margin over the parts' sum: the measured peaks lie 0-6% above the fitted
/// parts (the allocator's timing, the longest row's attention scratch), and the estimate
/// must stay an upper bound within 25% of the peak.
pub const MEMORY_MARGIN: f64 = 1.08;

/// f32 values one position keeps per decoder layer for the backward pass. Every decoder
/// layer trains as one fused op (`attune_models::train::block`), which keeps the rotated q
/// and k, v, the attention output and one log-sum-exp per head, the mid-layer residual,
/// the gate and up products and the layer's output; LoRA adds both norms' outputs (the
/// inputs its branches read) and `r` values per adapted projection; full fine-tuning adds
/// the norms' outputs and the SwiGLU product (every projection's input, for its weight's
/// gradient). LoRA with dropout trains on separate ops, which keep more: counted as twice
/// as much (the memory test measures the fused path).
fn kept_per_layer(cfg: &Config, method: &MethodSpec) -> u64 {
    let m = |a: u64, b: u64| a.saturating_mul(b);
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let heads = cfg.num_attention_heads as u64;
    let q = heads * cfg.head_dim() as u64;
    let kv = cfg.num_key_value_heads as u64 * cfg.head_dim() as u64;
    let fused = 2 * q + 2 * kv + heads + 2 * h + 2 * i;
    match method {
        MethodSpec::Prompt { .. } => fused,
        MethodSpec::Lora {
            r,
            targets,
            dropout,
            ..
        } => {
            let lora = (fused + 2 * h).saturating_add(m(*r as u64, targets.len() as u64));
            if *dropout > 0.0 {
                m(UNFUSED_LORA_FACTOR, lora)
            } else {
                lora
            }
        }
        MethodSpec::Full => fused + 2 * h + i,
    }
}

/// How much more LoRA with dropout keeps per position than the fused layer (measured).
const UNFUSED_LORA_FACTOR: u64 = 2;

/// Estimated peak resident memory of a training run of `method` at `batch_size` rows of
/// `max_len` tokens, in a process of its own (an upper bound: every batch full-length):
/// - the f32 weights, 4 bytes per parameter; for full fine-tuning [`FULL_SPREAD_BYTES_PER_PARAM`]
///   more; for LoRA and prompt tuning the quantized
///   copies the model keeps ([`KEPT_COPY_BYTES_PER_PARAM`]) and, where the frozen base runs
///   in bf16 on the matrix units, the packed copies ([`PACKED_BF16_BYTES_PER_PARAM`]; full
///   fine-tuning's per-step packings, [`FULL_BF16_PACKED_BYTES_PER_PARAM`]); where it runs on
///   int8 products, less [`INT8_SAVED_BYTES_PER_PROJ_PARAM`] per projection weight (full
///   fine-tuning's per-step i8 copies, [`FULL_INT8_BYTES_PER_PARAM`]);
/// - per trained parameter 12 bytes (gradient, two AdamW moments), 16 where the parameter
///   is not one of the weights (LoRA matrices, the soft prompt);
/// - per position of a step (rows x (max_len + virtual tokens)) 4 bytes for each value
///   [`kept_per_layer`] keeps in every layer, for the logits of the vocabulary (the LM head
///   and the loss keep them and turn them into their own gradient), and for one layer's
///   backward buffers (input, q/k/v, gate/up and SwiGLU gradients);
/// - [`TRAINING_RUNTIME`];
///
/// all times [`MEMORY_MARGIN`]. Calibrated against measured peaks: see the module
/// documentation.
pub fn estimate_memory(
    cfg: &Config,
    method: &MethodSpec,
    batch_size: usize,
    max_len: usize,
) -> MemoryEstimate {
    estimate_memory_on(cfg, method, batch_size, max_len, BaseFormSpec::F32, 0)
}

/// Bytes a compact base holds per byte of the GGUF file it came from: the decode kernel's
/// blocks (Q4_1 repacked to 6 bits per weight from the file's 5; the K-quants' scales unpacked,
/// 4.75 bits for Q4_K's 4.5), the embedding table's own blocks, and the allocator's slack.
pub const QUANTIZED_BASE_BYTES_PER_FILE_BYTE: f64 = 1.3;

/// Bytes per weight of a bf16 base's values (a GGUF model keeps its decode kernel's blocks
/// beside them).
pub const BF16_BASE_BYTES_PER_PARAM: f64 = 2.0;

/// The frozen base's bytes for LoRA and prompt tuning held in `base` (see
/// [`estimate_memory_on`]); `None` for the f32 form, whose parts [`estimate_memory_on`] sums.
fn compact_base_bytes(cfg: &Config, base: BaseFormSpec, stored_bytes: u64) -> Option<u64> {
    let p = cfg.num_parameters() as f64;
    let tied_head = if cfg.tie_word_embeddings {
        // The tied head's decode kernel holds the table's blocks a second time.
        (cfg.vocab_size * cfg.hidden_size) as f64 * 1.1
    } else {
        0.0
    };
    // The LM head's input gradient expands one panel of the head at a time: `vocab` x 256 in
    // f32 and again packed as bf16.
    let head_panel = (cfg.vocab_size * attune_models::kernels::stream::PANEL * 6) as f64;
    // A GGUF model's decode kernel keeps its blocks (Q4_1 repacked to 6 bits per weight from
    // the file's 5; the K-quants' scales unpacked).
    let blocks = if stored_bytes > 0 {
        stored_bytes as f64 * QUANTIZED_BASE_BYTES_PER_FILE_BYTE + tied_head
    } else {
        0.0
    };
    let held = match base {
        BaseFormSpec::F32 => return None,
        BaseFormSpec::Quantized if stored_bytes > 0 => blocks,
        // bf16 values beside the blocks; a file Attune cannot keep in blocks (a Hugging Face
        // folder) is held in bf16 for either compact form.
        BaseFormSpec::Quantized | BaseFormSpec::Bf16 => p * BF16_BASE_BYTES_PER_PARAM + blocks,
    };
    Some((held + head_panel).ceil() as u64)
}

/// [`estimate_memory`] with LoRA's and prompt tuning's frozen base held in `base`
/// (`stored_bytes`: the size of the GGUF file the model loads from, 0 for a Hugging Face
/// folder). Full fine-tuning ignores `base`.
pub fn estimate_memory_on(
    cfg: &Config,
    method: &MethodSpec,
    batch_size: usize,
    max_len: usize,
    base: BaseFormSpec,
    stored_bytes: u64,
) -> MemoryEstimate {
    let p = cfg.num_parameters() as u64;
    let t = trainable_params(cfg, method);
    // Saturating: settings past any real machine give an estimate near u64::MAX, which no
    // machine has, instead of a wrapped small number.
    let m = |a: u64, b: u64| a.saturating_mul(b);
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let kv = cfg.num_key_value_heads as u64 * cfg.head_dim() as u64;
    let layers = cfg.num_hidden_layers as u64;
    let prefix = match method {
        MethodSpec::Prompt { virtual_tokens, .. } => *virtual_tokens as u64,
        _ => 0,
    };
    let positions = m(batch_size as u64, (max_len as u64).saturating_add(prefix));
    let frozen_base = !matches!(method, MethodSpec::Full);
    let kept = if frozen_base {
        (p as f64 * KEPT_COPY_BYTES_PER_PARAM).ceil() as u64
    } else {
        m(FULL_SPREAD_BYTES_PER_PARAM, p)
    };
    let packed = match (bf16_products(method), method) {
        (false, _) if int8_full_fine_tuning(method) => {
            (p as f64 * FULL_INT8_BYTES_PER_PARAM).ceil() as u64
        }
        (false, _) => 0,
        (true, MethodSpec::Full) => m(FULL_BF16_PACKED_BYTES_PER_PARAM, p),
        (true, _) => m(PACKED_BF16_BYTES_PER_PARAM, p),
    };
    let compact = match method {
        MethodSpec::Full => None,
        _ => compact_base_bytes(cfg, base, stored_bytes),
    };
    let int8_saved = if int8_frozen_base(method) {
        (projection_params(cfg) as f64 * INT8_SAVED_BYTES_PER_PROJ_PARAM) as u64
    } else {
        0
    };
    let weights = match compact {
        Some(bytes) => bytes,
        None => m(4, p)
            .saturating_add(kept)
            .saturating_add(packed)
            .saturating_sub(int8_saved),
    };
    let optimizer = match method {
        MethodSpec::Full => m(12, t),
        _ => m(16, t),
    };
    let backward_buffers = 4 * h + 2 * kv + 3 * i;
    let per_position = m(
        4,
        m(layers, kept_per_layer(cfg, method))
            .saturating_add(cfg.vocab_size as u64)
            .saturating_add(backward_buffers),
    );
    // A compact head's loss converts the logits' gradient to bf16 for its panels (the dense
    // head's packed copy is counted with its weights).
    let compact_head = if compact.is_some() {
        m(positions, 2 * cfg.vocab_size as u64)
    } else {
        0
    };
    let activations = m(positions, per_position).saturating_add(compact_head);
    let runtime = TRAINING_RUNTIME;
    let sum = weights
        .saturating_add(optimizer)
        .saturating_add(activations)
        .saturating_add(runtime);
    MemoryEstimate {
        weights,
        trainable_params: t,
        optimizer,
        activations,
        runtime,
        held: 0,
        resident: 0,
        reference: 0,
        total: (sum as f64 * MEMORY_MARGIN).ceil() as u64,
    }
}

/// This process's resident memory (VmRSS), in bytes.
pub fn process_resident_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    meminfo_field(&text, "VmRSS:")
}

impl Engine {
    /// [`estimate_memory`] for a run this process will train: the peak grows by what the
    /// process already holds beyond a bare runtime (the desktop window, models kept loaded
    /// for chat), and `resident` records what it holds, so [`MemoryEstimate::needed`] is
    /// what the run asks of the system. The one estimate `create_run`, the advisor and
    /// `check_run` use.
    pub fn run_memory(
        &self,
        cfg: &Config,
        method: &MethodSpec,
        batch_size: usize,
        max_len: usize,
        base: BaseFormSpec,
        model: &attune_protocol::ModelSummary,
    ) -> MemoryEstimate {
        let stored = match model.format {
            attune_protocol::ModelFormat::Gguf => model.file_size,
            attune_protocol::ModelFormat::Safetensors => 0,
        };
        let mut est = estimate_memory_on(cfg, method, batch_size, max_len, base, stored);
        let resident = process_resident_bytes().unwrap_or(0);
        est.held = resident.saturating_sub(est.runtime);
        est.resident = resident;
        est.total = est.total.saturating_add(est.held);
        est
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes (None where there is no such file).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&text, "MemAvailable:")
}

pub(crate) fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's resident memory (VmRSS) and peak (VmHWM), in MiB.
pub fn process_memory_mb() -> (Option<f64>, Option<f64>) {
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let mb = |k| meminfo_field(&text, k).map(|b| b as f64 / (1 << 20) as f64);
    (mb("VmRSS:"), mb("VmHWM:"))
}

/// The model's shape, read from its headers (no weights loaded).
pub(crate) fn model_config(path: &Path) -> Result<Config, attune_models::Error> {
    if path.is_dir() {
        attune_models::hf::read_config(path)
    } else {
        let content = attune_models::gguf::read_content(path)?;
        attune_models::gguf::config_from_content(&content, path)
    }
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

pub(crate) fn to_messages(messages: &[ChatMessage]) -> Vec<Message> {
    messages
        .iter()
        .map(|m| Message::new(m.role.clone(), m.content.clone()))
        .collect()
}

pub(crate) fn models_loss(l: LossOn) -> train::LossOn {
    match l {
        LossOn::Assistant => train::LossOn::Assistant,
        LossOn::All => train::LossOn::All,
    }
}

/// One row as training and evaluation see it.
pub(crate) fn render_sample(
    tok: &Tok,
    tmpl: &ChatTemplate,
    sample: &Sample,
    opts: &RenderOptions,
) -> attune_models::Result<Example> {
    match sample {
        Sample::Chat(messages) => train::render_chat(tok, tmpl, &to_messages(messages), opts),
        Sample::Text(text) => train::render_text(tok, text, opts),
    }
}

/// The built-in general-domain sample (see `assets/README.md`), as chat rows.
pub(crate) fn general_sample() -> Vec<Vec<ChatMessage>> {
    include_str!("../assets/general_sample.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            #[derive(serde::Deserialize)]
            struct Row {
                messages: Vec<ChatMessage>,
            }
            serde_json::from_str::<Row>(l).ok().map(|r| r.messages)
        })
        .collect()
}

/// The first `n` rows of the general sample rendered for `loaded`.
pub(crate) fn general_examples(
    tok: &Tok,
    tmpl: &ChatTemplate,
    n: usize,
) -> attune_models::Result<Vec<Example>> {
    let opts = RenderOptions {
        loss_on: train::LossOn::Assistant,
        max_len: 512,
    };
    general_sample()
        .into_iter()
        .take(n)
        .map(|m| train::render_chat(tok, tmpl, &to_messages(&m), &opts))
        .collect()
}

fn mean(sum: f64, n: usize) -> Option<f64> {
    (n > 0).then(|| sum / n as f64)
}

/// The relative worsening message, when `after` is clearly worse than `before`.
pub(crate) fn forgetting_warning(before: f64, after: f64) -> Option<String> {
    (before > 0.0 && (after - before) / before > FORGETTING_THRESHOLD).then(|| {
        format!(
            "general-domain NLL rose from {before:.4} to {after:.4} (+{:.1}%): the model may \
             have forgotten general skills; try fewer steps, a lower learning rate or LoRA",
            100.0 * (after - before) / before
        )
    })
}

// ---------------------------------------------------------------------------------------
// Spec
// ---------------------------------------------------------------------------------------

fn to_method(m: &MethodSpec) -> train::Method {
    match m {
        MethodSpec::Full => train::Method::Full,
        MethodSpec::Lora {
            r,
            alpha,
            dropout,
            targets,
            rslora,
        } => train::Method::Lora(train::LoraConfig {
            r: *r,
            alpha: *alpha,
            dropout: *dropout,
            targets: targets.clone(),
            rslora: *rslora,
        }),
        MethodSpec::Prompt {
            virtual_tokens,
            init_text,
        } => train::Method::Prompt(train::PromptConfig {
            num_virtual_tokens: *virtual_tokens,
            init: match init_text {
                Some(t) => train::PromptInit::Text(t.clone()),
                None => train::PromptInit::RandomVocab,
            },
        }),
    }
}

/// Upper bounds on the sizes a run spec may ask for. Far above anything that fits in memory
/// (the memory estimate refuses long before), they keep every product of sizes (batch x
/// max_len x layers x ..., batch x accumulation, virtual tokens + max_len) inside `u64`.
pub(crate) const MAX_BATCH_SIZE: usize = 4096;
pub(crate) const MAX_GRAD_ACCUM: usize = 65_536;
pub(crate) const MAX_STEPS: usize = 100_000_000;
pub(crate) const MAX_EPOCHS: f64 = 10_000.0;
pub(crate) const MAX_LORA_RANK: usize = 4096;
pub(crate) const MAX_TOKENS: usize = 1 << 20;

/// Refuses impossible settings, naming the field.
pub(crate) fn validate(spec: &RunSpec, cfg: &Config) -> Result<(), EngineError> {
    let context = cfg.max_position_embeddings;
    let bad = |m: String| Err(EngineError::InvalidInput(m));
    let range = |name: &str, v: usize, max: usize| -> Result<(), EngineError> {
        if v == 0 || v > max {
            return Err(EngineError::InvalidInput(format!(
                "{name} must be between 1 and {max}, got {v}"
            )));
        }
        Ok(())
    };
    range("batch_size", spec.batch_size, MAX_BATCH_SIZE)?;
    range("grad_accum", spec.grad_accum, MAX_GRAD_ACCUM)?;
    if let (MethodSpec::Full, Some(b)) = (&spec.method, spec.base) {
        if b != BaseFormSpec::F32 {
            return bad(format!(
                "full fine-tuning trains every weight in f32: a {} base applies to LoRA and \
                 prompt tuning only",
                b.as_str()
            ));
        }
    }
    if let Some(steps) = spec.steps {
        range("steps", steps, MAX_STEPS)?;
    }
    if spec.warmup_steps > MAX_STEPS {
        return bad(format!(
            "warmup_steps must be at most {MAX_STEPS}, got {}",
            spec.warmup_steps
        ));
    }
    if spec.steps.is_none()
        && !(spec.epochs.is_finite() && spec.epochs > 0.0 && spec.epochs <= MAX_EPOCHS)
    {
        return bad(format!(
            "epochs must be positive and at most {MAX_EPOCHS}, got {}",
            spec.epochs
        ));
    }

    if let Some(lr) = spec.lr {
        if !(lr.is_finite() && lr > 0.0) {
            return bad(format!("lr must be positive, got {lr}"));
        }
    }
    if !(0.0..=1.0).contains(&spec.final_lr_fraction) {
        return bad(format!(
            "final_lr_fraction must be in [0, 1], got {}",
            spec.final_lr_fraction
        ));
    }
    if !(spec.weight_decay.is_finite() && spec.weight_decay >= 0.0) {
        return bad(format!(
            "weight_decay must be 0 or positive, got {}",
            spec.weight_decay
        ));
    }
    if !(spec.max_grad_norm.is_finite() && spec.max_grad_norm >= 0.0) {
        return bad(format!(
            "max_grad_norm must be 0 (off) or positive, got {}",
            spec.max_grad_norm
        ));
    }
    if spec.max_len < 2 {
        return bad(format!(
            "max_len must be at least 2 tokens, got {}",
            spec.max_len
        ));
    }
    if spec.max_len > context.min(MAX_TOKENS) {
        return bad(format!(
            "max_len {} is longer than the model's context of {context} tokens",
            spec.max_len
        ));
    }
    match &spec.method {
        MethodSpec::Full => {}
        MethodSpec::Lora {
            r,
            alpha,
            dropout,
            targets,
            ..
        } => {
            range("lora r", *r, MAX_LORA_RANK)?;
            if !(alpha.is_finite() && *alpha > 0.0) {
                return bad(format!("lora alpha must be positive, got {alpha}"));
            }
            if !(0.0..1.0).contains(dropout) {
                return bad(format!("lora dropout must be in [0, 1), got {dropout}"));
            }
            if targets.is_empty() {
                return bad("lora targets: name at least one module".into());
            }
            // The model's own names (Phi-3: qkv_proj, gate_up_proj; either spelling is taken).
            if let Err(e) = cfg.resolve_lora_targets(targets) {
                return bad(format!("lora targets: {e}"));
            }
        }
        MethodSpec::Prompt {
            virtual_tokens,
            init_text,
        } => {
            range("virtual_tokens", *virtual_tokens, MAX_TOKENS)?;
            match virtual_tokens.checked_add(spec.max_len) {
                Some(n) if n <= context => {}
                _ => {
                    return bad(format!(
                        "virtual_tokens {virtual_tokens} + max_len {} exceed the model's context \
                         of {context}",
                        spec.max_len
                    ))
                }
            }
            if init_text.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return bad("prompt init text is empty".into());
            }
        }
    }
    Ok(())
}

/// A run's pre-flight ([`Engine::plan_run`]).
pub(crate) struct RunPlan {
    pub model: attune_protocol::ModelSummary,
    pub dataset: attune_protocol::DatasetSummary,
    pub memory: MemoryEstimate,
    /// Free memory now (None where the system does not say).
    pub available: Option<u64>,
    pub fits: bool,
    /// Optimizer steps, from the examples per epoch (the training rows, or the blocks
    /// packing makes of them).
    pub total_steps: usize,
    /// Mean tokens per example after truncation (or per packed block).
    pub mean_example_tokens: f64,
    /// How LoRA and prompt tuning hold the frozen base: the spec's, or the engine's choice.
    pub base: BaseFormSpec,
}

pub(crate) fn total_steps(spec: &RunSpec, train_rows: u64) -> usize {
    match spec.steps {
        Some(s) => s,
        None => {
            // Bounded by `validate`; the float-to-int cast saturates.
            let per = spec.batch_size.saturating_mul(spec.grad_accum) as f64;
            ((spec.epochs * train_rows as f64) / per)
                .ceil()
                .clamp(1.0, MAX_STEPS as f64) as usize
        }
    }
}

/// A change that makes a run need less memory.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Smaller {
    /// Half the batch, twice the accumulation: the same effective batch.
    Batch {
        batch_size: usize,
        grad_accum: usize,
    },
    MaxLen(usize),
    Lora,
    /// LoRA or prompt tuning on the quantized base.
    QuantizedBase,
}

/// The changes that would shrink `spec`, most effective first.
pub(crate) fn smaller_settings(spec: &RunSpec) -> Vec<Smaller> {
    let mut s = Vec::new();
    if spec.batch_size > 1 {
        s.push(Smaller::Batch {
            batch_size: (spec.batch_size / 2).max(1),
            grad_accum: spec.grad_accum.saturating_mul(2),
        });
    }
    if spec.max_len > 256 {
        s.push(Smaller::MaxLen(spec.max_len / 2));
    }
    if matches!(spec.method, MethodSpec::Full) {
        s.push(Smaller::Lora);
    } else if spec.base != Some(BaseFormSpec::Quantized) {
        s.push(Smaller::QuantizedBase);
    }
    s
}

/// The suggestion in the CLI's words (its flags).
fn suggestion(spec: &RunSpec) -> String {
    let s: Vec<String> = smaller_settings(spec)
        .into_iter()
        .map(|c| match c {
            Smaller::Batch {
                batch_size,
                grad_accum,
            } => {
                format!("a smaller --batch-size (e.g. {batch_size} with --grad-accum {grad_accum})")
            }
            Smaller::MaxLen(n) => format!("a shorter --max-len (e.g. {n})"),
            Smaller::Lora => "--method lora instead of full fine-tuning".to_string(),
            Smaller::QuantizedBase => {
                "--base quantized (the base kept in its file's blocks)".to_string()
            }
        })
        .collect();
    if s.is_empty() {
        "close other programs or use a smaller model".to_string()
    } else {
        format!("try {}", s.join(", or "))
    }
}

// ---------------------------------------------------------------------------------------
// Rows to DTOs
// ---------------------------------------------------------------------------------------

fn metric_dto(m: &MetricRow) -> RunMetric {
    RunMetric {
        step: m.step.max(0) as u64,
        kind: if m.kind == "eval" {
            MetricKind::Eval
        } else {
            MetricKind::Train
        },
        loss: m.loss,
        lr: m.lr,
        grad_norm: m.grad_norm,
        tokens_per_s: m.tokens_per_s,
        memory_mb: m.memory_mb,
        at: m.at.clone(),
        pref: m.pref.map(|p| attune_protocol::PrefMetric {
            rewards_chosen: p[0],
            rewards_rejected: p[1],
            margin: p[2],
            accuracy: p[3],
            logps_chosen: p[4],
            logps_rejected: p[5],
        }),
    }
}

fn metric_row(m: &RunMetric) -> MetricRow {
    MetricRow {
        step: m.step as i64,
        kind: match m.kind {
            MetricKind::Train => "train",
            MetricKind::Eval => "eval",
        }
        .to_string(),
        loss: m.loss,
        lr: m.lr,
        grad_norm: m.grad_norm,
        tokens_per_s: m.tokens_per_s,
        memory_mb: m.memory_mb,
        at: m.at.clone(),
        pref: m.pref.map(|p| {
            [
                p.rewards_chosen,
                p.rewards_rejected,
                p.margin,
                p.accuracy,
                p.logps_chosen,
                p.logps_rejected,
            ]
        }),
    }
}

/// The models crate's preference objective for a run's settings.
pub(crate) fn pref_objective(p: &attune_protocol::PreferenceSpec) -> train::pref::PrefObjective {
    use attune_protocol::{PreferenceLoss, PreferenceObjective};
    match p.objective {
        PreferenceObjective::Dpo => train::pref::PrefObjective::Dpo {
            beta: p.beta,
            loss: match p.loss {
                PreferenceLoss::Sigmoid => train::pref::DpoLoss::Sigmoid,
                PreferenceLoss::Hinge => train::pref::DpoLoss::Hinge,
                PreferenceLoss::Ipo => train::pref::DpoLoss::Ipo,
            },
        },
        PreferenceObjective::Orpo => train::pref::PrefObjective::Orpo { beta: p.beta },
    }
}

/// Outcome of the training loop.
enum Outcome {
    Completed(String),
    Paused,
    Cancelled,
}

impl Engine {
    fn run_summary(&self, r: &RunRow) -> Result<RunSummary, EngineError> {
        let db = self.store.path();
        let model = self
            .store
            .get_model(r.model_id)?
            .map(|m| m.name)
            .unwrap_or_default();
        let dataset = self
            .store
            .get_dataset(r.dataset_id)?
            .map(|d| d.name)
            .unwrap_or_default();
        Ok(RunSummary {
            id: r.id,
            name: r.name.clone(),
            model_id: r.model_id,
            model,
            dataset_id: r.dataset_id,
            dataset,
            method: r.method.clone(),
            status: RunStatus::parse(&r.status).ok_or_else(|| {
                EngineError::db(
                    db,
                    format!("run id {}: invalid status '{}'", r.id, r.status),
                )
            })?,
            error: r.error.clone(),
            step: r.step.max(0) as u64,
            total_steps: r.total_steps.max(0) as u64,
            run_dir: r.run_dir.clone(),
            created_at: r.created_at.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
            memory_estimate_mb: r.memory_estimate_mb.max(0) as u64,
        })
    }

    pub(crate) fn run_row(&self, id_or_name: &str) -> Result<RunRow, EngineError> {
        let key = id_or_name.trim();
        if let Ok(id) = key.parse::<i64>() {
            if let Some(r) = self.store.get_run(id)? {
                return Ok(r);
            }
        }
        self.store
            .find_run_by_name(key)?
            .ok_or_else(|| EngineError::RunNotFound(key.to_string()))
    }

    /// A run by id or name.
    pub fn find_run(&self, id_or_name: &str) -> Result<RunSummary, EngineError> {
        self.run_summary(&self.run_row(id_or_name)?)
    }

    /// All runs, oldest first.
    pub fn list_runs(&self) -> Result<Vec<RunSummary>, EngineError> {
        self.store
            .list_runs()?
            .iter()
            .map(|r| self.run_summary(r))
            .collect()
    }

    /// A run with its settings, every metric and its adapter.
    pub fn run_detail(&self, id_or_name: &str) -> Result<RunDetail, EngineError> {
        let r = self.run_row(id_or_name)?;
        let spec: RunSpec = serde_json::from_str(&r.config_json).map_err(|e| {
            EngineError::db(
                self.store.path(),
                format!("run id {}: bad config: {e}", r.id),
            )
        })?;
        let metrics = self
            .store
            .run_metrics(r.id)?
            .iter()
            .map(metric_dto)
            .collect();
        let adapter = self
            .store
            .list_adapters()?
            .into_iter()
            .find(|a| a.run_id == Some(r.id))
            .map(|a| a.name);
        Ok(RunDetail {
            run: self.run_summary(&r)?,
            spec,
            metrics,
            adapter,
        })
    }

    /// The pre-flight of `spec`, shared by the advisor's `check_run` and by `create_run` so
    /// they cannot disagree: the model and dataset, the checked settings, the memory estimate
    /// against what is available, the examples per epoch (rows, or the blocks packing makes)
    /// and the optimizer steps.
    pub(crate) fn plan_run(&self, spec: &RunSpec) -> Result<RunPlan, EngineError> {
        let model = self.find_model(&spec.model)?;
        let dataset = self.find_dataset(&spec.dataset)?;
        let cfg = self.model_shape(&model)?;
        validate(spec, &cfg)?;
        if dataset.train_rows == 0 {
            return Err(EngineError::InvalidInput(format!(
                "dataset '{}' has no training rows",
                dataset.name
            )));
        }
        // The lengths first: tokenizing loads the model into this process's cache, where it
        // stays while the run trains here, so the estimate's `held` must see it.
        let pref_set = self.store.pref_set(dataset.id)?;
        match (&spec.preference, &pref_set) {
            (None, Some(_)) => {
                return Err(EngineError::InvalidInput(format!(
                    "dataset '{}' is a preference set (chosen/rejected pairs): train it with DPO \
                     or ORPO (`attune train --method dpo|orpo`)",
                    dataset.name
                )))
            }
            (Some(p), None) => {
                return Err(EngineError::InvalidInput(format!(
                    "{} trains on a preference set and dataset '{}' holds single answers: import \
                     chosen/rejected pairs (`attune train --data PREFS.jsonl`) or make them from \
                     an arena's votes (`--arena ID`)",
                    p.objective.as_str(),
                    dataset.name
                )))
            }
            (Some(p), Some(_)) => {
                if !(p.beta.is_finite() && p.beta > 0.0) {
                    return Err(EngineError::InvalidInput(format!(
                        "beta {} must be a positive number",
                        p.beta
                    )));
                }
                if spec.pack {
                    return Err(EngineError::InvalidInput(
                        "preference pairs cannot be packed: turn packing off".into(),
                    ));
                }
                return self.plan_preference_run(spec, p, model, dataset, &cfg);
            }
            (None, None) => {}
        }
        let lengths = self.train_lengths(&dataset, &model)?;
        let available = available_memory();
        let (base, memory) = self.choose_base(spec, &model, available, |base| {
            self.run_memory(
                &cfg,
                &spec.method,
                spec.batch_size,
                spec.max_len,
                base,
                &model,
            )
        });
        let fits = available.is_none_or(|a| memory.needed() <= a);
        let rows = lengths.len() as u64;
        let (train_examples, example_tokens) = if spec.pack {
            // Packed rows become blocks of `max_len` tokens: the split makes this many.
            let blocks = train::packed_count(lengths.iter().copied(), spec.max_len);
            (blocks, lengths.iter().sum::<u64>())
        } else {
            let truncated = lengths.iter().map(|&l| l.min(spec.max_len as u64)).sum();
            (dataset.train_rows, truncated)
        };
        let examples_seen = if spec.pack { train_examples } else { rows };
        let mean_example_tokens = if examples_seen > 0 {
            example_tokens as f64 / examples_seen as f64
        } else {
            0.0
        };
        let total_steps = total_steps(spec, train_examples);
        Ok(RunPlan {
            model,
            dataset,
            memory,
            available,
            fits,
            total_steps,
            mean_example_tokens,
            base,
        })
    }

    /// The frozen base's form for `spec` and the estimate with it: the spec's form, else f32
    /// when it fits in `available`, else the most compact form (the quantized blocks of a GGUF
    /// model, bf16 for a Hugging Face folder). Full fine-tuning is always f32.
    fn choose_base(
        &self,
        spec: &RunSpec,
        model: &attune_protocol::ModelSummary,
        available: Option<u64>,
        estimate: impl Fn(BaseFormSpec) -> MemoryEstimate,
    ) -> (BaseFormSpec, MemoryEstimate) {
        if matches!(spec.method, MethodSpec::Full) {
            return (BaseFormSpec::F32, estimate(BaseFormSpec::F32));
        }
        if let Some(b) = spec.base {
            return (b, estimate(b));
        }
        let dense = estimate(BaseFormSpec::F32);
        if available.is_none_or(|a| dense.needed() <= a) {
            return (BaseFormSpec::F32, dense);
        }
        let smallest = match model.format {
            attune_protocol::ModelFormat::Gguf => BaseFormSpec::Quantized,
            attune_protocol::ModelFormat::Safetensors => BaseFormSpec::Bf16,
        };
        (smallest, estimate(smallest))
    }

    /// [`Engine::plan_run`] for a preference run: the pairs as TRL tokenizes them (a pair
    /// whose prompt fills `max_len` is left out), a step of `batch_size` pairs runs
    /// `2 * batch_size` sequences, and DPO on full fine-tuning holds a frozen reference copy.
    fn plan_preference_run(
        &self,
        spec: &RunSpec,
        p: &attune_protocol::PreferenceSpec,
        model: attune_protocol::ModelSummary,
        dataset: attune_protocol::DatasetSummary,
        cfg: &Config,
    ) -> Result<RunPlan, EngineError> {
        let pairs = self.train_pairs(&dataset, &model, spec.max_len)?;
        if pairs.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "every pair of '{}' has a prompt of at least {} tokens: raise the max length",
                dataset.name, spec.max_len
            )));
        }
        let available = available_memory();
        let (base, mut memory) = self.choose_base(spec, &model, available, |base| {
            self.run_memory(
                cfg,
                &spec.method,
                2 * spec.batch_size,
                spec.max_len,
                base,
                &model,
            )
        });
        if p.objective == attune_protocol::PreferenceObjective::Dpo
            && matches!(spec.method, MethodSpec::Full)
        {
            memory = memory.with_reference_copy(cfg);
        }
        let fits = available.is_none_or(|a| memory.needed() <= a);
        let tokens: usize = pairs
            .iter()
            .map(|q| q.chosen.ids.len() + q.rejected.ids.len())
            .sum();
        Ok(RunPlan {
            total_steps: total_steps(spec, pairs.len() as u64),
            mean_example_tokens: tokens as f64 / (2 * pairs.len()) as f64,
            model,
            dataset,
            memory,
            available,
            fits,
            base,
        })
    }

    /// Checks `spec`, estimates its memory and records a queued run. A run that will
    /// not fit in the available memory is refused and nothing is written.
    pub fn create_run(&self, spec: &RunSpec) -> Result<RunSummary, EngineError> {
        self.create_run_row(spec, true)
    }

    /// Checks `spec` and records it as a `paused` run that this process does not train: a
    /// run to export as a bundle for a GPU machine (`export_bundle`), or to resume here later.
    /// Unlike [`Engine::create_run`], a run that would not fit in this machine's memory is
    /// recorded too (its estimate is kept); every other check is the same.
    pub fn create_run_for_export(&self, spec: &RunSpec) -> Result<RunSummary, EngineError> {
        let run = self.create_run_row(spec, false)?;
        self.store
            .finish_run(run.id, "paused", None, &crate::clock::now_rfc3339())?;
        self.find_run(&run.id.to_string())
    }

    fn create_run_row(&self, spec: &RunSpec, require_fit: bool) -> Result<RunSummary, EngineError> {
        let plan = self.plan_run(spec)?;
        if require_fit && !plan.fits {
            let gpu = self
                .model_shape(&plan.model)
                .map(|cfg| {
                    let bytes = crate::bundle::gpu_memory_estimate(
                        &cfg,
                        &spec.method,
                        spec.batch_size,
                        spec.max_len,
                        1,
                    );
                    format!(
                        "; or train it on a GPU machine (about {} GiB of GPU memory): add \
                         --create-only, then `attune runs export ID --engine trl --out DIR`",
                        bytes.div_ceil(1 << 30).max(1)
                    )
                })
                .unwrap_or_default();
            return Err(EngineError::WontFit {
                estimate_mb: plan.memory.needed().div_ceil(1 << 20),
                available_mb: plan.available.unwrap_or(0) >> 20,
                // What to change, from the form the plan took (a run left to the engine that
                // is already on the quantized base is not told to take it).
                suggestion: format!(
                    "{}{gpu}",
                    suggestion(&RunSpec {
                        base: Some(plan.base),
                        ..spec.clone()
                    })
                ),
            });
        }
        let RunPlan {
            model,
            dataset,
            memory: est,
            total_steps: total,
            base,
            ..
        } = plan;
        let name = match spec.name.as_deref().map(str::trim) {
            Some("") => return Err(EngineError::InvalidInput("the run name is empty".into())),
            Some(n) => {
                if n.contains(['/', '\\']) || n.starts_with('.') {
                    return Err(EngineError::InvalidInput(format!(
                        "run name '{n}' must not contain '/' or '\\' or start with '.'"
                    )));
                }
                if self.store.find_run_by_name(n)?.is_some() {
                    return Err(EngineError::NameTaken {
                        what: "a run",
                        name: n.to_string(),
                    });
                }
                if self.store.find_adapter_by_name(n)?.is_some() {
                    return Err(EngineError::NameTaken {
                        what: "an adapter",
                        name: n.to_string(),
                    });
                }
                n.to_string()
            }
            None => {
                let base: String = format!("{}-{}", spec.method.name(), dataset.name)
                    .chars()
                    .map(|c| if c == '/' || c == '\\' { '-' } else { c })
                    .collect();
                let base = base.trim_start_matches('.').to_string();
                let mut name = base.clone();
                let mut n = 2;
                while self.store.find_run_by_name(&name)?.is_some()
                    || self.store.find_adapter_by_name(&name)?.is_some()
                {
                    name = format!("{base}-{n}");
                    n += 1;
                }
                name
            }
        };
        let mut stored = spec.clone();
        stored.name = Some(name.clone());
        // The form chosen now is the one the run trains with, resumed or not.
        if !matches!(spec.method, MethodSpec::Full) {
            stored.base = Some(base);
        }
        let row = RunRow {
            id: 0,
            name,
            model_id: model.id,
            dataset_id: dataset.id,
            dataset_hash: dataset.content_hash.clone(),
            method: spec.method.name().to_string(),
            config_json: serde_json::to_string(&stored)
                .map_err(|e| EngineError::InvalidInput(format!("run spec: {e}")))?,
            status: "queued".into(),
            error: None,
            step: 0,
            total_steps: i64::try_from(total).unwrap_or(i64::MAX),
            memory_estimate_mb: est.total_mb() as i64,
            run_dir: String::new(),
            created_at: crate::clock::now_rfc3339(),
            started_at: None,
            finished_at: None,
            heartbeat_at: None,
            pid: None,
        };
        let runs_dir = self.data_dir.join("runs");
        let row = self.store.insert_run(&row, |id| {
            runs_dir.join(id.to_string()).to_string_lossy().into_owned()
        })?;
        self.run_summary(&row)
    }

    /// Runs left 'running' or 'queued' by a process that no longer runs (a queue lives
    /// in its process's memory) become 'paused', resumable from their last checkpoint.
    /// Called by [`Engine::open`].
    pub fn mark_interrupted_runs(&self) -> Result<Vec<i64>, EngineError> {
        let me = std::process::id() as i64;
        let mut marked = Vec::new();
        for r in self.store.live_runs()? {
            let dead = match r.pid {
                None => true,
                // Queued in this process: its actor holds it.
                Some(pid) if pid == me && r.status == "queued" => false,
                Some(pid) if pid == me => !is_active_here(self.store.path(), r.id),
                Some(pid) => !pid_alive(pid),
            };
            if dead {
                self.store
                    .finish_run(r.id, "paused", None, &crate::clock::now_rfc3339())?;
                marked.push(r.id);
            }
        }
        Ok(marked)
    }

    /// Continues a paused (or failed) run from its newest checkpoint.
    pub fn resume_run(
        &self,
        id_or_name: &str,
        observer: &mut dyn FnMut(RunEvent),
        control: &RunControl,
    ) -> Result<RunSummary, EngineError> {
        self.mark_interrupted_runs()?;
        let r = self.run_row(id_or_name)?;
        if !matches!(r.status.as_str(), "paused" | "failed" | "queued") {
            return Err(EngineError::RunState {
                name: r.name,
                status: r.status,
                reason: "only a paused, failed or queued run can be resumed".into(),
            });
        }
        self.execute_run(r.id, observer, control)
    }

    /// Cancels a run that is not executing: its checkpoints are removed and it becomes
    /// 'cancelled'. (A run executing in this process is cancelled through its
    /// [`RunControl`].)
    pub fn cancel_run(&self, id_or_name: &str) -> Result<RunSummary, EngineError> {
        self.mark_interrupted_runs()?;
        let r = self.run_row(id_or_name)?;
        match r.status.as_str() {
            "running" => {
                return Err(EngineError::RunState {
                    name: r.name,
                    status: r.status,
                    reason: format!(
                    "it is executing in process {}; stop it there (Ctrl-C pauses it), then cancel",
                    r.pid.unwrap_or_default()
                ),
                })
            }
            "completed" | "cancelled" => {
                return Err(EngineError::RunState {
                    name: r.name,
                    status: r.status,
                    reason: "there is nothing to cancel".into(),
                })
            }
            _ => {}
        }
        let _ = std::fs::remove_dir_all(Path::new(&r.run_dir).join("checkpoints"));
        self.store
            .finish_run(r.id, "cancelled", None, &crate::clock::now_rfc3339())?;
        self.find_run(&r.id.to_string())
    }

    /// Parks a queued run that has not started executing: it becomes 'paused' and can be
    /// resumed later. Any other status is refused with the reason.
    pub fn pause_queued_run(&self, id_or_name: &str) -> Result<RunSummary, EngineError> {
        let r = self.run_row(id_or_name)?;
        if r.status != "queued" {
            return Err(EngineError::RunState {
                name: r.name,
                status: r.status,
                reason: "only a queued run can be parked; an executing run pauses through \
                         its control"
                    .into(),
            });
        }
        self.store
            .finish_run(r.id, "paused", None, &crate::clock::now_rfc3339())?;
        self.find_run(&r.id.to_string())
    }

    /// Puts a paused or failed run back in line to execute (status 'queued'; a failed
    /// run's error is cleared). It continues from its newest checkpoint when executed.
    pub fn requeue_run(&self, id_or_name: &str) -> Result<RunSummary, EngineError> {
        self.mark_interrupted_runs()?;
        let r = self.run_row(id_or_name)?;
        match r.status.as_str() {
            "queued" => {}
            "paused" | "failed" => {
                self.store.requeue_run(
                    r.id,
                    std::process::id() as i64,
                    &crate::clock::now_rfc3339(),
                )?;
            }
            _ => {
                return Err(EngineError::RunState {
                    name: r.name,
                    status: r.status,
                    reason: "only a paused, failed or queued run can be resumed".into(),
                })
            }
        }
        self.find_run(&r.id.to_string())
    }

    /// Removes a run that is not executing, its metrics and its directory (the adapter
    /// it produced stays).
    pub fn remove_run(&self, id_or_name: &str) -> Result<(), EngineError> {
        self.mark_interrupted_runs()?;
        let r = self.run_row(id_or_name)?;
        if r.status == "running" {
            return Err(EngineError::RunState {
                name: r.name,
                status: r.status,
                reason: "stop it before removing it".into(),
            });
        }
        self.store.delete_run(r.id)?;
        let _ = std::fs::remove_dir_all(&r.run_dir);
        Ok(())
    }

    /// Executes run `id` on this thread until it completes, pauses, is cancelled or
    /// fails; every outcome is recorded in the library. See the module docs.
    pub fn execute_run(
        &self,
        id: i64,
        observer: &mut dyn FnMut(RunEvent),
        control: &RunControl,
    ) -> Result<RunSummary, EngineError> {
        let r = self
            .store
            .get_run(id)?
            .ok_or_else(|| EngineError::RunNotFound(id.to_string()))?;
        if matches!(r.status.as_str(), "completed" | "cancelled") {
            return Err(EngineError::RunState {
                name: r.name,
                status: r.status,
                reason: "it cannot run again; create a new run".into(),
            });
        }
        if r.status == "running"
            && r.pid
                .is_some_and(|p| p != std::process::id() as i64 && pid_alive(p))
        {
            return Err(EngineError::RunState {
                name: r.name,
                status: r.status,
                reason: format!("it is executing in process {}", r.pid.unwrap_or_default()),
            });
        }
        let Some(_guard) = ActiveGuard::claim(self.store.path(), id) else {
            return Err(EngineError::RunState {
                name: r.name,
                status: r.status,
                reason: "it is already executing in this process".into(),
            });
        };
        let result = self.train_loop(&r, observer, control);
        let now = crate::clock::now_rfc3339();
        let status = match &result {
            Ok(Outcome::Completed(adapter)) => {
                observer(RunEvent::Finished {
                    status: RunStatus::Completed,
                    adapter: Some(adapter.clone()),
                });
                RunStatus::Completed
            }
            Ok(Outcome::Paused) => {
                self.store.finish_run(id, "paused", None, &now)?;
                RunStatus::Paused
            }
            Ok(Outcome::Cancelled) => {
                let _ = std::fs::remove_dir_all(Path::new(&r.run_dir).join("checkpoints"));
                self.store.finish_run(id, "cancelled", None, &now)?;
                RunStatus::Cancelled
            }
            Err(e) => {
                let msg = e.to_string();
                self.store.finish_run(id, "failed", Some(&msg), &now)?;
                RunStatus::Failed
            }
        };
        if status != RunStatus::Completed {
            observer(RunEvent::Finished {
                status,
                adapter: None,
            });
        }
        result?;
        self.find_run(&id.to_string())
    }

    /// A run's model and dataset as they are now: both still registered, the dataset's
    /// content the one the run was planned on, the model's file on disk. Returns them and the
    /// model's path.
    pub(crate) fn run_inputs(
        &self,
        r: &RunRow,
    ) -> Result<(ModelRow, DatasetRecord, PathBuf), EngineError> {
        let model_row = self
            .store
            .get_model(r.model_id)?
            .ok_or_else(|| EngineError::ModelNotFound(r.model_id.to_string()))?;
        let ds = self
            .store
            .get_dataset(r.dataset_id)?
            .ok_or_else(|| EngineError::DatasetNotFound(r.dataset_id.to_string()))?;
        if ds.content_hash != r.dataset_hash {
            return Err(EngineError::DatasetChanged {
                name: ds.name,
                run: r.name.clone(),
                expected: r.dataset_hash.clone(),
                found: ds.content_hash,
            });
        }
        let model_path = PathBuf::from(&model_row.path);
        if !model_path.exists() {
            return Err(EngineError::ModelFileMissing {
                id: model_row.id,
                name: model_row.name,
                path: model_path,
            });
        }
        Ok((model_row, ds, model_path))
    }

    fn train_loop(
        &self,
        r: &RunRow,
        observer: &mut dyn FnMut(RunEvent),
        control: &RunControl,
    ) -> Result<Outcome, EngineError> {
        let terr = |e: attune_models::Error| EngineError::Training {
            run: r.name.clone(),
            message: e.to_string(),
        };
        let spec: RunSpec = serde_json::from_str(&r.config_json).map_err(|e| {
            EngineError::db(
                self.store.path(),
                format!("run id {}: bad config: {e}", r.id),
            )
        })?;
        let (model_row, ds, model_path) = self.run_inputs(r)?;
        attune_models::tune_allocator();
        let run_dir = PathBuf::from(&r.run_dir);
        let ckpt_root = run_dir.join("checkpoints");
        std::fs::create_dir_all(&ckpt_root).map_err(|source| EngineError::Io {
            path: ckpt_root.clone(),
            source,
        })?;
        clean_temp_dirs(&ckpt_root);
        // Auto: `train::prepare` runs the products in bf16 on the CPU's matrix units where it
        // has them (LoRA's and prompt tuning's frozen base; full fine-tuning's f32 master
        // weights packed every step), in int8 where it has AVX-512 VNNI and no AMX (the frozen
        // base; full fine-tuning's master weights quantized every step), f32 elsewhere. Full
        // fine-tuning without bf16 products loads in F32: no quantized or packed copies to
        // build and drop; where its products run in int8 the layers are then switched to `Auto`
        // (which builds nothing without AMX), so `train::prepare` takes the int8 path.
        // So does preference training of the full model: its frozen reference copy scores
        // with the inference kernels, and with bf16 products the policy's log-probabilities of
        // the answers parted from the copy's by ~0.23 nats at step 1 (DPO's loss 0.682 against
        // ln 2 at beta 0.1), a bias in every reward; in f32 they agree to 1e-4. (Its memory
        // estimate still counts the bf16 packings: an upper bound.)
        let full_f32 = matches!(spec.method, MethodSpec::Full)
            && (!bf16_products(&spec.method) || spec.preference.is_some());
        let full_int8 = int8_full_fine_tuning(&spec.method) && spec.preference.is_none();
        // A compact base (LoRA, prompt tuning) loads with its quantized blocks only and is then
        // held in its form: no dense or packed copy of the whole model is ever built.
        let compact = match (&spec.method, spec.base) {
            (MethodSpec::Full, _) | (_, None | Some(BaseFormSpec::F32)) => None,
            (_, Some(BaseFormSpec::Bf16)) => Some(attune_models::linear::BaseForm::Bf16),
            (_, Some(BaseFormSpec::Quantized)) => Some(attune_models::linear::BaseForm::Quantized),
        };
        let loaded: LoadedModel = attune_models::loader::load_on_selected(
            &model_path,
            &LoadOptions {
                compute: match (full_f32, compact) {
                    (true, _) => ComputeMode::F32,
                    (false, Some(_)) => ComputeMode::Quantized,
                    (false, None) => ComputeMode::Auto,
                },
            },
        )
        .and_then(|mut m| {
            if let Some(form) = compact {
                m.model.set_base_form(form)?;
            }
            if full_int8 {
                m.model.set_compute_mode(ComputeMode::Auto)?;
            }
            Ok(m)
        })
        .map_err(|source| EngineError::ModelLoad {
            name: model_row.name.clone(),
            path: model_path.clone(),
            source: Box::new(source),
        })?;
        let LoadedModel {
            model: mut llama,
            tokenizer: tok,
            chat_template: tmpl,
            ..
        } = loaded;
        let pad_id = tok.eos_token_ids().first().copied().unwrap_or(0);
        let opts = RenderOptions {
            loss_on: models_loss(spec.loss_on),
            max_len: spec.max_len,
        };
        // Packing cuts the stream of whole rows into blocks instead of cutting each row.
        let train_opts = RenderOptions {
            max_len: if spec.pack {
                usize::MAX / 2
            } else {
                spec.max_len
            },
            ..opts
        };
        let render_split = |split: SplitName, limit: Option<usize>, opts: &RenderOptions| {
            let rows = self.dataset_rows(ds.id, split)?;
            rows.iter()
                .take(limit.unwrap_or(usize::MAX))
                .enumerate()
                .map(|(i, row)| {
                    render_sample(&tok, &tmpl, &row.sample, opts).map_err(|e| {
                        EngineError::InvalidDataset {
                            path: PathBuf::from(&ds.source_path),
                            reason: format!(
                                "'{}' {} row {i} cannot be rendered: {e}",
                                ds.name,
                                split.as_str()
                            ),
                        }
                    })
                })
                .collect::<Result<Vec<Example>, EngineError>>()
        };
        let pref_pairs = match &spec.preference {
            Some(_) => {
                let rows = self.store.dataset_rows(ds.id, "train")?;
                Some(crate::prefs::render_rows(&tok, &tmpl, &rows, spec.max_len, &ds.name)?.0)
            }
            None => None,
        };
        let mut train_examples = match pref_pairs {
            Some(_) => Vec::new(),
            None => render_split(SplitName::Train, None, &train_opts)?,
        };
        if spec.pack {
            train_examples = train::pack_all(&train_examples, spec.max_len);
        }
        // A preference set's rows are pairs, not samples: its evaluation scores the prompts
        // with their chosen answers (the NLL of the preferred answers).
        let eval_examples = match &spec.preference {
            Some(_) => {
                let rows = self.store.dataset_rows(ds.id, spec.eval_split.as_str())?;
                let rows = &rows[..rows.len().min(spec.eval_limit.unwrap_or(usize::MAX))];
                crate::prefs::chosen_samples(rows, &ds.name)?
                    .iter()
                    .enumerate()
                    .map(|(i, sample)| {
                        render_sample(&tok, &tmpl, sample, &opts).map_err(|e| {
                            EngineError::InvalidDataset {
                                path: PathBuf::from(&ds.source_path),
                                reason: format!(
                                    "'{}' {} pair {i} cannot be rendered: {e}",
                                    ds.name,
                                    spec.eval_split.as_str()
                                ),
                            }
                        })
                    })
                    .collect::<Result<Vec<Example>, EngineError>>()?
            }
            None => render_split(spec.eval_split, spec.eval_limit, &opts)?,
        };
        let general = if spec.forgetting_rows > 0 {
            general_examples(&tok, &tmpl, spec.forgetting_rows).map_err(terr)?
        } else {
            Vec::new()
        };
        let method = to_method(&spec.method);
        let trainable = train::prepare(&mut llama, &tok, &method, spec.seed).map_err(terr)?;
        let total = r.total_steps.max(1) as usize;
        let config = train::TrainConfig {
            batch_size: spec.batch_size,
            grad_accum: spec.grad_accum,
            steps: total,
            optimizer: train::AdamWConfig {
                weight_decay: spec.weight_decay,
                ..Default::default()
            },
            schedule: train::Schedule {
                kind: match spec.schedule {
                    LrSchedule::Cosine => train::ScheduleKind::Cosine,
                    LrSchedule::Linear => train::ScheduleKind::Linear,
                    LrSchedule::Constant => train::ScheduleKind::Constant,
                },
                peak_lr: spec.lr.unwrap_or_else(|| spec.method.default_lr()),
                warmup_steps: spec.warmup_steps,
                total_steps: total,
                final_frac: spec.final_lr_fraction,
            },
            max_grad_norm: spec.max_grad_norm,
            seed: spec.seed,
            shuffle: true,
        };
        let mut trainer = match (pref_pairs, &spec.preference) {
            (Some(pairs), Some(p)) => {
                let objective = pref_objective(p);
                let reference = match (&objective, &spec.method) {
                    (train::pref::PrefObjective::Orpo { .. }, _) => train::pref::Reference::None,
                    (_, MethodSpec::Full) => {
                        // A frozen copy of the starting model, as the memory estimate counts.
                        let copy = attune_models::loader::load_on_selected(
                            &model_path,
                            &LoadOptions {
                                compute: ComputeMode::F32,
                            },
                        )
                        .map_err(|source| EngineError::ModelLoad {
                            name: model_row.name.clone(),
                            path: model_path.clone(),
                            source: Box::new(source),
                        })?;
                        let mut m = copy.model;
                        m.set_layer_fusion(attune_models::llama::LayerFusion::All);
                        train::pref::Reference::Copy(Box::new(m))
                    }
                    _ => train::pref::Reference::AdapterOff,
                };
                train::Trainer::new_preference(
                    llama, trainable, config, objective, reference, pairs, pad_id,
                )
                .map_err(terr)?
            }
            _ => train::Trainer::new(llama, trainable, config, train_examples, pad_id)
                .map_err(terr)?,
        };
        if let Some((_, dir)) = train::checkpoint::latest(&ckpt_root) {
            trainer.load_checkpoint(&dir).map_err(terr)?;
        }
        let start = trainer.step();
        self.store.start_run(
            r.id,
            std::process::id() as i64,
            start as i64,
            &crate::clock::now_rfc3339(),
        )?;
        observer(RunEvent::Started {
            run_id: r.id,
            step: start as u64,
            total_steps: total as u64,
        });
        let baseline_path = run_dir.join("baseline.json");
        let evaluate =
            |trainer: &train::Trainer, examples: &[Example]| -> Result<Option<f64>, EngineError> {
                if examples.is_empty() {
                    return Ok(None);
                }
                let (sum, n) = trainer
                    .evaluate(examples, |_, _| !control.is_cancelled())
                    .map_err(terr)?;
                Ok(mean(sum, n))
            };
        let record_eval = |step: usize,
                           loss: Option<f64>,
                           observer: &mut dyn FnMut(RunEvent)|
         -> Result<(), EngineError> {
            if let Some(loss) = loss {
                let (rss, _) = process_memory_mb();
                self.store.record_metric(
                    r.id,
                    &MetricRow {
                        step: step as i64,
                        kind: "eval".into(),
                        loss,
                        lr: None,
                        grad_norm: None,
                        tokens_per_s: None,
                        memory_mb: rss,
                        at: crate::clock::now_rfc3339(),
                        pref: None,
                    },
                )?;
                observer(RunEvent::Eval {
                    step: step as u64,
                    loss,
                });
            }
            Ok(())
        };
        if start == 0 {
            let before = evaluate(&trainer, &eval_examples)?;
            record_eval(0, before, observer)?;
            let general_before = evaluate(&trainer, &general)?;
            let text = serde_json::json!({ "general_nll_before": general_before }).to_string();
            std::fs::write(&baseline_path, text).map_err(|source| EngineError::Io {
                path: baseline_path.clone(),
                source,
            })?;
        }
        while trainer.step() < total {
            if control.is_cancelled() {
                return Ok(Outcome::Cancelled);
            }
            if control.is_paused() {
                trainer
                    .save_checkpoint(&ckpt_root, KEEP_CHECKPOINTS)
                    .map_err(terr)?;
                observer(RunEvent::Checkpoint {
                    step: trainer.step() as u64,
                });
                return Ok(Outcome::Paused);
            }
            let m = trainer.train_step().map_err(terr)?;
            if !m.loss.is_finite() {
                return Err(EngineError::Training {
                    run: r.name.clone(),
                    message: format!(
                        "the loss became {} at step {}; lower the learning rate",
                        m.loss, m.step
                    ),
                });
            }
            let (rss, _) = process_memory_mb();
            let metric = RunMetric {
                step: m.step as u64,
                kind: MetricKind::Train,
                loss: m.loss,
                lr: Some(m.lr),
                grad_norm: Some(m.grad_norm),
                tokens_per_s: (m.seconds > 0.0).then(|| m.tokens as f64 / m.seconds),
                memory_mb: rss,
                at: crate::clock::now_rfc3339(),
                pref: m.pref.as_ref().map(|p| attune_protocol::PrefMetric {
                    rewards_chosen: p.rewards_chosen,
                    rewards_rejected: p.rewards_rejected,
                    margin: p.margin,
                    accuracy: p.accuracy,
                    logps_chosen: p.logps_chosen,
                    logps_rejected: p.logps_rejected,
                }),
            };
            self.store.record_metric(r.id, &metric_row(&metric))?;
            observer(RunEvent::Step { metric });
            let step = trainer.step();
            if step < total {
                if spec.eval_every > 0 && step % spec.eval_every == 0 {
                    let loss = evaluate(&trainer, &eval_examples)?;
                    record_eval(step, loss, observer)?;
                }
                if spec.checkpoint_every > 0 && step % spec.checkpoint_every == 0 {
                    trainer
                        .save_checkpoint(&ckpt_root, KEEP_CHECKPOINTS)
                        .map_err(terr)?;
                    observer(RunEvent::Checkpoint { step: step as u64 });
                }
            }
        }
        // The end: evaluate, measure forgetting, write and register the artifact.
        let after = evaluate(&trainer, &eval_examples)?;
        record_eval(total, after, observer)?;
        let general_after = evaluate(&trainer, &general)?;
        let general_before = std::fs::read_to_string(&baseline_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["general_nll_before"].as_f64());
        let eval_before = self
            .store
            .run_metrics(r.id)?
            .iter()
            .find(|m| m.kind == "eval" && m.step == 0)
            .map(|m| m.loss);
        let metrics = AdapterMetrics {
            steps: total as u64,
            eval_nll_before: eval_before,
            eval_nll_after: after,
            general_nll_before: general_before,
            general_nll_after: general_after,
            forgetting_warning: match (general_before, general_after) {
                (Some(b), Some(a)) => forgetting_warning(b, a),
                _ => None,
            },
        };
        let base_name = model_row
            .source_repo
            .clone()
            .unwrap_or_else(|| model_row.name.clone());
        let dst = self.data_dir.join("adapters").join(&r.name);
        crate::adapters::publish_dir(&dst, |tmp| {
            match &trainer.trainable.method {
                train::Method::Lora(cfg) => {
                    train::peft::save_lora(&trainer.model, cfg, &base_name, tmp).map_err(terr)?
                }
                train::Method::Prompt(cfg) => {
                    let prefix =
                        trainer
                            .trainable
                            .prefix
                            .as_ref()
                            .ok_or_else(|| EngineError::Training {
                                run: r.name.clone(),
                                message: "prompt tuning produced no soft prompt".into(),
                            })?;
                    train::peft::save_prompt(
                        prefix.as_tensor(),
                        cfg,
                        &trainer.model,
                        &base_name,
                        tmp,
                    )
                    .map_err(terr)?
                }
                train::Method::Full => {
                    crate::adapters::save_hf_folder(&trainer.model, &tok, &tmpl, tmp)
                        .map_err(terr)?
                }
            }
            Ok(())
        })?;
        let adapter = AdapterRow {
            id: 0,
            name: r.name.clone(),
            kind: spec.method.name().to_string(),
            base_model_id: model_row.id,
            run_id: Some(r.id),
            dataset_id: Some(ds.id),
            path: dst.to_string_lossy().into_owned(),
            created_at: crate::clock::now_rfc3339(),
            metrics_json: serde_json::to_string(&metrics).unwrap_or_else(|_| "{}".into()),
        };
        if let Err(e) = self
            .store
            .complete_run(r.id, &adapter, &crate::clock::now_rfc3339())
        {
            let _ = std::fs::remove_dir_all(&dst);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(&ckpt_root);
        Ok(Outcome::Completed(r.name.clone()))
    }
}

/// Removes temporary checkpoint directories a crash left (`.tmp-*`).
fn clean_temp_dirs(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Names of the steps with a complete checkpoint under `root` (tests).
#[cfg(test)]
pub(crate) fn checkpoint_entries(root: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
