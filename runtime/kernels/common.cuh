// Shared device helpers for attnplan's kernels: headerless (bf16 as raw u16, PTX inline), so NVRTC
// needs no include path. Prepended to each kernel source by the Rust side (see exec/cuda/device.rs).
//
// Fragment layouts are those of `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`
// (g = lane / 4, t = lane % 4):
//   A (16x16, row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16x8, "col"):      b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C (16x8, f32):        c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (__int_as_float(0xff800000))
#define POS_NONE 0x7fffffff

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte async copy global -> shared; `bytes` is 16 or 0 (0 zero-fills the destination).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}
// 16-byte async copy global -> shared of a row known to exist.
__device__ __forceinline__ void cp_async16_full(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// c += a * b, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 to packed bf16x2 (round to nearest even): `lo` in bits 0..15.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float bf16_to_f32(bf16_t x) { return __uint_as_float(((u32)x) << 16); }

// Byte offset of 16-byte chunk `c` of row `r` in a tile of rows of `D` bf16 values, XOR-swizzled so
// that the 8 rows an ldmatrix phase reads fall in 8 different bank groups.
template <int D>
__device__ __forceinline__ u32 swz(int r, int c) {
    return (u32)(r * D * 2 + ((c ^ (r & 7)) << 4));
}

// Loads one 64 x D bf16 tile of rows `pos[r]` (rows with pos == POS_NONE are zero-filled) from
// `base` (row stride D) into swizzled shared memory at `dst`, with 128 threads.
template <int D>
__device__ __forceinline__ void load_rows_async(u32 dst, const bf16_t* base, int r, int pos, int c) {
    const bool ok = pos != POS_NONE;
    const bf16_t* src = base + (ok ? (u64)pos * D + c * 8 : 0);
    cp_async16(dst + swz<D>(r, c), src, ok ? 16 : 0);
}

// Exclusive scan of one value per thread over a 1024-thread block; returns the prefix, sets *total.
// Every thread of the block must call it.
__device__ __forceinline__ u32 block_scan_1024(u32 x, u32* total) {
    __shared__ u32 ws[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 inc = x;
#pragma unroll
    for (int sh = 1; sh < 32; sh <<= 1) {
        const u32 y = __shfl_up_sync(0xffffffff, inc, sh);
        if (lane >= sh) inc += y;
    }
    __syncthreads();  // ws may still be read by a previous call
    if (lane == 31) ws[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        const u32 w = ws[lane];
        u32 wi = w;
#pragma unroll
        for (int sh = 1; sh < 32; sh <<= 1) {
            const u32 y = __shfl_up_sync(0xffffffff, wi, sh);
            if (lane >= sh) wi += y;
        }
        ws[lane] = wi - w;
        if (lane == 31) *total = wi;
    }
    __syncthreads();
    return ws[warp] + inc - x;
}

// This warp's part [a, b) of items [lo, hi) when a 1024-thread block splits them into 32 contiguous runs
// of a multiple of 32 items: a warp then walks its run 32 items at a time (coalesced) in the items'
// order.
__device__ __forceinline__ void warp_run_1024(int lo, int hi, int& a, int& b) {
    const int run = ((hi - lo + 1023) / 1024) * 32;
    a = min(hi, lo + (int)(threadIdx.x >> 5) * run);
    b = min(hi, a + run);
}

// The same for items [0, n).
__device__ __forceinline__ void warp_run_1024(int n, int& a, int& b) {
    warp_run_1024(0, n, a, b);
}

// The sum of v over the warps before this one in a 1024-thread block (v the same in every lane of a
// warp); *total gets the sum over all warps. Every thread of the block must call it.
__device__ __forceinline__ u32 warps_before_1024(u32 v, u32* total) {
    return block_scan_1024((threadIdx.x & 31) == 31 ? v : 0u, total);
}

// Of per-warp values sums[0..WARPS) (in shared memory, written before a __syncthreads): the sum over
// the warps before `warp`, and in `total` over all WARPS.
template <int WARPS, typename T>
__device__ __forceinline__ T warp_sums_before(const T* sums, int warp, T& total) {
    T before = 0;
    total = 0;
#pragma unroll
    for (int k = 0; k < WARPS; ++k) {
        const T v = sums[k];
        before += k < warp ? v : (T)0;
        total += v;
    }
    return before;
}

// hist[bin] += 1 for every lane with `on`, one shared atomic per distinct bin of the warp (scores fall in
// few bins, where per-lane atomics serialize). Every lane of the warp must call it.
__device__ __forceinline__ void hist_inc(u32* hist, u32 bin, bool on) {
    const u32 act = __ballot_sync(0xffffffffu, on);
    if (on) {
        const u32 peers = __match_any_sync(act, bin);
        if (__ffs(peers) - 1 == (int)(threadIdx.x & 31)) atomicAdd(&hist[bin], (u32)__popc(peers));
    }
}

// Thread block clusters (sm_90): this CTA's rank in its cluster, a barrier over the cluster's threads
// (release / acquire: shared memory written before it is visible to the cluster's CTAs after it), and
// a u32 or an f64 at the same shared-memory address in CTA `rank` of the cluster.
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}

// The address of this CTA's shared-memory location `p` in CTA `rank` of the cluster.
__device__ __forceinline__ u32 cluster_addr(const void* p, u32 rank) {
    const u32 a = (u32)__cvta_generic_to_shared(p);
    u32 ra;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(a), "r"(rank));
    return ra;
}

