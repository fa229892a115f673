//! Runs, adapters and evaluation on the real default model, with tiny budgets: a few
//! optimizer steps on short rows (max length 128), real SQLite files on disk.

use attune_test_support::default_model;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use attune_protocol::{
    AdapterKind, ChatMessage, EvalOptions, EvalSubject, ImportOptions, MethodSpec, MetricKind,
    PromptTemplate, RunEvent, RunSpec, RunStatus, SamplingParams, Split, SplitName,
};

use super::*;
use crate::evaluate::parse_final_answer;

fn shared() -> PathBuf {
    attune_test_support::shared("")
}

fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(&dir.path().join("data")).expect("open engine");
    (dir, engine)
}

const QA: [(&str, &str); 8] = [
    ("What color is the sky?", "Blue. Final answer: yes"),
    ("Is water wet?", "Mostly. Final answer: maybe"),
    ("Do fish fly?", "No, they swim. Final answer: no"),
    ("Is ice cold?", "Yes, it is frozen. Final answer: yes"),
    ("Can cats bark?", "No, they meow. Final answer: no"),
    ("Will it rain tomorrow?", "Hard to say. Final answer: maybe"),
    (
        "Is the sun a star?",
        "Yes, a yellow dwarf. Final answer: yes",
    ),
    ("Do stones eat?", "No, they are not alive. Final answer: no"),
];

/// Registers the real model and a tiny labeled chat dataset (6 train, 2 valid rows).
fn setup(e: &Engine, dir: &Path) -> (i64, i64) {
    let model = e
        .add_local_model(&default_model())
        .expect("add model")
        .model;
    let text: String = QA
        .iter()
        .map(|(q, a)| {
            let label = a.rsplit(": ").next().unwrap_or_default();
            serde_json::json!({
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "label": label,
            })
            .to_string()
                + "\n"
        })
        .collect();
    let path = dir.join("tiny.jsonl");
    std::fs::write(&path, text).expect("write dataset");
    let ds = e
        .import_dataset(
            &path,
            &ImportOptions {
                split: Split::Seeded {
                    valid_fraction: 0.25,
                    test_fraction: 0.0,
                    seed: 1,
                },
                ..Default::default()
            },
        )
        .expect("import");
    (model.id, ds.id)
}

fn spec(model: i64, dataset: i64, name: &str, steps: usize) -> RunSpec {
    RunSpec {
        name: Some(name.to_string()),
        model: model.to_string(),
        dataset: dataset.to_string(),
        method: MethodSpec::Lora {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            rslora: false,
        },
        batch_size: 2,
        steps: Some(steps),
        lr: Some(1e-3),
        warmup_steps: 1,
        max_len: 128,
        checkpoint_every: 0,
        eval_limit: Some(1),
        forgetting_rows: 0,
        ..Default::default()
    }
}

fn train_losses(e: &Engine, run: i64) -> Vec<(u64, f64)> {
    e.run_detail(&run.to_string())
        .expect("detail")
        .metrics
        .iter()
        .filter(|m| m.kind == MetricKind::Train)
        .map(|m| (m.step, m.loss))
        .collect()
}

