//! The method advisor: what this machine has ([`machine_info`]), what each way of
//! adapting a model (full fine-tuning, LoRA, soft prompt, prompt template) would cost on
//! it ([`Engine::advise`]), and "will it fit" for a run about to start
//! ([`Engine::check_run`]).
//!
//! Memory comes from the engine's own estimate ([`estimate_memory`]), the figure a run
//! is refused on. Throughput is **measured** where this library already trained the
//! same model with the same method (the median `tokens_per_s` of the completed runs'
//! train steps), else a **benchmark** figure scaled by model size and thread count: the rate
//! of real `attune train` runs of SmolLM2-135M with the advisor's preset (batch 4, PubMedQA
//! rows up to 1024 tokens) on a 2-thread Xeon, the median of steps 2-10 as the measured path
//! would take it. With AMX (bf16 products; 2026-12-05, `scripts/measure-advisor-throughput.sh`,
//! twice): LoRA 513 / 550, soft prompt 602 / 601, full 352 / 251 tokens/s, taken as 500 / 550
//! / 300 (a step's rate moves by 2x with the machine's load and the batch's lengths). Without
//! AMX (f32 products; the same script on a Xeon whose VM hides AMX, 2026-12-05 evening, twice,
//! after the f32 products moved onto the kernels' pool): LoRA 335 / 347, soft prompt 370 / 380,
//! full 269 / 271 tokens/s, taken as 340 / 370 / 270 (the afternoon's 301 / 325 / 237 ran the
//! products on the gemm crate's rayon threads; 2026-11-28's 184 / 201 / 153 predate the fused
//! training layer's f32 path). Without AMX but with AVX-512 VNNI, LoRA and prompt tuning train
//! on int8 products (`attune_models::train::int8_frozen_base`; the same script, same machine,
//! 2026-12-05 19:20Z, twice): LoRA 459 / 487, soft prompt 518 / 510, full (f32) 267 / 257
//! tokens/s, taken as 470 / 510 / 270; full fine-tuning on int8 products too
//! (`attune_models::train::int8_full_fine_tuning`; same script and machine, 2026-12-05 22:10Z,
//! twice): 377 / 383, taken as 380 (LoRA 467 / 464 and soft prompt 513 / 492 in those runs).
//! The bench's
//! 256-token packed blocks run faster than real rows with AMX (857 / 906 / 392 in the same
//! session), so its figures are not used. Token counts come from the dataset rendered with the model's
//! chat template, exactly as training renders it; they are cached per dataset content
//! and model, so asking twice costs nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use attune_models::config::Config;
use attune_models::train::RenderOptions;
use attune_protocol::{
    Advice, AdvisorGoal, BaseFormEstimate, BaseFormSpec, DatasetSummary, DomainCount, LossOn,
    MachineInfo, MethodEstimate, MethodSpec, ModelFormat, ModelSource, ModelSummary, RunCheck,
    RunSpec, RunStatus, SplitName,
};

use crate::error::EngineError;
use crate::runs::{
    available_memory, meminfo_field, model_config, models_loss, render_sample, trainable_params,
    Smaller,
};
use crate::Engine;

/// Parameters of the benchmark model (SmolLM2-135M).
const BENCH_PARAMS: f64 = 134_515_008.0;
/// Threads of the benchmark machine.
const BENCH_THREADS: f64 = 2.0;
/// The preset batch size.
const PRESET_BATCH: usize = 4;
/// The preset's longest row, in tokens.
const PRESET_MAX_LEN_CAP: usize = 1024;
/// Fewer training rows than this: a template with a few examples beats training.
pub const MIN_TRAINING_ROWS: u64 = 50;
/// Full fine-tuning needs at least this many rows to be worth its cost.
pub const FULL_MIN_ROWS: u64 = 2000;
/// Full fine-tuning is recommended only when its peak stays under this share of the
/// available memory.
const FULL_MEMORY_MARGIN: f64 = 0.7;
/// LoRA above this share of the available memory counts as "memory is tight".
const TIGHT_MEMORY: f64 = 0.8;
/// Fixed runtime overhead of inference (tokenizer, buffers, the app).
const INFERENCE_OVERHEAD: u64 = 300 << 20;

/// Training throughput on the benchmark machine, tokens/s (see the module docs).
fn benchmark_tokens_per_s(method: &str) -> f64 {
    benchmark_tokens_per_s_on(method, Products::here(method))
}

/// What a training run's products run on, as `train::prepare` decides for this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Products {
    /// bf16 on the AMX tiles (every method).
    Amx,
    /// int8 on AVX-512 VNNI (no AMX): LoRA's and prompt tuning's frozen base, full
    /// fine-tuning's master weights quantized every step.
    Int8,
    /// f32 everywhere.
    F32,
}

