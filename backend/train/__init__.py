"""Training of the AVFace networks (docs/networks.md): losses, training occluders, the data-parallel loop."""
