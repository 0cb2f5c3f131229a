"""Weight quantization for the ExecuTorch (.pte, XNNPACK) export: torchao `quantize_`, one function
per scheme in a small registry (the torchao config style).

  8da4w  int8 dynamic (per token, asymmetric) activations, int4 symmetric weights in groups of
         `group_size` input channels: Int8DynamicActivationIntxWeightConfig(int4, PerGroup(g)),
         scales chosen by HQQ's scale search ("hqq_scale_only", as ExecuTorch's llama export
         does): lower perplexity than plain min-max scales on the trained demo models (README),
         the same artifact and speed
  8da8w  the same with int8 weights, one min-max scale per output channel: PerAxis(0)

Both lower to XNNPACK's dynamically quantized fully-connected kernels. Chosen over the XNNPACK PT2E
quantizer (dynamic, per channel), measured on the same models (README): equal speed, size and
quality for int8; for int4 the PT2E quantizer only has per-channel weights (higher perplexity,
lower top-1), torchao groups them.

Not used, on purpose: Int8WeightOnlyConfig fails at run time in XNNPACK and IntxWeightOnlyConfig
lowers silently wrong (its scale is dropped); tests/quant compare every quantized .pte with the
eager quantized model so such a lowering cannot pass unnoticed.

Embeddings stay fp32. The output projection (lm_head) stays fp32 unless asked: with tied
embeddings it IS the embedding matrix, so quantizing it first unties it (an explicit fp32 copy
stays behind as the embedding table) - the artifact then holds both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from qkvx.errors import QkvxError
from qkvx.models.transformer import Transformer

Scheme = Callable[[int], object]  # group_size -> torchao config


def _8da4w(group_size: int):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4,
        weight_granularity=PerGroup(group_size),
        intx_choose_qparams_algorithm="hqq_scale_only",
    )


def _8da8w(group_size: int):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


# scheme name (Recipe.weights) -> (torchao config from group_size, whether the scheme is group-wise)
PTE_SCHEMES: dict[str, tuple[Scheme, bool]] = {"8da4w": (_8da4w, True), "8da8w": (_8da8w, False)}


def quantize_for_pte(
    model: Transformer,
    scheme: str,
    group_size: int = 32,
    quantize_lm_head: bool = False,
    inplace: bool = False,
) -> Transformer:
    """The model with its nn.Linear weights quantized by `scheme` ("none" returns it unchanged).

    Works on a deep copy unless inplace (the caller's fp32 model stays the validation reference).
    Group-wise schemes skip a Linear whose input width is not a multiple of group_size (none in a
    qkvx model with power-of-two widths; the count is checked so that nothing is skipped silently).
    """
    if scheme == "none":
        return model
    if scheme not in PTE_SCHEMES:
        raise QkvxError(f"unknown .pte weight scheme {scheme!r}; known: none, {', '.join(PTE_SCHEMES)}")
    make_config, grouped = PTE_SCHEMES[scheme]
    from torchao.quantization import quantize_

    model = model if inplace else copy.deepcopy(model)
    if quantize_lm_head and model.lm_head.weight is model.tok_emb.weight:
        # untie: the embedding keeps an fp32 table, the head gets its own copy to quantize
        model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())

    def wanted(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or (fqn == "lm_head" and not quantize_lm_head):
            return False
        return not grouped or module.in_features % group_size == 0

    targets = [n for n, m in model.named_modules() if wanted(m, n)]
    linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (n != "lm_head" or quantize_lm_head)
    ]
    if len(targets) != len(linears):
        skipped = sorted(set(linears) - set(targets))
        raise QkvxError(
            f"{scheme} with group_size {group_size}: input width of {', '.join(skipped)} "
            f"is not a multiple of the group size"
        )
    with torch.no_grad():
        quantize_(model, make_config(group_size), filter_fn=wanted)
    return model.eval()


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers whose weight is a torchao quantized tensor (name -> module)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and hasattr(m.weight, "qdata") and hasattr(m.weight, "scale")
    }
