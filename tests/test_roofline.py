"""The roofline model (benchmarks/roofline.py) counts the kernels of a tiny U-Net step as a hand
count does, and accelerate removes kernels and memory-bound bytes.

The tiny U-Net (fp16, CFG model batch 2, 8x8 sample, 7 context tokens of width 32):
  conv_in 4->32; down 0: CrossAttnDownBlock2D(32) = 1 resnet + 1 transformer + a stride-2 conv;
  down 1: DownBlock2D(32->64) = 1 resnet (1x1 shortcut); mid: resnet, transformer, resnet (64);
  up 0: UpBlock2D(64) = 2 resnets on cat(h, skip) (128->64, 96->64: shortcuts) + upsampler;
  up 1: CrossAttnUpBlock2D(32) = 2 x (resnet on cat(h, skip) (96->32, 64->32: shortcuts) +
  transformer); conv_norm_out + SiLU, conv_out 32->4.
By hand:
  resnets           1 + 1 + 2 + 2 + 2 = 8
  transformers      1 + 1 (mid) + 2 = 4, one BasicTransformerBlock each
  convolutions      conv_in 1 + resnets 2 x 8 + shortcuts 5 + down/upsampler 2
                    + transformers' proj_in/proj_out (1x1 convs) 2 x 4 + conv_out 1 = 33
  GroupNorms        resnets 2 x 8 + transformers 4 + conv_norm_out 1 = 21
  attention         4 transformers x (self + cross) = 8, one fused kernel each
  LayerNorms        4 transformers x 3 = 12
  concatenations    4 skips + 2 in the sinusoidal time embedding + the pipeline's [x; x] = 7
  time embedding    arange, mul, div, exp, cast, mul, mul (by scale 1), sin, cos, 2 cat = 11
  SiLU (eager)      resnets 2 x 8 on features + 8 on the time embedding + 1 in the time MLP
                    + conv_act 1 = 26; accelerate fuses 2 per resnet and conv_act: 9 remain
  accelerate        -3 per resnet (2 SiLU, the time-embedding add) - conv_act 1
                    - DDIM's 6 elementwise ops + 1 denoise_step = 30 kernels fewer;
                    each transformer's GEGLU: GELU + product -> one geglu (-1 x 4), and
                    with its projection one linear_geglu (-1 x 4 more; FASTDIFF_GEGLU=split
                    keeps the projection's addmm and geglu);
                    each BasicTransformerBlock: residual add + norm2, residual add + norm3
                    -> two add_layer_norm (-2 x 4), its strided input copied once (as
                    eager's norm1 does inside its call: the model counts both);
                    the 8 resnets' time projections (8 SiLU + 8 addmm) -> one SiLU and one
                    matmul per projection width (32, 64): 3 kernels (-13);
                    the 5 shortcut convs and their residual adds -> a matmul accumulated
                    into conv2's output (-5);
                    q, k, v of each self-attention in one matmul (-2 x 4); k and v of each
                    cross-attention, made once per context tensor (the prompt's, the same in
                    every step), none in a step after the first (-2 x 4);
                    each transformer's output: its (B, HW, C) tokens copied to NCHW, the 1x1
                    proj_out conv and the residual add -> proj_out as a Linear on the tokens
                    and the add reading them through a permuted view (-1 x 4); its
                    input: the GroupNorm writes the tokens' (channels_last) layout, proj_in
                    runs as a Linear on them, and the block's copy of its strided input goes
                    (-1 x 4); the norm also writes x + proj_out's bias, and proj_out
                    accumulates into it in place: no residual add (-1 x 4);
                    the sinusoidal time embedding: arange, mul, div, exp (the frequencies,
                    made once), cast, 2 mul, sin, cos, 2 cat -> mul, sin, cos (-8);
                    each block's feed-forward output projection + residual add -> one
                    in-place addmm_ into the residual, whose bias add_layer_norm added (-1 x 4);
                    then each block's three LayerNorms inside the GEMMs after them
                    (layer_norm_linear) and its attention residual adds inside their output
                    projections (addmm, addmm_), for one add_ of the biases the stream owes
                    (-2 x 4; FASTDIFF_NORM_FOLD=off keeps the add_layer_norms)
  attention output  SDPA writes (B, L, H, D) (flash, as CUDA runs it), so the processor's
                    transpose back to (B, L, H*D) is a view; fastdiff.attention's output is
                    contiguous (B, H, L, D): one copy each (+8), with attention="fastdiff"
"""
import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
if not os.path.isfile(os.path.join(BENCHMARKS, "roofline.py")):   # tests copied beside a wheel
    pytest.skip("the roofline model lives in the source tree's benchmarks/",
                allow_module_level=True)
