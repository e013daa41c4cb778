"""Top-k / top-p truncation: the kept set, shared by the engine's sampler and the trainer's
truncation-aware log-probs (``linear_logprobs(..., top_k=, top_p=)``), so both choose it the
same way: over the logits after the temperature, sorted descending with a stable sort (ties:
the lower token id first), the first ``top_k`` positions, then (over that renormalized set) every
token whose mass strictly ahead of it is below ``top_p`` -- the token that crosses ``top_p``
stays -- and always the most likely one. Hugging Face's order: temperature, top-k, top-p.
"""
import torch


def truncate_sorted(zs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``zs [B, V]`` sorted descending: the same with the dropped positions at -inf. ``top_k``
    ``[B]`` int (V: none), ``top_p`` ``[B]`` in (0, 1] (1: none)."""
    V = zs.shape[-1]
    pos = torch.arange(V, device=zs.device)
    zs = zs.masked_fill(pos[None, :] >= top_k[:, None], float("-inf"))
    if bool((top_p < 1).any()):
        p = torch.softmax(zs, dim=-1)
        before = p.cumsum(-1) - p  # mass strictly ahead of each token
        drop = (before >= top_p[:, None]) & (top_p[:, None] < 1)
        drop[:, 0] = False  # the most likely token always stays
        zs = zs.masked_fill(drop, float("-inf"))
    return zs


def kept_mask(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """bool ``[N, V]``: the tokens a sampler with these settings can draw from logits ``z``
    (after the temperature; no gradient)."""
    with torch.no_grad():
        N, V = z.shape
        zs, order = torch.sort(z, dim=-1, descending=True, stable=True)
        k = torch.full((N,), top_k or V, device=z.device)
        p = torch.full((N,), float(top_p), dtype=zs.dtype, device=z.device)
        keep_sorted = torch.isfinite(truncate_sorted(zs, k, p)) | (zs == float("inf"))
        return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