#[test]
fn runs_lora_completes_records_metrics_and_registers_a_loadable_adapter() {
    let (dir, e) = engine();
    let (model, ds) = setup(&e, dir.path());
    let mut s = spec(model, ds, "tiny-lora", 3);
    s.forgetting_rows = 3;
    s.eval_limit = None;
    let run = e.create_run(&s).expect("create");
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.total_steps, 3);
    let mut events = Vec::new();
    let done = e
        .execute_run(run.id, &mut |ev| events.push(ev), &RunControl::new())
        .expect("execute");
    assert_eq!(done.status, RunStatus::Completed, "{done:?}");
    assert_eq!(done.step, 3);
    assert!(matches!(
        events.first(),
        Some(RunEvent::Started {
            step: 0,
            total_steps: 3,
            ..
        })
    ));
    assert!(matches!(
        events.last(),
        Some(RunEvent::Finished { status: RunStatus::Completed, adapter: Some(a) }) if a == "tiny-lora"
    ));
    let detail = e.run_detail("tiny-lora").expect("detail");
    let train: Vec<_> = detail
        .metrics
        .iter()
        .filter(|m| m.kind == MetricKind::Train)
        .collect();
    assert_eq!(train.iter().map(|m| m.step).collect::<Vec<_>>(), [1, 2, 3]);
    for m in &train {
        assert!(m.loss.is_finite() && m.loss > 0.0, "{m:?}");
        assert!(m.lr.is_some() && m.grad_norm.is_some() && m.tokens_per_s.is_some());
    }
    let evals: Vec<u64> = detail
        .metrics
        .iter()
        .filter(|m| m.kind == MetricKind::Eval)
        .map(|m| m.step)
        .collect();
    assert_eq!(evals, [0, 3]);
    assert_eq!(detail.adapter.as_deref(), Some("tiny-lora"));

    // The adapter: registered, in the library folder, a PEFT folder that loads back.
    let a = e.find_adapter("tiny-lora").expect("adapter");
    assert_eq!(a.kind, AdapterKind::Lora);
    assert_eq!(a.run_id, Some(run.id));
    assert_eq!(a.metrics.steps, 3);
    assert!(a.metrics.eval_nll_before.is_some() && a.metrics.eval_nll_after.is_some());
    assert!(a.metrics.general_nll_before.is_some() && a.metrics.general_nll_after.is_some());
    assert_eq!(
        Path::new(&a.path),
        e.data_dir().join("adapters").join("tiny-lora")
    );
    let loaded = attune_models::train::peft::load(Path::new(&a.path)).expect("peft load");
    assert_eq!(loaded.kind(), "lora");
    // Checkpoints are gone once the adapter is written.
    assert!(!Path::new(&done.run_dir).join("checkpoints").exists());

    // Chat with it, then evaluate it.
    let params = SamplingParams {
        max_tokens: 3,
        temperature: 0.0,
        ..Default::default()
    };
    let stats = e
        .chat_with_adapter(
            "tiny-lora",
            &[ChatMessage {
                role: "user".into(),
                content: "Is ice cold?".into(),
            }],
            &params,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect("chat with adapter");
    assert!(stats.generated_tokens >= 1);
    let report = e
        .evaluate(
            &EvalSubject::Adapter {
                adapter: "tiny-lora".into(),
            },
            &ds.to_string(),
            &EvalOptions {
                limit: Some(1),
                max_len: 128,
                forgetting_rows: 2,
                ..Default::default()
            },
        )
        .expect("evaluate adapter");
    assert!(report.mean_nll.is_finite() && report.n_tokens > 0);
    assert!(report.forgetting_nll.is_some() && report.base_forgetting_nll.is_some());

    // A completed run cannot run again; its dataset and model cannot be removed.
    let err = e
        .execute_run(run.id, &mut |_| {}, &RunControl::new())
        .expect_err("completed");
    assert_eq!(err.code(), "invalid_state");
    let err = e.remove_dataset(ds).expect_err("dataset in use");
    assert_eq!(err.code(), "in_use");
    assert!(err.to_string().contains("tiny-lora"), "{err}");
    let err = e.remove_model(model).expect_err("model in use");
    assert!(err.to_string().contains("tiny-lora"), "{err}");

    // Calibration of the memory estimate against the measured peak (VmHWM).
    let (_, hwm) = process_memory_mb();
    let cfg = model_config(&default_model()).expect("config");
    let est = estimate_memory(&cfg, &s.method, s.batch_size, s.max_len);
    eprintln!(
        "memory: estimate {} MiB (weights {} MiB, optimizer {} MiB, activations {} MiB), measured VmHWM {:?} MiB, recorded estimate {} MiB",
        est.total_mb(),
        est.weights >> 20,
        est.optimizer >> 20,
        est.activations >> 20,
        hwm,
        done.memory_estimate_mb
    );
    assert_eq!(e.store.integrity_check().expect("check"), "ok");
}

