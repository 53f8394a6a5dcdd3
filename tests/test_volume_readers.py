"""Volume and mask readers, each on a small file written by its format's library; Heidelberg
``.vol``/``.e2e`` files are built byte by byte from their published layouts (eyepy reads them but
ships no usable writer) and read back through eyepy."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from skimage.util import img_as_ubyte

from anogan_lightning.data.readers import (
    VolumeReadError,
    read_mask,
    read_volume,
    resolve_spacing_x,
    stem,
    suffix,
)

# the readers' libraries are the `volumes` extra: without it this module skips
nib = pytest.importorskip("nibabel", reason="the volumes extra is not installed")
tifffile = pytest.importorskip("tifffile", reason="the volumes extra is not installed")
pytest.importorskip("eyepy", reason="the volumes extra is not installed")

SHAPE = (3, 16, 20)  # B-scans, rows, columns


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, SHAPE, dtype=np.uint8)


# ---------------------------------------------------------------- Heidelberg layouts


def write_vol(path: Path, reflectivity: np.ndarray, scale_mm: tuple[float, float, float]) -> None:
    """Heidelberg VOL raw export: a 2048-byte file header, the SLO image, then per B-scan a
    header (256 bytes + segmentation lines, padded to BScanHdrSize) and SizeX x SizeZ float32
    reflectivities. ``scale_mm``: (ScaleX, ScaleZ, Distance) = (column, row, B-scan) in mm."""
    n, rows, cols = reflectivity.shape
    sx, sz, dist = scale_mm
    slo = (8, 8)
    bscan_hdr = 256 + 2 * cols * 4  # two segmentation lines
    h = b"HSF-OCT-103\0" + struct.pack("<3i3d", cols, n, rows, sx, dist, sz)
    h += struct.pack("<2i2did", slo[1], slo[0], 0.03, 0.03, 30, 0.0)  # SLO size, scale, focus
    h += b"OD\0\0" + struct.pack("<qii", 0, 3, bscan_hdr)  # ScanPosition, ExamTime, pattern
    h += b"1234".ljust(16, b"\0") + b"".ljust(16, b"\0") + struct.pack("<i", 7)  # IDs, PID
    h += b"P1".ljust(24, b"\0") + struct.pack("<di", 0.0, 1) + b"V1".ljust(24, b"\0")
    h += struct.pack("<d4i", 0.0, 0, 0, 0, 0) + b"".ljust(34, b"\0")  # VisitDate, grids, ProgID
    assert len(h) == 258  # then spare bytes up to 2048
    out = [h.ljust(2048, b"\0"), np.zeros(slo, np.uint8).tobytes()]
    for i in range(n):
        b = b"HSF-BS-103".ljust(12, b"\0")
        b += struct.pack("<i4d", bscan_hdr, 0.0, i * dist, cols * sx, i * dist)  # start, end
        b += struct.pack("<iifi6f", 2, 256, 30.0, 0, *([0.0] * 6))  # NumSeg, OffSeg, quality
        b = b.ljust(256, b"\0") + np.full((2, cols), 3.0e38, "<f4").tobytes()  # no layers
        out += [b.ljust(bscan_hdr, b"\0"), np.ascontiguousarray(reflectivity[i], "<f4").tobytes()]
    path.write_bytes(b"".join(out))


def _container(kind: int, ids: tuple[int, ...], payload: bytes) -> bytes:
    pid, study, series, slc, ind = ids
    head = struct.pack(
        "<12s9iHHII", b"MDbData", 0, 0, 0, len(payload), 0, pid, study, series, slc, ind, 0, kind, 0
    )
    return head + payload  # 60-byte container header + data


def write_e2e(path: Path, codes: np.ndarray) -> None:
    """Heidelberg E2E: version (36 bytes) and main header (52), one chunk: header (52), a
    44-byte folder header per item, then the items, each a 60-byte container header + data.
    One patient/study/series; per B-scan (slice id 2 x index) its metadata (type 10004, 428
    bytes), image (1073741824, subtype 35652097: Heidelberg's unsigned float16 ``codes``) and one
    layer line (10019); at series level laterality (11), enface modality (9007), localizer."""
    n, rows, cols = codes.shape
    series = (1, 1, 1)
    text = b"".join(s.encode("utf-16-le").ljust(64, b"\0") for s in ("Infra-Red", "IR"))
    items = [
        (11, (*series, -1, 0), b"\0" * 14 + b"R" + b"\0" * 12),  # laterality: OD
        (9007, (*series, -1, 0), struct.pack("<2I", 2, 32) + text),
        (1073741824, (*series, -1, 0), struct.pack("<5I", 64, 33620481, 64, 8, 8) + bytes(64)),
    ]
    for i in range(n):
        ids = (*series, 2 * i, 1)
        meta = struct.pack(
            "<3I4fIfffI2fI",
            0,
            rows,
            cols,
            0.0,
            i * 0.25,
            20.0,
            i * 0.25,
            0,
            0,
            0.0039,
            0,
            0,
            0,
            0,
            0,
        )  # size, start/end (degrees), scale_y (mm), ...
        meta += struct.pack("<4I2fIQIff", cols, n, i, 3, 10.0, i * 0.25, 0, 0, 1, 30.0, 0.0)
        img = np.ascontiguousarray(codes[i], "<u2").tobytes()
        layer = struct.pack("<5I", 0, 0, 0, cols, 0) + np.full(cols, 3.0e38, "<f4").tobytes()
        items += [
            (10004, ids, meta.ljust(428, b"\0")),
            (
                1073741824,
                ids,
                struct.pack("<5I", len(img), 35652097, rows * cols, rows, cols) + img,
            ),
            (10019, ids, layer),
        ]
    start = 36 + 52  # the chunk follows the version and the main header
    pos = start + 52 + 44 * len(items)
    folders, blobs = [], []
    for kind, ids, payload in items:
        folders.append(struct.pack("<4I4iHHII", pos, pos, len(payload), 0, *ids, 0, kind, 0))
        blobs.append(_container(kind, ids, payload))
        pos += len(blobs[-1])

    def header(current: int, prev: int) -> bytes:
        return (
            b"MDbMDir".ljust(12, b"\0")
            + struct.pack("<I", 100)
            + bytes(20)
            + struct.pack("<4I", len(items), current, prev, 0)
        )

    version = b"CMDb".ljust(12, b"\0") + struct.pack("<I", 100) + bytes(20)
    path.write_bytes(version + header(0, start) + header(start, 0) + b"".join(folders + blobs))


def heyex_display(reflectivity: np.ndarray) -> np.ndarray:
    """Heyex's display contrast as eyepy applies it to .vol/.e2e reflectivities: uint8."""
    return img_as_ubyte(np.clip((np.log(reflectivity + 2.44e-4) + 8.3) / 8.285, 0, 1))


# ---------------------------------------------------------------- readers


def test_npy_and_npz(tmp_path: Path):
    v = _volume()
    np.save(tmp_path / "a.npy", v)
    out = read_volume(tmp_path / "a.npy")
    assert np.array_equal(out.data, v) and out.spacing == (None, None, None)
    np.save(tmp_path / "one.npy", v[0])  # a single B-scan
    assert read_volume(tmp_path / "one.npy").data.shape == (1, 16, 20)
    np.savez(tmp_path / "b.npz", volume=v, spacing=np.array([120.0, 3.9, 11.5]))
    out = read_volume(tmp_path / "b.npz")
    assert np.array_equal(out.data, v) and out.spacing == (120.0, 3.9, 11.5)
    np.savez(tmp_path / "c.npz", v)  # the only array, whatever its name
    assert np.array_equal(read_volume(tmp_path / "c.npz").data, v)


def test_tiff_spacing(tmp_path: Path):
    v = _volume(1)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        v,
        imagej=True,
        resolution=(1 / 11.5, 1 / 3.9),
        metadata={"spacing": 120.0, "unit": "um", "axes": "ZYX"},
    )
    out = read_volume(tmp_path / "ij.tif")
    assert np.array_equal(out.data, v)
    np.testing.assert_allclose(out.spacing, (120.0, 3.9, 11.5), rtol=1e-6)
    tifffile.imwrite(
        tmp_path / "cm.tiff", v, resolution=(1e4 / 11.5, 1e4 / 3.9), resolutionunit="CENTIMETER"
    )
    out = read_volume(tmp_path / "cm.tiff")
    assert out.spacing[0] is None
    np.testing.assert_allclose(out.spacing[1:], (3.9, 11.5), rtol=1e-6)
    tifffile.imwrite(tmp_path / "plain.tif", v)  # resolution unit "none": no spacing
    assert read_volume(tmp_path / "plain.tif").spacing == (None, None, None)


