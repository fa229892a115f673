//! Fast tests of the decoder, linear layers and loaders on tiny randomly initialised models
//! built in the test (no download needed), plus GGUF error handling on damaged files.

use std::sync::Arc;

use attune_models::config::{Config, Family, RopeScaling};
use attune_models::gguf;
use attune_models::linear::{ComputeMode, FusedDecode, Linear};
use attune_models::llama::{Block, LayerFusion, Llama, QkvProj};
use attune_models::Error;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var, D};

fn tiny_config(arch: &str) -> Config {
    Config {
        architecture: arch.to_string(),
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 64,
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
        ..Config::default()
    }
}

/// A tiny config of `family` with its switches on: Qwen3's q/k norms; Gemma 3's (1 + w) norms,
/// norms around attention and MLP, scaled embeddings, GeGLU, query scale, and sliding-window
/// layers (window 5) with their own rope base; Phi-3's fused projections, partial rotary and
/// LongRoPE; SmolLM3's layer without rope.
fn family_config(family: Family) -> Config {
    let mut c = tiny_config("llama");
    c.apply_family_defaults(family);
    c.num_hidden_layers = 3;
    match family {
        Family::Gemma3 => {
            c.head_dim = Some(16);
            c.query_pre_attn_scalar = Some(12.0);
            c.sliding_window = Some(5);
            c.sliding_layers = vec![true, false, true];
            c.rope_local_theta = Some(100.0);
            c.rope_scaling = Some(RopeScaling::Linear { factor: 4.0 });
        }
        Family::Phi3 => {
            c.rotary_dim = Some(6);
            c.tie_word_embeddings = false;
            c.rope_scaling = Some(RopeScaling::LongRope {
                short_factor: vec![1.0, 1.5, 2.0],
                long_factor: vec![2.0, 3.0, 5.0],
                original_max_position_embeddings: 40,
                attention_factor: 1.1,
            });
        }
        Family::Smollm3 => c.rope_layers = vec![true, false, true],
        _ => {}
    }
    c
}

/// Projections per layer (7, or 4 with fused q/k/v and gate/up).
fn m_linears_per_layer(cfg: &Config) -> usize {
    cfg.lora_targets().len()
}

fn q_proj(b: &Block) -> &Linear {
    match &b.self_attn.qkv {
        QkvProj::Split { q_proj, .. } => q_proj,
        QkvProj::Fused { .. } => panic!("a fused qkv projection"),
    }
}

fn ids(v: &[u32]) -> Tensor {
    Tensor::new(v, &Device::Cpu)
        .expect("ids")
        .unsqueeze(0)
        .expect("unsqueeze")
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).expect("sub"))
}

const PROMPT: [u32; 9] = [5, 17, 3, 60, 42, 8, 8, 21, 33];

#[test]
fn kv_cache_decode_equals_full_forward() {
    for arch in ["llama", "qwen2", "mistral"] {
        let m = Llama::new_random(&tiny_config(arch), &Device::Cpu, 7).expect("model");
        let full = m
            .forward(&ids(&PROMPT), None)
            .expect("full")
            .squeeze(0)
            .expect("s");
        let mut cache = m.new_cache();
        let first = m
            .forward_last(&ids(&PROMPT[..4]), &mut cache)
            .expect("prompt");
        assert!(max_abs_diff(&first.squeeze(0).expect("s"), &full.get(3).expect("r")) < 1e-5);
        for (i, &t) in PROMPT.iter().enumerate().skip(4) {
            let step = m.forward_last(&ids(&[t]), &mut cache).expect("step");
            let d = max_abs_diff(&step.squeeze(0).expect("s"), &full.get(i).expect("r"));
            assert!(d < 1e-5, "{arch}: position {i} differs by {d}");
        }
        assert_eq!(cache.len(), PROMPT.len());
        // Chunked prefill through the cache (multi-row queries with an offset mask).
        cache.clear();
        m.forward(&ids(&PROMPT[..3]), Some(&mut cache))
            .expect("chunk 1");
        let rest = m
            .forward(&ids(&PROMPT[3..]), Some(&mut cache))
            .expect("chunk 2");
        let d = max_abs_diff(
            &rest.squeeze(0).expect("s"),
            &full.narrow(0, 3, 6).expect("n"),
        );
        assert!(d < 1e-5, "{arch}: chunked prefill differs by {d}");
    }
}

#[test]
fn kv_cache_grows_past_initial_capacity_and_clones_deeply() {
    let mut cfg = tiny_config("llama");
    cfg.max_position_embeddings = 1024;
    let m = Llama::new_random(&cfg, &Device::Cpu, 3).expect("model");
    let long: Vec<u32> = (0..300).map(|i| (i * 7 % 64) as u32).collect();
    let full = m
        .forward(&ids(&long), None)
        .expect("full")
        .squeeze(0)
        .expect("s");
    let mut cache = m.new_cache();
    m.forward_last(&ids(&long[..250]), &mut cache)
        .expect("prefill");
    let snapshot = cache.clone();
    for (i, &t) in long.iter().enumerate().skip(250) {
        let step = m.forward_last(&ids(&[t]), &mut cache).expect("step");
        let d = max_abs_diff(&step.squeeze(0).expect("s"), &full.get(i).expect("r"));
        assert!(d < 1e-4, "position {i} differs by {d}");
    }
    // The clone was not disturbed by the writes into the original.
    let mut c2 = snapshot;
    assert_eq!(c2.len(), 250);
    let step = m.forward_last(&ids(&[long[250]]), &mut c2).expect("step");
    assert!(max_abs_diff(&step.squeeze(0).expect("s"), &full.get(250).expect("r")) < 1e-4);
}

