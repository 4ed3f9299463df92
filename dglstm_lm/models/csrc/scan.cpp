// Fused time loop of one (depth-gated) LSTM layer, forward and backward, for the CPU.
//
// Everything that does not depend on h_{t-1} is computed outside, for all T steps at once, by ordinary
// PyTorch ops (one GEMM per input projection); this file only runs the recurrence:
//
//   z_t   = gx_t + W_hh h_{t-1}                           (one small GEMM per step)
//   i,f,o = sigmoid(z + peepholes),  g = tanh(z_g),  f = 1 - i when the gates are coupled
//   d_t   = sigmoid(gd_t + w_cd * c_{t-1})                (depth gate; gd_t already holds b_d + W_xd x + w_ld c^L)
//   c_t   = d_t * m_t + f * c_{t-1} + i * g               (m_t: the lower layer's cell, or a projection of it)
//   h_t   = o * tanh(c_t)
//
// The backward pass walks the steps in reverse doing only dh_{t-1} = dz_t W_hh plus elementwise work; the
// weight gradient dW_hh is one GEMM over all steps afterwards (the layout cuDNN uses). The gate activations
// and tanh(c_t) are saved by the forward pass, so the backward pass evaluates no transcendental function.
//
// Gate layout along the last dimension: [i, f, g, o] (nn.LSTM's order), or [i, g, o] when coupled.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/native/CPUBlas.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kGrain = 1 << 11;  // elements per parallel chunk; one step is B*H elements (20 x 200: two chunks)

// The per-row loops are plain loops that GCC vectorises; each is compiled three times (GCC on x86-64):
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline SSE2, in out-of-line wrappers (inlined into
// at::parallel_for's lambda GCC stops vectorising them). The wrapper is chosen once per process: the widest
// the CPU has and torch's own kernels use, so ATEN_CPU_CAPABILITY=avx2 emulates an AVX2 machine here too.
// The binary stays portable across the nodes of a cluster; no -march=native.
// (GCC 12 or later: __builtin_cpu_supports("x86-64-v4") and target("arch=x86-64-v4") are new in it.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define DGLSTM_X86_VARIANTS 1
#endif
#define DGLSTM_ROW_BODY inline __attribute__((always_inline))

enum class RowIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

RowIsa detect_row_isa() {
#ifdef DGLSTM_X86_VARIANTS
  const std::string aten = at::get_cpu_capability();  // "AVX512", "AVX2" or "DEFAULT"; honours ATEN_CPU_CAPABILITY
  __builtin_cpu_init();
  if (aten == "AVX512" && __builtin_cpu_supports("x86-64-v4")) return RowIsa::kAvx512;
  if ((aten == "AVX512" || aten == "AVX2") && __builtin_cpu_supports("x86-64-v3")) return RowIsa::kAvx2;
#endif
  return RowIsa::kBaseline;
}

RowIsa row_isa() {
  static const RowIsa isa = detect_row_isa();
  return isa;
}

// NAME_v4 / NAME_v3 / NAME_base<scalar_t, flags...>(args...): NAME's body compiled for each instruction set.
#ifdef DGLSTM_X86_VARIANTS
#define DGLSTM_ROW_VARIANTS(NAME)                                                                          \
  template <typename scalar_t, bool C, bool P, bool D, typename... A>                                     \
  __attribute__((noinline, target("arch=x86-64-v4"))) void NAME##_v4(A... a) {                             \
    NAME<scalar_t, C, P, D>(a...);                                                                         \
  }                                                                                                        \
  template <typename scalar_t, bool C, bool P, bool D, typename... A>                                     \
  __attribute__((noinline, target("arch=x86-64-v3"))) void NAME##_v3(A... a) {                             \
    NAME<scalar_t, C, P, D>(a...);                                                                         \
  }                                                                                                        \
  template <typename scalar_t, bool C, bool P, bool D, typename... A>                                     \
  __attribute__((noinline)) void NAME##_base(A... a) {                                                     \
    NAME<scalar_t, C, P, D>(a...);                                                                         \
  }
// DGLSTM_CALL_ROW(NAME, isa, <template args>(call args)): the variant for isa.
#define DGLSTM_CALL_ROW(NAME, ISA, ...)      \
  do {                                       \
    switch (ISA) {                           \
      case RowIsa::kAvx512:                  \
        NAME##_v4 __VA_ARGS__;               \
        break;                               \
      case RowIsa::kAvx2:                    \
        NAME##_v3 __VA_ARGS__;               \
        break;                               \
      default:                               \
        NAME##_base __VA_ARGS__;             \
    }                                        \
  } while (0)
#else
#define DGLSTM_ROW_VARIANTS(NAME)                                                                          \
  template <typename scalar_t, bool C, bool P, bool D, typename... A>                                     \
  __attribute__((noinline)) void NAME##_base(A... a) {                                                     \
    NAME<scalar_t, C, P, D>(a...);                                                                         \
  }
#define DGLSTM_CALL_ROW(NAME, ISA, ...) NAME##_base __VA_ARGS__
#endif

// exp for float in plain arithmetic (Cephes' expf: relative error below 2e-7), so that GCC vectorises the
// step loops without -ffast-math: glibc's vector expf needs finite-math assumptions, and this kernel must let
// NaN and inf through for the trainer's divergence check. exp(x) is exactly 0 below -87.3 and inf above 88.7,
// so a gate driven far negative is exactly shut. double uses std::exp (gradcheck runs in double).
inline float exp_(float x) {
  const float xc = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float p;
  std::memcpy(&p, &bits, sizeof p);
  const float e = y * p;  // NaN stays NaN through y
  return x > 88.7f ? std::numeric_limits<float>::infinity() : (x < -87.3f ? 0.0f : e);
}
inline double exp_(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}
template <typename T>
inline T tanh_(T x) {
  return T(2) / (T(1) + exp_(T(-2) * x)) - T(1);
}

struct Flags {
  bool coupled;
  bool peephole;
  bool depth;
};

const Tensor& need(const std::optional<Tensor>& t, const char* name) {
  TORCH_CHECK(t.has_value() && t->defined(), "scan: missing tensor ", name);
  return *t;
}

