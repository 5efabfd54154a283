"""The main job: ``python -m fused_cbam.bench`` checks every backend against the reference, then
times and measures the CBAM block and each operator against the eager and compiled baselines."""
