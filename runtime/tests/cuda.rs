//! `runtime::exec::cuda`: on a machine with a CUDA driver and GPU, the sparse kernel agrees with the CPU
//! dense executor (dense keys) and with an f64 reference over an index's cells; elsewhere (CI) every test
//! prints why it skipped and passes. The full device suite is scripts/gpu/device-tests.sh.

use runtime::exec::cuda::{bf16_bits, bf16_to_f32, FlatIndex, Keys, SparsePrefill};
use runtime::exec::dense_attention;
use runtime::pattern::{a_shape, PatternContext};
use runtime::{AttentionInput, AttnShape, Error};

/// The device, or `None` after printing why the test is skipped.
fn device() -> Option<SparsePrefill> {
    match SparsePrefill::new(0) {
        Ok(sp) => Some(sp),
        Err(Error::CudaNotCompiled) => {
            println!("skipped: runtime built without the `cuda` feature");
            None
        }
        Err(Error::CudaUnavailable(why)) => {
            println!("skipped: no CUDA driver or device ({why})");
            None
        }
        Err(e) => panic!("CUDA present but unusable: {e}"),
    }
}

/// Values in [-1, 1) rounded to bf16 (xorshift64).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            bf16_to_f32(bf16_bits(2.0 * x))
        })
        .collect()
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(bf16_bits(1.0), 0x3f80);
    assert_eq!(bf16_to_f32(bf16_bits(1.0 + 1.0 / 256.0)), 1.0); // tie to even
    assert_eq!(bf16_to_f32(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
    assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
}

#[test]
fn dense_keys_match_cpu_dense() {
    let Some(sp) = device() else { return };
    for (n, hq, hkv, d) in [(200usize, 4usize, 2usize, 128usize), (97, 2, 1, 64)] {
        let shape = AttnShape {
            q_heads: hq,
            kv_heads: hkv,
            seq_len: n,
            head_dim: d,
        };
        let (q, k, v) = (
            noise(hq * n * d, 1),
            noise(hkv * n * d, 2),
            noise(hkv * n * d, 3),
        );
        let mut want = vec![0.0f32; q.len()];
        dense_attention(&AttentionInput::new(shape, &q, &k, &v).unwrap(), &mut want).unwrap();
        let (qd, kd, vd) = (
            sp.upload_bf16(&q).unwrap(),
            sp.upload_bf16(&k).unwrap(),
            sp.upload_bf16(&v).unwrap(),
        );
        let mut out = sp.zeros::<u16>(q.len()).unwrap();
        sp.fill(&mut out, 0xffff).unwrap();
        sp.forward(&shape, &qd, &kd, &vd, Keys::Dense, &mut out)
            .unwrap();
        let got = sp.download(&out).unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (bf16_to_f32(g) - w).abs())
            .fold(
                0.0f32,
                |a, e| if e.is_nan() { f32::INFINITY } else { a.max(e) },
            );
        // bf16 output rounding (2^-9 relative) plus bf16 P in the P.V product
        assert!(worst < 2e-2, "n={n} d={d}: max abs error {worst}");
    }
}

#[test]
fn a_shape_index_matches_reference_on_cells() {
    let Some(sp) = device() else { return };
    let (n, hq, hkv, d) = (333usize, 2usize, 1usize, 128usize);
    let shape = AttnShape {
        q_heads: hq,
        kv_heads: hkv,
        seq_len: n,
        head_dim: d,
    };
    let ctx = PatternContext {
        seq_len: n,
        block_q: 64,
        block_k: 64,
        last_q: 64,
    };
    let heads = vec![a_shape::index(&ctx, 64, 64), a_shape::index(&ctx, 1, 128)];
    let flat = FlatIndex::from_heads(n, &heads).unwrap();
    let (q, k, v) = (
        noise(hq * n * d, 4),
        noise(hkv * n * d, 5),
        noise(hkv * n * d, 6),
    );
    let ix = sp.upload_flat(&flat).unwrap();
    let (qd, kd, vd) = (
        sp.upload_bf16(&q).unwrap(),
        sp.upload_bf16(&k).unwrap(),
        sp.upload_bf16(&v).unwrap(),
    );
    let mut out = sp.zeros::<u16>(q.len()).unwrap();
    sp.fill(&mut out, 0xffff).unwrap();
    sp.forward(&shape, &qd, &kd, &vd, Keys::Index(&ix), &mut out)
        .unwrap();
    let got = sp.download(&out).unwrap();
    let mut worst = 0.0f64;
    for (h, index) in heads.iter().enumerate() {
        for i in 0..n {
            let keys: Vec<usize> = (0..=i).filter(|&j| index.contains(i, j)).collect();
            let qi = &q[(h * n + i) * d..(h * n + i + 1) * d];
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let kj = &k[j * d..(j + 1) * d];
                    qi.iter()
                        .zip(kj)
                        .map(|(a, b)| f64::from(a * b))
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for c in 0..d {
                let r: f64 = keys
                    .iter()
                    .zip(&s)
                    .map(|(&j, x)| (x - m).exp() / z * f64::from(v[j * d + c]))
                    .sum();
                let e = (f64::from(bf16_to_f32(got[(h * n + i) * d + c])) - r).abs();
                worst = if e.is_nan() {
                    f64::INFINITY
                } else {
                    worst.max(e)
                };
            }
        }
    }
    assert!(worst < 2e-2, "max abs error {worst}");
}
