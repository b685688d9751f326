"""What the trainer callbacks share, without any trainer: imports, schedule derivation, set_schedule."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsegrow as sg
from sparsegrow.integrations._common import ScheduleSpec


def test_core_imports_no_trainer_framework():
    code = ("import sys, sparsegrow, sparsegrow.integrations; "
            "print(any(m.split('.')[0] in ('transformers', 'lightning') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("module,extra,framework", [
    ("huggingface", "hf", "transformers"), ("lightning", "lightning", "lightning")])
def test_missing_framework_names_the_extra(module, extra, framework):
    code = (f"import sys; sys.modules[{framework!r}] = None\n"
            f"import sparsegrow.integrations.{module}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert f"pip install sparsegrow[{extra}]" in out.stderr


def test_schedule_spec_builds_from_total_steps():
    s = ScheduleSpec(every=10, end=0.75, fraction=0.5, decay="linear").build(200)
    assert s == sg.UpdateSchedule(every=10, end=150, fraction=0.5, decay="linear")
    with pytest.raises(ValueError, match="total number of optimizer steps is unknown"):
        ScheduleSpec().build(None)


def test_set_schedule_decides_from_the_next_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = sg.Sparsifier(model, density=0.5, method="rigl", schedule=sg.UpdateSchedule(every=1, end=2))
    sp.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    sp.set_schedule(sg.UpdateSchedule(every=2, end=5))
    updates = []
    for _ in range(5):
        model(torch.randn(4, 8)).sum().backward()
        updates.append(sp.step() is not None)
    assert updates == [False, True, False, True, False]
    with pytest.raises(TypeError):
        sp.set_schedule({"every": 2})
