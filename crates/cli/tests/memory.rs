//! The memory estimate against real runs. For each method, `attune train` runs a few steps
//! of the real default model on the PubMedQA sample packed into full `max_len` blocks (every
//! batch has the shape the estimate assumes) as a child process; its peak resident memory is
//! the kernel's (`ru_maxrss` from `wait4`). The run's estimate (`attune runs show --json`,
//! the figure `create_run` refuses runs on and the advisor shows) must be an upper bound
//! within 25% of that peak.
//!
//! `ATTUNE_MEMORY_SWEEP=BxS,BxS,...` measures those shapes instead of the test's own, every
//! method, and prints one line per run (how the estimate in `attune_engine::runs` was fitted).

use attune_test_support::Cli;
use std::process::Stdio;

/// The estimate may exceed the measured peak by at most this factor.
const MAX_OVERESTIMATE: f64 = 1.25;

struct Library(Cli);

impl std::ops::Deref for Library {
    type Target = Cli;
    fn deref(&self) -> &Cli {
        &self.0
    }
}

impl Library {
    /// A fresh library with the default model and the PubMedQA sample.
    fn new() -> Library {
        let lib = Library(Cli::new(env!("CARGO_BIN_EXE_attune")));
        lib.add_default_model();
        let sample = attune_test_support::test_data("pubmedqa-sample.jsonl");
        lib.ok(&[
            "data",
            "import",
            sample.to_str().expect("utf-8 path"),
            "--name",
            "pubmedqa",
            "--valid-fraction",
            "0.1",
            "--yes",
        ]);
        lib
    }

    /// Trains `steps` steps of `method` at `batch` x `max_len` (packed blocks, loss on every
    /// token) in a child process; returns (its peak RSS, the run's estimate), in MiB.
    /// `method` may name the base form after a colon (`lora:quantized`).
    fn measure(&self, method: &str, batch: usize, max_len: usize, steps: usize) -> (f64, f64) {
        let name = format!("{}-{batch}x{max_len}", method.replace(':', "-"));
        let (method, base) = match method.split_once(':') {
            Some((m, b)) => (m, Some(b)),
            None => (method, None),
        };
        let (b, l, s) = (batch.to_string(), max_len.to_string(), steps.to_string());
        let log = self.root().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
        let mut args = vec![
            "train",
            "--model",
            "1",
            "--data",
            "pubmedqa",
            "--method",
            method,
            "--name",
            &name,
            "--steps",
            &s,
            "--batch-size",
            &b,
            "--max-len",
            &l,
            "--pack",
            "--loss-on",
            "all",
            "--eval-limit",
            "2",
            "--forgetting-rows",
            "4",
        ];
        if let Some(b) = base {
            args.extend(["--base", b]);
        }
        let mut cmd = self.cmd(&args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start attune train");
        let (status, peak_kib) = wait_with_peak(child.id());
        assert!(
            status == 0,
            "attune train ({name}) failed with wait status {status}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let run: serde_json::Value =
            serde_json::from_str(&self.ok(&["runs", "show", &name, "--json"])).expect("json");
        let estimate = run["memory_estimate_mb"]
            .as_f64()
            .or_else(|| run["run"]["memory_estimate_mb"].as_f64())
            .unwrap_or_else(|| panic!("no memory_estimate_mb in {run}"));
        (peak_kib as f64 / 1024.0, estimate)
    }
}

/// Waits for the child `pid`; returns its wait status and peak resident memory in KiB.
fn wait_with_peak(pid: u32) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is a child of this process that nobody else waits for.
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(
        r,
        pid as libc::pid_t,
        "wait4: {}",
        std::io::Error::last_os_error()
    );
    (status, usage.ru_maxrss)
}

fn check(lib: &Library, method: &str, batch: usize, max_len: usize) {
    let (peak, estimate) = lib.measure(method, batch, max_len, 2);
    let ratio = estimate / peak;
    println!(
        "{method} {batch}x{max_len}: peak {peak:.0} MiB, estimate {estimate:.0} MiB ({ratio:.2}x)"
    );
    assert!(
        estimate >= peak,
        "{method} at {batch} x {max_len}: the estimate {estimate:.0} MiB is below the measured peak {peak:.0} MiB"
    );
    assert!(
        ratio <= MAX_OVERESTIMATE,
        "{method} at {batch} x {max_len}: the estimate {estimate:.0} MiB is {ratio:.2}x the measured peak {peak:.0} MiB (at most {MAX_OVERESTIMATE}x)"
    );
}

#[test]
fn the_memory_estimate_bounds_each_methods_peak_within_25_percent() {
    let lib = Library::new();
    if let Ok(shapes) = std::env::var("ATTUNE_MEMORY_SWEEP") {
        for method in [
            "lora",
            "prompt",
            "full",
            "lora:quantized",
            "prompt:quantized",
            "lora:bf16",
        ] {
            for shape in shapes.split(',') {
                let (b, l) = shape
                    .split_once('x')
                    .and_then(|(b, l)| Some((b.trim().parse().ok()?, l.trim().parse().ok()?)))
                    .unwrap_or_else(|| panic!("ATTUNE_MEMORY_SWEEP: '{shape}' is not BxS"));
                let (peak, estimate) = lib.measure(method, b, l, 3);
                println!(
                    "SWEEP\t{method}\t{b}\t{l}\t{peak:.1}\t{estimate:.0}\t{:.3}",
                    estimate / peak
                );
            }
        }
        return;
    }
    check(&lib, "lora", 2, 256);
    check(&lib, "prompt", 2, 256);
    check(&lib, "full", 1, 256);
    // The compact bases: the GGUF blocks, and bf16.
    check(&lib, "lora:quantized", 2, 256);
    check(&lib, "prompt:quantized", 2, 256);
    check(&lib, "lora:bf16", 2, 256);
}
