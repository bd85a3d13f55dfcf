// Fused CPU forward kernels for multi-scale deformable attention (MSDA) and key-aware deformable
// attention (KDA), without autograd. One task per (image, query, head): the bilinear corners of
// every sampling location are computed in place (align_corners=False, zeros outside the map, the
// convention of litedetr.ops.deform_attn), and sampled keys live in a small per-task buffer, so
// nothing of size (queries x heads x levels x points x channels) is materialised.
//
// Layouts (all contiguous): value/key (B, S, M, D); query (B, Lq, M, D); sampling_locations
// (B, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights (B, Lq, M, L, P); output (B, Lq, M, D).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
struct Corner {
  int64_t offset;  // in elements, from the level's first cell of this image and head
  scalar_t weight;
};

// The up to four in-map corners of location (loc_x, loc_y) on an h x w map whose cells are
// cell_stride elements apart; returns how many were written to out.
template <typename scalar_t>
inline int bilinear_corners(scalar_t loc_x, scalar_t loc_y, int64_t h, int64_t w, int64_t cell_stride, Corner<scalar_t>* out) {
  const scalar_t x = loc_x * static_cast<scalar_t>(w) - scalar_t(0.5);
  const scalar_t y = loc_y * static_cast<scalar_t>(h) - scalar_t(0.5);
  // entirely outside (NaN included): no corner; this also keeps the integer casts below in range
  if (!(x > scalar_t(-1) && x < static_cast<scalar_t>(w) && y > scalar_t(-1) && y < static_cast<scalar_t>(h))) {
    return 0;
  }
  const scalar_t x_floor = std::floor(x), y_floor = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor), y0 = static_cast<int64_t>(y_floor);
  const scalar_t fx = x - x_floor, fy = y - y_floor;
  int n = 0;
  for (int dy = 0; dy < 2; ++dy) {
    const int64_t yy = y0 + dy;
    if (yy < 0 || yy >= h) continue;
    const scalar_t wy = dy ? fy : scalar_t(1) - fy;
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t xx = x0 + dx;
      if (xx < 0 || xx >= w) continue;
      out[n++] = {(yy * w + xx) * cell_stride, wy * (dx ? fx : scalar_t(1) - fx)};
    }
  }
  return n;
}

// out[0:d] += weight * row[0:d]
template <typename scalar_t>
inline void axpy(scalar_t* __restrict out, const scalar_t* __restrict row, scalar_t weight, int64_t d) {
  for (int64_t c = 0; c < d; ++c) out[c] += weight * row[c];
}

// q[0:d] . k[0:d], in kLanes independent partial sums (vectorisable, and a fixed summation order)
template <typename scalar_t>
inline scalar_t dot(const scalar_t* __restrict q, const scalar_t* __restrict k, int64_t d) {
  constexpr int kLanes = 8;
  scalar_t partial[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += q[c + lane] * k[c + lane];
  }
  for (; c < d; ++c) partial[0] += q[c] * k[c];
  scalar_t total = 0;
  for (int lane = 0; lane < kLanes; ++lane) total += partial[lane];
  return total;
}

struct Geometry {
  int64_t batch, tokens, queries, heads, channels, levels, points;
  std::vector<int64_t> heights, widths, starts;
};

Geometry geometry(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& sampling_locations) {
  Geometry g;
  g.batch = value.size(0);
  g.tokens = value.size(1);
  g.heads = value.size(2);
  g.channels = value.size(3);
  g.queries = sampling_locations.size(1);
  g.levels = sampling_locations.size(3);
  g.points = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == g.batch && sampling_locations.size(2) == g.heads,
              "sampling_locations must be (B, Lq, M, L, P, 2) with B and M of value, got ", sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == g.levels && spatial_shapes.size(1) == 2,
              "spatial_shapes must be (L, 2) with the L of sampling_locations, got ", spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.device().is_cpu(), "spatial_shapes must be a CPU tensor");
  const auto shapes = spatial_shapes.to(at::kLong).contiguous();
  const int64_t* s = shapes.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t l = 0; l < g.levels; ++l) {
    TORCH_CHECK(s[2 * l] > 0 && s[2 * l + 1] > 0, "spatial_shapes must be positive, level ", l, " is ", s[2 * l], "x", s[2 * l + 1]);
    g.heights.push_back(s[2 * l]);
    g.widths.push_back(s[2 * l + 1]);
    g.starts.push_back(start);
    start += s[2 * l] * s[2 * l + 1];
  }
  TORCH_CHECK(start == g.tokens, "spatial_shapes cover ", start, " tokens, the maps have ", g.tokens);
  return g;
}

