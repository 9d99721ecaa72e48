/* slatectr custom operators for ONNX Runtime (CPU): runtime/ortops/__init__.py says how they
 * are built, found and used; docs/export.md ("Serving layouts") says why.
 *
 * Domain "slatectr" (version 1), ops:
 * "SarnAttentivePool":
 *   inputs  x [U,L,D] f32, relation [U,L,L] f32, proj [U,L,H] f32, mask [U,L] f32,
 *           qb [N,H] f32, w2 [H] f32, b2 [1] f32, cand_user_index [N] i64
 *   output  u [N,D] f32 = max(0, max_ij σ(w2·ReLU(R_ij P_i + P_j + qb_n) + b2) m_i (R_ij x_i + x_j))
 *
 * "DinAttentionPool": DIN's activation unit (first layer split per user / candidate / pair,
 *   Dice, 80 → 40 → 1) and the weighted history sum, see din_attention_impl.h:
 *   inputs  hist [U,L,D], mask [U,L], t [N,D], cand_user_index [N] i64, w1 [A1,4D], b1 [A1],
 *           dice1 [3,A1] (mean, 1/sqrt(var+eps), alpha), w2 [A2,A1], b2 [A2], dice2 [3,A2],
 *           w3 [A2], b3 [1]
 *   output  interest [N,D] = Σ_l s_nl m_l h_l
 *
 * Needs only the ONNX Runtime C API header (no link against libonnxruntime): ORT hands the
 * function table to RegisterCustomOps. The op asks for API version 16 (ORT >= 1.16) and uses
 * the V2 callbacks, so every error comes back as an OrtStatus (a Python exception), never
 * a crash.
 *
 * ISA: the file is compiled once for baseline x86-64 (SSE2, 4 lanes); a second copy of the
 * kernel is compiled for AVX2+FMA (8 lanes) with a target pragma and picked at load time
 * (__builtin_cpu_supports), so one .so runs on every x86-64 and is fast on AVX2 machines.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#define SLATECTR_API_VERSION 16

typedef int32_t v4i __attribute__((vector_size(16)));
typedef float v4f __attribute__((vector_size(16)));

/* ---------------------------------------------------------------- kernel instantiations */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define FN k_sse2
#define VEC v4f
#define VECI v4i
#define V 4
#define VMAX(a, b) ((v4f)_mm_max_ps((__m128)(a), (__m128)(b)))
#include "sarn_pool_impl.h"
#include "din_attention_impl.h"
#undef FN
#undef VEC
#undef VECI
#undef V
#undef VMAX

#pragma GCC push_options
#pragma GCC target("avx2,fma")
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
#define FN k_avx2
#define VEC v8f
#define VECI v8i
#define V 8
#define VMAX(a, b) ((v8f)_mm256_max_ps((__m256)(a), (__m256)(b)))
#include "sarn_pool_impl.h"
#include "din_attention_impl.h"
#undef FN
#undef VEC
#undef VECI
#undef V
#undef VMAX
#pragma GCC pop_options

#else /* portable vector extensions (aarch64, ...) */
static inline v4f vmax_generic(v4f a, v4f b) {
  v4i gt = a > b;
  return (v4f)(((v4i)a & gt) | ((v4i)b & ~gt));
}
#define FN k_generic
#define VEC v4f
#define VECI v4i
#define V 4
#define VMAX(a, b) vmax_generic((a), (b))
#include "sarn_pool_impl.h"
#include "din_attention_impl.h"
#undef FN
#undef VEC
#undef VECI
#undef V
#undef VMAX
#endif

static int use_avx2(void) {
#if defined(__x86_64__) || defined(__i386__)
  static int cached = -1;
  if (cached < 0) {
    const char* force = getenv("SLATECTR_OPS_ISA"); /* "sse2" forces the baseline (tests) */
    __builtin_cpu_init();
    cached = !(force && strcmp(force, "sse2") == 0) && __builtin_cpu_supports("avx2") &&
             __builtin_cpu_supports("fma");
  }
  return cached;
#else
  return 0;
#endif
}

/* ---------------------------------------------------------------- ORT glue */
static const OrtApi* g_api = NULL;

typedef struct {
  const OrtApi* api;
} Kernel;

static OrtStatus* fail(const char* msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg); }

