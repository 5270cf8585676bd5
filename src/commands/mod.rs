//! One file per subcommand. Each `run` returns `anyhow::Result`; `main` turns an error into a
//! one-line cause chain and exit code 1 (2 for a subcommand that is not built yet).

pub mod bench;
pub mod bench_tiler;
pub mod convert;
pub mod describe;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod tile;

use afm_text::DeviceSpec;

/// Options shared by every subcommand.
#[derive(Debug, Clone)]
pub struct Context {
    pub device: String,
    pub quiet: bool,
}

impl Context {
    pub fn device(&self) -> anyhow::Result<tch::Device> {
        let spec: DeviceSpec = self.device.parse()?;
        Ok(spec.resolve()?)
    }
}

/// Returned by subcommands whose implementation has not landed; `main` exits with code 2.
#[derive(Debug)]
pub struct NotBuilt(pub &'static str);

impl std::fmt::Display for NotBuilt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` is not built yet (see the open issues)", self.0)
    }
}

impl std::error::Error for NotBuilt {}
