// edgelab's CPU kernel for SAM's attention with its decomposed relative-position bias (notebook 01,
// section "Attention variants"; loaded by edgelab/cpu_kernel.py):
//   out = softmax(q k^T * scale + B) v,   B[i, (a, j)] = rel_h[i, a] + rel_w[i, j]
// for keys laid out row-major on an (a, j) grid, with FlashAttention's online softmax over blocks of
// keys (a running max and sum per query, the output rescaled when the max grows), then out / sum.
// B never exists beyond one block: each of its rows is built from H + W numbers. rel_h and rel_w of
// a head come from SAM's tables: small sgemms (bias_factors), or for windows 16-lane accumulators
// (bias_factors_small). Two paths compute the rest:
//   fused (AVX-512, head dim a multiple of 16; namespace fused): a register micro-kernel per strip
//     of MR queries: scores of 32 keys in 2 MR registers, bias, into an L1 strip buffer; exp; the
//     strip's MR x d outputs in registers += P v. Keys packed once per head, no BLAS.
//   BLAS (any other CPU or head dim): one task is one head and a block of queries:
//     1. S = scale * q_block k_block^T   one sgemm (the BLAS PyTorch links)
//     2. S += B, row max, exp, row sum   one pass over S while it sits in the core's cache
//     3. out_block += S v                one sgemm
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
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

