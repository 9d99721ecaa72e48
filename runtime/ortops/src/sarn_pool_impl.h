/* SARN's fused target gate + attentive max-pool, one instantiation per vector ISA.
 *
 * Included by slatectr_ops.c with these macros defined:
 *   FN      prefix of the functions (FN_sarn) VEC   float vector type of V lanes
 *   V       lanes                             VECI  int32 vector type of V lanes
 *   VMAX(a, b)  lane-wise max (a NaN in a gives b, as maxps)
 *
 * Candidates sit in the vector lanes (V candidates of one user per pass); for every history
 * row i the kernel forms the row's gate pre-activations A_ij = R_ij P_i + P_j [L, H] and
 * relation cells G_ij = R_ij x_i + x_j [L, D] once for all V lanes (a few KB, L1), so
 * nothing of size L·L leaves the cache and the user side is never copied per candidate.
 *
 *   logit_nij = Σ_k w2_k max(A_ijk + q_nk, 0) + b2
 *   u_nd      = max(0, max_ij σ(logit_nij) m_i G_ijd)
 */

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

/* σ(z) = 1 / (1 + e^-z) with e^y from the Cephes expf polynomial (rel. error ~1e-7). */
static inline VEC CAT(FN, _sigmoid)(VEC z) {
  VEC y = -z;
  const VEC hi = (VEC){0} + 88.3762626647949f, lo = (VEC){0} - 88.3762626647949f;
  y = VMAX(y, lo);
  y = -VMAX(-y, -hi); /* min(y, hi) */
  VEC fx = y * 1.44269504088896341f + 0.5f;
  VECI ti = __builtin_convertvector(fx, VECI); /* truncation */
  VEC tf = __builtin_convertvector(ti, VEC);
  VECI gt = tf > fx;                          /* -1 where trunc rounded up (fx < 0) */
  tf = tf + __builtin_convertvector(gt, VEC); /* floor(fx) */
  ti = __builtin_convertvector(tf, VECI);
  VEC r = y - tf * 0.693359375f + tf * 2.12194440e-4f;
  VEC r2 = r * r;
  VEC p = (VEC){0} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  VECI bits = (ti + 127) << 23;
  VEC e = p * (VEC)bits; /* 2^n via the exponent field (n in [-127, 128)) */
  /* 1/(1+e) as a true division: as fast here as a reciprocal estimate with two Newton steps
   * (measured, SARN and DIN kernels), and exact; e = inf gives exactly 0, never NaN. */
  return 1.0f / (1.0f + e);
}

#ifndef NV
#define NV 2 /* vectors per pass: NV*V candidates share each row's A and G */
#endif
#ifndef RELU_TRICK
#define RELU_TRICK 1 /* w·ReLU(a+q) = w·max(a,−q) + w·q: two vector ops per (j,k) not three */
#endif

/* Scratch layout, all 64-byte aligned by the caller:
 *   qv [H][NV] VEC, acc [D][NV] VEC, g [L][NV] VEC, arow [L*H] float, grow [L*D] float */
