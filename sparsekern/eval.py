"""Perplexity of a causal LM over a token stream, the way pruning papers report it.

The stream is cut into non-overlapping windows of ``seqlen`` tokens (the tail that does not fill a
window is dropped); each window is scored on its own, predicting tokens 1..seqlen-1 from their
prefix. With ``bos_token_id`` each window is that token followed by ``seqlen - 1`` tokens of the stream, all of
them predicted (models trained with BOS-led sequences, such as Gemma, are scored in distribution). Either way a
window scores ``seqlen - 1`` tokens. The reported NLL is the token-weighted mean over all windows, computed in fp32.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = ["perplexity"]


def perplexity(
    model,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    max_windows: int | None = None,
    progress: bool = True,
    bos_token_id: int | None = None,
) -> dict:
    """Perplexity of ``model`` on ``input_ids`` ([1, T] or [T]).

    Returns ``{"perplexity", "nll", "tokens", "windows"}`` where ``tokens = windows * (seqlen - 1)``
    and ``nll`` is the mean negative log-likelihood per token (nats). ``device=None`` uses the
    model's device. ``max_windows`` caps the number of windows scored (from the start). ``bos_token_id``
    (``sparsekern.data.window_bos``) starts every window with that token.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape [1, T] (one token stream), got {list(input_ids.shape)}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one token predicted from one), got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_tokens = input_ids.shape[1]
    content = seqlen - (bos_token_id is not None)  # stream tokens per window
    if n_tokens < content:
        raise ValueError(
            f"the evaluation text has {n_tokens} tokens, fewer than the {content} needed for one window of "
            f"seqlen={seqlen}; lower --seqlen or use a longer evaluation text"
        )
    n_windows = n_tokens // content
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        n_windows = min(n_windows, max_windows)
    if device is None:
        device = next(model.parameters()).device
    windows = input_ids[0, : n_windows * content].reshape(n_windows, content)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)

    was_training = model.training
    model.eval()  # dropout off; restored below so the caller's model state is unchanged
    total_nll = 0.0  # Python float: float64 accumulation across batches
    try:
        with torch.inference_mode(), tqdm(
            total=n_windows, desc="perplexity", unit="window", file=sys.stderr, disable=not progress
        ) as bar:
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # Row by row so the fp32 copy of the logits is one window, not the whole batch
                # (8 x 2048 x 50k vocab in fp32 would be 3 GiB).
                for row in range(batch.shape[0]):
                    total_nll += F.cross_entropy(
                        logits[row, :-1].float(), batch[row, 1:], reduction="sum"
                    ).item()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)

    tokens = n_windows * (seqlen - 1)
    nll = total_nll / tokens
    # A badly broken model can have a mean NLL past exp's range: report inf rather than raise.
    ppl = math.exp(nll) if nll < 700 else float("inf")
    return {"perplexity": ppl, "nll": nll, "tokens": tokens, "windows": n_windows}
