"""SparsegrowCallback in a real transformers.Trainer: the masks of a plain loop, checkpoints, resume."""
import json
import os

import pytest
import torch
from torch import nn

import sparsegrow as sg

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402

from sparsegrow.integrations.huggingface import SparsegrowCallback  # noqa: E402

STEPS, BATCH, EVERY, LR = 12, 8, 3, 0.1


class TinyNet(nn.Module):
    """A Trainer-ready classifier: forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x)))  # (B, 4)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Blobs(torch.utils.data.Dataset):
    def __init__(self, n=STEPS * BATCH, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        self.y = (self.x[:, :4].argmax(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=BATCH,
                learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
                logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
                train_sampling_strategy="sequential")
    base.update(kw)
    return TrainingArguments(**base)


SPARSE = dict(density=0.3, method="rigl", seed=0)


def train_hf(tmp_path, resume=None, callback_kw=None, **args_kw):
    torch.manual_seed(0)
    model = TinyNet()
    cb = SparsegrowCallback(**{**SPARSE, "every": EVERY, "end": 0.75, **(callback_kw or {})})
    trainer = Trainer(model=model, args=make_args(tmp_path, **args_kw), train_dataset=Blobs(),
                      data_collator=default_data_collator, callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


def train_plain(steps=STEPS, accumulate=1, **sparse_kw):
    torch.manual_seed(0)
    model = TinyNet()
    sp = sg.Sparsifier(model, **{**SPARSE, **sparse_kw},
                       schedule=sg.UpdateSchedule(every=EVERY, end=int(0.75 * STEPS)))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sp.attach(opt)
    loader = torch.utils.data.DataLoader(Blobs(), batch_size=BATCH // accumulate, shuffle=False,
                                         collate_fn=default_data_collator)
    batches = iter(loader)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            b = next(batches)
            (model(**b)["loss"] / accumulate).backward()
        opt.step()
        sp.step()
    return model, sp


def assert_same_masks(a, b):
    ma, mb = a.masks(), b.masks()
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


def test_trainer_gives_the_masks_of_a_plain_loop(tmp_path):
    trainer, cb = train_hf(tmp_path)
    _, plain = train_plain()
    assert cb.sparsifier.step_count == STEPS and cb.sparsifier.n_updates == 2  # steps 3, 6
    assert_same_masks(cb.sparsifier, plain)
    for name, p in trainer.model.named_parameters():  # the optimizer kept inactive weights at 0
        if name.endswith("weight"):
            assert int((p != 0).sum()) == cb.sparsifier.masks()[name].numel()


def test_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    # 2 micro-batches of 4 per optimizer step: the same connections as one batch of 8
    _, cb = train_hf(tmp_path, per_device_train_batch_size=BATCH // 2, gradient_accumulation_steps=2)
    _, plain = train_plain(accumulate=2)
    assert cb.sparsifier.step_count == STEPS
    assert_same_masks(cb.sparsifier, plain)


def test_stats_are_logged_on_update_steps(tmp_path):
    trainer, _ = train_hf(tmp_path, logging_strategy="steps", logging_steps=5)
    history = trainer.state.log_history
    updates = [h for h in history if "sparsegrow/update_grown" in h]
    assert [h["step"] for h in updates] == [3, 6]
    assert all(h["sparsegrow/update_grown"] > 0 for h in updates)
    assert updates[-1]["sparsegrow/density"] == pytest.approx(0.3, abs=1e-3)
    assert updates[-1]["sparsegrow/itop"] > updates[0]["sparsegrow/itop"] > 0.3
    assert any(h["step"] == 5 and "sparsegrow/density" in h for h in history)


def test_checkpoint_and_resume_give_the_same_masks(tmp_path):
    # random data order (the Trainer restores its sampler's and RNG state on resume)
    random_order = dict(train_sampling_strategy="random")
    _, straight = train_hf(tmp_path / "a", **random_order)
    run = tmp_path / "b"
    train_hf(run, save_strategy="steps", save_steps=4, max_steps=STEPS, **random_order)
    ckpt = run / "out" / "checkpoint-4"
    assert (ckpt / "sparsegrow.pt").is_file()
    saved = torch.load(ckpt / "sparsegrow.pt", weights_only=False)
    assert saved["step"] == 4 and saved["n_updates"] == 1
    _, resumed = train_hf(run, resume=str(ckpt), **random_order)
    assert resumed.sparsifier.step_count == STEPS
    assert resumed.sparsifier.n_updates == straight.sparsifier.n_updates
    assert_same_masks(resumed.sparsifier, straight.sparsifier)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_without_the_sparsifier_state_is_refused(tmp_path):
    train_hf(tmp_path, save_strategy="steps", save_steps=4)
    ckpt = tmp_path / "out" / "checkpoint-4"
    os.remove(ckpt / "sparsegrow.pt")
    with pytest.raises(FileNotFoundError, match="sparsegrow.pt"):
        train_hf(tmp_path, resume=str(ckpt))


def test_schedule_given_or_derived(tmp_path):
    _, cb = train_hf(tmp_path, callback_kw={"schedule": sg.UpdateSchedule(every=5, end=11)})
    assert cb.sparsifier.schedule.update_steps() == [5, 10]
    with pytest.raises(ValueError, match="never fires"):  # every=100 in 12 steps
        train_hf(tmp_path, callback_kw={"every": 100})


def test_truly_sparse_storage_trains_checkpoints_and_resumes(tmp_path):
    # SparseLinear replaces the Linear layers at Trainer.__init__, before train() builds the
    # optimizer; SET (RigL's dense gradient is never formed there)
    sparse = {"storage": "sparse", "method": "set"}
    trainer, cb = train_hf(tmp_path / "a", callback_kw=sparse)
    _, plain = train_plain(method="set")
    assert isinstance(trainer.model.fc1, sg.SparseLinear)
    assert cb.sparsifier.step_count == STEPS
    assert_same_masks(cb.sparsifier, plain)  # the same connections as masked storage
    run = tmp_path / "b"
    train_hf(run, callback_kw=sparse, save_strategy="steps", save_steps=4)
    _, resumed = train_hf(run, resume=str(run / "out" / "checkpoint-4"), callback_kw=sparse)
    assert_same_masks(resumed.sparsifier, plain)


def test_an_optimizer_built_before_the_callback_is_refused_for_sparse_storage(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    cb = SparsegrowCallback(**{**SPARSE, "method": "set"}, every=EVERY, storage="sparse")
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=Blobs(),
                      data_collator=default_data_collator, callbacks=[cb], optimizers=(opt, None))
    with pytest.raises(ValueError, match="does not hold the sparse parameter"):
        trainer.train()


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        SparsegrowCallback(model=TinyNet())
    with pytest.raises(ValueError, match="dst"):
        SparsegrowCallback(method="dst")
    with pytest.raises(ValueError, match="fraction of the total"):
        SparsegrowCallback(end=75)


def _load_example(name):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_runs(tmp_path, capsys):
    report = _load_example("hf_trainer").main(["--steps", "30", "--every", "5", "--out", str(tmp_path)])
    assert report["global_density"] == pytest.approx(0.1, abs=1e-3) and report["n_updates"] == 4
    assert "ITOP" in capsys.readouterr().out


def test_moved_first_the_callback_reaches_reporters_before_it(tmp_path):
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):  # stands for report_to's callbacks, which come before ours
        seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    torch.manual_seed(0)
    cb = SparsegrowCallback(**SPARSE, every=EVERY)
    trainer = Trainer(model=TinyNet(), args=make_args(tmp_path), train_dataset=Blobs(),
                      data_collator=default_data_collator, callbacks=[Reporter(), cb])
    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(SparsegrowCallback))
    trainer.train()
    assert [int(s["sparsegrow/update_grown"] > 0) for s in Reporter.seen
            if "sparsegrow/update_grown" in s] == [1, 1]
