// The decoder's small per-token ops on CPU, each one call instead of several torch ops: RMSNorm
// (with the residual add before it), Qwen3's q/k norm with RoPE, the KV-cache write, decode
// attention straight over the cache, the greedy sampler's argmax, and the gate router's routes.
// Built with lora_cpu.cpp into one extension by kernels/cpu_ext.py; called by molora_core.model
// and molora_core.routing through kernels/decode_cpu.py.
//
// Why: a decode step of a small model on CPU is bound by op count, not FLOPs. Each of these
// replaced 3 to 12 torch ops (RMSNorm alone is pow, mean, add, rsqrt, mul, mul; SDPA's flash
// kernel tiles 32+ queries where a decode row has one).
//
// Rounding follows the torch path it replaces (transformers' order), so 16-bit outputs match it
// to the last bit or one unit in the last place: normalize in fp32 and round to the dtype, then
// multiply by the weight in the dtype; RoPE rounds x * cos, the rotated x * sin and their sum.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
inline scalar_t round_to(float v) {
  return static_cast<scalar_t>(v);
}

template <typename scalar_t>
inline float inv_rms(const scalar_t* __restrict x, int64_t n, float eps) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    acc += v * v;
  }
  return 1.f / std::sqrt(acc / static_cast<float>(n) + eps);
}

// Rows per task: tiny steps (a decode step's 16 rows) stay on the calling thread.
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1, name,
              " must be a CPU [T, D] with unit column stride");
}

// out[t] = w * rms_normalize(x[t] (+ residual[t])); with a residual, sum[t] = x[t] + residual[t]
// (rounded to the dtype) is written too and normalized.
template <typename scalar_t>
void rms_norm_impl(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual, const torch::Tensor& weight,
                   double eps, torch::Tensor& out, torch::Tensor& sum) {
  const int64_t rows = x.size(0), d = x.size(1), ldx = x.stride(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
  const int64_t ldr = residual.has_value() ? residual->stride(0) : 0;
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* sp = rp ? sum.data_ptr<scalar_t>() : nullptr;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = xp + t * ldx;
      if (rp) {
        scalar_t* s = sp + t * d;
        const scalar_t* r = rp + t * ldr;
        for (int64_t i = 0; i < d; ++i) {
          s[i] = round_to<scalar_t>(static_cast<float>(row[i]) + static_cast<float>(r[i]));
        }
        row = s;
      }
      const float inv = inv_rms(row, d, e);
      scalar_t* o = op + t * d;
      for (int64_t i = 0; i < d; ++i) {
        const float normed = static_cast<float>(round_to<scalar_t>(static_cast<float>(row[i]) * inv));
        o[i] = round_to<scalar_t>(normed * static_cast<float>(wp[i]));
      }
    }
  });
}

// x [T, D] (any row stride), weight [D] of x's dtype; residual [T, D] or None. Returns
// (out, sum): sum = x + residual where a residual is given, else an empty tensor.
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                    const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(), "weight must be a contiguous [D] of x's dtype");
  if (residual.has_value()) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x's shape and dtype");
  }
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  auto sum = residual.has_value() ? torch::empty({x.size(0), x.size(1)}, x.options()) : torch::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(x, residual, weight, eps, out, sum);
  });
  return {out, sum};
}