// One forward step for one batch row: the pre-activations are zh + zx (G*H each: W_hh h_{t-1} from the GEMM,
// gx_t from the caller); writes the K*H saved activations, c_t, tanh(c_t) and h_t. A plain loop over units
// with restrict pointers, so GCC vectorises it.
template <typename scalar_t, bool COUPLED, bool PEEP, bool DEPTH>
DGLSTM_ROW_BODY void forward_row(int64_t H, const scalar_t* __restrict zh, const scalar_t* __restrict zx,
                 const scalar_t* __restrict gd,
                 const scalar_t* __restrict m, const scalar_t* __restrict c_prev, const scalar_t* __restrict wci,
                 const scalar_t* __restrict wcf, const scalar_t* __restrict wco, const scalar_t* __restrict wcd,
                 scalar_t* __restrict acts, scalar_t* __restrict c_out, scalar_t* __restrict tc_out,
                 scalar_t* __restrict h_out) {
  constexpr int64_t G = COUPLED ? 3 : 4;
  for (int64_t j = 0; j < H; ++j) {
    const scalar_t cp = c_prev[j];
    scalar_t zi = zh[j] + zx[j];
    if (PEEP) zi += wci[j] * cp;
    const scalar_t i = sigmoid(zi);
    scalar_t f, g, zo;
    if (COUPLED) {
      f = scalar_t(1) - i;
      g = tanh_(zh[H + j] + zx[H + j]);
      zo = zh[2 * H + j] + zx[2 * H + j];
    } else {
      scalar_t zf = zh[H + j] + zx[H + j];
      if (PEEP) zf += wcf[j] * cp;
      f = sigmoid(zf);
      g = tanh_(zh[2 * H + j] + zx[2 * H + j]);
      zo = zh[3 * H + j] + zx[3 * H + j];
    }
    scalar_t c = f * cp + i * g;
    if (DEPTH) {
      const scalar_t d = sigmoid(gd[j] + wcd[j] * cp);
      c += d * m[j];
      acts[G * H + j] = d;
    }
    if (PEEP) zo += wco[j] * c;
    const scalar_t o = sigmoid(zo);
    const scalar_t tc = tanh_(c);
    c_out[j] = c;
    tc_out[j] = tc;
    h_out[j] = o * tc;
    acts[j] = i;
    if (COUPLED) {
      acts[H + j] = g;
      acts[2 * H + j] = o;
    } else {
      acts[H + j] = f;
      acts[2 * H + j] = g;
      acts[3 * H + j] = o;
    }
  }
}

DGLSTM_ROW_VARIANTS(forward_row)

// One backward step for one batch row. On entry dc holds the gradient reaching c_t from step t+1, gc the
// gradient reaching it from outside the layer; the gradient reaching h_t is gh (from outside) + dhr (dz_{t+1}
// W_hh). Writes dz (gate pre-activations), dgd and dm, and replaces dc by the gradient reaching c_{t-1}
// through this step.
template <typename scalar_t, bool COUPLED, bool PEEP, bool DEPTH>
DGLSTM_ROW_BODY void backward_row(int64_t H, const scalar_t* __restrict acts, const scalar_t* __restrict tanh_c,
                  const scalar_t* __restrict c_prev, const scalar_t* __restrict m, const scalar_t* __restrict gh,
                  const scalar_t* __restrict dhr, const scalar_t* __restrict gc,
                  const scalar_t* __restrict wci, const scalar_t* __restrict wcf, const scalar_t* __restrict wco,
                  const scalar_t* __restrict wcd, scalar_t* __restrict dc, scalar_t* __restrict dz,
                  scalar_t* __restrict dgd, scalar_t* __restrict dm) {
  constexpr int64_t G = COUPLED ? 3 : 4;
  for (int64_t j = 0; j < H; ++j) {
    const scalar_t i = acts[j];
    const scalar_t f = COUPLED ? scalar_t(1) - i : acts[H + j];
    const scalar_t g = COUPLED ? acts[H + j] : acts[2 * H + j];
    const scalar_t o = COUPLED ? acts[2 * H + j] : acts[3 * H + j];
    const scalar_t tc = tanh_c[j];
    const scalar_t cp = c_prev[j];
    const scalar_t dhj = gh[j] + dhr[j];

    const scalar_t dzo = dhj * tc * o * (scalar_t(1) - o);
    scalar_t dcj = (dc[j] + gc[j]) + dhj * o * (scalar_t(1) - tc * tc);
    if (PEEP) dcj += dzo * wco[j];
    scalar_t dcp = dcj * f;
    if (DEPTH) {
      const scalar_t d = acts[G * H + j];
      const scalar_t dzd = dcj * m[j] * d * (scalar_t(1) - d);
      dgd[j] = dzd;
      dm[j] = dcj * d;
      dcp += dzd * wcd[j];
    }
    const scalar_t dzg = dcj * i * (scalar_t(1) - g * g);
    if (COUPLED) {
      // f = 1 - i: the forget path's gradient reaches i with the opposite sign.
      const scalar_t dzi = dcj * (g - cp) * i * (scalar_t(1) - i);
      if (PEEP) dcp += dzi * wci[j];
      dz[j] = dzi;
      dz[H + j] = dzg;
      dz[2 * H + j] = dzo;
    } else {
      const scalar_t dzi = dcj * g * i * (scalar_t(1) - i);
      const scalar_t dzf = dcj * cp * f * (scalar_t(1) - f);
      if (PEEP) dcp += dzi * wci[j] + dzf * wcf[j];
      dz[j] = dzi;
      dz[H + j] = dzf;
      dz[2 * H + j] = dzg;
      dz[3 * H + j] = dzo;
    }
    dc[j] = dcp;
  }
}

DGLSTM_ROW_VARIANTS(backward_row)

