"""Outlier-suppressing attention: clipped softmax and gated attention.

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing Outliers by Helping
Attention Heads Do Nothing" (NeurIPS 2023). Heads that learn to "do nothing" push their
softmax towards exact zeros, which needs huge logits, which come from huge residual-stream
activations: the outliers that break static W8A8. Both changes give a head a cheap way to
output (almost) nothing:

clipped softmax
    ``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)`` with ``zeta >= 1``, ``gamma <= 0``.
    Probabilities below ``-gamma / (zeta - gamma)`` become exact zeros (and get no
    gradient), so a head can attend to nothing with finite logits. The paper's runs use
    ``zeta = 1`` and ``gamma = -alpha / T`` for the training sequence length ``T`` (BERT-base:
    ``gamma = -0.025`` at ``T = 128``, i.e. ``alpha = 3.2``).

    *Fixed* ``gamma`` assumes rows of about ``T`` keys. A uniform row of ``n`` keys is
    ``1/n``; it is clipped to zero only while ``1/n < alpha / (T + alpha)``, i.e.
    ``n > T/alpha + 1``. Rows much shorter than ``T`` (short sentences, the first rows of
    a causal model, small images) can therefore never do nothing, and rows much longer
    than ``T`` lose real attention mass. The *length-normalised* form takes ``gamma =
    -alpha / n`` from each row's actual number of valid keys ``n`` (padding and causal
    masks excluded), which keeps the clipping threshold at the same place relative to the
    uniform row for every length.

gated attention
    ``out_h = sigmoid(G_h(x)) * softmax(q k^T / sqrt(d)) v`` per head ``h``, before the
    output projection, with ``x`` the attention block's input. Gates: ``per-head`` (one
    ``Linear(d_head -> 1)`` per head on head ``h``'s chunk of ``x``; the default), ``mlp``
    (``d_head -> d_head/4 -> ReLU -> 1`` per head) and ``linear`` (one
    ``Linear(d_model -> H)``). Bias starts at ``logit(init)``. *Fine-tuning* mode starts
    the gate's (last) weights at zero and scales the output by ``1/init``, so a pretrained
    model is unchanged at step 0; :func:`fold_gate_scales` moves that constant into the
    output projection before export.

Both work as module swaps that keep every pretrained weight: Hugging Face BERT-family
self-attention (``query``/``key``/``value`` modules) and timm ``Attention`` (``qkv`` +
``proj``). Applying one and then the other composes (a clipped *and* gated model). Exported
graphs use standard ops only: Softmax -> Mul -> Add -> Clip, and Sigmoid -> Mul for the gate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from deploykit.errors import UserError

GATE_KINDS = ("per-head", "mlp", "linear")


# ----------------------------------------------------------------------------- clipped softmax
@dataclass
class SoftmaxSpec:
    """Which softmax an attention module uses. ``alpha``/``seq_len`` give ``gamma = -alpha/seq_len``."""
    zeta: float = 1.0
    gamma: float | None = None          # fixed gamma (<= 0)
    alpha: float | None = None          # with seq_len: fixed gamma; with length_normalised: per row
    seq_len: int | None = None
    length_normalised: bool = False

    def validate(self) -> None:
        if self.zeta < 1.0:
            raise UserError(f"clipped softmax zeta {self.zeta} is below 1", fix="use zeta >= 1 (the paper uses 1)")
        if self.length_normalised:
            if self.alpha is None or self.alpha < 0:
                raise UserError("the length-normalised clipped softmax needs alpha >= 0",
                                fix="e.g. {name: clipped-softmax, alpha: 3.2, length_normalised: true}")
            return
        if self.gamma is None:
            if self.alpha is None or not self.seq_len:
                raise UserError("clipped softmax needs gamma, or alpha with seq_len, or length_normalised",
                                fix="e.g. {name: clipped-softmax, alpha: 3.2, seq_len: 128} (gamma = -alpha/T)")
            if self.alpha < 0 or self.seq_len < 1:
                raise UserError("clipped softmax needs alpha >= 0 and seq_len >= 1", fix="check the transform")
        elif self.gamma > 0:
            raise UserError(f"clipped softmax gamma {self.gamma} is positive", fix="use gamma <= 0, e.g. -0.025")

    def fixed_gamma(self) -> float | None:
        if self.length_normalised:
            return None
        return float(self.gamma) if self.gamma is not None else -float(self.alpha) / float(self.seq_len)


def clipped_softmax(scores: torch.Tensor, *, zeta: float = 1.0, gamma: float | torch.Tensor = 0.0,
                    dim: int = -1) -> torch.Tensor:
    """``clip((zeta - gamma) * softmax(scores) + gamma, 0, 1)``; ``gamma`` may broadcast per row."""
    probs = torch.softmax(scores, dim=dim)
    return torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0)


def valid_keys(mask: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
    """Number of keys each query row may attend to, shaped to broadcast against ``scores``."""
    if mask is None:
        return torch.full((1,) * scores.dim(), float(scores.shape[-1]), dtype=scores.dtype, device=scores.device)
    if mask.dtype == torch.bool:
        allowed = mask
    else:   # additive: 0 where allowed, a large negative number (finfo.min or -inf) where masked
        allowed = mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed.expand(*allowed.shape[:-1], scores.shape[-1])
    return allowed.to(scores.dtype).sum(dim=-1, keepdim=True).clamp(min=1.0)


# ----------------------------------------------------------------------------- gates
def logit(p: float) -> float:
    p = min(max(float(p), 1e-7), 1.0 - 1e-7)
    return math.log(p / (1.0 - p))


@dataclass
class GateSpec:
    kind: str = "per-head"
    init: float = 0.25                  # pi_init: the gate's starting probability
    fine_tune: bool = False             # start as identity (zero weights, output x 1/init)

    def validate(self) -> None:
        if self.kind not in GATE_KINDS:
            raise UserError(f"unknown gate '{self.kind}'", fix=f"use one of {', '.join(GATE_KINDS)}")
        if not 0.0 < self.init < 1.0:
            raise UserError(f"gate init {self.init} is outside (0, 1)", fix="use e.g. init: 0.25")


class HeadGate(nn.Module):
    """``x (B, T, d_model) -> sigmoid(G(x)) (B, H, T, 1)``, one gate value per head and token."""

    def __init__(self, spec: GateSpec, num_heads: int, head_dim: int, d_model: int):
        super().__init__()
        spec.validate()
        self.kind, self.num_heads, self.head_dim = spec.kind, num_heads, head_dim
        self.scale = 1.0 / spec.init if spec.fine_tune else 1.0     # folded into the output projection at export
        bias = torch.full((num_heads,), logit(spec.init))
        if spec.kind == "per-head":
            self.weight = nn.Parameter(self._init_weight((num_heads, head_dim), head_dim, spec.fine_tune))
            self.bias = nn.Parameter(bias)
        elif spec.kind == "mlp":
            hidden = max(head_dim // 4, 1)
            self.weight1 = nn.Parameter(self._init_weight((num_heads, head_dim, hidden), head_dim, False))
            self.bias1 = nn.Parameter(torch.zeros(num_heads, hidden))
            self.weight2 = nn.Parameter(self._init_weight((num_heads, hidden), hidden, spec.fine_tune))
            self.bias = nn.Parameter(bias)
        else:
            self.linear = nn.Linear(d_model, num_heads)
            if spec.fine_tune:
                nn.init.zeros_(self.linear.weight)
            with torch.no_grad():
                self.linear.bias.copy_(bias)

    @staticmethod
    def _init_weight(shape: tuple[int, ...], fan_in: int, zero: bool) -> torch.Tensor:
        if zero:
            return torch.zeros(shape)
        bound = 1.0 / math.sqrt(fan_in)             # nn.Linear's default init range
        return torch.empty(shape).uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.kind == "linear":
            logits = self.linear(x)                                            # (B, T, H)
        else:
            xh = x.reshape(b, t, self.num_heads, self.head_dim)               # head h's chunk of x
            if self.kind == "per-head":
                logits = (xh * self.weight).sum(dim=-1) + self.bias            # (B, T, H)
            else:
                hidden = torch.relu(torch.einsum("bthd,hde->bthe", xh, self.weight1) + self.bias1)
                logits = (hidden * self.weight2).sum(dim=-1) + self.bias
        return torch.sigmoid(logits).transpose(1, 2).unsqueeze(-1)            # (B, H, T, 1)


# ----------------------------------------------------------------------------- attention swaps
def key_validity(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor | None:
    """(B, T) True for real keys, from an additive or boolean (B, 1, T|1, T) mask."""
    if mask is None:
        return None
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed.expand(batch, -1, -1, length)
    return allowed.any(dim=-2)[:, 0]


@dataclass
class MixerSpec:
    """Replace dense softmax attention by deploykit's ops (plugins/), keeping q, k, v and weights.

    ``neighborhood``: a window of ``kernel_size`` keys (dilation, causal per axis). On a
    timm ViT the patch tokens attend over the 2-D patch grid; the class (and register)
    tokens are prefix tokens that keep dense attention over every token, and patch tokens
    do not see them (stated, not hidden: the class token still gathers the whole image).
    On text it is a 1-D window placed on each sentence's own length (padding never
    changes a sentence's output).
    ``linear``: kernelized attention with ``feature`` (elu1 | relu | sigmoid), optionally
    causal with per-head ``decay``; the softmax scale is not used.
    """
    kind: str = "neighborhood"
    kernel_size: list[int] | int = 7
    dilation: list[int] | int = 1
    causal: bool = False
    feature: str = "elu1"
    decay: list[float] | float | None = None
    grid: list[int] | None = None        # ViT patch grid (set by the swap)
    prefix_tokens: int = 0               # ViT class/register tokens (set by the swap)

    def validate(self) -> None:
        if self.kind not in ("neighborhood", "linear"):
            raise UserError(f"unknown attention swap '{self.kind}'", fix="use neighborhood or linear")
        if self.kind == "linear":
            from deploykit.plugins.linear_attention import FEATURE_MAPS

            if self.feature not in FEATURE_MAPS:
                raise UserError(f"unknown feature map '{self.feature}'", fix=f"use one of {', '.join(FEATURE_MAPS)}")

    def apply(self, q, k, v, mask, scale: float) -> torch.Tensor:
        b, _, t, _ = q.shape
        valid = key_validity(mask, b, t, q.device)
        if self.kind == "linear":
            from deploykit.plugins.linear_attention.onnx_function import linear_attention_op

            return linear_attention_op(q, k, v, feature=self.feature, causal=self.causal, decay=self.decay,
                                       key_mask=valid)
        from deploykit.plugins.neighborhood_attention.onnx_function import na_op

        if self.grid is None:
            return na_op(q, k, v, self.kernel_size, self.dilation, self.causal, scale=scale, key_mask=valid)
        p = self.prefix_tokens
        gx, gy = self.grid
        patches = [x[:, :, p:].reshape(b, x.shape[1], gx, gy, x.shape[-1]) for x in (q, k, v)]
        out = na_op(*patches, self.kernel_size, self.dilation, self.causal, scale=scale)
        out = out.reshape(b, q.shape[1], gx * gy, v.shape[-1])
        if p == 0:
            return out
        prefix = torch.softmax(q[:, :, :p] @ k.transpose(-1, -2) * scale, dim=-1) @ v     # dense rows for prefix
        return torch.cat([prefix, out], dim=2)


# ----------------------------------------------------------------------------- the shared core
class AttentionCore(nn.Module):
    """``softmax(q k^T * scale + mask) v`` with an optional clipped softmax and head gate."""

    def __init__(self, num_heads: int, head_dim: int, d_model: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.d_model, self.scale = num_heads, head_dim, d_model, scale
        self.softmax_spec: SoftmaxSpec | None = None
        self.gate: HeadGate | None = None
        self.mixer: MixerSpec | None = None          # neighborhood / linear attention instead of dense softmax
        # Replaces softmax(scores): e.g. BiViT's binary attention (recipes/binarize.py) or
        # top-k attention (recipes/sparsify.py). A callable ``(masked_scores, mask) -> probs``
        # (an nn.Module when it has parameters or statistics to keep).
        self.prob_fn = None

    def set_softmax(self, spec: SoftmaxSpec) -> None:
        spec.validate()
        self.softmax_spec = spec

    def set_gate(self, spec: GateSpec) -> None:
        self.gate = HeadGate(spec, self.num_heads, self.head_dim, self.d_model)

    def set_probabilities(self, fn) -> None:
        """Use ``fn(masked_scores, mask) -> probs`` instead of the softmax (one at a time)."""
        if self.mixer is not None or self.softmax_spec is not None or self.prob_fn is not None:
            raise UserError("binary / top-k attention replaces the softmax, so it does not combine with clipped "
                            "softmax, an attention swap or another probability transform",
                            fix="list one of them in model.options.transforms")
        self.prob_fn = fn

    def set_mixer(self, spec: MixerSpec) -> None:
        if self.prob_fn is not None:
            raise UserError("an attention swap does not combine with binary / top-k attention",
                            fix="list either the swap or the probability transform")
        if self.softmax_spec is not None:
            raise UserError("clipped softmax and an attention swap do not combine (the swapped ops use their own "
                            "normalisation)", fix="list either clipped-softmax or the attention swap")
        self.mixer = spec

    def probabilities(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        spec = self.softmax_spec
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
                else scores + mask
        if self.prob_fn is not None:
            return self.prob_fn(scores, mask)
        if spec is None:
            return torch.softmax(scores, dim=-1)
        gamma = spec.fixed_gamma()
        if gamma is None:
            gamma = -float(spec.alpha) / valid_keys(mask, scores)
        return clipped_softmax(scores, zeta=spec.zeta, gamma=gamma)

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, dropout: nn.Module | None = None) -> torch.Tensor:
        """``x`` (B, T, d_model): the block input (for the gate); q, k, v (B, H, T, d); -> (B, H, T, d)."""
        if self.mixer is not None:
            context = self.mixer.apply(q, k, v, mask, self.scale)
        else:
            probs = self.probabilities(torch.matmul(q, k.transpose(-1, -2)) * self.scale, mask)
            if dropout is not None:
                probs = dropout(probs)
            context = torch.matmul(probs, v)
        if self.gate is not None:
            gate = self.gate(x)
            context = context * (gate * self.gate.scale if self.gate.scale != 1.0 else gate)
        return context


# ----------------------------------------------------------------------------- module swaps
def is_hf_self_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value")) and \
        hasattr(module, "num_attention_heads") and hasattr(module, "attention_head_size")


def is_timm_attention(module: nn.Module) -> bool:
    return isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "proj", None), nn.Linear) \
        and hasattr(module, "num_heads") and hasattr(module, "head_dim")


class HFSelfAttention(nn.Module):
    """Replaces a Hugging Face BERT-family ``*SelfAttention`` (encoder self-attention only);
    keeps its ``query``/``key``/``value`` modules (and so the pretrained weights and names)."""

    def __init__(self, old: nn.Module):
        super().__init__()
        if getattr(old, "position_embedding_type", "absolute") not in ("absolute", None):
            raise UserError(f"relative position embeddings ({old.position_embedding_type}) are not supported "
                            "by the attention transforms", fix="use a model with absolute position embeddings")
        self.query, self.key, self.value = old.query, old.key, old.value
        self.dropout = old.dropout if isinstance(getattr(old, "dropout", None), nn.Dropout) else nn.Dropout(0.0)
        self.num_attention_heads = int(old.num_attention_heads)
        self.attention_head_size = int(old.attention_head_size)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.core = AttentionCore(self.num_attention_heads, self.attention_head_size,
                                  int(self.query.in_features), self.attention_head_size ** -0.5)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None \
                or kwargs.get("encoder_hidden_states") is not None:
            raise NotImplementedError("deploykit attention transforms cover encoder self-attention only")
        b, t, _ = hidden_states.shape
        shape = (b, t, self.num_attention_heads, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        context = self.core(hidden_states, q, k, v, attention_mask, self.dropout)
        return context.transpose(1, 2).reshape(b, t, self.all_head_size), None


def is_hf_decoder_attention(module: nn.Module) -> bool:
    """A Llama-style causal self-attention (Llama, Mistral, Qwen2, SmolLM2, ...): q/k/v/o
    projections, grouped key-value heads, rotary position embeddings applied by its module."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
        and hasattr(module, "num_key_value_groups") and hasattr(module, "head_dim") \
        and bool(getattr(module, "is_causal", False))


