// edgelab's CPU kernel for SAM's attention with its decomposed relative-position bias (notebook 01,
// section "Attention variants"; loaded by edgelab/cpu_kernel.py):
//   out = softmax(q k^T * scale + B) v,   B[i, (a, j)] = rel_h[i, a] + rel_w[i, j]
// for keys laid out row-major on an (a, j) grid. One task is one head and a block of queries:
//   0. rel_h, rel_w of the head          small sgemms on SAM's tables (bias_factors; for windows
//                                      16-lane accumulators, bias_factors_small), once per head
//   1. S = scale * q_block k_block^T   one sgemm (the BLAS PyTorch links)
//   2. S += B, row max, exp, row sum   one pass over S while it sits in the core's cache
//   3. out_block += S v                one sgemm
// over blocks of keys with FlashAttention's online softmax (a running max and sum per query, the
// output rescaled when the max grows), then out_block / sum. B never exists beyond one block: each
// of its rows is built from H + W numbers.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

static inline float fast_exp(float x) {  // x <= 0; Cephes-style polynomial, about 1 ulp; vectorizes
  x = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { int32_t i; float f; } two_n;
  two_n.i = (static_cast<int32_t>(n) + 127) << 23;
  return p * two_n.f;
}

// One block of keys [k0, k0 + cols) against `rows` queries, scores s (rows x cols): add the bias,
// then FlashAttention's online-softmax step. Per query: the new running max m, s <- exp(s - m),
// the running sum l, and corr[i] = exp(m_old - m), the factor that rescales what was summed before.
static void softmax_block(float* s, int rows, int cols, int k0, int kh, int kw, const float* rh,
                          const float* rw, int ldr, float* m, float* l, float* corr, const int32_t* ih,
                          const int32_t* iw) {
  const bool by_rows = kw >= 16 && k0 % kw == 0 && cols % kw == 0;
  for (int i = 0; i < rows; ++i) {
    float* row = s + (int64_t)i * cols;
    const float* h = rh + (int64_t)i * ldr;  // rel_h of query i (kh values); its rel_w: rw + i * ldr
    const float* w = rw + (int64_t)i * ldr;
    float mx = m[i];
    if (by_rows) {  // whole vectors per key row: one value of rel_h, the vector rel_w
      for (int a = 0; a < cols / kw; ++a) {
        float* seg = row + (int64_t)a * kw;
        const float b = h[k0 / kw + a];
        float mm = mx;
#pragma omp simd reduction(max : mm)
        for (int j = 0; j < kw; ++j) {
          float v = seg[j] + b + w[j];
          seg[j] = v;
          mm = v > mm ? v : mm;
        }
        mx = mm;
      }
    } else {  // short key rows (windows): gather both factors along the block instead
      float mm = mx;
#pragma omp simd reduction(max : mm)
      for (int c = 0; c < cols; ++c) {
        float v = row[c] + h[ih[k0 + c]] + w[iw[k0 + c]];
        row[c] = v;
        mm = v > mm ? v : mm;
      }
      mx = mm;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < cols; ++j) {
      float e = fast_exp(row[j] - mx);
      row[j] = e;
      sum += e;
    }
    corr[i] = k0 == 0 ? 0.f : fast_exp(m[i] - mx);
    l[i] = l[i] * corr[i] + sum;
    m[i] = mx;
  }
}

// rel_h and rel_w of one head, from SAM's tables (section "Attention by hand"):
//   rel_h[(r, j), a] = q_(r,j) . rh_table[r, a],   rel_w[(r, j), c] = q_(r,j) . rw_table[j, c]
// as 2 x grid-side small sgemms straight from q's rows (a grid row of queries is contiguous, a grid
// column is every W-th query), into one (N x (Hk + Wk)) buffer: query i's rel_h, then its rel_w.
static void bias_factors(const float* qh, int ldq, int gh, int gw, int d, const float* rht, int hk,
                         const float* rwt, int wk, float* rel_h, float* rel_w, int ldr) {
  const float one = 1.f, zero = 0.f;
  const int ldq_col = ldq * gw, ldr_col = ldr * gw;
  for (int r = 0; r < gh; ++r)  // (gw x hk) = q rows of grid row r (gw x d) . rh_table[r]^T
    sgemm_("T", "N", &hk, &gw, &d, &one, rht + (int64_t)r * hk * d, &d, qh + (int64_t)r * gw * ldq, &ldq, &zero,
           rel_h + (int64_t)r * gw * ldr, &ldr);
  for (int j = 0; j < gw; ++j)  // (gh x wk) = q rows of grid column j (gh x d) . rw_table[j]^T
    sgemm_("T", "N", &wk, &gh, &d, &one, rwt + (int64_t)j * wk * d, &d, qh + (int64_t)j * ldq, &ldq_col, &zero,
           rel_w + (int64_t)j * ldr, &ldr_col);
}

