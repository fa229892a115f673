//! `attune data from-docs`, `attune data review` and `attune data docsets`: documents to
//! data. A folder of documents becomes a document set, a teacher (a local model, an adapter
//! or an endpoint's model) writes rows per chunk, held for review; the accepted rows become
//! a dataset.

use std::path::PathBuf;

use anyhow::{bail, Result};
use attune_engine::docs::{self, TeachPlan, DEFAULT_CHUNK_CHARS};
use attune_engine::{Actor, CancelToken, Engine, EngineError};
use attune_protocol::{
    ChatMessage, ChatTarget, DocImportOptions, DocRow, DocRowStatus, DocsetSummary, ReviewAction,
    Split, TeachSpec, TeacherMode,
};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum DocsCommand {
    /// Read a folder of documents (PDF, DOCX, Markdown, HTML, text) into a document set, and
    /// have a teacher write question-answer pairs (or instructions) per chunk. The rows are
    /// held for review (`attune data review`).
    FromDocs(Box<FromDocsArgs>),
    /// List a document set's rows with their source passages; accept, reject, edit or
    /// regenerate them; make the dataset from the accepted rows.
    Review(Box<ReviewArgs>),
    /// List document sets.
    Docsets {
        #[arg(long)]
        json: bool,
    },
}

/// Who writes the rows.
#[derive(Args, Clone)]
pub struct TeacherArgs {
    /// The teacher: a model or adapter (id or name), or with --endpoint one of the
    /// endpoint's models.
    #[arg(long, value_name = "MODEL")]
    teacher: Option<String>,
    /// The teacher is a model of this API endpoint.
    #[arg(long, value_name = "NAME")]
    endpoint: Option<String>,
    /// qa (question-answer pairs) or instructions.
    #[arg(long, default_value = "qa", value_parser = parse_mode)]
    mode: TeacherMode,
    /// The stored template that writes the prompt (default: the mode's default template,
    /// created on first use; edit it with `attune templates`).
    #[arg(long, value_name = "TEMPLATE")]
    prompt: Option<String>,
    /// How many rows to ask for per chunk (the template's {{count}}).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    count: u32,
    /// Most tokens the teacher writes per chunk.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.3, allow_negative_numbers = true)]
    temperature: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Args)]
pub struct FromDocsArgs {
    /// The folder of documents (sub-folders included).
    dir: PathBuf,
    /// The document set's name.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    teacher: TeacherArgs,
    /// Longest chunk, in characters.
    #[arg(long, default_value_t = DEFAULT_CHUNK_CHARS)]
    chunk_chars: usize,
    /// Teach only the first N chunks (the others can be taught later with --resume).
    #[arg(long)]
    max_chunks: Option<usize>,
    /// Only read the documents; no teacher.
    #[arg(long)]
    no_teach: bool,
    /// Teach the chunks of the existing set NAME that have no rows yet (DIR is ignored).
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ReviewArgs {
    /// The document set (id or name).
    docset: String,
    /// Only rows with this status (pending, accepted, rejected, edited, failed).
    #[arg(long, value_parser = parse_status)]
    status: Option<DocRowStatus>,
    /// Accept these rows (ids, repeatable or comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "ID")]
    accept: Vec<i64>,
    /// Reject these rows.
    #[arg(long, value_delimiter = ',', value_name = "ID")]
    reject: Vec<i64>,
    /// Edit this row: give --question and/or --answer (the rest is kept).
    #[arg(long, value_name = "ID")]
    edit: Option<i64>,
    #[arg(long, requires = "edit")]
    question: Option<String>,
    #[arg(long, requires = "edit")]
    answer: Option<String>,
    /// Accept every pending row (scripts).
    #[arg(long)]
    accept_all: bool,
    /// Ask the teacher again for this row's chunk (needs --teacher): the row is rejected
    /// and the new rows are held for review.
    #[arg(long, value_name = "ID")]
    regenerate: Option<i64>,
    #[command(flatten)]
    teacher: TeacherArgs,
    /// Then make the chat dataset NAME from the accepted and edited rows.
    #[arg(long, value_name = "NAME")]
    dataset: Option<String>,
    /// Then make the plain-text dataset NAME (continued pre-training) from the set's chunks.
    #[arg(long, value_name = "NAME")]
    pretrain: Option<String>,
    #[arg(long)]
    json: bool,
}

fn parse_mode(s: &str) -> Result<TeacherMode, String> {
    match s {
        "qa" => Ok(TeacherMode::Qa),
        "instructions" => Ok(TeacherMode::Instructions),
        _ => Err(format!("unknown mode '{s}' (choose qa or instructions)")),
    }
}

fn parse_status(s: &str) -> Result<DocRowStatus, String> {
    DocRowStatus::parse(s).ok_or_else(|| {
        format!("unknown status '{s}' (choose pending, accepted, rejected, edited or failed)")
    })
}

impl TeacherArgs {
    fn target(&self, engine: &Engine) -> Result<ChatTarget> {
        let Some(teacher) = self.teacher.as_deref() else {
            bail!("--teacher is needed: a model or adapter (id or name), or with --endpoint an endpoint's model");
        };
        if let Some(e) = &self.endpoint {
            let ep = engine.find_endpoint(e)?;
            return Ok(ChatTarget::Endpoint {
                endpoint_id: ep.id,
                model: teacher.to_string(),
            });
        }
        match engine.find_model(teacher) {
            Ok(m) => Ok(ChatTarget::Base { model_id: m.id }),
            Err(EngineError::ModelNotFound(_)) => match engine.find_adapter(teacher) {
                Ok(a) => Ok(ChatTarget::Adapter { adapter_id: a.id }),
                Err(_) => bail!(
                    "no model or adapter '{teacher}' in the library (see `attune models list` \
                     and `attune adapters list`; for an API model add --endpoint NAME)"
                ),
            },
            Err(e) => Err(e.into()),
        }
    }

