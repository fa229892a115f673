//! `attune`: the command line over the engine — manage the model library, pull from
//! the Hugging Face Hub, import datasets, fine-tune (runs, adapters), evaluate, chat
//! and generate. Errors print as one `error: ...` line on
//! stderr with exit code 1.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use attune_engine::{Actor, ActorOptions, CancelToken, Engine, Generation, Prompt, PullProgress};
use attune_protocol::{
    ChatEvent, ChatMessage, ChatTarget, ColumnMap, DatasetFormat, DatasetPreview, DatasetStats,
    DatasetSummary, GenerationStats, ImportOptions, LossOn, ModelSource, ModelSummary, RowSample,
    SamplingParams, Split,
};
use clap::{Args, Parser, Subcommand};

// The arena and its judge (issue 17).
mod arena;
mod docs;
mod endpoints;
mod export;
mod templates;
mod train;

#[derive(Parser)]
#[command(
    name = "attune",
    version,
    about = "Adapt a small language model on your own machine"
)]
struct Cli {
    /// Data directory (library and models); default $ATTUNE_DATA_DIR or ~/.local/share/attune.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the model library.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Import, inspect and remove datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Fine-tune a model on a dataset (full, LoRA or prompt tuning). Prints one line
    /// per step and evaluation; Ctrl-C pauses (checkpoint) and exits with 130.
    Train(Box<train::TrainArgs>),
    /// List, show, resume and cancel fine-tuning runs.
    #[command(subcommand)]
    Runs(train::RunsCommand),
    /// List, import, export, merge and remove adapters.
    #[command(subcommand)]
    Adapters(train::AdaptersCommand),
    /// Add, list and remove remote OpenAI-compatible endpoints, and list their models.
    #[command(subcommand)]
    Endpoints(endpoints::EndpointsCommand),
    /// List, show, add and remove prompt templates.
    #[command(subcommand)]
    Templates(templates::TemplatesCommand),
    /// Evaluate a model, or an adapter on its base: mean NLL and perplexity on a split,
    /// label accuracy with --accuracy.
    Eval(train::EvalArgs),
    /// Export an adapter or model as GGUF, LoRA GGUF, Ollama (GGUF + Modelfile) or a Hugging
    /// Face folder; the files are reloaded and checked against the model in the app, and the
    /// verification is printed last (exit code 1 when it failed; the files are kept).
    Export(Box<export::ExportArgs>),
    /// Blind A/B arenas: create, show, vote, let a judge vote, results with agreement
    /// and intervals, the judging rubric.
    #[command(subcommand)]
    Arena(arena::ArenaCommand),
    /// List past exports with their verification.
    Exports {
        #[arg(long)]
        json: bool,
    },
    /// Chat with a model: reads lines from stdin, `/exit` or end of input quits,
    /// `/reset` starts over, Ctrl-C stops the current answer.
    Chat {
        /// Model id or name (default: the first registered model); with --endpoint,
        /// the endpoint's model id.
        #[arg(long, short, conflicts_with = "adapter")]
        model: Option<String>,
        /// Chat with this adapter applied to its base model.
        #[arg(long)]
        adapter: Option<String>,
        /// A remote endpoint (see `attune endpoints`) answers, with its --model.
        #[arg(long, conflicts_with = "adapter", requires = "model")]
        endpoint: Option<String>,
        /// A prompt template (system prompt, examples, wrapper) before the conversation.
        #[arg(long, conflicts_with = "adapter")]
        template: Option<String>,
        /// System prompt.
        #[arg(long, short)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Generate a continuation of a prompt once.
    Generate {
        /// Model id or name (default: the first registered model).
        #[arg(long, short, conflicts_with = "adapter")]
        model: Option<String>,
        /// Generate with this adapter applied to its base model.
        #[arg(long)]
        adapter: Option<String>,
        /// Apply the model's chat template (the prompt is a user message).
        #[arg(long)]
        chat: bool,
        /// Print the result and timings as JSON instead of streaming text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
        prompt: String,
    },
    /// Serve the library over the OpenAI API (chat completions, completions, models)
    /// until Ctrl-C. Every base model, adapter and prompt template is a model id.
    Serve {
        /// Address to listen on; anything but loopback needs an API key.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Clients must send `Authorization: Bearer KEY` (default: $ATTUNE_API_KEY).
        #[arg(long, value_name = "KEY")]
        api_key: Option<String>,
        /// How many answers may wait for the model before new requests get 503.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
        queue: u16,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Register a .gguf file or a Hugging Face model folder (the file stays where it is), or
    /// what an Ollama Modelfile names (FROM as a model, ADAPTER as an adapter; TEMPLATE is
    /// compared with the model's own chat template).
    Add { path: PathBuf },
    /// Download a model from the Hugging Face Hub (into the HF cache) and register it.
    Pull {
        /// Repository id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.
        repo: String,
        #[arg(long)]
        revision: Option<String>,
        /// Which .gguf file of the repository to take.
        #[arg(long)]
        file: Option<String>,
    },
    /// List registered models.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one model.
    Show {
        /// Model id or name.
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a model from the library (its files are not deleted).
    #[command(alias = "remove")]
    Rm {
        /// Model id or name.
        model: String,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Import a dataset file (chat / ShareGPT / Alpaca JSON Lines, CSV, plain text) into
    /// the library. Bad rows are listed and nothing is imported unless --accept-bad-rows.
    Import {
        path: PathBuf,
        /// Library name (default: the file name without extension).
        #[arg(long)]
        name: Option<String>,
        /// The file's format (default: detected from the extension and the first record).
        #[arg(long, value_parser = parse_format)]
        format: Option<DatasetFormat>,
        /// CSV columns: prompt=COL,response=COL,system=COL,label=COL,id=COL or text=COL.
        #[arg(long, value_name = "KEY=COL,...")]
        map: Option<String>,
        /// Text: one document per blank-line-separated paragraph (default: per line).
        #[arg(long)]
        paragraphs: bool,
        /// Share of rows for validation (default 0.1).
        #[arg(long, allow_negative_numbers = true)]
        valid_fraction: Option<f64>,
        /// Share of rows for testing (default 0).
        #[arg(long, allow_negative_numbers = true)]
        test_fraction: Option<f64>,
        /// Seed of the shuffle that assigns rows to splits (default 42).
        #[arg(long)]
        seed: Option<u64>,
        /// A validation file (the main file is then all training rows).
        #[arg(long, value_name = "PATH")]
        valid: Option<PathBuf>,
        /// A test file.
        #[arg(long, value_name = "PATH")]
        test: Option<PathBuf>,
        /// Import the good rows and skip the bad ones.
        #[arg(long)]
        accept_bad_rows: bool,
        /// Do not ask for confirmation on a terminal.
        #[arg(long, short)]
        yes: bool,
    },
    /// List datasets.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one dataset; with --model, its token statistics under that model.
    Show {
        /// Dataset id or name.
        dataset: String,
        /// Model id or name for token statistics.
        #[arg(long, short)]
        model: Option<String>,
        /// Training max length in tokens (for the statistics).
        #[arg(long, default_value_t = 1024)]
        max_len: usize,
        /// Count loss tokens on the assistant turns or on everything.
        #[arg(long, value_parser = parse_loss_on, default_value = "assistant")]
        loss_on: LossOn,
        #[arg(long)]
        json: bool,
    },
    /// Remove a dataset from the library (its source file is kept).
    #[command(alias = "remove")]
    Rm {
        /// Dataset id or name.
        dataset: String,
    },
    // Documents to data: `from-docs`, `review`, `docsets`.
    #[command(flatten)]
    Docs(docs::DocsCommand),
}

fn parse_format(s: &str) -> Result<DatasetFormat, String> {
    DatasetFormat::parse(s).ok_or_else(|| {
        let all: Vec<&str> = DatasetFormat::ALL.iter().map(|f| f.as_str()).collect();
        format!("unknown format '{s}' (choose {})", all.join(", "))
    })
}

fn parse_loss_on(s: &str) -> Result<LossOn, String> {
    match s {
        "assistant" => Ok(LossOn::Assistant),
        "all" => Ok(LossOn::All),
        _ => Err(format!(
            "unknown loss target '{s}' (choose assistant or all)"
        )),
    }
}

/// `prompt=COL,response=COL,...` into a column map.
fn parse_map(s: &str) -> Result<ColumnMap> {
    let mut map = ColumnMap::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, col)) = part.split_once('=') else {
            bail!("--map: '{part}' is not KEY=COLUMN");
        };
        let col = col.trim();
        if col.is_empty() {
            bail!("--map: '{part}' names no column");
        }
        let slot = match key.trim() {
            "prompt" => &mut map.prompt,
            "response" => &mut map.response,
            "system" => &mut map.system,
            "label" => &mut map.label,
            "id" => &mut map.id,
            "text" => &mut map.text,
            other => bail!(
                "--map: unknown key '{other}' (use prompt, response, system, label, id or text)"
            ),
        };
        *slot = Some(col.to_string());
    }
    Ok(map)
}

/// Sampling flags; unset flags keep the app's defaults.
#[derive(Args, Clone, Default)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// 0 = greedy.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f64>,
    /// 0 disables top-k.
    #[arg(long)]
    top_k: Option<usize>,
    /// 1 disables top-p.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// 0 disables min-p.
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f64>,
    /// 1 disables the repetition penalty.
    #[arg(long, allow_negative_numbers = true)]
    repeat_penalty: Option<f32>,
    /// How many recent tokens the repetition penalty looks at.
    #[arg(long)]
    repeat_last_n: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> Result<SamplingParams> {
        let mut p = SamplingParams::default();
        if let Some(n) = self.max_tokens {
            if n == 0 {
                bail!("--max-tokens must be at least 1");
            }
            p.max_tokens = n;
        }
        if let Some(t) = self.temperature {
            if !t.is_finite() || t < 0.0 {
                bail!("--temperature must be 0 (greedy) or positive, got {t}");
            }
            p.temperature = t;
        }
        if let Some(k) = self.top_k {
            p.top_k = (k > 0).then_some(k);
        }
        if let Some(v) = self.top_p {
            if !(v > 0.0 && v <= 1.0) {
                bail!("--top-p must be in (0, 1], got {v}");
            }
            p.top_p = (v < 1.0).then_some(v);
        }
        if let Some(v) = self.min_p {
            if !(0.0..1.0).contains(&v) {
                bail!("--min-p must be in [0, 1), got {v}");
            }
            p.min_p = (v > 0.0).then_some(v);
        }
        if let Some(v) = self.repeat_penalty {
            if !(v.is_finite() && v > 0.0) {
                bail!("--repeat-penalty must be positive, got {v}");
            }
            p.repetition_penalty = v;
        }
        if let Some(n) = self.repeat_last_n {
            p.repeat_last_n = n;
        }
        if let Some(s) = self.seed {
            p.seed = s;
        }
        if self.stop.iter().any(String::is_empty) {
            bail!("--stop must not be empty");
        }
        p.stop.extend(self.stop.iter().cloned());
        Ok(p)
    }
}

