"""GPU-only tests (marked `gpu`, skipped without a CUDA GPU); tests/gpu/run.sh runs them on a GPU machine."""
