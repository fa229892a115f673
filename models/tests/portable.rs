//! The portable decoder path (candle's own ops and autograd: what a GPU runs, see
//! `attune_models::llama::Llama::set_portable`) checked on the CPU:
//!
//! - the default model (SmolLM2 Q4_1, loaded in f32): logits of every position, and of each
//!   KV-cache decode step, within 2e-3 of the fused CPU kernels' (the same f32 weights, another
//!   order of operations); greedy generation gives the same tokens; the model copied densely
//!   (`Llama::dense_on`, what `to_device` builds for a GPU) from the quantized `Auto` load
//!   gives the same logits;
//! - one step of each method (LoRA, full fine-tuning, soft prompt): the loss within 1e-4 and
//!   every gradient within 1e-3 of the largest entry of the fused path's, then a `Trainer` step
//!   (tensor-op AdamW) with the same loss and gradient norm;
//! - every family model of `tests/families/` against PyTorch's figures with `families.rs`'s
//!   tolerances (logits and mean NLL, greedy decoding over the cache, a PEFT LoRA adapter, the
//!   first two steps of each method), and within 2e-3 of the fused path.
//!
//! Run with `cargo test --release -p attune-models --test portable`.

mod common;

use std::sync::atomic::AtomicBool;

use attune_models::generate::{self, GenerateParams};
use attune_models::kernels;
use attune_models::linear::ComputeMode;
use attune_models::llama::Llama;
use attune_models::loader::{self, LoadOptions, LoadedModel};
use attune_models::train::{
    self, peft, AdamWConfig, Example, LoraConfig, Method, PromptConfig, PromptInit, Schedule,
    ScheduleKind, TrainConfig, Trainer,
};
use candle_core::{Device, Tensor};
use common::families::{self as fam, FAMILIES};

/// Portable against fused logits (both f32; only the order of operations differs).
const LOGIT_TOL: f32 = 2e-3;
/// A training step's loss, portable against fused.
const LOSS_TOL: f64 = 1e-4;
/// A gradient's largest difference, relative to the fused gradient's largest entry.
const GRAD_TOL: f32 = 1e-3;

fn default_model(compute: ComputeMode) -> LoadedModel {
    loader::load(&common::model_path(), &LoadOptions { compute }).expect("default model")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes");
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("difference")
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("max")
}

/// `model` on the fused kernels and on the portable path.
fn both(model: &Llama) -> (Llama, Llama) {
    let mut fused = model.clone();
    fused.set_portable(false);
    let mut port = model.clone();
    port.set_portable(true);
    assert!(!fused.is_portable() && port.is_portable());
    (fused, port)
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids")
}

/// Every position's logits, and the logits of each decode step over the KV cache after a
/// prefill of `prefill` tokens, within [`LOGIT_TOL`]; returns the largest difference.
fn compare_logits(fused: &Llama, port: &Llama, ids: &[u32], prefill: usize, what: &str) -> f32 {
    let t = ids_tensor(ids);
    let a = fused.forward(&t, None).expect("fused forward");
    let b = port.forward(&t, None).expect("portable forward");
    let mut worst = max_abs_diff(&a, &b);
    assert!(
        worst <= LOGIT_TOL,
        "{what}: portable logits differ from the fused path's by {worst}"
    );
    let (mut cf, mut cp) = (fused.new_cache(), port.new_cache());
    let mut start = 0;
    for end in std::iter::once(prefill).chain(prefill + 1..=ids.len()) {
        let step = ids_tensor(&ids[start..end]);
        let a = fused.forward_last(&step, &mut cf).expect("fused decode");
        let b = port.forward_last(&step, &mut cp).expect("portable decode");
        let d = max_abs_diff(&a, &b);
        assert!(
            d <= LOGIT_TOL,
            "{what}: decode step at position {end}: logits differ by {d}"
        );
        worst = worst.max(d);
        start = end;
    }
    assert_eq!(cp.len(), ids.len(), "{what}: the portable cache's length");
    worst
}

const TEXT: &str = "The mitochondria is the powerhouse of the cell. In eukaryotic cells, \
                    aerobic respiration takes place inside the mitochondria, where pyruvate from \
                    glycolysis is oxidised and the electron transport chain makes";

