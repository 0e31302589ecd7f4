"""How trajectory methods choose their starting images and labels from real data.

- representative (AST): k-means on an expert's logits of each class's images, then the image
  nearest each centre; works for any IPC (IPC 1: the image nearest the class mean).
- correct-only (DATM): only images an expert classifies correctly, with soft labels that are
  the logits averaged over the experts that classify the image correctly; with `init=kmeans`
  the representative images among those.

Both score a seeded pool of each class's images (not the whole class) to keep the cost of a
CPU run small; pool_per_class bounds it.
"""

from __future__ import annotations

import torch

from ddtool.data import PreparedData, class_indices
from ddtool.errors import DDToolError
from ddtool.experts import ExpertStore
from ddtool.matching.engine import Forward


def class_pools(data: PreparedData, pool_per_class: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random subset (at most pool_per_class) of each class's training indices."""
    pools = []
    for idx in class_indices(data.train_y, data.spec.num_classes):
        order = torch.randperm(idx.numel(), generator=generator)[:pool_per_class]
        pools.append(idx[order.to(idx.device)])
    return pools


@torch.no_grad()
def class_mixed_logits(experts: ExpertStore, expert: int, forward: Forward, data: PreparedData,
                       pools: list[torch.Tensor], batch_size: int = 1024) -> list[torch.Tensor]:
    """Logits of `expert`'s final parameters on each class's pool of training images (indices),
    one tensor per pool, scored in batches that take the classes in turn.

    Experts keep parameters only, so a network with batch statistics (BatchNorm) normalises
    by the batch it is given: a batch of one class would be normalised by that class alone,
    and its logits would say little about the class. Per-image normalisation (the default
    instance norm) gives the same logits in any batch."""
    sizes = [pool.numel() for pool in pools]
    everyone = torch.cat(pools)
    owner = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(sizes)])
    position = torch.cat([torch.arange(n) for n in sizes])
    order = torch.argsort(position * len(pools) + owner).to(everyone.device)  # image j of each class, then j + 1
    params = experts.params(expert, experts.epochs).to(data.train_x.device)
    scored = torch.cat([forward(params, data.train_x[everyone[order[i:i + batch_size]]])
                        for i in range(0, order.numel(), batch_size)])
    logits = torch.empty_like(scored)
    logits[order] = scored
    return list(logits.split(sizes))


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns the (k, D) centres."""
    n = points.shape[0]
    centres = [points[int(torch.randint(n, (1,), generator=generator))]]
    for _ in range(1, k):
        dist = torch.cdist(points, torch.stack(centres)).min(dim=1).values.pow(2)
        weights = (dist / dist.sum()).cpu() if dist.sum() > 0 else torch.full((n,), 1.0 / n)
        centres.append(points[int(torch.multinomial(weights, 1, generator=generator))])
    centres = torch.stack(centres)
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(dim=1)
        updated = torch.stack([points[assign == j].mean(dim=0) if (assign == j).any() else centres[j]
                               for j in range(k)])
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres


def nearest_to_centres(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the `k` points nearest the centres of k-means on `points`, never the same point
    twice (two centres can share a nearest point)."""
    distances = torch.cdist(kmeans(points, k, generator), points)
    picked: list[int] = []
    for row in distances:
        row = row.clone()
        row[picked] = float("inf")
        picked.append(int(row.argmin()))
    return torch.tensor(picked, device=points.device)


def representative_indices(data: PreparedData, experts: ExpertStore, forward: Forward, ipc: int, *,
                           pool_per_class: int, generator: torch.Generator) -> torch.Tensor:
    """AST's representative initialisation: per class, the images nearest the k-means centres
    (k = ipc) of expert 0's logits; class-major, distinct images."""
    pools = class_pools(data, max(pool_per_class, ipc), generator)
    for c, pool in enumerate(pools):
        if pool.numel() < ipc:
            raise DDToolError(f"Class {data.spec.classes[c]!r} has {pool.numel()} training images; IPC {ipc} "
                              "is too many.")
    logits = class_mixed_logits(experts, experts.expert_indices[0], forward, data, pools)
    return torch.cat([pool[nearest_to_centres(scores, ipc, generator).to(pool.device)]
                      for pool, scores in zip(pools, logits)])


def correct_only_init(data: PreparedData, experts: ExpertStore, forward: Forward, ipc: int, *,
                      pool_per_class: int, generator: torch.Generator,
                      representative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DATM's initialisation: (indices, label logits). Images are drawn among those expert 0
    classifies correctly; each label is the mean logit vector over the experts that classify
    that image correctly. `representative`: AST's choice among those images instead of a
    random one (the images nearest the k-means centres of expert 0's logits)."""
    indices, labels = [], []
    # a large set (DATM's IPC 500-1000) needs more scored images than the default pool holds
    pools = class_pools(data, max(pool_per_class, 2 * ipc), generator)
    by_expert = [class_mixed_logits(experts, e, forward, data, pools) for e in experts.expert_indices]
    for c, pool in enumerate(pools):
        logits = torch.stack([per_class[c] for per_class in by_expert])  # (experts, pool, classes)
        correct = logits.argmax(dim=2) == c  # (experts, pool)
        eligible = correct[0].nonzero().squeeze(1)
        if eligible.numel() < ipc:
            raise DDToolError(
                f"Only {eligible.numel()} of {pool.numel()} scored images of class {data.spec.classes[c]!r} are "
                f"classified correctly by the expert, fewer than IPC {ipc}: raise init_pool_per_class or train "
                "better experts.")
        if representative:
            pick = eligible[nearest_to_centres(logits[0, eligible], ipc, generator).to(eligible.device)]
        else:
            pick = eligible[torch.randperm(eligible.numel(), generator=generator)[:ipc].to(eligible.device)]
        weights = correct[:, pick].float()  # which experts count for each picked image
        averaged = (logits[:, pick] * weights.unsqueeze(2)).sum(0) / weights.sum(0).unsqueeze(1)
        indices.append(pool[pick])
        labels.append(averaged)
    return torch.cat(indices), torch.cat(labels)
