//! `inspect` on the real default GGUF, a truncated copy, a garbage file and a tiny
//! Hugging Face folder written in a temporary directory.

#![allow(clippy::unwrap_used)]

use attune_models::inspect::{inspect, ModelFormat};
use attune_models::Error;

mod common;
use common::model_path;

#[test]
fn real_gguf() {
    let path = model_path();
    let t = std::time::Instant::now();
    let info = inspect(&path).unwrap();
    let elapsed = t.elapsed();
    println!("inspect {}: {elapsed:?}", path.display());
    assert_eq!(info.format, ModelFormat::Gguf);
    assert_eq!(info.architecture, "llama");
    // transformers counts 134,515,008 parameters for this file (tied embeddings).
    assert_eq!(info.parameters, 134_515_008);
    assert_eq!(info.quantization, "Q4_1");
    assert_eq!(info.context_length, 8192);
    assert_eq!(info.file_size, std::fs::metadata(&path).unwrap().len());
    assert_eq!(info.files, vec![path.clone()]);
    assert_eq!(info.name, "SmolLM2-135M-Instruct.Q4_1");
    assert!(elapsed.as_secs_f64() < 2.0, "inspect took {elapsed:?}");
}

#[test]
fn truncated_gguf_is_a_format_error() {
    let path = model_path();
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() / 2, 2_000_000, 100, 3] {
        let copy = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&copy, &bytes[..cut]).unwrap();
        match inspect(&copy) {
            Err(Error::Format { path: p, .. }) => assert_eq!(p, copy),
            other => panic!("cut at {cut}: expected a format error, got {other:?}"),
        }
    }
}

#[test]
fn garbage_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(
        &garbage,
        b"this is not a model at all, just some text\n".repeat(100),
    )
    .unwrap();
    let err = inspect(&garbage).unwrap_err();
    assert!(
        matches!(&err, Error::Format { path, .. } if path == &garbage),
        "{err}"
    );
    assert!(err.to_string().contains("garbage.gguf"), "{err}");

    // GGUF magic followed by nonsense counts.
    let bad = dir.path().join("bad.gguf");
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&bad, &b).unwrap();
    assert!(matches!(inspect(&bad), Err(Error::Format { .. })));

    let missing = dir.path().join("nope.gguf");
    assert!(matches!(inspect(&missing), Err(Error::Io { .. })));

    // A folder without config.json is not a model.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(inspect(&empty), Err(Error::Format { .. })));
}

/// Writes a safetensors file by hand: 8-byte header length, JSON header, data.
fn write_safetensors(path: &std::path::Path, tensors: &[(&str, &str, Vec<u64>, usize)]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, dtype, shape, elem_size) in tensors {
        let n: u64 = shape.iter().product();
        let len = n as usize * elem_size;
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend(std::iter::repeat_n(0u8, offset));
    std::fs::write(path, out).unwrap();
}

#[test]
fn tiny_hf_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-llama");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","max_position_embeddings":2048,"hidden_size":8}"#,
    )
    .unwrap();
    write_safetensors(
        &model.join("model.safetensors"),
        &[
            ("model.embed_tokens.weight", "BF16", vec![32, 8], 2),
            ("model.norm.weight", "BF16", vec![8], 2),
            ("lm_head.weight", "F32", vec![32, 8], 4),
        ],
    );
    let info = inspect(&model).unwrap();
    assert_eq!(info.format, ModelFormat::Safetensors);
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.name, "tiny-llama");
    assert_eq!(info.parameters, 32 * 8 + 8 + 32 * 8);
    assert_eq!(info.quantization, "mixed: BF16+F32");
    assert_eq!(info.context_length, 2048);
    let st = model.join("model.safetensors");
    assert_eq!(info.file_size, std::fs::metadata(&st).unwrap().len());
    assert_eq!(info.files, vec![st.clone()]);

    // Truncate the weights: the header now promises more bytes than the file has.
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 10]).unwrap();
    let err = inspect(&model).unwrap_err();
    assert!(
        matches!(&err, Error::Format { path, .. } if path == &st),
        "{err}"
    );

    // Garbage header.
    std::fs::write(&st, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!!").unwrap();
    assert!(matches!(inspect(&model), Err(Error::Format { .. })));
}
