// CUDA kernels of deform_kernel_conv2d: the local path's column kernels and the global path's
// (the shared driver does layouts, GEMMs and convolutions).
//
// The same quantities as the CPU kernels (cpu/deform_kernel_conv2d_cpu.cpp) from the same
// sampling math (sampling.h, global_kernel.h). A row of Z, the scope columns, is laid out as
// (groups, S, C_in/groups) and the input is channels-last (N, H, W, C_in), so threads that
// differ only in their channel read and write consecutive addresses. Work split:
//   scope columns       one thread per (column, channel): it owns that channel's S cells of Z
//   input gradient      rigid data grid: one thread per (input pixel, channel), gathering
//                       from the columns that read the pixel (no atomics, deterministic);
//                       with data offsets: one thread per (column, channel), atomicAdd
//   offset/mask grads   one warp per (column, tap, offset group), summing over its channels
//                       (one writer per gradient entry, deterministic)
//   implicit GEMM       opt-in forward and weight gradient (implicit_gemm.cuh): a block per
//                       tile of the product, sampling its Z tiles into shared memory
//   depthwise           the direct path of depthwise convs (depthwise.cuh)
// half and bfloat16 are read and written as such; every sum runs in float32 (opmath).
// launch.cuh has the launches and the threads' indices, column_view.cuh the chunk as the kernels
// see it. The tests also run this file on a CPU, as emulated CUDA (../emulated_cuda/).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "../deform_kernel_conv2d.h"
#include "../global_kernel.h"
#include "../sampling.h"
#include "column_view.cuh"
#include "depthwise.cuh"
#include "float32_products.cuh"
#include "implicit_gemm.cuh"
#include "launch.cuh"
#include "pass_sums.cuh"

namespace dk_ops::cuda_kernels {
namespace {

using at::Tensor;


// Z[col, cell, c]: each thread owns the S cells of one (column, channel), summed
// kCellsPerPass cells at a time, and writes each once.
template <typename scalar_t>
__global__ void scope_columns_kernel(const __grid_constant__ ColumnView<scalar_t> v, scalar_t* z) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t block_sums[kCellsPerPass][kThreadsPerBlock];
  const PassSums<acc_t> sums{&block_sums[0][threadIdx.x]};
  const int64_t z_row = v.cells * v.channels;
  for (int64_t index = first_thread(); index < v.count * v.channels; index += thread_stride()) {
    const Column col = v.column(index / v.channels);
    const Channel ch = v.channel(index % v.channels);
    scalar_t* z_col = z + col.local * z_row;
    for (int64_t pass_begin = 0; pass_begin < v.cells; pass_begin += kCellsPerPass) {
      const int64_t pass_end =
          pass_begin + kCellsPerPass < v.cells ? pass_begin + kCellsPerPass : v.cells;
      sums.zero();
      add_scope_pass(v, col, ch, pass_begin, pass_end, sums.first, kThreadsPerBlock);
      for (int64_t cell = pass_begin; cell < pass_end; ++cell) {
        z_col[v.z_index(ch, cell)] = static_cast<scalar_t>(sums[cell - pass_begin]);
      }
    }
  }
}

// d loss / d (m * X_c(p)) of one tap: G_c = sum over the scope corners of B_s(q) * gZ[s, c].
template <typename scalar_t>
__device__ at::opmath_type<scalar_t> scope_gather(
    const ColumnView<scalar_t>& v, const BilinearPoint<at::opmath_type<scalar_t>>& scope,
    const scalar_t* grad_z_col, const Channel& ch) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t sum = 0;
  for_each_corner(
      scope, v.scope_h, v.scope_w, [&](int64_t y, int64_t x, acc_t weight, acc_t, acc_t) {
        sum += weight * static_cast<acc_t>(grad_z_col[v.z_index(ch, y * v.scope_w + x)]);
      });
  return sum;
}