#[test]
fn soft_prefix_equals_prepended_token_embeddings() {
    let m = Llama::new_random(&tiny_config("llama"), &Device::Cpu, 11).expect("model");
    let virt = [9u32, 10, 11];
    let prefix = m.embed_tokens().forward(&ids(&virt)).expect("embed"); // [1, 3, hidden]
    let with_prefix = m
        .forward_with_prefix(Some(&prefix), &ids(&PROMPT), None)
        .expect("prefix forward");
    let mut all = virt.to_vec();
    all.extend_from_slice(&PROMPT);
    let plain = m.forward(&ids(&all), None).expect("plain");
    assert_eq!(with_prefix.dims(), plain.dims());
    assert!(max_abs_diff(&with_prefix, &plain) < 1e-5);
    // Batch 2 with a shared [1, n, hidden] prefix broadcast to both rows.
    let two = Tensor::new(&[PROMPT, PROMPT], &Device::Cpu).expect("ids2");
    let b2 = m
        .forward_with_prefix(Some(&prefix), &two, None)
        .expect("batch");
    assert!(max_abs_diff(&b2.get(1).expect("row"), &plain.squeeze(0).expect("s")) < 1e-5);
    // Prefix through the cache, then decode: positions continue after the virtual tokens.
    let mut cache = m.new_cache();
    m.forward_with_prefix(Some(&prefix), &ids(&PROMPT[..5]), Some(&mut cache))
        .expect("prefix prefill");
    assert_eq!(cache.len(), 8);
    let step = m
        .forward_last(&ids(&[PROMPT[5]]), &mut cache)
        .expect("step");
    let want = plain.squeeze(0).expect("s").get(8).expect("row");
    assert!(max_abs_diff(&step.squeeze(0).expect("s"), &want) < 1e-5);
    // A wrongly shaped prefix is an error, not a panic.
    let bad = Tensor::zeros((1, 3, 7), DType::F32, &Device::Cpu).expect("bad");
    assert!(m
        .forward_with_prefix(Some(&bad), &ids(&PROMPT), None)
        .is_err());
}

#[test]
fn differentiable_path_matches_fast_path_and_trains_lora_and_prefix() {
    let mut m = Llama::new_random(&tiny_config("qwen2"), &Device::Cpu, 5).expect("model");
    let fast = m.forward(&ids(&PROMPT), None).expect("fast");
    m.set_force_differentiable(true);
    let slow = m.forward(&ids(&PROMPT), None).expect("slow");
    assert!(max_abs_diff(&fast, &slow) < 1e-4);
    m.set_force_differentiable(false);

    // LoRA vars on q_proj of layer 0 and a prefix var: both get gradients.
    let dev = Device::Cpu;
    let a = Var::randn(0f32, 0.1, (4, 32), &dev).expect("a");
    let b = Var::randn(0f32, 0.1, (32, 4), &dev).expect("b");
    {
        let mut lins = m.linears_mut();
        let (name, q) = &mut lins[0];
        assert_eq!(name, "model.layers.0.self_attn.q_proj");
        q.attach_lora(a.as_tensor().clone(), b.as_tensor().clone(), 2.0)
            .expect("attach");
    }
    let prefix = Var::randn(0f32, 0.02, (1, 2, 32), &dev).expect("prefix");
    let logits = m
        .forward_with_prefix(Some(prefix.as_tensor()), &ids(&PROMPT), None)
        .expect("forward");
    let loss = candle_nn::loss::cross_entropy(
        &logits.squeeze(0).expect("s").narrow(0, 2, 8).expect("n"),
        &Tensor::new(&PROMPT[1..], &dev).expect("targets"),
    )
    .expect("loss");
    let grads = loss.backward().expect("backward");
    for (what, v) in [("lora_A", &a), ("lora_B", &b), ("prefix", &prefix)] {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {what}"));
        let norm = g
            .sqr()
            .expect("sq")
            .sum_all()
            .expect("sum")
            .to_scalar::<f32>()
            .expect("s");
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{what} gradient norm {norm}"
        );
    }
}

/// Hidden states and gradients of `sum(h * probe)` for the prefix (if any) and `params`, with
/// the layers fused as `fusion` says.
fn layer_grads(
    m: &mut Llama,
    fusion: LayerFusion,
    prefix: Option<&Var>,
    params: &[Var],
    toks: &Tensor,
    probe: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    m.set_layer_fusion(fusion);
    let h = m
        .hidden_states(prefix.map(|p| p.as_tensor()), toks, None)
        .expect("hidden states");
    let loss = (&h * probe).expect("mul").sum_all().expect("sum");
    let grads = attune_models::kernels::block::backward(&loss).expect("backward");
    let g = prefix
        .into_iter()
        .chain(params)
        .map(|v| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for a {:?} variable", v.dims()))
                .clone()
        })
        .collect();
    (h, g)
}

