import pytest
import torch

from vqmobile.formats.pack import pack_rows, row_bytes, unpack_rows


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_every_width(bits):
    codes = torch.randint(0, 1 << bits, (5, 43), generator=torch.Generator().manual_seed(bits))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, row_bytes(43, bits))
    assert torch.equal(unpack_rows(packed, bits, 43), codes)


def test_layout_is_little_endian_bitstream():
    # 4-bit: low nibble first; 6-bit: codes 0..3 fill 3 bytes from bit 0 up.
    assert pack_rows(torch.tensor([[1, 2, 3, 15]]), 4).tolist() == [[0x21, 0xF3]]
    six = pack_rows(torch.tensor([[1, 2, 3, 63]]), 6)[0].tolist()
    value = six[0] | six[1] << 8 | six[2] << 16
    assert [(value >> (6 * i)) & 63 for i in range(4)] == [1, 2, 3, 63]


def test_code_too_wide_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows(torch.tensor([[16]]), 4)
