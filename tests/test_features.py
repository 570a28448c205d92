"""Shared feature extraction: reading weights, resolving the architecture, feature kinds, exact DDP gathering."""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_sparo_vit import intermediate_cls
from torch.utils.data import Dataset

import eval_knn
import sparo_vit
from sparo_dino import distributed
from sparo_dino.cli import eval_flags
from sparo_dino.eval import extraction, feature_cache, linear_probe
from sparo_dino.io import weights

SPARO_TINY = {"arch": "vit_tiny_sparo", "patch_size": 8, "img_size": 32, "num_slots": 4, "slot_dim": 16,
              "attn_dim": 16, "group_size": 1}


def flags(**given):
    """The evaluation flags with every model flag unset unless given."""
    values = {key: None for key in weights.BACKBONE_OPTION_KEYS}
    values.update(given)
    return values


def training_checkpoint(backbone, config, student_prefix="module."):
    """The documented checkpoint layout: teacher/student with backbone./head. prefixes and a plain config."""
    def network(prefix):
        state = {f"{prefix}backbone.{k}": v for k, v in backbone.state_dict().items()}
        state[f"{prefix}head.last_layer.weight"] = torch.zeros(3, 3)
        return state
    return {"teacher": network(""), "student": network(student_prefix), "config": dict(config), "epoch": 1}


def test_read_weights_takes_the_named_network_and_its_config(tmp_path):
    backbone = sparo_vit.build_backbone(**SPARO_TINY)
    path = tmp_path / "checkpoint0003.pth"
    torch.save(training_checkpoint(backbone, {**SPARO_TINY, "lr": 0.1}), path)
    for key in ("teacher", "student"):
        loaded = weights.read_weights(str(path), key)
        assert set(loaded.state_dict) == set(backbone.state_dict())
        assert loaded.config["num_slots"] == 4
        assert loaded.tag == f"checkpoint0003_{key}"


def test_plain_state_dict_and_missing_network(tmp_path):
    backbone = sparo_vit.build_backbone("vit_tiny", patch_size=8, img_size=32)
    path = tmp_path / "weights.pth"
    torch.save(backbone.state_dict(), path)
    loaded = weights.read_weights(str(path))
    assert loaded.config is None and loaded.tag == "weights"
    torch.save({"student": {"backbone.x": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="no 'teacher' network"):
        weights.read_weights(str(path), "teacher")


def test_official_pickled_checkpoint_loads(tmp_path):
    backbone = sparo_vit.build_backbone("vit_tiny", patch_size=8, img_size=32)
    path = tmp_path / "official.pth"
    args = argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=65536)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "args": args}, path)
    loaded = weights.read_weights(str(path))  # its Namespace loads through the allow-list, with no warning
    assert loaded.config["arch"] == "vit_tiny"
    options = weights.resolve_model_options(flags(img_size=32), loaded.config)
    assert options == {"arch": "vit_tiny", "patch_size": 8, "img_size": 32}


def test_config_wins_and_contradicting_flags_fail():
    assert weights.resolve_model_options(flags(), SPARO_TINY) == SPARO_TINY
    assert weights.resolve_model_options(flags(patch_size=8, num_slots=4), SPARO_TINY) == SPARO_TINY
    with pytest.raises(ValueError, match="--patch_size 16 conflicts"):
        weights.resolve_model_options(flags(patch_size=16), SPARO_TINY)
    with pytest.raises(ValueError, match="--num_slots 8 conflicts"):
        weights.resolve_model_options(flags(num_slots=8), SPARO_TINY)


def test_plain_state_dicts_need_arch_flags_and_baselines_reject_sparo_flags():
    with pytest.raises(ValueError, match="--arch and --patch_size required"):
        weights.resolve_model_options(flags(), None)
    assert weights.resolve_model_options(flags(arch="vit_small", patch_size=16), None) == {
        "arch": "vit_small", "patch_size": 16}
    with pytest.raises(ValueError, match="--num_slots does not apply to the cls read-out"):
        weights.resolve_model_options(flags(arch="vit_small", patch_size=16, num_slots=8), None)