/// `|a - b| / |b|` in the Frobenius norm: bf16 rounding's error over a whole tensor.
fn rel_norm_diff(a: &Tensor, b: &Tensor) -> f32 {
    let norm = |t: &Tensor| -> f32 {
        t.sqr()
            .expect("sqr")
            .sum_all()
            .expect("sum")
            .to_scalar::<f32>()
            .expect("scalar")
            .sqrt()
    };
    let scale = norm(b);
    assert!(scale > 0.0, "an all-zero reference");
    norm(&(a - b).expect("sub")) / scale
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = max_abs(b);
    assert!(scale > 0.0, "an all-zero reference");
    max_abs_diff(a, b) / scale
}

/// Normal values (mean 0, `std`) from `seed`: the fused-layer cases are the same on every run.
fn seeded_normal(std: f32, dims: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random::<f32>();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).expect("seeded tensor")
}

/// The families the fused layer is checked on (Llama's tiny config, the others' switches).
const FUSED_FAMILIES: [Family; 5] = [
    Family::Llama,
    Family::Qwen3,
    Family::Gemma3,
    Family::Phi3,
    Family::Smollm3,
];

/// A random model of `family` set up for one training case of the fused-layer tests: `prompt`
/// (a soft prefix through frozen layers), `lora-all`, `lora-qv`, `lora-dropout` (layer 0's
/// branches with dropout, so that layer stays separate ops) or `full` (weights and norm scales
/// trained). Returns the model, the trained variables, the prefix and the sequence length.
fn fused_case(family: Family, kind: &str) -> (Llama, Vec<Var>, Option<Var>, usize) {
    let dev = Device::Cpu;
    let mut seed = 0;
    let mut var = |std: f32, dims: &[usize]| {
        seed += 1;
        Var::from_tensor(&seeded_normal(std, dims, seed)).expect("var")
    };
    let cfg = if family == Family::Llama {
        tiny_config("llama")
    } else {
        family_config(family)
    };
    let per_layer = m_linears_per_layer(&cfg);
    let mut m = Llama::new_random(&cfg, &dev, 21).expect("model");
    // Norm scales away from their unit values, so the (1 + w) offset is exercised.
    for block in m.layers_mut() {
        for (_, norm) in block.norms_mut() {
            norm.weight = (&norm.weight + 0.1).expect("shift");
        }
    }
    let mut params = Vec::new();
    let mut prefix = None;
    let seq = if kind == "prompt" { 70 } else { 67 };
    match kind {
        "prompt" => prefix = Some(var(0.3, &[1, 3, 32])),
        "lora-all" | "lora-qv" | "lora-dropout" => {
            for (i, (name, lin)) in m.linears_mut().into_iter().enumerate() {
                let wanted = match kind {
                    "lora-qv" => {
                        name.ends_with("q_proj")
                            || name.ends_with("v_proj")
                            || name.ends_with("qkv_proj")
                    }
                    _ => true,
                };
                if !wanted {
                    continue;
                }
                let (out, inp) = (lin.out_dim(), lin.in_dim());
                let a = var(0.2, &[4, inp]);
                let b = var(0.2, &[out, 4]);
                lin.attach_lora(a.as_tensor().clone(), b.as_tensor().clone(), 2.0)
                    .expect("attach");
                if kind == "lora-dropout" && i < per_layer {
                    // Layer 0 with dropout (and a mask seed) stays separate ops.
                    lin.lora_mut().expect("branch").dropout = 0.1;
                    lin.lora_mut().expect("branch").dropout_seed = Some(3);
                }
                params.push(a);
                params.push(b);
            }
        }
        "full" => {
            for (_, lin) in m.linears_mut() {
                let v = Var::from_tensor(lin.weight().expect("weight")).expect("var");
                lin.set_weight(v.as_tensor().clone()).expect("set");
                params.push(v);
            }
            for block in m.layers_mut() {
                for (_, norm) in block.norms_mut() {
                    let w = (&norm.weight + 0.1).expect("shift");
                    let v = Var::from_tensor(&w).expect("var");
                    norm.weight = v.as_tensor().clone();
                    params.push(v);
                }
            }
        }
        _ => unreachable!(),
    }
    (m, params, prefix, seq)
}

