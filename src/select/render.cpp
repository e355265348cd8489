// Plans and block scores as RGB images (the CLI encodes them as PNG).
#include <algorithm>
#include <array>
#include <cmath>

#include "spattn/diagnostics.hpp"
#include "spattn/error.hpp"

namespace spattn {

namespace {

using Rgb = std::array<uint8_t, 3>;
constexpr Rgb kFull{31, 73, 158}, kPartial{125, 170, 230}, kSkipped{255, 255, 255},
    kForbidden{205, 205, 205}, kGap{64, 64, 64};

// Lays out `heads` panels of (rows x cols) cells in a near-square grid and paints each cell with
// colour(head, row, col).
template <class Colour>
Image draw_grid(int64_t heads, int64_t rows, int64_t cols, int target_side, Colour colour) {
  const int64_t grid_cols = int64_t(std::ceil(std::sqrt(double(heads))));
  const int64_t grid_rows = (heads + grid_cols - 1) / grid_cols;
  const int64_t longest = std::max<int64_t>({rows * grid_rows, cols * grid_cols, 1});
  const int64_t cell = std::max<int64_t>(1, target_side / longest);
  const int64_t gap = heads > 1 ? 2 : 0;
  const int64_t pw = cols * cell, ph = rows * cell;
  Image img;
  img.width = int(grid_cols * pw + (grid_cols - 1) * gap);
  img.height = int(grid_rows * ph + (grid_rows - 1) * gap);
  SPATTN_CHECK(int64_t(img.width) * img.height <= (int64_t(1) << 28),
               "render: image must have at most 2^28 pixels; got ", img.width, "x", img.height);
  img.rgb.assign(size_t(img.width) * size_t(img.height) * 3, 0);
  for (size_t p = 0; p < img.rgb.size(); p += 3) std::copy(kGap.begin(), kGap.end(), &img.rgb[p]);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t ox = (h % grid_cols) * (pw + gap), oy = (h / grid_cols) * (ph + gap);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const Rgb col = colour(h, r, c);
        for (int64_t y = oy + r * cell; y < oy + (r + 1) * cell; ++y)
          for (int64_t x = ox + c * cell; x < ox + (c + 1) * cell; ++x)
            std::copy(col.begin(), col.end(), &img.rgb[(size_t(y) * size_t(img.width) + size_t(x)) * 3]);
      }
  }
  return img;
}

void check_selection(const char* where, const PlanGeometry& g, int64_t b, int64_t head) {
  SPATTN_CHECK(b >= 0 && b < g.batch, where, ": b must be in [0, ", g.batch, "); got ", b);
  SPATTN_CHECK(head >= -1 && head < g.heads, where, ": head must be in [0, ", g.heads,
               ") or -1 (all); got ", head);
}

// Three-stop ramp from dark violet through teal to yellow, t in [0, 1].
Rgb ramp(double t) {
  static constexpr std::array<Rgb, 3> stops{Rgb{68, 1, 84}, Rgb{33, 145, 140}, Rgb{253, 231, 37}};
  t = std::clamp(t, 0.0, 1.0) * 2.0;
  const int i = std::min(int(t), 1);
  const double f = t - i;
  Rgb c{};
  for (int ch = 0; ch < 3; ++ch)
    c[size_t(ch)] = uint8_t(std::lround(stops[size_t(i)][size_t(ch)] * (1 - f) +
                                        stops[size_t(i) + 1][size_t(ch)] * f));
  return c;
}

}  // namespace

Image render_plan(const BlockPlan& plan, int64_t b, int64_t head, int target_side) {
  const PlanGeometry& g = plan.geometry();
  check_selection("render_plan", g, b, head);
  const int64_t nqb = g.num_q_blocks(), nkb = g.num_k_blocks();
  const std::vector<uint8_t> mask = plan.to_block_mask();  // (batch, heads, nqb, nkb)
  const int64_t first = head < 0 ? 0 : head, count = head < 0 ? g.heads : 1;
  return draw_grid(count, nqb, nkb, target_side, [&](int64_t hh, int64_t qb, int64_t kb) {
    const TileKind kind = g.classify(qb, kb);
    if (kind == TileKind::empty) return kForbidden;
    if (!mask[size_t(((b * g.heads + first + hh) * nqb + qb) * nkb + kb)]) return kSkipped;
    return kind == TileKind::full ? kFull : kPartial;
  });
}

Image render_scores(const BlockScores& scores, int64_t b, int64_t head, int target_side) {
  const PlanGeometry& g = scores.geo;
  check_selection("render_scores", g, b, head);
  const int64_t nqb = g.num_q_blocks(), nkb = g.num_k_blocks();
  const int64_t first = head < 0 ? 0 : head, count = head < 0 ? g.heads : 1;
  // Row maxima so each row is coloured relative to its own peak (4 decades of dynamic range).
  std::vector<float> row_max(size_t(count * nqb), 0.0f);
  for (int64_t hh = 0; hh < count; ++hh)
    for (int64_t qb = 0; qb < nqb; ++qb)
      for (int64_t kb = 0; kb < nkb; ++kb)
        row_max[size_t(hh * nqb + qb)] =
            std::max(row_max[size_t(hh * nqb + qb)], scores.at(b, first + hh, qb, kb));
  return draw_grid(count, nqb, nkb, target_side, [&](int64_t hh, int64_t qb, int64_t kb) {
    const float p = scores.at(b, first + hh, qb, kb);
    if (p < 0) return kForbidden;
    const float m = row_max[size_t(hh * nqb + qb)];
    if (m <= 0 || p <= 0) return ramp(0.0);
    return ramp(1.0 + std::log10(double(p) / double(m)) / 4.0);
  });
}

}  // namespace spattn
