"""Run folders: atomic saves, checked loads.

A run folder holds
  config.json        format version, model and training configs, a summary of the run
  model.safetensors  the weights (tied embeddings stored once), step in the metadata
  train_state.pt     everything needed to resume exactly: weights, optimizer, step, RNG states,
                     saved with plain types and tensors only and loaded with weights_only=True
  metrics.jsonl      one JSON object per logged step / evaluation
  loss.png           the training curve
Every file is written to a temporary file in the same folder, flushed, fsynced and moved into
place with os.replace, so a crash at any moment leaves the previous version of each file whole.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from imm_cli.config import FORMAT_VERSION, ModelConfig, TrainConfig, model_config_from_dict, to_dict, train_config_from_dict
from imm_cli.errors import InputError
from imm_cli.model import GPT

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
TMP_PREFIX = ".imm-tmp-"


# --- atomic writes ---------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def clean_temp_files(run_dir: Path) -> None:
    """Leftovers of a save that was killed midway are never read; remove them."""
    for p in Path(run_dir).glob(TMP_PREFIX + "*"):
        p.unlink(missing_ok=True)


def _state_dict_for_save(model: GPT) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd.pop("lm_head.weight", None)  # tied to wte.weight: stored once
    return sd


def save_weights(run_dir: Path, model: GPT, step: int) -> None:
    path = Path(run_dir) / WEIGHTS
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    os.close(fd)
    try:
        save_file(_state_dict_for_save(model), tmp, metadata={"format_version": str(FORMAT_VERSION), "step": str(step)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, summary: dict | None = None) -> None:
    atomic_write_json(Path(run_dir) / CONFIG, {
        "format_version": FORMAT_VERSION,
        "model": to_dict(model_cfg),
        "train": to_dict(train_cfg),
        "summary": summary or {},
    })


def save_train_state(run_dir: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(run_dir) / TRAIN_STATE, buf.getvalue())


# --- checked loads ---------------------------------------------------------------------------------
def read_config(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise InputError(f"run folder {run_dir} does not exist")
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a folder (expected a run folder made by `imm train`)")
    path = run_dir / CONFIG
    if not path.is_file():
        raise InputError(f"{run_dir} is not a run folder: {CONFIG} is missing")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is damaged: not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict) or "model" not in cfg or "format_version" not in cfg:
        raise InputError(f"{path} is damaged: no format_version/model entries")
    version = cfg["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{path} has format version {version!r}; this imm reads up to {FORMAT_VERSION}: upgrade imm")
    return cfg


def load_model_config(run_dir: Path) -> ModelConfig:
    cfg = read_config(run_dir)
    try:
        return model_config_from_dict(cfg["model"])
    except (TypeError, InputError) as e:
        raise InputError(f"{Path(run_dir) / CONFIG} is damaged: {e}") from None


def load_train_config(run_dir: Path) -> TrainConfig:
    cfg = read_config(run_dir)
    try:
        return train_config_from_dict(cfg.get("train", {}))
    except (TypeError, InputError) as e:
        raise InputError(f"{Path(run_dir) / CONFIG} is damaged: {e}") from None


def _check_and_load(model: GPT, sd: dict[str, torch.Tensor], where: Path) -> None:
    expected = _state_dict_for_save(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise InputError(f"{where} does not match config.json: {what}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise InputError(f"{where} does not match config.json: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({**sd, "lm_head.weight": sd["wte.weight"]}, strict=True)


def load_run(run_dir: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model from config.json, load and check its weights. Returns (model, config dict)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    model_cfg = load_model_config(run_dir)
    path = run_dir / WEIGHTS
    if not path.is_file():
        raise InputError(f"{run_dir} is not a finished run: {WEIGHTS} is missing")
    try:
        sd = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path} is damaged: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}") from None
    model = GPT(model_cfg)
    _check_and_load(model, sd, path)
    model.to(device).eval()
    return model, cfg


def load_train_state(run_dir: Path) -> dict:
    """Load train_state.pt without executing anything: weights_only=True, no fallback."""
    path = Path(run_dir) / TRAIN_STATE
    if not path.is_file():
        raise InputError(f"cannot resume {run_dir}: {TRAIN_STATE} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else "unsafe content"
        raise InputError(f"{path} refused: it holds something other than plain data and tensors ({first[:120]})") from None
    except (EOFError, RuntimeError, OSError, ValueError, AttributeError) as e:
        raise InputError(f"{path} is damaged: {(str(e).splitlines() or [e.__class__.__name__])[0][:160]}") from None
    if not isinstance(state, dict) or not {"step", "model", "optimizer"} <= set(state):
        raise InputError(f"{path} is damaged: expected a dict with step, model and optimizer")
    return state


def load_weights_into(model: GPT, sd: dict[str, torch.Tensor], where: Path) -> None:
    _check_and_load(model, sd, where)


def append_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Metrics are an append-only log; a torn last line is skipped by read_metrics."""
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