#[test]
fn layers_as_one_op_match_their_separate_ops() {
    // Each decoder layer as one fused op must give the hidden states and every gradient of the
    // layer's separate ops: for a soft prefix through frozen layers (prompt tuning), LoRA on
    // every projection, LoRA on q and v only, LoRA with dropout (not fused) beside a fused
    // layer, and full fine-tuning (weights and norm scales). 67 tokens + 3 virtual ones make two
    // causal attention blocks.
    let dev = Device::Cpu;
    let toks: Vec<u32> = (0..2 * 67).map(|i| (i * 7 + 3) % 64).collect();
    let toks = Tensor::from_vec(toks, (2, 67), &dev).expect("ids");
    let cases = ["prompt", "lora-all", "lora-qv", "lora-dropout", "full"];
    for (family, kind) in FUSED_FAMILIES
        .iter()
        .flat_map(|f| cases.iter().map(move |c| (*f, *c)))
    {
        let case = &format!("{family:?} {kind}");
        let (mut m, params, prefix, seq) = fused_case(family, kind);
        let probe = seeded_normal(1.0, &[2, seq, 32], 99);
        let (h_sep, g_sep) = layer_grads(
            &mut m,
            LayerFusion::Off,
            prefix.as_ref(),
            &params,
            &toks,
            &probe,
        );
        let (h_fused, g_fused) = layer_grads(
            &mut m,
            LayerFusion::All,
            prefix.as_ref(),
            &params,
            &toks,
            &probe,
        );
        let dh = rel_diff(&h_fused, &h_sep);
        assert!(dh < 1e-5, "{case}: hidden states differ by {dh} (relative)");
        for (i, (gf, gs)) in g_fused.iter().zip(&g_sep).enumerate() {
            let d = rel_diff(gf, gs);
            assert!(
                d < 1e-4,
                "{case}: gradient {i} {:?} differs by {d} (relative)",
                gs.dims()
            );
        }
    }
}

#[test]
fn lora_branch_equals_merged_weight() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).expect("w");
    let bias = Tensor::randn(0f32, 1.0, 6, &dev).expect("bias");
    let a = Tensor::randn(0f32, 1.0, (2, 5), &dev).expect("a");
    let b = Tensor::randn(0f32, 1.0, (6, 2), &dev).expect("b");
    let x = Tensor::randn(0f32, 1.0, (3, 4, 5), &dev).expect("x");
    let mut lin = Linear::from_weights(w.clone(), Some(bias.clone())).expect("lin");
    let base = lin.forward(&x).expect("base");
    lin.attach_lora(a.clone(), b.clone(), 0.5).expect("attach");
    let with = lin.forward(&x).expect("with");
    let merged_w = (w + (b.matmul(&a).expect("ba") * 0.5).expect("scale")).expect("merge");
    let merged = Linear::from_weights(merged_w, Some(bias)).expect("merged");
    assert!(max_abs_diff(&with, &merged.forward(&x).expect("m")) < 1e-4);
    assert!(lin.detach_lora().is_some());
    assert!(max_abs_diff(&base, &lin.forward(&x).expect("after")) < 1e-6);
    // Shapes that do not fit are refused.
    let bad = Tensor::zeros((2, 7), DType::F32, &dev).expect("bad");
    assert!(lin.attach_lora(bad, b, 1.0).is_err());
}

#[test]
fn quantized_linear_modes_pick_the_right_weights() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (64, 64), &dev).expect("w");
    let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize"));
    let deq = q.dequantize(&dev).expect("deq");
    let x1 = Tensor::randn(0f32, 1.0, (1, 64), &dev).expect("x1");
    let xm = Tensor::randn(0f32, 1.0, (32, 64), &dev).expect("xm");
    let exact = |x: &Tensor| x.matmul(&deq.t().expect("t")).expect("mm");
    let f = Linear::from_qtensor(q.clone(), None, ComputeMode::F32).expect("f32");
    assert!(f.qweight().is_none() && f.weight().is_some());
    assert!(max_abs_diff(&f.forward(&x1).expect("f"), &exact(&x1)) < 1e-4);
    let qq = Linear::from_qtensor(q.clone(), None, ComputeMode::Quantized).expect("q");
    assert!(qq.weight().is_none());
    let yq = qq.forward(&x1).expect("q");
    let dq = max_abs_diff(&yq, &exact(&x1));
    assert!(dq > 0.0 && dq < 0.5, "Q8 path differs by {dq}");
    let auto = Linear::from_qtensor(q, None, ComputeMode::Auto).expect("auto");
    // One row: quantized kernel (bitwise the Quantized result); many rows: exact f32.
    assert!(max_abs_diff(&auto.forward(&x1).expect("a1"), &yq) == 0.0);
    assert!(max_abs_diff(&auto.forward(&xm).expect("am"), &exact(&xm)) < 1e-4);
}

