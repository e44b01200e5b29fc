"""Radio-image preprocessing: NaN policy, sigma-clipped background, display stretch to [0, 1].

What radio astronomers do to a continuum cutout before looking at it (or feeding it to
a network), in order:

1. **Non-finite pixels** (NaN blanks outside a survey's coverage or a primary-beam
   cut, inf from bad division): replaced by the sigma-clipped background median
   (``nan_policy="background"``), by zero, or refused (``"error"``).
2. **Sigma clipping** (optional, ``sigma_clip=k``): the background median and rms are
   estimated with iterative sigma clipping (:func:`astropy.stats.sigma_clipped_stats`,
   clip at ``clip_sigma``), the median is subtracted and every pixel below ``k`` x rms
   is set to zero. MiraBest cutouts were made this way with ``k = 3`` (Porter & Scaife 2023),
   and the FIRST 4-class set thresholds at 3x the local rms (Griese et al. 2023).
3. **Interval + stretch** to [0, 1] with :mod:`astropy.visualization`: the interval
   picks the limits (``minmax``, ``zscale`` = IRAF's zscale, ``percentile``) and the
   stretch maps them (``linear``, ``asinh``, ``sqrt``, ``log``). asinh (Lupton et al.
   1999) keeps faint jets and lobes visible next to a bright core.

The result is a float32 ``(H, W)`` image in [0, 1]. The kit's loader replicates the single
channel into the 3 channels an RGB backbone expects (``vision_ft.data.to_tensor``) and
resizes it; the backbone normalises it with its own mean/std.

Integer inputs (MiraBest ``uint8``, 8/16-bit PNG) are first scaled to [0, 1] by their
type's range; colour PNGs are averaged to one channel (radio images have one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

try:
    from vision_ft.errors import ConfigError, DataError
except ImportError:  # pragma: no cover - the pack is always installed with the kit
    ConfigError = DataError = ValueError  # type: ignore[misc,assignment]

NanPolicy = Literal["background", "zero", "error"]
Interval = Literal["minmax", "zscale", "percentile"]
Stretch = Literal["linear", "asinh", "sqrt", "log"]


def to_float_image(image: np.ndarray) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3|4)`` array -> float64 ``(H, W)``; integers scaled by their range."""
    arr = np.asarray(image)
    scale = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0
    if arr.ndim == 3:
        if arr.shape[2] not in (1, 3, 4):
            raise DataError(f"image has {arr.shape[2]} channels; expected 1 (radio continuum) or 3")
        # a colour rendering of a single-channel image: the mean of its RGB channels (alpha dropped)
        arr = arr[..., 0] if arr.shape[2] == 1 else arr[..., :3].astype(np.float64).mean(-1)
    if arr.ndim != 2:
        raise DataError(f"image has shape {arr.shape}; expected a 2-D image")
    return arr.astype(np.float64) / scale


def background_stats(image: np.ndarray, clip_sigma: float = 3.0, maxiters: int = 5) -> tuple[float, float, float]:
    """Sigma-clipped ``(mean, median, std)`` of the finite pixels (astropy), robust to the source itself."""
    from astropy.stats import sigma_clipped_stats

    mask = ~np.isfinite(image)
    mean, median, std = sigma_clipped_stats(image, mask=mask, sigma=clip_sigma, maxiters=maxiters)
    return float(mean), float(median), float(std)


def clip_background(image: np.ndarray, k: float, clip_sigma: float = 3.0, maxiters: int = 5) -> np.ndarray:
    """Subtract the sigma-clipped median and zero every pixel below ``k`` x the clipped rms.

    Non-finite pixels are left as they are (handle them first).
    """
    _, median, std = background_stats(image, clip_sigma, maxiters)
    out = image - median
    with np.errstate(invalid="ignore"):
        out[out < k * std] = 0.0
    return out


def _interval(name: str, percentile: float):
    from astropy.visualization import MinMaxInterval, PercentileInterval, ZScaleInterval

    if name == "minmax":
        return MinMaxInterval()
    if name == "zscale":
        return ZScaleInterval()
    if name == "percentile":
        return PercentileInterval(percentile)
    raise ConfigError(f"data.init_args.preprocess.interval must be minmax, zscale or percentile, got {name!r}")


