"""The training recipe: one run from a Config into a run directory, resumable.

    run_dir/config.yaml     the resolved config
    run_dir/metrics.jsonl   {"kind": "epoch", ...} per epoch, {"kind": "update", ...} per update
    run_dir/checkpoint.pt   model, optimizer, sparsifier, RNG states, position (epoch, batch, step),
                            log length; every output.checkpoint_every epochs and, if set, every
                            output.checkpoint_steps optimizer steps (mid-epoch)
    run_dir/summary.json    the final numbers, written last

Determinism: the data order and augmentation of epoch e come from a generator seeded with
(seed, e), the sparsifier carries its own generator, and the global torch RNG (dropout) is saved
in the checkpoint, so a resumed run reproduces an uninterrupted one on the same machine. A
checkpoint taken mid-epoch records how many of the epoch's batches were trained; the resumed
epoch draws the same permutation and augmentation from its generator and discards those batches.

Changing train.epochs on resume. The learning-rate schedule and the sparsity schedule (its end
`update_end` when a fraction, and the decay of the update fraction up to it) are functions of the
total step count, steps_per_epoch * train.epochs. A resumed run with a different train.epochs
keeps the steps already taken as they were and follows the schedules of the new total from its
checkpoint on, as if it had been planned that long: with cosine lr the rate jumps from the old
curve up to the new one, and topology updates that had stopped at the old end resume until the
new one. That is not the same as training the new length from the start, so each change is
recorded in the checkpoint and the summary ("epochs_changes": [{"step", "from", "to"}]) and the
report shows it beside the epoch count. A finished run can be extended; an unfinished one can also
be shortened, to more epochs than it has trained.
"""
from __future__ import annotations

import inspect
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .build import build_optimizer, build_sparsifier, lr_at, resolve_device
from .config import Config, ConfigError, check_resumable, dump_config, from_dict, read_yaml
from .data import load_dataset, steps_per_epoch
from .launch import World, all_sum, init_from_env, local_share, shutdown
from ..layers.sparse_linear import SparseLinear
from .models import _init_conv_bn, build_model
from .results import (CorruptFileError, MetricsLog, atomic_torch_save, atomic_write_json,
                      atomic_write_text, load_checkpoint, read_json)


DTYPES = {"float32": torch.float32, "float64": torch.float64}  # train.dtype
# DDP's switch for "do not re-send buffers at every forward": renamed in newer torch releases.
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                           inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


