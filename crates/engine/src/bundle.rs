//! Run bundles: a run handed to an engine the field already trusts (Hugging Face TRL's
//! `SFTTrainer` with PEFT under `accelerate launch`, or Axolotl), on a machine with GPUs, and
//! its result brought back into the library.
//!
//! [`Engine::export_bundle`] writes, into a folder the caller names (all or nothing, through
//! a hidden sibling folder renamed at the end):
//! - `data/train.jsonl`, `data/valid.jsonl`: the run's rows as chat messages
//!   (`{"messages": [...]}`) or documents (`{"text": ...}`), the validation split cut to the
//!   run's `eval_limit`;
//! - `chat_template.jinja`: the model's own chat template, verbatim;
//! - `attune_run.json`: the run's spec and every hyper-parameter as the engines name it;
//! - `train_trl.py` (`assets/bundle/train_trl.py`): the TRL script; it tokenizes the rows by
//!   Attune's own loss-mask rule and runs Attune's learning-rate schedule exactly;
//! - `axolotl.yaml` (LoRA and full fine-tuning; Axolotl has no prompt tuning);
//! - `accelerate/*.yaml` and `deepspeed/*.json`: multi-GPU, DeepSpeed ZeRO-2/3 and FSDP;
//! - `slurm.sbatch`: a two-node example; `run.sh`: the single-machine entry point;
//! - `README.md`: the commands and every setting that does not map one to one;
//! - `bundle.json`: each file's sha256 and the bundle's hash over them (the provenance).
//!
//! [`Engine::import_bundle_result`] takes the engine's output folder back: the PEFT adapter
//! (or the full checkpoint) is checked against the base model and registered as the run's
//! adapter, `trainer_state.json`'s `log_history` becomes the run's metrics, and the bundle's
//! hash, the engine and its version are recorded (migration 0008, `run_bundles`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use attune_protocol::{
    BundleEngine, BundleReply, ChatMessage, GpuNeed, GpuOffer, ImportResultReply, LossOn,
    LrSchedule, MethodSpec, ModelSource, ModelSummary, RunSpec, SplitName,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::datasets::Sample;
use crate::error::EngineError;
use crate::store::bundles::{BundleRow, ImportedResult};
use crate::store::{AdapterRow, MetricRow};
use crate::Engine;

const TRAIN_TRL_PY: &str = include_str!("../assets/bundle/train_trl.py");
const RUN_SH: &str = include_str!("../assets/bundle/run.sh");

/// The manifest's format tag.
pub const BUNDLE_FORMAT: &str = "attune-bundle/1";

/// What a bundle is made from: the run and everything the files are written from.
pub(crate) struct BundleInput<'a> {
    pub run_id: i64,
    pub run_name: &'a str,
    pub spec: &'a RunSpec,
    pub total_steps: u64,
    pub engine: BundleEngine,
    pub model: &'a ModelSummary,
    /// What the runtime loads: a `.gguf` file or a Hugging Face folder.
    pub model_path: &'a Path,
    pub chat_template: &'a str,
    pub eos_token_ids: &'a [u32],
    pub end_of_text_id: Option<u32>,
    pub dataset_name: &'a str,
    pub dataset_hash: &'a str,
    pub train: &'a [Sample],
    pub valid: &'a [Sample],
    pub attune_version: &'a str,
}

/// The bundle's files (path relative to the bundle, contents), `bundle.json` last, and the
/// settings that did not map one to one.
pub(crate) struct BundleFiles {
    pub files: Vec<(String, Vec<u8>)>,
    pub sha256: String,
    pub unmapped: Vec<String>,
    pub model_source: String,
}

fn sample_json(s: &Sample) -> Value {
    match s {
        Sample::Chat(messages) => json!({ "messages": messages
            .iter()
            .map(|m: &ChatMessage| json!({"role": m.role, "content": m.content}))
            .collect::<Vec<_>>() }),
        Sample::Text(text) => json!({ "text": text }),
    }
}

