//! DPO against TRL 1.16's `DPOTrainer` on the default model: `models/tests/data/dpo_reference.json`,
//! written by `scripts/reference_dpo.py` (run it with the interpreter `scripts/setup-trl.sh`
//! prints to regenerate), holds TRL's tokenization of `tests/data/prefs-sample.jsonl` and its
//! first three steps: LoRA r=8, alpha=16 on the seven projections, lora_A set by the same formula
//! on both sides, lora_B zero, the reference being the model with its adapter disabled, batch 2,
//! AdamW at a constant 5e-4, beta 0.1, sigmoid loss, grad clipping at 1.0.
//!
//! Step 1 runs with B = 0 (policy = reference: loss ln 2, rewards 0) and checks the forward
//! pass's summed answer log-probs and the backward pass's gradient norm; steps 2 and 3 check the
//! update (AdamW, clipping) through the rewards, margins and the loss.

mod common;

use attune_models::chat_template::Message;
use attune_models::linear::ComputeMode;
use attune_models::loader::{self, LoadOptions};
use attune_models::train::pref::{
    render_pair, DpoLoss, PrefObjective, PrefPair, PrefText, Reference,
};
use attune_models::train::{
    self, AdamWConfig, Example, LoraConfig, Method, Schedule, ScheduleKind, TrainConfig, Trainer,
    LORA_TARGETS,
};
use candle_core::Tensor;
use common::model_path;

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn messages(v: &serde_json::Value) -> PrefText {
    PrefText::Chat(
        v.as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                Message::new(
                    m["role"].as_str().expect("role"),
                    m["content"].as_str().expect("content"),
                )
            })
            .collect(),
    )
}

fn reference(name: &str) -> serde_json::Value {
    let p = repo_file(&format!("tests/data/{name}"));
    serde_json::from_str(&std::fs::read_to_string(&p).expect(name)).expect("json")
}

/// lora_A's value in `scripts/reference_dpo.py` (`lora_a_value`).
fn lora_a(layer: usize, module: usize, k: usize, fan_in: usize) -> f32 {
    ((0.37 * k as f64 + 1.3 * layer as f64 + 2.1 * module as f64 + 0.5).sin()
        / (fan_in as f64).sqrt()) as f32
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: Attune {got}, TRL {want} (tolerance {tol})"
    );
}

/// TRL's loss, rewards, margin, accuracy and gradient norm of one step, with the tolerances of
/// both tests: about 20x the differences measured (2026-12-03/04).
fn check_step(
    m: &train::StepMetrics,
    got: &attune_models::train::pref::PrefFigures,
    w: &serde_json::Value,
    step: &str,
) {
    let f = |k: &str| w[k].as_f64().expect(k);
    close(m.loss, f("loss"), 1e-4, &format!("{step} loss"));
    close(
        got.rewards_chosen,
        f("rewards/chosen"),
        1e-4,
        &format!("{step} rewards/chosen"),
    );
    close(
        got.rewards_rejected,
        f("rewards/rejected"),
        1e-4,
        &format!("{step} rewards/rejected"),
    );
    close(
        got.margin,
        f("rewards/margins"),
        1e-4,
        &format!("{step} margin"),
    );
    close(
        got.accuracy,
        f("rewards/accuracies"),
        0.0,
        &format!("{step} accuracy"),
    );
    close(
        m.grad_norm,
        f("grad_norm"),
        1e-3 * f("grad_norm"),
        &format!("{step} grad_norm"),
    );
}

/// The default model with the reference script's LoRA: r=8, alpha=16 on the seven projections,
/// lora_A by `lora_a`, lora_B zero.
fn lora_model(
    mut model: attune_models::llama::Llama,
    tok: &attune_models::tokenizer::Tok,
) -> (attune_models::llama::Llama, train::Trainable) {
    let method = Method::Lora(LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
        rslora: false,
    });
    let trainable = train::prepare(&mut model, tok, &method, 42).expect("prepare");
    let mut set = 0;
    for (name, v) in &trainable.params {
        if !name.ends_with("lora_A.weight") {
            continue;
        }
        let layer: usize = name
            .split("layers.")
            .nth(1)
            .and_then(|t| t.split('.').next())
            .and_then(|t| t.parse().ok())
            .expect("layer");
        let module = LORA_TARGETS
            .iter()
            .position(|t| name.contains(&format!(".{t}.")))
            .expect("module");
        let (rank, fan_in) = v.dims2().expect("dims");
        let vals: Vec<f32> = (0..rank * fan_in)
            .map(|k| lora_a(layer, module, k, fan_in))
            .collect();
        v.set(&Tensor::from_vec(vals, (rank, fan_in), v.device()).expect("t"))
            .expect("set");
        set += 1;
    }
    assert_eq!(set, 30 * 7, "lora_A tensors set");
    (model, trainable)
}

