"""The ``detail`` stage, AVFace's fine stage (docs/fine_stage.md): the mesh in UV space and
frames unwrapped onto it (``uvspace``), per-clip albedo and light (``shading``), the losses,
carrying detail over occlusions and the maps' files (``fine``), the per-clip adaptation of the
detail network (``adapt``) and the stage itself (``run``: ``run_detail``)."""
