//! ggml tensor types and their dequantization to f32 (the block layouts of ggml-common.h).
//! Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1. Others are named in errors, never guessed.

use half::{bf16, f16};
use rayon::prelude::*;

/// The ggml tensor types we can decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

/// Names of all ggml type ids (ggml.h, `enum ggml_type`), for error messages.
const TYPE_NAMES: [&str; 40] = [
    "F32", "F16", "Q4_0", "Q4_1", "Q4_2(removed)", "Q4_3(removed)", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
    "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8",
    "IQ4_NL_8_8", "MXFP4",
];

impl GgmlType {
    /// The type for a ggml type id, if we decode it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The ggml type id written in GGUF tensor infos.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// Human name of any type id ("Q6_K", "unknown type 99").
    pub(crate) fn name_of_id(id: u32) -> String {
        TYPE_NAMES.get(id as usize).map(|s| s.to_string()).unwrap_or_else(|| format!("unknown type {id}"))
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18), // f16 d; u8 qs[16]
            GgmlType::Q4_1 => (32, 20), // f16 d; f16 m; u8 qs[16]
            GgmlType::Q8_0 => (32, 34), // f16 d; i8 qs[32]
        }
    }
}

/// Decode `src` (exactly out.len() elements of type `ty`) into `out`. Errors say what size
/// was expected.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) -> Result<(), String> {
    let (block, bytes) = ty.block();
    if !out.len().is_multiple_of(block) {
        return Err(format!("{} elements is not a multiple of the {ty:?} block size {block}", out.len()));
    }
    let n_blocks = out.len() / block;
    if src.len() != n_blocks * bytes {
        return Err(format!(
            "{} bytes of {ty:?} data, expected {} for {} elements",
            src.len(),
            n_blocks * bytes,
            out.len()
        ));
    }
    // Parallel over chunks of blocks: big embeddings take a while single-threaded.
    const BLOCKS_PER_TASK: usize = 4096;
    out.par_chunks_mut(block * BLOCKS_PER_TASK)
        .zip(src.par_chunks(bytes * BLOCKS_PER_TASK))
        .for_each(|(o, s)| decode_blocks(ty, s, o));
    Ok(())
}

fn decode_blocks(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes(b.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = h(b);
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = h(&b[0..2]);
                for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                    *x = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            // Low nibbles are elements 0..16, high nibbles 16..32; value = (q - 8) * d.
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = h(&b[0..2]);
                for (j, &q) in b[2..18].iter().enumerate() {
                    o[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            // value = q * d + m, same nibble order as Q4_0.
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let d = h(&b[0..2]);
                let m = h(&b[2..4]);
                for (j, &q) in b[4..20].iter().enumerate() {
                    o[j] = (q & 0x0F) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
    }
}