// Rigid data grid: every tap reads one pixel, so each (pixel, channel) can gather its
// gradient from the columns that read it, in a fixed order, without atomics. The threads
// cover input pixels [pixel_begin, pixel_end) of the flattened (N, H, W) input.
template <typename scalar_t>
__global__ void input_grad_rigid_kernel(const __grid_constant__ ColumnView<scalar_t> v,
                                        int64_t pixel_begin, int64_t pixel_end,
                                        const scalar_t* grad_z,
                                        at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t z_row = v.cells * v.channels;
  const int64_t work = (pixel_end - pixel_begin) * v.channels;
  for (int64_t index = first_thread(); index < work; index += thread_stride()) {
    const int64_t pixel = pixel_begin + index / v.channels;
    const Channel ch = v.channel(index % v.channels);
    const int64_t n = pixel / (v.height * v.width);
    const int64_t y = (pixel / v.width) % v.height, x = pixel % v.width;
    acc_t sum = 0;
    v.for_each_tap([&](const Tap& tap) {
      const int64_t out_y =
          output_that_reads(y, tap.y * v.dilation_h, v.stride_h, v.pad_h, v.out_h);
      const int64_t out_x =
          output_that_reads(x, tap.x * v.dilation_w, v.stride_w, v.pad_w, v.out_w);
      if (out_y < 0 || out_x < 0) return;
      const int64_t col = n * v.positions + out_y * v.out_w + out_x;
      if (col < v.first || col >= v.first + v.count) return;  // a column of another chunk
      const auto scope = v.scope_point(ch.kernel_group, tap, col);
      sum += v.modulation(ch.deform_group, tap.index, col) *
             scope_gather(v, scope, grad_z + (col - v.first) * z_row, ch);
    });
    grad_input[pixel * v.channels + ch.index] += sum;
  }
}

// With data offsets any column may read any pixel: each (column, channel) spreads
// m * G_c over the bilinear corners of its taps with atomicAdd (order not fixed).
template <typename scalar_t>
__global__ void input_grad_atomic_kernel(const __grid_constant__ ColumnView<scalar_t> v,
                                         const scalar_t* grad_z,
                                         at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t z_row = v.cells * v.channels;
  for (int64_t index = first_thread(); index < v.count * v.channels; index += thread_stride()) {
    const Column col = v.column(index / v.channels);
    const Channel ch = v.channel(index % v.channels);
    acc_t* grad_image = grad_input + col.image + ch.index;
    v.for_each_tap([&](const Tap& tap) {
      const auto scope = v.scope_point(ch.kernel_group, tap, col.global);
      if (!scope.inside) return;
      const acc_t grad = v.modulation(ch.deform_group, tap.index, col.global) *
                         scope_gather(v, scope, grad_z + col.local * z_row, ch);
      v.for_each_data_corner(v.data_point(ch.deform_group, tap, col),
                             [&](int64_t y, int64_t x, acc_t weight, acc_t, acc_t) {
                               atomicAdd(grad_image + (y * v.width + x) * v.channels,
                                         weight * grad);
                             });
    });
  }
}

// Kernel offset gradient of one (column, tap, kernel offset group), one warp each:
//   d/dq = sum_c m * X_c(p) * sum_s dB_s/dq * gZ[s, c]   over the group's channels.
template <typename scalar_t>
__global__ void kernel_offset_grad_kernel(const __grid_constant__ ColumnView<scalar_t> v,
                                          const scalar_t* grad_z, scalar_t* grad_kernel_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t z_row = v.cells * v.channels;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t items = v.count * v.taps * v.kernel_groups;
  // Every lane of a warp has the same item, so the warp_sum calls are uniform.
  for (int64_t item = first_thread() / kWarpSize; item < items;
       item += thread_stride() / kWarpSize) {
    const int64_t kernel_group = item % v.kernel_groups;
    const Tap tap = v.tap((item / v.kernel_groups) % v.taps);
    const Column col = v.column(item / (v.kernel_groups * v.taps));
    const auto scope = v.scope_point(kernel_group, tap, col.global);
    const scalar_t* grad_z_col = grad_z + col.local * z_row;
    acc_t grad_y = 0, grad_x = 0;
    if (scope.inside) {
      for (int64_t c = kernel_group * v.kernel_group_channels + lane;
           c < (kernel_group + 1) * v.kernel_group_channels; c += kWarpSize) {
        const Channel ch = v.channel(c);
        const acc_t value = v.modulation(ch.deform_group, tap.index, col.global) *
                            v.sample(v.data_point(ch.deform_group, tap, col), col, ch);
        for_each_corner(
            scope, v.scope_h, v.scope_w, [&](int64_t y, int64_t x, acc_t, acc_t d_dy, acc_t d_dx) {
              const acc_t g = static_cast<acc_t>(grad_z_col[v.z_index(ch, y * v.scope_w + x)]);
              grad_y += value * d_dy * g;
              grad_x += value * d_dx * g;
            });
      }
    }
    grad_y = warp_sum(grad_y);
    grad_x = warp_sum(grad_x);
    if (lane == 0) {
      scalar_t* out =
          grad_kernel_offset + 2 * (kernel_group * v.taps + tap.index) * v.all_columns + col.global;
      out[0] = static_cast<scalar_t>(grad_y);
      out[v.all_columns] = static_cast<scalar_t>(grad_x);
    }
  }
}

