//! One persistent pool of CPU threads for the fused decode step ([`crate::cpu_decode`]).
//!
//! A job is `n` chunks and a function run once per chunk. The calling thread works on the job
//! too, and every thread claims chunks from one atomic counter, so a thread the OS has put
//! aside (another busy process on the machine) delays nobody: the others take its share, and
//! the caller waits only for chunks that were claimed and not yet finished — never for a worker
//! that has not woken up. Idle workers spin briefly (a decode step's jobs come microseconds
//! apart), then yield, then sleep on a condition variable, so they do not fight libtorch's
//! OpenMP threads or another process for the cores between steps.
//!
//! The counter holds the job's epoch in its high 32 bits and the next chunk in the low 32: a
//! worker that wakes late, holding an old job, fails to claim (the epoch moved on) and never
//! calls a finished job's function.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

/// Spins on the job counter before yielding, and yields before sleeping.
const SPINS: usize = 20_000;
const YIELDS: usize = 200;

type JobFn = dyn Fn(usize) + Sync;

struct Job {
    /// Erased lifetime: valid while the job's chunks are not all done (see [`Pool::run`]).
    f: *const JobFn,
    chunks: u32,
}

struct Shared {
    /// `epoch << 32 | next chunk`.
    state: AtomicU64,
    /// Chunks finished in the current job.
    done: AtomicUsize,
    job: UnsafeCell<Job>,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    quit: AtomicBool,
}

// SAFETY: `job` is written only by the thread running `Pool::run` while no chunk of the
// previous job can still be claimed, and read by workers only before a claim that the epoch
// check validates (see the module docs).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises callers (one job at a time).
    running: Mutex<()>,
}

impl Pool {
    /// A pool of `threads` (the caller counts as one: `threads − 1` workers are spawned).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(Job {
                f: std::ptr::null::<fn(usize)>() as *const JobFn,
                chunks: 0,
            }),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            quit: AtomicBool::new(false),
        });
        let workers = (1..threads.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                // A thread the OS refuses just leaves the pool smaller.
                std::thread::Builder::new()
                    .name(format!("afm-decode-{i}"))
                    .spawn(move || worker(&s))
                    .ok()
            })
            .collect();
        Self {
            shared,
            workers,
            running: Mutex::new(()),
        }
    }

    /// Threads that run jobs (workers + the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run `f(i)` for every chunk `i < chunks` on the pool's threads and the caller's; returns
    /// when all are done.
    pub fn run(&self, chunks: usize, f: &(dyn Fn(usize) + Sync)) {
        if chunks == 0 {
            return;
        }
        if self.workers.is_empty() || chunks == 1 {
            (0..chunks).for_each(f);
            return;
        }
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let epoch = (s.state.load(Ordering::Acquire) >> 32) + 1;
        // SAFETY: the previous job is complete (every chunk done), so no worker can claim
        // from it and read `job` (module docs).
        unsafe {
            *s.job.get() = Job {
                // The erased lifetime ends before this function returns (we wait for every
                // chunk below).
                f: std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static JobFn>(f),
                chunks: chunks as u32,
            };
        }
        s.done.store(0, Ordering::Relaxed);
        s.state.store(epoch << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work(s, epoch);
        let mut spins = 0usize;
        while s.done.load(Ordering::Acquire) < chunks {
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Claim and run chunks of job `epoch` until none is left.
fn work(s: &Shared, epoch: u64) {
    loop {
        let cur = s.state.load(Ordering::Acquire);
        if cur >> 32 != epoch {
            return;
        }
        // SAFETY: read before the claim; used only if the claim (same epoch) succeeds, which
        // means the job is not complete and its function still alive.
        let (f, chunks) = unsafe {
            let j = &*s.job.get();
            (j.f, j.chunks)
        };
        let i = (cur & 0xFFFF_FFFF) as u32;
        if i >= chunks {
            return;
        }
        if s.state
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // SAFETY: see above.
            unsafe { (*f)(i as usize) };
            s.done.fetch_add(1, Ordering::Release);
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = s.state.load(Ordering::Acquire) >> 32;
    loop {
        // Wait for a new epoch: spin, then yield, then sleep.
        let mut n = 0usize;
        let epoch = loop {
            if s.quit.load(Ordering::Relaxed) {
                return;
            }
            let e = s.state.load(Ordering::Acquire) >> 32;
            if e != seen {
                break e;
            }
            n += 1;
            if n < SPINS {
                std::hint::spin_loop();
            } else if n < SPINS + YIELDS {
                std::thread::yield_now();
            } else {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.state.load(Ordering::SeqCst) >> 32 == seen && !s.quit.load(Ordering::SeqCst)
                {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                n = 0;
            }
        };
        seen = epoch;
        work(s, epoch);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Threads the decode pool uses: `AFM_VL_DECODE_THREADS`, else the physical cores (at most
/// libtorch's thread count when that was set lower).
pub fn default_threads() -> usize {
    if let Some(n) = std::env::var("AFM_VL_DECODE_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| (1..=256).contains(&n))
    {
        return n;
    }
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let physical = physical_cores().unwrap_or(logical);
    physical.min(tch::get_num_threads().max(1) as usize).max(1)
}

/// Physical cores from /proc/cpuinfo (Linux); `None` elsewhere.
fn physical_cores() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut ids = std::collections::BTreeSet::new();
    let (mut phys, mut core) = (None, None);
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                ids.insert((p, c));
            }
            continue;
        }
        let (k, v) = line.split_once(':')?;
        match k.trim() {
            "physical id" => phys = v.trim().parse::<u32>().ok(),
            "core id" => core = v.trim().parse::<u32>().ok(),
            _ => {}
        }
    }
    (!ids.is_empty()).then_some(ids.len())
}

/// The process-wide decode pool, created on first use with [`default_threads`].
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(default_threads()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_chunk_runs_exactly_once_across_many_jobs() {
        let pool = Pool::new(3);
        for chunks in [1usize, 2, 3, 7, 64, 1000] {
            let hits: Vec<AtomicU32> = (0..chunks).map(|_| AtomicU32::new(0)).collect();
            for _ in 0..50 {
                pool.run(chunks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
        }
    }

    #[test]
    fn jobs_finish_when_workers_sleep_and_when_one_thread_is_busy() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        // Let the worker fall asleep, then run again.
        std::thread::sleep(std::time::Duration::from_millis(200));
        pool.run(10, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
        // A chunk that blocks one thread: the other finishes the rest.
        let seen = AtomicUsize::new(0);
        pool.run(20, &|i| {
            if i == 0 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            seen.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(seen.load(Ordering::Relaxed), 20);
    }
}
