//! Run manager tests without a window: the real default model, a tiny dataset in a
//! temporary library, LoRA runs of a few optimizer steps on short rows.

use super::*;
use attune_protocol::{ImportOptions, MethodSpec, Split};
use std::path::Path;

type Events = Arc<Mutex<Vec<RunUpdate>>>;

fn runner(dir: &Path) -> (Runner, Events, i64, i64) {
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
    let emit: Emit = Arc::new(move |u| sink.lock().expect("events").push(u));
    (Runner::new(engine, emit), events, model, ds)
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

fn status(r: &Runner, id: i64) -> RunStatus {
    r.shared
        .engine
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

#[test]
fn runner_executes_one_run_at_a_time_in_order_and_steers_queued_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, events, model, ds) = runner(dir.path());
    let a = r.start(&spec(model, ds, "a", 2)).expect("start a");
    let b = r.start(&spec(model, ds, "b", 2)).expect("start b");
    let c = r.start(&spec(model, ds, "c", 2)).expect("start c");
    let d = r.start(&spec(model, ds, "d", 2)).expect("start d");
    assert_eq!(b.status, RunStatus::Queued);
    assert_eq!(r.queued(), [b.id, c.id, d.id]);
    // Steering queued runs: c is parked, d cancelled; neither executes.
    r.pause(c.id).expect("pause queued c");
    r.cancel(d.id).expect("cancel queued d");
    assert_eq!(status(&r, c.id), RunStatus::Paused);
    assert_eq!(status(&r, d.id), RunStatus::Cancelled);
    assert_eq!(r.queued(), [b.id]);
    let err = r.remove(b.id).expect_err("b is queued");
    assert_eq!(err.code, "invalid_state");
    assert!(r.wait_idle(Duration::from_secs(300)), "runs did not finish");
    assert_eq!(status(&r, a.id), RunStatus::Completed);
    assert_eq!(status(&r, b.id), RunStatus::Completed);
    // FIFO, one at a time: b starts after a finished.
    let a_done =
        position(&events, a.id, |e| matches!(e, RunEvent::Finished { .. })).expect("a finished");
    let b_start =
        position(&events, b.id, |e| matches!(e, RunEvent::Started { .. })).expect("b started");
    assert!(a_done < b_start, "b started before a finished");
    for (id, want) in [(c.id, RunStatus::Paused), (d.id, RunStatus::Cancelled)] {
        assert!(
            position(&events, id, |e| matches!(
                e,
                RunEvent::Finished { status, .. } if *status == want
            ))
            .is_some(),
            "no Finished({want:?}) event for run {id}"
        );
        assert!(position(&events, id, |e| matches!(e, RunEvent::Started { .. })).is_none());
    }
    // A parked run resumes and completes; a completed one cannot be paused or resumed.
    r.resume(c.id).expect("resume c");
    assert!(r.wait_idle(Duration::from_secs(300)), "c did not finish");
    assert_eq!(status(&r, c.id), RunStatus::Completed);
    assert_eq!(r.pause(a.id).expect_err("completed").code, "invalid_state");
    assert_eq!(r.resume(a.id).expect_err("completed").code, "invalid_state");
    r.remove(a.id).expect("remove a");
    assert_eq!(r.remove(a.id).expect_err("gone").code, "not_found");
}

#[test]
fn runner_shutdown_pauses_the_executing_run_so_it_can_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, events, model, ds) = runner(dir.path());
    let long = r.start(&spec(model, ds, "long", 500)).expect("start long");
    let queued = r
        .start(&spec(model, ds, "queued", 2))
        .expect("start queued");
    let deadline = Instant::now() + Duration::from_secs(120);
    while position(&events, long.id, |e| matches!(e, RunEvent::Step { .. })).is_none() {
        assert!(Instant::now() < deadline, "no training step within 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(r.executing(), Some(long.id));
    assert!(
        r.shutdown(Duration::from_secs(120)),
        "the run did not pause"
    );
    assert_eq!(r.executing(), None);
    assert_eq!(status(&r, long.id), RunStatus::Paused);
    assert_eq!(status(&r, queued.id), RunStatus::Paused);
    let detail = r
        .shared
        .engine
        .run_detail(&long.id.to_string())
        .expect("detail");
    assert!(
        detail.run.step >= 1 && detail.run.step < 500,
        "{:?}",
        detail.run
    );
    let err = r.start(&spec(model, ds, "late", 2)).expect_err("closing");
    assert_eq!(err.code, "invalid_state");
    // The next session parks runs a previous one left queued.
    let engine = Arc::clone(&r.shared.engine);
    let again = engine.requeue_run(&long.id.to_string()).expect("requeue");
    assert_eq!(again.status, RunStatus::Queued);
    let next = Runner::new(Arc::clone(&engine), Arc::new(|_| {}));
    assert_eq!(status(&next, long.id), RunStatus::Paused);
}