// qk [T, Hq + Hk, D] (any token and head strides, unit last stride): heads [0, split) normalized
// with wq, the rest with wk (both undefined = no norm), then rotated by cos/sin [T, D] (contiguous;
// the rotate-half sign sits in sin's first half). Returns a contiguous [T, Hq + Hk, D].
template <typename scalar_t>
void qk_norm_rope_impl(const torch::Tensor& qk, int64_t split, const c10::optional<torch::Tensor>& wq,
                       const c10::optional<torch::Tensor>& wk, double eps, const torch::Tensor& cos,
                       const torch::Tensor& sin, torch::Tensor& out) {
  const int64_t tokens = qk.size(0), heads = qk.size(1), d = qk.size(2), half = d / 2;
  const int64_t s0 = qk.stride(0), s1 = qk.stride(1);
  const scalar_t* xp = qk.data_ptr<scalar_t>();
  const scalar_t* cp = cos.data_ptr<scalar_t>();
  const scalar_t* sp = sin.data_ptr<scalar_t>();
  const scalar_t* wqp = wq.has_value() ? wq->data_ptr<scalar_t>() : nullptr;
  const scalar_t* wkp = wk.has_value() ? wk->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, tokens * heads, row_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> n(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / heads, h = task % heads;
      const scalar_t* x = xp + t * s0 + h * s1;
      const scalar_t* w = h < split ? wqp : wkp;
      if (w) {
        const float inv = inv_rms(x, d, e);
        for (int64_t i = 0; i < d; ++i) {
          const float normed = static_cast<float>(round_to<scalar_t>(static_cast<float>(x[i]) * inv));
          n[i] = round_to<scalar_t>(normed * static_cast<float>(w[i]));
        }
      } else {
        std::copy(x, x + d, n.begin());
      }
      const scalar_t* c = cp + t * d;
      const scalar_t* s = sp + t * d;
      scalar_t* o = op + task * d;
      for (int64_t i = 0; i < d; ++i) {
        const float a = static_cast<float>(round_to<scalar_t>(static_cast<float>(n[i]) * static_cast<float>(c[i])));
        const float r = static_cast<float>(n[i < half ? i + half : i - half]);
        const float b = static_cast<float>(round_to<scalar_t>(r * static_cast<float>(s[i])));
        o[i] = round_to<scalar_t>(a + b);
      }
    }
  });
}

torch::Tensor qk_norm_rope(const torch::Tensor& qk, int64_t split, const c10::optional<torch::Tensor>& wq,
                           const c10::optional<torch::Tensor>& wk, double eps, const torch::Tensor& cos,
                           const torch::Tensor& sin) {
  TORCH_CHECK(qk.device().is_cpu() && qk.dim() == 3 && qk.stride(2) == 1 && qk.size(2) % 2 == 0,
              "qk must be a CPU [T, H, D_h] with unit last stride and even D_h");
  TORCH_CHECK(split >= 0 && split <= qk.size(1), "split must be in [0, H]");
  TORCH_CHECK(wq.has_value() == wk.has_value(), "give both norm weights or neither");
  for (const auto* w : {&wq, &wk}) {
    if (w->has_value()) {
      TORCH_CHECK((*w)->dim() == 1 && (*w)->is_contiguous() && (*w)->size(0) == qk.size(2) &&
                      (*w)->scalar_type() == qk.scalar_type(), "norm weights must be contiguous [D_h] of qk's dtype");
    }
  }
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->is_contiguous() && t->size(0) == qk.size(0) && t->size(1) == qk.size(2) &&
                    t->scalar_type() == qk.scalar_type(), "cos and sin must be contiguous [T, D_h] of qk's dtype");
  }
  auto out = torch::empty({qk.size(0), qk.size(1), qk.size(2)}, qk.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qk.scalar_type(), "qk_norm_rope", [&] {
    qk_norm_rope_impl<scalar_t>(qk, split, wq, wk, eps, cos, sin, out);
  });
  return out;
}

void check_cache(const torch::Tensor& c, const char* name) {
  TORCH_CHECK(c.device().is_cpu() && c.dim() == 4 && c.is_contiguous(), name,
              " must be a contiguous CPU [S, H_kv, N, D_h]");
}

void check_index(const torch::Tensor& i, int64_t n, int64_t limit, const char* name) {
  TORCH_CHECK(i.scalar_type() == at::kLong && i.dim() == 1 && i.is_contiguous() && i.size(0) == n, name,
              " must be a contiguous int64 [", n, "]");
  const int64_t* p = i.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(p[j] >= 0 && p[j] < limit, name, " holds ", p[j], ", outside [0, ", limit, ")");
  }
}

