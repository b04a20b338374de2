//! Cross-feature interference: does a pair's dominant coefficient shift land on a feature of
//! its own group (category or harmful/harmless side), or on someone else's?

use crate::error::{CoreError, Result};

/// Group codes: `NO_GROUP` marks a pair or feature without a group (never intended).
pub const NO_GROUP: i64 = -1;

#[derive(Debug, Clone)]
pub struct Interference {
    /// Index of `argmax_k |d_coef_k|` per pair, or -1 when the pair moves nothing.
    pub dominant: Vec<i64>,
    /// `Σ_{k not intended} |d_k| / Σ_k |d_k|`, 0 when the pair moves nothing.
    pub off_target_share: Vec<f64>,
    /// The dominant feature is not one of the pair's intended features.
    pub flag: Vec<bool>,
}

/// `d` is row-major `P x K` (standardized units), `feature_group` has K codes and
/// `pair_group` P codes; a feature is intended for a pair when their codes are equal.
pub fn interference(
    d: &[f64],
    k: usize,
    feature_group: &[i64],
    pair_group: &[i64],
) -> Result<Interference> {
    if feature_group.len() != k {
        return Err(CoreError::shape(
            "feature_group",
            format!("length {k}"),
            format!("length {}", feature_group.len()),
        ));
    }
    let p = pair_group.len();
    if k == 0 && p > 0 {
        return Err(CoreError::empty("d_coef", "no features (columns)"));
    }
    if d.len() != p * k {
        return Err(CoreError::shape(
            "d_coef",
            format!("{p} pairs x {k} features"),
            format!("{} values", d.len()),
        ));
    }
    let mut out = Interference {
        dominant: Vec::with_capacity(p),
        off_target_share: Vec::with_capacity(p),
        flag: Vec::with_capacity(p),
    };
    for (row, &g) in d.chunks_exact(k.max(1)).take(p).zip(pair_group) {
        let intended = |j: usize| g != NO_GROUP && feature_group[j] == g;
        let (mut best, mut best_v, mut total, mut off) = (NO_GROUP, 0.0f64, 0.0f64, 0.0f64);
        for (j, v) in row.iter().enumerate() {
            let a = v.abs();
            if !a.is_finite() {
                return Err(CoreError::NonFinite {
                    field: "d_coef".into(),
                    location: format!("feature {j}"),
                });
            }
            total += a;
            if !intended(j) {
                off += a;
            }
            // Strict '>' keeps the lowest index on ties: deterministic.
            if a > best_v {
                best_v = a;
                best = j as i64;
            }
        }
        if !total.is_finite() {
            // The sum overflowed: redo it in units of the largest shift.
            total = row.iter().map(|v| v.abs() / best_v).sum();
            off = row
                .iter()
                .enumerate()
                .filter(|(j, _)| !intended(*j))
                .map(|(_, v)| v.abs() / best_v)
                .sum();
        }
        out.dominant.push(best);
        out.off_target_share
            .push(if total > 0.0 { off / total } else { 0.0 });
        out.flag.push(best >= 0 && !intended(best as usize));
    }
    Ok(out)
}
