"""Images out: a checked image as a lossless PNG ``data:`` URI (sent to inference servers, used by the accuracy
suite to send scenes exactly as an agent would)."""

from __future__ import annotations

import base64
import io

from PIL import Image


def png_data_uri(image: Image.Image) -> str:
    """The image as a lossless PNG ``data:`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless either way; level 1 is several times faster
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