#[test]
fn default_model_portable_logits_and_greedy_tokens_match_the_fused_path() {
    let m = default_model(ComputeMode::F32);
    let ids = m.tokenizer.encode(TEXT, false).expect("encode");
    assert!(ids.len() > 16, "{} tokens", ids.len());
    let (fused, port) = both(&m.model);
    let worst = compare_logits(&fused, &port, &ids, ids.len() - 6, "default model");
    // The two paths really are different code (a switch that did nothing would give 0).
    assert!(worst > 0.0, "portable and fused logits are bit-identical");
    eprintln!("default model: largest logit difference, portable vs fused: {worst:e}");

    // `dense_on`: the quantized `Auto` load (packed bf16 or f32 copies, decode kernels) made
    // dense f32 again, as `to_device` does for a GPU, against the fused f32 model.
    let auto = default_model(ComputeMode::Auto);
    let dense = auto.model.dense_on(&Device::Cpu).expect("dense copy");
    let mut dense_port = dense.clone();
    dense_port.set_portable(true);
    let d = compare_logits(&fused, &dense_port, &ids, ids.len() - 3, "dense copy");
    eprintln!("dense copy of the Auto load: largest logit difference {d:e}");

    let params = GenerateParams {
        max_tokens: 24,
        ..GenerateParams::default()
    };
    let gen = |model: &Llama| {
        generate::generate(
            model,
            &m.tokenizer,
            &ids,
            &params,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect("generate")
        .tokens
    };
    let (a, b) = (gen(&fused), gen(&port));
    assert!(
        a.len() >= 8,
        "fused generation stopped after {} tokens",
        a.len()
    );
    assert_eq!(a, b, "greedy tokens, fused vs portable");
}

/// Two training rows of the default model (every token scored).
fn rows(m: &LoadedModel) -> Vec<Example> {
    [
        "Question: what carries oxygen in blood? Answer: hemoglobin, a protein in red cells.",
        "The capital of France is Paris, which lies on the Seine.",
    ]
    .iter()
    .map(|t| {
        let ids = m.tokenizer.encode(t, true).expect("encode");
        Example {
            targets: vec![true; ids.len()],
            full_len: ids.len(),
            truncated: false,
            ids,
        }
    })
    .collect()
}

fn methods(m: &LoadedModel) -> Vec<Method> {
    vec![
        Method::Lora(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: m
                .model
                .lora_targets()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            rslora: false,
        }),
        Method::Full,
        Method::Prompt(PromptConfig {
            num_virtual_tokens: 5,
            init: PromptInit::Text("Answer briefly.".into()),
        }),
    ]
}

/// `model` prepared for `method` (LoRA's B set to seeded values, so every LoRA gradient is
/// non-zero), then one forward and backward pass on `examples`: (loss, gradients by name).
fn loss_and_grads(
    m: &LoadedModel,
    portable: bool,
    method: &Method,
    examples: &[Example],
) -> (f64, Vec<(String, Tensor)>) {
    let mut model = m.model.clone();
    model.set_portable(portable);
    let trainable = train::prepare(&mut model, &m.tokenizer, method, 1).expect("prepare");
    let mut seed = 11u64;
    for (name, v) in &trainable.params {
        if name.ends_with("lora_B.weight") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
                })
                .collect();
            let t = Tensor::from_vec(vals, v.shape(), v.device()).expect("B");
            v.set(&t).expect("set B");
        }
    }
    // As the trainer runs it: every layer it can as one fused op on the fused path.
    model.set_layer_fusion(attune_models::llama::LayerFusion::All);
    let n_prefix = trainable.prefix.as_ref().map_or(0, |p| p.dims()[0]);
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = train::collate(&refs, 0, n_prefix, model.device()).expect("collate");
    let prefix = trainable.prefix.as_ref().map(|p| p.as_tensor().clone());
    let sum = train::nll_sum(&model, &batch, prefix.as_ref()).expect("nll");
    let loss = (sum / batch.targets.len() as f64).expect("mean");
    let grads = kernels::block::backward(&loss).expect("backward");
    let named = trainable
        .params
        .iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{n}: no gradient (portable: {portable})"))
                .clone();
            (n.clone(), g)
        })
        .collect();
    (loss.to_scalar::<f32>().expect("loss") as f64, named)
}