impl Products {
    /// What this CPU's runs of `method` take (bf16 with AMX; else int8 where `train::prepare`
    /// takes it for the method; else f32).
    fn here(method: &str) -> Self {
        let int8 = match method {
            "full" => attune_models::train::int8_full_fine_tuning(),
            _ => attune_models::train::int8_frozen_base(),
        };
        if attune_models::kernels::amx::available() {
            Products::Amx
        } else if int8 {
            Products::Int8
        } else {
            Products::F32
        }
    }
}

/// [`benchmark_tokens_per_s`] for `products`.
fn benchmark_tokens_per_s_on(method: &str, products: Products) -> f64 {
    match (method, products) {
        ("full", Products::Amx) => 300.0,
        ("prompt", Products::Amx) => 550.0,
        (_, Products::Amx) => 500.0,
        ("full", Products::Int8) => 380.0,
        ("full", Products::F32) => 270.0,
        ("prompt", Products::Int8) => 510.0,
        (_, Products::Int8) => 470.0,
        ("prompt", Products::F32) => 370.0,
        (_, Products::F32) => 340.0,
    }
}

/// The benchmark figure for `method`, scaled to a model of `params` parameters and a
/// machine with `threads` threads (time per token grows with the parameters; threads
/// share the matrix work).
pub fn benchmark_throughput(method: &str, params: u64, threads: u64) -> f64 {
    let params = (params.max(1)) as f64;
    let threads = threads.max(1) as f64;
    benchmark_tokens_per_s(method) * (BENCH_PARAMS / params) * (threads / BENCH_THREADS)
}

// ---------------------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------------------

/// SIMD extensions worth naming, in the order they are listed.
const SIMD_FLAGS: &[&str] = &[
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "asimd",
    "sve",
];

/// What this machine has: the CPU, the threads the engine uses, memory (from
/// /proc/meminfo), GPU (none: this build computes on the CPU only), SIMD flags and the
/// operating system.
pub fn machine_info() -> MachineInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let (cpu, simd) = parse_cpuinfo(&cpuinfo);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = meminfo_field(&meminfo, "MemTotal:").unwrap_or(0);
    let available = meminfo_field(&meminfo, "MemAvailable:").unwrap_or(0);
    MachineInfo {
        cpu: cpu.unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        threads: candle_core::utils::get_num_threads() as u64,
        memory_total_mb: total >> 20,
        memory_available_mb: available >> 20,
        // candle's cuda and metal features are off in this build.
        gpu: None,
        simd,
        os: os_name(),
    }
}

/// (CPU model, SIMD flags) from the text of /proc/cpuinfo.
fn parse_cpuinfo(text: &str) -> (Option<String>, Vec<String>) {
    let field = |keys: &[&str]| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            let v = v.trim();
            (keys.contains(&k.trim()) && !v.is_empty()).then(|| v.to_string())
        })
    };
    let cpu = field(&["model name", "Hardware", "Processor", "cpu model"]);
    let flags = field(&["flags", "Features"]).unwrap_or_default();
    let present: Vec<&str> = flags.split_whitespace().collect();
    let simd = SIMD_FLAGS
        .iter()
        .filter(|f| present.contains(f))
        .map(|f| f.to_string())
        .collect();
    (cpu, simd)
}

/// "Ubuntu 24.04.1 LTS (linux x86_64)", or "linux x86_64" without /etc/os-release.
fn os_name() -> String {
    let base = format!("{} {}", std::env::consts::OS, std::env::consts::ARCH);
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .filter(|v| !v.is_empty());
    match pretty {
        Some(p) => format!("{p} ({base})"),
        None => base,
    }
}

// ---------------------------------------------------------------------------------------
// Token counts
// ---------------------------------------------------------------------------------------

/// (database, dataset id, dataset content hash, model sha256) -> train row lengths.
type LengthKey = (PathBuf, i64, String, String);

/// Token lengths of train rows, per dataset content and model.
static LENGTHS: Mutex<Option<HashMap<LengthKey, Arc<Vec<u64>>>>> = Mutex::new(None);

/// Token figures of a training split at one max length.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tokens {
    rows: u64,
    /// Tokens of one epoch after truncation to the max length.
    per_epoch: u64,
    /// The longest row before truncation.
    longest: u64,
}

fn tokens_at(lengths: &[u64], max_len: usize) -> Tokens {
    Tokens {
        rows: lengths.len() as u64,
        per_epoch: lengths.iter().map(|&l| l.min(max_len as u64)).sum(),
        longest: lengths.iter().copied().max().unwrap_or(0),
    }
}

