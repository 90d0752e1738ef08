//! Times our dense forward on the default model at 2K, 4K and 8K tokens (attention time shown apart),
//! and candle-transformers' `quantized_llama` (weights dequantized to f32) at 4K on the same input.
//!
//! ```text
//! scripts/fetch-model.sh
//! cargo run --release -p profiler --example forward_bench [-- LENGTHS...] [--repeat N] [--no-reference]
//! ```
//! Peak memory is the process's high-water mark (`VmHWM`) after our runs, before the reference runs.
//! Each run also shows the process CPU time it used (all threads, from `/proc/self/stat`), which
//! other jobs on the machine disturb much less than wall time, and the load average before it;
//! with `--repeat N` every length runs `N` times and the median wall time is printed.

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

/// CPU time of this process so far (user + system, all threads), in seconds; clock ticks of 1/100 s.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which may contain spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() == 2 {
        (f[0] + f[1]) / 100.0
    } else {
        f64::NAN
    }
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    match x.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => x[n / 2],
        n => (x[n / 2 - 1] + x[n / 2]) / 2.0,
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
    let mut repeat = 1usize;
    let mut lengths: Vec<usize> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--repeat" {
            repeat = it.next().and_then(|n| n.parse().ok()).ok_or("--repeat N")?;
        } else if let Ok(n) = a.parse() {
            lengths.push(n);
        }
    }
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

    let mut ours_4k = None;
    for &n in &lengths {
        let input = tokens.get(..n).ok_or("not enough tokens")?;
        let mut walls = Vec::new();
        for _ in 0..repeat {
            let mut attn = Timed {
                total: Duration::ZERO,
            };
            let load = loadavg();
            let (t0, c0) = (Instant::now(), cpu_seconds());
            let hidden = model.forward_hidden(input, &mut attn)?;
            let (total, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
            let logits = model.logits_last(&hidden)?;
            println!(
                "ours  {n:>5} tokens: {total:6.2} s (attention {:6.2} s; CPU {cpu:6.1} s); next token {:?}; \
                 peak RSS {:.0} MiB; load before {load}",
                attn.total.as_secs_f64(),
                profiler::model::argmax(&logits),
                peak_rss_mib().unwrap_or(f64::NAN)
            );
            walls.push(total);
        }
        let med = median(walls);
        if repeat > 1 {
            println!("ours  {n:>5} tokens: median {med:6.2} s of {repeat} runs");
        }
        if n == 4096 {
            ours_4k = Some(med);
        }
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
        let load = loadavg();
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let logits: Vec<f32> = reference.forward(&input, 0)?.flatten_all()?.to_vec1()?;
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        println!(
            "candle quantized_llama (f32) {n:>5} tokens: {wall:6.2} s (CPU {cpu:6.1} s); next token {:?}; \
             load before {load}",
            profiler::model::argmax(&logits)
        );
        if let (Some(ours), 4096) = (ours_4k, n) {
            println!("candle / ours at 4096 tokens: {:.1}x", wall / ours);
        }
    }
    Ok(())
}
