//! Per-op parity of `CudaBackend<G>` against the CPU reference `CpuBackend<f32>` on seeded
//! random inputs (never zeros) at several shapes, odd sizes included. Overwritten outputs
//! are poisoned with NaN first, so an element a kernel forgets to write fails the check.
//! Used by tests/cuda_sim_ops.rs (on `Sim`) and `ipo selftest` (on `Sim` or a real GPU).
//!
//! The table is data: `Check::ALL` has one entry per op (its name, its tolerance, the function
//! that runs it at its shapes and reports one `Row` per output and shape).
//!
//! Error measure: `max_i |gpu_i - cpu_i| / max(1, max_i |cpu_i|)` per output tensor (NaN
//! counts as infinite error), unless a check's doc says otherwise. Tolerances: 0 where the
//! kernel does the CPU's arithmetic in the CPU's order (copies, gathers, ordered sums);
//! otherwise a few f32 roundings of the reduction length, since the kernels sum in a different
//! order (and use fused multiply-adds) than the CPU's GEMMs and rayon reductions.

use super::{CudaBackend, Gpu, Sim};
use crate::backend::cpu::{CpuBackend, CpuBuf};
use crate::backend::{AdamwStep, AttnDims, AttnLayout, Backend, KvGeom, PagedSeq, SampleRow, SegmentDpo, SegmentPair, Span};

/// One line of the parity table.
#[derive(Clone, Debug)]
pub struct Row {
    pub op: String,
    pub shape: String,
    pub max_err: f64,
    pub tol: f64,
}

impl Row {
    pub fn pass(&self) -> bool {
        self.max_err <= self.tol
    }
}

/// How far the rows of an op may be from the reference.
#[derive(Clone, Copy, Debug)]
enum Tol {
    /// Every row of the op: `max_err <= tol`.
    Max(f64),
    /// Set per row by the check (the bound grows with a reduction length, or differs between
    /// the op's outputs); the derivation is in the check's doc.
    Derived,
}

/// One op of the parity table: its name (`ipo selftest --ops`, tests/cuda_sim_ops.rs), the
/// tolerance of its rows, and the check, which runs the op at its shapes on seeded inputs.
struct Check<G: Gpu> {
    op: &'static str,
    tol: Tol,
    run: fn(&mut Ctx<'_, G>, &mut Rng),
}

impl<G: Gpu> Check<G> {
    /// The parity table, in table order.
    const ALL: &'static [Check<G>] = &[
        Check { op: "matmul", tol: Tol::Max(1e-6), run: matmul::<G> }, // and matmul_scaled
        Check { op: "add_assign", tol: Tol::Max(0.0), run: add_assign::<G> },
        Check { op: "embedding", tol: Tol::Max(0.0), run: embedding::<G> },
        Check { op: "embedding_bwd", tol: Tol::Max(0.0), run: embedding_bwd::<G> },
        Check { op: "rmsnorm", tol: Tol::Max(2e-6), run: rmsnorm::<G> },
        Check { op: "rmsnorm_bwd", tol: Tol::Max(2e-6), run: rmsnorm_bwd::<G> },
        Check { op: "bias_add", tol: Tol::Max(0.0), run: bias_add::<G> },
        Check { op: "bias_bwd", tol: Tol::Max(0.0), run: bias_bwd::<G> },
        Check { op: "rope", tol: Tol::Max(1e-6), run: rope::<G> },
        Check { op: "swiglu", tol: Tol::Max(1e-6), run: swiglu::<G> },
        Check { op: "swiglu_bwd", tol: Tol::Max(1e-6), run: swiglu_bwd::<G> },
        Check { op: "attention", tol: Tol::Max(2e-6), run: attention::<G> },
        Check { op: "attention_bwd", tol: Tol::Max(5e-6), run: attention_bwd::<G> },
        Check { op: "lm_head_logprobs", tol: Tol::Max(2e-6), run: lm_head_logprobs::<G> },
        Check { op: "lm_head_bwd", tol: Tol::Max(2e-6), run: lm_head_bwd::<G> },
        Check { op: "kv_write", tol: Tol::Max(0.0), run: kv_write::<G> },
        Check { op: "kv_copy_blocks", tol: Tol::Max(0.0), run: kv_copy_blocks::<G> },
        Check { op: "paged_attention", tol: Tol::Max(2e-6), run: paged_attention::<G> },
        Check { op: "sample", tol: Tol::Max(0.0), run: sample::<G> },
        Check { op: "sum_squares", tol: Tol::Derived, run: sum_squares::<G> },
        Check { op: "adamw", tol: Tol::Max(0.0), run: adamw::<G> },
        Check { op: "sgd", tol: Tol::Max(0.0), run: sgd::<G> },
        Check { op: "sum_squares_many", tol: Tol::Derived, run: sum_squares_many::<G> },
        Check { op: "segment_dpo", tol: Tol::Derived, run: segment_dpo::<G> },
        Check { op: "matmul_bf16", tol: Tol::Derived, run: matmul_bf16::<G> },
        Check { op: "attention_bf16", tol: Tol::Max(1.0), run: attention_bf16::<G> },
        Check { op: "paged_attention_bf16kv", tol: Tol::Derived, run: paged_attention_bf16kv::<G> },
        Check { op: "attention_bwd_bf16", tol: Tol::Max(1e-2), run: attention_bwd_bf16::<G> },
        Check { op: "lm_head_bf16", tol: Tol::Max(1.0), run: lm_head_bf16::<G> },
    ];
}

/// Every op with a parity check, in table order (the names of `Check::ALL`).
pub const OPS: &[&str] = &{
    const N: usize = Check::<Sim>::ALL.len();
    let mut names = [""; N];
    let mut i = 0;
    while i < N {
        names[i] = Check::<Sim>::ALL[i].op;
        i += 1;
    }
    names
};

/// Runs the parity check of `op` at its shapes; panics on an unknown op name.
pub fn check_op<G: Gpu>(gpu: &CudaBackend<G>, op: &str, seed: u64) -> Vec<Row> {
    let check = Check::<G>::ALL.iter().find(|c| c.op == op).unwrap_or_else(|| panic!("no parity check for op {op} (known: {OPS:?})"));
    let mut c = Ctx { gpu, cpu: CpuBackend::new(), tol: check.tol, rows: Vec::new() };
    (check.run)(&mut c, &mut Rng(seed));
    c.rows
}

/// The table as text: op, shape, max error, tolerance, pass.
pub fn format_table(rows: &[Row]) -> String {
    let w = rows.iter().map(|r| r.shape.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<20} {:<w$} {:>10} {:>10}  pass\n", "op", "shape", "max err", "tol");
    for r in rows {
        s += &format!("{:<20} {:<w$} {:>10.2e} {:>10.1e}  {}\n", r.op, r.shape, r.max_err, r.tol, if r.pass() { "yes" } else { "NO" });
    }
    s
}

/// SplitMix64 with normals (Box-Muller): seeded and reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn vec(&mut self, n: usize, scale: f64) -> CpuBuf<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * scale) as f32
            })
            .collect()
    }
    fn below(&mut self, n: usize) -> u32 {
        (self.next() % n as u64) as u32
    }
    fn ids(&mut self, n: usize, below: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(below)).collect()
    }
}

fn max_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    assert_eq!(gpu.len(), cpu.len());
    let scale = cpu.iter().fold(1f64, |m, &x| m.max((x as f64).abs()));
    gpu.iter().zip(cpu).fold(0f64, |m, (&a, &b)| if a.is_nan() || b.is_nan() { f64::INFINITY } else { m.max((a as f64 - b as f64).abs() / scale) })
}

/// What a check works with: both backends, its op's tolerance, and the rows so far.
struct Ctx<'a, G: Gpu> {
    gpu: &'a CudaBackend<G>,
    cpu: CpuBackend<f32>,
    tol: Tol,
    rows: Vec<Row>,
}

type Buf<G> = <CudaBackend<G> as Backend>::Buf;

impl<G: Gpu> Ctx<'_, G> {
    /// A row of an op held to its `Tol::Max`: `max_err` of the GPU output against the CPU's.
    fn row(&mut self, op: &str, shape: String, gpu: &Buf<G>, cpu: &[f32]) {
        let Tol::Max(tol) = self.tol else { panic!("{op}: a check with derived tolerances must give each row its own") };
        let g = self.gpu.download(gpu);
        self.push(op, shape, max_err(&g, cpu), tol);
    }
    /// A row with its error and tolerance given.
    fn push(&mut self, op: &str, shape: String, max_err: f64, tol: f64) {
        self.rows.push(Row { op: op.to_string(), shape, max_err, tol });
    }
    fn nan(&self, n: usize) -> Buf<G> {
        self.gpu.upload(&vec![f32::NAN; n])
    }
}

