//! `cargo bench -p attune-server --bench serve`: the OpenAI-compatible server under 1, 4
//! and 16 concurrent streaming clients on the default model. Each client asks for a
//! greedy chat answer of `ATTUNE_SERVE_TOKENS` (default 64) tokens, streamed; the bench
//! prints the time to first token (median and worst) and tokens/s per client and in
//! total. `ATTUNE_SERVE_CLIENTS=1,4,16` picks the concurrency levels.
//!
//! One model answers one request at a time (the fair queue), so with N clients the
//! total rate stays the model's decode rate and the time to first token grows with the
//! queue: the figures show what a client waits.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attune_engine::{Actor, ActorOptions, Engine};
use attune_server::{RunningServer, ServerOptions};
use serde_json::{json, Value};

struct Client {
    ttft: Duration,
    total: Duration,
    tokens: usize,
}

fn one_client(url: &str, model: &str, max_tokens: usize, i: usize) -> Client {
    let started = Instant::now();
    let r = ureq::post(url)
        .send_json(json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("Write a short story about a lighthouse keeper number {i}.")}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .expect("stream");
    let mut ttft = None;
    let mut tokens = 0;
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.expect("line");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).expect("chunk");
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
            && ttft.is_none()
        {
            ttft = Some(started.elapsed());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    Client {
        ttft: ttft.unwrap_or_else(|| started.elapsed()),
        total: started.elapsed(),
        tokens,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let model_file = attune_models::default_model_path();
    assert!(model_file.is_file(), "run scripts/fetch-model.sh first");
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(Engine::open(&dir.path().join("data")).expect("engine"));
    let model = engine.add_local_model(&model_file).expect("add").model;
    let actor = Actor::start(engine, ActorOptions::default(), Arc::new(|_| {}));
    let server = RunningServer::start(
        actor,
        &ServerOptions {
            port: 0,
            ..ServerOptions::default()
        },
    )
    .expect("server");
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let max_tokens: usize = std::env::var("ATTUNE_SERVE_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let levels: Vec<usize> = std::env::var("ATTUNE_SERVE_CLIENTS")
        .unwrap_or_else(|_| "1,4,16".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    // Warm-up: load the model.
    one_client(&url, &model.name, 4, 0);
    println!(
        "attune serve, {} (streaming, greedy, {max_tokens} tokens per answer)",
        model.name
    );
    println!(
        "{:>8} {:>14} {:>14} {:>18} {:>14}",
        "clients", "TTFT median s", "TTFT worst s", "tok/s per client", "tok/s total"
    );
    for &n in &levels {
        let started = Instant::now();
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let url = url.clone();
                let name = model.name.clone();
                std::thread::spawn(move || one_client(&url, &name, max_tokens, i))
            })
            .collect();
        let clients: Vec<Client> = handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect();
        let wall = started.elapsed().as_secs_f64();
        let tokens: usize = clients.iter().map(|c| c.tokens).sum();
        let ttft: Vec<f64> = clients.iter().map(|c| c.ttft.as_secs_f64()).collect();
        let worst = ttft.iter().cloned().fold(0.0, f64::max);
        let per_client = median(
            clients
                .iter()
                .map(|c| c.tokens as f64 / (c.total - c.ttft).as_secs_f64().max(1e-9))
                .collect(),
        );
        println!(
            "{n:>8} {:>14.2} {:>14.2} {:>18.1} {:>14.1}",
            median(ttft),
            worst,
            per_client,
            tokens as f64 / wall
        );
    }
    server.stop();
}
