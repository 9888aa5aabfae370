// Per-element bilinear sampling math, shared by the CPU and CUDA kernels.
//
// Both samplings of the operator use the same rule: a point (y, x) of an H x W plane
// is the bilinear blend of its four surrounding cells, cells outside the plane count
// as zero, and points outside (-1, H) x (-1, W) sample zero. (This is mmcv's
// deformable-convolution rule.) The input image and the kernel scope are such planes.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DK_HOST_DEVICE inline
#endif

namespace dk_ops {

// Where a point falls in a plane: its top-left cell and the fractional position in it.
template <typename T>
struct BilinearPoint {
  int64_t y0 = 0, x0 = 0;  // top-left cell (floor of the point)
  T ly = 0, lx = 0;        // point - top-left cell, in [0, 1)
  bool inside = false;     // false outside (-1, H) x (-1, W), and for NaN / inf coordinates
};

template <typename T>
DK_HOST_DEVICE BilinearPoint<T> locate(T y, T x, int64_t height, int64_t width) {
  BilinearPoint<T> point;
  // Written so that NaN fails the test: no float-to-int conversion happens on it.
  point.inside = y > T(-1) && y < T(height) && x > T(-1) && x < T(width);
  if (!point.inside) return point;
  const T floor_y = ::floor(y), floor_x = ::floor(x);
  point.y0 = static_cast<int64_t>(floor_y);
  point.x0 = static_cast<int64_t>(floor_x);
  point.ly = y - floor_y;
  point.lx = x - floor_x;
  return point;
}

// Calls visit(cell_y, cell_x, weight, d_weight/d_y, d_weight/d_x) for each of the
// (at most four) cells that weigh in on the point and lie inside the plane.
template <typename T, typename Visit>
DK_HOST_DEVICE void for_each_corner(const BilinearPoint<T>& p, int64_t height, int64_t width,
                                    Visit&& visit) {
  if (!p.inside) return;
  const T hy = 1 - p.ly, hx = 1 - p.lx;
  const bool top = p.y0 >= 0, bottom = p.y0 + 1 < height;
  const bool left = p.x0 >= 0, right = p.x0 + 1 < width;
  if (top && left) visit(p.y0, p.x0, hy * hx, -hx, -hy);
  if (top && right) visit(p.y0, p.x0 + 1, hy * p.lx, -p.lx, hy);
  if (bottom && left) visit(p.y0 + 1, p.x0, p.ly * hx, hx, -p.ly);
  if (bottom && right) visit(p.y0 + 1, p.x0 + 1, p.ly * p.lx, p.lx, p.ly);
}

// On a rigid data grid, the output coordinate whose tap at `tap_offset` (i * dilation) reads
// input coordinate `input`, i.e. input = out * stride - pad + tap_offset; -1 where none does.
DK_HOST_DEVICE int64_t output_that_reads(int64_t input, int64_t tap_offset, int64_t stride,
                                         int64_t pad, int64_t out_size) {
  const int64_t steps = input + pad - tap_offset;
  if (stride == 1) return steps >= 0 && steps < out_size ? steps : -1;  // no division
  if (steps < 0 || steps % stride != 0) return -1;
  return steps / stride < out_size ? steps / stride : -1;
}

}  // namespace dk_ops