sys.path.insert(0, BENCHMARKS)
import roofline  # noqa: E402

SPEC = {"resolution": 8, "down": 1, "guided": True, "context": (7, 32), "scheduler": "sd15"}


def _tiny_unet():
    """The hand-counted U-Net of the module docstring, on the meta device."""
    import diffusers

    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).to(torch.float16).eval()


@pytest.fixture(scope="module")
def steps():
    """The hand-counted steps, accelerate with FASTDIFF_CONV_FOLD=off (what the GroupNorm fold
    into norm_conv2d changes on top: test_conv_fold_counts)."""
    before = os.environ.get("FASTDIFF_CONV_FOLD")
    os.environ["FASTDIFF_CONV_FOLD"] = "off"
    try:
        return roofline.record(_tiny_unet(), SPEC, batch=2, dtype=torch.float16,
                               attention="fastdiff")
    finally:
        if before is None:
            del os.environ["FASTDIFF_CONV_FOLD"]
        else:
            os.environ["FASTDIFF_CONV_FOLD"] = before


def count(kernels, op, where=None):
    return sum(k.op == op and (where is None or k.where == where) for k in kernels)


def test_hand_count_of_the_stock_step(steps):
    ks = steps["diffusers"]
    assert count(ks, "aten.convolution") == 33
    assert count(ks, "aten.native_group_norm") == 21
    assert count(ks, "sdpa") == 8
    assert count(ks, "aten.native_layer_norm") == 12
    assert count(ks, "aten.cat") == 7
    assert count(ks, "aten.silu") == 26
    assert count(ks, "aten.upsample_nearest2d") == 1
    # SDPA stays one kernel: nothing of its math decomposition is recorded
    ops = {k.op for k in ks}
    assert not ops & {"aten.bmm", "aten.baddbmm", "aten._softmax", "aten._safe_softmax"}
    # views, reshapes, expands and detach launch nothing
    assert not ops & {"aten.view", "aten._unsafe_view", "aten.expand", "aten.t",
                      "aten.transpose", "aten.permute", "aten.unsqueeze", "aten.detach",
                      "aten.split", "aten.slice"}
    # the guidance combine u + s (c - u) and DDIM's step (eta 0) as eager elementwise ops
    assert [k.op for k in ks if k.where == "CFG combine"] == ["aten.sub", "aten.mul", "aten.add"]
    assert [k.op for k in ks if k.where == "scheduler step"] == [
        "aten.mul", "aten.sub", "aten.div", "aten.mul", "aten.mul", "aten.add"]


def test_flops_and_bytes_of_single_kernels(steps):
    ks = steps["diffusers"]
    conv_in = next(k for k in ks if k.op == "aten.convolution")
    # 2 x 32 x 8 x 8 outputs, each 4 channels x 3 x 3 multiply-adds, 2 FLOPs each
    assert conv_in.flops == 2 * (2 * 32 * 8 * 8) * (4 * 3 * 3)
    # reads x (2x4x8x8), weight (32x4x3x3), bias (32); writes 2x32x8x8; fp16
    assert conv_in.bytes == 2 * (2 * 4 * 64 + 32 * 4 * 9 + 32 + 2 * 32 * 64)
    gn = next(k for k in ks if k.op == "aten.native_group_norm")
    # first resnet's norm1 on 2x32x8x8, 8 groups: x read, weight+bias read, y written,
    # mean and rstd (2x8 each) written; fp16
    assert gn.bytes == 2 * (2 * 32 * 64 + 2 * 32 + 2 * 32 * 64 + 2 * 2 * 8)
    assert gn.flops == 2 * 32 * 64 + 2 * 2 * 8              # ~1 per output element
    self_attn = next(k for k in ks if k.op == "sdpa")
    # level 0 self-attention: B 2, 8 heads of dim 4, 64 queries and keys: 4 B H Lq Lk D
    assert self_attn.flops == 4 * 2 * 8 * 64 * 64 * 4
    assert self_attn.bytes == 4 * (2 * 8 * 64 * 4) * 2      # q, k, v read, out written
    cross = [k for k in ks if k.op == "sdpa"][1]
    assert cross.flops == 4 * 2 * 8 * 64 * 7 * 4
    mm = next(k for k in ks if k.op == "aten.mm")           # to_q: (2*64, 32) @ (32, 32)
    assert mm.flops == 2 * 128 * 32 * 32
    residual = next(k for k in ks if k.op == "aten.add" and k.where == "ResnetBlock2D"
                    and "->" not in k.shape)
    assert residual.flops == 2 * 32 * 64 and residual.bytes == 3 * 2 * (2 * 32 * 64)


