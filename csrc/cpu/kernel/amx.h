// AMX micro-kernels of the blocked CPU kernel (bf16 storage, fp32 accumulation, TDPBF16PS),
// compiled into the `amx` copy only (__AMX_BF16__); the tile loop (tile_loop.h) takes them
// for bf16 tasks of a dot score with more than kGemvRows queries.
//
// Same layouts as the fp32 tile path, so the online softmax, masking and output rooms are
// shared unchanged:
//   S^T (keys x queries, fp32) = K . Q^T   A tiles: K rows, read in place (16 keys x 32 d);
//                                          B tiles: Q^T in the VNNI pair layout (packed once
//                                          per task, unscaled, so exactly the input bf16);
//                                          the scale is applied to S^T in fp32.
//   O (queries x dv, fp32)   += P . V      A tiles: P rounded to bf16 (as GPU flash kernels
//                                          do), transposed from P^T 16 x 32 at a time;
//                                          B tiles: V rows repacked per key tile to VNNI pairs.
// The eight tile registers are used as 4 accumulators (2 x 2 blocks of 16 x 16 fp32), 2 A and
// 2 B tiles. Each thread loads the tile configuration at the start of its task
// (amx_begin) and releases the tile state at its end (amx_end): another library in the same
// thread (oneDNN in PyTorch) may use other shapes between two calls.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/convert.h"
#include "cpu/kernel/masking.h"
#include "cpu/kernel/micro.h"
#include "cpu/kernel/softmax.h"
#include "cpu/kernel/tile.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define MHA_CPU_AMX 1
#else
#define MHA_CPU_AMX 0
#endif

