"""Reading and checking user images: the one place that knows what an image file is.

* :data:`IMAGE_EXTENSIONS` — the file suffixes read as images, everywhere in cellhub.
* :func:`read_image` — one file (path, bytes or zip member) -> RGB ``PIL.Image``, within
  :class:`Limits`, raising :class:`InputError` with what is wrong and what to do.
* :func:`check_image` — a cheap "does it decode?" verdict for dataset folders (a corrupt file
  is skipped and reported, never a crash).
* :func:`collect_images` / :func:`list_zip_images` — files, folders and ``.zip`` archives ->
  :class:`ImageRef` (zip members are streamed, never extracted).
"""
from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ARCHIVE_EXTENSIONS",
    "InputError",
    "Limits",
    "DEFAULT_LIMITS",
    "ImageRef",
    "read_image",
    "to_rgb",
    "check_image",
    "is_image_file",
    "list_zip_images",
    "collect_images",
]

#: file extensions read as images (compared lower-case)
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
ARCHIVE_EXTENSIONS: tuple[str, ...] = (".zip",)


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


class InputError(ValueError):
    """A user-supplied file cannot be used; the message says which one, why, and what to do."""


@dataclass(frozen=True)
class Limits:
    """Guards against oversized or malicious input (the defaults suit cell crops and smears)."""

    #: width * height of one image (a 640x480 smear is 0.3 MP; 25 MP is a large micrograph)
    max_pixels: int = 25_000_000
    #: bytes of one image file (or one zip member, uncompressed)
    max_image_bytes: int = 25 * 2**20
    #: images in one batch request
    max_images: int = 2_000
    #: entries in one zip archive (directories included)
    max_zip_members: int = 10_000
    #: total uncompressed bytes read from one zip archive
    max_zip_bytes: int = 512 * 2**20
    #: uncompressed/compressed size above which a (large) member is treated as a zip bomb
    max_compression_ratio: float = 100.0


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ImageRef:
    """Where one image comes from: a file, or a member of a zip archive."""

    name: str
    path: Path
    member: str | None = None

    def read_bytes(self, limits: Limits = DEFAULT_LIMITS, archive: zipfile.ZipFile | None = None) -> bytes:
        """The file's bytes, never more than ``limits.max_image_bytes`` (+1 to detect overflow)."""
        cap = limits.max_image_bytes + 1
        if self.member is None:
            with open(self.path, "rb") as fh:
                return fh.read(cap)
        zf = archive or zipfile.ZipFile(self.path)
        try:
            with zf.open(self.member) as fh:  # stream: the header's size may lie
                return fh.read(cap)
        finally:
            if archive is None:
                zf.close()


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL image: 16-bit/float microscopy images stretched to 8 bits, transparency onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float microscopy images
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def read_image(
    source: str | Path | bytes | ImageRef, *, name: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> Image.Image:
    """Decode one image file (path, bytes or :class:`ImageRef`) into an RGB ``PIL.Image``.

    Applies EXIF orientation, flattens transparency onto white, keeps the first frame of a
    multi-frame file. Raises :class:`InputError` naming the file for an empty, oversized,
    unreadable, truncated or too-many-pixel image.
    """
    if isinstance(source, ImageRef):
        name = name or source.name
        try:
            data = source.read_bytes(limits)
        except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
            raise InputError(f"{name}: cannot be read ({exc}).") from exc
    elif isinstance(source, (bytes, bytearray)):
        name = name or "image"
        data = bytes(source[: limits.max_image_bytes + 1])
    else:
        path = Path(source)
        name = name or path.name
        if not path.is_file():
            raise InputError(f"{name}: no such file ({path}).")
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise InputError(
                f"{name}: the file is {_mb(size)}, over the {_mb(limits.max_image_bytes)} limit "
                "for one image; downscale it or crop the cell."
            )
        data = path.read_bytes()
    if not data:
        raise InputError(f"{name}: the file is empty; use a PNG, JPEG, TIFF, BMP or WebP image.")
    if len(data) > limits.max_image_bytes:
        raise InputError(
            f"{name}: the file is over the {_mb(limits.max_image_bytes)} limit for one image; "
            "downscale it or crop the cell."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise InputError(
                    f"{name}: {width}x{height} pixels ({width * height / 1e6:.1f} MP) is over the "
                    f"{limits.max_pixels / 1e6:g} MP limit; downscale it or crop the cell."
                )
            if width == 0 or height == 0:
                raise InputError(f"{name}: the image has no pixels ({width}x{height}).")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"{name}: too many pixels ({exc}); the limit is {limits.max_pixels / 1e6:g} MP."
        ) from exc
    except UnidentifiedImageError as exc:
        raise InputError(
            f"{name}: not an image file that can be read; use a PNG, JPEG, TIFF, BMP or WebP "
            "cell image."
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt data
        raise InputError(f"{name}: the image is corrupt or truncated ({exc}).") from exc


def _safe_member_name(name: str) -> str | None:
    """The member's path if it is a plain relative path, else ``None`` (absolute / ``..``)."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(p == ".." for p in parts):
        return None
    return "/".join(p for p in parts if p not in ("", "."))


def list_zip_images(
    path: str | Path, *, limits: Limits = DEFAULT_LIMITS, label: str | None = None
) -> tuple[list[ImageRef], list[tuple[str, str]]]:
    """The image members of a zip archive, and the skipped members with the reason.

    Nothing is extracted to disk; members are streamed with size caps later. Skipped: unsafe
    paths (absolute, ``..``), macOS metadata, non-image names, nested archives, encrypted
    members, members over the size limit or with a zip-bomb compression ratio, and whatever is
    past the archive's total-size limit. Raises :class:`InputError` for a file that is not a
    valid zip or has too many members.
    """
    path = Path(path)
    label = label or path.name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{label}: not a valid zip archive ({exc}).") from exc
    refs: list[ImageRef] = []
    skipped: list[tuple[str, str]] = []
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_zip_members:
            raise InputError(
                f"{label}: the archive has {len(infos)} entries; the limit is {limits.max_zip_members}. "
                "Split it into smaller archives."
            )
        total = 0
        for info in infos:
            if info.is_dir():
                continue
            shown = f"{label}/{info.filename}"
            clean = _safe_member_name(info.filename)
            base = PurePosixPath(clean or info.filename).name
            suffix = PurePosixPath(base).suffix.lower()
            if clean is None:
                reason = "unsafe path (absolute or '..'); not read"
            elif clean.startswith("__MACOSX/") or base.startswith("._") or base in (".DS_Store", "Thumbs.db"):
                reason = "operating-system metadata, not an image"
            elif suffix in ARCHIVE_EXTENSIONS:
                reason = "nested archive; only images directly inside the zip are read"
            elif suffix not in IMAGE_EXTENSIONS:
                reason = f"not an image file ({suffix or 'no extension'})"
            elif info.flag_bits & 0x1:
                reason = "encrypted member"
            elif info.file_size > limits.max_image_bytes:
                reason = f"{_mb(info.file_size)} uncompressed, over the {_mb(limits.max_image_bytes)} limit"
            elif info.file_size > 2**20 and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1):
                reason = f"suspicious compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 (zip bomb?)"
            elif total + info.file_size > limits.max_zip_bytes:
                reason = f"archive total over {_mb(limits.max_zip_bytes)}; the rest was not read"
            else:
                total += info.file_size
                refs.append(ImageRef(name=f"{label}/{clean}", path=path, member=info.filename))
                continue
            skipped.append((shown, reason))
    return refs, skipped


def collect_images(
    inputs: Iterable[str | Path], *, limits: Limits = DEFAULT_LIMITS, names: Sequence[str] | None = None
) -> tuple[list[ImageRef], list[tuple[str, str]]]:
    """Expand files, folders (recursively) and ``.zip`` archives into image references.

    ``names`` optionally gives the display name of each input (e.g. the original upload name).
    Returns ``(refs, skipped)``; non-image files are skipped with a reason. Raises
    :class:`InputError` when nothing was given or the total exceeds ``limits.max_images``.
    """
    inputs = [Path(p) for p in inputs if p not in (None, "")]
    if not inputs:
        raise InputError("No files were given; upload one or more cell images or a .zip of them.")
    refs: list[ImageRef] = []
    skipped: list[tuple[str, str]] = []
    for i, path in enumerate(inputs):
        label = names[i] if names is not None and i < len(names) else path.name
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    rel = child.relative_to(path).as_posix()
                    if is_image_file(child):
                        refs.append(ImageRef(name=f"{label}/{rel}", path=child))
                    elif not child.name.startswith("."):
                        skipped.append((f"{label}/{rel}", f"not an image file ({child.suffix or 'no extension'})"))
        elif not path.exists():
            skipped.append((label, "no such file"))
        elif path.suffix.lower() in ARCHIVE_EXTENSIONS or (
            not is_image_file(path) and zipfile.is_zipfile(path)
        ):
            try:
                more, bad = list_zip_images(path, limits=limits, label=label)
            except InputError as exc:
                skipped.append((label, str(exc).removeprefix(f"{label}: ")))
                continue
            refs += more
            skipped += bad
        else:  # decoding decides; a bad file is reported then
            refs.append(ImageRef(name=label, path=path))
        if len(refs) > limits.max_images:
            raise InputError(
                f"{len(refs)}+ images in one request; the limit is {limits.max_images}. "
                "Split the batch into smaller ones."
            )
    return refs, skipped




def check_image(path: str | Path) -> str | None:
    """``None`` when ``path`` decodes as an image, else why not (empty, not an image, truncated...).

    JPEGs are decoded in draft mode (at 1/8 scale): every byte of the stream is still read, so a
    truncated file is caught, at a fraction of the cost of a full decode.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            if im.width < 1 or im.height < 1:
                return "image has no pixels"
    except UnidentifiedImageError:
        return "not an image (Pillow cannot identify it)"
    except Image.DecompressionBombError as exc:
        return f"refused: {exc}"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            return f"truncated image ({msg})"
        return f"corrupt image ({msg})"
    return None