#define TRY(expr)                      \
  do {                                 \
    OrtStatus* _st = (expr);           \
    if (_st != NULL) return _st;       \
  } while (0)

/* data pointer and shape (up to 4 dims) of input `index`; checks element type and rank. The
 * message buffer is on the stack: CreateStatus copies it, and concurrent Runs must not share it. */
static OrtStatus* input_of(const char* op, OrtKernelContext* ctx, size_t index,
                           ONNXTensorElementDataType type, size_t rank, int64_t* dims,
                           const void** data) {
  const OrtValue* value = NULL;
  TRY(g_api->KernelContext_GetInput(ctx, index, &value));
  if (value == NULL) return fail("slatectr op: missing input");
  OrtTensorTypeAndShapeInfo* info = NULL;
  TRY(g_api->GetTensorTypeAndShape(value, &info));
  ONNXTensorElementDataType got;
  size_t n = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &got);
  if (st == NULL) st = g_api->GetDimensionsCount(info, &n);
  if (st == NULL && n == rank) st = g_api->GetDimensions(info, dims, n);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st != NULL) return st;
  if (got != type || n != rank) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s: input %zu has type %d rank %zu, expected %d rank %zu", op,
             index, (int)got, n, (int)type, rank);
    return fail(msg);
  }
  return g_api->GetTensorMutableData((OrtValue*)value, (void**)data);
}

static OrtStatus* input(OrtKernelContext* ctx, size_t index, ONNXTensorElementDataType type,
                        size_t rank, int64_t* dims, const void** data) {
  return input_of("SarnAttentivePool", ctx, index, type, rank, dims, data);
}

/* The op's one output, [N, D] float. */
static OrtStatus* output_nd(OrtKernelContext* ctx, int64_t N, int64_t D, float** out) {
  const int64_t dims[2] = {N, D};
  OrtValue* value = NULL;
  TRY(g_api->KernelContext_GetOutput(ctx, 0, dims, 2, &value));
  return g_api->GetTensorMutableData(value, (void**)out);
}

static void* aligned(size_t bytes) {
  void* p = NULL;
  if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
  return p;
}

/* counting sort of candidates by user; returns NULL status or an error */
static OrtStatus* bucket(const char* op, const int64_t* idx, int64_t N, int64_t U,
                         int64_t** ustart_out, int64_t** order_out) {
  int64_t* ustart = (int64_t*)calloc((size_t)U + 2, sizeof(int64_t));
  int64_t* order = (int64_t*)malloc((size_t)(N ? N : 1) * sizeof(int64_t));
  if (!ustart || !order) {
    free(ustart), free(order);
    return g_api->CreateStatus(ORT_FAIL, "slatectr op: out of memory");
  }
  for (int64_t n = 0; n < N; ++n) {
    if (idx[n] < 0 || idx[n] >= U) {
      free(ustart), free(order);
      char msg[96];
      snprintf(msg, sizeof msg, "%s: cand_user_index out of range [0, U)", op);
      return fail(msg);
    }
    ustart[idx[n] + 2]++;
  }
  for (int64_t u = 0; u < U; ++u) ustart[u + 2] += ustart[u + 1];
  for (int64_t n = 0; n < N; ++n) order[ustart[idx[n] + 1]++] = n;
  *ustart_out = ustart, *order_out = order;
  return NULL;
}

