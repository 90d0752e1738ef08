//! Exact causal dense attention on the CPU: tiled, online softmax in f32, grouped-query attention
//! without copying K or V.
//!
//! Entry point: [`dense_attention`] over an [`AttentionInput`], writing `[q_heads, seq_len, head_dim]`.
//!
//! The pieces are public so the sparse executor can run the same inner routine on other key sets:
//! - [`PackedKeys`]: K of one KV head, transposed in blocks of [`BLOCK_K`] keys (`[head_dim][BLOCK_K]`,
//!   zero-padded), made once per call; [`KeyBlock`] is one block of it plus the matching V rows.
//! - [`TileState`]: one query tile (up to [`BLOCK_Q`] rows) with its online-softmax state per row
//!   (running max `m` in log2 units, running sum `l`, unnormalized output `acc`) and scratch buffers.
//!   [`TileState::attend`] folds one key block into the state; [`TileState::finish`] writes `acc / l`.
//!
//! Numerics: queries are scaled once by `log2(e) / sqrt(head_dim)` so scores are in log2 units and the
//! softmax uses [`exp2_fast`], a polynomial with relative error below 2e-7 (tested). Products are
//! accumulated in f32 with fused multiply-add where the CPU has it (runtime detection: AVX-512F or
//! AVX2+FMA on x86-64), plain multiply-add otherwise. Against an f64 reference the output agrees within
//! about 1e-5 relative to the output scale (see the tests).
//!
//! Parallelism: rayon over (query head, query tile); each worker reuses one [`TileState`] (about 50 KB),
//! so no temporary grows with `seq_len` beyond the packed K (`kv_heads * seq_len * head_dim` floats).

use crate::error::Result;
use crate::AttentionInput;
use rayon::prelude::*;

/// Query rows per tile.
pub const BLOCK_Q: usize = 64;
/// Keys per block.
pub const BLOCK_K: usize = 64;
/// Key columns (or output columns) per micro-kernel step in the portable and AVX2 flavours: two AVX2
/// registers; `ROWS x COLS` accumulators fill half the register file. The AVX-512 flavour uses wider
/// steps (32 key columns, 64 output columns). All divide [`BLOCK_K`].
const COLS: usize = 16;
/// Query rows per micro-kernel step.
const ROWS: usize = 4;
/// `log2(e)`: scores are kept in log2 units so the softmax can use `exp2`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// `2^x` for `x <= 0` (the softmax only needs that range), relative error below 2e-7.
///
/// Round-to-nearest split `x = n + f`, `|f| <= 1/2`, Cephes' degree-6 polynomial for `2^f`, and `2^n`
/// added to the exponent bits. Inputs below -125 (including `-inf`) give `2^-125`, which is zero next
/// to any row sum (the row maximum contributes 1). Branch-free, so loops over it vectorize.
#[inline(always)]
pub fn exp2_fast(x: f32) -> f32 {
    exp2_with::<Unfused>(x)
}

#[inline(always)]
fn exp2_with<A: MulAdd>(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-125.0, 127.0);
    let t = x + SHIFT;
    let n = t - SHIFT;
    let f = x - n;
    let ni = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let mut p = 1.535_336_2e-4_f32;
    p = A::mul_add(p, f, 1.339_887_4e-3);
    p = A::mul_add(p, f, 9.618_437e-3);
    p = A::mul_add(p, f, 5.550_332_5e-2);
    p = A::mul_add(p, f, 2.402_264_8e-1);
    p = A::mul_add(p, f, 6.931_472e-1);
    let p = A::mul_add(p * f, 1.0, 1.0);
    f32::from_bits((p.to_bits() as i32).wrapping_add(ni << 23) as u32)
}