fn main() -> ExitCode {
    attune_engine::fix_thread_count();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, or a missing subcommand: clap prints the help.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            // One line, exit code 1, like every other error.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("error: {first} (see `attune --help`)");
            return ExitCode::FAILURE;
        }
    };
    if matches!(cli.command, Command::Train(_)) {
        // A training process: its peak memory as the estimate expects, before threads start.
        attune_engine::single_arena();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Engine errors already quote their causes: add a cause only if it is new.
            let mut msg = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !msg.contains(&text) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&text);
                }
            }
            let msg = msg.replace(['\n', '\r'], " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let data_dir = cli.data_dir.unwrap_or_else(attune_engine::default_data_dir);
    let engine = Arc::new(Engine::open(&data_dir)?);
    // Generation, runs and evaluations go through the engine actor (queues, one run at
    // a time across processes, per-request cancel); library reads and writes do not.
    let actor = || {
        Actor::start(
            Arc::clone(&engine),
            ActorOptions::default(),
            Arc::new(|_| {}),
        )
    };
    match cli.command {
        Command::Models(cmd) => models(&engine, cmd),
        Command::Data(cmd) => data(&engine, &actor, cmd),
        Command::Train(args) => train::train(&actor(), *args),
        Command::Runs(cmd) => train::runs(&actor(), cmd),
        Command::Adapters(cmd) => train::adapters(&engine, cmd),
        Command::Templates(cmd) => templates::templates(&engine, cmd),
        Command::Endpoints(cmd) => endpoints::endpoints(&engine, cmd),
        Command::Eval(args) => train::eval(&actor(), args),
        Command::Export(args) => {
            // Ctrl-C cancels the export (nothing is left under a final name).
            let cancel = CancelToken::new();
            let _watch = interrupt::cancel_on_ctrl_c(&cancel);
            export::export(&engine, *args, cancel.flag())
        }
        Command::Exports { json } => export::list(&engine, json),
        Command::Arena(cmd) => arena::arena(&actor(), cmd),
        Command::Chat {
            model,
            adapter,
            endpoint,
            template,
            system,
            sampling,
        } => chat(
            &actor(),
            Target {
                model,
                adapter,
                endpoint,
                template,
            },
            system,
            &sampling.params()?,
        ),
        Command::Serve {
            host,
            port,
            api_key,
            queue,
        } => serve(&engine, host, port, api_key, queue),
        Command::Generate {
            model,
            adapter,
            chat,
            json,
            sampling,
            prompt,
        } => generate(
            &actor(),
            Target {
                model,
                adapter,
                endpoint: None,
                template: None,
            },
            chat,
            json,
            &sampling.params()?,
            &prompt,
        ),
    }
}

