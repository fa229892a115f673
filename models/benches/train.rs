//! Training benchmark on the default model, the setting of `shared/reference/README.md`: batch
//! 4 x 256 tokens of the PubMedQA corpus packed into blocks (each line + `<|endoftext|>`), loss on
//! every token, AdamW (lr 2e-4, weight decay 0.01), 2 warm-up steps then timed steps; tokens/s
//! (median step) and peak RSS per method. `scripts/bench-side-by-side.sh` runs it beside the
//! PyTorch + PEFT harness on the same machine for the comparison.
//!
//! `cargo bench --workspace --bench train`
//! Environment: `ATTUNE_BENCH_METHODS=lora,full,prompt` (default all three),
//! `ATTUNE_BENCH_STEPS` (timed steps, default 20), `ATTUNE_CORPUS` (default
//! `../shared/data/pubmedqa/corpus.txt` from the workspace root), `ATTUNE_BENCH_JSON=<file>`
//! (also write the figures there as JSON).
//!
//! `ATTUNE_BENCH_BASE=f32,bf16,quantized` runs LoRA and prompt tuning once per form of the
//! frozen base (`Llama::set_base_form`; default `f32`, the app's default). `ATTUNE_BENCH_ARCH=
//! qwen3-0.6b,qwen3-1.7b,llama3.2-3b` trains those families at their real dimensions with random
//! weights (projections in `ATTUNE_BENCH_QUANT`, default q4_k; the embedding Q8_0) on random
//! token ids instead of the default model, at `ATTUNE_BENCH_BATCH` x `ATTUNE_BENCH_SEQ` (default
//! 1 x 256 there, 4 x 256 on the default model); its peak RSS is the training's (the peak is
//! reset after the random weights are built, which a file load does not need).
//!
//! `ATTUNE_PROFILE_OPS=1` adds each fused op's wall time per timed step. `ATTUNE_MATMUL=f32`
//! forces the f32 products where the CPU has AMX (A/B runs).
//!
//! Each method runs in a child process of this binary so that its peak RSS is its own.

use std::path::PathBuf;
use std::time::Instant;

#[path = "common/arch.rs"]
mod arch;

use attune_models::linear::{BaseForm, ComputeMode};
use attune_models::loader::{self, LoadOptions};
use attune_models::train::{
    self, AdamWConfig, Example, LoraConfig, Method, PromptConfig, PromptInit, Schedule,
    ScheduleKind, TrainConfig, Trainer,
};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn corpus_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ATTUNE_CORPUS") {
        return p.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/pubmedqa/corpus.txt")
}

