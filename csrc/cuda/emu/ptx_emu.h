// The primitives of cuda/ptx.cuh for the host emulation, written from the PTX ISA's
// documented semantics (see emu.h for the execution model):
//   shfl.sync / vote.ballot: a warp exchange; lane l reads the value deposited by its source
//     lane (l ^ mask for the butterfly, src & 31 for the indexed shuffle).
//   mma.sync.m16n8k16.row.col.f32.{f16,bf16}: the 32 lanes' fragments are put back into
//     A (16x16), B (16x8) and C (16x8) by the ISA's fragment tables (groupID = lane >> 2,
//     threadID_in_group = lane % 4):
//       A: a_i (i = 0..7, two per register, low half first) at row groupID + 8 * ((i >> 1) & 1),
//          col 2 * threadID_in_group + (i & 1) + 8 * (i >> 2)
//       B: b_i (i = 0..3) at row 2 * threadID_in_group + (i & 1) + 8 * (i >> 1), col groupID
//       C/D: c_i (i = 0..3) at row groupID + 8 * (i >> 1), col 2 * threadID_in_group + (i & 1)
//     and lane l's D elements are computed as float(C + sum_k A[r][k] B[k][c]) with the
//     products and the sum exact in double (the hardware's f32 accumulation order and
//     rounding are not modelled bit for bit).
//   ldmatrix.sync.m8n8.{x1,x2,x4}{,.trans}.b16: see ptx.cuh; each row address is checked
//     (shared memory, 16-byte aligned) and its 16 bytes count as a read by the lane that gave it.
//   cp.async.cg.shared.global [dst], [src], 16, src_size: src_size bytes copied, the rest of the
//     16 zero-filled; completed by cp.async.wait_group (see emu.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda/emu/emu.h"
#include "cuda_fp16.h"

#define MHA_DYNAMIC_SMEM(name) unsigned char* const name = ::mha_emu::tl_block->smem
#define MHA_LAUNCH(grid, block, smem, stream, ...) \
    ::mha_emu::Launcher<__VA_ARGS__> { dim3(grid), dim3(block), static_cast<size_t>(smem) }