fn models(engine: &Engine, cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::Add { path } if export::is_modelfile(&path) => {
            export::import_modelfile(engine, &path)?;
        }
        ModelsCommand::Add { path } => {
            let out = engine.add_local_model(&path)?;
            report_added(&out.model, out.already_present);
        }
        ModelsCommand::Pull {
            repo,
            revision,
            file,
        } => {
            let mut bar = ProgressPrinter::new();
            // Ctrl-C cancels the download (what is downloaded stays in the HF cache).
            let cancel = CancelToken::new();
            let _watch = interrupt::cancel_on_ctrl_c(&cancel);
            let out = engine.pull_model_file(
                &repo,
                revision.as_deref(),
                file.as_deref(),
                &mut |p| bar.show(&p),
                cancel.flag(),
            )?;
            report_added(&out.model, out.already_present);
        }
        ModelsCommand::List { json } => {
            let list = engine.list_models()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no models yet: add one with `attune models add <file.gguf>`");
            } else {
                print_table(&list);
            }
        }
        ModelsCommand::Show { model, json } => {
            let m = engine.find_model(&model)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print_model(&m);
            }
        }
        ModelsCommand::Rm { model } => {
            let m = engine.find_model(&model)?;
            engine.remove_model(m.id)?;
            println!("removed model {} '{}' (its files were kept)", m.id, m.name);
        }
    }
    Ok(())
}

