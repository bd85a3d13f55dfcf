// Fused CPU kernels for multi-scale deformable attention (MSDA) and key-aware deformable attention
// (KDA): forward and backward. The forward runs one task per (image, query, head): the bilinear
// corners of every sampling location are computed in place (align_corners=False, zeros outside the
// map, the convention of litedetr.ops.deform_attn), and sampled keys live in a small per-task
// buffer, so nothing of size (queries x heads x levels x points x channels) is materialised.
//
// The backward recomputes what it needs per (image, query, head) (corners, KDA's sampled keys or
// dot products, its softmax) instead of storing it, and scatters into the key and value gradients.
// Its parallel work units are (image, head, chunk of queries): a unit owns its image-head slice of
// the key and value gradients, so no two threads write the same row. Chunks beyond the first (only
// where threads outnumber image-heads) accumulate into their own zeroed copy of the gradient, summed
// in chunk order afterwards: results are deterministic for a given thread count, and independent of
// it while threads <= images x heads.
//
// Layouts (all contiguous): value/key (B, S, M, D); query (B, Lq, M, D); sampling_locations
// (B, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights and KDA's optional logit bias
// (B, Lq, M, L, P); output and its gradient (B, Lq, M, D).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

template <typename scalar_t>
struct Corner {
  int64_t offset;      // in elements, from the level's first cell of this image and head
  scalar_t weight;     // bilinear weight
  scalar_t weight_dx;  // d weight / d x and d weight / d y, x and y in cells of the map
  scalar_t weight_dy;
};

// The up to four in-map corners of location (loc_x, loc_y) on an h x w map whose cells are
// cell_stride elements apart, with their weights' derivatives; returns how many were written to out.
// A corner in the map counts even with weight 0 (x exactly -1), as its weight's derivative does not vanish.
template <typename scalar_t>
inline int bilinear_corners(scalar_t loc_x, scalar_t loc_y, int64_t h, int64_t w, int64_t cell_stride, Corner<scalar_t>* out) {
  const scalar_t x = loc_x * static_cast<scalar_t>(w) - scalar_t(0.5);
  const scalar_t y = loc_y * static_cast<scalar_t>(h) - scalar_t(0.5);
  // entirely outside (NaN included): no corner; this also keeps the integer casts below in range
  if (!(x >= scalar_t(-1) && x < static_cast<scalar_t>(w) && y >= scalar_t(-1) && y < static_cast<scalar_t>(h))) {
    return 0;
  }
  const scalar_t x_floor = std::floor(x), y_floor = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor), y0 = static_cast<int64_t>(y_floor);
  const scalar_t fx = x - x_floor, fy = y - y_floor;
  int n = 0;
  for (int dy = 0; dy < 2; ++dy) {
    const int64_t yy = y0 + dy;
    if (yy < 0 || yy >= h) continue;
    const scalar_t wy = dy ? fy : scalar_t(1) - fy, sign_y = dy ? scalar_t(1) : scalar_t(-1);
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t xx = x0 + dx;
      if (xx < 0 || xx >= w) continue;
      const scalar_t wx = dx ? fx : scalar_t(1) - fx, sign_x = dx ? scalar_t(1) : scalar_t(-1);
      out[n++] = {(yy * w + xx) * cell_stride, wy * wx, wy * sign_x, wx * sign_y};
    }
  }
  return n;
}

// out[0:d] += weight * row[0:d]
template <typename scalar_t>
inline void axpy(scalar_t* __restrict out, const scalar_t* __restrict row, scalar_t weight, int64_t d) {
  for (int64_t c = 0; c < d; ++c) out[c] += weight * row[c];
}

// The dot products below keep kLanes independent partial sums in one vector (a GCC / Clang vector
// extension, so they vectorise whatever the loop vectoriser decides), added up in lane order at the
// end: a fixed summation order, the same in every function here.
constexpr int kLanes = 8;

