//! Actor tests on the real default model in a temporary library: runs one at a time in
//! FIFO order (also across processes, through the lock file), steering queued runs,
//! shutdown; generation in turn per client, per-request cancel, a full queue.

use super::*;
use attune_protocol::{FinishReason, ImportOptions, MethodSpec, RunStatus, Split};
use std::path::Path;
use std::sync::Mutex;

type Events = Arc<Mutex<Vec<RunUpdate>>>;

struct Fixture {
    actor: Actor,
    events: Events,
    model: i64,
    ds: i64,
}

fn engine_with_model(dir: &Path) -> (Arc<Engine>, i64) {
    let model_file = attune_models::default_model_path();
    assert!(
        model_file.is_file(),
        "the default model is missing at {}: run scripts/fetch-model.sh",
        model_file.display()
    );
    let engine = Arc::new(Engine::open(&dir.join("data")).expect("open engine"));
    let model = engine
        .add_local_model(&model_file)
        .expect("add model")
        .model
        .id;
    (engine, model)
}

fn fixture(dir: &Path, options: ActorOptions) -> Fixture {
    let (engine, model) = engine_with_model(dir);
    let text: String = (0..6)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Is {i} even?")},
                {"role": "assistant", "content": if i % 2 == 0 { "Yes." } else { "No." }},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    let path = dir.join("tiny.jsonl");
    std::fs::write(&path, text).expect("write dataset");
    let ds = engine
        .import_dataset(
            &path,
            &ImportOptions {
                split: Split::Seeded {
                    valid_fraction: 0.2,
                    test_fraction: 0.0,
                    seed: 1,
                },
                ..Default::default()
            },
        )
        .expect("import")
        .id;
    let events: Events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let observer: RunObserver = Arc::new(move |u| sink.lock().expect("events").push(u));
    Fixture {
        actor: Actor::start(engine, options, observer),
        events,
        model,
        ds,
    }
}

fn spec(model: i64, ds: i64, name: &str, steps: usize) -> RunSpec {
    RunSpec {
        name: Some(name.into()),
        model: model.to_string(),
        dataset: ds.to_string(),
        method: MethodSpec::Lora {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec!["q_proj".into()],
            rslora: false,
        },
        batch_size: 1,
        steps: Some(steps),
        max_len: 96,
        checkpoint_every: 0,
        eval_limit: Some(1),
        forgetting_rows: 0,
        ..Default::default()
    }
}

fn status(a: &Actor, id: i64) -> RunStatus {
    a.engine()
        .find_run(&id.to_string())
        .expect("find run")
        .status
}

/// Index of the first event of `id` matching `pred`.
fn position(events: &Events, id: i64, pred: impl Fn(&RunEvent) -> bool) -> Option<usize> {
    events
        .lock()
        .expect("events")
        .iter()
        .position(|u| u.run_id == id && pred(&u.event))
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runs_execute_one_at_a_time_in_order_and_queued_runs_can_be_steered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = fixture(dir.path(), ActorOptions::default());
    let a = &f.actor;
    // The requester of run a gets its events on its own sink too.
    let mine: Arc<Mutex<Vec<RunEvent>>> = Arc::default();
    let mine_sink = Arc::clone(&mine);
    let ra = a
        .start_run(
            spec(f.model, f.ds, "a", 2),
            Some(Box::new(move |e| mine_sink.lock().expect("mine").push(e))),
        )
        .expect("start a");
    let rb = a
        .start_run(spec(f.model, f.ds, "b", 2), None)
        .expect("start b");
    let rc = a
        .start_run(spec(f.model, f.ds, "c", 2), None)
        .expect("start c");
    let rd = a
        .start_run(spec(f.model, f.ds, "d", 2), None)
        .expect("start d");
    assert_eq!(rb.status, RunStatus::Queued);
    assert_eq!(
        a.status().expect("status").queued_runs,
        [rb.id, rc.id, rd.id]
    );
    // Steering queued runs: c is parked, d cancelled; neither executes.
    a.pause_run(rc.id).expect("pause queued c");
    a.cancel_run(rd.id).expect("cancel queued d");
    assert_eq!(status(a, rc.id), RunStatus::Paused);
    assert_eq!(status(a, rd.id), RunStatus::Cancelled);
    assert_eq!(a.status().expect("status").queued_runs, [rb.id]);
    let err = a.remove_run(rb.id).expect_err("b is queued");
    assert_eq!(err.code(), "invalid_state");
    assert!(
        a.wait_runs_idle(Duration::from_secs(300)),
        "runs did not finish"
    );
    assert_eq!(status(a, ra.id), RunStatus::Completed);
    assert_eq!(status(a, rb.id), RunStatus::Completed);
    // FIFO, one at a time: b starts after a finished.
    let a_done =
        position(&f.events, ra.id, |e| matches!(e, RunEvent::Finished { .. })).expect("a finished");
    let b_start =
        position(&f.events, rb.id, |e| matches!(e, RunEvent::Started { .. })).expect("b started");
    assert!(a_done < b_start, "b started before a finished");
    for (id, want) in [(rc.id, RunStatus::Paused), (rd.id, RunStatus::Cancelled)] {
        assert!(
            position(&f.events, id, |e| matches!(
                e,
                RunEvent::Finished { status, .. } if *status == want
            ))
            .is_some(),
            "no Finished({want:?}) event for run {id}"
        );
        assert!(position(&f.events, id, |e| matches!(e, RunEvent::Started { .. })).is_none());
    }
    // The requester's sink saw a's own events, Started to Finished, and only those.
    let mine = mine.lock().expect("mine").clone();
    assert!(matches!(mine.first(), Some(RunEvent::Started { run_id, .. }) if *run_id == ra.id));
    assert!(matches!(
        mine.last(),
        Some(RunEvent::Finished {
            status: RunStatus::Completed,
            ..
        })
    ));
    // A parked run resumes and completes; a completed one cannot be paused or resumed.
    a.resume_run(rc.id, None).expect("resume c");
    assert!(
        a.wait_runs_idle(Duration::from_secs(300)),
        "c did not finish"
    );
    assert_eq!(status(a, rc.id), RunStatus::Completed);
    assert_eq!(
        a.pause_run(ra.id).expect_err("completed").code(),
        "invalid_state"
    );
    assert_eq!(
        a.resume_run(ra.id, None).expect_err("completed").code(),
        "invalid_state"
    );
    a.remove_run(ra.id).expect("remove a");
    assert_eq!(a.remove_run(ra.id).expect_err("gone").code(), "not_found");
}

