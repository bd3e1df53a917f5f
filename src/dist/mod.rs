//! Collectives for data-parallel training (DESIGN.md section 2, `comm`): the `Comm` trait the
//! trainer calls (all-reduce sum of f32 / f64 buffers, all-gather, broadcast, barrier), the
//! torchrun / Slurm environment (`env`), and one `Comm` implementation, `Group`, over two
//! test/debug transports:
//! - `Group::single()`: world 1, no communication (the default of every command);
//! - `Group::threads(world)`: one thread per rank in one process (`thread`), for tests;
//! - `Group::tcp(&env)`: one process per rank over TCP (`tcp`), rank 0 listening on
//!   MASTER_ADDR:MASTER_PORT; what `ipo launch` and torchrun/srun launches use.
//!
//! These transports carry buffers through host memory and a star around rank 0 (every rank
//! sends its buffer to rank 0, which reduces and sends the result back), so the time of an
//! all-reduce grows with the world size. On `--device cpu|sim` they carry everything; they are
//! not a production gradient transport.
//!
//! NCCL, on `--device cuda` at world > 1: the gradients are summed on the device by NCCL
//! (`crate::backend::cuda::nccl`, through `Backend::join_group` / `Backend::all_reduce_start` /
//! `Backend::all_reduce_wait`, the collectives of this layer passed down as functions),
//! overlapped with the backward: the trainer starts each decoder layer's gradients as soon as
//! the last micro-batch's backward has finished that layer, the embeddings', final norm's and
//! lm-head's after it, and waits before the norm and the update. On `cpu` and `sim` each start
//! is one host all-reduce here, at once; its sum is elementwise, so the bits are those of one
//! all-reduce of every gradient after the backward. The TCP group stays the control plane:
//! rank 0's NCCL unique id (128 bytes) reaches the other ranks in one `all_gather` over it, as
//! do the metrics, the ZeRO-1 slices and checkpoints' moments. libnccl.so.2 is loaded at run
//! time and needed only there; a rank without it fails the join on every rank before training.
//! Unproven without a GPU: the NCCL calls themselves and their overlap with the backward (CI
//! has neither a GPU nor libnccl; the library locator, the join's error paths and which
//! buffers the trainer starts when are what CI tests).
//!
//! Reduction order, fixed by design: rank 0 adds the ranks' buffers in rank order
//! (`((x0 + x1) + x2) + ...`, in the buffer's precision) and every rank receives those same bits,
//! so all ranks hold identical weights after every step, and a run is reproducible at a given
//! world size. Across world sizes the gradient sums are associated differently (rank-local
//! micro-batch accumulation, then the rank sum), so results agree within fp32 rounding, not bit
//! for bit.
//!
//! Failure handling: every wait has a deadline (`IPO_DIST_TIMEOUT`, seconds, default 600). A
//! rank that exits, is killed or stalls makes the others fail with an error naming it: rank 0
//! sees the closed connection or the timeout, and tells the remaining ranks (an abort message)
//! before it fails itself. No rank waits forever.

mod env;
mod tcp;
mod thread;

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use env::DistEnv;

/// Why a collective or the rendezvous failed. Messages name the rank, address or variable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// A torchrun/Slurm environment variable is missing or malformed.
    #[error("{0}")]
    Env(String),
    /// The ranks could not meet (address unreachable, port taken, a rank missing).
    #[error("rendezvous at {addr} failed: {reason}")]
    Rendezvous { addr: String, reason: String },
    /// A peer exited, was killed, stalled past the timeout, or sent something unexpected.
    #[error("rank {rank} {reason}")]
    Peer { rank: usize, reason: String },
    /// Rank 0 gave up on the collective (it names the rank that failed) and told this rank.
    #[error("rank 0 aborted the job: {0}")]
    Aborted(String),
    /// The device's collectives (NCCL) failed: library missing, init, or an all-reduce.
    #[error("{0}")]
    Device(String),
}

