"""Deterministic generator of a SYNTHETIC radio-galaxy sample in the MiraBest on-disk format.

This is not sky data. It exists so the radio astronomy pack trains offline, end to end,
on a fresh machine. Each image is a toy radio galaxy with the morphology that defines
the Fanaroff-Riley classes (Fanaroff & Riley 1974):

- **FR I** (edge-darkened): a bright core and two jets that widen and fade outward;
  the wide-angle-tail and head-tail codes bend the jets;
- **FR II** (edge-brightened): a faint core and two lobes ending in bright compact
  hotspots, with diffuse backflow toward the core; the double-double code adds an
  inner pair of hotspots;
- **hybrid**: one FR I side and one FR II side; **uncertain** codes are fainter and
  less clear-cut.

The sky model is convolved with a Gaussian restoring beam (FWHM 3 px: FIRST's 5.4"
beam on MiraBest's 1.8" pixels) together with white noise, so the noise is
beam-correlated like an interferometric image. Then it is processed the way MiraBest
cutouts were (Porter & Scaife 2023): pixels at or below 3 sigma set to zero, a
circular aperture of radius 75 px, a linear scale to 0-255 ``uint8``.

Label codes follow MiraBest's ten indices (:data:`~domains.radio_astronomy.mirabest.LABEL_CODES`)
in the proportions of :data:`CODE_MIX`, so the confident-only convention has something
to drop. Files: ``<out>/batches/data_batch_1..7``, ``test_batch``, ``batches.meta``.
Same arguments -> same bytes. Run ``python -m domains.radio_astronomy.sample OUT_DIR``
(``--fits`` also writes float32 FITS cutouts with NaN-blanked edges and a CSV catalogue).

numpy only (``--fits`` needs astropy).
"""

from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .mirabest import IMAGE_SIZE, LABEL_CODES, META_FILE, TEST_BATCH, TRAIN_BATCHES, write_batch, write_meta

#: the classes of the default (confident) convention
CLASS_NAMES = ["FRI", "FRII"]
#: label index -> share of the sample (confident FR I / FR II dominate, as in MiraBest)
CODE_MIX = {0: 0.30, 1: 0.05, 2: 0.03, 3: 0.07, 4: 0.01, 5: 0.37, 6: 0.03, 7: 0.08, 8: 0.03, 9: 0.03}
BEAM_FWHM_PX = 3.0  # FIRST: 5.4 arcsec restoring beam / 1.8 arcsec pixels
PIXEL_ARCSEC = 1.8
NOISE_JY = 1.5e-4  # FIRST's typical rms, 0.15 mJy/beam (for the FITS cutouts)
SYNTHETIC_TAG = "SYNTHETIC"
SAMPLE_VERSION = 1


@dataclass
class Source:
    """What was drawn for one image (kept for tests and the FITS catalogue)."""

    code: int
    angle: float  # source axis, radians
    extent: float  # jet length (FR I) or hotspot distance (FR II), px
    snr: float  # peak / noise rms after the beam


# ---- rendering -------------------------------------------------------------------------------------
def _blobs(ys, xs, sigmas, amps, size: int) -> np.ndarray:
    """Sum of isotropic Gaussians (separable: one small matrix product)."""
    grid = np.arange(size, dtype=np.float64)
    ys, xs, sigmas, amps = (np.asarray(v, dtype=np.float64) for v in (ys, xs, sigmas, amps))
    gy = np.exp(-0.5 * ((grid[None, :] - ys[:, None]) / sigmas[:, None]) ** 2)
    gx = np.exp(-0.5 * ((grid[None, :] - xs[:, None]) / sigmas[:, None]) ** 2)
    return np.einsum("ny,nx->yx", gy * amps[:, None], gx)  # faster than BLAS here for these small shapes


def _path(cy: float, cx: float, angle: float, length: float, bend: float, start: float = 2.0):
    """Points along a (possibly bent) jet from the core: arrays t, y, x with ~0.7 px spacing."""
    n = max(4, int(np.ceil((length - start) / 0.7)))
    t = np.linspace(start, length, n)
    step = t[1] - t[0]
    theta = angle + bend * (t / length) ** 2  # bending grows outward
    y = cy + np.concatenate([[start * np.sin(angle)], np.cumsum(step * np.sin(theta[1:]))])
    x = cx + np.concatenate([[start * np.cos(angle)], np.cumsum(step * np.cos(theta[1:]))])
    return t, y, x


