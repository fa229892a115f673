//! LoRA and prompt tuning on a compact frozen base (`Llama::set_base_form`: the GGUF blocks, or
//! bf16 values, expanded panel by panel inside each product) on the default model: the same
//! logits, losses and gradients as the dense base, a fraction of its memory.
//!
//! The quantized form expands the very values the dense form holds (the file's blocks,
//! dequantized), so against the dense `Auto` model (bf16 on the matrix units where the CPU has
//! them, else f32) it must agree to rounding; against the exact f32 model it differs by what
//! bf16 products differ (where the CPU has AMX).

mod common;

use attune_models::linear::{BaseForm, ComputeMode};
use attune_models::loader::{self, LoadOptions, LoadedModel};
use attune_models::train::{
    self, AdamWConfig, Example, LoraConfig, Method, PromptConfig, PromptInit, Schedule,
    ScheduleKind, TrainConfig, Trainer,
};
use candle_core::{Device, Tensor};

fn load(compute: ComputeMode) -> LoadedModel {
    loader::load(&common::model_path(), &LoadOptions { compute }).expect("default model")
}

fn compact(form: BaseForm) -> LoadedModel {
    let mut m = load(ComputeMode::Quantized);
    m.model.set_base_form(form).expect("base form");
    assert_eq!(m.model.base_form(), form);
    m
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
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

const TEXT: &str =
    "Question: does aspirin reduce the risk of a second heart attack? Context: in a \
                    randomised trial of 1,200 patients, low-dose aspirin lowered recurrence.";

fn rows(m: &LoadedModel) -> Vec<Example> {
    [
        TEXT,
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
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: m
                .model
                .lora_targets()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            rslora: false,
        }),
        Method::Prompt(PromptConfig {
            num_virtual_tokens: 6,
            init: PromptInit::Text("Answer briefly.".into()),
        }),
    ]
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        batch_size: 2,
        grad_accum: 1,
        steps,
        optimizer: AdamWConfig::default(),
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            peak_lr: 1e-3,
            warmup_steps: 0,
            total_steps: steps,
            final_frac: 1.0,
        },
        max_grad_norm: 1.0,
        seed: 3,
        shuffle: false,
    }
}

/// Three optimizer steps of `method` on `m`: each step's (loss, pre-clip gradient norm), and the
/// trained tensors at the end.
fn train3(m: &LoadedModel, method: &Method, ex: &[Example]) -> (Vec<(f64, f64)>, Vec<Tensor>) {
    let mut model = m.model.clone();
    let tr = train::prepare(&mut model, &m.tokenizer, method, 1).expect("prepare");
    let params: Vec<Tensor> = tr
        .params
        .iter()
        .map(|(_, v)| v)
        .chain(tr.prefix.as_ref())
        .map(|v| v.as_tensor().clone())
        .collect();
    assert!(!params.is_empty());
    let mut t = Trainer::new(model, tr, config(3), ex.to_vec(), 0).expect("trainer");
    let steps = (0..3)
        .map(|_| {
            let s = t.train_step().expect("step");
            (s.loss, s.grad_norm)
        })
        .collect();
    (steps, params)
}

