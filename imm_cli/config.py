"""Frozen, checked configuration: the GPT, its memory, and training.

Every field has a comment. `check()` raises InputError with one line naming the field, so the CLI
can refuse bad flags before any work is done.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from imm_cli.errors import InputError

FORMAT_VERSION = 1  # bumped whenever config.json or the weight names change incompatibly

# The registry of memories: kind -> "module:Class". Adding a memory is its own file in imm_cli/memory/
# and one line here (the flags, the property tests and the experiments take it from this table).
MEMORIES = {
    "episodic": "imm_cli.memory.episodic:EpisodicMemory",
    "linformer": "imm_cli.memory.linformer:LinformerMemory",
    "knn": "imm_cli.memory.knn:KNNMemory",
    "delta": "imm_cli.memory.delta:DeltaMemory",
    "titans": "imm_cli.memory.titans:TitansMemory",
}
MEMORY_KINDS = tuple(MEMORIES)
BUDGETED = ("episodic", "knn")  # the memories whose size is a budget in entries (--memory-size)
MEMORY_NORMS = ("layer", "l2")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def check_knn_lm(weight: float, flag: str = "--memory-knn-lm") -> None:
    """The kNN-LM weight's range, for training's flag and for an experiment's override alike."""
    _require(0 <= weight < 1, f"{flag} must be in [0, 1) (got {weight})")


def check_far_weight(weight: float, flag: str = "--memory-far-weight") -> None:
    """The far key's weight range, for training's flag and for an experiment's override alike."""
    _require(0 <= weight <= 1, f"{flag} must be between 0 (off) and 1 (got {weight:g})")


