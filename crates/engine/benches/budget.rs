//! The 15-minute budget table (issue 3, proof on real data): PubMedQA on the default model, each
//! method trained with the settings the advisor chooses for a time budget on this machine, then
//! valid NLL and label accuracy beside the base model and a prompt-template baseline.
//!
//! `cargo bench --workspace --bench budget`
//!
//! Environment: `ATTUNE_BUDGET_MINUTES` (default 15), `ATTUNE_BUDGET_METHODS` (default
//! `lora,prompt,full`), `ATTUNE_BUDGET_EVAL_ROWS` (valid rows scored and answered; default all),
//! `ATTUNE_BUDGET_OUT` (a JSON file for the figures; default
//! `models/benches/results/budget-<date>.json` is not written unless set).
//!
//! A fresh library in a temporary folder: the default model, the PubMedQA train split with its own
//! valid split, the advisor asked once with the budget, and each method's preset run for the
//! advisor's `steps_in_budget`. Wall time of each run is printed beside its budget, so a
//! throughput estimate that was off shows.

use std::path::PathBuf;
use std::time::Instant;

use attune_engine::{DatasetRow, Engine, RunControl, Sample};
use attune_protocol::{AdvisorGoal, DomainCount};
use attune_protocol::{
    ChatMessage, EvalOptions, EvalReport, EvalSubject, ImportOptions, PromptTemplate, RunStatus,
    Split, SplitName,
};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The prompt-template baseline: the task said in the system prompt, plus one worked example
/// from the training split (no training).
fn template(train: &[DatasetRow]) -> PromptTemplate {
    let mut examples = Vec::new();
    let first = train.iter().find_map(|r| match (&r.sample, &r.label) {
        (Sample::Chat(messages), Some(_)) => Some(messages),
        _ => None,
    });
    if let Some(messages) = first {
        for m in messages {
            if m.role == "user" || m.role == "assistant" {
                examples.push(ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                });
            }
        }
    }
    PromptTemplate {
        name: "pubmedqa-baseline".into(),
        system: Some(
            "You are a biomedical research assistant. Read the abstract, answer the question \
             in a few sentences, and end with a line 'Final answer: yes', 'Final answer: no' or \
             'Final answer: maybe'."
                .into(),
        ),
        examples,
        user: None,
        values: Default::default(),
    }
}

