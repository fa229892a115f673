//! Hostile input through the real `attune` binary, as a new user might give it: sizes near
//! `usize::MAX` on the flags, named pipes where files belong, models the runtime cannot use,
//! adapters that would poison every answer, and several processes writing one library at once.
//! Each is a one-line error (or the right result) within seconds; none panics or hangs.

use attune_test_support::Cli;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

struct Env(Cli);

impl std::ops::Deref for Env {
    type Target = Cli;
    fn deref(&self) -> &Cli {
        &self.0
    }
}

impl Env {
    fn new() -> Env {
        Env(Cli::new(env!("CARGO_BIN_EXE_attune")).with_limit(Duration::from_secs(60)))
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn model() -> PathBuf {
    attune_test_support::default_model()
}

fn chat_rows(n: usize, tag: &str) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{tag} question {i}\"}},{{\"role\":\"assistant\",\"content\":\"answer {i}\"}}]}}\n"
            )
        })
        .collect()
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn sizes_near_usize_max_on_the_flags_are_clear_errors() {
    let env = Env::new();
    env.ok(&["models", "add", s(&model())]);
    let data = env.write("qa.jsonl", chat_rows(20, "q"));
    env.ok(&["data", "import", s(&data), "--name", "qa"]);
    let max = usize::MAX.to_string();
    let near = (usize::MAX - 1).to_string();
    for (flags, field) in [
        (vec!["--batch-size", max.as_str()], "batch_size"),
        (vec!["--batch-size", near.as_str()], "batch_size"),
        (vec!["--grad-accum", max.as_str()], "grad_accum"),
        (
            vec!["--batch-size", "4096", "--grad-accum", near.as_str()],
            "grad_accum",
        ),
        (vec!["--steps", max.as_str()], "steps"),
        (vec!["--warmup", max.as_str()], "warmup_steps"),
        (vec!["--lora-r", max.as_str()], "lora r"),
        (vec!["--max-len", max.as_str()], "max_len"),
        (vec!["--epochs", "1e300"], "epochs"),
        (
            vec!["--method", "prompt", "--virtual-tokens", max.as_str()],
            "virtual_tokens",
        ),
        (
            vec!["--method", "prompt", "--virtual-tokens", near.as_str()],
            "virtual_tokens",
        ),
    ] {
        let mut args = vec!["train", "--model", "1", "--data", "qa"];
        args.extend(flags.iter().copied());
        let err = env.fails(&args);
        assert!(err.contains(field), "{flags:?}: {err}");
    }
    // Nothing was queued by the refused runs.
    let runs = env.ok(&["runs", "list"]);
    assert!(!runs.contains("qa"), "{runs}");
}

#[test]
fn a_fifo_as_dataset_or_model_is_refused_at_once() {
    let env = Env::new();
    let fifo = env.path("pipe.jsonl");
    mkfifo(&fifo);
    let started = Instant::now();
    let err = env.fails(&["data", "import", s(&fifo)]);
    assert!(err.contains("named pipe (FIFO)"), "{err}");
    let gguf = env.path("pipe.gguf");
    mkfifo(&gguf);
    let err = env.fails(&["models", "add", s(&gguf)]);
    assert!(err.contains("named pipe (FIFO)"), "{err}");
    // A folder where a file belongs, and a file where a folder belongs.
    let err = env.fails(&["data", "import", s(env.root())]);
    assert!(err.contains("folder"), "{err}");
    let f = env.write("not-a-dir", "x");
    env.ok(&["models", "add", s(&model())]);
    let err = env.fails(&["adapters", "import", s(&f), "--base", "1"]);
    assert!(err.contains("not a folder"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A one-tensor-per-entry safetensors file: (name, dtype, shape, bytes).
fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [data.len(), data.len() + bytes.len()],
            }),
        );
        data.extend_from_slice(bytes);
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

