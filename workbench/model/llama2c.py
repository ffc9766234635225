"""llama2.c checkpoints (karpathy/llama2.c) and their tokenizer, converted to a transformers Llama.

A legacy (v0) checkpoint is 7 int32 header fields (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len; a negative vocab_size means the classifier is not shared with the embedding), then fp32
arrays: token embedding [V, D], rms_att [L, D], wq [L, D, D], wk [L, Dkv, D], wv [L, Dkv, D], wo [L, D, D],
rms_ffn [L, D], w1 [L, H, D], w2 [L, D, H], w3 [L, H, D], rms_final [D], freq_cis real/imag
[S, hd/2] each (unused), then the classifier [V, D] when unshared. Weights are stored [out, in].

llama2.c applies rotary embeddings to interleaved pairs (Meta's layout); transformers' Llama rotates the
two halves of each head. `_unpermute_rotary` reorders the rows of wq/wk so the converted model computes the
same function (the same permutation transformers' own Meta-to-HF converter applies).

The tokenizer file is: int32 max_token_length, then per token: float32 score, int32 length, bytes.
"""

from __future__ import annotations

import heapq
import struct
from pathlib import Path

import numpy as np
import torch

from workbench.errors import WorkbenchError

_HEADER = struct.Struct("<7i")


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection [n_heads * hd, D] from interleaved-pair to half-split rotary layout."""
    out_features, in_features = w.shape
    hd = out_features // n_heads
    return w.view(n_heads, hd // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def read_llama2c_config(path: Path) -> dict:
    """Parse and check the header of a llama2.c checkpoint; raises WorkbenchError on a bad file."""
    size = path.stat().st_size
    if size < _HEADER.size:
        raise WorkbenchError(f"{path}: too short for a llama2.c checkpoint ({size} bytes)")
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack(f.read(_HEADER.size))
    fields = (dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len)
    if min(fields) <= 0 or dim % n_heads or n_heads % n_kv or dim > 65536 or n_layers > 1024:
        raise WorkbenchError(f"{path}: header {fields} is not a llama2.c checkpoint")
    cfg = dict(
        dim=dim,
        hidden_dim=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=abs(vocab),
        shared_classifier=vocab > 0,
        seq_len=seq_len,
    )
    hd = dim // n_heads
    kv_dim = n_kv * hd
    per_layer = 2 * dim + dim * dim * 2 + 2 * kv_dim * dim + 3 * hidden * dim
    n_floats = abs(vocab) * dim + n_layers * per_layer + dim + seq_len * hd
    if vocab < 0:
        n_floats += abs(vocab) * dim
    expected = _HEADER.size + 4 * n_floats
    if size != expected:
        raise WorkbenchError(
            f"{path}: size {size} bytes does not match its llama2.c header ({expected} expected): "
            "truncated or not a llama2.c checkpoint"
        )
    return cfg


def load_llama2c(path: Path, dtype: torch.dtype = torch.float32):
    """Convert a llama2.c checkpoint into a transformers LlamaForCausalLM (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = read_llama2c_config(path)
    D, H, L = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    nh, nkv, V = cfg["n_heads"], cfg["n_kv_heads"], cfg["vocab_size"]
    hd = D // nh
    kv = nkv * hd
    raw = np.fromfile(path, dtype="<f4", offset=_HEADER.size)
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        t = torch.from_numpy(raw[pos : pos + n].copy()).view(*shape)
        pos += n
        return t

    emb = take(V, D)
    rms_att, wq, wk = take(L, D), take(L, D, D), take(L, kv, D)
    wv, wo, rms_ffn = take(L, kv, D), take(L, D, D), take(L, D)
    w1, w2, w3 = take(L, H, D), take(L, D, H), take(L, H, D)
    rms_final = take(D)
    take(cfg["seq_len"], hd // 2)
    take(cfg["seq_len"], hd // 2)
    wcls = emb if cfg["shared_classifier"] else take(V, D)

    hf_cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=H,
        num_hidden_layers=L,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        max_position_embeddings=cfg["seq_len"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=cfg["shared_classifier"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    model = LlamaForCausalLM(hf_cfg)
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rms_att[i]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        sd[p + "self_attn.q_proj.weight"] = _unpermute_rotary(wq[i], nh)
        sd[p + "self_attn.k_proj.weight"] = _unpermute_rotary(wk[i], nkv)
        sd[p + "self_attn.v_proj.weight"] = wv[i]
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "mlp.gate_proj.weight"] = w1[i]
        sd[p + "mlp.down_proj.weight"] = w2[i]
        sd[p + "mlp.up_proj.weight"] = w3[i]
    if not cfg["shared_classifier"]:
        sd["lm_head.weight"] = wcls
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg["shared_classifier"])]
    assert not missing and not unexpected, f"llama2.c conversion mismatch: {missing} {unexpected}"
    if cfg["shared_classifier"]:
        model.tie_weights()
    return model.to(dtype).eval(), cfg


class Llama2cTokenizer:
    """The sentencepiece-style BPE of llama2.c (scores decide merges, byte fallback `<0xXX>`)."""

    bos_token_id = 1
    eos_token_id = 2
    chat_template = None

    def __init__(self, path: Path):
        data = Path(path).read_bytes()
        if len(data) < 4:
            raise WorkbenchError(f"{path}: too short for a llama2.c tokenizer")
        (self.max_token_length,) = struct.unpack_from("<i", data, 0)
        pos = 4
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        try:
            while pos < len(data):
                score, n = struct.unpack_from("<fi", data, pos)
                pos += 8
                if n < 0 or pos + n > len(data):
                    raise struct.error("bad length")
                self.pieces.append(data[pos : pos + n])
                self.scores.append(score)
                pos += n
        except struct.error:
            raise WorkbenchError(f"{path}: corrupt llama2.c tokenizer at byte {pos}") from None
        self.vocab_size = len(self.pieces)
        self._lookup = {p: i for i, p in enumerate(self.pieces)}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Tokenize like llama2.c's `encode`: dummy prefix space, characters, then best-score merges."""
        ids: list[int] = [self.bos_token_id] if add_bos else []
        if not text:
            return ids
        return ids + self._merge(self._chars(text))

    def _chars(self, text: str) -> list[int]:
        """The tokens before any merge: the dummy-prefix space, then one per character (or its bytes)."""
        toks = [self._lookup[b" "]] if b" " in self._lookup else []
        for ch in text:
            b = ch.encode("utf-8")
            if b in self._lookup:
                toks.append(self._lookup[b])
            else:
                toks.extend(byte + 3 for byte in b)  # byte fallback: ids 3..258 are <0x00>..<0xFF>
        return toks

    def _merge(self, toks: list[int]) -> list[int]:
        """Apply best-score merges until none applies, in O(n log n).

        Same result as llama2.c's quadratic loop (merge the adjacent pair whose merged piece has the
        highest score, the leftmost on ties, repeat): a heap keyed by (-score, position of the left
        token) holds every adjacent pair; entries made stale by an earlier merge are skipped on pop.
        """
        n = len(toks)
        if n < 2:
            return toks
        tok = list(toks)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n

        def pair(i: int) -> tuple[float, int, int, int, int] | None:
            k = nxt[i]
            j = self._lookup.get(self.pieces[tok[i]] + self.pieces[tok[k]]) if k < n else None
            return None if j is None else (-self.scores[j], i, k, tok[i], tok[k])

        heap = [e for e in map(pair, range(n - 1)) if e is not None]
        heapq.heapify(heap)
        while heap:
            _, i, k, ti, tk = heapq.heappop(heap)
            if not (alive[i] and alive[k] and nxt[i] == k and tok[i] == ti and tok[k] == tk):
                continue  # stale: one of the two tokens was merged since this entry was pushed
            tok[i] = self._lookup[self.pieces[ti] + self.pieces[tk]]
            alive[k] = False
            nxt[i] = nxt[k]
            if nxt[k] < n:
                prv[nxt[k]] = i
            for a in (prv[i], i):
                e = pair(a) if a >= 0 else None
                if e is not None:
                    heapq.heappush(heap, e)
        return [tok[i] for i in range(n) if alive[i]]

    def decode(self, ids) -> str:
        out = bytearray()
        prev = None
        for t in (int(i) for i in ids):
            if t in (self.bos_token_id, self.eos_token_id):
                prev = t
                continue
            piece = self.pieces[t]
            if prev in (None, self.bos_token_id) and piece.startswith(b" ") and not out:
                piece = piece[1:]
            if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
                piece = bytes([int(piece[3:5], 16)])
            out += piece
            prev = t
        return out.decode("utf-8", errors="replace")