template <typename scalar_t>
struct LaneVector {
  typedef scalar_t type __attribute__((vector_size(kLanes * sizeof(scalar_t))));
};

template <typename scalar_t>
inline typename LaneVector<scalar_t>::type load_lanes(const scalar_t* p) {
  typename LaneVector<scalar_t>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename scalar_t>
inline scalar_t sum_lanes(const typename LaneVector<scalar_t>::type& partial) {
  scalar_t total = 0;
  for (int lane = 0; lane < kLanes; ++lane) total += partial[lane];
  return total;
}

// out[0:d] = the sum over n corners of weight * (the corner's row of map)[0:d], each lane vector summed in
// a register (not read and written back per corner)
template <typename scalar_t>
inline void sample_row(scalar_t* __restrict out, const scalar_t* __restrict map, const Corner<scalar_t>* corners, int n, int64_t d) {
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    typename LaneVector<scalar_t>::type sum = {};
    for (int i = 0; i < n; ++i) sum += corners[i].weight * load_lanes(map + corners[i].offset + c);
    std::memcpy(out + c, &sum, sizeof(sum));
  }
  for (; c < d; ++c) {
    scalar_t sum = 0;
    for (int i = 0; i < n; ++i) sum += corners[i].weight * map[corners[i].offset + c];
    out[c] = sum;
  }
}

// q[0:d] . k[0:d]
template <typename scalar_t>
inline scalar_t dot(const scalar_t* __restrict q, const scalar_t* __restrict k, int64_t d) {
  typename LaneVector<scalar_t>::type partial = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) partial += load_lanes(q + c) * load_lanes(k + c);
  for (; c < d; ++c) partial[0] += q[c] * k[c];
  return sum_lanes<scalar_t>(partial);
}

// a[0:d] . row[0:d] and b[0:d] . row[0:d] in one pass over row, each as dot() sums it
template <typename scalar_t>
inline void dot2(const scalar_t* __restrict a, const scalar_t* __restrict b, const scalar_t* __restrict row, int64_t d,
                 scalar_t& a_row, scalar_t& b_row) {
  typename LaneVector<scalar_t>::type partial_a = {}, partial_b = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    const auto r = load_lanes(row + c);
    partial_a += load_lanes(a + c) * r;
    partial_b += load_lanes(b + c) * r;
  }
  for (; c < d; ++c) {
    partial_a[0] += a[c] * row[c];
    partial_b[0] += b[c] * row[c];
  }
  a_row = sum_lanes<scalar_t>(partial_a);
  b_row = sum_lanes<scalar_t>(partial_b);
}

// grad_row[0:d] += weight * g[0:d]; returns g[0:d] . row[0:d] (summed as dot() sums it); one pass over
// the rows. A plain loop: the compiler vectorises it, and it ran faster than the lane vectors above.
template <typename scalar_t>
inline scalar_t dot_and_axpy(const scalar_t* __restrict g, const scalar_t* __restrict row, scalar_t* __restrict grad_row, scalar_t weight,
                             int64_t d) {
  scalar_t partial[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      grad_row[c + lane] += weight * g[c + lane];
      partial[lane] += g[c + lane] * row[c + lane];
    }
  }
  for (; c < d; ++c) {
    grad_row[c] += weight * g[c];
    partial[0] += g[c] * row[c];
  }
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

// attention (named `name` in the error) must be a CPU (B, Lq, M, L, P) tensor
void check_per_sample(const at::Tensor& attention, const Geometry& g, const char* name) {
  TORCH_CHECK(attention.device().is_cpu() && attention.dim() == 5 && attention.size(0) == g.batch && attention.size(1) == g.queries &&
                  attention.size(2) == g.heads && attention.size(3) == g.levels && attention.size(4) == g.points,
              name, " must be (B, Lq, M, L, P) = (", g.batch, ", ", g.queries, ", ", g.heads, ", ", g.levels, ", ", g.points,
              "), got ", attention.sizes());
}

