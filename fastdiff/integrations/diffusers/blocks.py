"""diffusers' U-Net blocks on fastdiff's fused ops (installed by ``accelerate``).

Every ``ResnetBlock2D`` runs its two GroupNorm+SiLU pairs on ``group_norm_silu`` (the time
embedding enters as the op's ``pre_bias`` in 'default' mode, as ``scale``/``shift`` in
'scale_shift' mode), a model's ``conv_norm_out`` + ``conv_act`` become one call, and every
``Attention`` whose processor is diffusers' default gets ``FastdiffAttnProcessor`` (or, after
``fuse_qkv_projections``, ``FastdiffFusedAttnProcessor``); every ``GEGLU`` (the feed-forward of
a transformer block) runs its projection, then ``geglu``: the split, GELU and product in one
pass; and every LayerNorm ``BasicTransformerBlock`` adds each residual and takes the LayerNorm
after it (norm2, norm3) in one ``add_layer_norm``. This works on any model made of these
blocks: U-Nets, ControlNets, the VAE's encoder and decoder. Only forwards and processors are
swapped: parameters, buffers and state_dict keys are untouched. A swapped forward is a
``Patched`` object holding its module (not a closure), so a deep copy or a pickle of the model
carries forwards bound to the copy. The fused ops have autograd formulas (fastdiff/ops.py), so
training, LoRA and gradient checkpointing run on them too.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from fastdiff import ops
from fastdiff.integrations.diffusers import derived
from fastdiff.integrations.diffusers.derived import Derived, usable
from fastdiff.ops import log_once

MAX_HEAD_DIM = 256
# What patch_modules counts, per component (accelerate's report).
COUNTS = ("resnets", "attention", "norm_out", "geglu", "transformer_blocks", "transformers",
          "timesteps", "up_blocks")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Patched:
    """An attribute of ``module`` (its ``forward``, a hook) replaced by a call of
    ``fn(module, *extra, ...)``. A plain object holding its module: deep copies and pickles of the
    model get one bound to their own module (a bound method or closure would keep the original)."""

    def __init__(self, module, fn, *extra):
        self.module, self.fn, self.extra = module, fn, extra

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *self.extra, *args, **kwargs)


_PATCHED = Patched(None, None)      # (what _hooked reads for a module without a forward of its own)


def _gn_args(norm: nn.GroupNorm):
    return norm.num_groups, norm.weight, norm.bias, norm.eps


# ---------------------------------------------------------------- ResnetBlock2D

def _on(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """The weights a fused path reads directly are on x's device (not offloaded: a layer's
    forward hooks, which would bring them, do not run on these paths)."""
    return all(w.device == x.device for w in weights)


def _plain_conv(c) -> bool:
    return type(c) is nn.Conv2d and c.padding_mode == "zeros"


class TembBank:
    """Every patched ResnetBlock2D's time-embedding projection in one model, as one batched
    matmul per projection shape instead of a SiLU and a matmul in each block.

    Every block of a U-Net gets the same ``temb`` tensor in a forward; the first block to ask
    for its projection computes them all (``F.silu(temb)`` once, then ``silu @ W`` for each
    group of same-shaped projections stacked as (G, K, N): SD1.5's 22 blocks make 3 groups) and
    later blocks take their slice. The projections' biases are not added there: a 'default'
    block adds the projection to conv1's output before its norm, so the bias joins conv1's
    (``bias``). SD1.5: 44 kernels per step become 4. Blocks this cannot take (scale_shift
    time norms, LoRA-wrapped layers, autograd recording through the weights) run their own."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.resnets: list = []
        self._temb = None
        self._version = -1
        self._out: dict = {}
        self._groups: dict = {}
        self._where: dict = {}
        self._out32: dict = {}
        self._stacks: dict = {}
        self._biases: dict = {}
        self.convs: dict = {}            # (block, name) -> Derived: _resnet_fold's packed weights

    def __getstate__(self):          # (copies compute their own)
        return {"root": self.root, "resnets": self.resnets}

    def __setstate__(self, state):
        self.__init__(state["root"])
        self.resnets = state["resnets"]

    @staticmethod
    def takes(m) -> bool:
        lin = m.time_emb_proj
        return (m.time_embedding_norm == "default" and type(lin) is nn.Linear
                and _plain_conv(m.conv1) and m.conv1.weight.device == lin.weight.device
                and usable(lin.weight, lin.bias, m.conv1.bias))

    def projection(self, m, temb: torch.Tensor, f32: bool = False) -> torch.Tensor | None:
        """``m.time_emb_proj(act(temb))`` without its bias, or None when ``m`` runs its own;
        f32: in float32 (one cast per projection width, not per block)."""
        if temb.dim() != 2 or not usable(temb):
            return None
        if temb is not self._temb or derived.version(temb) != self._version:
            self._compute(temb)
        out = self._out.get(m)
        if out is None or not f32 or out.dtype == torch.float32:
            return out
        group, i = self._where[m]
        wide = self._out32.get(group)
        if wide is None:
            wide = self._out32[group] = self._groups[group].float()
        return wide if i is None else wide[i]

    def _compute(self, temb):
        self._temb, self._version, self._out = temb, derived.version(temb), {}
        self._groups, self._where, self._out32 = {}, {}, {}
        groups: dict = {}
        for m in self.resnets:
            if self.takes(m):
                w = m.time_emb_proj.weight
                if (w.dtype, w.device, w.shape[1]) == (temb.dtype, temb.device, temb.shape[1]):
                    groups.setdefault((m.skip_time_act, tuple(w.shape)), []).append(m)
        act = None
        for (skip, _), members in groups.items():
            if not skip and act is None:
                act = F.silu(temb)
            x = temb if skip else act
            members = tuple(members)
            if len(members) == 1:
                out = self._groups[members] = F.linear(x, members[0].time_emb_proj.weight)
                self._out[members[0]], self._where[members[0]] = out, (members, None)
                continue
            stack = self._stacks.get(members)
            if stack is None:
                stack = self._stacks[members] = derived.register(self.root, Derived(
                    derived.stack_t, [(r.time_emb_proj, "weight") for r in members]))
            out = torch.matmul(x, stack.get())            # (G, B, N): each block's is contiguous
            self._groups[members] = out
            for i, r in enumerate(members):
                self._out[r], self._where[r] = out[i], (members, i)

    def bias(self, m, *layers) -> torch.Tensor | None:
        """The sum of ``layers``' biases (None when none has one), kept for block ``m``:
        conv1's and the time projection's, or conv2's and the 1x1 shortcut's."""
        d = self._biases.get(layers)
        if d is None:
            d = self._biases[layers] = derived.register(self.root, Derived(
                derived.total, [(layer, "bias") for layer in layers]))
        return d.get() if d.sources() else None

    def bias_f32(self, m, *layers) -> torch.Tensor | None:
        """``bias`` in float32 (what ``norm_conv2d`` adds in its epilogue)."""
        key = ("f32",) + layers
        d = self._biases.get(key)
        if d is None:
            d = self._biases[key] = derived.register(self.root, Derived(
                shift_f32, [(layer, "bias") for layer in layers]))
        return d.get() if d.sources() else None


def _shortcut_fold(self, bank, h, x) -> torch.Tensor | None:
    """``conv_shortcut(x) + conv2(h)`` as conv2 (with both biases) and the 1x1 shortcut as a
    matmul accumulated into its output in place: 2 kernels instead of 3 (conv, conv, add), and
    the sum never read back (x: the block's input after resampling, the shape of conv2's
    output but for channels). None when the layers are not plain ones this can take."""
    sc, c2 = self.conv_shortcut, self.conv2
    if (type(sc) is not nn.Conv2d or sc.kernel_size != (1, 1) or sc.stride != (1, 1)
            or sc.padding not in ((0, 0), "valid") or sc.groups != 1 or not _plain_conv(c2)
            or not usable(c2.bias, sc.bias) or h.dtype != sc.weight.dtype
            or not _on(h, sc.weight, c2.weight)):
        return None
    o = F.conv2d(h, c2.weight, bank.bias(self, c2, sc), c2.stride, c2.padding, c2.dilation,
                 c2.groups)
    b, co, ci = o.shape[0], o.shape[1], x.shape[1]
    w = sc.weight.view(co, ci)
    if o.is_contiguous():
        # (a strided x, a view, is copied: the shortcut conv would copy it too)
        o.view(b, co, -1).baddbmm_(w.expand(b, co, ci), x.contiguous().view(b, ci, -1))
    elif o.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
        o.permute(0, 2, 3, 1).reshape(-1, co).addmm_(x.permute(0, 2, 3, 1).reshape(-1, ci), w.t())
    else:
        o += F.conv2d(x, sc.weight)
    return o


def _resnet_forward(self, bank, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward with norm1+SiLU and (temb add)+norm2(+scale-shift)+SiLU
    fused, the time projection from the model's ``TembBank``, and a 1x1 conv_shortcut folded
    into conv2's output; the rest (resampling, convs, dropout) is the module's own."""
    orig = type(self).forward
    if (input_tensor.dtype not in DTYPES or (temb is not None and self.time_emb_proj is None)):
        return orig(self, input_tensor, temb, *args, **kwargs)
    if not args and not kwargs:
        out = _resnet_fold(self, bank, input_tensor, None, temb)
        if out is not None:
            return out
    h = ops.group_norm_silu(input_tensor.contiguous(), *_gn_args(self.norm1))
    if self.upsample is not None:
        if h.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.upsample(input_tensor)
        h = self.upsample(h)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        h = self.downsample(h)
    banked = (bank.projection(self, temb) if bank is not None and temb is not None
              and not self.training else None)
    if banked is not None:
        c1 = self.conv1
        h = F.conv2d(h, c1.weight, bank.bias(self, c1, self.time_emb_proj), c1.stride,
                     c1.padding, c1.dilation, c1.groups)
        temb = banked
    else:
        h = self.conv1(h)
        if temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
        scale, shift = torch.chunk(temb, 2, dim=1)
        h = ops.group_norm_silu(h.contiguous(), *_gn_args(self.norm2), scale=scale, shift=shift)
    else:   # 'default' adds the time embedding before the norm; other modes ignore it
        pre = temb if self.time_embedding_norm == "default" else None
        h = ops.group_norm_silu(h.contiguous(), *_gn_args(self.norm2), pre_bias=pre)
    h = self.dropout(h)
    if (self.conv_shortcut is not None and self.output_scale_factor == 1
            and not self.training):
        out = _shortcut_fold(self, bank, h, input_tensor)
        if out is not None:
            return out
    h = self.conv2(h)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    out = input_tensor + h
    # dividing by 1.0 is a kernel over the whole activation (the roofline model counted 54 of
    # them per SD1.5 step): only when the factor says so
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


def _resnet_supported(m) -> str | None:
    if not (isinstance(m.norm1, nn.GroupNorm) and isinstance(m.norm2, nn.GroupNorm)):
        return "ResnetBlock2D without GroupNorm norms"
    if not isinstance(m.nonlinearity, nn.SiLU):
        return f"ResnetBlock2D with activation {type(m.nonlinearity).__name__} (SiLU is fused)"
    return None


# ------------------------------------------- ResnetBlock2D: GroupNorms folded into the convs

CONV_FOLDS = ("auto", "off")


def conv_fold_backend() -> str:
    """FASTDIFF_CONV_FOLD: 'auto' (the default) runs a plain ResnetBlock2D as two
    ``norm_conv2d`` calls (each GroupNorm+SiLU applied while the conv loads its input, after a
    ``group_norm_scale_shift`` statistics pass; the time embedding, the 1x1 shortcut, the
    residual and an up block's skip concatenation inside the convs), and a Transformer2DModel's
    input norm inside proj_in; 'off' keeps ``group_norm_silu`` and torch's convolutions (for a
    GPU run to compare the two)."""
    choice = os.environ.get("FASTDIFF_CONV_FOLD", "auto")
    if choice not in CONV_FOLDS:
        raise ValueError(f"fastdiff: FASTDIFF_CONV_FOLD must be one of {CONV_FOLDS}, "
                         f"got {choice!r}")
    return choice


def _conv3(c) -> bool:
    """A plain 3x3 convolution with 'same' zero padding: what ``norm_conv2d`` computes."""
    return (_plain_conv(c) and c.kernel_size == (3, 3) and c.stride == (1, 1)
            and c.padding in ((1, 1), "same") and c.dilation == (1, 1) and c.groups == 1)


def _pack(*src):
    """The make of a Derived: ``ops.pack_conv_weight`` of a conv's weight [and a 1x1
    shortcut's]."""
    return ops.pack_conv_weight(src[0], src[1] if len(src) > 1 else None)


def _resnet_foldable(self, x, x2, temb) -> bool:
    """Whether this call of a ResnetBlock2D can run as two ``norm_conv2d`` calls: 3x3 convs,
    GroupNorms in x's dtype, no resampling, 'default' time embedding (or none), a 1x1 or no
    shortcut, unit output scale, a quiet dropout, inference (no autograd through it), no hooks
    on the modules it computes without calling, not compiling."""
    n1, n2, sc = self.norm1, self.norm2, self.conv_shortcut
    if (conv_fold_backend() != "auto" or self.training or x.dim() != 4
            or self.upsample is not None or self.downsample is not None
            or self.output_scale_factor != 1
            or (temb is not None and self.time_embedding_norm != "default")
            or not (_conv3(self.conv1) and _conv3(self.conv2))
            or not (sc is None or _is_pointwise(sc)) or not _quiet(self.dropout)
            or torch.compiler.is_compiling()):
        return False
    if sc is None and (x2 is not None or x.shape[1] != self.conv2.out_channels):
        return False
    ws = [p for m in (n1, n2, self.conv1, self.conv2, sc) if m is not None
          for p in m._parameters.values() if p is not None]
    if any(w.dtype != x.dtype or w.device != x.device for w in ws):
        return False
    if x2 is not None and (x2.dtype != x.dtype or x2.device != x.device or x2.dim() != 4
                           or x2.shape[0] != x.shape[0] or x2.shape[2:] != x.shape[2:]):
        return False
    if _hooked(n1, self.conv1, n2, self.conv2, sc, self.nonlinearity, self.dropout):
        return False
    return not torch.is_grad_enabled() or usable(x, x2, temb, *ws)


def _conv_derived(bank, m, name: str, make, refs):
    """A Derived of block ``m``'s, kept by the model's TembBank (which holds the root)."""
    key = (m, name)
    d = bank.convs.get(key)
    if d is None:
        d = bank.convs[key] = derived.register(bank.root, Derived(make, refs))
    return d


def _resnet_fold(self, bank, x, x2, temb) -> torch.Tensor | None:
    """The block on ``norm_conv2d`` (None when this call cannot take it): conv1 reads
    cat([x, x2]) normalized and SiLU'd on load (``group_norm_scale_shift``'s per-(n, c) affine)
    and adds its bias, the time projection's bias and the per-sample time projection in its
    epilogue; conv2 does the same with norm2 over conv1's output and, in the same K loop, the
    1x1 shortcut over the raw input (or adds the input as the residual). 4 kernels: the cat,
    both norm kernels, the shortcut matmul and the adds are gone, and neither normalized tensor
    is written."""
    if bank is None or not _resnet_foldable(self, x, x2, temb):
        return None
    n1, n2, c1, c2, sc = self.norm1, self.norm2, self.conv1, self.conv2, self.conv_shortcut
    t = None
    b1 = (c1,)
    if temb is not None:
        t = bank.projection(self, temb, f32=True)
        if t is not None:
            b1 = (c1, self.time_emb_proj)       # the projection's bias joins conv1's
        else:
            t = temb if self.skip_time_act else self.nonlinearity(temb)
            t = self.time_emb_proj(t)
            if t.dim() != 2:
                return None
    s, h = ops.group_norm_scale_shift(x, n1.num_groups, n1.weight, n1.bias, n1.eps, x2=x2)
    h = ops.norm_conv2d(x, _conv_derived(bank, self, "pack1", _pack, [(c1, "weight")]).get(),
                        3, bank.bias_f32(self, *b1), x2=x2, scale=s, shift=h, silu=True,
                        temb=t)
    s, f = ops.group_norm_scale_shift(h, n2.num_groups, n2.weight, n2.bias, n2.eps)
    if sc is None:
        w2 = _conv_derived(bank, self, "pack2", _pack, [(c2, "weight")])
        return ops.norm_conv2d(h, w2.get(), 3, bank.bias_f32(self, c2), scale=s, shift=f,
                               silu=True, residual=x)
    w2 = _conv_derived(bank, self, "pack2", _pack, [(c2, "weight"), (sc, "weight")])
    return ops.norm_conv2d(h, w2.get(), 3, bank.bias_f32(self, c2, sc), scale=s, shift=f,
                           silu=True, shortcut=x, shortcut2=x2)


def _freeu(self) -> bool:
    return bool(getattr(self, "s1", None) and getattr(self, "s2", None)
                and getattr(self, "b1", None) and getattr(self, "b2", None))


def _up_block_forward(self, hidden_states, res_hidden_states_tuple, temb=None, *args,
                      **kwargs):
    """diffusers' UpBlock2D / CrossAttnUpBlock2D forward with each skip concatenation read in
    place: a patched ResnetBlock2D gets the hidden states and the skip as ``norm_conv2d``'s two
    inputs (``_resnet_fold``), so the (B, C1 + C2, H, W) cat is never written. Positional
    arguments, a 'scale', FreeU, gradient checkpointing: diffusers' forward."""
    orig = type(self).forward
    cak = kwargs.get("cross_attention_kwargs")
    if (args or kwargs.get("scale") is not None or (cak or {}).get("scale") is not None
            or _freeu(self) or (torch.is_grad_enabled() and self.gradient_checkpointing)
            or conv_fold_backend() != "auto"):
        return orig(self, hidden_states, res_hidden_states_tuple, temb, *args, **kwargs)
    attns = getattr(self, "attentions", None)
    attn_kwargs = {k: kwargs.get(k) for k in ("encoder_hidden_states", "cross_attention_kwargs",
                                              "attention_mask", "encoder_attention_mask")}
    res = tuple(res_hidden_states_tuple)
    h = hidden_states
    for i, resnet in enumerate(self.resnets):
        skip, res = res[-1], res[:-1]
        out = None
        fwd = resnet.__dict__.get("forward")
        if (type(fwd) is Patched and fwd.fn is _resnet_forward and not _hooked(resnet)
                and h.dtype in DTYPES):
            out = _resnet_fold(resnet, fwd.extra[0], h, skip, temb)
        h = out if out is not None else resnet(torch.cat([h, skip], dim=1), temb)
        if attns is not None:
            h = attns[i](h, **attn_kwargs, return_dict=False)[0]
    for upsampler in self.upsamplers or ():
        h = upsampler(h, kwargs.get("upsample_size"))
    return h


def _norm_out_forward(self, x):
    """conv_norm_out with the SiLU of conv_act fused (conv_act's forward becomes the identity)."""
    if x.dtype not in DTYPES:
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))
    return ops.group_norm_silu(x.contiguous(), *_gn_args(self))


