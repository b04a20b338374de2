//! Thin PyO3 layer over `policytrace-core`: convert arguments (`convert`), release the GIL, call
//! the core, return typed result objects (`numeric`), map errors once (`errors`).
//!
//! The Python package normalizes inputs (dtype, layout, sparse format) before calling here;
//! these functions still check everything, so direct calls get typed errors too.

mod convert;
mod errors;
mod numeric;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(numeric::feature_stats, m)?)?;
    m.add_function(wrap_pyfunction!(numeric::fit_policy, m)?)?;
    m.add_function(wrap_pyfunction!(numeric::interference, m)?)?;
    m.add_function(wrap_pyfunction!(numeric::gradient_scores, m)?)?;
    m.add_class::<numeric::Decomposer>()?;
    m.add_class::<numeric::FeatureStats>()?;
    m.add_class::<numeric::FitResult>()?;
    m.add_class::<numeric::SplitResult>()?;
    m.add_class::<numeric::InterferenceResult>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Shared with the float64 reference (policytrace.numeric._reference), which reads them.
    use policytrace_core::constants as c;
    m.add("PIVOT_RATIO_MIN", c::PIVOT_RATIO_MIN)?;
    m.add("MAX_THREADS", c::MAX_THREADS)?;
    m.add("REFIT_TOLERANCE", c::REFIT_TOLERANCE)?;
    m.add("GCV_GRID_POINTS", c::GCV_GRID_POINTS)?;
    m.add("GCV_GRID_LO", c::GCV_GRID_LO)?;
    m.add("GCV_GRID_HI", c::GCV_GRID_HI)?;
    Ok(())
}
