// Host side of the sketch ops: consistency checks on the raw views and dispatch by device.
#include "sketch.h"

namespace decomp {
namespace {

void require_float_out(const TensorView& out, int64_t rank) {
  require(out.dim() == rank && out.dtype == DType::Float32, "out must be a float32 tensor of rank " +
                                                                std::to_string(rank) + "; got " + shape_string(out));
  require(out.is_contiguous(), "out must be contiguous");
}

}  // namespace

void projection_matrix(const TensorView& out, const SketchParams& params) {
  require_float_out(out, 2);
  dispatch(out, [&] { projection_matrix_cpu(out, params); },
           [&] {
#ifdef DECOMP_WITH_CUDA
             projection_matrix_cuda(out, params);
#endif
           });
}

void sketch_dense(const TensorView& X, const TensorView& out, const SketchParams& params) {
  require(X.dim() == 2 && (X.dtype == DType::Float32 || X.dtype == DType::BFloat16), "X must be [N, p] floating");
  require_float_out(out, 2);
  require(out.size(0) == X.size(0) && X.device == out.device && X.device_index == out.device_index,
          "out must be [N, k] with X's N, on X's device");
  dispatch(X, [&] { sketch_dense_cpu(X, out, params); },
           [&] {
#ifdef DECOMP_WITH_CUDA
             sketch_dense_cuda(X, out, params);
#endif
           });
}

void count_sketch(const TensorView& X, const TensorView* lengths, const TensorView& out, const SketchParams& params) {
  require(X.dim() == 3 && (X.dtype == DType::Float32 || X.dtype == DType::BFloat16), "X must be [N, T, d] floating");
  require_float_out(out, 3);
  require(out.size(0) == X.size(0) && out.size(1) == X.size(1) && out.size(2) > 0 && out.device == X.device &&
              out.device_index == X.device_index,
          "out must be [N, T, k], k > 0, on X's device");
  require(!lengths || (lengths->dim() == 1 && lengths->size(0) == X.size(0) && lengths->dtype == DType::Int64 &&
                       lengths->stride(0) == 1 && lengths->device == X.device),
          "lengths must be a contiguous int64 [N] vector on X's device");
  dispatch(X, [&] { count_sketch_cpu(X, lengths, out, params); },
           [&] {
#ifdef DECOMP_WITH_CUDA
             count_sketch_cuda(X, lengths, out, params);
#endif
           });
}

void kronecker_sketch(const TensorView& A, const TensorView& G, const TensorView& S_out, const TensorView& S_in,
                      const TensorView* lengths, const TensorView& out, int num_threads) {
  const bool floating = G.dtype == DType::Float32 || G.dtype == DType::BFloat16;
  require(A.dim() == 3 && G.dim() == 3 && floating && A.dtype == G.dtype && A.size(0) == G.size(0) &&
              A.size(1) == G.size(1),
          "A and G must be [N, T, in] and [N, T, out] of one floating dtype");
  require(S_out.dim() == 2 && S_out.dtype == DType::Float32 && S_out.size(1) == G.size(2) && S_in.dim() == 2 &&
              S_in.dtype == DType::Float32 && S_in.size(1) == A.size(2),
          "S_out and S_in must be float32 [k_out, out] and [k_in, in]");
  require(out.dim() == 2 && out.dtype == DType::Float32 && out.size(0) == A.size(0) &&
              out.size(1) == S_out.size(0) * S_in.size(0) && (out.stride(1) == 1 || out.size(1) <= 1),
          "out must be float32 [N, k_out * k_in] with unit column stride");
  for (const TensorView* t : {&G, &S_out, &S_in, &out})
    require(t->device == A.device && t->device_index == A.device_index, "every tensor must be on A's device");
  require(!lengths || (lengths->dim() == 1 && lengths->size(0) == A.size(0) && lengths->dtype == DType::Int64 &&
                       lengths->stride(0) == 1 && lengths->device == A.device),
          "lengths must be a contiguous int64 [N] vector on A's device");
  require(A.device == DeviceType::CPU, "kronecker_sketch runs on the CPU only (on CUDA, torch's GEMMs do)");
  kronecker_sketch_cpu(A, G, S_out, S_in, lengths, out, num_threads);
}

}  // namespace decomp
