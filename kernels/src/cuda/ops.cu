// The CUDA kernels of axl's training ops, compiled at run time by NVRTC. All tensors are f32,
// row-major and contiguous. Row kernels run one block per row; their block size is a multiple
// of 32 and at most 1024.

#define FULL_MASK 0xffffffffu
// -infinity (NVRTC has no math headers).
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// The sum of `v` over the block, returned to every thread. `shared` holds 32 floats.
__device__ float block_sum(float v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < warps; ++i) total += shared[i];
    return total;
}

// A running maximum `m` and sum of `exp(z - m)`, merged with another.
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
    if (m2 == NEG_INF) return;
    if (m == NEG_INF) { m = m2; s = s2; return; }
    if (m2 > m) { s = s * expf(m - m2) + s2; m = m2; }
    else { s += s2 * expf(m2 - m); }
}

// The merged maximum and sum of the block, returned to every thread. `shared` holds 64 floats.
__device__ void block_max_sum(float& m, float& s, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) {
        float m2 = __shfl_xor_sync(FULL_MASK, m, offset);
        float s2 = __shfl_xor_sync(FULL_MASK, s, offset);
        merge_max_sum(m, s, m2, s2);
    }
    __syncthreads();
    if (lane == 0) { shared[warp] = m; shared[32 + warp] = s; }
    __syncthreads();
    m = NEG_INF; s = 0.0f;
    for (int i = 0; i < warps; ++i) merge_max_sum(m, s, shared[i], shared[32 + i]);
}

// ---- RMSNorm --------------------------------------------------------------------------------

extern "C" __global__ void rms_norm_forward(const float* x, const float* w, float* y,
                                            float* inv_rms, int cols, float eps, int one_plus) {
    __shared__ float shared[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    float* yr = y + row * cols;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) squares += xr[c] * xr[c];
    const float r = 1.0f / sqrtf(block_sum(squares, shared) / cols + eps);
    if (threadIdx.x == 0) inv_rms[row] = r;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float scale = one_plus ? 1.0f + w[c] : w[c];
        yr[c] = xr[c] * r * scale;
    }
}

// dx = r·s·dy − x·r³/cols·Σ(s·dy·x), with s the weight (or 1 + weight).
extern "C" __global__ void rms_norm_backward(const float* dy, const float* x, const float* w,
                                             const float* inv_rms, float* dx, int cols,
                                             int one_plus) {
    __shared__ float shared[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    const float* dyr = dy + row * cols;
    float* dxr = dx + row * cols;
    const float r = inv_rms[row];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float scale = one_plus ? 1.0f + w[c] : w[c];
        dot += scale * dyr[c] * xr[c];
    }
    const float k = block_sum(dot, shared) * r * r * r / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float scale = one_plus ? 1.0f + w[c] : w[c];
        dxr[c] = r * scale * dyr[c] - xr[c] * k;
    }
}

// out[c] += Σ_rows a[r,c] · (b ? b[r,c] − (shift ? shift[r] : 0) : 1) · (scale ? scale[r] : 1):
// the weight (and bias) gradients of the norms. Blocks of 32×8 threads; each block sums a
// strided share of the rows for 32 columns and adds it to `out` atomically.
extern "C" __global__ void column_sums(const float* a, const float* b, const float* shift,
                                       const float* scale, float* out, int rows, int cols) {
    __shared__ float partial[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float sum = 0.0f;
    if (c < cols) {
        for (int r = blockIdx.y * 8 + threadIdx.y; r < rows; r += gridDim.y * 8) {
            const long i = (long)r * cols + c;
            float v = a[i];
            if (b) v *= b[i] - (shift ? shift[r] : 0.0f);
            if (scale) v *= scale[r];
            sum += v;
        }
    }
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float total = 0.0f;
        for (int i = 0; i < 8; ++i) total += partial[i][threadIdx.x];
        atomicAdd(out + c, total);
    }
}

// ---- LayerNorm ------------------------------------------------------------------------------