def _identity_forward(self, x):
    return x


# ---------------------------------------------------------------- GEGLU

GEGLU_BACKENDS = ("auto", "fused", "split")


def geglu_backend() -> str:
    """How an accelerated GEGLU runs: 'fused' (``linear_geglu``: the projection's GEMM with
    the GELU and product in its epilogue, the 2F-wide projection never written) or 'split'
    (the projection's own matmul, then ``geglu``). FASTDIFF_GEGLU picks; 'auto' (the default)
    is 'fused': on the CPU the two measured alike (the matmul dominates, BENCHMARKS.md); on a
    GPU the fused kernel moves a quarter of the bytes, and whether its Triton GEMM keeps up with
    cuBLAS is for the next GPU run to measure."""
    choice = os.environ.get("FASTDIFF_GEGLU", "auto")
    if choice not in GEGLU_BACKENDS:
        raise ValueError(f"fastdiff: FASTDIFF_GEGLU must be one of {GEGLU_BACKENDS}, "
                         f"got {choice!r}")
    return "split" if choice == "split" else "fused"


def _geglu_forward(self, hidden_states, *args, **kwargs):
    """diffusers' GEGLU.forward: with a plain Linear projection, ``linear_geglu`` (one GEMM
    with value * gelu(gate) in its epilogue); else the projection, then ``geglu`` (the GELU and
    the product in one kernel instead of two)."""
    if (args or kwargs or hidden_states.dtype not in DTYPES
            or hidden_states.device.type == "npu"):   # (npu: diffusers' own fused kernel)
        return type(self).forward(self, hidden_states, *args, **kwargs)
    p = self.proj
    if (type(p) is nn.Linear and p.weight.dtype == hidden_states.dtype
            and _on(hidden_states, p.weight) and p.in_features > 0 and p.out_features > 0
            and geglu_backend() == "fused"):
        return ops.linear_geglu(hidden_states, p.weight, p.bias)
    return ops.geglu(p(hidden_states))


