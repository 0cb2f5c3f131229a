"""`qkvx convert`: build a K=V student (Q-K=V, Q-GQA-g, Q-MQA) from a trained model with separate key
and value projections (QKV, GQA-g, MQA, Q=K-V), by weight surgery.

Everything but the key and value projections is copied. The one shared projection (weights and
bias) comes from an init:

  avg      (W_K + W_V) / 2            the paper's release ("average the two")
  keep-k   W_K                        attention patterns exact, values wrong
  keep-v   W_V                        values exact, attention patterns wrong
  fit      data-aware (qkvx.convert.fit): per layer, the student's attention block (query, shared
           and output projections) fitted to reproduce the teacher's attention-block outputs on
           the teacher's own layer inputs, from a few calibration batches

Fewer kv heads than the source (Q-GQA-g, Q-MQA) mean-pool the source's kv heads in groups, as GQA
uptraining does (Ainslie et al. 2023): target head j is the mean of source heads j*r .. j*r + r - 1,
r = source kv heads / target kv heads, so query head h still reads the pooled group it read before.
With RoPE nothing changes in the weights: the model stores the un-rotated shared tensor and rotates
it only where it serves as a key (qkvx.models.attention).

The package: surgery.py (the target spec, head pooling, the paper inits), fit.py (the data-aware
init), run.py (`convert`: read, build, write).

The result is a native qkvx folder (model.safetensors + qkvx.json) whose qkvx.json records the
conversion under "conversion": source path / format / sha256 / variant, target, init, and for `fit`
the calibration data and the per-layer objective before and after fitting on held-out batches.
"""

from qkvx.convert.run import ConvertResult, convert
from qkvx.convert.surgery import DATA_INITS, INITS, PAPER_INITS, pool_heads, surgery, target_spec

__all__ = [
    "DATA_INITS",
    "INITS",
    "PAPER_INITS",
    "ConvertResult",
    "convert",
    "pool_heads",
    "surgery",
    "target_spec",
]
