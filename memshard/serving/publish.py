"""Publishing a run's served model: RUN/served as a diffusers pipeline directory, swapped in atomically.

Kept out of :mod:`memshard.io.rundir` (the run directory's layout and commit protocol) because it
builds diffusers pipelines, memshard's text-to-image one included: the run directory sits below the
models, and this sits above both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from memshard.io.rundir import RunDir, json_default
from memshard.io.weights import StateDict, load_checked


def publish_served(
    run: RunDir,
    unet_config: dict[str, Any],
    scheduler_config: dict[str, Any],
    raw: StateDict,
    ema: StateDict | None,
    info: dict[str, Any],
    model_cfg: dict[str, Any] | None = None,
) -> None:
    """Write RUN/served as a pipeline directory (EMA weights when present; raw UNet beside).

    Unconditional / class-conditional models: a DDPMPipeline. Text-conditional ones
    (``model_cfg`` given, the run's ``model`` section): a StableDiffusionPipeline for
    fine-tuned SD-style pipelines, else memshard's text-to-image pipeline. Built in a
    temporary directory and swapped in whole: a reader never sees half a served model.
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

    source = f"run {run.uri}: weights of round {info.get('round')}"
    tmp = tempfile.mkdtemp(prefix="memshard-served-")
    try:
        if model_cfg is not None and model_cfg.get("text_conditional"):
            from memshard.prss.pipeline import write_served_t2i

            unet = UNet2DConditionModel(**unet_config)
            load_checked(unet, ema if ema is not None else raw, source)
            write_served_t2i(tmp, unet, scheduler_config, model_cfg)
        else:
            unet = UNet2DModel(**unet_config)
            load_checked(unet, ema if ema is not None else raw, source)
            pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler_config))
            pipe.save_pretrained(tmp, safe_serialization=True)
        if ema is not None:
            load_checked(unet, raw, source)
            unet.save_pretrained(os.path.join(tmp, "unet_raw"), safe_serialization=True)
        with open(os.path.join(tmp, "memshard.json"), "w") as fh:
            json.dump(dict(info, weights="ema" if ema is not None else "raw"), fh, indent=2, default=json_default)
        run.swap_in(tmp, "served")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
