import pickle

import pytest
import torch

from glsd_cli.engine.checkpoint import (load_state_strict, read_checkpoint, save_tensors, sub_dict)
from glsd_cli.errors import CheckpointError
from glsd_cli.eval.loading import load_pretrained
from glsd_cli.pretraining import build_pretraining


def _method(cfg):
    setup = build_pretraining(cfg, 96)
    return setup.cfg, setup.method


def test_round_trip_gives_identical_outputs(tiny_cfg, tmp_path):
    cfg, method = _method(tiny_cfg)
    path = tmp_path / "last.safetensors"
    tensors = {f"model/{k}": v for k, v in method.state_dict().items()}
    save_tensors(path, tensors, {"kind": "pretrain", "config": cfg.to_json(), "position": "{}", "optim_groups": "{}"})
    cfg2, loaded, file = load_pretrained(path)
    assert cfg2 == cfg and file == path
    x = torch.randn(3, 3, 16, 16)
    for which in ("teacher", "student"):
        method.eval()
        assert torch.equal(method.backbone(which)(x), loaded.backbone(which)(x))
    assert torch.equal(method.teacher["head"](torch.randn(1, 48).fill_(0.5)),
                       loaded.teacher["head"](torch.randn(1, 48).fill_(0.5)))
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_strict_load_names_missing_and_unexpected_keys(tiny_cfg):
    _, method = _method(tiny_cfg)
    state = method.state_dict()
    state.pop("student.head.mlp.0.weight")
    state["student.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys student\.head\.mlp\.0\.weight.*unexpected keys student\.extra"):
        load_state_strict(method, state, "test checkpoint")


def test_shape_mismatch_is_named(tiny_cfg):
    _, method = _method(tiny_cfg)
    state = method.state_dict()
    state["dino_loss.center"] = torch.zeros(1, 3)
    with pytest.raises(CheckpointError, match="shape mismatch dino_loss.center"):
        load_state_strict(method, state, "x")


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pth"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_checkpoint(path)
    assert not marker.exists()
    torch.save({"a": torch.zeros(1)}, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        read_checkpoint(tmp_path / "t.pt")


def test_truncated_and_foreign_files_give_clear_errors(tmp_path, tiny_cfg):
    from safetensors.torch import save_file

    path = tmp_path / "c.safetensors"
    save_tensors(path, {"model/a": torch.zeros(100)}, {"kind": "pretrain"})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors is truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a glsd checkpoint"):
        read_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="without last.safetensors"):
        read_checkpoint(tmp_path)


def test_sub_dict_strips_prefix():
    assert sub_dict({"model/a": 1, "optim/b": 2}, "model/") == {"a": 1}


@pytest.mark.parametrize("header_start", [b"\x80", b"PK"])
def test_safetensors_whose_header_length_starts_like_a_pickle_still_load(tmp_path, header_start):
    # A safetensors file begins with its header length (u64 little-endian): a length whose first
    # bytes are 0x80 (the pickle protocol byte) or "PK" (torch.save's zip, 0x4B50 = 19280 bytes)
    # must not be taken for a pickle. (A real demo checkpoint had a 33408-byte header: 0x8280.)
    path = tmp_path / "last.safetensors"
    save_tensors(path, {"w": torch.arange(3.0)}, {"pad": ""})
    base = int.from_bytes(path.read_bytes()[:8], "little")
    target = 0x0180 if header_start == b"\x80" else 0x4B50  # little-endian: 80 01 ... / 50 4B ...
    # The header grows by one byte per padding character, then is padded to a multiple of 8.
    for pad in range(max(target - base - 8, 0), target - base + 9):
        save_tensors(path, {"w": torch.arange(3.0)}, {"pad": "x" * pad})
        if path.read_bytes().startswith(header_start):
            break
    else:
        pytest.fail("no padding gave the wanted header length")
    tensors, meta = read_checkpoint(path)
    assert torch.equal(tensors["w"], torch.arange(3.0)) and meta["pad"] == "x" * pad
