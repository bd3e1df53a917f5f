//! Rollout stages over several processes (`ipo launch`, torchrun, srun): each rank takes every
//! `world`-th prompt, appends what it finishes to a part file of its own beside the output
//! (`<output>.rank<R>.part`, flushed line by line like the output itself), and when every rank is
//! done rank 0 folds the parts into the output in rank order and deletes them. Every record is
//! keyed by its prompt and sample, and sampling is counter-based (seed, prompt, sample, step),
//! so the records do not depend on which rank drew them: a run on W processes writes the lines
//! of a run on one, in another order.
//!
//! The output's folder must be one that every rank sees (one machine, or a shared filesystem
//! across nodes, as torchrun jobs assume for their checkpoints); rank 0 says so when a part is
//! missing.
//!
//! Interruption: a killed rank stops the job (the others fail naming it, `crate::dist`); the
//! parts stay. `--resume` first folds the parts of the earlier run, whatever its world size,
//! into the output (lines already there are not written twice, so a fold that was itself
//! killed is finished, not repeated), then resumes from the output as a single process would.
//!
//! `ipo intervene` writes its parts whole at the end (its output is atomic, a rerun starts
//! over) and rank 0 merges them in input order (`merge_by_key`), so the file is byte for byte
//! the single process's; `ipo eval` sends its completions and log-probs through the group
//! (`gather_after_work`) and writes nothing but on rank 0; so does `ipo csr` with its judged
//! points.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::dist::{self, Comm, DistEnv};
use crate::io::jsonl::{self, Appender};
use crate::workflow::device::{Device, DeviceOptions};

/// This process's share of a rollout stage.
pub(crate) struct Shards {
    comm: Arc<dyn Comm>,
    local_rank: usize,
}

impl Shards {
    /// The group of the environment (world 1 without a launcher); `device` becomes this rank's
    /// GPU (`cuda:N` is GPU N + LOCAL_RANK).
    pub(crate) fn from_env(device: &mut DeviceOptions) -> Result<Shards> {
        let s = Self::connect()?;
        s.place(device);
        Ok(s)
    }

    /// The group of the environment (world 1 without a launcher).
    pub(crate) fn connect() -> Result<Shards> {
        let env = DistEnv::from_env()?;
        Ok(Shards { comm: dist::connect(&env)?, local_rank: env.local_rank })
    }

    /// A group over `comm` (tests; `local_rank` 0).
    #[cfg(test)]
    pub(crate) fn of(comm: Arc<dyn Comm>) -> Shards {
        Shards { comm, local_rank: 0 }
    }

    /// One process alone (a workflow called from inside another, e.g. the trainer's scoring).
    pub(crate) fn single() -> Shards {
        Shards { comm: dist::single(), local_rank: 0 }
    }

    /// `device` on this rank: in a group of more than one, `cuda:N` is GPU N + LOCAL_RANK.
    pub(crate) fn place(&self, device: &mut DeviceOptions) {
        if let Device::Cuda(n) = device.device {
            if self.world() > 1 {
                device.device = Device::Cuda(n + self.local_rank);
            }
        }
    }

    pub(crate) fn comm(&self) -> Arc<dyn Comm> {
        self.comm.clone()
    }

    /// Rank 0's `value` on every rank.
    pub(crate) fn broadcast_u8(&self, value: u8) -> Result<u8> {
        let mut b = vec![value];
        self.comm.broadcast(&mut b)?;
        b.first().copied().context("an empty broadcast from rank 0")
    }

