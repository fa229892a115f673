//! The endpoint client against a misbehaving test server (a real TCP server on
//! loopback that answers each connection with a scripted response): slow first byte,
//! 500, a stream cut mid-way, 429 then success, 401, an unreachable port; keys kept
//! out of the library and messages.

use super::keys::Keys;
use super::*;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// What one connection gets.
type Script = Box<dyn FnOnce(&mut TcpStream) + Send>;

/// A server that answers its i-th connection with `scripts[i]`; it records each
/// request's head and body.
struct TestServer {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

fn read_request(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    // Head up to the blank line.
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = s.read_exact(&mut body);
    head + &String::from_utf8_lossy(&body)
}

fn server(scripts: Vec<Script>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    let requests: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&requests);
    std::thread::spawn(move || {
        for script in scripts {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let req = read_request(&mut s);
            log.lock().expect("log").push(req);
            script(&mut s);
        }
    });
    TestServer { url, requests }
}

fn respond(status: &str, headers: &str, body: &str) -> Script {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n{body}",
        body.len()
    );
    Box::new(move |s: &mut TcpStream| {
        let _ = s.write_all(text.as_bytes());
    })
}

fn sse_head(s: &mut TcpStream) {
    let _ = s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
    );
}

fn chunk(text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"choices":[{"index":0,"delta":{"content":text},"finish_reason":null}]})
    )
}

fn good_stream(words: &'static [&'static str]) -> Script {
    Box::new(move |s: &mut TcpStream| {
        sse_head(s);
        let _ = s.write_all(
            format!(
                "data: {}\n\n",
                json!({"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]})
            )
            .as_bytes(),
        );
        for w in words {
            let _ = s.write_all(chunk(w).as_bytes());
        }
        let end = json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]});
        let usage = json!({"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":words.len(),"total_tokens":9 + words.len()}});
        let _ = s.write_all(format!("data: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n").as_bytes());
    })
}

fn engine(dir: &std::path::Path) -> Engine {
    let mut e = Engine::open(&dir.join("data")).expect("open");
    e.keys = Keys::memory_only();
    e
}

fn add(e: &Engine, name: &str, url: &str, key: Option<&str>, idle: Option<f64>) -> i64 {
    e.add_endpoint(&EndpointDraft {
        name: name.into(),
        base_url: url.into(),
        api_key: key.map(str::to_string),
        connect_timeout_s: Some(2.0),
        idle_timeout_s: idle,
    })
    .expect("add endpoint")
    .endpoint
    .id
}

fn hi() -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: "Hi".into(),
    }]
}

