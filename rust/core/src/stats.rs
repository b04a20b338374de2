//! Per-feature statistics over an `n x F` activation matrix in two passes over the non-zeros:
//! counts, means, population standard deviations, Pearson correlation with the behaviour score,
//! and means per probe group. Sums of squares are taken about the mean (not `E[x^2] - E[x]^2`)
//! so huge or tiny activations do not cancel.

use rayon::prelude::*;

use crate::error::{check_alloc, CoreError, Result};
use crate::matrix::{check_vec, Matrix};

#[derive(Debug, Clone)]
pub struct FeatureStats {
    pub n_rows: usize,
    pub n_features: usize,
    pub n_groups: usize,
    /// Number of probes with a non-zero activation.
    pub n_active: Vec<u64>,
    pub mean: Vec<f64>,
    /// Population standard deviation (divides by n).
    pub std: Vec<f64>,
    /// Pearson correlation with y; NaN where a side has zero variance or y was not given.
    pub corr: Vec<f64>,
    /// Row-major `n_features x n_groups` means within each probe group.
    pub group_means: Vec<f64>,
    pub group_counts: Vec<u64>,
}

struct Acc {
    sum: Vec<f64>,
    stored: Vec<u64>,
    active: Vec<u64>,
    gsum: Vec<f64>,
    /// Largest |x| per feature: second moments are summed in units of a power of two near it.
    max_abs: Vec<f64>,
}

/// The power of two at or below `max_abs` (1 for 0, subnormals and non-finite values): dividing
/// by it is exact, so it moves sums of squares into range without changing their rounding.
pub(crate) fn pow2_unit(max_abs: f64) -> f64 {
    if !(max_abs.is_finite() && max_abs >= f64::MIN_POSITIVE) {
        return 1.0;
    }
    f64::from_bits(max_abs.to_bits() & 0x7ff0_0000_0000_0000)
}

fn rows_of(x: &Matrix<'_>, r: usize, mut f: impl FnMut(usize, f64)) {
    match x {
        Matrix::Csr(c) => {
            let (idx, val) = c.row(r);
            for (&j, &v) in idx.iter().zip(val) {
                f(j as usize, v);
            }
        }
        Matrix::Dense(d) => {
            for (j, &v) in d.row(r).iter().enumerate() {
                f(j, v);
            }
        }
    }
}

/// Rows are split into a fixed number of chunks, independent of the thread count, and the
/// chunk partials are added in order: results are bit-identical for any `threads`.
const N_CHUNKS: usize = 16;

pub(crate) fn row_chunks(n: usize) -> Vec<(usize, usize)> {
    let size = n.div_ceil(N_CHUNKS).max(256);
    (0..n)
        .step_by(size)
        .map(|s| (s, (s + size).min(n)))
        .collect()
}

