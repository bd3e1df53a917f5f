//! A standing team of threads for the decode products (gemv.rs). A batch-1 decode step of the
//! default model is about 210 products of 0.1-1 MB of weights each, tens of microseconds apiece.
//! Through rayon, from a thread outside its pool, each one is a job injected into the pool,
//! workers woken from sleep and the caller parked on a futex: that costs about as much as the
//! product. Here the caller works too, and `threads - 1` helpers spin on an epoch counter
//! between products (sleeping after `SPIN` without work), so handing out a product is a few
//! atomic operations.
//!
//! Tasks are claimed from a shared counter; which thread runs a task never changes what the
//! task computes, so results do not depend on the team. A caller inside a rayon worker, or
//! while another thread holds the team, gets rayon instead.

use rayon::prelude::*;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper waits for the next job (spinning, then yielding) before it sleeps.
const SPIN: Duration = Duration::from_millis(1);
/// Pure spins before a waiting thread starts yielding its core (on a loaded machine the thread
/// it waits for may need that core).
const SPINS_BEFORE_YIELD: u32 = 2000;

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Odd while a job is open to helpers, even while none is. Bumped (to odd) after `job`
    /// is written and (to even) once every task is claimed.
    epoch: AtomicUsize,
    /// The current job and its task count. Written only by the caller holding `Team::busy`
    /// while the epoch is even and `users == 0`.
    job: UnsafeCell<(*const Job, usize)>,
    /// Next unclaimed task of the current job.
    next: AtomicUsize,
    /// Helpers inside the current job (counted before they read it).
    users: AtomicUsize,
    /// Per helper: parked (or about to park) waiting for an epoch.
    sleeping: Vec<AtomicBool>,
    panicked: AtomicBool,
}

// SAFETY: `job` is only written while no helper can read it (see `Shared::job`), and the
// pointee is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

struct Team {
    busy: Mutex<()>,
    shared: &'static Shared,
    helpers: Vec<Thread>,
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let n = rayon::current_num_threads().saturating_sub(1);
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new((std::ptr::null::<fn(usize)>() as *const Job, 0)),
            next: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            sleeping: (0..n).map(|_| AtomicBool::new(false)).collect(),
            panicked: AtomicBool::new(false),
        }));
        let helpers = (0..n)
            .map(|h| {
                std::thread::Builder::new()
                    .name(format!("ipo-team-{h}"))
                    .spawn(move || helper(shared, h))
                    .expect("spawn a decode team thread")
                    .thread()
                    .clone()
            })
            .collect();
        Team { busy: Mutex::new(()), shared, helpers }
    })
}

/// Spins, then yields, until `done()`.
fn wait_until(mut done: impl FnMut() -> bool) {
    let mut spins = 0u32;
    while !done() {
        if spins < SPINS_BEFORE_YIELD {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

fn helper(s: &'static Shared, h: usize) {
    let mut seen = 0;
    loop {
        // Wait for an open job not yet seen: spin, yield, then sleep.
        let t0 = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Acquire);
            if e != seen && e % 2 == 1 {
                break e;
            }
            spins = spins.saturating_add(1);
            if spins < SPINS_BEFORE_YIELD {
                std::hint::spin_loop();
            } else if t0.elapsed() < SPIN {
                std::thread::yield_now();
            } else {
                // The caller unparks whoever it sees sleeping after it opens a job.
                s.sleeping[h].store(true, SeqCst);
                let e = s.epoch.load(SeqCst);
                if e == seen || e % 2 == 0 {
                    std::thread::park();
                }
                s.sleeping[h].store(false, SeqCst);
            }
        };
        seen = epoch;
        // Join the job, unless it closed in the meantime (then the caller may already be
        // writing the next one, and `job` must not be read).
        s.users.fetch_add(1, SeqCst);
        if s.epoch.load(SeqCst) == epoch {
            // SAFETY: the job is open and we are counted: the caller keeps the closure alive
            // and `job` unchanged until `users` is back to 0.
            let (f, n) = unsafe { *s.job.get() };
            let f = unsafe { &*f };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| claim(s, f, n))).is_err() {
                s.panicked.store(true, SeqCst);
            }
        }
        s.users.fetch_sub(1, SeqCst);
    }
}

fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync + '_), n: usize) {
    loop {
        let i = s.next.fetch_add(1, Relaxed);
        if i >= n {
            return;
        }
        f(i);
    }
}

/// Closes the job and waits for the helpers inside it, also when the caller's own task
/// unwinds (the helpers may still be running the caller's closure).
struct Close(&'static Shared);
impl Drop for Close {
    fn drop(&mut self) {
        let s = self.0;
        s.epoch.fetch_add(1, SeqCst);
        wait_until(|| s.users.load(SeqCst) == 0);
    }
}

/// Runs `f(0..n)`, each task once, on the team (the calling thread included).
pub(crate) fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n <= 1 || rayon::current_thread_index().is_some() {
        return (0..n).into_par_iter().for_each(&f);
    }
    let t = team();
    let Ok(_busy) = t.busy.try_lock() else {
        return (0..n).into_par_iter().for_each(&f);
    };
    if t.helpers.is_empty() {
        return (0..n).for_each(f);
    }
    let s = t.shared;
    let job: &(dyn Fn(usize) + Sync + '_) = &f;
    // SAFETY: the epoch is even and no helper is inside a job (`Close` of the last call), so
    // none reads `job`; the lifetime is erased only until `Close` below returns.
    unsafe { *s.job.get() = (std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(job), n) };
    s.next.store(0, SeqCst);
    s.epoch.fetch_add(1, SeqCst);
    for (h, th) in t.helpers.iter().enumerate() {
        if s.sleeping[h].load(SeqCst) {
            th.unpark();
        }
    }
    {
        let _close = Close(s);
        claim(s, job, n);
    }
    if s.panicked.swap(false, SeqCst) {
        panic!("a task of the decode team panicked");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_task_runs_once() {
        use std::sync::atomic::{AtomicU32, Ordering};
        for n in [0usize, 1, 2, 7, 1000] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            super::for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
        }
    }
}
