// CPU decode kernels for bf16: a small-batch linear that streams each weight row once for all input
// rows, and the routed-expert SwiGLU that reads each hit expert's weights once for all its tokens.
//
// Why our own: decode on a CPU is bound by reading weights, and for 1-32 input rows the BLAS calls
// torch reaches (oneDNN's gemm, torch.mv, bmm) read bf16 weights well below the memory bandwidth on
// some CPUs and pay a large fixed cost per call on small matrices (afd/kernels/__init__.py has the
// figures; `python -m benchmarks.kernels` measures them on the current machine). The instruction set
// is chosen at run time (AVX512-BF16 dot products, else AVX2 + FMA on bf16 widened to fp32), so one
// build serves every x86-64 CPU; `available_isa()` says which path runs, "" when neither does and the
// Python side keeps torch's kernels. Where the CPU has AMX (Intel Sapphire Rapids and later) and Linux lets
// the process use its tiles, linears with enough input rows run on the tiles instead (`matrix_isa()`):
// from a few rows on, the dot products, not the memory, bound a decode step's experts and LM head, and a
// tile multiply does 16x16x32 products where an AVX512-BF16 instruction does 16x2.
//
// In the fused experts, an expert with enough tokens (prefill) runs its two projections through torch's own
// matmul (oneDNN) instead, where the CPU has no AMX: compute-bound there, its blocked kernels are the faster ones.
//
// Rounding follows the reference models: products accumulate in fp32 and are rounded to bf16 once per
// linear; the SwiGLU rounds after each op as the torch code does (gate/up, silu, product, down, weight).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

namespace {

using bf16 = c10::BFloat16;

constexpr int kRowsPerTile = 4;   // weight rows sharing one pass over the input rows
constexpr int kInputsPerTile = 4; // input rows held in registers per pass

enum class Isa { kNone, kAvx2, kAvx512Bf16 };

// AFD_NATIVE_ISA=avx2 (or none) caps the choice, so tests run every path on one CPU.
Isa detect_isa() {
  __builtin_cpu_init();
  const char* cap = std::getenv("AFD_NATIVE_ISA");
  const std::string limit = cap ? cap : "";
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (limit == "none") return Isa::kNone;
  if (limit != "avx2" && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"))
    return Isa::kAvx512Bf16;
  return avx2 ? Isa::kAvx2 : Isa::kNone;
}

const Isa kIsa = detect_isa();

// AMX needs the CPU feature and the kernel's per-process permission to use the tile state (Linux 5.16+:
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); AFD_NATIVE_ISA=avx512_bf16 (or lower) turns it off.
bool detect_amx() {
  const char* cap = std::getenv("AFD_NATIVE_ISA");
  const std::string limit = cap ? cap : "";
  if (kIsa != Isa::kAvx512Bf16 || !(limit.empty() || limit == "amx_bf16")) return false;
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

const bool kAmx = detect_amx();

// An integer setting from the environment, at least `floor`; `fallback` where unset or empty.
int64_t env_rows(const char* name, int64_t fallback, int64_t floor) {
  const char* value = std::getenv(name);
  return value && *value ? std::max<int64_t>(floor, std::atoll(value)) : fallback;
}

// Input rows from which a linear runs on the AMX tiles (AFD_NATIVE_AMX_MIN_ROWS overrides). Below it the
// AVX512 dot products keep up with memory and skip the tile round trip. The choice depends on the row count
// only, so the fused experts and a per-expert linear of the same rows round identically.
const int64_t kAmxMinRows = env_rows("AFD_NATIVE_AMX_MIN_ROWS", 4, 1);

// Tokens from which one expert's projection goes to torch's matmul (oneDNN) instead of the vector tiles, where
// the tiles are not AMX (AFD_NATIVE_LIBRARY_MIN_ROWS overrides; 0: never). From a few dozen rows on the product is
// compute-bound, and oneDNN's blocked kernels beat the tiles' per-row dot products there. On a 2-vCPU AMD EPYC
// (avx512_bf16), one MoE layer of the `afd bench engine` checkpoint (32 experts top-4), medians of 22 calls, two
// processes per setting, alternating: 1024 tokens 20.4-21.1 ms (from 32 rows) against 26.5-28.9 (tiles only);
// 512 tokens 12.9-13.3 against 14.1-14.6; 256 tokens (about 32 rows per expert) 8.6 against 8.4-8.7, where from
// 16 rows it took 9.1-9.5.
const int64_t kLibraryMinRows = env_rows("AFD_NATIVE_LIBRARY_MIN_ROWS", 32, 0);

// The four horizontal sums of a, b, c, d as one vector [sum(a), sum(b), sum(c), sum(d)]: a transpose-and-add tree
// of ~10 instructions for all four, where four _mm512_reduce_add_ps cost ~10 each.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  // Each 128-bit lane now holds partial [a, b, c, d]; add the four lanes.
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));
  const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(abcd), high);
  return _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
}

// acc[i * kRowsPerTile + j] = dot(x row i, w row j) over k in [0, K), for i < Inputs, j < rows. Inputs is a
// template argument so that the accumulators stay in registers (a runtime bound made the compiler keep
// them on the stack, which halved the rate for more than one input row).
// Prefetch: fetch the next tile's rows (the following kRowsPerTile rows, at the same column) while this one
// computes. A weight row is only a few KB, too short for the hardware prefetchers to ramp up on, so without it
// the loads of each tile wait on memory between bursts of dot products: with 4-8 input rows (decode batches,
// a busy expert's tokens) that cost a third to a half of the streaming rate (`python -m benchmarks.kernels`).
// Only the first pass over a tile prefetches; later passes find it in L1.
template <int Inputs, bool Prefetch>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void tile_avx512bf16(
    const uint16_t* w, int64_t ldw, int rows, const uint16_t* x, int64_t ldx, int64_t K, float* acc) {
  __m512 sums[Inputs][kRowsPerTile];
  for (int i = 0; i < Inputs; ++i)
    for (int j = 0; j < kRowsPerTile; ++j) sums[i][j] = _mm512_setzero_ps();
  const uint16_t* wr[kRowsPerTile];
  for (int j = 0; j < kRowsPerTile; ++j) wr[j] = w + (j < rows ? j : 0) * ldw;
  const int64_t ahead = static_cast<int64_t>(kRowsPerTile) * ldw;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[kRowsPerTile];
    for (int j = 0; j < kRowsPerTile; ++j) {
      if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + ahead + k), _MM_HINT_T0);
      wv[j] = (__m512bh)_mm512_loadu_si512(wr[j] + k);
    }
    for (int i = 0; i < Inputs; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * ldx + k);
      for (int j = 0; j < kRowsPerTile; ++j) sums[i][j] = _mm512_dpbf16_ps(sums[i][j], wv[j], xv);
    }
  }
  if (k < K) {
    const __mmask32 mask = __mmask32((1u << (K - k)) - 1);
    __m512bh wv[kRowsPerTile];
    for (int j = 0; j < kRowsPerTile; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr[j] + k);
    for (int i = 0; i < Inputs; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
      for (int j = 0; j < kRowsPerTile; ++j) sums[i][j] = _mm512_dpbf16_ps(sums[i][j], wv[j], xv);
    }
  }
  for (int i = 0; i < Inputs; ++i) {
    float four[kRowsPerTile];
    _mm_storeu_ps(four, reduce4(sums[i][0], sums[i][1], sums[i][2], sums[i][3]));
    for (int j = 0; j < rows; ++j) acc[i * kRowsPerTile + j] = four[j];
  }
}

