"""Training of the AVFace networks (issue 8): losses, training occluders, the data-parallel loop."""
