#include "fastspec/prompt_lookup.h"

#include <algorithm>
#include <vector>

namespace fastspec {
namespace {

// Earliest start s in hay[0, hay_len) with hay[s, s+n) == query[0, n) and s + n < limit,
// i.e. at least one token follows the match inside hay[0, limit). -1 if none.
int64_t find_earliest(const int64_t* hay, int64_t limit, const int64_t* query, int64_t n) {
  for (int64_t s = 0; s + n < limit; ++s) {
    if (hay[s] != query[0]) continue;
    int64_t j = 1;
    while (j < n && hay[s + j] == query[j]) ++j;
    if (j == n) return s;
  }
  return -1;
}

}  // namespace

int32_t prompt_lookup_draft_row(const int64_t* source, int64_t source_len, const int64_t* generated,
                                int64_t gen_len, const PromptLookupParams& p, int64_t* out_tokens) {
  std::fill(out_tokens, out_tokens + p.gamma, int64_t(-1));
  std::vector<int64_t> text;
  text.reserve((p.source_is_prefix ? source_len : 0) + gen_len + p.gamma);
  if (p.source_is_prefix) text.insert(text.end(), source, source + source_len);
  text.insert(text.end(), generated, generated + gen_len);

  int32_t drafted = 0;
  while (drafted < p.gamma) {
    const int64_t len = static_cast<int64_t>(text.size());
    const int64_t* hay = nullptr;
    int64_t start = -1, hay_len = 0;
    for (int64_t n = std::min<int64_t>(p.max_n, len); n >= p.min_n && n >= 1; --n) {
      const int64_t* query = text.data() + len - n;
      if (!p.source_is_prefix) {
        start = find_earliest(source, source_len, query, n);
        if (start >= 0) {
          hay = source;
          hay_len = source_len;
          start += n;
          break;
        }
      }
      start = find_earliest(text.data(), len, query, n);
      if (start >= 0) {
        hay = text.data();
        hay_len = len;
        start += n;
        break;
      }
    }
    if (hay == nullptr) break;
    const int64_t take = std::min<int64_t>(p.gamma - drafted, hay_len - start);
    // Copy first: text may reallocate while we append its own continuation.
    std::vector<int64_t> piece(hay + start, hay + start + take);
    for (int64_t t : piece) {
      out_tokens[drafted++] = t;
      text.push_back(t);
    }
  }
  return drafted;
}

int32_t prompt_lookup_draft(const int64_t* source, const int64_t* source_len, int64_t S,
                            const int64_t* generated, const int64_t* gen_len, int64_t G, int64_t batch,
                            const PromptLookupParams& p, int64_t* out_tokens, int64_t* num_drafted) {
  if (batch < 0 || S < 0 || G < 0 || p.gamma < 1 || p.min_n < 1 || p.max_n < p.min_n) return -1;
  for (int64_t b = 0; b < batch; ++b) {
    if (source_len[b] < 0 || source_len[b] > S || gen_len[b] < 0 || gen_len[b] > G) return -1;
  }
  for (int64_t b = 0; b < batch; ++b) {
    num_drafted[b] = prompt_lookup_draft_row(source + b * S, source_len[b], generated + b * G, gen_len[b], p,
                                             out_tokens + b * p.gamma);
  }
  return 0;
}

}  // namespace fastspec
