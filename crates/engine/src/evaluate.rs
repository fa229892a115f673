//! Evaluation: mean NLL and perplexity over a split's target tokens (one row at a time,
//! no padding, as the PyTorch reference evaluates), label accuracy from a greedy answer's
//! `Final answer: yes|no|maybe`, and the forgetting check on the built-in general-domain
//! sample. Subjects: a model as it is, an adapter on its base, or a model behind a
//! prompt template (system prompt + few-shot turns before every row, each user turn
//! wrapped by the template's `user` text with its `values` filled in; only the row's
//! own turns are scored). Progress streams through [`Engine::evaluate_with`], which a
//! flag cancels between rows.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use attune_models::chat_template::ChatTemplate;
use attune_models::generate::{self, GenerateParams};
use attune_models::llama::Llama;
use attune_models::loader::{ComputeMode, LoadOptions, LoadedModel};
use attune_models::tokenizer::Tok;
use attune_models::train::{self, peft, Example, RenderOptions};
use attune_protocol::{EvalOptions, EvalProgress, EvalReport, EvalSubject, RowScore, SplitName};

use crate::datasets::Sample;
use crate::error::EngineError;
use crate::runs::{forgetting_warning, general_examples, models_loss, render_sample, to_messages};
use crate::store::{EvalRow, ModelRow};
use crate::templates::{apply_template, check_template};
use crate::Engine;

/// A model ready to be scored.
struct Scored {
    model: Llama,
    tok: Tok,
    tmpl: ChatTemplate,
    prefix: Option<candle_core::Tensor>,
}

impl Scored {
    fn pad(&self) -> u32 {
        self.tok.eos_token_ids().first().copied().unwrap_or(0)
    }

    /// (sum NLL, target tokens) of one example.
    fn nll(&self, e: &Example) -> attune_models::Result<(f64, usize)> {
        train::evaluate(
            &self.model,
            std::slice::from_ref(e),
            self.prefix.as_ref(),
            self.pad(),
            |_, _| true,
        )
    }

    /// Mean NLL over `examples`.
    fn mean_nll(&self, examples: &[Example]) -> attune_models::Result<Option<f64>> {
        let (s, n) = train::evaluate(
            &self.model,
            examples,
            self.prefix.as_ref(),
            self.pad(),
            |_, _| true,
        )?;
        Ok((n > 0).then(|| s / n as f64))
    }
}

/// Loads a model for evaluation. `Auto`, used when answers are generated for label accuracy,
/// decodes on the quantized weights as the playground does, several times faster than on the f32
/// copy; rows longer than `AUTO_QUANTIZED_MAX_ROWS` tokens (every chat row, once its template
/// wraps it) are still scored on the f32 weights, so the NLL is the same in both modes.
fn load(name: &str, path: &Path, compute: ComputeMode) -> Result<LoadedModel, EngineError> {
    if !path.exists() {
        return Err(EngineError::InvalidInput(format!(
            "model '{name}': its file {} is missing",
            path.display()
        )));
    }
    attune_models::loader::load_on_selected(path, &LoadOptions { compute }).map_err(|source| {
        EngineError::ModelLoad {
            name: name.to_string(),
            path: path.to_path_buf(),
            source: Box::new(source),
        }
    })
}

fn scored(m: LoadedModel) -> Scored {
    Scored {
        model: m.model,
        tok: m.tokenizer,
        tmpl: m.chat_template,
        prefix: None,
    }
}

/// The label a generated answer gives: the last `Final answer: yes|no|maybe`
/// (case-insensitive), if any.
pub fn parse_final_answer(text: &str) -> Option<String> {
    let lower = text.to_lowercase();
    let mut found = None;
    let mut rest = lower.as_str();
    while let Some(i) = rest.find("final answer") {
        let after = rest[i + "final answer".len()..].trim_start();
        let after = after.strip_prefix(':').unwrap_or(after).trim_start();
        let after = after.trim_start_matches(['*', '"', '\'', ' ']);
        for label in ["yes", "no", "maybe"] {
            if after.starts_with(label)
                && !after[label.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_alphanumeric())
            {
                found = Some(label.to_string());
            }
        }
        rest = &rest[i + 1..];
    }
    found
}

