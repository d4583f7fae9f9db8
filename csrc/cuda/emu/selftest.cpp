// mha_ext._cuda_emu: the host emulator's primitives exercised one at a time, for
// tests/test_cuda_emulator.py (built only with MHA_EXT_CUDA_EMULATOR=ON). Each function
// launches a tiny kernel written against cuda/ptx.cuh and returns what the lanes produced;
// the tests compare that with a plain NumPy computation from the PTX ISA's layout tables.
// Functions that run a kernel return (result..., fault), fault the launch's error text ("" if
// the launch succeeded): races, deadlocks and misuse show up there.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/ptx.cuh"

namespace py = pybind11;
using namespace mha::cuda;

namespace {

std::string take_fault() {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <typename T>
T* ptr(py::array_t<T, py::array::c_style>& a) {
    return a.mutable_data();
}

// ------------------------------------------------------------------------------------------
// Warp shuffles and votes: one warp; lane l contributes in[l].

__global__ void shfl_kernel(const double* in, double* out, int mode, int arg, const int* src) {
    const int l = threadIdx.x;
    double r = 0;
    if (mode == 0) r = warp_shfl_xor(in[l], arg);
    if (mode == 1) r = warp_shfl(in[l], src[l]);
    if (mode == 2) r = warp_max(in[l]);
    if (mode == 3) r = warp_sum(in[l]);
    if (mode == 4) r = static_cast<double>(warp_ballot(in[l] != 0));
    if (mode == 5) r = quad_sum(static_cast<float>(in[l]));
    out[l] = r;
}

py::tuple shfl(py::array_t<double, py::array::c_style> in, int mode, int arg,
               py::array_t<int32_t, py::array::c_style> src) {
    if (in.size() != 32 || src.size() != 32) throw std::invalid_argument("32 lanes");
    py::array_t<double> out(32);
    double* o = out.mutable_data();
    MHA_LAUNCH(1, 32, 0, nullptr, shfl_kernel)(in.data(), o, mode, arg, src.data());
    return py::make_tuple(out, take_fault());
}

// ------------------------------------------------------------------------------------------
// mma.sync m16n8k16 from registers given per lane: a (32, 4), b (32, 2), c (32, 4) -> d.

__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d,
                           int bf16) {
    const int l = threadIdx.x;
    uint32_t ar[4] = {a[l * 4], a[l * 4 + 1], a[l * 4 + 2], a[l * 4 + 3]};
    float acc[4] = {c[l * 4], c[l * 4 + 1], c[l * 4 + 2], c[l * 4 + 3]};
    if (bf16) {
        mma_m16n8k16_bf16(acc, ar, b[l * 2], b[l * 2 + 1]);
    } else {
        mma_m16n8k16_f16(acc, ar, b[l * 2], b[l * 2 + 1]);
    }
    for (int i = 0; i < 4; ++i) d[l * 4 + i] = acc[i];
}

py::tuple mma(py::array_t<uint32_t, py::array::c_style> a,
              py::array_t<uint32_t, py::array::c_style> b, py::array_t<float, py::array::c_style> c,
              bool bf16) {
    if (a.size() != 128 || b.size() != 64 || c.size() != 128) {
        throw std::invalid_argument("a (32, 4), b (32, 2), c (32, 4)");
    }
    py::array_t<float> d({32, 4});
    MHA_LAUNCH(1, 32, 0, nullptr, mma_kernel)(a.data(), b.data(), c.data(), d.mutable_data(),
                                              bf16 ? 1 : 0);
    return py::make_tuple(d, take_fault());
}

// ------------------------------------------------------------------------------------------
// ldmatrix: 32 rows of 8 b16 (one row = 16 bytes) in shared memory; lane l gives the address
// of row rows[l]. Returns (32, num) registers.

__global__ void ldmatrix_kernel(const uint16_t* tile, const int* rows, uint32_t* out, int num,
                                int trans) {
    MHA_DYNAMIC_SMEM(smem);
    uint16_t* s = reinterpret_cast<uint16_t*>(smem);
    const int l = threadIdx.x;
    for (int e = 0; e < 8; ++e) s[l * 8 + e] = tile[l * 8 + e];
    __syncthreads();
    const void* p = s + rows[l] * 8;
    uint32_t r[4] = {0, 0, 0, 0};
    if (num == 1) {
        uint32_t x[1];
        trans ? ldmatrix_x1_trans(x, p) : ldmatrix_x1(x, p);
        r[0] = x[0];
    } else if (num == 2) {
        uint32_t x[2];
        trans ? ldmatrix_x2_trans(x, p) : ldmatrix_x2(x, p);
        r[0] = x[0], r[1] = x[1];
    } else {
        trans ? ldmatrix_x4_trans(r, p) : ldmatrix_x4(r, p);
    }
    for (int i = 0; i < num; ++i) out[l * num + i] = r[i];
}

// ldmatrix.x4 with every row address shifted by off bytes (alignment checks).
__global__ void ldmatrix_shift_kernel(const uint16_t* tile, const int* rows, uint32_t* out,
                                      int num, int trans, int64_t off) {
    MHA_DYNAMIC_SMEM(smem);
    uint16_t* s = reinterpret_cast<uint16_t*>(smem);
    const int l = threadIdx.x;
    for (int e = 0; e < 8; ++e) s[l * 8 + e] = tile[l * 8 + e];
    __syncthreads();
    const void* p = reinterpret_cast<const unsigned char*>(s + rows[l] * 8) + off;
    uint32_t x[4] = {0, 0, 0, 0};
    ldmatrix_x4(x, p);
    out[l * num] = x[0];
}

py::tuple ldmatrix(py::array_t<uint16_t, py::array::c_style> tile,
                   py::array_t<int32_t, py::array::c_style> rows, int num, bool trans,
                   int64_t offset_bytes) {
    if (tile.size() != 256 || rows.size() != 32) throw std::invalid_argument("tile (32, 8)");
    if (num != 1 && num != 2 && num != 4) throw std::invalid_argument("num");
    py::array_t<uint32_t> out({32, num});
    // offset_bytes: extra bytes added to every row address (misalignment tests)
    py::array_t<int32_t> r2(32);
    for (int i = 0; i < 32; ++i) r2.mutable_data()[i] = rows.data()[i];
    if (offset_bytes == 0) {
        MHA_LAUNCH(1, 32, 512, nullptr, ldmatrix_kernel)(tile.data(), r2.data(),
                                                         out.mutable_data(), num, trans ? 1 : 0);
    } else {
        MHA_LAUNCH(1, 32, 512, nullptr, ldmatrix_shift_kernel)(tile.data(), r2.data(), out.mutable_data(),
                                                       num, 0, offset_bytes);
    }
    return py::make_tuple(out, take_fault());
}

// ------------------------------------------------------------------------------------------
// The tensor-core kernel's pattern: A (16x16, row-major) by ldmatrix.x4, B (16x8, k-major
// rows) by ldmatrix.x2.trans, one mma, D scattered to (16, 8) by the C/D table.

__global__ void mma_ldmatrix_kernel(const uint16_t* A, const uint16_t* B, float* D, int bf16,
                                    int wrong) {
    MHA_DYNAMIC_SMEM(smem);
    uint16_t* as = reinterpret_cast<uint16_t*>(smem);  // 16 rows x 16
    uint16_t* bs = as + 256;                            // 16 rows x 8
    const int l = threadIdx.x;
    for (int e = l; e < 256; e += 32) as[e] = A[e];
    for (int e = l; e < 128; e += 32) bs[e] = B[e];
    __syncthreads();
    const int mi = l >> 3, r = l & 7;
    // matrices: (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, 8-15), (rows 8-15, 8-15)
    const int row = r + 8 * (mi & 1) + (wrong ? 8 * ((mi >> 1) & 1) - 8 * (mi & 1) : 0);
    const int col = 8 * (mi >> 1) + (wrong ? 8 * (mi & 1) - 8 * (mi >> 1) : 0);
    uint32_t a[4];
    ldmatrix_x4(a, as + row * 16 + col);
    uint32_t b[2];
    ldmatrix_x2_trans(b, bs + (l & 15) * 8);
    float c[4] = {0, 0, 0, 0};
    if (bf16) {
        mma_m16n8k16_bf16(c, a, b[0], b[1]);
    } else {
        mma_m16n8k16_f16(c, a, b[0], b[1]);
    }
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = c[i];
}

py::tuple mma_ldmatrix(py::array_t<uint16_t, py::array::c_style> A,
                       py::array_t<uint16_t, py::array::c_style> B, bool bf16, bool wrong) {
    if (A.size() != 256 || B.size() != 128) throw std::invalid_argument("A (16,16), B (16,8)");
    py::array_t<float> D({16, 8});
    MHA_LAUNCH(1, 32, 768, nullptr, mma_ldmatrix_kernel)(A.data(), B.data(), D.mutable_data(),
                                                         bf16 ? 1 : 0, wrong ? 1 : 0);
    return py::make_tuple(D, take_fault());
}

// ------------------------------------------------------------------------------------------
// cp.async: 64 threads; thread t copies 16 bytes src + 16 t -> shared 16 t with src_bytes[t],
// in two groups (threads' even chunks first, then odd: chunk 2t and 2t+1). mode 0: wait<0>
// then barrier then read all; mode 1: wait<1> (first group only) then barrier then read the
// second group's bytes (in flight: reported); mode 2: no wait at all before the barrier.

__global__ void cp_async_kernel(const unsigned char* src, const int* src_bytes,
                                unsigned char* out, int mode) {
    MHA_DYNAMIC_SMEM(smem);
    const int t = threadIdx.x;
    const int n = blockDim.x;
    cp_async_16(smem + 32 * t, src + 32 * t, src_bytes[2 * t]);
    cp_async_commit();
    cp_async_16(smem + 32 * t + 16, src + 32 * t + 16, src_bytes[2 * t + 1]);
    cp_async_commit();
    if (mode == 0) cp_async_wait<0>();
    if (mode == 1) cp_async_wait<1>();
    __syncthreads();
    const int other = (t + 1) % n;  // read another thread's chunks
    if (mode == 1) {  // the second group, still in flight
        for (int b = 16; b < 32; ++b) out[32 * other + b] = smem[32 * other + b];
    } else {
        for (int b = 0; b < 16; ++b) out[32 * other + b] = smem[32 * other + b];
    }
    if (mode == 0) {
        for (int b = 16; b < 32; ++b) out[32 * other + b] = smem[32 * other + b];
    }
    cp_async_wait<0>();
    __syncthreads();
    if (mode != 0) {
        for (int b = 0; b < 32; ++b) out[32 * other + b] = smem[32 * other + b];
    }
}

py::tuple cp_async(py::array_t<uint8_t, py::array::c_style> src,
                   py::array_t<int32_t, py::array::c_style> src_bytes, int mode) {
    if (src.size() != 64 * 32 || src_bytes.size() != 128) throw std::invalid_argument("sizes");
    py::array_t<uint8_t> out(64 * 32);
    std::memset(out.mutable_data(), 0, 64 * 32);
    MHA_LAUNCH(1, 64, 64 * 32, nullptr, cp_async_kernel)(src.data(), src_bytes.data(),
                                                         out.mutable_data(), mode);
    return py::make_tuple(out, take_fault());
}

// ------------------------------------------------------------------------------------------
// Synchronisation patterns for the race detector (128 threads, 4 warps). Returns the fault.

__global__ void sync_kernel(int kind, float* out) {
    MHA_DYNAMIC_SMEM(smem);
    float* s = reinterpret_cast<float*>(smem);
    const int t = threadIdx.x;
    switch (kind) {
        case 0:  // block reduction, correct: every step behind a __syncthreads
        case 1: {  // the same with the barrier inside the loop missing
            s[t] = static_cast<float>(t + 1);
            __syncthreads();
            for (int half = 64; half > 0; half >>= 1) {
                if (t < half) s[t] += s[t + half];
                if (kind == 0) __syncthreads();
            }
            if (kind == 1) __syncthreads();
            if (t == 0) out[0] = s[0];
            break;
        }
        case 2:  // lane 0 writes, lane 1 reads after __syncwarp: ordered
        case 3:  // ... without __syncwarp: a race
            if (t == 0) s[0] = 1.0f;
            if (kind == 2) __syncwarp();
            if (t == 1) out[0] = s[0];
            break;
        case 4:  // warp 0 writes, warp 1 reads after only a __syncwarp: a race
            if (t == 0) s[0] = 2.0f;
            __syncwarp();
            if (t == 32) out[0] = s[0];
            break;
        case 5:  // write after read by another thread, no barrier between them: a race
            if (t == 40) out[0] = s[3];
            __syncwarp();  // orders warp 0 only (and makes thread 40 read first)
            if (t == 3) s[3] = 5.0f;
            break;
        case 6:  // out of bounds
            if (t == 0) s[128 + 2] = 1.0f;  // 512-byte allocation: byte 520
            break;
        case 7:  // deadlock: warp 0 at __syncthreads, warp 1 at a shuffle with half its lanes
            if (t < 32 || (t >= 32 && t < 48)) {
                __syncthreads();
            } else if (t < 64) {
                out[0] = warp_shfl_xor(1.0f, 1);
            } else {
                __syncthreads();
            }
            break;
        case 8:  // divergent warp-synchronous operations: lanes 0-15 shuffle, 16-31 ballot
            if ((t & 31) < 16) {
                out[0] = warp_shfl_xor(1.0f, 1);
            } else {
                out[0] = static_cast<float>(warp_ballot(true));
            }
            break;
        case 9:  // reads of uninitialised shared memory see NaN (0xff bytes)
            if (t == 0) out[0] = s[7];
            break;
        default:
            break;
    }
}

py::tuple sync_pattern(int kind) {
    py::array_t<float> out(1);
    out.mutable_data()[0] = 0.0f;
    MHA_LAUNCH(1, 128, 512, nullptr, sync_kernel)(kind, out.mutable_data());
    return py::make_tuple(out.data()[0], take_fault());
}

// Launch configuration checks: dynamic shared memory above 48 KB without the attribute.
__global__ void empty_kernel() {}

std::string launch_config(int64_t smem, int64_t attribute) {
    if (attribute >= 0) {
        const cudaError_t e = cudaFuncSetAttribute(
            empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(attribute));
        if (e != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
    }
    MHA_LAUNCH(1, 32, static_cast<size_t>(smem), nullptr, empty_kernel)();
    return take_fault();
}

}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
    m.doc() = "The CUDA host emulator's primitives, one at a time (tests only).";
    m.def("shfl", &shfl, py::arg("values"), py::arg("mode"), py::arg("arg"), py::arg("src"));
    m.def("mma", &mma, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("bf16"));
    m.def("ldmatrix", &ldmatrix, py::arg("tile"), py::arg("rows"), py::arg("num"),
          py::arg("trans"), py::arg("offset_bytes") = 0);
    m.def("mma_ldmatrix", &mma_ldmatrix, py::arg("A"), py::arg("B"), py::arg("bf16"),
          py::arg("wrong") = false);
    m.def("cp_async", &cp_async, py::arg("src"), py::arg("src_bytes"), py::arg("mode"));
    m.def("sync_pattern", &sync_pattern, py::arg("kind"));
    m.def("launch_config", &launch_config, py::arg("smem"), py::arg("attribute"));
}
