//! The real default model against PyTorch/transformers reference figures
//! (`shared/reference/reference_logits.json`), plus the quantized path, the KV cache and the
//! Hugging Face export/import round trip on the real weights.

use attune_models::gguf;
use attune_models::linear::ComputeMode;
use attune_models::llama::Llama;
use candle_core::{Device, Tensor, D};

mod common;
use common::{model_path, reference_dir};

struct Prompt {
    name: String,
    ids: Vec<u32>,
    top10: Vec<(u32, f32)>,
    mean_nll: f64,
}

fn prompts() -> Vec<Prompt> {
    let path = reference_dir().join("reference_logits.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("reference JSON parses");
    v["prompts"]
        .as_array()
        .expect("prompts array")
        .iter()
        .map(|p| Prompt {
            name: p["name"].as_str().expect("name").to_string(),
            ids: p["token_ids"]
                .as_array()
                .expect("token_ids")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect(),
            top10: p["top10_last"]
                .as_array()
                .expect("top10_last")
                .iter()
                .map(|e| {
                    (
                        e[0].as_u64().expect("top id") as u32,
                        e[1].as_f64().expect("top logit") as f32,
                    )
                })
                .collect(),
            mean_nll: p["mean_nll"].as_f64().expect("mean_nll"),
        })
        .collect()
}

fn load(mode: ComputeMode) -> Llama {
    let p = model_path();
    gguf::load(&p, mode)
        .unwrap_or_else(|e| panic!("loading {}: {e}", p.display()))
        .model
}

/// `[1, T, V]` logits -> (mean NLL of tokens 1..T, last-position logits).
fn nll_and_last(logits: &Tensor, ids: &[u32]) -> (f64, Vec<f32>) {
    let logits = logits.squeeze(0).expect("squeeze");
    let t = ids.len();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).expect("log_softmax");
    let lsm: Vec<Vec<f32>> = lsm.to_vec2().expect("to_vec2");
    let mut nll = 0f64;
    for i in 1..t {
        nll -= lsm[i - 1][ids[i] as usize] as f64;
    }
    let last = logits
        .get(t - 1)
        .expect("last")
        .to_vec1::<f32>()
        .expect("vec");
    (nll / (t - 1) as f64, last)
}

fn top_k(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.into_iter().take(k).map(|i| (i as u32, v[i])).collect()
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .expect("ids")
        .unsqueeze(0)
        .expect("unsqueeze")
}

#[test]
fn f32_logits_match_pytorch() {
    let model = load(ComputeMode::F32);
    let prompts = prompts();
    assert_eq!(prompts.len(), 3);
    for p in &prompts {
        let logits = model.forward(&ids_tensor(&p.ids), None).expect("forward");
        assert_eq!(logits.dims(), &[1, p.ids.len(), model.config().vocab_size]);
        let (nll, last) = nll_and_last(&logits, &p.ids);
        assert!(
            (nll - p.mean_nll).abs() < 1e-3,
            "{}: mean NLL {nll} vs reference {}",
            p.name,
            p.mean_nll
        );
        // Every reference top-10 logit within 2e-2.
        for &(id, want) in &p.top10 {
            let got = last[id as usize];
            assert!(
                (got - want).abs() < 2e-2,
                "{}: logit of {id} is {got}, reference {want}",
                p.name
            );
        }
        // Same top-10 set; order may differ only between logits closer than 2e-2.
        let ours = top_k(&last, 10);
        let ref_ids: Vec<u32> = p.top10.iter().map(|x| x.0).collect();
        let tenth = p.top10[9].1;
        for (rank, &(id, logit)) in ours.iter().enumerate() {
            if !ref_ids.contains(&id) {
                assert!(
                    (logit - tenth).abs() < 2e-2,
                    "{}: {id} ({logit}) in our top-10 but not the reference's",
                    p.name
                );
            }
            let ref_rank = ref_ids.iter().position(|&r| r == id);
            if let Some(rr) = ref_rank {
                if rr != rank {
                    let want_at_rank = p.top10[rank].1;
                    assert!(
                        (logit - want_at_rank).abs() < 2e-2,
                        "{}: rank {rank} is {id} but reference has {} there",
                        p.name,
                        p.top10[rank].0
                    );
                }
            }
        }
    }
}