# ---------------------------------------------------------------- BasicTransformerBlock

def _add_norm(x, residual, norm: nn.LayerNorm):
    """(residual + x, norm(residual + x)) in one kernel."""
    return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)


def _block_fusable(self, hidden_states, cross_attention_kwargs) -> bool:
    """Whether diffusers' BasicTransformerBlock.forward is, for this call, the plain
    LayerNorm block the fused forward implements."""
    norms = [self.norm3] + ([self.norm2] if self.attn2 is not None else [])
    return (self.norm_type == "layer_norm" and self.pos_embed is None
            and self._chunk_size is None and hidden_states.ndim == 3
            and hidden_states.dtype in DTYPES
            and not (cross_attention_kwargs or {}).keys() & {"gligen", "scale"}
            and all(isinstance(n, nn.LayerNorm) and len(n.normalized_shape) == 1
                    and all(p is None or p.dtype == hidden_states.dtype
                            for p in (n.weight, n.bias)) for n in norms))


def _transformer_block_forward(self, hidden_states, attention_mask=None,
                               encoder_hidden_states=None, encoder_attention_mask=None,
                               timestep=None, cross_attention_kwargs=None, class_labels=None,
                               added_cond_kwargs=None):
    """diffusers' BasicTransformerBlock.forward for norm_type 'layer_norm' with each residual
    add and the LayerNorm after it (norm2 before the cross-attention, norm3 before the
    feed-forward) as one add_layer_norm; anything else runs diffusers' forward."""
    if not _block_fusable(self, hidden_states, cross_attention_kwargs):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask, timestep, cross_attention_kwargs,
                                  class_labels, added_cond_kwargs)
    if _foldable(self, hidden_states, encoder_hidden_states, attention_mask,
                 encoder_attention_mask, cross_attention_kwargs):
        return _folded_block_forward(self, hidden_states, encoder_hidden_states)
    kwargs = dict(cross_attention_kwargs or {})
    # With a conv proj_in (SD1.5) the block gets a (B, C, HW) tensor viewed as (B, HW, C). Eager's
    # LayerNorm copies it to contiguous anyway, inside the kernel call (on the GPU a copy
    # kernel); here the copy is made once, and norm1 and the fused add read it.
    hidden_states = hidden_states.contiguous()
    norm_hidden_states = self.norm1(hidden_states)
    attn_output = self.attn1(
        norm_hidden_states,
        encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
        attention_mask=attention_mask, **kwargs)
    if self.attn2 is not None:
        hidden_states, norm_hidden_states = _add_norm(attn_output, hidden_states, self.norm2)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=encoder_attention_mask, **kwargs)
    lin = _ff_output(self.ff, hidden_states)
    if lin is None:
        hidden_states, norm_hidden_states = _add_norm(attn_output, hidden_states, self.norm3)
        return self.ff(norm_hidden_states) + hidden_states
    # The feed-forward's output projection accumulates into the residual in place: the
    # residual comes out of add_layer_norm with the projection's bias already added (the norm
    # itself is of the sum without it), so addmm_ (no bias, beta=1) writes the block's output:
    # one kernel instead of the projection and the residual add.
    hidden_states, norm_hidden_states = ops.add_layer_norm(
        attn_output, hidden_states, self.norm3.weight, self.norm3.bias, self.norm3.eps,
        next_bias=lin.bias)
    h = norm_hidden_states
    for m in self.ff.net[:2]:         # the activation (GEGLU: projection + geglu), dropout
        h = m(h)
    c = hidden_states.shape[-1]
    hidden_states.view(-1, c).addmm_(h.reshape(-1, h.shape[-1]), lin.weight.t())
    return hidden_states


