"""EditDataModule: named sources, seeded order, held-out facts, resumable batches."""

from __future__ import annotations

import json
import random

import pytest

from sphere_pl.data.readers import COUNTERFACT_URL, MULTI_COUNTERFACT_URL, load_edit_requests
from sphere_pl.data.readers import QUICKSTART_PATH
from sphere_pl.lightning.datamodule import EditBatchLoader, EditDataModule


def test_named_sources_resolve_to_the_quickstart_file_and_canonical_urls():
    assert EditDataModule("quickstart").source == str(QUICKSTART_PATH)
    assert EditDataModule("counterfact").source == COUNTERFACT_URL
    assert EditDataModule("multi_counterfact").source == MULTI_COUNTERFACT_URL
    assert EditDataModule("/some/file.json").source == "/some/file.json"


def test_edit_order_is_a_seeded_permutation_of_the_first_records_and_holdout_follows():
    data = EditDataModule("quickstart", dataset_size_limit=12, num_holdout=5, num_edits=5, seed=3)
    data.setup("fit")
    records = load_edit_requests(str(QUICKSTART_PATH))
    expected = random.Random(3).sample(records[:12], 12)
    assert [r.case_id for r in data.edit_requests] == [r.case_id for r in expected]
    assert [r.case_id for r in data.holdout_requests] == [r.case_id for r in records[12:17]]
    assert [len(b) for b in data.edit_batches] == [5, 5, 2]
    assert [b.index for b in data.edit_batches] == [0, 1, 2]

    again = EditDataModule("quickstart", dataset_size_limit=12, num_holdout=5, num_edits=5, seed=3)
    again.setup("fit")
    assert [r.case_id for r in again.edit_requests] == [r.case_id for r in data.edit_requests]
    other_seed = EditDataModule("quickstart", dataset_size_limit=12, num_holdout=5, num_edits=5, seed=4)
    other_seed.setup("fit")
    assert [r.case_id for r in other_seed.edit_requests] != [r.case_id for r in data.edit_requests]


def test_file_order_without_shuffle_and_too_few_records(tmp_path):
    data = EditDataModule("quickstart", dataset_size_limit=6, num_holdout=2, shuffle=False)
    data.setup("fit")
    raw = json.loads(QUICKSTART_PATH.read_text())
    assert [r.case_id for r in data.edit_requests] == [r["case_id"] for r in raw[:6]]
    with pytest.raises(ValueError, match="cannot edit"):
        EditDataModule("quickstart", dataset_size_limit=len(raw) + 1).setup("fit")


def test_batch_loader_resumes_after_the_last_completed_batch():
    data = EditDataModule("quickstart", dataset_size_limit=9, num_holdout=0, num_edits=3)
    data.setup("fit")
    loader = data.train_dataloader()
    first = next(iter(loader))
    loader.mark_completed(first)
    state = loader.state_dict()

    resumed = EditBatchLoader(data.edit_batches)
    resumed.load_state_dict(state)
    assert len(resumed) == 3  # Lightning counts the whole epoch; the loader yields the rest
    assert [b.index for b in resumed] == [1, 2]
