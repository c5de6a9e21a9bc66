// Per-token LoRA of a decode-size step on CPU, for G modules that read the same x (q/k/v,
// gate/up): the compiled twin of kernels.lora_ref.lora_apply_shared_ref. Built on first use by
// kernels/cpu_ext.py (torch.utils.cpp_extension), with decode_cpu.cpp; launched by kernels/lora_cpu.py.
//
// Semantics: outs[g][t] += sum_k w[t*K+k] * scales[g, s] * (x[t] @ a[g, s, :r].T) @ b[g][s, :r, :]
// with s = slots[t*K+k], r = ranks[g, s]; pairs with s == -1 add nothing.
//
// Why: a decode step's LoRA in eager torch is a few tiny matmuls and scalings per projection
// group, each an op with its own dispatch, and (dense path) every token through every slot in
// use. Here each group is one call that walks each slot's own pairs: the work of the routed
// pairs only, accumulated in fp32, rounded once into out.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

template <typename scalar_t>
inline float dot(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return acc;
}

// Four dot products of one row with four others at once: four independent accumulator chains,
// and each load of `row` serves four multiply-adds.
template <typename scalar_t>
inline void dot4(const scalar_t* __restrict row, const scalar_t* __restrict x0, const scalar_t* __restrict x1,
                 const scalar_t* __restrict x2, const scalar_t* __restrict x3, int64_t n, float* out) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(row[i]);
    a0 += v * static_cast<float>(x0[i]);
    a1 += v * static_cast<float>(x1[i]);
    a2 += v * static_cast<float>(x2[i]);
    a3 += v * static_cast<float>(x3[i]);
  }
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

constexpr int64_t kCols = 256;  // output columns of one expand task

template <typename scalar_t>
void apply(const torch::Tensor& x, const torch::Tensor& a, const std::vector<torch::Tensor>& b,
           const std::vector<torch::Tensor>& outs, const torch::Tensor& slots, const torch::Tensor& weights,
           const torch::Tensor& ranks, const torch::Tensor& scales, int64_t top_k) {
  const int64_t d_in = x.size(1), groups = a.size(0), num_slots = a.size(1), max_rank = a.size(2);
  const int64_t pairs = slots.size(0), tokens = x.size(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const int32_t* sp = slots.data_ptr<int32_t>();
  const float* wp = weights.data_ptr<float>();
  const int32_t* rp = ranks.data_ptr<int32_t>();
  const float* cp = scales.data_ptr<float>();

  std::vector<std::vector<int64_t>> by_slot(num_slots);  // pair ids per slot
  for (int64_t p = 0; p < pairs; ++p) {
    if (sp[p] >= 0) by_slot[sp[p]].push_back(p);
  }
  // h[p, g, :r] = w[p] * scale[g, s] * x[t] @ a[g, s, :r].T, fp32
  std::vector<float> h(pairs * groups * max_rank, 0.f);
  at::parallel_for(0, num_slots * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / groups, g = task % groups;
      const int64_t r = rp[g * num_slots + s];
      if (by_slot[s].empty() || r == 0) continue;
      const float scale = cp[g * num_slots + s];
      const scalar_t* rows = ap + (g * num_slots + s) * max_rank * d_in;
      const auto& ps = by_slot[s];
      const int64_t n = static_cast<int64_t>(ps.size());
      for (int64_t j = 0; j < r; ++j) {
        const scalar_t* row = rows + j * d_in;
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) {
          float d[4];
          dot4(row, xp + (ps[i] / top_k) * d_in, xp + (ps[i + 1] / top_k) * d_in, xp + (ps[i + 2] / top_k) * d_in,
               xp + (ps[i + 3] / top_k) * d_in, d_in, d);
          for (int64_t q = 0; q < 4; ++q) h[(ps[i + q] * groups + g) * max_rank + j] = d[q] * wp[ps[i + q]] * scale;
        }
        for (; i < n; ++i) {
          h[(ps[i] * groups + g) * max_rank + j] = dot(xp + (ps[i] / top_k) * d_in, row, d_in) * wp[ps[i]] * scale;
        }
      }
    }
  });
  // out[t, c] += sum_j h[p, g, j] * b[g][s, j, c]. Tasks split the columns (no two write one
  // element); within a task, each slot's lora_b rows stream in order, four at a time, into fp32
  // accumulators of the task's columns for every token, rounded into out once.
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t d_out = b[g].size(2), ld = outs[g].stride(0);
    const scalar_t* bp = b[g].data_ptr<scalar_t>();
    scalar_t* op = outs[g].data_ptr<scalar_t>();
    at::parallel_for(0, (d_out + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(tokens * kCols);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t c0 = chunk * kCols, cols = std::min(kCols, d_out - c0);
        std::vector<bool> touched(tokens, false);
        for (int64_t s = 0; s < num_slots; ++s) {
          const int64_t r = rp[g * num_slots + s];
          if (by_slot[s].empty() || r == 0) continue;
          const scalar_t* rows = bp + s * max_rank * d_out + c0;
          for (int64_t p : by_slot[s]) {
            const int64_t tok = p / top_k;
            if (!touched[tok]) {
              touched[tok] = true;
              const scalar_t* out = op + tok * ld + c0;
              float* a = acc.data() + tok * kCols;
              for (int64_t c = 0; c < cols; ++c) a[c] = static_cast<float>(out[c]);
            }
          }
          int64_t j = 0;
          for (; j + 4 <= r; j += 4) {
            const scalar_t *b0 = rows + j * d_out, *b1 = b0 + d_out, *b2 = b1 + d_out, *b3 = b2 + d_out;
            for (int64_t p : by_slot[s]) {
              const float* hp = h.data() + (p * groups + g) * max_rank + j;
              const float h0 = hp[0], h1 = hp[1], h2 = hp[2], h3 = hp[3];
              float* __restrict a = acc.data() + (p / top_k) * kCols;
#pragma omp simd
              for (int64_t c = 0; c < cols; ++c) {
                a[c] += h0 * static_cast<float>(b0[c]) + h1 * static_cast<float>(b1[c]) +
                        h2 * static_cast<float>(b2[c]) + h3 * static_cast<float>(b3[c]);
              }
            }
          }
          for (; j < r; ++j) {
            const scalar_t* b0 = rows + j * d_out;
            for (int64_t p : by_slot[s]) {
              const float h0 = h[(p * groups + g) * max_rank + j];
              float* __restrict a = acc.data() + (p / top_k) * kCols;
#pragma omp simd
              for (int64_t c = 0; c < cols; ++c) a[c] += h0 * static_cast<float>(b0[c]);
            }
          }
        }
        for (int64_t tok = 0; tok < tokens; ++tok) {
          if (!touched[tok]) continue;
          scalar_t* out = op + tok * ld + c0;
          const float* a = acc.data() + tok * kCols;
          for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<scalar_t>(a[c]);
        }
      }
    });
  }
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
  m.def("dispatch_sort", &dispatch_sort, "pairs sorted by slot, per-slot counts and offsets");
  register_decode_ops(m);
}