    /// Runs `f` on rank 0 alone while the other ranks wait for it (however long it takes; if
    /// rank 0 fails it exits and they fail naming it). `Some(result)` on rank 0, `None` on the
    /// others.
    pub(crate) fn root_only<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
        if self.world() == 1 {
            return f().map(Some);
        }
        let r = if self.root() { Some(f()?) } else { None };
        self.comm.all_gather_after_work(Vec::new())?;
        Ok(r)
    }

    pub(crate) fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub(crate) fn world(&self) -> usize {
        self.comm.world()
    }

    pub(crate) fn root(&self) -> bool {
        self.rank() == 0
    }

    /// Whether the `i`-th prompt (in input order) is this rank's.
    pub(crate) fn owns(&self, i: usize) -> bool {
        i % self.world() == self.rank()
    }

    /// The file this rank appends to: `output` itself in a single process, else its part.
    pub(crate) fn target(&self, output: &Path) -> PathBuf {
        if self.world() == 1 {
            output.to_path_buf()
        } else {
            part_path(output, self.rank())
        }
    }

    /// Runs `f` on rank 0 first (e.g. folding earlier parts and cleaning the output for
    /// `--resume`), then on the other ranks, so that they read what rank 0 left.
    pub(crate) fn root_first<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.root() {
            let r = f();
            if r.is_ok() {
                self.comm.barrier()?;
            }
            return r;
        }
        self.comm.barrier()?;
        f()
    }

    /// Every rank's `mine`, in rank order, on every rank, once the slowest rank has sent its
    /// own (however long it takes; a rank that exits fails it at once, naming it).
    pub(crate) fn gather_after_work(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        if self.world() == 1 {
            return Ok(vec![mine]);
        }
        Ok(self.comm.all_gather_after_work(mine)?)
    }

    /// Every rank's part of `output` (rank 0, after the ranks finished), each checked to exist.
    pub(crate) fn parts(&self, output: &Path) -> Result<Vec<PathBuf>> {
        let parts: Vec<PathBuf> = (0..self.world()).map(|r| part_path(output, r)).collect();
        for (r, p) in parts.iter().enumerate() {
            if !p.exists() {
                bail!(
                    "{}: rank {r}'s part is missing after it finished: every rank must write to a folder that rank 0 sees (one machine, or a filesystem shared by the nodes)",
                    p.display()
                );
            }
        }
        Ok(parts)
    }

    /// Waits for every rank to finish its share (however long the slowest takes; a rank that
    /// exits fails it at once, naming it), then rank 0 folds the parts into `output`. Returns
    /// every rank's `mine`, in rank order, on every rank; every rank returns once the output is
    /// whole.
    pub(crate) fn finish(&self, output: &Path, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        if self.world() == 1 {
            return Ok(vec![mine]);
        }
        let all = self.comm.all_gather_after_work(mine)?;
        if self.root() {
            fold(output, &self.parts(output)?)?;
        }
        self.comm.barrier()?;
        Ok(all)
    }
}

/// Writes `output` (atomically) from the lines of `parts`, line `i` of part `r` having key
/// `keys[r][i]`: in key order, a key's lines in their part's order and parts in rank order;
/// then deletes the parts. With each rank's lines sorted by an input index that one rank owns,
/// the file is the single process's, byte for byte.
pub(crate) fn merge_by_key(output: &Path, parts: &[PathBuf], keys: &[Vec<u64>]) -> Result<()> {
    let texts: Vec<String> = parts.iter().map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))).collect::<Result<_>>()?;
    let mut lines: Vec<(u64, &str)> = Vec::new();
    for ((t, k), p) in texts.iter().zip(keys).zip(parts) {
        let ls: Vec<&str> = t.split_terminator('\n').collect();
        if ls.len() != k.len() {
            bail!("{}: {} lines, but its rank wrote {}", p.display(), ls.len(), k.len());
        }
        lines.extend(k.iter().copied().zip(ls));
    }
    lines.sort_by_key(|l| l.0); // stable: parts in rank order, each in its own order
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = output.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut text = String::with_capacity(texts.iter().map(String::len).sum());
    for (_, l) in &lines {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, output).with_context(|| format!("writing {}", output.display()))?;
    for p in parts {
        std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Rows of f32 as bytes (per row its length, u32 LE, then the values, LE): log-probs sent
/// between ranks bit for bit.
pub(crate) fn encode_rows(rows: &[Vec<f32>]) -> Vec<u8> {
    let mut b = Vec::new();
    for r in rows {
        b.extend_from_slice(&(r.len() as u32).to_le_bytes());
        r.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
    }
    b
}

/// The rows of `encode_rows`.
pub(crate) fn decode_rows(mut b: &[u8]) -> Result<Vec<Vec<f32>>> {
    let mut rows = Vec::new();
    while !b.is_empty() {
        let (len, rest) = b.split_at_checked(4).context("a rank's rows end early")?;
        let n = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let (vals, rest) = rest.split_at_checked(4 * n).context("a rank's rows end early")?;
        rows.push(vals.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect());
        b = rest;
    }
    Ok(rows)
}

/// `<output>.rank<R>.part`, beside the output.
pub(crate) fn part_path(output: &Path, rank: usize) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".rank{rank}.part"));
    output.with_file_name(name)
}

