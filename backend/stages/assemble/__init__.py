"""The ``export`` stage's assembly: the result contract's arrays and meta from the fit, the
tracking, the confidence, the speech and the lips (``run``: ``build_result``), with the ARKit
curves (``arkit``). ``avface.result.write_result`` validates and writes them."""