#[test]
fn runs_resume_after_a_crash_continues_the_same_loss_curve() {
    let (dir, e) = engine();
    let (model, ds) = setup(&e, dir.path());
    // The uninterrupted run.
    let straight = e
        .create_run(&spec(model, ds, "straight", 4))
        .expect("create");
    e.execute_run(straight.id, &mut |_| {}, &RunControl::new())
        .expect("straight run");
    let want = train_losses(&e, straight.id);
    assert_eq!(want.len(), 4);

    // The same run, killed right after its step-2 checkpoint.
    let mut s = spec(model, ds, "crashy", 4);
    s.checkpoint_every = 1;
    let crashy = e.create_run(&s).expect("create");
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        e.execute_run(
            crashy.id,
            &mut |ev| {
                if let RunEvent::Checkpoint { step: 2 } = ev {
                    panic!("simulated crash");
                }
            },
            &RunControl::new(),
        )
    }));
    assert!(crashed.is_err(), "the observer's panic must unwind");
    assert_eq!(
        e.find_run("crashy").expect("run").status,
        RunStatus::Running
    );
    let ckpts = PathBuf::from(&crashy.run_dir).join("checkpoints");
    // Every checkpoint directory is complete.
    for name in checkpoint_entries(&ckpts) {
        assert!(name.starts_with("step-"), "{name}");
        for f in [
            "state.json",
            "trainable.safetensors",
            "optimizer.safetensors",
        ] {
            assert!(ckpts.join(&name).join(f).is_file(), "{name}/{f}");
        }
    }
    assert!(checkpoint_entries(&ckpts).contains("step-0000002"));
    // A crash mid-write of a later checkpoint leaves a temporary directory.
    let junk = ckpts.join(".tmp-step-0000003-999999");
    std::fs::create_dir_all(&junk).expect("junk dir");
    std::fs::write(junk.join("state.json"), "{not json").expect("junk file");
    drop(e);

    // Reopen: the run is paused (its process no longer runs it) and resumes.
    let e = Engine::open(&dir.path().join("data")).expect("reopen");
    let r = e.find_run("crashy").expect("run");
    assert_eq!(r.status, RunStatus::Paused);
    assert_eq!(r.step, 2);
    let mut started = None;
    let done = e
        .resume_run(
            "crashy",
            &mut |ev| {
                if let RunEvent::Started { step, .. } = ev {
                    started = Some(step);
                }
            },
            &RunControl::new(),
        )
        .expect("resume");
    assert_eq!(started, Some(2));
    assert_eq!(done.status, RunStatus::Completed);
    assert!(
        !junk.exists(),
        "the temporary checkpoint directory is cleaned"
    );
    let got = train_losses(&e, crashy.id);
    assert_eq!(got.len(), 4, "{got:?}");
    for ((s1, a), (s2, b)) in want.iter().zip(&got) {
        assert_eq!(s1, s2);
        assert!(
            (a - b).abs() <= 1e-5,
            "step {s1}: straight {a}, resumed {b}"
        );
    }
    assert_eq!(e.store.integrity_check().expect("check"), "ok");
}

#[test]
fn runs_pause_and_cancel_through_the_control() {
    let (dir, e) = engine();
    let (model, ds) = setup(&e, dir.path());
    let run = e.create_run(&spec(model, ds, "pausy", 3)).expect("create");
    let control = RunControl::new();
    let paused = e
        .execute_run(
            run.id,
            &mut |ev| {
                if let RunEvent::Step { metric } = ev {
                    if metric.step == 1 {
                        control.pause();
                    }
                }
            },
            &control,
        )
        .expect("paused run");
    assert_eq!(paused.status, RunStatus::Paused);
    assert_eq!(paused.step, 1);
    let ckpts = PathBuf::from(&run.run_dir).join("checkpoints");
    assert!(checkpoint_entries(&ckpts).contains("step-0000001"));
    let cancelled = e.cancel_run("pausy").expect("cancel");
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert!(!ckpts.exists());
    let err = e
        .resume_run("pausy", &mut |_| {}, &RunControl::new())
        .expect_err("cancelled");
    assert_eq!(err.code(), "invalid_state");
    e.remove_run("pausy").expect("remove run");
    assert!(!Path::new(&run.run_dir).exists());
    assert_eq!(e.store.count("runs").expect("count"), 0);
}

