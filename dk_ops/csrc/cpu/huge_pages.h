// CPU tensors on transparent huge pages, for the op's largest gradients.
//
// With one kernel offset set per channel, a depthwise layer's kernel offsets (and their
// gradient) hold 2 * K_h * K_w values per input value: tens to hundreds of MB at detector sizes.
// A fresh tensor of that size is mapped on first touch, one page fault per 4 KiB page, and on a
// virtual machine those faults cost as much as the backward's arithmetic. On 2 MiB pages they
// are 512 times fewer. This is what PyTorch's own THP_MEM_ALLOC_ENABLE=1 does for every CPU
// allocation; here it applies to these gradients alone.
#pragma once

#include <ATen/ATen.h>

namespace dk_ops {

// An uninitialised tensor like `like`: on huge pages where it is a large CPU tensor and the
// kernel offers them (Linux, transparent huge pages in "madvise" or "always" mode), otherwise
// at::empty_like's.
at::Tensor empty_like_on_huge_pages(const at::Tensor& like);

}  // namespace dk_ops
