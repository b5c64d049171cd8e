"""A small PNG reader (and writer) in zlib + numpy, for SYNTHIA's 16-bit label images.

SYNTHIA-RAND-CITYSCAPES stores labels as 16-bit-per-channel RGB PNGs: channel 0 holds the class id,
channel 1 the instance id. Pillow opens such files as 8-bit data (every class id comes back 0), and the
project has no OpenCV / imageio, so we decode them ourselves:

    signature | IHDR (width, height, bit depth, colour type, interlace) | IDAT... | IEND
    raw = zlib.decompress(concatenated IDAT data): per row one filter-type byte + the filtered bytes.

Reconstruction (PNG spec, section 9), with a = the byte `bpp` bytes to the left (previous pixel),
b = the byte above, c = the byte above-left, all 0 outside the image, arithmetic modulo 256:
    0 None:    x
    1 Sub:     x + a
    2 Up:      x + b
    3 Average: x + floor((a + b) / 2)
    4 Paeth:   x + paeth(a, b, c), the one of a, b, c closest to p = a + b - c (ties: a, then b)

Sub, Average and Paeth depend on the reconstructed pixel to the left, so a row cannot be decoded in
one vectorised step. Rows made only of None/Sub/Up are decoded row by row (Sub is a cumulative sum
modulo 256). As soon as Average or Paeth occur, the whole image is decoded along anti-diagonals
(x + y = d): every pixel of one anti-diagonal depends only on the two previous anti-diagonals, so each
of the H + W - 1 steps is one vectorised numpy operation over up to min(H, W) pixels. The image is
stored skewed (row d of the work array = anti-diagonal d) so that every step reads contiguous slices.

Supported: bit depth 8 and 16, colour types 0 (grey), 2 (RGB), 3 (palette: indices returned),
4 (grey + alpha), 6 (RGBA); no interlace (Adam7 is refused with a clear message).
"""
import struct
import zlib

import numpy as np

from uda.common import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def read_png(path):
    """Decode a PNG file into a numpy array (H, W, channels), uint8 or uint16 (native byte order)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    return decode_png(data, name=path)


def _chunks(data, name):
    """Yield (type, payload) of every chunk, checking lengths and CRCs."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(payload) != length or len(crc) != 4:
            raise UserError(f"{name}: truncated PNG (chunk {kind!r} is cut off)")
        if zlib.crc32(kind + payload) != struct.unpack(">I", crc)[0]:
            raise UserError(f"{name}: corrupt PNG (CRC mismatch in chunk {kind!r})")
        yield kind, payload
        if kind == b"IEND":
            return
        pos += 12 + length
    raise UserError(f"{name}: truncated PNG (no IEND chunk)")


def decode_png(data, name="<bytes>"):
    """Decode PNG bytes; see read_png."""
    if not data:
        raise UserError(f"{name}: empty file (0 bytes)")
    if data[:8] != PNG_SIGNATURE:
        raise UserError(f"{name}: not a PNG file (bad signature)")
    header, idat = None, []
    for kind, payload in _chunks(data, name):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
    if header is None or not idat:
        raise UserError(f"{name}: PNG without IHDR or IDAT chunk")
    width, height, depth, color_type, _, _, interlace = header
    if interlace != 0:
        raise UserError(f"{name}: interlaced (Adam7) PNG is not supported; re-save it without interlacing "
                        f"(e.g. with any image tool) or convert the labels once")
    if color_type not in CHANNELS or depth not in (8, 16) or (color_type == 3 and depth != 8):
        raise UserError(f"{name}: PNG colour type {color_type} with bit depth {depth} is not supported "
                        f"(expected 8 or 16 bits per sample)")
    channels = CHANNELS[color_type]
    bpp = channels * depth // 8  # bytes per pixel: the filters' "left" distance
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error:
        raise UserError(f"{name}: corrupt PNG (the image data does not decompress)") from None
    stride = width * bpp
    if len(raw) < height * (stride + 1):
        raise UserError(f"{name}: truncated PNG (image data holds {len(raw)} bytes, expected "
                        f"{height * (stride + 1)})")
    rows = np.frombuffer(raw, dtype=np.uint8, count=height * (stride + 1)).reshape(height, stride + 1)
    filters = rows[:, 0]  # (H,)
    if filters.max(initial=0) > 4:
        raise UserError(f"{name}: corrupt PNG (unknown row filter type {int(filters.max())})")
    pixels = rows[:, 1:].reshape(height, width, bpp)  # (H, W, bpp) filtered bytes
    if np.isin(filters, (3, 4)).any():
        recon = _unfilter_diagonal(pixels, filters)
    else:
        recon = _unfilter_rows(pixels, filters)
    if depth == 16:
        out = recon.reshape(height, width * bpp).view(">u2").astype(np.uint16)  # big-endian samples
        return out.reshape(height, width, channels)
    return recon.reshape(height, width, channels)


def _unfilter_rows(pixels, filters):
    """Images whose rows use only None (0), Sub (1) and Up (2): one vectorised step per row."""
    height = pixels.shape[0]
    out = np.empty_like(pixels)  # (H, W, bpp) uint8
    previous = np.zeros_like(pixels[0])  # the row above the image is zero
    for y in range(height):
        row = pixels[y]
        kind = filters[y]
        if kind == 1:
            row = np.cumsum(row, axis=0, dtype=np.uint8)  # x + a, chained along the row, modulo 256
        elif kind == 2:
            row = row + previous  # uint8 addition wraps modulo 256
        out[y] = row
        previous = out[y]
    return out