    fn plan(&self, engine: &Engine, max_chunks: Option<usize>) -> Result<TeachPlan> {
        // The flags' own words for what the engine would refuse in its own.
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!(
                "--temperature must be 0 (greedy) or positive, got {}",
                self.temperature
            );
        }
        let spec = TeachSpec {
            target: self.target(engine)?,
            mode: self.mode,
            template: self.prompt.clone(),
            count: self.count,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            seed: self.seed,
            max_chunks: max_chunks.map(|n| n as u64),
        };
        Ok(engine.teach_plan(&spec)?)
    }
}

pub fn run(actor: &dyn Fn() -> Actor, engine: &Engine, cmd: DocsCommand) -> Result<()> {
    match cmd {
        DocsCommand::FromDocs(args) => from_docs(actor, engine, *args),
        DocsCommand::Review(args) => review(actor, engine, *args),
        DocsCommand::Docsets { json } => {
            let sets = engine.list_docsets()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sets)?);
                return Ok(());
            }
            if sets.is_empty() {
                println!("no document sets (add one with `attune data from-docs DIR --name N --teacher MODEL`)");
            }
            for s in &sets {
                println!(
                    "{:>4}  {}  {} documents, {} chunks; rows: {} pending, {} accepted, {} edited, {} rejected, {} failed",
                    s.id,
                    s.name,
                    s.documents.len(),
                    s.chunks,
                    s.pending,
                    s.accepted,
                    s.edited,
                    s.rejected,
                    s.failed
                );
            }
            Ok(())
        }
    }
}

fn print_set(s: &DocsetSummary) {
    for d in &s.documents {
        let pages = d.pages.map(|p| format!(", {p} pages")).unwrap_or_default();
        println!(
            "read {} ({}{pages}, {} characters, {} chunks)",
            d.path,
            d.format.as_str(),
            d.chars,
            d.chunks
        );
    }
    for k in &s.skipped {
        eprintln!("skipped {}: {}", k.path, k.reason);
    }
}

fn from_docs(actor: &dyn Fn() -> Actor, engine: &Engine, args: FromDocsArgs) -> Result<()> {
    // Check the teacher before reading anything.
    let plan = if args.no_teach {
        None
    } else {
        Some(args.teacher.plan(engine, args.max_chunks)?)
    };
    let set = if args.resume {
        engine.find_docset(&args.name)?
    } else {
        let set = engine.import_docs(
            &args.dir,
            &DocImportOptions {
                name: args.name.clone(),
                max_chunk_chars: args.chunk_chars,
            },
        )?;
        if !args.json {
            print_set(&set);
        }
        set
    };
    let Some(plan) = plan else {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&set)?);
        } else {
            println!(
                "document set '{}' (id {}): {} chunks",
                set.name, set.id, set.chunks
            );
        }
        return Ok(());
    };
    let actor = actor();
    let cancel = CancelToken::new();
    let _watch = crate::interrupt::cancel_on_ctrl_c(&cancel);
    if !args.json {
        eprintln!(
            "teacher: {} with template '{}' v{}",
            engine.target_label(&plan.target)?,
            plan.template.name,
            plan.template.version
        );
    }
    let report = docs::teach(&actor, set.id, &plan, &cancel, &mut |done, total| {
        if done == 0 {
            eprintln!("teaching {total} chunks");
        } else {
            eprintln!("chunk {done}/{total}");
        }
    })?;
    let set = engine.find_docset(&set.id.to_string())?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"docset": set, "report": report}))?
        );
    } else {
        println!(
            "document set '{}' (id {}): {} chunks taught, {} rows held for review, {} chunks \
             without a usable answer; review them: attune data review {}",
            set.name, set.id, report.chunks, report.rows, report.failed, set.name
        );
    }
    Ok(())
}

