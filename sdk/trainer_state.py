"""The trainer's half of a training snapshot: the dense model's weights and its optimizer's state.

    DIR/step-00000012/manifest.json        the experts' half (written by the controller and workers)
    DIR/step-00000012/trainer.pt           {"step": 12, "model": dense state_dict, "optimizer": AdamW state_dict}

Written after the experts' half is sealed, to a temporary name renamed into place, so a
snapshot with a `trainer.pt` has both halves of the same step whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from moecluster.workers import snapshot_folders

FILE = snapshot_folders.TRAINER_FILE


@dataclass(frozen=True)
class TrainerState:
    step: int
    path: Path  # the snapshot folder
    model: dict[str, torch.Tensor]
    optimizer: dict


def write(folder: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    folder = Path(folder)
    doc = {"step": step, "model": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
           "optimizer": optimizer.state_dict()}
    partial = folder / f".{FILE}.partial"
    torch.save(doc, partial)
    os.replace(partial, folder / FILE)
    return folder / FILE


def read(folder: str | Path) -> TrainerState:
    """The trainer state in a snapshot folder, or the newest snapshot under `folder` that has one.
    ValueError when there is none, or it does not match its snapshot's step."""
    folder = Path(folder)
    if not (folder / "manifest.json").exists():
        with_state = [s.path for s in snapshot_folders.newest_first(folder) if (s.path / FILE).exists()]
        if not with_state:
            raise ValueError(f"{folder}: no snapshot with a {FILE} (TrainingSession.save or `moectl train "
                             "--save-every` write one; `moectl snapshot` saves the experts only)")
        folder = with_state[0]
    step = snapshot_folders.read(folder).step
    try:
        doc = torch.load(folder / FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{folder}: the experts' snapshot has no {FILE}: `moectl restore` rolls the experts back; "
                         "the dense model then starts from the checkpoint") from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a torn or foreign file
        raise ValueError(f"{folder / FILE}: unreadable ({type(err).__name__}: {err})") from None
    if doc.get("step") != step:
        raise ValueError(f"{folder / FILE} is of step {doc.get('step')}, its snapshot of step {step}")
    return TrainerState(step, folder, doc["model"], doc["optimizer"])
