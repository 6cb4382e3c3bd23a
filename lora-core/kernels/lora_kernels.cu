// lora-toolkit's own CUDA kernels, compiled to PTX by build.rs with the `cuda` feature and launched
// from src/engine/kernels/cuda/mod.rs. Each replaces a sequence of candle's generic kernels that run
// far below memory bandwidth: strided copies that divide
// per element, a softmax with one warp per row and four passes over memory, broadcast binary ops,
// and the normalisations' backward passes composed from a dozen f32 elementwise kernels.
//
// Conventions: every tensor argument is contiguous unless a kernel says otherwise; half-precision
// values are computed in f32; kernels named `NAME_f32`, `NAME_f16`, `NAME_bf16` take that dtype,
// copies (`NAME_u16` ... `NAME_u128`) move raw units of that many bits and serve every dtype.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The sum of `v` over the block, returned to every thread. blockDim.x is a multiple of 32;
// `scratch` holds 33 floats. Safe to call repeatedly with the same scratch.
__device__ float block_sum(float v, float *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // every thread has read the previous call's total
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < warps ? scratch[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) scratch[32] = t;
  }
  __syncthreads();
  return scratch[32];
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }

// ---------------------------------------------------------------------------------------------
// Softmax over the last axis of `[rows, cols]`, one warp per row. The first pass keeps a running
// maximum and the sum of exponentials relative to it (online softmax); the second writes
// exp(x − max) / sum. The row is read twice and written once; candle's kernel reads it twice and
// writes it twice, with exponentials rounded to the input's precision in between.
// `P` values per lane per load: PACKED kernels need cols % P == 0 and a 16-byte aligned start.

template <typename T, int P> struct alignas(sizeof(T) * P) Pack {
  T v[P];
};