/// Multiply-add, fused or not: the kernels are compiled once per flavour (see [`Kernels`]).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// `a * b + c` rounded once. Only used inside functions compiled with the `fma` target feature;
/// elsewhere `f32::mul_add` would call a slow libm routine.
struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// `a * b + c` rounded twice (portable fallback).
struct Unfused;
impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `&s[at..at + N]` as an array reference (the caller guarantees the range is in bounds).
#[inline(always)]
fn arr<const N: usize>(s: &[f32], at: usize) -> &[f32; N] {
    match s[at..at + N].try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("slice of length N"),
    }
}

/// K of one KV head, transposed block by block: block `b` is `[head_dim][BLOCK_K]` row-major and holds
/// keys `b * BLOCK_K ..`; columns past `seq_len` are zero.
#[derive(Debug, Clone, Default)]
pub struct PackedKeys {
    data: Vec<f32>,
    head_dim: usize,
    seq_len: usize,
}

impl PackedKeys {
    /// Packs `k` (`[seq_len, head_dim]` row-major, `k.len() == seq_len * head_dim`).
    pub fn pack(k: &[f32], seq_len: usize, head_dim: usize) -> Self {
        let blocks = seq_len.div_ceil(BLOCK_K);
        let mut data = vec![0.0f32; blocks * head_dim * BLOCK_K];
        for (b, block) in data.chunks_exact_mut(head_dim * BLOCK_K).enumerate() {
            let first = b * BLOCK_K;
            let n = BLOCK_K.min(seq_len - first);
            for (j, row) in k[first * head_dim..(first + n) * head_dim]
                .chunks_exact(head_dim)
                .enumerate()
            {
                for (c, &x) in row.iter().enumerate() {
                    block[c * BLOCK_K + j] = x;
                }
            }
        }
        Self {
            data,
            head_dim,
            seq_len,
        }
    }

    /// Number of key blocks.
    pub fn blocks(&self) -> usize {
        self.seq_len.div_ceil(BLOCK_K)
    }

    /// Block `b` with its V rows (`v` is all of V for this KV head, `[seq_len, head_dim]`).
    pub fn block<'a>(&'a self, b: usize, v: &'a [f32]) -> KeyBlock<'a> {
        let first = b * BLOCK_K;
        let n = BLOCK_K.min(self.seq_len - first);
        let size = self.head_dim * BLOCK_K;
        KeyBlock {
            kt: &self.data[b * size..(b + 1) * size],
            v: &v[first * self.head_dim..(first + n) * self.head_dim],
            n,
            first_pos: first,
        }
    }
}

/// One block of up to [`BLOCK_K`] keys: `kt` is `[head_dim][BLOCK_K]` (K transposed, zero-padded past
/// `n`), `v` is `[n, head_dim]`. `first_pos` is the sequence position of key 0, used by [`Visible::Causal`].
#[derive(Debug, Clone, Copy)]
pub struct KeyBlock<'a> {
    pub kt: &'a [f32],
    pub v: &'a [f32],
    pub n: usize,
    pub first_pos: usize,
}

/// Which keys of a block a query row may see. Query row `r` of the tile is at position
/// `q_first_pos + r`; the keys a row sees are always a prefix of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visible<'a> {
    /// All `n` keys.
    All,
    /// Keys at positions `<=` the query's position, key `j` being at `KeyBlock::first_pos + j`.
    Causal { q_first_pos: usize },
    /// Keys at positions `<=` the query's position, key `j` being at `positions[j]`: gathered keys,
    /// `positions` sorted ascending with at least `n` entries (`KeyBlock::first_pos` is not used).
    Sorted {
        q_first_pos: usize,
        positions: &'a [u32],
    },
}

impl Visible<'_> {
    #[inline]
    fn count(self, row: usize, keys: &KeyBlock<'_>) -> usize {
        match self {
            Visible::All => keys.n,
            Visible::Causal { q_first_pos } => (q_first_pos + row + 1)
                .saturating_sub(keys.first_pos)
                .min(keys.n),
            Visible::Sorted {
                q_first_pos,
                positions,
            } => {
                let pos = q_first_pos + row;
                positions
                    .get(..keys.n)
                    .unwrap_or(positions)
                    .partition_point(|&p| p as usize <= pos)
            }
        }
    }
}

