"""The reconstruction's stages, one module or package per name in ``avface.pipeline.STAGES``,
in pipeline order: ``tracking``, ``audio``, ``confidence``, ``camera``, ``networks/``, ``fit``,
``lips``, ``detail/``, ``assemble/`` (the export stage, with ``avface.result``) and
``preview``. ``avface.pipeline`` strings them together; the benchmark calls the same
functions. Nothing here imports ``avface.train`` (docs/architecture.md)."""
