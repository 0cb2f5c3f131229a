"""How the exporter writes qkvx's opaque attention ops (qkvx.decode.onnx_ops) as ONNX nodes:
onnxruntime's contrib MultiHeadAttention and RotaryEmbedding, and qkvx's own qkvx.CachedAttention
(qkvx.export.ortops). onnx has no schema for these ops, so each declares the inputs it uses."""

from __future__ import annotations

import torch


def _fused_attention_translation() -> dict:
    """qkvx::grouped_attention -> com.microsoft MultiHeadAttention (onnxruntime's fused kernel),
    num_heads = kv heads, key and value in the cache layout [B, G, S, D]: a K=V layer passes its
    ONE cache tensor as both. onnx has no schema for the contrib op; declare the inputs used."""
    import onnxscript
    from onnx.defs import OpSchema

    P, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MultiHeadAttention",
        "com.microsoft",
        1,
        inputs=[
            P("query", "T"),
            P("key", "T", param_option=optional),
            P("value", "T", param_option=optional),
            P("bias", "T", param_option=optional),
            P("key_padding_mask", "M", param_option=optional),
            P("attention_bias", "T", param_option=optional),
        ],
        outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
        ],
    )
    mha = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)

    def translate(query, key, value, bias, scale: float):
        return mha(query, key, value, None, None, bias, num_heads=key.shape[1], scale=scale)

    return {torch.ops.qkvx.grouped_attention.default: translate}


def attention_translations() -> dict:
    """qkvx::rotary_rows -> com.microsoft RotaryEmbedding (x [B, G, S, D] in the 4-D layout,
    position_ids [B, S], half tables [max_positions, D / 2]); qkvx::cached_attention[_kv] ->
    qkvx.CachedAttention (the custom op of qkvx.export.ortops), plus the MultiHeadAttention one."""
    import onnxscript
    from onnx.defs import OpSchema

    P, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    rotary_schema = OpSchema(
        "RotaryEmbedding",
        "com.microsoft",
        1,
        inputs=[P("input", "T"), P("position_ids", "M"), P("cos_cache", "T"), P("sin_cache", "T")],
        outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute("interleaved", OpSchema.AttrType.INT, "")],
    )
    rotary = onnxscript.values.Op(
        onnxscript.values.Opset("com.microsoft", 1), "RotaryEmbedding", rotary_schema
    )

    def cached_schema(outputs: int) -> OpSchema:
        from qkvx.export.ortops import DOMAIN, OP

        return OpSchema(
            OP,
            DOMAIN,
            1,
            inputs=[
                P("query", "T"),
                P("past_key", "T"),
                P("key", "T"),
                P("past_value", "T", param_option=optional),
                P("value", "T", param_option=optional),
                P("attention_mask", "M"),
                P("cos_cache", "T", param_option=optional),
                P("sin_cache", "T", param_option=optional),
            ],
            outputs=[P("output", "T"), P("present_key", "T")]
            + ([P("present_value", "T")] if outputs == 3 else []),
            type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int64)"], "")],
            attributes=[
                OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
            ],
        )

    from qkvx.export.ortops import DOMAIN, OP

    opset = onnxscript.values.Opset(DOMAIN, 1)
    cached_kv, cached = (onnxscript.values.Op(opset, OP, cached_schema(n)) for n in (2, 3))

    def translate_rotary(x, positions, cos, sin):
        # Each kv head's rows as one sequence ([B * G, S, D], one head): onnxruntime's CPU kernel walks
        # (batch, position, head) with the head innermost, which on the [B, G, S, D] layout would jump
        # between G places of the cache at every row (several times slower at long contexts than
        # rows in order).
        from onnxscript import opset18 as op

        shape = op.Shape(x)
        B, G, S, D = (op.Slice(shape, [i], [i + 1]) for i in range(4))
        rows = op.Reshape(x, op.Concat(op.Mul(B, G), S, D, axis=0))
        pos = op.Reshape(
            op.Expand(op.Unsqueeze(positions, [1]), op.Concat(B, G, S, axis=0)),
            op.Concat(op.Mul(B, G), S, axis=0),
        )
        return op.Reshape(rotary(rows, pos, cos, sin, interleaved=0), shape)

    def translate_cached_kv(query, past, key, attention_mask, cos, sin, num_heads: int, scale: float):
        return cached_kv(
            query,
            past,
            key,
            None,
            None,
            attention_mask,
            cos,
            sin,
            num_heads=num_heads,
            kv_num_heads=past.shape[1],
            scale=scale,
        )

    def translate_cached(
        query, past_key, key, past_value, value, attention_mask, num_heads: int, scale: float
    ):
        return cached(
            query,
            past_key,
            key,
            past_value,
            value,
            attention_mask,
            num_heads=num_heads,
            kv_num_heads=past_key.shape[1],
            scale=scale,
        )

    return {
        **_fused_attention_translation(),
        torch.ops.qkvx.rotary_rows.default: translate_rotary,
        torch.ops.qkvx.cached_attention_kv.default: translate_cached_kv,
        torch.ops.qkvx.cached_attention.default: translate_cached,
    }
