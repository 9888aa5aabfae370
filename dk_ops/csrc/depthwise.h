// Per-element math of the direct depthwise path, shared by the CPU and CUDA kernels.
//
// With groups == C_in == C_out, output channel c reads input channel c only:
//   out[n, c, y, x] = sum_taps m * X_c(p) * W_c(q)
// where X_c(p) samples the input plane at the tap's data point p (its rigid-grid pixel moved by
// the data offset) and W_c(q) samples channel c's scope at the tap's scope point q (the tap
// moved by the kernel offset), both by sampling.h's rule. Every channel of a kernel offset group
// shares q, and every channel of a deform group shares p and m: the kernels locate them once
// per (location, tap, group) and apply their bilinear weights to all the group's channels.
// Tensors as in DepthwiseOperands (deform_kernel_conv2d.h).
#pragma once

#include <cstdint>

#include "deform_kernel_conv2d.h"
#include "sampling.h"

namespace dk_ops {

// Plain values (CUDA kernels take it by value) of the geometry the depthwise kernels need.
struct DepthwiseGeometry {
  int64_t batch, channels, height, width, out_h, out_w, positions;
  int64_t taps, kernel_h, kernel_w, scope_h, scope_w, cells;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t kernel_groups, kernel_group_channels, deform_groups, deform_group_channels;
  double origin_h, origin_w;  // scope coordinate of tap (0, 0) at zero offset

  static DepthwiseGeometry of(const DeformKernelGeometry& g) {
    return {g.batch, g.in_channels, g.height, g.width, g.out_h, g.out_w, g.positions(),
            g.taps(), g.kernel_h, g.kernel_w, g.scope_h, g.scope_w, g.scope_cells(),
            g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dilation_h, g.dilation_w,
            g.kernel_offset_groups, g.in_channels / g.kernel_offset_groups,
            g.deform_groups, g.in_channels / g.deform_groups,
            g.scope_origin_h(), g.scope_origin_w()};
  }

  // Where dy of tap (i, j) of kernel offset group kg sits at `position` of image n in the kernel
  // offset (or its gradient); dx is `positions` further.
  DK_HOST_DEVICE int64_t kernel_offset_index(int64_t n, int64_t kg, int64_t tap,
                                             int64_t position) const {
    return ((n * kernel_groups + kg) * taps + tap) * 2 * positions + position;
  }
  // The same for deform group dg in the data offset; mask_index in the mask.
  DK_HOST_DEVICE int64_t data_offset_index(int64_t n, int64_t dg, int64_t tap,
                                           int64_t position) const {
    return ((n * deform_groups + dg) * taps + tap) * 2 * positions + position;
  }
  DK_HOST_DEVICE int64_t mask_index(int64_t n, int64_t dg, int64_t tap, int64_t position) const {
    return ((n * deform_groups + dg) * taps + tap) * positions + position;
  }

  // The scope point q of tap (i, j), tap = i * K_w + j, for kernel offset group kg.
  template <typename acc_t, typename scalar_t>
  DK_HOST_DEVICE BilinearPoint<acc_t> scope_point(const scalar_t* kernel_offset, int64_t n,
                                                  int64_t kg, int64_t i, int64_t j,
                                                  int64_t position) const {
    const scalar_t* dy = kernel_offset + kernel_offset_index(n, kg, i * kernel_w + j, position);
    return locate<acc_t>(acc_t(origin_h) + acc_t(i) + static_cast<acc_t>(dy[0]),
                         acc_t(origin_w) + acc_t(j) + static_cast<acc_t>(dy[positions]), scope_h,
                         scope_w);
  }

  // The rigid-grid pixel of tap (i, j) at output (out_y, out_x), possibly outside the image.
  DK_HOST_DEVICE int64_t tap_y(int64_t out_y, int64_t i) const {
    return out_y * stride_h - pad_h + i * dilation_h;
  }
  DK_HOST_DEVICE int64_t tap_x(int64_t out_x, int64_t j) const {
    return out_x * stride_w - pad_w + j * dilation_w;
  }

  // The data point p of tap (i, j) for deform group dg: the rigid pixel moved by the data offset.
  template <typename acc_t, typename scalar_t>
  DK_HOST_DEVICE BilinearPoint<acc_t> data_point(const scalar_t* data_offset, int64_t n,
                                                 int64_t dg, int64_t i, int64_t j, int64_t out_y,
                                                 int64_t out_x) const {
    const int64_t position = out_y * out_w + out_x;
    const scalar_t* dy = data_offset + data_offset_index(n, dg, i * kernel_w + j, position);
    return locate<acc_t>(acc_t(tap_y(out_y, i)) + static_cast<acc_t>(dy[0]),
                         acc_t(tap_x(out_x, j)) + static_cast<acc_t>(dy[positions]), height,
                         width);
  }
};

}  // namespace dk_ops