/// Both compact forms train as the dense base does: each step's loss and gradient norm, and
/// the trained tensors after three steps (LoRA's B starts at zero, so a wrong input gradient or
/// forward product shows in all three).
#[test]
fn compact_bases_train_as_the_dense_base_does() {
    let dense = load(ComputeMode::Auto);
    let exact = load(ComputeMode::F32);
    let ex = rows(&dense);
    // Without AMX but with VNNI the dense base trains on int8 products: the quantized form's
    // exact values then train as exact f32 does.
    let int8 = attune_models::train::int8_frozen_base();
    for form in [BaseForm::Quantized, BaseForm::Bf16] {
        let m = compact(form);
        for method in methods(&dense) {
            let what = format!("{} on a {} base", method.name(), form.as_str());
            let (want, wp) = train3(if int8 { &exact } else { &dense }, &method, &ex);
            let (got, gp) = train3(&m, &method, &ex);
            let (f32_steps, _) = train3(&exact, &method, &ex);
            eprintln!(
                "{what}: (loss, grad norm) {got:?}, dense {want:?} (int8 products: {int8}), exact \
                 f32 {f32_steps:?}"
            );
            // The quantized form holds the dense form's very values: the same steps. bf16 rounds
            // them: each step may stray from exact f32 at most twice as far as the dense form's
            // bf16 products do (plus 1% of the loss, 15% of the gradient norm).
            for (i, (((l, g), (lw, gw)), (lf, gf))) in
                got.iter().zip(&want).zip(&f32_steps).enumerate()
            {
                let step = i + 1;
                assert!(
                    l.is_finite() && g.is_finite(),
                    "{what} step {step}: {l} {g}"
                );
                if form == BaseForm::Quantized {
                    assert!(
                        (l - lw).abs() <= 2e-3,
                        "{what} step {step}: loss {l} vs {lw}"
                    );
                    assert!(
                        (g - gw).abs() <= 2e-2 * gw,
                        "{what} step {step}: grad norm {g} vs {gw}"
                    );
                } else {
                    let loss_bound = 2.0 * (lw - lf).abs() + 1e-2 * lf;
                    // Prompt tuning's gradient norm moves up to 12% between the dense form's bf16
                    // products and f32: rounding the weights may move it as much again.
                    let norm_bound = 2.0 * (gw - gf).abs() + 0.15 * gf;
                    assert!(
                        (l - lf).abs() <= loss_bound,
                        "{what} step {step}: loss {l}, exact {lf}, dense {lw}"
                    );
                    assert!(
                        (g - gf).abs() <= norm_bound,
                        "{what} step {step}: grad norm {g}, exact {gf}, dense {gw}"
                    );
                }
            }
            assert!(
                got[2].0 < got[0].0,
                "{what}: the loss did not fall: {got:?}"
            );
            // AdamW's first steps move every entry by about the learning rate whatever the
            // gradient's size, so any rounding that flips a tiny gradient's sign shows at full
            // size: the trained tensors are compared where the values are the same (the
            // quantized form); bf16 rounds the embedding table, and its check is the losses.
            if form != BaseForm::Quantized {
                continue;
            }
            for (a, b) in gp.iter().zip(&wp) {
                let scale = max_abs(b).max(1e-6);
                let d = max_abs_diff(a, b);
                assert!(
                    d <= 1e-3 * scale,
                    "{what}: trained tensor differs by {d} (largest {scale})"
                );
            }
        }
    }
}

