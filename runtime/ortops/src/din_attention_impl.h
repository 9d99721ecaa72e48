/* DIN's activation unit + weighted history sum, fused; one instantiation per vector ISA.
 *
 * Same macros as sarn_pool_impl.h (FN, VEC, VECI, V, VMAX) plus SIGMOID, the sigmoid of
 * that instantiation (defined by sarn_pool_impl.h as FN_sigmoid; passed in by the caller).
 *
 * For candidate n of user u, over the user's real history rows l (padded rows add 0):
 *   z1_l = UT_l + CT_n + h_l·diag(t_n)·W_pᵀ       UT = H (W_h + W_d)ᵀ once per user,
 *                                                  CT = (W_t − W_d) t_n + b1 once per candidate
 *   e1 = Dice1(z1), z2 = e1 W2ᵀ + b2, e2 = Dice2(z2), s_l = e2·w3 + b3
 *   interest_n = Σ_l s_l m_l h_l
 * Dice(z) = z (α + (1−α) σ((z − μ)·inv)),  inv = 1/√(var + ε) precomputed by the graph.
 * Widths are padded to multiples of 8 with zero weights (padded units give exactly 0).
 */

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

/* C[M, W] += A[M, K] · B[K, ldb] for the W = NBV·V columns at C + j, B + j: register blocks
 * of MR rows × NBV vectors (MR·NBV accumulators + NBV loads + 1 broadcast ≤ 16 registers). */
#define GEMM_BLOCK(NBV, MR)                                                               \
  do {                                                                                    \
    int64_t i = 0;                                                                        \
    for (; i + MR <= M; i += MR) {                                                        \
      VEC c[MR][NBV];                                                                     \
      for (int r = 0; r < MR; ++r)                                                        \
        for (int v = 0; v < NBV; ++v) c[r][v] = *(const VEC*)(C + (i + r) * ldc + j + v * V); \
      for (int64_t k = 0; k < K; ++k) {                                                   \
        VEC b[NBV];                                                                       \
        for (int v = 0; v < NBV; ++v) b[v] = *(const VEC*)(B + k * N + j + v * V);        \
        for (int r = 0; r < MR; ++r) {                                                    \
          const float a = A[(i + r) * lda + k];                                           \
          for (int v = 0; v < NBV; ++v) c[r][v] += a * b[v];                              \
        }                                                                                 \
      }                                                                                   \
      for (int r = 0; r < MR; ++r)                                                        \
        for (int v = 0; v < NBV; ++v) *(VEC*)(C + (i + r) * ldc + j + v * V) = c[r][v];   \
    }                                                                                     \
    for (; i < M; ++i) {                                                                  \
      VEC c[NBV];                                                                         \
      for (int v = 0; v < NBV; ++v) c[v] = *(const VEC*)(C + i * ldc + j + v * V);        \
      for (int64_t k = 0; k < K; ++k) {                                                   \
        const float a = A[i * lda + k];                                                   \
        for (int v = 0; v < NBV; ++v) c[v] += a * *(const VEC*)(B + k * N + j + v * V);   \
      }                                                                                   \
      for (int v = 0; v < NBV; ++v) *(VEC*)(C + i * ldc + j + v * V) = c[v];              \
    }                                                                                     \
  } while (0)

/* C[M, N] += A[M, K] · B[K, N]; N a multiple of 8, rows of B contiguous (ldb = N). */
static inline void CAT(FN, _gemm)(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                  const float* B, float* C, int64_t ldc) {
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) GEMM_BLOCK(16 / V, (V == 8 ? 6 : 3));
  if (j < N) GEMM_BLOCK(8 / V, (V == 8 ? 8 : 6)); /* one 8-wide tail */
}
#undef GEMM_BLOCK

