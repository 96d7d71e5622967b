"""The ``networks`` stage (docs/networks.md): the networks' inputs from the tracking and the
speech (``evidence``), every network on one clip (``predict``), the clip's closed-form fill
of hidden mouths (``readout``), and the stage itself (``run``: ``run_networks``)."""
