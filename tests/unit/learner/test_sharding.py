"""learner.sharding without a process group: DCP round trip through the allow-listing reader, and its refusals."""

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from learner.sharding import SafeFileSystemReader, UnsafeMetadataError, load_sharded, save_sharded


class _Planted:
    """Unpickling this would run os.system: what a planted .metadata would do."""

    def __reduce__(self):
        return (os.system, ("echo planted",))


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_saved_model_and_optimizer_load_back_through_the_safe_reader(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    param_groups = save_sharded(tmp_path / "ckpt", model, optimizer)
    assert param_groups[0]["lr"] == 1e-2 and all(isinstance(name, str) for name in param_groups[0]["params"])
    fresh, fresh_optimizer = _model_and_optimizer(1)
    load_sharded(tmp_path / "ckpt", fresh, fresh_optimizer, param_groups)
    for (name, value), loaded in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(value, loaded), name
    saved = optimizer.state_dict()["state"]
    for index, state in fresh_optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], saved[index]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], saved[index]["exp_avg_sq"])


def test_a_planted_metadata_pickle_is_refused_not_run(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    model, optimizer = _model_and_optimizer(0)
    save_sharded(tmp_path / "ckpt", model, optimizer)
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_Planted()))
    with pytest.raises(UnsafeMetadataError, match="os|posix|system"):
        SafeFileSystemReader(tmp_path / "ckpt").read_metadata()
    assert "planted" not in capfd.readouterr().out


def test_the_reader_accepts_what_dcp_writes(tmp_path: Path) -> None:
    dcp.save({"weights": torch.arange(6.0).reshape(2, 3)}, storage_writer=dcp.FileSystemWriter(tmp_path))
    metadata = SafeFileSystemReader(tmp_path).read_metadata()
    assert metadata.state_dict_metadata["weights"].size == torch.Size([2, 3])