/// The collectives data-parallel training needs. Every rank calls the same collectives in the
/// same order with buffers of the same length; a rank out of step is an error naming it.
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// How long any wait may take (`IPO_DIST_TIMEOUT`); device collectives honour it too.
    fn timeout(&self) -> Duration {
        env::DEFAULT_TIMEOUT
    }
    /// Sums `buf` over all ranks, in place (same length on every rank).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Sums `buf` over all ranks, in place (host metrics).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError>;
    /// Every rank's bytes, in rank order, on every rank.
    fn all_gather(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, CommError>;
    /// Rank 0's `buf` on every rank (the others' contents are replaced).
    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<(), CommError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CommError> {
        self.all_gather(Vec::new()).map(|_| ())
    }
    /// `all_gather` at the end of work that takes the ranks very different times (a share of
    /// rollouts): it waits for the slowest rank without the stall deadline, while a rank that
    /// exits or is killed still fails it at once, named.
    fn all_gather_after_work(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, CommError> {
        self.all_gather(mine)
    }
}

/// How long `all_gather_after_work` waits for a rank that is alive but not done (30 days).
const AFTER_WORK: Duration = Duration::from_secs(30 * 24 * 3600);

/// The world-1 communicator: every collective is the identity.
pub fn single() -> Arc<dyn Comm> {
    Arc::new(Group::single())
}

/// The communicator of `env` (`DistEnv::from_env`): world 1 without RANK/WORLD_SIZE (or
/// SLURM_PROCID/SLURM_NTASKS), else a TCP group meeting at MASTER_ADDR:MASTER_PORT.
pub fn connect(env: &DistEnv) -> Result<Arc<dyn Comm>, CommError> {
    if env.world == 1 {
        return Ok(single());
    }
    Ok(Arc::new(Group::tcp(env)?))
}

/// One message of the star protocol: data, or rank 0's abort with its reason.
#[derive(Clone)]
pub(crate) enum Msg {
    Data(Vec<u8>),
    Abort(String),
}

/// Why a link could not deliver (the group turns it into a `CommError` naming the peer).
pub(crate) enum LinkError {
    Closed,
    TimedOut(Duration),
    Io(String),
}

/// A bidirectional connection between rank 0 and one other rank.
pub(crate) trait Link: Send {
    fn send(&mut self, msg: &Msg) -> Result<(), LinkError>;
    /// The next message, waiting at most `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Msg, LinkError>;
}

/// Which collective a message belongs to (checked by rank 0, so ranks out of step fail).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    SumF32 = 1,
    SumF64 = 2,
    Gather = 3,
    Broadcast = 4,
}

impl Op {
    fn name(tag: u8) -> &'static str {
        match tag {
            1 => "all-reduce (f32)",
            2 => "all-reduce (f64)",
            3 => "all-gather / barrier",
            4 => "broadcast",
            _ => "an unknown collective",
        }
    }
}

/// A star of links around rank 0: the `Comm` of every transport here. At rank 0, `links[r - 1]`
/// leads to rank r; at any other rank, `links[0]` leads to rank 0.
pub struct Group {
    rank: usize,
    world: usize,
    links: Vec<Mutex<Box<dyn Link>>>,
    timeout: Duration,
    /// The first failure: later collectives fail with it at once.
    failed: Mutex<Option<CommError>>,
}

impl Group {
    pub fn single() -> Group {
        Group::new(0, 1, Vec::new(), env::DEFAULT_TIMEOUT)
    }

    /// `world` communicators joined by in-process channels, one per rank (move each to its own
    /// thread). A test/debug transport; `timeout` bounds every wait.
    pub fn threads(world: usize, timeout: Duration) -> Vec<Group> {
        thread::group(world, timeout)
    }

    /// Joins the TCP group of `env` (rank 0 listens, the others connect).
    pub fn tcp(env: &DistEnv) -> Result<Group, CommError> {
        tcp::connect(env)
    }

    pub(crate) fn new(rank: usize, world: usize, links: Vec<Box<dyn Link>>, timeout: Duration) -> Group {
        Group { rank, world, links: links.into_iter().map(Mutex::new).collect(), timeout, failed: Mutex::new(None) }
    }

