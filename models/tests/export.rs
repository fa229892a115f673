//! Export round trips: tiny random models written as GGUF / adapter GGUF / Hugging Face folder
//! and read back by Attune's loaders, and the default model's tokenizer as llama.cpp names it.

mod common;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

use attune_models::config::Config;
use attune_models::export::{gguf_out, lora_gguf, tokenizer_meta, Job, WeightType};
use attune_models::llama::Llama;
use attune_models::train::LoraConfig;
use attune_models::Error;
use candle_core::{Device, Tensor};

fn tiny_config(arch: &str) -> Config {
    Config {
        architecture: arch.to_string(),
        vocab_size: 64,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: arch == "llama",
        attention_bias: arch == "qwen2",
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        head_dim: None,
        rope_scaling: None,
        ..Config::default()
    }
}

fn job_parts() -> (AtomicBool, impl FnMut(&str, usize, usize)) {
    (AtomicBool::new(false), |_: &str, _: usize, _: usize| {})
}

fn logits(m: &Llama, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::new(ids, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    let l = m.forward(&t, None).expect("forward");
    l.flatten_all().and_then(|l| l.to_vec1()).expect("logits")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn meta() -> gguf_out::ModelMeta {
    gguf_out::ModelMeta {
        name: "tiny".into(),
        tokenizer: Vec::new(),
        chat_template: attune_models::chat_template::CHATML_TEMPLATE.into(),
        general: Vec::new(),
    }
}

/// A model written as F32 GGUF (Q/K permuted for llama.cpp) and read back (un-permuted) gives
/// the same logits; with a LoRA attached, the written weights carry it folded in.
#[test]
fn gguf_round_trip_keeps_the_model_for_llama_and_qwen2() {
    for arch in ["llama", "qwen2"] {
        let cfg = tiny_config(arch);
        let mut model = Llama::new_random(&cfg, &Device::Cpu, 7).expect("model");
        // A LoRA branch on q_proj of layer 0 with a non-zero B.
        let a = Tensor::randn(0f32, 0.5, (4, 64), &Device::Cpu).expect("a");
        let b = Tensor::randn(0f32, 0.5, (64, 4), &Device::Cpu).expect("b");
        for (name, lin) in model.linears_mut() {
            if name == "model.layers.0.self_attn.q_proj" {
                lin.attach_lora(a.clone(), b.clone(), 2.0).expect("attach");
            }
        }
        let ids = [3u32, 9, 27, 5, 60, 1];
        let want = logits(&model, &ids);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        let (cancel, mut progress) = job_parts();
        let mut job = Job {
            progress: &mut progress,
            cancel: &cancel,
        };
        gguf_out::write_model(&model, &meta(), WeightType::F32, &path, &mut job).expect("write");
        let back = attune_models::gguf::load(&path, attune_models::linear::ComputeMode::F32)
            .expect("read back");
        assert_eq!(back.config.architecture, arch);
        let got = logits(&back.model, &ids);
        let d = max_diff(&want, &got);
        assert!(d < 1e-4, "{arch}: logits differ by {d}");
        // F16 stays close too.
        let p16 = dir.path().join("tiny16.gguf");
        gguf_out::write_model(&model, &meta(), WeightType::F16, &p16, &mut job).expect("write f16");
        let back16 = attune_models::gguf::load(&p16, attune_models::linear::ComputeMode::F32)
            .expect("read back f16");
        let d16 = max_diff(&want, &logits(&back16.model, &ids));
        assert!(d16 < 2e-2, "{arch}: F16 logits differ by {d16}");
    }
}

/// A LoRA written as an adapter GGUF (lora_b of q/k permuted) and read back gives PEFT's
/// tensors again, and the adapted model's logits.
#[test]
fn adapter_gguf_round_trip_gives_the_same_lora() {
    let cfg = tiny_config("llama");
    let base = Llama::new_random(&cfg, &Device::Cpu, 11).expect("model");
    let mut tensors = HashMap::new();
    let r = 4;
    for layer in 0..2 {
        for (module, out, inp) in [
            ("self_attn.q_proj", 64, 64),
            ("self_attn.k_proj", 32, 64),
            ("mlp.down_proj", 64, 128),
        ] {
            let key = |ab: &str| {
                format!("base_model.model.model.layers.{layer}.{module}.lora_{ab}.weight")
            };
            tensors.insert(
                key("A"),
                Tensor::randn(0f32, 0.3, (r, inp), &Device::Cpu).expect("a"),
            );
            tensors.insert(
                key("B"),
                Tensor::randn(0f32, 0.3, (out, r), &Device::Cpu).expect("b"),
            );
        }
    }
    let lcfg = LoraConfig {
        r,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "k_proj".into(), "down_proj".into()],
        rslora: true,
    };
    let mut adapted = base.clone();
    attune_models::train::peft::apply_lora(&mut adapted, &lcfg, &tensors).expect("apply");
    let ids = [5u32, 7, 11, 13];
    let want = logits(&adapted, &ids);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.gguf");
    let (cancel, mut progress) = job_parts();
    let mut job = Job {
        progress: &mut progress,
        cancel: &cancel,
    };
    let meta = lora_gguf::AdapterMeta {
        name: "a".into(),
        base_name: "tiny".into(),
    };
    lora_gguf::write(&cfg, &lcfg, &tensors, &meta, &path, &mut job).expect("write");
    let back = lora_gguf::read(&path, &cfg).expect("read");
    // rsLoRA's alpha/sqrt(r) is carried as llama.cpp's alpha/r.
    assert!((back.config.scale() - lcfg.scale()).abs() < 1e-6);
    for (k, t) in &tensors {
        let b = back.tensors.get(k).unwrap_or_else(|| panic!("{k} missing"));
        let d = (b - t)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(d, 0.0, "{k} changed");
    }
    let mut again = base.clone();
    attune_models::train::peft::apply_lora(&mut again, &back.config, &back.tensors).expect("apply");
    assert!(max_diff(&want, &logits(&again, &ids)) < 1e-5);
    // The adapter is refused by a base of another architecture.
    let err = lora_gguf::read(&path, &tiny_config("qwen2")).expect_err("qwen2 base");
    assert!(matches!(err, Error::Field { .. }), "{err}");
}

/// llama.cpp names the default model's pre-tokenizer by hashing the ids of its check text:
/// Attune's tokenizer gives SmolLM's hash, and the keys built from its tokenizer.json make a
/// GGUF tokenizer that encodes like the original.
#[test]
fn default_tokenizer_is_llama_cpps_smollm_and_survives_tokenizer_json() {
    let path = common::model_path();
    let (content, _) = attune_models::inspect::read_gguf_header(&path).expect("header");
    let tok = attune_models::tokenizer::Tok::from_gguf(&content, &path).expect("tokenizer");
    assert_eq!(
        tokenizer_meta::check_hash(&tok).expect("hash"),
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    tok.inner()
        .save(dir.path().join("tokenizer.json"), false)
        .expect("save tokenizer.json");
    let keys = tokenizer_meta::from_hf_dir(dir.path(), &tok, 49152).expect("keys");
    let pre = keys
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.pre")
        .map(|(_, v)| v.to_string().expect("s").clone());
    assert_eq!(pre.as_deref(), Some("smollm"));
    // Write them into a GGUF with no tensors and read the tokenizer back.
    let gguf = dir.path().join("tok.gguf");
    let (cancel, mut progress) = job_parts();
    let mut job = Job {
        progress: &mut progress,
        cancel: &cancel,
    };
    gguf_out::write_gguf(&gguf, &keys, &[], &mut |_| Ok(Vec::new()), &mut job).expect("write");
    let (c2, _) = attune_models::inspect::read_gguf_header(&gguf).expect("header");
    let tok2 = attune_models::tokenizer::Tok::from_gguf(&c2, &gguf).expect("tokenizer back");
    for text in [
        "<|im_start|>user\nHow many r's are in 'strawberry'? 1234<|im_end|>\n",
        tokenizer_meta::CHECK_TEXT,
    ] {
        assert_eq!(
            tok.encode(text, false).expect("a"),
            tok2.encode(text, false).expect("b"),
            "{text:?}"
        );
    }
    assert_eq!(tok.eos_token_ids(), tok2.eos_token_ids());
}
