"""Files written whole or not at all: the text goes to a temporary file beside the target, named by
host and process (so ranks sharing a file system never collide), which is then renamed over it."""

import os
import socket
from pathlib import Path


def write_text(path: str | Path, text: str) -> Path:
    """``text`` at ``path`` (its folder made if missing), atomically; returns ``path`` as a Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path
