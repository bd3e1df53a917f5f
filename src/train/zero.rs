//! ZeRO stage 1 (DeepSpeed's ZeRO-1, llm.c's `zero_stage 1`): under `ipo train --zero 1` each
//! rank of a data-parallel group keeps the AdamW moments of one contiguous 1/world slice of the
//! trainable parameters only, and updates only that slice. The weights and gradients stay
//! replicated; after the update every rank's slice is all-gathered, so all ranks hold the same
//! full weights again.
//!
//! `Shard` says which elements of each trainable tensor (optimizer order) a rank owns. The
//! tensors are flattened into one list of N elements; rank r owns `[N r / W, N (r + 1) / W)`,
//! split inside a tensor where the boundary falls (ranks differ by at most one element). A
//! tensor outside a rank's slice gets an empty range (and zero-length moments). Without
//! sharding (`Shard::whole`: world 1, `--zero 0`, or SGD, which has no state) every range is the
//! whole tensor, so the trainer runs one code path either way.
//!
//! Because the slices are contiguous and in rank order, concatenating every rank's owned
//! elements gives the whole flattened list: that is `all_gather` (the updated parameters after
//! each step, the moments when rank 0 writes a checkpoint, which is therefore the same file
//! as without ZeRO and resumes at any world size with or without it).

use std::ops::Range;

use crate::dist::{Comm, CommError};

/// Which elements of each trainable tensor this rank updates and keeps moments for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Shard {
    /// Element count of each trainable tensor, optimizer order.
    sizes: Vec<usize>,
    /// This rank's elements of each tensor (empty where it owns none).
    pub(crate) ranges: Vec<Range<usize>>,
    /// Ranks the elements are split over (1: every rank owns everything).
    world: usize,
}

impl Shard {
    /// Every tensor whole: replicated optimizer state.
    pub(crate) fn whole(sizes: &[usize]) -> Self {
        Shard {
            sizes: sizes.to_vec(),
            ranges: sizes.iter().map(|&n| 0..n).collect(),
            world: 1,
        }
    }

    /// Rank `rank`'s slice of `world` near-equal contiguous slices of the flattened tensors.
    pub(crate) fn zero1(sizes: &[usize], rank: usize, world: usize) -> Self {
        assert!(rank < world, "rank {rank} of world {world}");
        let total: usize = sizes.iter().sum();
        let (lo, hi) = slice_of(total, rank, world);
        let mut at = 0;
        let ranges = sizes
            .iter()
            .map(|&n| {
                let (a, b) = (lo.clamp(at, at + n) - at, hi.clamp(at, at + n) - at);
                at += n;
                a..b
            })
            .collect();
        Shard {
            sizes: sizes.to_vec(),
            ranges,
            world,
        }
    }

    /// Whether the ranks own different elements (the updated slices must be all-gathered).
    pub(crate) fn is_split(&self) -> bool {
        self.world > 1
    }

    /// Elements this rank owns (the length of each of its moments).
    pub(crate) fn len(&self) -> usize {
        self.ranges.iter().map(|r| r.len()).sum()
    }

    /// Whether this rank owns all of tensor `i` (its values need no gathering).
    pub(crate) fn owns_whole(&self, i: usize) -> bool {
        self.ranges[i] == (0..self.sizes[i])
    }

    /// Every rank's piece of tensor `i`: `(range, owner)`, non-empty, ascending, covering it.
    pub(crate) fn owners(&self, i: usize) -> Vec<(Range<usize>, usize)> {
        let total: usize = self.sizes.iter().sum();
        let at: usize = self.sizes[..i].iter().sum();
        let n = self.sizes[i];
        (0..self.world)
            .filter_map(|r| {
                let (lo, hi) = slice_of(total, r, self.world);
                let (a, b) = (lo.clamp(at, at + n) - at, hi.clamp(at, at + n) - at);
                (a < b).then_some((a..b, r))
            })
            .collect()
    }

    /// This rank's pieces of whole tensors `whole` (optimizer order).
    pub(crate) fn pieces(&self, whole: &[Vec<f32>]) -> Vec<Vec<f32>> {
        assert_eq!(whole.len(), self.sizes.len(), "one value vector per trainable tensor");
        whole.iter().zip(&self.ranges).map(|(x, r)| x[r.clone()].to_vec()).collect()
    }