impl Engine {
    /// Every recorded evaluation, newest first, without per-row scores (they are not
    /// stored). A subject removed since is named by its id.
    pub fn list_evaluations(&self) -> Result<Vec<EvalReport>, EngineError> {
        let db = self.store.path();
        self.store
            .list_evaluations()?
            .into_iter()
            .map(|(id, e)| {
                let subject = match e.subject_kind.as_str() {
                    "base" => match e.subject_id.parse::<i64>() {
                        Ok(mid) => self
                            .store
                            .get_model(mid)?
                            .map(|m| m.name)
                            .unwrap_or_else(|| format!("model {mid} (removed)")),
                        Err(_) => e.subject_id.clone(),
                    },
                    "adapter" => match e.subject_id.parse::<i64>() {
                        Ok(aid) => self
                            .store
                            .get_adapter(aid)?
                            .map(|a| a.name)
                            .unwrap_or_else(|| format!("adapter {aid} (removed)")),
                        Err(_) => e.subject_id.clone(),
                    },
                    _ => e.subject_id.clone(),
                };
                let split = SplitName::parse(&e.split).ok_or_else(|| {
                    EngineError::db(
                        db,
                        format!("evaluation id {id}: invalid split '{}'", e.split),
                    )
                })?;
                Ok(EvalReport {
                    id,
                    subject_kind: e.subject_kind,
                    subject,
                    model_id: e.model_id,
                    dataset_id: e.dataset_id,
                    split,
                    n_rows: e.n_rows.max(0) as u64,
                    mean_nll: e.mean_nll,
                    ppl: e.ppl,
                    n_tokens: e.n_tokens.max(0) as u64,
                    accuracy: e.accuracy,
                    n_labeled: e.n_labeled.max(0) as u64,
                    forgetting_nll: e.forgetting_nll,
                    base_forgetting_nll: None,
                    forgetting_warning: None,
                    rows: Vec::new(),
                    created_at: e.created_at,
                })
            })
            .collect()
    }

    fn scored_base(&self, row: &ModelRow, compute: ComputeMode) -> Result<Scored, EngineError> {
        Ok(scored(load(&row.name, Path::new(&row.path), compute)?))
    }

    /// Evaluates `subject` on `dataset`'s `options.split`, records the result in the
    /// library and returns it with per-row figures. See [`Engine::evaluate_with`] for
    /// progress and cancellation.
    pub fn evaluate(
        &self,
        subject: &EvalSubject,
        dataset: &str,
        options: &EvalOptions,
    ) -> Result<EvalReport, EngineError> {
        self.evaluate_with(
            subject,
            dataset,
            options,
            &mut |_| {},
            &AtomicBool::new(false),
        )
    }

