// The chunk of columns as the CUDA kernels see it (ColumnView) and the scope-column sum that the
// scope-column kernel and the implicit GEMMs share (add_scope_pass).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../deform_kernel_conv2d.h"
#include "../sampling.h"
#include "launch.cuh"

namespace dk_ops::cuda_kernels {

// An input channel and the groups it belongs to.
struct Channel {
  int64_t index, group, in_group, kernel_group, deform_group;
};

// A tap of the kernel: its index (row-major) and its row and column in the kernel.
struct Tap {
  int64_t index, y, x;
};

// One column of the chunk: its global and chunk-local indices, the offset of its image in
// the channels-last input and the rigid-grid input coordinate of tap (0, 0).
struct Column {
  int64_t global, local, image, y, x;
};

// The chunk as the kernels see it: raw pointers and the geometry, passed by value.
template <typename scalar_t>
struct ColumnView {
  using acc_t = at::opmath_type<scalar_t>;

  const scalar_t* input;          // (N, H, W, C_in)
  const scalar_t* kernel_offset;  // (2*Gk*taps, N*L)
  const scalar_t* data_offset;    // (2*Gd*taps, N*L), null: rigid data grid
  const scalar_t* mask;           // (Gd*taps, N*L), null: no modulation
  int64_t first, count, all_columns;
  int64_t channels, height, width, out_h, out_w, positions;
  int64_t scope_h, scope_w, cells;
  int64_t kernel_h, kernel_w, taps;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t group_channels, kernel_group_channels, deform_group_channels;
  int64_t kernel_groups, deform_groups;
  acc_t origin_h, origin_w;  // scope coordinate of tap (0, 0) with zero offset

  explicit ColumnView(const ColumnChunk& chunk) {
    const auto& g = chunk.g;
    input = chunk.input.data_ptr<scalar_t>();
    kernel_offset = chunk.kernel_offset.data_ptr<scalar_t>();
    data_offset = chunk.data_offset.defined() ? chunk.data_offset.data_ptr<scalar_t>() : nullptr;
    mask = chunk.mask.defined() ? chunk.mask.data_ptr<scalar_t>() : nullptr;
    first = chunk.first;
    count = chunk.count;
    all_columns = chunk.kernel_offset.size(1);
    channels = g.in_channels;
    height = g.height;
    width = g.width;
    out_h = g.out_h;
    out_w = g.out_w;
    positions = g.positions();
    scope_h = g.scope_h;
    scope_w = g.scope_w;
    cells = g.scope_cells();
    kernel_h = g.kernel_h;
    kernel_w = g.kernel_w;
    taps = g.taps();
    stride_h = g.stride_h;
    stride_w = g.stride_w;
    pad_h = g.pad_h;
    pad_w = g.pad_w;
    dilation_h = g.dilation_h;
    dilation_w = g.dilation_w;
    group_channels = g.in_channels / g.groups;
    kernel_group_channels = g.in_channels / g.kernel_offset_groups;
    deform_group_channels = g.in_channels / g.deform_groups;
    kernel_groups = g.kernel_offset_groups;
    deform_groups = g.deform_groups;
    origin_h = static_cast<acc_t>(g.scope_origin_h());
    origin_w = static_cast<acc_t>(g.scope_origin_w());
  }

  __device__ Channel channel(int64_t c) const {
    return {c, c / group_channels, c % group_channels, c / kernel_group_channels,
            c / deform_group_channels};
  }

  __device__ Column column(int64_t local) const {
    const int64_t global = first + local, position = global % positions;
    return {global, local, (global / positions) * height * width * channels,
            (position / out_w) * stride_h - pad_h, (position % out_w) * stride_w - pad_w};
  }

  // Tap `index`, for the kernels that take it from a flat work item.
  __device__ Tap tap(int64_t index) const { return {index, index / kernel_w, index % kernel_w}; }

  // Calls visit(tap) for every tap in order: the loops over taps need no division per tap.
  template <typename Visit>
  __device__ void for_each_tap(Visit&& visit) const {
    for (int64_t y = 0, index = 0; y < kernel_h; ++y) {
      for (int64_t x = 0; x < kernel_w; ++x, ++index) visit(Tap{index, y, x});
    }
  }

  // Index of (scope cell, channel) inside a row of Z.
  __device__ int64_t z_index(const Channel& ch, int64_t cell) const {
    return (ch.group * cells + cell) * group_channels + ch.in_group;
  }

