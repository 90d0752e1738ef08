// Query-adaptive (FlexPrefill) decisions on the GPU, `runtime::pattern::query_adaptive`: which branch
// each head takes and, for the vertical-slash branch, its budgets. The branches' indexes are built by
// the block-sparse builder (coverage gamma with a floor of min_budget blocks) and the vertical-slash
// builder; the merge picks one per head from `src` (written here, no read-back to the host).
//
// 1. qa_pool_d* (a warp per (head, key block)) and qa_div (a CTA per head), for heads with mode[h] != 0:
//    the Jensen-Shannon divergence between the pooled estimate (mean of the last L query rows . mean
//    of each key block / sqrt(d), f32 as the CPU's `divergence`: means by `a += x / len` in row order,
//    the CPU's 8-lane dot, softmax in f64) and the true block distribution (the vertical scores of the
//    vertical-slash estimate summed per key block); src[h] = js < tau[h] ? query-aware : vertical-slash.
// 2. qa_budgets: per (head, columns | diagonals), a cluster of CTAs: the fewest of the vertical-slash
//    ranking (forced items first, then by descending score, ties to the lower index) whose scores
//    reach gamma of their total, at least min_tokens (`Ranking::coverage_count`), clamped as
//    `vertical_slash::clamp_budgets`, written into the vertical-slash builder's budget arrays.
//
// The vertical scores are f32 on the GPU and f64 on the CPU, and sums run in another order: a branch
// can differ only where js and tau agree to ~1e-6, a budget where a cumulative score meets the goal
// within ~1e-6.

#define QA_THREADS 256

__device__ __forceinline__ double qa_block_sum(double x, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int sh = 16; sh >= 1; sh >>= 1) x += __shfl_xor_sync(0xffffffff, x, sh);
    __syncthreads();
    if (lane == 0) red[warp] = x;
    __syncthreads();
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < QA_THREADS / 32; ++w) s += red[w];
    return s;
}

__device__ __forceinline__ double qa_block_max(double x, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int sh = 16; sh >= 1; sh >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffff, x, sh));
    __syncthreads();
    if (lane == 0) red[warp] = x;
    __syncthreads();
    double m = red[0];
#pragma unroll
    for (int w = 1; w < QA_THREADS / 32; ++w) m = fmax(m, red[w]);
    return m;
}

// x / len as the CPU computes it (f32, correctly rounded): a multiplication by the exact reciprocal
// when len is a power of two (the same value: x * 2^-k is exact, or rounds the same way as the
// quotient), a division otherwise.
__device__ __forceinline__ float qa_div_len(float x, int len, float inv_pow2) {
    return inv_pow2 != 0.f ? __fmul_rn(x, inv_pow2) : __fdiv_rn(x, (float)len);
}

__device__ __forceinline__ float qa_inv_pow2(int len) {
    return (len & (len - 1)) == 0 ? 1.f / (float)len : 0.f;
}

// The mean of column c over rows [r0, r1) as the CPU's `a += x / len` in row order (f32); `inv_pow2`
// from qa_inv_pow2(r1 - r0).
template <int D>
__device__ __forceinline__ float qa_mean_col(const bf16_t* __restrict__ base, int r0, int r1, int c, float inv_pow2) {
    const int len = r1 - r0;
    float a = 0.f;
    for (int r = r0; r < r1; r += 8) {
        float x[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) x[u] = r + u < r1 ? bf16_to_f32(base[(u64)(r + u) * D + c]) : 0.f;
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (r + u < r1) a = __fadd_rn(a, qa_div_len(x[u], len, inv_pow2));
    }
    return a;
}

