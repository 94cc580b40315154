"""The demo and what it runs on: `cohort.py`, the synthetic cohort of H&E-like slides (also the tests'
and the benchmarks'); `method.py`, `run_demo(...)`, the paper's method end to end on it; `mil_check.py`,
the cohort's slide task as a check of the MIL pipeline. `cli.py` and `cohort_cli.py` parse the flags of
`dinov2-patho demo` and `dinov2-patho cohort`."""
