//! The playground: answers from any [`ChatTarget`] (a base model, an adapter on its base,
//! or a model behind a stored prompt template), readable target labels, and the exact
//! text a model receives for a prompt or trains on for a dataset row.

use std::sync::atomic::AtomicBool;

use attune_models::chat_template::Message;
use attune_protocol::{
    AdapterKind, ChatEvent, ChatMessage, ChatTarget, GenerationStats, RowSample, SamplingParams,
};

use crate::actor::{Generation, Prompt};
use crate::error::EngineError;
use crate::templates::{apply_template, record_template};
use crate::{adapted_parts, chat, Engine};

impl Engine {
    /// Answers `messages` with `target`, streaming like [`Engine::chat`]:
    /// - `Base`: the model as it is;
    /// - `Adapter`: the adapter applied to its base (the last three stay loaded, so panes
    ///   that alternate between adapters do not reload them);
    /// - `Template`: the template's system prompt and few-shot turns, then the
    ///   conversation with each user turn wrapped, answered by the model.
    pub fn chat_target(
        &self,
        target: &ChatTarget,
        messages: &[ChatMessage],
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::InvalidInput(
                "the conversation has no messages".to_string(),
            ));
        }
        match target {
            ChatTarget::Base { model_id } => {
                self.chat(*model_id, messages, params, cancel, on_event)
            }
            ChatTarget::Adapter { adapter_id } => {
                let row = self
                    .store
                    .get_adapter(*adapter_id)?
                    .ok_or_else(|| EngineError::AdapterNotFound(adapter_id.to_string()))?;
                let m = self.adapted_model_of(&row, on_event)?;
                chat::chat(&adapted_parts(&m), messages, params, cancel, on_event)
            }
            ChatTarget::Template {
                model_id,
                template_id,
                version,
                values,
                endpoint,
            } => {
                let record = self.get_template(*template_id, *version)?;
                let (turns, _) = apply_template(&record_template(&record, values), messages);
                match endpoint {
                    Some(e) => self.endpoint_chat(
                        e.endpoint_id,
                        &e.model,
                        &turns,
                        params,
                        cancel,
                        on_event,
                    ),
                    None => self.chat(*model_id, &turns, params, cancel, on_event),
                }
            }
            ChatTarget::Endpoint { endpoint_id, model } => {
                self.endpoint_chat(*endpoint_id, model, messages, params, cancel, on_event)
            }
        }
    }

    /// Answers one [`Generation`] (the actor's generation worker calls this): a
    /// conversation through [`Engine::chat_target`]; plain text continued as it is by a
    /// model or an adapter, or, for a template target, sent as one user turn through
    /// the template.
    pub(crate) fn generate_for(
        &self,
        generation: &Generation,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        let params = &generation.params;
        match (&generation.prompt, &generation.target) {
            (Prompt::Chat(messages), target) => {
                self.chat_target(target, messages, params, cancel, on_event)
            }
            (Prompt::Text(text), ChatTarget::Base { model_id }) => {
                self.generate(*model_id, text, params, cancel, on_event)
            }
            (Prompt::Text(text), ChatTarget::Adapter { adapter_id }) => {
                let row = self
                    .store
                    .get_adapter(*adapter_id)?
                    .ok_or_else(|| EngineError::AdapterNotFound(adapter_id.to_string()))?;
                let m = self.adapted_model_of(&row, on_event)?;
                chat::generate_raw(&adapted_parts(&m), text, params, cancel, on_event)
            }
            (Prompt::Text(text), ChatTarget::Endpoint { endpoint_id, model }) => {
                self.endpoint_complete(*endpoint_id, model, text, params, cancel, on_event)
            }
            (Prompt::Text(text), target @ ChatTarget::Template { .. }) => {
                let turn = [ChatMessage {
                    role: "user".into(),
                    content: text.clone(),
                }];
                self.chat_target(target, &turn, params, cancel, on_event)
            }
        }
    }

    /// A readable name for `target`: "SmolLM2-135M-Instruct", "pubmed-lora (LoRA on
    /// SmolLM2-…)", "Soft prompt pubmed-pt on SmolLM2-…", "pubmed-full (full fine-tune of
    /// SmolLM2-…)", "Template 'Clinician' v3 on SmolLM2-…". Errors name what is missing.
    pub fn target_label(&self, target: &ChatTarget) -> Result<String, EngineError> {
        match target {
            ChatTarget::Base { model_id } => self.model_name(*model_id),
            ChatTarget::Adapter { adapter_id } => {
                let row = self
                    .store
                    .get_adapter(*adapter_id)?
                    .ok_or_else(|| EngineError::AdapterNotFound(adapter_id.to_string()))?;
                let base = self
                    .store
                    .get_model(row.base_model_id)?
                    .map(|m| m.name)
                    .unwrap_or_else(|| format!("model {}", row.base_model_id));
                Ok(match AdapterKind::parse(&row.kind) {
                    Some(AdapterKind::Lora) => format!("{} (LoRA on {base})", row.name),
                    Some(AdapterKind::Prompt) => format!("Soft prompt {} on {base}", row.name),
                    Some(AdapterKind::Full) => format!("{} (full fine-tune of {base})", row.name),
                    None => format!("{} (on {base})", row.name),
                })
            }
            ChatTarget::Template {
                model_id,
                template_id,
                version,
                endpoint,
                ..
            } => {
                let record = self.get_template(*template_id, *version)?;
                let model = match endpoint {
                    Some(e) => self.endpoint_label(e.endpoint_id, &e.model)?,
                    None => self.model_name(*model_id)?,
                };
                Ok(format!(
                    "Template '{}' v{} on {model}",
                    record.name, record.version
                ))
            }
            ChatTarget::Endpoint { endpoint_id, model } => self.endpoint_label(*endpoint_id, model),
        }
    }

    fn model_name(&self, model_id: i64) -> Result<String, EngineError> {
        self.store
            .get_model(model_id)?
            .map(|m| m.name)
            .ok_or_else(|| EngineError::ModelNotFound(model_id.to_string()))
    }

    /// `messages` through `model_id`'s chat template with the generation prompt, exactly
    /// as chat sends them, and the token count.
    pub(crate) fn render_for_model(
        &self,
        model_id: i64,
        messages: &[ChatMessage],
    ) -> Result<(String, usize), EngineError> {
        let model = self.model_for(model_id, &mut |_| {})?;
        let (text, ids) = chat::render_prompt(&model.chat_template, &model.tokenizer, messages)?;
        Ok((text, ids.len()))
    }

    /// The exact text `model_id` trains on for a dataset row: a chat row through the
    /// model's chat template (no generation prompt), a text row followed by the
    /// end-of-text token, as training renders them.
    pub fn render_sample(&self, model_id: i64, sample: &RowSample) -> Result<String, EngineError> {
        let model = self.model_for(model_id, &mut |_| {})?;
        match sample {
            RowSample::Chat { messages } => {
                if messages.is_empty() {
                    return Err(EngineError::InvalidInput(
                        "the row has no messages".to_string(),
                    ));
                }
                let msgs: Vec<Message> = messages
                    .iter()
                    .map(|m| Message::new(m.role.clone(), m.content.clone()))
                    .collect();
                model
                    .chat_template
                    .render(&msgs, false)
                    .map_err(chat::generation_error)
            }
            RowSample::Text { text } => {
                let eot = attune_models::train::end_of_text_id(&model.tokenizer)
                    .and_then(|id| model.tokenizer.inner().id_to_token(id));
                Ok(match eot {
                    Some(token) => format!("{text}{token}"),
                    None => text.clone(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use attune_protocol::{FinishReason, TemplateDraft};

    use super::*;

    fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            temperature: 0.0,
            repetition_penalty: 1.0,
            ..SamplingParams::default()
        }
    }

    fn m(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    fn reference_adapters() -> PathBuf {
        attune_test_support::shared("reference/adapters")
    }

    #[test]
    fn playground_targets_answer_label_and_render() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Engine::open(&dir.path().join("data")).expect("open");
        let model = e
            .add_local_model(&attune_test_support::default_model())
            .expect("add")
            .model;
        let no = AtomicBool::new(false);
        let hi = [m("user", "What is the capital of France?")];

        // Base: the same as Engine::chat.
        let base = ChatTarget::Base { model_id: model.id };
        let direct = e
            .chat(model.id, &hi, &greedy(5), &no, &mut |_| {})
            .expect("chat");
        let mut streamed = String::new();
        let via = e
            .chat_target(&base, &hi, &greedy(5), &no, &mut |ev| {
                if let ChatEvent::Token { text } = ev {
                    streamed.push_str(&text);
                }
            })
            .expect("chat_target");
        assert_eq!(via.text, direct.text);
        assert_eq!(streamed, via.text);
        assert_eq!(e.target_label(&base).expect("label"), model.name);

        // Template: its turns then the wrapped message, answered by the base model.
        let rec = e
            .save_template(&TemplateDraft {
                name: "Geo".into(),
                system: Some("You answer as a {{who}}.".into()),
                examples: vec![m("user", "Capital of Italy?"), m("assistant", "Rome.")],
                user: Some("Question: {{input}}".into()),
                variables: BTreeMap::from([("who".into(), "teacher".into())]),
                ..Default::default()
            })
            .expect("template");
        let target = ChatTarget::Template {
            model_id: model.id,
            template_id: rec.id,
            version: None,
            values: BTreeMap::from([("who".into(), "geographer".into())]),
            endpoint: None,
        };
        let expected_turns = [
            m("system", "You answer as a geographer."),
            m("user", "Capital of Italy?"),
            m("assistant", "Rome."),
            m("user", "Question: What is the capital of France?"),
        ];
        let direct = e
            .chat(model.id, &expected_turns, &greedy(5), &no, &mut |_| {})
            .expect("chat turns");
        let via = e
            .chat_target(&target, &hi, &greedy(5), &no, &mut |_| {})
            .expect("template target");
        assert_eq!(via.text, direct.text);
        assert_eq!(via.prompt_tokens, direct.prompt_tokens);
        assert_eq!(
            e.target_label(&target).expect("label"),
            format!("Template 'Geo' v1 on {}", model.name)
        );

        // The preview shows exactly that prompt.
        let draft = TemplateDraft {
            name: rec.name.clone(),
            system: rec.system.clone(),
            examples: rec.examples.clone(),
            user: rec.user.clone(),
            variables: rec.variables.clone(),
            ..Default::default()
        };
        let values = BTreeMap::from([("who".into(), "geographer".into())]);
        let preview = e
            .preview_template(model.id, &draft, &hi[0].content, &values)
            .expect("preview");
        assert_eq!(preview.messages, expected_turns);
        assert_eq!(preview.tokens as usize, direct.prompt_tokens);
        assert!(
            preview.text.ends_with("<|im_start|>assistant\n"),
            "{}",
            preview.text
        );
        assert_eq!(preview.variables, ["who"]);
        assert!(preview.missing.is_empty());

        // Cancelled before the first token: nothing generated, finish reason cancelled.
        let stop = AtomicBool::new(true);
        let cancelled = e
            .chat_target(&base, &hi, &greedy(5), &stop, &mut |_| {})
            .expect("cancelled chat");
        assert_eq!(cancelled.finish_reason, FinishReason::Cancelled);

        // Missing ids are clear errors.
        let gone = ChatTarget::Adapter { adapter_id: 999 };
        assert_eq!(
            e.target_label(&gone).expect_err("adapter").code(),
            "not_found"
        );
        let err = e
            .chat_target(&gone, &hi, &greedy(1), &no, &mut |_| {})
            .expect_err("adapter");
        assert!(err.to_string().contains("999"), "{err}");
        let no_template = ChatTarget::Template {
            model_id: model.id,
            template_id: 77,
            version: None,
            values: BTreeMap::new(),
            endpoint: None,
        };
        let err = e.target_label(&no_template).expect_err("template");
        assert!(err.to_string().contains("template with id 77"), "{err}");
        assert_eq!(
            e.target_label(&ChatTarget::Base { model_id: 5 })
                .expect_err("model")
                .code(),
            "not_found"
        );
        let err = e
            .chat_target(&base, &[], &greedy(1), &no, &mut |_| {})
            .expect_err("empty");
        assert_eq!(err.code(), "invalid_input");

        // Training text of rows.
        let chat_row = RowSample::Chat {
            messages: vec![m("user", "Hi"), m("assistant", "Hello!")],
        };
        let rendered = e.render_sample(model.id, &chat_row).expect("chat row");
        assert!(
            rendered.contains("<|im_start|>user\nHi<|im_end|>"),
            "{rendered}"
        );
        assert!(rendered.ends_with("Hello!<|im_end|>\n"), "{rendered}");
        let text_row = RowSample::Text {
            text: "Plain document.".into(),
        };
        assert_eq!(
            e.render_sample(model.id, &text_row).expect("text row"),
            "Plain document.<|endoftext|>"
        );
    }

    #[test]
    fn playground_adapters_stay_loaded_three_at_a_time() {
        let refs = reference_adapters();
        assert!(
            refs.join("lora/adapter_config.json").is_file(),
            "{} is missing: this test needs the shared reference data beside the repository (../shared, as the project lays it out)",
            refs.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Engine::open(&dir.path().join("data")).expect("open");
        let model = e
            .add_local_model(&attune_test_support::default_model())
            .expect("add")
            .model;
        let lora = e
            .import_adapter(&refs.join("lora"), &model.name, Some("ref-lora"))
            .expect("lora");
        let prompt = e
            .import_adapter(&refs.join("prompt"), &model.name, Some("ref-pt"))
            .expect("prompt");
        assert_eq!(
            e.target_label(&ChatTarget::Adapter {
                adapter_id: lora.id
            })
            .expect("label"),
            format!("ref-lora (LoRA on {})", model.name)
        );
        assert_eq!(
            e.target_label(&ChatTarget::Adapter {
                adapter_id: prompt.id
            })
            .expect("label"),
            format!("Soft prompt ref-pt on {}", model.name)
        );
        let no = AtomicBool::new(false);
        let hi = [m("user", "Hello")];
        let mut answers = Vec::new();
        for id in [lora.id, prompt.id, lora.id, prompt.id] {
            let stats = e
                .chat_target(
                    &ChatTarget::Adapter { adapter_id: id },
                    &hi,
                    &greedy(3),
                    &no,
                    &mut |_| {},
                )
                .expect("adapter chat");
            answers.push(stats.text);
        }
        // Alternating keeps both loaded, and each answers as before.
        assert_eq!(answers[0], answers[2]);
        assert_eq!(answers[1], answers[3]);
        let cached = e.adapted.lock().map(|c| c.ids()).unwrap_or_default();
        assert_eq!(cached, [lora.id, prompt.id]);
        e.remove_adapter("ref-pt").expect("remove");
        let cached = e.adapted.lock().map(|c| c.ids()).unwrap_or_default();
        assert_eq!(cached, [lora.id]);
    }

    #[test]
    fn playground_adapted_cache_keeps_the_three_most_recent() {
        use crate::adapters::{AdaptedCache, AdaptedModel};
        // The cache only orders ids; a real adapted model is not needed to check the order,
        // but entries must be real models, so reuse one loaded model for every id.
        let loaded = crate::chat::load("m", &attune_test_support::default_model()).expect("load");
        let model = std::sync::Arc::new(AdaptedModel {
            model: loaded.model,
            tokenizer: loaded.tokenizer,
            chat_template: loaded.chat_template,
            prefix: None,
        });
        let mut c = AdaptedCache::default();
        for id in 1..=3 {
            c.insert(id, std::sync::Arc::clone(&model));
        }
        assert!(c.get(1).is_some());
        c.insert(4, std::sync::Arc::clone(&model));
        assert_eq!(c.ids(), [3, 1, 4]);
        assert!(c.get(2).is_none());
        c.remove(1);
        assert_eq!(c.ids(), [3, 4]);
    }
}