// Data offset and mask gradients of one (column, tap, deform group), one warp each, with
// G_c = sum_s B_s(q) * gZ[s, c] over the deform group's channels:
//   d/dm = sum_c X_c(p) * G_c        d/dp = m * sum_c dX_c/dp * G_c
template <typename scalar_t>
__global__ void data_offset_and_mask_grad_kernel(const __grid_constant__ ColumnView<scalar_t> v,
                                                 const scalar_t* grad_z, scalar_t* grad_data_offset,
                                                 scalar_t* grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t z_row = v.cells * v.channels;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t items = v.count * v.taps * v.deform_groups;
  for (int64_t item = first_thread() / kWarpSize; item < items;
       item += thread_stride() / kWarpSize) {
    const int64_t deform_group = item % v.deform_groups;
    const Tap tap = v.tap((item / v.deform_groups) % v.taps);
    const Column col = v.column(item / (v.deform_groups * v.taps));
    const auto data = v.data_point(deform_group, tap, col);
    const scalar_t* grad_z_col = grad_z + col.local * z_row;
    acc_t grad_m = 0, grad_y = 0, grad_x = 0;
    if (data.inside) {
      for (int64_t c = deform_group * v.deform_group_channels + lane;
           c < (deform_group + 1) * v.deform_group_channels; c += kWarpSize) {
        const Channel ch = v.channel(c);
        const acc_t g =
            scope_gather(v, v.scope_point(ch.kernel_group, tap, col.global), grad_z_col, ch);
        v.for_each_data_corner(
            data, [&](int64_t y, int64_t x, acc_t weight, acc_t d_dy, acc_t d_dx) {
              const acc_t pixel_g =
                  g * static_cast<acc_t>(v.input[col.image + (y * v.width + x) * v.channels + c]);
              grad_m += weight * pixel_g;
              grad_y += d_dy * pixel_g;
              grad_x += d_dx * pixel_g;
            });
      }
    }
    grad_m = warp_sum(grad_m);
    grad_y = warp_sum(grad_y);
    grad_x = warp_sum(grad_x);
    if (lane == 0) {
      const int64_t row = deform_group * v.taps + tap.index;
      if (grad_mask != nullptr) {
        grad_mask[row * v.all_columns + col.global] = static_cast<scalar_t>(grad_m);
      }
      if (grad_data_offset != nullptr) {
        const acc_t m = v.modulation(deform_group, tap.index, col.global);
        scalar_t* out = grad_data_offset + 2 * row * v.all_columns + col.global;
        out[0] = static_cast<scalar_t>(m * grad_y);
        out[v.all_columns] = static_cast<scalar_t>(m * grad_x);
      }
    }
  }
}

