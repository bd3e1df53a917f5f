//! Score a text pair with the library: which continuation of a context does the model find
//! more likely? Loads a Hugging Face model folder (the first argument, else the default model
//! from `IPO_DEFAULT_MODEL`: run `bash scripts/fetch-default-model.sh`), tokenizes a context and
//! two targets, and prints the sum of each target's token log-probs.
//!
//!     cargo run --release --example score_pair [MODEL_DIR]

use anyhow::{ensure, Context, Result};
use ipo::{CpuBackend, ModelDir, ScoreItem};

fn main() -> Result<()> {
    let dir = std::env::args().nth(1).or_else(|| std::env::var("IPO_DEFAULT_MODEL").ok()).context(
        "give a model folder, or set IPO_DEFAULT_MODEL (bash scripts/fetch-default-model.sh prints it)",
    )?;
    let model_dir = ModelDir::open(dir.as_ref())?;
    let tok = model_dir.tokenizer()?;
    let model = model_dir.upload(CpuBackend::<f32>::new(), model_dir.weights()?)?;

    let context = tok.encode("The capital of France is", false)?;
    let targets = [" Paris.", " a potato."];
    let ids: Vec<Vec<u32>> = targets.iter().map(|t| tok.encode(t, false)).collect::<Result<_, _>>()?;
    let items: Vec<ScoreItem> = ids.iter().map(|t| ScoreItem { context: &context, target: t }).collect();
    // [n_items][n_target] natural-log probabilities, in forwards of at most 4096 tokens.
    let logps = model.score(&items, 4096)?;
    let sums: Vec<f64> = logps.iter().map(|lp| lp.iter().map(|&x| x as f64).sum()).collect();
    for (t, s) in targets.iter().zip(&sums) {
        println!("log p({t:?} | \"The capital of France is\") = {s:.3}");
    }
    ensure!(sums[0] > sums[1], "the model should prefer \" Paris.\"");
    Ok(())
}