void check_query(const at::Tensor& query, const at::Tensor& key, const Geometry& g) {
  TORCH_CHECK(key.device().is_cpu() && query.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(query.dim() == 4 && query.size(0) == g.batch && query.size(1) == g.queries && query.size(2) == g.heads && query.size(3) == g.channels,
              "query must be (B, Lq, M, D) = (", g.batch, ", ", g.queries, ", ", g.heads, ", ", g.channels, "), got ", query.sizes());
}

// The gradient of an output (B, Lq, M*D), contiguous, in the dtype of value.
at::Tensor output_gradient(const at::Tensor& grad_out, const Geometry& g, const at::Tensor& value) {
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.dim() == 3 && grad_out.size(0) == g.batch && grad_out.size(1) == g.queries &&
                  grad_out.size(2) == g.heads * g.channels,
              "grad_out must be (B, Lq, M*D) = (", g.batch, ", ", g.queries, ", ", g.heads * g.channels, "), got ", grad_out.sizes());
  return grad_out.to(value.scalar_type()).contiguous();
}

constexpr int64_t kGrain = 16;  // (image, query, head) tasks per parallel chunk of the forward, at least
constexpr int64_t kMaxQueryChunks = 4;  // the backward's extra gradient copies stay below 4 per image-head

// Query chunks per image-head in the backward: 1 unless threads outnumber image-heads.
int64_t query_chunks(const Geometry& g) {
  const int64_t slices = g.batch * g.heads, threads = at::get_num_threads();
  if (threads <= slices || g.queries < 2) return 1;
  return std::min({(threads + slices - 1) / slices, kMaxQueryChunks, g.queries});
}

// One work unit of the backward: the queries [query_begin, query_end) of one image and head.
struct Unit {
  int64_t image, head, chunk, query_begin, query_end;
};

Unit unit(const Geometry& g, int64_t chunks, int64_t index) {
  Unit u;
  u.chunk = index % chunks;
  u.head = (index / chunks) % g.heads;
  u.image = index / (chunks * g.heads);
  u.query_begin = u.chunk * g.queries / chunks;
  u.query_end = (u.chunk + 1) * g.queries / chunks;
  return u;
}

// (chunks, B, S, M, D) per-chunk gradients -> (B, S, M, D), summed in chunk order.
at::Tensor sum_chunks(const at::Tensor& per_chunk) {
  if (per_chunk.size(0) == 1) return per_chunk.select(0, 0);
  auto total = per_chunk.select(0, 0).clone();
  for (int64_t c = 1; c < per_chunk.size(0); ++c) total.add_(per_chunk.select(0, c));
  return total;
}

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

// MSDA's inputs made contiguous (the weights in the values' dtype) and checked against each other.
struct MsdaInputs {
  at::Tensor value, locations, attention;
  Geometry g;
};

