//! Advisor tests: the recommendation rules as pure functions, the benchmark scaling,
//! /proc/cpuinfo parsing, and the calibration on a real library in a temporary
//! directory (the real default model, a tiny dataset, a completed run's metrics).

use attune_test_support::default_model;
use std::path::Path;

use attune_protocol::{
    AdvisorGoal, BaseFormSpec, DomainCount, ImportOptions, MethodSpec, RunSpec, Split,
};

use super::*;
use crate::store::MetricRow;

fn facts(rows: Option<u64>) -> Facts {
    Facts {
        api_only: false,
        train_rows: rows,
        domains: DomainCount::One,
        available_mb: Some(16_000),
        full_mb: 5_000,
        lora_mb: 3_000,
        prompt_mb: 2_500,
        template_mb: 700,
    }
}

#[test]
fn advisor_rules_pick_the_method_a_clinician_would_be_told() {
    // API only: nothing but a template.
    let f = Facts {
        api_only: true,
        ..facts(Some(10_000))
    };
    assert_eq!(recommend(&f).0, "template");
    // No dataset, or too few rows: a template with a few examples.
    assert_eq!(recommend(&facts(None)).0, "template");
    let (m, reasons) = recommend(&facts(Some(20)));
    assert_eq!(m, "template");
    assert!(
        reasons[0].contains("only 20 training examples"),
        "{reasons:?}"
    );
    // Large data, one domain, ample memory: full.
    assert_eq!(recommend(&facts(Some(5_000))).0, "full");
    // Large data but full is too close to the memory: LoRA.
    let f = Facts {
        available_mb: Some(6_000),
        ..facts(Some(5_000))
    };
    let (m, reasons) = recommend(&f);
    assert_eq!(m, "lora");
    assert!(
        reasons.iter().any(|r| r.contains("too close")),
        "{reasons:?}"
    );
    // Medium data: LoRA.
    assert_eq!(recommend(&facts(Some(500))).0, "lora");
    // Several domains: LoRA, or a soft prompt when memory is tight.
    let f = Facts {
        domains: DomainCount::Several,
        ..facts(Some(5_000))
    };
    assert_eq!(recommend(&f).0, "lora");
    let f = Facts {
        domains: DomainCount::Several,
        available_mb: Some(3_200),
        ..facts(Some(5_000))
    };
    assert_eq!(recommend(&f).0, "prompt");
    // Only the soft prompt fits.
    let f = Facts {
        available_mb: Some(2_600),
        ..facts(Some(500))
    };
    assert_eq!(recommend(&f).0, "prompt");
    // Nothing trains: a template, and the reason says how much was needed.
    let f = Facts {
        available_mb: Some(1_000),
        ..facts(Some(500))
    };
    let (m, reasons) = recommend(&f);
    assert_eq!(m, "template");
    assert!(reasons[0].contains("2500 MB"), "{reasons:?}");
    // Unknown memory: everything is taken to fit.
    let f = Facts {
        available_mb: None,
        ..facts(Some(5_000))
    };
    assert_eq!(recommend(&f).0, "full");
}

#[test]
fn advisor_benchmark_scales_with_model_size_and_threads() {
    // The figure this CPU gets: bf16 products with AMX; without, int8 products where the CPU
    // has VNNI, else f32.
    let products = Products::here("lora");
    assert_eq!(
        products == Products::Amx,
        attune_models::kernels::amx::available()
    );
    let at = |m, p| benchmark_tokens_per_s_on(m, p);
    let (lora, full, prompt) = (
        at("lora", products),
        at("full", Products::here("full")),
        at("prompt", Products::here("prompt")),
    );
    assert_eq!(benchmark_tokens_per_s("lora"), lora);
    // The matrix units make every method faster than f32: the frozen-base methods by more than
    // a fifth, full fine-tuning (whose weights are packed every step) least; int8 products
    // speed every method up too, full fine-tuning (quantized every step) by more than a fifth.
    let gain = |m, p| at(m, p) / at(m, Products::F32);
    for m in ["lora", "prompt"] {
        assert!(
            gain(m, Products::Amx) > 1.2,
            "{m}: {}",
            gain(m, Products::Amx)
        );
        assert!(
            gain(m, Products::Int8) > 1.2,
            "{m}: {}",
            gain(m, Products::Int8)
        );
    }
    assert!(gain("full", Products::Amx) > 1.0);
    assert!(gain("full", Products::Int8) > 1.2);
    assert!(gain("full", Products::Amx) < gain("lora", Products::Amx));
    let base = benchmark_throughput("lora", BENCH_PARAMS as u64, 2);
    assert!((base - lora).abs() < 1e-9);
    assert!((benchmark_throughput("full", BENCH_PARAMS as u64, 2) - full).abs() < 1e-9);
    assert!((benchmark_throughput("prompt", BENCH_PARAMS as u64, 4) - 2.0 * prompt).abs() < 1e-9);
    let big = benchmark_throughput("lora", 10 * BENCH_PARAMS as u64, 2);
    assert!((big - lora / 10.0).abs() < 1e-9);
    assert!(benchmark_throughput("lora", 0, 0).is_finite());
}

