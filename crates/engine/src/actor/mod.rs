//! The engine actor: the one owner of concurrency. Every shell (the Tauri commands, the
//! CLI, the OpenAI-compatible HTTP server) sends it [`Request`]s and forwards the events
//! each request streams back; none of them holds a flag or a thread of its own.
//!
//! - **Generation** (playground panes, arena answers, CLI chat, API requests) waits in
//!   one bounded [`FairQueue`] (each client in turn) and runs on one worker thread, one
//!   answer at a time: the machines Attune targets have two to eight cores, which one
//!   answer already keeps busy. A full queue refuses at once ([`EngineError::QueueFull`]).
//!   Answers from remote API endpoints use no local compute and run on their own threads.
//! - **Evaluations** run one at a time on their own worker, beside generation.
//! - **Fine-tuning runs** execute one at a time, in FIFO order, on their own thread; a
//!   lock file in the data directory holds "one run at a time" across processes too (the
//!   app and `attune train` take turns). Run events go to the observer given at start
//!   (the app sends them to the window) and to the requester's own sink.
//!
//! Each request carries its own [`CancelToken`] (runs: pause/cancel requests by id) and
//! its own event sink, and is answered through its own reply callback, so nothing is
//! shared between two requests: Stop in one page never stops another's answer.
//!
//! Invariant: the actor thread never runs model code or waits on a worker; it only
//! moves requests between queues and workers, so every request is answered at once
//! (queued, refused or started).

mod fair;
mod runs;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attune_protocol::{
    ArenaEvent, ArenaItem, ChatEvent, ChatMessage, ChatTarget, EndpointEvalReport, EvalOptions,
    EvalProgress, EvalReport, EvalSubject, GenerationStats, JudgeEvent, JudgeReport, JudgeSpec,
    PromptTemplate, RunEvent, RunSpec, RunSummary, RunUpdate, SamplingParams,
};

use crate::error::EngineError;
use crate::Engine;
use fair::FairQueue;

pub use runs::TRAINING_LOCK_FILE;

/// Where a stream of events goes. A sink is called on a worker thread.
pub type Sink<E> = Box<dyn FnMut(E) + Send>;
/// How a request is answered, once. Called on the actor's or a worker's thread.
pub type Reply<T> = Box<dyn FnOnce(Result<T, EngineError>) + Send>;
/// Where every run's events go (the app forwards them to the window).
pub type RunObserver = Arc<dyn Fn(RunUpdate) + Send + Sync>;

/// Stops one request: set it and the request ends at its next check (a generation
/// after the current token, an evaluation after the current row). Cheap to clone;
/// every clone is the same token.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The flag the engine's generation loops read.
    pub fn flag(&self) -> &AtomicBool {
        &self.0
    }

    /// The shared flag (two tokens are the same token when these are the same `Arc`).
    pub fn inner(&self) -> &Arc<AtomicBool> {
        &self.0
    }
}

/// Cancels its token when dropped unless disarmed: a request whose caller goes away (a
/// closed HTTP connection, a dropped future) stops generating for nobody.
#[derive(Debug)]
pub struct CancelOnDrop(Option<CancelToken>);

impl CancelOnDrop {
    pub fn new(token: CancelToken) -> Self {
        CancelOnDrop(Some(token))
    }

    /// The request finished normally: do not cancel it.
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.cancel();
        }
    }
}

/// What a generation answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation, through the target's chat template (a template target applies
    /// its system prompt, examples and wrapper first).
    Chat(Vec<ChatMessage>),
    /// Plain text continued as it is (no chat template). A template target renders it as
    /// one user turn through the template instead.
    Text(String),
}

/// A generation request's parts other than its channels.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Who asks: requests are served client by client in turn. The app uses its page
    /// ("playground", "arena"), the server the API user or the connection.
    pub client: String,
    pub target: ChatTarget,
    pub prompt: Prompt,
    pub params: SamplingParams,
}