#[test]
fn a_run_waits_while_another_process_trains_and_can_be_paused_while_waiting() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let f = fixture(dir.path(), ActorOptions::default());
    let a = &f.actor;
    // Another process's run: the lock file held through another open file description
    // (flock conflicts between descriptions, in one process as across processes).
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(a.engine().data_dir().join(TRAINING_LOCK_FILE))
        .expect("open lock file");
    // SAFETY: flock on a descriptor the test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    let r = a
        .start_run(spec(f.model, f.ds, "waits", 2), None)
        .expect("start");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        position(&f.events, r.id, |e| matches!(e, RunEvent::Started { .. })).is_none(),
        "the run started while another process held the training lock"
    );
    assert_eq!(status(a, r.id), RunStatus::Queued);
    // Paused while it waits: it leaves without training.
    a.pause_run(r.id).expect("pause the waiting run");
    wait_for("the waiting run pauses", 30, || {
        status(a, r.id) == RunStatus::Paused
    });
    assert!(a.wait_runs_idle(Duration::from_secs(30)));
    // Resumed, it waits again, and trains once the lock is released.
    a.resume_run(r.id, None).expect("resume");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(status(a, r.id), RunStatus::Queued);
    drop(held);
    assert!(
        a.wait_runs_idle(Duration::from_secs(300)),
        "the run did not finish"
    );
    assert_eq!(status(a, r.id), RunStatus::Completed);
}

#[test]
fn shutdown_pauses_the_executing_run_so_it_can_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = fixture(dir.path(), ActorOptions::default());
    let a = &f.actor;
    let long = a
        .start_run(spec(f.model, f.ds, "long", 500), None)
        .expect("start long");
    let queued = a
        .start_run(spec(f.model, f.ds, "queued", 2), None)
        .expect("start queued");
    wait_for("a training step", 120, || {
        position(&f.events, long.id, |e| matches!(e, RunEvent::Step { .. })).is_some()
    });
    assert_eq!(a.status().expect("status").executing_run, Some(long.id));
    assert!(
        a.shutdown(Duration::from_secs(120)),
        "the run did not pause"
    );
    assert_eq!(a.status().expect("status").executing_run, None);
    assert_eq!(status(a, long.id), RunStatus::Paused);
    assert_eq!(status(a, queued.id), RunStatus::Paused);
    let detail = a.engine().run_detail(&long.id.to_string()).expect("detail");
    assert!(
        detail.run.step >= 1 && detail.run.step < 500,
        "{:?}",
        detail.run
    );
    let err = a
        .start_run(spec(f.model, f.ds, "late", 2), None)
        .expect_err("closing");
    assert_eq!(err.code(), "closing");
    // A run queued by a process that is gone is parked when the library opens next;
    // one queued by a live process is left to it.
    let engine = Arc::clone(a.engine());
    let again = engine.requeue_run(&long.id.to_string()).expect("requeue");
    assert_eq!(again.status, RunStatus::Queued);
    let reopened = Engine::open(engine.data_dir()).expect("reopen");
    assert_eq!(
        reopened.find_run(&long.id.to_string()).expect("run").status,
        RunStatus::Queued
    );
    let mut gone = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let gone_pid = i64::from(gone.id());
    gone.wait().expect("wait");
    engine
        .store
        .requeue_run(long.id, gone_pid, "2026-12-03T00:00:00Z")
        .expect("queue it in a dead process");
    let reopened = Engine::open(engine.data_dir()).expect("reopen");
    assert_eq!(
        reopened.find_run(&long.id.to_string()).expect("run").status,
        RunStatus::Paused
    );
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        repetition_penalty: 1.0,
        ..SamplingParams::default()
    }
}

