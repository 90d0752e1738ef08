//! Times our dense forward on the default model at 2K, 4K and 8K tokens (attention time shown apart),
//! and candle-transformers' `quantized_llama` (weights dequantized to f32) at 4K on the same input.
//!
//! ```text
//! scripts/fetch-model.sh
//! cargo run --release -p profiler --example forward_bench [-- LENGTHS...] [--no-reference]
//! ```
//! Peak memory is the process's high-water mark (`VmHWM`) after our runs, before the reference runs.

use candle_core::{Device, Tensor};
use profiler::model::{ensure_default_model, DenseAttention, LayerAttention, Model};
use runtime::AttentionInput;
use std::time::{Duration, Instant};

const TEXT: &str = "Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use \
    this file except in compliance with the License. Unless required by applicable law or agreed to in \
    writing, software distributed under the License is distributed on an \"AS IS\" BASIS, WITHOUT \
    WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. The capital of France is Paris; \
    in 1889 the Eiffel Tower opened, 330 metres tall. ";

/// Dense attention that adds up its own time.
struct Timed {
    total: Duration,
}

impl LayerAttention for Timed {
    fn attend(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
        out: &mut [f32],
    ) -> profiler::Result<()> {
        let t0 = Instant::now();
        DenseAttention.attend(layer, input, out)?;
        self.total += t0.elapsed();
        Ok(())
    }
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reference = !args.iter().any(|a| a == "--no-reference");
    let mut lengths: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if lengths.is_empty() {
        lengths = vec![2048, 4096, 8192];
    }
    let path = ensure_default_model()?;
    let t0 = Instant::now();
    let model = Model::load(&path)?;
    println!(
        "load {}: {:.2} s; {} threads; peak RSS {:.0} MiB",
        path.display(),
        t0.elapsed().as_secs_f64(),
        rayon::current_num_threads(),
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    let unit = model.encode(TEXT)?;
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let tokens: Vec<u32> = unit.iter().copied().cycle().take(max_len).collect();

    for &n in &lengths {
        let input = tokens.get(..n).ok_or("not enough tokens")?;
        let mut attn = Timed {
            total: Duration::ZERO,
        };
        let t0 = Instant::now();
        let hidden = model.forward_hidden(input, &mut attn)?;
        let total = t0.elapsed().as_secs_f64();
        let logits = model.logits_last(&hidden)?;
        println!(
            "ours  {n:>5} tokens: {total:6.2} s (attention {:6.2} s); next token {:?}; peak RSS {:.0} MiB",
            attn.total.as_secs_f64(),
            profiler::model::argmax(&logits),
            peak_rss_mib().unwrap_or(f64::NAN)
        );
    }

    if reference {
        use candle_transformers::models::quantized_llama::ModelWeights;
        // Read once per thread by candle, before any QMatMul is built.
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        let mut file = std::fs::File::open(&path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
        let mut reference = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
        let n = 4096.min(max_len);
        let input =
            Tensor::new(tokens.get(..n).ok_or("not enough tokens")?, &Device::Cpu)?.unsqueeze(0)?;
        let t0 = Instant::now();
        let logits: Vec<f32> = reference.forward(&input, 0)?.flatten_all()?.to_vec1()?;
        println!(
            "candle quantized_llama (f32) {n:>5} tokens: {:6.2} s; next token {:?}",
            t0.elapsed().as_secs_f64(),
            profiler::model::argmax(&logits)
        );
    }
    Ok(())
}
