"""Exports of one-shot-pruned tiny LLaMA models: compressed-tensors sparse-bitmask and
sparse-24-bitmask checkpoints and plain save_pretrained folders, each reloaded bit-exactly.

References: compressed-tensors 0.14.0.1's own compressors (the files must hold exactly the tensors
they write) and its ModelCompressor.decompress (it must rebuild the same weights and logits from
our folder); transformers' own from_pretrained for the plain folder; mustat.check_pattern on the
reloaded 2:4 model.
"""

import json
import os

import pytest
import torch
from tiny_llama import tiny_llama, token_batches

import mustat
from mustat._params import entries, install_mask, mask_of, masked_names
from mustat.export import FORMATS, load_pruned, read_pruned, save_pruned

transformers = pytest.importorskip("transformers")


def _compressed_tensors():
    """compressed-tensors with its sparse compressors (they left the package after 0.14.x)."""
    ct = pytest.importorskip("compressed_tensors")
    from packaging.version import Version
    if Version(ct.__version__) >= Version("0.15"):
        pytest.skip(f"compressed-tensors {ct.__version__} has no sparse compressors (0.14.0.1 has: make test "
                    "installs it)")
    return ct


def _pruned(pattern="unstructured", seed=0, tied=False):
    model = tiny_llama("6q3kv", seed=seed, dtype=torch.float32, attn="sdpa")
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    batches = token_batches(seed, n=4)
    kwargs = dict(pattern="2:4") if pattern == "2:4" else dict(sparsity=0.5)
    mustat.oneshot(model, batches, method="sparsegpt", **kwargs)
    return model, batches


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def _same(model, again, batches):
    ours, theirs = entries(model), entries(again)
    assert list(ours) == list(theirs)
    for name, e in ours.items():
        assert torch.equal(e.effective(), theirs[name].effective()), name
    assert masked_names(model) == masked_names(again)
    for name in masked_names(model):
        assert torch.equal(mask_of(model, name) != 0, mask_of(again, name) != 0), name
    assert torch.equal(_logits(again, batches), _logits(model, batches))


@pytest.mark.parametrize("fmt, pattern", [("sparse-bitmask", "unstructured"), ("sparse-bitmask", "2:4"),
                                          ("sparse-24-bitmask", "2:4"), ("save-pretrained", "unstructured"),
                                          ("save-pretrained", "2:4")])