fn layouts() -> Vec<(&'static str, AttnLayout)> {
    let pair = |c0: usize, n: usize, a: usize, b: usize| {
        vec![
            Span { start: c0, len: n, prefix_start: c0, prefix_len: 0 },
            Span { start: c0 + n, len: a, prefix_start: c0, prefix_len: n },
            Span { start: c0 + n + a, len: b, prefix_start: c0, prefix_len: n },
        ]
    };
    let mut pairs = pair(0, 6, 4, 3);
    pairs.extend(pair(13, 35, 5, 2));
    vec![("seqs [5, 1, 9]", AttnLayout::sequences(&[5, 1, 9])), ("seq [41]", AttnLayout::sequences(&[41])), ("pairs (6|4|3) (35|5|2)", AttnLayout { spans: pairs })]
}

// ---- the checks, one per op (ops that share inputs draw them with one helper) ----

/// One matmul on both backends: the inputs a, b and c0 (the c accumulated onto; NaN when
/// overwritten), and the CPU's and the GPU's c.
struct MatmulCase<G: Gpu> {
    a: CpuBuf<f32>,
    b: CpuBuf<f32>,
    c0: CpuBuf<f32>,
    cpu: CpuBuf<f32>,
    gpu: Buf<G>,
}

/// `c = alpha op(a) @ op(b) (+ c)` from random inputs; `alpha == 1` runs `matmul`, anything
/// else `matmul_scaled`.
fn matmul_case<G: Gpu>(c: &Ctx<'_, G>, r: &mut Rng, (m, n, k): (usize, usize, usize), ta: bool, tb: bool, acc: bool, alpha: f64) -> MatmulCase<G> {
    let (a, b) = (r.vec(m * k, 1.0), r.vec(k * n, 1.0));
    let c0 = if acc { r.vec(m * n, 1.0) } else { CpuBuf::from(vec![f32::NAN; m * n]) };
    let mut cc = if acc { c0.clone() } else { CpuBuf::from(vec![0.0; m * n]) };
    let mut cg = c.gpu.upload(&c0);
    let (ag, bg) = (c.gpu.upload(&a), c.gpu.upload(&b));
    if alpha == 1.0 {
        c.cpu.matmul(&a, ta, &b, tb, &mut cc, m, n, k, acc);
        c.gpu.matmul(&ag, ta, &bg, tb, &mut cg, m, n, k, acc);
    } else {
        c.cpu.matmul_scaled(&a, ta, &b, tb, &mut cc, m, n, k, alpha, acc);
        c.gpu.matmul_scaled(&ag, ta, &bg, tb, &mut cg, m, n, k, alpha, acc);
    }
    MatmulCase { a, b, c0, cpu: cc, gpu: cg }
}

/// The transposition and accumulation variants of every matmul shape.
const MATMUL_VARIANTS: [(bool, bool, bool); 8] =
    [(false, false, false), (false, false, true), (true, false, false), (true, false, true), (false, true, false), (false, true, true), (true, true, false), (true, true, true)];

/// `matmul` at three shapes, then `matmul_scaled` (alpha = -0.37) at two.
fn matmul<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for (op, alpha, shapes) in [("matmul", 1.0, &[(1, 1, 1), (7, 5, 3), (33, 17, 29)][..]), ("matmul_scaled", -0.37, &[(7, 5, 3), (33, 17, 29)][..])] {
        for &(m, n, k) in shapes {
            for (ta, tb, acc) in MATMUL_VARIANTS {
                let mc = matmul_case(c, r, (m, n, k), ta, tb, acc, alpha);
                c.row(op, format!("m{m} n{n} k{k} ta{} tb{} acc{}", ta as u8, tb as u8, acc as u8), &mc.gpu, &mc.cpu);
            }
        }
    }
}

fn add_assign<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for n in [1, 1000] {
        let (x, y) = (r.vec(n, 1.0), r.vec(n, 1.0));
        let mut xc = x.clone();
        c.cpu.add_assign(&mut xc, &y);
        let mut xg = c.gpu.upload(&x);
        c.gpu.add_assign(&mut xg, &c.gpu.upload(&y));
        c.row("add_assign", format!("n{n}"), &xg, &xc);
    }
}

/// Shapes `(vocab, dim, tokens)` of the embedding checks.
const EMBEDDING_SHAPES: [(usize, usize, usize); 2] = [(13, 7, 9), (50, 33, 40)];

/// Inputs of an embedding check: table `[vocab, dim]`, ids `[tokens]`, dout `[tokens, dim]`.
fn embedding_inputs(r: &mut Rng, (vocab, dim, t): (usize, usize, usize)) -> (CpuBuf<f32>, Vec<u32>, CpuBuf<f32>) {
    (r.vec(vocab * dim, 1.0), r.ids(t, vocab), r.vec(t * dim, 1.0))
}

fn embedding<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for (vocab, dim, t) in EMBEDDING_SHAPES {
        let (table, ids, _) = embedding_inputs(r, (vocab, dim, t));
        let mut oc = CpuBuf::from(vec![0.0; t * dim]);
        c.cpu.embedding(&table, &ids, dim, &mut oc);
        let mut og = c.nan(t * dim);
        c.gpu.embedding(&c.gpu.upload(&table), &ids, dim, &mut og);
        c.row("embedding", format!("vocab{vocab} dim{dim} tokens{t}"), &og, &oc);
    }
}

fn embedding_bwd<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for (vocab, dim, t) in EMBEDDING_SHAPES {
        let (table, ids, d) = embedding_inputs(r, (vocab, dim, t));
        let mut tc = table.clone();
        c.cpu.embedding_bwd(&d, &ids, dim, &mut tc);
        let mut tg = c.gpu.upload(&table);
        c.gpu.embedding_bwd(&c.gpu.upload(&d), &ids, dim, &mut tg);
        c.row("embedding_bwd", format!("vocab{vocab} dim{dim} tokens{t}"), &tg, &tc);
    }
}

fn rmsnorm<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    // v1 (dim 7, 64), v2 (300), v8 (1100), v16 (4096) and the one-row-per-block kernels (9000);
    // 260 rows: 4 rows per block, and col_sum stages rstd twice.
    for (rows, dim) in [(3, 7), (5, 64), (2, 300), (260, 24), (9, 1100), (3, 4096), (2, 9000)] {
        // dy is drawn too, so that both rmsnorm checks see the same x and w.
        let (x, w, _dy) = (r.vec(rows * dim, 1.0), r.vec(dim, 1.0), r.vec(rows * dim, 1.0));
        let (mut oc, mut rc) = (CpuBuf::from(vec![0.0; rows * dim]), CpuBuf::from(vec![0.0; rows]));
        c.cpu.rmsnorm(&x, &w, dim, 1e-5, &mut oc, &mut rc);
        let (mut og, mut rg) = (c.nan(rows * dim), c.nan(rows));
        c.gpu.rmsnorm(&c.gpu.upload(&x), &c.gpu.upload(&w), dim, 1e-5, &mut og, &mut rg);
        let shape = format!("rows{rows} dim{dim}");
        c.row("rmsnorm.out", shape.clone(), &og, &oc);
        c.row("rmsnorm.rstd", shape, &rg, &rc);
    }
}

/// dx and dw (accumulated onto random values) from the CPU's saved rstd; also with x stored in
/// bf16 (`Backend::store_bf16` under bf16, the residual stream as the backward reads it:
/// rmsnorm_bwd_v<V>_xbf16, rmsnorm_bwd_xbf16, col_sum_xbf16) against the CPU on the same
/// rounded x (fp32 math on both sides: the fp32 tolerance).
fn rmsnorm_bwd<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    // v1 (dim 7, 64), v2 (300), v8 (1100), v16 (4096) and the one-row-per-block kernels (9000);
    // 260 rows: 4 rows per block, and col_sum stages rstd twice.
    for (rows, dim) in [(3, 7), (5, 64), (2, 300), (260, 24), (9, 1100), (3, 4096), (2, 9000)] {
        let (x, w, dy) = (r.vec(rows * dim, 1.0), r.vec(dim, 1.0), r.vec(rows * dim, 1.0));
        let (mut oc, mut rc) = (CpuBuf::from(vec![0.0; rows * dim]), CpuBuf::from(vec![0.0; rows]));
        c.cpu.rmsnorm(&x, &w, dim, 1e-5, &mut oc, &mut rc);
        let dw0 = r.vec(dim, 1.0);
        for stored in [false, true] {
            let xc = if stored { round_bf16(&x) } else { CpuBuf::from(x.to_vec()) };
            let (mut dxc, mut dwc) = (CpuBuf::from(vec![0.0; rows * dim]), dw0.clone());
            c.cpu.rmsnorm_bwd(&dy, &xc, &w, &rc, dim, &mut dxc, &mut dwc);
            let mut xg = c.gpu.upload(&x);
            if stored {
                store_bf16(c.gpu, &mut xg);
            }
            let (mut dxg, mut dwg) = (c.nan(rows * dim), c.gpu.upload(&dw0));
            c.gpu.rmsnorm_bwd(&c.gpu.upload(&dy), &xg, &c.gpu.upload(&w), &c.gpu.upload(&rc), dim, &mut dxg, &mut dwg);
            let shape = format!("rows{rows} dim{dim}{}", if stored { " x bf16" } else { "" });
            c.row("rmsnorm_bwd.dx", shape.clone(), &dxg, &dxc);
            c.row("rmsnorm_bwd.dw", shape, &dwg, &dwc);
        }
    }
}

