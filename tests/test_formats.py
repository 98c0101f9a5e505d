"""Slide formats: every test writes a small file of its format, following the vendor layout OpenSlide's format
backend reads (src/openslide-vendor-*.c of OpenSlide 4.0.1) or the published spec (DICOM PS3.3 VL Whole Slide
Microscopy Image IOD, OME-TIFF), then ingests it, reads it through ``open_slide`` and checks its pixels and scale
against what was written. Refused formats, DICOM series folders and the cohort-wide ``default_mpp`` are here too.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from histcode.ingest.run import ingest_sources
from histcode.ingest.sources import sources_from_paths
from histcode.store.catalog import Catalog
from histcode.wsi.dispatch import open_slide
from histcode.wsi.reader import OpenSlideReader
from tests.helpers import slide_with_rect

pydicom = pytest.importorskip("pydicom")

MPP = 0.5


def image(h: int = 700, w: int = 900, seed: int = 0) -> np.ndarray:
    """Glass with textured tissue over most of it: enough tissue for tiling."""
    return slide_with_rect(np.random.default_rng(seed), (h, w), (40, 30, w - 40, h - 30))


def box(pixels: np.ndarray, f: int) -> np.ndarray:
    """Reference 4x-style box reduction, written from its definition: the rounded mean of each f x f block."""
    h, w = pixels.shape[0] // f, pixels.shape[1] // f
    total = np.zeros((h, w, 3), np.float64)
    for dy in range(f):  # the block's pixels, one offset at a time
        for dx in range(f):
            total += pixels[dy:h * f:f, dx:w * f:f]
    return np.floor(total / (f * f) + 0.5).astype(np.uint8)


def ingest(paths, workspace, config, cfg=None, mpp=None):
    catalog = Catalog(workspace.catalog_path)
    cfg = cfg or config.ingest
    report = ingest_sources(sources_from_paths(list(paths), cfg.extensions, mpp), catalog, cfg, progress=False)
    return report, catalog


# --- DICOM WSI (PS3.3 A.32.8: one instance per level, TILED_FULL frames, PixelSpacing in mm) -------------------

WSI_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def write_dicom_level(path, pixels, tile, mpp, study, series, sop_class=WSI_CLASS, flavor="VOLUME"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    h, w = pixels.shape[:2]
    frames = []
    for ty in range(-(-h // tile)):  # TILED_FULL: row-major frames, the last ones padded
        for tx in range(-(-w // tile)):
            frame = np.zeros((tile, tile, 3), np.uint8)
            part = pixels[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]
            frame[:part.shape[0], :part.shape[1]] = part
            frames.append(frame.tobytes())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "SM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", flavor, "NONE"]
    ds.Rows = ds.Columns = tile
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames, ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = len(frames), w, h
    ds.TotalPixelMatrixFocalPlanes, ds.DimensionOrganizationType = 1, "TILED_FULL"
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [mpp / 1000, mpp / 1000], 0.004  # mm
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    optical = Dataset()
    optical.OpticalPathIdentifier, optical.ObjectiveLensPower = "1", 20
    ds.OpticalPathSequence, ds.NumberOfOpticalPaths = Sequence([optical]), 1
    ds.PixelData = b"".join(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_dicom_slide(folder, pixels, mpp=MPP, names=("level0.dcm", "level1")):
    """A series of two levels (full and 4x), one file with a .dcm extension and one without, as PACS exports do."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    write_dicom_level(folder / names[0], pixels, 256, mpp, study, series)
    write_dicom_level(folder / names[1], box(pixels, 4), 128, mpp * 4, study, series)
    return series


def test_dicom_series_folder_is_one_slide(workspace, config, tmp_path) -> None:
    pixels = image()
    root = tmp_path / "cases"
    write_dicom_slide(root / "case-7", pixels)
    (root / "case-7" / "notes.txt").write_text("scanned on a Tuesday")
    sources = sources_from_paths([root], config.ingest.extensions)
    assert [(s.slide_id, s.path.name) for s in sources] == [("case-7", "case-7")]  # one slide, not two files
    report, catalog = ingest([root], workspace, config)
    assert report.outcomes[0].status == "ok", report.outcomes[0].reason
    row = catalog.get_slide("case-7")
    assert row["vendor"] == "dicom" and row["level_dimensions"] == [[900, 700], [225, 175]]
    assert row["mpp_x"] == pytest.approx(MPP) and row["mpp_source"] == "slide" and row["objective"] == 20
    with open_slide(root / "case-7") as reader:
        assert isinstance(reader, OpenSlideReader)
        np.testing.assert_array_equal(reader.read_region((130, 70), 0, (300, 200)), pixels[70:270, 130:430])
    assert ingest([root], workspace, config)[0].outcomes[0].action == "unchanged"  # the folder's signature holds