fn jsonl(rows: &[Sample]) -> Vec<u8> {
    let mut out = String::new();
    for r in rows {
        out.push_str(&sample_json(r).to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// A YAML scalar: JSON is YAML, so a JSON value is quoted and escaped correctly.
fn y(v: impl serde::Serialize) -> String {
    serde_json::to_string(&v).unwrap_or_else(|_| "null".into())
}

fn peak_lr(spec: &RunSpec) -> f64 {
    spec.lr.unwrap_or_else(|| spec.method.default_lr())
}

fn schedule_name(s: LrSchedule) -> &'static str {
    match s {
        LrSchedule::Cosine => "cosine",
        LrSchedule::Linear => "linear",
        LrSchedule::Constant => "constant",
    }
}

/// The model as the bundle names it: (hub repo, revision, file inside the repo) when the
/// library pulled it from the Hub, and always the local path.
struct ModelRef {
    hub: Option<(String, String, String)>,
    local: String,
    gguf: bool,
}

impl ModelRef {
    fn of(model: &ModelSummary, path: &Path) -> ModelRef {
        let gguf = path.is_file()
            || path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let hub = match &model.source {
            ModelSource::Hub {
                repo,
                revision,
                path,
            } => Some((repo.clone(), revision.clone(), path.clone())),
            ModelSource::Local { .. } => None,
        };
        ModelRef {
            hub,
            local: path.to_string_lossy().into_owned(),
            gguf,
        }
    }

    fn describe(&self) -> String {
        match &self.hub {
            Some((repo, rev, file)) if self.gguf => {
                format!("Hub repository {repo} at {rev}, file {file}")
            }
            Some((repo, rev, _)) => format!("Hub repository {repo} at {rev}"),
            None => format!("the local {} {}", self.kind(), self.local),
        }
    }

    fn kind(&self) -> &'static str {
        if self.gguf {
            "GGUF file"
        } else {
            "Hugging Face folder"
        }
    }
}

/// Every setting of the run in the bundle's words (`attune_run.json`'s `hyperparameters`).
fn hyperparameters(spec: &RunSpec, total_steps: u64) -> Value {
    let f = spec.final_lr_fraction;
    let (hf_sched, hf_kwargs) = match spec.schedule {
        LrSchedule::Cosine => ("cosine_with_min_lr", json!({ "min_lr_rate": f })),
        LrSchedule::Linear => ("linear", json!({})),
        LrSchedule::Constant => ("constant_with_warmup", json!({})),
    };
    let mut hp = json!({
        "method": spec.method.name(),
        "batch_size": spec.batch_size,
        "grad_accum": spec.grad_accum,
        "total_steps": total_steps,
        "epochs": spec.epochs,
        "peak_lr": peak_lr(spec),
        "warmup_steps": spec.warmup_steps,
        "schedule": schedule_name(spec.schedule),
        "final_lr_fraction": f,
        "hf_lr_scheduler_type": hf_sched,
        "hf_lr_scheduler_kwargs": hf_kwargs,
        "weight_decay": spec.weight_decay,
        "max_grad_norm": spec.max_grad_norm,
        "seed": spec.seed,
        "max_len": spec.max_len,
        "loss_on": match spec.loss_on { LossOn::Assistant => "assistant", LossOn::All => "all" },
        "pack": spec.pack,
        "eval_every": spec.eval_every,
        "checkpoint_every": spec.checkpoint_every,
    });
    match &spec.method {
        MethodSpec::Full => {}
        MethodSpec::Lora {
            r,
            alpha,
            dropout,
            targets,
            rslora,
        } => {
            hp["lora"] = json!({
                "r": r, "alpha": alpha, "dropout": dropout, "targets": targets, "rslora": rslora,
            });
        }
        MethodSpec::Prompt {
            virtual_tokens,
            init_text,
        } => {
            hp["prompt"] = json!({ "virtual_tokens": virtual_tokens, "init_text": init_text });
        }
    }
    hp
}

/// What differs between Attune's run and the engines', one sentence each.
fn unmapped(b: &BundleInput<'_>, m: &ModelRef) -> Vec<String> {
    let spec = b.spec;
    let mut u = vec![
        format!(
            "Data order and random initialisation: both engines take seed {} but draw with \
             their own generators (PyTorch's sampler, PEFT's kaiming init of lora_A), so the rows \
             of each step and the adapter's starting A differ from Attune's; a step that covers \
             the whole training split, and LoRA's starting loss (B starts at zero), are the same.",
            spec.seed
        ),
        "Precision: on a GPU the scripts train with bf16 autocast over f32 weights (fp32 on the \
         CPU); Attune trains LoRA and prompt tuning over a bf16 base on CPUs with AMX and f32 \
         elsewhere. Losses agree to rounding, not bit for bit."
            .to_string(),
    ];
    if spec.forgetting_rows > 0 {
        u.push(format!(
            "The forgetting check ({} general-domain rows before and after) is Attune's: run \
             `attune eval` on the imported adapter.",
            spec.forgetting_rows
        ));
    }
    if matches!(spec.method, MethodSpec::Full) && spec.weight_decay > 0.0 {
        u.push(format!(
            "Weight decay {}: Hugging Face's Trainer exempts biases and norm weights from it; \
             Attune decays every trained tensor.",
            spec.weight_decay
        ));
    }
    if spec.pack {
        u.push(
            "Packing: TRL's `packing_strategy: wrapped` concatenates rows and cuts blocks of \
             max_len (rows attend across their boundary, as in Attune) per map batch of 1000 \
             rows, where Attune cuts the whole split at once; Axolotl's `sample_packing` packs \
             whole rows into bins without attention across rows."
                .to_string(),
        );
    }
    if spec.batch_size > 1 {
        u.push(format!(
            "Several processes: train_trl.py splits batch_size {} over the processes when it \
             divides evenly (the optimizer step sees the same rows); otherwise each process \
             takes {} rows and a step sees that many times the processes.",
            spec.batch_size, spec.batch_size
        ));
    }
    // Axolotl only.
    if !matches!(spec.method, MethodSpec::Prompt { .. }) {
        u.push(
            "Axolotl's schedule is Hugging Face's: its first update uses the learning rate of \
             step 0 (0 during a warm-up), Attune's that of step 1, so its warm-up and decay run \
             one step later. train_trl.py runs Attune's schedule exactly."
                .to_string(),
        );
        if spec.schedule == LrSchedule::Linear && spec.final_lr_fraction > 0.0 {
            u.push(format!(
                "Axolotl's linear schedule decays to 0, not to final_lr_fraction {} of the peak.",
                spec.final_lr_fraction
            ));
        }
        if let MethodSpec::Lora { alpha, .. } = &spec.method {
            if alpha.fract() != 0.0 {
                u.push(format!(
                    "Axolotl takes an integer lora_alpha: {alpha} is written as {}.",
                    alpha.round()
                ));
            }
        }
        if m.gguf {
            u.push(
                "Axolotl cannot load a GGUF: `python train_trl.py --save-base base-model` \
                 writes the dequantized model (f32, the weights Attune trains on) as a Hugging \
                 Face folder, which axolotl.yaml names; run.sh does it first."
                    .to_string(),
            );
        }
        if b.train.iter().any(|s| matches!(s, Sample::Text(_))) {
            u.push(
                "Axolotl's `completion` rows end with the tokenizer's EOS; Attune ends a \
                 document with its end-of-text token."
                    .to_string(),
            );
        }
    }
    u
}

/// The Axolotl YAML (LoRA and full fine-tuning).
fn axolotl_yaml(b: &BundleInput<'_>, m: &ModelRef) -> String {
    let spec = b.spec;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Attune run '{}' (id {}) for Axolotl (`axolotl train axolotl.yaml`, or ./run.sh with\n\
         # the axolotl engine). Field names as in Axolotl's config schema\n\
         # (src/axolotl/utils/schemas/). What does not map one to one: README.md.",
        b.run_name, b.run_id
    );
    let base = if m.gguf {
        "./base-model".to_string()
    } else {
        match &m.hub {
            Some((repo, _, _)) => repo.clone(),
            None => m.local.clone(),
        }
    };
    let _ = writeln!(s, "base_model: {}", y(&base));
    if let (false, Some((_, rev, _))) = (m.gguf, &m.hub) {
        let _ = writeln!(s, "revision_of_model: {}", y(rev));
    }
    let _ = writeln!(s, "chat_template: jinja");
    let _ = writeln!(s, "chat_template_jinja: {}", y(b.chat_template));
    let chat = b.train.iter().all(|r| matches!(r, Sample::Chat(_)));
    let roles = match spec.loss_on {
        LossOn::Assistant => json!(["assistant"]),
        LossOn::All => json!(["system", "user", "assistant"]),
    };
    let dataset = |path: &str, split: bool| {
        let mut d = format!("  - path: {}\n    ds_type: json\n", y(path));
        if split {
            d.push_str("    split: train\n");
        }
        if chat {
            let _ = write!(
                d,
                "    type: chat_template\n    field_messages: messages\n    roles_to_train: {}\n    train_on_eos: turn\n",
                roles
            );
        } else {
            d.push_str("    type: completion\n    field: text\n");
        }
        d
    };
    s.push_str("datasets:\n");
    s.push_str(&dataset("data/train.jsonl", false));
    if !b.valid.is_empty() {
        s.push_str("test_datasets:\n");
        s.push_str(&dataset("data/valid.jsonl", true));
    } else {
        s.push_str("val_set_size: 0.0\n");
    }
    let _ = writeln!(s, "dataset_prepared_path: last_run_prepared");
    let _ = writeln!(s, "output_dir: ./output");
    let _ = writeln!(s, "train_on_inputs: {}", y(spec.loss_on == LossOn::All));
    let _ = writeln!(s, "sequence_len: {}", spec.max_len);
    let _ = writeln!(s, "sample_packing: {}", y(spec.pack));
    if let MethodSpec::Lora {
        r,
        alpha,
        dropout,
        targets,
        rslora,
    } = &spec.method
    {
        let _ = writeln!(s, "adapter: lora");
        let _ = writeln!(s, "lora_r: {r}");
        let _ = writeln!(s, "lora_alpha: {}", alpha.round() as i64);
        let _ = writeln!(s, "lora_dropout: {}", y(dropout));
        let _ = writeln!(s, "lora_target_modules: {}", y(targets));
        let _ = writeln!(s, "peft_use_rslora: {}", y(rslora));
    }
    let _ = writeln!(s, "micro_batch_size: {}", spec.batch_size);
    let _ = writeln!(s, "gradient_accumulation_steps: {}", spec.grad_accum);
    let _ = writeln!(s, "max_steps: {}", b.total_steps);
    let _ = writeln!(s, "optimizer: adamw_torch");
    let _ = writeln!(
        s,
        "adam_beta1: 0.9\nadam_beta2: 0.999\nadam_epsilon: 1.0e-8"
    );
    let _ = writeln!(s, "learning_rate: {}", y(peak_lr(spec)));
    match spec.schedule {
        LrSchedule::Cosine => {
            let _ = writeln!(s, "lr_scheduler: cosine");
            let _ = writeln!(s, "cosine_min_lr_ratio: {}", y(spec.final_lr_fraction));
        }
        LrSchedule::Linear => {
            let _ = writeln!(s, "lr_scheduler: linear");
        }
        LrSchedule::Constant => {
            let _ = writeln!(s, "lr_scheduler: constant_with_warmup");
        }
    }
    let _ = writeln!(s, "warmup_steps: {}", spec.warmup_steps);
    let _ = writeln!(s, "weight_decay: {}", y(spec.weight_decay));
    let _ = writeln!(s, "max_grad_norm: {}", y(spec.max_grad_norm));
    let _ = writeln!(s, "seed: {}", spec.seed);
    let _ = writeln!(s, "bf16: auto");
    let _ = writeln!(s, "logging_steps: 1");
    if spec.eval_every > 0 && !b.valid.is_empty() {
        let _ = writeln!(s, "eval_steps: {}", spec.eval_every);
    }
    if spec.checkpoint_every > 0 {
        let _ = writeln!(s, "save_steps: {}", spec.checkpoint_every);
    }
    s.push_str(
        "# Several GPUs: uncomment one (or pass --deepspeed to axolotl train).\n\
         # deepspeed: deepspeed/zero2.json\n\
         # deepspeed: deepspeed/zero3.json\n",
    );
    s
}

const DS_ZERO2: &str = r#"{
  "bf16": { "enabled": "auto" },
  "fp16": { "enabled": "auto" },
  "zero_optimization": {
    "stage": 2,
    "overlap_comm": true,
    "contiguous_gradients": true,
    "allgather_bucket_size": 200000000,
    "reduce_bucket_size": "auto"
  },
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto"
}
"#;