#[test]
fn hf_folder_round_trip_single_sharded_and_bf16() {
    for arch in ["llama", "qwen2"] {
        let m = Llama::new_random(&tiny_config(arch), &Device::Cpu, 21).expect("model");
        let want = m.forward(&ids(&PROMPT), None).expect("want");
        for shard in [None, Some(20_000usize)] {
            let dir = tempfile::tempdir().expect("tempdir");
            attune_models::hf::save(&m, dir.path(), shard).expect("save");
            assert_eq!(
                dir.path().join("model.safetensors.index.json").is_file(),
                shard.is_some()
            );
            let h = attune_models::hf::load(dir.path()).expect("load");
            assert_eq!(&h.config, m.config());
            let got = h.model.forward(&ids(&PROMPT), None).expect("got");
            assert!(max_abs_diff(&want, &got) < 1e-6, "{arch} {shard:?}");
        }
        // bf16 weights are widened to f32 on load.
        let dir = tempfile::tempdir().expect("tempdir");
        attune_models::hf::save(&m, dir.path(), None).expect("save");
        let file = dir.path().join("model.safetensors");
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).expect("read");
        let bf: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).expect("bf16")))
            .collect();
        candle_core::safetensors::save(&bf, &file).expect("write bf16");
        let h = attune_models::hf::load(dir.path()).expect("load bf16");
        let w = q_proj(&h.model.layers()[0]);
        let orig = tensors["model.layers.0.self_attn.q_proj.weight"]
            .to_dtype(DType::BF16)
            .expect("bf")
            .to_dtype(DType::F32)
            .expect("f32");
        assert_eq!(max_abs_diff(w.weight().expect("w"), &orig), 0.0);
    }
}

#[test]
fn hf_folder_errors_name_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = attune_models::hf::load(dir.path())
        .err()
        .expect("no config");
    assert!(e.to_string().contains("config.json"), "{e}");
    let m = Llama::new_random(&tiny_config("llama"), &Device::Cpu, 1).expect("model");
    attune_models::hf::save(&m, dir.path(), None).expect("save");
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).expect("read");
    std::fs::write(&cfg, text.replace("\"llama\"", "\"gpt2\"")).expect("write");
    match attune_models::hf::load(dir.path()) {
        Err(Error::UnsupportedArchitecture { architecture, .. }) => {
            assert_eq!(architecture, "gpt2")
        }
        other => panic!("expected unsupported architecture, got {:?}", other.err()),
    }
    std::fs::write(&cfg, text.replace("\"hidden_size\"", "\"hidden_sizes\"")).expect("write");
    let e = attune_models::hf::load(dir.path())
        .err()
        .expect("bad config");
    assert!(e.to_string().contains("hidden_size"), "{e}");
}

/// Writes `m` as a llama.cpp-style GGUF (Q/K rows permuted, names `blk.N.*`), f32 or Q8_0.
fn write_gguf(m: &Llama, path: &std::path::Path, dtype: GgmlDType, arch: &str) {
    let cfg = m.config();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let q = |t: &Tensor, dt: GgmlDType| QTensor::quantize(t, dt).expect("quantize");
    tensors.push((
        "token_embd.weight".into(),
        q(&m.embed_tokens().weight_f32().expect("e"), GgmlDType::F32),
    ));
    tensors.push((
        "output_norm.weight".into(),
        q(&m.norm().weight, GgmlDType::F32),
    ));
    for (i, b) in m.layers().iter().enumerate() {
        let p = format!("blk.{i}");
        let a = &b.self_attn;
        let perm = |l: &Linear, heads: usize| {
            let w = l.weight_f32().expect("w");
            if arch == "llama" {
                gguf::permute_dense_rows(&w, heads).expect("permute")
            } else {
                w
            }
        };
        for (n, l) in b.linears() {
            let w = match n.as_str() {
                "self_attn.q_proj" => perm(l, a.num_heads),
                "self_attn.k_proj" => perm(l, a.num_kv_heads),
                _ => l.weight_f32().expect("w"),
            };
            let gguf_name = match n.as_str() {
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                other => panic!("no GGUF name for {other}"),
            };
            tensors.push((format!("{p}.{gguf_name}.weight"), q(&w, dtype)));
        }
        tensors.push((
            format!("{p}.attn_norm.weight"),
            q(&b.input_layernorm.weight, GgmlDType::F32),
        ));
        tensors.push((
            format!("{p}.ffn_norm.weight"),
            q(&b.pre_mlp_norm.weight, GgmlDType::F32),
        ));
    }
    let a = arch.to_string();
    let md: Vec<(String, gguf_file::Value)> = vec![
        (
            "general.architecture".into(),
            gguf_file::Value::String(a.clone()),
        ),
        (
            format!("{a}.context_length"),
            gguf_file::Value::U32(cfg.max_position_embeddings as u32),
        ),
        (
            format!("{a}.embedding_length"),
            gguf_file::Value::U32(cfg.hidden_size as u32),
        ),
        (
            format!("{a}.block_count"),
            gguf_file::Value::U32(cfg.num_hidden_layers as u32),
        ),
        (
            format!("{a}.feed_forward_length"),
            gguf_file::Value::U32(cfg.intermediate_size as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            gguf_file::Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            gguf_file::Value::U32(cfg.num_key_value_heads as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{a}.rope.freq_base"),
            gguf_file::Value::F32(cfg.rope_theta as f32),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            gguf_file::Value::U32(2),
        ),
    ];
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).expect("create");
    gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
}

#[test]
fn k_quant_ggufs_decode_with_the_integer_kernels() {
    // A model whose widths are whole K-quant super-blocks (256), written as Q4_K, Q5_K and Q6_K
    // GGUFs: each loads, its projections get Attune's decode kernel, and decoding over the KV
    // cache (few rows: the quantized path) stays close to the f32 model, closer for more bits.
    let cfg = Config {
        hidden_size: 256,
        intermediate_size: 512,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        ..tiny_config("llama")
    };
    let m = Llama::new_random(&cfg, &Device::Cpu, 12).expect("model");
    let want = m.forward(&ids(&PROMPT), None).expect("want");
    let want_last = want
        .squeeze(0)
        .expect("s")
        .get(PROMPT.len() - 1)
        .expect("r");
    let scale = max_abs(&want_last);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut errors = Vec::new();
    for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        write_gguf(&m, &path, dtype, "llama");
        let g = gguf::load(&path, ComputeMode::Auto).expect("load");
        for (name, l) in g.model.linears() {
            assert!(
                l.has_decode_kernel(),
                "{dtype:?}: {name} has no decode kernel"
            );
        }
        let mut cache = g.model.new_cache();
        let (head, tail) = PROMPT.split_at(PROMPT.len() - 1);
        g.model
            .forward_last(&ids(head), &mut cache)
            .expect("prompt");
        let last = g
            .model
            .forward_last(&ids(tail), &mut cache)
            .expect("decode");
        let d = max_abs_diff(&last.squeeze(0).expect("s"), &want_last) / scale;
        errors.push(d);
    }
    assert!(
        errors[0] < 0.2 && errors[1] < 0.1 && errors[2] < 0.05,
        "{errors:?}"
    );
    assert!(
        errors[0] > errors[2],
        "Q4_K should err more than Q6_K: {errors:?}"
    );
}