fn method(name: &str) -> R<Method> {
    Ok(match name {
        "lora" => Method::Lora(LoraConfig {
            r: 8,
            alpha: 16.0,
            ..LoraConfig::default()
        }),
        "full" => Method::Full,
        "prompt" => Method::Prompt(PromptConfig {
            num_virtual_tokens: 20,
            init: PromptInit::Text(
                "Read the following biomedical text carefully and continue it in the same style:"
                    .into(),
            ),
        }),
        other => return Err(format!("unknown method {other}").into()),
    })
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Resets this process's peak RSS (VmHWM) to its current RSS.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One method on one base form and model (`default` or an `ATTUNE_BENCH_ARCH` preset), in
/// this process: prints one tab-separated result line.
fn run_one(name: &str, base: BaseForm, arch: &str, steps: usize) -> R<()> {
    let m = method(name)?;
    let compact = base != BaseForm::F32 && !matches!(m, Method::Full);
    let (mut model, tok, blocks, batch) = if arch == "default" {
        // Auto, as the app trains an f32 base: the frozen base in bf16 on the matrix units
        // where the CPU has them (`ATTUNE_MATMUL=f32` forces the f32 path for A/B runs); a
        // compact base loads with its quantized blocks only, as the engine loads it.
        let loaded = loader::load(
            &attune_models::default_model_path(),
            &LoadOptions {
                compute: if compact {
                    ComputeMode::Quantized
                } else {
                    ComputeMode::Auto
                },
            },
        )?;
        let tok = loaded.tokenizer;
        let mut model = loaded.model;
        if compact {
            model.set_base_form(base)?;
        }
        let text = std::fs::read_to_string(corpus_path())?;
        let opts = train::RenderOptions {
            loss_on: train::LossOn::All,
            max_len: usize::MAX,
        };
        let docs: Vec<Example> = text
            .lines()
            .map(|l| train::render_text(&tok, l, &opts))
            .collect::<Result<_, _>>()?;
        let seq = env_usize("ATTUNE_BENCH_SEQ", 256);
        let blocks = train::pack(&docs, seq);
        (model, Some(tok), blocks, env_usize("ATTUNE_BENCH_BATCH", 4))
    } else {
        let cfg = arch::preset(arch)?;
        let quant = std::env::var("ATTUNE_BENCH_QUANT").unwrap_or_else(|_| "q4_k".into());
        let dtype = arch::dtype(&quant)?;
        let mode = if compact {
            ComputeMode::Quantized
        } else {
            ComputeMode::Auto
        };
        let (mut model, _) = arch::random_model(&cfg, Some(dtype), mode, 7)?;
        if compact {
            model.set_base_form(base)?;
        }
        let seq = env_usize("ATTUNE_BENCH_SEQ", 256);
        let batch = env_usize("ATTUNE_BENCH_BATCH", 1);
        let mut s = 0x9e37_79b9_u64;
        let blocks: Vec<Example> = (0..batch * (steps + 2))
            .map(|_| {
                let ids: Vec<u32> = (0..seq)
                    .map(|_| {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((s >> 33) % cfg.vocab_size as u64) as u32
                    })
                    .collect();
                Example {
                    targets: vec![true; seq],
                    full_len: seq,
                    truncated: false,
                    ids,
                }
            })
            .collect();
        // The default model's tokenizer serves prompt tuning's init text (its ids lie inside
        // every preset's vocabulary).
        let (_, tok, _) = loader::text_side(&attune_models::default_model_path())?;
        (model, Some(tok), blocks, batch)
    };
    let built = arch != "default";
    eprintln!(
        "{arch} {name} on a {} base: weights held {:.0} MiB",
        base.as_str(),
        model.held_bytes() as f64 / 1048576.0
    );
    let tok = tok.ok_or("no tokenizer")?;
    let trainable = train::prepare(&mut model, &tok, &m, 42)?;
    if built {
        reset_peak_rss();
    }
    let total = steps + 2;
    let cfg = TrainConfig {
        batch_size: batch,
        grad_accum: 1,
        steps: total,
        optimizer: AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            peak_lr: 2e-4,
            warmup_steps: 0,
            total_steps: total,
            final_frac: 1.0,
        },
        max_grad_norm: 0.0,
        seed: 42,
        shuffle: false,
    };
    let mut trainer = Trainer::new(model, trainable, cfg, blocks, 0)?;
    let mut times = Vec::new();
    let mut first_loss = f64::NAN;
    let mut tokens = 0;
    for i in 0..total {
        let t = Instant::now();
        let s = trainer.train_step()?;
        if i == 0 {
            first_loss = s.loss;
        }
        tokens = s.tokens;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        } else if i == 1 {
            attune_models::kernels::take_profile();
        }
    }
    for (op, secs, calls) in attune_models::kernels::take_profile() {
        println!(
            "PROFILE\t{name}\t{op}\t{:.3}\t{}",
            secs / steps as f64,
            calls / steps.max(1)
        );
    }
    let med = median(times);
    println!(
        "RESULT\t{name}/{}\t{:.1}\t{:.0}\t{first_loss:.4}\t{med:.2}",
        base.as_str(),
        tokens as f64 / med,
        peak_rss_mb()
    );
    Ok(())
}