    /// Every rank's owned elements (`mine`: this rank's, flattened in optimizer order),
    /// gathered into whole tensors on every rank.
    pub(crate) fn all_gather(&self, comm: &dyn Comm, mine: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        assert_eq!(mine.len(), self.len(), "all_gather: this rank's slice");
        let total: usize = self.sizes.iter().sum();
        let mut flat = Vec::with_capacity(total); // [all trainable elements] f32
        if self.world == 1 {
            flat.extend_from_slice(mine);
        } else {
            let bytes: Vec<u8> = mine.iter().flat_map(|x| x.to_le_bytes()).collect();
            for (r, part) in comm.all_gather(bytes)?.into_iter().enumerate() {
                let (lo, hi) = slice_of(total, r, self.world);
                if part.len() != 4 * (hi - lo) {
                    return Err(CommError::Peer {
                        rank: r,
                        reason: format!("sent {} bytes of its optimizer shard, expected {}", part.len(), 4 * (hi - lo)),
                    });
                }
                flat.extend(part.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())));
            }
        }
        let mut at = 0;
        Ok(self
            .sizes
            .iter()
            .map(|&n| {
                at += n;
                flat[at - n..at].to_vec()
            })
            .collect())
    }
}

/// Elements `[lo, hi)` of rank `r` out of `world` near-equal slices of `total`.
fn slice_of(total: usize, r: usize, world: usize) -> (usize, usize) {
    let at = |k: usize| (total as u128 * k as u128 / world as u128) as usize;
    (at(r), at(r + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_everything_once_and_split_inside_tensors() {
        let sizes = [7, 1, 0, 12, 5];
        for world in 1..=6 {
            let shards: Vec<Shard> = (0..world).map(|r| Shard::zero1(&sizes, r, world)).collect();
            let lens: Vec<usize> = shards.iter().map(Shard::len).collect();
            assert_eq!(lens.iter().sum::<usize>(), 25);
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "{world}: {lens:?}");
            // Element j of tensor i is owned by exactly one rank, and ranks own ascending runs.
            let mut owner = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                for j in 0..n {
                    let o: Vec<usize> = (0..world).filter(|&r| shards[r].ranges[i].contains(&j)).collect();
                    assert_eq!(o.len(), 1, "{world}: tensor {i} element {j}");
                    owner.push(o[0]);
                }
            }
            assert!(owner.windows(2).all(|w| w[0] <= w[1]));
        }
        assert_eq!(
            Shard::zero1(&sizes, 0, 1),
            Shard {
                world: 1,
                ..Shard::whole(&sizes)
            }
        );
        let s = Shard::zero1(&sizes, 1, 3); // elements [8, 16): tensor 3's first 8
        assert_eq!(s.ranges, vec![7..7, 1..1, 0..0, 0..8, 0..0]);
        assert!(!s.owns_whole(3) && s.owns_whole(2));
        assert_eq!(s.owners(3), vec![(0..8, 1), (8..12, 2)]);
        assert_eq!(s.owners(0), vec![(0..7, 0)]);
        assert!(s.owners(2).is_empty());
        for world in 1..=6 {
            for (i, &n) in sizes.iter().enumerate() {
                let o = Shard::zero1(&sizes, 0, world).owners(i);
                assert_eq!(o.iter().map(|p| p.0.len()).sum::<usize>(), n, "{world}: tensor {i}");
                for (p, r) in o {
                    assert_eq!(Shard::zero1(&sizes, r, world).ranges[i], p, "{world}: tensor {i} rank {r}");
                }
            }
        }

        assert_eq!(
            s.pieces(&sizes.iter().map(|&n| (0..n).map(|x| x as f32).collect()).collect::<Vec<_>>())[3],
            (0..8).map(|x| x as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn all_gather_rebuilds_the_tensors_on_every_rank() {
        let sizes = vec![5, 3, 9];
        let whole: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (10 * i + j) as f32 * 0.37).collect())
            .collect();
        let hs: Vec<_> = crate::dist::Group::threads(3, std::time::Duration::from_secs(30))
            .into_iter()
            .map(|g| {
                let (sizes, whole) = (sizes.clone(), whole.clone());
                std::thread::spawn(move || {
                    let s = Shard::zero1(&sizes, g.rank(), 3);
                    let mine: Vec<f32> = s.pieces(&whole).concat();
                    s.all_gather(&g, &mine).unwrap()
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), whole);
        }
    }
}
