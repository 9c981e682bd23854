// The counter-based hash behind every random projection: hash_word(hash_row(seed, stream, row), word), a pure
// function of (seed, stream, row, word), so that CPU, CUDA and the pure-PyTorch twin (decomp.reference.hash32)
// give the same bits at any batch size or chunking.
// Built from 32-bit operations only, so that torch can reproduce it exactly with int64 tensors.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DECOMP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DECOMP_HOST_DEVICE inline
#endif

namespace decomp {

// Stream ids (which projection a hash serves) are defined once, in decomp.reference (STREAM_*), and passed in.

// A 32-bit integer finaliser with low bias (xorshift-multiply, constants from C. Wellons' hash prospector).
// Templated so that the CPU kernels run it on SIMD vectors of uint32 lanes.
template <class U>
DECOMP_HOST_DEVICE U mix32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The prefix of the hash that is constant along a row: hoisted out of inner loops.
DECOMP_HOST_DEVICE uint32_t hash_row(uint32_t seed, uint32_t stream, uint32_t row) {
  return mix32(mix32(mix32(seed ^ 0x9e3779b9U) ^ stream) ^ row);
}

template <class U>
DECOMP_HOST_DEVICE U hash_word(U row_state, uint64_t word) {
  return mix32(mix32(row_state ^ static_cast<uint32_t>(word)) ^ static_cast<uint32_t>(word >> 32));
}

// Rademacher entry (row, column) is +1 or -1 by bit (column % 32) of the word column / 32: one hash per 32 entries.
DECOMP_HOST_DEVICE float rademacher_sign(uint32_t word_hash, uint64_t column) {
  return ((word_hash >> (column & 31)) & 1U) ? -1.0f : 1.0f;
}

// Uniform in (0, 1) from the top 24 bits (never 0, so its logarithm is finite).
DECOMP_HOST_DEVICE double uniform_open(uint32_t h) { return (static_cast<double>(h >> 8) + 0.5) * (1.0 / 16777216.0); }

// Gaussian entry (row, column): Box-Muller on the words 2 * (column / 2) and 2 * (column / 2) + 1; even
// columns take the cosine, odd ones the sine. In double so that every device rounds to the same float.
DECOMP_HOST_DEVICE float gaussian_entry(uint32_t row_state, uint64_t column) {
  const uint64_t pair = column >> 1;
  const double radius = sqrt(-2.0 * log(uniform_open(hash_word(row_state, 2 * pair))));
  const double angle = 6.283185307179586 * uniform_open(hash_word(row_state, 2 * pair + 1));
  return static_cast<float>((column & 1) ? radius * sin(angle) : radius * cos(angle));
}

}  // namespace decomp
