//! The model families against PyTorch: for Qwen3, Gemma 3, Phi-3 (Phi-4-mini's shape), Llama 3.x
//! rope scaling and SmolLM3, a small model built by transformers from a config with seeded random
//! weights, saved as safetensors and converted to GGUF as llama.cpp's converter writes it
//! (`tests/families/make_reference.py`), read back here from both files and compared with the
//! figures PyTorch, transformers and PEFT computed on it (`tests/families/<family>/reference.json`),
//! with `shared/reference/README.md`'s tolerances: the same token ids; each reference top-10 logit
//! within 2e-2 and no other token among the top 10 unless within 2e-2 of the 10th; mean NLL within
//! 1e-3. Also the chat template's rendering, greedy decoding over the KV cache, a PEFT LoRA adapter,
//! and the first two optimizer steps of each training method (loss and pre-clip gradient norm).

mod common;

use attune_models::chat_template::{ChatTemplate, Message};
use attune_models::config::{Family, RopeScaling};
use attune_models::linear::ComputeMode;
use attune_models::loader;
use attune_models::train::peft;
use common::families::*;

#[test]
fn gguf_and_safetensors_give_the_same_switches() {
    for f in FAMILIES {
        let g = load(f, true, ComputeMode::F32).config;
        let h = load(f, false, ComputeMode::F32).config;
        let r = reference(f);
        assert_eq!(
            g.architecture,
            r["gguf_architecture"].as_str().expect("arch"),
            "{f}"
        );
        assert_eq!(g.family(), h.family(), "{f}");
        for (name, a, b) in [
            ("qk_norm", g.qk_norm, h.qk_norm),
            ("norm_plus_one", g.norm_plus_one, h.norm_plus_one),
            ("sandwich_norms", g.sandwich_norms, h.sandwich_norms),
            ("scale_embeddings", g.scale_embeddings, h.scale_embeddings),
            (
                "tie_word_embeddings",
                g.tie_word_embeddings,
                h.tie_word_embeddings,
            ),
        ] {
            assert_eq!(a, b, "{f}: {name}");
        }
        assert_eq!(g.hidden_act, h.hidden_act, "{f}");
        assert_eq!(g.head_dim(), h.head_dim(), "{f}");
        assert_eq!(g.rotary_dim(), h.rotary_dim(), "{f}");
        assert_eq!(g.rope_theta, h.rope_theta, "{f}");
        assert_eq!(g.rope_local_theta, h.rope_local_theta, "{f}");
        assert_eq!(g.attention_scale(), h.attention_scale(), "{f}");
        for i in 0..g.num_hidden_layers {
            assert_eq!(
                g.layer_window(i),
                h.layer_window(i),
                "{f}: layer {i} window"
            );
            assert_eq!(
                g.layer_uses_rope(i),
                h.layer_uses_rope(i),
                "{f}: layer {i} rope"
            );
        }
        match f {
            "qwen3" => assert!(g.qk_norm && !g.sandwich_norms),
            "gemma3" => {
                assert!(g.sandwich_norms && g.norm_plus_one && g.scale_embeddings);
                let sliding: Vec<bool> = (0..6).map(|i| g.layer_window(i).is_some()).collect();
                assert_eq!(sliding, [true, true, true, true, true, false]);
            }
            "phi3" => {
                assert_eq!(
                    g.lora_targets(),
                    ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
                );
                assert_eq!(g.rotary_dim(), 12);
                // The GGUF holds the factors as f32.
                let (
                    Some(RopeScaling::LongRope {
                        short_factor: gs,
                        long_factor: gl,
                        original_max_position_embeddings: go,
                        attention_factor: ga,
                    }),
                    Some(RopeScaling::LongRope {
                        short_factor: hs,
                        long_factor: hl,
                        original_max_position_embeddings: ho,
                        attention_factor: ha,
                    }),
                ) = (&g.rope_scaling, &h.rope_scaling)
                else {
                    panic!(
                        "{f}: not longrope: {:?} / {:?}",
                        g.rope_scaling, h.rope_scaling
                    );
                };
                let close = |a: &[f64], b: &[f64]| {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
                };
                assert!(close(gs, hs) && close(gl, hl) && go == ho && (ga - ha).abs() < 1e-6);
            }
            // GGUF stores llama3 scaling as per-frequency factors; the reader recovers the
            // parameters the folder states.
            "llama3" => {
                assert!(matches!(h.rope_scaling, Some(RopeScaling::Llama3(_))));
                assert_eq!(g.rope_scaling, h.rope_scaling, "{f}: llama3 scaling");
            }
            "smollm3" => {
                let rope: Vec<bool> = (0..4).map(|i| g.layer_uses_rope(i)).collect();
                assert_eq!(rope, [true, true, true, false]);
            }
            _ => unreachable!(),
        }
        assert_eq!(
            g.family(),
            Family::from_architecture(g.architecture.as_str())
        );
    }
}