template <typename scalar_t, bool COUPLED, bool PEEP, bool DEPTH>
void forward_step(int64_t B, int64_t H, const scalar_t* zh, const scalar_t* zx, const scalar_t* gd, const scalar_t* m,
                  const scalar_t* c_prev, const scalar_t* wci, const scalar_t* wcf, const scalar_t* wco,
                  const scalar_t* wcd, scalar_t* acts, scalar_t* c_out, scalar_t* tc_out, scalar_t* h_out) {
  constexpr int64_t G = COUPLED ? 3 : 4;
  constexpr int64_t K = G + (DEPTH ? 1 : 0);  // saved activations per unit
  const RowIsa isa = row_isa();
  at::parallel_for(0, B, std::max<int64_t>(1, kGrain / H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b * H;
      DGLSTM_CALL_ROW(forward_row, isa, <scalar_t, COUPLED, PEEP, DEPTH>(H, zh + b * G * H, zx + b * G * H, DEPTH ? gd + r : nullptr, DEPTH ? m + r : nullptr,
                                                  c_prev + r, wci, wcf, wco, wcd, acts + b * K * H, c_out + r,
                                                  tc_out + r, h_out + r));
    }
  });
}

template <typename scalar_t, bool COUPLED, bool PEEP, bool DEPTH>
void backward_step(int64_t B, int64_t H, const scalar_t* acts, const scalar_t* tanh_c, const scalar_t* c_prev,
                   const scalar_t* m, const scalar_t* gh, const scalar_t* dhr, const scalar_t* gc, const scalar_t* wci, const scalar_t* wcf,
                   const scalar_t* wco, const scalar_t* wcd, scalar_t* dc, scalar_t* dz, scalar_t* dgd,
                   scalar_t* dm) {
  constexpr int64_t G = COUPLED ? 3 : 4;
  constexpr int64_t K = G + (DEPTH ? 1 : 0);
  const RowIsa isa = row_isa();
  at::parallel_for(0, B, std::max<int64_t>(1, kGrain / H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b * H;
      DGLSTM_CALL_ROW(backward_row, isa, <scalar_t, COUPLED, PEEP, DEPTH>(H, acts + b * K * H, tanh_c + r, c_prev + r,
                                                   DEPTH ? m + r : nullptr, gh + r, dhr + r, gc + r, wci, wcf, wco, wcd, dc + r,
                                                   dz + b * G * H, DEPTH ? dgd + r : nullptr,
                                                   DEPTH ? dm + r : nullptr));
    }
  });
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<scalar_t>() : nullptr;
}

#define DISPATCH_FLAGS(FLAGS, FN, ...)                                     \
  do {                                                                     \
    if (FLAGS.coupled) {                                                   \
      if (FLAGS.peephole) {                                                \
        if (FLAGS.depth) FN<scalar_t, true, true, true>(__VA_ARGS__);      \
        else FN<scalar_t, true, true, false>(__VA_ARGS__);                 \
      } else {                                                             \
        if (FLAGS.depth) FN<scalar_t, true, false, true>(__VA_ARGS__);     \
        else FN<scalar_t, true, false, false>(__VA_ARGS__);                \
      }                                                                    \
    } else {                                                               \
      if (FLAGS.peephole) {                                                \
        if (FLAGS.depth) FN<scalar_t, false, true, true>(__VA_ARGS__);     \
        else FN<scalar_t, false, true, false>(__VA_ARGS__);                \
      } else {                                                             \
        if (FLAGS.depth) FN<scalar_t, false, false, true>(__VA_ARGS__);    \
        else FN<scalar_t, false, false, false>(__VA_ARGS__);               \
      }                                                                    \
    }                                                                      \
  } while (0)

std::vector<int64_t> h_shape(int64_t T, int64_t B, int64_t H) { return {T, B, H}; }

void check_input(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "scan: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "scan: ", name, " must be contiguous");
}

// The per-step GEMM z = X W^T (X: h_{t-1}, [B, H]; or, backward, dz_t W_hh as X = dz_t, W = W_hh^T) has
// four paths (kPlain, kMkl, kOneDnn, kBrgemm), chosen by the caller (kernels.py) per CPU, precision and width:
//   kPlain   at::mm on the plain weight (torch's BLAS).
//   kMkl     MKL's packed GEMM as torch registers it (mkl::_mkl_linear: X ORI_W^T with ORI_W pre-packed for
//            X's row count by mkl::_mkl_reorder_linear_weight). A recurrence multiplies the same small weight
//            by a new X at every step, the case a packed B matrix is for: MKL skips re-packing W at each call,
//            most of an M = 20 GEMM's time. Fast on Intel; MKL picks its code by CPU vendor, and on AMD it
//            runs a generic path.
//   kOneDnn  oneDNN's inner product on a weight reordered once per window into its blocked layout
//            (mkldnn::_reorder_linear_weight + mkldnn::_linear_pointwise, what torch's own linear layers use).
//            oneDNN's JIT picks its code by instruction set, so it is fast on AMD as well; with a bfloat16
//            weight X is rounded to bfloat16 and the product accumulates in float32 (avx512_bf16, AMX).
// The ops are looked up by name at run time: a torch without MKL or oneDNN has no such op, and the caller
// then chooses kPlain.
//   kBrgemm  oneDNN's batch-reduce GEMM micro-kernel as torch exports it (at::native::cpublas::brgemm),
//            called per block of output columns, the blocks split over the threads, writing into the step's
//            own buffer: no operator dispatch, no output allocated per step. Its B matrix is the plain
//            [K, N] weight (W_hh^T forward, W_hh backward), so nothing is reordered. With a bfloat16 weight
//            (pack_brgemm_bf16: each block of kBrgemmBlock columns packed once per window in the VNNI order
//            the micro-kernel needs, which torch offers where the CPU has AMX) X is rounded to bfloat16 and
//            the product accumulates in float32 on AMX's tiles.
enum class Gemm : int64_t { kPlain = 0, kMkl = 1, kOneDnn = 2, kBrgemm = 3 };

constexpr int64_t kBrgemmBlock = 64;  // output columns per micro-kernel call

using MklLinearFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t);

const c10::TypedOperatorHandle<MklLinearFn>& mkl_linear() {
  static const c10::TypedOperatorHandle<MklLinearFn> op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkl::_mkl_linear", "").typed<MklLinearFn>();
  return op;
}

using OneDnnLinearFn = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                              c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);

const c10::TypedOperatorHandle<OneDnnLinearFn>& onednn_linear() {
  static const c10::TypedOperatorHandle<OneDnnLinearFn> op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "").typed<OneDnnLinearFn>();
  return op;
}

