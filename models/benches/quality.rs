//! The adaptation-quality proof: `shared/reference/QUALITY.md`'s recipe run exactly (the same
//! 160 PubMedQA training rows in the same order, batch 4, 40 steps, AdamW, 4 warm-up steps then
//! cosine to 10%, clip 1.0, assistant-only loss, rows over 1024 tokens dropped) with LoRA, prompt
//! tuning and full fine-tuning, each from a fresh base; then the mean NLL per assistant token on
//! the whole valid split, beside PEFT's figures. A method passes when its relative NLL drop is at
//! least PEFT's minus one percentage point.
//!
//! `cargo bench --workspace --bench quality`
//! Environment: `ATTUNE_QUALITY_METHODS=lora,prompt,full` (default), `ATTUNE_QUALITY_OUT`
//! (JSON of every per-step loss and the valid NLLs; default `target/quality.json`),
//! `ATTUNE_QUALITY_COMPUTE=auto` (the products as the app runs them: bf16 on AMX, else int8 on
//! VNNI for LoRA's and prompt tuning's frozen base; default f32),
//! `ATTUNE_QUALITY_BASE=bf16|quantized` (LoRA's and prompt tuning's frozen base in that form).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use attune_models::chat_template::Message;
use attune_models::linear::{BaseForm, ComputeMode};
use attune_models::loader::{self, LoadOptions};
use attune_models::train::{
    self, AdamWConfig, Example, LoraConfig, Method, PromptConfig, PromptInit, RenderOptions,
    Schedule, ScheduleKind, TrainConfig, Trainer,
};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

fn read_rows(path: &std::path::Path) -> R<Vec<(String, Vec<Message>)>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let msgs = v["messages"]
                .as_array()
                .ok_or("messages")?
                .iter()
                .map(|m| {
                    Ok(Message::new(
                        m["role"].as_str().ok_or("role")?,
                        m["content"].as_str().ok_or("content")?,
                    ))
                })
                .collect::<R<Vec<_>>>()?;
            Ok((v["id"].as_str().ok_or("id")?.to_string(), msgs))
        })
        .collect()
}

