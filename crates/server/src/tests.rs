//! The server over a real actor, the real default model and a library on disk, spoken
//! to over real HTTP (ureq) on a free loopback port.

use super::*;
use attune_engine::{ActorOptions, Engine};
use attune_protocol::{SamplingParams, TemplateDraft};
use std::io::{BufRead, BufReader};

struct Fixture {
    server: RunningServer,
    actor: Actor,
    model: attune_protocol::ModelSummary,
    _dir: tempfile::TempDir,
}

fn fixture(options: ActorOptions, api_key: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_file = attune_models::default_model_path();
    assert!(
        model_file.is_file(),
        "the default model is missing at {}: run scripts/fetch-model.sh",
        model_file.display()
    );
    let engine = Arc::new(Engine::open(&dir.path().join("data")).expect("engine"));
    let model = engine.add_local_model(&model_file).expect("add").model;
    let actor = Actor::start(engine, options, Arc::new(|_| {}));
    let server = RunningServer::start(
        actor.clone(),
        &ServerOptions {
            host: "127.0.0.1".into(),
            port: 0,
            api_key: api_key.map(str::to_string),
        },
    )
    .expect("server starts");
    Fixture {
        server,
        actor,
        model,
        _dir: dir,
    }
}

impl Fixture {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        match ureq::post(&self.url(path)).send_json(body) {
            Ok(r) => (r.status(), r.into_json().expect("json body")),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().expect("json error")),
            Err(e) => panic!("{path}: {e}"),
        }
    }
}