def test_weights_of_another_model_are_refused():
    backbone = sparo_vit.build_backbone(**SPARO_TINY)
    other = {**SPARO_TINY, "num_slots": 8}
    with pytest.raises(ValueError, match="sparo.query has shape"):
        weights.build_frozen_backbone(other, backbone.state_dict(), "x.pth")
    with pytest.raises(ValueError, match="do not fit vit_tiny"):
        weights.build_frozen_backbone({"arch": "vit_tiny", "patch_size": 8, "img_size": 32},
                                      backbone.state_dict(), "x.pth")


def test_feature_kinds_match_the_backbone_outputs():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    sparo = sparo_vit.build_backbone(**SPARO_TINY).eval()
    assert extraction.feature_kind("vit_tiny_sparo", 4, True) == "sparo_encoding"
    torch.testing.assert_close(extraction.feature_function(sparo, "sparo_encoding")(images), sparo(images))
    base = sparo_vit.build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    torch.testing.assert_close(extraction.feature_function(base, "cls_last1")(images), base(images))
    last4 = extraction.feature_function(base, extraction.feature_kind("vit_tiny", 4))(images)
    assert last4.shape == (2, 4 * 192)
    torch.testing.assert_close(last4[:, -192:], base(images))  # the last block's final-norm CLS
    pooled = extraction.feature_function(base, "cls_last1_avgpool")(images)
    # official DINO's layout: cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1), i.e. interleaved
    cls, mean = base(images), base.tokens(images)[:, 1:].mean(1)
    official = torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(2, -1)
    torch.testing.assert_close(pooled, official)
    pooled4 = extraction.feature_function(base, "cls_last4_avgpool")(images)
    torch.testing.assert_close(pooled4, torch.cat([last4[:, :-192], official], dim=1))


def test_sparo_encoding_plus_cls_of_the_blocks_before_sparo():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    sparo = sparo_vit.build_backbone(**SPARO_TINY).eval()  # 11 trunk blocks + SPARO
    assert extraction.feature_kind("vit_tiny_sparo", 4) == "sparo_encoding"  # the default reading (paper C.2)
    kind = extraction.feature_kind("vit_tiny_sparo", 4, sparo_features="encoding+cls")
    assert kind == "cls_last3+sparo_encoding"
    with torch.no_grad():
        got = extraction.feature_function(sparo, kind)(images)
        cls3 = intermediate_cls(sparo, images, 3)  # final-norm CLS of trunk blocks 9, 10, 11
        encoding = sparo(images)
    assert got.shape == (2, 3 * 192 + 4 * 16)
    torch.testing.assert_close(got, torch.cat([*cls3, encoding], dim=1))
    assert extraction.feature_kind("vit_tiny_sparo", 2, sparo_features="encoding+cls") == "cls_last1+sparo_encoding"
    with pytest.raises(ValueError, match="needs --n_last_blocks >= 2"):
        extraction.feature_kind("vit_tiny_sparo", 1, sparo_features="encoding+cls")
    with pytest.raises(ValueError, match="the trunk has 11"):
        extraction.feature_function(sparo, "cls_last12+sparo_encoding")
    base = sparo_vit.build_backbone("vit_tiny", patch_size=8, img_size=32)
    with pytest.raises(ValueError, match="does not apply to this backbone"):
        extraction.feature_function(base, "cls_last3+sparo_encoding")


def _feature_set(num_train=6, num_val=4, dim=8):
    gen = torch.Generator().manual_seed(0)
    meta = {"kind": "sparo_encoding", "options": dict(SPARO_TINY), "tag": "checkpoint_teacher"}
    return feature_cache.FeatureSet(torch.randn(num_train, dim, generator=gen) * 5, torch.arange(num_train) % 3,
                                    torch.randn(num_val, dim, generator=gen) * 5, torch.arange(num_val) % 2,
                                    ["a", "b", "c"], meta)