fn params() -> SamplingParams {
    SamplingParams {
        max_tokens: 16,
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

fn ask(e: &Engine, id: i64, events: &mut Vec<ChatEvent>) -> Result<GenerationStats, EngineError> {
    e.endpoint_chat(
        id,
        "m",
        &hi(),
        &params(),
        &AtomicBool::new(false),
        &mut |ev| events.push(ev),
    )
}

#[test]
fn a_good_stream_answers_with_the_servers_usage_and_sends_the_key_and_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(dir.path());
    let srv = server(vec![
        respond(
            "200 OK",
            "",
            r#"{"object":"list","data":[{"id":"b"},{"id":"a"}]}"#,
        ),
        good_stream(&["Hel", "lo", "!"]),
    ]);
    let added = e
        .add_endpoint(&EndpointDraft {
            name: "local".into(),
            base_url: format!("{}/", srv.url),
            api_key: Some("sk-test-123".into()),
            ..Default::default()
        })
        .expect("add");
    assert!(added.key_note.is_some(), "memory-only keys are announced");
    assert_eq!(added.endpoint.key, KeyStorage::Memory);
    assert_eq!(added.endpoint.base_url, srv.url, "trailing slash dropped");
    let listed = e.refresh_endpoint_models("local").expect("models");
    assert_eq!(listed.models, ["a", "b"]);
    let mut events = Vec::new();
    let stats = ask(&e, added.endpoint.id, &mut events).expect("answer");
    assert_eq!(stats.text, "Hello!");
    assert_eq!(stats.generated_tokens, 3);
    assert_eq!(stats.prompt_tokens, 9);
    assert_eq!(stats.finish_reason, FinishReason::Eos);
    let streamed: String = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Token { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(streamed, "Hello!");
    assert!(matches!(events.last(), Some(ChatEvent::Done { .. })));
    let reqs = srv.requests.lock().expect("requests");
    assert!(reqs[0].starts_with("GET /v1/models "), "{}", reqs[0]);
    assert!(
        reqs[1].starts_with("POST /v1/chat/completions "),
        "{}",
        reqs[1]
    );
    assert!(
        reqs[1].contains("Authorization: Bearer sk-test-123")
            || reqs[1].contains("authorization: Bearer sk-test-123"),
        "{}",
        reqs[1]
    );
    let body: Value =
        serde_json::from_str(reqs[1].split("\r\n\r\n").nth(1).expect("body")).expect("json");
    assert_eq!(body["model"], "m");
    assert_eq!(body["stream"], true);
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["max_tokens"], 16);
    assert_eq!(body["messages"][0]["content"], "Hi");
    // The key is in no file of the library.
    drop(reqs);
    let db = std::fs::read(e.store.path()).expect("db");
    let wal = std::fs::read(e.store.path().with_extension("sqlite3-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(11).any(|w| w == b"sk-test-123"),
            "the key reached the library"
        );
    }
}

#[test]
fn failures_are_named_with_their_kind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(dir.path());
    let srv = server(vec![
        // 1: a 500 with OpenAI's error JSON.
        respond(
            "500 Internal Server Error",
            "",
            r#"{"error":{"message":"boom"}}"#,
        ),
        // 2: a 401.
        respond("401 Unauthorized", "", r#"{"error":{"message":"bad key"}}"#),
        // 3: a 404 for the model.
        respond(
            "404 Not Found",
            "",
            r#"{"error":{"message":"no such model"}}"#,
        ),
        // 4: a stream cut after two pieces.
        Box::new(|s: &mut TcpStream| {
            sse_head(s);
            let _ = s.write_all(chunk("Hal").as_bytes());
            let _ = s.write_all(chunk("f").as_bytes());
        }),
        // 5: a chunk that is not JSON.
        Box::new(|s: &mut TcpStream| {
            sse_head(s);
            let _ = s.write_all(b"data: {nope\n\n");
        }),
        // 6: headers, then silence past the idle limit.
        Box::new(|s: &mut TcpStream| {
            sse_head(s);
            std::thread::sleep(Duration::from_millis(2500));
        }),
        // 7: silence before the first byte.
        Box::new(|_s: &mut TcpStream| std::thread::sleep(Duration::from_millis(2500))),
    ]);
    let id = add(&e, "flaky", &srv.url, Some("sk-secret-9"), Some(1.0));
    let mut ev = Vec::new();
    let check = |r: Result<GenerationStats, EngineError>, code: &str, says: &str| {
        let err = r.expect_err(code);
        assert_eq!(err.code(), code, "{err}");
        let msg = err.to_string();
        assert!(msg.contains(says), "{code}: {msg}");
        assert!(msg.contains("flaky"), "{code} names the endpoint: {msg}");
        assert!(!msg.contains("sk-secret-9"), "{code} leaks the key: {msg}");
    };
    check(ask(&e, id, &mut ev), "endpoint_http", "boom");
    check(ask(&e, id, &mut ev), "endpoint_auth", "401");
    check(ask(&e, id, &mut ev), "endpoint_model", "'m'");
    ev.clear();
    check(ask(&e, id, &mut ev), "endpoint_protocol", "cut off");
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, ChatEvent::Token { .. }))
            .count(),
        2,
        "what came before the cut was streamed"
    );
    check(ask(&e, id, &mut ev), "endpoint_protocol", "not JSON");
    let t = Instant::now();
    check(ask(&e, id, &mut ev), "endpoint_timeout", "1 s");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "idle limit not kept: {:?}",
        t.elapsed()
    );
    check(ask(&e, id, &mut ev), "endpoint_timeout", "sent nothing");

    // Nobody listens on the port: unreachable.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let gone = add(&e, "gone", &format!("http://{closed}/v1"), None, None);
    let err = ask(&e, gone, &mut ev).expect_err("unreachable");
    assert_eq!(err.code(), "endpoint_unreachable", "{err}");
}