// One step's product X W^T into out (float32 or float64, [B, N]). w: the plain weight [N, K]; w_packed: its
// packing for the chosen path (MKL's, or oneDNN's in float32 or bfloat16); x_low: a bfloat16 buffer shaped
// like X, used when the oneDNN weight is bfloat16.
struct StepGemm {
  Gemm kind;
  const Tensor& w;         // [N, K]
  const Tensor* w_packed;  // kMkl / kOneDnn
  Tensor x_low;            // bfloat16 [B, K] (kOneDnn or kBrgemm with a bfloat16 weight), else undefined

  void operator()(const Tensor& x, Tensor& out) {
    switch (kind) {
      case Gemm::kMkl:
        out = mkl_linear().call(x, *w_packed, w, std::nullopt, x.size(0));
        return;
      case Gemm::kOneDnn:
        if (x_low.defined()) {
          x_low.copy_(x);
          out.copy_(onednn_linear().call(x_low, *w_packed, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt));
        } else {
          out = onednn_linear().call(x, *w_packed, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
        }
        return;
      case Gemm::kBrgemm: {
        if (x_low.defined()) {
          brgemm_bf16(x, out);
          return;
        }
#ifdef CPUBLAS_BRGEMM_F32F32F32
        const int64_t M = x.size(0), K = x.size(1), N = w_packed->size(1);
        const float* a = x.data_ptr<float>();
        const float* b = w_packed->data_ptr<float>();
        float* c = out.data_ptr<float>();
        at::parallel_for(0, (N + kBrgemmBlock - 1) / kBrgemmBlock, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t blk = b0; blk < b1; ++blk) {
            const int64_t n0 = blk * kBrgemmBlock, n = std::min(kBrgemmBlock, N - n0);
            at::native::cpublas::brgemm(M, n, K, K, N, N, false, a, b + n0, c + n0, false);
          }
        });
        return;
#else
        TORCH_CHECK(false, "scan: this torch has no float32 brgemm (model.backend=cpp_brgemm)");
#endif
      }
      default:
        at::mm_out(out, x, w.t());
    }
  }

  // kBrgemm with a bfloat16 weight packed by pack_brgemm_bf16 ([blocks, K, kBrgemmBlock]): X rounded to
  // bfloat16 once, then one micro-kernel call per block of output columns, the blocks split over the
  // threads; each thread hands back its AMX tiles when its blocks are done.
  void brgemm_bf16(const Tensor& x, Tensor& out) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
    x_low.copy_(x);
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    const at::BFloat16* a = x_low.data_ptr<at::BFloat16>();
    const at::BFloat16* b = w_packed->data_ptr<at::BFloat16>();
    float* c = out.data_ptr<float>();
    at::parallel_for(0, (N + kBrgemmBlock - 1) / kBrgemmBlock, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * kBrgemmBlock, n = std::min(kBrgemmBlock, N - n0);
        at::native::cpublas::brgemm(M, n, K, K, kBrgemmBlock, N, false, a, b + blk * K * kBrgemmBlock, c + n0, true);
      }
      at::native::cpublas::brgemm_release(true);
    });
#else
    TORCH_CHECK(false, "scan: this torch has no bfloat16 brgemm");
#endif
  }
};

StepGemm make_gemm(int64_t kind, const Tensor& w, const std::optional<Tensor>& w_packed, const Tensor& x_like) {
  const auto g = static_cast<Gemm>(kind);
  TORCH_CHECK(g == Gemm::kPlain || g == Gemm::kMkl || g == Gemm::kOneDnn || g == Gemm::kBrgemm,
              "scan: unknown GEMM path ", kind);
  const bool packed = g != Gemm::kPlain;
  TORCH_CHECK(!packed || (w_packed.has_value() && w_packed->defined()), "scan: this GEMM path needs a packed weight");
  TORCH_CHECK(!packed || x_like.scalar_type() == at::kFloat, "scan: the packed GEMMs are float32 only");
  TORCH_CHECK(g != Gemm::kMkl || w_packed->scalar_type() == at::kFloat, "scan: MKL's packed weight is float32");
  const bool low = packed && w_packed->scalar_type() == at::kBFloat16;
  if (g == Gemm::kBrgemm && low) {
    const int64_t K = x_like.size(1), N = w.size(0);
    TORCH_CHECK(w_packed->is_contiguous() && w_packed->dim() == 3 &&
                    w_packed->size(0) == (N + kBrgemmBlock - 1) / kBrgemmBlock && w_packed->size(1) == K &&
                    w_packed->size(2) == kBrgemmBlock,
                "scan: the bfloat16 brgemm weight must be pack_brgemm_bf16's [blocks, K, ", kBrgemmBlock, "]");
  } else if (g == Gemm::kBrgemm) {
    check_input(*w_packed, "the brgemm weight");
    TORCH_CHECK(w_packed->dim() == 2 && w_packed->size(0) == x_like.size(1), "scan: the brgemm weight must be [K, N]");
  } else if (packed) {
    check_input(w, "w_hh");
  }
  Tensor x_low;
  if ((g == Gemm::kOneDnn || g == Gemm::kBrgemm) && low) x_low = at::empty_like(x_like, at::kBFloat16);
  return StepGemm{g, w, packed ? &*w_packed : nullptr, x_low};
}

}  // namespace

// w^T as a new contiguous tensor, in 32 x 32 tiles split over the threads: W_hh^T for the backward pass's
// packed GEMM. (Tensor.t().contiguous() walks one side with a stride of a whole row: several times slower
// at 650 x 2600.)
Tensor transpose_weight(const Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "transpose_weight: w must be 2-D");
  const Tensor src = w.contiguous();
  const int64_t R = src.size(0), C = src.size(1);
  auto out = at::empty({C, R}, src.options());
  constexpr int64_t kTile = 32;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, src.scalar_type(), "transpose_weight", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (R + kTile - 1) / kTile, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t rb = b0 * kTile; rb < std::min(R, b1 * kTile); rb += kTile) {
        const int64_t re = std::min(R, rb + kTile);
        for (int64_t cb = 0; cb < C; cb += kTile) {
          const int64_t ce = std::min(C, cb + kTile);
          for (int64_t c = cb; c < ce; ++c) {
            for (int64_t r = rb; r < re; ++r) o[c * R + r] = in[r * C + c];
          }
        }
      }
    });
  });
  return out;
}

