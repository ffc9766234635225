"""Model loading from every source, the llama2.c conversion, and the bad-input errors."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from tests.conftest import STORIES
from workbench.errors import WorkbenchError
from workbench.model.llama2c import read_llama2c_config
from workbench.model.loading import load_model


def _llama2c_reference_logits(path, tokens: list[int]) -> torch.Tensor:
    """A direct re-implementation of llama2.c's forward (interleaved-pair rotary) from the raw file."""
    import numpy as np

    cfg = read_llama2c_config(path)
    D, H, L, nh, nkv, V = (
        cfg[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
    )
    hd, raw, pos = D // nh, np.fromfile(path, dtype="<f4", offset=28), 0

    def take(*shape):
        nonlocal pos
        n = math.prod(shape)
        t = torch.from_numpy(raw[pos : pos + n].copy()).view(*shape).double()
        pos += n
        return t

    emb, rms_att, wq, wk = take(V, D), take(L, D), take(L, D, D), take(L, nkv * hd, D)
    wv, wo, rms_ffn = take(L, nkv * hd, D), take(L, D, D), take(L, D)
    w1, w2, w3, rms_final = take(L, H, D), take(L, D, H), take(L, H, D), take(D)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w

    T = len(tokens)
    x = emb[torch.tensor(tokens)]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).double() / hd))
    ang = torch.arange(T).double()[:, None] * freqs[None]  # [T, hd/2]

    def rope(t):  # t [T, heads, hd], pairs (2i, 2i+1) rotate together
        a, b = t[..., 0::2], t[..., 1::2]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)

    mask = torch.full((T, T), float("-inf")).triu(1).double()
    for i in range(L):
        h = rms(x, rms_att[i])
        q = rope((h @ wq[i].T).view(T, nh, hd))
        k = rope((h @ wk[i].T).view(T, nkv, hd)).repeat_interleave(nh // nkv, 1)
        v = (h @ wv[i].T).view(T, nkv, hd).repeat_interleave(nh // nkv, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(T, D)
        x = x + o @ wo[i].T
        h = rms(x, rms_ffn[i])
        x = x + (torch.nn.functional.silu(h @ w1[i].T) * (h @ w3[i].T)) @ w2[i].T
    return rms(x, rms_final) @ emb.T


def test_stories_conversion_matches_llama2c_forward(stories):
    tokens = stories.tokenizer.encode("Once upon a time, there was a big dog.", add_bos=True)
    ref = _llama2c_reference_logits(STORIES, tokens)
    with torch.no_grad():
        got = stories.model(torch.tensor([tokens])).logits[0].double()
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_stories_greedy_story(stories):
    ids = stories.tokenizer.encode("Once upon a time", add_bos=True)
    out = stories.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    text = stories.tokenizer.decode(out[0].tolist())
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text


def test_stories_tokenizer_round_trip(stories):
    text = 'Lily saw a big, red ball. She said: "Wow!" 123 é'
    ids = stories.tokenizer.encode(text)
    assert stories.tokenizer.decode(ids) == text


def _quadratic_merge(tok, toks: list[int]) -> list[int]:
    """llama2.c's own merge loop, verbatim in Python: rescan every pair after each merge."""
    toks = list(toks)
    while True:
        best, best_i, best_id = -1e30, -1, -1
        for i in range(len(toks) - 1):
            j = tok._lookup.get(tok.pieces[toks[i]] + tok.pieces[toks[i + 1]])
            if j is not None and tok.scores[j] > best:
                best, best_i, best_id = tok.scores[j], i, j
        if best_i < 0:
            return toks
        toks[best_i : best_i + 2] = [best_id]


def test_stories_tokenizer_merges_match_llama2c_loop(stories):
    from workbench.model.data import load_text

    tok = stories.tokenizer.inner
    story = load_text("tinystories")[:3000]
    for text in [story, "aaaa aaaa  bbb\n\nThe the THE", "Lily saw a big, red ball. 123 é ü 猫"]:
        assert tok.encode(text, add_bos=False) == _quadratic_merge(tok, tok._chars(text)), text[:40]
    assert len(tok.encode(story, add_bos=False)) < 0.5 * len(story)


def test_stories_description(stories):
    d = stories.description
    assert (d.n_layers, d.hidden_size, d.vocab_size, d.max_context) == (5, 64, 512, 512)
    assert d.architecture == "LlamaForCausalLM" and len(d.fingerprint) == 16
    assert d.n_params == sum(p.numel() for p in stories.model.parameters())


@pytest.mark.slow
def test_default_answers_capital_of_france(default_model):
    tok = default_model.tokenizer
    ids = tok.prompt_ids("What is the capital of France?")
    out = default_model.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, len(ids) :].tolist())
    assert "Paris" in answer, answer
    assert any("Q4_1" in c for c in default_model.description.caveats)


# ---- bad input: one clear error each ---------------------------------------------------------------


def test_missing_path():
    with pytest.raises(WorkbenchError, match="not found"):
        load_model("/no/such/model/here")


def test_folder_without_weights(tmp_path):
    with pytest.raises(WorkbenchError, match="no weights"):
        load_model(str(tmp_path))


def test_pickles_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(WorkbenchError, match="pickle"):
        load_model(str(tmp_path / "model.pt"))
    shutil.copy(tmp_path / "model.pt", tmp_path / "pytorch_model.bin")
    with pytest.raises(WorkbenchError, match="pickle"):
        load_model(str(tmp_path / "pytorch_model.bin"))


def test_hf_folder_round_trip_and_truncated_safetensors(stories, tmp_path):
    folder = tmp_path / "hf"
    stories.model.save_pretrained(folder)
    with pytest.raises(WorkbenchError, match="no tokenizer"):
        load_model(str(folder), progress=False)
    shutil.copy(STORIES.parent / "tok512.bin", folder / "tok512.bin")
    loaded = load_model(str(folder), progress=False)
    assert loaded.description.fingerprint == stories.description.fingerprint
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(WorkbenchError, match="could not load weights"):
        load_model(str(folder), progress=False)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(WorkbenchError, match="broken.gguf"):
        load_model(str(bad), progress=False)


def test_truncated_llama2c(tmp_path):
    shutil.copy(STORIES.parent / "tok512.bin", tmp_path / "tok512.bin")
    (tmp_path / "m.bin").write_bytes(STORIES.read_bytes()[:5000])
    with pytest.raises(WorkbenchError, match="truncated"):
        load_model(str(tmp_path / "m.bin"), progress=False)


def test_llama2c_without_tokenizer(tmp_path):
    shutil.copy(STORIES, tmp_path / "m.bin")
    with pytest.raises(WorkbenchError, match="tokenizer"):
        load_model(str(tmp_path / "m.bin"), progress=False)


def test_cli_error_is_one_line_not_a_traceback(tmp_path, capsys):
    """In this process (an exception other than WorkbenchError would propagate and fail the test; the
    `python -m workbench.cli` entry point itself runs in tests/test_packaging.py)."""
    from workbench.cli import main

    torch.save({"w": torch.zeros(2)}, tmp_path / "x.pt")
    for model in ("/no/such/model", str(tmp_path / "x.pt")):
        capsys.readouterr()
        assert main(["inspect", "--model", model, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
