//! Real PEFT adapters (shared/reference/adapters) on the GGUF model match PEFT's logits.
//! The GGUF loader un-permutes Q/K into Hugging Face layout, so PEFT's `lora_B` applies as is.

use attune_models::gguf;
use attune_models::linear::ComputeMode;
use candle_core::{Device, Tensor, D};

mod common;
use common::reference_dir;

fn model() -> attune_models::llama::Llama {
    let p = attune_models::default_model_path();
    assert!(
        p.is_file(),
        "default model missing at {}: run scripts/fetch-model.sh",
        p.display()
    );
    gguf::load(&p, ComputeMode::F32).expect("load model").model
}

struct Case {
    name: String,
    ids: Vec<u32>,
    top10: Vec<(u32, f32)>,
    mean_nll: f64,
}

fn cases(kind: &str) -> Vec<Case> {
    let path = reference_dir().join("adapters/adapter_logits.json");
    let text = std::fs::read_to_string(&path).expect("adapter_logits.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v[kind]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().expect("name").to_string(),
            ids: c["token_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect(),
            top10: c["top10_last"]
                .as_array()
                .expect("top10")
                .iter()
                .map(|e| {
                    (
                        e[0].as_u64().expect("id") as u32,
                        e[1].as_f64().expect("l") as f32,
                    )
                })
                .collect(),
            mean_nll: c["mean_nll"].as_f64().expect("nll"),
        })
        .collect()
}

/// `logits` `[T, V]` for the prompt tokens: checks NLL and the reference top-10 logits.
fn check(kind: &str, c: &Case, logits: &Tensor) {
    let t = c.ids.len();
    let lsm: Vec<Vec<f32>> = candle_nn::ops::log_softmax(logits, D::Minus1)
        .expect("lsm")
        .to_vec2()
        .expect("vec2");
    let nll: f64 = (1..t)
        .map(|i| -(lsm[i - 1][c.ids[i] as usize] as f64))
        .sum::<f64>()
        / (t - 1) as f64;
    assert!(
        (nll - c.mean_nll).abs() < 1e-3,
        "{kind}/{}: NLL {nll} vs {}",
        c.name,
        c.mean_nll
    );
    let last: Vec<f32> = logits.get(t - 1).expect("last").to_vec1().expect("v");
    for &(id, want) in &c.top10 {
        let got = last[id as usize];
        assert!(
            (got - want).abs() < 2e-2,
            "{kind}/{}: logit {id} {got} vs {want}",
            c.name
        );
    }
}

#[test]
fn peft_lora_adapter_matches_reference() {
    let mut m = model();
    let dir = reference_dir().join("adapters/lora");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    let scale = cfg["lora_alpha"].as_f64().expect("alpha") / cfg["r"].as_f64().expect("r");
    let tensors =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .expect("adapter");
    let mut attached = 0;
    for (name, lin) in m.linears_mut() {
        let key = |ab: &str| format!("base_model.model.{name}.lora_{ab}.weight");
        let a = tensors.get(&key("A")).expect("lora_A present");
        let b = tensors.get(&key("B")).expect("lora_B present");
        lin.attach_lora(a.clone(), b.clone(), scale)
            .expect("attach");
        attached += 1;
    }
    assert_eq!(attached, tensors.len() / 2);
    for c in cases("lora") {
        let ids = Tensor::new(c.ids.as_slice(), &Device::Cpu)
            .expect("ids")
            .unsqueeze(0)
            .expect("u");
        let logits = m
            .forward(&ids, None)
            .expect("forward")
            .squeeze(0)
            .expect("s");
        check("lora", &c, &logits);
        // Token by token through the KV cache (the decode path: the LoRA branch as one op on a
        // single row, attention over the cache) ends on the same logits as the full forward.
        let mut cache = m.new_cache();
        let mut last = None;
        for &id in &c.ids {
            let one = Tensor::new(&[id], &Device::Cpu)
                .expect("id")
                .unsqueeze(0)
                .expect("u");
            last = Some(m.forward_last(&one, &mut cache).expect("decode step"));
        }
        let stepped: Vec<f32> = last
            .expect("steps")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("v");
        let full: Vec<f32> = logits
            .get(c.ids.len() - 1)
            .expect("l")
            .to_vec1()
            .expect("v");
        let worst = stepped
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "lora/{}: stepped vs full {worst}", c.name);
    }
}

#[test]
fn peft_prompt_tuning_adapter_matches_reference() {
    let m = model();
    let file = reference_dir().join("adapters/prompt/adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).expect("adapter");
    let prompt = tensors.get("prompt_embeddings").expect("prompt_embeddings");
    let n_virtual = prompt.dim(0).expect("dim");
    let prefix = prompt.unsqueeze(0).expect("u");
    for c in cases("prompt") {
        let ids = Tensor::new(c.ids.as_slice(), &Device::Cpu)
            .expect("ids")
            .unsqueeze(0)
            .expect("u");
        let logits = m
            .forward_with_prefix(Some(&prefix), &ids, None)
            .expect("forward")
            .squeeze(0)
            .expect("s");
        assert_eq!(logits.dim(0).expect("d"), n_virtual + c.ids.len());
        let logits = logits
            .narrow(0, n_virtual, c.ids.len())
            .expect("drop virtual");
        check("prompt", &c, &logits);
    }
}