const DS_ZERO3: &str = r#"{
  "bf16": { "enabled": "auto" },
  "fp16": { "enabled": "auto" },
  "zero_optimization": {
    "stage": 3,
    "overlap_comm": true,
    "contiguous_gradients": true,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_gather_16bit_weights_on_model_save": true
  },
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto"
}
"#;

/// An accelerate config (the keys `accelerate config` writes); `--num_processes`,
/// `--num_machines` and `--machine_rank` on the command line override these.
fn accelerate_yaml(distributed: &str, extra: &str) -> String {
    format!(
        "# accelerate launch --config_file <this> --num_processes N [--num_machines M \
         --machine_rank R --main_process_ip HOST --main_process_port 29500] train_trl.py\n\
         compute_environment: LOCAL_MACHINE\n\
         debug: false\n\
         distributed_type: {distributed}\n{extra}\
         downcast_bf16: 'no'\n\
         machine_rank: 0\n\
         main_training_function: main\n\
         mixed_precision: bf16\n\
         num_machines: 1\n\
         num_processes: 8\n\
         rdzv_backend: static\n\
         same_network: true\n\
         use_cpu: false\n"
    )
}

fn accelerate_configs() -> Vec<(&'static str, String)> {
    vec![
        ("accelerate/multi_gpu.yaml", accelerate_yaml("MULTI_GPU", "gpu_ids: all\n")),
        (
            "accelerate/deepspeed_zero2.yaml",
            accelerate_yaml(
                "DEEPSPEED",
                "deepspeed_config:\n  deepspeed_config_file: deepspeed/zero2.json\n  \
                 deepspeed_multinode_launcher: standard\n",
            ),
        ),
        (
            "accelerate/deepspeed_zero3.yaml",
            accelerate_yaml(
                "DEEPSPEED",
                "deepspeed_config:\n  deepspeed_config_file: deepspeed/zero3.json\n  \
                 deepspeed_multinode_launcher: standard\n  zero3_init_flag: true\n",
            ),
        ),
        (
            "accelerate/fsdp.yaml",
            accelerate_yaml(
                "FSDP",
                "fsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  \
                 fsdp_cpu_ram_efficient_loading: true\n  fsdp_offload_params: false\n  \
                 fsdp_reshard_after_forward: true\n  fsdp_state_dict_type: FULL_STATE_DICT\n  \
                 fsdp_activation_checkpointing: false\n",
            ),
        ),
    ]
}

fn slurm_sbatch(b: &BundleInput<'_>) -> String {
    format!(
        "#!/bin/bash\n\
         # Attune run '{name}' on two Slurm nodes of 8 GPUs each, DeepSpeed ZeRO-3 through\n\
         # accelerate. Adjust --nodes, --gpus-per-node, the partition and the environment.\n\
         #SBATCH --job-name=attune-{id}\n\
         #SBATCH --nodes=2\n\
         #SBATCH --ntasks-per-node=1\n\
         #SBATCH --gpus-per-node=8\n\
         #SBATCH --cpus-per-task=32\n\
         #SBATCH --output=output/slurm-%j.log\n\
         set -euo pipefail\n\
         cd \"$SLURM_SUBMIT_DIR\"\n\
         mkdir -p output\n\
         head=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\n\
         gpus=8\n\
         srun bash -c \"python -m accelerate.commands.launch \\\n\
         \x20 --config_file accelerate/deepspeed_zero3.yaml \\\n\
         \x20 --num_machines $SLURM_NNODES --num_processes $(( SLURM_NNODES * gpus )) \\\n\
         \x20 --machine_rank \\$SLURM_NODEID --main_process_ip $head --main_process_port 29500 \\\n\
         \x20 train_trl.py\"\n",
        name = b.run_name,
        id = b.run_id
    )
}