MsdaInputs msda_inputs(const at::Tensor& value_in, const at::Tensor& spatial_shapes, const at::Tensor& sampling_locations_in,
                       const at::Tensor& attention_weights_in) {
  check_inputs(value_in, sampling_locations_in);
  MsdaInputs in;
  in.value = value_in.contiguous();
  in.locations = sampling_locations_in.contiguous();
  in.attention = attention_weights_in.to(in.value.scalar_type()).contiguous();
  in.g = geometry(in.value, spatial_shapes, in.locations);
  check_per_sample(in.attention, in.g, "attention_weights");
  return in;
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                  const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in) {
  const MsdaInputs in = msda_inputs(value_in, spatial_shapes, sampling_locations_in, attention_weights_in);
  const at::Tensor& value = in.value;
  const at::Tensor& locations = in.locations;
  const at::Tensor& attention = in.attention;
  const Geometry& g = in.g;
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

// KDA for one (image, query, head) per task: sample the keys, softmax of q.k / sqrt(D) (plus the
// sample's logit bias, where given), then the weighted sum of the sampled values (the sampled keys
// themselves when key and value are shared).
template <typename scalar_t, int64_t kChannels>
void kda_kernel(const Geometry& g, const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* loc, const scalar_t* bias,
                scalar_t* o, bool shared) {
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
      scalar_t max_logit = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t l = 0; l < g.levels; ++l) {
        const int64_t first = (image * g.tokens + g.starts[l]) * cell + head * d;
        for (int64_t p = 0; p < g.points; ++p) {
          const int64_t s = l * g.points + p;
          Corner<scalar_t>* cs = corners.data() + 4 * s;
          counts[s] = bilinear_corners(task_loc[2 * s], task_loc[2 * s + 1], g.heights[l], g.widths[l], cell, cs);
          level_of[s] = first;
          scalar_t* sampled = keys.data() + s * d;
          sample_row(sampled, k + first, cs, counts[s], d);
          logits[s] = dot(task_q, sampled, d) * scale + (bias ? bias[task * samples + s] : scalar_t(0));
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

// KDA's inputs made contiguous (key is value when shared; bias undefined when not given) and checked
// against each other.
struct KdaInputs {
  at::Tensor query, key, value, locations, bias;
  Geometry g;
};

KdaInputs kda_inputs(const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                     const at::Tensor& sampling_locations_in, bool shared, const std::optional<at::Tensor>& bias_in) {
  check_inputs(value_in, sampling_locations_in);
  TORCH_CHECK(key_in.sizes() == value_in.sizes() && key_in.scalar_type() == value_in.scalar_type(), "key must match value");
  TORCH_CHECK(query_in.scalar_type() == value_in.scalar_type(), "query must have the dtype of value");
  KdaInputs in;
  in.value = value_in.contiguous();
  in.key = shared ? in.value : key_in.contiguous();
  in.query = query_in.contiguous();
  in.locations = sampling_locations_in.contiguous();
  in.g = geometry(in.value, spatial_shapes, in.locations);
  check_query(in.query, in.key, in.g);
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->scalar_type() == value_in.scalar_type(), "logit_bias must have the dtype of value");
    in.bias = bias_in->contiguous();
    check_per_sample(in.bias, in.g, "logit_bias");
  }
  return in;
}

at::Tensor ms_deform_attn_key_aware_forward(const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
                                            const at::Tensor& spatial_shapes, const at::Tensor& sampling_locations_in,
                                            bool shared, const std::optional<at::Tensor>& bias_in) {
  const KdaInputs in = kda_inputs(query_in, key_in, value_in, spatial_shapes, sampling_locations_in, shared, bias_in);
  const Geometry& g = in.g;
  const auto &query = in.query, &key = in.key, &value = in.value, &locations = in.locations;
  auto out = at::zeros({g.batch, g.queries, g.heads, g.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_key_aware_forward", [&] {
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* loc = locations.data_ptr<scalar_t>();
    const scalar_t* bias = in.bias.defined() ? in.bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    if (g.channels == 32) {
      kda_kernel<scalar_t, 32>(g, q, k, v, loc, bias, o, shared);
    } else {
      kda_kernel<scalar_t, 0>(g, q, k, v, loc, bias, o, shared);
    }
  });
  return out.view({g.batch, g.queries, g.heads * g.channels});
}

// MSDA backward, one unit (image, head, chunk of queries) at a time. Per sample and corner, one pass
// over the corner's value row reads it (for g . v) and adds weight * g to its gradient row.
template <typename scalar_t, int64_t kChannels>
void msda_backward_kernel(const Geometry& g, int64_t chunks, const scalar_t* grad_out, const scalar_t* v, const scalar_t* loc,
                          const scalar_t* att, scalar_t* grad_v, scalar_t* grad_loc, scalar_t* grad_att) {
  const int64_t d = kChannels > 0 ? kChannels : g.channels;
  const int64_t cell = g.heads * d, samples = g.levels * g.points, value_numel = g.batch * g.tokens * cell;
  at::parallel_for(0, g.batch * g.heads * chunks, 1, [&](int64_t begin, int64_t end) {
    Corner<scalar_t> corners[4];
    for (int64_t index = begin; index < end; ++index) {
      const Unit u = unit(g, chunks, index);
      scalar_t* unit_grad_v = grad_v + u.chunk * value_numel;
      for (int64_t query = u.query_begin; query < u.query_end; ++query) {
        const int64_t task = (u.image * g.queries + query) * g.heads + u.head;
        const scalar_t* task_grad = grad_out + task * d;
        for (int64_t l = 0; l < g.levels; ++l) {
          const int64_t first = (u.image * g.tokens + g.starts[l]) * cell + u.head * d;
          for (int64_t p = 0; p < g.points; ++p) {
            const int64_t s = task * samples + l * g.points + p;
            const int n = bilinear_corners(loc[2 * s], loc[2 * s + 1], g.heights[l], g.widths[l], cell, corners);
            scalar_t grad_weight = 0, grad_x = 0, grad_y = 0;
            for (int c = 0; c < n; ++c) {
              const int64_t row = first + corners[c].offset;
              const scalar_t sampled = dot_and_axpy(task_grad, v + row, unit_grad_v + row, att[s] * corners[c].weight, d);
              grad_weight += corners[c].weight * sampled;
              grad_x += corners[c].weight_dx * sampled;
              grad_y += corners[c].weight_dy * sampled;
            }
            grad_att[s] = grad_weight;
            grad_loc[2 * s] = att[s] * grad_x * static_cast<scalar_t>(g.widths[l]);
            grad_loc[2 * s + 1] = att[s] * grad_y * static_cast<scalar_t>(g.heights[l]);
          }
        }
      }
    }
  });
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                                const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in) {
  const MsdaInputs in = msda_inputs(value_in, spatial_shapes, sampling_locations_in, attention_weights_in);
  const at::Tensor& value = in.value;
  const at::Tensor& locations = in.locations;
  const at::Tensor& attention = in.attention;
  const Geometry& g = in.g;
  const auto grad_out = output_gradient(grad_out_in, g, value);
  const int64_t chunks = query_chunks(g);
  auto grad_value = at::zeros({chunks, g.batch, g.tokens, g.heads, g.channels}, value.options());
  auto grad_locations = at::empty_like(locations);
  auto grad_attention = at::empty_like(attention);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward", [&] {
    const scalar_t* grad = grad_out.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    const scalar_t* loc = locations.data_ptr<scalar_t>();
    const scalar_t* att = attention.data_ptr<scalar_t>();
    scalar_t* grad_v = grad_value.data_ptr<scalar_t>();
    scalar_t* grad_loc = grad_locations.data_ptr<scalar_t>();
    scalar_t* grad_att = grad_attention.data_ptr<scalar_t>();
    if (g.channels == 32) {
      msda_backward_kernel<scalar_t, 32>(g, chunks, grad, v, loc, att, grad_v, grad_loc, grad_att);
    } else {
      msda_backward_kernel<scalar_t, 0>(g, chunks, grad, v, loc, att, grad_v, grad_loc, grad_att);
    }
  });
  return {sum_chunks(grad_value), grad_locations, grad_attention};
}