fn greedy_chat(model: &str, text: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// The `data:` payloads of an SSE body.
fn sse_payloads(body: impl std::io::Read) -> Vec<String> {
    BufReader::new(body)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn models_list_the_library_and_chat_answers_as_the_engine_does() {
    let f = fixture(ActorOptions::default(), None);
    let engine = f.actor.engine();
    let template = engine
        .save_template(&TemplateDraft {
            name: "Brief".into(),
            system: Some("Answer in one word.".into()),
            user: Some("Question: {{input}}".into()),
            ..Default::default()
        })
        .expect("template");
    let models: Value = ureq::get(&f.url("/v1/models"))
        .call()
        .expect("models")
        .into_json()
        .expect("json");
    assert_eq!(models["object"], "list");
    let data = models["data"].as_array().expect("data");
    let ids: Vec<&str> = data.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, [f.model.name.as_str(), "Brief"]);
    for m in data {
        assert_eq!(m["object"], "model");
        assert_eq!(m["owned_by"], "attune");
        assert!(
            m["created"].as_i64().expect("created") > 1_700_000_000,
            "{m}"
        );
    }
    assert_eq!(data[1]["attune"]["kind"], "template");

    // Greedy, the same answer as the engine's own chat with the same settings.
    let (status, body) = f.post(
        "/v1/chat/completions",
        greedy_chat(&f.model.name, "What is the capital of France?", 12),
    );
    assert_eq!(status, 200, "{body}");
    let params = SamplingParams {
        max_tokens: 12,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        min_p: None,
        repetition_penalty: 1.0,
        repeat_last_n: 0,
        ..SamplingParams::default()
    };
    let direct = engine
        .chat(
            f.model.id,
            &[ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            &params,
            &std::sync::atomic::AtomicBool::new(false),
            &mut |_| {},
        )
        .expect("engine chat");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        direct.text.as_str()
    );
    assert_eq!(body["usage"]["prompt_tokens"], direct.prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"], direct.generated_tokens);
    assert_eq!(
        body["choices"][0]["finish_reason"],
        if direct.generated_tokens == 12 {
            "length"
        } else {
            "stop"
        }
    );

    // The template model: its system prompt and wrapper, then the model answers, the
    // same as the model asked with those turns.
    let (status, t) = f.post(
        "/v1/chat/completions",
        greedy_chat("Brief", "What is the capital of France?", 4),
    );
    assert_eq!(status, 200, "{t}");
    let (status, by_hand) = f.post(
        "/v1/chat/completions",
        json!({
            "model": f.model.name,
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Question: What is the capital of France?"},
            ],
            "temperature": 0,
            "max_tokens": 4,
        }),
    );
    assert_eq!(status, 200, "{by_hand}");
    assert_eq!(t["usage"], by_hand["usage"]);
    assert_eq!(
        t["choices"][0]["message"]["content"],
        by_hand["choices"][0]["message"]["content"]
    );
    assert_ne!(t["usage"]["prompt_tokens"], body["usage"]["prompt_tokens"]);
    let _ = template;

    // Streaming gives the same text, chunk by chunk, then the finish and the usage.
    let mut req = greedy_chat(&f.model.name, "What is the capital of France?", 12);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let r = ureq::post(&f.url("/v1/chat/completions"))
        .send_json(req)
        .expect("stream");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let payloads = sse_payloads(r.into_reader());
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, direct.text);
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], direct.generated_tokens);
    let finish = &chunks[chunks.len() - 2];
    assert!(
        finish["choices"][0]["finish_reason"].is_string(),
        "{finish}"
    );
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));

    // Legacy completions continue plain text, 16 tokens by default.
    let (status, c) = f.post(
        "/v1/completions",
        json!({"model": f.model.name, "prompt": "Once upon a time", "temperature": 0}),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert!(c["usage"]["completion_tokens"].as_u64().expect("n") <= 16);
    let direct = engine
        .generate(
            f.model.id,
            "Once upon a time",
            &SamplingParams {
                max_tokens: 16,
                ..params.clone()
            },
            &std::sync::atomic::AtomicBool::new(false),
            &mut |_| {},
        )
        .expect("engine generate");
    assert_eq!(c["choices"][0]["text"], direct.text.as_str());

    // A stop sequence ends the answer before it; the text does not contain it.
    let mut req = greedy_chat(
        &f.model.name,
        "Count from 1 to 10, separated by commas.",
        40,
    );
    req["stop"] = json!(["5"]);
    let (status, s) = f.post("/v1/chat/completions", req);
    assert_eq!(status, 200, "{s}");
    let content = s["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(!content.contains('5'), "{content}");
    assert_eq!(s["choices"][0]["finish_reason"], "stop");
}

#[test]
fn errors_come_in_openais_shape_with_their_status() {
    let f = fixture(ActorOptions::default(), None);
    let (status, body) = f.post(
        "/v1/chat/completions",
        greedy_chat("no-such-model", "Hi", 2),
    );
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    let (status, body) = f.post("/v1/chat/completions", json!({"model": f.model.name}));
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "messages");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let r = ureq::post(&f.url("/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .send_string("{oops");
    match r {
        Err(ureq::Error::Status(400, r)) => {
            let v: Value = r.into_json().expect("json");
            assert!(v["error"]["message"].as_str().expect("m").contains("JSON"));
        }
        other => panic!("bad JSON: {other:?}"),
    }
    match ureq::get(&f.url("/v1/nothing")).call() {
        Err(ureq::Error::Status(404, r)) => {
            let v: Value = r.into_json().expect("json");
            assert_eq!(v["error"]["code"], "unknown_url");
        }
        other => panic!("unknown route: {other:?}"),
    }
    match ureq::get(&f.url("/v1/chat/completions")).call() {
        Err(ureq::Error::Status(405, _)) => {}
        other => panic!("GET on a POST route: {other:?}"),
    }
    // A prompt longer than the context is the client's fault.
    let long = "word ".repeat(9000);
    let (status, body) = f.post("/v1/chat/completions", greedy_chat(&f.model.name, &long, 2));
    assert_eq!(status, 400, "{body}");
}

#[test]
fn an_api_key_is_required_when_set_and_never_echoed() {
    let f = fixture(ActorOptions::default(), Some("s3cret-key"));
    match ureq::get(&f.url("/v1/models")).call() {
        Err(ureq::Error::Status(401, r)) => {
            let v: Value = r.into_json().expect("json");
            assert_eq!(v["error"]["code"], "invalid_api_key");
        }
        other => panic!("no key: {other:?}"),
    }
    match ureq::get(&f.url("/v1/models"))
        .set("Authorization", "Bearer s3cret-kez")
        .call()
    {
        Err(ureq::Error::Status(401, r)) => {
            let text = r.into_string().expect("body");
            assert!(!text.contains("s3cret"), "{text}");
        }
        other => panic!("wrong key: {other:?}"),
    }
    let ok = ureq::get(&f.url("/v1/models"))
        .set("Authorization", "Bearer s3cret-key")
        .call()
        .expect("right key");
    assert_eq!(ok.status(), 200);
    // Listening beyond loopback needs a key.
    let err = ServerOptions {
        host: "0.0.0.0".into(),
        port: 0,
        api_key: None,
    }
    .address()
    .expect_err("no key");
    assert!(matches!(err, ServerError::KeyRequired(_)), "{err}");
    assert!(ServerOptions {
        host: "0.0.0.0".into(),
        port: 0,
        api_key: Some("k".into()),
    }
    .address()
    .is_ok());
    assert!(matches!(
        ServerOptions {
            host: "example.org".into(),
            ..ServerOptions::default()
        }
        .address(),
        Err(ServerError::BadHost(_))
    ));
}

fn wait_idle(actor: &Actor, secs: u64) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        let s = actor.status().expect("status");
        if !s.generating && s.queued_generations == 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_client_that_leaves_mid_stream_stops_its_generation_and_a_full_queue_answers_503() {
    let f = fixture(
        ActorOptions {
            generation_queue: 1,
            ..ActorOptions::default()
        },
        None,
    );
    // A long answer: read its first token, then hang up.
    let mut req = greedy_chat(&f.model.name, "Write a long story about the sea.", 2000);
    req["stream"] = json!(true);
    let r = ureq::post(&f.url("/v1/chat/completions"))
        .send_json(req.clone())
        .expect("stream");
    let mut lines = BufReader::new(r.into_reader()).lines();
    let mut seen = 0;
    for line in lines.by_ref() {
        let line = line.expect("line");
        if line.starts_with("data: ") {
            seen += 1;
            if seen == 3 {
                break;
            }
        }
    }
    assert!(f.actor.status().expect("status").generating);
    drop(lines);
    // 2000 tokens would take many seconds: it stops within a few.
    assert!(
        wait_idle(&f.actor, 10),
        "the generation went on after the client left"
    );

    // The queue holds one: with one answer generating and one waiting, a third is 503.
    let url = f.url("/v1/chat/completions");
    let body = req.clone();
    let (hang_up, hang_up_rx) = std::sync::mpsc::channel::<()>();
    let first = std::thread::spawn(move || {
        let r = ureq::post(&url).send_json(body).expect("first");
        let mut lines = BufReader::new(r.into_reader()).lines();
        let _ = lines.next();
        // Hold the stream open until the test is done with the queue.
        let _ = hang_up_rx.recv();
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !f.actor.status().expect("status").generating {
        assert!(
            std::time::Instant::now() < deadline,
            "first answer did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = f.url("/v1/chat/completions");
    let short = greedy_chat(&f.model.name, "Hi", 2);
    let second = std::thread::spawn(move || ureq::post(&url).send_json(short).map(|r| r.status()));
    while f.actor.status().expect("status").queued_generations == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "second answer did not queue"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = f.post("/v1/chat/completions", greedy_chat(&f.model.name, "Hi", 2));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "queue_full");
    // The first client leaves; the waiting one is then answered.
    hang_up.send(()).expect("hang up");
    first.join().expect("first client");
    assert_eq!(
        second.join().expect("second client").expect("answered"),
        200
    );
}

#[test]
fn attune_is_a_client_of_its_own_server_and_answers_the_same() {
    let f = fixture(ActorOptions::default(), None);
    let engine = f.actor.engine();
    let added = engine
        .add_endpoint(&attune_protocol::EndpointDraft {
            name: "myself".into(),
            base_url: format!("http://{}/v1", f.server.addr),
            ..Default::default()
        })
        .expect("add endpoint");
    let listed = engine
        .refresh_endpoint_models("myself")
        .expect("models over HTTP");
    assert!(listed.models.contains(&f.model.name), "{:?}", listed.models);
    let params = SamplingParams {
        max_tokens: 16,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        min_p: None,
        repetition_penalty: 1.0,
        repeat_last_n: 0,
        ..SamplingParams::default()
    };
    let ask = |target: attune_protocol::ChatTarget| {
        f.actor
            .generate(
                Generation {
                    client: "test".into(),
                    target,
                    prompt: Prompt::Chat(vec![ChatMessage {
                        role: "user".into(),
                        content: "Name a primary colour.".into(),
                    }]),
                    params: params.clone(),
                },
                &CancelToken::new(),
                Box::new(|_| {}),
            )
            .expect("answer")
    };
    let local = ask(attune_protocol::ChatTarget::Base {
        model_id: f.model.id,
    });
    let remote = ask(attune_protocol::ChatTarget::Endpoint {
        endpoint_id: added.endpoint.id,
        model: f.model.name.clone(),
    });
    assert_eq!(remote.text, local.text);
    assert_eq!(remote.generated_tokens, local.generated_tokens);
    assert_eq!(remote.prompt_tokens, local.prompt_tokens);
}
