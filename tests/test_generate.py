"""Fast generation: the KV cache, sampling controls (top_p, stop, stream, seed) and their command line."""

import pytest
import torch

from nanogpt.errors import NanoGPTError
from nanogpt.generate import main, sample, stream
from nanogpt.io import load_checkpoint
from nanogpt.model import GPT, GPTConfig, sample_logits
from tests.conftest import assert_user_error, run_main


@pytest.fixture(autouse=True)
def _one_thread():
    """Decoding a tiny model is a stream of tiny ops: on a shared 2-core machine a second OpenMP thread only
    waits for its time slice (milliseconds per op), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=block_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return GPT(config).eval()


SETTINGS = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.9, top_k=10, top_p=0.9)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "sampled", "top_k_top_p"])
@pytest.mark.parametrize("new_tokens", [10, 70], ids=["within_block", "beyond_block"])
def test_cached_and_uncached_generation_give_identical_tokens(settings, new_tokens):
    model = tiny_model(block_size=16)
    idx = torch.randint(0, 65, (3, 5), generator=torch.Generator().manual_seed(2))
    cached = model.generate(idx, new_tokens, generator=torch.Generator().manual_seed(1), use_cache=True, **settings)
    uncached = model.generate(idx, new_tokens, generator=torch.Generator().manual_seed(1), use_cache=False,
                              **settings)
    assert cached.shape == (3, 5 + new_tokens)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], idx)
    if settings["temperature"] == 0:  # greedy: the most likely next token of a plain forward pass
        assert torch.equal(cached[:, 5], model(idx)[0][:, -1].argmax(-1))
    # the cache is scratch space: gone after generation, never in the state dict
    assert all(b.attn.kv_cache is None for b in model.transformer.h)
    assert not any("kv_cache" in k for k in model.state_dict())


def test_cached_logits_match_a_full_forward_pass():
    model = tiny_model()
    x = torch.randint(0, 65, (2, 12))
    model.setup_cache(2)
    prefill, _ = model(x[:, :7], input_pos=torch.arange(7))  # (2, 1, vocab)
    steps = [model(x[:, t : t + 1], input_pos=torch.tensor([t]))[0] for t in range(7, 12)]
    model.clear_cache()
    full, _ = model(x)  # (2, 12, vocab)
    assert prefill.shape == (2, 1, 65)
    torch.testing.assert_close(prefill[:, 0], full[:, 6], atol=1e-5, rtol=0)
    for t, logits in zip(range(7, 12), steps):
        torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=0)


def test_cache_computes_one_token_per_step_and_reprimes_beyond_block_size():
    model = tiny_model(block_size=16)
    seen = []  # how many tokens each forward pass embeds
    model.transformer.wte.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    model.generate(torch.zeros((1, 4), dtype=torch.long), 40, temperature=0, use_cache=True)
    # prefill of the 4-token prompt, then one token per step until the window of 16 is full; the 17th
    # token restarts the window from the last 8 tokens (one forward pass), then one token per step again
    assert seen[:13] == [4] + [1] * 12
    assert seen[13] == 8
    assert seen.count(8) == 3 and set(seen) == {4, 1, 8} and len(seen) == 40  # restarts at tokens 17, 26, 35
    seen.clear()
    model.generate(torch.zeros((1, 4), dtype=torch.long), 40, temperature=0, use_cache=False)
    assert max(seen) == 16 and sum(seen) > 3 * 40  # the whole window every step


def test_prompt_longer_than_block_size():
    model = tiny_model(block_size=16)
    idx = torch.randint(0, 65, (2, 40))
    a = model.generate(idx, 20, generator=torch.Generator().manual_seed(0), use_cache=True)
    b = model.generate(idx, 20, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert a.shape == (2, 60) and torch.equal(a, b)


def test_cached_generation_under_bf16_autocast():
    # as a sampling callback inside a bf16-mixed training loop calls it: the cache keeps the weights' float32,
    # autocast casts what the matmuls and SDPA get, and each cached step's logits are the full pass's
    model = tiny_model()
    x = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.setup_cache(2)
        assert {b.attn.kv_cache.k.dtype for b in model.transformer.h} == {torch.float32}
        prefill, _ = model(x[:, :7], input_pos=torch.arange(7))  # (2, 1, vocab)
        steps = [model(x[:, t : t + 1], input_pos=torch.tensor([t]))[0] for t in range(7, 12)]
        model.clear_cache()
        full, _ = model(x)  # (2, 12, vocab)
        out = model.generate(x[:, :3], 30, temperature=0, use_cache=True)
    assert full.dtype == torch.bfloat16  # autocast really ran the matmuls in bf16
    with torch.no_grad():
        exact, _ = model(x)  # float32
    # bf16 keeps 8 bits of mantissa: the logits agree to about 1e-2, cached or not
    torch.testing.assert_close(prefill[:, 0].float(), full[:, 6].float(), atol=3e-2, rtol=0)
    for t, logits in zip(range(7, 12), steps):
        torch.testing.assert_close(logits[:, 0].float(), full[:, t].float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(full.float(), exact, atol=5e-2, rtol=0)
    assert out.shape == (2, 33) and torch.equal(out[:, :3], x[:, :3])
    assert all(b.attn.kv_cache is None for b in model.transformer.h)  # freed after generation


def test_sample_logits_greedy_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_logits(logits, temperature=0).item() == 0
    g = torch.Generator().manual_seed(0)
    assert {sample_logits(logits, 1.0, top_k=1, generator=g).item() for _ in range(50)} == {0}
    # nucleus 0.75: tokens 0 (0.5) and 1 (0.3) are needed to reach it, token 2 and 3 never come
    drawn = {sample_logits(logits, 1.0, top_p=0.75, generator=g).item() for _ in range(300)}
    assert drawn == {0, 1}
    assert {sample_logits(logits, 1.0, top_p=0.01, generator=g).item() for _ in range(50)} == {0}
    # without limits every token turns up; top_p=1 and top_k >= vocab change nothing
    assert {sample_logits(logits, 1.0, top_k=10, top_p=1.0, generator=g).item() for _ in range(400)} == {0, 1, 2, 3}


def test_top_k_and_top_p_apply_per_row():
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]]))
    g = torch.Generator().manual_seed(0)
    rows = [sample_logits(logits, 1.0, top_p=0.5, generator=g)[:, 0].tolist() for _ in range(30)]
    assert all(r == [0, 2] for r in rows)


def test_same_seed_same_text_and_cache_makes_no_difference(random_checkpoint):
    model, tok = load_checkpoint(str(random_checkpoint))
    kw = dict(num_samples=2, max_new_tokens=80, temperature=0.9, top_k=30, top_p=0.95, seed=5)
    a = sample(model, tok, "ROMEO:", **kw)
    assert a == sample(model, tok, "ROMEO:", **kw, use_cache=False)
    assert a != sample(model, tok, "ROMEO:", **{**kw, "seed": 6})
    assert all(t.startswith("ROMEO:") and len(t) == 86 for t in a)
    assert a[0] != a[1]  # the batch's rows are sampled independently


def test_stop_string_ends_each_sample_before_it(random_checkpoint):
    model, tok = load_checkpoint(str(random_checkpoint))
    kw = dict(num_samples=3, max_new_tokens=200, temperature=1.0, seed=1)
    full = sample(model, tok, "A", **kw)
    stop = full[0][30:32]  # a string the first sample is known to produce
    cut = sample(model, tok, "A", **kw, stop=stop)
    for whole, short in zip(full, cut):
        generated = whole[1:]
        hit = generated.find(stop)
        assert short == "A" + (generated if hit < 0 else generated[:hit])
    assert len(cut[0]) <= 31 and stop not in cut[0][1:]


def test_stream_yields_pieces_that_add_up_and_hold_back_a_possible_stop(random_checkpoint):
    model, tok = load_checkpoint(str(random_checkpoint))
    full = sample(model, tok, "\n", max_new_tokens=120, temperature=1.0, seed=3)[0]
    pieces = [p[0] for p in stream(model, tok, "\n", max_new_tokens=120, temperature=1.0, seed=3)]
    assert "\n" + "".join(pieces) == full
    assert sum(1 for p in pieces if p) >= 100  # characters arrive one by one, not at the end
    stop = full[41:44]
    cut = sample(model, tok, "\n", max_new_tokens=120, temperature=1.0, seed=3, stop=stop)[0]
    streamed = [p[0] for p in stream(model, tok, "\n", max_new_tokens=120, temperature=1.0, seed=3, stop=stop)]
    assert "\n" + "".join(streamed) == cut
    # no piece ever shows a character that later turns out to be part of the stop string
    assert all(stop not in "".join(streamed[: i + 1]) for i in range(len(streamed)))


def test_stopping_a_stream_early_frees_the_cache(random_checkpoint):
    model, tok = load_checkpoint(str(random_checkpoint))
    pieces = stream(model, tok, "A", max_new_tokens=100, seed=0)
    next(pieces)
    assert model.transformer.h[0].attn.kv_cache is not None
    pieces.close()
    assert model.transformer.h[0].attn.kv_cache is None


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(temperature=-0.5), "temperature must be 0 or more"),
        (dict(max_new_tokens=-1), "max_new_tokens must be 0 or more"),
        (dict(top_k=0), "top_k must be at least 1"),
        (dict(num_samples=0), "num_samples must be at least 1"),
        (dict(stop=""), "stop is empty"),
        (dict(stop="€"), "could never be generated"),
    ],
)
def test_bad_sampling_values_raise_before_any_text(random_checkpoint, kw, fragment):
    model, tok = load_checkpoint(str(random_checkpoint))
    with pytest.raises(NanoGPTError, match=fragment.replace("(", r"\(").replace("]", r"\]")):
        stream(model, tok, "A", **kw)  # raises at the call, not at the first character


def test_zero_new_tokens_returns_the_prompt(random_checkpoint):
    model, tok = load_checkpoint(str(random_checkpoint))
    assert sample(model, tok, "KING", max_new_tokens=0, num_samples=2) == ["KING", "KING"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--top_p", "0"], "--top_p"),
        (["--temperature", "-1"], "--temperature"),
        (["--max_new_tokens", "-3"], "--max_new_tokens"),
        (["--stream", "--num_samples", "2"], "--stream"),
        (["--stop", ""], "--stop is empty"),
        (["--stop", "\\x"], "broken backslash escape"),
    ],
)
def test_cli_bad_values_are_one_line_errors(capsys, random_checkpoint, args, fragment):
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint, *args), fragment)


def test_cli_stream_stop_and_no_cache_print_the_same_text(capsys, random_checkpoint):
    base = ["--ckpt", random_checkpoint, "--prompt", "ROMEO:", "--max_new_tokens", "150", "--seed", "4",
            "--top_p", "0.9"]
    plain = run_main(main, capsys, *base)
    assert plain.returncode == 0, plain.stderr
    assert run_main(main, capsys, *base, "--stream").stdout == plain.stdout
    assert run_main(main, capsys, *base, "--no_cache").stdout == plain.stdout
    text = plain.stdout[:-1]
    assert text.startswith("ROMEO:") and len(text) == 156
    # --stop takes escapes: a newline typed as \n
    generated = text[6:]
    if "\n" in generated:
        stopped = run_main(main, capsys, *base, "--stop", "\\n", "--stream")
        assert stopped.stdout == "ROMEO:" + generated[: generated.index("\n")] + "\n"
    stop = generated[20:23]
    stopped = run_main(main, capsys, *base, "--stop", stop)
    assert stopped.stdout == "ROMEO:" + generated[: generated.index(stop)] + "\n"


def test_one_settings_object_serves_the_functions_the_flags_and_the_demo(random_checkpoint):
    from dataclasses import fields

    from nanogpt.app import generate_text
    from nanogpt.generate import SamplingSettings, build_parser, settings_of

    # sample.py's flags are the settings' fields, with their defaults (use_cache: --no_cache)
    args = build_parser().parse_args(["--ckpt", "x"])
    assert settings_of(args) == SamplingSettings()
    assert {f.name for f in fields(SamplingSettings)} <= set(vars(args))
    flags = settings_of(build_parser().parse_args(["--ckpt", "x", "--top_k", "5", "--no_cache", "--stop", "\\n"]))
    assert flags == SamplingSettings(top_k=5, use_cache=False, stop="\n")
    model, tok = load_checkpoint(str(random_checkpoint))
    settings = SamplingSettings(max_new_tokens=40, temperature=1.0, top_k=20, top_p=0.9, seed=2)
    # a settings object, or its fields as keyword arguments, or both: the same text
    text = sample(model, tok, "A", settings)
    assert text == sample(model, tok, "A", max_new_tokens=40, temperature=1.0, top_k=20, top_p=0.9, seed=2)
    assert text != sample(model, tok, "A", settings, seed=3)
    assert "A" + "".join(p[0] for p in stream(model, tok, "A", settings)) == text[0]
    assert list(generate_text(model, tok, "A", 40, 1.0, 20, 0.9, 2, max_length=100))[-1] == text[0]
    with pytest.raises(TypeError):
        sample(model, tok, "A", temprature=1.0)  # a misspelt setting is not silently ignored
