"""``mustat oneshot`` end to end on a tiny BERT and tokenizer saved by the test."""

import json

import pytest
import torch

import mustat
from mustat.cli import main
from mustat.patterns import check_pattern

transformers = pytest.importorskip("transformers")

WORDS = "the a of to in is and function class returns value object list string module type name".split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(4, 12, (40,), generator=g)]
    (d / "text.txt").write_text("\n".join(lines) + "\n")
    return d


def test_oneshot_command_prunes_saves_and_reports(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["oneshot", str(folder), "--text", str(folder / "text.txt"), "--samples", "16", "--evaluate", "8",
                 "--pattern", "2:4", "--method", "mu", "--update", "yes", "--swaps", "10", "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5) and report["target"] == "2:4" and -1 <= report["cosine"] <= 1
    assert report["swaps"] == 10
    model = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False)
    mustat.load_sparse(out / "model.safetensors", model)
    assert check_pattern(model, "2:4") == {} and mustat.sparsity(model) == pytest.approx(0.5)
    assert "fidelity on 8 held-out sentences" in capsys.readouterr().out


def test_oneshot_command_prunes_in_shots(folder, tmp_path):
    out = tmp_path / "out"
    assert main(["oneshot", str(folder), "--text", str(folder / "text.txt"), "--samples", "16", "--evaluate", "8",
                 "--sparsity", "0.6", "--method", "mu", "--update", "yes", "--shots", "2", "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    # each row keeps round(0.4 d) of its d weights, as one shot would: the tiny rows round to 0.617 here
    assert report["shots"] == 2 and report["sparsity"] == pytest.approx(0.6, abs=0.02)


def test_oneshot_command_errors(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["oneshot", str(folder), "--text", str(folder / "text.txt"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "give --sparsity" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["oneshot", str(folder), "--pattern", "5:4", "--out", str(tmp_path / "x")])
    assert "--pattern='5:4' is not valid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["oneshot", str(folder), "--sparsity", "0.5", "--swaps", "-2", "--out", str(tmp_path / "x")])
    assert "--swaps must be 0 (none) or a positive number of 1-swaps per row, got -2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["oneshot", str(folder), "--sparsity", "0.5", "--shots", "0", "--out", str(tmp_path / "x")])
    assert "--shots must be 1 (one shot) or more steps, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["oneshot", str(folder), "--pattern", "2:4", "--shots", "2", "--out", str(tmp_path / "x")])
    assert "--pattern 2:4 fixes every group at once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["oneshot", str(folder), "--sparsity", "0.5", "--loss-damping", "0.01", "--out", str(tmp_path / "x")])
    assert "--loss-damping must be in [0, 1e6] and damps the loss's output factor (--sigma loss); got 0.01" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["oneshot", str(folder), "--sparsity", "0.5", "--method", "mu", "--sigma", "loss", "--loss-damping", "nan",
              "--out", str(tmp_path / "x")])
    assert "--loss-damping must be in [0, 1e6]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["oneshot", str(tmp_path), "--sparsity", "0.5", "--text", str(folder / "text.txt")])
    assert "has no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):        # an encoder has no loss of its own
        main(["oneshot", str(folder), "--sparsity", "0.5", "--method", "mu", "--sigma", "loss",
              "--text", str(folder / "text.txt"), "--out", str(tmp_path / "x")])
    assert "--sigma loss needs the model's own loss" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()   # nothing written on a refused run


def test_quiet_prints_no_progress_and_leaves_transformers_as_it_was(folder, tmp_path, capfd):
    """--quiet: no bar on stderr, neither mustat's nor transformers' "Loading weights" (a trial
    showed one for two minutes); transformers' switch is back on after the run. Without --quiet
    the bars are there, so the check can fail."""
    from transformers.utils import logging as tf_logging

    argv = ["oneshot", str(folder), "--text", str(folder / "text.txt"), "--samples", "16", "--evaluate", "8",
            "--sparsity", "0.5", "--method", "wanda"]
    capfd.readouterr()
    assert main([*argv, "--out", str(tmp_path / "loud")]) == 0
    loud = capfd.readouterr()
    assert "one-shot wanda" in loud.err and "it/s]" in loud.err
    assert main([*argv, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = capfd.readouterr()
    assert quiet.err == "" and "it/s" not in quiet.out and "\r" not in quiet.out
    assert "fidelity on 8 held-out sentences" in quiet.out
    assert tf_logging.is_progress_bar_enabled()