#[test]
fn advisor_reads_cpuinfo_and_the_machine() {
    let text = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n\
                flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni\n";
    let (cpu, simd) = parse_cpuinfo(text);
    assert_eq!(cpu.as_deref(), Some("Intel(R) Xeon(R) Platinum 8488C"));
    assert_eq!(
        simd,
        [
            "sse4_2",
            "avx",
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512_vnni"
        ]
    );
    let m = machine_info();
    assert!(m.threads >= 1);
    assert!(m.memory_total_mb >= m.memory_available_mb);
    assert!(m.gpu.is_none());
    assert!(!m.os.is_empty() && !m.cpu.is_empty());
    assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    assert_eq!(median(vec![f64::NAN]), None);
    assert_eq!(preset_max_len(10, 8192), 64);
    assert_eq!(preset_max_len(300, 8192), 320);
    assert_eq!(preset_max_len(5000, 8192), 1024);
    assert_eq!(preset_max_len(5000, 512), 512);
}

/// A library with the real model and a chat dataset of `n` rows (all train).
fn library(dir: &Path, n: usize) -> (Engine, i64, i64) {
    let e = Engine::open(&dir.join("data")).expect("open engine");
    let model = e
        .add_local_model(&default_model())
        .expect("add model")
        .model;
    let text: String = (0..n)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Question {i}: is the sky blue?")},
                {"role": "assistant", "content": format!("Yes, answer {i}.")},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    let path = dir.join("qa.jsonl");
    std::fs::write(&path, text).expect("write dataset");
    let ds = e
        .import_dataset(
            &path,
            &ImportOptions {
                split: Split::AllTrain,
                ..Default::default()
            },
        )
        .expect("import");
    (e, model.id, ds.id)
}

#[test]
fn advisor_calibrates_throughput_from_a_completed_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, model, ds) = library(dir.path(), 60);
    let goal = AdvisorGoal {
        model_id: model,
        dataset_id: Some(ds),
        budget_minutes: Some(10.0),
        ..Default::default()
    };
    let before = e.advise(&goal).expect("advise");
    assert_eq!(before.estimates.len(), 4);
    let lora = |a: &Advice| {
        a.estimates
            .iter()
            .find(|x| x.method == "lora")
            .cloned()
            .expect("lora estimate")
    };
    let l = lora(&before);
    assert_eq!(l.throughput_source, "benchmark");
    assert!(l.tokens_per_epoch > 0 && l.seconds_per_epoch > 0.0, "{l:?}");
    assert!(l.steps_in_budget.is_some_and(|s| s > 0), "{l:?}");
    let spec = l.spec.clone().expect("preset");
    assert_eq!(spec.batch_size, 4);
    assert_eq!(spec.lr, Some(2e-4));
    assert!(spec.max_len <= 1024 && spec.max_len >= 64);
    assert!(matches!(spec.method, MethodSpec::Lora { r: 16, .. }));
    let template = before
        .estimates
        .iter()
        .find(|x| x.method == "template")
        .expect("template estimate");
    assert_eq!(template.throughput_source, "none");
    assert!(template.spec.is_none());
    // 60 rows, one domain: LoRA if it fits here.
    if l.fits {
        assert_eq!(before.recommended, "lora", "{:?}", before.reasons);
    }

    // A completed LoRA run with three measured steps.
    let run = e
        .create_run(&RunSpec {
            name: Some("measured".into()),
            model: model.to_string(),
            dataset: ds.to_string(),
            max_len: 64,
            batch_size: 1,
            steps: Some(3),
            ..Default::default()
        })
        .expect("create run");
    for (step, tps) in [(1, 100.0), (2, 300.0), (3, 250.0)] {
        e.store
            .record_metric(
                run.id,
                &MetricRow {
                    step,
                    kind: "train".into(),
                    loss: 1.0,
                    lr: Some(1e-4),
                    grad_norm: Some(1.0),
                    tokens_per_s: Some(tps),
                    memory_mb: None,
                    at: crate::clock::now_rfc3339(),
                    pref: None,
                },
            )
            .expect("record metric");
    }
    // Not completed yet: not a measurement.
    assert_eq!(e.measured_throughput(model, "lora").expect("measure"), None);
    e.store
        .finish_run(run.id, "completed", None, &crate::clock::now_rfc3339())
        .expect("complete");
    assert_eq!(
        e.measured_throughput(model, "lora").expect("measure"),
        Some(250.0)
    );
    let after = e.advise(&goal).expect("advise again");
    let l = lora(&after);
    assert_eq!(l.throughput_source, "measured");
    assert_eq!(l.tokens_per_s, 250.0);
    let full = after
        .estimates
        .iter()
        .find(|x| x.method == "full")
        .expect("full estimate");
    assert_eq!(full.throughput_source, "benchmark");

    // check_run uses the same figures.
    let check = e
        .check_run(&RunSpec {
            model: model.to_string(),
            dataset: ds.to_string(),
            batch_size: 4,
            max_len: 128,
            ..Default::default()
        })
        .expect("check");
    assert_eq!(check.total_steps, 15);
    assert_eq!(check.tokens_per_s, 250.0);
    assert!(check.estimated_seconds > 0.0);
    assert_eq!(check.fits, check.suggestion.is_none());
    assert_eq!(check.fits, check.gpu_offer.is_none());
    // A bad spec is refused naming the field.
    let err = e
        .check_run(&RunSpec {
            model: model.to_string(),
            dataset: ds.to_string(),
            batch_size: 0,
            ..Default::default()
        })
        .expect_err("batch 0");
    assert!(err.to_string().contains("batch_size"), "{err}");
}

