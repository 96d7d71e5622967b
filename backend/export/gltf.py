"""glTF 2.0 binary (.glb) writer, with ``pygltflib``.

What the file holds (glTF is Y up, metres, the asset's front facing +Z: exactly the result's
world frame, so no axis conversion):

- one mesh with the identity's rest positions, UVs (``TEXCOORD_0``, v flipped to glTF's top-left
  origin), one morph target per blend shape (names in ``mesh.extras.targetNames``, which Blender,
  three.js and Babylon read) and ``_AVFACE_VERTEX_ID``, the face model's vertex id of each glTF
  vertex (vertices on UV seams are split, as glTF needs one UV per vertex);
- a skin: one node per joint (bind pose = each joint at its rest position, unrotated;
  ``inverseBindMatrices`` undo it), ``JOINTS_n`` / ``WEIGHTS_n`` with every joint's weight;
- one animation, sampled at the clip's frame rate (input times t / fps), LINEAR: the morph
  weights of the mesh node, and each joint's rotation and translation;
- the video's camera, when the result has one: a perspective camera on node ``Camera`` whose
  field of view and aspect put the head on the face in the video. glTF's cameras have no lens
  shift, so a principal point off the frame's centre is lost (a warning says so; our own
  estimated cameras are centred); ``asset.extras.avface.camera`` keeps the exact intrinsics;
- ``asset.extras.avface``: model, fps, frame count and, when the result has detail maps, their
  paths relative to the .glb (the per-frame displacement maps stay beside it, never inlined).
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

SUFFIXES = (".glb",)
VERTEX_ID_ATTRIBUTE = "_AVFACE_VERTEX_ID"
JOINTS_PER_SET = 4
# glTF enums
FLOAT, UNSIGNED_SHORT, UNSIGNED_INT = 5126, 5123, 5125
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963


class _Blob:
    """The binary chunk: bufferViews and accessors appended as arrays go in."""

    def __init__(self, gltf):
        self.gltf = gltf
        self.data = bytearray()

    def add(self, array: np.ndarray, acc_type: str, component: int, *, target: int | None = None,
            minmax: bool = False) -> int:
        import pygltflib as g

        array = np.ascontiguousarray(array)
        while len(self.data) % 4:
            self.data.append(0)
        offset = len(self.data)
        self.data.extend(array.tobytes())
        self.gltf.bufferViews.append(g.BufferView(buffer=0, byteOffset=offset, byteLength=array.nbytes, target=target))
        n = array.shape[0]
        flat = array.reshape(n, -1)
        acc = g.Accessor(bufferView=len(self.gltf.bufferViews) - 1, componentType=component, count=n, type=acc_type)
        if minmax:
            acc.min = flat.min(0).astype(np.float64).tolist() if n else None
            acc.max = flat.max(0).astype(np.float64).tolist() if n else None
        self.gltf.accessors.append(acc)
        return len(self.gltf.accessors) - 1


def split_vertices(rig: Rig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """glTF needs one UV per vertex: one glTF vertex per distinct (vertex, uv) corner pair.
    Returns (vertex id per glTF vertex (N,), uv id per glTF vertex (N,), triangles (F, 3))."""
    pairs = np.stack([rig.faces.reshape(-1), rig.uv_faces.reshape(-1)], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return unique[:, 0], unique[:, 1], inverse.reshape(rig.faces.shape)


def _continuous(q: np.ndarray) -> np.ndarray:
    """(T, 4) quaternions with signs chosen so consecutive ones are on the same side
    (q and -q are the same rotation; interpolation between opposite signs goes the long way)."""
    q = q.copy()
    for t in range(1, len(q)):
        if np.dot(q[t], q[t - 1]) < 0:
            q[t] = -q[t]
    return q


#: how far (pixels) the principal point may sit off the frame's centre before the loss is reported
CENTRE_TOLERANCE_PX = 0.5


def camera_perspective(camera) -> dict[str, float]:
    """glTF's perspective camera for ``camera`` (a RigCamera).

    glTF projects x_ndc = x / (aspect tan(yfov/2) (-z)) and y_ndc = y / (tan(yfov/2) (-z)), and a
    viewer maps NDC onto the whole frame, so fy = h / (2 tan(yfov/2)) and fx = w / (2 aspect
    tan(yfov/2)): yfov = 2 atan(h / 2 fy) and aspect = w fy / (h fx) (w / h for square pixels).
    The principal point is the frame's centre: glTF has no lens shift."""
    fx, fy = camera.focal_px
    w, h = camera.width, camera.height
    return {"yfov": float(2.0 * np.arctan(h / (2.0 * fy))), "aspectRatio": float(w * fy / (h * fx)),
            "znear": axes.CAMERA_CLIP_M[0], "zfar": axes.CAMERA_CLIP_M[1]}


