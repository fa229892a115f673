//! The families at their real dimensions, with random weights, for the benches
//! (`ATTUNE_BENCH_ARCH`): random weights run at the same speed as trained ones, so a bench can
//! measure a 1B model's decode, prompt processing and training without downloading it.
//! Dimensions from each model's published `config.json`.
#![allow(dead_code)] // each bench uses its own subset

use std::sync::Arc;

use attune_models::config::{Config, Family, Llama3RopeScaling, RopeScaling};
use attune_models::linear::{ComputeMode, Linear};
use attune_models::llama::{
    embedding_scale, final_norm, Block, BlockNorms, BlockProjections, Embedding, GateUpProj, Llama,
    LlamaWeights, QkvProj,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// The presets `ATTUNE_BENCH_ARCH` takes.
pub const PRESETS: &[&str] = &[
    "smollm2-135m",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "gemma3-270m",
    "gemma3-1b",
    "llama3.2-1b",
    "llama3.2-3b",
    "phi4-mini",
    "smollm3-3b",
];

#[allow(clippy::too_many_arguments)]
fn shape(
    family: Family,
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
) -> Config {
    let mut c = Config {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: Some(head_dim),
        rms_norm_eps: 1e-6,
        max_position_embeddings: 32768,
        tie_word_embeddings: true,
        ..Config::default()
    };
    c.apply_family_defaults(family);
    c
}

/// The config of preset `name`.
pub fn preset(name: &str) -> R<Config> {
    let c = match name {
        "smollm2-135m" => {
            let mut c = shape(Family::Llama, 49152, 576, 1536, 30, 9, 3, 64);
            c.rope_theta = 100_000.0;
            c
        }
        "qwen3-0.6b" => {
            let mut c = shape(Family::Qwen3, 151_936, 1024, 3072, 28, 16, 8, 128);
            c.rope_theta = 1_000_000.0;
            c
        }
        "qwen3-1.7b" => {
            let mut c = shape(Family::Qwen3, 151_936, 2048, 6144, 28, 16, 8, 128);
            c.rope_theta = 1_000_000.0;
            c
        }
        "gemma3-270m" | "gemma3-1b" => {
            let mut c = if name == "gemma3-270m" {
                shape(Family::Gemma3, 262_144, 640, 2048, 18, 4, 1, 256)
            } else {
                shape(Family::Gemma3, 262_144, 1152, 6912, 26, 4, 1, 256)
            };
            c.rope_theta = 1_000_000.0;
            c.rope_local_theta = Some(10_000.0);
            c.query_pre_attn_scalar = Some(256.0);
            c.sliding_window = Some(512);
            c.sliding_layers = (0..c.num_hidden_layers).map(|i| (i + 1) % 6 != 0).collect();
            c
        }
        "llama3.2-1b" => {
            let mut c = shape(Family::Llama, 128_256, 2048, 8192, 16, 32, 8, 64);
            c.rope_theta = 500_000.0;
            c.rope_scaling = Some(RopeScaling::Llama3(Llama3RopeScaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }));
            c
        }
        "llama3.2-3b" => {
            let mut c = shape(Family::Llama, 128_256, 3072, 8192, 28, 24, 8, 128);
            c.rope_theta = 500_000.0;
            c.rope_scaling = Some(RopeScaling::Llama3(Llama3RopeScaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }));
            c
        }
        "phi4-mini" => {
            let mut c = shape(Family::Phi3, 200_064, 3072, 8192, 32, 24, 8, 128);
            c.rope_theta = 10_000.0;
            c.rotary_dim = Some(96);
            c.rope_scaling = Some(RopeScaling::LongRope {
                short_factor: vec![1.0; 48],
                long_factor: vec![1.0; 48],
                original_max_position_embeddings: 4096,
                attention_factor: 1.19,
            });
            c
        }
        "smollm3-3b" => {
            let mut c = shape(Family::Smollm3, 128_256, 2048, 11008, 36, 16, 4, 128);
            c.rope_theta = 5_000_000.0;
            c.rope_layers = (0..36).map(|i| (i + 1) % 4 != 0).collect();
            c
        }
        other => {
            return Err(format!(
                "unknown ATTUNE_BENCH_ARCH '{other}' (one of {})",
                PRESETS.join(", ")
            )
            .into())
        }
    };
    c.validate(std::path::Path::new(name))?;
    Ok(c)
}

