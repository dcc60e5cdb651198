// pybind11 module zr_kernels._C: the fused score-head launchers, called with raw pointers (ints),
// sizes, strides, the device index and the CUDA stream handle. Importing it makes no CUDA call, so it
// imports on machines without a GPU. std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "linear_score.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

zr::Launch launch(int device, std::uintptr_t stream) { return {device, reinterpret_cast<cudaStream_t>(stream)}; }

zr::ScoreRows score_rows(std::uintptr_t weight, int64_t num_rows, int64_t stride_row, int64_t stride_col,
                         std::uintptr_t ids, std::uintptr_t bias, int64_t stride_bias, int64_t k) {
  return {ptr<const void>(weight), num_rows, stride_row, stride_col, ptr<const int64_t>(ids), ptr<const void>(bias),
          stride_bias, k};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA launchers of the zr_kernels fused score head (see zr_kernels/linear_score.py)";
  m.attr("MAX_SCORE_ROWS") = zr::kMaxScoreRows;
  m.attr("DTYPES") = py::make_tuple("float32", "bfloat16", "float16");

  m.def(
      "forward",
      [](int dtype, std::uintptr_t hidden, int64_t n_rows, int64_t dim, int64_t stride_hn, int64_t stride_hd,
         std::uintptr_t weight, int64_t num_rows, int64_t stride_wr, int64_t stride_wd, std::uintptr_t ids,
         std::uintptr_t bias, int64_t stride_b, int64_t k, std::uintptr_t values, double temperature,
         std::uintptr_t probs, std::uintptr_t mean, std::uintptr_t std, int device, std::uintptr_t stream) {
        zr::linear_score_forward(static_cast<zr::DType>(dtype), ptr<const void>(hidden), n_rows, dim, stride_hn,
                                 stride_hd, score_rows(weight, num_rows, stride_wr, stride_wd, ids, bias, stride_b, k),
                                 ptr<const float>(values), static_cast<float>(temperature), ptr<float>(probs),
                                 ptr<float>(mean), ptr<float>(std), launch(device, stream));
      },
      "probs [N, K], mean [N], std [N] (fp32) of softmax((hidden @ W[rows].T + bias[rows]) / temperature)");

  m.def(
      "grad_logits",
      [](int64_t n_rows, int64_t k, std::uintptr_t grad_probs, std::uintptr_t grad_mean, std::uintptr_t grad_std,
         std::uintptr_t probs, std::uintptr_t mean, std::uintptr_t std, std::uintptr_t values, double temperature,
         std::uintptr_t out, int device, std::uintptr_t stream) {
        zr::linear_score_grad_logits(n_rows, k, ptr<const float>(grad_probs), ptr<const float>(grad_mean),
                                     ptr<const float>(grad_std), ptr<const float>(probs), ptr<const float>(mean),
                                     ptr<const float>(std), ptr<const float>(values), static_cast<float>(temperature),
                                     ptr<float>(out), launch(device, stream));
      },
      "gradient of the K logits [N, K] (fp32) from the upstream gradients of probs, mean and std");

  m.def(
      "grad_hidden",
      [](int dtype, std::uintptr_t grad_logits, int64_t n_rows, int64_t dim, std::uintptr_t weight, int64_t num_rows,
         int64_t stride_wr, int64_t stride_wd, std::uintptr_t ids, int64_t k, std::uintptr_t out, int device,
         std::uintptr_t stream) {
        zr::linear_score_grad_hidden(static_cast<zr::DType>(dtype), ptr<const float>(grad_logits), n_rows, dim,
                                     score_rows(weight, num_rows, stride_wr, stride_wd, ids, 0, 0, k), ptr<void>(out),
                                     launch(device, stream));
      },
      "grad_hidden [N, D] (contiguous, input dtype) = grad_logits @ W[rows]");

  m.def("weight_splits", &zr::linear_score_weight_splits, py::arg("n_rows"), py::arg("dim"), py::arg("device"),
        "row splits of the weight gradient (workspace: splits * K * D fp32)");

  m.def(
      "grad_weight",
      [](int dtype, std::uintptr_t grad_logits, std::uintptr_t hidden, int64_t n_rows, int64_t dim, int64_t stride_hn,
         int64_t stride_hd, int64_t num_rows, std::uintptr_t ids, int64_t k, std::uintptr_t workspace, int64_t splits,
         std::uintptr_t grad_weight, std::uintptr_t grad_bias, int device, std::uintptr_t stream) {
        zr::linear_score_grad_weight(static_cast<zr::DType>(dtype), ptr<const float>(grad_logits),
                                     ptr<const void>(hidden), n_rows, dim, stride_hn, stride_hd,
                                     score_rows(0, num_rows, 0, 0, ids, 0, 0, k), ptr<float>(workspace), splits,
                                     ptr<void>(grad_weight), ptr<void>(grad_bias), launch(device, stream));
      },
      "grad_weight rows [num_rows, D] and grad_bias [num_rows] (contiguous, input dtype), deterministic");
}
