// CPU kernels of the diagonal Fisher. fisher_linear is a GEMM over the concatenated valid tokens of all examples
// (K = sum_n L_n) whose accumulator is squared at each example boundary: each example's tile of G_n^T A_n lives
// only in registers, so the work is one GEMM's FLOPs and no [N, out, in] buffer ever exists.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../common/cpu_util.h"
#include "fisher.h"

namespace decomp {
namespace {

constexpr int kNV = 2;                          // vectors per micro-tile row
constexpr int kNR = kNV * kVecWidth;            // micro-tile columns (input features)
constexpr int kMR = kVecWidth == 16 ? 6 : 3;    // micro-tile rows (output features); fits the register file
// Packed inner operand of a block stays in L2 (measured: 0.5-1 MiB best on a 2 MiB L2; larger spills).
constexpr int64_t kPackedBytesTarget = 1 << 20;

// Adds one micro-tile. gp: [tokens, kMR] and ap: [tokens, kNR] packed panels; c: the kMR x kNR tile, row stride ldc.
// kSquare: accumulate (sum over each segment's tokens)^2, one segment per example; else a plain GEMM update.
template <bool kSquare>
void micro_kernel(const float* __restrict gp, const float* __restrict ap, const int32_t* __restrict segments,
                  int64_t num_segments, float* __restrict c, int64_t ldc) {
  vfloat acc[kMR][kNV];
  load_tile(acc, c, ldc);

  for (int64_t s = 0; s < num_segments; ++s) {
    const int32_t length = segments[s];
    if constexpr (kSquare) {
      vfloat x[kMR][kNV];
      vfloat b[kNV];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) b[v] = *reinterpret_cast<const vfloat*>(ap + v * kVecWidth);
#pragma GCC unroll 8
      for (int r = 0; r < kMR; ++r) {
        const vfloat g = broadcast(gp[r]);
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) x[r][v] = g * b[v];
      }
      ap += kNR;
      gp += kMR;
      for (int32_t t = 1; t < length; ++t) {
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) b[v] = *reinterpret_cast<const vfloat*>(ap + v * kVecWidth);
#pragma GCC unroll 8
        for (int r = 0; r < kMR; ++r) {
          const vfloat g = broadcast(gp[r]);
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) x[r][v] += g * b[v];
        }
        ap += kNR;
        gp += kMR;
      }
#pragma GCC unroll 8
      for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[r][v] += x[r][v] * x[r][v];
    } else {
      for (int32_t t = 0; t < length; ++t) {
        vfloat b[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) b[v] = *reinterpret_cast<const vfloat*>(ap + v * kVecWidth);
#pragma GCC unroll 8
        for (int r = 0; r < kMR; ++r) {
          const vfloat g = broadcast(gp[r]);
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) acc[r][v] += g * b[v];
        }
        ap += kNR;
        gp += kMR;
      }
    }
  }

  store_tile(acc, c, ldc);
}

// Consecutive examples packed and multiplied together; tokens = their summed valid lengths.
struct Block {
  int64_t first_segment, num_segments, first_token, tokens;
};

// Packs `length` rows of `width` values (element (s, j) at src[s * row_stride + j * col_stride]) into panels of
// kPanel columns, zero-padded: panels[p][token0 + s][0:kPanel], each panel `block_tokens` rows long.
// Each value becomes scale * x, or scale * x^2 with kSquare.
template <int kPanel, bool kSquare, bool kContiguous, class Src>
void pack_rows(const Src* src, int64_t row_stride, int64_t col_stride, int64_t length, int64_t width, float scale,
               int64_t block_tokens, int64_t token0, float* panels) {
  const int64_t full_panels = width / kPanel, stride = kContiguous ? 1 : col_stride;
  for (int64_t s = 0; s < length; ++s) {
    const Src* row = src + s * row_stride;
    float* dst = panels + (token0 + s) * kPanel;
    for (int64_t p = 0; p < full_panels; ++p, dst += block_tokens * kPanel) {
      const Src* from = row + p * kPanel * stride;
#pragma GCC unroll 32
      for (int j = 0; j < kPanel; ++j) {
        const float x = widen(from[j * stride]);
        dst[j] = kSquare ? scale * x * x : scale * x;
      }
    }
    if (full_panels * kPanel < width) {
      const int64_t rest = width - full_panels * kPanel;
      const Src* from = row + full_panels * kPanel * stride;
      for (int64_t j = 0; j < kPanel; ++j) {
        const float x = j < rest ? widen(from[j * stride]) : 0.0f;
        dst[j] = kSquare ? scale * x * x : scale * x;
      }
    }
  }
}