/* In place on rows [M, N]: Dice with per-column (mean, inv, alpha) [3][N]. */
static inline void CAT(FN, _dice)(int64_t M, int64_t N, float* Z, const float* prm) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; j += V) {
      VEC z = *(VEC*)(Z + i * N + j);
      const VEC mu = *(const VEC*)(prm + j), inv = *(const VEC*)(prm + N + j);
      const VEC al = *(const VEC*)(prm + 2 * N + j);
      const VEC p = CAT(FN, _sigmoid)((z - mu) * inv);
      *(VEC*)(Z + i * N + j) = z * (al + (1.0f - al) * p);
    }
}

/* Packed weights (all padded, 64-byte aligned), built once per call by the caller:
 *   whd [D][A1p], wtd [D][A1p], wp [D][A1p], b1 [A1p], d1 [3][A1p],
 *   w2 [A1p][A2p] (= W2ᵀ), b2 [A2p], d2 [3][A2p], w3 [A2p]
 * Scratch: hc [L][D], mc [L], ut [L][A1p], wpt [D][A1p], ct [A1p], z1 [L][A1p], z2 [L][A2p] */
static void CAT(FN, _din)(const float* hist, const float* mask, const float* t,
                          const int64_t* order, const int64_t* ustart, int64_t U, int64_t L,
                          int64_t D, int64_t A1p, int64_t A2p, const float* whd,
                          const float* wtd, const float* wp, const float* b1, const float* d1,
                          const float* w2, const float* b2, const float* d2, const float* w3,
                          float b3, float* out, float* hc, float* mc, float* ut, float* wpt,
                          float* ct, float* z1, float* z2) {
  for (int64_t u = 0; u < U; ++u) {
    const int64_t first = ustart[u], count = ustart[u + 1] - first;
    if (count == 0) continue;
    /* the user's real rows, compacted; UT for them */
    int64_t La = 0;
    for (int64_t l = 0; l < L; ++l) {
      const float m = mask[u * L + l];
      if (m == 0.0f) continue;
      memcpy(hc + La * D, hist + (u * L + l) * D, (size_t)D * sizeof(float));
      mc[La++] = m;
    }
    memset(ut, 0, (size_t)(La * A1p) * sizeof(float));
    CAT(FN, _gemm)(La, A1p, D, hc, D, whd, ut, A1p);
    for (int64_t c = 0; c < count; ++c) {
      const int64_t n = order[first + c];
      const float* tn = t + n * D;
      float* o = out + n * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
      if (La == 0) continue; /* empty history: interest 0 */
      memcpy(ct, b1, (size_t)A1p * sizeof(float));
      CAT(FN, _gemm)(1, A1p, D, tn, D, wtd, ct, A1p);
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < A1p; j += V)
          *(VEC*)(wpt + d * A1p + j) = *(const VEC*)(wp + d * A1p + j) * tn[d];
      for (int64_t l = 0; l < La; ++l)
        for (int64_t j = 0; j < A1p; j += V)
          *(VEC*)(z1 + l * A1p + j) = *(const VEC*)(ut + l * A1p + j) + *(const VEC*)(ct + j);
      CAT(FN, _gemm)(La, A1p, D, hc, D, wpt, z1, A1p);
      CAT(FN, _dice)(La, A1p, z1, d1);
      for (int64_t l = 0; l < La; ++l)
        for (int64_t j = 0; j < A2p; j += V)
          *(VEC*)(z2 + l * A2p + j) = *(const VEC*)(b2 + j);
      CAT(FN, _gemm)(La, A2p, A1p, z1, A1p, w2, z2, A2p);
      CAT(FN, _dice)(La, A2p, z2, d2);
      for (int64_t l = 0; l < La; ++l) {
        VEC acc = (VEC){0};
        for (int64_t j = 0; j < A2p; j += V) acc += *(VEC*)(z2 + l * A2p + j) * *(const VEC*)(w3 + j);
        float s = b3;
        for (int k = 0; k < V; ++k) s += acc[k];
        s *= mc[l];
        const float* hl = hc + l * D;
        for (int64_t d = 0; d < D; ++d) o[d] += s * hl[d];
      }
    }
  }
}

#undef CAT
#undef CAT2