def test_accelerate_fuses_norms_attention_and_the_step(steps):
    d, a, e = steps["diffusers"], steps["accelerate"], steps["engine"]
    # resnets 16 + conv_norm_out; the transformers' norms write channels_last tokens and
    # x + proj_out's bias, into which proj_out accumulates (no residual add)
    assert count(a, "fastdiff.group_norm_silu") == 17
    assert count(a, "fastdiff.group_norm_silu_residual", "Transformer2DModel") == 4
    assert count(a, "aten.native_group_norm") == 0
    assert count(d, "aten.add", "Transformer2DModel") == 4
    assert count(a, "aten.add", "Transformer2DModel") == 0
    assert count(a, "aten.baddbmm_", "Transformer2DModel") == 4
    assert count(a, "fastdiff.attention") == 8 and count(a, "sdpa") == 0
    # the time projections: one SiLU of temb, one batched matmul per width; the time MLP's
    # SiLU stays
    assert count(a, "aten.silu") == 2
    assert count(a, "aten.bmm", "ResnetBlock2D") == 2
    assert count(a, "aten.addmm", "ResnetBlock2D") == 0
    # the 5 1x1 shortcuts accumulate into conv2's output: no conv, no add
    # ... and the transformers' proj_in and proj_out run as Linears on the tokens (no copies)
    assert count(a, "aten.convolution") == 33 - 5 - 4 - 4
    assert count(d, "aten.clone", "Transformer2DModel") == 4
    assert count(a, "aten.clone", "Transformer2DModel") == 0
    assert count(a, "aten.baddbmm_", "ResnetBlock2D") == 5
    assert count(d, "aten.add", "ResnetBlock2D") == 8 + 8      # residuals, time embeddings
    assert count(a, "aten.add", "ResnetBlock2D") == 8 - 5
    # per BasicTransformerBlock, each LayerNorm inside the GEMM after it (layer_norm_linear):
    # the self-attention's q, k, v in one; the cross-attention's q (k and v of the context
    # were made in the first step); GEGLU's projection with the GELU and product in its
    # epilogue. The self-attention's output projection is an addmm with the block's input as
    # C, the cross-attention's and the feed-forward's accumulate into that stream (addmm_),
    # and one add_ puts the three projections' biases in at the end
    assert count(d, "aten.mm", "Attention") == 24
    assert count(a, "aten.mm") == 0
    assert count(d, "aten.gelu") == 4 and count(a, "aten.gelu") == 0
    assert count(d, "aten.addmm", "GEGLU") == 4 and count(a, "aten.addmm", "GEGLU") == 0
    assert count(a, "fastdiff.layer_norm_linear", "BasicTransformerBlock") == 3 * 4
    assert not {"fastdiff.linear_geglu", "fastdiff.geglu", "fastdiff.add_layer_norm",
                "aten.native_layer_norm"} & {k.op for k in a}
    assert count(d, "aten.add", "BasicTransformerBlock") == 12
    assert count(a, "aten.add", "BasicTransformerBlock") == 0
    assert count(a, "aten.addmm", "BasicTransformerBlock") == 4
    assert count(a, "aten.addmm_", "BasicTransformerBlock") == 8
    assert count(a, "aten.add_", "BasicTransformerBlock") == 4
    qkv, q, ff = [k for k in a if k.op == "fastdiff.layer_norm_linear"][:3]
    # level 0, 2 x 64 tokens of 32 channels (fp16): x, the (96, 32) folded weight, the
    # (3, 96) float32 fold read, (2 x 64, 96) written; the GEMM's FLOPs
    assert qkv.flops == 2 * 128 * 96 * 32 and roofline.op_class(qkv.op) == "matmul"
    assert qkv.bytes == 2 * (128 * 32 + 96 * 32 + 128 * 96) + 4 * 3 * 96
    # the cross-attention's q reads the stream with the bias it owes (a float32 shift)
    assert q.bytes == 2 * (128 * 32 + 32 * 32 + 128 * 32) + 4 * (3 * 32 + 32)
    # GEGLU: (256, 32) weight, F = 128 written
    assert ff.flops == 2 * 128 * 256 * 32
    assert ff.bytes == 2 * (128 * 32 + 256 * 32 + 128 * 128) + 4 * (3 * 256 + 32)
    # the blocks' input: eager's, a (B, C, HW) view as (B, HW, C) after the conv proj_in, is
    # copied to contiguous by its norm1 inside the call (CUDA's layer_norm makes a strided
    # input contiguous; the model adds that copy); accelerate's transformer norm writes the
    # tokens' layout, so its blocks get contiguous tokens. What the blocks copy now is
    # fastdiff.attention's contiguous (B, H, L, D) output (their folded forward calls the
    # product itself: the copies below, counted in the block)
    assert count(d, "aten.clone", "BasicTransformerBlock") == 4
    assert count(a, "aten.clone", "BasicTransformerBlock") == 8
    assert [k.op for k in a if k.where == "scheduler step"] == ["fastdiff.denoise_step"]
    # 8 resnets: norm1, silu, temb add, norm2, silu become 2 ops (-3 each); conv_norm_out +
    # conv_act (-1); the 6-kernel scheduler step becomes one denoise_step (-5); divisions by a
    # factor of 1.0 go: 8 resnets' output_scale_factor, 8 attentions' rescale_output_factor;
    # 4 GEGLUs' GELU + product become one kernel; 4 blocks' 2 residual adds go into the norms,
    # and each block copies its strided input once, as eager's norm1 does; the op's attention
    # output is contiguous (B, H, L, D), so its transpose back to (B, L, H*D) is a copy where
    # SDPA's (B, L, H, D) output is a view (-8); the time projections (-13), the shortcuts
    # (-5), the stacked attention projections (-16), the GEGLU projections in linear_geglu
    # (-4), the transformers' output and input copies and residual adds (-4, -4, -4) and
    # the time embedding's frequencies and concatenations (-8), the feed-forwards' residual
    # adds (-4), the blocks' three LayerNorms folded into GEMMs and their two residual adds
    # into the projections, for one add of the biases (-2 x 4)
    assert len([k for k in d if k.where == "Timesteps"]) == 11
    assert [k.op for k in a if k.where == "Timesteps"] == ["aten.mul", "aten.sin", "aten.cos"]
    assert len(d) - len(a) == (8 * 3 + 1 + 6 - 1 + 8 + 8 + 4 + 8 - 8 + 13 + 5 + 16 + 4 + 4 + 4
                               + 4 + 8 + 4 + 2 * 4)
    assert count(d, "aten.clone", "Attention") == 0
    dev = roofline.ROOFLINES["H100"]
    mem = lambda ks: sum(k.bytes for k in ks if k.memory_bound(dev))  # noqa: E731
    assert mem(a) < mem(d)
    # engine: the guidance moves into denoise_step; input scaling, step-index gathers and the
    # state updates come in: index_select x2, cast, mul, cat, denoise_step, copy_, add_
    outside = [k.op for k in e if k.where == "engine"]
    assert outside == ["aten.index_select", "aten._to_copy", "aten.mul", "aten.index_select",
                       "aten.cat", "fastdiff.denoise_step", "aten.copy_", "aten.add_"]
    assert len(e) - len(a) == len(outside) - 5               # was: cat, 3 CFG ops, denoise_step
    assert mem(e) == pytest.approx(mem(a), rel=0.01)