#[test]
fn models_add_refuses_what_it_could_never_run() {
    use attune_models::gguf_header::write::{file, Tensor};
    use candle_core::quantized::gguf_file::Value;
    let env = Env::new();
    // A GGUF whose alignment is 0, and one whose dimensions multiply past u64.
    let meta = |arch: &str| {
        vec![
            ("general.architecture", Value::String(arch.into())),
            ("llama.context_length", Value::U32(128)),
        ]
    };
    let t = |dims: Vec<u64>| Tensor {
        name: "token_embd.weight",
        dims,
        ggml_type: 0,
        offset: 0,
    };
    let mut m = meta("llama");
    m.push(("general.alignment", Value::U32(0)));
    let p = env.write("align0.gguf", file(&m, &[t(vec![4, 4])], &[0u8; 64]));
    let err = env.fails(&["models", "add", s(&p)]);
    assert!(err.contains("general.alignment"), "{err}");
    let p = env.write(
        "huge.gguf",
        file(
            &meta("llama"),
            &[t(vec![1 << 40, 1 << 40, 1 << 40])],
            &[0u8; 64],
        ),
    );
    let err = env.fails(&["models", "add", s(&p)]);
    assert!(err.contains("multiply past"), "{err}");
    // A GGUF of an architecture the runtime does not implement.
    let p = env.write(
        "gpt2.gguf",
        file(
            &[
                ("general.architecture", Value::String("gpt2".into())),
                ("gpt2.context_length", Value::U32(128)),
            ],
            &[t(vec![4, 4])],
            &[0u8; 64],
        ),
    );
    let err = env.fails(&["models", "add", s(&p)]);
    assert!(err.contains("unsupported architecture 'gpt2'"), "{err}");

    // A safetensors folder without a tokenizer, then one whose header overflows.
    let config = r#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":8,
        "hidden_size":4,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,
        "num_key_value_heads":2,"max_position_embeddings":64,"rms_norm_eps":1e-5,
        "tie_word_embeddings":true}"#;
    env.write("hf/config.json", config);
    env.write(
        "hf/model.safetensors",
        safetensors(&[(
            "model.embed_tokens.weight",
            "F32",
            vec![8, 4],
            vec![0u8; 128],
        )]),
    );
    let err = env.fails(&["models", "add", s(&env.path("hf"))]);
    assert!(err.contains("tokenizer.json"), "{err}");
    let header =
        r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}"#;
    let mut bad = (header.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(header.as_bytes());
    bad.extend_from_slice(&[0u8; 16]);
    env.write("hf/model.safetensors", bad);
    let err = env.fails(&["models", "add", s(&env.path("hf"))]);
    assert!(err.contains("multiplies past"), "{err}");

    let list = env.ok(&["models", "list", "--json"]);
    assert_eq!(list.trim(), "[]", "nothing was registered: {list}");
}

#[test]
fn adapters_with_nan_weights_or_no_tensors_are_refused_at_import() {
    let env = Env::new();
    env.ok(&["models", "add", s(&model())]);
    let cfg =
        r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],"bias":"none"}"#;
    let key =
        |ab: &str| format!("base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight");
    let f32s = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut b = vec![0f32; 576 * 2];
    b[5] = f32::NAN;
    env.write("nan/adapter_config.json", cfg);
    env.write(
        "nan/adapter_model.safetensors",
        safetensors(&[
            (&key("A"), "F32", vec![2, 576], f32s(vec![0.01; 2 * 576])),
            (&key("B"), "F32", vec![576, 2], f32s(b)),
        ]),
    );
    let err = env.fails(&["adapters", "import", s(&env.path("nan")), "--base", "1"]);
    assert!(err.contains("non-finite"), "{err}");
    env.write("empty/adapter_config.json", cfg);
    env.write("empty/adapter_model.safetensors", safetensors(&[]));
    let err = env.fails(&["adapters", "import", s(&env.path("empty")), "--base", "1"]);
    assert!(err.contains("no tensors"), "{err}");
    // Shaped for another base (in_features 64, the default model has 576).
    env.write("other/adapter_config.json", cfg);
    env.write(
        "other/adapter_model.safetensors",
        safetensors(&[
            (&key("A"), "F32", vec![2, 64], f32s(vec![0.01; 2 * 64])),
            (&key("B"), "F32", vec![576, 2], f32s(vec![0.0; 576 * 2])),
        ]),
    );
    let err = env.fails(&["adapters", "import", s(&env.path("other")), "--base", "1"]);
    assert!(err.contains("do not fit"), "{err}");
    let list = env.ok(&["adapters", "list"]);
    assert!(!list.contains("nan") && !list.contains("other"), "{list}");
}

/// `PRAGMA integrity_check` of the library in `env`.
fn integrity(env: &Env) -> String {
    let conn = rusqlite::Connection::open(env.path("data/library.sqlite3")).expect("open db");
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

#[test]
fn several_processes_write_one_library_at_once_and_nothing_is_lost() {
    // Six processes open a fresh library at the same moment (migrations race).
    for round in 0..3 {
        let env = Env::new();
        let children: Vec<_> = (0..6)
            .map(|_| {
                env.cmd(&["data", "list"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(integrity(&env), "ok");
    }

    // Imports and model registrations from several processes at once, on a fresh library.
    let env = Env::new();
    let model = model();
    let mut files = Vec::new();
    for i in 0..4 {
        files.push(env.write(&format!("d{i}.jsonl"), chat_rows(200 + i, &format!("d{i}"))));
    }
    let mut children = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let name = format!("d{i}");
        children.push((
            format!("import {name}"),
            env.cmd(&["data", "import", s(f), "--name", &name])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        ));
    }
    for i in 0..2 {
        children.push((
            format!("models add #{i}"),
            env.cmd(&["models", "add", s(&model)])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        ));
    }
    for (what, c) in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["data", "list", "--json"])).expect("json");
    assert_eq!(list.len(), 4, "{list:?}");
    for i in 0..4 {
        let d = list
            .iter()
            .find(|d| d["name"] == format!("d{i}"))
            .unwrap_or_else(|| panic!("d{i} missing: {list:?}"));
        let rows = d["train_rows"].as_u64().unwrap_or(0)
            + d["valid_rows"].as_u64().unwrap_or(0)
            + d["test_rows"].as_u64().unwrap_or(0);
        assert_eq!(rows, 200 + i as u64, "{d}");
    }
    let models: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["models", "list", "--json"])).expect("json");
    assert_eq!(models.len(), 1, "the same weights once: {models:?}");
    assert_eq!(integrity(&env), "ok");
}
