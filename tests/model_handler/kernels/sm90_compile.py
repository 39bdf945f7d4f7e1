"""Compiles every Triton kernel to an sm_90 cubin without a GPU (ptxas ships in the triton wheel).

Catches what the interpreter lets through (non-constexpr globals, dot shapes, layouts) and reports register
spills. Run as a script with TRITON_INTERPRET unset: `python tests/model_handler/kernels/sm90_compile.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from model_handler.kernels import triton_attention as ta
from model_handler.kernels import triton_gemv as tg
from model_handler.kernels import triton_kv_store as ts

TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(fn, dtype: torch.dtype, constexprs: dict) -> str:
    """Like a JIT launch on aligned tensors: pointers and strides (but the block-table stride) divisible by 16."""
    constexprs = dict(constexprs)
    options = {"num_warps": constexprs.pop("num_warps", 4), "num_stages": constexprs.pop("num_stages", 2)}
    name = TYPE_NAMES[dtype]
    fp32_ptrs = ("part_acc_ptr", "part_ml_ptr")
    int_ptrs = {"block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "slot_ptr": "*i64"}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in int_ptrs:
            signature[arg] = int_ptrs[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in fp32_ptrs else f"*{name}"
        else:
            signature[arg] = "fp32" if arg.startswith(("scale", "cap_")) else "i32"
    aligned = [
        i
        for i, arg in enumerate(fn.arg_names)
        if signature[arg].startswith("*") or (arg.startswith("stride") and arg != "stride_bt")
    ]
    src = ASTSource(
        fn=fn, signature=signature, constexprs=constexprs, attrs={(i,): [["tt.divisibility", 16]] for i in aligned}
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    usage = ""
    if os.path.exists(CUOBJDUMP):
        path = f"/tmp/sm90_{os.getpid()}.cubin"
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        dump = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True).stdout
        os.unlink(path)
        usage = " ".join(w for line in dump.splitlines() if "REG:" in line for w in line.split()[:2])
    return usage


def attention_cases():
    """(dtype, head_dim, num_heads, num_kv_heads, sliding window, soft-cap): Llama-3-8B, the tiny model, MHA, wide
    heads, fp32; Gemma-2-9B's two layer kinds (a window and soft-capping, soft-capping alone)."""
    yield torch.bfloat16, 128, 32, 8, False, False
    yield torch.float16, 128, 32, 8, False, False
    yield torch.bfloat16, 64, 4, 4, False, False
    yield torch.bfloat16, 256, 8, 4, False, False
    yield torch.float32, 64, 8, 2, False, False
    yield torch.bfloat16, 256, 16, 8, True, True
    yield torch.bfloat16, 256, 16, 8, False, True


def main() -> int:
    for dtype, head_dim, num_heads, num_kv_heads, window, softcap in attention_cases():
        cfg = ta.tile_config(head_dim, dtype, on_gpu=True)
        tag = f"{TYPE_NAMES[dtype]} D={head_dim} group={num_heads // num_kv_heads} window={window} softcap={softcap}"
        for splits in (16, 1):
            consts = ta.launch_constexprs(
                num_heads, num_kv_heads, head_dim, 16, splits, cfg, on_gpu=True, has_window=window, softcap=softcap
            )
            print(f"decode splits={splits} {tag}: {compile_kernel(ta._decode_kernel, dtype, consts['decode'])}")
        print(f"merge {tag}: {compile_kernel(ta._merge_splits_kernel, dtype, consts['merge'])}")
        print(f"prefill {tag}: {compile_kernel(ta._prefill_kernel, dtype, consts['prefill'])}")
    consts = dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_H=8, BLOCK_D=128)
    print(f"store_kv: {compile_kernel(ts._store_kv_kernel, torch.bfloat16, consts)}")
    for config in tg.CONFIGS:
        consts = dict(
            HAS_BIAS=False,
            EVEN_K=True,
            STRIDED_GRID=config.programs_per_sm > 0,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        print(f"gemv {config}: {compile_kernel(tg._gemv_kernel, torch.bfloat16, consts)}")
    print("all kernels compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