template <int kPanel>
void pack_example(const TensorView& t, int64_t n, int64_t length, float scale, bool square, int64_t block_tokens,
                  int64_t token0, float* panels) {
  const int64_t offset = n * t.stride(0), width = t.size(2), rs = t.stride(1), cs = t.stride(2);
  auto run = [&](auto* src) {
    if (square) {
      if (cs == 1) return pack_rows<kPanel, true, true>(src, rs, cs, length, width, scale, block_tokens, token0, panels);
      return pack_rows<kPanel, true, false>(src, rs, cs, length, width, scale, block_tokens, token0, panels);
    }
    if (cs == 1) return pack_rows<kPanel, false, true>(src, rs, cs, length, width, scale, block_tokens, token0, panels);
    return pack_rows<kPanel, false, false>(src, rs, cs, length, width, scale, block_tokens, token0, panels);
  };
  if (t.dtype == DType::BFloat16) return run(t.data<const uint16_t>() + offset);
  run(t.data<const float>() + offset);
}

#if defined(__AVX512BF16__)
// bfloat16 factors: vdpbf16ps multiplies pairs of bf16 values exactly and adds both products to float32 lanes, so
// the per-example sums run two tokens per instruction at twice the float32 FMA rate, still accumulating in float32.
// Tokens are packed in pairs (an odd example gets a zero token), each pair of one example; the example's weight
// multiplies its square (folding sqrt(w) into bf16 G would round it). vdpbf16ps treats float32 subnormals (below
// 1.2e-38) as zero, in its inputs and its sums; nothing else differs from the float32 path.
constexpr bool kPairedBf16 = true;

// gp: [pairs, kMR] bf16 pairs as uint32; ap: [pairs, kNR, 2] bf16; pairs[s] per example, weights[s] its weight.
void micro_kernel_bf16(const uint32_t* __restrict gp, const uint16_t* __restrict ap, const int32_t* __restrict pairs,
                       const float* __restrict weights, int64_t num_segments, float* __restrict c, int64_t ldc) {
  // The tile's totals stay in memory, touched once an example: holding them in registers beside the sums would
  // spill the operands of the inner loop.
  for (int64_t s = 0; s < num_segments; ++s) {
    __m512 x[kMR][kNV];
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) x[r][v] = _mm512_setzero_ps();
    for (int32_t q = 0; q < pairs[s]; ++q) {
      __m512bh b[kNV];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(ap + v * 2 * kVecWidth);
#pragma GCC unroll 8
      for (int r = 0; r < kMR; ++r) {
        const __m512bh g = (__m512bh)_mm512_set1_epi32(static_cast<int>(gp[r]));
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) x[r][v] = _mm512_dpbf16_ps(x[r][v], b[v], g);
      }
      ap += 2 * kNR;
      gp += kMR;
    }
    const vfloat weight = broadcast(weights[s]);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) {
        const vfloat sum = (vfloat)x[r][v];
        float* total = c + r * ldc + v * kVecWidth;
        store_unaligned(total, load_unaligned(total) + weight * (sum * sum));
      }
  }
}
#else
constexpr bool kPairedBf16 = false;
#endif

