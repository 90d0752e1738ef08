//! CUDA executor driver: kernel compilation check, device correctness cases, and the benchmark.
//!
//! ```text
//! cuda_bench compile DIR                      NVRTC only (no device): writes DIR/<kernel>.ptx
//! cuda_bench smoke                            device name, kernel resources, a small dense check
//! cuda_bench check DIR --n N --hq H --hkv K --d D --index dense|cpu-vs|cpu-vs-shared|gpu-vs|gpu-bs|gpu-ts
//!                  [--seed S] [--v V --s S --last-q L] [--topk K --cover C]
//!     fresh random inputs (structured for the *-vs indexes), NaN-poisoned output, one forward;
//!     writes q/k/v/out (bf16), the flat index (u32) and meta.json to DIR for scripts/gpu/check.py.
//!     gpu-vs also compares the GPU selection with the CPU `pattern::vertical_slash` selection;
//!     gpu-bs builds block-sparse indexes on the GPU (heads cycling through top_k K, coverage C,
//!     top_k K/4, coverage C/2) and compares them with the CPU `pattern::block_sparse` ranking;
//!     gpu-ts builds token-select indexes on the GPU (chunks of 64 / 128 / 50, keep K / 2K / K/4,
//!     local S) and compares the selected tokens with the CPU `pattern::token_select`.
//! cuda_bench plan DIR --n N [--hq H --hkv K --d D --v V --s S --topk T --local L --reps R] [--share]
//!                 [--qa]   (--qa: the A-shape heads become query-adaptive, gamma 0.9 tau 0.1)
//!     one layer of a mixed plan (vertical-slash, token-select, block-sparse, A-shape heads) through
//!     `PlanPrefill` on structured inputs: index and attention times, and where each head's index
//!     came from.
//! cuda_bench plan DIR --plan FILE --n N [--reps R] [--dense-below T]
//!     every layer of a plan file (e.g. the main job's out/plan.yaml) through `PlanPrefill` on
//!     structured inputs of its layer shape: per-layer and total index and attention times (timed
//!     forwards), then whole passes as an engine runs them (every layer queued back to back,
//!     untimed, one synchronize; host wall time) against passes of dense layers; with
//!     --dense-below, `PrefillOptions::dense_below` replaces the executor's threshold (by default
//!     the larger of the plan's and `gpu_dense_below`; `--dense-below 0` times the plan's patterns
//!     at any length).
//! cuda_bench bench DIR --n N [--reps R] [--v V --s S --last-q L] [--hq H --hkv K --d D]
//!                 [--band scattered|local] [--write-inputs]
//!     `runtime::exec::cuda::bench::measure` at one length (by default 32 query heads, 8 KV heads,
//!     head_dim 128, vertical-slash v=1000 s=6096 last_q=64 on structured inputs); writes
//!     DIR/bench.json (and inputs + index for scripts/gpu/baselines.py with --write-inputs).
//!     `attnplan bench --device cuda` runs the same measurement over several lengths with the
//!     baselines.
//! ```
//!
//! Structured inputs and the timing are in `runtime::exec::cuda::bench`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use runtime::exec::cuda::bench::{self, noise, structured, write_index, write_u16, BenchConfig};
use runtime::exec::cuda::plan_bench::LayerBuffers;
use runtime::exec::cuda::{
    bf16_bits, bf16_to_f32, device, BlockChoice, BlockSparseBuilder, FlatIndex, KernelFile, Keys,
    SparsePrefill, TokenChoice, TokenSelectBuilder, VerticalSlashBuilder,
};
use runtime::pattern::block_sparse::BlockRanking;
use runtime::pattern::{dense, vertical_slash, HeadIndex, HeadQk, PatternContext};
use runtime::{AttnShape, Error, Result};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    let r = match args.first().map(String::as_str) {
        Some("compile") => compile(&args[1..]),
        Some("smoke") => smoke(),
        Some("check") => check(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("plan") => plan_bench(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
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

const USAGE: &str =
    "usage: cuda_bench compile DIR | smoke | check DIR ... | plan DIR ... | bench DIR ...
(the options of each command are in the header of runtime/examples/cuda_bench.rs)";

/// The positional output directory: present, and not an option (`cuda_bench bench --n 8192` would
/// otherwise create a folder named `--n`).
fn dir_arg(args: &[String]) -> Result<PathBuf> {
    match args.first() {
        Some(d) if !d.starts_with('-') => Ok(PathBuf::from(d)),
        Some(d) => Err(Error::Shape(format!(
            "expected the output DIR first, found the option {d}"
        ))),
        None => Err(Error::Shape("missing DIR".into())),
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
        let dir = dir_arg(args)?;
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
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
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

    fn float(&self, key: &str, default: f64) -> Result<f64> {
        match self.kv.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| Error::Shape(format!("--{key} {v}: expected a number"))),
        }
    }

    fn str(&self, key: &str, default: &str) -> String {
        self.kv
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
}

/// Maps an I/O error on `path` into the runtime's error.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn round_bf16(x: &mut [f32]) {
    x.par_iter_mut()
        .for_each(|v| *v = bf16_to_f32(bf16_bits(*v)));
}

fn compile(args: &[String]) -> Result<()> {
    let dir = dir_arg(args)?;
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    for f in KernelFile::ALL {
        let t = std::time::Instant::now();
        let ptx = device::compile(f, "compute_90a")?;
        let name = f.file_name().replace(".cu", ".ptx");
        let path = dir.join(&name);
        std::fs::write(&path, ptx.to_src()).map_err(io(&path))?;
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

/// Relative agreement below which two f64 estimates (or a cumulative mass and the coverage) count as
/// a near-tie: the GPU's exp and summation order differ from the CPU's in the last bits only.
const NEAR: f64 = 1e-12;

/// Per head: compares the GPU token selection with the CPU's `pattern::token_select` (f64 vertical
/// scores): a differing token is a near-tie when its score is within 1e-5 (of the chunk's top score)
/// of the chunk's boundary score, or when its chunk keeps a different count and the chunk's summed
/// score is within 1e-5 of another chunk's (the spread's ranking). Also counts differing lists.
#[allow(clippy::too_many_arguments)]
fn compare_tokens(
    shape: &AttnShape,
    ctx: &PatternContext,
    q: &[f32],
    k: &[f32],
    pats: &[schemas::TokenSelect],
    sel: &[u32],
    flat: &FlatIndex,
) -> Result<String> {
    use runtime::pattern::token_select;
    let (n, d) = (shape.seq_len, shape.head_dim);
    let per_head: Vec<(usize, usize, usize)> = (0..shape.q_heads)
        .into_par_iter()
        .map(|h| -> Result<(usize, usize, usize)> {
            let g = shape.kv_head_of(h);
            let qk = HeadQk::new(
                &q[h * n * d..(h + 1) * n * d],
                &k[g * n * d..(g + 1) * n * d],
                d,
                n,
            )?;
            let (col, _) = vertical_slash::estimate(ctx, &qk)?;
            let p = &pats[h];
            let block = (p.block as usize).max(1);
            let keep = ctx.resolve(&p.keep).min(block);
            let keeps = token_select::chunk_keeps(&col, block, keep, p.spread);
            let chosen = token_select::select(&col, block, keep, p.spread);
            let mut cpu = vec![false; n];
            chosen.iter().for_each(|&j| cpu[j] = true);
            let sums: Vec<f64> = col.chunks(block).map(|c| c.iter().sum()).collect();
            let (mut diff, mut not_tie) = (0, 0);
            for (c, chunk) in col.chunks(block).enumerate() {
                let j0 = c * block;
                let differing: Vec<usize> = (j0..j0 + chunk.len())
                    .filter(|&j| cpu[j] != (sel[h * n + j] != 0))
                    .collect();
                if differing.is_empty() {
                    continue;
                }
                diff += differing.len();
                let mut sorted = chunk.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let top = sorted
                    .first()
                    .copied()
                    .unwrap_or(0.0)
                    .max(f64::MIN_POSITIVE);
                let boundary = sorted
                    .get(keeps[c].saturating_sub(1))
                    .copied()
                    .unwrap_or(0.0);
                let gpu_count = (j0..j0 + chunk.len())
                    .filter(|&j| sel[h * n + j] != 0)
                    .count();
                let sum_tie = sums
                    .iter()
                    .enumerate()
                    .any(|(o, &s)| o != c && (s - sums[c]).abs() <= 1e-5 * sums[c].abs());
                let ok = if gpu_count != keeps[c] {
                    sum_tie
                } else {
                    differing
                        .iter()
                        .all(|&j| (col[j] - boundary).abs() <= 1e-5 * top)
                };
                if !ok {
                    not_tie += differing.len();
                }
            }
            let want = token_select::index(ctx, &qk, p)?;
            let lists = (0..ctx.q_blocks())
                .filter(|&qb| {
                    let e = h * flat.q_blocks + qb;
                    let blk = &flat.blk_idx[flat.blk_off[e] as usize..flat.blk_off[e + 1] as usize];
                    let cols =
                        &flat.col_idx[flat.col_off[e] as usize..flat.col_off[e + 1] as usize];
                    blk != want.key_blocks(qb) || cols != want.columns(qb)
                })
                .count();
            Ok((diff, not_tie, lists))
        })
        .collect::<Result<_>>()?;
    let diff: usize = per_head.iter().map(|x| x.0).sum();
    let not_tie: usize = per_head.iter().map(|x| x.1).sum();
    let lists: usize = per_head.iter().map(|x| x.2).sum();
    println!(
        "token selection vs CPU: {diff} tokens differ, {not_tie} not at a near-tie; {lists} of {} \
         lists differ",
        shape.q_heads * ctx.q_blocks()
    );
    Ok(format!(
        "{{\"token_diff\":{diff},\"token_diff_not_tie\":{not_tie},\"list_diff\":{lists},\"pass\":{}}}",
        not_tie == 0
    ))
}

/// Per (head, query block): compares the GPU block-sparse lists with the CPU ranking of
/// `pattern::block_sparse`; a differing list is a near-tie when the blocks that differ have the
/// estimate of the boundary block (within [`NEAR`]) and, for coverage, a different count only moves
/// across blocks of negligible mass with the cumulative mass at the coverage. Returns a JSON fragment.
fn compare_blocks(
    shape: &AttnShape,
    ctx: &PatternContext,
    q: &[f32],
    k: &[f32],
    choices: &[BlockChoice],
    flat: &FlatIndex,
) -> Result<String> {
    let (n, d) = (shape.seq_len, shape.head_dim);
    let per_head: Vec<(usize, usize)> = (0..shape.q_heads)
        .into_par_iter()
        .map(|h| -> Result<(usize, usize)> {
            let g = shape.kv_head_of(h);
            let qk = HeadQk::new(&q[h * n * d..(h + 1) * n * d], &k[g * n * d..(g + 1) * n * d], d, n)?;
            let r = BlockRanking::new(ctx, &qk)?;
            let (mut diff, mut not_tie) = (0, 0);
            for qb in 0..ctx.q_blocks() {
                let e = h * flat.q_blocks + qb;
                let got = &flat.blk_idx[flat.blk_off[e] as usize..flat.blk_off[e + 1] as usize];
                let (order, est) = (r.order(qb), r.estimated_mass(qb));
                let cc = r.count(qb, choices[h]);
                let mut want = order[..cc].to_vec();
                want.sort_unstable();
                if want == got {
                    continue;
                }
                diff += 1;
                let gc = got.len().min(order.len());
                let cum = |j: usize| est[..j].iter().sum::<f64>();
                let count_ok = gc == cc
                    || matches!(choices[h], BlockChoice::Coverage(c) | BlockChoice::CoverageAtLeast(c, _)
                        if (cum(gc) - cum(cc)).abs() <= NEAR && (cum(cc.min(gc)) - c).abs() <= NEAR);
                let mut lead = order[..gc].to_vec();
                lead.sort_unstable();
                let boundary = if gc > 0 { est[gc - 1] } else { 0.0 };
                let est_of = |kb: u32| {
                    order.iter().position(|&o| o == kb).map_or(f64::NAN, |i| est[i])
                };
                let set_ok = got
                    .iter()
                    .filter(|kb| lead.binary_search(kb).is_err())
                    .chain(lead.iter().filter(|kb| got.binary_search(kb).is_err()))
                    .all(|&kb| (est_of(kb) - boundary).abs() <= NEAR * boundary.abs().max(f64::MIN_POSITIVE));
                if !(count_ok && set_ok) {
                    not_tie += 1;
                    if not_tie <= 3 {
                        eprintln!(
                            "head {h} query block {qb} ({:?}): GPU {} blocks, CPU {cc}; GPU {:?}, CPU {:?}",
                            choices[h],
                            got.len(),
                            &got[..got.len().min(12)],
                            &want[..want.len().min(12)]
                        );
                    }
                }
            }
            Ok((diff, not_tie))
        })
        .collect::<Result<_>>()?;
    let diff: usize = per_head.iter().map(|x| x.0).sum();
    let not_tie: usize = per_head.iter().map(|x| x.1).sum();
    println!(
        "block-sparse selection vs CPU: {} of {} lists differ, {not_tie} not at a near-tie",
        diff,
        shape.q_heads * ctx.q_blocks()
    );
    Ok(format!(
        "{{\"list_diff\":{diff},\"list_diff_not_tie\":{not_tie},\"lists\":{},\"pass\":{}}}",
        shape.q_heads * ctx.q_blocks(),
        not_tie == 0
    ))
}

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
        structured(&shape, seed * 3)?
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
        "cpu-vs" | "cpu-vs-shared" => {
            // shared: heads 2p and 2p+1 use head 2p's index (KV-group sharing; with an even GQA
            // group the head_dim-128 kernel then pairs them in one CTA)
            let shared = kind == "cpu-vs-shared";
            let heads: Vec<HeadIndex> = (0..shape.q_heads)
                .into_par_iter()
                .map(|h| {
                    let h = if shared { h & !1 } else { h };
                    let qk = HeadQk::new(
                        &q[h * n * shape.head_dim..(h + 1) * n * shape.head_dim],
                        &k[shape.kv_head_of(h) * n * shape.head_dim
                            ..(shape.kv_head_of(h) + 1) * n * shape.head_dim],
                        shape.head_dim,
                        n,
                    )?;
                    // per-head budgets: vary them so every head (pair) differs
                    vertical_slash::index(&ctx, &qk, vb / (1 + h % 3), sb / (1 + h % 2))
                })
                .collect::<Result<_>>()?;
            let ix = sp.upload_index(n, &heads)?;
            sp.forward(&shape, &qd, &kd, &vd, Keys::Index(&ix), &mut out)?;
            if shared {
                let ms = bench::median_ms(&sp, 5, || {
                    sp.forward(&shape, &qd, &kd, &vd, Keys::Index(&ix), &mut out)
                })?;
                println!("attention over shared indexes: {ms:.3} ms (median of 5)");
            }
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
        "gpu-bs" => {
            // per-head choices cycling through both kinds and two settings each
            let (top, cover) = (o.num("topk", 16)?, o.float("cover", 0.9)?);
            let choices: Vec<BlockChoice> = (0..shape.q_heads)
                .map(|h| match h % 4 {
                    0 => BlockChoice::TopK(top),
                    1 => BlockChoice::Coverage(cover),
                    2 => BlockChoice::TopK((top / 4).max(1)),
                    _ => BlockChoice::Coverage(cover / 2.0),
                })
                .collect();
            let mut b = BlockSparseBuilder::new(&sp, &shape, &ctx)?;
            let mut ix = None;
            b.build(&sp, &qd, &kd, &choices, &mut ix)?;
            let ix = ix.ok_or_else(|| Error::Cuda("no index built".into()))?;
            sp.forward(&shape, &qd, &kd, &vd, Keys::Index(&ix), &mut out)?;
            let mut again = None; // a second index, its buffers reused by every timed build
            b.build(&sp, &qd, &kd, &choices, &mut again)?;
            let ms = bench::median_ms(&sp, 5, || b.build(&sp, &qd, &kd, &choices, &mut again))?;
            let att = bench::median_ms(&sp, 5, || {
                sp.forward(&shape, &qd, &kd, &vd, Keys::Index(&ix), &mut out)
            })?;
            println!(
                "block-sparse index build: {ms:.3} ms, attention over it {att:.3} ms (medians of 5)"
            );
            let flat = sp.download_index(&ix)?;
            extra = compare_blocks(&shape, &ctx, &q, &k, &choices, &flat)?;
            flat
        }
        "gpu-ts" => {
            // heads cycle through chunks of 64 keeping --topk (no spread), 128 with a spread of 1,
            // 50 keeping a quarter; sink 64 and local --s tokens
            let top = o.num("topk", 8)?;
            let pats: Vec<schemas::TokenSelect> = (0..shape.q_heads)
                .map(|h| {
                    let (block, keep, spread) = match h % 3 {
                        0 => (64, top, 0.0),
                        1 => (128, 2 * top, 1.0),
                        _ => (50, (top / 4).max(1), 0.5),
                    };
                    schemas::TokenSelect {
                        block,
                        keep: schemas::Budget::Fixed(keep as u64),
                        spread,
                        sink: schemas::Budget::Fixed(64),
                        local: schemas::Budget::Fixed(sb as u64),
                    }
                })
                .collect();
            let choices = pats
                .iter()
                .map(|p| TokenChoice::from_pattern(p, &ctx).map(Some))
                .collect::<Result<Vec<_>>>()?;
            let mut vsb = VerticalSlashBuilder::new(&sp, &shape, &ctx)?;
            let mut tsb = TokenSelectBuilder::new(&sp, &shape)?;
            let mut ix = None;
            vsb.estimate(&sp, &qd, &kd)?;
            tsb.build_heads(&sp, &vsb, &choices, &mut ix)?;
            let ix = ix.ok_or_else(|| Error::Cuda("no index built".into()))?;
            sp.forward(&shape, &qd, &kd, &vd, Keys::Index(&ix), &mut out)?;
            let mut again = None;
            let ms = bench::median_ms(&sp, 5, || {
                vsb.estimate(&sp, &qd, &kd)?;
                tsb.build_heads(&sp, &vsb, &choices, &mut again)
            })?;
            println!("token-select index build (estimate included): {ms:.3} ms (median of 5)");
            let flat = sp.download_index(&ix)?;
            let sel = tsb.selected(&sp)?;
            extra = compare_tokens(&shape, &ctx, &q, &k, &pats, &sel, &flat)?;
            flat
        }
        other => {
            return Err(Error::Shape(format!(
                "--index {other}: expected dense, cpu-vs, cpu-vs-shared, gpu-vs, gpu-bs or gpu-ts"
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
    write_index(dir, &flat)?;
    let meta = format!(
        "{{\"n\":{n},\"hq\":{},\"hkv\":{},\"d\":{},\"index\":\"{kind}\",\"seed\":{seed},\"v\":{vb},\"s\":{sb},\
         \"last_q\":{last_q},\"density\":{:.5},\"unwritten\":{unwritten},\"nonfinite\":{nonfinite},\"selection\":{extra}}}",
        shape.q_heads,
        shape.kv_heads,
        shape.head_dim,
        flat.density()
    );
    let path = dir.join("meta.json");
    std::fs::write(&path, &meta).map_err(io(&path))?;
    println!("check {kind} n={n} hq={} hkv={} d={}: density {:.4}, unwritten {unwritten}, non-finite {nonfinite}",
        shape.q_heads, shape.kv_heads, shape.head_dim, flat.density());
    Ok(())
}

/// `cuda_bench plan`: one layer of a mixed plan through `PlanPrefill` on the benchmark's structured
/// inputs: heads cycle through vertical-slash (v, s), token-select (chunks of 64, keep 8, spread 1,
/// sink 64, local `--local`), block-sparse (`top_k` = `--topk`) and A-shape (sink 64, local
/// `--local`); prints the index and attention times (medians) and the sources of the heads' indexes.
fn plan_bench(args: &[String]) -> Result<()> {
    let o = Opts::parse(args)?;
    if o.kv.contains_key("plan") {
        return plan_file_bench(&o);
    }
    let (n, hq, hkv, d) = (
        o.num("n", 32768)?,
        o.num("hq", bench::Q_HEADS)?,
        o.num("hkv", bench::KV_HEADS)?,
        o.num("d", bench::HEAD_DIM)?,
    );
    let (v, s, top, local, reps) = (
        o.num("v", 1000)?,
        o.num("s", 6096)?,
        o.num("topk", 256)?,
        o.num("local", 4096)?,
        o.num("reps", 5)?,
    );
    let shape = AttnShape {
        q_heads: hq,
        kv_heads: hkv,
        seq_len: n,
        head_dim: d,
    };
    shape.check()?;
    // the fixture's model and defaults, embedded (the binary runs away from the repository)
    let fixture = Path::new("fixtures/plans/valid/every-kind.yaml");
    let mut plan = schemas::Plan::from_yaml(
        fixture,
        include_str!("../../fixtures/plans/valid/every-kind.yaml"),
    )
    .map_err(|e| Error::Shape(e.to_string()))?;
    plan.model.layers = 1;
    plan.model.query_heads = hq as u32;
    plan.model.kv_heads = hkv as u32;
    plan.model.head_dim = d as u32;
    plan.model.max_context = n as u64;
    plan.defaults.share_kv_group_indexes = o.flags.iter().any(|f| f == "share");
    let qa = o.flags.iter().any(|f| f == "qa");
    let fixed = |x: usize| schemas::Budget::Fixed(x as u64);
    let template = plan.layers[0].heads[0].clone();
    plan.layers = vec![schemas::LayerPlan {
        layer: 0,
        heads: (0..hq)
            .map(|h| schemas::HeadPlan {
                head: h as u32,
                pattern: match h % 4 {
                    0 => schemas::Pattern::VerticalSlash(schemas::VerticalSlash {
                        vertical: fixed(v),
                        slash: fixed(s),
                    }),
                    1 => schemas::Pattern::TokenSelect(schemas::TokenSelect {
                        block: 64,
                        keep: fixed(8),
                        spread: 1.0,
                        sink: fixed(64),
                        local: fixed(local),
                    }),
                    2 => schemas::Pattern::BlockSparse(schemas::BlockSparse {
                        top_k: Some(fixed(top)),
                        coverage: None,
                    }),
                    _ if qa => schemas::Pattern::QueryAdaptive(schemas::QueryAdaptive {
                        gamma: 0.9,
                        tau: 0.1,
                        min_budget: fixed(2),
                    }),
                    _ => schemas::Pattern::AShape(schemas::AShape {
                        sink: fixed(64),
                        local: fixed(local),
                    }),
                },
                ..template.clone()
            })
            .collect(),
    }];
    let sp = SparsePrefill::new(0)?;
    let options = runtime::PrefillOptions::default();
    let mut pp = runtime::exec::cuda::PlanPrefill::new(&sp, &plan, &plan.model, options)?;
    pp.set_timing(true);
    let LayerBuffers {
        q: qd,
        k: kd,
        v: vd,
        mut out,
    } = LayerBuffers::new(&sp, &shape)?;
    let mut runs = Vec::new();
    for _ in 0..reps + 2 {
        runs.push(pp.forward(&sp, 0, &shape, &qd, &kd, &vd, &mut out)?);
    }
    let flat = sp.download_index(
        pp.last_index()
            .ok_or_else(|| Error::Cuda("no index".into()))?,
    )?;
    let timed = &runs[2..];
    let index_ms = bench::median(timed.iter().map(|r| r.index_ms.unwrap_or(0.0)).collect());
    let attn_ms = bench::median(
        timed
            .iter()
            .map(|r| r.attention_ms.unwrap_or(0.0))
            .collect(),
    );
    let dense_ms = bench::median_ms(&sp, reps.min(3), || {
        sp.forward(&shape, &qd, &kd, &vd, Keys::Dense, &mut out)
    })?;
    let r = &runs[runs.len() - 1];
    println!(
        "plan n={n} {hq}x{hkv}x{d}: density {:.4}; index {index_ms:.3} ms, attention {attn_ms:.3} ms, \
         total {:.3} ms (index share {:.1}%), dense {dense_ms:.3} ms; heads: GPU vertical-slash {}, \
         GPU block-sparse {}, GPU token-select {}, GPU query-adaptive {}, host static {}, shared {}",
        flat.density(),
        index_ms + attn_ms,
        100.0 * index_ms / (index_ms + attn_ms),
        r.gpu_vertical_slash,
        r.gpu_block_sparse,
        r.gpu_token_select,
        r.gpu_query_adaptive,
        r.host_static,
        r.shared
    );
    Ok(())
}

/// `cuda_bench plan DIR --plan FILE --n N [--reps R] [--dense-below T]`: every layer of a plan file
/// (e.g. the main job's `out/plan.yaml`) through `PlanPrefill` on structured inputs of the plan's
/// layer shape (`runtime::exec::cuda::plan_bench::time_plan`, as `attnplan bench --device cuda
/// --plan FILE` runs it); prints per-layer and total index and attention times, the dense time of
/// one layer, whole passes, and where the heads' indexes came from.
fn plan_file_bench(o: &Opts) -> Result<()> {
    let path = PathBuf::from(o.str("plan", ""));
    let plan = match schemas::Plan::read(&path) {
        Ok(plan) => plan,
        Err(e) => {
            // the plan's own error names the file and the field
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let n = o.num("n", 8192)?;
    let options = runtime::PrefillOptions {
        dense_below: match o.kv.contains_key("dense-below") {
            true => Some(o.num("dense-below", 0)? as u64),
            false => None,
        },
        ..runtime::PrefillOptions::default()
    };
    let sp = SparsePrefill::new(0)?;
    let t = runtime::exec::cuda::plan_bench::time_plan(&sp, &plan, n, o.num("reps", 3)?, options)?;
    for (layer, l) in t.layers.iter().enumerate() {
        println!(
            "layer {layer:>2}: index {:.3} ms, attention {:.3} ms, entries {:?}, dense {:?}{}",
            l.index_ms,
            l.attention_ms,
            l.entries,
            l.dense,
            if l.dense_faster {
                " (after its index)"
            } else {
                ""
            }
        );
    }
    println!(
        "pass at n={n} ({} layers back to back, untimed, one synchronize; wall ms, median of {}): \
         plan {:.3}, dense {:.3}",
        t.layers.len(),
        t.reps,
        t.plan_pass_ms,
        t.dense_pass_ms
    );
    let (index_ms, attn_ms) = (t.index_ms(), t.attention_ms());
    let entries: usize = t.layers.iter().map(|l| l.entries.0 + l.entries.1).sum();
    println!(
        "plan {} at n={n}: {} layers, index {index_ms:.3} ms + attention {attn_ms:.3} ms = {:.3} ms \
         (index share {:.1}%); dense {:.3} ms ({:.3} per layer); {entries} index entries; \
         heads: GPU vertical-slash {}, block-sparse {}, token-select {}, query-adaptive {}, host \
         static {}",
        path.display(),
        t.layers.len(),
        index_ms + attn_ms,
        100.0 * index_ms / (index_ms + attn_ms).max(f32::MIN_POSITIVE),
        t.dense_layer_ms * t.layers.len() as f32,
        t.dense_layer_ms,
        t.heads[0],
        t.heads[1],
        t.heads[2],
        t.heads[3],
        t.heads[4]
    );
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let o = Opts::parse(args)?;
    let cfg = BenchConfig {
        reps: o.num("reps", 10)?,
        vertical: o.num("v", 1000)?,
        slash: o.num("s", 6096)?,
        last_q: o.num("last-q", 64)?,
        q_heads: o.num("hq", bench::Q_HEADS)?,
        kv_heads: o.num("hkv", bench::KV_HEADS)?,
        head_dim: o.num("d", bench::HEAD_DIM)?,
        band: o.str("band", "scattered").parse().map_err(Error::Shape)?,
        ..BenchConfig::new(o.num("n", 8192)?)
    };
    let sp = SparsePrefill::new(0)?;
    let (result, flat) = bench::measure(&sp, &cfg)?;
    if o.flags.iter().any(|f| f == "write-inputs") {
        bench::write_inputs(&o.dir, &result, &flat)?;
    } else {
        let path = o.dir.join("bench.json");
        std::fs::write(&path, result.to_json()).map_err(io(&path))?;
    }
    println!("{}", result.summary());
    Ok(())
}
