// CUDA kernels of the direct depthwise path (depthwise.h has the math), in the op's own layouts
// (N, C, H, W), so that neighbouring threads take neighbouring output locations of one channel:
//   forward            one thread per output element, summing its taps
//   input gradient     rigid data grid: one thread per input element, gathering from the
//                      (location, tap) pairs that read it (no atomics, deterministic); with data
//                      offsets: one thread per output element, atomicAdd at its taps' cells
//   scope gradient     one block per channel, each thread summing its share of the channel's
//                      samples into a pass of scope cells, the block's sums added in a fixed order
//   offset/mask grads  one thread per (location, tap, offset group), summing the group's channels
// Each thread samples the scope itself: the threads of a kernel offset group are other
// locations' (coalesced reads) rather than other channels'. Sums in float32 for half / bfloat16.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>

#include "../deform_kernel_conv2d.h"
#include "../depthwise.h"
#include "../sampling.h"
#include "launch.cuh"
#include "pass_sums.cuh"

namespace dk_ops::cuda_kernels {
namespace depthwise {

// The operands as raw pointers (mask and data offset null where absent), passed by value.
template <typename scalar_t>
struct View {
  DepthwiseGeometry d;
  const scalar_t* input;
  const scalar_t* scope;
  const scalar_t* kernel_offset;
  const scalar_t* data_offset;
  const scalar_t* mask;

  explicit View(const DepthwiseOperands& t)
      : d(DepthwiseGeometry::of(t.g)),
        input(t.input.data_ptr<scalar_t>()),
        scope(t.scope.data_ptr<scalar_t>()),
        kernel_offset(t.kernel_offset.data_ptr<scalar_t>()),
        data_offset(t.data_offset.defined() ? t.data_offset.data_ptr<scalar_t>() : nullptr),
        mask(t.mask.defined() ? t.mask.data_ptr<scalar_t>() : nullptr) {}

  using acc_t = at::opmath_type<scalar_t>;

  __device__ acc_t modulation(int64_t n, int64_t dg, int64_t tap, int64_t position) const {
    return mask ? static_cast<acc_t>(mask[d.mask_index(n, dg, tap, position)]) : acc_t(1);
  }

  // The data point of tap (i, j): on the rigid grid the pixel itself (outside the image where it
  // is, so that it samples nothing).
  __device__ BilinearPoint<acc_t> data_point(int64_t n, int64_t dg, int64_t i, int64_t j,
                                             int64_t out_y, int64_t out_x) const {
    if (data_offset) return d.template data_point<acc_t>(data_offset, n, dg, i, j, out_y, out_x);
    BilinearPoint<acc_t> point;
    point.y0 = d.tap_y(out_y, i);
    point.x0 = d.tap_x(out_x, j);
    point.inside = point.y0 >= 0 && point.y0 < d.height && point.x0 >= 0 && point.x0 < d.width;
    return point;  // ly = lx = 0: the pixel weighs 1
  }

  // A plane (H, W) sampled at a point (sampling.h's rule).
  __device__ acc_t sample(const BilinearPoint<acc_t>& point, const scalar_t* plane,
                          int64_t height, int64_t width) const {
    acc_t value = 0;
    for_each_corner(point, height, width, [&](int64_t y, int64_t x, acc_t w, acc_t, acc_t) {
      value += w * static_cast<acc_t>(plane[y * width + x]);
    });
    return value;
  }