// Packs an example's `length` bf16 rows into panels of kPanel columns as pairs of tokens: panels[p][pair0 + q][j] =
// (row 2q, row 2q + 1) at column p * kPanel + j, zero where the column or the odd last token is missing; each
// panel `block_pairs` pairs long.
template <int kPanel, bool kContiguous>
void pack_pairs(const uint16_t* src, int64_t rs, int64_t col_stride, int64_t width, int64_t length,
                int64_t block_pairs, int64_t pair0, uint16_t* panels) {
  const int64_t cs = kContiguous ? 1 : col_stride, full_panels = width / kPanel;
  static const uint16_t zeros[kPanel] = {};
  for (int64_t q = 0; 2 * q < length; ++q) {
    const uint16_t* first = src + 2 * q * rs;
    // the odd last token's partner: a row of zeros, read with stride 0
    const uint16_t* second = 2 * q + 1 < length ? first + rs : zeros;
    const int64_t second_cs = 2 * q + 1 < length ? cs : 0;
    uint16_t* dst = panels + (pair0 + q) * 2 * kPanel;
    for (int64_t p = 0; p < full_panels; ++p, dst += block_pairs * 2 * kPanel) {
      const uint16_t* a = first + p * kPanel * cs;
      const uint16_t* b = second + p * kPanel * second_cs;
#pragma GCC unroll 32
      for (int j = 0; j < kPanel; ++j) {
        dst[2 * j] = a[j * cs];
        dst[2 * j + 1] = b[j * second_cs];
      }
    }
    if (full_panels * kPanel < width) {
      const int64_t rest = width - full_panels * kPanel;
      const uint16_t* a = first + full_panels * kPanel * cs;
      const uint16_t* b = second + full_panels * kPanel * second_cs;
      for (int64_t j = 0; j < kPanel; ++j) {
        dst[2 * j] = j < rest ? a[j * cs] : 0;
        dst[2 * j + 1] = j < rest ? b[j * second_cs] : 0;
      }
    }
  }
}

template <int kPanel>
void pack_example_pairs(const TensorView& t, int64_t n, int64_t length, int64_t block_pairs, int64_t pair0,
                        uint16_t* panels) {
  const uint16_t* src = t.data<const uint16_t>() + n * t.stride(0);
  if (t.stride(2) == 1)
    return pack_pairs<kPanel, true>(src, t.stride(1), 1, t.size(2), length, block_pairs, pair0, panels);
  pack_pairs<kPanel, false>(src, t.stride(1), t.stride(2), t.size(2), length, block_pairs, pair0, panels);
}

// Grow-only per-thread scratch: a fresh allocation per call would be mmap'd and page-faulted in every time.
float* scratch(int slot, size_t count) {
  thread_local AlignedBuffer<float> buffers[2];
  thread_local size_t capacity[2] = {0, 0};
  if (capacity[slot] < count) {
    buffers[slot] = aligned_buffer<float>(count);
    capacity[slot] = count;
  }
  return buffers[slot].get();
}

}  // namespace