def test_official_dump_format_is_what_official_eval_knn_reads_and_writes(tmp_path):
    data = _feature_set()
    feature_cache.save_features(data, str(tmp_path / "official"), "official")
    names = sorted(os.listdir(tmp_path / "official"))
    assert names == ["testfeat.pth", "testlabels.pth", "trainfeat.pth", "trainlabels.pth"]
    # official eval_knn.py: torch.load of plain tensors, L2-normalized features, int64 labels
    train = torch.load(tmp_path / "official" / "trainfeat.pth", weights_only=True)
    test_labels = torch.load(tmp_path / "official" / "testlabels.pth", weights_only=True)
    torch.testing.assert_close(train, data.train_features / data.train_features.norm(dim=1, keepdim=True))
    assert test_labels.dtype == torch.int64 and test_labels.tolist() == [0, 1, 0, 1]
    loaded = feature_cache.load_features(str(tmp_path / "official"))
    assert loaded.meta["kind"] == feature_cache.OFFICIAL_DUMP_KIND and loaded.meta["options"] == {}
    assert loaded.num_classes == 3  # 0..max label: the dump names no classes
    torch.testing.assert_close(loaded.val_features.norm(dim=1), torch.ones(4))

    feature_cache.save_features(data, str(tmp_path / "both"), "both")
    assert len(os.listdir(tmp_path / "both")) == 6
    own = feature_cache.load_features(str(tmp_path / "both"))  # this repository's format wins: raw features + model
    assert own.meta == data.meta and torch.equal(own.train_features, data.train_features)
    with pytest.raises(FileNotFoundError, match="or an official DINO dump"):
        feature_cache.load_features(str(tmp_path / "nothing"))
    torch.save({"not": "a tensor"}, tmp_path / "official" / "trainfeat.pth")
    with pytest.raises(ValueError, match="not a tensor as official DINO dumps do"):
        feature_cache.load_features(str(tmp_path / "official"))


def test_official_launch_flags_parse_and_only_env_rendezvous_is_accepted():
    parser = distributed.add_launcher_args(argparse.ArgumentParser())
    assert parser.parse_args(["--local-rank=3"]).local_rank == 3  # torch.distributed.launch (torch >= 2.0)
    assert parser.parse_args(["--local_rank", "2"]).local_rank == 2  # older launchers
    distributed.check_launcher_args(parser.parse_args([]))
    with pytest.raises(ValueError, match="--dist_url tcp://host:1 is not supported"):
        distributed.check_launcher_args(parser.parse_args(["--dist_url", "tcp://host:1"]))