def test_dicom_series_folder_tiles(workspace, config, tmp_path) -> None:
    from histcode.tiling.run import tile_slides

    write_dicom_slide(tmp_path / "d1", image())
    _, catalog = ingest([tmp_path / "d1"], workspace, config)
    tile_slides(catalog, config.tiling, workspace.outputs_dir / "qc", progress=False)
    (ledger,) = catalog.tilings()
    assert ledger["status"] == "ok" and catalog.tiles(slide_id="d1").num_rows == ledger["n_tiles"] > 0


def test_dicom_folders_that_are_not_one_slide_are_refused(workspace, config, tmp_path) -> None:
    from pydicom.uid import generate_uid

    two = tmp_path / "two"
    write_dicom_slide(two, image(), names=("a0.dcm", "a1.dcm"))
    write_dicom_slide(two, image(seed=1), names=("b0.dcm", "b1.dcm"))
    ct = tmp_path / "ct"
    write_dicom_level(ct / "slice.dcm", image(200, 200), 64, MPP, generate_uid(), generate_uid(),
                      sop_class="1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    report, _ = ingest([two, ct], workspace, config)
    reasons = {o.slide_id: o.reason for o in report.outcomes}
    assert "holds 2 DICOM WSI series" in reasons["two"] and "a folder of its own" in reasons["two"]
    assert "no VL Whole Slide Microscopy instance" in reasons["ct"] and "1.2.840.10008.5.1.4.1.1.2" in reasons["ct"]


# --- OME-TIFF (pyramid in SubIFDs, scale in the OME-XML) ------------------------------------------------------

def write_ome_tiff(path, pixels, mpp_nm: float, levels=2, magnification=None):
    """A tiled pyramidal OME-TIFF as bioformats2raw + raw2ometiff write it: level 0 in the main IFD, the reduced
    levels in its SubIFDs, PhysicalSizeX/Y in nanometres (any unit is allowed)."""
    meta = {"axes": "YXS", "PhysicalSizeX": mpp_nm, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": mpp_nm,
            "PhysicalSizeYUnit": "nm"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(pixels, tile=(128, 128), subifds=levels - 1, photometric="rgb", compression="zlib", metadata=meta)
        for k in range(1, levels):
            tw.write(box(pixels, 4 ** k), tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1)
    if magnification is not None:  # an Instrument with its Objective, referenced by the Image
        xml = tifffile.tiffcomment(path)
        instrument = (f'<Instrument ID="Instrument:0"><Objective ID="Objective:0" '
                      f'NominalMagnification="{magnification}"/></Instrument>')
        xml = xml.replace("<Image ", instrument + "<Image ", 1)
        xml = xml.replace('Name="Image0">', 'Name="Image0"><ObjectiveSettings ID="Objective:0"/>', 1)
        tifffile.tiffcomment(path, xml.encode())
    return path


def test_ome_tiff_pyramid_and_physical_size(workspace, config, tmp_path) -> None:
    pixels = image(1100, 1300)
    path = write_ome_tiff(tmp_path / "s1.ome.tif", pixels, mpp_nm=250.0, magnification=40)
    report, catalog = ingest([path], workspace, config)
    assert report.outcomes[0].status == "ok", report.outcomes[0].reason
    row = catalog.get_slide("s1")  # the .ome of the name is not part of the id
    assert row["vendor"] == "ome-tiff" and row["mpp_x"] == pytest.approx(0.25) and row["objective"] == 40
    assert row["level_dimensions"][:2] == [[1300, 1100], [325, 275]]
    with open_slide(path) as reader:
        np.testing.assert_array_equal(reader.read_region((200, 300), 0, (400, 256)), pixels[300:556, 200:600])
        # level 1 is the stored SubIFD, read in its own pixels from level-0 coordinates
        np.testing.assert_array_equal(reader.read_region((400, 200), 1, (100, 60)), box(pixels, 4)[50:110, 100:200])


def test_ome_tiff_stored_channel_by_channel(tmp_path) -> None:
    pixels = image(300, 400)
    path = tmp_path / "planes.ome.tif"
    tifffile.imwrite(path, np.moveaxis(pixels, -1, 0), ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with open_slide(path) as reader:
        assert reader.properties["openslide.vendor"] == "ome-tiff"
        np.testing.assert_array_equal(reader.read_region((0, 0), 0, (400, 300)), pixels)


# --- images without a pyramid: stripped TIFF, SVS without tiles, JPEG, PNG ---------------------------------------

def test_stripped_tiff_reads_and_emulates_its_pyramid(tmp_path) -> None:
    pixels = image(2200, 2100)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=16, compression="zlib")
    with open_slide(path) as reader:
        assert reader.properties["openslide.vendor"] == "image (no pyramid)"
        assert reader.level_dimensions == ((2100, 2200), (525, 550)) and reader.level_downsamples == (1.0, 4.0)
        rng = np.random.default_rng(1)
        for _ in range(5):  # regions anywhere, across strip borders and past the edges (white)
            x, y = (int(v) for v in rng.integers(-50, 2000, 2))
            got = reader.read_region((x, y), 0, (150, 90))
            want = np.full((90, 150, 3), 255, np.uint8)
            sx, sy = max(x, 0), max(y, 0)
            part = pixels[sy:y + 90, sx:x + 150]
            want[sy - y:sy - y + part.shape[0], sx - x:sx - x + part.shape[1]] = part
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(reader.read_region((0, 0), 1, (525, 550)), box(pixels, 4))
        np.testing.assert_array_equal(reader.read_region((400, 800), 1, (50, 40)), box(pixels, 4)[200:240, 100:150])


def test_stripped_tiff_with_a_stored_pyramid_uses_it(tmp_path) -> None:
    pixels = image(1100, 1300)
    path = tmp_path / "sub.tif"
    with tifffile.TiffWriter(path) as tw:  # reduced level in a SubIFD, every level in strips
        tw.write(pixels, subifds=1, photometric="rgb", rowsperstrip=32, metadata=None, resolution=(2e4, 2e4),
                 resolutionunit="CENTIMETER")
        tw.write(box(pixels, 4), photometric="rgb", subfiletype=1, rowsperstrip=32, metadata=None)
    with open_slide(path) as reader:
        assert (reader.properties["openslide.vendor"], reader.properties["openslide.mpp-x"]) == ("tiff (tifffile)", "0.5")
        assert reader.level_dimensions == ((1300, 1100), (325, 275))
        np.testing.assert_array_equal(reader.read_region((400, 200), 1, (100, 60)), box(pixels, 4)[50:110, 100:200])


def test_emulated_levels_read_in_bands_match_the_whole(tmp_path, monkeypatch) -> None:
    """A level too large to keep is reduced band by band at each read: the bands must join seamlessly."""
    import histcode.wsi.pyramid as pyramid

    pixels = image(2200, 2100)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=7)
    monkeypatch.setattr(pyramid, "BAND_PIXELS", 4096)  # a few output rows per band
    with open_slide(path) as reader:
        reader._cache_bytes = 0  # nothing kept: every read reduces its own source region
        np.testing.assert_array_equal(reader.read_region((80, 120), 1, (300, 200)), box(pixels, 4)[30:230, 20:320])


def test_a_region_decodes_only_the_strips_under_it(tmp_path) -> None:
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image(2000, 1000), photometric="rgb", rowsperstrip=16, compression="zlib")
    with open_slide(path) as reader:
        reader.read_region((300, 500), 0, (64, 40))  # rows 500-539: strips 31-33 of 125
        assert sorted(index for _, index in reader._stored[0]._cache._items) == [31, 32, 33]