#if defined(__AVX512F__)
#include <immintrin.h>
// ---------------------------------------------------------------- the fused path (AVX-512)
// The same online softmax without BLAS: a strip of MR queries at a time, the scores of one tile of
// 32 keys held in 2 MR vector registers while d multiply-adds run (the keys packed once per head,
// d rows of 32), the bias added and the tile stored to a strip buffer that stays in L1; then
// exp, sums, and the strip's outputs (MR x d, in registers) += P v over the block of keys. The
// scores of a block never reach L2, and no call packs its operands again. Base-2 throughout:
// q carries scale * log2(e) and the bias factors log2(e), so p = 2^(s - max).
namespace fused {
constexpr int KT = 32;  // keys per tile: two 16-lane vectors
constexpr float LOG2E = 1.44269504088896341f;
enum Bias { ROWS, PERMUTE, GATHER };  // a tile inside one grid row / tables of <= 16 / any grid

static inline __m512 exp2_ps(__m512 x) {  // x <= 0; Cephes' exp2f polynomial on [-0.5, 0.5]
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// The keys of one head by tiles: key t*32 + j, coordinate c at kp[(t * d + c) * 32 + j]; zeros past n.
static void pack_keys(const float* kh, int ldk, int n, int d, float* kp) {
  const int tiles = (n + KT - 1) / KT;
  for (int t = 0; t < tiles; ++t)
    for (int j = 0; j < KT; ++j) {
      const int key = t * KT + j;
      float* dst = kp + (int64_t)t * d * KT + j;
      if (key + 8 < n)  // rows ldk apart come from memory: ask for the one 8 keys ahead now
        for (int c = 0; c < d; c += 16) _mm_prefetch((const char*)(kh + (int64_t)(key + 8) * ldk + c), _MM_HINT_T0);
      for (int c = 0; c < d; ++c) dst[c * KT] = key < n ? kh[(int64_t)key * ldk + c] : 0.f;
    }
}

struct Grid {  // how a tile's bias is found: key c sits at grid row ih[c], column iw[c]
  int kh, kw, n;
  const int32_t *ih, *iw;  // padded to whole tiles (index 0 past n)
};

// The bias of a tile of keys from c0 for one query (its rel_h h, rel_w w), in base 2.
template <int MODE>
static inline void tile_bias(const float* h, const float* w, int c0, const Grid& g, __m512& b0, __m512& b1) {
  if (MODE == ROWS) {  // kw a multiple of 32: the tile is one grid row, rel_h is one number
    const __m512 a = _mm512_set1_ps(h[c0 / g.kw]);
    b0 = _mm512_add_ps(a, _mm512_loadu_ps(w + c0 % g.kw));
    b1 = _mm512_add_ps(a, _mm512_loadu_ps(w + c0 % g.kw + 16));
  } else if (MODE == PERMUTE) {  // the whole of rel_h and rel_w in one register each
    const __m512 hv = _mm512_maskz_loadu_ps((__mmask16)((1u << g.kh) - 1), h);
    const __m512 wv = _mm512_maskz_loadu_ps((__mmask16)((1u << g.kw) - 1), w);
    b0 = _mm512_add_ps(_mm512_permutexvar_ps(_mm512_loadu_si512(g.ih + c0), hv),
                       _mm512_permutexvar_ps(_mm512_loadu_si512(g.iw + c0), wv));
    b1 = _mm512_add_ps(_mm512_permutexvar_ps(_mm512_loadu_si512(g.ih + c0 + 16), hv),
                       _mm512_permutexvar_ps(_mm512_loadu_si512(g.iw + c0 + 16), wv));
  } else {
    b0 = _mm512_add_ps(_mm512_i32gather_ps(_mm512_loadu_si512(g.ih + c0), h, 4),
                       _mm512_i32gather_ps(_mm512_loadu_si512(g.iw + c0), w, 4));
    b1 = _mm512_add_ps(_mm512_i32gather_ps(_mm512_loadu_si512(g.ih + c0 + 16), h, 4),
                       _mm512_i32gather_ps(_mm512_loadu_si512(g.iw + c0 + 16), w, 4));
  }
}

// Scores of MR queries qs (MR x D, scaled) against tiles [t0, t1) of the packed keys, bias added,
// keys past n at -inf, into sb (MR rows, ldsb apart); mx[r]: the largest score of row r.
template <int MR, int D, int MODE>
static void strip_scores(const float* qs, const float* kp, int t0, int t1, const float* const* rel, const Grid& g,
                         float* sb, int ldsb, float* mx) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mv[MR];
  for (int r = 0; r < MR; ++r) mv[r] = ninf;
  for (int t = t0; t < t1; ++t) {
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float* kt = kp + (int64_t)t * D * KT;
#pragma GCC unroll 4
    for (int c = 0; c < D; ++c) {
      const __m512 k0 = _mm512_loadu_ps(kt + c * KT), k1 = _mm512_loadu_ps(kt + c * KT + 16);
      for (int r = 0; r < MR; ++r) {
        const __m512 qv = _mm512_set1_ps(qs[r * D + c]);
        acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
      }
    }
    const int c0 = t * KT, valid = std::min(KT, g.n - c0);
    const __mmask16 m0 = valid >= 16 ? 0xFFFF : (__mmask16)((1u << valid) - 1);
    const __mmask16 m1 = valid >= 32 ? 0xFFFF : valid > 16 ? (__mmask16)((1u << (valid - 16)) - 1) : 0;
    float* dst = sb + (t - t0) * KT;
    for (int r = 0; r < MR; ++r) {
      __m512 b0, b1;
      tile_bias<MODE>(rel[r], rel[r] + g.kh, c0, g, b0, b1);
      const __m512 s0 = _mm512_mask_blend_ps(m0, ninf, _mm512_add_ps(acc[r][0], b0));
      const __m512 s1 = _mm512_mask_blend_ps(m1, ninf, _mm512_add_ps(acc[r][1], b1));
      _mm512_storeu_ps(dst + (int64_t)r * ldsb, s0);
      _mm512_storeu_ps(dst + (int64_t)r * ldsb + 16, s1);
      mv[r] = _mm512_max_ps(mv[r], _mm512_max_ps(s0, s1));
    }
  }
  for (int r = 0; r < MR; ++r) mx[r] = _mm512_reduce_max_ps(mv[r]);
}

// Online-softmax step of one row of `cols` scores (padded to tiles): s <- 2^(s - max), running
// max m and sum l updated; returns the factor that rescales what was summed before.
static inline float row_softmax(float* s, int cols, float mx, float& m, float& l) {
  const float mnew = std::max(m, mx);
  const float corr = m == -std::numeric_limits<float>::infinity() ? 0.f : std::exp2(m - mnew);
  const __m512 mm = _mm512_set1_ps(mnew);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < cols; j += 16) {
    const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), mm));
    _mm512_storeu_ps(s + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  l = l * corr + _mm512_reduce_add_ps(sum);
  m = mnew;
  return corr;
}