/// Registration's check (`loader::check`) takes every family from its GGUF and its folder, and
/// still refuses their unsupported neighbours by name: Gemma 2 and Phi-2 (the same files with the
/// architecture renamed: the GGUF's keys, config.json's `model_type`).
#[test]
fn registration_takes_every_family_and_refuses_their_neighbours() {
    for f in FAMILIES {
        for p in [dir(f).join("model.gguf"), dir(f).join("hf")] {
            loader::check(&p).unwrap_or_else(|e| panic!("{f} ({}): {e}", p.display()));
        }
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    for (f, other, model_type, other_type) in [
        ("gemma3", "gemma2", "gemma3_text", "gemma2"),
        ("phi3", "phi2", "phi3", "phi"),
    ] {
        // GGUF: `general.architecture` and every `<arch>.` key renamed (same length, so the
        // header stays well formed).
        let bytes = std::fs::read(dir(f).join("model.gguf")).expect("read gguf");
        let (from, to) = (f.as_bytes(), other.as_bytes());
        let mut renamed = bytes.clone();
        let mut n = 0;
        for i in 0..bytes.len().saturating_sub(from.len()) {
            if &bytes[i..i + from.len()] == from {
                renamed[i..i + to.len()].copy_from_slice(to);
                n += 1;
            }
        }
        assert!(n >= 2, "{f}: {n} occurrences of the architecture");
        let p = tmp.path().join(format!("{other}.gguf"));
        std::fs::write(&p, renamed).expect("write gguf");
        let msg = loader::check(&p).expect_err(other).to_string();
        assert!(
            msg.contains(&format!("unsupported architecture '{other}'")),
            "{msg}"
        );
        // Folder: config.json's model_type.
        let d = tmp.path().join(other);
        std::fs::create_dir(&d).expect("mkdir");
        for e in std::fs::read_dir(dir(f).join("hf")).expect("read hf") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), d.join(e.file_name())).expect("copy");
        }
        let cfg = d.join("config.json");
        let text = std::fs::read_to_string(&cfg).expect("config");
        let t = text.replace(
            &format!("\"model_type\": \"{model_type}\""),
            &format!("\"model_type\": \"{other_type}\""),
        );
        assert_ne!(t, text, "{f}: model_type in {text}");
        std::fs::write(&cfg, t).expect("write config");
        let msg = loader::check(&d).expect_err(other_type).to_string();
        assert!(
            msg.contains(&format!("unsupported architecture '{other_type}'")),
            "{msg}"
        );
    }
}

#[test]
fn logits_match_pytorch_from_gguf_and_safetensors() {
    for f in FAMILIES {
        let r = reference(f);
        // Exact paths within f32 rounding; `Auto` multiplies prompts in bf16 on the matrix units
        // where the CPU has them (bf16 weights times bf16-rounded activations, f32 sums), so it
        // is held to bf16's tolerance there (the decode path's, below).
        let bf16 = attune_models::kernels::amx::available();
        let (auto_nll, auto_logit) = if bf16 { (2e-2, 0.1) } else { (1e-3, 2e-2) };
        for (source, gguf, mode, nll_tol, logit_tol) in [
            ("gguf f32", true, ComputeMode::F32, 1e-3, 2e-2),
            ("gguf auto-f32", true, ComputeMode::AutoF32, 1e-3, 2e-2),
            ("gguf auto", true, ComputeMode::Auto, auto_nll, auto_logit),
            ("safetensors", false, ComputeMode::F32, 1e-3, 2e-2),
        ] {
            let m = load(f, gguf, mode);
            check_prompts_within(
                &m.model,
                &m.tokenizer,
                &r["prompts"],
                nll_tol,
                logit_tol,
                &format!("{f} {source}"),
            );
        }
    }
}

/// Every family on a compact base (`Llama::set_base_form`): the GGUF's blocks (bf16 where a
/// block type has no kernel) and bf16 values, and a Hugging Face folder in bf16: PyTorch's
/// logits within bf16's tolerance, and a LoRA step's loss beside the f32 model's.
#[test]
fn families_on_a_compact_base_match_pytorch_and_train() {
    use attune_models::linear::BaseForm;
    use attune_models::train::{self, Example, LoraConfig, Method};
    for f in FAMILIES {
        let r = reference(f);
        let exact = load(f, true, ComputeMode::F32);
        let ids = ids_of(&r["generate"]["prompt_ids"]);
        let ex = vec![Example {
            targets: vec![true; ids.len()],
            full_len: ids.len(),
            truncated: false,
            ids,
        }];
        let lora = Method::Lora(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: exact
                .model
                .lora_targets()
                .iter()
                .map(|t| t.to_string())
                .collect(),
            rslora: false,
        });
        let first_loss = |m: &loader::LoadedModel| {
            let mut model = m.model.clone();
            let tr = train::prepare(&mut model, &m.tokenizer, &lora, 1).expect("prepare");
            let refs: Vec<&Example> = ex.iter().collect();
            let batch = train::collate(&refs, 0, 0, model.device()).expect("collate");
            let _ = tr;
            train::nll_sum(&model, &batch, None)
                .and_then(|t| Ok(t.to_scalar::<f32>()?))
                .expect("loss") as f64
        };
        let want = first_loss(&exact);
        for (source, gguf, form) in [
            ("gguf quantized", true, BaseForm::Quantized),
            ("gguf bf16", true, BaseForm::Bf16),
            ("safetensors bf16", false, BaseForm::Quantized),
        ] {
            let what = format!("{f} {source}");
            let mut m = load(
                f,
                gguf,
                if gguf {
                    ComputeMode::Quantized
                } else {
                    ComputeMode::F32
                },
            );
            m.model.set_base_form(form).expect("base form");
            check_prompts_within(&m.model, &m.tokenizer, &r["prompts"], 2e-2, 0.1, &what);
            let got = first_loss(&m);
            eprintln!("{what}: LoRA step-1 loss {got:.5}, f32 {want:.5}");
            assert!(
                (got - want).abs() <= 2e-2 * want.abs().max(1.0),
                "{what}: LoRA's first loss {got} against f32's {want}"
            );
        }
    }
}

