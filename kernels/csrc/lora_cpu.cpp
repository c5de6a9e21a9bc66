// Per-token LoRA of a step of up to kernels.lora_cpu.MAX_PAIRS (token, k) pairs on CPU, for G
// modules that read the same x (q/k/v, gate/up): the compiled twin of
// kernels.lora_ref.lora_apply_shared_ref. Built on first use by
// kernels/cpu_ext.py (torch.utils.cpp_extension), with decode_cpu.cpp; launched by kernels/lora_cpu.py.
//
// Semantics: outs[g][t] += sum_k w[t*K+k] * scales[g, s] * (x[t] @ a[g, s, :r].T) @ b[g][s, :r, :]
// with s = slots[t*K+k], r = ranks[g, s]; pairs with s == -1 add nothing.
//
// Why: a decode step's LoRA in eager torch is a few tiny matmuls and scalings per projection
// group, each an op with its own dispatch, and (dense path) every token through every slot in
// use. Here each group is one call that walks each slot's own pairs in register-blocked tiles:
// the work of the routed pairs only, in fp32 (16-bit outputs rounded once at the end). Two
// parallel regions a call (shrink tasks per (module, slot), expand tasks per 64 output columns of
// a module), none below kSerialMacs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// One vector register of fp32 lanes: sixteen with AVX-512, else eight (AVX2's ymm; two 128-bit
// registers elsewhere). GCC and Clang vector extensions, so the micro-kernels below hold their
// accumulators in registers (OpenMP SIMD reductions of many variables go through memory, and GCC
// vectorizes an inner rank loop instead of the columns). The width follows the registers: built
// for an AVX2 CPU, 16-lane vectors went through the stack (the object held 7.7 times the vector
// moves), and the kernel ran 3-12x slower than with 8 lanes (benchmarks/lora_cpu.py, fp32).
// MOLORA_LANES (8 or 16) forces the width: kernels.cpu_ext.build(lanes) compiles this file alone
// with it, so the tests check the width this CPU does not pick as well.
#if defined(MOLORA_LANES)
constexpr int kW = MOLORA_LANES;
#elif defined(__AVX512F__)
constexpr int kW = 16;
#else
constexpr int kW = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kW)));
typedef int vi __attribute__((vector_size(4 * kW)));

inline vf loadu(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void storeu(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

// 16-bit values in and out of fp32 vectors, a vector at a time: bf16 by shifting its bits (exact),
// fp16 through the compiler's _Float16 (F16C's conversions on x86), where it has one; elsewhere
// one by one through c10's types, as every 16-bit value went before.
typedef unsigned short vu16 __attribute__((vector_size(2 * kW)));
typedef unsigned int vu32 __attribute__((vector_size(4 * kW)));
#if defined(__FLT16_MAX__)
typedef _Float16 vh __attribute__((vector_size(2 * kW)));
#endif

template <typename scalar_t>
constexpr bool kVectorized16 = std::is_same_v<scalar_t, c10::BFloat16>
#if defined(__FLT16_MAX__)
                               || std::is_same_v<scalar_t, c10::Half>
#endif
    ;

template <typename scalar_t>
inline vf load16(const scalar_t* p) {
  vu16 bits;
  __builtin_memcpy(&bits, p, sizeof bits);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const vu32 wide = __builtin_convertvector(bits, vu32) << 16;
    vf v;
    __builtin_memcpy(&v, &wide, sizeof v);
    return v;
  } else {
#if defined(__FLT16_MAX__)
    vh half;
    __builtin_memcpy(&half, &bits, sizeof half);
    return __builtin_convertvector(half, vf);
#endif
  }
}

// Rounds to nearest even, as c10's conversions do (a NaN stays a NaN).
template <typename scalar_t>
inline void store16(scalar_t* p, vf v) {
  vu16 bits;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    vu32 u;
    __builtin_memcpy(&u, &v, sizeof u);
    const vu32 nan = reinterpret_cast<vu32>(v != v);  // all ones in a NaN's lane
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bits = __builtin_convertvector((u & ~nan) | (0x7FC0u & nan), vu16);
  } else {
#if defined(__FLT16_MAX__)
    const vh half = __builtin_convertvector(v, vh);
    __builtin_memcpy(&bits, &half, sizeof bits);
#endif
  }
  __builtin_memcpy(p, &bits, sizeof bits);
}

