//! The run manager: fine-tuning runs execute one at a time on a dedicated thread (the
//! machines Attune targets have few cores; two runs at once would each take twice as
//! long and need twice the memory). A run started while another executes waits in a
//! FIFO queue with status `queued` and starts when the one before it ends.
//!
//! Every [`RunEvent`] is handed to the `emit` callback as a [`RunUpdate`] (the app sends
//! it to the window as the `run-event` event). Queued runs that are parked, cancelled or
//! fail to start also get a `Finished` event, so the window refreshes for every change.
//!
//! On exit, [`Runner::shutdown`] pauses the executing run (a checkpoint is written) and
//! waits for it, so it is resumable at the next start; queued runs become `paused`.
//!
//! Invariant: the runner's lock is never held while the engine trains or touches the
//! library for long; commands only enqueue, signal and read.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use attune_engine::{Engine, RunControl};
use attune_protocol::{IpcError, RunEvent, RunSpec, RunStatus, RunSummary, RunUpdate};

/// Where run updates go.
pub type Emit = Arc<dyn Fn(RunUpdate) + Send + Sync>;

#[derive(Default)]
struct Inner {
    /// The run executing now and its control.
    executing: Option<(i64, Arc<RunControl>)>,
    /// Runs waiting, oldest first.
    queue: VecDeque<i64>,
    /// The worker thread is running (it exits when the queue is empty).
    worker: bool,
    /// Set by [`Runner::shutdown`]: nothing new starts.
    closing: bool,
}

struct Shared {
    engine: Arc<Engine>,
    emit: Emit,
    inner: Mutex<Inner>,
    /// Signalled whenever a run stops executing.
    idle: Condvar,
}

/// Executes runs one at a time; cheap to clone (shared state).
#[derive(Clone)]
pub struct Runner {
    shared: Arc<Shared>,
}

fn ipc(e: &attune_engine::EngineError) -> IpcError {
    IpcError::from(e)
}

fn state_error(message: String) -> IpcError {
    IpcError {
        code: "invalid_state".into(),
        message,
    }
}