#[test]
fn advisor_without_a_dataset_or_with_few_rows_recommends_a_template() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, model, ds) = library(dir.path(), 12);
    let a = e
        .advise(&AdvisorGoal {
            model_id: model,
            ..Default::default()
        })
        .expect("advise");
    assert_eq!(a.recommended, "template");
    assert!(a.estimates.iter().all(|x| x.tokens_per_epoch == 0));
    let a = e
        .advise(&AdvisorGoal {
            model_id: model,
            dataset_id: Some(ds),
            ..Default::default()
        })
        .expect("advise");
    assert_eq!(a.recommended, "template");
    assert!(
        a.reasons[0].contains("12 training examples"),
        "{:?}",
        a.reasons
    );
    let err = e
        .advise(&AdvisorGoal {
            model_id: 999,
            ..Default::default()
        })
        .expect_err("unknown model");
    assert_eq!(err.code(), "not_found");
}

#[test]
fn check_run_and_create_run_plan_a_packed_run_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, model, ds) = library(dir.path(), 60);
    let spec = RunSpec {
        model: model.to_string(),
        dataset: ds.to_string(),
        batch_size: 2,
        max_len: 64,
        pack: true,
        steps: None,
        ..Default::default()
    };
    let check = e.check_run(&spec).expect("check");
    let run = e.create_run(&spec).expect("create");
    assert_eq!(
        check.total_steps, run.total_steps,
        "one plan, one step count"
    );
    // Packing makes fewer examples than the 60 rows (each row is far below 64 tokens), so
    // counting rows (as check_run once did) would give 30 steps.
    assert!(check.total_steps < 30, "{}", check.total_steps);
    let unpacked = RunSpec {
        pack: false,
        name: Some("rows".into()),
        ..spec
    };
    assert_eq!(e.check_run(&unpacked).expect("check").total_steps, 30);
    assert_eq!(e.create_run(&unpacked).expect("create").total_steps, 30);
}