// The pooled scores: grid (ceil(k_blocks / 8), q_heads), QA_THREADS threads, one warp per key block:
// est[h][kb] = (double)(qbar . kbar) * scale with qbar the mean of the last L query rows and kbar the
// key block's mean (f32, `a += x / len` in row order, the CPU's 8-lane dot); and bmass[h][kb], the
// block's vertical scores (`col`, the vertical-slash estimate's) summed in f64, the true distribution
// of qa_div. Heads with mode 0 exit. Rows are read 8 at a time, so that the in-order sums wait on one
// load latency per 8 rows rather than per row.
template <int D>
__device__ __forceinline__ void qa_pool(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, int n, int group,
                                        int last_q, double scale, const u32* __restrict__ mode,
                                        const float* __restrict__ col, double* __restrict__ est,
                                        double* __restrict__ bmass) {
    __shared__ float qbar[D];
    __shared__ float prod[QA_THREADS / 32][D];
    const int h = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (mode[h] == 0) return;
    const int kb_n = (n + 63) / 64;
    const int l0 = n - min(max(last_q, 1), n), lq = n - l0;
    const float inv_lq = qa_inv_pow2(lq);
    const bf16_t* qh = q + (u64)h * n * D;
    const bf16_t* kh = k + (u64)(h / group) * n * D;
    for (int c = tid; c < D; c += QA_THREADS) qbar[c] = qa_mean_col<D>(qh, l0, n, c, inv_lq);
    __syncthreads();
    const int kb = blockIdx.x * (QA_THREADS / 32) + warp;
    if (kb >= kb_n) return;
    const int j0 = kb * 64, j1 = min(n, j0 + 64), len = j1 - j0;
    const float inv_len = qa_inv_pow2(len);
    for (int c = lane; c < D; c += 32) prod[warp][c] = __fmul_rn(qbar[c], qa_mean_col<D>(kh, j0, j1, c, inv_len));
    {
        const float* ch = col + (u64)h * n;
        const int j = j0 + lane;
        double a = (j < n ? (double)ch[j] : 0.0) + (j + 32 < n ? (double)ch[j + 32] : 0.0);
#pragma unroll
        for (int sh = 16; sh >= 1; sh >>= 1) a += __shfl_xor_sync(0xffffffff, a, sh);
        if (lane == 0) bmass[(u64)h * kb_n + kb] = a;
    }
    __syncwarp();
    float lanes = 0.f;
    if (lane < 8) {
        for (int c = lane; c < D; c += 8) lanes = __fadd_rn(lanes, prod[warp][c]);
    }
    float dot = 0.f;
#pragma unroll
    for (int l = 0; l < 8; ++l) dot = __fadd_rn(dot, __shfl_sync(0xffffffff, lanes, l));
    if (lane == 0) est[(u64)h * kb_n + kb] = (double)dot * scale;
}

extern "C" __global__ void __launch_bounds__(QA_THREADS)
    qa_pool_d64(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, int n, int group, int last_q,
                double scale, const u32* __restrict__ mode, const float* __restrict__ col,
                double* __restrict__ est, double* __restrict__ bmass) {
    qa_pool<64>(q, k, n, group, last_q, scale, mode, col, est, bmass);
}

extern "C" __global__ void __launch_bounds__(QA_THREADS)
    qa_pool_d128(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, int n, int group, int last_q,
                 double scale, const u32* __restrict__ mode, const float* __restrict__ col,
                 double* __restrict__ est, double* __restrict__ bmass) {
    qa_pool<128>(q, k, n, group, last_q, scale, mode, col, est, bmass);
}

// The divergence and the branch: grid q_heads, QA_THREADS threads. est[h][kb] (qa_pool's scores) is
// turned into its softmax in place; the true distribution is qa_pool's block masses `bmass`.
extern "C" __global__ void __launch_bounds__(QA_THREADS)
    qa_div(double* __restrict__ est, const double* __restrict__ bmass, int n, const u32* __restrict__ mode,
           const double* __restrict__ tau, u32 src_query_aware, u32 src_vertical_slash, u32* __restrict__ src) {
    __shared__ double red[QA_THREADS / 32];
    const int h = blockIdx.x, tid = threadIdx.x;
    if (mode[h] == 0) {
        if (tid == 0) src[h] = 0xffffffffu;  // not query-adaptive: the merge keeps the host's choice
        return;
    }
    const int kb_n = (n + 63) / 64;
    double* e = est + (u64)h * kb_n;
    double m = -__longlong_as_double(0x7ff0000000000000ll);
    for (int kb = tid; kb < kb_n; kb += QA_THREADS) m = fmax(m, e[kb]);
    m = qa_block_max(m, red);
    double z = 0.0;
    for (int kb = tid; kb < kb_n; kb += QA_THREADS) {
        const double x = exp(e[kb] - m);
        e[kb] = x;
        z += x;
    }
    z = qa_block_sum(z, red);
    const double* bm = bmass + (u64)h * kb_n;
    double t = 0.0;
    for (int kb = tid; kb < kb_n; kb += QA_THREADS) t += bm[kb];
    t = qa_block_sum(t, red);
    double d = 0.0;
    for (int kb = tid; kb < kb_n; kb += QA_THREADS) {
        const double p = e[kb] / z, r = bm[kb] / t, mid = 0.5 * (p + r);
        if (p > 0.0) d += 0.5 * (p * log(p / mid));
        if (r > 0.0) d += 0.5 * (r * log(r / mid));
    }
    d = qa_block_sum(d, red);
    if (tid == 0) src[h] = d < tau[h] ? src_query_aware : src_vertical_slash;
}

