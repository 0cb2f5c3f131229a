"""The tiny test models every export and runtime test builds from (one table, not a copy per file)."""

from qkvx.models.transformer import Transformer
from qkvx.spec import ModelSpec

DIMS = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, max_positions=128)
LLAMA_INNER = 160  # SwiGLU: ~8/3 of the width, a multiple of 32
PAPER_VARIANTS = ("QKV", "Q=K-V", "Q-K=V", "Q=K=V", "GQA-2", "MQA", "Q-GQA-2", "Q-MQA")
# What every exporter is tested on: all the paper's variants in its own family (GPT), and the
# Llama family's three cache shapes (two tensors, one shared, one shared single head).
EXPORT_CASES = [("gpt", v) for v in PAPER_VARIANTS] + [("llama", v) for v in ("QKV", "Q-K=V", "Q-MQA")]
SHARED = ("Q-K=V", "Q=K=V", "Q-GQA-2", "Q-MQA")
# qkvx.train arguments of the small TRAINED models (quality gates need trained weights): seconds each
TRAIN_SMALL = dict(
    n_layer=2,
    n_embd=64,
    n_head=4,
    max_positions=256,
    steps=150,
    batch_size=16,
    seq_len=64,
    lr=3e-3,
    warmup=15,
    threads=1,
    quiet=True,
)


def spec(name: str, family: str = "gpt", **over) -> ModelSpec:
    inner = {"n_inner": LLAMA_INNER} if family == "llama" else {}
    return ModelSpec.for_family(family, name, **{**DIMS, **inner, **over})


def model(name: str, family: str = "gpt", seed: int = 0, std: float = 0.1, **over) -> Transformer:
    """std 0.1: logits of a few units, so top-1 is decided by real margins, not by rounding noise."""
    return Transformer(spec(name, family, **over)).init_weights(seed, std=std).eval()


def case_ids(cases) -> list[str]:
    return [f"{family}-{name}" for family, name in cases]
