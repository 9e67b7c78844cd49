"""FlashInfer's chain_speculative_sampling, called without FlashInfer's Python package.

FlashInfer compiles its kernels at first use and its package pulls in a dozen dependencies; the GPU
machine has no package index. build_flashinfer_chain.sh compiles FlashInfer's own kernel and host
launcher from a pinned wheel's headers into a small library (carried in .whl/), and this module
calls it through ctypes exactly as `flashinfer.sampling.chain_speculative_sampling` does: fp32
probabilities, int32 draft ids, the three outputs allocated per call (token ids [B, K+1] int32,
the two counters zeroed, since the kernel adds to them), deterministic=True.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Union

import torch

LIBRARY_FILE = "flashinfer_chain_sampling.so"
# Where the GPU check finds the library it carries; COLLAB_OPS_FLASHINFER_CHAIN names another.
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / ".whl" / LIBRARY_FILE


def library_path() -> Path:
    return Path(os.environ.get("COLLAB_OPS_FLASHINFER_CHAIN", DEFAULT_LIBRARY))


def build_info() -> Union[dict, None]:
    """What the library was built from (build_flashinfer_chain.sh's record), or None without one."""
    record = library_path().with_suffix(".json")
    return json.loads(record.read_text()) if record.is_file() else None


@functools.cache
def _entry_point(path: Path):
    library = ctypes.CDLL(str(path))
    function = library.chain_speculative_sampling_f32
    function.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_uint] * 3 + [ctypes.c_ulonglong] * 2 + [ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


_offsets = itertools.count(0, 4 * 1024)  # a fresh Philox offset per call, as FlashInfer's generator path


def chain_speculative_sampling(draft_probs: torch.Tensor, draft_token_ids: torch.Tensor, target_probs: torch.Tensor,
                               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output_token_ids [B, K+1] int32 padded with -1, accepted [B], emitted drafts [B]) as FlashInfer's API."""
    batch, num_draft, vocab = draft_probs.shape
    if target_probs.shape != (batch, num_draft + 1, vocab) or draft_token_ids.shape != (batch, num_draft):
        raise ValueError(f"shapes do not chain: draft_probs {tuple(draft_probs.shape)}, draft_token_ids "
                         f"{tuple(draft_token_ids.shape)}, target_probs {tuple(target_probs.shape)}")
    for name, tensor, dtype in (("draft_probs", draft_probs, torch.float32), ("target_probs", target_probs, torch.float32),
                                ("draft_token_ids", draft_token_ids, torch.int32)):
        if tensor.dtype != dtype or not tensor.is_contiguous() or tensor.device.type != "cuda":
            raise ValueError(f"{name} must be a contiguous CUDA {dtype} tensor")
    device = draft_probs.device
    tokens = torch.empty(batch, num_draft + 1, dtype=torch.int32, device=device)
    accepted = torch.zeros(batch, dtype=torch.int32, device=device)
    emitted = torch.zeros(batch, dtype=torch.int32, device=device)
    status = _entry_point(library_path())(
        draft_probs.data_ptr(), draft_token_ids.data_ptr(), target_probs.data_ptr(), tokens.data_ptr(),
        accepted.data_ptr(), emitted.data_ptr(), batch, num_draft, vocab, seed, next(_offsets),
        torch.cuda.current_stream(device).cuda_stream)
    if status != 0:
        raise RuntimeError(f"FlashInfer's ChainSpeculativeSampling failed (status {status})")
    return tokens, accepted, emitted


def peer_call(draft_token_ids: torch.Tensor, target_probs: torch.Tensor,
              draft_probs: torch.Tensor) -> Union[Callable[[], tuple], str]:
    """A zero-argument call of the kernel on these inputs, or why it cannot run here."""
    if not library_path().is_file():
        return (f"FlashInfer is not installed and {library_path().name} was not built "
                "(bench/peers/build_flashinfer_chain.sh)")
    try:
        _entry_point(library_path())
    except OSError as exc:
        return f"{library_path().name} does not load ({exc})"
    ids = draft_token_ids.to(torch.int32)
    return functools.partial(chain_speculative_sampling, draft_probs.contiguous(), ids, target_probs.contiguous())
