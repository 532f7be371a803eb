"""Load causal LMs and find their decoder blocks and sub-modules.

A model spec is one of:

- ``embedded:qwen2.5-coder-0.5b`` (the default) or ``embedded:smollm2-135m``;
- a Hugging Face model id (``Qwen/Qwen2.5-7B-Instruct``) or a local model directory;
- a path to a ``.gguf`` file (dequantised by transformers on load).

Example::

    lm = load_model("embedded:smollm2-135m")
    block = lm.layout.blocks[3]          # decoder block 3 (layer 3)
    attn = lm.layout.attn[3]             # its attention sub-block output module
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from torsion import assets
from torsion.conventions import check_blocks
from torsion.errors import TorsionError
from torsion.weights import hub_weights_sha256, weights_sha256

# Where each family keeps its blocks and which sub-module's output is added to the residual
# stream. Gemma 2/3 normalise the sub-block outputs before the residual add, so the added
# tensor is the post-norm's output.
_LAYOUTS: dict[str, tuple[str, str]] = {
    # model_type: (attention output module, mlp output module), both inside the block
    "llama": ("self_attn", "mlp"),
    "mistral": ("self_attn", "mlp"),
    "qwen2": ("self_attn", "mlp"),
    "qwen3": ("self_attn", "mlp"),
    "gemma": ("self_attn", "mlp"),
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
}
_BLOCK_PATHS = ("model.layers", "model.language_model.layers", "transformer.h")


@dataclass(frozen=True)
class BlockLayout:
    """The decoder blocks and the modules whose outputs are the ``attn`` and ``mlp`` components."""

    decoder: nn.Module  # the decoder stack without the LM head (``model.model``)
    blocks: nn.ModuleList
    attn: tuple[nn.Module, ...]
    mlp: tuple[nn.Module, ...]
    embed: nn.Module
    final_norm: nn.Module | None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def component_module(self, component: str, layer: int) -> nn.Module:
        check_blocks(layer, self.n_layers)
        if component == "resid":
            return self.blocks[layer]
        if component == "attn":
            return self.attn[layer]
        if component == "mlp":
            return self.mlp[layer]
        raise TorsionError(f"unknown component {component!r}; choose resid, attn or mlp")


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    module: object = root
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def find_layout(model: nn.Module) -> BlockLayout:
    """Find blocks, attention and MLP outputs for Llama, Mistral, Qwen2/3 and Gemma 1/2/3."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in _LAYOUTS:
        raise TorsionError(
            f"unsupported architecture {model_type!r}: torsion looks for decoder blocks at "
            f"{' or '.join(_BLOCK_PATHS)} with sub-modules for {', '.join(sorted(_LAYOUTS))}; "
            "add the family to torsion.models._LAYOUTS"
        )
    attn_name, mlp_name = _LAYOUTS[model_type]
    for path in _BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList):
            break
    else:
        raise TorsionError(f"no decoder blocks found at {' or '.join(_BLOCK_PATHS)} in {type(model).__name__}")
    decoder = _get(model, path.rsplit(".", 1)[0])
    attn = tuple(_get(b, attn_name) for b in blocks)
    mlp = tuple(_get(b, mlp_name) for b in blocks)
    if any(m is None for m in attn + mlp):
        raise TorsionError(
            f"{model_type} blocks lack {attn_name!r} or {mlp_name!r}; update torsion.models._LAYOUTS"
        )
    return BlockLayout(
        decoder=decoder,
        blocks=blocks,
        attn=attn,
        mlp=mlp,
        embed=model.get_input_embeddings(),
        final_norm=getattr(decoder, "norm", None),
    )


@dataclass
class LoadedModel:
    """A model ready for torsion: weights, tokenizer, layout and identity."""

    model: nn.Module
    tokenizer: object
    layout: BlockLayout
    spec: str
    model_id: str
    weights_sha256: str | None

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def device(self) -> torch.device:
        return self.layout.embed.weight.device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_spec(spec: str) -> tuple[Path | str, str | None, str, str | None]:
    """Map a spec to (from_pretrained source, gguf file name, model id, weights sha256).

    The weights sha256 is known up front for embedded models and GGUF files; for a local
    directory or a Hub id it is None here and :func:`load_model` hashes the weight files
    (:func:`torsion.weights.weights_sha256`) once they are loaded.
    """
    if spec.startswith("embedded:"):
        name = spec.removeprefix("embedded:")
        model = assets.embedded(name)
        if not assets.is_cached(name):
            raise TorsionError(
                f"embedded model {name!r} is not cached; run `torsion assets pull` (needs the "
                "network once)"
            )
        return assets.cached_hf_dir(name), None, spec, model.sha256
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TorsionError(f"GGUF file {spec} does not exist; check the path")
        return path.parent, path.name, str(path), assets.sha256_file(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TorsionError(f"{spec} has no config.json; point --model at a Hugging Face model directory")
        return path, None, str(path.resolve()), None
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, None, spec, None
    raise TorsionError(
        f"unknown model spec {spec!r}; use embedded:qwen2.5-coder-0.5b, embedded:smollm2-135m, "
        "a Hugging Face id (org/name), a local model directory, or a .gguf file"
    )


def load_model(spec: str = f"embedded:{assets.DEFAULT_MODEL}", *, dtype: str = "float32",
               device: str = "cpu") -> LoadedModel:
    """Load a model for capture and steering (eval mode, no gradients).

    Args:
        spec: see the module docstring.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N``, or ``auto`` (a device map that shards a large
            model over all visible GPUs).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise TorsionError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TorsionError(f"--device {device} but no CUDA device is visible; use --device cpu")
    source, gguf_file, model_id, weights_sha = resolve_spec(spec)
    kwargs: dict = {"dtype": _DTYPES[dtype]}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
        hint = "it is not cached and the hub is offline" if offline else str(error).splitlines()[0]
        raise TorsionError(
            f"could not load {spec!r} ({hint}); use a local directory, a .gguf file or an embedded model"
        ) from None
    if weights_sha is None:  # a local directory or a Hub id: hash the weight files it loaded
        weights_sha = weights_sha256(Path(source)) if Path(source).is_dir() else hub_weights_sha256(str(source))
    if device not in ("cpu", "auto"):
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, find_layout(model), spec, model_id, weights_sha)


def chat_prompt(tokenizer, prompt: str | Sequence[Mapping[str, str]]) -> str:
    """Apply the chat template with the generation prompt and thinking disabled.

    ``prompt`` is one user message, or a whole conversation: ``[{"role", "content"}, ...]``
    with system, user and assistant turns. Without a chat template the messages' contents are
    joined by blank lines.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    return "\n\n".join(m["content"] for m in messages)


def post_instruction_length(tokenizer) -> int:
    """Number of template tokens after the user message (methods.md ``post_instruction``).

    The template suffix is the same for every prompt, so it is measured once with a marker.
    A model without a chat template has no post-instruction tokens; the last token is used.
    """
    if not getattr(tokenizer, "chat_template", None):
        return 1
    marker = "torsion-marker-7f3a"
    text = chat_prompt(tokenizer, marker)
    suffix = text[text.rindex(marker) + len(marker):]
    return max(1, len(tokenizer(suffix, add_special_tokens=False)["input_ids"]))
