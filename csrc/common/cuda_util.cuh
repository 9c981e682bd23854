// Helpers shared by the CUDA kernels: error checks, device guard, element loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "tensor_view.h"

namespace decomp {

inline void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}
#define DECOMP_CUDA_CHECK(call) ::decomp::cuda_check((call), #call)
#define DECOMP_CUDA_CHECK_LAUNCH() ::decomp::cuda_check(cudaGetLastError(), "kernel launch")

// Runs on the tensors' device and restores the caller's current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DECOMP_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) DECOMP_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// A strided 3-d float32/bfloat16 input, passed to kernels by value.
struct Input3 {
  const void* data;
  int64_t stride0, stride1, stride2;
  bool bf16;
  __device__ __forceinline__ float at(int64_t i, int64_t j, int64_t k) const {
    const int64_t offset = i * stride0 + j * stride1 + k * stride2;
    if (bf16) return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[offset]);
    return static_cast<const float*>(data)[offset];
  }
};

// A strided 2-d float32/bfloat16 input.
struct Input2 {
  const void* data;
  int64_t stride0, stride1;
  bool bf16;
  __device__ __forceinline__ float at(int64_t i, int64_t j) const {
    const int64_t offset = i * stride0 + j * stride1;
    if (bf16) return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[offset]);
    return static_cast<const float*>(data)[offset];
  }
};

inline Input2 input2(const TensorView& t) {
  return Input2{reinterpret_cast<const void*>(t.ptr), t.stride(0), t.stride(1), t.dtype == DType::BFloat16};
}

inline Input3 input3(const TensorView& t) {
  return Input3{reinterpret_cast<const void*>(t.ptr), t.stride(0), t.stride(1), t.stride(2),
                t.dtype == DType::BFloat16};
}

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace decomp