__attribute__((target("avx2,fma"))) inline __m256 widen_bf16(const uint16_t* p, int64_t left) {
  __m128i raw;
  if (left >= 8) {
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = 0; t < left; ++t) tail[t] = p[t];
    raw = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

__attribute__((target("avx2,fma"))) float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Same contract as tile_avx512bf16 (16 ymm registers: at most two input rows per pass).
template <int Inputs, bool Prefetch>
__attribute__((target("avx2,fma"))) void tile_avx2(
    const uint16_t* w, int64_t ldw, int rows, const uint16_t* x, int64_t ldx, int64_t K, float* acc) {
  static_assert(Inputs <= 2, "AVX2 has registers for two input rows per pass");
  __m256 sums[Inputs][kRowsPerTile];
  for (int i = 0; i < Inputs; ++i)
    for (int j = 0; j < kRowsPerTile; ++j) sums[i][j] = _mm256_setzero_ps();
  const uint16_t* wr[kRowsPerTile];
  for (int j = 0; j < kRowsPerTile; ++j) wr[j] = w + (j < rows ? j : 0) * ldw;
  const int64_t ahead = static_cast<int64_t>(kRowsPerTile) * ldw;
  for (int64_t k = 0; k < K; k += 8) {
    const int64_t left = K - k;
    __m256 wv[kRowsPerTile];
    for (int j = 0; j < kRowsPerTile; ++j) {
      // one 64-byte line holds 32 bf16: prefetch once per line, not once per 8-element step
      if (Prefetch && k % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + ahead + k), _MM_HINT_T0);
      wv[j] = widen_bf16(wr[j] + k, left);
    }
    for (int i = 0; i < Inputs; ++i) {
      const __m256 xv = widen_bf16(x + i * ldx + k, left);
      for (int j = 0; j < kRowsPerTile; ++j) sums[i][j] = _mm256_fmadd_ps(wv[j], xv, sums[i][j]);
    }
  }
  for (int i = 0; i < Inputs; ++i)
    for (int j = 0; j < rows; ++j) acc[i * kRowsPerTile + j] = hsum256(sums[i][j]);
}

template <bool Prefetch>
inline void tile_on_isa(const uint16_t* w, int64_t ldw, int rows, const uint16_t* x, int64_t ldx, int inputs,
                        int64_t K, float* acc) {
  if (kIsa == Isa::kAvx512Bf16) {
    switch (inputs) {
      case 1: return tile_avx512bf16<1, Prefetch>(w, ldw, rows, x, ldx, K, acc);
      case 2: return tile_avx512bf16<2, Prefetch>(w, ldw, rows, x, ldx, K, acc);
      case 3: return tile_avx512bf16<3, Prefetch>(w, ldw, rows, x, ldx, K, acc);
      default: return tile_avx512bf16<4, Prefetch>(w, ldw, rows, x, ldx, K, acc);
    }
  }
  for (int i0 = 0; i0 < inputs; i0 += 2) {
    const bool fetch = Prefetch && i0 == 0;
    if (inputs - i0 >= 2)
      fetch ? tile_avx2<2, true>(w, ldw, rows, x + i0 * ldx, ldx, K, acc + i0 * kRowsPerTile)
            : tile_avx2<2, false>(w, ldw, rows, x + i0 * ldx, ldx, K, acc + i0 * kRowsPerTile);
    else
      fetch ? tile_avx2<1, true>(w, ldw, rows, x + i0 * ldx, ldx, K, acc + i0 * kRowsPerTile)
            : tile_avx2<1, false>(w, ldw, rows, x + i0 * ldx, ldx, K, acc + i0 * kRowsPerTile);
  }
}

// One pass of up to kInputsPerTile input rows over a tile of weight rows, on this CPU's instruction set;
// `first_pass`: the tile's first pass, which prefetches the next tile.
inline void tile(const uint16_t* w, int64_t ldw, int rows, const uint16_t* x, int64_t ldx, int inputs, int64_t K,
                 float* acc, bool first_pass) {
  if (first_pass) return tile_on_isa<true>(w, ldw, rows, x, ldx, inputs, K, acc);
  tile_on_isa<false>(w, ldw, rows, x, ldx, inputs, K, acc);
}

__attribute__((target("avx512f,avx512bw"))) inline __m512 widen16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// c10::BFloat16's rounding of 16 floats, bit for bit: to nearest even, any NaN to 0x7FC0.
__attribute__((target("avx512f,avx512bw"))) inline __m256i round16_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i bias =
      _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

__attribute__((target("avx512f,avx512bw"))) inline __m512 widen16_bits(__m256i packed) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16));
}

// --- AMX: weight tiles straight from the row-major weight, input rows repacked once per call ---------------
//
// A tile multiply C[16 x 16] += A[16 x 32] . B[16 x 32] (bf16 pairs, fp32 sums): A is 16 weight rows x 32
// columns loaded as they lie, B the matching 32 columns of 16 input rows in the pair-interleaved layout the
// instruction reads (row r holds columns 2r and 2r+1 of every input row), so C holds 16 outputs x 16 input
// rows. The inputs are few and repacked once per call (`pack_inputs_amx`); the weights are read once.

constexpr int64_t kAmxRows = 16;  // weight rows per A tile, input rows per B tile
constexpr int64_t kAmxDepth = 32; // bf16 columns per tile

bool amx_serves(int64_t M, int64_t K) { return kAmx && M >= kAmxMinRows && K % kAmxDepth == 0; }

// One expert's M rows go to torch's matmul (see kLibraryMinRows), never where the AMX tiles serve them.
bool library_serves(int64_t M, int64_t K) { return kLibraryMinRows > 0 && M >= kLibraryMinRows && !amx_serves(M, K); }

int64_t amx_input_blocks(int64_t M) { return (M + kAmxRows - 1) / kAmxRows; }

// Packed size in uint32 words of M input rows of K columns (K a multiple of 32).
int64_t amx_packed_words(int64_t M, int64_t K) { return amx_input_blocks(M) * (K / kAmxDepth) * kAmxRows * kAmxRows; }

// packed[((b * K/32 + kb) * 16 + r) * 16 + m] = the bf16 pair (x[b*16 + m][kb*32 + 2r], ...+1), zero past row M.
void pack_inputs_amx(const uint16_t* x, int64_t M, int64_t K, uint32_t* packed) {
  const int64_t depth_blocks = K / kAmxDepth, blocks = amx_input_blocks(M);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t kb = 0; kb < depth_blocks; ++kb) {
      uint32_t* tile = packed + (b * depth_blocks + kb) * kAmxRows * kAmxRows;
      for (int64_t m = 0; m < kAmxRows; ++m) {
        const int64_t row = b * kAmxRows + m;
        uint32_t pairs[kAmxRows] = {};
        if (row < M) std::memcpy(pairs, x + row * K + kb * kAmxDepth, sizeof(pairs));  // 16 pairs of bf16
        for (int64_t r = 0; r < kAmxRows; ++r) tile[r * kAmxRows + m] = pairs[r];
      }
    }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight 16 x 64-byte tiles: 0-3 accumulators (2 weight blocks x 2 input blocks), 4-5 weights, 6-7 inputs.
// The tile state is per thread and other libraries (oneDNN) configure it their own way, so each thread's share
// of a parallel region configures the tiles once (`TileScope`) and releases them at its end.
TileConfig make_tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kAmxRows;
  }
  return config;
}

// At namespace scope: GCC 12 does not see that ldtilecfg reads all 64 bytes and dropped the stores into a local
// copy (the instruction then faulted on the stack's garbage).
const TileConfig kTileConfig = make_tile_config();

__attribute__((target("amx-tile"))) void configure_tiles() { _tile_loadconfig(&kTileConfig); }

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