fn bias_add<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for (rows, dim) in [(4, 5), (9, 33)] {
        let (y, b) = (r.vec(rows * dim, 1.0), r.vec(dim, 1.0));
        let mut yc = y.clone();
        c.cpu.bias_add(&mut yc, &b, dim);
        let mut yg = c.gpu.upload(&y);
        c.gpu.bias_add(&mut yg, &c.gpu.upload(&b), dim);
        c.row("bias_add", format!("rows{rows} dim{dim}"), &yg, &yc);
    }
}

fn bias_bwd<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for (rows, dim) in [(4, 5), (9, 33)] {
        let (dy, b) = (r.vec(rows * dim, 1.0), r.vec(dim, 1.0));
        let mut bc = b.clone();
        c.cpu.bias_bwd(&dy, dim, &mut bc);
        let mut bg = c.gpu.upload(&b);
        c.gpu.bias_bwd(&c.gpu.upload(&dy), dim, &mut bg);
        c.row("bias_bwd", format!("rows{rows} dim{dim}"), &bg, &bc);
    }
}

fn rope<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for (t, nh, hd) in [(5, 3, 8), (7, 2, 12)] {
        let pos = r.ids(t, 100);
        // The backend keeps the last cos/sin table: the sign flips, the same key comes back,
        // and the frequencies change (rope scaling) under unchanged positions.
        for (inverse, scale) in [(false, 1.0), (true, 1.0), (false, 1.0), (false, 0.25)] {
            let inv: Vec<f64> = (0..hd / 2).map(|i| scale * 10000f64.powf(-2.0 * i as f64 / hd as f64)).collect();
            let x = r.vec(t * nh * hd, 1.0);
            let mut xc = x.clone();
            c.cpu.rope(&mut xc, &pos, nh, hd, &inv, inverse);
            let mut xg = c.gpu.upload(&x);
            c.gpu.rope(&mut xg, &pos, nh, hd, &inv, inverse);
            c.row("rope", format!("tokens{t} heads{nh} hd{hd} inverse{} freq x{scale}", inverse as u8), &xg, &xc);
        }
    }
}

/// Inputs `[n]` of a SwiGLU check: gate, up, dout.
fn swiglu_inputs(r: &mut Rng, n: usize) -> (CpuBuf<f32>, CpuBuf<f32>, CpuBuf<f32>) {
    (r.vec(n, 2.0), r.vec(n, 1.0), r.vec(n, 1.0))
}

fn swiglu<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for n in [7, 257] {
        let (g, u, _) = swiglu_inputs(r, n);
        let mut oc = CpuBuf::from(vec![0.0; n]);
        c.cpu.swiglu(&g, &u, &mut oc);
        let mut og = c.nan(n);
        c.gpu.swiglu(&c.gpu.upload(&g), &c.gpu.upload(&u), &mut og);
        c.row("swiglu", format!("n{n}"), &og, &oc);
    }
}

/// Also with gate and up stored in bf16 (`Backend::store_bf16` under bf16: swiglu_bwd_bf16)
/// against the CPU on the same rounded values (fp32 math on both sides: the fp32 tolerance).
fn swiglu_bwd<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for n in [7, 257] {
        let (g, u, d) = swiglu_inputs(r, n);
        for stored in [false, true] {
            let (gc, uc) = if stored { (round_bf16(&g), round_bf16(&u)) } else { (g.clone(), u.clone()) };
            let (mut dgc, mut duc) = (CpuBuf::from(vec![0.0; n]), CpuBuf::from(vec![0.0; n]));
            c.cpu.swiglu_bwd(&d, &gc, &uc, &mut dgc, &mut duc);
            let (mut gg, mut ug) = (c.gpu.upload(&g), c.gpu.upload(&u));
            if stored {
                store_bf16(c.gpu, &mut gg);
                store_bf16(c.gpu, &mut ug);
            }
            let (mut dgg, mut dug) = (c.nan(n), c.nan(n));
            c.gpu.swiglu_bwd(&c.gpu.upload(&d), &gg, &ug, &mut dgg, &mut dug);
            let shape = format!("n{n}{}", if stored { " gate/up bf16" } else { "" });
            c.row("swiglu_bwd.dgate", shape.clone(), &dgg, &dgc);
            c.row("swiglu_bwd.dup", shape, &dug, &duc);
        }
    }
}

/// `x` rounded to bf16 (RNE, as `Backend::store_bf16` rounds) and back.
fn round_bf16(x: &[f32]) -> CpuBuf<f32> {
    CpuBuf::from(x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<f32>>())
}

/// `Backend::store_bf16` of `buf` under `Precision::Bf16` (the backend's precision restored
/// afterwards; the buffer stays bf16, and the ops that read it pick their bf16 variant).
fn store_bf16<G: Gpu>(gpu: &CudaBackend<G>, buf: &mut Buf<G>) {
    let before = gpu.precision();
    gpu.set_precision(super::Precision::Bf16);
    gpu.store_bf16(buf);
    gpu.set_precision(before);
    assert!(buf.bf16_only, "store_bf16 under bf16 keeps the bf16 values only");
}

/// One attention case: layout, head geometry, inputs q, k, v, dout, and the CPU forward's
/// out and lse.
struct AttnCase {
    shape: String,
    layout: AttnLayout,
    dims: AttnDims,
    q: CpuBuf<f32>,
    k: CpuBuf<f32>,
    v: CpuBuf<f32>,
    dout: CpuBuf<f32>,
    out: CpuBuf<f32>,
    lse: CpuBuf<f32>,
}

/// Every layout with two head geometries (GQA 4/2 at head_dim 8, 3/1 at 5).
fn attention_cases(c: &Ctx<'_, impl Gpu>, r: &mut Rng) -> Vec<AttnCase> {
    let mut cases = Vec::new();
    for (lname, layout) in layouts() {
        for dims in [AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 8 }, AttnDims { n_heads: 3, n_kv_heads: 1, head_dim: 5 }] {
            let t = layout.num_tokens();
            let (nq, nk) = (t * dims.n_heads * dims.head_dim, t * dims.n_kv_heads * dims.head_dim);
            let (q, k, v, dout) = (r.vec(nq, 1.0), r.vec(nk, 1.0), r.vec(nk, 1.0), r.vec(nq, 1.0));
            let (mut out, mut lse) = (CpuBuf::from(vec![0.0; nq]), CpuBuf::from(vec![0.0; t * dims.n_heads]));
            c.cpu.attention(&q, &k, &v, &layout, dims, &mut out, &mut lse);
            let shape = format!("{lname} h{}/{} hd{}", dims.n_heads, dims.n_kv_heads, dims.head_dim);
            cases.push(AttnCase { shape, layout: layout.clone(), dims, q, k, v, dout, out, lse });
        }
    }
    cases
}

fn attention<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for a in attention_cases(c, r) {
        let (mut og, mut lg) = (c.nan(a.q.len()), c.nan(a.lse.len()));
        c.gpu.attention(&c.gpu.upload(&a.q), &c.gpu.upload(&a.k), &c.gpu.upload(&a.v), &a.layout, a.dims, &mut og, &mut lg);
        c.row("attention.out", a.shape.clone(), &og, &a.out);
        c.row("attention.lse", a.shape, &lg, &a.lse);
    }
}

/// dq, dk, dv from the CPU forward's saved out and lse.
fn attention_bwd<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for a in attention_cases(c, r) {
        let (nq, nk) = (a.q.len(), a.k.len());
        let (mut dqc, mut dkc, mut dvc) = (CpuBuf::from(vec![0.0; nq]), CpuBuf::from(vec![0.0; nk]), CpuBuf::from(vec![0.0; nk]));
        c.cpu.attention_bwd(&a.dout, &a.q, &a.k, &a.v, &a.out, &a.lse, &a.layout, a.dims, &mut dqc, &mut dkc, &mut dvc);
        let (mut dqg, mut dkg, mut dvg) = (c.nan(nq), c.nan(nk), c.nan(nk));
        let up = |x: &[f32]| c.gpu.upload(x);
        c.gpu.attention_bwd(&up(&a.dout), &up(&a.q), &up(&a.k), &up(&a.v), &up(&a.out), &up(&a.lse), &a.layout, a.dims, &mut dqg, &mut dkg, &mut dvg);
        c.row("attention_bwd.dq", a.shape.clone(), &dqg, &dqc);
        c.row("attention_bwd.dk", a.shape.clone(), &dkg, &dkc);
        c.row("attention_bwd.dv", a.shape.clone(), &dvg, &dvc);
        // D = rowsum(dout * out) (attn_bwd_d), out fp32 or stored in bf16 (attn_bwd_d_out_bf16,
        // `Backend::store_bf16`), against f64 sums of the same f32 products.
        let (hd, rows) = (a.dims.head_dim, a.lse.len());
        for stored in [false, true] {
            let o = if stored { round_bf16(&a.out) } else { a.out.clone() };
            let want: Vec<f32> = (0..rows).map(|i| (0..hd).map(|d| (a.dout[i * hd + d] * o[i * hd + d]) as f64).sum::<f64>() as f32).collect();
            let mut og = c.gpu.upload(&a.out);
            if stored {
                store_bf16(c.gpu, &mut og);
            }
            let dg = c.gpu.attn_bwd_d(&c.gpu.upload(&a.dout), &og, rows, hd);
            c.row("attention_bwd.D", format!("{}{}", a.shape, if stored { " out bf16" } else { "" }), &dg, &want);
        }
    }
}