/// The preset max length: the longest row rounded up to a multiple of 64, capped at
/// 1024 and at the model's context.
fn preset_max_len(longest: u64, context: usize) -> usize {
    let rounded = (longest.max(64)).div_ceil(64) * 64;
    (rounded as usize)
        .min(PRESET_MAX_LEN_CAP)
        .min(context.max(2))
}

pub(crate) fn model_path(m: &ModelSummary) -> PathBuf {
    match &m.source {
        ModelSource::Local { path } | ModelSource::Hub { path, .. } => PathBuf::from(path),
    }
}

/// Median of `values` (None when empty); NaNs are ignored.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite() && *v > 0.0);
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

// ---------------------------------------------------------------------------------------
// Recommendation
// ---------------------------------------------------------------------------------------

/// What the recommendation is decided on.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub api_only: bool,
    /// Training rows of the chosen dataset (None: no dataset).
    pub train_rows: Option<u64>,
    pub domains: DomainCount,
    /// Available memory in MiB (None: unknown, everything is taken to fit).
    pub available_mb: Option<u64>,
    pub full_mb: u64,
    pub lora_mb: u64,
    pub prompt_mb: u64,
    pub template_mb: u64,
}

impl Facts {
    fn fits(&self, mb: u64) -> bool {
        self.available_mb.is_none_or(|a| mb <= a)
    }

    fn within(&self, mb: u64, share: f64) -> bool {
        self.available_mb
            .is_none_or(|a| (mb as f64) <= share * a as f64)
    }
}

/// The recommended method ("full", "lora", "prompt" or "template") and why, in plain
/// sentences.
pub fn recommend(f: &Facts) -> (String, Vec<String>) {
    let mut reasons = Vec::new();
    let free = f
        .available_mb
        .map(|a| format!("{a} MB"))
        .unwrap_or_else(|| "an unknown amount of".to_string());
    if f.api_only {
        reasons.push(
            "You only reach this model through an API, so its weights cannot be changed: a \
             prompt template (instructions and worked examples sent with every question) is \
             the way to adapt it."
                .to_string(),
        );
        return ("template".into(), reasons);
    }
    let Some(rows) = f.train_rows else {
        reasons.push(
            "No dataset was chosen. Training needs example conversations to learn from; \
             start with a prompt template that gives the model your instructions and a few \
             worked examples."
                .to_string(),
        );
        return ("template".into(), reasons);
    };
    if rows < MIN_TRAINING_ROWS {
        reasons.push(format!(
            "The dataset has only {rows} training examples. Training needs at least about \
             {MIN_TRAINING_ROWS} to learn reliably; putting a few of them into a prompt \
             template as worked examples works better at this size."
        ));
        return ("template".into(), reasons);
    }
    let (full, lora, prompt) = (f.fits(f.full_mb), f.fits(f.lora_mb), f.fits(f.prompt_mb));
    if !full && !lora && !prompt {
        reasons.push(format!(
            "None of the training methods fits in this machine's free memory ({free}): the \
             smallest needs about {} MB. A prompt template needs only about {} MB.",
            f.prompt_mb.min(f.lora_mb).min(f.full_mb),
            f.template_mb
        ));
        reasons.push(
            "Closing other programs, or choosing a smaller model, would make training possible."
                .to_string(),
        );
        return ("template".into(), reasons);
    }
    if f.domains == DomainCount::Several {
        reasons.push(
            "You want to serve several domains: one base model can carry a small, separate \
             adapter per domain, swapped in when needed, instead of one full copy of the \
             model per domain."
                .to_string(),
        );
        if lora && f.within(f.lora_mb, TIGHT_MEMORY) {
            reasons.push(format!(
                "LoRA trains a few million extra weights per domain (a few MB on disk each) \
                 and needs about {} MB while training, which fits in the {free} free.",
                f.lora_mb
            ));
            return ("lora".into(), reasons);
        }
        if prompt {
            reasons.push(format!(
                "Memory is tight ({free} free, LoRA would need about {} MB): a soft prompt is \
                 the lightest adapter (about {} MB while training) and still one per domain.",
                f.lora_mb, f.prompt_mb
            ));
            return ("prompt".into(), reasons);
        }
        reasons.push(format!(
            "LoRA needs about {} MB, close to the {free} free: close other programs while \
             it trains.",
            f.lora_mb
        ));
        return ("lora".into(), reasons);
    }
    if full && f.within(f.full_mb, FULL_MEMORY_MARGIN) && rows >= FULL_MIN_ROWS {
        reasons.push(format!(
            "The dataset is large ({rows} training examples) and covers one domain: \
             retraining every weight of the model can learn the most from it."
        ));
        reasons.push(format!(
            "Full fine-tuning needs about {} MB while training, comfortably within the \
             {free} free.",
            f.full_mb
        ));
        reasons.push(
            "It produces a whole new model (as large as the original) and can make the model \
             forget some general skills; the forgetting check watches for that."
                .to_string(),
        );
        return ("full".into(), reasons);
    }
    if lora {
        if rows < FULL_MIN_ROWS {
            reasons.push(format!(
                "With {rows} training examples, LoRA learns the domain while leaving the \
                 original model untouched; full fine-tuning pays off from about \
                 {FULL_MIN_ROWS} examples."
            ));
        } else if !f.within(f.full_mb, FULL_MEMORY_MARGIN) {
            reasons.push(format!(
                "Full fine-tuning would need about {} MB, too close to the {free} free; LoRA \
                 needs about {} MB.",
                f.full_mb, f.lora_mb
            ));
        }
        reasons.push(
            "LoRA trains small add-on weights (a few MB on disk), is quick to train and is \
             unlikely to make the model forget general skills."
                .to_string(),
        );
        return ("lora".into(), reasons);
    }
    if prompt {
        reasons.push(format!(
            "Only a soft prompt fits in the {free} free (about {} MB while training; LoRA \
             would need about {} MB). It learns a short hidden instruction in front of every \
             question.",
            f.prompt_mb, f.lora_mb
        ));
        return ("prompt".into(), reasons);
    }
    reasons.push(format!(
        "Full fine-tuning is the only training method that fits ({} MB of {free} free).",
        f.full_mb
    ));
    ("full".into(), reasons)
}