fn data(engine: &Engine, actor: &dyn Fn() -> Actor, cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Docs(cmd) => docs::run(actor, engine, cmd)?,
        DataCommand::Import {
            path,
            name,
            format,
            map,
            paragraphs,
            valid_fraction,
            test_fraction,
            seed,
            valid,
            test,
            accept_bad_rows,
            yes,
        } => {
            let split = if valid.is_some() || test.is_some() {
                if valid_fraction.is_some() || test_fraction.is_some() || seed.is_some() {
                    bail!("use either --valid/--test files or --valid-fraction/--test-fraction/--seed, not both");
                }
                let s = |p: Option<PathBuf>| p.map(|p| p.to_string_lossy().into_owned());
                Split::Files {
                    valid_path: s(valid),
                    test_path: s(test),
                }
            } else {
                let valid_fraction = valid_fraction.unwrap_or(0.1);
                let test_fraction = test_fraction.unwrap_or(0.0);
                for (flag, f) in [
                    ("--valid-fraction", valid_fraction),
                    ("--test-fraction", test_fraction),
                ] {
                    if !(0.0..1.0).contains(&f) {
                        bail!("{flag} must be in [0, 1), got {f}");
                    }
                }
                if valid_fraction == 0.0 && test_fraction == 0.0 {
                    Split::AllTrain
                } else {
                    Split::Seeded {
                        valid_fraction,
                        test_fraction,
                        seed: seed.unwrap_or(42),
                    }
                }
            };
            let options = ImportOptions {
                name,
                format,
                columns: map
                    .as_deref()
                    .map(parse_map)
                    .transpose()?
                    .unwrap_or_default(),
                paragraphs,
                split,
                accept_bad_rows,
                preview_rows: 1,
            };
            let preview = engine.inspect_dataset(&path, &options)?;
            print_preview(&preview);
            if preview.bad_row_count > 0 && !accept_bad_rows {
                print_bad_rows(&preview);
                bail!(
                    "{}: {} bad row(s); nothing was imported (fix them, or pass --accept-bad-rows to skip them)",
                    path.display(),
                    preview.bad_row_count
                );
            }
            if !yes && std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
                eprint!("import as '{}'? [y/N] ", preview.name);
                let mut answer = String::new();
                std::io::stdin()
                    .read_line(&mut answer)
                    .context("cannot read standard input")?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    bail!("cancelled; nothing was imported");
                }
            }
            let ds = engine.import_dataset(&path, &options)?;
            println!(
                "imported dataset {} '{}': {} train, {} valid, {} test rows ({} duplicates removed, {} bad rows skipped)",
                ds.id,
                ds.name,
                ds.train_rows,
                ds.valid_rows,
                ds.test_rows,
                ds.duplicates_removed,
                ds.bad_rows_skipped
            );
        }
        DataCommand::List { json } => {
            let list = engine.list_datasets()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no datasets yet: import one with `attune data import <file>`");
            } else {
                print_dataset_table(&list);
            }
        }
        DataCommand::Show {
            dataset,
            model,
            max_len,
            loss_on,
            json,
        } => {
            let ds = engine.find_dataset(&dataset)?;
            let stats = match model {
                Some(m) => {
                    let m = engine.find_model(&m)?;
                    Some(engine.dataset_stats(ds.id, m.id, max_len, loss_on)?)
                }
                None => None,
            };
            if json {
                let mut v = serde_json::to_value(&ds)?;
                if let (Some(obj), Some(stats)) = (v.as_object_mut(), &stats) {
                    obj.insert("stats".into(), serde_json::to_value(stats)?);
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_dataset(&ds);
                if let Some(stats) = &stats {
                    print_stats(stats);
                }
            }
        }
        DataCommand::Rm { dataset } => {
            let ds = engine.find_dataset(&dataset)?;
            engine.remove_dataset(ds.id)?;
            println!(
                "removed dataset {} '{}' (its source file was kept)",
                ds.id, ds.name
            );
        }
    }
    Ok(())
}

