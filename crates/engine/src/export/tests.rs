//! Export tests on the real default model and the reference PEFT LoRA adapter
//! (`../shared/reference/adapters/lora`, r=8, trained 20 steps by PEFT).

use attune_test_support::default_model;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use attune_protocol::{ExportFormat, ExportQuant, ExportRequest, ExportSubject};

use crate::Engine;

fn reference_lora() -> PathBuf {
    attune_test_support::shared("reference/adapters/lora")
}

/// An engine with the default model and the reference LoRA adapter "ref-lora".
fn engine_with_lora() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(&dir.path().join("data")).expect("open engine");
    let m = engine.add_local_model(&default_model()).expect("add model");
    engine
        .import_adapter(&reference_lora(), &m.model.id.to_string(), Some("ref-lora"))
        .expect("import the reference LoRA");
    (dir, engine)
}

fn request(
    subject: ExportSubject,
    format: ExportFormat,
    quant: Option<ExportQuant>,
    dest: &Path,
) -> ExportRequest {
    ExportRequest {
        subject,
        format,
        quant,
        dest: dest.to_string_lossy().into_owned(),
        ..Default::default()
    }
}

fn adapter() -> ExportSubject {
    ExportSubject::Adapter {
        adapter: "ref-lora".into(),
    }
}

fn run(
    engine: &Engine,
    req: &ExportRequest,
) -> Result<attune_protocol::ExportRecord, crate::EngineError> {
    let cancel = AtomicBool::new(false);
    engine.export(req, &mut |_| {}, &cancel)
}

