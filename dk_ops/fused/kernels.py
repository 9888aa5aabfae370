"""The Triton kernels of the fused local DK path: the forward, the weight gradient and the
gradients of the input, offsets and mask, each building its scope-column tiles in registers.

The scope columns of a group are ``Z[(c, s), l] = sum_taps m * X_c(p) * B_s(q)`` (the sampled
input value of channel c, spread over scope cell s by the tap's bilinear scope weight), so that
``out = W' @ Z`` with ``W' = weight.view(C_out, C_in/groups * S)``. A tile of Z covers
``BLOCK_C`` channels x ``S_PAD`` cells (the scope's S cells padded to a power of two) x
``BLOCK_L`` output locations; it lives in registers only and feeds ``tl.dot`` directly.

Channels are visited in blocks that never cross a conv group, a kernel-offset group or a deform
group: a block's channels share one kernel offset and one data offset, so its taps sample the
scope once per location and the input once per (channel, location). Segments of
``segment_channels`` (the gcd of the three group sizes) start the blocks.

Every tensor is contiguous (the launcher sees to it); offsets, masks and sums are float32.
"""
import triton
import triton.language as tl


@triton.jit
def channel_block_count(group_channels, segment_channels, BLOCK_C: tl.constexpr):
    """The channel blocks of a group: each segment's channels in blocks of BLOCK_C."""
    return (group_channels // segment_channels) * tl.cdiv(segment_channels, BLOCK_C)


@triton.jit
def channel_block(block, group, group_channels, segment_channels, kernel_group_channels,
                  deform_group_channels, BLOCK_C: tl.constexpr):
    """Channel block ``block`` of conv group ``group``: its channels (absolute), which of them
    exist, and the kernel-offset and deform group they all belong to."""
    blocks_per_segment = tl.cdiv(segment_channels, BLOCK_C)
    segment = block // blocks_per_segment
    segment_start = segment * segment_channels
    local = segment_start + (block % blocks_per_segment) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (local < segment_start + segment_channels) & (local < group_channels)
    first = group * group_channels + segment_start
    return (group * group_channels + local, valid, first // kernel_group_channels,
            first // deform_group_channels)


@triton.jit
def tap_points(n, tap, kernel_group, deform_group, loc, loc_valid, kernel_offset, data_offset,
               mask, out_w, locations, taps, kernel_groups, deform_groups, kernel_w, stride_h,
               stride_w, pad_h, pad_w, dilation_h, dilation_w, scope_shift_h, scope_shift_w,
               HAS_DATA_OFFSET: tl.constexpr, HAS_MASK: tl.constexpr):
    """For one tap at locations ``loc``: the input point p, the mask m and the scope point q."""
    i = tap // kernel_w
    j = tap % kernel_w
    p_y = ((loc // out_w) * stride_h - pad_h + i * dilation_h).to(tl.float32)
    p_x = ((loc % out_w) * stride_w - pad_w + j * dilation_w).to(tl.float32)
    if HAS_DATA_OFFSET:
        row = ((n * deform_groups + deform_group) * taps + tap).to(tl.int64) * 2 * locations
        p_y += tl.load(data_offset + row + loc, mask=loc_valid, other=0.0)
        p_x += tl.load(data_offset + row + locations + loc, mask=loc_valid, other=0.0)
    if HAS_MASK:
        row = ((n * deform_groups + deform_group) * taps + tap).to(tl.int64) * locations
        m = tl.load(mask + row + loc, mask=loc_valid, other=0.0)
    else:
        m = tl.where(loc_valid, 1.0, 0.0)
    row = ((n * kernel_groups + kernel_group) * taps + tap).to(tl.int64) * 2 * locations
    q_y = i + scope_shift_h + tl.load(kernel_offset + row + loc, mask=loc_valid, other=0.0)
    q_x = j + scope_shift_w + tl.load(kernel_offset + row + locations + loc, mask=loc_valid,
                                      other=0.0)
    return p_y, p_x, m, q_y, q_x


@triton.jit
def scope_weights(q_y, q_x, scope_h, scope_w, S_PAD: tl.constexpr, WITH_SLOPES: tl.constexpr):
    """The bilinear weight of every scope cell (rows, padded to S_PAD) at the scope points
    ``q`` (columns), and with WITH_SLOPES its derivatives along y and x; zero outside the scope.

    A cell's weight is the tent ``max(0, 1 - |q_y - y|) * max(0, 1 - |q_x - x|)``, nonzero for
    the (at most 4) cells around q. A point outside the open range (-1, S) of either axis (NaN
    included) touches no cell.
    """
    inside = (q_y > -1) & (q_y < scope_h) & (q_x > -1) & (q_x < scope_w)
    q_y = tl.where(inside, q_y, -2.0)
    q_x = tl.where(inside, q_x, -2.0)
    cell = tl.arange(0, S_PAD)
    d_y = q_y[None, :] - (cell // scope_w).to(tl.float32)[:, None]
    d_x = q_x[None, :] - (cell % scope_w).to(tl.float32)[:, None]
    tent_y = tl.where((cell < scope_h * scope_w)[:, None], tl.maximum(1 - tl.abs(d_y), 0.0), 0.0)
    tent_x = tl.maximum(1 - tl.abs(d_x), 0.0)
    if WITH_SLOPES:
        # d/dq (1 - |d|) = -sign(d) where |d| < 1: 0 at d = 0, as autograd of the reference has it.
        slope_y = tl.where(tent_y > 0, tl.where(d_y > 0, -1.0, tl.where(d_y < 0, 1.0, 0.0)), 0.0)
        slope_x = tl.where(tent_x > 0, tl.where(d_x > 0, -1.0, tl.where(d_x < 0, 1.0, 0.0)), 0.0)
        return tent_y * tent_x, slope_y * tent_x, tent_y * slope_x
    else:
        return tent_y * tent_x, tent_x, tent_x


@triton.jit
def input_corners(p_y, p_x, height, width):
    """The top-left pixel of the bilinear square around each input point and its fractions;
    a point outside (-1, H) x (-1, W) (NaN included) moves where no corner is a pixel."""
    inside = (p_y > -1) & (p_y < height) & (p_x > -1) & (p_x < width)
    p_y = tl.where(inside, p_y, -2.0)
    p_x = tl.where(inside, p_x, -2.0)
    top = tl.floor(p_y)
    left = tl.floor(p_x)
    return top.to(tl.int32), left.to(tl.int32), p_y - top, p_x - left


@triton.jit
def load_pixels(plane, channels_valid, row, col, height, width):
    """Pixels ``(row, col)`` (columns) of the planes ``plane`` (rows), zero outside the image."""
    inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
    return tl.load(plane + (row * width + col)[None, :],
                   mask=channels_valid[:, None] & inside[None, :], other=0.0).to(tl.float32)


@triton.jit
def input_samples(input, n, channels, channels_valid, top, left, frac_y, frac_x, in_channels,
                  height, width, WITH_SLOPES: tl.constexpr):
    """Bilinear samples X_c(p) of the block's channels (rows) at the points (columns), and
    with WITH_SLOPES their derivatives along y and x."""
    plane = input + (n * in_channels + channels).to(tl.int64)[:, None] * height * width
    top_left = load_pixels(plane, channels_valid, top, left, height, width)
    top_right = load_pixels(plane, channels_valid, top, left + 1, height, width)
    bottom_left = load_pixels(plane, channels_valid, top + 1, left, height, width)
    bottom_right = load_pixels(plane, channels_valid, top + 1, left + 1, height, width)
    fy = frac_y[None, :]
    fx = frac_x[None, :]
    value = ((1 - fy) * ((1 - fx) * top_left + fx * top_right) +
             fy * ((1 - fx) * bottom_left + fx * bottom_right))
    if WITH_SLOPES:
        d_y = (1 - fx) * (bottom_left - top_left) + fx * (bottom_right - top_right)
        d_x = (1 - fy) * (top_right - top_left) + fy * (bottom_right - bottom_left)
        return value, d_y, d_x
    else:
        return value, value, value


@triton.jit
def sample_tap(input, kernel_offset, data_offset, mask, n, tap, channels, channels_valid,
               kernel_group, deform_group, loc, loc_valid, in_channels, height, width, out_w,
               locations, taps, kernel_groups, deform_groups, kernel_w, stride_h, stride_w, pad_h,
               pad_w, dilation_h, dilation_w, scope_shift_h, scope_shift_w, scope_h, scope_w,
               HAS_DATA_OFFSET: tl.constexpr, HAS_MASK: tl.constexpr, S_PAD: tl.constexpr,
               WITH_SLOPES: tl.constexpr):
    """One tap at the locations ``loc``: the mask, the input samples of the block's channels
    and the scope cells' weights (with WITH_SLOPES the slopes of both), and the input points'
    top-left pixels and fractions."""
    p_y, p_x, m, q_y, q_x = tap_points(n, tap, kernel_group, deform_group, loc, loc_valid,
                                       kernel_offset, data_offset, mask, out_w, locations, taps,
                                       kernel_groups, deform_groups, kernel_w, stride_h, stride_w,
                                       pad_h, pad_w, dilation_h, dilation_w, scope_shift_h,
                                       scope_shift_w, HAS_DATA_OFFSET, HAS_MASK)
    top, left, frac_y, frac_x = input_corners(p_y, p_x, height, width)
    sample, sample_dy, sample_dx = input_samples(input, n, channels, channels_valid, top, left,
                                                 frac_y, frac_x, in_channels, height, width,
                                                 WITH_SLOPES)
    cell_weight, cell_weight_dy, cell_weight_dx = scope_weights(q_y, q_x, scope_h, scope_w,
                                                                S_PAD, WITH_SLOPES)
    return (m, sample, sample_dy, sample_dx, cell_weight, cell_weight_dy, cell_weight_dx, top,
            left, frac_y, frac_x)


@triton.jit
def scope_column_tile(input, kernel_offset, data_offset, mask, n, channels, channels_valid,
                      kernel_group, deform_group, loc, loc_valid, in_channels, height, width,
                      out_w, locations, taps, kernel_groups, deform_groups, kernel_w, stride_h,
                      stride_w, pad_h, pad_w, dilation_h, dilation_w, scope_shift_h,
                      scope_shift_w, scope_h, scope_w, HAS_DATA_OFFSET: tl.constexpr,
                      HAS_MASK: tl.constexpr, BLOCK_C: tl.constexpr, S_PAD: tl.constexpr,
                      BLOCK_L: tl.constexpr):
    """The Z tile of the block's channels x all scope cells (rows, channel-major) x ``loc``
    (columns), in float32."""
    columns = tl.zeros((BLOCK_C, S_PAD, BLOCK_L), dtype=tl.float32)
    for tap in range(taps):
        m, sample, _, _, cell_weight, _, _, _, _, _, _ = sample_tap(
            input, kernel_offset, data_offset, mask, n, tap, channels, channels_valid,
            kernel_group, deform_group, loc, loc_valid, in_channels, height, width, out_w,
            locations, taps, kernel_groups, deform_groups, kernel_w, stride_h, stride_w, pad_h,
            pad_w, dilation_h, dilation_w, scope_shift_h, scope_shift_w, scope_h, scope_w,
            HAS_DATA_OFFSET, HAS_MASK, S_PAD, False)
        columns += (sample * m[None, :])[:, None, :] * cell_weight[None, :, :]
    return tl.reshape(columns, (BLOCK_C * S_PAD, BLOCK_L))


@triton.jit
def weight_tile_pointers(weight, out_channels, out_valid, group_channels, channels, channels_valid,
                         group, scope_h, scope_w, BLOCK_C: tl.constexpr, S_PAD: tl.constexpr):
    """Pointers to ``weight[o, c, s]`` for the rows ``out_channels`` (absolute) and the Z rows
    of the block (columns), and which of them exist."""
    k = tl.arange(0, BLOCK_C * S_PAD)
    cells = scope_h * scope_w
    cell = k % S_PAD
    local = tl.reshape(tl.broadcast_to((channels - group * group_channels)[:, None],
                                       (BLOCK_C, S_PAD)), (BLOCK_C * S_PAD, ))
    valid_k = tl.reshape(tl.broadcast_to(channels_valid[:, None], (BLOCK_C, S_PAD)),
                         (BLOCK_C * S_PAD, )) & (cell < cells)
    offsets = (out_channels.to(tl.int64)[:, None] * group_channels * cells +
               (local * cells + cell)[None, :])
    return weight + offsets, out_valid[:, None] & valid_k[None, :]


@triton.jit
def dot_operand(tile, DTYPE: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """``tile`` rounded to the tensors' dtype, the operand of ``tl.dot``; float32 again where
    the interpreter would multiply reduced-precision operands wrongly."""
    tile = tile.to(DTYPE)
    if DOT_IN_FLOAT32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def forward_kernel(input, weight, kernel_offset, data_offset, mask, bias, output, in_channels,
                   height, width, out_w, locations, groups, group_channels, group_out_channels,
                   segment_channels, kernel_group_channels,
                   deform_group_channels, taps, kernel_groups, deform_groups, kernel_w, stride_h,
                   stride_w, pad_h, pad_w, dilation_h, dilation_w, scope_shift_h, scope_shift_w,
                   scope_h, scope_w, HAS_DATA_OFFSET: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_BIAS: tl.constexpr, DTYPE: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, S_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
                   BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[n, o, l] for a tile of locations x output channels of one (image, group)."""
    n = tl.program_id(2) // groups
    group = tl.program_id(2) % groups
    loc = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    loc_valid = loc < locations
    out_local = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_valid = out_local < group_out_channels
    out_channels = group * group_out_channels + out_local
    total = tl.zeros((BLOCK_O, BLOCK_L), dtype=tl.float32)
    for block in range(channel_block_count(group_channels, segment_channels, BLOCK_C)):
        channels, channels_valid, kernel_group, deform_group = channel_block(
            block, group, group_channels, segment_channels, kernel_group_channels,
            deform_group_channels, BLOCK_C)
        columns = scope_column_tile(input, kernel_offset, data_offset, mask, n, channels,
                                    channels_valid, kernel_group, deform_group, loc, loc_valid,
                                    in_channels, height, width, out_w, locations, taps,
                                    kernel_groups, deform_groups, kernel_w, stride_h, stride_w,
                                    pad_h, pad_w, dilation_h, dilation_w, scope_shift_h,
                                    scope_shift_w, scope_h, scope_w, HAS_DATA_OFFSET, HAS_MASK,
                                    BLOCK_C, S_PAD, BLOCK_L)
        pointers, valid = weight_tile_pointers(weight, out_channels, out_valid, group_channels,
                                               channels, channels_valid, group, scope_h, scope_w,
                                               BLOCK_C, S_PAD)
        weights = tl.load(pointers, mask=valid, other=0.0)
        total = tl.dot(dot_operand(weights, DTYPE, DOT_IN_FLOAT32),
                       dot_operand(columns, DTYPE, DOT_IN_FLOAT32), total,
                       input_precision=DOT_PRECISION)
    if HAS_BIAS:
        total += tl.load(bias + out_channels, mask=out_valid, other=0.0).to(tl.float32)[:, None]
    out_rows = (n * groups * group_out_channels + out_channels).to(tl.int64) * locations
    tl.store(output + out_rows[:, None] + loc[None, :], total.to(DTYPE),
             mask=out_valid[:, None] & loc_valid[None, :])


@triton.jit
def weight_grad_kernel(grad_output, input, kernel_offset, data_offset, mask, grad_weight_parts,
                       batch, in_channels, height, width, out_w, locations, groups,
                       group_channels, group_out_channels, segment_channels,
                       kernel_group_channels, deform_group_channels, taps, kernel_groups,
                       deform_groups, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                       dilation_w, scope_shift_h, scope_shift_w, scope_h, scope_w,
                       HAS_DATA_OFFSET: tl.constexpr, HAS_MASK: tl.constexpr,
                       DTYPE: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, S_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """gO^T Z over one range of the (image, location tile) pairs, for a tile of output channels
    x one channel block's Z rows of one group; each range writes its own float32 part."""
    block = tl.program_id(1)
    group = tl.program_id(2) % groups
    part = tl.program_id(2) // groups
    parts = tl.num_programs(2) // groups
    out_local = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_valid = out_local < group_out_channels
    out_channels = group * group_out_channels + out_local
    channels, channels_valid, kernel_group, deform_group = channel_block(
        block, group, group_channels, segment_channels, kernel_group_channels,
        deform_group_channels, BLOCK_C)
    location_tiles = tl.cdiv(locations, BLOCK_L)
    per_part = tl.cdiv(batch * location_tiles, parts)
    total = tl.zeros((BLOCK_O, BLOCK_C * S_PAD), dtype=tl.float32)
    for step in range(part * per_part, tl.minimum((part + 1) * per_part, batch * location_tiles)):
        n = step // location_tiles
        loc = (step % location_tiles) * BLOCK_L + tl.arange(0, BLOCK_L)
        loc_valid = loc < locations
        columns = scope_column_tile(input, kernel_offset, data_offset, mask, n, channels,
                                    channels_valid, kernel_group, deform_group, loc, loc_valid,
                                    in_channels, height, width, out_w, locations, taps,
                                    kernel_groups, deform_groups, kernel_w, stride_h, stride_w,
                                    pad_h, pad_w, dilation_h, dilation_w, scope_shift_h,
                                    scope_shift_w, scope_h, scope_w, HAS_DATA_OFFSET, HAS_MASK,
                                    BLOCK_C, S_PAD, BLOCK_L)
        out_rows = (n * groups * group_out_channels + out_channels).to(tl.int64) * locations
        grads = tl.load(grad_output + out_rows[:, None] + loc[None, :],
                        mask=out_valid[:, None] & loc_valid[None, :], other=0.0)
        total = tl.dot(dot_operand(grads, DTYPE, DOT_IN_FLOAT32),
                       dot_operand(tl.trans(columns), DTYPE, DOT_IN_FLOAT32), total,
                       input_precision=DOT_PRECISION)
    pointers, valid = weight_tile_pointers(grad_weight_parts, out_channels, out_valid,
                                           group_channels, channels, channels_valid, group,
                                           scope_h, scope_w, BLOCK_C, S_PAD)
    part_size = groups * group_out_channels * group_channels * scope_h * scope_w
    tl.store(pointers + part.to(tl.int64) * part_size, total, mask=valid)


@triton.jit
def sampling_grad_kernel(grad_output, input, weight, kernel_offset, data_offset, mask, grad_input,
                         grad_kernel_offset, grad_data_offset, grad_mask, in_channels, height,
                         width, out_w, locations, groups, group_channels, group_out_channels,
                         segment_channels, kernel_group_channels, deform_group_channels, taps,
                         kernel_groups, deform_groups, kernel_w, stride_h, stride_w, pad_h,
                         pad_w, dilation_h, dilation_w, scope_shift_h, scope_shift_w, scope_h,
                         scope_w, HAS_DATA_OFFSET: tl.constexpr, HAS_MASK: tl.constexpr,
                         DTYPE: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, S_PAD: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad Z = W'^T gO for one channel block x a tile of locations of one (image, group), kept
    in registers and spent at once on the input, kernel-offset, data-offset and mask gradients
    (float32 buffers, added to with atomics: other blocks and tiles share their elements)."""
    n = tl.program_id(2) // groups
    group = tl.program_id(2) % groups
    loc = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    loc_valid = loc < locations
    channels, channels_valid, kernel_group, deform_group = channel_block(
        tl.program_id(1), group, group_channels, segment_channels, kernel_group_channels,
        deform_group_channels, BLOCK_C)
    grad_columns = tl.zeros((BLOCK_C * S_PAD, BLOCK_L), dtype=tl.float32)
    for out_start in range(0, group_out_channels, BLOCK_O):
        out_local = out_start + tl.arange(0, BLOCK_O)
        out_valid = out_local < group_out_channels
        out_channels = group * group_out_channels + out_local
        pointers, valid = weight_tile_pointers(weight, out_channels, out_valid, group_channels,
                                               channels, channels_valid, group, scope_h,
                                               scope_w, BLOCK_C, S_PAD)
        weights = tl.load(pointers, mask=valid, other=0.0)
        out_rows = (n * groups * group_out_channels + out_channels).to(tl.int64) * locations
        grads = tl.load(grad_output + out_rows[:, None] + loc[None, :],
                        mask=out_valid[:, None] & loc_valid[None, :], other=0.0)
        grad_columns = tl.dot(dot_operand(tl.trans(weights), DTYPE, DOT_IN_FLOAT32),
                              dot_operand(grads, DTYPE, DOT_IN_FLOAT32), grad_columns,
                              input_precision=DOT_PRECISION)
    grad_columns = tl.reshape(grad_columns, (BLOCK_C, S_PAD, BLOCK_L))
    planes = (n * in_channels + channels).to(tl.int64)[:, None] * height * width
    pixel_valid = channels_valid[:, None] & loc_valid[None, :]
    for tap in range(taps):
        (m, sample, sample_dy, sample_dx, cell_weight, cell_weight_dy, cell_weight_dx, top, left,
         frac_y, frac_x) = sample_tap(input, kernel_offset, data_offset, mask, n, tap, channels,
                                      channels_valid, kernel_group, deform_group, loc, loc_valid,
                                      in_channels, height, width, out_w, locations, taps,
                                      kernel_groups, deform_groups, kernel_w, stride_h, stride_w,
                                      pad_h, pad_w, dilation_h, dilation_w, scope_shift_h,
                                      scope_shift_w, scope_h, scope_w, HAS_DATA_OFFSET, HAS_MASK,
                                      S_PAD, True)
        # d loss / d (m * X_c(p)) of this tap: grad Z weighted by the tap's scope cells.
        grad_sample = tl.sum(grad_columns * cell_weight[None, :, :], axis=1)
        grad_pixels = grad_sample * m[None, :]
        fy = frac_y[None, :]
        fx = frac_x[None, :]
        for corner_y in tl.static_range(2):
            for corner_x in tl.static_range(2):
                row = top + corner_y
                col = left + corner_x
                inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
                share = (fy if corner_y else 1 - fy) * (fx if corner_x else 1 - fx)
                tl.atomic_add(grad_input + planes + (row * width + col)[None, :],
                              grad_pixels * share, mask=pixel_valid & inside[None, :])
        # The tap's per-location gradients sum over the block's channels (the scope cells).
        grad_scope = tl.sum(grad_columns * (sample * m[None, :])[:, None, :], axis=0)
        row = ((n * kernel_groups + kernel_group) * taps + tap).to(tl.int64) * 2 * locations
        tl.atomic_add(grad_kernel_offset + row + loc, tl.sum(grad_scope * cell_weight_dy, axis=0),
                      mask=loc_valid)
        tl.atomic_add(grad_kernel_offset + row + locations + loc,
                      tl.sum(grad_scope * cell_weight_dx, axis=0), mask=loc_valid)
        if HAS_DATA_OFFSET:
            row = ((n * deform_groups + deform_group) * taps + tap).to(tl.int64) * 2 * locations
            tl.atomic_add(grad_data_offset + row + loc, tl.sum(grad_pixels * sample_dy, axis=0),
                          mask=loc_valid)
            tl.atomic_add(grad_data_offset + row + locations + loc,
                          tl.sum(grad_pixels * sample_dx, axis=0), mask=loc_valid)
        if HAS_MASK:
            row = ((n * deform_groups + deform_group) * taps + tap).to(tl.int64) * locations
            tl.atomic_add(grad_mask + row + loc, tl.sum(grad_sample * sample, axis=0),
                          mask=loc_valid)
