"""The runs of a sweep, grouped into the runs that share one compiled training program.

A *run* is one (grid point, seed). Runs that differ only in seed, learning rate and rho share
the shapes and the model, so they become members of one `Group`, trained by one `train` call.
Batch size, BatchNorm and dropout change the program and give separate groups.
"""

from __future__ import annotations

import dataclasses
import itertools

from flatjax.config import SweepConfig, config_hash, without_unmeasured


@dataclasses.dataclass(frozen=True)
class Member:
    """A run's per-member settings inside its group."""

    seed: int
    lr: float
    rho: float


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs trained by one compiled program: the shared settings and the members."""

    batch_size: int
    batch_norm: bool
    dropout: float
    members: tuple[Member, ...]

    def label(self) -> str:
        """A short human-readable name, e.g. "bs=100 bn=False p=0 (6 runs)"."""
        return (f"bs={self.batch_size} bn={self.batch_norm} p={self.dropout:g} "
                f"({len(self.members)} runs)")


def plan_groups(config: SweepConfig, max_members: int = 0) -> list[Group]:
    """All groups of the sweep, at most `max_members` members each (0: no limit)."""
    members = tuple(
        Member(seed, lr, rho)
        for lr, rho, seed in itertools.product(config.lrs, config.rhos, range(config.seeds))
    )
    size = max_members or len(members)
    return [
        Group(batch_size, batch_norm, dropout, members[start : start + size])
        for batch_size, batch_norm, dropout in itertools.product(
            config.batch_sizes, config.batch_norms, config.dropouts)
        for start in range(0, len(members), size)
    ]


def run_settings(config: SweepConfig, group: Group, member: Member) -> dict:
    """Everything that determines a run except its seed (the input of its config hash).

    `track_every` is left out: tracking adds trajectory rows but does not change the run. So are
    the adaptive sharpness settings when it is not measured, which keeps the keys of rows written
    before it existed.
    """
    shared = {
        k: v for k, v in dataclasses.asdict(config).items()
        if k not in ("preset", "figure", "seeds", "batch_sizes", "lrs", "rhos", "dropouts",
                     "batch_norms", "track_every")
    }
    if config.optimizer != "sam":
        shared.pop("sam_policy")
    return {**without_unmeasured(shared), "batch_size": group.batch_size,
            "batch_norm": group.batch_norm, "dropout": group.dropout, "lr": member.lr,
            "rho": member.rho}


def run_key(config: SweepConfig, group: Group, member: Member) -> tuple[str, int]:
    """(config hash, seed): the key of a run's row in results.csv."""
    return config_hash(run_settings(config, group, member)), member.seed


def group_hash(config: SweepConfig, group: Group) -> str:
    """A hash naming the group's checkpoint folder (its settings and its members)."""
    keys = [run_key(config, group, member) for member in group.members]
    return config_hash({"runs": keys})
