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
//!
//! How many of the threads take part (the pool's *width*) adapts to the machine: when another
//! process holds a core, a thread of ours that the OS sets aside mid-chunk stalls the whole
//! step, and fewer threads are faster (2-core machine with one busy process: 1 thread 40–41
//! tok/s, 2 threads 35–37). [`Pool::step_done`] times the decode steps and, every so often,
//! runs a few at a neighbouring width; the faster width stays (see [`Tuner`]).

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
    /// Where workers outside the width wait (not counted in `sleepers`: jobs don't wake them).
    park: Condvar,
    quit: AtomicBool,
    /// Threads that take part in jobs (the caller and workers `1..active`).
    active: AtomicUsize,
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
    tuner: Mutex<Tuner>,
}

/// Steps timed at the current width between probes: the first gap, and the most it grows to
/// while probes keep losing (a probe costs a few slower steps on an idle machine).
const FIRST_GAP: usize = 24;
const MAX_GAP: usize = 384;
/// Steps per probe, and the margin a probe must win by.
const PROBE: usize = 3;
const WIN: f64 = 0.93;

/// Picks the pool's width from measured step times: after `gap` steps at the current width it
/// runs [`PROBE`] steps one thread narrower or wider (alternating, within `1..=threads`), and
/// switches when the probe's median step is faster than the median of the steps just before
/// it by [`WIN`]. A lost probe doubles the gap (up to [`MAX_GAP`]); a switch resets it.
#[derive(Debug)]
struct Tuner {
    /// Off: the width stays where it is.
    on: bool,
    threads: usize,
    width: usize,
    gap: usize,
    /// Steps since the last probe ended.
    since: usize,
    /// The last [`PROBE`] step times at the current width, and those of the running probe.
    recent: Vec<f64>,
    probe: Option<(usize, Vec<f64>)>,
    /// Whether the next probe goes narrower.
    down: bool,
}

impl Tuner {
    fn new(threads: usize) -> Self {
        Self {
            on: true,
            threads,
            width: threads,
            gap: FIRST_GAP,
            since: 0,
            recent: Vec::new(),
            probe: None,
            down: true,
        }
    }

