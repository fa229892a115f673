//! `attune templates ...`: prompt templates (a system prompt, few-shot examples and a
//! user wrapper with `{{input}}`), the no-training path; the app's Templates page edits
//! the same records.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use attune_engine::Engine;
use attune_protocol::{ChatMessage, TemplateDraft, TemplateRecord};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TemplatesCommand {
    /// Every template (newest version).
    List {
        #[arg(long)]
        json: bool,
    },
    /// One template (id or name).
    Show {
        template: String,
        #[arg(long)]
        json: bool,
    },
    /// Creates a template, or adds a version to the one with this name.
    Add {
        name: String,
        /// The system prompt.
        #[arg(long)]
        system: Option<String>,
        /// Wraps each user message; must contain {{input}}.
        #[arg(long)]
        user: Option<String>,
        /// A few-shot example as "USER => ASSISTANT" (repeatable, in order).
        #[arg(long = "example", value_name = "USER => ASSISTANT")]
        examples: Vec<String>,
        /// A default variable value as NAME=VALUE (repeatable).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// What changed in this version.
        #[arg(long)]
        note: Option<String>,
    },
    /// Removes a template and all its versions.
    Rm { template: String },
}

pub fn templates(engine: &Engine, cmd: TemplatesCommand) -> Result<()> {
    match cmd {
        TemplatesCommand::List { json } => {
            let list = engine.list_templates()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!(
                    "no templates yet: add one with `attune templates add NAME --system ...`"
                );
            } else {
                println!("{:<4} {:<24} {:>8}  SYSTEM", "ID", "NAME", "VERSION");
                for t in &list {
                    let system = t.system.as_deref().unwrap_or("").replace('\n', " ");
                    let short: String = system.chars().take(60).collect();
                    println!("{:<4} {:<24} {:>8}  {short}", t.id, t.name, t.version);
                }
            }
        }
        TemplatesCommand::Show { template, json } => {
            let t = engine.find_template(&template)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print_template(&t);
            }
        }
        TemplatesCommand::Add {
            name,
            system,
            user,
            examples,
            vars,
            note,
        } => {
            let mut turns = Vec::new();
            for e in &examples {
                let Some((u, a)) = e.split_once("=>") else {
                    bail!("--example '{e}': write it as \"USER => ASSISTANT\"");
                };
                turns.push(ChatMessage {
                    role: "user".into(),
                    content: u.trim().to_string(),
                });
                turns.push(ChatMessage {
                    role: "assistant".into(),
                    content: a.trim().to_string(),
                });
            }
            let mut variables = BTreeMap::new();
            for v in &vars {
                let Some((k, val)) = v.split_once('=') else {
                    bail!("--var '{v}': write it as NAME=VALUE");
                };
                variables.insert(k.trim().to_string(), val.to_string());
            }
            let id = engine.find_template(&name).ok().map(|t| t.id);
            let t = engine.save_template(&TemplateDraft {
                id,
                name,
                system,
                examples: turns,
                user,
                variables,
                note,
            })?;
            println!("template {} '{}' version {}", t.id, t.name, t.version);
        }
        TemplatesCommand::Rm { template } => {
            let t = engine.find_template(&template)?;
            engine.remove_template(t.id)?;
            println!("removed template {} '{}' and its versions", t.id, t.name);
        }
    }
    Ok(())
}

fn print_template(t: &TemplateRecord) {
    println!("id:       {}", t.id);
    println!("name:     {}", t.name);
    println!("version:  {} of {}", t.version, t.versions);
    if let Some(s) = &t.system {
        println!("system:   {s}");
    }
    for pair in t.examples.chunks(2) {
        let u = pair.first().map(|m| m.content.as_str()).unwrap_or("");
        let a = pair.get(1).map(|m| m.content.as_str()).unwrap_or("");
        println!("example:  {u} => {a}");
    }
    if let Some(u) = &t.user {
        println!("user:     {u}");
    }
    for (k, v) in &t.variables {
        println!("var:      {k}={v}");
    }
}