#[test]
fn a_rate_limit_is_retried_with_backoff_and_shown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(dir.path());
    let srv = server(vec![
        respond(
            "429 Too Many Requests",
            "Retry-After: 0\r\n",
            r#"{"error":{"message":"slow down"}}"#,
        ),
        respond(
            "429 Too Many Requests",
            "Retry-After: 0\r\n",
            r#"{"error":{"message":"slow down"}}"#,
        ),
        good_stream(&["ok"]),
    ]);
    let id = add(&e, "busy", &srv.url, None, None);
    let mut events = Vec::new();
    let stats = ask(&e, id, &mut events).expect("answer after retries");
    assert_eq!(stats.text, "ok");
    let retries: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Retrying {
                attempt, reason, ..
            } => {
                assert!(reason.contains("429"), "{reason}");
                Some(*attempt)
            }
            _ => None,
        })
        .collect();
    assert_eq!(retries, [1, 2]);
}

#[test]
fn a_cancel_stops_a_silent_endpoint_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(dir.path());
    let srv = server(vec![Box::new(|s: &mut TcpStream| {
        sse_head(s);
        let _ = s.write_all(chunk("one").as_bytes());
        std::thread::sleep(Duration::from_secs(5));
    })]);
    let id = add(&e, "slow", &srv.url, None, Some(30.0));
    let cancel = Arc::new(AtomicBool::new(false));
    let c = Arc::clone(&cancel);
    let t = Instant::now();
    let stats = e
        .endpoint_chat(id, "m", &hi(), &params(), &cancel, &mut |ev| {
            if matches!(ev, ChatEvent::Token { .. }) {
                c.store(true, Ordering::SeqCst);
            }
        })
        .expect("cancelled answer");
    assert_eq!(stats.finish_reason, FinishReason::Cancelled);
    assert_eq!(stats.text, "one");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn endpoints_are_checked_listed_and_removed_and_keys_are_not_kept_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(dir.path());
    for (url, says) in [
        ("ftp://x/v1", "http:// or https://"),
        ("http:///v1", "no host"),
        ("https://api.example.com/v1?x=1", "query"),
    ] {
        let err = e
            .add_endpoint(&EndpointDraft {
                name: "x".into(),
                base_url: url.into(),
                ..Default::default()
            })
            .expect_err(url);
        assert!(err.to_string().contains(says), "{url}: {err}");
    }
    let err = e
        .add_endpoint(&EndpointDraft {
            name: "x".into(),
            base_url: "http://localhost:1/v1".into(),
            idle_timeout_s: Some(0.0),
            ..Default::default()
        })
        .expect_err("timeout");
    assert!(err.to_string().contains("idle stream timeout"), "{err}");
    add(&e, "one", "http://localhost:1/v1", Some("k1"), None);
    let err = e
        .add_endpoint(&EndpointDraft {
            name: "one".into(),
            base_url: "http://localhost:2/v1".into(),
            ..Default::default()
        })
        .expect_err("taken");
    assert_eq!(err.code(), "already_exists");
    assert_eq!(e.list_endpoints().expect("list").len(), 1);
    // The app restarts: its memory is gone, the key is missing (no keyring here).
    let again = engine(dir.path());
    let one = again.find_endpoint("one").expect("find");
    assert_eq!(one.key, KeyStorage::Missing);
    let err = ask(&again, one.id, &mut Vec::new()).expect_err("no key");
    assert_eq!(err.code(), "endpoint_key_missing");
    assert_eq!(
        again.set_endpoint_key("one", "k2").expect("set"),
        KeyStorage::Memory
    );
    assert_eq!(
        again.find_endpoint("one").expect("find").key,
        KeyStorage::Memory
    );
    again.remove_endpoint("one").expect("remove");
    assert!(again.list_endpoints().expect("list").is_empty());
    assert_eq!(
        again.find_endpoint("one").expect_err("gone").code(),
        "not_found"
    );
}

