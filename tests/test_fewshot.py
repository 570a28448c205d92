"""Few-shot evaluation (--n_per_class, --fewshot_tries): stratified seeded draws from the train split only, mean and
spread over tries, the closing table, and eval_knn / eval_linear --fast end to end against references computed
here from the dumped features."""
from __future__ import annotations

import os
import statistics

import pytest
import torch
from conftest import make_image_folder
from test_eval_knn import SMALL_IMAGES, trained_sparo_run, write_checkpoint
from test_features import SPARO_TINY
from test_knn import brute_force_scores
from test_shifted_sets import wnid_folder

import eval_knn
import eval_linear
from sparo_dino.eval import extraction, feature_cache, fewshot, linear_probe, results_table

LABELS = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 2])  # 5, 6 and 7 images per class


def test_draws_take_n_images_of_every_class_from_the_given_labels_only():
    for n in (1, 2, 5):
        drawn = fewshot.draw_per_class(LABELS, n, seed=0, attempt=0)
        assert drawn.tolist() == sorted(set(drawn.tolist())) and 0 <= drawn.min() and drawn.max() < len(LABELS)
        assert sorted(LABELS[drawn].tolist()) == sorted([0, 1, 2] * n)
    with pytest.raises(ValueError, match="--n_per_class 6: class 'coat' has only 5 training images"):
        fewshot.draw_per_class(LABELS, 6, seed=0, attempt=0, classes=["coat", "bag", "shirt"])


def test_draws_repeat_with_the_seed_and_differ_between_tries_and_seeds():
    again = [fewshot.draw_per_class(LABELS, 2, seed=3, attempt=t).tolist() for t in range(5)]
    assert again == [fewshot.draw_per_class(LABELS, 2, seed=3, attempt=t).tolist() for t in range(5)]
    assert len({tuple(draw) for draw in again}) == 5  # every try its own draw
    assert fewshot.draw_per_class(LABELS, 2, seed=4, attempt=0).tolist() != again[0]


def test_summary_is_the_mean_and_sample_std_over_tries():
    values = [50.0, 62.5, 75.0]
    assert fewshot.summarize(values) == {"mean": statistics.mean(values),
                                         "std": pytest.approx(statistics.stdev(values)), "values": values}
    assert fewshot.summarize([40.0])["std"] is None  # one try measures no spread


def test_run_scores_each_draw_and_summarizes_per_set_and_column():
    seen = []

    def evaluate(n, attempt, indices):
        seen.append((n, attempt, indices.tolist()))
        return {"val": {"k": float(n + attempt)}, "r": {"k": 10.0 * attempt}}

    results = fewshot.run(LABELS, [1, 3], 2, 7, evaluate)
    assert seen == [(n, t, fewshot.draw_per_class(LABELS, n, 7, t).tolist()) for n in (1, 3) for t in (0, 1)]
    assert results["3"]["val"]["k"]["mean"] == 3.5 and results["1"]["r"]["k"]["values"] == [0.0, 10.0]


def test_table_rows_and_text():
    summary = fewshot.summarize([40.0, 60.0])
    rows = results_table.build_rows({"val": (100, 10), "r": (20, 2)}, {"val": {"20-NN": 91.0}, "r": {"20-NN": 55.5}},
                                 {"1": {"val": {"20-NN": summary}, "r": {"20-NN": fewshot.summarize([12.5])}}},
                                 init_full={"val": {"20-NN": 70.0}, "r": {"20-NN": 30.25}})
    assert rows[2] == {"set": "val", "train": "1/class", "images": 100, "classes": 10, "top1": {"20-NN": summary}}
    assert rows[1]["top1"] == {"20-NN": 55.5, "20-NN at init": 30.25}
    assert results_table.format_rows(rows, results_table.title("k-NN", {"tries": 2, "seed": 0})) == [
        "k-NN top-1 (%) on val and the test sets; n/class rows: mean +- std over 2 seeded draws (seed 0):",
        "set  train    images  classes           20-NN  20-NN at init",
        "val  all         100       10           91.00          70.00",
        "r    all          20        2           55.50          30.25",
        "val  1/class     100       10  50.00 +- 14.14              -",  # no few-shot at init was given
        "r    1/class      20        2           12.50              -"]  # one try: no spread


def _count_extractions(monkeypatch) -> list[str]:
    names, real = [], extraction.extract_features

    def counted(*args, **kwargs):
        names.append(kwargs["name"])
        return real(*args, **kwargs)
    monkeypatch.setattr(extraction, "extract_features", counted)
    return names


def test_knn_fewshot_matches_a_brute_force_reference_on_the_drawn_images(tmp_path, monkeypatch, capsys):
    data = wnid_folder(tmp_path / "data", splits=("train", "val"))
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    cache = str(tmp_path / "cache")
    extracted = _count_extractions(monkeypatch)
    results = eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", data, *SMALL_IMAGES, "--nb_knn", "1",
                             "20", "--knn_backend", "torch", "--n_per_class", "1", "3", "--fewshot_tries", "3",
                             "--seed", "5", "--dump_features", cache])
    assert extracted == ["train features", "val features"]  # extracted once, whatever the number of tries
    feats = feature_cache.load_features(cache)
    for n in (1, 3):
        for k in (1, 20):  # k = 20 is clipped to the bank: 4 or 12 images
            top1 = []
            for attempt in range(3):
                drawn = fewshot.draw_per_class(feats.train_labels, n, 5, attempt)
                scores = brute_force_scores(feats.train_features[drawn], feats.train_labels[drawn], feats.val_features,
                                            4, min(k, len(drawn)), 0.07)
                top1.append(100.0 * (scores.argmax(1) == feats.val_labels).double().mean().item())
            summary = results["fewshot"]["n_per_class"][str(n)]["val"][f"{k}-NN"]
            assert summary["values"] == pytest.approx(top1) and summary["mean"] == pytest.approx(statistics.mean(top1))
    assert (results["fewshot"]["tries"], results["fewshot"]["seed"]) == (3, 5)
    assert [row["train"] for row in results["table"]] == ["all", "1/class", "3/class"]
    assert "mean +- std over 3 seeded draws (seed 5):" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--n_per_class draws from the whole train bank in one process"):
        eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", data, "--n_per_class", "1",
                       "--shard_bank", "true"])
    with pytest.raises(ValueError, match="--n_per_class values and --fewshot_tries must be >= 1"):
        eval_knn.main(["--load_features", cache, "--n_per_class", "0"])