/// A query tile and its online-softmax state; reusable across tiles (see [`TileState::load_queries`]).
#[derive(Debug, Clone)]
pub struct TileState {
    head_dim: usize,
    rows: usize,
    /// Scaled queries, transposed: `[head_dim][BLOCK_Q]`.
    qt: Vec<f32>,
    /// Scores, then probabilities, of the current key block: `[BLOCK_Q][BLOCK_K]`.
    s: Vec<f32>,
    /// Running row maximum of the scaled scores (log2 units); `-inf` before any visible key.
    pub m: Vec<f32>,
    /// Running sum of `2^(score - m)` per row; the AVX-512 kernel keeps part of it in `lanes`
    /// (the row sum is `l[r]` plus the row's `LANES` lanes; [`TileState::finish`] adds them up).
    pub l: Vec<f32>,
    /// Per-row partial sums of `2^(score - m)` in `LANES` lanes, `[BLOCK_Q][LANES]`, so the fused
    /// kernel needs no horizontal sum per key block. Scaled together with `l`.
    lanes: Vec<f32>,
    /// Unnormalized output `[rows][head_dim]` (row stride `head_dim`).
    pub acc: Vec<f32>,
}

impl TileState {
    pub fn new(head_dim: usize) -> Self {
        Self {
            head_dim,
            rows: 0,
            qt: vec![0.0; head_dim * BLOCK_Q],
            s: vec![0.0; BLOCK_Q * BLOCK_K],
            m: vec![f32::NEG_INFINITY; BLOCK_Q],
            l: vec![0.0; BLOCK_Q],
            lanes: vec![0.0; BLOCK_Q * LANES],
            acc: vec![0.0; BLOCK_Q * head_dim],
        }
    }

    /// Rows of the current tile.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Starts a tile: `q` is `[rows, head_dim]` (rows `<= BLOCK_Q`), `softmax_scale` usually
    /// `1 / sqrt(head_dim)`. Resets `m`, `l` and `acc`.
    pub fn load_queries(&mut self, q: &[f32], softmax_scale: f32) {
        let d = self.head_dim;
        self.rows = (q.len() / d).min(BLOCK_Q);
        let scale = softmax_scale * LOG2_E;
        for (r, row) in q.chunks_exact(d).take(self.rows).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                self.qt[c * BLOCK_Q + r] = x * scale;
            }
        }
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        self.lanes.fill(0.0);
        self.acc.fill(0.0);
    }

    /// Folds one key block into the state (the online-softmax step).
    pub fn attend(&mut self, keys: &KeyBlock<'_>, visible: Visible<'_>) {
        KERNELS.with(|k| (k.attend)(self, keys, visible));
    }

    /// Writes the normalized output `acc / l`, `[rows, head_dim]`; rows that saw no key are zero.
    pub fn finish(&self, out: &mut [f32]) {
        let d = self.head_dim;
        for (((o, a), &l), lanes) in out
            .chunks_exact_mut(d)
            .zip(self.acc.chunks_exact(d))
            .zip(&self.l)
            .zip(self.lanes.chunks_exact(LANES))
            .take(self.rows)
        {
            let l = l + lanes.iter().sum::<f32>();
            let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
            for (o, &a) in o.iter_mut().zip(a) {
                *o = a * inv;
            }
        }
    }
}

/// The kernel flavour chosen for this CPU, once per thread.
struct Kernels {
    attend: fn(&mut TileState, &KeyBlock<'_>, Visible<'_>),
}

thread_local! {
    static KERNELS: Kernels = Kernels { attend: select_attend() };
}

