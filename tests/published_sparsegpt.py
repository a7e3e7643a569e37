"""SparseGPT as published (Frantar & Alistarh, 2023), written from the paper with torch and transformers only.

An independent check of sparsekern's pipeline: nothing here imports sparsekern. Layer by layer, the inputs of
every linear of a decoder layer are collected from the pruned model's own activations (the layers before it
already pruned), H = 2/N · XᵀX, the weights are pruned with per-128-column adaptive masks and OBS updates via the
upper Cholesky factor of H⁻¹ (1% damping), then the layer is rerun to give the next layer its inputs.
Perplexity is scored on BOS-led windows: BOS, then ``seqlen - 1`` tokens of the text, every one predicted.

As a script: ``python tests/published_sparsegpt.py MODEL_FOLDER TRAIN.txt TEST.txt [--sparsity 0.5]`` prints the
dense and pruned perplexities (calibration windows drawn here, BOS-led when the tokenizer adds a BOS).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn


def sparsegpt_weights(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, blocksize: int = 128,
                      percdamp: float = 0.01) -> torch.Tensor:
    """The pruned weight [rows, cols] in fp32: in each block of ``blocksize`` columns the ``sparsity`` fraction of
    weights with the lowest w² / [U]ⱼⱼ² goes, each removal compensated on the columns after it (Algorithm 1)."""
    w = weight.detach().float().clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights do nothing
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        errors = torch.zeros_like(block)
        scores = block ** 2 / torch.diag(u_block).unsqueeze(0) ** 2
        n_pruned = int(scores.numel() * sparsity)
        pruned = torch.zeros(scores.numel(), dtype=torch.bool)
        pruned[torch.argsort(scores.flatten())[:n_pruned]] = True
        pruned = pruned.view_as(scores)
        for j in range(end - start):
            column = block[:, j]
            kept = torch.where(pruned[:, j], torch.zeros_like(column), column)
            error = (column - kept) / u_block[j, j]
            block[:, j:] -= error.unsqueeze(1) * u_block[j, j:].unsqueeze(0)
            block[:, j] = kept
            errors[:, j] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]  # the lazy update of every later column
    return w


class _InputsSeen(Exception):
    pass


def _layer_arguments(model, windows: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """The first decoder layer's input and every layer's keyword arguments (masks and rotary embeddings differ
    between sliding-window and full-attention layers), from one dense pass stopped before the final norm."""
    layers = model.model.layers
    first_input: list[torch.Tensor] = []
    arguments: list[dict] = [{} for _ in layers]

    def seen(index):
        def hook(module, args, kwargs):
            if index == 0:
                first_input.append(args[0] if args else kwargs["hidden_states"])
            arguments[index] = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        return hook

    handles = [layer.register_forward_pre_hook(seen(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def stop(module, args):
        raise _InputsSeen

    handles.append(model.model.norm.register_forward_pre_hook(stop))
    try:
        model(input_ids=windows, use_cache=False)
    except _InputsSeen:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return first_input[0], arguments


def _run_layer(layer, hidden, arguments):
    out = layer(hidden, **arguments)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune_model(model, windows: torch.Tensor, sparsity: float = 0.5) -> None:
    """Prune every linear of every decoder layer of ``model`` in place with SparseGPT, calibrated on ``windows``
    ([n, seqlen] token ids, one batch)."""
    hidden, arguments = _layer_arguments(model, windows)
    for index, layer in enumerate(model.model.layers):
        linears = {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        sums = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def accumulate(name):
            def hook(module, args, output):
                x = args[0].reshape(-1, module.in_features).float()
                sums[name] += x.T @ x
                counts[name] += x.shape[0]
            return hook

        handles = [m.register_forward_hook(accumulate(name)) for name, m in linears.items()]
        _run_layer(layer, hidden, arguments[index])
        for handle in handles:
            handle.remove()
        for name, module in linears.items():
            hessian = 2.0 * sums[name] / counts[name]
            module.weight.copy_(sparsegpt_weights(module.weight, hessian, sparsity).to(module.weight.dtype))
        hidden = _run_layer(layer, hidden, arguments[index])


def bos_windows(ids: torch.Tensor, bos_id: int, seqlen: int) -> torch.Tensor:
    """Non-overlapping evaluation windows: BOS, then ``seqlen - 1`` consecutive tokens of ``ids`` (1-D)."""
    content = seqlen - 1
    n = ids.numel() // content
    body = ids[: n * content].view(n, content)
    return torch.cat([torch.full((n, 1), bos_id, dtype=body.dtype), body], dim=1)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean NLL of every token after the first of each window."""
    nll, tokens = 0.0, 0
    for row in windows:
        logits = model(input_ids=row.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, row[1:], reduction="sum").item()
        tokens += row.numel() - 1
    return math.exp(nll / tokens)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("train")
    parser.add_argument("test")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    bos = tokenizer.bos_token_id

    def stream(path):
        with open(path, encoding="utf-8") as f:
            return tokenizer(f.read(), add_special_tokens=False, return_tensors="pt").input_ids[0]

    train = stream(args.train)
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, train.numel() - args.seqlen, (args.nsamples,), generator=gen).tolist()
    calibration = torch.stack([train[s : s + args.seqlen - 1] for s in starts])
    calibration = torch.cat([torch.full((args.nsamples, 1), bos), calibration], dim=1)
    held_out = bos_windows(stream(args.test), bos, args.seqlen)[: args.eval_windows]
    print(f"dense perplexity {perplexity(model, held_out):.3f}")
    prune_model(model, calibration, args.sparsity)
    print(f"SparseGPT {args.sparsity:.0%} perplexity {perplexity(model, held_out):.3f}")


if __name__ == "__main__":
    main()