static OrtStatus* ORT_API_CALL compute(void* op_kernel, OrtKernelContext* ctx) {
  (void)op_kernel;
  const float *x, *rel, *proj, *mask, *qb, *w2, *b2;
  const int64_t* idx;
  int64_t dx[3], dr[3], dp[3], dm[2], dq[2], dw[1], db[1], di[1];
  TRY(input(ctx, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 3, dx, (const void**)&x));
  TRY(input(ctx, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 3, dr, (const void**)&rel));
  TRY(input(ctx, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 3, dp, (const void**)&proj));
  TRY(input(ctx, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 2, dm, (const void**)&mask));
  TRY(input(ctx, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 2, dq, (const void**)&qb));
  TRY(input(ctx, 5, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1, dw, (const void**)&w2));
  TRY(input(ctx, 6, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1, db, (const void**)&b2));
  TRY(input(ctx, 7, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 1, di, (const void**)&idx));
  const int64_t U = dx[0], L = dx[1], D = dx[2], H = dp[2], N = dq[0];
  if (dr[0] != U || dr[1] != L || dr[2] != L || dp[0] != U || dp[1] != L || dm[0] != U ||
      dm[1] != L || dq[1] != H || dw[0] != H || db[0] != 1 || di[0] != N)
    return fail("SarnAttentivePool: inconsistent input shapes");

  float* out = NULL;
  TRY(output_nd(ctx, N, D, &out));
  if (N == 0) return NULL;

  int64_t *ustart = NULL, *order = NULL; /* candidates bucketed by user */
  TRY(bucket("SarnAttentivePool", idx, N, U, &ustart, &order));

  const size_t lanes = 16; /* scratch sized for the widest pass (NV = 2, 8 lanes) */
  float* qv = (float*)aligned((size_t)H * lanes * sizeof(float));
  float* acc = (float*)aligned((size_t)D * lanes * sizeof(float));
  float* g = (float*)aligned((size_t)L * lanes * sizeof(float));
  float* arow = (float*)aligned((size_t)L * H * sizeof(float));
  float* grow = (float*)aligned((size_t)L * D * sizeof(float));
  OrtStatus* st = NULL;
  if (!qv || !acc || !g || !arow || !grow) {
    st = g_api->CreateStatus(ORT_FAIL, "SarnAttentivePool: out of memory");
  } else {
#if defined(__x86_64__) || defined(__i386__)
    if (use_avx2())
      k_avx2_sarn(x, rel, proj, mask, qb, w2, b2[0], order, ustart, U, L, D, H, out,
                     (v8f*)qv, (v8f*)acc, (v8f*)g, arow, grow);
    else
      k_sse2_sarn(x, rel, proj, mask, qb, w2, b2[0], order, ustart, U, L, D, H, out,
                     (v4f*)qv, (v4f*)acc, (v4f*)g, arow, grow);
#else
    k_generic_sarn(x, rel, proj, mask, qb, w2, b2[0], order, ustart, U, L, D, H, out,
                      (v4f*)qv, (v4f*)acc, (v4f*)g, arow, grow);
#endif
  }
  free(qv), free(acc), free(g), free(arow), free(grow), free(ustart), free(order);
  return st;
}


/* ---------------------------------------------------------------- DinAttentionPool */
static int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

