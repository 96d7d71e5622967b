"""The one interface every face model answers (docs/design.md section 4).

A model is a set of frozen arrays plus :meth:`FaceModel.forward`. Parameters use smplx's
names. Units are metres; the model frame is the face model's own (FLAME and the MediaPipe
canonical face are both right-handed with y up and z towards the viewer).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, fields, replace

import numpy as np
import torch


@dataclass(frozen=True)
class FaceParams:
    """Batched parameters, each (B, n). Pose blocks are axis-angle in radians."""

    betas: torch.Tensor  #: (B, S) identity (empty for the default model: its identity is per clip)
    expression: torch.Tensor  #: (B, E)
    global_orient: torch.Tensor  #: (B, 3) head rotation about the root joint
    neck_pose: torch.Tensor  #: (B, 3)
    jaw_pose: torch.Tensor  #: (B, 3)
    leye_pose: torch.Tensor  #: (B, 3)
    reye_pose: torch.Tensor  #: (B, 3)
    transl: torch.Tensor  #: (B, 3) metres

    @classmethod
    def zeros(cls, batch: int, n_shape: int, n_expression: int, *, device="cpu", dtype=torch.float32) -> "FaceParams":
        z = lambda n: torch.zeros(batch, n, device=device, dtype=dtype)  # noqa: E731
        return cls(z(n_shape), z(n_expression), z(3), z(3), z(3), z(3), z(3), z(3))

    @property
    def batch(self) -> int:
        return int(self.expression.shape[0])

    def pose(self) -> torch.Tensor:
        """(B, 5, 3) joint rotations in FLAME's joint order: global, neck, jaw, left eye, right eye."""
        return torch.stack([self.global_orient, self.neck_pose, self.jaw_pose, self.leye_pose, self.reye_pose], dim=1)

    def to(self, device=None, dtype=None) -> "FaceParams":
        return replace(self, **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})

    def detach(self) -> "FaceParams":
        return replace(self, **{f.name: getattr(self, f.name).detach() for f in fields(self)})


@dataclass(frozen=True)
class FaceOutput:
    vertices: torch.Tensor | None  #: (B, V, 3), or None when only landmarks were asked for
    landmarks: torch.Tensor  #: (B, M, 3) surface points under the tracker's landmarks
    joints: torch.Tensor  #: (B, J, 3) posed joints


class FaceModel(abc.ABC):
    """What the fit, the exporter and the add-on need from any face model."""

    #: ``flame2020`` | ``flame2023`` | ``mediapipe_canonical`` (the result's meta.model)
    name: str
    faces: np.ndarray  #: (F, 3) int64 vertex ids
    uv: np.ndarray  #: (Vt, 2) float32 in [0, 1], v up
    uv_faces: np.ndarray  #: (F, 3) int64 ids into uv
    lip_vertex_ids: np.ndarray  #: (L,) int64
    #: where each tracker landmark lies on the surface
    landmark_ids: np.ndarray  #: (M,) MediaPipe landmark index of each embedded landmark
    landmark_faces: np.ndarray  #: (M,) triangle index
    landmark_bary: np.ndarray  #: (M, 3) barycentric coordinates
    #: the skeleton the add-on builds bones from
    joint_names: tuple  #: (J,)
    parents: np.ndarray  #: (J,) parent index, -1 for the root
    skin_weights: np.ndarray  #: (V, J)
    #: the jaw joint's rotational freedom in the fit: 3 a ball joint (FLAME), 1 a hinge about x
    #: (the default model), 0 none (the jaw is in the expression shapes)
    jaw_dof: int = 3
    #: (low, high) that every expression weight stays within, or None for free coefficients
    expression_bounds: tuple | None = None

    @property
    @abc.abstractmethod
    def n_vertices(self) -> int: ...

    @property
    @abc.abstractmethod
    def n_shape(self) -> int: ...

    @property
    @abc.abstractmethod
    def n_expression(self) -> int: ...

    @abc.abstractmethod
    def forward(self, params: FaceParams, *, full: bool = True) -> FaceOutput:
        """Vertices and landmarks for a batch of parameters. With ``full=False`` only the
        vertices of the triangles under the landmarks are evaluated (fitting needs no more)."""

    @abc.abstractmethod
    def neutral_vertices(self, betas: torch.Tensor | None = None) -> np.ndarray:
        """(V, 3) the identity's rest shape: no expression, no pose."""

    @abc.abstractmethod
    def expression_basis(self) -> np.ndarray:
        """(E, V, 3) offsets per unit expression coefficient (for shape keys)."""

    @abc.abstractmethod
    def rest_joints(self, betas: torch.Tensor | None = None) -> np.ndarray:
        """(J, 3) joint locations of the identity at rest."""

    def expression_joints(self) -> np.ndarray | None:
        """(E, J, 3) how far one unit of each expression coefficient moves each rest joint,
        or None for a model whose joints do not move with the expression."""
        return None

    def joint_pose(self, params: FaceParams) -> torch.Tensor:
        """(B, J, 3) axis-angle rotation of each of this model's joints, in
        :attr:`joint_names` order, from the parameters (FLAME's five by default)."""
        return params.pose()

    def zero_params(self, batch: int, *, device="cpu", dtype=torch.float32) -> FaceParams:
        return FaceParams.zeros(batch, self.n_shape, self.n_expression, device=device, dtype=dtype)

    def landmark_vertex_ids(self) -> np.ndarray:
        """Sorted ids of the vertices of the triangles under the landmarks."""
        return np.unique(self.faces[self.landmark_faces].reshape(-1))