fn train_config() -> TrainConfig {
    TrainConfig {
        batch_size: 2,
        grad_accum: 1,
        steps: 1,
        optimizer: AdamWConfig::default(),
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            peak_lr: 1e-4,
            warmup_steps: 0,
            total_steps: 1,
            final_frac: 1.0,
        },
        max_grad_norm: 1.0,
        seed: 3,
        shuffle: false,
    }
}

#[test]
fn default_model_training_steps_match_the_fused_path_for_every_method() {
    let m = default_model(ComputeMode::F32);
    let examples = rows(&m);
    for method in methods(&m) {
        let what = method.name();
        let (lf, gf) = loss_and_grads(&m, false, &method, &examples);
        let (lp, gp) = loss_and_grads(&m, true, &method, &examples);
        assert!(
            lf.is_finite() && (lf - lp).abs() <= LOSS_TOL,
            "{what}: loss {lp} on the portable path, {lf} fused"
        );
        assert_eq!(gf.len(), gp.len(), "{what}: parameter count");
        let mut nonzero = 0;
        let mut worst = 0f32;
        for ((name, a), (_, b)) in gf.iter().zip(&gp) {
            let scale = max_abs(a);
            let d = max_abs_diff(a, b);
            worst = worst.max(d / scale.max(1e-6));
            assert!(
                d <= GRAD_TOL * scale.max(1e-6),
                "{what} {name}: gradients differ by {d} (largest fused entry {scale})"
            );
            nonzero += usize::from(scale > 0.0);
        }
        assert!(nonzero * 2 > gf.len(), "{what}: most gradients are zero");
        eprintln!(
            "{what}: loss {lf:.6} fused, {lp:.6} portable; largest relative gradient difference \
             {worst:e} over {} tensors",
            gf.len()
        );

        // A whole optimizer step: the portable trainer's tensor-op AdamW.
        let step = |portable: bool| {
            let mut model = m.model.clone();
            model.set_portable(portable);
            let tr = train::prepare(&mut model, &m.tokenizer, &method, 1).expect("prepare");
            let mut t =
                Trainer::new(model, tr, train_config(), examples.clone(), 0).expect("trainer");
            t.train_step().expect("step")
        };
        let (a, b) = (step(false), step(true));
        eprintln!(
            "{what}: trainer step loss {:.6}/{:.6}, gradient norm {:.6}/{:.6} (fused/portable)",
            a.loss, b.loss, a.grad_norm, b.grad_norm
        );
        assert!(
            (a.loss - b.loss).abs() <= LOSS_TOL,
            "{what}: trainer loss {} portable, {} fused",
            b.loss,
            a.loss
        );
        assert!(
            (a.grad_norm - b.grad_norm).abs() <= 1e-3 * a.grad_norm.max(1e-6),
            "{what}: gradient norm {} portable, {} fused",
            b.grad_norm,
            a.grad_norm
        );
    }
}

#[test]
fn family_models_on_the_portable_path_match_pytorch_and_the_fused_path() {
    for f in FAMILIES {
        let r = fam::reference(f);
        for (source, gguf) in [("gguf", true), ("safetensors", false)] {
            let what = format!("{f} {source} portable");
            let mut m = fam::load(f, gguf, ComputeMode::F32);
            let (fused, port) = both(&m.model);
            let ids = fam::ids_of(&r["generate"]["prompt_ids"]);
            let d = compare_logits(&fused, &port, &ids, ids.len() - 2, &what);
            eprintln!("{what}: largest logit difference from the fused path {d:e}");
            m.model = port;
            fam::check_prompts(&m.model, &m.tokenizer, &r["prompts"], &what);
            fam::check_greedy(f, &m, 2e-2, &what);
            let peft::Adapter::Lora {
                config, tensors, ..
            } = peft::load(&fam::dir(f).join("lora")).expect("adapter")
            else {
                panic!("{f}: not a LoRA adapter");
            };
            peft::apply_lora(&mut m.model, &config, &tensors).expect("apply");
            fam::check_prompts(
                &m.model,
                &m.tokenizer,
                &r["lora"]["prompts"],
                &format!("{what} lora"),
            );
        }
    }
}

#[test]
fn family_models_train_on_the_portable_path_as_pytorch_does() {
    for f in FAMILIES {
        fam::check_first_steps(f, true);
    }
}