// dst[i] = float(src[i]) for n values.
template <typename scalar_t>
inline void to_float(const scalar_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  if constexpr (kVectorized16<scalar_t>) {
    for (; i + kW <= n; i += kW) storeu(dst + i, load16(src + i));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// out[i] = round(float(out[i]) + add[i]) for n values: a 16-bit output's one rounding.
template <typename scalar_t>
inline void add_rounded(scalar_t* out, const float* add, int64_t n) {
  int64_t i = 0;
  if constexpr (kVectorized16<scalar_t>) {
    for (; i + kW <= n; i += kW) store16(out + i, load16(out + i) + loadu(add + i));
  }
  for (; i < n; ++i) out[i] = static_cast<scalar_t>(static_cast<float>(out[i]) + add[i]);
}

// fp32 rows for the micro-kernels: fp32 operands as they are, 16-bit ones converted into `buf`.
template <typename scalar_t>
const float* as_float(const scalar_t* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    to_float(src, n, buf);
    return buf;
  }
}

// A thread's scratch buffer `which`, at least n floats, kept between calls instead of allocated
// and cleared in each (at most a few MB a thread: h holds MAX_PAIRS x G x R floats); what it holds
// on entry is undefined. h is the calling thread's, which its workers share; the rest each thread's own.
enum Scratch { kH, kARows, kXRows, kTile, kSums, kBuffers };

inline float* scratch(Scratch which, int64_t n) {
  thread_local std::vector<float> buffers[kBuffers];
  std::vector<float>& buffer = buffers[which];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// Folds two vectors whose lanes form groups of 2n summing to one value each into one whose groups of
// n do (a's groups first): sixteen dot products' partial sums reduce to the sixteen totals in 15
// folds (14 with 8 lanes), instead of 16 horizontal sums. Lane i of the result adds lanes
// `lanes<n, 0>[i]` and `lanes<n, 1>[i]` of a:b (b's lanes numbered from kW): the first and the
// second n of its group.
template <int n, int half, int... i>
constexpr vi lanes(std::integer_sequence<int, i...>) {
  constexpr int h = kW / 2;
  return vi{((i / h) * kW + ((i % h) / n) * 2 * n + i % n + half * n)...};
}

template <int n>
inline vf fold(vf a, vf b) {
  constexpr auto all = std::make_integer_sequence<int, kW>{};
  return __builtin_shuffle(a, b, lanes<n, 0>(all)) + __builtin_shuffle(a, b, lanes<n, 1>(all));
}

// out[k] = the lane sum of acc[k], k < 16.
static_assert(kW == 8 || kW == 16, "lane sums for 8 or 16 lanes");
inline void sum_lanes16(const vf* acc, float* out) {
  vf u[8];
  for (int k = 0; k < 8; ++k) u[k] = fold<kW / 2>(acc[2 * k], acc[2 * k + 1]);
  if constexpr (kW == 16) {
    const vf w0 = fold<4>(u[0], u[1]), w1 = fold<4>(u[2], u[3]), w2 = fold<4>(u[4], u[5]), w3 = fold<4>(u[6], u[7]);
    storeu(out, fold<1>(fold<2>(w0, w1), fold<2>(w2, w3)));
  } else {
    const vf w0 = fold<2>(u[0], u[1]), w1 = fold<2>(u[2], u[3]), w2 = fold<2>(u[4], u[5]), w3 = fold<2>(u[6], u[7]);
    storeu(out, fold<1>(w0, w1));
    storeu(out + 8, fold<1>(w2, w3));
  }
}

// out[q * 4 + k] = x_q . a_k for Q (1 to 4) rows of x and four of a (rows q >= Q of out: 0):
// up to sixteen vector accumulators, each load of x or a serving Q or four multiply-adds. With
// 8-lane vectors (16 registers) three or four rows go two at a time, so nothing spills.
template <int Q>
inline void dot_x4(const float* const* x, const float* const* a, int64_t n, float* out) {
  if constexpr (kW == 8 && Q > 2) {
    float rest[16];
    dot_x4<2>(x, a, n, out);
    dot_x4<Q - 2>(x + 2, a, n, rest);
    __builtin_memcpy(out + 8, rest, 8 * sizeof(float));
    return;
  }
  vf acc[16] = {};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const vf a0 = loadu(a[0] + i), a1 = loadu(a[1] + i), a2 = loadu(a[2] + i), a3 = loadu(a[3] + i);
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      const vf xq = loadu(x[q] + i);
      acc[q * 4] += xq * a0, acc[q * 4 + 1] += xq * a1, acc[q * 4 + 2] += xq * a2, acc[q * 4 + 3] += xq * a3;
    }
  }
  sum_lanes16(acc, out);
  for (; i < n; ++i) {
    for (int q = 0; q < Q; ++q) {
      for (int k = 0; k < 4; ++k) out[q * 4 + k] += x[q][i] * a[k][i];
    }
  }
}