    fn median(v: &[f64]) -> f64 {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Record one step's seconds; returns the width for the next step.
    fn record(&mut self, secs: f64) -> usize {
        if !self.on || self.threads <= 1 {
            return self.width;
        }
        if let Some((w, times)) = &mut self.probe {
            times.push(secs);
            if times.len() < PROBE {
                return *w;
            }
            let (w, probe, before) = (*w, Self::median(times), Self::median(&self.recent));
            self.probe = None;
            self.since = 0;
            self.recent.clear();
            if probe < WIN * before {
                tracing::debug!(
                    "decode pool: {} → {w} threads ({:.2} vs {:.2} ms a step)",
                    self.width,
                    1e3 * probe,
                    1e3 * before
                );
                self.width = w;
                self.gap = FIRST_GAP;
            } else {
                self.gap = (2 * self.gap).min(MAX_GAP);
            }
            return self.width;
        }
        self.recent.push(secs);
        if self.recent.len() > PROBE {
            self.recent.remove(0);
        }
        self.since += 1;
        if self.since >= self.gap && self.recent.len() == PROBE {
            let narrower = self.width > 1;
            let wider = self.width < self.threads;
            let go_down = (self.down && narrower) || !wider;
            self.down = !go_down;
            let w = if go_down {
                self.width - 1
            } else {
                self.width + 1
            };
            self.probe = Some((w, Vec::new()));
            return w;
        }
        self.width
    }
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
            park: Condvar::new(),
            quit: AtomicBool::new(false),
            active: AtomicUsize::new(threads.max(1)),
        });
        let workers: Vec<JoinHandle<()>> = (1..threads.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                // A thread the OS refuses just leaves the pool smaller.
                std::thread::Builder::new()
                    .name(format!("afm-decode-{i}"))
                    .spawn(move || worker(&s, i))
                    .ok()
            })
            .collect();
        let threads = workers.len() + 1;
        shared.active.store(threads, Ordering::SeqCst);
        Self {
            shared,
            workers,
            running: Mutex::new(()),
            tuner: Mutex::new(Tuner::new(threads)),
        }
    }

    /// Threads that run jobs (workers + the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Threads taking part in jobs now (1..=[`Pool::threads`]); callers size chunks by it.
    pub fn width(&self) -> usize {
        self.shared
            .active
            .load(Ordering::Relaxed)
            .clamp(1, self.threads())
    }

    /// Let `width` threads (the caller and `width − 1` workers) take part in jobs.
    pub fn set_width(&self, width: usize) {
        let w = width.clamp(1, self.threads());
        if self.shared.active.swap(w, Ordering::SeqCst) < w {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.park.notify_all();
        }
    }

    /// Whether [`Pool::step_done`] adapts the width (on by default; `AFM_VL_DECODE_ADAPT=0`
    /// turns it off for the process-wide pool). Turning it off restores the full width.
    pub fn set_tuning(&self, on: bool) {
        let mut t = self.tuner.lock().unwrap_or_else(|e| e.into_inner());
        *t = Tuner::new(self.threads());
        t.on = on;
        drop(t);
        if !on {
            self.set_width(self.threads());
        }
    }

    /// A decode step took `secs`: the tuner may change the width for the next ones.
    pub fn step_done(&self, secs: f64) {
        let w = self
            .tuner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(secs);
        if w != self.width() {
            self.set_width(w);
        }
    }

    /// Run `f(i)` for every chunk `i < chunks` on the pool's threads and the caller's; returns
    /// when all are done.
    pub fn run(&self, chunks: usize, f: &(dyn Fn(usize) + Sync)) {
        if chunks == 0 {
            return;
        }
        if self.workers.is_empty() || chunks == 1 || self.width() == 1 {
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

fn worker(s: &Shared, index: usize) {
    let mut seen = s.state.load(Ordering::Acquire) >> 32;
    loop {
        // Wait for a new epoch: spin, then yield, then sleep. A worker outside the width
        // sleeps until the width takes it in again.
        let mut n = 0usize;
        let epoch = loop {
            if s.quit.load(Ordering::Relaxed) {
                return;
            }
            if index >= s.active.load(Ordering::Relaxed) {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                while index >= s.active.load(Ordering::SeqCst) && !s.quit.load(Ordering::SeqCst) {
                    g = s.park.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                drop(g);
                seen = s.state.load(Ordering::Acquire) >> 32;
                n = 0;
                continue;
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
            self.shared.park.notify_all();
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
    POOL.get_or_init(|| {
        let pool = Pool::new(default_threads());
        if std::env::var("AFM_VL_DECODE_ADAPT").is_ok_and(|v| v == "0") {
            pool.set_tuning(false);
        }
        pool
    })
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

    /// The tuner keeps the full width while it is fastest, moves to a narrower one that is
    /// faster by more than the margin, and comes back when the full width wins again.
    #[test]
    fn tuner_follows_the_faster_width() {
        // Simulated machine: seconds per step at each width.
        let run = |t: &mut Tuner, w_time: &dyn Fn(usize) -> f64, steps: usize| {
            let mut w = t.width;
            let mut at = vec![0usize; t.threads + 1];
            for _ in 0..steps {
                at[w] += 1;
                w = t.record(w_time(w));
            }
            (t.width, at)
        };
        let mut t = Tuner::new(2);
        // Idle: 2 threads 16 ms, 1 thread 23 ms. Stays at 2; probes get rarer.
        let (w, at) = run(&mut t, &|w| if w == 2 { 0.016 } else { 0.023 }, 2000);
        assert_eq!(w, 2);
        assert!(at[1] <= 8 * PROBE, "probe steps at width 1: {}", at[1]);
        assert_eq!(t.gap, MAX_GAP);
        // Contention: 2 threads 28 ms, 1 thread 24 ms. Moves to 1 within one gap.
        let (w, _) = run(
            &mut t,
            &|w| if w == 2 { 0.028 } else { 0.024 },
            MAX_GAP + 2 * PROBE,
        );
        assert_eq!(w, 1);
        // Idle again: back to 2.
        let (w, _) = run(
            &mut t,
            &|w| if w == 2 { 0.016 } else { 0.023 },
            4 * FIRST_GAP,
        );
        assert_eq!(w, 2);
        // Within the margin: no switch.
        let (w, _) = run(&mut t, &|w| if w == 2 { 0.0160 } else { 0.0155 }, 1000);
        assert_eq!(w, 2);
        // Off: never moves.
        let mut t = Tuner::new(4);
        t.on = false;
        let (w, at) = run(&mut t, &|w| w as f64, 500);
        assert_eq!((w, at[4]), (4, 500));
    }

    #[test]
    fn narrower_widths_run_every_chunk() {
        let pool = Pool::new(3);
        for w in [1, 2, 3, 2, 1, 3] {
            pool.set_width(w);
            assert_eq!(pool.width(), w);
            let hits: Vec<AtomicU32> = (0..40).map(|_| AtomicU32::new(0)).collect();
            for _ in 0..20 {
                pool.run(40, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 20));
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