// The same for windows (tables of at most 16 positions), where 2 x grid-side sgemms of 14 x 14 x d
// cost more in calls than in arithmetic: the tables transposed and zero-padded to (d, 16), so each
// query's rel_h (or rel_w) is one 16-lane accumulator, G queries of a grid row at a time (2G
// independent chains of FMAs). rhtT: (gh, d, 16); rwtT: (gw, d, 16).
template <int G>
static void small_factors(const float* qh, int ldq, int r, int j0, int gw, int d, const float* rhtT, int hk,
                          const float* rwtT, int wk, float* rel, int ldr) {
  float ah[G][16] = {}, aw[G][16] = {};
  const float* th = rhtT + (int64_t)r * d * 16;
  for (int c = 0; c < d; ++c)
    for (int u = 0; u < G; ++u) {
      const float x = qh[(int64_t)(r * gw + j0 + u) * ldq + c];
      const float* tw = rwtT + ((int64_t)(j0 + u) * d + c) * 16;
#pragma omp simd
      for (int a = 0; a < 16; ++a) {
        ah[u][a] += x * th[c * 16 + a];
        aw[u][a] += x * tw[a];
      }
    }
  for (int u = 0; u < G; ++u) {
    float* out = rel + (int64_t)(r * gw + j0 + u) * ldr;
    for (int a = 0; a < hk; ++a) out[a] = ah[u][a];
    for (int a = 0; a < wk; ++a) out[hk + a] = aw[u][a];
  }
}

static void bias_factors_small(const float* qh, int ldq, int gh, int gw, int d, const float* rhtT, int hk,
                               const float* rwtT, int wk, float* rel, int ldr) {
  for (int r = 0; r < gh; ++r) {
    int j = 0;
    for (; j + 4 <= gw; j += 4) small_factors<4>(qh, ldq, r, j, gw, d, rhtT, hk, rwtT, wk, rel, ldr);
    for (; j < gw; ++j) small_factors<1>(qh, ldq, r, j, gw, d, rhtT, hk, rwtT, wk, rel, ldr);
  }
}

// A table (g, k, d) as (g, d, 16), zero-padded: the layout bias_factors_small reads.
static torch::Tensor padded_transpose(const torch::Tensor& table) {
  auto t = torch::zeros({table.size(0), table.size(2), 16}, table.options());
  t.narrow(2, 0, table.size(1)).copy_(table.transpose(1, 2));
  return t;
}