/// Normal(0, 0.02) values.
fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random::<f32>();
            0.02 * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

/// A random `[out, in]` projection in `dtype` (`None`: f32) for `mode`.
fn projection(
    rng: &mut StdRng,
    out: usize,
    inp: usize,
    dtype: Option<GgmlDType>,
    mode: ComputeMode,
    fallbacks: &mut usize,
) -> R<Linear> {
    let w = Tensor::from_vec(random(rng, out * inp), (out, inp), &Device::Cpu)?;
    quantized_linear(w, dtype, mode, fallbacks)
}

/// `w` `[out, in]` as a projection in `dtype` (`None`: f32) for `mode`, quantized by candle's
/// quantizer. Widths that are not whole blocks of `dtype` fall back to Q8_0, as llama.cpp's
/// quantizer falls back; `fallbacks` counts them.
pub fn quantized_linear(
    w: Tensor,
    dtype: Option<GgmlDType>,
    mode: ComputeMode,
    fallbacks: &mut usize,
) -> R<Linear> {
    let dev = Device::Cpu;
    let inp = w.dim(1)?;
    let Some(dt) = dtype else {
        return Ok(Linear::from_weights(w, None)?);
    };
    let dt = if inp % dt.block_size() == 0 {
        dt
    } else {
        *fallbacks += 1;
        GgmlDType::Q8_0
    };
    let q = QTensor::quantize(&w, dt)?;
    let dense = match mode {
        ComputeMode::Quantized => None,
        ComputeMode::Auto | ComputeMode::AutoF32 => {
            Some(q.dequantize(&dev)?.t()?.contiguous()?.t()?)
        }
        ComputeMode::F32 => Some(q.dequantize(&dev)?),
    };
    let mut lin = Linear::from_parts(dense, Some(Arc::new(q)), None, mode)?.with_decode_kernel()?;
    // As the GGUF loader: `Auto` keeps the bf16 copy for the matrix units where the CPU has them.
    lin.pack_bf16(true)?;
    Ok(lin)
}

