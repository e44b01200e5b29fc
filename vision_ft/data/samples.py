"""Old name of :mod:`vision_ft.data.labelled_images`: import from there (or from :mod:`vision_ft.data`).

Kept only because ``vision_ft/tasks/classification.py`` still imports ``pil_to_array`` and
``to_tensor`` from here; delete this file once it imports them from ``..data.labelled_images``.
"""

from .labelled_images import (  # noqa: F401
    ArraySamples, FileSamples, ImageDataset, Samples, pil_to_array, to_tensor,
)