@dataclass(frozen=True)
class MemoryConfig:
    kind: str = "episodic"  # one of MEMORY_KINDS: episodic, linformer (the notes'), knn (Memorizing Transformers), delta (fast weights), titans (neural memory)
    slots: int = 8  # S memory slots per memory layer; 0 = no memory at all (the baseline model)
    layer: int = -2  # which block hosts the memory (negative counts from the end: -2 = third of four)
    temp: float | None = None  # read temperature of the cosine attention; None = 0.8 linformer, 0.05 episodic and knn (learned from there)
    lr: float = 0.04  # linformer: EMA rate merging a write into the state (notes' best 0.04)
    norm: str = "layer"  # linformer: state normalisation after each write, "layer" or "l2"
    size: int = 16384  # episodic, knn: the memory's budget in entries (one entry per written position; knn drops the oldest)
    topk: int = 4  # episodic, knn: stored entries each query reads, the best-matching ones; 0 = all (episodic), 32 (knn)
    span: int = 64  # episodic: retention scores a byte by the mean surprise of it and span // 2 bytes each side (1 = its own)
    trail: bool = True  # episodic: a byte also scores the mean surprise of the span of bytes up to it, when higher (a fact's last bytes keep its run's score)
    entries: int = 0  # episodic: positions one write offers at most, most surprising first; 0 = all (block size)
    key_bytes: int = 16  # episodic: a key is the previous `key_bytes` bytes (16 beat 8 on needle and recall, measured)
    far_bytes: int = 32  # episodic, inference only: the bytes before a key's own key_bytes make a far key (a fixed random n-gram of them) that breaks ties between entries whose key_bytes match (facts sharing a phrase longer than key_bytes)
    far_weight: float = 0.075  # episodic, inference only: the far key's weight in a read's dot products (a near cosine 1 - far_weight still loses to an exact one); 0 = off; 0.075 chosen on examples/ with one value table (README 'How it got there', 5)
    key_dim: int = 64  # episodic, knn, delta, titans: width of keys and queries (knn: over all its heads; titans: its MLP is twice as wide)
    value_dim: int = 0  # episodic, knn, delta, titans: width of a stored value before the output projection; 0 = n_embd (a byte needs few dims)
    shared_values: bool = True  # episodic: both read channels read one value table (their weights on an entry add before its value is gathered: half the mixing, measured no worse); False = each its own projection (runs from before)
    sharp: float = 48.0  # episodic: fixed 1/temperature of a second read of the same entries, for near-exact contexts (0 = none)
    keep: float = 0.0  # episodic: weight (nats) of a learned keep score added to an entry's retention score; 0 = surprise alone
    copy: bool = False  # episodic: mix the sharp read's next-byte distribution into the output, its weight learned (kNN-LM); measured worse, off
    knn_lm: float = 0.35  # episodic: at inference only, mix it in with this fixed weight instead (kNN-LM); 0 = off; 0.2 is validation loss's best by 0.0002, 0.35 recalls more facts (README)
    knn_exact: float = 0.6  # episodic: the kNN-LM weight of stored entries whose context matches exactly (cosine >= 0.999) where above knn_lm (Drozdov et al. 2022: trust a retrieval by how well it matches); 0 = knn_lm for every entry; 0.6 x the sharp read's confidence in one exact entry (0.95) outvotes any byte of the model's
    drop: float = 0.0  # episodic, training only: each stored entry is hidden from reads with this probability, as if retention had let it go
    local: bool = True  # episodic: positions also read the entries of earlier positions of their own segment
    decay: float = 1.0  # episodic: retention scores are multiplied by this at every write (< 1: older entries go first)
    gate_bias: float = 1.0  # initial bias of the read gate: sigmoid(1.0) = 0.73, the gate starts open

    @property
    def enabled(self) -> bool:
        return self.slots > 0

    @property
    def read_temp(self) -> float:
        if self.temp is not None:
            return self.temp
        return 0.8 if self.kind == "linformer" else 0.05

    def check(self) -> "MemoryConfig":
        _require(self.kind in MEMORY_KINDS, f"--memory must be one of {', '.join(MEMORY_KINDS)} (got {self.kind!r})")
        _require(0 <= self.slots <= 1024, f"--slots must be between 0 and 1024 (got {self.slots})")
        _require(self.temp is None or 0 < self.temp <= 100, f"--memory-temp must be > 0 and <= 100 (got {self.temp})")
        _require(0 < self.lr <= 1, f"--memory-lr must be in (0, 1] (got {self.lr})")
        _require(self.norm in MEMORY_NORMS, f"--memory-norm must be one of {', '.join(MEMORY_NORMS)} (got {self.norm!r})")
        _require(0 <= self.entries <= 4096, f"--memory-entries must be between 0 (all) and 4096 (got {self.entries})")
        _require(1 <= self.key_bytes <= 64, f"--memory-key-bytes must be between 1 and 64 (got {self.key_bytes})")
        _require(0 <= self.far_bytes <= 256, f"--memory-far-bytes must be between 0 (none) and 256 (got {self.far_bytes})")
        check_far_weight(self.far_weight)
        _require(1 <= self.key_dim <= 4096, f"--memory-key-dim must be between 1 and 4096 (got {self.key_dim})")
        _require(0 <= self.value_dim <= 4096, f"--memory-value-dim must be between 0 (n_embd) and 4096 (got {self.value_dim})")
        _require(self.slots <= self.size <= 1_048_576 or self.kind == "linformer" or self.slots == 0,
                 f"--memory-size must be between --slots ({self.slots}) and 1048576 entries (got {self.size})")
        _require(1 <= self.span <= 1024, f"--memory-span must be between 1 and 1024 bytes (got {self.span})")
        _require(0 <= self.topk <= 65_536, f"--memory-topk must be between 0 (all) and 65536 (got {self.topk})")
        _require(0 <= self.keep <= 100, f"--memory-keep must be between 0 (off) and 100 nats (got {self.keep})")
        _require(self.sharp == 0 or 1 <= self.sharp <= 1000, f"--memory-sharp must be 0 (off) or between 1 and 1000 (got {self.sharp})")
        _require(0 <= self.drop < 1, f"--memory-drop must be in [0, 1) (got {self.drop})")
        check_knn_lm(self.knn_lm)
        check_knn_lm(self.knn_exact, "--memory-knn-exact")
        _require(0 < self.decay <= 1, f"--memory-decay must be in (0, 1] (got {self.decay})")
        return self


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # UTF-8 bytes: any text, digits and names included, can be encoded
    block_size: int = 128  # attention window in bytes (one segment)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # residual stream width
    dropout: float = 0.0  # dropout everywhere (0 for small data and exact resume)
    bias: bool = False  # biases in Linear and LayerNorm (False: a little better and faster, as nanoGPT)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    @property
    def memory_layer(self) -> int | None:
        """Index of the block that hosts the memory, or None without memory."""
        if not self.memory.enabled:
            return None
        return self.memory.layer % self.n_layer

    def check(self) -> "ModelConfig":
        _require(self.vocab_size == 256, "vocab_size must be 256 (UTF-8 bytes)")
        _require(1 <= self.block_size <= 8192, f"--block-size must be between 1 and 8192 (got {self.block_size})")
        _require(1 <= self.n_layer <= 64, f"--layers must be between 1 and 64 (got {self.n_layer})")
        _require(1 <= self.n_head <= 64, f"--heads must be between 1 and 64 (got {self.n_head})")
        _require(1 <= self.n_embd <= 8192, f"--embd must be between 1 and 8192 (got {self.n_embd})")
        _require(self.n_embd % self.n_head == 0, f"--embd ({self.n_embd}) must be divisible by --heads ({self.n_head})")
        _require(0 <= self.dropout < 1, f"dropout must be in [0, 1) (got {self.dropout})")
        _require(-self.n_layer <= self.memory.layer < self.n_layer,
                 f"memory layer {self.memory.layer} does not exist in a {self.n_layer}-layer model")
        self.memory.check()
        return self


