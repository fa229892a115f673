//! The op profiler: with `ATTUNE_PROFILE_OPS=1`, each kernel op records its wall time per kind
//! (the training bench prints them through [`take_profile`]).

use std::sync::Mutex;

/// Wall time per op kind, collected when `ATTUNE_PROFILE_OPS=1` (the training bench prints it):
/// `(op, seconds, calls)` since the last [`take_profile`].
static PROFILE: Mutex<Vec<(&'static str, f64, usize)>> = Mutex::new(Vec::new());

fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ATTUNE_PROFILE_OPS").is_ok_and(|v| v == "1"))
}

/// Adds the time from its creation to its drop to one op kind's total.
pub(crate) struct ProfGuard(&'static str, Option<std::time::Instant>);

impl Drop for ProfGuard {
    fn drop(&mut self) {
        let Some(t) = self.1 else { return };
        let dt = t.elapsed().as_secs_f64();
        let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
        match p.iter_mut().find(|e| e.0 == self.0) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => p.push((self.0, dt, 1)),
        }
    }
}

pub(crate) fn prof(op: &'static str) -> ProfGuard {
    ProfGuard(op, profiling().then(std::time::Instant::now))
}

/// The per-op wall times collected since the last call (empty unless `ATTUNE_PROFILE_OPS=1`).
pub fn take_profile() -> Vec<(&'static str, f64, usize)> {
    std::mem::take(&mut *PROFILE.lock().unwrap_or_else(|e| e.into_inner()))
}
