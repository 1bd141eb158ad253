// Round step 3 on vLLM's CPU backend: tree attention read in place from the paged cache.
//
// vLLM's CPU attention kernel takes no mask, so tree steps need their own kernel. The Python path
// (vllm_ddtree.tree_attention.tree_attention_dense) gathers each request's context into a contiguous
// copy per layer, then runs torch's SDPA; the gather and its Python ops cost several times the math.
// This kernel walks each request's blocks where vLLM keeps them ("cpu" layout: per block and KV head,
// the keys transposed [head_dim, block_size], then the values [block_size, head_dim]) with an online
// softmax in float32, one work item per (request, query head), spread over torch's intra-op threads.
//
// Visibility is vllm_ddtree.tree_attention's contract: a query row sees its request's committed
// context, then, for the request's last tree_rows rows, the tree keys whose bit is set in the row's
// packed ancestor row, and, for any other row, the keys up to its own position.
//
// The exponential is a polynomial the compiler vectorises (the masked scores are clamped far below
// any row's maximum, so they weigh about 1e-38 instead of exactly 0).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline float load(T x) { return static_cast<float>(x); }

template <typename T>
inline void store(T* dst, float x) { *dst = static_cast<T>(x); }

// exp(x) for x <= 0 (scores minus their row maximum), about 2 ulp; -inf and anything below -87 give
// exp(-87). Plain arithmetic and integer casts only, so the loops over it vectorise.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = static_cast<float>(static_cast<int>(x * 1.44269504f - 0.5f));  // round(x / ln 2), x <= 0
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;                     // x - n ln 2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

typedef float vec8 __attribute__((vector_size(32)));  // 8 floats: one AVX register

inline vec8 load8(const float* p) { vec8 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof(v)); }

constexpr int ROWS = 4;  // query rows per score tile: 4 rows x 8 keys of accumulators, in registers

// scores[i][t] = q[i] . keys[:, t] for ROWS rows and keys t < n (rounded up to 8: the block holds them),
// keys transposed [head_dim][page] as vLLM's CPU cache holds them.
template <int D>
inline void score_tile(const float* q, const float* keys, int64_t page, int64_t n, float* scores) {
  for (int64_t t = 0; t < n; t += 8) {
    vec8 acc[ROWS] = {};
    for (int d = 0; d < D; ++d) {
      const vec8 k = load8(keys + d * page + t);
      for (int i = 0; i < ROWS; ++i) acc[i] += q[i * D + d] * k;
    }
    for (int i = 0; i < ROWS; ++i) store8(scores + i * page + t, acc[i]);
  }
}

// acc[:] = acc[:] * rescale + sum_t p[t] values[t][:] for one query row, values [page][head_dim].
template <int D>
inline void weigh_values(const float* p, const float* values, int64_t n, float rescale, float* acc) {
  vec8 out[D / 8];
  for (int c = 0; c < D / 8; ++c) out[c] = load8(acc + 8 * c) * rescale;
  for (int64_t t = 0; t < n; ++t) {
    const float w = p[t];
    const float* v = values + t * D;
    for (int c = 0; c < D / 8; ++c) out[c] += w * load8(v + 8 * c);
  }
  for (int c = 0; c < D / 8; ++c) store8(acc + 8 * c, out[c]);
}