/// Everything the actor does, each request with its reply (and its cancel token and
/// event sink where it has them).
pub enum Request {
    /// Answers a prompt, streaming `ChatEvent`s: first `Queued` (accepted), then
    /// `Loading` (first use of a model), `Token`s and `Done`.
    Generate {
        generation: Generation,
        cancel: CancelToken,
        on_event: Sink<ChatEvent>,
        reply: Reply<GenerationStats>,
    },
    /// The arena's answers to prompt `index` (generated if not stored yet).
    ArenaItem {
        arena_id: i64,
        index: u64,
        cancel: CancelToken,
        on_event: Sink<ArenaEvent>,
        reply: Reply<ArenaItem>,
    },
    /// A judge votes on an arena's prompts (generating missing answers first); each
    /// answer and verdict is its own generation request.
    ArenaJudge {
        spec: Box<JudgeSpec>,
        cancel: CancelToken,
        on_event: Sink<JudgeEvent>,
        reply: Reply<JudgeReport>,
    },
    /// Evaluates a subject on a dataset.
    Evaluate {
        subject: EvalSubject,
        dataset: String,
        options: EvalOptions,
        cancel: CancelToken,
        on_progress: Sink<EvalProgress>,
        reply: Reply<EvalReport>,
    },
    /// Evaluates a template (or none) against a remote endpoint's model: label accuracy
    /// only. Runs at once on its own thread (no local compute).
    EvaluateEndpoint {
        endpoint: String,
        model: String,
        template: Option<PromptTemplate>,
        dataset: String,
        options: EvalOptions,
        cancel: CancelToken,
        on_progress: Sink<EvalProgress>,
        reply: Reply<EndpointEvalReport>,
    },
    /// Creates a run (checked; refused when it will not fit) and queues it. Its events
    /// also go to `on_event`, until it finishes.
    StartRun {
        spec: Box<RunSpec>,
        on_event: Option<Sink<RunEvent>>,
        reply: Reply<RunSummary>,
    },
    /// Puts a paused or failed run back in line; it continues from its last checkpoint.
    ResumeRun {
        id: i64,
        on_event: Option<Sink<RunEvent>>,
        reply: Reply<RunSummary>,
    },
    /// An executing run checkpoints and stops; a queued one leaves the queue (`paused`).
    PauseRun { id: i64, reply: Reply<()> },
    /// Stops a run for good (checkpoints removed).
    CancelRun { id: i64, reply: Reply<()> },
    /// Removes a run that is not executing or queued.
    RemoveRun { id: i64, reply: Reply<()> },
    /// What is executing and waiting now.
    Status { reply: Reply<ActorStatus> },
    /// Stops for exit: queued work is refused or parked, the executing run pauses (it
    /// writes a checkpoint), generation is cancelled; answers whether everything stopped
    /// within `timeout`.
    Shutdown {
        timeout: Duration,
        reply: Reply<bool>,
    },
    /// From the workers.
    Internal(Internal),
}

/// Messages from the actor's own workers.
#[doc(hidden)]
pub enum Internal {
    LaneIdle(Lane),
    RemoteDone,
    Run(runs::RunMsg),
}

/// A snapshot of the actor's queues.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ActorStatus {
    /// The run executing now.
    pub executing_run: Option<i64>,
    /// Runs waiting, oldest first.
    pub queued_runs: Vec<i64>,
    /// A local answer is being generated.
    pub generating: bool,
    /// Answers waiting.
    pub queued_generations: usize,
    /// Answers from remote endpoints in flight.
    pub remote_generations: usize,
    /// An evaluation is running.
    pub evaluating: bool,
}

/// Limits of the actor's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorOptions {
    /// Answers that may wait for the local model (beyond the one generating).
    pub generation_queue: usize,
    /// Evaluations that may wait.
    pub evaluation_queue: usize,
    /// Answers from remote endpoints in flight at once.
    pub remote_limit: usize,
}

impl Default for ActorOptions {
    fn default() -> Self {
        ActorOptions {
            generation_queue: 64,
            evaluation_queue: 8,
            remote_limit: 16,
        }
    }
}

