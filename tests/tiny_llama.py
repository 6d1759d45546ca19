"""Tiny LLaMA models (random weights, no download) for the structured and export tests."""

from __future__ import annotations

import torch

#: (hidden, query heads, key/value heads, intermediate): head_dim 8 everywhere; groups of 2, 3 and 1
SHAPES = {"6q3kv": (48, 6, 3, 64), "9q3kv": (72, 9, 3, 128), "6q2kv": (48, 6, 2, 96), "4q4kv": (32, 4, 4, 64)}


def tiny_llama(shape: str = "6q3kv", *, seed: int = 0, dtype=torch.float64, attn: str = "eager", vocab: int = 64):
    """A 2-layer ``LlamaForCausalLM`` of one of :data:`SHAPES`, weights drawn with ``seed`` (norm
    weights too, so that the RMSNorm scales are not all 1), in eval mode."""
    import transformers

    hidden, heads, kv, inter = SHAPES[shape]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                                   num_key_value_heads=kv, intermediate_size=inter, num_hidden_layers=2,
                                   max_position_embeddings=64, attn_implementation=attn, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def token_batches(seed: int = 0, vocab: int = 64, n: int = 3, length: int = 12) -> list[dict]:
    """Calibration batches for ``model(**batch)``: random ids, the second row half padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, length // 2:] = 0
        out.append(dict(input_ids=ids, attention_mask=mask))
    return out


WORDS = [f"w{i}" for i in range(40)]


def causal_folder(folder, *, seed: int = 0):
    """A tiny LLaMA (float32, 6 query heads over 3 key/value heads) and a word-level tokenizer of
    :data:`WORDS` saved in ``folder`` with a ``text.txt`` of 3,000 words: what ``mustat oneshot``
    loads as a causal-LM folder."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<pad>", "<unk>", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(
        folder)
    model = tiny_llama("6q3kv", seed=seed, dtype=torch.float32, attn="sdpa", vocab=len(vocab))
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, None, None
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    text = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3000,), generator=g))
    (folder / "text.txt").write_text(text + "\n")
    return folder