def test_a_strip_too_large_to_read_in_parts_is_refused(workspace, config, tmp_path, monkeypatch) -> None:
    import histcode.wsi.tiff_pages as pages

    path = tmp_path / "onestrip.tif"
    tifffile.imwrite(path, image(400, 500), photometric="rgb", rowsperstrip=400, compression="zlib")
    monkeypatch.setattr(pages, "MAX_SEGMENT_BYTES", 100_000)  # 500 x 400 x 3 = 600,000 bytes in one strip
    report, _ = ingest([path], workspace, config)
    assert "one strip holds 500x400 pixels" in report.outcomes[0].reason
    assert "vips tiffsave" in report.outcomes[0].reason


def test_svs_without_tiles_keeps_its_aperio_scale(workspace, config, tmp_path) -> None:
    path = tmp_path / "flat.svs"
    tifffile.imwrite(path, image(600, 800), photometric="rgb", metadata=None,
                     description="Aperio Image Library v11.2.1\r\n800x600 -> 800x600 - |AppMag = 40|MPP = 0.2520")
    report, catalog = ingest([path], workspace, config)
    row = catalog.get_slide("flat")
    assert (row["status"], row["vendor"], row["mpp_x"], row["objective"]) == ("ok", "image (no pyramid)",
                                                                               pytest.approx(0.252), 40)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_jpeg_and_png_with_their_dpi(workspace, config, tmp_path, fmt) -> None:
    pixels = image(500, 600)
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(pixels).save(path, fmt, dpi=(50800, 50800), **({"quality": 95} if fmt == "JPEG" else {}))
    report, catalog = ingest([path], workspace, config)
    row = catalog.get_slide("photo")
    assert (row["status"], row["vendor"], row["mpp_x"]) == ("ok", "image (no pyramid)", pytest.approx(0.5))
    with Image.open(path) as im:
        decoded = np.asarray(im.convert("RGB"))
    if fmt == "PNG":
        np.testing.assert_array_equal(decoded, pixels)  # lossless
    with open_slide(path) as reader:
        np.testing.assert_array_equal(reader.read_region((100, 100), 0, (200, 150)), decoded[100:250, 100:300])


