//! Every CUDA kernel op on `CudaBackend<Sim>` (NVRTC PTX executed by ptxsim) against the CPU
//! reference `CpuBackend<f32>`, on seeded random inputs at several shapes, outputs poisoned
//! with NaN first. The checks and their per-op tolerances live in
//! src/backend/cuda/parity.rs (shared with `ipo selftest`). Without NVRTC the tests print a
//! skip notice, or fail under CI=true.

mod common;

use ipo::backend::cuda::{parity, Sim};

fn check(op: &str) {
    let Some(be) = common::sim() else { return };
    let rows = parity::check_op(&be, op, 0x1234_5678);
    assert!(!rows.is_empty());
    eprintln!("{}", parity::format_table(&rows));
    let bad: Vec<_> = rows.iter().filter(|r| !r.pass()).collect();
    assert!(bad.is_empty(), "{op}: failing shapes:\n{}", parity::format_table(&rows));
}

macro_rules! op_tests {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            check(stringify!($name));
        }
    )*};
}

op_tests!(
    matmul, add_assign, embedding, embedding_bwd, rmsnorm, rmsnorm_bwd, bias_add, bias_bwd, rope, swiglu, swiglu_bwd, attention,
    attention_bwd, lm_head_logprobs, lm_head_bwd, kv_write, kv_copy_blocks, paged_attention
);
op_tests!(
    sum_squares, adamw, sgd, sum_squares_many
);
// The fused masked-segment DPO loss (kernels/dpo.cu): segment sums and dL/dlogp.
op_tests!(
    segment_dpo
);
// Token sampling (kernels/sampling.cu, src/backend/cuda/sampling.rs): token ids, tolerance 0.
op_tests!(
    sample
);
// bf16 mixed precision (src/backend/cuda/precision.rs) vs the fp32 CPU reference, bounds
// derived from bf16's 8-bit significand (parity.rs); more in tests/cuda_sim_bf16.rs.
op_tests!(
    matmul_bf16, attention_bf16, paged_attention_bf16kv, attention_bwd_bf16, lm_head_bf16
);

#[test]
fn every_op_has_a_test() {
    let here = include_str!("cuda_sim_ops.rs");
    for op in parity::OPS {
        assert!(here.contains(&format!(" {op},")) || here.contains(&format!(" {op}\n")), "no test for {op}");
    }
}

/// Pins the column-major semantics of `Sim::gemm` on a hand-computed example (cuBLAS docs:
/// element (i, j) of X at x[i + j * ldx]), and the row-major mapping of `Gemm::row_major`.
#[test]
fn sim_gemm_is_column_major() {
    use ipo::backend::cuda::{Gemm, Gpu};
    let sim = Sim::new();
    let up = |v: &[f32]| {
        let p = sim.alloc(4 * v.len()).unwrap();
        sim.htod(p, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>()).unwrap();
        p
    };
    let down = |p, n: usize| {
        let mut b = vec![0u8; 4 * n];
        sim.dtoh(p, &mut b).unwrap();
        b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<f32>>()
    };
    // A (2x3) column-major = [[1, 3, 5], [2, 4, 6]]; B (3x2) column-major = [[1, 4], [2, 5], [3, 6]].
    let a = up(&[1., 2., 3., 4., 5., 6.]);
    let b = up(&[1., 2., 3., 4., 5., 6.]);
    let c = up(&[f32::NAN; 4]);
    let g = Gemm { trans_a: false, trans_b: false, m: 2, n: 2, k: 3, alpha: 1.0, a, lda: 2, stride_a: 0, b, ldb: 3, stride_b: 0, beta: 0.0, c, ldc: 2, stride_c: 0, batch: 1 };
    sim.gemm(&g).unwrap();
    // A @ B = [[22, 49], [28, 64]], stored column-major.
    assert_eq!(down(c, 4), vec![22., 28., 49., 64.]);
    // Row-major c[1, 2] = a[1, 3] @ b[3, 2]: cuBLAS is asked for C^T = B^T A^T, m and n swapped.
    let m = Gemm::row_major(10, false, 20, true, 30, 1, 2, 3, true);
    assert_eq!((m.a, m.b, m.m, m.n, m.trans_a, m.trans_b, m.lda, m.ldb, m.ldc, m.beta), (20, 10, 2, 1, true, false, 3, 3, 2, 1.0));
    let ra = up(&[1., 2., 3.]);
    let rb = up(&[1., 0., 2., 1., 1., 1.]); // b[3, 2] row-major
    let rc = up(&[f32::NAN; 2]);
    sim.gemm(&Gemm::row_major(ra, false, rb, false, rc, 1, 2, 3, false)).unwrap();
    assert_eq!(down(rc, 2), vec![1. + 4. + 3., 0. + 2. + 3.]);
}