// dot_x4 for q rows of x, 1 to 4.
inline void dot_rows(int64_t q, const float* const* x, const float* const* a, int64_t n, float* out) {
  switch (q) {
    case 1: return dot_x4<1>(x, a, n, out);
    case 2: return dot_x4<2>(x, a, n, out);
    case 3: return dot_x4<3>(x, a, n, out);
    default: return dot_x4<4>(x, a, n, out);
  }
}

// dst_q[c] += sum_j h_q[j] * b[j * ld + c] for N pairs q over cols columns (dst_q[c] = the sum
// where bit q of `fresh` is set: a 16-bit output's fp32 row that no pair has written yet): per
// column block, the pairs' accumulators stay in registers over the whole rank loop, each load
// of b serving N.
template <int N>
inline void expand_block(const float* b, int64_t ld, int64_t r, const float* const* h, int64_t cols,
                         float* const* dst, unsigned fresh) {
  int64_t c = 0;
  for (; c + 2 * kW <= cols; c += 2 * kW) {
    vf s[N], t[N];
#pragma GCC unroll 8
    for (int q = 0; q < N; ++q) s[q] = t[q] = vf{};
    for (int64_t j = 0; j < r; ++j) {
      const vf v = loadu(b + j * ld + c), w = loadu(b + j * ld + c + kW);
#pragma GCC unroll 8
      for (int q = 0; q < N; ++q) {
        const float hq = h[q][j];
        s[q] += hq * v, t[q] += hq * w;
      }
    }
#pragma GCC unroll 8
    for (int q = 0; q < N; ++q) {  // in order: two pairs of one token (a slot routed twice) both land
      if (fresh >> q & 1u) {
        storeu(dst[q] + c, s[q]);
        storeu(dst[q] + c + kW, t[q]);
      } else {
        storeu(dst[q] + c, loadu(dst[q] + c) + s[q]);
        storeu(dst[q] + c + kW, loadu(dst[q] + c + kW) + t[q]);
      }
    }
  }
  for (; c + kW <= cols; c += kW) {
    vf s[N];
#pragma GCC unroll 8
    for (int q = 0; q < N; ++q) s[q] = vf{};
    for (int64_t j = 0; j < r; ++j) {
      const vf v = loadu(b + j * ld + c);
#pragma GCC unroll 8
      for (int q = 0; q < N; ++q) s[q] += h[q][j] * v;
    }
#pragma GCC unroll 8
    for (int q = 0; q < N; ++q) storeu(dst[q] + c, (fresh >> q & 1u) ? s[q] : loadu(dst[q] + c) + s[q]);
  }
  for (; c < cols; ++c) {
    for (int q = 0; q < N; ++q) {
      float acc = 0.f;
      for (int64_t j = 0; j < r; ++j) acc += h[q][j] * b[j * ld + c];
      dst[q][c] = (fresh >> q & 1u) ? acc : dst[q][c] + acc;
    }
  }
}

// expand_block for n pairs, 1 to 8: every block holds only real pairs (a slot of 9 pairs is one
// block of 8 and one of 1, not 8 and a block of 4 holding 3 copies).
inline void expand_pairs(int64_t n, const float* b, int64_t ld, int64_t r, const float* const* h, int64_t cols,
                         float* const* dst, unsigned fresh) {
  switch (n) {
    case 1: return expand_block<1>(b, ld, r, h, cols, dst, fresh);
    case 2: return expand_block<2>(b, ld, r, h, cols, dst, fresh);
    case 3: return expand_block<3>(b, ld, r, h, cols, dst, fresh);
    case 4: return expand_block<4>(b, ld, r, h, cols, dst, fresh);
    case 5: return expand_block<5>(b, ld, r, h, cols, dst, fresh);
    case 6: return expand_block<6>(b, ld, r, h, cols, dst, fresh);
    case 7: return expand_block<7>(b, ld, r, h, cols, dst, fresh);
    default: return expand_block<8>(b, ld, r, h, cols, dst, fresh);
  }
}