class HFDecoderAttention(nn.Module):
    """Replaces a Llama-style ``*Attention`` of a causal LM (prefill, no KV cache); keeps its
    ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (and so the weights and their names). RoPE is
    the model's own ``apply_rotary_pos_emb``; grouped key-value heads are repeated to every
    query head before the core, as the eager attention does. The causal and padding mask
    arrives additive, (B, 1, T, T)."""

    def __init__(self, old: nn.Module):
        super().__init__()
        import sys

        rotary = getattr(sys.modules.get(type(old).__module__), "apply_rotary_pos_emb", None)
        if rotary is None:
            raise UserError(f"{type(old).__name__} has no apply_rotary_pos_emb beside it",
                            fix="the decoder attention transforms support Llama-style models (Llama, Mistral, Qwen2)")
        self._rotary = rotary
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = old.q_proj, old.k_proj, old.v_proj, old.o_proj
        self.head_dim = int(old.head_dim)
        self.num_key_value_groups = int(old.num_key_value_groups)
        self.num_heads = int(self.q_proj.out_features // self.head_dim)
        self.is_causal = True
        self.layer_idx = getattr(old, "layer_idx", None)
        self.core = AttentionCore(self.num_heads, self.head_dim, int(self.q_proj.in_features),
                                  float(getattr(old, "scaling", self.head_dim ** -0.5)))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, *args, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise NotImplementedError("deploykit's decoder attention transforms cover prefill only (no KV cache): "
                                      "call the model with use_cache=False")
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rotary(q, k, cos, sin)
        if self.num_key_value_groups > 1:
            k = k.repeat_interleave(self.num_key_value_groups, dim=1)
            v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        context = self.core(hidden_states, q, k, v, attention_mask)
        return self.o_proj(context.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)), None