/// The parts an earlier run left beside `output` (any world size), in rank order.
pub(crate) fn leftover_parts(output: &Path) -> Result<Vec<PathBuf>> {
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(stem) = output.file_name().and_then(|n| n.to_str()) else { return Ok(Vec::new()) };
    let prefix = format!("{stem}.rank");
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name();
        let Some(rank) = name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|r| r.strip_suffix(".part")).and_then(|r| r.parse::<usize>().ok()) else {
            continue;
        };
        found.push((rank, e.path()));
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Appends to `output` every line of `parts` (in order) that it does not already hold, then
/// deletes the parts. A torn last line (a process killed mid-write) of the output or of a part
/// is dropped: the stage redoes that sample.
pub(crate) fn fold(output: &Path, parts: &[PathBuf]) -> Result<()> {
    if parts.is_empty() {
        return Ok(());
    }
    let key = |o: &serde_json::Map<String, serde_json::Value>| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(o).unwrap_or_default().hash(&mut h);
        h.finish()
    };
    let mut have = HashSet::new();
    if output.exists() {
        let a = jsonl::read_appended(output)?;
        if a.unterminated {
            jsonl::write_atomic(output, a.lines.iter().map(|l| &l.obj))?;
        }
        have.extend(a.lines.iter().map(|l| key(&l.obj)));
    }
    let mut out = Appender::open(output)?;
    for p in parts {
        for l in jsonl::read_appended(p)?.lines {
            if have.insert(key(&l.obj)) {
                out.append(&l.obj)?;
            }
        }
    }
    for p in parts {
        std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_sit_beside_the_output_and_fold_without_duplicates_or_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.jsonl");
        assert_eq!(part_path(&out, 3), dir.path().join("r.jsonl.rank3.part"));
        std::fs::write(&out, "{\"id\":\"a\",\"sample\":0}\n{\"id\":\"b\",\"sam").unwrap();
        std::fs::write(part_path(&out, 1), "{\"id\":\"c\",\"sample\":0}\n{\"id\":\"a\",\"sample\":0}\n{\"id\":\"d\"").unwrap();
        std::fs::write(part_path(&out, 0), "{\"id\":\"b\",\"sample\":0}\n").unwrap();
        std::fs::write(dir.path().join("r.jsonl.rankx.part"), "not ours").unwrap();
        std::fs::write(dir.path().join("q.jsonl.rank0.part"), "not ours").unwrap();
        let parts = leftover_parts(&out).unwrap();
        assert_eq!(parts, vec![part_path(&out, 0), part_path(&out, 1)]);
        fold(&out, &parts).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, "{\"id\":\"a\",\"sample\":0}\n{\"id\":\"b\",\"sample\":0}\n{\"id\":\"c\",\"sample\":0}\n");
        assert!(leftover_parts(&out).unwrap().is_empty());
        assert!(dir.path().join("q.jsonl.rank0.part").exists());
    }

    #[test]
    fn parts_merge_in_key_order_and_rows_travel_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.jsonl");
        let parts = [part_path(&out, 0), part_path(&out, 1)];
        std::fs::write(&parts[0], "a1\na2\nc\n").unwrap();
        std::fs::write(&parts[1], "b\nd1\nd2\n").unwrap();
        merge_by_key(&out, &parts, &[vec![1, 1, 3], vec![2, 4, 4]]).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "a1\na2\nb\nc\nd1\nd2\n");
        assert!(!parts[0].exists() && !parts[1].exists());
        std::fs::write(&parts[0], "x\n").unwrap();
        let e = merge_by_key(&out, &parts[..1], &[vec![1, 2]]).unwrap_err().to_string();
        assert!(e.contains("1 lines, but its rank wrote 2"), "{e}");

        let rows = vec![vec![-0.1f32, f32::MIN_POSITIVE, 3.0e-39], vec![], vec![-1.0e30]];
        let back = decode_rows(&encode_rows(&rows)).unwrap();
        assert_eq!(back.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>(), rows.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(back.iter().map(Vec::len).collect::<Vec<_>>(), [3, 0, 1]);
        assert!(decode_rows(&encode_rows(&rows)[..9]).is_err());
    }

    #[test]
    fn shares_cover_every_prompt_once_and_root_goes_first() {
        let groups = crate::dist::Group::threads(3, std::time::Duration::from_secs(20));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hs: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let order = order.clone();
                std::thread::spawn(move || {
                    let s = Shards::of(Arc::new(g));
                    if !s.root() {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    s.root_first(|| {
                        if s.root() {
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                        order.lock().unwrap().push(s.rank());
                        Ok(())
                    })
                    .unwrap();
                    (0..10).filter(|&i| s.owns(i)).collect::<Vec<_>>()
                })
            })
            .collect();
        let shares: Vec<Vec<usize>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(order.lock().unwrap()[0], 0, "rank 0 runs first");
        let mut all: Vec<usize> = shares.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(shares[1], vec![1, 4, 7]);
    }
}
