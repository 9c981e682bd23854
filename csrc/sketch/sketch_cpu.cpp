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

// ---- kronecker_sketch: both factors projected token by token, the outer products summed in cache ----------

constexpr int kTileTokens = 12;   // tokens per tile: a multiple of every micro-kernel's row count

// A panel of S is 8 or 16 columns wide, one column one vector of that many floats (the compiler splits a vector
// wider than the machine's). 8 where k <= 8 (the default 8 x 8 blocks): a 16-wide vector would be half zeros.
typedef float vfloat8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vfloat16 __attribute__((vector_size(16 * sizeof(float))));

int64_t panel_width(int64_t k) { return k <= 8 ? 8 : 16; }

// S [k, d] as panels of `width` rows: panel p holds packed[(p d + c) width + lane] = S[p width + lane, c], zero
// past k.
AlignedBuffer<float> pack_panels(const TensorView& S, int64_t width) {
  const int64_t k = S.size(0), d = S.size(1), size = (k + width - 1) / width * width * d;
  auto packed = aligned_buffer<float>(size);
  std::fill(packed.get(), packed.get() + size, 0.0f);
  const float* s = S.data<const float>();
  for (int64_t r = 0; r < k; ++r)
    for (int64_t c = 0; c < d; ++c)
      packed[((r / width) * d + c) * width + r % width] = s[r * S.stride(0) + c * S.stride(1)];
  return packed;
}

// tile[r ldt + 0:W] = sum_c rows[r][c] panel[c W + 0:W] for r < R (W = V's lanes), summed in c order: R
// accumulators in registers; per column one load of S and R broadcasts.
template <class V, int R>
void project_micro_kernel(const float* const* rows, const float* __restrict panel, int64_t d, float* tile,
                          int64_t ldt) {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc[R] = {};
  for (int64_t c = 0; c < d; ++c) {
    const V s = *reinterpret_cast<const V*>(panel + c * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] += rows[r][c] * s;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) std::memcpy(tile + r * ldt, &acc[r], sizeof(V));
}

// A whole tile of kTileTokens rows against one panel, in micro-kernels of as many rows as registers allow.
template <class V>
void project_tile(const float* const* rows, const float* panel, int64_t d, float* tile, int64_t ldt) {
  constexpr int R = sizeof(V) / sizeof(float) <= kVecWidth ? 12 : 6;
  for (int r0 = 0; r0 < kTileTokens; r0 += R)
    project_micro_kernel<V, R>(rows + r0, panel, d, tile + r0 * ldt, ldt);
}

// Row (n, t) of X [N, T, d] as d contiguous float32 values: in place when it is one already, else widened from
// bfloat16 or gathered from a strided row into `scratch`.
const float* token_row(const TensorView& X, int64_t n, int64_t t, float* scratch) {
  const int64_t d = X.size(2), offset = n * X.stride(0) + t * X.stride(1), cs = X.stride(2);
  if (X.dtype == DType::Float32 && (cs == 1 || d <= 1)) return X.data<const float>() + offset;
  if (X.dtype == DType::BFloat16) {
    const uint16_t* x = X.data<const uint16_t>() + offset;
    for (int64_t j = 0; j < d; ++j) scratch[j] = bf16_to_float(x[j * cs]);
  } else {
    const float* x = X.data<const float>() + offset;
    for (int64_t j = 0; j < d; ++j) scratch[j] = x[j * cs];
  }
  return scratch;
}

// One factor's side of a tile: the packed projection, the tile's token rows and their projections.
struct Side {
  const TensorView& X;
  const float* panels;
  int64_t width;                  // of a panel
  int64_t k_padded;               // projected columns, rounded up to whole panels
  AlignedBuffer<float> scratch;   // kTileTokens rows of X, where a row must be copied
  AlignedBuffer<float> projected; // [kTileTokens, k_padded]
  const float* rows[kTileTokens];

  Side(const TensorView& X_, const float* panels_, int64_t k)
      : X(X_), panels(panels_), width(panel_width(k)), k_padded((k + width - 1) / width * width),
        scratch(aligned_buffer<float>(kTileTokens * X_.size(2))),
        projected(aligned_buffer<float>(kTileTokens * k_padded)) {}

  void take(int r, int64_t n, int64_t t) { rows[r] = token_row(X, n, t, scratch.get() + r * X.size(2)); }