def _ff_output(ff, x) -> nn.Linear | None:
    """The output Linear of diffusers' FeedForward ``ff`` (activation, dropout, Linear), when
    the block can fold its bias and residual add (no final dropout at work, a plain biased
    Linear in x's dtype), else None."""
    from diffusers.models.attention import FeedForward

    if type(ff) is not FeedForward or len(ff.net) not in (3, 4):
        return None
    lin = ff.net[2]
    if (type(lin) is not nn.Linear or lin.bias is None or lin.weight.dtype != x.dtype
            or not _on(x, lin.weight) or not isinstance(ff.net[1], nn.Dropout)):
        return None
    if len(ff.net) == 4 and not (isinstance(ff.net[3], nn.Dropout)
                                 and (not ff.training or ff.net[3].p == 0)):
        return None
    return lin


# ------------------------------------------- BasicTransformerBlock: LayerNorms folded into GEMMs

NORM_FOLDS = ("auto", "off")


def norm_fold_backend() -> str:
    """FASTDIFF_NORM_FOLD: 'auto' (the default) folds each LayerNorm of a plain
    BasicTransformerBlock into the GEMM that reads it (``layer_norm_linear``); 'off' keeps
    add_layer_norm and the projections' own matmuls (for a GPU run to compare the two)."""
    choice = os.environ.get("FASTDIFF_NORM_FOLD", "auto")
    if choice not in NORM_FOLDS:
        raise ValueError(f"fastdiff: FASTDIFF_NORM_FOLD must be one of {NORM_FOLDS}, "
                         f"got {choice!r}")
    return choice


class _LnFold:
    """The ``make`` of a Derived: the folded weight (``part`` 'weight') or the (3, N) float32
    fold ('fold') of a LayerNorm folded into the Linears after it (stacked), from sources tagged
    by ``tags``: 'g' the norm's weight, 'b' its bias, 'w' a Linear's weight, 'lb' its bias, 's'
    a bias the norm's input still lacks (their sum is the op's shift)."""

    def __init__(self, part: str, tags: tuple):
        self.part, self.tags = part, tags

    def __call__(self, *src):
        if len(src) != len(self.tags):
            raise RuntimeError("fastdiff: a folded LayerNorm's sources changed shape")
        got = {k: [] for k in ("g", "b", "w", "lb", "s")}
        for tag, t in zip(self.tags, src):
            got[tag].append(t)
        w = got["w"][0] if len(got["w"]) == 1 else torch.cat(got["w"])
        lb = torch.cat(got["lb"]) if got["lb"] else None
        shift = shift_f32(*got["s"]) if got["s"] else None
        wp, fold = ops.fold_layer_norm(got["g"][0] if got["g"] else None,
                                       got["b"][0] if got["b"] else None, w, lb, shift)
        return wp if self.part == "weight" else fold


def shift_f32(*biases: torch.Tensor) -> torch.Tensor:
    """The sum of biases in float32 (a folded norm's shift): a new tensor, also of one float32
    bias (an alias would be the parameter itself: remade in place, it would bump the
    parameter's version and leave what derives from it stale)."""
    out = biases[0].to(torch.float32, copy=True)
    for b in biases[1:]:
        out = out + b.float()
    return out.contiguous()


def _norm_fold(proc, norm: nn.LayerNorm, linears: tuple, pending: tuple):
    """(weight, fold, shift or None) Deriveds of ``norm`` folded into ``linears`` (stacked
    along N), for an input that still lacks the biases of the Linears ``pending``; kept by
    ``proc`` (a FastdiffAttnProcessor with a root)."""
    shift_refs = tuple((m, "bias") for m in pending if m.bias is not None)
    key = ("norm_fold", norm, linears, shift_refs, norm.weight is not None,
           norm.bias is not None, linears[0].bias is not None)
    d = proc._derived.get(key)
    if d is None:
        refs = ([(norm, "weight")] if norm.weight is not None else []) + (
            [(norm, "bias")] if norm.bias is not None else [])
        tags = ["g"] * (norm.weight is not None) + ["b"] * (norm.bias is not None)
        refs += [(m, "weight") for m in linears]
        tags += ["w"] * len(linears)
        # (the folded weight reads the norm's weight and the Linears' only: a bias updated
        # makes the fold again, not the weight)
        w_refs = [r for r, t in zip(refs, tags) if t in ("g", "w")]
        w_tags = tuple(t for t in tags if t in ("g", "w"))
        if linears[0].bias is not None:
            refs += [(m, "bias") for m in linears]
            tags += ["lb"] * len(linears)
        refs += shift_refs
        tags = tuple(tags + ["s"] * len(shift_refs))
        reg = proc.root
        d = proc._derived[key] = (
            derived.register(reg, Derived(_LnFold("weight", w_tags), w_refs)),
            derived.register(reg, Derived(_LnFold("fold", tags), refs)),
            derived.register(reg, Derived(shift_f32, shift_refs)) if shift_refs else None)
    return d


