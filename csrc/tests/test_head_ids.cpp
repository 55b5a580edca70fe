#include <gtest/gtest.h>

#include <vector>

#include "fastspec/head_ids.h"

using fastspec::check_head_ids;

TEST(HeadIds, AcceptsDistinctIdsInRange) {
  std::vector<int64_t> ids{110, 0, 7, 42};
  int64_t bad = 123;
  EXPECT_EQ(check_head_ids(ids.data(), 4, 111, &bad), fastspec::kHeadIdsOk);
  EXPECT_EQ(bad, -1);
}

TEST(HeadIds, IdentityNeedsAFullHead) {
  EXPECT_EQ(check_head_ids(nullptr, 111, 111, nullptr), fastspec::kHeadIdsOk);
  EXPECT_EQ(check_head_ids(nullptr, 37, 111, nullptr), fastspec::kHeadIdsBadSize);
}

TEST(HeadIds, RejectsOutOfRangeDuplicatesAndBadSizes) {
  int64_t bad = 0;
  std::vector<int64_t> high{3, 111};
  EXPECT_EQ(check_head_ids(high.data(), 2, 111, &bad), fastspec::kHeadIdsOutOfRange);
  EXPECT_EQ(bad, 1);
  std::vector<int64_t> negative{-1, 3};
  EXPECT_EQ(check_head_ids(negative.data(), 2, 111, &bad), fastspec::kHeadIdsOutOfRange);
  EXPECT_EQ(bad, 0);
  std::vector<int64_t> dup{5, 9, 5};
  EXPECT_EQ(check_head_ids(dup.data(), 3, 111, &bad), fastspec::kHeadIdsDuplicate);
  EXPECT_EQ(bad, 2);
  EXPECT_EQ(check_head_ids(dup.data(), 0, 111, &bad), fastspec::kHeadIdsBadSize);
  std::vector<int64_t> many(5, 0);
  EXPECT_EQ(check_head_ids(many.data(), 5, 4, &bad), fastspec::kHeadIdsBadSize);
}