/// The compact forms answer as the dense base: a prompt's logits at every position (the
/// many-row products expand the compact form) and decode steps over the KV cache (the decode
/// kernel reads the same blocks); going back to f32 restores the dense model. Their weights take
/// a fraction of the dense model's memory.
#[test]
fn compact_bases_answer_as_the_dense_base_in_less_memory() {
    let dense = load(ComputeMode::Auto);
    let exact = load(ComputeMode::F32);
    let ids = dense.tokenizer.encode(TEXT, true).expect("encode");
    assert!(ids.len() > 9, "the prompt takes the many-row path");
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    let want = dense.model.forward(&t, None).expect("dense logits");
    let want_f32 = exact.model.forward(&t, None).expect("f32 logits");
    // Without AMX but with VNNI the dense form's prompts take the int8 products, which round
    // the weights and activations to 8 bits: the quantized form's exact values are then
    // compared with exact f32.
    let int8 =
        attune_models::kernels::int8::available() && !attune_models::kernels::amx::available();
    let same_values = if int8 { &want_f32 } else { &want };
    let dense_bytes = dense.model.held_bytes();
    let f32_bytes = exact.model.held_bytes();
    for form in [BaseForm::Quantized, BaseForm::Bf16] {
        let mut m = compact(form);
        let what = form.as_str();
        let got = m.model.forward(&t, None).expect("compact logits");
        // The quantized form multiplies the dense form's very values; bf16 rounds the weights
        // (the head too, which the dense form keeps in f32 outside training): it may stray from
        // exact f32 at most twice as far as the dense form's bf16 products do, and 0.25 more.
        let tol = if form == BaseForm::Quantized {
            2e-3
        } else {
            // Rounding the weights alone moved them 0.16 with f32 products (no AMX).
            2.0 * max_abs_diff(&want, &want_f32) + 0.25
        };
        let d = max_abs_diff(&got, same_values);
        let d_exact = max_abs_diff(&got, &want_f32);
        eprintln!("{what}: prompt logits {d:e} from the dense form's, {d_exact:e} from exact f32");
        if form == BaseForm::Quantized {
            assert!(
                d <= tol,
                "{what}: prompt logits differ from the dense base's by {d} (int8 products: {int8})"
            );
        } else {
            assert!(
                d_exact <= tol,
                "{what}: prompt logits differ from exact f32 by {d_exact}"
            );
        }
        // Decode: the last token after a prefill of the rest.
        let n = ids.len();
        let pre = Tensor::new(&ids[..n - 1], &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("pre");
        let last = Tensor::new(&ids[n - 1..], &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("last");
        let decode = |model: &attune_models::llama::Llama| {
            let mut cache = model.new_cache();
            model.forward_last(&pre, &mut cache).expect("prefill");
            model.forward_last(&last, &mut cache).expect("decode")
        };
        let (a, b, f) = (decode(&dense.model), decode(&m.model), decode(&exact.model));
        // A decode step multiplies 8-bit activations (the decode kernel, as llama.cpp's Q8_1):
        // its logits lie up to ~1 from exact f32, and a prefill that differs by 1e-5 (the f32
        // GEMM's panels sum in another order where the CPU has no AMX) draws other roundings.
        // So the compact form's step may stray from exact f32 at most twice as far as the
        // dense form's does.
        let d = max_abs_diff(&a, &b);
        let bound = 2.0 * max_abs_diff(&a, &f) + 0.05;
        let d_exact = max_abs_diff(&b, &f);
        assert!(
            d_exact <= bound,
            "{what}: a decode step's logits are {d_exact} from exact f32 (the dense form's {})",
            max_abs_diff(&a, &f)
        );
        let bytes = m.model.held_bytes();
        eprintln!(
            "{what}: logits within {d:e}; weights held {:.0} MiB (dense {:.0}, f32 {:.0})",
            bytes as f64 / 1048576.0,
            dense_bytes as f64 / 1048576.0,
            f32_bytes as f64 / 1048576.0
        );
        // bf16 values (2 bytes per weight) beside the decode kernel's blocks (0.75 for Q4_1)
        // against 4: under 80% of f32; the blocks alone: under a third.
        let (num, den) = if form == BaseForm::Quantized {
            (3, 1)
        } else {
            (5, 4)
        };
        assert!(
            bytes * num < f32_bytes * den,
            "{what}: {bytes} bytes held against {f32_bytes} in f32"
        );
        m.model.set_base_form(BaseForm::F32).expect("back to f32");
        assert_eq!(m.model.base_form(), BaseForm::F32);
        let back = m.model.forward(&t, None).expect("restored logits");
        let d = max_abs_diff(&back, &want);
        // bf16's rounding stays in the restored weights.
        assert!(d <= tol.max(2e-3), "{what} restored: logits differ by {d}");
    }
}

#[test]
fn base_form_names_round_trip() {
    for f in BaseForm::ALL {
        assert_eq!(BaseForm::parse(f.as_str()), Some(f));
    }
    assert_eq!(BaseForm::parse(" Quantized "), Some(BaseForm::Quantized));
    assert_eq!(BaseForm::parse("q4"), None);
}