def _quiet(m) -> bool:
    """A Dropout that does nothing (eval mode or p = 0)."""
    return isinstance(m, nn.Dropout) and (not m.training or m.p == 0)


def _plain_linear(m, x) -> bool:
    """A plain nn.Linear with its weight in x's dtype on x's device, no hooks or forward of its
    own. (Read through the module's dicts: nn.Module's __getattr__ costs ~0.7 us a lookup, and
    this runs for ~20 modules a block call.)"""
    if type(m) is not nn.Linear or _hooked(m):
        return False
    w = m._parameters["weight"]
    return w.dtype == x.dtype and w.device == x.device


def _plain_attention(attn, x) -> bool:
    """An Attention the folded block computes itself: fastdiff's processor (with a root for
    its derived tensors), plain Linear projections in x's dtype and device with biases on all
    or none of q, k, v, no group/spatial norm, residual or rescale, a quiet output dropout, no
    hooks (its forward is not called)."""
    d = attn.__dict__
    proc = d.get("processor")
    mods = d["_modules"]
    out = mods.get("to_out")
    if (type(proc) is not FastdiffAttnProcessor or proc.root is None or _hooked(attn)
            or mods.get("spatial_norm") is not None or mods.get("group_norm") is not None
            or mods.get("norm_cross") is not None or d.get("norm_cross")
            or d.get("residual_connection")
            or d.get("rescale_output_factor", 1) != 1 or out is None or len(out) != 2
            or not _quiet(out[1]) or _hooked(out[1])):
        return False
    lin = (mods.get("to_q"), mods.get("to_k"), mods.get("to_v"), out[0])
    return (all(_plain_linear(m, x) for m in lin)
            and len({m._parameters.get("bias") is None for m in lin[:3]}) == 1)


# A hook function with this attribute set true only observes (benchmarks/roofline.py names the
# module a kernel runs in): the folded block may compute the modules it watches without them.
OBSERVER = "_fastdiff_observer"


def _acting(hooks) -> bool:
    """Whether a hook dict holds a hook that is not an observer."""
    return bool(hooks) and not all(getattr(h, OBSERVER, False) for h in hooks.values())


def _hooked(*modules) -> bool:
    """Whether any of ``modules`` (those the folded block computes without calling them) has a
    forward hook or pre-hook, or a forward of its own (diffusers' hook registry, offloading,
    caches; fastdiff's own Patched forwards aside), or torch's global module hooks are set:
    the block then calls its modules. Hooks marked OBSERVER do not count."""
    if (_acting(_nn_module._global_forward_hooks)
            or _acting(_nn_module._global_forward_pre_hooks)):
        return True
    return any(m is not None and (_acting(m._forward_hooks) or _acting(m._forward_pre_hooks)
                                  or not isinstance(m.__dict__.get("forward", _PATCHED), Patched))
               for m in modules)


def _foldable(self, hidden_states, encoder_hidden_states, attention_mask,
              encoder_attention_mask, cross_attention_kwargs) -> bool:
    """Whether this call of a (fusable) BasicTransformerBlock can run with its LayerNorms
    folded into the GEMMs after them: self-attention, then cross-attention over a context (or
    none), then a GEGLU feed-forward with a plain output Linear, no masks or extra kwargs, no
    hooks on the modules it computes without calling, no autograd, not compiling. (Modules and
    parameters read through their dicts: see _plain_linear.)"""
    from diffusers.models.activations import GEGLU

    x = hidden_states
    mods = self.__dict__["_modules"]
    a1, a2, norm1 = mods["attn1"], mods.get("attn2"), mods["norm1"]
    if (cross_attention_kwargs or attention_mask is not None
            or encoder_attention_mask is not None or self.only_cross_attention
            or norm_fold_backend() != "auto" or type(norm1) is not nn.LayerNorm
            or any(p is not None and p.dtype != x.dtype for p in norm1._parameters.values())
            or not _plain_attention(a1, x) or (a2 is not None and (
                encoder_hidden_states is None or not _plain_attention(a2, x)))):
        return False
    ff = mods["ff"]
    lin = _ff_output(ff, x)
    if lin is None or _hooked(lin):
        return False
    net = ff.__dict__["_modules"]["net"]
    geglu = net[0]
    if (type(geglu) is not GEGLU or not _plain_linear(geglu.__dict__["_modules"]["proj"], x)
            or not _quiet(net[1])
            or _hooked(norm1, mods.get("norm2"), mods.get("norm3"), ff, geglu, net[1])):
        return False
    if torch.compiler.is_compiling():
        return False
    # (the parameters gathered only when autograd records: ~40 us of module walks a call)
    return not torch.is_grad_enabled() or usable(x, encoder_hidden_states, *self.parameters())


def _folded_block_forward(self, hidden_states, encoder_hidden_states):
    """The block with each LayerNorm inside the GEMM that reads it (``layer_norm_linear``:
    its row statistics come from the GEMM's own K loop, the norm's weight and bias are folded
    into the projection's), and each residual add inside the GEMM that makes it: the attention
    outputs' projections accumulate into the residual stream (addmm with it as C), and the
    stream lacks their biases until the end: the folded norms read it with those biases as a
    shift, and one add puts them in. Eager: 3 norm kernels + 2 adds; here 1 add."""
    x = hidden_states.contiguous()
    batch, length, c = x.shape
    a1, a2, ff = self.attn1, self.attn2, self.ff
    proc = a1.processor
    owe = [a1.to_out[0]]                     # the projections whose bias the stream lacks

    w, fold, _ = _norm_fold(proc, self.norm1, (a1.to_q, a1.to_k, a1.to_v), ())
    qkv = ops.layer_norm_linear(x, w.get(), fold.get(), None, self.norm1.eps)
    q, k, v = qkv.split([a1.to_q.out_features, a1.to_k.out_features,
                         a1.to_v.out_features], dim=-1)
    o = proc.product(a1, q, k, v, None, batch)
    stream = torch.addmm(x.view(-1, c), o.reshape(-1, o.shape[-1]), a1.to_out[0].weight.t())
    if a2 is not None:
        p2 = a2.processor
        w, fold, shift = _norm_fold(p2, self.norm2, (a2.to_q,), tuple(owe))
        q = ops.layer_norm_linear(stream.view(batch, length, c), w.get(), fold.get(),
                                  shift.get() if shift is not None else None, self.norm2.eps)
        kv = p2._context_projection(encoder_hidden_states, (a2.to_k, a2.to_v))
        k, v = kv if kv is not None else (a2.to_k(encoder_hidden_states),
                                          a2.to_v(encoder_hidden_states))
        o = p2.product(a2, q, k, v, None, batch)
        stream.addmm_(o.reshape(-1, o.shape[-1]), a2.to_out[0].weight.t())
        owe.append(a2.to_out[0])
    lin = ff.net[2]
    w, fold, shift = _norm_fold(proc, self.norm3, (ff.net[0].proj,), tuple(owe))
    args = (stream.view(batch, length, c), w.get(), fold.get(),
            shift.get() if shift is not None else None, self.norm3.eps)
    if geglu_backend() == "fused":
        h = ops.layer_norm_linear(*args, geglu=True)
    else:
        h = ops.geglu(ops.layer_norm_linear(*args))
    owe.append(lin)
    if conv_fold_backend() == "auto" and lin.bias is not None:
        tail = _tail(proc, tuple(owe), f32=True)
        # the feed-forward's output as a 1x1 norm_conv2d over the tokens read as (B, F, L, 1)
        # channels_last views: the stream as its residual, every bias it owes in its epilogue,
        # so the block's output is written once, with no bias add after it
        f = h.shape[-1]
        out = ops.norm_conv2d(h.reshape(batch, length, 1, f).permute(0, 3, 1, 2), lin.weight, 1,
                              tail.get(), residual=stream.view(batch, length, 1, c).permute(
                                  0, 3, 1, 2), channels_last_out=True)
        return out.permute(0, 2, 3, 1).reshape(batch, length, c)
    stream.addmm_(h.reshape(-1, h.shape[-1]), lin.weight.t())
    tail = _tail(proc, tuple(owe))
    if tail is not None:
        stream.add_(tail.get())
    return stream.view(batch, length, c)


