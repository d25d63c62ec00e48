"""Length-bucketed batches limited by padded audio seconds, and the dataset they index.

A batch costs memory in proportion to (longest clip x clips in it), so batches are cut by
that padded total, not by a fixed count. The order is a pure function of (seed, epoch), so
a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pinchgate.data.audio import load_audio
from pinchgate.data.corpus import Utterance


def bucket_batches(
    durations: list[float],
    max_batch_seconds: float,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    bucket_width: float = 0.5,
) -> list[list[int]]:
    """Indices grouped into batches whose padded length (max x count) stays under the limit.

    Clips of similar length go together (sorted within `bucket_width`-second buckets, ties
    broken at random per epoch); the batch order is shuffled per epoch. A clip longer than
    the limit gets a batch of its own.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(durations)) if shuffle else np.arange(len(durations))
    keys = np.floor(np.asarray(durations, dtype=np.float64)[order] / bucket_width)
    order = order[np.argsort(keys, kind="stable")]
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0.0
    for index in order.tolist():
        length = max(longest, durations[index])
        if current and length * (len(current) + 1) > max_batch_seconds:
            batches.append(current)
            current, length = [], durations[index]
        current.append(index)
        longest = length
    if current:
        batches.append(current)
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class SpeechDataset(torch.utils.data.Dataset):
    """Decoded audio and label ids for each utterance, read lazily.

    ``labels`` turns an utterance into label ids (the model family's tokenizer); without it
    items carry audio only. The padding collator is the family's.
    """

    def __init__(
        self,
        utterances: list[Utterance],
        sample_rate: int,
        labels: Callable[[Utterance], list[int]] | None = None,
    ) -> None:
        self.utterances = utterances
        self.sample_rate = sample_rate
        self.labels = labels

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        utt = self.utterances[index]
        item = {"index": index, "audio": load_audio(utt.audio_path, self.sample_rate)}
        if self.labels is not None:
            item["labels"] = self.labels(utt)
        return item

    @property
    def durations(self) -> list[float]:
        return [u.duration or 0.0 for u in self.utterances]