class TimmAttention(nn.Module):
    """Replaces timm's ``Attention`` (ViT, DeiT, ...); keeps every submodule and its name."""

    def __init__(self, old: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim = int(old.num_heads), int(old.head_dim)
        self.attn_dim = int(getattr(old, "attn_dim", self.num_heads * self.head_dim))
        self.qkv, self.proj = old.qkv, old.proj
        self.q_norm = getattr(old, "q_norm", nn.Identity())
        self.k_norm = getattr(old, "k_norm", nn.Identity())
        self.attn_drop = getattr(old, "attn_drop", nn.Dropout(0.0))
        self.norm = getattr(old, "norm", nn.Identity())
        self.gate = getattr(old, "gate", None)            # timm's own element-wise gate, if built with one
        self.proj_drop = getattr(old, "proj_drop", nn.Dropout(0.0))
        self.core = AttentionCore(self.num_heads, self.head_dim, int(self.qkv.in_features),
                                  float(getattr(old, "scale", self.head_dim ** -0.5)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        if is_causal:
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            attn_mask = causal if attn_mask is None else (attn_mask & causal if attn_mask.dtype == torch.bool
                                                          else attn_mask.masked_fill(~causal, float("-inf")))
        elementwise_gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = self.core(x, q, k, v, attn_mask, self.attn_drop)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if elementwise_gate is not None:
            out = out * elementwise_gate
        return self.proj_drop(self.proj(out))


def swap_all(root: nn.Module) -> list[nn.Module]:
    """Every attention module of ``root`` as a deploykit module (swapping where needed)."""
    ours: list[nn.Module] = []
    for parent_name, parent in list(root.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (HFSelfAttention, TimmAttention, HFDecoderAttention)):
                ours.append(child)
            elif is_hf_decoder_attention(child):
                new = HFDecoderAttention(child)
                new.train(child.training)
                setattr(parent, child_name, new)
                ours.append(new)
            elif is_hf_self_attention(child):
                new = HFSelfAttention(child)
                new.train(child.training)
                setattr(parent, child_name, new)
                ours.append(new)
            elif is_timm_attention(child):
                new = TimmAttention(child)
                new.train(child.training)
                setattr(parent, child_name, new)
                ours.append(new)
    if not ours:
        raise UserError("no attention module found to transform",
                        fix="the attention transforms support Hugging Face BERT-family encoders, timm ViTs and "
                            "Llama-style decoders")
    hf_config = getattr(getattr(root, "model", root), "config", None)
    if hf_config is not None and hasattr(hf_config, "_attn_implementation"):
        try:
            hf_config._attn_implementation = "eager"        # the mask then arrives additive, as the core expects
        except Exception:  # noqa: BLE001 - read-only in some versions; the core handles bool masks too
            pass
    return ours


def attention_modules(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if isinstance(m, (HFSelfAttention, TimmAttention, HFDecoderAttention))]


def apply_clipped_softmax(root: nn.Module, spec: SoftmaxSpec) -> int:
    spec.validate()
    modules = swap_all(root)
    for m in modules:
        m.core.set_softmax(spec)
    return len(modules)


def apply_gated_attention(root: nn.Module, spec: GateSpec, *, seed: int | None = None) -> int:
    spec.validate()
    modules = swap_all(root)
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for m in modules:
            m.core.set_gate(spec)
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    return len(modules)


def apply_attention_swap(root: nn.Module, spec: MixerSpec) -> int:
    spec.validate()
    modules = swap_all(root)
    patch_embed = getattr(root, "patch_embed", None)
    for m in modules:
        m_spec = MixerSpec(**asdict(spec))
        if isinstance(m, TimmAttention) and spec.kind == "neighborhood":
            if patch_embed is None or not hasattr(patch_embed, "grid_size"):
                raise UserError("a 2-D neighborhood needs the ViT's patch grid", fix="use a timm VisionTransformer")
            m_spec.grid = [int(g) for g in patch_embed.grid_size]
            m_spec.prefix_tokens = int(getattr(root, "num_prefix_tokens", 0))
        if isinstance(m, HFDecoderAttention) and not m_spec.causal:
            raise UserError(f"{spec.kind} attention on a causal language model must be causal",
                            fix=f"set causal: true on the {spec.kind}-attention transform (a sliding window of "
                                "kernel_size tokens ending at each token)")
        m.core.set_mixer(m_spec)
    return len(modules)


@torch.no_grad()
def fold_gate_scales(root: nn.Module) -> int:
    """Multiply each fine-tuning gate's ``1/init`` into the output projection's weight (in place).

    ``proj(s * g * ctx) = (s W) (g * ctx) + b``: exact up to float rounding. A timm module
    with a norm between attention and projection keeps its scale (the norm is not linear).
    Returns the number of folded modules.
    """
    folded = 0
    for parent in root.modules():
        targets = []
        if isinstance(getattr(parent, "self", None), HFSelfAttention) and \
                isinstance(getattr(getattr(parent, "output", None), "dense", None), nn.Linear):
            targets.append((parent.self, parent.output.dense))
        if isinstance(parent, TimmAttention) and isinstance(parent.norm, nn.Identity):
            targets.append((parent, parent.proj))
        for attn, proj in targets:
            gate = attn.core.gate
            if gate is not None and gate.scale != 1.0:
                proj.weight.mul_(gate.scale)
                gate.scale = 1.0
                folded += 1
    return folded


def needs_folding(root: nn.Module) -> bool:
    return any(m.core.gate is not None and m.core.gate.scale != 1.0 for m in attention_modules(root))
