// Label counting rules shared by the CPU and CUDA tally kernels (SPEC §1.3, §3).
#pragma once
#include <cstdint>
#include "ndf/common.h"

namespace ndf {

// Which images count toward A[k, c]: "paper" counts an image for every category
// it carries any label of; "netdissect-lite" only for the categories of labels the
// unit's mask overlaps, plus those of the image-level labels.
enum class Rule : int { Paper = 0, NetDissectLite = 1 };

NDF_HD inline uint32_t category_bit(const int16_t* primary_category, int32_t label) {
  const int16_t c = primary_category[label];
  return c >= 0 ? (1u << c) : 0u;
}

// Categories whose A[k, .] receives this (image, unit)'s mask size.
NDF_HD inline uint32_t counted_categories(Rule rule, uint32_t image_categories,
                                          uint32_t overlap_categories,
                                          uint32_t image_level_categories) {
  return rule == Rule::Paper ? image_categories
                             : (overlap_categories | image_level_categories);
}

}  // namespace ndf
