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
A checkpoint writes train_state.pt, then model.safetensors, then config.json: a folder whose
config.json exists has completed a checkpoint. Temporary files (TMP_PREFIX) are never read, and
are removed when training starts or resumes.

Loading never executes anything from a file (JSON, safetensors, torch.load(weights_only=True) with
no fallback), and every problem (missing, empty, truncated, garbage, wrong types or shapes, a
future format version, pickled objects) is one InputError naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from imm_cli.config import FORMAT_VERSION, MemoryConfig, ModelConfig, TrainConfig, model_config_from_dict, to_dict, train_config_from_dict
from imm_cli.errors import InputError
from imm_cli.model import GPT

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
TMP_PREFIX = ".imm-tmp-"


# --- atomic writes ---------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# the mode an ordinary open() gives (0666 minus the umask): mkstemp's 0600 would make run folders
# unreadable to the colleagues they are shared with (read once: os.umask can only be read by setting it)
FILE_MODE = 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` into a temporary file beside `path`, fsync, then os.replace.

    A crash at any moment leaves either the old file or the new one, never a mix; the temporary
    file (named TMP_PREFIX...) is removed on error and ignored/cleaned by readers otherwise.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def json_safe(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every consumer can parse the document."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def clean_temp_files(run_dir: Path) -> None:
    """Leftovers of a save that was killed midway are never read; remove them."""
    for p in Path(run_dir).glob(TMP_PREFIX + "*"):
        try:
            p.unlink(missing_ok=True)
        except OSError:  # a folder or an unremovable file named like ours: leave it, never read it
            pass


def _state_dict_for_save(model: GPT) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd.pop("lm_head.weight", None)  # tied to wte.weight: stored once
    return sd


def save_weights(run_dir: Path, model: GPT, step: int) -> None:
    sd = _state_dict_for_save(model)
    meta = {"format_version": str(FORMAT_VERSION), "step": str(step)}
    _atomic_write(Path(run_dir) / WEIGHTS, lambda tmp: save_file(sd, tmp, metadata=meta))


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
def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else e.__class__.__name__)[:limit]


def _check_field_types(cls, d: Any, where: Path, section: str) -> None:
    """config.json is input like any other: a field of the wrong type is a damaged file, not a crash."""
    if not isinstance(d, dict):
        raise InputError(f"{where} is damaged: '{section}' is not a JSON object")
    names = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}
    for f in dataclasses.fields(cls):
        if f.name not in d or not isinstance(f.type, str):
            continue
        parts = [t.strip() for t in f.type.split("|")]
        if not all(t in names for t in parts):
            continue  # nested dataclass: checked by its own call
        allowed = tuple(c for t in parts for c in names[t])
        v = d[f.name]
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            raise InputError(f"{where} is damaged: {section}.{f.name} = {json.dumps(v)[:40]} is not of type {f.type}")


def read_config(run_dir: Path) -> dict:
    """config.json of a run folder, checked: a JSON object with a known format version."""
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path} is damaged: not valid JSON ({e.__class__.__name__})") from None
    except OSError as e:
        raise InputError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(cfg, dict) or "model" not in cfg or "format_version" not in cfg:
        raise InputError(f"{path} is damaged: no format_version/model entries")
    version = cfg["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{path} is damaged: format_version {json.dumps(version)[:40]} is not a positive integer")
    if version > FORMAT_VERSION:
        raise InputError(f"{path} has format version {version}; this imm reads up to {FORMAT_VERSION}: upgrade imm")
    return cfg


def load_model_config(run_dir: Path) -> ModelConfig:
    cfg = read_config(run_dir)
    where = Path(run_dir) / CONFIG
    _check_field_types(ModelConfig, cfg["model"], where, "model")
    _check_field_types(MemoryConfig, cfg["model"].get("memory", {}), where, "model.memory")
    try:
        return model_config_from_dict(cfg["model"])
    except (TypeError, ValueError) as e:  # InputError is a ValueError
        raise InputError(f"{where} is damaged: {e}") from None


def load_train_config(run_dir: Path) -> TrainConfig:
    cfg = read_config(run_dir)
    where = Path(run_dir) / CONFIG
    _check_field_types(TrainConfig, cfg.get("train", {}), where, "train")
    try:
        return train_config_from_dict(cfg.get("train", {})).check()
    except (TypeError, ValueError) as e:
        raise InputError(f"{where} is damaged: {e}") from None


def _check_and_load(model: GPT, sd: Any, where: Path) -> None:
    """Load `sd` into `model` after checking names, shapes, dtypes and values, naming `where`."""
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InputError(f"{where} is damaged: the weights are not a mapping of names to tensors")
    expected = _state_dict_for_save(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        more = len(missing or unexpected) - 3
        raise InputError(f"{where} does not match config.json: {what}" + (f" and {more} more" if more > 0 else ""))
    for k, v in expected.items():
        got = sd[k]
        if tuple(got.shape) != tuple(v.shape):
            raise InputError(f"{where} does not match config.json: {k} has shape {tuple(got.shape)}, expected {tuple(v.shape)}")
        if got.dtype != v.dtype:
            raise InputError(f"{where} is damaged: {k} has dtype {str(got.dtype).removeprefix('torch.')}, "
                             f"expected {str(v.dtype).removeprefix('torch.')}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise InputError(f"{where} is damaged: {k} holds NaN or inf values")
    model.load_state_dict({**sd, "lm_head.weight": sd["wte.weight"]}, strict=True)


def load_run(run_dir: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model from config.json, load and check its weights. Returns (model, config dict).

    Never executes anything from the folder: JSON and safetensors only. Every problem is one
    InputError naming the file. Leftover temporary files of an interrupted save are ignored.
    """
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    model_cfg = load_model_config(run_dir)
    path = run_dir / WEIGHTS
    if not path.is_file():
        raise InputError(f"{run_dir} is not a finished run: {WEIGHTS} is missing")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        raise InputError(f"{path} is damaged: {_first_line(e)}") from None
    version = meta.get("format_version", str(FORMAT_VERSION))
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise InputError(f"{path} has format version {version!r}; this imm reads up to {FORMAT_VERSION}: upgrade imm")
    model = GPT(model_cfg)
    _check_and_load(model, sd, path)
    model.to(device).eval()
    return model, cfg


def load_train_state(run_dir: Path) -> dict:
    """Load train_state.pt without executing anything: weights_only=True, no fallback, then check it."""
    path = Path(run_dir) / TRAIN_STATE
    if not path.is_file():
        raise InputError(f"cannot resume {run_dir}: {TRAIN_STATE} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip() if "WeightsUnpickler error:" in text else text
        detail = _first_line(Exception(detail), 100).split(" was not an allowed global")[0].rstrip(".")
        if "global" in detail.lower():
            raise InputError(f"{path} refused: it carries a pickled object ({detail}) that could run code; "
                             f"imm loads plain tensors and data only") from None
        raise InputError(f"{path} is damaged: not a plain training state ({detail})") from None
    except (EOFError, RuntimeError, OSError, ValueError, AttributeError, IndexError, KeyError, TypeError,
            MemoryError, RecursionError) as e:
        raise InputError(f"{path} is damaged: {_first_line(e)}") from None
    _check_train_state(state, path)
    return state


def _check_train_state(state: Any, path: Path) -> None:
    """Structure of a training state, so that resuming can never crash on a wrong type."""
    def bad(what: str) -> InputError:
        return InputError(f"{path} is damaged: {what}")

    if not isinstance(state, dict):
        raise bad("expected a dict with step, model, optimizer, batches and torch_rng")
    missing = [k for k in ("step", "model", "optimizer", "batches", "torch_rng") if k not in state]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"step {step!r} is not a non-negative integer")
    if not isinstance(state["model"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise bad("model is not a mapping of names to tensors")
    opt = state["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise bad("optimizer is not an optimizer state (state, param_groups)")
    b = state["batches"]
    if not isinstance(b, dict) or not isinstance(b.get("gen"), torch.Tensor) or b["gen"].dtype != torch.uint8:
        raise bad("batches holds no data-order generator state")
    if not isinstance(b.get("rng"), list) or len(b["rng"]) != 3 or not isinstance(b["rng"][1], list):
        raise bad("batches holds no curriculum random state")
    rng = state["torch_rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise bad("torch_rng is not a random generator state")


def check_resumable(run_dir: Path) -> dict:
    """Everything `train --resume` will read, checked before any work: config, weights, training state."""
    load_run(run_dir)
    return load_train_state(run_dir)


def load_weights_into(model: GPT, sd: dict[str, torch.Tensor], where: Path) -> None:
    _check_and_load(model, sd, where)


# --- metrics -----------------------------------------------------------------------------------------
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
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume from `step`: drop rows logged after that checkpoint (the resumed run logs them again)
    and any torn line, so that every step appears once. Atomic like every other write."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
