"""USD (UsdSkel) writer, with Pixar's own bindings (``usd-core``).

Layout of the stage (Y up, metres, ``timeCodesPerSecond`` = ``framesPerSecond`` = the clip's fps,
frames at time codes 0 .. T-1):

    /AVFace                     SkelRoot (default prim)
        Skeleton                Skeleton: joints, bind and rest transforms
            Animation           SkelAnimation: per-frame joint translations and rotations,
                                blendShapes and per-frame blendShapeWeights
        Face                    Mesh with UsdSkelBindingAPI: the identity's rest mesh, UVs as the
                                face-varying primvar ``st``, joint indices and weights, blend shapes
            expression_00 ...   BlendShape prims (offsets; lip shapes also pointIndices)
        ARKit                   Scope: one animated float attribute per ARKit curve, named exactly
                                as ARKit names it (``eyeBlinkLeft`` ...)
        Looks/Detail            Material whose UsdUVTexture reads the per-frame displacement maps
                                (an animated asset path per frame into ``detail/``; only when the
                                result has them: referenced, never copied into the file)
        Camera                  Camera: the video's (when the result has one), so that looking
                                through it puts the head on the face in the video, principal
                                point included (the aperture offsets)

The world frame of a result (y up, z towards the viewer, metres) is USD's Y-up frame as it is,
so no axis conversion is needed; ``upAxis`` and ``metersPerUnit`` say so to every reader.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.spatial.transform import Rotation

from avface.export import axes
from avface.export._io import atomic_path
from avface.export.rig import Rig

log = logging.getLogger(__name__)

ROOT = "/AVFace"
SUFFIXES = (".usd", ".usda", ".usdc")


def joint_paths(rig: Rig) -> list[str]:
    """UsdSkel joint tokens: each joint's path through its ancestors (``global/neck/jaw``)."""
    paths: list[str] = []
    for j, name in enumerate(rig.joint_names):
        p = int(rig.joint_parents[j])
        paths.append(name if p < 0 else f"{paths[p]}/{name}")
    return paths


def _matrix(rot: np.ndarray, t: np.ndarray):
    """A Gf.Matrix4d for p -> rot p + t. Gf matrices act on row vectors, so the rotation is
    stored transposed and the translation in the last row."""
    from pxr import Gf

    m = np.eye(4)
    m[:3, :3] = np.asarray(rot).T
    m[3, :3] = t
    return Gf.Matrix4d(m.tolist())


def _quats(rot: np.ndarray):
    """(J, 3, 3) -> Vt.QuatfArray (w, (x, y, z))."""
    from pxr import Gf, Vt

    q = Rotation.from_matrix(rot).as_quat()  # (J, 4) x, y, z, w
    return Vt.QuatfArray([Gf.Quatf(float(w), Gf.Vec3f(float(x), float(y), float(z))) for x, y, z, w in q])


def _new_stage(rig: Rig):
    """An in-memory stage: Y up, metres, the clip's frame rate and range, avface layer data."""
    from pxr import Gf, Usd, UsdGeom

    n_frames = rig.n_frames
    stage = Usd.Stage.CreateInMemory()
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
    UsdGeom.SetStageMetersPerUnit(stage, 1.0)
    stage.SetTimeCodesPerSecond(rig.fps)
    stage.SetFramesPerSecond(rig.fps)
    stage.SetStartTimeCode(0)
    stage.SetEndTimeCode(max(n_frames - 1, 0))
    stage.GetRootLayer().customLayerData = {"avface": {
        "model": rig.model, "source": rig.source, "fps": rig.fps,
        # weight w' in [0, 1] of each blend shape is (w - lo) / (hi - lo) of the result's coefficient w
        "weight_ranges": {n: Gf.Vec2d(float(lo), float(hi)) for n, (lo, hi) in zip(rig.shape_names, rig.weight_ranges)}}}
    return stage