def _camera(gltf, camera, path: Path) -> int:
    """Add the camera and its node; returns the node's index."""
    import pygltflib as g

    cx, cy = camera.principal_px
    off = (cx - camera.width / 2.0, cy - camera.height / 2.0)
    if max(abs(off[0]), abs(off[1])) > CENTRE_TOLERANCE_PX:
        log.warning("%s: glTF cameras have no lens shift: the principal point, %.1f, %.1f px from the frame's "
                    "centre, is dropped (asset.extras.avface.camera keeps the intrinsics; USD keeps it all)",
                    path, *off)
    gltf.cameras.append(g.Camera(name="Video camera", type="perspective",
                                 perspective=g.Perspective(**camera_perspective(camera))))
    pose = np.asarray(camera.pose, np.float64)
    quat = Rotation.from_matrix(pose[:3, :3]).as_quat()  # x, y, z, w as glTF
    gltf.nodes.append(g.Node(name="Camera", camera=len(gltf.cameras) - 1, rotation=quat.tolist(),
                             translation=pose[:3, 3].tolist()))
    return len(gltf.nodes) - 1


def _mesh(gltf, blob: _Blob, rig: Rig) -> None:
    """Add the face mesh: rest positions, UVs, vertex ids, joints and weights, morph targets."""
    import pygltflib as g

    n_joints, n_shapes = len(rig.joint_names), len(rig.shape_names)
    vid, tid, tris = split_vertices(rig)
    positions = rig.neutral[vid].astype(np.float32)
    uv = rig.uv[tid].astype(np.float32)
    uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1)  # glTF's v runs down the image
    attributes = g.Attributes(POSITION=blob.add(positions, "VEC3", FLOAT, target=ARRAY_BUFFER, minmax=True),
                              TEXCOORD_0=blob.add(uv, "VEC2", FLOAT, target=ARRAY_BUFFER))
    # a float holds every id below 2**24 exactly, and every importer reads float attributes
    setattr(attributes, VERTEX_ID_ATTRIBUTE, blob.add(vid.astype(np.float32), "SCALAR", FLOAT, target=ARRAY_BUFFER))
    n_sets = -(-n_joints // JOINTS_PER_SET)
    joints = np.zeros((len(vid), n_sets * JOINTS_PER_SET), np.uint16)
    weights = np.zeros((len(vid), n_sets * JOINTS_PER_SET), np.float32)
    joints[:, :n_joints] = np.arange(n_joints)
    weights[:, :n_joints] = rig.skin_weights[vid]
    for s in range(n_sets):
        cols = slice(s * JOINTS_PER_SET, (s + 1) * JOINTS_PER_SET)
        setattr(attributes, f"JOINTS_{s}", blob.add(joints[:, cols], "VEC4", UNSIGNED_SHORT, target=ARRAY_BUFFER))
        setattr(attributes, f"WEIGHTS_{s}", blob.add(weights[:, cols], "VEC4", FLOAT, target=ARRAY_BUFFER))
    indices = blob.add(tris.reshape(-1).astype(np.uint32), "SCALAR", UNSIGNED_INT, target=ELEMENT_ARRAY_BUFFER)
    targets = [{"POSITION": blob.add(rig.shape_deltas[b][vid].astype(np.float32), "VEC3", FLOAT,
                                     target=ARRAY_BUFFER, minmax=True)} for b in range(n_shapes)]
    primitive = g.Primitive(attributes=attributes, indices=indices, mode=4, targets=targets or None)
    gltf.meshes.append(g.Mesh(name="Face", primitives=[primitive], weights=[0.0] * n_shapes or None,
                              extras={"targetNames": list(rig.shape_names)}))


def _skeleton(gltf, blob: _Blob, rig: Rig) -> list[int]:
    """Add the mesh node, one node per joint and the skin; returns the root joints' node indices."""
    import pygltflib as g

    n_joints = len(rig.joint_names)
    # nodes: 0 the mesh, then one per joint (joint j is node 1 + j)
    gltf.nodes.append(g.Node(name="Face", mesh=0, skin=0))
    for j, name in enumerate(rig.joint_names):
        p = int(rig.joint_parents[j])
        rest = rig.bind_positions[j] - (rig.bind_positions[p] if p >= 0 else 0.0)
        gltf.nodes.append(g.Node(name=name, translation=rest.tolist(), children=[]))
    for j in range(n_joints):
        p = int(rig.joint_parents[j])
        if p >= 0:
            gltf.nodes[1 + p].children.append(1 + j)
    roots = [1 + j for j in range(n_joints) if rig.joint_parents[j] < 0]
    ibm = np.tile(np.eye(4, dtype=np.float32), (n_joints, 1, 1))
    ibm[:, :3, 3] = -rig.bind_positions
    # glTF matrices are column-major: store each matrix transposed in C order
    gltf.skins.append(g.Skin(name="Skeleton", joints=[1 + j for j in range(n_joints)], skeleton=roots[0],
                             inverseBindMatrices=blob.add(ibm.transpose(0, 2, 1).copy(), "MAT4", FLOAT)))
    return roots


def _animation(gltf, blob: _Blob, rig: Rig, report: Callable[[float], None]) -> None:
    """Add the clip's animation: the morph weights and each joint's rotation and translation."""
    import pygltflib as g

    n_frames, n_joints, n_shapes = rig.n_frames, len(rig.joint_names), len(rig.shape_names)
    times = blob.add((np.arange(n_frames) / rig.fps).astype(np.float32), "SCALAR", FLOAT, minmax=True)
    samplers, channels = [], []

    def channel(node: int, path_name: str, output: int) -> None:
        samplers.append(g.AnimationSampler(input=times, output=output, interpolation="LINEAR"))
        channels.append(g.AnimationChannel(sampler=len(samplers) - 1,
                                           target=g.AnimationChannelTarget(node=node, path=path_name)))

    if n_shapes:
        channel(0, "weights", blob.add(rig.weights.reshape(-1).astype(np.float32), "SCALAR", FLOAT))
    for j in range(n_joints):
        q = _continuous(Rotation.from_matrix(rig.local_rotations[:, j]).as_quat())  # x, y, z, w as glTF
        channel(1 + j, "rotation", blob.add(q.astype(np.float32), "VEC4", FLOAT))
        channel(1 + j, "translation", blob.add(rig.local_translations[:, j].astype(np.float32), "VEC3", FLOAT))
        report(0.2 + 0.6 * (j + 1) / n_joints)
    gltf.animations.append(g.Animation(name="AVFace", samplers=samplers, channels=channels))


def _asset_extras(rig: Rig, path: Path) -> dict:
    """``asset.extras.avface``: model, fps, frame count, weight ranges, detail maps and camera."""
    extras = {"model": rig.model, "fps": rig.fps, "n_frames": rig.n_frames,
              # weight w' in [0, 1] of each target is (w - lo) / (hi - lo) of the result's coefficient w
              "weight_ranges": {n: [float(lo), float(hi)] for n, (lo, hi) in zip(rig.shape_names, rig.weight_ranges)},
              "vertex_id_attribute": VERTEX_ID_ATTRIBUTE}
    if rig.detail_maps:
        folder = path.resolve().parent
        extras["detail_maps"] = [Path(os.path.relpath(p, folder)).as_posix() for p in rig.detail_maps]
        extras["detail"] = {k: v for k, v in rig.detail.items() if isinstance(v, (int, float, str))}
    if rig.camera is not None:
        extras["camera"] = {"intrinsics": np.asarray(rig.camera.intrinsics, np.float64).tolist(),
                            "width": rig.camera.width, "height": rig.camera.height}
    return {"avface": extras}


def write_gltf(rig: Rig, path: str | Path, *, progress: Callable[[float], None] | None = None) -> Path:
    """Write `rig` as a binary glTF 2.0 file at `path` (.glb)."""
    import pygltflib as g

    path = Path(path)
    report = progress or (lambda f: None)
    rig = rig.unit_weights()  # importers clamp weights to [0, 1]
    gltf = g.GLTF2()
    gltf.asset = g.Asset(generator="avface export", version="2.0")
    blob = _Blob(gltf)

    _mesh(gltf, blob, rig)
    report(0.2)

    roots = _skeleton(gltf, blob, rig)
    scene_nodes = [0] + roots
    if rig.camera is not None:
        scene_nodes.append(_camera(gltf, rig.camera, path))
    gltf.scenes.append(g.Scene(name="AVFace", nodes=scene_nodes))
    gltf.scene = 0

    if rig.n_frames:
        _animation(gltf, blob, rig, report)

    gltf.asset.extras = _asset_extras(rig, path)

    gltf.buffers.append(g.Buffer(byteLength=len(blob.data)))
    gltf.set_binary_blob(bytes(blob.data))
    with atomic_path(path) as tmp:
        if not gltf.save_binary(str(tmp)):
            raise OSError(f"pygltflib could not write {tmp}")
    report(1.0)
    return path
