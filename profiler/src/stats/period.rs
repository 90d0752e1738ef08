//! Periods in attention: the strides at which a head's attention repeats (video frames, image rows,
//! fixed-length records), found so that the grid family is searched where the data has one.
//!
//! Per head, the exact attention of the last rows is summed by diagonal offset `o = i - j` and by
//! column `j` ([`head_period`]; the sink block is left out, the grid computes it anyway). A period `P`
//! shows as a comb on the offsets: mass at `P, 2P, 3P, …` well above the mass half-way between the
//! teeth. Each tooth `mP` is compared with the mean of the two midpoints beside it, `(m ∓ ½)P`; taking
//! both sides keeps a head whose attention merely decays with distance at a ratio of at most about 1
//! (a convex decreasing profile is never above the mean of its neighbours). The contrast of a stride
//! is the lower quartile of its teeth's ratios, so every tooth must stand out, not a few: a fraction
//! `P/k` of a period has most of its teeth off the comb and fails, an even multiple has its midpoints
//! on teeth and fails, an odd multiple passes like the period itself. A head takes the smallest stride
//! that passes ([`PeriodSearch::min_contrast`], [`PeriodSearch::min_mass`]), or, when teeth are wide
//! enough for strides just short of the period to pass, the most contrasted stride up to half as long
//! again. Ripples between a period's teeth can still let a fraction `P/k` pass (a sharp peak built
//! from a few harmonics has them); then most of that stride's teeth mass sits on every `k`-th tooth
//! rather than `1/k` of it, and the head takes `P` instead. Its phase is where its column mass,
//! folded modulo the stride, peaks.
//!
//! [`detect`] keeps the strides enough heads agree on. A stride shorter than a query block plus a key
//! block is reported but not searched: every tile of the grid's diagonals would be computed (see
//! `runtime::pattern::grid`), so the grid would be dense.

use rayon::prelude::*;
use runtime::AttentionInput;
use serde::{Deserialize, Serialize};

use super::tile::{PackedKeys, RowBlock};
use super::StatsConfig;
use crate::Result;

/// Fewest teeth a stride is judged on.
pub const MIN_TEETH: usize = 3;
/// Largest `k` for which a stride is checked for being the fraction `P/k` of a longer period.
pub const MAX_FRACTION: usize = 8;

/// What counts as a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeriodSearch {
    /// Last rows whose attention is summed (rounded out to whole query blocks).
    pub rows: usize,
    /// Smallest contrast (teeth over midpoints) for a head to have a period.
    pub min_contrast: f64,
    /// Smallest share of the rows' attention on the teeth.
    pub min_mass: f64,
    /// Smallest share of all heads that must agree on a stride.
    pub min_heads: f64,
    /// At most this many strides are kept (most heads first).
    pub max_periods: usize,
}

impl Default for PeriodSearch {
    /// The last 256 rows; contrast 4; 5% of the attention on the teeth; 2% of the heads; 2 periods.
    fn default() -> Self {
        Self {
            rows: 256,
            min_contrast: 4.0,
            min_mass: 0.05,
            min_heads: 0.02,
            max_periods: 2,
        }
    }
}

/// A head's period.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadPeriod {
    pub stride: usize,
    /// Lower quartile of its teeth's ratios to their midpoints.
    pub contrast: f64,
    /// Share of the rows' attention on the teeth.
    pub mass: f64,
    /// The head's column mass folded modulo `stride`, summing to 1 (all zeros without column mass).
    pub fold: Vec<f64>,
}

/// A period enough heads agree on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Period {
    /// Tokens.
    pub stride: u32,
    /// Column of the first period's peak (`< stride`).
    pub phase: u32,
    /// Heads with this period.
    pub heads: u32,
    /// Median contrast of those heads.
    pub contrast: f64,
    /// Whether grid candidates were searched at it (false: too short for a grid, or beyond the
    /// number of periods kept).
    pub searched: bool,
}

/// What a period search looked at and found; kept in the profile's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeriodReport {
    /// The sample searched.
    pub sample: String,
    /// Its last rows summed.
    pub rows: u32,
    /// Strides from `strides[0]` up are searched as grids; candidates are tried up to `strides[1]`.
    pub strides: [u32; 2],
    pub heads: u32,
    pub found: Vec<Period>,
}