  // Where `tap` of kernel offset group `kernel_group` samples the scope at global column `col`.
  __device__ BilinearPoint<acc_t> scope_point(int64_t kernel_group, const Tap& tap,
                                              int64_t col) const {
    const scalar_t* dy = kernel_offset + 2 * (kernel_group * taps + tap.index) * all_columns + col;
    const acc_t y = origin_h + acc_t(tap.y) + static_cast<acc_t>(dy[0]);
    const acc_t x = origin_w + acc_t(tap.x) + static_cast<acc_t>(dy[all_columns]);
    return locate<acc_t>(y, x, scope_h, scope_w);
  }

  // Where `tap` of deform group `deform_group` samples the input at the column. On a rigid
  // grid the point is a whole pixel (see for_each_data_corner).
  __device__ BilinearPoint<acc_t> data_point(int64_t deform_group, const Tap& tap,
                                             const Column& col) const {
    const acc_t y = acc_t(col.y + tap.y * dilation_h);
    const acc_t x = acc_t(col.x + tap.x * dilation_w);
    if (data_offset == nullptr) return locate<acc_t>(y, x, height, width);
    const scalar_t* dy =
        data_offset + 2 * (deform_group * taps + tap.index) * all_columns + col.global;
    return locate<acc_t>(y + static_cast<acc_t>(dy[0]), x + static_cast<acc_t>(dy[all_columns]),
                         height, width);
  }

  // for_each_corner on the input plane; on a rigid grid only the pixel itself (weight 1),
  // so its zero-weight neighbours are not read.
  template <typename Visit>
  __device__ void for_each_data_corner(const BilinearPoint<acc_t>& point, Visit&& visit) const {
    if (data_offset != nullptr) {
      for_each_corner(point, height, width, visit);
    } else if (point.inside) {
      visit(point.y0, point.x0, acc_t(1), acc_t(0), acc_t(0));
    }
  }

  __device__ acc_t modulation(int64_t deform_group, int64_t tap, int64_t col) const {
    if (mask == nullptr) return acc_t(1);
    return static_cast<acc_t>(mask[(deform_group * taps + tap) * all_columns + col]);
  }

  // X(p) of one channel: bilinear sample of the input plane.
  __device__ acc_t sample(const BilinearPoint<acc_t>& point, const Column& col,
                          const Channel& ch) const {
    acc_t value = 0;
    for_each_data_corner(point, [&](int64_t y, int64_t x, acc_t weight, acc_t, acc_t) {
      value +=
          weight * static_cast<acc_t>(input[col.image + (y * width + x) * channels + ch.index]);
    });
    return value;
  }
};

// Adds to sums[(cell - pass_begin) * stride], for the scope cells [pass_begin, pass_end) of one
// (column, channel), Z[col, cell, c] = sum over taps of B_cell(q) * m * X_c(p); X is sampled
// only for the taps with a corner in the pass. The sums are the thread's own entries of an array
// in shared memory: the cell is known at run time only, and a thread's array indexed at run
// time would live in local memory. Shared by the scope-column kernel and the implicit GEMM
// (implicit_gemm.cuh).
template <typename scalar_t>
__device__ void add_scope_pass(const ColumnView<scalar_t>& v, const Column& col,
                               const Channel& ch, int64_t pass_begin, int64_t pass_end,
                               at::opmath_type<scalar_t>* sums, int64_t stride) {
  using acc_t = at::opmath_type<scalar_t>;
  v.for_each_tap([&](const Tap& tap) {
    const auto scope = v.scope_point(ch.kernel_group, tap, col.global);
    bool sampled = false;
    acc_t value = 0;  // m * X(p), sampled once a corner of this pass needs it
    for_each_corner(scope, v.scope_h, v.scope_w,
                    [&](int64_t y, int64_t x, acc_t weight, acc_t, acc_t) {
                      const int64_t cell = y * v.scope_w + x;
                      if (cell < pass_begin || cell >= pass_end) return;
                      if (!sampled) {
                        value = v.modulation(ch.deform_group, tap.index, col.global) *
                                v.sample(v.data_point(ch.deform_group, tap, col), col, ch);
                        sampled = true;
                      }
                      sums[(cell - pass_begin) * stride] += weight * value;
                    });
  });
}

}  // namespace dk_ops::cuda_kernels