def test_round_trip_is_bit_exact(tmp_path, fmt, pattern):
    model, batches = _pruned(pattern)
    assert len(masked_names(model)) == 14                     # 7 Linear layers per block; lm_head dense
    folder = save_pruned(model, tmp_path / "out", format=fmt)
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]        # no temporary folder left
    again = load_pruned(folder)
    _same(model, again, batches)
    if pattern == "2:4":
        assert mustat.check_pattern(again, "2:4") == {}
    config = json.loads((folder / "config.json").read_text())
    if fmt == "save-pretrained":
        assert "quantization_config" not in config
        plain = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        assert torch.equal(_logits(plain.eval(), batches), _logits(model, batches))
        assert (folder / "masks.safetensors").is_file()
    else:
        q = config["quantization_config"]
        assert q["quant_method"] == "compressed-tensors" and q["sparsity_config"]["format"] == fmt
        assert q["sparsity_config"]["ignore"] == ["lm_head"] and q["sparsity_config"]["targets"] == ["Linear"]
        assert not (folder / "masks.safetensors").exists()   # every mask is a bitmask in the checkpoint
        assert q["sparsity_config"]["global_sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("fmt, pattern", [("sparse-bitmask", "unstructured"), ("sparse-24-bitmask", "2:4")])
@pytest.mark.filterwarnings("ignore:has_offloaded_params is deprecated:DeprecationWarning")
def test_files_are_what_compressed_tensors_writes_and_it_decompresses_them(tmp_path, fmt, pattern):
    _compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    from safetensors.torch import load_file

    model, batches = _pruned(pattern, seed=1)
    folder = save_pruned(model, tmp_path / "out", format=fmt)
    # their compressor on the effective weights of the same targets gives the very same tensors
    config = (BitmaskConfig if fmt == "sparse-bitmask" else Sparse24BitMaskConfig)(targets=["Linear"], ignore=["lm_head"])
    theirs = ModelCompressor(sparsity_config=config)
    plain = mustat.finalize(load_pruned(folder))
    expected = theirs.compress(plain, plain.state_dict())
    stored = load_file(folder / "model.safetensors")
    assert sorted(stored) == sorted(expected)
    for key, value in expected.items():
        assert stored[key].dtype == value.dtype and torch.equal(stored[key], value), key
    # their decompressor rebuilds the model from our folder
    fresh = tiny_llama("6q3kv", seed=9, dtype=torch.float32, attn="sdpa")
    ModelCompressor.from_pretrained(str(folder)).decompress(str(folder), fresh)
    assert torch.equal(_logits(fresh, batches), _logits(model, batches))
    for name in masked_names(model):
        assert torch.equal(fresh.get_parameter(name), entries(model)[name].effective()), name


def test_a_kept_zero_stays_kept_and_short_24_groups_are_filled(tmp_path):
    model, batches = _pruned("2:4", seed=2)
    name = "model.layers.0.mlp.up_proj.weight"
    keep = mask_of(model, name).clone() != 0
    with torch.no_grad():
        model.get_submodule("model.layers.0.mlp.up_proj").parametrizations.weight.original[0, :] = 0.0  # kept zeros
    row = keep[1].clone()
    keep[1, :4] = torch.tensor([True, False, False, False])     # a group keeping 1 of 4
    install_mask(model, name, keep)
    for fmt in ("sparse-bitmask", "sparse-24-bitmask"):
        again = load_pruned(save_pruned(model, tmp_path / fmt, format=fmt))
        assert torch.equal(_logits(again, batches), _logits(model, batches))
        got = mask_of(again, name) != 0
        assert torch.equal(got[0], keep[0])                      # zeros that were kept are kept
        if fmt == "sparse-bitmask":
            assert torch.equal(got, keep)
        else:                                                    # filled to 2 with the first masked entry
            assert torch.equal(got[1, :4], torch.tensor([True, True, False, False]))
            assert torch.equal(got[1, 4:], row[4:]) and mustat.check_pattern(again, "2:4") == {}


def test_tied_embeddings_round_trip(tmp_path):
    model, batches = _pruned("2:4", seed=3, tied=True)
    for fmt in FORMATS:
        again = load_pruned(save_pruned(model, tmp_path / fmt, format=fmt))
        assert again.lm_head.weight is again.model.embed_tokens.weight
        _same(model, again, batches)


def test_read_pruned_gives_dense_state_and_masks(tmp_path):
    model, _ = _pruned(seed=4)
    state, masks, config = read_pruned(save_pruned(model, tmp_path / "x", format="sparse-bitmask"))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert sorted(masks) == sorted(masked_names(model))
    for name in masks:
        assert torch.equal(state[name], entries(model)[name].effective())


def test_bad_input_and_atomic_writes(tmp_path, monkeypatch):
    model, _ = _pruned(seed=5)
    with pytest.raises(ValueError, match="format='safetensors' is not valid; choose one of: save-pretrained, "
                                         "sparse-bitmask, sparse-24-bitmask"):
        save_pruned(model, tmp_path / "a", format="safetensors")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' \(shape \(48, 48\)\) is not: "
                                         r"\d+ groups of 4 inputs keep more than 2"):
        save_pruned(model, tmp_path / "a", format="sparse-24-bitmask")
    with pytest.raises(ValueError, match="needs a transformers model.*save_sparse"):
        save_pruned(torch.nn.Linear(2, 2), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    save_pruned(model, tmp_path / "a", format="sparse-bitmask")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(model, tmp_path / "a")
    before = sorted(os.listdir(tmp_path / "a"))
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tmp_path / "a", format="sparse-bitmask", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tmp_path / "b", format="save-pretrained")      # fails at masks.safetensors
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a"]                # the old folder intact, nothing half-written
    assert sorted(os.listdir(tmp_path / "a")) == before
    load_pruned(tmp_path / "a")
    mode = (tmp_path / "a" / "config.json").stat().st_mode & 0o777
    assert (tmp_path / "a" / "model.safetensors").stat().st_mode & 0o777 == mode
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pruned(tmp_path)


def test_oneshot_command_exports(tmp_path, capsys):
    from tiny_llama import causal_folder

    from mustat.cli import main

    folder = causal_folder(tmp_path / "llama")
    common = ["oneshot", str(folder), "--text", str(folder / "text.txt"), "--samples", "8", "--max-length", "16",
              "--evaluate", "0", "--quiet"]
    out, export = tmp_path / "out", tmp_path / "export"
    assert main([*common, "--pattern", "2:4", "--out", str(out), "--export", str(export),
                 "--export-format", "sparse-24-bitmask"]) == 0
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert (export / "tokenizer.json").is_file()
    again = load_pruned(export)
    assert mustat.check_pattern(again, "2:4") == {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    mustat.load_sparse(out / "model.safetensors", model)          # the command's own file: the same model
    batches = [dict(input_ids=torch.arange(2, 18).reshape(2, 8))]
    _same(model.eval(), again, batches)
    assert f"wrote {export} (sparse-24-bitmask)" in capsys.readouterr().out
    assert main([*common, "--sparsity", "0.5", "--out", str(out), "--export", str(export)]) == 0     # replaced
    assert "quantization_config" not in json.loads((export / "config.json").read_text())            # default
    assert f"wrote {export} (save-pretrained)" in capsys.readouterr().out
    for extra, message in ((["--sparsity", "0.5", "--export", str(tmp_path / "x"), "--export-format", "onnx"],
                            "--export-format='onnx' is not valid; choose one of: save-pretrained, sparse-bitmask"),
                           (["--sparsity", "0.5", "--export", str(tmp_path / "x"), "--export-format",
                             "sparse-24-bitmask"], "sparse-24-bitmask stores 2:4 models; --pattern is unstructured"),
                           (["--sparsity", "0.5", "--export-format", "save-pretrained"], "needs --export FOLDER")):
        with pytest.raises(SystemExit):
            main([*common, *extra, "--out", str(tmp_path / "y")])
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
