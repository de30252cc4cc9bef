"""`just bench` (run.py and the modules it is made of) and the model-only benchmarks; see BENCHMARKS.md."""