    fn fail(&self, e: CommError) -> CommError {
        let mut f = self.failed.lock().unwrap();
        if f.is_none() {
            *f = Some(e.clone());
        }
        e
    }

    fn peer_error(&self, peer: usize, e: LinkError) -> CommError {
        let reason = match e {
            LinkError::Closed => "closed its connection (it exited, was killed, or failed)".to_string(),
            LinkError::TimedOut(t) => format!("sent nothing for {:.1} s (IPO_DIST_TIMEOUT): stalled or unreachable", t.as_secs_f64()),
            LinkError::Io(m) => format!("connection failed: {m}"),
        };
        CommError::Peer { rank: peer, reason }
    }

    /// Rank 0 tells every other rank why the job stops (best effort: a dead rank's link just
    /// fails).
    fn abort_others(&self, why: &str) {
        for l in &self.links {
            if let Ok(mut l) = l.try_lock() {
                let _ = l.send(&Msg::Abort(why.to_string()));
            }
        }
    }

    /// Every rank sends `[op | payload]`; rank 0 gets the payloads in rank order (checked to be
    /// the same collective), the others `None`.
    fn gather(&self, op: Op, payload: Vec<u8>, timeout: Duration) -> Result<Option<Vec<Vec<u8>>>, CommError> {
        if let Some(e) = self.failed.lock().unwrap().clone() {
            return Err(e);
        }
        let mut msg = Vec::with_capacity(payload.len() + 1);
        msg.push(op as u8);
        msg.extend_from_slice(&payload);
        if self.rank != 0 {
            let mut link = self.links[0].lock().unwrap();
            return match link.send(&Msg::Data(msg)) {
                Ok(()) => Ok(None),
                // Rank 0 may have aborted and exited before this rank sent: its abort message,
                // still buffered on the link, says why (a bare "closed" would hide the culprit).
                Err(e) => Err(self.fail(match link.recv(Duration::from_millis(100)) {
                    Ok(Msg::Abort(m)) => CommError::Aborted(m),
                    _ => self.peer_error(0, e),
                })),
            };
        }
        let mut all = vec![payload];
        for r in 1..self.world {
            let got = self.links[r - 1].lock().unwrap().recv(timeout);
            let err = match got {
                Ok(Msg::Data(mut m)) if m.first() == Some(&(op as u8)) => {
                    m.remove(0);
                    all.push(m);
                    continue;
                }
                Ok(Msg::Data(m)) => CommError::Peer {
                    rank: r,
                    reason: format!("is out of step: it is in {} while rank 0 is in {}", Op::name(m.first().copied().unwrap_or(0)), Op::name(op as u8)),
                },
                Ok(Msg::Abort(m)) => CommError::Peer { rank: r, reason: format!("sent an abort to rank 0: {m}") },
                Err(e) => self.peer_error(r, e),
            };
            self.abort_others(&err.to_string());
            return Err(self.fail(err));
        }
        Ok(Some(all))
    }

    /// Rank 0 sends `data` to every rank; the others receive it.
    fn bcast(&self, data: Option<Vec<u8>>, timeout: Duration) -> Result<Vec<u8>, CommError> {
        if self.rank == 0 {
            let data = data.expect("rank 0 broadcasts data");
            for r in 1..self.world {
                if let Err(e) = self.links[r - 1].lock().unwrap().send(&Msg::Data(data.clone())) {
                    let err = self.peer_error(r, e);
                    self.abort_others(&err.to_string());
                    return Err(self.fail(err));
                }
            }
            return Ok(data);
        }
        // Rank 0 may itself wait up to one timeout for a slow rank before it aborts: wait for
        // twice that, so that its abort (naming the slow rank) arrives first.
        let got = self.links[0].lock().unwrap().recv(timeout.saturating_mul(2));
        match got {
            Ok(Msg::Data(d)) => Ok(d),
            Ok(Msg::Abort(m)) => Err(self.fail(CommError::Aborted(m))),
            Err(e) => Err(self.fail(self.peer_error(0, e))),
        }
    }

