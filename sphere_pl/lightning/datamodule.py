"""Edit data as a LightningDataModule: edit batches in a fixed, seeded order.

Training batches are `EditBatch`es of `num_edits` requests. Validation and test batches
are lists of requests to evaluate: the edit set (validate; and at the end of `fit`) and a
held-out set of never-edited facts (test). Every record is read and validated in `setup`,
so bad data stops the run before the first edit.
"""

from __future__ import annotations

import random

import lightning as L

from ..errors import SettingsError
from ..data.readers import NAMED_SOURCES, QUICKSTART, ZSRE_TARGETS, load_edit_requests
from ..data.records import EditBatch, EditRequest


class EditBatchLoader:
    """Iterable of edit batches that can resume mid-run.

    Lightning checkpoints `state_dict()` and restores it before iterating again, so a
    resumed run starts at the first batch that was not applied. The editor marks a batch
    completed once its edit is in the model (prefetching makes "yielded" the wrong measure).
    """

    def __init__(self, batches: list[EditBatch]):
        self.batches = batches
        self.start = 0
        self.completed = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        yield from self.batches[self.start :]

    def mark_completed(self, batch: EditBatch) -> None:
        self.completed = batch.index + 1

    def state_dict(self) -> dict:
        return {"completed": self.completed}

    def load_state_dict(self, state: dict) -> None:
        self.start = self.completed = int(state["completed"])


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class RequestChunks:
    """Evaluation batches (lists of requests). Not a plain list: Lightning would read a list
    of lists as several dataloaders."""

    def __init__(self, requests: list[EditRequest], size: int):
        self.chunks = _chunks(requests, size)

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        yield from self.chunks


class EditDataModule(L.LightningDataModule):
    """Args:
    source: "quickstart" (the project's offline edit set), "counterfact" / "multi_counterfact"
        (the canonical remote files, downloaded once into `cache_dir`), a local JSON/JSONL
        path, or any URL.
    schema: "auto", "counterfact" (full / multi-CounterFact), "mend_counterfact" (flat), "zsre" (MEND) or
        "knowedit" (EasyEdit's KnowEdit ZsRE and WikiData_counterfact files).
    on_bad_record: "fatal" stops at a malformed record; "skip" leaves it out with a warning naming it.
    zsre_target: what a ZsRE edit teaches: "answer" (answers[0], as the paper's code) or "alt"
        (the MEND alternative, as MEND and EasyEdit).
    dataset_size_limit: edit only the first N records (None: all but the held-out ones).
    num_edits: requests per edit batch.
    num_holdout: never-edited records, for specificity checks: taken right after the edit set,
        or from `holdout_start` on.
    holdout_start: where the held-out records start in the file (negative: from its end, e.g. -200
        for the last 200); they must not overlap the edit set. None: right after the edit set.
    shuffle: order the edit set by a seeded permutation (`seed`); False keeps file order.
    eval_requests_per_batch: requests per evaluation (validate / test) batch.
    """

    def __init__(
        self,
        source: str = QUICKSTART,
        schema: str = "auto",
        on_bad_record: str = "fatal",
        zsre_target: str = "answer",
        dataset_size_limit: int | None = None,
        num_edits: int = 10,
        num_holdout: int = 10,
        holdout_start: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        eval_requests_per_batch: int = 16,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if num_edits < 1:
            raise SettingsError(f"num_edits must be at least 1, got {num_edits}")
        self.source = NAMED_SOURCES.get(source, source)
        self.schema = schema
        if on_bad_record not in ("fatal", "skip"):
            raise SettingsError(f"data.on_bad_record must be 'fatal' or 'skip', got {on_bad_record!r}")
        self.on_bad_record = on_bad_record
        if zsre_target not in ZSRE_TARGETS:
            raise SettingsError(f"data.zsre_target must be one of {sorted(ZSRE_TARGETS)} (what a ZsRE edit teaches), got {zsre_target!r}")
        self.zsre_target = zsre_target
        self.dataset_size_limit = dataset_size_limit
        self.num_edits = num_edits
        self.num_holdout = num_holdout
        self.holdout_start = holdout_start
        self.shuffle = shuffle
        self.seed = seed
        self.eval_requests_per_batch = eval_requests_per_batch
        self.cache_dir = cache_dir
        self.edit_requests: list[EditRequest] = []
        self.holdout_requests: list[EditRequest] = []
        self._train_loader: EditBatchLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.edit_requests:
            return
        records = load_edit_requests(self.source, schema=self.schema, cache_dir=self.cache_dir, on_bad_record=self.on_bad_record,
                                     zsre_target=self.zsre_target)
        n_edit = len(records) - self.num_holdout if self.dataset_size_limit is None else self.dataset_size_limit
        if n_edit < 1 or n_edit > len(records):
            raise SettingsError(
                f"{self.source} has {len(records)} records: cannot edit {n_edit} of them"
                f" and keep {self.num_holdout} held out"
            )
        edit = records[:n_edit]
        if self.shuffle:
            edit = random.Random(self.seed).sample(edit, len(edit))
        start = n_edit if self.holdout_start is None else self.holdout_start % len(records) if self.holdout_start < 0 else self.holdout_start
        if start < n_edit and self.num_holdout:
            raise SettingsError(f"data.holdout_start = {self.holdout_start} puts held-out records among the {n_edit} edited ones of {self.source}")
        self.edit_requests = edit
        self.holdout_requests = records[start : start + self.num_holdout]

    @property
    def edit_batches(self) -> list[EditBatch]:
        return [EditBatch(i, reqs) for i, reqs in enumerate(_chunks(self.edit_requests, self.num_edits))]

    def edited_requests(self, batches_done: int) -> list[EditRequest]:
        """The facts of the first `batches_done` edit batches, in the order they were edited."""
        return self.edit_requests[: batches_done * self.num_edits]

    def train_dataloader(self) -> EditBatchLoader:
        if self._train_loader is None:
            self._train_loader = EditBatchLoader(self.edit_batches)
        return self._train_loader

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # requests are text; tokens are made on the model's device when needed

    def val_dataloader(self) -> RequestChunks:
        return RequestChunks(self._shard(self.edit_requests), self.eval_requests_per_batch)

    def test_dataloader(self) -> RequestChunks:
        return RequestChunks(self._shard(self.holdout_requests), self.eval_requests_per_batch)

    def _shard(self, requests: list[EditRequest]) -> list[EditRequest]:
        """This process's share of the evaluation records under DDP (every world_size-th one);
        the metrics' states are summed across processes when computed. Edits are never sharded."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return requests
        return requests[trainer.global_rank :: trainer.world_size]
