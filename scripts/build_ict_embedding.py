"""Rebuild where MediaPipe's face-mesh landmarks lie on the ICT head
(``models/data/ict_face_light/mediapipe_embedding.npz``; the method is
:mod:`avface.models.ict_embedding`'s docstring). Prints the residuals per landmark group.

    .venv/bin/python scripts/build_ict_embedding.py [-o FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from avface.models.canonical_mesh import load_canonical_mesh
    from avface.models.ict import DATA_DIR, EMBEDDING_FILE, SKIN_VERTICES, read_ict_arrays
    from avface.models.ict_embedding import build_embedding

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DATA_DIR / EMBEDDING_FILE)
    args = parser.parse_args(argv)
    mesh = load_canonical_mesh()
    ict = read_ict_arrays()
    skin = np.flatnonzero((ict.faces < SKIN_VERTICES[1]).all(1))
    b = build_embedding(mesh.vertices, mesh.faces, ict.neutral, ict.faces, skin, ict.landmark68)
    np.savez(args.output, landmark_ids=b.landmark_ids, face_idx=b.face_idx, bary=b.bary.astype(np.float64),
             anchors_used=b.anchors_used)
    report = {"anchors_used": len(b.anchors_used),
              "anchor_residual_mm_after_similarity": {"mean": float(np.mean(list(b.anchor_residual_mm.values()))),
                                                      "max": float(np.max(list(b.anchor_residual_mm.values())))},
              "registration_moved_mm": b.moved_mm, "distance_to_skin_mm": b.surface_mm}
    print(json.dumps(report, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