constexpr int64_t kCols = 64;  // output columns of one expand task
// Pairs of one expand block: their 2 x N accumulators plus two B vectors and h's broadcast fit
// the registers (32 with AVX-512; with AVX2's 16, blocks of 6 instead of 8 measured 5-16% faster
// on top-2 decode-size steps, whose slots hold 8 or more pairs; one-adapter rows, 4 a slot, within 4%).
constexpr int kExpandPairs = kW == 16 ? 8 : 6;

// Asks for `rows` rows of `bytes` bytes, `ld_bytes` apart, to come into L2, one request per
// cache line. In a decode step the base weights between two LoRA calls evict the hot-set's rows,
// and one slot's tile is too short for the hardware prefetchers to ramp up: each thread asks for
// every tile it will read before it computes, so the misses overlap instead of queueing one by
// one (4 layers, 16 tokens, top-2, caches flushed between calls: 0.45 against 0.48 ms a step).
inline void prefetch_rows(const void* p, int64_t rows, int64_t bytes, int64_t ld_bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + j * ld_bytes + off, 0, 2);
  }
}

template <typename scalar_t>
void apply(const torch::Tensor& x, const torch::Tensor& a, const std::vector<torch::Tensor>& b,
           const std::vector<torch::Tensor>& outs, const torch::Tensor& slots, const torch::Tensor& weights,
           const torch::Tensor& ranks, const torch::Tensor& scales, int64_t top_k) {
  const int64_t d_in = x.size(1), groups = a.size(0), num_slots = a.size(1), max_rank = a.size(2);
  const int64_t pairs = slots.size(0), tokens = x.size(0);
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const int32_t* sp = slots.data_ptr<int32_t>();
  const float* wp = weights.data_ptr<float>();
  const int32_t* rp = ranks.data_ptr<int32_t>();
  const float* cp = scales.data_ptr<float>();
  constexpr bool direct = std::is_same_v<scalar_t, float>;  // fp32: no copies, sums straight into out

  // Pair ids grouped by slot (a counting sort): slot s's pairs are order[start[s] : start[s + 1]].
  std::vector<int64_t> start(num_slots + 1, 0), order(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    if (sp[p] >= 0) ++start[sp[p] + 1];
  }
  for (int64_t s = 0; s < num_slots; ++s) start[s + 1] += start[s];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) {
      if (sp[p] >= 0) order[next[sp[p]]++] = p;
    }
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  // Tasks with work: (g, s) for the shrink; their multiply-adds decide whether a second thread pays.
  std::vector<int64_t> shrink_tasks;
  int64_t macs = 0;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t s = 0; s < num_slots; ++s) {
      const int64_t r = rp[g * num_slots + s], n = start[s + 1] - start[s];
      if (r == 0 || n == 0) continue;
      shrink_tasks.push_back(g * num_slots + s);
      macs += n * r * (d_in + b[g].size(2));
    }
  }
  if (shrink_tasks.empty()) return;
  constexpr int64_t kSerialMacs = 1 << 17;  // below, one thread (a region's start costs more)

  // h[p, g, :r] = w[p] * scale[g, s] * x[t] @ a[g, s, :r].T, fp32. Blocks of up to four pairs by
  // four ranks (a slot's last block holds its last 1-3 pairs, no copies: in a decode step a slot
  // has a handful); a short rank block repeats its last rank and drops the copies.
  // 16-bit operands go through fp32 copies: a task's A rows, a block's x rows (every block
  // converts its own, in the thread that reads them, rather than the calling thread all of x first).
  float* const h = scratch(kH, pairs * groups * max_rank);  // (only the rows of routed pairs are read)
  const int64_t n_shrink = static_cast<int64_t>(shrink_tasks.size());
  at::parallel_for(0, n_shrink, macs < kSerialMacs ? n_shrink : 1, [&](int64_t begin, int64_t end) {
    float* const a_buf = direct ? nullptr : scratch(kARows, max_rank * d_in);
    float* const x_buf = direct ? nullptr : scratch(kXRows, 4 * d_in);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t gs = shrink_tasks[task];
      prefetch_rows(ap + gs * max_rank * d_in, 1, rp[gs] * d_in * sizeof(scalar_t), 0);
    }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t gs = shrink_tasks[task], g = gs / num_slots, s = gs % num_slots;
      const int64_t r = rp[gs], first = start[s], n = start[s + 1] - first;
      const float scale = cp[gs];
      const float* rows = as_float(ap + gs * max_rank * d_in, r * d_in, a_buf);
      for (int64_t i = 0; i < n; i += 4) {
        const int64_t m = std::min<int64_t>(4, n - i);
        const float* xs[4];
        int64_t ps[4];
        for (int64_t q = 0; q < m; ++q) {
          ps[q] = order[first + i + q];
          xs[q] = as_float(xp + (ps[q] / top_k) * d_in, d_in, x_buf + q * d_in);
        }
        for (int64_t j = 0; j < r; j += 4) {
          const float* as[4];
          for (int64_t q = 0; q < 4; ++q) as[q] = rows + std::min(j + q, r - 1) * d_in;
          float d[16];
          dot_rows(m, xs, as, d_in, d);
          for (int64_t q = 0; q < m; ++q) {
            const float f = wp[ps[q]] * scale;
            float* hp = h + (ps[q] * groups + g) * max_rank;
            for (int64_t k = 0; k < std::min<int64_t>(4, r - j); ++k) hp[j + k] = d[q * 4 + k] * f;
          }
        }
      }
    }
  });

  // out[t, c] += sum_j h[p, g, j] * b[g][s, j, c]. A task is one module's kCols columns (no two
  // write one element): every slot's pairs add into the task's columns of each token's row, fp32
  // outputs in place; 16-bit ones through fp32 sums, rounded into out once (a prefill-size fp32
  // step saves clearing and reading back a [T, 64] accumulator per task: about 10% of it). A
  // token's first pair in a module's expand order (`lead`) writes its sums, the rest add, so no
  // sums are cleared.
  std::vector<std::pair<int64_t, int64_t>> expand_tasks;  // (g, first column)
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c0 = 0; c0 < b[g].size(2); c0 += kCols) expand_tasks.emplace_back(g, c0);
  }
  const int64_t n_expand = static_cast<int64_t>(expand_tasks.size());
  std::vector<int64_t> lead(direct ? 0 : groups * tokens, -1);
  if constexpr (!direct) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t s = 0; s < num_slots; ++s) {
        if (rp[g * num_slots + s] == 0) continue;
        for (int64_t i = start[s]; i < start[s + 1]; ++i) {
          int64_t& first = lead[g * tokens + order[i] / top_k];
          if (first < 0) first = order[i];
        }
      }
    }
  }
  at::parallel_for(0, n_expand, macs < kSerialMacs ? n_expand : 1, [&](int64_t begin, int64_t end) {
    float* const sums = direct ? nullptr : scratch(kSums, tokens * kCols);
    float* const b_buf = direct ? nullptr : scratch(kTile, max_rank * kCols);
    for (int64_t task = begin; task < end; ++task) {
      const auto [g, c0] = expand_tasks[task];
      const int64_t d_out = b[g].size(2), cols = std::min(kCols, d_out - c0);
      for (int64_t s = 0; s < num_slots; ++s) {
        const int64_t r = rp[g * num_slots + s];
        if (r == 0 || start[s + 1] == start[s]) continue;
        prefetch_rows(b[g].data_ptr<scalar_t>() + s * max_rank * d_out + c0, r, cols * sizeof(scalar_t),
                      d_out * sizeof(scalar_t));
      }
    }
    for (int64_t task = begin; task < end; ++task) {
      const auto [g, c0] = expand_tasks[task];
      const int64_t d_out = b[g].size(2), cols = std::min(kCols, d_out - c0), ld = outs[g].stride(0);
      const scalar_t* bp = b[g].data_ptr<scalar_t>();
      scalar_t* op = outs[g].data_ptr<scalar_t>() + c0;
      for (int64_t s = 0; s < num_slots; ++s) {
        const int64_t r = rp[g * num_slots + s], first = start[s], n = start[s + 1] - first;
        if (r == 0 || n == 0) continue;
        const scalar_t* rows = bp + s * max_rank * d_out + c0;
        const float* bf;
        int64_t ldb = d_out;
        if constexpr (std::is_same_v<scalar_t, float>) {
          bf = rows;
        } else {
          for (int64_t j = 0; j < r; ++j) to_float(rows + j * d_out, cols, b_buf + j * kCols);
          bf = b_buf, ldb = kCols;
        }
        for (int64_t i = 0; i < n; i += kExpandPairs) {  // full blocks, the rest in one
          const int64_t m = std::min<int64_t>(kExpandPairs, n - i);
          const float* hs[8];
          float* dst[8];
          unsigned fresh = 0;
          for (int64_t q = 0; q < m; ++q) {
            const int64_t p = order[first + i + q], tok = p / top_k;
            hs[q] = h + (p * groups + g) * max_rank;
            if constexpr (direct) {
              dst[q] = op + tok * ld;
            } else {
              dst[q] = sums + tok * kCols;
              fresh |= static_cast<unsigned>(lead[g * tokens + tok] == p) << q;
            }
          }
          expand_pairs(m, bf, ldb, r, hs, cols, dst, fresh);
        }
      }
      if constexpr (!direct) {
        for (int64_t tok = 0; tok < tokens; ++tok) {
          if (lead[g * tokens + tok] >= 0) add_rounded(op + tok * ld, sums + tok * kCols, cols);
        }
      }
    }
  });
}