fn main() -> R<()> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let minutes: f64 = env_or("ATTUNE_BUDGET_MINUTES", 15.0);
    let methods: String = env_or("ATTUNE_BUDGET_METHODS", "lora,prompt,full".to_string());
    let eval_rows: Option<usize> = std::env::var("ATTUNE_BUDGET_EVAL_ROWS")
        .ok()
        .and_then(|v| v.parse().ok());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data = root.join("../shared/data/pubmedqa");
    let model_path = attune_models::default_model_path();
    if !model_path.is_file() {
        return Err(format!(
            "default model missing at {}: run scripts/fetch-model.sh",
            model_path.display()
        )
        .into());
    }
    let dir = tempfile::tempdir()?;
    let engine = Engine::open(dir.path())?;
    let model = engine.add_local_model(&model_path)?.model;
    let ds = engine.import_dataset(
        &data.join("train.jsonl"),
        &ImportOptions {
            name: Some("pubmedqa".into()),
            split: Split::Files {
                valid_path: Some(data.join("valid.jsonl").display().to_string()),
                test_path: None,
            },
            ..ImportOptions::default()
        },
    )?;
    let advice = engine.advise(&AdvisorGoal {
        model_id: model.id,
        dataset_id: Some(ds.id),
        domains: DomainCount::One,
        api_only: false,
        budget_minutes: Some(minutes),
        preference: None,
    })?;
    println!(
        "budget {minutes} min per method on {} ({} threads); advisor recommends {}",
        advice.machine.cpu,
        candle_core::utils::get_num_threads(),
        advice.recommended
    );
    let eval = EvalOptions {
        split: SplitName::Valid,
        limit: eval_rows,
        accuracy: true,
        // PubMedQA's reference answers run to ~150 tokens before their `Final answer:` line.
        max_new_tokens: 192,
        ..EvalOptions::default()
    };
    let mut rows: Vec<(String, String, EvalReport)> = Vec::new();
    let t = Instant::now();
    let base = engine.evaluate(
        &EvalSubject::Base {
            model: model.id.to_string(),
        },
        &ds.id.to_string(),
        &eval,
    )?;
    println!("base evaluated in {:.0} s", t.elapsed().as_secs_f64());
    rows.push(("base model".into(), "-".into(), base));
    let train = engine.dataset_rows(ds.id, SplitName::Train)?;
    let t = Instant::now();
    let tmpl = engine.evaluate(
        &EvalSubject::Template {
            model: model.id.to_string(),
            template: template(&train),
        },
        &ds.id.to_string(),
        &eval,
    )?;
    println!("template evaluated in {:.0} s", t.elapsed().as_secs_f64());
    rows.push(("prompt template (1 example)".into(), "-".into(), tmpl));
    report(&rows)?;

    for method in methods.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let Some(est) = advice.estimates.iter().find(|e| e.method == method) else {
            return Err(format!("the advisor gave no estimate for '{method}'").into());
        };
        let Some(mut spec) = est.spec.clone() else {
            return Err(format!("the advisor has no preset for '{method}'").into());
        };
        if !est.fits {
            println!("{method}: does not fit in memory here; skipped");
            continue;
        }
        let steps = est.steps_in_budget.unwrap_or(0).max(1) as usize;
        spec.steps = Some(steps);
        spec.name = Some(format!("budget-{method}"));
        // The run's own before/after loss on 20 valid rows (the table's figures come from the
        // evaluation below): its full-split passes would take minutes out of the budget.
        spec.eval_limit = Some(20);
        let run = engine.create_run(&spec)?;
        let t = Instant::now();
        let done = engine.execute_run(run.id, &mut |_| {}, &RunControl::new())?;
        let wall = t.elapsed().as_secs_f64();
        if done.status != RunStatus::Completed {
            return Err(format!("{method} run ended {:?}: {:?}", done.status, done.error).into());
        }
        let detail = engine.run_detail(&run.id.to_string())?;
        let Some(adapter) = detail.adapter else {
            return Err(format!("{method} run completed without an adapter").into());
        };
        let settings = format!(
            "{} steps (advisor: {:.0} tok/s, {}), batch {} x accum {}, lr {}, trained in {:.1} min",
            steps,
            est.tokens_per_s,
            est.throughput_source,
            spec.batch_size,
            spec.grad_accum,
            spec.lr.map_or("default".into(), |l| format!("{l:e}")),
            wall / 60.0
        );
        println!("{method}: {settings}");
        let scored =
            engine.evaluate(&EvalSubject::Adapter { adapter }, &ds.id.to_string(), &eval)?;
        rows.push((
            attune_protocol::method_label(&spec.method),
            settings,
            scored,
        ));
        report(&rows)?;
    }
    Ok(())
}

/// Prints the table so far and writes the JSON figures (`ATTUNE_BUDGET_OUT`), so a long run that
/// is stopped part way keeps what it finished.
fn report(rows: &[(String, String, EvalReport)]) -> R<()> {
    println!();
    println!("| model | valid NLL | drop vs base | label accuracy | settings |");
    println!("|---|---|---|---|---|");
    let base_nll = rows.first().map_or(f64::NAN, |r| r.2.mean_nll);
    for (name, settings, r) in rows {
        println!(
            "| {name} | {:.4} | {} | {} | {settings} |",
            r.mean_nll,
            if name == "base model" {
                "-".to_string()
            } else {
                format!("{:.2}%", 100.0 * (base_nll - r.mean_nll) / base_nll)
            },
            r.accuracy.map_or("-".into(), |a| format!(
                "{:.1}% of {}",
                100.0 * a,
                r.n_labeled
            )),
        );
    }
    if let Ok(out) = std::env::var("ATTUNE_BUDGET_OUT") {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, settings, r)| {
                serde_json::json!({
                    "model": name, "settings": settings, "mean_nll": r.mean_nll,
                    "accuracy": r.accuracy, "n_labeled": r.n_labeled, "n_tokens": r.n_tokens,
                })
            })
            .collect();
        std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
        println!("figures written to {out}");
    }
    Ok(())
}