def test_roofline_arithmetic():
    dev = {"copy_gbs": 1000.0, "matmul_tflops": 100.0}           # ridge 100 FLOP/B
    assert roofline.ridge(dev) == 100
    slow_copy = roofline.Kernel("aten.add", "x", "s", flops=1e6, bytes=1e8)
    assert slow_copy.memory_bound(dev) and slow_copy.floor_s(dev) == pytest.approx(1e-4)
    gemm = roofline.Kernel("aten.mm", "x", "s", flops=1e12, bytes=1e6)
    assert not gemm.memory_bound(dev) and gemm.floor_s(dev) == pytest.approx(1e-2)
    s = roofline.summary([slow_copy, gemm])
    assert s["kernels"] == 2 and s["memory_bound_mb"] == pytest.approx(100.0)
    assert s["top_memory_bound"][0]["share"] == pytest.approx(1.0)


def test_accelerate_on_cuda_keeps_sdpa():
    """By default the model records accelerate as it runs on CUDA (FASTDIFF_ATTENTION=auto:
    SDPA, whose output needs no copy): same kernels as with the op, less the 8 copies."""
    before = os.environ.get("FASTDIFF_ATTENTION")
    steps = roofline.record(_tiny_unet(), SPEC, batch=2, dtype=torch.float16)
    assert os.environ.get("FASTDIFF_ATTENTION") == before          # restored
    a = steps["accelerate"]
    assert count(a, "sdpa") == 8 and count(a, "fastdiff.attention") == 0
    assert count(a, "aten.clone", "Attention") == 0
    assert count(a, "aten.clone", "BasicTransformerBlock") == 0
    assert count(a, "fastdiff.layer_norm_linear") == 12