#define P (NV * V)
#define DB (12 / NV) /* channels per pool pass held in registers */
static void CAT(FN, _sarn)(const float* x, const float* rel, const float* proj, const float* mask,
               const float* qb, const float* w2, float b2, const int64_t* order,
               const int64_t* ustart, int64_t U, int64_t L, int64_t D, int64_t H, float* out,
               VEC* qv, VEC* acc, VEC* g, float* arow, float* grow) {
  const VEC zero = (VEC){0};
  for (int64_t u = 0; u < U; ++u) {
    const int64_t first = ustart[u], count = ustart[u + 1] - first;
    const float* xu = x + u * L * D;
    const float* ru = rel + u * L * L;
    const float* pu = proj + u * L * H;
    const float* mu = mask + u * L;
    for (int64_t b0 = 0; b0 < count; b0 += P) {
      const int64_t nb = count - b0 < P ? count - b0 : P;
      const int64_t* cand = order + first + b0;
      VEC s0[NV]; /* per-lane logit offset: b2 (+ w2·q with the ReLU trick) */
      for (int v = 0; v < NV; ++v) s0[v] = zero + b2;
      for (int64_t k = 0; k < H; ++k) { /* lanes past nb repeat lane 0 (finite, ignored) */
        for (int v = 0; v < NV; ++v) {
          VEC q;
          for (int l = 0; l < V; ++l) {
            const int64_t c = v * V + l < nb ? v * V + l : 0;
            q[l] = qb[cand[c] * H + k];
          }
#if RELU_TRICK
          s0[v] += w2[k] * q;
          qv[k * NV + v] = -q;
#else
          qv[k * NV + v] = q;
#endif
        }
      }
      for (int64_t d = 0; d < D * NV; ++d) acc[d] = zero; /* the clamp at 0 */
      for (int64_t i = 0; i < L; ++i) {
        const float mi = mu[i];
        if (mi == 0.0f) continue; /* padded source row: every cell is 0 */
        const float* ri = ru + i * L;
        const float* pi = pu + i * H;
        const float* xi = xu + i * D;
        for (int64_t j = 0; j < L; ++j) {
          const float r = ri[j];
          const float* pj = pu + j * H;
          const float* xj = xu + j * D;
          float* ar = arow + j * H;
          float* gr = grow + j * D;
          for (int64_t k = 0; k < H; ++k) ar[k] = r * pi[k] + pj[k];
          for (int64_t d = 0; d < D; ++d) gr[d] = r * xi[d] + xj[d];
        }
        /* gate: four rows j at a time, NV vectors of candidates each */
        int64_t j = 0;
        for (; j + 4 <= L; j += 4) {
          VEC s[4][NV];
          for (int c = 0; c < 4; ++c)
            for (int v = 0; v < NV; ++v) s[c][v] = zero;
          const float* a0 = arow + j * H;
          for (int64_t k = 0; k < H; ++k) {
            VEC q[NV];
            for (int v = 0; v < NV; ++v) q[v] = qv[k * NV + v];
            const float w = w2[k];
            for (int c = 0; c < 4; ++c) {
              const float a = a0[c * H + k];
              for (int v = 0; v < NV; ++v)
#if RELU_TRICK
                s[c][v] += w * VMAX(zero + a, q[v]);
#else
                s[c][v] += w * VMAX(a + q[v], zero);
#endif
            }
          }
          for (int c = 0; c < 4; ++c)
            for (int v = 0; v < NV; ++v)
              g[(j + c) * NV + v] = CAT(FN, _sigmoid)(s[c][v] + s0[v]) * mi;
        }
        for (; j < L; ++j) {
          const float* a0 = arow + j * H;
          for (int v = 0; v < NV; ++v) {
            VEC sv = zero;
            for (int64_t k = 0; k < H; ++k)
#if RELU_TRICK
              sv += w2[k] * VMAX(zero + a0[k], qv[k * NV + v]);
#else
              sv += w2[k] * VMAX(a0[k] + qv[k * NV + v], zero);
#endif
            g[j * NV + v] = CAT(FN, _sigmoid)(sv + s0[v]) * mi;
          }
        }
        /* pool: DB channels × NV vectors in registers, all rows j */
        int64_t d0 = 0;
        for (; d0 + DB <= D; d0 += DB) {
          VEC c[DB][NV];
          for (int e = 0; e < DB; ++e)
            for (int v = 0; v < NV; ++v) c[e][v] = acc[(d0 + e) * NV + v];
          for (int64_t jj = 0; jj < L; ++jj) {
            VEC gj[NV];
            for (int v = 0; v < NV; ++v) gj[v] = g[jj * NV + v];
            const float* gr = grow + jj * D + d0;
            for (int e = 0; e < DB; ++e) {
              const float cell = gr[e];
              for (int v = 0; v < NV; ++v) c[e][v] = VMAX(c[e][v], gj[v] * cell);
            }
          }
          for (int e = 0; e < DB; ++e)
            for (int v = 0; v < NV; ++v) acc[(d0 + e) * NV + v] = c[e][v];
        }
        for (; d0 < D; ++d0)
          for (int v = 0; v < NV; ++v) {
            VEC c0 = acc[d0 * NV + v];
            for (int64_t jj = 0; jj < L; ++jj) c0 = VMAX(c0, g[jj * NV + v] * grow[jj * D + d0]);
            acc[d0 * NV + v] = c0;
          }
      }
      for (int l = 0; l < nb; ++l) {
        float* o = out + cand[l] * D;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d * NV + l / V][l % V];
      }
    }
  }
}
#undef P
#undef DB

#undef CAT
#undef CAT2