fn readme(b: &BundleInput<'_>, m: &ModelRef, unmapped: &[String], has_axolotl: bool) -> String {
    let spec = b.spec;
    let mut s = String::new();
    let method = match &spec.method {
        MethodSpec::Full => "full fine-tuning".to_string(),
        MethodSpec::Lora {
            r, alpha, targets, ..
        } => format!("LoRA r {r}, alpha {alpha}, on {}", targets.join(", ")),
        MethodSpec::Prompt { virtual_tokens, .. } => {
            format!("prompt tuning, {virtual_tokens} virtual tokens")
        }
    };
    let _ = writeln!(
        s,
        "# Attune run '{}' (id {}): {method}\n\n\
         Exported by Attune {} for {} (`attune runs export {} --engine {}`). Model: {} ({}). \
         Dataset '{}' (content hash {}): {} training rows in `data/train.jsonl`, {} validation \
         rows ({} split) in `data/valid.jsonl`, as chat messages (`{{\"messages\": [...]}}`) or \
         documents (`{{\"text\": ...}}`). Chat template: `chat_template.jinja`, the model's own \
         ({}). Every setting: `attune_run.json`.\n",
        b.run_name,
        b.run_id,
        b.attune_version,
        match b.engine {
            BundleEngine::Trl => "TRL",
            BundleEngine::Axolotl => "Axolotl",
        },
        b.run_id,
        b.engine.as_str(),
        b.model.name,
        m.describe(),
        b.dataset_name,
        b.dataset_hash,
        b.train.len(),
        b.valid.len(),
        spec.eval_split.as_str(),
        if m.gguf {
            "the GGUF's tokenizer.chat_template"
        } else {
            "the folder's chat template"
        },
    );
    let model_note = if m.hub.is_some() {
        "The scripts download the model from the Hub when the local path is absent."
    } else {
        "The model is a local file Attune knows no Hub repository for: copy it to the GPU \
         machine and pass `--model /path/to/it` to train_trl.py (or set `ATTUNE_MODEL`)."
    };
    let _ = writeln!(
        s,
        "## Requirements\n\n\
         Python 3.10+ with `pip install trl==1.16.0 peft==0.21.2 accelerate==1.15.0 \
         datasets==5.2.0 transformers torch` (and `gguf` for a GGUF model); `deepspeed` for the \
         DeepSpeed configs. {model_note}\n"
    );
    s.push_str(
        "## Train\n\n\
         One machine, whatever it has (every GPU, or one CPU process when there is none); the \
         result lands in `output/`:\n\n\
         ```sh\n./run.sh\n```\n\n\
         One GPU:\n\n\
         ```sh\naccelerate launch --num_processes 1 --mixed_precision bf16 train_trl.py\n```\n\n\
         Several GPUs on one machine (data parallel; `deepspeed_zero2.yaml` shards the optimizer \
         state, `deepspeed_zero3.yaml` also the weights, `fsdp.yaml` uses PyTorch FSDP2 instead):\n\n\
         ```sh\naccelerate launch --config_file accelerate/multi_gpu.yaml --num_processes 8 train_trl.py\n\
         accelerate launch --config_file accelerate/deepspeed_zero3.yaml --num_processes 8 train_trl.py\n\
         accelerate launch --config_file accelerate/fsdp.yaml --num_processes 8 train_trl.py\n```\n\n\
         Several machines (run on each, with its own rank; 2 machines x 8 GPUs):\n\n\
         ```sh\naccelerate launch --config_file accelerate/deepspeed_zero3.yaml \\\n  \
         --num_machines 2 --num_processes 16 --machine_rank $RANK \\\n  \
         --main_process_ip $HEAD_NODE --main_process_port 29500 train_trl.py\n```\n\n\
         Slurm (two nodes; edit the partition and sizes): `sbatch slurm.sbatch`.\n\n\
         A smoke test of a few steps: `./run.sh --stop-after 3` (the schedule still spans the \
         whole run).\n\n",
    );
    if has_axolotl {
        s.push_str(
            "Axolotl, the same run from `axolotl.yaml` (for a GGUF model, first \
             `python train_trl.py --save-base base-model`):\n\n\
             ```sh\naxolotl train axolotl.yaml\n\
             axolotl train axolotl.yaml --deepspeed deepspeed/zero3.json   # several GPUs\n```\n\n",
        );
    } else {
        s.push_str(
            "Axolotl has no prompt tuning, so this bundle has no Axolotl YAML: use the TRL \
             script.\n\n",
        );
    }
    let _ = writeln!(
        s,
        "## Bring the result back\n\n\
         ```sh\nattune runs import-result {} output\n```\n\n\
         Attune checks the adapter (or full checkpoint) against the base model, registers it \
         as this run's, fills the run's charts from `trainer_state.json` and records this \
         bundle's hash (`bundle.json`), the engine and its version. Evaluate it with \
         `attune eval --adapter {} --data '{}'`.\n",
        b.run_id, b.run_name, b.dataset_name
    );
    s.push_str(
        "## Settings\n\n\
         Mapped one to one (TRL `SFTConfig` / PEFT / Axolotl):\n\n\
         | Attune | value | TRL, PEFT | Axolotl |\n|---|---|---|---|\n",
    );
    let mut row = |a: &str, v: String, t: &str, x: &str| {
        let _ = writeln!(s, "| {a} | {v} | {t} | {x} |");
    };
    row(
        "batch_size",
        spec.batch_size.to_string(),
        "per_device_train_batch_size",
        "micro_batch_size",
    );
    row(
        "grad_accum",
        spec.grad_accum.to_string(),
        "gradient_accumulation_steps",
        "gradient_accumulation_steps",
    );
    row("steps", b.total_steps.to_string(), "max_steps", "max_steps");
    row(
        "lr",
        format!("{}", peak_lr(spec)),
        "learning_rate",
        "learning_rate",
    );
    row(
        "schedule, final_lr_fraction",
        format!(
            "{}, {}",
            schedule_name(spec.schedule),
            spec.final_lr_fraction
        ),
        "Attune's own LambdaLR (nearest: cosine_with_min_lr, min_lr_rate)",
        "lr_scheduler, cosine_min_lr_ratio",
    );
    row(
        "warmup_steps",
        spec.warmup_steps.to_string(),
        "warmup_steps",
        "warmup_steps",
    );
    row(
        "weight_decay",
        spec.weight_decay.to_string(),
        "weight_decay (AdamW 0.9/0.999/1e-8)",
        "weight_decay, optimizer adamw_torch",
    );
    row(
        "max_grad_norm",
        spec.max_grad_norm.to_string(),
        "max_grad_norm",
        "max_grad_norm",
    );
    row("seed", spec.seed.to_string(), "seed, data_seed", "seed");
    row(
        "max_len",
        spec.max_len.to_string(),
        "max_length (keep_start)",
        "sequence_len",
    );
    row(
        "loss_on",
        format!("{:?}", spec.loss_on).to_lowercase(),
        "labels by Attune's rule: each assistant turn through its end-of-turn token",
        "roles_to_train, train_on_eos: turn, train_on_inputs",
    );
    row(
        "pack",
        spec.pack.to_string(),
        "packing, packing_strategy wrapped",
        "sample_packing",
    );
    match &spec.method {
        MethodSpec::Lora {
            r,
            alpha,
            dropout,
            targets,
            rslora,
        } => {
            row("lora r", r.to_string(), "LoraConfig.r", "lora_r");
            row("lora alpha", alpha.to_string(), "lora_alpha", "lora_alpha");
            row(
                "lora dropout",
                dropout.to_string(),
                "lora_dropout",
                "lora_dropout",
            );
            row(
                "lora targets",
                targets.join(", "),
                "target_modules",
                "lora_target_modules",
            );
            row(
                "rslora",
                rslora.to_string(),
                "use_rslora",
                "peft_use_rslora",
            );
        }
        MethodSpec::Prompt {
            virtual_tokens,
            init_text,
        } => {
            row(
                "virtual_tokens",
                virtual_tokens.to_string(),
                "PromptTuningConfig.num_virtual_tokens",
                "(none)",
            );
            row(
                "init",
                match init_text {
                    Some(t) => format!("text {t:?}"),
                    None => "random vocabulary rows".into(),
                },
                "prompt_tuning_init TEXT / SAMPLE_VOCAB",
                "(none)",
            );
        }
        MethodSpec::Full => {}
    }
    row(
        "eval_every",
        spec.eval_every.to_string(),
        "eval_steps",
        "eval_steps",
    );
    row(
        "checkpoint_every",
        spec.checkpoint_every.to_string(),
        "save_steps",
        "save_steps",
    );
    s.push_str("\nNot one to one:\n\n");
    for u in unmapped {
        let _ = writeln!(s, "- {u}");
    }
    s.push_str(
        "\n## Files\n\n`bundle.json` lists every file's sha256 and the bundle's hash over them; \
         `output/attune_result.json` repeats that hash, so an imported result names the bundle \
         it came from.\n",
    );
    s
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bundle's hash: sha256 over `path\0sha256(contents)\n` for every file but
/// `bundle.json`, in path order.
pub(crate) fn bundle_hash(files: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (path, sha) in files {
        h.update(path.as_bytes());
        h.update([0]);
        h.update(sha.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// Every file of the bundle, built from `b` (no I/O).
pub(crate) fn bundle_files(b: &BundleInput<'_>) -> BundleFiles {
    let m = ModelRef::of(b.model, b.model_path);
    let unmapped = unmapped(b, &m);
    let has_axolotl = !matches!(b.spec.method, MethodSpec::Prompt { .. });
    let (gguf_file, local_path) = if m.gguf {
        (m.hub.as_ref().map(|(_, _, f)| f.clone()), m.local.clone())
    } else {
        (None, m.local.clone())
    };
    let run_json = json!({
        "attune_version": b.attune_version,
        "run": { "id": b.run_id, "name": b.run_name },
        "engine": b.engine.as_str(),
        "model": {
            "name": b.model.name,
            "architecture": b.model.architecture,
            "family": b.model.family,
            "quantization": b.model.quantization,
            "sha256": b.model.sha256,
            "format": if m.gguf { "gguf" } else { "safetensors" },
            "local_path": local_path,
            "hub_repo": m.hub.as_ref().map(|h| h.0.clone()),
            "revision": m.hub.as_ref().map(|h| h.1.clone()),
            "gguf_file": gguf_file,
        },
        "chat_template": {
            "file": "chat_template.jinja",
            "source": if m.gguf { "GGUF metadata tokenizer.chat_template" } else { "the model folder's chat template" },
        },
        "tokens": {
            "eos_token_ids": b.eos_token_ids,
            "end_of_text_id": b.end_of_text_id,
        },
        "dataset": {
            "name": b.dataset_name,
            "content_hash": b.dataset_hash,
            "train_rows": b.train.len(),
            "valid_rows": b.valid.len(),
            "eval_split": b.spec.eval_split.as_str(),
        },
        "spec": b.spec,
        "hyperparameters": hyperparameters(b.spec, b.total_steps),
        "unmapped": unmapped,
    });
    let launch = match b.engine {
        BundleEngine::Trl => {
            "exec \"$PY\" -m accelerate.commands.launch \"${launch[@]}\" train_trl.py \"$@\""
                .to_string()
        }
        BundleEngine::Axolotl => {
            let mut l = String::new();
            if m.gguf {
                l.push_str(
                    "if [ ! -f base-model/config.json ]; then\n  \
                     \"$PY\" train_trl.py --save-base base-model\nfi\n",
                );
            }
            l.push_str(
                "exec \"$PY\" -m accelerate.commands.launch \"${launch[@]}\" -m axolotl.cli.train axolotl.yaml \"$@\"",
            );
            l
        }
    };
    let engine_name = match b.engine {
        BundleEngine::Trl => "TRL's SFTTrainer (train_trl.py)",
        BundleEngine::Axolotl => "Axolotl (axolotl.yaml)",
    };
    let run_sh = RUN_SH
        .replace("@ENGINE_NAME@", engine_name)
        .replace("@LAUNCH@", &launch);

    let mut files: Vec<(String, Vec<u8>)> = vec![
        (
            "README.md".into(),
            readme(b, &m, &unmapped, has_axolotl).into_bytes(),
        ),
        (
            "attune_run.json".into(),
            serde_json::to_vec_pretty(&run_json).unwrap_or_default(),
        ),
        (
            "chat_template.jinja".into(),
            b.chat_template.as_bytes().to_vec(),
        ),
        ("data/train.jsonl".into(), jsonl(b.train)),
        ("data/valid.jsonl".into(), jsonl(b.valid)),
        ("train_trl.py".into(), TRAIN_TRL_PY.as_bytes().to_vec()),
        ("run.sh".into(), run_sh.into_bytes()),
        ("deepspeed/zero2.json".into(), DS_ZERO2.as_bytes().to_vec()),
        ("deepspeed/zero3.json".into(), DS_ZERO3.as_bytes().to_vec()),
        ("slurm.sbatch".into(), slurm_sbatch(b).into_bytes()),
    ];
    for (p, c) in accelerate_configs() {
        files.push((p.into(), c.into_bytes()));
    }
    if has_axolotl {
        files.push(("axolotl.yaml".into(), axolotl_yaml(b, &m).into_bytes()));
    }
    let shas: BTreeMap<String, String> = files
        .iter()
        .map(|(p, c)| (p.clone(), hex(&Sha256::digest(c))))
        .collect();
    let sha256 = bundle_hash(&shas);
    let manifest = json!({
        "format": BUNDLE_FORMAT,
        "run_id": b.run_id,
        "run": b.run_name,
        "engine": b.engine.as_str(),
        "attune_version": b.attune_version,
        "sha256": sha256,
        "files": shas,
    });
    files.push((
        "bundle.json".into(),
        serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
    ));
    BundleFiles {
        files,
        sha256,
        unmapped,
        model_source: m.describe(),
    }
}

/// `dir` must not exist, or be an empty folder.
fn check_empty_destination(dir: &Path) -> Result<(), EngineError> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(EngineError::InvalidInput(format!(
                "{} exists and is not a folder: name a new or empty folder for the bundle",
                dir.display()
            )));
        }
        let mut entries = std::fs::read_dir(dir).map_err(|source| EngineError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if entries.next().is_some() {
            return Err(EngineError::InvalidInput(format!(
                "{} is not empty: name a new or empty folder for the bundle",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Writes `files` into a hidden sibling of `dir`, then renames it to `dir`.
fn write_bundle(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), EngineError> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        EngineError::InvalidInput(format!("{}: name a folder for the bundle", dir.display()))
    })?;
    std::fs::create_dir_all(&parent).map_err(|source| EngineError::Write {
        path: parent.clone(),
        source,
    })?;
    let tmp = parent.join(format!(
        ".{name}.attune-bundle-{}.partial",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let write = |path: &Path, bytes: &[u8]| -> Result<(), EngineError> {
        let w = |source| EngineError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(w)?;
        }
        std::fs::write(path, bytes).map_err(w)
    };
    let res = (|| {
        for (rel, bytes) in files {
            write(&tmp.join(rel), bytes)?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for exe in ["run.sh", "train_trl.py", "slurm.sbatch"] {
                let p = tmp.join(exe);
                if p.exists() {
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                        .map_err(|source| EngineError::Write { path: p, source })?;
                }
            }
        }
        if dir.exists() {
            std::fs::remove_dir(dir).map_err(|source| EngineError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        std::fs::rename(&tmp, dir).map_err(|source| EngineError::Write {
            path: dir.to_path_buf(),
            source,
        })
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

// ---------------------------------------------------------------------------------------
// GPU memory
// ---------------------------------------------------------------------------------------

/// The CUDA context, cuBLAS workspaces and the caching allocator's slack, per GPU.
const GPU_RUNTIME: u64 = 1 << 30;

/// Estimated peak GPU memory per GPU, in bytes, of the bundle's TRL recipe for `method` on a
/// model shaped like `cfg` at `batch_size` rows of `max_len` tokens per GPU, spread over `gpus`
/// GPUs (more than one: DeepSpeed ZeRO-3, which shards weights, gradients and optimizer state
/// evenly). A formula, not a measurement (no GPU was at hand when it was written):
/// - the f32 weights (train_trl.py loads f32; 4 bytes per parameter) and their bf16 copies
///   that autocast keeps for the step (2 bytes);
/// - per trained parameter its f32 gradient and AdamW's two moments (12 bytes), and 4 more
///   where it is not a weight (LoRA matrices, the soft prompt);
/// - per token, in bf16, what each decoder layer keeps for the backward pass with PyTorch's
///   SDPA (no attention matrix): the norms' outputs and residuals (4h), q, k, v and the
///   attention output (2q + 2kv), the MLP's gate, up and product (3i) and its input (h);
/// - the logits in bf16 and in f32 with their f32 gradient (10 bytes per vocabulary entry);
/// - [`GPU_RUNTIME`]; all times 1.15.
pub fn gpu_memory_estimate(
    cfg: &attune_models::config::Config,
    method: &MethodSpec,
    batch_size: usize,
    max_len: usize,
    gpus: u64,
) -> u64 {
    let m = |a: u64, b: u64| a.saturating_mul(b);
    let p = cfg.num_parameters() as u64;
    let t = crate::runs::trainable_params(cfg, method);
    let shard = gpus.max(1);
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let q = cfg.num_attention_heads as u64 * cfg.head_dim() as u64;
    let kv = cfg.num_key_value_heads as u64 * cfg.head_dim() as u64;
    let prefix = match method {
        MethodSpec::Prompt { virtual_tokens, .. } => *virtual_tokens as u64,
        _ => 0,
    };
    let tokens = m(batch_size as u64, (max_len as u64).saturating_add(prefix));
    let weights = m(6, p) / shard;
    let optimizer = match method {
        MethodSpec::Full => m(12, t),
        _ => m(16, t),
    } / shard;
    let per_layer = 2 * (5 * h + 2 * q + 2 * kv + 3 * i);
    let activations = m(
        tokens,
        m(per_layer, cfg.num_hidden_layers as u64).saturating_add(m(10, cfg.vocab_size as u64)),
    );
    let sum = weights
        .saturating_add(optimizer)
        .saturating_add(activations)
        .saturating_add(GPU_RUNTIME);
    (sum as f64 * 1.15).ceil() as u64
}

/// What `spec`'s run would need on one GPU and sharded over eight, for each training method
/// (LoRA keeps `spec`'s settings when it is LoRA, else Attune's default LoRA; prompt tuning
/// likewise with 20 virtual tokens).
pub(crate) fn gpu_needs(cfg: &attune_models::config::Config, spec: &RunSpec) -> Vec<GpuNeed> {
    let lora = match &spec.method {
        m @ MethodSpec::Lora { .. } => m.clone(),
        _ => MethodSpec::lora_default(),
    };
    let prompt = match &spec.method {
        m @ MethodSpec::Prompt { .. } => m.clone(),
        _ => MethodSpec::Prompt {
            virtual_tokens: 20,
            init_text: None,
        },
    };
    let mut out = Vec::new();
    for method in [MethodSpec::Full, lora, prompt] {
        for gpus in [1u64, 8] {
            out.push(GpuNeed {
                method: method.name().to_string(),
                gpus,
                memory_mb: gpu_memory_estimate(cfg, &method, spec.batch_size, spec.max_len, gpus)
                    .div_ceil(1 << 20),
            });
        }
    }
    out
}

/// The offer the advisor makes when a run will not fit here or exceeds the budget.
pub(crate) fn gpu_offer(
    reason: String,
    cfg: &attune_models::config::Config,
    spec: &RunSpec,
) -> GpuOffer {
    let needs = gpu_needs(cfg, spec);
    let this = needs
        .iter()
        .find(|n| n.method == spec.method.name() && n.gpus == 1)
        .map(|n| n.memory_mb)
        .unwrap_or(0);
    GpuOffer {
        reason,
        how: format!(
            "Hand it to a GPU machine as a bundle (TRL + accelerate, or Axolotl; about {} GiB \
             on one GPU for this run): \"Export to a GPU machine\" on the run, or `attune train \
             ... --create-only` then `attune runs export ID --engine trl --out DIR`; bring the \
             result back with `attune runs import-result ID DIR/output`.",
            this.div_ceil(1024).max(1)
        ),
        needs,
    }
}

// ---------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------

/// Where an engine's output keeps its parts.
struct ResultLayout {
    /// The adapter folder (adapter_config.json) or the full model folder (config.json).
    weights: PathBuf,
    full: bool,
    trainer_state: Option<PathBuf>,
    /// `output/attune_result.json` (written by train_trl.py).
    result: Option<Value>,
    /// The bundle's `bundle.json`, looked for in the output folder and its parent.
    manifest: Option<Value>,
}

fn read_json(path: &Path) -> Result<Value, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| EngineError::InvalidInput(format!("{}: not valid JSON ({e})", path.display())))
}

/// The newest `checkpoint-N` folder under `dir` holding `file`.
fn newest_checkpoint_with(dir: &Path, file: &str) -> Option<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let p = e.path().join(file);
        if p.is_file() && best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, p));
        }
    }
    best.map(|(_, p)| p)
}

fn result_layout(dir: &Path) -> Result<ResultLayout, EngineError> {
    if !dir.is_dir() {
        return Err(EngineError::InvalidInput(format!(
            "{} is not a folder: name the bundle's output folder (output/) or the adapter folder \
             inside it",
            dir.display()
        )));
    }
    let result_path = dir.join("attune_result.json");
    let result = if result_path.is_file() {
        Some(read_json(&result_path)?)
    } else {
        None
    };
    let named = result
        .as_ref()
        .and_then(|r| r.get("result_dir"))
        .and_then(Value::as_str)
        .map(|d| dir.join(d));
    let candidates: Vec<PathBuf> = named
        .into_iter()
        .chain([dir.join("adapter"), dir.join("model"), dir.to_path_buf()])
        .collect();
    let weights = candidates
        .into_iter()
        .find(|d| d.join("adapter_config.json").is_file() || d.join("config.json").is_file())
        .or_else(|| {
            newest_checkpoint_with(dir, "adapter_config.json")
                .and_then(|p| p.parent().map(Path::to_path_buf))
        })
        .ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "{}: no adapter (adapter_config.json) or model (config.json) here, nor in \
                 adapter/, model/ or a checkpoint-N/ folder",
                dir.display()
            ))
        })?;
    let full = !weights.join("adapter_config.json").is_file();
    let trainer_state = [dir.join("trainer_state.json")]
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| newest_checkpoint_with(dir, "trainer_state.json"));
    let manifest = [dir.join("bundle.json")]
        .into_iter()
        .chain(dir.parent().map(|p| p.join("bundle.json")))
        .find(|p| p.is_file())
        .map(|p| read_json(&p))
        .transpose()?;
    Ok(ResultLayout {
        weights,
        full,
        trainer_state,
        result,
        manifest,
    })
}

