//! The int8 prompt products (`kernels::int8`: `Auto` mode on a CPU with AVX-512 VNNI and no
//! AMX) on the real default model: a prompt's next-token distributions stay as close to exact
//! f32 as the decode kernel's (8-bit activations per 32, as llama.cpp's Q8_1), which every
//! generated token already goes through.

mod common;

use attune_models::linear::ComputeMode;
use attune_models::loader::{self, LoadOptions, LoadedModel};
use candle_core::{Device, Tensor, D};

const TEXTS: [&str; 2] = [
    "Question: does aspirin reduce the risk of a second heart attack? Context: in a randomised \
     trial of 1,200 patients, low-dose aspirin lowered recurrence.",
    "The capital of France is Paris, which lies on the Seine. It is known for the Eiffel tower \
     and museums such as the Louvre.",
];

fn load(compute: ComputeMode) -> LoadedModel {
    loader::load(&common::model_path(), &LoadOptions { compute }).expect("default model")
}

/// Per position of every text: KL(exact || model) in nats and whether the top token agrees.
fn divergence(model: &LoadedModel, exact: &LoadedModel) -> Vec<(f32, bool)> {
    let mut out = Vec::new();
    for text in TEXTS {
        let ids = exact.tokenizer.encode(text, true).expect("encode");
        assert!(ids.len() > 16, "the prompt takes the many-row path");
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("ids");
        let logits = |m: &LoadedModel| {
            m.model
                .forward(&t, None)
                .and_then(|l| Ok(l.squeeze(0)?))
                .expect("logits")
        };
        let (got, want) = (logits(model), logits(exact));
        for p in 0..ids.len() {
            let (g, w) = (got.get(p).expect("row"), want.get(p).expect("row"));
            let lg = candle_nn::ops::log_softmax(&g, D::Minus1).expect("log softmax");
            let lw = candle_nn::ops::log_softmax(&w, D::Minus1).expect("log softmax");
            let kl = (lw.exp().expect("exp") * (&lw - &lg).expect("sub"))
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("kl");
            let top = |x: &Tensor| x.argmax(0).and_then(|i| i.to_scalar::<u32>()).expect("top");
            out.push((kl, top(&g) == top(&w)));
        }
    }
    out
}

#[test]
fn int8_prompts_stay_as_close_to_f32_as_the_decode_kernel() {
    let int8 =
        attune_models::kernels::int8::available() && !attune_models::kernels::amx::available();
    if !int8 {
        eprintln!("note: Auto's prompts do not take the int8 products on this CPU (AMX, or no VNNI): not tested");
        return;
    }
    let exact = load(ComputeMode::F32);
    let auto = load(ComputeMode::Auto);
    // Every product on the decode kernel: exact weights, 8-bit activations per 32.
    let quantized = load(ComputeMode::Quantized);
    let a = divergence(&auto, &exact);
    let q = divergence(&quantized, &exact);
    let mean = |v: &[(f32, bool)]| v.iter().map(|p| p.0 as f64).sum::<f64>() / v.len() as f64;
    let agree = |v: &[(f32, bool)]| v.iter().filter(|p| p.1).count() as f64 / v.len() as f64;
    eprintln!(
        "mean KL from f32: int8 prompts {:.5}, decode kernel {:.5}; top-1 agreement {:.3} / {:.3} \
         over {} positions",
        mean(&a),
        mean(&q),
        agree(&a),
        agree(&q),
        a.len()
    );
    assert!(
        mean(&a) <= 1.5 * mean(&q),
        "int8 prompts: mean KL {} from f32, the decode kernel's {}",
        mean(&a),
        mean(&q)
    );
    assert!(
        agree(&a) >= 0.9,
        "int8 prompts: top-1 agreement {}",
        agree(&a)
    );
}
