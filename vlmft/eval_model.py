"""Which model ``vlmft eval`` evaluates: the recipe's base model, an HF folder (a run's
``final/``), or a vlmft checkpoint (``{output_dir}/checkpoints/stepN``, any ZeRO stage: its fp32
weights are put together with DeepSpeed's own zero_to_fp32 reader into the base model)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

from .checkpoint import COMPLETE
from .recipe import ModelConfig


def resolve(cfg: ModelConfig, path: str | None) -> tuple[ModelConfig, Path | None, str]:
    """(the model config whose folder gives config, processor and weights; the checkpoint whose
    weights replace them, or None; the label predictions are filed under). ValueError (one
    line) for a path that is neither."""
    if path is None:
        return cfg, None, "base"
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return dataclasses.replace(cfg, name_or_path=str(p)), None, p.name
    if (p / COMPLETE).is_file():
        return cfg, p, p.name
    raise ValueError(f"--model: '{path}' is neither an HF model folder (config.json) nor a complete vlmft "
                     "checkpoint (COMPLETE); give a run's final/ or checkpoints/stepN folder")


def load(cfg: ModelConfig, checkpoint: Path | None):
    """The HF model (fp32, cache off as in training), with the checkpoint's weights if given."""
    from .model import load_model

    model = load_model(cfg, "fp32")
    if checkpoint is not None:
        missing, unexpected = model.load_state_dict(checkpoint_state(checkpoint), strict=False)
        if missing or unexpected:
            raise ValueError(f"--model: {checkpoint} does not fit {cfg.name_or_path}: "
                             f"{len(missing)} missing, {len(unexpected)} unexpected weights "
                             f"(e.g. {(missing or unexpected)[0]}); evaluate it with the recipe that trained it")
    return model.eval()


def checkpoint_state(path: Path) -> dict:
    """The HF model's state dict from a vlmft checkpoint (the engine wrapped forward.LossModule,
    whose HF model is ``model``)."""
    import torch

    if any(path.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):   # its progress notes; stdout may be --json
            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:   # ZeRO stage 0: the whole module in one file
        state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k.removeprefix("model."): v.float() for k, v in state.items()}
