// Every kernel file compiled for the CPU emulator three times, once per
// storage type (OP_ELEM 0, 1, 2, as the host compiles them), each in a
// namespace of its own: k_f32, k_f16, k_bf16. The entry points' suffixes
// (_f16, _bf16) tell the 16-bit ones apart.
#pragma once
#include "emu.h"

#define OP_ELEM 0
namespace k_f32 {
#include "../linear.cu"
#include "../layer_norm.cu"
#include "../attention.cu"
#include "../alignment_loss.cu"
#include "../gather_signal_tokens.cu"
}  // namespace k_f32
#undef OP_COMMON_CUH
#undef OP_ELEM
#define OP_ELEM 1
namespace k_f16 {
#include "../linear.cu"
#include "../layer_norm.cu"
#include "../attention.cu"
#include "../alignment_loss.cu"
#include "../gather_signal_tokens.cu"
}  // namespace k_f16
#undef OP_COMMON_CUH
#undef OP_ELEM
#define OP_ELEM 2
namespace k_bf16 {
#include "../linear.cu"
#include "../layer_norm.cu"
#include "../attention.cu"
#include "../alignment_loss.cu"
#include "../gather_signal_tokens.cu"
}  // namespace k_bf16
#undef OP_ELEM