def test_nifti_axes_and_spacing(tmp_path: Path):
    v = _volume(2)
    img = nib.Nifti1Image(v.transpose(2, 1, 0), np.diag([0.0115, 0.0039, 0.12, 1.0]))
    img.header.set_xyzt_units("mm")  # (i, j, k) = (column, row, B-scan), as ITK writes
    nib.save(img, tmp_path / "a.nii.gz")
    out = read_volume(tmp_path / "a.nii.gz")
    assert np.array_equal(out.data, v)
    np.testing.assert_allclose(out.spacing, (120.0, 3.9, 11.5), rtol=1e-5)
    nib.save(nib.Nifti1Image(v.transpose(2, 1, 0), np.eye(4)), tmp_path / "b.nii")
    assert read_volume(tmp_path / "b.nii").spacing == (None, None, None)  # unit unknown


def test_heidelberg_vol(tmp_path: Path):
    refl = np.random.default_rng(3).random(SHAPE).astype(np.float32) * 0.5
    refl[0, 0, 0] = 1e-6
    write_vol(tmp_path / "scan.vol", refl, (0.0115, 0.0039, 0.12))
    out = read_volume(tmp_path / "scan.vol")
    assert out.data.shape == SHAPE and out.data.dtype == np.uint8
    np.testing.assert_array_equal(out.data, heyex_display(refl))
    np.testing.assert_allclose(out.spacing, (120.0, 3.9, 11.5), rtol=1e-9)


