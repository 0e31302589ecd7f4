"""Progress bars of a buffer run: experts, and the epochs of the one in training (one process)
or of all of them (experts trained side by side in workers)."""

from __future__ import annotations

from contextlib import ExitStack

from tqdm.auto import tqdm

from ddtool.training import EpochStats


class ShardProgress:
    """Two tqdm bars: experts of this shard, and epochs of the current expert (images/s, ETA)."""

    def __init__(self, bars: ExitStack, total: int, done: int, epochs: int):
        self.epochs = epochs
        self.experts = bars.enter_context(tqdm(total=total, initial=done, desc="experts", unit="expert",
                                               position=0, dynamic_ncols=True))
        self.epoch_bar = bars.enter_context(tqdm(total=epochs, desc="epochs", unit="epoch", position=1,
                                                 leave=False, dynamic_ncols=True))

    def start_expert(self, index: int):
        self.epoch_bar.reset(total=self.epochs)
        self.epoch_bar.set_description(f"expert {index}", refresh=False)
        self.epoch_bar.set_postfix_str("", refresh=False)  # the previous expert's numbers

        def on_epoch(done: int, stats: EpochStats, seconds: float) -> None:
            self.epoch_bar.update(done - self.epoch_bar.n)  # a resumed expert jumps to its epoch
            self.epoch_bar.set_postfix(loss=f"{stats.loss:.3f}", img_s=f"{stats.images / max(seconds, 1e-9):,.0f}")

        return on_epoch

    def finish_expert(self, test_accuracy: float) -> None:
        self.experts.update(1)
        self.experts.set_postfix(last_test_acc=f"{test_accuracy:.4f}")


class WorkersProgress:
    """Two tqdm bars for experts trained side by side: experts, and epochs over all of them."""

    def __init__(self, bars: ExitStack, total: int, done: int, epochs: int, to_train: int, workers: int):
        self.epochs = epochs  # an expert's
        self.experts = bars.enter_context(tqdm(total=total, initial=done, desc="experts", unit="expert",
                                               position=0, dynamic_ncols=True))
        self.epoch_bar = bars.enter_context(tqdm(total=epochs * to_train, desc=f"epochs ({workers} experts at a time)",
                                                 unit="epoch", position=1, leave=False, dynamic_ncols=True))
        self.seen: dict[int, int] = {}

    def epoch(self, index: int, done: int, stats: EpochStats, seconds: float) -> None:
        # a resumed expert's first report counts its earlier epochs too
        self.epoch_bar.update(done - self.seen.get(index, 0))
        self.seen[index] = done
        self.epoch_bar.set_postfix(expert=index, loss=f"{stats.loss:.3f}",
                                   img_s=f"{stats.images / max(seconds, 1e-9):,.0f}")

    def finish_expert(self, test_accuracy: float) -> None:
        self.experts.update(1)
        self.experts.set_postfix(last_test_acc=f"{test_accuracy:.4f}")

    def adopted(self, test_accuracy: float) -> None:
        """An expert another process trained: its epochs count as done here too."""
        self.epoch_bar.update(self.epochs)
        self.finish_expert(test_accuracy)