void fisher_linear_cpu(const TensorView& A, const TensorView& G, const TensorView& out_view, const FisherInputs& in) {
  const int64_t N = A.size(0), T = A.size(1), in_features = A.size(2), out_features = G.size(2);
  if (N == 0 || T == 0 || in_features == 0 || out_features == 0) return;

  // Examples that contribute, as segments of packed tokens. Weights >= 0 (checked by the caller), so
  // w (G^T A)^2 = (sqrt(w) G^T A)^2 and the weight folds into the packed G.
  std::vector<int64_t> example;
  std::vector<int32_t> segment_length;
  std::vector<float> segment_weight;
  int64_t max_length = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t length = valid_length(in.lengths, n, T);
    if (length == 0 || example_weight(in.weights, n) == 0.0f) continue;
    example.push_back(n);
    segment_length.push_back(static_cast<int32_t>(length));
    segment_weight.push_back(example_weight(in.weights, n));
    max_length = std::max(max_length, length);
  }
  if (example.empty()) return;
  // One token per example: (sum_t g a)^2 = g^2 a^2, so square the inputs and run a plain GEMM.
  const bool square_inputs = max_length == 1;
  // bf16 factors with several tokens per example run as pairs of tokens (micro_kernel_bf16): a segment is then
  // counted in pairs, and a block's `tokens` are pairs too (4 bytes a column either way).
  const bool paired = kPairedBf16 && !square_inputs && A.dtype == DType::BFloat16 && G.dtype == DType::BFloat16;
  if (paired)
    for (int32_t& units : segment_length) units = (units + 1) / 2;

  const int64_t panel_rows = (out_features + kMR - 1) / kMR, panel_cols = (in_features + kNR - 1) / kNR;
  const int64_t inner_width = std::min(panel_rows * kMR, panel_cols * kNR);
  const int64_t block_target = std::max<int64_t>(64, kPackedBytesTarget / (4 * inner_width));

  std::vector<Block> blocks;
  std::vector<int64_t> token_offset(example.size());
  for (int64_t s = 0, token = 0; s < static_cast<int64_t>(example.size()); ++s) {
    if (blocks.empty() || blocks.back().tokens >= block_target) blocks.push_back({s, 0, token, 0});
    token_offset[s] = token - blocks.back().first_token;
    blocks.back().num_segments += 1;
    blocks.back().tokens += segment_length[s];
    token += segment_length[s];
  }
  int64_t max_tokens = 0;
  for (const Block& b : blocks) max_tokens = std::max(max_tokens, b.tokens);

  float* packed_g = scratch(0, max_tokens * panel_rows * kMR);
  float* packed_a = scratch(1, max_tokens * panel_cols * kNR);
  float* out = out_view.data<float>();
  const bool rows_outer = out_features >= in_features;

#pragma omp parallel num_threads(std::max(1, in.num_threads))
  {
    for (const Block& block : blocks) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t s = block.first_segment; s < block.first_segment + block.num_segments; ++s) {
        const int64_t n = example[s];
        if (paired) {
          const int64_t length = valid_length(in.lengths, n, T);
          pack_example_pairs<kMR>(G, n, length, block.tokens, token_offset[s], reinterpret_cast<uint16_t*>(packed_g));
          pack_example_pairs<kNR>(A, n, length, block.tokens, token_offset[s], reinterpret_cast<uint16_t*>(packed_a));
          continue;
        }
        const float weight = segment_weight[s];
        pack_example<kMR>(G, n, segment_length[s], square_inputs ? weight : std::sqrt(weight), square_inputs,
                          block.tokens, token_offset[s], packed_g);
        pack_example<kNR>(A, n, segment_length[s], 1.0f, square_inputs, block.tokens, token_offset[s], packed_a);
      }
      // The plain GEMM needs no segment boundaries: the block is one run of tokens.
      const int32_t whole_block = static_cast<int32_t>(block.tokens);
      const int32_t* segments = square_inputs ? &whole_block : segment_length.data() + block.first_segment;
      const int64_t num_segments = square_inputs ? 1 : block.num_segments;
      const int64_t outer = rows_outer ? panel_rows : panel_cols, inner = rows_outer ? panel_cols : panel_rows;
#pragma omp for collapse(2) schedule(static)
      for (int64_t i = 0; i < outer; ++i) {
        for (int64_t j = 0; j < inner; ++j) {
          const int64_t p = rows_outer ? i : j, q = rows_outer ? j : i;
          const float* gp = packed_g + p * block.tokens * kMR;
          const float* ap = packed_a + q * block.tokens * kNR;
          const int64_t rows = std::min<int64_t>(kMR, out_features - p * kMR);
          const int64_t cols = std::min<int64_t>(kNR, in_features - q * kNR);
          on_tile<kMR, kNR>(out + p * kMR * in_features + q * kNR, in_features, rows, cols,
                            [&](float* c, int64_t ldc) {
#if defined(__AVX512BF16__)
                              if (paired)
                                return micro_kernel_bf16(
                                    reinterpret_cast<const uint32_t*>(packed_g) + p * block.tokens * kMR,
                                    reinterpret_cast<const uint16_t*>(packed_a) + q * block.tokens * 2 * kNR,
                                    segments, segment_weight.data() + block.first_segment, num_segments, c, ldc);
#endif
                              if (square_inputs)
                                micro_kernel<false>(gp, ap, segments, num_segments, c, ldc);
                              else
                                micro_kernel<true>(gp, ap, segments, num_segments, c, ldc);
                            });
        }
      }
    }
  }
}