template <typename scalar_t, int D>
void tree_attention_paged(const torch::Tensor& query, const torch::Tensor& kv_cache,
                          const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                          const torch::Tensor& block_table, const torch::Tensor& tree_bits,
                          const torch::Tensor& tree_rows, double scale, torch::Tensor& out) {
  const int64_t num_requests = seq_lens.size(0), num_heads = query.size(1);
  const int64_t kv_heads = kv_cache.size(1), page = kv_cache.size(2);
  const int64_t group = num_heads / kv_heads;
  const int64_t tree_rows_max = tree_bits.size(1), words = tree_bits.size(2);
  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  const scalar_t* cache_ptr = kv_cache.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* bits = tree_bits.data_ptr<int32_t>();
  const int32_t* rows_in_tree = tree_rows.data_ptr<int32_t>();
  const int64_t q_row = query.stride(0), q_head = query.stride(1);
  const int64_t o_row = out.stride(0), o_head = out.stride(1);
  const int64_t c_block = kv_cache.stride(0), c_head = kv_cache.stride(1);
  const int64_t t_row = block_table.stride(0);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float fscale = static_cast<float>(scale);
  constexpr bool in_place = std::is_same<scalar_t, float>::value;  // other dtypes: a float copy per block

  at::parallel_for(0, num_requests * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q, acc, row_max, row_sum, scores, keys, values;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / num_heads, h = item % num_heads, kv_head = h / group;
      const int64_t q0 = starts[r], q_len = starts[r + 1] - q0;
      if (q_len <= 0) continue;
      const int64_t padded = (q_len + ROWS - 1) / ROWS * ROWS;
      const int64_t seq_len = lens[r], context = seq_len - q_len;
      const int64_t tree_n = rows_in_tree[r];
      const int64_t tree_row0 = q_len - tree_n, tree_key0 = seq_len - tree_n;
      q.assign(padded * D, 0.0f);
      acc.assign(q_len * D, 0.0f);
      row_max.assign(q_len, neg_inf);
      row_sum.assign(q_len, 0.0f);
      scores.resize(padded * page);
      if (!in_place) {
        keys.resize(D * page);
        values.resize(page * D);
      }
      for (int64_t i = 0; i < q_len; ++i)
        for (int d = 0; d < D; ++d) q[i * D + d] = load(q_ptr[(q0 + i) * q_row + h * q_head + d]) * fscale;

      const int64_t num_blocks = (seq_len + page - 1) / page;
      for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t key0 = b * page, n = std::min(page, seq_len - key0);
        const int64_t n8 = (n + 7) / 8 * 8;  // within the block: page is a multiple of 16
        const scalar_t* base = cache_ptr + static_cast<int64_t>(table[r * t_row + b]) * c_block + kv_head * c_head;
        const float* block_keys;
        const float* block_values;
        if constexpr (in_place) {
          block_keys = reinterpret_cast<const float*>(base);
          block_values = reinterpret_cast<const float*>(base) + D * page;
        } else {
          for (int d = 0; d < D; ++d)
            for (int64_t t = 0; t < n8; ++t) keys[d * page + t] = load(base[d * page + t]);
          for (int64_t t = 0; t < n * D; ++t) values[t] = load(base[D * page + t]);
          block_keys = keys.data();
          block_values = values.data();
        }
        for (int64_t i0 = 0; i0 < padded; i0 += ROWS)
          score_tile<D>(q.data() + i0 * D, block_keys, page, n8, scores.data() + i0 * page);

        for (int64_t i = 0; i < q_len; ++i) {
          float* s = scores.data() + i * page;
          const bool tree_row = tree_n > 0 && i >= tree_row0;
          const int32_t* ancestors = tree_row ? bits + (r * tree_rows_max + (i - tree_row0)) * words : nullptr;
          // Keys past the row's own position (causal), except the tree's, which its ancestor bits pick.
          const int64_t causal_end = std::min(n, context + i + 1 - key0);
          float block_max = neg_inf;
          for (int64_t t = 0; t < n; ++t) {
            const int64_t j = key0 + t;
            bool visible = t < causal_end;
            if (tree_row && j >= tree_key0) {
              const int64_t node = j - tree_key0;
              visible = (ancestors[node >> 5] >> (node & 31)) & 1;
            }
            s[t] = visible ? s[t] : neg_inf;
            block_max = s[t] > block_max ? s[t] : block_max;
          }
          if (block_max == neg_inf) continue;
          const float new_max = block_max > row_max[i] ? block_max : row_max[i];
          const float rescale = row_max[i] == neg_inf ? 0.0f : exp_nonpositive(row_max[i] - new_max);
          row_max[i] = new_max;
          float sum = 0.0f;
          for (int64_t t = 0; t < n; ++t) {
            s[t] = exp_nonpositive(s[t] - new_max);
            sum += s[t];
          }
          row_sum[i] = row_sum[i] * rescale + sum;
          weigh_values<D>(s, block_values, n, rescale, acc.data() + i * D);
        }
      }
      for (int64_t i = 0; i < q_len; ++i) {
        const float inverse = row_sum[i] > 0.0f ? 1.0f / row_sum[i] : 0.0f;
        scalar_t* o = out_ptr + (q0 + i) * o_row + h * o_head;
        for (int d = 0; d < D; ++d) store(o + d, acc[i * D + d] * inverse);
      }
    }
  });
}

}  // namespace

void tree_attention_cpu(torch::Tensor query, torch::Tensor kv_cache, torch::Tensor query_start_loc,
                        torch::Tensor seq_lens, torch::Tensor block_table, torch::Tensor tree_bits,
                        torch::Tensor tree_rows, double scale, torch::Tensor out) {
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == query.scalar_type(),
              "query, cache and output must share one dtype");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query and output need a contiguous head dim");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.stride(3) == 1 && kv_cache.stride(2) == kv_cache.size(3),
              "the cache must be [blocks, kv_heads, block_size, 2 * head_dim], contiguous per block and head");
  TORCH_CHECK(kv_cache.size(3) == 2 * query.size(2), "cache rows must hold a key and a value");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0, "query heads must group over KV heads");
  for (const auto* t : {&query_start_loc, &seq_lens, &block_table, &tree_bits, &tree_rows})
    TORCH_CHECK(t->scalar_type() == torch::kInt32 && t->is_contiguous(), "metadata must be contiguous int32");
  TORCH_CHECK(kv_cache.size(2) % 16 == 0, "the KV block size must be a multiple of 16");
  const int64_t head_dim = query.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, query.scalar_type(),
                                  "tree_attention_cpu", [&] {
    auto run = [&](auto dim) {
      tree_attention_paged<scalar_t, decltype(dim)::value>(query, kv_cache, query_start_loc, seq_lens, block_table,
                                                           tree_bits, tree_rows, scale, out);
    };
    switch (head_dim) {  // HEAD_SIZES in vllm_ddtree/tree_attention.py
      case 32: run(std::integral_constant<int, 32>()); break;
      case 64: run(std::integral_constant<int, 64>()); break;
      case 80: run(std::integral_constant<int, 80>()); break;
      case 96: run(std::integral_constant<int, 96>()); break;
      case 128: run(std::integral_constant<int, 128>()); break;
      case 256: run(std::integral_constant<int, 256>()); break;
      default: TORCH_CHECK(false, "head size ", head_dim, " is not one the kernel is built for");
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention_cpu", &tree_attention_cpu, "tree attention over vLLM's paged CPU cache");
}