// Configures the tiles at the first `use()`, releases them at the end of the scope if it did.
class TileScope {
 public:
  TileScope() = default;
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
  void use() {
    if (!configured_) configure_tiles();
    configured_ = true;
  }
  ~TileScope() {
    if (configured_) release_tiles();
  }

 private:
  bool configured_ = false;
};

// y[m0 + m, n0 + i * step] = bf16(C[i][m]) for m < inputs, from the accumulator tile `c` (16 x 16 fp32, row i =
// output n0 + i * step): from kVectorStoreMinInputs input rows on, a column of the tile gathered, rounded 16 at a
// time (c10's rounding) and stored (the 32000-row LM head at 32 rows 5-6 % faster, alternating in one process);
// below it one by one, which the gathers did not beat at 4-8 rows.
constexpr int64_t kVectorStoreMinInputs = 8;
__attribute__((target("avx512f,avx512bw"))) inline void store_outputs(const float* c, int64_t m0, int64_t inputs,
                                                                      bf16* y, int64_t ldy, int64_t n0, int64_t step) {
  if (inputs < kVectorStoreMinInputs) {
    for (int64_t m = 0; m < inputs; ++m)
      for (int64_t i = 0; i < kAmxRows; ++i) y[(m0 + m) * ldy + n0 + i * step] = bf16(c[i * kAmxRows + m]);
    return;
  }
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(kAmxRows));
  for (int64_t m = 0; m < inputs; ++m) {
    const __m256i rounded = round16_bf16(_mm512_i32gather_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(m)), c, 4));
    bf16* out = y + (m0 + m) * ldy + n0;
    if (step == 1) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), rounded);
    } else {
      alignas(32) bf16 values[kAmxRows];
      _mm256_store_si256(reinterpret_cast<__m256i*>(values), rounded);
      for (int64_t i = 0; i < kAmxRows; ++i) out[i * step] = values[i];
    }
  }
}

// Weight rows `step` apart in one tile so that each of its 16 rows lies in its own 4 KB page: the L2 streamer
// follows one ascending stream per page, and 16 rows of K < 2048 packed into 4-8 pages read as interleaved
// streams it tracks poorly (1024 x 512 bf16 through row-adjacent tiles read 18.6 GB/s where one row per page
// read 24.3 in a standalone loop here, at the 2-thread read ceiling; 1024 x 1024: 24.0 vs 24.9).
// At most 8 (rows of 256 or fewer columns share pages in pairs), so that a group stays a few parallel tasks' worth.
int64_t rows_per_page(int64_t K) {
  constexpr int64_t kPage = 4096, kMaxStep = 8;
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(uint16_t));
  return row_bytes >= kPage ? 1 : std::min(kMaxStep, (kPage + row_bytes - 1) / row_bytes);
}

// Outputs first + step * i for i in [0, 16) (and [16, 32) where `pair`) for all M input rows, from the packed
// inputs, on tiles configured by the caller (TileScope). Two weight blocks share each input tile and two input
// blocks share each weight tile; past 32 input rows the weight rows are read again, from cache.
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw"))) void amx_block(
    const uint32_t* packed, int64_t M, int64_t K, const uint16_t* w, int64_t first, int64_t step, bool pair, bf16* y,
    int64_t ldy) {
  const int64_t depth_blocks = K / kAmxDepth, blocks = amx_input_blocks(M), stride = step * K * 2;
  alignas(64) float c[4][kAmxRows * kAmxRows];
  const uint16_t* w0 = w + first * K;
  const uint16_t* w1 = pair ? w0 + kAmxRows * step * K : w0;
  for (int64_t b = 0; b < blocks; b += 2) {
    const bool second = b + 1 < blocks;
    const uint32_t* p0 = packed + b * depth_blocks * kAmxRows * kAmxRows;
    const uint32_t* p1 = second ? p0 + depth_blocks * kAmxRows * kAmxRows : p0;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < depth_blocks; ++kb) {
      _tile_loadd(4, w0 + kb * kAmxDepth, stride);
      _tile_loadd(5, w1 + kb * kAmxDepth, stride);
      _tile_loadd(6, p0 + kb * kAmxRows * kAmxRows, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (second) {
        _tile_loadd(7, p1 + kb * kAmxRows * kAmxRows, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    const int64_t m0 = b * kAmxRows, in0 = std::min(kAmxRows, M - m0);
    const int64_t first1 = first + kAmxRows * step;
    store_outputs(c[0], m0, in0, y, ldy, first, step);
    if (pair) store_outputs(c[2], m0, in0, y, ldy, first1, step);
    if (second) {
      const int64_t m1 = m0 + kAmxRows, in1 = std::min(kAmxRows, M - m1);
      store_outputs(c[1], m1, in1, y, ldy, first, step);
      if (pair) store_outputs(c[3], m1, in1, y, ldy, first1, step);
    }
  }
}

// Outputs [n_begin, n_end) (n_end - n_begin a multiple of 16) for all M input rows on the tiles: whole groups of
// 32 * rows_per_page(K) rows as rows_per_page(K) interleaved pairs of tiles, the rest as adjacent rows. Each
// output's sum is the same whichever tile row computes it.
void linear_rows_amx(const uint32_t* packed, int64_t M, int64_t K, const uint16_t* w, int64_t n_begin,
                     int64_t n_end, bf16* y, int64_t ldy) {
  const int64_t step = rows_per_page(K), group = 2 * kAmxRows * step;
  int64_t n0 = n_begin;
  for (; n0 + group <= n_end; n0 += group)
    for (int64_t offset = 0; offset < step; ++offset) amx_block(packed, M, K, w, n0 + offset, step, true, y, ldy);
  for (; n0 < n_end; n0 += 2 * kAmxRows) amx_block(packed, M, K, w, n0, 1, n0 + 2 * kAmxRows <= n_end, y, ldy);
}

// y[m, first + j * step] for j < rows, all m, on the vector units: one tile of weight rows `step` apart.
void vector_tile_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t first, int64_t step,
                      int rows, bf16* y, int64_t ldy) {
  float acc[kInputsPerTile * kRowsPerTile];
  // The weight tile stays in L1 while every input row passes over it: weights are read once.
  for (int64_t m0 = 0; m0 < M; m0 += kInputsPerTile) {
    const int inputs = static_cast<int>(std::min<int64_t>(kInputsPerTile, M - m0));
    tile(w + first * K, step * K, rows, x + m0 * K, K, inputs, K, acc, m0 == 0);
    for (int i = 0; i < inputs; ++i)
      for (int j = 0; j < rows; ++j) y[(m0 + i) * ldy + first + j * step] = bf16(acc[i * kRowsPerTile + j]);
  }
}

// y[m, n] = bf16(sum_k x[m, k] * w[n, k]) for output rows n in [n_begin, n_end), all m, on the vector units:
// whole groups of kRowsPerTile * rows_per_page(K) rows as interleaved tiles (one row per page, as on the AMX
// path), the rest as adjacent rows. Each output's sum is the same whichever tile row computes it.
void linear_rows_vector(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t n_begin, int64_t n_end,
                        bf16* y, int64_t ldy) {
  const int64_t step = rows_per_page(K), group = kRowsPerTile * step;
  int64_t n0 = n_begin;
  for (; n0 + group <= n_end; n0 += group)
    for (int64_t offset = 0; offset < step; ++offset)
      vector_tile_rows(x, M, K, w, n0 + offset, step, kRowsPerTile, y, ldy);
  for (; n0 < n_end; n0 += kRowsPerTile)
    vector_tile_rows(x, M, K, w, n0, 1, static_cast<int>(std::min<int64_t>(kRowsPerTile, n_end - n0)), y, ldy);
}

// y[m, n] for output rows n in [n_begin, n_end), all m: on the AMX tiles where `packed` holds the inputs
// (pack_inputs_amx), the last rows short of a tile on the vector units; else all on the vector units. Each
// output's sum depends only on (M, K), not on how the rows were split into tasks.
void linear_rows(const uint16_t* x, const uint32_t* packed, int64_t M, int64_t K, const uint16_t* w, int64_t n_begin,
                 int64_t n_end, bf16* y, int64_t ldy, TileScope& tiles) {
  if (packed == nullptr) return linear_rows_vector(x, M, K, w, n_begin, n_end, y, ldy);
  const int64_t tiled_end = n_begin + (n_end - n_begin) / kAmxRows * kAmxRows;
  if (tiled_end > n_begin) {
    tiles.use();
    linear_rows_amx(packed, M, K, w, n_begin, tiled_end, y, ldy);
  }
  if (tiled_end < n_end) linear_rows_vector(x, M, K, w, tiled_end, n_end, y, ldy);
}

// Output rows per parallel task: enough work per task that the thread hand-off stays small; a multiple of the
// AMX kernel's group (two tiles of rows_per_page(K) interleaved rows), so only the last rows of a matrix ever
// fall outside a group.
int64_t grain_rows(int64_t K, int64_t M) {
  const int64_t kUnit = 2 * kAmxRows * rows_per_page(K);
  const int64_t work = std::max<int64_t>(1, K * std::min<int64_t>(M, 8));
  return std::max<int64_t>(kUnit, ((int64_t{1} << 16) / work + kUnit - 1) / kUnit * kUnit);
}

void parallel_linear(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, bf16* y, int64_t ldy) {
  std::vector<uint32_t> packed;
  if (amx_serves(M, K)) {
    packed.resize(amx_packed_words(M, K));
    pack_inputs_amx(x, M, K, packed.data());
  }
  const uint32_t* packed_inputs = packed.empty() ? nullptr : packed.data();
  const int64_t grain = grain_rows(K, M);
  const int64_t tasks = (N + grain - 1) / grain;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    TileScope tiles;
    linear_rows(x, packed_inputs, M, K, w, t0 * grain, std::min(N, t1 * grain), y, ldy, tiles);
  });
}