  __device__ const scalar_t* channel_scope(int64_t c) const { return scope + c * d.cells; }
  __device__ const scalar_t* image(int64_t n, int64_t c) const {
    return input + (n * d.channels + c) * d.height * d.width;
  }
};

// Output element `index` of (N, C, H_out, W_out), with its position's (out_y, out_x).
struct OutputElement {
  int64_t n, c, position, out_y, out_x;
};

__device__ inline OutputElement output_element(const DepthwiseGeometry& d, int64_t index) {
  const int64_t position = index % d.positions;
  return {index / (d.positions * d.channels), (index / d.positions) % d.channels, position,
          position / d.out_w, position % d.out_w};
}

// Item `index` of the (n, group, tap, position) grid of the offset and mask gradients, position
// fastest, with the tap's (i, j) and the position's (out_y, out_x).
struct TapItem {
  int64_t n, group, tap, i, j, position, out_y, out_x;
};

__device__ inline TapItem tap_item(const DepthwiseGeometry& d, int64_t index, int64_t groups) {
  const int64_t position = index % d.positions, tap = (index / d.positions) % d.taps;
  return {index / (d.positions * d.taps * groups), (index / (d.positions * d.taps)) % groups,
          tap, tap / d.kernel_w, tap % d.kernel_w, position, position / d.out_w,
          position % d.out_w};
}

template <typename scalar_t>
__global__ void forward_kernel(const __grid_constant__ View<scalar_t> v, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& d = v.d;
  const int64_t count = d.batch * d.channels * d.positions;
  for (int64_t index = first_thread(); index < count; index += thread_stride()) {
    const auto [n, c, position, out_y, out_x] = output_element(d, index);
    const int64_t kg = c / d.kernel_group_channels, dg = c / d.deform_group_channels;
    acc_t sum = 0;
    for (int64_t i = 0; i < d.kernel_h; ++i) {
      for (int64_t j = 0; j < d.kernel_w; ++j) {
        const auto q = d.template scope_point<acc_t>(v.kernel_offset, n, kg, i, j, position);
        const auto p = v.data_point(n, dg, i, j, out_y, out_x);
        if (!q.inside || !p.inside) continue;
        sum += v.modulation(n, dg, i * d.kernel_w + j, position) *
               v.sample(p, v.image(n, c), d.height, d.width) *
               v.sample(q, v.channel_scope(c), d.scope_h, d.scope_w);
      }
    }
    output[index] = static_cast<scalar_t>(sum);
  }
}

// dL/d(m X_c(p)) of tap (i, j) at `position`: grad_output times the sampled scope.
template <typename scalar_t>
__device__ at::opmath_type<scalar_t> tap_grad(const View<scalar_t>& v, const scalar_t* grad_output,
                                              int64_t n, int64_t c, int64_t i, int64_t j,
                                              int64_t position) {
  const auto& d = v.d;
  const auto q = d.template scope_point<at::opmath_type<scalar_t>>(
      v.kernel_offset, n, c / d.kernel_group_channels, i, j, position);
  return static_cast<at::opmath_type<scalar_t>>(
             grad_output[(n * d.channels + c) * d.positions + position]) *
         v.sample(q, v.channel_scope(c), d.scope_h, d.scope_w);
}

// Rigid grid: each input element gathers from the (location, tap) pairs that read it.
template <typename scalar_t>
__global__ void input_grad_rigid_kernel(const __grid_constant__ View<scalar_t> v,
                                        const scalar_t* grad_output,
                                        at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& d = v.d;
  const int64_t count = d.batch * d.channels * d.height * d.width;
  for (int64_t index = first_thread(); index < count; index += thread_stride()) {
    const int64_t x = index % d.width, y = (index / d.width) % d.height;
    const int64_t c = (index / (d.width * d.height)) % d.channels;
    const int64_t n = index / (d.width * d.height * d.channels);
    acc_t sum = 0;
    for (int64_t i = 0; i < d.kernel_h; ++i) {
      const int64_t out_y = output_that_reads(y, i * d.dilation_h, d.stride_h, d.pad_h, d.out_h);
      if (out_y < 0) continue;
      for (int64_t j = 0; j < d.kernel_w; ++j) {
        const int64_t out_x =
            output_that_reads(x, j * d.dilation_w, d.stride_w, d.pad_w, d.out_w);
        if (out_x < 0) continue;
        const int64_t position = out_y * d.out_w + out_x;
        sum += v.modulation(n, c / d.deform_group_channels, i * d.kernel_w + j, position) *
               tap_grad(v, grad_output, n, c, i, j, position);
      }
    }
    grad_input[index] += sum;
  }
}

// Data offsets: each output element adds its taps' input gradients at their cells.
template <typename scalar_t>
__global__ void input_grad_atomic_kernel(const __grid_constant__ View<scalar_t> v,
                                         const scalar_t* grad_output,
                                         at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& d = v.d;
  const int64_t count = d.batch * d.channels * d.positions;
  for (int64_t index = first_thread(); index < count; index += thread_stride()) {
    const auto [n, c, position, out_y, out_x] = output_element(d, index);
    const int64_t dg = c / d.deform_group_channels;
    acc_t* grad_image = grad_input + (n * d.channels + c) * d.height * d.width;
    for (int64_t i = 0; i < d.kernel_h; ++i) {
      for (int64_t j = 0; j < d.kernel_w; ++j) {
        const acc_t grad = v.modulation(n, dg, i * d.kernel_w + j, position) *
                           tap_grad(v, grad_output, n, c, i, j, position);
        for_each_corner(v.data_point(n, dg, i, j, out_y, out_x), d.height, d.width,
                        [&](int64_t y, int64_t x, acc_t w, acc_t, acc_t) {
                          atomicAdd(grad_image + y * d.width + x, w * grad);
                        });
      }
    }
  }
}

// grad_scope[c, cell] = sum over images, locations and taps of B_cell(q) m X_c(p) dL/dout: one
// block per channel, kCellsPerPass cells at a time, each thread's sums then the block's warps'
// added in a fixed order.
template <typename scalar_t>
__global__ void scope_grad_kernel(const __grid_constant__ View<scalar_t> v,
                                  const scalar_t* grad_output,
                                  at::opmath_type<scalar_t>* grad_scope) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t block_sums[kCellsPerPass][kThreadsPerBlock];
  __shared__ acc_t warp_sums[kThreadsPerBlock / kWarpSize][kCellsPerPass];
  const PassSums<acc_t> sums{&block_sums[0][threadIdx.x]};
  const auto& d = v.d;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t items = d.batch * d.positions * d.taps;
  for (int64_t c = blockIdx.x; c < d.channels; c += gridDim.x) {
    const int64_t kg = c / d.kernel_group_channels, dg = c / d.deform_group_channels;
    for (int64_t pass_begin = 0; pass_begin < d.cells; pass_begin += kCellsPerPass) {
      sums.zero();
      for (int64_t item = threadIdx.x; item < items; item += blockDim.x) {
        const int64_t tap = item % d.taps, position = (item / d.taps) % d.positions;
        const int64_t n = item / (d.taps * d.positions);
        const int64_t i = tap / d.kernel_w, j = tap % d.kernel_w;
        const int64_t out_y = position / d.out_w, out_x = position % d.out_w;
        const auto q = d.template scope_point<acc_t>(v.kernel_offset, n, kg, i, j, position);
        const auto p = v.data_point(n, dg, i, j, out_y, out_x);
        if (!q.inside || !p.inside) continue;
        const acc_t grad = static_cast<acc_t>(grad_output[(n * d.channels + c) * d.positions +
                                                          position]) *
                           v.modulation(n, dg, tap, position) *
                           v.sample(p, v.image(n, c), d.height, d.width);
        for_each_corner(q, d.scope_h, d.scope_w, [&](int64_t y, int64_t x, acc_t w, acc_t, acc_t) {
          const int64_t cell = y * d.scope_w + x;
          if (cell >= pass_begin && cell < pass_begin + kCellsPerPass) {
            sums[cell - pass_begin] += w * grad;
          }
        });
      }
      for (int k = 0; k < kCellsPerPass; ++k) {
        const acc_t warp_sum_k = warp_sum(sums[k]);
        if (lane == 0) warp_sums[warp][k] = warp_sum_k;
      }
      __syncthreads();
      if (threadIdx.x < kCellsPerPass && pass_begin + threadIdx.x < d.cells) {
        acc_t sum = 0;
        for (int w = 0; w < kThreadsPerBlock / kWarpSize; ++w) sum += warp_sums[w][threadIdx.x];
        grad_scope[c * d.cells + pass_begin + threadIdx.x] = sum;
      }
      __syncthreads();  // warp_sums is read before the next pass writes it
    }
  }
}

// Kernel offset gradient of (n, kg, tap, position): sum over the group's channels of
// m X_c(p) dL/dout sum_k dB_k/dq W_c[cell k].
template <typename scalar_t>
__global__ void kernel_offset_grad_kernel(const __grid_constant__ View<scalar_t> v,
                                          const scalar_t* grad_output,
                                          scalar_t* grad_kernel_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& d = v.d;
  const int64_t count = d.batch * d.kernel_groups * d.taps * d.positions;
  for (int64_t index = first_thread(); index < count; index += thread_stride()) {
    const auto [n, kg, tap, i, j, position, out_y, out_x] = tap_item(d, index, d.kernel_groups);
    const auto q = d.template scope_point<acc_t>(v.kernel_offset, n, kg, i, j, position);
    acc_t grad_y = 0, grad_x = 0;
    if (q.inside) {
      for (int64_t c = kg * d.kernel_group_channels; c < (kg + 1) * d.kernel_group_channels;
           ++c) {
        const int64_t dg = c / d.deform_group_channels;
        const auto p = v.data_point(n, dg, i, j, out_y, out_x);
        if (!p.inside) continue;
        const acc_t value = static_cast<acc_t>(grad_output[(n * d.channels + c) * d.positions +
                                                           position]) *
                            v.modulation(n, dg, tap, position) *
                            v.sample(p, v.image(n, c), d.height, d.width);
        const scalar_t* cells = v.channel_scope(c);
        for_each_corner(q, d.scope_h, d.scope_w,
                        [&](int64_t y, int64_t x, acc_t, acc_t d_dy, acc_t d_dx) {
                          const acc_t w = static_cast<acc_t>(cells[y * d.scope_w + x]) * value;
                          grad_y += d_dy * w;
                          grad_x += d_dx * w;
                        });
      }
    }
    scalar_t* out = grad_kernel_offset + d.kernel_offset_index(n, kg, tap, position);
    out[0] = static_cast<scalar_t>(grad_y);
    out[d.positions] = static_cast<scalar_t>(grad_x);
  }
}

// Data offset and mask gradients of (n, dg, tap, position), with u_c = dL/dout W_c(q) summed
// over the group's channels: dm = sum_c u_c X_c(p), dp = m sum_c u_c dX_c/dp.
template <typename scalar_t>
__global__ void data_offset_and_mask_grad_kernel(const __grid_constant__ View<scalar_t> v,
                                                 const scalar_t* grad_output,
                                                 scalar_t* grad_data_offset, scalar_t* grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& d = v.d;
  const int64_t count = d.batch * d.deform_groups * d.taps * d.positions;
  for (int64_t index = first_thread(); index < count; index += thread_stride()) {
    const auto [n, dg, tap, i, j, position, out_y, out_x] = tap_item(d, index, d.deform_groups);
    const auto p = v.data_point(n, dg, i, j, out_y, out_x);
    acc_t grad_m = 0, grad_y = 0, grad_x = 0;
    if (p.inside) {
      for (int64_t c = dg * d.deform_group_channels; c < (dg + 1) * d.deform_group_channels;
           ++c) {
        const acc_t u = tap_grad(v, grad_output, n, c, i, j, position);
        const scalar_t* plane = v.image(n, c);
        for_each_corner(p, d.height, d.width,
                        [&](int64_t y, int64_t x, acc_t w, acc_t d_dy, acc_t d_dx) {
                          const acc_t value = u * static_cast<acc_t>(plane[y * d.width + x]);
                          grad_m += w * value;
                          grad_y += d_dy * value;
                          grad_x += d_dx * value;
                        });
      }
    }
    if (grad_mask) grad_mask[d.mask_index(n, dg, tap, position)] = static_cast<scalar_t>(grad_m);
    if (grad_data_offset) {
      const acc_t m = v.modulation(n, dg, tap, position);
      scalar_t* out = grad_data_offset + d.data_offset_index(n, dg, tap, position);
      out[0] = static_cast<scalar_t>(m * grad_y);
      out[d.positions] = static_cast<scalar_t>(m * grad_x);
    }
  }
}

inline void forward(const DepthwiseOperands& t, at::Tensor& output) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, output.scalar_type(), "dk_ops_depthwise_forward_cuda", [&] {
        DK_LAUNCH(forward_kernel<scalar_t>, blocks_for(output.numel()), kThreadsPerBlock,
                  stream)(View<scalar_t>(t), output.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

inline void backward(const DepthwiseOperands& t, const at::Tensor& grad_output,
                     DepthwiseGradients& grads) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto d = DepthwiseGeometry::of(t.g);
  const bool rigid = !t.data_offset.defined();
  if (grads.input.defined() && !rigid) {
    at::globalContext().alertNotDeterministic("dk_ops::deform_kernel_conv2d_backward");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "dk_ops_depthwise_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const View<scalar_t> view(t);
        const scalar_t* go = grad_output.data_ptr<scalar_t>();
        if (grads.input.defined()) {
          if (rigid) {
            DK_LAUNCH(input_grad_rigid_kernel<scalar_t>, blocks_for(grads.input.numel()),
                      kThreadsPerBlock, stream)(view, go, grads.input.data_ptr<acc_t>());
          } else {
            DK_LAUNCH(input_grad_atomic_kernel<scalar_t>, blocks_for(grad_output.numel()),
                      kThreadsPerBlock, stream)(view, go, grads.input.data_ptr<acc_t>());
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (grads.scope.defined()) {
          DK_LAUNCH(scope_grad_kernel<scalar_t>, std::clamp<int64_t>(d.channels, 1, kMaxBlocks),
                    kThreadsPerBlock, stream)(view, go, grads.scope.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (grads.kernel_offset.defined()) {
          DK_LAUNCH(kernel_offset_grad_kernel<scalar_t>,
                    blocks_for(d.batch * d.kernel_groups * d.taps * d.positions),
                    kThreadsPerBlock, stream)(view, go, grads.kernel_offset.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (grads.data_offset.defined() || grads.mask.defined()) {
          DK_LAUNCH(data_offset_and_mask_grad_kernel<scalar_t>,
                    blocks_for(d.batch * d.deform_groups * d.taps * d.positions),
                    kThreadsPerBlock, stream)(
              view, go,
              grads.data_offset.defined() ? grads.data_offset.data_ptr<scalar_t>() : nullptr,
              grads.mask.defined() ? grads.mask.data_ptr<scalar_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
}

}  // namespace depthwise
}  // namespace dk_ops::cuda_kernels