// o (MR x D) = o * corr + P (MR x cols, ldsb apart) v (cols rows, ldv apart), o in registers.
template <int MR, int DV>
static void strip_pv(const float* sb, int ldsb, const float* vb, int ldv, int cols, float* o, const float* corr) {
  constexpr int D = DV * 16;
  __m512 acc[MR][DV];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < DV; ++u) acc[r][u] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + u * 16), _mm512_set1_ps(corr[r]));
#pragma GCC unroll 2
  for (int j = 0; j < cols; ++j) {
    __m512 vv[DV];
    for (int u = 0; u < DV; ++u) vv[u] = _mm512_loadu_ps(vb + (int64_t)j * ldv + u * 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 p = _mm512_set1_ps(sb[(int64_t)r * ldsb + j]);
      for (int u = 0; u < DV; ++u) acc[r][u] = _mm512_fmadd_ps(p, vv[u], acc[r][u]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < DV; ++u) _mm512_storeu_ps(o + r * D + u * 16, acc[r][u]);
}

struct Args {
  const float *Q, *K, *V, *REL, *KP;  // REL, KP: every head's bias factors and packed keys, or null
  const float *RHTT, *RWTT;  // with REL null: windows' tables (bias_factors_small), per task
  float* O;
  int64_t sq0, sq1, sk0, sk1, sv0, sv1;  // batch and head strides
  int ldq, ldk, ldv, ldo, heads, n, ldr;
  int64_t nb, block, kv_tiles;
  float qscale;  // scale * log2(e)
  Grid g;
};

template <int DV, int MODE>
static void run(const Args& a) {
  constexpr int D = DV * 16, MR = DV <= 3 ? 8 : 24 / DV;
  const int64_t qblocks = (a.n + a.block - 1) / a.block, tiles = (a.n + KT - 1) / KT;
  const int rows_max = (int)((a.block + MR - 1) / MR * MR), ldsb = (int)(a.kv_tiles * KT);
  at::parallel_for(0, a.nb * a.heads * qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs((size_t)rows_max * D), o((size_t)rows_max * D), sb((size_t)MR * ldsb);
    std::vector<float> m(rows_max), l(rows_max), zero_rel(a.g.kh + a.g.kw + KT, 0.f);
    std::vector<float> own_kp(a.KP ? 0 : (size_t)tiles * D * KT), own_rel(a.REL ? 0 : (size_t)a.n * a.ldr);
    float mx[MR], corr[MR];
    const float* rel[MR];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / qblocks, b = bh / a.heads, h = bh % a.heads, q0 = (t % qblocks) * a.block;
      const int rows = (int)std::min<int64_t>(a.block, a.n - q0), padded = (rows + MR - 1) / MR * MR;
      const float* qb = a.Q + b * a.sq0 + h * a.sq1 + q0 * a.ldq;
      for (int i = 0; i < padded; ++i)
        for (int c = 0; c < D; ++c) qs[(size_t)i * D + c] = i < rows ? qb[(int64_t)i * a.ldq + c] * a.qscale : 0.f;
      std::fill(o.begin(), o.begin() + (size_t)padded * D, 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const float* kp = a.KP ? a.KP + bh * tiles * D * KT : own_kp.data();
      const float* vh = a.V + b * a.sv0 + h * a.sv1;
      const float* relq = a.REL ? a.REL + (bh * a.n + q0) * a.ldr : own_rel.data();
      if (!a.KP) {  // one task per head (windows): its keys and bias factors made here, in this core's cache
        pack_keys(a.K + b * a.sk0 + h * a.sk1, a.ldk, a.n, D, own_kp.data());
        bias_factors_small(a.Q + b * a.sq0 + h * a.sq1, a.ldq, a.g.kh, a.g.kw, D, a.RHTT, a.g.kh, a.RWTT, a.g.kw,
                           own_rel.data(), a.ldr);
        for (float& x : own_rel) x *= LOG2E;
      }
      for (int64_t t0 = 0; t0 < tiles; t0 += a.kv_tiles) {
        const int t1 = (int)std::min<int64_t>(tiles, t0 + a.kv_tiles);
        const int cols = std::min<int>(a.n, t1 * KT) - (int)t0 * KT, cols_pad = (t1 - (int)t0) * KT;
        for (int i0 = 0; i0 < padded; i0 += MR) {
          for (int r = 0; r < MR; ++r) rel[r] = i0 + r < rows ? relq + (int64_t)(i0 + r) * a.ldr : zero_rel.data();
          strip_scores<MR, D, MODE>(qs.data() + (size_t)i0 * D, kp, (int)t0, t1, rel, a.g, sb.data(), ldsb, mx);
          for (int r = 0; r < MR; ++r)
            corr[r] = row_softmax(sb.data() + (size_t)r * ldsb, cols_pad, mx[r], m[i0 + r], l[i0 + r]);
          strip_pv<MR, DV>(sb.data(), ldsb, vh + t0 * KT * a.ldv, a.ldv, cols, o.data() + (size_t)i0 * D, corr);
        }
      }
      float* ob = a.O + ((b * a.n + q0) * a.heads + h) * D;
      for (int i = 0; i < rows; ++i) {
        const float inv = 1.f / l[i];
        for (int c = 0; c < D; ++c) ob[(int64_t)i * a.ldo + c] = o[(size_t)i * D + c] * inv;
      }
    }
  });
}