/// `trainer_state.json`'s `log_history` as the run's metrics: entries with `loss` are
/// training steps (`learning_rate`, `grad_norm`), entries with `eval_loss` evaluations.
/// The summary entry at the end (`train_loss`) is skipped.
pub(crate) fn metrics_from_trainer_state(
    state: &Value,
    path: &Path,
    now: &str,
) -> Result<Vec<MetricRow>, EngineError> {
    let history = state
        .get("log_history")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "{}: no log_history list (is it a Hugging Face trainer_state.json?)",
                path.display()
            ))
        })?;
    let mut out: BTreeMap<(String, i64), MetricRow> = BTreeMap::new();
    for (i, h) in history.iter().enumerate() {
        let step = h.get("step").and_then(Value::as_i64);
        let (kind, loss) = if let Some(l) = h.get("loss").and_then(Value::as_f64) {
            ("train", l)
        } else if let Some(l) = h.get("eval_loss").and_then(Value::as_f64) {
            ("eval", l)
        } else {
            continue;
        };
        let step = step.filter(|s| *s >= 0).ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "{}: log_history entry {i} has a loss but no step",
                path.display()
            ))
        })?;
        if !loss.is_finite() {
            return Err(EngineError::InvalidInput(format!(
                "{}: log_history entry {i} (step {step}) has a loss of {loss}",
                path.display()
            )));
        }
        out.insert(
            (kind.to_string(), step),
            MetricRow {
                step,
                kind: kind.to_string(),
                loss,
                lr: h.get("learning_rate").and_then(Value::as_f64),
                grad_norm: h.get("grad_norm").and_then(Value::as_f64),
                tokens_per_s: None,
                memory_mb: None,
                pref: None,
                at: now.to_string(),
            },
        );
    }
    Ok(out.into_values().collect())
}

