"""Where the bundled model lives, and the name that loads it."""

from pathlib import Path

#: Source name of the bundled model: ``ce.from_pretrained("bundled")``, ``--model bundled``.
BUNDLED = "bundled"
#: The directory shipped in the package (written by ``compressed-experts toy pretrain --ship``).
BUNDLED_DIR = Path(__file__).parent / "model"
