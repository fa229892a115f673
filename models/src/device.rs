//! Which device a model runs on: the CPU (Attune's fused kernels) or an NVIDIA GPU through
//! candle's CUDA backend (the portable decoder path, [`crate::llama::Llama::is_portable`]).
//!
//! `ATTUNE_DEVICE` chooses: `cpu` (the default), `cuda` (GPU 0), `cuda:N` (GPU `N`) or `auto`
//! (GPU 0 when this build has the `cuda` feature and a GPU answers, else the CPU). Without the
//! `cuda` feature, `cuda` and `cuda:N` are refused with an error naming the feature; nothing here
//! panics.

use candle_core::Device;

use crate::{Error, Result};

/// The environment variable [`select`] reads.
pub const ENV: &str = "ATTUNE_DEVICE";

/// Whether this build has candle's CUDA backend (the `cuda` cargo feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// A device request, as `ATTUNE_DEVICE` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    /// GPU by ordinal.
    Cuda(usize),
    /// GPU 0 when there is one (and the build can drive it), else the CPU.
    Auto,
}

impl DeviceChoice {
    /// Parses `cpu`, `cuda`, `cuda:N`, `auto` (case and surrounding space ignored; empty means
    /// `cpu`).
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "" | "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map(DeviceChoice::Cuda).map_err(|_| {
                    Error::Device(format!(
                        "{ENV}={s}: the GPU ordinal after 'cuda:' must be a number (cuda:0, cuda:1, ...)"
                    ))
                }),
                None => Err(Error::Device(format!(
                    "{ENV}={s}: expected cpu, cuda, cuda:N or auto"
                ))),
            },
        }
    }

    /// The device, or why it cannot be had.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => cuda(n),
            DeviceChoice::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        // candle's error carries a backtrace after its first line: the reason is the first line.
        let e = e.to_string();
        let reason = e.lines().next().unwrap_or_default().trim();
        Error::Device(format!(
            "{ENV}: CUDA device {ordinal} is not available: {reason}"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Device(format!(
        "{ENV} asks for CUDA device {ordinal}, but this build has no GPU support: rebuild with \
         the `cuda` cargo feature (`cargo build --release --features cuda`; README, \"GPU (CUDA)\")"
    )))
}

/// The device `ATTUNE_DEVICE` names (the CPU when it is unset).
pub fn select() -> Result<Device> {
    match std::env::var(ENV) {
        Ok(v) => DeviceChoice::parse(&v)?.resolve(),
        Err(std::env::VarError::NotPresent) => Ok(Device::Cpu),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(Error::Device(format!("{ENV} is not valid UTF-8")))
        }
    }
}

/// A short name for logs and diagnostics: `cpu`, `cuda:0`, `metal:0`.
pub fn describe(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_refuses_the_rest() {
        assert_eq!(DeviceChoice::parse("").expect("device"), DeviceChoice::Cpu);
        assert_eq!(
            DeviceChoice::parse(" CPU ").expect("device"),
            DeviceChoice::Cpu
        );
        assert_eq!(
            DeviceChoice::parse("auto").expect("device"),
            DeviceChoice::Auto
        );
        assert_eq!(
            DeviceChoice::parse("cuda").expect("device"),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            DeviceChoice::parse("cuda:3").expect("device"),
            DeviceChoice::Cuda(3)
        );
        for bad in ["cuda:", "cuda:x", "cuda:-1", "tpu", "cuda0"] {
            let e = DeviceChoice::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(ENV) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_resolves_and_auto_always_gives_a_device() {
        assert!(DeviceChoice::Cpu.resolve().expect("device").is_cpu());
        let d = DeviceChoice::Auto.resolve().expect("device");
        if !CUDA_BUILT {
            assert!(d.is_cpu());
        }
        assert_eq!(describe(&Device::Cpu), "cpu");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_feature() {
        let e = DeviceChoice::Cuda(0)
            .resolve()
            .expect_err("no cuda")
            .to_string();
        assert!(e.contains("`cuda` cargo feature"), "{e}");
    }
}