impl Engine {
    /// Writes run `id_or_name` as a bundle for `engine` into `out` (a new or empty folder)
    /// and records it. The run may be in any state; its dataset must be unchanged since it
    /// was created.
    pub fn export_bundle(
        &self,
        id_or_name: &str,
        engine: BundleEngine,
        out: &Path,
    ) -> Result<BundleReply, EngineError> {
        let r = self.run_row(id_or_name)?;
        let spec: RunSpec = serde_json::from_str(&r.config_json).map_err(|e| {
            EngineError::db(
                self.store.path(),
                format!("run id {}: bad config: {e}", r.id),
            )
        })?;
        if engine == BundleEngine::Axolotl && matches!(spec.method, MethodSpec::Prompt { .. }) {
            return Err(EngineError::InvalidInput(format!(
                "run '{}' is prompt tuning, which Axolotl does not have: export it with \
                 --engine trl (PEFT's prompt tuning)",
                r.name
            )));
        }
        if spec.preference.is_some() {
            // The bundle's scripts are supervised fine-tuning (SFTTrainer, Axolotl's SFT); a
            // preference run exported as one would silently train something else.
            return Err(EngineError::ExportUnsupported {
                what: format!("run '{}'", r.name),
                reason: "it is preference training (DPO/ORPO), and bundles carry supervised \
                         fine-tuning only (TRL's SFTTrainer, Axolotl's SFT) for now"
                    .into(),
            });
        }
        check_empty_destination(out)?;
        let model = self.find_model(&r.model_id.to_string())?;
        let (_, ds, model_path) = self.run_inputs(&r)?;
        let (_, tok, tmpl) = attune_models::loader::text_side(&model_path).map_err(|source| {
            EngineError::ModelLoad {
                name: model.name.clone(),
                path: model_path.clone(),
                source: Box::new(source),
            }
        })?;
        let train: Vec<Sample> = self
            .dataset_rows(ds.id, SplitName::Train)?
            .into_iter()
            .map(|row| row.sample)
            .collect();
        let valid: Vec<Sample> = self
            .dataset_rows(ds.id, spec.eval_split)?
            .into_iter()
            .take(spec.eval_limit.unwrap_or(usize::MAX))
            .map(|row| row.sample)
            .collect();
        let input = BundleInput {
            run_id: r.id,
            run_name: &r.name,
            spec: &spec,
            total_steps: r.total_steps.max(1) as u64,
            engine,
            model: &model,
            model_path: &model_path,
            chat_template: tmpl.source(),
            eos_token_ids: tok.eos_token_ids(),
            end_of_text_id: attune_models::train::end_of_text_id(&tok),
            dataset_name: &ds.name,
            dataset_hash: &ds.content_hash,
            train: &train,
            valid: &valid,
            attune_version: crate::export::ATTUNE_VERSION,
        };
        let bundle = bundle_files(&input);
        write_bundle(out, &bundle.files)?;
        let dir = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
        self.store.insert_bundle(&BundleRow {
            id: 0,
            run_id: r.id,
            engine: engine.as_str().to_string(),
            sha256: bundle.sha256.clone(),
            path: dir.to_string_lossy().into_owned(),
            attune_version: crate::export::ATTUNE_VERSION.to_string(),
            created_at: crate::clock::now_rfc3339(),
            adapter_id: None,
            engine_version: None,
            result_path: None,
            imported_at: None,
        })?;
        Ok(BundleReply {
            run_id: r.id,
            run: r.name.clone(),
            engine,
            dir: dir.to_string_lossy().into_owned(),
            sha256: bundle.sha256,
            files: bundle.files.iter().map(|(p, _)| p.clone()).collect(),
            train_rows: train.len() as u64,
            valid_rows: valid.len() as u64,
            model_source: bundle.model_source,
            unmapped: bundle.unmapped,
        })
    }