@dataclass(frozen=True)
class TrainConfig:
    iters: int = 3000  # optimizer steps
    batch_size: int = 16  # segments per step (tokens per step = batch_size * block_size, memory or not)
    segments: int = 0  # consecutive segments per episode, memory carried through them; 0 = auto (1 without memory, 4 with)
    lr: float = 2e-3  # peak learning rate (AdamW), linear warmup then cosine decay to lr/10
    warmup: int = 100  # warmup steps
    weight_decay: float = 0.1  # on matrices only
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    curriculum: float = 0.25  # share of episodes that are synthetic-fact recall episodes (0 = plain corpus only)
    max_gap: int = 28  # half the steps, 1..max_gap unscored segments of text before each episode's last (recall across a gap)
    eval_every: int = 250  # steps between validation evaluations
    eval_batches: int = 8  # validation episodes batches per evaluation
    save_every: int = 500  # steps between checkpoints
    seed: int = 1337  # seeds data order, initialisation and the curriculum
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    compile: bool = False  # torch.compile the model's forward (weights are saved from the original module)
    data: str | None = None  # path of a UTF-8 text file; None = the embedded Shakespeare corpus

    def effective_segments(self, memory: MemoryConfig) -> int:
        if self.segments:
            return self.segments
        return 4 if memory.enabled else 1

    def check(self, memory: MemoryConfig | None = None) -> "TrainConfig":
        _require(1 <= self.iters <= 10_000_000, f"--iters must be between 1 and 10000000 (got {self.iters})")
        _require(1 <= self.batch_size <= 100_000, f"--batch-size must be between 1 and 100000 (got {self.batch_size})")
        _require(0 <= self.segments <= 64, f"--segments must be between 0 (auto) and 64 (got {self.segments})")
        _require(0 < self.lr < 1, f"--lr must be in (0, 1) (got {self.lr})")
        _require(0 <= self.warmup <= 10_000_000, f"--warmup must be between 0 and 10000000 (got {self.warmup})")
        _require(0 <= self.weight_decay <= 10, f"weight_decay must be between 0 and 10 (got {self.weight_decay})")
        _require(0 <= self.grad_clip <= 1e6, f"--grad-clip must be between 0 (off) and 1e6 (got {self.grad_clip})")
        _require(0 <= self.max_gap <= 1024, f"--max-gap must be between 0 and 1024 segments (got {self.max_gap})")
        _require(0 <= self.curriculum <= 1, f"--curriculum must be in [0, 1] (got {self.curriculum})")
        _require(1 <= self.eval_every <= 10_000_000, f"--eval-every must be between 1 and 10000000 (got {self.eval_every})")
        _require(1 <= self.eval_batches <= MAX_EVAL_BATCHES,
                 f"eval_batches must be between 1 and {MAX_EVAL_BATCHES} (got {self.eval_batches})")
        _require(1 <= self.save_every <= 10_000_000, f"--save-every must be between 1 and 10000000 (got {self.save_every})")
        check_seed(self.seed)
        check_device(self.device)
        _require(self.data is None or (self.data != "" and "\0" not in self.data), f"--data must name a file (got {self.data!r})")
        if memory is not None:
            seg = self.effective_segments(memory)
            _require(self.batch_size % seg == 0,
                     f"--batch-size ({self.batch_size}) must be a multiple of --segments ({seg}): a step holds whole episodes")
        return self


