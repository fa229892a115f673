//! Human-readable text for the figures the protocol carries.

use attune_protocol::{FinishReason, GenerationStats, ModelSource};

/// Parameter count as "135M" / "1.7B".
pub fn parameters(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.0}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.0}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// Byte size in binary units ("93.8 MiB").
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Context length as "8192 tokens".
pub fn context(n: u64) -> String {
    format!("{n} tokens")
}

/// First 12 hex digits of a digest.
pub fn sha_prefix(sha: &str) -> String {
    sha.chars().take(12).collect()
}

/// Where a model came from, in one line.
pub fn source(source: &ModelSource) -> String {
    match source {
        ModelSource::Local { path } => path.clone(),
        ModelSource::Hub {
            repo,
            revision,
            path,
        } => format!("{repo}@{revision}/{path}"),
    }
}

fn finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos => "end of answer",
        FinishReason::Length => "token limit",
        FinishReason::Stop => "stop sequence",
        FinishReason::Cancelled => "stopped",
    }
}

/// One line of timings for a finished answer.
pub fn stats(s: &GenerationStats) -> String {
    format!(
        "Prompt: {} tokens in {:.0} ms ({:.1} tok/s) · Answer: {} tokens in {:.0} ms ({:.1} tok/s) · {}",
        s.prompt_tokens,
        s.prompt_ms,
        s.prompt_tok_per_s,
        s.generated_tokens,
        s.generate_ms,
        s.generate_tok_per_s,
        finish(s.finish_reason)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_naturally() {
        assert_eq!(parameters(134_515_008), "135M");
        assert_eq!(parameters(1_711_376_384), "1.7B");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(98_362_432), "93.8 MiB");
        assert_eq!(sha_prefix("0123456789abcdef0123"), "0123456789ab");
    }

    #[test]
    fn stats_line_names_counts_and_reason() {
        let s = GenerationStats {
            text: "hi".into(),
            finish_reason: FinishReason::Eos,
            prompt_tokens: 12,
            generated_tokens: 3,
            prompt_ms: 40.0,
            generate_ms: 30.0,
            prompt_tok_per_s: 300.0,
            generate_tok_per_s: 100.0,
        };
        let line = stats(&s);
        assert!(line.contains("12 tokens in 40 ms"), "{line}");
        assert!(line.contains("3 tokens in 30 ms (100.0 tok/s)"), "{line}");
        assert!(line.ends_with("end of answer"), "{line}");
    }
}

/// What a model can do here: "chat · LoRA · soft prompt · full fine-tuning", or what is left.
pub fn support(s: &attune_protocol::ModelSupport) -> String {
    let mut parts: Vec<&str> = Vec::new();
    if s.chat {
        parts.push("chat");
    }
    for m in &s.methods {
        parts.push(match m.as_str() {
            "lora" => "LoRA",
            "prompt" => "soft prompt",
            "full" => "full fine-tuning",
            other => other,
        });
    }
    if parts.is_empty() {
        "nothing on this machine (see below)".to_string()
    } else if s.methods.is_empty() {
        format!(
            "{} — no training on this machine (see below)",
            parts.join(" · ")
        )
    } else {
        parts.join(" · ")
    }
}
