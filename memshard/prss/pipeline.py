"""Served text-to-image pipelines: diffusers-compatible, with PRSS sampling built in.

Two layouts, one sampling implementation (:class:`PRSSMixin`):

* fine-tuned Stable-Diffusion-style models are served as a plain ``StableDiffusionPipeline``
  directory (``StableDiffusionPipeline.from_pretrained`` loads it, with the fine-tuned UNet);
  :class:`PRSSStableDiffusionPipeline` loads the same directory and adds the PRSS arguments;
* pixel-space models conditioned on MiniLM (the embedded demo) have no stock diffusers
  pipeline, so they are served as :class:`MemshardTextToImagePipeline` (unet, scheduler,
  text_encoder, tokenizer; ``vae`` optional), loaded with its own ``from_pretrained``.

The PRSS call keeps the usual signature (``prompt``, ``num_inference_steps``,
``guidance_scale``, ``generator``, ``num_images_per_prompt``, ``output_type``) and adds
``prss``/``lambda_ss``/``lambda_pr``/``tau``/``prss_mode``/``candidates``; the per-image
PRSS report comes back as ``output.report``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from PIL import Image

from memshard.models.sampling import to_uint8
from memshard.models.text import TextCond


@dataclass
class T2IOutput:
    """Images (PIL list, or an (N, H, W, C) float array in [0, 1] for output_type='np') and the PRSS report."""

    images: Any
    report: list[dict[str, Any]] = field(default_factory=list)


class PRSSMixin:
    """Prompt encoding, the UNet call and the sampling loop shared by both served layouts."""

    uses_text_mask: bool = True

    # -- model access --------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> TextCond:
        """Token states + mask, padded to the tokenizer's max length (as in training)."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        dev = self._device
        with torch.no_grad():
            states = self.text_encoder(
                input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev)
            ).last_hidden_state
        mask = tok["attention_mask"].bool().to(dev)
        if not self.uses_text_mask:
            mask = torch.ones_like(mask)
        return TextCond(states.float(), mask)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        """The UNet's prediction for a batch (the sampler's ``eps_fn``)."""
        mask = None if bool(cond.mask.all()) else cond.mask
        return self.unet(x, t, encoder_hidden_states=cond.states.to(x.dtype), encoder_attention_mask=mask).sample

    def _latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config.in_channels
        s = self.unet.config.sample_size
        s = s if isinstance(s, int) else s[0]
        return c, s, s

    def initial_noise(
        self, n: int, seeds: Sequence[int] | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x_T for ``n`` images: from per-image ``seeds`` (image i depends only on seeds[i]) or ``generator``."""
        shape = self._latent_shape()
        if seeds is not None:
            if len(seeds) != n:
                raise ValueError(f"{len(seeds)} seeds for {n} images")
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        else:
            noise = torch.randn((n, *shape), generator=generator)
        return noise.to(self._device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        prss: bool = True,
        lambda_ss: float = 1.0,
        lambda_pr: float = 3.0,
        tau: float = 5.0,
        prss_mode: str = "prss",
        candidates: Any = "perturb",
        num_candidates: int = 25,
        detect_step: int = 1,
        restart: bool = False,
        pr_profile: Sequence[float] | None = None,
        seeds: Sequence[int] | None = None,
        mitigation: str | None = None,
        mitigation_params: dict[str, Any] | None = None,
        **unused: Any,
    ) -> T2IOutput:
        """Generate images for ``prompt`` with CFG, PRSS by default (``prss=False``: the undefended pipeline).

        ``candidates``: "perturb" (rule-based paraphrases), a provider ``(prompt, n) -> list``, or
        one list per image. ``mitigation`` instead runs a baseline (memshard.prss.mitigations) through
        plain CFG. ``seeds`` gives each image its own noise seed, independent of the batch.
        ``height``/``width`` are accepted for signature compatibility and must match the model.
        """
        from memshard.prss.candidates import make_provider
        from memshard.prss.mitigations import mitigate
        from memshard.prss.sampler import PRSSOptions, sample

        for key in ("height", "width"):
            if unused.get(key) not in (None, self._pixel_size()):
                raise ValueError(f"{key}={unused[key]}: this model generates {self._pixel_size()}px images")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        x_T = latents.to(self._device) if latents is not None else self.initial_noise(len(prompts), seeds, generator)
        sched = dict(self.scheduler.config)
        if mitigation not in (None, "none"):
            x, report = mitigate(
                mitigation, self.eps, self.encode_prompts, sched, prompts, x_T, num_inference_steps,
                guidance_scale=guidance_scale, seed=list(seeds) if seeds is not None else 0,
                **(mitigation_params or {}),
            )  # fmt: skip
        else:
            opts = PRSSOptions(
                enabled=prss, mode=prss_mode, guidance_scale=guidance_scale, lambda_ss=lambda_ss,
                lambda_pr=lambda_pr, tau=tau, num_candidates=num_candidates, detect_step=detect_step,
                restart=restart, pr_profile=None if pr_profile is None else tuple(pr_profile),
            )  # fmt: skip
            provider = make_provider(candidates) if isinstance(candidates, str) else candidates
            x, report = sample(self.eps, self.encode_prompts, sched, prompts, x_T, num_inference_steps, opts, provider)
        images = self._decode(x)
        if output_type == "pt":
            return T2IOutput(images, report)
        if output_type == "np":
            return T2IOutput(images.permute(0, 2, 3, 1).numpy(), report)
        return T2IOutput(to_pil(images), report)

    def _pixel_size(self) -> int:
        side = self._latent_shape()[1]
        vae = getattr(self, "vae", None)
        return side * (2 ** (len(vae.config.block_out_channels) - 1)) if vae is not None else side

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [0, 1] (N, C, H, W)."""
        vae = getattr(self, "vae", None)
        if vae is not None:
            x = vae.decode(x / vae.config.scaling_factor).sample
        return ((x.clamp(-1, 1) + 1) / 2).float().cpu()


class MemshardTextToImagePipeline(PRSSMixin, DiffusionPipeline):
    """Text-to-image pipeline of a memshard run trained from scratch (pixel or latent space)."""

    _optional_components: ClassVar[list[str]] = ["vae"]
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, unet: Any, scheduler: Any, text_encoder: Any, tokenizer: Any, vae: Any = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)


