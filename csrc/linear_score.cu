// CUDA kernels for the fused score head (see linear_score.h for the interface).
//
// The matrix products here have a tiny inner side (K <= 32 score rows), so they are bandwidth-bound on
// hidden [N, D]: each block stages a [K, kChunk] slice of W in shared memory as fp32 and every warp
// streams a few hidden rows against it, accumulating in fp32 registers. K is rounded up to a
// compile-time bucket (8, 16, 32) so the accumulators stay in registers.
#include "linear_score.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace zr {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 256;            // columns of W staged per step
constexpr int kColsPerLane = kChunk / 32;
constexpr int kAccumulators = 64;      // per lane: rows-per-warp * K bucket
constexpr int kGradTileRows = 32;      // hidden rows per shared-memory tile in the weight gradient

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Row of W feeding score k, or -1 when k is padding, its id is out of range, or its id repeats an earlier
// score's (ids checked only on the device). -1 makes the score's logit NaN, so the row's outputs and gradients are
// NaN, and leaves its weight-gradient row unwritten: no two blocks ever write the same row of grad_weight.
__device__ __forceinline__ int64_t weight_row(const ScoreRows& rows, int k) {
  if (k >= rows.k) return -1;
  const int64_t r = rows.ids != nullptr ? rows.ids[k] : k;
  if (r < 0 || r >= rows.num_rows) return -1;
  if (rows.ids != nullptr) {
    for (int j = 0; j < k; ++j) {
      if (rows.ids[j] == r) return -1;
    }
  }
  return r;
}

// Stages W[rows, d0 : d0 + kChunk] into tile as fp32 (zeros for padding rows and columns past dim).
template <typename T, int KB>
__device__ __forceinline__ void stage_weight(float (*tile)[kChunk], const int64_t* row_of, const ScoreRows& rows,
                                             int64_t d0, int64_t dim) {
  const T* w = static_cast<const T*>(rows.weight);
  for (int i = threadIdx.x; i < KB * kChunk; i += kThreads) {
    const int k = i / kChunk, c = i % kChunk;
    const int64_t d = d0 + c;
    tile[k][c] = (row_of[k] >= 0 && d < dim) ? to_float(w[row_of[k] * rows.stride_row + d * rows.stride_col]) : 0.f;
  }
}

template <typename T, int KB>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(const T* __restrict__ hidden, int64_t n_rows, int64_t dim,
                                                           int64_t stride_hn, int64_t stride_hd, ScoreRows rows,
                                                           const float* __restrict__ values, float temperature,
                                                           float* __restrict__ probs, float* __restrict__ mean,
                                                           float* __restrict__ std) {
  constexpr int R = kAccumulators / KB;  // hidden rows per warp
  __shared__ float tile[KB][kChunk];
  __shared__ int64_t row_of[KB];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * R;
  if (threadIdx.x < KB) row_of[threadIdx.x] = weight_row(rows, threadIdx.x);
  __syncthreads();

  float acc[R][KB];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int k = 0; k < KB; ++k) acc[r][k] = 0.f;

  for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
    stage_weight<T, KB>(tile, row_of, rows, d0, dim);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) {
      const int c = lane + 32 * j;
      const int64_t d = d0 + c;
      float x[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t n = first + r;
        x[r] = (n < n_rows && d < dim) ? to_float(hidden[n * stride_hn + d * stride_hd]) : 0.f;
      }
#pragma unroll
      for (int k = 0; k < KB; ++k) {
        const float w = tile[k][c];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][k] = fmaf(x[r], w, acc[r][k]);
      }
    }
    __syncthreads();
  }

  // Lane k ends up holding score k's logit; the K-way softmax then runs across the warp.
  const bool bin = lane < rows.k;
  const int64_t my_row = bin ? row_of[lane] : -1;
  const float v = bin ? values[lane] : 0.f;
  float b = 0.f;
  if (rows.bias != nullptr && my_row >= 0) {
    b = to_float(static_cast<const T*>(rows.bias)[my_row * rows.stride_bias]);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float logit = 0.f;
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      const float s = warp_sum(acc[r][k]);
      if (lane == k) logit = s;
    }
    const int64_t n = first + r;
    if (n >= n_rows) continue;  // warp-uniform
    float z = bin ? (my_row >= 0 ? (logit + b) / temperature : NAN) : -INFINITY;
    // fmaxf drops NaN, so a NaN logit stays NaN through exp and the sums below.
    const float z_max = warp_max(z);
    const float e = bin ? expf(z - z_max) : 0.f;
    const float p = e / warp_sum(e);
    const float m = warp_sum(p * v);
    const float centered = bin ? v - m : 0.f;
    // Two-pass variance: a one-hot distribution gives exactly 0.
    const float s = sqrtf(warp_sum(p * centered * centered));
    if (bin) probs[n * rows.k + lane] = p;
    if (lane == 0) {
      mean[n] = m;
      std[n] = s;
    }
  }
}

