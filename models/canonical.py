"""The embedded default face model: MediaPipe's canonical face mesh with a per-clip linear
model (docs/design.md section 4).

The mesh (468 vertices, 898 triangles, UVs; :mod:`avface.models.canonical_mesh`) is read from
the geometry-pipeline metadata inside ``face_landmarker.task``; it needs no download beyond the
registry package. Vertex i of the mesh is MediaPipe landmark i, so the landmark embedding is the
identity.

Identity and expressions are per clip: :class:`CanonicalModel` holds a neutral shape and an
expression basis that the fit learns from the clip, plus two joints (root and jaw) skinned
with weights that are harmonic over the mesh, so the jaw bone drives the lower face smoothly.
"""
from __future__ import annotations

import numpy as np
import torch

from avface.core.topology import LIPS
from avface.models.base import FaceModel, FaceOutput, FaceParams
from avface.models.canonical_mesh import N_VERTICES, jaw_weights, joint_locations, load_canonical_mesh
from avface.models.lbs import lbs


class CanonicalModel(FaceModel):
    """Canonical mesh + per-clip neutral identity + per-clip expression basis + jaw.

    Joints: 0 root (global_orient), 1 jaw (jaw_pose). neck and eyes are not modelled by the
    default model and are ignored.
    """

    name = "mediapipe_canonical"
    joint_names = ("root", "jaw")
    parents = np.array([-1, 0])
    jaw_dof = 1

    def __init__(self, neutral: np.ndarray | None = None, basis: np.ndarray | None = None,
                 *, device="cpu", dtype=torch.float32):
        mesh = load_canonical_mesh()
        self.mesh = mesh
        self.faces = mesh.faces
        self.uv = mesh.uv
        self.uv_faces = mesh.faces.copy()
        self.lip_vertex_ids = np.asarray(LIPS, np.int64)
        self.landmark_ids = np.arange(N_VERTICES, dtype=np.int64)
        # one triangle per vertex with a one-hot barycentric coordinate
        corner_face = np.full((N_VERTICES, 2), -1, np.int64)
        for f, tri in enumerate(mesh.faces):
            for c, v in enumerate(tri):
                if corner_face[v, 0] < 0:
                    corner_face[v] = (f, c)
        self.landmark_faces = corner_face[:, 0].copy()
        self.landmark_bary = np.eye(3, dtype=np.float32)[corner_face[:, 1]]
        neutral = mesh.vertices if neutral is None else np.asarray(neutral, np.float32)
        if neutral.shape != (N_VERTICES, 3):
            raise ValueError(f"expected a (468, 3) neutral shape, got {neutral.shape}")
        basis = np.zeros((0, N_VERTICES, 3), np.float32) if basis is None else np.asarray(basis, np.float32)
        if basis.ndim != 3 or basis.shape[1:] != (N_VERTICES, 3):
            raise ValueError(f"expected an (E, 468, 3) expression basis, got {basis.shape}")
        self._neutral = neutral.astype(np.float32)
        self._basis = basis
        self.device, self.dtype = device, dtype
        self.weights_jaw = jaw_weights(mesh)
        self.joints_rest = joint_locations(mesh)
        w = np.stack([1.0 - self.weights_jaw, self.weights_jaw], axis=1)
        self.skin_weights = w.astype(np.float32)  #: (V, 2), for the add-on's bones
        t = lambda a: torch.as_tensor(a, device=device, dtype=dtype)  # noqa: E731
        self._t_neutral = t(self._neutral)
        self._t_basis = t(basis.reshape(len(basis), N_VERTICES * 3))  # (E, V*3); -1 fails for E = 0
        self._t_weights = t(w)
        self._t_joints = t(self.joints_rest)
        self._parents = torch.tensor([-1, 0])
        self._t_faces = torch.as_tensor(self.faces, device=device)

    @property
    def n_vertices(self) -> int:
        return N_VERTICES

    @property
    def n_shape(self) -> int:
        return 0

    @property
    def n_expression(self) -> int:
        return int(self._basis.shape[0])

    def neutral_vertices(self, betas=None) -> np.ndarray:
        return self._neutral.copy()

    def expression_basis(self) -> np.ndarray:
        return self._basis.copy()

    def rest_joints(self, betas=None) -> np.ndarray:
        return self.joints_rest.copy()

    def joint_pose(self, params: FaceParams) -> torch.Tensor:
        """(B, 2, 3): the root (global_orient) and the jaw."""
        return torch.stack([params.global_orient, params.jaw_pose], dim=1)

    def forward(self, params: FaceParams, *, full: bool = True) -> FaceOutput:
        # Every vertex is a landmark here, so `full` changes nothing: the subset is the mesh.
        b = params.batch
        shaped = self._t_neutral.expand(b, -1, -1)
        if self.n_expression:
            shaped = shaped + (params.expression @ self._t_basis).view(b, N_VERTICES, 3)
        verts, joints = lbs(shaped, self.joint_pose(params), None, self._parents, self._t_weights,
                            joints=self._t_joints.expand(b, -1, -1))
        verts = verts + params.transl[:, None]
        joints = joints + params.transl[:, None]
        # landmark i is vertex i (one-hot barycentric coordinates), so no gather is needed
        return FaceOutput(verts, verts, joints)
