//! Gradient mode's scoring: inner products of stored (projected) pair gradients with concept
//! gradients, streamed over a memory-mapped store.
//!
//! `pairs` is row-major `p x d` (f32, as stored), `concepts` row-major `c x d`; every product is
//! accumulated in f64, in a fixed order per (pair, concept), so the result does not depend on
//! the thread count. Rayon runs over pairs; memory beyond the output is O(1).

use rayon::prelude::*;

use crate::error::{CoreError, Result};

/// `p x c` row-major f64: `out[i, k] = Σ_t pairs[i, t] · concepts[k, t]`.
pub fn gradient_scores(pairs: &[f32], concepts: &[f32], d: usize) -> Result<Vec<f64>> {
    if d == 0 {
        return Err(CoreError::empty("concepts", "gradients of dimension 0"));
    }
    if pairs.len() % d != 0 {
        return Err(CoreError::shape(
            "pairs",
            format!("a multiple of d = {d} values"),
            pairs.len(),
        ));
    }
    if concepts.len() % d != 0 {
        return Err(CoreError::shape(
            "concepts",
            format!("a multiple of d = {d} values"),
            concepts.len(),
        ));
    }
    let (p, c) = (pairs.len() / d, concepts.len() / d);
    if let Some(pos) = concepts.iter().position(|v| !v.is_finite()) {
        return Err(CoreError::NonFinite {
            field: "concepts".into(),
            location: format!("concept {}, entry {}", pos / d, pos % d),
        });
    }
    let rows: Vec<Result<Vec<f64>>> = pairs
        .par_chunks(d)
        .enumerate()
        .map(|(i, row)| {
            if let Some(t) = row.iter().position(|v| !v.is_finite()) {
                return Err(CoreError::NonFinite {
                    field: "pairs".into(),
                    location: format!("pair {i}, entry {t}"),
                });
            }
            Ok(concepts
                .chunks_exact(d)
                .map(|q| row.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum())
                .collect())
        })
        .collect();
    let mut out = Vec::with_capacity(p * c);
    for r in rows {
        out.extend(r?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_product() {
        let pairs = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let concepts = [1.0f32, 0.0, 1.0];
        assert_eq!(
            gradient_scores(&pairs, &concepts, 3).unwrap(),
            vec![4.0, 10.0]
        );
        assert!(gradient_scores(&pairs, &[f32::NAN, 0.0, 0.0], 3).is_err());
        assert!(gradient_scores(&pairs, &concepts, 4).is_err());
    }
}
