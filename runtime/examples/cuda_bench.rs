//! CUDA executor driver: kernel compilation check, device correctness cases, and the benchmark.
//!
//! ```text
//! cuda_bench compile DIR                      NVRTC only (no device): writes DIR/<kernel>.ptx
//! cuda_bench smoke                            device name, kernel resources, a small dense check
//! cuda_bench check DIR --n N --hq H --hkv K --d D --index dense|cpu-vs|gpu-vs [--seed S]
//!                  [--v V --s S --last-q L]
//!     fresh random inputs (structured for the *-vs indexes), NaN-poisoned output, one forward;
//!     writes q/k/v/out (bf16), the flat index (u32) and meta.json to DIR for scripts/gpu/check.py.
//!     gpu-vs also compares the GPU selection with the CPU `pattern::vertical_slash` selection.
//! cuda_bench bench DIR --n N [--reps R] [--write-inputs]
//!     32 query heads, 8 KV heads, head_dim 128, vertical-slash v=1000 s=6096 last_q=64 on structured
//!     inputs: times estimation, index building, sparse attention, end to end, and dense; writes
//!     DIR/bench.json (and inputs + index for scripts/gpu/baselines.py with --write-inputs).
//! ```
//!
//! Structured inputs (see [`structured`]): Gaussian-like noise plus, per head, an attention sink
//! (token 0), a local band (low-frequency rotary pairs shared by Q and K, so q_i . k_j peaks at i = j
//! and decays with |i - j|), and 16 heavy key columns ("vertical lines") at fixed random positions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use runtime::exec::cuda::{
    bf16_bits, bf16_to_f32, device, FlatIndex, KernelFile, Keys, SparsePrefill,
    VerticalSlashBuilder,
};
use runtime::pattern::{dense, vertical_slash, HeadIndex, HeadQk, PatternContext};
use runtime::{AttnShape, Error, Result};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("compile") => compile(&args[1..]),
        Some("smoke") => smoke(),
        Some("check") => check(&args[1..]),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprintln!("usage: cuda_bench compile DIR | smoke | check DIR ... | bench DIR ...");
            std::process::exit(2);
        }
    };
    match r {
        Ok(()) => {}
        Err(Error::CudaUnavailable(why)) => {
            println!("skipped: {why}");
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// `--key value` options after a positional directory.
struct Opts {
    dir: PathBuf,
    kv: BTreeMap<String, String>,
    flags: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self> {
        let dir = PathBuf::from(
            args.first()
                .ok_or_else(|| Error::Shape("missing DIR".into()))?,
        );
        let mut kv = BTreeMap::new();
        let mut flags = Vec::new();
        let mut i = 1;
        while i < args.len() {
            let a = args[i].trim_start_matches("--").to_string();
            match args.get(i + 1) {
                Some(v) if !v.starts_with("--") => {
                    kv.insert(a, v.clone());
                    i += 2;
                }
                _ => {
                    flags.push(a);
                    i += 1;
                }
            }
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Shape(format!("{}: {e}", dir.display())))?;
        Ok(Self { dir, kv, flags })
    }

    fn num(&self, key: &str, default: usize) -> Result<usize> {
        match self.kv.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| Error::Shape(format!("--{key} {v}: expected an integer"))),
        }
    }

    fn str(&self, key: &str, default: &str) -> String {
        self.kv
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
}

fn io(e: std::io::Error) -> Error {
    Error::Shape(format!("i/o: {e}"))
}

fn write_u16(path: &Path, data: &[u16]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(io)
}

fn write_u32(path: &Path, data: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(io)
}

fn write_flat(dir: &Path, f: &FlatIndex) -> Result<()> {
    write_u32(&dir.join("blk_off.u32"), &f.blk_off)?;
    write_u32(&dir.join("blk_idx.u32"), &f.blk_idx)?;
    write_u32(&dir.join("col_off.u32"), &f.col_off)?;
    write_u32(&dir.join("col_idx.u32"), &f.col_idx)
}

/// Deterministic noise in [-1, 1) (xorshift64*), `n` values from stream `seed`.
fn uniform(n: usize, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = (seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .wrapping_mul(0x2545_F491_4F6C_DD1D)
                | 1;
            for x in chunk.iter_mut() {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
                *x = (r >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            }
        });
    out
}

/// Roughly unit-variance noise: sum of three uniforms.
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let (a, b, c) = (
        uniform(n, seed),
        uniform(n, seed + 101),
        uniform(n, seed + 202),
    );
    a.iter()
        .zip(&b)
        .zip(&c)
        .map(|((x, y), z)| x + y + z)
        .collect()
}

