//! `attune train`, `attune runs ...`, `attune adapters ...` and `attune eval`.

use std::path::PathBuf;

use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Result};
use attune_engine::{Actor, CancelToken, Engine, Request};
use attune_protocol::{
    AdapterSummary, BaseFormSpec, BundleEngine, EvalOptions, EvalReport, EvalSubject, LossOn,
    LrSchedule, MethodSpec, PreferenceLoss, PreferenceObjective, PreferenceSet, PreferenceSpec,
    RunDetail, RunEvent, RunMetric, RunSpec, RunStatus, SplitName,
};
use clap::{Args, Subcommand};

use crate::interrupt;

#[derive(Args)]
pub struct TrainArgs {
    /// Model id or name.
    #[arg(long, short)]
    model: String,
    /// Dataset id or name; with --method dpo|orpo, a preference set or a preference JSONL
    /// file (`prompt`/`chosen`/`rejected`, strings or chat messages, as TRL reads it), which
    /// is imported under its file name.
    #[arg(long, short, required_unless_present = "arena")]
    data: Option<String>,
    /// full, lora or prompt; or dpo / orpo: preference training on chosen/rejected pairs
    /// (what is trained then: --adapter).
    #[arg(long, value_parser = ["full", "lora", "prompt", "dpo", "orpo"], default_value = "lora")]
    method: String,
    /// DPO / ORPO on the pairs made from this arena's votes (ties, "both bad" and unvoted
    /// prompts are left out and counted).
    #[arg(long, conflicts_with = "data")]
    arena: Option<i64>,
    /// With --arena: whose votes make the pairs: human, judge (one judge's votes) or
    /// combined (the human's vote where there is one, else the judge's).
    #[arg(long, value_parser = ["human", "judge", "combined"], default_value = "human", requires = "arena")]
    votes: String,
    /// With --votes judge|combined: which judge, as `attune arena results` numbers them
    /// (1, 2, …) or a part of its label; may be left out when the arena has one judge.
    #[arg(long, requires = "arena")]
    judge: Option<String>,
    /// With --method dpo|orpo: what is trained (lora, full or prompt). DPO's reference is the
    /// base with the adapter off (lora, prompt) or a frozen copy of the model (full).
    #[arg(long, value_parser = ["full", "lora", "prompt"], default_value = "lora")]
    adapter: String,
    /// DPO: the pull towards the reference; ORPO: the odds-ratio weight.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// DPO's loss: sigmoid (the paper's), hinge or ipo.
    #[arg(long, value_parser = ["sigmoid", "hinge", "ipo"], default_value = "sigmoid")]
    loss_type: String,
    /// Run name (default: <method>-<dataset>); the adapter gets the same name.
    #[arg(long)]
    name: Option<String>,
    /// Optimizer steps.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the training split (default 1).
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate (default: full 2e-5, lora 2e-4, prompt 3e-2).
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// cosine, linear or constant.
    #[arg(long, value_parser = parse_schedule, default_value = "cosine")]
    schedule: LrSchedule,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Longer rows are cut to this many tokens.
    #[arg(long, default_value_t = 1024)]
    max_len: usize,
    /// assistant or all.
    #[arg(long, value_parser = crate::parse_loss_on, default_value = "assistant")]
    loss_on: LossOn,
    /// Pack the training rows end to end into blocks of --max-len tokens (no padding).
    #[arg(long)]
    pack: bool,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f32,
    /// Comma-separated modules (default: every projection).
    #[arg(long, value_delimiter = ',')]
    lora_targets: Vec<String>,
    #[arg(long)]
    rslora: bool,
    /// Soft-prompt length (prompt tuning).
    #[arg(long, default_value_t = 20)]
    virtual_tokens: usize,
    /// Start the soft prompt from this text's embeddings.
    #[arg(long)]
    prompt_init_text: Option<String>,
    /// Evaluate every N steps (0: at the start and the end only).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every N steps (0: only when paused).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Evaluate on at most N rows of the validation split.
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Rows of the general-domain sample scored before and after (0 = off).
    #[arg(long, default_value_t = 30)]
    forgetting_rows: usize,
    /// How LoRA and prompt tuning hold the frozen base: f32 (fastest), bf16 (half the
    /// memory), or quantized (the GGUF file's blocks: the least memory). Default: f32 when it
    /// fits in free memory, else the most compact form.
    #[arg(long, value_parser = parse_base)]
    base: Option<BaseFormSpec>,
    /// Record the run without training it here (status paused), to export it with
    /// `attune runs export` for a GPU machine or resume it later. A run that would not fit in
    /// this machine's memory is recorded too.
    #[arg(long)]
    create_only: bool,
}