class Timer:
    """Accumulates wall time per phase; synchronises CUDA so the phases are honest."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._t
        self._t = now

    def reset(self) -> None:
        self._t = time.perf_counter()


@torch.no_grad()
def memory_now(device: torch.device) -> dict[str, str]:
    """The process's resident memory now (and the CUDA memory its tensors hold), for the progress
    bar: {"rss": "1.23G"} (+ {"gpu": ...}); {} where /proc is missing (not Linux)."""
    out = {}
    try:
        with open("/proc/self/statm") as f:
            out["rss"] = f"{int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30:.2f}G"
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        out["gpu"] = f"{torch.cuda.memory_allocated(device) / 2**30:.2f}G"
    return out


EVAL_ACTIVATION_BYTES = 512 << 20  # per Linear output tensor during evaluation


def reset_peaks(device: torch.device) -> bool:
    """Start this run's memory peaks at the memory in use now, so that a run's peak is its own
    when one process trains several runs (`sparsegrow sweep --jobs 1`). The resident set's mark
    is Linux's VmHWM, reset through /proc/self/clear_refs; returns False where that fails (the
    peak is then the process's, which may include an earlier run's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """VmHWM where /proc has it (reset by reset_peaks), else getrusage's process-long peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # macOS: bytes; else KiB


def run_peaks(carried: dict, device: torch.device, reset: bool) -> dict:
    """The run's memory peaks in MiB: this process's since reset_peaks, or a process's before it
    that trained the run to a checkpoint (carried: what that checkpoint recorded), whichever is
    higher. A resumed run's summary so states the whole run's peak, not its last piece's.
    carried: a checkpoint's "peaks" (this function's result), any key absent; {} for a fresh run.
    reset: what reset_peaks returned.
    peak_rss_mib: the resident set's high-water mark;
    peak_gpu_mib: allocated CUDA memory (tensors, not the allocator's cache), None off CUDA."""
    rss = _peak_rss_mib()
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    old_rss, old_gpu = carried.get("peak_rss_mib"), carried.get("peak_gpu_mib")
    return {"peak_rss_mib": max(rss, old_rss or 0.0),
            "peak_gpu_mib": gpu if old_gpu is None else max(gpu or 0.0, old_gpu),
            # True: a checkpoint this run resumed from did not record its processes' peaks, so
            # the peaks above may understate the run's
            "peaks_partial": bool(carried.get("peaks_partial", False)),
            # "process": the peak could not be reset at the run's start, so it may hold an
            # earlier run's trained in the same process
            "peak_rss_scope": ("run" if reset and carried.get("peak_rss_scope", "run") == "run"
                               else "process")}


def eval_batch_size(model: torch.nn.Module, batch_size: int) -> int:
    """max(batch_size, 1000) examples per evaluation batch, fewer where the widest Linear output
    would exceed EVAL_ACTIVATION_BYTES (at 10⁶ units, 1000 examples are 4 GB per activation and the
    evaluation of configs/scale_1m.yaml peaked at 21 GB), never fewer than batch_size."""
    widest = max((m.out_features for m in model.modules()
                  if isinstance(m, (torch.nn.Linear, SparseLinear))), default=0)
    fit = EVAL_ACTIVATION_BYTES // (4 * widest) if widest else 1000
    return max(batch_size, min(1000, fit))


@torch.no_grad()  # no autograd graph: each activation is freed once the next layer has read it
def evaluate(model, data, batch_size: int, device, dtype=torch.float32) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for xb, yb in data.test_batches(eval_batch_size(model, batch_size)):
        xb, yb = xb.to(device, dtype), yb.to(device)
        out = model(xb)
        loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
        n += len(yb)
    model.train()
    return loss_sum / n, correct / n


def materialise_dense(model: torch.nn.Module) -> list[str]:
    """Allocate, on the CPU, the parameters and buffers a meta-device model still holds on meta
    (BatchNorm, layers left dense) and initialise them with their module's reset_parameters()
    (BatchNorm: weight 1, bias 0, fresh running statistics; Linear/Conv2d: PyTorch's default).
    Module by module: the truly sparse layers, already real, are left alone. Returns the names
    of the modules materialised; a module with meta tensors and no reset_parameters is an error."""
    done = []
    for name, m in model.named_modules():
        own = list(m._parameters.values()) + list(m._buffers.values())
        if not any(t is not None and t.is_meta for t in own):
            continue
        reset = getattr(m, "reset_parameters", None)
        if reset is None:
            raise ConfigError(f"sparsity.storage=sparse builds the model on the meta device; "
                              f"{name or 'the model'} ({type(m).__name__}) has dense tensors but no "
                              "reset_parameters() to initialise them: use storage=masked")
        m.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            reset()
        done.append(name)
    return done


def build_model_and_sparsifier(cfg: Config, data, steps_per_epoch: int, device: torch.device,
                               dtype: torch.dtype = torch.float32):
    """The run's model on `device` and its sparsifier, initialised as the config says.

    Truly sparse storage builds the model on the meta device so no dense weight is ever
    allocated: the sparsifier replaces the chosen Linear and Conv2d layers by SparseLinear /
    SparseConv2d, then the dense rest (BatchNorm, unchosen layers) is materialised and the
    convolutions get the models' init at their active weights. `sparsity.sparse_init` scales
    every sparse layer once, after that init (scaling in the sparsifier too would scale the
    Linear layers twice: ×sqrt(fan_in / active fan_in) more, e.g. ×114 at 262,144 inputs).
    """
    model_cfg = cfg.model
    if cfg.sparsity.storage == "sparse":
        with torch.device("meta"):
            model = build_model(model_cfg.name, data.input_shape, data.num_classes, **model_cfg.kwargs)
        sparsifier = build_sparsifier(cfg, model, steps_per_epoch, sparse_init=False)
        materialise_dense(model)
        _init_conv_bn(model)  # the models' conv/BN init, at the active weights of sparse convs
        if cfg.sparsity.sparse_init:
            sparsifier._scale_init_to_active_fan_in()
        model.to(device, dtype)
    else:
        model = build_model(model_cfg.name, data.input_shape, data.num_classes, **model_cfg.kwargs)
        model.to(device, dtype)
        sparsifier = build_sparsifier(cfg, model, steps_per_epoch)
    return model, sparsifier


def read_run_config(run_dir: str | Path) -> Config | None:
    """The config a run directory was started with (its config.yaml, read with today's defaults
    for keys added since), or None if it has none; a damaged file is an error naming it."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: should hold a mapping of config keys, holds {type(data).__name__}")
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def has_progress(run_dir: str | Path) -> bool:
    """Whether train(resume=True) has something to continue or return: a checkpoint or a summary."""
    return (Path(run_dir) / "checkpoint.pt").exists() or (Path(run_dir) / "summary.json").exists()


def _target_density(cfg: Config) -> float | None:
    """The density the config asks for; None where the method learns it (DST)."""
    import sparsegrow

    spec = sparsegrow.METHODS.get(cfg.sparsity.method)
    return None if spec.learned_density else (1.0 if spec.dense else cfg.sparsity.density)


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train one run; returns the summary dict (also written to run_dir/summary.json).

    resume: continue the run in run_dir from its checkpoint (an error if it has none), or return
        its summary if it finished at cfg.train.epochs. cfg may differ from the run's config.yaml
        only in config.RESUMABLE_KEYS; a different train.epochs extends or shortens the run as
        the module docstring says.
    """
    run_dir = Path(run_dir)
    ckpt_path, summary_path = run_dir / "checkpoint.pt", run_dir / "summary.json"
    saved = None
    if resume:
        saved = read_run_config(run_dir)
        if saved is not None:
            check_resumable(saved, cfg, f"run directory {str(run_dir)!r}")
        if summary_path.exists():
            summary = read_json(summary_path)
            finished = summary.get("epochs", cfg.train.epochs)
            if finished == cfg.train.epochs:
                return summary
            if finished > cfg.train.epochs:
                raise ConfigError(f"train.epochs={cfg.train.epochs}: run directory {str(run_dir)!r} "
                                  f"finished {finished} epochs; a finished run can be extended, not shortened")
        if not ckpt_path.exists():
            raise ConfigError(f"--resume: run directory {str(run_dir)!r} holds no checkpoint to continue "
                              "(nothing trained, or interrupted before the first checkpoint); "
                              "train without --resume to start it")
    else:
        if summary_path.exists():
            raise ConfigError(f"run directory {str(run_dir)!r} already holds a finished run; "
                              "pass --resume to keep it or choose another run directory")
        if ckpt_path.exists():
            raise ConfigError(f"run directory {str(run_dir)!r} already holds a checkpoint; "
                              "pass --resume to continue it or choose another run directory")

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    world = init_from_env(t.device)  # torchrun's environment; one process otherwise
    try:
        return _train(cfg, run_dir, resume, progress and world.main, device, world, saved)
    finally:
        shutdown(world)


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool, device: torch.device,
           world: World, saved: Config | None) -> dict:
    """The run itself; every rank runs it, rank 0 alone writes files (`world.main`)."""
    t = cfg.train
    ckpt_path = run_dir / "checkpoint.pt"
    if world.distributed:
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
        if t.batch_size % world.size:
            raise ConfigError(f"train.batch_size={t.batch_size} is the global batch; it must split "
                              f"evenly over {world.size} processes")
    peaks_reset = reset_peaks(device)  # this rank's device, the one run_peaks reads
    dtype = DTYPES[t.dtype]
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data.dataset, root=cfg.data.root, pad_to=cfg.data.pad_to,
                        train_subset=cfg.data.train_subset, seed=cfg.seed,
                        test_subset=cfg.data.test_subset)
    spe = steps_per_epoch(len(data.train_y), t.batch_size)
    total_steps = spe * t.epochs
    model, sparsifier = build_model_and_sparsifier(cfg, data, spe, device, dtype)
    # Several processes: DistributedDataParallel averages the gradients; the Sparsifier (built
    # first, on every rank alike) reduces its growth signal and checks that topologies agree.
    # broadcast_buffers=False: DDP would otherwise re-send every buffer from rank 0 at each
    # forward, SparseLinear's index buffers included (5 x nnz int64: ~100 MiB per step at
    # 16384², density 0.01), although the topology check keeps them equal. Only rank 0's
    # buffers (BatchNorm statistics) are ever evaluated or saved.
    net = DistributedDataParallel(model, **_NO_FORWARD_BUFFER_SYNC) if world.distributed else model
    optimizer = build_optimizer(cfg, model, sparsifier)
    sparsifier.attach(optimizer)
    # the scaled weights, as the optimizer holds them (split_param_groups: one group each)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_scales = {names[id(g["params"][0])]: g["lr_scale"] for g in optimizer.param_groups
                 if g["lr_scale"] != 1.0}
    if lr_scales and world.main:
        tqdm.write("lr × base / active fan-in (train.lr_fan_in_base=" f"{t.lr_fan_in_base}): "
                   + ", ".join(f"{n} × {v:.3g}" for n, v in lr_scales.items()))
    extra_loss = getattr(sparsifier, "loss", None)  # DST's sparsity regulariser

    start_epoch, start_batch, step = 0, 0, 0  # where training stands: batches of epoch, steps
    train_time, phase_totals, log_len = 0.0, {}, 0
    sums = (0.0, 0, 0)  # (train loss sum, correct, seen) of the epoch in progress
    test_loss = test_acc = float("nan")
    epochs_changes: list[dict] = []  # {"step", "from", "to"} per change of train.epochs
    carried_peaks: dict = {}  # memory peaks of the processes that trained this run before
    if resume:
        ckpt = load_checkpoint(ckpt_path, device)
        model.load_state_dict(ckpt["model"])
        sparsifier.load_state_dict(ckpt["sparsifier"])
        scales = [group["lr_scale"] for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])  # its groups replace the built ones...
        for group, scale in zip(optimizer.param_groups, scales):  # ...older ones lack lr_scale
            group["lr_scale"] = scale
        torch.set_rng_state(ckpt["torch_rng"].cpu())  # loaded onto `device` with the rest
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), device)
        start_epoch, start_batch, step = ckpt["epoch"], ckpt.get("batch", 0), ckpt["step"]
        if step != start_epoch * spe + start_batch:
            raise CorruptFileError(f"{ckpt_path}: step {step} is not batch {start_batch} of epoch "
                                   f"{start_epoch + 1} at {spe} steps per epoch; not this run's checkpoint")
        trained = start_epoch + (start_batch > 0)  # epochs begun
        planned = ckpt.get("epochs", saved.train.epochs if saved else t.epochs)
        if t.epochs < trained or (t.epochs == trained and planned != t.epochs):
            raise ConfigError(f"train.epochs={t.epochs}: the checkpoint in {str(run_dir)!r} has begun "
                              f"{trained} epoch(s); a run can be shortened only to more epochs than that")
        train_time, phase_totals, log_len = ckpt["train_time_s"], ckpt["phases"], ckpt["log_len"]
        if world.main:  # the saved sums are over all ranks: one rank carries them on
            sums = tuple(ckpt.get("epoch_sums", sums))
        test_loss, test_acc = ckpt.get("test_loss", test_loss), ckpt.get("test_acc", test_acc)
        epochs_changes = list(ckpt.get("epochs_changes", []))
        # older checkpoints lack the peaks: the summary then says its peaks are this process's
        carried_peaks = ckpt.get("peaks", {"peaks_partial": True})
        if planned != t.epochs:
            epochs_changes.append({"step": step, "from": planned, "to": t.epochs})
    log = MetricsLog(run_dir / "metrics.jsonl", truncate_to=log_len) if world.main else None
    if world.main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    def save_checkpoint(epoch: int, batch: int, train_time_s: float, phases: dict, epoch_sums) -> None:
        """Commit the log, then write where training stands: `batch` batches of epoch `epoch`
        (0-based) trained, `step` steps in all. Every rank takes part (the sparsifier's state and
        the epoch's sums are reduced over ranks); rank 0 writes."""
        sp_state = sparsifier.state_dict()  # a collective under torch.distributed
        epoch_sums = all_sum(list(epoch_sums), world)
        if not world.main:
            return
        atomic_torch_save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sparsifier": sp_state, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "epoch": epoch, "batch": batch, "step": step, "epoch_sums": list(epoch_sums),
            "train_time_s": train_time_s, "phases": dict(phases), "log_len": log.commit(),
            "test_loss": test_loss, "test_acc": test_acc,  # of the last evaluated epoch
            "epochs": t.epochs, "epochs_changes": epochs_changes, "world_size": world.size,
            "peaks": run_peaks(carried_peaks, device, peaks_reset),
        }, ckpt_path)

    try:
        for epoch in range(start_epoch, t.epochs):
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            batches = data.train_batches(t.batch_size, gen, augment=cfg.data.augment)
            first = start_batch if epoch == start_epoch else 0
            for _ in range(first):  # trained before a mid-epoch checkpoint: draw, discard
                next(batches)
            loss_sum, correct, seen = sums if first else (0.0, 0, 0)
            timer = Timer(device)
            timer.totals = dict(phase_totals)
            epoch_t0 = time.perf_counter()
            bar = tqdm(batches, total=spe, initial=first, desc=f"epoch {epoch + 1}/{t.epochs}",
                       disable=not progress, leave=False, dynamic_ncols=True)
            for batch, (xb, yb) in enumerate(bar, start=first):
                lr = lr_at(cfg, step, total_steps, spe)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                xb, yb = local_share(xb, world), local_share(yb, world)  # this rank's share
                xb = xb.to(device, dtype, non_blocking=True)
                yb = yb.to(device, non_blocking=True)
                timer.reset()
                out = net(xb)
                loss = F.cross_entropy(out, yb, label_smoothing=t.label_smoothing)
                total_loss = loss + extra_loss() if extra_loss is not None else loss
                timer.lap("forward")
                optimizer.zero_grad(set_to_none=True)
                total_loss.backward()
                timer.lap("backward")
                optimizer.step()
                timer.lap("optimizer")
                stats = sparsifier.step()
                timer.lap("update")
                step += 1
                if stats is not None and log is not None:
                    log.write({"kind": "update", "epoch": epoch, **stats})
                loss_sum += loss.item() * len(yb)
                correct += (out.argmax(1) == yb).sum().item()
                seen += len(yb)
                if progress and step % 10 == 0:
                    rep = sparsifier.report()
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                    density=f"{rep['global_density']:.4f}", **memory_now(device))
                if cfg.output.checkpoint_steps and step % cfg.output.checkpoint_steps == 0:
                    saving_t0 = time.perf_counter()
                    save_checkpoint(epoch, batch + 1, train_time + saving_t0 - epoch_t0, timer.totals,
                                    (loss_sum, correct, seen))
                    epoch_t0 += time.perf_counter() - saving_t0  # writing it is not training time
            bar.close()
            train_time += time.perf_counter() - epoch_t0
            phase_totals = timer.totals
            if not world.main:  # rank 0 evaluates (the models are equal) and writes
                test_loss = test_acc = None
            elif (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
                test_loss, test_acc = evaluate(model, data, t.batch_size, device, dtype)
            else:  # logged as null: not measured this epoch
                test_loss = test_acc = None
            rep = sparsifier.report()
            g_loss, g_correct, g_seen = all_sum([loss_sum, correct, seen], world)  # global batch
            record = {
                "kind": "epoch", "epoch": epoch + 1, "step": step, "lr": lr_at(cfg, step - 1, total_steps, spe),
                "train_loss": g_loss / g_seen, "train_acc": g_correct / g_seen,
                "test_loss": test_loss, "test_acc": test_acc,
                "global_density": rep["global_density"], "layer_density": rep["layers"],
                "itop": rep["itop"], "train_time_s": train_time,
                "update_time_s": rep["update_time_s"], "phases_s": phase_totals,
            }
            if log is not None:
                log.write(record)
            if progress:
                tqdm.write(f"epoch {epoch + 1}/{t.epochs}  train loss {record['train_loss']:.4f}  "
                           f"acc {record['train_acc']:.4f}  test acc "
                           f"{'-' if test_acc is None else f'{test_acc:.4f}'}  "
                           f"density {rep['global_density']:.4f}  itop {rep['itop']:.4f}")
            if (epoch + 1) % cfg.output.checkpoint_every == 0 or epoch + 1 == t.epochs:
                save_checkpoint(epoch + 1, 0, train_time, phase_totals, (0.0, 0, 0))
    finally:
        if log is not None:
            log.close()

    rep = sparsifier.report()
    summary = {
        "name": cfg.run_name(), "seed": cfg.seed, "dataset": cfg.data.dataset,
        "model": cfg.model.name, "method": cfg.sparsity.method,
        "target_density": _target_density(cfg), "density": rep["global_density"],
        "layer_density": rep["layers"], "itop": rep["itop"], "epochs": t.epochs, "steps": step,
        "world_size": world.size,
        "epochs_changes": epochs_changes,
        "test_acc": test_acc, "test_loss": test_loss, "train_time_s": train_time,
        "update_time_s": rep["update_time_s"], "n_updates": rep["n_updates"],
        "phases_s": phase_totals, "lr_scales": lr_scales,
        **run_peaks(carried_peaks, device, peaks_reset),
        "machine": f"{platform.node()} {platform.machine()} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}", "device": str(device),
    }
    if world.main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary
