"""A pydicom 3 decoder plugin: 12-bit JPEG Extended (Process 4) through GDCM.

GDCM decodes 12-bit lossy JPEG (it carries libjpeg builds for 8, 12 and 16 bits), but pydicom's own
``gdcm`` plugin refuses every JPEG Extended frame with more than 8 bits, and Pillow cannot decode
them at all; the other decoder of that syntax, pylibjpeg-libjpeg, is GPL-3.0. This plugin hands the
frame to GDCM with the pixel format set to the stored depth (12 bits allocated: GDCM then starts
with its 12-bit decoder instead of failing on the 16-bit one first and saying so on stderr).

What GDCM writes on the process's stderr while it decodes (a damaged scan header, say) is caught
and re-issued as a warning, which :func:`bonexray.data.imageio.read_image` turns into one line
naming the file. :func:`register` adds the plugin once; pydicom tries it after its own plugins.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from contextlib import contextmanager

JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"
PLUGIN = "bonexray-gdcm-12bit"

_registered = False
_lock = threading.Lock()  # stderr is one file descriptor for the whole process: one capture at a time


def is_available(uid: str) -> bool:
    """pydicom's plugin protocol: True when GDCM is importable and ``uid`` is JPEG Extended."""
    if uid != JPEG_EXTENDED_12BIT:
        return False
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> bool:
    """Add the plugin to pydicom's JPEG Extended decoder (once); False when pydicom < 3 or GDCM is missing."""
    global _registered
    if _registered:
        return True
    try:
        from pydicom.pixels.decoders import JPEGExtended12BitDecoder
    except ImportError:  # pydicom 2.x: its GDCM handler decodes 12-bit JPEG itself
        return False
    if not is_available(JPEG_EXTENDED_12BIT):
        return False
    with _lock:
        if PLUGIN not in JPEGExtended12BitDecoder.available_plugins:
            JPEGExtended12BitDecoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
        _registered = True
    return True


def decode_frame(src: bytes, runner) -> bytes:
    """pydicom's plugin protocol: one encoded frame -> its decoded bytes (little endian, as allocated)."""
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())

    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    pi = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(JPEG_EXTENDED_12BIT)))
    bits = int(runner.bits_stored)
    # Allocated = stored: GDCM picks its libjpeg build from the allocated depth.
    image.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, bits, bits, bits - 1, runner.pixel_representation))
    with _stderr_as_warnings("GDCM"):
        buffer = image.GetBuffer()
    if not buffer:
        raise ValueError("GDCM could not decode the 12-bit JPEG frame")
    return buffer.encode("utf-8", "surrogateescape")  # GDCM hands back char* as str


@contextmanager
def _stderr_as_warnings(who: str):
    """Catch what native code writes on file descriptor 2 and re-issue each line as a UserWarning."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is None:  # not Linux: leave stderr alone
        yield
        return
    with _lock:
        sys.stderr.flush()
        capture = memfd("bonexray-stderr")
        saved = os.dup(2)
        os.dup2(capture, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.lseek(capture, 0, os.SEEK_SET)
            text = b""
            while chunk := os.read(capture, 1 << 16):
                text += chunk
            os.close(capture)
    for line in dict.fromkeys(text.decode("utf-8", "replace").splitlines()):
        if line.strip():
            warnings.warn(f"{who}: {line.strip()}", UserWarning, stacklevel=3)