/// One lm-head case: `dim`, `vocab`, h `[tokens, dim]`, w `[vocab, dim]`, the rows and their
/// targets, dlogp, and the CPU's logp and lse.
struct LmHeadCase {
    shape: String,
    dim: usize,
    h: CpuBuf<f32>,
    w: CpuBuf<f32>,
    rows: Vec<u32>,
    targets: Vec<u32>,
    dlogp: CpuBuf<f32>,
    logp: CpuBuf<f32>,
    lse: CpuBuf<f32>,
}

/// Shapes `(dim, vocab, tokens, rows)` of the lm-head checks.
const LM_HEAD_SHAPES: [(usize, usize, usize, usize); 2] = [(7, 11, 5, 6), (16, 97, 12, 20)];

fn lm_head_case(c: &Ctx<'_, impl Gpu>, r: &mut Rng, (dim, vocab, t, n): (usize, usize, usize, usize)) -> LmHeadCase {
    let (h, w) = (r.vec(t * dim, 1.0), r.vec(vocab * dim, 0.7));
    let (rows, targets, dlogp) = (r.ids(n, t), r.ids(n, vocab), r.vec(n, 1.0));
    let (logp, lse) = c.cpu.lm_head_logprobs(&h, &w, dim, &rows, &targets);
    LmHeadCase { shape: format!("dim{dim} vocab{vocab} tokens{t} rows{n}"), dim, h, w, rows, targets, dlogp, logp, lse }
}

fn lm_head_logprobs<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for shape in LM_HEAD_SHAPES {
        let l = lm_head_case(c, r, shape);
        let (lpg, lsg) = c.gpu.lm_head_logprobs(&c.gpu.upload(&l.h), &c.gpu.upload(&l.w), l.dim, &l.rows, &l.targets);
        c.row("lm_head.logp", l.shape.clone(), &lpg, &l.logp);
        c.row("lm_head.lse", l.shape, &lsg, &l.lse);
    }
}

/// dh and dw accumulated onto random values, from the CPU's lse.
fn lm_head_bwd<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for shape in LM_HEAD_SHAPES {
        let l = lm_head_case(c, r, shape);
        let (dh0, dw0) = (r.vec(l.h.len(), 1.0), r.vec(l.w.len(), 1.0));
        let (mut dhc, mut dwc) = (dh0.clone(), dw0.clone());
        c.cpu.lm_head_bwd(&l.h, &l.w, l.dim, &l.rows, &l.targets, &l.lse, &l.dlogp, &mut dhc, Some(&mut dwc));
        let (mut dhg, mut dwg) = (c.gpu.upload(&dh0), c.gpu.upload(&dw0));
        c.gpu.lm_head_bwd(&c.gpu.upload(&l.h), &c.gpu.upload(&l.w), l.dim, &l.rows, &l.targets, &c.gpu.upload(&l.lse), &l.dlogp, &mut dhg, Some(&mut dwg));
        c.row("lm_head_bwd.dh", l.shape.clone(), &dhg, &dhc);
        c.row("lm_head_bwd.dw", l.shape, &dwg, &dwc);
    }
}

/// The paged-cache geometries of the KV checks: a pool of 24 blocks of 4 with 2 KV heads (4
/// query heads), 7 blocks of 3 with 1 (3 query heads); for decode, GQA groups of 4 at
/// head_dim 64 and of 2 at 128 with pools for contexts of several DECODE_SPLIT splits, and a
/// group of 10 (two paged_decode head chunks, DEC_GMAX = 8).
const KV_GEOMS: [(KvGeom, AttnDims); 5] = [
    (KvGeom { num_blocks: 24, block_size: 4, n_kv_heads: 2, head_dim: 8 }, AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 8 }),
    (KvGeom { num_blocks: 7, block_size: 3, n_kv_heads: 1, head_dim: 12 }, AttnDims { n_heads: 3, n_kv_heads: 1, head_dim: 12 }),
    (KvGeom { num_blocks: 40, block_size: 16, n_kv_heads: 2, head_dim: 64 }, AttnDims { n_heads: 8, n_kv_heads: 2, head_dim: 64 }),
    (KvGeom { num_blocks: 24, block_size: 16, n_kv_heads: 1, head_dim: 128 }, AttnDims { n_heads: 2, n_kv_heads: 1, head_dim: 128 }),
    (KvGeom { num_blocks: 12, block_size: 5, n_kv_heads: 2, head_dim: 16 }, AttnDims { n_heads: 20, n_kv_heads: 2, head_dim: 16 }),
];

/// The sequences `(q_len, ctx_len)` of the paged-attention checks on each of `KV_GEOMS`, in one
/// call: decode steps (q_len 1: paged_decode; contexts of 3, 2 and 1 DECODE_SPLIT = 256 splits,
/// a last split of one key, a context of exactly one split) beside prefill chunks (paged_attn).
const PAGED_SEQS: [&[(usize, usize)]; 5] = [
    &[(3, 7), (1, 1), (2, 37), (5, 5), (1, 90)],
    &[(1, 10), (4, 6)],
    &[(1, 600), (4, 40), (1, 257), (1, 3)],
    &[(1, 300), (2, 20), (1, 256)],
    &[(1, 50), (3, 9), (1, 33)],
];

/// Splits (keys) paged_attention's decode path is also run with, besides DECODE_SPLIT: so the
/// short contexts split too, over more than 32 splits (paged_decode_combine's second pass of
/// lanes), and with splits that are not whole 32-key tiles.
const FORCED_SPLITS: [usize; 2] = [16, 40];

/// A random cache `[layer_len]` of `geom`, and the geometry's name in the table.
fn kv_cache(r: &mut Rng, geom: KvGeom) -> (CpuBuf<f32>, String) {
    (r.vec(geom.layer_len(), 1.0), geom_name(geom))
}

/// A cache geometry's name in the table.
fn geom_name(geom: KvGeom) -> String {
    format!("blocks{} bs{} kv{} hd{}", geom.num_blocks, geom.block_size, geom.n_kv_heads, geom.head_dim)
}

/// `0..n` shuffled (Fisher-Yates).
fn shuffled(r: &mut Rng, n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    for i in (1..v.len()).rev() {
        v.swap(i, r.below(i + 1) as usize);
    }
    v
}

/// 5 tokens into distinct random slots.
fn kv_write<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for (geom, _) in KV_GEOMS {
        let (cache, shape) = kv_cache(r, geom);
        let (t, row) = (5, geom.n_kv_heads * geom.head_dim);
        let mut slots = shuffled(r, geom.num_blocks * geom.block_size);
        slots.truncate(t);
        let (k, v) = (r.vec(t * row, 1.0), r.vec(t * row, 1.0));
        let mut cc = cache.clone();
        c.cpu.kv_write(&mut cc, &k, &v, &slots, geom);
        let mut cg = c.gpu.upload(&cache);
        c.gpu.kv_write(&mut cg, &c.gpu.upload(&k), &c.gpu.upload(&v), &slots, geom);
        c.row("kv_write", format!("{shape} tokens{t}"), &cg, &cc);
    }
}

/// Pairs that chain (1 -> 3 -> 5), so the copies must run in order.
fn kv_copy_blocks<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for (geom, _) in KV_GEOMS {
        let (cache, shape) = kv_cache(r, geom);
        let pairs = [(1u32, 3u32), (3, 5), (0, 2)];
        let mut cc = cache.clone();
        c.cpu.kv_copy_blocks(&mut cc, &pairs, geom);
        let mut cg = c.gpu.upload(&cache);
        c.gpu.kv_copy_blocks(&mut cg, &pairs, geom);
        c.row("kv_copy_blocks", format!("{shape} pairs{}", pairs.len()), &cg, &cc);
    }
}

/// Sequences of `(q_len, ctx_len)` over random distinct blocks of `geom`: the sequences, their
/// block table and the number of query rows.
fn paged_seqs(r: &mut Rng, geom: KvGeom, shapes: &[(usize, usize)]) -> (Vec<PagedSeq>, Vec<u32>, usize) {
    let (mut seqs, mut table, mut q0) = (Vec::new(), Vec::new(), 0);
    for &(ql, ctx) in shapes {
        let blocks = shuffled(r, geom.num_blocks);
        seqs.push(PagedSeq { q_start: q0, q_len: ql, ctx_len: ctx, table_start: table.len() });
        table.extend_from_slice(&blocks[..ctx.div_ceil(geom.block_size)]);
        q0 += ql;
    }
    (seqs, table, q0)
}

