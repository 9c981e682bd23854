// CUDA kernels of the diagonal Fisher; same contracts as fisher_cpu.cpp (see fisher.h).
#include <algorithm>

#include "../common/cuda_util.cuh"
#include "fisher.h"

namespace decomp {
namespace {

constexpr int kTile = 64;       // output tile is kTile (out) x kTile (in)
constexpr int kTokens = 16;     // tokens staged in shared memory at a time
constexpr int kThreads = 256;   // 16 x 16 threads, each owning a 4 x 4 sub-tile
constexpr int kSub = 4;

__device__ __forceinline__ int64_t length_of(const int64_t* lengths, int64_t n, int64_t T) {
  return lengths ? lengths[n] : T;
}
__device__ __forceinline__ float weight_of(const float* weights, int64_t n) { return weights ? weights[n] : 1.0f; }

// Each block owns one output tile and a slice of the examples; per example it forms the tile of G_n^T A_n
// in registers (tokens staged through shared memory) and accumulates its weighted square.
__global__ void fisher_linear_kernel(Input3 A, Input3 G, const int64_t* lengths, const float* weights, int64_t N,
                                     int64_t T, int64_t in_features, int64_t out_features, int64_t examples_per_split,
                                     float* out) {
  __shared__ float g_tile[kTokens][kTile];
  __shared__ float a_tile[kTokens][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile, i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.z) * examples_per_split;
  const int64_t n_end = min(N, n_begin + examples_per_split);

  float acc[kSub][kSub] = {};
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t length = length_of(lengths, n, T);
    const float weight = weight_of(weights, n);
    if (length == 0 || weight == 0.0f) continue;
    float tile[kSub][kSub] = {};
    for (int64_t t0 = 0; t0 < length; t0 += kTokens) {
      for (int e = threadIdx.x; e < kTokens * kTile; e += kThreads) {
        const int k = e / kTile, c = e % kTile;
        const int64_t t = t0 + k;
        g_tile[k][c] = (t < length && o0 + c < out_features) ? G.at(n, t, o0 + c) : 0.0f;
        a_tile[k][c] = (t < length && i0 + c < in_features) ? A.at(n, t, i0 + c) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kTokens; ++k) {
        float g[kSub], a[kSub];
#pragma unroll
        for (int r = 0; r < kSub; ++r) g[r] = g_tile[k][ty * kSub + r];
#pragma unroll
        for (int c = 0; c < kSub; ++c) a[c] = a_tile[k][tx * kSub + c];
#pragma unroll
        for (int r = 0; r < kSub; ++r)
#pragma unroll
          for (int c = 0; c < kSub; ++c) tile[r][c] = fmaf(g[r], a[c], tile[r][c]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kSub; ++r)
#pragma unroll
      for (int c = 0; c < kSub; ++c) acc[r][c] = fmaf(weight * tile[r][c], tile[r][c], acc[r][c]);
  }
  for (int r = 0; r < kSub; ++r) {
    const int64_t o = o0 + ty * kSub + r;
    if (o >= out_features) continue;
    for (int c = 0; c < kSub; ++c) {
      const int64_t i = i0 + tx * kSub + c;
      if (i < in_features) atomicAdd(out + o * in_features + i, acc[r][c]);
    }
  }
}

__global__ void fisher_linear_bias_kernel(Input3 G, const int64_t* lengths, const float* weights, int64_t N,
                                          int64_t T, int64_t width, float* out) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= width) return;
  float total = 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t length = length_of(lengths, n, T);
    float sum = 0.0f;
    for (int64_t t = 0; t < length; ++t) sum += G.at(n, t, o);
    total = fmaf(weight_of(weights, n) * sum, sum, total);
  }
  out[o] += total;
}