MAX_SEED = 2**63 - 1
MAX_EVAL_BATCHES = 1000


def check_seed(seed: int, flag: str = "--seed") -> int:
    """One rule for every seed (torch, numpy and random all accept 0..2**63-1)."""
    _require(isinstance(seed, int) and 0 <= seed <= MAX_SEED, f"{flag} must be between 0 and {MAX_SEED} (got {seed})")
    return seed


def check_device(name: str, flag: str = "--device") -> str:
    """The one spelling rule for devices (availability is checked where a device is used: train.resolve_device)."""
    ok = name in ("auto", "cpu", "cuda", "mps") or (name.startswith("cuda:") and name[5:].isdigit())
    _require(ok, f"{flag} must be auto, cpu, cuda, cuda:N or mps (got {name!r})")
    return name


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


# --- the training flags, declared once ------------------------------------------------------------------
# flag (its Python name; --memory-key-bytes is memory_key_bytes) -> (section, field). `imm train` builds its
# configs through this table, `imm sweep` each point's, and a resume compares the flags given with the
# run's config.json through it. A field without a flag (warmup, weight_decay, eval_batches, ...) keeps
# its default; tests/test_bad_inputs.py checks that every flag of `imm train` is here.
FLAGS: dict[str, tuple[str, str]] = {
    "slots": ("memory", "slots"), "memory": ("memory", "kind"), "memory_lr": ("memory", "lr"),
    "memory_norm": ("memory", "norm"), "memory_temp": ("memory", "temp"), "memory_size": ("memory", "size"),
    "memory_topk": ("memory", "topk"), "memory_span": ("memory", "span"), "memory_trail": ("memory", "trail"), "memory_sharp": ("memory", "sharp"), "memory_local": ("memory", "local"), "memory_copy": ("memory", "copy"), "memory_knn_lm": ("memory", "knn_lm"), "memory_knn_exact": ("memory", "knn_exact"), "memory_keep": ("memory", "keep"), "memory_drop": ("memory", "drop"), "memory_entries": ("memory", "entries"), "memory_key_bytes": ("memory", "key_bytes"),
    "memory_far_bytes": ("memory", "far_bytes"), "memory_far_weight": ("memory", "far_weight"),
    "memory_key_dim": ("memory", "key_dim"), "memory_value_dim": ("memory", "value_dim"), "memory_shared_values": ("memory", "shared_values"),
    "layers": ("model", "n_layer"), "heads": ("model", "n_head"), "embd": ("model", "n_embd"), "block_size": ("model", "block_size"),
    "batch_size": ("train", "batch_size"), "iters": ("train", "iters"), "lr": ("train", "lr"), "segments": ("train", "segments"),
    "curriculum": ("train", "curriculum"), "max_gap": ("train", "max_gap"), "grad_clip": ("train", "grad_clip"),
    "eval_every": ("train", "eval_every"), "save_every": ("train", "save_every"), "device": ("train", "device"),
    "compile": ("train", "compile"), "seed": ("train", "seed"), "data": ("train", "data"),
}
RESUMABLE_FLAGS = ("iters", "save_every", "eval_every", "device", "compile")  # what a resumed run may change


