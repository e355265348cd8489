#include "spattn/reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/problem.hpp"
#include "spattn/error.hpp"

namespace spattn::reference {

namespace {

// Rounds to what a kernel storing dtype `t` would keep.
double round_to(DType t, double x) {
  switch (t) {
    case DType::float32: return double(float(x));
    case DType::bfloat16: return to_float(to_bfloat16(float(x)));
    case DType::float16: return to_float(to_float16(float(x)));
    case DType::float64: return x;
  }
  return x;
}

// (N, D) slice of a (B, H, N, D) view as doubles, row-major.
std::vector<double> slice(const TensorRef& t, int64_t b, int64_t h) {
  const int64_t n = t.shape[2], d = t.shape[3];
  std::vector<double> out(size_t(n * d));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < d; ++c)
      out[i * d + c] = load_element(t, b * t.stride[0] + h * t.stride[1] + i * t.stride[2] +
                                           c * t.stride[3]);
  return out;
}

void check_host(const char* where, const TensorRef& t, const char* name) {
  SPATTN_CHECK(t.device.kind == DeviceKind::cpu, where, ": ", name,
               " must be in host memory; got ", to_string(t.device));
  SPATTN_CHECK(t.rank == 4, where, ": ", name, " must have rank 4; got ", t.rank);
}

// Materialised attention probabilities for one (b, hq): P (Nq, Nk) and lse (Nq), using either
// float64 or float32 arithmetic (then values are rounded to float after each step).
struct Softmax {
  std::vector<double> p, lse;
};

Softmax softmax_rows(const std::vector<double>& q, const std::vector<double>& k,
                     const uint8_t* mask, int64_t nq, int64_t nk, int64_t d, double scale,
                     Compute compute) {
  const bool f32 = compute == Compute::float32;
  auto r = [&](double x) { return f32 ? double(float(x)) : x; };
  Softmax s;
  s.p.assign(size_t(nq * nk), 0.0);
  s.lse.assign(size_t(nq), -std::numeric_limits<double>::infinity());
  std::vector<double> row(static_cast<size_t>(nk));
  for (int64_t i = 0; i < nq; ++i) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < nk; ++j) {
      if (!mask[i * nk + j]) continue;
      double acc = 0.0;
      for (int64_t c = 0; c < d; ++c) acc = r(acc + r(q[i * d + c] * k[j * d + c]));
      row[j] = r(acc * scale);
      m = std::max(m, row[j]);
    }
    if (m == -std::numeric_limits<double>::infinity()) continue;  // empty row
    double sum = 0.0;
    for (int64_t j = 0; j < nk; ++j)
      if (mask[i * nk + j]) sum = r(sum + r(std::exp(row[j] - m)));
    for (int64_t j = 0; j < nk; ++j)
      if (mask[i * nk + j]) s.p[i * nk + j] = r(r(std::exp(row[j] - m)) / sum);
    s.lse[i] = r(m + std::log(sum));
  }
  return s;
}

}  // namespace

std::vector<uint8_t> element_mask(const TensorRef& q, const TensorRef& k, const BlockPlan* plan,
                                  const MaskRule& rule) {
  const int64_t B = q.shape[0], Hq = q.shape[1], Nq = q.shape[2];
  const int64_t Nk = k.shape[2];
  std::vector<uint8_t> mask(size_t(B * Hq * Nq * Nk), 0);
  std::vector<uint8_t> block_map;
  int64_t nkb = 0;
  PlanView view;
  if (plan) {
    block_map = plan->to_block_mask();
    nkb = plan->geometry().num_k_blocks();
    view = plan->view();
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t plan_h = plan ? view.head_for(h, Hq) : 0;
      for (int64_t i = 0; i < Nq; ++i)
        for (int64_t j = 0; j < Nk; ++j) {
          bool keep = rule.allows(i, j, Nq, Nk);
          if (keep && plan) {
            const auto& g = plan->geometry();
            keep = block_map[view.row(b, plan_h, i / g.block_q) * nkb + j / g.block_k] != 0;
          }
          mask[((b * Hq + h) * Nq + i) * Nk + j] = keep;
        }
    }
  return mask;
}

ForwardResult forward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                      const BlockPlan* plan, const AttentionParams& params, Compute compute) {
  check_host("reference::forward", q, "q");
  check_host("reference::forward", k, "k");
  check_host("reference::forward", v, "v");
  const int64_t B = q.shape[0], Hq = q.shape[1], Nq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Nk = k.shape[2], Dv = v.shape[3];
  SPATTN_CHECK(Hkv >= 1 && Hq % Hkv == 0, "reference::forward: q heads (", Hq,
               ") must be a multiple of k heads (", Hkv, ")");
  const double scale = params.scale > 0 ? params.scale : 1.0 / std::sqrt(double(D));
  const auto mask = element_mask(q, k, plan, params.mask);
  const bool f64 = compute == Compute::float64;
  ForwardResult res;
  const DType out_type = f64 ? DType::float64 : q.dtype;
  res.out = Tensor::empty({B, Hq, Nq, Dv}, out_type);
  res.lse = Tensor::empty({B, Hq, Nq}, f64 ? DType::float64 : DType::float32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / (Hq / Hkv);
      const auto qs = slice(q, b, h), ks = slice(k, b, hk), vs = slice(v, b, hk);
      const uint8_t* m = mask.data() + (b * Hq + h) * Nq * Nk;
      Softmax s = softmax_rows(qs, ks, m, Nq, Nk, D, scale, compute);
      for (int64_t i = 0; i < Nq; ++i) {
        for (int64_t c = 0; c < Dv; ++c) {
          double acc = 0.0;
          for (int64_t j = 0; j < Nk; ++j) {
            if (!m[i * Nk + j]) continue;
            // 16-bit kernels feed P to the tensor cores in the input dtype.
            const double pij = f64 ? s.p[i * Nk + j] : round_to(q.dtype, s.p[i * Nk + j]);
            acc = f64 ? acc + pij * vs[j * Dv + c] : double(float(acc + float(pij * vs[j * Dv + c])));
          }
          res.out.set({b, h, i, c}, acc);
        }
        res.lse.set({b, h, i}, s.lse[i]);
      }
    }
  return res;
}