/// Compute [`FeatureStats`]. `groups` holds a code in `0..n_groups` per row.
pub fn feature_stats(
    x: &Matrix<'_>,
    y: Option<&[f64]>,
    groups: Option<(&[u32], usize)>,
) -> Result<FeatureStats> {
    let (n, f) = (x.nrows(), x.ncols());
    if n == 0 {
        return Err(CoreError::empty("X", "no probes (rows)"));
    }
    if f == 0 {
        return Err(CoreError::empty("X", "no features (columns)"));
    }
    if let Some(y) = y {
        check_vec("y", y, n)?;
    }
    let (codes, g) = match groups {
        Some((codes, g)) => {
            if codes.len() != n {
                return Err(CoreError::shape(
                    "groups",
                    format!("length {n}"),
                    format!("length {}", codes.len()),
                ));
            }
            if g == 0 {
                return Err(CoreError::value("groups", "n_groups must be at least 1"));
            }
            if let Some(pos) = codes.iter().position(|&c| c as usize >= g) {
                return Err(CoreError::value(
                    "groups",
                    format!("row {pos} has group code {} outside 0..{g}", codes[pos]),
                ));
            }
            (Some(codes), g)
        }
        None => (None, 1),
    };
    // Guard the per-chunk buffers (features x (groups + 3)) before the workers allocate them.
    let per_chunk = g.checked_add(3).and_then(|w| w.checked_mul(f));
    check_alloc(
        "X",
        per_chunk.and_then(|c| c.checked_mul(row_chunks(n).len())),
    )?;
    let mut group_counts = vec![0u64; g];
    match codes {
        Some(c) => c.iter().for_each(|&k| group_counts[k as usize] += 1),
        None => group_counts[0] = n as u64,
    }
    if let Some(empty) = group_counts.iter().position(|&c| c == 0) {
        return Err(CoreError::value(
            "groups",
            format!("group {empty} has no probes; every group needs at least one"),
        ));
    }

    // Pass 1: sums, counts, group sums.
    let chunks = row_chunks(n);
    let new_acc = || Acc {
        sum: vec![0.0; f],
        stored: vec![0; f],
        active: vec![0; f],
        gsum: vec![0.0; f * g],
        max_abs: vec![0.0; f],
    };
    let acc = chunks
        .par_iter()
        .map(|&(s, e)| {
            let mut a = new_acc();
            for r in s..e {
                let gr = codes.map_or(0, |c| c[r] as usize);
                rows_of(x, r, |j, v| {
                    a.sum[j] += v;
                    a.stored[j] += 1;
                    a.active[j] += (v != 0.0) as u64;
                    a.gsum[j * g + gr] += v;
                    a.max_abs[j] = a.max_abs[j].max(v.abs());
                });
            }
            a
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(new_acc(), |mut a, b| {
            a.sum.iter_mut().zip(&b.sum).for_each(|(p, q)| *p += q);
            a.stored
                .iter_mut()
                .zip(&b.stored)
                .for_each(|(p, q)| *p += q);
            a.active
                .iter_mut()
                .zip(&b.active)
                .for_each(|(p, q)| *p += q);
            a.gsum.iter_mut().zip(&b.gsum).for_each(|(p, q)| *p += q);
            a.max_abs
                .iter_mut()
                .zip(&b.max_abs)
                .for_each(|(p, q)| *p = p.max(*q));
            a
        });
    let nf = n as f64;
    let mean: Vec<f64> = acc.sum.iter().map(|s| s / nf).collect();
    let y_mean = y.map(|y| y.iter().sum::<f64>() / nf);
    // Exact power-of-two units: squares of 1e200 or 1e-200 neither overflow nor underflow, and
    // in the normal range every result keeps its bits (scaling by 2^e rounds nothing).
    let unit: Vec<f64> = acc.max_abs.iter().map(|&m| pow2_unit(m)).collect();
    let y_unit = y.map_or(1.0, |y| {
        pow2_unit(y.iter().fold(0.0f64, |m, v| m.max(v.abs())))
    });

    // Pass 2: centred second moments. For a sparse column, the stored entries contribute
    // (x - mean)^2 and the implicit zeros (n - stored) * mean^2; cov needs only sum x * (y - ybar).
    let zero2 = || (vec![0.0f64; f], vec![0.0f64; f]);
    let (ss, sxy) = chunks
        .par_iter()
        .map(|&(s, e)| {
            let (mut ss, mut sxy) = zero2();
            for r in s..e {
                let yc = match (y, y_mean) {
                    (Some(y), Some(m)) => (y[r] - m) / y_unit,
                    _ => 0.0,
                };
                rows_of(x, r, |j, v| {
                    let d = (v - mean[j]) / unit[j];
                    ss[j] += d * d;
                    sxy[j] += v / unit[j] * yc;
                });
            }
            (ss, sxy)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(zero2(), |(mut a, mut b), (c, d)| {
            a.iter_mut().zip(&c).for_each(|(p, q)| *p += q);
            b.iter_mut().zip(&d).for_each(|(p, q)| *p += q);
            (a, b)
        });
    // Standard deviations in each feature's unit (std_u), then in the data's own units.
    let std_u: Vec<f64> = (0..f)
        .map(|j| {
            let implicit = (n as u64 - acc.stored[j]) as f64;
            let m = mean[j] / unit[j];
            ((ss[j] + implicit * m * m) / nf).max(0.0).sqrt()
        })
        .collect();
    let std: Vec<f64> = std_u.iter().zip(&unit).map(|(s, u)| s * u).collect();
    let corr = match (y, y_mean) {
        (Some(y), Some(m)) => {
            let syy: f64 = y
                .iter()
                .map(|v| (v - m) / y_unit)
                .map(|d| d * d)
                .sum::<f64>()
                / nf;
            let sy = syy.sqrt();
            let y_constant = crate::ridge::is_constant(sy * y_unit, m);
            (0..f)
                .map(|j| {
                    let denom = std_u[j] * sy;
                    // A spread at rounding level is no spread: its correlation would be noise.
                    if y_constant || crate::ridge::is_constant(std[j], mean[j]) {
                        f64::NAN
                    } else if denom > 0.0 && denom.is_finite() {
                        (sxy[j] / nf / denom).clamp(-1.0, 1.0)
                    } else {
                        f64::NAN
                    }
                })
                .collect()
        }
        _ => vec![f64::NAN; f],
    };
    let mut group_means = acc.gsum;
    for j in 0..f {
        for k in 0..g {
            group_means[j * g + k] /= group_counts[k] as f64;
        }
    }
    Ok(FeatureStats {
        n_rows: n,
        n_features: f,
        n_groups: g,
        n_active: acc.active,
        mean,
        std,
        corr,
        group_means,
        group_counts,
    })
}