def _skeleton(stage, rig: Rig):
    """Define the Skeleton and its Animation; returns it and the animated translations, rotations, weights."""
    # bind pose: every joint at its rest position, unrotated
    from pxr import UsdSkel, Vt

    n_joints = len(rig.joint_names)
    skel = UsdSkel.Skeleton.Define(stage, f"{ROOT}/Skeleton")
    tokens = joint_paths(rig)
    skel.CreateJointsAttr(tokens)
    eye = np.eye(3)
    skel.CreateBindTransformsAttr(Vt.Matrix4dArray([_matrix(eye, rig.bind_positions[j]) for j in range(n_joints)]))
    rest_local = rig.bind_positions.copy()
    for j in range(1, n_joints):
        rest_local[j] = rig.bind_positions[j] - rig.bind_positions[rig.joint_parents[j]]
    skel.CreateRestTransformsAttr(Vt.Matrix4dArray([_matrix(eye, rest_local[j]) for j in range(n_joints)]))

    anim = UsdSkel.Animation.Define(stage, f"{ROOT}/Skeleton/Animation")
    anim.CreateJointsAttr(tokens)
    anim.CreateBlendShapesAttr(list(rig.shape_names))
    anim.CreateScalesAttr(Vt.Vec3hArray.FromNumpy(np.ones((n_joints, 3), np.float16)))
    translations = anim.CreateTranslationsAttr()
    rotations = anim.CreateRotationsAttr()
    weights = anim.CreateBlendShapeWeightsAttr()
    UsdSkel.BindingAPI.Apply(skel.GetPrim()).CreateAnimationSourceRel().SetTargets([anim.GetPath()])
    return skel, translations, rotations, weights


def _mesh(stage, rig: Rig, skel):
    """Define the Face mesh (rest points, faces, UVs) bound to `skel`; returns it."""
    from pxr import Sdf, UsdGeom, UsdSkel, Vt

    n_joints = len(rig.joint_names)
    mesh = UsdGeom.Mesh.Define(stage, f"{ROOT}/Face")
    mesh.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(rig.neutral.astype(np.float32)))
    mesh.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(len(rig.faces), 3, np.int32)))
    mesh.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(rig.faces.reshape(-1).astype(np.int32)))
    mesh.CreateOrientationAttr(UsdGeom.Tokens.rightHanded)
    mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
    st = UsdGeom.PrimvarsAPI(mesh).CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray,
                                                  UsdGeom.Tokens.faceVarying)
    st.Set(Vt.Vec2fArray.FromNumpy(rig.uv.astype(np.float32)))
    st.SetIndices(Vt.IntArray.FromNumpy(rig.uv_faces.reshape(-1).astype(np.int32)))
    # the points never leave the skinned range: extent of the rest mesh, grown by the motion,
    # is left to readers (UsdSkel computes skinned extents itself)
    binding = UsdSkel.BindingAPI.Apply(mesh.GetPrim())
    binding.CreateSkeletonRel().SetTargets([skel.GetPath()])
    binding.CreateGeomBindTransformAttr(_matrix(np.eye(3), np.zeros(3)))
    binding.CreateJointIndicesPrimvar(False, n_joints).Set(
        Vt.IntArray.FromNumpy(np.tile(np.arange(n_joints, dtype=np.int32), rig.n_vertices)))
    binding.CreateJointWeightsPrimvar(False, n_joints).Set(
        Vt.FloatArray.FromNumpy(rig.skin_weights.astype(np.float32).reshape(-1)))
    _blend_shapes(stage, rig, mesh, binding)
    return mesh


