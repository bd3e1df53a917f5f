//! The cross-process test/debug transport: TCP, a star around rank 0.
//!
//! Rendezvous: rank 0 listens on 0.0.0.0:MASTER_PORT; every other rank connects to
//! MASTER_ADDR:MASTER_PORT (retrying while rank 0 is not up yet) and sends a hello
//! `["IPO-DIST1", rank u32, world u32]`; once all `world - 1` ranks are in, rank 0 answers each
//! with an empty message and the group is complete. Every step has the deadline
//! `IPO_DIST_TIMEOUT`; failing it names the address or the missing ranks.
//! Frames: `[kind u8 (0 data, 1 abort) | len u64 LE | payload]`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{CommError, DistEnv, Group, Link, LinkError, Msg};

const HELLO: &[u8; 9] = b"IPO-DIST1";

struct TcpLink {
    s: TcpStream,
}

fn link_error(e: std::io::Error, timeout: Duration) -> LinkError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => LinkError::TimedOut(timeout),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => LinkError::Closed,
        _ => LinkError::Io(e.to_string()),
    }
}

impl Link for TcpLink {
    fn send(&mut self, msg: &Msg) -> Result<(), LinkError> {
        let (kind, payload) = match msg {
            Msg::Data(d) => (0u8, d.as_slice()),
            Msg::Abort(s) => (1u8, s.as_bytes()),
        };
        let mut head = [0u8; 9];
        head[0] = kind;
        head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let t = self.s.write_timeout().ok().flatten().unwrap_or_default();
        self.s.write_all(&head).and_then(|_| self.s.write_all(payload)).map_err(|e| link_error(e, t))
    }

    fn recv(&mut self, timeout: Duration) -> Result<Msg, LinkError> {
        self.s.set_read_timeout(Some(timeout)).map_err(|e| LinkError::Io(e.to_string()))?;
        let mut head = [0u8; 9];
        self.s.read_exact(&mut head).map_err(|e| link_error(e, timeout))?;
        let mut payload = vec![0u8; u64::from_le_bytes(head[1..].try_into().unwrap()) as usize];
        self.s.read_exact(&mut payload).map_err(|e| link_error(e, timeout))?;
        match head[0] {
            0 => Ok(Msg::Data(payload)),
            1 => Ok(Msg::Abort(String::from_utf8_lossy(&payload).into_owned())),
            k => Err(LinkError::Io(format!("unknown frame kind {k}"))),
        }
    }
}

fn setup(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(timeout))
}

