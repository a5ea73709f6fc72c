"""Files shipped with vialign (installed as the package ``vialign_assets``): the ShapeWorld testbed."""

from pathlib import Path


def path(*parts: str) -> Path:
    """Path of a shipped file or folder, e.g. ``path("shapeworld", "flow")``."""
    return Path(__file__).resolve().parent.joinpath(*parts)
