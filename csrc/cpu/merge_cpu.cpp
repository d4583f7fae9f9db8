// CPU merge of partial attention results: out = sum_p exp(lse_p - lse) out_p, lse = logsumexp.
//
// The kernel itself is a room of the per-instruction-set CPU kernel (cpu/kernel/merge.h), so it
// runs on AVX-512 / AVX2 vectors with the kernel's vexp and non-temporal stores; this entry
// point takes the path attention_cpu.cpp's table chose (MHA_EXT_SIMD selects one).
#include "cpu/merge_cpu.h"

#include "cpu/attention_cpu.h"

namespace mha {

void merge_cpu(const MergeParams& p) { attention_cpu_merge(p); }

}  // namespace mha
