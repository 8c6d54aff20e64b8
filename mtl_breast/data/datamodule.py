"""Lightning DataModules: unlabeled volumes for MAE pretraining, labeled cases for joint fine-tuning.

Both preprocess their roots into a `CaseCache` once (`prepare_data`, rank 0 only) and then read
only the cache. Training samples come from `data.sampling.EpochSampler`: one shuffled order per epoch shared by
the DDP ranks, each rank its own positions, each sample its own augmentation seed, resumable mid-epoch.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from monai.transforms import CenterSpatialCropd, Compose, SpatialPadd
from torch.utils.data import DataLoader

from mtl_breast.data.build import preprocess_dataset
from mtl_breast.data.cache import CacheError, CaseCache, read_header
from mtl_breast.data.case import DatasetError
from mtl_breast.data.corpus import corpus_cases, read_corpus
from mtl_breast.data.dataset import CachedCaseDataset, collate_cases
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.mamamia import SPLITS, _find, is_mamamia_root, read_splits
from mtl_breast.data.preprocess import PreprocessConfig
from mtl_breast.data.sampling import EpochSampler, ResumableLoader
from mtl_breast.data.transforms import finetune_transforms, pretrain_transforms
from mtl_breast.sizes import to_3tuple

log = logging.getLogger(__name__)
# The default `preprocess` of both data modules: PreprocessConfig is frozen, so one shared instance is safe.
DEFAULT_PREPROCESS = PreprocessConfig()


def default_cache_dir(root: str | Path, others: Sequence[str | Path] = ()) -> Path:
    """`./cache/<root folder name>`: outside the dataset, which may be read-only.

    When the working directory is inside `root` (or inside one of `others`, the further roots of a
    combined pool), `./cache` would be written into the dataset; `~/.cache/mtl_breast/<root name>` is
    used instead.
    """
    name = Path(root).resolve().name
    local = Path("cache") / name
    where = local.resolve()
    if any(where.is_relative_to(Path(r).resolve()) for r in (root, *others)):
        return Path.home() / ".cache" / "mtl_breast" / name
    return local


class _CachedDataModule(L.LightningDataModule):
    """Shared part: preprocessing config, cache, loader settings."""

    def __init__(self, roots: Sequence[str], cache_dir: str | None, preprocess: PreprocessConfig, batch_size: int,
                 num_workers: int, preprocess_workers: int):
        super().__init__()
        if not roots:
            raise DatasetError("no data root given (--data.root DIR, or --data.corpus FILE for pretraining)")
        self.roots = [Path(r) for r in roots]
        for r in self.roots:
            if not r.is_dir():
                raise FileNotFoundError(f"data root {r} does not exist or is not a folder")
        if not isinstance(preprocess, PreprocessConfig):
            raise TypeError(f"preprocess must be a PreprocessConfig, got {type(preprocess).__name__}")
        self.preprocess_config = preprocess
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir(self.roots[0], self.roots[1:])
        self.cache = CaseCache(self.cache_root, self.preprocess_config)
        self.batch_size, self.num_workers, self.preprocess_workers = batch_size, num_workers, preprocess_workers

    def cases(self, skipped: list[dict[str, str]] | None = None) -> list:
        """All cases of all roots (ids made unique across roots by the reader).

        Args:
            skipped: cases that cannot be read are appended here as {"patient_id", "reason"}; they are
                left out of the result instead of raising. A fresh list is used (and dropped) when None.
        """
        skipped = [] if skipped is None else skipped
        return read_dataset(self.roots if len(self.roots) > 1 else self.roots[0], skipped=skipped)

    def prepare_data(self) -> None:
        unreadable: list[dict[str, str]] = []
        cases = self.cases(unreadable)
        report = preprocess_dataset(self.roots[0], self.cache_root, self.preprocess_config,
                                    workers=self.preprocess_workers, cases=cases, progress=False)
        for item in unreadable + report["skipped"]:
            log.warning("skipped case %s: %s", item["patient_id"], item["reason"])

    def _cached(self, patient_ids: Sequence[str]) -> list[str]:
        # Cases that failed preprocessing are absent from the cache; they were reported in prepare_data.
        return [pid for pid in patient_ids if self.cache.has(pid)]

    def _train_loader(self, dataset: CachedCaseDataset) -> ResumableLoader:
        """Shuffled samples, each augmented from its own seed (`data.sampling`): resumable mid-epoch, the same
        for any number of workers, one share per DDP rank."""
        trainer = getattr(self, "trainer", None)
        # One seed for every rank (the order is shared) that a restarted run finds again: the seed the torch
        # generator was seeded with (`seed_everything`), rank 0's. Not a draw: the generator's state on a restart
        # differs from the original run's at this point.
        seed = torch.initial_seed()
        rank, world_size = 0, 1
        if trainer is not None:
            seed = int(trainer.strategy.broadcast(seed, src=0))
            rank, world_size = trainer.global_rank, trainer.world_size
        sampler = EpochSampler(len(dataset), seed, shuffle=True, rank=rank, world_size=world_size)
        return ResumableLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                               collate_fn=collate_cases, persistent_workers=self.num_workers > 0, pin_memory=False,
                               position=None if trainer is None else self._position)

    def _position(self) -> tuple[int, int | None]:
        """(epoch, its training batches already done or None once it is complete), for `ResumableLoader`."""
        trainer = self.trainer
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return trainer.current_epoch, None if done >= trainer.num_training_batches else done

    def _loader(self, dataset: CachedCaseDataset, batch_size: int | None = None) -> DataLoader:
        """Validation and test: the dataset in order (random crops, if any, come from the transform's own seed)."""
        # Its own generator: making an iterator draws a worker seed, which must not come from (and move) the
        # training stream; a run resumed after a validation then draws what the uninterrupted run drew.
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_cases,
                          persistent_workers=self.num_workers > 0, pin_memory=False,
                          generator=torch.Generator().manual_seed(0))