def _tail(proc, linears: tuple, f32: bool = False):
    """The Derived sum of ``linears``' biases (the stream's debt at the block's end), or None;
    f32: in float32 (``norm_conv2d``'s bias)."""
    refs = tuple((m, "bias") for m in linears if m.bias is not None)
    if not refs:
        return None
    key = ("tail", refs, f32)
    d = proc._derived.get(key)
    if d is None:
        d = proc._derived[key] = derived.register(proc.root, Derived(
            shift_f32 if f32 else derived.total, refs))
    return d


# ---------------------------------------------------------------- Timesteps

def _timesteps_forward(self, freqs: dict, timesteps):
    """diffusers' Timesteps (its get_timestep_embedding) in 3 kernels instead of 11, with the
    same values: the frequencies (arange, mul, div, exp: the same at every step) made once per
    device, then ``t * freqs``, and the sine and cosine written into their halves of the output
    (no concatenations, no flip)."""
    if (timesteps.dim() != 1 or self.num_channels < 2 or torch.compiler.is_compiling()
            or (timesteps.requires_grad and torch.is_grad_enabled())):
        return type(self).forward(self, timesteps)
    half = self.num_channels // 2
    key = (timesteps.device, half, self.downscale_freq_shift)
    f = freqs.get(key)
    if f is None:          # as get_timestep_embedding computes them (max_period 10000)
        exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32,
                                                   device=timesteps.device)
        f = freqs[key] = torch.exp(exponent / (half - self.downscale_freq_shift))
    if timesteps.dtype == torch.float64:
        timesteps = timesteps.float()    # (integers and halves are converted inside the mul)
    emb = timesteps[:, None] * f          # float32: = timesteps[:, None].float() * f
    if self.scale != 1:
        emb = self.scale * emb
    out = torch.empty(timesteps.shape[0], self.num_channels, dtype=torch.float32,
                      device=timesteps.device)
    sin_at, cos_at = (half, 0) if self.flip_sin_to_cos else (0, half)
    torch.sin(emb, out=out[:, sin_at:sin_at + half])
    torch.cos(emb, out=out[:, cos_at:cos_at + half])
    if self.num_channels % 2:
        out[:, -1:].zero_()
    return out


# ---------------------------------------------------------------- Transformer2DModel

def _is_pointwise(c) -> bool:
    """A plain 1x1 convolution: a matmul over channels."""
    return (_plain_conv(c) and c.kernel_size == (1, 1) and c.stride == (1, 1)
            and c.padding in ((0, 0), "valid") and c.groups == 1)


def _transformer_input(self, bank, hidden_states):
    """Transformer2DModel's input for image inputs: its GroupNorm (``group_norm_silu`` without
    the SiLU) writes channels_last memory, which is the (B, HW, C) token layout, so the tokens
    are a view and a 1x1 conv proj_in runs as a Linear on them: the blocks get contiguous
    tokens without the copy diffusers' permute + reshape makes (SD1.5: before its first
    LayerNorm; SDXL: before its linear proj_in)."""
    fn = type(self)._operate_on_continuous_inputs
    norm, p = self.norm, self.proj_in
    if (hidden_states.dim() != 4 or hidden_states.dtype not in DTYPES
            or type(norm) is not nn.GroupNorm or not norm.affine
            or norm.weight.dtype != hidden_states.dtype or not _on(hidden_states, norm.weight)):
        return fn(self, hidden_states)
    linear = self.use_linear_projection
    if not linear and not (_is_pointwise(p) and p.weight.dtype == hidden_states.dtype
                           and _on(hidden_states, p.weight)):
        return fn(self, hidden_states)
    batch, _, height, width = hidden_states.shape
    if _norm_in_foldable(self, bank, hidden_states):
        # the norm's statistics, then proj_in normalizing its input on load and writing the
        # tokens (channels_last memory: the (B, HW, C) layout); the output's proj_out adds
        # the input back in its epilogue (_transformer_output): 3 kernels, nothing else
        s, f = ops.group_norm_scale_shift(hidden_states, norm.num_groups, norm.weight,
                                          norm.bias, norm.eps)
        w = p.weight.view(p.weight.shape[0], -1)
        h = ops.norm_conv2d(hidden_states, w, 1, bank.bias_f32(self, p), scale=s, shift=f,
                            channels_last_out=True)
        self.__dict__[_RESIDUAL] = (hidden_states, None, None)
        tokens = h.permute(0, 2, 3, 1).reshape(batch, height * width, h.shape[1])   # a view
        return tokens, (hidden_states.shape[1] if linear else tokens.shape[-1])
    x = hidden_states if hidden_states.is_contiguous(
        memory_format=torch.channels_last) else hidden_states.contiguous()
    out_w = _proj_out_fold(self, x) if x is hidden_states else None
    if out_w is None:
        h = ops.group_norm_silu(x, *_gn_args(norm), silu=False, channels_last_out=True)
    else:
        # the same read of x also writes r = x + proj_out's bias, into which proj_out
        # accumulates at the end (_transformer_output): no residual add
        h, r = ops.group_norm_silu_residual(x, *_gn_args(norm), out_w[1], silu=False,
                                            channels_last_out=True)
        self.__dict__[_RESIDUAL] = (hidden_states, r, out_w[0])
    tokens = h.permute(0, 2, 3, 1).reshape(batch, height * width, h.shape[1])   # a view
    if linear:            # (diffusers' inner_dim: the width before a linear proj_in)
        return p(tokens), tokens.shape[-1]
    tokens = F.linear(tokens, p.weight.view(p.out_channels, -1), p.bias)
    return tokens, tokens.shape[-1]


# (input, x + proj_out's bias, proj_out's (C, Cin) weight): from the input to the output
_RESIDUAL = "_fastdiff_residual"