def configs_from_flags(values: dict) -> tuple[ModelConfig, TrainConfig]:
    """Checked (ModelConfig, TrainConfig) from flag values (FLAGS names; a flag not given keeps its default).

    The memory sits in the second-to-last block; a one-block model hosts it in its only block."""
    parts: dict[str, dict] = {"model": {}, "memory": {}, "train": {}}
    for flag, value in values.items():
        section, name = FLAGS[flag]
        parts[section][name] = value
    layers = parts["model"].get("n_layer", ModelConfig.n_layer)
    parts["memory"].setdefault("layer", max(MemoryConfig.layer, -layers))
    model = ModelConfig(**parts["model"], memory=MemoryConfig(**parts["memory"])).check()
    return model, TrainConfig(**parts["train"]).check(model.memory)


def flag_values(model: ModelConfig, train: TrainConfig) -> dict:
    """The value of every flag in these configs (FLAGS names)."""
    sections = {"model": model, "memory": model.memory, "train": train}
    return {flag: getattr(sections[section], name) for flag, (section, name) in FLAGS.items()}


# fields that configs written before they existed may lack, with the value that means the old behaviour
LEGACY_DEFAULTS = {MemoryConfig: {"value_dim": 0, "sharp": 0.0, "copy": False, "keep": 0.0, "knn_lm": 0.0, "trail": False, "drop": 0.0, "knn_exact": 0.0, "far_bytes": 32, "far_weight": 0.0, "shared_values": False}}
# what runs from before the entry budget mean, for experiments only (a resume refuses them: training
# would continue under another memory): the dense read they were trained with, retention by a byte's
# own surprise, and the same capacity as their slots x block entries (size None: computed below)
OLD_MEMORY = {"topk": 0, "span": 1, "size": None}


def model_config_from_dict(d: dict, strict: bool = False) -> ModelConfig:
    """A checked ModelConfig from config.json's "model" section. Every field must be present, except
    those older configs lack (LEGACY_DEFAULTS, and OLD_MEMORY unless strict): a missing field is a
    damaged file, never silently the default (a model with another head count loads the same weights).
    strict (a resume): OLD_MEMORY's fields too, as a resumed run must train exactly the model it continues."""
    d = dict(d)
    if strict and "memory" not in d:
        raise InputError("model.memory is missing")
    mem_d = {**LEGACY_DEFAULTS.get(MemoryConfig, {}), **({} if strict else OLD_MEMORY), **dict(d.pop("memory", {}))}
    if mem_d.get("size", 0) is None:  # before the entry budget: the same capacity as slots x block entries
        mem_d["size"] = max(1, int(mem_d.get("slots", MemoryConfig.slots))) * int(d.get("block_size", ModelConfig.block_size))
    mem = MemoryConfig(**_known(MemoryConfig, mem_d, "model.memory", True, strict))
    return ModelConfig(**_known(ModelConfig, d, "model", True, strict), memory=mem).check()


def train_config_from_dict(d: dict, strict: bool = False) -> TrainConfig:
    """A TrainConfig from config.json's "train" section; strict (resume): every field must be present."""
    return TrainConfig(**_known(TrainConfig, d, "train", strict, strict))


def _known(cls, d: dict, section: str = "", complete: bool = False, resume: bool = False) -> dict:
    """d's fields of cls; complete: each must be present (LEGACY_DEFAULTS aside)."""
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names - {"memory"}
    if unknown:
        raise InputError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    if complete:
        missing = [n for n in sorted(names - set(d) - {"memory"}) if n not in LEGACY_DEFAULTS.get(cls, {})]
        if missing:
            raise InputError(f"{section}.{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + (": the run cannot be continued as it was trained" if resume else ""))
    return {k: v for k, v in d.items() if k in names and k != "memory"}