def test_an_image_too_large_to_decode_whole_is_refused(workspace, config, tmp_path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:  # PNG chunk: length, type, data, CRC-32 of type + data
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "huge.png"  # a 20000 x 20000 header (400 Mpx); Pillow refuses before decoding anything
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    report, _ = ingest([path], workspace, config)
    reason = report.outcomes[0].reason
    assert "400000000 pixels" in reason and "too large to decode whole" in reason and "vips tiffsave" in reason


def test_png_alpha_is_composited_over_white(tmp_path) -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255  # left half transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with open_slide(path) as reader:
        got = reader.read_region((0, 0), 0, (64, 64))
    assert (got[:, :32] == 255).all() and (got[:, 32:] == (200, 0, 0)).all()


def test_stripped_tiff_tiles_through_the_catalog_vendor(workspace, config, tmp_path) -> None:
    from histcode.tiling.run import tile_slides
    from histcode.wsi.tile_reader import TileReader

    pixels = image(1400, 1500)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=32, resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    _, catalog = ingest([path], workspace, config)
    tile_slides(catalog, config.tiling, workspace.outputs_dir / "qc", progress=False)
    tiles = catalog.tiles(slide_id="plain").to_pylist()
    assert tiles and all(t["size"] == 256 for t in tiles)  # 0.5 um/px slide, 0.5 um/px target
    with TileReader.for_slide(catalog.get_slide("plain"), 256, 256) as reader:
        t = tiles[len(tiles) // 2]
        np.testing.assert_array_equal(reader.read(t["x"], t["y"]), pixels[t["y"]:t["y"] + 256, t["x"]:t["x"] + 256])


def test_the_viewer_serves_a_format_openslide_does_not_read(tmp_path) -> None:
    from histcode.viewer.deepzoom import DeepZoomTiles

    path = write_ome_tiff(tmp_path / "v.ome.tif", image(900, 1000), mpp_nm=500.0)
    tiles = DeepZoomTiles()
    pyramid = tiles.pyramid(str(path))
    assert (pyramid.width, pyramid.height) == (1000, 900)
    jpeg = tiles.tile(str(path), pyramid.levels - 1, 0, 0)
    with Image.open(__import__("io").BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and im.size == (255, 255)  # 254 + the overlap on the right and bottom only
    tiles.close()


# --- TIFF-based vendor formats OpenSlide reads ---------------------------------------------------------------

def _jpeg():
    return {"compression": "jpeg", "compressionargs": {"level": 95}, "photometric": "rgb"}


def write_philips(path, pixels, mpp=0.25):
    """Philips TIFF (openslide-vendor-philips-tiff.c): Software 'Philips...', a DPUfsImport XML in the first
    ImageDescription with one WSI scanned image whose pixel data representations give each level's spacing (mm,
    row then column); tiled levels, the reduced ones marked reduced-resolution."""
    levels = [pixels, box(pixels, 4)]
    reps = "".join(
        f'<DataObject ObjectType="PixelDataRepresentation"><Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_NUMBER" '
        f'Group="0x1001" Element="0x8b" PMSVR="IUInt16">{i}</Attribute><Attribute Name="DICOM_PIXEL_SPACING" '
        f'Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">"{mpp * 4 ** i / 1000:.8f}" "{mpp * 4 ** i / 1000:.8f}"'
        f'</Attribute></DataObject>' for i in range(len(levels)))
    xml = ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
           '<Attribute Name="PIM_DP_UFS_BARCODE" Group="0x301D" Element="0x1002" PMSVR="IString">SElTVE9DT0RF</Attribute>'
           '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray"><Array>'
           '<DataObject ObjectType="DPScannedImage">'
           f'<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">'
           f'"{mpp / 1000:.8f}" "{mpp / 1000:.8f}"</Attribute>'
           '<Attribute Name="PIM_DP_IMAGE_TYPE" Group="0x301D" Element="0x1004" PMSVR="IString">WSI</Attribute>'
           '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8003" '
           f'PMSVR="IDataObjectArray"><Array>{reps}</Array></Attribute>'
           '</DataObject></Array></Attribute></DataObject>')
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], tile=(256, 256), description=xml, software="Philips DP v1.0", metadata=None, **_jpeg())
        tw.write(levels[1], tile=(256, 256), subfiletype=1, software="Philips DP v1.0", metadata=None, **_jpeg())
    return path