void check_bf16_matrix(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline float bf16_round(float v) { return static_cast<float>(bf16(v)); }

// lanes[l] += x[c + l]^2 over c < n (a multiple of 16): rms_norm_bf16's scalar lanes, the same products and sums.
__attribute__((target("avx512f,avx512bw"))) void sum_squares_avx512(const bf16* x, int64_t n, float* lanes) {
  __m512 acc = _mm512_loadu_ps(lanes);
  for (int64_t c = 0; c < n; c += 16) {
    const __m512 v = widen16(x + c);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));  // not fused: the scalar loop rounds the product first
  }
  _mm512_storeu_ps(lanes, acc);
}

// o[k] = bf16(w[k] * bf16(x[k] * inv)) for k < n (a multiple of 16).
__attribute__((target("avx512f,avx512bw"))) void scale_rows_avx512(const bf16* x, const bf16* w, float inv, int64_t n,
                                                                   bf16* o) {
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 normed = widen16_bits(round16_bf16(_mm512_mul_ps(widen16(x + k), scale)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), round16_bf16(_mm512_mul_ps(widen16(w + k), normed)));
  }
}

// fn(r0, r1) over rows [0, rows) of `width` elements each: inline when they hold under 32K elements (a fork/join
// of the thread pool costs more than that much work), else in parallel chunks of about 16K elements.
template <class RowsFn>
void for_rows(int64_t rows, int64_t width, const RowsFn& fn) {
  if (rows * width < (int64_t{1} << 15))
    fn(0, rows);
  else
    at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 14) / width), fn);
}

}  // namespace

std::string matrix_isa() { return kAmx ? "amx_bf16" : ""; }

int64_t matrix_min_rows() { return kAmxMinRows; }

std::string available_isa() {
  switch (kIsa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx2: return "avx2";
    default: return "";
  }
}

// x: [M, K] bf16, weight: [N, K] bf16 -> [M, N] bf16 (= F.linear(x, weight) up to fp32 summation order).
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(kIsa != Isa::kNone, "this CPU has neither AVX512-BF16 nor AVX2+FMA");
  check_bf16_matrix(x, "x");
  check_bf16_matrix(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "shapes ", x.sizes(), " and ",
              weight.sizes(), " do not multiply");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  parallel_linear(reinterpret_cast<const uint16_t*>(x.data_ptr()), M, K,
                  reinterpret_cast<const uint16_t*>(weight.data_ptr()), N, y.data_ptr<bf16>(), N);
  return y;
}

namespace {

// For every expert e with rows: y[start[e] + r, :] = x[start[e] + r, :] @ w[e]^T (w: [E, N, K]), as one
// parallel region over (expert, block of output rows) tasks, so that a decode step with many lightly loaded
// experts pays one fork/join per phase instead of one per expert. Each thread packs the inputs of the experts
// it works on for the tiles itself, when it reaches the expert's first task of its share: the packing runs in
// parallel, beside the other thread's weight reads, and an expert split between the two threads is packed twice.
void experts_linear(const uint16_t* x, int64_t K, const uint16_t* w, int64_t N, const std::vector<int64_t>& start,
                    const int64_t* count, int64_t E, bf16* y) {
  struct Task {
    int64_t expert, n_begin, n_end;
  };
  std::vector<Task> tasks;
  const auto options = torch::TensorOptions().dtype(at::kBFloat16);
  for (int64_t e = 0; e < E; ++e) {
    if (!count[e]) continue;
    if (library_serves(count[e], K)) {
      // torch's own matmul, on all threads, one expert after another: the torch path's call, so its roundings.
      auto* rows = const_cast<uint16_t*>(x + start[e] * K);
      auto* weight = const_cast<uint16_t*>(w + e * N * K);
      auto out = torch::from_blob(y + start[e] * N, {count[e], N}, options);
      at::mm_out(out, torch::from_blob(rows, {count[e], K}, options), torch::from_blob(weight, {N, K}, options).t());
      continue;
    }
    const int64_t grain = grain_rows(K, count[e]);
    for (int64_t n = 0; n < N; n += grain) tasks.push_back({e, n, std::min(N, n + grain)});
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    TileScope tiles;
    std::vector<uint32_t> packed;
    int64_t packed_expert = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const int64_t e = task.expert;
      const uint16_t* rows = x + start[e] * K;
      const bool on_tiles = amx_serves(count[e], K);
      if (on_tiles && packed_expert != e) {
        packed.resize(amx_packed_words(count[e], K));
        pack_inputs_amx(rows, count[e], K, packed.data());
        packed_expert = e;
      }
      linear_rows(rows, on_tiles ? packed.data() : nullptr, count[e], K, w + e * N * K, task.n_begin, task.n_end,
                  y + start[e] * N, N, tiles);
    }
  });
}