fn main() -> R<()> {
    let model_path = attune_models::default_model_path();
    if !model_path.is_file() {
        eprintln!(
            "default model not found at {} (run scripts/fetch-model.sh)",
            model_path.display()
        );
        return Ok(());
    }
    attune_models::tune_allocator();
    let q: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        shared().join("reference/quality_reference.json"),
    )?)?;
    let methods =
        std::env::var("ATTUNE_QUALITY_METHODS").unwrap_or_else(|_| "lora,prompt,full".into());
    let out_path = std::env::var_os("ATTUNE_QUALITY_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/quality.json")
        });

    // `ATTUNE_QUALITY_BASE=bf16|quantized`: the frozen base of LoRA and prompt tuning held in
    // that form (loaded with its quantized blocks, then made compact); default f32, exact.
    let base_form = match std::env::var("ATTUNE_QUALITY_BASE") {
        Ok(v) => Some(BaseForm::parse(&v).ok_or(format!(
            "ATTUNE_QUALITY_BASE={v}: expected f32, bf16 or quantized"
        ))?),
        Err(_) => None,
    }
    .filter(|f| *f != BaseForm::F32);
    // `ATTUNE_QUALITY_COMPUTE=auto`: the products as the app runs them (bf16 on the CPU's
    // matrix units where it has them: the frozen base, full fine-tuning's packed weights);
    // default f32 throughout, the exact comparison with PEFT.
    let auto = match std::env::var("ATTUNE_QUALITY_COMPUTE") {
        Ok(v) if v.eq_ignore_ascii_case("auto") => true,
        Ok(v) if v.eq_ignore_ascii_case("f32") => false,
        Ok(v) => return Err(format!("ATTUNE_QUALITY_COMPUTE={v}: expected auto or f32").into()),
        Err(_) => false,
    };
    let started = Instant::now();
    let mut base = loader::load(
        &model_path,
        &LoadOptions {
            compute: match (base_form, auto) {
                (Some(_), _) => ComputeMode::Quantized,
                (None, true) => ComputeMode::Auto,
                (None, false) => ComputeMode::F32,
            },
        },
    )?;
    if let Some(form) = base_form {
        base.model.set_base_form(form)?;
        eprintln!(
            "base held as {}: {:.0} MiB of weights",
            form.as_str(),
            base.model.held_bytes() as f64 / (1 << 20) as f64
        );
    }
    let opts = RenderOptions::default();
    let train_rows: HashMap<String, Vec<Message>> =
        read_rows(&shared().join("data/pubmedqa/train.jsonl"))?
            .into_iter()
            .collect();
    let order: Vec<String> = q["data"]["train_ids_in_order"]
        .as_array()
        .ok_or("train_ids_in_order")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let train_ex: Vec<Example> = order
        .iter()
        .map(|id| train::render_chat(&base.tokenizer, &base.chat_template, &train_rows[id], &opts))
        .collect::<Result<_, _>>()?;
    let valid_ex: Vec<Example> = read_rows(&shared().join("data/pubmedqa/valid.jsonl"))?
        .iter()
        .map(|(_, m)| train::render_chat(&base.tokenizer, &base.chat_template, m, &opts))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|e| !e.truncated)
        .collect();
    let pad = 2;

    let t = Instant::now();
    let (s, n) = train::evaluate(&base.model, &valid_ex, None, pad, |_, _| true)?;
    let base_nll = s / n as f64;
    eprintln!(
        "base valid NLL {base_nll:.4} over {n} tokens ({:.0} s)",
        t.elapsed().as_secs_f64()
    );
    let ref_base = q["base"]["valid"]["mean_nll"].as_f64().unwrap_or(f64::NAN);

    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for name in methods.split(',') {
        let (method, lr) = match name {
            "lora" => (Method::Lora(LoraConfig::default()), 2e-4),
            "prompt" => (
                Method::Prompt(PromptConfig {
                    num_virtual_tokens: 20,
                    init: PromptInit::Text(
                        "Answer the biomedical question using the abstract.".into(),
                    ),
                }),
                3e-2,
            ),
            "full" => (Method::Full, 2e-5),
            other => return Err(format!("unknown method {other}").into()),
        };
        let mut model = base.model.clone();
        let trainable = train::prepare(&mut model, &base.tokenizer, &method, 42)?;
        let cfg = TrainConfig {
            batch_size: 4,
            grad_accum: 1,
            steps: 40,
            optimizer: AdamWConfig::default(),
            schedule: Schedule {
                kind: ScheduleKind::Cosine,
                peak_lr: lr,
                warmup_steps: 4,
                total_steps: 40,
                final_frac: 0.1,
            },
            max_grad_norm: 1.0,
            seed: 42,
            shuffle: false,
        };
        let mut trainer = Trainer::new(model, trainable, cfg, train_ex.clone(), pad)?;
        let t = Instant::now();
        let mut losses = Vec::new();
        let mut tokens = 0usize;
        for _ in 0..40 {
            let m = trainer.train_step()?;
            eprintln!(
                "{name} step {:>2} loss {:.4} lr {:.2e} grad norm {:.3} ({:.1} s)",
                m.step, m.loss, m.lr, m.grad_norm, m.seconds
            );
            losses.push(m.loss);
            tokens += m.tokens;
        }
        let train_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (s, n) = trainer.evaluate(&valid_ex, |_, _| true)?;
        let nll = s / n as f64;
        let eval_s = t.elapsed().as_secs_f64();
        let drop = (base_nll - nll) / base_nll * 100.0;
        let r = &q["methods"][name];
        let ref_drop = r["valid_drop_rel_pct"].as_f64().unwrap_or(f64::NAN);
        let ref_nll = r["valid"]["mean_nll"].as_f64().unwrap_or(f64::NAN);
        eprintln!("{name}: valid NLL {nll:.4} (drop {drop:.2}%), train {train_s:.0} s, eval {eval_s:.0} s");
        rows.push((
            name.to_string(),
            nll,
            drop,
            ref_nll,
            ref_drop,
            train_s,
            tokens as f64 / train_s,
            losses[0],
            losses[39],
        ));
        json.insert(
            name.to_string(),
            serde_json::json!({ "valid_nll": nll, "drop_pct": drop, "losses": losses, "train_s": train_s, "eval_s": eval_s,
                "peft_valid_nll": ref_nll, "peft_drop_pct": ref_drop, "pass": drop >= ref_drop - 1.0 }),
        );
    }
    json.insert("base_valid_nll".into(), serde_json::json!(base_nll));
    json.insert(
        "base_form".into(),
        serde_json::json!(base_form.unwrap_or(BaseForm::F32).as_str()),
    );
    let app_products = auto || base_form.is_some();
    json.insert(
        "compute".into(),
        serde_json::json!(if app_products { "auto" } else { "f32" }),
    );
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &out_path,
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )?;

    println!(
        "PubMedQA valid (100 rows), mean NLL per assistant token; QUALITY.md recipe, 2 threads; base held as {}; products {}",
        base_form.unwrap_or(BaseForm::F32).as_str(),
        if app_products { "as the app runs them (bf16 on AMX, else int8 on VNNI for a frozen base, where present)" } else { "f32" }
    );
    println!("| model | valid NLL | drop vs base | PEFT valid NLL | PEFT drop | pass (>= PEFT - 1 pp) | loss step 1 -> 40 | train s | train tok/s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!("| base | {base_nll:.4} | - | {ref_base:.4} | - | - | - | - | - |");
    for (name, nll, drop, rn, rd, ts, tps, l0, l39) in rows {
        println!(
            "| {name} | {nll:.4} | {drop:.2}% | {rn:.4} | {rd:.2}% | {} | {l0:.4} -> {l39:.4} | {ts:.0} | {tps:.0} |",
            if drop >= rd - 1.0 { "yes" } else { "NO" }
        );
    }
    println!(
        "total {:.0} s; per-step losses in {}",
        started.elapsed().as_secs_f64(),
        out_path.display()
    );
    Ok(())
}