Gradients backward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                   const TensorRef& dout, const BlockPlan* plan, const AttentionParams& params,
                   Compute compute) {
  check_host("reference::backward", q, "q");
  check_host("reference::backward", k, "k");
  check_host("reference::backward", v, "v");
  check_host("reference::backward", dout, "dout");
  const int64_t B = q.shape[0], Hq = q.shape[1], Nq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Nk = k.shape[2], Dv = v.shape[3];
  SPATTN_CHECK(Hkv >= 1 && Hq % Hkv == 0, "reference::backward: q heads (", Hq,
               ") must be a multiple of k heads (", Hkv, ")");
  const double scale = params.scale > 0 ? params.scale : 1.0 / std::sqrt(double(D));
  const auto mask = element_mask(q, k, plan, params.mask);
  const bool f32 = compute == Compute::float32;
  auto r = [&](double x) { return f32 ? double(float(x)) : x; };
  const DType t = f32 ? q.dtype : DType::float64;
  // Accumulate in double buffers, round once at the end.
  std::vector<double> dq(size_t(B * Hq * Nq * D), 0.0), dk(size_t(B * Hkv * Nk * D), 0.0),
      dv(size_t(B * Hkv * Nk * Dv), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / (Hq / Hkv);
      const auto qs = slice(q, b, h), ks = slice(k, b, hk), vs = slice(v, b, hk);
      const auto dos = slice(dout, b, h);
      const uint8_t* m = mask.data() + (b * Hq + h) * Nq * Nk;
      Softmax s = softmax_rows(qs, ks, m, Nq, Nk, D, scale, compute);
      for (int64_t i = 0; i < Nq; ++i) {
        // dP_ij = dO_i . V_j ; delta_i = sum_j P_ij dP_ij ; dS_ij = P_ij (dP_ij - delta_i)
        std::vector<double> dp(size_t(Nk), 0.0);
        double delta = 0.0;
        for (int64_t j = 0; j < Nk; ++j) {
          if (!m[i * Nk + j]) continue;
          double acc = 0.0;
          for (int64_t c = 0; c < Dv; ++c) acc = r(acc + dos[i * Dv + c] * vs[j * Dv + c]);
          dp[j] = acc;
          delta = r(delta + s.p[i * Nk + j] * acc);
        }
        for (int64_t j = 0; j < Nk; ++j) {
          if (!m[i * Nk + j]) continue;
          const double pij = s.p[i * Nk + j];
          const double ds = r(pij * (dp[j] - delta) * scale);
          for (int64_t c = 0; c < D; ++c) {
            dq[((b * Hq + h) * Nq + i) * D + c] += ds * ks[j * D + c];
            dk[((b * Hkv + hk) * Nk + j) * D + c] += ds * qs[i * D + c];
          }
          for (int64_t c = 0; c < Dv; ++c) dv[((b * Hkv + hk) * Nk + j) * Dv + c] += pij * dos[i * Dv + c];
        }
      }
    }
  Gradients g;
  g.dq = Tensor::empty({B, Hq, Nq, D}, t);
  g.dk = Tensor::empty({B, Hkv, Nk, D}, t);
  g.dv = Tensor::empty({B, Hkv, Nk, Dv}, t);
  for (size_t i = 0; i < dq.size(); ++i) store_element(g.dq, int64_t(i), dq[i]);
  for (size_t i = 0; i < dk.size(); ++i) store_element(g.dk, int64_t(i), dk[i]);
  for (size_t i = 0; i < dv.size(); ++i) store_element(g.dv, int64_t(i), dv[i]);
  return g;
}

double relative_error(const TensorRef& a, const TensorRef& b) {
  SPATTN_CHECK(a.rank == b.rank && a.numel() == b.numel(),
               "relative_error: shapes must match; got ", a.shape_string(), " and ",
               b.shape_string());
  double max_diff = 0.0, max_ref = 0.0;
  std::array<int64_t, kMaxRank> idx{};
  const int64_t n = a.numel();
  for (int64_t e = 0; e < n; ++e) {
    int64_t oa = 0, ob = 0;
    for (int d = 0; d < a.rank; ++d) {
      oa += idx[d] * a.stride[d];
      ob += idx[d] * b.stride[d];
    }
    const double x = load_element(a, oa), y = load_element(b, ob);
    if (std::isfinite(x) != std::isfinite(y) || std::isnan(x) || std::isnan(y)) {
      return std::numeric_limits<double>::infinity();
    }
    if (std::isfinite(y)) {
      max_diff = std::max(max_diff, std::abs(x - y));
      max_ref = std::max(max_ref, std::abs(y));
    } else if (x != y) {
      return std::numeric_limits<double>::infinity();  // +inf vs -inf
    }
    for (int d = a.rank - 1; d >= 0 && ++idx[d] == a.shape[d]; --d) idx[d] = 0;
  }
  return max_ref > 0 ? max_diff / max_ref : max_diff;
}

}  // namespace spattn::reference
