/* GroupNorm + per-(example, channel) affine + optional SiLU over position-major float32 maps.
 *
 * A map is x[B][N][C]: B examples, N positions (H * W), C channels with unit stride (a channels_last
 * [B, C, H, W] tensor's own memory order). Channels c * G / C .. form group g: D = C / G channels in a
 * row. Every loop over a map runs along C, so it vectorises; statistics are two-pass (mean, then the
 * mean square of x - mean, the biased variance) like ATen's, with float sums of at most CHUNK rows
 * flushed into double totals so that long maps lose no precision.
 *
 * Forward:  y = act(n * scale + shift), n = (x - mean_g) * rstd_g, act = SiLU or the identity.
 * Backward: from dy, with a = n * scale + shift and g = dy * act'(a),
 *   d_shift = sum_n g,  d_scale = sum_n g * n,
 *   dx = rstd_g * (g * scale - mean_g(g * scale) - n * mean_g(g * scale * n)),
 * where the two group means are sum_{c in g} scale_c * d_shift_c and scale_c * d_scale_c over N * D.
 * The functions return 0, or -1 when a scratch buffer cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 64

/* sums[c] = sum over the N rows of (x[n][c] - centre[c]) (power 1) or its square (power 2). */
static void column_sums(const float *x, int64_t n_rows, int64_t c, const float *centre, int power,
                        float *partial, double *sums) {
    for (int64_t k = 0; k < c; k++) sums[k] = 0.0;
    for (int64_t start = 0; start < n_rows; start += CHUNK) {
        int64_t stop = start + CHUNK < n_rows ? start + CHUNK : n_rows;
        for (int64_t k = 0; k < c; k++) partial[k] = 0.0f;
        for (int64_t n = start; n < stop; n++) {
            const float *row = x + n * c;
            if (power == 1) {
                for (int64_t k = 0; k < c; k++) partial[k] += row[k] - centre[k];
            } else {
                for (int64_t k = 0; k < c; k++) {
                    float d = row[k] - centre[k];
                    partial[k] += d * d;
                }
            }
        }
        for (int64_t k = 0; k < c; k++) sums[k] += partial[k];
    }
}

/* Per group of one example x[N][C]: mean and rstd [G]; mean_c and rstd_c [C] repeat them per channel. */
static void group_moments(const float *x, int64_t n_rows, int64_t c, int64_t groups, double eps,
                          float *partial, double *sums, float *mean, float *rstd, float *mean_c, float *rstd_c) {
    int64_t d = c / groups;
    double count = (double)n_rows * (double)d;
    for (int64_t k = 0; k < c; k++) mean_c[k] = 0.0f;
    column_sums(x, n_rows, c, mean_c, 1, partial, sums);
    for (int64_t g = 0; g < groups; g++) {
        double total = 0.0;
        for (int64_t k = g * d; k < (g + 1) * d; k++) total += sums[k];
        mean[g] = (float)(total / count);
        for (int64_t k = g * d; k < (g + 1) * d; k++) mean_c[k] = mean[g];
    }
    column_sums(x, n_rows, c, mean_c, 2, partial, sums);
    for (int64_t g = 0; g < groups; g++) {
        double total = 0.0;
        for (int64_t k = g * d; k < (g + 1) * d; k++) total += sums[k];
        rstd[g] = (float)(1.0 / sqrt(total / count + eps));
        for (int64_t k = g * d; k < (g + 1) * d; k++) rstd_c[k] = rstd[g];
    }
}

static inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* x, y: [B][N][C]; scale, shift: [B][C]; mean, rstd (out): [B][G]. y may not alias x. */
int gn_forward(const float *x, float *y, const float *scale, const float *shift, float *mean, float *rstd,
               int64_t b, int64_t n_rows, int64_t c, int64_t groups, double eps, int silu) {
    float *buf = malloc(sizeof(float) * 5 * c);
    double *sums = malloc(sizeof(double) * c);
    if (!buf || !sums) { free(buf); free(sums); return -1; }
    float *partial = buf, *mean_c = buf + c, *rstd_c = buf + 2 * c, *mul = buf + 3 * c, *add = buf + 4 * c;
    for (int64_t e = 0; e < b; e++) {
        const float *xe = x + e * n_rows * c;
        float *ye = y + e * n_rows * c;
        group_moments(xe, n_rows, c, groups, eps, partial, sums, mean + e * groups, rstd + e * groups,
                      mean_c, rstd_c);
        for (int64_t k = 0; k < c; k++) {  /* y = x * mul + add */
            mul[k] = rstd_c[k] * scale[e * c + k];
            add[k] = shift[e * c + k] - mean_c[k] * mul[k];
        }
        for (int64_t n = 0; n < n_rows; n++) {
            const float *row = xe + n * c;
            float *out = ye + n * c;
            if (silu) {
                for (int64_t k = 0; k < c; k++) {
                    float a = row[k] * mul[k] + add[k];
                    out[k] = a * sigmoid(a);
                }
            } else {
                for (int64_t k = 0; k < c; k++) out[k] = row[k] * mul[k] + add[k];
            }
        }
    }
    free(buf);
    free(sums);
    return 0;
}

