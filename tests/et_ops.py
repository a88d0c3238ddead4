"""One-linear ExecuTorch programs: a quantized linear as the bundle's adapter library runs it inside ExecuTorch,
compared bit for bit with the PyTorch operator (both call the native kernels)."""

import copy

import torch


class OneLinear(torch.nn.Module):
    """A program holding nothing but one quantized linear: no float op upstream of our operator."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def assert_linear_bit_exact(layer, tmp_path, gen: torch.Generator, what: str = "") -> None:
    """int8 and float activations, at decode (1 row) and prefill (5 rows) batch; the adapter must be loaded."""
    from vqmobile.export.et_runtime import portable_lib
    from vqmobile.export.executorch_export import lower_to_executorch

    for act_int8 in (True, False):
        mod = OneLinear(copy.copy(layer))
        mod.layer.act_int8 = act_int8
        for rows in (1, 5):
            x = torch.randn(rows, layer.in_features, generator=gen) * 2
            with torch.no_grad():
                want = mod(x)
                ep = torch.export.export(mod, (x,), strict=False)
            pte = tmp_path / f"one-{rows}.pte"
            pte.write_bytes(lower_to_executorch(ep).buffer)
            got = portable_lib()._load_for_executorch(str(pte)).forward((x,))[0]
            assert got.shape == want.shape and torch.equal(got, want), (what, act_int8, rows,
                                                                        (got - want).abs().max())
