"""`avface train`: the command over avface.train, on two tiny prepared clips (seconds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import training_clip

from avface.cli import main
from avface.models.checkpoint import load_checkpoint
from avface.train.data import save_clip
from avface.train.loop import plot_path, state_path

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_train_writes_checkpoint_plot_and_resumes(tmp_path, capsys):
    paths = []
    for i, t in enumerate((40, 30)):
        paths.append(tmp_path / f"clip{i}.npz")
        save_clip(paths[-1], training_clip(t, i))
    out = tmp_path / "ck.pt"
    common = [*map(str, paths), "-o", str(out), "--batch", "2", "--lr", "1e-3", "--save-every", "2"]
    assert main(["train", *common, "--steps", "3"]) == 0
    err = capsys.readouterr()
    assert "3/3" in err.err, err.err[-500:]  # the progress bar reached the end
    assert f"wrote {out} (3 steps" in err.out
    first = load_checkpoint(out)
    assert first.meta["steps"] == 3 and plot_path(out).stat().st_size > 1000 and state_path(out).is_file()

    # the same run asked for more steps continues from step 3, as an uninterrupted run would
    assert main(["train", *common, "--steps", "5", "-q"]) == 0
    resumed = load_checkpoint(out)
    assert resumed.meta["steps"] == 5
    whole = tmp_path / "whole.pt"
    assert main(["train", *map(str, paths), "-o", str(whole), "--batch", "2", "--lr", "1e-3", "--save-every", "2",
                 "--steps", "5", "-q"]) == 0
    a, b = resumed.networks.state_dict(), load_checkpoint(whole).networks.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert np.isclose(resumed.meta["final_losses"]["total"], load_checkpoint(whole).meta["final_losses"]["total"],
                      rtol=1e-5)


def test_train_with_other_options_is_refused_naming_them(tmp_path, capsys):
    clip = tmp_path / "clip.npz"
    save_clip(clip, training_clip(40, 0))
    out = tmp_path / "ck.pt"
    assert main(["train", str(clip), "-o", str(out), "--batch", "2", "--steps", "1", "-q"]) == 0
    status = main(["train", str(clip), "-o", str(out), "--batch", "2", "--steps", "2", "--lr", "0.5", "-q"])
    assert status != 0
    assert "lr" in capsys.readouterr().err


def test_train_without_clips_is_a_clear_error(tmp_path, capsys):
    status = main(["train", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "ck.pt"), "--steps", "1", "-q"])
    assert status != 0
    assert "missing.npz" in capsys.readouterr().err
