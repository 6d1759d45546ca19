"""What ``mustat oneshot`` writes, for encoder and causal-LM runs alike."""

from __future__ import annotations

from pathlib import Path

from mustat._io import atomic_write, write_json


def write_outputs(model, tokenizer, report, summary: dict, out: Path, export: tuple[Path, str] | None) -> int:
    """The pruned model (``model.safetensors``), ``layers.csv`` and ``report.json`` into ``out``,
    and the ``--export`` folder when asked (encoder and causal-LM runs alike)."""
    from mustat.export import save_pruned
    from mustat.sparse import save_sparse

    out.mkdir(parents=True, exist_ok=True)
    save_sparse(model, out / "model.safetensors")
    atomic_write(out / "layers.csv", lambda p: report.layers.to_csv(p, index=False))
    write_json(out / "report.json", summary)
    print(f"wrote {out}/model.safetensors, layers.csv, report.json")
    if export is not None:
        print(f"wrote {save_pruned(model, export[0], format=export[1], overwrite=True, tokenizer=tokenizer)} "
              f"({export[1]})")
    return 0