    /// Sum of equal-length little-endian vectors in rank order, element type of `N` bytes.
    fn sum_in_rank_order<const N: usize, T: Copy + std::ops::AddAssign>(
        &self,
        op: Op,
        bytes: Vec<u8>,
        from: fn([u8; N]) -> T,
        to: fn(T) -> [u8; N],
    ) -> Result<Vec<u8>, CommError> {
        let len = bytes.len();
        let Some(all) = self.gather(op, bytes, self.timeout)? else { return self.bcast(None, self.timeout) };
        if let Some((r, b)) = all.iter().enumerate().find(|(_, b)| b.len() != len) {
            let err = CommError::Peer { rank: r, reason: format!("sent {} values to an all-reduce of {} (ranks out of step)", b.len() / N, len / N) };
            self.abort_others(&err.to_string());
            return Err(self.fail(err));
        }
        let mut acc: Vec<T> = all[0].chunks_exact(N).map(|c| from(c.try_into().unwrap())).collect();
        for b in &all[1..] {
            for (a, c) in acc.iter_mut().zip(b.chunks_exact(N)) {
                *a += from(c.try_into().unwrap());
            }
        }
        self.bcast(Some(acc.into_iter().flat_map(to).collect()), self.timeout)
    }
}

impl Comm for Group {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        let bytes = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
        let sum = self.sum_in_rank_order(Op::SumF32, bytes, f32::from_le_bytes, f32::to_le_bytes)?;
        for (x, c) in buf.iter_mut().zip(sum.chunks_exact(4)) {
            *x = f32::from_le_bytes(c.try_into().unwrap());
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        let bytes = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
        let sum = self.sum_in_rank_order(Op::SumF64, bytes, f64::from_le_bytes, f64::to_le_bytes)?;
        for (x, c) in buf.iter_mut().zip(sum.chunks_exact(8)) {
            *x = f64::from_le_bytes(c.try_into().unwrap());
        }
        Ok(())
    }

