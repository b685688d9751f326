"""The one place where schedule, drop and grow meet.

    sparsifier = sparsegrow.Sparsifier(model, density=0.05, method="rigl",
                                       schedule=UpdateSchedule(every=100, end=7500))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # after the Sparsifier
    sparsifier.attach(optimizer)
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        stats = sparsifier.step()          # a dict on update steps, else None

At construction every chosen weight gets a random pattern at its layer's density (from the
distribution), so training is sparse from step 0. Each update (RigL's generic form): per layer,
n = round(f(t) * nnz); drop the n chosen by the drop criterion; grow n chosen by the grow criterion
among connections that are not active after the drop. A connection that is dropped and grown in
the same update ("regrown", only when `allow_regrow`, RigL's convention) keeps its weight and its
optimizer state, as if never dropped; it is counted in the stats. With allow_regrow=False the
just-dropped connections are excluded from growth (SET's convention). Weights named in `fixed`
stay sparse with their first pattern: updates (and the grow criterion's hooks) skip them, as the
thesis kept its classifier sparse but updated only the conv layers.

Distributed data-parallel training (torch.distributed, e.g. DistributedDataParallel): build the
Sparsifier on every rank with the same seed and arguments, after the process group is initialised
(it is found by itself; `process_group=` picks another). What growth reads is reduced across ranks
before every update and the ranks' topologies are checked to agree after it (see
`sparsegrow.distributed`); a mismatch raises `TopologyMismatch` naming the layer.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import coverage, distributions, optim_state
from .distributed import Collective
from .drop import DROP
from .grow import GROW, GrowContext, GrowCriterion
from .metrics import EverActive, density_report, itop_rate
from .registry import Registry
from .schedules import UpdateSchedule
from .selection import NonFiniteScores
from .signals import GrowSignals
from .topology import MaskedParam, SparseParam, isin_sorted, sample_inactive, sample_rows


@dataclass(frozen=True)
class Method:
    """A method of the one registry that `sparsegrow list`, configs and the contract tests read.

    drop, grow     criteria names (DROP, GROW); both None: the topology never changes
    dense          density forced to 1
    prune          start dense and prune toward the density by GMP's cubic schedule (Zhu & Gupta
                   2017), never growing: `drop` only, on the update steps of the schedule
    fan_in         "free" (default): a layer's connections lie anywhere; "constant": every output
                   unit keeps the same number of inputs, at init and after every update (SRigL)
    make           None: built by `Sparsifier`; else the constructor of a sparsifier of its own
                   kind, make(model, include=, seed=, **options) (DST learns its masks)
    options        the config section holding `make`'s keyword arguments (e.g. "dst")
    learned_density  the density is an outcome of training, not a setting; `name_by` is the option
                   that names its runs instead (e.g. "alpha": "...-dst-alpha0.0005-s0")
    """

    drop: str | None
    grow: str | None
    dense: bool = False
    prune: bool = False
    fan_in: str = "free"
    make: Callable | None = None
    options: str | None = None
    learned_density: bool = False
    name_by: str | None = None

    @property
    def updates(self) -> bool:
        """Whether the topology changes during training (what a schedule or a report's ΔT is for)."""
        return self.make is not None or self.prune or (self.drop is not None and self.grow is not None)


FAN_INS = ("free", "constant")

METHODS: Registry[Method] = Registry("method")
METHODS.add("dense", Method(None, None, dense=True), "dense training (density 1, same harness)")
METHODS.add("static", Method(None, None), "static sparse: a random pattern that never changes")
METHODS.add("set", Method("magnitude", "random"), "SET: magnitude drop, random grow (Mocanu 2018)")
METHODS.add("rigl", Method("magnitude", "gradient"),
            "RigL: magnitude drop, dense-gradient grow (Evci 2020)")
METHODS.add("gmp", Method("magnitude", None, prune=True),
            "gradual magnitude pruning: dense start, cubic schedule to the density, no regrowth "
            "(Zhu & Gupta 2017)")
METHODS.add("snfs", Method("magnitude", "momentum"),
            "SNFS: magnitude drop, grow by |momentum of the dense gradient| (Dettmers 2019; "
            "no layer redistribution)")
METHODS.add("srigl", Method("magnitude", "gradient", fan_in="constant"),
            "RigL with constant fan-in: drop and grow per output unit (Lasby 2024; no neuron "
            "ablation)")

STORAGES: Registry[Callable[..., SparseParam]] = Registry("storage")
STORAGES.add(
    "masked",
    lambda model, fqn, module, param_name, active: MaskedParam(fqn, module, param_name, active),
    "dense weight + boolean mask (any layer; the reference)",
)

GROW_INITS = ("zero", "random")


def default_filter(module: nn.Module, name: str) -> bool:
    """Every Linear and Conv2d weight, and nn.MultiheadAttention's projection weights (QKV
    `in_proj_weight` or q/k/v_proj_weight; `out_proj` is a Linear): masked storage serves them
    all; storages and criteria that cannot are refused by name (`sparsegrow.coverage`)."""
    return (isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight") or \
        coverage.is_attention_projection(module, name)


def select_params(model: nn.Module, include=None) -> list[tuple[str, nn.Module, str]]:
    """(fqn, module, param_name) of every weight to sparsify, in model order.

    include: None (`default_filter`: every Linear and Conv2d weight and attention projection), a list of fully qualified names
    ("features.0.weight"), or a filter function (module, param_name) -> bool, asked only about
    parameters of two or more dimensions.
    """
    found = []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            fqn = f"{mod_name}.{p_name}" if mod_name else p_name
            found.append((fqn, module, p_name, p.dim()))
    if include is None or callable(include):
        # A filter only sees weights of 2+ dims: biases and norm scales (1-D) always stay dense.
        keep = include or default_filter
        chosen = [t[:3] for t in found if t[3] >= 2 and keep(t[1], t[2])]
    else:
        names = list(include)
        by_name = {t[0]: t[:3] for t in found}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; the model has: {list(by_name)}")
        chosen = [by_name[n] for n in names]
    if not chosen:
        raise ValueError("no parameter was chosen to be sparse (include matched nothing)")
    return chosen


# ITOP record per layer: exact (8 B per connection ever active) up to max(its active count, this
# many), then a 16 KiB HyperLogLog sketch (metrics.EverActive).
ITOP_EXACT_MIN = 1 << 20

class Sparsifier:
    def __init__(
        self,
        model: nn.Module,
        density: float = 0.1,
        *,
        method: str = "set",
        schedule: UpdateSchedule | None = None,
        distribution: str = "erk",
        drop: str | None = None,
        grow: str | None = None,
        grow_kwargs: dict | None = None,
        include: Iterable[str] | Callable[[nn.Module, str], bool] | None = None,
        dense_layers: Iterable[str] = (),
        fixed: Iterable[str] = (),
        allow_regrow: bool = True,
        grow_init: str = "zero",
        sparse_init: bool = False,
        storage: str = "masked",
        fan_in: str | None = None,
        seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        process_group=None,
        distributed: bool = True,
    ):
        spec = METHODS.get(method)
        if spec.make is not None:
            raise ValueError(f"method {method!r} is not built by Sparsifier: use "
                             f"{spec.make.__module__}.{spec.make.__qualname__}(model, ...)")
        _check_wrapping(model, storage)
        if spec.dense:
            density = 1.0
        if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        if grow_init not in GROW_INITS:
            raise ValueError(f"unknown grow_init {grow_init!r}; allowed: {', '.join(GROW_INITS)}")
        self.method = method
        self.density = float(density)
        drop = drop if drop is not None else spec.drop
        grow = grow if grow is not None else spec.grow
        # GMP: start dense, prune by the cubic schedule (see `target_counts`), never grow
        self.prune = spec.prune
        self.fan_in = fan_in if fan_in is not None else spec.fan_in
        if self.fan_in not in FAN_INS:
            raise ValueError(f"unknown fan_in {self.fan_in!r}; allowed: {', '.join(FAN_INS)}")
        if self.prune and (grow is not None or drop is None):
            raise ValueError(f"method {method!r} prunes without growing: it takes a drop "
                             f"criterion and no grow criterion, got drop={drop!r}, grow={grow!r}")
        if self.prune and self.fan_in == "constant":
            raise ValueError(f"method {method!r} prunes by magnitude over whole layers; "
                             "fan_in='constant' applies to drop-and-grow methods")
        self.dynamic = drop is not None and (grow is not None or self.prune)
        if not self.prune and (drop is None) != (grow is None):
            raise ValueError(f"method {method!r} needs both drop and grow, got drop={drop!r}, grow={grow!r}")
        if self.dynamic and schedule is None:
            raise ValueError(f"method {method!r} updates the topology: pass schedule=UpdateSchedule(...)")
        self.schedule = schedule if self.dynamic else None
        self.drop = DROP.get(drop)() if self.dynamic else None
        self.grow = GROW.get(grow)(**(grow_kwargs or {})) if self.dynamic and grow else None
        if self.grow is not None and not isinstance(self.grow, GrowCriterion):
            raise ValueError(f"grow criterion {grow!r} is a {type(self.grow).__name__}, not a "
                             "sparsegrow.grow.GrowCriterion (needs_signal, select)")
        if self.fan_in == "constant" and self.grow is not None and not self.grow.per_row:
            raise ValueError(f"fan_in='constant' needs a grow criterion that chooses per output "
                             f"unit; {grow!r} does not (per_row: random, gradient, momentum, search with "
                             "backend='exact')")
        self.allow_regrow = allow_regrow
        self.grow_init = grow_init
        self.optimizer: torch.optim.Optimizer | None = None
        self._attached = False  # attach() was called (with an optimizer or None)
        self._enforce_every_step = True  # until an optimizer known to keep zeros is attached
        self.generator = torch.Generator().manual_seed(seed)  # the same on every rank
        self.dist = Collective(process_group, enabled=distributed)
        self.model = model  # squash() finalises it
        self.squashed = False

        chosen = select_params(model, include)
        # Masked storage keeps the module's own dense weight (any use is fine); every other
        # storage replaces the module. Search-like growth reads rows in the module's forward.
        need = self.grow.needs_signal if self.grow is not None else None  # what growth reads
        make = STORAGES.get(storage)  # an unknown storage is named first
        coverage.check(model, [c[0] for c in chosen], replaces_module=storage != "masked",
                       needs_rows=need is not None and need.kind == "rows", storage=storage,
                       method=method)
        dense_set = set(dense_layers)
        unknown = dense_set - {c[0] for c in chosen}
        if unknown:
            raise ValueError(f"dense_layers {sorted(unknown)} are not among the sparse parameters")
        self.fixed = set(fixed)
        unknown = self.fixed - {c[0] for c in chosen}
        if unknown:
            raise ValueError(f"fixed {sorted(unknown)} are not among the sparse parameters; "
                             f"allowed: {', '.join(c[0] for c in chosen)}")
        shapes = [tuple(getattr(m, n).shape) for _, m, n in chosen]
        counts = distributions.layer_counts(
            shapes, self.density, distribution, dense_mask=[c[0] in dense_set for c in chosen]
        )
        if self.fan_in == "constant":  # n_out x k per layer, k = round(count / n_out) in [1, fan-in]
            counts = [s[0] * min(max(1, round(c / s[0])), math.prod(s[1:]))
                      for s, c in zip(shapes, counts)]
        # the active count each parameter ends with (GMP reaches it at its last pruning step)
        self._final_counts = counts
        self.params: list[SparseParam] = []
        for (fqn, module, p_name), shape, count in zip(chosen, shapes, counts):
            numel = math.prod(shape)
            device = getattr(module, p_name).device
            if device.type == "meta":  # a model built on the meta device (truly sparse storage)
                device = torch.device("cpu")
            if self.prune and fqn not in self.fixed:
                active = torch.arange(numel, device=device)  # GMP starts dense
            elif self.fan_in == "constant":
                active = sample_rows(shape[0], numel // shape[0], count // shape[0],
                                     self.generator, device)
            else:
                active = sample_inactive(numel, torch.empty(0, dtype=torch.long), count,
                                         self.generator, device)
            self.params.append(make(model, fqn, module, p_name, active))
        if sparse_init:
            self._scale_init_to_active_fan_in()
        # the weights whose topology updates change; fixed ones stay sparse with their first mask
        self.updated = [p for p in self.params if p.fqn not in self.fixed]
        # ITOP: exact up to max(active count, 2^20) indices per layer, then a 16 KiB sketch
        self._itop_cap = {p.fqn: max(p.nnz(), ITOP_EXACT_MIN) for p in self.params}
        self.ever_active = {p.fqn: EverActive(p.active(), self._itop_cap[p.fqn])
                            for p in self.params}
        self.step_count = 0
        self.update_time_s = 0.0
        self.n_updates = 0
        self.dist.check_topology(self.params, "at construction")
        # what growth reads (dense gradient or layer rows), captured, summed and reduced here
        self.signals = GrowSignals(need, self.updated, self.dist) if need is not None else None
        self._last_update = self.schedule.update_steps()[-1] if self.dynamic else 0
        self._arm(1)
        if optimizer is not None:
            self.attach(optimizer)

    # -- lifecycle ---------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer | None) -> "Sparsifier":
        """The optimizer that trains the sparse weights; updates reset its state for dropped and
        grown connections (`optim_state.RESETS`). Required before the first topology update.

        Build it after the Sparsifier: storage="sparse" replaces each Linear weight by a new
        `values` Parameter. A ValueError names any sparse parameter the optimizer does not hold,
        and an optimizer class missing from the reset table (`optim_state.register_optimizer`).
        attach(None) says no torch optimizer trains these weights (you update them yourself):
        updates then reset no optimizer state, and step() re-zeroes inactive weights every step.
        """
        if optimizer is not None:
            optim_state.check_optimizer(optimizer, {p.fqn: p.param for p in self.params})
            for p in self.params:
                p.reset_inactive_state(optimizer)
        self.optimizer = optimizer
        self._attached = True
        self._enforce_every_step = optimizer is None or not optim_state.keeps_zero(optimizer)
        return self

    def step(self) -> dict | None:
        """Call once after each optimizer.step(). Returns the update's stats on update steps.

        Between updates inactive weights need no re-zeroing: their gradients are masked to exactly
        zero and their optimizer state holds the reset table's values, under which every optimizer
        in the table leaves a zero weight at zero (`optim_state.RESETS` says why, per optimizer).
        Weights are re-zeroed after updates, and on every step where that cannot be relied on
        (attach(None), or a registered optimizer without zero_stays_zero).
        """
        if not self._attached and self._is_update(self.step_count + 1):
            raise RuntimeError(
                f"step {self.step_count + 1} updates the topology, which resets the optimizer "
                "state of dropped and grown connections: call sparsifier.attach(optimizer) first "
                "(attach(None) if no torch optimizer trains the sparse weights)")
        if self.squashed:
            raise RuntimeError("this Sparsifier was squashed: its model is a plain dense model now")
        self.step_count += 1
        stats = self._update(self.step_count) if self._is_update(self.step_count) else None
        if stats is not None or self._enforce_every_step:
            for p in self.params:
                p.enforce()
        self._arm(self.step_count + 1)
        return stats

    def set_schedule(self, schedule: UpdateSchedule) -> None:
        """Replace the update schedule, e.g. once a trainer knows its total number of steps.

        Steps already taken keep their count; the new schedule decides from the next step on
        (what growth reads is re-armed for it). A no-op for methods that never update.
        """
        if not self.dynamic:
            return
        if not isinstance(schedule, UpdateSchedule):
            raise TypeError(f"schedule must be an UpdateSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self._last_update = schedule.update_steps()[-1]
        self._arm(self.step_count + 1)

    def _is_update(self, step: int) -> bool:
        return self.dynamic and self.schedule.is_update_step(step)

    def _arm(self, step: int) -> None:
        """Before the forward/backward of `step`: capture what the grow criterion reads then.

        Signals are captured on update steps only, or on every step of the schedule's window when
        the criterion accumulates them over the ΔT steps since the last update.
        """
        if self.signals is None:
            return
        window = self.signals.spec.accumulate and self.schedule.start < step <= self._last_update
        self.signals.arm(self._is_update(step) or window)

    def squash(self) -> nn.Module:
        """Finalise the model (torch.ao's squash_mask): every sparse weight becomes a plain
        module's dense weight with zeros in place; no gradient hook, mask buffer, signal hook or
        sparse layer is left, so its state_dict loads into a fresh dense model. Returns the model;
        this Sparsifier is done (step() raises). To keep the weights compact, use
        `sparsegrow.export_sparse` instead (before squashing)."""
        if self.signals is not None:
            self.signals.remove()
            self.signals = None
        for p in self.params:
            p.squash(self.model)
        self.params, self.updated, self.squashed = [], [], True
        return self.model

    remove = squash

    def target_counts(self, step: int | None = None) -> list[int]:
        """Active weights per sparse parameter (model order) after `step` optimizer steps
        (default: now). Constant for every method but GMP, whose count between its dense start
        n and its final count c follows Zhu & Gupta's cubic schedule, set at each pruning step t:

            count(t) = round(c + (n - c) * (1 - (t - t0) / (t_last - t0))^3)

        with t0 = schedule.start and t_last the last update step, so the density is exact from
        the last pruning step on."""
        step = self.step_count if step is None else step
        if not self.prune:
            return list(self._final_counts)
        s = self.schedule
        done = [u for u in s.update_steps() if u <= step]  # pruning steps taken so far
        out = []
        for p, final in zip(self.params, self._final_counts):
            if p.fqn in self.fixed:
                out.append(final)
            elif not done:
                out.append(p.numel)
            else:
                progress = (done[-1] - s.start) / (self._last_update - s.start)
                out.append(int(round(final + (p.numel - final) * (1 - progress) ** 3)))
        return out

    # -- the update --------------------------------------------------------------------------

    @torch.no_grad()
    def _update(self, step: int) -> dict:
        t0 = time.perf_counter()
        fraction = self.schedule.fraction_at(step)
        # every layer's signal, summed over micro-batches, window steps and ranks (a collective)
        signals = self.signals.collect() if self.signals is not None else {}
        layers = {}
        targets = dict(zip((p.fqn for p in self.params), self.target_counts(step)))
        for p in self.updated:
            active = p.active()  # (nnz,) sorted
            nnz = active.numel()
            if self.prune:  # GMP: drop down to the scheduled count, grow nothing
                n = nnz - targets[p.fqn]
            elif self.fan_in == "constant":  # the same n_row in each of the n_out rows
                rows = p.shape[0]
                n_row = int(round(fraction * nnz / rows))
                if not self.allow_regrow:
                    n_row = min(n_row, (p.numel - nnz) // rows)
                n = n_row * rows
            else:
                n = int(round(fraction * nnz))
                if not self.allow_regrow:
                    n = min(n, p.numel - nnz)
            if n == 0:
                layers[p.fqn] = {"dropped": 0, "grown": 0, "regrown": 0, "nnz": nnz,
                                 "skipped_nonfinite": False}
                continue
            sig = signals.get(p.fqn)
            ctx = GrowContext(p, active, step, sig)  # excluded: set after the drop
            try:
                if self.fan_in == "constant":
                    # active is sorted and every row holds nnz / rows of it: a (rows, k) view
                    k = nnz // rows
                    pos = self.drop.select_rows(p.values(active).view(rows, k), n_row,
                                                self.generator)  # (rows, n_row)
                    drop_pos = (pos + k * torch.arange(rows, device=pos.device)[:, None]).reshape(-1)
                else:
                    drop_pos = self.drop.select(p.values(active), n, self.generator)
                drop_idx = active[drop_pos]
                kept = torch.ones(nnz, dtype=torch.bool, device=active.device)
                kept[drop_pos] = False
                ctx.excluded = active[kept] if self.allow_regrow else active
                if self.prune:
                    grow_idx = torch.empty(0, dtype=torch.long, device=active.device)
                elif self.fan_in == "constant":
                    grow_idx = self.grow.select_rows(ctx, n_row, self.generator)
                else:
                    grow_idx = self.grow.select(ctx, n, self.generator)
            except NonFiniteScores as e:
                # NaN/inf weights or gradients: no meaningful choice, and a short selection
                # would change the layer's density. Keep its topology until they are finite
                # (every rank skips alike: weights and the reduced signal are the same there).
                warnings.warn(f"{p.fqn}: topology update at step {step} skipped: {e}",
                              RuntimeWarning, stacklevel=4)  # step()'s caller, via no_grad
                layers[p.fqn] = {"dropped": 0, "grown": 0, "regrown": 0, "nnz": nnz,
                                 "skipped_nonfinite": True}
                continue
            n_grow = 0 if self.prune else n
            if grow_idx.numel() != n_grow:  # a criterion's bug; silently it would drift the density
                raise RuntimeError(f"{p.fqn}: the grow criterion returned {grow_idx.numel()} "
                                   f"connections, not {n_grow}")
            regrown = isin_sorted(grow_idx, drop_idx)
            net_grow = grow_idx[~regrown]
            net_drop = drop_idx[~isin_sorted(drop_idx, grow_idx)]
            p.update(net_drop, net_grow, self._initial_values(p, net_grow), self.optimizer)
            # on the layer's device: a Sparsifier built before model.to(device) (the CLI's
            # meta-built truly sparse models) recorded its first active sets elsewhere
            self.ever_active[p.fqn].add(net_grow)
            layers[p.fqn] = {"dropped": n, "grown": n_grow, "regrown": int(regrown.sum()),
                             "nnz": p.nnz(), "skipped_nonfinite": False}
            if sig is not None:  # steps summed; time in this rank's capture hooks
                layers[p.fqn].update(signal_steps=sig.steps, signal_time_s=sig.time_s)
            # the grow criterion's own instrumentation (search: grow time, recall, quality)
            layers[p.fqn].update(ctx.stats)
        self.dist.check_topology(self.updated, f"after the update at step {step}")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # so time_s measures the work, not the launch
        dt = time.perf_counter() - t0
        self.update_time_s += dt
        self.n_updates += 1
        comm = self.signals.last_comm if self.signals is not None else {"bytes": 0, "time_s": 0.0}
        return {
            "step": step, "fraction": fraction, "time_s": dt,
            "signal_comm_bytes": comm["bytes"], "signal_comm_time_s": comm["time_s"],
            "dropped": sum(v["dropped"] for v in layers.values()),
            "grown": sum(v["grown"] for v in layers.values()),
            "regrown": sum(v["regrown"] for v in layers.values()),
            "skipped_nonfinite": sum(v["skipped_nonfinite"] for v in layers.values()),
            "layers": layers,
        }

    def _initial_values(self, p: SparseParam, idx: torch.Tensor) -> torch.Tensor:
        if self.grow_init == "zero":
            return torch.zeros(idx.numel(), device=idx.device)
        # "random": nn.Linear/Conv2d's default bound 1/sqrt(fan_in), drawn with the generator.
        bound = 1.0 / math.sqrt(p.numel // p.shape[0])
        u = torch.rand(idx.numel(), generator=self.generator)
        return ((2 * u - 1) * bound).to(idx.device)

    def _scale_init_to_active_fan_in(self) -> None:
        """Sparse-aware init: every storage scales its units by sqrt(fan_in / active fan_in)
        (a member of the SparseParam interface)."""
        for p in self.params:
            p.scale_init_to_active_fan_in()

    # -- reporting and state -----------------------------------------------------------------

    def report(self) -> dict:
        numel = {p.fqn: p.numel for p in self.params}
        rep = density_report({p.fqn: p.nnz() for p in self.params}, numel)
        rep["itop"] = itop_rate(self.ever_active, numel)
        rep["update_time_s"] = self.update_time_s
        rep["n_updates"] = self.n_updates
        return rep

    def masks(self) -> dict[str, torch.Tensor]:
        """Sorted active flat indices per parameter (storage-agnostic)."""
        return {p.fqn: p.active() for p in self.params}

    def state_dict(self) -> dict:
        state = {
            "step": self.step_count,
            "generator": self.generator.get_state(),
            "params": {p.fqn: p.state_dict() for p in self.params},
            "ever_active": {k: v.state_dict() for k, v in self.ever_active.items()},
            "update_time_s": self.update_time_s,
            "n_updates": self.n_updates,
        }
        if self.signals is not None:  # partial window sums included (a collective when distributed)
            state["signal"] = self.signals.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        names = [p.fqn for p in self.params]
        if sorted(state["params"]) != sorted(names):
            raise ValueError(f"state is for parameters {sorted(state['params'])}, not {sorted(names)}")
        for p in self.params:
            p.load_state_dict(state["params"][p.fqn])
            if self.optimizer is not None:  # connections the loaded masks turned off
                p.reset_inactive_state(self.optimizer)
        self.step_count = int(state["step"])
        # .cpu(): a generator state is a CPU ByteTensor, but a checkpoint loaded with
        # map_location="cuda" moves it with everything else
        self.generator.set_state(state["generator"].cpu())
        self.ever_active = {k: EverActive.from_state(v, self._itop_cap[k])
                            for k, v in state["ever_active"].items()}
        self.update_time_s = float(state["update_time_s"])
        self.n_updates = int(state["n_updates"])
        if self.signals is not None:
            if "signal" in state:
                self.signals.load_state_dict(state["signal"])
            elif "grow" in state:  # checkpoints from before the signal component: generators only
                self.signals.load_state_dict(state["grow"])
        self._arm(self.step_count + 1)


def _check_wrapping(model: nn.Module, storage: str) -> None:
    """Refuse the wrappers the Sparsifier cannot see through, with what to do instead."""
    from torch.nn.parallel import DistributedDataParallel

    fsdp: tuple[type, ...] = ()
    try:  # FSDP1 wrapper and FSDP2 (fully_shard) modules, where this torch build has them
        from torch.distributed.fsdp import FullyShardedDataParallel
        fsdp += (FullyShardedDataParallel,)
        from torch.distributed.fsdp import FSDPModule
        fsdp += (FSDPModule,)
    except ImportError:
        pass
    for name, m in model.named_modules():
        if fsdp and isinstance(m, fsdp):
            kind = type(m).__name__
            raise ValueError(
                f"{name or 'the model'} is wrapped in FSDP ({kind}); FSDP shards and flattens "
                "weights, so masks over whole weights cannot follow them. Supported: "
                "DistributedDataParallel (wrap after building the Sparsifier) or a single process")
    if isinstance(model, DistributedDataParallel) and storage != "masked":
        raise ValueError(
            f"storage={storage!r} replaces layers, which a DistributedDataParallel wrapper built "
            "before cannot see: build the Sparsifier on the plain model, then wrap it in "
            "DistributedDataParallel")


def sparsify(model: nn.Module, density: float = 0.1, **kwargs) -> Sparsifier:
    """Make `model`'s Linear and Conv2d weights sparse from now on; see `Sparsifier`."""
    return Sparsifier(model, density, **kwargs)