fn one_line(s: &str, max: usize) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        let mut t: String = flat.chars().take(max).collect();
        t.push_str("...");
        t
    } else {
        flat
    }
}

fn print_row(r: &DocRow) {
    println!(
        "#{} [{}] {} (teacher {}, template '{}' v{})",
        r.id,
        r.status.as_str(),
        r.provenance.describe(),
        r.teacher,
        r.template,
        r.template_version
    );
    println!("  passage: {}", one_line(&r.passage, 160));
    for m in &r.messages {
        let who = match m.role.as_str() {
            "user" => "Q",
            "assistant" => "A",
            other => other,
        };
        println!("  {who}: {}", one_line(&m.content, 400));
    }
    if let Some(e) = &r.error {
        println!("  error: {e}");
        println!("  teacher wrote: {}", one_line(&r.raw_output, 200));
    }
}

fn review(actor: &dyn Fn() -> Actor, engine: &Engine, args: ReviewArgs) -> Result<()> {
    let set = engine.find_docset(&args.docset)?;
    for id in &args.accept {
        check_in_set(engine, set.id, *id)?;
        engine.review_doc_row(*id, &ReviewAction::Accept)?;
    }
    for id in &args.reject {
        check_in_set(engine, set.id, *id)?;
        engine.review_doc_row(*id, &ReviewAction::Reject)?;
    }
    if let Some(id) = args.edit {
        let row = check_in_set(engine, set.id, id)?;
        if args.question.is_none() && args.answer.is_none() {
            bail!("--edit {id} needs --question and/or --answer");
        }
        let mut messages: Vec<ChatMessage> = row.messages.clone();
        for m in &mut messages {
            match m.role.as_str() {
                "user" => {
                    if let Some(q) = &args.question {
                        m.content = q.clone();
                    }
                }
                "assistant" => {
                    if let Some(a) = &args.answer {
                        m.content = a.clone();
                    }
                }
                _ => {}
            }
        }
        engine.review_doc_row(id, &ReviewAction::Edit { messages })?;
    }
    if args.accept_all {
        let n = engine.accept_all_doc_rows(set.id)?;
        eprintln!("accepted {n} pending rows");
    }
    if let Some(id) = args.regenerate {
        check_in_set(engine, set.id, id)?;
        let plan = args.teacher.plan(engine, None)?;
        let actor = actor();
        let new = docs::regenerate(&actor, id, &plan, &CancelToken::new())?;
        eprintln!("row {id}: {} new row(s)", new.len());
    }
    let mut made = Vec::new();
    if let Some(name) = &args.dataset {
        let ds = engine.docset_dataset(set.id, name, Split::AllTrain)?;
        eprintln!(
            "dataset '{}' (id {}): {} chat rows from the accepted rows",
            ds.name, ds.id, ds.train_rows
        );
        made.push(ds);
    }
    if let Some(name) = &args.pretrain {
        let ds = engine.docset_pretrain_dataset(set.id, name, Split::AllTrain)?;
        eprintln!(
            "dataset '{}' (id {}): {} text rows for continued pre-training",
            ds.name, ds.id, ds.train_rows
        );
        made.push(ds);
    }
    let rows: Vec<DocRow> = engine
        .docset_rows(set.id)?
        .into_iter()
        .filter(|r| args.status.is_none_or(|s| r.status == s))
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"rows": rows, "datasets": made}))?
        );
        return Ok(());
    }
    for r in &rows {
        print_row(r);
    }
    let set = engine.find_docset(&set.id.to_string())?;
    println!(
        "{} rows: {} pending, {} accepted, {} edited, {} rejected, {} failed",
        set.pending + set.accepted + set.edited + set.rejected + set.failed,
        set.pending,
        set.accepted,
        set.edited,
        set.rejected,
        set.failed
    );
    Ok(())
}

/// Row `id` if it belongs to set `set_id`.
fn check_in_set(engine: &Engine, set_id: i64, id: i64) -> Result<DocRow> {
    match engine.docset_rows(set_id)?.into_iter().find(|r| r.id == id) {
        Some(r) => Ok(r),
        None => bail!("no row {id} in this document set (see `attune data review` for the ids)"),
    }
}
