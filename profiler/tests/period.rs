//! The period search on exact attention: heads whose queries and keys carry rotations of period 196
//! and its first harmonics (sharp attention to every earlier token at the same place in its "frame")
//! and key columns that stand out at phase 5 are found at stride 196, phase 5; a head of random
//! queries is not.

use profiler::stats::period::{detect, layer_periods, PeriodSearch};
use profiler::stats::StatsConfig;
use runtime::{AttentionInput, AttnShape};

const N: usize = 2048;
const D: usize = 16;
const STRIDE: usize = 196;
const PHASE: usize = 5;
/// Harmonics of the rotation (dimension pairs 0..2 * HARMONICS).
const HARMONICS: usize = 7;

/// A small deterministic generator (xorshift), uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

#[test]
fn periodic_heads_are_found_at_their_stride_and_phase() {
    // Three query heads on one KV head: 0 and 2 periodic, 1 random.
    let shape = AttnShape {
        q_heads: 3,
        kv_heads: 1,
        seq_len: N,
        head_dim: D,
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let angle = |i: usize| 2.0 * std::f32::consts::PI * (i % STRIDE) as f32 / STRIDE as f32;
    let phase_dim = 2 * HARMONICS;
    let mut k = vec![0.0f32; N * D];
    for j in 0..N {
        let row = &mut k[j * D..(j + 1) * D];
        for f in 0..HARMONICS {
            let a = (f + 1) as f32 * angle(j);
            (row[2 * f], row[2 * f + 1]) = (a.cos(), a.sin());
        }
        row[phase_dim] = if j % STRIDE == PHASE { 1.0 } else { 0.0 };
        row[phase_dim + 1] = 0.1 * rng.next();
    }
    let mut q = vec![0.0f32; 3 * N * D];
    for h in 0..3 {
        for i in 0..N {
            let row = &mut q[(h * N + i) * D..(h * N + i + 1) * D];
            if h == 1 {
                row.iter_mut().for_each(|x| *x = rng.next());
            } else {
                // Scores Σ_f 3 cos(2π f (i - j) / 196) (peak 21), plus 19 on the phase-5 columns
                // (after the 1/√16 scale).
                for f in 0..HARMONICS {
                    let a = (f + 1) as f32 * angle(i);
                    (row[2 * f], row[2 * f + 1]) = (12.0 * a.cos(), 12.0 * a.sin());
                }
                row[phase_dim] = 76.0;
            }
        }
    }
    let v = vec![0.0f32; N * D];
    let input = AttentionInput::new(shape, &q, &k, &v).unwrap();
    let search = PeriodSearch::default();
    let per_head = layer_periods(&input, &StatsConfig::default(), &search).unwrap();
    let strides: Vec<Option<usize>> = per_head
        .iter()
        .map(|p| p.as_ref().map(|p| p.stride))
        .collect();
    assert_eq!(strides, vec![Some(STRIDE), None, Some(STRIDE)]);
    let found = detect(&per_head, 128, &search);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].stride, found[0].phase),
        (STRIDE as u32, PHASE as u32)
    );
    assert_eq!(found[0].heads, 2);
    assert!(found[0].searched);
}
