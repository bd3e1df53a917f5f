//! `CpuBuf`: the CPU backend's buffer, a `Vec` that a weight (`Backend::upload_weight`) pairs
//! with the derived copies its products read: packed GEMM panels (f32 or bf16, for the weight
//! used as `W^T` in a forward and as `W` in a backward), bf16 rows and 8-bit or 4-bit blocks for the
//! small-batch decode products. Each copy is made on first use and dropped by any mutable
//! access to the data (`DerefMut`: optimizer steps, `add_assign`, a reload), so a copy always
//! describes the current weights: packing happens once per weight version, not per call.

use super::lm_head::Kept;
use super::matmul::{self, Kind, Packed};
use super::q4::Q4Rows;
use super::q8::Q8Rows;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A host buffer of the CPU backend (see the module docs). Reads and writes go through
/// `Deref<Target = Vec<F>>`.
#[derive(Debug, Default)]
pub struct CpuBuf<F> {
    data: Vec<F>,
    cache: Option<Box<WeightCache>>,
    /// On the lse buffer an lm-head forward returned: the logits it computed, for its backward
    /// (`lm_head::Kept`). Taken by that backward; dropped by a write or a clone.
    kept: Mutex<Option<Box<Kept<F>>>>,
}

impl<F> CpuBuf<F> {
    /// A plain buffer (no derived copies).
    pub fn new(data: Vec<F>) -> Self {
        Self { data, cache: None, kept: Mutex::new(None) }
    }
    /// A weight buffer: products that read it keep their packed copies beside it.
    pub(crate) fn weight(data: Vec<F>) -> Self {
        Self { data, cache: Some(Box::default()), kept: Mutex::new(None) }
    }
    /// A plain buffer that carries `kept` for the backward of the forward that made it.
    pub(crate) fn with_kept(data: Vec<F>, kept: Option<Kept<F>>) -> Self {
        Self { data, cache: None, kept: Mutex::new(kept.map(Box::new)) }
    }
    pub fn into_vec(self) -> Vec<F> {
        self.data
    }
    pub(crate) fn cache(&self) -> Option<&WeightCache> {
        self.cache.as_deref()
    }
    /// What a forward kept on this buffer, taken (a second call gets `None`).
    pub(crate) fn take_kept(&self) -> Option<Box<Kept<F>>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl<F: Clone> Clone for CpuBuf<F> {
    /// Clones the data; a clone of a weight is a weight with an empty cache, and nothing kept.
    fn clone(&self) -> Self {
        Self { data: self.data.clone(), cache: self.cache.as_ref().map(|_| Box::default()), kept: Mutex::new(None) }
    }
}

impl<F: PartialEq> PartialEq for CpuBuf<F> {
    fn eq(&self, other: &Self) -> bool {
        self.data == other.data
    }
}

impl<F> From<Vec<F>> for CpuBuf<F> {
    fn from(data: Vec<F>) -> Self {
        Self::new(data)
    }
}

impl<F> FromIterator<F> for CpuBuf<F> {
    fn from_iter<I: IntoIterator<Item = F>>(it: I) -> Self {
        Self::new(it.into_iter().collect())
    }
}

impl<'a, F> IntoIterator for &'a CpuBuf<F> {
    type Item = &'a F;
    type IntoIter = std::slice::Iter<'a, F>;
    fn into_iter(self) -> Self::IntoIter {
        self.data.iter()
    }
}

impl<F> Deref for CpuBuf<F> {
    type Target = Vec<F>;
    fn deref(&self) -> &Vec<F> {
        &self.data
    }
}

impl<F> DerefMut for CpuBuf<F> {
    /// Any write may change the weights: the derived copies go.
    fn deref_mut(&mut self) -> &mut Vec<F> {
        if let Some(c) = &mut self.cache {
            c.clear();
        }
        *self.kept.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        &mut self.data
    }
}

/// Which derived copy of a weight `[n, k]` (stored as Hugging Face does, `[out, in]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Derived {
    /// GEMM panels of `B = W^T` (`[k, n]`: the forward `x @ W^T`).
    PackedT(Kind),
    /// GEMM panels of `B = W` (`[n, k]` as the right operand: the backward `dy @ W`).
    Packed(Kind),
}

