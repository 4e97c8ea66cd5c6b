import math

import pytest
import torch

from nanogpt.model import GPT, GPTConfig


def tiny_config(**kw) -> GPTConfig:
    return GPTConfig(**{"vocab_size": 65, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0, **kw})


def test_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 65, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 65) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)


def test_lecture_config_has_about_10_7M_parameters():
    model = GPT(GPTConfig())  # the defaults are the lecture's model
    assert model.num_params() == pytest.approx(10.7e6, rel=0.01)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_initial_loss_is_near_ln_vocab():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=65, n_layer=4))
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert loss.item() == pytest.approx(math.log(65), abs=0.1)


def test_causality_changing_token_t_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 65, (1, 16))
    t = 9
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % 65
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-4)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=6, n_embd=384, n_head=6)
    model = GPT(cfg)
    proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert proj == pytest.approx(0.02 / math.sqrt(2 * 6), rel=0.05)
    assert fc == pytest.approx(0.02, rel=0.05)


def test_relu_and_no_bias_options():
    model = GPT(tiny_config(activation="relu", bias=False))
    assert isinstance(model.transformer.h[0].mlp.act, torch.nn.ReLU)
    assert model.transformer.h[0].attn.c_attn.bias is None


@pytest.mark.parametrize(
    "kw, fragment",
    [({"n_embd": 30, "n_head": 4}, "divisible"), ({"activation": "tanh"}, "activation"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_config_is_rejected(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny_config(**kw)