def test_norm_fold_off_keeps_add_layer_norm(steps, monkeypatch):
    """FASTDIFF_NORM_FOLD=off: per BasicTransformerBlock the adds before norm2 and norm3 go
    into add_layer_norm, norm1 (after proj_in) stays, q/k/v run as one matmul and the cross-
    attention's q as another, GEGLU as linear_geglu, and the feed-forward's output projection
    accumulates into the residual in place (its bias added by the add_layer_norm before it):
    2 kernels a block more than with the fold, and more memory-bound bytes."""
    monkeypatch.setenv("FASTDIFF_NORM_FOLD", "off")
    monkeypatch.setenv("FASTDIFF_CONV_FOLD", "off")
    off = roofline.record(_tiny_unet(), SPEC, batch=2, dtype=torch.float16,
                          attention="fastdiff")["accelerate"]
    a = steps["accelerate"]
    assert count(off, "fastdiff.layer_norm_linear") == 0
    assert count(off, "fastdiff.add_layer_norm") == 8
    assert count(off, "aten.native_layer_norm") == 4
    assert count(off, "aten.mm", "Attention") == 4 + 4
    assert count(off, "aten.add", "BasicTransformerBlock") == 0
    assert count(off, "aten.addmm_", "BasicTransformerBlock") == 4
    assert count(off, "aten.clone", "BasicTransformerBlock") == 0
    aln = next(k for k in off if k.op == "fastdiff.add_layer_norm")
    # level 0, 2 x 64 tokens of 32 channels: x, residual, weight, bias read; h, y written
    assert aln.where == "BasicTransformerBlock" and aln.bytes == 2 * (4 * 128 * 32 + 2 * 32)
    # GEGLU: the projection (addmm), GELU and the product become one linear_geglu, which reads
    # x (2 x 64 rows of 32), the (2F, 32) weight and the 2F bias and writes F (F = 4 x 32;
    # fp16), its FLOPs the projection's
    assert count(off, "fastdiff.linear_geglu") == 4 and count(off, "fastdiff.geglu") == 0
    lg = next(k for k in off if k.op == "fastdiff.linear_geglu")
    assert lg.where == "GEGLU" and lg.flops == 2 * 128 * 256 * 32
    assert lg.bytes == 2 * (128 * 32 + 256 * 32 + 256 + 128 * 128)
    assert roofline.op_class(lg.op) == "matmul"
    assert len(off) - len(a) == 2 * 4
    dev = roofline.ROOFLINES["H100"]
    mem = lambda ks: sum(k.bytes for k in ks if k.memory_bound(dev))  # noqa: E731
    assert mem(a) < mem(off)


