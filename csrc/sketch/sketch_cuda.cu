// CUDA sketch kernels; same contracts as sketch_cpu.cpp (see sketch.h).
// sketch_dense is a GEMM out[N, k] = X[N, p] S^T whose S tiles are generated from the hash in shared memory and
// never stored in global memory. Every output is summed in an order fixed by p alone (never by N, the batch
// split or the GPU's size), so a row's sketch does not depend on the batch it came in.
#include <algorithm>
#include <vector>

#include "../common/cuda_util.cuh"
#include "../common/hash.h"
#include "sketch.h"

namespace decomp {
namespace {

constexpr int kDenseRows = 128;      // sketch rows per block (one per generating thread)
constexpr int kDenseExamples = 32;   // examples per block
constexpr int kDenseColumns = 32;    // columns per stage: one Rademacher hash word per row
constexpr int kDenseThreads = 256;   // 32 x 8 threads, each owning 4 rows x 4 examples
constexpr int kSub = 4;
// Columns are split across blocks (each split summed into a workspace, then the splits summed in order) so that a
// small batch still fills the GPU. The split depends on p only.
constexpr int64_t kMinSplitColumns = 4096;
constexpr int64_t kMaxSplits = 32;
constexpr int64_t kExampleGroup = 128;  // examples per launch, bounding the workspace to kMaxSplits x 128 x k

__device__ __forceinline__ float sketch_entry(Distribution dist, uint32_t row_state, uint32_t word,
                                              uint64_t column) {
  return dist == Distribution::Rademacher ? rademacher_sign(word, column) : gaussian_entry(row_state, column);
}

__global__ void projection_matrix_kernel(float* out, int64_t rows, int64_t cols, uint32_t seed, uint32_t stream,
                                         Distribution dist, uint64_t offset, float scale) {
  const int64_t total = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols;
    const uint64_t column = offset + static_cast<uint64_t>(e % cols);
    const uint32_t state = hash_row(seed, stream, static_cast<uint32_t>(r));
    const uint32_t word = dist == Distribution::Rademacher ? hash_word(state, column >> 5) : 0U;
    out[e] = scale * sketch_entry(dist, state, word, column);
  }
}

// Block (row tile, example tile, split). Columns are counted from `start` (the offset rounded down to 32), so a
// stage of 32 columns is one hash word per row; X's column is that minus `lead`.
__global__ void sketch_dense_kernel(Input2 X, int64_t n_begin, int64_t examples, int64_t p, int64_t k,
                                    uint32_t seed, uint32_t stream, Distribution dist, uint64_t start, int64_t lead,
                                    int64_t split_columns, float scale, float* dst, int64_t dst_split_stride) {
  __shared__ __align__(16) float s_tile[kDenseColumns][kDenseRows];
  __shared__ float x_tile[kDenseColumns][kDenseExamples + 1];  // +1: the transposed writes avoid bank conflicts
  const int tid = threadIdx.x, tx = tid % 32, ty = tid / 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kDenseRows;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kDenseExamples;
  const int64_t begin = static_cast<int64_t>(blockIdx.z) * split_columns;
  const int64_t end = min(lead + p, begin + split_columns);
  const uint32_t row_state = tid < kDenseRows ? hash_row(seed, stream, static_cast<uint32_t>(r0 + tid)) : 0U;

  float acc[kSub][kSub] = {};
  for (int64_t c0 = begin; c0 < end; c0 += kDenseColumns) {
    const uint64_t column0 = start + static_cast<uint64_t>(c0);
    if (tid < kDenseRows) {
      const uint32_t word = dist == Distribution::Rademacher ? hash_word(row_state, column0 >> 5) : 0U;
#pragma unroll 4
      for (int c = 0; c < kDenseColumns; ++c) s_tile[c][tid] = sketch_entry(dist, row_state, word, column0 + c);
    } else {
      for (int e = tid - kDenseRows; e < kDenseColumns * kDenseExamples; e += kDenseThreads - kDenseRows) {
        const int n = e / kDenseColumns, c = e % kDenseColumns;
        const int64_t column = c0 + c - lead, example = e0 + n;
        x_tile[c][n] = (column >= 0 && column < p && example < examples)
                           ? X.at(n_begin + example, column)
                           : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kDenseColumns; ++c) {
      const float4 s = *reinterpret_cast<const float4*>(&s_tile[c][tx * kSub]);
      const float srow[kSub] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        const float x = x_tile[c][ty * kSub + i];
#pragma unroll
        for (int j = 0; j < kSub; ++j) acc[i][j] = fmaf(x, srow[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  float* split_dst = dst + static_cast<int64_t>(blockIdx.z) * dst_split_stride;
  for (int i = 0; i < kSub; ++i) {
    const int64_t example = e0 + ty * kSub + i;
    if (example >= examples) continue;
    for (int j = 0; j < kSub; ++j) {
      const int64_t r = r0 + tx * kSub + j;
      if (r < k) split_dst[example * k + r] = scale * acc[i][j];
    }
  }
}

// out[e] = scale * sum_s workspace[s][e], the splits summed in order.
__global__ void sum_splits_kernel(const float* workspace, int64_t splits, int64_t count, float scale, float* out) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += workspace[s * count + e];
    out[e] = scale * sum;
  }
}

// One thread per (example, token, bucket): the bucket's features in ascending order, as on the CPU, so both
// devices give the same bits.
__global__ void count_sketch_kernel(Input3 X, const int64_t* lengths, int64_t T, int64_t k,
                                    const int64_t* bucket_begin, const int64_t* members, const float* signs,
                                    float* out) {
  const int64_t row = blockIdx.x;  // n * T + t
  const int64_t n = row / T, t = row % T;
  const int64_t bucket = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (bucket >= k) return;
  float sum = 0.0f;
  if (t < (lengths ? lengths[n] : T))
    for (int64_t m = bucket_begin[bucket]; m < bucket_begin[bucket + 1]; ++m)
      sum += signs[m] * X.at(n, t, members[m]);
  out[row * k + bucket] = sum;
}

unsigned grid_for(int64_t count, int threads) {
  return static_cast<unsigned>(std::min<int64_t>((count + threads - 1) / threads, 65535 * 8));
}

// Device memory for the call's scratch, allocated and freed in stream order.
class StreamBuffer {
 public:
  StreamBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes) DECOMP_CUDA_CHECK(cudaMallocAsync(&data_, bytes, stream));
  }
  ~StreamBuffer() {
    if (data_) cudaFreeAsync(data_, stream_);
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  template <class T>
  T* get() const { return static_cast<T*>(data_); }

 private:
  void* data_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace

void projection_matrix_cuda(const TensorView& out, const SketchParams& params) {
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(out.device_index);
  projection_matrix_kernel<<<grid_for(rows * cols, 256), 256, 0, as_stream(params.cuda_stream)>>>(
      out.data<float>(), rows, cols, params.seed, params.stream, params.dist, params.offset, params.scale);
  DECOMP_CUDA_CHECK_LAUNCH();
}

void sketch_dense_cuda(const TensorView& X, const TensorView& out, const SketchParams& params) {
  const int64_t N = X.size(0), p = X.size(1), k = out.size(1);
  if (N == 0 || k == 0) return;
  DeviceGuard guard(X.device_index);
  cudaStream_t stream = as_stream(params.cuda_stream);
  if (p == 0) {
    DECOMP_CUDA_CHECK(cudaMemsetAsync(out.data<float>(), 0, static_cast<size_t>(N * k) * sizeof(float), stream));
    return;
  }
  const uint64_t start = params.offset & ~uint64_t{31};
  const int64_t lead = static_cast<int64_t>(params.offset - start);
  const int64_t columns = lead + p;
  int64_t split_columns = std::max(kMinSplitColumns, (columns + kMaxSplits - 1) / kMaxSplits);
  split_columns = (split_columns + kDenseColumns - 1) / kDenseColumns * kDenseColumns;
  const int64_t splits = (columns + split_columns - 1) / split_columns;
  const int64_t group = std::min(N, kExampleGroup);
  require((k + kDenseRows - 1) / kDenseRows <= 2147483647, "sketch_dense: k too large for one CUDA grid");
  StreamBuffer workspace(splits > 1 ? static_cast<size_t>(splits * group * k) * sizeof(float) : 0, stream);
  for (int64_t n_begin = 0; n_begin < N; n_begin += group) {
    const int64_t examples = std::min(group, N - n_begin);
    float* target = out.data<float>() + n_begin * k;
    dim3 grid(static_cast<unsigned>((k + kDenseRows - 1) / kDenseRows),
              static_cast<unsigned>((examples + kDenseExamples - 1) / kDenseExamples), static_cast<unsigned>(splits));
    sketch_dense_kernel<<<grid, kDenseThreads, 0, stream>>>(
        input2(X), n_begin, examples, p, k, params.seed, params.stream, params.dist, start, lead, split_columns,
        splits > 1 ? 1.0f : params.scale, splits > 1 ? workspace.get<float>() : target, examples * k);
    DECOMP_CUDA_CHECK_LAUNCH();
    if (splits > 1) {
      sum_splits_kernel<<<grid_for(examples * k, 256), 256, 0, stream>>>(workspace.get<float>(), splits,
                                                                        examples * k, params.scale, target);
      DECOMP_CUDA_CHECK_LAUNCH();
    }
  }
}

void count_sketch_cuda(const TensorView& X, const TensorView* lengths, const TensorView& out,
                       const SketchParams& params) {
  const int64_t N = X.size(0), T = X.size(1), d = X.size(2), k = out.size(2);
  if (N == 0 || T == 0) return;
  require(N * T <= 2147483647 && (k + 255) / 256 <= 65535, "count_sketch: input too large for one CUDA grid");
  DeviceGuard guard(X.device_index);
  cudaStream_t stream = as_stream(params.cuda_stream);
  // The features grouped by bucket (a stable counting sort on the host: d is a layer's width).
  std::vector<int64_t> bucket;
  std::vector<float> sign;
  count_sketch_hashes(params, d, k, bucket, sign);
  std::vector<int64_t> bucket_begin(static_cast<size_t>(k + 1), 0), members(static_cast<size_t>(d));
  std::vector<float> member_signs(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; ++j) ++bucket_begin[bucket[j] + 1];
  for (int64_t b = 0; b < k; ++b) bucket_begin[b + 1] += bucket_begin[b];
  std::vector<int64_t> fill(bucket_begin.begin(), bucket_begin.end() - 1);
  for (int64_t j = 0; j < d; ++j) {
    const int64_t slot = fill[bucket[j]]++;
    members[slot] = j;
    member_signs[slot] = sign[j];
  }
  const size_t begin_bytes = bucket_begin.size() * sizeof(int64_t), member_bytes = members.size() * sizeof(int64_t);
  StreamBuffer tables(begin_bytes + member_bytes + member_signs.size() * sizeof(float), stream);
  char* base = tables.get<char>();
  // Copies from pageable memory return once the host data has been staged, so the vectors may go out of scope.
  DECOMP_CUDA_CHECK(cudaMemcpyAsync(base, bucket_begin.data(), begin_bytes, cudaMemcpyHostToDevice, stream));
  if (d > 0) {
    DECOMP_CUDA_CHECK(cudaMemcpyAsync(base + begin_bytes, members.data(), member_bytes, cudaMemcpyHostToDevice,
                                      stream));
    DECOMP_CUDA_CHECK(cudaMemcpyAsync(base + begin_bytes + member_bytes, member_signs.data(),
                                      member_signs.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  }
  dim3 grid(static_cast<unsigned>(N * T), static_cast<unsigned>((k + 255) / 256));
  count_sketch_kernel<<<grid, 256, 0, stream>>>(
      input3(X), lengths ? lengths->data<const int64_t>() : nullptr, T, k, reinterpret_cast<int64_t*>(base),
      reinterpret_cast<int64_t*>(base + begin_bytes), reinterpret_cast<float*>(base + begin_bytes + member_bytes),
      out.data<float>());
  DECOMP_CUDA_CHECK_LAUNCH();
}

}  // namespace decomp