    fn all_gather(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, CommError> {
        self.gather_all(mine, self.timeout)
    }

    fn all_gather_after_work(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, CommError> {
        self.gather_all(mine, AFTER_WORK.max(self.timeout))
    }

    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        // The gather checks that every rank is in this collective before rank 0 sends.
        let data = self.gather(Op::Broadcast, Vec::new(), self.timeout)?.map(|_| std::mem::take(buf));
        *buf = self.bcast(data, self.timeout)?;
        Ok(())
    }
}

impl Group {
    fn gather_all(&self, mine: Vec<u8>, timeout: Duration) -> Result<Vec<Vec<u8>>, CommError> {
        if self.world == 1 {
            return Ok(vec![mine]);
        }
        // Rank 0 concatenates `[len u64 | bytes]` per rank and broadcasts that.
        let packed = self.gather(Op::Gather, mine, timeout)?.map(|all| {
            let mut p = Vec::new();
            for b in all {
                p.extend_from_slice(&(b.len() as u64).to_le_bytes());
                p.extend_from_slice(&b);
            }
            p
        });
        let p = self.bcast(packed, timeout)?;
        let (mut out, mut at) = (Vec::with_capacity(self.world), 0);
        while at < p.len() {
            let n = u64::from_le_bytes(p[at..at + 8].try_into().unwrap()) as usize;
            out.push(p[at + 8..at + 8 + n].to_vec());
            at += 8 + n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f(rank, comm)` on one thread per rank of a thread group; results in rank order.
    pub(crate) fn on_threads<T: Send + 'static>(world: usize, timeout: Duration, f: impl Fn(&Group) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let hs: Vec<_> = Group::threads(world, timeout)
            .into_iter()
            .map(|g| {
                let f = f.clone();
                std::thread::spawn(move || f(&g))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Seeded values, never zeros, different per rank.
    fn values(rank: usize, n: usize) -> Vec<f32> {
        let mut s = 0x9E37_79B9u64.wrapping_mul(rank as u64 + 7);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0 + 0.01
            })
            .collect()
    }

    #[test]
    fn thread_collectives_sum_in_rank_order_and_agree_bitwise() {
        for world in [1, 2, 3, 4] {
            let out = on_threads(world, Duration::from_secs(20), move |g| {
                let mut x = values(g.rank(), 1000);
                g.all_reduce_sum(&mut x).unwrap();
                let mut y: Vec<f64> = values(g.rank(), 5).iter().map(|&v| v as f64 * 1.5).collect();
                g.all_reduce_sum_f64(&mut y).unwrap();
                let gathered = g.all_gather(vec![g.rank() as u8; g.rank() + 1]).unwrap();
                let mut b = if g.rank() == 0 { b"from zero".to_vec() } else { vec![9; 3] };
                g.broadcast(&mut b).unwrap();
                g.barrier().unwrap();
                (x, y, gathered, b)
            });
            let mut want = values(0, 1000);
            for r in 1..world {
                for (a, b) in want.iter_mut().zip(values(r, 1000)) {
                    *a += b;
                }
            }
            for (rank, (x, y, gathered, b)) in out.iter().enumerate() {
                assert!(x.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "world {world} rank {rank}: sum in rank order");
                assert_eq!(y, &out[0].1);
                assert_eq!(gathered.len(), world);
                assert!(gathered.iter().enumerate().all(|(r, g)| g == &vec![r as u8; r + 1]));
                assert_eq!(b, b"from zero");
            }
        }
    }

    #[test]
    fn a_rank_that_leaves_or_stalls_is_named() {
        // Rank 2 leaves (drops its communicator) before the all-reduce: ranks 0, 1 and 3 fail
        // naming it, and rank 1 and 3 learn it from rank 0's abort.
        let out = on_threads(4, Duration::from_secs(20), |g| {
            if g.rank() == 2 {
                return String::new();
            }
            let mut x = values(g.rank(), 10);
            g.all_reduce_sum(&mut x).unwrap_err().to_string()
        });
        assert!(out[0].contains("rank 2 closed its connection"), "{}", out[0]);
        for r in [1, 3] {
            assert!(out[r].contains("rank 0 aborted the job") && out[r].contains("rank 2"), "{}", out[r]);
        }
        // Rank 3 reaches the all-reduce only after rank 0 aborted and exited: its send finds the
        // link closed, and it still reports rank 0's abort naming rank 2 (CI once saw the bare
        // "rank 0 closed its connection" here).
        let out = on_threads(4, Duration::from_secs(20), |g| {
            if g.rank() == 2 {
                return String::new();
            }
            if g.rank() == 3 {
                std::thread::sleep(Duration::from_millis(400));
            }
            let mut x = values(g.rank(), 10);
            g.all_reduce_sum(&mut x).unwrap_err().to_string()
        });
        assert!(out[3].contains("rank 0 aborted the job") && out[3].contains("rank 2"), "{}", out[3]);
        // Rank 1 stalls (sleeps past the timeout): rank 0 fails within about the timeout.
        let t0 = std::time::Instant::now();
        let out = on_threads(2, Duration::from_millis(300), |g| {
            if g.rank() == 1 {
                std::thread::sleep(Duration::from_millis(1200));
                return String::new();
            }
            g.barrier().unwrap_err().to_string()
        });
        assert!(out[0].contains("rank 1 sent nothing for 0.3 s"), "{}", out[0]);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn ranks_out_of_step_fail() {
        let out = on_threads(2, Duration::from_secs(20), |g| {
            if g.rank() == 1 {
                return g.barrier().map_err(|e| e.to_string()).err().unwrap_or_default();
            }
            g.all_reduce_sum(&mut [1.0, 2.0]).unwrap_err().to_string()
        });
        assert!(out[0].contains("rank 1 is out of step: it is in all-gather / barrier while rank 0 is in all-reduce (f32)"), "{}", out[0]);
        assert!(out[1].contains("aborted"), "{}", out[1]);
    }
}
