"""A tiny decode module using qkvx::update_cache(_int8) + qkvx::attend, exported to a .pte
(torch.export -> to_edge_transform_and_lower with XNNPACK -> to_executorch with reinplacing) and
run for several steps in executorch.runtime.Runtime, against a float64 torch reference that keeps
its own cache in plain tensors."""

import pytest
import torch
from torch import nn

from qkvx.models.attention import Rope
from qkvx.quant.kv import quantize_int8

C, H, G, D, S = 32, 4, 2, 16, 24


class TinyDecode(nn.Module):
    """forward(x [1, T, C], input_pos int64 [1]) -> attention output [1, T, H * D]; one cache
    buffer [1, G, S, D] (K=V) or key + value buffers, int8 with scale buffers beside them."""

    def __init__(self, kv_dtype=torch.float32, rope=False, shared=True, heads=H, kv_heads=G, head_dim=D):
        super().__init__()
        torch.manual_seed(0)
        self.H, self.G, self.D = H, G, D = heads, kv_heads, head_dim
        self.q_proj, self.k_proj = nn.Linear(C, H * D), nn.Linear(C, G * D)
        self.v_proj = None if shared else nn.Linear(C, G * D)
        self.int8, self.kv_dtype = kv_dtype == torch.int8, kv_dtype
        for name in ["kv"] if shared else ["k", "v"]:
            self.register_buffer(name, torch.zeros(1, G, S, D, dtype=kv_dtype), persistent=False)
            if self.int8:
                self.register_buffer(f"{name}_scale", torch.zeros(1, G, S, 1), persistent=False)
        self.rope = Rope(D, S, 10000.0) if rope else None
        self.shared = shared

    def write(self, x, name, start):
        if self.int8:
            torch.ops.qkvx.update_cache_int8(x, getattr(self, name), getattr(self, f"{name}_scale"), start)
        else:
            torch.ops.qkvx.update_cache(x, getattr(self, name), start)

    def forward(self, x, input_pos):
        T, H, G, D = x.shape[1], self.H, self.G, self.D
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + T <= S)
        q = self.q_proj(x).view(1, T, H, D)
        k = self.k_proj(x).view(1, T, G, D)
        if self.rope is not None:
            q = self.rope(q, torch.arange(T) + input_pos)
        names = ["kv"] if self.shared else ["k", "v"]
        self.write(k, names[0], start)
        if not self.shared:
            self.write(self.v_proj(x).view(1, T, G, D), "v", start)
        k_cache = getattr(self, names[0])
        v_cache = None if self.shared else self.v
        ks = getattr(self, f"{names[0]}_scale") if self.int8 else None
        vs = self.v_scale if self.int8 and not self.shared else None
        cos, sin = (self.rope.cos, self.rope.sin) if self.rope is not None else (None, None)
        y = torch.ops.qkvx.attend(q, k_cache, v_cache, ks, vs, cos, sin, start)
        return y.reshape(1, T, H * D)


def reference_steps(m: TinyDecode, xs, positions, reference):
    """The same computation in float64 plain torch, with its own cache: projections in fp32 (as
    the module), cache rows stored / quantized by torch, attention by the conftest reference."""
    H, G, D = m.H, m.G, m.D
    kv = {n: torch.zeros(1, G, S, D) for n in (["kv"] if m.shared else ["k", "v"])}
    scales = {n: torch.zeros(1, G, S, 1) for n in kv}
    outs = []
    with torch.no_grad():
        for x, p in zip(xs, positions, strict=False):
            T = x.shape[1]
            q = m.q_proj(x).view(1, T, H, D)
            if m.rope is not None:
                q = m.rope(q, torch.arange(T) + p)
            new = {"kv" if m.shared else "k": m.k_proj(x).view(1, T, G, D)}
            if not m.shared:
                new["v"] = m.v_proj(x).view(1, T, G, D)
            for n, val in new.items():
                if m.int8:
                    qv, s = quantize_int8(val)
                    kv[n][0, :, p : p + T] = qv[0].transpose(0, 1).float()
                    scales[n][0, :, p : p + T] = s[0].transpose(0, 1)
                else:  # stored in the cache dtype (fp16: torch's rounding)
                    kv[n][0, :, p : p + T] = val[0].transpose(0, 1).to(m.kv_dtype).float()
            first = "kv" if m.shared else "k"
            cos, sin = (m.rope.cos, m.rope.sin) if m.rope is not None else (None, None)
            y = reference(
                q,
                kv[first],
                None if m.shared else kv["v"],
                scales[first] if m.int8 else None,
                scales["v"] if m.int8 and not m.shared else None,
                cos,
                sin,
                p,
            )
            outs.append(y.reshape(1, T, H * D))
    return outs