/// Q, K, V in the shape's layout with sink, local band and vertical lines (see the module docs).
fn structured(shape: &AttnShape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, d) = (shape.seq_len, shape.head_dim);
    let mut q = noise(shape.q_heads * n * d, seed);
    let mut k = noise(shape.kv_heads * n * d, seed + 1);
    let v = noise(shape.kv_heads * n * d, seed + 2);
    // Rotary pairs on dims 8..8+2*PAIRS: frequencies from 1/16 down to 1/4096 rad per token.
    const PAIRS: usize = 12;
    let freq = |m: usize| (1.0f32 / 16.0) * (1.0f32 / 256.0).powf(m as f32 / (PAIRS - 1) as f32);
    let amp = 2.0f32;
    let lines: Vec<usize> = (0..16).map(|i| (i * 7919 + 1237) % n.max(1)).collect();
    q.par_chunks_mut(n * d).enumerate().for_each(|(h, qh)| {
        let boost = 1.0 + 0.1 * (h % 4) as f32;
        for (i, row) in qh.chunks_exact_mut(d).enumerate() {
            row[0] = 4.0 * boost; // meets the sink and the lines
            for m in 0..PAIRS {
                let a = i as f32 * freq(m);
                row[8 + 2 * m] = amp * a.cos();
                row[9 + 2 * m] = amp * a.sin();
            }
        }
    });
    k.par_chunks_mut(n * d).for_each(|kh| {
        for (j, row) in kh.chunks_exact_mut(d).enumerate() {
            row[0] = if j == 0 {
                6.0
            } else if lines.contains(&j) {
                3.5
            } else {
                0.0
            };
            for m in 0..PAIRS {
                let a = j as f32 * freq(m);
                row[8 + 2 * m] = amp * a.cos();
                row[9 + 2 * m] = amp * a.sin();
            }
        }
    });
    (q, k, v)
}

fn round_bf16(x: &mut [f32]) {
    x.par_iter_mut()
        .for_each(|v| *v = bf16_to_f32(bf16_bits(*v)));
}