  void project(int filled) {
    for (int r = filled; r < kTileTokens; ++r) rows[r] = rows[0];   // unused rows: any readable row, ignored
    const int64_t d = X.size(2);
    for (int64_t p = 0; p < k_padded / width; ++p) {
      if (width == 8)
        project_tile<vfloat8>(rows, panels + p * d * width, d, projected.get() + p * width, k_padded);
      else
        project_tile<vfloat16>(rows, panels + p * d * width, d, projected.get() + p * width, k_padded);
    }
  }
};

// Examples [first, last): out[n, i k_in + j] += sum over valid t of (S_out g_t)_i (S_in a_t)_j. Tiles of tokens
// may span examples; each token's projections are whole sums (the same whichever tile holds it) and its outer
// product is added to its example's sum in token order, so an example's result depends on its own rows only.
void kronecker_examples(const TensorView& A, const TensorView& G, const float* panels_out, int64_t k_out,
                        const float* panels_in, int64_t k_in, const TensorView* lengths, const TensorView& out_view,
                        int64_t first, int64_t last) {
  const int64_t T = A.size(1);
  Side g(G, panels_out, k_out), a(A, panels_in, k_in);
  auto sum = aligned_buffer<float>(k_out * a.k_padded);
  std::fill(sum.get(), sum.get() + k_out * a.k_padded, 0.0f);
  int64_t owner[kTileTokens];
  int64_t current = -1;   // the example whose sum is open
  int filled = 0;

  auto close = [&] {   // out[current] += its sum, which starts again from zero
    if (current < 0) return;
    float* out = out_view.data<float>() + current * out_view.stride(0);
    for (int64_t i = 0; i < k_out; ++i)
      for (int64_t j = 0; j < k_in; ++j) out[i * k_in + j] += sum[i * a.k_padded + j];
    std::fill(sum.get(), sum.get() + k_out * a.k_padded, 0.0f);
  };
  auto flush = [&] {
    g.project(filled);
    a.project(filled);
    const int64_t vectors = a.k_padded / 8;
    for (int r = 0; r < filled; ++r) {
      if (owner[r] != current) {
        close();
        current = owner[r];
      }
      const float* pg = g.projected.get() + r * g.k_padded;
      const vfloat8* pa = reinterpret_cast<const vfloat8*>(a.projected.get() + r * a.k_padded);
      for (int64_t i = 0; i < k_out; ++i) {
        vfloat8* row = reinterpret_cast<vfloat8*>(sum.get() + i * a.k_padded);
        for (int64_t v = 0; v < vectors; ++v) row[v] += pg[i] * pa[v];
      }
    }
    filled = 0;
  };
  for (int64_t n = first; n < last; ++n) {
    const int64_t length = valid_length(lengths, n, T);
    for (int64_t t = 0; t < length; ++t) {
      owner[filled] = n;
      g.take(filled, n, t);
      a.take(filled, n, t);
      if (++filled == kTileTokens) flush();
    }
  }
  if (filled) flush();
  close();
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

void kronecker_sketch_cpu(const TensorView& A, const TensorView& G, const TensorView& S_out, const TensorView& S_in,
                          const TensorView* lengths, const TensorView& out, int num_threads) {
  const int64_t N = A.size(0), T = A.size(1), k_out = S_out.size(0), k_in = S_in.size(0);
  if (N == 0 || T == 0 || k_out == 0 || k_in == 0) return;
  const AlignedBuffer<float> panels_out = pack_panels(S_out, panel_width(k_out));
  const AlignedBuffer<float> panels_in = pack_panels(S_in, panel_width(k_in));
  // Threads take token-balanced ranges of examples; each example is summed by one thread, so nothing depends on
  // the split.
  const std::vector<int64_t> first_token = first_valid_token(lengths, nullptr, N, T);
  const int64_t tokens = first_token[N], work = tokens * (A.size(2) * k_in + G.size(2) * k_out);
  const int threads =
      work < (int64_t{1} << 18) ? 1 : static_cast<int>(std::min<int64_t>(std::max(1, num_threads), N));
  const std::vector<int64_t> first_example = token_balanced_ranges(first_token, threads);
#pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int part = 0; part < threads; ++part)   // every part runs, whatever team the runtime grants
    kronecker_examples(A, G, panels_out.get(), k_out, panels_in.get(), k_in, lengths, out, first_example[part],
                       first_example[part + 1]);
}

}  // namespace decomp