/// The sequences of `PAGED_SEQS` (decode steps, prefill chunks, a single key) over random
/// distinct blocks, all in one call; the decode steps at DECODE_SPLIT and at `FORCED_SPLITS`.
fn paged_attention<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for ((geom, dims), shapes) in KV_GEOMS.into_iter().zip(PAGED_SEQS) {
        let (cache, shape) = kv_cache(r, geom);
        let (seqs, table, q0) = paged_seqs(r, geom, shapes);
        let nq = q0 * dims.n_heads * dims.head_dim;
        let q = r.vec(nq, 1.0);
        let mut oc = CpuBuf::from(vec![0.0; nq]);
        c.cpu.paged_attention(&q, &cache, &seqs, &table, geom, dims, &mut oc);
        let (qg, cg) = (c.gpu.upload(&q), c.gpu.upload(&cache));
        let mut og = c.nan(nq);
        c.gpu.paged_attention(&qg, &cg, &seqs, &table, geom, dims, &mut og);
        let name = format!("{shape} h{} seqs{}", dims.n_heads, seqs.len());
        c.row("paged_attention", name.clone(), &og, &oc);
        for split in FORCED_SPLITS {
            let mut og = c.nan(nq);
            c.gpu.paged_attention_split(&qg, &cg, &seqs, &table, geom, dims, &mut og, split);
            c.row("paged_attention", format!("{name} split{split}"), &og, &oc);
        }
    }
}

/// Token ids of `Backend::sample` against the host sampler from the same counters. Error =
/// fraction of rows whose token differs, tolerance 0. Both sides sum f64 weights (in different
/// orders), so a token may only flip when the draw lands within a few f64 roundings of a
/// cumulative boundary: never in these draws.
fn sample<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    let Tol::Max(tol) = c.tol else { unreachable!("sample has one tolerance") };
    for (vocab, reps, variants) in [(1usize, 2usize, 6usize), (37, 30, 6), (4099, 6, 6), (49152, 1, 3)] {
        // (temperature, top_k, top_p): greedy, temperature only, top-k 1 / 5 / > vocab,
        // top-p tiny / 0.9 / 1.0, and combinations.
        let configs = [
            (0.0f32, 0usize, 1.0f32), (0.7, 0, 1.0), (1.3, 0, 1.0), (1.0, 1, 1.0), (1.0, 5, 1.0), (0.9, vocab + 3, 1.0),
            (1.0, 0, 1e-6), (0.8, 0, 0.9), (1.1, 0, 1.0), (0.7, 5, 0.9), (1.5, 50, 0.5),
        ];
        for variant in 0..variants {
            let n = configs.len() * reps;
            let mut logits = Vec::with_capacity(n * vocab);
            let mut rows = Vec::with_capacity(n);
            for i in 0..n {
                let mut x = r.vec(vocab, 2.5);
                match variant {
                    // 1: many exact ties (logits on a grid of 0.5).
                    1 => x.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0),
                    // 2: -inf and NaN entries (the first one NaN).
                    2 => {
                        for (j, v) in x.iter_mut().enumerate() {
                            let d = r.below(20);
                            if (j == 0 && vocab > 1) || d == 0 {
                                *v = f32::NAN;
                            } else if d < 3 {
                                *v = f32::NEG_INFINITY;
                            }
                        }
                    }
                    // 3: every logit equal (exact sums: top-p cuts land exactly on limits).
                    3 => x.iter_mut().for_each(|v| *v = 0.75),
                    // 4: two +inf logits (they share the mass) and a NaN.
                    4 => {
                        for _ in 0..2 {
                            x[r.below(vocab) as usize] = f32::INFINITY;
                        }
                        x[r.below(vocab) as usize] = f32::NAN;
                    }
                    // 5: nothing to sample: all NaN, all -inf, or -inf with NaNs.
                    5 => {
                        let kind = i % 3;
                        for (j, v) in x.iter_mut().enumerate() {
                            *v = if kind == 0 || (kind == 2 && j % 2 == 1) { f32::NAN } else { f32::NEG_INFINITY };
                        }
                    }
                    _ => {}
                }
                logits.extend_from_slice(&x);
                let (temperature, top_k, top_p) = configs[i % configs.len()];
                rows.push(SampleRow { temperature, top_k, top_p, seed: r.next(), key: r.next(), sample: r.below(8), position: r.below(4096) });
            }
            let want = c.cpu.sample(&CpuBuf::from(logits.clone()), vocab, &rows);
            let got = c.gpu.sample(&c.gpu.upload(&logits), vocab, &rows);
            assert_eq!(got.len(), n);
            if vocab >= 37 && variant == 0 {
                // The draws must matter: sampled rows do not all take the argmax.
                let sampled = (0..n).filter(|&i| !rows[i].greedy() && want[i] != crate::backend::cpu::sample::pick(&logits[i * vocab..(i + 1) * vocab], 0.0, 0, 1.0, 0.0));
                assert!(sampled.count() > 0, "sample: every sampled row took the argmax");
            }
            let bad = want.iter().zip(&got).filter(|(a, b)| a != b).count();
            let names = ["plain", "ties", "nan/-inf", "all equal", "+inf", "no finite"];
            c.push("sample", format!("vocab{vocab} {} draws{n}", names[variant]), bad as f64 / n as f64, tol);
            if vocab == 37 && variant == 0 {
                // The same rows with a weight scratch of 7 rows: 48 launches of <= 7 rows.
                let got = c.gpu.sample_tokens_in(&c.gpu.upload(&logits), vocab, &rows, 2 * 7 * vocab);
                let bad = want.iter().zip(&got).filter(|(a, b)| a != b).count();
                c.push("sample", format!("vocab{vocab} plain draws{n} in launches of 7"), bad as f64 / n as f64, tol);
            }
        }
    }
}

/// Both sides add exact f64 squares of f32 values in f64, in different orders (CPU: index
/// order; kernel: grid-stride per thread, a tree per block, blocks in order on the host). For
/// nonnegative terms any order is within (n - 1) * 2^-53 of the sum, relative: the tolerance
/// is n * 2^-53 (1.2e-10 at n = 2^20 + 3, which also wraps the 4096-block grid).
fn sum_squares<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for n in [1, 1000, 65537, (1 << 20) + 3] {
        let x = r.vec(n, 1.0);
        let (sc, sg) = (c.cpu.sum_squares(&x), c.gpu.sum_squares(&c.gpu.upload(&x)));
        let err = if sg.is_finite() { (sg - sc).abs() / sc } else { f64::INFINITY };
        c.push("sum_squares", format!("n{n}"), err, n as f64 * f64::EPSILON / 2.0);
    }
}

/// Must equal per-buffer `sum_squares` on the same backend bit for bit (same partials, same
/// host order: error 0, tolerance 0), and the CPU's within `sum_squares`' tolerance for the
/// largest buffer.
fn sum_squares_many<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    let sizes = [1usize, 0, 1000, 65537, 3];
    let hs: Vec<CpuBuf<f32>> = sizes.iter().map(|&n| r.vec(n, 1.0)).collect();
    let ds: Vec<_> = hs.iter().map(|h| c.gpu.upload(h)).collect();
    let refs: Vec<_> = ds.iter().collect();
    let many = c.gpu.sum_squares_many(&refs);
    let one: Vec<f64> = ds.iter().map(|d| c.gpu.sum_squares(d)).collect();
    let exact = if many.len() == one.len() && many.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()) { 0.0 } else { f64::INFINITY };
    c.push("sum_squares_many", format!("sizes {sizes:?} vs per-buffer"), exact, 0.0);
    let cpu: Vec<f64> = hs.iter().map(|h| c.cpu.sum_squares(h)).collect();
    let err = cpu.iter().zip(&many).fold(0f64, |m, (a, b)| if b.is_finite() { m.max((a - b).abs() / a.max(1.0)) } else { f64::INFINITY });
    c.push("sum_squares_many", format!("sizes {sizes:?} vs cpu"), err, 65537.0 * f64::EPSILON / 2.0);
}

/// Bit-exact (tolerance 0): kernels/optim.cu does the CPU's f32 operations in the CPU's order
/// with __f*_rn intrinsics (no contraction into FMAs), from the same f32-rounded coefficients.
/// Two consecutive steps (t = 3, 4), weight decay and a clipping factor on, so the in-place
/// moments carry over; p (and for AdamW m, v) compared.
fn optimizer_step<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng, adamw: bool) {
    let op = if adamw { "adamw" } else { "sgd" };
    for n in [1, 1000, 65537, (1 << 20) + 3] {
        let (p, g) = (r.vec(n, 1.0), r.vec(n, 1.0));
        let (m, v): (CpuBuf<f32>, CpuBuf<f32>) = (r.vec(n, 0.1), r.vec(n, 0.1).iter().map(|x| x * x + 1e-12).collect());
        let (mut pc, mut mc, mut vc) = (p.clone(), m.clone(), v.clone());
        let (mut pg, mut mg, mut vg) = (c.gpu.upload(&p), c.gpu.upload(&m), c.gpu.upload(&v));
        let gg = c.gpu.upload(&g);
        for t in [3, 4] {
            let h = AdamwStep {
                lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_scale: 0.37,
                bc1: 1.0 - 0.9f64.powi(t), bc2: 1.0 - 0.999f64.powi(t),
            };
            if adamw {
                c.cpu.adamw(&mut pc, &g, &mut mc, &mut vc, &h);
                c.gpu.adamw(&mut pg, &gg, &mut mg, &mut vg, &h);
            } else {
                c.cpu.sgd(&mut pc, &g, 0.05, 0.01, 0.37);
                c.gpu.sgd(&mut pg, &gg, 0.05, 0.01, 0.37);
            }
        }
        assert!(pc != p, "{op}: the reference update must move the weights");
        c.row(&format!("{op}.p"), format!("n{n}"), &pg, &pc);
        if adamw {
            c.row("adamw.m", format!("n{n}"), &mg, &mc);
            c.row("adamw.v", format!("n{n}"), &vg, &vc);
        }
    }
}

