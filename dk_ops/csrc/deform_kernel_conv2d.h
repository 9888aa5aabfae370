// Shared declarations of the deform_kernel_conv2d operator: its geometry and the
// argument checks every backend runs before touching memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

namespace dk_ops {

struct DeformKernelGeometry {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, scope_h, scope_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups, kernel_offset_groups, deform_groups;
  int64_t out_h, out_w;
  bool global_kernel_offset;  // kernel_offset is (N, 2*Gk*K_h*K_w): one kernel per image

  int64_t taps() const { return kernel_h * kernel_w; }
  int64_t positions() const { return out_h * out_w; }
  int64_t scope_cells() const { return scope_h * scope_w; }
  // Scope coordinate of tap (0, 0) with zero offset: the taps sit at the scope's centre.
  double scope_origin_h() const { return (scope_h - kernel_h) / 2.0; }
  double scope_origin_w() const { return (scope_w - kernel_w) / 2.0; }
};

// Validates every argument (shapes, dtypes, devices, group divisibility) and raises a
// Python ValueError/TypeError naming the argument and the shapes involved.
DeformKernelGeometry check_deform_kernel_conv2d_args(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& kernel_offset,
    const std::optional<at::Tensor>& data_offset, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups);

// The same checks plus the shape of grad_output, for the backward op.
DeformKernelGeometry check_deform_kernel_conv2d_backward_args(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& kernel_offset, const std::optional<at::Tensor>& data_offset,
    const std::optional<at::Tensor>& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups);

// ---------------------------------------------------------------------------------------
// The local path works on "columns": one column per output location of the batch,
// col = n * H_out * W_out + y * W_out + x. Z, the scope columns, holds for each column the
// sampled input spread over the scope cells: Z[col, group, cell, channel in group], so that
// out[:, col] = weight (C_out, S * C_in/groups) @ Z[col] per group (see the CPU kernel file).

// What the per-backend column kernels read for columns [first, first + count).
struct ColumnChunk {
  DeformKernelGeometry g;
  int64_t first, count;
  at::Tensor input;          // (N, H, W, C_in) channels-last, contiguous
  at::Tensor kernel_offset;  // (2*Gk*taps, N*L) columns, contiguous
  at::Tensor data_offset;    // (2*Gd*taps, N*L) columns, or undefined (rigid data grid)
  at::Tensor mask;           // (Gd*taps, N*L) columns, or undefined
};

// The input rows that the chunk's columns can read on a rigid data grid, as a range of the
// flattened (N*H, W) input: from the first column's top tap row to the last column's bottom
// tap row (a superset: the input-gradient gathers skip columns outside the chunk).
std::pair<int64_t, int64_t> rigid_input_rows(const ColumnChunk& chunk);

// How the driver cuts the batch's columns into chunks of Z (columns_per_chunk).
enum class ColumnChunking {
  // The CPU's: chunks small enough that the GEMM finds in cache what the sampling pass wrote.
  kCacheSized,
  // A GPU's: ceil(S / taps) chunks whatever the batch, so that a layer's launches do not grow
  // with the batch, and a chunk's Z takes no more memory than the im2col columns of the whole
  // batch (taps * C_in a column) that torchvision's deform_conv2d holds at once.
  kFewPerBatch,
};

// The loops that differ per device; the GEMMs, layouts and chunking around them are
// shared (deform_kernel_conv2d_driver.cpp, which picks the strategy that calls them). Each writes
// only the tensors it receives.
struct ColumnKernels {
  // z (count, S*C_in) = scope columns of the chunk (every entry written).
  void (*scatter_scope_columns)(const ColumnChunk& chunk, at::Tensor& z);
  // grad_input (N, H, W, C_in) += the input gradient carried by grad_z (count, S*C_in).
  // grad_input is float32 when grad_z is half / bfloat16: it sums over taps and chunks.
  void (*gather_input_grad)(const ColumnChunk& chunk, const at::Tensor& grad_z,
                            at::Tensor& grad_input);
  // Offset and mask gradients of the chunk's columns, in column layout (like the inputs);
  // undefined tensors are not wanted.
  void (*offset_and_mask_grads)(const ColumnChunk& chunk, const at::Tensor& grad_z,
                                at::Tensor& grad_kernel_offset, at::Tensor& grad_data_offset,
                                at::Tensor& grad_mask);
  // The implicit GEMMs, optional (null: none), which compute the products with Z tile by tile
  // without Z in memory; the driver calls them when DK_OPS_LOCAL_KERNELS=implicit_gemm.
  // out_rows (count, C_out) = the chunk's output rows without the bias, Z @ W'^T; weight
  // (C_out, C_in/groups, S_h, S_w) contiguous. In place of the forward's scatter_scope_columns
  // and GEMMs.
  void (*implicit_gemm_forward)(const ColumnChunk& chunk, const at::Tensor& weight,
                                at::Tensor& out_rows) = nullptr;
  // grad_weight_cols (groups, S*C_in/groups, C_out/groups), grad W'^T per group in the sum dtype
  // (float32 for half / bfloat16), += Z^T @ grad_out_rows over the chunk's columns;
  // grad_out_rows (count, C_out) contiguous. In place of the backward's scatter_scope_columns
  // and weight-gradient GEMMs.
  void (*implicit_gemm_weight_grad)(const ColumnChunk& chunk, const at::Tensor& grad_out_rows,
                                    at::Tensor& grad_weight_cols) = nullptr;
  ColumnChunking chunking = ColumnChunking::kCacheSized;
  // The GEMMs on float32 columns: out = a @ b, or out += a @ b where `accumulate`, in TF32 where
  // `tf32` (the driver passes the switch of cuDNN's convolutions, torch.backends.cudnn.allow_tf32:
  // DK stands in for a convolution). Null: at::mm as it is (the CPU has no TF32).
  void (*float32_product)(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                          bool accumulate, bool tf32) = nullptr;
};

// The global path's three kernels (global_kernel.h has their math; the driver runs the
// convolutions). Each writes every entry of the tensor it receives.
struct GlobalKernels {
  // filters (N, C_out, C_in/groups, taps) = every image's kernel sampled from weight.
  void (*sample_filters)(const DeformKernelGeometry& g, const at::Tensor& weight,
                         const at::Tensor& kernel_offset, at::Tensor& filters);
  // grad_weight = sum over images and taps of grad_filters times each sample's corner weights.
  void (*weight_grad)(const DeformKernelGeometry& g, const at::Tensor& grad_filters,
                      const at::Tensor& kernel_offset, at::Tensor& grad_weight);
  // grad_kernel_offset (N, 2*Gk*taps) = sum over the kernel offset group's scope entries of
  // grad_filters times the derivatives of the samples along the offsets.
  void (*offset_grad)(const DeformKernelGeometry& g, const at::Tensor& grad_filters,
                      const at::Tensor& weight, const at::Tensor& kernel_offset,
                      at::Tensor& grad_kernel_offset);
  // Runs visit(n) for the images n of the batch, each on one host thread whose ATen ops run on
  // that thread alone, the images spread over the threads; null on devices that run the batch
  // as one grouped convolution (driver: select_strategy).
  void (*for_each_image_on_one_thread)(int64_t batch, c10::function_ref<void(int64_t)> visit) =
      nullptr;
};

// The direct path of depthwise convolutions (groups == C_in == C_out, local kernel offsets or
// data offsets / a mask): no scope columns; each (location, tap, kernel offset group) samples
// its scope once and applies it to the group's channels (depthwise.h has the math). The tensors
// as the driver hands them to the device's kernels, all contiguous:
struct DepthwiseOperands {
  DeformKernelGeometry g;
  at::Tensor input;          // (N, C, H, W)
  at::Tensor scope;          // (C, S): the weight
  at::Tensor kernel_offset;  // (N, 2*Gk*taps, H_out, W_out): global offsets broadcast
  at::Tensor data_offset;    // (N, 2*Gd*taps, H_out, W_out), or undefined (rigid data grid)
  at::Tensor mask;           // (N, Gd*taps, H_out, W_out), or undefined
};

// The depthwise path's gradients, in the layouts of DepthwiseOperands; an undefined tensor is
// not wanted. input and scope are in the sum dtype (float32 for half / bfloat16); input arrives
// zeroed, every other one is written whole.
struct DepthwiseGradients {
  at::Tensor input, scope, kernel_offset, data_offset, mask;
};

// Null where the device has no depthwise path (the driver then takes the scope columns).
struct DepthwiseKernels {
  // output (N, C, H_out, W_out) = the op's output without the bias.
  void (*forward)(const DepthwiseOperands& t, at::Tensor& output) = nullptr;
  // grad_output (N, C, H_out, W_out).
  void (*backward)(const DepthwiseOperands& t, const at::Tensor& grad_output,
                   DepthwiseGradients& grads) = nullptr;
};

struct DeviceKernels {
  ColumnKernels local;
  GlobalKernels global;
  DepthwiseKernels depthwise;
  // Whether the kernels take half and bfloat16 (summing in float32), as the CUDA ones do, also
  // when emulated; the driver runs the others on float32 copies.
  bool takes_half_and_bfloat16;
};

at::Tensor deform_kernel_conv2d_forward(
    const DeviceKernels& kernels, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& kernel_offset, const std::optional<at::Tensor>& data_offset,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, int64_t kernel_offset_groups,
    int64_t deform_groups);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
deform_kernel_conv2d_backward(
    const DeviceKernels& kernels, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& kernel_offset,
    const std::optional<at::Tensor>& data_offset, const std::optional<at::Tensor>& mask,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, int64_t kernel_offset_groups,
    int64_t deform_groups, std::array<bool, 5> output_mask);

}  // namespace dk_ops
