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

impl DeviceSpec {
    /// Resolve to a libtorch device, checking that it is present.
    pub fn resolve(self) -> Result<tch::Device, TextError> {
        match self {
            Self::Auto => {
                if tch::Cuda::is_available() {
                    Ok(tch::Device::Cuda(0))
                } else if tch::utils::has_mps() {
                    Ok(tch::Device::Mps)
                } else {
                    Ok(tch::Device::Cpu)
                }
            }
            Self::Cpu => Ok(tch::Device::Cpu),
            Self::Cuda(i) => {
                let n = tch::Cuda::device_count() as usize;
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