def write_ventana(path, pixels, mpp=0.25):
    """Ventana TIFF (openslide-vendor-ventana.c): an XMP packet with an iScan element (Magnification, ScanRes) in
    the first directory; levels marked 'level=N mag=M' in their ImageDescription, magnification falling."""
    xmp = (f'<?xml version="1.0" encoding="utf-8"?><Metadata><iScan Magnification="40" ScanRes="{mpp}" '
           'UnitNumber="HISTCODE" /></Metadata>').encode()
    with tifffile.TiffWriter(path) as tw:
        tw.write(pixels[:64, :64], description="Label Image", extratags=[(700, 1, len(xmp), xmp, True)],
                 metadata=None, photometric="rgb")
        tw.write(pixels, tile=(256, 256), description="level=0 mag=40 quality=95", metadata=None, **_jpeg())
        tw.write(box(pixels, 4), tile=(256, 256), description="level=1 mag=10 quality=95", metadata=None, **_jpeg())
    return path


def write_leica(path, pixels, mpp=0.5):
    """Leica SCN (openslide-vendor-leica.c): the scn XML (2010/10/01 namespace) in the first, tiled directory; a
    collection in nm with one brightfield image whose view lies inside it (a view filling the collection would
    be the macro image), its pixel dimensions naming their IFDs; the scale in the resolution tags."""
    h, w = pixels.shape[:2]
    nm = mpp * 1000
    cw, ch, ox, oy = int((w + 40) * nm), int((h + 40) * nm), int(20 * nm), int(20 * nm)
    xml = ('<?xml version="1.0" encoding="utf-8"?><scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
           f'<collection name="s" uuid="1" sizeX="{cw}" sizeY="{ch}"><image name="main" uuid="2">'
           '<creationDate>2026-01-01T00:00:00.00Z</creationDate><device model="Leica SCN400;Leica SCN" version="1.5"/>'
           f'<pixels sizeX="{w}" sizeY="{h}"><dimension sizeX="{w}" sizeY="{h}" r="0" ifd="0"/>'
           f'<dimension sizeX="{w // 4}" sizeY="{h // 4}" r="1" ifd="1"/></pixels>'
           f'<view sizeX="{int(w * nm)}" sizeY="{int(h * nm)}" offsetX="{ox}" offsetY="{oy}" spacingZ="0"/>'
           '<scanSettings><objectiveSettings><objective>20</objective></objectiveSettings><illuminationSettings>'
           '<numericalAperture>0.4</numericalAperture><illuminationSource>brightfield</illuminationSource>'
           '</illuminationSettings></scanSettings></image></collection></scn>')
    scale = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(pixels, tile=(256, 256), description=xml, metadata=None, **scale, **_jpeg())
        tw.write(box(pixels, 4), tile=(256, 256), metadata=None, subfiletype=1, **_jpeg())
    return path


