"""The Reconstruct face panel and modal operator (filled in by the next commits)."""


def register():
    pass


def unregister():
    pass
