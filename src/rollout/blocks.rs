//! Block accounting of the paged KV cache (host side, no tensors): a pool of fixed-size
//! blocks with reference counts, and per sequence the list of blocks that hold its positions.
//! Sequences share prefix blocks after `fork`; a shared block that is only partly filled is
//! copied the first time a sequence appends into it (copy-on-write of the tail only), full
//! shared blocks are never written again. Every operation is all-or-nothing: when the pool
//! cannot supply the blocks, nothing changes and `OutOfBlocks` is returned.

use std::fmt;

/// A sequence in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("kv cache full: {needed} more blocks needed, {free} free of {total}")]
    OutOfBlocks { needed: usize, free: usize, total: usize },
    #[error("unknown sequence {0:?}")]
    UnknownSeq(SeqId),
    #[error("cannot keep {keep} positions of a sequence of {len}")]
    BadLength { keep: usize, len: usize },
}

#[derive(Clone, Debug, Default)]
struct SeqBlocks {
    blocks: Vec<u32>, // [ceil(len / block_size)] block ids
    len: usize,       // positions held
}

/// What a caller must do on the device after `extend`: copy blocks (copy-on-write), then
/// write the new positions' K/V to `slots`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extension {
    pub copies: Vec<(u32, u32)>, // (src block, dst block)
    pub slots: Vec<u32>,         // [new positions] block * block_size + offset
}

pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,  // [num_blocks] sequences holding each block
    free: Vec<u32>,  // free block ids (a stack)
    seqs: Vec<Option<SeqBlocks>>,
    free_ids: Vec<u32>,
}