namespace mha {
namespace MHA_CPU_NS {

// Storage types that take the AMX path when this copy has it.
template <typename T>
struct AmxStorage {
    static constexpr bool value = false;
};
#if MHA_CPU_AMX
template <>
struct AmxStorage<bf16> {
    static constexpr bool value = true;
};
#endif

constexpr int64_t kAmxK = 32;  // bf16 elements of one tile row (64 bytes): the reduction step
constexpr int64_t kAmxN = 16;  // rows of a tile; fp32 columns of an accumulator tile

// Bytes of the per-thread AMX buffers (TileDims::amx_bytes()).
inline int64_t amx_scratch_bytes(int64_t dk, int64_t dvp, int64_t bq, int64_t bk) {
    const int64_t dk32 = round_up(dk, kAmxK), bk32 = round_up(bk, kAmxK), bq16 = round_up(bq, 16);
    int64_t n = 0;
    n += round_up(dk32 * bq16 * 2, 64);          // q_vnni
    n += round_up(kAmxN * dk32 * 2, 64);         // k_pad
    n += round_up(bk32 * round_up(dvp, 32) * 2, 64);  // v_vnni
    n += round_up(bq16 * bk32 * 2, 64);          // p_rows
    n += round_up(kAmxN * kAmxN * 4, 64);        // c_tmp
    return n;
}

#if MHA_CPU_AMX

struct alignas(64) AmxTileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Every tile register 16 rows x 64 bytes.
inline void amx_begin() {
    AmxTileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}
inline void amx_end() { _tile_release(); }

// Q^T in the VNNI pair layout: qv[(d / 2) * (2 * nqc) + 2 * r + (d & 1)] = q[r][d], zero for
// d >= dk (up to dk rounded to 32) and for the padding queries nq <= r < nqc. A scale that is
// a power of two in [2^-32, 1] (1/sqrt(64) = 1/8) is folded in exactly (bf16 keeps fp32's
// exponent range, so only values below 2^-94 could lose bits); the return value is the
// scale still to apply to S^T (1 when folded).
inline float amx_pack_queries(const bf16* q, int64_t ldq, int64_t nq, int64_t nqc, int64_t dk,
                              float scale, uint16_t* qv) {
    const int64_t dk32 = round_up(dk, kAmxK);
    int e = 0;
    const float mant = std::frexp(std::fabs(scale), &e);
    const bool fold = mant == 0.5f && e <= 1 && e >= -31;
    std::memset(qv, 0, static_cast<size_t>(dk32 * nqc) * 2);
    for (int64_t r = 0; r < nq; ++r) {
        const bf16* qr = q + r * ldq;
        for (int64_t d = 0; d < dk; ++d) {
            uint16_t bits = qr[d].bits;
            if (fold) bits = float_to_bf16(bf16_to_float(bits) * scale);
            qv[(d >> 1) * (2 * nqc) + 2 * r + (d & 1)] = bits;
        }
    }
    return fold ? 1.0f : scale;
}

// S^T[j][c] = sum_d K[j][d] Q[c][d] for keys [0, nk) and query columns [c0, c1) (multiples
// of 16), written to st (ld nqc). K rows (ldk elements apart) are read in place where a whole
// group of 16 keys and whole 32-element steps exist, else through the zero-padded k_pad.
template <int NQ>
inline void amx_scores_group(const uint16_t* a_base, int64_t a_stride, const uint16_t* qv,
                             int64_t nqc, int64_t c, int64_t dk32, float* c_out, int64_t c_ld) {
    _tile_zero(0);
    if (NQ == 2) _tile_zero(1);
    const int64_t b_stride = 4 * nqc;  // bytes between two d-pair rows of Q^T (VNNI)
    for (int64_t d = 0; d < dk32; d += kAmxK) {
        _tile_loadd(4, a_base + d, a_stride);
        const uint16_t* b = qv + (d >> 1) * (2 * nqc) + 2 * c;
        _tile_loadd(6, b, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        if (NQ == 2) {
            _tile_loadd(7, b + 2 * kAmxN, b_stride);
            _tile_dpbf16ps(1, 4, 7);
        }
    }
    _tile_stored(0, c_out, c_ld);
    if (NQ == 2) _tile_stored(1, c_out + kAmxN, c_ld);
}

// 2 x 2 accumulator block: keys j..j+32 x query columns c..c+32, K rows in place.
inline void amx_scores_2x2(const uint16_t* k, int64_t k_stride, const uint16_t* qv, int64_t nqc,
                           int64_t c, int64_t dk32, float* c_out, int64_t c_ld) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t b_stride = 4 * nqc;
    for (int64_t d = 0; d < dk32; d += kAmxK) {
        _tile_loadd(4, k + d, k_stride);
        _tile_loadd(5, k + 16 * (k_stride / 2) + d, k_stride);
        const uint16_t* b = qv + (d >> 1) * (2 * nqc) + 2 * c;
        _tile_loadd(6, b, b_stride);
        _tile_loadd(7, b + 2 * kAmxN, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c_out, c_ld);
    _tile_stored(1, c_out + kAmxN, c_ld);
    _tile_stored(2, c_out + 16 * (c_ld / 4), c_ld);
    _tile_stored(3, c_out + 16 * (c_ld / 4) + kAmxN, c_ld);
}

inline void amx_scores(const bf16* k, int64_t ldk, int64_t nk, int64_t dk, const uint16_t* qv,
                       int64_t nqc, int64_t c0, int64_t c1, float scale, uint16_t* k_pad,
                       float* c_tmp, float* st) {
    const int64_t dk32 = round_up(dk, kAmxK);
    const uint16_t* kb = reinterpret_cast<const uint16_t*>(k);
    const bool in_place = dk % kAmxK == 0;
    const int64_t st_ld = nqc * 4, k_stride = ldk * 2;
    int64_t j = 0;
    if (in_place) {
        for (; j + 32 <= nk; j += 32) {
            int64_t c = c0;
            for (; c + 32 <= c1; c += 32) {
                amx_scores_2x2(kb + j * ldk, k_stride, qv, nqc, c, dk32, st + j * nqc + c, st_ld);
            }
            if (c < c1) {
                for (int64_t jj = j; jj < j + 32; jj += 16) {
                    amx_scores_group<1>(kb + jj * ldk, k_stride, qv, nqc, c, dk32,
                                        st + jj * nqc + c, st_ld);
                }
            }
        }
    }
    for (; j < nk; j += kAmxN) {
        const int64_t nj = min_of<int64_t>(kAmxN, nk - j);
        const uint16_t* a = kb + j * ldk;
        int64_t a_stride = k_stride;
        if (!in_place || nj < kAmxN) {  // copy the group, zero padded to 16 x dk32
            std::memset(k_pad, 0, static_cast<size_t>(kAmxN * dk32) * 2);
            for (int64_t x = 0; x < nj; ++x) {
                std::memcpy(k_pad + x * dk32, kb + (j + x) * ldk, static_cast<size_t>(dk) * 2);
            }
            a = k_pad;
            a_stride = dk32 * 2;
        }
        for (int64_t c = c0; c < c1; c += kAmxN) {
            if (nj == kAmxN) {
                amx_scores_group<1>(a, a_stride, qv, nqc, c, dk32, st + j * nqc + c, st_ld);
            } else {  // a partial group: through c_tmp, so rows past nk are never written
                amx_scores_group<1>(a, a_stride, qv, nqc, c, dk32, c_tmp, kAmxN * 4);
                for (int64_t x = 0; x < nj; ++x) {
                    std::memcpy(st + (j + x) * nqc + c, c_tmp + x * kAmxN, kAmxN * 4);
                }
            }
        }
    }
    if (scale != 1.0f) {
        const __m512 s = _mm512_set1_ps(scale);
        for (int64_t jj = 0; jj < nk; ++jj) {
            float* row = st + jj * nqc;
            for (int64_t c = c0; c < c1; c += 16) {
                _mm512_storeu_ps(row + c, _mm512_mul_ps(_mm512_loadu_ps(row + c), s));
            }
        }
    }
}

// V rows (nk of them, ldv apart, dv wide) to the VNNI pair layout of the P.V B tiles:
// vv[(j / 2) * (2 * dvp) + 2 * d + (j & 1)] = V[j][d]; zero for j >= nk (up to nk rounded to
// 32) and for dv <= d < dvp.
inline void amx_pack_values(const bf16* v, int64_t ldv, int64_t nk, int64_t dv, int64_t dvp,
                            uint16_t* vv) {
    const int64_t nk32 = round_up(nk, kAmxK);
    const uint16_t* vb = reinterpret_cast<const uint16_t*>(v);
    // permutex2var indices: out0 interleaves a[0..15] with b[0..15], out1 a[16..31], b[16..31].
    alignas(64) uint16_t i0[32], i1[32];
    for (int x = 0; x < 16; ++x) {
        i0[2 * x] = static_cast<uint16_t>(x);
        i0[2 * x + 1] = static_cast<uint16_t>(32 + x);
        i1[2 * x] = static_cast<uint16_t>(16 + x);
        i1[2 * x + 1] = static_cast<uint16_t>(48 + x);
    }
    const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
    for (int64_t j = 0; j < nk32; j += 2) {
        uint16_t* out = vv + (j >> 1) * (2 * dvp);
        for (int64_t d = 0; d < dvp; d += 32) {
            const int64_t n = min_of<int64_t>(32, dv - d);
            const __mmask32 m = n <= 0 ? 0 : (n >= 32 ? ~0u : (1u << n) - 1);
            const __m512i a = j < nk ? _mm512_maskz_loadu_epi16(m, vb + j * ldv + d)
                                     : _mm512_setzero_si512();
            const __m512i b = j + 1 < nk ? _mm512_maskz_loadu_epi16(m, vb + (j + 1) * ldv + d)
                                         : _mm512_setzero_si512();
            _mm512_storeu_si512(out + 2 * d, _mm512_permutex2var_epi16(a, idx0, b));
            if (d + 16 < dvp) {
                _mm512_storeu_si512(out + 2 * d + 32, _mm512_permutex2var_epi16(a, idx1, b));
            }
        }
    }
}

// P rows in bf16 for the query columns [c0, c1) and keys [0, nk) (zero up to nk rounded to 32)
// from P^T (st, ld nqc, fp32), in A-tile blocks of 16 queries x 32 keys (1 KB each):
// block (c / 16, j / 32) at p_rows + ((c / 16) * nk32 / 32 + j / 32) * 512.
inline void amx_pack_p(const float* st, int64_t nqc, int64_t c0, int64_t c1, int64_t nk,
                       uint16_t* p_rows) {
    const int64_t nk32 = round_up(nk, kAmxK);
    alignas(64) uint16_t iv[32];
    for (int x = 0; x < 16; ++x) {  // cvtne2ps(b, a) holds a in 0..15, b in 16..31
        iv[2 * x] = static_cast<uint16_t>(x);
        iv[2 * x + 1] = static_cast<uint16_t>(16 + x);
    }
    const __m512i idx = _mm512_load_si512(iv);
    for (int64_t c = c0; c < c1; c += 16) {
        for (int64_t j = 0; j < nk32; j += 32) {
            __m512i r[16];  // r[x]: dword lane q = (P[c+q][j+2x], P[c+q][j+2x+1])
            for (int x = 0; x < 16; ++x) {
                const int64_t ja = j + 2 * x, jb = ja + 1;
                const __m512 a = ja < nk ? _mm512_loadu_ps(st + ja * nqc + c) : _mm512_setzero_ps();
                const __m512 b = jb < nk ? _mm512_loadu_ps(st + jb * nqc + c) : _mm512_setzero_ps();
                r[x] = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(b, a));
            }
            // 16 x 16 dword transpose: row q of the block = lane q of every r[x].
            __m512i t[16];
            for (int x = 0; x < 16; x += 2) {
                t[x] = _mm512_unpacklo_epi32(r[x], r[x + 1]);
                t[x + 1] = _mm512_unpackhi_epi32(r[x], r[x + 1]);
            }
            for (int x = 0; x < 16; x += 4) {
                r[x] = _mm512_unpacklo_epi64(t[x], t[x + 2]);
                r[x + 1] = _mm512_unpackhi_epi64(t[x], t[x + 2]);
                r[x + 2] = _mm512_unpacklo_epi64(t[x + 1], t[x + 3]);
                r[x + 3] = _mm512_unpackhi_epi64(t[x + 1], t[x + 3]);
            }
            // r[4i + m], 128-bit lane L: column 4L + m of rows 4i .. 4i+3; two lane shuffles
            // gather each column's four row groups.
            for (int x = 0; x < 4; ++x) {
                t[x] = _mm512_shuffle_i32x4(r[x], r[x + 4], 0x88);
                t[x + 4] = _mm512_shuffle_i32x4(r[x], r[x + 4], 0xdd);
                t[x + 8] = _mm512_shuffle_i32x4(r[x + 8], r[x + 12], 0x88);
                t[x + 12] = _mm512_shuffle_i32x4(r[x + 8], r[x + 12], 0xdd);
            }
            uint16_t* blk = p_rows + ((c / 16) * (nk32 / 32) + j / 32) * 512;
            for (int x = 0; x < 4; ++x) {
                const __m512i lo = _mm512_shuffle_i32x4(t[x], t[x + 8], 0x88);
                const __m512i hi = _mm512_shuffle_i32x4(t[x], t[x + 8], 0xdd);
                const __m512i lo2 = _mm512_shuffle_i32x4(t[x + 4], t[x + 12], 0x88);
                const __m512i hi2 = _mm512_shuffle_i32x4(t[x + 4], t[x + 12], 0xdd);
                _mm512_storeu_si512(blk + 32 * x, lo);
                _mm512_storeu_si512(blk + 32 * (x + 4), lo2);
                _mm512_storeu_si512(blk + 32 * (x + 8), hi);
                _mm512_storeu_si512(blk + 32 * (x + 12), hi2);
            }
        }
    }
}

// acc[r][d] (ld dvp) += sum_j P[r][j] V[j][d] for rows [c0, min(c1, nq)) of 16-row blocks
// (rows up to c1 exist in acc: the buffer has bq >= c1 rows), d < dvp (a multiple of 16).
inline void amx_pv(const uint16_t* p_rows, const uint16_t* vv, int64_t c0, int64_t c1, int64_t nk,
                   int64_t dvp, float* acc) {
    const int64_t nk32 = round_up(nk, kAmxK), nkb = nk32 / 32;
    const int64_t acc_ld = dvp * 4, v_stride = dvp * 4;
    for (int64_t c = c0; c < c1; c += 32) {
        const bool two_rows = c + 32 <= c1;
        int64_t d = 0;
        for (; d < dvp; d += 32) {
            const bool two_cols = d + 32 <= dvp;
            float* out = acc + c * dvp + d;
            _tile_loadd(0, out, acc_ld);
            if (two_cols) _tile_loadd(1, out + 16, acc_ld);
            if (two_rows) {
                _tile_loadd(2, out + 16 * dvp, acc_ld);
                if (two_cols) _tile_loadd(3, out + 16 * dvp + 16, acc_ld);
            }
            const uint16_t* a0 = p_rows + (c / 16) * nkb * 512;
            const uint16_t* a1 = a0 + nkb * 512;
            for (int64_t jb = 0; jb < nkb; ++jb) {
                const uint16_t* b = vv + jb * 16 * (2 * dvp) + 2 * d;
                _tile_loadd(4, a0 + jb * 512, 64);
                _tile_loadd(6, b, v_stride);
                _tile_dpbf16ps(0, 4, 6);
                if (two_cols) {
                    _tile_loadd(7, b + 32, v_stride);
                    _tile_dpbf16ps(1, 4, 7);
                }
                if (two_rows) {
                    _tile_loadd(5, a1 + jb * 512, 64);
                    _tile_dpbf16ps(2, 5, 6);
                    if (two_cols) _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, out, acc_ld);
            if (two_cols) _tile_stored(1, out + 16, acc_ld);
            if (two_rows) {
                _tile_stored(2, out + 16 * dvp, acc_ld);
                if (two_cols) _tile_stored(3, out + 16 * dvp + 16, acc_ld);
            }
        }
    }
}

// True when the nk bf16 value rows (dv wide) hold no Inf or NaN (exponent bits all ones).
inline bool amx_values_finite(const bf16* v, int64_t ldv, int64_t nk, int64_t dv) {
    for (int64_t j = 0; j < nk; ++j) {
        const bf16* vj = v + j * ldv;
        for (int64_t d = 0; d < dv; ++d) {
            if ((vj[d].bits & 0x7f80u) == 0x7f80u) return false;
        }
    }
    return true;
}

// The tile configuration of one task: loaded when the task starts, the tile state released
// when it ends (also on an early return).
class AmxTask {
   public:
    explicit AmxTask(bool on) : on_(on) {
        if (on_) amx_begin();
    }
    ~AmxTask() {
        if (on_) amx_end();
    }
    AmxTask(const AmxTask&) = delete;
    AmxTask& operator=(const AmxTask&) = delete;

   private:
    bool on_;
};

// One key tile of a bf16 task on AMX: scores, masking, online softmax, P.V. k and v point at
// the tile's first key / value row (bf16, in place); the task's Q^T is in buf.amx_q, and
// s_scale is what amx_pack_queries left to apply.
inline void amx_tile_step(const AttentionParams& p, const TileDims& g, const TileBuffers<float>& buf,
                          const TileBlock& blk, int64_t j0, int64_t nq, int64_t nqc, int64_t nk,
                          const bf16* k, const bf16* v, const uint8_t* mask, const float* bias,
                          float s_scale) {
    const int64_t c0 = blk.c0, c1 = blk.c1, r_end = min_of(c1, nq);
    amx_scores(k, p.k_stride_seq, nk, g.dk, buf.amx_q, nqc, c0, c1, s_scale, buf.amx_k,
               buf.amx_c, buf.st);
    bias_and_hide(p, buf, blk, j0, nqc, c0, r_end, nk, mask, bias);
    softmax_update(buf, nq, nqc, c0, c1, nk, g.dvp);
    const bool hidden = !blk.inside || blk.masked || bias != nullptr;
    if (hidden && !amx_values_finite(v, p.v_stride_seq, nk, p.head_dim_v)) {
        // p = 0 must not meet an Inf/NaN value: fp32 rows and the product that skips zeros.
        for (int64_t j = 0; j < nk; ++j) {
            float* vj = buf.v_rows + j * g.dvp;
            load_row(v + j * p.v_stride_seq, vj, p.head_dim_v, 1.0f);
            for (int64_t d = p.head_dim_v; d < g.dvp; ++d) vj[d] = 0;
        }
        pv_skip_zero(buf, c0, r_end - c0, nqc, nk, buf.v_rows, g.dvp, g.dvp);
        return;
    }
    amx_pack_values(v, p.v_stride_seq, nk, p.head_dim_v, g.dvp, buf.amx_v);
    amx_pack_p(buf.st, nqc, c0, c1, nk, buf.amx_p);
    amx_pv(buf.amx_p, buf.amx_v, c0, c1, nk, g.dvp, buf.acc);
}

#endif  // MHA_CPU_AMX

}  // namespace MHA_CPU_NS
}  // namespace mha
