//! The cost of the test/debug transports of `ipo::dist` (`Group::threads`, one process; and
//! `Group::tcp`, one process per rank over loopback TCP, what `ipo launch` and torchrun/srun
//! launches use on `--device cpu|sim`): the time of one `all_reduce_sum` of n f32 values at
//! world 2 and 3, and the bus bandwidth it gives (2 (W-1)/W x bytes / time, NCCL's convention).
//! A star around rank 0: every rank sends its buffer to rank 0, which sums in rank order and
//! sends the result back, so the time grows with the world size.
//!
//! Ranks are threads of this process either way (the TCP group talks over real sockets on
//! 127.0.0.1, as separate processes would); seeded random buffers; the median of 5 calls after
//! one warm-up. Run: `cargo bench --bench allreduce` (ALLREDUCE_MAX_MB caps the buffer, default
//! 544 MB: the gradients of the default model, SmolLM2-135M, in fp32).

use std::time::{Duration, Instant};

use ipo::dist::{Comm, DistEnv, Group};

fn values(rank: usize, n: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ rank as u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Median seconds of one all-reduce of `n` values over `groups` (one per rank, each run on a
/// thread of its own).
fn time(groups: Vec<Group>, n: usize) -> f64 {
    let world = groups.len();
    let hs: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(r, g)| {
            std::thread::spawn(move || {
                let mut buf = values(r, n);
                let mut times = Vec::new();
                for i in 0..6 {
                    g.barrier().unwrap();
                    let t0 = Instant::now();
                    g.all_reduce_sum(&mut buf).unwrap();
                    if i > 0 {
                        times.push(t0.elapsed().as_secs_f64());
                    }
                }
                times.sort_by(f64::total_cmp);
                times[times.len() / 2]
            })
        })
        .collect();
    let t: Vec<f64> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(t.len(), world);
    t.into_iter().fold(0.0, f64::max)
}

fn tcp_groups(world: usize, port: u16) -> Vec<Group> {
    let hs: Vec<_> = (0..world)
        .map(|rank| {
            let env = DistEnv { rank, world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port, timeout: Duration::from_secs(120) };
            std::thread::spawn(move || Group::tcp(&env).unwrap())
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn main() {
    let max_mb: usize = std::env::var("ALLREDUCE_MAX_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(544);
    println!("| transport | world | values | MB | ms per all-reduce | bus GB/s |");
    println!("|---|---|---|---|---|---|");
    for world in [2, 3] {
        for n in [1usize << 10, 1 << 20, 16 << 20, 136 << 20] {
            if n * 4 > max_mb << 20 {
                continue;
            }
            for transport in ["threads", "tcp"] {
                let groups = if transport == "tcp" { tcp_groups(world, free_port()) } else { Group::threads(world, Duration::from_secs(120)) };
                let s = time(groups, n);
                let bytes = (n * 4) as f64;
                let bus = 2.0 * (world - 1) as f64 / world as f64 * bytes / s / 1e9;
                println!("| {transport} | {world} | {n} | {:.1} | {:.3} | {bus:.2} |", bytes / 1e6, s * 1e3);
            }
        }
    }
}