// Pointers of the KDA backward: inputs (contiguous), and gradients (key and value per chunk, see sum_chunks).
template <typename scalar_t>
struct KdaBackward {
  const scalar_t *grad_out, *query, *key, *value, *locations;
  const scalar_t* bias;  // nullptr without a logit bias; grad_bias is then unused
  scalar_t *grad_query, *grad_key, *grad_value, *grad_locations, *grad_bias;
  bool shared;  // key == value: one gradient, grad_key unused
};

// What one thread keeps of one (image, query, head) task between its passes.
template <typename scalar_t>
struct KdaScratch {
  std::vector<Corner<scalar_t>> corners;  // 4 per sample
  std::vector<int> counts;                // corners in the map per sample
  std::vector<scalar_t> sampled;          // shared keys: the sampled values (= keys), d per sample
  std::vector<scalar_t> mixed;            // shared keys: one sample's combined gradient row, d
  std::vector<scalar_t> key_dots;         // distinct keys: q . k of every corner's key row
  std::vector<scalar_t> grad_dots;        // distinct keys: grad_out . v of every corner's value row
  std::vector<scalar_t> probs;            // softmax weights per sample
  std::vector<scalar_t> grad_logits;      // d loss / d logit per sample (first the sampled values' g . v)
  std::vector<int64_t> firsts;            // per level: the first element of this image and head
  KdaScratch(const Geometry& g, bool shared)
      : corners(4 * g.levels * g.points), counts(g.levels * g.points), sampled(shared ? g.levels * g.points * g.channels : 0),
        mixed(shared ? g.channels : 0), key_dots(shared ? 0 : 4 * g.levels * g.points), grad_dots(shared ? 0 : 4 * g.levels * g.points),
        probs(g.levels * g.points), grad_logits(g.levels * g.points), firsts(g.levels) {}
};

