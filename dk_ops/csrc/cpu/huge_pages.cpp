#include "huge_pages.h"

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dk_ops {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
// Below this a tensor has too few pages for their faults to matter.
constexpr size_t kSmallestOnHugePages = 8 * kHugePage;
}  // namespace

at::Tensor empty_like_on_huge_pages(const at::Tensor& like) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (like.device().is_cpu() && bytes >= kSmallestOnHugePages) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (void* data = std::aligned_alloc(kHugePage, rounded)) {
      madvise(data, rounded, MADV_HUGEPAGE);  // a hint: where the kernel declines, 4 KiB pages
      return at::from_blob(data, like.sizes(), [](void* p) { std::free(p); }, like.options());
    }
  }
#endif
  return at::empty_like(like, at::MemoryFormat::Contiguous);
}

}  // namespace dk_ops