#[test]
fn gguf_loader_unpermutes_qk_and_matches_the_source_model() {
    let m = Llama::new_random(&tiny_config("llama"), &Device::Cpu, 9).expect("model");
    let want = m.forward(&ids(&PROMPT), None).expect("want");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    write_gguf(&m, &path, GgmlDType::F32, "llama");
    let g = gguf::load(&path, ComputeMode::F32).expect("load");
    assert_eq!(g.config.num_key_value_heads, 2);
    assert!(g.config.tie_word_embeddings);
    let got = g.model.forward(&ids(&PROMPT), None).expect("got");
    assert!(max_abs_diff(&want, &got) < 1e-5, "un-permuted GGUF differs");
    // Quantized (Q8_0, 32-wide blocks) rows permute as whole rows too: close, not exact.
    write_gguf(&m, &path, GgmlDType::Q8_0, "llama");
    let g = gguf::load(&path, ComputeMode::Quantized).expect("load q8");
    let mut cache = g.model.new_cache();
    let last = g.model.forward_last(&ids(&PROMPT), &mut cache).expect("q8");
    let want_last = want
        .squeeze(0)
        .expect("s")
        .get(PROMPT.len() - 1)
        .expect("r");
    let d = max_abs_diff(&last.squeeze(0).expect("s"), &want_last);
    assert!(d < 0.05, "Q8_0 GGUF differs by {d}");
    // The forward permutation undoes the inverse one on quantized data.
    let w = q_proj(&m.layers()[0]).weight_f32().expect("w");
    let qt = QTensor::quantize(&w, GgmlDType::Q8_0).expect("q");
    let round = gguf::unpermute_rows(&gguf::permute_rows(&qt, 4).expect("p"), 4).expect("u");
    assert_eq!(
        qt.data().expect("d").as_ref(),
        round.data().expect("d").as_ref()
    );
}

#[test]
fn gguf_errors_name_the_file_and_problem() {
    let m = Llama::new_random(&tiny_config("llama"), &Device::Cpu, 2).expect("model");
    let dir = tempfile::tempdir().expect("tempdir");
    // Wrong architecture string.
    let path = dir.path().join("gpt2.gguf");
    write_gguf(&m, &path, GgmlDType::F32, "gpt2");
    match gguf::load(&path, ComputeMode::Auto) {
        Err(Error::UnsupportedArchitecture {
            path: p,
            architecture,
        }) => {
            assert_eq!(architecture, "gpt2");
            assert_eq!(p, path);
        }
        other => panic!("expected unsupported architecture, got {:?}", other.err()),
    }
    // Garbage.
    let garbage = dir.path().join("garbage.gguf");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&garbage, &bytes).expect("write");
    let e = gguf::load(&garbage, ComputeMode::Auto)
        .err()
        .expect("garbage fails");
    assert!(e.to_string().contains("garbage.gguf"), "{e}");
    // GGUF magic followed by garbage.
    let mut magic = b"GGUF".to_vec();
    magic.extend_from_slice(&[3, 0, 0, 0]);
    magic.extend(bytes.iter().take(200));
    std::fs::write(&garbage, &magic).expect("write");
    assert!(gguf::load(&garbage, ComputeMode::Auto).is_err());
    // Truncated copies of a valid file, cut in the header and in the tensor data.
    let good = dir.path().join("good.gguf");
    write_gguf(&m, &good, GgmlDType::F32, "llama");
    let full = std::fs::read(&good).expect("read");
    for cut in [10, 100, full.len() / 2, full.len() - 8] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &full[..cut]).expect("write");
        let e = gguf::load(&p, ComputeMode::Auto)
            .err()
            .expect("truncated fails");
        assert!(e.to_string().contains(&format!("cut{cut}.gguf")), "{e}");
    }
    // Missing file.
    let e = gguf::load(&dir.path().join("nope.gguf"), ComputeMode::Auto)
        .err()
        .expect("missing");
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

