"""Looking at models and runs: sweep reports, learning curves, layer tables, benchmarks, pictures."""