__global__ void __launch_bounds__(kThreads) grad_logits_kernel(int64_t n_rows, int64_t k, const float* grad_probs,
                                                               const float* grad_mean, const float* grad_std,
                                                               const float* probs, const float* mean,
                                                               const float* std, const float* values,
                                                               float temperature, float* grad_logits) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= n_rows) return;  // warp-uniform
  const bool bin = lane < k;
  const int64_t at = n * k + lane;
  const float p = bin ? probs[at] : 0.f;
  const float v = bin ? values[lane] : 0.f;
  const float centered = v - mean[n];
  // A null upstream gradient is an unused output: it contributes nothing and is never read.
  const float g_probs = (bin && grad_probs != nullptr) ? grad_probs[at] : 0.f;
  const float g_mean = grad_mean != nullptr ? grad_mean[n] : 0.f;
  const float g_std = grad_std != nullptr ? grad_std[n] : 0.f;
  // d std / d p_k = (v_k - mean)^2 / (2 std), taken as 0 where std == 0 (as the reference does).
  const float std_scale = std[n] > 0.f ? g_std / (2.f * std[n]) : 0.f;
  const float g = bin ? g_probs + g_mean * v + std_scale * centered * centered : 0.f;
  const float dot = warp_sum(p * g);
  if (bin) grad_logits[at] = p * (g - dot) / temperature;
}

template <typename T, int KB>
__global__ void __launch_bounds__(kThreads, 2) grad_hidden_kernel(const float* __restrict__ grad_logits, int64_t n_rows,
                                                               int64_t dim, ScoreRows rows, T* __restrict__ out) {
  constexpr int R = kAccumulators / KB;
  __shared__ float tile[KB][kChunk];
  __shared__ int64_t row_of[KB];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * R;
  if (threadIdx.x < KB) row_of[threadIdx.x] = weight_row(rows, threadIdx.x);
  __syncthreads();

  float g[R][KB];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      const int64_t n = first + r;
      g[r][k] = (n < n_rows && k < rows.k) ? grad_logits[n * rows.k + k] : 0.f;
    }

  for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
    stage_weight<T, KB>(tile, row_of, rows, d0, dim);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) {
      const int c = lane + 32 * j;
      const int64_t d = d0 + c;
      float o[R];
#pragma unroll
      for (int r = 0; r < R; ++r) o[r] = 0.f;
#pragma unroll
      for (int k = 0; k < KB; ++k) {
        const float w = tile[k][c];
#pragma unroll
        for (int r = 0; r < R; ++r) o[r] = fmaf(g[r][k], w, o[r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t n = first + r;
        if (n < n_rows && d < dim) out[n * dim + d] = from_float<T>(o[r]);
      }
    }
    __syncthreads();
  }
}

// workspace[split, k, d] = sum over this split's rows n of grad_logits[n, k] * hidden[n, d].
template <typename T, int KB>
__global__ void __launch_bounds__(kThreads) weight_partials_kernel(const float* __restrict__ grad_logits,
                                                                   const T* __restrict__ hidden, int64_t n_rows,
                                                                   int64_t dim, int64_t stride_hn,
                                                                   int64_t stride_hd, int64_t k_rows,
                                                                   int64_t rows_per_split,
                                                                   float* __restrict__ workspace) {
  __shared__ float g_tile[kGradTileRows][KB];
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * rows_per_split;
  const int64_t end = n_rows < begin + rows_per_split ? n_rows : begin + rows_per_split;
  float acc[KB];
#pragma unroll
  for (int k = 0; k < KB; ++k) acc[k] = 0.f;

  for (int64_t n0 = begin; n0 < end; n0 += kGradTileRows) {
    for (int i = threadIdx.x; i < kGradTileRows * KB; i += kThreads) {
      const int r = i / KB, k = i % KB;
      const int64_t n = n0 + r;
      g_tile[r][k] = (n < end && k < k_rows) ? grad_logits[n * k_rows + k] : 0.f;
    }
    __syncthreads();
    if (d < dim) {
      const int64_t tile_rows = end - n0 < kGradTileRows ? end - n0 : kGradTileRows;
      for (int r = 0; r < tile_rows; ++r) {
        const float x = to_float(hidden[(n0 + r) * stride_hn + d * stride_hd]);
#pragma unroll
        for (int k = 0; k < KB; ++k) acc[k] = fmaf(g_tile[r][k], x, acc[k]);
      }
    }
    __syncthreads();
  }
  if (d < dim) {
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (k < k_rows) workspace[(split * k_rows + k) * dim + d] = acc[k];
    }
  }
}