/// The reference script's settings: batch, constant learning rate, AdamW defaults, clipping at
/// 1.0, the rows in file order.
fn config(s: &serde_json::Value) -> TrainConfig {
    let steps = s["steps"].as_u64().expect("steps") as usize;
    let lr = s["lr"].as_f64().expect("lr");
    TrainConfig {
        batch_size: s["batch"].as_u64().expect("batch") as usize,
        grad_accum: 1,
        steps,
        optimizer: AdamWConfig::default(),
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            peak_lr: lr,
            warmup_steps: 0,
            total_steps: steps,
            final_frac: 1.0,
        },
        max_grad_norm: s["max_grad_norm"].as_f64().unwrap_or(1.0),
        seed: 42,
        shuffle: false,
    }
}

#[test]
fn dpo_first_steps_match_trl() {
    let r = reference("dpo_reference.json");
    let s = &r["settings"];
    let loaded = loader::load(
        &model_path(),
        &LoadOptions {
            compute: ComputeMode::F32,
        },
    )
    .expect("model");
    let text = std::fs::read_to_string(repo_file("../tests/data/prefs-sample.jsonl"))
        .expect("prefs-sample.jsonl");
    let rows = s["rows"].as_u64().expect("rows") as usize;
    let pairs: Vec<PrefPair> = text
        .lines()
        .take(rows)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("row");
            render_pair(
                &loaded.tokenizer,
                Some(&loaded.chat_template),
                &messages(&v["prompt"]),
                &messages(&v["chosen"]),
                &messages(&v["rejected"]),
                1024,
            )
            .expect("render")
            .expect("fits")
        })
        .collect();
    // TRL's tokenization, token for token.
    for (i, (p, t)) in pairs
        .iter()
        .zip(r["tokenized"].as_array().expect("tokenized"))
        .enumerate()
    {
        let ids = |k: &str| -> Vec<u32> {
            t[k].as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        };
        let prompt = ids("prompt_ids");
        let mut chosen = prompt.clone();
        chosen.extend(ids("chosen_ids"));
        let mut rejected = prompt.clone();
        rejected.extend(ids("rejected_ids"));
        assert_eq!(p.prompt_len, prompt.len(), "row {i} prompt length");
        assert_eq!(p.chosen.ids, chosen, "row {i} prompt + chosen");
        assert_eq!(p.rejected.ids, rejected, "row {i} prompt + rejected");
    }

    let (model, trainable) = lora_model(loaded.model, &loaded.tokenizer);
    let steps = s["steps"].as_u64().expect("steps") as usize;
    let config = config(s);
    let objective = PrefObjective::Dpo {
        beta: s["beta"].as_f64().expect("beta"),
        loss: DpoLoss::Sigmoid,
    };
    let pad = loaded.tokenizer.eos_token_ids()[0];
    let mut t = Trainer::new_preference(
        model,
        trainable,
        config,
        objective,
        Reference::AdapterOff,
        pairs,
        pad,
    )
    .expect("trainer");
    let want = r["steps"].as_array().expect("steps");
    for (i, w) in want.iter().enumerate().take(steps) {
        let m = t.train_step().expect("step");
        let got = m.pref.clone().expect("preference figures");
        let f = |k: &str| w[k].as_f64().expect(k);
        eprintln!(
            "step {}: loss {:.6} (TRL {:.6}) grad_norm {:.5} ({:.5}) rewards {:.6}/{:.6} ({:.6}/{:.6}) \
             margin {:.6} ({:.6}) acc {} ({}) logps {:.4}/{:.4} ({:.4}/{:.4})",
            i + 1,
            m.loss,
            f("loss"),
            m.grad_norm,
            f("grad_norm"),
            got.rewards_chosen,
            got.rewards_rejected,
            f("rewards/chosen"),
            f("rewards/rejected"),
            got.margin,
            f("rewards/margins"),
            got.accuracy,
            f("rewards/accuracies"),
            got.logps_chosen,
            got.logps_rejected,
            f("logps/chosen"),
            f("logps/rejected"),
        );
        let step = format!("step {}", i + 1);
        // Tolerances ~20x the differences measured (2026-12-03): summed log-probs 1e-4, loss and
        // rewards 3e-6, gradient norm 5e-6 relative.
        close(
            got.logps_chosen,
            f("logps/chosen"),
            2e-3,
            &format!("{step} logps/chosen"),
        );
        close(
            got.logps_rejected,
            f("logps/rejected"),
            2e-3,
            &format!("{step} logps/rejected"),
        );
        check_step(&m, &got, w, &step);
    }
}

