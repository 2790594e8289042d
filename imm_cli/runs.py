"""Run folders: atomic saves, checked loads.

A run folder holds
  config.json        format version, model and training configs, a summary of the run
  model.safetensors  the weights (tied embeddings stored once), step in the metadata
  train_state.pt     everything needed to resume exactly: weights, optimizer, step, RNG states,
                     saved with plain types and tensors only and loaded with weights_only=True
  metrics.jsonl      one JSON object per logged step / evaluation (appended: see append_jsonl)
  loss.png           the training curve
  .imm.lock          present only while a process writes the folder (see `locked`)
Every file but metrics.jsonl is written to a temporary file in the same folder, flushed, fsynced and
moved into place with os.replace, so a crash at any moment leaves the previous version of each file
whole. metrics.jsonl is appended one whole line per write; a line torn by a crash is skipped when
read, and a resume rewrites the log atomically, keeping the rows up to its checkpoint.

config.json also records the identity of the training data (resolved path, size, sha256): a resume
or an experiment refuses a data file that is missing or changed (`check_data`).
A checkpoint writes train_state.pt, then model.safetensors, then config.json: a folder whose
config.json exists has completed a checkpoint. Temporary files (TMP_PREFIX) are never read, and
are removed when training starts or resumes.

Loading never executes anything from a file (JSON, safetensors, torch.load(weights_only=True) with
no fallback), and every problem (missing, empty, truncated, garbage, wrong types or shapes, a
future format version, pickled objects) is one InputError naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: folders are not locked
    fcntl = None

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from imm_cli.config import FORMAT_VERSION, MemoryConfig, ModelConfig, TrainConfig, model_config_from_dict, to_dict, train_config_from_dict
from imm_cli.data import DEFAULT_CORPUS_NAME, load_default_corpus, read_text_file
from imm_cli.errors import InputError
from imm_cli.model import GPT

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
LOCK = ".imm.lock"
TMP_PREFIX = ".imm-tmp-"
RUN_FILES = (CONFIG, WEIGHTS, TRAIN_STATE, METRICS, LOSS_PLOT)  # what `imm train` writes in a run folder


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


# --- one writer per folder ---------------------------------------------------------------------------
_held: dict[str, int] = {}  # folders this process holds (resolved path -> lock file descriptor)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _busy(folder: Path, holder: str) -> InputError:
    return InputError(f"{folder} is in use by another imm process ({holder}); wait for it to end, "
                      f"or choose another folder")


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold `folder` (which must exist) as its only writer: a second process gets InputError naming the holder's pid.

    An exclusive flock on folder/.imm.lock, which holds the pid; the file is removed on release
    (a lock file left by a killed process is stale and simply taken over: the kernel dropped its
    lock). Re-entrant within a process. Without fcntl (not POSIX) nothing is locked.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    if fcntl is None or key in _held:
        yield
        return
    path = folder / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise InputError(f"{folder}: cannot create its lock file {LOCK} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise _busy(folder, holder) from None
        try:  # a holder may have removed the file just before we locked it: lock the file in place
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except OSError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        try:
            os.unlink(path)  # while still holding it: nobody can have locked this file meanwhile
        except OSError:
            pass
        os.close(fd)


def check_not_busy(folder: Path) -> None:
    """Refuse (InputError naming the pid) a folder that another process holds; takes nothing."""
    folder = Path(folder)
    if fcntl is None or str(folder.resolve()) in _held or not (folder / LOCK).is_file():
        return
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _busy(folder, _holder(fd)) from None
    finally:
        os.close(fd)


def check_write_targets(folder: Path, names: tuple[str, ...] | list[str], flag: str) -> None:
    """Before any work: the folder (if it exists) is writable and no file imm will write there is a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {folder} is not writable")
    for name in names:
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            raise InputError(f"{flag} {folder}: {name} is a folder; imm writes a file there")