fn compile(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(
        args.first()
            .ok_or_else(|| Error::Shape("missing DIR".into()))?,
    );
    std::fs::create_dir_all(&dir).map_err(io)?;
    for f in KernelFile::ALL {
        let t = std::time::Instant::now();
        let ptx = device::compile(f, "compute_90a")?;
        let name = f.file_name().replace(".cu", ".ptx");
        std::fs::write(dir.join(&name), ptx.to_src()).map_err(io)?;
        println!(
            "{}: {:.0} ms -> {name}",
            f.file_name(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// f64 reference of one output row over the computed cells of `index` (row `i` of query head `h`).
fn reference_row(
    shape: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: &[usize],
    h: usize,
    i: usize,
) -> Vec<f64> {
    let (n, d) = (shape.seq_len, shape.head_dim);
    let g = shape.kv_head_of(h);
    let qr = &q[(h * n + i) * d..(h * n + i + 1) * d];
    let scale = 1.0 / (d as f64).sqrt();
    let s: Vec<f64> = keys
        .iter()
        .map(|&j| {
            let kr = &k[(g * n + j) * d..(g * n + j + 1) * d];
            qr.iter()
                .zip(kr)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = p.iter().sum();
    let mut o = vec![0.0; d];
    for (&j, &pj) in keys.iter().zip(&p) {
        let vr = &v[(g * n + j) * d..(g * n + j + 1) * d];
        for (oc, &x) in o.iter_mut().zip(vr) {
            *oc += pj / z * f64::from(x);
        }
    }
    o
}

fn smoke() -> Result<()> {
    let sp = SparsePrefill::new(0)?;
    println!("device: {}", sp.device().describe()?);
    for (name, regs, smem, local) in sp.kernel_resources()? {
        println!("{name}: {regs} registers, {smem} B static shared, {local} B local");
    }
    for (n, hq, hkv, d) in [(300usize, 4usize, 2usize, 128usize), (130, 2, 1, 64)] {
        let shape = AttnShape {
            q_heads: hq,
            kv_heads: hkv,
            seq_len: n,
            head_dim: d,
        };
        let mut q = noise(hq * n * d, 11);
        let mut k = noise(hkv * n * d, 12);
        let mut v = noise(hkv * n * d, 13);
        round_bf16(&mut q);
        round_bf16(&mut k);
        round_bf16(&mut v);
        let (qd, kd, vd) = (
            sp.upload_bf16(&q)?,
            sp.upload_bf16(&k)?,
            sp.upload_bf16(&v)?,
        );
        let mut out = sp.zeros::<u16>(q.len())?;
        sp.fill(&mut out, 0xffff)?;
        sp.forward(&shape, &qd, &kd, &vd, Keys::Dense, &mut out)?;
        let o = sp.download(&out)?;
        let mut worst = 0.0f64;
        for h in 0..hq {
            for i in 0..n {
                let keys: Vec<usize> = (0..=i).collect();
                let r = reference_row(&shape, &q, &k, &v, &keys, h, i);
                for (c, &x) in r.iter().enumerate() {
                    let got = f64::from(bf16_to_f32(o[(h * n + i) * d + c]));
                    let e = (got - x).abs();
                    worst = if e.is_nan() {
                        f64::INFINITY
                    } else {
                        worst.max(e)
                    };
                }
            }
        }
        println!("dense n={n} hq={hq} hkv={hkv} d={d}: max abs error {worst:.3e} vs f64");
    }
    Ok(())
}

/// Per head: (columns differing, of which not near-ties, diagonals differing, of which not near-ties,
/// max column-score error, lists equal where sets are equal).
type HeadDiff = (usize, usize, usize, usize, f64, bool);

/// Per head: compares the GPU selection (prefix counts) with the CPU ranking; returns a JSON fragment.
#[allow(clippy::too_many_arguments)]
fn compare_selection(
    shape: &AttnShape,
    ctx: &PatternContext,
    q: &[f32],
    k: &[f32],
    v_budget: usize,
    s_budget: usize,
    col_cum: &[u32],
    diag_cum: &[u32],
    gpu_col: &[f32],
    gpu: &FlatIndex,
) -> Result<String> {
    let n = shape.seq_len;
    let (n_v, n_s) = vertical_slash::clamp_budgets(ctx, v_budget, s_budget);
    let heads: Vec<Result<HeadDiff>> = (0..shape.q_heads)
        .into_par_iter()
        .map(|h| {
            let g = shape.kv_head_of(h);
            let qk = HeadQk::new(
                &q[h * n * shape.head_dim..(h + 1) * n * shape.head_dim],
                &k[g * n * shape.head_dim..(g + 1) * n * shape.head_dim],
                shape.head_dim,
                n,
            )?;
            let r = vertical_slash::VsRanking::new(ctx, &qk)?;
            let sel = |cum: &[u32], j: usize| cum[h * (n + 1) + j + 1] > cum[h * (n + 1) + j];
            let mut out = (0usize, 0usize, 0usize, 0usize);
            let tie = |scores: &[f64], order: &[u32], kk: usize, x: usize| {
                let b = scores[order[kk.saturating_sub(1).min(n - 1)] as usize];
                let c = order.get(kk).map_or(b, |&o| scores[o as usize]);
                // near-tie: within 1e-3 (relative) of the boundary between selected and not selected
                let lo = c.min(b) * (1.0 - 1e-3) - 1e-7;
                let hi = b.max(c) * (1.0 + 1e-3) + 1e-7;
                scores[x] >= lo && scores[x] <= hi
            };
            let mut cpu_col = vec![false; n];
            for &j in r.columns.order.iter().take(n_v) {
                cpu_col[j as usize] = true;
            }
            let mut cpu_diag = vec![false; n];
            for &o in r.diagonals.order.iter().take(n_s) {
                cpu_diag[o as usize] = true;
            }
            for j in 0..n {
                if sel(col_cum, j) != cpu_col[j] {
                    out.0 += 1;
                    if j >= vertical_slash::FORCED_COLUMNS
                        && !tie(&r.col_scores, &r.columns.order, n_v, j)
                    {
                        out.1 += 1;
                    }
                }
                if sel(diag_cum, j) != cpu_diag[j] {
                    out.2 += 1;
                    if j >= vertical_slash::FORCED_DIAGONALS
                        && !tie(&r.diag_scores, &r.diagonals.order, n_s, j)
                    {
                        out.3 += 1;
                    }
                }
            }
            // score agreement, relative to the largest column score
            let top = r
                .col_scores
                .iter()
                .cloned()
                .fold(0.0f64, f64::max)
                .max(1e-30);
            let err = (0..n)
                .map(|j| (f64::from(gpu_col[h * n + j]) - r.col_scores[j]).abs() / top)
                .fold(0.0f64, f64::max);
            // where the selections agree, the lists must agree exactly
            let same_lists = if out.0 == 0 && out.2 == 0 {
                let cpu = r.index(ctx, v_budget, s_budget);
                (0..ctx.q_blocks()).all(|qb| {
                    gpu.key_blocks(h, qb) == cpu.key_blocks(qb)
                        && gpu.columns(h, qb) == cpu.columns(qb)
                })
            } else {
                true
            };
            Ok((out.0, out.1, out.2, out.3, err, same_lists))
        })
        .collect();
    let mut t = (0usize, 0usize, 0usize, 0usize, 0.0f64, 0usize);
    for r in heads {
        let (a, b, c, d, e, same) = r?;
        t.0 += a;
        t.1 += b;
        t.2 += c;
        t.3 += d;
        t.4 = t.4.max(e);
        t.5 += usize::from(!same);
    }
    println!(
        "  selection vs CPU: columns differ {} (not near-ties {}), diagonals differ {} (not near-ties {}), \
         max col-score error {:.2e} (rel. to max), heads with equal sets but different lists {}",
        t.0, t.1, t.2, t.3, t.4, t.5
    );
    Ok(format!(
        "{{\"col_diff\":{},\"col_diff_not_tie\":{},\"diag_diff\":{},\"diag_diff_not_tie\":{},\
         \"col_score_rel_err\":{:.3e},\"list_mismatch_heads\":{},\"pass\":{}}}",
        t.0,
        t.1,
        t.2,
        t.3,
        t.4,
        t.5,
        t.1 == 0 && t.3 == 0 && t.5 == 0
    ))
}

fn check(args: &[String]) -> Result<()> {
    let o = Opts::parse(args)?;
    let shape = AttnShape {
        q_heads: o.num("hq", 8)?,
        kv_heads: o.num("hkv", 8)?,
        seq_len: o.num("n", 1023)?,
        head_dim: o.num("d", 128)?,
    };
    shape.check()?;
    let kind = o.str("index", "dense");
    let seed = o.num("seed", 1)? as u64;
    let (vb, sb, last_q) = (o.num("v", 1000)?, o.num("s", 6096)?, o.num("last-q", 64)?);
    let n = shape.seq_len;
    let ctx = PatternContext {
        seq_len: n,
        block_q: 64,
        block_k: 64,
        last_q,
    };
    let (mut q, mut k, mut v) = if kind == "dense" {
        (
            noise(shape.q_heads * n * shape.head_dim, seed * 3),
            noise(shape.kv_heads * n * shape.head_dim, seed * 3 + 1),
            noise(shape.kv_heads * n * shape.head_dim, seed * 3 + 2),
        )
    } else {
        structured(&shape, seed * 3)
    };
    round_bf16(&mut q);
    round_bf16(&mut k);
    round_bf16(&mut v);
    let sp = SparsePrefill::new(0)?;
    let (qd, kd, vd) = (
        sp.upload_bf16(&q)?,
        sp.upload_bf16(&k)?,
        sp.upload_bf16(&v)?,
    );
    let mut out = sp.zeros::<u16>(q.len())?;
    sp.fill(&mut out, 0xffff)?; // NaN poison
    let mut extra = String::from("null");
    let flat = match kind.as_str() {
        "dense" => {
            sp.forward(&shape, &qd, &kd, &vd, Keys::Dense, &mut out)?;
            let d = dense::index(&ctx);
            FlatIndex::from_heads(n, &vec![d; shape.q_heads])?
        }
        "cpu-vs" => {
            let heads: Vec<HeadIndex> = (0..shape.q_heads)
                .into_par_iter()
                .map(|h| {
                    let qk = HeadQk::new(
                        &q[h * n * shape.head_dim..(h + 1) * n * shape.head_dim],
                        &k[shape.kv_head_of(h) * n * shape.head_dim
                            ..(shape.kv_head_of(h) + 1) * n * shape.head_dim],
                        shape.head_dim,
                        n,
                    )?;
                    // per-head budgets: vary them so every head differs
                    vertical_slash::index(&ctx, &qk, vb / (1 + h % 3), sb / (1 + h % 2))
                })
                .collect::<Result<_>>()?;
            let ix = sp.upload_index(n, &heads)?;
            sp.forward(&shape, &qd, &kd, &vd, Keys::Index(&ix), &mut out)?;
            FlatIndex::from_heads(n, &heads)?
        }
        "gpu-vs" => {
            let mut b = VerticalSlashBuilder::new(&sp, &shape, &ctx)?;
            let budgets = vec![(vb, sb); shape.q_heads];
            let mut ix = None;
            b.build(&sp, &qd, &kd, &budgets, &mut ix)?;
            let ix = ix.ok_or_else(|| Error::Cuda("no index built".into()))?;
            sp.forward(&shape, &qd, &kd, &vd, Keys::Index(&ix), &mut out)?;
            let flat = sp.download_index(&ix)?;
            let (col_cum, diag_cum) = b.selection(&sp)?;
            let (gcol, _) = b.scores(&sp)?;
            extra = compare_selection(
                &shape, &ctx, &q, &k, vb, sb, &col_cum, &diag_cum, &gcol, &flat,
            )?;
            flat
        }
        other => {
            return Err(Error::Shape(format!(
                "--index {other}: expected dense, cpu-vs or gpu-vs"
            )))
        }
    };
    let o_bits = sp.download(&out)?;
    let unwritten = o_bits.iter().filter(|&&x| x == 0xffff).count();
    let nonfinite = o_bits
        .iter()
        .filter(|&&x| !bf16_to_f32(x).is_finite())
        .count();
    let dir = &o.dir;
    let to_bits = |x: &[f32]| x.iter().map(|&y| bf16_bits(y)).collect::<Vec<u16>>();
    write_u16(&dir.join("q.bf16"), &to_bits(&q))?;
    write_u16(&dir.join("k.bf16"), &to_bits(&k))?;
    write_u16(&dir.join("v.bf16"), &to_bits(&v))?;
    write_u16(&dir.join("out.bf16"), &o_bits)?;
    write_flat(dir, &flat)?;
    let meta = format!(
        "{{\"n\":{n},\"hq\":{},\"hkv\":{},\"d\":{},\"index\":\"{kind}\",\"seed\":{seed},\"v\":{vb},\"s\":{sb},\
         \"last_q\":{last_q},\"density\":{:.5},\"unwritten\":{unwritten},\"nonfinite\":{nonfinite},\"selection\":{extra}}}",
        shape.q_heads,
        shape.kv_heads,
        shape.head_dim,
        flat.density()
    );
    std::fs::write(dir.join("meta.json"), &meta).map_err(io)?;
    println!("check {kind} n={n} hq={} hkv={} d={}: density {:.4}, unwritten {unwritten}, non-finite {nonfinite}",
        shape.q_heads, shape.kv_heads, shape.head_dim, flat.density());
    Ok(())
}

fn median(mut x: Vec<f32>) -> f32 {
    x.sort_by(f32::total_cmp);
    x.get(x.len() / 2).copied().unwrap_or(f32::NAN)
}

fn bench(args: &[String]) -> Result<()> {
    let o = Opts::parse(args)?;
    let n = o.num("n", 8192)?;
    let reps = o.num("reps", 10)?;
    let (vb, sb, last_q) = (o.num("v", 1000)?, o.num("s", 6096)?, o.num("last-q", 64)?);
    let shape = AttnShape {
        q_heads: 32,
        kv_heads: 8,
        seq_len: n,
        head_dim: 128,
    };
    let ctx = PatternContext {
        seq_len: n,
        block_q: 64,
        block_k: 64,
        last_q,
    };
    let t0 = std::time::Instant::now();
    let (q, k, v) = structured(&shape, 7 + n as u64);
    let sp = SparsePrefill::new(0)?;
    let (qd, kd, vd) = (
        sp.upload_bf16(&q)?,
        sp.upload_bf16(&k)?,
        sp.upload_bf16(&v)?,
    );
    drop((q, k, v));
    let gen_s = t0.elapsed().as_secs_f64();
    let mut out = sp.zeros::<u16>(shape.q_heads * n * 128)?;
    let mut b = VerticalSlashBuilder::new(&sp, &shape, &ctx)?;
    let budgets = vec![(vb, sb); shape.q_heads];
    let mut ix = None;
    // warm-up
    for _ in 0..2 {
        b.build(&sp, &qd, &kd, &budgets, &mut ix)?;
        let i = ix.as_ref().ok_or_else(|| Error::Cuda("no index".into()))?;
        sp.forward(&shape, &qd, &kd, &vd, Keys::Index(i), &mut out)?;
        sp.forward(&shape, &qd, &kd, &vd, Keys::Dense, &mut out)?;
    }
    sp.device().synchronize()?;
    let (mut est, mut sel, mut att, mut e2e, mut dense_t) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        est.push(sp.time_ms(|| b.estimate(&sp, &qd, &kd))?);
        sel.push(sp.time_ms(|| b.select(&sp, &budgets, &mut ix))?);
        let i = ix.as_ref().ok_or_else(|| Error::Cuda("no index".into()))?;
        att.push(sp.time_ms(|| sp.forward(&shape, &qd, &kd, &vd, Keys::Index(i), &mut out))?);
        e2e.push(sp.time_ms(|| {
            b.build(&sp, &qd, &kd, &budgets, &mut ix)?;
            let i = ix.as_ref().ok_or_else(|| Error::Cuda("no index".into()))?;
            sp.forward(&shape, &qd, &kd, &vd, Keys::Index(i), &mut out)
        })?);
    }
    let dense_reps = if n >= 131072 { 3.min(reps) } else { reps };
    for _ in 0..dense_reps {
        dense_t.push(sp.time_ms(|| sp.forward(&shape, &qd, &kd, &vd, Keys::Dense, &mut out))?);
    }
    let i = ix.as_ref().ok_or_else(|| Error::Cuda("no index".into()))?;
    let flat = sp.download_index(i)?;
    let density = flat.density();
    let kernel = sp
        .kernel_resources()?
        .get(1)
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let (est, sel, att, e2e, dense_ms) = (
        median(est),
        median(sel),
        median(att),
        median(e2e),
        median(dense_t),
    );
    let dense_flops = 2.0 * (n as f64) * (n as f64) * 128.0 * 32.0;
    let tflops = |ms: f32, frac: f64| dense_flops * frac / (f64::from(ms) * 1e-3) / 1e12;
    let mut js = String::new();
    let _ = write!(
        js,
        "{{\"n\":{n},\"q_heads\":32,\"kv_heads\":8,\"head_dim\":128,\"v\":{vb},\"s\":{sb},\"last_q\":{last_q},\
         \"reps\":{reps},\"density\":{density:.5},\"estimate_ms\":{est:.4},\"select_ms\":{sel:.4},\
         \"sparse_attn_ms\":{att:.4},\"e2e_ms\":{e2e:.4},\"dense_ms\":{dense_ms:.4},\
         \"sparse_attn_tflops_on_cells\":{:.1},\"dense_tflops\":{:.1},\"index_share\":{:.4},\
         \"entries\":[{},{}],\"device\":\"{}\",\"kernel\":\"{}\"}}",
        tflops(att, density),
        tflops(dense_ms, 1.0),
        (est + sel) / e2e,
        flat.blk_idx.len(),
        flat.col_idx.len(),
        sp.device().describe()?,
        kernel
    );
    std::fs::write(o.dir.join("bench.json"), &js).map_err(io)?;
    if o.flags.iter().any(|f| f == "write-inputs") {
        // Re-generate (cheaper than keeping 3 host copies alive) and write bf16 files for the baselines.
        let (q, k, v) = structured(&shape, 7 + n as u64);
        let to_bits = |x: &[f32]| x.par_iter().map(|&y| bf16_bits(y)).collect::<Vec<u16>>();
        write_u16(&o.dir.join("q.bf16"), &to_bits(&q))?;
        write_u16(&o.dir.join("k.bf16"), &to_bits(&k))?;
        write_u16(&o.dir.join("v.bf16"), &to_bits(&v))?;
        write_flat(&o.dir, &flat)?;
    }
    let mut so = std::io::stdout();
    let _ = writeln!(
        so,
        "bench n={n}: density {density:.4}; estimate {est:.3} ms, select {sel:.3} ms, sparse attention {att:.3} ms \
         ({:.0} TFLOP/s on computed cells), end-to-end {e2e:.3} ms (index share {:.1}%), dense {dense_ms:.3} ms \
         ({:.0} TFLOP/s); inputs {gen_s:.1} s",
        tflops(att, density),
        100.0 * (est + sel) / e2e,
        tflops(dense_ms, 1.0)
    );
    Ok(())
}
