//! The default model's own chat template renders the reference chat prompt exactly as
//! transformers did, and the rendered text tokenizes to the reference ids.

#![allow(clippy::unwrap_used)]

use attune_models::chat_template::{ChatTemplate, Message};
use attune_models::inspect::read_gguf_header;
use attune_models::tokenizer::Tok;

mod common;
use common::{model_path, read_reference};

#[test]
fn gguf_template_matches_transformers() {
    let path = model_path();
    let (content, _) = read_gguf_header(&path).unwrap();
    let template = ChatTemplate::from_gguf(&content, &path).unwrap();
    let tok = Tok::from_gguf(&content, &path).unwrap();
    assert!(template
        .source()
        .contains("You are a helpful AI assistant named SmolLM"));

    let reference = read_reference("reference_logits.json");
    let chat = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "chat")
        .unwrap();
    let messages: Vec<Message> = serde_json::from_value(chat["source"].clone()).unwrap();
    let text = template.render(&messages, true).unwrap();
    assert_eq!(text, chat["text"].as_str().unwrap());
    let expected: Vec<u32> = serde_json::from_value(chat["token_ids"].clone()).unwrap();
    assert_eq!(tok.encode(&text, false).unwrap(), expected);

    // The generation reference's prompt too.
    let gen = read_reference("generate_reference.json");
    let prompt = template
        .render(
            &[Message::new(
                "user",
                "Explain in a few sentences why the sky is blue.",
            )],
            true,
        )
        .unwrap();
    assert_eq!(prompt, gen["prompt_text"].as_str().unwrap());
    assert_eq!(
        tok.encode(&prompt, false).unwrap().len() as u64,
        gen["n_prompt_tokens"].as_u64().unwrap()
    );

    // A system message replaces the default one; no generation prompt without the flag.
    let text = template
        .render(
            &[Message::new("system", "S"), Message::new("user", "U")],
            false,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    );
}