def _jet(cy, cx, angle, length, bend, amp, decay, opening, rng):
    """FR I jet: brightness falls off exponentially, width grows linearly (edge-darkened)."""
    t, y, x = _path(cy, cx, angle, length, bend)
    brightness = amp * np.exp(-t / decay) * (1.0 + 0.15 * rng.standard_normal(t.size)).clip(0.5)
    sig = 0.9 + t * np.tan(opening)
    return y, x, sig, brightness * _line_norm(t, sig)


def _line_norm(t: np.ndarray, sig: np.ndarray) -> np.ndarray:
    """Blob amplitudes that make a chain of Gaussians (spacing ``dt``, width ``sig``) a ridge of unit height."""
    return np.abs(t[1] - t[0]) / (sig * np.sqrt(2.0 * np.pi))


def _lobe(cy, cx, angle, dist, amp_hot, amp_lobe, rng):
    """FR II lobe: compact hotspot at ``dist`` plus diffuse backflow brightening toward it."""
    back = dist * rng.uniform(0.35, 0.65)
    t = np.linspace(dist - back, dist, max(4, int(back / 0.8)))
    wobble = rng.normal(0.0, 0.05)
    y = cy + t * np.sin(angle + wobble * (1 - t / dist))
    x = cx + t * np.cos(angle + wobble * (1 - t / dist))
    sig_lobe = np.full(t.size, rng.uniform(2.5, 4.5))
    brightness = amp_lobe * (((t - (dist - back)) / back) ** 1.5 + 0.15)
    hot_sig = rng.uniform(0.8, 1.4)
    hy, hx = cy + dist * np.sin(angle), cx + dist * np.cos(angle)
    return (np.r_[y, hy], np.r_[x, hx], np.r_[sig_lobe, hot_sig],
            np.r_[brightness * _line_norm(t, sig_lobe), amp_hot])


def render(code: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, Source]:
    """The noise-free sky model of one source (arbitrary units, before the beam)."""
    info = LABEL_CODES[code]
    c = (size - 1) / 2.0
    cy, cx = c + rng.normal(0, 1.5, 2)
    angle = rng.uniform(0.0, np.pi)
    ys, xs, ss, aa = [], [], [], []

    def add(parts):
        for lst, v in zip((ys, xs, ss, aa), parts):
            lst.append(np.atleast_1d(v))

    sides = (angle, angle + np.pi)
    if info.family == "FRI":
        length = rng.uniform(18.0, 45.0) * (0.8 if not info.confident else 1.0)
        decay = length * rng.uniform(0.2, 0.4) * (1.6 if not info.confident else 1.0)
        opening = np.deg2rad(rng.uniform(4.0, 14.0))
        amp = rng.uniform(0.35, 0.6)
        add((cy, cx, 1.0, 1.0))  # bright core
        if info.morphology == "head-tail":  # both jets trail to one side (narrow-angle tail)
            trail = angle + np.pi / 2
            spread = rng.uniform(0.15, 0.35)
            jet_angles, bends = (trail - spread, trail + spread), (0.0, 0.0)
        elif info.morphology == "wide-angle tail":  # opposite jets bending to the same side
            b = rng.uniform(0.6, 1.2)
            jet_angles, bends = sides, (b, -b)
        else:
            b = rng.normal(0.0, 0.1)
            jet_angles, bends = sides, (b, b)
        for k, (a, bend) in enumerate(zip(jet_angles, bends)):
            boost = 1.0 if k == 0 else rng.uniform(0.5, 1.0)  # Doppler-dimmed counter-jet
            add(_jet(cy, cx, a, length * (1.0 if k == 0 else rng.uniform(0.8, 1.0)), bend, amp * boost, decay,
                     opening, rng))
        extent = length
    elif info.family == "FRII":
        dist = rng.uniform(22.0, 58.0) * (0.8 if not info.confident else 1.0)
        core = rng.uniform(0.04, 0.25) if info.confident else rng.uniform(0.25, 0.5)
        add((cy, cx, 1.0, core))  # faint core
        for k, a in enumerate(sides):
            d = dist * (1.0 if k == 0 else rng.uniform(0.7, 1.0))
            a = a + (0.0 if k == 0 else rng.normal(0.0, 0.08))
            add(_lobe(cy, cx, a, d, rng.uniform(0.7, 1.0), rng.uniform(0.08, 0.2), rng))
            if info.morphology == "double-double":  # a restarted inner pair
                f = rng.uniform(0.3, 0.45)
                add((cy + f * d * np.sin(a), cx + f * d * np.cos(a), 1.0, rng.uniform(0.4, 0.6)))
        extent = dist
    else:  # hybrid: one FR II side, one FR I side
        dist = rng.uniform(22.0, 50.0)
        add((cy, cx, 1.0, rng.uniform(0.4, 0.8)))
        add(_lobe(cy, cx, sides[0], dist, rng.uniform(0.7, 1.0), rng.uniform(0.08, 0.2), rng))
        add(_jet(cy, cx, sides[1], dist * rng.uniform(0.6, 1.0), 0.0, rng.uniform(0.35, 0.6), dist * 0.3,
                 np.deg2rad(8.0), rng))
        extent = dist
    model = _blobs(np.concatenate(ys), np.concatenate(xs), np.concatenate(ss), np.concatenate(aa), size)
    snr = float(np.exp(rng.uniform(np.log(25.0), np.log(250.0)))) if info.confident else \
        float(np.exp(rng.uniform(np.log(12.0), np.log(60.0))))
    return model, Source(code, float(angle), float(extent), snr)


