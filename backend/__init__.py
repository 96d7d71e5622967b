"""AVFace for Blender's backend: a talking-face video and its speech to an animated head."""
from avface.core.threads import configure_process as _configure_threads

__version__ = "0.1.0"

# before any stage imports torch: OpenMP's threads must sleep, not spin, while they wait
# (avface.core.threads says why and what it measured)
_configure_threads()
