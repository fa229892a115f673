//! The actor's run queue: fine-tuning runs execute one at a time on a dedicated thread
//! (two runs at once would each take twice as long and need twice the memory). A run
//! started while another executes waits in FIFO order with status `queued`.
//!
//! Across processes the same holds through a lock file in the data directory
//! ([`TRAINING_LOCK_FILE`], `flock`ed while a run executes and released by the kernel
//! when the process dies): a run whose turn comes while another process trains waits,
//! still `queued`, and can be paused or cancelled while it waits.
//!
//! On shutdown, queued runs become `paused` and the executing run is paused (it writes
//! a checkpoint), so it is resumable at the next start.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use attune_protocol::{RunEvent, RunSpec, RunStatus, RunSummary, RunUpdate};

use super::{Internal, Request, RunObserver, Sink};
use crate::error::EngineError;
use crate::{Engine, RunControl};

/// The file in the data directory that the executing run holds locked.
pub const TRAINING_LOCK_FILE: &str = "training.lock";

/// How often a run waiting for another process's run checks the lock again.
const LOCK_RETRY: Duration = Duration::from_millis(500);

/// From the run thread to the actor.
pub enum RunMsg {
    Event { id: i64, event: RunEvent },
    Ended { id: i64 },
}

pub(super) struct Runs {
    engine: Arc<Engine>,
    observer: RunObserver,
    tx: mpsc::Sender<Request>,
    executing: Option<(i64, Arc<RunControl>)>,
    queue: VecDeque<i64>,
    /// Requesters' own sinks, per run, until the run finishes.
    sinks: HashMap<i64, Vec<Sink<RunEvent>>>,
    closing: bool,
}

fn state_error(what: String, reason: &str) -> EngineError {
    EngineError::InvalidState(format!("{what} {reason}"))
}

impl Runs {
    /// Runs queued by a process that is gone were parked when the engine opened
    /// ([`Engine::mark_interrupted_runs`]); this queue starts empty.
    pub fn new(engine: Arc<Engine>, observer: RunObserver, tx: mpsc::Sender<Request>) -> Runs {
        Runs {
            engine,
            observer,
            tx,
            executing: None,
            queue: VecDeque::new(),
            sinks: HashMap::new(),
            closing: false,
        }
    }

    pub fn executing(&self) -> Option<i64> {
        self.executing.as_ref().map(|(id, _)| *id)
    }

    pub fn queued(&self) -> Vec<i64> {
        self.queue.iter().copied().collect()
    }

    fn emit(&mut self, run_id: i64, event: RunEvent) {
        let finished = matches!(event, RunEvent::Finished { .. });
        if let Some(sinks) = self.sinks.get_mut(&run_id) {
            for sink in sinks.iter_mut() {
                sink(event.clone());
            }
        }
        if finished {
            self.sinks.remove(&run_id);
        }
        (self.observer)(RunUpdate { run_id, event });
    }

    fn subscribe(&mut self, id: i64, sink: Option<Sink<RunEvent>>) {
        if let Some(sink) = sink {
            self.sinks.entry(id).or_default().push(sink);
        }
    }

    pub fn start(
        &mut self,
        spec: &RunSpec,
        sink: Option<Sink<RunEvent>>,
    ) -> Result<RunSummary, EngineError> {
        if self.closing {
            return Err(EngineError::Closing);
        }
        let run = self.engine.create_run(spec)?;
        self.subscribe(run.id, sink);
        self.enqueue(run.id);
        Ok(run)
    }

    pub fn resume(
        &mut self,
        id: i64,
        sink: Option<Sink<RunEvent>>,
    ) -> Result<RunSummary, EngineError> {
        if self.closing {
            return Err(EngineError::Closing);
        }
        if self.executing() == Some(id) {
            return Err(state_error(format!("run {id}"), "is already executing"));
        }
        if self.queue.contains(&id) {
            return Err(state_error(
                format!("run {id}"),
                "is already queued and starts when the runs before it end",
            ));
        }
        let run = self.engine.requeue_run(&id.to_string())?;
        self.subscribe(run.id, sink);
        self.enqueue(run.id);
        Ok(run)
    }

    pub fn pause(&mut self, id: i64) -> Result<(), EngineError> {
        if let Some((x, control)) = &self.executing {
            if *x == id {
                control.pause();
                return Ok(());
            }
        }
        if let Some(pos) = self.queue.iter().position(|x| *x == id) {
            self.queue.remove(pos);
            self.engine.pause_queued_run(&id.to_string())?;
            self.emit(
                id,
                RunEvent::Finished {
                    status: RunStatus::Paused,
                    adapter: None,
                },
            );
            return Ok(());
        }
        let run = self.engine.find_run(&id.to_string())?;
        Err(state_error(
            format!("run '{}' is {},", run.name, run.status.as_str()),
            "not executing or queued: there is nothing to pause",
        ))
    }

    pub fn cancel(&mut self, id: i64) -> Result<(), EngineError> {
        if let Some((x, control)) = &self.executing {
            if *x == id {
                control.cancel();
                return Ok(());
            }
        }
        if let Some(pos) = self.queue.iter().position(|x| *x == id) {
            self.queue.remove(pos);
        }
        self.engine.cancel_run(&id.to_string())?;
        self.emit(
            id,
            RunEvent::Finished {
                status: RunStatus::Cancelled,
                adapter: None,
            },
        );
        Ok(())
    }

