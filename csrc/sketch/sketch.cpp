// Host side of the sketch ops: consistency checks on the raw views and dispatch by device. The CUDA path of
// these ops is the pure-PyTorch reference (the same hash, run by torch) until native CUDA kernels land.
#include "sketch.h"

namespace decomp {
namespace {

void require_cpu_float_out(const TensorView& out, int64_t rank) {
  require(out.dim() == rank && out.dtype == DType::Float32, "out must be a float32 tensor of rank " +
                                                                std::to_string(rank) + "; got " + shape_string(out));
  require(out.is_contiguous(), "out must be contiguous");
  require(out.device == DeviceType::CPU, "the native sketch kernels run on the CPU; CUDA tensors take the torch path");
}

}  // namespace

void projection_matrix(const TensorView& out, const SketchParams& params) {
  require_cpu_float_out(out, 2);
  projection_matrix_cpu(out, params);
}

void sketch_dense(const TensorView& X, const TensorView& out, const SketchParams& params) {
  require(X.dim() == 2 && (X.dtype == DType::Float32 || X.dtype == DType::BFloat16), "X must be [N, p] floating");
  require_cpu_float_out(out, 2);
  require(out.size(0) == X.size(0) && X.device == out.device, "out must be [N, k] with X's N, on X's device");
  sketch_dense_cpu(X, out, params);
}

void count_sketch(const TensorView& X, const TensorView* lengths, const TensorView& out, const SketchParams& params) {
  require(X.dim() == 3 && (X.dtype == DType::Float32 || X.dtype == DType::BFloat16), "X must be [N, T, d] floating");
  require_cpu_float_out(out, 3);
  require(out.size(0) == X.size(0) && out.size(1) == X.size(1) && out.size(2) > 0, "out must be [N, T, k], k > 0");
  require(!lengths || (lengths->dim() == 1 && lengths->size(0) == X.size(0) && lengths->dtype == DType::Int64 &&
                       lengths->stride(0) == 1),
          "lengths must be a contiguous int64 [N] vector");
  count_sketch_cpu(X, lengths, out, params);
}

}  // namespace decomp