pub(super) fn connect(env: &DistEnv) -> Result<Group, CommError> {
    let deadline = Instant::now() + env.timeout;
    let addr = env.master();
    let rv = |reason: String| CommError::Rendezvous { addr: format!("{addr} (MASTER_ADDR:MASTER_PORT)"), reason };
    if env.rank == 0 {
        let listener = TcpListener::bind(("0.0.0.0", env.master_port)).map_err(|e| rv(format!("rank 0 cannot listen on port {}: {e}", env.master_port)))?;
        listener.set_nonblocking(true).map_err(|e| rv(e.to_string()))?;
        let mut peers: Vec<Option<TcpStream>> = (0..env.world).map(|_| None).collect();
        let mut joined = 1;
        while joined < env.world {
            match listener.accept() {
                Ok((mut s, from)) => {
                    setup(&s, env.timeout).map_err(|e| rv(e.to_string()))?;
                    s.set_read_timeout(Some(env.timeout.min(Duration::from_secs(10)))).map_err(|e| rv(e.to_string()))?;
                    let mut hello = [0u8; 17];
                    // A stray connection (a port scan, a health check) is not a rank: ignored.
                    if s.read_exact(&mut hello).is_err() || &hello[..9] != HELLO {
                        continue;
                    }
                    let r = u32::from_le_bytes(hello[9..13].try_into().unwrap()) as usize;
                    let w = u32::from_le_bytes(hello[13..17].try_into().unwrap()) as usize;
                    if w != env.world || r == 0 || r >= env.world {
                        return Err(rv(format!("{from} says it is rank {r} of {w}, but this job has WORLD_SIZE={}", env.world)));
                    }
                    if peers[r].is_some() {
                        return Err(rv(format!("two processes claim RANK={r} (the second from {from})")));
                    }
                    peers[r] = Some(s);
                    joined += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (1..env.world).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                        return Err(rv(format!(
                            "ranks {} of {} did not join within {:.1} s (IPO_DIST_TIMEOUT)",
                            missing.join(", "),
                            env.world,
                            env.timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(rv(e.to_string())),
            }
        }
        let mut links: Vec<Box<dyn Link>> = Vec::new();
        for (r, s) in peers.into_iter().enumerate().skip(1) {
            let mut l = TcpLink { s: s.expect("every rank joined") };
            l.send(&Msg::Data(Vec::new())).map_err(|_| rv(format!("rank {r} left during the rendezvous")))?;
            links.push(Box::new(l));
        }
        return Ok(Group::new(0, env.world, links, env.timeout));
    }

    let addrs: Vec<SocketAddr> = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .map_err(|e| rv(format!("cannot resolve MASTER_ADDR={}: {e}", env.master_addr)))?
        .collect();
    let mut last = String::from("no address");
    let mut stream = None;
    while stream.is_none() {
        for a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
            match TcpStream::connect_timeout(a, left) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        if stream.is_none() {
            if Instant::now() >= deadline {
                return Err(rv(format!("rank {} could not reach rank 0 within {:.1} s: {last}", env.rank, env.timeout.as_secs_f64())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let s = stream.unwrap();
    setup(&s, env.timeout).map_err(|e| rv(e.to_string()))?;
    let mut hello = HELLO.to_vec();
    hello.extend_from_slice(&(env.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(env.world as u32).to_le_bytes());
    let mut link = TcpLink { s };
    link.s.write_all(&hello).map_err(|e| rv(format!("rank {} lost the connection to rank 0: {e}", env.rank)))?;
    // Rank 0 answers once everybody is in; it gives up at its own deadline, so wait a little more.
    let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    match link.recv(left) {
        Ok(Msg::Data(_)) => Ok(Group::new(env.rank, env.world, vec![Box::new(link)], env.timeout)),
        Ok(Msg::Abort(m)) => Err(rv(m)),
        Err(_) => Err(rv(format!("rank 0 did not complete the rendezvous within {:.1} s (a rank is missing, or rank 0 failed)", left.as_secs_f64()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Comm;

    pub(crate) fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn env(rank: usize, world: usize, port: u16, timeout: Duration) -> DistEnv {
        DistEnv { rank, world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port, timeout }
    }

    #[test]
    fn tcp_group_reduces_like_threads_and_names_dead_ranks() {
        let port = free_port();
        let hs: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let g = connect(&env(r, 3, port, Duration::from_secs(20))).unwrap();
                    let mut x: Vec<f32> = (0..50_000).map(|i| ((i * (r + 3)) % 97) as f32 * 0.37 - 11.0).collect();
                    g.all_reduce_sum(&mut x).unwrap();
                    let names = g.all_gather(format!("r{r}").into_bytes()).unwrap();
                    // Rank 2 then leaves; the next collective fails on the others, naming it.
                    if r == 2 {
                        return (x, names, String::new());
                    }
                    let e = g.barrier().unwrap_err().to_string();
                    (x, names, e)
                })
            })
            .collect();
        let out: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let want: Vec<f32> = (0..50_000).map(|i| (0..3).map(|r| ((i * (r + 3)) % 97) as f32 * 0.37 - 11.0).fold(0.0, |a, b| a + b)).collect();
        for (x, names, _) in &out {
            assert!(x.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(names, &[b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
        }
        assert!(out[0].2.contains("rank 2 closed its connection"), "{}", out[0].2);
        assert!(out[1].2.contains("rank 0 aborted the job: rank 2 closed"), "{}", out[1].2);
    }

    #[test]
    fn rendezvous_errors_name_the_address_and_the_missing_ranks() {
        // Nobody listens: rank 1 gives up after the timeout, naming MASTER_ADDR:MASTER_PORT.
        let port = free_port();
        let t0 = Instant::now();
        let e = connect(&env(1, 2, port, Duration::from_millis(400))).err().unwrap().to_string();
        assert!(e.contains(&format!("rendezvous at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) failed: rank 1 could not reach rank 0")), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        // Rank 0 alone in a world of 3: it names the ranks that never came.
        let e = connect(&env(0, 3, free_port(), Duration::from_millis(300))).err().unwrap().to_string();
        assert!(e.contains("ranks 1, 2 of 3 did not join within 0.3 s"), "{e}");
    }
}
