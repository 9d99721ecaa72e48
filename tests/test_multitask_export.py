"""Multi-task models exported: three outputs served within tolerance, the fp16 variant checked
on CTCVR AUC, the warning when a served name changes outputs, conversion-only models refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from export_support import make_run, write_data
from sklearn.metrics import roc_auc_score

from exporters.parity import pairwise_scores
from exporters.pipeline import ExportOptions, export_run
from models.data.batch import BehaviorBatch
from models.training.checkpoint import load_run
from runtime.loader import ScoringRequest, open_model
from runtime.repository import read_manifest

MULTI = ("ctr", "cvr")  # a click task and a conversion task


@pytest.mark.parametrize("name", ["sarn", "fat", "gru"])
def test_multi_task_export_serves_three_outputs_within_tolerance(name: str, tmp_path: Path) -> None:
    behaviour, _ = write_data(tmp_path / "data")
    run = make_run(tmp_path / "run", name, behaviour, tasks=MULTI)
    directory = export_run(run, tmp_path / "repo", ExportOptions(data=behaviour)).directory
    manifest = read_manifest(directory)
    assert manifest["tasks"] == ["ctr", "cvr"]
    names = [o["name"] for o in manifest["outputs"]]
    assert names == ["scores", "conversion_scores", "ctcvr_scores"]
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-5
    session = open_model(directory, providers=["CPUExecutionProvider"])
    feeds = session.encode(
        [
            ScoringRequest(
                "u1",
                [("i1", "c1"), ("i2", "c2")],
                [("i3", "c3"), ("i4", "c4"), ("i9", "c2")],
                {"device": "ios"},
            )
        ]
    )
    graph = dict(
        zip(
            names,
            session.session.run(names, {k: feeds[k] for k in session.input_names}),
            strict=True,
        )
    )
    # The product identity, and the training form's two sigmoids, independently of the graph.
    np.testing.assert_allclose(
        graph["ctcvr_scores"], graph["scores"] * graph["conversion_scores"], atol=1e-7
    )
    model = load_run(run).model
    with torch.no_grad():
        logits = model(
            BehaviorBatch(
                user=torch.from_numpy(feeds["user"][feeds["cand_user_index"]]),
                hist_items=torch.from_numpy(feeds["hist_items"][feeds["cand_user_index"]]),
                hist_cats=torch.from_numpy(feeds["hist_cats"][feeds["cand_user_index"]]),
                items=torch.from_numpy(feeds["cand_items"]),
                cats=torch.from_numpy(feeds["cand_cats"]),
                context=torch.from_numpy(feeds["context"][feeds["cand_user_index"]]),
                label=torch.zeros(3),
            )
        )
    np.testing.assert_allclose(graph["scores"], torch.sigmoid(logits[:, 0]).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        graph["conversion_scores"], torch.sigmoid(logits[:, 1]).numpy(), atol=1e-5
    )
    assert pairwise_scores(model, feeds).shape == (3, 3)


def test_the_fp16_variant_of_a_multi_task_model_is_checked_on_ctcvr_auc_too(
    tmp_path: Path,
) -> None:
    behaviour, _ = write_data(tmp_path / "data")
    run = make_run(tmp_path / "run", "gru", behaviour, tasks=MULTI)
    options = ExportOptions(data=behaviour, fp16=True)
    directory = export_run(run, tmp_path / "repo", options).directory
    variant = read_manifest(directory)["variants"]["fp16"]
    # Independently: one request per row through the fp32 model, sklearn on the product column.
    frame = pd.read_parquet(behaviour)
    fp32 = open_model(directory, providers=["CPUExecutionProvider"])
    ctcvr = [
        fp32.score(
            [
                ScoringRequest(
                    str(row.user_id),
                    list(zip(row.hist_item_ids, row.hist_category_ids, strict=True)),
                    [(str(row.item_id), str(row.category_id))],
                    {"device": str(row.context_device)},
                )
            ]
        )[0][0, 2]
        for row in frame.itertuples()
    ]
    truth = frame["label"] * frame["conversion"]
    assert variant["valid_ctcvr_auc_fp32"] == pytest.approx(roc_auc_score(truth, ctcvr), abs=1e-9)
    assert variant["valid_ctcvr_auc_abs_diff"] <= variant["auc_tolerance"]


def test_exporting_other_tasks_under_a_served_name_warns_what_clients_will_see(
    tmp_path: Path,
) -> None:
    behaviour, _ = write_data(tmp_path / "data")
    repo, options = tmp_path / "repo", ExportOptions(name="ranker", data=behaviour)
    single = make_run(tmp_path / "single", "gru", behaviour)
    multi = make_run(tmp_path / "multi", "gru", behaviour, tasks=MULTI)
    assert export_run(single, repo, options).warnings == []  # a new name: nothing changes
    (warning,) = export_run(multi, repo, options).warnings
    assert (
        "ranker version 2 outputs scores, conversion_scores, ctcvr_scores where version 1 "
        "outputs scores"
    ) in warning
    assert warning.endswith("answers for ranker gain conversion_scores, ctcvr_scores")
    assert export_run(multi, repo, options).warnings == []  # same outputs as version 2
    (warning,) = export_run(single, repo, options).warnings
    assert warning.endswith("answers for ranker lose conversion_scores, ctcvr_scores")
    # a damaged newest version cannot be compared, and must not stop the export replacing it
    (repo / "ranker" / "4" / "manifest.json").write_text("{")
    assert export_run(multi, repo, options).version == 5


def test_a_conversion_only_model_is_not_exported(tmp_path: Path) -> None:
    behaviour, _ = write_data(tmp_path / "data")
    run = make_run(tmp_path / "run", "gru", behaviour, tasks=("cvr",))
    with pytest.raises(ValueError, match="conversion-only model is a baseline"):
        export_run(run, tmp_path / "repo", ExportOptions(data=behaviour))
    assert not (tmp_path / "repo" / "gru").exists()  # refused before anything is left behind