def test_conv_fold_counts(steps, monkeypatch):
    """FASTDIFF_CONV_FOLD=auto (the default) against the hand count's accelerate (off): each of
    the 8 resnets' norm, conv, norm, conv and residual (an add, or the shortcut's baddbmm_)
    becomes statistics, norm_conv2d, statistics, norm_conv2d (-8); the 4 up-block skip
    concatenations are read in place (-4); the time projections are cast to float32 once per
    width (+2); each transformer's norm-with-residual, proj_in and proj_out become statistics,
    proj_in and proj_out (as many kernels, the normalized tokens and x + bias no longer
    written); each block's feed-forward output and its final bias add become one norm_conv2d
    (-4): 14 fewer. (The resnets an up block runs itself, on its skip, count in the block.)"""
    monkeypatch.delenv("FASTDIFF_CONV_FOLD", raising=False)
    on = roofline.record(_tiny_unet(), SPEC, batch=2, dtype=torch.float16,
                         attention="fastdiff")["accelerate"]
    off = steps["accelerate"]
    assert count(off, "aten.cat", "UpBlock2D") + count(off, "aten.cat", "CrossAttnUpBlock2D") == 4
    assert not [k for k in on if k.op == "aten.cat" and "UpBlock2D" in k.where]
    assert count(on, "fastdiff.norm_conv2d") == 8 * 2 + 4 * 2 + 4
    assert count(on, "fastdiff.group_norm_scale_shift") == 8 * 2 + 4
    assert count(on, "fastdiff.group_norm_silu") == 1                 # conv_norm_out
    assert count(on, "fastdiff.group_norm_silu_residual") == 0
    # conv_in, the downsampler's, the upsampler's and conv_out stay on torch
    assert count(on, "aten.convolution") == 4
    assert not {"aten.baddbmm_", "aten.add", "aten.add_"} & {
        k.op for k in on if k.where in ("ResnetBlock2D", "BasicTransformerBlock",
                                        "Transformer2DModel")}
    assert len(off) - len(on) == 8 + 4 - 2 + 4
    conv1 = next(k for k in on if k.op == "fastdiff.norm_conv2d")
    # the first resnet's conv1 (level 0): 2x32x8x8 in and out, 3x3; x, the (32, 9 x 32) packed
    # weight and the output in fp16; its bias (32), the float32 time projection (2 x 32) and
    # the norm's scale and shift (2 x 32 each) in float32
    assert roofline.op_class(conv1.op) == "conv" and conv1.where == "ResnetBlock2D"
    assert conv1.flops == 2 * (2 * 32 * 64) * (9 * 32)
    assert conv1.bytes == 2 * (2 * 2 * 32 * 64 + 32 * 9 * 32) + 4 * (32 + 3 * 2 * 32)
    dev = roofline.ROOFLINES["H100"]
    mem = lambda ks: sum(k.bytes for k in ks if k.memory_bound(dev))  # noqa: E731
    assert mem(on) < mem(off)


def test_geglu_split_keeps_the_projection_and_geglu(monkeypatch):
    """FASTDIFF_GEGLU=split (with the norm fold off): the projection's addmm, then geglu, which
    reads its output (2 x 64 rows of 2F) once and writes F, where eager's GELU and product read
    3F and write 2F."""
    monkeypatch.setenv("FASTDIFF_GEGLU", "split")
    monkeypatch.setenv("FASTDIFF_NORM_FOLD", "off")
    steps = roofline.record(_tiny_unet(), SPEC, batch=2, dtype=torch.float16)
    d, a = steps["diffusers"], steps["accelerate"]
    assert count(a, "fastdiff.geglu") == 4 and count(a, "fastdiff.linear_geglu") == 0
    assert count(a, "aten.addmm", "GEGLU") == 4
    geglu = next(k for k in a if k.op == "fastdiff.geglu")
    assert geglu.where == "GEGLU" and geglu.bytes == 2 * (128 * 256 + 128 * 128)
    eager = [k for k in d if k.where == "GEGLU" and k.op in ("aten.gelu", "aten.mul")][:2]
    assert sum(k.bytes for k in eager) == 2 * (2 * 128 * 128 + 3 * 128 * 128)