fn select_attend() -> fn(&mut TileState, &KeyBlock<'_>, Visible<'_>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var_os("NO512").is_none()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return attend_avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return attend_avx2;
        }
    }
    attend_generic::<Unfused, COLS, COLS>
}

#[cfg(target_arch = "x86_64")]
fn attend_avx512(st: &mut TileState, keys: &KeyBlock<'_>, visible: Visible<'_>) {
    // SAFETY: selected only after `is_x86_feature_detected!` confirmed avx512f and fma.
    unsafe { attend_avx512_inner(st, keys, visible) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn attend_avx512_inner(st: &mut TileState, keys: &KeyBlock<'_>, visible: Visible<'_>) {
    if st.head_dim % FUSED_COLS == 0 {
        attend_fused::<Fused, 4>(st, keys, visible)
    } else {
        attend_generic::<Fused, 32, 64>(st, keys, visible)
    }
}

#[cfg(target_arch = "x86_64")]
fn attend_avx2(st: &mut TileState, keys: &KeyBlock<'_>, visible: Visible<'_>) {
    // SAFETY: selected only after `is_x86_feature_detected!` confirmed avx2 and fma.
    unsafe { attend_avx2_inner(st, keys, visible) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2_inner(st: &mut TileState, keys: &KeyBlock<'_>, visible: Visible<'_>) {
    attend_generic::<Fused, COLS, COLS>(st, keys, visible)
}

/// One online-softmax step: scores `S = Qs K^T` (log2 units), row max, `P = 2^(S - m)`, rescale and
/// accumulate `acc += P V`.
#[inline(always)]
fn attend_generic<A: MulAdd, const QK_COLS: usize, const PV_COLS: usize>(
    st: &mut TileState,
    keys: &KeyBlock<'_>,
    visible: Visible<'_>,
) {
    let d = st.head_dim;
    let rows = st.rows;
    let n = keys.n;
    if rows == 0 || n == 0 {
        return;
    }
    let ncols = n.div_ceil(QK_COLS) * QK_COLS;

    // S = Qs K^T, ROWS x COLS register blocks.
    let mut r0 = 0;
    while r0 + ROWS <= rows {
        qk_block::<A, ROWS, QK_COLS>(&st.qt, r0, keys.kt, d, ncols, &mut st.s);
        r0 += ROWS;
    }
    while r0 < rows {
        qk_block::<A, 1, QK_COLS>(&st.qt, r0, keys.kt, d, ncols, &mut st.s);
        r0 += 1;
    }

    // Online softmax per row; masked columns get probability 0.
    for r in 0..rows {
        let nv = visible.count(r, keys);
        let row = &mut st.s[r * BLOCK_K..r * BLOCK_K + n];
        if nv == 0 {
            row.fill(0.0);
            continue;
        }
        let m_old = st.m[r];
        let m_new = m_old.max(row_max(&row[..nv]));
        let sum = exp2_sub_sum::<A>(&mut row[..nv], m_new);
        row[nv..].fill(0.0);
        let alpha = exp2_with::<A>(m_old - m_new);
        st.l[r] = A::mul_add(st.l[r], alpha, sum);
        st.m[r] = m_new;
        if alpha != 1.0 {
            for a in &mut st.acc[r * d..(r + 1) * d] {
                *a *= alpha;
            }
        }
    }

    // acc += P V
    let mut r0 = 0;
    while r0 + ROWS <= rows {
        pv_block::<A, ROWS, PV_COLS>(&st.s, r0, keys.v, n, d, &mut st.acc);
        r0 += ROWS;
    }
    while r0 < rows {
        pv_block::<A, 1, PV_COLS>(&st.s, r0, keys.v, n, d, &mut st.acc);
        r0 += 1;
    }
}

/// Output columns per step of the fused kernel's `P V` (four AVX-512 registers per row).
const FUSED_COLS: usize = 64;
/// Lanes of the fused kernel's partial row sums (one AVX-512 register).
const LANES: usize = 16;
const _: () = assert!(BLOCK_K == 4 * LANES);

/// One online-softmax step, fused per group of `R` query rows (AVX-512 flavour, `head_dim` a multiple of
/// [`FUSED_COLS`]): the group's scores against all [`BLOCK_K`] keys stay in registers (`R x BLOCK_K`
/// floats: 16 AVX-512 registers for `R = 4`) through the mask, the row maximum and `2^(S - m)`; only
/// the probabilities go to memory (`R` rows, read back as broadcasts by `acc = alpha acc + P V`).
/// One pass over the score tile instead of four (scores, maximum, exponent, products).
#[inline(always)]
fn attend_fused<A: MulAdd, const R: usize>(
    st: &mut TileState,
    keys: &KeyBlock<'_>,
    visible: Visible<'_>,
) {
    let rows = st.rows;
    if rows == 0 || keys.n == 0 {
        return;
    }
    let mut r0 = 0;
    while r0 + R <= rows {
        fused_rows::<A, R>(st, r0, keys, visible);
        r0 += R;
    }
    while r0 < rows {
        fused_rows::<A, 1>(st, r0, keys, visible);
        r0 += 1;
    }
}

/// Rows `r0..r0 + R` of [`attend_fused`].
// Index loops over fixed-size arrays: the shape LLVM unrolls and vectorizes into registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn fused_rows<A: MulAdd, const R: usize>(
    st: &mut TileState,
    r0: usize,
    keys: &KeyBlock<'_>,
    visible: Visible<'_>,
) {
    let d = st.head_dim;
    let n = keys.n;
    // S = Qs K^T over all BLOCK_K columns (K^T is zero-padded past n; those columns are masked).
    qk_block::<A, R, BLOCK_K>(&st.qt, r0, keys.kt, d, BLOCK_K, &mut st.s);
    // Online softmax per row; masked columns get probability 0.
    let mut alpha = [1.0f32; R];
    for (r, alpha) in alpha.iter_mut().enumerate() {
        let nv = visible.count(r0 + r, keys);
        let row: &mut [f32; BLOCK_K] = match (&mut st.s[(r0 + r) * BLOCK_K..][..BLOCK_K]).try_into()
        {
            Ok(row) => row,
            Err(_) => unreachable!("slice of length BLOCK_K"),
        };
        if nv == 0 {
            *row = [0.0; BLOCK_K];
            continue;
        }
        if nv < BLOCK_K {
            for (c, x) in row.iter_mut().enumerate() {
                *x = if c < nv { *x } else { f32::NEG_INFINITY };
            }
        }
        let m_old = st.m[r0 + r];
        let m_new = max_f(m_old, hmax(row));
        for x in row.iter_mut() {
            *x = exp2_with::<A>(*x - m_new);
        }
        if nv < BLOCK_K {
            for (c, x) in row.iter_mut().enumerate() {
                *x = if c < nv { *x } else { 0.0 };
            }
        }
        let a = exp2_with::<A>(m_old - m_new);
        st.l[r0 + r] *= a;
        let part: [f32; LANES] = std::array::from_fn(|i| {
            (row[i] + row[LANES + i]) + (row[2 * LANES + i] + row[3 * LANES + i])
        });
        let lanes: &mut [f32; LANES] = match (&mut st.lanes[(r0 + r) * LANES..][..LANES]).try_into()
        {
            Ok(l) => l,
            Err(_) => unreachable!("slice of length LANES"),
        };
        for (l, &p) in lanes.iter_mut().zip(&part) {
            *l = A::mul_add(*l, a, p);
        }
        st.m[r0 + r] = m_new;
        *alpha = a;
    }
    pv_scaled::<A, R, FUSED_COLS>(&st.s, r0, keys.v, n, d, &mut st.acc, &alpha);
}

/// Rows `r0..r0 + R` of `acc = alpha acc + P V` over `n <= BLOCK_K` keys (the fused kernel's second
/// half). The probability rows are fixed-size arrays, so the loop has no bounds checks and each V
/// row is loaded once into registers for all `R` rows.
// Index loops over fixed-size arrays: the shape LLVM unrolls and vectorizes into registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn pv_scaled<A: MulAdd, const R: usize, const COLS: usize>(
    p: &[f32],
    r0: usize,
    v: &[f32],
    n: usize,
    d: usize,
    acc: &mut [f32],
    alpha: &[f32; R],
) {
    let prow: [&[f32; BLOCK_K]; R] = std::array::from_fn(|r| arr(p, (r0 + r) * BLOCK_K));
    let n = n.min(BLOCK_K);
    for c0 in (0..d).step_by(COLS) {
        let mut o = [[0.0f32; COLS]; R];
        for r in 0..R {
            let a: &[f32; COLS] = arr(acc, (r0 + r) * d + c0);
            for c in 0..COLS {
                o[r][c] = a[c] * alpha[r];
            }
        }
        for j in 0..n {
            let vv: [f32; COLS] = *arr(v, j * d + c0);
            for r in 0..R {
                let pr = prow[r][j];
                for c in 0..COLS {
                    o[r][c] = A::mul_add(pr, vv[c], o[r][c]);
                }
            }
        }
        for (r, o) in o.iter().enumerate() {
            let at = (r0 + r) * d + c0;
            acc[at..at + COLS].copy_from_slice(o);
        }
    }
}

/// `max(a, b)` as one compare-and-select (the hardware `max`; no NaN reaches it).
#[inline(always)]
fn max_f(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Maximum of a score row: 16 lanes, then a horizontal maximum on order-preserving integer keys
/// (integer `max` is associative, so LLVM reduces it with shuffles; an `f32` tree it vectorizes poorly).
#[inline(always)]
fn hmax(x: &[f32; BLOCK_K]) -> f32 {
    /// Maps `f32` bits to `i32` with the same order (negative floats: flip the magnitude bits); an
    /// involution, so it also maps back.
    #[inline(always)]
    fn key(b: i32) -> i32 {
        b ^ ((b >> 31) & 0x7fff_ffff)
    }
    let mut v = [f32::NEG_INFINITY; LANES];
    for chunk in 0..BLOCK_K / LANES {
        for (i, l) in v.iter_mut().enumerate() {
            *l = max_f(*l, x[chunk * LANES + i]);
        }
    }
    let m = v
        .iter()
        .map(|f| key(f.to_bits() as i32))
        .max()
        .unwrap_or(i32::MIN);
    f32::from_bits(key(m) as u32)
}

/// Rows `r0..r0 + R` of `S = Qs K^T` for the first `ncols` (a multiple of `COLS`) key columns.
// Index loops over fixed-size arrays: the shape LLVM unrolls and vectorizes into registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn qk_block<A: MulAdd, const R: usize, const COLS: usize>(
    qt: &[f32],
    r0: usize,
    kt: &[f32],
    d: usize,
    ncols: usize,
    s: &mut [f32],
) {
    for c0 in (0..ncols).step_by(COLS) {
        let mut acc = [[0.0f32; COLS]; R];
        for k in 0..d {
            let kv: &[f32; COLS] = arr(kt, k * BLOCK_K + c0);
            let qv: &[f32; R] = arr(qt, k * BLOCK_Q + r0);
            for r in 0..R {
                for c in 0..COLS {
                    acc[r][c] = A::mul_add(qv[r], kv[c], acc[r][c]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let at = (r0 + r) * BLOCK_K + c0;
            s[at..at + COLS].copy_from_slice(a);
        }
    }
}

/// Rows `r0..r0 + R` of `acc += P V` over `n` keys.
// Index loops over fixed-size arrays: the shape LLVM unrolls and vectorizes into registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn pv_block<A: MulAdd, const R: usize, const COLS: usize>(
    p: &[f32],
    r0: usize,
    v: &[f32],
    n: usize,
    d: usize,
    acc: &mut [f32],
) {
    let prow: [&[f32]; R] = std::array::from_fn(|r| &p[(r0 + r) * BLOCK_K..][..n]);
    let full = d - d % COLS;
    for c0 in (0..full).step_by(COLS) {
        let mut a = [[0.0f32; COLS]; R];
        for j in 0..n {
            let vv: &[f32; COLS] = arr(v, j * d + c0);
            for r in 0..R {
                let pr = prow[r][j];
                for c in 0..COLS {
                    a[r][c] = A::mul_add(pr, vv[c], a[r][c]);
                }
            }
        }
        for (r, a) in a.iter().enumerate() {
            let at = (r0 + r) * d + c0;
            for (o, &x) in acc[at..at + COLS].iter_mut().zip(a) {
                *o += x;
            }
        }
    }
    for c in full..d {
        for (r, prow) in prow.iter().enumerate() {
            let mut sum = 0.0f32;
            for (j, &pj) in prow.iter().enumerate() {
                sum = A::mul_add(pj, v[j * d + c], sum);
            }
            acc[(r0 + r) * d + c] += sum;
        }
    }
}

/// Maximum of a non-empty row, 8 lanes at a time.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let mut m = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &v in tail {
        m = m.max(v);
    }
    m
}

/// `x[i] = 2^(x[i] - m)` in place; returns the sum.
#[inline(always)]
fn exp2_sub_sum<A: MulAdd>(x: &mut [f32], m: f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
            *v = exp2_with::<A>(*v - m);
            *l += *v;
        }
    }
    let mut sum = 0.0f32;
    for v in chunks.into_remainder() {
        *v = exp2_with::<A>(*v - m);
        sum += *v;
    }
    lanes.iter().sum::<f32>() + sum
}