// A row's maximum `m` and 1 / Σ exp(x − m), for the warp reading it (`packs` packs, this thread
// being `lane`): a running maximum and the sum relative to it per lane, then combined across the
// warp; every lane gets both.
template <typename T, int P>
__device__ void row_statistics(const Pack<T, P> *row, unsigned packs, unsigned lane, float &m,
                               float &inv) {
  float s = 0.f;
  m = -INFINITY;
  for (unsigned k = lane; k < packs; k += 32) {
    const Pack<T, P> p = row[k];
#pragma unroll
    for (int e = 0; e < P; ++e) {
      const float v = to_float(p.v[e]);
      if (v > m) {
        s = s * __expf(m - v) + 1.f;
        m = v;
      } else {
        s += __expf(v - m);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    const float mx = fmaxf(m, m2);
    // A lane that saw no value has s == 0 and m == −inf: it adds nothing (and no NaN).
    s = (s == 0.f ? 0.f : s * __expf(m - mx)) + (s2 == 0.f ? 0.f : s2 * __expf(m2 - mx));
    m = mx;
  }
  inv = 1.f / s;
}

template <typename T, int P>
__device__ void softmax_rows(const T *x, T *y, unsigned rows, unsigned cols) {
  const unsigned warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  const unsigned packs = cols / P;
  for (size_t row = (size_t)blockIdx.x * warps + (threadIdx.x >> 5); row < rows;
       row += (size_t)gridDim.x * warps) {
    const Pack<T, P> *xr = reinterpret_cast<const Pack<T, P> *>(x + row * cols);
    Pack<T, P> *yr = reinterpret_cast<Pack<T, P> *>(y + row * cols);
    float m, inv;
    row_statistics<T, P>(xr, packs, lane, m, inv);
    for (unsigned k = lane; k < packs; k += 32) {
      const Pack<T, P> p = xr[k];
      Pack<T, P> q;
#pragma unroll
      for (int e = 0; e < P; ++e) q.v[e] = from_float<T>(__expf(to_float(p.v[e]) - m) * inv);
      yr[k] = q;
    }
  }
}

// Attention backward, per block of score rows: P = softmax(S) and dS = P ⊙ (dP − δ) from the
// scores S and dP − δ (both `[rows, cols]`), written as out[0] = P, out[1] = dS `[2, rows, cols]`:
// one pass after the row statistics where a softmax then a product take two.
template <typename T, int P>
__device__ void softmax_times(const T *s, const T *d, T *out, unsigned rows, unsigned cols) {
  const unsigned warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  const unsigned packs = cols / P;
  const size_t plane = (size_t)rows * cols;
  for (size_t row = (size_t)blockIdx.x * warps + (threadIdx.x >> 5); row < rows;
       row += (size_t)gridDim.x * warps) {
    const Pack<T, P> *sr = reinterpret_cast<const Pack<T, P> *>(s + row * cols);
    const Pack<T, P> *dr = reinterpret_cast<const Pack<T, P> *>(d + row * cols);
    Pack<T, P> *pr = reinterpret_cast<Pack<T, P> *>(out + row * cols);
    Pack<T, P> *gr = reinterpret_cast<Pack<T, P> *>(out + plane + row * cols);
    float m, inv;
    row_statistics<T, P>(sr, packs, lane, m, inv);
    for (unsigned k = lane; k < packs; k += 32) {
      const Pack<T, P> sp = sr[k], dp = dr[k];
      Pack<T, P> pp, gp;
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float prob = __expf(to_float(sp.v[e]) - m) * inv;
        pp.v[e] = from_float<T>(prob);
        gp.v[e] = from_float<T>(prob * to_float(dp.v[e]));
      }
      pr[k] = pp;
      gr[k] = gp;
    }
  }
}

// [g | −rowsum(g ⊙ o)] `[rows, d + 1]` for g, o `[rows, d]`, one warp per row (the sum in f32):
// the left operand of attention's backward product [dO | −δ]·[v | 1]ᵀ = dP − δ in one pass.
template <typename T>
__device__ void append_neg_row_dot(const T *g, const T *o, T *out, unsigned rows, unsigned d) {
  const unsigned warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (size_t row = (size_t)blockIdx.x * warps + (threadIdx.x >> 5); row < rows;
       row += (size_t)gridDim.x * warps) {
    const T *gr = g + row * d, *orow = o + row * d;
    T *out_row = out + row * (d + 1);
    float acc = 0.f;
    for (unsigned c = lane; c < d; c += 32) {
      const T gv = gr[c];
      acc += to_float(gv) * to_float(orow[c]);
      out_row[c] = gv;
    }
    acc = warp_sum(acc);
    if (lane == 0) out_row[d] = from_float<T>(-acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Strided → contiguous copies, in units of W (2, 4, 8 or 16 bytes: the caller picks the widest
// unit dividing every stride, the run length and the start offset).
//
// copy_runs: the source is `outer_rank` strided axes over runs of `run` contiguous units (split
// and merged attention heads, narrowed rows). One division per unit for the run and one per outer
// axis; candle's copy divides per element per axis, on 2-byte elements.

struct Runs {
  unsigned dims[6];
  unsigned strides[6];
};

template <typename W>
__device__ void copy_runs(const W *src, W *dst, Runs v, int outer_rank, unsigned run,
                          unsigned total) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += gridDim.x * blockDim.x) {
    unsigned r = i / run;
    unsigned off = i - r * run;
    for (int d = outer_rank - 1; d >= 0; --d) {
      const unsigned q = r / v.dims[d];
      off += (r - q * v.dims[d]) * v.strides[d];
      r = q;
    }
    dst[i] = src[off];
  }
}

// transpose_tiles: dst[b][p][q] = src[b·batch_stride + p + q·q_stride] (the source's unit-stride
// axis is p, not the last one: the NCHW ↔ token permutes). Through 32×32 shared-memory tiles so
// that both the reads and the writes are coalesced.
template <typename W>
__device__ void transpose_tiles(const W *src, W *dst, unsigned batch, unsigned P, unsigned Q,
                                unsigned batch_stride, unsigned q_stride) {
  __shared__ W tile[32][33];
  const unsigned p0 = blockIdx.x * 32, q0 = blockIdx.y * 32;
  for (unsigned b = blockIdx.z; b < batch; b += gridDim.z) {
    const W *s = src + (size_t)b * batch_stride;
    W *d = dst + (size_t)b * P * Q;
    for (unsigned j = threadIdx.y; j < 32; j += blockDim.y) {
      const unsigned p = p0 + threadIdx.x, q = q0 + j;
      if (p < P && q < Q) tile[j][threadIdx.x] = s[p + (size_t)q * q_stride];
    }
    __syncthreads();
    for (unsigned j = threadIdx.y; j < 32; j += blockDim.y) {
      const unsigned p = p0 + j, q = q0 + threadIdx.x;
      if (p < P && q < Q) d[(size_t)p * Q + q] = tile[threadIdx.x][j];
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Per-channel affine, optionally followed by SiLU: y = act(x·scale[c] + shift[c]) over x viewed
// as `[rows, cols]`, with channel c = row % channels (`per_row`: NCHW maps, c over B·C rows) or
// c = col (a bias over the last axis). `scale` and `shift` are rows `scale_at` and `shift_at`
// (−1: none) of `params` `[k, channels]`. One pass where candle's broadcast mul and add take two,
// each with divisions per element.
template <typename T>
__device__ void channel_affine(const T *x, const T *params, T *y, unsigned rows, unsigned cols,
                               unsigned channels, int per_row, int scale_at, int shift_at,
                               int silu) {
  const T *scale = scale_at >= 0 ? params + (size_t)scale_at * channels : nullptr;
  const T *shift = shift_at >= 0 ? params + (size_t)shift_at * channels : nullptr;
  for (unsigned r = blockIdx.y; r < rows; r += gridDim.y) {
    const size_t base = (size_t)r * cols;
    const unsigned row_channel = per_row ? r % channels : 0;
    for (unsigned c = blockIdx.x * blockDim.x + threadIdx.x; c < cols;
         c += gridDim.x * blockDim.x) {
      const unsigned ch = per_row ? row_channel : c;
      float v = to_float(x[base + c]);
      if (scale) v *= to_float(scale[ch]);
      if (shift) v += to_float(shift[ch]);
      if (silu) v *= sigmoid(v);
      y[base + c] = from_float<T>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Group norm's input gradient, one block per (sample, group) of x `[B, C, L]` (L = H·W), with the
// frozen affine `wb` = [weight; bias] `[2, C]`, optionally through the SiLU that followed it:
// x̂ = (x − μ)·r, z = x̂·w + b, dz = dy·σ(z)(1 + z(1 − σ(z))) after a SiLU (else dy), g = dz·w,
// dx = r·(g − mean(g) − x̂·mean(g·x̂)). Statistics in f32, recomputed rather than stored.
// For one element of a group: its standardised value x̂ and g = dz·w, dz taken through the SiLU
// that followed the affine when `silu`.
template <typename T>
__device__ __forceinline__ float2 standardized_and_g(T x, T dy, T w, T b, float mean, float rstd,
                                                     int silu) {
  const float xh = (to_float(x) - mean) * rstd, wc = to_float(w);
  float dz = to_float(dy);
  if (silu) {
    const float z = xh * wc + to_float(b), s = sigmoid(z);
    dz *= s * (1.f + z * (1.f - s));
  }
  return make_float2(xh, dz * wc);
}

template <typename T>
__device__ void group_norm_backward(const T *x, const T *dy, const T *wb, T *dx, unsigned C,
                                    unsigned L, unsigned groups, float eps, int silu) {
  __shared__ float scratch[33];
  const unsigned per_group = C / groups, n = per_group * L;
  const unsigned g = blockIdx.x % groups;
  // The group's channels are consecutive: its values are one contiguous run of n.
  const size_t base = (size_t)blockIdx.x * n;
  const T *xs = x + base, *dys = dy + base;
  T *dxs = dx + base;
  const T *w = wb, *bias = wb + C;
  float acc = 0.f;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) acc += to_float(xs[i]);
  const float mean = block_sum(acc, scratch) / n;
  acc = 0.f;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = to_float(xs[i]) - mean;
    acc += d * d;
  }
  const float rstd = rsqrtf(block_sum(acc, scratch) / n + eps);
  float sum_g = 0.f, sum_gx = 0.f;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
    const unsigned c = g * per_group + i / L;
    const float2 xg = standardized_and_g(xs[i], dys[i], w[c], bias[c], mean, rstd, silu);
    sum_g += xg.y;
    sum_gx += xg.y * xg.x;
  }
  const float mean_g = block_sum(sum_g, scratch) / n;
  const float mean_gx = block_sum(sum_gx, scratch) / n;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
    const unsigned c = g * per_group + i / L;
    const float2 xg = standardized_and_g(xs[i], dys[i], w[c], bias[c], mean, rstd, silu);
    dxs[i] = from_float<T>(rstd * (xg.y - mean_g - xg.x * mean_gx));
  }
}

// Layer norm's input gradient over the last axis of x `[rows, C]` with the frozen weight w `[C]`,
// one warp per row: the same formula as group norm's without the SiLU.
template <typename T>
__device__ void layer_norm_backward(const T *x, const T *dy, const T *w, T *dx, unsigned rows,
                                    unsigned C, float eps) {
  const unsigned warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (size_t row = (size_t)blockIdx.x * warps + (threadIdx.x >> 5); row < rows;
       row += (size_t)gridDim.x * warps) {
    const T *xr = x + row * C, *dyr = dy + row * C;
    T *dxr = dx + row * C;
    float acc = 0.f;
    for (unsigned c = lane; c < C; c += 32) acc += to_float(xr[c]);
    const float mean = warp_sum(acc) / C;
    acc = 0.f;
    for (unsigned c = lane; c < C; c += 32) {
      const float d = to_float(xr[c]) - mean;
      acc += d * d;
    }
    const float rstd = rsqrtf(warp_sum(acc) / C + eps);
    float sum_g = 0.f, sum_gx = 0.f;
    for (unsigned c = lane; c < C; c += 32) {
      const float gi = to_float(dyr[c]) * to_float(w[c]);
      sum_g += gi;
      sum_gx += gi * (to_float(xr[c]) - mean) * rstd;
    }
    const float mean_g = warp_sum(sum_g) / C, mean_gx = warp_sum(sum_gx) / C;
    for (unsigned c = lane; c < C; c += 32) {
      const float gi = to_float(dyr[c]) * to_float(w[c]);
      const float xh = (to_float(xr[c]) - mean) * rstd;
      dxr[c] = from_float<T>(rstd * (gi - mean_g - xh * mean_gx));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GEGLU over h `[rows, 2n]` = [hidden | gate]: y = hidden·gelu(gate) `[rows, n]` with the exact
// (erf) GELU, and its input gradient [dy·gelu(gate) | dy·hidden·(Φ(gate) + gate·φ(gate))].

__device__ __forceinline__ float gelu_cdf(float g) { return 0.5f * (1.f + erff(g * 0.70710678f)); }

template <typename T>
__device__ void geglu_forward(const T *h, T *y, unsigned rows, unsigned n) {
  for (unsigned r = blockIdx.y; r < rows; r += gridDim.y) {
    const T *hr = h + (size_t)r * 2 * n;
    for (unsigned c = blockIdx.x * blockDim.x + threadIdx.x; c < n; c += gridDim.x * blockDim.x) {
      const float gate = to_float(hr[n + c]);
      y[(size_t)r * n + c] = from_float<T>(to_float(hr[c]) * gate * gelu_cdf(gate));
    }
  }
}

template <typename T>
__device__ void geglu_backward(const T *h, const T *dy, T *dh, unsigned rows, unsigned n) {
  for (unsigned r = blockIdx.y; r < rows; r += gridDim.y) {
    const T *hr = h + (size_t)r * 2 * n;
    T *dhr = dh + (size_t)r * 2 * n;
    for (unsigned c = blockIdx.x * blockDim.x + threadIdx.x; c < n; c += gridDim.x * blockDim.x) {
      const float gate = to_float(hr[n + c]), d = to_float(dy[(size_t)r * n + c]);
      const float cdf = gelu_cdf(gate);
      const float pdf = 0.39894228f * __expf(-0.5f * gate * gate);
      dhr[c] = from_float<T>(d * gate * cdf);
      dhr[n + c] = from_float<T>(d * to_float(hr[c]) * (cdf + gate * pdf));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The stride-1 adjoint of a convolution kernel w `[O, I, kh, kw]`: `[I, O, kh, kw]` with both
// spatial axes flipped, a[i][o][t] = w[o][i][kh·kw − 1 − t] over the taps t. One gather pass, so
// a layer's backward can build it each time instead of keeping a copy of every kernel.
template <typename T>
__device__ void conv_adjoint(const T *w, T *a, unsigned O, unsigned I, unsigned taps) {
  const unsigned n = O * I * taps;
  for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
    const unsigned t = j % taps, io = j / taps, o = io % O, i = io / O;
    a[j] = w[((size_t)o * I + i) * taps + (taps - 1 - t)];
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points.

#define FLOAT_KERNELS(T, S)                                                                     \
  extern "C" __global__ void softmax_##S(const T *x, T *y, unsigned rows, unsigned cols) {      \
    softmax_rows<T, 1>(x, y, rows, cols);                                                       \
  }                                                                                             \
  extern "C" __global__ void softmax_packed_##S(const T *x, T *y, unsigned rows, unsigned cols) { \
    softmax_rows<T, 16 / sizeof(T)>(x, y, rows, cols);                                          \
  }                                                                                             \
  extern "C" __global__ void softmax_times_##S(const T *s, const T *d, T *out, unsigned rows,    \
                                               unsigned cols) {                                 \
    softmax_times<T, 1>(s, d, out, rows, cols);                                                 \
  }                                                                                             \
  extern "C" __global__ void softmax_times_packed_##S(const T *s, const T *d, T *out,           \
                                                      unsigned rows, unsigned cols) {           \
    softmax_times<T, 16 / sizeof(T)>(s, d, out, rows, cols);                                    \
  }                                                                                             \
  extern "C" __global__ void append_neg_row_dot_##S(const T *g, const T *o, T *out,             \
                                                    unsigned rows, unsigned d) {                \
    append_neg_row_dot<T>(g, o, out, rows, d);                                                  \
  }                                                                                             \
  extern "C" __global__ void channel_affine_##S(const T *x, const T *params, T *y, unsigned rows, \
                                                unsigned cols, unsigned channels, int per_row,   \
                                                int scale_at, int shift_at, int silu) {          \
    channel_affine<T>(x, params, y, rows, cols, channels, per_row, scale_at, shift_at, silu);   \
  }                                                                                             \
  extern "C" __global__ void group_norm_backward_##S(const T *x, const T *dy, const T *wb,       \
                                                     T *dx, unsigned C, unsigned L,              \
                                                     unsigned groups, float eps, int silu) {     \
    group_norm_backward<T>(x, dy, wb, dx, C, L, groups, eps, silu);                             \
  }                                                                                             \
  extern "C" __global__ void layer_norm_backward_##S(const T *x, const T *dy, const T *w, T *dx, \
                                                     unsigned rows, unsigned C, float eps) {     \
    layer_norm_backward<T>(x, dy, w, dx, rows, C, eps);                                         \
  }                                                                                             \
  extern "C" __global__ void geglu_forward_##S(const T *h, T *y, unsigned rows, unsigned n) {   \
    geglu_forward<T>(h, y, rows, n);                                                            \
  }                                                                                             \
  extern "C" __global__ void geglu_backward_##S(const T *h, const T *dy, T *dh, unsigned rows,  \
                                                unsigned n) {                                   \
    geglu_backward<T>(h, dy, dh, rows, n);                                                      \
  }                                                                                             \
  extern "C" __global__ void conv_adjoint_##S(const T *w, T *a, unsigned O, unsigned I,         \
                                              unsigned taps) {                                  \
    conv_adjoint<T>(w, a, O, I, taps);                                                          \
  }

FLOAT_KERNELS(float, f32)
FLOAT_KERNELS(__half, f16)
FLOAT_KERNELS(__nv_bfloat16, bf16)

#define COPY_RUNS(W, S)                                                                         \
  extern "C" __global__ void copy_runs_##S(const W *src, W *dst, Runs v, int outer_rank,        \
                                           unsigned run, unsigned total) {                      \
    copy_runs<W>(src, dst, v, outer_rank, run, total);                                          \
  }

COPY_RUNS(uint16_t, u16)
COPY_RUNS(uint32_t, u32)
COPY_RUNS(uint2, u64)
COPY_RUNS(uint4, u128)

#define TRANSPOSE_TILES(W, S)                                                                   \
  extern "C" __global__ void transpose_tiles_##S(const W *src, W *dst, unsigned batch,          \
                                                 unsigned P, unsigned Q, unsigned batch_stride, \
                                                 unsigned q_stride) {                           \
    transpose_tiles<W>(src, dst, batch, P, Q, batch_stride, q_stride);                          \
  }

TRANSPOSE_TILES(uint16_t, u16)
TRANSPOSE_TILES(uint32_t, u32)