// x [T, D_in]; a [G, S, R, D_in]; b: G tensors [S, R, D_out_g]; outs: G tensors [T, D_out_g]
// (any row stride, unit column stride), all of x's dtype; slots int32 [T*K]; weights float32
// [T*K]; ranks int32 [G, S]; scales float32 [G, S]. Everything is checked here, so a caller
// that prepared its operands once need not check them again per call.
void lora_shared(const torch::Tensor& x, const torch::Tensor& a, const std::vector<torch::Tensor>& b,
                 const std::vector<torch::Tensor>& outs, const torch::Tensor& slots, const torch::Tensor& weights,
                 const torch::Tensor& ranks, const torch::Tensor& scales, int64_t top_k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [T, D_in]");
  TORCH_CHECK(a.dim() == 4 && a.is_contiguous() && a.scalar_type() == x.scalar_type() && a.size(3) == x.size(1),
              "lora_a must be a contiguous [G, S, R, D_in] of x's dtype");
  const int64_t groups = a.size(0), num_slots = a.size(1), max_rank = a.size(2), tokens = x.size(0);
  TORCH_CHECK(top_k >= 1 && slots.numel() == tokens * top_k && weights.numel() == tokens * top_k,
              "slots and weights must hold T * K pairs");
  TORCH_CHECK(slots.scalar_type() == at::kInt && slots.is_contiguous() && weights.scalar_type() == at::kFloat &&
                  weights.is_contiguous(), "slots must be contiguous int32, weights contiguous float32");
  TORCH_CHECK(ranks.scalar_type() == at::kInt && ranks.is_contiguous() && ranks.numel() == groups * num_slots &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == groups * num_slots,
              "ranks must be contiguous int32 [G, S], scales contiguous float32 [G, S]");
  TORCH_CHECK(static_cast<int64_t>(b.size()) == groups && static_cast<int64_t>(outs.size()) == groups,
              "one lora_b and one out per module");
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(b[g].dim() == 3 && b[g].is_contiguous() && b[g].scalar_type() == x.scalar_type() &&
                    b[g].size(0) == num_slots && b[g].size(1) == max_rank,
                "lora_b must be stored contiguous [S, R, D_out] of x's dtype");
    TORCH_CHECK(outs[g].dim() == 2 && outs[g].stride(1) == 1 && outs[g].scalar_type() == x.scalar_type() &&
                    outs[g].size(0) == tokens && outs[g].size(1) == b[g].size(2),
                "out must be [T, D_out] of x's dtype with unit column stride");
  }
  const int32_t* rp = ranks.data_ptr<int32_t>();
  for (int64_t i = 0; i < groups * num_slots; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] <= max_rank, "rank out of range");
  const int32_t* sp = slots.data_ptr<int32_t>();
  for (int64_t p = 0; p < tokens * top_k; ++p) TORCH_CHECK(sp[p] >= -1 && sp[p] < num_slots, "slot out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_shared", [&] {
    apply<scalar_t>(x, a, b, outs, slots, weights, ranks, scales, top_k);
  });
}