// k_cache[slots[t], :, positions[t]] = k[t] and the same for v; k, v [T, H_kv, D_h] (any token
// and head strides, unit last stride).
void kv_write(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
              const torch::Tensor& positions, const torch::Tensor& k, const torch::Tensor& v) {
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache must match");
  const int64_t tokens = k.size(0), heads = k_cache.size(1), n = k_cache.size(2), d = k_cache.size(3);
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == tokens && t->size(1) == heads && t->size(2) == d && t->stride(2) == 1 &&
                    t->scalar_type() == k_cache.scalar_type(), "k and v must be [T, H_kv, D_h] of the cache's dtype");
  }
  check_index(slots, tokens, k_cache.size(0), "slots");
  check_index(positions, tokens, n, "positions");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "kv_write", [&] {
    for (int pass = 0; pass < 2; ++pass) {
      const torch::Tensor& src = pass ? v : k;
      scalar_t* dst = (pass ? v_cache : k_cache).data_ptr<scalar_t>();
      const scalar_t* from = src.data_ptr<scalar_t>();
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t h = 0; h < heads; ++h) {
          std::copy(from + t * src.stride(0) + h * src.stride(1), from + t * src.stride(0) + h * src.stride(1) + d,
                    dst + ((sp[t] * heads + h) * n + pp[t]) * d);
        }
      }
    }
  });
}

// out[rows[i], h] = softmax(scale * q[i, h] . K) V over keys [lo, lens[i]) of KV slot slots[i],
// K, V its cache rows for kv head h / (H / H_kv), lo = max(0, lens[i] - window) (window 0: none).
// One task per (row, kv head): each key and value row is read once for the group's query heads.
template <typename scalar_t>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& slots, const torch::Tensor& lens, const torch::Tensor& rows,
                           double scale, int64_t window, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = k_cache.size(1), n = k_cache.size(2), group = heads / kv_heads;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), scores, acc(group * d), denom(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const int64_t len = lp[b], lo = window > 0 ? std::max<int64_t>(0, len - window) : 0, keys = len - lo;
      const scalar_t* kbase = kp + ((sp[b] * kv_heads + kvh) * n + lo) * d;
      const scalar_t* vbase = vp + ((sp[b] * kv_heads + kvh) * n + lo) * d;
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* qrow = qp + b * qs0 + (kvh * group + g) * qs1;
        for (int64_t i = 0; i < d; ++i) qf[g * d + i] = static_cast<float>(qrow[i]) * sc;
      }
      scores.assign(group * keys, 0.f);
      for (int64_t j = 0; j < keys; ++j) {
        const scalar_t* krow = kbase + j * d;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * d;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < d; ++i) dot += qg[i] * static_cast<float>(krow[i]);
          scores[g * keys + j] = dot;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * keys;
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < keys; ++j) m = sg[j] > m ? sg[j] : m;
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < keys; ++j) {
          sg[j] = std::exp(sg[j] - m);
          total += sg[j];
        }
        denom[g] = total;
      }
      for (int64_t j = 0; j < keys; ++j) {
        const scalar_t* vrow = vbase + j * d;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * keys + j];
          float* a = acc.data() + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += p * static_cast<float>(vrow[i]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* o = op + rp[b] * os0 + (kvh * group + g) * os1;
        const float inv = 1.f / denom[g];
        for (int64_t i = 0; i < d; ++i) o[i] = round_to<scalar_t>(acc[g * d + i] * inv);
      }
    }
  });
}

// q [B, H, D_h] (any row and head strides, unit last stride); caches [S, H_kv, N, D_h]; slots,
// lens, rows int64 [B] (lens: context length with this step's token, already in the cache);
// out [R, H, D_h] (unit last stride), rows[i] < R. Writes out in place.
void decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& slots, const torch::Tensor& lens, const torch::Tensor& rows, double scale,
                      int64_t window, torch::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1,
              "q must be a CPU [B, H, D_h] with unit last stride");
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must match");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(), "q, the caches and out must share a dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(1) == 0,
              "q's head dim must match the cache's, and its heads be a multiple of the cache's");
  TORCH_CHECK(out.dim() == 3 && out.size(1) == q.size(1) && out.size(2) == q.size(2) && out.stride(2) == 1,
              "out must be [R, H, D_h] with unit last stride");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  const int64_t batch = q.size(0);
  check_index(slots, batch, k_cache.size(0), "slots");
  check_index(rows, batch, out.size(0), "rows");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.dim() == 1 && lens.is_contiguous() && lens.size(0) == batch,
              "lens must be a contiguous int64 [B]");
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= k_cache.size(2), "lens holds ", lp[b], ", outside [1, ", k_cache.size(2), "]");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_attention_impl<scalar_t>(q, k_cache, v_cache, slots, lens, rows, scale, window, out);
  });
}