/// The two local work lanes (each one job at a time on its own worker thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
pub enum Lane {
    Generation,
    Evaluation,
}

/// A queued job: what runs on the lane's worker, and how to refuse it if it never runs.
struct Job {
    cancel: CancelToken,
    run: Box<dyn FnOnce(&Engine) + Send>,
    refuse: Box<dyn FnOnce(EngineError) + Send>,
}

/// A lane: its waiting jobs and whether its worker is busy.
struct LaneState {
    queue: FairQueue<Job>,
    busy: Option<CancelToken>,
    worker: mpsc::Sender<Job>,
}

/// A handle on the engine actor. Cheap to clone; every clone talks to the same actor.
#[derive(Clone)]
pub struct Actor {
    tx: mpsc::Sender<Request>,
    engine: Arc<Engine>,
}

impl Actor {
    /// Starts the actor (its thread and workers) over `engine`; `observer` gets every
    /// run's events. (Runs left `queued` by a process that is gone were parked when the
    /// engine opened, so nothing starts training unasked.)
    pub fn start(engine: Arc<Engine>, options: ActorOptions, observer: RunObserver) -> Actor {
        let (tx, rx) = mpsc::channel::<Request>();
        let lanes = [Lane::Generation, Lane::Evaluation].map(|lane| {
            let limit = match lane {
                Lane::Generation => options.generation_queue,
                Lane::Evaluation => options.evaluation_queue,
            };
            LaneState {
                queue: FairQueue::new(limit),
                busy: None,
                worker: spawn_lane_worker(lane, Arc::clone(&engine), tx.clone()),
            }
        });
        let runs = runs::Runs::new(Arc::clone(&engine), observer, tx.clone());
        let mut state = State {
            engine: Arc::clone(&engine),
            tx: tx.clone(),
            lanes,
            runs,
            remote_in_flight: 0,
            options,
            closing: None,
        };
        let spawned = std::thread::Builder::new()
            .name("attune-actor".into())
            .spawn(move || state.serve(rx));
        if let Err(e) = spawned {
            // Without its thread every request is answered by `send` with this error.
            eprintln!("attune: cannot start the engine's thread: {e}");
        }
        Actor { tx, engine }
    }

    /// The engine behind the actor, for the library's reads and writes (lists, imports,
    /// templates): those need no queue.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Sends a request; if the actor is gone, the request is answered with an error.
    pub fn send(&self, request: Request) {
        if let Err(mpsc::SendError(request)) = self.tx.send(request) {
            request.refuse(EngineError::Closing);
        }
    }