/// A random model of `cfg`, built layer by layer so the f32 values of one projection at a time
/// exist besides the kept form: projections in `dtype` (`None`: f32), the embedding in f32 unless
/// `mode` is `Quantized` (then Q8_0, tied head included). Returns the model and how many
/// projections fell back to Q8_0.
pub fn random_model(
    cfg: &Config,
    dtype: Option<GgmlDType>,
    mode: ComputeMode,
    seed: u64,
) -> R<(Llama, usize)> {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fallbacks = 0;
    let (h, hd) = (cfg.hidden_size, cfg.head_dim());
    let (nq, nkv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let inter = cfg.intermediate_size;
    let fused = cfg.family().is_some_and(|f| f.fused_projections());
    let unit = |n: usize| -> R<Tensor> {
        Ok(if cfg.norm_plus_one {
            Tensor::zeros(n, DType::F32, &dev)?
        } else {
            Tensor::ones(n, DType::F32, &dev)?
        })
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let mut p =
            |out: usize, inp: usize| projection(&mut rng, out, inp, dtype, mode, &mut fallbacks);
        let qkv = if fused {
            QkvProj::Fused {
                qkv_proj: p(nq + 2 * nkv, h)?,
            }
        } else {
            QkvProj::Split {
                q_proj: p(nq, h)?,
                k_proj: p(nkv, h)?,
                v_proj: p(nkv, h)?,
            }
        };
        let o_proj = p(h, nq)?;
        let gate_up = if fused {
            GateUpProj::Fused {
                gate_up_proj: p(2 * inter, h)?,
            }
        } else {
            GateUpProj::Split {
                gate_proj: p(inter, h)?,
                up_proj: p(inter, h)?,
            }
        };
        let down_proj = p(h, inter)?;
        let opt = |on: bool, n: usize| -> R<Option<Tensor>> {
            Ok(if on { Some(unit(n)?) } else { None })
        };
        let norms = BlockNorms {
            input: unit(h)?,
            pre_mlp: unit(h)?,
            q: opt(cfg.qk_norm, hd)?,
            k: opt(cfg.qk_norm, hd)?,
            post_attention: opt(cfg.sandwich_norms, h)?,
            post_mlp: opt(cfg.sandwich_norms, h)?,
        };
        layers.push(Block::new(
            cfg,
            i,
            norms,
            BlockProjections {
                qkv,
                o_proj,
                gate_up,
                down_proj,
            },
        )?);
    }
    let embed = Tensor::from_vec(
        random(&mut rng, cfg.vocab_size * h),
        (cfg.vocab_size, h),
        &dev,
    )?;
    let (embed_tokens, lm_head) = if mode == ComputeMode::Quantized {
        let q = Arc::new(QTensor::quantize(&embed, GgmlDType::Q8_0)?);
        drop(embed);
        let e = Embedding {
            weight: None,
            qweight: Some(q.clone()),
            vocab_size: cfg.vocab_size,
            hidden_size: h,
            scale: embedding_scale(cfg),
        };
        let head = Linear::from_parts(None, Some(q), None, mode)?.with_decode_kernel()?;
        (e, head)
    } else {
        let head = Linear::from_weights(embed.clone(), None)?;
        (
            Embedding::from_weight(embed)?.scaled(embedding_scale(cfg)),
            head,
        )
    };
    let weights = LlamaWeights {
        embed_tokens,
        layers,
        norm: final_norm(cfg, unit(h)?)?,
        lm_head,
    };
    Ok((Llama::from_parts(cfg.clone(), dev, weights)?, fallbacks))
}

/// `ATTUNE_BENCH_QUANT`'s type names.
pub fn dtype(name: &str) -> R<GgmlDType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        other => {
            return Err(format!(
                "unknown ATTUNE_BENCH_QUANT '{other}' (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, f16, bf16)"
            )
            .into())
        }
    })
}

/// Bytes the projections' quantized weights take (what a decode step reads).
pub fn quantized_bytes(model: &Llama) -> u64 {
    model
        .linears()
        .iter()
        .chain(std::iter::once(&("lm_head".to_string(), model.lm_head())))
        .filter_map(|(_, l)| l.qweight())
        .map(|q| q.storage_size_in_bytes() as u64)
        .sum()
}

/// `model` with every projection (and an untied head) requantized to `dtype` from its f32
/// values, for `mode`; returns it and how many projections fell back to Q8_0.
pub fn requantized(model: &Llama, dtype: GgmlDType, mode: ComputeMode) -> R<(Llama, usize)> {
    let mut fallbacks = 0;
    let mut layers = model.layers().to_vec();
    for b in layers.iter_mut() {
        for (_, lin) in b.linears_mut() {
            let w = lin.weight_f32()?;
            *lin = quantized_linear(w, Some(dtype), mode, &mut fallbacks)?;
        }
    }
    let lm_head = quantized_linear(
        model.lm_head().weight_f32()?,
        Some(dtype),
        mode,
        &mut fallbacks,
    )?;
    let weights = LlamaWeights {
        embed_tokens: model.embed_tokens().clone(),
        layers,
        norm: model.norm().clone(),
        lm_head,
    };
    Ok((
        Llama::from_parts(model.config().clone(), Device::Cpu, weights)?,
        fallbacks,
    ))
}