/// Exact causal attention: `out[h] = softmax(Q[h] K[g]^T / sqrt(head_dim) + causal mask) V[g]` with
/// `g = h / (q_heads / kv_heads)`. `out` is `[q_heads, seq_len, head_dim]`.
pub fn dense_attention(input: &AttentionInput<'_>, out: &mut [f32]) -> Result<()> {
    let shape = input.shape;
    shape.check()?;
    let (t, d) = (shape.seq_len, shape.head_dim);
    shape.check_out(out.len())?;
    if t == 0 {
        return Ok(());
    }
    let packed: Vec<PackedKeys> = (0..shape.kv_heads)
        .into_par_iter()
        .map(|g| PackedKeys::pack(input.k_head(g), t, d))
        .collect();
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(t * d)
        .enumerate()
        .flat_map(|(h, out_h)| {
            out_h
                .par_chunks_mut(BLOCK_Q * d)
                .enumerate()
                .map(move |(tile, o)| (h, tile, o))
        })
        .for_each_init(
            || TileState::new(d),
            |st, (h, tile, o)| {
                let g = shape.kv_head_of(h);
                let q_first = tile * BLOCK_Q;
                let rows = o.len() / d;
                st.load_queries(&input.q_head(h)[q_first * d..(q_first + rows) * d], scale);
                let keys = &packed[g];
                let v = input.v_head(g);
                let last_block = (q_first + rows - 1) / BLOCK_K;
                let visible = Visible::Causal {
                    q_first_pos: q_first,
                };
                for b in 0..=last_block {
                    st.attend(&keys.block(b, v), visible);
                }
                st.finish(o);
            },
        );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::noise;
    use crate::{AttnShape, Error};

    /// Causal attention in f64, straight from the definition.
    fn reference(inp: &AttentionInput<'_>) -> Vec<f64> {
        let sh = inp.shape;
        let (t, d) = (sh.seq_len, sh.head_dim);
        let mut out = vec![0.0f64; sh.q_heads * t * d];
        let scale = 1.0 / (d as f64).sqrt();
        for h in 0..sh.q_heads {
            let g = sh.kv_head_of(h);
            for i in 0..t {
                let q = inp.q_row(h, i);
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = inp.k_row(g, j);
                        q.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                let o = &mut out[(h * t + i) * d..(h * t + i + 1) * d];
                for (j, wj) in w.iter().enumerate() {
                    for (oc, &vc) in o.iter_mut().zip(inp.v_row(g, j)) {
                        *oc += wj / z * vc as f64;
                    }
                }
            }
        }
        out
    }

    /// Asserts `|got - want| <= tol * max(1, max|want|)` everywhere; prints the worst element.
    fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1.0f64, |a, &b| a.max(b.abs()));
        let (worst, err) = got
            .iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .enumerate()
            .fold((0, 0.0f64), |a, (i, e)| if e > a.1 { (i, e) } else { a });
        assert!(
            err <= tol * scale,
            "{what}: worst element {worst}: got {}, want {}, error {err:e} > {tol:e} * {scale}",
            got[worst],
            want[worst]
        );
    }

    /// f32 tiled attention vs f64: scores of magnitude up to ~8 (amp 1.5, d 64); 2e-5 of the output
    /// scale covers f32 accumulation over a few thousand keys and the 2e-7 exp error.
    const TOL_F32: f64 = 2e-5;

    fn check(q_heads: usize, kv_heads: usize, seq_len: usize, head_dim: usize, seed: u64) {
        let shape = AttnShape {
            q_heads,
            kv_heads,
            seq_len,
            head_dim,
        };
        let q = noise(shape.q_len().unwrap_or(0), seed, 1.5);
        let k = noise(shape.kv_len().unwrap_or(0), seed + 1, 1.5);
        let v = noise(shape.kv_len().unwrap_or(0), seed + 2, 1.0);
        let inp = match AttentionInput::new(shape, &q, &k, &v) {
            Ok(i) => i,
            Err(e) => panic!("{e}"),
        };
        let mut out = vec![f32::NAN; q.len()];
        if let Err(e) = dense_attention(&inp, &mut out) {
            panic!("{e}");
        }
        assert_close(&out, &reference(&inp), TOL_F32, &format!("{shape:?}"));
    }

    #[test]
    fn matches_f64_reference_on_odd_sizes() {
        check(1, 1, 1, 64, 1);
        check(3, 1, 113, 64, 2);
        check(4, 2, 200, 32, 3);
        check(2, 2, 65, 80, 4); // head_dim not a multiple of 16
        check(3, 3, 17, 7, 5);
        check(2, 1, 130, 128, 7); // two column steps of the fused AVX-512 kernel
    }

    #[test]
    fn matches_f64_reference_long() {
        check(3, 1, 1023, 64, 6);
    }

    #[test]
    fn exp2_fast_relative_error() {
        let mut worst = (0.0f64, 0.0f32);
        let mut x = -125.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp2();
            let err = ((exp2_fast(x) as f64 - want) / want).abs();
            if err > worst.0 {
                worst = (err, x);
            }
            x += 0.000_7;
        }
        assert!(
            worst.0 < 2e-7,
            "exp2_fast: relative error {:e} at x = {}",
            worst.0,
            worst.1
        );
        assert!(exp2_fast(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(exp2_fast(0.0), 1.0);
    }

    #[test]
    fn rejects_wrong_output_length() {
        let shape = AttnShape {
            q_heads: 2,
            kv_heads: 1,
            seq_len: 3,
            head_dim: 4,
        };
        let (q, kv) = (vec![0.0; 24], vec![0.0; 12]);
        let inp = AttentionInput::new(shape, &q, &kv, &kv);
        let mut out = vec![0.0; 5];
        assert!(matches!(
            inp.map(|i| dense_attention(&i, &mut out)),
            Ok(Err(Error::Shape(_)))
        ));
    }
}
