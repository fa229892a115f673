//! The fused decode layer (`kernels::decode::layer_qkv` / `layer_mlp`) against the same model
//! decoding op by op: on the real default model (Q4_1, `ComputeMode::Auto`, so one-token steps
//! take the quantized kernels), every step's logits must be equal bit for bit, and the fused ops
//! must have run once per layer and step.

#![allow(clippy::unwrap_used)]

use attune_models::chat_template::Message;
use attune_models::kernels::decode::fused_layer_calls;
use attune_models::llama::Llama;
use attune_models::loader::{load, LoadOptions};
use candle_core::{Device, Tensor, D};

mod common;
use common::model_path;

/// Greedy steps from `prompt`: each step's logits as bits, and the chosen ids.
fn decode(model: &Llama, prompt: &[u32], steps: usize) -> (Vec<Vec<u32>>, Vec<u32>) {
    let mut cache = model.new_cache();
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut logits = model.forward(&ids, Some(&mut cache)).unwrap();
    let (mut all, mut chosen) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let last = logits.squeeze(0).unwrap();
        let last = if last.rank() == 2 {
            last.get(last.dim(0).unwrap() - 1).unwrap()
        } else {
            last
        };
        let next = last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
        all.push(
            last.to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect(),
        );
        chosen.push(next);
        let ids = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = model.forward(&ids, Some(&mut cache)).unwrap();
    }
    (all, chosen)
}

#[test]
fn fused_decode_layer_equals_the_layer_op_by_op() {
    let mut m = load(&model_path(), &LoadOptions::default()).unwrap();
    let text = m
        .chat_template
        .render(
            &[Message::new(
                "user",
                "What is the first-line treatment of hypertension?",
            )],
            true,
        )
        .unwrap();
    let prompt = m.tokenizer.encode(&text, false).unwrap();
    let layers = m.config.num_hidden_layers;
    let steps = 24;

    m.model.set_decode_fusion(false);
    let before = fused_layer_calls();
    let (plain, plain_ids) = decode(&m.model, &prompt, steps);
    assert_eq!(
        fused_layer_calls(),
        before,
        "the fused ops ran with fusion off"
    );

    m.model.set_decode_fusion(true);
    let before = fused_layer_calls();
    let (fused, fused_ids) = decode(&m.model, &prompt, steps);
    assert_eq!(
        fused_layer_calls() - before,
        steps * layers,
        "every layer of every one-token step (not the prompt) takes the fused ops"
    );

    assert_eq!(plain_ids, fused_ids, "greedy ids differ");
    for (i, (a, b)) in plain.iter().zip(&fused).enumerate() {
        let differing = a.iter().zip(b).filter(|(x, y)| x != y).count();
        assert_eq!(differing, 0, "step {i}: {differing} logits differ");
    }
}