/// Each query head's period in one layer's input (`None`: no period), from the exact attention of
/// the last `search.rows` rows.
pub fn layer_periods(
    input: &AttentionInput<'_>,
    cfg: &StatsConfig,
    search: &PeriodSearch,
) -> Result<Vec<Option<HeadPeriod>>> {
    let shape = input.shape;
    let (ctx, packed) = PackedKeys::pack_layer(input, cfg)?;
    let (n, d) = (shape.seq_len, shape.head_dim);
    let nqb = ctx.q_blocks();
    let first = first_block(n, ctx.block_q, search.rows);
    (0..shape.q_heads)
        .into_par_iter()
        .map(|h| {
            let mut rb = RowBlock::new(d, ctx.block_q, ctx.block_k);
            let (mut diag, mut cols) = (vec![0.0f64; n], vec![0.0f64; n]);
            let mut rows = 0usize;
            for qb in first..nqb {
                rb.compute(input.q_head(h), &packed[shape.kv_head_of(h)], qb)?;
                let rr = rb.rows();
                rows += rr.len();
                let stride = rb.stride();
                // The sink block is left out: the grid always computes it.
                for kb in 1..rb.k_blocks() {
                    let c0 = ctx.k_cols(kb).start;
                    let tile = rb.tile(kb);
                    for (r, &il) in rb.inv_l().iter().enumerate().take(rr.len()) {
                        let i = rr.start + r;
                        let nv = rb.visible(r, kb);
                        for (c, &e) in tile[r * stride..r * stride + nv].iter().enumerate() {
                            let p = f64::from(e * il);
                            diag[i - (c0 + c)] += p;
                            cols[c0 + c] += p;
                        }
                    }
                }
            }
            Ok(head_period(&diag, &cols, rows, ctx.block_k, search))
        })
        .collect()
}

/// First query block of the last `rows` rows of `seq_len`, rounded out to whole blocks of `block_q`.
fn first_block(seq_len: usize, block_q: usize, rows: usize) -> usize {
    let block_q = block_q.max(1);
    seq_len
        .div_ceil(block_q)
        .saturating_sub(rows.div_ceil(block_q))
}

/// How many rows [`layer_periods`] sums at `seq_len` when asked for the last `rows`.
pub fn rows_searched(seq_len: usize, block_q: usize, rows: usize) -> usize {
    seq_len - first_block(seq_len, block_q, rows) * block_q.max(1)
}

/// The period of one head from its attention summed over `rows` rows by diagonal offset (`diag[o]`)
/// and by column (`cols[j]`), columns before `skip_cols` excluded from the phase.
pub fn head_period(
    diag: &[f64],
    cols: &[f64],
    rows: usize,
    skip_cols: usize,
    search: &PeriodSearch,
) -> Option<HeadPeriod> {
    let n = diag.len();
    let total: f64 = diag.iter().sum();
    if rows == 0 || total <= 0.0 {
        return None;
    }
    // Midpoints of zero mass would make any tooth infinitely contrasted: floor them at a millionth
    // of the mean offset's mass.
    let floor = 1e-6 * total / n as f64;
    let mut ratios = Vec::new();
    let mut judge = |p: usize| -> Option<(usize, f64, f64)> {
        ratios.clear();
        let mut teeth = 0.0;
        let mut m = 1;
        while m * p + p / 2 < n {
            let mid = 0.5 * (diag[m * p - p / 2] + diag[m * p + p / 2]);
            teeth += diag[m * p];
            ratios.push(diag[m * p] / (mid + floor));
            m += 1;
        }
        if ratios.len() < MIN_TEETH {
            return None;
        }
        ratios.sort_by(f64::total_cmp);
        let contrast = ratios[ratios.len() / 4];
        (contrast >= search.min_contrast && teeth / rows as f64 >= search.min_mass)
            .then_some((p, contrast, teeth))
    };
    let first = (2..=n / 3).find_map(&mut judge)?;
    // Wide teeth let strides just short of the period pass too (their first teeth still sit on the
    // comb's): of the strides up to half as long again, the most contrasted is the period.
    let mut best = (first.0 + 1..=(first.0 + first.0 / 2).min(n / 3))
        .filter_map(&mut judge)
        .fold(first, |b, c| if c.1 > b.1 { c } else { b });
    // A fraction P/k of the period can pass when the attention between the period's teeth has
    // ripples of its own: then the teeth at multiples of P hold most of the fraction's mass, not 1/k.
    'climb: loop {
        let p = best.0;
        for k in 2..=MAX_FRACTION {
            let q = k * p;
            // q's teeth (at least MIN_TEETH of them) and p's over the same offsets.
            let end = n.saturating_sub(q / 2);
            if MIN_TEETH * q >= end {
                break;
            }
            let last = (end - 1) / q * q;
            let on_q: f64 = (q..=last).step_by(q).map(|o| diag[o]).sum();
            let on_p: f64 = (p..=last).step_by(p).map(|o| diag[o]).sum();
            if on_q >= 0.5 * (1.0 + 1.0 / k as f64) * on_p {
                if let Some(c) = judge(q) {
                    best = c;
                    continue 'climb;
                }
            }
        }
        break;
    }
    let (stride, contrast, teeth) = best;
    let mass = teeth / rows as f64;
    let mut fold = vec![0.0; stride];
    for (j, &c) in cols.iter().enumerate().skip(skip_cols) {
        fold[j % stride] += c;
    }
    let sum: f64 = fold.iter().sum();
    if sum > 0.0 {
        fold.iter_mut().for_each(|x| *x /= sum);
    }
    Some(HeadPeriod {
        stride,
        contrast,
        mass,
        fold,
    })
}

