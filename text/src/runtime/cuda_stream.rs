//! CUDA streams, so that concurrent tracks on one GPU overlap (`cuda_stream.cpp`, a small C++
//! shim over c10's device-generic stream and event interfaces; tch has no streams).
//!
//! A track on a CUDA device takes a stream from libtorch's pool once; each block it runs with
//! that stream current on its worker thread ([`CudaStream::run`]): the stream first waits (an
//! event, on the device) for the work already queued on the thread's current stream (the block
//! input), and at the end the host waits for the stream: the one synchronisation per track
//! block that the merge needs anyway.

use std::ffi::{c_char, c_int, CStr};

use crate::error::{Result, TextError};

extern "C" {
    fn afm_cuda_pool_stream(index: i64, out: *mut i64, err: *mut c_char, len: usize) -> c_int;
    fn afm_cuda_enter_stream(
        stream: *const i64,
        prev: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn afm_cuda_leave_stream(
        stream: *const i64,
        prev: *const i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// A CUDA stream as c10 packs it: id, device index, device type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaStream([i64; 3]);

/// Call a shim function with an error buffer; its message on failure.
fn check(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut buf = [0 as c_char; 512];
    if f(buf.as_mut_ptr(), buf.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim writes a NUL-terminated message within `buf` (zeroed, so terminated
    // even if it wrote nothing).
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Err(TextError::CudaStream(msg.to_string_lossy().into_owned()))
}

impl CudaStream {
    /// A stream from the pool of CUDA device `index` (the pool hands its streams out in turn).
    pub fn from_pool(index: usize) -> Result<Self> {
        let mut out = [0i64; 3];
        // SAFETY: `out` holds the three numbers the shim writes.
        check(|err, len| unsafe {
            afm_cuda_pool_stream(index as i64, out.as_mut_ptr(), err, len)
        })?;
        Ok(Self(out))
    }

    /// The stream's id within its device (0 is the default stream).
    pub fn id(&self) -> i64 {
        self.0[0]
    }

    /// Run `f` on the calling thread with this stream current: the stream first waits for the
    /// work queued on the thread's current stream; afterwards the host waits for the stream and
    /// the previous stream is current again (also when `f` fails).
    pub fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut prev = [0i64; 3];
        // SAFETY: `self.0` and `prev` are three numbers each, as the shim reads and writes.
        check(|err, len| unsafe {
            afm_cuda_enter_stream(self.0.as_ptr(), prev.as_mut_ptr(), err, len)
        })?;
        let out = f();
        // SAFETY: as above.
        let left = check(|err, len| unsafe {
            afm_cuda_leave_stream(self.0.as_ptr(), prev.as_ptr(), err, len)
        });
        let out = out?;
        left?;
        Ok(out)
    }
}
