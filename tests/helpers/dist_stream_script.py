"""The start and the re-seeding of a ``torch.distributed`` stream, on rows without a model.

Run as ``python -m torch.distributed.run --nproc_per_node 2 --standalone
tests/helpers/dist_stream_script.py OUT_DIR``: every rank runs each case of
:data:`CASES` through :func:`fit_torch_distributed` (gloo) and saves what it
got to ``OUT_DIR/rank<r>.pt``. The tests build the same chunks with
:func:`chunks` and compare with a single-process stream.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

K, C = 4, 12
CASES = ("blank_first", "tiny_chunks", "one_rank_empty", "all_blank", "no_rows")


def low_rank(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, K, generator=g, dtype=torch.float64) ** 3
    h = torch.rand(K, C, generator=g, dtype=torch.float64) ** 3
    return w @ h + 0.05 * torch.rand(n, C, generator=g, dtype=torch.float64)


def chunks(case: str, rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s chunks in ``case``."""
    data = low_rank(2400, seed=0)[rank::2]  # 1,200 rows per rank, the same matrix
    blank = torch.zeros(60, C, dtype=torch.float64)
    if case == "blank_first":  # rank 0 opens with three blank batches; rank 1 with real rows
        return [blank] * 3 + list(data.split(100)) if rank == 0 else list(data.split(100))
    if case == "tiny_chunks":  # 5 rows per batch: 20 steps before 2 x 5 x 10 rows are held
        return list(data[:300].split(5))
    if case == "one_rank_empty":
        return list(data.split(100)) if rank == 1 else []
    if case == "all_blank":
        return [blank, blank[:3]]
    return []


def main(out: Path) -> None:
    import torch.distributed as dist

    from captum_nmf import NMF
    from captum_nmf.engines.torch_dist import _reduce_update, fit_torch_distributed

    dist.init_process_group("gloo")
    try:
        torch.set_num_threads(1)
        rank = dist.get_rank()
        result: dict[str, object] = {"world": dist.get_world_size()}
        for case in CASES:
            try:
                solver = fit_torch_distributed(
                    NMF(K, random_state=0), iter(chunks(case, rank)), n_components=K
                )
                result[case] = (solver.components_.clone(), solver.n_samples_seen_)
            except ValueError as exc:
                result[case] = str(exc)
        # re-seeding: H = [e0, 0]; rank 0's row (0, 1, 0) has residual 1, rank 1's (0, 0, 3) 9;
        # neither row uses a concept, so both are re-seeded from the rows of both ranks
        f64 = torch.float64
        model = NMF(2).start_stream(torch.tensor([[1.0, 0, 0], [0, 0, 0]], dtype=f64))
        row = [[0.0, 1, 0]] if rank == 0 else [[0.0, 0, 3]]
        _reduce_update(
            model, model.statistics(torch.tensor(row, dtype=f64)), 2, torch.device("cpu")
        )
        result["reseed"] = model.components_.clone()
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
