"""Data input that must never turn into silently wrong pixels or paths: every image mode, split-file edge cases."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.data.arrays import load_split_images
from tasks import DataError, decode_image, get_task, read_split
from tasks.archive import validate_task_dir
from tasks.images import ImageModeError, to_rgb


def _png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, samples: np.ndarray) -> Path:
    """A PNG written byte by byte (big-endian samples, no filter), for depths Pillow does not write itself."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    dtype = ">u2" if bit_depth == 16 else np.uint8
    rows = np.asarray(samples, dtype=dtype).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def _pgm16(path: Path, values: list[int], maxval: int = 65535) -> Path:
    path.write_bytes(b"P5\n%d 1\n%d\n" % (len(values), maxval) + np.asarray(values, ">u2").tobytes())
    return path


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


GREY16 = [0, 32768, 65535, 1000]  # -> 0, 128, 255, 4 (1000 * 255 / 65535 = 3.89)
GREY16_AS_8 = [0, 128, 255, 4]


def _grey(values: list[int]) -> np.ndarray:
    """Expected uint8 RGB [1, W, 3] of a grey row."""
    return np.repeat(np.asarray(values, np.uint8)[None, :, None], 3, axis=2)


def _palette(mode: str, transparency: int | None = None) -> Image.Image:
    im = Image.new(mode, (3, 1))
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    im.putdata([0, 1, 2] if mode == "P" else [(0, 255), (1, 0), (2, 128)])
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


PALETTE_RGB = np.array([[[10, 20, 30], [200, 100, 50], [0, 255, 0]]], np.uint8)

# (name, writer(tmp folder) -> file, expected uint8 RGB [H, W, 3], tolerance)
CASES = [
    ("16-bit grey PNG (Pillow)", lambda d: _save(Image.fromarray(np.array([GREY16], np.uint16)), d / "g16.png"),
     _grey(GREY16_AS_8), 0),
    ("16-bit grey PNG (bytes)", lambda d: _png(d / "g16b.png", 4, 1, 16, 0, GREY16), _grey(GREY16_AS_8), 0),
    ("16-bit grey TIFF I;16", lambda d: _save(Image.fromarray(np.array([GREY16], np.uint16)), d / "g16.tif"),
     _grey(GREY16_AS_8), 0),
    ("16-bit grey TIFF I;16B", lambda d: _save(Image.fromarray(np.array([GREY16], ">u2")), d / "g16b.tif"),
     _grey(GREY16_AS_8), 0),
    ("16-bit PGM (mode I)", lambda d: _pgm16(d / "g16.pgm", GREY16), _grey(GREY16_AS_8), 0),
    ("10-bit PGM (mode I)", lambda d: _pgm16(d / "g10.pgm", [0, 512, 1023], maxval=1023), _grey([0, 128, 255]), 0),
    ("float TIFF in [0, 1]", lambda d: _save(Image.fromarray(np.array([[0, 0.5, 1.0, 0.25]], np.float32)), d / "f.tif"),
     _grey([0, 128, 255, 64]), 0),
    ("48-bit RGB PNG", lambda d: _png(d / "rgb48.png", 2, 1, 16, 2, [0, 32768, 65535, 65535, 0, 32768]),
     np.array([[[0, 128, 255], [255, 0, 128]]], np.uint8), 0),
    ("64-bit RGBA PNG (alpha dropped)", lambda d: _png(d / "rgba64.png", 1, 1, 16, 6, [65535, 32768, 0, 0]),
     np.array([[[255, 128, 0]]], np.uint8), 0),
    ("32-bit grey+alpha PNG (alpha dropped)", lambda d: _png(d / "la32.png", 2, 1, 16, 4, [32768, 65535, 65535, 0]),
     _grey([128, 255]), 0),
    ("2-bit grey PNG", lambda d: _png(d / "g2.png", 4, 1, 2, 0, [0b00011011]), _grey([0, 85, 170, 255]), 0),
    ("1-bit PNG", lambda d: _save(Image.fromarray(np.array([[0, 1, 1, 0]], bool)), d / "bw.png"),
     _grey([0, 255, 255, 0]), 0),
    ("L PNG", lambda d: _save(Image.fromarray(np.array([[0, 7, 200]], np.uint8)), d / "l.png"), _grey([0, 7, 200]), 0),
    ("LA PNG (alpha dropped)", lambda d: _save(Image.fromarray(np.array([[[9, 0], [99, 255]]], np.uint8), "LA"),
                                                 d / "la.png"), _grey([9, 99]), 0),
    ("P PNG", lambda d: _save(_palette("P"), d / "p.png"), PALETTE_RGB, 0),
    ("P PNG with transparency (dropped)", lambda d: _save(_palette("P", transparency=1), d / "pt.png"), PALETTE_RGB, 0),
    ("P GIF with transparency (dropped)", lambda d: _save(_palette("P", transparency=0), d / "pt.gif"), PALETTE_RGB, 0),
    ("PA TIFF (alpha dropped)", lambda d: _save(_palette("PA"), d / "pa.tif"), PALETTE_RGB, 0),
    ("RGB PNG", lambda d: _save(Image.fromarray(np.array([[[1, 2, 3], [250, 0, 9]]], np.uint8)), d / "rgb.png"),
     np.array([[[1, 2, 3], [250, 0, 9]]], np.uint8), 0),
    ("RGBA PNG (alpha dropped, not composited)",
     lambda d: _save(Image.fromarray(np.array([[[200, 10, 20, 0], [5, 6, 7, 128]]], np.uint8)), d / "rgba.png"),
     np.array([[[200, 10, 20], [5, 6, 7]]], np.uint8), 0),
    ("CMYK TIFF", lambda d: _save(Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 255, 0],
                                                              [0, 0, 0, 255]]], np.uint8), "CMYK"), d / "cmyk.tif"),
     np.array([[[255, 255, 255], [0, 255, 255], [255, 0, 0], [0, 0, 0]]], np.uint8), 0),
    ("YCbCr TIFF", lambda d: _save(Image.fromarray(np.array([[[255, 128, 128], [0, 128, 128], [76, 85, 255]]], np.uint8),
                                                   "YCbCr"), d / "ycc.tif"),
     np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], np.uint8), 2),
    # Lab as Pillow stores it: L scaled to 0..255, a and b as signed bytes. sRGB red is L 53, a 80, b 67.
    ("Lab TIFF", lambda d: _save(Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0], [136, 80, 67]]], np.uint8), "LAB"),
                                 d / "lab.tif"),
     np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], np.uint8), 12),
]  # fmt: skip