// Index of each row's largest value, the first one where several tie; a row holding NaN gives its
// first NaN (torch.argmax's rule). torch's CPU argmax tracks indices element by element, 10-20x
// slower than a max reduction (16 x 151,936 fp32 logits: about 1 ms); here a vectorized max, then
// a scan for its first occurrence.
int64_t first_max(const float* __restrict row, int64_t v) {
  float m = -std::numeric_limits<float>::infinity(), poison = 0.f;
#pragma omp simd reduction(max : m) reduction(+ : poison)
  for (int64_t i = 0; i < v; ++i) {
    m = row[i] > m ? row[i] : m;
    poison += row[i] - row[i];  // NaN once the row holds a NaN or an infinity
  }
  if (poison != poison) {  // rare: the exact scalar rule
    int64_t best = 0;
    for (int64_t i = 0; i < v; ++i) {
      if (row[i] != row[i]) return i;
      if (row[i] > row[best]) best = i;
    }
    return best;
  }
  constexpr int64_t kBlock = 64;
  for (int64_t b0 = 0; b0 < v; b0 += kBlock) {  // the block holding the first m, found vectorized
    const int64_t b1 = std::min(v, b0 + kBlock);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t i = b0; i < b1; ++i) hit |= row[i] == m;
    if (hit) {
      for (int64_t i = b0; i < b1; ++i) {
        if (row[i] == m) return i;
      }
    }
  }
  return 0;
}

torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat &&
                  x.size(1) > 0, "x must be a non-empty float32 CPU [B, V] with unit column stride");
  const int64_t rows = x.size(0), v = x.size(1), ld = x.stride(0);
  auto out = torch::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      op[r] = first_max(xp + r * ld, v);
    }
  });
  return out;
}

// True where a ranks above b for top-k: NaN above every number, as torch.topk orders them.
inline bool ranks_above(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

template <typename scalar_t>
void gate_route_impl(const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& bias, float eps,
                     int64_t top_k, const torch::Tensor& lookup, torch::Tensor& slots, torch::Tensor& weights) {
  const int64_t tokens = hidden.size(0), d = hidden.size(1), ld = hidden.stride(0), adapters = weight.size(0);
  const int64_t lds = slots.stride(0), ldw = weights.stride(0);
  const scalar_t* hp = hidden.data_ptr<scalar_t>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const int32_t* lp = lookup.data_ptr<int32_t>();
  int32_t* sp = slots.data_ptr<int32_t>();
  float* op = weights.data_ptr<float>();
  at::parallel_for(0, tokens, row_grain(d * adapters), [&](int64_t begin, int64_t end) {
    std::vector<float> normed(d), logits(adapters);
    std::vector<int64_t> chosen(top_k);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = hp + t * ld;
      const float inv = inv_rms(row, d, eps);
      for (int64_t i = 0; i < d; ++i) normed[i] = static_cast<float>(row[i]) * inv;
      for (int64_t a = 0; a < adapters; ++a) {
        const float* w = wp + a * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < d; ++i) acc += normed[i] * w[i];
        logits[a] = acc + bp[a];
      }
      // The top_k by selection (A is a handful): each pass takes the highest not yet taken, the
      // lower index on a tie.
      for (int64_t j = 0; j < top_k; ++j) {
        int64_t best = -1;
        for (int64_t a = 0; a < adapters; ++a) {
          if (std::find(chosen.begin(), chosen.begin() + j, a) != chosen.begin() + j) continue;
          if (best < 0 || ranks_above(logits[a], logits[best])) best = a;
        }
        chosen[j] = best;
      }
      const float top = logits[chosen[0]];
      float total = 0.f;
      for (int64_t j = 0; j < top_k; ++j) total += op[t * ldw + j] = std::exp(logits[chosen[j]] - top);
      for (int64_t j = 0; j < top_k; ++j) {
        op[t * ldw + j] /= total;
        sp[t * lds + j] = lp[chosen[j]];
      }
    }
  });
}