// The instruction set the fused rows run with here (see row_isa above).
std::string fused_row_isa() {
  switch (row_isa()) {
    case RowIsa::kAvx512:
      return "AVX-512";
    case RowIsa::kAvx2:
      return "AVX2";
    default:
      return "baseline";
  }
}

// Whether this torch has MKL's packed GEMM (see mkl_linear above).
bool has_packed_gemm() {
  return c10::Dispatcher::singleton().findSchema({"mkl::_mkl_linear", ""}).has_value() &&
         c10::Dispatcher::singleton().findSchema({"mkl::_mkl_reorder_linear_weight", ""}).has_value();
}

// Whether this torch has oneDNN's inner product on a reordered weight (see onednn_linear above).
bool has_onednn_gemm() {
  return c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""}).has_value() &&
         c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""}).has_value();
}

// w ([N, K], any strides) for kBrgemm in bfloat16: w^T rounded to bfloat16, each block of kBrgemmBlock
// columns packed in the micro-kernel's VNNI order (the last block padded with zeros): [blocks, K, block].
Tensor pack_brgemm_bf16(const Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack_brgemm_bf16: w must be 2-D");
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  TORCH_CHECK(at::native::cpublas::could_pack(at::kBFloat16), "pack_brgemm_bf16: no bfloat16 brgemm on this CPU (AMX)");
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kBrgemmBlock - 1) / kBrgemmBlock;
  TORCH_CHECK(K % 2 == 0, "pack_brgemm_bf16: K must be even (bfloat16 pairs), got ", K);
  const Tensor wt = w.t().to(at::kBFloat16);  // [K, N]
  auto out = at::zeros({blocks, K, kBrgemmBlock}, wt.options());
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n0 = blk * kBrgemmBlock, n = std::min(kBrgemmBlock, N - n0);
    const Tensor src = wt.narrow(1, n0, n).contiguous();
    at::native::cpublas::pack(K, n, n, kBrgemmBlock, at::kBFloat16, at::kBFloat16, src.data_ptr<at::BFloat16>(),
                              out[blk].data_ptr<at::BFloat16>());
  }
  return out;
#else
  TORCH_CHECK(false, "pack_brgemm_bf16: this torch has no bfloat16 brgemm");
#endif
}

// Whether this torch and CPU run oneDNN's brgemm micro-kernel in bfloat16 (torch packs its weight only where
// the CPU has AMX).
bool has_brgemm_bf16() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  return at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

// Whether this torch exports oneDNN's brgemm micro-kernel in float32 (at::native::cpublas::brgemm).
bool has_brgemm() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  return true;
#else
  return false;
#endif
}

// Returns {h_all [T,B,H], c_all [T,B,H], acts [T,B,K*H], tanh_c [T,B,H]}. gemm: the per-step GEMM's path
// (Gemm above); w_packed: W_hh packed for B rows for that path, or none for kPlain. save=false (no backward
// will follow) keeps acts and tanh_c for one step only, reused at every step: [1,B,K*H] and [1,B,H].
std::vector<Tensor> scan_forward(const Tensor& gx, const std::optional<Tensor>& gd, const std::optional<Tensor>& m,
                                 const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                                 const std::optional<Tensor>& wci, const std::optional<Tensor>& wcf,
                                 const std::optional<Tensor>& wco, const std::optional<Tensor>& wcd, bool coupled,
                                 int64_t gemm, const std::optional<Tensor>& w_packed, bool save) {
  const Flags flags{coupled, wci.has_value() && wci->defined(), gd.has_value() && gd->defined()};
  const int64_t T = gx.size(0), B = gx.size(1), H = h0.size(1);
  const int64_t G = coupled ? 3 : 4, K = G + (flags.depth ? 1 : 0);
  TORCH_CHECK(gx.dim() == 3 && gx.size(2) == G * H, "scan: gx must be [T, B, ", G, "*H]");
  TORCH_CHECK(w_hh.size(0) == G * H && w_hh.size(1) == H, "scan: w_hh must be [", G, "*H, H]");
  check_input(gx, "gx");
  check_input(h0, "h0");
  check_input(c0, "c0");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == B && c0.sizes() == h0.sizes(), "scan: h0 and c0 must be [B, H]");
  StepGemm step_gemm = make_gemm(gemm, w_hh, w_packed, h0);
  if (flags.depth) {
    check_input(*gd, "gd");
    check_input(need(m, "m"), "m");
    TORCH_CHECK(gd->sizes() == h_shape(T, B, H) && m->sizes() == h_shape(T, B, H), "scan: gd and m must be [T, B, H]");
    TORCH_CHECK(need(wcd, "wcd").numel() == H, "scan: wcd must have H elements");
  }
  for (const auto* p : {&wci, &wcf, &wco}) {
    TORCH_CHECK(!(p->has_value() && (*p)->defined()) || (*p)->numel() == H, "scan: peepholes must have H elements");
  }

  const int64_t T_saved = save ? T : 1;
  auto h_all = at::empty({T, B, H}, gx.options());
  auto c_all = at::empty({T, B, H}, gx.options());
  auto tanh_c = at::empty({T_saved, B, H}, gx.options());
  auto acts = at::empty({T_saved, B, K * H}, gx.options());
  auto zh = at::empty({B, G * H}, gx.options());

  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "scan_forward", [&] {
    const scalar_t* p_wci = ptr_or_null<scalar_t>(wci);
    const scalar_t* p_wcf = ptr_or_null<scalar_t>(wcf);
    const scalar_t* p_wco = ptr_or_null<scalar_t>(wco);
    const scalar_t* p_wcd = ptr_or_null<scalar_t>(wcd);
    for (int64_t t = 0; t < T; ++t) {
      const Tensor h_prev = t == 0 ? h0 : h_all[t - 1];
      const Tensor c_prev = t == 0 ? c0 : c_all[t - 1];
      step_gemm(h_prev, zh);
      const int64_t ts = save ? t : 0;
      const scalar_t* p_gd = flags.depth ? gd->data_ptr<scalar_t>() + t * B * H : nullptr;
      const scalar_t* p_m = flags.depth ? m->data_ptr<scalar_t>() + t * B * H : nullptr;
      DISPATCH_FLAGS(flags, forward_step, B, H, zh.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>() + t * B * G * H,
                     p_gd, p_m, c_prev.data_ptr<scalar_t>(), p_wci, p_wcf, p_wco, p_wcd,
                     acts.data_ptr<scalar_t>() + ts * B * K * H, c_all.data_ptr<scalar_t>() + t * B * H,
                     tanh_c.data_ptr<scalar_t>() + ts * B * H, h_all.data_ptr<scalar_t>() + t * B * H);
    }
  });
  return {h_all, c_all, acts, tanh_c};
}