/// What the file holds, on stderr (stdout carries the result).
fn print_preview(p: &DatasetPreview) {
    eprintln!(
        "{}: {} format{}, {} {} row(s), {} duplicate(s), {} bad row(s); split {} train / {} valid / {} test",
        p.path,
        p.format.as_str(),
        if p.format_detected { " (detected)" } else { "" },
        p.good_rows,
        p.kind.as_str(),
        p.duplicates,
        p.bad_row_count,
        p.train_rows,
        p.valid_rows,
        p.test_rows
    );
    if let Some(row) = p.rows.first() {
        let text = match &row.sample {
            RowSample::Chat { messages } => messages
                .iter()
                .map(|m| format!("{}: {}", m.role, m.content))
                .collect::<Vec<_>>()
                .join(" | "),
            RowSample::Text { text } => text.clone(),
        };
        let text = text.replace(['\n', '\r'], " ");
        let short: String = text.chars().take(160).collect();
        let more = if short.len() < text.len() { "..." } else { "" };
        eprintln!("first row (line {}): {short}{more}", row.line);
    }
}

/// At most 20 bad rows, then how many more.
fn print_bad_rows(p: &DatasetPreview) {
    const SHOWN: usize = 20;
    for b in p.bad_rows.iter().take(SHOWN) {
        if b.file == p.path {
            eprintln!("  line {}: {}", b.line, b.reason);
        } else {
            eprintln!("  {} line {}: {}", b.file, b.line, b.reason);
        }
    }
    let shown = p.bad_rows.len().min(SHOWN) as u64;
    if p.bad_row_count > shown {
        eprintln!("  ... and {} more", p.bad_row_count - shown);
    }
}

fn print_dataset_table(list: &[DatasetSummary]) {
    let rows: Vec<[String; 8]> = list
        .iter()
        .map(|d| {
            [
                d.id.to_string(),
                d.name.clone(),
                d.format.as_str().to_string(),
                d.train_rows.to_string(),
                d.valid_rows.to_string(),
                d.test_rows.to_string(),
                d.content_hash[..12.min(d.content_hash.len())].to_string(),
                d.created_at.clone(),
            ]
        })
        .collect();
    let header = [
        "ID", "NAME", "FORMAT", "TRAIN", "VALID", "TEST", "HASH", "CREATED",
    ];
    print_columns(&header, &rows);
}

fn split_text(s: &Split) -> String {
    match s {
        Split::Seeded {
            valid_fraction,
            test_fraction,
            seed,
        } => format!("seeded (valid {valid_fraction}, test {test_fraction}, seed {seed})"),
        Split::AllTrain => "all train".to_string(),
        Split::Files {
            valid_path,
            test_path,
        } => format!(
            "files (valid {}, test {})",
            valid_path.as_deref().unwrap_or("-"),
            test_path.as_deref().unwrap_or("-")
        ),
    }
}

fn print_dataset(d: &DatasetSummary) {
    println!("id:           {}", d.id);
    println!("name:         {}", d.name);
    println!(
        "format:       {} ({} rows)",
        d.format.as_str(),
        d.kind.as_str()
    );
    println!(
        "rows:         {} train, {} valid, {} test",
        d.train_rows, d.valid_rows, d.test_rows
    );
    println!("duplicates:   {} removed", d.duplicates_removed);
    println!("bad rows:     {} skipped", d.bad_rows_skipped);
    println!("split:        {}", split_text(&d.split));
    println!("content hash: {}", d.content_hash);
    println!("source:       {}", d.source_path);
    println!("created:      {}", d.created_at);
}

fn print_stats(s: &DatasetStats) {
    println!();
    println!(
        "tokens under '{}' (max length {}, loss on {}):",
        s.model,
        s.max_len,
        match s.loss_on {
            LossOn::Assistant => "assistant turns",
            LossOn::All => "all tokens",
        }
    );
    println!(
        "{:<6} {:>6} {:>6} {:>8} {:>6} {:>10} {:>10} {:>9}",
        "SPLIT", "ROWS", "MIN", "MEAN", "MAX", "TOTAL", "TARGET", "TRUNCATED"
    );
    for p in &s.splits {
        println!(
            "{:<6} {:>6} {:>6} {:>8.1} {:>6} {:>10} {:>10} {:>9}",
            p.split.as_str(),
            p.rows,
            p.tokens_min,
            p.tokens_mean,
            p.tokens_max,
            p.tokens_total,
            p.target_tokens,
            p.truncated_rows
        );
    }
}

