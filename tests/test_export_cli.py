"""`avface export`: several formats at once, file naming, and the project's error codes and
exit statuses for a result that does not validate, an unknown format, an unwritable path, a
FLAME result without its FLAME files, and a result whose parameters do not give its mesh."""
from __future__ import annotations

import numpy as np
import pytest
from export_util import export_cases  # noqa: F401 - the session fixture

from avface.cli import main
from avface.errors import ModelFileError, SchemaError
from avface.export import export_result
from avface.result import load_result, write_result


def test_several_formats_into_a_folder(export_cases, tmp_path, capsys):
    c = export_cases["default_lips"]
    rc = main(["export", str(c.result_path), "--to", "usd", "--to", "gltf,livelink-csv", "-o", str(tmp_path / "out"),
               "-q"])
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["default_lips.csv", "default_lips.glb", "default_lips.usd"]
    assert "default_lips.usd" in capsys.readouterr().out


def test_flame_folder_from_config(export_cases, tmp_path):
    c = export_cases["flame_lips"]  # its config.yaml names the FLAME folder
    assert main(["export", str(c.result_path), "--to", "gltf", "-o", str(tmp_path / "f.glb"), "-q"]) == 0
    assert (tmp_path / "f.glb").stat().st_size > 0


@pytest.mark.parametrize("args, status, code", [
    (["--to", "fbx"], 2, "bad_input"),
    (["--to", "usd,gltf", "-o", "{tmp}/one.usd"], 2, "bad_input"),
    (["--to", "gltf", "-o", "{tmp}/head.usd"], 2, "bad_input"),
    (["--to", "usd", "-o", "{tmp}/a_file/head.usd"], 6, "output"),
])
def test_bad_arguments_and_paths(export_cases, tmp_path, capsys, args, status, code):
    (tmp_path / "a_file").write_text("not a folder")
    argv = ["export", str(export_cases["default"].result_path)] + [a.format(tmp=tmp_path) for a in args] + ["-q"]
    assert main(argv) == status
    err = capsys.readouterr().err
    assert f"[{code}]" in err


def test_a_result_that_does_not_validate(tmp_path, capsys):
    bad = tmp_path / "result.npz"
    np.savez(bad, meta=np.asarray("{}"))
    assert main(["export", str(bad), "--to", "usd", "-q"]) == 7
    assert "[bad_result]" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.npz"), "--to", "livelink-csv", "-q"]) == 7


def test_flame_result_without_its_files(export_cases, tmp_path, capsys):
    c = export_cases["flame"]  # no config.yaml beside it
    with pytest.raises(ModelFileError, match="--flame-dir"):
        export_result(c.result_path, ["usd"], tmp_path)
    assert main(["export", str(c.result_path), "--to", "usd", "-o", str(tmp_path), "-q"]) == 5
    # the curves alone need no face model
    assert main(["export", str(c.result_path), "--to", "livelink-csv", "-o", str(tmp_path), "-q"]) == 0


def test_parameters_that_do_not_give_the_stored_mesh(export_cases, tmp_path, capsys):
    res = load_result(export_cases["default"].result_path)
    arrays = dict(res.arrays)
    arrays["jaw"] = arrays["jaw"] + np.float32(0.1)  # the stored vertices no longer follow
    src = write_result(tmp_path / "r" / "result.npz", arrays, res.meta)
    with pytest.raises(SchemaError, match="do not reproduce its stored vertices"):
        export_result(src, ["gltf"], tmp_path)
    assert main(["export", str(src), "--to", "gltf", "-o", str(tmp_path), "-q"]) == 7
    assert main(["export", str(src), "--to", "gltf", "-o", str(tmp_path), "--no-check", "-q"]) == 0


def test_inspect_and_export_of_a_default_result_with_detail_maps_load_no_torch(export_cases, tmp_path):
    """Reading a result (the add-on's vendored loader does the same) and exporting it need
    numpy, not torch: a default result with its detail maps, through the real CLI."""
    import subprocess
    import sys

    result = export_cases["default_lips"].result_path
    assert (result.parent / "detail").is_dir()
    code = ("import sys; from avface.cli import main; "
            f"assert main(['inspect', {str(result)!r}]) == 0; "
            f"assert main(['export', {str(result)!r}, '--to', 'usd', '--to', 'gltf', '--to', 'livelink-csv', "
            f"'-o', {str(tmp_path / 'out')!r}, '-q']) == 0; "
            "torch = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "assert not torch, torch[:3]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len([p for p in (tmp_path / "out").iterdir() if p.stat().st_size > 0]) == 3