def write_trestle(path, pixels, mpp=0.5):
    """Trestle (openslide-vendor-trestle.c): Software 'MedScan', ImageDescription of 'key=value;' pairs (the
    objective power among them), every directory tiled; the mpp itself in XResolution/YResolution (OpenSlide
    copies them as they are)."""
    desc = "Background Color=F2F2F2;White Balance=C0C0C0;Objective Power=20;JPEG Quality=95"
    scale = {"resolution": (mpp, mpp), "resolutionunit": "NONE"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(pixels, tile=(256, 256), description=desc, software="MedScan", metadata=None, **scale, **_jpeg())
        tw.write(box(pixels, 4), tile=(256, 256), description=desc, software="MedScan", metadata=None, **_jpeg())
    return path


@pytest.mark.parametrize(("writer", "name", "vendor", "mpp", "source"), [
    (write_philips, "p.tiff", "philips", 0.25, "slide"),
    (write_ventana, "v.bif", "ventana", 0.25, "slide"),
    (write_leica, "l.scn", "leica", 0.5, "slide"),
    (write_trestle, "t.tif", "trestle", 0.5, "slide"),
])
def test_tiff_based_vendor_formats(workspace, config, tmp_path, writer, name, vendor, mpp, source) -> None:
    pixels = image(1100, 1200)
    path = writer(tmp_path / name, pixels)
    assert __import__("openslide").OpenSlide.detect_format(str(path)) == vendor
    report, catalog = ingest([tmp_path], workspace, config)  # found by the directory scan too
    assert report.outcomes[0].status == "ok", report.outcomes[0].reason
    row = catalog.get_slide(path.stem)
    assert (row["vendor"], row["mpp_x"], row["mpp_source"]) == (vendor, pytest.approx(mpp), source)
    assert row["level_count"] == 2
    with tifffile.TiffFile(path) as tif:  # the stored JPEG, decoded by tifffile: what OpenSlide must show
        stored = next(p for p in tif.pages if p.shape[:2] == pixels.shape[:2]).asarray()
    with open_slide(path) as reader:
        x, y = (20, 20) if vendor == "leica" else (0, 0)  # Leica: the image lies 20 px into its collection
        got = reader.read_region((x + 300, y + 200), 0, (256, 256)).astype(int)
        assert np.abs(got - stored[200:456, 300:556].astype(int)).max() <= 2  # libjpeg-turbo either way


def write_ndpi(path, pixels, mpp=0.5):
    """Hamamatsu NDPI (openslide-vendor-hamamatsu.c): a TIFF whose first directory carries the NDPI format flag
    (tag 65420); each level one JPEG strip with its SourceLens magnification (65421), X/Y offset (65422/3) and
    focal plane (65424, 0 = in focus); the scale in the resolution tags. Returns the decoded JPEG of level 0."""
    import io

    decoded = []
    with tifffile.TiffWriter(path) as tw:
        for factor, lens in ((1, 20.0), (4, 5.0)):
            level = pixels if factor == 1 else box(pixels, factor)
            buf = io.BytesIO()
            Image.fromarray(level).save(buf, "JPEG", quality=95)
            decoded.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
            px_per_cm = 1e4 / (mpp * factor)
            tw.write(iter([buf.getvalue()]), shape=level.shape, dtype=np.uint8, compression="jpeg", photometric="ycbcr",
                     subsampling=(2, 2), rowsperstrip=level.shape[0], metadata=None, resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER", extratags=[(65420, 4, 1, 1, True), (65421, 11, 1, lens, True),
                                                            (65422, 9, 1, 0, True), (65423, 9, 1, 0, True),
                                                            (65424, 9, 1, 0, True)])
    return decoded[0]


def test_hamamatsu_ndpi(workspace, config, tmp_path) -> None:
    pixels = image(1100, 1200)
    decoded = write_ndpi(tmp_path / "h.ndpi", pixels)
    report, catalog = ingest([tmp_path / "h.ndpi"], workspace, config)
    assert report.outcomes[0].status == "ok", report.outcomes[0].reason
    row = catalog.get_slide("h")
    assert (row["vendor"], row["mpp_x"], row["objective"]) == ("hamamatsu", pytest.approx(0.5), 20)
    assert row["level_dimensions"][0] == [1200, 1100] and [300, 275] in row["level_dimensions"]
    with open_slide(tmp_path / "h.ndpi") as reader:
        np.testing.assert_array_equal(reader.read_region((300, 200), 0, (256, 256)), decoded[200:456, 300:556])