def _proj_out_fold(self, x):
    """proj_out's (C, Cin) weight and its bias when the transformer's output can accumulate
    into the norm's ``x + bias`` (a plain biased 1x1 conv or Linear in x's dtype and device,
    an NCHW x, no autograd through proj_out's bias), else None."""
    p = self.proj_out
    ok = type(p) is nn.Linear if self.use_linear_projection else _is_pointwise(p)
    if (not ok or p.bias is None or p.weight.dtype != x.dtype or not _on(x, p.weight)
            or not x.is_contiguous() or torch.compiler.is_compiling()):
        return None
    return p.weight.view(p.weight.shape[0], -1), p.bias


def _norm_in_foldable(self, bank, x) -> bool:
    """Whether the transformer's input norm can run inside proj_in (``norm_conv2d``) and the
    residual inside proj_out: FASTDIFF_CONV_FOLD, plain projections in x's dtype whose output
    width matches, no hooks on them or the norm, inference."""
    norm, p, q = self.norm, self.proj_in, self.proj_out
    if bank is None or conv_fold_backend() != "auto" or torch.compiler.is_compiling():
        return False
    plain = (lambda m: type(m) is nn.Linear) if self.use_linear_projection else _is_pointwise
    if not (plain(p) and plain(q)) or _hooked(norm, p, q):
        return False
    if (p.weight.dtype != x.dtype or q.weight.dtype != x.dtype or not _on(x, p.weight, q.weight)
            or q.weight.shape[0] != x.shape[1]):
        return False
    return not torch.is_grad_enabled() or usable(x, norm.weight, norm.bias, p.weight, p.bias,
                                                 q.weight, q.bias)


def _transformer_output(self, bank, hidden_states, residual, batch_size, height, width,
                        inner_dim):
    """Transformer2DModel's output for image inputs: ``proj_out`` and the residual add, without
    the copy diffusers makes of the (B, HW, C) tokens into an NCHW tensor. A 1x1 conv proj_out
    runs as a Linear on the tokens; the add reads its (B, HW, C) output through a permuted view
    and writes the residual's layout: proj_out + add (2 kernels) instead of copy, proj_out,
    add."""
    fn = type(self)._get_output_for_continuous_inputs
    p = self.proj_out
    pending = self.__dict__.pop(_RESIDUAL, None)
    if hidden_states.dim() != 3 or residual.dim() != 4:
        return fn(self, hidden_states, residual, batch_size, height, width, inner_dim)
    if (pending is not None and pending[0] is residual and pending[2] is None
            and hidden_states.is_contiguous() and usable(hidden_states)
            and hidden_states.shape[:2] == (batch_size, height * width)
            and hidden_states.shape[2] == p.weight.view(p.weight.shape[0], -1).shape[1]):
        # proj_out over the tokens read as a channels_last (B, C, H, W) view, the input added
        # back in its epilogue: one kernel writes the NCHW output
        x = hidden_states.view(batch_size, height, width, -1).permute(0, 3, 1, 2)
        return ops.norm_conv2d(x, p.weight.view(p.weight.shape[0], -1), 1,
                               bank.bias_f32(self, p), residual=residual)
    if (pending is not None and pending[0] is residual and pending[2] is not None
            and hidden_states.is_contiguous()
            and hidden_states.shape == (batch_size, height * width, pending[2].shape[1])):
        # r = residual + bias (the input norm wrote it): proj_out accumulates into it in place,
        # reading the tokens transposed: one GEMM writes the NCHW output
        _, r, w = pending
        r.view(batch_size, w.shape[0], -1).baddbmm_(w.expand(batch_size, *w.shape),
                                                     hidden_states.transpose(1, 2))
        return r
    if self.use_linear_projection:
        h = p(hidden_states)
    elif (_is_pointwise(p) and p.weight.dtype == hidden_states.dtype
          and _on(hidden_states, p.weight)):
        h = F.linear(hidden_states, p.weight.view(p.out_channels, -1), p.bias)
    else:
        return fn(self, hidden_states, residual, batch_size, height, width, inner_dim)
    # (residual first: the sum takes its memory layout, not the permuted view's)
    return residual + h.view(batch_size, height, width, -1).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- attention

ATTENTION_BACKENDS = ("auto", "fastdiff", "sdpa")


def attention_policy() -> str:
    """What attention_backend will choose, in words (accelerate's report)."""
    choice = os.environ.get("FASTDIFF_ATTENTION", "auto")
    if choice == "auto":
        return "torch SDPA on CUDA, fastdiff.attention elsewhere (FASTDIFF_ATTENTION=auto)"
    if choice in ATTENTION_BACKENDS:
        who = "torch SDPA" if choice == "sdpa" else "fastdiff.attention"
        return f"{who} (FASTDIFF_ATTENTION={choice})"
    return f"invalid FASTDIFF_ATTENTION={choice!r} (one of {', '.join(ATTENTION_BACKENDS)})"


def attention_backend(query: torch.Tensor) -> str:
    """Who computes an accelerated block's attention product: 'fastdiff' (ops.attention) or
    'sdpa' (torch's scaled_dot_product_attention). FASTDIFF_ATTENTION picks; 'auto' (the
    default) takes SDPA on CUDA, where fastdiff's kernel alone measured 0.58-0.82x of SDPA's
    flash kernel for SD1.5's self-attention and about 1.0x for its cross-attention (H200,
    2026-11-30, BENCHMARKS.md), and fastdiff's elsewhere (CPU: 0.96-1.02x of SDPA)."""
    choice = os.environ.get("FASTDIFF_ATTENTION", "auto")
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"fastdiff: FASTDIFF_ATTENTION must be one of {ATTENTION_BACKENDS}, "
                         f"got {choice!r}")
    if choice == "auto":
        if query.is_cuda:
            log_once("attention on CUDA: torch's SDPA, measured faster than fastdiff's kernel "
                     "(FASTDIFF_ATTENTION=fastdiff uses fastdiff's)")
            return "sdpa"
        return "fastdiff"
    return choice


