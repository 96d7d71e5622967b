"""Install the built extension zip into a fresh Blender (user folders under a temporary HOME)."""
import sys
from pathlib import Path

import bpy


def install_zip(zip_path, expect_home):
    import addon_utils

    repo = next(r for r in bpy.context.preferences.extensions.repos if r.module == "user_default")
    directory = Path(repo.directory)
    assert str(directory).startswith(expect_home), f"the user repository {directory} is not under the test's HOME"
    out = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    assert out == {"FINISHED"}, out
    module = "bl_ext.user_default.avface"
    assert module in bpy.context.preferences.addons, [a.module for a in bpy.context.preferences.addons]
    assert hasattr(bpy.types, "IMPORT_SCENE_OT_avface_result") and hasattr(bpy.types, "AVFACE_OT_export_fbx")
    prefs = bpy.context.preferences.addons[module].preferences
    assert prefs.address.startswith("tcp://"), "preferences are not registered under the extension's package name"
    installed = directory / "avface"
    assert (installed / "_vendor" / "client.py").is_file()
    # the bundled wheel was installed into Blender's extension site-packages, not pip-installed at run time
    site = [Path(p) for p in sys.path if ".local" in p and "site-packages" in p and Path(p, "zmq").is_dir()]
    assert site, f"no zmq from the extension's wheel on sys.path: {[p for p in sys.path if '.local' in p]}"
    zmq_files = sorted(p.name for p in (site[0] / "zmq" / "backend" / "cython").glob("*.so"))
    assert zmq_files, "the wheel's compiled pyzmq backend is missing"
    addon_utils.disable(module, default_set=True)
    assert not hasattr(bpy.types, "IMPORT_SCENE_OT_avface_result")
    # nothing was written into the add-on's own folder
    written = sorted(str(p.relative_to(installed)) for p in installed.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
    return {"installed": str(installed), "site_packages": str(site[0]), "zmq_backend": zmq_files, "files": written}
