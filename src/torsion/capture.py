"""Activation capture at every layer: components ``resid``, ``attn``, ``mlp``.

Forward hooks read each block's output (``resid``) and its attention and MLP sub-block
outputs (what is added to the residual stream), and reduce them to the requested
positions inside the hook, so a batch never holds more than ``[batch, n_layers, d_model]``
per component and position. Only the decoder runs: capture needs no logits.

Example::

    acts = capture_batch(lm, ["How do I bake bread?"])
    acts["resid"]["last"].shape      # [1, n_layers, d_model]
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from torsion.conventions import COMPONENTS, LAYER_INDEXING, POSITIONS
from torsion.errors import TorsionError
from torsion.models import LoadedModel, chat_prompt, post_instruction_length
from torsion.tensorfile import RowWriter


def output_tensor(output: object) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def encode(lm: LoadedModel, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Chat-template and left-pad a batch; position ids count real tokens only."""
    texts = [chat_prompt(lm.tokenizer, p) for p in prompts]
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch["input_ids"].to(lm.device), "attention_mask": mask.to(lm.device),
            "position_ids": position_ids.to(lm.device)}


@contextmanager
def recording(lm: LoadedModel, components: Sequence[str], positions: Sequence[str],
              n_post: int) -> Iterator[dict[str, dict[str, list[Tensor | None]]]]:
    """Hooks that store ``[batch, d_model]`` float32 per component, position and layer."""
    store = {c: {p: [None] * lm.n_layers for p in positions} for c in components}
    handles = []

    def make_hook(component: str, layer: int):
        def hook(_module, _inputs, output):
            hidden = output_tensor(output)
            for position in positions:
                if position == "last":
                    value = hidden[:, -1, :]
                else:  # post_instruction: mean over the template tokens after the user message
                    value = hidden[:, -n_post:, :].float().mean(1)
                store[component][position][layer] = value.detach().float().cpu()
        return hook

    try:
        for component in components:
            for layer in range(lm.n_layers):
                module = lm.layout.component_module(component, layer)
                handles.append(module.register_forward_hook(make_hook(component, layer)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def capture_batch(lm: LoadedModel, prompts: Sequence[str], *, components: Sequence[str] = COMPONENTS,
                  positions: Sequence[str] = ("last",), n_post: int | None = None) -> dict[str, dict[str, Tensor]]:
    """Capture one batch: ``{component: {position: [batch, n_layers, d_model]}}`` in float32."""
    n_post = n_post or post_instruction_length(lm.tokenizer)
    inputs = encode(lm, prompts)
    with recording(lm, components, positions, n_post) as store:
        lm.layout.decoder(**inputs, use_cache=False)
    return {c: {p: torch.stack(store[c][p], dim=1) for p in positions} for c in components}


def tensor_name(component: str, position: str, primary: str = "last") -> str:
    """``resid`` for the primary position, ``post_instruction/resid`` for another."""
    return component if position == primary else f"{position}/{component}"


def prompts_sha256(prompts: Sequence[str]) -> str:
    """sha256 of the ordered prompt list: of the newline-joined sha256 hex digests of each exact UTF-8 text.

    Any change to a prompt's text (whitespace included: the chat template sees it) or to the
    order changes it.
    """
    digests = "\n".join(hashlib.sha256(prompt.encode("utf-8")).hexdigest() for prompt in prompts)
    return hashlib.sha256(digests.encode("ascii")).hexdigest()


def capture_to_file(lm: LoadedModel, prompts: Sequence[str], path: Path, *, components: Sequence[str] = COMPONENTS,
                    positions: Sequence[str] = POSITIONS, batch_size: int = 16) -> Path:
    """Capture every prompt into ``path`` (safetensors), resuming a killed capture.

    Tensors are ``[n_prompts, n_layers, d_model]`` float32, rows in ``prompts`` order, named
    by ``tensor_name``. The file's metadata records the conventions and
    :func:`prompts_sha256` of ``prompts``; a killed capture resumes only when the metadata is
    identical, so a changed prompt list (even of the same length) starts over instead of
    resuming into rows that belong to other prompts.
    """
    n, shape = len(prompts), (len(prompts), lm.n_layers, lm.d_model)
    names = {(c, p): tensor_name(c, p, positions[0]) for c in components for p in positions}
    n_post = post_instruction_length(lm.tokenizer)
    metadata = {
        "layer_indexing": LAYER_INDEXING,
        "primary_position": positions[0],
        "positions": ",".join(positions),
        "components": ",".join(components),
        "post_instruction_tokens": str(n_post),
        "model_id": lm.model_id,
        "dtype": "float32",
        "prompts_sha256": prompts_sha256(prompts),
    }
    with RowWriter(path, {name: shape for name in names.values()}, metadata) as writer:
        bar = tqdm(total=n, initial=writer.rows_done, desc="capture", unit="prompt")
        for start in range(writer.rows_done, n, batch_size):
            batch = capture_batch(lm, prompts[start:start + batch_size], components=components,
                                  positions=positions, n_post=n_post)
            writer.write(start, {names[c, p]: batch[c][p].numpy() for (c, p) in names})
            bar.update(len(batch[components[0]][positions[0]]))
        bar.close()
    return path


def load_activations(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read ``activations.safetensors``: tensors by name, and the file's metadata."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise TorsionError(f"{path} does not exist; finish the run's capture stage (re-run `torsion run`), or run "
                           "again into a new directory if the file was removed")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except SafetensorError as error:
        raise TorsionError(f"{path} is not a readable safetensors file ({error}); capture again by running "
                           "`torsion run` into a new directory") from None