fn ask(client: &str, model: i64, text: &str, max_tokens: usize) -> Generation {
    Generation {
        client: client.into(),
        target: ChatTarget::Base { model_id: model },
        prompt: Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
        }]),
        params: greedy(max_tokens),
    }
}

/// Sends a generation and returns its answer's receiver and the order log entry.
fn submit(
    a: &Actor,
    g: Generation,
    cancel: &CancelToken,
    order: &Arc<Mutex<Vec<String>>>,
    tag: &str,
) -> mpsc::Receiver<Result<GenerationStats, EngineError>> {
    let (tx, rx) = mpsc::channel();
    let order = Arc::clone(order);
    let tag = tag.to_string();
    let mut started = false;
    a.send(Request::Generate {
        generation: g,
        cancel: cancel.clone(),
        on_event: Box::new(move |e| {
            if !started && !matches!(e, ChatEvent::Queued { .. }) {
                started = true;
                order.lock().expect("order").push(tag.clone());
            }
        }),
        reply: Box::new(move |r| {
            let _ = tx.send(r);
        }),
    });
    rx
}

#[test]
fn generations_are_served_client_by_client_and_cancel_only_their_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, model) = engine_with_model(dir.path());
    let a = Actor::start(
        engine,
        ActorOptions {
            generation_queue: 4,
            ..ActorOptions::default()
        },
        Arc::new(|_| {}),
    );
    // Warm the model so the queue below fills while the first answer runs.
    a.generate(
        ask("warm", model, "Hi", 1),
        &CancelToken::new(),
        Box::new(|_| {}),
    )
    .expect("warm-up");
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let none = CancelToken::new();
    // One long answer occupies the worker while the others queue behind it.
    let first = submit(
        &a,
        ask("x", model, "Count from 1 to 50.", 40),
        &none,
        &order,
        "x0",
    );
    wait_for("the first answer starts", 60, || {
        !order.lock().expect("o").is_empty()
    });
    let x1 = submit(&a, ask("x", model, "Hello", 2), &none, &order, "x1");
    let x2 = submit(&a, ask("x", model, "Hello", 2), &none, &order, "x2");
    let y1 = submit(&a, ask("y", model, "Hello", 2), &none, &order, "y1");
    // Its own token: cancelled while queued, it never runs; the others are untouched.
    let stop = CancelToken::new();
    let z1 = submit(&a, ask("z", model, "Hello", 2), &stop, &order, "z1");
    // The queue holds 4: a fifth waiting request is refused at once.
    let full = submit(&a, ask("w", model, "Hello", 2), &none, &order, "w1");
    let err = full.recv().expect("answer").expect_err("queue full");
    assert_eq!(err.code(), "queue_full");
    stop.cancel();
    let err = z1.recv().expect("answer").expect_err("cancelled");
    assert_eq!(err.code(), "cancelled");
    for rx in [first, x1, x2, y1] {
        let stats = rx.recv().expect("answer").expect("generation");
        assert_ne!(stats.finish_reason, FinishReason::Cancelled);
    }
    // x queued two before y, yet y was served after x's first: in turn.
    assert_eq!(*order.lock().expect("order"), ["x0", "x1", "y1", "x2"]);

    // Cancelling a generating answer stops it (finish reason cancelled) and the next
    // one in line still answers.
    let long = CancelToken::new();
    let order2: Arc<Mutex<Vec<String>>> = Arc::default();
    let l = submit(
        &a,
        ask("p", model, "Count from 1 to 200.", 200),
        &long,
        &order2,
        "p",
    );
    let n = submit(&a, ask("q", model, "Hello", 2), &none, &order2, "q");
    wait_for("the long answer starts", 60, || {
        !order2.lock().expect("o").is_empty()
    });
    long.cancel();
    let stats = l.recv().expect("answer").expect("stopped answer");
    assert_eq!(stats.finish_reason, FinishReason::Cancelled);
    assert!(stats.generated_tokens < 200);
    let stats = n.recv().expect("answer").expect("next answer");
    assert_ne!(stats.finish_reason, FinishReason::Cancelled);
}
