// Sketch kernels: random projections whose entries are a pure function of (seed, stream, row, column)
// (common/hash.h), scaled so that E[<Sx, Sy>] = <x, y>.
//   projection_matrix: out[r, c] = S[r, c + offset]                                   out [rows, cols] float32
//   sketch_dense:      out[n, r] = sum_c S[r, c + offset] X[n, c]                       X [N, p] -> out [N, k]
//   count_sketch:      out[n, t, h(j)] += s(j) X[n, t, j] for t < L_n (rows t >= L_n are zero)
//                      X [N, T, d] -> out [N, T, k]; h, s from the row 0 and row 1 hashes of `stream`
#pragma once

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
};

void projection_matrix(const TensorView& out, const SketchParams& params);
void sketch_dense(const TensorView& X, const TensorView& out, const SketchParams& params);
void count_sketch(const TensorView& X, const TensorView* lengths, const TensorView& out, const SketchParams& params);

void projection_matrix_cpu(const TensorView& out, const SketchParams& params);
void sketch_dense_cpu(const TensorView& X, const TensorView& out, const SketchParams& params);
void count_sketch_cpu(const TensorView& X, const TensorView* lengths, const TensorView& out,
                      const SketchParams& params);

}  // namespace decomp