def _stretch(name: str, asinh_a: float, log_a: float):
    from astropy.visualization import AsinhStretch, LinearStretch, LogStretch, SqrtStretch

    if name == "linear":
        return LinearStretch()
    if name == "asinh":
        return AsinhStretch(a=asinh_a)
    if name == "sqrt":
        return SqrtStretch()
    if name == "log":
        return LogStretch(a=log_a)
    raise ConfigError(f"data.init_args.preprocess.stretch must be linear, asinh, sqrt or log, got {name!r}")


def stretch_to_unit(image: np.ndarray, interval: str = "minmax", stretch: str = "linear", percentile: float = 99.5,
                    asinh_a: float = 0.1, log_a: float = 1000.0) -> np.ndarray:
    """Map finite ``image`` to [0, 1]: limits from the astropy interval, then the astropy stretch.

    Monotone non-decreasing in the pixel value. A constant image maps to zeros.
    """
    vmin, vmax = _interval(interval, percentile).get_limits(image)
    if not np.isfinite(vmin) or not np.isfinite(vmax) or vmax <= vmin:
        return np.zeros(image.shape, dtype=np.float64)
    unit = np.clip((image - vmin) / (vmax - vmin), 0.0, 1.0)
    return np.clip(_stretch(stretch, asinh_a, log_a)(unit, clip=True), 0.0, 1.0)


@dataclass
class RadioPreprocess:
    """The pack's preprocessing, one YAML block (``data.init_args.preprocess``).

    Args:
        nan_policy: non-finite pixels -> ``background`` (sigma-clipped median), ``zero``,
            or ``error`` (the image counts as unreadable: skipped or fatal per
            ``data.init_args.on_corrupt``).
        sigma_clip: ``k`` to subtract the background and zero pixels below ``k`` x rms
            (MiraBest: 3); ``None`` keeps every pixel.
        clip_sigma: rejection threshold of the iterative background estimate.
        clip_iters: iterations of the background estimate.
        interval: limits of the display range: ``minmax``, ``zscale`` or ``percentile``.
        percentile: the kept percentage for ``interval=percentile``.
        stretch: ``linear``, ``asinh``, ``sqrt`` or ``log``.
        asinh_a: asinh softening (smaller = stronger compression of bright pixels).
        log_a: log stretch parameter.
    """

    nan_policy: NanPolicy = "background"
    sigma_clip: float | None = None
    clip_sigma: float = 3.0
    clip_iters: int = 5
    interval: Interval = "minmax"
    percentile: float = 99.5
    stretch: Stretch = "linear"
    asinh_a: float = 0.1
    log_a: float = 1000.0

    def __post_init__(self) -> None:
        key = "data.init_args.preprocess"
        if self.nan_policy not in ("background", "zero", "error"):
            raise ConfigError(f"{key}.nan_policy must be background, zero or error, got {self.nan_policy!r}")
        if self.sigma_clip is not None and self.sigma_clip < 0:
            raise ConfigError(f"{key}.sigma_clip must be >= 0 or null, got {self.sigma_clip}")
        if self.clip_sigma <= 0 or self.clip_iters < 1:
            raise ConfigError(f"{key}.clip_sigma must be > 0 and clip_iters >= 1")
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"{key}.percentile must be in (0, 100], got {self.percentile}")
        if self.asinh_a <= 0 or self.log_a <= 0:
            raise ConfigError(f"{key}.asinh_a and log_a must be > 0")
        _interval(self.interval, self.percentile)  # validate names early
        _stretch(self.stretch, self.asinh_a, self.log_a)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Any 2-D image (or ``H×W×C``) -> float32 ``(H, W)`` in [0, 1]."""
        x = to_float_image(image)
        finite = np.isfinite(x)
        if not finite.any():
            raise DataError("the image has no finite pixels")
        bad = not finite.all()
        if bad and self.nan_policy == "error":
            raise DataError(f"{int((~finite).sum())} NaN/inf pixel(s); set data.init_args.preprocess.nan_policy="
                            f"background or zero to fill them")
        if bad or self.sigma_clip is not None:
            _, median, std = background_stats(x, self.clip_sigma, self.clip_iters)
            if bad:
                x = np.where(finite, x, median if self.nan_policy == "background" else 0.0)
            if self.sigma_clip is not None:
                x = x - median
                x[x < self.sigma_clip * std] = 0.0
        out = stretch_to_unit(x, self.interval, self.stretch, self.percentile, self.asinh_a, self.log_a)
        return out.astype(np.float32)

    def describe(self) -> dict:
        return asdict(self)
