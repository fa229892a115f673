//! A seeded random-mutation fuzzer for property tests on stable Rust (cargo-fuzz needs a
//! nightly compiler). Used by `models/tests/fuzz.rs`, the engine's `datasets::fuzz` tests and
//! `scripts/fuzz.sh`.
//!
//! [`run`] starts from a seed corpus (committed files), mutates inputs the way libFuzzer's
//! default mutators do (bit flips, interesting integers, byte runs inserted, removed, repeated
//! or spliced from another seed, truncation), and calls the target on each for a fixed time.
//! A *crash* is any panic, including one the code under test catches itself (a panic hook
//! counts them), and an input that takes longer than [`SLOW`] is a *hang*. Failing inputs are
//! written to `target/fuzz-failures/` for replay. Every target must return, with `Ok` or a
//! clean `Err`, for every input.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

/// An input that takes longer than this counts as a hang.
pub const SLOW: Duration = Duration::from_secs(2);

/// Largest input the mutator builds.
const MAX_LEN: usize = 1 << 20;

thread_local! {
    /// Panics on this thread while it runs a fuzz target (counted by the hook, so panics the
    /// target catches itself count too; other threads' panics do not).
    static PANICS: Cell<u64> = const { Cell::new(0) };
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
    static FUZZING: Cell<bool> = const { Cell::new(false) };
}
static HOOK: Once = Once::new();

/// Seconds per target: `ATTUNE_FUZZ_SECS`, else `default`.
pub fn budget(default: f64) -> Duration {
    let secs = std::env::var("ATTUNE_FUZZ_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

/// The files of `dir` (sorted), as seeds.
pub fn corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("seed corpus {} is missing: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
        .collect();
    assert!(!seeds.is_empty(), "seed corpus {} is empty", dir.display());
    seeds
}

/// What one target's run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: String,
    pub execs: u64,
    pub crashes: u64,
    pub hangs: u64,
    pub elapsed: Duration,
    /// The first failure's message and where its input was written.
    pub first_failure: Option<String>,
}

impl Report {
    /// One line, as `scripts/fuzz.sh` reads it.
    pub fn line(&self) -> String {
        format!(
            "fuzz {}: {} execs in {:.1} s ({:.0}/s), {} crashes, {} hangs",
            self.target,
            self.execs,
            self.elapsed.as_secs_f64(),
            self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.crashes,
            self.hangs
        )
    }
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    31,
    32,
    33,
    64,
    127,
    128,
    255,
    256,
    1024,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
];

/// One to eight random edits of `input`.
fn mutate(input: &mut Vec<u8>, seeds: &[Vec<u8>], rng: &mut Rng) {
    let edits = 1 + rng.below(8);
    for _ in 0..edits {
        let len = input.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = [0u8, 0xff, 0x7f, 0x80, b'{', b'"', b'\n', b','][rng.below(8)];
            }
            2 if len >= 4 => {
                // An interesting integer, u32 or u64, little-endian, at a random place.
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let bytes = v.to_le_bytes();
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let i = rng.below(len.saturating_sub(width - 1).max(1));
                for (k, b) in bytes.iter().take(width).enumerate() {
                    if let Some(x) = input.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            3 if len < MAX_LEN => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                input.drain(i..i + n);
            }
            5 if len > 0 && len < MAX_LEN => {
                // Repeat a run (grows lengths and counts).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let run: Vec<u8> = input[i..i + n].to_vec();
                let times = 1 + rng.below(4);
                for _ in 0..times {
                    input.splice(i..i, run.iter().copied());
                }
            }
            6 if len > 0 => input.truncate(rng.below(len)),
            7 => {
                // Splice a piece of another seed in.
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() && len < MAX_LEN {
                    let a = rng.below(other.len());
                    let b = a + 1 + rng.below((other.len() - a).min(256));
                    let at = rng.below(len + 1);
                    input.splice(at..at, other[a..b].iter().copied());
                }
            }
            8 if len >= 2 => {
                // Copy a run over another place.
                let a = rng.below(len);
                let b = rng.below(len);
                let n = 1 + rng.below((len - a.max(b)).min(32));
                let run: Vec<u8> = input[a..a + n].to_vec();
                input[b..b + n].copy_from_slice(&run);
            }
            _ => {
                if len > 0 {
                    let i = rng.below(len);
                    input[i] = input[i].wrapping_add(1 + rng.below(3) as u8);
                }
            }
        }
    }
}

fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if FUZZING.with(Cell::get) {
                PANICS.with(|p| p.set(p.get() + 1));
                LAST_PANIC.with(|l| *l.borrow_mut() = info.to_string());
                if std::env::var_os("ATTUNE_FUZZ_VERBOSE").is_none() {
                    return;
                }
            }
            previous(info);
        }));
    });
}

fn save_failure(target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}-{kind}-{}.bin", std::process::id()));
    let _ = std::fs::write(&path, input);
    path
}

/// Runs `target` on the seeds, then on mutated inputs, for `budget`; `seed` fixes the
/// sequence of mutations. The seeds themselves must not fail.
pub fn run(
    name: &str,
    seeds: &[Vec<u8>],
    budget: Duration,
    seed: u64,
    mut target: impl FnMut(&[u8]),
) -> Report {
    install_hook();
    let mut rng = Rng(seed ^ 0x5EED);
    let mut report = Report {
        target: name.to_string(),
        execs: 0,
        crashes: 0,
        hangs: 0,
        elapsed: Duration::ZERO,
        first_failure: None,
    };
    let started = Instant::now();
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    FUZZING.with(|f| f.set(true));
    let mut i = 0usize;
    loop {
        let input = if i < seeds.len() {
            seeds[i].clone()
        } else {
            if started.elapsed() >= budget {
                break;
            }
            let mut x = pool[rng.below(pool.len())].clone();
            mutate(&mut x, seeds, &mut rng);
            x
        };
        i += 1;
        let before = PANICS.with(Cell::get);
        let t0 = Instant::now();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        let took = t0.elapsed();
        report.execs += 1;
        let panicked = caught.is_err() || PANICS.with(Cell::get) != before;
        if panicked {
            report.crashes += 1;
            if report.first_failure.is_none() {
                let msg = LAST_PANIC.with(|l| l.borrow().clone());
                let at = save_failure(name, "crash", &input);
                report.first_failure = Some(format!("{msg} (input: {})", at.display()));
            }
        } else if took > SLOW {
            report.hangs += 1;
            if report.first_failure.is_none() {
                let at = save_failure(name, "slow", &input);
                report.first_failure = Some(format!(
                    "took {:.1} s (input: {})",
                    took.as_secs_f64(),
                    at.display()
                ));
            }
        } else if pool.len() < 256 && rng.below(16) == 0 {
            // Keep some mutants as starting points: deeper inputs than one step from a seed.
            pool.push(input);
        }
    }
    FUZZING.with(|f| f.set(false));
    report.elapsed = started.elapsed();
    report
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_harness_counts_caught_panics_and_runs_for_its_budget() {
        let seeds = vec![b"hello".to_vec(), b"world".to_vec()];
        let r = run("selftest", &seeds, Duration::from_millis(200), 1, |data| {
            // A panic the target swallows still counts.
            if data.first() == Some(&b'h') && data.len() == 5 {
                let _ = std::panic::catch_unwind(|| panic!("boom"));
            }
        });
        assert!(r.execs > 100, "{r:?}");
        assert!(r.crashes >= 1, "{r:?}");
        assert!(
            r.first_failure.as_deref().unwrap_or("").contains("boom"),
            "{r:?}"
        );
        let clean = run(
            "selftest-clean",
            &seeds,
            Duration::from_millis(100),
            2,
            |_| {},
        );
        assert_eq!((clean.crashes, clean.hangs), (0, 0));
        assert!(clean.line().contains("0 crashes, 0 hangs"));
    }

    #[test]
    fn mutation_is_deterministic_for_a_seed() {
        let seeds = vec![vec![1u8, 2, 3, 4, 5, 6, 7, 8]];
        let mut a = seeds[0].clone();
        let mut b = seeds[0].clone();
        mutate(&mut a, &seeds, &mut Rng(9));
        mutate(&mut b, &seeds, &mut Rng(9));
        assert_eq!(a, b);
    }
}