namespace mha {
namespace cuda {

constexpr unsigned kFullWarp = 0xffffffffu;

// ------------------------------------------------------------------------------------------
// Warp shuffles and votes.

template <typename A>
inline A warp_shfl_from(A x, int src_of_lane_xor, int src_fixed) {
    static_assert(sizeof(A) <= ::mha_emu::kSlotBytes, "shuffle payload");
    const unsigned char* s = ::mha_emu::warp_exchange(::mha_emu::kOpShfl, &x, sizeof(A));
    const int lane = ::mha_emu::tl_thread->lane;
    const int src = src_fixed >= 0 ? (src_fixed & 31) : ((lane ^ src_of_lane_xor) & 31);
    A r;
    std::memcpy(&r, s + src * ::mha_emu::kSlotBytes, sizeof(A));
    return r;
}
template <typename A>
inline A warp_shfl_xor(A x, int lane_mask) {
    return warp_shfl_from(x, lane_mask, -1);
}
template <typename A>
inline A warp_shfl(A x, int src_lane) {
    return warp_shfl_from(x, 0, src_lane & 31);
}
inline unsigned warp_ballot(bool pred) {
    const unsigned char v = pred ? 1 : 0;
    const unsigned char* s = ::mha_emu::warp_exchange(::mha_emu::kOpBallot, &v, 1);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l) r |= static_cast<unsigned>(s[l * ::mha_emu::kSlotBytes]) << l;
    return r;
}
inline bool warp_any(bool pred) { return warp_ballot(pred) != 0; }

// ------------------------------------------------------------------------------------------
// Tensor cores.

namespace emu_detail {

inline float b16_to_float(uint32_t reg, int half, bool bf16) {
    const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
    if (bf16) {
        const uint32_t u = static_cast<uint32_t>(bits) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    return ::mha_emu::half_to_float_table[bits];
}

struct MmaIn {
    uint32_t a[4];
    uint32_t b[2];
};

inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                         bool bf16) {
    MmaIn in;
    std::memcpy(in.a, a, sizeof(in.a));
    in.b[0] = b0;
    in.b[1] = b1;
    const unsigned char* s =
        ::mha_emu::warp_exchange(::mha_emu::kOpMma * 2 + (bf16 ? 1 : 0), &in, sizeof(in));
    auto lane_in = [s](int l) {
        MmaIn x;
        std::memcpy(&x, s + l * ::mha_emu::kSlotBytes, sizeof(x));
        return x;
    };
    // Lane l's outputs need rows g, g + 8 of A and columns 2t, 2t + 1 of B. By the tables,
    // A[row][k] is in lane (row % 8) * 4 + (k % 8) / 2, register (row / 8) % 2 + 2 (k / 8),
    // half k % 2; B[k][col] in lane col * 4 + (k % 8) / 2, register k / 8, half k % 2.
    const int lane = ::mha_emu::tl_thread->lane;
    const int g = lane >> 2, t = lane & 3;
    float A[2][16], B[2][16];
    for (int k = 0; k < 16; ++k) {
        const int src = (k & 7) >> 1;
        for (int r = 0; r < 2; ++r) {
            const MmaIn x = lane_in(g * 4 + src);
            A[r][k] = b16_to_float(x.a[r + 2 * (k >> 3)], k & 1, bf16);
            const MmaIn y = lane_in((2 * t + r) * 4 + src);
            B[r][k] = b16_to_float(y.b[k >> 3], k & 1, bf16);
        }
    }
    for (int i = 0; i < 4; ++i) {
        double acc = c[i];
        for (int k = 0; k < 16; ++k) {
            acc += static_cast<double>(A[i >> 1][k]) * static_cast<double>(B[i & 1][k]);
        }
        c[i] = static_cast<float>(acc);
    }
}

template <int kNum, bool kTrans>
inline void ldmatrix(uint32_t (&r)[kNum], const void* p) {
    const int lane = ::mha_emu::tl_thread->lane;
    unsigned char row[16] = {0};
    if (lane < 8 * kNum &&
        ::mha_emu::check_shared(p, 16, 16, "ldmatrix row address")) {
        ::mha_emu::note_read(p, 16);
        std::memcpy(row, p, 16);
    }
    const unsigned char* s =
        ::mha_emu::warp_exchange(::mha_emu::kOpLdmatrix * 8 + kNum * 2 + (kTrans ? 1 : 0),
                                 row, 16);
    for (int i = 0; i < kNum; ++i) {
        const unsigned char* m = s + i * 8 * ::mha_emu::kSlotBytes;  // matrix i, row 0
        uint16_t lo, hi;
        if (!kTrans) {
            const unsigned char* e = m + (lane >> 2) * ::mha_emu::kSlotBytes + (lane & 3) * 4;
            std::memcpy(&lo, e, 2);
            std::memcpy(&hi, e + 2, 2);
        } else {
            const int col = lane >> 2;
            std::memcpy(&lo, m + (2 * (lane & 3)) * ::mha_emu::kSlotBytes + col * 2, 2);
            std::memcpy(&hi, m + (2 * (lane & 3) + 1) * ::mha_emu::kSlotBytes + col * 2, 2);
        }
        r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
}

}  // namespace emu_detail

inline void mma_m16n8k16_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu_detail::mma_m16n8k16(c, a, b0, b1, false);
}
inline void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu_detail::mma_m16n8k16(c, a, b0, b1, true);
}

// ------------------------------------------------------------------------------------------
// Shared memory.

inline uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - ::mha_emu::tl_block->smem);
}
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
    ::mha_emu::cp_async(dst, src, 16, src_bytes);
}
inline void cp_async_commit() { ::mha_emu::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
    ::mha_emu::cp_async_wait(kPending);
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* p) { emu_detail::ldmatrix<1, false>(r, p); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p) { emu_detail::ldmatrix<2, false>(r, p); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu_detail::ldmatrix<4, false>(r, p); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) {
    emu_detail::ldmatrix<1, true>(r, p);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
    emu_detail::ldmatrix<2, true>(r, p);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    emu_detail::ldmatrix<4, true>(r, p);
}

}  // namespace cuda
}  // namespace mha
