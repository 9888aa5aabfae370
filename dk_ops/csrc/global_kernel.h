// Per-element math of the global path, shared by the CPU and CUDA kernels.
//
// With global kernel offsets (kernel_offset (N, 2*Gk*taps), no data offset, no mask) every image
// has one kernel: filters[n, o, i, tap] = the scope weight[o, i] sampled bilinearly where the
// image's offset moves the tap (sampling.h's rule). The driver then runs the batch as one grouped
// convolution. The scope "entries" are the (o, i) rows of the weight, (C_out, C_in/groups, S);
// entry (o, i) belongs to the kernel offset group of its input channel.
#pragma once

#include <cstdint>

#include "deform_kernel_conv2d.h"
#include "sampling.h"

namespace dk_ops {

// Plain values (CUDA kernels take it by value) of the geometry the global kernels need.
struct GlobalGeometry {
  int64_t batch, entries;  // entries = C_out * C_in/groups, the rows of the scope
  int64_t group_in, group_out;  // C_in/groups and C_out/groups
  int64_t kernel_groups, kernel_group_channels;  // Gk and C_in/Gk
  int64_t taps, kernel_w, scope_h, scope_w, cells;
  double origin_h, origin_w;  // scope coordinate of tap (0, 0) at zero offset

  static GlobalGeometry of(const DeformKernelGeometry& g) {
    return {g.batch,
            g.out_channels * (g.in_channels / g.groups),
            g.in_channels / g.groups,
            g.out_channels / g.groups,
            g.kernel_offset_groups,
            g.in_channels / g.kernel_offset_groups,
            g.taps(),
            g.kernel_w,
            g.scope_h,
            g.scope_w,
            g.scope_cells(),
            g.scope_origin_h(),
            g.scope_origin_w()};
  }

  // Each kernel offset group holds the same number of entries: its C_in/Gk channels, each in the
  // C_out/groups output channels of its conv group.
  DK_HOST_DEVICE int64_t entries_per_kernel_group() const {
    return kernel_group_channels * group_out;
  }

  // The kernel offset group of entry (o, i), entry = o * C_in/groups + i.
  DK_HOST_DEVICE int64_t kernel_group_of(int64_t entry) const {
    const int64_t o = entry / group_in, i = entry % group_in;
    return ((o / group_out) * group_in + i) / kernel_group_channels;
  }

  // The k-th entry of kernel offset group kg (consecutive k: consecutive input channels of one
  // output channel where the group allows, so that neighbouring threads read neighbouring rows).
  DK_HOST_DEVICE int64_t entry_of_kernel_group(int64_t kg, int64_t k) const {
    const int64_t channel = kg * kernel_group_channels + k % kernel_group_channels;
    const int64_t group = channel / group_in;
    return (group * group_out + k / kernel_group_channels) * group_in + channel % group_in;
  }

  // Where image n's `tap` of kernel offset group kg samples the scope; offset is (N, 2*Gk*taps).
  template <typename acc_t, typename scalar_t>
  DK_HOST_DEVICE BilinearPoint<acc_t> point(const scalar_t* offset, int64_t n, int64_t kg,
                                            int64_t tap) const {
    const scalar_t* dy = offset + n * 2 * kernel_groups * taps + 2 * (kg * taps + tap);
    return locate<acc_t>(acc_t(origin_h) + acc_t(tap / kernel_w) + static_cast<acc_t>(dy[0]),
                         acc_t(origin_w) + acc_t(tap % kernel_w) + static_cast<acc_t>(dy[1]),
                         scope_h, scope_w);
  }
};

}  // namespace dk_ops
