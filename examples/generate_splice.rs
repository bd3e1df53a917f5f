//! Generate with a mid-sequence splice, the primitive IPO is built on: sample a completion and
//! keep its KV cache, cut it after its first sentence, splice new text in, and continue from the
//! cached prefix (only the inserted tokens are computed again). Uses the model folder given as
//! the first argument, else `IPO_DEFAULT_MODEL` (`bash scripts/fetch-default-model.sh`).
//!
//!     cargo run --release --example generate_splice [MODEL_DIR]

use anyhow::{ensure, Context, Result};
use ipo::{CpuBackend, Engine, EngineConfig, Event, ModelDir, Output, Request, SamplingParams};

fn run<B: ipo::Backend>(engine: &mut Engine<'_, B>, req: Request, params: &SamplingParams) -> Result<Output> {
    let mut out = None;
    engine.generate(vec![req], params, None, |ev| {
        if let Event::Done(o) = ev {
            out = Some(o);
        }
    })?;
    let out = out.context("the engine finished without output")?;
    out.result.clone().map_err(anyhow::Error::msg)?;
    Ok(out)
}

fn main() -> Result<()> {
    let dir = std::env::args().nth(1).or_else(|| std::env::var("IPO_DEFAULT_MODEL").ok()).context(
        "give a model folder, or set IPO_DEFAULT_MODEL (bash scripts/fetch-default-model.sh prints it)",
    )?;
    let model_dir = ModelDir::open(dir.as_ref())?;
    let tok = model_dir.tokenizer()?;
    let chat = model_dir.chat_template()?;
    let model = model_dir.upload(CpuBackend::<f32>::new(), model_dir.weights()?)?;

    let messages = [serde_json::json!({"role": "user", "content": "How do I bake bread at home?"})];
    let prompt = tok.encode(&chat.render(&messages, true, &Default::default())?, false)?;
    // Greedy, 24 new tokens; 256 blocks of 16 positions is plenty for one short sequence.
    let params = SamplingParams { max_new_tokens: 24, eos_ids: tok.eos_ids().to_vec(), ..Default::default() };
    let mut engine = Engine::new(&model, EngineConfig { num_blocks: 256, block_size: 16, prefill_chunk: 512, max_batch: 8 })?;

    let mut first = Request::new(0, 0, prompt.clone());
    first.keep = true; // keep the finished sequence's KV cache for the splice
    let base = run(&mut engine, first, &params)?;
    println!("original:  {}", tok.decode(base.generated(), true)?);

    // Cut after the completion's first sentence, splice a sentence in, continue.
    let generated = base.generated();
    let sentence = (1..=generated.len())
        .find(|&n| tok.decode(&generated[..n], true).is_ok_and(|t| t.trim_end().ends_with('.')))
        .unwrap_or(generated.len());
    let cut = prompt.len() + sentence;
    let insert = tok.encode(" But first, a safety note:", false)?;
    let handle = base.handle.context("the request asked to keep its sequence")?;
    let before = engine.stats().computed_positions;
    let req = engine.splice(handle, cut, &insert, 0, 1)?;
    let spliced = run(&mut engine, req, &params)?;
    println!("spliced:   {}", tok.decode(&spliced.ids[prompt.len()..], true)?);
    ensure!(spliced.ids[..cut] == base.ids[..cut], "the kept prefix is shared");
    ensure!(spliced.ids[cut..cut + insert.len()] == insert[..], "the inserted ids follow it");
    let computed = engine.stats().computed_positions - before;
    println!("positions computed for the splice: {computed} (inserted {}, generated {})", insert.len(), spliced.generated().len());
    ensure!(computed < (cut + insert.len()) as u64, "the cached prefix was reused, not recomputed");
    engine.release(handle)?;
    Ok(())
}