# --- the training data's identity ---------------------------------------------------------------------
def data_identity(path: str | None) -> dict:
    """What config.json records about the training data: resolved path (None: embedded), bytes, sha256."""
    if path is None:
        raw = load_default_corpus().encode("utf-8")
    else:
        path = str(Path(path).resolve())
        raw = read_text_file(path, what="data file").encode("utf-8")  # UTF-8 round-trips: the file's own bytes
    return {"path": path, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _data_section(cfg: dict, where: Path) -> dict | None:
    d = cfg.get("data")
    if d is None:
        return None
    ok = (isinstance(d, dict) and (d.get("path") is None or isinstance(d.get("path"), str))
          and isinstance(d.get("bytes"), int) and not isinstance(d.get("bytes"), bool)
          and isinstance(d.get("sha256"), str) and len(d["sha256"]) == 64)
    if not ok:
        raise InputError(f"{where} is damaged: 'data' is not {{path, bytes, sha256}}")
    return d


def check_data(run_dir: Path, data: str | os.PathLike | None = None, resume: bool = True) -> str | None:
    """The data file to use with this run: the one it was trained on, checked against its recorded size
    and sha256, or `data` when given and identical in content. Missing or changed: InputError, whose
    remedy is --data for a resume, and the original file back in its place for an experiment (which
    reads its held-out text and has no --data). Returns the resolved path (None: the embedded corpus)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    where = run_dir / CONFIG
    recorded = _data_section(cfg, where)
    train = cfg.get("train")
    saved_path = train.get("data") if train is not None else (recorded or {}).get("path")  # what training loads
    path = str(data) if data is not None else saved_path
    label = DEFAULT_CORPUS_NAME if path is None else f"data file {path}"
    if path is not None and not os.path.exists(path):
        raise InputError(f"{label} (that {run_dir} was trained on) does not exist; "
                         + ("pass --data with a file of the same content" if resume else
                            "the experiments read their held-out text from it: put a file of the same content at that path"))
    if recorded is None:  # a run saved before data identities were recorded: the path is all we know
        if data is not None and (saved_path is None or Path(data).resolve() != Path(saved_path).resolve()):
            raise InputError(f"--data {data}: {run_dir} was trained on {saved_path or DEFAULT_CORPUS_NAME} before imm recorded "
                             f"data fingerprints, so another file cannot be checked against it")
        return None if path is None else str(Path(path).resolve())
    if path is not None and os.path.isfile(path) and os.path.getsize(path) != recorded["bytes"]:
        got = {"bytes": os.path.getsize(path), "sha256": None}
    else:
        got = data_identity(path)
    if (got["bytes"], got["sha256"]) != (recorded["bytes"], recorded["sha256"]):
        raise InputError(f"{label} is not the data {run_dir} was trained on ({got['bytes']:,} bytes"
                         f"{', other content' if got['bytes'] == recorded['bytes'] else ''}; recorded: {recorded['bytes']:,} "
                         f"bytes, sha256 {recorded['sha256'][:12]}...); "
                         + ("pass --data with the original file" if resume else
                            "the experiments read their held-out text from it: put the original file back at that path"))
    return None if path is None else str(Path(path).resolve())


# --- what fits in memory ------------------------------------------------------------------------------
def param_count(model_cfg: ModelConfig) -> int:
    """Parameters of the model `model_cfg` describes, counted without allocating them (meta device)."""
    try:
        with torch.device("meta"):
            model = GPT(model_cfg)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a module that cannot be built on "meta": the transformer's own count
        d, L = model_cfg.n_embd, model_cfg.n_layer
        return 12 * L * d * d + (model_cfg.vocab_size + model_cfg.block_size) * d


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes this process can still allocate on `device` (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:  # noqa: BLE001 - unknown is fine, the check is skipped
            return None
    limits = []
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        limits.append(int(info["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for cg in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(cg).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def check_fits(model_cfg: ModelConfig, device: torch.device | str = "cpu", train_tokens: int = 0) -> int:
    """Refuse (InputError) a model that cannot fit: weights alone (loading), or weights, gradients, AdamW
    state and a rough share of activations for `train_tokens` tokens per step (training). Returns the count."""
    n = param_count(model_cfg)
    need = n * (20 if train_tokens else 12)  # fp32 weights (+ a loaded copy) / + gradients, Adam moments, checkpoint copy
    if train_tokens:
        need += train_tokens * 4 * (model_cfg.n_layer * (16 * model_cfg.n_embd + 2 * model_cfg.block_size) + 3 * model_cfg.vocab_size)
    have = available_memory(device)
    if have is not None and need > have:
        raise InputError(f"the model ({n:,} parameters: {model_cfg.n_layer} layers of width {model_cfg.n_embd}) needs about "
                         f"{need / 2**30:,.1f} GiB {'to train' if train_tokens else 'to load'}; {torch.device(device).type} "
                         f"has {have / 2**30:,.1f} GiB available")
    return n


def _state_dict_for_save(model: GPT) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd.pop("lm_head.weight", None)  # tied to wte.weight: stored once
    return sd


def save_weights(run_dir: Path, model: GPT, step: int) -> None:
    sd = _state_dict_for_save(model)
    meta = {"format_version": str(FORMAT_VERSION), "step": str(step)}
    _atomic_write(Path(run_dir) / WEIGHTS, lambda tmp: save_file(sd, tmp, metadata=meta))


def save_config(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, summary: dict | None = None,
                data: dict | None = None) -> None:
    """config.json; `data` is the training data's identity (data_identity), checked by resume and experiments."""
    doc = {"format_version": FORMAT_VERSION, "model": to_dict(model_cfg), "train": to_dict(train_cfg), "summary": summary or {}}
    if data is not None:
        doc["data"] = data
    atomic_write_json(Path(run_dir) / CONFIG, json_safe(doc))


def save_train_state(run_dir: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(run_dir) / TRAIN_STATE, buf.getvalue())


# --- checked loads ---------------------------------------------------------------------------------
def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else e.__class__.__name__)[:limit]


