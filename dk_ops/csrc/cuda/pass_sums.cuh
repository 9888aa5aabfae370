// A thread's sums over a pass of scope cells, kept in shared memory (see PassSums).
#pragma once

#include <cstdint>

#include "launch.cuh"

namespace dk_ops::cuda_kernels {

// Scope cells whose sums one thread keeps at a time: one pass for the default 4 x 4 scope of a
// 3 x 3 kernel.
constexpr int kCellsPerPass = 16;

// A thread's sums of a pass: its column of a block's shared array
// `acc_t block_sums[kCellsPerPass][kThreadsPerBlock]`, so that the threads of a warp hit 32
// different banks whatever cell each adds to (a thread's own array, indexed by a cell known at
// run time only, would live in local memory). The kernels that keep them are launched with
// kThreadsPerBlock threads a block.
template <typename acc_t>
struct PassSums {
  acc_t* first;  // the thread's sum of the pass's first cell; the next cells kThreadsPerBlock apart

  __device__ acc_t& operator[](int64_t cell) const { return first[cell * kThreadsPerBlock]; }
  __device__ void zero() const {
    for (int cell = 0; cell < kCellsPerPass; ++cell) (*this)[cell] = 0;
  }
};

}  // namespace dk_ops::cuda_kernels