def _unfilter_diagonal(pixels, filters):
    """Any mix of the five filters, decoded one anti-diagonal (x + y = d) at a time.

    The work array S (H + W + 1, H + 1, bpp), int16, holds pixel (y, x) at S[x + y + 2, y + 1]: each
    anti-diagonal is one contiguous block, and row 0 of the second axis (y = -1) plus the first two
    diagonals stay 0, so neighbours outside the image read as 0: left (y, x-1) = S[d + 1, y + 1],
    above (y-1, x) = S[d + 1, y], above-left (y-1, x-1) = S[d, y]. Only cells inside the image are
    written. Skewing the input and un-skewing the result are strided views copied once (no gather).
    """
    height, width, bpp = pixels.shape
    strided = np.lib.stride_tricks.as_strided
    pixels = np.ascontiguousarray(pixels)  # (H, W, bpp) uint8
    px = pixels.strides[1]
    # F[d, y] = pixel (y, d - y): flat pixel offset y * W + d - y; cells outside the image are junk, never used
    filtered = np.ascontiguousarray(strided(pixels, shape=(height + width - 1, height, bpp),
                                            strides=(px, (width - 1) * px, 1), writeable=False))
    work = np.zeros((height + width + 1, height + 1, bpp), dtype=np.int16)
    kinds = filters[:, None]  # (H, 1): broadcast over a pixel's bytes
    masks = {k: kinds == k for k in (1, 2, 3, 4) if (filters == k).any()}
    for d in range(height + width - 1):
        lo, hi = max(0, d - width + 1), min(d, height - 1) + 1  # rows of this diagonal inside the image
        a = work[d + 1, lo + 1:hi + 1]  # left         (n, bpp)
        b = work[d + 1, lo:hi]  # above
        c = work[d, lo:hi]  # above-left
        pred = 0
        if 1 in masks:
            pred = np.where(masks[1][lo:hi], a, pred)
        if 2 in masks:
            pred = np.where(masks[2][lo:hi], b, pred)
        if 3 in masks:
            pred = np.where(masks[3][lo:hi], (a + b) >> 1, pred)
        if 4 in masks:
            da, db = a - c, b - c  # p - b and p - a, for p = a + b - c
            p_a, p_b, p_c = np.abs(db), np.abs(da), np.abs(da + db)
            paeth = np.where((p_a <= p_b) & (p_a <= p_c), a, np.where(p_b <= p_c, b, c))
            pred = paeth if len(masks) == 1 else np.where(masks[4][lo:hi], paeth, pred)
        work[d + 2, lo + 1:hi + 1] = (filtered[d, lo:hi] + pred) & 0xFF
    # un-skew: pixel (y, x) sits at flat pixel offset (x + y + 2) * (H + 1) + y + 1
    ws = work.strides[1]
    out = strided(work[2:, 1:], shape=(height, width, bpp), strides=((height + 2) * ws, (height + 1) * ws,
                                                                      work.strides[2]), writeable=False)
    return out.astype(np.uint8)  # (H, W, bpp)


# --------------------------------------------------------------------------------------------------
# Writing (tests and the benchmark build SYNTHIA-like files with it; every filter type can be forced)
# --------------------------------------------------------------------------------------------------
def _paeth_predictor(a, b, c):
    p_a, p_b, p_c = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    return np.where((p_a <= p_b) & (p_a <= p_c), a, np.where(p_b <= p_c, b, c))


def filter_rows(array, filters=0):
    """The PNG image data before compression: (H, 1 + W * bpp) uint8, each row's filter type first.

    array: uint8 / uint16 (H, W, channels); filters: one type for every row, or one per row (0..4).
    Filtering is computed from the unfiltered bytes, so it is vectorised over the whole image.
    """
    height, width, channels = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    raw = array.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    bpp = channels * depth // 8
    x = raw.reshape(height, width, bpp).astype(np.int16)  # (H, W, bpp)
    a = np.zeros_like(x)
    a[:, 1:] = x[:, :-1]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, 1:] = x[:-1, :-1]
    predictors = [np.zeros_like(x), a, b, (a + b) >> 1, _paeth_predictor(a, b, c)]
    kinds = np.broadcast_to(np.asarray(filters, dtype=np.int64), (height,))
    predicted = np.stack(predictors)[kinds, np.arange(height)]  # (H, W, bpp): each row's predictor
    filtered = ((x - predicted) & 0xFF).astype(np.uint8).reshape(height, -1)
    return np.concatenate([kinds.astype(np.uint8)[:, None], filtered], axis=1)


def encode_png(array, filters=0, color_type=None):
    """PNG bytes of a uint8 / uint16 array (H, W) or (H, W, channels), no interlace (see filter_rows)."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png: expected uint8 or uint16, got {array.dtype}")
    height, width, channels = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    if color_type is None:
        color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    body = filter_rows(array, filters).tobytes()

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(body, 6)) + chunk(b"IEND", b"")


def write_png(path, array, filters=0):
    with open(path, "wb") as f:
        f.write(encode_png(array, filters))
