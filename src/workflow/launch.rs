//! `launch`: one process per rank on this node, as torchrun does. Each child is this same
//! binary running the given subcommand with RANK = node_rank * nproc + local rank, WORLD_SIZE
//! = nnodes * nproc, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (what
//! `crate::dist::DistEnv` reads). Their stdout and stderr come out here line by line, prefixed
//! `[rank R]`. When a child exits with a failure, the others are killed and `launch` fails
//! naming that rank; it succeeds when every child succeeded.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where and how many processes to start (flags of `ipo launch`).
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchOptions {
    /// Processes to start on this node, one per GPU (with --device cuda each rank uses GPU
    /// LOCAL_RANK, or N + LOCAL_RANK with cuda:N). Their ranks are node_rank * nproc + 0..nproc.
    #[arg(long, value_name = "N")]
    pub nproc: usize,
    /// Nodes of the job; run `ipo launch` once on each, with the same --nproc, --master-addr
    /// and --master-port and its own --node-rank. WORLD_SIZE = nnodes * nproc.
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes; node 0 holds rank 0, which the others connect to.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0 that every node can reach (MASTER_ADDR); rank 0 listens on all of
    /// node 0's interfaces.
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// TCP port rank 0 listens on for the rendezvous (MASTER_PORT); it must be free on node 0.
    #[arg(long, value_name = "PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// The subcommand every rank runs, and its flags, after `--` (e.g. `-- train --model M
    /// --pairs P --output O`). `train` runs data parallel and `generate` shards its prompts
    /// over the ranks; the other subcommands refuse a world size above 1.
    #[arg(last = true, required = true, value_name = "SUBCOMMAND")]
    pub command: Vec<String>,
}

/// What a `launch` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LaunchSummary {
    pub world: usize,
    /// Ranks started on this node.
    pub ranks: Vec<usize>,
}

/// Runs `opts.command` as `opts.nproc` ranks of this node and waits for all of them.
pub fn launch(opts: &LaunchOptions) -> Result<LaunchSummary> {
    if opts.nproc == 0 || opts.nnodes == 0 {
        bail!("--nproc and --nnodes must be >= 1");
    }
    if opts.node_rank >= opts.nnodes {
        bail!("--node-rank {} must be below --nnodes {}", opts.node_rank, opts.nnodes);
    }
    if opts.master_port == 0 {
        bail!("--master-port must be a TCP port 1-65535");
    }
    match opts.command.first().map(String::as_str) {
        None => bail!("nothing to launch: give the subcommand after `--`, e.g. `ipo launch --nproc 2 -- train ...`"),
        Some("launch") => bail!("`ipo launch -- launch` would start launchers: give the subcommand to run, e.g. train"),
        Some(_) => {}
    }
    let exe = std::env::current_exe().context("cannot find this program's path to start the ranks")?;
    let world = opts.nnodes * opts.nproc;
    let ranks: Vec<usize> = (0..opts.nproc).map(|l| opts.node_rank * opts.nproc + l).collect();
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut pumps = Vec::new();
    for (local, &rank) in ranks.iter().enumerate() {
        let spawned = Command::new(&exe)
            .args(&opts.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", opts.nproc.to_string())
            .env("MASTER_ADDR", &opts.master_addr)
            .env("MASTER_PORT", opts.master_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                bail!("cannot start rank {rank} ({}): {e}", exe.display());
            }
        };
        pumps.push(pump(child.stdout.take().unwrap(), rank, false));
        pumps.push(pump(child.stderr.take().unwrap(), rank, true));
        children.push((rank, child));
    }
    let failed = wait_all(&mut children);
    for p in pumps {
        let _ = p.join();
    }
    let Some(&(rank, status)) = failed.first() else { return Ok(LaunchSummary { world, ranks }) };
    let also: Vec<String> = failed[1..].iter().map(|(r, s)| format!("; rank {r} failed too ({s})")).collect();
    let stopped: Vec<String> = ranks.iter().filter(|r| !failed.iter().any(|f| f.0 == **r)).map(|r| r.to_string()).collect();
    let stopped = if stopped.is_empty() { String::new() } else { format!("; stopped ranks {}", stopped.join(", ")) };
    bail!("rank {rank} failed ({status}){}{stopped}", also.concat())
}

/// Waits until every child succeeded (returns nothing) or one failed. Then the others get a
/// second to fail on their own (a rank whose peer died fails at its next collective), the rest
/// are killed, and the failed ranks are returned, the cause first: of those found failed in the
/// same poll, one killed by a signal before one that exited with an error, then lower ranks.
fn wait_all(children: &mut [(usize, Child)]) -> Vec<(usize, ExitStatus)> {
    let mut done = vec![false; children.len()];
    let mut failed: Vec<(usize, ExitStatus)> = Vec::new();
    let mut grace_end = None;
    loop {
        let mut now_failed = Vec::new();
        for (k, (rank, c)) in children.iter_mut().enumerate() {
            if done[k] {
                continue;
            }
            match c.try_wait() {
                Ok(Some(s)) => {
                    done[k] = true;
                    if !s.success() {
                        now_failed.push((*rank, s));
                    }
                }
                Ok(None) => {}
                Err(_) => done[k] = true,
            }
        }
        now_failed.sort_by_key(|(r, s)| (s.code().is_some(), *r));
        failed.extend(now_failed);
        if done.iter().all(|&d| d) {
            return failed;
        }
        if !failed.is_empty() {
            let end = *grace_end.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
            if Instant::now() >= end {
                stop(children);
                return failed;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills and reaps every child still running.
fn stop(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

/// Copies a child's output to ours line by line, each line prefixed with its rank.
fn pump(stream: impl Read + Send + 'static, rank: usize, is_err: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).split(b'\n') {
            let Ok(line) = line else { break };
            let text = format!("[rank {rank}] {}\n", String::from_utf8_lossy(&line).trim_end_matches('\r'));
            let _ = if is_err { std::io::stderr().lock().write_all(text.as_bytes()) } else { std::io::stdout().lock().write_all(text.as_bytes()) };
        }
    })
}
