//! Device selection: `auto | cpu | cuda[:N] | mps`.

use std::str::FromStr;

use crate::error::TextError;

/// Where tensors live. `Auto` resolves to CUDA, then MPS, then CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Mps,
}

impl FromStr for DeviceSpec {
    type Err = TextError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "mps" => Ok(Self::Mps),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map(Self::Cuda).map_err(|_| {
                    TextError::InvalidArgument(format!(
                        "bad device '{s}': the CUDA index must be a number, as in cuda:1"
                    ))
                }),
                None => Err(TextError::InvalidArgument(format!(
                    "unknown device '{s}' (expected auto, cpu, cuda, cuda:N or mps)"
                ))),
            },
        }
    }
}

/// Load libtorch's CUDA backend (`libtorch_cuda.so`), once. The backend registers CUDA with
/// libtorch when it is loaded, but nothing in our binaries calls it by name, so the linker
/// (`--as-needed`) drops it and a CUDA build of libtorch would report no GPU. Looked up by
/// name (`LD_LIBRARY_PATH`, then the binary's rpath), then in the folder torch-sys built
/// against. Returns whether it is loaded: false with a CPU-only libtorch, and off Linux.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(dlopen_cuda_backend)
}

#[cfg(target_os = "linux")]
fn dlopen_cuda_backend() -> bool {
    let mut names = vec!["libtorch_cuda.so".to_string()];
    if let Some(dir) = option_env!("AFM_LIBTORCH_LIB") {
        names.push(format!("{dir}/libtorch_cuda.so"));
    }
    for name in names {
        let Ok(c) = std::ffi::CString::new(name.as_str()) else {
            continue;
        };
        // SAFETY: dlopen with a NUL-terminated name; the handle is kept for the process's life
        // (the backend must stay loaded).
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            tracing::debug!("loaded libtorch's CUDA backend ({name})");
            return true;
        }
    }
    false
}

#[cfg(not(target_os = "linux"))]
fn dlopen_cuda_backend() -> bool {
    false
}

/// Number of CUDA devices libtorch sees (after [`load_cuda_backend`]).
pub fn cuda_device_count() -> usize {
    load_cuda_backend();
    tch::Cuda::device_count().max(0) as usize
}

/// Whether libtorch sees a CUDA device (after [`load_cuda_backend`]).
pub fn cuda_available() -> bool {
    cuda_device_count() > 0
}

impl DeviceSpec {
    /// Resolve to a libtorch device, checking that it is present.
    pub fn resolve(self) -> Result<tch::Device, TextError> {
        match self {
            Self::Auto => {
                if cuda_available() {
                    Ok(tch::Device::Cuda(0))
                } else if tch::utils::has_mps() {
                    Ok(tch::Device::Mps)
                } else {
                    Ok(tch::Device::Cpu)
                }
            }
            Self::Cpu => Ok(tch::Device::Cpu),
            Self::Cuda(i) => {
                let n = cuda_device_count();
                if i < n {
                    Ok(tch::Device::Cuda(i))
                } else {
                    Err(TextError::InvalidArgument(format!(
                        "device cuda:{i} requested but {n} CUDA device(s) are visible"
                    )))
                }
            }
            Self::Mps => {
                if tch::utils::has_mps() {
                    Ok(tch::Device::Mps)
                } else {
                    Err(TextError::InvalidArgument(
                        "device mps requested but this libtorch has no MPS support".into(),
                    ))
                }
            }
        }
    }
}

/// Whether autograd records on this thread (grad mode is thread-local in libtorch, so worker
/// threads copy it from the caller; tch has no getter, so a probe tensor asks).
pub fn grad_enabled() -> crate::error::Result<bool> {
    let probe =
        tch::Tensor::f_zeros([1], (tch::Kind::Float, tch::Device::Cpu))?.set_requires_grad(true);
    Ok(probe.f_mul_scalar(2.0)?.requires_grad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("mps".parse::<DeviceSpec>().unwrap(), DeviceSpec::Mps);
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cpu_always_resolves() {
        assert_eq!(DeviceSpec::Cpu.resolve().unwrap(), tch::Device::Cpu);
        // Auto never fails: CPU is the fallback.
        assert!(DeviceSpec::Auto.resolve().is_ok());
    }
}
