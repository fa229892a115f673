use super::*;
use attune_protocol::{ModelFormat, ModelSupport};

fn model(source: ModelSource) -> ModelSummary {
    ModelSummary {
        id: 1,
        name: "tiny".into(),
        architecture: "llama".into(),
        format: ModelFormat::Gguf,
        parameters: 1000,
        quantization: "Q4_1".into(),
        context_length: 2048,
        file_size: 10,
        sha256: "0".repeat(64),
        source,
        added_at: "2026-12-03T00:00:00Z".into(),
        family: "Llama".into(),
        support: ModelSupport::default(),
    }
}

fn chat(q: &str, a: &str) -> Sample {
    Sample::Chat(vec![
        ChatMessage {
            role: "user".into(),
            content: q.into(),
        },
        ChatMessage {
            role: "assistant".into(),
            content: a.into(),
        },
    ])
}

fn input<'a>(
    spec: &'a RunSpec,
    model: &'a ModelSummary,
    train: &'a [Sample],
    engine: BundleEngine,
) -> BundleInput<'a> {
    BundleInput {
        run_id: 7,
        run_name: "lora-qa",
        spec,
        total_steps: 3,
        engine,
        model,
        model_path: Path::new("/nowhere/tiny.Q4_1.gguf"),
        chat_template: "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        eos_token_ids: &[2],
        end_of_text_id: Some(0),
        dataset_name: "qa",
        dataset_hash: "ab",
        train,
        valid: &train[..1],
        attune_version: "0.0.0",
    }
}

fn file<'a>(b: &'a BundleFiles, name: &str) -> &'a str {
    let (_, c) = b
        .files
        .iter()
        .find(|(p, _)| p == name)
        .unwrap_or_else(|| panic!("no {name} in the bundle"));
    std::str::from_utf8(c).expect("utf-8")
}

#[test]
fn bundle_maps_the_spec_and_hashes_its_files() {
    let spec = RunSpec {
        model: "tiny".into(),
        dataset: "qa".into(),
        warmup_steps: 2,
        final_lr_fraction: 0.25,
        ..Default::default()
    };
    let m = model(ModelSource::Hub {
        repo: "org/tiny-GGUF".into(),
        revision: "abc".into(),
        path: "tiny.Q4_1.gguf".into(),
    });
    let train = [chat("q1", "a1"), chat("q2", "a\"2\"\n")];
    let b = bundle_files(&input(&spec, &m, &train, BundleEngine::Trl));
    let names: Vec<&str> = b.files.iter().map(|(p, _)| p.as_str()).collect();
    for want in [
        "README.md",
        "attune_run.json",
        "chat_template.jinja",
        "data/train.jsonl",
        "data/valid.jsonl",
        "train_trl.py",
        "run.sh",
        "deepspeed/zero2.json",
        "deepspeed/zero3.json",
        "accelerate/multi_gpu.yaml",
        "accelerate/deepspeed_zero2.yaml",
        "accelerate/deepspeed_zero3.yaml",
        "accelerate/fsdp.yaml",
        "slurm.sbatch",
        "axolotl.yaml",
        "bundle.json",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // The data round-trips as chat messages.
    let rows: Vec<Value> = file(&b, "data/train.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl"))
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["messages"][1]["content"], "a\"2\"\n");
    // Hyper-parameters one to one.
    let run: Value = serde_json::from_str(file(&b, "attune_run.json")).expect("json");
    let hp = &run["hyperparameters"];
    assert_eq!(hp["peak_lr"], 2e-4);
    assert_eq!(hp["warmup_steps"], 2);
    assert_eq!(hp["final_lr_fraction"], 0.25);
    assert_eq!(hp["hf_lr_scheduler_type"], "cosine_with_min_lr");
    assert_eq!(hp["hf_lr_scheduler_kwargs"]["min_lr_rate"], 0.25);
    assert_eq!(hp["lora"]["r"], 16);
    assert_eq!(hp["lora"]["targets"][6], "down_proj");
    assert_eq!(run["model"]["hub_repo"], "org/tiny-GGUF");
    assert_eq!(run["model"]["gguf_file"], "tiny.Q4_1.gguf");
    assert_eq!(run["tokens"]["eos_token_ids"][0], 2);
    // The YAML names Axolotl's fields; a GGUF base goes through --save-base.
    let yaml = file(&b, "axolotl.yaml");
    for line in [
        "base_model: \"./base-model\"",
        "lora_r: 16",
        "lora_alpha: 32",
        "lora_target_modules: [\"q_proj\",\"k_proj\",\"v_proj\",\"o_proj\",\"gate_proj\",\"up_proj\",\"down_proj\"]",
        "lr_scheduler: cosine",
        "cosine_min_lr_ratio: 0.25",
        "warmup_steps: 2",
        "max_steps: 3",
        "    roles_to_train: [\"assistant\"]",
        "    train_on_eos: turn",
    ] {
        assert!(yaml.lines().any(|l| l == line), "{line:?} not in:\n{yaml}");
    }
    // The manifest lists every other file and its hash is over them.
    let manifest: Value = serde_json::from_str(file(&b, "bundle.json")).expect("json");
    assert_eq!(manifest["sha256"], b.sha256.as_str());
    let listed: BTreeMap<String, String> =
        serde_json::from_value(manifest["files"].clone()).expect("files");
    assert_eq!(listed.len(), b.files.len() - 1);
    assert_eq!(bundle_hash(&listed), b.sha256);
    // run.sh launches the TRL script.
    assert!(file(&b, "run.sh").contains("train_trl.py \"$@\""));
    // Same input, same hash; other data, another hash.
    let again = bundle_files(&input(&spec, &m, &train, BundleEngine::Trl));
    assert_eq!(again.sha256, b.sha256);
    let other = [chat("q1", "a1"), chat("q2", "different")];
    assert_ne!(
        bundle_files(&input(&spec, &m, &other, BundleEngine::Trl)).sha256,
        b.sha256
    );
}

