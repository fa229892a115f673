//! Checkpoints: the trained tensors, the optimizer's moments and the step count, written to a
//! temporary directory and renamed into place, so a crash (or a full disk) at any moment leaves
//! either the previous checkpoint or the new one, never half of one.
//!
//! The data position needs no file of its own: the example order is a function of the seed and
//! the epoch, so the step count fixes which examples come next.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::train::{Method, TrainConfig, Trainer};
use crate::{Error, Result};

const PARAMS: &str = "trainable.safetensors";
const OPTIM: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// What `state.json` holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckpointState {
    pub step: usize,
    pub adam_steps: usize,
    pub method: Method,
    pub config: TrainConfig,
    pub n_examples: usize,
    pub param_names: Vec<String>,
}

/// The directory of the checkpoint at `step` under `root`.
pub fn dir_for(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:07}"))
}

/// The newest complete checkpoint under `root` (temporary directories are ignored).
pub fn latest(root: &Path) -> Option<(usize, PathBuf)> {
    let rd = std::fs::read_dir(root).ok()?;
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            e.path().join(STATE).is_file().then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

impl Trainer {
    /// Writes a checkpoint of the current step under `root` and returns its directory. Older
    /// checkpoints beyond the newest `keep` are removed.
    pub fn save_checkpoint(&self, root: &Path, keep: usize) -> Result<PathBuf> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let dst = dir_for(root, self.step());
        let tmp = root.join(format!(
            ".tmp-step-{:07}-{}",
            self.step(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let result = (|| {
            let params: Vec<(String, Tensor)> = self
                .trainable
                .params
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                .collect();
            save_tensors(&tmp.join(PARAMS), &params)?;
            let (opt, adam_steps) = self.optimizer.state(&self.trainable.params)?;
            save_tensors(&tmp.join(OPTIM), &opt)?;
            let state = CheckpointState {
                step: self.step(),
                adam_steps,
                method: self.trainable.method.clone(),
                config: self.config.clone(),
                n_examples: self.examples.len(),
                param_names: self
                    .trainable
                    .params
                    .iter()
                    .map(|(n, _)| n.clone())
                    .collect(),
            };
            let json = serde_json::to_string_pretty(&state)
                .map_err(|e| Error::InvalidParams(e.to_string()))?;
            let sp = tmp.join(STATE);
            std::fs::write(&sp, json).map_err(|e| Error::io(&sp, e))?;
            std::fs::File::open(&sp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&sp, e))?;
            if dst.exists() {
                std::fs::remove_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
            }
            std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
            if let Ok(d) = std::fs::File::open(root) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        // Prune older checkpoints.
        if let Ok(rd) = std::fs::read_dir(root) {
            let mut steps: Vec<(usize, PathBuf)> = rd
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().into_string().ok()?;
                    Some((n.strip_prefix("step-")?.parse().ok()?, e.path()))
                })
                .collect();
            steps.sort();
            let n = steps.len();
            for (_, p) in steps.into_iter().take(n.saturating_sub(keep.max(1))) {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(dst)
    }

    /// Restores the tensors, optimizer and step from a checkpoint written by the same run
    /// (same method, settings and examples).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let sp = dir.join(STATE);
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        let state: CheckpointState =
            serde_json::from_str(&text).map_err(|e| Error::format(&sp, "checkpoint state", e))?;
        let names: Vec<String> = self
            .trainable
            .params
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        if state.param_names != names || state.method != self.trainable.method {
            return Err(Error::format(
                &sp,
                "checkpoint state",
                "it was written for another method or model",
            ));
        }
        if state.n_examples != self.examples.len() {
            return Err(Error::format(
                &sp,
                "checkpoint state",
                format!(
                    "it was written for {} training examples, this run has {}",
                    state.n_examples,
                    self.examples.len()
                ),
            ));
        }
        let pp = dir.join(PARAMS);
        let params = candle_core::safetensors::load(&pp, &Device::Cpu)
            .map_err(|e| Error::format(&pp, "safetensors", e))?;
        for (name, var) in &self.trainable.params {
            let t = params.get(name).ok_or_else(|| {
                Error::format(&pp, "checkpoint", format!("tensor {name} missing"))
            })?;
            if t.dims() != var.dims() {
                return Err(Error::format(
                    &pp,
                    "checkpoint",
                    format!(
                        "tensor {name} has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(&t.to_device(var.device())?)?;
        }
        let op = dir.join(OPTIM);
        let opt = candle_core::safetensors::load(&op, &Device::Cpu)
            .map_err(|e| Error::format(&op, "safetensors", e))?;
        self.optimizer
            .load_state(&self.trainable.params, &opt, state.adam_steps)?;
        self.set_step(state.step);
        Ok(())
    }
}

/// Reads only `state.json`.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let sp = dir.join(STATE);
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(&sp, "checkpoint state", e))
}