/// The advisor's preset for `method`: LoRA r 16 alpha 32 on every projection (lr 2e-4),
/// a soft prompt of 20 virtual tokens (lr 3e-2) or full fine-tuning (lr 2e-5); batch 4.
/// Training speed with the frozen base held in `form`, relative to the f32 form: the compact
/// forms expand the base panel by panel inside every product. Measured with the training
/// bench on the default model (`ATTUNE_BENCH_BASE`, see README "Training on a quantized
/// base").
pub fn compact_base_speed(form: BaseFormSpec) -> f64 {
    match form {
        BaseFormSpec::F32 => 1.0,
        BaseFormSpec::Bf16 => BF16_BASE_SPEED,
        BaseFormSpec::Quantized => QUANTIZED_BASE_SPEED,
    }
}

/// Training tokens/s on a bf16 base over the f32 base's (see [`compact_base_speed`]): the
/// training bench on the default model, 2026-12-04 16:25 UTC, idle 2-core Xeon with AMX, batch
/// 4 x 256: LoRA 424.9 / 561.0 (0.76), prompt tuning 480.7 / 677.1 (0.71); the lower one.
pub const BF16_BASE_SPEED: f64 = 0.71;
/// The same for the quantized base: LoRA 440.1 / 561.0 (0.78), prompt tuning 492.9 / 677.1
/// (0.73).
pub const QUANTIZED_BASE_SPEED: f64 = 0.73;

/// "in bf16" / "in its quantized blocks".
fn base_form_words(form: BaseFormSpec) -> &'static str {
    match form {
        BaseFormSpec::F32 => "in f32",
        BaseFormSpec::Bf16 => "in bf16",
        BaseFormSpec::Quantized => "in its quantized blocks",
    }
}

pub fn preset(method: &str, model: &str, dataset: &str, max_len: usize) -> RunSpec {
    let method = match method {
        "full" => MethodSpec::Full,
        "prompt" => MethodSpec::Prompt {
            virtual_tokens: 20,
            init_text: None,
        },
        _ => MethodSpec::lora_default(),
    };
    RunSpec {
        model: model.to_string(),
        dataset: dataset.to_string(),
        lr: Some(method.default_lr()),
        method,
        batch_size: PRESET_BATCH,
        max_len,
        ..Default::default()
    }
}

/// Memory (bytes) inference needs: the weights as stored plus the f32 copy used for
/// prompt processing (GGUF), or the f32 weights (safetensors), and a runtime overhead.
fn inference_memory(model: &ModelSummary) -> u64 {
    let f32_weights = 4 * model.parameters;
    let stored = match model.format {
        ModelFormat::Gguf => model.file_size,
        ModelFormat::Safetensors => 0,
    };
    stored + f32_weights + INFERENCE_OVERHEAD
}

fn minutes(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{} s", seconds.round().max(1.0))
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}

fn method_title(method: &str) -> &'static str {
    match method {
        "full" => "Full fine-tuning",
        "lora" => "LoRA",
        "prompt" => "Soft prompt",
        _ => "Prompt template",
    }
}

