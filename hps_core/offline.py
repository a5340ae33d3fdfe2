"""Offline helpers: export a torch model's embedding tables to HPS table files, and bulk-load table files into
the configured tiers (a Hydra entry point with progress bars).

    python -m hps_core.offline tiers=host_rocksdb data_dir=/data/tables     # load every table of the config
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from hps_core.tables import TableFiles, from_torch_embedding

log = logging.getLogger(__name__)


def export_embeddings(module: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False,
                      progress: bool | None = None) -> dict[str, TableFiles]:
    """Write every nn.Embedding / nn.EmbeddingBag inside `module` as an HPS table directory.

    Tables are named by their module path ("sparse.user" -> <out_dir>/sparse.user); keys are row ids.

    Returns:
        {module path: TableFiles of the written table}.

    Example:
        >>> model = torch.nn.ModuleDict({"user": torch.nn.Embedding(100, 16)})
        >>> tables = export_embeddings(model, "tables")
        >>> tables["user"].num_keys
        100
    """
    out = Path(out_dir)
    written = {}
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
            label = name or type(sub).__name__
            written[label] = from_torch_embedding(out / label, sub, overwrite=overwrite, progress=progress)
    if not written:
        raise ValueError(f"{type(module).__name__} holds no nn.Embedding or nn.EmbeddingBag to export")
    return written


def load_tables(config, progress: bool = True) -> dict[str, dict[str, int]]:
    """Load the table files of every model of `config` into its tiers; returns {tag: {tier: rows}}."""
    from hps_core.engine import HierarchicalParameterServer

    start = time.perf_counter()
    with HierarchicalParameterServer(config, load=True, progress=progress) as hps:
        sizes = {rt.tag: {tier.name: tier.size(rt.tag) for tier in hps.tiers}
                 for runtimes in hps.tables.values() for rt in runtimes}
    log.info("loaded %d tables in %.1f s", len(sizes), time.perf_counter() - start)
    return sizes


def _main() -> None:
    import hydra
    from omegaconf import DictConfig
    from rich.console import Console
    from rich.table import Table

    from hps_core.config import load_config, register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    def run(cfg: DictConfig) -> None:
        sizes = load_tables(load_config(cfg))
        table = Table(title="rows per tier")
        tiers = sorted({t for per in sizes.values() for t in per})
        for col in ["table", *tiers]:
            table.add_column(col, justify="right")
        for tag, per in sizes.items():
            table.add_row(tag, *(f"{per.get(t, 0):,}" for t in tiers))
        Console().print(table)

    run()


if __name__ == "__main__":
    _main()