def _blend_shapes(stage, rig: Rig, mesh, binding) -> None:
    """Define one BlendShape prim per shape under `mesh` and bind them (sparse where they can be)."""
    from pxr import UsdSkel, Vt

    binding.CreateBlendShapesAttr(list(rig.shape_names))
    targets = []
    for name, delta, ids in zip(rig.shape_names, rig.shape_deltas, rig.shape_vertex_ids):
        shape = UsdSkel.BlendShape.Define(stage, mesh.GetPath().AppendChild(name))
        if ids is None:
            shape.CreateOffsetsAttr(Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(delta, np.float32)))
        else:
            shape.CreateOffsetsAttr(Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(delta[ids], np.float32)))
            shape.CreatePointIndicesAttr(Vt.IntArray.FromNumpy(np.asarray(ids, np.int32)))
        targets.append(shape.GetPath())
    binding.CreateBlendShapeTargetsRel().SetTargets(targets)


def _arkit_curves(stage, rig: Rig) -> list:
    """Define the ARKit scope with one float attribute per curve, under its exact name; returns them."""
    from pxr import Sdf, UsdGeom

    arkit = UsdGeom.Scope.Define(stage, f"{ROOT}/ARKit").GetPrim()
    arkit.SetDocumentation("The 52 ARKit blendshape curves of the clip, in [0, 1], one attribute per curve")
    return [arkit.CreateAttribute(name, Sdf.ValueTypeNames.Float, custom=True) for name in rig.arkit_names]