/// The strides at least `search.min_heads` of the heads of `per_head` (one entry per head searched)
/// agree on (at least 2 heads), most heads first, each with the phase where the agreeing heads'
/// folded column mass peaks. Periods of at least `min_grid` tokens are marked `searched`, up to
/// `search.max_periods` of them.
pub fn detect(
    per_head: &[Option<HeadPeriod>],
    min_grid: usize,
    search: &PeriodSearch,
) -> Vec<Period> {
    let mut strides: Vec<usize> = per_head.iter().flatten().map(|h| h.stride).collect();
    strides.sort_unstable();
    strides.dedup();
    let need = ((search.min_heads * per_head.len() as f64).ceil() as usize).max(2);
    let mut found: Vec<Period> = strides
        .into_iter()
        .filter_map(|stride| {
            let agree: Vec<&HeadPeriod> = per_head
                .iter()
                .flatten()
                .filter(|h| h.stride == stride)
                .collect();
            if agree.len() < need {
                return None;
            }
            let mut fold = vec![0.0; stride];
            for h in &agree {
                fold.iter_mut().zip(&h.fold).for_each(|(a, b)| *a += b);
            }
            // First column of the largest folded mass (ties: the earliest).
            let phase = fold
                .iter()
                .enumerate()
                .fold((0, f64::MIN), |b, (j, &x)| if x > b.1 { (j, x) } else { b })
                .0;
            let mut c: Vec<f64> = agree.iter().map(|h| h.contrast).collect();
            c.sort_by(f64::total_cmp);
            Some(Period {
                stride: stride as u32,
                phase: phase as u32,
                heads: agree.len() as u32,
                contrast: c[c.len() / 2],
                searched: false,
            })
        })
        .collect();
    found.sort_by(|a, b| b.heads.cmp(&a.heads).then(a.stride.cmp(&b.stride)));
    let mut kept = 0;
    for p in &mut found {
        if p.stride as usize >= min_grid && kept < search.max_periods {
            p.searched = true;
            kept += 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets with a decaying local profile, plus (when `period > 0`) teeth at its multiples.
    fn spectrum(n: usize, period: usize, tooth: f64) -> Vec<f64> {
        (0..n)
            .map(|o| {
                let local = 1.0 / (1.0 + o as f64);
                let teeth = if period > 0 && o > 0 && o % period == 0 {
                    tooth
                } else {
                    0.0
                };
                local + teeth + 1e-4
            })
            .collect()
    }

    #[test]
    fn the_fundamental_wins_over_its_multiples_and_halves() {
        let n = 4096;
        let diag = spectrum(n, 196, 0.5);
        let mut cols = vec![1e-4; n];
        for j in (5..n).step_by(196) {
            cols[j] = 0.3;
        }
        let rows = 64;
        let p = head_period(&diag, &cols, rows, 64, &PeriodSearch::default()).expect("a period");
        assert_eq!(p.stride, 196);
        assert!(p.contrast > 100.0, "contrast {}", p.contrast);
        let phase = p
            .fold
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(j, _)| j);
        assert_eq!(phase, Some(5));
    }

    #[test]
    fn decaying_attention_has_no_period() {
        let n = 4096;
        for decay in [
            spectrum(n, 0, 0.0),
            (0..n).map(|o| (-(o as f64) / 30.0).exp()).collect(),
        ] {
            let cols = vec![1.0; n];
            assert_eq!(
                head_period(&decay, &cols, 64, 64, &PeriodSearch::default()),
                None
            );
        }
    }

    #[test]
    fn the_rows_searched_are_whole_query_blocks_within_the_sample() {
        assert_eq!(rows_searched(2048, 64, 256), 256);
        // 1000 tokens: blocks 12..16 start at row 768.
        assert_eq!(rows_searched(1000, 64, 256), 232);
        assert_eq!(rows_searched(200, 64, 256), 200);
        assert_eq!(rows_searched(2048, 64, 200), 256);
    }

    #[test]
    fn detection_needs_agreeing_heads_and_a_grid_sized_stride() {
        let head = |stride: usize, phase: usize| {
            let mut fold = vec![0.0; stride];
            fold[phase] = 1.0;
            Some(HeadPeriod {
                stride,
                contrast: 10.0,
                mass: 0.2,
                fold,
            })
        };
        let mut per_head = vec![None; 100];
        per_head[3] = head(300, 7);
        per_head[40] = head(300, 7);
        per_head[41] = head(300, 8);
        per_head[50] = head(33, 0);
        per_head[51] = head(33, 0);
        per_head[60] = head(500, 0); // one head: not a period
        let found = detect(&per_head, 128, &PeriodSearch::default());
        let got: Vec<(u32, u32, u32, bool)> = found
            .iter()
            .map(|p| (p.stride, p.phase, p.heads, p.searched))
            .collect();
        assert_eq!(got, vec![(300, 7, 3, true), (33, 0, 2, false)]);
    }
}