class FastdiffAttnProcessor:
    """diffusers' AttnProcessor2_0 with the attention product on ``fastdiff.attention``.

    Supports spatial_norm, group_norm, norm_cross, norm_q/norm_k, residual_connection,
    rescale_output_factor and additive or boolean attention masks. Head dims above 256, and CUDA
    tensors unless FASTDIFF_ATTENTION=fastdiff (attention_backend), go to
    ``F.scaled_dot_product_attention``; gradients go through the op's autograd formula.
    """
    fused_projections = False        # FastdiffFusedAttnProcessor: q, k, v from to_qkv / to_kv

    def __init__(self, root: nn.Module | None = None):
        # root: the model whose graph wrappers refresh derived tensors (patch_attention's);
        # without one, the projections run separately (a replay would not see weight updates)
        self.root = root
        self._derived: dict = {}

    def _stacked(self, x, layers):
        """The (weight, bias) Deriveds of ``layers`` stacked, or None when they are not plain
        Linears over x this can take."""
        if self.root is None or any(type(m) is not nn.Linear for m in layers):
            return None
        w0 = layers[0].weight
        has_bias = layers[0].bias is not None
        if (any(m.weight.shape[1] != w0.shape[1] or (m.bias is not None) != has_bias
                for m in layers) or w0.dtype != x.dtype or w0.device != x.device
                or not usable(*(t for m in layers for t in (m.weight, m.bias)))):
            return None
        d = self._derived.get(layers)
        if d is None:
            w = derived.register(self.root, Derived(derived.cat, [(m, "weight") for m in layers]))
            b = (derived.register(self.root, Derived(derived.cat, [(m, "bias") for m in layers]))
                 if has_bias else None)
            d = self._derived[layers] = (w, b)
        return d

    def _stacked_projection(self, x, layers) -> tuple | None:
        """``[layer(x) for layer in layers]`` as one matmul over their stacked weights (views of
        its output), or None when the layers are not plain Linears this can take."""
        d = self._stacked(x, layers)
        if d is None:
            return None
        w, b = d
        out = F.linear(x, w.get(), b.get() if b is not None else None)
        return out.split([m.weight.shape[0] for m in layers], dim=-1)

    def _context_projection(self, x, layers) -> tuple | None:
        """The same for a cross-attention's keys and values, kept per context tensor
        (``derived.PerInput``): a pipeline passes one context to every step of a call."""
        d = self._stacked(x, layers)
        if d is None or x.requires_grad:
            return None
        key = ("context", layers)
        per = self._derived.get(key)
        if per is None:
            w, b = d
            refs = [(w, "value")] + ([(b, "value")] if b is not None else [])
            per = self._derived[key] = derived.register(
                self.root, derived.PerInput(derived.linear, refs, [w] + ([b] if b else [])))
        return per.get(x).split([m.weight.shape[0] for m in layers], dim=-1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        fused_gn = (attn.group_norm is not None and input_ndim == 4
                    and hidden_states.dtype in DTYPES)
        if fused_gn:
            hidden_states = ops.group_norm_silu(hidden_states.contiguous(),
                                                *_gn_args(attn.group_norm), silu=False)
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length,
                                                         batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1,
                                                 attention_mask.shape[-1])
        if attn.group_norm is not None and not fused_gn:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if self.fused_projections and encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif (encoder_hidden_states is None and (stacked := self._stacked_projection(
                hidden_states, (attn.to_q, attn.to_k, attn.to_v))) is not None):
            query, key, value = stacked     # self-attention: q, k, v in one matmul
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if self.fused_projections:
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            elif (stacked := self._context_projection(encoder_hidden_states,
                                                      (attn.to_k, attn.to_v))) is not None:
                key, value = stacked        # cross-attention: k and v, once per context
            else:
                key = attn.to_k(encoder_hidden_states)
                value = attn.to_v(encoder_hidden_states)
        hidden_states = self.product(attn, query, key, value, attention_mask, batch_size)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


    @staticmethod
    def product(attn, query, key, value, attention_mask, batch_size):
        """The attention of projected (B, L, H*D) queries, keys and values over attn's heads
        (its norm_q / norm_k, then fastdiff.attention or SDPA): (B, L, H*D), before to_out."""
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if (head_dim > MAX_HEAD_DIM or query.dtype not in DTYPES
                or attention_backend(query) == "sdpa"):
            if head_dim > MAX_HEAD_DIM:
                log_once(f"attention head dim {head_dim} > {MAX_HEAD_DIM}: SDPA used")
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            out = ops.attention(query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        return out.to(query.dtype)


class FastdiffFusedAttnProcessor(FastdiffAttnProcessor):
    """diffusers' FusedAttnProcessor2_0 (after ``fuse_qkv_projections``) on the fused ops."""
    fused_projections = True


def _replacement(m):
    """The fastdiff processor for Attention ``m``, or why its processor is kept."""
    from diffusers.models import attention_processor as ap

    proc = m.processor
    kind = {ap.AttnProcessor: FastdiffAttnProcessor, ap.AttnProcessor2_0: FastdiffAttnProcessor,
            ap.FusedAttnProcessor2_0: FastdiffFusedAttnProcessor}.get(type(proc))
    if kind is None:
        return None, (f"attention processor {type(proc).__name__} kept (only diffusers' default "
                      "processors are replaced)")
    if not getattr(m, "scale_qk", True):
        return None, "Attention with scale_qk=False kept"
    return kind, None


def patch_attention(root: nn.Module, state) -> tuple[int, list[str]]:
    """Gives every Attention in ``root`` with a default processor the fastdiff one; records the
    processor it had in ``state.processors``. Returns (how many, reasons for those kept)."""
    from diffusers.models.attention_processor import Attention

    n, kept = 0, []
    for m in root.modules():
        if not isinstance(m, Attention) or isinstance(m.processor, FastdiffAttnProcessor):
            continue
        kind, reason = _replacement(m)
        if kind is None:
            kept.append(reason)
            continue
        state.processors.append((m, m.processor))
        m.set_processor(kind(getattr(root, "_orig_mod", root)))
        n += 1
    return n, kept


def patch_modules(root: nn.Module, state) -> tuple[dict, list[str]]:
    """Patches every ResnetBlock2D, BasicTransformerBlock, GEGLU, Attention and conv_norm_out +
    conv_act pair in ``root``, recording what it set in ``state`` (``patched``: (module,
    attribute) pairs; ``processors``).
    Returns the counts and the reasons for what was left alone."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.embeddings import Timesteps
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D

    up_blocks = (CrossAttnUpBlock2D, UpBlock2D)
    counts = dict.fromkeys(COUNTS, 0)
    kept = []
    base = getattr(root, "_orig_mod", root)          # (under torch.compile: the model itself)
    bank = TembBank(base)
    state.patched.append((base, derived.ATTR))       # (restore drops the derived tensors)
    for m in root.modules():
        if isinstance(m, ResnetBlock2D) and "forward" not in m.__dict__:
            reason = _resnet_supported(m)
            if reason:
                kept.append(reason + ": diffusers' forward kept")
                continue
            m.forward = Patched(m, _resnet_forward, bank)
            bank.resnets.append(m)
            state.patched.append((m, "forward"))
            counts["resnets"] += 1
        if type(m) in up_blocks and "forward" not in m.__dict__:
            m.forward = Patched(m, _up_block_forward)
            state.patched.append((m, "forward"))
            counts["up_blocks"] += 1
        if type(m) is GEGLU and "forward" not in m.__dict__:   # (subclasses may change forward)
            m.forward = Patched(m, _geglu_forward)
            state.patched.append((m, "forward"))
            counts["geglu"] += 1
        if type(m) is Timesteps and "forward" not in m.__dict__:
            m.forward = Patched(m, _timesteps_forward, {})
            state.patched.append((m, "forward"))
            counts["timesteps"] += 1
        if (type(m) is Transformer2DModel and m.is_input_continuous
                and "_get_output_for_continuous_inputs" not in m.__dict__):
            m._operate_on_continuous_inputs = Patched(m, _transformer_input, bank)
            m._get_output_for_continuous_inputs = Patched(m, _transformer_output, bank)
            state.patched += [(m, "_operate_on_continuous_inputs"),
                              (m, "_get_output_for_continuous_inputs")]
            counts["transformers"] += 1
        if type(m) is BasicTransformerBlock and "forward" not in m.__dict__:
            m.forward = Patched(m, _transformer_block_forward)
            state.patched.append((m, "forward"))
            counts["transformer_blocks"] += 1
        norm, act = getattr(m, "conv_norm_out", None), getattr(m, "conv_act", None)
        if (isinstance(norm, nn.GroupNorm) and isinstance(act, nn.SiLU)
                and "forward" not in norm.__dict__):
            norm.forward = Patched(norm, _norm_out_forward)
            act.forward = Patched(act, _identity_forward)
            state.patched += [(norm, "forward"), (act, "forward")]
            counts["norm_out"] += 1
    counts["attention"], more = patch_attention(root, state)
    return counts, kept + more
