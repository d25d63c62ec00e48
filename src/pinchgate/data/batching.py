"""Length-bucketed batches limited by padded audio seconds, and the padding collator.

A batch costs memory in proportion to (longest clip x clips in it), so batches are cut by
that padded total, not by a fixed count. The order is a pure function of (seed, epoch), so
a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

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
    """Decoded audio and label ids for each utterance, read lazily."""

    def __init__(
        self,
        utterances: list[Utterance],
        sample_rate: int,
        tokenizer: Wav2Vec2CTCTokenizer | None = None,
    ) -> None:
        self.utterances = utterances
        self.sample_rate = sample_rate
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        utt = self.utterances[index]
        item = {"index": index, "audio": load_audio(utt.audio_path, self.sample_rate)}
        if self.tokenizer is not None:
            item["labels"] = self.tokenizer(utt.transcript).input_ids
        return item

    @property
    def durations(self) -> list[float]:
        return [u.duration or 0.0 for u in self.utterances]


@dataclass
class CTCCollator:
    """Pads audio with the model's feature extractor and labels with -100 (ignored by CTC)."""

    feature_extractor: Wav2Vec2FeatureExtractor

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        features = self.feature_extractor(
            [item["audio"] for item in items],
            sampling_rate=self.feature_extractor.sampling_rate,
            padding=True,
            return_tensors="pt",
        )
        batch = {"input_values": features["input_values"]}
        if "attention_mask" in features:
            batch["attention_mask"] = features["attention_mask"]
        batch["index"] = torch.tensor([item["index"] for item in items])
        if "labels" in items[0]:
            longest = max(len(item["labels"]) for item in items)
            labels = torch.full((len(items), longest), -100, dtype=torch.long)
            for row, item in enumerate(items):
                labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
            batch["labels"] = labels
        return batch