    /// [`Engine::evaluate`], reporting progress (rows scored, answers generated, the
    /// forgetting check) to `progress` and stopping with [`EngineError::Cancelled`] soon
    /// after `cancel` is set (nothing is recorded then).
    pub fn evaluate_with(
        &self,
        subject: &EvalSubject,
        dataset: &str,
        options: &EvalOptions,
        progress: &mut dyn FnMut(EvalProgress),
        cancel: &AtomicBool,
    ) -> Result<EvalReport, EngineError> {
        let ds = self.find_dataset(dataset)?;
        if options.max_len < 2 {
            return Err(EngineError::InvalidInput(format!(
                "max length must be at least 2 tokens, got {}",
                options.max_len
            )));
        }
        // With label accuracy: decode on the quantized weights, score on exact f32 (not bf16).
        let compute = if options.accuracy {
            ComputeMode::AutoF32
        } else {
            ComputeMode::F32
        };
        let (kind, subject_id, subject_name, base_row, s, template) = match subject {
            EvalSubject::Base { model } => {
                let m = self.find_model(model)?;
                let row = self
                    .store
                    .get_model(m.id)?
                    .ok_or_else(|| EngineError::ModelNotFound(m.id.to_string()))?;
                let s = self.scored_base(&row, compute)?;
                ("base", m.id.to_string(), m.name, row, s, None)
            }
            EvalSubject::Template { model, template } => {
                let m = self.find_model(model)?;
                let row = self
                    .store
                    .get_model(m.id)?
                    .ok_or_else(|| EngineError::ModelNotFound(m.id.to_string()))?;
                check_template(template)?;
                let s = self.scored_base(&row, compute)?;
                let name = if template.name.is_empty() {
                    "template".to_string()
                } else {
                    template.name.clone()
                };
                (
                    "template",
                    name.clone(),
                    name,
                    row,
                    s,
                    Some(template.clone()),
                )
            }
            EvalSubject::Adapter { adapter } => {
                let a = self.adapter_row(adapter)?;
                let row = self
                    .store
                    .get_model(a.base_model_id)?
                    .ok_or_else(|| EngineError::ModelNotFound(a.base_model_id.to_string()))?;
                let path = PathBuf::from(&a.path);
                let bad = |e: attune_models::Error| EngineError::InvalidAdapter {
                    path: path.clone(),
                    reason: e.to_string(),
                };
                let s = if a.kind == "full" {
                    scored(load(&a.name, &path, compute)?)
                } else {
                    let mut s = self.scored_base(&row, compute)?;
                    match peft::load(&path).map_err(bad)? {
                        peft::Adapter::Lora {
                            config, tensors, ..
                        } => {
                            peft::apply_lora(&mut s.model, &config, &tensors).map_err(bad)?;
                        }
                        peft::Adapter::Prompt { embeddings, .. } => s.prefix = Some(embeddings),
                    }
                    s
                };
                ("adapter", a.id.to_string(), a.name, row, s, None)
            }
        };
        let merr = |e: attune_models::Error| EngineError::Generation(Box::new(e));
        let opts = RenderOptions {
            loss_on: models_loss(options.loss_on),
            max_len: options.max_len,
        };
        let rows = self.dataset_rows(ds.id, options.split)?;
        let rows: Vec<_> = rows
            .into_iter()
            .take(options.limit.unwrap_or(usize::MAX))
            .collect();
        if rows.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "dataset '{}' has no {} rows",
                ds.name,
                options.split.as_str()
            )));
        }
        let mut scores = Vec::with_capacity(rows.len());
        let (mut sum, mut n_tokens) = (0f64, 0usize);
        let (mut n_labeled, mut n_correct) = (0u64, 0u64);
        let total = rows.len() as u64;
        let stop = || -> Result<(), EngineError> {
            if cancel.load(Ordering::SeqCst) {
                Err(EngineError::Cancelled)
            } else {
                Ok(())
            }
        };
        for (i, row) in rows.iter().enumerate() {
            stop()?;
            progress(EvalProgress {
                done: i as u64,
                total,
                phase: "scoring".into(),
            });
            let render_err = |e: attune_models::Error| EngineError::InvalidDataset {
                path: PathBuf::from(&ds.source_path),
                reason: format!(
                    "'{}' {} row {i} cannot be rendered: {e}",
                    ds.name,
                    options.split.as_str()
                ),
            };
            let example = match (&template, &row.sample) {
                (Some(t), Sample::Chat(msgs)) => {
                    let (all, n_prefix) = apply_template(t, msgs);
                    let mut e = train::render_chat(&s.tok, &s.tmpl, &to_messages(&all), &opts)
                        .map_err(render_err)?;
                    // Only the row's own turns are scored: mask what the template adds.
                    let head = s
                        .tmpl
                        .render(&to_messages(&all[..n_prefix]), false)
                        .and_then(|text| s.tok.encode(&text, false))
                        .map_err(render_err)?;
                    let k = head.len().min(e.targets.len());
                    if e.ids[..k] == head[..k] {
                        e.targets[..k].iter_mut().for_each(|t| *t = false);
                    }
                    e
                }
                _ => render_sample(&s.tok, &s.tmpl, &row.sample, &opts).map_err(render_err)?,
            };
            let (row_sum, row_n) = s.nll(&example).map_err(merr)?;
            sum += row_sum;
            n_tokens += row_n;
            let mut score = RowScore {
                source_id: row.source_id.clone(),
                sum_nll: row_sum,
                n_tokens: row_n as u64,
                answer: None,
                correct: None,
            };
            if let (true, Some(label), Sample::Chat(msgs)) =
                (options.accuracy, &row.label, &row.sample)
            {
                n_labeled += 1;
                progress(EvalProgress {
                    done: i as u64,
                    total,
                    phase: "generating".into(),
                });
                let cut = msgs
                    .iter()
                    .rposition(|m| m.role == "assistant")
                    .unwrap_or(msgs.len());
                let prompt_msgs = match &template {
                    Some(t) => apply_template(t, &msgs[..cut]).0,
                    None => msgs[..cut].to_vec(),
                };
                let text = s
                    .tmpl
                    .render(&to_messages(&prompt_msgs), true)
                    .map_err(merr)?;
                let ids = s.tok.encode(&text, false).map_err(merr)?;
                let params = GenerateParams {
                    max_tokens: options.max_new_tokens.max(1),
                    ..Default::default()
                };
                let g = generate::generate_with_prefix(
                    &s.model,
                    &s.tok,
                    s.prefix.as_ref(),
                    &ids,
                    &params,
                    cancel,
                    &mut |_| {},
                )
                .map_err(merr)?;
                stop()?;
                let answer = parse_final_answer(&g.text);
                let correct = answer
                    .as_deref()
                    .is_some_and(|a| a.eq_ignore_ascii_case(label.trim()));
                n_correct += u64::from(correct);
                score.answer = answer;
                score.correct = Some(correct);
            }
            scores.push(score);
        }
        stop()?;
        progress(EvalProgress {
            done: total,
            total,
            phase: "scoring".into(),
        });
        if n_tokens == 0 {
            return Err(EngineError::InvalidInput(format!(
                "dataset '{}' {} rows have no target tokens to score",
                ds.name,
                options.split.as_str()
            )));
        }
        let mean_nll = sum / n_tokens as f64;
        let (forgetting_nll, base_forgetting_nll, forgetting_warning_text) =
            if options.forgetting_rows > 0 {
                let parts = if kind == "adapter" { 2 } else { 1 };
                progress(EvalProgress {
                    done: 0,
                    total: parts,
                    phase: "forgetting".into(),
                });
                let ex =
                    general_examples(&s.tok, &s.tmpl, options.forgetting_rows).map_err(merr)?;
                let subject_nll = s.mean_nll(&ex).map_err(merr)?;
                stop()?;
                let base_nll = if kind == "adapter" {
                    progress(EvalProgress {
                        done: 1,
                        total: parts,
                        phase: "forgetting".into(),
                    });
                    drop(s);
                    let b = self.scored_base(&base_row, ComputeMode::F32)?;
                    b.mean_nll(&ex).map_err(merr)?
                } else {
                    subject_nll
                };
                stop()?;
                progress(EvalProgress {
                    done: parts,
                    total: parts,
                    phase: "forgetting".into(),
                });
                let warn = match (base_nll, subject_nll) {
                    (Some(b), Some(a)) => forgetting_warning(b, a),
                    _ => None,
                };
                (subject_nll, base_nll, warn)
            } else {
                (None, None, None)
            };
        let accuracy = (n_labeled > 0).then(|| n_correct as f64 / n_labeled as f64);
        let created_at = crate::clock::now_rfc3339();
        let id = self.store.insert_evaluation(&EvalRow {
            subject_kind: kind.to_string(),
            subject_id,
            model_id: base_row.id,
            dataset_id: ds.id,
            split: options.split.as_str().to_string(),
            n_rows: rows.len() as i64,
            mean_nll,
            ppl: mean_nll.exp(),
            n_tokens: n_tokens as i64,
            accuracy,
            n_labeled: n_labeled as i64,
            forgetting_nll,
            created_at: created_at.clone(),
        })?;
        Ok(EvalReport {
            id,
            subject_kind: kind.to_string(),
            subject: subject_name,
            model_id: base_row.id,
            dataset_id: ds.id,
            split: options.split,
            n_rows: rows.len() as u64,
            mean_nll,
            ppl: mean_nll.exp(),
            n_tokens: n_tokens as u64,
            accuracy,
            n_labeled,
            forgetting_nll,
            base_forgetting_nll,
            forgetting_warning: forgetting_warning_text,
            rows: scores,
            created_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attune_protocol::{ImportOptions, Split};

    /// The real model and a 4-row chat dataset (all train) in a temporary library.
    fn library(dir: &Path) -> (Engine, i64, i64) {
        let model_file = attune_models::default_model_path();
        assert!(
            model_file.is_file(),
            "the default model is missing at {}: run scripts/fetch-model.sh",
            model_file.display()
        );
        let e = Engine::open(&dir.join("data")).expect("open engine");
        let model = e.add_local_model(&model_file).expect("add model").model.id;
        let text: String = (0..4)
            .map(|i| {
                serde_json::json!({"messages": [
                    {"role": "user", "content": format!("Say {i}.")},
                    {"role": "assistant", "content": format!("{i}.")},
                ]})
                .to_string()
                    + "\n"
            })
            .collect();
        let path = dir.join("eval.jsonl");
        std::fs::write(&path, text).expect("write dataset");
        let ds = e
            .import_dataset(
                &path,
                &ImportOptions {
                    split: Split::AllTrain,
                    ..Default::default()
                },
            )
            .expect("import")
            .id;
        (e, model, ds)
    }

    #[test]
    fn evaluate_reports_progress_cancels_and_lists_what_it_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (e, model, ds) = library(dir.path());
        let subject = EvalSubject::Base {
            model: model.to_string(),
        };
        let options = EvalOptions {
            split: SplitName::Train,
            max_len: 64,
            ..Default::default()
        };
        let mut seen = Vec::new();
        let report = e
            .evaluate_with(
                &subject,
                &ds.to_string(),
                &options,
                &mut |p| seen.push(p),
                &AtomicBool::new(false),
            )
            .expect("evaluate");
        let rows = report.n_rows;
        assert!(rows >= 3, "{report:?}");
        assert_eq!(seen.first().map(|p| (p.done, p.total)), Some((0, rows)));
        assert_eq!(seen.last().map(|p| (p.done, p.total)), Some((rows, rows)));
        assert!(seen.iter().all(|p| p.phase == "scoring"));

        // Cancelled after the first row: an error, and nothing recorded.
        let cancel = AtomicBool::new(false);
        let err = e
            .evaluate_with(
                &subject,
                &ds.to_string(),
                &options,
                &mut |p| {
                    if p.done >= 1 {
                        cancel.store(true, Ordering::SeqCst);
                    }
                },
                &cancel,
            )
            .expect_err("cancelled");
        assert_eq!(err.code(), "cancelled");

        let listed = e.list_evaluations().expect("list");
        assert_eq!(listed.len(), 1);
        let l = &listed[0];
        assert_eq!(l.id, report.id);
        assert_eq!(l.subject_kind, "base");
        assert_eq!(l.subject, report.subject);
        assert_eq!(l.n_rows, rows);
        assert!((l.mean_nll - report.mean_nll).abs() < 1e-12);
        assert!(l.rows.is_empty());
    }
}
