//! `ipo import-gguf IN.gguf OUT_DIR`: convert a GGUF checkpoint (F32/F16/BF16/Q8_0/Q4_0/Q4_1;
//! llama, qwen2, qwen3) into a Hugging Face model folder (config.json, f32 model.safetensors,
//! tokenizer.json, tokenizer_config.json, generation_config.json). Logic in `crate::gguf`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args, Debug)]
#[command(after_help = "Writes config.json, model.safetensors (f32; llama Q/K rows un-permuted \
to Hugging Face's rotate-half layout), tokenizer.json rebuilt from the GGUF vocabulary, \
tokenizer_config.json (with the chat template), special_tokens_map.json and \
generation_config.json. Supports llama, qwen2 and qwen3 GGUFs. The folder is built beside \
OUT_DIR and renamed into place, so it is either complete or absent.")]
pub struct Args {
    /// The GGUF file to read (GGUF v2 or v3, little-endian).
    pub input: PathBuf,
    /// The model folder to create; its parent is created if needed.
    pub out_dir: PathBuf,
    /// Replace OUT_DIR if it already exists (otherwise that is an error).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} tensors {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let summary = ipo_import(&args, |i, n, name| {
        if let Some(b) = &bar {
            b.set_length(n as u64);
            b.set_position(i as u64);
            b.set_message(name.to_string());
        }
    })
    .with_context(|| format!("importing {} into {}", args.input.display(), args.out_dir.display()))?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    for s in &summary.skipped {
        eprintln!("import-gguf: left out tensor '{s}' (no Hugging Face counterpart)");
        if s == "rope_freqs.weight" {
            eprintln!("import-gguf: warning: llama3 RoPE frequency factors are not converted; add rope_scaling to config.json by hand");
        }
    }
    eprintln!(
        "import-gguf: wrote {} ({} tensors, {:.1} M params, f32) in {:.1} s",
        summary.out_dir.display(),
        summary.n_tensors,
        summary.n_params as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn ipo_import(args: &Args, on_tensor: impl FnMut(usize, usize, &str)) -> Result<crate::gguf::ImportSummary, crate::gguf::GgufError> {
    crate::gguf::import_gguf(&args.input, &args.out_dir, args.force, on_tensor)
}