// The base projection of the G modules (a weight reordered for oneDNN by kernels/onednn.py, or a
// dense [sum D_out, D_in] one) and their LoRA deltas, in one call: y = x @ W.T + bias, then
// `lora_shared` into y's column slices, `sizes[g]` wide each. Returns y [T, sum D_out].
//
// Why: in a decode step of a small model each projection group is two calls from Python (the
// packed matmul, then the LoRA kernel) with a column split between them, about 10 us of Python
// and pybind a group against 10 to 30 us of kernel (hidden 256, 16 tokens, top-2).
torch::Tensor linear_lora(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          const std::vector<int64_t>& sizes, const torch::Tensor& a,
                          const std::vector<torch::Tensor>& b, const torch::Tensor& slots,
                          const torch::Tensor& weights, const torch::Tensor& ranks, const torch::Tensor& scales,
                          int64_t top_k) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == x.scalar_type() && weight.size(1) == x.size(1),
              "weight must be [sum D_out, D_in] of x's dtype");
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  TORCH_CHECK(total == weight.size(0), "sizes must sum to the weight's rows");
  torch::Tensor y;
  if (weight.is_mkldnn()) {
    // PyTorch's oneDNN linear (what kernels/onednn.py calls from Python), looked up once by name.
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                                 c10::string_view, c10::List<c10::optional<at::Scalar>>,
                                                 c10::optional<c10::string_view>)>();
    y = op.call(x, weight, bias, "none", c10::List<c10::optional<at::Scalar>>(), c10::nullopt);
  } else {
    y = at::linear(x, weight, bias);
  }
  const std::vector<torch::Tensor> outs = y.split_with_sizes(sizes, 1);
  lora_shared(x, a, b, outs, slots, weights, ranks, scales, top_k);
  return y;
}