extern "C" __global__ void layer_norm_forward(const float* x, const float* w, const float* b,
                                              float* y, float* mean_out, float* rstd_out,
                                              int cols, float eps) {
    __shared__ float shared[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    float* yr = y + row * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += xr[c];
    const float mean = block_sum(sum, shared) / cols;
    float deviations = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = xr[c] - mean;
        deviations += d * d;
    }
    const float rstd = 1.0f / sqrtf(block_sum(deviations, shared) / cols + eps);
    if (threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        yr[c] = (xr[c] - mean) * rstd * w[c] + b[c];
}

// With x̂ = (x − mean)·rstd and g = dy·w: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)).
extern "C" __global__ void layer_norm_backward(const float* dy, const float* x, const float* w,
                                               const float* mean_in, const float* rstd_in,
                                               float* dx, int cols) {
    __shared__ float shared[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    const float* dyr = dy + row * cols;
    float* dxr = dx + row * cols;
    const float mean = mean_in[row], rstd = rstd_in[row];
    float g_sum = 0.0f, gx_sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float g = dyr[c] * w[c];
        g_sum += g;
        gx_sum += g * (xr[c] - mean) * rstd;
    }
    const float g_mean = block_sum(g_sum, shared) / cols;
    const float gx_mean = block_sum(gx_sum, shared) / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float xhat = (xr[c] - mean) * rstd;
        dxr[c] = rstd * (dyr[c] * w[c] - g_mean - xhat * gx_mean);
    }
}

// ---- Gated activations ----------------------------------------------------------------------

#define SQRT_2_OVER_PI 0.7978845608f
#define GELU_CUBIC 0.044715f

// act(g) and its derivative; activation 0 is SiLU, 1 is GELU (tanh approximation).
__device__ __forceinline__ void activate(float g, int activation, float& act, float& slope) {
    if (activation == 0) {
        const float s = 1.0f / (1.0f + expf(-g));
        act = g * s;
        slope = s * (1.0f + g * (1.0f - s));
    } else {
        const float t = tanhf(SQRT_2_OVER_PI * (g + GELU_CUBIC * g * g * g));
        act = 0.5f * g * (1.0f + t);
        slope = 0.5f * (1.0f + t)
              + 0.5f * g * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * g * g);
    }
}

extern "C" __global__ void gated_forward(const float* gate, const float* up, float* out, long n,
                                         int activation) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        float act, slope;
        activate(gate[i], activation, act, slope);
        out[i] = act * up[i];
    }
}

extern "C" __global__ void gated_backward(const float* dout, const float* gate, const float* up,
                                          float* dgate, float* dup, long n, int activation) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        float act, slope;
        activate(gate[i], activation, act, slope);
        dgate[i] = dout[i] * up[i] * slope;
        dup[i] = dout[i] * act;
    }
}

// ---- Rotary embeddings ----------------------------------------------------------------------

// Rotates q `[batch, len, q_heads, dim]` and k `[batch, len, k_heads, dim]` in one launch, one
// thread per pair of elements (i, i + dim/2). The tables are `[len, dim]`, or `[batch, len,
// dim]` with `per_row`. `inverse` applies the transposed rotation (the backward pass).
extern "C" __global__ void rope_qk(const float* q, const float* k, const float* cos_table,
                                   const float* sin_table, float* q_out, float* k_out, int batch,
                                   int len, int q_heads, int k_heads, int dim, int per_row,
                                   int inverse) {
    const int half = dim / 2;
    const long q_pairs = (long)batch * len * q_heads * half;
    const long all_pairs = q_pairs + (long)batch * len * k_heads * half;
    for (long p = blockIdx.x * (long)blockDim.x + threadIdx.x; p < all_pairs;
         p += (long)gridDim.x * blockDim.x) {
        const bool is_q = p < q_pairs;
        const long local = is_q ? p : p - q_pairs;
        const int heads = is_q ? q_heads : k_heads;
        const float* src = is_q ? q : k;
        float* dst = is_q ? q_out : k_out;
        const int i = local % half;
        const long vector = local / half;
        const long token = vector / heads;
        const int position = token % len;
        const long table_row = per_row ? token : position;
        const float* cr = cos_table + table_row * dim;
        const float* sr = sin_table + table_row * dim;
        const long base = vector * dim;
        const float a = src[base + i], b = src[base + i + half];
        if (!inverse) {
            dst[base + i] = a * cr[i] - b * sr[i];
            dst[base + i + half] = b * cr[i + half] + a * sr[i + half];
        } else {
            dst[base + i] = a * cr[i] + b * sr[i + half];
            dst[base + i + half] = b * cr[i + half] - a * sr[i];
        }
    }
}