#[test]
fn chat_templates_render_as_transformers_does() {
    for f in FAMILIES {
        let r = reference(f);
        let msgs: Vec<Message> = r["chat"]["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                Message::new(
                    m["role"].as_str().expect("role"),
                    m["content"].as_str().expect("c"),
                )
            })
            .collect();
        let mut with_answer = msgs.clone();
        with_answer.push(Message::new(
            "assistant",
            "Air scatters blue light more than red.",
        ));
        for gguf in [true, false] {
            let m = load(f, gguf, ComputeMode::F32);
            let what = format!("{f} (gguf: {gguf})");
            let text = m.chat_template.render(&msgs, true).expect("render");
            assert_eq!(
                text,
                r["chat"]["rendered"].as_str().expect("rendered"),
                "{what}"
            );
            let full = m.chat_template.render(&with_answer, false).expect("render");
            assert_eq!(
                full,
                r["chat"]["rendered_with_answer"]
                    .as_str()
                    .expect("rendered"),
                "{what}: with the answer"
            );
            assert_eq!(
                m.tokenizer.encode(&text, false).expect("encode"),
                ids_of(&r["chat"]["token_ids"]),
                "{what}: chat token ids"
            );
        }
        // The template file as committed (the family's own) is what the GGUF carries.
        let hf = ChatTemplate::from_hf_dir(&dir(f).join("hf")).expect("template");
        assert!(!hf.source().is_empty());
    }
}

#[test]
fn greedy_decoding_over_the_kv_cache_matches_pytorch() {
    for f in FAMILIES {
        // The exact path from both files, and the quantized decode path (Auto: the GGUF's bf16
        // weights times bf16-rounded activations, as llama.cpp multiplies them) within 0.1.
        for (source, gguf, mode, tol) in [
            ("gguf", true, ComputeMode::F32, 2e-2),
            ("safetensors", false, ComputeMode::F32, 2e-2),
            ("gguf auto", true, ComputeMode::Auto, 0.1),
        ] {
            let m = load(f, gguf, mode);
            check_greedy(f, &m, tol, &format!("{f} {source}"));
        }
    }
}

#[test]
fn peft_lora_adapter_gives_peft_logits() {
    for f in FAMILIES {
        let r = reference(f);
        let adapter = peft::load(&dir(f).join("lora")).expect("adapter");
        let peft::Adapter::Lora {
            config, tensors, ..
        } = adapter
        else {
            panic!("{f}: not a LoRA adapter");
        };
        for gguf in [true, false] {
            let mut m = load(f, gguf, ComputeMode::F32);
            let n = peft::apply_lora(&mut m.model, &config, &tensors).expect("apply");
            assert_eq!(
                n,
                m.model.linears().len(),
                "{f}: every projection has a branch"
            );
            check_prompts(
                &m.model,
                &m.tokenizer,
                &r["lora"]["prompts"],
                &format!("{f} lora (gguf: {gguf})"),
            );
        }
    }
}

#[test]
fn first_training_steps_match_pytorch_for_every_method() {
    for f in FAMILIES {
        check_first_steps(f, false);
    }
}

#[test]
fn exported_folder_reads_back_with_the_same_logits() {
    for f in FAMILIES {
        let m = load(f, true, ComputeMode::F32);
        let out = tempfile::tempdir().expect("tempdir");
        attune_models::hf::save(&m.model, out.path(), None).expect("save");
        let back = attune_models::hf::load(out.path()).expect("load");
        let ids: Vec<u32> = (1..40).map(|i| (i * 37) % 1000).collect();
        let (a, la) = nll_and_last(&m.model, &ids);
        let (b, lb) = nll_and_last(&back.model, &ids);
        assert!((a - b).abs() < 1e-5, "{f}: {a} vs {b}");
        let d = la
            .iter()
            .zip(&lb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "{f}: exported model's logits differ by {d}");
    }
}