// Pass 1 of a task: corners, the logits (in probs) and the sampled values' g . v (in grad_logits).
// Shared keys sample each key once, as the forward does (one pass over each corner row), and take
// both dot products with the sample; distinct keys keep q . k and g . v of every corner row, which
// pass 3 needs for the locations' gradient.
template <typename scalar_t, int64_t kChannels>
void kda_task_dots(const Geometry& g, const KdaBackward<scalar_t>& a, int64_t task, KdaScratch<scalar_t>& w) {
  const int64_t d = kChannels > 0 ? kChannels : g.channels;
  const int64_t cell = g.heads * d, samples = g.levels * g.points;
  const scalar_t scale = scalar_t(1) / std::sqrt(static_cast<scalar_t>(d));
  const scalar_t *q = a.query + task * d, *grad = a.grad_out + task * d, *loc = a.locations + task * samples * 2;
  const scalar_t* bias = a.bias ? a.bias + task * samples : nullptr;
  for (int64_t l = 0; l < g.levels; ++l) {
    for (int64_t p = 0; p < g.points; ++p) {
      const int64_t s = l * g.points + p;
      Corner<scalar_t>* cs = w.corners.data() + 4 * s;
      w.counts[s] = bilinear_corners(loc[2 * s], loc[2 * s + 1], g.heights[l], g.widths[l], cell, cs);
      scalar_t logit = 0, sampled_grad = 0;
      if (a.shared) {
        scalar_t* sampled = w.sampled.data() + s * d;
        sample_row(sampled, a.value + w.firsts[l], cs, w.counts[s], d);
        dot2(q, grad, sampled, d, logit, sampled_grad);
      } else {
        for (int c = 0; c < w.counts[s]; ++c) {
          const int64_t row = w.firsts[l] + cs[c].offset;
          const scalar_t key_dot = w.key_dots[4 * s + c] = dot(q, a.key + row, d);
          const scalar_t grad_dot = w.grad_dots[4 * s + c] = dot(grad, a.value + row, d);
          logit += cs[c].weight * key_dot;
          sampled_grad += cs[c].weight * grad_dot;
        }
      }
      w.probs[s] = logit * scale + (bias ? bias[s] : scalar_t(0));
      w.grad_logits[s] = sampled_grad;
    }
  }
}

// Pass 2: the softmax of the logits, and d loss / d logit = p * (g . v - sum_t p_t g . v_t).
template <typename scalar_t>
void kda_task_softmax_backward(int64_t samples, KdaScratch<scalar_t>& w) {
  scalar_t max_logit = -std::numeric_limits<scalar_t>::infinity(), total = 0, mean = 0;
  for (int64_t s = 0; s < samples; ++s) max_logit = std::max(max_logit, w.probs[s]);
  for (int64_t s = 0; s < samples; ++s) {
    w.probs[s] = std::exp(w.probs[s] - max_logit);
    total += w.probs[s];
  }
  for (int64_t s = 0; s < samples; ++s) {
    w.probs[s] /= total;
    mean += w.probs[s] * w.grad_logits[s];
  }
  for (int64_t s = 0; s < samples; ++s) w.grad_logits[s] = w.probs[s] * (w.grad_logits[s] - mean);
}