#[test]
fn runs_refused_or_failed_leave_the_library_sound() {
    let (dir, e) = engine();
    let (model, ds) = setup(&e, dir.path());
    // Will not fit: refused before anything is written, naming estimate, available, advice.
    let mut huge = spec(model, ds, "huge", 1);
    huge.method = MethodSpec::Full;
    huge.batch_size = 4096;
    huge.max_len = 4096;
    let err = e.create_run(&huge).expect_err("too large");
    assert_eq!(err.code(), "wont_fit");
    let msg = err.to_string();
    assert!(
        msg.contains("MiB") && msg.contains("available") && msg.contains("--batch-size"),
        "{msg}"
    );
    assert!(msg.contains("lora"), "{msg}");
    assert_eq!(e.store.count("runs").expect("count"), 0);
    // Unknown model / dataset / bad settings.
    assert_eq!(
        e.create_run(&spec(999, ds, "x", 1))
            .expect_err("model")
            .code(),
        "not_found"
    );
    assert_eq!(
        e.create_run(&spec(model, 999, "x", 1))
            .expect_err("dataset")
            .code(),
        "not_found"
    );
    let mut bad = spec(model, ds, "x", 1);
    bad.batch_size = 0;
    assert!(e
        .create_run(&bad)
        .expect_err("batch")
        .to_string()
        .contains("batch_size"));
    assert_eq!(e.store.count("runs").expect("count"), 0);

    // A model whose file disappears: the run fails with the reason recorded.
    let copy_dir = dir.path().join("copy");
    std::fs::create_dir_all(&copy_dir).expect("mkdir");
    let copy = copy_dir.join("copy.gguf");
    std::fs::copy(default_model(), &copy).expect("copy model");
    let e2 = Engine::open(&dir.path().join("data2")).expect("open");
    let (m2, d2) = {
        let m = e2.add_local_model(&copy).expect("add copy").model;
        let (_, d) = setup_dataset_only(&e2, dir.path());
        (m.id, d)
    };
    let run = e2.create_run(&spec(m2, d2, "doomed", 2)).expect("create");
    std::fs::remove_file(&copy).expect("delete model file");
    let err = e2
        .execute_run(run.id, &mut |_| {}, &RunControl::new())
        .expect_err("model missing");
    assert_eq!(err.code(), "model_missing");
    let failed = e2.find_run("doomed").expect("run");
    assert_eq!(failed.status, RunStatus::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|m| m.contains("copy.gguf")),
        "{failed:?}"
    );
    assert_eq!(
        e2.create_run(&spec(m2, d2, "doomed-2", 1))
            .expect_err("missing")
            .code(),
        "model_missing"
    );
    assert_eq!(e2.store.integrity_check().expect("check"), "ok");
    // The dataset a run uses cannot be removed; once the run is removed it can.
    assert_eq!(e2.remove_dataset(d2).expect_err("in use").code(), "in_use");
    e2.remove_run("doomed").expect("remove run");
    e2.remove_dataset(d2).expect("remove dataset");
    e2.remove_model(m2).expect("remove model");
    assert_eq!(e2.store.integrity_check().expect("check"), "ok");
}

fn setup_dataset_only(e: &Engine, dir: &Path) -> (i64, i64) {
    let text: String = QA
        .iter()
        .map(|(q, a)| {
            serde_json::json!({
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            })
            .to_string()
                + "\n"
        })
        .collect();
    let path = dir.join("tiny2.jsonl");
    std::fs::write(&path, text).expect("write dataset");
    let ds = e
        .import_dataset(&path, &ImportOptions::default())
        .expect("import");
    (0, ds.id)
}