// grad_weight[rows[k], d] = sum over splits (in order) of workspace[split, k, d]; grid (column blocks, K).
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_weight_partials_kernel(const float* __restrict__ workspace,
                                                                       int64_t splits, int64_t dim, ScoreRows rows,
                                                                       T* __restrict__ grad_weight) {
  const int k = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = weight_row(rows, k);
  if (row < 0 || d >= dim) return;
  float total = 0.f;
  for (int64_t s = 0; s < splits; ++s) total += workspace[(s * rows.k + k) * dim + d];
  grad_weight[row * dim + d] = from_float<T>(total);
}

// grad_bias[rows[k]] = sum over n of grad_logits[n, k]; one block per k, a fixed-order tree sum.
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_bias_kernel(const float* __restrict__ grad_logits, int64_t n_rows,
                                                             ScoreRows rows, T* __restrict__ grad_bias) {
  __shared__ float partial[kWarps];
  const int k = blockIdx.x;
  float total = 0.f;
  for (int64_t n = threadIdx.x; n < n_rows; n += kThreads) total += grad_logits[n * rows.k + k];
  total = warp_sum(total);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = total;
  __syncthreads();
  if (threadIdx.x < 32) {
    total = warp_sum(threadIdx.x < kWarps ? partial[threadIdx.x] : 0.f);
    const int64_t row = weight_row(rows, k);
    if (threadIdx.x == 0 && row >= 0) grad_bias[row] = from_float<T>(total);
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("zr_kernels CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

void check_sizes(int64_t n_rows, int64_t dim, int64_t k) {
  if (n_rows < 0 || dim < 1) throw std::invalid_argument("hidden must be [N, D] with N >= 0 and D >= 1");
  if (k < 1 || k > kMaxScoreRows) {
    throw std::invalid_argument("the score head takes 1 to " + std::to_string(kMaxScoreRows) + " rows, got K = " +
                                std::to_string(k));
  }
  if (n_rows > (int64_t{1} << 40) || dim > (int64_t{1} << 31)) throw std::invalid_argument("hidden is too large");
}

// Makes the launch's device current for one launcher call and restores the caller's device on the way out
// (also when a check throws), the way a PyTorch device guard would, without a Python context manager.
class DeviceScope {
 public:
  explicit DeviceScope(const Launch& launch) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != launch.device) check_cuda(cudaSetDevice(launch.device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

void finish(const char* what) { check_cuda(cudaGetLastError(), what); }

// Calls f with a value of the element type for dtype and the K bucket for k.
template <typename F>
void dispatch(DType dtype, int64_t k, F&& f) {
  auto by_k = [&](auto element) {
    if (k <= 8) {
      f(element, std::integral_constant<int, 8>{});
    } else if (k <= 16) {
      f(element, std::integral_constant<int, 16>{});
    } else {
      f(element, std::integral_constant<int, 32>{});
    }
  };
  switch (dtype) {
    case DType::kFloat32: by_k(float{}); break;
    case DType::kBFloat16: by_k(__nv_bfloat16{}); break;
    case DType::kFloat16: by_k(__half{}); break;
    default: throw std::invalid_argument("dtype must be float32, bfloat16 or float16");
  }
}

int64_t rows_per_block(int64_t k) { return kWarps * (kAccumulators / (k <= 8 ? 8 : k <= 16 ? 16 : 32)); }

unsigned grid_for(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

int64_t rows_per_split(int64_t n_rows, int64_t splits) { return (n_rows + splits - 1) / splits; }

}  // namespace

void linear_score_forward(DType dtype, const void* hidden, int64_t n_rows, int64_t dim, int64_t stride_hidden_row,
                          int64_t stride_hidden_col, const ScoreRows& rows, const float* values, float temperature,
                          float* probs, float* mean, float* std, const Launch& launch) {
  check_sizes(n_rows, dim, rows.k);
  if (n_rows == 0) return;
  const DeviceScope scope(launch);
  dispatch(dtype, rows.k, [&](auto element, auto bucket) {
    using T = decltype(element);
    forward_kernel<T, decltype(bucket)::value><<<grid_for(n_rows, rows_per_block(rows.k)), kThreads, 0, launch.stream>>>(
        static_cast<const T*>(hidden), n_rows, dim, stride_hidden_row, stride_hidden_col, rows, values, temperature,
        probs, mean, std);
  });
  finish("linear_score_forward");
}

void linear_score_grad_logits(int64_t n_rows, int64_t k, const float* grad_probs, const float* grad_mean,
                              const float* grad_std, const float* probs, const float* mean, const float* std,
                              const float* values, float temperature, float* grad_logits, const Launch& launch) {
  check_sizes(n_rows, 1, k);
  if (n_rows == 0) return;
  const DeviceScope scope(launch);
  grad_logits_kernel<<<grid_for(n_rows, kWarps), kThreads, 0, launch.stream>>>(
      n_rows, k, grad_probs, grad_mean, grad_std, probs, mean, std, values, temperature, grad_logits);
  finish("linear_score_grad_logits");
}

void linear_score_grad_hidden(DType dtype, const float* grad_logits, int64_t n_rows, int64_t dim,
                              const ScoreRows& rows, void* grad_hidden, const Launch& launch) {
  check_sizes(n_rows, dim, rows.k);
  if (n_rows == 0) return;
  const DeviceScope scope(launch);
  dispatch(dtype, rows.k, [&](auto element, auto bucket) {
    using T = decltype(element);
    grad_hidden_kernel<T, decltype(bucket)::value><<<grid_for(n_rows, rows_per_block(rows.k)), kThreads, 0, launch.stream>>>(
        grad_logits, n_rows, dim, rows, static_cast<T*>(grad_hidden));
  });
  finish("linear_score_grad_hidden");
}

int64_t linear_score_weight_splits(int64_t n_rows, int64_t dim, int device) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  // About four blocks per SM in total, and at least 64 rows per split so the partial sums stay small.
  const int64_t column_blocks = (dim + kThreads - 1) / kThreads;
  const int64_t wanted = (4 * static_cast<int64_t>(sms) + column_blocks - 1) / column_blocks;
  const int64_t most = std::max<int64_t>(1, (n_rows + 63) / 64);
  return std::clamp<int64_t>(wanted, 1, std::min<int64_t>(most, 65535));
}

void linear_score_grad_weight(DType dtype, const float* grad_logits, const void* hidden, int64_t n_rows, int64_t dim,
                              int64_t stride_hidden_row, int64_t stride_hidden_col, const ScoreRows& rows,
                              float* workspace, int64_t splits, void* grad_weight, void* grad_bias,
                              const Launch& launch) {
  check_sizes(n_rows, dim, rows.k);
  if (splits < 1 || splits > 65535) throw std::invalid_argument("splits must lie in [1, 65535]");
  const DeviceScope scope(launch);
  const int64_t per_split = std::max<int64_t>(1, rows_per_split(n_rows, splits));
  const dim3 partial_grid(grid_for(dim, kThreads), static_cast<unsigned>(splits));
  const dim3 sum_grid(grid_for(dim, kThreads), static_cast<unsigned>(rows.k));
  dispatch(dtype, rows.k, [&](auto element, auto bucket) {
    using T = decltype(element);
    weight_partials_kernel<T, decltype(bucket)::value><<<partial_grid, kThreads, 0, launch.stream>>>(
        grad_logits, static_cast<const T*>(hidden), n_rows, dim, stride_hidden_row, stride_hidden_col, rows.k,
        per_split, workspace);
    sum_weight_partials_kernel<T><<<sum_grid, kThreads, 0, launch.stream>>>(workspace, splits, dim, rows,
                                                                           static_cast<T*>(grad_weight));
    if (grad_bias != nullptr) {
      grad_bias_kernel<T><<<static_cast<unsigned>(rows.k), kThreads, 0, launch.stream>>>(grad_logits, n_rows, rows,
                                                                                        static_cast<T*>(grad_bias));
    }
  });
  finish("linear_score_grad_weight");
}

}  // namespace zr