#[test]
fn a_template_is_evaluated_against_an_endpoint_by_label_accuracy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(dir.path());
    let rows: String = ["yes", "no", "yes"]
        .iter()
        .enumerate()
        .map(|(i, label)| {
            json!({
                "id": format!("r{i}"),
                "label": label,
                "messages": [
                    {"role": "user", "content": format!("Question {i}?")},
                    {"role": "assistant", "content": format!("Final answer: {label}")},
                ],
            })
            .to_string()
                + "\n"
        })
        .collect();
    let path = dir.path().join("labeled.jsonl");
    std::fs::write(&path, rows).expect("write");
    let ds = e
        .import_dataset(
            &path,
            &attune_protocol::ImportOptions {
                split: attune_protocol::Split::AllTrain,
                ..Default::default()
            },
        )
        .expect("import");
    let answer: &'static [&'static str] = &["Because.", " Final answer: yes"];
    let srv = server(vec![
        good_stream(answer),
        good_stream(answer),
        good_stream(answer),
    ]);
    add(&e, "judge", &srv.url, None, None);
    let template = attune_protocol::PromptTemplate {
        name: "Terse".into(),
        system: Some("Answer yes or no.".into()),
        user: Some("Q: {{input}}".into()),
        ..Default::default()
    };
    let options = attune_protocol::EvalOptions {
        split: attune_protocol::SplitName::Train,
        ..Default::default()
    };
    let report = e
        .evaluate_endpoint(
            "judge",
            "m",
            Some(&template),
            &ds.id.to_string(),
            &options,
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .expect("evaluation");
    assert_eq!(report.n_labeled, 3);
    assert_eq!(report.accuracy, Some(2.0 / 3.0));
    assert_eq!(report.template.as_deref(), Some("Terse"));
    assert!(report.note.contains("No NLL"), "{}", report.note);
    let correct: Vec<Option<bool>> = report.rows.iter().map(|r| r.correct).collect();
    assert_eq!(correct, [Some(true), Some(false), Some(true)]);
    // Each request carried the template's turns, not the answer.
    let reqs = srv.requests.lock().expect("requests");
    let body: Value =
        serde_json::from_str(reqs[0].split("\r\n\r\n").nth(1).expect("body")).expect("json");
    assert_eq!(body["messages"][0]["content"], "Answer yes or no.");
    assert_eq!(body["messages"][1]["content"], "Q: Question 0?");
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["temperature"], 0.0);
}

#[test]
fn the_template_preview_of_an_api_model_is_the_request_attune_sends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(dir.path());
    let id = add(&e, "remote", "http://127.0.0.1:9/v1", None, None);
    let draft = attune_protocol::TemplateDraft {
        id: None,
        name: "Terse".into(),
        system: Some("You answer for {{audience}}.".into()),
        examples: vec![
            ChatMessage {
                role: "user".into(),
                content: "Is water wet?".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "yes".into(),
            },
        ],
        user: Some("Q: {{input}}".into()),
        variables: [("audience".to_string(), "clinicians".to_string())].into(),
        note: None,
    };
    let target = attune_protocol::EndpointModel {
        endpoint_id: id,
        model: "gpt-x".into(),
    };
    let p = e
        .preview_template_for_endpoint(&target, &draft, "Is ice cold?", &draft.variables)
        .expect("preview");
    let body: serde_json::Value = serde_json::from_str(&p.text).expect("the preview is JSON");
    assert_eq!(body["model"], "gpt-x");
    let messages = body["messages"].as_array().expect("messages");
    let turns: Vec<(String, String)> = messages
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_string(),
                m["content"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        turns,
        [
            ("system", "You answer for clinicians."),
            ("user", "Is water wet?"),
            ("assistant", "yes"),
            ("user", "Q: Is ice cold?"),
        ]
        .map(|(r, c)| (r.to_string(), c.to_string()))
    );
    assert_eq!(p.tokens, 0, "an API counts its own tokens");
    let missing = attune_protocol::EndpointModel {
        endpoint_id: id + 100,
        model: "gpt-x".into(),
    };
    let err = e
        .preview_template_for_endpoint(&missing, &draft, "x", &Default::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::NotFound {
                what: "endpoint",
                ..
            }
        ),
        "{err}"
    );
}