// The gate router's routes for hidden [T, D] (unit column stride): per token, logits = W @
// rms_normalize(h) + b over its A adapters (W float32 [A, D], b float32 [A]), their top_k,
// softmax-normalized, each adapter mapped to its hot-set slot by lookup int32[A]. Returns slots
// int32 [T, top_k] and weights float32 [T, top_k]: GateRouter.forward plus the lookup, one call
// where they are about ten torch ops. With `out` (slots int32 and weights float32, [T, >= top_k],
// unit column stride, any row stride: rows of a routing plan's buffers), the routes go into
// their first top_k columns, and those are returned.
std::vector<torch::Tensor> gate_route(const torch::Tensor& hidden, const torch::Tensor& weight,
                                      const torch::Tensor& bias, double eps, int64_t top_k,
                                      const torch::Tensor& lookup, const c10::optional<std::vector<torch::Tensor>>& out) {
  check_rows(hidden, "hidden");
  const int64_t adapters = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat &&
                  weight.size(1) == hidden.size(1), "the gate weight must be a contiguous float32 [A, D]");
  TORCH_CHECK(bias.dim() == 1 && bias.numel() == adapters && bias.is_contiguous() && bias.scalar_type() == at::kFloat,
              "the gate bias must be a contiguous float32 [A]");
  TORCH_CHECK(lookup.dim() == 1 && lookup.numel() == adapters && lookup.is_contiguous() &&
                  lookup.scalar_type() == at::kInt && lookup.device().is_cpu(),
              "lookup must be a contiguous int32 [A]");
  TORCH_CHECK(top_k >= 1 && top_k <= adapters, "top_k must be in [1, A]");
  torch::Tensor slots, weights;
  if (out.has_value()) {
    TORCH_CHECK(out->size() == 2, "out must be (slots, weights)");
    slots = (*out)[0], weights = (*out)[1];
    for (const torch::Tensor* t : {&slots, &weights}) {
      TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->size(0) == hidden.size(0) && t->size(1) >= top_k &&
                      t->stride(1) == 1, "out tensors must be CPU [T, >= top_k] with unit column stride");
    }
    TORCH_CHECK(slots.scalar_type() == at::kInt && weights.scalar_type() == at::kFloat,
                "out must be (int32 slots, float32 weights)");
  } else {
    slots = torch::empty({hidden.size(0), top_k}, hidden.options().dtype(at::kInt));
    weights = torch::empty({hidden.size(0), top_k}, hidden.options().dtype(at::kFloat));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "gate_route", [&] {
    gate_route_impl<scalar_t>(hidden, weight, bias, static_cast<float>(eps), top_k, lookup, slots, weights);
  });
  return out.has_value() ? std::vector<torch::Tensor>{slots.narrow(1, 0, top_k), weights.narrow(1, 0, top_k)}
                         : std::vector<torch::Tensor>{slots, weights};
}

}  // namespace

void register_decode_ops(pybind11::module& m) {
  m.def("gate_route", &gate_route, "the gate router's top-k slots and weights per token", py::arg("hidden"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("top_k"), py::arg("lookup"), py::arg("out") = py::none());
  m.def("rms_norm", &rms_norm, "RMSNorm of rows, optionally of x + residual (returns out, sum)");
  m.def("qk_norm_rope", &qk_norm_rope, "q/k RMSNorm per head, then RoPE");
  m.def("kv_write", &kv_write, "write keys and values into the KV cache");
  m.def("decode_attention", &decode_attention, "one-token attention over the KV cache");
  m.def("argmax_rows", &argmax_rows, "index of each row's maximum (the first; NaN first where a row has one)");
}
