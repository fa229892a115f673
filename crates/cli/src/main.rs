//! `attune`: the command line over the engine — manage the model library, pull from
//! the Hugging Face Hub, chat and generate. Errors print as one `error: ...` line on
//! stderr with exit code 1.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use attune_engine::{Engine, PullProgress};
use attune_protocol::{
    ChatEvent, ChatMessage, GenerationStats, ModelSource, ModelSummary, SamplingParams,
};
use clap::{Args, Parser, Subcommand};

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
    /// Chat with a model: reads lines from stdin, `/exit` or end of input quits,
    /// `/reset` starts over, Ctrl-C stops the current answer.
    Chat {
        /// Model id or name (default: the first registered model).
        #[arg(long, short)]
        model: Option<String>,
        /// System prompt.
        #[arg(long, short)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Generate a continuation of a prompt once.
    Generate {
        /// Model id or name (default: the first registered model).
        #[arg(long, short)]
        model: Option<String>,
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
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Register a .gguf file or a Hugging Face model folder (the file stays where it is).
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
    let data_dir = cli.data_dir.unwrap_or_else(attune_models::default_data_dir);
    let engine = Engine::open(&data_dir)?;
    match cli.command {
        Command::Models(cmd) => models(&engine, cmd),
        Command::Chat {
            model,
            system,
            sampling,
        } => chat(&engine, model.as_deref(), system, &sampling.params()?),
        Command::Generate {
            model,
            chat,
            json,
            sampling,
            prompt,
        } => generate(
            &engine,
            model.as_deref(),
            chat,
            json,
            &sampling.params()?,
            &prompt,
        ),
    }
}

fn models(engine: &Engine, cmd: ModelsCommand) -> Result<()> {
    match cmd {
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
            let out = engine.pull_model_file(
                &repo,
                revision.as_deref(),
                file.as_deref(),
                &mut |p| bar.show(&p),
                interrupt::flag(),
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

fn report_added(m: &ModelSummary, already_present: bool) {
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
    let mut widths = header.map(str::len);
    for r in &rows {
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
    for r in &rows {
        println!("{}", line(r));
    }
}

fn print_model(m: &ModelSummary) {
    println!("id:             {}", m.id);
    println!("name:           {}", m.name);
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
        ChatEvent::Done { .. } => {}
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

fn generate(
    engine: &Engine,
    model: Option<&str>,
    chat: bool,
    json: bool,
    params: &SamplingParams,
    prompt: &str,
) -> Result<()> {
    let m = pick_model(engine, model)?;
    let cancel = interrupt::flag();
    interrupt::set_generating(true);
    let mut on_event = |e: ChatEvent| {
        if !json {
            stream_to_stdout(e)
        }
    };
    let stats = if chat {
        let messages = [ChatMessage {
            role: "user".to_string(),
            content: prompt.to_string(),
        }];
        engine.chat(m.id, &messages, params, cancel, &mut on_event)
    } else {
        engine.generate(m.id, prompt, params, cancel, &mut on_event)
    };
    interrupt::set_generating(false);
    let stats = stats?;
    if json {
        let mut v = serde_json::to_value(&stats)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("model_id".into(), m.id.into());
            obj.insert("model".into(), m.name.clone().into());
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!("{}", stats_line(&stats));
    }
    Ok(())
}

fn chat(
    engine: &Engine,
    model: Option<&str>,
    system: Option<String>,
    params: &SamplingParams,
) -> Result<()> {
    let m = pick_model(engine, model)?;
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!(
            "chatting with '{}' (id {}); /exit or Ctrl-D quits, /reset starts over, Ctrl-C stops an answer",
            m.name, m.id
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
        let cancel = interrupt::flag();
        cancel.store(false, Ordering::SeqCst);
        interrupt::set_generating(true);
        let result = engine.chat(m.id, &history, params, cancel, &mut stream_to_stdout);
        interrupt::set_generating(false);
        match result {
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

/// Ctrl-C handling: while an answer is generated, SIGINT sets the cancel flag (the
/// answer stops, the program goes on); otherwise it ends the program as usual.
mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Once;

    static CANCEL: AtomicBool = AtomicBool::new(false);
    static GENERATING: AtomicBool = AtomicBool::new(false);
    static INSTALL: Once = Once::new();

    extern "C" fn on_sigint(_: libc::c_int) {
        if GENERATING.load(Ordering::SeqCst) {
            CANCEL.store(true, Ordering::SeqCst);
        } else {
            // Async-signal-safe exit with the conventional status for SIGINT.
            unsafe { libc::_exit(130) };
        }
    }

    /// The process-wide cancel flag, with the handler installed.
    pub fn flag() -> &'static AtomicBool {
        INSTALL.call_once(|| {
            let handler: extern "C" fn(libc::c_int) = on_sigint;
            // SAFETY: installs a handler that only touches atomics and calls _exit.
            unsafe {
                libc::signal(libc::SIGINT, handler as libc::sighandler_t);
            }
        });
        &CANCEL
    }

    pub fn set_generating(on: bool) {
        if on {
            CANCEL.store(false, Ordering::SeqCst);
        }
        GENERATING.store(on, Ordering::SeqCst);
    }
}