@pytest.mark.parametrize(("name", "write", "expected", "tolerance"), CASES, ids=[c[0] for c in CASES])
def test_every_image_mode_decodes_to_its_rgb_values(tmp_path, name, write, expected, tolerance):
    path = write(tmp_path)
    # Decoded at its own width: a one-row image is only stretched vertically, so every row equals the file's.
    decoded = decode_image(path, expected.shape[1])
    assert decoded.dtype == np.uint8
    rgb = decoded.transpose(1, 2, 0)[:1]
    assert np.abs(rgb.astype(int) - expected.astype(int)).max() <= tolerance, (name, rgb.tolist(), expected.tolist())
    assert (decoded == decoded[:, :1]).all()


def test_a_16_bit_png_is_not_white(tmp_path):
    """The audit's case: a 16-bit grayscale PNG of a mid-grey image decoded to pure white."""
    path = _save(Image.fromarray(np.full((4, 4), 32768, np.uint16)), tmp_path / "mid.png")
    assert (decode_image(path, 4) == 128).all()


def test_modes_without_files_decode_too():
    hsv = Image.fromarray(np.array([[[0, 255, 255], [85, 255, 255], [0, 0, 128]]], np.uint8), "HSV")
    assert np.asarray(to_rgb(hsv)).tolist() == [[[255, 0, 0], [0, 255, 0], [128, 128, 128]]]
    premultiplied = Image.fromarray(np.array([[[100, 50, 0, 128]]], np.uint8), "RGBa")
    assert np.asarray(to_rgb(premultiplied)).tolist() == [[[199, 99, 0]]]  # un-premultiplied, then alpha dropped
    with pytest.raises(ImageModeError, match=r"mode I image \(unknown file\) has no known bit depth; save it as"):
        to_rgb(Image.fromarray(np.array([[0, 7]], np.int32)))


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("32-bit int TIFF", lambda d: _save(Image.fromarray(np.array([[0, 70000]], np.int32)), d / "i32.tif"),
         r"i32.tif: 32-bit signed integer image: no agreed scale to 8 bits; save it as an 8- or 16-bit PNG"),
        ("float TIFF above 1", lambda d: _save(Image.fromarray(np.array([[0, 255.0]], np.float32)), d / "f255.tif"),
         r"f255.tif: float image with values 0..255: only floats in \[0, 1\] have a known scale"),
        ("float TIFF with NaN", lambda d: _save(Image.fromarray(np.array([[0, np.nan]], np.float32)), d / "nan.tif"),
         r"nan.tif: float image holds NaN or infinite values"),
    ],
)  # fmt: skip
def test_modes_without_a_known_scale_are_refused_in_one_line(tmp_path, name, write, message):
    with pytest.raises(DataError, match=r"cannot read image .*" + message) as e:
        decode_image(write(tmp_path), 4)
    assert "\n" not in str(e.value)


