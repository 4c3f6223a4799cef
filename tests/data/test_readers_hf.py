"""Reading a Hugging Face `datasets` dataset saved to disk (no hub access needed)."""

import pytest

from lmforge.data.readers import ReadStats, iter_documents


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": ["first document", "", "second document"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    stats = ReadStats()
    docs = list(iter_documents(str(tmp_path / "ds"), text_field="content", stats=stats))
    assert [d.text for d in docs] == ["first document", "second document"]
    assert stats.dropped == {"empty": 1}