#define DIN_OP "DinAttentionPool"
static OrtStatus* ORT_API_CALL din_compute(void* op_kernel, OrtKernelContext* ctx) {
  (void)op_kernel;
  const float *hist, *mask, *t, *w1, *b1, *dp1, *w2, *b2, *dp2, *w3, *b3;
  const int64_t* idx;
  int64_t dh[3], dm[2], dt[2], di[1], dw1[2], db1[1], dd1[2], dw2[2], db2[1], dd2[2], dw3[1], db3[1];
  const ONNXTensorElementDataType F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  TRY(input_of(DIN_OP, ctx, 0, F, 3, dh, (const void**)&hist));
  TRY(input_of(DIN_OP, ctx, 1, F, 2, dm, (const void**)&mask));
  TRY(input_of(DIN_OP, ctx, 2, F, 2, dt, (const void**)&t));
  TRY(input_of(DIN_OP, ctx, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 1, di, (const void**)&idx));
  TRY(input_of(DIN_OP, ctx, 4, F, 2, dw1, (const void**)&w1));
  TRY(input_of(DIN_OP, ctx, 5, F, 1, db1, (const void**)&b1));
  TRY(input_of(DIN_OP, ctx, 6, F, 2, dd1, (const void**)&dp1));
  TRY(input_of(DIN_OP, ctx, 7, F, 2, dw2, (const void**)&w2));
  TRY(input_of(DIN_OP, ctx, 8, F, 1, db2, (const void**)&b2));
  TRY(input_of(DIN_OP, ctx, 9, F, 2, dd2, (const void**)&dp2));
  TRY(input_of(DIN_OP, ctx, 10, F, 1, dw3, (const void**)&w3));
  TRY(input_of(DIN_OP, ctx, 11, F, 1, db3, (const void**)&b3));
  const int64_t U = dh[0], L = dh[1], D = dh[2], N = dt[0], A1 = dw1[0], A2 = dw2[0];
  if (dm[0] != U || dm[1] != L || dt[1] != D || di[0] != N || dw1[1] != 4 * D || db1[0] != A1 ||
      dd1[0] != 3 || dd1[1] != A1 || dw2[1] != A1 || db2[0] != A2 || dd2[0] != 3 ||
      dd2[1] != A2 || dw3[0] != A2 || db3[0] != 1)
    return fail(DIN_OP ": inconsistent input shapes");
  float* out = NULL;
  TRY(output_nd(ctx, N, D, &out));
  if (N == 0) return NULL;
  int64_t *ustart = NULL, *order = NULL;
  TRY(bucket(DIN_OP, idx, N, U, &ustart, &order));

  const int64_t A1p = pad8(A1), A2p = pad8(A2);
  const size_t f = sizeof(float);
  size_t sizes[17] = {(size_t)(D * A1p), (size_t)(D * A1p), (size_t)(D * A1p), (size_t)A1p,
                      (size_t)(3 * A1p), (size_t)(A1p * A2p), (size_t)A2p, (size_t)(3 * A2p),
                      (size_t)A2p, (size_t)(L * D), (size_t)L, (size_t)(L * A1p),
                      (size_t)(D * A1p), (size_t)A1p, (size_t)(L * A1p), (size_t)(L * A2p), 0};
  float* buf[16];
  int ok = 1;
  for (int k = 0; k < 16; ++k) {
    buf[k] = (float*)aligned(sizes[k] * f);
    if (buf[k]) memset(buf[k], 0, sizes[k] * f); else ok = 0;
  }
  OrtStatus* st = NULL;
  if (!ok) {
    st = g_api->CreateStatus(ORT_FAIL, DIN_OP ": out of memory");
  } else {
    float *whd = buf[0], *wtd = buf[1], *wp = buf[2], *pb1 = buf[3], *pd1 = buf[4];
    float *pw2 = buf[5], *pb2 = buf[6], *pd2 = buf[7], *pw3 = buf[8];
    /* pack: W1 = [W_h | W_t | W_d | W_p] over [h, t, h−t, h⊙t], rows = units */
    for (int64_t o = 0; o < A1; ++o) {
      const float* row = w1 + o * 4 * D;
      for (int64_t d = 0; d < D; ++d) {
        whd[d * A1p + o] = row[d] + row[2 * D + d];
        wtd[d * A1p + o] = row[D + d] - row[2 * D + d];
        wp[d * A1p + o] = row[3 * D + d];
      }
      pb1[o] = b1[o];
      for (int k = 0; k < 3; ++k) pd1[k * A1p + o] = dp1[k * A1 + o];
      for (int64_t p2 = 0; p2 < A2; ++p2) pw2[o * A2p + p2] = w2[p2 * A1 + o];
    }
    for (int64_t p2 = 0; p2 < A2; ++p2) {
      pb2[p2] = b2[p2];
      pw3[p2] = w3[p2];
      for (int k = 0; k < 3; ++k) pd2[k * A2p + p2] = dp2[k * A2 + p2];
    }
#if defined(__x86_64__) || defined(__i386__)
    if (use_avx2())
      k_avx2_din(hist, mask, t, order, ustart, U, L, D, A1p, A2p, whd, wtd, wp, pb1, pd1, pw2,
                 pb2, pd2, pw3, b3[0], out, buf[9], buf[10], buf[11], buf[12], buf[13], buf[14],
                 buf[15]);
    else
      k_sse2_din(hist, mask, t, order, ustart, U, L, D, A1p, A2p, whd, wtd, wp, pb1, pd1, pw2,
                 pb2, pd2, pw3, b3[0], out, buf[9], buf[10], buf[11], buf[12], buf[13], buf[14],
                 buf[15]);
#else
    k_generic_din(hist, mask, t, order, ustart, U, L, D, A1p, A2p, whd, wtd, wp, pb1, pd1, pw2,
                  pb2, pd2, pw3, b3[0], out, buf[9], buf[10], buf[11], buf[12], buf[13], buf[14],
                  buf[15]);
#endif
  }
  for (int k = 0; k < 16; ++k) free(buf[k]);
  free(ustart), free(order);
  return st;
}

static OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* api,
                                             const OrtKernelInfo* info, void** kernel) {
  (void)op, (void)info;
  Kernel* k = (Kernel*)malloc(sizeof(Kernel));
  if (!k) return api->CreateStatus(ORT_FAIL, "SarnAttentivePool: out of memory");
  k->api = api;
  *kernel = k;
  return NULL;
}

