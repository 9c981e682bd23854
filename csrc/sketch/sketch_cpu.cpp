// CPU sketch kernels. sketch_dense is a GEMM out[N, k] = X[N, p] S^T whose S^T tiles are generated in L1 from
// the hash (one hash per 32 Rademacher entries, vectorised across rows) and never stored beyond a tile.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/cpu_util.h"
#include "../common/hash.h"
#include "sketch.h"

namespace decomp {
namespace {

typedef uint32_t vuint __attribute__((vector_size(kVecWidth * sizeof(uint32_t))));

constexpr int kRowVectors = 2;
constexpr int kRows = kRowVectors * kVecWidth;      // sketch rows (r) per micro-tile, along SIMD lanes
constexpr int kExamples = kVecWidth == 16 ? 12 : 6; // examples (n) per micro-tile, broadcast
constexpr int64_t kTileColumns = 256;               // columns of X and S per tile (a multiple of 32)

// Fills st[c][0:kRows] = S[r0 + lane, column0 + c] for c < columns; column0 is a multiple of 32.
void generate_tile(const SketchParams& params, int64_t r0, uint64_t column0, int64_t columns, float* st) {
  if (params.dist == Distribution::Rademacher) {
    for (int v = 0; v < kRowVectors; ++v) {
      vuint state;
      for (int lane = 0; lane < kVecWidth; ++lane)
        state[lane] = hash_row(params.seed, params.stream, static_cast<uint32_t>(r0 + v * kVecWidth + lane));
      for (int64_t c0 = 0; c0 < columns; c0 += 32) {
        const vuint word = hash_word(state, (column0 + c0) >> 5);
        const int64_t bits = std::min<int64_t>(32, columns - c0);
        for (int64_t b = 0; b < bits; ++b) {
          // +1.0f or -1.0f: the sign bit taken from bit b of each lane's hash.
          const vuint sign = ((word >> static_cast<uint32_t>(b)) & 1U) << 31;
          const vuint one = (sign | 0x3f800000U);
          std::memcpy(st + (c0 + b) * kRows + v * kVecWidth, &one, sizeof one);
        }
      }
    }
    return;
  }
  for (int lane = 0; lane < kRows; ++lane) {
    const uint32_t state = hash_row(params.seed, params.stream, static_cast<uint32_t>(r0 + lane));
    for (int64_t c = 0; c < columns; ++c) st[c * kRows + lane] = gaussian_entry(state, column0 + c);
  }
}

// acc rows n < examples of out (row stride ldo) += xp[c][n] * st[c][:] over c < columns.
void dense_micro_kernel(const float* __restrict xp, const float* __restrict st, int64_t columns, float* out,
                        int64_t ldo) {
  vfloat acc[kExamples][kRowVectors];
  load_tile(acc, out, ldo);
  for (int64_t c = 0; c < columns; ++c) {
    vfloat s[kRowVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kRowVectors; ++v) s[v] = *reinterpret_cast<const vfloat*>(st + c * kRows + v * kVecWidth);
#pragma GCC unroll 16
    for (int n = 0; n < kExamples; ++n) {
      const vfloat x = broadcast(xp[c * kExamples + n]);
#pragma GCC unroll 4
      for (int v = 0; v < kRowVectors; ++v) acc[n][v] += x * s[v];
    }
  }
  store_tile(acc, out, ldo);
}

template <class Src>
void pack_examples(const Src* x, int64_t row_stride, int64_t col_stride, int64_t N, int64_t first_column,
                   int64_t columns, int64_t p, float* xp) {
  // xp[block][c][n] = X[block * kExamples + n, first_column + c], zero outside X.
  const int64_t blocks = (N + kExamples - 1) / kExamples;
  std::fill(xp, xp + blocks * kTileColumns * kExamples, 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    float* dst = xp + (n / kExamples) * kTileColumns * kExamples + n % kExamples;
    for (int64_t c = 0; c < columns; ++c) {
      const int64_t column = first_column + c;
      if (column >= 0 && column < p) dst[c * kExamples] = widen(x[n * row_stride + column * col_stride]);
    }
  }
}

}  // namespace

void projection_matrix_cpu(const TensorView& out, const SketchParams& params) {
  const int64_t rows = out.size(0), cols = out.size(1);
  float* data = out.data<float>();
#pragma omp parallel for schedule(static) num_threads(std::max(1, params.num_threads))
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t state = hash_row(params.seed, params.stream, static_cast<uint32_t>(r));
    uint32_t word_hash = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const uint64_t column = params.offset + static_cast<uint64_t>(c);
      float value;
      if (params.dist == Distribution::Rademacher) {
        if (c == 0 || (column & 31) == 0) word_hash = hash_word(state, column >> 5);
        value = rademacher_sign(word_hash, column);
      } else {
        value = gaussian_entry(state, column);
      }
      data[r * cols + c] = params.scale * value;
    }
  }
}

