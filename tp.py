"""
Tensor parallelism: N processes, each holding 1/N of every Linear of the blocks, run every step together; after the
two Linears that produce partial sums, torch.distributed adds them up. gpt-fast's tp.py pattern (weight slices on
plain nn.Linear, then functional all-reduces), so the model code stays phi.py's and `--compile` traces it as it is.

    torchrun --nproc_per_node 2 generate.py --model microsoft/phi-2 --tp --prompt "def print_prime(n):"

Per block, with N ranks (rank r):
- column-wise (a rank computes some of the output features): q, k and v, by whole heads (query heads
  [r H/N, (r+1) H/N), KV heads [r KV/N, (r+1) KV/N): GQA keeps its grouping within a rank), split per part where the
  checkpoint fuses them (Phi-3's qkv_proj; Phi-3-small's head-major groups are contiguous already); the MLP's
  up/gate (fc1; Phi-3's gate_up_proj per half; Phi-3-small's interleaved up_proj by whole pairs);
- row-wise (a rank reads its share of the input features and produces a partial sum): the attention's output
  projection and the MLP's down projection (fc2), each followed by one all-reduce (sum) of its module's output; a
  bias is added by rank 0 only;
- phimoe: every expert is split like the dense MLP (each rank holds 1/N of all 16 experts; the router is
  replicated, so every rank routes every token alike) and the mixture's output is all-reduced once. Whole experts per
  rank would leave ranks idle whenever the chosen experts sit on one rank, and need tokens sent between ranks;
- replicated: the embedding and lm_head (the vocabulary: a sharded lm_head would need its logits gathered at every
  step), norms, rotary, the router.
Each rank reads only its own slices from the safetensors files (safe_open's get_slice), so its memory holds 1/N of
the blocks' Linears plus the replicated parts. The KV cache holds the rank's KV heads only.
"""

import dataclasses
import os
import re

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

import phi

COLUMN = re.compile(r"\.(attn\.qkv|mlp\.fc1|mlp\.experts\.\d+\.fc1)\.(weight|bias)$")
ROW = re.compile(r"\.(attn\.out|mlp\.fc2|mlp\.experts\.\d+\.fc2)\.(weight|bias)$")


def init() -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU); the device this rank runs on. Every rank gets
    the same random seed (sampling must pick the same tokens everywhere)."""
    if "RANK" not in os.environ:
        raise ValueError("--tp runs under torchrun: torchrun --nproc_per_node N generate.py ... --tp")
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    seed = torch.randint(2**62, (1,), device=device)
    dist.broadcast(seed, 0)
    torch.manual_seed(int(seed))
    return device


def rank_config(cfg: phi.PhiConfig, world: int) -> phi.PhiConfig:
    """The config one rank builds: its share of the heads and of the MLP's width (one clear error if they do not
    divide)."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(cfg, name) % world:
            raise ValueError(
                f"tensor parallelism over {world} ranks: {name} = {getattr(cfg, name)} is not divisible by {world} "
                "(each rank holds whole heads and an equal share of the MLP)"
            )
    H, KV, inter = cfg.num_attention_heads // world, cfg.num_key_value_heads // world, cfg.intermediate_size // world
    return dataclasses.replace(cfg, num_attention_heads=H, num_key_value_heads=KV, intermediate_size=inter)


def load(path, dtype=torch.float32, device="cpu", attn="sdpa") -> phi.Phi:
    """This rank's shard of the causal LM at path (a Hugging Face directory), inside an initialized process group."""
    if not dist.is_initialized():
        raise ValueError("tp.load needs an initialized process group (torchrun, then tp.init())")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = phi.PhiConfig.from_hf(phi._read_json(path / "config.json"), str(path / "config.json"))
    with torch.device("meta"):
        model = phi.Phi(rank_config(cfg, world))
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    model.load_hf_weights(path, copy=lambda ckpt, our, srcs, dest: copy_slice(ckpt, our, srcs, dest, cfg))
    for block in model.layers:
        for module in (block.attn, block.mlp):  # their outputs are partial sums: add them up on every rank
            module.register_forward_hook(lambda _m, _inputs, out: funcol.all_reduce(out, "sum", dist.group.WORLD))
        block.attn.head_offset = rank * block.attn.n_head  # Phi-3-small's block-sparse pattern is per head:
        if not cfg.blocksparse_homo_head_pattern:  # the model's head index and step, not the rank's
            block.attn.block = (*block.attn.block[:3], max(1, cfg.blocksparse_vert_stride // cfg.num_attention_heads))
    return model.eval().set_attention(attn)


@torch.no_grad()
def copy_slice(ckpt: phi.Checkpoint, our, srcs, dest, cfg) -> bool:
    """Read this rank's slice of a sharded tensor into dest (False: a replicated one, read whole by the caller)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if COLUMN.search(our):  # each part of the fused tensor gives this rank its share of rows, in order
        pieces = []
        for name, first, n in column_parts(ckpt, our, srcs, cfg):
            share = n // world
            pieces.append(ckpt.read(name, first + rank * share, first + (rank + 1) * share))
        dest.copy_(torch.cat(pieces).reshape(dest.shape))
    elif ROW.search(our) and our.endswith(".bias"):  # added once, after the sum
        dest.copy_(ckpt.read(srcs[0], 0, dest.shape[0])) if rank == 0 else dest.zero_()
    elif ROW.search(our):
        cols = dest.shape[1]
        dest.copy_(ckpt.read(srcs[0], 0, dest.shape[0], slice(rank * cols, (rank + 1) * cols)))
    else:
        return False
    return True


def column_parts(ckpt, our, srcs, cfg) -> list:
    """(checkpoint name, first row, rows) of each part a column-wise tensor is made of, in the whole model: q, k, v
    (apart or fused) and gate, up (fused in Phi-3's gate_up_proj). A rank takes the same share of each."""
    if len(srcs) > 1:  # stored apart (phi's q, k, v; phimoe's w1, w3)
        return [(s, 0, ckpt.shapes[s][0]) for s in srcs]
    name, rows, hd = srcs[0], ckpt.shapes[srcs[0]][0], cfg.head_dim
    if cfg.small:  # head-major groups (KV heads with their queries) and gate/linear pairs: contiguous per rank
        sizes = [rows]
    elif ".attn.qkv." in our:
        sizes = [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd]
    else:
        sizes = [rows // 2, rows // 2] if cfg.glu else [rows]
    firsts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(name, first, n) for first, n in zip(firsts, sizes)]
