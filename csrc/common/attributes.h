// Attributes and per-call checks of a masked op node (SparseMatMul, SparseMatMulNBits): mode, k / ks,
// segments, ramp, and the thresholds / scale inputs. Every error is an InvalidArgument whose one-line
// message starts with "<Op> node '<name>': " and names the fix.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/activation.h"
#include "common/mask.h"
#include "common/ort.h"

namespace acttail {

/// Parsed once when the kernel is created.
struct MaskAttributes {
  std::string op, node;
  Mode mode = Mode::kThreshold;
  std::vector<int64_t> ks;    // topk: one per member (attribute k: one value, repeated)
  bool ks_given = false;      // attribute ks (not k) was given: messages name it
  std::vector<int64_t> ends;  // attribute segments: cumulative column ends; empty = one member covering N
  float ramp = 0.0f;
  Activation activation = Activation::kNone;  // attribute activation: "" (none) or "swiglu" (X holds [gate | up])
  int members() const { return ends.empty() ? 1 : (int)ends.size(); }
  std::string Where() const { return op + " node '" + node + "': "; }
};

/// An optional float attribute: true and `out` filled when present.
bool ReadFloat(const OrtKernelInfo* info, const char* name, float& out);

/// Reads mode, k / ks, segments and ramp; `threshold_input` is the index of the thresholds input, which
/// threshold mode needs.
MaskAttributes ParseMaskAttributes(const OrtKernelInfo* info, const char* op, size_t threshold_input);

/// The shape of the op's input after the activation: X [..., K] as is, or with "swiglu" X [..., 2K] -> [..., K]
/// (throws naming the fix when the last dimension is not 2K). Shapes of rank 0 are returned unchanged.
std::vector<int64_t> ActivatedShape(const MaskAttributes& a, std::vector<int64_t> x_shape, int64_t K);

/// Member spans for an output of N columns; checks segments against N and every k against K.
MemberSpans CheckMembers(const MaskAttributes& a, int64_t K, int64_t N);

/// Threshold mode: the thresholds input holds 1 or G values.
void CheckThresholdCount(const MaskAttributes& a, int64_t count);

/// The scale input's shape is [K] or [G, K]; returns its rows (1 or G).
int64_t CheckScaleShape(const MaskAttributes& a, const std::vector<int64_t>& shape, int64_t K);

}  // namespace acttail