def test_heidelberg_e2e(tmp_path: Path):
    # codes with a zero mantissa are exact powers of two, 2 ** (exponent - 63), whichever bit
    # order a decoder assumes for the mantissa; one exponent per B-scan shows their order
    exponents = np.array([50, 54, 58])[:, None, None] + np.arange(2)[None, None, :].repeat(10, 2)
    codes = np.broadcast_to(exponents << 10, SHAPE).astype(np.uint16)
    write_e2e(tmp_path / "scan.E2E", codes)
    out = read_volume(tmp_path / "scan.E2E")
    assert out.data.shape == SHAPE and out.data.dtype == np.uint8
    refl = 2.0 ** (codes.astype(np.float64) / 1024 - 63)
    np.testing.assert_array_equal(out.data, heyex_display(refl.astype(np.float32)))
    assert out.spacing == (None, None, None)  # eyepy gives E2E volumes in pixels
    with pytest.raises(VolumeReadError, match=r"scan\.E2E.*spacing_x_um"):
        resolve_spacing_x(out, None)
    assert resolve_spacing_x(out, 11.5) == 11.5


def test_masks_in_every_mask_format(tmp_path: Path):
    m = np.zeros(SHAPE, np.uint8)
    m[1, 4:8, 5:9] = 3  # a multi-class label counts as lesion
    np.save(tmp_path / "m.npy", m)
    np.savez(tmp_path / "m.npz", mask=m, other=np.zeros(2))
    tifffile.imwrite(tmp_path / "m.tif", m)
    mi = nib.Nifti1Image(m.transpose(2, 1, 0), np.eye(4))
    nib.save(mi, tmp_path / "m.nii.gz")
    for name in ("m.npy", "m.npz", "m.tif", "m.nii.gz"):
        out = read_mask(tmp_path / name, SHAPE)
        assert out.dtype == np.uint8 and np.array_equal(out, (m > 0).astype(np.uint8)), name


# ---------------------------------------------------------------- errors name the file


def test_errors_name_the_file(tmp_path: Path):
    (tmp_path / "scan.mhd").write_text("ObjectType = Image")
    with pytest.raises(VolumeReadError, match=r"scan\.mhd: unknown volume format '\.mhd'"):
        read_volume(tmp_path / "scan.mhd")
    with pytest.raises(VolumeReadError, match=r"missing\.npy: no such volume file"):
        read_volume(tmp_path / "missing.npy")
    (tmp_path / "broken.vol").write_bytes(b"HSF-OCT-103\0" + bytes(40))
    with pytest.raises(VolumeReadError, match=r"broken\.vol: cannot read \.vol volume"):
        read_volume(tmp_path / "broken.vol")
    np.save(tmp_path / "four.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(VolumeReadError, match=r"four\.npy: expected a 3-D volume"):
        read_volume(tmp_path / "four.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros(SHAPE), b=np.zeros(SHAPE))
    with pytest.raises(VolumeReadError, match=r"two\.npz: no array named 'volume'"):
        read_volume(tmp_path / "two.npz")
    np.save(tmp_path / "m.npy", np.zeros((3, 16, 21), np.uint8))
    with pytest.raises(VolumeReadError, match=r"m\.npy: mask shape \(3, 16, 21\) does not match"):
        read_mask(tmp_path / "m.npy", SHAPE)
    with pytest.raises(VolumeReadError, match=r"x\.vol: unknown mask format"):
        read_mask(tmp_path / "x.vol", SHAPE)
    np.save(tmp_path / "plain.npy", _volume())
    with pytest.raises(VolumeReadError, match=r"plain\.npy: the file carries no voxel spacing"):
        resolve_spacing_x(read_volume(tmp_path / "plain.npy"), None)


def test_suffix_and_stem():
    assert suffix("a/b.NII.GZ") == ".nii.gz" and stem("a/b.NII.GZ") == "b"
    assert suffix("x/scan.E2E") == ".e2e" and stem("x/scan.E2E") == "scan"
