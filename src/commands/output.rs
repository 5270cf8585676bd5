//! Standard output that never panics.
//!
//! `println!` panics when stdout is closed or full (`afm-vl generate … | head -c 5`,
//! `> /dev/full`). Commands print through [`outln!`] / [`out!`] instead, which return an error
//! ("writing to stdout: No space left on device"); a reader that went away ends the process
//! quietly, as `cat` does: SIGPIPE keeps its default action ([`restore_sigpipe`]) and `main`
//! treats a broken-pipe error as a normal end.

use std::fmt;
use std::io::Write;

/// Print a line on stdout; evaluates to `anyhow::Result<()>`.
#[macro_export]
macro_rules! outln {
    () => { $crate::commands::output::write_out(format_args!("\n")) };
    ($($t:tt)*) => { $crate::commands::output::write_line(format_args!($($t)*)) };
}

/// Print on stdout without a newline and flush (streamed text); evaluates to
/// `anyhow::Result<()>`.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::commands::output::write_out(format_args!($($t)*)) };
}

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    anyhow::Error::new(e).context("writing to stdout")
}

pub fn write_line(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_fmt(args)
        .and_then(|_| o.write_all(b"\n"))
        .and_then(|_| o.flush())
        .map_err(stdout_error)
}

pub fn write_out(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_fmt(args)
        .and_then(|_| o.flush())
        .map_err(stdout_error)
}

/// Streamed generation output: the generation callbacks cannot fail, so the first write error
/// is kept (and later pieces dropped) and returned by [`StreamSink::finish`].
#[derive(Default)]
pub struct StreamSink {
    err: Option<std::io::Error>,
}

impl StreamSink {
    pub fn write(&mut self, piece: &str) {
        if self.err.is_some() {
            return;
        }
        let mut o = std::io::stdout().lock();
        if let Err(e) = o.write_all(piece.as_bytes()).and_then(|_| o.flush()) {
            self.err = Some(e);
        }
    }

    pub fn finish(&mut self) -> anyhow::Result<()> {
        match self.err.take() {
            Some(e) => Err(stdout_error(e)),
            None => Ok(()),
        }
    }
}

/// Give SIGPIPE its default action (Rust ignores it), so writing into a closed pipe ends the
/// process silently with the conventional status instead of an EPIPE error or panic.
pub fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_DFL before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether an error comes from writing into a pipe whose reader has gone.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
