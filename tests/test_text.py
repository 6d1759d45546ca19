"""Offline text (the Python docs) and the pretrained encoder from its wheel."""

import importlib.util

import pytest

from mustat.text import python_docs_sentences, python_docs_text, split


def test_sentences_are_distinct_filtered_and_fixed():
    s = python_docs_sentences()
    assert len(s) > 1000 and len(set(s)) == len(s)
    assert all(6 <= len(x.split()) <= 60 for x in s)
    assert s == python_docs_sentences()
    assert len(python_docs_text()) > 400_000


def test_split_is_disjoint_seeded_and_checked():
    s = python_docs_sentences()
    cal, held = split(s, 128, 512, seed=3)
    assert len(cal) == 128 and len(held) == 512 and not set(cal) & set(held)
    assert split(s, 128, 512, seed=3) == (cal, held) and split(s, 128, 512, seed=4)[0] != cal
    with pytest.raises(ValueError, match="more than the"):
        split(s[:10], 8, 8)
    with pytest.raises(ValueError, match="calibration must be in"):
        split(s, 0, 8)


@pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None, reason="the encoder's wheel is not installed")
def test_the_pretrained_encoder_unpacks_loads_and_has_36_linear_layers(tmp_path):
    pytest.importorskip("transformers")
    from mustat._params import entries
    from mustat.layers import find_targets
    from mustat.layerwise.hf import load_encoder, minilm_dir, sentence_embeddings, token_batches

    path = minilm_dir(tmp_path)
    assert (path / ".complete").exists() and minilm_dir(tmp_path) == path   # unpacked once
    model, tok = load_encoder(path)
    targets, skipped = find_targets(model, entries(model), None, ("lm_head",))
    assert len(targets) == 36 and not skipped and {t.kind for t in targets} == {"linear"}
    assert sum(t.entry.leaf.numel() for t in targets) == 10_616_832
    emb = sentence_embeddings(model, token_batches(tok, ["A function returns a value.", "Lists are mutable."]))
    assert emb.shape == (2, 384) and abs(float(emb.norm(dim=1).mean()) - 1) < 1e-6