fn main() -> R<()> {
    // The allocator as the app and `attune train` set it (before any thread starts).
    attune_models::single_arena();
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = std::env::var("ATTUNE_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    if let Some(pos) = args.iter().position(|a| a == "--child") {
        let base = BaseForm::parse(&args[pos + 2]).ok_or("--child METHOD BASE ARCH")?;
        return run_one(&args[pos + 1], base, &args[pos + 3], steps);
    }
    let model = attune_models::default_model_path();
    if !model.is_file() {
        eprintln!(
            "default model not found at {} (run scripts/fetch-model.sh)",
            model.display()
        );
        return Ok(());
    }
    let methods =
        std::env::var("ATTUNE_BENCH_METHODS").unwrap_or_else(|_| "lora,full,prompt".into());
    let bases = std::env::var("ATTUNE_BENCH_BASE").unwrap_or_else(|_| "f32".into());
    let archs = std::env::var("ATTUNE_BENCH_ARCH").unwrap_or_else(|_| "default".into());
    for b in bases.split(',') {
        BaseForm::parse(b).ok_or(format!(
            "ATTUNE_BENCH_BASE: '{b}' is not f32, bf16 or quantized"
        ))?;
    }
    let shape = |d: usize| {
        format!(
            "{} x {}",
            env_usize("ATTUNE_BENCH_BATCH", d),
            env_usize("ATTUNE_BENCH_SEQ", 256)
        )
    };
    println!(
        "training, batch {} tokens (default model; {} on ATTUNE_BENCH_ARCH models), {steps} timed steps after 2 warm-up, {} threads",
        shape(4),
        shape(1),
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<14} {:<18} {:>10} {:>12} {:>12} {:>10}",
        "model", "method/base", "tok/s", "peak RSS", "loss step 1", "step s"
    );
    let mut results = serde_json::Map::new();
    let mut runs: Vec<(String, String, String)> = Vec::new();
    for a in archs.split(',') {
        for m in methods.split(',') {
            // Full fine-tuning trains f32 weights whatever the base form.
            let forms: Vec<&str> = if m == "full" {
                vec!["f32"]
            } else {
                bases.split(',').collect()
            };
            for b in forms {
                runs.push((a.trim().into(), m.trim().into(), b.trim().into()));
            }
        }
    }
    for (a, m, b) in &runs {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--child", m, b, a])
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT\t")) else {
            return Err(format!(
                "{a} {m} {b}: failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        };
        let f: Vec<&str> = line.split('\t').collect();
        println!(
            "{:<14} {:<18} {:>10} {:>9} MB {:>12} {:>10}",
            a, f[1], f[2], f[3], f[4], f[5]
        );
        let num = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
        let key = if a == "default" && b == "f32" {
            m.to_string()
        } else if a == "default" {
            format!("{m}/{b}")
        } else {
            format!("{a}/{m}/{b}")
        };
        results.insert(
            key,
            serde_json::json!({
                "tok_s": num(f[2]),
                "peak_rss_mb": num(f[3]),
                "loss_step1": num(f[4]),
                "step_s": num(f[5]),
            }),
        );
        for p in stdout.lines().filter(|l| l.starts_with("PROFILE\t")) {
            let f: Vec<&str> = p.split('\t').collect();
            println!("  {:<26} {:>7} s/step {:>5} calls", f[2], f[3], f[4]);
        }
    }
    if let Some(path) = std::env::var_os("ATTUNE_BENCH_JSON") {
        let value = serde_json::json!({
            "threads": candle_core::utils::get_num_threads(),
            "batch": 4,
            "seq": 256,
            "steps": steps,
            "methods": results,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&value)?)
            .map_err(|e| format!("ATTUNE_BENCH_JSON {}: {e}", path.to_string_lossy()))?;
    }
    println!("reference: loss on batch 0 before any update = 3.2720 (LoRA, full); prompt tuning differs (virtual tokens)");
    Ok(())
}
