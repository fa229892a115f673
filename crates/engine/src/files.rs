//! What a path dropped on the window (or picked) is, before the user acts on it: a
//! model (a `.gguf` file, or a folder with `config.json` and safetensors), a PEFT
//! adapter folder (`adapter_config.json`), a dataset file Attune reads, or something
//! else with the reason it cannot be used. Reads at most the first line of a JSON
//! Lines file; never the whole file.

use std::io::{BufRead, BufReader};
use std::path::Path;

use attune_protocol::{DatasetFormat, DroppedFile};

/// How many bytes of a JSON Lines file are read to tell its format.
const PEEK_BYTES: u64 = 256 * 1024;

/// Classifies `path` (see the module documentation). Never fails: an unreadable or
/// unknown path is `Unsupported` with a plain reason.
pub fn classify_path(path: &Path) -> DroppedFile {
    let shown = path.display().to_string();
    let unsupported = |reason: String| DroppedFile::Unsupported {
        path: shown.clone(),
        reason,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return unsupported(format!("no such file or folder: {shown}"));
        }
        Err(e) => return unsupported(format!("cannot read {shown}: {e}")),
    };
    if meta.is_dir() {
        return classify_dir(path, shown);
    }
    if !meta.is_file() {
        // A FIFO would block the reads below; a device never ends.
        return unsupported(format!(
            "{shown} is {}, not a regular file",
            attune_models::fsio::kind_of(&meta)
        ));
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "gguf" => DroppedFile::Model { path: shown },
        "csv" | "tsv" => DroppedFile::Dataset {
            path: shown,
            format: Some(DatasetFormat::Csv),
        },
        "txt" | "text" | "md" => DroppedFile::Dataset {
            path: shown,
            format: Some(DatasetFormat::Text),
        },
        "jsonl" | "json" | "ndjson" => {
            let format = json_lines_format(path);
            DroppedFile::Dataset {
                path: shown,
                format,
            }
        }
        "safetensors" => unsupported(
            "a single .safetensors file is not enough: drop the model's folder (with \
             config.json and tokenizer.json) or the adapter's folder (with \
             adapter_config.json)"
                .to_string(),
        ),
        "" => unsupported(format!(
            "{shown} has no extension: Attune reads .gguf models, model or adapter folders, \
             and .jsonl, .json, .csv, .tsv or .txt datasets"
        )),
        other => unsupported(format!(
            "a .{other} file is not a model, dataset or adapter Attune can read (it reads \
             .gguf models, model or adapter folders, and .jsonl, .json, .csv, .tsv or .txt \
             datasets)"
        )),
    }
}

fn classify_dir(path: &Path, shown: String) -> DroppedFile {
    if path.join("adapter_config.json").is_file() {
        return DroppedFile::Adapter { path: shown };
    }
    let has_safetensors = std::fs::read_dir(path)
        .map(|entries| {
            entries.filter_map(Result::ok).any(|e| {
                e.path()
                    .extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))
            })
        })
        .unwrap_or(false);
    if path.join("config.json").is_file() && has_safetensors {
        return DroppedFile::Model { path: shown };
    }
    let reason = if has_safetensors {
        format!("the folder {shown} has safetensors weights but no config.json")
    } else if path.join("config.json").is_file() {
        format!("the folder {shown} has a config.json but no .safetensors weights")
    } else {
        format!(
            "the folder {shown} is neither a model (config.json with .safetensors weights) nor \
             an adapter (adapter_config.json)"
        )
    };
    DroppedFile::Unsupported {
        path: shown,
        reason,
    }
}

/// The JSON Lines layout from the first line that is a JSON object: `messages` (chat),
/// `conversations` (ShareGPT) or `instruction` (Alpaca). None when it cannot be told.
fn json_lines_format(path: &Path) -> Option<DatasetFormat> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let reader = BufReader::new(file.take(PEEK_BYTES));
    for line in reader.lines() {
        let Ok(line) = line else { return None };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(line) else {
            return None;
        };
        return if obj.contains_key("messages") {
            Some(DatasetFormat::Chat)
        } else if obj.contains_key("conversations") {
            Some(DatasetFormat::Sharegpt)
        } else if obj.contains_key("instruction") {
            Some(DatasetFormat::Alpaca)
        } else {
            None
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(d: &DroppedFile) -> &'static str {
        match d {
            DroppedFile::Model { .. } => "model",
            DroppedFile::Dataset { .. } => "dataset",
            DroppedFile::Adapter { .. } => "adapter",
            DroppedFile::Unsupported { .. } => "unsupported",
        }
    }

    #[test]
    fn files_classify_models_datasets_adapters_and_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::write(p.join("m.gguf"), b"GGUF").expect("write");
        std::fs::write(p.join("d.csv"), b"prompt,response\n").expect("write");
        std::fs::write(p.join("d.txt"), b"hello\n").expect("write");
        std::fs::write(
            p.join("chat.jsonl"),
            b"\n{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n",
        )
        .expect("write");
        std::fs::write(
            p.join("alpaca.json"),
            b"{\"instruction\":\"x\",\"output\":\"y\"}\n",
        )
        .expect("write");
        std::fs::write(p.join("odd.jsonl"), b"{\"foo\":1}\n").expect("write");
        std::fs::write(p.join("paper.pdf"), b"%PDF").expect("write");
        std::fs::create_dir(p.join("hf")).expect("mkdir");
        std::fs::write(p.join("hf/config.json"), b"{}").expect("write");
        std::fs::write(p.join("hf/model.safetensors"), b"").expect("write");
        std::fs::create_dir(p.join("lora")).expect("mkdir");
        std::fs::write(p.join("lora/adapter_config.json"), b"{}").expect("write");
        std::fs::create_dir(p.join("empty")).expect("mkdir");

        assert_eq!(kind(&classify_path(&p.join("m.gguf"))), "model");
        assert_eq!(kind(&classify_path(&p.join("hf"))), "model");
        assert_eq!(kind(&classify_path(&p.join("lora"))), "adapter");
        let fmt = |name: &str| match classify_path(&p.join(name)) {
            DroppedFile::Dataset { format, .. } => format,
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(fmt("d.csv"), Some(DatasetFormat::Csv));
        assert_eq!(fmt("d.txt"), Some(DatasetFormat::Text));
        assert_eq!(fmt("chat.jsonl"), Some(DatasetFormat::Chat));
        assert_eq!(fmt("alpaca.json"), Some(DatasetFormat::Alpaca));
        assert_eq!(fmt("odd.jsonl"), None);
        match classify_path(&p.join("paper.pdf")) {
            DroppedFile::Unsupported { reason, .. } => {
                assert!(reason.contains("a .pdf file is not a model"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        match classify_path(&p.join("missing.gguf")) {
            DroppedFile::Unsupported { reason, .. } => {
                assert!(reason.contains("no such file"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(kind(&classify_path(&p.join("empty"))), "unsupported");
    }
}