#[test]
fn runs_adapters_import_reference_peft_folders_export_and_remove() {
    let refs = shared().join("reference/adapters");
    assert!(
        refs.join("lora/adapter_config.json").is_file(),
        "{} is missing: this test needs the shared reference data beside the repository (../shared, as the project lays it out)",
        refs.display()
    );
    let (dir, e) = engine();
    let model = e.add_local_model(&default_model()).expect("add").model;
    let lora = e
        .import_adapter(&refs.join("lora"), &model.name, Some("ref-lora"))
        .expect("import lora");
    assert_eq!(lora.kind, AdapterKind::Lora);
    let prompt = e
        .import_adapter(&refs.join("prompt"), &model.id.to_string(), None)
        .expect("import prompt");
    assert_eq!(prompt.kind, AdapterKind::Prompt);
    assert_eq!(prompt.name, "prompt");
    assert_eq!(e.list_adapters().expect("list").len(), 2);
    let err = e
        .import_adapter(&refs.join("lora"), &model.name, Some("ref-lora"))
        .expect_err("taken");
    assert_eq!(err.code(), "already_exists");
    let params = SamplingParams {
        max_tokens: 2,
        temperature: 0.0,
        ..Default::default()
    };
    for name in ["ref-lora", "prompt"] {
        let stats = e
            .generate_with_adapter(
                name,
                "The patient",
                &params,
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .expect("generate with adapter");
        assert!(stats.generated_tokens >= 1);
    }

    // Keys for layers the base model does not have: refused, the error names the key.
    let attune_models::train::peft::Adapter::Lora { tensors, .. } =
        attune_models::train::peft::load(&refs.join("lora")).expect("load")
    else {
        panic!("the reference LoRA is not a LoRA adapter");
    };
    let renamed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.replace("layers.0.", "layers.99."), v))
        .collect();
    let bad = dir.path().join("bad-lora");
    std::fs::create_dir_all(&bad).expect("mkdir");
    candle_core::safetensors::save(&renamed, bad.join("adapter_model.safetensors")).expect("save");
    std::fs::copy(
        refs.join("lora/adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .expect("copy");
    let err = e
        .import_adapter(&bad, &model.name, Some("bad"))
        .expect_err("layer 99 does not exist");
    assert_eq!(err.code(), "invalid_adapter");
    assert!(err.to_string().contains("layers.99."), "{err}");
    assert!(e.find_adapter("bad").is_err());
    assert!(!e.data_dir().join("adapters/bad").exists());

    // Export copies the PEFT folder byte for byte.
    let out = dir.path().join("exported");
    e.export_adapter("ref-lora", &out).expect("export");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(out.join(f)).expect("read export"),
            std::fs::read(refs.join("lora").join(f)).expect("read ref"),
            "{f}"
        );
    }
    assert_eq!(
        e.export_adapter("ref-lora", &out)
            .expect_err("not empty")
            .code(),
        "invalid_input"
    );
    let removed = e.remove_adapter("ref-lora").expect("remove");
    assert!(!Path::new(&removed.path).exists());
    assert_eq!(e.list_adapters().expect("list").len(), 1);
    // The base model cannot go while an adapter is built on it.
    assert_eq!(
        e.remove_model(model.id).expect_err("in use").code(),
        "in_use"
    );
}

#[test]
fn runs_eval_base_matches_the_reference_per_row_nll() {
    let valid = shared().join("data/pubmedqa/valid.jsonl");
    assert!(valid.is_file(), "{} is missing: this test needs the shared reference data beside the repository (../shared, as the project lays it out)", valid.display());
    let q: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("reference/quality_reference.json"))
            .expect("reference"),
    )
    .expect("json");
    let want = q["base"]["valid"]["per_row_sum_nll_and_count"]
        .as_array()
        .expect("rows")
        .clone();
    let (_, e) = engine();
    let model = e.add_local_model(&default_model()).expect("add").model;
    let ds = e
        .import_dataset(
            &valid,
            &ImportOptions {
                split: Split::AllTrain,
                ..Default::default()
            },
        )
        .expect("import valid");
    let n = 2;
    let report = e
        .evaluate(
            &EvalSubject::Base {
                model: model.name.clone(),
            },
            &ds.name,
            &EvalOptions {
                split: SplitName::Train,
                limit: Some(n),
                ..Default::default()
            },
        )
        .expect("evaluate");
    assert_eq!(report.rows.len(), n);
    for (got, want) in report.rows.iter().zip(&want) {
        assert_eq!(got.source_id.as_deref(), want[0].as_str());
        let (sum, count) = (want[1].as_f64().expect("sum"), want[2].as_u64().expect("n"));
        assert_eq!(got.n_tokens, count, "{:?}", got.source_id);
        assert!(
            ((got.sum_nll - sum) / sum).abs() <= 1e-3,
            "row {:?}: {} vs PyTorch {sum}",
            got.source_id,
            got.sum_nll
        );
    }
    assert!((report.ppl - report.mean_nll.exp()).abs() < 1e-9);
    assert_eq!(e.store.count("evaluations").expect("count"), 1);
    // With label accuracy the model decodes on its quantized weights, but the rows are still
    // scored on the f32 ones: the same NLL.
    let with_answers = e
        .evaluate(
            &EvalSubject::Base {
                model: model.name.clone(),
            },
            &ds.name,
            &EvalOptions {
                split: SplitName::Train,
                limit: Some(n),
                accuracy: true,
                max_new_tokens: 4,
                ..Default::default()
            },
        )
        .expect("evaluate with answers");
    assert_eq!(with_answers.n_labeled, n as u64);
    for (a, b) in with_answers.rows.iter().zip(&report.rows) {
        assert!(
            ((a.sum_nll - b.sum_nll) / b.sum_nll).abs() < 1e-5,
            "{:?}: {} with answers vs {}",
            a.source_id,
            a.sum_nll,
            b.sum_nll
        );
    }
}

