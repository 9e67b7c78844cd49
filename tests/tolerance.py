"""The tolerance rule of DESIGN.md: a kernel's error against a float64 reference may be at most
twice the error of the same computation done by PyTorch in working precision (flash-attention's
habit), so the bound follows the dtype instead of a hand-picked constant."""
import torch

# Both errors can be exactly zero (e.g. V=1); this is the smallest fp32 difference that counts.
_ABSOLUTE_FLOOR = 4 * torch.finfo(torch.float32).eps


def assert_close_to_reference(result: torch.Tensor, exact: torch.Tensor, torch_result: torch.Tensor, *, factor: float = 2.0, what: str = "result"):
    """`exact` is the float64 reference, `torch_result` PyTorch's own answer in working precision."""
    result, exact, torch_result = (t.detach().to("cpu", torch.float64) for t in (result, exact, torch_result))
    assert result.shape == exact.shape, f"{what}: shape {tuple(result.shape)} != {tuple(exact.shape)}"
    same_nan = torch.isnan(result) == torch.isnan(exact)
    assert same_nan.all(), f"{what}: NaN at different positions ({(~same_nan).sum().item()} differ)"
    for sign in (float("inf"), float("-inf")):
        same_inf = (result == sign) == (exact == sign)
        assert same_inf.all(), f"{what}: {sign} at different positions ({(~same_inf).sum().item()} differ)"
    finite = torch.isfinite(exact)
    if not finite.any():
        return
    ours = (result - exact)[finite].abs().max().item()
    theirs = (torch_result - exact)[finite].abs().max().item()
    bound = factor * theirs + _ABSOLUTE_FLOOR * max(1.0, exact[finite].abs().max().item())
    assert ours <= bound, f"{what}: max error {ours:.3e} exceeds {factor}x PyTorch's {theirs:.3e} (bound {bound:.3e})"