#[test]
fn real_model_truncated_copy_is_an_error() {
    let src = attune_models::default_model_path();
    assert!(
        src.is_file(),
        "default model missing at {}: run scripts/fetch-model.sh",
        src.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(&src).expect("read model");
    let p = dir.path().join("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).expect("write");
    let e = gguf::load(&p, ComputeMode::Auto)
        .err()
        .expect("truncated model fails");
    let msg = e.to_string();
    assert!(
        msg.contains("truncated.gguf") && msg.contains("tensor"),
        "{msg}"
    );
}

#[test]
fn llama3_rope_scaling_config_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = tiny_config("llama");
    cfg.rope_scaling = Some(RopeScaling::Llama3(
        attune_models::config::Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        },
    ));
    let m = Llama::new_random(&cfg, &Device::Cpu, 4).expect("model");
    attune_models::hf::save(&m, dir.path(), None).expect("save");
    let h = attune_models::hf::load(dir.path()).expect("load");
    assert_eq!(h.config.rope_scaling, cfg.rope_scaling);
    let a = m.forward(&ids(&PROMPT), None).expect("a");
    let plain = Llama::new_random(&tiny_config("llama"), &Device::Cpu, 4).expect("plain");
    let b = plain.forward(&ids(&PROMPT), None).expect("b");
    // Same weights, different rope: the logits move (position 0 is unaffected).
    assert!(
        max_abs_diff(
            &a.narrow(1, 0, 1).expect("n"),
            &b.narrow(1, 0, 1).expect("n")
        ) < 1e-6
    );
    assert!(max_abs_diff(&a, &b) > 1e-4);
    let _ = D::Minus1;
}

#[test]
fn q4_1_decode_kernel_matches_candle_and_f32() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (70, 128), &dev).expect("w");
    let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize"));
    let deq = q.dequantize(&dev).expect("deq");
    let plain = Linear::from_qtensor(q.clone(), None, ComputeMode::Quantized).expect("plain");
    let fast = Linear::from_qtensor(q, None, ComputeMode::Quantized)
        .expect("fast")
        .with_decode_kernel()
        .expect("kernel");
    for rows in [1usize, 3, 8] {
        let x = Tensor::randn(0f32, 1.0, (rows, 128), &dev).expect("x");
        let exact = x.matmul(&deq.t().expect("t")).expect("mm");
        let a = plain.forward(&x).expect("candle q4_1");
        let b = fast.forward(&x).expect("kernel q4_1");
        let scale = exact
            .abs()
            .expect("abs")
            .max_keepdim(1)
            .expect("m")
            .mean_all()
            .expect("mean");
        let scale = scale.to_scalar::<f32>().expect("s");
        let d_exact = max_abs_diff(&b, &exact);
        let d_candle = max_abs_diff(&b, &a);
        assert!(
            d_exact < 0.05 * scale,
            "rows {rows}: kernel vs f32 {d_exact} (scale {scale})"
        );
        assert!(
            d_candle < 0.02 * scale,
            "rows {rows}: kernel vs candle {d_candle}"
        );
    }
}

#[test]
fn q8_0_decode_kernel_matches_candle() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (70, 128), &dev).expect("w");
    let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize"));
    let plain = Linear::from_qtensor(q.clone(), None, ComputeMode::Quantized).expect("plain");
    let fast = Linear::from_qtensor(q, None, ComputeMode::Quantized)
        .expect("fast")
        .with_decode_kernel()
        .expect("kernel");
    for rows in [1usize, 5] {
        let x = Tensor::randn(0f32, 1.0, (rows, 128), &dev).expect("x");
        // candle stores the activation scale as f16, this kernel as f32: close, not equal.
        let a = plain.forward(&x).expect("a");
        let b = fast.forward(&x).expect("b");
        let scale = a
            .abs()
            .expect("abs")
            .mean_all()
            .expect("m")
            .to_scalar::<f32>()
            .expect("s");
        let d = max_abs_diff(&a, &b);
        assert!(
            d < 0.01 * scale,
            "rows {rows}: kernel vs candle Q8_0 {d} (scale {scale})"
        );
    }
}