__device__ __forceinline__ u32 ld_cluster_u32(const u32* p, u32 rank) {
    u32 v;
    asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(cluster_addr(p, rank)) : "memory");
    return v;
}

__device__ __forceinline__ double ld_cluster_f64(const double* p, u32 rank) {
    double v;
    asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(cluster_addr(p, rank)) : "memory");
    return v;
}

// The sum of the value at `p` (this CTA's shared-memory location) over the cluster's SIZE CTAs, in rank
// order (the same order, hence the same f64 rounding, in every CTA).
template <int SIZE>
__device__ __forceinline__ u32 cluster_sum(const u32* p) {
    u32 t = 0;
    for (u32 r = 0; r < SIZE; ++r) t += ld_cluster_u32(p, r);
    return t;
}
template <int SIZE>
__device__ __forceinline__ double cluster_sum(const double* p) {
    double t = 0.0;
    for (u32 r = 0; r < SIZE; ++r) t += ld_cluster_f64(p, r);
    return t;
}

// The items [c0, c1) of n that CTA `rank` of a cluster of `size` takes: contiguous segments of a
// multiple of 32 items, in rank order.
__device__ __forceinline__ void cluster_segment(int n, int size, u32 rank, int& c0, int& c1) {
    const int seg = ((n + size - 1) / size + 31) & ~31;
    c0 = min(n, (int)rank * seg);
    c1 = min(n, c0 + seg);
}

// Threads per CTA of the list fills (`vs_fill`, `ts_fill`: a CTA per (head, query block); host
// `FILL_THREADS`).
#define FILL_THREADS 128

// dst[0..count) = src[0..count) by `stride` threads, this one starting at `first`, four loads in flight
// per thread (a warp: first = lane, stride = 32; a CTA: threadIdx.x, blockDim.x).
__device__ __forceinline__ void strided_copy(u32* __restrict__ dst, const u32* __restrict__ src, u32 count,
                                             u32 first, u32 stride) {
    for (u32 i0 = first; i0 < count; i0 += 4 * stride) {
        u32 x[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 i = i0 + u * stride;
            x[u] = i < count ? src[i] : 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 i = i0 + u * stride;
            if (i < count) dst[i] = x[u];
        }
    }
}

// hc[bin] += 1 and, with `mass`, hm[bin] += x for every lane with `on`. When all such lanes of the warp
// share one bin (the first radix passes, where scores share their exponent) a warp reduction and one
// atomic pair replace 32 serialized ones; otherwise each lane adds its own. Every lane must call it.
__device__ __forceinline__ void hist_inc_mass(u32* hc, double* hm, u32 bin, double x, bool on, bool mass) {
    const u32 act = __ballot_sync(0xffffffffu, on);
    if (act == 0) return;
    const int first = __ffs(act) - 1;
    const u32 b0 = __shfl_sync(0xffffffffu, bin, first);
    if (__all_sync(0xffffffffu, !on || bin == b0)) {
        double sum = on ? x : 0.0;
        if (mass) {
#pragma unroll
            for (int sh = 16; sh >= 1; sh >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, sh);
        }
        if ((int)(threadIdx.x & 31) == first) {
            atomicAdd(&hc[b0], (u32)__popc(act));
            if (mass) atomicAdd(&hm[b0], sum);
        }
    } else if (on) {
        atomicAdd(&hc[bin], 1u);
        if (mass) atomicAdd(&hm[bin], x);
    }
}

// 256 digit bins seen from the top by one warp (a radix walk that looks for the digit where a running
// count or mass reaches a goal): lane l sums bins 255 - 8l down to 248 - 8l into lc (counts) and lm
// (masses, when hm is given) and gets the inclusive sums over lanes 0..=l, ic and im. Every lane of the
// warp must call it.
__device__ __forceinline__ void bins_from_top(const u32* hc, const double* hm, u32& lc, double& lm, u32& ic,
                                              double& im) {
    const int lane = threadIdx.x & 31;
    lc = 0;
    lm = 0.0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        lc += hc[255 - 8 * lane - j];
        if (hm) lm += hm[255 - 8 * lane - j];
    }
    ic = lc;
    im = lm;
#pragma unroll
    for (int sh = 1; sh < 32; sh <<= 1) {
        const u32 yc = __shfl_up_sync(0xffffffffu, ic, sh);
        const double ym = __shfl_up_sync(0xffffffffu, im, sh);
        if (lane >= sh) {
            ic += yc;
            im += ym;
        }
    }
}