// One block per example; threads stride over the embedding dimension. A position contributes only as the
// first occurrence of its id, summing every later position with the same id before squaring.
__global__ void fisher_embedding_kernel(const int64_t* ids, int64_t ids_stride0, int64_t ids_stride1, Input3 G,
                                        const int64_t* lengths, const float* weights, int64_t T, int64_t dim,
                                        float* out) {
  const int64_t n = blockIdx.x;
  const int64_t length = length_of(lengths, n, T);
  const float weight = weight_of(weights, n);
  if (weight == 0.0f) return;
  const int64_t* row = ids + n * ids_stride0;
  for (int64_t t = 0; t < length; ++t) {
    const int64_t id = row[t * ids_stride1];
    bool first = true;
    for (int64_t s = 0; s < t && first; ++s) first = row[s * ids_stride1] != id;
    if (!first) continue;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      float sum = 0.0f;
      for (int64_t s = t; s < length; ++s)
        if (row[s * ids_stride1] == id) sum += G.at(n, s, d);
      atomicAdd(out + id * dim + d, weight * sum * sum);
    }
  }
}

const int64_t* lengths_ptr(const FisherInputs& in) {
  return in.lengths ? in.lengths->data<const int64_t>() : nullptr;
}
const float* weights_ptr(const FisherInputs& in) { return in.weights ? in.weights->data<const float>() : nullptr; }

}  // namespace

void fisher_linear_cuda(const TensorView& A, const TensorView& G, const TensorView& out, const FisherInputs& in) {
  const int64_t N = A.size(0), T = A.size(1), in_features = A.size(2), out_features = G.size(2);
  if (N == 0 || T == 0 || in_features == 0 || out_features == 0) return;
  DeviceGuard guard(A.device_index);
  int sms = 0;
  DECOMP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, A.device_index));
  const int64_t tiles_in = (in_features + kTile - 1) / kTile, tiles_out = (out_features + kTile - 1) / kTile;
  // Split the examples across blocks only as far as needed to fill the GPU twice over.
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(N, (2 * sms + tiles_in * tiles_out - 1) /
                                                                       (tiles_in * tiles_out)));
  const int64_t per_split = (N + splits - 1) / splits;
  require(tiles_out <= 65535 && splits <= 65535, "fisher_linear: layer too large for one CUDA grid");
  dim3 grid(static_cast<unsigned>(tiles_in), static_cast<unsigned>(tiles_out),
            static_cast<unsigned>((N + per_split - 1) / per_split));
  fisher_linear_kernel<<<grid, kThreads, 0, as_stream(in.stream)>>>(input3(A), input3(G), lengths_ptr(in),
                                                                     weights_ptr(in), N, T, in_features,
                                                                     out_features, per_split, out.data<float>());
  DECOMP_CUDA_CHECK_LAUNCH();
}

void fisher_linear_bias_cuda(const TensorView& G, const TensorView& out, const FisherInputs& in) {
  const int64_t N = G.size(0), T = G.size(1), width = G.size(2);
  if (width == 0) return;
  DeviceGuard guard(G.device_index);
  const int threads = 256;
  const auto blocks = static_cast<unsigned>((width + threads - 1) / threads);
  fisher_linear_bias_kernel<<<blocks, threads, 0, as_stream(in.stream)>>>(input3(G), lengths_ptr(in),
                                                                          weights_ptr(in), N, T, width,
                                                                          out.data<float>());
  DECOMP_CUDA_CHECK_LAUNCH();
}

void fisher_embedding_cuda(const TensorView& ids, const TensorView& G, const TensorView& out,
                           const FisherInputs& in) {
  const int64_t N = G.size(0), T = G.size(1), dim = G.size(2);
  if (N == 0 || dim == 0) return;
  require(N <= 2147483647, "fisher_embedding: too many examples for one CUDA grid");
  DeviceGuard guard(G.device_index);
  fisher_embedding_kernel<<<static_cast<unsigned>(N), 128, 0, as_stream(in.stream)>>>(
      ids.data<const int64_t>(), ids.stride(0), ids.stride(1), input3(G), lengths_ptr(in), weights_ptr(in), T,
      dim, out.data<float>());
  DECOMP_CUDA_CHECK_LAUNCH();
}

}  // namespace decomp
