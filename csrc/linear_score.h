// Fused score head: logits of K rows of W for every hidden row, softmax, mean, std, and the backward.
// Plain C++/CUDA interface (no torch headers): raw device pointers, sizes, one stride per dimension,
// the device index and the caller's stream. Launchers throw std::invalid_argument for bad sizes and
// std::runtime_error for CUDA errors; the pybind11 bindings turn those into ValueError / RuntimeError.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace zr {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kMaxScoreRows = 32;

// The K rows of W (and of the optional bias) that produce the score logits: W[k] when ids is null,
// else W[ids[k]] (rows of an LM head). An id outside [0, num_rows), or one that repeats an earlier score's id,
// is never read: its logit is NaN (which makes that hidden row's statistics NaN) and its gradient rows are not
// written.
struct ScoreRows {
  const void* weight;
  int64_t num_rows;
  int64_t stride_row;
  int64_t stride_col;
  const int64_t* ids;
  const void* bias;
  int64_t stride_bias;
  int64_t k;
};

// Where a launch goes. Every launcher makes `device` current for its launches and restores the caller's
// current device afterwards, so callers need no device guard of their own.
struct Launch {
  int device;
  cudaStream_t stream;
};

// probs [N, K], mean [N], std [N]: contiguous fp32 outputs.
void linear_score_forward(DType dtype, const void* hidden, int64_t n_rows, int64_t dim, int64_t stride_hidden_row,
                          int64_t stride_hidden_col, const ScoreRows& rows, const float* values, float temperature,
                          float* probs, float* mean, float* std, const Launch& launch);

// grad_logits [N, K] (fp32, contiguous, already divided by the temperature) from the upstream gradients
// of probs [N, K], mean [N], std [N] (contiguous fp32; a null pointer is an unused output, gradient 0)
// and the saved forward outputs.
void linear_score_grad_logits(int64_t n_rows, int64_t k, const float* grad_probs, const float* grad_mean,
                              const float* grad_std, const float* probs, const float* mean, const float* std,
                              const float* values, float temperature, float* grad_logits, const Launch& launch);

// grad_hidden [N, D] (contiguous, input dtype) = grad_logits @ W[rows].
void linear_score_grad_hidden(DType dtype, const float* grad_logits, int64_t n_rows, int64_t dim,
                              const ScoreRows& rows, void* grad_hidden, const Launch& launch);

// Number of row splits the weight gradient uses; the caller allocates splits * K * D fp32 of workspace.
int64_t linear_score_weight_splits(int64_t n_rows, int64_t dim, int device);

// grad_weight rows W[rows[k]] (contiguous [num_rows, D] output, input dtype, other rows untouched) and,
// when grad_bias is not null, grad_bias[rows[k]] (contiguous [num_rows]). Deterministic: each split
// writes its own partial sums, then one pass adds them in a fixed order.
void linear_score_grad_weight(DType dtype, const float* grad_logits, const void* hidden, int64_t n_rows, int64_t dim,
                              int64_t stride_hidden_row, int64_t stride_hidden_col, const ScoreRows& rows,
                              float* workspace, int64_t splits, void* grad_weight, void* grad_bias,
                              const Launch& launch);

}  // namespace zr
