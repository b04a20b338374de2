//! policytrace-core: the numeric heart of policytrace, free of Python.
//!
//! * [`stats`]: per-feature statistics of a sparse probe x feature activation matrix.
//! * [`ridge`]: the symbolic policy (ridge with fixed scales, optional intercept, GCV).
//! * [`decompose`]: each training pair's policy shift split into ΔX and ΔY pathways.
//! * [`interference`]: dominant-feature and off-target analysis per pair.
//! * [`score`]: gradient mode's inner products of stored pair gradients with concept gradients.
//!
//! Every entry point validates its inputs and returns [`CoreError`] instead of panicking.

pub mod decompose;
pub mod error;
pub mod interference;
pub mod linalg;
pub mod matrix;
pub mod pairs;
pub mod ridge;
pub mod score;
pub mod stats;

pub use decompose::{decompose, decompose_pairs, Base, BaseSpec, Method, Split};
pub use error::{CoreError, Result};
pub use faer::Par;
pub use interference::{interference, Interference, NO_GROUP};
pub use linalg::{pool, with_pool, SolverKind};
pub use matrix::{Csr, Dense, Matrix};
pub use pairs::PairRows;
pub use ridge::{fit, FitOptions, Lam, Policy};
pub use score::gradient_scores;
pub use stats::{feature_stats, FeatureStats};

/// The numeric constants the float64 reference (Python, tests only) must share with the core;
/// the extension exports them so the reference reads them instead of keeping copies.
pub mod constants {
    pub use crate::decompose::REFIT_TOLERANCE;
    pub use crate::linalg::{MAX_THREADS, PIVOT_RATIO_MIN};
    pub use crate::ridge::{GCV_GRID_HI, GCV_GRID_LO, GCV_GRID_POINTS};
}
