// Helpers shared by the CPU kernels: SIMD vector type, aligned scratch buffers, strided row loads.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "tensor_view.h"

namespace decomp {

#if defined(__AVX512F__)
constexpr int kVecWidth = 16;
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int kVecWidth = 8;
#else
constexpr int kVecWidth = 4;
#endif
typedef float vfloat __attribute__((vector_size(kVecWidth * sizeof(float))));

inline vfloat load_unaligned(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_unaligned(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
// Not `vfloat{} + x`: adding +0 is no identity for -0, so the compiler would emit an add per broadcast.
inline vfloat broadcast(float x) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(x);
#elif defined(__AVX__)
  return _mm256_set1_ps(x);
#else
  return _mm_set1_ps(x);
#endif
}

// A micro-kernel's register tile: R rows of V vectors at p, row stride ld.
template <int R, int V>
inline void load_tile(vfloat (&tile)[R][V], const float* p, int64_t ld) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) tile[r][v] = load_unaligned(p + r * ld + v * kVecWidth);
}

template <int R, int V>
inline void store_tile(const vfloat (&tile)[R][V], float* p, int64_t ld) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) store_unaligned(p + r * ld + v * kVecWidth, tile[r][v]);
}

// Runs kernel(p, ld) on the R x C tile at p, of which only rows x cols lie inside the matrix: an edge tile goes
// through a zero-padded copy, so the kernel always reads and writes a full tile.
template <int R, int C, class Kernel>
inline void on_tile(float* p, int64_t ld, int64_t rows, int64_t cols, Kernel kernel) {
  if (rows == R && cols == C) return kernel(p, ld);
  alignas(64) float edge[R * C] = {};
  for (int64_t r = 0; r < rows; ++r) std::memcpy(edge + r * C, p + r * ld, cols * sizeof(float));
  kernel(edge, static_cast<int64_t>(C));
  for (int64_t r = 0; r < rows; ++r) std::memcpy(p + r * ld, edge + r * C, cols * sizeof(float));
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using AlignedBuffer = std::unique_ptr<T[], FreeDeleter>;

template <class T>
AlignedBuffer<T> aligned_buffer(size_t count) {
  size_t bytes = ((count * sizeof(T) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) throw std::bad_alloc();
  return AlignedBuffer<T>(static_cast<T*>(p));
}

inline float widen(float x) { return x; }
inline float widen(uint16_t x) { return bf16_to_float(x); }

inline int64_t valid_length(const TensorView* lengths, int64_t n, int64_t T) {
  return lengths ? lengths->data<const int64_t>()[n] : T;
}
inline float example_weight(const TensorView* weights, int64_t n) {
  return weights ? weights->data<const float>()[n] : 1.0f;
}

// first[n] counts the valid tokens of the examples before n, an example weighted zero counting none (weights may
// be null: all count); first[N] counts them all. The input of token_balanced_ranges.
inline std::vector<int64_t> first_valid_token(const TensorView* lengths, const TensorView* weights, int64_t N,
                                              int64_t T) {
  std::vector<int64_t> first(N + 1, 0);
  for (int64_t n = 0; n < N; ++n)
    first[n + 1] = first[n] + (example_weight(weights, n) == 0.0f ? 0 : valid_length(lengths, n, T));
  return first;
}

// Boundaries of `parts` contiguous ranges of examples holding about equal numbers of valid tokens (contiguous rows
// stream best; padding would unbalance equal counts of examples): range p is [first[p], first[p + 1]).
// first_token[n] counts the valid tokens before example n; first_token[N] all of them.
inline std::vector<int64_t> token_balanced_ranges(const std::vector<int64_t>& first_token, int parts) {
  const int64_t N = static_cast<int64_t>(first_token.size()) - 1, tokens = first_token.back();
  std::vector<int64_t> first(parts + 1, N);
  for (int p = 0; p < parts; ++p)
    first[p] = std::lower_bound(first_token.begin(), first_token.end(), tokens * p / parts) - first_token.begin();
  return first;
}

}  // namespace decomp
