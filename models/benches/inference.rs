//! Inference benchmark on the default model (SmolLM2-135M-Instruct Q4_1 GGUF): prompt processing
//! (41 and 512 tokens) and greedy decode with the KV cache (64 and 128 tokens), medians of several
//! runs (2 threads). `scripts/bench-side-by-side.sh` runs it beside the PyTorch harness on the same
//! machine for the comparison.
//!
//! `cargo bench --workspace --bench inference`
//! Environment: `ATTUNE_BENCH_MODE=auto|f32|quantized` (default auto), `ATTUNE_BENCH_RUNS`,
//! `ATTUNE_BENCH_ONLY=pp` (prompt processing only, for profiling), `decode` (decode without
//! and with the reference LoRA, each with its op profile under `ATTUNE_PROFILE_OPS=1`) or `load` (3 loads), `ATTUNE_BENCH_JSON=<file>`
//! (also write the figures there as JSON).
//!
//! Other models and weight types, one row each (each in a child process, so its peak RSS is its
//! own): `ATTUNE_BENCH_ARCH=qwen3-0.6b,gemma3-270m,...` (a family at its real dimensions with
//! random weights: `common/arch.rs`), `ATTUNE_BENCH_QUANT=q4_1,q8_0,q4_k,q5_k,q6_k` (the
//! projections quantized to that type by candle's quantizer, from the default model's f32 values
//! or the random ones; widths that are not whole blocks fall back to Q8_0, as llama.cpp's
//! quantizer does, and are counted). The rows give prompt processing (41 tokens), decode (64
//! tokens), the decode rate in GB/s of quantized weights read, and peak RSS.

use std::time::Instant;

#[path = "common/arch.rs"]
mod arch;

use attune_models::gguf;
use attune_models::linear::ComputeMode;
use attune_models::llama::Llama;
use candle_core::{Device, Tensor, D};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ids(v: &[u32]) -> candle_core::Result<Tensor> {
    Tensor::new(v, &Device::Cpu)?.unsqueeze(0)
}