// ---- Cross-entropy --------------------------------------------------------------------------

// The loss options of token_loss.rs: label smoothing, z-loss scale, soft cap (0 for none),
// token scaling.
struct LossOptions {
    float smoothing;
    float z_loss;
    float softcap;
    int token_scaling;
};

__device__ __forceinline__ float cap(float z, float softcap) {
    return softcap > 0.0f ? softcap * tanhf(z / softcap) : z;
}

// The row's loss from its log-sum-exp, target logit and logit sum, and the factor its gradient
// carries (the detached target probability under token scaling).
__device__ float row_loss(const LossOptions& o, float lse, float target_logit, float logit_sum,
                          int vocab, float* weight) {
    const float nll = lse - target_logit;
    float loss = o.smoothing > 0.0f
        ? (1.0f - o.smoothing) * nll + o.smoothing * (lse - logit_sum / vocab)
        : nll;
    loss += o.z_loss * lse * lse;
    *weight = o.token_scaling ? expf(target_logit - lse) : 1.0f;
    return loss * *weight;
}

// The gradient of the loss with respect to the uncapped logit `raw` of id `column`.
__device__ __forceinline__ float logit_gradient(const LossOptions& o, float raw, int column,
                                                int target, float lse, float weight,
                                                float scale, int vocab) {
    const float factor = weight * scale;
    const float z = cap(raw, o.softcap);
    float g = factor * (1.0f + 2.0f * o.z_loss * lse) * expf(z - lse)
            - factor * o.smoothing / vocab;
    if (column == target) g -= factor * (1.0f - o.smoothing);
    if (o.softcap > 0.0f) {
        const float t = z / o.softcap;
        g *= 1.0f - t * t;
    }
    return g;
}

// The maximum `m` and sum `s` of exp(z − m) of a row of `width` (soft-capped) logits, and
// their sum when label smoothing needs it (else 0), returned to every thread of the block.
// `shared` holds 64 floats.
__device__ void row_stats(const float* zr, int width, const LossOptions& o, float* shared,
                          float& m, float& s, float& logit_sum) {
    m = NEG_INF;
    s = 0.0f;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const float z = cap(zr[c], o.softcap);
        merge_max_sum(m, s, z, 1.0f);
        sum += z;
    }
    block_max_sum(m, s, shared);
    logit_sum = o.smoothing > 0.0f ? block_sum(sum, shared) : 0.0f;
}

// Each row of `logits` `[rows, vocab]` (starting `row_stride` apart) is replaced by `scale`
// times the gradient of its loss, which goes to `losses[row]`. A negative target is a row not
// counted: loss 0, gradient 0.
extern "C" __global__ void cross_entropy_rows(float* logits, const int* targets, float* losses,
                                              int vocab, long row_stride, LossOptions o,
                                              float scale) {
    __shared__ float shared[64];
    const long row = blockIdx.x;
    float* zr = logits + row * row_stride;
    const int target = targets[row];
    if (target < 0) {
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) zr[c] = 0.0f;
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    float m, s, logit_sum;
    row_stats(zr, vocab, o, shared, m, s, logit_sum);
    const float lse = m + logf(s);
    const float target_logit = cap(zr[target], o.softcap);
    float weight;
    const float loss = row_loss(o, lse, target_logit, logit_sum, vocab, &weight);
    __syncthreads();
    for (int c = threadIdx.x; c < vocab; c += blockDim.x)
        zr[c] = logit_gradient(o, zr[c], c, target, lse, weight, scale, vocab);
    if (threadIdx.x == 0) losses[row] = loss;
}

