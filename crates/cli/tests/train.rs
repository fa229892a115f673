//! `attune train`, `runs`, `adapters` and `eval` as subprocesses, on the real default
//! model with tiny budgets (a few steps on short rows); each test has its own data dir.

use attune_test_support::Cli;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
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
        Env(Cli::new(env!("CARGO_BIN_EXE_attune")))
    }

    /// The real model and a tiny labeled chat dataset named `tiny` (6 train, 2 valid).
    fn setup(&self) {
        self.add_default_model();
        let rows = [
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
        let text: String = rows
            .iter()
            .map(|(q, a)| {
                serde_json::json!({
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "label": a.rsplit(": ").next(),
                })
                .to_string()
                    + "\n"
            })
            .collect();
        let path = self.root().join("tiny.jsonl");
        std::fs::write(&path, text).expect("write");
        self.ok(&[
            "data",
            "import",
            path.to_str().expect("utf-8"),
            "--valid-fraction",
            "0.25",
            "--yes",
        ]);
    }
}

const TRAIN: &[&str] = &[
    "train",
    "--model",
    "1",
    "--data",
    "tiny",
    "--method",
    "lora",
    "--batch-size",
    "2",
    "--max-len",
    "128",
    "--lora-r",
    "4",
    "--lora-targets",
    "q_proj,v_proj",
    "--lr",
    "1e-3",
    "--eval-limit",
    "1",
    "--forgetting-rows",
    "0",
];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TRAIN.iter().copied().chain(extra.iter().copied()).collect()
}