/// The derived copies of one weight. Interior mutability: products take `&` buffers.
pub(crate) struct WeightCache {
    packed: Mutex<Vec<(Derived, Arc<Packed>)>>,
    bf16_rows: Mutex<Option<Arc<Vec<u16>>>>,
    q8_rows: Mutex<Option<Arc<Q8Rows>>>,
    q4_rows: Mutex<Option<Arc<Q4Rows>>>,
    /// Which version of the weight this is: unique in the process, renewed by every write.
    generation: u64,
}

/// The source of `WeightCache::generation`.
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

impl Default for WeightCache {
    fn default() -> Self {
        Self {
            packed: Mutex::default(),
            bf16_rows: Mutex::default(),
            q8_rows: Mutex::default(),
            q4_rows: Mutex::default(),
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for WeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeightCache")
    }
}

impl WeightCache {
    fn clear(&mut self) {
        self.generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        self.packed.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
        *self.bf16_rows.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        *self.q8_rows.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        *self.q4_rows.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// This version of the weight: two reads see the same number only if no write came between.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The packed copy `which`, made by `make` on first use.
    pub(crate) fn packed(&self, which: Derived, make: impl FnOnce() -> Packed) -> Arc<Packed> {
        let mut g = self.packed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = g.iter().find(|(w, _)| *w == which) {
            return p.clone();
        }
        let p = Arc::new(make());
        g.push((which, p.clone()));
        p
    }

    /// The weight's rows rounded to bf16 (row-major, as stored), made on first use.
    pub(crate) fn bf16_rows(&self, w: &[f32]) -> Arc<Vec<u16>> {
        let mut g = self.bf16_rows.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(|| Arc::new(w.iter().map(|&x| matmul::bf16_bits(x)).collect())).clone()
    }

    /// The weight's rows of `k` in 8-bit blocks, made on first use.
    pub(crate) fn q8_rows(&self, w: &[f32], k: usize) -> Arc<Q8Rows> {
        rows_of(&self.q8_rows, k, Q8Rows::k, || Q8Rows::quantize(w, k))
    }

    /// The weight's rows of `k` in 4-bit blocks, made on first use.
    pub(crate) fn q4_rows(&self, w: &[f32], k: usize) -> Arc<Q4Rows> {
        rows_of(&self.q4_rows, k, Q4Rows::k, || Q4Rows::quantize(w, k))
    }
}

/// The copy in `slot` if it has rows of `k` (`k_of`), else a new one from `make`, kept there.
fn rows_of<T>(slot: &Mutex<Option<Arc<T>>>, k: usize, k_of: impl Fn(&T) -> usize, make: impl FnOnce() -> T) -> Arc<T> {
    let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
    match &*g {
        Some(q) if k_of(q) == k => q.clone(),
        _ => {
            let q = Arc::new(make());
            *g = Some(q.clone());
            q
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_drops_the_derived_copies() {
        let mut w = CpuBuf::weight(vec![1.0f32, 2.0, 3.0, 4.0]);
        let p1 = w.cache().unwrap().bf16_rows(&w);
        assert_eq!(p1[1], matmul::bf16_bits(2.0));
        // Reads keep the copy.
        let again = w.cache().unwrap().bf16_rows(&w);
        assert!(Arc::ptr_eq(&p1, &again));
        w[1] = 5.0;
        let p2 = w.cache().unwrap().bf16_rows(&w);
        assert_eq!(p2[1], matmul::bf16_bits(5.0));
        assert!(!Arc::ptr_eq(&p1, &p2));
        // A plain buffer has no cache; a clone of a weight starts empty.
        assert!(CpuBuf::new(vec![0f32]).cache().is_none());
        assert!(w.clone().cache().is_some());
    }
}
