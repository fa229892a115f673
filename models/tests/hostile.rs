//! Hostile inputs to the model runtime, as a new user might hand them over: damaged headers,
//! sizes that overflow, files that are not files, templates that never end, adapters that would
//! poison every answer. Each one is a clear error naming the file and the problem; none panics
//! or hangs.

mod common;

use std::path::Path;

use attune_models::gguf_header::write::{file as gguf_file, Tensor as GgufTensor};
use attune_models::llama::Llama;
use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};

fn tiny_config() -> attune_models::config::Config {
    attune_models::config::Config {
        architecture: "llama".to_string(),
        // The default model's tokenizer is used with it.
        vocab_size: 49152,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        head_dim: None,
        rope_scaling: None,
        ..Default::default()
    }
}

/// A Hugging Face folder of a tiny random model, with the default model's tokenizer.
fn tiny_hf_folder(dir: &Path) {
    let m = Llama::new_random(&tiny_config(), &Device::Cpu, 7).expect("model");
    attune_models::hf::save(&m, dir, None).expect("save");
    let content = attune_models::gguf::read_content(&common::model_path()).expect("header");
    let tok = attune_models::tokenizer::Tok::from_gguf(&content, &common::model_path())
        .expect("tokenizer");
    tok.inner()
        .save(dir.join("tokenizer.json"), false)
        .expect("save tokenizer");
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    std::fs::write(path, bytes).expect("write");
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `f` on a thread and fails the test if it takes longer than 10 s (a hang).
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("hung: no answer within 10 s")
}

#[test]
fn gguf_alignment_zero_and_overflowing_dimensions_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let arch = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.context_length", Value::U32(128)),
    ];
    let w = |dims: Vec<u64>| GgufTensor {
        name: "token_embd.weight",
        dims,
        ggml_type: 0,
        offset: 0,
    };
    let mut meta = arch.to_vec();
    meta.push(("general.alignment", Value::U32(0)));
    let p = dir.path().join("align0.gguf");
    write(&p, gguf_file(&meta, &[w(vec![4, 4])], &[0u8; 64]));
    for e in [
        attune_models::inspect::inspect(&p).expect_err("inspect"),
        attune_models::loader::load(&p, &Default::default())
            .err()
            .expect("load"),
        attune_models::loader::check(&p).expect_err("check"),
    ] {
        let msg = e.to_string();
        assert!(
            msg.contains("general.alignment") && msg.contains("align0.gguf"),
            "{msg}"
        );
    }

    let p = dir.path().join("huge.gguf");
    write(
        &p,
        gguf_file(&arch, &[w(vec![1 << 40, 1 << 40, 1 << 40])], &[0u8; 64]),
    );
    let msg = attune_models::inspect::inspect(&p)
        .expect_err("overflow")
        .to_string();
    assert!(
        msg.contains("multiply past") && msg.contains("huge.gguf"),
        "{msg}"
    );
    let msg = attune_models::loader::load(&p, &Default::default())
        .err()
        .expect("overflow")
        .to_string();
    assert!(msg.contains("multiply past"), "{msg}");
}

/// A one-tensor safetensors file with the given header entry for tensor "w".
fn safetensors_with(entry: &str, data: usize) -> Vec<u8> {
    let header = format!("{{\"w\":{entry}}}");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data));
    out
}

#[test]
fn safetensors_headers_that_overflow_are_refused_before_candle_reads_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_hf_folder(dir.path());
    let weights = dir.path().join("model.safetensors");
    for (entry, data, expect) in [
        (
            r#"{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}"#,
            16,
            "multiplies past",
        ),
        (
            r#"{"dtype":"F64","shape":[2305843009213693952,4],"data_offsets":[0,16]}"#,
            16,
            "too large",
        ),
        (
            r#"{"dtype":"F32","shape":[4],"data_offsets":[0,18446744073709551615]}"#,
            16,
            "do not hold",
        ),
        (
            r#"{"dtype":"F32","shape":[2],"data_offsets":[8,16]}"#,
            16,
            "gap or overlap",
        ),
        (
            r#"{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}"#,
            8,
            "unknown dtype",
        ),
    ] {
        write(&weights, safetensors_with(entry, data));
        for e in [
            attune_models::inspect::inspect(dir.path()).expect_err("inspect"),
            attune_models::loader::load(dir.path(), &Default::default())
                .err()
                .expect("load"),
        ] {
            let msg = e.to_string();
            assert!(
                msg.contains(expect) && msg.contains("model.safetensors"),
                "{entry}: {msg}"
            );
        }
    }
}