def _one_image_task(tmp_path: Path, image: Image.Image, name: str) -> Path:
    d = tmp_path / "dtd"
    (d / "images").mkdir(parents=True)
    image.save(d / "images" / name)
    (d / "train800.txt").write_text(f"images/{name} 0\n")
    return d


def test_the_array_cache_holds_scaled_16_bit_images(tmp_path):
    d = _one_image_task(tmp_path, Image.fromarray(np.full((8, 8), 32768, np.uint16)), "mid.png")
    arrays = load_split_images(read_split(d, get_task("dtd"), "train800"), 8, cache_dir=tmp_path / "cache")
    assert arrays.inputs.shape == (1, 3, 8, 8) and (np.asarray(arrays.inputs) == 128).all()


def test_validation_reports_a_refused_image_in_one_line(tmp_path):
    d = _one_image_task(tmp_path, Image.fromarray(np.full((8, 8), 70000, np.int32)), "deep.tif")
    report = validate_task_dir(d, get_task("dtd"))
    refused = [p for p in report.problems if "deep.tif" in p]
    assert len(refused) == 1 and "32-bit signed integer image" in refused[0] and "\n" not in refused[0]


# -- split files: a byte-order mark is accepted, paths outside the task folder are refused ---------------------
def _split_task(tmp_path: Path, lines: list[str], raw_prefix: bytes = b"") -> Path:
    d = tmp_path / "data" / "dtd"
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(d / "images" / "a.jpg")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "data" / "outside.jpg")
    (d / "train800.txt").write_bytes(raw_prefix + ("\n".join(lines) + "\n").encode())
    return d


def test_a_split_file_may_start_with_a_byte_order_mark(tmp_path):
    d = _split_task(tmp_path, ["images/a.jpg 3", "images/a.jpg 4"], raw_prefix=b"\xef\xbb\xbf")
    split = read_split(d, get_task("dtd"), "train800")
    assert split.images == (d / "images" / "a.jpg",) * 2 and split.labels == (3, 4)
    (d / "train800.txt").write_bytes(b"\xef\xbb\xbf\nimages/a.jpg 3\n")  # a mark alone on the first line
    assert read_split(d, get_task("dtd"), "train800").labels == (3,)


def test_paths_that_stay_inside_the_task_folder_are_accepted(tmp_path):
    d = _split_task(tmp_path, ["images/../images/a.jpg 1", "./images/a.jpg 2"])
    assert read_split(d, get_task("dtd"), "train800").labels == (1, 2)


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../outside.jpg", "leaves the task folder"),
        ("images/../../outside.jpg", "leaves the task folder"),
        ("{outside}", "is absolute"),
        ("C:/data/outside.jpg", "is absolute"),
        ("\\\\server\\share\\outside.jpg", "is absolute"),
    ],
)
def test_a_path_outside_the_task_folder_is_refused_with_file_and_line(tmp_path, path, problem):
    """Refused even though the file exists: a split file names only images inside its own folder."""
    outside = tmp_path / "data" / "outside.jpg"
    d = _split_task(tmp_path, ["images/a.jpg 1", f"{path.format(outside=outside)} 2"])
    assert outside.is_file()
    with pytest.raises(DataError) as e:
        read_split(d, get_task("dtd"), "train800", check_files=False)
    message = str(e.value)
    assert message.startswith(f"{d / 'train800.txt'}:2: image path ") and f" {problem}; list images" in message
    assert f"relative to the task folder {d}" in message and "\n" not in message


def test_validation_and_the_cli_refuse_a_path_outside_the_task_folder(synth_root, tmp_path, capsys):
    from benchmark.cli import main
    from tests.conftest import argv

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    split = root / "svhn" / "train800.txt"
    lines = split.read_text().splitlines()
    outside = root / "outside.jpg"
    shutil.copyfile(root / "svhn" / lines[0].split()[0], outside)
    lines[4] = f"{outside} {lines[4].split()[1]}"
    split.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())

    report = validate_task_dir(root / "svhn", get_task("svhn"))
    assert [p for p in report.problems if "is absolute" in p] == [
        f"{split}:5: image path {str(outside)!r} is absolute; list images by their path relative to the task "
        f"folder {root / 'svhn'} (e.g. images/000001.jpg), inside it"
    ]
    results = tmp_path / "results"
    capsys.readouterr()
    code = main(argv(f"run --method linear --task svhn --data-root {root} --results {results} --protocol tune"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {split}:5: image path ") and "is absolute" in err
    assert not results.exists() or not any(results.rglob("*.json"))