#[test]
fn a_run_too_big_for_this_machine_is_offered_a_gpu_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, model, ds) = library(dir.path(), 40);
    // Full fine-tuning of 4096 rows of 8192 tokens fits no desktop.
    let check = e
        .check_run(&RunSpec {
            model: model.to_string(),
            dataset: ds.to_string(),
            method: MethodSpec::Full,
            batch_size: 4096,
            max_len: 8192,
            ..Default::default()
        })
        .expect("check");
    assert!(!check.fits);
    let offer = check.gpu_offer.expect("a GPU offer");
    assert!(offer.reason.contains("more than the"), "{}", offer.reason);
    assert!(offer.how.contains("attune runs export"), "{}", offer.how);
    let need = |m: &str, g: u64| {
        offer
            .needs
            .iter()
            .find(|n| n.method == m && n.gpus == g)
            .unwrap_or_else(|| panic!("no need for {m} on {g}"))
            .memory_mb
    };
    for m in ["full", "lora", "prompt"] {
        assert!(
            need(m, 8) < need(m, 1),
            "{m}: ZeRO-3 over 8 GPUs needs less per GPU"
        );
    }
    assert!(need("full", 1) > need("lora", 1));
    // The default model at a desktop's shape: full fine-tuning of 4 x 1024 is a few GiB.
    let cfg = e
        .model_shape(&e.find_model(&model.to_string()).expect("model"))
        .expect("shape");
    let small = crate::bundle::gpu_memory_estimate(&cfg, &MethodSpec::Full, 4, 1024, 1);
    assert!(
        (2u64 << 30..12u64 << 30).contains(&small),
        "full 4 x 1024 on SmolLM2-135M: {} MiB",
        small >> 20
    );
}

#[test]
fn lora_and_prompt_are_offered_each_base_form_and_a_run_keeps_its_form() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, model, ds) = library(dir.path(), 40);
    let advice = e
        .advise(&AdvisorGoal {
            model_id: model,
            dataset_id: Some(ds),
            ..Default::default()
        })
        .expect("advise");
    for m in ["lora", "prompt"] {
        let est = advice.estimates.iter().find(|x| x.method == m).expect(m);
        let forms: Vec<BaseFormSpec> = est.base_forms.iter().map(|f| f.form).collect();
        assert_eq!(
            forms,
            BaseFormSpec::ALL,
            "{m}: a GGUF model offers every form"
        );
        let mb = |f: BaseFormSpec| {
            est.base_forms
                .iter()
                .find(|x| x.form == f)
                .map(|x| x.peak_memory_mb)
                .expect("form")
        };
        assert!(
            mb(BaseFormSpec::Quantized) < mb(BaseFormSpec::Bf16)
                && mb(BaseFormSpec::Bf16) < mb(BaseFormSpec::F32),
            "{m}: {:?}",
            est.base_forms
        );
        // The default model fits in f32 here: the preset leaves the form to the engine and
        // its estimate is the f32 one.
        let spec = est.spec.clone().expect("preset");
        assert_eq!(spec.base, None);
        assert_eq!(est.peak_memory_mb, mb(BaseFormSpec::F32));
        assert!(est.summary.contains("quantized blocks"), "{}", est.summary);
    }
    let full = advice
        .estimates
        .iter()
        .find(|x| x.method == "full")
        .expect("full");
    assert!(full.base_forms.is_empty());

    // A run left to the engine stores the form it took; one that names a form keeps it.
    let spec = |name: &str, base| RunSpec {
        name: Some(name.into()),
        model: model.to_string(),
        dataset: ds.to_string(),
        batch_size: 2,
        max_len: 64,
        steps: Some(1),
        base,
        ..Default::default()
    };
    let stored = |name: &str| -> RunSpec {
        let row = e.store.find_run_by_name(name).expect("store").expect("run");
        serde_json::from_str(&row.config_json).expect("spec")
    };
    let auto = e.check_run(&spec("auto", None)).expect("check");
    assert_eq!(auto.base, BaseFormSpec::F32);
    e.create_run(&spec("auto", None)).expect("create");
    assert_eq!(stored("auto").base, Some(BaseFormSpec::F32));
    let q = e
        .check_run(&spec("q", Some(BaseFormSpec::Quantized)))
        .expect("check");
    assert_eq!(q.base, BaseFormSpec::Quantized);
    assert!(q.peak_memory_mb < auto.peak_memory_mb, "{q:?} vs {auto:?}");
    e.create_run(&spec("q", Some(BaseFormSpec::Quantized)))
        .expect("create");
    assert_eq!(stored("q").base, Some(BaseFormSpec::Quantized));
    // Full fine-tuning trains f32 weights: a compact base is refused, in words.
    let err = e
        .check_run(&RunSpec {
            method: MethodSpec::Full,
            ..spec("full", Some(BaseFormSpec::Quantized))
        })
        .expect_err("full on a quantized base");
    assert!(
        err.to_string()
            .contains("full fine-tuning trains every weight in f32"),
        "{err}"
    );
}