/// The quantized path (decode kernels) gives the same next token and close logits.
/// Tolerance: Q4_1 x Q8_1 dot products round the activations to 8 bits, so logits move by up
/// to ~0.6 here; the argmax and the top-5 set must stay.
#[test]
fn quantized_path_is_close_to_f32() {
    let f32m = load(ComputeMode::F32);
    let qm = load(ComputeMode::Quantized);
    for p in &prompts() {
        let ids = ids_tensor(&p.ids);
        let mut c1 = f32m.new_cache();
        let a: Vec<f32> = f32m
            .forward_last(&ids, &mut c1)
            .expect("f32 forward")
            .squeeze(0)
            .expect("squeeze")
            .to_vec1()
            .expect("vec");
        let mut c2 = qm.new_cache();
        let b: Vec<f32> = qm
            .forward_last(&ids, &mut c2)
            .expect("q forward")
            .squeeze(0)
            .expect("squeeze")
            .to_vec1()
            .expect("vec");
        let ta = top_k(&a, 5);
        let tb = top_k(&b, 5);
        assert_eq!(ta[0].0, tb[0].0, "{}: argmax differs", p.name);
        let max_diff = ta
            .iter()
            .map(|&(id, v)| (v - b[id as usize]).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{}: quantized vs f32 max |diff| over f32 top-5: {max_diff}",
            p.name
        );
        assert!(
            max_diff < 1.0,
            "{}: top-5 logits differ by {max_diff}",
            p.name
        );
        // Decode one token on each path from its cache: same greedy choice.
        let next = Tensor::new(&[[ta[0].0]], &Device::Cpu).expect("next");
        let a2 = f32m.forward_last(&next, &mut c1).expect("step");
        let b2 = qm.forward_last(&next, &mut c2).expect("step");
        let am = a2
            .argmax(D::Minus1)
            .expect("argmax")
            .to_vec1::<u32>()
            .expect("v");
        let bm = b2
            .argmax(D::Minus1)
            .expect("argmax")
            .to_vec1::<u32>()
            .expect("v");
        assert_eq!(am, bm, "{}: second greedy token differs", p.name);
    }
}

/// Prompt then token-by-token decode with the KV cache equals one full forward pass.
#[test]
fn kv_cache_decode_matches_full_forward_real_model() {
    let model = load(ComputeMode::F32);
    let p = &prompts()[1];
    let ids = &p.ids;
    let full = model
        .forward(&ids_tensor(ids), None)
        .expect("full")
        .squeeze(0)
        .expect("s");
    let mut cache = model.new_cache();
    let split = ids.len() - 6;
    model
        .forward_last(&ids_tensor(&ids[..split]), &mut cache)
        .expect("prompt");
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let step = model
            .forward_last(&ids_tensor(&[id]), &mut cache)
            .expect("step")
            .squeeze(0)
            .expect("s");
        let want = full.get(i).expect("row");
        let diff = (step - want)
            .expect("sub")
            .abs()
            .expect("abs")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar");
        assert!(diff < 1e-3, "position {i}: cached decode differs by {diff}");
    }
    assert_eq!(cache.len(), ids.len());
}

/// Export the GGUF's dequantized weights as a (sharded) Hugging Face folder, load it back with
/// the safetensors loader: same logits as the GGUF loader.
#[test]
fn hf_export_of_real_model_gives_same_logits() {
    let model = load(ComputeMode::F32);
    let dir = tempfile::tempdir().expect("tempdir");
    attune_models::hf::save(&model, dir.path(), Some(200 << 20)).expect("save");
    assert!(dir.path().join("model.safetensors.index.json").is_file());
    let hf = attune_models::hf::load(dir.path()).expect("load hf");
    assert_eq!(
        hf.config.num_hidden_layers,
        model.config().num_hidden_layers
    );
    let p = &prompts()[0];
    let a = model.forward(&ids_tensor(&p.ids), None).expect("gguf");
    let b = hf.model.forward(&ids_tensor(&p.ids), None).expect("hf");
    let diff = (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar");
    assert!(diff < 1e-4, "HF export differs from GGUF by {diff}");
    let (nll, _) = nll_and_last(
        &hf.model.forward(&ids_tensor(&p.ids), None).expect("f"),
        &p.ids,
    );
    assert!(
        (nll - p.mean_nll).abs() < 1e-3,
        "HF export NLL {nll} vs {}",
        p.mean_nll
    );
}