    /// Sends the request `make` builds around a reply, and waits for the answer.
    pub fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> Result<T, EngineError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(make(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.recv().unwrap_or(Err(EngineError::Closing))
    }

    /// Generates and waits for the answer, streaming events to `on_event` on the worker.
    pub fn generate(
        &self,
        generation: Generation,
        cancel: &CancelToken,
        on_event: Sink<ChatEvent>,
    ) -> Result<GenerationStats, EngineError> {
        let cancel = cancel.clone();
        self.call(move |reply| Request::Generate {
            generation,
            cancel,
            on_event,
            reply,
        })
    }

    /// Generates and waits for the answer, calling `on_event` on this thread (the
    /// events cross from the worker through a channel).
    pub fn generate_here(
        &self,
        generation: Generation,
        cancel: &CancelToken,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        enum Msg {
            Event(ChatEvent),
            Done(Result<GenerationStats, EngineError>),
        }
        let (tx, rx) = mpsc::channel();
        let events = tx.clone();
        self.send(Request::Generate {
            generation,
            cancel: cancel.clone(),
            on_event: Box::new(move |e| {
                let _ = events.send(Msg::Event(e));
            }),
            reply: Box::new(move |r| {
                let _ = tx.send(Msg::Done(r));
            }),
        });
        while let Ok(msg) = rx.recv() {
            match msg {
                Msg::Event(e) => on_event(e),
                Msg::Done(r) => return r,
            }
        }
        Err(EngineError::Closing)
    }

    /// Lets a judge vote on an arena (see [`Request::ArenaJudge`]) and waits for the
    /// report; events go to `on_event` on the judging thread.
    pub fn judge_arena(
        &self,
        spec: JudgeSpec,
        cancel: &CancelToken,
        on_event: Sink<JudgeEvent>,
    ) -> Result<JudgeReport, EngineError> {
        let cancel = cancel.clone();
        self.call(move |reply| Request::ArenaJudge {
            spec: Box::new(spec),
            cancel,
            on_event,
            reply,
        })
    }

    pub fn start_run(
        &self,
        spec: RunSpec,
        on_event: Option<Sink<RunEvent>>,
    ) -> Result<RunSummary, EngineError> {
        self.call(move |reply| Request::StartRun {
            spec: Box::new(spec),
            on_event,
            reply,
        })
    }

    pub fn resume_run(
        &self,
        id: i64,
        on_event: Option<Sink<RunEvent>>,
    ) -> Result<RunSummary, EngineError> {
        self.call(move |reply| Request::ResumeRun {
            id,
            on_event,
            reply,
        })
    }

    pub fn pause_run(&self, id: i64) -> Result<(), EngineError> {
        self.call(move |reply| Request::PauseRun { id, reply })
    }

    pub fn cancel_run(&self, id: i64) -> Result<(), EngineError> {
        self.call(move |reply| Request::CancelRun { id, reply })
    }

    pub fn remove_run(&self, id: i64) -> Result<(), EngineError> {
        self.call(move |reply| Request::RemoveRun { id, reply })
    }

    pub fn status(&self) -> Result<ActorStatus, EngineError> {
        self.call(|reply| Request::Status { reply })
    }

    /// See [`Request::Shutdown`].
    pub fn shutdown(&self, timeout: Duration) -> bool {
        self.call(|reply| Request::Shutdown { timeout, reply })
            .unwrap_or(true)
    }

    /// Waits until no run executes or waits, up to `timeout` (tests, the CLI).
    pub fn wait_runs_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.status() {
                Ok(s) if s.executing_run.is_none() && s.queued_runs.is_empty() => return true,
                Ok(_) => {}
                Err(_) => return true,
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Request {
    /// Answers the request with `err` without doing it.
    fn refuse(self, err: EngineError) {
        match self {
            Request::Generate { reply, .. } => reply(Err(err)),
            Request::ArenaItem { reply, .. } => reply(Err(err)),
            Request::ArenaJudge { reply, .. } => reply(Err(err)),
            Request::Evaluate { reply, .. } => reply(Err(err)),
            Request::EvaluateEndpoint { reply, .. } => reply(Err(err)),
            Request::StartRun { reply, .. } | Request::ResumeRun { reply, .. } => reply(Err(err)),
            Request::PauseRun { reply, .. }
            | Request::CancelRun { reply, .. }
            | Request::RemoveRun { reply, .. } => reply(Err(err)),
            Request::Status { reply } => reply(Err(err)),
            Request::Shutdown { reply, .. } => reply(Ok(true)),
            Request::Internal(_) => {}
        }
    }
}

/// A lane's worker: runs its jobs one at a time, then tells the actor it is free.
fn spawn_lane_worker(
    lane: Lane,
    engine: Arc<Engine>,
    actor: mpsc::Sender<Request>,
) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    let name = match lane {
        Lane::Generation => "attune-generate",
        Lane::Evaluation => "attune-evaluate",
    };
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                // A panic in model code fails this job, not the worker.
                let Job { run, refuse, .. } = job;
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&engine))).is_err()
                {
                    refuse(EngineError::Internal(format!("the {name} thread panicked")));
                }
                if actor
                    .send(Request::Internal(Internal::LaneIdle(lane)))
                    .is_err()
                {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("attune: cannot start the {name} thread: {e}");
    }
    tx
}