def beam_kernel_fft(size: int, fwhm: float = BEAM_FWHM_PX) -> np.ndarray:
    """FFT of a unit-sum circular Gaussian beam centred at the origin (for circular convolution)."""
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    d = np.minimum(np.arange(size), size - np.arange(size)).astype(np.float64)
    g = np.exp(-0.5 * (d / sigma) ** 2)
    kernel = np.outer(g, g)
    return np.fft.rfft2(kernel / kernel.sum())


def observe(model: np.ndarray, snr: float, rng: np.random.Generator, beam_fft: np.ndarray) -> np.ndarray:
    """Beam-convolved model plus beam-correlated noise, in units of the noise rms.

    Model and white noise are convolved with the beam together; the noise is scaled so that
    its rms after the beam is 1, and the model so that its smoothed peak is ``snr``.
    """
    shape = model.shape
    power = np.sqrt((np.fft.irfft2(beam_fft, s=shape) ** 2).sum())  # rms of unit white noise after the beam
    spectrum = np.fft.rfft2(model)
    peak = np.fft.irfft2(spectrum * beam_fft, s=shape).max()
    sky = model * (snr / peak) + rng.standard_normal(shape) / power
    return np.fft.irfft2(np.fft.rfft2(sky) * beam_fft, s=shape)


def to_mirabest(image: np.ndarray, noise_rms: float = 1.0) -> np.ndarray:
    """MiraBest-style uint8: zero at or below 3 sigma, circular aperture, linear 0-255 scale."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2.0
    inside = np.hypot(yy - c, xx - c) <= size / 2.0
    out = np.where((image > 3.0 * noise_rms) & inside, image, 0.0)
    peak = out.max()
    if peak > 0:
        out = out / peak
    return np.round(out * 255.0).astype(np.uint8)


def batch_codes(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` label codes in :data:`CODE_MIX` proportions, at least one of each when ``n >= 10``, shuffled."""
    codes = sorted(CODE_MIX)
    counts = np.array([CODE_MIX[c] for c in codes]) * n
    whole = np.floor(counts).astype(int)
    if n >= len(codes):
        whole = np.maximum(whole, 1)
    while whole.sum() > n:
        whole[np.argmax(whole)] -= 1
    order = np.argsort(-(counts - np.floor(counts)))
    i = 0
    while whole.sum() < n:
        whole[order[i % len(codes)]] += 1
        i += 1
    return rng.permutation(np.repeat(codes, whole))


def make_images(codes: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE):
    """Float images (noise rms 1) and the drawn sources for ``codes``."""
    beam = beam_kernel_fft(size)
    images, sources = [], []
    for code in codes:
        model, src = render(int(code), rng, size)
        images.append(observe(model, src.snr, rng, beam))
        sources.append(src)
    return np.stack(images) if images else np.zeros((0, size, size)), sources


def _filenames(codes: np.ndarray, split: str, start: int) -> list[str]:
    return [f"{SYNTHETIC_TAG}_{split}_{LABEL_CODES[int(c)].code}_{start + i:05d}.png" for i, c in enumerate(codes)]


def write_sample(out_dir: str | Path, per_batch: int = 64, n_test: int = 128, seed: int = 0,
                 n_batches: int = len(TRAIN_BATCHES)) -> Path:
    """Write the synthetic MiraBest-format sample under ``out_dir/batches``; returns that folder.

    Each file is written atomically, ``batches.meta`` last, so a folder with a meta file
    is complete (safe if several processes generate at once).
    """
    if n_batches < 1 or per_batch < 1 or n_test < 1:
        raise ValueError("n_batches, per_batch and n_test must be >= 1")
    folder = Path(out_dir) / "batches"
    for b, name in enumerate([*TRAIN_BATCHES[:n_batches], TEST_BATCH]):
        rng = np.random.default_rng([seed, SAMPLE_VERSION, b])
        test = name == TEST_BATCH
        n = n_test if test else per_batch
        codes = batch_codes(n, rng)
        images, _ = make_images(codes, rng)
        data = np.stack([to_mirabest(im) for im in images])
        label = "testing batch 1 of 1" if test else f"training batch {b + 1} of {n_batches}"
        write_batch(folder / name, data, codes, _filenames(codes, "test" if test else f"train{b + 1}", 0),
                    f"{SYNTHETIC_TAG} {label}")
    write_meta(folder, per_batch)
    return folder