fn parse_base(s: &str) -> Result<BaseFormSpec, String> {
    BaseFormSpec::parse(s)
        .ok_or_else(|| format!("unknown base form '{s}' (choose f32, bf16 or quantized)"))
}

fn parse_schedule(s: &str) -> Result<LrSchedule, String> {
    match s {
        "cosine" => Ok(LrSchedule::Cosine),
        "linear" => Ok(LrSchedule::Linear),
        "constant" => Ok(LrSchedule::Constant),
        _ => Err(format!(
            "unknown schedule '{s}' (choose cosine, linear or constant)"
        )),
    }
}

impl TrainArgs {
    /// The preference settings when --method is dpo or orpo.
    fn preference(&self) -> Option<PreferenceSpec> {
        let objective = match self.method.as_str() {
            "dpo" => PreferenceObjective::Dpo,
            "orpo" => PreferenceObjective::Orpo,
            _ => return None,
        };
        Some(PreferenceSpec {
            objective,
            beta: self.beta,
            loss: match self.loss_type.as_str() {
                "hinge" => PreferenceLoss::Hinge,
                "ipo" => PreferenceLoss::Ipo,
                _ => PreferenceLoss::Sigmoid,
            },
        })
    }

    fn spec(&self, dataset: String) -> RunSpec {
        let preference = self.preference();
        let trained = match preference {
            Some(_) => self.adapter.as_str(),
            None => self.method.as_str(),
        };
        let method = match trained {
            "full" => MethodSpec::Full,
            "prompt" => MethodSpec::Prompt {
                virtual_tokens: self.virtual_tokens,
                init_text: self.prompt_init_text.clone(),
            },
            _ => {
                let MethodSpec::Lora { targets, .. } = MethodSpec::lora_default() else {
                    unreachable!("lora_default is LoRA")
                };
                MethodSpec::Lora {
                    r: self.lora_r,
                    alpha: self.lora_alpha,
                    dropout: self.lora_dropout,
                    targets: if self.lora_targets.is_empty() {
                        targets
                    } else {
                        self.lora_targets
                            .iter()
                            .map(|t| t.trim().to_string())
                            .collect()
                    },
                    rslora: self.rslora,
                }
            }
        };
        RunSpec {
            name: self.name.clone(),
            model: self.model.clone(),
            dataset,
            method,
            preference,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            steps: self.steps,
            epochs: self.epochs.unwrap_or(1.0),
            lr: self.lr,
            warmup_steps: self.warmup,
            schedule: self.schedule,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            max_len: self.max_len,
            loss_on: self.loss_on,
            pack: self.pack,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            eval_limit: self.eval_limit,
            forgetting_rows: self.forgetting_rows,
            base: self.base,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
pub enum RunsCommand {
    /// List runs.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a run with its metrics.
    Show {
        /// Run id or name.
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Continue a paused (or failed) run from its last checkpoint.
    Resume { run: String },
    /// Cancel a paused, queued or failed run (its checkpoints are deleted).
    Cancel { run: String },
    /// Remove a run that is not executing (its adapter stays).
    #[command(alias = "remove")]
    Rm { run: String },
    /// Write the run as a bundle for a GPU machine: the data as chat-messages JSONL, a TRL
    /// SFTTrainer script (accelerate launch), an Axolotl YAML, DeepSpeed and FSDP configs,
    /// run.sh and a README with the commands.
    Export {
        /// Run id or name.
        run: String,
        /// trl or axolotl: what run.sh launches (the bundle holds both where both apply).
        #[arg(long, value_parser = parse_bundle_engine, default_value = "trl")]
        engine: BundleEngine,
        /// A new or empty folder.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Import what a bundle's engine produced (its output/ folder: a PEFT adapter or a full
    /// checkpoint, and trainer_state.json) as the run's adapter, with the run's charts and the
    /// bundle's provenance.
    ImportResult {
        /// Run id or name.
        run: String,
        /// The bundle's output/ folder (or the adapter folder an engine wrote).
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn parse_bundle_engine(s: &str) -> Result<BundleEngine, String> {
    BundleEngine::parse(s).ok_or_else(|| format!("unknown engine '{s}' (choose trl or axolotl)"))
}

#[derive(Subcommand)]
pub enum AdaptersCommand {
    /// List adapters.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Copy an adapter's PEFT folder (or full model folder) to DIR.
    Export { adapter: String, dir: PathBuf },
    /// Import a PEFT LoRA or prompt-tuning folder, or a llama.cpp adapter GGUF, trained for a
    /// base model.
    Import {
        dir: PathBuf,
        /// The base model (id or name).
        #[arg(long)]
        base: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Merge a LoRA adapter into its base and register the result as a model.
    Merge {
        adapter: String,
        /// Name of the merged model (default: the adapter's).
        #[arg(long)]
        name: Option<String>,
        /// Folder to write (default: <data dir>/models/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Remove an adapter and its folder.
    #[command(alias = "remove")]
    Rm { adapter: String },
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model id or name (the base; with --adapter, optional).
    #[arg(long, short)]
    model: Option<String>,
    /// Adapter name or id.
    #[arg(long, short)]
    adapter: Option<String>,
    /// A remote endpoint's --model answers (label accuracy only: an API gives no NLL).
    #[arg(long, conflicts_with = "adapter", requires = "model")]
    endpoint: Option<String>,
    /// A prompt template (name or id) before every row.
    #[arg(long, conflicts_with = "adapter")]
    template: Option<String>,
    /// Dataset id or name.
    #[arg(long, short)]
    data: String,
    /// train, valid or test.
    #[arg(long, value_parser = ["train", "valid", "test"], default_value = "valid")]
    split: String,
    /// At most N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Generate answers for labeled rows and report accuracy.
    #[arg(long)]
    accuracy: bool,
    #[arg(long, default_value_t = 1024)]
    max_len: usize,
    /// Most tokens per generated answer.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Rows of the general-domain sample for the forgetting check (0 = off).
    #[arg(long, default_value_t = 0)]
    forgetting_rows: usize,
    #[arg(long)]
    json: bool,
}

fn metric_line(m: &RunMetric, total: u64) -> String {
    let mut line = format!(
        "step {}/{}  loss {:.4}  lr {:.2e}  grad-norm {:.3}",
        m.step,
        total,
        m.loss,
        m.lr.unwrap_or(0.0),
        m.grad_norm.unwrap_or(0.0),
    );
    // A run trained elsewhere (an imported bundle result) has no speed or memory figures.
    if let Some(t) = m.tokens_per_s {
        line.push_str(&format!("  {t:.0} tok/s"));
    }
    if let Some(mb) = m.memory_mb {
        line.push_str(&format!("  {mb:.0} MiB"));
    }
    if let Some(p) = &m.pref {
        line.push_str(&format!(
            "  margin {:.4}  acc {:.2}  rewards {:.4}/{:.4}  logps {:.2}/{:.2}",
            p.margin,
            p.accuracy,
            p.rewards_chosen,
            p.rewards_rejected,
            p.logps_chosen,
            p.logps_rejected
        ));
    }
    line
}

/// What [`drive`] follows.
enum Drive {
    New(Box<RunSpec>),
    Resume(i64),
}

/// Starts (or resumes) a run through the actor and follows it, printing one line per
/// step and evaluation, until it finishes. It waits while another run trains (in this
/// library, in any process). Ctrl-C pauses it (checkpoint) and exits with 130.
fn drive(actor: &Actor, what: Drive) -> Result<()> {
    let (tx, rx) = mpsc::channel::<RunEvent>();
    let sink: attune_engine::Sink<RunEvent> = Box::new(move |e| {
        let _ = tx.send(e);
    });
    let run = match what {
        Drive::New(spec) => actor.start_run(*spec, Some(sink))?,
        Drive::Resume(id) => actor.resume_run(id, Some(sink))?,
    };
    let id = run.id;
    let pause = actor.clone();
    let _watch = interrupt::on_ctrl_c(move || {
        eprintln!("pausing at the end of this step (a checkpoint is written)...");
        if let Err(e) = pause.pause_run(id) {
            eprintln!("error: {e}");
        }
    });
    let mut total = run.total_steps;
    let mut said_waiting = false;
    let status = loop {
        let ev = match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !said_waiting {
                    said_waiting = true;
                    eprintln!(
                        "run {id} '{}' is queued: another run is training on this library \
                         (here or in another Attune process, such as the app); it starts when \
                         that one ends. Ctrl-C pauses it.",
                        run.name
                    );
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the run's updates stopped before it finished")
            }
        };
        match ev {
            RunEvent::Started {
                run_id,
                step,
                total_steps,
            } => {
                said_waiting = true;
                total = total_steps;
                eprintln!(
                    "run {run_id} '{}': training from step {step} of {total_steps} (estimated peak memory {} MiB); Ctrl-C pauses",
                    run.name, run.memory_estimate_mb
                );
            }
            RunEvent::Step { metric } => println!("{}", metric_line(&metric, total)),
            RunEvent::Eval { step, loss } => {
                println!("eval step {step}  loss {loss:.4}  ppl {:.3}", loss.exp())
            }
            RunEvent::Checkpoint { step } => println!("checkpoint step {step}"),
            RunEvent::Finished { status, .. } => break status,
        }
    };
    let engine = actor.engine();
    let done = engine.find_run(&id.to_string())?;
    match status {
        RunStatus::Paused => {
            eprintln!(
                "paused at step {} of {}; resume with `attune runs resume {}`",
                done.step, done.total_steps, done.id
            );
            std::process::exit(130);
        }
        RunStatus::Completed => {
            let detail = engine.run_detail(&done.id.to_string())?;
            if let Some(a) = detail.adapter {
                let a = engine.find_adapter(&a)?;
                println!(
                    "completed run {} '{}': {} adapter '{}' at {}",
                    done.id,
                    done.name,
                    a.kind.as_str(),
                    a.name,
                    a.path
                );
                print_adapter_metrics(&a);
            }
        }
        RunStatus::Failed => bail!(
            "run {} '{}' failed: {}",
            done.id,
            done.name,
            done.error.as_deref().unwrap_or("see `attune runs show`")
        ),
        other => println!("run {} '{}' {}", done.id, done.name, other.as_str()),
    }
    Ok(())
}

fn print_adapter_metrics(a: &AdapterSummary) {
    let m = &a.metrics;
    if let (Some(b), Some(after)) = (m.eval_nll_before, m.eval_nll_after) {
        println!("eval NLL {b:.4} -> {after:.4}");
    }
    if let (Some(b), Some(after)) = (m.general_nll_before, m.general_nll_after) {
        println!("general-domain NLL {b:.4} -> {after:.4}");
    }
    if let Some(w) = &m.forgetting_warning {
        eprintln!("warning: {w}");
    }
}

pub fn train(actor: &Actor, args: TrainArgs) -> Result<()> {
    let dataset = match (&args.data, args.arena, args.preference()) {
        (_, Some(_), None) => bail!("--arena trains on preference pairs: add --method dpo or orpo"),
        (_, Some(arena), Some(_)) => {
            let source = crate::arena::vote_source(
                actor.engine(),
                arena,
                &args.votes,
                args.judge.as_deref(),
            )?;
            let set = actor
                .engine()
                .preferences_from_arena(arena, None, &source)?;
            print_preference_set(&set);
            set.dataset.name
        }
        (Some(d), None, Some(_)) if std::path::Path::new(d).is_file() => {
            let path = std::path::Path::new(d);
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "preferences".into());
            let set = actor.engine().import_preferences(path, &name)?;
            print_preference_set(&set);
            set.dataset.name
        }
        (Some(d), None, _) => d.clone(),
        (None, None, _) => bail!("name the training data: --data D (or --arena ID with dpo/orpo)"),
    };
    if args.create_only {
        let r = actor.engine().create_run_for_export(&args.spec(dataset))?;
        println!(
            "recorded run {} '{}' ({} steps, estimated peak {} MiB), not trained here: \
             `attune runs export {} --engine trl --out DIR` writes it for a GPU machine, \
             `attune runs resume {}` trains it here",
            r.id, r.name, r.total_steps, r.memory_estimate_mb, r.id, r.id
        );
        return Ok(());
    }
    drive(actor, Drive::New(Box::new(args.spec(dataset))))
}

fn print_preference_set(s: &PreferenceSet) {
    eprintln!(
        "preference set '{}' (id {}): {} pairs",
        s.dataset.name, s.dataset.id, s.pairs
    );
    if s.source == "arena" {
        let whose = match (&s.votes, &s.judge_label) {
            (Some(v), Some(j)) => format!("{} votes, judge {j}", v.kind()),
            (Some(v), None) => format!("{} votes", v.kind()),
            (None, _) => "votes".into(),
        };
        eprintln!(
            "  from arena {} ({whose}; {} pairs from human votes, {} from the judge's): \
             left out {} ties, {} 'both bad', {} not voted, {} unparseable verdicts",
            s.arena_id.map_or("?".to_string(), |a| a.to_string()),
            s.human_pairs,
            s.judge_pairs,
            s.ties_skipped,
            s.both_bad_skipped,
            s.unvoted_skipped,
            s.unparseable_skipped
        );
    }
}

pub fn runs(actor: &Actor, cmd: RunsCommand) -> Result<()> {
    let engine = actor.engine();
    match cmd {
        RunsCommand::List { json } => {
            let list = engine.list_runs()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no runs yet: start one with `attune train --model M --data D`");
            } else {
                println!(
                    "{:<4} {:<24} {:<7} {:<10} {:>11} {:<20} {:<20}",
                    "ID", "NAME", "METHOD", "STATUS", "STEP", "MODEL", "DATASET"
                );
                for r in &list {
                    println!(
                        "{:<4} {:<24} {:<7} {:<10} {:>11} {:<20} {:<20}",
                        r.id,
                        r.name,
                        r.method,
                        r.status.as_str(),
                        format!("{}/{}", r.step, r.total_steps),
                        r.model,
                        r.dataset
                    );
                }
            }
        }
        RunsCommand::Show { run, json } => {
            let d = engine.run_detail(&run)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print_run(&d);
            }
        }
        RunsCommand::Resume { run } => {
            let r = engine.find_run(&run)?;
            drive(actor, Drive::Resume(r.id))?;
        }
        RunsCommand::Cancel { run } => {
            let r = engine.cancel_run(&run)?;
            println!("cancelled run {} '{}' at step {}", r.id, r.name, r.step);
        }
        RunsCommand::Rm { run } => {
            let r = engine.find_run(&run)?;
            engine.remove_run(&r.id.to_string())?;
            println!("removed run {} '{}'", r.id, r.name);
        }
        RunsCommand::Export {
            run,
            engine: which,
            out,
            json,
        } => {
            let b = engine.export_bundle(&run, which, &out)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!(
                    "wrote run {} '{}' for {} to {} ({} files, {} training rows, {} validation \
                     rows; bundle sha256 {})",
                    b.run_id,
                    b.run,
                    b.engine.as_str(),
                    b.dir,
                    b.files.len(),
                    b.train_rows,
                    b.valid_rows,
                    b.sha256
                );
                println!("model: {}", b.model_source);
                println!(
                    "train it: {}/run.sh (see README.md for several GPUs and nodes)",
                    b.dir
                );
                if !b.unmapped.is_empty() {
                    println!("not one to one (also in README.md):");
                    for u in &b.unmapped {
                        println!("  - {u}");
                    }
                }
            }
        }
        RunsCommand::ImportResult { run, dir, json } => {
            let r = engine.import_bundle_result(&run, &dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "imported {} adapter '{}' for run {} '{}' ({}, {} steps, {} training and {} \
                     evaluation points; bundle sha256 {})",
                    r.kind,
                    r.adapter,
                    r.run_id,
                    r.run,
                    r.engine_version,
                    r.steps,
                    r.train_points,
                    r.eval_points,
                    r.bundle_sha256
                );
            }
        }
    }
    Ok(())
}

fn print_run(d: &RunDetail) {
    let r = &d.run;
    println!("id:        {}", r.id);
    println!("name:      {}", r.name);
    println!("status:    {}", r.status.as_str());
    if let Some(e) = &r.error {
        println!("error:     {e}");
    }
    println!("method:    {}", r.method);
    if let (false, Some(b)) = (matches!(d.spec.method, MethodSpec::Full), d.spec.base) {
        println!("base:      held as {}", b.as_str());
    }
    println!("model:     {} (id {})", r.model, r.model_id);
    println!("dataset:   {} (id {})", r.dataset, r.dataset_id);
    println!("step:      {} of {}", r.step, r.total_steps);
    println!("memory:    ~{} MiB estimated peak", r.memory_estimate_mb);
    println!("directory: {}", r.run_dir);
    println!("created:   {}", r.created_at);
    if let Some(a) = &d.adapter {
        println!("adapter:   {a}");
    }
    for m in &d.metrics {
        match m.kind {
            attune_protocol::MetricKind::Train => println!("  {}", metric_line(m, r.total_steps)),
            attune_protocol::MetricKind::Eval => {
                println!("  eval step {}  loss {:.4}", m.step, m.loss)
            }
        }
    }
}

pub fn adapters(engine: &Engine, cmd: AdaptersCommand) -> Result<()> {
    match cmd {
        AdaptersCommand::List { json } => {
            let list = engine.list_adapters()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no adapters yet: train one with `attune train` or import one");
            } else {
                println!(
                    "{:<4} {:<24} {:<7} {:<24} {:<6} PATH",
                    "ID", "NAME", "KIND", "BASE", "RUN"
                );
                for a in &list {
                    println!(
                        "{:<4} {:<24} {:<7} {:<24} {:<6} {}",
                        a.id,
                        a.name,
                        a.kind.as_str(),
                        a.base_model,
                        a.run_id.map(|i| i.to_string()).unwrap_or("-".into()),
                        a.path
                    );
                }
            }
        }
        AdaptersCommand::Export { adapter, dir } => {
            let out = engine.export_adapter(&adapter, &dir)?;
            println!("exported adapter '{adapter}' to {}", out.display());
        }
        AdaptersCommand::Import { dir, base, name } => {
            let a = engine.import_adapter(&dir, &base, name.as_deref())?;
            println!(
                "imported {} adapter {} '{}' for '{}'",
                a.kind.as_str(),
                a.id,
                a.name,
                a.base_model
            );
        }
        AdaptersCommand::Merge { adapter, name, out } => {
            let added = engine.merge_adapter(&adapter, name.as_deref(), out.as_deref())?;
            crate::report_added(&added.model, added.already_present);
        }
        AdaptersCommand::Rm { adapter } => {
            let a = engine.remove_adapter(&adapter)?;
            println!("removed adapter {} '{}' and its folder", a.id, a.name);
        }
    }
    Ok(())
}

pub fn eval(actor: &Actor, args: EvalArgs) -> Result<()> {
    let engine = actor.engine();
    let template = match &args.template {
        Some(t) => {
            let r = engine.find_template(t)?;
            Some(attune_protocol::PromptTemplate {
                name: r.name,
                system: r.system,
                examples: r.examples,
                user: r.user,
                values: r.variables,
            })
        }
        None => None,
    };
    if let Some(endpoint) = &args.endpoint {
        let options = EvalOptions {
            split: SplitName::parse(&args.split).unwrap_or(SplitName::Valid),
            limit: args.limit,
            accuracy: true,
            max_new_tokens: args.max_new_tokens,
            ..Default::default()
        };
        let cancel = CancelToken::new();
        let _watch = interrupt::cancel_on_ctrl_c(&cancel);
        let model = args.model.clone().unwrap_or_default();
        let report = actor.call(|reply| Request::EvaluateEndpoint {
            endpoint: endpoint.clone(),
            model,
            template,
            dataset: args.data.clone(),
            options,
            cancel,
            on_progress: Box::new(|p| {
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    eprint!("\r{} {}/{}   ", p.phase, p.done, p.total);
                }
            }),
            reply,
        })?;
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!();
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "{} at {}{} on {} rows: accuracy {}",
                report.model,
                report.endpoint,
                report
                    .template
                    .as_deref()
                    .map(|t| format!(" with template '{t}'"))
                    .unwrap_or_default(),
                report.n_labeled,
                report
                    .accuracy
                    .map(|a| format!("{:.1}% of {}", a * 100.0, report.n_labeled))
                    .unwrap_or_else(|| "-".into())
            );
            println!("{}", report.note);
        }
        return Ok(());
    }
    let subject = match (&args.adapter, &args.model) {
        (Some(a), model) => {
            if let Some(m) = model {
                let base = engine.adapter_base(a)?;
                let want = engine.find_model(m)?;
                if base.id != want.id {
                    bail!(
                        "adapter '{a}' is built on model '{}', not '{}'",
                        base.name,
                        want.name
                    );
                }
            }
            EvalSubject::Adapter { adapter: a.clone() }
        }
        (None, model) => {
            let model = match model {
                Some(m) => m.clone(),
                None => engine.default_model()?.id.to_string(),
            };
            match template {
                Some(template) => EvalSubject::Template { model, template },
                None => EvalSubject::Base { model },
            }
        }
    };
    let options = EvalOptions {
        split: SplitName::parse(&args.split).unwrap_or(SplitName::Valid),
        limit: args.limit,
        max_len: args.max_len,
        accuracy: args.accuracy,
        max_new_tokens: args.max_new_tokens,
        forgetting_rows: args.forgetting_rows,
        ..Default::default()
    };
    // Ctrl-C stops the evaluation (nothing is recorded).
    let cancel = CancelToken::new();
    let _watch = interrupt::cancel_on_ctrl_c(&cancel);
    let report = actor.call(|reply| Request::Evaluate {
        subject,
        dataset: args.data.clone(),
        options,
        cancel,
        on_progress: Box::new(|_| {}),
        reply,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &EvalReport) {
    println!(
        "{} '{}' on {} split: {} rows, {} target tokens",
        r.subject_kind,
        r.subject,
        r.split.as_str(),
        r.n_rows,
        r.n_tokens
    );
    println!("mean NLL {:.4}  perplexity {:.3}", r.mean_nll, r.ppl);
    if let Some(a) = r.accuracy {
        println!("accuracy {:.1}% of {} labeled rows", 100.0 * a, r.n_labeled);
    }
    if let Some(f) = r.forgetting_nll {
        match r.base_forgetting_nll {
            Some(b) if b != f => println!("general-domain NLL {f:.4} (base {b:.4})"),
            _ => println!("general-domain NLL {f:.4}"),
        }
    }
    if let Some(w) = &r.forgetting_warning {
        eprintln!("warning: {w}");
    }
}
