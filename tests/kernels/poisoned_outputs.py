"""A fixture for the launcher tests: the launchers allocate their outputs with Tensor.new_empty, which
here returns NaN-filled tensors, so an element a kernel fails to write shows up as NaN."""
import pytest
import torch


@pytest.fixture
def poisoned_outputs(monkeypatch):
    real_new_empty = torch.Tensor.new_empty
    allocated = []

    def new_empty_poisoned(self, size, *args, **kwargs):
        out = real_new_empty(self, size, *args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        allocated.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty_poisoned)
    return allocated
