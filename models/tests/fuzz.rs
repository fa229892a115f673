//! Fuzzing the runtime's readers of untrusted files with the seeded mutation harness
//! (`attune_models::fuzz`): the GGUF header reader (and candle's tensor reads after it), the
//! safetensors header check (and candle's loader after it), chat-template compiling and
//! rendering, and the PEFT adapter reader (weights and config). Seeds: the committed corpus in
//! `models/fuzz/corpus/<target>/`. Budget: `ATTUNE_FUZZ_SECS` per target (a few seconds in
//! `cargo test`; `scripts/fuzz.sh` runs longer). A crash is any panic, caught or not.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use attune_models::chat_template::{ChatTemplate, Message};
use attune_models::fuzz;
use candle_core::Device;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    fuzz::corpus(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target),
    )
}

fn target(name: &str, seed: u64, f: impl FnMut(&[u8])) {
    target_on(name, name, seed, f)
}

/// Fuzzes `f` as `name`, starting from the corpus of `seeds`.
fn target_on(name: &str, seeds: &str, seed: u64, f: impl FnMut(&[u8])) {
    let report = fuzz::run(name, &corpus(seeds), fuzz::budget(2.0), seed, f);
    println!("{}", report.line());
    assert_eq!(
        (report.crashes, report.hangs),
        (0, 0),
        "{}: {}",
        report.line(),
        report.first_failure.unwrap_or_default()
    );
}

#[test]
fn fuzz_gguf() {
    let path = Path::new("fuzz.gguf");
    target("gguf", 11, |data| {
        let Ok(content) = attune_models::gguf_header::read(&mut Cursor::new(data), path) else {
            return;
        };
        // What the loaders do next with an accepted header: the config, the template, every
        // tensor through candle (its extent was checked), the quantization label.
        let _ = attune_models::gguf::config_from_content(&content, path);
        let _ = ChatTemplate::from_gguf(&content, path)
            .map(|t| t.render(&[Message::new("user", "hi")], true));
        for (name, info) in &content.tensor_infos {
            if info.shape.elem_count() <= 1 << 16 {
                let _ = content.tensor(&mut Cursor::new(data), name, &Device::Cpu);
            }
        }
    });
}

#[test]
fn fuzz_safetensors() {
    target("safetensors", 12, |data| {
        if data.len() < 8 {
            return;
        }
        let n = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
        let Some(header) = usize::try_from(n)
            .ok()
            .and_then(|n| data.get(8..8usize.checked_add(n)?))
        else {
            return;
        };
        let data_size = (data.len() - 8 - header.len()) as u64;
        if attune_models::inspect::parse_safetensors_header(header, data_size).is_ok() {
            // Accepted headers are what candle then reads.
            let _ = candle_core::safetensors::load_buffer(data, &Device::Cpu);
        }
    });
}

#[test]
fn fuzz_chat_template() {
    let conversation = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hello {{ evil }} {% raw %}"),
        Message::new("assistant", "Hi."),
        Message::new("user", "Thanks, ünïcödé 日本"),
    ];
    target("chat_template", 13, |data| {
        let source = String::from_utf8_lossy(data);
        if let Ok(t) = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())) {
            let _ = t.render(&conversation, true);
            let _ = t.render(&conversation[..1], false);
            let _ = t.render(&[], true);
        }
    });
}

#[test]
fn fuzz_chat_template_messages() {
    // The real templates on hostile message text (roles and contents from the input).
    let templates: Vec<ChatTemplate> = corpus("chat_template")
        .into_iter()
        .filter_map(|s| ChatTemplate::new(String::from_utf8_lossy(&s), None, None).ok())
        .collect();
    assert!(templates.len() >= 4);
    target_on("chat_messages", "chat_template", 14, |data| {
        let text = String::from_utf8_lossy(data);
        let messages: Vec<Message> = text
            .split('\n')
            .take(64)
            .enumerate()
            .map(|(i, part)| {
                let role = match (i, part.len() % 5) {
                    (_, 0) => part.split(' ').next().unwrap_or("user"),
                    (_, 1) => "system",
                    (i, _) if i % 2 == 0 => "user",
                    _ => "assistant",
                };
                Message::new(role, part)
            })
            .collect();
        for t in &templates {
            let _ = t.render(&messages, true);
        }
    });
}

/// Writes the adapter files into a fresh temporary folder and reads it back.
fn load_adapter(config: &[u8], weights: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else { return };
    if std::fs::write(dir.path().join("adapter_config.json"), config).is_err()
        || std::fs::write(dir.path().join("adapter_model.safetensors"), weights).is_err()
    {
        return;
    }
    let _ = attune_models::train::peft::load(dir.path());
}

#[test]
fn fuzz_peft_weights() {
    let configs = corpus("peft_config");
    target("peft_weights", 15, |weights| {
        for c in &configs {
            load_adapter(c, weights);
        }
    });
}

#[test]
fn fuzz_peft_config() {
    let weights = corpus("peft_weights");
    target("peft_config", 16, |config| {
        for w in &weights {
            load_adapter(config, w);
        }
    });
}
