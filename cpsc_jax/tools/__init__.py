"""Tools around the method: ablation sweeps, diagnostics, benchmarks."""
