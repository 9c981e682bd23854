// Batched diagonal-Fisher kernels. Each adds into `out` (float32, contiguous); optional arguments are null.
//   fisher_linear:      out[o, i] += sum_n w_n (sum_{t < L_n} G[n, t, o] A[n, t, i])^2      A [N,T,in] G [N,T,out]
//   fisher_linear_bias: out[o]    += sum_n w_n (sum_{t < L_n} G[n, t, o])^2                  G [N,T,out]
//   fisher_embedding:   out[v, d] += sum_n w_n (sum_{t < L_n, ids[n,t] = v} G[n, t, d])^2   ids [N,T] G [N,T,dim]
// lengths: int64 [N] contiguous, 0 <= L_n <= T; weights: float32 [N] contiguous, >= 0 (checked by the caller).
#pragma once

#include "../common/tensor_view.h"

namespace decomp {

struct FisherInputs {
  const TensorView* lengths = nullptr;
  const TensorView* weights = nullptr;
  int num_threads = 1;
  uintptr_t stream = 0;  // cudaStream_t of the tensors' device, from torch.cuda.current_stream()
};

// Host entry points: check the views agree with each other, then dispatch on the device.
void fisher_linear(const TensorView& A, const TensorView& G, const TensorView& out, const FisherInputs& in);
void fisher_linear_bias(const TensorView& G, const TensorView& out, const FisherInputs& in);
void fisher_embedding(const TensorView& ids, const TensorView& G, const TensorView& out, const FisherInputs& in);

void fisher_linear_cpu(const TensorView& A, const TensorView& G, const TensorView& out, const FisherInputs& in);
void fisher_linear_bias_cpu(const TensorView& G, const TensorView& out, const FisherInputs& in);
void fisher_embedding_cpu(const TensorView& ids, const TensorView& G, const TensorView& out, const FisherInputs& in);

#ifdef DECOMP_WITH_CUDA
void fisher_linear_cuda(const TensorView& A, const TensorView& G, const TensorView& out, const FisherInputs& in);
void fisher_linear_bias_cuda(const TensorView& G, const TensorView& out, const FisherInputs& in);
void fisher_embedding_cuda(const TensorView& ids, const TensorView& G, const TensorView& out, const FisherInputs& in);
#endif

}  // namespace decomp