class PRSSStableDiffusionPipeline(PRSSMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with PRSS: loads any SD-layout directory (e.g. a served fine-tune).

    SD's CLIP encoder is used without an attention mask, as SD was trained and samples.
    """

    uses_text_mask = False


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = to_uint8(images)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def write_served_t2i(out: str, unet: Any, scheduler_config: dict[str, Any], model_cfg: dict[str, Any]) -> None:
    """Save a served text-to-image pipeline directory for ``unet`` (already holding the served weights).

    ``model_cfg`` is the run's ``model`` config section (as a dict).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model_cfg.get("pipeline"):
        pipe = StableDiffusionPipeline.from_pretrained(
            model_cfg["pipeline"],
            unet=unet,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            low_cpu_mem_usage=False,
            use_safetensors=True,
        )
        pipe.save_pretrained(out, safe_serialization=True)
        return
    from transformers import AutoModel, AutoTokenizer

    from memshard.models.text import MINILM, minilm_dir

    name = model_cfg.get("text_encoder", MINILM)
    path = str(minilm_dir()) if name == MINILM else name
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = int(model_cfg.get("max_text_length", 77))
    pipe = MemshardTextToImagePipeline(
        unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config),
        text_encoder=AutoModel.from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=True),
        tokenizer=tokenizer,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def load_served_t2i(local_dir: str, unet_subfolder: str = "unet") -> PRSSMixin:
    """Load a served text-to-image directory with the PRSS-capable class matching its layout.

    Every component is read from safetensors only (``use_safetensors=True``: a pickle ``.bin``
    planted in the directory is never unpickled), and the UNet's tensor shapes are checked
    against its config first (:class:`~memshard.io.weights.WeightsError` naming the tensor).
    """
    import json

    from memshard.io.storage import Storage
    from memshard.io.weights import check_model_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_model_dir(Storage(local_dir), unet_subfolder, f"served model {local_dir}")
    index = json.loads(open(os.path.join(local_dir, "model_index.json")).read())
    cls = PRSSStableDiffusionPipeline if index.get("_class_name") == "StableDiffusionPipeline" else None
    kwargs: dict[str, Any] = {}
    if unet_subfolder != "unet":
        from diffusers import UNet2DConditionModel

        kwargs["unet"] = UNet2DConditionModel.from_pretrained(
            os.path.join(local_dir, unet_subfolder), use_safetensors=True
        )
    if cls is None:
        return MemshardTextToImagePipeline.from_pretrained(local_dir, use_safetensors=True, **kwargs)
    return cls.from_pretrained(
        local_dir, safety_checker=None, requires_safety_checker=False, use_safetensors=True, **kwargs
    )