/// The Python the export checks run in (`scripts/setup-pycheck.sh`, run by `scripts/setup.sh`):
/// `$ATTUNE_PYTHON`, else the harness environment in `~/.cache/attune-harness/venv`.
fn check_python() -> PathBuf {
    if let Some(p) = std::env::var_os("ATTUNE_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let py = home.join(".cache/attune-harness/venv/bin/python");
    assert!(
        py.is_file(),
        "the Python of the export checks is missing at {}: run scripts/setup.sh (or \
         scripts/setup-pycheck.sh), or set ATTUNE_PYTHON",
        py.display()
    );
    py
}

/// Runs `scripts/check_exports.py` (PyPI's gguf and transformers) on exported files, with
/// what Attune expects of them; fails with its output when a check fails.
fn python_check(rec: &attune_protocol::ExportRecord, args: &[(&str, PathBuf)]) {
    let (content, _) = attune_models::inspect::read_gguf_header(&default_model()).expect("header");
    let cfg = attune_models::gguf::config_from_content(&content, &default_model()).expect("config");
    let template = content.metadata["tokenizer.chat_template"]
        .to_string()
        .expect("template")
        .clone();
    let prompts: Vec<serde_json::Value> = crate::check_prompts()
        .iter()
        .zip(&rec.verification.reference)
        .map(|(m, r)| {
            serde_json::json!({
                "messages": m,
                "text": r.text,
                "prompt_ids": r.prompt_ids,
                "answer_ids": r.answer_ids,
            })
        })
        .collect();
    let expect = serde_json::json!({
        "template": template,
        "eos_ids": cfg.eos_token_ids,
        "vocab_size": cfg.vocab_size,
        "n_layers": cfg.num_hidden_layers,
        "prompts": prompts,
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let expect_path = dir.path().join("expect.json");
    std::fs::write(&expect_path, expect.to_string()).expect("write expect.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_exports.py");
    let mut cmd = std::process::Command::new(check_python());
    cmd.arg(&script).arg("--expect").arg(&expect_path);
    for (flag, path) in args {
        cmd.arg(flag).arg(path);
    }
    let out = cmd.output().expect("run check_exports.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "check_exports.py failed:\n{text}");
}

fn files_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_passed(rec: &attune_protocol::ExportRecord) {
    assert!(
        rec.verification.passed,
        "{}: {:#?}",
        rec.verification.summary, rec.verification.checks
    );
}

#[test]
fn gguf_f16_of_an_adapter_verifies_is_recorded_and_reimports() {
    let (dir, engine) = engine_with_lora();
    let dest = dir.path().join("gguf");
    let mut stages = Vec::new();
    let cancel = AtomicBool::new(false);
    let rec = engine
        .export(
            &request(adapter(), ExportFormat::Gguf, None, &dest),
            &mut |p| stages.push(p.stage),
            &cancel,
        )
        .expect("export");
    assert_passed(&rec);
    assert_eq!(rec.quant, ExportQuant::F16, "gguf defaults to f16");
    let greedy = rec
        .verification
        .checks
        .iter()
        .find(|c| c.name == "greedy tokens")
        .expect("greedy check");
    assert!(
        greedy.passed && !greedy.detail.contains("reported"),
        "{}",
        greedy.detail
    );
    assert_eq!(files_of(&dest), vec!["ref-lora-f16.gguf".to_string()]);
    assert_eq!(
        rec.files[0].bytes,
        std::fs::metadata(dest.join("ref-lora-f16.gguf"))
            .expect("stat")
            .len()
    );
    for s in [
        "loading the model",
        "answering the check prompts",
        "writing tensors",
        "comparing with the app's model",
    ] {
        assert!(
            stages.iter().any(|x| x == s),
            "no '{s}' progress in {stages:?}"
        );
    }
    assert_eq!(rec.verification.reference.len(), 5);
    python_check(&rec, &[("--gguf", dest.join("ref-lora-f16.gguf"))]);
    let listed = engine.list_exports().expect("list");
    assert_eq!(listed, vec![rec.clone()]);
    // The exported GGUF re-imports as a model and answers as the adapter does.
    let added = engine
        .add_local_model(&dest.join("ref-lora-f16.gguf"))
        .expect("re-import");
    assert_eq!(added.model.quantization, "F16");
    assert_eq!(added.model.name, "ref-lora-f16");
    assert_eq!(added.model.architecture, "llama");
    // An export of the same subject into the same (now non-empty) folder is refused...
    let err = run(
        &engine,
        &request(adapter(), ExportFormat::Gguf, None, &dest),
    )
    .expect_err("not empty");
    assert!(
        matches!(err, crate::EngineError::DestinationNotEmpty { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("ref-lora-f16.gguf"), "{err}");
    // ...unless replacing is allowed; a file of another name stays.
    std::fs::write(dest.join("notes.txt"), "mine").expect("write");
    let mut req = request(
        adapter(),
        ExportFormat::Gguf,
        Some(ExportQuant::Q8_0),
        &dest,
    );
    req.overwrite = true;
    let rec2 = run(&engine, &req).expect("export q8_0");
    assert_passed(&rec2);
    assert_eq!(
        files_of(&dest),
        vec![
            "notes.txt".to_string(),
            "ref-lora-f16.gguf".to_string(),
            "ref-lora-q8_0.gguf".to_string()
        ]
    );
}

#[test]
fn lora_gguf_and_ollama_adapter_form_verify_and_the_modelfile_imports() {
    let (dir, engine) = engine_with_lora();
    let dest = dir.path().join("lora");
    let rec = run(
        &engine,
        &request(adapter(), ExportFormat::GgufLora, None, &dest),
    )
    .expect("export");
    assert_passed(&rec);
    assert_eq!(rec.quant, ExportQuant::F32);
    assert_eq!(files_of(&dest), vec!["ref-lora-lora.gguf".to_string()]);
    // The adapter GGUF carries llama.cpp's adapter keys.
    let (c, _) =
        attune_models::inspect::read_gguf_header(&dest.join("ref-lora-lora.gguf")).expect("header");
    assert_eq!(
        c.metadata["general.type"].to_string().expect("s"),
        "adapter"
    );
    assert_eq!(c.metadata["adapter.type"].to_string().expect("s"), "lora");
    assert_eq!(c.metadata["adapter.lora.alpha"].to_f32().expect("f"), 16.0);
    assert!(c.tensor_infos.contains_key("blk.0.attn_q.weight.lora_a"));
    assert!(c.tensor_infos.contains_key("blk.29.ffn_down.weight.lora_b"));
    python_check(&rec, &[("--lora", dest.join("ref-lora-lora.gguf"))]);

    // Ollama, the LoRA kept as ADAPTER over the base GGUF.
    let odest = dir.path().join("ollama");
    let mut req = request(
        adapter(),
        ExportFormat::Ollama,
        Some(ExportQuant::F16),
        &odest,
    );
    req.ollama_adapter = true;
    let rec = run(&engine, &req).expect("export ollama");
    assert_passed(&rec);
    let base_file = format!(
        "{}-f16.gguf",
        super::stem(&engine.list_models().expect("models")[0].name)
    );
    assert_eq!(
        files_of(&odest),
        vec![
            "Modelfile".to_string(),
            base_file.clone(),
            "ref-lora-lora.gguf".to_string()
        ]
    );
    let mf = std::fs::read_to_string(odest.join("Modelfile")).expect("Modelfile");
    assert!(
        mf.contains(&format!(
            "FROM ./{base_file}\nADAPTER ./ref-lora-lora.gguf\nTEMPLATE \"\"\""
        )),
        "{mf}"
    );
    assert!(mf.contains("PARAMETER stop <|im_end|>\n"), "{mf}");
    assert!(mf.contains("PARAMETER temperature 0.7\n"), "{mf}");
    for name in ["Modelfile syntax", "TEMPLATE", "stop"] {
        assert!(
            rec.verification
                .checks
                .iter()
                .any(|c| c.name == name && c.passed),
            "{name}: {:#?}",
            rec.verification.checks
        );
    }
    // Import in a fresh library: FROM becomes a model, ADAPTER an adapter, TEMPLATE is compared.
    let other = tempfile::tempdir().expect("tempdir");
    let engine2 = Engine::open(other.path()).expect("open");
    let imported = engine2
        .import_modelfile(&odest.join("Modelfile"), Some("from-ollama"))
        .expect("import Modelfile");
    assert_eq!(imported.model.model.quantization, "F16");
    let a = imported.adapter.expect("adapter imported");
    assert_eq!(a.name, "from-ollama");
    assert_eq!(
        imported.template_note.as_deref(),
        Some("TEMPLATE renders the same text as the model's own chat template")
    );
    assert!(imported
        .parameters
        .iter()
        .any(|(k, v)| k == "stop" && v == "<|im_end|>"));
    // The imported adapter is the same LoRA over the F16 base: its adapter GGUF verifies.
    let again = run(
        &engine2,
        &request(
            ExportSubject::Adapter {
                adapter: "from-ollama".into(),
            },
            ExportFormat::GgufLora,
            None,
            &other.path().join("again"),
        ),
    )
    .expect("re-export");
    assert_passed(&again);
}

#[test]
fn hf_folder_is_complete_verified_and_reimports() {
    let (dir, engine) = engine_with_lora();
    let dest = dir.path().join("hf");
    let rec = run(&engine, &request(adapter(), ExportFormat::Hf, None, &dest)).expect("export");
    assert_passed(&rec);
    for f in [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dest.join(f).is_file(), "{f} missing: {:?}", files_of(&dest));
    }
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dest.join("tokenizer_config.json")).expect("read"),
    )
    .expect("json");
    assert!(tc["chat_template"]
        .as_str()
        .expect("template")
        .contains("<|im_start|>"));
    let gc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dest.join("generation_config.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(gc["eos_token_id"], serde_json::json!([2]));
    let card = std::fs::read_to_string(dest.join("README.md")).expect("card");
    for want in [
        "base_model:",
        "LoRA, merged into the base weights",
        "| LoRA r | 8 |",
        &format!("Attune {}", super::ATTUNE_VERSION),
        "## Export check",
        ": passed",
    ] {
        assert!(card.contains(want), "model card lacks '{want}':\n{card}");
    }
    // transformers loads it; its template renders Attune's text; greedy reads Attune's answers.
    python_check(&rec, &[("--hf", dest.clone())]);
    let added = engine.add_local_model(&dest).expect("re-import the folder");
    assert_eq!(
        added.model.format,
        attune_protocol::ModelFormat::Safetensors
    );
    // HF folders are written in f32.
    let err = run(
        &engine,
        &request(
            adapter(),
            ExportFormat::Hf,
            Some(ExportQuant::Q8_0),
            &dir.path().join("x"),
        ),
    )
    .expect_err("hf q8_0");
    assert!(err.to_string().contains("written in f32"), "{err}");
}

#[test]
fn formats_that_cannot_carry_a_subject_are_refused_before_any_work() {
    let (dir, engine) = engine_with_lora();
    let prompt = attune_test_support::shared("reference/adapters/prompt");
    engine
        .import_adapter(&prompt, "1", Some("soft"))
        .expect("import the prompt adapter");
    let dest = dir.path().join("never");
    for f in [
        ExportFormat::Gguf,
        ExportFormat::GgufLora,
        ExportFormat::Ollama,
        ExportFormat::Hf,
    ] {
        let err = run(
            &engine,
            &request(
                ExportSubject::Adapter {
                    adapter: "soft".into(),
                },
                f,
                None,
                &dest,
            ),
        )
        .expect_err("soft prompt");
        assert_eq!(err.code(), "export_unsupported", "{err}");
        assert!(
            err.to_string().contains("only PEFT's format carries it"),
            "{err}"
        );
    }
    let err = run(
        &engine,
        &request(
            ExportSubject::Model { model: "1".into() },
            ExportFormat::GgufLora,
            None,
            &dest,
        ),
    )
    .expect_err("model as lora");
    assert!(err.to_string().contains("not a LoRA adapter"), "{err}");
    let mut req = request(
        ExportSubject::Model { model: "1".into() },
        ExportFormat::Gguf,
        None,
        &dest,
    );
    req.ollama_adapter = true;
    assert!(run(&engine, &req).is_err());
    // A destination that is a file.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    let err = run(
        &engine,
        &request(adapter(), ExportFormat::Gguf, None, &file),
    )
    .expect_err("file");
    assert!(err.to_string().contains("is a file"), "{err}");
    assert!(!dest.exists(), "nothing was created");
    assert!(engine.list_exports().expect("list").is_empty());
    // The dialog's options say the same.
    let o = engine
        .export_options(&ExportSubject::Adapter {
            adapter: "soft".into(),
        })
        .expect("options");
    assert!(o.formats.iter().all(|f| f.unavailable.is_some()));
    let o = engine.export_options(&adapter()).expect("options");
    let gguf = o
        .formats
        .iter()
        .find(|f| f.format == ExportFormat::Gguf)
        .expect("gguf");
    assert!(gguf.unavailable.is_none());
    let size = |q: ExportQuant| {
        gguf.sizes
            .iter()
            .find(|(x, _)| *x == q)
            .map(|(_, b)| *b)
            .expect("size")
    };
    assert!(
        size(ExportQuant::Q4KM) < size(ExportQuant::Q8_0)
            && size(ExportQuant::Q8_0) < size(ExportQuant::F16)
    );
}

#[test]
fn cancel_leaves_no_file_and_no_record() {
    let (dir, engine) = engine_with_lora();
    let dest = dir.path().join("cancelled");
    for existing in [false, true] {
        if existing {
            std::fs::create_dir(&dest).expect("mkdir");
        }
        let cancel = AtomicBool::new(false);
        let err = engine
            .export(
                &request(
                    adapter(),
                    ExportFormat::Gguf,
                    Some(ExportQuant::Q4KM),
                    &dest,
                ),
                &mut |p| {
                    if p.stage == "writing tensors" && p.done >= 50 {
                        cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                },
                &cancel,
            )
            .expect_err("cancelled");
        assert!(matches!(err, crate::EngineError::Cancelled), "{err}");
        if existing {
            // The folder was there before: it stays, with nothing in it.
            assert!(files_of(&dest).is_empty(), "{:?}", files_of(&dest));
        } else {
            assert!(!dest.exists(), "the destination it created is gone");
        }
    }
    assert!(engine.list_exports().expect("list").is_empty());
}

#[test]
fn q4_k_m_for_ollama_verifies_within_its_bound() {
    let (dir, engine) = engine_with_lora();
    let dest = dir.path().join("q4");
    let rec = run(
        &engine,
        &request(
            adapter(),
            ExportFormat::Ollama,
            Some(ExportQuant::Q4KM),
            &dest,
        ),
    )
    .expect("export");
    assert_passed(&rec);
    assert_eq!(
        files_of(&dest),
        vec!["Modelfile".to_string(), "ref-lora-q4_k_m.gguf".to_string()]
    );
    let (c, _) = attune_models::inspect::read_gguf_header(&dest.join("ref-lora-q4_k_m.gguf"))
        .expect("header");
    assert_eq!(c.metadata["general.file_type"].to_u32().expect("u32"), 15);
    assert_eq!(
        c.tensor_infos["blk.0.ffn_down.weight"].ggml_dtype,
        candle_core::quantized::GgmlDType::Q6K
    );
    assert!(
        rec.verification.tolerance.contains("mean NLL within 5%"),
        "{}",
        rec.verification.tolerance
    );
}
