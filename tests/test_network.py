"""Opt-in (`pytest -m network`): stream one row of every registered hub split, for the day the suite runs on a
connected machine. Checks that the spec's hub id, config, split names and columns are real and that the row's
image decodes. Skipped cleanly when the hub cannot be reached; excluded from the default run."""

from __future__ import annotations

import pytest

from zeroshot_adapt.data.registry import DATASETS, dataset_names

pytestmark = pytest.mark.network

HUB_SPLITS = [
    (name, split)
    for name in dataset_names()
    if (spec := DATASETS.get(name)).hf_id is not None
    for split in dict.fromkeys(s for s in (spec.train_split, spec.test_split) if s)
]


@pytest.fixture(scope="module")
def hub():
    from zeroshot_adapt.data.sources import hub_offline, hub_reachable

    if hub_offline() or not hub_reachable():
        pytest.skip("the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set)")


@pytest.mark.parametrize(("name", "split"), HUB_SPLITS, ids=[f"{n}/{s}" for n, s in HUB_SPLITS])
def test_one_row_of_every_registered_hub_split_loads(hub, name, split):
    import datasets
    from PIL import Image

    spec = DATASETS.get(name)
    try:
        stream = datasets.load_dataset(spec.hf_id, spec.hf_config, split=split, streaming=True)
        row = next(iter(stream))
    except Exception as error:  # noqa: BLE001 (third-party boundary)
        if spec.gated and any(word in str(error).lower() for word in ("gated", "401", "403", "authenticat")):
            pytest.skip(f"{spec.hf_id} is gated: accept its terms and log in to test it ({error})")
        raise
    assert spec.image_column in row, f"{spec.hf_id}/{split}: no column {spec.image_column!r}; has {sorted(row)}"
    image = row[spec.image_column]
    assert isinstance(image, Image.Image), f"{spec.image_column!r} holds {type(image).__name__}, not an image"
    image.convert("RGB").load()
    if spec.label_column is not None:
        assert spec.label_column in row, f"{spec.hf_id}/{split}: no column {spec.label_column!r}; has {sorted(row)}"
        classes = spec.class_space()
        feature = (stream.features or {}).get(spec.label_column)
        if classes is not None and isinstance(feature, datasets.ClassLabel):
            assert len(feature.names) == len(classes) or classes.map_names(feature.names, what="labels") is not None