/* dy, x, dx: [B][N][C]; scale, shift: [B][C]; mean, rstd: [B][G] from gn_forward;
 * d_scale, d_shift (out): [B][C]. dx may alias dy. */
int gn_backward(const float *dy, const float *x, const float *scale, const float *shift, const float *mean,
                const float *rstd, float *dx, float *d_scale, float *d_shift, int64_t b, int64_t n_rows,
                int64_t c, int64_t groups, int silu) {
    float *buf = malloc(sizeof(float) * 8 * c);
    double *sums = malloc(sizeof(double) * 2 * c);
    if (!buf || !sums) { free(buf); free(sums); return -1; }
    float *mean_c = buf, *rstd_c = buf + c, *mul = buf + 2 * c, *add = buf + 3 * c;
    float *part_g = buf + 4 * c, *part_gn = buf + 5 * c, *p_coef = buf + 6 * c, *q_coef = buf + 7 * c;
    double *sum_g = sums, *sum_gn = sums + c;
    int64_t d = c / groups;
    double count = (double)n_rows * (double)d;
    for (int64_t e = 0; e < b; e++) {
        const float *dye = dy + e * n_rows * c, *xe = x + e * n_rows * c;
        const float *se = scale + e * c, *he = shift + e * c;
        float *dxe = dx + e * n_rows * c;
        for (int64_t k = 0; k < c; k++) {
            mean_c[k] = mean[e * groups + k / d];
            rstd_c[k] = rstd[e * groups + k / d];
            mul[k] = rstd_c[k] * se[k];      /* a = x * mul + add */
            add[k] = he[k] - mean_c[k] * mul[k];
            sum_g[k] = 0.0;
            sum_gn[k] = 0.0;
        }
        /* pass 1: g (kept in dx when SiLU changes it) and its sums sum g, sum g * (x - mean) */
        for (int64_t start = 0; start < n_rows; start += CHUNK) {
            int64_t stop = start + CHUNK < n_rows ? start + CHUNK : n_rows;
            for (int64_t k = 0; k < c; k++) { part_g[k] = 0.0f; part_gn[k] = 0.0f; }
            for (int64_t n = start; n < stop; n++) {
                const float *grow = dye + n * c, *row = xe + n * c;
                float *drow = dxe + n * c;
                if (silu) {
                    for (int64_t k = 0; k < c; k++) {
                        float a = row[k] * mul[k] + add[k];
                        float s = sigmoid(a);
                        float g = grow[k] * s * (1.0f + a * (1.0f - s));
                        drow[k] = g;
                        part_g[k] += g;
                        part_gn[k] += g * (row[k] - mean_c[k]);
                    }
                } else {
                    for (int64_t k = 0; k < c; k++) {
                        part_g[k] += grow[k];
                        part_gn[k] += grow[k] * (row[k] - mean_c[k]);
                    }
                }
            }
            for (int64_t k = 0; k < c; k++) { sum_g[k] += part_g[k]; sum_gn[k] += part_gn[k]; }
        }
        /* dx = g * P + x * Q + R per channel, from the group means of g * scale and g * scale * n */
        for (int64_t grp = 0; grp < groups; grp++) {
            double m1 = 0.0, m2 = 0.0;
            for (int64_t k = grp * d; k < (grp + 1) * d; k++) {
                d_shift[e * c + k] = (float)sum_g[k];
                d_scale[e * c + k] = (float)(sum_gn[k] * rstd_c[k]);
                m1 += se[k] * sum_g[k];
                m2 += se[k] * sum_gn[k] * rstd_c[k];
            }
            m1 /= count;
            m2 /= count;
            for (int64_t k = grp * d; k < (grp + 1) * d; k++) {
                double r = rstd_c[k];
                p_coef[k] = (float)(r * se[k]);
                q_coef[k] = (float)(-r * r * m2);
                add[k] = (float)(-r * m1 + r * r * m2 * mean_c[k]);  /* R, reusing add */
            }
        }
        /* pass 2 */
        const float *gsrc = silu ? dxe : dye;
        for (int64_t n = 0; n < n_rows; n++) {
            const float *grow = gsrc + n * c, *row = xe + n * c;
            float *drow = dxe + n * c;
            for (int64_t k = 0; k < c; k++) drow[k] = grow[k] * p_coef[k] + row[k] * q_coef[k] + add[k];
        }
    }
    free(buf);
    free(sums);
    return 0;
}