def test_shard_sampler_partitions_the_dataset():
    shards = [list(extraction.ShardSampler(10, rank, 4)) for rank in range(4)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert [len(shard) for shard in shards] == [3, 3, 2, 2]


class IndexDataset(Dataset):
    """Sample i is a 2-vector (i, -i) with label i % 3, so gathered rows reveal their origin."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return torch.tensor([float(index), -float(index)]), index % 3


def _gather_worker(rank: int, world: int, port: int, size: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = distributed.init_distributed("gloo")
    extraction._GATHER_ROWS = 2  # several gather rounds even on tiny data
    try:
        result = extraction.extract_features(lambda x: x, IndexDataset(size), batch_size=2, num_workers=0,
                                             device=info.device)
        torch.manual_seed(0)  # the same classifier on every rank
        classifier = linear_probe.LinearClassifier(2, 3)
        shard = extraction.ShardSampler(size, rank, world)
        batches = [(torch.stack([IndexDataset(size)[i][0] for i in shard.indices]),
                    torch.tensor([i % 3 for i in shard.indices]))] if len(shard) else []
        metrics = linear_probe.evaluate(classifier, batches, lambda x: x, 3, info.device, reduce=True)
        torch.save({"result": result, "metrics": metrics}, f"{out}.{rank}")
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("size", [7, 1])
def test_uneven_ddp_extraction_gathers_every_sample_once_in_order(tmp_path, size):
    out = str(tmp_path / "gathered")
    mp.spawn(_gather_worker, args=(2, _free_port(), size, out), nprocs=2, join=True)
    main, other = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert other["result"] is None  # only the main process keeps the features
    gathered, labels = main["result"]
    expected = torch.arange(size, dtype=torch.float32)
    torch.testing.assert_close(gathered, torch.stack([expected, -expected], dim=1))
    assert labels.tolist() == [i % 3 for i in range(size)]
    # validation counts summed over disjoint shards equal a single-process evaluation
    torch.manual_seed(0)
    classifier = linear_probe.LinearClassifier(2, 3)
    alone = linear_probe.evaluate(classifier, [(gathered, labels)], lambda x: x, 3, torch.device("cpu"), False)
    assert main["metrics"] == pytest.approx(alone)
    assert other["metrics"] == pytest.approx(alone)


def test_build_splits_takes_the_dataset_and_its_path_and_refuses_splits_with_other_classes(tmp_path):
    from conftest import make_image_folder
    root = make_image_folder(tmp_path / "data", num_classes=3, per_class=2, size=8, splits=("train", "val"))
    train, val = extraction.build_splits("imagefolder", root, None, None)
    assert list(train.classes) == list(val.classes) == ["class_0", "class_1", "class_2"]
    assert (len(train), len(val)) == (6, 6)
    shutil.rmtree(os.path.join(root, "val", "class_1"))  # ImageFolder would renumber class_2 as 1
    with pytest.raises(ValueError, match="different classes \\(only in train: \\['class_1'\\]"):
        extraction.build_splits("imagefolder", root, None, None)


def _write_plain_pickle(path: str) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"features": [[0.0, 1.0]], "labels": [0]}, handle)


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


class _RunsCode:
    """Unpickling this object would run `touch <marker>`: what a crafted feature file does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


DAMAGED_FEATURE_FILES = {  # name: (damage train_features.pth, words of the one line)
    "garbage": (lambda path: open(path, "wb").write(b"not a feature file" * 8), "is corrupt or truncated"),
    "truncated": (_truncate, "is corrupt or truncated"),
    "empty": (lambda path: open(path, "wb").close(), "is corrupt or truncated"),
    "plain pickle": (_write_plain_pickle, "is a plain Python pickle, not a feature file this tool loads"),
    "foreign": (lambda path: torch.save({"model": {"w": torch.zeros(2)}}, path),
                "not a feature file written by --dump_features (it holds model)"),
    "wrong shapes": (lambda path: torch.save({"features": torch.zeros(6), "labels": torch.zeros(6, 2),
                                              "classes": ["a"], "meta": {}}, path),
                     "features and labels are not an (N, D) and an (N,) tensor"),
    "bad labels": (lambda path: torch.save({"features": torch.zeros(6, 8), "labels": torch.full((6,), 7),
                                            "classes": ["a", "b", "c"],
                                            "meta": {"kind": "sparo_encoding", "options": {}, "tag": "t"}}, path),
                   "labels outside the 3 classes"),
    "crafted": (lambda path: torch.save({"features": _RunsCode(os.path.join(os.path.dirname(path), "marker"))}, path),
                "holds objects that are not allowed in a feature file"),
}


@pytest.mark.parametrize("damage", DAMAGED_FEATURE_FILES)
def test_load_features_on_a_damaged_foreign_or_crafted_file_is_one_line(tmp_path, damage):
    """Before: torch's UnpicklingError (with its advice to retry with weights_only=False), KeyError or shape errors
    as tracebacks."""
    cache = str(tmp_path / "cache")
    feature_cache.save_features(_feature_set(), cache)
    path = os.path.join(cache, "train_features.pth")
    damage_file, words = DAMAGED_FEATURE_FILES[damage]
    damage_file(path)
    with pytest.raises(SystemExit) as info:
        eval_flags.run_cli(lambda: eval_knn.main(["--load_features", cache, "--nb_knn", "1"]))
    line = str(info.value.code)
    assert line.startswith("error: ") and "\n" not in line and path in line and words in line, line
    assert "weights_only" not in line and not os.path.exists(os.path.join(cache, "marker"))