def write_vms(folder, pixels, mpp=0.5):
    """Hamamatsu VMS (openslide-vendor-hamamatsu.c): a key file, group [Virtual Microscope Specimen], naming a grid
    of JPEG files (here one) and a map (overview) JPEG, every JPEG with restart markers (OpenSlide reads between
    them) and no more than one restart interval per MCU row; PhysicalWidth/Height in nm. Returns the decoded
    image JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = {"quality": 95, "subsampling": 0, "restart_marker_rows": 1}
    Image.fromarray(pixels).save(folder / "s.jpg", "JPEG", **jpeg)
    Image.fromarray(box(pixels, 8)).save(folder / "s_map.jpg", "JPEG", **jpeg)
    h, w = pixels.shape[:2]
    (folder / "s.vms").write_text("[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
                                  f"ImageFile=s.jpg\nMapFile=s_map.jpg\nSourceLens=20\nPhysicalWidth={int(w * mpp * 1000)}"
                                  f"\nPhysicalHeight={int(h * mpp * 1000)}\n")
    with Image.open(folder / "s.jpg") as im:
        return np.asarray(im.convert("RGB"))


def test_hamamatsu_vms(workspace, config, tmp_path) -> None:
    decoded = write_vms(tmp_path / "vms", image(1024, 1280))
    report, catalog = ingest([tmp_path / "vms"], workspace, config)
    assert [o.slide_id for o in report.outcomes] == ["s"]  # the key file; its JPEGs are no slides of their own
    assert report.outcomes[0].status == "ok", report.outcomes[0].reason
    row = catalog.get_slide("s")
    assert (row["vendor"], row["mpp_x"], row["objective"]) == ("hamamatsu", pytest.approx(0.5), 20)
    with open_slide(tmp_path / "vms" / "s.vms") as reader:
        np.testing.assert_array_equal(reader.read_region((300, 200), 0, (256, 256)), decoded[200:456, 300:556])


def write_svslide(path, pixels, mpp=0.5, tile=256):
    """Sakura SVSLIDE (openslide-vendor-sakura.c): an SQLite database whose DataManagerSQLiteConfigXPO names the
    table of blobs; in it '++MagicBytes' = 'SVGigaPixelImage', a 'Header' (little-endian uint32 tile size, width,
    height, then at byte 16 the focal plane count) and one grey JPEG per tile and colour channel under the id
    'T;x|y;downsample;channel;focal plane' (x, y in level-0 pixels); the scale in SVHRScanDataXPO (mm per pixel).
    Returns the decoded channels of level 0's tiles, by (column, row)."""
    import io
    import sqlite3
    import struct

    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE DataManagerSQLiteConfigXPO (OID INTEGER PRIMARY KEY, TableName TEXT);
        CREATE TABLE blobs (id TEXT PRIMARY KEY, data BLOB);
        CREATE TABLE SVSlideDataXPO (OID INTEGER PRIMARY KEY, SlideId TEXT, Date TEXT, Description TEXT,
            Creator TEXT, DiagnosisCode TEXT, Keywords TEXT, m_labelScan INTEGER, m_overviewScan INTEGER);
        CREATE TABLE SVHRScanDataXPO (OID INTEGER PRIMARY KEY, ParentSlide INTEGER, ScanId TEXT, Date TEXT,
            Name TEXT, Description TEXT, ResolutionMmPerPix REAL, NominalLensMagnification REAL,
            FocussingMethod TEXT, ThumbnailImage BLOB);
        INSERT INTO DataManagerSQLiteConfigXPO VALUES (1, 'blobs');
        INSERT INTO SVSlideDataXPO VALUES (1, 'S1', '2026-01-01', '', 'histcode', '', '', NULL, NULL);
        INSERT INTO blobs VALUES ('++MagicBytes', 'SVGigaPixelImage');
    """)
    db.execute("INSERT INTO SVHRScanDataXPO VALUES (1, 1, 'scan', '2026-01-01', 'scan', '', ?, 20, 'auto', NULL)",
               (mpp / 1000,))
    h, w = pixels.shape[:2]
    db.execute("INSERT INTO blobs VALUES ('Header', ?)", (struct.pack("<IIIII", tile, w, h, 0, 1),))
    decoded = {}
    for ds in (1, 4):
        level = pixels if ds == 1 else box(pixels, ds)
        for ty in range(-(-level.shape[0] // tile)):
            for tx in range(-(-level.shape[1] // tile)):
                t = np.full((tile, tile, 3), 255, np.uint8)
                part = level[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]
                t[:part.shape[0], :part.shape[1]] = part
                for c in range(3):
                    buf = io.BytesIO()
                    Image.fromarray(t[..., c]).save(buf, "JPEG", quality=95)
                    db.execute("INSERT INTO blobs VALUES (?, ?)", (f"T;{tx * tile * ds}|{ty * tile * ds};{ds};{c};0",
                                                                   buf.getvalue()))
                    if ds == 1:
                        decoded[(tx, ty, c)] = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    db.commit()
    db.close()
    return {k: np.stack([decoded[(*k, c)] for c in range(3)], axis=-1) for k in {key[:2] for key in decoded}}


def test_sakura_svslide(workspace, config, tmp_path) -> None:
    tiles = write_svslide(tmp_path / "k.svslide", image())
    report, catalog = ingest([tmp_path], workspace, config)
    assert report.outcomes[0].status == "ok", report.outcomes[0].reason
    row = catalog.get_slide("k")
    assert (row["vendor"], row["mpp_x"], row["objective"]) == ("sakura", pytest.approx(0.5), 20)
    assert row["level_dimensions"] == [[900, 700], [225, 175]]
    with open_slide(tmp_path / "k.svslide") as reader:
        np.testing.assert_array_equal(reader.read_region((256, 256), 0, (256, 256)), tiles[(1, 1)])


# --- formats refused by name ---------------------------------------------------------------------------------

def test_unsupported_formats_are_reported_by_name_not_skipped(workspace, config, tmp_path) -> None:
    root = tmp_path / "lab"
    (root / "_case1_" / "stack1").mkdir(parents=True)
    (root / "case1.vsi").write_bytes(b"II*\x00" + bytes(64))
    (root / "_case1_" / "stack1" / "frame_t.ets").write_bytes(b"SIS\x00" + bytes(64))
    (root / "orphan.ets").write_bytes(b"SIS\x00" + bytes(64))
    for name in ("confocal.lif", "k1.kfb", "p1.isyntax", "s1.sdpc"):
        (root / name).write_bytes(bytes(128))
    (root / "ngff.zarr").mkdir()
    (root / "ngff.zarr" / ".zattrs").write_text("{}")
    write_svs_like = tmp_path / "lab" / "ok.tif"
    tifffile.imwrite(write_svs_like, image(300, 300), tile=(128, 128), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    report, catalog = ingest([root], workspace, config)
    reasons = {o.slide_id: o.reason for o in report.outcomes}
    assert set(reasons) == {"case1", "orphan", "confocal", "k1", "p1", "s1", "ngff", "ok"}  # not frame_t: it is case1's
    assert reasons["ok"] is None
    assert reasons["case1"].startswith("Olympus/Evident VSI is not read by OpenSlide: convert it to OME-TIFF")
    assert "bioformats2raw + raw2ometiff" in reasons["case1"] and "QuPath" in reasons["case1"]
    assert reasons["orphan"].startswith("Olympus/Evident ETS")
    assert reasons["confocal"].startswith("Leica LIF is not read by OpenSlide")
    assert reasons["k1"].startswith("KFBio KFB") and "convert" in reasons["k1"]
    assert reasons["p1"].startswith("Philips iSyntax") and "isyntax2raw" in reasons["p1"]
    assert reasons["s1"].startswith("SQRay SDPC")
    assert reasons["ngff"].startswith("OME-Zarr") and "raw2ometiff" in reasons["ngff"]
    assert catalog.get_slide("case1")["status"] == "failed"


def test_a_directory_that_is_no_slide_is_named(workspace, config, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    from histcode.ingest.inspect import inspect_slide
    from histcode.ingest.sources import SlideSource

    record = inspect_slide(SlideSource(tmp_path / "empty", "empty", "empty"), config.ingest)
    assert record.reason == "is a directory, neither a slide file nor a DICOM series folder"


# --- the cohort's default scale ------------------------------------------------------------------------------

def test_default_mpp_scales_slides_without_one(workspace, config, tmp_path) -> None:
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, image(300, 300), photometric="rgb")  # no resolution unit: no scale
    scaled = tmp_path / "scaled.tif"
    tifffile.imwrite(scaled, image(300, 300), photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    report, _ = ingest([bare], workspace, config)
    assert "ingest.default_mpp" in report.outcomes[0].reason
    cfg = config.ingest.model_copy(update={"default_mpp": 0.5})
    report, catalog = ingest([bare, scaled], workspace, config, cfg)
    assert (catalog.get_slide("bare")["mpp_x"], catalog.get_slide("bare")["mpp_source"]) == (0.5, "params")
    assert catalog.get_slide("scaled")["mpp_x"] == pytest.approx(0.25)  # the file's own scale wins
    assert [o.action for o in ingest([bare, scaled], workspace, config, cfg)[0].outcomes] == ["unchanged"] * 2
    # a new default re-inspects the slides that took the old one; --mpp wins over the default
    cfg2 = config.ingest.model_copy(update={"default_mpp": 0.25})
    out = ingest([bare, scaled], workspace, config, cfg2)[0].outcomes
    assert [o.action for o in out] == ["changed", "unchanged"] and catalog.get_slide("bare")["mpp_x"] == 0.25
    ingest([bare], workspace, config, cfg2, mpp=1.0)
    assert (catalog.get_slide("bare")["mpp_x"], catalog.get_slide("bare")["mpp_source"]) == (1.0, "user")


def test_an_implausible_default_mpp_is_refused(workspace, config, tmp_path) -> None:
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, image(300, 300), photometric="rgb")
    cfg = config.ingest.model_copy(update={"default_mpp": 264.58})
    report, _ = ingest([bare], workspace, config, cfg)
    assert "ingest.default_mpp 264.58 um/px is outside the plausible range" in report.outcomes[0].reason


def test_openslide_slides_open_with_openslide(cmu_slide) -> None:
    from histcode.wsi.openslide_view import as_openslide

    with open_slide(cmu_slide) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert as_openslide(reader) is reader.slide  # the viewer gets OpenSlide's own handle, unwrapped
    with open_slide(cmu_slide, "aperio") as reader:  # the catalog's vendor: no detection
        assert isinstance(reader, OpenSlideReader)
