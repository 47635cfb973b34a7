"""Review findings on the two save paths (`save_pretrained`, `save_pretrained_deepseek`) and the DeepSeek config mapping:
permissions, mount points, files of other tools, interrupted re-saves."""

import copy
import errno
import os
import stat

import pytest
import torch

from modeling_moe import MoEForCausalLM
from modeling_moe.deepseek_checkpoint import deepseek_config_to_moe

from .helpers import small_config
from .test_deepseek_checkpoint import HUB_V3, moe_config, randomize

SAVES = {
    "save_pretrained": lambda model, path: model.save_pretrained(path),
    "save_pretrained_deepseek": lambda model, path: model.save_pretrained_deepseek(path),
}


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("exists", [False, True], ids=["new", "existing"])
def test_saved_folder_is_readable_by_others(tmp_path, umask_022, save, exists):
    """mkdtemp makes 0700 folders: a checkpoint renamed from one is unreadable by a serving process of another user."""
    target = tmp_path / "checkpoint"
    if exists:
        target.mkdir()
        target.chmod(0o755)
    SAVES[save](randomize(MoEForCausalLM(moe_config())), target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.parametrize("save", SAVES)
def test_save_into_a_mount_point(tmp_path, monkeypatch, save):
    """The target folder is its own file system (a Docker / Kubernetes volume): a rename across its boundary fails
    with EXDEV, renaming the mount point itself with EBUSY. Emulated on the rename functions."""
    target = str(tmp_path / "volume")
    os.makedirs(target)
    real_rename, real_replace = os.rename, os.replace

    def inside(path):
        path = os.path.abspath(os.fspath(path))
        return path == target or path.startswith(target + os.sep)

    def checked(real):
        def rename(src, dst, *args, **kwargs):
            if os.path.abspath(os.fspath(src)) == target:
                raise OSError(errno.EBUSY, "Device or resource busy", src)
            if inside(src) != inside(dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link", src)
            return real(src, dst, *args, **kwargs)
        return rename

    monkeypatch.setattr(os, "rename", checked(real_rename))
    monkeypatch.setattr(os, "replace", checked(real_replace))
    model = randomize(MoEForCausalLM(moe_config()))
    SAVES[save](model, target)
    monkeypatch.undo()
    reloaded = MoEForCausalLM.from_pretrained(target)
    ids = torch.randint(2, 96, (1, 6))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    assert not any(name.startswith(".") for name in os.listdir(target) + os.listdir(tmp_path))


def test_deepseek_save_keeps_training_state(tmp_path):
    """Saving the DeepSeek export into a Trainer checkpoint folder must not delete the optimizer and scheduler states
    (the docstring keeps every file that is not weights or configs)."""
    target = tmp_path / "checkpoint-500"
    target.mkdir()
    kept = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json")
    for name in kept:
        (target / name).write_text("state")
    (target / "model.safetensors").write_text("stale weights of an earlier save_pretrained")
    randomize(MoEForCausalLM(moe_config())).save_pretrained_deepseek(target)
    files = set(os.listdir(target))
    assert set(kept) <= files and "model.safetensors" not in files


@pytest.mark.parametrize("save", SAVES)
def test_interrupted_resave_leaves_no_loadable_mix(tmp_path, monkeypatch, save):
    """A save over an earlier one, killed at any of its renames, must not leave a folder that loads a mix of the two
    saves' shards behind a valid-looking config.json (it may load either save whole, or refuse to load)."""
    old = randomize(MoEForCausalLM(moe_config()), seed=0)
    new = randomize(MoEForCausalLM(moe_config()), seed=1)
    expected = [old.state_dict(), new.state_dict()]
    real_replace, real_rename = os.replace, os.rename
    for kill_at in range(1, 100):
        target = tmp_path / f"checkpoint-{kill_at}"
        getattr(old, save)(target, max_shard_size="20KB")
        calls = []

        def flaky(real):
            def move(src, dst, *args, **kwargs):
                calls.append(dst)
                if len(calls) == kill_at:
                    raise KeyboardInterrupt("killed mid-save")
                return real(src, dst, *args, **kwargs)
            return move

        monkeypatch.setattr(os, "replace", flaky(real_replace))
        monkeypatch.setattr(os, "rename", flaky(real_rename))
        try:
            getattr(new, save)(target, max_shard_size="20KB")
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        monkeypatch.undo()
        if not (target / "config.json").exists():  # no config: nothing loads it as a checkpoint
            assert interrupted
            continue
        actual = MoEForCausalLM.from_pretrained(target, local_files_only=True).state_dict()
        assert any(all(torch.equal(actual[k], sd[k]) for k in actual) for sd in expected), (
            f"killed at rename {kill_at}: a mix of two saves loaded")
        if not interrupted:
            break


def test_config_mapping_does_not_modify_its_argument():
    config_dict = copy.deepcopy(HUB_V3)
    deepseek_config_to_moe(config_dict)
    assert config_dict == HUB_V3


def test_native_resave_still_removes_stale_weights(tmp_path):
    model = MoEForCausalLM(small_config()).eval()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    model.save_pretrained(tmp_path)
    assert sorted(n for n in os.listdir(tmp_path) if "safetensors" in n) == ["model.safetensors"]