// Columns [0, n) (a multiple of 16) of add_weighted_rows for one token: its `count` slots `slots`, `scale` the
// bf16-rounded routing weights.
__attribute__((target("avx512f,avx512bw"))) void add_weighted_avx512(const bf16* y, const float* scale,
                                                                     const int64_t* slots, int64_t count, int64_t H,
                                                                     int64_t n, bf16* o) {
  for (int64_t c = 0; c < n; c += 16) {
    __m512 sum = widen16(o + c);
    for (int64_t i = 0; i < count; ++i) {
      const __m512 product = _mm512_mul_ps(widen16(y + slots[i] * H + c), _mm512_set1_ps(scale[slots[i]]));
      sum = _mm512_add_ps(sum, widen16_bits(round16_bf16(product)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c), round16_bf16(sum));
  }
}

// out[t] = bf16(float(out[t]) + the sum, in fp32 and in slot order, of bf16(y[slot] * bf16(weight[slot])) over t's
// slots): the torch path's `y * weights.to(bf16)` and index_add_ (one fp32 sum per token, rounded once), in one
// pass. y: [A, H] bf16, one row per slot, slots grouped by expert (so a token's slots come in expert order);
// token_of: [A] the slot's token; out: [T, H] bf16. Threads split the tokens, so each sum keeps its order.
void add_weighted_rows(const bf16* y, const float* weight_of, const std::vector<int64_t>& token_of, int64_t T,
                       int64_t H, bf16* out) {
  const int64_t A = static_cast<int64_t>(token_of.size());
  std::vector<int64_t> first(T + 1, 0), slots(A);
  for (int64_t slot = 0; slot < A; ++slot) ++first[token_of[slot] + 1];
  for (int64_t t = 0; t < T; ++t) first[t + 1] += first[t];
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t slot = 0; slot < A; ++slot) slots[fill[token_of[slot]]++] = slot;
  std::vector<float> scale(A);
  for (int64_t slot = 0; slot < A; ++slot) scale[slot] = bf16_round(weight_of[slot]);
  const int64_t vector_end = kIsa == Isa::kAvx512Bf16 ? H / 16 * 16 : 0;
  for_rows(T, H * std::max<int64_t>(1, A / std::max<int64_t>(1, T)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (first[t] == first[t + 1]) continue;
      bf16* o = out + t * H;
      if (vector_end) add_weighted_avx512(y, scale.data(), slots.data() + first[t], first[t + 1] - first[t], H,
                                          vector_end, o);
      for (int64_t c = vector_end; c < H; ++c) {
        float sum = static_cast<float>(o[c]);
        for (int64_t i = first[t]; i < first[t + 1]; ++i)
          sum += bf16_round(static_cast<float>(y[slots[i] * H + c]) * scale[slots[i]]);
        o[c] = bf16(sum);
      }
    }
  });
}

}  // namespace

namespace {

// Working rows of moe_swiglu_bf16, kept per calling thread and only ever grown: a prefill-sized call needs tens of
// MB, and fresh buffers on every call took their page faults again each time (glibc hands large freed blocks back
// to the kernel): on the AMD EPYC a 1024-token MoE layer took 35-44 ms with fresh buffers, 20-21 ms reusing them.
class ScratchRows {
 public:
  // Buffer `which` (0-3), at least `elements` bf16 long, 64-byte aligned, holding whatever an earlier call left.
  bf16* get(int which, int64_t elements) {
    Buffer& buffer = buffers_[which];
    if (buffer.capacity < elements) {
      const int64_t bytes = std::max<int64_t>(elements, 1) * static_cast<int64_t>(sizeof(bf16));
      buffer.data.reset(static_cast<bf16*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      TORCH_CHECK(buffer.data, "out of memory for ", bytes, " bytes of expert scratch rows");
      buffer.capacity = elements;
    }
    return buffer.data.get();
  }

 private:
  struct Free {
    void operator()(bf16* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<bf16, Free> data;
    int64_t capacity = 0;
  };
  Buffer buffers_[4];
};

ScratchRows& moe_scratch() {
  thread_local ScratchRows scratch;
  return scratch;
}

}  // namespace

// Adds sum_e weight[t, e] * down_e(silu(gate_e(x_t)) * up_e(x_t)) into out[t] for every token t and each of
// its local experts e (expert_ids -1: held elsewhere, skipped). Each hit expert's weights are read once for
// all of its tokens. Returns the tokens each local expert received ([num_local] int64).
//
// hidden: [T, H] bf16; expert_ids: [T, top_k] int64; expert_weights: [T, top_k] float32;
// gate_up: [E, 2 * I, H] bf16 (gate rows first); down: [E, H, I] bf16; out: [T, H] bf16, accumulated in place.
torch::Tensor moe_swiglu_bf16(const torch::Tensor& hidden, const torch::Tensor& expert_ids,
                              const torch::Tensor& expert_weights, const torch::Tensor& gate_up,
                              const torch::Tensor& down, torch::Tensor& out) {
  TORCH_CHECK(kIsa != Isa::kNone, "this CPU has neither AVX512-BF16 nor AVX2+FMA");
  check_bf16_matrix(hidden, "hidden");
  check_bf16_matrix(gate_up, "gate_up");
  check_bf16_matrix(down, "down");
  check_bf16_matrix(out, "out");
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong && expert_ids.is_contiguous(), "expert_ids must be contiguous int64");
  TORCH_CHECK(expert_weights.scalar_type() == at::kFloat && expert_weights.is_contiguous(),
              "expert_weights must be contiguous float32");
  const int64_t T = hidden.size(0), H = hidden.size(1), top_k = expert_ids.size(1);
  const int64_t E = gate_up.size(0), I = down.size(2);
  TORCH_CHECK(expert_ids.size(0) == T && expert_weights.sizes() == expert_ids.sizes(), "routing shapes ",
              expert_ids.sizes(), " / ", expert_weights.sizes(), " do not match ", T, " tokens");
  TORCH_CHECK(gate_up.size(1) == 2 * I && gate_up.size(2) == H && down.size(0) == E && down.size(1) == H,
              "expert weight shapes ", gate_up.sizes(), " / ", down.sizes(), " do not match hidden ", H);
  TORCH_CHECK(out.sizes() == hidden.sizes(), "out must be shaped like hidden");

  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  const float* weights = expert_weights.data_ptr<float>();
  auto counts = torch::zeros({E}, expert_ids.options());
  int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t s = 0; s < T * top_k; ++s) {
    TORCH_CHECK(ids[s] >= -1 && ids[s] < E, "expert id ", ids[s], " is outside [-1, ", E, ")");
    if (ids[s] >= 0) ++count[ids[s]];
  }
  // Assignments grouped by expert, tokens ascending within an expert (the torch path's stable sort).
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + count[e];
  std::vector<int64_t> token_of(start[E]), fill(start.begin(), start.end() - 1);
  std::vector<float> weight_of(start[E]);
  for (int64_t s = 0; s < T * top_k; ++s) {
    if (ids[s] < 0) continue;
    const int64_t slot = fill[ids[s]]++;
    token_of[slot] = s / top_k;
    weight_of[slot] = weights[s];
  }
  const auto* gu_all = reinterpret_cast<const uint16_t*>(gate_up.data_ptr());
  const auto* down_all = reinterpret_cast<const uint16_t*>(down.data_ptr());
  // Phase 1: every hit expert's gate/up rows, its tokens gathered into one block per expert.
  const int64_t A = start[E];
  ScratchRows& scratch = moe_scratch();
  bf16* xs = scratch.get(0, A * H);
  bf16* hs = scratch.get(1, A * 2 * I);
  bf16* act = scratch.get(2, A * I);
  bf16* ys = scratch.get(3, A * H);
  const bf16* hidden_p = hidden.data_ptr<bf16>();
  for (int64_t slot = 0; slot < A; ++slot) std::copy_n(hidden_p + token_of[slot] * H, H, xs + slot * H);
  experts_linear(reinterpret_cast<const uint16_t*>(xs), H, gu_all, 2 * I, start, count, E, hs);
  // Phase 2: silu(gate) * up with torch's own vectorised kernels, so the roundings are the torch path's.
  const auto options = hidden.options();
  auto gate_up_rows = torch::from_blob(hs, {A, 2 * I}, options);
  auto gate = gate_up_rows.narrow(1, 0, I);
  at::silu_(gate);
  auto act_rows = torch::from_blob(act, {A, I}, options);
  at::mul_out(act_rows, gate, gate_up_rows.narrow(1, I, I));
  // Phase 3: down, then each row times its routing weight rounded to bf16 (as the torch path multiplies).
  experts_linear(reinterpret_cast<const uint16_t*>(act), I, down_all, H, start, count, E, ys);
  add_weighted_rows(ys, weight_of.data(), token_of, T, H, out.data_ptr<bf16>());
  return counts;
}