/// q/k/v-style fusion: one pass over the stacked rows gives exactly what each layer gives alone,
/// bias and LoRA included, and it steps aside once a layer no longer has its kernel.
#[test]
fn fused_decode_equals_separate_layers() {
    let dev = Device::Cpu;
    let layer = |out: usize, bias: bool| {
        let w = Tensor::randn(0f32, 1.0, (out, 64), &dev).expect("w");
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize"));
        let b = bias.then(|| Tensor::randn(0f32, 1.0, out, &dev).expect("bias"));
        Linear::from_qtensor(q, b, ComputeMode::Auto)
            .expect("linear")
            .with_decode_kernel()
            .expect("kernel")
    };
    let (mut a, b, c) = (layer(48, false), layer(16, true), layer(16, false));
    let fused = FusedDecode::new(&[&a, &b, &c]).expect("all three have a Q4_1 kernel");
    let lora_a = Tensor::randn(0f32, 1.0, (4, 64), &dev).expect("A");
    let lora_b = Tensor::randn(0f32, 1.0, (48, 4), &dev).expect("B");
    a.attach_lora(lora_a, lora_b, 0.5).expect("lora");
    for rows in [1usize, 5] {
        let x = Tensor::randn(0f32, 1.0, (1, rows, 64), &dev).expect("x");
        let got = FusedDecode::forward(Some(&fused), &[&a, &b, &c], &x).expect("fused");
        for (g, l) in got.iter().zip([&a, &b, &c]) {
            let want = l.forward(&x).expect("alone");
            assert_eq!(g.dims(), want.dims());
            assert!(max_abs_diff(g, &want) < 1e-5, "rows {rows}");
        }
    }
    // New dense weights drop the layer's quantized kernel: the fused product must not be used.
    let w = Tensor::randn(0f32, 1.0, (48, 64), &dev).expect("w");
    a.set_weight(w).expect("set weight");
    let x = Tensor::randn(0f32, 1.0, (1, 1, 64), &dev).expect("x");
    let got = FusedDecode::forward(Some(&fused), &[&a, &b, &c], &x).expect("fallback");
    assert!(max_abs_diff(&got[0], &a.forward(&x).expect("alone")) < 1e-5);
}

#[test]
fn fused_layers_on_bf16_weights_match_f32_for_every_family() {
    // In Auto on a CPU with matrix units, the fused layer multiplies in bf16: a frozen base's
    // projections packed once (prompt tuning, LoRA), a trained weight packed anew each pass with
    // its gradient in bf16 too (full fine-tuning: f32 master weights). Fused q/k/v and gate/up
    // (Phi-3) are packed like separate ones. Against the same fused layers in f32: hidden states
    // and every gradient within bf16 rounding, for every family's switches.
    if !attune_models::kernels::amx::available() {
        eprintln!(
            "note: no AMX-BF16 here (or ATTUNE_MATMUL=f32): Auto stays f32, nothing to compare"
        );
        return;
    }
    let dev = Device::Cpu;
    let toks: Vec<u32> = (0..2 * 67).map(|i| (i * 7 + 3) % 64).collect();
    let toks = Tensor::from_vec(toks, (2, 67), &dev).expect("ids");
    for (family, kind) in FUSED_FAMILIES
        .iter()
        .flat_map(|f| ["prompt", "lora-all", "full"].map(move |c| (*f, c)))
    {
        let case = &format!("{family:?} {kind}");
        let (mut m, params, prefix, seq) = fused_case(family, kind);
        let probe = seeded_normal(1.0, &[2, seq, 32], 99);
        let (h32, g32) = layer_grads(
            &mut m,
            LayerFusion::All,
            prefix.as_ref(),
            &params,
            &toks,
            &probe,
        );
        // As `train::prepare` does: a frozen weight is packed, a trained one keeps its variable
        // (and multiplies in bf16 from it).
        m.set_compute_mode(ComputeMode::Auto).expect("mode");
        for (name, lin) in m.linears() {
            assert_eq!(
                lin.packed().is_some(),
                kind != "full",
                "{case}: {name} packed for the matrix units"
            );
            assert!(lin.bf16_compute(), "{case}: {name} multiplies in bf16");
        }
        let (h16, g16) = layer_grads(
            &mut m,
            LayerFusion::All,
            prefix.as_ref(),
            &params,
            &toks,
            &probe,
        );
        // Against f32: bf16 rounding over two layers (errors of a few percent on the tiny
        // model's gradients; a wrong weight, layout or switch gives errors near 1).
        let worst = |a: &[Tensor], b: &[Tensor]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| rel_norm_diff(x, y))
                .fold(0f32, f32::max)
        };
        let (dh, dg) = (rel_norm_diff(&h16, &h32), worst(&g16, &g32));
        eprintln!("{case}: bf16 vs f32: hidden {dh}, worst gradient {dg} (relative)");
        assert!(dh < 2e-2, "{case}: hidden states differ by {dh} (relative)");
        assert!(dg < 0.1, "{case}: a gradient differs by {dg} (relative)");
        if kind != "full" {
            // The same packed weights as separate ops: the fused layer's own arithmetic.
            let (hs, gs) = layer_grads(
                &mut m,
                LayerFusion::Off,
                prefix.as_ref(),
                &params,
                &toks,
                &probe,
            );
            let (dh, dg) = (rel_norm_diff(&h16, &hs), worst(&g16, &gs));
            assert!(
                dh < 1e-2 && dg < 1e-2,
                "{case}: in bf16, fused and separate ops differ by {dh} (hidden), {dg} (gradients)"
            );
        }
    }
}