#[cfg(unix)]
#[test]
fn fifos_as_model_or_tokenizer_are_refused_not_waited_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("model.gguf");
    mkfifo(&fifo);
    let f = fifo.clone();
    let msg = within_10s(move || {
        attune_models::inspect::inspect(&f)
            .expect_err("fifo")
            .to_string()
    });
    assert!(msg.contains("named pipe (FIFO)"), "{msg}");
    let f = fifo.clone();
    let msg = within_10s(move || {
        attune_models::loader::load(&f, &Default::default())
            .err()
            .expect("fifo")
            .to_string()
    });
    assert!(msg.contains("named pipe (FIFO)"), "{msg}");

    // A model folder whose tokenizer.json or weights are FIFOs.
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).expect("mkdir");
    tiny_hf_folder(&hf);
    std::fs::remove_file(hf.join("tokenizer.json")).expect("rm");
    mkfifo(&hf.join("tokenizer.json"));
    let h = hf.clone();
    let msg = within_10s(move || {
        attune_models::loader::check(&h)
            .expect_err("fifo")
            .to_string()
    });
    assert!(
        msg.contains("named pipe (FIFO)") && msg.contains("tokenizer.json"),
        "{msg}"
    );
    std::fs::remove_file(hf.join("model.safetensors")).expect("rm");
    mkfifo(&hf.join("model.safetensors"));
    let h = hf.clone();
    let msg = within_10s(move || {
        attune_models::inspect::inspect(&h)
            .expect_err("fifo")
            .to_string()
    });
    assert!(
        msg.contains("no .safetensors") || msg.contains("FIFO"),
        "{msg}"
    );
}

#[test]
fn registration_check_refuses_what_would_fail_at_first_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hf = dir.path();
    tiny_hf_folder(hf);
    attune_models::loader::check(hf).expect("a complete folder passes");

    // An endless template: the fuel limit ends it with an error, quickly.
    let endless =
        "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
    write(&hf.join("chat_template.jinja"), endless);
    let h = hf.to_path_buf();
    let started = std::time::Instant::now();
    let msg = within_10s(move || {
        attune_models::loader::check(&h)
            .expect_err("loop")
            .to_string()
    });
    assert!(
        msg.contains("budget") && msg.contains("chat template"),
        "{msg}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // A template that does not compile.
    write(&hf.join("chat_template.jinja"), "{% for m in messages %}");
    let msg = attune_models::loader::check(hf)
        .expect_err("syntax")
        .to_string();
    assert!(msg.contains("does not compile"), "{msg}");
    std::fs::remove_file(hf.join("chat_template.jinja")).expect("rm");

    // No tokenizer.
    std::fs::rename(hf.join("tokenizer.json"), hf.join("tok.bak")).expect("mv");
    let msg = attune_models::loader::check(hf)
        .expect_err("no tokenizer")
        .to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
    std::fs::rename(hf.join("tok.bak"), hf.join("tokenizer.json")).expect("mv");

    // An architecture the runtime does not implement.
    let cfg = hf.join("config.json");
    let text = std::fs::read_to_string(&cfg).expect("read");
    write(&cfg, text.replace("\"llama\"", "\"gpt2\""));
    let msg = attune_models::loader::check(hf)
        .expect_err("gpt2")
        .to_string();
    assert!(msg.contains("unsupported architecture 'gpt2'"), "{msg}");

    // The same for a GGUF: a gpt2 header is refused by name.
    let p = dir.path().join("gpt2.gguf");
    write(
        &p,
        gguf_file(
            &[
                ("general.architecture", Value::String("gpt2".into())),
                ("gpt2.context_length", Value::U32(128)),
            ],
            &[GgufTensor {
                name: "token_embd.weight",
                dims: vec![4, 4],
                ggml_type: 0,
                offset: 0,
            }],
            &[0u8; 64],
        ),
    );
    attune_models::inspect::inspect(&p).expect("inspect only reads the header");
    let msg = attune_models::loader::check(&p)
        .expect_err("gpt2")
        .to_string();
    assert!(msg.contains("unsupported architecture 'gpt2'"), "{msg}");
}

