// Host side of the Fisher ops: consistency checks on the raw views and dispatch by device.
#include "fisher.h"

namespace decomp {
namespace {

bool is_float_input(const TensorView& t) { return t.dtype == DType::Float32 || t.dtype == DType::BFloat16; }

void check_optional(const TensorView* t, DType dtype, int64_t n, const TensorView& like, const char* name) {
  if (!t) return;
  require(t->dim() == 1 && t->size(0) == n && t->dtype == dtype && t->stride(0) == 1 && t->device == like.device,
          std::string(name) + " must be a contiguous [N] vector of the expected dtype on the inputs' device; got " +
              shape_string(*t));
}

void check_out(const TensorView& out, const std::vector<int64_t>& shape, const TensorView& like) {
  require(out.dtype == DType::Float32 && out.shape == shape && out.device == like.device,
          "out must be float32 " + shape_string(TensorView{0, shape, {}}) + " on the inputs' device; got " +
              shape_string(out));
  require(out.is_contiguous(), "out must be contiguous");
}

}  // namespace

void fisher_linear(const TensorView& A, const TensorView& G, const TensorView& out, const FisherInputs& in) {
  require(A.dim() == 3 && G.dim() == 3 && is_float_input(A) && G.dtype == A.dtype,
          "A and G must be [N, T, features] tensors of one floating dtype");
  require(A.size(0) == G.size(0) && A.size(1) == G.size(1) && A.device == G.device,
          "A and G must agree in N and T and sit on one device");
  check_optional(in.lengths, DType::Int64, A.size(0), A, "lengths");
  check_optional(in.weights, DType::Float32, A.size(0), A, "weights");
  check_out(out, {G.size(2), A.size(2)}, A);
  dispatch(A, [&] { fisher_linear_cpu(A, G, out, in); },
           [&] {
#ifdef DECOMP_WITH_CUDA
             fisher_linear_cuda(A, G, out, in);
#endif
           });
}

void fisher_linear_bias(const TensorView& G, const TensorView& out, const FisherInputs& in) {
  require(G.dim() == 3 && is_float_input(G), "G must be a [N, T, out] floating tensor");
  check_optional(in.lengths, DType::Int64, G.size(0), G, "lengths");
  check_optional(in.weights, DType::Float32, G.size(0), G, "weights");
  check_out(out, {G.size(2)}, G);
  dispatch(G, [&] { fisher_linear_bias_cpu(G, out, in); },
           [&] {
#ifdef DECOMP_WITH_CUDA
             fisher_linear_bias_cuda(G, out, in);
#endif
           });
}

void fisher_embedding(const TensorView& ids, const TensorView& G, const TensorView& out, const FisherInputs& in) {
  require(ids.dim() == 2 && ids.dtype == DType::Int64, "ids must be an int64 [N, T] tensor");
  require(G.dim() == 3 && is_float_input(G), "G must be a [N, T, dim] floating tensor");
  require(ids.size(0) == G.size(0) && ids.size(1) == G.size(1) && ids.device == G.device,
          "ids and G must agree in N and T and sit on one device");
  require(out.dim() == 2, "out must be [num_embeddings, dim]");
  check_optional(in.lengths, DType::Int64, G.size(0), G, "lengths");
  check_optional(in.weights, DType::Float32, G.size(0), G, "weights");
  check_out(out, {out.size(0), G.size(2)}, G);
  dispatch(G, [&] { fisher_embedding_cpu(ids, G, out, in); },
           [&] {
#ifdef DECOMP_WITH_CUDA
             fisher_embedding_cuda(ids, G, out, in);
#endif
           });
}

}  // namespace decomp