// grad_h, grad_c: [T,B,H] gradients arriving at every h_t and c_t from outside the layer. gemm: the per-step
// GEMM's path (Gemm above); w_packed_t and w_hh_t: W_hh^T ([H, G*H], contiguous) and its packing for B rows
// for that path, or both none for kPlain. With a bfloat16 oneDNN weight the weight gradient's GEMM takes
// bfloat16 inputs too (float32 accumulation), as autocast would give it. In float32 dW_hh runs on oneDNN's
// inner product when wgrad_onednn is set and the per-step GEMM is oneDNN's (kOneDnn, kBrgemm); otherwise
// (the flag unset, or another path) on torch's BLAS (MKL's sgemm). Which is faster depends on the CPU and
// the width: wgrad_path in kernels.py decides the flag.
// Returns {d_gx, d_gd, d_m, d_h0, d_c0, d_w_hh, d_wci, d_wcf, d_wco, d_wcd}; entries the forward pass had
// no input for are undefined tensors (None in Python).
std::vector<Tensor> scan_backward(const Tensor& grad_h, const Tensor& grad_c, const Tensor& h0, const Tensor& c0,
                                  const Tensor& w_hh, const Tensor& h_all, const Tensor& c_all, const Tensor& acts,
                                  const Tensor& tanh_c, const std::optional<Tensor>& m,
                                  const std::optional<Tensor>& wci, const std::optional<Tensor>& wcf,
                                  const std::optional<Tensor>& wco, const std::optional<Tensor>& wcd, bool coupled,
                                  int64_t gemm, const std::optional<Tensor>& w_packed_t,
                                  const std::optional<Tensor>& w_hh_t, bool wgrad_onednn) {
  const Flags flags{coupled, wci.has_value() && wci->defined(), m.has_value() && m->defined()};
  const int64_t T = h_all.size(0), B = h_all.size(1), H = h_all.size(2);
  const int64_t G = coupled ? 3 : 4;
  TORCH_CHECK(acts.size(0) == T && tanh_c.size(0) == T, "scan: backward needs a forward pass with save=true");
  TORCH_CHECK(static_cast<Gemm>(gemm) == Gemm::kPlain || (w_hh_t.has_value() && w_hh_t->defined()),
              "scan: the packed GEMMs need w_hh_t");
  check_input(grad_h, "grad_h");
  check_input(grad_c, "grad_c");
  TORCH_CHECK(grad_h.sizes() == h_all.sizes() && grad_c.sizes() == h_all.sizes(), "scan: grad_h and grad_c must be [T, B, H]");
  const Tensor w_for_bwd = static_cast<Gemm>(gemm) == Gemm::kPlain ? w_hh.t() : *w_hh_t;  // [H, G*H]
  const auto d_gx_like = at::empty({B, G * H}, h_all.options());
  StepGemm step_gemm = make_gemm(gemm, w_for_bwd, w_packed_t, d_gx_like);
  const bool low = step_gemm.x_low.defined();

  auto d_gx = at::empty({T, B, G * H}, h_all.options());
  Tensor d_gd, d_m;
  if (flags.depth) {
    d_gd = at::empty({T, B, H}, h_all.options());
    d_m = at::empty({T, B, H}, h_all.options());
  }
  auto dh_rec = at::zeros({B, H}, h_all.options());  // dz_{t+1} W_hh: the recurrent part of the gradient at h_t
  auto dc = at::zeros({B, H}, h_all.options());

  AT_DISPATCH_FLOATING_TYPES(h_all.scalar_type(), "scan_backward", [&] {
    const scalar_t* p_wci = ptr_or_null<scalar_t>(wci);
    const scalar_t* p_wcf = ptr_or_null<scalar_t>(wcf);
    const scalar_t* p_wco = ptr_or_null<scalar_t>(wco);
    const scalar_t* p_wcd = ptr_or_null<scalar_t>(wcd);
    const int64_t K = acts.size(2) / H;
    for (int64_t t = T - 1; t >= 0; --t) {
      const Tensor c_prev = t == 0 ? c0 : c_all[t - 1];
      scalar_t* p_dgd = flags.depth ? d_gd.data_ptr<scalar_t>() + t * B * H : nullptr;
      scalar_t* p_dm = flags.depth ? d_m.data_ptr<scalar_t>() + t * B * H : nullptr;
      const scalar_t* p_m = flags.depth ? m->data_ptr<scalar_t>() + t * B * H : nullptr;
      DISPATCH_FLAGS(flags, backward_step, B, H, acts.data_ptr<scalar_t>() + t * B * K * H,
                     tanh_c.data_ptr<scalar_t>() + t * B * H, c_prev.data_ptr<scalar_t>(), p_m,
                     grad_h.data_ptr<scalar_t>() + t * B * H, dh_rec.data_ptr<scalar_t>(),
                     grad_c.data_ptr<scalar_t>() + t * B * H, p_wci, p_wcf, p_wco, p_wcd,
                     dc.data_ptr<scalar_t>(), d_gx.data_ptr<scalar_t>() + t * B * G * H, p_dgd, p_dm);
      step_gemm(d_gx[t], dh_rec);
    }
  });

  // dW_hh = sum_t dz_t^T h_{t-1}: one GEMM over steps 1..T-1 plus the first step's term.
  Tensor d_w_hh;
  if (low) {
    const auto h_prev_all = at::cat({h0.unsqueeze(0), h_all.narrow(0, 0, T - 1)}, 0).reshape({T * B, H});
    d_w_hh = at::mm(d_gx.reshape({T * B, G * H}).t().to(at::kBFloat16), h_prev_all.to(at::kBFloat16))
                 .to(h_all.scalar_type());
  } else {
    // one GEMM over all steps: h_{t-1} for every t (h0 first) as one [T*B, H] matrix (a first-step GEMM of
    // its own, [G*H, B] x [B, H], cost more than this copy)
    const auto h_prev_all = T > 1 ? at::cat({h0.unsqueeze(0), h_all.narrow(0, 0, T - 1)}, 0) : h0.unsqueeze(0);
    const auto dz_t = d_gx.reshape({T * B, G * H}).t();  // [G*H, T*B], a transposed view
    const bool onednn_path =
        step_gemm.kind == Gemm::kOneDnn || (step_gemm.kind == Gemm::kBrgemm && has_onednn_gemm());
    if (wgrad_onednn && onednn_path) {
      // oneDNN's inner product (it makes the transposed view dz_t contiguous first)
      d_w_hh = onednn_linear().call(dz_t, h_prev_all.reshape({T * B, H}).t(), std::nullopt, "none",
                                    c10::List<std::optional<c10::Scalar>>(), std::nullopt);
    } else {  // torch's BLAS (MKL's sgemm), which reads the transposed view as it is
      d_w_hh = at::mm(dz_t, h_prev_all.reshape({T * B, H}));
    }
  }

  Tensor d_wci, d_wcf, d_wco, d_wcd;
  if (flags.peephole || flags.depth) {
    // c_{t-1} for every step, and the per-gate slices of dz, as [T*B, H] views.
    const auto c_prev_all = at::cat({c0.unsqueeze(0), c_all.narrow(0, 0, T - 1)}, 0).reshape({T * B, H});
    const auto dz = d_gx.reshape({T * B, G * H});
    if (flags.peephole) {
      d_wci = (dz.narrow(1, 0, H) * c_prev_all).sum(0);
      if (!coupled) d_wcf = (dz.narrow(1, H, H) * c_prev_all).sum(0);
      d_wco = (dz.narrow(1, (G - 1) * H, H) * c_all.reshape({T * B, H})).sum(0);
    }
    if (flags.depth) d_wcd = (d_gd.reshape({T * B, H}) * c_prev_all).sum(0);
  }
  return {d_gx, d_gd, d_m, dh_rec, dc, d_w_hh, d_wci, d_wcf, d_wco, d_wcd};
}