#[test]
fn prompt_tuning_has_no_axolotl_yaml_and_says_so() {
    let spec = RunSpec {
        method: MethodSpec::Prompt {
            virtual_tokens: 8,
            init_text: None,
        },
        ..Default::default()
    };
    let m = model(ModelSource::Local {
        path: "/nowhere/tiny.Q4_1.gguf".into(),
    });
    let train = [chat("q", "a")];
    let b = bundle_files(&input(&spec, &m, &train, BundleEngine::Trl));
    assert!(b.files.iter().all(|(p, _)| p != "axolotl.yaml"));
    assert!(file(&b, "README.md").contains("Axolotl has no prompt tuning"));
    assert!(file(&b, "README.md").contains("pass `--model /path/to/it`"));
    let run: Value = serde_json::from_str(file(&b, "attune_run.json")).expect("json");
    assert_eq!(run["hyperparameters"]["prompt"]["virtual_tokens"], 8);
    assert_eq!(run["model"]["hub_repo"], Value::Null);
}

#[test]
fn axolotl_run_sh_dequantizes_a_gguf_first() {
    let spec = RunSpec::default();
    let m = model(ModelSource::Local {
        path: "/nowhere/tiny.Q4_1.gguf".into(),
    });
    let train = [chat("q", "a")];
    let b = bundle_files(&input(&spec, &m, &train, BundleEngine::Axolotl));
    let sh = file(&b, "run.sh");
    assert!(sh.contains("train_trl.py --save-base base-model"), "{sh}");
    assert!(sh.contains("-m axolotl.cli.train axolotl.yaml"), "{sh}");
}

#[test]
fn trainer_state_becomes_metrics() {
    let state = json!({
        "global_step": 3,
        "log_history": [
            {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 1.5, "epoch": 0.5},
            {"step": 2, "loss": 2.25, "learning_rate": 2e-4, "grad_norm": 1.25},
            {"step": 2, "eval_loss": 2.4, "eval_runtime": 1.0},
            {"step": 3, "train_loss": 2.3, "train_runtime": 9.0}
        ]
    });
    let m = metrics_from_trainer_state(&state, Path::new("trainer_state.json"), "now").expect("ok");
    assert_eq!(m.len(), 3);
    let train: Vec<_> = m.iter().filter(|x| x.kind == "train").collect();
    assert_eq!(train[0].step, 1);
    assert_eq!(train[0].loss, 2.5);
    assert_eq!(train[0].lr, Some(1e-4));
    assert_eq!(train[1].grad_norm, Some(1.25));
    let eval: Vec<_> = m.iter().filter(|x| x.kind == "eval").collect();
    assert_eq!((eval[0].step, eval[0].loss), (2, 2.4));
}

#[test]
fn bad_trainer_state_is_refused_with_the_entry() {
    let no_history = json!({"global_step": 1});
    let e =
        metrics_from_trainer_state(&no_history, Path::new("ts.json"), "now").expect_err("refused");
    assert!(e.to_string().contains("ts.json: no log_history"), "{e}");
    let no_step = json!({"log_history": [{"loss": 1.0}]});
    let e = metrics_from_trainer_state(&no_step, Path::new("ts.json"), "now").expect_err("refused");
    assert!(
        e.to_string().contains("entry 0 has a loss but no step"),
        "{e}"
    );
}

#[test]
fn destination_must_be_new_or_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(check_empty_destination(&dir.path().join("new")).is_ok());
    assert!(check_empty_destination(dir.path()).is_ok());
    std::fs::write(dir.path().join("x"), "1").expect("write");
    let e = check_empty_destination(dir.path()).expect_err("refused");
    assert!(e.to_string().contains("is not empty"), "{e}");
    let e = check_empty_destination(&dir.path().join("x")).expect_err("refused");
    assert!(e.to_string().contains("is not a folder"), "{e}");
}