// Pass 3: the query's and the locations' gradients, and the scatter into the key and value gradient
// rows of this unit (sampled key k_s gets scale * dlogit_s * q, sampled value v_s gets p_s * grad_out).
// With shared keys the two are one row, m_s = scale * dlogit_s * q + p_s * grad_out: each corner row
// is read once for m_s . v (the locations' gradient) while w * m_s is added to its gradient, as in
// MSDA's backward, and the query's gradient sums scale * dlogit_s * k_s over the samples of pass 1.
template <typename scalar_t, int64_t kChannels>
void kda_task_scatter(const Geometry& g, const KdaBackward<scalar_t>& a, int64_t task, KdaScratch<scalar_t>& w, scalar_t* unit_grad_key,
                      scalar_t* unit_grad_value) {
  const int64_t d = kChannels > 0 ? kChannels : g.channels;
  const int64_t samples = g.levels * g.points;
  const scalar_t scale = scalar_t(1) / std::sqrt(static_cast<scalar_t>(d));
  const scalar_t *q = a.query + task * d, *grad = a.grad_out + task * d;
  scalar_t* grad_q = a.grad_query + task * d;
  scalar_t* grad_loc = a.grad_locations + task * samples * 2;
  scalar_t* mixed = w.mixed.data();
  for (int64_t s = 0; s < samples; ++s) {
    const int64_t l = s / g.points;
    const scalar_t key_coef = scale * w.grad_logits[s], value_coef = w.probs[s];
    scalar_t grad_x = 0, grad_y = 0;
    if (a.shared) {
      axpy(grad_q, w.sampled.data() + s * d, key_coef, d);
      for (int64_t c = 0; c < d; ++c) mixed[c] = key_coef * q[c] + value_coef * grad[c];
    }
    for (int c = 0; c < w.counts[s]; ++c) {
      const Corner<scalar_t>& corner = w.corners[4 * s + c];
      const int64_t row = w.firsts[l] + corner.offset;
      scalar_t along;
      if (a.shared) {
        along = dot_and_axpy(mixed, a.value + row, unit_grad_value + row, corner.weight, d);
      } else {
        along = key_coef * w.key_dots[4 * s + c] + value_coef * w.grad_dots[4 * s + c];
        axpy(grad_q, a.key + row, key_coef * corner.weight, d);
        axpy(unit_grad_key + row, q, key_coef * corner.weight, d);
        axpy(unit_grad_value + row, grad, value_coef * corner.weight, d);
      }
      grad_x += corner.weight_dx * along;
      grad_y += corner.weight_dy * along;
    }
    grad_loc[2 * s] = grad_x * static_cast<scalar_t>(g.widths[l]);
    grad_loc[2 * s + 1] = grad_y * static_cast<scalar_t>(g.heights[l]);
  }
}

template <typename scalar_t, int64_t kChannels>
void kda_backward_kernel(const Geometry& g, int64_t chunks, const KdaBackward<scalar_t>& a) {
  const int64_t d = kChannels > 0 ? kChannels : g.channels;
  const int64_t cell = g.heads * d, value_numel = g.batch * g.tokens * cell;
  at::parallel_for(0, g.batch * g.heads * chunks, 1, [&](int64_t begin, int64_t end) {
    KdaScratch<scalar_t> scratch(g, a.shared);
    for (int64_t index = begin; index < end; ++index) {
      const Unit u = unit(g, chunks, index);
      for (int64_t l = 0; l < g.levels; ++l) scratch.firsts[l] = (u.image * g.tokens + g.starts[l]) * cell + u.head * d;
      scalar_t* unit_grad_value = a.grad_value + u.chunk * value_numel;
      scalar_t* unit_grad_key = a.shared ? nullptr : a.grad_key + u.chunk * value_numel;
      for (int64_t query = u.query_begin; query < u.query_end; ++query) {
        const int64_t task = (u.image * g.queries + query) * g.heads + u.head;
        kda_task_dots<scalar_t, kChannels>(g, a, task, scratch);
        kda_task_softmax_backward(g.levels * g.points, scratch);
        if (a.grad_bias) std::copy(scratch.grad_logits.begin(), scratch.grad_logits.end(), a.grad_bias + task * g.levels * g.points);
        kda_task_scatter<scalar_t, kChannels>(g, a, task, scratch, unit_grad_key, unit_grad_value);
      }
    }
  });
}

