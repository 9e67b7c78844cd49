"""tests/test_fusion_triton.py on CUDA tensors: the triton fusion kernels compiled for the GPU,
with the full-width cases and 50 000 draws for the distribution test (skipped without a GPU)."""
from test_fusion_triton import *  # noqa: F401,F403  (the same tests; DEVICE is cuda there when one is visible)
