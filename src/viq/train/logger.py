"""The record of a training run: ``metrics.jsonl`` in the run directory, always, and TensorBoard and
Weights & Biases when the recipe asks for them (``train.trackers``). Only rank 0 writes; the logger of
every other rank does nothing.

``metrics.jsonl`` holds one JSON object per line, in step order, with a ``kind``:

* ``"train"``, every ``train.log_every`` optimizer steps and at the run's last step: ``step``,
  ``steps`` (how many steps the record covers: those after the previous multiple of ``log_every``),
  ``loss`` and each weighted loss term (``text``, ``distill``, ``recon``, ``commit``, ``pixel``) and
  ``grad_norm`` (before clipping), all means over the ``steps`` steps; ``lr`` (``{group: rate}``, the
  rates the step used); ``samples_per_s`` and, for stages with an LLM, ``tokens_per_s``, over the
  covered steps; ``time`` (seconds of the run so far, resumed runs included) and ``wall_time`` (Unix
  time); for stages that quantize, ``code_usage``, ``code_perplexity`` and ``code_entropy_bits`` of the
  last 20 steps' codes, and per code slot of a patch ``code_usage_slot<j>`` / ``code_entropy_bits_slot<j>`` /
  ``code_perplexity_slot<j>``
  (a warning is logged once if usage falls below ``train.collapse_usage``).
* ``"eval"``, at each validation: ``step`` and the results of :func:`viq.train.evaluate.evaluate`.
  When the stage reconstructs, the first ``train.log_images`` validation images and their
  reconstructions (side by side) are written to ``images/step-<step>/<i>.png`` and sent to the
  trackers.

The full per-step history (every step, whatever ``log_every``) stays in the engine and in each
checkpoint; the log is derived from it, so resuming from the checkpoint of step *s* first drops the
records and image folders after *s* and then writes what an uninterrupted run would have written
(TensorBoard purges its events after *s*; W&B continues the same run id).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from viq._io import append_line, atomic_write
from viq.train.config import TrainConfig
from viq.train.losses import loss_names

log = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "IMAGES_DIR", "RunLogger", "learning_rates", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
IMAGES_DIR = "images"
#: the run's W&B id, kept so that a resumed run continues the same W&B run
WANDB_ID_FILE = "wandb-run-id"
#: per-step values averaged over the steps a record covers (besides every loss of the loss table)
AVERAGED = ("loss", "grad_norm")
#: per-step values taken from the record's own step
AT_STEP = ("lr", "time", "code_usage", "code_perplexity", "code_entropy_bits")


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current rate of each module group of ``optimizer`` (a group's decayed and non-decayed
    parameters share one rate; groups without a name are numbered)."""
    rates: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        name = str(group.get("name", i)).removesuffix(".no_decay")
        rates.setdefault(name, float(group["lr"]))
    return rates


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (all, or those of one ``kind``: ``"train"`` or
    ``"eval"``), in file order. FileNotFoundError if there is no such file, ValueError naming the
    line if one is not a JSON object."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        where = "no such run directory" if not Path(run_dir).exists() else f"no {METRICS_FILE} in it"
        raise FileNotFoundError(f"{run_dir}: {where}")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: invalid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        if kind is None or record.get("kind", "train") == kind:
            records.append(record)
    return records