/// The actor's state, owned by its thread.
struct State {
    engine: Arc<Engine>,
    tx: mpsc::Sender<Request>,
    lanes: [LaneState; 2],
    runs: runs::Runs,
    remote_in_flight: usize,
    options: ActorOptions,
    /// Shutting down: the deadline and who waits for the answer.
    closing: Option<(Instant, Vec<Reply<bool>>)>,
}

/// How often the actor wakes up without messages (cancelled jobs leave the queues,
/// the shutdown deadline is checked, a run waiting for another process's lock retries).
const TICK: Duration = Duration::from_millis(250);

impl State {
    fn serve(&mut self, rx: mpsc::Receiver<Request>) {
        loop {
            match rx.recv_timeout(TICK) {
                Ok(request) => self.handle(request),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            self.tick();
        }
    }

    fn lane(&mut self, lane: Lane) -> &mut LaneState {
        match lane {
            Lane::Generation => &mut self.lanes[0],
            Lane::Evaluation => &mut self.lanes[1],
        }
    }

    fn handle(&mut self, request: Request) {
        if self.closing.is_some() {
            if let Request::Internal(msg) = request {
                return self.internal(msg);
            }
            if let Request::Status { reply } = request {
                return reply(Ok(self.status()));
            }
            if let Request::Shutdown { reply, .. } = request {
                if let Some((_, waiting)) = &mut self.closing {
                    waiting.push(reply);
                }
                return;
            }
            return request.refuse(EngineError::Closing);
        }
        match request {
            Request::Generate {
                generation,
                cancel,
                on_event,
                reply,
            } => self.generate(generation, cancel, on_event, reply),
            Request::ArenaItem {
                arena_id,
                index,
                cancel,
                mut on_event,
                reply,
            } => {
                // Orchestration only: each side's answer is its own generation request
                // (local sides wait their turn in the queue, remote sides run beside it),
                // so this thread never holds the model while a remote side answers.
                let actor = Actor {
                    tx: self.tx.clone(),
                    engine: Arc::clone(&self.engine),
                };
                let spawned = std::thread::Builder::new()
                    .name("attune-arena".into())
                    .spawn(move || {
                        let engine = Arc::clone(&actor.engine);
                        let result = engine.arena_item_via(
                            arena_id,
                            index,
                            cancel.flag(),
                            &mut *on_event,
                            &mut |target, context, params, _, events| {
                                actor.generate_here(
                                    Generation {
                                        client: "app:arena".into(),
                                        target: target.clone(),
                                        prompt: Prompt::Chat(context.to_vec()),
                                        params: params.clone(),
                                    },
                                    &cancel,
                                    events,
                                )
                            },
                        );
                        reply(result);
                    });
                if let Err(e) = spawned {
                    eprintln!("attune: cannot start an arena thread: {e}");
                }
            }
            Request::ArenaJudge {
                spec,
                cancel,
                mut on_event,
                reply,
            } => {
                // Orchestration only, as for an arena item: every answer and verdict
                // waits its turn as its own generation.
                let actor = Actor {
                    tx: self.tx.clone(),
                    engine: Arc::clone(&self.engine),
                };
                let spawned = std::thread::Builder::new()
                    .name("attune-judge".into())
                    .spawn(move || {
                        let engine = Arc::clone(&actor.engine);
                        let result = engine.judge_arena_via(
                            &spec,
                            cancel.flag(),
                            &mut *on_event,
                            &mut |target, context, params, _, events| {
                                actor.generate_here(
                                    Generation {
                                        client: "app:judge".into(),
                                        target: target.clone(),
                                        prompt: Prompt::Chat(context.to_vec()),
                                        params: params.clone(),
                                    },
                                    &cancel,
                                    events,
                                )
                            },
                        );
                        reply(result);
                    });
                if let Err(e) = spawned {
                    eprintln!("attune: cannot start a judge thread: {e}");
                }
            }
            Request::Evaluate {
                subject,
                dataset,
                options,
                cancel,
                mut on_progress,
                reply,
            } => {
                let token = cancel.clone();
                let reply = Shared::new(reply);
                let refuse = reply.clone();
                let job = Job {
                    cancel,
                    run: Box::new(move |engine: &Engine| {
                        reply.send(engine.evaluate_with(
                            &subject,
                            &dataset,
                            &options,
                            &mut *on_progress,
                            token.flag(),
                        ))
                    }),
                    refuse: Box::new(move |e| refuse.send(Err(e))),
                };
                self.enqueue(Lane::Evaluation, "evaluation", job, &mut |_| {});
            }
            Request::EvaluateEndpoint {
                endpoint,
                model,
                template,
                dataset,
                options,
                cancel,
                mut on_progress,
                reply,
            } => {
                if self.remote_in_flight >= self.options.remote_limit {
                    return reply(Err(EngineError::QueueFull {
                        limit: self.options.remote_limit,
                    }));
                }
                self.remote_in_flight += 1;
                let engine = Arc::clone(&self.engine);
                let tx = self.tx.clone();
                let spawned = std::thread::Builder::new()
                    .name("attune-remote-eval".into())
                    .spawn(move || {
                        reply(engine.evaluate_endpoint(
                            &endpoint,
                            &model,
                            template.as_ref(),
                            &dataset,
                            &options,
                            &mut *on_progress,
                            cancel.flag(),
                        ));
                        let _ = tx.send(Request::Internal(Internal::RemoteDone));
                    });
                if let Err(e) = spawned {
                    self.remote_in_flight -= 1;
                    eprintln!("attune: cannot start a thread for an endpoint evaluation: {e}");
                }
            }
            Request::StartRun {
                spec,
                on_event,
                reply,
            } => reply(self.runs.start(&spec, on_event)),
            Request::ResumeRun {
                id,
                on_event,
                reply,
            } => reply(self.runs.resume(id, on_event)),
            Request::PauseRun { id, reply } => reply(self.runs.pause(id)),
            Request::CancelRun { id, reply } => reply(self.runs.cancel(id)),
            Request::RemoveRun { id, reply } => reply(self.runs.remove(id)),
            Request::Status { reply } => reply(Ok(self.status())),
            Request::Shutdown { timeout, reply } => self.begin_shutdown(timeout, reply),
            Request::Internal(msg) => self.internal(msg),
        }
    }

    fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::LaneIdle(lane) => {
                self.lane(lane).busy = None;
                self.dispatch(lane);
            }
            Internal::RemoteDone => self.remote_in_flight = self.remote_in_flight.saturating_sub(1),
            Internal::Run(m) => self.runs.on_message(m),
        }
    }

    fn status(&self) -> ActorStatus {
        ActorStatus {
            executing_run: self.runs.executing(),
            queued_runs: self.runs.queued(),
            generating: self.lanes[0].busy.is_some(),
            queued_generations: self.lanes[0].queue.len(),
            remote_generations: self.remote_in_flight,
            evaluating: self.lanes[1].busy.is_some(),
        }
    }

    fn generate(
        &mut self,
        generation: Generation,
        cancel: CancelToken,
        on_event: Sink<ChatEvent>,
        reply: Reply<GenerationStats>,
    ) {
        let client = generation.client.clone();
        let target = generation.target.clone();
        let reply = Shared::new(reply);
        let refuse = reply.clone();
        let token = cancel.clone();
        // The sink is told the queue position first, then the job streams into it.
        let sink = Arc::new(std::sync::Mutex::new(on_event));
        let job_sink = Arc::clone(&sink);
        let job = Job {
            cancel,
            run: Box::new(move |engine: &Engine| {
                let mut sink = job_sink.lock().unwrap_or_else(|p| p.into_inner());
                let result = engine.generate_for(&generation, token.flag(), &mut **sink);
                reply.send(result)
            }),
            refuse: Box::new(move |e| refuse.send(Err(e))),
        };
        let mut queued = |position: usize| {
            let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
            sink(ChatEvent::Queued { position });
        };
        if crate::endpoints::is_remote(&target) {
            // No local compute: it runs at once on its own thread, within a bound.
            if self.remote_in_flight >= self.options.remote_limit {
                return (job.refuse)(EngineError::QueueFull {
                    limit: self.options.remote_limit,
                });
            }
            queued(0);
            self.remote_in_flight += 1;
            let engine = Arc::clone(&self.engine);
            let tx = self.tx.clone();
            let Job { run, refuse, .. } = job;
            let spawned = std::thread::Builder::new()
                .name("attune-remote".into())
                .spawn(move || {
                    let refuse_panic =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&engine)));
                    if refuse_panic.is_err() {
                        refuse(EngineError::Internal(
                            "the remote answer's thread panicked".into(),
                        ));
                    }
                    let _ = tx.send(Request::Internal(Internal::RemoteDone));
                });
            if let Err(e) = spawned {
                self.remote_in_flight -= 1;
                eprintln!("attune: cannot start a thread for a remote answer: {e}");
            }
            return;
        }
        self.enqueue(Lane::Generation, &client, job, &mut queued);
    }

    /// Queues `job` (or refuses it when the lane is full) and starts the lane if idle.
    fn enqueue(&mut self, lane: Lane, client: &str, job: Job, on_queued: &mut dyn FnMut(usize)) {
        let l = self.lane(lane);
        let busy = usize::from(l.busy.is_some());
        match l.queue.push(client, job) {
            Ok(ahead) => on_queued(ahead + busy),
            Err(job) => {
                let limit = l.queue.limit();
                return (job.refuse)(EngineError::QueueFull { limit });
            }
        }
        self.dispatch(lane);
    }

    /// Hands the lane's next job to its worker if the worker is free.
    fn dispatch(&mut self, lane: Lane) {
        let l = self.lane(lane);
        if l.busy.is_some() {
            return;
        }
        while let Some((_, job)) = l.queue.pop() {
            if job.cancel.is_cancelled() {
                (job.refuse)(EngineError::Cancelled);
                continue;
            }
            l.busy = Some(job.cancel.clone());
            if let Err(mpsc::SendError(job)) = l.worker.send(job) {
                l.busy = None;
                (job.refuse)(EngineError::Closing);
                continue;
            }
            return;
        }
    }

    fn tick(&mut self) {
        // Cancelled jobs leave the queues at once (their callers are answered).
        for l in self.lanes.iter_mut() {
            for job in l.queue.remove_where(|j| j.cancel.is_cancelled()) {
                (job.refuse)(EngineError::Cancelled);
            }
        }
        self.runs.tick();
        if let Some((deadline, _)) = &self.closing {
            let idle =
                self.runs.executing().is_none() && self.lanes.iter().all(|l| l.busy.is_none());
            if idle || Instant::now() >= *deadline {
                if let Some((_, waiting)) = self.closing.as_mut() {
                    for reply in waiting.drain(..) {
                        reply(Ok(idle));
                    }
                }
            }
        }
    }

    fn begin_shutdown(&mut self, timeout: Duration, reply: Reply<bool>) {
        for l in self.lanes.iter_mut() {
            for job in l.queue.drain() {
                (job.refuse)(EngineError::Closing);
            }
            if let Some(t) = &l.busy {
                t.cancel();
            }
        }
        self.runs.shutdown();
        self.closing = Some((Instant::now() + timeout, vec![reply]));
    }
}

/// A reply that two closures share (the job's run and its refusal): whichever runs
/// first answers; the other finds it taken.
struct Shared<T>(Arc<std::sync::Mutex<Option<Reply<T>>>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<T> Shared<T> {
    fn new(reply: Reply<T>) -> Self {
        Shared(Arc::new(std::sync::Mutex::new(Some(reply))))
    }

    fn send(&self, result: Result<T, EngineError>) {
        let reply = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(reply) = reply {
            reply(result);
        }
    }
}

#[cfg(test)]
mod tests;