// The dispatch sort of kernels.meta.build_dispatch on CPU, one call for its dozen small torch
// ops: pair ids ordered by slot (stable; slot -1 pairs last), pairs per slot, and the offsets of
// each slot's segment. slots int32 [N] in [-1, S); outputs int32, sorted [N], counts [S],
// offsets [S + 1], written in place.
void dispatch_sort(const torch::Tensor& slots, torch::Tensor& sorted, torch::Tensor& counts, torch::Tensor& offsets) {
  const int64_t n = slots.numel(), num_slots = counts.numel();
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&slots, &sorted, &counts, &offsets}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous(),
                "dispatch_sort takes contiguous int32 CPU vectors");
  }
  TORCH_CHECK(sorted.numel() == n && offsets.numel() == num_slots + 1, "sorted must hold N pairs, offsets S + 1");
  const int32_t* sp = slots.data_ptr<int32_t>();
  for (int64_t p = 0; p < n; ++p) TORCH_CHECK(sp[p] >= -1 && sp[p] < num_slots, "slot out of range");
  std::vector<int64_t> next(num_slots + 2, 0);  // next[s + 1]: where slot s's next pair goes
  for (int64_t p = 0; p < n; ++p) ++next[(sp[p] < 0 ? num_slots : sp[p]) + 1];
  int32_t* cp = counts.data_ptr<int32_t>();
  int32_t* op = offsets.data_ptr<int32_t>();
  for (int64_t s = 0; s < num_slots; ++s) cp[s] = static_cast<int32_t>(next[s + 1]);
  for (int64_t s = 0; s <= num_slots; ++s) next[s + 1] += next[s];
  for (int64_t s = 0; s <= num_slots; ++s) op[s] = static_cast<int32_t>(next[s]);
  int32_t* out = sorted.data_ptr<int32_t>();
  for (int64_t p = 0; p < n; ++p) out[next[sp[p] < 0 ? num_slots : sp[p]]++] = static_cast<int32_t>(p);
}

}  // namespace

void register_decode_ops(pybind11::module& m);  // decode_cpu.cpp, built into this extension

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_shared", &lora_shared, "per-token LoRA of G modules reading the same x (decode-size steps)");
  m.def("linear_lora", &linear_lora, "base projection of G modules plus their per-token LoRA, one call");
  m.def("dispatch_sort", &dispatch_sort, "pairs sorted by slot, per-slot counts and offsets");
  m.attr("lanes") = kW;
#if !defined(MOLORA_LANES)  // a forced-width build is this file alone
  register_decode_ops(m);
#endif
}