    pub fn remove(&mut self, id: i64) -> Result<(), EngineError> {
        if self.executing() == Some(id) || self.queue.contains(&id) {
            return Err(state_error(
                format!("run {id}"),
                "is executing or queued: pause or cancel it before removing it",
            ));
        }
        self.engine.remove_run(&id.to_string())
    }

    pub fn shutdown(&mut self) {
        self.closing = true;
        let parked: Vec<i64> = self.queue.drain(..).collect();
        for id in parked {
            match self.engine.pause_queued_run(&id.to_string()) {
                Ok(_) => self.emit(
                    id,
                    RunEvent::Finished {
                        status: RunStatus::Paused,
                        adapter: None,
                    },
                ),
                Err(e) => eprintln!("attune: could not park queued run {id}: {e}"),
            }
        }
        if let Some((_, control)) = &self.executing {
            control.pause();
        }
    }

    pub fn tick(&mut self) {}

    pub fn on_message(&mut self, msg: RunMsg) {
        match msg {
            RunMsg::Event { id, event } => self.emit(id, event),
            RunMsg::Ended { id } => {
                if self.executing() == Some(id) {
                    self.executing = None;
                }
                // A requester whose run ended without a Finished event (it could not
                // start) is released.
                self.sinks.remove(&id);
                self.next();
            }
        }
    }

    fn enqueue(&mut self, id: i64) {
        self.queue.push_back(id);
        self.next();
    }

    /// Starts the next queued run if none executes.
    fn next(&mut self) {
        if self.executing.is_some() || self.closing {
            return;
        }
        let Some(id) = self.queue.pop_front() else {
            return;
        };
        let control = Arc::new(RunControl::new());
        self.executing = Some((id, Arc::clone(&control)));
        let engine = Arc::clone(&self.engine);
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("attune-runs".into())
            .spawn(move || execute(&engine, id, &control, &tx));
        if let Err(e) = spawned {
            self.executing = None;
            eprintln!("attune: cannot start the run thread: {e}");
            let _ = self.engine.pause_queued_run(&id.to_string());
            self.emit(
                id,
                RunEvent::Finished {
                    status: RunStatus::Paused,
                    adapter: None,
                },
            );
        }
    }
}

fn send(tx: &mpsc::Sender<Request>, msg: RunMsg) {
    let _ = tx.send(Request::Internal(Internal::Run(msg)));
}

/// The run thread: waits for the training lock, executes the run, reports its end.
fn execute(engine: &Engine, id: i64, control: &RunControl, tx: &mpsc::Sender<Request>) {
    let finish = |status: RunStatus| {
        send(
            tx,
            RunMsg::Event {
                id,
                event: RunEvent::Finished {
                    status,
                    adapter: None,
                },
            },
        )
    };
    let lock = loop {
        match TrainingLock::try_acquire(engine.data_dir()) {
            Ok(Some(lock)) => break Some(lock),
            Ok(None) => {}
            Err(e) => {
                // Without a lock file (a read-only data dir fails later anyway), train.
                eprintln!("attune: {e}; training without the cross-process lock");
                break None;
            }
        }
        if control.is_cancelled() {
            match engine.cancel_run(&id.to_string()) {
                Ok(_) => finish(RunStatus::Cancelled),
                Err(e) => eprintln!("attune: run {id}: {e}"),
            }
            return send(tx, RunMsg::Ended { id });
        }
        if control.is_paused() {
            match engine.pause_queued_run(&id.to_string()) {
                Ok(_) => finish(RunStatus::Paused),
                Err(e) => eprintln!("attune: run {id}: {e}"),
            }
            return send(tx, RunMsg::Ended { id });
        }
        std::thread::sleep(LOCK_RETRY);
    };
    let mut finished = false;
    let mut observer = |event: RunEvent| {
        finished |= matches!(event, RunEvent::Finished { .. });
        send(tx, RunMsg::Event { id, event });
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.resume_run(&id.to_string(), &mut observer, control)
    }));
    drop(lock);
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if finished => eprintln!("attune: run {id}: {e}"),
        Ok(Err(e)) => {
            eprintln!("attune: run {id}: {e}");
            // Errors before training started leave no Finished event: say where the
            // run stands now so every window refreshes.
            let status = engine
                .find_run(&id.to_string())
                .map(|r| r.status)
                .unwrap_or(RunStatus::Failed);
            finish(status);
        }
        Err(_) => {
            eprintln!("attune: run {id}: the training thread panicked");
            if !finished {
                finish(RunStatus::Failed);
            }
        }
    }
    send(tx, RunMsg::Ended { id });
}

/// The cross-process training lock: held while a run executes.
struct TrainingLock(#[allow(dead_code)] File);

impl TrainingLock {
    /// Takes the lock, or `None` when another process holds it.
    fn try_acquire(data_dir: &Path) -> Result<Option<TrainingLock>, EngineError> {
        use std::os::fd::AsRawFd;
        let path = data_dir.join(TRAINING_LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| EngineError::Write {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a file descriptor this function owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(Some(TrainingLock(file)));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(EngineError::Write { path, source: err })
        }
    }
}