impl fmt::Debug for BlockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockManager({} of {} blocks free, block_size {})", self.free.len(), self.refs.len(), self.block_size)
    }
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be > 0");
        Self {
            block_size,
            refs: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            seqs: Vec::new(),
            free_ids: Vec::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    /// Blocks needed to hold `positions` positions from nothing.
    pub(crate) fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    fn get(&self, s: SeqId) -> Result<&SeqBlocks, BlockError> {
        self.seqs.get(s.0 as usize).and_then(Option::as_ref).ok_or(BlockError::UnknownSeq(s))
    }

    /// A new empty sequence.
    pub fn create(&mut self) -> SeqId {
        let id = match self.free_ids.pop() {
            Some(i) => {
                self.seqs[i as usize] = Some(SeqBlocks::default());
                i
            }
            None => {
                self.seqs.push(Some(SeqBlocks::default()));
                (self.seqs.len() - 1) as u32
            }
        };
        SeqId(id)
    }

    pub fn len(&self, s: SeqId) -> Result<usize, BlockError> {
        Ok(self.get(s)?.len)
    }

    /// Block ids of the sequence, `[ceil(len / block_size)]`.
    pub fn blocks(&self, s: SeqId) -> Result<&[u32], BlockError> {
        Ok(&self.get(s)?.blocks)
    }

    /// A new sequence sharing the first `keep` positions of `s` (no copy, no new block).
    pub fn fork(&mut self, s: SeqId, keep: usize) -> Result<SeqId, BlockError> {
        let src = self.get(s)?;
        if keep > src.len {
            return Err(BlockError::BadLength { keep, len: src.len });
        }
        let blocks: Vec<u32> = src.blocks[..keep.div_ceil(self.block_size)].to_vec();
        for &b in &blocks {
            self.refs[b as usize] += 1;
        }
        let id = self.create();
        self.seqs[id.0 as usize] = Some(SeqBlocks { blocks, len: keep });
        Ok(id)
    }

    /// New blocks that `extend(s, n)` would take (including a copy-on-write of the tail).
    pub fn blocks_needed(&self, s: SeqId, n: usize) -> Result<usize, BlockError> {
        let q = self.get(s)?;
        let cow = usize::from(q.len % self.block_size != 0 && n > 0 && self.refs[*q.blocks.last().expect("partial tail") as usize] > 1);
        Ok(self.blocks_for(q.len + n) - q.blocks.len() + cow)
    }

    /// Makes room for `n` more positions: copies a shared partial tail block, allocates new
    /// blocks, and returns the copies to do and the slots of the new positions.
    pub fn extend(&mut self, s: SeqId, n: usize) -> Result<Extension, BlockError> {
        let needed = self.blocks_needed(s, n)?;
        if needed > self.free.len() {
            return Err(BlockError::OutOfBlocks { needed, free: self.free.len(), total: self.refs.len() });
        }
        let bs = self.block_size;
        let mut ext = Extension::default();
        let mut q = self.seqs[s.0 as usize].take().expect("checked by blocks_needed");
        if !q.len.is_multiple_of(bs) && n > 0 {
            let tail = *q.blocks.last().expect("partial tail");
            if self.refs[tail as usize] > 1 {
                let fresh = self.alloc();
                self.refs[tail as usize] -= 1;
                *q.blocks.last_mut().expect("partial tail") = fresh;
                ext.copies.push((tail, fresh));
            }
        }
        for p in q.len..q.len + n {
            if p / bs == q.blocks.len() {
                let b = self.alloc();
                q.blocks.push(b);
            }
            ext.slots.push((q.blocks[p / bs] as usize * bs + p % bs) as u32);
        }
        q.len += n;
        self.seqs[s.0 as usize] = Some(q);
        Ok(ext)
    }

    fn alloc(&mut self) -> u32 {
        let b = self.free.pop().expect("counted before");
        debug_assert_eq!(self.refs[b as usize], 0);
        self.refs[b as usize] = 1;
        b
    }

    fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        *r -= 1;
        if *r == 0 {
            self.free.push(b);
        }
    }

    /// Drops every position from `len` on; blocks no longer needed are released.
    pub fn truncate(&mut self, s: SeqId, len: usize) -> Result<(), BlockError> {
        let cur = self.get(s)?.len;
        if len > cur {
            return Err(BlockError::BadLength { keep: len, len: cur });
        }
        let keep_blocks = self.blocks_for(len);
        let q = self.seqs[s.0 as usize].as_mut().expect("checked");
        let dropped: Vec<u32> = q.blocks.drain(keep_blocks..).collect();
        q.len = len;
        for b in dropped {
            self.release(b);
        }
        Ok(())
    }

    /// Removes the sequence and releases its blocks.
    pub fn free(&mut self, s: SeqId) -> Result<(), BlockError> {
        let q = self.seqs.get_mut(s.0 as usize).and_then(Option::take).ok_or(BlockError::UnknownSeq(s))?;
        for b in q.blocks {
            self.release(b);
        }
        self.free_ids.push(s.0);
        Ok(())
    }

    /// Live sequences.
    pub fn num_seqs(&self) -> usize {
        self.seqs.iter().flatten().count()
    }

    /// Checks the bookkeeping: each block's count equals the sequences holding it, free
    /// blocks are exactly those with count 0 (each once), every sequence has the blocks its
    /// length needs. For tests.
    pub fn check(&self) -> Result<(), String> {
        let mut counted = vec![0u32; self.refs.len()];
        for q in self.seqs.iter().flatten() {
            if q.blocks.len() != self.blocks_for(q.len) {
                return Err(format!("sequence of {} positions holds {} blocks", q.len, q.blocks.len()));
            }
            for &b in &q.blocks {
                counted[b as usize] += 1;
            }
        }
        if counted != self.refs {
            return Err("reference counts disagree with the sequences".into());
        }
        let mut is_free = vec![false; self.refs.len()];
        for &b in &self.free {
            if std::mem::replace(&mut is_free[b as usize], true) {
                return Err(format!("block {b} is free twice"));
            }
        }
        for (b, (&r, &f)) in self.refs.iter().zip(&is_free).enumerate() {
            if (r == 0) != f {
                return Err(format!("block {b}: count {r}, free {f}"));
            }
        }
        Ok(())
    }
}
