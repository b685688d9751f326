"""Experiment configuration: defaults, then a YAML file, then `key=value` overrides.

Every key is a dataclass field below; unknown keys and wrong types are rejected with the dotted
path, the bad value and what is allowed. A config maps one-to-one onto constructor arguments of
the library (Sparsifier, UpdateSchedule, grow criteria) plus the training loop's settings.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    root: str | None = None  # else $SPARSEGROW_DATA_ROOT, else the data set's default location
    pad_to: int | None = None  # e.g. 32 for WideResNets on 28x28 images
    train_subset: int | None = None  # a seeded subset of the training set
    test_subset: int | None = None  # the first n test examples (quick runs; reports say so)
    augment: bool = False  # random crop (4 px) + flip, for 32x32 images


@dataclass
class ModelConfig:
    name: str = "lenet300100"
    kwargs: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # constant | cosine | step
    # µP's readout rule for sparse layers (sparsegrow.fan_in): a weight whose active fan-in F
    # (inputs per output unit) exceeds this trains at lr * lr_fan_in_base / F; null: lr everywhere
    lr_fan_in_base: int | None = None
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    eval_every: int = 1  # evaluate on the test set every n epochs; the last epoch always is
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float64 (e.g. to compare runs bit for bit)


@dataclass
class SparsityConfig:
    method: str = "rigl"  # a name of sparsegrow.METHODS (`sparsegrow list`)
    density: float = 0.1  # fraction of connections kept, over all sparse layers
    distribution: str = "erk"  # uniform | erdos_renyi | erk
    storage: str = "masked"  # masked | sparse (truly sparse Linear layers)
    update_every: Union[int, str] = 100  # ΔT in optimizer steps, or "epoch"
    update_start: int = 0
    update_end: float = 0.75  # T_end: a fraction (<= 1) of all steps, or a step count (> 1)
    fraction: float = 0.3  # alpha: update fraction at the first update
    decay: str = "cosine"  # constant | cosine | linear
    allow_regrow: bool = True
    grow_init: str = "zero"  # zero | random
    sparse_init: bool = False  # scale init by the active fan-in
    include: list | None = None  # fully qualified weight names; None = every Linear/Conv2d
    dense_layers: list = field(default_factory=list)
    fixed: list = field(default_factory=list)  # sparse weights that updates leave alone (names)
    drop: str | None = None  # override the method's drop criterion
    grow: str | None = None  # override the method's grow criterion
    fan_in: str | None = None  # free | constant (every output unit keeps as many inputs); None: the method's


@dataclass
class SearchConfig:
    backend: Optional[str] = None  # None: auto for storage sparse with search growth, else exact
    metric: str = "abs_ip"
    k_similar: float = 0.15
    bits: float = 1.0
    global_threshold: bool = True  # False: the thesis's per-query top-k (misses heavy rows)
    measure: str = "auto"  # recall/quality against exact top-K: auto | exact | sampled | off
    candidates: Optional[float] = None  # pairs scored per grown connection (sample-*, lowrank)
    quality_target: float = 0.8  # backend auto: the cheapest backend expected to reach it
    backend_options: dict = field(default_factory=dict)  # e.g. {rank: 8} (lowrank), {nprobe: 8}


@dataclass
class SignalConfig:
    sketch_dim: int = 0  # 0: no sketch, use the update step's batch
    accumulate: bool = False  # sum the signal over the ΔT steps since the last update


@dataclass
class DSTConfig:
    alpha: float = 5e-4  # the paper's MNIST value; see docs/dst.md for the sweep
    threshold: str = "vector"  # vector | scalar | weight


@dataclass
class OutputConfig:
    dir: str = "runs"
    checkpoint_every: int = 1  # epochs
    checkpoint_steps: int | None = None  # also every n optimizer steps (mid-epoch); None: off


@dataclass
class Config:
    name: str | None = None  # run name; default built from dataset, model, method, density, seed
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    signal: SignalConfig = field(default_factory=SignalConfig)
    dst: DSTConfig = field(default_factory=DSTConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def run_name(self) -> str:
        """dataset-model-method-<what was set>-s<seed>: the density (d0.02), or for a method whose
        density is learned the option that sets it (dst-alpha0.0005), since its d would not be
        the density measured."""
        if self.name:
            return self.name
        from sparsegrow import METHODS  # the package registers every method on import

        s = self.sparsity
        spec = METHODS.get(s.method)
        if spec.learned_density:
            setting = f"{spec.name_by}{getattr(getattr(self, spec.options), spec.name_by):g}"
        else:
            setting = "d" + ("1" if spec.dense else f"{s.density:g}")
        fan = "-cfi" if s.fan_in == "constant" and spec.fan_in != "constant" else ""
        return f"{self.data.dataset}-{self.model.name}-{s.method}{fan}-{setting}-s{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp, path: str) -> Any:
    """Return `value` coerced to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected a mapping of {tp.__name__} keys")
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    hint = " (YAML reads on/off/yes/no as booleans: quote the word)" if isinstance(value, bool) \
        and tp is str else ""
    raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}{hint}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"unknown key(s) {', '.join(repr(prefix + '.' + k if prefix else k) for k in unknown)} "
                          f"in {where}; allowed: {', '.join(names)}")
    kwargs = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


