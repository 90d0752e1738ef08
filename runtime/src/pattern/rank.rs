//! Rankings shared by the patterns and by the profiler's statistics, so both use exactly the same order.
//!
//! - [`Ranking`]: an order over items (columns, diagonals, key blocks) and each item's rank in it.
//! - [`Ranking::by_score`]: the first `forced` items first (in index order), then the rest by
//!   descending score, ties to the lower index. Deterministic for any input, NaN included
//!   (`f64::total_cmp`), though the estimators reject non-finite scores before ranking.
//! - [`RangeMin`]: minimum of a `u32` array over index ranges in O(1) (sparse table), used to find
//!   the best-ranked diagonal touching a (query block, key block) pair.

use std::cmp::Ordering;

/// An order over `len` items: `order[r]` is the item of rank `r`; `rank[item]` is its rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranking {
    pub order: Vec<u32>,
    pub rank: Vec<u32>,
}

impl Ranking {
    /// The first `k` items of the order (fewer if there are fewer), sorted by index.
    pub fn top_sorted(&self, k: usize) -> Vec<usize> {
        let mut chosen: Vec<usize> = self.order.iter().take(k).map(|&i| i as usize).collect();
        chosen.sort_unstable();
        chosen
    }

    /// Items `0..forced` first (index order), then the others by descending `score`, ties to the
    /// lower index.
    pub fn by_score(score: &[f64], forced: usize) -> Self {
        let n = score.len();
        let forced = forced.min(n);
        let mut order: Vec<u32> = (0..n as u32).collect();
        order[forced..].sort_by(|&a, &b| {
            let (sa, sb) = (score[a as usize], score[b as usize]);
            match sb.total_cmp(&sa) {
                Ordering::Equal => a.cmp(&b),
                o => o,
            }
        });
        Self::from_order(order)
    }

    /// The ranking with this order (a permutation of `0..order.len()`).
    pub fn from_order(order: Vec<u32>) -> Self {
        let mut rank = vec![0u32; order.len()];
        for (r, &item) in order.iter().enumerate() {
            if let Some(slot) = rank.get_mut(item as usize) {
                *slot = r as u32;
            }
        }
        Self { order, rank }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The fewest leading items whose `score` sum reaches `fraction` of the total (at least `min`,
    /// at most all). `fraction` is clamped to `[0, 1]`; with a total of 0, `min`.
    pub fn coverage_count(&self, score: &[f64], fraction: f64, min: usize) -> usize {
        let total: f64 = score.iter().sum();
        let n = self.order.len();
        let min = min.min(n);
        if total.is_nan() || total <= 0.0 {
            return min;
        }
        let goal = fraction.clamp(0.0, 1.0) * total;
        let mut sum = 0.0;
        for (r, &item) in self.order.iter().enumerate() {
            sum += score.get(item as usize).copied().unwrap_or(0.0);
            if r + 1 >= min && sum >= goal {
                return r + 1;
            }
        }
        n
    }
}

/// Sparse table over a `u32` array: the minimum over any index range in O(1) after O(n log n) setup.
#[derive(Debug, Clone)]
pub struct RangeMin {
    /// `levels[l][i] = min(values[i .. i + 2^l])`.
    levels: Vec<Vec<u32>>,
}

impl RangeMin {
    pub fn new(values: &[u32]) -> Self {
        let mut levels = vec![values.to_vec()];
        let mut width = 1;
        while width * 2 <= values.len() {
            let prev = &levels[levels.len() - 1];
            let next: Vec<u32> = (0..=values.len() - width * 2)
                .map(|i| prev[i].min(prev[i + width]))
                .collect();
            levels.push(next);
            width *= 2;
        }
        Self { levels }
    }

    /// Minimum over `start..end` (`u32::MAX` for an empty or out-of-range request).
    pub fn min(&self, start: usize, end: usize) -> u32 {
        let n = self.levels.first().map_or(0, Vec::len);
        let end = end.min(n);
        if start >= end {
            return u32::MAX;
        }
        let len = end - start;
        let l = (usize::BITS - 1 - len.leading_zeros()) as usize;
        let row = &self.levels[l];
        row[start].min(row[end - (1 << l)])
    }
}

/// Dot product in f32 with eight independent lanes (vectorizes; summation order fixed).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_forced_then_descending_ties_low_index() {
        let r = Ranking::by_score(&[0.0, 0.1, 0.5, 0.5, 0.9, 0.2], 2);
        assert_eq!(r.order, vec![0, 1, 4, 2, 3, 5]);
        assert_eq!(r.rank, vec![0, 1, 3, 4, 2, 5]);
    }

    #[test]
    fn range_min_matches_scan() {
        let v: Vec<u32> = (0..37u32).map(|i| (i * 7919) % 53).collect();
        let t = RangeMin::new(&v);
        for a in 0..v.len() {
            for b in a..=v.len() {
                let want = v[a..b].iter().copied().min().unwrap_or(u32::MAX);
                assert_eq!(t.min(a, b), want);
            }
        }
    }
}