    /// Imports the result of a bundle exported from run `id_or_name`: `dir` is the bundle's
    /// `output/` (or the adapter or model folder an engine wrote). The adapter is checked
    /// against the run's base model and registered as the run's (named after the run), the
    /// engine's `trainer_state.json` becomes the run's metrics, and the run is completed at
    /// the engine's step count, with the bundle's provenance recorded, in one transaction.
    pub fn import_bundle_result(
        &self,
        id_or_name: &str,
        dir: &Path,
    ) -> Result<ImportResultReply, EngineError> {
        let r = self.run_row(id_or_name)?;
        if r.status == "running" {
            return Err(EngineError::RunState {
                name: r.name,
                status: r.status,
                reason: "it is training here; a result from elsewhere cannot replace it".into(),
            });
        }
        let bundles = self.store.run_bundles(r.id)?;
        if bundles.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "run '{}' was never exported: `attune runs export {} --engine trl --out DIR` \
                 writes the bundle whose result comes back here",
                r.name, r.id
            )));
        }
        if let Some(a) = self
            .store
            .list_adapters()?
            .into_iter()
            .find(|a| a.run_id == Some(r.id))
        {
            return Err(EngineError::RunState {
                name: r.name,
                status: r.status,
                reason: format!("it already has an adapter ('{}')", a.name),
            });
        }
        let layout = result_layout(dir)?;
        let sha = layout
            .result
            .as_ref()
            .and_then(|v| v.get("bundle_sha256"))
            .or_else(|| layout.manifest.as_ref().and_then(|v| v.get("sha256")))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "{}: no provenance: neither attune_result.json (written by train_trl.py) \
                     nor the bundle's bundle.json beside it or one folder up",
                    dir.display()
                ))
            })?;
        let bundle = bundles
            .iter()
            .rev()
            .find(|b| b.sha256 == sha)
            .ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "{}: trained from bundle {sha}, which is not one of run '{}''s exports ({})",
                    dir.display(),
                    r.name,
                    bundles
                        .iter()
                        .map(|b| format!("{} at {}", &b.sha256[..12], b.path))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let engine_version = layout
            .result
            .as_ref()
            .and_then(|v| v.get("engine_version"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("{} (version not recorded)", bundle.engine));
        let base = self.find_model(&r.model_id.to_string())?;
        let kind = if layout.full {
            attune_models::loader::check(&layout.weights).map_err(|e| {
                EngineError::InvalidAdapter {
                    path: layout.weights.clone(),
                    reason: format!("not a loadable full fine-tune: {e}"),
                }
            })?;
            "full"
        } else {
            self.check_peft_adapter(&layout.weights, &base)?
        };
        if kind != r.method {
            return Err(EngineError::InvalidInput(format!(
                "{}: the result is a {kind} adapter, but run '{}' is {}",
                layout.weights.display(),
                r.name,
                r.method
            )));
        }
        let now = crate::clock::now_rfc3339();
        let metrics = match &layout.trainer_state {
            Some(p) => metrics_from_trainer_state(&read_json(p)?, p, &now)?,
            None => Vec::new(),
        };
        let steps = layout
            .trainer_state
            .as_ref()
            .and_then(|p| read_json(p).ok())
            .and_then(|s| s.get("global_step").and_then(Value::as_i64))
            .or_else(|| {
                metrics
                    .iter()
                    .filter(|m| m.kind == "train")
                    .map(|m| m.step)
                    .max()
            })
            .unwrap_or(0);
        let name = r.name.clone();
        if self.store.find_adapter_by_name(&name)?.is_some() {
            return Err(EngineError::NameTaken {
                what: "an adapter",
                name,
            });
        }
        let dst = self.copy_into_library(&layout.weights, &name)?;
        let row = AdapterRow {
            id: 0,
            name: name.clone(),
            kind: kind.to_string(),
            base_model_id: r.model_id,
            run_id: Some(r.id),
            dataset_id: Some(r.dataset_id),
            path: dst.to_string_lossy().into_owned(),
            created_at: now.clone(),
            metrics_json: "{}".into(),
        };
        let result_path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let imported = ImportedResult {
            bundle_id: bundle.id,
            adapter: &row,
            metrics: &metrics,
            steps,
            engine_version: &engine_version,
            result_path: &result_path.to_string_lossy(),
            now: &now,
        };
        let adapter = match self.store.import_bundle_result(r.id, &imported) {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dst);
                return Err(e);
            }
        };
        Ok(ImportResultReply {
            run_id: r.id,
            run: r.name,
            adapter: adapter.name,
            kind: kind.to_string(),
            engine: BundleEngine::parse(&bundle.engine).unwrap_or(BundleEngine::Trl),
            engine_version,
            bundle_sha256: bundle.sha256.clone(),
            train_points: metrics.iter().filter(|m| m.kind == "train").count() as u64,
            eval_points: metrics.iter().filter(|m| m.kind == "eval").count() as u64,
            steps: steps.max(0) as u64,
        })
    }
}

#[cfg(test)]
mod tests;
