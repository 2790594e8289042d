"""The training flags, declared once: a help text per config.FLAGS entry, turned into typer options.

`imm train` takes every flag, with the config dataclasses' defaults; `imm sweep` takes the model
shape and training ones with its own defaults, and those it sweeps as comma-separated lists. The
types and defaults come from the config dataclasses (config.FLAGS says which field a flag sets);
only the help texts, and the few flags whose type a default cannot tell, are written here."""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from imm_cli.config import MEMORY_KINDS, MEMORY_NORMS, ModelConfig, TrainConfig, flag_values

Kind = Enum("Kind", {k: k for k in MEMORY_KINDS}, type=str)  # --memory's choices: every registered memory kind
Norm = Enum("Norm", {k: k for k in MEMORY_NORMS}, type=str)  # --memory-norm's choices

DEFAULTS = flag_values(ModelConfig(), TrainConfig())
# flags whose type their default cannot tell (None, or a choice among names)
TYPES = {"memory": Kind, "memory_norm": Norm, "memory_temp": Optional[float], "data": Optional[Path]}

HELP: dict[str, str] = {
    "slots": "Memory slots per memory layer; 0 = the same GPT with no memory (the baseline).",
    "memory": "Memory kind: episodic (key/value entries that recall facts), linformer (the notes' pooled slots), "
              "knn (Memorizing Transformers: top-k over stored keys/values of hidden states, FIFO) "
              "delta (a fast-weight matrix written with the delta rule) "
              "or titans (an MLP whose weights are trained at inference: Titans' neural memory).",
    "layers": "Transformer blocks.",
    "heads": "Attention heads per block.",
    "embd": "Residual stream width.",
    "block_size": "Segment length in bytes (the attention window).",
    "batch_size": "Segments per step (tokens per step = batch-size x block-size).",
    "iters": "Optimizer steps.",
    "lr": "Peak learning rate (warmup, then cosine decay to lr/10).",
    "memory_lr": "Linformer memory: EMA rate of a write (notes' best 0.04).",
    "memory_norm": "Linformer memory: state normalisation, layer or l2.",
    "memory_temp": "Read temperature of the cosine attention; unset: the kind's own (0.8 linformer, 0.05 episodic and knn, learned from there; delta and titans have none).",
    "memory_size": "Episodic and knn memories: the budget in entries (one per stored position); when full, episodic lets the least surprising entries go, knn the oldest.",
    "memory_topk": "Episodic and knn memories: stored entries each position reads, the best-matching ones; 0 = all for episodic (dilutes as the memory grows), 32 for knn (its paper's k).",
    "memory_span": "Episodic memory: retention scores a byte by the mean surprise of it and span//2 bytes on each side (1 = its own loss).",
    "memory_trail": "Episodic memory: a byte's retention score is also the mean surprise of the span of bytes up to it, when that is higher than the centred span's (a fact's last bytes keep its run's score); retention acts at inference only.",
    "memory_sharp": "Episodic memory: fixed 1/temperature of a second, sharp read of the same entries (near-exact contexts only); 0 = the learned-temperature read alone.",
    "memory_local": "Episodic memory: positions also read the entries of their own segment's earlier positions (the lookup inside the window).",
    "memory_copy": "Episodic memory: mix the sharp read's next-byte distribution into the output, with a learned weight (as kNN-LM does), so an exact stored context can outvote the model's own guess.",
    "memory_knn_lm": "Episodic memory: at inference (validation, generation, every experiment), mix the sharp read's next-byte distribution into the output with this fixed weight, times the read's confidence (kNN-LM); not trained; 0 = off; with --memory-copy the learned weight replaces it.",
    "memory_knn_exact": "Episodic memory: the kNN-LM weight of stored entries whose context matches the query's exactly (cosine >= 0.999), where above --memory-knn-lm; 0 = --memory-knn-lm for every entry; no mix at all when --memory-knn-lm is 0.",
    "memory_drop": "Episodic memory, training only: hide each stored entry from reads with this probability, as retention lets entries go in a text longer than the budget (training episodes never fill it).",
    "memory_keep": "Episodic memory: weight (nats) of a learned keep score (trained on which entries later cues read) added to each entry's retention score; 0 = surprise alone, no keep head.",
    "memory_entries": "Episodic memory: positions one write offers at most, most surprising first; 0 = every position.",
    "memory_key_bytes": "Episodic memory: bytes of context that make a key.",
    "memory_far_bytes": "Episodic memory, inference only: bytes before a key's own that make a far key (a fixed random n-gram), which breaks ties between entries whose key bytes match (facts that share a long phrase).",
    "memory_far_weight": "Episodic memory, inference only: the far key's weight in the read's dot products; 0 = off.",
    "memory_key_dim": "Episodic, knn, delta and titans memories: width of keys and queries (knn: over all its heads; titans: its MLP is twice as wide).",
    "memory_value_dim": "Episodic, knn, delta and titans memories: width of a stored value before the output projection (episodic: a byte's); 0 = --embd.",
    "memory_shared_values": "Episodic memory: both read channels (learned temperature, sharp) read one value table, their weights on an entry added first; --no-memory-shared-values gives each its own output projection (the design before).",
    "segments": "Consecutive segments per episode, memory carried through them [default: 0 = auto, 1 without memory, 4 with].",
    "curriculum": "Share of episodes that are synthetic-fact recall episodes (memory models only).",
    "max_gap": "Half the steps, 1..max-gap unscored segments of text before each episode's last segment: recall across a gap (episodic memory; 0 = off).",
    "grad_clip": "Clip the gradient norm to this; 0 = off.",
    "eval_every": "Steps between validation evaluations.",
    "save_every": "Steps between checkpoints.",
    "device": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps. On CUDA, bf16 autocast where the GPU supports it.",
    "compile": "torch.compile the model (first steps slower; checkpoints load anywhere without it).",
    "seed": "Seed of initialisation, data order and curriculum.",
    "data": "UTF-8 text file to train on [default: the embedded Shakespeare corpus].",
}
NO_DEFAULT_SHOWN = {"segments"}  # their help says what the default means
# what only `imm train` adds to a flag's help (it alone runs under torchrun)
TRAIN_NOTES = {"batch_size": "Over all processes: under torchrun each process takes its share.",
               "device": "Under torchrun --nproc_per_node N: one process per device (cuda:LOCAL_RANK, nccl) or per CPU share (gloo)."}


def option(flag: str, default=None, note: str = "", listed: bool = False) -> inspect.Parameter:
    """The keyword-only parameter that declares --FLAG: its help from HELP (plus `note`), its type
    and default from the configs unless `default` is given; listed: a comma-separated str of values."""
    default = DEFAULTS[flag] if default is None else default
    kind = str if listed else TYPES.get(flag, type(DEFAULTS[flag]))
    if isinstance(default, str) and isinstance(kind, type) and issubclass(kind, Enum):
        default = kind(default)
    if listed:
        default = ",".join("auto" if v is None else str(v) for v in default)
    declared = typer.Option(default, help=HELP[flag] + (" " + note if note else ""), show_default=flag not in NO_DEFAULT_SHOWN)
    return inspect.Parameter(flag, inspect.Parameter.KEYWORD_ONLY, default=declared, annotation=kind)


TRAIN_FLAGS = [option(flag, note=TRAIN_NOTES.get(flag, "")) for flag in HELP]  # `imm train`: every flag (tests hold HELP to config.FLAGS), in HELP's order