// A cluster of QA_CLUSTER CTAs of 1024 threads per (columns | diagonals, head): grid
// (2 * QA_CLUSTER, q_heads), cluster x = 0: columns over `col` (forced_cols first), 1: diagonals over
// `diag` (forced_diags first). Heads with mode[h] == 0 are left alone. Writes bv[h] = min(count, n) or
// bs[h] = clamp(count, 1, n). CTA r of the cluster takes items [r * seg, (r + 1) * seg): the total and
// each radix pass's histograms are summed per CTA, then over the cluster's CTAs in rank order through
// distributed shared memory, and every CTA takes the same decision. Dynamic shared memory: per-warp
// digit histograms (32 x 256 counts and masses, 96 KB), so that the atomics of a pass never contend
// across warps. (One CTA per (kind, head) took 50 us at 16K on SmolLM2's plan.)
#define QA_CLUSTER 8
extern "C" __global__ void __cluster_dims__(QA_CLUSTER, 1, 1) __launch_bounds__(1024)
    qa_budgets(const float* __restrict__ col, const float* __restrict__ diag, int n, const u32* __restrict__ mode,
               const double* __restrict__ gamma, const u32* __restrict__ min_tokens, int forced_cols,
               int forced_diags, u32* __restrict__ bv, u32* __restrict__ bs) {
    extern __shared__ __align__(16) double qa_hist[];
    double* wm = qa_hist + (threadIdx.x >> 5) * 256;                      // this warp's masses
    u32* wc = (u32*)(qa_hist + 32 * 256) + (threadIdx.x >> 5) * 256;      // and counts
    __shared__ u32 cta_c[2][256];     // this CTA's histogram of a pass (two: pass p + 2 reuses p's),
    __shared__ double cta_m[2][256];  // read by the cluster
    __shared__ u32 hc[256];           // the cluster's
    __shared__ double hm[256];
    __shared__ double red[32];
    __shared__ double s_tot;          // this CTA's total, read by the cluster
    __shared__ u32 s_digit, s_all;
    __shared__ u32 s_above;
    __shared__ double s_acc;
    const int h = blockIdx.y, kind = blockIdx.x / QA_CLUSTER;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (mode[h] == 0) return;  // the whole cluster
    const u32 rank = cluster_rank();
    const float* sc = (kind == 0 ? col : diag) + (u64)h * n;
    const int forced = min(kind == 0 ? forced_cols : forced_diags, n);
    const u32 mn = min(min_tokens[h], (u32)n);
    int c0, c1;
    cluster_segment(n, QA_CLUSTER, rank, c0, c1);
    // totals: all scores (per CTA, then the CTAs in rank order), and the forced ones in index order
    double tot = 0.0;
    for (int j = c0 + tid; j < c1; j += 1024) tot += (double)sc[j];
#pragma unroll
    for (int sh = 16; sh >= 1; sh >>= 1) tot += __shfl_xor_sync(0xffffffff, tot, sh);
    if (lane == 0) red[warp] = tot;
    __syncthreads();
    if (tid == 0) {
        double t = 0.0;
        for (int w = 0; w < 32; ++w) t += red[w];
        s_tot = t;
    }
    cluster_sync();
    tot = cluster_sum<QA_CLUSTER>(&s_tot);
    u32 count;
    if (!(tot > 0.0)) {
        count = mn;  // no mass (or NaN): the floor, as the CPU
    } else {
        const double goal = fmin(fmax(gamma[h], 0.0), 1.0) * tot;
        double fsum = 0.0;
        u32 cnt_forced = 0;
        bool done = false;
        for (int j = 0; j < forced; ++j) {  // every thread, the same order
            fsum += (double)sc[j];
            ++cnt_forced;
            if (cnt_forced >= mn && fsum >= goal) {
                done = true;
                break;
            }
        }
        if (done) {
            count = cnt_forced;
        } else {
            // radix walk over the rest's f32 bits (scores >= 0), summing mass, from the top
            u32 prefix = 0, pmask = 0;
            if (tid == 0) {
                s_all = 0;
                s_above = 0;
                s_acc = 0.0;
            }
            const int p0 = max(c0, forced);
            for (int pass = 3; pass >= 0; --pass) {
                const int shift = pass * 8;
                for (int i = lane; i < 256; i += 32) {
                    wc[i] = 0;
                    wm[i] = 0.0;
                }
                __syncwarp();
                for (int base = p0; base < c1; base += 4096) {  // four scores per thread in flight
                    float x[4];
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const int j = base + 1024 * u + tid;
                        x[u] = j < c1 ? sc[j] : 0.f;
                    }
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const u32 key = __float_as_uint(x[u]);
                        const bool on = base + 1024 * u + tid < c1 && (key & pmask) == prefix;
                        hist_inc_mass(wc, wm, (key >> shift) & 255, (double)x[u], on, true);
                    }
                }
                __syncthreads();
                u32* mc = cta_c[pass & 1];
                double* mm = cta_m[pass & 1];
                if (tid < 256) {  // the warps' histograms, summed in warp order
                    u32 c = 0;
                    double w = 0.0;
                    for (int v = 0; v < 32; ++v) {
                        c += ((u32*)(qa_hist + 32 * 256))[v * 256 + tid];
                        w += qa_hist[v * 256 + tid];
                    }
                    mc[tid] = c;
                    mm[tid] = w;
                }
                // every CTA's histogram is complete; the pass before's were read by all (before this
                // barrier in every CTA), so pass - 1 may overwrite them
                cluster_sync();
                if (tid < 256) {  // the cluster's, CTAs in rank order
                    u32 c = 0;
                    double w = 0.0;
                    for (u32 r = 0; r < QA_CLUSTER; ++r) {
                        c += ld_cluster_u32(&mc[tid], r);
                        w += ld_cluster_f64(&mm[tid], r);
                    }
                    hc[tid] = c;
                    hm[tid] = w;
                }
                __syncthreads();
                if (warp == 0) {
                    // where the walk down the bins (thread 0, below) can start: warp 0 sums the bins
                    // 8 per lane from the top and finds the first lane whose running mass reaches the
                    // goal; the walk then starts at that lane's bins, normally ending within them,
                    // instead of visiting up to 256 bins alone (a serial walk cost ~5 µs per pass).
                    u32 lc, ic;
                    double lm, im;
                    bins_from_top(hc, hm, lc, lm, ic, im);
                    const u32 reach = __ballot_sync(0xffffffff, lc > 0 && fsum + (s_acc + im) >= goal);
                    const int L = reach ? __ffs(reach) - 1 : 0;
                    const u32 a_skip = __shfl_sync(0xffffffff, ic - lc, L);
                    const double m_skip = __shfl_sync(0xffffffff, im - lm, L);
                    if (lane == 0) {
                        u32 a = s_above + a_skip;
                        double acc = s_acc + m_skip;
                        int chosen = -1;
                        for (int dg = 255 - 8 * L; dg >= 0; --dg) {
                            if (hc[dg] > 0 && fsum + (acc + hm[dg]) >= goal) {
                                chosen = dg;
                                break;
                            }
                            a += hc[dg];
                            acc += hm[dg];
                        }
                        if (chosen < 0) {
                            s_all = 1;
                        } else {
                            s_digit = (u32)chosen;
                            s_above = a;
                            s_acc = acc;
                        }
                    }
                }
                __syncthreads();
                if (s_all) break;
                prefix |= s_digit << shift;
                pmask |= 255u << shift;
            }
            if (s_all) {
                count = (u32)n;
            } else {
                // ties at the threshold, taken in index order until the goal is reached
                const double et = (double)__uint_as_float(prefix);
                double sum = fsum + s_acc;
                u32 t = 0;
                const u32 ties = hc[prefix & 255];
                while (t < ties) {
                    sum += et;
                    ++t;
                    if (sum >= goal) break;
                }
                count = max((u32)forced + s_above + t, mn);
            }
        }
    }
    cluster_sync();  // no CTA leaves while another may still read its shared memory
    if (tid == 0 && rank == 0) {
        if (kind == 0) bv[h] = min(count, (u32)n);
        else bs[h] = max(1u, min(count, (u32)n));
    }
}