impl Runner {
    /// A runner over `engine`. Runs left `queued` by a previous session (whose queue was
    /// in memory) become `paused`, so nothing starts training unasked.
    pub fn new(engine: Arc<Engine>, emit: Emit) -> Runner {
        if let Ok(runs) = engine.list_runs() {
            for r in runs.iter().filter(|r| r.status == RunStatus::Queued) {
                if let Err(e) = engine.pause_queued_run(&r.id.to_string()) {
                    eprintln!("attune-app: could not park queued run '{}': {e}", r.name);
                }
            }
        }
        Runner {
            shared: Arc::new(Shared {
                engine,
                emit,
                inner: Mutex::new(Inner::default()),
                idle: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, run_id: i64, event: RunEvent) {
        (self.shared.emit)(RunUpdate { run_id, event });
    }

    /// The run executing now, if any.
    pub fn executing(&self) -> Option<i64> {
        self.lock().executing.as_ref().map(|(id, _)| *id)
    }

    /// Runs waiting, oldest first.
    pub fn queued(&self) -> Vec<i64> {
        self.lock().queue.iter().copied().collect()
    }

    /// Creates the run (the engine checks the spec and refuses one that will not fit in
    /// memory) and queues it; it starts at once when nothing else executes.
    pub fn start(&self, spec: &RunSpec) -> Result<RunSummary, IpcError> {
        if self.lock().closing {
            return Err(state_error(
                "Attune is closing; start the run after it reopens".into(),
            ));
        }
        let run = self.shared.engine.create_run(spec).map_err(|e| ipc(&e))?;
        self.enqueue(run.id);
        Ok(run)
    }

    /// Continues a paused or failed run from its last checkpoint, behind any run
    /// executing or queued.
    pub fn resume(&self, id: i64) -> Result<RunSummary, IpcError> {
        {
            let inner = self.lock();
            if inner.closing {
                return Err(state_error(
                    "Attune is closing; resume the run after it reopens".into(),
                ));
            }
            if inner.executing.as_ref().is_some_and(|(x, _)| *x == id) {
                return Err(state_error(format!("run {id} is already executing")));
            }
            if inner.queue.contains(&id) {
                return Err(state_error(format!(
                    "run {id} is already queued and starts when the runs before it end"
                )));
            }
        }
        let run = self
            .shared
            .engine
            .requeue_run(&id.to_string())
            .map_err(|e| ipc(&e))?;
        self.enqueue(run.id);
        Ok(run)
    }

    /// Pauses a run: an executing run checkpoints and stops after its current step; a
    /// queued run leaves the queue and becomes `paused`.
    pub fn pause(&self, id: i64) -> Result<(), IpcError> {
        let mut inner = self.lock();
        if let Some((x, control)) = &inner.executing {
            if *x == id {
                control.pause();
                return Ok(());
            }
        }
        if let Some(pos) = inner.queue.iter().position(|x| *x == id) {
            inner.queue.remove(pos);
            drop(inner);
            self.shared
                .engine
                .pause_queued_run(&id.to_string())
                .map_err(|e| ipc(&e))?;
            self.emit(
                id,
                RunEvent::Finished {
                    status: RunStatus::Paused,
                    adapter: None,
                },
            );
            return Ok(());
        }
        drop(inner);
        let run = self
            .shared
            .engine
            .find_run(&id.to_string())
            .map_err(|e| ipc(&e))?;
        Err(state_error(format!(
            "run '{}' is {}, not executing or queued: there is nothing to pause",
            run.name,
            run.status.as_str()
        )))
    }

    /// Cancels a run for good: an executing run stops after its current step; any other
    /// run (queued, paused, failed) is cancelled at once. Checkpoints are removed.
    pub fn cancel(&self, id: i64) -> Result<(), IpcError> {
        let mut inner = self.lock();
        if let Some((x, control)) = &inner.executing {
            if *x == id {
                control.cancel();
                return Ok(());
            }
        }
        if let Some(pos) = inner.queue.iter().position(|x| *x == id) {
            inner.queue.remove(pos);
        }
        drop(inner);
        self.shared
            .engine
            .cancel_run(&id.to_string())
            .map_err(|e| ipc(&e))?;
        self.emit(
            id,
            RunEvent::Finished {
                status: RunStatus::Cancelled,
                adapter: None,
            },
        );
        Ok(())
    }

    /// Removes a run that is not executing or queued (its adapter stays).
    pub fn remove(&self, id: i64) -> Result<(), IpcError> {
        {
            let inner = self.lock();
            if inner.executing.as_ref().is_some_and(|(x, _)| *x == id) || inner.queue.contains(&id)
            {
                return Err(state_error(format!(
                    "run {id} is executing or queued: pause or cancel it before removing it"
                )));
            }
        }
        self.shared
            .engine
            .remove_run(&id.to_string())
            .map_err(|e| ipc(&e))
    }

    /// Stops for exit: queued runs become `paused`, the executing run is paused (it
    /// writes a checkpoint) and waited for, up to `timeout`. Returns whether nothing is
    /// executing any more.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let mut inner = self.lock();
        inner.closing = true;
        let parked: Vec<i64> = inner.queue.drain(..).collect();
        if let Some((_, control)) = &inner.executing {
            control.pause();
        }
        drop(inner);
        for id in parked {
            if let Err(e) = self.shared.engine.pause_queued_run(&id.to_string()) {
                eprintln!("attune-app: could not park queued run {id}: {e}");
            }
        }
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        while inner.executing.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inner = match self.shared.idle.wait_timeout(inner, left) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Waits until nothing executes and nothing is queued, up to `timeout` (tests).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        while inner.executing.is_some() || !inner.queue.is_empty() || inner.worker {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inner = match self.shared.idle.wait_timeout(inner, left) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Adds `id` to the queue and starts the worker if it is not running.
    fn enqueue(&self, id: i64) {
        let mut inner = self.lock();
        inner.queue.push_back(id);
        if inner.worker {
            return;
        }
        inner.worker = true;
        drop(inner);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("attune-runs".into())
            .spawn(move || me.work());
        if let Err(e) = spawned {
            let mut inner = self.lock();
            inner.worker = false;
            inner.queue.retain(|x| *x != id);
            drop(inner);
            eprintln!("attune-app: cannot start the run thread: {e}");
            let _ = self.shared.engine.pause_queued_run(&id.to_string());
            self.emit(
                id,
                RunEvent::Finished {
                    status: RunStatus::Paused,
                    adapter: None,
                },
            );
        }
    }

    /// The worker: executes queued runs in order until the queue is empty.
    fn work(&self) {
        loop {
            let (id, control) = {
                let mut inner = self.lock();
                let next = if inner.closing {
                    None
                } else {
                    inner.queue.pop_front()
                };
                let Some(id) = next else {
                    inner.worker = false;
                    inner.executing = None;
                    self.shared.idle.notify_all();
                    return;
                };
                let control = Arc::new(RunControl::new());
                inner.executing = Some((id, Arc::clone(&control)));
                (id, control)
            };
            let emit = Arc::clone(&self.shared.emit);
            let mut finished = false;
            let mut observer = |event: RunEvent| {
                finished |= matches!(event, RunEvent::Finished { .. });
                emit(RunUpdate { run_id: id, event });
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.shared
                    .engine
                    .resume_run(&id.to_string(), &mut observer, &control)
            }));
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if finished => eprintln!("attune-app: run {id}: {e}"),
                Ok(Err(e)) => {
                    eprintln!("attune-app: run {id}: {e}");
                    // Errors before training started leave no Finished event: say where
                    // the run stands now so the window refreshes.
                    let status = self
                        .shared
                        .engine
                        .find_run(&id.to_string())
                        .map(|r| r.status)
                        .unwrap_or(RunStatus::Failed);
                    self.emit(
                        id,
                        RunEvent::Finished {
                            status,
                            adapter: None,
                        },
                    );
                }
                Err(_) if finished => {
                    eprintln!("attune-app: run {id}: the training thread panicked");
                }
                Err(_) => {
                    eprintln!("attune-app: run {id}: the training thread panicked");
                    self.emit(
                        id,
                        RunEvent::Finished {
                            status: RunStatus::Failed,
                            adapter: None,
                        },
                    );
                }
            }
            let mut inner = self.lock();
            inner.executing = None;
            self.shared.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests;