def test_linear_fewshot_heads_train_on_drawn_train_features_only(tmp_path, monkeypatch, capsys):
    data = wnid_folder(tmp_path / "data", splits=("train", "val"))
    checkpoint = trained_sparo_run(data, tmp_path / "run")
    cache, out_dir = str(tmp_path / "cache"), tmp_path / "probe"
    trained_on, real_fit = [], linear_probe.fit

    def spied_fit(classifier, train_batches, *args, **kwargs):
        trained_on.append(torch.cat([features for features, _ in train_batches(0)]))
        return real_fit(classifier, train_batches, *args, **kwargs)
    monkeypatch.setattr(linear_probe, "fit", spied_fit)
    extracted = _count_extractions(monkeypatch)
    results = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", data, *SMALL_IMAGES, "--fast",
                                "--epochs", "2", "--lr_grid", "0.1", "30", "--holdout_fraction", "0.25",
                                "--n_per_class", "2", "--fewshot_tries", "2", "--init_baseline",
                                "--dump_features", cache, "--output_dir", str(out_dir)])
    assert extracted == ["train features", "val features"] * 2  # at init, then trained; never per try
    feats = feature_cache.load_features(cache)
    draws = [fewshot.draw_per_class(feats.train_labels, 2, 0, attempt) for attempt in range(2)]
    # spied fits (the lr grid trains in fit_lr_grid): 2 few-shot heads of the trained network, then 2 at init
    assert len(trained_on) == 4
    for features, drawn in zip(trained_on[:2], draws):
        assert sorted(map(tuple, features.tolist())) == sorted(map(tuple, feats.train_features[drawn].tolist()))

    fewshot_results = results["fewshot"]
    assert fewshot_results["lr"] == results["lr_grid"]["chosen_lr"]  # chosen on the train hold-out
    for attempt in range(2):
        head = linear_probe.LinearClassifier(feats.val_features.shape[1], 4)
        state = torch.load(out_dir / eval_linear.FEWSHOT_DIR / f"n2_try{attempt}" / linear_probe.CHECKPOINT_NAME,
                           weights_only=True)
        assert state["run"]["fewshot"] == {"n_per_class": 2, "try": attempt, "seed": 0}
        head.load_state_dict(state["classifier"])
        with torch.no_grad():
            top1 = 100.0 * (head(feats.val_features).argmax(1) == feats.val_labels).double().mean().item()
        assert fewshot_results["n_per_class"]["2"]["val"]["linear"]["values"][attempt] == pytest.approx(top1)
    init_dir = out_dir / eval_linear.INIT_BASELINE_DIR / eval_linear.FEWSHOT_DIR
    assert sorted(os.listdir(init_dir)) == ["n2_try0", "n2_try1"]
    row = results["table"][1]
    assert (row["set"], row["train"]) == ("val", "2/class") and set(row["top1"]) == {"linear", "linear at init"}
    with pytest.raises(ValueError, match="--n_per_class trains few-shot heads on cached centre-crop features"):
        eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", data, "--n_per_class", "1"])


@pytest.mark.parametrize("script, extra", [(eval_knn, ["--nb_knn", "1"]), (eval_linear, ["--fast", "--epochs", "1"])],
                         ids=["eval_knn", "eval_linear"])
def test_a_class_too_small_for_n_per_class_fails_before_any_extraction(tmp_path, monkeypatch, script, extra):
    """Before: the error came after the whole extraction (eval_knn) or the whole probe (eval_linear), with nothing
    written."""
    data = make_image_folder(tmp_path / "data", num_classes=3, per_class=8, splits=("train", "val"))
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    extracted = _count_extractions(monkeypatch)
    with pytest.raises(ValueError, match="--n_per_class 100: class 'class_0' has only 8 training images"):
        script.main(["--pretrained_weights", checkpoint, "--data_path", data, *SMALL_IMAGES, *extra,
                     "--n_per_class", "2", "100", "--output_dir", str(tmp_path / "out")])
    assert extracted == []


def test_a_class_too_small_for_n_per_class_fails_at_once_on_cached_features(tmp_path):
    cache = str(tmp_path / "cache")
    feature_cache.save_features(feature_cache.FeatureSet(
        torch.randn(6, 8), torch.tensor([0, 0, 0, 1, 1, 2]), torch.randn(3, 8), torch.tensor([0, 1, 2]),
        ["a", "b", "c"], {"kind": "sparo_encoding", "options": dict(SPARO_TINY), "tag": "t"}), cache)
    with pytest.raises(ValueError, match="--n_per_class 2: class 'c' has only 1 training images"):
        eval_knn.main(["--load_features", cache, "--nb_knn", "1", "--n_per_class", "2"])