impl Engine {
    /// The median training throughput (tokens/s) of this library's completed runs of
    /// `method` on `model_id`, over every recorded train step; None without such runs.
    pub fn measured_throughput(
        &self,
        model_id: i64,
        method: &str,
    ) -> Result<Option<f64>, EngineError> {
        let mut values = Vec::new();
        for r in self.store.list_runs()? {
            if r.model_id != model_id
                || r.method != method
                || r.status != RunStatus::Completed.as_str()
            {
                continue;
            }
            values.extend(
                self.store
                    .run_metrics(r.id)?
                    .into_iter()
                    .filter(|m| m.kind == "train")
                    .filter_map(|m| m.tokens_per_s),
            );
        }
        Ok(median(values))
    }

    /// (tokens/s, "measured" | "benchmark") for `method` on `model`.
    fn throughput(
        &self,
        model: &ModelSummary,
        method: &str,
        threads: u64,
    ) -> Result<(f64, &'static str), EngineError> {
        Ok(match self.measured_throughput(model.id, method)? {
            Some(t) => (t, "measured"),
            None => (
                benchmark_throughput(method, model.parameters, threads),
                "benchmark",
            ),
        })
    }

    pub(crate) fn model_shape(&self, model: &ModelSummary) -> Result<Config, EngineError> {
        let path = model_path(model);
        if !path.exists() {
            return Err(EngineError::ModelFileMissing {
                id: model.id,
                name: model.name.clone(),
                path,
            });
        }
        model_config(&path).map_err(|source| EngineError::ModelLoad {
            name: model.name.clone(),
            path: path.clone(),
            source: Box::new(source),
        })
    }

