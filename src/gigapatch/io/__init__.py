"""gigapatch.io: lazy image readers (tiled/pyramidal TIFF, OpenSlide, Pillow, numpy)."""

from gigapatch.io.readers import SUPPORTED_EXTENSIONS, ImageReader, open_image

__all__ = ["SUPPORTED_EXTENSIONS", "ImageReader", "open_image"]