/// Prompt processing: tok/s of one `forward_last` over `prompt` from an empty cache.
fn pp(model: &Llama, prompt: &[u32], runs: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let mut cache = model.new_cache();
    let x = ids(prompt)?;
    model.forward_last(&x, &mut cache)?; // warm-up
    let mut rates = Vec::new();
    for _ in 0..runs {
        cache.clear();
        let t = Instant::now();
        let logits = model.forward_last(&x, &mut cache)?;
        logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        rates.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

/// Greedy decode of `n` tokens after `prompt`; tok/s of the decode steps only.
fn decode(
    model: &Llama,
    prompt: &[u32],
    n: usize,
    runs: usize,
) -> Result<(f64, Vec<u32>), Box<dyn std::error::Error>> {
    let mut rates = Vec::new();
    let mut out = Vec::new();
    let mut cache = model.new_cache();
    for _ in 0..runs + 1 {
        cache.clear();
        let logits = model.forward_last(&ids(prompt)?, &mut cache)?;
        let mut next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
        out.clear();
        let t = Instant::now();
        for _ in 0..n {
            out.push(next);
            let logits = model.forward_last(&ids(&[next])?, &mut cache)?;
            next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
        }
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    rates.remove(0); // first run warms the allocator and caches
    Ok((median(rates), out))
}

/// The model with the reference PEFT LoRA (r=8, all seven projections) attached, as the
/// playground runs an adapter; `None` when `shared/reference` has no such adapter.
fn with_reference_lora(model: &Llama) -> Result<Option<Llama>, Box<dyn std::error::Error>> {
    let lora_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/adapters/lora");
    Ok(match attune_models::train::peft::load(&lora_dir) {
        Ok(attune_models::train::peft::Adapter::Lora {
            config, tensors, ..
        }) => {
            let mut adapted = model.clone();
            attune_models::train::peft::apply_lora(&mut adapted, &config, &tensors)?;
            Some(adapted)
        }
        _ => None,
    })
}

/// Prints and clears the op profile (empty unless `ATTUNE_PROFILE_OPS=1`).
fn print_profile() {
    let mut p = attune_models::kernels::take_profile();
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (op, s, calls) in p {
        println!("  {op:<32} {s:>8.3} s {calls:>8} calls");
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

/// One row of the matrix, in this process: `arch` ("default" or a preset) with its projections
/// in `quant` ("file" keeps the default model's own). Prints a tab-separated RESULT line.
fn run_row(
    arch: &str,
    quant: &str,
    mode: ComputeMode,
    runs: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let dtype = match quant {
        "file" | "f32" => None,
        q => Some(arch::dtype(q)?),
    };
    let (model, fallbacks) = if arch == "default" {
        let g = gguf::load(&attune_models::default_model_path(), mode)?;
        match dtype {
            Some(dt) => arch::requantized(&g.model, dt, mode)?,
            None => (g.model, 0),
        }
    } else {
        let cfg = arch::preset(arch)?;
        arch::random_model(&cfg, dtype, mode, 7)?
    };
    let build_s = t.elapsed().as_secs_f64();
    let p41: Vec<u32> = (0..41u32).map(|i| 200 + (i * 7919) % 40000).collect();
    let pp41 = if mode == ComputeMode::Quantized {
        f64::NAN
    } else {
        pp(&model, &p41, runs)?
    };
    let (d64, _) = decode(&model, &p41, 64, runs)?;
    let gb = arch::quantized_bytes(&model) as f64 / 1e9;
    println!(
        "RESULT\t{arch}\t{quant}\t{pp41:.1}\t{d64:.2}\t{gb:.3}\t{:.2}\t{:.0}\t{fallbacks}\t{build_s:.0}",
        gb * d64,
        peak_rss_mb()
    );
    Ok(())
}

/// The matrix of `ATTUNE_BENCH_ARCH` x `ATTUNE_BENCH_QUANT`, one child process per row.
fn matrix(mode: ComputeMode, runs: usize) -> Result<(), Box<dyn std::error::Error>> {
    let archs = std::env::var("ATTUNE_BENCH_ARCH").unwrap_or_else(|_| "default".into());
    let quants = std::env::var("ATTUNE_BENCH_QUANT").unwrap_or_else(|_| "file".into());
    println!(
        "attune inference matrix ({mode:?}), {} threads, medians of {runs}; the machine may be shared",
        candle_core::utils::get_num_threads()
    );
    println!("| model | weights | pp 41 tok/s | decode 64 tok/s | quantized GB | decode GB/s | peak RSS MB | Q8_0 fallbacks |");
    println!("|---|---|---|---|---|---|---|---|");
    for a in archs.split(',') {
        for q in quants.split(',') {
            let out = std::process::Command::new(std::env::current_exe()?)
                .args(["--row", a, q])
                .output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT\t")) else {
                eprintln!("{a} {q}: failed: {}", String::from_utf8_lossy(&out.stderr));
                continue;
            };
            let f: Vec<&str> = line.split('\t').collect();
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8]
            );
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The allocator as the app and `attune train` set it (before any thread starts).
    attune_models::single_arena();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let mode = match std::env::var("ATTUNE_BENCH_MODE").as_deref() {
        Ok("f32") => ComputeMode::F32,
        Ok("quantized") => ComputeMode::Quantized,
        _ => ComputeMode::Auto,
    };
    let runs: usize = std::env::var("ATTUNE_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--row") {
        return run_row(&args[pos + 1], &args[pos + 2], mode, runs);
    }
    if std::env::var_os("ATTUNE_BENCH_ARCH").is_some()
        || std::env::var_os("ATTUNE_BENCH_QUANT").is_some()
    {
        return matrix(mode, runs);
    }
    let path = attune_models::default_model_path();
    if !path.is_file() {
        return Err(format!(
            "default model missing at {}: run scripts/fetch-model.sh",
            path.display()
        )
        .into());
    }
    // Load time: the median of 3 loads (the file in the page cache after the first), each
    // model dropped before the next; `ATTUNE_BENCH_ONLY=load` stops after printing them.
    let mut loads = Vec::new();
    let mut g = None;
    for _ in 0..3 {
        drop(g.take());
        let t = Instant::now();
        g = Some(gguf::load(&path, mode)?);
        loads.push(t.elapsed().as_secs_f64());
    }
    let load_s = median(loads.clone());
    if std::env::var("ATTUNE_BENCH_ONLY").as_deref() == Ok("load") {
        println!("load_s {load_s:.3} (runs: {loads:.3?})");
        return Ok(());
    }
    let model = g.ok_or("no model loaded")?.model;

    // The reference chat prompt (41 tokens) from shared/reference, else a fixed id sequence.
    let ref_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/reference_logits.json");
    let chat: Vec<u32> = std::fs::read_to_string(&ref_path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v["prompts"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == "chat")
                .and_then(|p| {
                    p["token_ids"].as_array().map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_u64().map(|x| x as u32))
                            .collect()
                    })
                })
        })
        .unwrap_or_else(|| (0..41).map(|i| 100 + i * 37).collect());
    let p41: Vec<u32> = chat.iter().cycle().take(41).copied().collect();
    let p512: Vec<u32> = (0..512u32).map(|i| 200 + (i * 7919) % 40000).collect();

    println!(
        "attune inference benchmark: {} ({mode:?}), {} threads, load {:.2} s, medians of {runs}",
        path.display(),
        candle_core::utils::get_num_threads(),
        load_s
    );
    if std::env::var("ATTUNE_BENCH_ONLY").as_deref() == Ok("decode") {
        // Decode alone, without and with the reference LoRA, each followed by its op profile
        // (`ATTUNE_PROFILE_OPS=1`): for profiling the per-token path.
        let _ = attune_models::kernels::take_profile();
        let (d64, _) = decode(&model, &chat, 64, runs)?;
        println!("decode, 64 tokens: {d64:.1} tok/s");
        print_profile();
        if let Some(adapted) = with_reference_lora(&model)? {
            let (d, _) = decode(&adapted, &chat, 64, runs)?;
            println!("decode, 64 tokens, LoRA r=8 on 7 projections: {d:.1} tok/s");
            print_profile();
        }
        return Ok(());
    }
    let _ = attune_models::kernels::take_profile();
    let pp41 = pp(&model, &p41, runs * 2)?;
    if std::env::var("ATTUNE_BENCH_ONLY").as_deref() == Ok("pp") {
        println!("op profile of the 41-token prompts:");
        print_profile();
    }
    let pp512 = pp(&model, &p512, runs.div_ceil(2).max(2))?;
    let mut json = serde_json::json!({
        "mode": format!("{mode:?}"),
        "threads": candle_core::utils::get_num_threads(),
        "runs": runs,
        "load_s": load_s,
        "pp_short_tokens": p41.len(),
        "pp_short_tok_s": pp41,
        "pp_long_tokens": p512.len(),
        "pp_long_tok_s": pp512,
    });
    if std::env::var("ATTUNE_BENCH_ONLY").as_deref() == Ok("pp") {
        println!("prompt processing, 41 tokens: {pp41:.0} tok/s; 512 tokens: {pp512:.0} tok/s");
        print_profile();
        return write_json(&json);
    }
    let (d64, toks) = decode(&model, &chat, 64, runs)?;
    let (d128, _) = decode(&model, &chat, 128, runs)?;
    // The same decode with the reference PEFT LoRA (r=8, all seven projections) attached, as the
    // playground runs an adapter: quantized base plus the low-rank branch.
    let lora_decode = match with_reference_lora(&model)? {
        Some(adapted) => Some(decode(&adapted, &chat, 64, runs)?.0),
        None => None,
    };
    println!("| work | attune |");
    println!("|---|---|");
    println!("| prompt processing, 41 tokens | {pp41:.0} tok/s |");
    println!("| prompt processing, 512 tokens | {pp512:.0} tok/s |");
    println!("| decode, 64 tokens | {d64:.1} tok/s |");
    println!("| decode, 128 tokens | {d128:.1} tok/s |");
    if let Some(d) = lora_decode {
        println!("| decode, 64 tokens, LoRA r=8 on 7 projections | {d:.1} tok/s |");
    }
    json["decode_64_tok_s"] = d64.into();
    json["decode_128_tok_s"] = d128.into();
    json["decode_64_lora_tok_s"] = lora_decode.into();
    println!(
        "greedy chat continuation (first 16 ids): {:?}",
        &toks[..16.min(toks.len())]
    );
    write_json(&json)
}

/// Writes `value` to `$ATTUNE_BENCH_JSON` when it is set.
fn write_json(value: &serde_json::Value) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(path) = std::env::var_os("ATTUNE_BENCH_JSON") {
        std::fs::write(&path, serde_json::to_string_pretty(value)?)
            .map_err(|e| format!("ATTUNE_BENCH_JSON {}: {e}", path.to_string_lossy()))?;
    }
    Ok(())
}