#[test]
fn endless_templates_run_out_of_fuel() {
    use attune_models::chat_template::{ChatTemplate, Message};
    for source in [
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
        "{% set ns = namespace(x=[]) %}{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    ] {
        let t = ChatTemplate::new(source, None, None).expect("compiles");
        let started = std::time::Instant::now();
        let err = t
            .render(&[Message::new("user", "hi")], true)
            .expect_err("runs out of fuel");
        assert!(err.to_string().contains("budget"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    // A real template over a long conversation stays well inside the budget.
    let content = attune_models::gguf::read_content(&common::model_path()).expect("header");
    let t = ChatTemplate::from_gguf(&content, &common::model_path()).expect("template");
    let long: Vec<Message> = (0..400)
        .map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, "some words"))
        .collect();
    t.render(&long, true).expect("a 400-turn chat renders");
}

/// Writes a PEFT LoRA adapter for the tiny model with the given tensors.
fn write_lora(dir: &Path, tensors: &[(&str, Tensor)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    write(
        &dir.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],"bias":"none"}"#,
    );
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).expect("save");
}

#[test]
fn adapters_with_nan_weights_no_tensors_or_the_wrong_shape_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key =
        |ab: &str| format!("base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight");
    let (ka, kb) = (key("A"), key("B"));
    let dev = Device::Cpu;
    let a = Tensor::ones((2, 32), candle_core::DType::F32, &dev).expect("a");
    let b = Tensor::zeros((32, 2), candle_core::DType::F32, &dev).expect("b");

    let good = dir.path().join("good");
    write_lora(&good, &[(&ka, a.clone()), (&kb, b.clone())]);
    let adapter = attune_models::train::peft::load(&good).expect("a good adapter loads");
    let mut m = Llama::new_random(&tiny_config(), &dev, 3).expect("model");
    if let attune_models::train::peft::Adapter::Lora {
        config, tensors, ..
    } = &adapter
    {
        attune_models::train::peft::apply_lora(&mut m, config, tensors).expect("fits the base");
    }

    let nan = dir.path().join("nan");
    let mut bad = vec![0f32; 64];
    bad[17] = f32::NAN;
    let bad = Tensor::from_vec(bad, (32, 2), &dev).expect("nan");
    write_lora(&nan, &[(&ka, a.clone()), (&kb, bad)]);
    let msg = attune_models::train::peft::load(&nan)
        .expect_err("NaN")
        .to_string();
    assert!(
        msg.contains("non-finite") && msg.contains("lora_B"),
        "{msg}"
    );

    let empty = dir.path().join("empty");
    write_lora(&empty, &[]);
    let msg = attune_models::train::peft::load(&empty)
        .expect_err("no tensors")
        .to_string();
    assert!(msg.contains("holds no tensors"), "{msg}");

    // Rank 3 where the config says r = 2.
    let wrong_rank = dir.path().join("rank");
    let a3 = Tensor::ones((3, 32), candle_core::DType::F32, &dev).expect("a3");
    write_lora(&wrong_rank, &[(&ka, a3), (&kb, b.clone())]);
    let msg = attune_models::train::peft::load(&wrong_rank)
        .expect_err("rank")
        .to_string();
    assert!(msg.contains("rank r = 2"), "{msg}");

    // Shaped for another base: in_features 48 against the tiny model's 32.
    let other = dir.path().join("other");
    let a48 = Tensor::ones((2, 48), candle_core::DType::F32, &dev).expect("a48");
    write_lora(&other, &[(&ka, a48), (&kb, b)]);
    let adapter = attune_models::train::peft::load(&other).expect("reads");
    if let attune_models::train::peft::Adapter::Lora {
        config, tensors, ..
    } = &adapter
    {
        let msg = attune_models::train::peft::apply_lora(&mut m, config, tensors)
            .expect_err("wrong base")
            .to_string();
        assert!(msg.contains("do not fit"), "{msg}");
    }

    // A folder path that is a file.
    let f = dir.path().join("file");
    write(&f, "x");
    let msg = attune_models::train::peft::load(&f)
        .expect_err("not a folder")
        .to_string();
    assert!(msg.contains("not a folder"), "{msg}");
}
