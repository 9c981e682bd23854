// Sketch kernels: random projections whose entries are a pure function of (seed, stream, row, column)
// (common/hash.h), scaled so that E[<Sx, Sy>] = <x, y>.
//   projection_matrix: out[r, c] = S[r, c + offset]                                   out [rows, cols] float32
//   sketch_dense:      out[n, r] = sum_c S[r, c + offset] X[n, c]                       X [N, p] -> out [N, k]
//   count_sketch:      out[n, t, h(j)] += s(j) X[n, t, j] for t < L_n (rows t >= L_n are zero)
//                      X [N, T, d] -> out [N, T, k]; h, s from the row 0 and row 1 hashes of `stream`
//   kronecker_sketch:  out[n, i k_in + j] += sum_{t < L_n} (S_out G[n, t])_i (S_in A[n, t])_j
//                      A [N, T, in], G [N, T, out], S_out [k_out, out], S_in [k_in, in] -> out [N, k_out k_in]
//                      (CPU only: on CUDA, decomp's Python layer runs cuBLAS GEMMs)
#pragma once

#include <vector>

#include "../common/hash.h"
#include "../common/tensor_view.h"

namespace decomp {

enum class Distribution : int32_t { Rademacher = 0, Gaussian = 1 };

struct SketchParams {
  uint32_t seed = 0;
  uint32_t stream = 0;
  Distribution dist = Distribution::Rademacher;
  uint64_t offset = 0;
  float scale = 1.0f;  // applied to every entry of S (1/sqrt(k) for the JL scaling)
  int num_threads = 1;
  uintptr_t cuda_stream = 0;  // cudaStream_t of the tensors' device, from torch.cuda.current_stream()
};

// The CountSketch hashes of features 0..d-1 into k buckets: bucket from row 0 of the stream, sign from row 1,
// one word per feature. Shared by the CPU kernel and the CUDA host code, so both hash alike.
inline void count_sketch_hashes(const SketchParams& params, int64_t d, int64_t k, std::vector<int64_t>& bucket,
                                std::vector<float>& sign) {
  const uint32_t bucket_state = hash_row(params.seed, params.stream, 0);
  const uint32_t sign_state = hash_row(params.seed, params.stream, 1);
  bucket.resize(static_cast<size_t>(d));
  sign.resize(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; ++j) {
    bucket[j] = static_cast<int64_t>(hash_word(bucket_state, static_cast<uint64_t>(j)) % static_cast<uint32_t>(k));
    sign[j] = (hash_word(sign_state, static_cast<uint64_t>(j)) >> 31) ? -1.0f : 1.0f;
  }
}

void projection_matrix(const TensorView& out, const SketchParams& params);
void sketch_dense(const TensorView& X, const TensorView& out, const SketchParams& params);
void count_sketch(const TensorView& X, const TensorView* lengths, const TensorView& out, const SketchParams& params);
void kronecker_sketch(const TensorView& A, const TensorView& G, const TensorView& S_out, const TensorView& S_in,
                      const TensorView* lengths, const TensorView& out, int num_threads);

void projection_matrix_cpu(const TensorView& out, const SketchParams& params);
void sketch_dense_cpu(const TensorView& X, const TensorView& out, const SketchParams& params);
void count_sketch_cpu(const TensorView& X, const TensorView* lengths, const TensorView& out,
                      const SketchParams& params);
void kronecker_sketch_cpu(const TensorView& A, const TensorView& G, const TensorView& S_out, const TensorView& S_in,
                          const TensorView* lengths, const TensorView& out, int num_threads);

#ifdef DECOMP_WITH_CUDA
void projection_matrix_cuda(const TensorView& out, const SketchParams& params);
void sketch_dense_cuda(const TensorView& X, const TensorView& out, const SketchParams& params);
void count_sketch_cuda(const TensorView& X, const TensorView* lengths, const TensorView& out,
                       const SketchParams& params);
#endif

}  // namespace decomp
