"""Weights as memshard reads them: safetensors only, and checked against the model they are loaded into.

A planted pickle (``.bin``, ``.pt``) beside a model is never opened; a tensor whose shape does not fit
the model's config is refused with its name, before any run or server uses it. Ray-free.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from memshard.io.storage import Storage

StateDict = dict[str, torch.Tensor]
Shapes = Mapping[str, Sequence[int]]

# The only weight files memshard reads; anything else beside them (a planted pickle `.bin`) is never opened.
WEIGHTS_SAFETENSORS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100 * 2**20


class WeightsError(ValueError):
    """Weights that do not fit the model they are loaded into, or are not stored as safetensors."""


def shapes_of(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in torch.as_tensor(v).shape) for k, v in state.items()}


def check_shapes(expected: Shapes, got: Shapes, source: str, target: str = "the model") -> None:
    """Raise WeightsError naming ``source`` and the first mismatching tensor unless ``got`` fits ``expected``."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(got)) if tuple(got[k]) != tuple(expected[k])]
    if not (missing or extra or wrong):
        return
    parts = []
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more tensor(s) of the wrong shape)" if len(wrong) > 1 else ""
        parts.append(f"tensor {k!r} has shape {tuple(got[k])} but {target} needs {tuple(expected[k])}{more}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) {target} needs are missing (first: {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} tensor(s) {target} does not have (first: {extra[0]!r})")
    raise WeightsError(
        f"{source}: weights do not fit {target}: " + "; ".join(parts) + " (another run's or model's weights, "
        "or a config or model directory changed since they were written?)"
    )


def load_checked(module: torch.nn.Module, state: Mapping[str, Any], source: str) -> None:
    """``module.load_state_dict(state)``, but a mismatch is a WeightsError naming ``source`` and the tensor."""
    check_shapes(shapes_of(module.state_dict()), shapes_of(state), source, f"the {type(module).__name__}")
    module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})


def model_shapes(cls: type, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of ``cls(**config)``, built on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        model = cls.from_config(dict(config)) if hasattr(cls, "from_config") else cls(**config)
    return shapes_of(model.state_dict())


def safetensors_shapes(store: Storage, rel: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header only (8 + header bytes read, local or remote)."""
    with store.open_input(rel) as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= _MAX_HEADER:
            raise WeightsError(f"{store.uri_of(rel)} is not a safetensors file")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise WeightsError(f"{store.uri_of(rel)} is not a safetensors file (unreadable header)") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_model_dir(store: Storage, rel: str, what: str) -> None:
    """Check the diffusers model directory ``rel`` of ``store`` before anything loads it.

    Its weights must be safetensors (memshard never unpickles a ``.bin``: a planted one is
    ignored, and a directory holding only pickle weights is refused), and their tensor
    shapes must be those of the architecture its ``config.json`` describes.
    """
    import diffusers

    where = store.uri_of(rel)
    if not store.exists(f"{rel}/config.json"):
        raise WeightsError(f"{what}: {where}/config.json is missing")
    conf = json.loads(store.read_text(f"{rel}/config.json"))
    names = store.listdir(rel)
    index = next((f"{n}.index.json" for n in WEIGHTS_SAFETENSORS if f"{n}.index.json" in names), None)
    files = [n for n in WEIGHTS_SAFETENSORS if n in names]
    if index is None and not files:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        found = f"; found {', '.join(pickles)}, which memshard never loads (pickle can run code)" if pickles else ""
        raise WeightsError(f"{what}: no safetensors weights in {where}{found}")
    got: dict[str, tuple[int, ...]] = {}
    if index is not None:
        weight_map = json.loads(store.read_text(f"{rel}/{index}")).get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            if not shard.endswith(".safetensors"):
                raise WeightsError(f"{what}: {where}/{index} points at {shard}, not a safetensors file")
            got.update(safetensors_shapes(store, f"{rel}/{shard}"))
    else:
        got = safetensors_shapes(store, f"{rel}/{files[0]}")
    cls_name = conf.get("_class_name")
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        return  # not a diffusers model we can rebuild (a transformers text encoder...): safetensors is enough
    try:
        expected = model_shapes(cls, {k: v for k, v in conf.items() if not k.startswith("_")})
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{what}: {where}/config.json does not describe a valid {cls_name} ({exc})") from None
    check_shapes(expected, got, f"{what}: weights in {where}", f"the {cls_name} of its config.json")