fn adamw<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    optimizer_step(c, r, true);
    // A ZeRO-1 slice (`adamw_at`): elements 333..733 of a [1000] tensor move, the rest keep
    // their bits.
    let (n, at, k) = (1000, 333, 400);
    let (p, g) = (r.vec(n, 1.0), r.vec(n, 1.0));
    let (m, v): (CpuBuf<f32>, CpuBuf<f32>) = (r.vec(k, 0.1), r.vec(k, 0.1).iter().map(|x| x * x + 1e-12).collect());
    let h = AdamwStep { lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_scale: 0.37, bc1: 1.0 - 0.9f64.powi(2), bc2: 1.0 - 0.999f64.powi(2) };
    let (mut pc, mut mc, mut vc) = (p.clone(), m.clone(), v.clone());
    let (mut pg, mut mg, mut vg) = (c.gpu.upload(&p), c.gpu.upload(&m), c.gpu.upload(&v));
    c.cpu.adamw_at(&mut pc, &g, at, &mut mc, &mut vc, &h);
    c.gpu.adamw_at(&mut pg, &c.gpu.upload(&g), at, &mut mg, &mut vg, &h);
    assert!(pc[at..at + k] != p[at..at + k] && pc[..at] == p[..at] && pc[at + k..] == p[at + k..], "adamw_at: the reference moves the slice only");
    c.row("adamw_at.p", format!("n{n} at{at} k{k}"), &pg, &pc);
    c.row("adamw_at.m", format!("n{n} at{at} k{k}"), &mg, &mc);
    c.row("adamw_at.v", format!("n{n} at{at} k{k}"), &vg, &vc);
}

fn sgd<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    optimizer_step(c, r, false)
}

/// Segment sums: both sides add f64 conversions of f32 log-probs in f64, in different orders
/// (CPU: row order; kernel: strided per thread, then a tree): within len * 2^-53 of the sum
/// of magnitudes, relative; tolerance 1e-12 (len <= 300). dlogp: the same f64 formula on sums
/// that agree to ~1e-13, one libm vs CUDA exp (both within 1 ulp), rounded once to f32: at
/// most 1 f32 ulp apart, 2^-23 relative.
fn segment_dpo<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    for (n_pairs, max_len, sft) in [(1usize, 1usize, 0.0f64), (3, 17, 0.1), (9, 300, 1.0)] {
        let mut pairs = Vec::new();
        let mut rows = 0u32;
        for _ in 0..n_pairs {
            let (a, b) = (1 + r.below(max_len), 1 + r.below(max_len));
            let gap = r.below(3); // rows that belong to no segment (must get dlogp 0)
            let rc = r.vec(2, 5.0); // reference sums: near the policy's, so z is O(1)
            pairs.push(SegmentPair {
                chosen_start: rows + gap, chosen_len: a, rejected_start: rows + gap + a, rejected_len: b,
                ref_chosen: -(a as f64) * 2.0 + rc[0] as f64, ref_rejected: -(b as f64) * 2.0 + rc[1] as f64,
            });
            rows += gap + a + b;
        }
        let logp: CpuBuf<f32> = r.vec(rows as usize, 1.0).iter().map(|x| -x.abs() - 0.05).collect();
        let h = SegmentDpo { beta: 0.1 + r.uniform(), sft_coef: sft, batch_pairs: n_pairs + 2, batch_chosen_tokens: rows as usize + 5 };
        let (sc, dc) = c.cpu.segment_dpo(&logp, &pairs, &h);
        let (sg, dg) = c.gpu.segment_dpo(&c.gpu.upload(&logp), &pairs, &h);
        let sum_err = sc.iter().zip(&sg).fold(0f64, |m, (a, b)| {
            let e = ((a.0 - b.0).abs() / a.0.abs().max(1.0)).max((a.1 - b.1).abs() / a.1.abs().max(1.0));
            if e.is_nan() { f64::INFINITY } else { m.max(e) }
        });
        let shape = format!("pairs{n_pairs} rows{rows} sft{sft}");
        c.push("segment_dpo", format!("{shape} sums"), sum_err, 1e-12);
        let dg = c.gpu.download(&dg);
        let d_err = dc.iter().zip(&dg).fold(0f64, |m, (&a, &b)| {
            if a.is_nan() || b.is_nan() || (a == 0.0) != (b == 0.0) { f64::INFINITY } else { m.max((a as f64 - b as f64).abs() / (a as f64).abs().max(1e-30)) }
        });
        c.push("segment_dpo", format!("{shape} dlogp"), d_err, f32::EPSILON as f64);
    }
}

// ---- bf16 mixed precision (`Precision::Bf16`, src/backend/cuda/precision.rs) against the
// fp32 CPU reference; the backend is switched to Bf16 for the check and back afterwards ----
//
// Tolerances are bounds derived from bf16's 8-bit significand (7 stored bits + the implicit
// one: unit roundoff u = 2^-8 for round-to-nearest-even), stated per element, and the error
// reported is the largest `|gpu - cpu|` as a fraction of that bound where the bound differs
// per element (tolerance 1), or relative to the GEMM's absolute sum (matmul):
// - matmul_bf16: a and b are rounded to bf16 (each factor within u relatively), so a
//   product is within 2u + u^2 of the exact one; the GPU sums in f32 or better, the CPU's
//   f32 GEMM is within k 2^-24 of its exact sum. With S_ij = sum_p |a_ip b_pj| (+ |c_ij| when
//   accumulating): |gpu - cpu| <= (2^-7 + 2^-16 + (k + 2) 2^-23) S_ij. Error = max |d| / S,
//   tolerance 2^-7 + 2^-16 + (k + 2) 2^-23 (about 7.8e-3).
// - attention_bf16: q and k rounded to bf16 move each score s = scale q.k by at most
//   E_jk = scale (2^-7 + 2^-16 + (hd + 8) 2^-24) sum_d |q_d k_d| (f32 sums on both sides
//   included); let E_j = max over visible keys. Softmax weights then move by a factor within
//   e^{+-2 E_j}, and P and V are rounded to bf16 for the PV product (factors 1 +- u each), so
//   with B_jd = sum_k p_jk |v_kd|: |out_gpu - out_cpu| <= B_jd (e^{2 E_j} (1 + u)^2 - 1 +
//   2^-16) + 2^-20 (2^-16 B covering the f32 arithmetic of both sides). lse = log sum exp s
//   moves by at most E_j: |dlse| <= E_j + 2^-20 (1 + |lse|). Reported: max |d| / bound,
//   tolerance 1.

/// Runs `check` with the backend switched to `Precision::Bf16` (and back afterwards).
fn in_bf16<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng, check: fn(&mut Ctx<'_, G>, &mut Rng)) {
    let before = c.gpu.precision();
    c.gpu.set_precision(super::Precision::Bf16);
    check(c, r);
    c.gpu.set_precision(before);
}

/// Unit roundoff of bf16 (round-to-nearest-even, 8-bit significand).
const BF16_U: f64 = 1.0 / 256.0;

/// As `matmul`: plain at four shapes, then scaled (alpha = -0.37) at two; the scaled rows'
/// bound is taken relative to `|alpha| S_ij (+ |c_ij|)` and allows the CPU's two extra
/// roundings (the product, then its scaling): `(k + 4) 2^-23` instead of `(k + 2) 2^-23`.
fn matmul_bf16<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    in_bf16(c, r, |c, r| {
        let u = BF16_U;
        for (alpha, shapes) in [(1.0, &[(1, 1, 1), (7, 5, 3), (33, 17, 29), (9, 40, 131)][..]), (-0.37, &[(7, 5, 3), (9, 40, 131)][..])] {
            for &(m, n, k) in shapes {
                for (ta, tb, acc) in MATMUL_VARIANTS {
                    let MatmulCase { a, b, c0, cpu: cc, gpu } = matmul_case(c, r, (m, n, k), ta, tb, acc, alpha);
                    let g = c.gpu.download(&gpu);
                    let at = |i: usize, p: usize| (if ta { a[p * m + i] } else { a[i * k + p] }) as f64;
                    let bt = |p: usize, j: usize| (if tb { b[j * k + p] } else { b[p * n + j] }) as f64;
                    let mut err = 0f64;
                    for i in 0..m {
                        for j in 0..n {
                            let s = alpha.abs() * (0..k).map(|p| (at(i, p) * bt(p, j)).abs()).sum::<f64>() + if acc { (c0[i * n + j] as f64).abs() } else { 0.0 };
                            let d = (g[i * n + j] as f64 - cc[i * n + j] as f64).abs();
                            err = if d.is_nan() { f64::INFINITY } else { err.max(d / s) };
                        }
                    }
                    let roundings = if alpha == 1.0 { k + 2 } else { k + 4 };
                    let tol = 2.0 * u + u * u + roundings as f64 * 2f64.powi(-23);
                    let scaled = if alpha == 1.0 { String::new() } else { format!(" alpha{alpha}") };
                    c.push("matmul_bf16", format!("m{m} n{n} k{k} ta{} tb{} acc{}{scaled}", ta as u8, tb as u8, acc as u8), err, tol);
                }
            }
        }
    })
}

