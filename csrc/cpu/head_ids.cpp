#include "fastspec/head_ids.h"

#include <cstddef>
#include <vector>

namespace fastspec {

int32_t check_head_ids(const int64_t* ids, int64_t n, int64_t vocab, int64_t* bad) {
  if (bad != nullptr) *bad = -1;
  if (n < 1 || vocab < 1 || n > vocab || (ids == nullptr && n != vocab)) return kHeadIdsBadSize;
  if (ids == nullptr) return kHeadIdsOk;
  std::vector<bool> seen(static_cast<std::size_t>(vocab), false);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    if (id < 0 || id >= vocab) {
      if (bad != nullptr) *bad = i;
      return kHeadIdsOutOfRange;
    }
    if (seen[static_cast<std::size_t>(id)]) {
      if (bad != nullptr) *bad = i;
      return kHeadIdsDuplicate;
    }
    seen[static_cast<std::size_t>(id)] = true;
  }
  return kHeadIdsOk;
}

}  // namespace fastspec