pub(crate) fn report_added(m: &ModelSummary, already_present: bool) {
    if already_present {
        println!("already present: model {} '{}'", m.id, m.name);
    } else {
        println!(
            "added model {} '{}' ({}, {} parameters, {})",
            m.id,
            m.name,
            m.architecture,
            human_count(m.parameters),
            m.quantization
        );
    }
}

fn source_text(s: &ModelSource) -> String {
    match s {
        ModelSource::Local { path } => path.clone(),
        ModelSource::Hub {
            repo,
            revision,
            path,
        } => format!("hf://{repo}@{revision} ({path})"),
    }
}

fn print_table(list: &[ModelSummary]) {
    let rows: Vec<[String; 7]> = list
        .iter()
        .map(|m| {
            [
                m.id.to_string(),
                m.name.clone(),
                m.architecture.clone(),
                human_count(m.parameters),
                m.quantization.clone(),
                human_bytes(m.file_size),
                m.added_at.clone(),
            ]
        })
        .collect();
    let header = ["ID", "NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "ADDED"];
    print_columns(&header, &rows);
}

fn print_model(m: &ModelSummary) {
    println!("id:             {}", m.id);
    println!("name:           {}", m.name);
    println!("family:         {}", m.family);
    println!("architecture:   {}", m.architecture);
    println!("format:         {:?}", m.format);
    println!(
        "parameters:     {} ({})",
        m.parameters,
        human_count(m.parameters)
    );
    println!("quantization:   {}", m.quantization);
    println!("context length: {}", m.context_length);
    println!(
        "file size:      {} ({} bytes)",
        human_bytes(m.file_size),
        m.file_size
    );
    println!("sha256:         {}", m.sha256);
    println!("source:         {}", source_text(&m.source));
    println!("added:          {}", m.added_at);
    let mut can: Vec<&str> = Vec::new();
    if m.support.chat {
        can.push("chat");
    }
    can.extend(m.support.methods.iter().map(String::as_str));
    println!(
        "can:            {}",
        if can.is_empty() {
            "nothing on this machine".to_string()
        } else {
            can.join(", ")
        }
    );
    if !m.support.lora_targets.is_empty() {
        println!("lora targets:   {}", m.support.lora_targets.join(", "));
    }
    for l in &m.support.limits {
        println!("limit:          {l}");
    }
}

fn human_count(n: u64) -> String {
    match n {
        0..=999 => n.to_string(),
        1_000..=999_999 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n as f64 >= 1024.0 * MIB {
        format!("{:.2} GiB", n as f64 / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", n as f64 / MIB)
    }
}

/// Download progress on stderr: a redrawn line on a terminal, one line per file otherwise.
struct ProgressPrinter {
    tty: bool,
    last: Option<Instant>,
}

impl ProgressPrinter {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, p: &PullProgress) {
        let done = p.total_bytes > 0 && p.bytes_done >= p.total_bytes;
        let text = format!(
            "[{}/{}] {} {} / {}{}",
            p.file_index,
            p.file_count,
            p.file,
            human_bytes(p.bytes_done),
            human_bytes(p.total_bytes),
            if p.cached { " (cached)" } else { "" }
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let due = self
                .last
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(200));
            if due || done {
                let _ = write!(err, "\r\x1b[2K{text}");
                if done {
                    let _ = writeln!(err);
                }
                self.last = Some(Instant::now());
            }
        } else if done {
            let _ = writeln!(err, "{text}");
        }
    }
}

fn pick_model(engine: &Engine, model: Option<&str>) -> Result<ModelSummary> {
    Ok(match model {
        Some(m) => engine.find_model(m)?,
        None => engine.default_model()?,
    })
}

/// Streams events: tokens to stdout, loading notice to stderr.
fn stream_to_stdout(event: ChatEvent) {
    match event {
        ChatEvent::Loading => {
            if std::io::stderr().is_terminal() {
                eprintln!("(loading model...)");
            }
        }
        ChatEvent::Token { text } => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        ChatEvent::Retrying {
            reason, wait_ms, ..
        } => {
            eprintln!("({reason}; retrying in {:.1} s)", wait_ms as f64 / 1e3);
        }
        ChatEvent::Queued { .. } | ChatEvent::Done { .. } => {}
    }
}

fn stats_line(s: &GenerationStats) -> String {
    format!(
        "[{} prompt tokens at {:.0} tok/s; {} tokens at {:.1} tok/s; {:?}]",
        s.prompt_tokens,
        s.prompt_tok_per_s,
        s.generated_tokens,
        s.generate_tok_per_s,
        s.finish_reason
    )
}

/// Who answers: a model, an adapter on its base, or a remote endpoint's model, with
/// a prompt template before the conversation if one is named.
struct Target {
    model: Option<String>,
    adapter: Option<String>,
    endpoint: Option<String>,
    template: Option<String>,
}

/// A resolved [`Target`]: what to show, and the engine's target.
struct Resolved {
    /// The local model (a local answer, or an adapter's base).
    model: Option<ModelSummary>,
    adapter: Option<String>,
    /// "gpt-4o-mini at openai", "SmolLM2 with template 'Brief'", ...
    label: String,
    target: ChatTarget,
}

impl Target {
    fn resolve(&self, engine: &Engine) -> Result<Resolved> {
        let template = match &self.template {
            Some(t) => Some(engine.find_template(t)?),
            None => None,
        };
        let (model, adapter, label, target) = match (&self.endpoint, &self.adapter) {
            (Some(e), _) => {
                let ep = engine.find_endpoint(e)?;
                let Some(m) = self.model.clone() else {
                    bail!("--endpoint needs --model: one of the endpoint's models (`attune endpoints models {}`)", ep.name);
                };
                let label = format!("{m} at {}", ep.name);
                (
                    None,
                    None,
                    label,
                    ChatTarget::Endpoint {
                        endpoint_id: ep.id,
                        model: m,
                    },
                )
            }
            (None, Some(a)) => {
                let ad = engine.find_adapter(a)?;
                let base = engine.adapter_base(a)?;
                let label = format!(
                    "'{}' (id {}) with adapter '{}'",
                    base.name, base.id, ad.name
                );
                (
                    Some(base),
                    Some(ad.name),
                    label,
                    ChatTarget::Adapter { adapter_id: ad.id },
                )
            }
            (None, None) => {
                let m = pick_model(engine, self.model.as_deref())?;
                let label = format!("'{}' (id {})", m.name, m.id);
                let target = ChatTarget::Base { model_id: m.id };
                (Some(m), None, label, target)
            }
        };
        let Some(t) = template else {
            return Ok(Resolved {
                model,
                adapter,
                label,
                target,
            });
        };
        let target = match target {
            ChatTarget::Base { model_id } => ChatTarget::Template {
                model_id,
                template_id: t.id,
                version: None,
                values: Default::default(),
                endpoint: None,
            },
            ChatTarget::Endpoint { endpoint_id, model } => ChatTarget::Template {
                model_id: 0,
                template_id: t.id,
                version: None,
                values: Default::default(),
                endpoint: Some(attune_protocol::EndpointModel { endpoint_id, model }),
            },
            _ => bail!("--template applies to a model or an endpoint's model, not an adapter"),
        };
        Ok(Resolved {
            model,
            adapter,
            label: format!("{label} with template '{}' v{}", t.name, t.version),
            target,
        })
    }
}

/// `attune serve`: the OpenAI-compatible server until Ctrl-C.
fn serve(
    engine: &Arc<Engine>,
    host: String,
    port: u16,
    api_key: Option<String>,
    queue: u16,
) -> Result<()> {
    let api_key = api_key.or_else(|| {
        std::env::var("ATTUNE_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
    });
    let actor = Actor::start(
        Arc::clone(engine),
        ActorOptions {
            generation_queue: usize::from(queue),
            ..ActorOptions::default()
        },
        Arc::new(|_| {}),
    );
    let options = attune_server::ServerOptions {
        host,
        port,
        api_key: api_key.clone(),
    };
    let server = attune_server::RunningServer::start(actor.clone(), &options)?;
    let models = engine.list_models()?.len();
    let adapters = engine.list_adapters()?.len();
    let templates = engine.list_templates()?.len();
    let base = format!("http://{}/v1", server.addr);
    println!("Attune serves the OpenAI API at {base}");
    println!(
        "  {models} model(s), {adapters} adapter(s), {templates} template(s): curl {base}/models{}",
        if api_key.is_some() {
            " -H \"Authorization: Bearer $KEY\""
        } else {
            ""
        }
    );
    println!("  Ctrl-C stops the server.");
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let _watch = interrupt::on_ctrl_c(move || {
        let _ = stop.send(());
    });
    let _ = stopped.recv();
    eprintln!("stopping: answers in progress are cancelled");
    actor.shutdown(Duration::from_secs(10));
    server.stop();
    Ok(())
}

/// Generates through the actor; Ctrl-C stops this answer (the program goes on).
fn generate_interruptible(
    actor: &Actor,
    generation: Generation,
    on_event: attune_engine::Sink<ChatEvent>,
) -> Result<GenerationStats, attune_engine::EngineError> {
    let cancel = CancelToken::new();
    let _watch = interrupt::cancel_on_ctrl_c(&cancel);
    actor.generate(generation, &cancel, on_event)
}

fn sink(json: bool) -> attune_engine::Sink<ChatEvent> {
    if json {
        Box::new(|_| {})
    } else {
        Box::new(stream_to_stdout)
    }
}

fn generate(
    actor: &Actor,
    target: Target,
    chat: bool,
    json: bool,
    params: &SamplingParams,
    prompt: &str,
) -> Result<()> {
    let r = target.resolve(actor.engine())?;
    let prompt = if chat {
        Prompt::Chat(vec![ChatMessage {
            role: "user".to_string(),
            content: prompt.to_string(),
        }])
    } else {
        Prompt::Text(prompt.to_string())
    };
    let generation = Generation {
        client: "cli".into(),
        target: r.target,
        prompt,
        params: params.clone(),
    };
    let stats = generate_interruptible(actor, generation, sink(json))?;
    if json {
        let mut v = serde_json::to_value(&stats)?;
        if let Some(obj) = v.as_object_mut() {
            if let Some(m) = &r.model {
                obj.insert("model_id".into(), m.id.into());
                obj.insert("model".into(), m.name.clone().into());
            }
            if let Some(a) = &r.adapter {
                obj.insert("adapter".into(), a.clone().into());
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!("{}", stats_line(&stats));
    }
    Ok(())
}

fn chat(
    actor: &Actor,
    target: Target,
    system: Option<String>,
    params: &SamplingParams,
) -> Result<()> {
    let r = target.resolve(actor.engine())?;
    let target = r.target;
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!(
            "chatting with {}; /exit or Ctrl-D quits, /reset starts over, Ctrl-C stops an answer",
            r.label
        );
    }
    let base: Vec<ChatMessage> = system
        .into_iter()
        .map(|content| ChatMessage {
            role: "system".to_string(),
            content,
        })
        .collect();
    let mut history = base.clone();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if tty {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read standard input")?;
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = base.clone();
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage {
            role: "user".to_string(),
            content: input.to_string(),
        });
        let generation = Generation {
            client: "cli".into(),
            target: target.clone(),
            prompt: Prompt::Chat(history.clone()),
            params: params.clone(),
        };
        match generate_interruptible(actor, generation, sink(false)) {
            Ok(stats) => {
                println!();
                if tty {
                    eprintln!("{}", stats_line(&stats));
                }
                history.push(ChatMessage {
                    role: "assistant".to_string(),
                    content: stats.text,
                });
            }
            Err(e) => {
                // Forget the unanswered question; the conversation goes on.
                history.pop();
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// Ctrl-C handling: while an answer is generated, SIGINT stops that answer (the
/// program goes on); while a run trains, it asks the run to pause (checkpoint, then exit
/// 130); otherwise it ends the program as usual. The handler only sets atomics; a
/// watcher thread turns them into the request's cancel or the run's pause.
mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Once};
    use std::time::Duration;

    use attune_engine::CancelToken;

    static PRESSED: AtomicBool = AtomicBool::new(false);
    static CATCHING: AtomicBool = AtomicBool::new(false);
    static INSTALL: Once = Once::new();

    extern "C" fn on_sigint(_: libc::c_int) {
        if CATCHING.load(Ordering::SeqCst) {
            PRESSED.store(true, Ordering::SeqCst);
        } else {
            // Async-signal-safe exit with the conventional status for SIGINT.
            unsafe { libc::_exit(130) };
        }
    }

    fn install() {
        INSTALL.call_once(|| {
            let handler: extern "C" fn(libc::c_int) = on_sigint;
            // SAFETY: installs a handler that only touches atomics and calls _exit.
            unsafe {
                libc::signal(libc::SIGINT, handler as libc::sighandler_t);
            }
        });
    }

    /// While alive, Ctrl-C calls `then` (once per press) instead of ending the program.
    pub struct Watch {
        done: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    pub fn on_ctrl_c(then: impl Fn() + Send + 'static) -> Watch {
        install();
        PRESSED.store(false, Ordering::SeqCst);
        CATCHING.store(true, Ordering::SeqCst);
        let done = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&done);
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if PRESSED.swap(false, Ordering::SeqCst) {
                    then();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watch {
            done,
            thread: Some(thread),
        }
    }

    /// Ctrl-C cancels `token` while the returned watch lives.
    pub fn cancel_on_ctrl_c(token: &CancelToken) -> Watch {
        let token = token.clone();
        on_ctrl_c(move || token.cancel())
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            CATCHING.store(false, Ordering::SeqCst);
            self.done.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Prints `rows` under `header` in left-aligned columns two spaces apart.
pub(crate) fn print_columns<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(&header.map(String::from)));
    for r in rows {
        println!("{}", line(r));
    }
}
