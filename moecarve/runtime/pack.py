"""Weights in the runtime's layouts (runtime/csrc/rt.h), as pure tensor functions.

Every matrix is [N, K] (N outputs, K inputs, nn.Linear's layout) in, and comes out as
  panels  [N/16, K/kp, 16, kp] elements (kp = 1 float32, 2 bfloat16, 4 int8): what the dot-product
          instructions consume, one 64-byte vector per 16 outputs and kp inputs;
  rows    [N, K] row-major (the carved experts' neurons, read a row at a time);
with N padded to 16 and K to 32 by zeros. int8 is the Q8_0 scheme: blocks of 32 along K, one
float16 scale per block (max |w| / 127), codes in -127..127 stored +128 as uint8, and its scales
come as a second tensor ([N/16, K/32, 16] for panels, [N, K/32] for rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .native import BF16, BLOCK, F32, I8, PANEL_ROWS

PRECISIONS = {"fp32": F32, "bf16": BF16, "int8": I8}


def pad_to(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """w [N, K] zero-padded up to multiples of (rows, cols), as float32."""
    N, K = w.shape
    return F.pad(w.detach().float(), (0, -K % cols, 0, -N % rows))


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (K a multiple of 32) -> (codes uint8 [N, K] = q + 128, scales float16 [N, K/32]),
    q = round_half_even(w / s) in -127..127 with s = max|w| / 127 per block, rounded to float16
    first so that q * s is exactly what the kernels dequantise."""
    N, K = w.shape
    blocks = w.float().view(N, K // BLOCK, BLOCK)
    scale = (blocks.abs().amax(dim=-1) / 127.0).half()  # [N, K/32]
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(blocks / torch.where(s > 0, s, 1.0)), 0.0).clamp_(-127, 127)
    return (q.to(torch.int16) + 128).to(torch.uint8).view(N, K), scale


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] an int8 rows matrix stands for (tests and reference paths)."""
    N, K = codes.shape
    q = codes.view(N, K // BLOCK, BLOCK).to(torch.int16) - 128
    return (q.float() * scales.float().unsqueeze(-1)).view(N, K)


def pack_panels(w: torch.Tensor, precision: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [N, K] -> (elements in the panel layout, int8 block scales or None)."""
    w = pad_to(w, PANEL_ROWS, BLOCK)
    N, K = w.shape
    P = N // PANEL_ROWS
    if precision == F32:
        return w.view(P, PANEL_ROWS, K).transpose(1, 2).contiguous(), None
    if precision == BF16:
        b = w.to(torch.bfloat16).view(torch.int16).view(P, PANEL_ROWS, K // 2, 2)
        return b.transpose(1, 2).contiguous(), None
    codes, scales = quantize_blocks(w)
    codes = codes.view(P, PANEL_ROWS, K // 4, 4).transpose(1, 2).contiguous()
    scales = scales.view(P, PANEL_ROWS, K // BLOCK).transpose(1, 2).contiguous()
    return codes, scales


def row_bytes(K: int) -> int:
    """Bytes of one int8 row: K (padded to 32) codes, then K/32 float16 scales, padded to 64."""
    Kp = -(-K // BLOCK) * BLOCK
    return -(-(Kp + 2 * Kp // BLOCK) // 64) * 64


def pack_rows(w: torch.Tensor, precision: int) -> tuple[torch.Tensor, None]:
    """w [N, K] -> (row-major elements with K padded to 32; int8: each row its codes then its float16
    block scales, padded to row_bytes(K)), None."""
    w = pad_to(w, 1, BLOCK)
    if precision == F32:
        return w.contiguous(), None
    if precision == BF16:
        return w.to(torch.bfloat16).view(torch.int16).contiguous(), None
    N, Kp = w.shape
    codes, scales = quantize_blocks(w)
    rows = torch.zeros(N, row_bytes(Kp), dtype=torch.uint8)
    rows[:, :Kp] = codes
    rows[:, Kp : Kp + 2 * (Kp // BLOCK)] = scales.view(torch.uint8).view(N, -1)
    return rows, None


def unpack_rows(rows: torch.Tensor, K: int) -> torch.Tensor:
    """The float32 [N, K] an int8 rows matrix (pack_rows' layout) stands for."""
    Kp = -(-K // BLOCK) * BLOCK
    codes = rows[:, :Kp].contiguous()
    scales = rows[:, Kp : Kp + 2 * (Kp // BLOCK)].contiguous().view(torch.float16)
    return dequantize_blocks(codes, scales)[:, :K]


def interleave_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [n, K] -> [2n', K] (n' = n padded to 16): gate panel p, then up panel p, so a thread
    that owns a pair of panels owns act(gate) * up of the same 16 neurons."""
    g, u = pad_to(gate, PANEL_ROWS, 1), pad_to(up, PANEL_ROWS, 1)
    n, K = g.shape
    return torch.stack([g.view(n // PANEL_ROWS, PANEL_ROWS, K), u.view(n // PANEL_ROWS, PANEL_ROWS, K)], dim=1).view(2 * n, K)


def interleave_gated_bias(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The biases [n] of gate and up in interleave_gated's row order, [2n'] float32."""
    return interleave_gated(gate.unsqueeze(-1), up.unsqueeze(-1)).squeeze(-1).contiguous()
