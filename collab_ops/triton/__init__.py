"""Triton kernels of collab_ops.

`distill` holds the entry points that `collab_ops.ops.distill` registers (and their `supports`);
it imports triton only when a kernel is launched, so collab_ops imports on machines without it.
`kd_kernels` holds the @triton.jit kernels themselves.
"""