// [grad_query, grad_value, grad_sampling_locations], then grad_key unless shared, then grad_bias where a bias is given.
std::vector<at::Tensor> ms_deform_attn_key_aware_backward(const at::Tensor& grad_out_in, const at::Tensor& query_in, const at::Tensor& key_in,
                                                          const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                                          const at::Tensor& sampling_locations_in, bool shared,
                                                          const std::optional<at::Tensor>& bias_in) {
  const KdaInputs in = kda_inputs(query_in, key_in, value_in, spatial_shapes, sampling_locations_in, shared, bias_in);
  const Geometry& g = in.g;
  const auto grad_out = output_gradient(grad_out_in, g, in.value);
  const int64_t chunks = query_chunks(g);
  const auto options = in.value.options();
  auto grad_query = at::zeros_like(in.query);
  auto grad_value = at::zeros({chunks, g.batch, g.tokens, g.heads, g.channels}, options);
  auto grad_key = shared ? at::Tensor() : at::zeros({chunks, g.batch, g.tokens, g.heads, g.channels}, options);
  auto grad_locations = at::empty_like(in.locations);
  const bool has_bias = in.bias.defined();
  auto grad_bias = has_bias ? at::empty_like(in.bias) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.value.scalar_type(), "ms_deform_attn_key_aware_backward", [&] {
    const KdaBackward<scalar_t> a{grad_out.data_ptr<scalar_t>(),
                                  in.query.data_ptr<scalar_t>(),
                                  in.key.data_ptr<scalar_t>(),
                                  in.value.data_ptr<scalar_t>(),
                                  in.locations.data_ptr<scalar_t>(),
                                  has_bias ? in.bias.data_ptr<scalar_t>() : nullptr,
                                  grad_query.data_ptr<scalar_t>(),
                                  shared ? nullptr : grad_key.data_ptr<scalar_t>(),
                                  grad_value.data_ptr<scalar_t>(),
                                  grad_locations.data_ptr<scalar_t>(),
                                  has_bias ? grad_bias.data_ptr<scalar_t>() : nullptr,
                                  shared};
    if (g.channels == 32) {
      kda_backward_kernel<scalar_t, 32>(g, chunks, a);
    } else {
      kda_backward_kernel<scalar_t, 0>(g, chunks, a);
    }
  });
  std::vector<at::Tensor> grads{grad_query, sum_chunks(grad_value), grad_locations};
  if (!shared) grads.push_back(sum_chunks(grad_key));
  if (has_bias) grads.push_back(grad_bias);
  return grads;
}


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while computing: other Python threads (data loading, a server) keep running
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward, "MSDA forward (CPU)", release);
  m.def("ms_deform_attn_backward", &ms_deform_attn_backward, "MSDA backward (CPU): grad_value, grad_locations, grad_weights", release);
  m.def("ms_deform_attn_key_aware_forward", &ms_deform_attn_key_aware_forward, "KDA forward (CPU)", release);
  m.def("ms_deform_attn_key_aware_backward", &ms_deform_attn_key_aware_backward,
        "KDA backward (CPU): grad_query, grad_value, grad_locations, then grad_key unless shared, then grad_bias if a bias is given", release);
}