    /// Token length (before truncation) of every train row of `ds` under `model`'s
    /// tokenizer and chat template; cached per dataset content and model.
    pub(crate) fn train_lengths(
        &self,
        ds: &DatasetSummary,
        model: &ModelSummary,
    ) -> Result<Arc<Vec<u64>>, EngineError> {
        let key: LengthKey = (
            self.store.path().to_path_buf(),
            ds.id,
            ds.content_hash.clone(),
            model.sha256.clone(),
        );
        {
            let cache = LENGTHS.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = cache.as_ref().and_then(|c| c.get(&key)) {
                return Ok(Arc::clone(hit));
            }
        }
        // Tokenizer and chat template only: loading the weights here would keep a whole
        // model in the engine's cache (in `attune train`, beside the one that trains).
        let path = model_path(model);
        if !path.exists() {
            return Err(EngineError::ModelFileMissing {
                id: model.id,
                name: model.name.clone(),
                path,
            });
        }
        let (_, tokenizer, chat_template) =
            attune_models::loader::text_side(&path).map_err(|source| EngineError::ModelLoad {
                name: model.name.clone(),
                path: path.clone(),
                source: Box::new(source),
            })?;
        let opts = RenderOptions {
            loss_on: models_loss(LossOn::All),
            max_len: usize::MAX / 2,
        };
        let rows = self.dataset_rows(ds.id, SplitName::Train)?;
        let mut lengths = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let e = render_sample(&tokenizer, &chat_template, &row.sample, &opts).map_err(|e| {
                EngineError::InvalidDataset {
                    path: PathBuf::from(&ds.source_path),
                    reason: format!(
                        "'{}' train row {i} cannot be rendered for model '{}': {e}",
                        ds.name, model.name
                    ),
                }
            })?;
            lengths.push(e.full_len as u64);
        }
        let lengths = Arc::new(lengths);
        let mut cache = LENGTHS.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get_or_insert_with(HashMap::new)
            .insert(key, Arc::clone(&lengths));
        Ok(lengths)
    }

    /// Token lengths of a preference set's sequences under `model`: per pair, prompt +
    /// chosen and prompt + rejected, as TRL tokenizes them (no cut).
    fn pair_lengths(
        &self,
        ds: &DatasetSummary,
        model: &ModelSummary,
    ) -> Result<Vec<u64>, EngineError> {
        Ok(self
            .train_pairs(ds, model, usize::MAX / 4)?
            .iter()
            .flat_map(|p| [p.chosen.ids.len() as u64, p.rejected.ids.len() as u64])
            .collect())
    }

    /// Recommends a way to adapt `goal.model_id` (see [`recommend`] for the rules) with
    /// every method's preset, memory, throughput and time on this machine.
    pub fn advise(&self, goal: &AdvisorGoal) -> Result<Advice, EngineError> {
        let machine = machine_info();
        let model = self.find_model(&goal.model_id.to_string())?;
        let cfg = self.model_shape(&model)?;
        if let Some(b) = goal.budget_minutes {
            if !(b.is_finite() && b > 0.0) {
                return Err(EngineError::InvalidInput(format!(
                    "time budget must be a positive number of minutes, got {b}"
                )));
            }
        }
        let dataset = goal
            .dataset_id
            .map(|id| self.find_dataset(&id.to_string()))
            .transpose()?;
        // A preference set trains DPO or ORPO: a step of `batch` pairs runs 2 x batch
        // sequences (prompt + chosen, prompt + rejected), each counted as a row here.
        let preference = match &dataset {
            Some(ds) if self.store.pref_set(ds.id)?.is_some() => {
                Some(goal.preference.unwrap_or_default())
            }
            _ => None,
        };
        let lengths = match (&dataset, preference) {
            (Some(ds), Some(_)) => Some(Arc::new(self.pair_lengths(ds, &model)?)),
            (Some(ds), None) => Some(self.train_lengths(ds, &model)?),
            (None, _) => None,
        };
        let seqs_per_row = if preference.is_some() { 2 } else { 1 };
        let longest = lengths
            .as_ref()
            .map(|l| tokens_at(l, usize::MAX).longest)
            .unwrap_or(PRESET_MAX_LEN_CAP as u64);
        let max_len = preset_max_len(longest, cfg.max_position_embeddings);
        let available = available_memory();
        let available_mb = available.map(|a| a >> 20);
        let dataset_key = dataset
            .as_ref()
            .map(|d| d.id.to_string())
            .unwrap_or_default();
        let mut estimates = Vec::with_capacity(4);
        for method in ["full", "lora", "prompt"] {
            let mut spec = preset(method, &model.id.to_string(), &dataset_key, max_len);
            let memory_on = |spec: &RunSpec, base| {
                self.run_memory(
                    &cfg,
                    &spec.method,
                    seqs_per_row * spec.batch_size,
                    spec.max_len,
                    base,
                    &model,
                )
            };
            let mut est = memory_on(&spec, BaseFormSpec::F32);
            let (tps, source) = self.throughput(&model, method, machine.threads)?;
            // LoRA and prompt tuning: each way to hold the frozen base; where f32 does not fit,
            // the preset takes the most compact one.
            let mut base_forms = Vec::new();
            if method != "full" {
                let forms: &[BaseFormSpec] = match model.format {
                    ModelFormat::Gguf => &BaseFormSpec::ALL,
                    ModelFormat::Safetensors => &[BaseFormSpec::F32, BaseFormSpec::Bf16],
                };
                for &form in forms {
                    let e = memory_on(&spec, form);
                    base_forms.push(BaseFormEstimate {
                        form,
                        peak_memory_mb: e.total_mb(),
                        fits: available.is_none_or(|a| e.needed() <= a),
                        tokens_per_s: tps * compact_base_speed(form),
                    });
                }
                let dense_fits = base_forms.first().is_some_and(|f| f.fits);
                if let (false, Some(last)) = (dense_fits, base_forms.last()) {
                    spec.base = Some(last.form);
                    est = memory_on(&spec, last.form);
                }
            }
            let tps = tps * compact_base_speed(spec.base.unwrap_or_default());
            if let Some(p) = preference {
                spec.preference = Some(p);
                // A preference set has one split: its evaluation scores the chosen answers
                // of (at most 32 of) the training pairs.
                spec.eval_split = SplitName::Train;
                spec.eval_limit = Some(32);
                if p.objective == attune_protocol::PreferenceObjective::Dpo && method == "full" {
                    est = est.with_reference_copy(&cfg);
                }
            }
            let fits = available.is_none_or(|a| est.needed() <= a);
            let tokens = lengths.as_ref().map(|l| tokens_at(l, max_len));
            let per_epoch = tokens.map(|t| t.per_epoch).unwrap_or(0);
            let seconds_per_epoch = if per_epoch > 0 && tps > 0.0 {
                per_epoch as f64 / tps
            } else {
                0.0
            };
            // Tokens one optimizer step processes: the batch's rows at their mean length
            // (or at the max length without a dataset).
            let tokens_per_step = match tokens {
                Some(t) if t.rows > 0 => {
                    (seqs_per_row * spec.batch_size) as f64 * (t.per_epoch as f64 / t.rows as f64)
                }
                _ => (seqs_per_row * spec.batch_size) as f64 * max_len as f64,
            };
            let steps_in_budget = goal
                .budget_minutes
                .map(|m| (m * 60.0 * tps / tokens_per_step.max(1.0)).floor() as u64);
            let trainable = trainable_params(&cfg, &spec.method);
            let mut summary = format!(
                "{}: trains {} weights, needs about {} MB",
                method_title(method),
                human_count(trainable),
                est.total_mb()
            );
            if est.reference > 0 {
                summary.push_str(&format!(
                    " (with DPO's frozen reference copy, {} MB)",
                    est.reference.div_ceil(1 << 20)
                ));
            }
            if let Some(b) = spec.base.filter(|b| *b != BaseFormSpec::F32) {
                summary.push_str(&format!(
                    " with the base held {} (an f32 base needs {} MB)",
                    base_form_words(b),
                    base_forms.first().map_or(0, |f| f.peak_memory_mb)
                ));
            } else if let Some(q) = base_forms.last().filter(|f| f.form != BaseFormSpec::F32) {
                summary.push_str(&format!(
                    " (about {} MB with the base held {})",
                    q.peak_memory_mb,
                    base_form_words(q.form)
                ));
            }
            if !fits {
                summary.push_str(&format!(
                    " (more than the {} MB free)",
                    available_mb.unwrap_or(0)
                ));
            }
            if per_epoch > 0 {
                summary.push_str(&format!(
                    ", one pass over the data takes about {} at {:.0} tokens/s ({})",
                    minutes(seconds_per_epoch),
                    tps,
                    if source == "measured" {
                        "measured on this machine"
                    } else {
                        "benchmark estimate"
                    }
                ));
            } else {
                summary.push_str(&format!(
                    ", trains about {tps:.0} tokens/s; choose a dataset for a time estimate"
                ));
            }
            summary.push('.');
            estimates.push(MethodEstimate {
                method: method.to_string(),
                spec: Some(spec),
                trainable_params: trainable,
                peak_memory_mb: est.total_mb(),
                fits,
                tokens_per_s: tps,
                throughput_source: source.to_string(),
                tokens_per_epoch: per_epoch,
                seconds_per_epoch,
                steps_in_budget,
                summary,
                base_forms,
            });
        }
        let template_mb = inference_memory(&model).div_ceil(1 << 20);
        let template_fits = available_mb.is_none_or(|a| template_mb <= a);
        estimates.push(MethodEstimate {
            base_forms: Vec::new(),
            method: "template".into(),
            spec: None,
            trainable_params: 0,
            peak_memory_mb: template_mb,
            fits: template_fits,
            tokens_per_s: 0.0,
            throughput_source: "none".into(),
            tokens_per_epoch: 0,
            seconds_per_epoch: 0.0,
            steps_in_budget: None,
            summary: format!(
                "Prompt template: no training; instructions and worked examples go with every \
                 question, using about {template_mb} MB to answer."
            ),
        });
        let mb = |m: &str| {
            estimates
                .iter()
                .find(|e| e.method == m)
                .map(|e| e.peak_memory_mb)
                .unwrap_or(0)
        };
        let facts = Facts {
            api_only: goal.api_only,
            train_rows: dataset.as_ref().map(|d| d.train_rows),
            domains: goal.domains,
            available_mb,
            full_mb: mb("full"),
            lora_mb: mb("lora"),
            prompt_mb: mb("prompt"),
            template_mb,
        };
        let (mut recommended, mut reasons) = recommend(&facts);
        if preference.is_some() {
            // Pairs train weights: a prompt template cannot learn from them.
            estimates.retain(|e| e.method != "template");
            if recommended == "template" {
                // The small-data rule's advice (worked examples in a template) does not apply
                // to pairs: say what a small preference set means instead.
                if let Some(rows) = facts.train_rows.filter(|&r| r < MIN_TRAINING_ROWS) {
                    reasons.retain(|r| !r.starts_with("The dataset has only"));
                    reasons.insert(
                        0,
                        format!(
                            "The preference set has only {rows} {}. Preference training \
                             learns reliably from about {MIN_TRAINING_ROWS} or more; with fewer, \
                             expect a small effect.",
                            if rows == 1 { "pair" } else { "pairs" }
                        ),
                    );
                }
                let fallback = if estimates.iter().any(|e| e.method == "lora" && e.fits) {
                    "lora"
                } else {
                    "prompt"
                };
                reasons.push(format!(
                    "A preference set trains the model (DPO or ORPO); a prompt template cannot \
                     learn from chosen/rejected pairs, so {} is proposed instead.",
                    method_title(fallback)
                ));
                recommended = fallback.to_string();
            }
        }
        if let (Some(budget), Some(e)) = (
            goal.budget_minutes,
            estimates.iter().find(|e| e.method == recommended),
        ) {
            let budget_s = budget * 60.0;
            if e.seconds_per_epoch > budget_s {
                reasons.push(format!(
                    "One pass over the data takes about {}, more than your {} budget: \
                     training would stop after about {} steps (about {:.0}% of the data).",
                    minutes(e.seconds_per_epoch),
                    minutes(budget_s),
                    e.steps_in_budget.unwrap_or(0),
                    100.0 * budget_s / e.seconds_per_epoch
                ));
            }
        }
        // Beyond this machine: a GPU machine through a run bundle (issue 18).
        let too_big: Vec<&str> = estimates
            .iter()
            .filter(|e| e.spec.is_some() && !e.fits)
            .map(|e| e.method.as_str())
            .collect();
        let over_budget = goal.budget_minutes.and_then(|b| {
            estimates
                .iter()
                .find(|e| e.method == recommended && e.seconds_per_epoch > b * 60.0)
                .map(|e| (e, b))
        });
        let offer_reason = match (too_big.is_empty(), over_budget) {
            (false, _) => Some(format!(
                "{} will not fit in this machine's memory.",
                too_big.join(", ")
            )),
            (true, Some((e, b))) => Some(format!(
                "One pass with {} takes about {} here, more than your {} budget.",
                e.method,
                minutes(e.seconds_per_epoch),
                minutes(b * 60.0)
            )),
            (true, None) => None,
        };
        let gpu_offer = offer_reason.map(|reason| {
            let spec = estimates
                .iter()
                .find(|e| e.method == recommended && e.spec.is_some())
                .or_else(|| estimates.iter().find(|e| e.method == "lora"))
                .and_then(|e| e.spec.clone())
                .unwrap_or_else(|| preset("lora", &model.id.to_string(), &dataset_key, max_len));
            crate::bundle::gpu_offer(reason, &cfg, &spec)
        });
        Ok(Advice {
            machine,
            model: Some(model),
            recommended,
            reasons,
            estimates,
            gpu_offer,
        })
    }

    /// Memory, steps and time for `spec` before it starts: the engine's memory estimate
    /// against the available memory, the total optimizer steps, and the time at the
    /// advisor's throughput for this model and method. When it will not fit,
    /// `suggestion` says by how much and what to change.
    pub fn check_run(&self, spec: &RunSpec) -> Result<RunCheck, EngineError> {
        let plan = self.plan_run(spec)?;
        let (est, available, fits) = (&plan.memory, plan.available, plan.fits);
        let total = plan.total_steps as u64;
        let threads = candle_core::utils::get_num_threads() as u64;
        let (tps, _) = self.throughput(&plan.model, spec.method.name(), threads)?;
        let tps = tps * compact_base_speed(plan.base);
        let tokens = total as f64
            * spec.batch_size as f64
            * spec.grad_accum as f64
            * plan.mean_example_tokens;
        let estimated_seconds = if tps > 0.0 { tokens / tps } else { 0.0 };
        let suggestion = (!fits).then(|| {
            format!(
                "This run needs about {} MB more but only {} MB is free. {}",
                est.needed().div_ceil(1 << 20),
                available.map(|a| a >> 20).unwrap_or(0),
                plain_suggestion(&RunSpec {
                    base: Some(plan.base),
                    ..spec.clone()
                })
            )
        });
        let gpu_offer = (!fits).then(|| {
            let cfg = self.model_shape(&plan.model)?;
            Ok::<_, EngineError>(crate::bundle::gpu_offer(
                format!(
                    "This run needs about {} MB, more than the {} MB free here.",
                    est.total_mb(),
                    available.map(|a| a >> 20).unwrap_or(0)
                ),
                &cfg,
                spec,
            ))
        });
        Ok(RunCheck {
            peak_memory_mb: est.total_mb(),
            available_mb: available.map(|a| a >> 20).unwrap_or(0),
            fits,
            total_steps: total,
            tokens_per_s: tps,
            estimated_seconds,
            suggestion,
            gpu_offer: gpu_offer.transpose()?,
            base: plan.base,
        })
    }
}

/// What to change so a run fits, in the app's words.
fn plain_suggestion(spec: &RunSpec) -> String {
    let s: Vec<String> = crate::runs::smaller_settings(spec)
        .into_iter()
        .map(|c| match c {
            Smaller::Batch {
                batch_size,
                grad_accum,
            } => format!(
                "a batch size of {batch_size} with gradient accumulation {grad_accum} (same effective batch)"
            ),
            Smaller::MaxLen(n) => format!("a max length of {n}"),
            Smaller::Lora => "LoRA instead of full fine-tuning".to_string(),
            Smaller::QuantizedBase => "the base held in its quantized blocks".to_string(),
        })
        .collect();
    if s.is_empty() {
        "Close other programs or choose a smaller model.".to_string()
    } else {
        format!("Try {}, or close other programs.", s.join(", or "))
    }
}

/// "1.2M", "34.5K", "812".
fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests;