// RMSNorm over the last dim of x ([rows, D] or [rows, groups, D], last dim contiguous, any outer strides) with
// weight [groups, D] (or [D]): out = bf16(w * bf16(x * 1 / sqrt(mean(x^2) + eps))), the reference's two
// roundings. One call replaces the eight small torch ops F.rms_norm decomposes into for bf16 on the CPU.
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "x must be bfloat16 on the CPU");
  check_bf16_matrix(weight, "weight");
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x must be [rows, D] or [rows, groups, D], got ", x.sizes());
  TORCH_CHECK(x.stride(-1) == 1, "x's last dim must be contiguous");
  const int64_t D = x.size(-1), rows = x.size(0), groups = x.dim() == 3 ? x.size(1) : 1;
  const int64_t weight_rows = weight.dim() == 1 ? 1 : weight.size(0);
  TORCH_CHECK(weight.size(-1) == D && (weight_rows == 1 || weight_rows == groups), "weight ", weight.sizes(),
              " does not fit x ", x.sizes());
  auto out = torch::empty(x.sizes(), x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t row_stride = x.stride(0), group_stride = x.dim() == 3 ? x.stride(1) : 0;
  const float feps = static_cast<float>(eps);
  const bool vector = kIsa == Isa::kAvx512Bf16;
  auto norm_rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = r / groups, group = r % groups;
      const bf16* in = xp + row * row_stride + group * group_stride;
      const bf16* w = wp + (weight_rows == 1 ? 0 : group) * D;
      bf16* o = op + r * D;
      float lanes[16] = {0};
      const int64_t whole = D / 16 * 16;
      if (vector)
        sum_squares_avx512(in, whole, lanes);
      else
        for (int64_t c = 0; c < whole; c += 16)
          for (int l = 0; l < 16; ++l) {
            const float v = static_cast<float>(in[c + l]);
            lanes[l] += v * v;
          }
      float sum = 0;
      for (int l = 0; l < 16; ++l) sum += lanes[l];
      for (int64_t c = whole; c < D; ++c) sum += static_cast<float>(in[c]) * static_cast<float>(in[c]);
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(D) + feps);
      const int64_t scaled = vector ? whole : 0;
      if (vector) scale_rows_avx512(in, w, inv, whole, o);
      for (int64_t k = scaled; k < D; ++k)
        o[k] = bf16(static_cast<float>(w[k]) * bf16_round(static_cast<float>(in[k]) * inv));
    }
  };
  for_rows(rows * groups, D, norm_rows);
  return out;
}

namespace {

// values[t] = exp(values[t] - top) for t < n, 16 at a time (the tail masked, so every value takes the same
// arithmetic): Cephes' expf, n = round(x log2 e), x - n ln 2 in two parts, a degree-6 polynomial and a scale by
// 2^n, within 2 ulp of expf. libm's scalar expf was most of a decode attention call (256 per (sequence, kv head)
// task at 64 keys). x is clamped at -87 (exp -87 = 1.6e-38: nothing next to the maximum's 1).
__attribute__((target("avx512f,avx512bw"))) void exp_shifted_avx512(float* values, int64_t n, float top) {
  const __m512 shift = _mm512_set1_ps(top), low = _mm512_set1_ps(-87.0f), log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 lanes = n - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - t)) - 1);
    const __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, values + t), shift), low);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, x));
    __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    _mm512_mask_storeu_ps(values + t, lanes, _mm512_scalef_ps(y, k));
  }
}

// Keys whose dot products are summed across lanes together (reduce4): the four horizontal sums in ~10
// instructions instead of ~10 each. A key's sum does not depend on the keys beside it.
constexpr int64_t kKeysPerReduce = 4;

// One (sequence, query head): softmax(q . K^T * scale) V over the sequence's `len` cached keys, as torch's CPU
// flash attention rounds it for bf16: fp32 scores, exp(score - max) rounded to bf16 for the product with V,
// the denominator summed in fp32, the output divided once and rounded once. AVX512 only: elsewhere the
// Python side keeps torch's attention.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void attend_head(
    const bf16* q, const bf16* cache, int64_t width, const int64_t* slots, int64_t len, int64_t k_off, int64_t v_off,
    int64_t D, float scale, float* scores, float* acc, bf16* out) {
  float top = -INFINITY;
  const int64_t whole = D / 16 * 16;
  for (int64_t t0 = 0; t0 < len; t0 += kKeysPerReduce) {
    const int64_t n = std::min(kKeysPerReduce, len - t0);
    const bf16* k[kKeysPerReduce];
    for (int64_t j = 0; j < kKeysPerReduce; ++j) k[j] = cache + slots[t0 + std::min(j, n - 1)] * width + k_off;
    __m512 sum[kKeysPerReduce] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < whole; c += 16) {
      const __m512 qv = widen16(q + c);
      for (int64_t j = 0; j < kKeysPerReduce; ++j) sum[j] = _mm512_fmadd_ps(qv, widen16(k[j] + c), sum[j]);
    }
    alignas(16) float dots[kKeysPerReduce];
    _mm_store_ps(dots, reduce4(sum[0], sum[1], sum[2], sum[3]));
    for (int64_t j = 0; j < n; ++j) {
      float dot = dots[j];
      for (int64_t c = whole; c < D; ++c) dot += static_cast<float>(q[c]) * static_cast<float>(k[j][c]);
      scores[t0 + j] = dot * scale;
      top = std::max(top, scores[t0 + j]);
    }
  }
  for (int64_t c = 0; c < D; ++c) acc[c] = 0.0f;
  float denominator = 0.0f;
  exp_shifted_avx512(scores, len, top);
  for (int64_t t = 0; t < len; ++t) {
    const float e = scores[t];
    denominator += e;
    const float p = bf16_round(e);
    const bf16* v = cache + slots[t] * width + v_off;
    int64_t c = 0;
    const __m512 pv = _mm512_set1_ps(p);
    for (; c + 16 <= D; c += 16) _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(pv, widen16(v + c), _mm512_loadu_ps(acc + c)));
    for (; c < D; ++c) acc[c] += p * static_cast<float>(v[c]);
  }
  for (int64_t c = 0; c < D; ++c) out[c] = bf16(acc[c] / denominator);
}

// The `group` query heads that share one kv head (grouped-query attention), together: each cached key and value
// row is read and widened once for all of them. Per head the arithmetic is attend_head's, step for step and in
// the same order, so the outputs are bit-identical to it. Needs D a multiple of 16, at most kMaxGroupDim.
constexpr int64_t kMaxGroupDim = 256;

