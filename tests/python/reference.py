"""A naive masked-dense attention in float64: the yardstick for every spattn result.

It materialises the element mask from a plan's block map, the rule (causal / sliding window,
bottom-right aligned) and the sequence lengths, then runs a plain softmax. Rows with no allowed
key give out = 0 and lse = -inf. Differentiable (gradients of empty rows are 0).
"""

import math

import torch


def element_mask(nq, nk, causal=False, window=(-1, -1), device="cpu"):
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    d = j - (i + nk - nq)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        allowed &= d <= 0
    if window[0] >= 0:
        allowed &= d >= -window[0]
    if window[1] >= 0:
        allowed &= d <= window[1]
    return allowed


def plan_element_mask(plan, heads_q):
    """(plan batch, Hq, Nq, Nk) bool: tiles listed by the plan, expanded to elements."""
    blocks = plan.to_dense().cpu()
    h = plan.heads
    index = [hq if h == heads_q else 0 if h == 1 else hq // (heads_q // h)
             for hq in range(heads_q)]
    blocks = blocks[:, index]
    em = blocks.repeat_interleave(plan.block_q, 2).repeat_interleave(plan.block_k, 3)
    return em[..., : plan.q_len, : plan.k_len]


def attention(q, k, v, plan=None, causal=False, window=(-1, -1), scale=None):
    """(out, lse) in float64; q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D)."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if plan is not None:
        causal, window = plan.causal, (plan.window_left, plan.window_right)
    allowed = element_mask(nq, nk, causal, window, q.device).expand(b, hq, nq, nk)
    if plan is not None:
        allowed = allowed & plan_element_mask(plan, hq).to(q.device)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    # Empty rows: softmax over a constant row, then zeroed, so no NaN reaches the gradients.
    safe = torch.where(has_key, s, torch.zeros_like(s))
    p = torch.softmax(safe, dim=-1) * has_key
    out = p @ v
    lse = torch.where(has_key.squeeze(-1), torch.logsumexp(safe, dim=-1),
                      torch.full_like(s[..., 0], float("-inf")))
    return out, lse
