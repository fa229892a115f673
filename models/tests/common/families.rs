//! The family models of `tests/families/` and the checks against PyTorch's figures for them,
//! shared by `families.rs` (the fused CPU path) and `portable.rs` (the portable path).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use attune_models::generate::{self, GenerateParams};
use attune_models::linear::ComputeMode;
use attune_models::llama::Llama;
use attune_models::loader::{self, LoadOptions, LoadedModel};
use attune_models::tokenizer::Tok;
use attune_models::train::{
    self, peft, AdamWConfig, Example, LoraConfig, Method, PromptConfig, PromptInit, Schedule,
    ScheduleKind, TrainConfig, Trainer,
};
use candle_core::{Device, Tensor, D};

pub const FAMILIES: [&str; 5] = ["qwen3", "gemma3", "phi3", "llama3", "smollm3"];

pub fn dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/families")
        .join(family)
}

pub fn reference(family: &str) -> serde_json::Value {
    let p = dir(family).join("reference.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The family's model from its GGUF (`gguf`) or its Hugging Face folder.
pub fn load(family: &str, gguf: bool, compute: ComputeMode) -> LoadedModel {
    let p = if gguf {
        dir(family).join("model.gguf")
    } else {
        dir(family).join("hf")
    };
    loader::load(&p, &LoadOptions { compute })
        .unwrap_or_else(|e| panic!("{family} ({}): {e}", p.display()))
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn pairs(v: &serde_json::Value) -> Vec<(u32, f32)> {
    v.as_array()
        .expect("top10")
        .iter()
        .map(|e| {
            (
                e[0].as_u64().expect("id") as u32,
                e[1].as_f64().expect("logit") as f32,
            )
        })
        .collect()
}

/// Checks `logits` (one position) against a reference top-10 within `tol` (the README's 2e-2 for
/// the f32 paths).
pub fn check_top10_within(logits: &[f32], want: &[(u32, f32)], tol: f32, what: &str) {
    for &(id, w) in want {
        let got = logits[id as usize];
        assert!(
            (got - w).abs() <= tol,
            "{what}: token {id} logit {got}, PyTorch {w}"
        );
    }
    let tenth = want.iter().map(|p| p.1).fold(f32::INFINITY, f32::min);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &i in idx.iter().take(want.len()) {
        assert!(
            want.iter().any(|p| p.0 as usize == i) || logits[i] <= tenth + tol,
            "{what}: token {i} (logit {}) is in Attune's top 10, not in PyTorch's",
            logits[i]
        );
    }
}

/// Mean NLL of `ids[1..]` and the last position's logits.
pub fn nll_and_last(model: &Llama, ids: &[u32]) -> (f64, Vec<f32>) {
    let t = Tensor::new(ids, &Device::Cpu)
        .expect("ids")
        .unsqueeze(0)
        .expect("batch");
    let logits = model
        .forward(&t, None)
        .expect("forward")
        .squeeze(0)
        .expect("squeeze");
    let lsm: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .expect("lsm")
        .to_vec2()
        .expect("vec");
    let nll: f64 = (1..ids.len())
        .map(|i| -lsm[i - 1][ids[i] as usize] as f64)
        .sum::<f64>()
        / (ids.len() - 1) as f64;
    let last = logits
        .get(ids.len() - 1)
        .expect("last")
        .to_vec1()
        .expect("vec");
    (nll, last)
}

pub fn check_prompts(model: &Llama, tok: &Tok, prompts: &serde_json::Value, what: &str) {
    check_prompts_within(model, tok, prompts, 1e-3, 2e-2, what)
}

/// [`check_prompts`] with tolerances on the mean NLL and on the top-10 logits.
pub fn check_prompts_within(
    model: &Llama,
    tok: &Tok,
    prompts: &serde_json::Value,
    nll_tol: f64,
    logit_tol: f32,
    what: &str,
) {
    for p in prompts.as_array().expect("prompts") {
        let name = p["name"].as_str().expect("name");
        let ids = ids_of(&p["token_ids"]);
        if let Some(text) = p["text"].as_str() {
            assert_eq!(
                tok.encode(text, false).expect("encode"),
                ids,
                "{what} {name}: token ids"
            );
        }
        let (nll, last) = nll_and_last(model, &ids);
        let want = p["mean_nll"].as_f64().expect("nll");
        assert!(
            (nll - want).abs() <= nll_tol,
            "{what} {name}: mean NLL {nll}, PyTorch {want}"
        );
        check_top10_within(
            &last,
            &pairs(&p["top10_last"]),
            logit_tol,
            &format!("{what} {name}"),
        );
    }
}

/// Greedy decoding of the reference prompt over the KV cache: each step's logits (fed PyTorch's
/// tokens) within `tol` of PyTorch's top 10, then Attune's own greedy generation gives PyTorch's
/// tokens up to the first near-tie.
pub fn check_greedy(f: &str, m: &LoadedModel, tol: f32, what: &str) {
    let r = reference(f);
    let prompt = ids_of(&r["generate"]["prompt_ids"]);
    let want = ids_of(&r["generate"]["new_ids"]);
    let steps = r["generate"]["step_top10"]
        .as_array()
        .expect("steps")
        .clone();
    // Step by step, feeding PyTorch's tokens: every step's logits within tolerance.
    let mut cache = m.model.new_cache();
    let mut next = prompt.clone();
    let mut all = prompt.clone();
    for (i, step) in steps.iter().enumerate() {
        if m.model.needs_recompute(cache.len(), next.len()) {
            // Phi-3's LongRoPE switch: the whole sequence again (as generate does).
            cache.clear();
            next = all.clone();
        }
        let t = Tensor::new(next.as_slice(), &Device::Cpu)
            .expect("ids")
            .unsqueeze(0)
            .expect("batch");
        let logits: Vec<f32> = m
            .model
            .forward_last(&t, &mut cache)
            .expect("decode")
            .squeeze(0)
            .expect("squeeze")
            .to_vec1()
            .expect("vec");
        check_top10_within(&logits, &pairs(step), tol, &format!("{what} step {i}"));
        next = vec![want[i]];
        all.push(want[i]);
    }
    // And Attune's own greedy generation produces PyTorch's tokens.
    let params = GenerateParams {
        max_tokens: want.len(),
        ..GenerateParams::default()
    };
    let g = generate::generate(
        &m.model,
        &m.tokenizer,
        &prompt,
        &params,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .expect("generate");
    let eos = r["eos_token_id"].as_u64().expect("eos") as u32;
    let margins: Vec<f64> = r["generate"]["top2_margins"]
        .as_array()
        .expect("margins")
        .iter()
        .map(|m| m.as_f64().expect("margin"))
        .collect();
    // Token for token up to the first step where PyTorch's top two are closer than the
    // tolerance (a tie the arithmetic may break either way).
    let sure = margins
        .iter()
        .take_while(|&&m| m > 2.0 * tol as f64)
        .count();
    let expect: Vec<u32> = want.iter().copied().take_while(|&t| t != eos).collect();
    let n = sure.min(expect.len());
    assert_eq!(
        g.tokens[..n.min(g.tokens.len())],
        expect[..n],
        "{what}: greedy tokens"
    );
    assert!(g.tokens.len() >= n, "{what}: generation stopped early");
}

pub fn train_config(lr: f64) -> TrainConfig {
    TrainConfig {
        batch_size: 2,
        grad_accum: 1,
        steps: 2,
        optimizer: AdamWConfig::default(),
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            peak_lr: lr,
            warmup_steps: 0,
            total_steps: 2,
            final_frac: 1.0,
        },
        max_grad_norm: 1.0,
        seed: 7,
        shuffle: false,
    }
}

/// The first two steps of `method` on the reference batch.
/// With `portable`, on the model's portable path (candle's ops and autograd, tensor-op AdamW).
pub fn train_two_steps(
    f: &str,
    gguf: bool,
    portable: bool,
    m: &serde_json::Value,
) -> Vec<train::StepMetrics> {
    let r = reference(f);
    let loaded = load(f, gguf, ComputeMode::F32);
    let mut model = loaded.model;
    model.set_portable(portable);
    let rows: Vec<Vec<u32>> = r["train"]["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(ids_of)
        .collect();
    let examples: Vec<Example> = rows
        .iter()
        .map(|ids| Example {
            ids: ids.clone(),
            targets: vec![true; ids.len()],
            full_len: ids.len(),
            truncated: false,
        })
        .collect();
    let lr = m["lr"].as_f64().expect("lr");
    let method = match m["method"].as_str().expect("method") {
        "full" => Method::Full,
        "lora" => Method::Lora(LoraConfig {
            r: m["r"].as_u64().expect("r") as usize,
            alpha: m["alpha"].as_f64().expect("alpha"),
            dropout: 0.0,
            targets: model.lora_targets().iter().map(|s| s.to_string()).collect(),
            rslora: false,
        }),
        "prompt" => Method::Prompt(PromptConfig {
            num_virtual_tokens: m["num_virtual_tokens"].as_u64().expect("n") as usize,
            init: PromptInit::Text(m["init_text"].as_str().expect("text").to_string()),
        }),
        other => panic!("method {other}"),
    };
    let trainable = train::prepare(&mut model, &loaded.tokenizer, &method, 1).expect("prepare");
    if let Some(init) = m["init_dir"].as_str() {
        // LoRA's A as PEFT drew it (B starts at zero on both sides).
        let peft::Adapter::Lora { tensors, .. } = peft::load(&dir(f).join(init)).expect("init")
        else {
            panic!("{f}: init is not a LoRA adapter");
        };
        let mut set = 0;
        for (name, var) in &trainable.params {
            if let Some(t) = tensors.get(name) {
                var.set(t).expect("set A");
                set += 1;
            }
        }
        assert_eq!(
            set,
            tensors.len(),
            "{f}: every PEFT tensor found its variable"
        );
    }
    let pad = r["train"]["pad_id"].as_u64().expect("pad") as u32;
    let mut t = Trainer::new(model, trainable, train_config(lr), examples, pad).expect("trainer");
    (0..2).map(|_| t.train_step().expect("step")).collect()
}

/// The first two optimizer steps of every method against PyTorch's losses (2e-3) and pre-clip
/// gradient norms (1%).
pub fn check_first_steps(f: &str, portable: bool) {
    let r = reference(f);
    for m in r["train"]["methods"].as_array().expect("methods") {
        let name = m["method"].as_str().expect("method");
        // GGUF for one method, the folder for the others (both load the same values).
        let gguf = name == "lora";
        let got = train_two_steps(f, gguf, portable, m);
        let losses = m["losses"].as_array().expect("losses");
        let norms = m["grad_norm_preclip"].as_array().expect("norms");
        for (i, step) in got.iter().enumerate() {
            let (wl, wn) = (
                losses[i].as_f64().expect("l"),
                norms[i].as_f64().expect("n"),
            );
            assert!(
                (step.loss - wl).abs() <= 2e-3,
                "{f} {name} (portable: {portable}) step {}: loss {}, PyTorch {wl}",
                i + 1,
                step.loss
            );
            assert!(
                (step.grad_norm - wn).abs() <= 0.01 * wn,
                "{f} {name} (portable: {portable}) step {}: gradient norm {}, PyTorch {wn}",
                i + 1,
                step.grad_norm
            );
        }
    }
}