__attribute__((target("avx512f,avx512bw,avx512bf16"))) void attend_group(
    const bf16* q, int64_t q_head_stride, int64_t group, const bf16* cache, int64_t width, const int64_t* slots,
    int64_t len, int64_t k_off, int64_t v_off, int64_t D, float scale, float* scores, float* acc, bf16* out) {
  const int64_t chunks = D / 16;
  __m512 row[kMaxGroupDim / 16];
  __m512 keys[kKeysPerReduce][kMaxGroupDim / 16];
  std::vector<float> top(group, -INFINITY), denominator(group, 0.0f);
  for (int64_t t0 = 0; t0 < len; t0 += kKeysPerReduce) {
    const int64_t n = std::min(kKeysPerReduce, len - t0);
    for (int64_t j = 0; j < kKeysPerReduce; ++j) {
      const bf16* k = cache + slots[t0 + std::min(j, n - 1)] * width + k_off;
      for (int64_t c = 0; c < chunks; ++c) keys[j][c] = widen16(k + 16 * c);
    }
    for (int64_t h = 0; h < group; ++h) {
      const bf16* qh = q + h * q_head_stride;
      __m512 sum[kKeysPerReduce] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 qv = widen16(qh + 16 * c);
        for (int64_t j = 0; j < kKeysPerReduce; ++j) sum[j] = _mm512_fmadd_ps(qv, keys[j][c], sum[j]);
      }
      alignas(16) float dots[kKeysPerReduce];
      _mm_store_ps(dots, reduce4(sum[0], sum[1], sum[2], sum[3]));
      for (int64_t j = 0; j < n; ++j) {
        const float score = dots[j] * scale;
        scores[h * len + t0 + j] = score;
        top[h] = std::max(top[h], score);
      }
    }
  }
  for (int64_t i = 0; i < group * D; ++i) acc[i] = 0.0f;
  for (int64_t h = 0; h < group; ++h) exp_shifted_avx512(scores + h * len, len, top[h]);
  for (int64_t t = 0; t < len; ++t) {
    const bf16* v = cache + slots[t] * width + v_off;
    for (int64_t c = 0; c < chunks; ++c) row[c] = widen16(v + 16 * c);
    for (int64_t h = 0; h < group; ++h) {
      const float e = scores[h * len + t];
      denominator[h] += e;
      const __m512 pv = _mm512_set1_ps(bf16_round(e));
      float* a = acc + h * D;
      for (int64_t c = 0; c < chunks; ++c)
        _mm512_storeu_ps(a + 16 * c, _mm512_fmadd_ps(pv, row[c], _mm512_loadu_ps(a + 16 * c)));
    }
  }
  for (int64_t h = 0; h < group; ++h)
    for (int64_t c = 0; c < D; ++c) out[h * D + c] = bf16(acc[h * D + c] / denominator[h]);
}

}  // namespace

// Decode attention straight from the paged cache: one query token per sequence, no gather of the context.
// query: [S, H, D] bf16 (last dim contiguous); cache: [slots, width] bf16, K of kv head g at columns
// k_offset + g * D, V at v_offset + g * D; context_slots: [S, C] int64; context_lens: [S] int64 (<= C).
// Returns [S, H * D] bf16. Query head h reads kv head h / (H / kv_heads), as grouped-query attention does.
torch::Tensor decode_attention_bf16(const torch::Tensor& query, const torch::Tensor& cache,
                                    const torch::Tensor& context_slots, const torch::Tensor& context_lens,
                                    int64_t k_offset, int64_t v_offset, int64_t kv_heads, double scale) {
  TORCH_CHECK(kIsa == Isa::kAvx512Bf16, "decode attention needs AVX512 (torch's attention serves elsewhere)");
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == at::kBFloat16 && query.dim() == 3 &&
                  query.stride(2) == 1,
              "query must be [seqs, heads, head_dim] bfloat16 with a contiguous last dim");
  check_bf16_matrix(cache, "cache");
  TORCH_CHECK(context_slots.scalar_type() == at::kLong && context_slots.is_contiguous() && context_slots.dim() == 2,
              "context_slots must be contiguous [seqs, ctx] int64");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() && context_lens.dim() == 1,
              "context_lens must be contiguous [seqs] int64");
  const int64_t S = query.size(0), H = query.size(1), D = query.size(2), C = context_slots.size(1);
  const int64_t slots_total = cache.size(0), width = cache.size(1);
  TORCH_CHECK(context_slots.size(0) == S && context_lens.size(0) == S, "one slot row and length per sequence");
  TORCH_CHECK(kv_heads > 0 && H % kv_heads == 0, H, " query heads do not group over ", kv_heads, " kv heads");
  TORCH_CHECK(k_offset >= 0 && v_offset >= 0 && k_offset + kv_heads * D <= width && v_offset + kv_heads * D <= width,
              "K/V columns fall outside the cache width ", width);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* slots = context_slots.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= C, "context length ", lens[s], " of sequence ", s, " is outside [1, ", C, "]");
    for (int64_t t = 0; t < lens[s]; ++t)
      TORCH_CHECK(slots[s * C + t] >= 0 && slots[s * C + t] < slots_total, "cache slot ", slots[s * C + t],
                  " is outside the cache");
  }
  auto out = torch::empty({S, H * D}, query.options());
  const bf16* qp = query.data_ptr<bf16>();
  const bf16* cp = cache.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t group = H / kv_heads;
  const float fscale = static_cast<float>(scale);
  int64_t work = 0;
  for (int64_t s = 0; s < S; ++s) work += lens[s];
  const bool small = work * H * D < (int64_t{1} << 16);
  if (group > 1 && D % 16 == 0 && D <= kMaxGroupDim) {
    // One task per (sequence, kv head): its query heads read each K/V row once.
    auto run_groups = [&](int64_t p0, int64_t p1) {
      std::vector<float> scores(group * C), acc(group * D);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t s = p / kv_heads, g = p % kv_heads;
        const bf16* q = qp + s * query.stride(0) + g * group * query.stride(1);
        attend_group(q, query.stride(1), group, cp, width, slots + s * C, lens[s], k_offset + g * D,
                     v_offset + g * D, D, fscale, scores.data(), acc.data(), op + s * H * D + g * group * D);
      }
    };
    if (small)
      run_groups(0, S * kv_heads);
    else
      at::parallel_for(0, S * kv_heads, 1, run_groups);
    return out;
  }
  auto run = [&](int64_t p0, int64_t p1) {
    std::vector<float> scores(C), acc(D);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t s = p / H, h = p % H, g = h / group;
      const bf16* q = qp + s * query.stride(0) + h * query.stride(1);
      const int64_t ko = k_offset + g * D, vo = v_offset + g * D;
      attend_head(q, cp, width, slots + s * C, lens[s], ko, vo, D, fscale, scores.data(), acc.data(),
                  op + s * H * D + h * D);
    }
  };
  if (small)
    run(0, S * H);
  else
    at::parallel_for(0, S * H, 1, run);
  return out;
}

// Rotary embedding over the whole head of x [T, heads, D] bf16 (last dim contiguous, any outer strides), halves
// not interleaved: out = bf16(bf16(x * cos) + bf16(swap_halves(x) * sin)) with cos, sin [T, 1, D] bf16 (sin with
// the rotation's sign folded in, as RotaryEmbedding builds it) -- the three roundings of the torch expression
// `x * cos + cat(x2, x1) * sin` in bf16, so the result is bit-identical to it, in one call instead of four ops.
torch::Tensor rope_bf16(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1,
              "x must be a bfloat16 [tokens, heads, head_dim] CPU tensor, last dim contiguous");
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  for (const auto* table : {&cos, &sin})
    TORCH_CHECK(table->scalar_type() == at::kBFloat16 && table->dim() == 3 && table->size(0) == T &&
                    table->size(1) == 1 && table->size(2) == D && table->stride(2) == 1,
                "cos and sin must be bfloat16 [tokens, 1, head_dim] with a contiguous last dim");
  auto out = torch::empty({T, heads, D}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* sp = sin.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t half = D / 2;
  auto rotate = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / heads, h = r % heads;
      const bf16* in = xp + t * x.stride(0) + h * x.stride(1);
      const bf16* c = cp + t * cos.stride(0);
      const bf16* sn = sp + t * sin.stride(0);
      bf16* o = op + r * D;
      for (int64_t k = 0; k < D; ++k) {
        const float swapped = static_cast<float>(in[k < half ? k + half : k - half]);
        o[k] = bf16(bf16_round(static_cast<float>(in[k]) * static_cast<float>(c[k])) +
                    bf16_round(swapped * static_cast<float>(sn[k])));
      }
    }
  };
  for_rows(T * heads, D, rotate);
  return out;
}

