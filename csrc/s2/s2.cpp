// S2Attention entry points: one validation path (s2_check_params), then the CPU passes.
#include "s2/s2.h"

#include "runtime.h"
#include "s2/s2_cpu.h"

namespace mha {

// Each pass runs with a thread count the machine can create (runtime.h).
void s2_branch_sum(const S2Params& params) {
    S2Params cpu = params;
    cpu.num_threads = resolve_threads(params.num_threads);
    s2_branch_sum_cpu(cpu);
}

void s2_combine(const S2Params& params) {
    S2Params cpu = params;
    cpu.num_threads = resolve_threads(params.num_threads);
    s2_combine_cpu(cpu);
}

}  // namespace mha
