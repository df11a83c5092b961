"""The last decoder block on the rows the loss reads: keys and values everywhere, everything else at the labels.

    from daemon.train import lastblock
    lastblock.install(base)                           # once per loaded model: False where the block is not one it knows
    rows, valid = lastblock.label_rows(keep)          # keep [B, T]: positions whose hidden state reaches the loss
    hidden = decoder(**inputs, label_rows=rows)       # [B, m, hidden]: row b's selected positions, in order
    hidden[valid]                                     # == decoder(**inputs).last_hidden_state[keep]

With logits only where labels are (daemon.train.step), the last block's output at a
prompt position reaches nothing: no logit is taken there and no later block reads it.
Only that block's keys and values are needed at every position (later positions attend
to them). So the last block computes its input norm, keys and values for all positions,
and its queries, attention, output projection, residual, second norm and MLP only at the
positions the loss reads. In a decoder of L blocks with a share p of positions in the
prompt, that saves about p / L of the products of the forward and the backward (a
prompt/completion set with p = 0.5 and 8 blocks: about 6%), and nothing in the result:
each selected row is computed exactly as the full block computes it.

Which blocks: the Llama-family block transformers writes for llama, mistral, qwen2 and
qwen3 (input_layernorm → self_attn(q, k, v, o; Qwen3's per-head q_norm and k_norm) →
residual → post_attention_layernorm → mlp → residual), with transformers' SDPA
attention (or traind's fp32-short-rows variant of it), whose masks are boolean or None.
The step checks the shortcut on the loaded model against the full block before using
it (daemon.train.step.fast_paths); any other block, or attention implementation
(flash attention's variable-length rows), keeps its own forward. Only the instance's
forward is replaced: without `label_rows` it is the block's own.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # whose decoder block has the structure described above
ATTENTIONS = ("sdpa", "sdpa_fp32_short_rows")  # boolean-or-None masks (the second: daemon.train.precision.ATTENTION)


def label_rows(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [B, m], valid [B, m]) for `keep` [B, T]: each row's kept positions in order, then filler positions
    (computed, never read) up to m, the most any row keeps (at least 1)."""
    counts = keep.sum(dim=1)
    m = max(1, int(counts.max()))
    # A stable sort of "not kept" puts each row's kept positions first, in their order.
    rows = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :m]
    valid = torch.arange(m, device=keep.device)[None, :] < counts[:, None]
    return rows, valid


def install(model: Any) -> bool:
    """Give the last block of `model` (a transformers causal LM, not the PEFT wrapper) the `label_rows`
    path. False (and unchanged) where its block is not one this module knows."""
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return False
    try:
        block = model.get_decoder().layers[-1]
    except (AttributeError, IndexError, TypeError):
        return False
    attn = getattr(block, "self_attn", None)
    needed = (block, ("input_layernorm", "post_attention_layernorm", "mlp")), \
        (attn, ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
    if attn is None or any(not hasattr(obj, name) for obj, names in needed for name in names):
        return False
    rotary = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if rotary is None:
        return False
    if getattr(block, "_traind_last_block", False):
        return True
    own = block.forward

    def forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = kwargs.pop("label_rows", None)
        if rows is None:
            return own(hidden_states, *args, **kwargs)
        if args:
            raise TypeError("the last block's label rows need keyword arguments")
        return _selected(self, rotary, hidden_states, rows, **kwargs)

    block.forward = types.MethodType(forward, block)
    block._traind_last_block = True
    return True


def _gather(t: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """`t`'s entries at `rows` [B, m] along `dim` (1 or 2), its batch dimension broadcast to B first."""
    b, m = rows.shape
    t = t.expand(b, *t.shape[1:])
    shape = list(t.shape)
    shape[dim] = m
    index = rows.view(b, *([1] * (dim - 1)), m, *([1] * (t.dim() - dim - 1))).expand(shape)
    return torch.gather(t, dim, index)


def _selected(block: Any, rotary: Any, hidden_states: torch.Tensor, rows: torch.Tensor,
              attention_mask: torch.Tensor | None = None, position_embeddings: Any = None, **kwargs: Any) -> torch.Tensor:
    """The block at `rows` only: [B, m, hidden]. Keys and values from every position, as the full block."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = block.self_attn
    implementation = attn.config._attn_implementation
    if implementation not in ATTENTIONS:
        raise NotImplementedError(f"the last block on label rows needs SDPA attention, not {implementation}")
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise NotImplementedError("the last block on label rows does not fill a cache")
    b, t, _ = hidden_states.shape
    m, d = rows.shape[1], attn.head_dim
    x = block.input_layernorm(hidden_states)
    x_sel = _gather(x, rows, 1)
    q = attn.q_proj(x_sel).view(b, m, -1, d)
    k = attn.k_proj(x).view(b, t, -1, d)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = rotary(q, q, _gather(cos, rows, 1), _gather(sin, rows, 1))
    k, _ = rotary(k, k, cos, sin)
    if attention_mask is None:  # transformers found plain causal rows: query p sees keys 0..p
        mask = torch.arange(t, device=rows.device)[None, None, None, :] <= rows[:, None, :, None]
    elif attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
        mask = _gather(attention_mask, rows, 2)
    else:
        raise NotImplementedError(f"the last block on label rows takes a boolean 4-d mask, not {attention_mask.dtype}")
    out, _ = ALL_ATTENTION_FUNCTIONS[implementation](
        attn, q, k, v, mask, dropout=getattr(attn, "attention_dropout", 0.0) if attn.training else 0.0, scaling=attn.scaling,
        sliding_window=getattr(attn, "sliding_window", None))
    h = _gather(hidden_states, rows, 1) + attn.o_proj(out.reshape(b, m, -1).contiguous())
    return h + block.mlp(block.post_attention_layernorm(h))