def _check_field_types(cls, d: Any, where: Path, section: str) -> None:
    """config.json is input like any other: a field of the wrong type is a damaged file, not a crash.

    Types come from the dataclass annotations; numbers must also be finite (JSON may spell NaN and
    Infinity) and integers fit in 64 bits. Values are then checked by the class's own check()."""
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
        bad = not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed)
        bad = bad or (isinstance(v, float) and not math.isfinite(v)) or (isinstance(v, int) and not -2**63 <= v < 2**64)
        if bad:
            raise InputError(f"{where} is damaged: {section}.{f.name} = {json.dumps(v)[:40]} is not a finite {f.type}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError, and ints over 4,300 digits
        raise InputError(f"{path} is damaged: not valid JSON ({e.__class__.__name__})") from None
    except OSError as e:
        raise InputError(f"{path} cannot be read ({e.strerror or e})") from None


def read_config(run_dir: Path, strict: bool = False) -> dict:
    """config.json of a run folder, every section checked: format version, model, train, data, summary.

    Sections are checked with the same rules as the flags (config.py). A missing train section or
    field is allowed for read-only use; strict (resume) refuses it, naming the field."""
    run_dir = Path(run_dir)
    try:
        if not run_dir.exists():
            raise InputError(f"run folder {run_dir} does not exist")
        if not run_dir.is_dir():
            raise InputError(f"{run_dir} is not a folder (expected a run folder made by `imm train`)")
        path = run_dir / CONFIG
        if not path.is_file():
            raise InputError(f"{run_dir} is not a run folder: {CONFIG} is missing")
    except OSError as e:
        raise InputError(f"run folder {run_dir} cannot be read ({e.strerror or e})") from None
    cfg = _read_json(path)
    if not isinstance(cfg, dict) or "model" not in cfg or "format_version" not in cfg:
        raise InputError(f"{path} is damaged: no format_version/model entries")
    version = cfg["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{path} is damaged: format_version {json.dumps(version)[:40]} is not a positive integer")
    if version > FORMAT_VERSION:
        raise InputError(f"{path} has format version {version}; this imm reads up to {FORMAT_VERSION}: upgrade imm")
    _model_config(cfg, path, strict)
    if "train" in cfg or strict:
        _train_config(cfg, path, strict)
    _data_section(cfg, path)
    if not isinstance(cfg.get("summary", {}), dict):
        raise InputError(f"{path} is damaged: 'summary' is not a JSON object")
    return cfg


def _model_config(cfg: dict, where: Path, strict: bool) -> ModelConfig:
    _check_field_types(ModelConfig, cfg["model"], where, "model")
    _check_field_types(MemoryConfig, cfg["model"].get("memory", {}), where, "model.memory")
    try:
        return model_config_from_dict(cfg["model"], strict=strict)
    except (TypeError, ValueError) as e:  # InputError is a ValueError
        raise InputError(f"{where} is damaged: {e}") from None


def _train_config(cfg: dict, where: Path, strict: bool) -> TrainConfig:
    if strict and "train" not in cfg:
        raise InputError(f"{where} has no 'train' section: the run cannot be continued as it was trained")
    _check_field_types(TrainConfig, cfg.get("train", {}), where, "train")
    try:
        return train_config_from_dict(cfg.get("train", {}), strict=strict).check()
    except (TypeError, ValueError) as e:
        raise InputError(f"{where} is damaged: {e}") from None


def load_model_config(run_dir: Path, strict: bool = False) -> ModelConfig:
    """The model config of a run; strict (resume): every field must be there."""
    return _model_config(read_config(run_dir, strict), Path(run_dir) / CONFIG, strict)


def load_train_config(run_dir: Path, strict: bool = False) -> TrainConfig:
    """The training config of a run; strict (resume): the section and every field must be there."""
    return _train_config(read_config(run_dir, strict), Path(run_dir) / CONFIG, strict)


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
    check_fits(model_cfg)  # before anything is allocated: a config may declare a model no machine holds
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below is the one line
            warnings.simplefilter("ignore")
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
    """Everything `train --resume` will read and write, checked before any work: the folder is writable
    and nobody else writes it, config (every field present), weights, training state, metrics log."""
    run_dir = Path(run_dir)
    read_config(run_dir, strict=True)
    check_not_busy(run_dir)
    check_write_targets(run_dir, RUN_FILES, "--resume")
    load_run(run_dir)
    return load_train_state(run_dir)


def load_weights_into(model: GPT, sd: dict[str, torch.Tensor], where: Path) -> None:
    _check_and_load(model, sd, where)


# --- append-only logs (metrics.jsonl, sweep.jsonl) ---------------------------------------------------
def append_jsonl(path: Path, rows: list[dict], fsync: bool = False) -> None:
    """Append rows as whole lines in one write (O_APPEND). A torn last line left by a crash gets a
    newline first, so it cannot swallow the new rows; readers skip it (read_jsonl)."""
    path = Path(path)
    if not rows:
        return
    data = "".join(json.dumps(json_safe(r)) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(JSON objects of the file's lines, number of lines skipped as damaged). A line is damaged when it
    is not JSON, not an object, or not representable (an integer of more than 4,300 digits, nesting
    too deep); a missing file is empty; a file that cannot be read is an InputError."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return [], 0
    if not path.is_file():
        raise InputError(f"{path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"{path} cannot be read ({e.strerror or e})") from None
    rows, skipped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, like int()'s digit limit
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def append_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Metrics are an append-only log, one whole line per row (append_jsonl)."""
    append_jsonl(Path(run_dir) / METRICS, rows)


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS)[0]


def _step_of(row: dict) -> float | None:
    v = row.get("step")
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def truncate_metrics(run_dir: Path, step: int) -> int:
    """On resume from `step`: drop rows logged after that checkpoint (the resumed run logs them again)
    and every damaged line, so that every step appears once. Atomic like every other write.
    Returns the number of damaged lines dropped."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return 0
    rows, skipped = read_jsonl(path)
    keep = [r for r in rows if _step_of(r) is None or r["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
    return skipped