def _write_frames(rig: Rig, path: Path, animated, curves: list, texture_file,
                  report: Callable[[float], None]) -> None:
    """Set every frame's joint transforms, blend-shape weights, ARKit curves and detail map."""
    from pxr import Sdf, Usd, Vt

    translations, rotations, weights = animated
    n_frames = rig.n_frames
    step = max(1, n_frames // 20)
    for t in range(n_frames):
        time = Usd.TimeCode(t)
        translations.Set(Vt.Vec3fArray.FromNumpy(rig.local_translations[t].astype(np.float32)), time)
        rotations.Set(_quats(rig.local_rotations[t]), time)
        weights.Set(Vt.FloatArray.FromNumpy(rig.weights[t]), time)
        for attr, value in zip(curves, rig.arkit[t].tolist()):
            attr.Set(value, time)
        if texture_file is not None and t < len(rig.detail_maps):
            texture_file.Set(Sdf.AssetPath(_relative(rig.detail_maps[t], path)), time)
        if t % step == 0:
            report(0.1 + 0.8 * t / n_frames)


def _export(stage, path: Path) -> None:
    """Write the stage's root layer to `path` atomically; OSError when USD cannot."""
    from pxr import Tf

    with atomic_path(path) as tmp:
        try:
            ok = stage.GetRootLayer().Export(str(tmp))
        except Tf.ErrorException as e:  # USD reports a failed write as its own error type
            raise OSError(f"USD could not write {tmp}: {e}") from e
        if not ok:
            raise OSError(f"USD could not write {tmp}")


def write_usd(rig: Rig, path: str | Path, *, progress: Callable[[float], None] | None = None) -> Path:
    """Write `rig` as a UsdSkel stage at `path` (.usd/.usdc binary crate, .usda text)."""
    from pxr import UsdSkel

    path = Path(path)
    report = progress or (lambda f: None)
    rig = rig.unit_weights()  # importers clamp weights to [0, 1]
    stage = _new_stage(rig)

    root = UsdSkel.Root.Define(stage, ROOT)
    stage.SetDefaultPrim(root.GetPrim())

    skel, translations, rotations, weights = _skeleton(stage, rig)
    mesh = _mesh(stage, rig, skel)
    report(0.1)

    curves = _arkit_curves(stage, rig)
    texture_file = _detail_material(stage, rig, path, mesh) if rig.detail_maps else None
    if rig.camera is not None:
        _camera(stage, rig.camera)

    _write_frames(rig, path, (translations, rotations, weights), curves, texture_file, report)
    _export(stage, path)
    report(1.0)
    return path


def camera_lens(camera) -> dict[str, float]:
    """UsdGeomCamera's lens and filmback for ``camera`` (a RigCamera), in USD's units: tenths
    of a scene unit (the stage is in metres, so 1 mm is 0.01).

    A point at (x, y, -z) in the camera's frame lands on the film at f x / z, and the film's
    window spans the aperture around its offset, so pixel u = w/2 + (f x / z - offset) w /
    aperture. Matching u = cx + fx x / z gives f / aperture = fx / w and offset = (w/2 - cx)
    aperture / w; vertically (y up, pixel rows down) offset = (cy - h/2) aperture / h. Each
    axis has its own aperture, so fx and fy may differ."""
    tenths = 10.0  # tenths of a metre per metre
    fx, fy = camera.focal_px
    cx, cy = camera.principal_px
    w, h = camera.width, camera.height
    h_aperture = axes.SENSOR_WIDTH_M * tenths
    focal = fx * h_aperture / w
    v_aperture = focal * h / fy
    return {"focalLength": focal, "horizontalAperture": h_aperture, "verticalAperture": v_aperture,
            "horizontalApertureOffset": (w / 2.0 - cx) * h_aperture / w,
            "verticalApertureOffset": (cy - h / 2.0) * v_aperture / h}


def _camera(stage, camera) -> None:
    from pxr import Gf, UsdGeom

    cam = UsdGeom.Camera.Define(stage, f"{ROOT}/Camera")
    cam.CreateProjectionAttr(UsdGeom.Tokens.perspective)
    for name, value in camera_lens(camera).items():
        getattr(cam, f"Create{name[0].upper()}{name[1:]}Attr")(float(value))
    cam.CreateClippingRangeAttr(Gf.Vec2f(*axes.CAMERA_CLIP_M))
    # Gf matrices act on row vectors: the transpose of the column-vector pose
    cam.AddTransformOp().Set(Gf.Matrix4d(np.asarray(camera.pose, np.float64).T.tolist()))
    prim = cam.GetPrim()
    prim.SetCustomDataByKey("avface:image_size", Gf.Vec2i(camera.width, camera.height))
    prim.SetDocumentation(f"The video's camera ({camera.width} x {camera.height} pixels): looking through it "
                          f"at that aspect, the head sits on the face in the video")


def _relative(target: Path, out_file: Path) -> str:
    """`target` relative to the folder of `out_file`, with forward slashes (USD asset paths)."""
    return Path(os.path.relpath(target, Path(out_file).resolve().parent)).as_posix()


def _detail_material(stage, rig: Rig, out_file: Path, mesh):
    """A material whose texture is the displacement-map sequence; returns the animated
    ``inputs:file`` attribute."""
    from pxr import Sdf, UsdShade

    looks = f"{ROOT}/Looks"
    material = UsdShade.Material.Define(stage, f"{looks}/Detail")
    reader = UsdShade.Shader.Define(stage, f"{looks}/Detail/ReadST")
    reader.CreateIdAttr("UsdPrimvarReader_float2")
    reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("st")
    tex = UsdShade.Shader.Define(stage, f"{looks}/Detail/DisplacementMap")
    tex.CreateIdAttr("UsdUVTexture")
    tex.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(reader.ConnectableAPI(), "result")
    tex.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set("raw")
    tex.CreateOutput("r", Sdf.ValueTypeNames.Float)
    file_input = tex.CreateInput("file", Sdf.ValueTypeNames.Asset)
    surface = UsdShade.Shader.Define(stage, f"{looks}/Detail/Surface")
    surface.CreateIdAttr("UsdPreviewSurface")
    surface.CreateInput("displacement", Sdf.ValueTypeNames.Float).ConnectToSource(tex.ConnectableAPI(), "r")
    material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")
    material.CreateDisplacementOutput().ConnectToSource(surface.ConnectableAPI(), "displacement")
    prim = material.GetPrim()
    prim.SetCustomDataByKey("avface:detail", {k: v for k, v in rig.detail.items() if isinstance(v, (int, float, str))})
    prim.SetDocumentation("Per-frame UV displacement maps of the fine stage, referenced beside the file: "
                          "inputs:file of DisplacementMap is animated, one map per frame")
    UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(material)
    return file_input.GetAttr()