fn attention_bf16<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    in_bf16(c, r, |c, r| {
        let Tol::Max(tol) = c.tol else { unreachable!("attention_bf16 reports fractions of its bounds") };
        let u = BF16_U;
        let mut lays = layouts();
        lays.push(("seq [70]", AttnLayout::sequences(&[70])));
        for (lname, layout) in lays {
            for dims in [
                AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 64 },
                AttnDims { n_heads: 3, n_kv_heads: 1, head_dim: 128 },
                AttnDims { n_heads: 2, n_kv_heads: 2, head_dim: 40 },
            ] {
                let (hd, nh, nkv) = (dims.head_dim, dims.n_heads, dims.n_kv_heads);
                let t = layout.num_tokens();
                let (nq, nk) = (t * nh * hd, t * nkv * hd);
                let (q, k, v) = (r.vec(nq, 1.0), r.vec(nk, 1.0), r.vec(nk, 1.0));
                let (mut oc, mut lc) = (CpuBuf::from(vec![0.0; nq]), CpuBuf::from(vec![0.0; t * nh]));
                c.cpu.attention(&q, &k, &v, &layout, dims, &mut oc, &mut lc);
                let (mut og, mut lg) = (c.nan(nq), c.nan(t * nh));
                c.gpu.attention(&c.gpu.upload(&q), &c.gpu.upload(&k), &c.gpu.upload(&v), &layout, dims, &mut og, &mut lg);
                let (og, lg) = (c.gpu.download(&og), c.gpu.download(&lg));
                // Per-element bounds from f64 scores and weights on the host.
                let scale = 1.0 / (hd as f64).sqrt();
                let eps_s = scale * (2.0 * u + u * u + (hd + 8) as f64 * 2f64.powi(-24));
                let (mut eo, mut el) = (0f64, 0f64);
                for sp in &layout.spans {
                    let keys: Vec<usize> = (sp.prefix_start..sp.prefix_start + sp.prefix_len).chain(sp.start..sp.start + sp.len).collect();
                    for j in 0..sp.len {
                        let tok = sp.start + j;
                        let vis = &keys[..sp.prefix_len + j + 1];
                        for h in 0..nh {
                            let kvh = h / (nh / nkv);
                            let qv = &q[(tok * nh + h) * hd..(tok * nh + h + 1) * hd];
                            let kr = |row: usize| &k[(row * nkv + kvh) * hd..(row * nkv + kvh + 1) * hd];
                            let s: Vec<f64> = vis.iter().map(|&row| scale * qv.iter().zip(kr(row)).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()).collect();
                            let e = vis.iter().map(|&row| eps_s * qv.iter().zip(kr(row)).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>()).fold(0f64, f64::max);
                            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                            let l: f64 = w.iter().sum();
                            let f = (2.0 * e).exp() * (1.0 + u) * (1.0 + u) - 1.0 + 2f64.powi(-16);
                            for d in 0..hd {
                                let bnd = vis.iter().zip(&w).map(|(&row, &p)| p / l * (v[(row * nkv + kvh) * hd + d] as f64).abs()).sum::<f64>() * f + 2f64.powi(-20);
                                let i = (tok * nh + h) * hd + d;
                                let dd = (og[i] as f64 - oc[i] as f64).abs();
                                eo = if dd.is_nan() { f64::INFINITY } else { eo.max(dd / bnd) };
                            }
                            let i = tok * nh + h;
                            let dd = (lg[i] as f64 - lc[i] as f64).abs();
                            let bnd = e + 2f64.powi(-20) * (1.0 + (lc[i] as f64).abs());
                            el = if dd.is_nan() { f64::INFINITY } else { el.max(dd / bnd) };
                        }
                    }
                }
                let shape = format!("{lname} h{nh}/{nkv} hd{hd}");
                c.push("attention_bf16.out", shape.clone(), eo, tol);
                c.push("attention_bf16.lse", shape, el, tol);
            }
        }
    })
}

/// The lm-head forward under bf16 (kernels/lm_head_mma.cu, or cuBLAS + lse_rows under
/// `IPO_LM_HEAD=cublas`) against f64 on the bf16-rounded h and w, at shapes with row, vocab
/// (128-column tiles) and dim tails, repeated rows and targets in the first and last tile.
/// Errors are reported as fractions of per-row bounds: the logits' fp32 dot products are off
/// by at most gamma_dim = dim u / (1 - dim u) times sum_k |h_k w_k| (u = 2^-24); lse adds the
/// fp32 exp, log and merge sums (2 (vocab / 128 + 64) u + 2 u |lse|); logp is the difference.
fn lm_head_bf16<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    in_bf16(c, r, |c, r| {
        let Tol::Max(tol) = c.tol else { unreachable!("lm_head_bf16 reports fractions of its bounds") };
        let u = 2f64.powi(-24);
        let r16 = |x: f32| half::bf16::from_f32(x).to_f64();
        for (dim, vocab, t, n) in [(24, 301, 29, 37), (64, 383, 80, 97), (41, 129, 11, 19)] {
            let (h, w) = (r.vec(t * dim, 1.0), r.vec(vocab * dim, 0.5));
            let (mut rows, mut targets) = (r.ids(n, t), r.ids(n, vocab));
            rows[1] = rows[0];
            targets[0] = 0;
            targets[n - 1] = vocab as u32 - 1;
            let (lpg, lsg) = c.gpu.lm_head_logprobs(&c.gpu.upload(&h), &c.gpu.upload_weight(&w), dim, &rows, &targets);
            let (lpg, lsg) = (c.gpu.download(&lpg), c.gpu.download(&lsg));
            let gamma = dim as f64 * u / (1.0 - dim as f64 * u);
            let (mut ep, mut es) = (0f64, 0f64);
            for i in 0..n {
                let hr = &h[rows[i] as usize * dim..][..dim];
                let (mut logits, mut mag) = (Vec::with_capacity(vocab), 0f64);
                for v in 0..vocab {
                    let prods: Vec<f64> = hr.iter().zip(&w[v * dim..][..dim]).map(|(&a, &b)| r16(a) * r16(b)).collect();
                    logits.push(prods.iter().sum::<f64>());
                    mag = mag.max(prods.iter().map(|p| p.abs()).sum::<f64>());
                }
                let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + logits.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                let logp = logits[targets[i] as usize] - lse;
                let b_logit = gamma * mag;
                let b_lse = b_logit + 2.0 * (vocab.div_ceil(128) as f64 + 64.0) * u + 2.0 * u * lse.abs();
                let frac = |got: f32, want: f64, b: f64| {
                    let d = (got as f64 - want).abs();
                    if d.is_nan() {
                        f64::INFINITY
                    } else {
                        d / b
                    }
                };
                ep = ep.max(frac(lpg[i], logp, b_logit + b_lse));
                es = es.max(frac(lsg[i], lse, b_lse));
            }
            let shape = format!("dim{dim} vocab{vocab} tokens{t} rows{n}");
            c.push("lm_head_bf16.logp", shape.clone(), ep, tol);
            c.push("lm_head_bf16.lse", shape, es, tol);
        }
    })
}

