// Run-time choice of the CPU instruction set.
#include "cpu/attention_cpu.h"

#include <cstdlib>
#include <cstring>

namespace mha {
namespace {

bool use_avx2() {
    static const bool value = [] {
#if defined(MHA_HAVE_AVX2_TU) && (defined(__x86_64__) || defined(__i386__))
        const char* forced = std::getenv("MHA_EXT_SIMD");
        if (forced != nullptr && std::strcmp(forced, "generic") == 0) return false;
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
#else
        return false;
#endif
    }();
    return value;
}

}  // namespace

const char* attention_cpu_simd() { return use_avx2() ? "avx2+fma" : "generic"; }

void attention_forward_cpu(const AttentionParams& params) {
#if defined(MHA_HAVE_AVX2_TU)
    if (use_avx2()) return cpu_avx2::attention_forward(params);
#endif
    cpu_generic::attention_forward(params);
}

void attention_forward_cpu_naive(const AttentionParams& params) {
    cpu_generic::attention_forward_naive(params);
}

}  // namespace mha
