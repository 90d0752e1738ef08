//! The budget grids statistics are exact on, defined once and shared with the calibrator.
//!
//! - [`rank_edges`]`(n)`: budgets in tokens (columns, diagonals, sink, local) at which the rank
//!   histograms are exact: `0, 1, ..., 8`, then four steps per octave (`p, 1.25p, 1.5p, 1.75p` for
//!   `p = 8, 16, 32, ...`), plus the budgets of MInference's offline search space
//!   ([`REFERENCE_BUDGETS`], so the comparison with it is exact), every edge `< n`. A prefix of one
//!   universal sequence, so statistics of different lengths merge by padding. 57 edges at
//!   `n = 8192`, 73 at `n = 131072`.
//! - [`COVERAGE_GRID`]: the block-sparse `coverage` values the statistics are exact on.
//! - [`bucket`]: the histogram bucket of a rank, the last edge `<= rank`.

/// Block-sparse coverage values with exact statistics, increasing.
pub const COVERAGE_GRID: [f64; 16] = [
    0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0,
];

/// Vertical, slash, sink and local sizes of MInference's search candidates (`minference_forward.py`:
/// vertical-slash (30, 800), (100, 750), (500, 700), (3500, 100), (1000, 4096), (1000, 6096);
/// stream_llm (100, 800)), added to the edges so that those candidates are read exactly.
pub const REFERENCE_BUDGETS: [u32; 9] = [30, 100, 500, 700, 750, 800, 1000, 3500, 6096];

/// Universal budget edges below `n` (see the module docs). Never empty: always starts with 0.
pub fn rank_edges(n: usize) -> Vec<u32> {
    let mut edges: Vec<u32> = (0..=8u32).collect();
    let mut p: u64 = 8;
    'outer: loop {
        for num in [5u64, 6, 7, 8] {
            let e = p * num / 4;
            if e >= n as u64 || e > u64::from(u32::MAX) {
                break 'outer;
            }
            edges.push(e as u32);
        }
        p *= 2;
    }
    edges.extend(REFERENCE_BUDGETS.iter().filter(|&&e| (e as usize) < n));
    edges.sort_unstable();
    edges.dedup();
    edges.retain(|&e| e == 0 || (e as usize) < n);
    edges
}

/// The bucket of `rank`: index of the last edge `<= rank` (`edges` sorted, `edges[0] == 0`).
pub fn bucket(edges: &[u32], rank: u32) -> usize {
    edges.partition_point(|&e| e <= rank).saturating_sub(1)
}

/// Buckets that lie entirely below `budget`: ranks `< budget` fill exactly buckets `0..count` when
/// `budget` is an edge (or `>= n`); otherwise the budget is rounded down to the last edge `<= budget`
/// (a lower bound on what it covers).
pub fn buckets_below(edges: &[u32], n: usize, budget: usize) -> usize {
    if budget >= n {
        return edges.len();
    }
    let b = u32::try_from(budget).unwrap_or(u32::MAX);
    edges.partition_point(|&e| e <= b).saturating_sub(1)
}

/// Whether `budget` is read exactly (an edge, or `>= n`).
pub fn is_exact(edges: &[u32], n: usize, budget: usize) -> bool {
    budget >= n || u32::try_from(budget).is_ok_and(|b| edges.binary_search(&b).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_are_a_universal_prefix() {
        let long = rank_edges(1 << 20);
        for n in [1usize, 2, 9, 113, 257, 1000, 8192] {
            let e = rank_edges(n);
            assert_eq!(&long[..e.len()], &e[..], "n = {n}");
            assert!(e.iter().all(|&x| x == 0 || (x as usize) < n));
        }
        assert_eq!(rank_edges(8192).len(), 57);
        assert_eq!(rank_edges(131_072).len(), 73);
        assert_eq!(&rank_edges(40)[9..], &[10, 12, 14, 16, 20, 24, 28, 30, 32]);
        for b in REFERENCE_BUDGETS {
            assert!(is_exact(&rank_edges(8192), 8192, b as usize));
        }
    }

    #[test]
    fn buckets() {
        let e = rank_edges(100);
        assert_eq!(bucket(&e, 0), 0);
        assert_eq!(bucket(&e, 9), 8);
        assert_eq!(bucket(&e, 10), 9);
        assert_eq!(buckets_below(&e, 100, 10), 9);
        assert_eq!(buckets_below(&e, 100, 0), 0);
        assert_eq!(buckets_below(&e, 100, 100), e.len());
        assert!(is_exact(&e, 100, 12) && !is_exact(&e, 100, 13));
    }
}