void check_inputs(const at::Tensor& value, const at::Tensor& sampling_locations) {
  TORCH_CHECK(value.device().is_cpu() && sampling_locations.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(value.dim() == 4, "value must be (B, S, M, D)");
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2, "sampling_locations must be (B, Lq, M, L, P, 2)");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type(), "sampling_locations must have the dtype of value");
}

constexpr int64_t kGrain = 16;  // (image, query, head) tasks per parallel chunk, at least

}  // namespace

// kChannels > 0 fixes D at compile time (fully unrolled, vectorised row loops); 0 reads it from the inputs.
template <typename scalar_t, int64_t kChannels>
void msda_kernel(const Geometry& g, const scalar_t* v, const scalar_t* loc, const scalar_t* att, scalar_t* o) {
  const int64_t d = kChannels > 0 ? kChannels : g.channels;
  const int64_t cell = g.heads * d, samples = g.levels * g.points;
  at::parallel_for(0, g.batch * g.queries * g.heads, kGrain, [&](int64_t begin, int64_t end) {
    Corner<scalar_t> corners[4];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / (g.queries * g.heads), head = task % g.heads;
      scalar_t* out_row = o + task * d;
      const scalar_t* task_loc = loc + task * samples * 2;
      const scalar_t* task_att = att + task * samples;
      for (int64_t l = 0; l < g.levels; ++l) {
        const scalar_t* map = v + (image * g.tokens + g.starts[l]) * cell + head * d;
        for (int64_t p = 0; p < g.points; ++p) {
          const int64_t s = l * g.points + p;
          const int n = bilinear_corners(task_loc[2 * s], task_loc[2 * s + 1], g.heights[l], g.widths[l], cell, corners);
          for (int c = 0; c < n; ++c) axpy(out_row, map + corners[c].offset, task_att[s] * corners[c].weight, d);
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                  const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in) {
  check_inputs(value_in, sampling_locations_in);
  const auto value = value_in.contiguous();
  const auto locations = sampling_locations_in.contiguous();
  const auto attention = attention_weights_in.to(value.scalar_type()).contiguous();
  const Geometry g = geometry(value, spatial_shapes, locations);
  TORCH_CHECK(attention.device().is_cpu() && attention.dim() == 5 && attention.size(0) == g.batch && attention.size(1) == g.queries &&
                  attention.size(2) == g.heads && attention.size(3) == g.levels && attention.size(4) == g.points,
              "attention_weights must be (B, Lq, M, L, P) = (", g.batch, ", ", g.queries, ", ", g.heads, ", ", g.levels, ", ", g.points,
              "), got ", attention.sizes());
  auto out = at::zeros({g.batch, g.queries, g.heads, g.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward", [&] {
    const scalar_t* v = value.data_ptr<scalar_t>();
    const scalar_t* loc = locations.data_ptr<scalar_t>();
    const scalar_t* att = attention.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (g.channels == 32) {
      msda_kernel<scalar_t, 32>(g, v, loc, att, o);
    } else {
      msda_kernel<scalar_t, 0>(g, v, loc, att, o);
    }
  });
  return out.view({g.batch, g.queries, g.heads * g.channels});
}

// KDA for one (image, query, head) per task: sample the keys, softmax of q.k / sqrt(D), then the
// weighted sum of the sampled values (the sampled keys themselves when key and value are shared).
template <typename scalar_t, int64_t kChannels>
void kda_kernel(const Geometry& g, const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* loc, scalar_t* o, bool shared) {
  const int64_t d = kChannels > 0 ? kChannels : g.channels;
  const int64_t cell = g.heads * d, samples = g.levels * g.points;
  const scalar_t scale = scalar_t(1) / std::sqrt(static_cast<scalar_t>(d));
  at::parallel_for(0, g.batch * g.queries * g.heads, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> keys(samples * d);       // the sampled keys of one task
    std::vector<scalar_t> logits(samples);
    std::vector<Corner<scalar_t>> corners(samples * 4);
    std::vector<int> counts(samples);
    std::vector<int64_t> level_of(samples);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / (g.queries * g.heads), head = task % g.heads;
      const scalar_t* task_q = q + task * d;
      const scalar_t* task_loc = loc + task * samples * 2;
      std::fill(keys.begin(), keys.end(), scalar_t(0));
      scalar_t max_logit = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t l = 0; l < g.levels; ++l) {
        const int64_t first = (image * g.tokens + g.starts[l]) * cell + head * d;
        for (int64_t p = 0; p < g.points; ++p) {
          const int64_t s = l * g.points + p;
          Corner<scalar_t>* cs = corners.data() + 4 * s;
          counts[s] = bilinear_corners(task_loc[2 * s], task_loc[2 * s + 1], g.heights[l], g.widths[l], cell, cs);
          level_of[s] = first;
          scalar_t* sampled = keys.data() + s * d;
          for (int c = 0; c < counts[s]; ++c) axpy(sampled, k + first + cs[c].offset, cs[c].weight, d);
          logits[s] = dot(task_q, sampled, d) * scale;
          max_logit = std::max(max_logit, logits[s]);
        }
      }
      scalar_t total = 0;
      for (int64_t s = 0; s < samples; ++s) {
        logits[s] = std::exp(logits[s] - max_logit);
        total += logits[s];
      }
      scalar_t* out_row = o + task * d;
      for (int64_t s = 0; s < samples; ++s) {
        const scalar_t weight = logits[s] / total;
        if (shared) {
          axpy(out_row, keys.data() + s * d, weight, d);
        } else {
          const Corner<scalar_t>* cs = corners.data() + 4 * s;
          for (int c = 0; c < counts[s]; ++c) axpy(out_row, v + level_of[s] + cs[c].offset, weight * cs[c].weight, d);
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_key_aware_forward(const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
                                            const at::Tensor& spatial_shapes, const at::Tensor& sampling_locations_in,
                                            bool shared) {
  check_inputs(value_in, sampling_locations_in);
  TORCH_CHECK(key_in.sizes() == value_in.sizes() && key_in.scalar_type() == value_in.scalar_type(), "key must match value");
  TORCH_CHECK(query_in.scalar_type() == value_in.scalar_type(), "query must have the dtype of value");
  const auto value = value_in.contiguous();
  const auto key = shared ? value : key_in.contiguous();
  const auto query = query_in.contiguous();
  const auto locations = sampling_locations_in.contiguous();
  const Geometry g = geometry(value, spatial_shapes, locations);
  TORCH_CHECK(key.device().is_cpu() && query.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(query.dim() == 4 && query.size(0) == g.batch && query.size(1) == g.queries && query.size(2) == g.heads && query.size(3) == g.channels,
              "query must be (B, Lq, M, D) = (", g.batch, ", ", g.queries, ", ", g.heads, ", ", g.channels, "), got ", query.sizes());
  auto out = at::zeros({g.batch, g.queries, g.heads, g.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_key_aware_forward", [&] {
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* loc = locations.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (g.channels == 32) {
      kda_kernel<scalar_t, 32>(g, q, k, v, loc, o, shared);
    } else {
      kda_kernel<scalar_t, 0>(g, q, k, v, loc, o, shared);
    }
  });
  return out.view({g.batch, g.queries, g.heads * g.channels});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while computing: other Python threads (data loading, a server) keep running
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward, "MSDA forward (CPU, no autograd)", py::call_guard<py::gil_scoped_release>());
  m.def("ms_deform_attn_key_aware_forward", &ms_deform_attn_key_aware_forward, "KDA forward (CPU, no autograd)",
        py::call_guard<py::gil_scoped_release>());
}
