"""Everything drawn besides the face mesh (neck, skull and hair, ears, eyes, mouth interior,
background), posed per frame into the renderer's layers."""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from scipy.spatial.transform import Rotation

from avface.synth.animation import Animation
from avface.synth.common import srgb_to_linear
from avface.synth.face import EYE_RADIUS_M, Face
from avface.synth.renderer import M_EYE, M_FACE, M_FLAT, M_GOURAUD, Layer, Light, Renderer, shade

_IRIS_RADIUS_M = 0.0058
_PUPIL_RADIUS_M = 0.0021
# The skull: its centre this far below the face mesh's top edge, this tall (half), with the
# hairline at this height on the unit sphere. A skull that reaches well above the forehead,
# and a jaw line that the skull does not widen, cut MediaPipe's landmark error on the
# forehead and chin by half (measured: 3.2 -> 2.6 px mean at 512 px).
_SKULL_BELOW_FACE_TOP_M = 0.053
_SKULL_HALF_HEIGHT_M = 0.12
_HAIRLINE_NY = 0.8


class _NormalAccumulator:
    """Vertex normals of a fixed topology as one sparse product (faster than np.add.at)."""

    def __init__(self, faces: np.ndarray, n_vertices: int):
        f = len(faces)
        rows = faces.T.ravel()
        cols = np.tile(np.arange(f), 3)
        self.faces = faces
        self.m = sp.csr_matrix((np.ones(3 * f, np.float32), (rows, cols)), shape=(n_vertices, f))

    def __call__(self, v: np.ndarray) -> np.ndarray:
        f = self.faces
        fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        n = self.m @ fn
        return (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _uv_sphere(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere (N, 3) and its triangles, counter-clockwise seen from outside."""
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]).astype(np.float32)
    faces = []
    idx = lambda i, j: 1 + i * n_lon + (j % n_lon)  # noqa: E731
    for j in range(n_lon):
        faces.append((0, idx(0, j), idx(0, j + 1)))
        faces.append((len(verts) - 1, idx(n_lat - 2, j + 1), idx(n_lat - 2, j)))
    for i in range(n_lat - 2):
        for j in range(n_lon):
            faces.append((idx(i, j), idx(i + 1, j), idx(i + 1, j + 1)))
            faces.append((idx(i, j), idx(i + 1, j + 1), idx(i, j + 1)))
    return verts, _orient_outwards(verts, np.asarray(faces, np.int64))


def _orient_outwards(verts: np.ndarray, faces: np.ndarray, centre=None) -> np.ndarray:
    """Flip triangles whose normal points towards ``centre`` (default: the origin)."""
    c = np.zeros(3) if centre is None else np.asarray(centre)
    a, b, d = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    n = np.cross(b - a, d - a)
    inward = np.einsum("fk,fk->f", n, (a + b + d) / 3 - c) < 0
    faces = faces.copy()
    faces[inward] = faces[inward][:, ::-1]
    return faces


def _grid(nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """(nx*ny, 2) parameters in [0, 1]^2 and triangles of the grid (counter-clockwise in (s, t))."""
    s, t = np.meshgrid(np.linspace(0, 1, nx), np.linspace(0, 1, ny), indexing="xy")
    st = np.stack([s.ravel(), t.ravel()], 1)
    faces = []
    for j in range(ny - 1):
        for i in range(nx - 1):
            a = j * nx + i
            faces.append((a, a + 1, a + nx + 1))
            faces.append((a, a + nx + 1, a + nx))
    return st.astype(np.float32), np.asarray(faces, np.int64)


class Scene:
    """Everything per clip that the frames share: geometry templates, colours, lights."""

    def __init__(self, rng: np.random.Generator, face: Face, K: np.ndarray, m2c: np.ndarray,
                 width: int, height: int, supersample: int):
        from avface.models.canonical import CanonicalModel

        self.face = face
        self.model = CanonicalModel(face.neutral, face.basis)
        self.joints = self.model.joints_rest.astype(np.float64)  # (2, 3): root, jaw
        self.K, self.m2c = K, m2c
        self.renderer = Renderer(width, height, K, supersample)
        self.normals_face = _NormalAccumulator(face.faces, len(face.neutral))
        skin_lin = srgb_to_linear(face.skin)
        hair_lin = srgb_to_linear(face.hair)
        key = np.array([-0.45 + rng.uniform(-0.2, 0.2), -0.55 + rng.uniform(-0.15, 0.15), -1.0])
        self.light = Light(key / np.linalg.norm(key), 0.80, np.array([0.77, -0.1, -0.63]), 0.28, 0.20, 0.10)
        self.eye = dict(iris_angle=math.asin(_IRIS_RADIUS_M / EYE_RADIUS_M),
                        pupil_angle=math.asin(_PUPIL_RADIUS_M / EYE_RADIUS_M),
                        sclera=srgb_to_linear([0.86, 0.83, 0.80]), iris=srgb_to_linear(face.iris),
                        pupil=srgb_to_linear([0.03, 0.03, 0.03]))
        v = face.neutral

        self._init_skull(v, skin_lin, hair_lin)
        self._init_ears(v)
        self._init_neck(skin_lin)
        self._init_mouth(v)

        self.eye_unit, self.eye_faces = _uv_sphere(14, 20)

        self._init_background(rng)

    def _init_skull(self, v: np.ndarray, skin_lin: np.ndarray, hair_lin: np.ndarray) -> None:
        """Skull + hair: an ellipsoid behind the face mesh; hair on top and at the back."""
        sph, sph_f = _uv_sphere(18, 28)
        self.skull_centre = np.array([0.0, v[:, 1].max() - _SKULL_BELOW_FACE_TOP_M, v[:, 2].min() + 0.005])
        self.skull_axes = np.array([abs(v[:, 0]).max() + 0.004, _SKULL_HALF_HEIGHT_M, 0.105])
        self.skull_unit, self.skull_faces = sph, sph_f
        # the hairline runs a little above the face mesh's top edge, so the forehead continues
        hairline = (sph[:, 1] > _HAIRLINE_NY - 0.25 * np.abs(sph[:, 0]) - 0.3 * np.clip(-sph[:, 2], 0, 1)) | (sph[:, 2] < -0.45)
        self.skull_albedo = np.where(hairline[:, None], hair_lin, skin_lin * 0.95).astype(np.float32)

    def _init_ears(self, v: np.ndarray) -> None:
        """Ears: two small ellipsoids beside the face mesh's sides."""
        self.ear_unit, self.ear_faces = _uv_sphere(8, 12)
        ear_y = v[[234, 454], 1].mean() - 0.012
        self.ear_centres = np.array([[v[234, 0] - 0.002, ear_y, v[234, 2] - 0.012],
                                     [v[454, 0] + 0.002, ear_y, v[454, 2] - 0.012]])
        self.ear_axes = np.array([0.010, 0.030, 0.017])

    def _init_neck(self, skin_lin: np.ndarray) -> None:
        """Neck: an open cylinder below the jaw that does not turn with the head."""
        nv, nf = _grid(24, 6)
        ang = (nv[:, 0] - 0.5) * 2.0 * np.pi
        neck_r, neck_z = 0.058, -0.035
        self.neck_unit = np.stack([neck_r * np.sin(ang), -0.04 - 0.30 * nv[:, 1], neck_z + neck_r * np.cos(ang)], 1)
        self.neck_faces = _orient_outwards(self.neck_unit * np.array([1, 0, 1]), nf, centre=(0.0, 0.0, neck_z))
        self.neck_normals = np.stack([np.sin(ang), np.zeros_like(ang), np.cos(ang)], 1)
        # the jaw shades the top of the neck
        self.neck_albedo = (skin_lin * (0.55 + 0.35 * np.clip(nv[:, 1:2] / 0.4, 0, 1))).astype(np.float32)

    def _init_mouth(self, v: np.ndarray) -> None:
        """Mouth: a dark cavity, teeth on each jaw, a tongue on the lower jaw."""
        mouth = v[[13, 14, 78, 308]]
        mx, my, mz = 0.0, mouth[:2, 1].mean(), mouth[:2, 2].mean()
        half = 0.5 * abs(v[308, 0] - v[78, 0])
        gv, gf = _grid(3, 3)
        self.cavity = (np.stack([mx + (gv[:, 0] - 0.5) * 2.0 * half * 1.25, my + 0.008 - gv[:, 1] * 0.030,
                                 np.full(len(gv), mz - 0.026)], 1), gf)
        self.cavity_jaw = gv[:, 1:2].astype(np.float64)  # 0: moves with the skull, 1: with the jaw
        tv_, tf_ = _grid(13, 3)

        def teeth(y_top, height_m, z0, depth_curv):
            """A strip along the dental arch: (x, y from y_top down by height_m, z bent back)."""
            x = (tv_[:, 0] - 0.5) * 2.0 * half * 0.95
            y = y_top - tv_[:, 1] * height_m
            z = z0 - depth_curv * x ** 2
            return np.stack([x, y, z], 1)

        upper_edge = v[13, 1] - 0.0035  # 3.5 mm of upper teeth below the upper lip's inner edge
        self.teeth_upper = teeth(upper_edge + 0.009, 0.009, v[13, 2] - 0.0065, 32.0)
        self.teeth_lower = teeth(v[14, 1] - 0.001, 0.0085, v[14, 2] - 0.0085, 32.0)
        self.teeth_faces = tf_
        stripes = 0.82 + 0.18 * np.abs(np.cos(tv_[:, 0] * np.pi * 6))  # gaps between teeth
        self.teeth_albedo = (srgb_to_linear([0.92, 0.89, 0.80])[None] * stripes[:, None]).astype(np.float32)
        self.tongue_unit, self.tongue_faces = _uv_sphere(8, 12)
        self.tongue_centre = np.array([0.0, v[14, 1] - 0.012, mz - 0.016])
        self.tongue_axes = np.array([0.6 * half * 2 * 0.5 * 1.6, 0.006, 0.018])
        self.cavity_colour = srgb_to_linear([0.22, 0.07, 0.07])
        self.tongue_albedo = srgb_to_linear([0.70, 0.33, 0.33])

    def _init_background(self, rng: np.random.Generator) -> None:
        """Background: a vertical gradient between two muted colours and a soft vignette."""
        h, w = self.renderer.h, self.renderer.w
        top = srgb_to_linear(rng.uniform([0.35, 0.40, 0.45], [0.65, 0.70, 0.75]))
        bottom = srgb_to_linear(rng.uniform([0.20, 0.20, 0.20], [0.45, 0.42, 0.40]))
        yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
        bg = top * (1 - yy) + bottom * yy
        self.background = (bg * (1.0 - 0.25 * xx ** 2)).astype(np.float32) * np.ones((1, w, 1), np.float32)

    # -- poses

    def _rigid(self, R: np.ndarray, transl: np.ndarray):
        """Model-frame rest point -> camera frame, moving with the head (rotation R about
        the root joint, then transl)."""
        j0 = self.joints[0]
        Rc, tc = self.m2c[:3, :3], self.m2c[:3, 3]

        def f(p):
            q = (p - j0) @ R.T + j0 + transl
            return q @ Rc.T + tc
        return f

    def layers(self, k: int, anim: Animation, verts_cam: np.ndarray, tangents: bool = False) -> list[Layer]:
        """The frame's layers, back to front; ``tangents``: the face's layer carries dP/du and
        dP/dv too, for a bump map (``Renderer.render(bump=...)``)."""
        R = Rotation.from_rotvec(anim.global_orient[k].astype(np.float64)).as_matrix()
        Rj = Rotation.from_rotvec(anim.jaw_pose[k].astype(np.float64)).as_matrix()
        tr = anim.transl[k].astype(np.float64)
        head = self._rigid(R, tr)
        j1 = self.joints[1]
        jaw = lambda p: head((p - j1) @ Rj.T + j1)  # noqa: E731
        Rc = self.m2c[:3, :3]
        light = self.light

        def gouraud(points, normals, albedo, faces, cull=True, rot=R):
            n = (normals @ (Rc @ rot).T).astype(np.float32)
            n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
            alb = np.broadcast_to(np.asarray(albedo, np.float32), (len(points), 3))
            col = shade(alb, n, light, spec=0.03, shininess=10.0)
            attrs = np.concatenate([col, np.zeros((len(points), 2), np.float32)], 1)
            return Layer(points.astype(np.float32), faces, attrs, M_GOURAUD, cull)

        out = []
        # neck: translates with the head but does not turn with it
        neck_pts = (self.neck_unit + tr) @ Rc.T + self.m2c[:3, 3]
        n_neck = self.neck_normals @ Rc.T
        col = shade(self.neck_albedo, n_neck, light, 0.0, 1.0)
        out.append(Layer(neck_pts.astype(np.float32), self.neck_faces,
                          np.concatenate([col, np.zeros((len(col), 2), np.float32)], 1), M_GOURAUD, True))
        skull_pts = head(self.skull_unit * self.skull_axes + self.skull_centre)
        skull_n = self.skull_unit / self.skull_axes
        out.append(gouraud(skull_pts, skull_n, self.skull_albedo, self.skull_faces))
        for c in self.ear_centres:
            out.append(gouraud(head(self.ear_unit * self.ear_axes + c), self.ear_unit / self.ear_axes,
                               srgb_to_linear(self.face.skin) * np.array([0.95, 0.85, 0.85]), self.ear_faces))
        # eyes: the iris is where the surface normal is near the gaze (towards the camera)
        for c in self.face.eye_centres:
            centre_cam = head(c[None].astype(np.float64))[0]
            to_cam = -centre_cam / np.linalg.norm(centre_cam)
            gy, gp = anim.gaze[k]
            g = Rotation.from_euler("YX", [gy, gp]).apply(to_cam)
            pts = head(self.eye_unit * EYE_RADIUS_M + c)
            n = (pts - centre_cam) / EYE_RADIUS_M
            attrs = np.concatenate([n, (n @ g)[:, None], np.zeros((len(n), 1))], 1).astype(np.float32)
            out.append(Layer(pts.astype(np.float32), self.eye_faces, attrs, M_EYE, True))
        # mouth interior, back to front
        cav_pts, cav_f = self.cavity
        cav_col = np.broadcast_to(self.cavity_colour, (len(cav_pts), 3)) * (1.0 - 0.5 * np.linspace(0, 1, len(cav_pts)))[:, None]
        cav_pts_cam = (1.0 - self.cavity_jaw) * head(cav_pts) + self.cavity_jaw * jaw(cav_pts)
        out.append(Layer(cav_pts_cam.astype(np.float32), cav_f,
                          np.concatenate([cav_col, np.zeros((len(cav_pts), 2))], 1).astype(np.float32), M_FLAT, False))
        tongue = jaw(self.tongue_unit * self.tongue_axes + self.tongue_centre)
        out.append(gouraud(tongue, self.tongue_unit / self.tongue_axes, self.tongue_albedo * 0.6, self.tongue_faces,
                           rot=R @ Rj))
        tooth_n = np.tile([[0.0, 0.0, 1.0]], (len(self.teeth_upper), 1))
        out.append(_teeth_layer(jaw(self.teeth_lower), tooth_n, self.teeth_albedo * 0.75, self.teeth_faces, R @ Rj, Rc,
                                light))
        out.append(_teeth_layer(head(self.teeth_upper), tooth_n, self.teeth_albedo * 0.85, self.teeth_faces, R, Rc, light))
        # the face
        n_face = self.normals_face(verts_cam)
        attrs = [n_face, self.face.uv]
        if tangents:
            from avface.synth.wrinkles import vertex_tangents

            attrs += list(vertex_tangents(verts_cam.astype(np.float64), self.face.faces, self.face.uv.astype(np.float64)))
        attrs = np.concatenate(attrs, 1).astype(np.float32)
        out.append(Layer(verts_cam.astype(np.float32), self.face.faces, attrs, M_FACE, True))
        return out


def _teeth_layer(points, normals, albedo, faces, R, Rc, light) -> Layer:
    n = (normals @ (Rc @ R).T).astype(np.float32)
    col = shade(albedo, n, light, spec=0.15, shininess=30.0)
    return Layer(points.astype(np.float32), faces, np.concatenate([col, np.zeros((len(col), 2), np.float32)], 1),
                  M_GOURAUD, False)
