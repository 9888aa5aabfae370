// How the CUDA kernels are launched and how their threads find their work, on a GPU or emulated
// on host threads (DK_EMULATED_CUDA, ../emulated_cuda/emulated_cuda.h): every launch goes through
// DK_LAUNCH(kernel, blocks, threads, stream)(args...).
#pragma once

#ifdef DK_EMULATED_CUDA
#include "../emulated_cuda/emulated_cuda.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define DK_LAUNCH(kernel, blocks, threads, stream) kernel<<<blocks, threads, 0, stream>>>
#endif

#include <algorithm>
#include <cstdint>

#include "../sampling.h"

namespace dk_ops::cuda_kernels {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // the kernels stride over the rest

// How many tiles of `tile` cover `size` (the kernels' and their launchers' tile counts).
DK_HOST_DEVICE int64_t tiles_of(int64_t size, int64_t tile) { return (size + tile - 1) / tile; }

// At least one block (an empty grid is a launch error; with no work its threads just exit).
inline int64_t blocks_for(int64_t threads) {
  return std::clamp<int64_t>(tiles_of(threads, kThreadsPerBlock), 1, kMaxBlocks);
}

inline __device__ int64_t first_thread() { return blockIdx.x * int64_t{blockDim.x} + threadIdx.x; }
inline __device__ int64_t thread_stride() { return int64_t{gridDim.x} * blockDim.x; }

// Sum over the 32 lanes of a warp (all of them must call it); the result is in lane 0.
template <typename T>
__device__ T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

}  // namespace dk_ops::cuda_kernels
