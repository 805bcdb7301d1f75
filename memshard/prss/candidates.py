"""Candidate prompts for PRSS semantic search (spec section 4): pluggable providers.

The paper precomputes 25 LLM paraphrases per prompt. memshard runs offline without an LLM,
so candidates come from a provider, any callable ``provider(prompt, n) -> list[str]``:

* :class:`ListProvider` -- explicit per-prompt lists (e.g. the paper's precomputed ones);
* :class:`BankProvider` -- the nearest prompts of a prompt bank by sentence-embedding cosine
  similarity (production passes ``TextEncoder.embed``; tests pass a toy embedder);
* :class:`PerturbProvider` -- rule-based, seeded paraphrase-like variants (drop / shuffle /
  synonym / modifier), needing no model and no data.

Providers never return the prompt itself: the search always scores the original anyway
(it is the fallback when no candidate goes below the threshold), so returning it would only
waste a slot of the batched UNet call.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class CandidateProvider(Protocol):
    """Anything that proposes up to ``n`` distinct alternative prompts for ``prompt``."""

    def __call__(self, prompt: str, n: int) -> list[str]: ...


def _norm(text: str) -> str:
    """Comparison key: case- and whitespace-insensitive (so "A  cat" counts as "a cat")."""
    return " ".join(text.lower().split())


def _distinct(items: Sequence[str], exclude: str, n: int) -> list[str]:
    """First ``n`` items, without duplicates and without ``exclude`` (all by :func:`_norm`)."""
    seen = {_norm(exclude)}
    out: list[str] = []
    for item in items:
        key = _norm(item)
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(item)
        if len(out) >= n:
            break
    return out


class ListProvider:
    """Explicit candidates per prompt (a mapping prompt -> list); unknown prompts get none.

    Order is kept (the search takes the *first* candidate under the threshold, so the list
    order is the caller's priority); duplicates and the prompt itself are dropped.
    """

    def __init__(self, lists: Mapping[str, Sequence[str]]) -> None:
        self.lists = {_norm(k): list(v) for k, v in lists.items()}

    def __call__(self, prompt: str, n: int) -> list[str]:
        return _distinct(self.lists.get(_norm(prompt), []), prompt, n)


class BankProvider:
    """The ``n`` prompts of a bank most similar to the query, by cosine of sentence embeddings.

    ``embed`` maps a list of prompts to a (N, D) tensor (normalised or not: rows are
    normalised here). The bank is deduplicated and embedded once, lazily on first use, in
    chunks of ``batch_size`` so a large bank never needs one giant forward pass. Ties keep
    bank order (a stable sort), so results are deterministic.
    """

    def __init__(self, bank: Sequence[str], embed: Callable[[list[str]], torch.Tensor], batch_size: int = 1024) -> None:
        self.bank = _distinct([b.strip() for b in bank], "", len(bank))
        if not self.bank:
            raise ValueError("prompt bank is empty")
        self.embed = embed
        self.batch_size = batch_size
        self._vectors: torch.Tensor | None = None

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        vec = torch.as_tensor(self.embed(prompts)).float().cpu()
        return torch.nn.functional.normalize(vec.reshape(len(prompts), -1), dim=-1)

    @property
    def vectors(self) -> torch.Tensor:
        if self._vectors is None:
            parts = [
                self._encode(self.bank[i : i + self.batch_size]) for i in range(0, len(self.bank), self.batch_size)
            ]
            self._vectors = torch.cat(parts)
        return self._vectors

    def scores(self, prompt: str) -> torch.Tensor:
        """Cosine similarity of ``prompt`` to every bank entry (bank order)."""
        return self.vectors @ self._encode([prompt])[0]

    def __call__(self, prompt: str, n: int) -> list[str]:
        order = torch.sort(self.scores(prompt), descending=True, stable=True).indices.tolist()
        return _distinct([self.bank[i] for i in order], prompt, n)


# A small synonym table: a few common caption words each, enough for paraphrase-like variants.
SYNONYMS: dict[str, list[str]] = {
    "photo": ["picture", "photograph", "image", "shot"],
    "picture": ["photo", "image", "photograph"],
    "image": ["picture", "photo", "depiction"],
    "painting": ["artwork", "canvas", "illustration"],
    "man": ["person", "guy", "gentleman"],
    "woman": ["person", "lady", "girl"],
    "person": ["individual", "figure", "human"],
    "people": ["persons", "folks", "individuals"],
    "girl": ["young woman", "child", "kid"],
    "boy": ["young man", "child", "kid"],
    "dog": ["puppy", "hound", "canine"],
    "cat": ["kitten", "feline", "kitty"],
    "car": ["vehicle", "automobile", "auto"],
    "house": ["home", "building", "cottage"],
    "big": ["large", "huge", "giant"],
    "large": ["big", "huge", "sizable"],
    "small": ["little", "tiny", "compact"],
    "beautiful": ["pretty", "lovely", "gorgeous"],
    "old": ["vintage", "aged", "ancient"],
    "new": ["modern", "fresh", "recent"],
    "red": ["crimson", "scarlet"],
    "blue": ["azure", "navy"],
    "green": ["emerald", "verdant"],
    "white": ["pale", "snowy"],
    "black": ["dark", "ebony"],
    "street": ["road", "avenue", "lane"],
    "city": ["town", "metropolis"],
    "forest": ["woods", "woodland"],
    "sea": ["ocean", "water"],
    "ocean": ["sea", "water"],
    "mountain": ["peak", "hill"],
    "sitting": ["seated", "resting"],
    "standing": ["upright", "posing"],
    "walking": ["strolling", "wandering"],
    "running": ["sprinting", "jogging"],
    "wearing": ["dressed in", "in"],
    "with": ["alongside", "having"],
    "on": ["atop", "upon"],
    "portrait": ["headshot", "likeness"],
    "poster": ["print", "placard"],
    "art": ["artwork", "illustration"],
    "logo": ["emblem", "symbol"],
    "design": ["pattern", "layout"],
    "background": ["backdrop", "setting"],
    "view": ["scene", "vista"],
}

MODIFIERS_BEFORE = ["a photo of", "an image of", "a picture showing", "a depiction of", "an illustration of"]
MODIFIERS_AFTER = [
    "high quality",
    "detailed",
    "in soft light",
    "realistic",
    "wide shot",
    "close-up",
    "digital art",
    "oil painting",
    "watercolor",
    "4k",
]

_WORD = re.compile(r"\S+")


class PerturbProvider:
    """Rule-based paraphrase-like variants: seeded and deterministic per (seed, prompt).

    Each variant applies 1-3 random edits (drop a word, swap two words, replace a word by a
    synonym from :data:`SYNONYMS`, add a modifier before or after). The random generator is
    seeded from ``f"{seed}:{prompt}"`` (a string seed, hashed stably by ``random``), so the
    candidates of a prompt never depend on which other prompts are in the batch or on the
    process's hash salt. Returns ``n`` distinct variants different from the prompt, or fewer
    only if ``max_tries`` edits cannot find that many (very short prompts with large n).
    """

    def __init__(self, seed: int = 0, max_tries: int = 50) -> None:
        self.seed = seed
        self.max_tries = max_tries

    @staticmethod
    def _edit(words: list[str], rng: random.Random) -> list[str]:
        op = rng.choice(["drop", "swap", "synonym", "synonym", "before", "after"])
        words = list(words)
        if op == "drop" and len(words) > 2:
            del words[rng.randrange(len(words))]
        elif op == "swap" and len(words) > 1:
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
        elif op == "synonym":
            options = [i for i, w in enumerate(words) if w.lower().strip(",.;:!?") in SYNONYMS]
            if options:
                i = rng.choice(options)
                key = words[i].lower().strip(",.;:!?")
                words[i] = rng.choice(SYNONYMS[key])
            else:  # nothing to replace: fall back to a modifier so the edit still changes the prompt
                words.append(rng.choice(MODIFIERS_AFTER))
        elif op == "before":
            words = [*rng.choice(MODIFIERS_BEFORE).split(), *words]
        else:
            words.append(rng.choice(MODIFIERS_AFTER))
        return words

    def __call__(self, prompt: str, n: int) -> list[str]:
        rng = random.Random(f"{self.seed}:{prompt}")
        base = _WORD.findall(prompt)
        seen = {_norm(prompt)}
        out: list[str] = []
        for _ in range(max(n, 1) * self.max_tries):
            if len(out) >= n:
                break
            words = base
            for _ in range(rng.randint(1, 3)):
                words = self._edit(words, rng)
            text = " ".join(words)
            if _norm(text) and _norm(text) not in seen:
                seen.add(_norm(text))
                out.append(text)
        return out


def load_bank(path: str | Path) -> list[str]:
    """Prompts of a bank file: Parquet (a ``prompt`` or ``caption`` column) or text (one a line).

    Blank lines / null or empty cells are skipped and duplicates dropped (first kept). Errors
    name the path and the problem: a missing file, a Parquet file without either column
    (listing the columns it has), an unreadable Parquet or non-UTF-8 text file, an empty bank.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt bank {p}: no such file")
    if p.suffix.lower() in {".parquet", ".pq"}:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"prompt bank {p}: not a readable Parquet file ({e})") from e
        column = next((c for c in ("prompt", "caption") if c in schema.names), None)
        if column is None:
            raise ValueError(f"prompt bank {p}: needs a 'prompt' or 'caption' column, has {schema.names}")
        values = pq.read_table(p, columns=[column]).column(column).to_pylist()
        rows = [str(v) for v in values if v is not None]
    else:
        try:
            rows = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt bank {p}: not a UTF-8 text file ({e})") from e
    bank = _distinct([r.strip() for r in rows], "", len(rows))
    if not bank:
        raise ValueError(f"prompt bank {p}: contains no prompts")
    return bank


def make_provider(
    kind: str,
    *,
    bank: Sequence[str] | str | Path | None = None,
    embed: Callable[[list[str]], torch.Tensor] | None = None,
    lists: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
) -> CandidateProvider:
    """The provider named by ``PRSSConfig.candidates`` (perturb | bank | list)."""
    if kind == "perturb":
        return PerturbProvider(seed=seed)
    if kind == "bank":
        if bank is None or embed is None:
            raise ValueError("candidates='bank' needs a prompt bank (prss.bank) and an embedder")
        prompts = load_bank(bank) if isinstance(bank, str | Path) else list(bank)
        return BankProvider(prompts, embed)
    if kind == "list":
        return ListProvider(lists or {})
    raise ValueError(f"unknown candidate provider {kind!r} (perturb | bank | list)")