// q, k, v: (B, heads, N, d), any strides with d contiguous (a view of SAM's qkv output needs no copy);
// rh_table (H, H, d), rw_table (W, W, d) from SAM's get_rel_pos, N = H * W. Returns (B, N, heads, d):
// the heads already merged, ready for the output projection.
torch::Tensor biased_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor rh_table,
                               torch::Tensor rw_table, double scale, int64_t block, int64_t kv_block) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v: (batch, heads, N, d)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "a CPU kernel: tensors on the CPU");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
              v.scalar_type() == torch::kFloat && rh_table.scalar_type() == torch::kFloat &&
              rw_table.scalar_type() == torch::kFloat, "fp32 only");
  TORCH_CHECK(rh_table.dim() == 3 && rw_table.dim() == 3 && rh_table.size(2) == q.size(3) &&
              rw_table.size(2) == q.size(3), "rh_table (H, H, d) and rw_table (W, W, d)");
  TORCH_CHECK(block >= 1 && kv_block >= 1, "block and kv_block must be 1 or more");
  if (q.stride(3) != 1) q = q.contiguous();
  if (k.stride(3) != 1) k = k.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  rh_table = rh_table.contiguous(); rw_table = rw_table.contiguous();
  const int64_t nb = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
  const int gh = rh_table.size(0), kh = rh_table.size(1), gw = rw_table.size(0), kw = rw_table.size(1);
  TORCH_CHECK((int64_t)gh * gw == n && (int64_t)kh * kw == n, "the tables' grids must hold the N tokens");
  auto out = torch::empty({nb, n, heads, d}, q.options());
  auto rel = torch::empty({nb * heads, n, kh + kw}, q.options());  // rel_h | rel_w of every head
  float* REL = rel.data_ptr<float>();
  const float *Q = q.data_ptr<float>(), *K = k.data_ptr<float>(), *V = v.data_ptr<float>();
  const float *RHT = rh_table.data_ptr<float>(), *RWT = rw_table.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float alpha = (float)scale;
  const int ldq = (int)q.stride(2), ldk = (int)k.stride(2), ldv = (int)v.stride(2), ldo = (int)(heads * d);
  const bool small = kh <= 16 && kw <= 16;  // windows: per-query accumulators instead of tiny sgemms
  torch::Tensor rhtT, rwtT;
  if (small) { rhtT = padded_transpose(rh_table); rwtT = padded_transpose(rw_table); }
  const float* RHTT = small ? rhtT.data_ptr<float>() : nullptr;
  const float* RWTT = small ? rwtT.data_ptr<float>() : nullptr;
  at::parallel_for(0, nb * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* qh = Q + (bh / heads) * q.stride(0) + (bh % heads) * q.stride(1);
      float* rel = REL + bh * n * (kh + kw);
      if (small)
        bias_factors_small(qh, ldq, gh, gw, (int)d, RHTT, kh, RWTT, kw, rel, kh + kw);
      else
        bias_factors(qh, ldq, gh, gw, (int)d, RHT, kh, RWT, kw, rel, rel + kh, kh + kw);
    }
  });
  std::vector<int32_t> ih(n), iw(n);
  for (int64_t c = 0; c < n; ++c) { ih[c] = (int32_t)(c / kw); iw[c] = (int32_t)(c % kw); }
  const int64_t qblocks = (n + block - 1) / block;
  const int kv = (int)std::min<int64_t>(n, kw >= 16 ? kw * std::max<int64_t>(1, kv_block / kw) : kv_block);
  at::parallel_for(0, nb * heads * qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s((size_t)block * kv), m(block), l(block), corr(block);
    const float one = 1.f, zero = 0.f;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / qblocks, b = bh / heads, h = bh % heads, q0 = (t % qblocks) * block;
      const int rows = (int)std::min<int64_t>(block, n - q0);
      const float* qb = Q + b * q.stride(0) + h * q.stride(1) + q0 * ldq;
      const float* kb = K + b * k.stride(0) + h * k.stride(1);
      const float* vb = V + b * v.stride(0) + h * v.stride(1);
      const float* rel = REL + (bh * n + q0) * (kh + kw);  // query i: rel_h at i*(kh+kw), then rel_w
      float* ob = O + ((b * n + q0) * heads + h) * d;      // output rows ldo apart, the accumulator
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const int D = (int)d, R = rows;
      for (int64_t k0 = 0; k0 < n; k0 += kv) {
        const int C = (int)std::min<int64_t>(kv, n - k0);
        // S (rows x C, row-major) = qb (rows x d) k_block^T: column-major S^T = k_block qb^T
        sgemm_("T", "N", &C, &R, &D, &alpha, kb + k0 * ldk, &ldk, qb, &ldq, &zero, s.data(), &C);
        softmax_block(s.data(), rows, C, (int)k0, kh, kw, rel, rel + kh, kh + kw, m.data(), l.data(),
                      corr.data(), ih.data(), iw.data());
        if (k0 > 0)
          for (int i = 0; i < rows; ++i)
            for (int j = 0; j < D; ++j) ob[(int64_t)i * ldo + j] *= corr[i];
        // O (rows x d) += P (rows x C) v_block (C x d): column-major O^T += v_block^T P^T
        const float* beta = k0 > 0 ? &one : &zero;
        sgemm_("N", "N", &D, &R, &C, &one, vb + k0 * ldv, &ldv, s.data(), &C, beta, ob, &ldo);
      }
      for (int i = 0; i < rows; ++i) {
        const float inv = 1.f / l[i];
        for (int j = 0; j < D; ++j) ob[(int64_t)i * ldo + j] *= inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("biased_attention", &biased_attention); }