#[test]
fn runs_eval_template_and_accuracy_on_labeled_rows() {
    let (dir, e) = engine();
    let (model, ds) = setup(&e, dir.path());
    let base = e
        .evaluate(
            &EvalSubject::Base {
                model: model.to_string(),
            },
            &ds.to_string(),
            &EvalOptions {
                limit: Some(1),
                max_len: 128,
                accuracy: true,
                max_new_tokens: 8,
                ..Default::default()
            },
        )
        .expect("base");
    assert_eq!(base.n_labeled, 1);
    assert!(base.accuracy.is_some());
    let template = PromptTemplate {
        name: "terse".into(),
        system: Some("Answer in one short sentence.".into()),
        examples: vec![
            ChatMessage {
                role: "user".into(),
                content: "Is fire hot?".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "Yes. Final answer: yes".into(),
            },
        ],
        ..Default::default()
    };
    let t = e
        .evaluate(
            &EvalSubject::Template {
                model: model.to_string(),
                template,
            },
            &ds.to_string(),
            &EvalOptions {
                limit: Some(1),
                max_len: 256,
                ..Default::default()
            },
        )
        .expect("template");
    // Only the row's own answer is scored, not the few-shot answer.
    assert_eq!(t.rows[0].n_tokens, base.rows[0].n_tokens);
    assert_eq!(t.subject, "terse");
}

#[test]
fn runs_final_answer_parsing() {
    assert_eq!(
        parse_final_answer("blah. Final answer: Yes").as_deref(),
        Some("yes")
    );
    assert_eq!(
        parse_final_answer("FINAL ANSWER: no.").as_deref(),
        Some("no")
    );
    assert_eq!(
        parse_final_answer("final answer: maybe\n").as_deref(),
        Some("maybe")
    );
    assert_eq!(
        parse_final_answer("Final answer: no ... Final answer: yes").as_deref(),
        Some("yes")
    );
    assert_eq!(parse_final_answer("Final answer: nothing"), None);
    assert_eq!(parse_final_answer("no final verdict"), None);
}

#[test]
fn runs_memory_estimate_grows_with_batch_length_and_method() {
    let cfg = model_config(&default_model()).expect("config");
    let lora = MethodSpec::lora_default();
    let small = estimate_memory(&cfg, &lora, 1, 128);
    let big = estimate_memory(&cfg, &lora, 4, 1024);
    let full = estimate_memory(&cfg, &MethodSpec::Full, 1, 128);
    assert!(big.total > small.total && full.total > small.total);
    // PEFT's count for r = 16 on every projection of SmolLM2-135M.
    assert_eq!(trainable_params(&cfg, &lora), 4_884_480);
    assert_eq!(full.trainable_params, cfg.num_parameters() as u64);
}