/// ORPO against TRL 1.16's `ORPOTrainer` (`models/tests/data/orpo_reference.json`, written by
/// `scripts/reference_dpo.py --trainer orpo`): the same rows, LoRA and settings as the DPO test,
/// no reference model. TRL's ORPO tokenization differs from its DPO one (an EOS token after the
/// end of turn), so the pairs here are TRL's own token ids, answer tokens where its labels are
/// not -100. Checks TRL's loss (the chosen sequences' mean token NLL, prompt included, minus
/// beta times the mean log-sigmoid of the log odds ratio), rewards (beta times the answers'
/// mean token log-probs), margin, accuracy and gradient norm over three steps.
#[test]
fn orpo_first_steps_match_trl() {
    let r = reference("orpo_reference.json");
    let s = &r["settings"];
    assert_eq!(s["trainer"], "orpo");
    let loaded = loader::load(
        &model_path(),
        &LoadOptions {
            compute: ComputeMode::F32,
        },
    )
    .expect("model");
    let side = |t: &serde_json::Value, which: &str| -> Example {
        let ids: Vec<u32> = t[format!("{which}_input_ids")]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        let targets: Vec<bool> = t[format!("{which}_labels")]
            .as_array()
            .expect("labels")
            .iter()
            .map(|x| x.as_i64().expect("label") != -100)
            .collect();
        assert_eq!(ids.len(), targets.len(), "{which} ids and labels");
        Example {
            full_len: ids.len(),
            ids,
            targets,
            truncated: false,
        }
    };
    let pairs: Vec<PrefPair> = r["tokenized"]
        .as_array()
        .expect("tokenized")
        .iter()
        .map(|t| PrefPair {
            chosen: side(t, "chosen"),
            rejected: side(t, "rejected"),
            prompt_len: t["prompt_ids"].as_array().expect("prompt ids").len(),
        })
        .collect();
    assert_eq!(pairs.len() as u64, s["rows"].as_u64().expect("rows"));
    let (model, trainable) = lora_model(loaded.model, &loaded.tokenizer);
    let beta = s["beta"].as_f64().expect("beta");
    let pad = loaded.tokenizer.eos_token_ids()[0];
    let mut t = Trainer::new_preference(
        model,
        trainable,
        config(s),
        PrefObjective::Orpo { beta },
        Reference::None,
        pairs,
        pad,
    )
    .expect("trainer");
    for (i, w) in r["steps"].as_array().expect("steps").iter().enumerate() {
        let m = t.train_step().expect("step");
        let got = m.pref.clone().expect("preference figures");
        let f = |k: &str| w[k].as_f64().expect(k);
        eprintln!(
            "step {}: loss {:.6} (TRL {:.6}) grad_norm {:.5} ({:.5}) rewards {:.6}/{:.6} ({:.6}/{:.6}) \
             acc {} ({})",
            i + 1,
            m.loss,
            f("loss"),
            m.grad_norm,
            f("grad_norm"),
            got.rewards_chosen,
            got.rewards_rejected,
            f("rewards/chosen"),
            f("rewards/rejected"),
            got.accuracy,
            f("rewards/accuracies"),
        );
        let step = format!("step {}", i + 1);
        check_step(&m, &got, w, &step);
    }
}