/// The bf16 KV cache (`Backend::kv_alloc` under bf16): every slot written by `kv_write` from
/// fp32 K/V, blocks copied by `kv_copy_blocks`, then `paged_attention` with fp32 queries,
/// against the fp32 CPU path on the same K/V rounded to bf16 (RNE, `half::bf16::from_f32`).
/// Rows: the cache as downloaded (the rounding is exact: tolerance 0); the decode rows (q_len
/// 1, paged_decode: fp32 math, so the only difference left is fp32 summation order: the fp32
/// tolerance 2e-6, error relative as `max_err`) on the sequences of `PAGED_SEQS` at
/// DECODE_SPLIT and at the first of `FORCED_SPLITS`; and the prefill rows (paged_attn_mma on
/// tensor cores), against the CPU on the queries rounded to bf16 as the kernel stages them:
/// left are the scores' fp32 sums of exact bf16 products, which move each score by at most
/// E = scale (hd + 8) 2^-24 hd max|q| max|k|, and P rounded to bf16 for PV (factor 1 +- u),
/// so |gpu - cpu| <= max|v| (e^{2E} (1 + u) - 1 + 2^-16) + 2^-20 + 2e-6 max(1, max|cpu|)
/// (the last term the CPU's own fp32 error, as the fp32 tolerance); error absolute, tolerance
/// that bound (tests/cuda_sim_paged_mma.rs checks a per-element bound against f64).
fn paged_attention_bf16kv<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    in_bf16(c, r, |c, r| {
        let r16 = |x: &[f32]| x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<f32>>();
        for ((geom, dims), shapes) in KV_GEOMS.into_iter().zip(PAGED_SEQS) {
            let shape = geom_name(geom);
            let (slots, row) = (shuffled(r, geom.num_blocks * geom.block_size), geom.n_kv_heads * geom.head_dim);
            let (k, v) = (r.vec(slots.len() * row, 1.0), r.vec(slots.len() * row, 1.0));
            let mut cc = CpuBuf::from(vec![0.0; geom.layer_len()]);
            c.cpu.kv_write(&mut cc, &CpuBuf::from(r16(&k)), &CpuBuf::from(r16(&v)), &slots, geom);
            let mut cg = c.gpu.kv_alloc(geom.layer_len());
            assert!(cg.bf16_only, "kv_alloc under bf16 makes a bf16 cache");
            c.gpu.kv_write(&mut cg, &c.gpu.upload(&k), &c.gpu.upload(&v), &slots, geom);
            let pairs = [(1u32, 3u32), (3, 5), (0, 2)];
            c.cpu.kv_copy_blocks(&mut cc, &pairs, geom);
            c.gpu.kv_copy_blocks(&mut cg, &pairs, geom);
            let cache_err = max_err(&c.gpu.download(&cg), &cc);
            c.push("paged_attention_bf16kv.cache", shape.clone(), cache_err, 0.0);
            let (seqs, table, q0) = paged_seqs(r, geom, shapes);
            let (hd, row) = (dims.head_dim, dims.n_heads * dims.head_dim);
            let nq = q0 * row;
            let q = r.vec(nq, 1.0);
            let mut oc = CpuBuf::from(vec![0.0; nq]);
            c.cpu.paged_attention(&q, &cc, &seqs, &table, geom, dims, &mut oc);
            let mut oc16 = CpuBuf::from(vec![0.0; nq]);
            c.cpu.paged_attention(&CpuBuf::from(r16(&q)), &cc, &seqs, &table, geom, dims, &mut oc16);
            // The prefill rows' bound (doc above), from the largest |q|, |k| and |v|.
            let amax = |x: &[f32]| x.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
            let kb = geom.n_kv_heads * geom.block_size * hd; // K of a block, then V
            let (kmax, vmax) = cc.chunks(2 * kb).fold((0f64, 0f64), |(k, v), b| (k.max(amax(&b[..kb])), v.max(amax(&b[kb..]))));
            let e = (hd + 8) as f64 * 2f64.powi(-24) * hd as f64 * amax(&r16(&q)) * kmax / (hd as f64).sqrt();
            let bound = vmax * ((2.0 * e).exp() * (1.0 + BF16_U) - 1.0 + 2f64.powi(-16)) + 2f64.powi(-20) + 2e-6 * amax(&oc16).max(1.0);
            let qg = c.gpu.upload(&q);
            let name = format!("{shape} h{} seqs{}", dims.n_heads, seqs.len());
            for split in [None, Some(FORCED_SPLITS[0])] {
                let mut og = c.nan(nq);
                match split {
                    None => c.gpu.paged_attention(&qg, &cg, &seqs, &table, geom, dims, &mut og),
                    Some(s) => c.gpu.paged_attention_split(&qg, &cg, &seqs, &table, geom, dims, &mut og, s),
                }
                let g = c.gpu.download(&og);
                let sfx = split.map_or(String::new(), |s| format!(" split{s}"));
                let rows_of = |decode: bool| seqs.iter().filter(move |s| (s.q_len == 1) == decode).flat_map(|s| s.q_start * row..(s.q_start + s.q_len) * row);
                let pick = |x: &[f32], decode: bool| rows_of(decode).map(|i| x[i]).collect::<Vec<f32>>();
                c.push("paged_attention_bf16kv.decode", format!("{name}{sfx}"), max_err(&pick(&g, true), &pick(&oc, true)), 2e-6);
                let d = rows_of(false).fold(0f64, |m, i| {
                    let d = (g[i] as f64 - oc16[i] as f64).abs();
                    if d.is_nan() { f64::INFINITY } else { m.max(d) }
                });
                c.push("paged_attention_bf16kv.prefill", format!("{name}{sfx}"), d, bound);
            }
        }
    })
}

/// The attention backward on tensor cores (attn_bwd_dq_mma, attn_bwd_dkdv_mma) against the
/// fp32 CPU backward of the same attention on q, k, v and dout rounded to bf16 (its out and lse
/// from the CPU forward on them): left are P and dS rounded to bf16 (relative 2^-9 each) and
/// fp32 sums. Error reported relative to the largest |gradient| of each output, tolerance
/// 1e-2 (tests/cuda_sim_bf16.rs measured at most 5.1e-3 on its cases).
fn attention_bwd_bf16<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng) {
    in_bf16(c, r, |c, r| {
        let Tol::Max(tol) = c.tol else { unreachable!("attention_bwd_bf16 has one tolerance") };
        let r16 = |x: &[f32]| CpuBuf::from(x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<f32>>());
        let mut lays = layouts();
        lays.push(("seq [70]", AttnLayout::sequences(&[70])));
        for (lname, layout) in lays {
            for dims in [AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 64 }, AttnDims { n_heads: 2, n_kv_heads: 1, head_dim: 128 }] {
                let (hd, nh, nkv) = (dims.head_dim, dims.n_heads, dims.n_kv_heads);
                let t = layout.num_tokens();
                let (q, k, v, dout) = (r.vec(t * nh * hd, 1.0), r.vec(t * nkv * hd, 1.0), r.vec(t * nkv * hd, 1.0), r.vec(t * nh * hd, 1.0));
                let (qr, kr, vr, dr) = (r16(&q), r16(&k), r16(&v), r16(&dout));
                let (mut o, mut l) = (CpuBuf::from(vec![0.0; t * nh * hd]), CpuBuf::from(vec![0.0; t * nh]));
                c.cpu.attention(&qr, &kr, &vr, &layout, dims, &mut o, &mut l);
                let (mut dqc, mut dkc, mut dvc) = (CpuBuf::from(vec![0.0; t * nh * hd]), CpuBuf::from(vec![0.0; t * nkv * hd]), CpuBuf::from(vec![0.0; t * nkv * hd]));
                c.cpu.attention_bwd(&dr, &qr, &kr, &vr, &o, &l, &layout, dims, &mut dqc, &mut dkc, &mut dvc);
                let (mut dqg, mut dkg, mut dvg) = (c.nan(t * nh * hd), c.nan(t * nkv * hd), c.nan(t * nkv * hd));
                let up = |x: &CpuBuf<f32>| c.gpu.upload(x);
                c.gpu.attention_bwd(&up(&dout), &up(&q), &up(&k), &up(&v), &up(&o), &up(&l), &layout, dims, &mut dqg, &mut dkg, &mut dvg);
                for (name, g, want) in [("dq", &dqg, &dqc), ("dk", &dkg, &dkc), ("dv", &dvg, &dvc)] {
                    let scale = want.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(f64::MIN_POSITIVE);
                    let err = max_err(&c.gpu.download(g), want) / scale;
                    c.push("attention_bwd_bf16", format!("{lname} h{nh}/{nkv} d{hd} {name}"), err, tol);
                }
                // With q, k, v and out stored in bf16 (`Backend::store_bf16`: the _qkv_bf16
                // kernels, attn_bwd_d_out_bf16) against the CPU backward on out rounded too.
                let up = |x: &CpuBuf<f32>| c.gpu.upload(x);
                let (mut qg, mut kg, mut vg, mut og) = (up(&q), up(&k), up(&v), up(&o));
                for b in [&mut qg, &mut kg, &mut vg, &mut og] {
                    c.gpu.store_bf16(b);
                    assert!(b.bf16_only, "store_bf16 under bf16 keeps the bf16 values only");
                }
                let (mut dqc, mut dkc, mut dvc) = (CpuBuf::from(vec![0.0; t * nh * hd]), CpuBuf::from(vec![0.0; t * nkv * hd]), CpuBuf::from(vec![0.0; t * nkv * hd]));
                c.cpu.attention_bwd(&dr, &qr, &kr, &vr, &r16(&o), &l, &layout, dims, &mut dqc, &mut dkc, &mut dvc);
                let (mut dqg, mut dkg, mut dvg) = (c.nan(t * nh * hd), c.nan(t * nkv * hd), c.nan(t * nkv * hd));
                c.gpu.attention_bwd(&c.gpu.upload(&dout), &qg, &kg, &vg, &og, &c.gpu.upload(&l), &layout, dims, &mut dqg, &mut dkg, &mut dvg);
                for (name, g, want) in [("dq", &dqg, &dqc), ("dk", &dkg, &dkc), ("dv", &dvg, &dvc)] {
                    let scale = want.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(f64::MIN_POSITIVE);
                    let err = max_err(&c.gpu.download(g), want) / scale;
                    c.push("attention_bwd_bf16", format!("{lname} h{nh}/{nkv} d{hd} q/k/v/out bf16 {name}"), err, tol);
                }
            }
        }
    })
}
