//! `attune export NAME --format gguf|gguf-lora|ollama|hf [--quant ...] --out DIR`: writes the
//! export, shows progress on stderr, and prints the verification last.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Result};
use attune_engine::Engine;
use attune_protocol::{ExportFormat, ExportProgress, ExportQuant, ExportRequest, ExportSubject};
use clap::Args;

#[derive(Args)]
pub struct ExportArgs {
    /// The adapter or model to export (an adapter name first, then a model id or name).
    pub name: String,
    /// gguf, gguf-lora, ollama or hf.
    #[arg(long, value_parser = parse_format)]
    pub format: ExportFormat,
    /// Weights: f16 (default), bf16, q8_0, q4_k_m or f32 (gguf and ollama; the others are f32).
    #[arg(long, value_parser = parse_quant)]
    pub quant: Option<ExportQuant>,
    /// Destination folder (created if missing; must be empty unless --overwrite).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Export the model NAME even if an adapter has that name.
    #[arg(long)]
    pub model: bool,
    /// Replace files of the same names in a non-empty destination (other files stay).
    #[arg(long)]
    pub overwrite: bool,
    /// Ollama: keep a LoRA as ADAPTER over the base GGUF instead of merging it.
    #[arg(long)]
    pub ollama_adapter: bool,
    /// Ollama: SYSTEM and few-shot MESSAGEs from this saved prompt template.
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
    /// Print the record (with every check) as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_format(s: &str) -> Result<ExportFormat, String> {
    ExportFormat::parse(s)
        .ok_or_else(|| format!("unknown format '{s}' (choose gguf, gguf-lora, ollama or hf)"))
}

fn parse_quant(s: &str) -> Result<ExportQuant, String> {
    ExportQuant::parse(s).ok_or_else(|| {
        format!("unknown quantization '{s}' (choose f16, bf16, q8_0, q4_k_m or f32)")
    })
}

pub fn export(
    engine: &Engine,
    args: ExportArgs,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let subject = if !args.model && engine.find_adapter(&args.name).is_ok() {
        ExportSubject::Adapter {
            adapter: args.name.clone(),
        }
    } else {
        ExportSubject::Model {
            model: args.name.clone(),
        }
    };
    let req = ExportRequest {
        subject,
        format: args.format,
        quant: args.quant,
        dest: args.out.to_string_lossy().into_owned(),
        overwrite: args.overwrite,
        ollama_adapter: args.ollama_adapter,
        template: args.template.clone(),
    };
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let mut show = |p: ExportProgress| {
        let line = if p.total > 1 {
            format!("{} {}/{}", p.stage, p.done, p.total)
        } else {
            p.stage.clone()
        };
        if tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if p.stage != last {
            eprintln!("{}", p.stage);
        }
        last = p.stage;
    };
    let res = engine.export(&req, &mut show, cancel);
    if tty {
        eprint!("\r\x1b[2K");
    }
    let rec = res?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
    } else {
        println!(
            "exported {} '{}' as {} ({}) to {}",
            rec.subject_kind,
            rec.subject,
            rec.format.as_str(),
            rec.quant.as_str(),
            rec.path
        );
        for f in &rec.files {
            println!("  {}  {} bytes", f.name, f.bytes);
        }
        println!("tolerance: {}", rec.verification.tolerance);
        for c in &rec.verification.checks {
            println!(
                "  {} {} [{}]: {}",
                if c.passed { "ok  " } else { "FAIL" },
                c.name,
                c.file,
                c.detail
            );
        }
        println!("verification: {}", rec.verification.summary);
    }
    if !rec.verification.passed {
        bail!(
            "the export's check failed; the files are kept in {} (see above)",
            rec.path
        );
    }
    Ok(())
}

/// `attune exports`: past exports, newest first.
pub fn list(engine: &Engine, json: bool) -> Result<()> {
    let all = engine.list_exports()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no exports yet (attune export NAME --format gguf --out DIR)");
        return Ok(());
    }
    let rows: Vec<[String; 7]> = all
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.subject.clone(),
                r.format.as_str().to_string(),
                r.quant.as_str().to_string(),
                if r.verification.passed {
                    "passed"
                } else {
                    "FAILED"
                }
                .to_string(),
                r.created_at.clone(),
                r.path.clone(),
            ]
        })
        .collect();
    crate::print_columns(
        &[
            "ID", "SUBJECT", "FORMAT", "TYPE", "CHECK", "CREATED", "FOLDER",
        ],
        &rows,
    );
    Ok(())
}

/// A file named `Modelfile` (or `*.Modelfile`) that is not a GGUF.
pub fn is_modelfile(path: &std::path::Path) -> bool {
    let named = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|n| n == "modelfile" || n.ends_with(".modelfile"));
    named && path.is_file()
}

/// `attune models add Modelfile`.
pub fn import_modelfile(engine: &Engine, path: &std::path::Path) -> Result<()> {
    let out = engine.import_modelfile(path, None)?;
    crate::report_added(&out.model.model, out.model.already_present);
    if let Some(a) = &out.adapter {
        println!(
            "imported lora adapter {} '{}' for '{}' (from ADAPTER)",
            a.id, a.name, a.base_model
        );
    }
    if let Some(t) = &out.template_note {
        println!("{t}");
    }
    if let Some(s) = &out.system {
        println!("SYSTEM: {s}");
    }
    for (k, v) in &out.parameters {
        println!("PARAMETER {k} {v}");
    }
    Ok(())
}
