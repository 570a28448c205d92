"""Shifted test sets (--test_sets): NAME=PATH parsing, class folders mapped to training classes (WordNet ids, or
ImageNet-V2's integer folders), predictions restricted to the classes a set holds, one-line errors, and both
evaluations end to end against references computed here from dumped features."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_image_folder
from test_eval_knn import REPO, SMALL_IMAGES, write_checkpoint
from test_features import SPARO_TINY
from test_knn import brute_force_scores

import eval_knn
import eval_linear
from sparo_dino.data import augmentation
from sparo_dino.eval import feature_cache, linear_probe, shifted_sets

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def wnid_folder(root, splits=None, per_class=8, seed=0, drop=()) -> str:
    """make_image_folder with ImageNet-style class folders (WNIDS), minus the classes listed in `drop`."""
    make_image_folder(root, num_classes=len(WNIDS), per_class=per_class, splits=splits, seed=seed)
    for base in ([os.path.join(root, split) for split in splits] if splits else [str(root)]):
        for label, wnid in enumerate(WNIDS):
            source = os.path.join(base, f"class_{label}")
            shutil.rmtree(source) if wnid in drop else os.rename(source, os.path.join(base, wnid))
    return str(root)


@pytest.mark.parametrize("entry, message", [
    ("imagenet_r", "is not NAME=PATH"), ("=/data", "is not NAME=PATH"), ("r=", "is not NAME=PATH"),
    ("image net=/data", "is not NAME=PATH"), ("val={tmp}", "is the val split's"), ("train={tmp}", "the train split's"),
    ("sketch={tmp}/missing", "--test_sets sketch: folder {tmp}/missing does not exist")])
def test_malformed_entries_are_one_line_errors(entry, message, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=message.format(tmp=tmp_path).replace("\\", "\\\\")):
        shifted_sets.parse_specs([entry.format(tmp=tmp_path)])


def test_entries_parse_in_order_and_a_name_given_twice_is_an_error(tmp_path):
    (tmp_path / "a=b").mkdir()  # a path may hold "=": the name ends at the first one
    specs = shifted_sets.parse_specs([f"imagenet_v2={tmp_path}", f"im-a.2={tmp_path}/a=b"])
    assert [(spec.name, spec.path) for spec in specs] == [("imagenet_v2", str(tmp_path)), ("im-a.2", f"{tmp_path}/a=b")]
    assert shifted_sets.parse_specs(None) == []
    with pytest.raises(ValueError, match="--test_sets names 'r' twice"):
        shifted_sets.parse_specs([f"r={tmp_path}", f"r={tmp_path}"])


def test_class_folders_map_to_training_classes_by_name_then_as_integer_indices():
    train = ["n1", "n2", "n3", "n4"]
    assert shifted_sets.class_indices(["n2", "n4"], train, "r") == [1, 3]  # ImageNet-R: a subset, by name
    assert shifted_sets.class_indices(["0", "1", "10", "2"], [f"n{i:02d}" for i in range(11)], "v2") == [0, 1, 10, 2]
    # a training set whose own folders are integers is matched by name: ImageFolder sorted "10" before "2" there too
    integer_train = sorted(str(i) for i in range(11))
    assert shifted_sets.class_indices(["10", "2"], integer_train, "t") == [integer_train.index("10"),
                                                                            integer_train.index("2")]
    with pytest.raises(ValueError, match=r"test set r: class folder 'n9' is not a class of the training set "
                                         r"\(1 of its 2 folders"):
        shifted_sets.class_indices(["n1", "n9"], train, "r")
    with pytest.raises(ValueError, match="test set v2: class folder 4 is read as a class index .* has 4 classes"):
        shifted_sets.class_indices(["0", "4"], train, "v2")


def test_built_set_labels_images_with_training_classes_and_knows_which_it_holds(tmp_path):
    transform = augmentation.eval_transform(32, 32)
    shifted = wnid_folder(tmp_path / "r", per_class=2, drop=(WNIDS[0], WNIDS[2]))
    (built,) = shifted_sets.build(shifted_sets.parse_specs([f"r={shifted}"]), WNIDS, transform)
    assert [built.dataset[i][1] for i in range(len(built.dataset))] == [1, 1, 3, 3]
    assert built.present.tolist() == [1, 3]
    assert built.dataset[0][0].shape == (3, 32, 32)

    v2 = tmp_path / "v2"  # ImageNet-V2's release: folders named by class index
    for index in (3, 0):
        shutil.copytree(os.path.join(shifted, WNIDS[1]), v2 / str(index))
    (built,) = shifted_sets.build(shifted_sets.parse_specs([f"v2={v2}"]), WNIDS, transform)
    assert sorted(built.dataset[i][1] for i in range(len(built.dataset))) == [0, 0, 3, 3]
    full = wnid_folder(tmp_path / "full", per_class=1)
    assert shifted_sets.build(shifted_sets.parse_specs([f"all={full}"]), WNIDS, transform)[0].present is None


def _reference_predictions(scores, present):
    """Independent reference: the best-scoring class among `present`, by a plain loop."""
    return [max(present, key=lambda c: row[c]) for row in scores.tolist()]


def test_restriction_predicts_among_present_classes_only():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.0, 0.3, 0.0, 0.2], [0.7, 0.0, 0.0, 0.0]])
    present = [0, 2, 3]
    restricted = shifted_sets.restrict(scores, torch.tensor(present))
    assert scores.argmax(1).tolist() == [1, 1, 0]  # unrestricted: class 1, absent from the set, wins twice
    assert restricted.argmax(1).tolist() == _reference_predictions(scores, present) == [2, 3, 0]
    assert torch.equal(restricted[:, present], scores[:, present]) and torch.isinf(restricted[:, 1]).all()
    assert shifted_sets.restrict(scores, None) is scores


def test_restricted_head_scores_a_probe_among_present_classes_with_a_finite_loss():
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]]))  # class 2 dominates every input
    features, labels = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    batches = [(features, labels)]
    plain = linear_probe.evaluate(head, batches, lambda x: x, 3, torch.device("cpu"), reduce=False)
    restricted = linear_probe.evaluate(shifted_sets.RestrictedHead(head, torch.tensor([0, 1])), batches, lambda x: x, 3,
                                       torch.device("cpu"), reduce=False)
    assert plain["top1"] == 0.0 and restricted["top1"] == 100.0
    assert torch.isfinite(torch.tensor(restricted["loss"]))


@pytest.fixture
def shifted_run(tmp_path):
    """A wnid train/val tree, a tiny SPARO checkpoint and two test sets: val as it is, and a 3-class set whose
    WNIDS[3] folder holds val's WNIDS[1] images (an absent class's look): an unrestricted prediction of those images
    is the absent class, always wrong; among the present classes it is scored as the set labels it."""
    data = wnid_folder(tmp_path / "data", splits=("train", "val"))
    subset = tmp_path / "subset"
    shutil.copytree(os.path.join(data, "val"), subset)
    shutil.rmtree(subset / WNIDS[3])
    os.rename(subset / WNIDS[1], subset / WNIDS[3])
    return data, str(subset), os.path.join(data, "val"), write_checkpoint(tmp_path / "run", SPARO_TINY)


def _subset_reference(val_features, val_labels, scores_of) -> tuple[float, float]:
    """(restricted, unrestricted) top-1 on the fixture's 3-class set, from val's features: scores_of(features)."""
    keep = val_labels != 3
    labels = torch.where(val_labels[keep] == 1, 3, val_labels[keep]).tolist()
    scores = scores_of(val_features[keep])
    restricted = _reference_predictions(scores, [0, 2, 3])
    unrestricted = _reference_predictions(scores, [0, 1, 2, 3])
    return tuple(100.0 * sum(p == y for p, y in zip(predicted, labels)) / len(labels)
                 for predicted in (restricted, unrestricted))


def test_knn_searches_the_same_bank_with_each_test_set(shifted_run, tmp_path, capsys):
    data, subset, full, checkpoint = shifted_run
    cache = str(tmp_path / "cache")
    results = eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", data, *SMALL_IMAGES, "--nb_knn", "20",
                             "--knn_backend", "torch", "--dump_features", cache,
                             "--test_sets", f"minus1={subset}", f"same={full}"])
    out = capsys.readouterr().out
    assert results["test_sets"]["same"]["knn"] == results["knn"]  # every class present: nothing changes
    assert results["test_sets"]["same"]["restricted"] is False

    feats = feature_cache.load_features(cache)  # train and val only: test sets are never cached
    expected, unrestricted = _subset_reference(feats.val_features, feats.val_labels, lambda queries: brute_force_scores(
        feats.train_features, feats.train_labels, queries, 4, 20, 0.07))
    assert expected > unrestricted  # the restriction is what this set measures
    minus1 = results["test_sets"]["minus1"]
    assert minus1["knn"]["20"]["top1"] == pytest.approx(expected)
    assert (minus1["num_test"], minus1["num_classes"], minus1["restricted"]) == (24, 3, True)
    assert [(row["set"], row["train"], row["images"], row["classes"]) for row in results["table"]] == [
        ("val", "all", 32, 4), ("minus1", "all", 24, 3), ("same", "all", 32, 4)]
    assert f"minus1  all        24        3  {expected:5.2f}" in out


def test_a_test_set_with_a_class_the_training_set_lacks_ends_with_one_line(shifted_run, tmp_path):
    data, subset, _, checkpoint = shifted_run
    os.rename(os.path.join(subset, WNIDS[2]), os.path.join(subset, "n99999999"))  # a folder no training class has
    result = subprocess.run([sys.executable, "eval_knn.py", "--pretrained_weights", checkpoint, "--data_path", data,
                             *SMALL_IMAGES, "--test_sets", f"imagenet_r={subset}"],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: test set imagenet_r: class folder 'n99999999' is not a class of the training set (1 of its 3 folders "
        "are not; training classes look like 'n01440764')"]
    with pytest.raises(ValueError, match="--test_sets extracts the test sets' features with --pretrained_weights"):
        eval_knn.main(["--load_features", str(tmp_path), "--test_sets", f"r={subset}"])


def test_linear_probe_evaluates_its_final_head_on_each_test_set(shifted_run, tmp_path, capsys):
    data, subset, full, checkpoint = shifted_run
    cache, out_dir = str(tmp_path / "cache"), tmp_path / "probe"
    probe = ["--data_path", data, *SMALL_IMAGES, "--epochs", "3", "--test_sets", f"minus1={subset}", f"same={full}",
             "--output_dir", str(out_dir)]
    results = eval_linear.main(["--pretrained_weights", checkpoint, *probe, "--fast", "--lr_grid", "0.1", "30",
                                "--holdout_fraction", "0.25", "--dump_features", cache])
    assert results["test_sets"]["same"]["top1"] == pytest.approx(results["final"]["top1"])

    feats = feature_cache.load_features(cache)
    head = linear_probe.LinearClassifier(feats.val_features.shape[1], 4)
    head.load_state_dict(torch.load(out_dir / linear_probe.CHECKPOINT_NAME, weights_only=True)["classifier"])
    with torch.no_grad():
        expected, unrestricted = _subset_reference(feats.val_features, feats.val_labels, head)
    assert expected > unrestricted
    assert results["test_sets"]["minus1"]["top1"] == pytest.approx(expected)
    assert [row["top1"]["linear"] for row in results["table"]] == pytest.approx(
        [results["final"]["top1"], expected, results["final"]["top1"]])

    # the official protocol and --evaluate give the same head's number on each set, read from images
    official = eval_linear.main(["--pretrained_weights", checkpoint, *probe, "--lr", "30",
                                 "--output_dir", str(tmp_path / "official")])
    assert official["test_sets"]["same"]["top1"] == pytest.approx(official["final"]["top1"])
    evaluated = eval_linear.main(["--pretrained_weights", checkpoint, *probe, "--evaluate",
                                  "--output_dir", str(tmp_path / "official")])
    assert evaluated["test_sets"] == official["test_sets"]
    assert "linear probe (this head) top-1 (%) on val and the test sets:" in capsys.readouterr().out