template <int DV>
static void run_mode(const Args& a, Bias mode) {
  if (mode == ROWS) run<DV, ROWS>(a);
  else if (mode == PERMUTE) run<DV, PERMUTE>(a);
  else run<DV, GATHER>(a);
}

static bool handles(int64_t d) { return d % 16 == 0 && d >= 16 && d <= 128; }

static void dispatch(const Args& a, int dv) {
  const Bias mode = a.g.kw % KT == 0 ? ROWS : (a.g.kh <= 16 && a.g.kw <= 16 ? PERMUTE : GATHER);
  switch (dv) {
    case 1: run_mode<1>(a, mode); break;
    case 2: run_mode<2>(a, mode); break;
    case 3: run_mode<3>(a, mode); break;
    case 4: run_mode<4>(a, mode); break;
    case 5: run_mode<5>(a, mode); break;
    case 6: run_mode<6>(a, mode); break;
    case 7: run_mode<7>(a, mode); break;
    default: run_mode<8>(a, mode); break;
  }
}
}  // namespace fused
#endif

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
  std::vector<int32_t> ih(n + 32, 0), iw(n + 32, 0);  // padded to whole tiles for the fused path
  for (int64_t c = 0; c < n; ++c) { ih[c] = (int32_t)(c / kw); iw[c] = (int32_t)(c % kw); }
#if defined(__AVX512F__)
  // The fused path, given every head's bias factors and packed keys (rel, kp), or null for both.
  auto run_fused = [&](const float* rel, const float* kp) {
    fused::Args a{Q, K, V, rel, kp, RHTT, RWTT, O, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                  v.stride(0), v.stride(1), ldq, ldk, ldv, ldo, (int)heads, (int)n, kh + kw, nb, block,
                  std::max<int64_t>(1, kv_block / fused::KT), alpha * fused::LOG2E,
                  fused::Grid{kh, kw, (int)n, ih.data(), iw.data()}};
    fused::dispatch(a, (int)(d / 16));
  };
  if (fused::handles(d) && small && block >= n) {  // one task per head: it makes its own keys and factors
    run_fused(nullptr, nullptr);
    return out;
  }
#endif
  auto rel = torch::empty({nb * heads, n, kh + kw}, q.options());  // rel_h | rel_w of every head
  float* REL = rel.data_ptr<float>();
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
#if defined(__AVX512F__)
  if (fused::handles(d)) {
    const int64_t tiles = (n + fused::KT - 1) / fused::KT;
    auto kp = torch::empty({nb * heads, tiles * d * fused::KT}, q.options());
    float* KP = kp.data_ptr<float>();
    at::parallel_for(0, nb * heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        fused::pack_keys(K + (bh / heads) * k.stride(0) + (bh % heads) * k.stride(1), ldk, (int)n, (int)d,
                         KP + bh * tiles * d * fused::KT);
        float* r = REL + bh * n * (kh + kw);
        for (int64_t i = 0; i < n * (kh + kw); ++i) r[i] *= fused::LOG2E;
      }
    });
    run_fused(REL, KP);
    return out;
  }
#endif
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