def write_fits_sample(out_dir: str | Path, n_train: int = 32, n_test: int = 16, seed: int = 0,
                      nan_fraction: float = 0.25) -> Path:
    """Float32 FITS cutouts (Jy/beam, FIRST-like header) + ``train.csv`` / ``test.csv`` catalogues.

    Confident FR I / FR II only (label column: ``FRI`` / ``FRII``). A ``nan_fraction`` of the
    cutouts have a NaN-blanked edge strip, as cutouts at a survey's edge do. Needs astropy.
    """
    from astropy.io import fits

    out = Path(out_dir)
    (out / "fits").mkdir(parents=True, exist_ok=True)
    beam = beam_kernel_fft(IMAGE_SIZE)
    for split, n, k in (("train", n_train, 0), ("test", n_test, 1)):
        rng = np.random.default_rng([seed, SAMPLE_VERSION, 100 + k])
        codes = rng.permutation(np.repeat([0, 5], [n // 2, n - n // 2]))
        rows = []
        for i, code in enumerate(codes):
            model, src = render(int(code), rng, IMAGE_SIZE)
            image = (observe(model, src.snr, rng, beam) * NOISE_JY).astype(np.float32)
            if rng.uniform() < nan_fraction:
                width = int(rng.integers(10, 30))
                edge = int(rng.integers(4))
                view = np.rot90(image, edge)  # a view: blank one of the four edges
                view[:, :width] = np.nan
            header = fits.Header()
            header["OBJECT"] = (f"{SYNTHETIC_TAG}-{split}-{i:04d}", "synthetic source, not sky data")
            header["BUNIT"] = "JY/BEAM"
            header["BMAJ"] = header["BMIN"] = BEAM_FWHM_PX * PIXEL_ARCSEC / 3600.0
            header["BPA"] = 0.0
            header["CTYPE1"], header["CTYPE2"] = "RA---SIN", "DEC--SIN"
            header["CDELT1"], header["CDELT2"] = -PIXEL_ARCSEC / 3600.0, PIXEL_ARCSEC / 3600.0
            header["CRPIX1"] = header["CRPIX2"] = (IMAGE_SIZE + 1) / 2.0
            header["CRVAL1"], header["CRVAL2"] = float(rng.uniform(0, 360)), float(rng.uniform(-10, 60))
            header["COMMENT"] = "SYNTHETIC image from domains.radio_astronomy.sample; not survey data"
            buf = io.BytesIO()
            fits.PrimaryHDU(image, header=header).writeto(buf)
            name = f"fits/{SYNTHETIC_TAG}_{split}_{i:04d}.fits"
            (out / name).write_bytes(buf.getvalue())
            rows.append((name, "FRI" if code == 0 else "FRII", header["CRVAL1"], header["CRVAL2"], src.snr))
        with (out / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "ra", "dec", "snr"])
            w.writerows([(p, lab, f"{ra:.5f}", f"{dec:.5f}", f"{snr:.1f}") for p, lab, ra, dec, snr in rows])
    return out


def is_complete(folder: str | Path, n_batches: int = len(TRAIN_BATCHES)) -> bool:
    """Whether ``folder`` holds a finished sample (the meta file is written last)."""
    folder = Path(folder)
    return (folder / META_FILE).is_file() and all((folder / n).is_file()
                                                  for n in (*TRAIN_BATCHES[:n_batches], TEST_BATCH))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the SYNTHETIC radio-galaxy sample (MiraBest batch format).")
    parser.add_argument("out", help="output folder (batches are written to OUT/batches)")
    parser.add_argument("--per-batch", type=int, default=64, help="images per training batch (7 batches)")
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fits", action="store_true",
                        help="also write FITS cutouts + CSV catalogues to OUT/fits_sample")
    a = parser.parse_args(argv)
    folder = write_sample(a.out, a.per_batch, a.n_test, a.seed)
    print(f"wrote {folder}: SYNTHETIC radio galaxies (not sky data), MiraBest batch format, label codes 0-9")
    if a.fits:
        fits_dir = write_fits_sample(Path(a.out) / "fits_sample", seed=a.seed)
        print(f"wrote {fits_dir}: SYNTHETIC FITS cutouts (NaN-blanked edges on some) + train.csv / test.csv")


if __name__ == "__main__":
    main()