// ---------------------------------------------------------------------------------------------------------
// The language model's loss: summed cross-entropy over the rows of logits [N, V] (float32 or bfloat16) in
// two passes over each row, computed in float32 whatever the logits' type. torch's F.cross_entropy makes five
// passes over N x V float32 values (under autocast bf16 seven, with the casts): log_softmax writes them,
// nll_loss's backward fills a zero gradient and scatters into it, log_softmax's backward reads two and writes
// one, and autocast casts the logits up and the gradient down. Here the forward reads each row twice (its
// maximum, then the sum of exp) and keeps two floats per row (see below); the backward reads each row
// once and writes its gradient, softmax minus the one-hot target, in the logits' own type. A row is one
// thread's work, and the rows' losses are summed in double in row order: the result does not depend on the
// thread count (on one machine: the AVX-512, AVX2 and baseline variants may round differently, e.g. where
// the compiler fuses a multiply-add). Each row keeps its maximum m and log(sum_j exp(x_j - m)) apart, so that the loss and the
// gradient are computed from x - m as torch's log_softmax does (exact where the logits are large).

// bfloat16 <-> float32 in plain integer arithmetic that GCC vectorises (round to nearest even; NaN stays NaN).
inline float load_f(const float* p, int64_t j) { return p[j]; }
inline float load_f(const at::BFloat16* p, int64_t j) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[j]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store_f(float* p, int64_t j, float v) { p[j] = v; }
inline void store_f(at::BFloat16* p, int64_t j, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[j] = static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

constexpr int64_t kLanes = 16;  // partial sums per row, so that GCC vectorises the sum

// One row's maximum m and log(sum_j exp(x_j - m)), into stats[0] and stats[1]. A NaN anywhere in the row makes
// the latter NaN (through the sum), like torch's.
template <typename scalar_t>
DGLSTM_ROW_BODY void row_logsumexp(const scalar_t* x, int64_t V, float* stats) {
  float m = -std::numeric_limits<float>::infinity();
  // a max reduction GCC vectorises only when told it may (3.5x faster than the per-lane form it left scalar)
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) {
    const float v = load_f(x, j);
    m = v > m ? v : m;
  }
  const int64_t Vb = V - V % kLanes;
  if (std::isinf(m)) m = m > 0 ? m : 0.0f;  // all -inf: sum 0, log -inf; +inf: inf - inf = NaN, as torch
  float s[kLanes] = {};
  for (int64_t j = 0; j < Vb; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) s[k] += exp_(load_f(x, j + k) - m);
  }
  float sum = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) sum += s[k];
  for (int64_t j = Vb; j < V; ++j) sum += exp_(load_f(x, j) - m);
  stats[0] = m;
  stats[1] = std::log(sum);
}

// grad_j = (exp(x_j - m - log_sum) - [j == t]) * g for one row, written in the logits' type.
template <typename scalar_t>
DGLSTM_ROW_BODY void row_softmax_grad(const scalar_t* x, scalar_t* out, int64_t V, float m, float log_sum, int64_t t,
                                      float g) {
  for (int64_t j = 0; j < V; ++j) store_f(out, j, exp_((load_f(x, j) - m) - log_sum) * g);
  store_f(out, t, (exp_((load_f(x, t) - m) - log_sum) - 1.0f) * g);
}

#ifdef DGLSTM_X86_VARIANTS
#define DGLSTM_LOSS_VARIANTS(NAME)                                                                            \
  template <typename scalar_t, typename... A>                                                                \
  __attribute__((noinline, target("arch=x86-64-v4"))) auto NAME##_v4(A... a) { return NAME<scalar_t>(a...); } \
  template <typename scalar_t, typename... A>                                                                \
  __attribute__((noinline, target("arch=x86-64-v3"))) auto NAME##_v3(A... a) { return NAME<scalar_t>(a...); } \
  template <typename scalar_t, typename... A>                                                                \
  __attribute__((noinline)) auto NAME##_base(A... a) { return NAME<scalar_t>(a...); }
#else
#define DGLSTM_LOSS_VARIANTS(NAME)                              \
  template <typename scalar_t, typename... A>                   \
  __attribute__((noinline)) auto NAME##_base(A... a) { return NAME<scalar_t>(a...); }