def export_pte(m: TinyDecode, path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from torch.export import Dim

    example = (torch.zeros(1, 2, C), torch.tensor([0], dtype=torch.long))
    with torch.no_grad():
        ep = torch.export.export(
            m, example, dynamic_shapes=({1: Dim("seq", min=1, max=4)}, None), strict=False
        )
    edge = to_edge_transform_and_lower(
        ep, partitioner=[XnnpackPartitioner()], compile_config=EdgeCompileConfig(_check_ir_validity=False)
    )
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            run_reinplace_pass=True,
            emit_mutable_buffer_names=True,
        )
    )
    path.write_bytes(program.buffer)
    return program.buffer


VARIANTS = {
    "fp32_kv_shared": dict(),
    "fp32_kv_shared_rope": dict(rope=True),
    "fp32_k_v": dict(shared=False),
    "fp16_kv_shared_rope": dict(kv_dtype=torch.float16, rope=True),
    "int8_kv_shared_rope": dict(kv_dtype=torch.int8, rope=True),
    "int8_k_v": dict(kv_dtype=torch.int8, shared=False),
    # one query row per kv head at head size 64: the kernels' direct path, kv heads in twos
    "fp32_kv_shared_rope_mha64": dict(rope=True, heads=2, kv_heads=2, head_dim=64),
    "fp16_kv_shared_mha64": dict(kv_dtype=torch.float16, heads=2, kv_heads=2, head_dim=64),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_pte_decodes_like_the_reference_and_mutates_the_cache_in_place(kernels, reference, variant, tmp_path):
    from executorch.runtime import Runtime

    from qkvx.export.executorch import read_plan

    m = TinyDecode(**VARIANTS[variant]).eval()
    pte = export_pte(m, tmp_path / "tiny.pte")
    plan = read_plan(pte)
    assert {"qkvx::update_cache_int8" if m.int8 else "qkvx::update_cache", "qkvx::attend"} <= set(
        plan.operators
    )
    assert "aten::copy_" not in plan.operators, plan.operators  # no copy-back into the cache
    buffers = ["kv"] if m.shared else ["k", "v"]
    want_buffers = buffers + ([f"{b}_scale" for b in buffers] if m.int8 else [])
    assert sorted(plan.cache_buffers) == sorted(want_buffers)

    method = Runtime.get().load_program(tmp_path / "tiny.pte").load_method("forward")
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 1, 1, 4, 1, 1]  # a prefill chunk, decode steps, another chunk, decode
    positions = [sum(lengths[:i]) for i in range(len(lengths))]
    xs = [torch.randn(1, T, C, generator=gen) for T in lengths]
    want = reference_steps(m, xs, positions, reference)
    for x, p, w in zip(xs, positions, want, strict=False):
        got = method.execute([x, torch.tensor([p], dtype=torch.long)])[0]
        # every step attends over rows written by earlier calls: only an in-place cache matches
        torch.testing.assert_close(got.double(), w, atol=1e-4, rtol=1e-4)
    # eager (CPU kernels via ctypes) on the same steps
    with torch.no_grad():
        for x, p, w in zip(xs, positions, want, strict=False):
            torch.testing.assert_close(m(x, torch.tensor([p])).double(), w, atol=1e-4, rtol=1e-4)


def test_pte_rejects_a_position_past_the_cache_without_crashing(kernels, tmp_path):
    from executorch.runtime import Runtime

    m = TinyDecode().eval()
    export_pte(m, tmp_path / "tiny.pte")
    method = Runtime.get().load_program(tmp_path / "tiny.pte").load_method("forward")
    with pytest.raises(RuntimeError):
        method.execute([torch.randn(1, 2, C), torch.tensor([S - 1], dtype=torch.long)])
    # the method still works afterwards
    out = method.execute([torch.randn(1, 1, C), torch.tensor([0], dtype=torch.long)])[0]
    assert out.shape == (1, 1, H * D) and torch.isfinite(out).all()