namespace {

// dst[j] += weight * (sum over rows r < count of G[offset(r) + j * G.stride(2)])^2 for j < width, widened to
// float32. A single row (a bias at T = 1, most tokens of an embedding) is squared as it is read; longer sums go
// through `sum` [width], scratch the caller owns.
template <bool kContiguous, class Src, class RowOffset>
void add_weighted_square_of_sum(const Src* __restrict src, int64_t col_stride, int64_t count, RowOffset offset,
                                int64_t width, float weight, float* __restrict sum, float* __restrict dst) {
  const int64_t cs = kContiguous ? 1 : col_stride;
  if (count == 1) {
    const Src* __restrict row = src + offset(0);
    for (int64_t j = 0; j < width; ++j) {
      const float x = widen(row[j * cs]);
      dst[j] += weight * x * x;
    }
    return;
  }
  // Rows are added four at a time: a quarter of the loads and stores of `sum`, which otherwise match the reads
  // of the rows themselves.
  std::fill(sum, sum + width, 0.0f);
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const Src* __restrict a = src + offset(r);
    const Src* __restrict b = src + offset(r + 1);
    const Src* __restrict c = src + offset(r + 2);
    const Src* __restrict d = src + offset(r + 3);
    for (int64_t j = 0; j < width; ++j)
      sum[j] += (widen(a[j * cs]) + widen(b[j * cs])) + (widen(c[j * cs]) + widen(d[j * cs]));
  }
  for (; r < count; ++r) {
    const Src* __restrict row = src + offset(r);
    for (int64_t j = 0; j < width; ++j) sum[j] += widen(row[j * cs]);
  }
  for (int64_t j = 0; j < width; ++j) dst[j] += weight * sum[j] * sum[j];
}

template <class RowOffset>
void add_weighted_square_of_sum(const TensorView& G, int64_t count, RowOffset offset, float weight, float* sum,
                                float* dst) {
  const int64_t cs = G.stride(2), width = G.size(2);
  if (G.dtype == DType::BFloat16) {
    const uint16_t* src = G.data<const uint16_t>();
    return cs == 1 ? add_weighted_square_of_sum<true>(src, cs, count, offset, width, weight, sum, dst)
                   : add_weighted_square_of_sum<false>(src, cs, count, offset, width, weight, sum, dst);
  }
  const float* src = G.data<const float>();
  cs == 1 ? add_weighted_square_of_sum<true>(src, cs, count, offset, width, weight, sum, dst)
          : add_weighted_square_of_sum<false>(src, cs, count, offset, width, weight, sum, dst);
}

}  // namespace

void fisher_linear_bias_cpu(const TensorView& G, const TensorView& out_view, const FisherInputs& in) {
  const int64_t N = G.size(0), T = G.size(1), width = G.size(2);
  if (N == 0 || width == 0) return;
  // Threads take token-balanced ranges of examples into private totals, reduced in thread order: the result
  // depends on the thread count only, never on scheduling. A small batch runs on one thread.
  const std::vector<int64_t> first_token = first_valid_token(in.lengths, in.weights, N, T);
  const int64_t tokens = first_token[N];
  const int threads = tokens * width < (int64_t{1} << 17)
                          ? 1 : static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(in.num_threads, N)));
  const std::vector<int64_t> first_example = token_balanced_ranges(first_token, threads);
  std::vector<std::vector<float>> totals(threads);
#pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int part = 0; part < threads; ++part) {   // every part runs, whatever team the runtime grants
    std::vector<float>& total = totals[part];
    total.assign(width, 0.0f);
    std::vector<float> sum(width);
    for (int64_t n = first_example[part]; n < first_example[part + 1]; ++n) {
      const int64_t length = first_token[n + 1] - first_token[n];
      if (length == 0) continue;
      const int64_t first = n * G.stride(0), row_stride = G.stride(1);
      add_weighted_square_of_sum(G, length, [&](int64_t t) { return first + t * row_stride; },
                                 example_weight(in.weights, n), sum.data(), total.data());
    }
  }
  float* out = out_view.data<float>();
  for (const std::vector<float>& total : totals)
    for (int64_t j = 0; j < width; ++j) out[j] += total[j];
}

void fisher_embedding_cpu(const TensorView& ids_view, const TensorView& G, const TensorView& out_view,
                          const FisherInputs& in) {
  const int64_t N = G.size(0), T = G.size(1), dim = G.size(2), vocabulary = out_view.size(0);
  const int64_t* ids = ids_view.data<const int64_t>();
  auto id_at = [&](int64_t n, int64_t t) { return ids[n * ids_view.stride(0) + t * ids_view.stride(1)]; };

  // Group each example's valid positions by token id before touching `out`, so a bad id writes nothing: per
  // example (in parallel) one sort of plain keys id << 32 | position, which orders a run's positions as they come.
  const std::vector<int64_t> first_key = first_valid_token(in.lengths, in.weights, N, T);
  const int64_t tokens = first_key[N];
  const int threads = tokens * dim < (int64_t{1} << 16) ? 1 : std::max(1, in.num_threads);
  std::vector<uint64_t> keys(static_cast<size_t>(tokens));
  std::vector<int64_t> bad_position(N, -1);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    // Every valid id is checked, those of examples weighted zero too: a bad id is bad input whatever its weight.
    const int64_t first = first_key[n], keyed = first_key[n + 1] - first, length = valid_length(in.lengths, n, T);
    for (int64_t t = 0; t < length; ++t) {
      const int64_t id = id_at(n, t);
      if (id < 0 || id >= vocabulary) {
        bad_position[n] = t;
        break;
      }
      if (t < keyed) keys[first + t] = static_cast<uint64_t>(id) << 32 | static_cast<uint64_t>(t);
    }
    if (bad_position[n] < 0) std::sort(keys.begin() + first, keys.begin() + first + keyed);
  }
  for (int64_t n = 0; n < N; ++n)
    if (bad_position[n] >= 0)   // the message only when it is needed: building it costs more than the rest
      throw std::invalid_argument("ids must lie in [0, num_embeddings=" + std::to_string(vocabulary) +
                                  ") at valid positions; got " + std::to_string(id_at(n, bad_position[n])) +
                                  " at example " + std::to_string(n) + ", position " +
                                  std::to_string(bad_position[n]));
  struct Run {
    int64_t example, id, first, count;  // positions keys[first : first + count] & 0xffffffff
  };
  std::vector<Run> runs;
  runs.reserve(static_cast<size_t>(tokens));   // one allocation: growing it by doubling costs more than the runs
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = first_key[n]; i < first_key[n + 1]; ++i) {
      const int64_t id = static_cast<int64_t>(keys[i] >> 32);
      if (i == first_key[n] || runs.back().id != id) runs.push_back({n, id, i, 0});
      runs.back().count += 1;
    }
  auto position = [&](int64_t i) { return static_cast<int64_t>(keys[i] & 0xffffffffU); };

  float* out = out_view.data<float>();
  // Each thread owns the rows of `out` whose id it is dealt (id modulo the team), so runs of one id never race and
  // every row is written whole by one thread. A small batch runs on one thread: starting a team costs more.
#pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int part = 0; part < threads; ++part) {   // every part runs, whatever team the runtime grants
    std::vector<float> sum(dim);
    for (const Run& run : runs) {
      if (run.id % threads != part) continue;
      const int64_t first = run.example * G.stride(0), row_stride = G.stride(1);
      add_weighted_square_of_sum(G, run.count, [&](int64_t r) { return first + position(run.first + r) * row_stride; },
                                 example_weight(in.weights, run.example), sum.data(), out + run.id * dim);
    }
  }
}

}  // namespace decomp