def _window_record(window: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``train`` record of the history entries ``window`` (consecutive steps, the last one the
    record's step)."""
    last = window[-1]
    record: dict[str, Any] = {"kind": "train", "step": last["step"], "steps": len(window)}
    for key in (*loss_names(), *AVERAGED):
        if key in last:
            record[key] = sum(h[key] for h in window) / len(window)
    seconds = sum(h.get("step_time", 0.0) for h in window)
    for rate in ("samples_per_s", "tokens_per_s"):
        if rate in last:
            done = sum(h[rate] * h.get("step_time", 0.0) for h in window)
            record[rate] = done / seconds if seconds > 0 else last[rate]
    for key in AT_STEP:
        if key in last:
            record[key] = last[key]
    for key in last:  # per-slot code usage (code_usage_slot<j>, code_entropy_bits_slot<j>): a window already
        if key.startswith(("code_usage_slot", "code_entropy_bits_slot", "code_perplexity_slot")):
            record[key] = last[key]
    record["wall_time"] = time.time()
    return record


def _image_grid(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Each (image, reconstruction) pair of ``(3, H, W)`` pixels in [-1, 1] -> one ``(H, 2W + 2, 3)``
    uint8 picture: the image, a 2-pixel white gap, the reconstruction."""
    out = []
    for image, recon in pairs:
        image, recon = image.detach().float().cpu(), recon.detach().float().cpu()
        gap = torch.ones(3, image.shape[1], 2)
        row = torch.cat([image, gap, recon[:, : image.shape[1], : image.shape[2]]], dim=2)
        out.append(((row.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous())
    return out


class RunLogger:
    """Rank 0's record of a run in ``out_dir`` (see the module docstring); a logger built with
    ``main=False`` writes nothing.

    Args:
        out_dir: the run directory (``train.output_dir``).
        cfg: the recipe: ``train.log_every``, ``train.trackers``, ``train.wandb_project``,
            ``train.wandb_mode``, ``train.max_steps``.
        main: whether this process writes (rank 0).
        start_step: the step the run starts from (a resumed checkpoint's, else 0): records and
            image folders after it are dropped first.
    """

    def __init__(self, out_dir: str | Path, cfg: TrainConfig, *, main: bool, start_step: int = 0) -> None:
        self.out_dir, self.cfg, self.main = Path(out_dir), cfg, main
        self.every = cfg.train.log_every
        self.tb = self.wandb = None
        if not main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        trackers = set(cfg.train.trackers)
        if "tensorboard" in trackers:
            self.tb = _tensorboard(self.out_dir, start_step)
        if "wandb" in trackers:
            self.wandb = _wandb(self.out_dir, cfg, resumed=start_step > 0)

    # ------------------------------------------------------------------------------ writing

    def log_step(self, history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """After each optimizer step, with the run's history so far (one entry per step, the last
        one this step's): writes and returns the ``train`` record when one is due, else None."""
        step = history[-1]["step"]
        if step % self.every and step != self.cfg.train.max_steps:
            return None
        first = (step - 1) // self.every * self.every  # the previous multiple of log_every
        window = [h for h in history if h["step"] > first]
        record = _window_record(window)
        self._write(record)
        return record

    def log_eval(
        self, result: dict[str, Any], step: int, reconstructions: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
    ) -> dict[str, Any]:
        """A validation's results at ``step``, and (image, reconstruction) pixel pairs to show."""
        record = {"kind": "eval", "step": step, **{k: v for k, v in result.items() if k != "step"}}
        self._write(record)
        if self.main and reconstructions:
            self._images(_image_grid(reconstructions), step)
        return record

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    # ------------------------------------------------------------------------------ internals

    def _write(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        append_line(self.out_dir / METRICS_FILE, json.dumps(record))
        step, kind = record["step"], record["kind"]
        scalars = {}
        for key, value in record.items():
            if key in ("kind", "step", "steps", "wall_time"):
                continue
            if isinstance(value, dict):  # lr per group
                scalars.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[f"{kind}/{key}"] = value
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def _images(self, pictures: list[torch.Tensor], step: int) -> None:
        from PIL import Image

        folder = self.out_dir / IMAGES_DIR / f"step-{step:08d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, picture in enumerate(pictures):
            Image.fromarray(picture.numpy()).save(folder / f"{i}.png")
            if self.tb is not None:
                self.tb.add_image(f"eval/reconstruction_{i}", picture, step, dataformats="HWC")
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log(
                {
                    "eval/reconstructions": [
                        wandb.Image(p.numpy(), caption=f"{i}: image | reconstruction") for i, p in enumerate(pictures)
                    ]
                },
                step=step,
            )

    def _truncate(self, start_step: int) -> None:
        """Keep the records and image folders of steps up to ``start_step`` only."""
        path = self.out_dir / METRICS_FILE
        if path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(record, dict) and record.get("step", 0) <= start_step:
                    kept.append(line + "\n")
            atomic_write(path, "".join(kept).encode())
        images = self.out_dir / IMAGES_DIR
        if images.is_dir():
            for folder in images.glob("step-*"):
                if folder.name.removeprefix("step-").isdigit() and int(folder.name.removeprefix("step-")) > start_step:
                    shutil.rmtree(folder, ignore_errors=True)


def _tensorboard(out_dir: Path, start_step: int):
    """A SummaryWriter in ``out_dir/tensorboard`` that hides events after ``start_step`` (a
    resumed run rewrites them); None, with a warning, when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning(
            "train.trackers names tensorboard but it is not installed (pip install tensorboard): only %s is written",
            METRICS_FILE,
        )
        return None
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)


def _wandb(out_dir: Path, cfg: TrainConfig, *, resumed: bool):
    """A W&B run (``train.wandb_mode``: offline writes under ``out_dir/wandb`` and needs no network;
    ``wandb sync`` uploads it later) named after the run directory; a resumed run continues the W&B
    run of the run directory. None, with a warning, when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        log.warning(
            "train.trackers names wandb but it is not installed (pip install wandb): only %s is written", METRICS_FILE
        )
        return None
    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    if run_id is None:
        run_id = secrets.token_hex(4)  # W&B ids: letters and digits, unique per project
        atomic_write(id_file, (run_id + "\n").encode())
    return wandb.init(
        project=cfg.train.wandb_project,
        name=out_dir.resolve().name,
        dir=str(out_dir),
        mode=cfg.train.wandb_mode,
        config=cfg.to_dict(),
        id=run_id,
        resume="allow",
    )