void scatter_scope_columns(const ColumnChunk& chunk, Tensor& z) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "dk_ops_scatter_scope_columns_cuda", [&] {
        const ColumnView<scalar_t> view(chunk);
        DK_LAUNCH(scope_columns_kernel<scalar_t>, blocks_for(chunk.count * chunk.g.in_channels),
                  kThreadsPerBlock, stream)(view, z.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void gather_input_grad(const ColumnChunk& chunk, const Tensor& grad_z, Tensor& grad_input) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool rigid = !chunk.data_offset.defined();
  if (!rigid) at::globalContext().alertNotDeterministic("dk_ops::deform_kernel_conv2d_backward");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_z.scalar_type(), "dk_ops_gather_input_grad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        TORCH_INTERNAL_ASSERT(grad_input.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                              "grad_input must be in the accumulation dtype");
        const ColumnView<scalar_t> view(chunk);
        if (rigid) {
          const auto [row_begin, row_end] = rigid_input_rows(chunk);
          const int64_t begin = row_begin * chunk.g.width, end = row_end * chunk.g.width;
          DK_LAUNCH(input_grad_rigid_kernel<scalar_t>,
                    blocks_for((end - begin) * chunk.g.in_channels), kThreadsPerBlock, stream)(
              view, begin, end, grad_z.data_ptr<scalar_t>(), grad_input.data_ptr<acc_t>());
        } else {
          DK_LAUNCH(input_grad_atomic_kernel<scalar_t>,
                    blocks_for(chunk.count * chunk.g.in_channels), kThreadsPerBlock, stream)(
              view, grad_z.data_ptr<scalar_t>(), grad_input.data_ptr<acc_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void offset_and_mask_grads(const ColumnChunk& chunk, const Tensor& grad_z,
                           Tensor& grad_kernel_offset, Tensor& grad_data_offset,
                           Tensor& grad_mask) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto& g = chunk.g;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_z.scalar_type(), "dk_ops_offset_and_mask_grads_cuda", [&] {
        const ColumnView<scalar_t> view(chunk);
        if (grad_kernel_offset.defined()) {
          const int64_t warps = chunk.count * g.taps() * g.kernel_offset_groups;
          DK_LAUNCH(kernel_offset_grad_kernel<scalar_t>, blocks_for(warps * kWarpSize),
                    kThreadsPerBlock, stream)(view, grad_z.data_ptr<scalar_t>(),
                                              grad_kernel_offset.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (grad_data_offset.defined() || grad_mask.defined()) {
          const int64_t warps = chunk.count * g.taps() * g.deform_groups;
          DK_LAUNCH(data_offset_and_mask_grad_kernel<scalar_t>, blocks_for(warps * kWarpSize),
                    kThreadsPerBlock, stream)(
              view, grad_z.data_ptr<scalar_t>(),
              grad_data_offset.defined() ? grad_data_offset.data_ptr<scalar_t>() : nullptr,
              grad_mask.defined() ? grad_mask.data_ptr<scalar_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
}

// ------------------------------------------------------------------ global path
// One thread per filter tap, one per scope entry, one warp per (entries chunk, image, kernel
// offset group): each output written once, no atomics, so the global path is deterministic.

// filters[n, entry, tap] = the entry's scope sampled where image n moves the tap.
template <typename scalar_t>
__global__ void global_filters_kernel(const __grid_constant__ GlobalGeometry geometry,
                                      const scalar_t* scope, const scalar_t* offset,
                                      scalar_t* filters) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t count = geometry.batch * geometry.entries * geometry.taps;
  for (int64_t index = first_thread(); index < count; index += thread_stride()) {
    const int64_t tap = index % geometry.taps, entry = (index / geometry.taps) % geometry.entries;
    const int64_t n = index / (geometry.taps * geometry.entries);
    const scalar_t* cells = scope + entry * geometry.cells;
    acc_t value = 0;
    for_each_corner(geometry.point<acc_t>(offset, n, geometry.kernel_group_of(entry), tap),
                    geometry.scope_h, geometry.scope_w,
                    [&](int64_t y, int64_t x, acc_t weight, acc_t, acc_t) {
                      value += weight * static_cast<acc_t>(cells[y * geometry.scope_w + x]);
                    });
    filters[index] = static_cast<scalar_t>(value);
  }
}

// grad_scope[entry, cell] = sum over images and taps of B_cell(q) * grad_filters[n, entry, tap]:
// each thread owns one entry's cells, kCellsPerPass at a time.
template <typename scalar_t>
__global__ void global_weight_grad_kernel(const __grid_constant__ GlobalGeometry geometry,
                                          const scalar_t* grad_filters, const scalar_t* offset,
                                          scalar_t* grad_scope) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t block_sums[kCellsPerPass][kThreadsPerBlock];
  const PassSums<acc_t> sums{&block_sums[0][threadIdx.x]};
  for (int64_t entry = first_thread(); entry < geometry.entries; entry += thread_stride()) {
    const int64_t kernel_group = geometry.kernel_group_of(entry);
    for (int64_t pass_begin = 0; pass_begin < geometry.cells; pass_begin += kCellsPerPass) {
      const int64_t pass_end =
          pass_begin + kCellsPerPass < geometry.cells ? pass_begin + kCellsPerPass : geometry.cells;
      sums.zero();
      for (int64_t n = 0; n < geometry.batch; ++n) {
        const scalar_t* grad_taps = grad_filters + (n * geometry.entries + entry) * geometry.taps;
        for (int64_t tap = 0; tap < geometry.taps; ++tap) {
          const acc_t grad = static_cast<acc_t>(grad_taps[tap]);
          for_each_corner(geometry.point<acc_t>(offset, n, kernel_group, tap), geometry.scope_h,
                          geometry.scope_w, [&](int64_t y, int64_t x, acc_t weight, acc_t, acc_t) {
                            const int64_t cell = y * geometry.scope_w + x;
                            if (cell >= pass_begin && cell < pass_end) {
                              sums[cell - pass_begin] += weight * grad;
                            }
                          });
        }
      }
      for (int64_t cell = pass_begin; cell < pass_end; ++cell) {
        grad_scope[entry * geometry.cells + cell] = static_cast<scalar_t>(sums[cell - pass_begin]);
      }
    }
  }
}

// Scope entries per warp of the offset gradient: enough work per warp, and chunks enough to
// fill the GPU when the batch is small (c5's 512 x 512 entries: 1024 chunks per image).
constexpr int64_t kEntriesPerWarp = 8 * kWarpSize;

// The offset gradient's partial sums, partial[chunk, n, kernel_group, tap, axis]: over a chunk of
// the group's entries, sum_entry grad_filters[n, entry, tap] * sum_corners dB/dq * scope[cell].
template <typename scalar_t>
__global__ void global_offset_grad_kernel(const __grid_constant__ GlobalGeometry geometry,
                                          const scalar_t* grad_filters, const scalar_t* scope,
                                          const scalar_t* offset, int64_t chunks,
                                          at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t items = chunks * geometry.batch * geometry.kernel_groups;
  const int64_t group_entries = geometry.entries_per_kernel_group();
  // Every lane of a warp has the same item and taps, so the warp_sum calls are uniform.
  for (int64_t item = first_thread() / kWarpSize; item < items;
       item += thread_stride() / kWarpSize) {
    const int64_t kernel_group = item % geometry.kernel_groups;
    const int64_t n = (item / geometry.kernel_groups) % geometry.batch;
    const int64_t k_begin = (item / (geometry.kernel_groups * geometry.batch)) * kEntriesPerWarp;
    const int64_t k_end =
        k_begin + kEntriesPerWarp < group_entries ? k_begin + kEntriesPerWarp : group_entries;
    for (int64_t tap = 0; tap < geometry.taps; ++tap) {
      const auto point = geometry.point<acc_t>(offset, n, kernel_group, tap);
      acc_t grad_y = 0, grad_x = 0;
      for (int64_t k = k_begin + lane; k < k_end; k += kWarpSize) {
        const int64_t entry = geometry.entry_of_kernel_group(kernel_group, k);
        const scalar_t* cells = scope + entry * geometry.cells;
        const acc_t grad =
            static_cast<acc_t>(grad_filters[(n * geometry.entries + entry) * geometry.taps + tap]);
        for_each_corner(point, geometry.scope_h, geometry.scope_w,
                        [&](int64_t y, int64_t x, acc_t, acc_t d_dy, acc_t d_dx) {
                          const acc_t value =
                              static_cast<acc_t>(cells[y * geometry.scope_w + x]) * grad;
                          grad_y += d_dy * value;
                          grad_x += d_dx * value;
                        });
      }
      grad_y = warp_sum(grad_y);
      grad_x = warp_sum(grad_x);
      if (lane == 0) {
        partial[2 * (item * geometry.taps + tap)] = grad_y;
        partial[2 * (item * geometry.taps + tap) + 1] = grad_x;
      }
    }
  }
}

void sample_global_filters(const DeformKernelGeometry& g, const Tensor& weight,
                           const Tensor& kernel_offset, Tensor& filters) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto geometry = GlobalGeometry::of(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "dk_ops_sample_global_filters_cuda", [&] {
        DK_LAUNCH(global_filters_kernel<scalar_t>, blocks_for(filters.numel()), kThreadsPerBlock,
                  stream)(geometry, weight.data_ptr<scalar_t>(),
                          kernel_offset.data_ptr<scalar_t>(), filters.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void global_weight_grad(const DeformKernelGeometry& g, const Tensor& grad_filters,
                        const Tensor& kernel_offset, Tensor& grad_weight) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto geometry = GlobalGeometry::of(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_filters.scalar_type(), "dk_ops_global_weight_grad_cuda",
      [&] {
        DK_LAUNCH(global_weight_grad_kernel<scalar_t>, blocks_for(geometry.entries),
                  kThreadsPerBlock, stream)(geometry, grad_filters.data_ptr<scalar_t>(),
                          kernel_offset.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void global_offset_grad(const DeformKernelGeometry& g, const Tensor& grad_filters,
                        const Tensor& weight, const Tensor& kernel_offset,
                        Tensor& grad_kernel_offset) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto geometry = GlobalGeometry::of(g);
  const int64_t chunks =
      std::max<int64_t>(1, tiles_of(geometry.entries_per_kernel_group(), kEntriesPerWarp));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_filters.scalar_type(), "dk_ops_global_offset_grad_cuda",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto partial = at::empty({chunks, grad_kernel_offset.numel()},
                                 grad_kernel_offset.options().dtype(
                                     c10::CppTypeToScalarType<acc_t>::value));
        const int64_t warps = chunks * geometry.batch * geometry.kernel_groups;
        DK_LAUNCH(global_offset_grad_kernel<scalar_t>, blocks_for(warps * kWarpSize),
                  kThreadsPerBlock, stream)(geometry, grad_filters.data_ptr<scalar_t>(),
                                            weight.data_ptr<scalar_t>(),
                                            kernel_offset.data_ptr<scalar_t>(), chunks,
                                            partial.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grad_kernel_offset.view({-1}).copy_(partial.sum(0));  // chunks summed in a fixed order
      });
}

constexpr DeviceKernels kCudaKernels{
    {scatter_scope_columns, gather_input_grad, offset_and_mask_grads, implicit_gemm::forward,
     implicit_gemm::weight_grad, ColumnChunking::kFewPerBatch, float32_product},
    {sample_global_filters, global_weight_grad, global_offset_grad},
    {depthwise::forward, depthwise::backward},
    /*takes_half_and_bfloat16=*/true};

// The kernels run on the input's GPU (mixed devices are refused by the driver's checks).
std::optional<c10::Device> device_of_input(const Tensor& input) {
  return input.is_cuda() ? std::optional<c10::Device>(input.device()) : std::nullopt;
}

Tensor forward_cuda(const Tensor& input, const Tensor& weight, const Tensor& kernel_offset,
                    const std::optional<Tensor>& data_offset, const std::optional<Tensor>& mask,
                    const std::optional<Tensor>& bias, at::IntArrayRef kernel_size,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t groups, int64_t kernel_offset_groups, int64_t deform_groups) {
  const c10::cuda::OptionalCUDAGuard guard(device_of_input(input));
  return deform_kernel_conv2d_forward(kCudaKernels, input, weight, kernel_offset, data_offset, mask,
                                      bias, kernel_size, stride, padding, dilation, groups,
                                      kernel_offset_groups, deform_groups);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_cuda(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight,
    const Tensor& kernel_offset, const std::optional<Tensor>& data_offset,
    const std::optional<Tensor>& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t kernel_offset_groups,
    int64_t deform_groups, std::array<bool, 5> output_mask) {
  const c10::cuda::OptionalCUDAGuard guard(device_of_input(input));
  return deform_kernel_conv2d_backward(kCudaKernels, grad_output, input, weight, kernel_offset,
                                       data_offset, mask, kernel_size, stride, padding, dilation,
                                       groups, kernel_offset_groups, deform_groups, output_mask);
}

}  // namespace

#ifndef DK_EMULATED_CUDA
TORCH_LIBRARY_IMPL(dk_ops, CUDA, m) {
  m.impl("deform_kernel_conv2d", &forward_cuda);
  m.impl("deform_kernel_conv2d_backward", &backward_cuda);
}
#else
// The emulated build: the same launchers, for CPU tensors, as ops of their own namespace (schemas
// inferred from the functions), so that torch.ops.dk_ops keeps its CPU kernels.
TORCH_LIBRARY(dk_ops_emulated_cuda, m) {
  m.def("deform_kernel_conv2d", TORCH_FN(forward_cuda));
  m.def("deform_kernel_conv2d_backward", TORCH_FN(backward_cuda));
}
#endif

}  // namespace dk_ops::cuda_kernels
