"""Runs one check inside Blender's Python (the bpy wheel): ``runner.py SCRIPT CHECK ARGS OUT STAGE``.

Starts from an empty factory scene, puts the staged add-on and this folder on sys.path,
calls ``CHECK(**args)`` from SCRIPT and writes its return value as JSON to OUT. Any exception
prints its traceback and exits 1, which the harness turns into a test failure.
"""
import importlib.util
import json
import sys
import traceback
from pathlib import Path


def main() -> int:
    script, check, args_path, out_path, stage = sys.argv[1:6]
    sys.path[:0] = [stage, str(Path(script).parent)]
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    spec = importlib.util.spec_from_file_location(Path(script).stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kwargs = json.loads(Path(args_path).read_text())
    try:
        result = getattr(module, check)(**kwargs)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    Path(out_path).write_text(json.dumps(result if result is not None else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