_YAML11_BOOL_WORDS = {"on", "off", "yes", "no", "y", "n"}


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. sparsity.density=0.05)")
    key, raw = text.split("=", 1)
    if raw.strip().lower() in _YAML11_BOOL_WORDS:  # YAML 1.1 would read "off" as False
        return key.strip().split("."), raw.strip()
    value = yaml.safe_load(raw) if raw != "" else None
    return key.strip().split("."), value


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path`, or a one-line ConfigError naming the file and the bad line."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML ({where}{what})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid YAML (not UTF-8 text)") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then dotted `key=value` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        loaded = read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
        data = loaded
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return from_dict(data)


def from_dict(data: dict) -> Config:
    merged = _merge(Config().to_dict(), data)
    cfg = _build(Config, merged)
    validate(cfg)
    _resolve_defaults(cfg)
    return cfg


def _resolve_defaults(cfg: Config) -> None:
    """Defaults that depend on other keys. search.backend: `auto` (the cheapest backend expected
    to reach search.quality_target, per layer and update) where a truly sparse layer is grown by
    search, since exact search's N·M·R product is what such widths cannot afford; else exact."""
    if cfg.search.backend is None:
        import sparsegrow

        s = cfg.sparsity
        grow = s.grow or sparsegrow.METHODS.get(s.method).grow
        cfg.search.backend = "auto" if s.storage == "sparse" and grow == "search" else "exact"


def validate(cfg: Config) -> None:
    """Checks of values (types are checked while building)."""
    t, s = cfg.train, cfg.sparsity
    if t.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {t.epochs}")
    if t.eval_every < 1:
        raise ConfigError(f"train.eval_every must be an epoch count >= 1, got {t.eval_every}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device must be cpu, cuda or cuda:N, got {t.device!r}")
    if t.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {t.batch_size}")
    if t.optimizer not in ("sgd", "adam", "adamw"):
        raise ConfigError(f"train.optimizer must be one of sgd, adam, adamw, got {t.optimizer!r}")
    if t.dtype not in ("float32", "float64"):
        raise ConfigError(f"train.dtype must be one of float32, float64, got {t.dtype!r}")
    if t.lr_schedule not in ("constant", "cosine", "step"):
        raise ConfigError(f"train.lr_schedule must be one of constant, cosine, step, got {t.lr_schedule!r}")
    if t.lr_fan_in_base is not None and t.lr_fan_in_base < 1:
        raise ConfigError(f"train.lr_fan_in_base must be an input count >= 1 or null, got {t.lr_fan_in_base}")
    if not 0.0 < s.density <= 1.0:
        raise ConfigError(f"sparsity.density must be in (0, 1], got {s.density}")
    if isinstance(s.update_every, str) and s.update_every != "epoch":
        raise ConfigError(f"sparsity.update_every must be a step count >= 1 or 'epoch', got {s.update_every!r}")
    import sparsegrow  # every method registers on import

    if s.method not in sparsegrow.METHODS:
        raise ConfigError(f"sparsity.method: unknown method {s.method!r}; allowed: "
                          f"{', '.join(sparsegrow.METHODS.names())}")
    def starts_dense(name: str) -> bool:  # GMP prunes from dense, DST learns its density
        spec = sparsegrow.METHODS.get(name)
        return spec.prune or spec.make is not None

    if t.lr_fan_in_base is not None and starts_dense(s.method):
        allowed = ", ".join(m for m in sparsegrow.METHODS.names() if not starts_dense(m))
        raise ConfigError(f"train.lr_fan_in_base scales by the fan-in at the start, but method "
                          f"{s.method!r} starts dense or learns its density; use it with one of "
                          f"{allowed}, or set it to null")
    if s.fan_in is not None and s.fan_in not in ("free", "constant"):
        raise ConfigError(f"sparsity.fan_in must be free, constant or null, got {s.fan_in!r}")
    if s.update_end <= 0:
        raise ConfigError(f"sparsity.update_end must be a fraction in (0, 1] or a step count > 1, got {s.update_end}")
    o = cfg.output
    if o.checkpoint_every < 1:
        raise ConfigError(f"output.checkpoint_every must be an epoch count >= 1, got {o.checkpoint_every}")
    if o.checkpoint_steps is not None and o.checkpoint_steps < 1:
        raise ConfigError(f"output.checkpoint_steps must be a step count >= 1 or null, got {o.checkpoint_steps}")


# What a resumed run may change: how long it trains (see loop.py, "Changing train.epochs on
# resume"), when it evaluates and checkpoints, and where or how fast it reads and computes.
# Everything else would make the run a mixture of two experiments.
RESUMABLE_KEYS = ("train.epochs", "train.eval_every", "train.threads", "output.checkpoint_every",
                  "output.checkpoint_steps", "output.dir", "data.root")


def _flat(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}, down to every leaf (model.kwargs included)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_resumable(saved: Config, cfg: Config, where: str) -> None:
    """Raise one ConfigError naming every key (other than RESUMABLE_KEYS) in which `cfg` differs
    from the config `saved` that the run at `where` was started with."""
    old, new = _flat(saved.to_dict()), _flat(cfg.to_dict())
    diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
             for k in sorted(old.keys() | new.keys())
             if old.get(k, "<unset>") != new.get(k, "<unset>") and k not in RESUMABLE_KEYS]
    if diffs:
        raise ConfigError(f"{where} holds a run of a different config ({'; '.join(diffs)}); only "
                          f"{', '.join(RESUMABLE_KEYS)} may change on resume: choose another run directory")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