namespace {

// dst[c] += float(src[c]) for c < n (a multiple of 16).
__attribute__((target("avx512f,avx512bw"))) void add_widened_avx512(const bf16* src, float* dst, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) {
    _mm512_storeu_ps(dst + c, _mm512_add_ps(_mm512_loadu_ps(dst + c), widen16(src + c)));
  }
}

// res[c] = bf16(float(res[c]) + float(bf16(total[c]))) for c < n (a multiple of 16): `res += total.to(bf16)`.
__attribute__((target("avx512f,avx512bw"))) void add_rounded_avx512(const float* total, bf16* res, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) {
    const __m512 sum = _mm512_add_ps(widen16(res + c), widen16_bits(round16_bf16(_mm512_loadu_ps(total + c))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(res + c), round16_bf16(sum));
  }
}

}  // namespace

// The FFN nodes' partial sums added into the residual: residual [T, H] bf16 += bf16(sum of the parts in fp32, in
// the order given), part i [n_i, H] bf16 covering the token rows rows[i] ([n_i] int64), or every row where rows[i]
// is empty -- what `total = zeros(fp32); total.index_add_(0, rows, part.float()) ...; residual += total.to(bf16)`
// computes, in one call instead of seven ops. Threads split the columns, so each sum keeps its order.
void add_partials_bf16(torch::Tensor& residual, const std::vector<torch::Tensor>& parts,
                       const std::vector<torch::Tensor>& rows) {
  check_bf16_matrix(residual, "residual");
  TORCH_CHECK(residual.dim() == 2, "residual must be [tokens, hidden]");
  TORCH_CHECK(parts.size() == rows.size(), "one rows tensor per part");
  const int64_t T = residual.size(0), H = residual.size(1);
  std::vector<const bf16*> part_data;
  std::vector<const int64_t*> row_data;
  std::vector<int64_t> part_rows;
  for (size_t i = 0; i < parts.size(); ++i) {
    check_bf16_matrix(parts[i], "partial");
    TORCH_CHECK(parts[i].dim() == 2 && parts[i].size(1) == H, "partial ", i, " is ", parts[i].sizes(), ", not [n, ", H,
                "]");
    const int64_t n = parts[i].size(0);
    if (rows[i].numel() == 0) {
      TORCH_CHECK(n == T || n == 0, "partial ", i, " without rows must cover all ", T, " tokens");
      row_data.push_back(nullptr);
    } else {
      TORCH_CHECK(rows[i].scalar_type() == at::kLong && rows[i].is_contiguous() && rows[i].numel() == n,
                  "rows ", i, " must be a contiguous int64 tensor of ", n, " token rows");
      const int64_t* r = rows[i].data_ptr<int64_t>();
      for (int64_t j = 0; j < n; ++j) TORCH_CHECK(r[j] >= 0 && r[j] < T, "token row ", r[j], " outside [0, ", T, ")");
      row_data.push_back(r);
    }
    part_data.push_back(parts[i].data_ptr<bf16>());
    part_rows.push_back(n);
  }
  bf16* res = residual.data_ptr<bf16>();
  std::vector<float> total(static_cast<size_t>(T * H), 0.0f);
  const bool vector = kIsa == Isa::kAvx512Bf16;
  auto add_columns = [&](int64_t c0, int64_t c1) {
    // columns [c0, v1) 16 at a time where AVX512 serves (the same sums and roundings), the rest one by one
    const int64_t v1 = vector ? c0 + (c1 - c0) / 16 * 16 : c0;
    for (size_t i = 0; i < part_data.size(); ++i)
      for (int64_t j = 0; j < part_rows[i]; ++j) {
        const int64_t t = row_data[i] ? row_data[i][j] : j;
        const bf16* src = part_data[i] + j * H;
        float* dst = total.data() + t * H;
        if (v1 > c0) add_widened_avx512(src + c0, dst + c0, v1 - c0);
        for (int64_t c = v1; c < c1; ++c) dst[c] += static_cast<float>(src[c]);
      }
    for (int64_t t = 0; t < T; ++t) {
      if (v1 > c0) add_rounded_avx512(total.data() + t * H + c0, res + t * H + c0, v1 - c0);
      for (int64_t c = v1; c < c1; ++c)
        res[t * H + c] = bf16(static_cast<float>(res[t * H + c]) + bf16_round(total[t * H + c]));
    }
  };
  if (T * H < (int64_t{1} << 16))
    add_columns(0, H);
  else
    at::parallel_for(0, H, 64, add_columns);
}

namespace {

// Index of the first largest element of `row` [V] float32; a NaN counts as larger than any number, and the first
// NaN wins (torch.max's rule). Two vector passes over the row (it stays in L2): its maximum, then where it is.
__attribute__((target("avx512f"))) int64_t first_max_avx512(const float* row, int64_t V) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  int64_t v = 0;
  for (; v + 16 <= V && !nan; v += 16) {
    const __m512 x = _mm512_loadu_ps(row + v);
    nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, x);
  }
  if (nan) {
    for (int64_t i = 0; i < V; ++i)
      if (std::isnan(row[i])) return i;
  }
  float top = _mm512_reduce_max_ps(best);
  for (int64_t i = v; i < V; ++i) {
    if (std::isnan(row[i])) return i;
    top = std::max(top, row[i]);
  }
  const __m512 target = _mm512_set1_ps(top);
  for (int64_t i = 0; i + 16 <= V; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  for (int64_t i = V / 16 * 16; i < V; ++i)
    if (row[i] == top) return i;
  return 0;  // only an all -inf row gets here, where torch also answers 0
}

}  // namespace

// The greedy token of every row of logits [R, V] float32: torch.max(logits, -1).indices, rows in parallel.
// torch's CPU reduction took about 19 us per 32000-wide row here (0.6 ms of a batch-32 decode step); this
// about a tenth of that. AVX512 only: elsewhere the Python side keeps torch's reduction.
torch::Tensor argmax_rows_f32(const torch::Tensor& logits) {
  TORCH_CHECK(kIsa == Isa::kAvx512Bf16, "argmax_rows_f32 needs AVX512");
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "logits must be a float32 [rows, vocab] CPU tensor with contiguous rows");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "logits need at least one column");
  auto out = torch::empty({R}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t stride = logits.stride(0);
  at::parallel_for(0, R, std::max<int64_t>(1, (int64_t{1} << 15) / V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = first_max_avx512(lp + r * stride, V);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available_isa", &available_isa, "The instruction set the kernels use on this CPU ('' when none).");
  m.def("matrix_isa", &matrix_isa, "'amx_bf16' where linears with enough rows run on the AMX tiles, else ''.");
  m.def("matrix_min_rows", &matrix_min_rows, "Input rows from which a linear runs on the matrix unit.");
  m.def("linear_bf16", &linear_bf16, "x [M, K] @ weight [N, K]^T for bf16 on the CPU.");
  m.def("moe_swiglu_bf16", &moe_swiglu_bf16, "Routed-expert SwiGLU over grouped assignments, added into out.");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm over the last dim with the reference's roundings, bf16.");
  m.def("decode_attention_bf16", &decode_attention_bf16, "One-token-per-sequence attention over the paged cache.");
  m.def("rope_bf16", &rope_bf16, "Rotary embedding over whole heads, halves not interleaved, bf16 (torch's roundings).");
  m.def("add_partials_bf16", &add_partials_bf16, "FFN partial sums added into the residual, summed in fp32 first.");
  m.def("argmax_rows_f32", &argmax_rows_f32, "First index of the maximum of each row (torch.max's), float32.");
}