#[test]
fn runs_prompt_and_full_runs_write_loadable_artifacts_and_lora_merges() {
    let (dir, e) = engine();
    let (model, ds) = setup(&e, dir.path());
    let params = SamplingParams {
        max_tokens: 2,
        temperature: 0.0,
        ..Default::default()
    };
    let hi = [ChatMessage {
        role: "user".into(),
        content: "Is ice cold?".into(),
    }];
    let no = AtomicBool::new(false);

    // Prompt tuning: a PEFT prompt folder; chat prepends the soft prompt.
    let mut p = spec(model, ds, "tiny-prompt", 1);
    p.method = MethodSpec::Prompt {
        virtual_tokens: 4,
        init_text: Some("Answer briefly.".into()),
    };
    p.lr = None;
    e.create_run(&p)
        .and_then(|r| e.execute_run(r.id, &mut |_| {}, &RunControl::new()))
        .expect("prompt run");
    let a = e.find_adapter("tiny-prompt").expect("adapter");
    assert_eq!(a.kind, AdapterKind::Prompt);
    let attune_models::train::peft::Adapter::Prompt { embeddings, .. } =
        attune_models::train::peft::load(Path::new(&a.path)).expect("load")
    else {
        panic!("not a prompt adapter");
    };
    assert_eq!(embeddings.dims()[0], 4);
    e.chat_with_adapter("tiny-prompt", &hi, &params, &no, &mut |_| {})
        .expect("chat with the soft prompt");

    // Full fine-tuning: a Hugging Face folder with tokenizer and chat template.
    let mut f = spec(model, ds, "tiny-full", 1);
    f.method = MethodSpec::Full;
    f.batch_size = 1;
    f.lr = None;
    e.create_run(&f)
        .and_then(|r| e.execute_run(r.id, &mut |_| {}, &RunControl::new()))
        .expect("full run");
    let a = e.find_adapter("tiny-full").expect("adapter");
    assert_eq!(a.kind, AdapterKind::Full);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(Path::new(&a.path).join(file).is_file(), "{file}");
    }
    e.chat_with_adapter("tiny-full", &hi, &params, &no, &mut |_| {})
        .expect("chat with the full fine-tune");

    // LoRA merged into the base: a registered Hugging Face model that generates.
    e.create_run(&spec(model, ds, "tiny-lora", 1))
        .and_then(|r| e.execute_run(r.id, &mut |_| {}, &RunControl::new()))
        .expect("lora run");
    let err = e
        .merge_adapter("tiny-prompt", None, None)
        .expect_err("prompt");
    assert_eq!(err.code(), "invalid_input");
    let merged = e
        .merge_adapter("tiny-lora", Some("tiny-merged"), None)
        .expect("merge");
    assert!(!merged.already_present);
    assert_eq!(merged.model.name, "tiny-merged");
    assert!(e
        .data_dir()
        .join("models/tiny-merged/tokenizer.json")
        .is_file());
    let stats = e
        .chat(merged.model.id, &hi, &params, &no, &mut |_| {})
        .expect("chat with the merged model");
    assert!(stats.generated_tokens >= 1);
    assert_eq!(e.store.integrity_check().expect("check"), "ok");
}

#[test]
fn runs_packed_count_blocks_for_their_steps_and_train() {
    let (dir, e) = engine();
    let (model, ds) = setup(&e, dir.path());
    let block = 24;
    let packed = RunSpec {
        steps: None,
        epochs: 1.0,
        max_len: block,
        pack: true,
        ..spec(model, ds, "packed", 0)
    };
    // The blocks the 6 train rows make, from their full token counts.
    let dataset = e.find_dataset(&ds.to_string()).expect("dataset");
    let m = e.find_model(&model.to_string()).expect("model");
    let lengths = e.train_lengths(&dataset, &m).expect("lengths");
    assert_eq!(lengths.len(), 6);
    assert!(
        lengths.iter().all(|&l| l > block as u64),
        "every row is longer than a block: {lengths:?}"
    );
    let blocks = attune_models::train::packed_count(lengths.iter().copied(), block);
    let run = e.create_run(&packed).expect("create packed run");
    assert_eq!(
        run.total_steps,
        blocks.div_ceil(2),
        "{blocks} blocks, batch 2"
    );
    // Unpacked, the same settings take one example per row: 6 rows, batch 2.
    let plain = e
        .create_run(&RunSpec {
            pack: false,
            name: Some("plain".into()),
            ..packed.clone()
        })
        .expect("create plain run");
    assert_eq!(plain.total_steps, 3);
    assert_ne!(
        blocks.div_ceil(2),
        3,
        "the test needs packing to change the step count"
    );
    let done = e
        .execute_run(run.id, &mut |_| {}, &RunControl::new())
        .expect("packed run");
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(train_losses(&e, run.id).len() as u64, blocks.div_ceil(2));
    assert!(train_losses(&e, run.id).iter().all(|(_, l)| l.is_finite()));
}
