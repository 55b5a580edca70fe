// The id map of a shortlisted drafter head: head row i scores target id ids[i] (EAGLE-3's
// draft->target map). Framework-agnostic (no torch): raw pointers.
#pragma once
#include <cstdint>

namespace fastspec {

enum HeadIdsStatus : int32_t {
  kHeadIdsOk = 0,
  kHeadIdsOutOfRange = 1,  // an id outside [0, vocab)
  kHeadIdsDuplicate = 2,   // two rows map to the same target id
  kHeadIdsBadSize = 3,     // n < 1, n > vocab, or (identity map) n != vocab
};

// Checks a head-id map ids[n] against a target vocabulary of `vocab` ids; ids == nullptr is the
// identity map (a full head), valid only when n == vocab. On an error, *bad (when not null) is
// the index of the first offending entry (-1 for a size error). O(n + vocab) time, vocab bits.
int32_t check_head_ids(const int64_t* ids, int64_t n, int64_t vocab, int64_t* bad);

}  // namespace fastspec