def split_train_val(patient_ids: Sequence[str], labels: Sequence[float], val_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
    """Random split stratified by pCR (1 / 0 / unknown), at least one validation case per stratum with 2+ cases."""
    rng = random.Random(seed)
    strata: dict[str, list[str]] = {}
    for pid, y in zip(patient_ids, labels, strict=True):
        strata.setdefault("nan" if math.isnan(y) else str(int(y)), []).append(pid)
    train, val = [], []
    for key in sorted(strata):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        n_val = 0 if len(ids) < 2 or val_fraction <= 0 else max(1, round(len(ids) * val_fraction))
        val += ids[:n_val]
        train += ids[n_val:]
    return sorted(train), sorted(val)


class FinetuneDataModule(_CachedDataModule):
    """Labeled cases (MAMA-MIA layout) for joint segmentation + pCR training.

    The `train_split` of `train_test_splits.csv` is divided into training and validation
    (stratified by pCR); the `test_split` is the held-out test set. Without a split file all cases
    are used for training/validation.

    Args:
        root: MAMA-MIA dataset root.
        cache_dir: preprocessed-case cache (default ./cache/<root name>, see `default_cache_dir`).
        preprocess: spacing, orientation, breast crop and margin, intensity clip and cache dtype (in YAML a
            mapping, ``preprocess: {spacing: [1, 1, 2]}``); the cache folder is named by its `key()`.
        crop_size: training crop (D, H, W); must be divisible by the model's patch size.
        batch_size: training batch size (validation and test run one full case at a time).
        num_workers: DataLoader worker processes.
        val_fraction: share of the training split held out for validation.
        split_seed: seed of the train/validation split.
        pos_fraction: share of crops centred on the tumour (the pCR loss is computed on those).
        intensity_jitter: range of the intensity gain shared by all phases of a case.
        phase_jitter: range of an extra gain per phase (off by default: it changes the enhancement).
        phase_dropout: probability of hiding one post-contrast phase in a training sample.
        repeats: crops drawn per training case per epoch.
        preprocess_workers: processes for the one-off preprocessing.
    """

    def __init__(self, root: str, cache_dir: str | None = None, preprocess: PreprocessConfig = DEFAULT_PREPROCESS,
                 crop_size: int | Sequence[int] = 64, batch_size: int = 2, num_workers: int = 0,
                 val_fraction: float = 0.2, split_seed: int = 0, pos_fraction: float = 0.67,
                 intensity_jitter: float = 0.1, phase_jitter: float = 0.0, phase_dropout: float = 0.0,
                 repeats: int = 1, preprocess_workers: int = 1):
        super().__init__([root], cache_dir, preprocess, batch_size, num_workers, preprocess_workers)
        self.root = Path(root)
        self.crop_size = to_3tuple(crop_size, name="crop_size")
        self.val_fraction, self.split_seed, self.repeats = val_fraction, split_seed, repeats
        self.train_transform = finetune_transforms(self.crop_size, pos_fraction=pos_fraction,
                                                   intensity_jitter=intensity_jitter, phase_jitter=phase_jitter,
                                                   phase_dropout=phase_dropout)
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []
        self.test_ids: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        cached = self._cached(self.cache.patient_ids())
        by_lower = {pid.lower(): pid for pid in cached}
        if is_mamamia_root(self.root) and _find(self.root, SPLITS) is not None:
            splits = read_splits(self.root)
            train_pool = [by_lower[p.lower()] for p in splits["train"] if p.lower() in by_lower]
            self.test_ids = [by_lower[p.lower()] for p in splits["test"] if p.lower() in by_lower]
        else:
            # The cases of this root only: the cache folder may also hold cases of another dataset.
            train_pool = self._cached(sorted({c.patient_id for c in self.cases()}))
            self.test_ids = []
        # Segmentation needs the expert mask; a case without one would stop training at its first batch.
        unlabeled = [pid for pid in train_pool if not self._has_label(pid)]
        if unlabeled:
            log.warning("%d case(s) without an expert mask left out of training and validation: %s",
                        len(unlabeled), ", ".join(unlabeled))
            train_pool = [pid for pid in train_pool if pid not in unlabeled]
        labels = [self._pcr(pid) for pid in train_pool]
        self.train_ids, self.val_ids = split_train_val(train_pool, labels, self.val_fraction, self.split_seed)
        if not self.train_ids:
            raise RuntimeError(f"no training cases found in {self.root} (cache {self.cache.dir})")
        if stage in (None, "fit") and not any(y in (0.0, 1.0) for y in labels):
            # The joint model trains a pCR head: without a single label its loss has nothing to learn from.
            raise DatasetError(f"{self.root}: none of the {len(train_pool)} training case(s) has a pCR label (0 or 1) "
                               "in the clinical spreadsheet or patient JSON files; fine-tuning trains the pCR head and "
                               "needs labelled cases (unknown pCR is left out of the loss, never counted as 0)")

    def _has_label(self, pid: str) -> bool:
        try:
            return "label" in read_header(self.cache.path(pid))
        except CacheError:
            return False

    def _pcr(self, pid: str) -> float:
        pcr = self.cache.read_info(pid).get("pcr")
        return math.nan if pcr is None else float(pcr)

    def train_pcr_counts(self) -> tuple[int, int]:
        """(positives, negatives) among labeled training cases, for class-balanced pCR loss."""
        labels = [self._pcr(pid) for pid in self.train_ids]
        return sum(y == 1 for y in labels), sum(y == 0 for y in labels)

    def train_dataloader(self) -> DataLoader:
        ds = CachedCaseDataset(self.cache, self.train_ids, self.train_transform, with_label=True, repeats=self.repeats)
        return self._train_loader(ds)

    def val_dataloader(self) -> DataLoader:
        # Whole cases, one at a time: the module runs sliding-window inference over them.
        return self._loader(CachedCaseDataset(self.cache, self.val_ids, with_label=True), batch_size=1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(CachedCaseDataset(self.cache, self.test_ids, with_label=True), batch_size=1)


class PretrainDataModule(_CachedDataModule):
    """Unlabeled DCE-MRI series for MAE pretraining: one or more roots (MAMA-MIA or case folders).

    Args:
        root: a dataset root, or a list of roots combined into one pool.
        cache_dir: preprocessed-case cache (default ./cache/<first root name>).
        preprocess: preprocessing (see FinetuneDataModule).
        crop_size: random crop (D, H, W), divisible by the patch size.
        batch_size: volumes per step.
        num_workers: DataLoader worker processes.
        val_fraction: share of cases held out for the validation loss and reconstruction images.
        split_seed: seed of that split.
        intensity_jitter: range of the intensity gain shared by all phases of a case.
        phase_jitter: range of an extra gain per phase (off by default).
        include_test: also pretrain on the `test_split` of a root's train_test_splits.csv (off: test cases
            must stay unseen by every stage that is later scored on them).
        corpus: a corpus file (`mtl-breast corpus build`) instead of `root`: its cases, each patient once and the
            evaluation patients already left out, read from the roots it lists; its counts go to the model card.
        repeats: crops drawn per case per epoch.
        preprocess_workers: processes for the one-off preprocessing.
    """

    def __init__(self, root: str | list[str] | None = None, cache_dir: str | None = None,
                 preprocess: PreprocessConfig = DEFAULT_PREPROCESS, crop_size: int | Sequence[int] = 64,
                 batch_size: int = 2, num_workers: int = 0, val_fraction: float = 0.1, split_seed: int = 0,
                 intensity_jitter: float = 0.1, phase_jitter: float = 0.0, include_test: bool = False,
                 repeats: int = 1, preprocess_workers: int = 1, corpus: str | None = None):
        self.corpus = None
        if corpus is not None:
            if root is not None:
                raise DatasetError("give --data.root or --data.corpus, not both (a corpus lists its roots)")
            self.corpus = read_corpus(corpus)
            root = list(dict.fromkeys(c["root"] for c in self.corpus["cases"]))
        roots = [] if root is None else [root] if isinstance(root, str | Path) else list(root)
        if self.corpus is None and len(roots) > 1:
            log.warning("pooling %d roots without matching their patients: a patient held by two collections is "
                        "seen twice, and another root's copy of an evaluation patient is not left out; "
                        "`mtl-breast corpus build` matches them (--data.corpus)", len(roots))
        super().__init__(roots, cache_dir, preprocess, batch_size, num_workers, preprocess_workers)
        self.crop_size = to_3tuple(crop_size, name="crop_size")
        self.val_fraction, self.split_seed, self.repeats = val_fraction, split_seed, repeats
        self.include_test = include_test
        self.train_transform = pretrain_transforms(self.crop_size, intensity_jitter=intensity_jitter,
                                                   phase_jitter=phase_jitter)
        # Validation uses the central crop so the loss and the images are comparable across epochs.
        self.val_transform = Compose([SpatialPadd(keys="image", spatial_size=self.crop_size),
                                      CenterSpatialCropd(keys="image", roi_size=self.crop_size)])
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []

    def cases(self, skipped: list[dict[str, str]] | None = None) -> list:
        """The cases of all roots, less the test split of every root that has a split file (unless include_test)."""
        if self.corpus is not None:  # the corpus has matched patients and left out the evaluation splits
            return corpus_cases(self.corpus, skipped=[] if skipped is None else skipped)
        cases = super().cases(skipped)
        if self.include_test:
            return cases
        test = {r.resolve(): {p.lower() for p in read_splits(r)["test"]} for r in self.roots
                if is_mamamia_root(r) and _find(r, SPLITS) is not None}

        def in_test(case) -> bool:
            folder = Path(case.image_paths[0]).resolve().parent  # images/<PID>/<pid>_0000.nii.gz
            return any(folder.is_relative_to(root) and folder.name.lower() in ids for root, ids in test.items())

        kept = [c for c in cases if not in_test(c)]
        if len(kept) < len(cases):
            log.info("pretraining leaves out %d test-split case(s) (data.include_test=true to use them)",
                     len(cases) - len(kept))
        return kept

    def setup(self, stage: str | None = None) -> None:
        ids = self._cached(sorted({c.patient_id for c in self.cases()}))
        if not ids:
            raise RuntimeError(f"no cases found in {[str(r) for r in self.roots]} (cache {self.cache.dir})")
        self.train_ids, self.val_ids = split_train_val(ids, [math.nan] * len(ids), self.val_fraction, self.split_seed)

    def train_dataloader(self) -> DataLoader:
        ds = CachedCaseDataset(self.cache, self.train_ids, self.train_transform, repeats=self.repeats)
        return self._train_loader(ds)

    def val_dataloader(self) -> DataLoader:
        return self._loader(CachedCaseDataset(self.cache, self.val_ids, self.val_transform))