/// Waits until `dir` holds a complete `step-*` checkpoint.
fn wait_for_checkpoint(child: &mut Child, dir: &Path) {
    let start = Instant::now();
    loop {
        let found = std::fs::read_dir(dir).ok().is_some_and(|rd| {
            rd.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("step-")
                    && e.path().join("state.json").is_file()
            })
        });
        if found {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("attune train ended ({status}) before writing a checkpoint");
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn train_killed_with_sigkill_resumes_and_finishes() {
    let env = Env::new();
    env.setup();
    let mut child = env
        .cmd(&args(&[
            "--steps",
            "5",
            "--checkpoint-every",
            "1",
            "--name",
            "cli-run",
        ]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn train");
    wait_for_checkpoint(&mut child, &env.data_dir().join("runs/1/checkpoints"));
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");

    // The dead process's run is paused when the library is next opened.
    let runs = env.json(&["runs", "list", "--json"]);
    assert_eq!(runs[0]["status"], "paused", "{runs}");
    let out = env.ok(&["runs", "resume", "1"]);
    assert!(out.contains("completed run 1 'cli-run'"), "{out}");
    assert!(out.contains("step 5/5"), "{out}");
    let detail = env.json(&["runs", "show", "cli-run", "--json"]);
    assert_eq!(detail["run"]["status"], "completed");
    let steps: Vec<u64> = detail["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .filter(|m| m["kind"] == "train")
        .map(|m| m["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5]);
    let adapters = env.json(&["adapters", "list", "--json"]);
    assert_eq!(adapters[0]["name"], "cli-run");
    assert_eq!(adapters[0]["kind"], "lora");

    // Generate and evaluate with it, export it, then remove it.
    let g = env.json(&[
        "generate",
        "--adapter",
        "cli-run",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
        "--json",
        "--chat",
        "Is ice cold?",
    ]);
    assert_eq!(g["adapter"], "cli-run");
    assert!(g["generated_tokens"].as_u64().expect("tokens") >= 1);
    let report = env.json(&[
        "eval",
        "--adapter",
        "cli-run",
        "--data",
        "tiny",
        "--limit",
        "1",
        "--max-len",
        "128",
        "--json",
    ]);
    assert_eq!(report["subject_kind"], "adapter");
    assert!(report["mean_nll"].as_f64().expect("nll") > 0.0);
    let out = env.root().join("exported");
    env.ok(&[
        "adapters",
        "export",
        "cli-run",
        out.to_str().expect("utf-8"),
    ]);
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("adapter_config.json").is_file());
    let err = env.fails(&["models", "rm", "1"]);
    assert!(err.contains("cli-run"), "{err}");
    env.ok(&["adapters", "rm", "cli-run"]);
    assert!(!env.data_dir().join("adapters/cli-run").exists());
}

#[test]
fn train_ctrl_c_pauses_with_exit_130_and_cancel_discards() {
    let env = Env::new();
    env.setup();
    let mut child = env
        .cmd(&args(&["--steps", "50", "--checkpoint-every", "0"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn train");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .expect("train ended before its first step")
            .expect("read");
        if line.starts_with("step 1/50") {
            break;
        }
    }
    // SAFETY: signals our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("resume with `attune runs resume 1`"), "{err}");
    assert!(
        rest.iter().any(|l| l.starts_with("checkpoint step")),
        "{rest:?}"
    );
    let runs = env.json(&["runs", "list", "--json"]);
    assert_eq!(runs[0]["status"], "paused");
    assert_eq!(runs[0]["name"], "lora-tiny");
    let out = env.ok(&["runs", "cancel", "1"]);
    assert!(out.contains("cancelled run 1"), "{out}");
    assert!(!env.data_dir().join("runs/1/checkpoints").exists());
    let err = env.fails(&["runs", "resume", "1"]);
    assert!(err.contains("cancelled"), "{err}");
}

#[test]
fn train_refusals_are_one_line_errors() {
    let env = Env::new();
    env.setup();
    let err = env.fails(&["train", "--model", "nope", "--data", "tiny"]);
    assert!(err.contains("no model 'nope'"), "{err}");
    let err = env.fails(&["train", "--model", "1", "--data", "nope"]);
    assert!(err.contains("no dataset 'nope'"), "{err}");
    let err = env.fails(&[
        "train",
        "--model",
        "1",
        "--data",
        "tiny",
        "--method",
        "full",
        "--batch-size",
        "4096",
        "--max-len",
        "4096",
    ]);
    assert!(err.contains("will not fit") && err.contains("MiB"), "{err}");
    // The refusal offers the GPU machine, with the GPU memory it would take.
    assert!(
        err.contains("GiB of GPU memory") && err.contains("--create-only"),
        "{err}"
    );
    let err = env.fails(&[
        "train",
        "--model",
        "1",
        "--data",
        "tiny",
        "--lora-targets",
        "foo",
    ]);
    assert!(
        err.contains("unknown LoRA target 'foo'") && err.contains("choose from q_proj"),
        "{err}"
    );
    // LoRA too big even on the quantized base, which the engine took when f32 did not fit:
    // the refusal does not offer the form it already tried; on an f32 base it does.
    let huge = [
        "--batch-size",
        "4096",
        "--max-len",
        "4096",
        "--lora-targets",
        "q_proj",
    ];
    let base_args = |b: &'static str| -> Vec<&str> {
        let mut v = vec!["train", "--model", "1", "--data", "tiny"];
        v.extend(huge);
        if !b.is_empty() {
            v.extend(["--base", b]);
        }
        v
    };
    let err = env.fails(&base_args(""));
    assert!(
        err.contains("will not fit") && !err.contains("--base quantized"),
        "{err}"
    );
    let err = env.fails(&base_args("f32"));
    assert!(
        err.contains("will not fit") && err.contains("--base quantized"),
        "{err}"
    );
    let err = env.fails(&args(&["--base", "q4"]));
    assert!(
        err.contains("unknown base form 'q4'") && err.contains("f32, bf16 or quantized"),
        "{err}"
    );
    let err = env.fails(&[
        "train",
        "--model",
        "1",
        "--data",
        "tiny",
        "--method",
        "full",
        "--base",
        "quantized",
    ]);
    assert!(
        err.contains("full fine-tuning trains every weight in f32"),
        "{err}"
    );
    assert_eq!(env.json(&["runs", "list", "--json"]), serde_json::json!([]));
    let err = env.fails(&["runs", "show", "7"]);
    assert!(err.contains("no run '7'"), "{err}");
    let err = env.fails(&["adapters", "rm", "nope"]);
    assert!(err.contains("no adapter 'nope'"), "{err}");
}

/// LoRA on the quantized base from the command line: the run trains, records its form and
/// loads as an adapter like any other.
#[test]
fn train_on_a_quantized_base_records_its_form() {
    let env = Env::new();
    env.setup();
    let out = env.ok(&args(&[
        "--steps",
        "2",
        "--name",
        "qbase",
        "--base",
        "quantized",
    ]));
    assert!(out.contains("step 2/2"), "{out}");
    let show = env.ok(&["runs", "show", "qbase"]);
    assert!(show.contains("base:      held as quantized"), "{show}");
    let spec = &env.json(&["runs", "show", "qbase", "--json"])["spec"];
    assert_eq!(spec["base"], "quantized", "{spec}");
    let g = env.json(&[
        "generate",
        "--adapter",
        "qbase",
        "--max-tokens",
        "4",
        "--json",
        "Hello",
    ]);
    assert!(g["text"].as_str().is_some(), "{g}");
}

/// A run exported as a bundle and its result imported back, without Python: the "engine
/// output" is a PEFT adapter Attune trained (exported with `adapters export`), a
/// trainer_state.json and the attune_result.json train_trl.py writes. (scripts/check-bundle.sh
/// runs the real TRL round trip.)
#[test]
fn bundle_export_then_result_import_with_provenance() {
    let env = Env::new();
    env.setup();
    env.ok(&args(&[
        "--steps",
        "1",
        "--name",
        "own",
        "--checkpoint-every",
        "0",
    ]));
    let out = env.ok(&args(&["--steps", "2", "--name", "far", "--create-only"]));
    assert!(out.contains("not trained here"), "{out}");
    let far = env.json(&["runs", "show", "far", "--json"]);
    assert_eq!(far["run"]["status"], "paused");
    assert_eq!(far["run"]["step"], 0);

    let bundle = env.path("bundle");
    let b = bundle.to_str().expect("utf-8");
    let reply = env.json(&[
        "runs", "export", "far", "--engine", "trl", "--out", b, "--json",
    ]);
    let sha = reply["sha256"].as_str().expect("sha").to_string();
    assert_eq!(sha.len(), 64);
    assert_eq!(reply["train_rows"], 6);
    for f in [
        "run.sh",
        "train_trl.py",
        "axolotl.yaml",
        "README.md",
        "data/train.jsonl",
    ] {
        assert!(bundle.join(f).is_file(), "{f} missing");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("bundle.json")).expect("read"))
            .expect("json");
    assert_eq!(manifest["sha256"], sha.as_str());
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bundle.join("attune_run.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(run["hyperparameters"]["lora"]["r"], 4);
    assert_eq!(run["hyperparameters"]["peak_lr"], 1e-3);
    assert_eq!(run["hyperparameters"]["total_steps"], 2);
    // A second export into the same folder is refused; the folder is left alone.
    let err = env.fails(&["runs", "export", "far", "--out", b]);
    assert!(err.contains("is not empty"), "{err}");

    // Nothing to import yet, and a run never exported has no bundle.
    let output = bundle.join("output");
    let o = output.to_str().expect("utf-8");
    let err = env.fails(&["runs", "import-result", "far", o]);
    assert!(err.contains("is not a folder"), "{err}");
    let err = env.fails(&["runs", "import-result", "own", o]);
    assert!(err.contains("was never exported"), "{err}");

    // The engine's output: a PEFT adapter, its log and its provenance.
    env.ok(&[
        "adapters",
        "export",
        "own",
        output.join("adapter").to_str().expect("utf-8"),
    ]);
    let state = serde_json::json!({
        "global_step": 2,
        "log_history": [
            {"step": 1, "loss": 3.25, "learning_rate": 1e-3, "grad_norm": 2.0},
            {"step": 2, "loss": 2.75, "learning_rate": 1e-4, "grad_norm": 1.5},
            {"step": 2, "eval_loss": 2.9},
            {"step": 2, "train_loss": 3.0, "train_runtime": 1.0}
        ]
    });
    std::fs::write(output.join("trainer_state.json"), state.to_string()).expect("write");
    let result = |sha: &str| {
        serde_json::json!({
            "bundle_sha256": sha, "engine": "trl", "engine_version": "trl 1.16.0",
            "kind": "lora", "result_dir": "adapter", "steps": 2
        })
        .to_string()
    };
    std::fs::write(output.join("attune_result.json"), result(&"0".repeat(64))).expect("write");
    let err = env.fails(&["runs", "import-result", "far", o]);
    assert!(err.contains("not one of run 'far''s exports"), "{err}");
    std::fs::write(output.join("attune_result.json"), result(&sha)).expect("write");
    let reply = env.json(&["runs", "import-result", "far", o, "--json"]);
    assert_eq!(reply["adapter"], "far");
    assert_eq!(reply["kind"], "lora");
    assert_eq!(reply["engine_version"], "trl 1.16.0");
    assert_eq!(reply["bundle_sha256"], sha.as_str());
    assert_eq!(
        (
            reply["train_points"].as_u64(),
            reply["eval_points"].as_u64()
        ),
        (Some(2), Some(1))
    );

    // The run is completed with the engine's log as its charts and the adapter linked.
    let far = env.json(&["runs", "show", "far", "--json"]);
    assert_eq!(far["run"]["status"], "completed");
    assert_eq!(far["run"]["step"], 2);
    assert_eq!(far["adapter"], "far");
    let losses: Vec<(u64, String, f64)> = far["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .map(|m| {
            (
                m["step"].as_u64().expect("step"),
                m["kind"].as_str().expect("kind").to_string(),
                m["loss"].as_f64().expect("loss"),
            )
        })
        .collect();
    assert_eq!(
        losses,
        [
            (1, "train".to_string(), 3.25),
            (2, "train".to_string(), 2.75),
            (2, "eval".to_string(), 2.9)
        ]
    );
    let adapters = env.json(&["adapters", "list", "--json"]);
    let a = adapters
        .as_array()
        .expect("list")
        .iter()
        .find(|a| a["name"] == "far")
        .expect("adapter far");
    assert_eq!(a["run_id"], far["run"]["id"]);
    // Once is enough; and the imported adapter evaluates.
    let err = env.fails(&["runs", "import-result", "far", o]);
    assert!(err.contains("already has an adapter"), "{err}");
    let ev = env.json(&["eval", "--adapter", "far", "--data", "tiny", "--json"]);
    assert!(ev["mean_nll"].as_f64().expect("nll").is_finite());
    // Axolotl has no prompt tuning.
    env.ok(&[
        "train",
        "--model",
        "1",
        "--data",
        "tiny",
        "--method",
        "prompt",
        "--steps",
        "1",
        "--name",
        "soft",
        "--create-only",
    ]);
    let err = env.fails(&[
        "runs",
        "export",
        "soft",
        "--engine",
        "axolotl",
        "--out",
        env.path("b2").to_str().expect("utf-8"),
    ]);
    assert!(err.contains("Axolotl does not have"), "{err}");
}

/// `attune train --method dpo|orpo` on a preference JSONL (imported under its file name) and
/// the refusals that name what to do instead.
#[test]
fn train_dpo_from_a_preference_file_prints_rewards() {
    let env = Env::new();
    env.setup();
    let prefs = attune_test_support::test_data("prefs-sample.jsonl");
    let prefs = prefs.to_str().expect("utf-8");
    let dpo = [
        "train",
        "--model",
        "1",
        "--method",
        "dpo",
        "--data",
        prefs,
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--max-len",
        "128",
        "--lora-r",
        "4",
        "--lora-targets",
        "q_proj,v_proj",
        "--forgetting-rows",
        "0",
    ];
    let out = env.run(&dpo);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("preference set 'prefs-sample'") && text.contains("6 pairs"),
        "{text}"
    );
    // Step 1: the adapter starts at zero, so the policy is its reference.
    assert!(
        text.contains("loss 0.6931") && text.contains("margin 0.0000"),
        "{text}"
    );
    // Supervised training on the pairs, DPO on single answers, --arena without dpo.
    let err = env.fails(&["train", "--model", "1", "--data", "prefs-sample"]);
    assert!(err.contains("--method dpo|orpo"), "{err}");
    let err = env.fails(&[
        "train", "--model", "1", "--data", "tiny", "--method", "orpo",
    ]);
    assert!(err.contains("single answers"), "{err}");
    let err = env.fails(&["train", "--model", "1", "--arena", "1"]);
    assert!(err.contains("--method dpo or orpo"), "{err}");
    // A bundle carries supervised fine-tuning only: the DPO run is refused, nothing written.
    let bundle = env.path("dpo-bundle");
    let err = env.fails(&[
        "runs",
        "export",
        "1",
        "--engine",
        "trl",
        "--out",
        bundle.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("preference training"), "{err}");
    assert!(!bundle.exists(), "nothing may be written");
}
