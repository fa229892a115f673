//! The fused inference layers (`kernels::decode::layer_qkv` / `layer_mlp` for one-token steps,
//! `kernels::prompt::layer_qkv` / `layer_mlp` for prompts) against the same model running its
//! layers op by op: on the real default model (Q4_1, `ComputeMode::Auto`, so one-token steps take
//! the quantized kernels and prompts the bf16 products), the prompt's logits (through the cache
//! and without one) and every step's logits must be equal bit for bit, and the fused ops must
//! have run once per layer and pass; the same with the reference PEFT LoRA attached (decode fuses
//! the branches, on their bf16 copies as the unfused decode adds them; prompts with a LoRA run op
//! by op).

#![allow(clippy::unwrap_used)]

use attune_models::chat_template::Message;
use attune_models::kernels::decode::fused_layer_calls;
use attune_models::kernels::prompt::fused_layer_calls as fused_prompt_calls;
use attune_models::llama::Llama;
use attune_models::loader::{load, LoadOptions};
use candle_core::{Device, Tensor, D};

mod common;
use common::{model_path, reference_dir};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Greedy steps from `prompt`: the prompt's logits scored without a cache and through it (every
/// position), then each step's logits (the first: the prompt's last position), as bits, and the
/// chosen ids.
fn decode(model: &Llama, prompt: &[u32], steps: usize) -> (Vec<Vec<u32>>, Vec<u32>) {
    let mut cache = model.new_cache();
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let scored = model.forward(&ids, None).unwrap();
    let mut logits = model.forward(&ids, Some(&mut cache)).unwrap();
    let (mut all, mut chosen) = (vec![bits(&scored), bits(&logits)], Vec::new());
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

/// Decodes `steps` tokens with the fused layer off, then on: equal logits bit for bit, and the
/// fused ops ran for every layer of every one-token step (none with fusion off).
fn check_equal(model: &mut Llama, prompt: &[u32], layers: usize, what: &str) {
    check_equal_fused(model, prompt, (steps_fused(layers), 2 * layers), what)
}

/// Fused layer steps expected for 24 decoded tokens.
fn steps_fused(layers: usize) -> usize {
    24 * layers
}

/// Whether the CPU has the vector path of the LoRA branches' bf16 copies (AVX-512 F/BW/VL),
/// without which LoRA layers decode op by op.
fn lora_copies() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `expect`: fused one-token layer steps, fused prompt layer passes (the prompt scored without
/// a cache, then through it).
fn check_equal_fused(model: &mut Llama, prompt: &[u32], expect: (usize, usize), what: &str) {
    let steps = 24;
    model.set_decode_fusion(false);
    let before = (fused_layer_calls(), fused_prompt_calls());
    let (plain, plain_ids) = decode(model, prompt, steps);
    assert_eq!(
        (fused_layer_calls(), fused_prompt_calls()),
        before,
        "{what}: the fused ops ran with fusion off"
    );

    model.set_decode_fusion(true);
    let before = (fused_layer_calls(), fused_prompt_calls());
    let (fused, fused_ids) = decode(model, prompt, steps);
    assert_eq!(
        (
            fused_layer_calls() - before.0,
            fused_prompt_calls() - before.1
        ),
        expect,
        "{what}: every layer of every one-token step and of both prompt passes takes the fused \
         ops"
    );

    assert_eq!(plain_ids, fused_ids, "{what}: greedy ids differ");
    for (i, (a, b)) in plain.iter().zip(&fused).enumerate() {
        let differing = a.iter().zip(b).filter(|(x, y)| x != y).count();
        let at = match i {
            0 => "the prompt scored without a cache".to_string(),
            1 => "the prompt through the cache".to_string(),
            2 => "the prompt's last position".to_string(),
            i => format!("decode step {}", i - 2),
        };
        assert_eq!(differing, 0, "{what}, {at}: {differing} logits differ");
    }
}

// One test: the checks count the fused ops' calls in this process.
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
    check_equal(&mut m.model, &prompt, layers, "base model");

    let dir = reference_dir().join("adapters/lora");
    let attune_models::train::peft::Adapter::Lora {
        config, tensors, ..
    } = attune_models::train::peft::load(&dir).unwrap()
    else {
        panic!("{} is not a LoRA adapter", dir.display())
    };
    let mut adapted = m.model.clone();
    attune_models::train::peft::apply_lora(&mut adapted, &config, &tensors).unwrap();
    let expect = if lora_copies() {
        steps_fused(layers)
    } else {
        0
    };
    check_equal_fused(
        &mut adapted,
        &prompt,
        (expect, 0),
        "reference LoRA attached",
    );
}