#endif
DGLSTM_LOSS_VARIANTS(row_logsumexp)
DGLSTM_LOSS_VARIANTS(row_softmax_grad)

template <typename scalar_t>
void call_row_logsumexp(const scalar_t* x, int64_t V, float* stats) {
#ifdef DGLSTM_X86_VARIANTS
  switch (row_isa()) {
    case RowIsa::kAvx512:
      return row_logsumexp_v4<scalar_t>(x, V, stats);
    case RowIsa::kAvx2:
      return row_logsumexp_v3<scalar_t>(x, V, stats);
    default:
      break;
  }
#endif
  row_logsumexp_base<scalar_t>(x, V, stats);
}

template <typename scalar_t>
void call_row_softmax_grad(const scalar_t* x, scalar_t* out, int64_t V, const float* stats, int64_t t, float g) {
#ifdef DGLSTM_X86_VARIANTS
  switch (row_isa()) {
    case RowIsa::kAvx512:
      return row_softmax_grad_v4<scalar_t>(x, out, V, stats[0], stats[1], t, g);
    case RowIsa::kAvx2:
      return row_softmax_grad_v3<scalar_t>(x, out, V, stats[0], stats[1], t, g);
    default:
      break;
  }
#endif
  row_softmax_grad_base<scalar_t>(x, out, V, stats[0], stats[1], t, g);
}

void check_loss_args(const Tensor& logits, const Tensor& target) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(),
              "cross_entropy: logits must be a contiguous 2-D CPU tensor, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "cross_entropy: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.scalar_type() == at::kLong && target.size(0) == logits.size(0) &&
                  target.is_contiguous() && target.device().is_cpu(),
              "cross_entropy: target must be a contiguous int64 CPU vector of ", logits.size(0), " rows, got ",
              target.scalar_type(), " ", target.sizes());
}

// Returns {the summed negative log-likelihood of the targets (float32, 0-D), the rows' stats [N, 2]: maximum and
// log(sum exp(x - maximum))}. A row whose target is ignore_index adds nothing; any other target outside [0, V)
// is an error, as in torch.
std::vector<Tensor> cross_entropy_forward(const Tensor& logits, const Tensor& target, int64_t ignore_index) {
  check_loss_args(logits, target);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "cross_entropy: logits have no classes");
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r) {
    TORCH_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < V), "cross_entropy: target ", t[r],
                " is out of bounds for ", V, " classes");
  }
  auto stats = at::empty({N, 2}, logits.options().dtype(at::kFloat));
  auto nll = at::empty({N}, logits.options().dtype(at::kFloat));
  float* l = stats.data_ptr<float>();
  float* n = nll.data_ptr<float>();
  auto rows = [&](auto* x) {
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        if (t[r] == ignore_index) {  // padding: no loss, no gradient (the backward never reads its stats)
          l[2 * r] = l[2 * r + 1] = 0.0f;
          n[r] = 0.0f;
          continue;
        }
        call_row_logsumexp(x + r * V, V, l + 2 * r);
        n[r] = l[2 * r + 1] - (load_f(x + r * V, t[r]) - l[2 * r]);
      }
    });
  };
  if (logits.scalar_type() == at::kFloat) {
    rows(logits.data_ptr<float>());
  } else {
    rows(logits.data_ptr<at::BFloat16>());
  }
  double sum = 0.0;
  for (int64_t r = 0; r < N; ++r) sum += n[r];
  return {at::scalar_tensor(sum, logits.options().dtype(at::kFloat)), stats};
}

// d(summed NLL)/d(logits) times grad (a 0-D float32 tensor), in the logits' type; rows whose target is
// ignore_index get zeros.
Tensor cross_entropy_backward(const Tensor& logits, const Tensor& target, const Tensor& stats, const Tensor& grad,
                              int64_t ignore_index) {
  check_loss_args(logits, target);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == 2 * logits.size(0) && stats.is_contiguous(),
              "cross_entropy_backward: stats must be the forward's [N, 2] float32 result");
  const int64_t N = logits.size(0), V = logits.size(1);
  const float g = grad.item<float>();
  auto out = at::empty_like(logits);
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r) {
    TORCH_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < V), "cross_entropy_backward: target ", t[r],
                " is out of bounds for ", V, " classes");
  }
  const float* l = stats.data_ptr<float>();
  auto rows = [&](const auto* x, auto* o) {
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        if (t[r] == ignore_index) {
          std::memset(o + r * V, 0, V * sizeof(*o));
        } else {
          call_row_softmax_grad(x + r * V, o + r * V, V, l + 2 * r, t[r], g);
        }
      }
    });
  };
  if (logits.scalar_type() == at::kFloat) {
    rows(logits.data_ptr<float>(), out.data_ptr<float>());
  } else {
    rows(logits.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("forward", &scan_forward, "fused (depth-gated) LSTM layer: forward over all steps");
  mod.def("backward", &scan_backward, "fused (depth-gated) LSTM layer: backward over all steps");
  mod.def("transpose_weight", &transpose_weight, "w^T as a new contiguous tensor (tiled)");
  mod.def("row_isa", &fused_row_isa, "the instruction set the fused elementwise rows run with");
  mod.def("has_packed_gemm", &has_packed_gemm, "whether this torch has MKL's packed GEMM (mkl::_mkl_linear)");
  mod.def("has_brgemm", &has_brgemm, "whether this torch exports oneDNN's float32 brgemm micro-kernel");
  mod.def("has_brgemm_bf16", &has_brgemm_bf16, "whether the brgemm micro-kernel runs in bfloat16 here (AMX)");
  mod.def("pack_brgemm_bf16", &pack_brgemm_bf16, "w [N, K] packed for the bfloat16 brgemm: [blocks, K, 64]");
  mod.def("cross_entropy_forward", &cross_entropy_forward,
          "summed cross-entropy of logits [N, V] (float32 or bfloat16): {nll (0-D), [N, 2] row stats}");
  mod.def("cross_entropy_backward", &cross_entropy_backward,
          "its gradient with respect to the logits, times grad, in the logits' type");
  mod.def("has_onednn_gemm", &has_onednn_gemm,
          "whether this torch has oneDNN's inner product on a reordered weight (mkldnn::_linear_pointwise)");
}
