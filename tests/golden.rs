//! The CPU reference against PyTorch float64 (fixtures in tests/golden/).

use output_projector::golden;
use output_projector::reference::Reference;

#[test]
fn reference_matches_pytorch_float64() {
    let results = golden::run_all(&Reference).expect("golden cases run");
    let mut ops = std::collections::BTreeSet::new();
    for r in &results {
        ops.insert(r.op);
        assert!(
            r.rel <= 1e-10,
            "{} {}: rel {:.3e} max_abs {:.3e}",
            r.op,
            r.case,
            r.rel,
            r.max_abs
        );
    }
    // Every op and the whole model were exercised.
    for op in [
        "linear",
        "layer_norm",
        "attention",
        "alignment_loss",
        "gather_signal_tokens",
        "projector",
    ] {
        assert!(ops.contains(op), "no golden case for {op}");
    }
    let worst = results.iter().map(|r| r.rel).fold(0.0, f64::max);
    println!("{} golden outputs, worst rel {worst:.2e}", results.len());
}