void sketch_dense_cpu(const TensorView& X, const TensorView& out_view, const SketchParams& params) {
  const int64_t N = X.size(0), p = X.size(1), k = out_view.size(1);
  float* out = out_view.data<float>();
  std::fill(out, out + N * k, 0.0f);
  if (N == 0 || p == 0 || k == 0) return;
  // Tiles start at a multiple of 32 in the full vector's columns, so one hash word never straddles two tiles.
  const int64_t start = static_cast<int64_t>(params.offset & ~uint64_t{31});
  const int64_t lead = static_cast<int64_t>(params.offset) - start;  // columns of the first tile before X
  const int64_t tiles = (lead + p + kTileColumns - 1) / kTileColumns;
  const int64_t row_blocks = (k + kRows - 1) / kRows, example_blocks = (N + kExamples - 1) / kExamples;

  // Threads own disjoint row blocks, so each output is summed in one fixed order: results do not depend on the
  // thread count or the batch split.
#pragma omp parallel num_threads(std::max(1, params.num_threads))
  {
    auto xp = aligned_buffer<float>(example_blocks * kTileColumns * kExamples);
    auto st = aligned_buffer<float>(kTileColumns * kRows);
    const int threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t first_block = row_blocks * me / threads, last_block = row_blocks * (me + 1) / threads;
    for (int64_t tile = 0; tile < tiles && first_block < last_block; ++tile) {
      const int64_t first_column = tile * kTileColumns - lead;  // in X's own columns
      const int64_t columns = std::min(kTileColumns, lead + p - tile * kTileColumns);
      if (X.dtype == DType::BFloat16)
        pack_examples(X.data<const uint16_t>(), X.stride(0), X.stride(1), N, first_column, columns, p, xp.get());
      else
        pack_examples(X.data<const float>(), X.stride(0), X.stride(1), N, first_column, columns, p, xp.get());
      for (int64_t rb = first_block; rb < last_block; ++rb) {
        const int64_t r0 = rb * kRows, rows = std::min<int64_t>(kRows, k - r0);
        generate_tile(params, r0, static_cast<uint64_t>(start + tile * kTileColumns), columns, st.get());
        for (int64_t eb = 0; eb < example_blocks; ++eb) {
          const int64_t n0 = eb * kExamples, examples = std::min<int64_t>(kExamples, N - n0);
          const float* block = xp.get() + eb * kTileColumns * kExamples;
          on_tile<kExamples, kRows>(out + n0 * k + r0, k, examples, rows, [&](float* target, int64_t ld) {
            dense_micro_kernel(block, st.get(), columns, target, ld);
          });
        }
      }
    }
  }
  if (params.scale != 1.0f)
    for (int64_t i = 0; i < N * k; ++i) out[i] *= params.scale;
}

void count_sketch_cpu(const TensorView& X, const TensorView* lengths, const TensorView& out_view,
                      const SketchParams& params) {
  const int64_t N = X.size(0), T = X.size(1), d = X.size(2), k = out_view.size(2);
  float* out = out_view.data<float>();
  std::vector<int64_t> bucket;
  std::vector<float> sign;
  count_sketch_hashes(params, d, k, bucket, sign);
  // Each row is zeroed by the thread that fills it, just before: one pass over the output, not a serial fill of
  // all of it first (the output is N T k floats, tens of MB at k = 4096).
#pragma omp parallel for collapse(2) schedule(static) num_threads(std::max(1, params.num_threads))
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t t = 0; t < T; ++t) {
      float* row = out + (n * T + t) * k;
      std::fill(row, row + k, 0.0f);
      if (t >= valid_length(lengths, n, T)) continue;
      const int64_t base = n * X.stride(0) + t * X.stride(1), cs = X.stride(2);
      if (X.dtype == DType::BFloat16) {
        const uint16_t* x = X.data<const uint16_t>() + base;
        for (int64_t j = 0; j < d; ++j) row[bucket[j]] += sign[j] * bf16_to_float(x[j * cs]);
      } else {
        const float* x = X.data<const float>() + base;
        for (int64_t j = 0; j < d; ++j) row[bucket[j]] += sign[j] * x[j * cs];
      }
    }
  }
}

}  // namespace decomp