static void ORT_API_CALL destroy_kernel(void* kernel) { free(kernel); }
static const char* ORT_API_CALL op_name(const OrtCustomOp* op) { (void)op; return "SarnAttentivePool"; }
static const char* ORT_API_CALL din_name(const OrtCustomOp* op) { (void)op; return DIN_OP; }
static size_t ORT_API_CALL din_inputs(const OrtCustomOp* op) { (void)op; return 12; }
static ONNXTensorElementDataType ORT_API_CALL din_input_type(const OrtCustomOp* op, size_t i) {
  (void)op;
  return i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static const char* ORT_API_CALL op_provider(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static size_t ORT_API_CALL n_inputs(const OrtCustomOp* op) { (void)op; return 8; }
static size_t ORT_API_CALL n_outputs(const OrtCustomOp* op) { (void)op; return 1; }
static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp* op, size_t i) {
  (void)op;
  return i == 7 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp* op, size_t i) {
  (void)op, (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp* op, size_t i) {
  (void)op, (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL input_memory(const OrtCustomOp* op, size_t i) {
  (void)op, (void)i;
  return OrtMemTypeDefault;
}
static int ORT_API_CALL one(const OrtCustomOp* op) { (void)op; return 1; }
static int ORT_API_CALL zero(const OrtCustomOp* op) { (void)op; return 0; }

static OrtCustomOp g_sarn_op, g_din_op;

static void init_op(void) {
  memset(&g_sarn_op, 0, sizeof g_sarn_op);
  g_sarn_op.version = SLATECTR_API_VERSION;
  g_sarn_op.GetName = op_name;
  g_sarn_op.GetExecutionProviderType = op_provider;
  g_sarn_op.GetInputType = input_type;
  g_sarn_op.GetInputTypeCount = n_inputs;
  g_sarn_op.GetOutputType = output_type;
  g_sarn_op.GetOutputTypeCount = n_outputs;
  g_sarn_op.KernelDestroy = destroy_kernel;
  g_sarn_op.GetInputCharacteristic = required;
  g_sarn_op.GetOutputCharacteristic = required;
  g_sarn_op.GetInputMemoryType = input_memory;
  g_sarn_op.GetVariadicInputMinArity = one;
  g_sarn_op.GetVariadicInputHomogeneity = zero;
  g_sarn_op.GetVariadicOutputMinArity = one;
  g_sarn_op.GetVariadicOutputHomogeneity = zero;
  g_sarn_op.CreateKernelV2 = create_kernel;
  g_sarn_op.KernelComputeV2 = compute;
  g_din_op = g_sarn_op;
  g_din_op.GetName = din_name;
  g_din_op.GetInputTypeCount = din_inputs;
  g_din_op.GetInputType = din_input_type;
  g_din_op.KernelComputeV2 = din_compute;
}

/* The entry point ORT looks up (SessionOptions.register_custom_ops_library). Each call adds a
 * fresh domain to `options`; domains live as long as the process (ORT does not own them). */
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(SLATECTR_API_VERSION);
  if (api == NULL) return NULL; /* cannot even report: ORT < 1.16 */
  g_api = api;
  if (g_sarn_op.version == 0) init_op();
  OrtCustomOpDomain* domain = NULL;
  OrtStatus* st = api->CreateCustomOpDomain("slatectr", &domain);
  if (st == NULL) st = api->CustomOpDomain_Add(domain, &g_sarn_op);
  if (st == NULL) st = api->CustomOpDomain_Add(domain, &g_din_op);
  if (st == NULL) st = api->AddCustomOpDomain(options, domain);
  return st;
}

/* For the loader: which kernel this machine runs (0 = baseline, 1 = AVX2+FMA). */
__attribute__((visibility("default"))) int slatectr_ops_isa(void) { return use_avx2(); }

/* For the loader: the version of the "slatectr" op set these kernels implement, compared with
 * the one a graph was exported for (runtime.ortops.DOMAIN_VERSION; bumped with any op's
 * inputs or semantics, since ORT itself does not check custom-domain versions). */
#define SLATECTR_DOMAIN_VERSION 1
__attribute__((visibility("default"))) int slatectr_ops_domain_version(void) {
  return SLATECTR_DOMAIN_VERSION;
}
