//! `attune endpoints ...`: remote OpenAI-compatible endpoints (OpenAI, Ollama, vLLM,
//! LM Studio, llama.cpp's server, another Attune). Keys go to the OS keyring; where
//! none runs, `ATTUNE_KEY_<NAME>` in the environment gives the key to each command.

use std::io::Read;

use anyhow::{bail, Context, Result};
use attune_engine::{endpoint_key_env_var, Engine};
use attune_protocol::{EndpointDraft, EndpointSummary, KeyStorage};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum EndpointsCommand {
    /// Adds an endpoint and fetches its models.
    Add {
        name: String,
        /// The API's base URL, e.g. https://api.openai.com/v1 or http://localhost:11434/v1.
        #[arg(long)]
        url: String,
        /// Read the API key from standard input (it never appears in the shell history).
        #[arg(long)]
        key_from_stdin: bool,
        /// Seconds to wait for the connection (default 10).
        #[arg(long, value_name = "S")]
        connect_timeout: Option<f64>,
        /// Seconds a stream may stay silent (default 60).
        #[arg(long, value_name = "S")]
        idle_timeout: Option<f64>,
    },
    /// Every endpoint, with where its key is and how many models it has.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Asks an endpoint for its models (and remembers them).
    Models { endpoint: String },
    /// Removes an endpoint and its key.
    Rm { endpoint: String },
}

fn key_text(k: KeyStorage) -> &'static str {
    match k {
        KeyStorage::None => "none",
        KeyStorage::Keyring => "keyring",
        KeyStorage::Memory => "memory",
        KeyStorage::Missing => "missing",
    }
}

fn print_models(e: &EndpointSummary) {
    if e.models.is_empty() {
        println!("{} has no models", e.name);
    }
    for m in &e.models {
        println!("{m}");
    }
}

pub fn endpoints(engine: &Engine, cmd: EndpointsCommand) -> Result<()> {
    match cmd {
        EndpointsCommand::Add {
            name,
            url,
            key_from_stdin,
            connect_timeout,
            idle_timeout,
        } => {
            let key = if key_from_stdin {
                let mut k = String::new();
                std::io::stdin()
                    .read_to_string(&mut k)
                    .context("cannot read the key from standard input")?;
                let k = k.trim().to_string();
                if k.is_empty() {
                    bail!("--key-from-stdin: standard input held no key");
                }
                Some(k)
            } else {
                None
            };
            let added = engine.add_endpoint(&EndpointDraft {
                name,
                base_url: url,
                api_key: key,
                connect_timeout_s: connect_timeout,
                idle_timeout_s: idle_timeout,
            })?;
            let e = &added.endpoint;
            println!("added endpoint {} '{}' at {}", e.id, e.name, e.base_url);
            if e.key != KeyStorage::None && e.key != KeyStorage::Keyring {
                eprintln!(
                    "note: no keyring service runs here, so the key was not kept; give it to \
                     each command as {}",
                    endpoint_key_env_var(&e.name)
                );
            }
            match engine.refresh_endpoint_models(&e.id.to_string()) {
                Ok(e) => println!("{} model(s): {}", e.models.len(), e.models.join(", ")),
                Err(err) => eprintln!(
                    "warning: could not list its models yet: {err} (try `attune endpoints models {}`)",
                    e.name
                ),
            }
        }
        EndpointsCommand::List { json } => {
            let list = engine.list_endpoints()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no endpoints yet: add one with `attune endpoints add NAME --url URL`");
            } else {
                println!(
                    "{:<4} {:<16} {:<8} {:>6}  URL",
                    "ID", "NAME", "KEY", "MODELS"
                );
                for e in &list {
                    println!(
                        "{:<4} {:<16} {:<8} {:>6}  {}",
                        e.id,
                        e.name,
                        key_text(e.key),
                        e.models.len(),
                        e.base_url
                    );
                }
            }
        }
        EndpointsCommand::Models { endpoint } => {
            let e = engine.refresh_endpoint_models(&endpoint)?;
            print_models(&e);
        }
        EndpointsCommand::Rm { endpoint } => {
            let e = engine.remove_endpoint(&endpoint)?;
            println!("removed endpoint {} '{}' and its key", e.id, e.name);
        }
    }
    Ok(())
}