// Folds a tile of logits `[rows, width]` (ids `offset..offset + width`, rows `ld` apart) into
// each row's running statistics: maximum, sum of exp(z − max), sum of logits, target logit.
extern "C" __global__ void row_stats_add(const float* tile, long ld, int width, int offset,
                                         const int* targets, float* max_io, float* sum_exp_io,
                                         float* logit_sum_io, float* target_io, LossOptions o) {
    __shared__ float shared[64];
    const long row = blockIdx.x;
    const float* zr = tile + row * ld;
    float m, s, tile_sum;
    row_stats(zr, width, o, shared, m, s, tile_sum);
    if (threadIdx.x == 0) {
        float rm = max_io[row], rs = sum_exp_io[row];
        merge_max_sum(rm, rs, m, s);
        max_io[row] = rm;
        sum_exp_io[row] = rs;
        logit_sum_io[row] += tile_sum;
        const int t = targets[row] - offset;
        if (t >= 0 && t < width) target_io[row] = cap(zr[t], o.softcap);
    }
}

// Each row's loss, log-sum-exp and gradient factor from its statistics.
extern "C" __global__ void row_losses(const float* max_in, const float* sum_exp_in,
                                      const float* logit_sum_in, const float* target_in,
                                      float* losses, float* lse_out, float* weight_out, int rows,
                                      int vocab, LossOptions o) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const float lse = max_in[row] + logf(sum_exp_in[row]);
    float weight;
    losses[row] = row_loss(o, lse, target_in[row], logit_sum_in[row], vocab, &weight);
    lse_out[row] = lse;
    weight_out[row] = weight;
}

// Replaces a tile of logits by `scale` times their gradient, and marks in `kept` each block of
// `filter_columns` columns holding a gradient of at least `threshold` in size before `scale`
// and the row's token-scaling factor multiply it.
extern "C" __global__ void tile_gradient(float* tile, long ld, int width, int offset,
                                         const int* targets, const float* lse_in,
                                         const float* weight_in, int vocab, LossOptions o,
                                         float scale, float threshold, int filter_columns,
                                         int* kept) {
    const long row = blockIdx.x;
    float* zr = tile + row * ld;
    const int target = targets[row];
    const float lse = lse_in[row], weight = weight_in[row];
    const float limit = threshold * fabsf(weight * scale);
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const float g = logit_gradient(o, zr[c], offset + c, target, lse, weight, scale, vocab);
        zr[c] = g;
        if (fabsf(g) >= limit) kept[c / filter_columns] = 1;
    }
}

// ---- Rows -----------------------------------------------------------------------------------

// dst[i] = src[rows[i]], rows of `cols`.
extern "C" __global__ void gather_rows(const float* src, const int* rows, float* dst, int cols) {
    const float* s = src + (long)rows[blockIdx.x] * cols;
    float* d = dst + (long)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
}

// dst[rows[i]] = src[i], rows of `cols`.
extern "C" __global__ void scatter_rows(const float* src, const int* rows, float* dst, int cols) {
    const float* s = src + (long)blockIdx.x * cols;
    float* d = dst + (long)rows[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
}

// ---- AdamW ----------------------------------------------------------------------------------

extern "C" __global__ void adamw_update(float* param, const float* grad, float* first,
                                        float* second, long n, float beta1, float beta2,
                                        float step_size, float bias2_sqrt, float decay,
                                        float eps) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        const float g = grad[i];
        const float m = beta1 * first[i] + (1.0f - beta1) * g;
        const float v = beta2 * second[i] + (1.0f - beta2) * g * g;
        first[i] = m;
        second[i] = v;
        param[i] = param[i] * decay - step_size * m / (sqrtf(v) / bias2_sqrt + eps);
    }
}
