"""torch.compile(fullgraph=True) of a spectralized tiny timm ViT: no graph break, same numbers."""
import pytest
import torch
from helpers import tiny_vit


@pytest.mark.parametrize("train_s", [True, False])
def test_compile_fullgraph_matches_eager(train_s):
    torch._dynamo.reset()
    model = tiny_vit(depth=2, head_scale=None, spectral=True).eval()
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(train_s and name.endswith(".s"))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_c = compiled(x)
    y_e = model(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    if train_s:
        y_c.square().sum().backward()
        g_c = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        y_e.square().sum().backward()
        g_e = [p.grad for p in model.parameters() if p.requires_grad]
        assert len(g_c) == 8
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_inductor_forward():
    """The full inductor pipeline (C++ codegen on CPU) also traces the op without a graph break."""
    torch._dynamo.reset()
    model = tiny_vit(depth=2, head_scale=None, spectral=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-4)
