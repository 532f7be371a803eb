"""Weight orthogonalisation: directional ablation baked into the weights (methods.md, "Steering").

``W ← W − v̂ v̂ᵀ W`` on every matrix that writes into the residual stream (attention
out-projection, MLP down-projection, embedding), so no write has a component along ``v̂``: the
edited model gives the logits of :func:`torsion.steer.ablate_direction` without hooks, and
:func:`save_model_dir` stores it as an ordinary Hugging Face model directory. A per-block weight
``w_l`` (the ``weighted-ablation`` kernel, as heretic bakes it into ``o_proj``/``down_proj``) edits
``W ← W − w_l v̂ v̂ᵀ W``, the weight form of the partial ablation ``h' = h − w_l (h·v̂) v̂``;
:func:`orthogonalize_method` bakes an ablation method at a strength.

Example::

    edited = orthogonalize_weights(lm, refusal_axis)           # a deep copy; lm is unchanged
    save_model_dir(edited, "out/abliterated")
    AutoModelForCausalLM.from_pretrained("out/abliterated")   # same logits as the hooks
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from torsion.errors import TorsionError
from torsion.models import LoadedModel, find_layout
from torsion.steer import WRITES, _check_alpha, unit_directions


def _project_out_rows(weight: Tensor, unit: Tensor, share: float = 1.0) -> None:
    """``W ← W − s v̂ (v̂ᵀ W)`` in place for ``weight [d_model, n_in]``, in float64."""
    w, u = weight.double(), unit.double().to(weight.device)
    weight.copy_(w - share * torch.outer(u, u @ w))


def _project_out_columns(weight: Tensor, unit: Tensor, share: float = 1.0) -> None:
    """``E ← E − s (E v̂) v̂ᵀ`` in place for ``weight [n_rows, d_model]`` (embedding rows), in float64."""
    w, u = weight.double(), unit.double().to(weight.device)
    weight.copy_(w - share * torch.outer(w @ u, u))


def _untie_lm_head(model: nn.Module) -> None:
    """Give the LM head its own copy of the (still original) embedding matrix.

    With tied weights, editing the embedding would also edit the unembedding, which hook
    ablation never touches (it acts on writes into the residual stream, not on the read-out).
    The config's ``tie_word_embeddings`` is set to ``False`` so a saved copy reloads untied.
    """
    head = model.get_output_embeddings()
    if head is None or head.weight is not model.get_input_embeddings().weight:
        return
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


@torch.no_grad()
def orthogonalize_weights(lm: LoadedModel, direction: object, *, weight: float | list[float] = 1.0,
                          writes: tuple[str, ...] = WRITES, inplace: bool = False) -> LoadedModel:
    """Project ``v̂`` out of the embedding, every attention out-projection and MLP down-projection.

    For ``nn.Linear`` weights ``[d_model, n_in]``: ``W ← W − w_l v̂ (v̂ᵀ W)``, and a bias
    ``b ← b − w_l v̂ (v̂·b)``. For the embedding ``E [vocab, d_model]``: ``E ← E − w_0 (E v̂) v̂ᵀ``.
    ``weight`` (one share, or one per block) and ``writes`` are
    :func:`torsion.steer.ablate_direction`'s, so the edit matches those hooks.
    Block ``l`` uses ``v̂_l`` and the embedding uses ``v̂_0``, as in
    :func:`torsion.steer.ablate_direction`. A tied LM head is untied first (it keeps the
    original weights). Gemma 2/3 normalise the sub-block outputs after ``o_proj``/``down_proj``,
    so the edit would not be equivalent to ablation there: those models are refused.

    Args:
        direction: ``[d_model]`` (every layer) or ``[n_layers, d_model]``.
        inplace: edit ``lm`` itself instead of a deep copy.

    Returns:
        The edited model; its ``weights_sha256`` is ``None`` because the weights no longer
        match the file the hash describes.
    """
    units = unit_directions(lm, direction)
    shares = _check_alpha(weight, tuple(range(lm.n_layers)), what="weight")
    layout = lm.layout
    writers = [(getattr(a, "o_proj", None), getattr(m, "down_proj", None)) for a, m in zip(layout.attn, layout.mlp)]
    if any(o_proj is None or down_proj is None for o_proj, down_proj in writers):
        model_type = getattr(lm.model.config, "model_type", "?")
        raise TorsionError(
            f"{model_type} normalises attention and MLP outputs after o_proj/down_proj (post-norm), so "
            "weight orthogonalisation is not equivalent to directional ablation; use steer.ablate_direction"
        )
    model = lm.model if inplace else copy.deepcopy(lm.model)
    edited = lm if inplace else dataclasses.replace(lm, model=model, layout=find_layout(model))
    edited.weights_sha256 = None
    if "embed" in writes and shares[0] != 0.0:
        _untie_lm_head(model)
        _project_out_columns(edited.layout.embed.weight, units[0], shares[0])
    for layer, (attn, mlp) in enumerate(zip(edited.layout.attn, edited.layout.mlp)):
        linears = [attn.o_proj] * ("attn" in writes) + [mlp.down_proj] * ("mlp" in writes)
        for linear in linears if shares[layer] != 0.0 else ():
            _project_out_rows(linear.weight, units[layer], shares[layer])
            if linear.bias is not None:
                _project_out_rows(linear.bias[:, None], units[layer], shares[layer])
    return edited


def orthogonalize_method(lm: LoadedModel, method: object, strength: float = 1.0, *,
                         inplace: bool = False) -> LoadedModel:
    """Bake an ``ablation`` or ``weighted-ablation`` method at ``strength`` into the weights: the same
    directions, per-block shares and writes as its hooks (:meth:`~torsion.steering.ablation.Ablation.apply`)."""
    from torsion.steering.ablation import Ablation

    if not isinstance(method, Ablation):
        raise TorsionError(f"only ablation methods can be baked into the weights, not {method.name}; "
                           "use ablation or weighted-ablation")
    method.validate(lm)
    return orthogonalize_weights(lm, method.unit_source(), weight=method.block_weights(lm, float(strength)),
                                 writes=method.writes(), inplace=inplace)


def save_model_dir(lm: LoadedModel, path: str | Path) -> Path:
    """Save weights, config and tokenizer as a Hugging Face directory ``from_pretrained`` reloads.

    A model loaded from GGUF carries a ``quantization_config`` describing the file it was
    dequantised from; it is dropped, since the saved weights are plain tensors.
    """
    path = Path(path)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
